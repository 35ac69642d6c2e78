"""SelectiveScan: the reference recurrence and a dispatcher to mamba-ssm's CUDA kernel.

The contract (semantics, shapes, dtypes) and the parts shared by every PyTorch implementation are in
`emrrg.ops.scan_contract`. `selective_scan` takes mamba-ssm's fused kernel when it imports and the tensors
live on CUDA; everything else (every CPU machine) runs `selective_scan_ref`.
"""
from __future__ import annotations

import torch

from emrrg.ops.scan_contract import check_shapes, epilogue, prologue

try:  # optional GPU fast path; a CPU machine never needs it
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except Exception:  # ImportError, or its CUDA extension failing to load
    _mamba_selective_scan_fn = None


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True):
    """f32 reference. A plain loop over L; readable first, exportable second (see emrrg.export)."""
    b, d, L, n, g = check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    u, delta = prologue(u, delta, delta_bias, delta_softplus)
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
    return epilogue(y, u, D, z, dtype_in)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True):
    """Dispatch: mamba-ssm's CUDA kernel on CUDA tensors when installed, else the reference."""
    if _mamba_selective_scan_fn is not None and u.is_cuda:
        return _mamba_selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

