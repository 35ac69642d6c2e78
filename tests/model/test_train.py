"""emrrg-train on tiny + tiny-llama with a tiny phantom set, and the fast training scan vs the reference.

What is checked:
- `selective_scan_fast` equals `selective_scan_ref` in value and in every gradient (f32, named tolerances);
- the loss is the upstream one: report tokens only, after the prompt (cross-checked with transformers' own
  shifted loss over the full sequence with the prompt masked);
- only the intended parameters train (encoder Partial LoRA, projector, LLM LoRA, hybrid cross-attention);
- a few steps make the loss go down (a named margin over the first steps' mean);
- a run stopped and resumed continues at the same step with the same losses as an uninterrupted run;
- checkpoints are replaced atomically; QLoRA (bitsandbytes NF4) trains and saves f32 weights.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from emrrg.ops.scan_fast import LinearRecurrence, selective_scan_fast
from emrrg.ops.selective_scan import selective_scan_ref

# f32 against f32: the same sums in a different order (the reference accumulates through einsum per step).
SCAN_FWD_ATOL, SCAN_FWD_RTOL = 1e-5, 1e-5
SCAN_GRAD_ATOL, SCAN_GRAD_RTOL = 1e-4, 1e-4
# A stopped-and-resumed run replays the same batches from the same weights and optimizer state: the
# losses must agree to f32 round-off (they are bit-identical on one thread; allow for library nondeterminism).
RESUME_RTOL = 1e-5
# 16 steps on 8 studies at a high learning rate (LoRA + projector over a random tiny LLM whose lm_head is
# frozen, so the drop is slow): the last 4 steps' mean loss must sit this far below the first 4 steps'
# (observed: ~0.16 nats, ln(512) = 6.24 at the start).
LOSS_DROP_NATS = 0.05
# Encoder pre-training on 8 studies' labels, 80 steps: the BCE must fall by this much (observed ~0.10).
PRETRAIN_BCE_DROP = 0.04
# 200 epochs of 20 draws with replacement: the rare label's observed share vs its expected 1/3 (binomial
# standard error sqrt(1/3 * 2/3 / 4000) = 0.0075; 4 standard errors).
BALANCE_SHARE_ATOL = 0.03
# The loss equals transformers' own LM loss with the prompt masked, up to f32 reduction order.
LOSS_MATCH_ATOL = 1e-5
# A grown LoRA rescales the trained B by old/new (alpha / rank): one f32 rounding per element of B, ~1e-7 of
# the LoRA delta, far below this on the tiny model's O(1) logits; a misplaced factor moves them by O(0.1).
GROWN_LORA_ATOL = 1e-5

TINY = ["--encoder", "tiny", "--decoder", "tiny-llama", "--max-report-tokens", "24", "--threads", "1",
        "--progress", "log", "--log-every", "100", "--val-limit", "0", "--save-every", "0"]


# ---- the fast scan -------------------------------------------------------------------------------------

def _scan_inputs(b, d, L, n, g, with_d, with_z, with_bias, softplus, seed=0):
    gen = torch.Generator().manual_seed(seed)  # without softplus, delta (and its bias) must be > 0 to stay stable
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    xs = {
        "u": r(b, d, L), "delta": r(b, d, L) * 0.5 if softplus else torch.rand(b, d, L, generator=gen) * 0.2, "A": -torch.rand(d, n, generator=gen) * 4 - 0.1,
        "B": r(b, g, n, L), "C": r(b, g, n, L),
        "D": r(d) if with_d else None, "z": r(b, d, L) if with_z else None,
        "delta_bias": (r(d) * 0.3 if softplus else torch.rand(d, generator=gen) * 0.05) if with_bias else None,
    }
    return {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in xs.items()}


@pytest.mark.parametrize("with_d,with_z,with_bias,softplus", [
    (True, True, True, True), (False, False, False, True), (True, False, True, False), (False, True, False, True)])
@pytest.mark.parametrize("shape", [(2, 8, 17, 4, 4), (1, 12, 5, 16, 1), (2, 16, 50, 16, 4)])
def test_scan_fast_matches_reference(shape, with_d, with_z, with_bias, softplus):
    ref_in = _scan_inputs(*shape, with_d, with_z, with_bias, softplus)
    fast_in = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in ref_in.items()}
    y_ref = selective_scan_ref(**ref_in, delta_softplus=softplus)
    y_fast = selective_scan_fast(**fast_in, delta_softplus=softplus)
    diff = (y_ref - y_fast).abs()
    print(f"y: max {diff.max():.3e} mean {diff.mean():.3e}")
    assert torch.isfinite(y_fast).all()
    torch.testing.assert_close(y_fast, y_ref, atol=SCAN_FWD_ATOL, rtol=SCAN_FWD_RTOL)
    go = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1))
    y_ref.backward(go)
    y_fast.backward(go)
    for k, v in ref_in.items():
        if v is None:
            continue
        gd = (v.grad - fast_in[k].grad).abs()
        print(f"d{k}: max {gd.max():.3e} mean {gd.mean():.3e} (|grad| max {v.grad.abs().max():.3e})")
        torch.testing.assert_close(fast_in[k].grad, v.grad, atol=SCAN_GRAD_ATOL, rtol=SCAN_GRAD_RTOL)


def test_linear_recurrence_gradcheck():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(6, 2, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    x = torch.randn(6, 2, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(LinearRecurrence.apply, (a, x))


def test_mixer_scan_fn_switch_keeps_outputs():
    """`use_scan` swaps only the training scan; the encoder's output is the reference's."""
    from emrrg.config import make_config
    from emrrg.model import EMRRG
    from emrrg.ops.selective_scan import selective_scan
    from emrrg.train import use_scan

    torch.manual_seed(0)
    model = EMRRG(make_config("tiny", "tiny-llama", "iu", encoder_overrides=dict(lora_rank=4))).eval()
    assert all(layer.mixer.scan_fn is selective_scan for layer in model.visual_encoder.layers)  # default untouched
    px = torch.randn(2, 1, 3, 64, 64)
    with torch.no_grad():
        ref = model.encode_images(px)
        use_scan(model, "fast")
        fast = model.encode_images(px)
    torch.testing.assert_close(fast, ref, atol=SCAN_FWD_ATOL, rtol=SCAN_FWD_RTOL)


# ---- data + model helpers ---------------------------------------------------------------------------------

def _losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
            if "loss" in r]


def _tiny_model(hybrid=(1,)):
    from emrrg.config import make_config
    from emrrg.model import EMRRG

    torch.manual_seed(0)
    cfg = make_config("tiny", "tiny-llama", "iu", encoder_overrides=dict(lora_rank=4),
                      decoder_overrides=dict(lora_rank=4, hybrid_layers=hybrid))
    return EMRRG(cfg)


def test_only_intended_params_trainable():
    from emrrg.train import mark_trainable

    model = _tiny_model()
    names = mark_trainable(model, "lora")
    assert names == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    kinds = {"encoder_partial_lora": 0, "projector": 0, "llm_lora": 0, "hybrid": 0}
    for n in names:
        if n.startswith("visual_encoder."):
            assert ".in_proj_lora.lora_" in n, n
            kinds["encoder_partial_lora"] += 1
        elif n.startswith(("llama_proj.", "layer_norm.")):
            kinds["projector"] += 1
        elif ".cross_attn." in n:
            kinds["hybrid"] += 1
        else:
            assert ("lora_A" in n or "lora_B" in n) and (".q_proj." in n or ".v_proj." in n), n
            kinds["llm_lora"] += 1
    depth = model.cfg.encoder.depth
    n_llm = model.llama_model.config.num_hidden_layers
    assert kinds == {"encoder_partial_lora": 2 * depth, "projector": 4, "llm_lora": 4 * n_llm, "hybrid": 7}, kinds
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "visual_encoder.layers.0.mixer.in_proj.weight" in frozen
    assert "visual_encoder.patch_embed.proj.weight" in frozen
    assert any(n.endswith("embed_tokens.weight") for n in frozen) and any("lm_head" in n for n in frozen)
    full = mark_trainable(model, "full")
    assert "visual_encoder.layers.0.mixer.in_proj.weight" in full and "visual_encoder.pos_embed" in full
    assert not any(n.endswith("embed_tokens.weight") or "lm_head" in n for n in full)


def test_loss_is_on_report_tokens_after_the_prompt():
    """Our loss == transformers' shifted LM loss on [prompt | report] with the prompt labelled -100."""
    from emrrg.train import IGNORE, lm_loss

    model = _tiny_model(hybrid=()).eval()
    tok = model.tokenizer
    report = tok("Mild cardiomegaly. No effusion.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([report])
    px = torch.randn(1, 1, 3, 64, 64)
    with torch.no_grad():
        ours = lm_loss(model, px, ids, ids.clone())
        visual = model.encode_images(px)
        prompt = model.prompt_embeds(visual)
        embeds = torch.cat([prompt, model.llama_model.get_input_embeddings()(ids)], 1)
        labels = torch.cat([torch.full((1, prompt.shape[1]), IGNORE), ids], 1)
        theirs = model.llama_model(inputs_embeds=embeds, labels=labels).loss
    print(f"ours {ours:.6f} transformers {theirs:.6f}")
    assert abs(float(ours) - float(theirs)) < LOSS_MATCH_ATOL
    before, after = model.prompt_ids()
    assert before[0] == tok.bos_token_id and tok.decode(after).startswith("</Img> Generate")


def test_lm_label_loss_reads_the_prompts_last_position():
    """--lm-label-loss: the head reads the LLM's final hidden state where the report starts. Causal attention
    makes it the prompt-only forward's last position, whatever the report; 'lm' is lm_loss unchanged."""
    import torch.nn.functional as F

    from emrrg.train import label_head, lm_loss, lm_losses

    model = _tiny_model(hybrid=()).eval()
    tok = model.tokenizer
    ids = torch.tensor([tok("Mild cardiomegaly. No effusion.", add_special_tokens=False)["input_ids"]
                        + [tok.eos_token_id]] * 2)
    px = torch.randn(2, 1, 3, 64, 64)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    head = label_head(model.llama_proj.out_features, y.numpy(), torch.Generator().manual_seed(0))
    with torch.no_grad():
        head.weight.normal_(0, 1.0)  # not the near-zero init: the logits must depend on the hidden state
        terms = lm_losses(model, px, ids, ids.clone(), head=head, y=y)
        prompt = model.prompt_embeds(model.encode_images(px))
        hidden = model.llama_model(inputs_embeds=prompt, output_hidden_states=True).hidden_states[-1][:, -1]
        theirs = F.binary_cross_entropy_with_logits(head(hidden), y)
        plain = lm_loss(model, px, ids, ids.clone())
    print(f"label BCE ours {float(terms['label']):.6f} prompt-only {float(theirs):.6f}")
    assert abs(float(terms["label"]) - float(theirs)) < LOSS_MATCH_ATOL
    assert abs(float(terms["lm"]) - float(plain)) < LOSS_MATCH_ATOL
    # the prior-initialised head starts at the labels' prior
    b = label_head(8, y.numpy(), torch.Generator().manual_seed(0)).bias.detach()
    np.testing.assert_allclose(torch.sigmoid(b).numpy(), [0.5, 1e-3, 1 - 1e-3], rtol=1e-5)


def test_weighted_lm_loss_is_the_weighted_mean_of_the_token_losses():
    """lm_losses(weights=...): sum(w * ce) / sum(w) over the report tokens; all-ones weights give lm_loss."""
    import torch.nn.functional as F

    from emrrg.train import IGNORE, lm_loss, lm_losses

    model = _tiny_model(hybrid=()).eval()
    tok = model.tokenizer
    ids = torch.tensor([tok("Mild cardiomegaly. No effusion.", add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[0, -3:] = IGNORE                                   # as padding: never counted, whatever its weight
    px = torch.randn(1, 1, 3, 64, 64)
    w = torch.linspace(0.5, 4.0, ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        ours = lm_losses(model, px, ids, labels, weights=w)["lm"]
        ones = lm_losses(model, px, ids, labels, weights=torch.ones_like(w))["lm"]
        plain = lm_loss(model, px, ids, labels)
        prompt = model.prompt_embeds(model.encode_images(px))
        embeds = torch.cat([prompt, model.llama_model.get_input_embeddings()(ids)], 1)
        logits = model.llama_model(inputs_embeds=embeds).logits[0, prompt.shape[1] - 1:-1]
        ce = F.cross_entropy(logits, ids[0], reduction="none")
        keep = labels[0] != IGNORE
        theirs = (ce[keep] * w[0, keep]).sum() / w[0, keep].sum()
    assert abs(float(ours) - float(theirs)) < LOSS_MATCH_ATOL
    assert abs(float(ones) - float(plain)) < LOSS_MATCH_ATOL and abs(float(ours) - float(plain)) > 10 * LOSS_MATCH_ATOL


def test_lm_label_loss_run_logs_both_terms_and_saves_no_head(tiny_phantom, tmp_path, capsys):
    from emrrg.checkpoint import load_checkpoint
    from emrrg.train import train_main

    run = tmp_path / "run"
    train_main(["--data", str(tiny_phantom), "-o", str(run), *TINY, "--steps", "3", "--batch-size", "4",
                "--lm-label-loss", "0.5"])
    recs = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(recs) == 3
    for r in recs:
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.5 * r["label_bce"], rel=1e-5)
    assert "lm_label_head" in torch.load(run / "last" / "train_state.pt", weights_only=False)
    saved = load_checkpoint(run / "best").state_dict()
    assert not any("label" in k for k in saved)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_main(["--data", str(tiny_phantom), "-o", str(tmp_path / "neg"), *TINY, "--steps", "1",
                    "--lm-label-loss", "-1"])
    assert e.value.code == 2 and "--lm-label-loss -1" in capsys.readouterr().err
    assert not (tmp_path / "neg").exists()


def test_collate_pads_with_ignore(tiny_phantom):
    from emrrg.evaluate import load_split
    from emrrg.model import EMRRG  # noqa: F401
    from emrrg.train import IGNORE, StudyData, collate

    model = _tiny_model(hybrid=())
    data = StudyData(load_split(tiny_phantom, "train"), model.tokenizer, 64, max_report_tokens=40)
    px, ids, labels = collate(data, [0, 1, 2])
    assert px.shape == (3, 1, 3, 64, 64) and px.dtype == torch.float32
    for r, i in enumerate([0, 1, 2]):
        n = len(data.ids[i])
        assert labels[r, :n].tolist() == data.ids[i] and (labels[r, n:] == IGNORE).all()
    # the pixels are the runtime's preprocessing, bit for bit
    from emrrg.runtime.preprocess import preprocess_study
    ex = data.split.examples[1]
    np.testing.assert_array_equal(px[1].numpy(), preprocess_study(data.split.images(ex), size=64))
    # an epoch plan covers every study once, and is a function of (seed, epoch)
    plan = data.plan(3, 3, seed=7)
    assert sorted(i for b in plan for i in b) == list(range(len(data)))
    assert plan == data.plan(3, 3, seed=7) and plan != data.plan(4, 3, seed=7)


def test_lr_schedule():
    from emrrg.train import lr_factor

    assert lr_factor(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_encoder_pretraining_fits_report_labels(tiny_phantom):
    """Encoder pre-training on the CheXpert labels of the reports lowers its BCE and moves only the encoder."""
    from emrrg.evaluate import load_split
    from emrrg.train import StudyData, mark_trainable, pretrain_encoder, report_labels, use_scan

    model = _tiny_model(hybrid=())
    use_scan(model, "fast")
    mark_trainable(model, "full")
    data = StudyData(load_split(tiny_phantom, "train"), model.tokenizer, 64, max_report_tokens=16)
    y = report_labels([e["report"] for e in data.split.examples])
    assert y.shape == (8, 14) and set(np.unique(y)) <= {0.0, 1.0}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pre = pretrain_encoder(model, data, steps=80, batch_size=4, lr=1e-2, seed=0, log=lambda m: None, labels="report")
    assert pre["labels"] == "report" and pre["val"] is None
    bce = pre["bce"]
    print(f"BCE first 5 {np.mean(bce[:5]):.4f} last 5 {np.mean(bce[-5:]):.4f}")
    assert np.mean(bce[-5:]) < np.mean(bce[:5]) - PRETRAIN_BCE_DROP
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith("visual_encoder.") for n in moved)


def test_pretraining_labels_are_the_drawn_ones_when_the_annotation_has_them(tiny_phantom):
    """auto picks the drawn findings when every example has 'labels', the report's labels otherwise."""
    from emrrg.data.phantom import FINDINGS
    from emrrg.evaluate import load_split
    from emrrg.train import TrainError, label_targets

    ex = load_split(tiny_phantom, "train").examples
    y, source = label_targets(ex)
    assert source == "drawn" and y.shape == (len(ex), len(FINDINGS))
    for i, e in enumerate(ex):   # row i marks exactly the findings drawn on image i
        assert {f for f, v in zip(FINDINGS, y[i]) if v} == set(e["labels"])
    assert y.sum() > 0
    stripped = [dict(e) for e in ex]
    del stripped[3]["labels"]
    assert label_targets(stripped)[1] == "report" and label_targets(stripped)[0].shape == (len(ex), 14)
    with pytest.raises(TrainError, match="--pretrain-labels report"):
        label_targets(stripped, "drawn")


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pretraining_on_drawn_labels_scores_the_head_on_val(tiny_phantom, tmp_path, pool):
    """The CLI pre-trains on the drawn labels (either pooling) and logs the label head's val BCE / AUC (macro and
    per label, named) / accuracy in log.jsonl."""
    from emrrg.data.phantom import FINDINGS
    from emrrg.train import train_main

    run = tmp_path / "run"
    train_main(["--data", str(tiny_phantom), "-o", str(run), *TINY, "--steps", "1", "--batch-size", "2",
                "--train-encoder", "full", "--encoder-pretrain-steps", "10", "--encoder-pretrain-batch-size", "4",
                "--encoder-pretrain-lr", "1e-2", "--pretrain-pool", pool])
    rec = [r["encoder_pretrain"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
           if "encoder_pretrain" in r]
    assert len(rec) == 1 and rec[0]["labels"] == "drawn" and rec[0]["steps"] == 10 and rec[0]["pool"] == pool
    assert rec[0]["classes"] == list(FINDINGS)
    val = rec[0]["val"]
    assert val["n"] == 2 and val["step"] == 10 and math.isfinite(val["bce"])
    assert 0.0 <= val["accuracy"] <= 1.0 and 0.0 <= val["exact_sets"] <= 1.0
    assert val["auc_macro"] is None or 0.0 <= val["auc_macro"] <= 1.0
    assert len(val["auc"]) == len(FINDINGS) and all(a is None or 0.0 <= a <= 1.0 for a in val["auc"])
    assert [v["step"] for v in rec[0]["val_curve"]] == list(range(1, 11))   # every log point (steps // 10 = 1)


def test_label_head_metrics_on_known_scores():
    """AUC / accuracy / exact sets of hand-made logits (perfect, inverted, a constant label left out of the AUC)."""
    from emrrg.train import label_head_metrics

    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=np.float32)
    perfect = label_head_metrics(y, (y * 8 - 4).astype(np.float32))
    assert perfect["auc_macro"] == 1.0 and perfect["accuracy"] == 1.0 and perfect["exact_sets"] == 1.0
    inverted = label_head_metrics(y, (4 - y * 8).astype(np.float32))
    assert inverted["auc_macro"] == 0.0 and inverted["exact_sets"] == 0.0
    assert perfect["auc"] == [1.0, 1.0, None] and inverted["auc"] == [0.0, 0.0, None]   # label 3 is never present
    assert inverted["bce"] > perfect["bce"]


def test_pretraining_pools_read_the_tokens_as_documented():
    """mean: the head on the mean token; max: the largest of the head's logits over the tokens, so one token that
    shows a finding decides its logit; an unknown pooling is refused with the choices."""
    from emrrg.train import TrainError, pool_logits

    torch.manual_seed(0)
    head = torch.nn.Linear(6, 3).requires_grad_(False)
    tokens = torch.randn(2, 5, 6)
    assert torch.allclose(pool_logits(head, tokens, "mean"), head(tokens.mean(1)))
    per_token = head(tokens)                                     # (2, 5, 3)
    got = pool_logits(head, tokens, "max")
    for b in range(2):
        for k in range(3):
            assert got[b, k] == max(float(per_token[b, t, k]) for t in range(5))
    spiked = tokens.clone()
    spiked[1, 2] += 50 * head.weight[0]                 # one token strongly shows label 0
    assert pool_logits(head, spiked, "max")[1, 0] > got[1, 0] + 10
    with pytest.raises(TrainError, match="mean, max"):
        pool_logits(head, tokens, "attention")


def _rare_share(examples, plans) -> float:
    """The share of the pneumothorax studies among every study the epoch plans draw."""
    rare = [i for i, e in enumerate(examples) if "pneumothorax" in e["labels"]]
    drawn = [i for plan in plans for batch in plan for i in batch]
    return sum(i in rare for i in drawn) / len(drawn)


def test_balanced_sampling_raises_the_rare_labels_share():
    """--balance-labels: a finding on 1 study in 20 gets a larger share of the epoch's samples, more with a
    larger power; the epoch plan depends only on (seed, epoch) (what an exact resume needs)."""
    from emrrg.train import StudyData, TrainError, balance_weights

    class Split:   # StudyData needs only .examples to plan (pixels are not touched)
        examples = ([{"report": "Small right pneumothorax.", "labels": ["pneumothorax"]}]
                    + [{"report": "Cardiomegaly.", "labels": ["cardiomegaly"]}] * 15
                    + [{"report": "Normal.", "labels": []}] * 4)

    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1] * len(text.split())}

    shares = {}
    for power in (0.0, 0.5, 1.0):
        data = StudyData(Split, Tok(), 64, 16, balance=power)
        plans = [data.plan(epoch, 4, seed=0) for epoch in range(200)]
        shares[power] = _rare_share(Split.examples, plans)
        assert [data.plan(7, 4, seed=0)] == [plans[7]]   # replayable
    print("pneumothorax share of the samples:", shares)
    assert shares[0.0] == pytest.approx(1 / 20)           # a permutation: every study once per epoch
    # inverse frequency: pneumothorax (1/20), cardiomegaly (15/20) and 'no finding' (4/20) get a third each
    assert shares[1.0] == pytest.approx(1 / 3, abs=BALANCE_SHARE_ATOL)
    assert shares[0.0] < shares[0.5] < shares[1.0]
    w = balance_weights(Split.examples, 1.0)
    assert w.sum() == pytest.approx(1.0) and w[0] == pytest.approx(15 * w[1])
    with pytest.raises(TrainError, match="power >= 0"):
        balance_weights(Split.examples, -1.0)


# ---- the CLI: loss goes down, resume, atomic checkpoints ------------------------------------------------------

def test_loss_goes_down(tiny_phantom, tmp_path):
    from emrrg.train import train_main

    run = tmp_path / "run"
    train_main(["--data", str(tiny_phantom), "-o", str(run), *TINY, "--steps", "16", "--batch-size", "4",
                "--lr", "1e-2", "--warmup", "2", "--train-encoder", "lora"])
    losses = [l for _, l in _losses(run)]
    assert len(losses) == 16 and all(math.isfinite(l) for l in losses)
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    print(f"loss: first 4 steps {first:.4f}, last 4 steps {last:.4f}")
    assert last < first - LOSS_DROP_NATS
    # a finished run leaves last/ (with the training state) and best/ (a plain checkpoint that loads)
    from emrrg.checkpoint import load_checkpoint
    assert (run / "last" / "train_state.pt").is_file() and not (run / "best" / "train_state.pt").exists()
    assert load_checkpoint(run / "best").cfg.encoder.lora_rank == 8
    assert not list(run.glob(".*"))  # no staging leftovers


@pytest.mark.parametrize("extra", [["--balance-labels", "0"], ["--balance-labels", "1"], ["--lm-label-loss", "1"]],
                         ids=["uniform", "balanced", "lm-label-loss"])
def test_resume_continues_with_same_step_and_loss(tiny_phantom, tmp_path, capsys, extra):
    from emrrg.train import train_main

    common = ["--data", str(tiny_phantom), *TINY, "--steps", "6", "--batch-size", "3", "--lr", "5e-3",
              "--warmup", "1", *extra]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_main(["-o", str(straight), *common])
    train_main(["-o", str(stopped), *common, "--stop-after", "3"])
    assert [s for s, _ in _losses(stopped)] == [1, 2, 3]
    state = torch.load(stopped / "last" / "train_state.pt", weights_only=False)
    assert state["step"] == 3
    capsys.readouterr()
    train_main(["-o", str(stopped), "--resume", "--threads", "1", "--progress", "log"])
    assert "resumed" in capsys.readouterr().out
    a, b = _losses(straight), _losses(stopped)
    print("straight", a, "\nresumed ", b)
    assert [s for s, _ in b] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([l for _, l in b], [l for _, l in a], rtol=RESUME_RTOL, atol=0)
    assert torch.load(stopped / "last" / "train_state.pt", weights_only=False)["step"] == 6


def test_a_chunk_that_reaches_the_last_step_finishes_the_run(tiny_phantom, tmp_path):
    """--stop-after equal to --steps (the last chunk of a chunked run) ends like an uninterrupted run: best/ is written."""
    from emrrg.train import train_main

    run = tmp_path / "run"
    args = ["--data", str(tiny_phantom), *TINY, "--steps", "4", "--batch-size", "2"]
    train_main(["-o", str(run), *args, "--stop-after", "2"])
    assert not (run / "best").exists()
    train_main(["-o", str(run), "--resume", "--threads", "1", "--progress", "log", "--stop-after", "4"])
    assert (run / "best" / "val.json").is_file() and [s for s, _ in _losses(run)] == [1, 2, 3, 4]


def test_existing_run_needs_resume(tiny_phantom, tmp_path, capsys):
    from emrrg.train import train_main

    run = tmp_path / "run"
    args = ["--data", str(tiny_phantom), "-o", str(run), *TINY, "--steps", "1", "--batch-size", "2"]
    train_main(args)
    with pytest.raises(SystemExit) as e:
        train_main(args)
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_main(["-o", str(tmp_path / "nothing"), "--resume"])
    assert e.value.code == 2


def test_write_checkpoint_is_atomic(tmp_path, monkeypatch):
    import emrrg.checkpoint as ck
    from emrrg.train import TRAIN_STATE, find_last, write_checkpoint

    model = _tiny_model(hybrid=())
    write_checkpoint(model, tmp_path, "last", state={"step": 1})
    boom = RuntimeError("disk full")

    def failing_save(*a, **k):
        raise boom

    monkeypatch.setattr(ck, "save_checkpoint", failing_save)
    with pytest.raises(RuntimeError):
        write_checkpoint(model, tmp_path, "last", state={"step": 2})
    monkeypatch.undo()
    assert torch.load(tmp_path / "last" / TRAIN_STATE, weights_only=False)["step"] == 1  # the old one survives
    # a crash between the two renames leaves .last.old, which a resume finds
    (tmp_path / "last").rename(tmp_path / ".last.old")
    assert find_last(tmp_path) == tmp_path / ".last.old"


def test_qlora_trains_and_saves_f32(tiny_phantom, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from emrrg.checkpoint import load_checkpoint
    from emrrg.evaluate import load_split
    from emrrg.train import _parser, build_model, mark_trainable, quantize_llm_4bit, train_main

    a = _parser().parse_args(["--data", str(tiny_phantom), "-o", str(tmp_path / "x"), "--encoder", "tiny",
                              "--decoder", "tiny-llama"])
    model = build_model(a)
    n = quantize_llm_4bit(model.llama_model)
    assert n == 7 * model.llama_model.config.num_hidden_layers  # q k v o gate up down
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.llama_model.modules()) == n
    trainable = set(mark_trainable(model))
    assert trainable and all(p.dtype == torch.float32 for n_, p in model.named_parameters() if n_ in trainable)
    run = tmp_path / "q"
    train_main(["--data", str(tiny_phantom), "-o", str(run), *TINY, "--steps", "2", "--batch-size", "2", "--qlora"])
    assert all(math.isfinite(l) for _, l in _losses(run))
    ck = load_checkpoint(run / "best")  # the saved base decoder is the f32 one
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in ck.modules())
    assert load_split(tiny_phantom, "val").examples


def test_build_model_clamps_the_run_token_limits(tiny_phantom, tmp_path):
    from emrrg.train import _parser, build_model

    args = ["--data", str(tiny_phantom), "-o", str(tmp_path / "x"), "--encoder", "tiny", "--decoder", "tiny-llama"]
    gen = build_model(_parser().parse_args([*args, "--gen-max-new-tokens", "10"])).cfg.generation
    assert (gen.min_new_tokens, gen.max_new_tokens) == (10, 10)        # below the preset's min: the min follows
    gen = build_model(_parser().parse_args([*args, "--gen-min-new-tokens", "3", "--gen-num-beams", "2"])).cfg.generation
    assert (gen.min_new_tokens, gen.num_beams) == (3, 2) and gen.max_new_tokens > 3


def test_quiet_run_prints_nothing_and_still_writes_its_files(tiny_phantom, tmp_path, capsys):
    """emrrg-train -q: no step lines, no model/done lines on stdout or stderr; the run's files are written."""
    from emrrg.runtime import logs
    from emrrg.train import train_main

    run = tmp_path / "run"
    try:
        train_main(["-q", "--data", str(tiny_phantom), "-o", str(run), *TINY, "--steps", "2", "--batch-size", "2",
                    "--log-every", "1"])
        out, err = capsys.readouterr()
    finally:
        logs.configure("pytest", "info")   # the level is process-wide: give the next tests the default back
    assert (out, err) == ("", "")
    assert (run / "log.jsonl").stat().st_size > 0 and (run / "last").is_dir()


def test_init_with_another_size_regrids_the_encoder_and_the_run_saves_it(tiny_phantom, tmp_path):
    """--init at 64 px / patch 16 with --img-size 128 --patch-size 32: the same 4 x 4 grid at twice the
    resolution; the checkpoint the run saves loads back at the new geometry."""
    from emrrg.checkpoint import load_checkpoint, save_checkpoint
    from emrrg.train import _parser, build_model, train_main

    base = ["--data", str(tiny_phantom), "--encoder", "tiny", "--decoder", "tiny-llama"]
    save_checkpoint(build_model(_parser().parse_args([*base, "-o", str(tmp_path / "a")])), tmp_path / "init")
    with pytest.raises(SystemExit):
        train_main(["--data", str(tiny_phantom), "-o", str(tmp_path / "bad"), "--init", str(tmp_path / "init"),
                    "--img-size", "100", "--patch-size", "32", *TINY[4:], "--steps", "1"])
    run = tmp_path / "run"
    train_main(["--data", str(tiny_phantom), "-o", str(run), "--init", str(tmp_path / "init"), "--img-size", "128",
                "--patch-size", "32", *TINY[4:], "--steps", "2", "--batch-size", "2", "--train-encoder", "full"])
    enc = load_checkpoint(run / "last").cfg.encoder
    assert (enc.img_size, enc.patch_size, enc.num_tokens) == (128, 32, 17)


def _llm_logits(model, ids):
    with torch.no_grad():
        return model.llama_model(input_ids=ids).logits


def test_grown_llm_lora_computes_the_same_function_and_saves():
    """--init with a larger --llm-lora-rank / more --llm-lora-targets: the trained q/v adapters sit in the first
    rows of A and columns of B (B rescaled to the new alpha / rank), all else of B is zero: the logits are unchanged
    (to f32 rounding of the rescale), the new adapters train, and the checkpoint reloads the grown config."""
    from emrrg.checkpoint import load_checkpoint, save_checkpoint
    from emrrg.decoder import ATTN_PROJECTIONS, MLP_PROJECTIONS, grow_llm_lora
    from emrrg.train import TrainError, _add_missing_adapters

    model = _tiny_model(hybrid=()).eval()
    with torch.no_grad():   # trained-looking adapters: B non-zero
        for n, p in model.llama_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.tensor([[1, 5, 9, 30, 7, 2]])
    before = _llm_logits(model, ids)
    targets = ATTN_PROJECTIONS + MLP_PROJECTIONS
    _add_missing_adapters(model, 0, 16.0, 8, 24.0, targets, log=lambda *_: None)   # rank 4 (alpha 16) -> 8 (alpha 24)
    dec = model.cfg.decoder
    assert (dec.lora_rank, dec.lora_alpha, dec.lora_targets) == (8, 24.0, targets)
    after = _llm_logits(model, ids)
    torch.testing.assert_close(after, before, atol=GROWN_LORA_ATOL, rtol=0)
    layers = model.llama_model.base_model.model.model.layers
    adapted = [n for n, m in model.llama_model.named_modules() if n.endswith(("_proj",)) and hasattr(m, "lora_A")]
    assert len(adapted) == 7 * len(layers)
    assert all(m.lora_A["default"].weight.shape[0] == 8 for n, m in model.llama_model.named_modules()
               if n in adapted)
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(model, Path(d) / "ck")
        back = load_checkpoint(Path(d) / "ck")
        assert back.cfg.decoder.lora_targets == targets
        torch.testing.assert_close(_llm_logits(back, ids), after, atol=0, rtol=0)
    # shrinking, or dropping a trained projection, is refused
    with pytest.raises(ValueError, match="can grow"):
        grow_llm_lora(model.llama_model, model.cfg.decoder, 4, 8.0, targets)
    with pytest.raises(TrainError, match="can grow"):
        _add_missing_adapters(model, 0, 16.0, 8, 24.0, ("q_proj",), log=lambda *_: None)
    with pytest.raises(TrainError, match="choose from"):
        _add_missing_adapters(model, 0, 16.0, 8, 24.0, (*targets, "lm_head"), log=lambda *_: None)
    torch.testing.assert_close(_llm_logits(model, ids), after, atol=0, rtol=0)   # a refusal leaves the model as it was


def test_bf16_on_a_cpu_without_it_warns(tiny_phantom, tmp_path, capsys, monkeypatch):
    """--bf16 where the CPU has no native bfloat16 is emulated (217 s against 8 s a step on an AVX2 EPYC): the run
    says so up front, as a warning on stderr that -q keeps, and still runs."""
    import emrrg.train as tr

    assert isinstance(tr.native_bf16(), bool)   # this machine's answer, whatever it is
    args = ["--data", str(tiny_phantom), *TINY, "--steps", "1", "--batch-size", "2", "--bf16"]
    monkeypatch.setattr(tr, "native_bf16", lambda: False)
    tr.train_main(["-o", str(tmp_path / "a"), *args])
    assert "warning: --bf16 on a CPU without native bfloat16" in capsys.readouterr().err
    tr.train_main(["-o", str(tmp_path / "q"), *args, "-q"])
    out = capsys.readouterr()
    assert "without native bfloat16" in out.err and "step 1/1" not in out.out   # -q: the warning, not the steps
    monkeypatch.setattr(tr, "native_bf16", lambda: True)
    tr.train_main(["-o", str(tmp_path / "b"), *args])
    out = capsys.readouterr()
    assert "without native bfloat16" not in out.out + out.err


def test_encoder_rate_zero_holds_the_encoder():
    """--encoder-lr 0 is a rate of 0 (the encoder held), not 'unset' (it used to fall through to --lr)."""
    from argparse import Namespace

    from emrrg.train import encoder_lr

    assert encoder_lr(Namespace(lr=6e-4, encoder_lr=0.0, encoder_pretrain_lr=None)) == 0.0
    assert encoder_lr(Namespace(lr=6e-4, encoder_lr=None, encoder_pretrain_lr=None)) == 6e-4
    assert encoder_lr(Namespace(lr=6e-4, encoder_lr=3e-5, encoder_pretrain_lr=None), pretrain=True) == 3e-5
    assert encoder_lr(Namespace(lr=6e-4, encoder_lr=3e-5, encoder_pretrain_lr=0.0), pretrain=True) == 0.0
    assert encoder_lr(Namespace(lr=6e-4, encoder_lr=None, encoder_pretrain_lr=None), pretrain=True) == 6e-4
