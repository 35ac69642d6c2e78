"""4-bit (and 8-bit) weight-only quantization of decoder.onnx with ``com.microsoft::MatMulNBits``.

MatMulNBits stores B (K x N) in blocks of `block_size` along K, one scale per block and column:

    w[k, n] = (q[k, n] - zp[b, n]) * scale[b, n],   b = k // block_size,  q in [0, 2^bits)

zp is uint8 (packed like q) or absent (then 2^(bits-1)).
ORT CPU runs it with int8 activations quantized per block when ``accuracy_level=4`` (MLAS
CompInt8); ORT CUDA has MatMulNBits kernels too (not run here: no GPU). On SmolLM2-135M the int8
activations are what separates an exact weight re-encoding (100% top-1 at accuracy_level 0) from
the ~98% / KL 0.003 it measures at level 4 -- the same regime as llama.cpp's Q4_1 x Q8_1 dot products.

Methods (`QuantConfig.method`), all our own numpy code:

* ``"sym"``: symmetric RTN, scale = (signed extreme) / -8, no zero point. What ORT's
  MatMulNBitsQuantizer does by default.
* ``"asym"``: asymmetric RTN with a uint8 zero point. The grid {(q - zp) * s} always contains 0,
  so the block range is widened to include 0 (ORT's ``is_symmetric=False``).
* ``"affine"``: llama.cpp's Q4_1 form, w = s * q + m with a *float* offset m per block (range
  [min, max] exactly, no 0 forced in). SmolLM2-135M's GGUF weights already sit on such a grid
  (block 32 along K, f16 d and m), so affine block 32 re-encodes them exactly, while sym/asym
  re-quantize them onto a different grid (that is where plain RTN's 80% top-1 comes from).
  With ``refine > 0`` the (s, m) of each block are re-fitted by (activation-weighted) least
  squares over a few candidate grids; weights already on a grid keep their zero error.

How the float offset gets into ONNX: it is moved out of the quantized matmul ("blocksum"),

        y = x @ W = sum_b sum_{k in b} x_k (s_b (q_k - 8)) + sum_b (sum_{k in b} x_k) (m_b + 8 s_b)

  so the 4-bit part is a plain symmetric MatMulNBits (packed, fast int8 path on CPU) and the rest
  is a tiny f32 MatMul of the per-block sums of x (shape (..., K/bs)) with C = m + 8 s
  (shape (K/bs, N)). Block sums are computed once per MatMul input and shared (q/k/v, gate/up).

            x (..., K) ----------------------------> MatMulNBits(Bq, s) --------> (+) --> y (..., N)
               |                                                                  ^
               +--> Reshape (..., K/bs, bs) --> ReduceSum(-1) --> MatMul(C) -------+

MatMulNBits' float zero_points input (zp = -m/s) is not written: ORT CPU honours it only on its
unpacked path (de-quantizes the whole B to f32 on every call; SmolLM2-135M decoded ~7x slower with the
same numbers, benchmarks/results/decoder_4bit.md's "fzp" row), and "blocksum" needs only MatMulNBits
without zero points plus standard ops.

8-bit weights always use llama.cpp's Q8_0 form (symmetric, s = absmax / 127, no zero point), which
re-encodes SmolLM2's Q8_0 embedding exactly when it is used as the tied lm_head.

The lm_head goes through the same path with `lm_head_bits` (4, 8 or 32 = keep f32); ``keep_fp``
and ``keep_8bit`` take fnmatch patterns over node names (decoder_onnx names every weight MatMul
after its torch module, e.g. ``model.layers.3.mlp.down_proj``).

`choose_decoder_config` walks an ordered ladder of configurations and keeps the first whose
teacher-forced top-1 and KL against the f32 reference pass `TOP1_MIN` / `KL_MAX`, recording every
attempt for the manifest.
"""
from __future__ import annotations

import fnmatch
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from emrrg.export.errors import NoPassingConfigError, QuantizationError  # noqa: F401  (NoPassingConfigError: importable from here)

# Acceptance thresholds for a quantized decoder vs the f32 PyTorch reference, measured teacher-forced
# over greedy reference continuations (decoder_eval). llama.cpp's own Q4_1 of SmolLM2-135M (lossless
# weights, int8 activations) reaches 95.0% top-1 / KL 0.0025 on the same measure, so 0.95 asks for
# "as good as the format the weights ship in"; a mean KL of 0.05 nats is where the greedy report starts
# to change wording within a sentence or two.
TOP1_MIN = 0.95
KL_MAX = 0.05

ASYM_CLIP_MIN = 0.7  # asym refit: the narrowest range tried, as a share of the block's (AWQ's clip search)
# AWQ's scale search: s = E[x^2]^(alpha/2) per input channel for alpha on this grid (0 = no scaling, so the search
# is never worse than unscaled on its objective), scored on at most AWQ_SEARCH_COLS evenly spaced output columns
# (the objective sums over columns; a subset keeps a 7B's 11008-wide matrices cheap).
AWQ_ALPHAS = tuple(np.linspace(0.0, 1.0, 11).round(2))
AWQ_SEARCH_COLS = 512
LM_HEAD = "lm_head"
MS_DOMAIN = "com.microsoft"


# ---- configuration -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantConfig:
    """One way of quantizing the decoder; `name` is what reports and the manifest show."""

    name: str = "affine-b32-lm8"
    bits: int = 4
    block_size: int = 32
    method: str = "affine"          # "affine" (float offset, Q4_1 form), "asym" (uint8 zp), "sym"
    accuracy_level: int = 4         # 4: int8 activations (MLAS CompInt8); 0/1: f32 compute
    lm_head_bits: int = 8           # 4, 8, or 32 (keep f32)
    keep_fp: tuple[str, ...] = ()   # fnmatch patterns over node names kept f32
    keep_8bit: tuple[str, ...] = () # ... quantized to 8 bits instead of `bits`
    refine: int = 0                 # affine: candidate grids tried per block with a least-squares refit;
                                    # asym: candidate clipping ranges per block (AWQ's clip search)
    act_weighted: bool = False      # weight the refit by per-channel E[x^2] (needs activation stats)
    worst_k_8bit: int = 0           # chooser: the k most sensitive MatMuls (by weighted error) to 8 bits
    separate_adapters: bool = False # built graph: the LLM's LoRA stays a low-rank f32 branch (x A^T) B^T beside
                                    # the 4-bit base weights instead of being merged into them (decoder_builder)
    awq_scale: bool = False         # built graph: AWQ's per-input-channel scales (awq_scales), folded into the
                                    # RMSNorm weights (qkv, gate/up) and the up projection (down); needs stats

    def to_dict(self) -> dict:
        return asdict(self)


# ---- numerics (numpy) -------------------------------------------------------------------------------

def _to_blocks(w_kn: np.ndarray, bs: int) -> np.ndarray:
    """(K, N) -> (N, nb, bs), zero-padded along K."""
    K, N = w_kn.shape
    nb = -(-K // bs)
    wt = np.zeros((N, nb * bs), np.float32)
    wt[:, :K] = w_kn.T
    return wt.reshape(N, nb, bs)


def _from_blocks(wb: np.ndarray, K: int) -> np.ndarray:
    """(N, nb, bs) -> (K, N)."""
    N = wb.shape[0]
    return np.ascontiguousarray(wb.reshape(N, -1)[:, :K].T)


def quantize_sym(wb: np.ndarray, bits: int):
    """Symmetric RTN: w ~ s * (q - 2^(bits-1)); s = (signed extreme) / -2^(bits-1) (ORT's choice)."""
    half = 2 ** (bits - 1)
    lo, hi = wb.min(-1), wb.max(-1)
    ext = np.where(np.abs(hi) > np.abs(lo), hi, lo)
    s = (ext / -half).astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
    q = np.clip(np.rint(wb * inv[..., None]) + half, 0, 2 * half - 1).astype(np.uint8)
    return q, s


def quantize_sym8(wb: np.ndarray):
    """8-bit symmetric, llama.cpp Q8_0 form: s = absmax / 127, q in [-127, 127] (+128 stored)."""
    s = (np.abs(wb).max(-1) / 127.0).astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
    q = (np.clip(np.rint(wb * inv[..., None]), -127, 127) + 128).astype(np.uint8)
    return q, s


def _asym_fit(wb: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int):
    qmax = 2 ** bits - 1
    s = ((hi - lo) / qmax).astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
    zp = np.where(s == 0, 2 ** (bits - 1), np.clip(np.rint(-lo * inv), 0, qmax)).astype(np.uint8)
    q = np.clip(np.rint(wb * inv[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
    return q, s, zp


def quantize_asym(wb: np.ndarray, bits: int, refine: int = 0, h: np.ndarray | None = None):
    """Asymmetric RTN with an integer zero point; the range is widened to contain 0 (ORT's choice).

    refine = n > 0: AWQ's clipping search on top, with the same integer-zero-point layout (no extra bytes):
    n candidate ranges [lo, hi] * t, t from 1 down to ASYM_CLIP_MIN, and per block the one with the smallest
    error weighted by h (per input channel importance, E[x^2]; None: plain squared error)."""
    lo = np.minimum(wb.min(-1), 0)
    hi = np.maximum(wb.max(-1), 0)
    q, s, zp = _asym_fit(wb, lo, hi, bits)
    if refine <= 0:
        return q, s, zp
    h = np.ones_like(wb[:1, :1, :]) if h is None else h.astype(np.float32)

    def err(q, s, zp):
        r = wb - s[..., None] * (q.astype(np.float32) - zp[..., None])
        return (r * r * h).sum(-1)

    best = err(q, s, zp)
    for t in np.linspace(1.0, ASYM_CLIP_MIN, refine + 1)[1:]:
        qc, sc, zc = _asym_fit(wb, (lo * t).astype(np.float32), (hi * t).astype(np.float32), bits)
        e = err(qc, sc, zc)
        better = e < best
        best = np.where(better, e, best)
        q, s, zp = np.where(better[..., None], qc, q), np.where(better, sc, s), np.where(better, zc, zp)
    return q, s, zp


def _affine_assign(wb, s, m, qmax):
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
    return np.clip(np.rint((wb - m[..., None]) * inv[..., None]), 0, qmax)


def _affine_err(wb, q, s, m, h):
    r = wb - (s[..., None] * q + m[..., None])
    return (r * r * h).sum(-1)


def quantize_affine(wb: np.ndarray, bits: int, refine: int = 0, h: np.ndarray | None = None):
    """Affine (Q4_1 form): w ~ s * q + m, q in [0, 2^bits), float s and m per block.

    Start from s = (max - min) / qmax, m = min -- exact for weights already on such a grid. With
    refine = n, also try n candidate grids (s = range / (qmax + t), t in [-1, 1]) and refit (s, m) on
    each assignment by least squares weighted by h (per input channel importance, e.g. E[x^2]);
    keep per block whichever has the smallest weighted error. Returns q (uint8), s, m (float32).
    """
    qmax = 2 ** bits - 1
    wb = wb.astype(np.float32)
    h = np.ones_like(wb[:1, :1, :]) if h is None else h.astype(np.float32)
    h = np.broadcast_to(h, wb.shape)
    lo, hi = wb.min(-1), wb.max(-1)
    rng = hi - lo
    s = np.where(rng > 0, rng / qmax, np.where(lo != 0, np.abs(lo), 1.0) / qmax).astype(np.float32)
    m = lo.astype(np.float32)
    q = _affine_assign(wb, s, m, qmax)
    if refine <= 0:
        return q.astype(np.uint8), s, m
    best_err = _affine_err(wb, q, s, m, h)
    best_s, best_m = s.copy(), m.copy()
    sh, shw = h.sum(-1), (h * wb).sum(-1)
    for t in np.linspace(-1.0, 1.0, refine):
        sc = np.where(rng > 0, rng / (qmax + t), s).astype(np.float32)
        # centre the candidate grid on the block's range, then refit (s, m) on its assignment
        mc = (lo + 0.5 * (rng - sc * qmax)).astype(np.float32)
        qc = _affine_assign(wb, sc, mc, qmax)
        sq, sqq, sqw = (h * qc).sum(-1), (h * qc * qc).sum(-1), (h * qc * wb).sum(-1)
        det = sh * sqq - sq * sq
        ok = np.abs(det) > 1e-12 * np.maximum(sh * sqq, 1e-30)
        s_fit = np.where(ok, (sh * sqw - sq * shw) / np.where(ok, det, 1), sc)
        m_fit = np.where(ok, (sqq * shw - sq * sqw) / np.where(ok, det, 1), mc)
        s_fit = np.where(s_fit > 0, s_fit, sc).astype(np.float32)
        m_fit = m_fit.astype(np.float32)
        qf = _affine_assign(wb, s_fit, m_fit, qmax)
        err = _affine_err(wb, qf, s_fit, m_fit, h)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s_fit, best_s)
        best_m = np.where(better, m_fit, best_m)
    q = _affine_assign(wb, best_s, best_m, qmax)
    return q.astype(np.uint8), best_s.astype(np.float32), best_m.astype(np.float32)


def pack_q(q: np.ndarray, bits: int) -> np.ndarray:
    """(N, nb, bs) uint8 codes -> MatMulNBits B (N, nb, bs * bits / 8): element k in bits k*b.. of the block."""
    if bits == 8:
        return np.ascontiguousarray(q.astype(np.uint8))
    if bits != 4:
        raise QuantizationError(f"packing for {bits} bits is not implemented (4 or 8)")
    return np.ascontiguousarray((q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)).astype(np.uint8)


def pack_zp(zp: np.ndarray, bits: int) -> np.ndarray:
    """(N, nb) uint8 zero points -> (N, ceil(nb * bits / 8)), low nibble first for 4 bits."""
    if bits == 8:
        return zp.astype(np.uint8)
    N, nb = zp.shape
    z = np.zeros((N, nb + (nb % 2)), np.uint8)
    z[:, :nb] = zp
    return ((z[:, 0::2] & 0xF) | ((z[:, 1::2] & 0xF) << 4)).astype(np.uint8)


@dataclass
class QuantizedWeight:
    """One MatMul's quantized B in MatMulNBits layout, plus what the f32 graph needs besides."""

    K: int
    N: int
    bits: int
    block_size: int
    packed: np.ndarray                 # (N, nb, bs*bits/8) uint8
    scales: np.ndarray                 # (N, nb) float32
    zero_points: np.ndarray | None     # (N, ceil(nb*bits/8)) uint8 (asym)
    correction: np.ndarray | None      # (nb, N) float32: blocksum C = m + 2^(bits-1) s
    dequantized: np.ndarray            # (K, N) float32, what the graph computes (for error metrics)


def quantize_weight(w_kn: np.ndarray, bits: int, block_size: int, method: str, refine: int = 0,
                    h: np.ndarray | None = None) -> QuantizedWeight:
    """Quantize one (K, N) f32 weight. h: optional (K,) importance per input channel."""
    K, N = w_kn.shape
    wb = _to_blocks(w_kn, block_size)                                     # (N, nb, bs)
    hb = None if h is None else _to_blocks(np.asarray(h, np.float32)[:, None], block_size)  # (1, nb, bs)
    half = 2 ** (bits - 1)
    zp = corr = None
    if bits == 8:  # always Q8_0 form: exact for llama.cpp Q8_0 weights (SmolLM2's embedding / lm_head)
        q, s = quantize_sym8(wb)
        deq = s[..., None] * (q.astype(np.float32) - 128)
    elif method == "sym":
        q, s = quantize_sym(wb, bits)
        deq = s[..., None] * (q.astype(np.float32) - half)
    elif method == "asym":
        q, s, z = quantize_asym(wb, bits, refine=refine, h=hb)
        deq = s[..., None] * (q.astype(np.float32) - z[..., None])
        zp = pack_zp(z, bits)
    elif method == "affine":
        q, s, m = quantize_affine(wb, bits, refine=refine, h=hb)
        deq = s[..., None] * q.astype(np.float32) + m[..., None]
        corr = np.ascontiguousarray((m + half * s).T.astype(np.float32))   # (nb, N): the blocksum correction
    else:
        raise QuantizationError(f"unknown method {method!r} (affine, asym, sym)")
    return QuantizedWeight(K=K, N=N, bits=bits, block_size=block_size, packed=pack_q(q, bits),
                           scales=np.ascontiguousarray(s.astype(np.float32)), zero_points=zp, correction=corr,
                           dequantized=_from_blocks(deq.astype(np.float32), K))


def awq_scales(w_kn: np.ndarray, h: np.ndarray, bits: int, cfg: "QuantConfig") -> tuple[np.ndarray, float]:
    """AWQ (Lin et al. 2023): per-input-channel scales s (K,) such that quantizing diag(s) W and feeding x / s
    loses least, chosen over s = E[x^2]^(alpha/2), alpha in AWQ_ALPHAS (normalised to a geometric mean of 1 over
    the channels' range). Objective: sum_k h_k / s_k^2 |Q(s_k W_k) - s_k W_k|^2 with h = E[x^2], i.e. the
    output error for inputs with uncorrelated channels. Returns (s, alpha); alpha 0 means s = 1."""
    K, N = w_kn.shape
    cols = np.unique(np.linspace(0, N - 1, min(N, AWQ_SEARCH_COLS)).astype(np.int64))
    w = np.ascontiguousarray(w_kn[:, cols], np.float32)
    h = np.maximum(np.asarray(h, np.float64), 1e-12)
    best = (np.inf, np.ones(K, np.float32), 0.0)
    for alpha in AWQ_ALPHAS:
        sc = h ** (alpha / 2)
        sc = (sc / np.sqrt(sc.max() * sc.min())).astype(np.float32)
        ws = w * sc[:, None]
        hs = (h / sc.astype(np.float64) ** 2).astype(np.float32)
        q = quantize_weight(ws, bits, cfg.block_size, cfg.method)      # plain rounding, as AWQ searches
        err = float((hs[:, None] * (ws - q.dequantized) ** 2).sum())
        if err < best[0]:
            best = (err, sc, float(alpha))
    return best[1], best[2]


def weighted_rel_error(w_kn: np.ndarray, deq_kn: np.ndarray, h: np.ndarray | None = None) -> float:
    """sum_k h_k |W_k - Wq_k|^2 / sum_k h_k |W_k|^2: the relative output error E|x dW|^2 / E|x W|^2
    for inputs x with uncorrelated channels of energy h (h = 1: plain relative weight error)."""
    h = np.ones(w_kn.shape[0], np.float32) if h is None else np.asarray(h, np.float32)
    num = float((h[:, None] * (w_kn - deq_kn) ** 2).sum())
    den = float((h[:, None] * w_kn ** 2).sum())
    return num / den if den > 0 else 0.0


# ---- activation statistics (ORT) ---------------------------------------------------------------------

def weight_matmuls(model) -> list:
    """MatMul nodes whose B is a 2-D f32 initializer (the ones weight-only quantization can take)."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            t = inits[n.input[1]]
            if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT:
                out.append(n)
    return out


def collect_activation_stats(f32_onnx: str | Path, feeds: Sequence[dict], threads: int = 2) -> dict[str, np.ndarray]:
    """Per weight MatMul (by node name): E[x_k^2] over all tokens of `feeds`, shape (K,) float32.

    Runs a copy of the f32 decoder whose MatMul inputs are extra graph outputs, so this needs only
    onnxruntime and works on any exported decoder (hybrid layers included).
    """
    import onnx

    from emrrg.export.decoder_onnx import probe_session

    model = onnx.load(str(f32_onnx))
    nodes = weight_matmuls(model)
    a_names = sorted({n.input[0] for n in nodes})
    sums: dict[str, np.ndarray] = {}
    count = 0
    with probe_session(model, a_names, threads=threads, keep_model=False) as sess:
        del model
        for f in feeds:
            outs = sess.run(a_names, f)
            for a, x in zip(a_names, outs):
                x = x.reshape(-1, x.shape[-1]).astype(np.float64)
                sums[a] = sums.get(a, 0.0) + (x * x).sum(0)
            count += int(np.prod(outs[0].shape[:-1]))
    return {n.name: (sums[n.input[0]] / max(count, 1)).astype(np.float32) for n in nodes}


# ---- graph rewrite -----------------------------------------------------------------------------------------

@dataclass
class QuantizeResult:
    """What quantize_decoder wrote: file, sizes, the config and one row per weight MatMul."""

    path: Path
    config: QuantConfig
    bytes: int
    f32_bytes: int
    nodes: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def size_ratio(self) -> float:
        return self.bytes / self.f32_bytes if self.f32_bytes else float("nan")

    def summary(self) -> dict:
        by_bits: dict[str, int] = {}
        for r in self.nodes:
            by_bits[str(r["bits"])] = by_bits.get(str(r["bits"]), 0) + 1
        worst = sorted(self.nodes, key=lambda r: -r["rel_err"])[:5]
        return {"config": self.config.to_dict(), "path": str(self.path), "bytes": self.bytes,
                "f32_bytes": self.f32_bytes, "size_ratio": round(self.size_ratio, 4), "matmuls_by_bits": by_bits,
                "worst_rel_err": [(r["name"], r["bits"], round(r["rel_err"], 6)) for r in worst],
                "seconds": round(self.seconds, 1)}


def onnx_bytes(path: str | Path) -> int:
    """Size of an ONNX file plus its external data file, if any."""
    p = Path(path)
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _plan_bits(name: str, cfg: QuantConfig) -> int:
    """32 = keep f32."""
    if _matches(name, cfg.keep_fp):
        return 32
    if name == LM_HEAD:
        return cfg.lm_head_bits
    if _matches(name, cfg.keep_8bit):
        return 8
    return cfg.bits


class _Rewriter:
    """Replaces weight MatMuls by MatMulNBits (+ the shared block-sum correction) in a ModelProto."""

    def __init__(self, model, accuracy_level: int):
        self.model = model
        self.graph = model.graph
        self.level = accuracy_level
        self.blocksums: dict[tuple[str, int], str] = {}
        self.new_inits = []
        self.uid = 0
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
                      list(model.graph.value_info) + list(model.graph.input)
                      if v.type.tensor_type.HasField("shape")}

    def _init(self, arr: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def _name(self, base: str) -> str:
        self.uid += 1
        return f"{base}__q{self.uid}"

    def _blocksum(self, a: str, K: int, bs: int, out_nodes: list) -> str:
        """x (..., K) -> (..., ceil(K/bs)) per-block sums, built once per (x, bs)."""
        from onnx import helper

        key = (a, bs)
        if key in self.blocksums:
            return self.blocksums[key]
        nb = -(-K // bs)
        src = a
        if K % bs:  # zero-pad the last partial block (Pad with axes, opset 18)
            pads = self._init(np.array([0, nb * bs - K], np.int64), self._name(f"{a}/pads"))
            axes = self._init(np.array([-1], np.int64), self._name(f"{a}/pad_axes"))
            src = self._name(f"{a}/padded")
            out_nodes.append(helper.make_node("Pad", [a, pads, "", axes], [src], name=self._name(f"{a}/Pad")))
        rank = self.ranks.get(a)
        if rank:  # static rank (the exporter's value_info): one constant shape, 0 = copy that dim
            shape = self._init(np.array([0] * (rank - 1) + [nb, bs], np.int64), self._name(f"{a}/blocked_shape"))
        else:     # rank-generic: Shape(x)[:-1] ++ [nb, bs]
            lead = self._name(f"{a}/lead_shape")
            out_nodes.append(helper.make_node("Shape", [a], [lead], end=-1, name=self._name(f"{a}/Shape")))
            tail = self._init(np.array([nb, bs], np.int64), self._name(f"{a}/block_shape"))
            shape = self._name(f"{a}/blocked_shape")
            out_nodes.append(helper.make_node("Concat", [lead, tail], [shape], axis=0, name=self._name(f"{a}/Concat")))
        blocked = self._name(f"{a}/blocked")
        out_nodes.append(helper.make_node("Reshape", [src, shape], [blocked], name=self._name(f"{a}/Reshape")))
        axes = self._init(np.array([-1], np.int64), self._name(f"{a}/sum_axes"))
        sums = self._name(f"{a}/block_sums_{bs}")
        out_nodes.append(helper.make_node("ReduceSum", [blocked, axes], [sums], keepdims=0, name=self._name(f"{a}/ReduceSum")))
        self.blocksums[key] = sums
        return sums

    def replace(self, node, qw: QuantizedWeight) -> list:
        """Nodes that compute node.output[0] from node.input[0] with the quantized weight."""
        from onnx import helper

        a, y, base = node.input[0], node.output[0], node.name or node.output[0]
        ins = [a, self._init(qw.packed, f"{base}.weight_q{qw.bits}"), self._init(qw.scales, f"{base}.scales")]
        if qw.zero_points is not None:
            ins.append(self._init(qw.zero_points, f"{base}.zero_points"))
        nodes: list = []
        mm_out = y if qw.correction is None else self._name(f"{base}/nbits")
        attrs = dict(K=qw.K, N=qw.N, bits=qw.bits, block_size=qw.block_size)
        if self.level:
            attrs["accuracy_level"] = self.level
        if qw.correction is not None:
            sums = self._blocksum(a, qw.K, qw.block_size, nodes)
        nodes.append(helper.make_node("MatMulNBits", ins, [mm_out], domain=MS_DOMAIN, name=base, **attrs))
        if qw.correction is not None:
            c = self._init(qw.correction, f"{base}.block_offsets")
            corr = self._name(f"{base}/offset")
            nodes.append(helper.make_node("MatMul", [sums, c], [corr], name=f"{base}/offset_MatMul"))
            nodes.append(helper.make_node("Add", [mm_out, corr], [y], name=f"{base}/offset_Add"))
        return nodes


def quantize_decoder(f32_onnx: str | Path, out_dir: str | Path, config: QuantConfig = QuantConfig(), *,
                     act_stats: dict[str, np.ndarray] | None = None, verbose: bool = False) -> QuantizeResult:
    """Quantize decoder.onnx's weight MatMuls to MatMulNBits as `config` says; writes out_dir/decoder.onnx.

    act_stats: collect_activation_stats output, needed when config.act_weighted (the refit's weights) and
    used for the per-MatMul weighted errors that worst_k_8bit ranks by. The embedding table
    (embed_tokens.npy) and cross_kv.onnx are not touched; they stay f32.
    """
    import onnx

    from emrrg.export.decoder_onnx import save_onnx

    t0 = time.time()
    cfg = config
    if cfg.bits not in (4, 8) or cfg.lm_head_bits not in (4, 8, 32):
        raise QuantizationError(f"bits must be 4 or 8 and lm_head_bits 4, 8 or 32; got {cfg.bits}, {cfg.lm_head_bits}")
    if cfg.block_size < 16 or cfg.block_size & (cfg.block_size - 1):
        raise QuantizationError(f"block_size must be a power of two >= 16 (MatMulNBits), got {cfg.block_size}")
    if cfg.act_weighted and act_stats is None:
        raise QuantizationError("act_weighted=True needs act_stats (collect_activation_stats)")
    f32_onnx = Path(f32_onnx)
    model = onnx.load(str(f32_onnx))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = weight_matmuls(model)
    if not nodes:
        raise QuantizationError(f"{f32_onnx} has no MatMul with a constant 2-D f32 weight")

    for n in nodes:
        n.name = n.name or n.output[0]
    if len({n.name for n in nodes}) != len(nodes):
        raise QuantizationError("weight MatMul node names are not unique; export with emrrg.export.decoder_onnx")

    def importance(k):
        return act_stats.get(k) if act_stats is not None else None

    weights = {n.name: onnx.numpy_helper.to_array(inits[n.input[1]]) for n in nodes}
    plan = {n.name: _plan_bits(n.name, cfg) for n in nodes}

    def quant(k, b):
        h = importance(k) if cfg.act_weighted else None
        return quantize_weight(weights[k], b, cfg.block_size, cfg.method, cfg.refine, h)

    qws = {k: quant(k, b) for k, b in plan.items() if b < 32}
    rel = {k: weighted_rel_error(weights[k], q.dequantized, importance(k)) for k, q in qws.items()}
    if cfg.worst_k_8bit and cfg.bits < 8:
        cand = sorted((k for k in qws if qws[k].bits == cfg.bits), key=lambda k: -rel[k])
        for k in cand[:cfg.worst_k_8bit]:
            plan[k] = 8
            qws[k] = quant(k, 8)
            rel[k] = weighted_rel_error(weights[k], qws[k].dequantized, importance(k))

    rw = _Rewriter(model, cfg.accuracy_level)
    report = []
    new_nodes = []
    weight_outputs = {n.output[0] for n in nodes}
    for node in model.graph.node:
        qw = qws.get(node.name) if node.op_type == "MatMul" and node.output[0] in weight_outputs else None
        if qw is None:
            new_nodes.append(node)
            continue
        new_nodes.extend(rw.replace(node, qw))
        report.append({"name": node.name, "K": qw.K, "N": qw.N, "bits": qw.bits,
                       "rel_err": rel[node.name], "offset": "blocksum" if qw.correction is not None else None})
    for n in nodes:
        if plan[n.name] == 32:
            report.append({"name": n.name, "K": weights[n.name].shape[0], "N": weights[n.name].shape[1],
                           "bits": 32, "rel_err": 0.0, "offset": None})
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + rw.new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    meta = {p.key: p.value for p in model.metadata_props}
    meta["quantization"] = json.dumps({"config": cfg.to_dict(), "format": "MatMulNBits"})
    del model.metadata_props[:]
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = save_onnx(model, out_dir / "decoder.onnx")
    res = QuantizeResult(path=out, config=cfg, bytes=onnx_bytes(out), f32_bytes=onnx_bytes(f32_onnx),
                         nodes=report, seconds=time.time() - t0)
    if verbose:
        print(f"[quantize] {cfg.name}: {res.bytes / 2**20:.1f} MiB ({res.size_ratio:.3f} of f32) in {res.seconds:.1f}s")
    return res


# ---- accuracy-aware choice --------------------------------------------------------------------------------

# Tried in order; the first within TOP1_MIN / KL_MAX wins. Cheapest to run first:
#  0. uint4 asymmetric, integer (packed uint8) zero points: one MatMulNBits per projection and nothing else.
#     Right for weights that are not on a 4-bit grid already (most fp16/bf16 fine-tunes).
#  1. + AWQ: per-input-channel scales searched on the activations' E[x^2] (awq_scales) and folded into the
#     RMSNorm weights / the up projection, then the clipping search per block (ASYM_CLIP_MIN) weighted the same
#     way: same bytes, same graph.
#  2. affine block 32 (llama.cpp Q4_1 form), 8-bit lm_head: exact for weights on a Q4_1/Q8_0 grid (SmolLM2 as
#     shipped), which the asymmetric rungs re-round (top-1 0.55-0.87 there). Its float block offsets cost one
#     correction node per projection (decoder_builder: integer zero points + an f16 rest, com.emrrg::
#     BlockSumMatMulAdd); float zero points would run 5-10x slower on ORT CPU.
#  3. + activation-weighted least-squares refit of every block (AWQ-like, no extra bytes): recovers most of
#     what a merged LoRA costs.
#  4. the LLM's LoRA kept beside the 4-bit weights, not merged into them (built graph only): the base weights
#     re-encode exactly (affine, on their grid) and each adapted projection gets a rank-r f32 branch
#     (x A^T) B^T, two small MatMuls (~3% of a SmolLM2 layer's multiply-adds at rank 8 on q/v). Exact where a
#     trained LoRA has moved the merged weights too far off the grid for rung 3 (stage 6's demo checkpoint).
#  5. + the 16 MatMuls with the largest weighted error at 8 bits.
#  6. + 64 of them at 8 bits (every q/v projection of a 30-layer model with a q/v LoRA).
#  7. lm_head kept f32 as well.
#  8. everything at 8 bits: the fallback that any decoder we have seen passes.
#  9-10. rungs 4 and 2 with f32 activations (accuracy_level 0) and an f32 lm_head: the last resort for the
#     report-level check (--calib-reports). Every rung above runs MatMulNBits on int8-quantized activations
#     (accuracy_level 4, llama.cpp's Q4 x Q8 regime), whose small logit errors flip near-tied beams: on the
#     stage-6 demo checkpoint no such rung, all-8-bit weights included, kept 24 validation reports within the bands,
#     while these wrote the f32 decoder's 24 reports exactly. Their decode is ~2.6x slower than rung 4's (3
#     beams, SmolLM2); an 8-bit lm_head at accuracy_level 0 is not used: ORT CPU de-quantizes it on every
#     call (11x slower than rung 4).
# The rungs marked awq need activation statistics (calibration prompts); without them they run unweighted.
# A quantizer may skip a rung without building or scoring it (`quantize.skip`, see choose_decoder_config):
# decoder_builder.quantized_builder skips 0-1 for weights already on a 4-bit block grid, and 4 and 9 when the
# checkpoint has no LLM adapters.
DEFAULT_LADDER: tuple[QuantConfig, ...] = (
    QuantConfig("asym-b32-lm8", method="asym"),
    QuantConfig("asym-b32-awq-lm8", method="asym", refine=6, act_weighted=True, awq_scale=True),
    QuantConfig("affine-b32-lm8"),
    QuantConfig("affine-b32-awq-lm8", refine=9, act_weighted=True),
    QuantConfig("affine-b32-lora-lm8", separate_adapters=True),
    QuantConfig("affine-b32-awq-lm8-w16", refine=9, act_weighted=True, worst_k_8bit=16),
    QuantConfig("affine-b32-awq-lm8-w64", refine=9, act_weighted=True, worst_k_8bit=64),
    QuantConfig("affine-b32-awq-lm32-w64", refine=9, act_weighted=True, worst_k_8bit=64, lm_head_bits=32),
    QuantConfig("int8-b32", bits=8, lm_head_bits=8),
    QuantConfig("affine-b32-lora-lm32-al0", separate_adapters=True, lm_head_bits=32, accuracy_level=0),
    QuantConfig("affine-b32-lm32-al0", lm_head_bits=32, accuracy_level=0),
)


@dataclass
class Choice:
    """The configuration choose_decoder_config kept, and every attempt on the way (for the manifest)."""

    config: QuantConfig | None
    path: Path | None
    passed: bool
    attempts: list[dict]
    thresholds: dict

    def manifest(self) -> dict:
        return {"chosen": self.config.name if self.config else None, "passed": self.passed,
                "path": str(self.path) if self.path else None, "thresholds": self.thresholds,
                "attempts": self.attempts}


def _rewrite_quantizer(f32_onnx: str | Path) -> Callable[[QuantConfig, Path, dict | None], QuantizeResult]:
    """choose_decoder_config's default quantize: quantize_decoder's rewrite of the f32 (traced) graph. It has no
    weights to build from, so it skips the rungs that keep LoRA adapters separate."""
    def quantize(cfg: QuantConfig, out_dir: Path, act_stats: dict | None = None) -> QuantizeResult:
        return quantize_decoder(f32_onnx, out_dir, config=cfg, act_stats=act_stats)

    quantize.skip = lambda cfg, later: ("only the decoder built from the weights keeps LoRA adapters separate "
                                        "(decoder_graph=built)" if cfg.separate_adapters else None)
    return quantize


def choose_decoder_config(f32_onnx: str | Path, out_dir: str | Path, evaluate: Callable[[Path], object], *,
                          ladder: Sequence[QuantConfig] = DEFAULT_LADDER, act_stats: dict | None = None,
                          top1_min: float = TOP1_MIN, kl_max: float = KL_MAX, strict: bool = False,
                          keep_attempts: bool = False, verbose: bool = True,
                          quantize: Callable[[QuantConfig, Path, dict | None], QuantizeResult] | None = None,
                          accept: Callable[[Path], tuple[bool, dict]] | None = None) -> Choice:
    """Quantize with each configuration of `ladder` in turn; keep the first that passes.

    evaluate(decoder_onnx) -> an object with .top1 and .kl_mean (decoder_eval.DecoderEvaluator).
    act_stats: collect_activation_stats output (rungs with act_weighted fall back to unweighted
    without it, and say so in the attempt). The kept model ends up in out_dir/decoder.onnx; attempts
    are written under out_dir/attempts/<name>/ and removed unless keep_attempts. When none passes,
    the best attempt (highest top-1, then lowest KL) is kept with passed=False -- or, with
    strict=True, NoPassingConfigError is raised carrying every attempt. quantize(config, out_dir, act_stats):
    how a candidate is made (default: quantize_decoder's rewrite of f32_onnx; decoder_builder.quantized_builder
    builds each candidate from the weights instead). When `quantize` has an attribute skip(config, later_rungs)
    returning a reason, that rung is recorded as skipped (top1 None, "skipped": reason) and neither built nor
    scored. accept(decoder_onnx) -> (ok, details): a further check of a rung that met the thresholds (the
    report-level check of export/report_check.py); a rung it refuses does not pass, and the details go in its
    attempt under "reports".
    """
    out_dir = Path(out_dir)
    work = out_dir / "attempts"
    attempts: list[dict] = []
    best: tuple | None = None
    chosen: QuantConfig | None = None
    quantize = quantize or _rewrite_quantizer(f32_onnx)
    skip = getattr(quantize, "skip", None)
    for k, cfg in enumerate(ladder):
        note = None
        reason = skip(cfg, ladder[k + 1:]) if skip is not None else None
        if reason:
            attempts.append({"name": cfg.name, "config": cfg.to_dict(), "top1": None, "kl_mean": None,
                             "passed": False, "skipped": reason})
            if verbose:
                print(f"[choose] - {cfg.name:<26} skipped: {reason}")
            continue
        if cfg.act_weighted and act_stats is None:
            cfg, note = replace(cfg, act_weighted=False), "no activation statistics: unweighted refit"
        res = quantize(cfg, work / cfg.name, act_stats)
        ev = evaluate(res.path)
        passed = ev.top1 >= top1_min and ev.kl_mean <= kl_max
        checked = None
        if passed and accept is not None:
            passed, checked = accept(res.path)
        row = {"name": cfg.name, "config": cfg.to_dict(), "top1": round(ev.top1, 4), "kl_mean": round(ev.kl_mean, 5),
               "kl_p99": round(getattr(ev, "kl_p99", float("nan")), 4),
               "greedy_token_agreement": getattr(ev, "greedy_token_agreement", None),
               "bytes": res.bytes, "size_ratio": round(res.size_ratio, 4), "passed": passed,
               "quantize_s": round(res.seconds, 1), "eval_s": round(getattr(ev, "seconds", 0.0), 1),
               "matmuls_by_bits": res.summary()["matmuls_by_bits"]}
        if note:
            row["note"] = note
        if checked is not None:
            row["reports"] = checked
        attempts.append(row)
        if verbose:
            print(f"[choose] {'✓' if passed else '✗'} {cfg.name:<26} top1 {ev.top1:.4f} (>= {top1_min}) "
                  f"KL {ev.kl_mean:.4f} (<= {kl_max}) {res.bytes / 2**20:.1f} MiB")
        key = (ev.top1, -ev.kl_mean)
        if best is None or key > best[0]:
            best = (key, cfg, res.path)
        if passed:
            chosen = cfg
            break
    thresholds = {"top1_min": top1_min, "kl_max": kl_max}
    if chosen is None:
        if strict:
            shutil.rmtree(work, ignore_errors=True)
            raise NoPassingConfigError(f"no configuration reached top-1 >= {top1_min} and KL <= {kl_max}: " +
                                       ", ".join(f"{a['name']} {a['top1']:.3f}/{a['kl_mean']:.4f}" for a in attempts
                                                 if not a.get("skipped")),
                                       attempts)
        chosen = best[1]
    src = work / chosen.name
    for stale in (out_dir / "decoder.onnx", out_dir / "decoder.onnx.data"):
        stale.unlink(missing_ok=True)
    for f in src.iterdir():
        shutil.copy2(f, out_dir / f.name)
    if not keep_attempts:
        shutil.rmtree(work, ignore_errors=True)
    passed = any(a["passed"] for a in attempts)
    return Choice(config=chosen, path=out_dir / "decoder.onnx", passed=passed, attempts=attempts, thresholds=thresholds)
