"""Build decoder.onnx directly from the (merged) weights, layer by layer: fused contrib ops, in-place KV cache.

The traced exporter (export/decoder_onnx.py) runs torch.onnx over the whole LlamaForCausalLM: ~2,370
nodes per token, a KV Concat that copies the cache every step, and a 4-bit rewrite that needs the whole
f32 graph in memory. This module writes the graph itself with `onnx.helper`, one layer at a time, and
quantizes each weight as it is written (straight into the external-data file), so the export holds about
one weight matrix plus the graph's node list at a time.

Per layer (ONNX Runtime contrib ops, domain com.microsoft, CPU and CUDA):

    x   = SkipSimplifiedLayerNormalization(mlp_out[i-1], residual)      (layer 0: SimplifiedLayerNormalization)
    qkv = Linear(x, [Wq | Wk | Wv])                                       one packed projection
    a   = GroupQueryAttention(qkv, past_k, past_v, seqlens_k, total, cos, sin; do_rotary=1)
    o   = Linear(a, Wo)  [+ hybrid: gate(x) * o_x(softmax(q_x(x) K_vis^T) V_vis)]
    x2  = SkipSimplifiedLayerNormalization(o, residual)
    g,u = Split(Linear(x2, [Wgate | Wup]));  m = Linear(g * Sigmoid(g) * u, Wdown)

Linear is a MatMul (f32 weights) or a MatMulNBits (4/8-bit). For the exact affine (Q4_1-grid) encoding,
w = s q + m per block, the MatMulNBits takes integer zero points z = round(-m/s) and the small rest
r = m + s z (f16) rides on a block-sum correction: one com.emrrg::BlockSumMatMulAdd node per projection
(y + BlockSum(x) @ r; packed projections' offsets concatenated; 4 per layer), the op library's kernel when it is
registered, else the node's standard-ONNX function body (blocksum_function). `offset_graph` keeps the older
forms for comparison. Float zero points are never used: ORT CPU runs them on a de-quantize-then-f32 path ~60x
slower.

THE CONTRACT (format_version 2, ``DecoderSpec.cache == "shared"``):

    inputs   inputs_embeds                 (B, T, hidden)            float32
             attention_mask                (B, P+T)                  int64   all ones (the runtime never pads)
             past_key_values.{i}.key/value (B, kv_heads, C, head_dim) float32
             visual_kv.{j}.key/value       (B, heads_j, Lv, hd_j)    float32 (hybrid layers j only)
    outputs  logits                        (B, 1, vocab)             float32 the last position only
                                           (B, T, vocab) in the all-positions variant (`with_all_logits`)
             present.{i}.key/value         (B, kv_heads, C', head_dim)

  No position_ids: GroupQueryAttention derives each row's positions from seqlens_k = sum(mask) - 1 and
  applies the rotary itself. Two ways to drive the cache:
  * shared buffer (the runtime): bind one (B, kv_heads, C, head_dim) buffer per layer as both
    past_key_values.{i}.* and present.{i}.* (IOBinding, same pointer, C >= P+T); the op writes the T new
    positions in place, nothing is copied.
  * growing (validation, evaluators): feed past of exactly P positions, get present of P+T (C' = P+T).
"""
from __future__ import annotations

import json
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from emrrg.runtime.contract import CACHE_SHARED
from emrrg.runtime.oplib import BLOCKSUM_OP_TYPE, OP_DOMAIN, OP_VERSION
from emrrg.export.decoder_onnx import (CROSS_KV_ONNX, DECODER_FORMAT, DECODER_ONNX, EMBED_TOKENS_NPY, OPSET, DecoderExport,
                           DecoderExportError, DecoderSpec)
from emrrg.export.quantize_decoder import (DEFAULT_LADDER, LM_HEAD, MS_DOMAIN, QuantConfig, QuantizationError, QuantizedWeight,
                               _plan_bits, awq_scales, pack_zp, quantize_weight, weighted_rel_error)

BUILDER_FORMAT_VERSION = 2
DATA_ALIGN = 64               # byte alignment of each tensor in the external-data file
INLINE_BELOW_BYTES = 1024     # tiny tensors (shapes, norms of small models) stay in the protobuf
QUANT_CHUNK_ELEMS = 1 << 22   # weights quantized at a time (16 MB of f32): bounds the quantizer's temporaries
FINAL_HIDDEN = "model.norm.out"


class BuilderUnsupported(DecoderExportError):
    """This decoder's architecture is outside what the builder writes (use decoder_graph=traced)."""


# ---- weights ------------------------------------------------------------------------------------------

class WeightSource(Protocol):
    def get(self, name: str) -> np.ndarray: ...        # float32, HF layout (out, in) for Linear weights
    def has(self, name: str) -> bool: ...


AdapterFactors = dict[str, tuple[np.ndarray, np.ndarray]]   # HF weight name -> (A (r, in), B * scaling (out, r))


def lora_factors(llm) -> AdapterFactors:
    """The peft LoRA factors of an LLM that still carries its adapters (take them before merging), keyed by the
    merged model's weight names (model.layers.3.self_attn.q_proj.weight): merged W = W0 + B_scaled @ A."""
    from emrrg.decoder import lora_modules

    out: AdapterFactors = {}
    for name, mod in lora_modules(llm):
        a = mod.lora_A
        if list(a.keys()) != ["default"] or getattr(mod, "fan_in_fan_out", False) or \
                any(getattr(mod, "use_dora", {}).values()):
            raise DecoderExportError(f"{name}: only one plain LoRA adapter ('default', no DoRA) can be kept "
                                     f"separate; found {list(a.keys())}")
        A = a["default"].weight.detach().float()
        B = mod.lora_B["default"].weight.detach().float() * float(mod.scaling["default"])
        key = name.removeprefix("base_model.model.") + ".weight"
        out[key] = (A.numpy().copy(), B.numpy().copy())
    return out


class ModuleWeights:
    """Weights of an in-memory (merged) LlamaForCausalLM, one tensor at a time (f32 views, no copies)."""

    def __init__(self, llm):
        self._p = dict(llm.named_parameters())
        self._p.update(dict(llm.named_buffers()))

    def has(self, name: str) -> bool:
        return name in self._p

    def get(self, name: str) -> np.ndarray:
        import torch

        t = self._p[name].detach()
        return t.numpy() if t.dtype == torch.float32 else t.to(torch.float32).numpy()


class SafetensorsWeights:
    """Weights read tensor by tensor from one or more .safetensors files (F32 / F16 / BF16 -> f32).

    Reads each tensor with a plain file read at its offset (the format is an 8-byte header length, a JSON
    header, then raw little-endian data), not through a memory map: mapped pages that were touched stay in
    the process's RSS until the file is closed, which would make a 7B export's RSS grow by the whole file."""

    _DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}

    def __init__(self, files: Iterable[str | Path]):
        self._where: dict[str, tuple] = {}
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                if v["dtype"] not in self._DTYPES:
                    raise DecoderExportError(f"{f}: tensor {k} has dtype {v['dtype']}; the builder reads "
                                             f"{', '.join(self._DTYPES)} (convert the checkpoint first)")
                start, end = v["data_offsets"]
                self._where[k] = (Path(f), 8 + n + start, end - start, v["dtype"], tuple(v["shape"]))

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        f, offset, nbytes, dtype, shape = self._where[name]
        raw = np.fromfile(f, dtype=self._DTYPES[dtype], count=nbytes // np.dtype(self._DTYPES[dtype]).itemsize,
                          offset=offset)
        if dtype == "BF16":                                   # bf16 = the top 16 bits of an f32
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.astype(np.float32, copy=False).reshape(shape)


@dataclass
class LlamaShape:
    """What the builder needs from a Llama config (plus the EMRRG hybrid layers)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    tie_embeddings: bool
    hybrid: dict[int, int] = field(default_factory=dict)        # layer id -> cross-attention heads
    prefix: str = "model."                                      # state-dict prefix of the decoder stack

    @classmethod
    def from_config(cls, c, hybrid: dict[int, int] | None = None) -> "LlamaShape":
        from emrrg.config import rope_theta

        heads = c.num_attention_heads
        rp = getattr(c, "rope_scaling", None) or {}
        rtype = rp.get("rope_type", rp.get("type", "default")) if isinstance(rp, dict) else "default"
        params = getattr(c, "rope_parameters", None) or {}
        rtype = params.get("rope_type", rtype) if isinstance(params, dict) else rtype
        if rtype not in (None, "default"):
            raise BuilderUnsupported(f"rope type {rtype!r} is not built (only plain RoPE)")
        if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            raise BuilderUnsupported("attention or MLP biases are not built")
        if getattr(c, "hidden_act", "silu") != "silu":
            raise BuilderUnsupported(f"activation {c.hidden_act!r} is not built (only SiLU)")
        if getattr(c, "partial_rotary_factor", 1.0) not in (None, 1.0):
            raise BuilderUnsupported("partial rotary is not built")
        return cls(hidden=c.hidden_size, layers=c.num_hidden_layers, heads=heads, kv_heads=c.num_key_value_heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   intermediate=c.intermediate_size, vocab=c.vocab_size, rms_eps=float(c.rms_norm_eps),
                   rope_theta=rope_theta(c) or 10000.0, max_positions=int(c.max_position_embeddings),
                   tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)), hybrid=dict(hybrid or {}))


# ---- streaming external data ------------------------------------------------------------------------------

class _TensorWriter:
    """Appends initializers to `<decoder>.data` as they are made; the ModelProto keeps only their offsets.
    data_path None: every tensor stays inside the protobuf (small graphs such as cross_kv.onnx)."""

    def __init__(self, data_path: Path | None):
        self.path = data_path
        self.f = open(data_path, "wb") if data_path is not None else None
        self.offset = 0
        self.inits: list = []
        self.names: set[str] = set()

    def add(self, arr: np.ndarray, name: str) -> str:
        from onnx import TensorProto, helper

        if name in self.names:
            raise DecoderExportError(f"initializer {name!r} written twice")
        self.names.add(name)
        arr = np.ascontiguousarray(arr)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        if arr.nbytes < INLINE_BELOW_BYTES or self.f is None:
            t.raw_data = arr.tobytes()
        else:
            pad = -self.offset % DATA_ALIGN
            if pad:
                self.f.write(b"\0" * pad)
                self.offset += pad
            self.f.write(memoryview(arr).cast("B"))
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(arr.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self.offset += arr.nbytes
        self.inits.append(t)
        return name

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


# ---- the graph ---------------------------------------------------------------------------------------------

@dataclass
class BuildResult:
    path: Path
    spec: DecoderSpec
    nodes: list[dict]               # one row per weight matmul: name, K, N, bits, rel_err, offset
    node_count: int
    bytes: int
    seconds: float


class _Graph:
    def __init__(self, writer: _TensorWriter, quant: QuantConfig | None, act_stats: dict | None,
                 offset_graph: str = "fused", adapters: "AdapterFactors | None" = None):
        self.w = writer
        # LoRA factors kept as a branch beside the quantized weights (QuantConfig.separate_adapters)
        self.adapters = adapters if (quant is not None and quant.separate_adapters and adapters) else {}
        # AWQ: per-input-channel scales s folded into the producer of a matmul's input (x / s), by matmul name
        self.awq_on = bool(quant is not None and quant.awq_scale and act_stats)
        self.input_scale: dict[str, np.ndarray] = {}
        self.awq_alpha: dict[str, float] = {}
        self.nodes: list = []
        self.quant = quant
        self.act_stats = act_stats
        if offset_graph not in OFFSET_GRAPHS:
            raise QuantizationError(f"offset_graph {offset_graph!r}: choose one of {', '.join(OFFSET_GRAPHS)}")
        self.offset_graph = offset_graph
        self.uses_blocksum_op = False
        self.blocksums: dict[tuple[str, int], str] = {}
        self.report: list[dict] = []
        self.uid = 0

    def name(self, base: str) -> str:
        self.uid += 1
        return f"{base}/{self.uid}"

    def const(self, arr: np.ndarray, base: str) -> str:
        return self.w.add(arr, self.name(base))

    def node(self, op: str, ins: list[str], outs: list[str] | int = 1, name: str | None = None, domain: str = "",
             **attrs) -> list[str]:
        from onnx import helper

        nm = name or self.name(op)
        if isinstance(outs, int):
            outs = [f"{nm}/out{k}" for k in range(outs)]
        self.nodes.append(helper.make_node(op, ins, outs, name=nm, domain=domain or None, **attrs))
        return outs

    def one(self, op: str, ins: list[str], name: str | None = None, domain: str = "", **attrs) -> str:
        return self.node(op, ins, 1, name, domain, **attrs)[0]

    # -- linear layers ---------------------------------------------------------------------------------------
    def linear(self, x: str, w_kn: np.ndarray, name: str, bias: np.ndarray | None = None,
               parts: Sequence[tuple[str, int]] = ()) -> str:
        """x (..., K) @ W (K, N) [+ bias]: MatMul in f32, MatMulNBits when quantized (by `quant`'s plan).

        parts: the HF weights packed side by side in W's columns, (weight name, columns) in order; those with
        LoRA factors in `adapters` keep them as a low-rank f32 branch, the rest of W (the base) is quantized."""
        K, N = w_kn.shape
        bits = 32 if self.quant is None else _plan_bits(name, self.quant)
        lora = self._lora_factors(parts, K, N) if bits != 32 else None
        if lora is not None:
            if name in self.input_scale:                     # the branch reads x / s too: s * A keeps x A B
                lora = (lora[0] * self.input_scale[name][:, None], lora[1])
            w_kn = w_kn - lora[0] @ lora[1]                   # the merged weight less the adapter: the base
        if bits == 32:
            y = self.one("MatMul", [x, self.w.add(np.ascontiguousarray(w_kn, np.float32), f"{name}.weight_t")], name)
            self.report.append({"name": name, "K": K, "N": N, "bits": 32, "rel_err": 0.0, "offset": None})
        else:
            y = self._nbits(x, w_kn, name, bits)
        if lora is not None:
            a, b = (self.w.add(m, f"{name}.lora_{k}") for m, k in zip(lora, ("a", "b")))
            branch = self.one("MatMul", [self.one("MatMul", [x, a], f"{name}/lora_a"), b], f"{name}/lora_b")
            y = self.one("Add", [y, branch], f"{name}/lora_add")
            self.report[-1]["adapter_rank"] = int(lora[0].shape[1])
        if bias is not None:
            y = self.one("Add", [y, self.w.add(bias.astype(np.float32), f"{name}.bias")], f"{name}/bias")
        return y

    def awq(self, name: str, w_kn: np.ndarray) -> np.ndarray | None:
        """AWQ's scales for the matmul `name` (quantize_decoder.awq_scales on its input's E[x^2]), or None when
        scaling is off, the matmul stays 8-bit or f32, or the search keeps alpha 0. The caller folds them: x / s
        into what produces x, s * W into the weight; the matmul's statistics are divided by s^2 here."""
        if not self.awq_on or name not in self.act_stats:
            return None
        bits = _plan_bits(name, self.quant)
        if bits >= 8:
            return None
        s, alpha = awq_scales(w_kn, self.act_stats[name], bits, self.quant)
        if alpha == 0.0:
            return None
        self.input_scale[name], self.awq_alpha[name] = s, alpha
        return s

    def _lora_factors(self, parts: Sequence[tuple[str, int]], K: int, N: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(A (K, R), B (R, N)) with A @ B = the packed adapters' delta of W (K, N), or None without adapters:
        each adapted part p contributes A_p^T (K, r_p) and B_p^T scaled (r_p, N_p) in its own columns."""
        hit = [(w, n) for w, n in parts if w in self.adapters]
        if not hit:
            return None
        R = sum(self.adapters[w][0].shape[0] for w, _ in hit)
        a, b = np.zeros((K, R), np.float32), np.zeros((R, N), np.float32)
        col = row = 0
        for w, n in parts:
            if w in self.adapters:
                A, B = self.adapters[w]                     # (r, K), (n, r) with the LoRA scaling folded in
                r = A.shape[0]
                a[:, row:row + r], b[row:row + r, col:col + n] = A.T, B.T
                row += r
            col += n
        if col != N:
            raise DecoderExportError(f"packed parts cover {col} of {N} columns (a bug in decoder_builder)")
        return a, b

    def _nbits(self, x: str, w_kn: np.ndarray, name: str, bits: int) -> str:
        cfg = self.quant
        h = self.act_stats.get(name) if (cfg.act_weighted and self.act_stats) else None
        stats = self.act_stats.get(name) if self.act_stats else None
        if name in self.input_scale:                         # the matmul reads x / s: E[(x / s)^2] = E[x^2] / s^2
            sc2 = self.input_scale[name].astype(np.float32) ** 2
            h, stats = (None if h is None else h / sc2), stats / sc2
        qw, rel_err = quantize_columns(w_kn, bits, cfg, h, stats)
        fused = (self.offset_graph != "onnx" and qw.correction is not None and qw.K % qw.block_size == 0)
        if fused and self.offset_graph == "fused":
            qw = integer_zero_points(qw)
        ins = [x, self.w.add(qw.packed, f"{name}.weight_q{bits}"), self.w.add(qw.scales, f"{name}.scales")]
        if qw.zero_points is not None:
            if qw.zero_points.dtype != np.uint8:
                raise QuantizationError(f"{name}: non-uint8 zero points are not built")
            ins.append(self.w.add(qw.zero_points, f"{name}.zero_points"))
        attrs = dict(K=qw.K, N=qw.N, bits=qw.bits, block_size=qw.block_size)
        if cfg.accuracy_level:
            attrs["accuracy_level"] = cfg.accuracy_level
        y = self.one("MatMulNBits", ins, name, domain=MS_DOMAIN, **attrs)
        self.report.append({"name": name, "K": qw.K, "N": qw.N, "bits": bits, "rel_err": rel_err,
                            "offset": "blocksum" if qw.correction is not None else None,
                            "awq_alpha": self.awq_alpha.get(name)})
        if qw.correction is not None:
            offsets = self.w.add(qw.correction, f"{name}.block_offsets")
            if fused:                                   # one node (its function body: blocksum_function)
                self.uses_blocksum_op = True
                return self.one(BLOCKSUM_OP_TYPE, [y, x, offsets], f"{name}/offset", OP_DOMAIN,
                                block_size=qw.block_size)
            sums = self._blocksum(x, qw.K, qw.block_size)
            corr = self.one("MatMul", [sums, offsets], f"{name}/offset")
            y = self.one("Add", [y, corr], f"{name}/offset_add")
        return y

    def _blocksum(self, x: str, K: int, bs: int) -> str:
        """x (B, T, K) -> (B, T, K/bs) per-block sums, once per (x, bs): shared by every matmul reading x.
        One MatMul with a 0/1 block-indicator matrix (K, K/bs): a single node, where Reshape + ReduceSum are two
        (and ORT's Reshape copies x when another node reads it too)."""
        key = (x, bs)
        if key not in self.blocksums:
            name = f"block_indicator.{K}x{bs}"         # a last partial block sums what it has (MatMulNBits pads 0s)
            if name not in self.w.names:
                self.w.add(np.repeat(np.eye(-(-K // bs), dtype=np.float32), bs, axis=0)[:K], name)
            self.blocksums[key] = self.one("MatMul", [x, name], self.name(f"{x}/block_sums"))
        return self.blocksums[key]


def quantize_columns(w_kn: np.ndarray, bits: int, cfg: QuantConfig, h: np.ndarray | None,
                     stats: np.ndarray | None) -> tuple[QuantizedWeight, float]:
    """quantize_weight over slices of at most QUANT_CHUNK_ELEMS weights along N (columns are independent), so
    the quantizer's temporaries stay a few times one slice, not a few times the largest matrix (a 7B lm_head
    is 131M weights). Returns the joined weight (no `dequantized`) and the weighted relative error."""
    K, N = w_kn.shape
    step = max(1, QUANT_CHUNK_ELEMS // K)
    parts, num, den = [], 0.0, 0.0
    hh = np.ones(K, np.float32) if stats is None else np.asarray(stats, np.float32)
    for a in range(0, N, step):
        w = np.ascontiguousarray(w_kn[:, a:a + step], np.float32)
        q = quantize_weight(w, bits, cfg.block_size, cfg.method, cfg.refine if bits < 8 else 0, h)
        num += float((hh[:, None] * (w - q.dequantized) ** 2).sum())
        den += float((hh[:, None] * w ** 2).sum())
        q.dequantized = None
        parts.append(q)
    q0 = parts[0]
    join = (lambda xs, ax: None if xs[0] is None else np.concatenate(xs, axis=ax))
    qw = QuantizedWeight(K=K, N=N, bits=bits, block_size=q0.block_size,
                         packed=join([p.packed for p in parts], 0), scales=join([p.scales for p in parts], 0),
                         zero_points=join([p.zero_points for p in parts], 0),
                         correction=join([p.correction for p in parts], 1), dequantized=None)
    return qw, (num / den if den > 0 else 0.0)


OFFSET_GRAPHS = ("fused", "fused_f32", "onnx")


def integer_zero_points(qw: QuantizedWeight) -> QuantizedWeight:
    """A symmetric-form affine weight (w = s (q - 2^(bits-1)) + C, C (nb, N) f32) re-expressed with an integer
    zero point per block, w = s (q - z) + r: z = round(-m / s) clipped to [0, 2^bits), r = m + s z, stored as
    f16 (N, nb) -> (nb, N). |r| <= s/2 wherever z is not clipped, so f16's 2^-11 relative rounding moves each
    weight by at most s/4096 (SmolLM2's grid weights: m is f16 to begin with). Half the bytes of the f32 offsets,
    which decode reads every token (memory-bound): the codes q and scales s are unchanged."""
    half, qmax = 2 ** (qw.bits - 1), 2 ** qw.bits - 1
    s = qw.scales                                                    # (N, nb)
    m = qw.correction.T - half * s                                   # (N, nb): the block offsets (minimum)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
    z = np.clip(np.rint(-m * inv), 0, qmax).astype(np.uint8)
    r = (m + s * z.astype(np.float32)).astype(np.float16)
    return dataclasses.replace(qw, zero_points=pack_zp(z, qw.bits), correction=np.ascontiguousarray(r.T))


def blocksum_function():
    """The model-local function com.emrrg::BlockSumMatMulAdd(A, X, C; block_size) = A + BlockSum(X) @ C in
    standard ONNX, for X of rank 3 (B, T, K) with K a multiple of block_size (the builder emits the node only
    then). ONNX Runtime runs the op library's kernel when the library is registered and inlines this body
    otherwise. The block count comes from C's shape (nb, N), a constant the session folds away:
    Reshape(X, [0, 0, nb, -1]) -> ReduceSum(-1) -> MatMul(Cast(C, f32)) -> Add(A)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Shape", ["C"], ["nb"], start=0, end=1),
             helper.make_node("Constant", [], ["lead"], value_ints=[0, 0]),
             helper.make_node("Constant", [], ["last"], value_ints=[-1]),
             helper.make_node("Concat", ["lead", "nb", "last"], ["blocked_shape"], axis=0),
             helper.make_node("Reshape", ["X", "blocked_shape"], ["blocked"]),
             helper.make_node("ReduceSum", ["blocked", "last"], ["sums"], keepdims=0),
             helper.make_node("Cast", ["C"], ["C32"], to=TensorProto.FLOAT),     # f16 offsets; folded away
             helper.make_node("MatMul", ["sums", "C32"], ["offset"]),
             helper.make_node("Add", ["A", "offset"], ["Y"])]
    return helper.make_function(OP_DOMAIN, BLOCKSUM_OP_TYPE, ["A", "X", "C"], ["Y"], nodes,
                                [helper.make_opsetid("", OPSET)], attributes=["block_size"],
                                doc_string="A + BlockSum(X) @ C: the affine encoding's block-offset correction")


def _rope_caches(shape: LlamaShape) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (max_positions, head_dim/2) as transformers' LlamaRotaryEmbedding computes them (f32)."""
    d = shape.head_dim
    inv = (1.0 / (shape.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))).astype(np.float32)
    ang = np.arange(shape.max_positions, dtype=np.float32)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _hybrid(g: _Graph, src: WeightSource, shape: LlamaShape, i: int, x: str, vis_k: str, vis_v: str) -> str:
    """The gated cross-attention of hybrid layer i (emrrg.decoder.GatedCrossAttention) on the normed x."""
    p = f"{shape.prefix}layers.{i}.cross_attn."
    heads = shape.hybrid[i]
    hd = shape.hidden // heads
    scale = np.float32(hd ** -0.5)
    q = g.linear(x, (src.get(p + "q_proj.weight") * scale).T, f"{p}q_proj")       # softmax scale folded in
    q4 = g.one("Reshape", [q, g.const(np.array([0, 0, heads, hd], np.int64), f"{p}q_shape")])
    qh = g.one("Transpose", [q4], perm=[0, 2, 1, 3])                                  # (B, heads, T, hd)
    kt = g.one("Transpose", [vis_k], perm=[0, 1, 3, 2])                               # (B, heads, hd, Lv)
    probs = g.one("Softmax", [g.one("MatMul", [qh, kt])], axis=-1)
    att = g.one("Transpose", [g.one("MatMul", [probs, vis_v])], perm=[0, 2, 1, 3])    # (B, T, heads, hd)
    att = g.one("Reshape", [att, g.const(np.array([0, 0, shape.hidden], np.int64), f"{p}att_shape")])
    o = g.linear(att, src.get(p + "o_proj.weight").T, f"{p}o_proj")
    gate = g.linear(x, src.get(p + "gate_proj.weight").T, f"{p}gate_proj", bias=src.get(p + "gate_proj.bias"))
    gate = g.one("Mul", [g.one("Sigmoid", [gate]), g.w.add(src.get(p + "gate_scale"), f"{p}gate_scale")])
    return g.one("Mul", [gate, o])


def build_decoder(src: WeightSource, shape: LlamaShape, out_dir: str | Path, spec_extra: dict | None = None, *,
                  quant: QuantConfig | None = None, act_stats: dict[str, np.ndarray] | None = None,
                  all_logits: bool = False, name: str = DECODER_ONNX, offset_graph: str = "fused",
                  adapters: "AdapterFactors | None" = None, verbose: bool = False) -> BuildResult:
    """Write out_dir/<name> (+ <name>.data) from `src`, quantizing per `quant` (None: f32 MatMuls).

    spec_extra: token ids for the metadata (bos/eos/pad_token_id). act_stats: per weight-matmul name (the
    f32 graph's packed names, e.g. model.layers.3.self_attn.qkv_proj) E[x^2], for act-weighted refits.
    all_logits: logits for every position (teacher-forced evaluation) instead of the last one.
    offset_graph: how the affine encoding's float block offsets are written (OFFSET_GRAPHS):
      "fused"     integer zero points in the MatMulNBits and the small rest r = m + s*z as f16, added by one
                  com.emrrg::BlockSumMatMulAdd node per projection (the op library's kernel, or its function body);
      "fused_f32" symmetric MatMulNBits + the f32 offsets m + 8s through the same node;
      "onnx"      symmetric MatMulNBits + block sums (MatMul with a 0/1 indicator) + MatMul + Add (f32).
    adapters: the LLM's LoRA factors (lora_factors(), taken before the merge); used by configurations with
    separate_adapters, which quantize merged - delta (the base) and add the low-rank branch.
    """
    import onnx
    from onnx import TensorProto, helper

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    if quant is not None and quant.worst_k_8bit:
        raise QuantizationError(f"{quant.name}: worst_k_8bit needs the error of every matmul first; build through "
                                "quantized_builder(), which turns it into keep_8bit names")
    spec = builder_spec(shape, spec_extra)
    writer = _TensorWriter(path.with_name(path.name + ".data"))
    g = _Graph(writer, quant, act_stats, offset_graph, adapters)
    P = shape.prefix
    H, I = shape.hidden, shape.intermediate
    try:
        # attention_mask -> seqlens_k (B,) int32 and total_sequence_length (scalar int32) for every layer
        one_axis = g.const(np.array([1], np.int64), "axis1")
        count = g.one("ReduceSum", ["attention_mask", one_axis], "seqlens/sum", keepdims=0)
        seqlens = g.one("Cast", [g.one("Sub", [count, g.const(np.array(1, np.int64), "one")], "seqlens/sub")],
                        "seqlens_k", to=TensorProto.INT32)
        total = g.one("Shape", ["attention_mask"], "total/shape", start=1, end=2)
        total = g.one("Cast", [g.one("Squeeze", [total], "total/squeeze")], "total_sequence_length",
                      to=TensorProto.INT32)
        cos, sin = _rope_caches(shape)
        cos_c, sin_c = g.w.add(cos, "rope.cos_cache"), g.w.add(sin, "rope.sin_cache")
        eps = shape.rms_eps
        residual, x = "inputs_embeds", None
        mlp_out = None
        for i in range(shape.layers):
            L = f"{P}layers.{i}."
            qkv_names = [L + f"self_attn.{p}_proj.weight" for p in ("q", "k", "v")]
            ws = [src.get(n) for n in qkv_names]
            w_qkv, qkv_parts = np.concatenate(ws, axis=0).T, [(n, w.shape[0]) for n, w in zip(qkv_names, ws)]
            del ws
            ln_w = src.get(L + "input_layernorm.weight")
            s_qkv = g.awq(L + "self_attn.qkv_proj", w_qkv) if i not in shape.hybrid else None  # x feeds cross-attn too
            if s_qkv is not None:                      # x / s from the norm, s * W in the matmul
                ln_w, w_qkv = ln_w / s_qkv, w_qkv * s_qkv[:, None]
            ln = g.w.add(ln_w, L + "input_layernorm.weight")
            if i == 0:
                x = g.one("SimplifiedLayerNormalization", [residual, ln], L + "input_layernorm", axis=-1,
                          epsilon=eps, stash_type=1)
            else:
                x, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [mlp_out, residual, ln],
                                           [f"{L}input_layernorm/out", "", "", f"{L}residual_in"],
                                           L + "input_layernorm", MS_DOMAIN, epsilon=eps)
            qkv = g.linear(x, w_qkv, L + "self_attn.qkv_proj", parts=qkv_parts)
            del w_qkv
            attn, _, _ = g.node("GroupQueryAttention",
                                [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total,
                                 cos_c, sin_c],
                                [f"{L}self_attn/out", f"present.{i}.key", f"present.{i}.value"], L + "self_attn",
                                MS_DOMAIN, num_heads=shape.heads, kv_num_heads=shape.kv_heads, do_rotary=1,
                                rotary_interleaved=0, scale=float(shape.head_dim ** -0.5))
            o_name = L + "self_attn.o_proj.weight"
            o = g.linear(attn, src.get(o_name).T, L + "self_attn.o_proj", parts=[(o_name, H)])
            if i in shape.hybrid:
                o = g.one("Add", [o, _hybrid(g, src, shape, i, x, f"visual_kv.{i}.key", f"visual_kv.{i}.value")],
                          L + "cross_attn/add")
            gu_names = [L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"]
            w_gu = np.concatenate([src.get(n) for n in gu_names], axis=0).T
            ln2_w = src.get(L + "post_attention_layernorm.weight")
            down = L + "mlp.down_proj.weight"
            w_down = src.get(down).T if g.awq_on else None
            s_down = g.awq(L + "mlp.down_proj", w_down) if g.awq_on else None
            if s_down is not None:                     # act / s through up's output columns, s * W_down
                w_gu[:, I:] /= s_down[None, :]
                w_down = w_down * s_down[:, None]
            s_gu = g.awq(L + "mlp.gate_up_proj", w_gu)
            if s_gu is not None:
                ln2_w, w_gu = ln2_w / s_gu, w_gu * s_gu[:, None]
            ln2 = g.w.add(ln2_w, L + "post_attention_layernorm.weight")
            x2, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [o, residual, ln2],
                                        [f"{L}post_attention_layernorm/out", "", "", f"{L}residual_mid"],
                                        L + "post_attention_layernorm", MS_DOMAIN, epsilon=eps)
            gu = g.linear(x2, w_gu, L + "mlp.gate_up_proj", parts=[(n, I) for n in gu_names])
            del w_gu
            gate, up = g.node("Split", [gu, g.const(np.array([I, I], np.int64), L + "mlp.split")], 2, L + "mlp/split",
                              axis=-1)
            act = g.one("Mul", [g.one("Mul", [gate, g.one("Sigmoid", [gate], L + "mlp/sigmoid")], L + "mlp/silu"), up],
                        L + "mlp/gated")
            mlp_out = g.linear(act, src.get(down).T if w_down is None else w_down, L + "mlp.down_proj",
                               parts=[(down, H)])
            del w_down
        norm = g.w.add(src.get(P + "norm.weight"), P + "norm.weight")
        final, _, _, _ = g.node("SkipSimplifiedLayerNormalization", [mlp_out, residual, norm],
                                [FINAL_HIDDEN, "", "", ""], P + "norm", MS_DOMAIN, epsilon=eps)
        if not all_logits:
            final = g.one("Slice", [final, g.const(np.array([-1], np.int64), "last/start"),
                                    g.const(np.array([np.iinfo(np.int64).max], np.int64), "last/end"),
                                    g.const(np.array([1], np.int64), "last/axis")], "last_position")
        head = "lm_head.weight" if src.has("lm_head.weight") and not shape.tie_embeddings else P + "embed_tokens.weight"
        g.nodes.append(helper.make_node("Identity", [g.linear(final, src.get(head).T, LM_HEAD)], ["logits"],
                                        name="logits"))
    finally:
        writer.close()

    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", H]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq" if all_logits else 1, shape.vocab])]
    for i in range(shape.layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", f32,
                                                        ["batch", shape.kv_heads, "past", shape.head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32,
                                                         ["batch", shape.kv_heads, "present", shape.head_dim]))
    for j in sorted(shape.hybrid):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"visual_kv.{j}.{kv}", f32,
                                                        ["batch", shape.hybrid[j], "visual_len", H // shape.hybrid[j]]))
    graph = helper.make_graph(g.nodes, "emrrg_decoder", inputs, outputs, writer.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    functions = []
    if g.uses_blocksum_op:
        opsets.append(helper.make_opsetid(OP_DOMAIN, OP_VERSION))
        functions.append(blocksum_function())
    model = helper.make_model(graph, opset_imports=opsets, functions=functions,
                              producer_name="emrrg.export.decoder_builder")
    model.ir_version = 10
    meta = spec.to_dict()
    if quant is not None:
        meta["quantization"] = {"config": quant.to_dict(), "format": "MatMulNBits"}
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, json.dumps(v)
    onnx.save_model(model, str(path))
    if [i.name for i in model.graph.input] != spec.input_names or [o.name for o in model.graph.output] != spec.output_names:
        raise DecoderExportError("built I/O does not match the spec (a bug in decoder_builder)")
    data = path.with_name(path.name + ".data")
    res = BuildResult(path=path, spec=spec, nodes=g.report, node_count=len(g.nodes),
                      bytes=path.stat().st_size + data.stat().st_size, seconds=time.time() - t0)
    if verbose:
        print(f"[builder] {path.name}: {res.node_count} nodes, {res.bytes / 2**20:.1f} MiB in {res.seconds:.1f}s")
    return res


def builder_spec(shape: LlamaShape, extra: dict | None = None) -> DecoderSpec:
    hy = sorted(shape.hybrid)
    return DecoderSpec(num_layers=shape.layers, num_heads=shape.heads, kv_heads=shape.kv_heads,
                       head_dim=shape.head_dim, hidden=shape.hidden, vocab=shape.vocab, hybrid_layers=hy,
                       hybrid_heads=[shape.hybrid[j] for j in hy], hybrid_head_dim=[shape.hidden // shape.hybrid[j] for j in hy],
                       rope_theta=shape.rope_theta, max_position_embeddings=shape.max_positions,
                       format_version=BUILDER_FORMAT_VERSION, cache=CACHE_SHARED, **(extra or {}))


def with_all_logits(path: str | Path, out: str | Path | None = None) -> Path:
    """A copy of a built decoder's graph whose logits cover every position (for teacher-forced scoring).

    Only the .onnx protobuf is rewritten (the Slice before lm_head dropped); it points at the same
    external-data file, so `out` must be in the same folder. Default: <name>.all_logits.onnx.
    """
    import onnx

    path = Path(path)
    out = Path(out) if out else path.with_name(path.stem + ".all_logits.onnx")
    if out.exists() and out.stat().st_mtime >= path.stat().st_mtime:
        return out
    if out.parent.resolve() != path.parent.resolve():
        raise DecoderExportError("the all-positions variant must sit next to its decoder (shared external data)")
    m = onnx.load(str(path), load_external_data=False)
    sl = [n for n in m.graph.node if n.name == "last_position"]
    if sl:
        src, dst = sl[0].input[0], sl[0].output[0]
        m.graph.node.remove(sl[0])
        for n in m.graph.node:
            for k, v in enumerate(n.input):
                if v == dst:
                    n.input[k] = src
        m.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "seq"
    onnx.save_model(m, str(out))
    return out


# ---- the hybrid layers' visual K/V ------------------------------------------------------------------------

def build_cross_kv(src: WeightSource, shape: LlamaShape, out_dir: str | Path) -> Path | None:
    """cross_kv.onnx: visual_tokens (B, Lv, H) -> visual_kv.{j}.key/value (B, heads_j, Lv, hd_j), f32 MatMuls."""
    import onnx
    from onnx import TensorProto, helper

    if not shape.hybrid:
        return None
    out = Path(out_dir) / CROSS_KV_ONNX
    writer = _TensorWriter(None)             # K/V projections of a few layers: one file, inside the 2 GB limit
    g = _Graph(writer, None, None)
    outs = []
    try:
        for j in sorted(shape.hybrid):
            p = f"{shape.prefix}layers.{j}.cross_attn."
            heads = shape.hybrid[j]
            shp = g.const(np.array([0, 0, heads, shape.hidden // heads], np.int64), f"{p}shape")
            for kv in ("key", "value"):
                y = g.linear("visual_tokens", src.get(p + f"{kv[0]}_proj.weight").T, f"{p}{kv[0]}_proj")
                g.nodes.append(helper.make_node("Transpose", [g.one("Reshape", [y, shp])], [f"visual_kv.{j}.{kv}"],
                                                perm=[0, 2, 1, 3], name=g.name("Transpose")))
                outs.append(helper.make_tensor_value_info(f"visual_kv.{j}.{kv}", TensorProto.FLOAT,
                                                          ["batch", heads, "visual_len", shape.hidden // heads]))
    finally:
        writer.close()
    graph = helper.make_graph(g.nodes, "emrrg_cross_kv",
                              [helper.make_tensor_value_info("visual_tokens", TensorProto.FLOAT,
                                                             ["batch", "visual_len", shape.hidden])], outs, writer.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    for k, v in {"format": DECODER_FORMAT + "-cross-kv", "format_version": BUILDER_FORMAT_VERSION,
                 "hybrid_layers": sorted(shape.hybrid)}.items():
        p = model.metadata_props.add()
        p.key, p.value = k, json.dumps(v)
    onnx.save_model(model, str(out))
    return out


# ---- the exporter entry point (same result type as the traced exporter) --------------------------------------

def _module_shape(llm, min_positions: int = 0) -> LlamaShape:
    """The builder's shape of a transformers Llama; the rotary tables cover at least `min_positions`."""
    from emrrg.export.decoder_onnx import _hybrid_modules

    shape = LlamaShape.from_config(llm.config, {i: x.heads for i, x in _hybrid_modules(llm)})
    return dataclasses.replace(shape, max_positions=max(shape.max_positions, int(min_positions)))


def save_embed_table(src: WeightSource, shape: LlamaShape, out_dir: str | Path) -> Path:
    out = Path(out_dir) / EMBED_TOKENS_NPY
    np.save(out, np.ascontiguousarray(src.get(shape.prefix + "embed_tokens.weight"), np.float32))
    return out


def export_decoder_built(llm, out_dir: str | Path, *, tokenizer=None, validate: bool = True, verbose: bool = True,
                         min_positions: int = 0, **tol) -> DecoderExport:
    """The builder's f32 decoder for an in-memory (merged) LlamaForCausalLM: decoder.onnx (+ .data),
    embed_tokens.npy, cross_kv.onnx for hybrid decoders, validated against PyTorch f32 like the traced one."""
    from emrrg.export.decoder_onnx import decoder_spec, validate_decoder

    if hasattr(llm, "merge_and_unload") or hasattr(llm, "peft_config"):
        raise DecoderExportError("the decoder still carries peft LoRA; merge it first (EMRRG.merge_adapters() "
                                 "or llm.merge_and_unload())")
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = _module_shape(llm, min_positions)
    ids = decoder_spec(llm, tokenizer)
    src = ModuleWeights(llm)
    res = build_decoder(src, shape, out_dir, token_ids(ids), verbose=verbose)
    cross = build_cross_kv(src, shape, out_dir)
    embed = save_embed_table(src, shape, out_dir)
    result = DecoderExport(decoder=res.path, embed_tokens=embed, cross_kv=cross, spec=res.spec, bytes={}, validation={},
                           export_s=time.time() - t0)
    result.bytes = {k: p.stat().st_size for k, p in result.files().items()}
    if validate:
        was = llm.training
        llm.eval()
        try:
            result.validation = validate_decoder(result, llm, verbose=verbose, **tol)
        finally:
            llm.train(was)
    return result


def token_ids(spec: DecoderSpec) -> dict:
    return {"bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id, "pad_token_id": spec.pad_token_id}


# ---- 4-bit: one build per ladder rung ------------------------------------------------------------------------

# The built graph's ladder is quantize_decoder.DEFAULT_LADDER: uint4 asymmetric (integer zero points) first,
# its activation-weighted clipping refit, then the affine encodings that are exact on a block-32 grid, refits,
# 8-bit fallbacks. quantized_builder skips the asymmetric 4-bit rungs, without building or scoring them, for
# weights already on a 4-bit block grid (on_block_grid), which they can only re-round.
BUILT_LADDER: tuple[QuantConfig, ...] = DEFAULT_LADDER
GRID_REL_ERR = 1e-8       # affine re-encoding error (relative, squared) below which a matrix counts as on a grid:
                          # f32 rounding of grid weights gives ~1e-14, any off-grid 4-bit fit ~1e-3 or more


def on_block_grid(src: WeightSource, shape: LlamaShape, bits: int = 4, block_size: int = 32) -> bool:
    """True when most weight matrices of three sampled layers (first, middle, last) re-encode exactly in the
    affine `bits`-bit encoding of `block_size` blocks, i.e. the model was de-quantized from such a grid (a GGUF
    Q4_0/Q4_1 model, SmolLM2 as shipped). Reads and quantizes ~3/L of the weights: seconds for SmolLM2, far less
    than one rung's build and teacher-forced evaluation."""
    picked = sorted({0, shape.layers // 2, shape.layers - 1})
    exact = total = 0
    for name, w in iter_matmul_weights(src, shape, layers=picked, lm_head=False):
        q = quantize_weight(w, bits, block_size, "affine")
        total += 1
        exact += weighted_rel_error(w, q.dequantized) <= GRID_REL_ERR
    return total > 0 and exact * 2 > total


def grid_skipper(src: WeightSource, shape: LlamaShape) -> Callable[[QuantConfig, Sequence[QuantConfig]], str | None]:
    """skip(config, later_rungs) for choose_decoder_config: a reason to skip a 4-bit asym/sym rung when the weights
    are on a 4-bit block grid and an affine rung of that block size comes later (the grid check runs once, on the
    first such rung)."""
    seen: dict[tuple[int, int], bool] = {}

    def skip(cfg: QuantConfig, later: Sequence[QuantConfig]) -> str | None:
        if cfg.bits != 4 or cfg.method not in ("asym", "sym"):
            return None
        if not any(c.method == "affine" and c.bits == 4 and c.block_size == cfg.block_size for c in later):
            return None
        key = (cfg.bits, cfg.block_size)
        if key not in seen:
            seen[key] = on_block_grid(src, shape, cfg.bits, cfg.block_size)
        return (f"weights on a {cfg.bits}-bit block-{cfg.block_size} grid: this rung re-rounds them, the affine "
                "rung later re-encodes them exactly") if seen[key] else None

    return skip


def quantized_builder(src: WeightSource, shape: LlamaShape, spec_extra: dict | None = None,
                      adapters: AdapterFactors | None = None) -> Callable[..., "object"]:
    """quantize(config, out_dir, act_stats) for choose_decoder_config: builds the quantized decoder from the
    weights (worst_k_8bit resolved by a first pass over the per-matmul errors). adapters: the LLM's LoRA
    factors (lora_factors()), for the rungs that keep them separate; without them those rungs are skipped."""
    from emrrg.export.quantize_decoder import QuantizeResult, onnx_bytes

    def quantize(cfg: QuantConfig, out_dir: Path, act_stats: dict | None = None) -> QuantizeResult:
        t0 = time.time()
        out_dir = Path(out_dir)
        plan = cfg
        if cfg.worst_k_8bit and cfg.bits < 8:
            errs = weight_errors(src, shape, cfg, act_stats)
            worst = sorted((k for k, (b, _) in errs.items() if b == cfg.bits), key=lambda k: -errs[k][1])
            from dataclasses import replace
            plan = replace(cfg, worst_k_8bit=0, keep_8bit=tuple(cfg.keep_8bit) + tuple(worst[:cfg.worst_k_8bit]))
        res = build_decoder(src, shape, out_dir, spec_extra, quant=plan, act_stats=act_stats, adapters=adapters)
        f32_bytes = sum(r["K"] * r["N"] * 4 for r in res.nodes)
        return QuantizeResult(path=res.path, config=cfg, bytes=onnx_bytes(res.path), f32_bytes=f32_bytes,
                              nodes=res.nodes, seconds=time.time() - t0)

    grid = grid_skipper(src, shape)

    def skip(cfg: QuantConfig, later: Sequence[QuantConfig]) -> str | None:
        if cfg.separate_adapters and not adapters:
            return "no LLM LoRA adapters to keep separate (the checkpoint has none)"
        return grid(cfg, later)

    quantize.skip = skip
    return quantize


def weight_errors(src: WeightSource, shape: LlamaShape, cfg: QuantConfig, act_stats: dict | None
                  ) -> dict[str, tuple[int, float]]:
    """(bits, weighted relative error) of every weight matmul the builder writes, under `cfg` (no file)."""
    out = {}
    for name, w in iter_matmul_weights(src, shape):
        bits = _plan_bits(name, cfg)
        if bits == 32:
            continue
        h = act_stats.get(name) if (cfg.act_weighted and act_stats) else None
        out[name] = (bits, quantize_columns(w, bits, cfg, h, act_stats.get(name) if act_stats else None)[1])
    return out


def iter_matmul_weights(src: WeightSource, shape: LlamaShape, layers: Sequence[int] | None = None,
                        lm_head: bool = True):
    """(name, (K, N) f32) for every weight matmul (of `layers`, default all), in the builder's packing and names."""
    P = shape.prefix
    for i in (range(shape.layers) if layers is None else layers):
        L = f"{P}layers.{i}."
        yield L + "self_attn.qkv_proj", np.concatenate([src.get(L + f"self_attn.{p}_proj.weight")
                                                        for p in ("q", "k", "v")], axis=0).T
        yield L + "self_attn.o_proj", src.get(L + "self_attn.o_proj.weight").T
        if i in shape.hybrid:
            for p in ("q_proj", "o_proj", "gate_proj"):
                yield f"{L}cross_attn.{p}", src.get(f"{L}cross_attn.{p}.weight").T
        yield L + "mlp.gate_up_proj", np.concatenate([src.get(L + "mlp.gate_proj.weight"),
                                                      src.get(L + "mlp.up_proj.weight")], axis=0).T
        yield L + "mlp.down_proj", src.get(L + "mlp.down_proj.weight").T
    if lm_head:
        head = "lm_head.weight" if src.has("lm_head.weight") and not shape.tie_embeddings else P + "embed_tokens.weight"
        yield LM_HEAD, src.get(head).T
