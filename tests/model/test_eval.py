"""emrrg-eval on tiny: a checkpoint and its bundle on the same phantom split, the JSON it writes, --iu."""
from __future__ import annotations

import json

import pytest

NLG_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
CE_KEYS = ("precision_micro", "recall_micro", "f1_micro", "precision_macro", "recall_macro", "f1_macro")
DECODE = ["--beams", "1", "--max-new-tokens", "12", "--min-new-tokens", "12", "--threads", "1", "--no-progress"]


def _check_scores(s: dict, meteor: bool) -> None:
    for k in NLG_KEYS:
        if k == "METEOR" and not meteor:
            assert s["nlg"][k] is None
            continue
        assert 0.0 <= s["nlg"][k] <= (10.0 if k == "CIDEr" else 1.0), k
    for k in CE_KEYS:
        assert 0.0 <= s["ce"][k] <= 1.0, k
    assert set(s["ce"]["per_class"]) >= {"No Finding", "Cardiomegaly", "Support Devices"}
    assert s["score"] == pytest.approx(0.8 * s["nlg"]["BLEU_4"] + 0.2 * s["nlg"]["CIDEr"])


def test_eval_checkpoint_and_bundle_agree(tiny_checkpoint, tiny_bundle, tiny_phantom, tmp_path):
    from emrrg.evaluate import eval_main

    out_ck, out_b = tmp_path / "ck.json", tmp_path / "b.json"
    eval_main([str(tiny_checkpoint), "--data", str(tiny_phantom), "--split", "test", "-o", str(out_ck),
               "--batch-size", "1", "--no-meteor", *DECODE])
    eval_main([str(tiny_bundle), "--data", str(tiny_phantom), "--split", "test", "-o", str(out_b), "--no-meteor",
               "--no-baseline", *DECODE])
    ck, b = json.loads(out_ck.read_text()), json.loads(out_b.read_text())
    assert ck["source_kind"] == "pytorch" and b["source_kind"] == "bundle"
    assert ck["n"] == b["n"] == 3 and ck["decoding"]["num_beams"] == 1 and ck["decoding"]["max_new_tokens"] == 12
    _check_scores(ck["model"], meteor=False)
    _check_scores(ck["baseline_most_common"], meteor=False)
    assert "baseline_most_common" not in b
    # same pixels (shared preprocess), same f32 model: the same tokens, study by study
    assert [r["token_ids"] for r in ck["predictions"]] == [r["token_ids"] for r in b["predictions"]]
    assert ck["model"]["nlg"]["BLEU_1"] == pytest.approx(b["model"]["nlg"]["BLEU_1"])
    # the repeated-sentence figure is counted from the predictions the file holds
    from emrrg.evaluate import repeats_a_sentence
    for res in (ck, b):
        rep = res["repeated_sentence_reports"]
        assert rep["of"] == 3 and rep["count"] == sum(repeats_a_sentence(r["prediction"]) for r in res["predictions"])


def test_repeated_sentence_rule():
    from emrrg.evaluate import repeated_sentence_reports, repeats_a_sentence

    # the demo's looping report before no_repeat_ngram_size (issue 14)
    loop = ("No pneumothorax is present. There is a right-sided pleural effusion. There is no pneumothorax. "
            "There is a right-sided pleural effusion. There")
    assert repeats_a_sentence(loop)
    assert repeats_a_sentence("Heart size is normal!  heart SIZE is normal")      # case and spaces folded
    assert not repeats_a_sentence("There is mild right sided pleural effusion. There is mild left sided pleural effusion.")
    assert not repeats_a_sentence("")
    # abbreviations and decimals end no sentence: two different sentences that both say "p.m." / "1.5" are no repeat
    assert not repeats_a_sentence("Seen at 12:04 p.m. today. Compared with 3 a.m. films. A 1.5 cm nodule. A 2.5 cm mass.")
    assert repeats_a_sentence("Seen at 12:04 p.m. today. No effusion. Seen at 12:04 p.m. today.")
    # "p.m. today" ends no sentence, so two sentences that share only their "... p.m." start are no repeat
    assert not repeats_a_sentence("Seen at 3 p.m. today. Seen at 3 p.m. tomorrow.")
    assert repeats_a_sentence("no pneumothorax. no pneumothorax.")                # a lower-case loop still splits
    assert repeated_sentence_reports([loop, "No acute findings.", loop])["count"] == 2


def test_baseline_is_the_most_common_training_report(tiny_phantom):
    from emrrg.data.annotation import load_annotation
    from emrrg.evaluate import most_common_report

    assert most_common_report([{"report": r} for r in ("b", "a", "a", "b", "c")]) == "b"  # tie: the first
    train = load_annotation(tiny_phantom)["train"]
    assert most_common_report(train) in {e["report"] for e in train}


def test_eval_ptb_tokenizer(tiny_checkpoint, tiny_phantom, tmp_path):
    """The PTB tokenizer (Java) as upstream when Java is there. (METEOR's jar takes ~20 s to load its
    paraphrase table; tests/metrics/test_nlg.py covers it.)"""
    from emrrg.evaluate import eval_main
    from emrrg.metrics.nlg import java_available

    if not java_available():
        pytest.skip("no java: the PTB tokenizer and METEOR need it")
    out = tmp_path / "m.json"
    eval_main([str(tiny_checkpoint), "--data", str(tiny_phantom), "--split", "val", "-o", str(out), "--no-meteor",
               "--tokenizer", "ptb", *DECODE])
    res = json.loads(out.read_text())
    assert res["model"]["nlg"]["tokenizer"] == "ptb" and res["split"] == "val" and res["n"] == 2
    _check_scores(res["model"], meteor=False)


def test_workers_give_the_reports_of_one_process(tiny_checkpoint, tiny_phantom, tmp_path):
    """--workers 2 (slices of 1 and 2 studies, one spawned process each) writes the same reports, in split
    order, as one process at batch size 1: the same per-study computation."""
    from emrrg.evaluate import eval_main

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    common = [str(tiny_checkpoint), "--data", str(tiny_phantom), "--split", "test", "--batch-size", "1",
              "--no-meteor", "--no-baseline", *DECODE]
    eval_main([*common, "-o", str(one)])
    eval_main([*common, "-o", str(two), "--workers", "2"])
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert [r["id"] for r in a["predictions"]] == [r["id"] for r in b["predictions"]] and len(a["predictions"]) == 3
    assert [r["token_ids"] for r in a["predictions"]] == [r["token_ids"] for r in b["predictions"]]
    assert a["model"] == b["model"] and b["workers"] == 2 and "workers" not in a


def test_a_worker_that_fails_names_itself_and_its_error(tiny_checkpoint, tiny_phantom, tmp_path, capsys):
    """A corrupt image in the second worker's slice: one line naming the worker and the image, exit 2."""
    import shutil

    from emrrg.evaluate import eval_main, load_split

    data = tmp_path / "phantom"
    shutil.copytree(tiny_phantom.parent, data)
    split = load_split(data / tiny_phantom.name, "test")
    bad = split.images(split.examples[-1])[0]
    bad.write_bytes(b"not an image")
    with pytest.raises(SystemExit) as e:
        eval_main([str(tiny_checkpoint), "--data", str(data / tiny_phantom.name), "--split", "test", "--no-meteor",
                   "--no-baseline", *DECODE, "--workers", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "worker 2 of 2" in err and bad.name in err and len(err.strip().splitlines()) == 1, err


def test_eval_errors(tiny_phantom, tmp_path, capsys):
    from emrrg.evaluate import eval_main

    for argv, msg in (([str(tmp_path / "nope"), "--data", str(tiny_phantom)], "no such checkpoint"),
                      ([str(tmp_path), "--data", str(tiny_phantom)], "neither an emrrg checkpoint"),
                      ([str(tmp_path), "--data", str(tmp_path / "a.json")], "no such annotation")):
        with pytest.raises(SystemExit) as e:
            eval_main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_iu_scores_labeler_on_real_reports(tmp_path):
    from emrrg.assets import MissingAssetError
    from emrrg.evaluate import eval_main, iu_mesh_labels

    assert iu_mesh_labels(["Cardiomegaly/mild", "Pleural Effusion/right", "Calcinosis"]) == {
        **{c: 0 for c in iu_mesh_labels([])}, "Cardiomegaly": 1, "Pleural Effusion": 1}
    out = tmp_path / "iu.json"
    try:
        eval_main(["--iu", "--limit", "300", "--no-meteor", "--tokenizer", "simple", "-o", str(out)])
    except SystemExit as e:  # the asset package is missing: a clear error, not a crash
        pytest.skip(f"torchxrayvision data not installed (exit {e.code})")
    except MissingAssetError:
        pytest.skip("torchxrayvision data not installed")
    res = json.loads(out.read_text())
    assert res["n"] == 300
    lab = res["labeler_vs_mesh"]
    # the labeler agrees with NLM's MeSH coding on real reports well above chance (observed ~0.8 on all reports)
    assert lab["f1_micro"] > 0.6 and lab["per_class"]["No Finding"]["f1"] > 0.6, lab["f1_micro"]
    for k in ("baseline_most_common", "baseline_shuffled"):
        assert 0 <= res[k]["ce"]["f1_micro"] <= 1 and 0 < res[k]["nlg"]["BLEU_1"] <= 1
    assert "NLMCXR" in res["source"]


def test_eval_decoding_flags_override_the_source(tiny_checkpoint, tiny_phantom, tmp_path):
    """Every decoding flag reaches the generation settings the JSON records (the source's own are the rest)."""
    from emrrg.evaluate import eval_main

    out = tmp_path / "lp.json"
    eval_main([str(tiny_checkpoint), "--data", str(tiny_phantom), "--split", "test", "--limit", "1", "-o", str(out),
               "--no-meteor", "--no-baseline", "--beams", "2", "--max-new-tokens", "6", "--min-new-tokens", "6",
               "--repetition-penalty", "1.1", "--length-penalty", "0.5", "--no-repeat-ngram-size", "2", "--threads", "1",
               "--no-progress"])
    d = json.loads(out.read_text())["decoding"]
    assert d == {"num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 6, "repetition_penalty": 1.1,
                 "length_penalty": 0.5, "no_repeat_ngram_size": 2}
