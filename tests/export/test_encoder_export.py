"""Encoder export: custom-op and pure-ONNX graphs against PyTorch, dynamic B / V / L, and the INT8 Q/DQ graph.

The tiny preset (64 px, 17 tokens, D=32, depth 2) keeps the file fast; the base encoder's export and its
INT8 accuracy are measured in benchmarks/encoder_int8.py. Tolerances:

- f32 ONNX vs f32 PyTorch: emrrg.export.encoder_onnx.F32_THRESHOLDS (the exporter's own bar: f32 rounding
  of the same arithmetic in another order).
- the standard-ONNX scan alone vs selective_scan_ref: RTOL/ATOL_SCAN, f32 rounding of an L-step recurrence
  (as in tests/ops/test_selective_scan.py).
- INT8 on the random tiny model: TINY_INT8_MIN_COSINE, looser than the issue's 0.995 for the trained base
  encoder: 18 calibration images and random weights whose activation ranges say little about real ones.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from emrrg.assets import real_xrays  # noqa: E402
from emrrg.config import encoder_config  # noqa: E402
from emrrg.encoder import MambaXrayEncoder  # noqa: E402
from emrrg.export import onnx_ops  # noqa: E402
from emrrg.export.encoder_onnx import (F32_THRESHOLDS, METADATA_VARIANT, ValidationError, VisualTokens,  # noqa: E402
                                       compare, export_encoder, get_metadata, make_session, run_onnx,
                                       run_reference, validate_encoder)
from emrrg.export.quantize_encoder import (CalibrationError, check_int8_graph, list_calibration_images,  # noqa: E402
                                           load_calibration_set, quantize_int8, scan_projection_nodes)
from emrrg.ops.selective_scan import selective_scan_ref  # noqa: E402
from emrrg.runtime import oplib  # noqa: E402

RTOL_SCAN, ATOL_SCAN = 1e-5, 1e-5
TINY_INT8_MIN_COSINE = 0.99
H_LLM = 48  # a small projector width for the tiny tests


def _check(name: str, out: np.ndarray, ref: np.ndarray, th=F32_THRESHOLDS) -> dict:
    m = compare(out, ref)
    print(f"{name}: max|Δ| {m['max_abs']:.3e} NMSE {m['nmse']:.3e} mean cos {m['mean_cosine']:.7f}")
    assert m["finite"], f"{name}: NaN/inf in the ONNX output"
    assert m["nmse"] <= th.max_nmse and m["max_abs"] <= th.max_abs and m["mean_cosine"] >= th.min_mean_cosine, m
    return m


@pytest.fixture(scope="module")
def tiny() -> VisualTokens:
    torch.manual_seed(0)
    enc = MambaXrayEncoder(encoder_config("tiny")).eval()
    return VisualTokens(enc, nn.Sequential(nn.Linear(enc.cfg.d_model, H_LLM), nn.LayerNorm(H_LLM))).eval()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("encoder_export")
    info = export_encoder(tiny, d / "encoder.onnx", variant="custom_op")
    pure = export_encoder(tiny, d / "encoder.pure.onnx", variant="pure_onnx")
    return {"dir": d, "custom": d / "encoder.onnx", "pure": d / "encoder.pure.onnx", "info": info, "pure_info": pure}


@pytest.fixture(scope="module")
def int8(exported) -> dict:
    d = exported["dir"]
    info = quantize_int8(exported["custom"], exported["pure"], None, d / "encoder.int8.onnx",
                         pure_out_path=d / "encoder.int8.pure.onnx")
    return info


def _pixels(b: int, v: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, v, 3, 64, 64)).astype(np.float32)


def _library_or_skip():
    if oplib.find_op_library() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {oplib.LIBRARY_NAME} is missing: run bash scripts/build_plugins.sh first")
        pytest.skip(f"{oplib.LIBRARY_NAME} is not built (bash scripts/build_plugins.sh); the custom-op graph "
                    "cannot run in ONNX Runtime without it")


# --------------------------------------------------------------------------------------- the op itself

def test_schema_is_registered_and_enforced():
    assert onnx.defs.has(onnx_ops.OP_TYPE, onnx_ops.DOMAIN)
    dims = {"u": ["b", 8, "L"], "delta": ["b", 8, "L"], "A": [8, 4], "B": ["b", 4, 4, "L"], "C": ["b", 4, 4, "L"],
            "D": [8], "z": ["b", 8, "L"], "delta_bias": [8]}
    ins = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, dims[n]) for n in onnx_ops.INPUT_NAMES]
    out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 8, "L"])

    def model(**attrs):
        node = onnx.helper.make_node(onnx_ops.OP_TYPE, list(onnx_ops.INPUT_NAMES), ["y"], domain=onnx_ops.DOMAIN, **attrs)
        g = onnx.helper.make_graph([node], "g", ins, [out])
        return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                        onnx.helper.make_opsetid(onnx_ops.DOMAIN, 1)])

    onnx.checker.check_model(model(delta_softplus=1, plugin_version="1", plugin_namespace="emrrg"), full_check=True)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model(not_an_attribute=3), full_check=True)


def test_torch_custom_op_is_the_reference():
    g = torch.Generator().manual_seed(0)
    b, d, L, n, grp = 2, 16, 9, 4, 4
    args = (torch.randn(b, d, L, generator=g), torch.randn(b, d, L, generator=g), -torch.rand(d, n, generator=g) - 0.1,
            torch.randn(b, grp, n, L, generator=g), torch.randn(b, grp, n, L, generator=g), torch.randn(d, generator=g),
            torch.randn(b, d, L, generator=g), torch.randn(d, generator=g))
    torch.testing.assert_close(torch.ops.emrrg.selective_scan(*args, True), selective_scan_ref(*args, True), rtol=0, atol=0)
    torch.testing.assert_close(onnx_ops.selective_scan_onnx_scan(*args, True), selective_scan_ref(*args, True),
                               rtol=RTOL_SCAN, atol=ATOL_SCAN)


@pytest.mark.parametrize("b,L", [(1, 2), (3, 17), (2, 40)])
def test_standard_onnx_scan_has_dynamic_batch_and_length(b, L):
    """The pure_onnx scan body is one ONNX Scan whose trip count is the runtime L (not the traced 9)."""
    d, n, g = 4 * 32, 16, 4  # the tiny encoder's fused scan: D = 4 x d_model; lru-cached from the export fixture
    fn = onnx_ops.scan_function(d, n, g, 1)
    assert [nd.op_type for nd in fn.node].count("Scan") == 1
    call = onnx.helper.make_node(fn.name, list(onnx_ops.INPUT_NAMES), ["y"], domain=onnx_ops.PURE_DOMAIN)
    dims = {"u": ["b", d, "L"], "delta": ["b", d, "L"], "A": [d, n], "B": ["b", g, n, "L"], "C": ["b", g, n, "L"],
            "D": [d], "z": ["b", d, "L"], "delta_bias": [d]}
    ins = [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, dims[x]) for x in onnx_ops.INPUT_NAMES]
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", d, "L"])
    graph = onnx.helper.make_graph([call], "scan", ins, [y])
    model = onnx.helper.make_model(graph, functions=[fn], opset_imports=[
        onnx.helper.make_opsetid("", onnx_ops.DEFAULT_OPSET), onnx.helper.make_opsetid(onnx_ops.PURE_DOMAIN, 1)])
    onnx.checker.check_model(model)
    gen = torch.Generator().manual_seed(L)
    args = (torch.randn(b, d, L, generator=gen), torch.randn(b, d, L, generator=gen), -torch.rand(d, n, generator=gen) - 0.1,
            torch.randn(b, g, n, L, generator=gen), torch.randn(b, g, n, L, generator=gen), torch.randn(d, generator=gen),
            torch.randn(b, d, L, generator=gen), torch.randn(d, generator=gen))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in zip(onnx_ops.INPUT_NAMES, args)})[0]
    want = selective_scan_ref(*args, True).numpy()
    print(f"b={b} L={L}: max |diff| {np.abs(got - want).max():.3e}")
    assert got.shape == (b, d, L) and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=RTOL_SCAN, atol=ATOL_SCAN)


def test_export_rewrites_keep_the_arithmetic_and_restore_the_module(tiny):
    """fused_swiglu / fused_mixer_layout / scan_as_custom_op: same output inside, the module untouched after."""
    from emrrg.export.encoder_onnx import fused_mixer_layout, fused_swiglu

    keys = set(tiny.state_dict())
    x = torch.from_numpy(_pixels(2, 2, seed=4))
    with torch.no_grad():
        want = tiny(x)
        with fused_swiglu(tiny), fused_mixer_layout(tiny), onnx_ops.scan_as_custom_op(tiny):
            got = tiny(x)
        after = tiny(x)
    print(f"rewrites: max |diff| {(got - want).abs().max().item():.3e}")
    torch.testing.assert_close(got, want, rtol=RTOL_SCAN, atol=ATOL_SCAN)
    torch.testing.assert_close(after, want, rtol=0, atol=0)
    assert set(tiny.state_dict()) == keys
    mixer = tiny.encoder.layers[0].mixer
    assert "stacked_weights" not in vars(mixer) and "forward" not in vars(tiny.encoder.layers[0].mlp)
    assert not any(k.startswith("_export_") for k in mixer._parameters)
    assert mixer.scan_fn is not torch.ops.emrrg.selective_scan


# --------------------------------------------------------------------------------------- custom-op graph

def test_custom_op_export_structure(exported, tiny):
    cfg = tiny.encoder.cfg
    model = onnx.load(str(exported["custom"]))
    onnx.checker.check_model(model, full_check=True)
    assert get_metadata(model)[METADATA_VARIANT] == "custom_op"
    scans = [n for n in model.graph.node if n.domain == onnx_ops.DOMAIN and n.op_type == onnx_ops.OP_TYPE]
    assert len(scans) == cfg.depth == exported["info"]["scan_nodes"]
    shapes = {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
              for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    D4, N, L = 4 * cfg.d_inner, cfg.d_state, cfg.num_tokens
    for n in scans:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"delta_softplus": 1, "plugin_version": b"1", "plugin_namespace": b"emrrg"}
        assert len(n.input) == 8 and all(n.input)
        assert shapes[n.input[0]][1:] == [D4, L]                 # u: (B*V, 4D, L)
        assert shapes[n.input[3]][1:] == [4, N, L]               # B: (B*V, G=4, N, L)
        assert shapes[n.input[4]][1:] == [4, N, L]               # C
    gathers = sum(n.op_type == "Gather" for n in model.graph.node)
    assert gathers >= 2 * cfg.depth  # the direction orders and their inverses are Gathers outside the op
    (inp,), (out,) = model.graph.input, model.graph.output
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert inp.name == "pixel_values" and isinstance(in_dims[0], str) and isinstance(in_dims[1], str)
    assert in_dims[2:] == [3, 64, 64]
    assert out.name == "visual_tokens" and out_dims[0] == in_dims[0] and out_dims[1:] == [L, H_LLM]


def test_pure_twin_of_a_custom_export_is_the_pure_export(exported):
    from emrrg.export.encoder_onnx import pure_onnx_twin

    twin = pure_onnx_twin(exported["custom"], exported["dir"] / "twin.onnx")
    a, b = onnx.load(twin["path"]), onnx.load(str(exported["pure"]))
    assert [(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in a.graph.node] == \
           [(n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in b.graph.node]
    assert get_metadata(a)[METADATA_VARIANT] == "pure_onnx"


def test_expand_and_collapse_are_inverse(exported):
    custom = onnx.load(str(exported["custom"]))
    pure = onnx.load(str(exported["pure"]))
    assert onnx_ops.count_scan_nodes(pure) == {"custom_op": 0, "pure_onnx": exported["info"]["scan_nodes"]}
    back = onnx_ops.collapse_scan_functions(pure)

    def sig(m):
        return [(n.name, n.domain, n.op_type, tuple(n.input), tuple(n.output),
                 sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)) for n in m.graph.node]
    assert sig(back) == sig(custom)
    assert not back.functions


@pytest.mark.parametrize("b,v", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_pure_onnx_matches_pytorch_without_library(exported, tiny, b, v):
    """Plain ONNX Runtime, no op library registered: the fallback must run anywhere."""
    sess = ort.InferenceSession(str(exported["pure"]), providers=["CPUExecutionProvider"])
    px = _pixels(b, v, seed=10 * b + v)
    out = run_onnx(sess, px)
    ref = run_reference(tiny, px)
    assert out.shape == (b, tiny.encoder.cfg.num_tokens, H_LLM)
    _check(f"pure_onnx B={b} V={v}", out, ref)


def test_views_are_averaged_like_encode_images(exported, tiny):
    """V=2 output == projector(mean of the two single-view token sets), as EMRRG.encode_images does."""
    sess = ort.InferenceSession(str(exported["pure"]), providers=["CPUExecutionProvider"])
    px = _pixels(1, 2, seed=3)
    with torch.no_grad():
        per_view = tiny.encoder(torch.from_numpy(px[0]))                # (2, L, D)
        want = tiny.projector(per_view.mean(0, keepdim=True)).numpy()   # (1, L, H)
    _check("views averaged", run_onnx(sess, px), want)


@pytest.mark.parametrize("b,v", [(1, 1), (2, 2)])
def test_custom_op_matches_pytorch_with_library(exported, tiny, b, v):
    _library_or_skip()
    sess = make_session(exported["custom"])  # registers libemrrg_ops.so
    px = _pixels(b, v, seed=b + 7 * v)
    _check(f"custom_op B={b} V={v}", run_onnx(sess, px), run_reference(tiny, px))


def test_custom_op_graph_needs_the_library(exported):
    with pytest.raises(Exception, match="SelectiveScan|com.emrrg"):
        ort.InferenceSession(str(exported["custom"]), providers=["CPUExecutionProvider"])


def test_validate_encoder_reports_and_raises(exported, tiny):
    report = validate_encoder(exported["pure"], tiny, {"xrays": real_xrays()[:3]}, oplib=None)
    assert report["passed"] and report["sets"]["xrays"]["studies"] == 3
    torch.manual_seed(1)
    other = VisualTokens(MambaXrayEncoder(encoder_config("tiny")).eval(), tiny.projector)
    with pytest.raises(ValidationError, match="NMSE"):
        validate_encoder(exported["pure"], other, {"xrays": real_xrays()[:2]}, oplib=None)


# --------------------------------------------------------------------------------------- INT8

def test_int8_graph_is_explicit_qdq_with_a_float_scan(int8, exported, tiny):
    model = onnx.load(int8["path"])
    onnx.checker.check_model(model, full_check=True)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ("", "QuantizeLinear") in ops and ("", "DequantizeLinear") in ops
    assert not any(t.startswith("QLinear") or d == "com.microsoft" for d, t in ops)
    scans = [n for n in model.graph.node if n.domain == onnx_ops.DOMAIN]
    assert len(scans) == tiny.encoder.cfg.depth
    producer = {o: n for n in model.graph.node for o in n.output}
    for s in scans:  # float in (no QuantizeLinear feeds it), float out (not re-quantized)
        assert not any(producer.get(i) is not None and producer[i].op_type == "QuantizeLinear" for i in s.input)
    checks = check_int8_graph(model)
    assert checks["scan_nodes"] == tiny.encoder.cfg.depth
    float_ops = {n.op_type for n in model.graph.node
                 if any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input)}
    assert float_ops <= {"MatMul", "Gemm", "Conv"}, f"only MatMul/Gemm/Conv read dequantized tensors, got {float_ops}"
    assert get_metadata(model)["emrrg.precision"] == "int8-qdq"
    cal = int8["calibration"]
    assert cal["count"] == 18 and cal["method"] == "minmax" and len(cal["images"][0]["sha256"]) == 64
    # x_proj / dt_proj: weight-only int8 (a DQ on the weight, no Q on the activation), nothing left in f32
    proj = set(scan_projection_nodes(model))
    assert proj and cal["scan_projections_weight_only_int8"]["weights"] == len(proj)
    inits = {i.name: i for i in model.graph.initializer}
    q_out = {o for n in model.graph.node if n.op_type == "QuantizeLinear" for o in n.output}
    for n in model.graph.node:
        if n.name in proj:
            ops = [producer[i].op_type if i in producer else None for i in n.input]
            assert ops.count("DequantizeLinear") == 1 and not q_out & set(n.input)      # DQ'd weight, float activation
            dq = producer[n.input[ops.index("DequantizeLinear")]]
            assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8


def test_smoothquant_is_exact_in_f32(exported):
    """smooth_activations only rescales (activation / s, weight row * s): the f32 function is unchanged.

    The random tiny model shares one LayerNorm weight initializer between its norms (all ones), so this
    also checks that a shared initializer is copied before it is rescaled."""
    from emrrg.export.quantize_encoder import smooth_activations

    pure = onnx.load(str(exported["pure"]))
    pixels = load_calibration_set(real_xrays()[:3], 64)[0]
    smoothed, info = smooth_activations(pure, pixels, alpha=0.5)
    assert info["layernorm"] > 0 and info["div"] > 0 and info["mul_inserted"] > 0
    assert info["max_outlier_ratio_after"] < info["max_outlier_ratio_before"]
    px = np.concatenate([pixels[:, None], _pixels(2, 2, seed=11)[:, :1]])
    a = run_onnx(ort.InferenceSession(pure.SerializeToString(), providers=["CPUExecutionProvider"]), px)
    b = run_onnx(ort.InferenceSession(smoothed.SerializeToString(), providers=["CPUExecutionProvider"]), px)
    _check("smoothed vs plain f32", b, a)


def test_int8_pure_runs_without_library_and_is_close(int8, exported, tiny):
    px = np.concatenate([_pixels(2, 1, seed=5), load_calibration_set(real_xrays()[:4], 64)[0][:, None]])
    ref = run_reference(tiny, px)
    out = run_onnx(ort.InferenceSession(int8["pure_path"], providers=["CPUExecutionProvider"]), px)
    m = compare(out, ref)
    print(f"tiny INT8 vs f32: NMSE {m['nmse']:.3e} mean cos {m['mean_cosine']:.6f} (min {m['min_cosine']:.6f})")
    assert m["finite"] and m["mean_cosine"] >= TINY_INT8_MIN_COSINE


def test_int8_custom_op_matches_its_pure_twin(int8):
    _library_or_skip()
    px = _pixels(2, 2, seed=9)
    a = run_onnx(make_session(int8["path"]), px)
    b = run_onnx(ort.InferenceSession(int8["pure_path"], providers=["CPUExecutionProvider"]), px)
    _check("int8 custom_op vs int8 pure_onnx", a, b)


# --------------------------------------------------------------------------------------- calibration input

def test_calibration_folder_without_images(tmp_path):
    with pytest.raises(CalibrationError, match="no DICOM/PNG/JPEG"):
        list_calibration_images(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(CalibrationError, match="no DICOM/PNG/JPEG"):
        load_calibration_set(tmp_path, 64)
    (tmp_path / "broken.png").write_text("a text file with an image's name")
    with pytest.raises(CalibrationError, match="no usable calibration images"):
        load_calibration_set(tmp_path, 64)
    with pytest.raises(CalibrationError, match="does not exist"):
        list_calibration_images(tmp_path / "missing")


def test_calibration_folder_skips_unreadable_files(tmp_path):
    import shutil

    shutil.copy(real_xrays()[2], tmp_path / "a.jpeg")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    pixels, facts = load_calibration_set(tmp_path, 64)
    assert pixels.shape == (1, 3, 64, 64) and facts["count"] == 1
    assert [s["name"] for s in facts["skipped"]] == ["b.png"]


def test_one_saver_inline_and_external(tmp_path, monkeypatch):
    """encoder_onnx.save_model is decoder_onnx.save_onnx plus the checker: inline under the limit, one .data file
    above it (a stale .data of an earlier save removed), the same graph read back either way."""
    import onnx.helper as oh
    from onnx import numpy_helper

    from emrrg.export import decoder_onnx
    from emrrg.export.encoder_onnx import save_model

    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
                          [numpy_helper.from_array(w, "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)])
    out = tmp_path / "m.onnx"
    (tmp_path / "m.onnx.data").write_bytes(b"stale")
    inline = save_model(model, out)
    assert inline["external_data"] is None and not (tmp_path / "m.onnx.data").exists()
    monkeypatch.setattr(decoder_onnx, "EXTERNAL_DATA_ABOVE_BYTES", w.nbytes - 1)   # just below the weights
    external = save_model(model, out)
    assert external["external_data"] == "m.onnx.data" and (tmp_path / "m.onnx.data").stat().st_size == w.nbytes
    assert external["bytes"] == out.stat().st_size + w.nbytes
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(str(out)).graph.initializer[0]), w)
