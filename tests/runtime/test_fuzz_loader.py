"""Seeded, bounded fuzzing of the image loader through the input gate (hypothesis), and a smoke run of the
long fuzzer (benchmarks/fuzz_loader.py).

Every input is a small real seed file (tests/runtime/image_inputs.seeds) with an optional structure-aware
mutation (a DICOM element set to a hostile value, a PNG IHDR / JPEG SOF size) and up to four byte edits.
Outcomes: accepted (finite (1, 3, S, S) float32) or a one-line ImageError; anything else fails the test,
and hypothesis shrinks it to the smallest edit list that still fails.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from emrrg.runtime.preprocess import ImageError  # noqa: E402
from tests.runtime.image_inputs import BYTE_OPS, apply_edit, mutate_structure, run_case, seeds  # noqa: E402

# ~5 ms per input on one core: 600 inputs take a few seconds, far inside CI's 60 s for this test, and
# cover every seed file, every hostile DICOM value and every byte operation many times over.
FUZZ_EXAMPLES = 600
ROOT = Path(__file__).resolve().parents[2]

edits = st.lists(st.tuples(st.sampled_from(BYTE_OPS), st.floats(0, 1), st.integers(0, 2**32 - 1)), max_size=4)


@pytest.mark.timeout(120)
@settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(seeds())), structure=st.one_of(st.none(), st.integers(0, 2**32 - 1)), edits=edits)
def test_loader_accepts_finite_or_refuses(tmp_path_factory, name: str, structure: int | None, edits) -> None:
    data = seeds()[name]
    if structure is not None:
        data = mutate_structure(name, data, random.Random(structure)) or data
    buf = bytearray(data)
    for op, where, value in edits:
        apply_edit(buf, op, where, value)
    path = tmp_path_factory.mktemp("fuzz") / ("case" + Path(name).suffix)
    path.write_bytes(bytes(buf))
    try:
        assert run_case(path) == "accepted"
    except ImageError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)


def test_fuzz_benchmark_smoke(tmp_path: Path) -> None:
    """The long fuzzer's pool, outcome table and files work (40 inputs, 2 workers)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz_loader.py"), "--count", "40", "--seed", "3",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "fuzz_loader.json").read_text())
    assert sum(res["outcomes"].values()) == 40 and res["outcomes"]["accepted"] > 0
    assert res["outcomes"]["other"] == res["outcomes"]["timeout"] == res["outcomes"]["memory"] == 0, res["findings"]
    assert "| accepted |" in (tmp_path / "fuzz_loader.md").read_text()
