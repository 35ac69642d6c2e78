"""The f32 reference for LLMs too large to hold in f32: the Llama forward streamed layer by layer from safetensors.

`emrrg-export --llm-bits 4` scores each 4-bit candidate against an f32 reference (export/decoder_eval.py). For
SmolLM2 that reference is the whole LlamaForCausalLM in f32; the paper's 7B would be 28 GB of f32 weights on a
24 GB machine. `StreamedLlama` computes the same thing holding one decoder layer's f32 weights at a time:

* the weights are read tensor by tensor from the checkpoint's safetensors (decoder_builder.SafetensorsWeights:
  a plain read at the tensor's offset, bf16 widened to f32 exactly), one layer at a time (~0.8 GB for 7B);
* all scoring prompts advance together (one batch), so a reference of n_new greedy tokens costs n_new passes
  over the weights: a prefill, then one step per token with a per-layer KV cache;
* the arithmetic is transformers' own (one LlamaDecoderLayer whose weights are swapped per layer, its rotary
  embedding and RMSNorm, a DynamicCache), in f32; tests/export/test_streamed_reference.py holds it to
  LlamaForCausalLM within STREAMED_MAX_ABS.

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


class StreamedLlama:
    """A Llama decoder's f32 forward with one layer's weights in memory at a time (see the module docstring).

    The arithmetic is transformers' own: one LlamaDecoderLayer whose weights are swapped in per layer (built on the
    meta device, so no weights are allocated beside the streamed ones), its rotary embedding and final RMSNorm, and
    a DynamicCache that holds every layer's K/V."""

    def __init__(self, files: Sequence[str | Path], config):
        import copy

        import torch
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

        from emrrg.export.decoder_builder import LlamaShape, SafetensorsWeights

        self.src = SafetensorsWeights(files)
        self.shape = LlamaShape.from_config(config)         # refuses what the builder does not write either
        s = self.shape
        cfg = copy.deepcopy(config)
        cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
        self.layer_keys = list(self.layer.state_dict())
        self.rotary = LlamaRotaryEmbedding(cfg)
        self.norm = LlamaRMSNorm(s.hidden, eps=s.rms_eps)
        self.norm.load_state_dict({"weight": self._w(s.prefix + "norm.weight")})
        self.embed = self._w(s.prefix + "embed_tokens.weight")
        self.head = "lm_head.weight" if self.src.has("lm_head.weight") and not s.tie_embeddings else \
            s.prefix + "embed_tokens.weight"

    def _w(self, name: str):
        import torch

        return torch.from_numpy(self.src.get(name))

    def _load_layer(self, i: int):
        L = f"{self.shape.prefix}layers.{i}."
        self.layer.load_state_dict({k: self._w(L + k) for k in self.layer_keys}, assign=True)
        self.layer.self_attn.layer_idx = i                  # where the shared DynamicCache keeps this layer's K/V
        return L

    def forward(self, ids, cache, start: int, all_positions: bool = False, stats: dict | None = None):
        """ids (B, T) at positions start..start+T-1 -> logits (B, V) of the last position ((B, T, V) with
        all_positions). cache: a transformers DynamicCache, extended in place. stats: name -> [sum x^2, n] of every
        weight matmul's input, in the builder's names (for activation-weighted refits)."""
        import torch

        from emrrg.export.quantize_decoder import LM_HEAD

        B, T = ids.shape
        total = start + T

        def note(name, x):
            if stats is not None:
                x2 = x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
                acc = stats.setdefault(name, [0.0, 0])
                acc[0], acc[1] = acc[0] + x2, acc[1] + x.shape[0] * x.shape[1]

        pos = torch.arange(start, total)[None].expand(B, T)
        x = self.embed[ids]
        rope = self.rotary(x, pos)
        allowed = (torch.arange(total)[None, :] <= pos[0][:, None])[None, None].expand(B, 1, T, total)  # causal
        hooks, current = [], {}
        if stats is not None:                                # the inputs of the matmuls, named as the builder does
            for sub, name in (("self_attn.q_proj", "self_attn.qkv_proj"), ("self_attn.o_proj", "self_attn.o_proj"),
                              ("mlp.gate_proj", "mlp.gate_up_proj"), ("mlp.down_proj", "mlp.down_proj")):
                hooks.append(self.layer.get_submodule(sub).register_forward_pre_hook(
                    lambda _m, args, name=name: note(current["L"] + name, args[0])))
        try:
            for i in range(self.shape.layers):
                current["L"] = self._load_layer(i)
                out = self.layer(x, attention_mask=allowed, position_ids=pos, cache=cache, use_cache=True,
                                 position_embeddings=rope)
                x = out[0] if isinstance(out, tuple) else out
        finally:
            for h in hooks:
                h.remove()
        x = self.norm(x if all_positions else x[:, -1:])
        note(LM_HEAD, x)
        logits = x @ self._w(self.head).T
        return logits if all_positions else logits[:, -1]

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """(T, V) for one sequence in one pass (decoder_eval.Scorer)."""
        import torch

        with torch.no_grad():
            return self.forward(torch.tensor([list(ids)]), self.new_cache(), 0, all_positions=True)[0].numpy()

    def reference(self, prompts: Sequence[Sequence[int]], n_new: int):
        """decoder_eval.Reference: greedy continuations of n_new tokens and the logits that predict them, all
        prompts of one length in one batch (n_new passes over the weights per length)."""
        import torch

        from emrrg.export.decoder_eval import Reference

        conts: list = [None] * len(prompts)
        logits: list = [None] * len(prompts)
        for length in sorted({len(p) for p in prompts}):
            idx = [i for i, p in enumerate(prompts) if len(p) == length]
            cache = self.new_cache()
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
                self.forward(batch, self.new_cache(), 0, all_positions=True, stats=stats)
        return {k: (v[0] / max(v[1], 1)).float().numpy() for k, v in stats.items()}
