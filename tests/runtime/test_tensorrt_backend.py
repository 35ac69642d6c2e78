"""emrrg.runtime.tensorrt on a machine without TensorRT or a GPU: what can be checked honestly here.

  * availability: no tensorrt / no plugin library / no GPU each give (False, a reason that names the fix);
    TensorRTEncoder raises TensorRTBackendError with the same advice instead of an ImportError;
  * pure logic: precision resolution (TensorRT 10 vs 11), engine cache keys and directories, the ONNX
    preparation that makes SelectiveScan nodes unambiguous for the plugin;
  * build_engine's control flow against `FakeTRT`, a recording stand-in for the `tensorrt` module defined
    below: which builder flags and network flags each TensorRT major version and precision get, the
    optimization profile, the timing cache, and parse/plugin errors. It records calls; it builds nothing.
    Real engines are built and checked by tests/gpu/test_tensorrt.py (marker `tensorrt`).
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from emrrg.runtime import tensorrt as trtb  # noqa: E402


# ---- a recording stand-in for the tensorrt module ----------------------------------------------------
class FakeTRT(types.ModuleType):
    """Records what build_engine asks of TensorRT. Network inputs come from the ONNX file (dim_param -> -1)."""

    def __init__(self, version: str, parse_ok: bool = True, creator_registered: bool = True):
        super().__init__("tensorrt")
        self.__version__ = version
        self.calls: dict = {"flags": set(), "cleared": set(), "profile": {}, "network_flags": None, "parsed": None}
        rec, fake = self.calls, self

        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        class ILogger:
            pass
        ILogger.Severity = Severity
        self.ILogger = ILogger
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.TensorIOMode = types.SimpleNamespace(INPUT=0, OUTPUT=1)

        class Registry:
            loaded: list = []

            def load_library(self, path):
                self.loaded.append(path)
                return object()

            def get_creator(self, name, version, ns):
                return object() if creator_registered and (name, version, ns) == ("SelectiveScan", "1", "emrrg") else None
        self._registry = Registry()
        self.get_plugin_registry = lambda: self._registry

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self, flags):
                rec["network_flags"] = flags
                self.inputs = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class Parser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0 if parse_ok else 1

            def get_error(self, i):
                return "In node 0 (importFallbackPluginImporter): Plugin not found"

            def _load(self, model):
                for vi in model.graph.input:
                    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
                    self.network.inputs.append(Tensor(vi.name, dims))
                return parse_ok

            def parse(self, data, path=None):
                rec["parsed"] = ("bytes", path)
                return self._load(onnx.load_from_string(data))

            def parse_from_file(self, path):
                rec["parsed"] = ("file", path)
                return self._load(onnx.load(path))

        class Cache:
            def serialize(self):
                return b"timing-cache"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                rec["workspace"] = size

            def set_flag(self, f):
                rec["flags"].add(f)

            def clear_flag(self, f):
                rec["cleared"].add(f)

            def add_optimization_profile(self, p):
                rec["profile_added"] = True

            def create_timing_cache(self, data):
                rec["timing_in"] = bytes(data)
                return Cache()

            def set_timing_cache(self, c, ignore):
                return True

            def get_timing_cache(self):
                return Cache()

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                rec["profile"][name] = (lo, opt, hi)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"PLAN"

        self.Builder, self.OnnxParser = Builder, Parser
        fake.calls = rec


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    def install(version="10.3.0", **kw):
        mod = FakeTRT(version, **kw)
        monkeypatch.setitem(sys.modules, "tensorrt", mod)
        plugin = tmp_path / "libemrrg_trt_plugin.so"
        plugin.write_bytes(b"not a real library: FakeTRT never opens it")
        monkeypatch.setenv(trtb.PLUGIN_ENV_VAR, str(plugin))
        monkeypatch.setattr(trtb, "_loaded_plugins", {})
        return mod
    return install


def encoder_like_model(path: Path, elem=TensorProto.FLOAT) -> Path:
    x = helper.make_tensor_value_info("pixel_values", elem, ["batch", "views", 3, 8, 8])
    y = helper.make_tensor_value_info("visual_tokens", elem, ["batch", 5, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["visual_tokens"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


# ---- availability ------------------------------------------------------------------------------------
def test_available_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    ok, reason = trtb.available()
    assert not ok
    assert "TensorRT is not installed" in reason and "pip install tensorrt" in reason and "JetPack" in reason
    with pytest.raises(trtb.TensorRTBackendError, match="pip install tensorrt"):
        trtb.TensorRTEncoder(Path("."), Path(__file__), "auto")


def test_available_without_plugin(fake_trt, monkeypatch, tmp_path):
    fake_trt()
    monkeypatch.setenv(trtb.PLUGIN_ENV_VAR, str(tmp_path / "missing" / "libemrrg_trt_plugin.so"))
    ok, reason = trtb.available()
    assert not ok and "libemrrg_trt_plugin.so was not found" in reason and "scripts/build_plugins.sh" in reason


def test_available_without_gpu(fake_trt):
    fake_trt()
    try:
        n = trtb.cuda_runtime().device_count()
    except trtb.TensorRTBackendError:
        n = 0
    if n > 0:
        pytest.skip("a GPU is visible here")
    ok, reason = trtb.available()
    assert not ok
    assert "no CUDA GPU is visible" in reason or "CUDA runtime library" in reason, reason


# ---- pure logic ---------------------------------------------------------------------------------------
def test_resolve_precision():
    assert trtb.resolve_precision("auto", "int8", 10) == "int8"
    assert trtb.resolve_precision("auto", "int8", 11) == "int8"
    assert trtb.resolve_precision("auto", "fp32", 10) == "fp16"   # weak typing: FP16 flag
    assert trtb.resolve_precision("auto", "fp32", 11) == "fp32"   # strong typing: the ONNX types
    assert trtb.resolve_precision("auto", None, 11) == "fp32"
    assert trtb.resolve_precision("fp16", "fp32", 10) == "fp16"
    with pytest.raises(trtb.TensorRTBackendError, match="unknown precision"):
        trtb.resolve_precision("int4", "fp32", 10)


def test_engine_key_slug_changes_with_every_field():
    base = dict(onnx_sha256="ab" * 32, gpu_name="NVIDIA H200", compute_capability="90", trt_version="10.3.0",
                precision="fp16", profile=trtb._profile_text(trtb.encoder_profile(224)))
    slug = trtb.EngineKey(**base).slug()
    assert slug == trtb.EngineKey(**base).slug()
    assert "/" not in slug and " " not in slug and "nvidia-h200" in slug and "sm90" in slug and "trt10.3.0" in slug
    for field, other in (("onnx_sha256", "cd" * 32), ("gpu_name", "Orin (nvgpu)"), ("compute_capability", "87"),
                         ("trt_version", "11.0.0"), ("precision", "int8"),
                         ("profile", trtb._profile_text(trtb.encoder_profile(224, max_batch=8)))):
        assert trtb.EngineKey(**{**base, field: other}).slug() != slug, field


def test_encoder_profile():
    lo, opt, hi = trtb.encoder_profile(224, max_batch=2, max_views=3)["pixel_values"]
    assert lo == (1, 1, 3, 224, 224) and opt == (1, 2, 3, 224, 224) and hi == (2, 3, 3, 224, 224)


def test_engine_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(trtb.ENGINE_CACHE_ENV_VAR, str(tmp_path / "env-cache"))
    assert trtb.engine_cache_dir(tmp_path / "bundle") == tmp_path / "env-cache"
    monkeypatch.delenv(trtb.ENGINE_CACHE_ENV_VAR)
    (tmp_path / "bundle").mkdir()
    assert trtb.engine_cache_dir(tmp_path / "bundle") == tmp_path / "bundle" / "engines"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert trtb.engine_cache_dir(None) == tmp_path / "xdg" / "emrrg" / "engines"
    if os.geteuid() != 0:  # root writes anywhere: the read-only case cannot be shown as root
        ro = tmp_path / "ro-bundle"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert trtb.engine_cache_dir(ro) == tmp_path / "xdg" / "emrrg" / "engines"
        finally:
            ro.chmod(0o755)


def scan_node_model(path: Path, inputs: list[str], attrs: dict | None = None) -> Path:
    node = helper.make_node("SelectiveScan", inputs, ["y"], domain="com.emrrg", name="scan0", **(attrs or {}))
    graph = helper.make_graph([node], "g", [], [])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.emrrg", 1)]),
              path)
    return path


def test_prepare_onnx_for_tensorrt(tmp_path):
    trt_attrs = dict(plugin_version="1", plugin_namespace="emrrg", delta_softplus=1)
    full = scan_node_model(tmp_path / "full.onnx", ["u", "delta", "A", "B", "C", "D", "z", "bias"], trt_attrs)
    assert trtb.prepare_onnx_for_tensorrt(full) == (None, [])
    trailing = scan_node_model(tmp_path / "trailing.onnx", ["u", "delta", "A", "B", "C", "D"], trt_attrs)
    assert trtb.prepare_onnx_for_tensorrt(trailing) == (None, [])

    gap = scan_node_model(tmp_path / "gap.onnx", ["u", "delta", "A", "B", "C", "", "z", "bias"], trt_attrs)
    data, notes = trtb.prepare_onnx_for_tensorrt(gap)
    node = onnx.load_from_string(data).graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert list(node.input) == ["u", "delta", "A", "B", "C", "z", "bias"]
    assert (attrs["has_D"], attrs["has_z"], attrs["has_delta_bias"]) == (0, 1, 1) and notes

    gap2 = scan_node_model(tmp_path / "gap2.onnx", ["u", "delta", "A", "B", "C", "D", "", "bias"], trt_attrs)
    node = onnx.load_from_string(trtb.prepare_onnx_for_tensorrt(gap2)[0]).graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert list(node.input) == ["u", "delta", "A", "B", "C", "D", "bias"]
    assert (attrs["has_D"], attrs["has_z"], attrs["has_delta_bias"]) == (1, 0, 1)

    old = scan_node_model(tmp_path / "old.onnx", ["u", "delta", "A", "B", "C", "D", "z", "bias"], {"delta_softplus": 1})
    node = onnx.load_from_string(trtb.prepare_onnx_for_tensorrt(old)[0]).graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"emrrg"


# ---- build_engine's control flow against FakeTRT -------------------------------------------------------
PROFILE = {"pixel_values": ((1, 1, 3, 8, 8), (1, 2, 3, 8, 8), (4, 4, 3, 8, 8))}


@pytest.mark.parametrize("precision,flags", [("int8", {"FP16", "INT8"}), ("fp16", {"FP16"}), ("fp32", set())])
def test_tensorrt10_uses_builder_flags(fake_trt, tmp_path, precision, flags):
    trt = fake_trt("10.3.0")
    model = encoder_like_model(tmp_path / "encoder.onnx")
    plan = trtb.build_engine(model, precision, PROFILE, timing_cache=tmp_path / "t.cache")
    assert plan == b"PLAN"
    assert trt.calls["network_flags"] == 0                    # weakly typed on 10.x
    assert trt.calls["flags"] == flags
    assert trt.calls["cleared"] == ({"TF32"} if precision == "fp32" else set())
    assert trt.calls["profile"]["pixel_values"] == PROFILE["pixel_values"]
    assert trt.calls["parsed"] == ("file", str(model))          # nothing to rewrite: parsed from the file
    assert (tmp_path / "t.cache").read_bytes() == b"timing-cache"
    assert trt._registry.loaded, "the plugin library was not loaded before parsing"


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_tensorrt11_is_strongly_typed(fake_trt, tmp_path, precision):
    trt = fake_trt("11.0.0")
    trtb.build_engine(encoder_like_model(tmp_path / "encoder.onnx"), precision, PROFILE)
    assert trt.calls["network_flags"] == 1 << 5                # STRONGLY_TYPED
    assert not trt.calls["flags"]                              # no precision flags exist in 11.x


def test_tensorrt11_fp16_needs_an_fp16_onnx(fake_trt, tmp_path):
    fake_trt("11.1.0")
    with pytest.raises(trtb.TensorRTBackendError, match="strongly typed"):
        trtb.build_engine(encoder_like_model(tmp_path / "e32.onnx"), "fp16", PROFILE)
    trtb.build_engine(encoder_like_model(tmp_path / "e16.onnx", TensorProto.FLOAT16), "fp16", PROFILE)


def test_dynamic_input_without_profile_is_an_error(fake_trt, tmp_path):
    fake_trt()
    with pytest.raises(trtb.TensorRTBackendError, match="dynamic shape"):
        trtb.build_engine(encoder_like_model(tmp_path / "e.onnx"), "fp32", {})


def test_parse_error_is_reported(fake_trt, tmp_path):
    fake_trt(parse_ok=False)
    with pytest.raises(trtb.TensorRTBackendError, match="(?s)could not parse .*Plugin not found"):
        trtb.build_engine(encoder_like_model(tmp_path / "e.onnx"), "fp32", PROFILE)


def test_rewritten_model_is_parsed_with_its_path(fake_trt, tmp_path):
    trt = fake_trt()
    path = scan_node_model(tmp_path / "gap.onnx", ["u", "delta", "A", "B", "C", "", "z", "bias"],
                           dict(plugin_version="1", plugin_namespace="emrrg"))
    trtb.build_engine(path, "fp32", {})
    assert trt.calls["parsed"] == ("bytes", str(path))  # the path lets TensorRT find external weights


def test_plugin_library_without_our_creator(fake_trt, tmp_path):
    fake_trt(creator_registered=False)
    with pytest.raises(trtb.TensorRTBackendError, match="registered no emrrg::SelectiveScan"):
        trtb.build_engine(encoder_like_model(tmp_path / "e.onnx"), "fp32", PROFILE)


def test_compare_outputs():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 5, 8)).astype(np.float32)
    m = trtb.compare_outputs(ref, ref)
    assert m["max_abs_diff"] == 0 and m["nmse"] == 0 and abs(m["mean_cosine"] - 1) < 1e-12 and m["finite"]
    bad = ref.copy()
    bad[0, 0, 0] = np.nan
    assert not trtb.compare_outputs(bad, ref)["finite"]


def test_engine_key_covers_the_external_weights(tiny_bundle):
    """The encoder graph file holds only offsets into encoder.weights: the engine cache key must change when
    the weights do, or a cached engine could serve another export's weights."""
    from emrrg.runtime.bundle import load_manifest

    m = load_manifest(tiny_bundle)
    art = m["artifacts"]["encoder"]
    assert trtb.external_data_files(tiny_bundle / art["path"]) == [tiny_bundle / "encoder.weights"]
    graph, weights = m["files"][art["path"]]["sha256"], m["files"]["encoder.weights"]["sha256"]
    key = trtb.model_digest([graph, weights])
    assert key != graph and key != trtb.model_digest([graph, "0" * 64])
    assert trtb.model_digest([graph]) == graph
