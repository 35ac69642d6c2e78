"""NLG metrics through pycocoevalcap: hand-checked BLEU / ROUGE-L, Java paths, empty inputs, fallbacks.

Java-backed checks (PTB tokenizer, METEOR) skip without Java. METEOR's first call loads its
paraphrase table (~10 s); the process is reused afterwards, so the module stays well under 30 s.
"""
from __future__ import annotations

import importlib.util
import math

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None,
                                reason="pycocoevalcap not installed")

from emrrg.metrics import nlg  # noqa: E402

needs_java = pytest.mark.skipif(not nlg.java_available(), reason="no java on PATH")

REFS = [
    "The heart is normal in size. No pleural effusion or pneumothorax.",
    "Mild cardiomegaly with small bilateral pleural effusions.",
    "Lungs are clear. No acute cardiopulmonary process.",
]


def test_hand_example_simple_tokenizer():
    # hyp "a b c d e" vs ref "a b c d f": n-gram precisions 4/5, 3/4, 2/3, 1/2; equal lengths (BP 1).
    s = nlg.nlg_scores(["a b c d e"], ["a b c d f"], tokenizer="simple", meteor=False)
    print(s)
    assert s["BLEU_1"] == pytest.approx(4 / 5, abs=1e-6)
    assert s["BLEU_2"] == pytest.approx(math.sqrt(4 / 5 * 3 / 4), abs=1e-6)
    assert s["BLEU_3"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3) ** (1 / 3), abs=1e-6)
    assert s["BLEU_4"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4), abs=1e-6)
    assert s["ROUGE_L"] == pytest.approx(0.8, abs=1e-6)   # LCS 4, P = R = 0.8
    assert s["METEOR"] is None and s["meteor_status"] == "skipped" and s["tokenizer"] == "simple"


def test_simple_tokenizer_matches_ptb_conventions():
    assert nlg.simple_tokenize(["The heart, is NOT enlarged.", "", "1.5 cm nodule; x-ray"]) == [
        "the heart is not enlarged", "", "1.5 cm nodule x-ray"]


@needs_java
def test_ptb_tokenizer_offline():
    toks = nlg.ptb_tokenize(["The heart is enlarged. No effusion!", "", "Lungs: clear (bilaterally)."])
    assert toks == ["the heart is enlarged no effusion", "", "lungs clear bilaterally"]
    assert nlg.ptb_tokenize([]) == []


@needs_java
def test_identical_reports():
    s = nlg.nlg_scores(REFS, REFS)
    print(s)
    assert s["tokenizer"] == "ptb"
    for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"):
        assert s[k] == pytest.approx(1.0, abs=1e-6)
    assert s["ROUGE_L"] == pytest.approx(1.0)
    assert s["CIDEr"] > 1.0
    assert s["meteor_status"] == "ok", s["meteor_status"]
    assert s["METEOR"] == pytest.approx(1.0, abs=1e-6)


@needs_java
def test_partial_match_and_empty_prediction():
    s = nlg.nlg_scores(["The heart is enlarged.", "", "Lungs clear."], REFS)
    print(s)
    assert 0 < s["BLEU_1"] < 1 and 0 < s["ROUGE_L"] < 1 and s["CIDEr"] > 0
    assert s["meteor_status"] == "ok" and 0 < s["METEOR"] < 1
    worse = nlg.nlg_scores(["Bowel gas pattern unremarkable.", "", "Knee effusion."], REFS)
    assert worse["BLEU_1"] < s["BLEU_1"] and worse["METEOR"] < s["METEOR"]


def test_all_empty_predictions_give_zero():
    s = nlg.nlg_scores(["", "", "   "], REFS)
    print(s)
    for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr", "METEOR"):
        assert s[k] == 0.0, k
    z = nlg.nlg_scores([], [])
    assert z["n"] == 0 and z["BLEU_4"] == 0.0


def test_multiple_references():
    s = nlg.nlg_scores(["no pleural effusion"], [["small effusion", "no pleural effusion"]],
                       tokenizer="simple", meteor=False)
    assert s["BLEU_1"] == pytest.approx(1.0, abs=1e-6)


def test_fallbacks_are_reported(monkeypatch):
    def broken(_texts):
        raise FileNotFoundError("java")

    monkeypatch.setattr(nlg, "ptb_tokenize", broken)

    def no_meteor():
        raise RuntimeError("FileNotFoundError: java")

    monkeypatch.setattr(nlg._MeteorServer, "get", staticmethod(no_meteor))
    s = nlg.nlg_scores(REFS, REFS)
    assert s["tokenizer"].startswith("simple (PTB unavailable")
    assert s["METEOR"] is None and s["meteor_status"].startswith("unavailable:")
    assert s["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(FileNotFoundError):
        nlg.nlg_scores(REFS, REFS, tokenizer="ptb")


def test_bad_arguments():
    with pytest.raises(ValueError):
        nlg.nlg_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        nlg.nlg_scores(["a"], [[]])
    with pytest.raises(ValueError):
        nlg.nlg_scores(["a"], ["a"], tokenizer="bpe")
