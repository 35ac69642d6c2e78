"""Checkpoints: our directory format, and import of the upstream files.

Our format (written atomically: a temporary sibling, then a rename):

    DIR/config.json              EMRRGConfig + {"format": "emrrg-checkpoint", "format_version": 1}
    DIR/model.safetensors        visual_encoder.* (no adapters), llama_proj.*, layer_norm.*
    DIR/hybrid.safetensors       layers.{i}.cross_attn.*          (hybrid decoder layers only)
    DIR/encoder_adapter/         peft-style Partial LoRA / lora_X  (when the encoder has adapters)
    DIR/decoder_adapter/         peft LoRA (save_pretrained)       (when the LLM has LoRA)
    DIR/decoder/                 base LLM weights + config          (source "random" only; SmolLM2 comes
                                                                     from its package, Llama from --decoder-path)
    DIR/tokenizer/               tokenizer.json & co.

Upstream files are read with torch.load(weights_only=True): no pickled code ever runs. A key that is
missing, unexpected or mis-shaped stops the import with a short table.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from emrrg.config import DECODER_PRESETS, EMRRGConfig, EncoderConfig, UnknownPresetError, decoder_config, generation_config
from emrrg.decoder import decoder_layers
from emrrg.lora import load_encoder_adapter, save_encoder_adapter
from emrrg.model import EMRRG

FORMAT = "emrrg-checkpoint"
FORMAT_VERSION = 1
NON_LLM_PREFIXES = ("visual_encoder.", "llama_proj.", "layer_norm.", "finding_prompt.")


class CheckpointError(ValueError):
    """A file that is not a checkpoint we can read, or whose keys do not fit the model."""


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; rename it to `out` only if the block succeeds."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another output or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_adapter_key(k: str) -> bool:
    return ".in_proj_lora." in k or ".lora_X." in k


def _non_llm_state(model: EMRRG) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()
            if k.startswith(NON_LLM_PREFIXES) and not _is_adapter_key(k)}


def _hybrid_state(model: EMRRG) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in enumerate(decoder_layers(model.llama_model)):
        if hasattr(layer, "cross_attn"):
            out.update({f"layers.{i}.cross_attn.{k}": v.detach().contiguous() for k, v in layer.cross_attn.state_dict().items()})
    return out


def save_checkpoint(model: EMRRG, out: str | Path) -> Path:
    from safetensors.torch import save_file

    cfg = model.cfg
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **cfg.to_dict()}, indent=2))
        save_file(_non_llm_state(model), str(tmp / "model.safetensors"))
        if cfg.decoder.hybrid_layers:
            save_file(_hybrid_state(model), str(tmp / "hybrid.safetensors"))
        if cfg.encoder.lora_rank or cfg.encoder.lora_x_rank:
            save_encoder_adapter(model.visual_encoder, tmp / "encoder_adapter", cfg.encoder.lora_rank,
                                 cfg.encoder.lora_alpha, cfg.encoder.lora_x_rank)
        llm = model.llama_model
        if hasattr(llm, "peft_config"):
            llm.save_pretrained(tmp / "decoder_adapter")
        if cfg.decoder.source == "random":
            base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
            state = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()
                     if "lora_" not in k and ".cross_attn." not in k}
            if base.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            (tmp / "decoder").mkdir()
            save_file({k.replace(".base_layer.", "."): v for k, v in state.items()}, str(tmp / "decoder" / "model.safetensors"))
        model.tokenizer.save_pretrained(tmp / "tokenizer")
    return Path(out)


def read_config(ckpt: str | Path) -> EMRRGConfig:
    ckpt = Path(ckpt)
    f = ckpt / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{ckpt} is not an emrrg checkpoint directory (no config.json); "
                              "convert upstream files with emrrg-import")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
    if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{f}: format {d.get('format')!r} v{d.get('format_version')} is not "
                              f"{FORMAT!r} v{FORMAT_VERSION}")
    cfg = EMRRGConfig.from_dict(d)
    if cfg.decoder.preset not in DECODER_PRESETS:
        raise UnknownPresetError(f"{f}: unknown decoder preset {cfg.decoder.preset!r}; this emrrg knows "
                                 f"{', '.join(DECODER_PRESETS)}")
    return cfg


def load_checkpoint(ckpt: str | Path, llm_weights: bool = True) -> EMRRG:
    """Rebuild the model (adapters unmerged) from a checkpoint directory. llm_weights=False (decoder sources
    random and path, no LLM LoRA, no hybrid layers): the LLM stays on the meta device, for an export that
    streams its weights from the safetensors (export/streamed_reference.py)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    ckpt = Path(ckpt)
    cfg = read_config(ckpt)
    llm = tok = None
    if not llm_weights:
        from emrrg.decoder import load_base_decoder

        if cfg.decoder.lora_rank or cfg.decoder.hybrid_layers or cfg.decoder.source not in ("random", "path"):
            raise CheckpointError("only a plain random or --decoder-path LLM (no LLM LoRA, no hybrid layers) can be "
                                  "loaded without its weights")
        llm, tok = load_base_decoder(cfg.decoder, weights=False)
        if cfg.decoder.source == "random":
            tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    elif cfg.decoder.source == "random":
        llm = LlamaForCausalLM(LlamaConfig(**cfg.decoder.llama)).float()
        _load_strict(llm, load_file(str(ckpt / "decoder" / "model.safetensors")), "decoder", allow_missing=("lm_head.weight",)
                     if llm.config.tie_word_embeddings else ())
        tok = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    model = EMRRG(cfg, llm, tok)
    _load_strict(model, load_file(str(ckpt / "model.safetensors")), "model",
                 only=lambda k: k.startswith(NON_LLM_PREFIXES) and not _is_adapter_key(k))
    if cfg.decoder.hybrid_layers:
        layers = decoder_layers(model.llama_model)
        state = {k.removeprefix("layers."): v for k, v in load_file(str(ckpt / "hybrid.safetensors")).items()}
        _load_strict(layers, state, "hybrid", only=lambda k: ".cross_attn." in k)
    if cfg.encoder.lora_rank or cfg.encoder.lora_x_rank:
        load_encoder_adapter(model.visual_encoder, ckpt / "encoder_adapter")
    if cfg.decoder.lora_rank:
        from peft.utils import set_peft_model_state_dict
        res = set_peft_model_state_dict(model.llama_model, load_file(str(ckpt / "decoder_adapter" / "adapter_model.safetensors")))
        if res.unexpected_keys:
            raise CheckpointError(f"decoder adapter has unexpected keys: {res.unexpected_keys[:5]}")
    return model.eval()


def _load_strict(module, state: dict, what: str, only=None, allow_missing=()) -> None:
    own = {k: v for k, v in module.state_dict().items() if only is None or only(k)}
    problems = []
    for k in own.keys() - state.keys():
        if k not in allow_missing:
            problems.append((k, tuple(own[k].shape), "missing"))
    for k in state.keys() - own.keys():
        problems.append((k, "-", f"unexpected {tuple(state[k].shape)}"))
    for k in own.keys() & state.keys():
        if own[k].shape != state[k].shape:
            problems.append((k, tuple(own[k].shape), f"shape {tuple(state[k].shape)}"))
    if problems:
        raise CheckpointError(mismatch_table(what, problems))
    module.load_state_dict(state, strict=False)


def mismatch_table(what: str, problems: list[tuple], limit: int = 12) -> str:
    rows = [f"{what}: {len(problems)} key(s) do not match the model", f"  {'key':<60} {'expected':<20} found"]
    for k, exp, found in sorted(problems, key=lambda p: p[0])[:limit]:
        rows.append(f"  {k:<60} {str(exp):<20} {found}")
    if len(problems) > limit:
        rows.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(rows)


# ---- upstream import ---------------------------------------------------------------------------

def torch_load_weights(path: str | Path) -> dict:
    """torch.load(weights_only=True) with a clear error for anything that is not a weights file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, unsafe globals: all mean "not a weights file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a PyTorch weights file we can read safely: {first[:200]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict ({{'model': {{...}}}} or a flat dict of tensors)")
    return obj


def infer_encoder_config(state: dict[str, torch.Tensor], prefix: str = "visual_encoder.") -> EncoderConfig:
    """Read the encoder geometry off an upstream state dict (width, depth, tokens, adapters)."""
    try:
        w = state[prefix + "patch_embed.proj.weight"]               # (D, 3, p, p)
        pos = state[prefix + "pos_embed"]                           # (1, L, D)
    except KeyError as e:
        raise CheckpointError(f"no {e.args[0]!r}: not a MambaXray-VL encoder state dict") from None
    d, chans, p = w.shape[0], w.shape[1], w.shape[2]
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", k)))
    a = state[prefix + "layers.0.mixer.A_log"]
    down = state.get(prefix + "layers.0.mixer.lora_X.adapter_down.weight")
    lora = state.get(prefix + "layers.0.mixer.in_proj_lora.lora_A.weight")
    return EncoderConfig(img_size=grid * p, patch_size=p, in_chans=chans, d_model=d, depth=depth, d_state=a.shape[1],
                         lora_x_rank=0 if down is None else down.shape[0], lora_rank=0 if lora is None else lora.shape[0])


def import_upstream(encoder_pth: str | Path, out: str | Path, decoder: str = "smollm2-135m",
                    decoder_path: str | None = None, emrrg_pth: str | Path | None = None,
                    dataset: str = "mimic", llm_lora_rank: int = 0) -> Path:
    """MambaXrayCLIP-*.pth (+ an EMRRG trainable-params .pth) (+ a local HF Llama) -> our checkpoint."""
    enc_state = torch_load_weights(encoder_pth)
    extra = torch_load_weights(emrrg_pth) if emrrg_pth else {}
    probe = {**enc_state, **{k: v for k, v in extra.items() if k.startswith("visual_encoder.")}}
    enc_cfg = infer_encoder_config(probe)
    dec_over = {"path": decoder_path} if decoder_path else {}
    llm_lora = [k for k in extra if ".lora_A." in k and k.startswith("llama_model.")]
    if llm_lora:
        dec_over["lora_rank"] = extra[llm_lora[0]].shape[0]
    elif llm_lora_rank:
        dec_over["lora_rank"] = llm_lora_rank
    cfg = EMRRGConfig(encoder=enc_cfg, decoder=decoder_config(decoder, **dec_over),
                      generation=generation_config(dataset), encoder_preset="imported", dataset=dataset)
    model = EMRRG(cfg)
    own = model.state_dict()
    # 1. The pre-trained encoder: every visual_encoder.* weight (adapters excepted) must be there.
    enc_keys = {k: v for k, v in enc_state.items() if k.startswith("visual_encoder.")}
    if not enc_keys:
        raise CheckpointError(f"{encoder_pth} has no 'visual_encoder.*' keys")
    _load_strict(model.visual_encoder, {k.removeprefix("visual_encoder."): v for k, v in enc_keys.items()},
                 f"{Path(encoder_pth).name} (visual_encoder.*)", only=lambda k: not _is_adapter_key(k))
    # 2. The EMRRG trainable parameters over that base: every key must exist with the same shape.
    if extra:
        problems = [(k, "-", f"unexpected {tuple(v.shape)}") for k, v in extra.items() if k not in own]
        problems += [(k, tuple(own[k].shape), f"shape {tuple(v.shape)}") for k, v in extra.items()
                     if k in own and own[k].shape != v.shape]
        if problems:
            raise CheckpointError(mismatch_table(Path(emrrg_pth).name, problems))
        model.load_state_dict(extra, strict=False)
    return save_checkpoint(model, out)
