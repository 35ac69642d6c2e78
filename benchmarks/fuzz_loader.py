"""Mutation fuzzing of the runtime's image loader (input gate + preprocessing), in a pool of worker processes.

Each input is `tests.runtime.image_inputs.fuzz_case(seed, index)`: a small real seed file (a CR DICOM, an RLE
DICOM, a 64 x 64 crop of the real RG1 film with its header, PNGs, a JPEG) with 1-4 byte-level and structure-
aware mutations (hostile WindowWidth / RescaleSlope / Rows / NumberOfFrames values, PNG IHDR and JPEG SOF
sizes). A worker loads it as the runtime does (`emrrg.runtime.gate.load_study`, then the output checks) and
reports one outcome:

  accepted        a (1, 3, S, S) float32 tensor, every value finite
  ImageError      refused with a one-line ImageError (RefusedInputError counted apart: a policy refusal)
  other           any other exception, or the worker died: a crash, a bug
  timeout         took longer than --timeout seconds (the worker is killed and replaced)
  memory          peak RSS grew by more than --rss-limit-mb, or an allocation failed under the worker's
                  address-space cap (the same limit above its size after start-up)

    python benchmarks/fuzz_loader.py [--count 100000] [--seed 0] [--timeout 10] [--rss-limit-mb 1024]
                                     [--workers 2] [--save DIR] [--out benchmarks/results]

Inputs are a pure function of (seed, index), so any index in the table regenerates its file; --save writes
every input whose outcome is other / timeout / memory. Writes fuzz_loader.{json,md} into --out.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUTCOMES = ("accepted", "ImageError", "other", "timeout", "memory")
BAD_OUTCOMES = ("other", "timeout", "memory")
RESTART_EVERY = 5000  # a fresh worker now and then, so slow growth of one process cannot add up


# --------------------------------------------------------------------------- worker

def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def worker(seed: int, rss_limit_mb: float) -> None:
    """Reads indices (one per line) on stdin, writes one JSON line per index on stdout."""
    import logging
    import warnings

    sys.path.insert(0, str(ROOT))
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    from emrrg.runtime.preprocess import ImageError, RefusedInputError
    from tests.runtime.image_inputs import fuzz_case, run_case, seeds

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but the protocol on the real stdout
    scratch = Path(tempfile.mkdtemp(prefix="emrrg-fuzz-"))
    for name in sorted(seeds()):  # warm up imports and decoders before the address-space cap
        (scratch / name).write_bytes(seeds()[name])
        run_case(scratch / name)
    cap = _status_kb("VmSize") * 1024 + int(rss_limit_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    can_reset = True
    for line in sys.stdin:
        index = int(line)
        name, data = fuzz_case(seed, index)
        path = scratch / ("case" + Path(name).suffix)
        path.write_bytes(data)
        if can_reset:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := current RSS
            except OSError:
                can_reset = False
        start_kb = _status_kb("VmRSS")
        detail = ""
        try:
            outcome = run_case(path)
        except MemoryError:
            outcome = "memory"
        except RefusedInputError as e:
            outcome, detail = "ImageError", "refused: " + str(e).replace(str(path), "<file>")[:160]
        except ImageError as e:
            outcome, detail = ("memory" if "MemoryError" in str(e) else "ImageError",
                               str(e).replace(str(path), "<file>")[:160])
        except Exception as e:  # noqa: BLE001 - the point: anything else is a finding
            outcome, detail = "other", f"{type(e).__name__}: {e}"[:300]
        grew_mb = (_status_kb("VmHWM") - start_kb) / 1024 if can_reset else 0.0
        if outcome != "memory" and grew_mb > rss_limit_mb:
            outcome = "memory"
        out.write(json.dumps({"i": index, "seed_file": name, "outcome": outcome, "detail": detail,
                              "grew_mb": round(grew_mb, 1)}) + "\n")
        out.flush()


# --------------------------------------------------------------------------- pool

class _Worker:
    def __init__(self, seed: int, rss_limit_mb: float):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "--seed", str(seed),
                                      "--rss-limit-mb", str(rss_limit_mb)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.index: int | None = None
        self.deadline = 0.0
        self.done = 0

    def send(self, index: int, timeout: float) -> None:
        self.index, self.deadline = index, time.monotonic() + timeout
        self.proc.stdin.write(f"{index}\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def run(count: int, seed: int, timeout: float, rss_limit_mb: float, workers: int, save: Path | None,
        start: int = 0, progress=None) -> dict:
    """Fuzz `count` inputs; `progress(partial_result)` is called every 5000 inputs."""
    counts = collections.Counter()
    refused = 0
    findings: list[dict] = []
    details = collections.Counter()
    peak_grew = 0.0
    todo = iter(range(start, start + count))
    sel = selectors.DefaultSelector()
    pool: list[_Worker] = []
    t0 = time.monotonic()
    first_timeout = timeout + 30.0  # a fresh worker's first input also waits for its imports

    def spawn() -> _Worker:
        w = _Worker(seed, rss_limit_mb)
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        return w

    def feed(w: _Worker) -> bool:
        index = next(todo, None)
        if index is None:
            w.index = None
            return False
        w.send(index, first_timeout if w.done == 0 else timeout)
        return True

    def record(index: int, outcome: str, detail: str, seed_file: str = "", grew: float = 0.0) -> None:
        nonlocal refused, peak_grew
        counts[outcome] += 1
        peak_grew = max(peak_grew, grew)
        if detail.startswith("refused: "):
            refused += 1
        if outcome in BAD_OUTCOMES:
            findings.append({"index": index, "outcome": outcome, "seed_file": seed_file, "detail": detail})
            if save is not None:
                from tests.runtime.image_inputs import fuzz_case

                name, data = fuzz_case(seed, index)
                save.mkdir(parents=True, exist_ok=True)
                (save / f"{outcome}_{seed}_{index}{Path(name).suffix}").write_bytes(data)
        elif outcome == "ImageError":
            details[detail.removeprefix("refused: ").removeprefix("<file>: ")[:80]] += 1

    def replace(w: _Worker) -> _Worker:
        sel.unregister(w.proc.stdout)
        w.kill()
        pool.remove(w)
        nw = spawn()
        pool.append(nw)
        return nw

    for _ in range(workers):
        pool.append(spawn())
    for w in list(pool):
        feed(w)
    done = reported = 0

    def summary(n: int) -> dict:
        wall = time.monotonic() - t0
        return {"count": n, "seed": seed, "start_index": start, "timeout_s": timeout, "rss_limit_mb": rss_limit_mb,
                "workers": workers, "wall_s": round(wall, 1), "inputs_per_s": round(n / wall, 1),
                "outcomes": {k: counts.get(k, 0) for k in OUTCOMES}, "refused_by_policy": refused,
                "max_rss_growth_mb": peak_grew, "top_image_errors": details.most_common(15),
                "findings": findings[:200]}

    while any(w.index is not None for w in pool):
        now = time.monotonic()
        wait = max(0.0, min(w.deadline for w in pool if w.index is not None) - now)
        for key, _ in sel.select(timeout=wait):
            w: _Worker = key.data
            if w.index is None:
                continue
            line = w.proc.stdout.readline()
            if not line:  # the worker died on this input
                rc = w.proc.wait()
                record(w.index, "other", f"worker died (exit status {rc})")
                nw = replace(w)
                feed(nw)
                done += 1
                continue
            r = json.loads(line)
            record(r["i"], r["outcome"], r["detail"], r["seed_file"], r["grew_mb"])
            done += 1
            w.done += 1
            if w.done >= RESTART_EVERY:
                w = replace(w)
            feed(w)
        now = time.monotonic()
        for w in list(pool):
            if w.index is not None and now > w.deadline:
                record(w.index, "timeout", f"more than {timeout:g} s")
                done += 1
                feed(replace(w))
        if progress is not None and done and done % 5000 == 0 and done != reported:
            reported = done
            progress(summary(done))
    for w in pool:
        sel.unregister(w.proc.stdout)
        w.kill()
    return summary(done)


def write_results(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz_loader.json").write_text(json.dumps(res, indent=2) + "\n")
    o = res["outcomes"]
    lines = ["# Loader fuzzing (input gate + preprocessing)", "",
             f"`python benchmarks/fuzz_loader.py --count {res['count']} --seed {res['seed']} --timeout "
             f"{res['timeout_s']:g} --rss-limit-mb {res['rss_limit_mb']:g} --workers {res['workers']}`: "
             f"{res['count']} mutated inputs in {res['wall_s']:.0f} s ({res['inputs_per_s']:.0f}/s) on "
             f"{res.get('machine', {}).get('cpu', '?')}" + (f" (partial: {res['partial']})" if res.get("partial") else "")
             + ".", "",
             "| outcome | inputs | share |", "|---|---:|---:|"]
    for k in OUTCOMES:
        name = {"ImageError": "ImageError (one-line refusal)", "other": "other exception / worker died",
                "timeout": f"> {res['timeout_s']:g} s", "memory": f"> {res['rss_limit_mb']:g} MB RSS"}.get(k, k)
        lines.append(f"| {name} | {o[k]} | {100 * o[k] / max(1, res['count']):.2f}% |")
    lines += ["", f"Of the ImageErrors, {res['refused_by_policy']} are policy refusals (RefusedInputError: "
                  "pixel budget, modality, multi-frame...). Largest RSS growth of one input: "
                  f"{res['max_rss_growth_mb']:.0f} MB.", "", "Most common ImageError messages:", ""]
    lines += [f"- {n} x `{msg}`" for msg, n in res["top_image_errors"]]
    if res["findings"]:
        lines += ["", "Findings (regenerate with `tests.runtime.image_inputs.fuzz_case(seed, index)`):", ""]
        lines += [f"- index {f['index']} ({f['seed_file']}): {f['outcome']}: {f['detail']}" for f in res["findings"][:50]]
    (out / "fuzz_loader.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=100_000, help="number of inputs")
    p.add_argument("--seed", type=int, default=0, help="fuzz seed: inputs are a pure function of (seed, index)")
    p.add_argument("--start", type=int, default=0, help="first index")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per input before it counts as a hang")
    p.add_argument("--rss-limit-mb", type=float, default=1024.0, help="RSS growth per input that counts as a bomb")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--save", type=Path, default=None, help="write every other / timeout / memory input here")
    p.add_argument("--out", type=Path, default=RESULTS, help="where fuzz_loader.{json,md} go")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.seed, a.rss_limit_mb)
        return None
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    from machine import cpu_name

    machine = {"cpu": cpu_name(), "python": platform.python_version(), "cores": os.cpu_count()}

    def progress(partial: dict) -> None:  # a long run leaves its figures so far if it is stopped
        write_results({**partial, "machine": machine, "partial": f"{partial['count']} of {a.count}"}, a.out)
        print(f"{partial['count']}/{a.count} in {partial['wall_s']:.0f} s: {partial['outcomes']}", flush=True)

    res = run(a.count, a.seed, a.timeout, a.rss_limit_mb, a.workers, a.save, a.start, progress)
    res["machine"] = machine
    write_results(res, a.out)
    print(json.dumps(res["outcomes"]))
    return res


if __name__ == "__main__":
    main()
