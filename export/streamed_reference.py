"""The f32 reference for LLMs too large to hold in f32: the Llama forward streamed layer by layer from safetensors.

`emrrg-export --llm-bits 4` scores each 4-bit candidate against an f32 reference (export/decoder_eval.py). For
SmolLM2 that reference is the whole LlamaForCausalLM in f32; the paper's 7B would be 28 GB of f32 weights on a
24 GB machine. `StreamedLlama` computes the same thing holding one decoder layer's f32 weights at a time:

* the weights are read tensor by tensor from the checkpoint's safetensors (decoder_builder.SafetensorsWeights:
  a plain read at the tensor's offset, bf16 widened to f32 exactly), one layer at a time (~0.8 GB for 7B);
* all scoring prompts advance together (one batch), so a reference of n_new greedy tokens costs n_new passes
  over the weights: a prefill, then one step per token with a per-layer KV cache;
* the arithmetic is the transformers Llama forward in f32 (RMSNorm, plain RoPE, grouped-query attention, SiLU
  MLP); tests/export/test_streamed_reference.py holds it to LlamaForCausalLM within STREAMED_MAX_ABS.

The logits of the scored positions come from the cached steps, not from a second teacher-forced pass: the
same numbers up to f32 summation order.

`decoder_reference` (an --extra-options key) picks the reference: auto = f32 in memory while the LLM's f32
weights are at most F32_REFERENCE_MAX_BYTES, streamed above; f32 / streamed force one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from emrrg.export.errors import ExportError

# The in-memory f32 reference holds the f32 LLM, an f32 decoder ONNX and its ORT session at once, plus the
# candidates' sessions: ~6x the f32 weights at peak (a 324M Llama peaked at 8.1 GB). 2 GiB of f32 weights keeps
# that inside the 12 GB an export may use on a shared 24 GB workstation; larger LLMs stream.
F32_REFERENCE_MAX_BYTES = 2 * 2**30
REFERENCES = ("auto", "f32", "streamed")


def llm_weight_files(ckpt: str | Path, cfg) -> list[Path]:
    """The safetensors holding the checkpoint's LLM weights: DIR/decoder/ (source random) or the --decoder-path
    folder (source path); [] for a source whose weights are not safetensors on disk (SmolLM2's GGUF)."""
    d = Path(ckpt) / "decoder" if cfg.decoder.source == "random" else (
        Path(cfg.decoder.path) if cfg.decoder.source == "path" and cfg.decoder.path else None)
    return sorted(d.glob("*.safetensors")) if d is not None and d.is_dir() else []


def f32_bytes(files: Sequence[Path]) -> int:
    """Bytes the LLM's weights take in f32 (from the safetensors headers; nothing is read)."""
    from safetensors import safe_open

    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            n += sum(int(np.prod(h.get_slice(k).get_shape())) for k in h.keys())
    return 4 * n


def choose_reference(ckpt: str | Path, cfg, requested: str) -> tuple[str, str]:
    """("f32" | "streamed", why) for this checkpoint and the decoder_reference option."""
    files = llm_weight_files(ckpt, cfg)
    size = f32_bytes(files) if files else 0
    fits = f"{size / 2**30:.1f} GiB of f32 weights" if files else "weights not in safetensors"
    blockers = [w for w, on in (("LLM LoRA adapters", cfg.decoder.lora_rank), ("hybrid cross-attention layers",
                                cfg.decoder.hybrid_layers), ("no safetensors weights", not files)) if on]
    if requested == "f32" or (requested == "auto" and (size <= F32_REFERENCE_MAX_BYTES or blockers)):
        return "f32", f"f32 LLM in memory ({fits})"
    if blockers:
        raise ExportError(f"decoder_reference=streamed does not support {', '.join(blockers)}; use "
                          "--extra-options decoder_reference=f32 (the whole f32 LLM in memory)")
    return "streamed", (f"f32 streamed layer by layer from safetensors ({fits}, above the "
                        f"{F32_REFERENCE_MAX_BYTES / 2**30:g} GiB held in memory)" if requested == "auto" else
                        f"f32 streamed layer by layer from safetensors ({fits}, decoder_reference=streamed)")


def _rotate_half(x):
    import torch

    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class StreamedLlama:
    """A Llama decoder's f32 forward with one layer's weights in memory at a time (see the module docstring)."""

    def __init__(self, files: Sequence[str | Path], config):
        import torch

        from emrrg.export.decoder_builder import LlamaShape, SafetensorsWeights

        self.src = SafetensorsWeights(files)
        self.shape = LlamaShape.from_config(config)         # refuses what the builder does not write either
        s = self.shape
        self.embed = torch.from_numpy(self.src.get(s.prefix + "embed_tokens.weight"))
        self.head = "lm_head.weight" if self.src.has("lm_head.weight") and not s.tie_embeddings else \
            s.prefix + "embed_tokens.weight"
        self.inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.int64).float() / s.head_dim))

    def _w(self, name: str):
        import torch

        return torch.from_numpy(self.src.get(name))

    def _norm(self, x, w):
        import torch

        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.shape.rms_eps))

    def forward(self, ids, cache: list, start: int, all_positions: bool = False, stats: dict | None = None):
        """ids (B, T) at positions start..start+T-1 -> logits (B, V) of the last position ((B, T, V) with
        all_positions). cache: one [k, v] (or None) per layer, extended in place. stats: name -> [sum x^2, n]
        of every weight matmul's input, in the builder's names (for activation-weighted refits)."""
        import torch
        import torch.nn.functional as F

        s = self.shape
        B, T = ids.shape
        P = s.prefix

        def note(name, x):
            if stats is not None:
                x2 = x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
                acc = stats.setdefault(name, [0.0, 0])
                acc[0], acc[1] = acc[0] + x2, acc[1] + x.shape[0] * x.shape[1]

        pos = torch.arange(start, start + T, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        total = start + T
        allowed = torch.arange(total)[None, :] <= (start + torch.arange(T))[:, None]     # causal, with the cache
        x = self.embed[ids]
        for i in range(s.layers):
            L = f"{P}layers.{i}."
            h = self._norm(x, self._w(L + "input_layernorm.weight"))
            note(L + "self_attn.qkv_proj", h)
            q = (h @ self._w(L + "self_attn.q_proj.weight").T).view(B, T, s.heads, s.head_dim).transpose(1, 2)
            k = (h @ self._w(L + "self_attn.k_proj.weight").T).view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
            v = (h @ self._w(L + "self_attn.v_proj.weight").T).view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            if cache[i] is not None:
                k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
            cache[i] = [k, v]
            rep = s.heads // s.kv_heads
            a = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1),
                                               attn_mask=allowed, scale=s.head_dim ** -0.5)
            a = a.transpose(1, 2).reshape(B, T, s.heads * s.head_dim)
            note(L + "self_attn.o_proj", a)
            x = x + a @ self._w(L + "self_attn.o_proj.weight").T
            h = self._norm(x, self._w(L + "post_attention_layernorm.weight"))
            note(L + "mlp.gate_up_proj", h)
            act = F.silu(h @ self._w(L + "mlp.gate_proj.weight").T) * (h @ self._w(L + "mlp.up_proj.weight").T)
            note(L + "mlp.down_proj", act)
            x = x + act @ self._w(L + "mlp.down_proj.weight").T
        x = self._norm(x if all_positions else x[:, -1:], self._w(P + "norm.weight"))
        from emrrg.export.quantize_decoder import LM_HEAD
        note(LM_HEAD, x)
        logits = x @ self._w(self.head).T
        return logits if all_positions else logits[:, -1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """(T, V) for one sequence in one pass (decoder_eval.Scorer)."""
        import torch

        with torch.no_grad():
            return self.forward(torch.tensor([list(ids)]), [None] * self.shape.layers, 0, all_positions=True)[0].numpy()

    def reference(self, prompts: Sequence[Sequence[int]], n_new: int):
        """decoder_eval.Reference: greedy continuations of n_new tokens and the logits that predict them, all
        prompts of one length in one batch (n_new passes over the weights per length)."""
        import torch

        from emrrg.export.decoder_eval import Reference

        conts: list = [None] * len(prompts)
        logits: list = [None] * len(prompts)
        for length in sorted({len(p) for p in prompts}):
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            cache: list = [None] * self.shape.layers
            x, rows, toks = torch.tensor([list(prompts[i]) for i in idx]), [], []
            with torch.no_grad():
                for step in range(n_new):
                    out = self.forward(x, cache, 0 if step == 0 else length + step - 1)
                    rows.append(out.numpy().astype(np.float32))
                    x = out.argmax(-1, keepdim=True)
                    toks.append(x[:, 0].tolist())
            for j, i in enumerate(idx):
                conts[i] = [int(t[j]) for t in toks]
                logits[i] = np.ascontiguousarray(np.stack([r[j] for r in rows]))
        return Reference(prompts=[list(p) for p in prompts], continuations=conts, logits=logits, n_new=n_new)

    def activation_stats(self, prompts: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """E[x^2] per input channel of every weight matmul over all tokens of `prompts` (what
        quantize_decoder.collect_activation_stats gives for an f32 built graph), one pass per prompt length."""
        import torch

        stats: dict = {}
        with torch.no_grad():
            for length in sorted({len(p) for p in prompts}):
                batch = torch.tensor([list(p) for p in prompts if len(p) == length])
                self.forward(batch, [None] * self.shape.layers, 0, all_positions=True, stats=stats)
        return {k: (v[0] / max(v[1], 1)).float().numpy() for k, v in stats.items()}
