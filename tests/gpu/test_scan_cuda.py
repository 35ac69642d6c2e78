"""The SelectiveScan CUDA kernel on a GPU, through libemrrg_scan_shim.so (ctypes on torch.cuda tensors).

Every case of tests/scan_reference.py for f32, f16 and bf16 activations, with its truth (a float64 loop from
the same, already rounded, inputs) and its per-dtype tolerances:
  * f32: the kernel against the truth, and no worse than 2x the project's f32 PyTorch reference
    (selective_scan_ref) + slack;
  * f16 / bf16: err(kernel vs f32 reference) <= 2 * err(same-precision PyTorch reference vs f32 reference)
    + slack, as mamba's test_layernorm_gated does; the f32 reference runs on the same rounded inputs, so both
    low-precision paths only differ from it by their output rounding;
  * every case: NaN/inf check and the dtype's NMSE bound against the truth; errors are printed first.
Plus: launch-time argument errors come back as cudaErrorInvalidValue (nothing launched), a non-default
stream is honoured, and the kernel matches the CPU op (libemrrg_ops.so, same core) bit for bit, as
plugins/selective_scan/README.md claims.

Marked `gpu`: skipped without a CUDA device (tests/conftest.py). With a device but no shim library the
tests skip too, unless EMRRG_REQUIRE_GPU_BUILD=1 (scripts/gpu-check.sh sets it), where that is a failure.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests import scan_reference as ref

from . import scan_cases as sc

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

CASES = ref.CASES
DTYPES = ("f32", "f16", "bf16")


@pytest.fixture(scope="module")
def shim():
    lib = sc.load_shim()
    if lib is None:
        where = ", ".join(str(p) for p in sc.shim_candidates())
        msg = f"{sc.SHIM_NAME} not built (looked in {where}); build with: bash scripts/gpu-check.sh (or scripts/build_plugins.sh)"
        if os.environ.get("EMRRG_REQUIRE_GPU_BUILD") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return lib


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_vs_reference(shim, case, dtype):
    t = sc.to_device(ref.make_inputs(case), dtype)
    y = shim.run(t, case.softplus, dtype)
    torch.cuda.synchronize()
    truth = ref.truth(t, case.softplus)
    assert y.dtype == t["u"].dtype and y.shape == t["u"].shape
    assert bool(torch.isfinite(y).all()), f"NaN/inf in the kernel's output [{case.name} {dtype}]"
    err, scale, nmse = ref.errors(y, truth)
    if dtype == "f32":
        err_k = ref.assert_matches_truth(y, truth, f"kernel {case.name}")
        err_ref = float(ref.errors(sc.scan_ref(t, case.softplus), truth)[0].max())
        print(f"ref-f64 max {err_ref:.3g}")
        ref.assert_no_worse_than(err_k, err_ref, scale, dtype, case.name)
    else:
        ref32 = sc.scan_ref(t, case.softplus, upcast=True)           # f32 reference on the same rounded inputs
        ref_lp = sc.scan_ref(t, case.softplus)                       # same-precision PyTorch reference
        err_kernel = float((y.float() - ref32).abs().max())
        err_lp = float((ref_lp.float() - ref32).abs().max())
        print(f"\n[{case.name} {dtype}] max|y|={scale:.3g} kernel-ref32 max {err_kernel:.3g} | "
              f"torch-{dtype}-ref32 max {err_lp:.3g} | kernel-f64 max {err.max():.3g} NMSE {nmse:.3g}")
        ref.assert_no_worse_than(err_kernel, err_lp, scale, dtype, case.name)
        tol = ref.TOLERANCES[dtype]
        assert nmse <= tol.max_nmse, f"NMSE {nmse:.3g} > {tol.max_nmse:g} [{case.name} {dtype}]"


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_kernel_equals_cpu_op_bitwise(shim, dtype):
    """The CPU op (ORT, libemrrg_ops.so) and the kernel share the core and its rounding: same bits."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from emrrg.runtime import oplib
    from tests.plugins import test_scan_cpu_op as cpu_tests

    lib = oplib.find_op_library()
    if lib is None:
        pytest.skip(f"{oplib.LIBRARY_NAME} not built (the CPU op to compare with)")
    assert ort is not None
    for case in (c for c in CASES if c.name in ("base-layer", "opt-D1z1b1-sp1", "opt-D0z1b0-sp0", "N64", "L197-G4-b2-sp1")):
        feeds = ref.cast_activations(ref.make_inputs(case), dtype)
        y_cpu = cpu_tests.run_op(lib, feeds, int(case.softplus))
        t = sc.to_device(feeds, dtype)
        y_gpu = shim.run(t, case.softplus, dtype).cpu().numpy()
        differ = int((y_cpu.view(np.uint32 if dtype == "f32" else np.uint16) !=
                      y_gpu.view(np.uint32 if dtype == "f32" else np.uint16)).sum())
        print(f"\n[{case.name} {dtype}] {differ} of {y_cpu.size} elements differ in bits from the CPU op "
              f"(max |diff| {np.abs(y_cpu.astype(np.float64) - y_gpu.astype(np.float64)).max():.3g})")
        assert differ == 0, f"kernel and CPU op differ in {differ} elements [{case.name} {dtype}]"


def test_ort_cuda_execution_provider(shim):
    """libemrrg_ops_cuda.so on onnxruntime-gpu: the node runs on the CUDA EP and gives the kernel's bits."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu, not both)")
    lib = next((p for p in (c.parent / "libemrrg_ops_cuda.so" for c in sc.shim_candidates()) if p.is_file()), None)
    if lib is None:
        msg = "libemrrg_ops_cuda.so not built (needs the ONNX Runtime headers: scripts/fetch_ort_headers.sh)"
        if os.environ.get("EMRRG_REQUIRE_GPU_BUILD") == "1" and os.environ.get("EMRRG_HAVE_ORT_HEADERS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    from tests.plugins import test_scan_cpu_op as cpu_tests

    for f16 in (False, True):
        case = ref.Case("ort-cuda", 2, ref.SMALL_DIM, 4, 16, 197, seed=5)
        feeds = ref.cast_activations(ref.make_inputs(case), "f16" if f16 else "f32")
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(lib))
        # The CPU kernel gives the same bits, so make sure the node is not silently on the CPU EP.
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        sess = ort.InferenceSession(cpu_tests._model_bytes(True, True, True, f16, 1), so,
                                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        prof_nodes = sess.get_providers()
        (y,) = sess.run(None, feeds)
        direct = shim.run(sc.to_device(feeds, "f16" if f16 else "f32"), True, "f16" if f16 else "f32").cpu().numpy()
        print(f"\nORT {ort.__version__} providers {prof_nodes}: max |ORT CUDA - kernel| "
              f"{np.abs(y.astype(np.float64) - direct.astype(np.float64)).max():.3g}")
        assert np.array_equal(y, direct)


def test_invalid_arguments_launch_nothing(shim):
    c = ref.Case("bad", 1, ref.SMALL_DIM, 4, 16, 10)
    t = sc.to_device(ref.make_inputs(c), "f32")
    y = torch.full_like(t["u"], 7.0)
    for dims, what in (((1, 88, 10, 65, 4), "N = 65 > 64"), ((1, 90, 10, 16, 4), "D % G != 0"),
                       ((1, 88, 10, 16, 0), "G = 0")):
        code = shim.launch(t, True, y, "f32", dims=dims)
        print(f"\n{what}: {shim.error(code)} ({code})")
        assert code == 1, f"{what}: expected cudaErrorInvalidValue, got {code}"
    torch.cuda.synchronize()
    assert bool((y == 7.0).all()), "an invalid launch wrote the output"


def test_non_default_stream(shim):
    c = ref.Case("stream", 2, ref.SMALL_DIM, 4, 16, 197, seed=3)
    t = sc.to_device(ref.make_inputs(c), "f32")
    y_default = shim.run(t, True, "f32")
    s = torch.cuda.Stream()
    y = torch.empty_like(t["u"])
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        assert shim.launch(t, True, y, "f32", stream=s) == 0
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(y, y_default)
