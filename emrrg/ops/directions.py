"""The ARM mixer's four-direction layout, in one place: the mixer's forward and the encoder export both run it.

The four directions read the token stream in four orders, each with its own conv1d / x_proj / dt_proj /
A_log / D under the suffixes of DIRECTIONS:

    (a) token order          (b) token order, flipped
    (c) column order         (d) column order, flipped

Column order takes the middle cls token out at L//2, transposes the square patch grid and puts it back.
All four scans are ONE SelectiveScan call with G=4 groups over 4·D channels, direction-major (channel
k·D + c is channel c of direction k; the contract in emrrg/ops/scan_contract.py). The reorders are row
Gathers outside the op, and the per-direction projections run batched:

    in_proj (b, L, 2D) --Gather 4L rows--> (b, 4, L, 2D) --transpose, split--> x4, z4 (b, 4, D, L)
    x4 -> (b, 4D, L) -> one depthwise conv (4D channels) -> silu = u
    x_proj (4, r+2N, D) @ u (b, 4, D, L) -> dt, B, C (b, 4, ., L);  dt_proj (4, D, r) @ dt -> delta (b, 4D, L)
    scan y (b, 4D, L) -> (b, 4L, D) rows l*4+k --Gather inverse rows--> (b, L, 4, D) -> sum / 4 -> out_proj

Exported, this is one Gather before the scan and one after, one Conv, and two batched MatMuls per layer
(the per-direction form gave ~60 small nodes, with 4-byte strided inverse Gathers ~10% of ORT CPU time).
The per-direction weights are stacked by `stacked_weights`; the export freezes them as initializers
(emrrg.export.encoder_onnx.fused_mixer_layout) so that the quantizer sees constant weights.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIRECTIONS = ("", "_b", "_c", "_c_b")
WEIGHTS = ("conv_weight", "conv_bias", "x_proj", "dt_proj")  # what stacked_weights returns, by name


def column_order(num_tokens: int) -> torch.Tensor:
    """Index that reads a (cls-in-the-middle) token sequence in column order. An involution."""
    mid = num_tokens // 2
    grid = math.isqrt(num_tokens - 1)
    if grid * grid != num_tokens - 1:
        raise ValueError(f"{num_tokens} tokens are not a square patch grid plus one cls token")
    patches = torch.cat([torch.arange(mid), torch.arange(mid + 1, num_tokens)])  # (L-1,) without cls
    cols = patches.view(grid, grid).t().reshape(-1)                              # transpose the grid
    return torch.cat([cols[:mid], torch.tensor([mid]), cols[mid:]])


def direction_orders(num_tokens: int) -> torch.Tensor:
    """(4, L) gather indices for the directions (a), (b), (c), (d)."""
    tok = torch.arange(num_tokens)
    col = column_order(num_tokens)
    return torch.stack([tok, tok.flip(0), col, col.flip(0)])


def inverse_orders(orders: torch.Tensor) -> torch.Tensor:
    return torch.argsort(orders, dim=1)


def gather_rows(num_tokens: int) -> torch.Tensor:
    """(4L,) rows of the (b, L, .) stream that make the (b, 4, L, .) direction-major stack."""
    return direction_orders(num_tokens).reshape(-1)


def inverse_rows(num_tokens: int) -> torch.Tensor:
    """(4L,) rows of the (b, 4L, D) scan output, row l*4 + k, that undo each direction's order."""
    inv = inverse_orders(direction_orders(num_tokens))                          # (4, L)
    return (inv.t() * 4 + torch.arange(4)[None, :]).reshape(-1)                 # (L*4,): row of (l, k)


def stacked_weights(mixer) -> dict[str, torch.Tensor]:
    """The per-direction projection weights, stacked in DIRECTIONS order (differentiable)."""
    return dict(
        conv_weight=torch.cat([getattr(mixer, f"conv1d{s}").weight for s in DIRECTIONS]),  # (4D, 1, K)
        conv_bias=torch.cat([getattr(mixer, f"conv1d{s}").bias for s in DIRECTIONS]),      # (4D,)
        x_proj=torch.stack([getattr(mixer, f"x_proj{s}").weight for s in DIRECTIONS]),     # (4, r + 2N, D)
        dt_proj=torch.stack([getattr(mixer, f"dt_proj{s}").weight for s in DIRECTIONS]),   # (4, D, r)
    )


def scan_inputs(mixer, hs: torch.Tensor, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Everything up to the fused scan: the G=4 stacked inputs of one SelectiveScan call.

    Channel-major from the gather on, so the projections land in the scan's layout without transposes.
    `w` is stacked_weights(mixer) or the export's frozen copy of it.
    """
    b, L, _ = hs.shape
    cfg = mixer.cfg
    d, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
    xz = mixer.in_proj(hs)                                                  # (b, L, 2D)
    if mixer.in_proj_lora is not None:
        x, z = xz.chunk(2, dim=-1)
        xz = torch.cat([x + mixer.in_proj_lora(hs), z], dim=-1)
    g = xz.index_select(1, mixer.gather_rows).view(b, 4, L, 2 * d)         # (b, 4, L, 2D), direction-major
    x4, z4 = g.transpose(2, 3).split(d, dim=2)                              # (b, 4, D, L) each
    u = F.conv1d(x4.reshape(b, 4 * d, L), w["conv_weight"], w["conv_bias"], padding=cfg.d_conv - 1, groups=4 * d)
    u = F.silu(u[..., :L])                                                  # (b, 4D, L) causal depthwise conv
    dbl = torch.matmul(w["x_proj"], u.view(b, 4, d, L))                    # (b, 4, r + 2N, L)
    dt, Bk, Ck = dbl.split([r, n, n], dim=2)                                # (b, 4, r|N|N, L)
    delta = torch.matmul(w["dt_proj"], dt)                                  # (b, 4, D, L); bias goes to the scan
    return dict(
        u=u,
        delta=delta.reshape(b, 4 * d, L),                                   # (b, 4D, L)
        A=-torch.exp(torch.cat([getattr(mixer, f"A{s}_log") for s in DIRECTIONS]).float()),  # (4D, N)
        B=Bk,                                                               # (b, 4, N, L)
        C=Ck,                                                               # (b, 4, N, L)
        D=torch.cat([getattr(mixer, f"D{s}") for s in DIRECTIONS]).float(),  # (4D,)
        z=z4.reshape(b, 4 * d, L),                                          # (b, 4D, L)
        delta_bias=torch.cat([getattr(mixer, f"dt_proj{s}").bias for s in DIRECTIONS]).float(),  # (4D,)
    )


def combine(mixer, y: torch.Tensor) -> torch.Tensor:
    """(b, 4D, L) scan output -> (b, L, D): undo each order (one row Gather) and average the directions."""
    b, _, L = y.shape
    d = mixer.cfg.d_inner
    rows = y.view(b, 4, d, L).permute(0, 3, 1, 2).reshape(b, L * 4, d)     # (b, 4L, D): row l*4 + k
    return rows.index_select(1, mixer.inverse_rows).view(b, L, 4, d).sum(2) / 4  # (b, L, D)
