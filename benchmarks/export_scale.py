"""Export at scale: peak RSS, time and bundle size of the full `emrrg-export --llm-bits 4` on Llama shapes up to 7B.

For each shape (135M, 324M, 1.1B, 7B; random weights, written here as bf16 safetensors one layer per file, with
SmolLM2's tokenizer from its package and vocabulary size):

1. `emrrg-init --decoder llama2-7b --decoder-path LLM_DIR` writes the checkpoint (base encoder; the LLM's weights
   stay in LLM_DIR and are never loaded: emrrg-init needs only their shapes);
2. one child process runs the whole `emrrg-export CKPT -o BUNDLE --llm-bits 4` (encoder export and validation,
   the 4-bit decoder built from the safetensors and scored against the f32 reference, tokenizer, manifest) and
   reports its peak RSS (VmHWM: Python, torch, onnx and ONNX Runtime included), wall time and the bundle's size.

The decoder's f32 reference is the export's default (`decoder_reference=auto`): the f32 LLM in memory up to 2 GiB
of f32 weights (135M, 324M), streamed layer by layer from the safetensors above (1.1B, 7B). The 4-bit encoding is
pinned (affine, block 32, 8-bit lm_head) so each shape builds one candidate: random weights need not pass the
accuracy thresholds, and the ladder would build up to nine 7B candidates. Scoring is kept short (1 prompt of 64
tokens, 16 reference tokens) so the streamed 7B reference costs 16 passes over the weights.

    .venv/bin/python benchmarks/export_scale.py --shapes 1.1b 7b --work /work/scale --keep 7b

Writes benchmarks/results/export_scale.{json,md} after every shape (rows of other shapes already there are kept),
with the memory model (peak RSS = bytes per parameter x parameters + constant, least squares over the rows).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

VOCAB = 49152  # SmolLM2's
SHAPES = {  # hidden, layers, heads, kv_heads, intermediate
    "135m": (576, 30, 9, 3, 1536),
    "324m": (1024, 24, 16, 4, 2816),
    "1.1b": (2048, 22, 32, 4, 5632),
    "7b": (4096, 32, 32, 32, 11008),
}


def llama_config(name: str):
    from transformers import LlamaConfig

    h, n, heads, kv, inter = SHAPES[name]
    return LlamaConfig(vocab_size=VOCAB, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=2048,
                       tie_word_embeddings=name in ("135m",), rope_theta=10000.0)


def write_random_checkpoint(name: str, out: Path) -> int:
    """bf16 safetensors of a random Llama of shape `name`, one tensor generated at a time; returns parameters."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    c = llama_config(name)
    h, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i in range(c.num_hidden_layers):
        L = f"model.layers.{i}."
        shapes.update({L + "self_attn.q_proj.weight": (h, h), L + "self_attn.k_proj.weight": (c.num_key_value_heads * hd, h),
                       L + "self_attn.v_proj.weight": (c.num_key_value_heads * hd, h), L + "self_attn.o_proj.weight": (h, h),
                       L + "mlp.gate_proj.weight": (c.intermediate_size, h), L + "mlp.up_proj.weight": (c.intermediate_size, h),
                       L + "mlp.down_proj.weight": (h, c.intermediate_size), L + "input_layernorm.weight": (h,),
                       L + "post_attention_layernorm.weight": (h,)})
    g = torch.Generator().manual_seed(0)
    # one file per layer keeps the writer's memory at one layer (save_file takes a whole dict)
    files, total = [], 0
    groups: dict[str, dict] = {}
    for k, s in shapes.items():
        groups.setdefault(k.split(".")[2] if k.startswith("model.layers.") else "top", {})[k] = s
    out.mkdir(parents=True, exist_ok=True)
    layer0: dict[str, torch.Tensor] = {}
    for gname, members in groups.items():
        # one random layer, each later layer its rows rolled by the layer's index: distinct layers for the cost
        # of a copy (drawing 6.5B normal numbers takes half an hour on a loaded 2-core machine)
        state = {}
        for k, s in members.items():
            base = k.split(".", 3)[-1] if k.startswith("model.layers.") else k
            if base not in layer0:
                layer0[base] = (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
            t = layer0[base]
            state[k] = t if len(s) == 1 or gname in ("top", "0") else torch.roll(t, int(gname), dims=0)
        if gname == "top":
            layer0 = {}
        total += sum(int(np.prod(s)) for s in members.values())
        f = out / f"part-{gname}.safetensors"
        save_file(state, str(f))
        files.append(f)
        del state
    # the index transformers reads for a checkpoint in several files (what a 7B download has)
    weight_map = {k: f"part-{g}.safetensors" for g, members in groups.items() for k in members}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    c.save_pretrained(out)
    return total


EXTRA = ["method=affine", "block_size=32", "lm_head_bits=8", "eval_prompts=1", "eval_tokens=16", "prompt_tokens=64"]
VENV_BIN = Path(sys.executable).parent

CHILD = r"""
import json, sys, time
t0 = time.time()
from emrrg.export.cli import export_main
code = 0
try:
    export_main(sys.argv[1:])
except SystemExit as e:
    code = e.code or 0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": round(time.time() - t0, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
                  "peak_rss_mb": round(hwm), "exit": code}))
"""


def count_params(folder: Path) -> int:
    from emrrg.export.streamed_reference import f32_bytes

    return f32_bytes(sorted(folder.glob("*.safetensors"))) // 4


def save_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    from emrrg.assets import smollm2_gguf

    gguf = smollm2_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def run_shape(name: str, work: Path, keep: bool, reference: str = "auto") -> dict:
    llm, ck, bundle = work / f"llm-{name}", work / f"ckpt-{name}", work / f"bundle-{name}"
    for d in (ck, bundle):
        shutil.rmtree(d, ignore_errors=True)
    t = time.time()
    done = llm / "tokenizer.json"          # written last: a complete LLM folder from an earlier run (seed 0) is reused
    params = count_params(llm) if done.is_file() else write_random_checkpoint(name, llm)
    if not done.is_file():
        save_smollm2_tokenizer(llm)
    subprocess.run([str(VENV_BIN / "emrrg-init"), "-o", str(ck), "--decoder", "llama2-7b", "--decoder-path", str(llm)],
                   check=True, capture_output=True, text=True)
    prep_s = round(time.time() - t, 1)
    r = subprocess.run([sys.executable, "-c", CHILD, str(ck), "-o", str(bundle), "--llm-bits", "4", "--no-progress",
                        "--extra-options", *EXTRA, f"decoder_reference={reference}"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{name}: the export's child process died (exit {r.returncode}): {r.stderr[-2000:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row.update(params=params, bf16_mb=round(2 * params / 2**20), f32_mb=round(4 * params / 2**20), prepare_s=prep_s)
    if row["exit"]:
        row["error"] = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "no message"
    else:
        m = json.loads((bundle / "manifest.json").read_text())
        val = m["validation"]
        dec = val["decoder_4bit"]
        att = next(a for a in dec["attempts"] if a["name"] == dec["chosen"])
        row.update(bundle_mb=round(sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 2**20),
                   reference=val["decoder_reference"]["kind"], chosen=dec["chosen"], top1=att["top1"],
                   kl_mean=att["kl_mean"], passed=att["passed"], quantize_s=att["quantize_s"], eval_s=att["eval_s"])
    shutil.rmtree(ck, ignore_errors=True)
    if not keep:
        shutil.rmtree(llm, ignore_errors=True)
        shutil.rmtree(bundle, ignore_errors=True)
    return row


def memory_model(rows: dict, reference: str) -> dict | None:
    """peak RSS = a x parameters + b over the full-export rows with this reference (least squares); None below
    two rows."""
    import numpy as np

    ok = [r for r in rows.values() if r.get("reference") == reference]
    if len(ok) < 2:
        return None
    x = np.array([r["params"] for r in ok], float)
    y = np.array([r["peak_rss_mb"] * 2**20 for r in ok], float)
    a, b = np.polyfit(x, y, 1)
    return {"bytes_per_param": round(float(a), 3), "constant_mb": round(float(b) / 2**20), "rows": len(ok),
            "max_residual_mb": round(float(np.abs(a * x + b - y).max()) / 2**20)}


def write_results(out_dir: Path, rows: dict, build_only: dict, report: dict | None = None) -> None:
    out = {"machine": f"{cpu_name()} ({os.cpu_count()} cores)", "load_average": round(os.getloadavg()[0], 2),
           "extra_options": EXTRA, "full_export": rows,
           "memory_model": {ref: memory_model(rows, ref) for ref in ("f32", "streamed")},
           "decoder_build_only": build_only, "report": report}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "export_scale.json").write_text(json.dumps(out, indent=2) + "\n")
    md = ["# Export at scale: the full `emrrg-export --llm-bits 4` from bf16 safetensors", "",
          f"{out['machine']}, load average {out['load_average']} when written (the machine is shared); random Llama "
          "weights (bf16 safetensors), SmolLM2's tokenizer, base encoder; one child process per shape running the "
          "whole export (peak RSS = its VmHWM). `--extra-options " + " ".join(EXTRA) + "`: one pinned 4-bit "
          "candidate, scored on 1 prompt of 64 tokens + 16 reference tokens. Reference: `f32` = the f32 LLM in "
          "memory, `streamed` = f32 layer by layer from the safetensors (export/streamed_reference.py). Seconds: wall "
          "time on a machine shared with other jobs (load average 5 to 20 during these runs); CPU s: the child's "
          "user + system time. Top-1 / KL of random weights are not an accuracy figure (a random deep net amplifies "
          "the 4-bit rounding; real weights: decoder_graph_accuracy.md).", "",
          "| shape | parameters | bf16 file MB | f32 MB | reference | peak RSS MB | peak RSS / f32 | seconds | "
          "CPU s | bundle MB | top-1 / KL vs f32 |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        if "error" in r:
            md.append(f"| {name} | {r['params'] / 1e6:.0f}M | {r['bf16_mb']} | {r['f32_mb']} | - | {r['peak_rss_mb']} "
                      f"| - | {r['seconds']} | {r.get('cpu_s', '-')} | failed: {r['error']} | |")
            continue
        md.append(f"| {name} | {r['params'] / 1e6:.0f}M | {r['bf16_mb']} | {r['f32_mb']} | {r['reference']} | "
                  f"{r['peak_rss_mb']} | {r['peak_rss_mb'] / r['f32_mb']:.2f} | {r['seconds']} | {r.get('cpu_s', '-')} | {r['bundle_mb']} | "
                  f"{r['top1']:.2f} / {r['kl_mean']:.3g} |")
    for ref, mm in out["memory_model"].items():
        if mm:
            md += ["", f"Memory model, {ref} reference (least squares over its {mm['rows']} rows): peak RSS = "
                       f"{mm['bytes_per_param']} bytes per parameter + {mm['constant_mb']} MB (largest residual "
                       f"{mm['max_residual_mb']} MB)."]
    if report:
        t = report["run"]["timings_ms"]
        md += ["", f"A report from the {report['shape']} bundle on this machine: `{report['command']}`: "
                   f"{report['run']['tokens']} tokens in {t['total'] / 1000:.1f} s (encoder {t['encoder'] / 1000:.1f} s, "
                   f"prefill {t['prefill'] / 1000:.1f} s, decode {t['decode'] / 1000:.1f} s = "
                   f"{t['decode'] / max(report['run']['tokens'] - 1, 1) / 1000:.2f} s/token), peak RSS "
                   f"{report['run']['peak_rss_mb']:.0f} MB; wall times on the shared machine (the text is noise: random "
                   "weights)."]
    if build_only:
        md += ["", "Decoder build only (`decoder_builder.build_decoder` from the safetensors, earlier run):", "",
               "| shape | parameters | peak RSS MB | seconds | decoder MB |", "|---|---:|---:|---:|---:|"]
        md += [f"| {n} | {r['params'] / 1e6:.0f}M | {r['peak_rss_mb']} | {r['seconds']} | {r['bytes'] / 2**20:.0f} |"
               for n, r in build_only.items()]
    (out_dir / "export_scale.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["135m", "324m"], choices=list(SHAPES))
    p.add_argument("--work", type=Path, required=True, help="scratch folder (a 7B needs ~25 GB of disk)")
    p.add_argument("--keep", nargs="*", default=[], choices=list(SHAPES),
                   help="shapes whose LLM folder and bundle stay in --work (e.g. to run a report)")
    p.add_argument("--reference", default="auto", choices=("auto", "f32", "streamed"),
                   help="the export's decoder_reference (rows other than auto are keyed SHAPE/REFERENCE)")
    p.add_argument("--add-report", nargs=2, metavar=("SHAPE", "RUN_JSON"), default=None,
                   help="record `emrrg-run BUNDLE IMAGE --json` output (a file) as SHAPE's report and rewrite the results")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    f = a.out_dir / "export_scale.json"
    if a.add_report:
        old = json.loads(f.read_text())
        report = {"shape": a.add_report[0], "command": f"emrrg-run bundle-{a.add_report[0]} RG1_UNCR.dcm --beams 1 --max-new-tokens 20 "
                             "--min-new-tokens 20 --json", "run": json.loads(Path(a.add_report[1]).read_text())}
        write_results(a.out_dir, old["full_export"], old.get("decoder_build_only", {}), report)
        return
    a.work.mkdir(parents=True, exist_ok=True)
    for name in a.shapes:
        row = run_shape(name, a.work, name in a.keep, a.reference)
        key = name if a.reference == "auto" else f"{name}/{a.reference}"
        print(key, row, flush=True)
        # re-read right before writing: another invocation (another shape) may have written its row meanwhile
        old = json.loads(f.read_text()) if f.is_file() else {}
        rows = dict(old.get("full_export", {}), **{key: row})
        order = [k for n in SHAPES for k in (n, f"{n}/f32", f"{n}/streamed")]
        write_results(a.out_dir, {k: rows[k] for k in order if k in rows},
                      old.get("decoder_build_only", old.get("shapes", {})), old.get("report"))


if __name__ == "__main__":
    main()
