"""Shared fixtures: a tiny checkpoint and its f32 bundle, built once per test session (tests make their own models)."""
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny encoder with Partial LoRA + tiny-llama with peft LoRA and one hybrid layer; adapters non-zero."""
    from emrrg.checkpoint import save_checkpoint
    from emrrg.config import make_config
    from emrrg.model import EMRRG

    torch.manual_seed(0)
    cfg = make_config("tiny", "tiny-llama", "iu", encoder_overrides=dict(lora_rank=4),
                      decoder_overrides=dict(lora_rank=4, hybrid_layers=(1,)))
    model = EMRRG(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name or "cross_attn" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    """f32 bundle (encoder both variants, f32 decoder) of the tiny checkpoint, calibrated on 5 real X-rays."""
    from emrrg.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    export_bundle(tiny_checkpoint, out, ExportOptions(llm_bits=32, max_calib=5), progress=False)
    return out
