"""Base encoder + projector: INT8 Q/DQ vs f32 accuracy on the real X-rays, and ORT CPU latency.

What runs (all in one process, on the same preprocessed images):

  1. the `base` MambaXray-VL encoder (84M parameters, torch.manual_seed(0)) + a projector into 576
     (SmolLM2-135M's hidden size), as EMRRG.encode_images: views averaged, Linear, LayerNorm;
  2. export_encoder -> f32 custom_op and f32 pure_onnx graphs; quantize_int8 -> INT8 custom_op and its
     pure_onnx twin, calibrated on the 18 real X-rays that ship offline (emrrg.assets.real_xrays);
  3. accuracy of every graph against the PyTorch f32 reference on those 18 images (mean token cosine,
     NMSE, max |Δ|), plus a held-out check: INT8 calibrated on the 16 pediatric JPEGs only, scored on the
     2 adult DICOM chest films it never saw;
  4. latency of one study (B=1, V=1): PyTorch eager f32 (the reference, selective_scan_ref's loop), and ORT
     CPU f32 / INT8 x custom_op / pure_onnx. Warm-up, then `--repeats` rounds that time every backend once
     each in turn (so background load hits all alike); medians, and each backend's speed-up over PyTorch.

Weights: `random` is the repository's init (std 0.02 linears: each block barely moves the residual stream,
so activations are nearly Gaussian and quantize easily: optimistic). `trained_like` rescales the linears to
1/sqrt(fan_in), perturbs the LayerNorm affines and gives a few channels 8-20x gains, the activation
outliers of trained networks that make per-tensor INT8 activations hard (pessimistic-ish). Neither is the
real checkpoint, which is not available offline; both are reported.

    .venv/bin/python benchmarks/encoder_int8.py                    # both inits, ~10 min on 2 cores
    .venv/bin/python benchmarks/encoder_int8.py --init random --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_COSINE = 0.995      # the issue: INT8 mean token cosine vs f32
TARGET_SPEEDUP = 6.0       # the issue: runtime encoder >= 6x faster than PyTorch f32 eager
ISSUE_BASELINE_MS = 1264.0  # the issue's PyTorch f32 eager encoder time on this CPU (quiet machine)
HIDDEN_SMOLLM2 = 576


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="base")
    p.add_argument("--hidden", type=int, default=HIDDEN_SMOLLM2, help="projector width (the LLM's hidden size)")
    p.add_argument("--init", choices=("random", "trained_like", "both"), default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="minmax", choices=("minmax", "percentile", "entropy"))
    p.add_argument("--calib", type=Path, default=None, help="calibration folder (default: the 18 offline X-rays)")
    p.add_argument("--no-holdout", action="store_true", help="skip the held-out calibration check")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op and torch threads; 0 = every core")
    p.add_argument("--workdir", type=Path, default=None, help="where the ONNX files go (default: a temp dir)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the ONNX files and reference tokens a previous run left in --workdir")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args()


# ------------------------------------------------------------------------------------------ models

def build(preset: str, hidden: int, seed: int, init: str):
    import torch
    import torch.nn as nn

    from emrrg.config import encoder_config
    from emrrg.encoder import MambaXrayEncoder
    from emrrg.export.encoder_onnx import VisualTokens

    torch.manual_seed(seed)
    enc = MambaXrayEncoder(encoder_config(preset)).eval()
    module = VisualTokens(enc, nn.Sequential(nn.Linear(enc.cfg.d_model, hidden), nn.LayerNorm(hidden))).eval()
    if init == "trained_like":
        trained_like_(module, seed)
    return module


def trained_like_(module, seed: int) -> None:
    """Perturb a random init toward what trained networks look like (see the module docstring)."""
    import torch
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, m in module.named_modules():
            if isinstance(m, nn.Linear) and ".dt_proj" not in name:
                m.weight.normal_(0.0, 1.0, generator=g).mul_(m.in_features ** -0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.02, generator=g)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
                hot = torch.randperm(m.weight.numel(), generator=g)[:4]       # outlier channels
                m.weight[hot] *= torch.empty(4).uniform_(8, 20, generator=g)
        module.encoder.pos_embed.normal_(0.0, 0.5, generator=g)


# ------------------------------------------------------------------------------------------ timing

def median_ms(xs):
    return round(statistics.median(xs) * 1e3, 2)


def time_round_robin(fns: dict, warmup: int, repeats: int) -> dict:
    """Each fn once per round, in turn; wall and process-CPU time per call (medians, min, max)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            c, t = time.process_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: {"median_ms": median_ms(wall[k]), "min_ms": round(min(wall[k]) * 1e3, 2),
                "max_ms": round(max(wall[k]) * 1e3, 2), "cpu_median_ms": median_ms(cpu[k]), "repeats": repeats}
            for k in fns}


# ------------------------------------------------------------------------------------------ one init

def run_one(args, init: str, workdir: Path) -> dict:
    import onnxruntime as ort
    import torch

    from emrrg.assets import real_xrays
    from emrrg.export.encoder_onnx import (as_pixel_values, compare, export_encoder, make_session, pure_onnx_twin,
                                           run_onnx, run_reference)
    from emrrg.export.quantize_encoder import quantize_int8

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    module = build(args.preset, args.hidden, args.seed, init)
    cfg = module.encoder.cfg
    d = workdir / init
    d.mkdir(parents=True, exist_ok=True)
    res = {"init": init, "load_average_before": round(os.getloadavg()[0], 2)}

    cached = d / "artifacts.json"
    if args.reuse and cached.is_file():
        print(f"[{init}] reusing the ONNX files in {d}", flush=True)
        res.update(json.loads(cached.read_text()))
    else:
        print(f"[{init}] export f32 custom_op / pure_onnx ...", flush=True)
        info_c = export_encoder(module, d / "encoder.onnx", "custom_op")
        info_p = pure_onnx_twin(d / "encoder.onnx", d / "encoder.pure.onnx")  # = export_encoder(..., "pure_onnx")
        info_p["export_s"] = None
        res["export"] = {k: {kk: v[kk] for kk in ("bytes", "nodes", "scan_nodes", "export_s")}
                         for k, v in (("custom_op", info_c), ("pure_onnx", info_p))}
        print(f"[{init}] quantize INT8 ({args.method}) ...", flush=True)
        q = quantize_int8(d / "encoder.onnx", d / "encoder.pure.onnx", args.calib, d / "encoder.int8.onnx",
                          pure_out_path=d / "encoder.int8.pure.onnx", method=args.method)
        res["quantize"] = {"quantize_s": q["quantize_s"], "bytes": q["bytes"], "checks": q["checks"],
                           "float_nodes": len(q["excluded_nodes"]), "calibration": q["calibration"]}
        cached.write_text(json.dumps({k: res[k] for k in ("export", "quantize")}))

    paths = real_xrays()
    px = as_pixel_values(paths, cfg.img_size)                                # (18, 1, 3, 224, 224)
    ref_file = d / "reference_tokens.npy"
    if args.reuse and ref_file.is_file():
        ref = np.load(ref_file)
    else:
        print(f"[{init}] PyTorch f32 reference on {len(px)} X-rays ...", flush=True)
        ref = run_reference(module, px, batch_size=2)                        # (18, L, H)
        np.save(ref_file, ref)
    so_threads = threads
    sessions = {
        "f32_custom_op": make_session(d / "encoder.onnx", threads=so_threads),
        "f32_pure_onnx": make_session(d / "encoder.pure.onnx", oplib=None, threads=so_threads),
        "int8_custom_op": make_session(d / "encoder.int8.onnx", threads=so_threads),
        "int8_pure_onnx": make_session(d / "encoder.int8.pure.onnx", oplib=None, threads=so_threads),
    }
    acc = {}
    for name, s in sessions.items():
        m = compare(run_onnx(s, px, batch_size=2), ref)
        m.pop("per_study_cosine")
        acc[name] = m
        print(f"  {name:15s} mean cos {m['mean_cosine']:.6f} (min {m['min_cosine']:.6f})  NMSE {m['nmse']:.3e}  "
              f"max|Δ| {m['max_abs']:.3e}", flush=True)
    res["accuracy_vs_torch_f32"] = acc
    res["images"] = [p.name for p in paths]

    if not args.no_holdout and args.calib is None:
        ped = [p for p in paths if p.suffix.lower() == ".jpeg"]
        adult = [p for p in paths if p.suffix.lower() == ".dcm"]
        print(f"[{init}] held-out: calibrate on {len(ped)} pediatric JPEGs, score on {len(adult)} adult DICOMs ...",
              flush=True)
        qh = quantize_int8(d / "encoder.onnx", d / "encoder.pure.onnx", ped, d / "encoder.int8.holdout.onnx",
                           method=args.method)
        idx = [paths.index(p) for p in adult]
        m = compare(run_onnx(make_session(qh["path"], threads=so_threads), px[idx]), ref[idx])
        m.pop("per_study_cosine")
        res["holdout"] = {"calibrated_on": [p.name for p in ped], "scored_on": [p.name for p in adult], **m}
        print(f"  held-out int8   mean cos {m['mean_cosine']:.6f}  NMSE {m['nmse']:.3e}", flush=True)

    print(f"[{init}] latency, B=1 V=1, {args.repeats} rounds ...", flush=True)
    x = px[:1]
    xt = torch.from_numpy(x)

    def torch_eager():
        with torch.no_grad():
            module(xt)

    def ort_run(s):
        return lambda: s.run(["visual_tokens"], {"pixel_values": x})

    # (a) every core: wall clock, what a user waits for
    fns = {"torch_eager_f32": torch_eager, **{f"ort_{k}": ort_run(s) for k, s in sessions.items()}}
    lat = {f"{threads}t": time_round_robin(fns, args.warmup, args.repeats)}
    # (b) one thread: CPU time per call is what the work costs, nearly blind to other processes' load
    torch.set_num_threads(1)
    single = {k: make_session(d / f, oplib=None if "pure" in f else "auto", threads=1) for k, f in (
        ("f32_custom_op", "encoder.onnx"), ("int8_custom_op", "encoder.int8.onnx"), ("int8_pure_onnx", "encoder.int8.pure.onnx"))}
    fns1 = {"torch_eager_f32": torch_eager, **{f"ort_{k}": ort_run(s) for k, s in single.items()}}
    lat["1t"] = time_round_robin(fns1, args.warmup, max(3, args.repeats // 2))
    torch.set_num_threads(threads)
    for table in lat.values():
        base, base_cpu = table["torch_eager_f32"]["median_ms"], table["torch_eager_f32"]["cpu_median_ms"]
        for v in table.values():
            v["speedup_vs_torch"] = round(base / v["median_ms"], 2)
            v["cpu_speedup_vs_torch"] = round(base_cpu / max(v["cpu_median_ms"], 1e-3), 2)
            v["speedup_vs_issue_baseline"] = round(ISSUE_BASELINE_MS / v["median_ms"], 2)
    res["latency"] = lat
    res["load_average_after"] = round(os.getloadavg()[0], 2)
    for t, table in lat.items():
        for k, v in table.items():
            print(f"  [{t}] {k:18s} {v['median_ms']:9.1f} ms wall ({v['speedup_vs_torch']:.2f}x)  "
                  f"{v['cpu_median_ms']:9.1f} ms CPU ({v['cpu_speedup_vs_torch']:.2f}x)", flush=True)
    res["onnxruntime_providers"] = sessions["int8_custom_op"].get_providers()
    return res


# ------------------------------------------------------------------------------------------ report

def markdown(out: dict) -> str:
    env = out["environment"]
    lines = [f"# Encoder INT8: accuracy and ORT CPU latency ({out['preset']} + projector to {out['hidden']})", "",
             f"{env['cpu']}, {env['threads']} threads; onnxruntime {env['onnxruntime']}, torch {env['torch']}; "
             f"load average {env['load_before']} before, {env['load_after']} after. "
             f"Calibration: {out['method']}, {out['runs'][0]['quantize']['calibration']['count']} images "
             f"({out['runs'][0]['quantize']['calibration']['source']}); the same 18 images are scored.", ""]
    for r in out["runs"]:
        lines += [f"## init: {r['init']}", "",
                  "| graph | mean token cos | min token cos | NMSE | max abs diff |", "|---|---:|---:|---:|---:|"]
        for k, m in r["accuracy_vs_torch_f32"].items():
            lines.append(f"| {k} | {m['mean_cosine']:.6f} | {m['min_cosine']:.6f} | {m['nmse']:.3e} | {m['max_abs']:.3e} |")
        if "holdout" in r:
            h = r["holdout"]
            lines.append(f"| int8_custom_op, held-out (calibrated on {len(h['calibrated_on'])} pediatric, "
                         f"scored on {len(h['scored_on'])} adult) | {h['mean_cosine']:.6f} | {h['min_cosine']:.6f} | "
                         f"{h['nmse']:.3e} | {h['max_abs']:.3e} |")
        lines += ["", f"Latency, one study (B=1, V=1), round-robin; load average {r['load_average_before']} before, "
                      f"{r['load_average_after']} after this init's runs (a shared 2-core machine: wall times are "
                      "inflated, PyTorch's many small ops most of all; 1-thread CPU time is the load-robust figure).", "",
                  "| threads | backend | wall median ms | min–max ms | CPU median ms | × vs PyTorch (wall) "
                  f"| × vs PyTorch (CPU) | × vs issue baseline {ISSUE_BASELINE_MS:g} ms |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for t, table in r["latency"].items():
            for k, v in table.items():
                lines.append(f"| {t} | {k} | {v['median_ms']:.1f} | {v['min_ms']:.1f}–{v['max_ms']:.1f} | "
                             f"{v['cpu_median_ms']:.1f} | {v['speedup_vs_torch']:.2f} | {v['cpu_speedup_vs_torch']:.2f} | "
                             f"{v['speedup_vs_issue_baseline']:.2f} |")
        int8 = r["accuracy_vs_torch_f32"]["int8_custom_op"]["mean_cosine"]
        all_t = next(iter(r["latency"]))
        sp_issue = r["latency"][all_t]["ort_int8_custom_op"]["speedup_vs_issue_baseline"]
        sp_cpu = r["latency"]["1t"]["ort_int8_custom_op"]["cpu_speedup_vs_torch"]
        lines += ["", f"- INT8 mean token cosine {int8:.5f} (target ≥ {TARGET_COSINE}: "
                      f"{'met' if int8 >= TARGET_COSINE else 'NOT met'})",
                  f"- INT8 custom_op vs PyTorch f32 eager (target ≥ {TARGET_SPEEDUP:g}×): {sp_issue:.2f}× against the "
                  f"issue's {ISSUE_BASELINE_MS:g} ms ({all_t} wall median, under load: "
                  f"{'met' if sp_issue >= TARGET_SPEEDUP else 'NOT met'}); {sp_cpu:.2f}× in 1-thread CPU time "
                  "against PyTorch measured in this run",
                  f"- files: f32 {r['export']['custom_op']['bytes'] / 2**20:.1f} MiB, INT8 "
                  f"{r['quantize']['bytes'] / 2**20:.1f} MiB; {r['quantize']['float_nodes']} MatMul/Conv nodes kept float "
                  "(x_proj, dt_proj, the depthwise conv1d)", ""]
    return "\n".join(lines)


def main():
    args = parse_args()
    import onnxruntime as ort
    import torch

    inits = ("random", "trained_like") if args.init == "both" else (args.init,)
    load_before = os.getloadavg()[0]
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="emrrg-encoder-int8-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
    runs = [run_one(args, init, workdir) for init in inits]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    out = {"preset": args.preset, "hidden": args.hidden, "seed": args.seed, "method": args.method,
           "targets": {"int8_mean_cosine": TARGET_COSINE, "speedup_vs_torch_f32": TARGET_SPEEDUP},
           "environment": {"cpu": f"{cpu} ({os.cpu_count()} cores)", "threads": args.threads or os.cpu_count(),
                           "avx512_vnni": "avx512_vnni" in flags, "amx": "amx_tile" in flags,
                           "onnxruntime": ort.__version__, "torch": torch.__version__,
                           "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)},
           "runs": runs}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "encoder_int8.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out_dir / "encoder_int8.md").write_text(markdown(out) + "\n")
    print(markdown(out))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
