"""The GPU tests' case list and references (tests/gpu/scan_cases.py), checked on the CPU so that a GPU run
measures the kernel, not a bug in its yardstick:
  * the cases are the CPU tests' grid (50 cases, same seeds and distributions: identical f32 inputs);
  * the float64 torch loop used as the truth on the GPU equals the CPU tests' independent numpy loop.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from tests.gpu import scan_cases as sc  # noqa: E402
from tests.plugins import test_scan_cpu_op as cpu  # noqa: E402


def test_cases_cover_the_cpu_grid():
    cases = sc.all_cases()
    assert len(cases) == 24 + 16 + 2 + 3 + 4 + 1  # test_shapes, optional, large delta, N, f16 grid, base layer
    assert len({c.name for c in cases}) == len(cases)
    assert {c.dstate for c in cases} == {1, 5, 16, 64} and {c.seqlen for c in cases} >= {1, 7, 37, 50, 197}
    assert any(c.dim == 3072 for c in cases)


@pytest.mark.parametrize("name", ["L197-G4-b2-sp1", "opt-D0z1b0-sp0", "large-delta-sp1", "N5"])
def test_same_inputs_as_the_cpu_tests(name):
    c = next(c for c in sc.all_cases() if c.name == name)
    mine = sc.make_inputs(c)
    theirs = cpu.make_inputs(c.seed, c.batch, c.dim, c.groups, c.dstate, c.seqlen, has_d=c.has_d, has_z=c.has_z,
                             has_bias=c.has_bias, softplus=c.softplus, large_delta=c.large_delta)
    assert mine.keys() == theirs.keys()
    for k in mine:
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)


@pytest.mark.parametrize("name", ["L7-G1-b2-sp0", "opt-D1z0b1-sp1", "opt-D0z0b0-sp1", "N64"])
def test_truth_matches_the_numpy_loop(name):
    c = next(c for c in sc.all_cases() if c.name == name)
    feeds = sc.make_inputs(c)
    t = sc.to_device(feeds, "f32", device="cpu")
    y64 = sc.scan_torch64(t, c.softplus).numpy()
    np.testing.assert_allclose(y64, cpu.scan_numpy(**feeds, delta_softplus=c.softplus), rtol=1e-12, atol=1e-12)
    ref = sc.scan_ref(sc.to_device(feeds, "bf16", device="cpu"), c.softplus, upcast=True)
    assert ref.dtype == torch.float32 and ref.shape == t["u"].shape
