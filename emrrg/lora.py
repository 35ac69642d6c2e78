"""Encoder adapters: Partial LoRA (the paper's) and the upstream release's `lora_X`.

Partial LoRA (EMRRG, arXiv 2510.16776, after MambaPEFT arXiv 2411.03855) is a low-rank update on the
x half of the mixer's `in_proj` only:

    x = in_proj(h)[:D] + s * up(down(h)),   s = alpha / r,   up initialised to zero

so merging adds `s * up @ down` to `in_proj.weight[:D]`. The release's `lora_X` adapter instead adds
`up(down(norm1(h)))` to the first D/2 channels of the mixer output; it has no linear place to fold
into (it bypasses out_proj), so it stays a module at export.

Adapters save and load as peft-style folders (`adapter_config.json` + `adapter_model.safetensors`,
keys `base_model.model.<module path>.lora_A.weight` / `lora_B.weight`), see `save_encoder_adapter`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn


class PartialLoRA(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Linear(d_in, rank, bias=False)   # down
        self.lora_B = nn.Linear(rank, d_out, bias=False)  # up
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)                 # the adapter starts as the identity update

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(h)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (d_out, d_in)


class LoraXAdapter(nn.Module):
    """Upstream `lora_X`: adapter_down [r, D], adapter_up [D/2, r], added to the first D/2 output channels."""

    def __init__(self, d_model: int, rank: int):
        super().__init__()
        self.adapter_down = nn.Linear(d_model, rank, bias=False)
        self.adapter_up = nn.Linear(rank, d_model // 2, bias=False)
        nn.init.zeros_(self.adapter_up.weight)

    def forward(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        add = self.adapter_up(self.adapter_down(h))                     # (b, L, D/2)
        half = add.shape[-1]
        return torch.cat([out[..., :half] + add, out[..., half:]], dim=-1)


@torch.no_grad()
def merge_partial_lora(module: nn.Module) -> int:
    """Fold every PartialLoRA into its mixer's in_proj (x half) and remove it. Returns the count."""
    count = 0
    for m in module.modules():
        lora = getattr(m, "in_proj_lora", None)
        if isinstance(lora, PartialLoRA):
            d = lora.lora_B.weight.shape[0]
            m.in_proj.weight[:d] += lora.delta_weight().to(m.in_proj.weight.dtype)
            m.in_proj_lora = None
            count += 1
    return count


class AdapterMismatchError(ValueError):
    """An adapter folder that does not fit the model it is loaded into."""


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def encoder_adapter_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """peft-style keys for every encoder adapter parameter."""
    return {f"base_model.model.{k}": v.detach().contiguous() for k, v in encoder.state_dict().items()
            if ".in_proj_lora." in k or ".lora_X." in k}


def save_encoder_adapter(encoder: nn.Module, out_dir: str | Path, rank: int, alpha: float, x_rank: int) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "LORA",
        "emrrg_adapter": "partial_lora",   # x half of in_proj only (not expressible as a stock peft target)
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": ["in_proj"],
        "partial": "x_half",
        "lora_x_rank": x_rank,
        "bias": "none",
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
    save_file(encoder_adapter_state(encoder), str(out / ADAPTER_WEIGHTS))
    return out


def load_encoder_adapter(encoder: nn.Module, adapter_dir: str | Path) -> dict:
    """Load a folder written by `save_encoder_adapter` into an encoder built with matching ranks."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    want = (getattr(encoder.cfg, "lora_rank", 0), getattr(encoder.cfg, "lora_x_rank", 0))
    if (cfg.get("r", 0), cfg.get("lora_x_rank", 0)) != want:
        raise AdapterMismatchError(f"adapter {d} has ranks (partial LoRA {cfg.get('r')}, lora_X {cfg.get('lora_x_rank')}) "
                                   f"but the encoder was built with {want}")
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(d / ADAPTER_WEIGHTS)).items()}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    adapter_missing = [k for k in missing if ".in_proj_lora." in k or ".lora_X." in k]
    if unexpected or adapter_missing:
        raise AdapterMismatchError(f"adapter {d} does not fit the encoder: unexpected {unexpected[:5]}, missing {adapter_missing[:5]}")
    return cfg
