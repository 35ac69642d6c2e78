"""com.emrrg::SelectiveScan in ONNX Runtime (libemrrg_ops.so) on every case of tests/scan_reference.py.

Each case builds a single-node ONNX model, runs it with the op library and compares y with the float64
truth of tests/scan_reference.py under its per-dtype tolerance (TOLERANCES there says why each bound is
what it is). On top of that the op must be no worse than the project's torch reference (selective_scan_ref)
itself: max|op - f64| <= 2 * max|ref - f64| + slack (the bound idea of mamba's test_layernorm_gated), and
equal to it within the same tolerance. `pytest -s` prints every case.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from emrrg.runtime import oplib  # noqa: E402
from tests import scan_reference as ref  # noqa: E402

LIB = oplib.find_op_library()
SKIP_REASON = f"{oplib.LIBRARY_NAME} is not built: run bash scripts/build_plugins.sh"


@pytest.fixture(scope="module")
def lib():
    if LIB is None:
        pytest.skip(SKIP_REASON)
    return LIB


def test_library_built_in_ci():
    """CI builds the library first; there a missing library is a failure, not a skip."""
    if LIB is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {oplib.LIBRARY_NAME} is missing: the CI set-up must run bash scripts/build_plugins.sh")
        pytest.skip(SKIP_REASON)
    assert LIB.is_file()


# ---------------------------------------------------------------------------------------------
# Model building
# ---------------------------------------------------------------------------------------------
OPTIONAL = ref.OPTIONAL


@functools.lru_cache(maxsize=None)
def _model_bytes(has_d: bool, has_z: bool, has_bias: bool, f16: bool, softplus: int | None,
                 trt_attrs: bool = True) -> bytes:
    act = TensorProto.FLOAT16 if f16 else TensorProto.FLOAT
    present = {"D": has_d, "z": has_z, "delta_bias": has_bias}
    names = ["u", "delta", "A", "B", "C"] + [n if present[n] else "" for n in OPTIONAL]
    while names[-1] == "":  # trailing absent optionals are simply left off
        names.pop()
    attrs = {}
    if softplus is not None:
        attrs["delta_softplus"] = softplus
    if trt_attrs:  # what the exporter writes for TensorRT's plugin lookup: ORT must ignore them
        attrs.update(plugin_version="1", plugin_namespace="emrrg")
    node = helper.make_node("SelectiveScan", names, ["y"], domain="com.emrrg", **attrs)

    def vi(name, elem, dims):
        return helper.make_tensor_value_info(name, elem, dims)

    inputs = [vi("u", act, ["b", "d", "l"]), vi("delta", act, ["b", "d", "l"]), vi("A", TensorProto.FLOAT, ["d", "n"]),
              vi("B", act, ["b", "g", "n", "l"]), vi("C", act, ["b", "g", "n", "l"])]
    if has_d:
        inputs.append(vi("D", TensorProto.FLOAT, ["d"]))
    if has_z:
        inputs.append(vi("z", act, ["b", "d", "l"]))
    if has_bias:
        inputs.append(vi("delta_bias", TensorProto.FLOAT, ["d"]))
    graph = helper.make_graph([node], "selective_scan", inputs, [vi("y", act, ["b", "d", "l"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.emrrg", 1)],
                              ir_version=8)
    return model.SerializeToString()


@functools.lru_cache(maxsize=None)
def _session(lib_path: str, key: tuple, intra_threads: int = 0):
    so = ort.SessionOptions()
    oplib.register(so, lib_path)
    if intra_threads:
        so.intra_op_num_threads = intra_threads
    return ort.InferenceSession(_model_bytes(*key), so, providers=["CPUExecutionProvider"])


def run_op(lib_path, feeds: dict, softplus: int | None = 1, intra_threads: int = 0, trt_attrs: bool = True):
    key = ("D" in feeds, "z" in feeds, "delta_bias" in feeds, feeds["u"].dtype == np.float16, softplus, trt_attrs)
    (y,) = _session(str(lib_path), key, intra_threads).run(None, feeds)
    return y


# ---------------------------------------------------------------------------------------------
# The torch reference and the comparison
# ---------------------------------------------------------------------------------------------
def scan_torch(feeds, softplus):
    torch = pytest.importorskip("torch")
    from emrrg.ops.selective_scan import selective_scan_ref

    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    y = selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"), t.get("delta_bias"),
                           delta_softplus=bool(softplus))
    return y.numpy()


def small_inputs(seed: int, seqlen: int = 20, batch: int = 1) -> dict[str, np.ndarray]:
    return ref.make_inputs(ref.Case(f"seed{seed}", batch, ref.SMALL_DIM, 4, 16, seqlen, seed=seed))


def check(y, feeds, softplus, *, label=""):
    """Against the float64 truth and the torch reference (printed first, then asserted)."""
    assert y.dtype == feeds["u"].dtype and y.shape == feeds["u"].shape
    dtype = ref.dtype_name(y)
    truth = ref.truth(feeds, bool(softplus))
    torch_y = scan_torch(feeds, softplus)
    assert np.isfinite(torch_y).all(), "NaN/inf in the reference (bad test inputs)"
    err_op = ref.assert_matches_truth(y, truth, f"op {label}")
    err_ref = ref.assert_matches_truth(torch_y, truth, f"selective_scan_ref {label}")
    tol, scale = ref.TOLERANCES[dtype], max(1.0, float(np.abs(truth).max()))
    np.testing.assert_allclose(y.astype(np.float64), torch_y.astype(np.float64), rtol=tol.rtol, atol=tol.atol * scale,
                               err_msg=f"op vs selective_scan_ref [{label}]")
    ref.assert_no_worse_than(err_op, err_ref, scale, dtype, label)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ref.CASES, ids=[c.name for c in ref.CASES])
def test_case(lib, case):
    feeds = ref.cast_activations(ref.make_inputs(case), case.dtype)
    check(run_op(lib, feeds, int(case.softplus)), feeds, case.softplus, label=case.name)


def test_default_softplus_is_on(lib):
    """No delta_softplus attribute means softplus (the contract's default 1)."""
    feeds = small_inputs(19)
    np.testing.assert_array_equal(run_op(lib, feeds, softplus=None), run_op(lib, feeds, softplus=1))


def test_tensorrt_attributes_are_ignored(lib):
    """plugin_version / plugin_namespace (for TensorRT) load in ORT and change nothing."""
    feeds = small_inputs(23)
    np.testing.assert_array_equal(run_op(lib, feeds, trt_attrs=True), run_op(lib, feeds, trt_attrs=False))


def test_thread_counts_agree_bitwise(lib, monkeypatch):
    """Tasks are independent, so ORT's pool, our own threads and one thread give identical bits."""
    feeds = small_inputs(29, seqlen=60, batch=2)
    y_pool = run_op(lib, feeds)
    y_single = run_op(lib, feeds, intra_threads=1)
    monkeypatch.setenv("EMRRG_SCAN_THREADS", "3")
    y_env = run_op(lib, feeds)
    np.testing.assert_array_equal(y_pool, y_single)
    np.testing.assert_array_equal(y_pool, y_env)


# ---- errors are ORT errors, not crashes ----
def _assert_ort_error(lib, feeds, match):
    with pytest.raises(Exception, match=match) as info:
        run_op(lib, feeds)
    assert "SelectiveScan" in str(info.value)
    print(f"\nORT error as expected: {str(info.value).splitlines()[-1]}")


@pytest.mark.parametrize("case", ["B_wrong_N", "C_differs", "D_wrong_len", "groups_not_dividing", "z_wrong_L",
                                  "delta_wrong", "A_wrong_dim"])
def test_shape_mismatch_is_an_ort_error(lib, case):
    feeds = small_inputs(37, seqlen=10)
    match = {
        "B_wrong_N": r"B must be", "C_differs": r"C .* must match B", "D_wrong_len": r"D must be",
        "groups_not_dividing": r"not a multiple of the group count", "z_wrong_L": r"z .* must match u",
        "delta_wrong": r"delta .* must match u", "A_wrong_dim": r"A must be",
    }[case]
    if case == "B_wrong_N":
        feeds["B"] = feeds["B"][:, :, :15]
        feeds["C"] = feeds["C"][:, :, :15]
    elif case == "C_differs":
        feeds["C"] = feeds["C"][..., :9]
    elif case == "D_wrong_len":
        feeds["D"] = feeds["D"][:-1]
    elif case == "groups_not_dividing":
        feeds["B"] = np.ascontiguousarray(np.concatenate([feeds["B"], feeds["B"][:, :1]], axis=1))  # G = 5
        feeds["C"] = np.ascontiguousarray(np.concatenate([feeds["C"], feeds["C"][:, :1]], axis=1))
    elif case == "z_wrong_L":
        feeds["z"] = feeds["z"][..., :9]
    elif case == "delta_wrong":
        feeds["delta"] = feeds["delta"][:, :-1]
    elif case == "A_wrong_dim":
        feeds["A"] = feeds["A"][:-1]
    feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
    _assert_ort_error(lib, feeds, match)
    # the session (and the process) survive: a good call still works afterwards
    good = small_inputs(37, seqlen=10)
    assert np.isfinite(run_op(lib, good)).all()


def test_bad_delta_softplus_attribute(lib):
    so = ort.SessionOptions()
    oplib.register(so, lib)
    with pytest.raises(Exception, match="delta_softplus must be 0 or 1"):
        ort.InferenceSession(_model_bytes(True, True, True, False, 2), so, providers=["CPUExecutionProvider"])


def test_register_missing_library_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv(oplib.ENV_VAR, str(tmp_path / "nope.so"))
    assert oplib.find_op_library() is None
    with pytest.raises(oplib.OpLibraryMissingError, match="scripts/build_plugins.sh"):
        oplib.register(ort.SessionOptions())
