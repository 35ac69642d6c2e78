"""4-bit decoder on the real SmolLM2-135M: accuracy vs the f32 PyTorch reference, size and ORT CPU speed.

For two decoders -- SmolLM2-135M-Instruct as shipped (weights on llama.cpp's Q4_1 grid, Q8_0
embedding) and the same model with a random rank-16 LoRA merged into q_proj/v_proj (the grid no
longer holds there, as after fine-tuning) -- this script:

1. exports decoder.onnx (f32, KV cache) with emrrg.export.decoder_onnx.export_decoder;
2. builds the reference: the f32 PyTorch model's greedy continuations (`--new-tokens`, 60) of
   `--prompts` real-text prompts (EMRRG prompt + radlabels reports, `--prompt-tokens`, 220) and its
   logits at those positions (emrrg.export.decoder_eval);
3. collects activation statistics on separate calibration prompts (later radlabels reports);
4. for every configuration of the table (plus the f32 ONNX and ORT's own MatMulNBitsQuantizer as
   baselines) quantizes, scores teacher-forced top-1 / mean KL / greedy agreement, and times a
   prefill of the prompt and single-token decode steps in ORT CPU with `--threads` threads;
5. runs choose_decoder_config's default ladder and records which configuration it keeps.

Writes benchmarks/results/decoder_4bit.json (everything) and decoder_4bit.md (the tables).

    .venv/bin/python benchmarks/decoder_4bit.py                      # ~40 min on 2 shared cores
    .venv/bin/python benchmarks/decoder_4bit.py --variants plain --prompts 4 --configs affine-b32-lm8
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

from emrrg.export.quantize_decoder import DEFAULT_LADDER, KL_MAX, TOP1_MIN, QuantConfig  # noqa: E402

# The table. Names: method-block-[awq]-lm<bits>[-w<k>][-al0]. The float-zero-point row (fzp) of
# results/decoder_4bit.md is gone with the encoding: same numbers as affine-b32-lm8, ~7x slower decode.
TABLE: tuple[QuantConfig, ...] = (
    QuantConfig("sym-b32-lm4", method="sym", lm_head_bits=4),              # = ORT RTN default, lm_head included
    QuantConfig("sym-b128-lm4", method="sym", block_size=128, lm_head_bits=4),
    QuantConfig("sym-b32-lm8", method="sym"),
    QuantConfig("asym-b32-lm8", method="asym"),
    QuantConfig("affine-b32-lm4", lm_head_bits=4),
    QuantConfig("affine-b32-lm8"),
    QuantConfig("affine-b32-lm8-al0", accuracy_level=0),                    # f32 compute instead of int8
    QuantConfig("affine-b32-lm32", lm_head_bits=32),
    QuantConfig("affine-b128-awq-lm8", block_size=128, refine=9, act_weighted=True),
    QuantConfig("affine-b32-awq-lm8", refine=9, act_weighted=True),
    QuantConfig("affine-b32-awq-lm8-w16", refine=9, act_weighted=True, worst_k_8bit=16),
    QuantConfig("affine-b32-awq-lm8-w64", refine=9, act_weighted=True, worst_k_8bit=64),
    QuantConfig("int8-b32", bits=8),
)
ORT_BASELINE = "ort-rtn-b32"  # onnxruntime.quantization.MatMulNBitsQuantizer, symmetric, block 32, every MatMul


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", default="plain,lora", help="plain and/or lora (random rank-16 LoRA merged into q/v)")
    p.add_argument("--configs", default="all", help="comma-separated names from the table, 'all', or 'none'")
    p.add_argument("--no-chooser", action="store_true", help="skip choose_decoder_config's ladder")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=220)
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--calib-prompts", type=int, default=4)
    p.add_argument("--calib-first-report", type=int, default=500, help="calibration uses reports from here on")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-rel-norm", type=float, default=0.15, help="||dW|| / ||W|| of each merged q/v weight")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timing-tokens", type=int, default=32, help="decode steps per timing repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("EMRRG_CACHE", Path.home() / ".cache" / "emrrg"))
                   / "bench-decoder-4bit")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def load_decoder(variant: str, args):
    import torch

    from emrrg.config import decoder_config
    from emrrg.decoder import load_base_decoder
    from emrrg.export.decoder_eval import merge_random_lora

    torch.manual_seed(args.seed)
    llm, tok = load_base_decoder(decoder_config("smollm2-135m"))
    if variant == "lora":
        llm = merge_random_lora(llm, rank=args.lora_rank, rel_norm=args.lora_rel_norm, seed=args.seed)
    return llm.eval(), tok


def cached(path: Path, make):
    if path.is_file():
        return pickle.loads(path.read_bytes())
    obj = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))
    return obj


def ort_baseline(f32_onnx: Path, out_dir: Path):
    """ORT's own MatMulNBitsQuantizer (RTN, symmetric, block 32, accuracy_level 4, every MatMul)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from emrrg.export.decoder_onnx import save_onnx
    from emrrg.export.quantize_decoder import onnx_bytes

    t = time.time()
    q = MatMulNBitsQuantizer(onnx.load(str(f32_onnx)), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = save_onnx(q.model.model, out_dir / "decoder.onnx")
    return path, onnx_bytes(path), time.time() - t


def bits_census(model_path: Path) -> dict:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    census: dict[str, int] = {}
    weights = {t.name for t in m.graph.initializer if len(t.dims) == 2}
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            b = next(a.i for a in n.attribute if a.name == "bits")
            census[str(b)] = census.get(str(b), 0) + 1
        elif n.op_type == "MatMul" and n.input[1] in weights and not n.input[1].endswith(".block_offsets"):
            census["32"] = census.get("32", 0) + 1  # an f32 weight MatMul (not a block-sum correction)
    return census


def run_variant(variant: str, args, configs, results: dict, save):
    from emrrg.export.decoder_eval import (DecoderEvaluator, OrtScorer, TorchDecoder, build_reference,
                                           eval_prompts, prefill_feeds)
    from emrrg.export.decoder_onnx import DecoderSpec, export_decoder
    from emrrg.export.quantize_decoder import (choose_decoder_config, collect_activation_stats, onnx_bytes,
                                               quantize_decoder)

    work = args.workdir / variant
    llm, tok = load_decoder(variant, args)
    f32_dir = work / "f32"
    if not (f32_dir / "decoder.onnx").is_file():
        print(f"[{variant}] exporting decoder.onnx ...", flush=True)
        exp = export_decoder(llm, f32_dir, tokenizer=tok)
        (f32_dir / "export.json").write_text(json.dumps(exp.manifest(), indent=1))
    export_info = json.loads((f32_dir / "export.json").read_text())
    f32_onnx = f32_dir / "decoder.onnx"
    embed = np.load(f32_dir / "embed_tokens.npy")
    spec = DecoderSpec.from_dict(export_info["spec"])
    prompts = eval_prompts(tok, n=args.prompts, prompt_tokens=args.prompt_tokens)
    key = f"ref-p{args.prompts}-t{args.prompt_tokens}-n{args.new_tokens}.pkl"
    t = time.time()
    ref = cached(work / key, lambda: build_reference(TorchDecoder(llm), prompts, n_new=args.new_tokens))
    print(f"[{variant}] reference: {len(ref.prompts)} prompts x {ref.n_new} tokens ({time.time() - t:.0f}s)", flush=True)
    calib = eval_prompts(tok, n=args.calib_prompts, prompt_tokens=args.prompt_tokens, first_report=args.calib_first_report)
    stats = cached(work / f"stats-c{args.calib_prompts}-{args.calib_first_report}.pkl",
                   lambda: collect_activation_stats(f32_onnx, prefill_feeds(spec, embed, calib), threads=args.threads))
    del llm
    evaluator = DecoderEvaluator(ref, embed, threads=args.threads)
    f32_bytes = onnx_bytes(f32_onnx)
    out = results.setdefault(variant, {"rows": [], "export": {"bytes": export_info["bytes"],
                                                              "validation": export_info["validation"],
                                                              "export_s": export_info["export_s"]}})
    out["example_continuation"] = tok.decode(ref.continuations[0])
    out["rows"] = []

    def measure(name, path, nbytes, cfg, quant_s):
        ev = evaluator(path)
        sp = OrtScorer(path, embed, threads=args.threads).timing(ref.prompts[0], n_new=args.timing_tokens,
                                                                  repeats=args.repeats)
        row = {"name": name, "config": cfg, "bytes": nbytes, "size_ratio": nbytes / f32_bytes,
               "matmuls_by_bits": bits_census(path), "quantize_s": quant_s,
               "top1": ev.top1, "kl_mean": ev.kl_mean, "kl_p99": ev.kl_p99, "kl_max": ev.kl_max,
               "greedy_token_agreement": ev.greedy_token_agreement, "greedy_prefix": ev.greedy_prefix,
               "positions": ev.positions, "passed": ev.top1 >= TOP1_MIN and ev.kl_mean <= KL_MAX,
               "per_prompt": ev.per_prompt, **sp, "loadavg": os.getloadavg()[0]}
        out["rows"].append(row)
        print(f"[{variant}] {'✓' if row['passed'] else '✗'} {name:<24} top1 {ev.top1:.4f} KL {ev.kl_mean:.4f} "
              f"greedy {ev.greedy_token_agreement:.3f} {nbytes / 2**20:6.1f} MiB ({row['size_ratio']:.3f}) "
              f"prefill {sp['prefill_ms']:.0f} ms decode {sp['decode_tok_s']:.1f} tok/s", flush=True)
        save()

    measure("f32 (ONNX)", f32_onnx, f32_bytes, None, 0.0)
    if configs:
        path, nbytes, qs = ort_baseline(f32_onnx, work / ORT_BASELINE)
        measure(ORT_BASELINE, path, nbytes, {"name": ORT_BASELINE, "tool": "onnxruntime MatMulNBitsQuantizer",
                                             "bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4}, qs)
    for cfg in configs:
        res = quantize_decoder(f32_onnx, work / cfg.name, config=cfg, act_stats=stats)
        measure(cfg.name, res.path, res.bytes, cfg.to_dict(), res.seconds)
    if not args.no_chooser:
        teacher = DecoderEvaluator(ref, embed, threads=args.threads, greedy=False)
        t = time.time()
        choice = choose_decoder_config(f32_onnx, work / "chosen", teacher, act_stats=stats)
        out["chooser"] = {**choice.manifest(), "seconds": time.time() - t}
        save()


def fmt_row(r, f32):
    bits = r["matmuls_by_bits"]
    census = " ".join(f"{k}b×{bits[k]}" for k in sorted(bits, key=int))
    return (f"| {r['name']} | {census} | {r['top1']:.4f} | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} | "
            f"{r['greedy_token_agreement']:.3f} | {r['greedy_prefix']:.3f} | {r['bytes'] / 2**20:.1f} | "
            f"{r['size_ratio']:.3f} | {r['prefill_ms']:.0f} | {r['prefill_cpu_ms']:.0f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_cpu_ms_per_token']:.1f} | {'✓' if r['passed'] else '✗'} |")


def write_markdown(results: dict, meta: dict, path: Path):
    lines = ["# 4-bit decoder (MatMulNBits) on SmolLM2-135M-Instruct", "",
             f"{meta['cpu']} ({meta['cores']} cores), ORT CPU {meta['threads']} threads; onnxruntime {meta['onnxruntime']}, "
             f"torch {meta['torch']}, transformers {meta['transformers']}. Reference: the f32 PyTorch model's greedy "
             f"continuations ({meta['new_tokens']} tokens) of {meta['prompts']} real-text prompts of "
             f"{meta['prompt_tokens']} tokens (EMRRG prompt + radlabels reports); teacher-forced top-1 and mean "
             f"KL(ref‖quant) over those {meta['prompts'] * meta['new_tokens']} positions; greedy = the quantized "
             f"model's own continuation through its KV cache (position-wise agreement, common prefix). "
             f"Thresholds: top-1 ≥ {TOP1_MIN}, KL ≤ {KL_MAX}.", "",
             "Sizes are decoder.onnx (+ .data); the f32 embedding table embed_tokens.npy "
             f"({meta.get('embed_mib', 0):.1f} MiB) ships beside it in every configuration. Speed: prefill of "
             f"{meta['prompt_tokens']} tokens (median wall ms and process CPU ms) and single-token decode steps after it "
             f"(median tok/s and CPU ms per token). The cores are shared with other jobs (load average per row in the "
             "JSON), so wall-clock figures are noisy; compare CPU times.", "",
             "Config names: `sym` = symmetric RTN (ORT's default), `asym` = RTN with a uint8 zero point, `affine` = "
             "float per-block offset (llama.cpp Q4_1 form) through the block-sum correction; `bN` = block size; "
             "`lmN` = lm_head bits (32 = f32); `awq` = activation-weighted least-squares refit; `wK` = the K MatMuls "
             "with the largest weighted error at 8 bits; `al0` = f32 compute (accuracy_level 0) instead of int8; "
             "`ort-rtn-b32` = onnxruntime's MatMulNBitsQuantizer on every MatMul.", ""]
    head = ("| config | MatMuls | top-1 | KL mean | KL p99 | greedy agree | greedy prefix | MiB | × f32 | "
            "prefill ms | prefill CPU ms | decode tok/s | decode CPU ms/tok | pass |")
    for variant, res in results.items():
        title = {"plain": "SmolLM2-135M as shipped (weights on the Q4_1 grid)",
                 "lora": f"SmolLM2-135M + merged random LoRA (rank {meta['lora_rank']}, ‖ΔW‖/‖W‖ = "
                         f"{meta['lora_rel_norm']} on q_proj, v_proj)"}[variant]
        lines += [f"## {title}", "", head, "|" + "---|" * 2 + "---:|" * 11 + ":-:|"]
        f32 = res["rows"][0] if res["rows"] else None
        lines += [fmt_row(r, f32) for r in res["rows"]]
        v = res.get("export", {}).get("validation", {}).get("max_abs_diff", {})
        if v:
            lines += ["", "f32 ONNX vs PyTorch (export validation, max |Δlogits|): " +
                      ", ".join(f"{k} {x:.1e}" for k, x in v.items() if "logits" in k)]
        ch = res.get("chooser")
        if ch:
            lines += ["", f"choose_decoder_config (default ladder): kept **{ch['chosen']}** "
                          f"({'passed' if ch['passed'] else 'none passed'}) after "
                          + " → ".join(f"{a['name']} {a['top1']:.3f}/{a['kl_mean']:.4f}{' ✓' if a['passed'] else ''}"
                                       for a in ch["attempts"]) + f" ({ch['seconds']:.0f} s)"]
        if res.get("example_continuation"):
            lines += ["", f"Reference continuation of prompt 0: `{res['example_continuation'][:160]!r}…`"]
        lines.append("")
    path.write_text("\n".join(lines))


def main():
    import logging

    args = parse_args()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("onnxruntime"):
            logging.getLogger(name).setLevel(logging.WARNING)
    import onnxruntime
    import torch
    import transformers

    names = {c.name: c for c in TABLE}
    if args.configs == "all":
        configs = list(TABLE)
    elif args.configs == "none":
        configs = []
    else:
        unknown = [n for n in args.configs.split(",") if n not in names]
        if unknown:
            sys.exit(f"unknown configs {unknown}; choose from {list(names)}")
        configs = [names[n] for n in args.configs.split(",")]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "cores": os.cpu_count(),
            "threads": args.threads, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "calib_prompts": args.calib_prompts, "lora_rank": args.lora_rank,
            "lora_rel_norm": args.lora_rel_norm, "thresholds": {"top1_min": TOP1_MIN, "kl_max": KL_MAX},
            "default_ladder": [c.name for c in DEFAULT_LADDER], "loadavg_start": os.getloadavg()}
    results: dict = {}
    json_path, md_path = args.out_dir / "decoder_4bit.json", args.out_dir / "decoder_4bit.md"

    def save():
        emb = args.workdir / "plain" / "f32" / "embed_tokens.npy"
        meta["embed_mib"] = emb.stat().st_size / 2**20 if emb.exists() else 0.0
        json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=float))
        write_markdown(results, meta, md_path)

    for variant in args.variants.split(","):
        run_variant(variant, args, configs, results, save)
    meta["loadavg_end"] = os.getloadavg()
    save()
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
