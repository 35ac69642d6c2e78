"""Build (and check) the TensorRT engine of a bundle's encoder on this GPU: `emrrg-export --target tensorrt|jetson`.

Engines are specific to a GPU and a TensorRT version, so they are built on the machine that runs them
(the export machine when it is the target, else the first `Runtime.from_pretrained(..., backend="tensorrt")`
there). This module is the export side of emrrg.runtime.tensorrt, which does the work:

    bundle/encoder.onnx (f32 or INT8 Q/DQ, com.emrrg::SelectiveScan nodes)
        + libemrrg_trt_plugin.so (IPluginV3 SelectiveScan, emrrg, v1)
        --TensorRT 11: strongly typed | TensorRT 10.x: FP16 (+ INT8 for Q/DQ) flags-->  plan
        --check on the calibration images vs ONNX Runtime CPU-->  reference ms, engine ms, max |Δ|
        --> bundle/engines/<onnx sha>-<gpu>-sm<cc>-trt<version>-<precision>-p<profile>.plan (+ .json)

The plan is a cache, not a bundle artifact: it is not in the manifest's file list (the bundle's sha
stays the same) and a runtime on another GPU or TensorRT version builds its own.

    python -m emrrg.export.tensorrt_engine BUNDLE [--precision auto|fp32|fp16|int8] [--calib DIR] [--rebuild]

Torch-free (like the runtime): it may run on a Jetson that has only the runtime stack.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from emrrg.runtime import tensorrt as trt_backend
from emrrg.runtime.bundle import BundleError, open_bundle
from emrrg.runtime.tensorrt import TensorRTBackendError
from emrrg.runtime.helpfmt import DefaultsHelpFormatter

MAX_CHECK_IMAGES = 8  # calibration images run through both ONNX Runtime (CPU, slow) and the engine


def calibration_pixels(image_size: int, images: Sequence | None = None, calib_dir: str | None = None,
                       limit: int = MAX_CHECK_IMAGES) -> tuple[np.ndarray, str]:
    """(N, 1, 3, S, S) preprocessed images for the post-build check, and where they came from.

    The export's calibration source: the given paths, a folder (emrrg-export --calib), else the real
    X-rays shipped in the offline asset packages.
    """
    from emrrg.runtime.preprocess import preprocess_study

    if images is None:
        if calib_dir:
            exts = {".dcm", ".png", ".jpg", ".jpeg"}
            images = sorted(p for p in Path(calib_dir).rglob("*") if p.suffix.lower() in exts)
            source = f"calibration folder {calib_dir}"
        else:
            from emrrg.assets import real_xrays
            images = real_xrays()
            source = "the calibration X-rays (emrrg.assets.real_xrays)"
    else:
        source = "the given calibration images"
    images = list(images)[:limit]
    if not images:
        raise TensorRTBackendError(f"no images to check the engine with ({source} is empty)")
    px = np.stack([preprocess_study([p], size=image_size) for p in images]).astype(np.float32)
    return px, f"{len(images)} images from {source}"


def build_bundle_engine(bundle: str | Path, precision: str = "auto", *, images: Sequence | None = None,
                        calib_dir: str | None = None, max_batch: int = 4, max_views: int = 4, rebuild: bool = False,
                        cache_dir: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Build (or load from the cache) the encoder engine of `bundle` for this GPU; returns the build report.

    Raises TensorRTBackendError with what to install or build when TensorRT, a GPU or the plugin is missing.
    """
    ok, reason = trt_backend.available()
    if not ok:
        raise TensorRTBackendError(f"cannot build a TensorRT engine here: {reason}")
    bundle = Path(bundle)
    manifest = open_bundle(bundle)   # the contract, paths inside the bundle, every file's sha256
    size = manifest.encoder.image_size
    pixels, source = calibration_pixels(size, images, calib_dir)
    enc = trt_backend.TensorRTEncoder.from_bundle(bundle, manifest, precision, max_batch=max_batch, max_views=max_views,
                                                  check_pixels=pixels, check_source=source, rebuild=rebuild,
                                                  cache_dir=cache_dir, progress=log)
    report = {**enc.summary(), "key": enc.build_info.get("key"), "build_s": enc.build_info.get("build_s")}
    chk = report.get("check") or {}
    if chk.get("skipped"):
        log(f"TensorRT {enc.precision} engine for {enc.gpu.name}: NOT checked against ONNX Runtime ({chk['skipped']})")
    elif chk:
        log(f"TensorRT {enc.precision} engine for {enc.gpu.name}: reference (ORT CPU) {chk['reference_ms']:.1f} ms, "
            f"engine {chk['engine_ms']:.2f} ms per study, max |Δ| {chk['max_abs_diff']:.3g}, NMSE {chk['nmse']:.3g} "
            f"({chk['inputs']})")
    log(f"engine: {enc.plan_path}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emrrg.export.tensorrt_engine", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("bundle", help="bundle directory (emrrg-export output)")
    ap.add_argument("-p", "--precision", default="auto", choices=trt_backend.PRECISIONS,
                    help="auto: int8 for an INT8 bundle, else fp16 (TensorRT 10) / fp32 (TensorRT 11)")
    ap.add_argument("--calib", default=None, help="folder of DICOM/PNG/JPEG images for the post-build check")
    ap.add_argument("--max-batch", type=int, default=4, help="largest number of studies per call")
    ap.add_argument("--max-views", type=int, default=4, help="largest number of views per study")
    ap.add_argument("--cache-dir", default=None, help="engine cache (default: BUNDLE/engines, else ~/.cache/emrrg/engines)")
    ap.add_argument("--rebuild", action="store_true", help="ignore a cached engine")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = build_bundle_engine(args.bundle, args.precision, calib_dir=args.calib, max_batch=args.max_batch,
                                     max_views=args.max_views, rebuild=args.rebuild, cache_dir=args.cache_dir)
    except (TensorRTBackendError, BundleError, FileNotFoundError) as e:
        print(f"emrrg tensorrt engine: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
