"""The four-direction Mamba mixer of MambaXray-VL / ARM (arXiv 2510.16776, after Vim/ARM).

One `in_proj` (D -> 2D, no bias) gives the x and z halves. Four directions, each with its own
conv1d / x_proj / dt_proj / A_log / D under the suffixes '', '_b', '_c', '_c_b', see the
token stream in four orders:

    (a) token order          (b) token order, flipped
    (c) column order         (d) column order, flipped

Column order takes the middle cls token out at L//2, transposes the square patch grid and puts
the cls token back at L//2. All four scans run as ONE SelectiveScan call with G=4 groups over
4·D channels (the contract in emrrg/ops/scan_contract.py); the reorders are index Gathers outside the op.

    out = out_proj(((a + flip(b)) + untranspose(c + flip(d))) / 4)

Parameter names and shapes are the upstream ones so upstream weights load with strict=True.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EncoderConfig
from .lora import LoraXAdapter, PartialLoRA
from .ops.selective_scan import selective_scan

DIRECTIONS = ("", "_b", "_c", "_c_b")


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


class ARMMixer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        d, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        assert cfg.expand == 1, "ARM uses expand=1 (d_inner = D)"
        self.in_proj = nn.Linear(cfg.d_model, 2 * d, bias=False)
        self.out_proj = nn.Linear(d, cfg.d_model, bias=False)
        for s in DIRECTIONS:
            self.add_module(f"conv1d{s}", nn.Conv1d(d, d, cfg.d_conv, groups=d, padding=cfg.d_conv - 1, bias=True))
            self.add_module(f"x_proj{s}", nn.Linear(d, r + 2 * n, bias=False))
            self.add_module(f"dt_proj{s}", nn.Linear(r, d, bias=True))
            self.register_parameter(f"A{s}_log", nn.Parameter(torch.empty(d, n)))
            self.register_parameter(f"D{s}", nn.Parameter(torch.ones(d)))
        # Partial LoRA on the x half of in_proj (paper) and the release's lora_X adapter.
        self.in_proj_lora = PartialLoRA(cfg.d_model, d, cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank else None
        self.lora_X = LoraXAdapter(cfg.d_model, cfg.lora_x_rank) if cfg.lora_x_rank else None
        orders = direction_orders(cfg.num_tokens)
        self.register_buffer("orders", orders, persistent=False)                  # (4, L)
        self.register_buffer("inv_orders", inverse_orders(orders), persistent=False)
        self.scan_fn = selective_scan  # swapped by the exporter for the ONNX custom op
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mamba's init: S4D-real A, dt in [1e-3, 1e-1] through an inverse-softplus bias."""
        d, n = self.cfg.d_inner, self.cfg.d_state
        for s in DIRECTIONS:
            getattr(self, f"A{s}_log").data.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
            getattr(self, f"D{s}").data.fill_(1.0)
            dt = torch.exp(torch.rand(d) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            getattr(self, f"dt_proj{s}").bias.data.copy_(dt + torch.log(-torch.expm1(-dt)))

    def scan_inputs(self, hs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything up to the fused scan: the G=4 stacked inputs of one SelectiveScan call."""
        b, L, _ = hs.shape
        n, r = self.cfg.d_state, self.cfg.dt_rank
        x, z = self.in_proj(hs).chunk(2, dim=-1)                              # (b, L, D) each
        if self.in_proj_lora is not None:
            x = x + self.in_proj_lora(hs)
        us, dts, Bs, Cs, zs = [], [], [], [], []
        for k, s in enumerate(DIRECTIONS):
            order = self.orders[k]
            xk = x.index_select(1, order).transpose(1, 2)                     # (b, D, L)
            zk = z.index_select(1, order).transpose(1, 2)                     # (b, D, L)
            xk = F.silu(getattr(self, f"conv1d{s}")(xk)[..., :L])             # causal depthwise conv
            dbl = getattr(self, f"x_proj{s}")(xk.transpose(1, 2))             # (b, L, r + 2N)
            dt, Bk, Ck = dbl.split([r, n, n], dim=-1)
            dt = F.linear(dt, getattr(self, f"dt_proj{s}").weight)            # (b, L, D); bias goes to the scan
            us.append(xk)
            dts.append(dt.transpose(1, 2))
            Bs.append(Bk.transpose(1, 2))                                     # (b, N, L)
            Cs.append(Ck.transpose(1, 2))
            zs.append(zk)
        return dict(
            u=torch.cat(us, 1),                                               # (b, 4D, L)
            delta=torch.cat(dts, 1),                                          # (b, 4D, L)
            A=-torch.exp(torch.cat([getattr(self, f"A{s}_log") for s in DIRECTIONS]).float()),  # (4D, N)
            B=torch.stack(Bs, 1),                                             # (b, 4, N, L)
            C=torch.stack(Cs, 1),                                             # (b, 4, N, L)
            D=torch.cat([getattr(self, f"D{s}") for s in DIRECTIONS]).float(),  # (4D,)
            z=torch.cat(zs, 1),                                               # (b, 4D, L)
            delta_bias=torch.cat([getattr(self, f"dt_proj{s}").bias for s in DIRECTIONS]).float(),  # (4D,)
        )

    def combine(self, y: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
        """(b, 4D, L) scan output -> (b, L, D_model): undo each order, average, out_proj."""
        b, _, L = y.shape
        d = self.cfg.d_inner
        ys = y.view(b, 4, d, L)
        out = sum(ys[:, k].index_select(2, self.inv_orders[k]) for k in range(4)) / 4  # (b, D, L)
        out = self.out_proj(out.transpose(1, 2))                              # (b, L, D)
        if self.lora_X is not None:
            out = self.lora_X(hs, out)
        return out

    def forward(self, hs: torch.Tensor) -> torch.Tensor:
        a = self.scan_inputs(hs)
        y = self.scan_fn(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True)
        return self.combine(y, hs)
