"""SelectiveScan on one base encoder layer: torch reference vs the ORT CPU op vs a plain-C lower bound.

Shape (defaults): batch 1, D = 3072 channels (4 directions x 768, stacked as G = 4 groups), N 16, L 197:
what one ARM/MambaXray-VL base layer hands the op in one call (the contract in emrrg/ops/scan_contract.py).

  (a) ref    emrrg.ops.selective_scan.selective_scan_ref (torch f32 loop over L, torch's own threads)
  (b) op     com.emrrg::SelectiveScan in an onnxruntime InferenceSession of a single node (libemrrg_ops.so)
  (c) bound  benchmarks/scan_lower_bound.c: the recurrence alone, vectorized across channels, time-major
             inputs, dt precomputed, no gate/skip — built here with gcc and the op's flags, called via ctypes

All three run in the same process on the same inputs, once with every core and once single-threaded
(`--threads`); each is warmed up, then timed `--repeats` times
(the reference, at seconds per call, `--ref-repeats` times). Writes benchmarks/results/scan_op.json and
scan_op.md with medians, min-max and the ratios ref/op (speedup) and op/bound (overhead over the floor).

    .venv/bin/python benchmarks/scan_op.py                # after: bash scripts/build_plugins.sh
    .venv/bin/python benchmarks/scan_op.py --threads 2    # only one thread setting
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from machine import cpu_flags, cpu_name  # noqa: E402  (benchmarks/machine.py)

TARGET_SPEEDUP_VS_REF = 30.0  # the op must be at least this much faster than the torch reference


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=3072, help="channels D (all groups together)")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--dstate", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=197)
    p.add_argument("--threads", type=int, nargs="+", default=[0, 1],
                   help="thread settings to run, each for all three (ORT intra-op, torch, OpenMP); 0 = every core")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--ref-repeats", type=int, default=3, help="repeats for the (slow) torch reference")
    p.add_argument("--lib", type=Path, default=None, help="libemrrg_ops.so (default: emrrg.runtime.oplib search)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# ---- the op's compiler flags (plugins/CMakeLists.txt) ----

def op_cflags() -> list[str]:
    flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    if os.environ.get("EMRRG_NATIVE", "0").lower() in ("1", "on", "true", "yes"):
        return flags + ["-march=native"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= cpu_flags():
        return flags + ["-march=x86-64-v3"]
    return flags


def build_lower_bound(workdir: Path, cflags: list[str]):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("no C compiler (gcc) found for the lower bound")
    so = workdir / "libscan_lower_bound.so"
    src = ROOT / "benchmarks" / "scan_lower_bound.c"
    cmd = [cc, *cflags, "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(so)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:  # no OpenMP runtime: build single-threaded
        cmd = [c for c in cmd if c != "-fopenmp"]
        subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(so))
    f = lib.lower_bound_scan
    fp = ctypes.POINTER(ctypes.c_float)
    f.argtypes = [ctypes.c_int] * 4 + [fp] * 7 + [ctypes.c_int]
    f.restype = None
    return f, " ".join(cmd)


def make_inputs(seed, batch, dim, groups, dstate, seqlen):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return {
        "u": rng.standard_normal((batch, dim, seqlen)).astype(f32),
        "delta": (rng.standard_normal((batch, dim, seqlen)) * 0.5 - 1.0).astype(f32),
        "A": (-np.exp(rng.uniform(np.log(0.5), np.log(16.0), (dim, dstate)))).astype(f32),
        "B": rng.standard_normal((batch, groups, dstate, seqlen)).astype(f32),
        "C": rng.standard_normal((batch, groups, dstate, seqlen)).astype(f32),
        "D": rng.standard_normal(dim).astype(f32),
        "z": rng.standard_normal((batch, dim, seqlen)).astype(f32),
        "delta_bias": (rng.standard_normal(dim) * 0.5).astype(f32),
    }


def single_node_session(lib: Path, threads: int, with_optional: bool, softplus: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from emrrg.runtime import oplib

    names = ["u", "delta", "A", "B", "C"] + (["D", "z", "delta_bias"] if with_optional else [])
    node = helper.make_node("SelectiveScan", names, ["y"], domain=oplib.OP_DOMAIN, delta_softplus=softplus,
                            plugin_version="1", plugin_namespace="emrrg")
    dims = {"u": ["b", "d", "l"], "delta": ["b", "d", "l"], "A": ["d", "n"], "B": ["b", "g", "n", "l"],
            "C": ["b", "g", "n", "l"], "D": ["d"], "z": ["b", "d", "l"], "delta_bias": ["d"]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims[n]) for n in names]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "d", "l"])
    model = helper.make_model(helper.make_graph([node], "scan", inputs, [out]), ir_version=8,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(oplib.OP_DOMAIN, 1)])
    so = ort.SessionOptions()
    oplib.register(so, lib)
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def timeit(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    # cpu_ms: CPU time of the whole process (all threads) per call — robust when other jobs share the cores
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "cpu_median_ms": statistics.median(cpu), "repeats": repeats, "warmup": warmup}


def run_one(args, lib: Path, threads_arg: int, feeds: dict, lb_fn) -> dict:
    """Time ref, op and bound with one thread setting (0 = every core)."""
    import torch

    from emrrg.ops.selective_scan import selective_scan_ref

    threads = threads_arg or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    load_before = os.getloadavg()

    # (b) the op
    sess = single_node_session(lib, threads_arg, with_optional=True, softplus=1)
    y_op = sess.run(None, feeds)[0]
    t_op = timeit(lambda: sess.run(None, feeds), args.warmup, args.repeats)

    # (c) the lower bound: same recurrence on time-major inputs with dt precomputed (not timed)
    b, d, L, n, g = args.batch, args.dim, args.seqlen, args.dstate, args.groups
    dt64 = feeds["delta"].astype(np.float64) + feeds["delta_bias"].astype(np.float64)[None, :, None]
    dt = np.where(dt64 > 20, dt64, np.log1p(np.exp(np.minimum(dt64, 20)))).astype(np.float32)
    # The bound handles one batch element per call; time batch element 0 and multiply by batch.
    dt_t = np.ascontiguousarray(dt[0].T)                          # (L, D)
    u_t = np.ascontiguousarray(feeds["u"][0].T)                   # (L, D)
    a_t = np.ascontiguousarray(feeds["A"].T)                      # (N, D)
    b_t = np.ascontiguousarray(feeds["B"][0].transpose(2, 0, 1))  # (L, G, N)
    c_t = np.ascontiguousarray(feeds["C"][0].transpose(2, 0, 1))
    h = np.zeros((n, d), np.float32)
    y_lb = np.zeros((L, d), np.float32)
    ptr = lambda a: a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))  # noqa: E731
    call = lambda: lb_fn(L, d, n, g, ptr(dt_t), ptr(u_t), ptr(a_t), ptr(b_t), ptr(c_t), ptr(h), ptr(y_lb), threads)  # noqa: E731
    call()
    # Check the bound computes the same recurrence: the op with dt given directly and no D/z/bias.
    sess_plain = single_node_session(lib, threads_arg, with_optional=False, softplus=0)
    y_plain = sess_plain.run(None, {"u": feeds["u"][:1], "delta": np.ascontiguousarray(dt[:1]), "A": feeds["A"],
                                    "B": feeds["B"][:1], "C": feeds["C"][:1]})[0][0]
    lb_vs_op = float(np.abs(y_lb.T - y_plain).max())
    t_lb = timeit(call, args.warmup, args.repeats)
    if b > 1:
        t_lb = {k: (v * b if k.endswith("_ms") else v) for k, v in t_lb.items()}

    # (a) the torch reference
    tt = {k: torch.from_numpy(v) for k, v in feeds.items()}
    ref_call = lambda: selective_scan_ref(tt["u"], tt["delta"], tt["A"], tt["B"], tt["C"], tt["D"], tt["z"],  # noqa: E731
                                          tt["delta_bias"], True)
    y_ref = ref_call().numpy()
    t_ref = timeit(ref_call, 1, args.ref_repeats)

    speedup = t_ref["median_ms"] / t_op["median_ms"]
    return {
        "threads": threads,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "ref": t_ref, "op": t_op, "lower_bound": t_lb,
        "speedup_ref_over_op": speedup,
        "speedup_ref_over_op_cpu_time": t_ref["cpu_median_ms"] / t_op["cpu_median_ms"],
        "op_over_lower_bound": t_op["median_ms"] / t_lb["median_ms"],
        "op_over_lower_bound_cpu_time": t_op["cpu_median_ms"] / t_lb["cpu_median_ms"],
        "meets_target": speedup >= TARGET_SPEEDUP_VS_REF,
        "max_abs_diff": {"op_vs_ref": float(np.abs(y_op - y_ref).max()), "lower_bound_vs_op_plain": lb_vs_op},
    }


def main():
    args = parse_args()
    import onnxruntime as ort
    import torch

    from emrrg.runtime import oplib

    lib = args.lib or oplib.find_op_library()
    if lib is None:
        raise SystemExit(f"{oplib.LIBRARY_NAME} not found: run {oplib.BUILD_COMMAND}")
    shape = dict(batch=args.batch, dim=args.dim, groups=args.groups, dstate=args.dstate, seqlen=args.seqlen)
    feeds = make_inputs(args.seed, **shape)
    with tempfile.TemporaryDirectory() as tmp:
        lb_fn, lb_cmd = build_lower_bound(Path(tmp), op_cflags())
        runs = [run_one(args, lib, t, feeds, lb_fn) for t in args.threads]
    result = {
        "benchmark": "selective_scan base layer",
        "shape": shape,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "op_library": str(lib),
        "lower_bound_build": lb_cmd,
        "target_speedup_ref_over_op": TARGET_SPEEDUP_VS_REF,
        "runs": runs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scan_op.json").write_text(json.dumps(result, indent=2) + "\n")
    md = _markdown(result)
    (args.out_dir / "scan_op.md").write_text(md)
    print(md)
    for r in runs:
        if not r["meets_target"]:
            print(f"WARNING ({r['threads']} threads): op is only {r['speedup_ref_over_op']:.1f}x faster than the "
                  f"reference (target {TARGET_SPEEDUP_VS_REF:.0f}x)")


def _markdown(r) -> str:
    s = r["shape"]
    lines = [
        "# SelectiveScan, one base encoder layer",
        "",
        f"batch {s['batch']}, D {s['dim']} (G {s['groups']} groups), N {s['dstate']}, L {s['seqlen']}, f32; "
        f"{r['machine']['cpu']} ({r['machine']['cores']} cores); onnxruntime {r['versions']['onnxruntime']}, "
        f"torch {r['versions']['torch']}. Lower bound: `{r['lower_bound_build'].split(' -shared')[0]}`.",
        "",
        "Wall-clock medians depend on what else runs on the machine (load average below); the CPU time per",
        "call (all threads of the process) is the steadier figure when the cores are shared.",
    ]
    names = [("torch reference `selective_scan_ref`", "ref"), ("ORT CPU op `com.emrrg::SelectiveScan`", "op"),
             ("plain-C lower bound (recurrence only)", "lower_bound")]
    for run in r["runs"]:
        lines += [
            "",
            f"## {run['threads']} thread{'s' if run['threads'] != 1 else ''} "
            f"(load average {run['loadavg_before'][0]:.2f} before, {run['loadavg_after'][0]:.2f} after)",
            "",
            "| implementation | median ms | min–max ms | CPU ms / call | repeats |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, key in names:
            t = run[key]
            lines.append(f"| {name} | {t['median_ms']:.3f} | {t['min_ms']:.3f}–{t['max_ms']:.3f} | "
                         f"{t['cpu_median_ms']:.3f} | {t['repeats']} |")
        lines += [
            "",
            f"- ref / op: **{run['speedup_ref_over_op']:.0f}×** wall, {run['speedup_ref_over_op_cpu_time']:.0f}× CPU time "
            f"(target ≥ {r['target_speedup_ref_over_op']:.0f}×: {'met' if run['meets_target'] else 'NOT met'})",
            f"- op / lower bound: **{run['op_over_lower_bound']:.2f}×** wall, {run['op_over_lower_bound_cpu_time']:.2f}× "
            "CPU time (the bound skips softplus, the D skip, the silu gate, the layout changes and the ORT call)",
            f"- max |op − ref| = {run['max_abs_diff']['op_vs_ref']:.3g}; max |bound − op (plain recurrence)| = "
            f"{run['max_abs_diff']['lower_bound_vs_op_plain']:.3g}",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
