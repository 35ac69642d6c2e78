"""GPU-side helpers shared by the GPU tests and benchmarks/scan_gpu.py: moving the cases of
tests/scan_reference.py (the cases, the float64 truth and the tolerances of every scan test) onto the device,
the project's PyTorch reference on device tensors, and the ctypes loader for libemrrg_scan_shim.so (the CUDA
kernel's C entry point). Needs torch only inside the functions.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from tests.scan_reference import ACTIVATIONS

REPO = Path(__file__).resolve().parents[2]
SHIM_NAME = "libemrrg_scan_shim.so"
SHIM_ENV_VAR = "EMRRG_SCAN_SHIM"
DTYPE_CODES = {"f32": 0, "f16": 1, "bf16": 2}  # emrrg::scan::ScanDataType


def to_device(feeds: dict, dtype: str, device="cuda") -> dict:
    import torch
    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return {k: torch.from_numpy(v).to(device=device, dtype=tdt if k in ACTIVATIONS else torch.float32).contiguous()
            for k, v in feeds.items()}


def scan_ref(t: dict, softplus: bool, upcast: bool = False):
    """The project's PyTorch reference (f32 arithmetic; output in the inputs' dtype, or f32 when upcast)."""
    from emrrg.ops.selective_scan import selective_scan_ref
    if upcast:
        t = {k: v.float() for k, v in t.items()}
    return selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"), t.get("delta_bias"),
                              delta_softplus=softplus)


def shim_candidates() -> list[Path]:
    env = os.environ.get(SHIM_ENV_VAR, "").strip()
    if env:
        p = Path(env).expanduser()
        return [p / SHIM_NAME if p.is_dir() else p]
    build = os.environ.get("EMRRG_BUILD_DIR", "").strip()
    return ([Path(build) / SHIM_NAME] if build else []) + [REPO / "build" / "plugins" / SHIM_NAME,
                                                            REPO / "build" / "gpu-check" / "plugins" / SHIM_NAME]


class ScanShim:
    """ctypes binding of emrrg_selective_scan_cuda (plugins/selective_scan/selectiveScanCApi.cpp)."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        i, vp = ctypes.c_int, ctypes.c_void_p
        self.lib.emrrg_scan_capi_version.restype = i
        f = self.lib.emrrg_selective_scan_cuda
        f.argtypes = [i] * 7 + [vp] * 10
        f.restype = i
        self.lib.emrrg_cuda_error_string.argtypes = [i]
        self.lib.emrrg_cuda_error_string.restype = ctypes.c_char_p
        if self.lib.emrrg_scan_capi_version() != 1:
            raise RuntimeError(f"{path}: C API version {self.lib.emrrg_scan_capi_version()}, expected 1 (rebuild it)")

    def launch(self, t: dict, softplus: bool, y, dtype: str, stream=None, dims=None) -> int:
        """Enqueue on `stream` (a torch.cuda.Stream, default: the current one); returns the cudaError_t code."""
        import torch
        b, d, L = t["u"].shape
        g, n = t["B"].shape[1], t["A"].shape[1]
        if dims is not None:
            b, d, L, n, g = dims
        s = (stream or torch.cuda.current_stream()).cuda_stream
        ptr = lambda k: ctypes.c_void_p(t[k].data_ptr()) if k in t else None  # noqa: E731
        return self.lib.emrrg_selective_scan_cuda(b, d, L, n, g, int(bool(softplus)), DTYPE_CODES[dtype], ptr("u"),
                                                  ptr("delta"), ptr("A"), ptr("B"), ptr("C"), ptr("D"), ptr("z"),
                                                  ptr("delta_bias"), ctypes.c_void_p(y.data_ptr()), ctypes.c_void_p(s))

    def run(self, t: dict, softplus: bool, dtype: str):
        import torch
        y = torch.empty_like(t["u"])
        code = self.launch(t, softplus, y, dtype)
        if code != 0:
            raise RuntimeError(f"emrrg_selective_scan_cuda: {self.error(code)} ({code})")
        return y

    def error(self, code: int) -> str:
        return self.lib.emrrg_cuda_error_string(code).decode()


def load_shim() -> ScanShim | None:
    p = next((c for c in shim_candidates() if c.is_file()), None)
    return ScanShim(p) if p is not None else None
