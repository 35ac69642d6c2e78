"""SelectiveScan: the reference recurrence and a dispatcher to mamba-ssm's CUDA kernel.

Semantics are exactly mamba-ssm's `selective_scan_ref` with real A and grouped B/C
(Gu & Dao, "Mamba", arXiv 2312.00752), which is also the contract of the ONNX node
`com.emrrg::SelectiveScan`, the CPU op, the CUDA kernel and the TensorRT plugin
(see ARCHITECTURE.md, "The SelectiveScan contract"):

    delta = softplus(delta + delta_bias)                 (if delta_softplus)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = C_t . h_t + D * u_t
    y    *= silu(z)                                      (if z is given)

Shapes: u, delta, z (b, D, L); A (D, N); B, C (b, G, N, L), channel d uses group d // (D / G);
D, delta_bias (D,). Accumulation is f32; the output has u's dtype.

`selective_scan` takes mamba-ssm's fused kernel when it imports and the tensors live on CUDA;
everything else (every CPU machine) runs `selective_scan_ref`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional GPU fast path; a CPU machine never needs it
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except Exception:  # ImportError, or its CUDA extension failing to load
    _mamba_selective_scan_fn = None


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> tuple[int, int, int, int, int]:
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


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True):
    """f32 reference. A plain loop over L; readable first, exportable second (see emrrg.export)."""
    b, d, L, n, g = _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.float()
    # Expand the G groups to the D channels: (b, G, N, L) -> (b, D, N, L)
    B = B.float().repeat_interleave(d // g, dim=1)
    C = C.float().repeat_interleave(d // g, dim=1)
    deltaA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])              # (b, D, L, N)
    deltaB_u = delta.unsqueeze(-1) * B.transpose(2, 3) * u.unsqueeze(-1)  # (b, D, L, N)
    x = u.new_zeros((b, d, n))                                            # (b, D, N)
    ys = []
    for t in range(L):
        x = deltaA[:, :, t] * x + deltaB_u[:, :, t]
        ys.append(torch.einsum("bdn,bdn->bd", x, C[:, :, :, t]))
    y = torch.stack(ys, dim=2)                                            # (b, D, L)
    if D is not None:
        y = y + u * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True):
    """Dispatch: mamba-ssm's CUDA kernel on CUDA tensors when installed, else the reference."""
    if _mamba_selective_scan_fn is not None and u.is_cuda:
        return _mamba_selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def has_fast_path() -> bool:
    return _mamba_selective_scan_fn is not None
