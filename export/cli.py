"""emrrg-export: a trained checkpoint -> a validated, atomically written bundle.

    emrrg-export CHECKPOINT -o BUNDLE [--int8] [--llm-bits 4] [--target cpu|cuda|tensorrt|jetson]
                 [--calib DIR] [--extra-options K=V ...] [--strict]

Known failures print one line on stderr and exit 2; Ctrl-C / SIGTERM exit 130. Either way no bundle
directory and no partial files are left.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from .pipeline import TARGETS
from emrrg.runtime.helpfmt import DefaultsHelpFormatter

EXTRA_HELP = ("quantization knobs as KEY=VALUE that pin one configuration instead of the accuracy-aware ladder: "
              "decoder block_size=32 symmetric=false lm_head_bits=8 accuracy_level=4 (export/quantize_decoder.py); "
              "encoder encoder_smooth_alpha=0.75 (0: off) encoder_method=minmax|percentile|entropy "
              "encoder_w3_float=false (export/quantize_encoder.py)")


def _parse_extra(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"emrrg-export: error: --extra-options takes KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def export_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="emrrg-export", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("checkpoint", help="emrrg checkpoint directory (emrrg-init / emrrg-import / emrrg-train)")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.add_argument("--int8", action="store_true", help="INT8 encoder (explicit Q/DQ, calibrated on X-rays)")
    p.add_argument("--llm-bits", type=int, default=4, choices=(4, 32), help="decoder weight bits (32 = f32)")
    p.add_argument("--target", default="cpu", choices=TARGETS, help="where the bundle will run")
    p.add_argument("--calib", default=None, help="folder of DICOM/PNG/JPEG calibration images; unset, the real X-rays "
                                                 "shipped offline")
    p.add_argument("--extra-options", nargs="*", default=[], metavar="K=V", help=EXTRA_HELP)
    p.add_argument("--strict", action="store_true", help="fail when no quantization configuration meets its thresholds")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle (only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs and embedded callers)")
    p.add_argument("--json", action="store_true", help="print the manifest's summary as JSON when done")
    a = p.parse_args(argv)
    extra = _parse_extra(a.extra_options)

    from .pipeline import ExportOptions, export_bundle

    quiet_library_warnings()

    opts = ExportOptions(int8=a.int8, llm_bits=a.llm_bits, target=a.target, calib=a.calib, strict=a.strict,
                         overwrite=a.overwrite, extra=extra)
    try:
        manifest = export_bundle(a.checkpoint, a.output, opts, progress=not a.no_progress)
    except KeyboardInterrupt:
        print("emrrg-export: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    except _known_errors() as e:
        print(f"emrrg-export: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    summary = {"bundle": a.output, "bytes": sum(f["bytes"] for f in manifest["files"].values()),
               "artifacts": {k: {"precision": v["precision"], "bytes": v["bytes"]} for k, v in manifest["artifacts"].items()},
               "export_s": manifest.get("export_s")}
    if a.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {a.output}: {summary['bytes'] / 2**20:.1f} MiB in {summary['export_s']} s")
        for k, v in summary["artifacts"].items():
            print(f"  {k:<17} {v['precision']:<6} {v['bytes'] / 2**20:8.2f} MiB")


def quiet_library_warnings() -> None:
    """Deprecation chatter from transformers / peft / torch.onnx is not for the console operator."""
    for cat in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=cat)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"transformers.*")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _known_errors() -> tuple[type[BaseException], ...]:
    from ..assets import MissingAssetError
    from ..checkpoint import CheckpointError
    from ..config import UnknownPresetError
    from ..decoder import DecoderLoadError
    from ..lora import AdapterMismatchError
    from ..runtime.preprocess import ImageError
    from .bundle import ExportError
    from .encoder_onnx import ValidationError
    from .quantize_encoder import CalibrationError, QuantizationError

    errs: list[type[BaseException]] = [CheckpointError, UnknownPresetError, DecoderLoadError, AdapterMismatchError,
                                       ImageError, MissingAssetError, ExportError, ValidationError, CalibrationError,
                                       QuantizationError, FileNotFoundError]
    try:
        from .decoder_onnx import DecoderExportError
        errs.append(DecoderExportError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


if __name__ == "__main__":  # pragma: no cover
    export_main()
