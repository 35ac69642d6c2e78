"""Accuracy of the built decoder graph's 4-bit encodings on the real SmolLM2-135M (as shipped, LoRA-merged, demo).

For each variant: the f32 PyTorch reference writes greedy continuations of `--prompts` real-text prompts
(decoder_eval: EMRRG prompt + radlabels reports, 220 ids, 60 new tokens); each 4-bit encoding is built from
the weights (decoder_builder.quantized_builder, as emrrg-export does) and scored teacher-forced (top-1, mean
KL) and greedy, with the thresholds the export uses (quantize_decoder.TOP1_MIN / KL_MAX). The LoRA-merged
variant (decoder_eval.random_lora: rank 16 on q/v, ||dW|| / ||W|| = 0.15) also gets the activation-weighted
refit, with statistics from separate calibration prompts, and the rung that keeps the LoRA as a low-rank branch
beside the 4-bit base weights (factors taken before the merge, as emrrg-export does). The demo variant is
demo/checkpoint's SmolLM2 with its trained LoRA, scored the same way.

    .venv/bin/python benchmarks/decoder_graph_accuracy.py --variants shipped lora demo
    .venv/bin/python benchmarks/decoder_graph_accuracy.py --variants demo --keep-others   # one variant anew

Writes benchmarks/results/decoder_graph_accuracy.{json,md}; `--render` rewrites the Markdown from the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)


VARIANTS = ("shipped", "lora", "demo")


def run_variant(variant: str, work: Path, prompts: int) -> dict:
    from emrrg.config import decoder_config
    from emrrg.decoder import load_base_decoder
    from emrrg.export.decoder_builder import (ModuleWeights, _module_shape, build_decoder, lora_factors, on_block_grid,
                                              quantized_builder)
    from emrrg.export.decoder_eval import DecoderEvaluator, TorchDecoder, build_reference, eval_prompts, prefill_feeds, random_lora
    from emrrg.export.quantize_decoder import DEFAULT_LADDER, collect_activation_stats

    if variant == "demo":   # the demo checkpoint's SmolLM2 with its trained LoRA merged (what its bundle holds)
        from emrrg.checkpoint import load_checkpoint

        model = load_checkpoint(ROOT / "demo" / "checkpoint")
        adapters = lora_factors(model.llama_model)
        model.merge_adapters()
        llm, tok = model.llama_model, model.tokenizer
    else:
        llm, tok = load_base_decoder(decoder_config("smollm2-135m"))
        adapters = {}
        if variant == "lora":
            llm = random_lora(llm)
            adapters = lora_factors(llm)
            llm = llm.merge_and_unload()
    llm = llm.eval()
    src, shape = ModuleWeights(llm), _module_shape(llm)
    ref = build_reference(TorchDecoder(llm), eval_prompts(tok, n=prompts, prompt_tokens=220), 60)
    embed = src.get("model.embed_tokens.weight")
    # the ladder's first rungs (quantize_decoder.DEFAULT_LADDER), each scored even where the export skips it
    configs = [c for c in DEFAULT_LADDER if c.name in ("asym-b32-lm8", "asym-b32-awq-lm8", "affine-b32-lm8")]
    if variant in ("lora", "demo"):
        configs += [c for c in DEFAULT_LADDER if c.name == "affine-b32-awq-lm8" or c.separate_adapters]
    f32 = build_decoder(src, shape, work / "f32")
    stats = collect_activation_stats(f32.path, prefill_feeds(f32.spec, embed, eval_prompts(
        tok, n=2, prompt_tokens=220, first_report=300)))
    t0 = time.time()
    grid = on_block_grid(src, shape)
    print(variant, f"on a 4-bit block-32 grid: {grid} ({time.time() - t0:.1f} s)", flush=True)
    quantize, rows = quantized_builder(src, shape, adapters=adapters), {"_on_grid": grid, "_grid_check_s": round(time.time() - t0, 1)}
    for cfg in configs:
        r = quantize(cfg, work / cfg.name, stats)
        t0 = time.time()
        ev = DecoderEvaluator(ref, embed)(r.path)
        rows[cfg.name] = {"top1": round(ev.top1, 4), "kl_mean": round(ev.kl_mean, 5),
                          "greedy": ev.greedy_token_agreement, "bytes": r.bytes, "build_s": round(r.seconds, 1),
                          "eval_s": round(time.time() - t0, 1),
                          "skipped_by_export": bool(quantize.skip(cfg, DEFAULT_LADDER[DEFAULT_LADDER.index(cfg) + 1:]))}
        print(variant, cfg.name, rows[cfg.name], flush=True)
    return rows


def render(out: dict, path: Path) -> None:
    from emrrg.export.quantize_decoder import KL_MAX, TOP1_MIN

    md = ["# Built decoder graph, 4-bit encodings: accuracy vs f32 PyTorch, SmolLM2-135M", "",
          f"{out['machine']}; {out['prompts']} prompts x 60 teacher-forced positions; thresholds top-1 >= {TOP1_MIN}, "
          f"KL <= {KL_MAX}.", "",
          "Rungs of the export's ladder (quantize_decoder.DEFAULT_LADDER), in its order; the affine rows use the "
          "built graph's default form (integer zero points + an f16 rest through com.emrrg::BlockSumMatMulAdd). "
          "'skipped' = the export skips that rung without building or scoring it (weights on a 4-bit block grid); "
          "it is scored here anyway. Seconds: build / teacher-forced evaluation on a shared machine.", "",
          "| variant | encoding | top-1 | mean KL | greedy token agreement | MiB | passes | export | build s | eval s |",
          "|---|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for v, rows in out["variants"].items():
        for name, r in rows.items():
            if name.startswith("_"):
                continue
            ok = r["top1"] >= TOP1_MIN and r["kl_mean"] <= KL_MAX
            md.append(f"| {v} | {name} | {r['top1']:.4f} | {r['kl_mean']:.5f} | {r['greedy']:.3f} | "
                      f"{r['bytes'] / 2**20:.1f} | {'yes' if ok else 'no'} | {'skipped' if r.get('skipped_by_export') else 'scored'} "
                      f"| {r.get('build_s', '')} | {r.get('eval_s', '')} |")
        if "_on_grid" in rows:
            md.append(f"| {v} | (grid check) | | | | | | on grid: {rows['_on_grid']} | {rows['_grid_check_s']} | |")
    for note in out.get("notes", []):                 # free text added to the JSON by hand (e.g. an export's ladder run)
        md += ["", note]
    path.write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv=None) -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["shipped", "lora"], choices=VARIANTS)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--keep-others", action="store_true",
                   help="keep the earlier JSON's rows of the variants not given in --variants")
    p.add_argument("--render", action="store_true", help="only rewrite the Markdown from the JSON")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    js = a.out_dir / "decoder_graph_accuracy.json"
    if not a.render:
        with tempfile.TemporaryDirectory() as tmp:
            out = {"machine": f"{cpu_name()} ({os.cpu_count()} cores)", "prompts": a.prompts,
                   "variants": {v: run_variant(v, Path(tmp) / v, a.prompts) for v in a.variants}}
        if js.is_file() and a.keep_others:   # the variants not rerun keep their earlier rows
            old = json.loads(js.read_text())
            out["variants"] = {**{v: r for v, r in old["variants"].items() if v not in out["variants"]},
                               **out["variants"]}
        a.out_dir.mkdir(parents=True, exist_ok=True)
        js.write_text(json.dumps(out, indent=2) + "\n")
    render(json.loads(js.read_text()), a.out_dir / "decoder_graph_accuracy.md")


if __name__ == "__main__":
    main()
