"""The decoder built from the weights (export/decoder_builder.py) and the runtime's shared-cache StepModel.

Tolerances:
- ATOL_ORT_F32 (from test_decoder_export): the built f32 graph and PyTorch differ only in summation order
  and in GroupQueryAttention's fused softmax; the tiny decoders measure 1-5e-7.
- ATOL_GRID_LOGITS: weights snapped onto a Q4_1 grid (float scale and minimum per block of 32) re-encode
  exactly in the affine encoding, so with f32 activations (accuracy_level 0) the built 4-bit graph equals
  the built f32 graph up to f32 rounding of s*q + m and of the block-sum correction, and the f16 rounding of
  the rest r = m + s*z (<= s/4096 per weight; measured ~1e-5 on logits of magnitude ~1); a correction wired
  to the wrong slice of a packed projection moves them >= 1e-2.
- TINY_TOP1_MIN (from test_decoder_export): teacher-forced top-1 of a 4-bit tiny decoder.
- ATOL_GRID_LOGITS also bounds the separate-adapter rung: the base (merged - B A) is the grid weight up to f32
  rounding of the subtraction, and the low-rank branch runs in f32; merging the same LoRA into the 4-bit
  weights instead re-rounds q/v and moves the logits by > 10x that.
"""
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from emrrg.decoder import add_hybrid_layers
from emrrg.export.decoder_builder import (BUILT_LADDER, BuilderUnsupported, LlamaShape, ModuleWeights,
                                          SafetensorsWeights, _module_shape, build_decoder, export_decoder_built,
                                          lora_factors, quantized_builder, with_all_logits)
from emrrg.export.decoder_eval import (DecoderEvaluator, OrtScorer, TorchDecoder, build_reference, eval_prompts,
                                       random_lora)
from emrrg.export.decoder_onnx import ort_session
from emrrg.export.quantize_decoder import QuantConfig, quantize_weight
from emrrg.runtime.decoder_shared import SharedCacheDecoder
from emrrg.runtime.generation import DecodeSettings, generate
from tests.export.test_decoder_export import ATOL_ORT_F32, TINY_TOP1_MIN, report, tiny_llm, torch_steps
from tests.runtime.test_generation import TorchStep, hf_generate, tiny_prompt

ATOL_GRID_LOGITS = 1e-4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    llm, tok = tiny_llm(tie_word_embeddings=True)
    exp = export_decoder_built(llm, tmp_path_factory.mktemp("built"), tokenizer=tok, verbose=False)
    return llm, tok, exp


def test_contract_io_metadata_and_fused_ops(built):
    llm, _, exp = built
    spec = exp.spec
    assert spec.cache == "shared" and spec.format_version == 2
    m = onnx.load(str(exp.decoder), load_external_data=False)
    names = [i.name for i in m.graph.input]
    assert names == ["inputs_embeds", "attention_mask"] + [f"past_key_values.{i}.{kv}" for i in range(2)
                                                           for kv in ("key", "value")]        # no position_ids
    assert [o.name for o in m.graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    logits_dims = [d.dim_param or d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim]
    assert logits_dims[1:] == [1, 512]                                 # the last position only
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("SkipSimplifiedLayerNormalization") == 4
    assert ops.count("MatMul") == 2 * 4 + 1                            # packed qkv, o, packed gate/up, down; lm_head
    assert "Concat" not in ops and "Expand" not in ops                 # no cache copy, no repeat_kv
    meta = {p.key: p.value for p in m.metadata_props}
    assert '"shared"' == meta["cache"]
    assert exp.validation["max_abs_diff"]["decode 2 logits"] < ATOL_ORT_F32


@pytest.mark.parametrize("B,T,P", [(1, 5, 0), (3, 1, 7), (1, 4, 3), (2, 6, 0)])
def test_growing_cache_matches_torch(built, B, T, P):
    """Driven without IOBinding (past of exactly P positions, as validation and the evaluators do).
    (B > 1, T > 1, P > 0) is outside GroupQueryAttention's contract and never asked by the runtime."""
    llm, _, exp = built
    dec = OrtScorer(exp.decoder)
    ids = np.random.default_rng(B * 100 + T * 10 + P).integers(4, 512, size=(B, P + T))
    splits = [P, T] if P else [T]
    past = None
    for k, t in enumerate(splits):
        logits, past = dec.run(dec.embed[ids[:, sum(splits[:k]):sum(splits[:k + 1])]], past)
    ref = torch_steps(llm, dec.embed, ids, splits)
    assert logits.shape == (B, 1, 512) and past["past_key_values.1.key"].shape == (B, 2, P + T, 16)
    assert report(f"B={B} T={T} P={P}", logits, ref[-1][:, -1:]) <= ATOL_ORT_F32


def test_all_positions_variant(built):
    llm, _, exp = built
    twin = with_all_logits(exp.decoder)
    assert twin.parent == exp.decoder.parent
    dec = OrtScorer(exp.decoder)
    ids = np.random.default_rng(5).integers(4, 512, size=9)
    got = dec.logits(ids)                                              # scored through the twin
    assert got.shape == (9, 512)
    assert report("all positions", got, torch_steps(llm, dec.embed, ids[None], [9])[0][0]) <= ATOL_ORT_F32


def test_hybrid_layers_and_cross_kv(tmp_path):
    llm, tok = tiny_llm(seed=1)
    xattn = add_hybrid_layers(llm, (1,))[0]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in xattn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        xattn.gate_scale.fill_(1.0)                                    # 0 (fresh) would be the plain decoder
    exp = export_decoder_built(llm, tmp_path, tokenizer=tok, verbose=False)
    assert exp.spec.hybrid_layers == [1] and exp.cross_kv is not None
    assert not exp.cross_kv.with_name(exp.cross_kv.name + ".data").exists()   # one file in the bundle
    vis = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 6, 64)).astype(np.float32))
    kv = ort_session(exp.cross_kv).run(None, {"visual_tokens": vis.numpy()})
    k_ref, v_ref = (t.detach() for t in xattn.compute_kv(vis))
    assert report("cross_kv key", kv[0], k_ref.numpy()) <= ATOL_ORT_F32
    feeds = dict(zip(exp.spec.visual_kv_names, kv))
    dec = OrtScorer(exp.decoder, visual_kv=feeds)
    ids = np.random.default_rng(4).integers(4, 512, size=(2, 7))
    past, got = None, []
    for a, b in ((0, 5), (5, 6), (6, 7)):
        logits, past = dec.run(dec.embed[ids[:, a:b]], past)
        got.append(logits)
    xattn.visual_kv = (k_ref, v_ref)
    try:
        ref = torch_steps(llm, dec.embed, ids, [5, 1, 1])
    finally:
        xattn.visual_kv = None
    for step, (g_, r) in enumerate(zip(got, ref)):
        assert report(f"hybrid step {step}", g_, r[:, -1:]) <= ATOL_ORT_F32
    other = OrtScorer(exp.decoder, visual_kv={k: v * -1.0 for k, v in feeds.items()})
    assert np.abs(other.run(dec.embed[ids[:, :5]], None)[0] - got[0]).max() > 1e-3    # the visual K/V matter


@pytest.mark.parametrize("seed", range(2))
def test_shared_buffer_runtime_equals_transformers(seed, tmp_path):
    """The runtime's StepModel on the built graph (one buffer per layer bound as past and present, beam rows
    moved in place) writes exactly transformers' greedy and beam-search tokens."""
    model, embeds = tiny_prompt(seed)
    exp = export_decoder_built(model.llama_model, tmp_path, verbose=False)
    sess, sp = ort_session(exp.decoder), exp.spec
    dec = SharedCacheDecoder(sess, np.load(exp.embed_tokens), sp.num_layers, sp.kv_heads, sp.head_dim,
                             max_len=512, max_rows=8)
    for beams, min_new, max_new, rep, lp in [(1, 0, 30, 2.0, 2.0), (3, 0, 40, 2.0, 2.0), (5, 10, 40, 2.0, 2.0),
                                             (2, 0, 25, 1.0, -1.0)]:
        s = DecodeSettings(num_beams=beams, repetition_penalty=rep, length_penalty=lp, min_new_tokens=min_new,
                           max_new_tokens=max_new, eos_token_id=model.tokenizer.eos_token_id)
        assert generate(dec, embeds, s) == hf_generate(model, embeds, s), (beams, min_new, max_new, rep, lp)
        assert dec.cache_bytes() <= 2 * sp.num_layers * 8 * 512 * sp.kv_heads * sp.head_dim * 4
    # the live cache equals the growing-cache run's, and a later report reuses the buffers (no reserve needed)
    fork = dec.fork()
    assert fork.cache_bytes() == 0 and fork.sess is dec.sess
    s = DecodeSettings(num_beams=1, repetition_penalty=1.0, min_new_tokens=8, max_new_tokens=8, eos_token_id=2)
    assert generate(fork, embeds, s) == generate(TorchStep(model.llama_model), embeds, s)


def _snap_to_grid(llm, bs=32):
    """Put every Linear weight of the decoder exactly on a Q4_1 grid of block `bs` along K (what SmolLM2 as
    shipped looks like for bs = 32)."""
    with torch.no_grad():
        for name, mod in llm.named_modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.detach().numpy().T
                mod.weight.copy_(torch.from_numpy(quantize_weight(w, 4, bs, "affine").dequantized.T.copy()))


def test_affine_grid_weights_reencode_exactly_through_the_built_graph(tmp_path):
    llm, tok = tiny_llm(seed=3)
    _snap_to_grid(llm)
    src, shape = ModuleWeights(llm), _module_shape(llm)
    f32 = build_decoder(src, shape, tmp_path / "f32")
    q = build_decoder(src, shape, tmp_path / "q", quant=QuantConfig("exact", accuracy_level=0, lm_head_bits=4))
    ops = [n.op_type for n in onnx.load(str(q.path), load_external_data=False).graph.node]
    # one correction node per projection (packed qkv, o, packed gate/up, down; + the lm_head): block sums, offsets
    # and the add in one com.emrrg::BlockSumMatMulAdd (the standard-ONNX graph: tests/export/test_blocksum_offset.py)
    assert ops.count("MatMulNBits") == 4 * shape.layers + 1 and ops.count("BlockSumMatMulAdd") == 4 * shape.layers + 1
    assert "MatMul" not in ops and "Add" not in ops                   # residuals: in the norms
    ids = np.random.default_rng(0).integers(4, 512, size=(1, 12))
    embed = src.get("model.embed_tokens.weight")
    a = OrtScorer(f32.path, embed).run(embed[ids], None)[0]
    b = OrtScorer(q.path, embed).run(embed[ids], None)[0]
    assert report("affine 4-bit vs f32 on grid weights", b, a) <= ATOL_GRID_LOGITS
    # integer zero points re-round the same weights: visibly off
    c = OrtScorer(build_decoder(src, shape, tmp_path / "asym", quant=QuantConfig("asym", method="asym",
                                                                                 accuracy_level=0)).path, embed)
    assert np.abs(c.run(embed[ids], None)[0] - a).max() > 10 * ATOL_GRID_LOGITS


def test_separate_adapters_keep_a_lora_exact_over_grid_weights(tmp_path):
    """A LoRA trained over grid weights (the demo checkpoints: SmolLM2 on its Q4_1 grid + q/v LoRA): merged, its
    q/v leave the grid and every 4-bit encoding re-rounds them; kept as a rank-r branch beside the re-encoded base
    (QuantConfig.separate_adapters), the 4-bit graph equals the f32 merged graph."""
    llm, _ = tiny_llm(seed=5)
    _snap_to_grid(llm)
    peft_llm = random_lora(llm, rank=4, rel_norm=0.15, seed=1)
    factors = lora_factors(peft_llm)
    layers = len(peft_llm.base_model.model.model.layers)
    assert sorted(factors) == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(layers) for p in "qv")
    merged = peft_llm.merge_and_unload()
    src, shape = ModuleWeights(merged), _module_shape(merged)
    A, B = factors["model.layers.0.self_attn.q_proj.weight"]
    w0 = src.get("model.layers.0.self_attn.q_proj.weight") - B @ A               # the base weight: on the grid again
    np.testing.assert_allclose(quantize_weight(w0.T, 4, 32, "affine").dequantized.T, w0, atol=1e-6)
    f32 = build_decoder(src, shape, tmp_path / "f32")
    kw = dict(accuracy_level=0, lm_head_bits=4)
    # the ladder's own f32-activation rung (the report check's last resort): separate LoRA, f32 lm_head
    exact_rung = next(c for c in BUILT_LADDER if c.separate_adapters and c.accuracy_level == 0)
    sep = build_decoder(src, shape, tmp_path / "sep", quant=exact_rung, adapters=factors)
    plain = build_decoder(src, shape, tmp_path / "plain", quant=QuantConfig("plain", **kw), adapters=factors)
    ops = [n.op_type for n in onnx.load(str(sep.path), load_external_data=False).graph.node]
    assert exact_rung.lm_head_bits == 32 and ops.count("MatMulNBits") == 4 * layers   # the lm_head: a plain MatMul
    assert ops.count("MatMul") == 2 * layers + 1 and ops.count("Add") == layers  # + one branch per packed qkv
    assert [r.get("adapter_rank") for r in sep.nodes if "qkv" in r["name"]] == [8] * layers   # q's 4 + v's 4
    assert "MatMul" not in [n.op_type for n in onnx.load(str(plain.path), load_external_data=False).graph.node]
    embed = src.get("model.embed_tokens.weight")
    ids = np.random.default_rng(2).integers(4, 512, size=(1, 12))
    a = OrtScorer(f32.path, embed).run(embed[ids], None)[0]
    assert report("4-bit base + separate LoRA vs f32 merged", OrtScorer(sep.path, embed).run(embed[ids], None)[0],
                  a) <= ATOL_GRID_LOGITS
    assert np.abs(OrtScorer(plain.path, embed).run(embed[ids], None)[0] - a).max() > 10 * ATOL_GRID_LOGITS
    # the ladder skips the rung when there is nothing to keep separate
    rung = next(c for c in BUILT_LADDER if c.separate_adapters)
    assert "no LLM LoRA" in quantized_builder(src, shape).skip(rung, [])
    assert quantized_builder(src, shape, adapters=factors).skip(rung, []) is None


def test_separate_adapters_on_every_projection_stay_exact(tmp_path):
    """LoRA on all seven projections (emrrg-train --llm-lora-targets, self-attention and MLP): each packed matmul
    (qkv, o, gate_up, down) gets one branch of its parts' summed ranks, and the 4-bit graph with them still equals
    the f32 merged graph over grid weights."""
    from emrrg.decoder import ATTN_PROJECTIONS, MLP_PROJECTIONS

    llm, _ = tiny_llm(seed=5)
    _snap_to_grid(llm)
    targets = ATTN_PROJECTIONS + MLP_PROJECTIONS
    peft_llm = random_lora(llm, rank=4, rel_norm=0.15, targets=targets, seed=1)
    factors = lora_factors(peft_llm)
    layers = len(peft_llm.base_model.model.model.layers)
    assert len(factors) == 7 * layers
    merged = peft_llm.merge_and_unload()
    src, shape = ModuleWeights(merged), _module_shape(merged)
    f32 = build_decoder(src, shape, tmp_path / "f32")
    rung = next(c for c in BUILT_LADDER if c.separate_adapters and c.accuracy_level == 0)
    sep = build_decoder(src, shape, tmp_path / "sep", quant=rung, adapters=factors)
    ranks = {r["name"].split(".")[-1]: r.get("adapter_rank") for r in sep.nodes if r["name"].startswith("model.layers.0.")}
    assert ranks == {"qkv_proj": 12, "o_proj": 4, "gate_up_proj": 8, "down_proj": 4}
    embed = src.get("model.embed_tokens.weight")
    ids = np.random.default_rng(2).integers(4, 512, size=(1, 12))
    a = OrtScorer(f32.path, embed).run(embed[ids], None)[0]
    assert report("4-bit base + separate LoRA on 7 projections vs f32 merged",
                  OrtScorer(sep.path, embed).run(embed[ids], None)[0], a) <= ATOL_GRID_LOGITS


def test_awq_scales_fold_into_the_norms_and_cut_the_error_of_outlier_channels(tmp_path):
    """AWQ (QuantConfig.awq_scale): per-input-channel scales s, x / s folded into the RMSNorm weights (qkv, gate/up)
    and the up projection's output columns (down), s * W quantized. On a tiny decoder whose norms give four
    channels 30x the others (the activation outliers AWQ is for), the scaled 4-bit graph is closer to f32 than the
    unscaled one, and each scaled matmul's weighted error drops; a fold on the wrong side (x * s) or a missed one
    multiplies the error instead. The real model's figures: benchmarks/results/decoder_graph_accuracy.md."""
    import dataclasses

    from emrrg.export.decoder_eval import prefill_feeds
    from emrrg.export.quantize_decoder import collect_activation_stats

    llm, tok = tiny_llm(seed=9)
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.input_layernorm.weight[:4] *= 30
            layer.post_attention_layernorm.weight[:4] *= 30
    src, shape = ModuleWeights(llm), _module_shape(llm)
    f32 = build_decoder(src, shape, tmp_path / "f32")
    embed = src.get("model.embed_tokens.weight")
    stats = collect_activation_stats(f32.path, prefill_feeds(f32.spec, embed, eval_prompts(tok, n=2, prompt_tokens=64)))
    base = QuantConfig("affine", accuracy_level=0, lm_head_bits=32)
    plain = build_decoder(src, shape, tmp_path / "plain", quant=base, act_stats=stats)
    awq = build_decoder(src, shape, tmp_path / "awq", quant=dataclasses.replace(base, awq_scale=True), act_stats=stats)
    scaled = {r["name"]: r for r in awq.nodes if r.get("awq_alpha")}
    assert {n.rsplit(".", 1)[-1] for n in scaled} == {"qkv_proj", "gate_up_proj", "down_proj"}   # o_proj: no fold
    for r in plain.nodes:
        if r["name"] in scaled:
            assert scaled[r["name"]]["rel_err"] < r["rel_err"], r["name"]
    prompts = eval_prompts(tok, n=3, prompt_tokens=64, first_report=40)
    ref = [OrtScorer(f32.path, embed).run(embed[[p]], None)[0] for p in prompts]
    errs = {name: float(np.mean([np.abs(OrtScorer(res.path, embed).run(embed[[p]], None)[0] - r).mean()
                                 for p, r in zip(prompts, ref)]))
            for name, res in (("plain", plain), ("awq", awq))}
    print("mean |logit error| vs f32:", errs)
    assert errs["awq"] < 0.75 * errs["plain"]          # measured 0.013 vs 0.026


def test_awq_keeps_alpha_zero_without_outliers():
    """Equal activation energy on every channel: every alpha gives s = 1, and the search keeps alpha 0."""
    from emrrg.export.quantize_decoder import awq_scales

    w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    s, alpha = awq_scales(w, np.full(64, 2.0, np.float32), 4, QuantConfig("asym", method="asym"))
    assert alpha == 0.0 and np.all(s == 1.0)


def test_affine_block_larger_than_k(tmp_path):
    """Block 128 on K = 64 (hidden) and 128: a partial last block, which MatMulNBits pads with zeros and the
    block-sum indicator covers as far as K goes; on a grid of 128 the encoding is still exact."""
    llm, _ = tiny_llm(seed=4)
    _snap_to_grid(llm, bs=128)
    src, shape = ModuleWeights(llm), _module_shape(llm)
    f32 = build_decoder(src, shape, tmp_path / "f32")
    q = build_decoder(src, shape, tmp_path / "q", quant=QuantConfig("b128", block_size=128, accuracy_level=0,
                                                                    lm_head_bits=4))
    embed = src.get("model.embed_tokens.weight")
    ids = np.random.default_rng(1).integers(4, 512, size=(1, 12))
    a = OrtScorer(f32.path, embed).run(embed[ids], None)[0]
    assert report("affine block 128, K = 64", OrtScorer(q.path, embed).run(embed[ids], None)[0], a) <= ATOL_GRID_LOGITS


def test_quantized_ladder_rungs_on_tiny(built, tmp_path):
    llm, tok, exp = built
    quantize = quantized_builder(ModuleWeights(llm), _module_shape(llm))
    ref = build_reference(TorchDecoder(llm), eval_prompts(tok, n=2, prompt_tokens=64), n_new=16)
    ev = DecoderEvaluator(ref, exp.embed_tokens, greedy=False)
    assert BUILT_LADDER[0].method == "asym"                           # the cheapest encoding is tried first
    for cfg in (BUILT_LADDER[0], QuantConfig("affine-b32-lm8"), QuantConfig("w2", worst_k_8bit=2)):
        res = quantize(cfg, tmp_path / cfg.name)
        m = onnx.load(str(res.path), load_external_data=False)
        nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
        zp = [n for n in nbits if len(n.input) > 3 and n.input[3]]
        assert len(nbits) == 4 * 2 + 1 and res.bytes < 0.5 * res.f32_bytes
        # uint8 zero points on every 4-bit matmul (asym; affine: + the f16 rest); 8-bit ones are Q8_0, without
        assert len(zp) == sum(r["bits"] == 4 for r in res.nodes)
        if cfg.worst_k_8bit:
            assert sum(r["bits"] == 8 for r in res.nodes) == 2 + 1     # two worst at 8 bits, plus the lm_head
        r = ev(res.path)
        print(f"{cfg.name}: top1 {r.top1:.3f} KL {r.kl_mean:.5f}")
        assert r.top1 >= TINY_TOP1_MIN


def test_streams_from_safetensors(built, tmp_path):
    """The same graph from a bf16 safetensors file, read tensor by tensor, equals the in-memory build's on
    those bf16 weights."""
    from safetensors.torch import save_file

    llm, _, _ = built
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in llm.state_dict().items()
             if k != "lm_head.weight"}                                 # tied: the file holds the embedding only
    save_file(state, str(tmp_path / "model.safetensors"))
    src = SafetensorsWeights([tmp_path / "model.safetensors"])
    shape = LlamaShape.from_config(llm.config)
    res = build_decoder(src, shape, tmp_path / "out")
    embed = src.get("model.embed_tokens.weight")
    ids = np.random.default_rng(1).integers(4, 512, size=(1, 8))
    got = OrtScorer(res.path, embed).run(embed[ids], None)[0]
    bf = tiny_llm(tie_word_embeddings=True)[0]
    with torch.no_grad():
        for k, v in bf.state_dict().items():
            v.copy_(state.get(k, state["model.embed_tokens.weight"]).float())
    ref = torch_steps(bf, embed, ids, [8])[0][:, -1:]
    assert report("safetensors build", got, ref) <= ATOL_ORT_F32


def test_unknown_architecture_falls_back_to_traced(tmp_path):
    from emrrg.export.pipeline import ExportOptions, _export_decoder

    llm, tok = tiny_llm(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(BuilderUnsupported, match="rope"):
        LlamaShape.from_config(llm.config)
    lines = []
    dec = _export_decoder(SimpleNamespace(llama_model=llm, tokenizer=tok), tmp_path, ExportOptions(llm_bits=32),
                          lines.append)
    assert dec.spec.cache == "concat" and any("torch.onnx" in x for x in lines)
    traced = _export_decoder(SimpleNamespace(llama_model=tiny_llm()[0], tokenizer=tok), tmp_path / "t",
                             ExportOptions(llm_bits=32, extra={"decoder_graph": "traced"}), lines.append)
    assert traced.spec.cache == "concat" and len(lines) == 1
