"""Decoder graphs head to head: the built graph (export/decoder_builder.py) vs the traced one (torch.onnx).

Both are driven by the runtime's own StepModels (SharedCacheDecoder: one KV buffer per layer bound as past and
present; OrtDecoder: double-buffered, IO-bound) and greedy loop, on the same token ids: a prefill of
`--prompt-tokens` report-text ids, then `--tokens` greedy tokens (EOS ignored). For each thread count the
decoders alternate, `--repeats` rounds after `--warmup`; ratios are taken within the same rounds (the machine is
shared, so figures from different runs do not compare).

Each decoder is a folder with decoder.onnx (+ .data) and embed_tokens.npy: the built one from
`decoder_builder.build_decoder(SafetensorsWeights([...]), LlamaShape.from_config(...), DIR, quant=QuantConfig(...))`
(+ np.save(DIR / "embed_tokens.npy", ...)), the traced one from `decoder_onnx.export_decoder` then
`quantize_decoder.quantize_decoder(..., config=QuantConfig(...))`, same configuration on both sides:

    .venv/bin/python benchmarks/decoder_graph.py --decoder built=DIR_A --decoder traced=DIR_B

The cost of keeping a LoRA separate (decoder_graph_lora.md): the demo checkpoint's LLM built twice with
`build_decoder(ModuleWeights(merged), shape, DIR, quant=QuantConfig(...), adapters=lora_factors(unmerged))`,
as `affine-b32-lora-lm8` (separate_adapters=True) and `affine-b32-lm8` (merged), then
`--decoder separate=DIR_S --decoder merged=DIR_M --name decoder_graph_lora`.

The last --decoder is the baseline of the ratios.
Writes benchmarks/results/decoder_graph.{json,md}.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEP_PERCENTILE = 10   # of per-step decode times: robust to the preemption of a loaded 2-core machine
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)


def load(folder: Path, threads: int, profile: bool = False):
    import onnx

    from emrrg.export.decoder_eval import decoder_metadata
    from emrrg.runtime.decoder import OrtDecoder
    from emrrg.runtime.decoder_shared import SharedCacheDecoder

    meta = decoder_metadata(folder / "decoder.onnx")
    cls = SharedCacheDecoder if meta.get("cache") == "shared" else OrtDecoder
    nodes = len(onnx.load(str(folder / "decoder.onnx"), load_external_data=False).graph.node)
    dec = cls(session(folder / "decoder.onnx", threads, profile), np.load(folder / "embed_tokens.npy"),
              meta["num_layers"], meta["kv_heads"], meta["head_dim"], max_len=2048, max_rows=8)
    return dec, {"cache": meta.get("cache", "concat"), "nodes": nodes,
                 "quantization": json.loads(json.dumps(meta.get("quantization", {}))).get("config", {}).get("name")}


def session(path: Path, threads: int, profile: bool = False, prefix: str | None = None):
    """An ORT CPU session as the benchmarks use it (ort_session's settings, the op library registered when built),
    optionally with the profiler on."""
    import onnxruntime as ort

    from emrrg.runtime.oplib import register_if_found

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    register_if_found(so)
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = prefix or str(Path(tempfile.gettempdir()) / "emrrg_decoder_profile")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def op_profile(dec, ids: list[int], tokens: int) -> dict:
    """Run one report on a StepModel whose session profiles, then: % of decode kernel time per op type."""
    run(dec, ids, tokens)
    prof = Path(dec.sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    start = runs[0]["ts"] + runs[0]["dur"]                       # after the prefill
    per_op, count, calls = collections.Counter(), collections.Counter(), collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
            calls[e["args"]["op_name"]].append(e["dur"])
    steps = len(runs) - 1
    total = sum(per_op.values())
    return {"decode_steps": steps, "run_us_per_step": sum(r["dur"] for r in runs[1:]) / steps,
            "kernel_us_per_step": total / steps,
            "ops": {op: {"share": round(v / total, 4), "us_per_step": round(v / steps, 1),
                         "nodes_per_step": count[op] // steps, "median_us_per_call": statistics.median(calls[op])}
                    for op, v in per_op.most_common()}}


def profile_md(title: str, prof: dict) -> list[str]:
    return ["", f"{title} ({prof['decode_steps']} decode steps, {prof['run_us_per_step']:.0f} µs per step, of which "
                f"kernels {prof['kernel_us_per_step']:.0f} µs):", "",
            "| op | share of kernel time | µs per step | nodes per step | median µs per call |", "|---|---:|---:|---:|---:|",
            *[f"| {op} | {100 * v['share']:.1f}% | {v['us_per_step']:.0f} | {v['nodes_per_step']} | "
              f"{v.get('median_us_per_call', float('nan')):.1f} |" for op, v in list(prof["ops"].items())[:10]]]


def run(dec, ids: list[int], tokens: int) -> dict:
    from emrrg.runtime.report_runtime import _TimedStep
    from emrrg.runtime.generation import DecodeSettings, greedy

    class Steps(_TimedStep):                    # + each decode step's time, for the low percentile
        def step(self, tokens, rows):
            t = time.perf_counter()
            out = super().step(tokens, rows)
            self.times.append(time.perf_counter() - t)
            return out

    s = DecodeSettings(num_beams=1, repetition_penalty=1.0, min_new_tokens=tokens, max_new_tokens=tokens, eos_token_id=2)
    step = Steps(dec)
    step.times = []
    dec.reserve(1, len(ids) + tokens)
    out = greedy(step, dec.embed[np.asarray(ids)][None], s)
    return {"ids": out, "prefill_ms": 1e3 * step.prefill_s, "decode_tok_s": (tokens - 1) / step.decode_s,
            "step_ms": [1e3 * t for t in step.times]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--decoder", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--prompt-tokens", type=int, default=220)
    p.add_argument("--tokens", type=int, default=60)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="add an ORT profile of each decoder's decode steps (1 thread)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="decoder_graph", help="results file stem (NAME.json, NAME.md)")
    p.add_argument("--note", action="append", default=[], help="a paragraph appended to the Markdown (repeatable)")
    a = p.parse_args(argv)
    folders = dict(d.split("=", 1) for d in a.decoder)
    ids = [int(x) for x in np.random.default_rng(0).integers(100, 40000, a.prompt_tokens)]
    by_threads, info = {}, {}
    for t in a.threads:
        decs = {}
        for k, f in folders.items():
            decs[k], info[k] = load(Path(f), t)
        runs = {k: [] for k in decs}
        for i in range(a.warmup + a.repeats):
            for k, d in decs.items():
                r = run(d, ids, a.tokens)
                time.sleep(0.2)
                if i >= a.warmup:
                    runs[k].append(r)
            if i >= a.warmup:
                print(f"{t} threads round {i + 1 - a.warmup}: " + ", ".join(
                    f"{k} {runs[k][-1]['prefill_ms']:.0f} ms / {runs[k][-1]['decode_tok_s']:.1f} tok/s" for k in runs),
                    flush=True)
        res = {k: {"prefill_ms": statistics.median(r["prefill_ms"] for r in v),
                   "decode_tok_s": statistics.median(r["decode_tok_s"] for r in v),
                   "decode_tok_s_range": [min(r["decode_tok_s"] for r in v), max(r["decode_tok_s"] for r in v)],
                   "step_ms_p10": float(np.percentile([x for r in v for x in r["step_ms"]], STEP_PERCENTILE)),
                   "same_tokens_as_first": v[0]["ids"] == runs[next(iter(runs))][0]["ids"]} for k, v in runs.items()}
        by_threads[str(t)] = {"engines": res, "load_average": round(os.getloadavg()[0], 2)}
    out = {"machine": f"{cpu_name()} ({os.cpu_count()} cores)", "prompt_tokens": a.prompt_tokens, "tokens": a.tokens,
           "repeats": a.repeats, "decoders": {k: {"dir": str(folders[k]), **info[k]} for k in folders},
           "onnxruntime": __import__("onnxruntime").__version__, "by_threads": by_threads}
    if a.profile:
        out["profile_1_thread"] = {k: op_profile(load(Path(f), 1, profile=True)[0], ids, a.tokens) for k, f in folders.items()}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / f"{a.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    names = list(folders)
    base = names[-1]
    md = [f"# Decoder graphs head to head: {' vs '.join(names)}, SmolLM2-135M 4-bit", "",
          f"{out['machine']}; prompt {a.prompt_tokens} ids, then {a.tokens} greedy tokens; {a.repeats} alternating rounds "
          f"per thread count; onnxruntime {out['onnxruntime']}. Shared machine: compare within a thread count only.", "",
          "Decoders: " + "; ".join(f"`{k}` {v['cache']} cache, {v['nodes']} nodes, {v['quantization']}"
                                   for k, v in out["decoders"].items()) + ".", "",
          f"`step ms p{STEP_PERCENTILE}`: the {STEP_PERCENTILE}th percentile of every decode step's time over all rounds, "
          "the least disturbed steps of a shared machine; its ratio is the decode speed-up at that percentile.", "",
          f"| threads | decoder | prefill ms | decode tok/s (min–max) | decode vs `{base}` | step ms p{STEP_PERCENTILE} | "
          f"p{STEP_PERCENTILE} speed vs `{base}` | prefill speed-up vs `{base}` |",
          "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for t, r in by_threads.items():
        b = r["engines"][base]
        for k, e in r["engines"].items():
            md.append(f"| {t} | {k} | {e['prefill_ms']:.0f} | {e['decode_tok_s']:.1f} ({e['decode_tok_s_range'][0]:.1f}–"
                      f"{e['decode_tok_s_range'][1]:.1f}) | **{e['decode_tok_s'] / b['decode_tok_s']:.2f}×** | "
                      f"{e['step_ms_p10']:.2f} | **{b['step_ms_p10'] / e['step_ms_p10']:.2f}×** | "
                      f"**{b['prefill_ms'] / e['prefill_ms']:.2f}×** |")
    md += ["", "Load average after each thread count: " + ", ".join(f"{t}: {r['load_average']}" for t, r in by_threads.items())
           + "."]
    for k, prof in out.get("profile_1_thread", {}).items():
        md += profile_md(f"Where `{k}`'s decode time goes (ORT profiler, 1 thread)", prof)
    for note in a.note:
        md += ["", note]
    (a.out_dir / f"{a.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
