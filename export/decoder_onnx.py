"""Export the report-writing LLM (a LoRA-merged LlamaForCausalLM) to ONNX with a KV cache.

Why not optimum-onnx: optimum-onnx 0.1.0 pins ``transformers<4.58`` and ``optimum~=2.1.0``, and this
project runs transformers 5.x throughout (4.57 silently misreads 5.x configs: SmolLM2's rope_theta
100000 comes back as 10000). So we export with ``torch.onnx.export(dynamo=True)`` through a small
wrapper module (`DecoderWithCache`) that takes the past K/V as flat tensors and builds a
transformers ``DynamicCache`` from them.

THE CONTRACT (what the torch-free runtime relies on; `DECODER_FORMAT_VERSION` guards it)
========================================================================================

``decoder.onnx`` (initializers in ``decoder.onnx.data`` when the weights exceed
`EXTERNAL_DATA_ABOVE_BYTES`). L = num_layers, B/T/P are all dynamic (P may be 0):

    inputs
      inputs_embeds                     (B, T, hidden)              float32
      attention_mask                    (B, P+T)                    int64   1 = attend, 0 = padding
      position_ids                      (B, T)                      int64   P, P+1, ... for an unpadded row
      past_key_values.{i}.key           (B, kv_heads, P, head_dim)  float32   i = 0 .. L-1
      past_key_values.{i}.value         (B, kv_heads, P, head_dim)  float32
      visual_kv.{j}.key                 (B, heads_j, Lv, hd_j)      float32   hybrid decoders only,
      visual_kv.{j}.value               (B, heads_j, Lv, hd_j)      float32   j = hybrid layer ids, ascending
    outputs
      logits                            (B, T, vocab)               float32
      present.{i}.key                   (B, kv_heads, P+T, head_dim) float32  i = 0 .. L-1
      present.{i}.value                 (B, kv_heads, P+T, head_dim) float32

  Inputs and outputs appear in exactly this order. The first call of a generation feeds P = 0
  (past tensors of shape (B, kv_heads, 0, head_dim)); every later call feeds the previous
  ``present.*`` back as ``past_key_values.*``. ``visual_kv`` must have the same B as
  ``inputs_embeds``: with beams, repeat each image's K/V once per beam (np.repeat on axis 0).

``embed_tokens.npy``: the input embedding table (vocab, hidden) float32. The runtime builds
``inputs_embeds`` itself, so it can splice the projected visual tokens into the prompt
(BOS + "Human: <Img>" + visual tokens + "</Img> ... \\nAssistant:", see emrrg.model).

``cross_kv.onnx`` (hybrid decoders only): ``visual_tokens`` (B, Lv, hidden) float32 ->
``visual_kv.{j}.key`` / ``visual_kv.{j}.value`` (B, heads_j, Lv, hd_j) for every hybrid layer j,
in the order above. Run it once per image; feed its outputs to every decoder call.

Metadata: `DecoderSpec.to_dict()`, returned by `export_decoder` for the bundle manifest and also
stored in decoder.onnx's ``metadata_props``, one key per field, each value JSON-encoded
(``json.loads(sess.get_modelmeta().custom_metadata_map["num_layers"])``). Keys: format,
format_version, num_layers, num_heads, kv_heads, head_dim, hidden, vocab, hybrid_layers,
hybrid_heads, hybrid_head_dim, bos_token_id, eos_token_id, pad_token_id, rope_theta,
max_position_embeddings, input_names, output_names.

The lm_head is always a weight of its own inside decoder.onnx (SmolLM2 ties it to the embedding),
stored as a plain (hidden, vocab) MatMul initializer so that the 4-bit quantizer reaches it.
Every weight MatMul is renamed after its torch module (node ``model.layers.3.mlp.down_proj``,
initializer ``model.layers.3.mlp.down_proj.weight_t``), which is how `quantize_decoder`'s
``keep_fp`` patterns and per-layer reports name them. The module comes from the exporter's own
per-node metadata (`NAME_SCOPES_KEY`), read before the rest of that metadata is dropped.

Every export ends with `validate_decoder`: ORT vs the PyTorch f32 model for a prefill and two
incremental decode steps through the cache (and through cross_kv.onnx for hybrid decoders).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from emrrg.config import rope_theta
from emrrg.runtime import contract as C
from emrrg.export.errors import ExportError, ValidationError

DECODER_FORMAT = "emrrg-decoder-onnx"
DECODER_FORMAT_VERSION = 1
# file and I/O names: the bundle contract's (emrrg.runtime.contract), under this module's older names
DECODER_ONNX, CROSS_KV_ONNX, EMBED_TOKENS_NPY = C.DECODER_FILE, C.CROSS_KV_FILE, C.EMBED_TOKENS_FILE
OPSET = 18
EXTERNAL_DATA_ABOVE_BYTES = 512 * 2**20  # inline protobufs stay well under the 2 GB limit and load fast

# ORT f32 vs PyTorch f32 logits. Both run the same f32 graph; they differ only in summation order
# (MLAS vs oneDNN GEMM blocking, a fused vs decomposed softmax). The per-op relative error is ~1e-7;
# over 30 layers with RMSNorms and logits of magnitude ~30 it grows to ~1e-5 relative: SmolLM2-135M
# measures 2-4e-4 max |diff| on a 7-token prefill of random ids and ~1e-4 on decode steps; a trained,
# LoRA-merged SmolLM2 (stage 6's demo checkpoint, max |logit| 35) amplifies the prefill rounding to 3.7e-3
# (repeat_kv attention graph) and 5.6e-3 (the grouped attention graph), decode steps still ~7e-5.
# A real export bug (wrong mask, rope offset, cache order) shows up at >= 1e-1. So: 1e-3 absolute plus
# 2.5e-4 relative to the largest |logit| (~1e-2 for SmolLM2: 1.7x the worst rounding measured, 10x below a bug).
LOGITS_ATOL = 1e-3
LOGITS_RTOL = 2.5e-4
KV_ATOL = 1e-4  # K/V: same argument, one projection deep; scaled by max|K| when that exceeds 1


class DecoderExportError(ExportError):
    """The decoder could not be exported in the form the runtime contract needs."""


class DecoderValidationError(DecoderExportError, ValidationError):
    """The exported ONNX does not reproduce the PyTorch f32 reference within tolerance."""


# ---- the contract, as data ------------------------------------------------------------------------

@dataclass
class DecoderSpec(C.DecoderIO):
    """Everything the runtime needs to drive decoder.onnx (goes into the manifest and metadata_props): the
    contract's DecoderIO (sizes, hybrid layers, cache kind and the input/output names they fix) and what only
    the exporter records."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    rope_theta: float | None = None
    max_position_embeddings: int | None = None
    format: str = DECODER_FORMAT
    format_version: int = DECODER_FORMAT_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_names"] = self.input_names
        d["output_names"] = self.output_names
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DecoderSpec":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """P = 0 past tensors for the first call."""
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {n: z for n in self.past_names}


def _hybrid_modules(llm) -> list[tuple[int, object]]:
    from emrrg.decoder import decoder_layers

    return [(i, layer.cross_attn) for i, layer in enumerate(decoder_layers(llm)) if hasattr(layer, "cross_attn")]


def decoder_spec(llm, tokenizer=None) -> DecoderSpec:
    """The contract's numbers for a (merged) LlamaForCausalLM; token ids from the tokenizer when given."""
    c = llm.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    hyb = _hybrid_modules(llm)

    def tid(name):
        v = getattr(tokenizer, name, None) if tokenizer is not None else None
        v = getattr(c, name, None) if v is None else v
        return int(v[0] if isinstance(v, (list, tuple)) else v) if v is not None else None

    return DecoderSpec(
        num_layers=c.num_hidden_layers, num_heads=heads, kv_heads=c.num_key_value_heads, head_dim=head_dim,
        hidden=c.hidden_size, vocab=c.vocab_size,
        hybrid_layers=[i for i, _ in hyb], hybrid_heads=[x.heads for _, x in hyb],
        hybrid_head_dim=[c.hidden_size // x.heads for _, x in hyb],
        bos_token_id=tid("bos_token_id"), eos_token_id=tid("eos_token_id"), pad_token_id=tid("pad_token_id"),
        rope_theta=rope_theta(c), max_position_embeddings=getattr(c, "max_position_embeddings", None),
    )


# ---- export-only rewrites ---------------------------------------------------------------------------

@contextlib.contextmanager
def untied_lm_head(llm) -> Iterator[None]:
    """Give lm_head a Parameter of its own for the duration of the export.

    Avoids: with ``tie_word_embeddings`` the lm_head weight *is* the embedding Parameter. Exporters
    that keep the embedding in the graph then emit the lm_head as ``Transpose(embedding)`` feeding a
    MatMul, and the MatMulNBits quantizer skips any MatMul whose B is not a plain initializer, so the
    largest matrix of a small LM (28M of SmolLM2's 135M parameters) stays f32. A separate copy is
    exported as its own (hidden, vocab) initializer and can be quantized independently.
    """
    import torch

    head = llm.get_output_embeddings()
    tied = head.weight is llm.get_input_embeddings().weight
    original = head.weight
    if tied:
        head.weight = torch.nn.Parameter(original.detach().clone(), requires_grad=False)
    try:
        yield
    finally:
        if tied:
            head.weight = original


GQA_ATTENTION = "emrrg_gqa_export"


def grouped_query_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for the exported graph: each KV head serves its group of query heads through a reshape of
    the queries, instead of transformers' repeat_kv, which the exporter turns into an Expand + Reshape
    that copies the whole K/V cache num_heads / kv_heads times on every decode step (plus a transpose of
    the copy). Same arithmetic: scores = q k^T * scaling + mask, softmax, @ v, per (batch, head).

    query (B, H, T, D), key / value (B, KVH, S, D), attention_mask additive (B, 1, T, S) or None.
    Returns (B, T, H, D) and no weights, as transformers' attention functions do.
    """
    import torch

    b, h, t, d = query.shape
    kvh, s = key.shape[1], key.shape[2]
    g = h // kvh
    scale = d ** -0.5 if scaling is None else scaling
    q = query.reshape(b, kvh, g * t, d)                               # head h = kv * g + r (repeat_kv's order)
    scores = torch.matmul(q, key.transpose(2, 3)) * scale              # (B, KVH, G*T, S)
    if attention_mask is not None:
        scores = (scores.view(b, kvh, g, t, s) + attention_mask[:, :, None, :, :s]).view(b, kvh, g * t, s)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)                                   # (B, KVH, G*T, D)
    return out.view(b, h, t, d).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def export_attention(llm) -> Iterator[None]:
    """Run the LLM's self-attention through grouped_query_attention (additive float mask) while exporting."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    AttentionInterface.register(GQA_ATTENTION, grouped_query_attention)
    if GQA_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(GQA_ATTENTION, eager_mask)
    configs = {id(c): c for c in (llm.config, getattr(llm.config, "text_config", None)) if c is not None}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = GQA_ATTENTION
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


@contextlib.contextmanager
def visual_kv_from_inputs(hybrid: Sequence[tuple[int, object]], kv: Sequence) -> Iterator[None]:
    """Point each hybrid layer's cached visual K/V at graph inputs while tracing.

    Avoids: the hybrid hook (emrrg.decoder._hybrid_hook) reads ``cross_attn.visual_kv``, which
    ``EMRRG.set_visual`` fills from the image in eager mode. Without this the trace either fails
    ("hybrid decoder layer used before set_visual") or bakes one image's K/V in as constants. The
    previous values are restored afterwards so an eager model in use is left as it was.
    """
    saved = [x.visual_kv for _, x in hybrid]
    try:
        for n, (_, x) in enumerate(hybrid):
            x.visual_kv = (kv[2 * n], kv[2 * n + 1])
        yield
    finally:
        for (_, x), s in zip(hybrid, saved):
            x.visual_kv = s


def _torch_module():
    import torch.nn as nn

    return nn.Module


def cache_kwarg(model, cache) -> dict:
    """{'cache': cache} on transformers >= 5.2x (which renamed it), else {'past_key_values': cache}."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


class DecoderWithCache(_torch_module()):
    """Flat-tensor facade over a LlamaForCausalLM: the signature decoder.onnx exposes.

    forward(inputs_embeds (B,T,H), attention_mask (B,P+T), position_ids (B,T), past (2L tensors
    (B,kvh,P,hd)), visual_kv (2 per hybrid layer)) -> (logits (B,T,V), *present (2L tensors
    (B,kvh,P+T,hd))).
    """

    def __init__(self, llm):
        super().__init__()
        self.llm = llm
        self.num_layers = llm.config.num_hidden_layers
        self.hybrid = _hybrid_modules(llm)

    def forward(self, inputs_embeds, attention_mask, position_ids, past: tuple, visual_kv: tuple = ()):
        from transformers import DynamicCache

        L = self.num_layers
        if len(past) != 2 * L or len(visual_kv) != 2 * len(self.hybrid):
            raise DecoderExportError(f"expected {2 * L} past tensors and {2 * len(self.hybrid)} visual K/V, "
                                     f"got {len(past)} and {len(visual_kv)}")
        # DynamicLayer.update concatenates onto the (possibly empty, P = 0) past along the sequence axis.
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(L)])
        with visual_kv_from_inputs(self.hybrid, visual_kv):
            out = self.llm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=True, **cache_kwarg(self.llm.model, cache))
        logits = self.llm.lm_head(out.last_hidden_state)                     # (B, T, V)
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]                            # (B, kvh, P+T, hd) each
        return (logits, *present)


class CrossKV(_torch_module()):
    """visual_tokens (B, Lv, H) -> K, V (B, heads_j, Lv, hd_j) for every hybrid layer j (cross_kv.onnx)."""

    def __init__(self, llm):
        super().__init__()
        import torch.nn as nn

        self.xattn = nn.ModuleList([x for _, x in _hybrid_modules(llm)])

    def forward(self, visual_tokens):
        out = []
        for x in self.xattn:
            out += list(x.compute_kv(visual_tokens))
        return tuple(out)


# ---- export -------------------------------------------------------------------------------------------

@dataclass
class DecoderExport:
    """What `export_decoder` wrote, and how it validated."""

    decoder: Path
    embed_tokens: Path
    cross_kv: Path | None
    spec: DecoderSpec
    bytes: dict[str, int]
    validation: dict
    export_s: float

    def manifest(self) -> dict:
        return {"spec": self.spec.to_dict(), "files": {k: str(v) for k, v in self.files().items()},
                "bytes": self.bytes, "validation": self.validation, "export_s": round(self.export_s, 1)}

    def files(self) -> dict[str, Path]:
        f = {"decoder": self.decoder, "embed_tokens": self.embed_tokens}
        data = self.decoder.with_name(self.decoder.name + ".data")
        if data.exists():
            f["decoder_data"] = data
        if self.cross_kv is not None:
            f["cross_kv"] = self.cross_kv
        return f


def save_embed_tokens(llm, out_dir: str | Path) -> Path:
    """Write the input embedding table as embed_tokens.npy, (vocab, hidden) float32."""
    out = Path(out_dir) / EMBED_TOKENS_NPY
    out.parent.mkdir(parents=True, exist_ok=True)
    w = llm.get_input_embeddings().weight.detach().float().cpu().numpy()
    np.save(out, np.ascontiguousarray(w))
    return out


def _example_inputs(spec: DecoderSpec, B=2, T=3, P=4, Lv=5, seed=0):
    """Trace-time example: every dynamic dim >= 2 (torch.export specializes sizes 0 and 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(B, T, spec.hidden, generator=g) * 0.02
    mask = torch.ones(B, P + T, dtype=torch.long)
    pos = torch.arange(P, P + T).expand(B, T).contiguous()
    past = tuple(torch.randn(B, spec.kv_heads, P, spec.head_dim, generator=g) for _ in range(2 * spec.num_layers))
    vis = tuple(torch.randn(B, h, Lv, d, generator=g) for h, d in zip(spec.hybrid_heads, spec.hybrid_head_dim)
                for _ in range(2))
    return embeds, mask, pos, past, vis


# torch.onnx (dynamo=True) tags every node with the module path it was traced in; onnxscript's optimize=True
# keeps the tag (checked with torch 2.13 / onnxscript 0.7.2: every weight MatMul of tests/export's tiny Llama,
# q/k/v/o, gate/up/down and lm_head, carries it after optimization). Looks like "['', 'llm.model',
# 'llm.model.layers.0', 'llm.model.layers.0.self_attn', 'llm.model.layers.0.self_attn.q_proj', 'linear']".
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def _linear_names(wrapper, llm) -> dict[str, str]:
    """Module path inside the exported wrapper -> name in llm, for every torch Linear of llm
    (DecoderWithCache's ``llm.model.layers.0.mlp.up_proj`` -> ``model.layers.0.mlp.up_proj``)."""
    import torch

    own = {id(m): name for name, m in llm.named_modules() if isinstance(m, torch.nn.Linear)}
    return {name: own[id(m)] for name, m in wrapper.named_modules() if id(m) in own}


def _name_weight_matmuls(model, names: dict[str, str]) -> int:
    """Rename each weight MatMul and its (K, N) initializer after the torch Linear it came from: the innermost
    of the node's name scopes (NAME_SCOPES_KEY) that `names` (from _linear_names) knows."""
    import ast

    inits = {t.name: t for t in model.graph.initializer}
    used, rename = set(), {}
    for node in model.graph.node:
        t = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if t is None or len(t.dims) != 2:
            continue
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == NAME_SCOPES_KEY), None)
        if scopes is None:
            raise DecoderExportError(f"MatMul {node.name} has no {NAME_SCOPES_KEY} metadata: this torch.onnx does "
                                     "not record module names; export with torch.onnx.export(dynamo=True) of torch 2.13")
        mod = next((names[sc] for sc in reversed(scopes) if sc in names), None)
        if mod is None or mod in used:
            continue
        used.add(mod)
        node.name = mod
        if node.input[1] not in rename:  # equal weights share one initializer (the optimizer merges them)
            rename[node.input[1]] = f"{mod}.weight_t"
            t.name = rename[node.input[1]]
    for n in model.graph.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
    return len(used)


def _finish_onnx(src: Path, dst: Path, names: dict[str, str], meta: dict | None) -> None:
    """Name weight MatMuls, attach metadata, save with external data when large."""
    import onnx

    model = onnx.load(str(src))
    _name_weight_matmuls(model, names)
    for node in model.graph.node:  # the exporter's per-node stack traces: ~2 KB a node, no use at runtime
        del node.metadata_props[:]
    if meta:
        del model.metadata_props[:]
        for k, v in meta.items():
            p = model.metadata_props.add()
            p.key, p.value = k, json.dumps(v)
    save_onnx(model, dst)


def needs_external_data(model) -> bool:
    """True when the initializers exceed EXTERNAL_DATA_ABOVE_BYTES (save_onnx then writes them to ``.data``)."""
    return sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_ABOVE_BYTES


def save_onnx(model, dst: str | Path, external: bool | None = None) -> Path:
    """The one ONNX saver of the export (the encoder's save_model and the quantizers call it): initializers go
    to ``<name>.data`` when they exceed EXTERNAL_DATA_ABOVE_BYTES (or when ``external``); a stale ``.data`` goes."""
    import onnx

    dst = Path(dst)
    data = dst.with_name(dst.name + ".data")
    if data.exists():
        data.unlink()
    if external is None:
        external = needs_external_data(model)
    if external:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
    return dst


def _onnx_export(module, args, input_names, output_names, dynamic_shapes, tmp: Path) -> Path:
    import torch

    module.eval()
    prog = torch.onnx.export(module, args, input_names=input_names, output_names=output_names,
                             dynamic_shapes=dynamic_shapes, dynamo=True, optimize=True, opset_version=OPSET,
                             verbose=False)
    prog.save(str(tmp), external_data=True)
    return tmp


def export_decoder(llm, out_dir: str | Path, *, tokenizer=None, validate: bool = True,
                   atol: float = LOGITS_ATOL, rtol: float = LOGITS_RTOL, verbose: bool = True) -> DecoderExport:
    """Export a (LoRA-merged) LlamaForCausalLM to out_dir/decoder.onnx (+ embed_tokens.npy, cross_kv.onnx).

    llm: f32 LlamaForCausalLM, possibly with EMRRG hybrid layers; a peft model must be merged first
    (EMRRG.merge_adapters) -- exporting the unmerged LoRA branch would ship 2x the matmuls.
    Returns a DecoderExport (paths, spec, byte counts, validation figures). Raises DecoderValidationError
    when ORT and PyTorch disagree beyond (atol + rtol * max|logit|).
    """
    import tempfile

    import torch

    if hasattr(llm, "merge_and_unload") or hasattr(llm, "peft_config"):
        raise DecoderExportError("the decoder still carries peft LoRA; merge it first (EMRRG.merge_adapters() "
                                 "or llm.merge_and_unload())")
    if not hasattr(llm, "model") or not hasattr(llm, "lm_head"):
        raise DecoderExportError(f"expected a LlamaForCausalLM-style model with .model and .lm_head, got {type(llm).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = decoder_spec(llm, tokenizer)
    was_training = llm.training
    llm.eval()
    t0 = time.time()
    B, T, P = (torch.export.Dim(n) for n in ("batch", "seq", "past"))
    total, Lv = torch.export.Dim("total"), torch.export.Dim("visual_len")
    try:
        with torch.no_grad(), untied_lm_head(llm), export_attention(llm), tempfile.TemporaryDirectory() as tmpd:
            tmpd = Path(tmpd)
            wrapper = DecoderWithCache(llm)
            example = _example_inputs(spec)
            dyn = ({0: B, 1: T}, {0: B, 1: total}, {0: B, 1: T},
                   tuple({0: B, 2: P} for _ in range(2 * spec.num_layers)),
                   tuple({0: B, 2: Lv} for _ in range(len(spec.visual_kv_names))))
            if not spec.hybrid_layers:  # torch.export rejects an empty tuple input paired with its shapes
                example, dyn = example[:4], dyn[:4]
            _onnx_export(wrapper, example, spec.input_names, spec.output_names, dyn, tmpd / "decoder.onnx")
            _finish_onnx(tmpd / "decoder.onnx", out_dir / DECODER_ONNX, _linear_names(wrapper, llm), spec.to_dict())
            cross = None
            if spec.hybrid_layers:
                vis = torch.randn(2, 5, spec.hidden)
                cross_module = CrossKV(llm)
                _onnx_export(cross_module, (vis,), [C.CROSS_KV_INPUT], spec.visual_kv_names,
                             ({0: B, 1: Lv},), tmpd / "cross_kv.onnx")
                cross = out_dir / CROSS_KV_ONNX
                _finish_onnx(tmpd / "cross_kv.onnx", cross, _linear_names(cross_module, llm),
                             {"format": DECODER_FORMAT + "-cross-kv", "format_version": DECODER_FORMAT_VERSION,
                              "hybrid_layers": spec.hybrid_layers})
        embed = save_embed_tokens(llm, out_dir)
    finally:
        llm.train(was_training)
    export_s = time.time() - t0
    _check_io(out_dir / DECODER_ONNX, spec)
    result = DecoderExport(decoder=out_dir / DECODER_ONNX, embed_tokens=embed, cross_kv=cross, spec=spec,
                           bytes={}, validation={}, export_s=export_s)
    result.bytes = {k: p.stat().st_size for k, p in result.files().items()}
    if validate:
        result.validation = validate_decoder(result, llm, atol=atol, rtol=rtol, verbose=verbose)
    return result


def _check_io(path: Path, spec: DecoderSpec) -> None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in m.graph.input]
    got_out = [o.name for o in m.graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise DecoderExportError(f"exported I/O does not match the contract:\n inputs  {got_in}\n expected {spec.input_names}"
                                 f"\n outputs {got_out}\n expected {spec.output_names}")


# ---- validation -----------------------------------------------------------------------------------------

def ort_session(path: str | Path, threads: int = 2, optimization: str = "all"):
    """An ORT CPU session with a fixed thread count (benchmarks and validation use the same settings); the op
    library is registered when built (the built decoder's BlockSumMatMulAdd runs its function body without it)."""
    import onnxruntime as ort

    from emrrg.runtime.oplib import register_if_found
    from emrrg.runtime.sessions import session_options

    so = session_options(threads, inter_op_threads=1, optimization=optimization)
    register_if_found(so)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def probe_session(model, names: Sequence[str], threads: int | None = 2, keep_model: bool = True) -> Iterator:
    """An ort_session of `model` with the tensors `names` as extra graph outputs (intermediate activations for
    calibration statistics). The model goes through save_onnx into a temporary folder, so one too large for a
    protobuf (a 7B decoder) works too; `model` leaves with its own outputs before the session opens, and with
    its weights read back from that folder when they went to external data. keep_model=False: the caller is
    done with `model` and its weights may stay out (a 7B decoder's f32 weights are not read back)."""
    import tempfile

    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    outputs = model.graph.output
    own = len(outputs)
    have = {o.name for o in outputs}
    outputs.extend(onnx.helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in have)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = save_onnx(model, Path(tmp) / "probe.onnx")
        finally:
            del outputs[own:]
            moved = [t for t in model.graph.initializer if uses_external_data(t)]   # onnx.save_model moved them
            if moved and keep_model:
                load_external_data_for_model(model, tmp)
                for t in moved:
                    t.ClearField("data_location")   # back to unset (DEFAULT), as before the save
        sess = ort_session(path, threads=threads)
        try:
            yield sess
        finally:
            del sess


def validate_decoder(export: DecoderExport, llm, *, batch: int = 2, prompt_len: int = 7, steps: int = 2,
                     visual_len: int = 5, atol: float = LOGITS_ATOL, rtol: float = LOGITS_RTOL,
                     seed: int = 0, verbose: bool = True) -> dict:
    """ORT vs PyTorch f32: a prefill (P = 0) and `steps` single-token decode steps through the cache.

    Hybrid decoders get their visual K/V from cross_kv.onnx on the ORT side and from
    ``set_visual``-style compute_kv on the PyTorch side, so the two files are checked together.
    Prints ✓/✗ and max |diff| per check; raises DecoderValidationError on any ✗.
    """
    import torch
    from transformers import DynamicCache

    spec = export.spec
    sess = ort_session(export.decoder)
    embed = np.load(export.embed_tokens)
    g = np.random.default_rng(seed)
    ids = g.integers(4, spec.vocab, size=(batch, prompt_len + steps))
    hybrid = _hybrid_modules(llm)
    feeds_vis: dict[str, np.ndarray] = {}
    saved = [x.visual_kv for _, x in hybrid]
    report: dict[str, float] = {}
    failures = []

    def check(name, got, ref, tol):
        d = float(np.abs(got - ref).max()) if got.size else 0.0
        ok = np.isfinite(got).all() and d <= tol
        report[name] = d
        if verbose:
            print(f"  {'✓' if ok else '✗'} {name:<28} max|diff| {d:.2e} (tol {tol:.1e})")
        if not ok:
            failures.append(f"{name}: max|diff| {d:.3e} > {tol:.1e}")

    try:
        with torch.no_grad():
            if hybrid:
                vis = torch.from_numpy(g.standard_normal((batch, visual_len, spec.hidden)).astype(np.float32))
                cross = ort_session(export.cross_kv)
                kv_ort = cross.run(spec.visual_kv_names, {C.CROSS_KV_INPUT: vis.numpy()})
                for n, (_, x) in enumerate(hybrid):
                    x.visual_kv = x.compute_kv(vis)
                    check(f"cross_kv {spec.visual_kv_names[2 * n]}", kv_ort[2 * n], x.visual_kv[0].numpy(), KV_ATOL)
                    check(f"cross_kv {spec.visual_kv_names[2 * n + 1]}", kv_ort[2 * n + 1], x.visual_kv[1].numpy(), KV_ATOL)
                feeds_vis = dict(zip(spec.visual_kv_names, kv_ort))
            cache = DynamicCache()
            past = spec.empty_past(batch)
            P = 0
            for step in range(steps + 1):
                T = prompt_len if step == 0 else 1
                tok = ids[:, P:P + T]
                emb = embed[tok]                                              # (B, T, H)
                mask = np.ones((batch, P + T), np.int64)
                pos = np.broadcast_to(np.arange(P, P + T), (batch, T)).astype(np.int64)
                feeds = {"inputs_embeds": emb, "attention_mask": mask, **past, **feeds_vis}
                if "position_ids" in spec.input_names:
                    feeds["position_ids"] = pos
                out = sess.run(None, feeds)
                ref = llm(inputs_embeds=torch.from_numpy(emb), attention_mask=torch.from_numpy(mask),
                          position_ids=torch.from_numpy(pos), use_cache=True, **cache_kwarg(llm, cache))
                ref_logits = ref.logits.float().numpy()[:, -out[0].shape[1]:]     # last position only (built graph)
                label = "prefill" if step == 0 else f"decode {step}"
                check(f"{label} logits", out[0], ref_logits, atol + rtol * float(np.abs(ref_logits).max()))
                k_last = cache.layers[-1].keys.numpy()
                check(f"{label} present.{spec.num_layers - 1}.key", out[-2], k_last, KV_ATOL * max(1.0, float(np.abs(k_last).max())))
                past = dict(zip(spec.past_names, out[1:]))
                P += T
    finally:
        for (_, x), s in zip(hybrid, saved):
            x.visual_kv = s
    if failures:
        raise DecoderValidationError("ORT decoder does not match PyTorch f32:\n  " + "\n  ".join(failures))
    return {"max_abs_diff": report, "atol": atol, "rtol": rtol, "batch": batch, "prompt_len": prompt_len, "steps": steps}
