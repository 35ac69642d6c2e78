"""The decoder's input embedding table as the bundle ships it: float32, or 8-bit in blocks (numpy only).

A 4-bit bundle stores the table as `embed_tokens.npy` int8 (V, H) plus `embed_scales.npy` float16
(V, H / block): row r, block b is q[r, b*block:(b+1)*block] * scale[r, b], symmetric, scale = amax / 127.
That is GGUF's Q8_0 layout (block 32, f16 scale, int8), so a table that came from a Q8_0 GGUF (SmolLM2's
does) is re-encoded exactly; any other table is off by at most half a step, scale / 2, per element.
It is a quarter of the f32 table, and the rows are dequantized only when looked up (a few per token).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from emrrg.runtime.contract import EMBED_FP32, EMBED_Q8, BundleError

Q8_BLOCK = 32
# The round trip's error bound per element, relative to its block's amax: half a step (amax / 254) plus
# the clip that an f16-rounded-down scale can cause (at most 127 * amax/127 * 2^-11).
Q8_REL_ERROR_BOUND = 0.5 / 127 + 2 ** -11


def quantize_q8_blocks(w: np.ndarray, block: int = Q8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(V, H) float -> (int8 (V, H), float16 scales (V, H / block)); H must be a multiple of block."""
    w = np.asarray(w, np.float32)
    v, h = w.shape
    if h % block:
        raise ValueError(f"hidden size {h} is not a multiple of the block size {block}")
    wb = w.reshape(v, h // block, block)
    scale = (np.abs(wb).max(-1) / 127.0).astype(np.float16)                # the f16 step actually stored
    s32 = scale.astype(np.float32)[..., None]
    q = np.where(s32 > 0, np.rint(wb / np.where(s32 > 0, s32, 1.0)), 0.0)
    return np.clip(q, -127, 127).astype(np.int8).reshape(v, h), scale


class Q8BlockEmbedding:
    """Row lookup over an int8 table with per-block f16 scales; `table[ids]` returns float32 rows."""

    def __init__(self, q: np.ndarray, scales: np.ndarray):
        if q.ndim != 2 or scales.ndim != 2 or q.shape[0] != scales.shape[0] or q.shape[1] % scales.shape[1]:
            raise ValueError(f"embedding table {q.shape} and scales {scales.shape} do not fit together")
        self.q, self.scales = q, scales
        self.block = q.shape[1] // scales.shape[1]
        self.shape = q.shape
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids) -> np.ndarray:
        q = np.asarray(self.q[ids], np.float32)
        s = np.asarray(self.scales[ids], np.float32)
        lead = q.shape[:-1]
        out = q.reshape(*lead, s.shape[-1], self.block) * s[..., None]
        return out.reshape(*lead, self.shape[1])

    def dequantize(self) -> np.ndarray:
        return self[np.arange(self.shape[0])]


def load_embedding(bundle: Path, art):
    """The embed_tokens artifact (a checked contract.Artifact, or its manifest object): a memory-mapped f32
    array or a Q8BlockEmbedding."""
    get = art.get if isinstance(art, Mapping) else (lambda key, default=None: getattr(art, key, default))
    table = np.load(Path(bundle) / get("path"), mmap_mode="r")
    precision = get("precision", EMBED_FP32)
    if precision == EMBED_FP32:
        return table
    if precision != EMBED_Q8 or not get("scales"):
        raise BundleError(f"{bundle}: embed_tokens has precision {precision!r}, which this runtime does "
                          "not know; update emrrg or re-export the bundle")
    return Q8BlockEmbedding(table, np.load(Path(bundle) / get("scales"), mmap_mode="r"))


__all__ = ["Q8_BLOCK", "Q8_REL_ERROR_BOUND", "Q8BlockEmbedding", "load_embedding", "quantize_q8_blocks"]
