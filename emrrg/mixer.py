"""The four-direction Mamba mixer of MambaXray-VL / ARM (arXiv 2510.16776, after Vim/ARM).

One `in_proj` (D -> 2D, no bias) gives the x and z halves. Four directions, each with its own
conv1d / x_proj / dt_proj / A_log / D under the suffixes '', '_b', '_c', '_c_b', see the token stream
in four orders; emrrg/ops/directions.py owns that layout (the orders, the stacking, the one G=4
SelectiveScan call's inputs, the inverse), and the encoder export runs the same code.

    out = out_proj(((a + flip(b)) + untranspose(c + flip(d))) / 4)

Parameter names and shapes are the upstream ones so upstream weights load with strict=True.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from emrrg.config import EncoderConfig
from emrrg.lora import LoraXAdapter, PartialLoRA
from emrrg.ops import directions
from emrrg.ops.directions import DIRECTIONS
from emrrg.ops.selective_scan import selective_scan


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
        self.set_tokens(cfg.num_tokens)
        self.scan_fn = selective_scan  # swapped by the exporter for the ONNX custom op
        self.reset_parameters()

    def set_tokens(self, num_tokens: int) -> None:
        """The four scan orders for a sequence of num_tokens (a square grid + cls)."""
        dev = self.in_proj.weight.device
        self.register_buffer("gather_rows", directions.gather_rows(num_tokens).to(dev), persistent=False)    # (4L,)
        self.register_buffer("inverse_rows", directions.inverse_rows(num_tokens).to(dev), persistent=False)  # (4L,)

    def reset_parameters(self) -> None:
        """Mamba's init: S4D-real A, dt in [1e-3, 1e-1] through an inverse-softplus bias."""
        d, n = self.cfg.d_inner, self.cfg.d_state
        for s in DIRECTIONS:
            getattr(self, f"A{s}_log").data.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1))
            getattr(self, f"D{s}").data.fill_(1.0)
            dt = torch.exp(torch.rand(d) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            getattr(self, f"dt_proj{s}").bias.data.copy_(dt + torch.log(-torch.expm1(-dt)))

    def stacked_weights(self) -> dict[str, torch.Tensor]:
        """The four directions' conv / x_proj / dt_proj weights stacked (the export freezes them)."""
        return directions.stacked_weights(self)

    def scan_inputs(self, hs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything up to the fused scan: the G=4 stacked inputs of one SelectiveScan call."""
        return directions.scan_inputs(self, hs, self.stacked_weights())

    def combine(self, y: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
        """(b, 4D, L) scan output -> (b, L, D_model): undo each order, average, out_proj."""
        out = self.out_proj(directions.combine(self, y))                      # (b, L, D_model)
        if self.lora_X is not None:
            out = self.lora_X(hs, out)
        return out

    def forward(self, hs: torch.Tensor) -> torch.Tensor:
        a = self.scan_inputs(hs)
        y = self.scan_fn(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True)
        return self.combine(y, hs)
