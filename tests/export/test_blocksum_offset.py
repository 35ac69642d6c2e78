"""The affine encoding's block-offset correction in the built decoder: one com.emrrg::BlockSumMatMulAdd node per
projection (integer zero points + f16 rest), against the standard-ONNX graph it replaces.

Tolerances:
- ZP_F16_STEP: decoder_builder.integer_zero_points stores r = m + s*z (|r| <= s/2) as f16, whose relative
  rounding is 2^-11: each weight moves by at most s/4096 of its block's scale s. 1/4000 leaves f32 slack.
- ATOL_OFFSET_GRAPHS: logits of the tiny decoder (magnitude ~1) built three ways with f32 activations
  (accuracy_level 0): the f16 rest moves weights by <= s/4096 and the graphs sum in different orders; measured
  1.3e-5 (fused: f16 rest) and 1e-7 (fused_f32). A correction on the wrong projection or block moves them by >= 1e-2. (With accuracy_level 4 the int8
  activation rounding turns such 1e-7 differences into occasional flips of a rounding step, so graphs are
  compared at level 0; SmolLM2's level-4 accuracy is in benchmarks/results/decoder_graph_accuracy.md.)
"""
import numpy as np
import onnx
import pytest

from emrrg.export.decoder_builder import ModuleWeights, _module_shape, build_decoder, integer_zero_points
from emrrg.export.decoder_eval import OrtScorer
from emrrg.export.quantize_decoder import QuantConfig, quantize_weight
from emrrg.runtime import oplib
from tests.export.test_decoder_export import report, tiny_llm

ZP_F16_STEP = 1 / 4000
ATOL_OFFSET_GRAPHS = 1e-4


def _unpack_zp(packed: np.ndarray, nb: int) -> np.ndarray:
    return np.stack([packed & 0xF, packed >> 4], -1).reshape(packed.shape[0], -1)[:, :nb]


def test_integer_zero_points_keep_the_affine_weights():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 48)) * 0.05 + rng.uniform(-0.05, 0.05, (1, 48))).astype(np.float32)
    qw = quantize_weight(w, 4, 32, "affine")
    zq = integer_zero_points(qw)
    assert zq.correction.dtype == np.float16 and zq.zero_points.dtype == np.uint8 and zq.zero_points.shape == (48, 4)
    q = np.stack([qw.packed & 0xF, qw.packed >> 4], -1).reshape(48, 8, 32).astype(np.float32)     # (N, nb, bs)
    z = _unpack_zp(zq.zero_points, 8).astype(np.float32)
    s = zq.scales
    deq = s[..., None] * (q - z[..., None]) + zq.correction.T.astype(np.float32)[..., None]
    err = np.abs(deq.reshape(48, -1).T - qw.dequantized) / np.repeat(s.T, 32, axis=0)
    print(f"integer zero points + f16 rest: max weight change {err.max():.2e} x s")
    assert err.max() <= ZP_F16_STEP
    assert np.abs(zq.correction.astype(np.float32)).max() <= 0.5 * s.max() * (1 + 1e-3)   # the small rest only


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    llm, _ = tiny_llm(seed=5)
    src, shape = ModuleWeights(llm), _module_shape(llm)
    cfg = QuantConfig("affine", accuracy_level=0, lm_head_bits=4)
    out = tmp_path_factory.mktemp("offsets")
    paths = {g: build_decoder(src, shape, out / g, quant=cfg, offset_graph=g).path for g in ("fused", "fused_f32", "onnx")}
    return src, shape, paths


def test_fused_graph_nodes(graphs):
    _, shape, paths = graphs
    m = onnx.load(str(paths["fused"]), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    # one correction node per projection (packed qkv, o, packed gate/up, down) and for the lm_head, no block-sum
    # MatMul or Add left; the node's standard-ONNX body travels in the model
    assert ops.count(oplib.BLOCKSUM_OP_TYPE) == 4 * shape.layers + 1 and "MatMul" not in ops and "Add" not in ops
    assert [(f.domain, f.name) for f in m.functions] == [(oplib.OP_DOMAIN, oplib.BLOCKSUM_OP_TYPE)]
    zp = [n for n in m.graph.node if n.op_type == "MatMulNBits" and len(n.input) > 3]
    assert len(zp) == 4 * shape.layers + 1
    old = [n.op_type for n in onnx.load(str(paths["onnx"]), load_external_data=False).graph.node]
    assert oplib.BLOCKSUM_OP_TYPE not in old and old.count("Add") == 4 * shape.layers + 1


@pytest.mark.parametrize("env_lib", [None, "/nonexistent/libemrrg_ops.so"], ids=["op", "function_body"])
def test_three_graphs_same_logits(graphs, env_lib, monkeypatch):
    """The fused graph with the op library (its kernel) and without it (the function body, as a machine without
    the library runs it) gives the logits of the standard-ONNX graph."""
    src, _, paths = graphs
    if env_lib is None and oplib.find_op_library() is None:
        pytest.skip("libemrrg_ops.so not built (bash scripts/build_plugins.sh)")
    embed = src.get("model.embed_tokens.weight")
    ids = np.random.default_rng(2).integers(4, 512, size=(1, 11))
    ref = OrtScorer(paths["onnx"], embed).run(embed[ids], None)[0]
    if env_lib:
        monkeypatch.setenv(oplib.ENV_VAR, env_lib)
        assert oplib.find_op_library() is None
    for g in ("fused", "fused_f32"):
        scorer = OrtScorer(paths[g], embed)
        logits, past = scorer.run(embed[ids[:, :10]], None)                  # prefill, then one decode step
        step, _ = scorer.run(embed[ids[:, 10:]], past)
        assert report(f"{g} prefill", logits, OrtScorer(paths["onnx"], embed).run(embed[ids[:, :10]], None)[0]) \
            <= ATOL_OFFSET_GRAPHS
        assert report(f"{g} step", step, ref) <= ATOL_OFFSET_GRAPHS


def test_runtime_step_model_on_the_fused_graph(graphs):
    """The runtime's StepModel (one cache buffer per layer bound as past and present, IOBinding) writes the same
    greedy tokens on the fused graph as on the standard-ONNX one."""
    from emrrg.export.decoder_onnx import ort_session
    from emrrg.runtime.decoder_shared import SharedCacheDecoder
    from emrrg.runtime.generation import DecodeSettings, greedy

    src, shape, paths = graphs
    embed = src.get("model.embed_tokens.weight")
    prompt = embed[np.random.default_rng(3).integers(4, 512, size=9)][None]
    s = DecodeSettings(num_beams=1, repetition_penalty=1.0, min_new_tokens=24, max_new_tokens=24, eos_token_id=2)
    out = {}
    for g in ("fused", "onnx"):
        dec = SharedCacheDecoder(ort_session(paths[g]), embed, shape.layers, shape.kv_heads, shape.head_dim,
                                 max_len=64, max_rows=2)
        out[g] = greedy(dec, prompt, s)
    assert out["fused"] == out["onnx"] and len(out["fused"]) == 24
