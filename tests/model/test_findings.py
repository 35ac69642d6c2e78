"""Finding tokens (emrrg.findings): the gates, the classifier fit, the checkpoint, training, and the exported
bundle against the PyTorch reference."""
import json

import numpy as np
import pytest
import torch

from emrrg.checkpoint import load_checkpoint, save_checkpoint
from emrrg.config import make_config
from emrrg.findings import PAD_TEXT, fit_head, slot_texts
from emrrg.model import EMRRG

NAMES = ("cardiomegaly", "pleural_effusion", "pneumothorax")
# The gate blend and the fold of the standardisation into the head are f32 / f64 arithmetic on O(1) values.
BLEND_ATOL = 1e-6
# fit_head's raw-feature head against the logits of its standardised fit: one f64 fold, rounded to f32.
FOLD_ATOL = 1e-4
# A linearly separable rule with 2% label noise: a fitted logistic regression is right on at least this share
# of held-out samples (the noise alone costs 2%; a head that ignores the features gets ~50-70%).
HELD_OUT_ACCURACY = 0.93


def _model(findings=NAMES, seed=0):
    torch.manual_seed(seed)
    cfg = make_config("tiny", "tiny-llama", "iu", encoder_overrides=dict(lora_rank=4))
    model = EMRRG(cfg).eval()
    if findings:
        model.add_finding_tokens(findings)
        with torch.no_grad():   # a head that is not zero, so the classifier's p differ per image
            model.finding_prompt.head.weight.normal_(0, 0.5)
            model.finding_prompt.head.bias.normal_(0, 0.5)
    return model


def test_gates_select_present_absent_and_blend():
    m = _model().finding_prompt
    tokens = torch.randn(4, 17, 32)
    k = len(NAMES)
    ones, zeros = torch.ones(4, k), torch.zeros(4, k)
    present, absent = m.present.flatten(0, 1), m.absent.flatten(0, 1)     # (K * S, H): finding-major
    torch.testing.assert_close(m(tokens, ones), present.expand(4, -1, -1), atol=BLEND_ATOL, rtol=0)
    torch.testing.assert_close(m(tokens, zeros), absent.expand(4, -1, -1), atol=BLEND_ATOL, rtol=0)
    p = torch.sigmoid(m.logits(tokens))
    want = (p[..., None, None] * m.present + (1 - p[..., None, None]) * m.absent).flatten(1, 2)
    torch.testing.assert_close(m(tokens), want, atol=BLEND_ATOL, rtol=0)
    # one finding's gate moves its own slots only
    g = zeros.clone()
    g[:, 1] = 1
    out, S = m(tokens, g), m.present.shape[1]
    torch.testing.assert_close(out[:, S:2 * S], m.present[1].expand(4, -1, -1), atol=BLEND_ATOL, rtol=0)
    torch.testing.assert_close(out[:, :S], m.absent[0].expand(4, -1, -1), atol=BLEND_ATOL, rtol=0)
    # a NaN row keeps the classifier's p; the other rows take the given gates
    mixed = ones.clone()
    mixed[1] = float("nan")
    out = m(tokens, mixed)
    torch.testing.assert_close(out[1], want[1], atol=BLEND_ATOL, rtol=0)
    torch.testing.assert_close(out[0], present, atol=BLEND_ATOL, rtol=0)
    assert not torch.allclose(out[1], out[0])


def test_slots_start_as_the_words_of_the_finding_and_its_negation():
    """At gate 1 the LLM reads the input embeddings of " pleural effusion,", at 0 those of " no pleural effusion,"
    (padded with ","): its own words, which an RMSNorm'd LLM reads by direction (a gate that only scaled one
    vector would read the same at every p > 0)."""
    model = _model()
    tok, emb = model.tokenizer, model.llama_model.get_input_embeddings().weight
    S = model.cfg.finding_slots
    pad = tok(PAD_TEXT, add_special_tokens=False)["input_ids"][-1]
    assert S == max(len(tok(t, add_special_tokens=False)["input_ids"]) for n in NAMES for t in slot_texts(n))
    for k, name in enumerate(NAMES):
        for vec, text in zip((model.finding_prompt.present, model.finding_prompt.absent), slot_texts(name)):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) <= S
            torch.testing.assert_close(vec[k], emb[ids + [pad] * (S - len(ids))], atol=0, rtol=0)
    assert slot_texts("pleural_effusion") == (" pleural effusion,", " no pleural effusion,")


def test_encode_images_appends_one_token_per_finding():
    model = _model()
    px = torch.randn(2, 1, 3, 64, 64)
    out = model.encode_images(px)
    L = model.cfg.encoder.num_tokens
    S = model.cfg.finding_slots
    assert out.shape == (2, L + len(NAMES) * S, model.llama_proj.out_features)
    assert model.cfg.num_visual_tokens == L + 3 * S
    plain = model.layer_norm(model.llama_proj(model.visual_encoder.encode_study(px)))
    torch.testing.assert_close(out[:, :L], plain, atol=0, rtol=0)
    gated = model.encode_images(px, torch.ones(2, len(NAMES)))
    torch.testing.assert_close(gated[:, L:], model.finding_prompt.present.flatten(0, 1).expand(2, -1, -1),
                               atol=BLEND_ATOL, rtol=0)


def test_fit_head_learns_a_separable_rule_and_reads_raw_features():
    rng = np.random.default_rng(0)
    n, f = 600, 12
    scale = rng.uniform(0.1, 50.0, f)                       # raw features on very different scales
    x = rng.normal(size=(n, f)) * scale + rng.normal(size=f) * 10
    z = (x - x[:400].mean(0)) / scale
    y = np.stack([z[:, 0] > 0, z[:, 1] + z[:, 2] > 0.3], 1).astype(np.float32)
    flip = rng.random(y.shape) < 0.02
    y[flip] = 1 - y[flip]
    head = torch.nn.Linear(f, 2).double()
    rec = fit_head(head, x[:400], y[:400], x[400:500], y[400:500])
    assert rec["l2"] in (1e-4, 1e-3, 1e-2, 1e-1) and rec["val_bce"] < 0.3
    with torch.no_grad():
        pred = head(torch.from_numpy(x[500:])).numpy() > 0
    assert (pred == (y[500:] > 0.5)).mean() >= HELD_OUT_ACCURACY
    # without a val split: one fit at the middle strength
    assert fit_head(torch.nn.Linear(f, 2).double(), x[:400], y[:400])["l2"] == 1e-2


def test_fit_head_folds_the_standardisation_into_the_head():
    from emrrg.findings import _logreg

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)) * [1, 10, 100, 0.1, 3] + [5, -3, 40, 0, 1]
    y = (rng.random((200, 2)) < 0.4).astype(np.float32)
    head = torch.nn.Linear(5, 2).double()
    fit_head(head, x, y, l2=(1e-2,))
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w, b = _logreg(torch.from_numpy((x - mu) / sd), torch.from_numpy(y.astype(np.float64)), 1e-2)
    want = torch.from_numpy((x - mu) / sd) @ w.T + b
    with torch.no_grad():
        torch.testing.assert_close(head(torch.from_numpy(x)), want, atol=FOLD_ATOL, rtol=0)


def test_checkpoint_round_trip_keeps_the_finding_tokens(tmp_path):
    model = _model()
    ckpt = save_checkpoint(model, tmp_path / "ck")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["finding_tokens"] == list(NAMES) and cfg["finding_slots"] == model.cfg.finding_slots > 0
    back = load_checkpoint(ckpt)
    assert back.cfg.finding_tokens == NAMES and back.cfg.num_visual_tokens == model.cfg.num_visual_tokens
    px = torch.randn(1, 1, 3, 64, 64)
    torch.testing.assert_close(back.encode_images(px), model.encode_images(px), atol=0, rtol=0)
    # a checkpoint written before finding tokens existed has none
    plain = load_checkpoint(save_checkpoint(_model(findings=()), tmp_path / "plain"))
    assert plain.finding_prompt is None and plain.cfg.num_visual_tokens == plain.cfg.encoder.num_tokens


def test_teacher_gates_mix_drawn_labels_and_nan():
    from emrrg.train import teacher_gates

    y = torch.tensor([[1.0, 0.0, 1.0]] * 200)
    g = teacher_gates(y, 0.5, [0, 77, 3])
    taught = ~torch.isnan(g).any(1)
    assert torch.isnan(g[~taught]).all() and (g[taught] == y[taught]).all()
    assert 60 < int(taught.sum()) < 140                     # binomial(200, 0.5): 100 +- 40 is > 5 sigma
    assert torch.equal(torch.isnan(teacher_gates(y, 0.5, [0, 77, 3])), torch.isnan(g))   # same seed, same draw
    assert not torch.isnan(teacher_gates(y, 1.0, [0, 1])).any() and torch.isnan(teacher_gates(y, 0.0, [0, 1])).all()


def test_training_with_finding_tokens(tiny_phantom, tmp_path, capsys):
    """--finding-tokens: the classifier is fitted before the LM steps and then held; the token vectors train;
    the checkpoint keeps both and the config names the drawn labels."""
    from emrrg.data.phantom import FINDINGS
    from emrrg.train import train_main
    from tests.model.test_train import TINY

    run = tmp_path / "run"
    train_main(["--data", str(tiny_phantom), "-o", str(run), *TINY, "--steps", "3", "--batch-size", "4",
                "--lr", "1e-2", "--encoder-lr", "0", "--finding-tokens", "--finding-teacher", "0.5"])
    out, err = capsys.readouterr()
    assert "finding tokens: 11 drawn labels, classifier fitted on 8 studies" in out
    assert "fitted on the frozen encoder" not in err                      # the encoder is held: no warning
    fit = json.loads(out.split("classifier fitted on 8 studies in ")[1].split(": ", 1)[1].splitlines()[0])
    assert fit["l2"] in (1e-4, 1e-3, 1e-2, 1e-1) and "val_bce" in fit   # the val split chose it (--val-limit 0)
    trained = load_checkpoint(run / "last")
    assert trained.cfg.finding_tokens == tuple(FINDINGS)
    assert "finding_prompt.present" in json.loads((run / "run.json").read_text())["trainable"]
    assert "finding_prompt.head.weight" not in json.loads((run / "run.json").read_text())["trainable"]
    # the vectors moved from their start at the names' embeddings; the fitted head did not move with the LM
    fresh = _model(findings=())
    fresh.llama_model = trained.llama_model
    fresh.tokenizer = trained.tokenizer
    fresh.add_finding_tokens(FINDINGS)
    assert not torch.allclose(trained.finding_prompt.present, fresh.finding_prompt.present)
    from emrrg.findings import encoder_features
    from emrrg.evaluate import load_split
    from emrrg.train import StudyData, drawn_labels

    split = load_split(tiny_phantom, "train")
    data = StudyData(split, trained.tokenizer, 64, 8)
    head = torch.nn.Linear(64, len(FINDINGS)).double()
    fit_head(head, encoder_features(trained, data.pixels, len(data)), drawn_labels(split.examples),
             *(lambda v: (encoder_features(trained, StudyData(v, trained.tokenizer, 64, 8).pixels, len(v.examples)),
                          drawn_labels(v.examples)))(load_split(tiny_phantom, "val")))
    torch.testing.assert_close(trained.finding_prompt.head.weight.double(), head.weight, atol=FOLD_ATOL, rtol=0)


def test_finding_tokens_refused_when_labels_differ(tiny_phantom, tmp_path, capsys):
    """A checkpoint whose finding tokens are not this data's labels cannot be taught with them: exit 2, a clear
    message, no run folder."""
    from emrrg.train import train_main
    from tests.model.test_train import TINY

    ckpt = save_checkpoint(_model(), tmp_path / "ck")
    rest = [a for a in TINY if a not in ("--encoder", "tiny", "--decoder", "tiny-llama")]
    with pytest.raises(SystemExit) as e:
        train_main(["--data", str(tiny_phantom), "-o", str(tmp_path / "r"), "--init", str(ckpt), *rest,
                    "--lora-rank", "4", "--steps", "1"])
    assert e.value.code == 2
    assert "are not this data's drawn labels; use --finding-teacher 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as e:
        train_main(["--data", str(tiny_phantom), "-o", str(tmp_path / "t"), *TINY, "--finding-tokens",
                    "--finding-teacher", "1.5"])
    assert e.value.code == 2 and "--finding-teacher 1.5: give a fraction in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_finding_tokens_with_a_training_encoder_warn(tiny_phantom, tmp_path, capsys):
    """The classifier is fitted on the frozen encoder and held: training the encoder under it is allowed, with a
    warning on stderr that says how to hold it."""
    from emrrg.train import train_main
    from tests.model.test_train import TINY

    train_main(["--data", str(tiny_phantom), "-o", str(tmp_path / "r"), *TINY, "--steps", "1", "--batch-size", "2",
                "--finding-tokens", "--encoder-lr", "1e-3"])
    assert "fitted on the frozen encoder and is held" in capsys.readouterr().err


def test_bundle_with_finding_tokens_matches_the_reference(tmp_path):
    """The finding tokens export as part of the encoder graph: the manifest counts them, the runtime's visual
    tokens equal EMRRG.encode_images, and its greedy report equals PyTorch's token for token."""
    from emrrg.assets import chest_dicom
    from emrrg.export.pipeline import ExportOptions, export_bundle
    from emrrg.runtime.bundle import verify_bundle
    from emrrg.runtime.report_runtime import Runtime
    from tests.adapters import randomize_adapters
    from tests.runtime.test_runtime import ATOL_VISUAL_F32

    model = _model()
    randomize_adapters(model, scale=0.05, seed=1)
    ckpt = save_checkpoint(model, tmp_path / "ck")
    bundle = tmp_path / "bundle"
    export_bundle(ckpt, bundle, ExportOptions(llm_bits=32, max_calib=2), progress=False)
    m = verify_bundle(bundle)
    assert m["encoder"]["num_tokens"] == model.cfg.encoder.num_tokens + len(NAMES) * model.cfg.finding_slots
    ref = load_checkpoint(ckpt)
    ref.merge_adapters()
    rt = Runtime.from_pretrained(bundle)
    px = ref.pixel_values([str(chest_dicom())])
    with torch.no_grad():
        want_tokens = ref.encode_images(px).numpy()
    got_tokens = rt.encode(px.numpy())
    np.testing.assert_allclose(got_tokens, want_tokens, atol=ATOL_VISUAL_F32, rtol=0)
    want = ref.generate_ids(px, num_beams=1, min_new_tokens=20, max_new_tokens=20)[0].tolist()
    got = rt.generate([str(chest_dicom())], num_beams=1, min_new_tokens=20, max_new_tokens=20)["token_ids"]
    assert got == want
