"""MambaXray-VL vision encoder (ARM-style blocks), as used by EMRRG (arXiv 2510.16776).

    image (b, 3, 224, 224) -> 16x16 patches (b, 196, D) -> cls inserted at index 98 -> + pos_embed
    -> depth x [h + mixer(norm1 h); h + SwiGLU(norm2 h)] -> norm_f -> (b, 197, D)

Several views of one study are encoded separately and their token sequences averaged.
The state-dict keys are the upstream `visual_encoder.*` ones (README, "The model in PyTorch").
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from emrrg.config import EncoderConfig
from emrrg.mixer import ARMMixer


def stack_views(studies: Sequence[np.ndarray]) -> torch.Tensor:
    """Studies' (V_i, 3, S, S) views -> one (b, V, 3, S, S) batch for encode_study; a study with fewer views than
    the most repeats its last one."""
    views = max(p.shape[0] for p in studies)
    return torch.from_numpy(np.stack([np.concatenate([p] + [p[-1:]] * (views - p.shape[0])) for p in studies]))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (b, D, g, g) -> (b, g*g, D)


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x); w1, w2: D -> H with bias, w3: H -> D with bias."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden)
        self.w2 = nn.Linear(d, hidden)
        self.w3 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class ARMBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = ARMMixer(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.mixer(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class MambaXrayEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.d_model))
        self.layers = nn.ModuleList(ARMBlock(cfg) for _ in range(cfg.depth))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for name, m in self.named_modules():
            # dt_proj keeps Mamba's init (set in ARMMixer); adapters keep their own (up = 0).
            if isinstance(m, nn.Linear) and "lora" not in name and ".dt_proj" not in name:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> (b, L, D) tokens."""
        x = self.patch_embed(pixel_values)                                   # (b, 196, D)
        b, mid = x.shape[0], x.shape[1] // 2
        cls = self.cls_token.expand(b, -1, -1)                               # (b, 1, D)
        x = torch.cat([x[:, :mid], cls, x[:, mid:]], dim=1) + self.pos_embed  # (b, 197, D), cls at 98
        for layer in self.layers:
            x = layer(x)
        return self.norm_f(x)

    @torch.no_grad()
    def resize(self, img_size: int, patch_size: int) -> None:
        """Re-grid a trained encoder for another input size or patch size, keeping what it learned.

        The patch kernel is resampled to the new patch size (nearest up, area down) and scaled by (p / p')^2, so
        a patch of p' pixels at the new size answers as the patch of p pixels covering the same anatomy did
        (exactly so for a nearest-upsampled image and a whole-number ratio). When the token grid changes, the patch positions of
        pos_embed are resampled bicubically (the cls position, in the middle, is kept). The blocks do not depend
        on the grid. So 112 px / patch 16 -> 224 px / patch 32 keeps the 7 x 7 grid (and the LLM's 50 visual
        tokens) while each patch sees the image at twice the resolution.
        """
        cfg = self.cfg
        new = EncoderConfig(**{**cfg.__dict__, "img_size": img_size, "patch_size": patch_size})
        old_p, old_g, d = cfg.patch_size, cfg.grid, cfg.d_model
        conv = self.patch_embed.proj
        if patch_size != old_p:
            mode = "nearest" if patch_size > old_p else "area"
            w = F.interpolate(conv.weight, size=(patch_size, patch_size), mode=mode) * (old_p / patch_size) ** 2
            self.patch_embed.proj = nn.Conv2d(cfg.in_chans, d, kernel_size=patch_size, stride=patch_size).to(w)
            self.patch_embed.proj.weight.copy_(w)
            self.patch_embed.proj.bias.copy_(conv.bias)
        if new.grid != old_g:
            pos, mid = self.pos_embed.data, old_g * old_g // 2
            grid = torch.cat([pos[:, :mid], pos[:, mid + 1:]], dim=1).reshape(1, old_g, old_g, d).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(new.grid, new.grid), mode="bicubic", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(1, new.grid * new.grid, d)
            new_mid = new.grid * new.grid // 2
            self.pos_embed = nn.Parameter(torch.cat([grid[:, :new_mid], pos[:, mid:mid + 1], grid[:, new_mid:]], dim=1))
        cfg.img_size, cfg.patch_size = img_size, patch_size
        for layer in self.layers:                       # the scan orders depend on the grid
            layer.mixer.set_tokens(cfg.num_tokens)

    def encode_study(self, views: torch.Tensor) -> torch.Tensor:
        """(b, V, 3, H, W) views of each study -> (b, L, D), the average of the per-view tokens."""
        b, v = views.shape[:2]
        tokens = self(views.flatten(0, 1))                                   # (b*V, L, D)
        return tokens.view(b, v, *tokens.shape[1:]).mean(dim=1)

