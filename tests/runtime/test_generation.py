"""The numpy decoding loops against transformers' generate on the same weights and logits.

A torch-backed StepModel feeds the numpy loops the very logits transformers sees, so any difference
is in the search algorithm itself: greedy must match token for token, beam search for the whole
output (the issue asks for the first 40 tokens; we compare up to the end).
"""
import dataclasses

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from emrrg.config import GenerationConfig, make_config
from emrrg.model import EMRRG
from emrrg.runtime.generation import (DecodeSettings, apply_processors, banned_ngram_tokens, beam_search, generate,
                                      greedy)


class TorchStep:
    """StepModel over a transformers causal LM with a DynamicCache (test double of the ORT session)."""

    def __init__(self, llm):
        self.llm = llm
        self.cache = None
        self.len = 0

    @torch.no_grad()
    def prefill(self, embeds, num_rows):
        e = torch.from_numpy(embeds).expand(num_rows, -1, -1)
        self.cache = DynamicCache()
        out = self.llm(inputs_embeds=e, past_key_values=self.cache, use_cache=True)
        self.len = e.shape[1]
        return out.logits[:, -1].float().numpy()

    @torch.no_grad()
    def step(self, tokens, rows):
        self.cache.reorder_cache(torch.from_numpy(rows))
        emb = self.llm.get_input_embeddings()(torch.from_numpy(tokens)[:, None])
        self.len += 1
        mask = torch.ones(len(tokens), self.len, dtype=torch.long)
        out = self.llm(inputs_embeds=emb, attention_mask=mask, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1].float().numpy()


def hf_generate(model, embeds, s: DecodeSettings):
    with torch.no_grad():
        e = torch.from_numpy(embeds)
        out = model.llama_model.generate(
            inputs_embeds=e, attention_mask=torch.ones(e.shape[:2], dtype=torch.long), do_sample=False,
            num_beams=s.num_beams, repetition_penalty=s.repetition_penalty, length_penalty=s.length_penalty,
            min_new_tokens=s.min_new_tokens, max_new_tokens=s.max_new_tokens, eos_token_id=s.eos_token_id,
            no_repeat_ngram_size=s.no_repeat_ngram_size, pad_token_id=0)
    ids = out[0].tolist()
    return ids[: ids.index(s.eos_token_id) + 1] if s.eos_token_id in ids else ids


def tiny_prompt(seed):
    torch.manual_seed(seed)
    model = EMRRG(make_config("tiny", "tiny-llama", "iu")).eval()
    with torch.no_grad():
        for p in model.llama_model.parameters():  # sharper distributions than the init: real choices, some EOS
            p.mul_(3.0)
        embeds = model.prompt_embeds(model.encode_images(torch.randn(1, 1, 3, 64, 64))).numpy()
    return model, embeds


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("beams,min_new,max_new,rep,lp,ngram", [
    (1, 0, 30, 2.0, 2.0, 0), (1, 10, 30, 1.0, 1.0, 0), (3, 0, 40, 2.0, 2.0, 0), (5, 10, 40, 2.0, 2.0, 0),
    (3, 5, 40, 1.3, 0.0, 0), (2, 0, 25, 1.0, -1.0, 0),
    # no_repeat_ngram_size with no repetition penalty, where the tiny model loops and the ban must act
    (1, 10, 40, 1.0, 1.0, 2), (1, 10, 40, 1.0, 1.0, 3), (3, 5, 40, 1.0, 2.0, 3), (4, 0, 40, 1.3, 1.0, 1),
])
def test_matches_transformers_tiny(seed, beams, min_new, max_new, rep, lp, ngram):
    model, embeds = tiny_prompt(seed)
    s = DecodeSettings(num_beams=beams, repetition_penalty=rep, length_penalty=lp, min_new_tokens=min_new,
                       max_new_tokens=max_new, eos_token_id=model.tokenizer.eos_token_id, no_repeat_ngram_size=ngram)
    ours = generate(TorchStep(model.llama_model), embeds, s)
    ref = hf_generate(model, embeds, s)
    assert ours == ref
    if ngram:
        grams = [tuple(ours[i:i + ngram]) for i in range(len(ours) - ngram + 1)]
        assert len(grams) == len(set(grams)), "a banned n-gram repeated"


def test_ngram_ban_changes_the_output():
    """Guard against a vacuous parity test: without the ban this greedy run repeats a 2-gram, with it not."""
    model, embeds = tiny_prompt(0)
    kw = dict(num_beams=1, repetition_penalty=1.0, min_new_tokens=30, max_new_tokens=30,
              eos_token_id=model.tokenizer.eos_token_id)
    free = generate(TorchStep(model.llama_model), embeds, DecodeSettings(**kw))
    grams = [tuple(free[i:i + 2]) for i in range(len(free) - 1)]
    assert len(grams) > len(set(grams)), "the tiny model no longer loops: pick another seed"
    banned = generate(TorchStep(model.llama_model), embeds, DecodeSettings(**kw, no_repeat_ngram_size=2))
    assert banned != free


@pytest.mark.parametrize("seq,n,want", [
    ([], 2, []), ([5], 3, []), ([5, 6, 5], 2, [6]), ([1, 2, 3, 1, 2], 3, [3]), ([1, 2, 1, 2], 2, [1]),
    ([4, 4, 7], 1, [4, 4, 7]), ([1, 2, 3], 0, []),
])
def test_banned_ngram_tokens(seq, n, want):
    assert banned_ngram_tokens(seq, n) == want


def test_eos_is_reachable_in_these_tests():
    """Guard against a vacuous suite: with these seeds some run must stop on EOS before max_new_tokens."""
    stopped = 0
    for seed in range(4):
        model, embeds = tiny_prompt(seed)
        s = DecodeSettings(num_beams=3, min_new_tokens=0, max_new_tokens=40, eos_token_id=2)
        model.llama_model.get_output_embeddings().bias = None
        with torch.no_grad():
            model.llama_model.get_output_embeddings().weight[2] += 0.5  # make EOS likelier
        out = generate(TorchStep(model.llama_model), embeds, s)
        assert out == hf_generate(model, embeds, s)
        stopped += out[-1] == 2 and len(out) < 40
    assert stopped >= 1


def test_streaming_calls_back_every_token():
    model, embeds = tiny_prompt(0)
    got = []
    s = DecodeSettings(num_beams=1, min_new_tokens=5, max_new_tokens=12, eos_token_id=2)
    out = greedy(TorchStep(model.llama_model), embeds, s, on_token=got.append)
    assert got == out and len(out) >= 5


def test_processors():
    s = DecodeSettings(num_beams=1, repetition_penalty=2.0, min_new_tokens=4, max_new_tokens=5, eos_token_id=1)
    x = np.array([[1.0, -1.0, 2.0, -3.0]], dtype=np.float32)
    out = apply_processors(x.copy(), [[0, 3, 3]], s)
    np.testing.assert_array_equal(out, [[0.5, -np.inf, 2.0, -6.0]])


@pytest.mark.slow
def test_matches_transformers_smollm2_beam():
    """Real SmolLM2-135M over a real-looking prompt: 3-beam search, rep/length penalty 2, 40 tokens."""
    from emrrg.decoder import load_base_decoder
    from emrrg.config import decoder_config

    llm, tok = load_base_decoder(decoder_config("smollm2-135m"))
    llm.eval()
    torch.manual_seed(0)
    cfg = make_config("tiny", "smollm2-135m", "mimic")
    model = EMRRG(cfg, llm, tok).eval()
    with torch.no_grad():
        embeds = model.prompt_embeds(model.encode_images(torch.randn(1, 1, 3, 64, 64))).numpy()
    for beams, ngram in ((1, 0), (3, 0), (1, 3), (3, 3)):
        s = DecodeSettings(num_beams=beams, min_new_tokens=10, max_new_tokens=40, eos_token_id=tok.eos_token_id,
                           no_repeat_ngram_size=ngram)
        ours = generate(TorchStep(llm), embeds, s)
        ref = hf_generate(model, embeds, s)
        print(beams, tok.decode(ours))
        assert ours[:40] == ref[:40]


def test_beam_search_rejects_bad_settings():
    with pytest.raises(ValueError):
        DecodeSettings(num_beams=0)
    assert beam_search  # imported API


def test_one_clamp_of_the_token_limits():
    """GenerationConfig.resolve: the overrides' non-None values over the base, then min <= max; DecodeSettings
    (the runtime), the evaluators' TorchGenerator and emrrg-train's build_model go through it."""
    from emrrg.evaluate import TorchGenerator, decode_overrides

    base = dataclasses.asdict(GenerationConfig(min_new_tokens=80, max_new_tokens=120))
    g = GenerationConfig.resolve(base, {"max_new_tokens": 50, "num_beams": None})
    assert (g.min_new_tokens, g.max_new_tokens, g.num_beams) == (50, 50, base["num_beams"])   # a max below the min lowers it
    g = GenerationConfig.resolve(base, {"min_new_tokens": 100})
    assert (g.min_new_tokens, g.max_new_tokens) == (100, 120)                                  # a min below the max stays
    g = GenerationConfig.resolve(base, {"min_new_tokens": 200, "max_new_tokens": 90})
    assert (g.min_new_tokens, g.max_new_tokens) == (90, 90)                                    # an explicit min too
    g = GenerationConfig.resolve({"max_new_tokens": 30})                                       # an older bundle's keys
    assert (g.min_new_tokens, g.max_new_tokens, g.no_repeat_ngram_size) == (30, 30, 0)
    s = DecodeSettings.resolve(base, {"max_new_tokens": 7}, eos_token_id=5)
    assert (type(s), s.min_new_tokens, s.max_new_tokens, s.eos_token_id) == (DecodeSettings, 7, 7, 5)
    assert DecodeSettings(min_new_tokens=9, max_new_tokens=4).min_new_tokens == 4

    model = EMRRG(make_config("tiny", "tiny-llama", "iu"))                                   # iu: 40 .. 100 new tokens
    tg = TorchGenerator(model)
    assert (tg.settings(decode_overrides(max_new_tokens=10))["min_new_tokens"],
            tg.settings(decode_overrides(min_new_tokens=60))["min_new_tokens"],
            tg.settings(decode_overrides(min_new_tokens=99, max_new_tokens=12))["min_new_tokens"]) == (10, 60, 12)
