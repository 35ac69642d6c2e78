"""A faster differentiable SelectiveScan for training on CPU (same contract as `selective_scan_ref`).

Why: the reference (`emrrg.ops.selective_scan.selective_scan_ref`) is a Python loop over L whose
autograd graph slices one time step out of (b, D, L, N) tensors at every step. Backward of each
slice allocates and zero-fills a full (b, D, L, N) gradient, so its backward is O(L^2 · D · N)
memory traffic: seconds per layer for a small encoder. Training needs something better; inference
keeps the reference (or the mamba-ssm kernel, the ONNX op, ...).

How: split the scan into the parts that are elementwise in time and one linear recurrence

    a_t = exp(δ_t A)            x_t = δ_t B_t u_t          (vectorized over L, plain autograd)
    h_t = a_t ⊙ h_{t-1} + x_t                               (`LinearRecurrence`, below)
    y_t = C_t · h_t + D u_t,   y *= silu(z)                 (vectorized over L, plain autograd)

`LinearRecurrence` is an autograd Function with a hand-written backward. With g_t = ∂ℓ/∂h_t from
the output side, the gradient flowing back through the recurrence is itself a reverse linear
recurrence, and everything else is elementwise:

    ĝ_t = g_t + a_{t+1} ⊙ ĝ_{t+1}          (reverse loop, ĝ_L = g_L)
    ∂ℓ/∂x_t = ĝ_t,    ∂ℓ/∂a_t = ĝ_t ⊙ h_{t-1}   (h_0 = 0)

Both loops run over contiguous (b, D, N) slices of time-major tensors: two elementwise ops per
step, no per-step allocation of full-size tensors. The whole state history (L, b, D, N) is kept for
backward, the same memory as the reference's forward.

Semantics are exactly `selective_scan_ref`'s (f32 accumulation, grouped B/C, optional D, z,
delta_bias, softplus); tests/model/test_train.py checks values and gradients against it. Select
it per mixer with `mixer.scan_fn = selective_scan_fast` (emrrg-train does this by default with
`--scan fast`); the default inference path is unchanged.
"""
from __future__ import annotations

import torch

from emrrg.ops.scan_contract import check_shapes, epilogue, prologue


class LinearRecurrence(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + x_t over the leading (time) axis, h_0 = 0. a, x: (L, ...) -> h: (L, ...)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a, x = a.contiguous(), x.contiguous()
        h = torch.empty_like(x)
        h[0] = x[0]
        for t in range(1, x.shape[0]):
            torch.addcmul(x[t], a[t], h[t - 1], out=h[t])
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, h = ctx.saved_tensors
        gh = g.contiguous().clone()                      # ĝ, built in place from the end
        for t in range(gh.shape[0] - 2, -1, -1):
            gh[t].addcmul_(a[t + 1], gh[t + 1])
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.zeros_like(a)
            grad_a[1:] = gh[1:] * h[:-1]                 # a_0 multiplies h_{-1} = 0
        return grad_a, gh if ctx.needs_input_grad[1] else None


def linear_recurrence(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return LinearRecurrence.apply(a, x)


def selective_scan_fast(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = True):
    """Drop-in for `selective_scan_ref` (same arguments, shapes and f32 accumulation), fast to differentiate."""
    b, d, L, n, g = check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dg = d // g
    dtype_in = u.dtype
    u, delta = prologue(u, delta, delta_bias, delta_softplus)
    # Time-major layouts with the groups split out, so B/C broadcast over their D/G channels
    # without a repeat_interleave copy.
    dt = delta.permute(2, 0, 1).reshape(L, b, g, dg, 1)                  # (L, b, G, D/G, 1)
    ut = u.permute(2, 0, 1).reshape(L, b, g, dg, 1)                      # (L, b, G, D/G, 1)
    Bt = B.float().permute(3, 0, 1, 2).unsqueeze(3)                      # (L, b, G, 1, N)
    Ct = C.float().permute(3, 0, 1, 2).unsqueeze(3)                      # (L, b, G, 1, N)
    Ag = A.float().view(1, 1, g, dg, n)                                  # (1, 1, G, D/G, N)
    a = torch.exp(dt * Ag)                                               # (L, b, G, D/G, N)
    x = dt * Bt * ut                                                     # (L, b, G, D/G, N)
    h = linear_recurrence(a, x)                                          # (L, b, G, D/G, N)
    y = (h * Ct).sum(-1).reshape(L, b, d).permute(1, 2, 0)               # (b, D, L)
    return epilogue(y, u, D, z, dtype_in)


__all__ = ["LinearRecurrence", "linear_recurrence", "selective_scan_fast"]
