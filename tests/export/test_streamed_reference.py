"""The streamed f32 reference (export/streamed_reference.py) against the whole f32 LlamaForCausalLM, and the
export that uses it, on a tiny plain Llama (no LLM LoRA, no hybrid layers: what the streamed path takes)."""
import json

import numpy as np
import pytest
import torch

from emrrg.export.cli import export_main
from emrrg.runtime.bundle import verify_bundle

# f32 logits of the same weights through the same transformers layers, run two ways (the whole model with its own
# mask and cache vs one swapped-in LlamaDecoderLayer with an explicit boolean mask, SDPA, batched prompts): a few
# ulp of the logits' scale per op. A wrong weight swap, position, mask or cache layer index shows up at >= 1e-2 on
# the tiny model's logits (scale ~0.5).
STREAMED_MAX_ABS = 1e-4
N_NEW, PROMPT_TOKENS = 12, 64


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    """tiny encoder + tiny-llama with neither LLM LoRA nor hybrid layers (its LLM weights in DIR/decoder/)."""
    from emrrg.checkpoint import save_checkpoint
    from emrrg.config import make_config
    from emrrg.model import EMRRG

    torch.manual_seed(0)
    model = EMRRG(make_config("tiny", "tiny-llama", "iu")).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("plain") / "tiny")


def _bf16_copy(ckpt, out):
    """The checkpoint's LLM weights rounded to bf16, as a bf16 safetensors file (what a 7B ships as)."""
    from safetensors.torch import load_file, save_file

    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(ckpt / "decoder" / "model.safetensors")).items()}
    out.mkdir()
    save_file(state, str(out / "model.safetensors"))
    return {k: v.float() for k, v in state.items()}


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_streamed_reference_matches_the_f32_model(plain_checkpoint, tmp_path, dtype):
    from emrrg.checkpoint import load_checkpoint
    from emrrg.export.decoder_eval import TorchDecoder, build_reference, eval_prompts
    from emrrg.export.streamed_reference import StreamedLlama, llm_weight_files

    model = load_checkpoint(plain_checkpoint)
    llm = model.llama_model
    files = llm_weight_files(plain_checkpoint, model.cfg)
    if dtype == "bf16":
        state = _bf16_copy(plain_checkpoint, tmp_path / "bf16")
        llm.load_state_dict(state, strict=False)
        files = sorted((tmp_path / "bf16").glob("*.safetensors"))
    prompts = eval_prompts(model.tokenizer, n=2, prompt_tokens=PROMPT_TOKENS) + \
        [eval_prompts(model.tokenizer, n=1, prompt_tokens=PROMPT_TOKENS + 5, first_report=50)[0]]  # two lengths
    want = build_reference(TorchDecoder(llm), prompts, N_NEW)
    streamed = StreamedLlama(files, llm.config)
    got = streamed.reference(prompts, N_NEW)
    assert got.continuations == want.continuations
    for a, b in zip(got.logits, want.logits):
        assert a.shape == b.shape == (N_NEW, llm.config.vocab_size)
        assert np.abs(a - b).max() <= STREAMED_MAX_ABS, np.abs(a - b).max()
    full = streamed.logits(prompts[0])                                # one pass, every position
    assert np.abs(full - TorchDecoder(llm).logits(prompts[0])).max() <= STREAMED_MAX_ABS


def test_streamed_activation_stats_name_every_built_matmul(plain_checkpoint):
    """E[x^2] per input channel, keyed like the builder's matmuls (what the activation-weighted refits read), and
    equal to the mean square of the f32 model's own inputs to that projection."""
    from emrrg.checkpoint import load_checkpoint
    from emrrg.export.decoder_builder import SafetensorsWeights, _module_shape, iter_matmul_weights
    from emrrg.export.decoder_eval import eval_prompts
    from emrrg.export.streamed_reference import StreamedLlama, llm_weight_files

    model = load_checkpoint(plain_checkpoint)
    llm = model.llama_model
    files = llm_weight_files(plain_checkpoint, model.cfg)
    prompts = eval_prompts(model.tokenizer, n=2, prompt_tokens=PROMPT_TOKENS)
    stats = StreamedLlama(files, llm.config).activation_stats(prompts)
    shape = _module_shape(llm)
    names = {n: w.shape[0] for n, w in iter_matmul_weights(SafetensorsWeights(files), shape)}
    assert {k: v.shape[0] for k, v in stats.items()} == names
    seen = []
    hook = llm.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        llm(input_ids=torch.tensor(prompts), use_cache=False)
    hook.remove()
    want = seen[0].reshape(-1, seen[0].shape[-1]).double().pow(2).mean(0).float().numpy()
    np.testing.assert_allclose(stats["model.layers.1.mlp.down_proj"], want, rtol=1e-4, atol=1e-9)


def test_export_with_the_streamed_reference(plain_checkpoint, tmp_path, capsys):
    """decoder_reference=streamed: no f32 decoder, candidates built from the safetensors and scored against the
    streamed reference; the manifest and the export's output say so, and the bundle writes a report. auto keeps the
    f32 reference for a model this small."""
    from emrrg.assets import chest_dicom
    from emrrg.runtime.cli import run_main

    out = tmp_path / "s"
    export_main([str(plain_checkpoint), "-o", str(out), "--llm-bits", "4", "--no-progress",
                 "--extra-options", "decoder_reference=streamed", "eval_prompts=1", "eval_tokens=8",
                 "prompt_tokens=64"])
    assert "decoder reference: f32 streamed layer by layer" in capsys.readouterr().out
    m = verify_bundle(out)
    ref = m["validation"]["decoder_reference"]
    assert ref["kind"] == "streamed" and "decoder_reference=streamed" in ref["why"]
    assert "skipped" in m["validation"]["decoder_f32"]
    attempts = m["validation"]["decoder_4bit"]["attempts"]
    assert attempts and attempts[0]["top1"] >= 0.5, attempts
    assert m["artifacts"]["decoder"]["precision"] == "int4"
    run_main([str(out), str(chest_dicom()), "--max-new-tokens", "5", "--json"])
    assert json.loads(capsys.readouterr().out)["tokens"] == 5

    auto = tmp_path / "a"
    export_main([str(plain_checkpoint), "-o", str(auto), "--llm-bits", "4", "--no-progress",
                 "--extra-options", "eval_prompts=1", "eval_tokens=8", "prompt_tokens=64"])
    assert "decoder reference: f32 LLM in memory" in capsys.readouterr().out
    assert verify_bundle(auto)["validation"]["decoder_reference"]["kind"] == "f32"


def test_streamed_reference_refuses_llm_lora(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_main([str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--llm-bits", "4", "--no-progress",
                     "--extra-options", "decoder_reference=streamed"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "decoder_reference=streamed does not support LLM LoRA adapters, hybrid cross-attention layers" in err
    assert not (tmp_path / "b").exists()
