"""Adapters: Partial LoRA merge, lora_X, peft LoRA merge on the LLM, and the hybrid layers' zero gate.

MERGE tolerance: merging replaces W x + s·B(A x) by (W + s·BA) x. In f32 the two differ by the
rounding of one extra matmul accumulation per layer (~1e-7 relative), which the encoder's depth and
LayerNorms can amplify by a few orders of magnitude but no more: RTOL/ATOL_MERGE_F32 = 1e-4.
"""
import pytest
import torch

from emrrg.config import encoder_config, make_config
from emrrg.encoder import MambaXrayEncoder
from emrrg.lora import AdapterMismatchError, PartialLoRA, load_encoder_adapter, merge_partial_lora, save_encoder_adapter
from emrrg.model import EMRRG
from tests.adapters import randomize_adapters

RTOL_MERGE_F32, ATOL_MERGE_F32 = 1e-4, 1e-4


def report(name, a, b):
    d = (a - b).abs()
    print(f"{name}: max |diff| {d.max().item():.3e}, mean {d.mean().item():.3e}")


def test_partial_lora_merge_matches_unmerged():
    torch.manual_seed(0)
    enc = MambaXrayEncoder(encoder_config("tiny", lora_rank=4)).eval()
    randomize_adapters(enc)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = enc(x)
        w_z = enc.layers[0].mixer.in_proj.weight[32:].clone()
        assert merge_partial_lora(enc) == 2
        after = enc(x)
    report("partial lora merge", before, after)
    assert enc.layers[0].mixer.in_proj_lora is None
    assert torch.equal(enc.layers[0].mixer.in_proj.weight[32:], w_z)  # the z half is untouched
    torch.testing.assert_close(after, before, rtol=RTOL_MERGE_F32, atol=ATOL_MERGE_F32)


def test_partial_lora_touches_only_x_half():
    lora = PartialLoRA(8, 8, rank=2, alpha=4)
    assert lora.scaling == 2.0
    assert torch.count_nonzero(lora.lora_B.weight) == 0  # up starts at zero


def test_lora_x_adds_to_first_half_only():
    torch.manual_seed(0)
    cfg = encoder_config("tiny", lora_x_rank=4, depth=1)
    enc = MambaXrayEncoder(cfg).eval()
    mixer = enc.layers[0].mixer
    hs = torch.randn(1, cfg.num_tokens, cfg.d_model)
    with torch.no_grad():
        plain = mixer(hs)
        randomize_adapters(enc)
        adapted = mixer(hs)
    half = cfg.d_model // 2
    assert torch.equal(plain[..., half:], adapted[..., half:])
    assert not torch.equal(plain[..., :half], adapted[..., :half])
    keys = set(enc.state_dict())
    assert {"layers.0.mixer.lora_X.adapter_down.weight", "layers.0.mixer.lora_X.adapter_up.weight"} <= keys
    assert enc.state_dict()["layers.0.mixer.lora_X.adapter_up.weight"].shape == (half, 4)


def test_encoder_adapter_folder_roundtrip(tmp_path):
    torch.manual_seed(0)
    cfg = encoder_config("tiny", lora_rank=4, lora_x_rank=2)
    enc = MambaXrayEncoder(cfg)
    randomize_adapters(enc)
    save_encoder_adapter(enc, tmp_path / "adapter", 4, 16.0, 2)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    other = MambaXrayEncoder(cfg)
    load_encoder_adapter(other, tmp_path / "adapter")
    for k, v in enc.state_dict().items():
        if "lora" in k:
            assert torch.equal(other.state_dict()[k], v), k
    with pytest.raises(AdapterMismatchError, match="ranks"):
        load_encoder_adapter(MambaXrayEncoder(encoder_config("tiny", lora_rank=8)), tmp_path / "adapter")


def tiny_model(seed=0, **dec):
    torch.manual_seed(seed)
    cfg = make_config("tiny", "tiny-llama", "iu", encoder_overrides=dict(lora_rank=4), decoder_overrides=dec)
    return EMRRG(cfg).eval()


def logits(model, px, text_ids):
    with torch.no_grad():
        visual = model.encode_images(px)
        model.set_visual(visual)
        emb = model.prompt_embeds(visual)
        emb = torch.cat([emb, model.llama_model.get_input_embeddings()(text_ids)], 1)
        out = model.llama_model(inputs_embeds=emb).logits
        model.set_visual(None)
        return out


def test_full_merge_matches_unmerged():
    model = tiny_model(lora_rank=4, hybrid_layers=(1,))
    randomize_adapters(model)
    px, text = torch.randn(1, 2, 3, 64, 64), torch.randint(4, 200, (1, 12))
    before = logits(model, px, text)
    counts = model.merge_adapters()
    assert counts == {"encoder_partial_lora": 2, "llm_lora": 4}
    assert not any("lora" in k for k in model.state_dict())
    after = logits(model, px, text)
    report("full merge (encoder partial LoRA + LLM peft LoRA)", before, after)
    torch.testing.assert_close(after, before, rtol=RTOL_MERGE_F32, atol=ATOL_MERGE_F32)


def test_hybrid_zero_gate_is_plain_decoder():
    plain = tiny_model(seed=0)
    hybrid = tiny_model(seed=0, hybrid_layers=(0, 1))
    missing, unexpected = hybrid.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("cross_attn" in k for k in missing)
    px, text = torch.randn(1, 1, 3, 64, 64), torch.randint(4, 200, (1, 9))
    # gate_scale starts at zero; every other cross-attention weight is random and non-zero.
    with torch.no_grad():
        for x in hybrid.hybrid:
            x.q_proj.weight.normal_()
    torch.testing.assert_close(logits(hybrid, px, text), logits(plain, px, text), rtol=0, atol=0)
    with torch.no_grad():
        for x in hybrid.hybrid:
            x.gate_scale.fill_(1.0)
    assert not torch.allclose(logits(hybrid, px, text), logits(plain, px, text))


def test_hybrid_generation_computes_visual_kv_once():
    model = tiny_model(hybrid_layers=(1,), lora_rank=4)
    randomize_adapters(model)
    calls = []
    model.hybrid[0].k_proj.register_forward_hook(lambda *a: calls.append(1))
    ids = model.generate_ids(torch.randn(1, 2, 3, 64, 64), num_beams=3, max_new_tokens=12, min_new_tokens=12)
    assert ids.shape == (1, 12)
    assert len(calls) == 1  # once per image, not per token or beam
    assert model.hybrid[0].visual_kv is None  # cleared after generation


def test_default_hybrid_layers():
    from emrrg.decoder import default_hybrid_layers
    assert default_hybrid_layers(30) == (7, 15, 23)
    assert default_hybrid_layers(32) == (7, 15, 23, 31)
