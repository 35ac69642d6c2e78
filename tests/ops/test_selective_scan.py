"""The PyTorch SelectiveScan paths against the float64 truth of tests/scan_reference.py, and the dispatcher.

* selective_scan_ref (the reference), selective_scan_fast (training's fast path, emrrg/ops/scan_fast.py) and
  selective_scan_onnx_scan (the body of the pure-ONNX export, export/onnx_ops.py) on every case of
  tests/scan_reference.py, in the case's dtype, under the per-dtype tolerances there; the exported
  pure-ONNX function itself in ONNX Runtime on three of them.
* selective_scan's dispatch to mamba-ssm: mamba-ssm cannot be installed here (it needs CUDA to build), so a
  fake `mamba_ssm.ops.selective_scan_interface` module with a recording `selective_scan_fn` is put where the
  soft import finds it, and emrrg.ops.selective_scan is re-imported.
"""
import functools
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emrrg.ops import selective_scan as scan_module
from emrrg.ops.scan_fast import selective_scan_fast
from emrrg.ops.selective_scan import selective_scan, selective_scan_ref
from tests import scan_reference as ref

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def torch_inputs(case: ref.Case, dtype: str | None = None) -> dict[str, torch.Tensor]:
    dt = TORCH_DTYPES[dtype or case.dtype]
    return {k: torch.from_numpy(v).to(dt if k in ref.ACTIVATIONS else torch.float32)
            for k, v in ref.make_inputs(case).items()}


@functools.lru_cache(maxsize=None)
def _truth(name: str, dtype: str) -> np.ndarray:
    c = ref.case(name)
    return ref.truth(torch_inputs(c, dtype), c.softplus)


def _onnx_scan_body():
    onnx_ops = pytest.importorskip("emrrg.export.onnx_ops", reason="the exporter needs onnx / onnxscript")
    return onnx_ops.selective_scan_onnx_scan


IMPLEMENTATIONS = {"reference": lambda: selective_scan_ref, "fast": lambda: selective_scan_fast,
                   "pure_onnx_body": _onnx_scan_body}


def run(fn, t: dict, softplus: bool):
    return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"), t.get("delta_bias"),
              delta_softplus=softplus)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("case", ref.CASES, ids=[c.name for c in ref.CASES])
def test_matches_truth(impl, case):
    fn = IMPLEMENTATIONS[impl]()
    t = torch_inputs(case)
    with torch.no_grad():
        y = run(fn, t, case.softplus)
    assert y.dtype == t["u"].dtype
    ref.assert_matches_truth(y, _truth(case.name, case.dtype), f"{impl} {case.name}")


@pytest.mark.parametrize("name", ["L197-G4-b2-sp1", "L7-G1-b2-sp0", "N5"])
def test_pure_onnx_graph_matches_truth(name):
    """The exported standard-ONNX function (one ONNX Scan) run by ONNX Runtime, no op library. The function
    takes all eight inputs, so the cases are ones with D, z and delta_bias present."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    onnx_ops = pytest.importorskip("emrrg.export.onnx_ops", reason="the exporter needs onnx / onnxscript")
    c = ref.case(name)
    fn = onnx_ops.scan_function(c.dim, c.dstate, c.groups, int(c.softplus))
    h = onnx.helper
    call = h.make_node(fn.name, list(onnx_ops.INPUT_NAMES), ["y"], domain=onnx_ops.PURE_DOMAIN)
    feeds = ref.make_inputs(c)
    ins = [h.make_tensor_value_info(k, onnx.TensorProto.FLOAT, feeds[k].shape) for k in onnx_ops.INPUT_NAMES]
    out = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, feeds["u"].shape)
    model = h.make_model(h.make_graph([call], "scan", ins, [out]), functions=[fn], opset_imports=[
        h.make_opsetid("", onnx_ops.DEFAULT_OPSET), h.make_opsetid(onnx_ops.PURE_DOMAIN, 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, feeds)
    ref.assert_matches_truth(y, _truth(name, "f32"), f"pure_onnx graph {name}")


@pytest.mark.parametrize("name", ["L197-G4-b2-sp1", "opt-D0z1b0-sp0", "N5"])
def test_reference_in_bf16(name):
    """bf16 activations (the GPU's third dtype): f32 inside, so only the output rounding differs."""
    c = ref.case(name)
    t = torch_inputs(c, "bf16")
    y = run(selective_scan_ref, t, c.softplus)
    assert y.dtype == torch.bfloat16
    ref.assert_matches_truth(y, _truth(name, "bf16"), f"reference {name}")


def test_grouped_equals_per_group_calls():
    """G=4 in one call == four G=1 calls on the channel slices (the fused four-direction contract)."""
    t = torch_inputs(ref.Case("groups", 2, 16, 4, 4, 23, seed=3))
    u, delta, A, B, C, D, z, bias = (t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    fused = selective_scan_ref(u, delta, A, B, C, D, z, bias)
    parts = []
    for k in range(4):
        s = slice(4 * k, 4 * k + 4)
        parts.append(selective_scan_ref(u[:, s], delta[:, s], A[s], B[:, k:k + 1], C[:, k:k + 1], D[s], z[:, s], bias[s]))
    # Same arithmetic, but einsum may block the N-reduction differently for other shapes: f32 rounding only.
    tol = ref.TOLERANCES["f32"]
    torch.testing.assert_close(fused, torch.cat(parts, 1), rtol=tol.rtol, atol=tol.atol)


@pytest.mark.parametrize("bad", ["u", "B", "groups", "D"])
def test_shape_errors(bad):
    t = torch_inputs(ref.Case("bad", 1, 8, 4, 4, 5))
    u, delta, A, B, C, D, z, bias = (t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    if bad == "u":
        u = u[0]
    elif bad == "B":
        B = B[..., :3]
    elif bad == "groups":
        B, C = B[:, :3], C[:, :3]
    else:
        D = D[:5]
    with pytest.raises(ValueError):
        selective_scan_ref(u, delta, A, B, C, D, z, bias)


def test_softplus_matches_torch():
    x = torch.linspace(-30, 30, 101)
    naive = torch.tensor([v if v > 20 else math.log1p(math.exp(v)) for v in x.tolist()])
    torch.testing.assert_close(F.softplus(x), naive, rtol=1e-6, atol=1e-6)


# ---- the dispatcher ----------------------------------------------------------------------------------
def test_dispatcher_uses_reference_on_cpu():
    t = torch_inputs(ref.Case("dispatch", 1, 4, 1, 2, 5))
    torch.testing.assert_close(run(selective_scan, t, True), run(selective_scan_ref, t, True), rtol=0, atol=0)


class _CudaLooking(torch.Tensor):
    """A CPU tensor that reports is_cuda: the dispatcher's only test of where the tensors live."""

    @property
    def is_cuda(self):  # noqa: D401
        return True


def _fresh_scan_module():
    """emrrg/ops/selective_scan.py executed as a new module object, so its soft import runs again against the
    current sys.modules while the imported emrrg.ops.selective_scan (that other modules hold) stays untouched."""
    spec = importlib.util.spec_from_file_location("emrrg.ops._selective_scan_under_test", scan_module.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_mamba(monkeypatch):
    """A mamba_ssm.ops.selective_scan_interface whose selective_scan_fn records its calls, and the scan module
    imported with it."""
    calls = []

    def selective_scan_fn(*args, **kwargs):
        calls.append((args, kwargs))
        return "mamba-ssm result"

    names = ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].selective_scan_fn = selective_scan_fn
    return _fresh_scan_module(), calls


def test_mamba_ssm_dispatch_on_cuda_tensors(fake_mamba):
    module, calls = fake_mamba
    assert module._mamba_selective_scan_fn is not None
    t = torch_inputs(ref.Case("dispatch", 1, 8, 4, 4, 5))
    args = [t[k].as_subclass(_CudaLooking) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out = module.selective_scan(*args, delta_softplus=False)
    assert out == "mamba-ssm result"
    assert len(calls) == 1
    got_args, got_kwargs = calls[0]
    # mamba-ssm's positional order: u, delta, A, B, C, D, z, delta_bias, delta_softplus
    assert len(got_args) == 9 and not got_kwargs
    assert all(a is b for a, b in zip(got_args[:8], args)) and got_args[8] is False


def test_mamba_ssm_not_used_for_cpu_tensors(fake_mamba):
    module, calls = fake_mamba
    t = torch_inputs(ref.Case("dispatch", 1, 8, 4, 4, 5))
    y = run(module.selective_scan, t, True)
    assert calls == []
    torch.testing.assert_close(y, run(selective_scan_ref, t, True), rtol=0, atol=0)


def test_without_mamba_ssm_there_is_no_fast_path(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # `import mamba_ssm` raises ImportError
    module = _fresh_scan_module()
    assert module._mamba_selective_scan_fn is None
    t = torch_inputs(ref.Case("dispatch", 1, 8, 4, 4, 5))
    args = [t[k].as_subclass(_CudaLooking) for k in ("u", "delta", "A", "B", "C")]
    torch.testing.assert_close(module.selective_scan(*args), selective_scan_ref(*args), rtol=0, atol=0)
