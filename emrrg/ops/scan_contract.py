"""The SelectiveScan contract, and the parts of it every PyTorch implementation shares.

Semantics are exactly mamba-ssm's `selective_scan_ref` with real A and grouped B/C (Gu & Dao, "Mamba",
arXiv 2312.00752). The same contract holds for the ONNX node `com.emrrg::SelectiveScan`, the CPU op, the
CUDA kernel and the TensorRT plugin (plugins/selective_scan/selectiveScanCore.h holds its C++ side):

    delta = softplus(delta + delta_bias)                 (if delta_softplus)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = C_t . h_t + D * u_t
    y    *= silu(z)                                      (if z is given)

Shapes: u, delta, z (b, D, L); A (D, N); B, C (b, G, N, L), channel d uses group d // (D / G);
D, delta_bias (D,). Accumulation is f32; the output has u's dtype.

The recurrence is where the implementations differ (a Python loop in `selective_scan_ref`, an autograd
Function in `scan_fast`, an ONNX `Scan` in export/onnx_ops.py). Everything around it is here, once:
`check_shapes`, `prologue` (f32 casts, delta_bias, softplus) and `epilogue` (the D skip, silu(z), the cast
back to u's dtype).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_shapes(u, delta, A, B, C, D, z, delta_bias) -> tuple[int, int, int, int, int]:
    """(b, D, L, N, G) of a consistent call; ValueError naming the first input that does not fit."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, D, L), got {tuple(u.shape)}")
    b, d, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta {tuple(delta.shape)} must match u {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (D={d}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    if B.dim() != 4 or B.shape[0] != b or B.shape[2] != n or B.shape[3] != L:
        raise ValueError(f"B must be (batch={b}, G, N={n}, L={L}), got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C {tuple(C.shape)} must match B {tuple(B.shape)}")
    g = B.shape[1]
    if d % g:
        raise ValueError(f"D={d} is not a multiple of the group count G={g}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"{name} must be ({d},), got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z {tuple(z.shape)} must match u {tuple(u.shape)}")
    return b, d, L, n, g


def prologue(u, delta, delta_bias, delta_softplus: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, dt) in f32: dt = softplus(delta + delta_bias) when delta_softplus, else delta + delta_bias."""
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta


def epilogue(y, u, D, z, dtype: torch.dtype) -> torch.Tensor:
    """y (b, D, L) f32 from the recurrence -> (y + D * u) * silu(z), in `dtype` (the caller's u dtype)."""
    if D is not None:
        y = y + u * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)
