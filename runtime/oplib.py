"""Locate and register the SelectiveScan op library (libemrrg_ops.so) with ONNX Runtime.

The exported encoder holds `com.emrrg::SelectiveScan` nodes; ONNX Runtime runs them only after the op library is registered on the SessionOptions:

    import onnxruntime as ort
    from emrrg.runtime import oplib

    so = ort.SessionOptions()
    oplib.register(so)                      # raises OpLibraryMissingError with the build command
    sess = ort.InferenceSession("encoder.onnx", so)

Search order (first existing file wins):
  1. lib/ inside this package: what the platform wheel ships (`pip wheel .` compiles it, see setup.py).
  2. $EMRRG_OPS_LIB (a file, or a folder holding the library). When set, the build tree is not looked in.
  3. The build tree of a source checkout, $EMRRG_BUILD_DIR or build/plugins (what `bash scripts/build_plugins.sh`
     makes). emrrg.source_checkout() says whether this is one (a plain checkout or an editable install); an
     installed package has no build tree.
In each folder, under onnxruntime-gpu, libemrrg_ops_cuda.so first, then libemrrg_ops.so.

Torch-free: numpy / onnxruntime only (tests/runtime/test_torch_free.py).
"""
from __future__ import annotations

import os
from pathlib import Path

LIBRARY_NAME = "libemrrg_ops.so"
CUDA_LIBRARY_NAME = "libemrrg_ops_cuda.so"  # CPU-EP + CUDA-EP kernels (built with nvcc and the ORT headers)
ENV_VAR = "EMRRG_OPS_LIB"
BUILD_COMMAND = "bash scripts/build_plugins.sh"

# The node the library implements (must match plugins/selective_scan/selectiveScanOrtOp.cpp).
OP_DOMAIN = "com.emrrg"
OP_TYPE = "SelectiveScan"
OP_VERSION = 1
# The affine 4-bit decoder's correction Y = A + BlockSum(X) @ C (plugins/selective_scan/blockSumMatMulAddOp.h), same
# library and domain. Optional: the built decoder carries the op's standard-ONNX body as a model-local function,
# which ONNX Runtime runs when the library is not registered (register_if_found).
BLOCKSUM_OP_TYPE = "BlockSumMatMulAdd"

_PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE_LIB_DIR = _PACKAGE_DIR / "lib"  # setup.py copies the built libraries here in the wheel
BUILD_DIR_ENV_VAR = "EMRRG_BUILD_DIR"   # scripts/build_plugins.sh's build folder, when not build/plugins


class OpLibraryMissingError(RuntimeError):
    """The SelectiveScan op library is not built, not found, or cannot be loaded."""


def ort_has_cuda() -> bool:
    """True when the installed onnxruntime is onnxruntime-gpu (it has the CUDA execution provider)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def candidate_paths(cuda: bool | None = None) -> list[Path]:
    """Where find_op_library() looks, in order. With onnxruntime-gpu (`cuda`, detected when None) the
    library with the CUDA-EP kernel, libemrrg_ops_cuda.so, comes first in each place: it also holds the
    CPU-EP kernels, and with libemrrg_ops.so a CUDA session would copy every scan's tensors to the host."""
    names = ([CUDA_LIBRARY_NAME] if (ort_has_cuda() if cuda is None else cuda) else []) + [LIBRARY_NAME]
    paths = [PACKAGE_LIB_DIR / n for n in names]
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        p = Path(env).expanduser()
        return paths + ([p / n for n in names] if p.is_dir() else [p])
    build = build_tree()
    return paths + ([build / n for n in names] if build is not None else [])


def build_tree() -> Path | None:
    """The plugin build folder of the source checkout this package runs from, or None for an installed package.

    $EMRRG_BUILD_DIR when set (scripts/build_plugins.sh's own variable); else build/plugins of the checkout
    that emrrg.source_checkout() finds (an editable install or the sources on sys.path)."""
    from emrrg import source_checkout

    env = os.environ.get(BUILD_DIR_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    checkout = source_checkout()
    return checkout / "build" / "plugins" if checkout is not None else None


def find_op_library(cuda: bool | None = None) -> Path | None:
    """Path of the op library, or None when it is in none of candidate_paths()."""
    for p in candidate_paths(cuda):
        if p.is_file():
            return p
    return None


def _missing_message() -> str:
    searched = "\n".join(f"  - {p}" for p in candidate_paths())
    env = os.environ.get(ENV_VAR, "").strip()
    hint = (f"{ENV_VAR}={env} does not name an existing file; fix or unset it"
            if env else f"or point {ENV_VAR} at a built {LIBRARY_NAME}")
    return (f"The ONNX Runtime op library for {OP_DOMAIN}::{OP_TYPE} ({LIBRARY_NAME}) was not found. Searched:\n"
            f"{searched}\nBuild it from the repository root with:  {BUILD_COMMAND}\n(or install the platform wheel, "
            f"which ships it: pip wheel . in the repository; {hint}).")


def register(session_options, path: str | os.PathLike | None = None) -> Path:
    """Register the op library on an onnxruntime.SessionOptions; returns the library's path.

    Raises OpLibraryMissingError (saying how to build it) when the library is not found or does not load.
    """
    lib = Path(path) if path is not None else find_op_library()
    if lib is None or not lib.is_file():
        raise OpLibraryMissingError(_missing_message() if path is None else
                                    f"{lib} does not exist. Build it with:  {BUILD_COMMAND}")
    try:
        session_options.register_custom_ops_library(str(lib))
    except Exception as e:  # onnxruntime raises its own types (Fail, RuntimeException, ...)
        raise OpLibraryMissingError(
            f"{lib} exists but ONNX Runtime could not load it ({e}). Rebuild it with:  {BUILD_COMMAND}") from e
    return lib


def register_if_found(session_options) -> Path | None:
    """Register the op library when find_op_library() finds it; None (nothing registered) when it is absent.

    For graphs whose com.emrrg nodes all carry a standard-ONNX function body (the built decoder's
    BlockSumMatMulAdd): with the library the node runs its kernel, without it ONNX Runtime inlines the body.
    A library that exists but does not load still raises OpLibraryMissingError (rebuild it)."""
    lib = find_op_library()
    return register(session_options, lib) if lib is not None else None

