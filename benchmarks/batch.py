"""Batch throughput: studies per hour, a plain serial loop over Runtime vs emrrg-batch on Ray Data, in one run.

    python benchmarks/batch.py [--bundle .cache/bench/bundle-int8-4bit] [--build] [--studies 8,32] [--tokens 60]
                               [--repeats 2]

Configurations, alternated round by round (a, b, c, a, b, c, ...) so that load on this shared machine hits
all three alike, each a fresh process timed from its launch to its exit:
  (a) serial: one Runtime with 2 ONNX Runtime threads, `generate` over the studies in a loop;
  (b) emrrg-batch --workers 1 --threads-per-worker 2 (embedded Ray, 2 CPUs);
  (c) emrrg-batch --workers 2 --threads-per-worker 1.
Studies: copies of the real adult film RG1_UNCR.dcm (1955 x 1841, full size, so preprocessing costs what it
costs on an archive), each with its own Study / Series / SOP Instance UIDs; every report is exactly `--tokens`
greedy tokens (min = max new tokens), as in benchmarks/e2e.py.

Each configuration runs the whole job at two sizes, N1 and N2 studies (`--studies N1,N2`). From the two wall
times: the marginal seconds per study, (job(N2) - job(N1)) / (N2 - N1), which is what a 100k-study job runs
at (its inverse is the steady studies per hour), and the fixed cost, job(N1) - N1 x marginal (start-up: Ray,
the actors loading the bundle, the header scan). Timestamps inside a Ray run would flatter it: its tasks
preprocess every study of a small job while the actors are still loading, which a long job cannot do.
Ray's overhead is each Ray configuration's marginal seconds per study against (a)'s. The default bundle is
base encoder + SmolLM2, INT8 + 4-bit, at the path benchmarks/e2e.py builds it; `--build` builds it when it is
missing (emrrg-init + emrrg-export: tens of minutes on 2 cores).

Writes benchmarks/results/batch.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / ".cache" / "bench"
DEFAULT_BUNDLE = WORK / "bundle-int8-4bit"
CONFIGS = {"a_serial_loop": None, "b_ray_1x2": (1, 2), "c_ray_2x1": (2, 1)}
PAPER_STUDIES = 100_000
PAPER_MACHINES = (1, 4, 16, 64)
CORES = 2
SAMPLE_S = 0.2                  # CPU-time sampling period of a job's process tree

sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

SERIAL = r'''
import sys
from emrrg.runtime.report_runtime import Runtime
bundle, tokens, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rt = Runtime.from_pretrained(bundle, threads=%d)
for f in files:
    assert rt.generate([f], num_beams=1, max_new_tokens=tokens, min_new_tokens=tokens)["tokens"] == tokens
''' % CORES


def build_bundle(bundle: Path) -> None:
    """base encoder + SmolLM2 checkpoint, exported INT8 + 4-bit (what benchmarks/e2e.py exports)."""
    ckpt = WORK / "ckpt-base-smollm2"
    bin_ = Path(sys.executable).parent
    if not (ckpt / "config.json").is_file():
        subprocess.run([str(bin_ / "emrrg-init"), "--encoder", "base", "--decoder", "smollm2-135m", "-o", str(ckpt)], check=True)
    subprocess.run([str(bin_ / "emrrg-export"), str(ckpt), "-o", str(bundle), "--int8", "--llm-bits", "4", "--no-progress"],
                   check=True)


def make_studies(folder: Path, n: int) -> list[str]:
    """n single-view studies: the real film with new UIDs each."""
    import pydicom
    from pydicom.uid import generate_uid

    from emrrg.assets import chest_dicom

    src = pydicom.dcmread(chest_dicom("RG1_UNCR.dcm"))
    files = []
    for i in range(n):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        files.append(str(folder / f"study{i:04d}.dcm"))
        ds.save_as(files[-1], enforce_file_format=True)
    return files


def timed(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds from launch to exit, and the CPU seconds (user + system) of the process and all its
    descendants (Ray's GCS, raylet and workers), sampled every SAMPLE_S: a process that ends between two
    samples loses at most that much of its CPU time."""
    import psutil

    seen: dict[tuple[int, float], float] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log) as proc:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for q in procs:
                try:
                    with q.oneshot():
                        c = q.cpu_times()
                        seen[(q.pid, q.create_time())] = c.user + c.system
                except psutil.NoSuchProcess:
                    pass
            time.sleep(SAMPLE_S)
        proc.wait()
        log.seek(0)
        err = log.read()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{err[-3000:]}")
    return wall, sum(seen.values()), err


def run_serial(bundle: Path, files: list[str], tokens: int) -> tuple[float, float]:
    """(a): wall and CPU seconds of the whole job."""
    return timed([sys.executable, "-c", SERIAL, str(bundle), str(tokens), *files])[:2]


def run_ray(bundle: Path, folder: Path, out: Path, tokens: int, n: int, workers: int, threads: int) -> tuple[float, float]:
    """(b), (c): wall and CPU seconds of the whole job; every one of the n studies must be a `tokens`-token report."""
    import pyarrow.parquet as pq

    cmd = [str(Path(sys.executable).parent / "emrrg-batch"), str(bundle), str(folder), "-o", str(out),
           "--workers", str(workers), "--threads-per-worker", str(threads), "--beams", "1",
           "--max-new-tokens", str(tokens), "--min-new-tokens", str(tokens)]
    wall, cpu, _ = timed(cmd)
    rows = pq.read_table(out).to_pylist()
    good = [r for r in rows if r["status"] == "ok" and r["tokens"] == tokens]
    if len(good) != n or len(rows) != n:
        raise SystemExit(f"emrrg-batch wrote {len(good)} {tokens}-token reports in {len(rows)} rows for {n} studies")
    return wall, cpu


def figures(jobs: dict[int, tuple[float, float]]) -> dict:
    (n1, (w1, c1)), (n2, (w2, c2)) = sorted(jobs.items())
    marginal = (w2 - w1) / (n2 - n1)
    return {f"job_s_{n1}": w1, f"job_s_{n2}": w2, "marginal_s_per_study": marginal,
            "studies_per_hour_steady": 3600 / marginal, "fixed_s": w1 - n1 * marginal,
            f"studies_per_hour_job_{n2}": 3600 * n2 / w2, "marginal_cpu_s_per_study": (c2 - c1) / (n2 - n1),
            "fixed_cpu_s": c1 - n1 * (c2 - c1) / (n2 - n1)}


def summarize(rounds: dict[str, list[dict]]) -> dict:
    out = {}
    for name, rs in rounds.items():
        figs = [figures(r) for r in rs]
        out[name] = {k: statistics.median(f[k] for f in figs) for k in figs[0]}
        out[name]["rounds"] = figs
    a = out["a_serial_loop"]
    for name in ("b_ray_1x2", "c_ray_2x1"):
        c = out[name]
        c["overhead_vs_a"] = c["marginal_s_per_study"] / a["marginal_s_per_study"] - 1
        c["cpu_overhead_vs_a"] = c["marginal_cpu_s_per_study"] / a["marginal_cpu_s_per_study"] - 1
        c["fixed_s_more_than_a"] = c["fixed_s"] - a["fixed_s"]
    return out


def write_results(res: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batch.json").write_text(json.dumps(res, indent=2) + "\n")
    s, (n1, n2) = res["summary"], res["studies"]
    best = min(("b_ray_1x2", "c_ray_2x1"), key=lambda k: s[k]["marginal_s_per_study"])
    lines = ["# Batch throughput: serial Runtime loop vs emrrg-batch on Ray Data", "",
             f"{res['machine']}; bundle `{res['bundle']}`; single-view studies (RG1_UNCR.dcm at full size, new UIDs "
             f"each), jobs of {n1} and {n2}; {res['tokens']} greedy tokens per report; {res['repeats']} alternating "
             f"rounds, medians; load average {res['load_before']} before, {res['load_after']} after (a shared machine: "
             "compare within this run).", "",
             f"| config | job s, {n1} studies | job s, {n2} studies | **marginal s/study** | **studies/h (steady)** | "
             f"fixed s (start-up) | studies/h, {n2}-study job | time per study vs (a) | CPU s/study | CPU per study vs (a) "
             "| fixed CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in s.items():
        ov = (f"{100 * c['overhead_vs_a']:+.1f}%", f"{100 * c['cpu_overhead_vs_a']:+.1f}%") if "overhead_vs_a" in c \
            else ("–", "–")
        lines.append(f"| {name} | {c[f'job_s_{n1}']:.1f} | {c[f'job_s_{n2}']:.1f} | **{c['marginal_s_per_study']:.2f}** | "
                     f"**{c['studies_per_hour_steady']:.0f}** | {c['fixed_s']:.1f} | {c[f'studies_per_hour_job_{n2}']:.0f} "
                     f"| {ov[0]} | {c['marginal_cpu_s_per_study']:.2f} | {ov[1]} | {c['fixed_cpu_s']:.1f} |")
    rate = s[best]["studies_per_hour_steady"]
    lines += ["", "Wall-clock rates depend on the share of the cores each job got on this shared machine; CPU seconds "
              "(every process of the job, Ray's own included, sampled every "
              f"{SAMPLE_S} s) are the cost. Marginal = the {n2 - n1} studies between the two job sizes; fixed = the "
              "rest (Python and Ray start-up, loading and verifying the bundle, the header scan).", "",
              f"Better split of {CORES} cores: **{best}** ({s[best]['marginal_s_per_study']:.2f} s/study).", "",
              f"On paper, {PAPER_STUDIES:,} studies at that rate on N machines like this one (every study is "
              "independent, so the model stage scales linearly; the fixed start-up is paid once):", "",
              "| machines | hours |", "|---:|---:|"]
    lines += [f"| {n} | {(PAPER_STUDIES / (rate * n)) + s[best]['fixed_s'] / 3600:.1f} |" for n in PAPER_MACHINES]
    (RESULTS / "batch.md").write_text("\n".join(lines) + "\n")


def _sizes(text: str) -> tuple[int, int]:
    n1, n2 = (int(x) for x in text.split(","))
    if not 2 <= n1 < n2:
        raise argparse.ArgumentTypeError("--studies N1,N2 with 2 <= N1 < N2")
    return n1, n2


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--build", action="store_true", help="build the default bundle when it is missing")
    p.add_argument("--studies", type=_sizes, default=(8, 32), help="the two job sizes N1,N2")
    p.add_argument("--tokens", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    if not (a.bundle / "manifest.json").is_file():
        if a.build and a.bundle == DEFAULT_BUNDLE:
            build_bundle(a.bundle)
        else:
            raise SystemExit(f"{a.bundle}: no bundle; pass --build to build the base + SmolLM2 INT8 + 4-bit bundle, "
                             "or --bundle PATH")
    rounds: dict[str, list[dict]] = {k: [] for k in CONFIGS}
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="emrrg-batch-bench-") as tmp:
        files = {}
        for n in a.studies:
            (Path(tmp) / f"studies-{n}").mkdir()
            files[n] = make_studies(Path(tmp) / f"studies-{n}", n)
        for i in range(a.repeats):
            for name, split in CONFIGS.items():
                jobs = {}
                for n in a.studies:
                    if split is None:
                        jobs[n] = run_serial(a.bundle, files[n], a.tokens)
                    else:
                        jobs[n] = run_ray(a.bundle, Path(tmp) / f"studies-{n}", Path(tmp) / f"out-{name}-{n}-{i}",
                                          a.tokens, n, *split)
                rounds[name].append(jobs)
                f = figures(jobs)
                print(f"[batch] round {i + 1}/{a.repeats} {name}: jobs {', '.join(f'{w:.1f}' for w, _ in jobs.values())} s, "
                      f"marginal {f['marginal_s_per_study']:.2f} s/study ({f['marginal_cpu_s_per_study']:.2f} CPU s), "
                      f"fixed {f['fixed_s']:.1f} s", flush=True)
    bundle = a.bundle.resolve()
    res = {"machine": f"{cpu_name()} ({os.cpu_count()} cores)",
           "bundle": str(bundle.relative_to(ROOT)) if bundle.is_relative_to(ROOT) else str(bundle),
           "studies": list(a.studies), "tokens": a.tokens, "repeats": a.repeats, "load_before": load_before,
           "load_after": round(os.getloadavg()[0], 2), "summary": summarize(rounds)}
    write_results(res)
    print((RESULTS / "batch.md").read_text())


if __name__ == "__main__":
    main()
