"""The TensorRT plugin and the host libraries around the CUDA kernel, checked without TensorRT's libraries or a GPU.

What runs here:

1. test_plugin_compiles_against_tensorrt: selectiveScanPlugin.cpp compiles with g++ -std=c++17 -c -Wall
   -Wextra -Werror against NVIDIA's public TensorRT headers, once per header folder found (tests/plugins/
   toolchain.py: EMRRG_TENSORRT_INCLUDE_DIRS, TENSORRT_ROOT, the system paths; CI passes 10.3 = JetPack 6
   and 11.1). TensorRT's and CUDA's headers are -isystem, so only warnings in our files count.
2. test_plugin_logic_on_host: the plugin plus tests/plugins/plugin_host_test.cpp, against the same real
   headers, linked against neither TensorRT nor the CUDA runtime (a recording stub replaces the CUDA
   launcher), then run: creator identity/fields, attribute validation, the input layout for 5..8
   inputs, output type/shape, format combinations, shape checks, serialization round trip, what enqueue
   hands the launcher, error reporting. TensorRT parsing/building and the kernel on a GPU are tested
   where TensorRT exists (tests/gpu/test_tensorrt.py via scripts/gpu-check.sh).
3. test_identity_matches_exporter: the name/version/namespace constants in selectiveScanPlugin.h (read as
   text) equal what export/onnx_ops.py writes on the node and what runtime/tensorrt.py looks up.
4. test_host_sources_compile_nvcc: the ctypes shim and the ORT CUDA-EP op library compile with nvcc -c for
   sm_87 and sm_90 with warnings as errors (skips without nvcc; the ORT one without ORT headers).
5. the built libraries (when scripts/build_plugins.sh made them): the shim loads and refuses bad arguments
   without touching a device; libemrrg_ops_cuda.so serves as a CPU op library with identical results.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.plugins import toolchain

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = ROOT / "plugins" / "selective_scan"
HOST_TEST = Path(__file__).resolve().parent / "plugin_host_test.cpp"
PLUGIN_H = PLUGIN_DIR / "selectiveScanPlugin.h"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++")
ORT_INC = ROOT / "build" / "ort-headers" / "usr" / "include" / "onnxruntime"
CUDA_INC = toolchain.cuda_include_dir()
TRT_INCS = toolchain.tensorrt_include_dirs()
# One parameter per TensorRT header folder; a single skipping one when there is none.
TRT_PARAMS = ([pytest.param(d, id=f"trt{toolchain.tensorrt_version(d)}") for d in TRT_INCS] or
              [pytest.param(None, id="no-tensorrt", marks=pytest.mark.skip(reason=toolchain.NO_TENSORRT_REASON))])


def _header_constants() -> dict[str, str]:
    text = PLUGIN_H.read_text()
    begin, end = "// [emrrg:plugin-constants-begin]", "// [emrrg:plugin-constants-end]"
    assert begin in text and end in text, f"constant markers missing from {PLUGIN_H.name}"
    block = text[text.index(begin):text.index(end)]
    found = dict(re.findall(r'constexpr\s+char\s+const\s*\*\s*(\w+)\s*=\s*"([^"]*)"', block))
    assert set(found) == {"kSELECTIVE_SCAN_PLUGIN_NAME", "kSELECTIVE_SCAN_PLUGIN_VERSION",
                          "kSELECTIVE_SCAN_PLUGIN_NAMESPACE"}, found
    return found


def _trt_compile(trt_inc: Path, args: list[str]) -> subprocess.CompletedProcess:
    """g++ with warnings as errors in our files; TensorRT's and CUDA's headers are system headers."""
    if CXX is None:
        pytest.skip("g++ not found")
    if CUDA_INC is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime_api.h, which TensorRT's headers include): "
                    "set CUDA_HOME or put nvcc on PATH")
    cmd = [CXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-isystem", str(trt_inc), "-isystem", str(CUDA_INC),
           "-I", str(PLUGIN_DIR), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("trt_inc", TRT_PARAMS)
def test_plugin_compiles_against_tensorrt(tmp_path, trt_inc):
    proc = _trt_compile(trt_inc, ["-c", str(PLUGIN_DIR / "selectiveScanPlugin.cpp"), "-o", str(tmp_path / "p.o")])
    assert proc.returncode == 0, f"plugin does not compile against TensorRT {trt_inc}:\n{proc.stderr}"
    assert "warning" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("trt_inc", TRT_PARAMS)
def test_plugin_logic_on_host(tmp_path, trt_inc):
    exe = tmp_path / "plugin_host_test"
    proc = _trt_compile(trt_inc, ["-O1", str(PLUGIN_DIR / "selectiveScanPlugin.cpp"), str(HOST_TEST), "-o", str(exe)])
    assert proc.returncode == 0, f"host test did not build against TensorRT {trt_inc}:\n{proc.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    print(run.stdout)
    assert run.returncode == 0, f"plugin host checks failed:\n{run.stdout}{run.stderr}"
    assert re.search(r"\d+ checks, 0 failures", run.stdout)


def test_identity_matches_exporter():
    """Header constants == the node's op_type / plugin_version / plugin_namespace == the runtime's lookup."""
    pytest.importorskip("onnx")
    pytest.importorskip("torch")
    import onnx.helper as oh

    onnx_ops = pytest.importorskip("emrrg.export.onnx_ops", reason="the exporter (export/onnx_ops.py) is not in this tree")
    from emrrg.runtime import tensorrt as trtb

    c = _header_constants()
    name, version, namespace = (c["kSELECTIVE_SCAN_PLUGIN_NAME"], c["kSELECTIVE_SCAN_PLUGIN_VERSION"],
                                c["kSELECTIVE_SCAN_PLUGIN_NAMESPACE"])
    assert (onnx_ops.OP_TYPE, onnx_ops.PLUGIN_VERSION, onnx_ops.PLUGIN_NAMESPACE) == (name, version, namespace)
    assert (trtb.PLUGIN_NAME, trtb.PLUGIN_VERSION, trtb.PLUGIN_NAMESPACE) == (name, version, namespace)
    assert onnx_ops.DOMAIN == trtb.OP_DOMAIN

    # The attributes on a node as the exporter emits it (collapse_scan_functions writes the custom-op form).
    fn_name = "SelectiveScan_D8_N4_G2_softplus1"
    call = oh.make_node(fn_name, list(onnx_ops.INPUT_NAMES), ["y"], domain=onnx_ops.PURE_DOMAIN, name="scan0")
    fn = oh.make_function(onnx_ops.PURE_DOMAIN, fn_name, list(onnx_ops.INPUT_NAMES), ["y"],
                          [oh.make_node("Identity", ["u"], ["y"])], opset_imports=[oh.make_opsetid("", 18)])
    graph = oh.make_graph([call], "g", [], [])
    model = oh.make_model(graph, functions=[fn], opset_imports=[oh.make_opsetid("", 18),
                                                                oh.make_opsetid(onnx_ops.PURE_DOMAIN, 1)])
    node = onnx_ops.collapse_scan_functions(model).graph.node[0]
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, node.domain) == (name, onnx_ops.DOMAIN)
    assert attrs["plugin_version"].decode() == version and attrs["plugin_namespace"].decode() == namespace
    assert attrs["delta_softplus"] == 1


def test_state_limits_agree():
    """The plugin's and the ORT CUDA op's N limit == emrrg::scan::kMaxStateDim (they cannot include the core)."""
    core = int(re.search(r"constexpr int kMaxStateDim = (\d+);", (PLUGIN_DIR / "selectiveScanCore.h").read_text()).group(1))
    plugin = int(re.search(r"kKERNEL_MAX_STATE = (\d+);", PLUGIN_H.read_text()).group(1))
    ort_cuda = int(re.search(r"kCudaMaxState = (\d+);", (PLUGIN_DIR / "selectiveScanOrtCudaOp.cpp").read_text()).group(1))
    assert core == plugin == ort_cuda


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (a compile check, no GPU needed)")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("source", ["selectiveScanCApi.cpp", "selectiveScanOrtCudaOp.cpp"])
def test_host_sources_compile_nvcc(tmp_path, arch, source):
    includes = ["-I", str(PLUGIN_DIR)]
    if source == "selectiveScanOrtCudaOp.cpp":
        if not (ORT_INC / "onnxruntime_cxx_api.h").is_file():
            pytest.skip(f"no ONNX Runtime headers in {ORT_INC} (bash scripts/fetch_ort_headers.sh)")
        includes += ["-I", str(ORT_INC)]
    cmd = [NVCC, "-c", f"-arch={arch}", "-O2", "-std=c++17", "-Xcompiler", "-fPIC,-Wall,-Wextra", "-Werror",
           "all-warnings", *includes, "-o", str(tmp_path / "x.o"), str(PLUGIN_DIR / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed:\n{out}"
    warnings = [ln for ln in out.splitlines() if "warning" in ln.lower()]
    assert not warnings, "warnings:\n" + "\n".join(warnings)


# ---- the built libraries -------------------------------------------------------------------------------
SHIM = ROOT / "build" / "plugins" / "libemrrg_scan_shim.so"
OPS_CUDA = ROOT / "build" / "plugins" / "libemrrg_ops_cuda.so"


def test_shim_refuses_bad_arguments_without_a_device():
    """The C entry point validates before it touches CUDA: bad sizes return cudaErrorInvalidValue (1)."""
    if not SHIM.is_file():
        pytest.skip(f"{SHIM.name} not built (bash scripts/build_plugins.sh with nvcc)")
    lib = ctypes.CDLL(str(SHIM))
    assert lib.emrrg_scan_capi_version() == 1
    f = lib.emrrg_selective_scan_cuda
    f.argtypes = [ctypes.c_int] * 7 + [ctypes.c_void_p] * 10
    f.restype = ctypes.c_int
    fake = ctypes.c_void_p(0x1000)  # never dereferenced: every call below is refused first
    args = [fake] * 5 + [None] * 3 + [fake, None]
    assert f(1, 88, 10, 65, 4, 1, 0, *args) == 1      # N = 65 > 64
    assert f(1, 90, 10, 16, 4, 1, 0, *args) == 1      # D % G != 0
    assert f(1, 88, 10, 16, 4, 1, 3, *args) == 1      # unknown dtype code
    assert f(1, 88, 10, 16, 4, 2, 0, *args) == 1      # delta_softplus not 0/1
    assert f(0, 88, 10, 16, 4, 1, 0, *args) == 0      # empty batch: nothing to do, success
    lib.emrrg_cuda_error_string.restype = ctypes.c_char_p
    assert lib.emrrg_cuda_error_string(1)


def test_ort_cuda_library_serves_the_cpu_ep():
    """libemrrg_ops_cuda.so registers CPU + CUDA kernels in one domain; on the CPU EP it is the CPU op."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from emrrg.runtime import oplib
    from tests import scan_reference as ref
    from tests.plugins import test_scan_cpu_op as cpu_tests

    if not OPS_CUDA.is_file() or oplib.find_op_library() is None:
        pytest.skip("libemrrg_ops_cuda.so / libemrrg_ops.so not built (bash scripts/build_plugins.sh with nvcc)")
    for f16 in (False, True):
        feeds = ref.cast_activations(ref.make_inputs(ref.Case("ops-cuda", 2, ref.SMALL_DIM, 4, 16, 37, seed=3)),
                                     "f16" if f16 else "f32")
        key = (True, True, True, f16, 1, True)
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(OPS_CUDA))
        sess = ort.InferenceSession(cpu_tests._model_bytes(*key), so, providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, feeds)
        np.testing.assert_array_equal(y, cpu_tests.run_op(oplib.find_op_library(), feeds))
