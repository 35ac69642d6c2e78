"""emrrg-export: a trained checkpoint -> a validated, atomically written bundle.

    emrrg-export CHECKPOINT -o BUNDLE [--int8] [--llm-bits 4] [--target cpu|cuda|tensorrt|jetson]
                 [--calib DIR] [--extra-options K=V ...] [--strict]

Known failures (every emrrg.export.errors.ExportError, a bad checkpoint, image or asset, a full disk) print
one line `emrrg-export: error: ...` on stderr and exit 2; Ctrl-C / SIGTERM exit 130. Either way no bundle
directory and no partial files are left. --extra-options are checked before any work (export/options.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import NoReturn

from emrrg.export.errors import ExportError, disk_full_message, is_disk_full
from emrrg.export.options import check_extra_options, extra_help, split_extra_options
from emrrg.export.pipeline import TARGETS
from emrrg.export.report_check import DEFAULT_REPORT_LIMIT
from emrrg.runtime import logs
from emrrg.runtime.helpfmt import CommandParser, DefaultsHelpFormatter

log = logging.getLogger("emrrg.export")


def export_main(argv: list[str] | None = None) -> None:
    p = CommandParser(prog="emrrg-export", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("checkpoint", help="emrrg checkpoint directory (emrrg-init / emrrg-import / emrrg-train)")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.add_argument("--int8", action="store_true", help="INT8 encoder (explicit Q/DQ, calibrated on X-rays)")
    p.add_argument("--llm-bits", type=int, default=4, choices=(4, 32), help="decoder weight bits (32 = f32)")
    p.add_argument("--target", default="cpu", choices=TARGETS, help="where the bundle will run")
    p.add_argument("--calib", default=None, help="folder of DICOM/PNG/JPEG calibration images (default: the real X-rays "
                                                 "shipped offline in pydicom-data and pneumonia-model-package)")
    p.add_argument("--extra-options", nargs="*", default=[], metavar="K=V", help=extra_help())
    p.add_argument("--calib-reports", default=None, metavar="ANNOTATION",
                   help="also check each INT8 encoder rung and 4-bit decoder rung that passes its token-level "
                        "thresholds on reports: written for this annotation.json's validation studies, their "
                        "BLEU-4 / CIDEr / CE-F1 must stay within 5%% / 5%% / 1%% of the f32 model's, or the ladder "
                        "goes on (default: off)")
    p.add_argument("--calib-reports-limit", type=int, default=DEFAULT_REPORT_LIMIT, metavar="N",
                   help="validation studies the report check writes")
    p.add_argument("--strict", action="store_true", help="fail when no quantization configuration meets its thresholds")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle (only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs and embedded callers)")
    p.add_argument("--json", action="store_true", help="print the manifest's summary as one JSON document on stdout "
                                                       "when done (everything else goes to stderr)")
    a = p.parse_args(argv)
    try:  # before anything is loaded: a typo fails in a second, not after minutes of export
        extra = split_extra_options(a.extra_options)
        check_extra_options(extra, int8=a.int8, llm_bits=a.llm_bits)
    except ExportError as e:
        _fail(e)

    from emrrg.cli import require_torch

    require_torch("emrrg-export")
    from emrrg.export.pipeline import ExportOptions, export_bundle

    quiet_library_warnings()

    opts = ExportOptions(int8=a.int8, llm_bits=a.llm_bits, target=a.target, calib=a.calib, strict=a.strict,
                         overwrite=a.overwrite, extra=extra, calib_reports=a.calib_reports,
                         calib_reports_limit=a.calib_reports_limit)
    try:
        with logs.results_only_stdout():  # stdout carries the summary alone (a library's print goes to stderr)
            manifest = export_bundle(a.checkpoint, a.output, opts, progress=not a.no_progress, log=_log)
    except KeyboardInterrupt:
        print("emrrg-export: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    except _known_errors() as e:
        _fail(e)
    except OSError as e:  # a full disk met outside the bundle writer (which reports its own)
        if not is_disk_full(e):
            raise
        _fail(disk_full_message(e, Path(a.output).absolute().parent))
    summary = {"bundle": a.output, "bytes": sum(f["bytes"] for f in manifest["files"].values()),
               "artifacts": {k: {"precision": v["precision"], "bytes": v["bytes"]} for k, v in manifest["artifacts"].items()},
               "export_s": manifest.get("export_s")}
    ref = manifest["validation"].get("decoder_reference")
    if ref:  # what the 4-bit decoder was validated against (export/streamed_reference.py)
        summary["decoder_reference"] = ref["kind"]
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {a.output}: {summary['bytes'] / 2**20:.1f} MiB in {summary['export_s']} s")
        for k, v in summary["artifacts"].items():
            print(f"  {k:<17} {v['precision']:<6} {v['bytes'] / 2**20:8.2f} MiB")
        if ref:
            print(f"  decoder reference: {ref['why']}")


def quiet_library_warnings() -> None:
    """Deprecation chatter from transformers / peft / torch.onnx and torch.onnx's registration lines ("torchvision
    is not installed. Skipping ...") are not for the console operator: shown only with --verbose (runtime/logs.py)."""
    logs.quiet_warnings()
    import torch  # noqa: F401  (importing torch resets its loggers' levels: set ours after it)
    logs.torch_loggers_quiet()
    logs.quiet_onnxruntime()


def _log(msg: str) -> None:
    """The pipeline's messages (INT8 ladder rungs, a decoder graph fallback) on stderr: -q hides them but
    keeps the warnings."""
    if msg.startswith("warning: "):
        log.warning(msg[len("warning: "):])
    else:
        log.info(msg)


def one_line(e: BaseException | str) -> str:
    """A message on one line: multi-line details (per-check failures) joined with '; '."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    out = lines[0] if lines else type(e).__name__
    for ln in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + ln
    return out


def _fail(e: BaseException | str) -> NoReturn:
    print(f"emrrg-export: error: {one_line(e)}", file=sys.stderr)
    raise SystemExit(2) from None


def _known_errors() -> tuple[type[BaseException], ...]:
    """ExportError (every error emrrg.export raises on purpose) and the errors of what the export reads."""
    from emrrg.assets import MissingAssetError
    from emrrg.checkpoint import CheckpointError
    from emrrg.config import UnknownPresetError
    from emrrg.decoder import DecoderLoadError
    from emrrg.lora import AdapterMismatchError
    from emrrg.runtime.oplib import OpLibraryMissingError
    from emrrg.runtime.preprocess import ImageError

    return (ExportError, CheckpointError, UnknownPresetError, DecoderLoadError, AdapterMismatchError, ImageError,
            MissingAssetError, OpLibraryMissingError, FileNotFoundError)


if __name__ == "__main__":  # pragma: no cover
    export_main()
