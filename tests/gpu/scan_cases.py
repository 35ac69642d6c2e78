"""Shared by the GPU tests and benchmarks/scan_gpu.py: the SelectiveScan cases of the CPU tests, input
generation, references, and the ctypes loader for libemrrg_scan_shim.so (the CUDA kernel's C entry point).

CASES repeats every shape of tests/plugins/test_scan_cpu_op.py (test_shapes, test_optional_inputs,
test_large_delta, test_state_sizes, test_f16_inputs, test_base_layer_shape), so the kernel is checked on
the same grid as the CPU op, for each dtype (f32, f16, bf16). Needs torch; nothing here runs at import
beyond building the case list.
"""
from __future__ import annotations

import ctypes
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHIM_NAME = "libemrrg_scan_shim.so"
SHIM_ENV_VAR = "EMRRG_SCAN_SHIM"
SMALL_DIM = 88  # as the CPU tests: 22 channels per group with G = 4 (a padded block of the kernel's 128)
DTYPE_CODES = {"f32": 0, "f16": 1, "bf16": 2}  # emrrg::scan::ScanDataType


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    dim: int
    groups: int
    dstate: int
    seqlen: int
    has_d: bool = True
    has_z: bool = True
    has_bias: bool = True
    softplus: bool = True
    large_delta: bool = False
    seed: int = 0


def all_cases() -> list[Case]:
    cases = []
    for seqlen, groups, batch, sp in itertools.product([1, 7, 197], [1, 4], [1, 2], [0, 1]):   # test_shapes
        cases.append(Case(f"L{seqlen}-G{groups}-b{batch}-sp{sp}", batch, SMALL_DIM, groups, 16, seqlen, softplus=bool(sp),
                          seed=seqlen * 100 + groups * 10 + batch))
    for (d, z, bias), sp in itertools.product(itertools.product([False, True], repeat=3), [0, 1]):  # optional inputs
        cases.append(Case(f"opt-D{int(d)}z{int(z)}b{int(bias)}-sp{sp}", 2, SMALL_DIM, 4, 16, 37, d, z, bias, bool(sp), seed=7))
    for sp in (0, 1):                                                                               # test_large_delta
        cases.append(Case(f"large-delta-sp{sp}", 2, SMALL_DIM, 4, 16, 197, softplus=bool(sp), large_delta=True, seed=11))
    for n in (1, 5, 64):                                                                            # test_state_sizes
        cases.append(Case(f"N{n}", 1, SMALL_DIM, 4, n, 50, seed=13))
    for seqlen, z in itertools.product([7, 197], [False, True]):                                    # test_f16_inputs
        cases.append(Case(f"f16grid-L{seqlen}-z{int(z)}", 2, SMALL_DIM, 4, 16, seqlen, has_z=z, seed=17))
    cases.append(Case("base-layer", 1, 4 * 768, 4, 16, 197, seed=31))                               # test_base_layer_shape
    return cases


def make_inputs(c: Case) -> dict[str, np.ndarray]:
    """f32 host arrays, distributed as in tests/plugins/test_scan_cpu_op.py::make_inputs."""
    rng = np.random.default_rng(c.seed)
    b, d, g, n, L = c.batch, c.dim, c.groups, c.dstate, c.seqlen
    if c.large_delta:
        delta = 20.0 + rng.standard_normal((b, d, L))
    elif c.softplus:
        delta = rng.standard_normal((b, d, L)) * 0.5 - 1.0
    else:
        delta = rng.uniform(0.01, 1.0, (b, d, L))
    f = {"u": rng.standard_normal((b, d, L)), "delta": delta,
         "A": -np.exp(rng.uniform(np.log(0.5), np.log(16.0), (d, n))),
         "B": rng.standard_normal((b, g, n, L)), "C": rng.standard_normal((b, g, n, L))}
    if c.has_d:
        f["D"] = rng.standard_normal(d)
    if c.has_z:
        f["z"] = rng.standard_normal((b, d, L))
    if c.has_bias:
        f["delta_bias"] = rng.standard_normal(d) * 0.5 if c.softplus else rng.uniform(0.0, 0.1, d)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in f.items()}


ACTIVATIONS = ("u", "delta", "B", "C", "z")  # the inputs in the activation dtype; A, D, delta_bias stay f32


def to_device(feeds: dict, dtype: str, device="cuda") -> dict:
    import torch
    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return {k: torch.from_numpy(v).to(device=device, dtype=tdt if k in ACTIVATIONS else torch.float32).contiguous()
            for k, v in feeds.items()}


def scan_torch64(t: dict, softplus: bool):
    """float64 loop on the device from the (already rounded) inputs: the truth every path approximates."""
    import torch
    u, delta, A, B, C = (t[k].double() for k in ("u", "delta", "A", "B", "C"))
    b, d, L = u.shape
    g = B.shape[1]
    if "delta_bias" in t:
        delta = delta + t["delta_bias"].double()[None, :, None]
    if softplus:
        delta = torch.where(delta > 20.0, delta, torch.log1p(torch.exp(torch.clamp(delta, max=20.0))))
    Bd = B.repeat_interleave(d // g, dim=1)
    Cd = C.repeat_interleave(d // g, dim=1)
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64, device=u.device)
    ys = []
    for s in range(L):
        dt = delta[:, :, s, None]
        h = torch.exp(dt * A[None]) * h + dt * Bd[..., s] * u[:, :, s, None]
        ys.append((h * Cd[..., s]).sum(-1))
    y = torch.stack(ys, dim=2)
    if "D" in t:
        y = y + u * t["D"].double()[None, :, None]
    if "z" in t:
        z = t["z"].double()
        y = y * (z / (1.0 + torch.exp(-z)))
    return y


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
