"""The TensorRT plugin and backend on a GPU with TensorRT: parse, build, serialize, run, compare.

  * single-node com.emrrg::SelectiveScan models (5 to 8 inputs, an absent input in the middle, f32 and f16
    activations, dynamic batch and L) built into engines with libemrrg_trt_plugin.so: the engine's output
    against the float64 truth, and bit-equal to the CUDA kernel run directly (same kernel) when the shim
    is built; the plan deserialized again (getFieldsToSerialize -> createPlugin(kRUNTIME)) gives the same;
  * a state size beyond the kernel's (N = 65) fails the build with the plugin's message, not a crash;
  * the tiny encoder exported to ONNX (custom op) as an fp32 engine against PyTorch, and a real tiny
    bundle through TensorRTEncoder.from_bundle (precision auto) against ONNX Runtime CPU.

Marked `tensorrt`: skipped unless `import tensorrt` works and a GPU is visible (tests/conftest.py). The
plugin library missing is a skip, or a failure under EMRRG_REQUIRE_GPU_BUILD=1 (scripts/gpu-check.sh).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests import scan_reference as ref

from . import scan_cases as sc

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from emrrg.runtime import tensorrt as trtb  # noqa: E402

ENCODER_F32_MAX_NMSE = 1e-8               # fp32 engine (TF32 off) vs PyTorch f32: the exporter's F32 bound
BUNDLE_MAX_NMSE = 1e-2                    # auto precision (fp16 / int8 on TensorRT 10) vs ORT: the INT8 bound


@pytest.fixture(scope="module")
def plugin():
    lib = trtb.find_plugin_library()
    if lib is None:
        msg = f"{trtb.PLUGIN_LIBRARY_NAME} not built; build with: bash scripts/gpu-check.sh (TensorRT found by CMake)"
        if os.environ.get("EMRRG_REQUIRE_GPU_BUILD") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return trtb.load_plugin(lib)


def scan_model(present: dict, f16: bool, softplus: int = 1, middle_gap: bool = False) -> bytes:
    """One SelectiveScan node; `middle_gap` writes absent optionals as empty names instead of dropping them."""
    act = TensorProto.FLOAT16 if f16 else TensorProto.FLOAT
    names = ["u", "delta", "A", "B", "C"] + [n if present[n] else "" for n in ("D", "z", "delta_bias")]
    if not middle_gap:
        names = [n for n in names if n]
    else:
        while names[-1] == "":
            names.pop()
    node = helper.make_node("SelectiveScan", names, ["y"], domain="com.emrrg", delta_softplus=softplus,
                            plugin_version="1", plugin_namespace="emrrg")

    def vi(n, e, dims):
        return helper.make_tensor_value_info(n, e, dims)

    inputs = [vi("u", act, ["b", 88, "l"]), vi("delta", act, ["b", 88, "l"]), vi("A", TensorProto.FLOAT, [88, 16]),
              vi("B", act, ["b", 4, 16, "l"]), vi("C", act, ["b", 4, 16, "l"])]
    if present["D"]:
        inputs.append(vi("D", TensorProto.FLOAT, [88]))
    if present["z"]:
        inputs.append(vi("z", act, ["b", 88, "l"]))
    if present["delta_bias"]:
        inputs.append(vi("delta_bias", TensorProto.FLOAT, [88]))
    graph = helper.make_graph([node], "scan", inputs, [vi("y", act, ["b", 88, "l"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.emrrg", 1)],
                              ir_version=8)
    return model.SerializeToString()


def _profile(present):
    p = {"u": ((1, 88, 1), (2, 88, 37), (4, 88, 256)), "delta": ((1, 88, 1), (2, 88, 37), (4, 88, 256)),
         "B": ((1, 4, 16, 1), (2, 4, 16, 37), (4, 4, 16, 256)), "C": ((1, 4, 16, 1), (2, 4, 16, 37), (4, 4, 16, 256))}
    if present["z"]:
        p["z"] = p["u"]
    return p


PRESENCE = [dict(D=True, z=True, delta_bias=True), dict(D=False, z=False, delta_bias=False),
            dict(D=True, z=False, delta_bias=False), dict(D=True, z=True, delta_bias=False)]


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("present,gap", [(p, False) for p in PRESENCE] +
                         [(dict(D=False, z=True, delta_bias=True), True), (dict(D=True, z=False, delta_bias=True), True)],
                         ids=["all", "none", "D", "Dz", "gap-z-bias", "gap-D-bias"])
def test_single_node_engine(plugin, tmp_path, present, gap, f16):
    trt = pytest.importorskip("tensorrt")
    if f16 and trtb.trt_major(trt.__version__) < 11:
        precision = "fp16"  # TensorRT 10: the FP16 flag (f16 graph I/O either way)
    else:
        precision = "fp32" if not f16 else "fp16"
    path = tmp_path / "scan.onnx"
    path.write_bytes(scan_model(present, f16, middle_gap=gap))
    plan = trtb.build_engine(path, precision, _profile(present), plugin_path=plugin)
    sess = trtb.TensorRTSession(plan, plugin_path=plugin)
    again = trtb.TensorRTSession(plan, plugin_path=plugin)  # deserialization: the plugin from its serialized fields
    shim = sc.load_shim()
    dtype = "f16" if f16 else "f32"
    for batch, seqlen in ((1, 1), (2, 37), (3, 197)):
        case = ref.Case("trt", batch, ref.SMALL_DIM, 4, 16, seqlen, present["D"], present["z"], present["delta_bias"],
                        seed=seqlen)
        feeds = ref.cast_activations(ref.make_inputs(case), dtype)
        y = sess.run(feeds)["y"]
        assert np.array_equal(y, again.run(feeds)["y"], equal_nan=True)
        t = sc.to_device(feeds, dtype)
        truth = ref.truth(feeds, True)
        label = f"{precision} {present} gap={gap} b={batch} L={seqlen}"
        if f16:
            err, scale, _ = ref.errors(y, truth)
            print(f"\n[{label}] engine-f64 max {err.max():.3g} mean {err.mean():.3g}")
            assert np.isfinite(y).all()
            ref32 = sc.scan_ref(t, True, upcast=True).cpu().numpy()
            ref_lp = sc.scan_ref(t, True).float().cpu().numpy()
            ref.assert_no_worse_than(float(np.abs(y.astype(np.float32) - ref32).max()),
                                     float(np.abs(ref_lp - ref32).max()), scale, dtype, label)
        else:
            ref.assert_matches_truth(y, truth, label)
        if shim is not None:  # the engine runs the same kernel: the same bits
            direct = shim.run(t, True, dtype).cpu().numpy()
            assert np.array_equal(y, direct), "engine output differs from the kernel run directly"


def test_state_size_beyond_kernel_fails_cleanly(plugin, tmp_path):
    model = onnx.load_from_string(scan_model(dict(D=True, z=True, delta_bias=True), False))
    for vi in model.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value == 16:
                d.dim_value = 65
    path = tmp_path / "n65.onnx"
    onnx.save(model, path)
    prof = {k: tuple(tuple(65 if x == 16 else x for x in s) for s in v)
            for k, v in _profile(dict(D=True, z=True, delta_bias=True)).items()}
    with pytest.raises(trtb.TensorRTBackendError) as info:
        trtb.build_engine(path, "fp32", prof, plugin_path=plugin)
    print(f"\nexpected build failure: {str(info.value)[:400]}")


def test_tiny_encoder_fp32_engine_vs_pytorch(plugin, tmp_path, tiny_checkpoint):
    pytest.importorskip("onnxscript")
    from emrrg.checkpoint import load_checkpoint
    from emrrg.export.encoder_onnx import export_encoder

    model = load_checkpoint(tiny_checkpoint).eval()
    model.merge_adapters()
    onnx_path = tmp_path / "encoder.onnx"
    export_encoder(model, onnx_path, "custom_op")
    size = model.cfg.encoder.img_size
    rng = np.random.default_rng(0)
    px = rng.standard_normal((2, 2, 3, size, size)).astype(np.float32)
    enc = trtb.TensorRTEncoder(tmp_path, onnx_path, "fp32", image_size=size, cache_dir=tmp_path / "engines",
                               check_pixels=px[:, :1], check_source="random pixels", plugin_path=plugin)
    with torch.no_grad():
        ref = model.encode_images(torch.from_numpy(px)).numpy()
    out = enc.run(px)
    m = trtb.compare_outputs(out, ref)
    print(f"\ntiny encoder fp32 engine vs PyTorch: {m}; build check: {enc.build_info.get('check')}")
    assert m["finite"] and m["nmse"] <= ENCODER_F32_MAX_NMSE
    # the cache: a second encoder loads the plan instead of building
    enc2 = trtb.TensorRTEncoder(tmp_path, onnx_path, "fp32", image_size=size, cache_dir=tmp_path / "engines",
                                plugin_path=plugin)
    assert enc2.plan_path == enc.plan_path and np.array_equal(enc2.run(px), out)


# A weight-only INT8 encoder (int8 weights through DequantizeLinear, float activations) as an int8 engine against
# ORT CPU on the same file: the same weights and float arithmetic, so the bound is the INT8 bundle bound's
# hundredth (TensorRT may still pick fp16 kernels for some layers under the int8 flag).
WEIGHT_ONLY_MAX_NMSE = 1e-4


def test_weight_only_int8_encoder_engine_vs_ort(plugin, tmp_path, tiny_checkpoint):
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    from emrrg.assets import real_xrays
    from emrrg.checkpoint import load_checkpoint
    from emrrg.export.encoder_onnx import export_encoder, pure_onnx_twin
    from emrrg.export.quantize_encoder import quantize_int8
    from emrrg.runtime.sessions import session_options

    model = load_checkpoint(tiny_checkpoint).eval()
    model.merge_adapters()
    export_encoder(model, tmp_path / "e.onnx", "custom_op")
    pure_onnx_twin(tmp_path / "e.onnx", tmp_path / "p.onnx")
    q = quantize_int8(tmp_path / "e.onnx", tmp_path / "p.onnx", real_xrays()[:2], tmp_path / "q.onnx",
                      pure_out_path=tmp_path / "q.scan.onnx", weight_only=True)
    size = model.cfg.encoder.img_size
    px = np.random.default_rng(0).standard_normal((2, 1, 3, size, size)).astype(np.float32)
    ref = ort.InferenceSession(q["pure_path"], session_options(), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": px})[0]
    enc = trtb.TensorRTEncoder(tmp_path, q["path"], "int8", image_size=size, cache_dir=tmp_path / "engines",
                               plugin_path=plugin)
    m = trtb.compare_outputs(enc.run(px), ref)
    print(f"\nweight-only INT8 encoder engine vs ORT CPU: {m}")
    assert m["finite"] and m["nmse"] <= WEIGHT_ONLY_MAX_NMSE


def test_bundle_engine_auto_precision(plugin, tmp_path, tiny_bundle):
    from emrrg.export.tensorrt_engine import build_bundle_engine

    report = build_bundle_engine(tiny_bundle, "auto", cache_dir=tmp_path, log=print)
    chk = report["check"]
    print(f"\nbundle engine: {report}")
    assert chk["finite"] and chk["nmse"] <= BUNDLE_MAX_NMSE and chk["mean_cosine"] >= 0.995
