"""End-to-end benchmark: PyTorch f32 eager vs the runtime's f32 bundle vs its INT8 + 4-bit bundles.

Same checkpoint (base encoder + the real SmolLM2-135M), same real X-rays, 60 new tokens greedy, in one
process and alternating (a, b, c, d, a, b, c, d, ...) so that load on this shared machine hits all alike.
(c) is the export's default 4-bit decoder (MatMulNBits accuracy_level 4: int8 activations, llama.cpp's Q4 x Q8
regime); (d) the same export with `--extra-options accuracy_level=0` (f32 activations). (d) separates what the
weight encoding and the runtime do from what int8 activations do: SmolLM2's weights re-encode exactly, so (d)
follows the PyTorch reference token for token, while (c)'s small logit differences flip near-ties of this
checkpoint's untrained-encoder continuation (its agreement is a property of int8 activations, not a bug).
Peak RSS is measured per configuration in a fresh subprocess (ru_maxrss is per process).

    python benchmarks/e2e.py [--repeats 5] [--tokens 60] [--threads 2] [--work-dir .cache/bench]

The bundles are exported once into --work-dir and reused: export into an empty one to measure new export code.

Writes benchmarks/results/e2e.{json,md} and e2e.png (stage breakdown).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import code_version  # noqa: E402  (benchmarks/machine.py)

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / ".cache" / "bench"
STAGES = ("preprocess", "encoder", "prefill", "decode", "total")
# The configurations, in the order they alternate: name -> the bundle it runs ("ckpt": PyTorch on the checkpoint).
CONFIGS = {"a_pytorch_f32": "ckpt", "b_runtime_f32": "bundle-f32", "c_runtime_int8_4bit": "bundle-int8-4bit",
           "d_runtime_int8_4bit_al0": "bundle-int8-4bit-al0"}
# How each bundle is exported (emrrg.export.pipeline.ExportOptions keyword arguments).
BUNDLES = {"bundle-f32": dict(llm_bits=32), "bundle-int8-4bit": dict(int8=True, llm_bits=4),
           "bundle-int8-4bit-al0": dict(int8=True, llm_bits=4, extra={"accuracy_level": "0"})}


def prepare(threads: int, work: Path = WORK) -> dict[str, Path]:
    """Checkpoint + the three bundles, built once and cached in `work` (.cache/bench unless --work-dir says)."""
    from emrrg.export.pipeline import ExportOptions, export_bundle

    ckpt = work / "ckpt-base-smollm2"
    if not (ckpt / "config.json").is_file():
        from emrrg.cli import init_main
        init_main(["--encoder", "base", "--decoder", "smollm2-135m", "-o", str(ckpt)])
    out = {"ckpt": ckpt}
    for name, kw in BUNDLES.items():
        b = work / name
        if not (b / "manifest.json").is_file():
            print(f"[e2e] exporting {name} ...", flush=True)
            export_bundle(ckpt, b, ExportOptions(**kw), progress=True)
        out[name] = b
    return out


class TorchRef:
    """(a) the PyTorch f32 eager reference: same preprocessing, greedy with a DynamicCache."""

    def __init__(self, ckpt: Path):
        import torch

        from emrrg.checkpoint import load_checkpoint
        self.torch = torch
        self.model = load_checkpoint(ckpt)
        self.model.merge_adapters()

    def run(self, images, tokens: int) -> dict:
        torch = self.torch
        from transformers import DynamicCache

        from emrrg.runtime.preprocess import preprocess_study
        m = self.model
        with torch.no_grad():
            t0 = time.perf_counter()
            px = torch.from_numpy(preprocess_study(images, size=m.cfg.encoder.img_size))[None]
            t1 = time.perf_counter()
            visual = m.encode_images(px)
            t2 = time.perf_counter()
            emb = m.prompt_embeds(visual)
            cache = DynamicCache()
            out = m.llama_model(inputs_embeds=emb, past_key_values=cache, use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            t3 = time.perf_counter()
            n = emb.shape[1]
            ids = [tok]
            table = m.llama_model.get_input_embeddings()
            for _ in range(tokens - 1):
                n += 1
                out = m.llama_model(inputs_embeds=table(torch.tensor([[tok]])), past_key_values=cache, use_cache=True,
                                    attention_mask=torch.ones(1, n, dtype=torch.long))
                tok = int(out.logits[0, -1].argmax())
                ids.append(tok)
            t4 = time.perf_counter()
        return {"ids": ids, "timings_ms": {"preprocess": 1e3 * (t1 - t0), "encoder": 1e3 * (t2 - t1),
                                           "prefill": 1e3 * (t3 - t2), "decode": 1e3 * (t4 - t3),
                                           "total": 1e3 * (t4 - t0)}}


class RuntimeRun:
    def __init__(self, bundle: Path, threads: int):
        from emrrg.runtime.report_runtime import Runtime
        self.rt = Runtime.from_pretrained(bundle, threads=threads)

    def run(self, images, tokens: int) -> dict:
        # Greedy without penalties, exactly `tokens` tokens: what the reference loop above does.
        self.rt.gen.update(repetition_penalty=1.0)
        out = self.rt.generate(images, num_beams=1, min_new_tokens=tokens, max_new_tokens=tokens)
        return {"ids": out["token_ids"], "timings_ms": out["timings_ms"], "backend": out["backend"]}


def profile_runtime(bundle: Path, images, tokens: int, threads: int, top: int = 10) -> dict:
    """Where the runtime's time goes: one report with ONNX Runtime's profiler on the encoder and the
    decoder sessions; kernel time per op type (share of the session's kernel time), and the per-run
    overhead outside kernels (ORT's own bookkeeping between nodes)."""
    import collections

    import onnxruntime as ort

    from emrrg.runtime import contract as C
    from emrrg.runtime.oplib import register, register_if_found

    rt = RuntimeRun(bundle, threads).rt
    out = {}
    with __import__("tempfile").TemporaryDirectory() as tmp:
        sessions = {}
        for name, art, ops in (("encoder", C.ENCODER, True), ("decoder", C.DECODER, False)):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.enable_profiling = True
            so.profile_file_prefix = f"{tmp}/{name}"
            # the encoder needs the op library; the decoder uses it when built (BlockSumMatMulAdd), as the Runtime does
            if ops:
                register(so)
            else:
                register_if_found(so)
            sessions[name] = ort.InferenceSession(str(rt.contract.path(art)), so)
        rt.encoder, rt.decoder.sess = sessions["encoder"], sessions["decoder"]
        rt.gen.update(repetition_penalty=1.0)
        rt.generate(images, num_beams=1, min_new_tokens=tokens, max_new_tokens=tokens)
        for name, sess in sessions.items():
            events = json.loads(Path(sess.end_profiling()).read_text())
            kern, count = collections.Counter(), collections.Counter()
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    kern[e["args"]["op_name"]] += e["dur"]
                    count[e["args"]["op_name"]] += 1
            runs = [e["dur"] for e in events if e.get("name") == "model_run"]
            total = sum(kern.values())
            out[name] = {"runs": len(runs), "run_ms_total": sum(runs) / 1e3, "kernel_ms_total": total / 1e3,
                         "nodes_per_run": round(sum(count.values()) / max(1, len(runs)), 1),
                         "top_ops": [{"op": k, "ms": v / 1e3, "share": v / total, "calls_per_run": count[k] / max(1, len(runs))}
                                     for k, v in kern.most_common(top)]}
    return out


def bundle_bytes(b: Path) -> int:
    return sum(p.stat().st_size for p in b.rglob("*") if p.is_file())


def peak_rss_child(kind: str, path: Path, images: list[str], tokens: int, threads: int) -> float:
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import e2e; "
            f"e2e._child({kind!r}, {str(path)!r}, {images!r}, {tokens}, {threads})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return float(r.stdout.strip().splitlines()[-1])


def _child(kind: str, path: str, images: list[str], tokens: int, threads: int) -> None:
    if kind == "torch":
        import torch
        torch.set_num_threads(threads)
        TorchRef(Path(path)).run(images, tokens)
    else:
        RuntimeRun(Path(path), threads).run(images, tokens)
    from emrrg.runtime.report_runtime import peak_rss_mb

    print(peak_rss_mb())  # VmHWM: ru_maxrss would also count this benchmark process it was forked from


def summarize(runs: list[dict]) -> dict:
    out = {}
    for s in STAGES:
        v = [r["timings_ms"][s] for r in runs]
        out[s] = {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)}
    decode = [r["timings_ms"]["decode"] / max(1, len(r["ids"]) - 1) for r in runs]
    out["decode_tok_s"] = 1e3 / statistics.median(decode)
    return out


def write_results(res: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "e2e.json").write_text(json.dumps(res, indent=2))
    cfgs = res["configs"]
    lines = ["# End to end: PyTorch f32 vs runtime bundles", "",
             f"{res['machine']}; {res['tokens']} new tokens greedy; {res['repeats']} alternating repeats; "
             f"threads {res['threads']}; images: {', '.join(res['images'])}; load average "
             f"{res.get('load_average', {}).get('before')} before, {res.get('load_average', {}).get('after')} after "
             "(a shared machine: the ratios, measured in the same run, are the figures to read)", "",
             f"Bundles exported {', '.join(f'{k} {v}' for k, v in res.get('bundles_created', {}).items())}; 4-bit decoder "
             f"encoding {res.get('decoder_4bit')}; code at {res.get('code', {}).get('head')}, decoder builder / quantizer "
             f"last changed in {res.get('code', {}).get('decoder_code_commit', '').split(' ')[0]}"
             + (" (with local edits)" if res.get("code", {}).get("decoder_code_local_edits") else "") + ".", "",
             "| config | " + " | ".join(f"{s} ms (median, min–max)" for s in STAGES) + " | decode tok/s | peak RSS MB | bundle MB |",
             "|---|" + "---|" * (len(STAGES) + 3)]
    for name, c in cfgs.items():
        cells = [f"{c['stages'][s]['median_ms']:.0f} ({c['stages'][s]['min_ms']:.0f}–{c['stages'][s]['max_ms']:.0f})"
                 for s in STAGES]
        size = f"{c['bundle_bytes'] / 2**20:.0f}" if c.get("bundle_bytes") else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {c['stages']['decode_tok_s']:.1f} | {c['peak_rss_mb']:.0f} | {size} |")
    lines += ["", "Ratios (speed-up = baseline time / config time; RSS and size as config / baseline):", "",
              "| ratio | total speed-up | encoder speed-up | prefill speed-up | decode tok/s ratio | peak RSS | bundle size |",
              "|---|---|---|---|---|---|---|"]
    for k, r in res["ratios"].items():
        lines.append(f"| {k} | {r['total_speedup']:.2f}× | {r['encoder_speedup']:.2f}× | {r['prefill_speedup']:.2f}× | "
                     f"{r['decode_tok_s_ratio']:.2f}× | {r['peak_rss_ratio']:.2f} | {r.get('bundle_size_ratio', float('nan')):.2f} |")
    lines += ["", f"Token agreement with the PyTorch reference (first {res['tokens']} greedy tokens): " +
              ", ".join(f"{k} {v:.2f}" for k, v in res["token_agreement"].items())]
    for name, prof in res.get("profile_c", {}).items():
        lines += ["", f"Profile of c_runtime_int8_4bit, {name} (ONNX Runtime profiler, one report: {prof['runs']} runs, "
                      f"{prof['nodes_per_run']:.0f} nodes per run; {prof['run_ms_total']:.0f} ms in runs, of which "
                      f"{prof['kernel_ms_total']:.0f} ms in kernels):", "",
                  "| op type | kernel ms | share | calls per run |", "|---|---:|---:|---:|"]
        lines += [f"| {o['op']} | {o['ms']:.1f} | {100 * o['share']:.1f}% | {o['calls_per_run']:.0f} |" for o in prof["top_ops"]]
    (RESULTS / "e2e.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = list(cfgs)
        left = np.zeros(len(names))
        for s in ("preprocess", "encoder", "prefill", "decode"):
            v = np.array([cfgs[n]["stages"][s]["median_ms"] for n in names])
            ax.barh(names, v, left=left, label=s)
            left += v
        ax.set_xlabel("median ms per report (60 tokens greedy)")
        ax.legend(loc="lower right", fontsize=8)
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(RESULTS / "e2e.png", dpi=110)
    except ImportError:
        print("[e2e] matplotlib not installed: no PNG chart", file=sys.stderr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tokens", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=1, help="views per study (real X-rays)")
    p.add_argument("--work-dir", type=Path, default=WORK, help="where the checkpoint and the bundles are (made if missing)")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from emrrg.assets import chest_dicom, pneumonia_images

    paths = prepare(a.threads, a.work_dir)
    load_before = round(os.getloadavg()[0], 2)
    images = [str(chest_dicom("RG1_UNCR.dcm")), *map(str, pneumonia_images())][: a.images]
    runners = {k: TorchRef(paths[b]) if b == "ckpt" else RuntimeRun(paths[b], a.threads) for k, b in CONFIGS.items()}
    runs: dict[str, list[dict]] = {k: [] for k in runners}
    for i in range(a.warmup + a.repeats):
        for k, r in runners.items():
            out = r.run(images, a.tokens)
            time.sleep(0.2)  # let the previous engine's idle ORT / OpenMP workers stop spinning
            if i >= a.warmup:
                runs[k].append(out)
        print(f"[e2e] round {i + 1}/{a.warmup + a.repeats}: " +
              ", ".join(f"{k} {runs[k][-1]['timings_ms']['total']:.0f} ms" for k in runs if runs[k]), flush=True)
    ref_ids = runs["a_pytorch_f32"][0]["ids"]
    configs, agreement = {}, {}
    kinds = {k: ("torch" if b == "ckpt" else "rt", paths[b]) for k, b in CONFIGS.items()}
    for k, rs in runs.items():
        kind, path = kinds[k]
        configs[k] = {"stages": summarize(rs), "peak_rss_mb": peak_rss_child(kind, path, images, a.tokens, a.threads),
                      "bundle_bytes": bundle_bytes(path) if kind == "rt" else None,
                      "backend": rs[0].get("backend", "pytorch")}
        ids = rs[0]["ids"]
        agreement[k] = float(np.mean([x == y for x, y in zip(ids, ref_ids)]))

    def ratio(c: str, base: str) -> dict:
        x, b = configs[c], configs[base]
        r = {"total_speedup": b["stages"]["total"]["median_ms"] / x["stages"]["total"]["median_ms"],
             "encoder_speedup": b["stages"]["encoder"]["median_ms"] / x["stages"]["encoder"]["median_ms"],
             "prefill_speedup": b["stages"]["prefill"]["median_ms"] / x["stages"]["prefill"]["median_ms"],
             "decode_tok_s_ratio": x["stages"]["decode_tok_s"] / b["stages"]["decode_tok_s"],
             "peak_rss_ratio": x["peak_rss_mb"] / b["peak_rss_mb"]}
        if x["bundle_bytes"] and b["bundle_bytes"]:
            r["bundle_size_ratio"] = x["bundle_bytes"] / b["bundle_bytes"]
        return r

    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "tokens": a.tokens, "repeats": a.repeats, "threads": a.threads,
           "images": [Path(i).name for i in images], "configs": configs,
           "ratios": {"c/a": ratio("c_runtime_int8_4bit", "a_pytorch_f32"), "c/b": ratio("c_runtime_int8_4bit", "b_runtime_f32"),
                      "b/a": ratio("b_runtime_f32", "a_pytorch_f32"), "d/a": ratio("d_runtime_int8_4bit_al0", "a_pytorch_f32")},
           "code": code_version(), "bundles_created": {k: json.loads((paths[k] / "manifest.json").read_text())["created"]
                                                       for k in BUNDLES},
           "decoder_4bit": (json.loads((paths["bundle-int8-4bit"] / "manifest.json").read_text()).get("validation", {})
                            .get("decoder_4bit") or {}).get("chosen"),
           "token_agreement": agreement, "load_average": {"before": load_before, "after": round(os.getloadavg()[0], 2)}}
    print("[e2e] profiling one report of c_runtime_int8_4bit ...", flush=True)
    res["profile_c"] = profile_runtime(paths["bundle-int8-4bit"], images, a.tokens, a.threads)
    write_results(res)
    print((RESULTS / "e2e.md").read_text())


if __name__ == "__main__":
    main()
