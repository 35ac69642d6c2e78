"""com.emrrg::SelectiveScan in ONNX Runtime (libemrrg_ops.so) against two references.

Each case builds a single-node ONNX model and runs it with the op library, then compares y with
  (1) `selective_scan_ref` (torch, f32 — the project's reference), and
  (2) `scan_numpy` below: an independent naive loop in float64 (the "truth" both f32 paths approximate).
On top of the fixed tolerances, the op must be no worse than the torch f32 reference itself:
  max|op - f64| <= 2 * max|ref - f64| + ATOL  (the bound idea of mamba's test_layernorm_gated).

Tolerances. Errors are measured against the float64 loop and scaled by max(1, max|y|), because y = C.h
sums N products with cancellation: near y = 0 the elementwise relative error is meaningless (it is
~6e-4 at |y| ~ 1e-3 for the torch reference and the op alike). `pytest -s` prints every case.
  - f32: the recurrence runs L sequential exp/fma steps in f32 in both the op and the reference, each
    rounding differently (our exp polynomial is within ~1.3 ulp, torch's within ~1 ulp). Measured over
    this grid: max|op - f64| / max|y| = 2.5e-7 (base layer: max abs 1.2e-5 at max|y| = 74, torch's own
    8.8e-6), max|op - torch| / max|y| = 2.6e-7, op error <= 1.7 x torch's error. ATOL_F32 = 2e-6 (x max|y|)
    is ~8x what was measured; RTOL_F32 = 1e-4 only matters for the largest elements. Any semantic slip
    (wrong group, lost bias, softplus off, one step shifted) is >= 1e-2 x max|y|.
  - f16: inputs and output f16 (ulp 2^-11 = 4.9e-4 relative), accumulation f32, so the error is the
    final rounding of y (<= 0.5 ulp of the largest elements: measured max 4.1e-4 x max|y|, the same as
    the torch reference's, which rounds nearly the same f32 values: op vs torch 1.4e-5 x max|y|).
    ATOL_F16 = 2e-3 (x max|y|) ~ 4 f16 ulps; RTOL_F16 = 2e-3.
"""
from __future__ import annotations

import functools
import itertools
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from emrrg.runtime import oplib  # noqa: E402

LIB = oplib.find_op_library()
SKIP_REASON = f"{oplib.LIBRARY_NAME} is not built: run bash scripts/build_plugins.sh"

# ---- named tolerances (see the module docstring for why) ----
RTOL_F32, ATOL_F32 = 1e-4, 2e-6
RTOL_F16, ATOL_F16 = 2e-3, 2e-3
WORSE_THAN_REF_FACTOR = 2.0  # op error vs f64 may be at most this many times the torch reference's

BASE = dict(batch=1, dim=4 * 768, groups=4, dstate=16, seqlen=197)  # one encoder layer, 4 directions


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
OPTIONAL = ("D", "z", "delta_bias")


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
# References
# ---------------------------------------------------------------------------------------------
def scan_numpy(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """Naive float64 loop over L, written from the contract (not from either implementation)."""
    u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
    b, d, L = u.shape
    g, n = B.shape[1], A.shape[1]
    if delta_bias is not None:
        delta = delta + np.asarray(delta_bias, np.float64)[None, :, None]
    if delta_softplus:  # torch's softplus: identity above 20
        delta = np.where(delta > 20.0, delta, np.log1p(np.exp(np.minimum(delta, 20.0))))
    group = np.arange(d) // (d // g)                       # channel -> group
    Bd, Cd = B[:, group], C[:, group]                      # (b, d, n, L)
    h = np.zeros((b, d, n))
    y = np.empty((b, d, L))
    for t in range(L):
        dt = delta[:, :, t, None]                          # (b, d, 1)
        h = np.exp(dt * A[None]) * h + dt * Bd[..., t] * u[:, :, t, None]
        y[:, :, t] = (h * Cd[..., t]).sum(-1)
    if D is not None:
        y = y + u * np.asarray(D, np.float64)[None, :, None]
    if z is not None:
        z = np.asarray(z, np.float64)
        y = y * (z / (1.0 + np.exp(-z)))
    return y


def scan_torch(feeds, softplus):
    torch = pytest.importorskip("torch")
    from emrrg.ops.selective_scan import selective_scan_ref

    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
    y = selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"), t.get("delta_bias"),
                           delta_softplus=bool(softplus))
    return y.numpy()


def make_inputs(seed, batch, dim, groups, dstate, seqlen, *, has_d=True, has_z=True, has_bias=True,
                softplus=True, large_delta=False, f16=False):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    if large_delta:  # dt ~ 20: exp(dt * A) underflows towards 0, softplus sits at its threshold
        delta = 20.0 + rng.standard_normal((batch, dim, seqlen))
    elif softplus:
        delta = rng.standard_normal((batch, dim, seqlen)) * 0.5 - 1.0
    else:  # used as dt directly: keep it positive so the state decays
        delta = rng.uniform(0.01, 1.0, (batch, dim, seqlen))
    feeds = {
        "u": rng.standard_normal((batch, dim, seqlen)).astype(f32),
        "delta": delta.astype(f32),
        # Mamba's S4D-real init spans A = -1 .. -N; spread it a bit
        "A": (-np.exp(rng.uniform(np.log(0.5), np.log(16.0), (dim, dstate)))).astype(f32),
        "B": rng.standard_normal((batch, groups, dstate, seqlen)).astype(f32),
        "C": rng.standard_normal((batch, groups, dstate, seqlen)).astype(f32),
    }
    if has_d:
        feeds["D"] = rng.standard_normal(dim).astype(f32)
    if has_z:
        feeds["z"] = rng.standard_normal((batch, dim, seqlen)).astype(f32)
    if has_bias:  # without softplus dt = delta + bias must stay positive, or the state grows without bound
        bias = rng.standard_normal(dim) * 0.5 if softplus else rng.uniform(0.0, 0.1, dim)
        feeds["delta_bias"] = bias.astype(f32)
    if f16:
        for k in ("u", "delta", "B", "C", "z"):
            if k in feeds:
                feeds[k] = feeds[k].astype(np.float16)
    return feeds


def check(y, feeds, softplus, *, label=""):
    """Compare with both references; print the differences first, then assert."""
    f16 = feeds["u"].dtype == np.float16
    rtol, atol = (RTOL_F16, ATOL_F16) if f16 else (RTOL_F32, ATOL_F32)
    assert y.dtype == feeds["u"].dtype and y.shape == feeds["u"].shape
    assert np.isfinite(y).all(), "NaN/inf in the op's output"
    truth = scan_numpy(**feeds, delta_softplus=bool(softplus))
    ref = scan_torch(feeds, softplus)
    assert np.isfinite(ref).all(), "NaN/inf in the reference (bad test inputs)"
    y64, ref64 = y.astype(np.float64), ref.astype(np.float64)
    scale = max(1.0, float(np.abs(truth).max()))  # tolerances are relative to the output's magnitude
    err_op, err_ref, op_vs_ref = np.abs(y64 - truth), np.abs(ref64 - truth), np.abs(y64 - ref64)
    print(f"\n[{label}] max|y|={scale:.3g}  op-f64: max {err_op.max():.3g} mean {err_op.mean():.3g}  "
          f"ref-f64: max {err_ref.max():.3g} mean {err_ref.mean():.3g}  op-ref: max {op_vs_ref.max():.3g} "
          f"mean {op_vs_ref.mean():.3g}  max rel(op-f64)/scale {err_op.max() / scale:.3g}")
    np.testing.assert_allclose(y64, truth, rtol=rtol, atol=atol * scale, err_msg=f"op vs float64 loop [{label}]")
    np.testing.assert_allclose(y64, ref64, rtol=rtol, atol=atol * scale, err_msg=f"op vs selective_scan_ref [{label}]")
    assert err_op.max() <= WORSE_THAN_REF_FACTOR * err_ref.max() + atol * scale, (
        f"op error {err_op.max():.3g} exceeds {WORSE_THAN_REF_FACTOR} x the f32 reference's {err_ref.max():.3g} [{label}]")


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------
# D = 88 channels: 22 per group with G = 4 (a full block of 16 plus a padded block of 6), 88 with G = 1.
SMALL_DIM = 88


@pytest.mark.parametrize("seqlen", [1, 7, 197])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("softplus", [0, 1])
def test_shapes(lib, seqlen, groups, batch, softplus):
    feeds = make_inputs(seqlen * 100 + groups * 10 + batch, batch, SMALL_DIM, groups, 16, seqlen, softplus=softplus)
    check(run_op(lib, feeds, softplus), feeds, softplus, label=f"L={seqlen} G={groups} b={batch} sp={softplus}")


@pytest.mark.parametrize("has_d,has_z,has_bias", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("softplus", [0, 1])
def test_optional_inputs(lib, has_d, has_z, has_bias, softplus):
    feeds = make_inputs(7, 2, SMALL_DIM, 4, 16, 37, has_d=has_d, has_z=has_z, has_bias=has_bias, softplus=softplus)
    check(run_op(lib, feeds, softplus), feeds, softplus,
          label=f"D={has_d} z={has_z} bias={has_bias} sp={softplus}")


@pytest.mark.parametrize("softplus", [0, 1])
def test_large_delta(lib, softplus):
    feeds = make_inputs(11, 2, SMALL_DIM, 4, 16, 197, softplus=softplus, large_delta=True)
    check(run_op(lib, feeds, softplus), feeds, softplus, label=f"delta~20 sp={softplus}")


@pytest.mark.parametrize("dstate", [1, 5, 64])
def test_state_sizes(lib, dstate):
    feeds = make_inputs(13, 1, SMALL_DIM, 4, dstate, 50)
    check(run_op(lib, feeds), feeds, 1, label=f"N={dstate}")


@pytest.mark.parametrize("seqlen", [7, 197])
@pytest.mark.parametrize("has_z", [False, True])
def test_f16_inputs(lib, seqlen, has_z):
    feeds = make_inputs(17, 2, SMALL_DIM, 4, 16, seqlen, has_z=has_z, f16=True)
    check(run_op(lib, feeds), feeds, 1, label=f"f16 L={seqlen} z={has_z}")


def test_default_softplus_is_on(lib):
    """No delta_softplus attribute means softplus (the contract's default 1)."""
    feeds = make_inputs(19, 1, SMALL_DIM, 4, 16, 20)
    np.testing.assert_array_equal(run_op(lib, feeds, softplus=None), run_op(lib, feeds, softplus=1))


def test_tensorrt_attributes_are_ignored(lib):
    """plugin_version / plugin_namespace (for TensorRT) load in ORT and change nothing."""
    feeds = make_inputs(23, 1, SMALL_DIM, 4, 16, 20)
    np.testing.assert_array_equal(run_op(lib, feeds, trt_attrs=True), run_op(lib, feeds, trt_attrs=False))


def test_thread_counts_agree_bitwise(lib, monkeypatch):
    """Tasks are independent, so ORT's pool, our own threads and one thread give identical bits."""
    feeds = make_inputs(29, 2, SMALL_DIM, 4, 16, 60)
    y_pool = run_op(lib, feeds)
    y_single = run_op(lib, feeds, intra_threads=1)
    monkeypatch.setenv("EMRRG_SCAN_THREADS", "3")
    y_env = run_op(lib, feeds)
    np.testing.assert_array_equal(y_pool, y_single)
    np.testing.assert_array_equal(y_pool, y_env)


def test_base_layer_shape(lib):
    """One encoder layer as exported: batch 1, D = 4 x 768 (four directions as groups), N 16, L 197."""
    feeds = make_inputs(31, **BASE)
    check(run_op(lib, feeds), feeds, 1, label="base layer")


# ---- errors are ORT errors, not crashes ----
def _assert_ort_error(lib, feeds, match):
    with pytest.raises(Exception, match=match) as info:
        run_op(lib, feeds)
    assert "SelectiveScan" in str(info.value)
    print(f"\nORT error as expected: {str(info.value).splitlines()[-1]}")


@pytest.mark.parametrize("case", ["B_wrong_N", "C_differs", "D_wrong_len", "groups_not_dividing", "z_wrong_L",
                                  "delta_wrong", "A_wrong_dim"])
def test_shape_mismatch_is_an_ort_error(lib, case):
    feeds = make_inputs(37, 1, SMALL_DIM, 4, 16, 10)
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
    good = make_inputs(37, 1, SMALL_DIM, 4, 16, 10)
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
