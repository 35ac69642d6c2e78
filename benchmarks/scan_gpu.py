"""SelectiveScan on a GPU: our CUDA kernel vs the PyTorch reference on the GPU vs mamba-ssm's selective_scan_fn.

Shapes (one call per encoder layer, four directions stacked as G = 4 groups, N 16, L 197):
  base-b1   batch 1, D = 4 x 768   (one view of the base encoder)
  base-b2   batch 2, D = 4 x 768   (a two-view IU X-Ray study)
  large-b8  batch 8, D = 4 x 1024  (the large encoder, eight views)
each in f32, f16 and bf16 activations (A, D, delta_bias f32; accumulation f32 everywhere).

  kernel  libemrrg_scan_shim.so -> emrrg::scan::launchSelectiveScan (plugins/selective_scan), via ctypes
  torch   emrrg.ops.selective_scan.selective_scan_ref on CUDA tensors (a Python loop over L)
  mamba   mamba_ssm.ops.selective_scan_interface.selective_scan_fn, when importable (else "n/a")

Timing: CUDA events around each call after --warmup calls, median of --repeats (torch: --ref-repeats).
Also printed: max |kernel - torch| (scaled by max|y|) and the effective bandwidth of the kernel (bytes of
u, delta, z, B, C read and y written, over its time). Writes JSON + Markdown to --out-dir.

    python benchmarks/scan_gpu.py                     # after scripts/gpu-check.sh built the shim
    python benchmarks/scan_gpu.py --quick             # fewer repeats (the gpu-check default)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from tests import scan_reference as ref  # noqa: E402
from tests.gpu import scan_cases as sc  # noqa: E402

SHAPES = {"base-b1": (1, 4 * 768), "base-b2": (2, 4 * 768), "large-b8": (8, 4 * 1024)}
ESIZE = {"f32": 4, "f16": 2, "bf16": 2}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["f32", "f16", "bf16"], choices=["f32", "f16", "bf16"])
    p.add_argument("--seqlen", type=int, default=197)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--ref-repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="warmup 2, repeats 20, ref-repeats 2")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args()


def timed(fn, warmup: int, repeats: int) -> list[float]:
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def main() -> int:
    args = parse_args()
    if args.quick:
        args.warmup, args.repeats, args.ref_repeats = 2, 20, 2
    import torch
    if not torch.cuda.is_available():
        print("scan_gpu: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    shim = sc.load_shim()
    if shim is None:
        print(f"scan_gpu: {sc.SHIM_NAME} not built; run scripts/gpu-check.sh first", file=sys.stderr)
        return 2
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_fn
        mamba_note = "mamba-ssm selective_scan_fn"
    except Exception as e:  # noqa: BLE001 - optional (ImportError, or its CUDA extension failing)
        mamba_fn, mamba_note = None, f"mamba-ssm not available ({type(e).__name__})"
    rows = []
    for shape in args.shapes:
        batch, dim = SHAPES[shape]
        case = ref.Case(shape, batch, dim, 4, 16, args.seqlen, seed=1)
        host = ref.make_inputs(case)
        for dtype in args.dtypes:
            t = sc.to_device(host, dtype)
            y = torch.empty_like(t["u"])
            k_ms = timed(lambda: shim.launch(t, True, y, dtype), args.warmup, args.repeats)
            code = shim.launch(t, True, y, dtype)
            torch.cuda.synchronize()
            if code != 0:
                raise RuntimeError(f"kernel launch failed: {shim.error(code)}")
            ref = sc.scan_ref(t, True)
            r_ms = timed(lambda: sc.scan_ref(t, True), 1, args.ref_repeats)
            scale = max(1.0, float(ref.float().abs().max()))
            diff = float((y.float() - ref.float()).abs().max()) / scale
            m_ms, m_diff = None, None
            if mamba_fn is not None:
                def call_mamba():
                    return mamba_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
                                    delta_softplus=True)
                try:
                    m_ms = statistics.median(timed(call_mamba, args.warmup, args.repeats))
                    m_diff = float((call_mamba().float() - ref.float()).abs().max()) / scale
                except Exception as e:  # noqa: BLE001 - e.g. a dtype its build lacks
                    print(f"  mamba-ssm failed on {shape} {dtype}: {type(e).__name__}: {e}", file=sys.stderr)
            b, d, L, n, g = batch, dim, args.seqlen, 16, 4
            nbytes = ESIZE[dtype] * (4 * b * d * L + 2 * b * g * n * L) + 4 * (d * n + 2 * d)
            k_med = statistics.median(k_ms)
            rows.append({"shape": shape, "dtype": dtype, "batch": b, "D": d, "L": L, "N": n, "G": g,
                         "kernel_ms": k_med, "kernel_ms_min": min(k_ms), "torch_ms": statistics.median(r_ms),
                         "mamba_ms": m_ms, "speedup_vs_torch": statistics.median(r_ms) / k_med,
                         "speedup_vs_mamba": (m_ms / k_med) if m_ms else None,
                         "kernel_GBps": nbytes / (k_med * 1e-3) / 1e9, "max_rel_diff_vs_torch": diff,
                         "mamba_max_rel_diff_vs_torch": m_diff})
    dev = torch.cuda.get_device_name()
    header = (f"| shape | dtype | kernel ms | torch ms | mamba ms | x torch | x mamba | kernel GB/s | max|Δ|/max|y| |\n"
              f"|---|---|---:|---:|---:|---:|---:|---:|---:|")
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [header] + [
        f"| {r['shape']} | {r['dtype']} | {r['kernel_ms']:.4f} | {r['torch_ms']:.2f} | {fmt(r['mamba_ms'], '.4f')} | "
        f"{r['speedup_vs_torch']:.0f} | {fmt(r['speedup_vs_mamba'], '.2f')} | {r['kernel_GBps']:.0f} | "
        f"{r['max_rel_diff_vs_torch']:.2g} |" for r in rows]
    table = "\n".join(lines)
    meta = {"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda, "mamba": mamba_note,
            "python": platform.python_version(), "shim": str(shim.path), "seqlen": args.seqlen,
            "warmup": args.warmup, "repeats": args.repeats, "ref_repeats": args.ref_repeats,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"SelectiveScan on {dev} (torch {torch.__version__}, {mamba_note})\n{table}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scan_gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out_dir / "scan_gpu.md").write_text(f"# SelectiveScan on {dev}\n\n{json.dumps(meta)}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
