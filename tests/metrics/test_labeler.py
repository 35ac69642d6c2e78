"""Rule-based CheXpert labeler: negation / uncertainty scopes, CE scores, real IU X-Ray reports.

The phrase lists come from the installed radtext package and the IU reports from the installed
torchxrayvision package (CC BY-NC-ND, read at run time only); without them the tests skip.
"""
from __future__ import annotations

import importlib.util
import subprocess
from collections import Counter
from pathlib import Path

import pytest

HAS_RADTEXT = importlib.util.find_spec("radtext") is not None
HAS_TXRV = importlib.util.find_spec("torchxrayvision") is not None
pytestmark = pytest.mark.skipif(not HAS_RADTEXT, reason="radtext (CheXpert phrase lists) not installed")

from emrrg.metrics import labeler as lab  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def positives(text: str, **kw) -> set[str]:
    return {c for c, v in lab.label_report(text, **kw).items() if v == 1}


CASES = [
    # (report, must be positive, must not be positive)
    ("There is a small left pleural effusion.", {"Pleural Effusion"}, {"No Finding"}),
    ("No pleural effusion.", {"No Finding"}, {"Pleural Effusion"}),
    ("No pneumothorax or effusion.", {"No Finding"}, {"Pneumothorax", "Pleural Effusion"}),
    ("Heart size is normal.", {"No Finding"}, {"Cardiomegaly"}),
    ("The heart is enlarged", {"Cardiomegaly"}, {"No Finding"}),
    ("The heart is not enlarged.", set(), {"Cardiomegaly"}),
    ("Normal heart size.", set(), {"Cardiomegaly"}),
    ("Lines and tubes in place.", {"Support Devices", "No Finding"}, set()),
    ("No focal consolidation but there is mild edema.", {"Edema"}, {"Consolidation", "No Finding"}),
    ("There is no evidence of pneumothorax, pleural effusion, or focal consolidation.", {"No Finding"},
     {"Pneumothorax", "Pleural Effusion", "Consolidation"}),
    ("Pneumothorax is not seen.", set(), {"Pneumothorax"}),
    ("The left effusion has resolved.", set(), {"Pleural Effusion"}),
    ("Pleural effusions are absent.", set(), {"Pleural Effusion"}),
    ("Lungs are free of consolidation; small right effusion.", {"Pleural Effusion"}, {"Consolidation"}),
    ("No change in moderate cardiomegaly.", {"Cardiomegaly"}, set()),
    ("Possible small effusion, no pneumothorax.", {"Pleural Effusion"}, {"Pneumothorax"}),
    ("Pneumonia cannot be excluded.", {"Pneumonia"}, set()),
    ("No focal opacity to suggest pneumonia.", set(), {"Pneumonia", "Lung Opacity"}),
    ("Mediastinal contours are within normal limits.", set(), {"Enlarged Cardiomediastinum"}),
    ("Widened mediastinum.", {"Enlarged Cardiomediastinum"}, set()),
    ("Kerley B lines and plate-like atelectasis.", {"Atelectasis"}, {"Support Devices"}),
    ("Right chest tube has been removed.", set(), {"Support Devices"}),
    ("Old healed rib fractures.", set(), {"Fracture"}),
    ("Acute displaced fracture of the left seventh rib.", {"Fracture"}, set()),
    ("Lungs are clear. No acute cardiopulmonary process.", {"No Finding"}, set()),
    ("Calcified granuloma. Otherwise normal.", set(), {"No Finding"}),
    ("No pneumothorax, although the sensitivity to detect pneumothorax is diminished.", set(), {"Pneumothorax"}),
]


@pytest.mark.parametrize("text,pos,neg", CASES, ids=[c[0][:40] for c in CASES])
def test_negation_and_scope(text, pos, neg):
    got = positives(text)
    print(text, "->", sorted(got))
    assert pos <= got
    assert not (neg & got)


def test_uncertain_policy():
    assert lab.label_states("Pneumonia cannot be excluded.")["Pneumonia"] == lab.UNCERTAIN
    assert lab.label_states("Possible left lower lobe atelectasis.")["Atelectasis"] == lab.UNCERTAIN
    assert lab.label_report("Pneumonia cannot be excluded.")["Pneumonia"] == 1          # U-ones (default)
    assert lab.label_report("Pneumonia cannot be excluded.", uncertain=0)["Pneumonia"] == 0
    states = lab.label_states("Possible pneumonia.")
    assert states["No Finding"] is None       # an uncertain pathology also rules out No Finding
    assert states["Pleural Effusion"] is None  # not mentioned: blank
    with pytest.raises(ValueError):
        lab.label_report("x", uncertain=2)


def test_all_classes_always_present():
    out = lab.label_report("")
    assert list(out) == list(lab.CHEXPERT_CLASSES) and len(out) == 14
    assert out["No Finding"] == 1 and sum(out.values()) == 1


def test_phrases_come_from_installed_radtext():
    phrases = lab.chexpert_phrases()
    assert set(lab.CHEXPERT_CLASSES) <= set(phrases)
    assert "effusion" in phrases["Pleural Effusion"]["include"]
    assert "pericardial effusion" in phrases["Pleural Effusion"]["exclude"]
    assert any(p.startswith("\\b") for p in phrases["Support Devices"]["include"])   # quoted regexes parsed
    src = lab._radtext_phrase_file()
    assert "site-packages" in str(src) or "dist-packages" in str(src)
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if f.endswith("chexpert_phrases.yml")]   # read at run time, never copied


def test_phrase_yaml_reader():
    text = "A:\n  include:\n  - foo\n  - '\\bbar''s'\n  exclude:\n  - baz\nB:\n  include:\n  - qux\n"
    assert lab._parse_phrase_yaml(text) == {
        "A": {"include": ["foo", "\\bbar's"], "exclude": ["baz"]},
        "B": {"include": ["qux"], "exclude": []},
    }


# ---------------------------------------------------------------------------------------------
# CE scores


def test_ce_scores_hand_computed():
    preds = ["Small left pleural effusion.", "Cardiomegaly. No effusion.", "Lungs are clear."]
    refs = ["Left pleural effusion and cardiomegaly.", "Cardiomegaly.", "Small right pneumothorax."]
    # pred labels: {PE}, {CM}, {NF};  ref labels: {PE, CM}, {CM}, {PTX}
    # PE: TP 1; CM: TP 1, FN 1; PTX: FN 1; NF: FP 1  ->  TP 2, FP 1, FN 2
    s = lab.ce_scores(preds, refs)
    print({k: v for k, v in s.items() if k != "per_class"})
    assert s["precision_micro"] == pytest.approx(2 / 3)
    assert s["recall_micro"] == pytest.approx(2 / 4)
    assert s["f1_micro"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert s["precision_macro"] == pytest.approx(2 / 14)          # PE 1 + CM 1
    assert s["recall_macro"] == pytest.approx(1.5 / 14)           # PE 1 + CM 0.5
    assert s["f1_macro"] == pytest.approx((1 + 2 / 3) / 14)       # PE 1 + CM 2/3
    pc = s["per_class"]
    assert (pc["Cardiomegaly"]["tp"], pc["Cardiomegaly"]["fn"]) == (1, 1)
    assert (pc["No Finding"]["fp"], pc["Pneumothorax"]["fn"]) == (1, 1)
    assert s["n"] == 3


def test_ce_from_labels_and_edges():
    p = [{"Edema": 1}, {"Edema": 1, "Atelectasis": 1}, {}]
    r = [{"Edema": 1}, {"Atelectasis": 1}, {"Edema": 1}]
    s = lab.ce_from_labels(p, r)
    # Edema: TP 1 FP 1 FN 1; Atelectasis: TP 1
    assert (s["precision_micro"], s["recall_micro"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert s["per_class"]["Edema"]["f1"] == pytest.approx(0.5)
    assert s["f1_macro"] == pytest.approx((0.5 + 1.0) / 14)
    same = lab.ce_scores(["Mild edema. Small effusion."] * 2, ["Mild edema. Small effusion."] * 2)
    assert same["f1_micro"] == 1.0
    assert lab.ce_scores([], [])["f1_micro"] == 0.0
    with pytest.raises(ValueError):
        lab.ce_scores(["a"], [])


# ---------------------------------------------------------------------------------------------
# Real reports


@pytest.mark.skipif(not HAS_TXRV, reason="torchxrayvision (IU X-Ray reports) not installed")
def test_iu_reports_plausible_distribution():
    recs = lab.iu_records(200)
    assert len(recs) == 200 and recs[0].id < recs[-1].id
    assert lab.iu_reports(3) == [r.text for r in recs[:3]]
    labels = lab.label_reports([r.text for r in recs])
    counts = Counter(c for row in labels for c, v in row.items() if v)
    print(counts.most_common())
    assert counts.most_common(1)[0][0] == "No Finding"
    assert 0.25 * len(recs) < counts["No Finding"] < 0.75 * len(recs)
    for c in ("Cardiomegaly", "Pleural Effusion", "Atelectasis", "Lung Opacity"):
        assert counts[c] > 0, c
    # The IU annotators' MeSH "normal" agrees with the labeler's No Finding.
    normal = [row["No Finding"] for r, row in zip(recs, labels) if r.mesh == ("normal",)]
    agree = sum(normal) / len(normal)
    print(f"No Finding on MeSH-normal reports: {agree:.3f} of {len(normal)}")
    assert len(normal) > 40 and agree > 0.85
    # Cardiomegaly vs MeSH Cardiomegaly.
    cm_mesh = [any("Cardiomegaly" in m for m in r.mesh) for r in recs]
    tp = sum(1 for m, row in zip(cm_mesh, labels) if m and row["Cardiomegaly"])
    assert tp >= 0.7 * sum(cm_mesh)


MENTIONS = [
    # (text, mention, which occurrence, state the labeler gives that mention)
    ("No pneumothorax, although the sensitivity to detect pneumothorax is diminished.", "pneumothorax", 1, lab.NEGATIVE),
    ("Possible small effusion, no pneumothorax.", "effusion", 0, lab.UNCERTAIN),
    ("Possible small effusion, no pneumothorax.", "pneumothorax", 0, lab.NEGATIVE),
    ("Pneumothorax is not seen.", "pneumothorax", 0, lab.NEGATIVE),
    ("No change in moderate cardiomegaly.", "cardiomegaly", 0, lab.POSITIVE),
    ("Pneumonia cannot be excluded.", "pneumonia", 0, lab.UNCERTAIN),
    ("No focal consolidation but there is mild edema.", "consolidation", 0, lab.NEGATIVE),
    ("No focal consolidation but there is mild edema.", "edema", 0, lab.POSITIVE),
    # raw report text: offsets are kept through case, line breaks and runs of spaces
    ("FINDINGS:\n  Heart  is  ENLARGED.\n\n  No   pleural  effusion.  Edema.", "effusion", 0, lab.NEGATIVE),
    ("FINDINGS:\n  Heart  is  ENLARGED.\n\n  No   pleural  effusion.  Edema.", "Edema", 0, lab.POSITIVE),
]


@pytest.mark.parametrize("text,word,k,state", MENTIONS, ids=[f"{m[1]}@{m[0][:30]}" for m in MENTIONS])
def test_mention_state_reads_a_span_as_label_states_does(text, word, k, state):
    start = -1
    for _ in range(k + 1):
        start = text.lower().find(word.lower(), start + 1)
    got = lab.mention_state(text, start, start + len(word))
    assert got == state
    # the whole-report labeler agrees where this is the class's only mention
    cls = {"pneumothorax": "Pneumothorax", "effusion": "Pleural Effusion", "cardiomegaly": "Cardiomegaly",
           "pneumonia": "Pneumonia", "consolidation": "Consolidation", "edema": "Edema"}[word.lower()]
    if text.lower().count(word.lower()) == 1:
        assert lab.label_states(text)[cls] == state


def test_mention_state_refuses_a_span_outside_the_text():
    with pytest.raises(ValueError, match="outside a text of 5 characters"):
        lab.mention_state("Edema", 2, 9)
