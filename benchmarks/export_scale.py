"""Export at scale, decoder part: peak RSS, time and size of building the 4-bit decoder from bf16 safetensors.

For each Llama shape (random weights, written here as bf16 safetensors tensor by tensor, SmolLM2's
vocabulary size), one child process runs `decoder_builder.build_decoder` straight from the file
(SafetensorsWeights: one tensor read at a time, quantized as it is appended to decoder.onnx.data) with the
affine block-32 encoding and an 8-bit lm_head, and reports its peak RSS (VmHWM), wall time and output bytes.
This is the part of `emrrg-export --llm-bits 4` that grows with the decoder; the full export also holds the
f32 model for validation and scores the 4-bit candidates (not measured here).

    .venv/bin/python benchmarks/export_scale.py --shapes 135m 324m

Writes benchmarks/results/export_scale.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
    for gname, members in groups.items():
        state = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
                 for k, s in members.items()}
        total += sum(int(np.prod(s)) for s in members.values())
        f = out / f"part-{gname}.safetensors"
        save_file(state, str(f))
        files.append(f)
        del state
    c.save_pretrained(out)
    return total


CHILD = r"""
import json, sys, time
from pathlib import Path
t0 = time.time()
from transformers import AutoConfig
from emrrg.export.decoder_builder import LlamaShape, SafetensorsWeights, build_decoder
from emrrg.export.quantize_decoder import QuantConfig
src_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
src = SafetensorsWeights(sorted(src_dir.glob("*.safetensors")))
res = build_decoder(src, LlamaShape.from_config(AutoConfig.from_pretrained(src_dir)), out, quant=QuantConfig("affine-b32-lm8"))
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": round(time.time() - t0, 1), "peak_rss_mb": round(hwm), "bytes": res.bytes,
                  "nodes": res.node_count}))
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["135m", "324m"], choices=list(SHAPES))
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        for name in a.shapes:
            ck = Path(tmp) / f"ckpt-{name}"
            params = write_random_checkpoint(name, ck)
            r = subprocess.run([sys.executable, "-c", CHILD, str(ck), str(Path(tmp) / f"out-{name}")], check=True,
                               capture_output=True, text=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            row.update(params=params, bf16_mb=round(2 * params / 2**20), f32_mb=round(4 * params / 2**20))
            rows[name] = row
            print(name, row, flush=True)
            shutil.rmtree(ck)
            shutil.rmtree(Path(tmp) / f"out-{name}")
    out = {"machine": f"{cpu_name()} ({os.cpu_count()} cores)", "load_average": round(os.getloadavg()[0], 2),
           "encoding": "affine-b32-lm8", "shapes": rows}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "export_scale.json").write_text(json.dumps(out, indent=2) + "\n")
    md = ["# Export at scale: the 4-bit decoder built from bf16 safetensors", "",
          f"{out['machine']}, load average {out['load_average']}; random Llama weights, affine 4-bit block 32, 8-bit "
          "lm_head; one child process per shape (peak RSS = its VmHWM, Python + torch + onnx included). Decoder "
          "build only: the full emrrg-export also holds the f32 model and scores the 4-bit candidates.", "",
          "| shape | parameters | bf16 file MB | f32 MB | peak RSS MB | peak RSS / f32 | seconds | decoder MB | nodes |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['params'] / 1e6:.0f}M | {r['bf16_mb']} | {r['f32_mb']} | {r['peak_rss_mb']} | "
                  f"{r['peak_rss_mb'] / r['f32_mb']:.2f} | {r['seconds']} | {r['bytes'] / 2**20:.0f} | {r['nodes']} |")
    (a.out_dir / "export_scale.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
