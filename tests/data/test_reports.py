"""emrrg.data.reports: the prior-study / technique sentences that --drop-prior-references removes from
training targets, and the ones it must keep."""
from __future__ import annotations

REPORT = ("Comparison is made to the patient's prior study of ___ at 10:45 a.m. "
          "Portable semi-erect chest film ___ at 3:30 p.m. is submitted. "
          "There is a small right pleural effusion. "
          "Compared to the prior study, the left basilar atelectasis has improved. "
          "A 1.5 cm nodule projects over the right upper lobe. "
          "CHEST, SINGLE AP PORTABLE VIEW. "
          "No pneumothorax.")


def test_sentences_end_before_a_capital_letter_only():
    from emrrg.data.reports import split_report_sentences

    s = split_report_sentences(REPORT)
    assert len(s) == 7
    assert s[0] == "Comparison is made to the patient's prior study of ___ at 10:45 a.m."   # "a.m. Portable" ends it
    assert s[1].endswith("3:30 p.m. is submitted.")                                       # "p.m. is" does not
    assert s[4] == "A 1.5 cm nodule projects over the right upper lobe."
    assert split_report_sentences("no effusion. no edema") == ["no effusion.", "no edema"]   # no capital needed
    assert split_report_sentences("Seen at 3 p.m. today.") == ["Seen at 3 p.m. today."]
    assert split_report_sentences("  ") == []


def test_drops_prior_and_technique_sentences_that_name_no_finding():
    from emrrg.data.reports import drop_prior_references

    assert drop_prior_references(REPORT) == (
        "There is a small right pleural effusion. "
        "Compared to the prior study, the left basilar atelectasis has improved. "   # names a finding: kept
        "A 1.5 cm nodule projects over the right upper lobe. "
        "No pneumothorax.")                                                          # a negated finding counts
    # a report with nothing to drop is returned unchanged, character for character
    plain = "Heart size is normal.  Lungs are clear."
    assert drop_prior_references(plain) == plain
    # a target never becomes empty: a report made only of such sentences stays as it is
    only = "Comparison is made with prior study ___. Portable AP chest film ___ at ___ is submitted."
    assert drop_prior_references(only) == only


def test_study_data_drops_them_from_training_targets_only_when_asked():
    from emrrg.train import StudyData

    class Split:
        examples = [{"report": REPORT}, {"report": "Heart size is normal."}]

    class Tok:   # one token per word
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1] * len(text.split())}

    full = StudyData(Split, Tok(), 64, 200)
    dropped = StudyData(Split, Tok(), 64, 200, drop_prior_references=True)
    assert full.ids[0] == [1] * len(REPORT.split()) + [0]
    assert len(dropped.ids[0]) == len(full.ids[0]) - 28      # the three dropped sentences: 13 + 10 + 5 words
    assert dropped.ids[1] == full.ids[1] == [1, 1, 1, 1, 0]


def test_drawn_finding_spans_are_the_sentences_that_name_a_drawn_finding():
    from emrrg.data.reports import drawn_finding_spans

    r = "Heart size is mildly enlarged. No pneumothorax. Small right pleural effusion. ET tube in place."
    spans = lambda f: [r[a:b] for a, b in drawn_finding_spans(r, f)]   # noqa: E731
    assert spans(["cardiomegaly"]) == ["Heart size is mildly enlarged."]
    assert spans(["pleural_effusion", "support_devices"]) == ["Small right pleural effusion.", "ET tube in place."]
    assert spans(["pneumothorax"]) == []       # "No pneumothorax." negates it: not a sentence the finding decides
    assert spans([]) == []


def test_finding_weight_weighs_exactly_the_drawn_finding_sentences_tokens():
    """--finding-weight: the tokens whose text lies in a sentence naming a drawn finding get the weight, all
    others (and EOS) 1; a byte-level tokenizer makes the check character-exact; weights follow truncation."""
    from emrrg.config import make_config
    from emrrg.decoder import load_base_decoder
    from emrrg.train import StudyData, TrainError

    _, tok = load_base_decoder(make_config("tiny", "tiny-llama", "iu").decoder)
    r = "No pneumothorax. Heart size is mildly enlarged. ET tube in place."

    class Split:
        examples = [{"report": r, "labels": ["cardiomegaly"]}, {"report": r, "labels": []}]

    d = StudyData(Split, tok, 64, 200, finding_weight=3.0)
    w, ids = d.token_weights[0], d.ids[0]
    assert len(w) == len(ids) and w[-1] == 1.0 and set(w.tolist()) == {1.0, 3.0}
    assert tok.decode([t for t, x in zip(ids, w) if x == 3.0]).strip() == "Heart size is mildly enlarged."
    assert (d.token_weights[1] == 1.0).all()
    assert StudyData(Split, tok, 64, 200).token_weights is None                    # 1: off, nothing computed
    assert len(StudyData(Split, tok, 64, 10, finding_weight=3.0).token_weights[0]) == 10
    import pytest
    with pytest.raises(TrainError, match="labels"):
        class NoLabels:
            examples = [{"report": r}]
        StudyData(NoLabels, tok, 64, 200, finding_weight=2.0)
