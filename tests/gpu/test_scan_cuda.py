"""The SelectiveScan CUDA kernel on a GPU, through libemrrg_scan_shim.so (ctypes on torch.cuda tensors).

Every case of the CPU tests (tests/gpu/scan_cases.py) for f32, f16 and bf16 activations:
  * truth: a float64 loop on the device from the same (already rounded) inputs;
  * f32: the kernel against the truth, with the CPU op's tolerances, and no worse than 2x the project's
    f32 PyTorch reference (selective_scan_ref) + atol;
  * f16 / bf16: err(kernel vs f32 reference) <= 2 * err(same-precision PyTorch reference vs f32 reference)
    + atol, as mamba's test_layernorm_gated does; the f32 reference runs on the same rounded inputs, so both
    low-precision paths only differ from it by their output rounding;
  * every case: NaN/inf check and an NMSE bound per dtype; max and mean errors are printed first.
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

from . import scan_cases as sc

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

# ---- named tolerances (scaled by max(1, max|truth|)) -------------------------------------------------
# f32: the CPU op's bounds (tests/plugins/test_scan_cpu_op.py): measured 2.5e-7 x max|y| there; the GPU
# runs the same core with --fmad=false, so the same bits are expected.
RTOL_F32, ATOL_F32 = 1e-4, 2e-6
# f16 / bf16: the output rounding of an f32-accumulated result is <= 0.5 ulp: 2^-11 (f16) and 2^-8 (bf16)
# relative to the largest elements; atol = 2 ulps of that scale on top of the 2x bound.
ATOL_LOW = {"f16": 2 * 2.0 ** -11, "bf16": 2 * 2.0 ** -8}
WORSE_THAN_REF_FACTOR = 2.0
# NMSE = sum (y - truth)^2 / sum truth^2. f32 measured ~1e-14 on the CPU; a semantic slip (wrong group,
# lost bias, shifted step) is >= 1e-4. For f16 / bf16 the rounding alone gives ~(ulp/3)^2: 3e-8 and 2e-6.
MAX_NMSE = {"f32": 1e-10, "f16": 1e-6, "bf16": 1e-4}

CASES = sc.all_cases()
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


def _stats(y, truth):
    err = (y.double() - truth).abs()
    nmse = float(((y.double() - truth) ** 2).sum() / (truth ** 2).sum().clamp_min(1e-300))
    return err, nmse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel_vs_reference(shim, case, dtype):
    t = sc.to_device(sc.make_inputs(case), dtype)
    y = shim.run(t, case.softplus, dtype)
    torch.cuda.synchronize()
    truth = sc.scan_torch64(t, case.softplus)
    scale = max(1.0, float(truth.abs().max()))
    assert y.dtype == t["u"].dtype and y.shape == t["u"].shape
    assert bool(torch.isfinite(y).all()), f"NaN/inf in the kernel's output [{case.name} {dtype}]"
    err_k, nmse = _stats(y, truth)
    if dtype == "f32":
        ref = sc.scan_ref(t, case.softplus)
        err_ref, _ = _stats(ref, truth)
        print(f"\n[{case.name} f32] max|y|={scale:.3g} kernel-f64 max {err_k.max():.3g} mean {err_k.mean():.3g} | "
              f"ref-f64 max {err_ref.max():.3g} | NMSE {nmse:.3g}")
        torch.testing.assert_close(y.double(), truth, rtol=RTOL_F32, atol=ATOL_F32 * scale)
        assert err_k.max() <= WORSE_THAN_REF_FACTOR * err_ref.max() + ATOL_F32 * scale
    else:
        ref32 = sc.scan_ref(t, case.softplus, upcast=True)           # f32 reference on the same rounded inputs
        ref_lp = sc.scan_ref(t, case.softplus)                       # same-precision PyTorch reference
        err_kernel = (y.float() - ref32).abs()
        err_lp = (ref_lp.float() - ref32).abs()
        print(f"\n[{case.name} {dtype}] max|y|={scale:.3g} kernel-ref32 max {err_kernel.max():.3g} "
              f"mean {err_kernel.mean():.3g} | torch-{dtype}-ref32 max {err_lp.max():.3g} | kernel-f64 NMSE {nmse:.3g}")
        bound = WORSE_THAN_REF_FACTOR * float(err_lp.max()) + ATOL_LOW[dtype] * scale
        assert float(err_kernel.max()) <= bound, (
            f"{dtype} kernel error {float(err_kernel.max()):.3g} > 2 x torch {dtype} error {float(err_lp.max()):.3g} + atol "
            f"[{case.name}]")
    assert nmse <= MAX_NMSE[dtype], f"NMSE {nmse:.3g} > {MAX_NMSE[dtype]:g} [{case.name} {dtype}]"


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
        feeds = sc.make_inputs(case)
        if dtype == "f16":
            feeds = {k: (v.astype(np.float16) if k in sc.ACTIVATIONS else v) for k, v in feeds.items()}
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
        case = sc.Case("ort-cuda", 2, sc.SMALL_DIM, 4, 16, 197, seed=5)
        feeds = sc.make_inputs(case)
        if f16:
            feeds = {k: (v.astype(np.float16) if k in sc.ACTIVATIONS else v) for k, v in feeds.items()}
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
    c = sc.Case("bad", 1, sc.SMALL_DIM, 4, 16, 10)
    t = sc.to_device(sc.make_inputs(c), "f32")
    y = torch.full_like(t["u"], 7.0)
    for dims, what in (((1, 88, 10, 65, 4), "N = 65 > 64"), ((1, 90, 10, 16, 4), "D % G != 0"),
                       ((1, 88, 10, 16, 0), "G = 0")):
        code = shim.launch(t, True, y, "f32", dims=dims)
        print(f"\n{what}: {shim.error(code)} ({code})")
        assert code == 1, f"{what}: expected cudaErrorInvalidValue, got {code}"
    torch.cuda.synchronize()
    assert bool((y == 7.0).all()), "an invalid launch wrote the output"


def test_non_default_stream(shim):
    c = sc.Case("stream", 2, sc.SMALL_DIM, 4, 16, 197, seed=3)
    t = sc.to_device(sc.make_inputs(c), "f32")
    y_default = shim.run(t, True, "f32")
    s = torch.cuda.Stream()
    y = torch.empty_like(t["u"])
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        assert shim.launch(t, True, y, "f32", stream=s) == 0
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(y, y_default)
