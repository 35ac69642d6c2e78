"""One Runtime shared by several threads: every concurrent `generate` returns what a serial call returns.

The tiny bundle (conftest) has a hybrid layer, so the visual K/V path is covered too. Images are real
X-rays, subsampled so that preprocessing does not dominate; different images and settings per call
make any cross-talk between calls (a shared KV cache, logits buffer or visual K/V) change tokens.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from emrrg.assets import chest_dicom, pneumonia_images
from emrrg.runtime.report_runtime import Runtime
from emrrg.runtime.preprocess import load_image

THREADS, CALLS = 4, 20
JOIN_TIMEOUT_S = 300.0        # a bound on a hang, never a timing assertion (80 tiny reports take ~1 s)


@pytest.fixture(scope="module")
def images():
    return [np.ascontiguousarray(load_image(p)[::8, ::8]) for p in [chest_dicom(), *pneumonia_images()[:3]]]


def jobs():
    """(image, beams, max_new_tokens) per thread and call: mostly greedy, every fifth a 2- or 3-beam search."""
    return [[((t * CALLS + i) % 4, (2 + i % 2) if i % 5 == 4 else 1, 4 + (t + i) % 7) for i in range(CALLS)]
            for t in range(THREADS)]


def cache_arrays(dec):
    """Every KV cache array of a decoder state (a pair of buffers per tensor, or one shared buffer)."""
    for v in dec._buf.values():
        yield from (v if isinstance(v, list) else [v])


def run_threads(target, n: int = THREADS) -> None:
    errors: list = []

    def wrapped(t: int) -> None:
        try:
            target(t)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(t,), daemon=True) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=JOIN_TIMEOUT_S)
    assert not any(th.is_alive() for th in threads), "a generate call hung"
    assert not errors, errors


@pytest.mark.parametrize("max_concurrency", [None, 4], ids=["default", "pool-of-4"])
def test_concurrent_generate_equals_serial(tiny_bundle, images, max_concurrency):
    kw = {} if max_concurrency is None else {"max_concurrency": max_concurrency}
    rt = Runtime.from_pretrained(tiny_bundle, threads=1, **kw)
    plan = jobs()
    serial = {}
    for job in (j for row in plan for j in row):
        if job not in serial:
            img, beams, n = job
            serial[job] = rt.generate([images[img]], num_beams=beams, max_new_tokens=n)["token_ids"]
    got: list[list] = [[None] * CALLS for _ in range(THREADS)]
    start = threading.Barrier(THREADS, timeout=60)

    def worker(t: int) -> None:
        start.wait()
        for i, (img, beams, n) in enumerate(plan[t]):
            try:
                got[t][i] = rt.generate([images[img]], num_beams=beams, max_new_tokens=n)["token_ids"]
            except Exception as e:  # noqa: BLE001 - counted below
                got[t][i] = e

    run_threads(worker)
    calls = [(plan[t][i], got[t][i]) for t in range(THREADS) for i in range(CALLS)]
    raised = [repr(r)[:120] for _, r in calls if isinstance(r, Exception)]
    wrong = [job for job, r in calls if not isinstance(r, Exception) and r != serial[job]]
    assert not raised and not wrong, (f"of {len(calls)} concurrent calls, {len(wrong)} returned other tokens than "
                                      f"the serial run {wrong[:3]} and {len(raised)} raised {raised[:2]}")
    assert len(rt.decoders.states) <= rt.max_concurrency == (max_concurrency or 1)


def test_pool_runs_reports_at_the_same_time(tiny_bundle, images):
    """With max_concurrency=4, four calls are inside the decode loop at once (each waits in its first
    on_token for the other three: a pool that serialized them would break the barrier) and still write
    their own tokens."""
    rt = Runtime.from_pretrained(tiny_bundle, threads=1, max_concurrency=THREADS)
    want = [rt.generate([images[t]], num_beams=1, max_new_tokens=6)["token_ids"] for t in range(THREADS)]
    inside = threading.Barrier(THREADS, timeout=60)
    got: list = [None] * THREADS

    def worker(t: int) -> None:
        first = [True]

        def on_token(_tok: int) -> None:
            if first[0]:
                first[0] = False
                inside.wait()

        got[t] = rt.generate([images[t]], num_beams=1, max_new_tokens=6, on_token=on_token)["token_ids"]

    run_threads(worker)
    assert got == want
    assert len(rt.decoders.states) == THREADS
    states = rt.decoders.states
    for a, b in ((a, b) for k, a in enumerate(states) for b in states[k + 1:]):                  # own buffers
        assert not any(np.shares_memory(x, y) for x in cache_arrays(a) for y in cache_arrays(b))
    assert all(d.sess is rt.decoder.sess and d.embed is rt.decoder.embed for d in states)  # one session, one table


def test_pool_lends_each_state_to_one_caller(tiny_bundle):
    rt = Runtime.from_pretrained(tiny_bundle, threads=1)
    pool = rt.decoders
    taken, released = threading.Event(), threading.Event()
    with pool.take() as mine:
        assert mine is rt.decoder                       # a lone caller always gets the first state

        def other() -> None:
            with pool.take() as theirs:
                assert theirs is mine and released.is_set()
                taken.set()

        th = threading.Thread(target=other, daemon=True)
        th.start()
        assert not taken.wait(0.3)                      # still lent to this thread: the other one waits
        released.set()
    th.join(timeout=60)
    assert taken.is_set() and len(pool.states) == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_max_concurrency_must_be_a_positive_integer(tiny_bundle, bad):
    from emrrg.runtime.decoder import DecoderPool

    with pytest.raises(ValueError, match="max_concurrency must be an integer >= 1"):
        Runtime.from_pretrained(tiny_bundle, max_concurrency=bad)
    with pytest.raises(ValueError, match="max_concurrency"):
        DecoderPool(None, bad)
