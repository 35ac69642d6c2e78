"""Reference generation end to end through the CLIs: emrrg-init -> emrrg-generate on real X-rays."""
import json

import pytest
import torch

from emrrg.assets import chest_dicom, pneumonia_images
from emrrg.cli import generate_main, init_main
from emrrg.config import generation_config, make_config
from emrrg.model import EMRRG, PROMPT_AFTER, PROMPT_BEFORE, decode_report


def test_upstream_generation_presets():
    assert vars(generation_config("iu")) == dict(num_beams=5, repetition_penalty=2.0, length_penalty=2.0,
                                                 min_new_tokens=40, max_new_tokens=100,
                                                 no_repeat_ngram_size=0)  # upstream does not ban n-grams
    for ds in ("mimic", "chexpert_plus"):
        g = generation_config(ds)
        assert (g.num_beams, g.min_new_tokens, g.max_new_tokens) == (3, 80, 120)


def test_prompt_layout():
    torch.manual_seed(0)
    model = EMRRG(make_config("tiny", "tiny-llama", "iu")).eval()
    before, after = model.prompt_ids()
    tok = model.tokenizer
    assert before[0] == tok.bos_token_id
    assert tok.decode(before[1:]) == PROMPT_BEFORE and tok.decode(after) == PROMPT_AFTER
    visual = model.encode_images(torch.randn(1, 1, 3, 64, 64))
    assert model.prompt_embeds(visual).shape == (1, len(before) + 17 + len(after), 64)


def test_decode_report_cuts_at_eos():
    torch.manual_seed(0)
    tok = EMRRG(make_config("tiny", "tiny-llama", "iu")).tokenizer
    ids = [tok.bos_token_id] + tok(" The heart is normal.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, 70, 71]
    assert decode_report(tok, ids) == "The heart is normal."


def test_cli_init_and_generate_tiny(tmp_path, capsys):
    init_main(["--encoder", "tiny", "--decoder", "tiny-llama", "--dataset", "iu", "--lora-rank", "2",
               "--llm-lora-rank", "2", "--hybrid-layers", "1", "-o", str(tmp_path / "ck")])
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["decoder"]["hybrid_layers"] == [1]
    capsys.readouterr()
    generate_main([str(tmp_path / "ck"), str(chest_dicom()), str(pneumonia_images()[0]), "--max-new-tokens", "6",
                   "--beams", "2"])
    out = capsys.readouterr()
    assert "6 tokens" in out.err


@pytest.mark.parametrize("argv,msg", [
    (["--encoder", "huge", "-o", "X"], "invalid choice"),
])
def test_cli_rejects_unknown_preset(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        init_main([a.replace("X", str(tmp_path / "ck")) for a in argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_cli_bad_image_is_one_line(tmp_path, capsys):
    init_main(["--encoder", "tiny", "--decoder", "tiny-llama", "-o", str(tmp_path / "ck")])
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 10)
    with pytest.raises(SystemExit) as e:
        generate_main([str(tmp_path / "ck"), str(tmp_path / "bad.dcm")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "bad.dcm" in err and "Traceback" not in err


@pytest.mark.slow
def test_smollm2_base_report_on_real_chest_xray(tmp_path, capsys):
    """The issue's done-criterion: random base encoder over the real SmolLM2, offline, on RG1_UNCR.dcm."""
    init_main(["--encoder", "base", "--decoder", "smollm2-135m", "-o", str(tmp_path / "ck")])
    capsys.readouterr()
    generate_main([str(tmp_path / "ck"), str(chest_dicom("RG1_UNCR.dcm")), "--max-new-tokens", "12", "--beams", "2"])
    out = capsys.readouterr()
    report = out.out.strip()
    print(report)
    assert len(report.split()) >= 3  # real English words from the real LM, even over random visual tokens
    assert "12 tokens" in out.err


# NF4 (bitsandbytes) on SmolLM2, teacher-forced over 2 x 120 report-text positions after a 40-token
# context: measured top-1 0.69, KL 0.35 -- SmolLM2's weights sit on a Q4_1 grid and NF4 rounds them onto
# another (the ORT MatMulNBits path re-encodes that grid and reaches 0.98; see benchmarks/decoder_4bit.md).
# 0.6 / 0.6 keep a margin for other CPUs' kernels; a layer quantized wrongly or left random drops top-1
# below 0.1.
NF4_TOP1_MIN = 0.6
NF4_KL_MAX = 0.6


def test_cli_generate_with_nf4_llm(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    init_main(["--encoder", "tiny", "--decoder", "tiny-llama", "-o", str(tmp_path / "ck")])
    capsys.readouterr()
    generate_main([str(tmp_path / "ck"), str(chest_dicom("RG1_UNCR.dcm")), "--max-new-tokens", "5", "--beams", "1",
                   "--llm-4bit", "nf4"])
    out = capsys.readouterr()
    assert "linear layers in NF4" in out.err and "5 tokens" in out.err


@pytest.mark.slow
def test_smollm2_nf4_against_f32():
    bnb = pytest.importorskip("bitsandbytes")
    import copy

    from emrrg.config import decoder_config
    from emrrg.decoder import load_base_decoder, quantize_llm_nf4
    from emrrg.export.decoder_eval import eval_prompts

    llm, tok = load_base_decoder(decoder_config("smollm2-135m"))
    llm.eval()
    ids = torch.tensor(eval_prompts(tok, n=2, prompt_tokens=160))
    q = copy.deepcopy(llm)
    assert quantize_llm_nf4(q) == 210 and isinstance(q.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    assert type(q.lm_head) is torch.nn.Linear
    with torch.no_grad():
        ref, got = (m(input_ids=ids).logits[:, 40:].float() for m in (llm, q))
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    lp, lq = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    print(f"NF4 vs f32: top-1 {top1:.3f}, mean KL {kl:.3f}")
    assert top1 >= NF4_TOP1_MIN and kl <= NF4_KL_MAX
