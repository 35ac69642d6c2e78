"""Decoder export (ONNX with KV cache, hybrid cross_kv.onnx) and its 4-bit MatMulNBits quantization.

Tolerances:
- ATOL_ORT_F32: ORT and PyTorch run the same f32 graph and differ only in summation order (~1e-7
  relative per op). The tiny decoder's logits are O(1) after 2 layers and measure ~3e-7; 1e-5 keeps a
  30x margin while any real export bug (mask, rope offset, cache order, visual K/V) moves them >= 1e-2.
- ATOL_GRID: weights built exactly on a 4-bit grid (float scale and min per block of 32, llama.cpp
  Q4_1) must read back through ORT's MatMulNBits CPU kernel with <= 1e-6 error -- f32 rounding of
  s*q + m, nothing else. This is the float-zero-point check (an open ORT issue says some kernels
  ignore float zero points) and the same for our block-sum encoding on the int8 path.
- TINY_TOP1_MIN: affine block 32 with an 8-bit lm_head measures top-1 1.00 / KL 1e-4 on the tiny
  decoder's 32 scored positions; 0.9 allows about three near-tie flips on another CPU's kernels and
  still fails a wrong packing (~0.01) or a dropped block offset (< 0.5). The real accuracy targets
  (TOP1_MIN / KL_MAX in export/quantize_decoder.py) are measured on SmolLM2-135M by
  benchmarks/decoder_4bit.py.
"""
import fnmatch

import numpy as np
import onnx
import pytest
import torch

from emrrg.config import decoder_config
from emrrg.decoder import add_hybrid_layers, add_llm_lora, load_base_decoder
from emrrg.export.decoder_eval import (DecoderEvaluator, OrtScorer, TorchDecoder, build_reference, eval_prompts,
                                       greedy_agreement, kl_rows, prefill_feeds)
from emrrg.export.decoder_onnx import (CROSS_KV_ONNX, DecoderExportError, DecoderSpec, export_decoder, ort_session)
from emrrg.export.quantize_decoder import (KL_MAX, TOP1_MIN, NoPassingConfigError, QuantConfig, choose_decoder_config,
                                           collect_activation_stats, quantize_decoder, quantize_weight)

ATOL_ORT_F32 = 1e-5
ATOL_GRID = 1e-6
TINY_TOP1_MIN = 0.9


def report(name, got, ref):
    d = np.abs(np.asarray(got) - np.asarray(ref))
    print(f"{name}: max |diff| {d.max():.3e}, mean {d.mean():.3e}")
    assert np.isfinite(got).all(), f"{name}: NaN/inf"
    return float(d.max())


def tiny_llm(seed=0, **overrides):
    torch.manual_seed(seed)
    llama = {**decoder_config("tiny-llama").llama, **overrides}
    llm, tok = load_base_decoder(decoder_config("tiny-llama", llama=llama))
    return llm.eval(), tok


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Tied embeddings, like SmolLM2: the export must still give lm_head a weight of its own."""
    llm, tok = tiny_llm(tie_word_embeddings=True)
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    exp = export_decoder(llm, tmp_path_factory.mktemp("plain"), tokenizer=tok)
    return llm, tok, exp


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    llm, tok = tiny_llm(seed=1)
    xattns = add_hybrid_layers(llm, (1,))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in xattns[0].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        xattns[0].gate_scale.fill_(1.0)  # a fresh layer has 0 here, i.e. it would be the plain decoder
    exp = export_decoder(llm, tmp_path_factory.mktemp("hybrid"), tokenizer=tok)
    return llm, tok, exp


def torch_steps(llm, embed, ids, splits, visual_kv=None):
    """Reference logits for ids fed in chunks `splits` through a DynamicCache: list of (B, T, V)."""
    from transformers import DynamicCache

    from emrrg.export.decoder_onnx import cache_kwarg

    cache, P, out = DynamicCache(), 0, []
    with torch.no_grad():
        for T in splits:
            emb = torch.from_numpy(embed[ids[:, P:P + T]])
            B = emb.shape[0]
            out.append(llm(inputs_embeds=emb, attention_mask=torch.ones(B, P + T, dtype=torch.long),
                           position_ids=torch.arange(P, P + T).expand(B, T), use_cache=True,
                           **cache_kwarg(llm, cache)).logits.numpy())
            P += T
    return out


def ort_steps(dec: OrtScorer, ids, splits):
    past, P, out = None, 0, []
    for T in splits:
        logits, past = dec.run(dec.embed[ids[:, P:P + T]], past)
        out.append(logits)
        P += T
    return out, past


# ---- contract ------------------------------------------------------------------------------------------

def test_contract_io_and_metadata(plain):
    llm, tok, exp = plain
    spec = exp.spec
    m = onnx.load(str(exp.decoder))
    names = [i.name for i in m.graph.input]
    assert names == ["inputs_embeds", "attention_mask", "position_ids"] + \
        [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [o.name for o in m.graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    types = {i.name: i.type.tensor_type for i in list(m.graph.input) + list(m.graph.output)}
    dims = {n: [d.dim_param or d.dim_value for d in t.shape.dim] for n, t in types.items()}
    assert types["inputs_embeds"].elem_type == onnx.TensorProto.FLOAT
    assert types["attention_mask"].elem_type == types["position_ids"].elem_type == onnx.TensorProto.INT64
    assert dims["inputs_embeds"][2] == 64 and all(isinstance(d, str) for d in dims["inputs_embeds"][:2])
    assert dims["past_key_values.0.key"][1:4:2] == [2, 16] and isinstance(dims["past_key_values.0.key"][2], str)
    assert dims["logits"][2] == 512
    meta = DecoderSpec.from_dict({p.key: __import__("json").loads(p.value) for p in m.metadata_props})
    assert (meta.num_layers, meta.kv_heads, meta.head_dim, meta.hidden, meta.vocab) == (2, 2, 16, 64, 512)
    assert (meta.bos_token_id, meta.eos_token_id, meta.pad_token_id) == (1, 2, 0) and meta.hybrid_layers == []
    emb = np.load(exp.embed_tokens)
    assert emb.dtype == np.float32 and emb.shape == (512, 64)
    np.testing.assert_array_equal(emb, llm.model.embed_tokens.weight.detach().numpy())
    # tied lm_head exported as its own (hidden, vocab) initializer, and the torch model is tied again
    inits = {t.name: t for t in m.graph.initializer}
    assert list(inits["lm_head.weight_t"].dims) == [64, 512]
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    assert exp.validation["max_abs_diff"]["decode 2 logits"] < ATOL_ORT_F32


def test_prefill_and_incremental_decode_match_torch(plain):
    llm, _, exp = plain
    dec = OrtScorer(exp.decoder)
    ids = np.random.default_rng(0).integers(4, 512, size=(2, 9))
    splits = [6, 1, 1, 1]
    got, past = ort_steps(dec, ids, splits)
    ref = torch_steps(llm, dec.embed, ids, splits)
    for step, (g, r) in enumerate(zip(got, ref)):
        assert report(f"step {step} (T={splits[step]}) logits", g, r) <= ATOL_ORT_F32
    assert past["past_key_values.1.value"].shape == (2, 2, 9, 16)
    # the cache path equals one pass over the whole sequence
    full, _ = ort_steps(dec, ids, [9])
    assert report("cached vs one pass", np.concatenate(got, 1), full[0]) <= ATOL_ORT_F32


@pytest.mark.parametrize("B,T,P", [(1, 5, 0), (3, 1, 7), (2, 4, 3), (1, 1, 0)])
def test_dynamic_batch_seq_past(plain, B, T, P):
    llm, _, exp = plain
    dec = OrtScorer(exp.decoder)
    ids = np.random.default_rng(B * 100 + T * 10 + P).integers(4, 512, size=(B, P + T))
    splits = [P, T] if P else [T]
    got, past = ort_steps(dec, ids, splits)
    ref = torch_steps(llm, dec.embed, ids, splits)
    assert got[-1].shape == (B, T, 512) and past["past_key_values.0.key"].shape == (B, 2, P + T, 16)
    assert report(f"B={B} T={T} P={P}", got[-1], ref[-1]) <= ATOL_ORT_F32


def test_hybrid_decoder_and_cross_kv_match_torch(hybrid):
    llm, _, exp = hybrid
    spec = exp.spec
    assert spec.hybrid_layers == [1] and exp.cross_kv.name == CROSS_KV_ONNX
    m = onnx.load(str(exp.decoder))
    assert [i.name for i in m.graph.input][-2:] == ["visual_kv.1.key", "visual_kv.1.value"]
    # weight MatMuls carry the llm's module names in both files (CrossKV holds the layer as xattn.0)
    assert {"model.layers.1.cross_attn.q_proj", "lm_head"} <= {n.name for n in m.graph.node if n.op_type == "MatMul"}
    assert {n.name for n in onnx.load(str(exp.cross_kv)).graph.node if n.op_type == "MatMul"} == {
        "model.layers.1.cross_attn.k_proj", "model.layers.1.cross_attn.v_proj"}
    xattn = llm.model.layers[1].cross_attn
    vis = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 6, 64)).astype(np.float32))
    kv = ort_session(exp.cross_kv).run(None, {"visual_tokens": vis.numpy()})
    k_ref, v_ref = xattn.compute_kv(vis)
    assert kv[0].shape == (2, 4, 6, 16)
    assert report("cross_kv key", kv[0], k_ref.detach().numpy()) <= ATOL_ORT_F32
    assert report("cross_kv value", kv[1], v_ref.detach().numpy()) <= ATOL_ORT_F32
    feeds = dict(zip(spec.visual_kv_names, kv))
    dec = OrtScorer(exp.decoder, visual_kv=feeds)
    ids = np.random.default_rng(4).integers(4, 512, size=(2, 7))
    got, _ = ort_steps(dec, ids, [5, 1, 1])
    xattn.visual_kv = (k_ref.detach(), v_ref.detach())
    try:
        ref = torch_steps(llm, dec.embed, ids, [5, 1, 1])
    finally:
        xattn.visual_kv = None
    for step, (g, r) in enumerate(zip(got, ref)):
        assert report(f"hybrid step {step}", g, r) <= ATOL_ORT_F32
    # the visual K/V really reach the logits (gate_scale != 0)
    other = OrtScorer(exp.decoder, visual_kv={k: v[::-1].copy() for k, v in feeds.items()})
    assert np.abs(ort_steps(other, ids, [5])[0][0] - got[0]).max() > 1e-3


# grouped_query_attention vs transformers' own sdpa path (repeat_kv + SDPA) on the same tensors: f32,
# same reductions in a different grouping, so rounding only (observed ~1e-7).
ATOL_GQA = 1e-5


@pytest.mark.parametrize("heads,kv_heads,t,s", [(9, 3, 1, 7), (6, 2, 5, 5), (4, 4, 3, 8)])
def test_export_attention_equals_transformers_sdpa(heads, kv_heads, t, s):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from emrrg.export.decoder_onnx import grouped_query_attention

    g = torch.Generator().manual_seed(heads + t)
    q = torch.randn(2, heads, t, 16, generator=g)
    k, v = (torch.randn(2, kv_heads, s, 16, generator=g) for _ in range(2))
    keep = torch.ones(2, 1, t, s, dtype=torch.bool).tril(diagonal=s - t)
    keep[1, :, -1, 0] = False   # a masked past position in row 1 (no row fully masked: the runtime never pads,
                                # and there transformers' sdpa gives 0 where eager and this give a uniform mean)
    mask = torch.zeros(2, 1, t, s).masked_fill(~keep, torch.finfo(torch.float32).min)

    class M(torch.nn.Module):
        num_key_value_groups = heads // kv_heads
        is_causal = False
        training = False

    ref, _ = sdpa_attention_forward(M(), q, k, v, keep, scaling=0.25)
    got, _ = grouped_query_attention(M(), q, k, v, mask, scaling=0.25)
    assert got.shape == ref.shape == (2, t, heads, 16)
    report("gqa vs sdpa", got.numpy(), ref.numpy())
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=ATOL_GQA, rtol=0)


def test_exported_graph_does_not_repeat_the_kv_cache(plain):
    """No Expand of the KV cache in the decoder graph: the KV heads are not copied per query head each step
    (the only Expands left build the attention mask)."""
    llm, _, exp = plain
    assert llm.config.num_key_value_heads < llm.config.num_attention_heads        # GQA, or the check is vacuous
    m = onnx.load(str(exp.decoder), load_external_data=False)
    producer = {o: n for n in m.graph.node for o in n.output}

    def source(name):                                                  # walk up through reshapes
        while name in producer and producer[name].op_type in ("Unsqueeze", "Reshape", "Transpose"):
            name = producer[name].input[0]
        return name

    expanded = [source(n.input[0]) for n in m.graph.node if n.op_type == "Expand"]
    assert not [x for x in expanded if x.startswith(("present.", "past_key_values."))], expanded


def test_unmerged_peft_is_refused(tmp_path):
    llm, _ = tiny_llm()
    peft_llm = add_llm_lora(llm, decoder_config("tiny-llama", lora_rank=2))
    with pytest.raises(DecoderExportError, match="merge"):
        export_decoder(peft_llm, tmp_path)


# ---- quantization ------------------------------------------------------------------------------------------

def grid_weights(K=256, N=96, bs=32, seed=0):
    """(K, N) weights exactly on a Q4_1 grid: w = d*q + m, float d and m per block of 32 along K."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(1e-3, 1e-2, (N, K // bs)).astype(np.float32)
    m = (-7.5 * d + rng.normal(0, 2e-3, d.shape)).astype(np.float32)
    q = rng.integers(0, 16, (N, K // bs, bs))
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's min and max land on 0 and 15
    return np.ascontiguousarray((q * d[..., None] + m[..., None]).astype(np.float32).reshape(N, K).T)


def run_matmulnbits(qw, A, accuracy_level):
    """One MatMulNBits node through ORT CPU (plus the block-sum correction when the encoding has one)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(qw.packed, "B"), numpy_helper.from_array(qw.scales, "S")]
    ins = ["A", "B", "S"]
    if qw.zero_points is not None:
        inits.append(numpy_helper.from_array(qw.zero_points, "Z"))
        ins.append("Z")
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", K=qw.K, N=qw.N, bits=qw.bits,
                            block_size=qw.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, qw.K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, qw.N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": A})[0]
    if qw.correction is not None:
        y = y + A.reshape(A.shape[0], -1, qw.block_size).sum(-1) @ qw.correction
    return y


@pytest.mark.parametrize("level", [4, 0])
def test_grid_weights_reencode_exactly_through_ort(level):
    W = grid_weights()
    qw = quantize_weight(W, 4, 32, "affine")
    assert qw.zero_points is None and qw.correction is not None  # blocksum: no zero point, f32 correction
    eye = np.eye(W.shape[0], dtype=np.float32)  # A = I reads B back as the kernel de-quantizes it
    got = run_matmulnbits(qw, eye, level)
    assert report(f"blocksum level {level} vs grid weights", got, W) <= ATOL_GRID
    # symmetric RTN re-quantizes the same weights onto another grid: far from exact
    sym = quantize_weight(W, 4, 32, "sym")
    assert np.abs(run_matmulnbits(sym, eye, level) - W).max() > 100 * ATOL_GRID


def test_refit_keeps_grid_and_helps_off_grid():
    W = grid_weights(seed=1)
    exact = quantize_weight(W, 4, 32, "affine", refine=9)
    assert np.abs(exact.dequantized - W).max() <= ATOL_GRID
    off = W + np.random.default_rng(2).normal(0, 3e-3, W.shape).astype(np.float32)
    e0 = np.square(quantize_weight(off, 4, 32, "affine").dequantized - off).sum()
    e9 = np.square(quantize_weight(off, 4, 32, "affine", refine=9).dequantized - off).sum()
    print(f"off-grid squared error: min/max {e0:.4e}, refit {e9:.4e}")
    assert e9 < e0


@pytest.fixture(scope="module")
def tiny_reference(plain):
    llm, tok, exp = plain
    prompts = eval_prompts(tok, n=2, prompt_tokens=64)
    return build_reference(TorchDecoder(llm), prompts, n_new=16)


def test_4bit_quantization_tiny(plain, tiny_reference, tmp_path):
    llm, tok, exp = plain
    res = quantize_decoder(exp.decoder, tmp_path, QuantConfig("b32-lm8", bits=4, block_size=32, accuracy_level=4,
                                                            lm_head_bits=8))
    m = onnx.load(str(res.path))
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert all(n.domain == "com.microsoft" for n in nbits)
    assert len(nbits) == 2 * 7 + 1 and not any(fnmatch.fnmatch(n.name, "*_proj") for n in m.graph.node if n.op_type == "MatMul")
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {4, 8}
    f32_w = sum(t.ByteSize() for t in onnx.load(str(exp.decoder)).graph.initializer if t.name.endswith(".weight_t"))
    q_w = sum(t.ByteSize() for t in m.graph.initializer if t.name.split(".")[-1] in
              ("weight_q4", "weight_q8", "scales", "block_offsets"))
    print(f"weights {f32_w} -> {q_w} bytes ({q_w / f32_w:.3f}); file {res.f32_bytes} -> {res.bytes}")
    assert q_w < 0.4 * f32_w and res.bytes < res.f32_bytes
    ev = DecoderEvaluator(tiny_reference, exp.embed_tokens)(res.path)
    print(f"tiny 4-bit: top1 {ev.top1:.3f}, KL {ev.kl_mean:.4f}, greedy {ev.greedy_token_agreement:.3f}")
    assert ev.top1 >= TINY_TOP1_MIN
    # the f32 ONNX itself is the reference up to f32 rounding
    f32 = DecoderEvaluator(tiny_reference, exp.embed_tokens)(exp.decoder)
    assert f32.top1 == 1.0 and f32.kl_mean < 1e-6 and f32.greedy_token_agreement == 1.0


def test_keep_fp_and_lm_head_bits(plain, tmp_path):
    _, _, exp = plain
    res = quantize_decoder(exp.decoder, tmp_path, QuantConfig("l0-fp", keep_fp=("model.layers.0.*",), lm_head_bits=32))
    bits = {r["name"]: r["bits"] for r in res.nodes}
    assert bits["lm_head"] == 32 and bits["model.layers.0.mlp.down_proj"] == 32 and bits["model.layers.1.mlp.down_proj"] == 4
    m = onnx.load(str(res.path))
    assert {n.name for n in m.graph.node if n.op_type == "MatMul"} >= {"lm_head", "model.layers.0.self_attn.q_proj"}


def test_activation_stats_and_worst_k(plain, tiny_reference, tmp_path):
    _, _, exp = plain
    spec = exp.spec
    stats = collect_activation_stats(exp.decoder, prefill_feeds(spec, np.load(exp.embed_tokens), tiny_reference.prompts))
    assert stats["model.layers.1.mlp.down_proj"].shape == (128,) and (stats["lm_head"] > 0).all()
    all4 = quantize_decoder(exp.decoder, tmp_path / "w0", config=QuantConfig("w0", refine=5, act_weighted=True),
                            act_stats=stats)
    res = quantize_decoder(exp.decoder, tmp_path / "w3", config=QuantConfig("w3", refine=5, act_weighted=True,
                                                                            worst_k_8bit=3), act_stats=stats)
    eight = [r for r in res.nodes if r["bits"] == 8 and r["name"] != "lm_head"]
    four = [r for r in res.nodes if r["bits"] == 4]
    assert len(eight) == 3
    # the 8-bit ones are the three with the largest 4-bit error (the same first pass without worst_k) ...
    ranked = sorted((r for r in all4.nodes if r["bits"] == 4), key=lambda r: -r["rel_err"])
    assert ranked[2]["rel_err"] > ranked[3]["rel_err"]  # no tie at the cut, so "the three worst" is one set
    assert {r["name"] for r in eight} == {r["name"] for r in ranked[:3]}
    # ... and now have a far smaller one
    assert max(r["rel_err"] for r in eight) < min(r["rel_err"] for r in four)


class ScriptedEvaluator:
    """Stands in for DecoderEvaluator: scores by attempt name (the chooser's work dir), so the test
    exercises the ladder logic, not the tiny model's accuracy."""

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def __call__(self, path):
        name = path.parent.name
        self.calls.append(name)
        top1, kl = self.scores[name]
        return type("R", (), {"top1": top1, "kl_mean": kl, "kl_p99": kl, "seconds": 0.0})()


def test_chooser_on_the_traced_graph_skips_the_separate_adapter_rung(plain, tmp_path):
    """The default quantizer rewrites the traced f32 graph and has no weights to keep a LoRA beside: it skips that
    rung (recorded, neither built nor scored) and goes on."""
    _, _, exp = plain
    sep = QuantConfig("affine-b32-lora-lm8", separate_adapters=True)
    ev = ScriptedEvaluator({"affine-b32-lm8": (0.97, 0.01)})
    choice = choose_decoder_config(exp.decoder, tmp_path / "q", ev, ladder=(sep, QuantConfig("affine-b32-lm8")),
                                   verbose=False)
    assert ev.calls == ["affine-b32-lm8"] and "decoder_graph=built" in choice.attempts[0]["skipped"]
    assert choice.config.name == "affine-b32-lm8" and choice.passed


def test_chooser_records_attempts_and_strict_raises(plain, tiny_reference, tmp_path):
    _, _, exp = plain
    ladder = (QuantConfig("sym-b128-lm4", method="sym", block_size=128, lm_head_bits=4),
              QuantConfig("affine-b32-lm8"), QuantConfig("int8-b32", bits=8))
    ev = ScriptedEvaluator({"sym-b128-lm4": (0.80, 0.30), "affine-b32-lm8": (0.97, 0.01), "int8-b32": (1.0, 0.0)})
    choice = choose_decoder_config(exp.decoder, tmp_path / "q", ev, ladder=ladder)
    print(choice.manifest())
    assert ev.calls == ["sym-b128-lm4", "affine-b32-lm8"]  # stops at the first that passes
    assert [a["passed"] for a in choice.attempts] == [False, True]
    assert choice.config.name == "affine-b32-lm8" and choice.passed and choice.path.is_file()
    assert {"top1", "kl_mean", "bytes", "size_ratio", "config"} <= set(choice.attempts[0])
    assert not (tmp_path / "q" / "attempts").exists()
    # none passes: keep the best (non-strict) or raise with every attempt (strict)
    bad = ScriptedEvaluator({"sym-b128-lm4": (0.80, 0.30), "affine-b32-lm8": (0.90, 0.08)})
    best = choose_decoder_config(exp.decoder, tmp_path / "best", bad, ladder=ladder[:2])
    assert not best.passed and best.config.name == "affine-b32-lm8"
    with pytest.raises(NoPassingConfigError) as err:
        choose_decoder_config(exp.decoder, tmp_path / "strict", bad, ladder=ladder[:2], strict=True)
    assert [a["name"] for a in err.value.attempts] == ["sym-b128-lm4", "affine-b32-lm8"]
    # by default the chooser judges with the shipped thresholds, both bounds inclusive
    for (top1, kl), want in {(TOP1_MIN, KL_MAX): True, (TOP1_MIN - 1e-3, 0.0): False, (1.0, KL_MAX + 1e-3): False}.items():
        edge = choose_decoder_config(exp.decoder, tmp_path / "edge", ScriptedEvaluator({"int8-b32": (top1, kl)}),
                                     ladder=ladder[2:], verbose=False)
        assert edge.passed is want, (top1, kl)
        assert edge.thresholds == {"top1_min": TOP1_MIN, "kl_max": KL_MAX}
    # and with the real evaluator the f32-equivalent rung passes the shipped thresholds on tiny
    real = DecoderEvaluator(tiny_reference, exp.embed_tokens, greedy=False)
    ok = choose_decoder_config(exp.decoder, tmp_path / "real", real, ladder=ladder[2:])
    assert ok.passed and ok.attempts[0]["top1"] >= TOP1_MIN


def test_metrics_helpers():
    a = np.random.default_rng(0).standard_normal((5, 11))
    assert np.allclose(kl_rows(a, a), 0) and (kl_rows(a, np.roll(a, 1, 0)) > 0).all()
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == {"token_agreement": 0.75, "prefix": 0.5}
