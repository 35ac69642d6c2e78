"""emrrg-run: bundle + the views of one study -> report. Torch-free.

    emrrg-run BUNDLE frontal.dcm [lateral.dcm ...] [--backend auto] [--beams N] [--max-new-tokens N]
              [--stream] [--json] [--max-megapixels 64] [--allow-modality MOD ...] [--strict-inputs]

The input gate (emrrg.runtime.gate) reads every image's header before the bundle is loaded and refuses
what is not a chest radiograph study (see the README's "Input checks"). Every known failure (bundle
problems, missing op library, unreadable or refused image, unavailable backend) prints one line on
stderr and exits 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from emrrg.runtime import logs
from emrrg.runtime.helpfmt import CommandParser, DefaultsHelpFormatter, add_decoding_arguments
from emrrg.runtime.extras import SR_MODULES, require_extra


def run_main(argv: list[str] | None = None) -> None:
    from emrrg.runtime.report_runtime import BACKENDS
    from emrrg.runtime.gate import add_input_arguments

    p = CommandParser(prog="emrrg-run", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("bundle", help="bundle directory written by emrrg-export")
    p.add_argument("images", nargs="+", help="DICOM / PNG / JPEG views of ONE study (averaged as upstream)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="execution backend")
    add_decoding_arguments(p)
    p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="ban any repeated n-gram of this many tokens, 0 = off (default: the bundle's setting)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (greedy only streams live)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text (everything "
                                                       "else goes to stderr)")
    p.add_argument("--sr", metavar="OUT.dcm", default=None,
                   help="also write the report as a DICOM SR (Enhanced SR) to OUT.dcm; the views must be DICOM "
                        "(default: no SR)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files (sizes still checked)")
    add_input_arguments(p)
    a = p.parse_args(argv)

    from emrrg.runtime.bundle import BundleError
    from emrrg.runtime.report_runtime import BackendUnavailableError, Runtime
    from emrrg.runtime.oplib import OpLibraryMissingError
    from emrrg.runtime.gate import check_study, policy_from_args, read_views
    from emrrg.runtime.preprocess import ImageError

    shown: set[str] = set()

    def show_warnings(caught) -> None:
        for w in caught:
            if str(w.message) not in shown:
                shown.add(str(w.message))
                print(f"emrrg-run: warning: {w.message}", file=sys.stderr)

    try:
        sr_sources = _sr_sources(a.sr, a.images) if a.sr else None    # before the model loads: refuse early
        policy = policy_from_args(a)
        with warnings.catch_warnings(record=True) as caught:  # the input gate first: no model load for a refused study
            warnings.simplefilter("always")
            check_study(read_views(a.images, policy), policy)
        show_warnings(caught)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            rt = Runtime.from_pretrained(a.bundle, backend=a.backend, threads=a.threads, verify=not a.no_verify)
        show_warnings(caught)
        on_token = None
        if a.stream and not a.json:
            from emrrg.runtime.generation import TextDeltas

            deltas = TextDeltas(rt.decode_text)   # each token's text as it arrives, characters kept whole

            def on_token(tok: int) -> None:
                sys.stdout.write(deltas.add(tok))
                sys.stdout.flush()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = rt.generate(a.images, num_beams=a.beams, max_new_tokens=a.max_new_tokens,
                              min_new_tokens=a.min_new_tokens, on_token=on_token,
                              no_repeat_ngram_size=a.no_repeat_ngram_size, max_megapixels=policy.max_megapixels,
                              allow_modality=policy.allow_modality, strict_inputs=policy.strict_inputs)
        show_warnings(caught)
    except (BundleError, OpLibraryMissingError, ImageError, BackendUnavailableError, ValueError) as e:
        print(f"emrrg-run: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("emrrg-run: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    if a.sr:
        _write_sr(a.sr, sr_sources, out)
    if a.json:
        out = {k: v for k, v in out.items() if k != "token_ids"}
        out["timings_ms"] = {k: round(v, 2) for k, v in out["timings_ms"].items()}
        print(json.dumps(out))
        return
    if a.stream:
        print()
    else:
        print(out["report"])
    t = out["timings_ms"]
    if not logs.quiet():  # -q: the report alone
        print(f"[{out['backend']}; {out['tokens']} tokens; preprocess {t['preprocess']:.0f} ms, encoder {t['encoder']:.0f} ms, "
              f"prefill {t['prefill']:.0f} ms, decode {t['decode']:.0f} ms, total {t['total']:.0f} ms; "
              f"peak RSS {out['peak_rss_mb']:.0f} MB]", file=sys.stderr)


def _sr_sources(path: str, images: list[str]) -> list:
    """The views' DICOM headers for --sr, read before the model loads, so a PNG / JPEG view or an unwritable
    output folder fails at once (SRError, a ValueError), not after the report is generated."""
    require_extra("emrrg-run", "runtime", SR_MODULES, "--sr (DICOM SR output)")
    from emrrg.runtime.sr import check_output_path, read_headers

    check_output_path(path)
    return read_headers(images)


def _write_sr(path: str, headers: list, out: dict) -> None:
    from emrrg.runtime.sr import SRError, write_sr

    try:
        write_sr(path, headers, out, labels=None)
    except (SRError, OSError) as e:
        print(f"emrrg-run: error: --sr: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out["sr"] = str(path)
    print(f"emrrg-run: wrote the DICOM SR {path}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    run_main()
