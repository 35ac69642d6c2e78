"""selective_scan_ref against an independent naive loop (scalar per channel, per state, per step).

Tolerances: both sides accumulate in f32 but in a different order (einsum over N vs a scalar sum,
exp of a product computed once vs per step), so they agree to f32 rounding of an L-step recurrence:
RTOL_F32 / ATOL_F32. f16 inputs are upcast to f32 inside, so the only extra error is the final cast
of y back to f16: half an f16 ulp relative, i.e. ~5e-4 (RTOL_F16).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from emrrg.ops.selective_scan import selective_scan, selective_scan_ref

RTOL_F32, ATOL_F32 = 1e-5, 1e-5
RTOL_F16, ATOL_F16 = 1e-3, 1e-3


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    """Independent reference in float64 with explicit loops; deliberately shares no code with the op."""
    b, d, L = u.shape
    n, g = A.shape[1], B.shape[1]
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    y = torch.zeros(b, d, L, dtype=torch.float64)
    for bi in range(b):
        for c in range(d):
            grp = c // (d // g)
            h = [0.0] * n
            for t in range(L):
                dt = delta[bi, c, t].item() + (delta_bias[c].item() if delta_bias is not None else 0.0)
                if delta_softplus:
                    dt = dt if dt > 20 else math.log1p(math.exp(dt))
                acc = 0.0
                for s in range(n):
                    h[s] = math.exp(dt * A[c, s].item()) * h[s] + dt * B[bi, grp, s, t].item() * u[bi, c, t].item()
                    acc += C[bi, grp, s, t].item() * h[s]
                if D is not None:
                    acc += D[c].item() * u[bi, c, t].item()
                if z is not None:
                    zz = z[bi, c, t].item()
                    acc *= zz / (1 + math.exp(-zz))
                y[bi, c, t] = acc
    return y


def make_inputs(b, d, L, n, g, dtype=torch.float32, big_delta=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    u = r(b, d, L).to(dtype)
    delta = (r(b, d, L) * 0.5 + (20.0 if big_delta else -1.0)).to(dtype)
    A = -torch.rand(d, n, generator=gen) * 2 - 0.1
    B, C = r(b, g, n, L).to(dtype), r(b, g, n, L).to(dtype)
    D, z, bias = r(d), r(b, d, L).to(dtype), r(d) * 0.1
    return u, delta, A, B, C, D, z, bias


def report(name, got, want):
    diff = (got.double() - want.double()).abs()
    print(f"{name}: max |diff| {diff.max().item():.3e}, mean {diff.mean().item():.3e}")


@pytest.mark.parametrize("L", [1, 197])
@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("use_D,use_z,use_bias", [(True, True, True), (False, False, False), (True, False, True), (False, True, False)])
@pytest.mark.parametrize("softplus", [True, False])
def test_ref_matches_naive(L, g, use_D, use_z, use_bias, softplus):
    if L == 197 and not (use_D and use_z and use_bias):
        L = 13  # the long sequence once with every input on; the flag grid on a shorter one keeps the loop fast
    u, delta, A, B, C, D, z, bias = make_inputs(2, 8, L, 4, g)
    if not softplus:
        delta = delta.abs()  # the raw delta is a step size: keep it positive as a real dt is
    kw = dict(D=D if use_D else None, z=z if use_z else None, delta_bias=bias if use_bias else None, delta_softplus=softplus)
    got = selective_scan_ref(u, delta, A, B, C, **kw)
    want = naive_scan(u, delta, A, B, C, **kw)
    report(f"L={L} g={g} D={use_D} z={use_z} bias={use_bias} softplus={softplus}", got, want)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=RTOL_F32, atol=ATOL_F32)


def test_large_delta():
    """delta ~ 20: softplus saturates (log1p(exp) overflow guard) and exp(dA) underflows to 0."""
    u, delta, A, B, C, D, z, bias = make_inputs(1, 8, 31, 4, 4, big_delta=True)
    got = selective_scan_ref(u, delta, A, B, C, D, z, bias)
    want = naive_scan(u, delta, A, B, C, D, z, bias)
    report("large delta", got, want)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=RTOL_F32, atol=ATOL_F32 * 10)  # |y| ~ 20x larger here


def test_f16_inputs():
    u, delta, A, B, C, D, z, bias = make_inputs(1, 8, 40, 4, 4, dtype=torch.float16)
    got = selective_scan_ref(u, delta, A, B, C, D, z, bias)
    assert got.dtype == torch.float16
    want = naive_scan(u, delta, A, B, C, D, z, bias)
    report("f16", got, want)
    torch.testing.assert_close(got.double(), want, rtol=RTOL_F16, atol=ATOL_F16)


def test_grouped_equals_per_group_calls():
    """G=4 in one call == four G=1 calls on the channel slices (the fused four-direction contract)."""
    u, delta, A, B, C, D, z, bias = make_inputs(2, 16, 23, 4, 4)
    fused = selective_scan_ref(u, delta, A, B, C, D, z, bias)
    parts = []
    for k in range(4):
        s = slice(4 * k, 4 * k + 4)
        parts.append(selective_scan_ref(u[:, s], delta[:, s], A[s], B[:, k:k + 1], C[:, k:k + 1], D[s], z[:, s], bias[s]))
    # Same arithmetic, but einsum may block the N-reduction differently for other shapes: f32 rounding only.
    torch.testing.assert_close(fused, torch.cat(parts, 1), rtol=RTOL_F32, atol=ATOL_F32)


def test_dispatcher_uses_reference_on_cpu():
    u, delta, A, B, C, D, z, bias = make_inputs(1, 4, 5, 2, 1)
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, D, z, bias), selective_scan_ref(u, delta, A, B, C, D, z, bias))


@pytest.mark.parametrize("bad", ["u", "B", "groups", "D"])
def test_shape_errors(bad):
    u, delta, A, B, C, D, z, bias = make_inputs(1, 8, 5, 4, 4)
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
