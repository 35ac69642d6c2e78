"""EMRRG: Mamba X-ray encoder -> projector -> Llama-family LLM (arXiv 2510.16776).

Module names follow the upstream checkpoint (`visual_encoder.*`, `llama_proj.*`, `layer_norm.*`,
`llama_model.*`) so its state dicts load without renaming.

Prompt (upstream, R2GenGPT-style), preceded by BOS:

    "Human: <Img>" + visual tokens + "</Img> Generate a comprehensive and detailed diagnosis report
    for this chest xray image. \\nAssistant:"
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from emrrg.config import EMRRGConfig, GenerationConfig
from emrrg.decoder import add_hybrid_layers, add_llm_lora, load_base_decoder
from emrrg.encoder import MambaXrayEncoder
from emrrg.findings import FindingTokens, slot_count
from emrrg.lora import merge_partial_lora

PROMPT_BEFORE = "Human: <Img>"
PROMPT_AFTER = "</Img> Generate a comprehensive and detailed diagnosis report for this chest xray image. \nAssistant:"


class EMRRG(nn.Module):
    def __init__(self, cfg: EMRRGConfig, llm: nn.Module | None = None, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = MambaXrayEncoder(cfg.encoder)
        if llm is None:
            llm, tokenizer = load_base_decoder(cfg.decoder)
        hidden = llm.config.hidden_size
        self.llama_proj = nn.Linear(cfg.encoder.d_model, hidden)
        self.layer_norm = nn.LayerNorm(hidden)
        # A plain list: the cross-attention modules live (and save) under llama_model's layers.
        self.hybrid = add_hybrid_layers(llm, cfg.decoder.hybrid_layers, cfg.decoder.hybrid_heads)
        if cfg.decoder.lora_rank:
            llm = add_llm_lora(llm, cfg.decoder)
        self.llama_model = llm
        self.tokenizer = tokenizer
        self._prompt_ids = None
        self.finding_prompt = (FindingTokens(cfg.finding_tokens, cfg.finding_slots, cfg.encoder.d_model, hidden)
                               if cfg.finding_tokens else None)

    def add_finding_tokens(self, names) -> None:
        """Give the model finding tokens (emrrg.findings) for `names`, their slots the LLM's embeddings of the
        names' words; the classifier head is zero (p = 0.5 everywhere) until fitted."""
        self.cfg.finding_tokens = tuple(names)
        self.cfg.finding_slots = slot_count(self.tokenizer, names)
        self.finding_prompt = FindingTokens(self.cfg.finding_tokens, self.cfg.finding_slots, self.cfg.encoder.d_model,
                                            self.llama_proj.out_features)
        self.finding_prompt.init_from_embeddings(self.tokenizer, self.llama_model.get_input_embeddings())

    # ---- vision side -------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, finding_gates: torch.Tensor | None = None) -> torch.Tensor:
        """(b, V, 3, H, W) views -> (b, L, H_llm) projected visual tokens (views averaged), then the finding
        tokens when the model has them ((b, L + K * finding_slots, H_llm); `finding_gates` replace the classifier's
        p)."""
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        tokens = self.visual_encoder.encode_study(pixel_values)              # (b, L, D)
        return visual_tokens(tokens, lambda t: self.layer_norm(self.llama_proj(t)), self.finding_prompt, finding_gates)

    def set_visual(self, visual: torch.Tensor | None) -> None:
        """Compute the hybrid layers' visual K/V once per image (None clears them)."""
        for xattn in self.hybrid:
            xattn.visual_kv = None if visual is None else xattn.compute_kv(visual)

    # ---- prompt --------------------------------------------------------------------------------
    def prompt_ids(self) -> tuple[list[int], list[int]]:
        """Token ids before and after the visual tokens; BOS leads the first list."""
        if self._prompt_ids is None:
            tok = self.tokenizer
            before = [tok.bos_token_id] + tok(PROMPT_BEFORE, add_special_tokens=False)["input_ids"]
            after = tok(PROMPT_AFTER, add_special_tokens=False)["input_ids"]
            self._prompt_ids = (before, after)
        return self._prompt_ids

    def prompt_embeds(self, visual: torch.Tensor) -> torch.Tensor:
        """(b, L, H) visual tokens -> (b, T, H) prompt embeddings with the visual tokens spliced in."""
        before, after = self.prompt_ids()
        emb = self.llama_model.get_input_embeddings()
        b = visual.shape[0]
        dev = visual.device
        e_before = emb(torch.tensor(before, device=dev)).unsqueeze(0).expand(b, -1, -1)
        e_after = emb(torch.tensor(after, device=dev)).unsqueeze(0).expand(b, -1, -1)
        return torch.cat([e_before, visual.to(e_before.dtype), e_after], dim=1)

    # ---- adapters --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge_adapters(self) -> dict[str, int]:
        """Fold Partial LoRA into in_proj and the LLM's peft LoRA into its weights."""
        n_enc = merge_partial_lora(self.visual_encoder)
        n_llm = 0
        if hasattr(self.llama_model, "merge_and_unload"):
            n_llm = sum(1 for n, _ in self.llama_model.named_modules() if n.endswith("lora_A"))
            self.llama_model = self.llama_model.merge_and_unload()
        return {"encoder_partial_lora": n_enc, "llm_lora": n_llm}

    # ---- generation ------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence) -> torch.Tensor:
        """Image paths / arrays of ONE study (its views) -> (1, V, 3, S, S) through the shared preprocessing."""
        from emrrg.runtime.preprocess import preprocess_study

        views = preprocess_study(list(images), size=self.cfg.encoder.img_size)  # (V, 3, S, S) numpy
        return torch.from_numpy(np.ascontiguousarray(views)).unsqueeze(0)

    @torch.no_grad()
    def generate_ids(self, pixel_values: torch.Tensor, gen: GenerationConfig | None = None, **overrides) -> torch.Tensor:
        gen = gen or self.cfg.generation
        visual = self.encode_images(pixel_values)
        self.set_visual(visual)
        try:
            embeds = self.prompt_embeds(visual)
            tok = self.tokenizer
            kwargs = dict(
                num_beams=gen.num_beams, do_sample=False, repetition_penalty=gen.repetition_penalty,
                length_penalty=gen.length_penalty, min_new_tokens=gen.min_new_tokens,
                max_new_tokens=gen.max_new_tokens, no_repeat_ngram_size=gen.no_repeat_ngram_size,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
            kwargs.update(overrides)
            attn = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            return self.llama_model.generate(inputs_embeds=embeds, attention_mask=attn, **kwargs)
        finally:
            self.set_visual(None)

    def decode(self, ids: Sequence[int]) -> str:
        return decode_report(self.tokenizer, ids)

    @torch.no_grad()
    def generate(self, images: Sequence, gen: GenerationConfig | None = None, **overrides) -> str:
        """Report for one study (one or several views, as paths or arrays)."""
        ids = self.generate_ids(self.pixel_values(images), gen, **overrides)
        return self.decode(ids[0].tolist())


def visual_tokens(tokens: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
                  findings: nn.Module | None = None, gates: torch.Tensor | None = None) -> torch.Tensor:
    """The encoder's (b, L, D) tokens -> the LLM's visual inputs: `project`ed (linear, then norm), then the finding
    tokens (if any). EMRRG.encode_images and the exported graph (export.encoder_onnx.VisualTokens) both use it."""
    visual = project(tokens)                                                 # (b, L, H)
    if findings is None:
        return visual
    return torch.cat([visual, findings(tokens, gates).to(visual.dtype)], dim=1)


def decode_report(tokenizer, ids: Sequence[int]) -> str:
    """Upstream decoding clean-up: drop a leading BOS/UNK, cut at EOS, remove <unk>, strip."""
    ids = list(ids)
    while ids and ids[0] in (tokenizer.bos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id):
        ids = ids[1:]
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if tokenizer.unk_token:
        text = text.replace(tokenizer.unk_token, "")
    return text.strip()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
