"""The one yardstick for every SelectiveScan implementation the tests check: the cases, the truth, the tolerances.

Used by the PyTorch reference / fast path / pure-ONNX body tests (tests/ops), the CPU op (tests/plugins/
test_scan_cpu_op.py), the CUDA kernel and the TensorRT plugin (tests/gpu) and benchmarks/scan_gpu.py, in the
manner of ggml's test-backend-ops: every backend runs the same cases and is compared with the same float64
truth under one tolerance per dtype.

* CASES: shapes, flags, seeds and the dtype each case is meant for; make_inputs(case) gives f32 arrays
  (cast the activations with cast_activations for f16 / bf16).
* truth(feeds, softplus): a naive float64 loop over L written from the contract (selective_scan.py's
  docstring), sharing no code with any implementation. It takes the inputs as the implementation saw them
  (already rounded to f16 / bf16), so it measures the implementation's arithmetic, not the input rounding.
* TOLERANCES: per output dtype, errors scaled by max(1, max|truth|) (see `Tolerance`).
numpy only at import; torch is needed only for bf16 tensors.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SMALL_DIM = 88  # 22 channels per group with G = 4: a full block and a padded one in the CPU op and the kernel
ACTIVATIONS = ("u", "delta", "B", "C", "z")  # the inputs in the activation dtype; A, D, delta_bias stay f32
OPTIONAL = ("D", "z", "delta_bias")


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    dim: int
    groups: int
    dstate: int
    seqlen: int
    has_d: bool = True
    has_z: bool = True
    has_bias: bool = True
    softplus: bool = True
    large_delta: bool = False
    seed: int = 0
    dtype: str = "f32"  # the activation dtype of the CPU tests; the GPU tests run every case in every dtype


def all_cases() -> list[Case]:
    cases = []
    for seqlen, groups, batch, sp in itertools.product([1, 7, 197], [1, 4], [1, 2], [0, 1]):   # shapes
        cases.append(Case(f"L{seqlen}-G{groups}-b{batch}-sp{sp}", batch, SMALL_DIM, groups, 16, seqlen, softplus=bool(sp),
                          seed=seqlen * 100 + groups * 10 + batch))
    for (d, z, bias), sp in itertools.product(itertools.product([False, True], repeat=3), [0, 1]):  # optional inputs
        cases.append(Case(f"opt-D{int(d)}z{int(z)}b{int(bias)}-sp{sp}", 2, SMALL_DIM, 4, 16, 37, d, z, bias, bool(sp), seed=7))
    for sp in (0, 1):  # delta ~ 20: softplus at its threshold, exp(dt * A) underflows towards 0
        cases.append(Case(f"large-delta-sp{sp}", 2, SMALL_DIM, 4, 16, 197, softplus=bool(sp), large_delta=True, seed=11))
    for n in (1, 5, 64):                                                                            # state sizes
        cases.append(Case(f"N{n}", 1, SMALL_DIM, 4, n, 50, seed=13))
    for seqlen, z in itertools.product([7, 197], [False, True]):                                    # f16 activations
        cases.append(Case(f"f16grid-L{seqlen}-z{int(z)}", 2, SMALL_DIM, 4, 16, seqlen, has_z=z, seed=17, dtype="f16"))
    cases.append(Case("base-layer", 1, 4 * 768, 4, 16, 197, seed=31))  # one encoder layer: 4 directions as groups
    return cases


CASES = all_cases()


def case(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def make_inputs(c: Case) -> dict[str, np.ndarray]:
    """f32 host arrays. Distributions: Mamba's S4D-real A (-0.5 .. -16); delta around softplus^-1 of small steps,
    or positive when used as dt directly (no softplus), so the state decays instead of growing."""
    rng = np.random.default_rng(c.seed)
    b, d, g, n, L = c.batch, c.dim, c.groups, c.dstate, c.seqlen
    if c.large_delta:
        delta = 20.0 + rng.standard_normal((b, d, L))
    elif c.softplus:
        delta = rng.standard_normal((b, d, L)) * 0.5 - 1.0
    else:
        delta = rng.uniform(0.01, 1.0, (b, d, L))
    f = {"u": rng.standard_normal((b, d, L)), "delta": delta,
         "A": -np.exp(rng.uniform(np.log(0.5), np.log(16.0), (d, n))),
         "B": rng.standard_normal((b, g, n, L)), "C": rng.standard_normal((b, g, n, L))}
    if c.has_d:
        f["D"] = rng.standard_normal(d)
    if c.has_z:
        f["z"] = rng.standard_normal((b, d, L))
    if c.has_bias:  # without softplus dt = delta + bias must stay positive
        f["delta_bias"] = rng.standard_normal(d) * 0.5 if c.softplus else rng.uniform(0.0, 0.1, d)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in f.items()}


def cast_activations(feeds: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """numpy feeds with the activations in `dtype` ('f32' or 'f16'; numpy has no bf16: use torch for it)."""
    np_dtype = {"f32": np.float32, "f16": np.float16}[dtype]
    return {k: (v.astype(np_dtype) if k in ACTIVATIONS else v) for k, v in feeds.items()}


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (any device, any dtype including bf16)
        return x.detach().double().cpu().numpy()
    return np.asarray(x, np.float64)


def truth(feeds: dict, softplus: bool) -> np.ndarray:
    """float64 naive loop over L from the contract; feeds: numpy arrays or torch tensors, D/z/delta_bias optional."""
    u, delta, A, B, C = (_f64(feeds[k]) for k in ("u", "delta", "A", "B", "C"))
    b, d, L = u.shape
    g, n = B.shape[1], A.shape[1]
    if "delta_bias" in feeds:
        delta = delta + _f64(feeds["delta_bias"])[None, :, None]
    if softplus:  # torch's softplus: the identity above 20
        delta = np.where(delta > 20.0, delta, np.log1p(np.exp(np.minimum(delta, 20.0))))
    group = np.arange(d) // (d // g)                       # channel -> group
    Bd, Cd = B[:, group], C[:, group]                      # (b, d, n, L)
    h = np.zeros((b, d, n))
    y = np.empty((b, d, L))
    for t in range(L):
        dt = delta[:, :, t, None]                          # (b, d, 1)
        h = np.exp(dt * A[None]) * h + dt * Bd[..., t] * u[:, :, t, None]
        y[:, :, t] = (h * Cd[..., t]).sum(-1)
    if "D" in feeds:
        y = y + u * _f64(feeds["D"])[None, :, None]
    if "z" in feeds:
        z = _f64(feeds["z"])
        y = y * (z / (1.0 + np.exp(-z)))
    return y


# ---- tolerances --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """Bounds for an output of this dtype against truth(); atol and the NMSE are relative to the output's scale
    max(1, max|truth|), because y = C.h sums N products with cancellation: near y = 0 an elementwise relative
    error means nothing. ref_slack is the additive term of the comparison with the PyTorch reference
    (WORSE_THAN_REF_FACTOR)."""
    rtol: float
    atol: float       # x scale
    ref_slack: float  # x scale
    max_nmse: float   # sum (y - truth)^2 / sum truth^2


TOLERANCES = {
    # f32: L sequential exp/fma steps in f32, each implementation rounding differently (the core's exp is within
    # ~1.3 ulp, torch's within ~1). Measured on CASES: max|CPU op - truth| = 2.5e-7 x scale (base layer 1.2e-5 at
    # max|y| = 74, the torch reference 8.8e-6). atol = 2e-6 is ~8x that; any semantic slip (wrong group, lost
    # bias, softplus off, a shifted step) is >= 1e-2 x scale. NMSE measured ~1e-14; a slip gives >= 1e-4.
    "f32": Tolerance(rtol=1e-4, atol=2e-6, ref_slack=2e-6, max_nmse=1e-10),
    # f16 activations, f32 accumulation: the error is the final rounding of y, <= 0.5 ulp (2^-11 relative) of
    # the largest elements: measured 4.1e-4 x scale for the CPU op and the torch reference alike. atol ~ 4 ulps.
    # NMSE of that rounding alone ~ (ulp / 3)^2 = 3e-8. ref_slack: two unit roundoffs (2 x 2^-11).
    "f16": Tolerance(rtol=2e-3, atol=2e-3, ref_slack=2 * 2.0 ** -11, max_nmse=1e-6),
    # bf16: the same with 8 mantissa bits (unit roundoff 2^-8): atol ~ 4 of them, NMSE ~ 2e-6 from rounding alone.
    "bf16": Tolerance(rtol=1.6e-2, atol=1.6e-2, ref_slack=2 * 2.0 ** -8, max_nmse=1e-4),
}
# A low-precision or differently ordered implementation may be at most this many times as far from the truth
# (or from the f32 reference) as the project's PyTorch reference in the same dtype, plus ref_slack x scale (the
# bound of mamba's test_layernorm_gated).
WORSE_THAN_REF_FACTOR = 2.0


def dtype_name(y) -> str:
    s = str(y.dtype)
    return "bf16" if "bfloat16" in s else "f16" if ("float16" in s) else "f32"


def errors(y, want: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(|y - want| elementwise, scale = max(1, max|want|), NMSE)."""
    err = np.abs(_f64(y) - want)
    scale = max(1.0, float(np.abs(want).max()))
    nmse = float((err ** 2).sum() / max(float((want ** 2).sum()), 1e-300))
    return err, scale, nmse


def assert_matches_truth(y, want: np.ndarray, label: str = "", dtype: str | None = None) -> float:
    """y (numpy or torch) against the truth under TOLERANCES[its dtype]; prints the errors first; returns max error."""
    dtype = dtype or dtype_name(y)
    tol = TOLERANCES[dtype]
    assert tuple(y.shape) == want.shape, f"shape {tuple(y.shape)} != {want.shape} [{label}]"
    y64 = _f64(y)
    assert np.isfinite(y64).all(), f"NaN/inf in the output [{label}]"
    err, scale, nmse = errors(y64, want)
    print(f"\n[{label} {dtype}] max|y|={scale:.3g}  vs f64: max {err.max():.3g} mean {err.mean():.3g} "
          f"(x scale {err.max() / scale:.3g})  NMSE {nmse:.3g}")
    np.testing.assert_allclose(y64, want, rtol=tol.rtol, atol=tol.atol * scale, err_msg=f"vs float64 truth [{label}]")
    assert nmse <= tol.max_nmse, f"NMSE {nmse:.3g} > {tol.max_nmse:g} [{label} {dtype}]"
    return float(err.max())


def assert_no_worse_than(err: float, ref_err: float, scale: float, dtype: str, label: str = "") -> None:
    bound = WORSE_THAN_REF_FACTOR * ref_err + TOLERANCES[dtype].ref_slack * scale
    assert err <= bound, (f"error {err:.3g} > {WORSE_THAN_REF_FACTOR} x the PyTorch reference's {ref_err:.3g} "
                          f"+ {TOLERANCES[dtype].ref_slack:.3g} x scale [{label} {dtype}]")
