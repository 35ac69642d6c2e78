"""`emrrg-train`: Partial LoRA fine-tuning of EMRRG (arXiv 2510.16776) on an R2Gen-style annotation.json.

    emrrg-train --data annotation.json -o runs/x --encoder small --decoder smollm2-135m --steps 1000
    emrrg-train --data annotation.json -o runs/x --init ckpt/          # from emrrg-init / emrrg-import
    emrrg-train -o runs/x --resume                                     # continue where it stopped

The objective is upstream's: teacher-forced language-model loss on the report tokens only.

    BOS "Human: <Img>" [visual tokens] "</Img> Generate ... \\nAssistant:" report EOS
    └──────────────── prompt: no loss (labels -100) ─────────────────────┘ └─ loss ──┘

What trains (everything else is frozen):
- the encoder's Partial LoRA (the x half of each mixer's in_proj) and, if present, lora_X;
  `--train-encoder full` trains the whole encoder instead, for an encoder with no pre-trained
  weights (upstream starts from a pre-trained MambaXray-VL; offline there is none);
- the projector: llama_proj and layer_norm;
- peft LoRA on the LLM's q_proj and v_proj, and the hybrid layers' cross-attention when present.

`--encoder-pretrain-steps N` first pre-trains a fresh encoder for N steps on the training studies'
labels (linear head on the mean token, BCE), standing in for upstream's pre-trained MambaXray-VL, which
does not exist offline: the findings drawn on each image when the annotation has them (phantoms), else
the rule-based labeler's CheXpert labels of the report (`--pretrain-labels`); the head's BCE / AUC /
accuracy on the val split go to the log. `--balance-labels P` draws the LM stage's studies with weight
freq(rarest label) ** -P instead of a plain shuffle (same batches on resume). `--drop-prior-references`
trains on the reports without the sentences that only compare with a prior study or describe the technique
(`emrrg.data.reports`): one image cannot show either.

AdamW with linear warm-up then cosine decay; gradient clipping. `--qlora` holds the base LLM's
linear weights in bitsandbytes NF4 (4-bit) and trains the LoRA over them (QLoRA), which runs on CPU.
`--scan fast` (the default) runs the encoder's SelectiveScan through `emrrg.ops.scan_fast` (same
numbers as the reference, a fast backward); inference paths are not touched.

Images go through `emrrg.runtime.preprocess`, the function the runtime uses, so training and inference
see identical pixels; each study's pixels are computed once and cached in memory.

The run directory:

    RUN/run.json        the arguments (a resume reads them back)
    RUN/log.jsonl       one line per logged step ({"step", "loss", "lr", ...}) and per validation
    RUN/last/           checkpoint (emrrg format) + train_state.pt: optimizer, scheduler, step, RNG;
                        replaced atomically (written aside, then renamed) every --save-every steps
    RUN/best/           the checkpoint with the best 0.8·BLEU-4 + 0.2·CIDEr on val (greedy), + val.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from emrrg.runtime.helpfmt import CommandParser, DefaultsHelpFormatter

TRAIN_STATE = "train_state.pt"
STATE_VERSION = 1
IGNORE = -100


class TrainError(ValueError):
    """A training setup that cannot run (bad data, missing run directory, ...)."""


# ---- the model ------------------------------------------------------------------------------------

def quantize_llm_4bit(llm) -> int:
    """QLoRA's base: the LLM's frozen linears in bitsandbytes NF4 (emrrg.decoder.quantize_llm_nf4)."""
    from emrrg.decoder import DecoderLoadError, quantize_llm_nf4

    try:
        return quantize_llm_nf4(llm)
    except DecoderLoadError as e:
        raise TrainError(f"--qlora: {e}") from None


def _add_missing_adapters(model, enc_rank: int, enc_alpha: float, llm_rank: int, llm_alpha: float,
                          llm_targets: Sequence[str] = ("q_proj", "v_proj"), log=print) -> None:
    """Give a checkpoint without adapters the requested ones. An existing encoder adapter must match; an existing
    LLM LoRA may grow to a larger rank and more projections (emrrg.decoder.grow_llm_lora: the same function)."""
    from emrrg.decoder import add_llm_lora, grow_llm_lora
    from emrrg.lora import PartialLoRA

    cfg = model.cfg
    if enc_rank:
        if cfg.encoder.lora_rank and cfg.encoder.lora_rank != enc_rank:
            raise TrainError(f"--init has encoder Partial LoRA rank {cfg.encoder.lora_rank}, not {enc_rank}")
        if not cfg.encoder.lora_rank:
            cfg.encoder.lora_rank, cfg.encoder.lora_alpha = enc_rank, enc_alpha
            for layer in model.visual_encoder.layers:
                m = layer.mixer
                m.in_proj_lora = PartialLoRA(m.cfg.d_model, m.cfg.d_inner, enc_rank, enc_alpha)
    if llm_rank:
        targets = tuple(llm_targets)
        try:
            if not cfg.decoder.lora_rank:
                cfg.decoder.lora_rank, cfg.decoder.lora_alpha, cfg.decoder.lora_targets = llm_rank, llm_alpha, targets
                model.llama_model = add_llm_lora(model.llama_model, cfg.decoder)
            elif (cfg.decoder.lora_rank, set(cfg.decoder.lora_targets)) != (llm_rank, set(targets)):
                old = cfg.decoder
                model.llama_model, cfg.decoder = grow_llm_lora(model.llama_model, old, llm_rank, llm_alpha, targets)
                log(f"LLM LoRA grown from rank {old.lora_rank} on {','.join(old.lora_targets)} to rank {llm_rank} "
                    f"(alpha {llm_alpha:g}) on {','.join(targets)}: the same function, more to train")
        except ValueError as e:
            raise TrainError(f"--init: {e}") from None


def llm_lora_targets(a) -> tuple[str, ...]:
    """--llm-lora-targets as a tuple ('q_proj,v_proj' -> ('q_proj', 'v_proj'); runs saved before it: q/v)."""
    return tuple(t.strip() for t in getattr(a, "llm_lora_targets", "q_proj,v_proj").split(",") if t.strip())


def build_model(a, log=print):
    """The model to train, from --init or from presets, with the generation settings of the run."""
    import torch

    from emrrg.checkpoint import load_checkpoint
    from emrrg.config import DECODE_KEYS, make_config
    from emrrg.decoder import default_hybrid_layers, load_base_decoder
    from emrrg.model import EMRRG

    torch.manual_seed(a.seed)
    if a.init:
        model = load_checkpoint(a.init)
        _add_missing_adapters(model, a.lora_rank, a.lora_alpha, a.llm_lora_rank, a.llm_lora_alpha,
                              llm_lora_targets(a), log=log)
        enc = model.cfg.encoder
        size, patch = a.img_size or enc.img_size, a.patch_size or enc.patch_size
        if (size, patch) != (enc.img_size, enc.patch_size):
            try:
                model.visual_encoder.resize(size, patch)   # its cfg is model.cfg.encoder
            except ValueError as e:                        # EncoderConfig's own check of the geometry
                raise TrainError(f"--img-size / --patch-size: {e}") from None
    else:
        dec = {"lora_rank": a.llm_lora_rank, "lora_alpha": a.llm_lora_alpha, "lora_targets": llm_lora_targets(a)}
        if a.decoder_path:
            dec["path"] = a.decoder_path
        enc = {"lora_rank": a.lora_rank, "lora_alpha": a.lora_alpha}
        if a.img_size:
            enc["img_size"] = a.img_size
        if a.patch_size:
            enc["patch_size"] = a.patch_size
        cfg = make_config(a.encoder, a.decoder, a.dataset, encoder_overrides=enc, decoder_overrides=dec)
        llm, tok = load_base_decoder(cfg.decoder)
        if a.hybrid_layers == "every8":
            cfg.decoder.hybrid_layers = default_hybrid_layers(llm.config.num_hidden_layers)
        elif a.hybrid_layers:
            cfg.decoder.hybrid_layers = tuple(int(x) for x in a.hybrid_layers.split(","))
        model = EMRRG(cfg, llm, tok)
    gen = model.cfg.generation
    model.cfg.generation = type(gen).resolve(dataclasses.asdict(gen),
                                             {k: getattr(a, f"gen_{k}", None) for k in DECODE_KEYS})
    return model


def mark_trainable(model, train_encoder: str = "lora") -> list[str]:
    """Freeze everything, then unfreeze what EMRRG trains. Returns the trainable names (sorted)."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for n, p in model.named_parameters():
        if n.startswith("visual_encoder."):
            on = train_encoder == "full" or ".in_proj_lora." in n or ".lora_X." in n
        elif n.startswith(("llama_proj.", "layer_norm.")):
            on = True
        elif n.startswith("finding_prompt."):   # the token vectors learn with the LM; the fitted classifier is held
            on = not n.startswith("finding_prompt.head.")
        else:  # the LLM: its LoRA matrices and hybrid cross-attention only
            on = "lora_A" in n or "lora_B" in n or ".cross_attn." in n
        if on:
            if not p.is_floating_point():
                continue
            p.requires_grad_(True)
            names.append(n)
    return sorted(names)


def _no_decay(name: str, p) -> bool:
    """Biases, norms, the mixers' D (1-d), A_log, cls_token and pos_embed get no weight decay."""
    return p.dim() < 2 or name.endswith("_log") or name.endswith(("cls_token", "pos_embed"))


def encoder_lr(a, pretrain: bool = False) -> float:
    """The encoder's peak rate: --encoder-lr, else --lr; for the pre-training, --encoder-pretrain-lr first. A
    rate given as 0 is 0 (the encoder held), not a fall-through to the next one."""
    for v in ((a.encoder_pretrain_lr,) if pretrain else ()) + (a.encoder_lr,):
        if v is not None:
            return v
    return a.lr


def param_groups(model, lr: float, encoder_lr: float, weight_decay: float) -> list[dict]:
    """Four AdamW groups (encoder / rest x decay / no decay), parameters sorted by name (stable resume)."""
    named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    groups = []
    for enc in (True, False):
        for nd in (False, True):
            ps = [(n, p) for n, p in named if n.startswith("visual_encoder.") == enc and _no_decay(n, p) == nd]
            if ps:
                groups.append({"params": [p for _, p in ps], "names": [n for n, _ in ps],
                               "lr": encoder_lr if enc else lr, "weight_decay": 0.0 if nd else weight_decay})
    return groups


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))


# ---- data -----------------------------------------------------------------------------------------

class StudyData:
    """One split: tokenized reports (+EOS, truncated) and lazily cached pixels from the shared preprocess."""

    def __init__(self, split, tokenizer, image_size: int, max_report_tokens: int, balance: float = 0.0,
                 drop_prior_references: bool = False, finding_weight: float = 1.0):
        from emrrg.data.reports import drawn_finding_spans
        from emrrg.data.reports import drop_prior_references as drop_prior
        from emrrg.runtime.preprocess import preprocess_study

        self.split, self.size = split, image_size
        self._pre = preprocess_study
        self._px: dict[int, np.ndarray] = {}
        eos = tokenizer.eos_token_id
        self.ids = []
        # --finding-weight: per-token loss weights, `finding_weight` on the tokens of the sentences that name a
        # finding drawn on the image (drawn_finding_spans), 1 elsewhere; None: all 1
        self.token_weights: list[np.ndarray] | None = None if finding_weight == 1.0 else []
        if finding_weight <= 0:
            raise TrainError(f"--finding-weight {finding_weight}: give a weight > 0 (1: off)")
        if self.token_weights is not None and not has_drawn_labels(split.examples):
            raise TrainError("--finding-weight needs the findings drawn on each image ('labels' in every example)")
        for e in split.examples:
            text = drop_prior(e["report"]) if drop_prior_references else e["report"]
            offsets = {"return_offsets_mapping": True} if self.token_weights is not None else {}
            enc = tokenizer(text, add_special_tokens=False, **offsets)
            ids = enc["input_ids"] + [eos]
            self.ids.append(ids[:max_report_tokens])  # as upstream: report + EOS, then truncation
            if self.token_weights is not None:
                spans = drawn_finding_spans(text, e["labels"])
                w = [finding_weight if any(a < end <= b for a, b in spans) else 1.0 for _, end in enc["offset_mapping"]]
                self.token_weights.append(np.array(w + [1.0], dtype=np.float32)[:max_report_tokens])
        self.lengths = np.array([len(i) for i in self.ids])
        self.weights = balance_weights(split.examples, balance, self.labels[0]) if balance else None

    @functools.cached_property
    def labels(self) -> tuple[np.ndarray, str]:
        """label_targets(auto) of the split, computed once (the sampler, --lm-label-loss and the finding tokens
        read the same labels; with report labels the labeler runs over every report)."""
        return label_targets(self.split.examples, "auto")

    def __len__(self) -> int:
        return len(self.ids)

    def pixels(self, i: int) -> np.ndarray:
        if i not in self._px:
            self._px[i] = self._pre(self.split.images(self.split.examples[i]), size=self.size)  # (V, 3, S, S)
        return self._px[i]

    def plan(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """Batches of one epoch: shuffled, grouped by length inside blocks of 16 batches (less padding).

        With balance weights (`--balance-labels`), the epoch's len(self) studies are drawn with replacement
        in proportion to them instead of a permutation; the draw depends on (seed, epoch) only, so a
        resumed run replays the same batches."""
        rng = np.random.default_rng([seed, epoch])
        if self.weights is None:
            order = rng.permutation(len(self))
        else:
            order = rng.choice(len(self), size=len(self), replace=True, p=self.weights)
        block = 16 * batch_size
        batches = []
        for k in range(0, len(order), block):
            chunk = sorted(order[k:k + block].tolist(), key=lambda i: (-self.lengths[i], i))
            batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]


def balance_weights(examples: Sequence[dict], power: float, labels: np.ndarray | None = None) -> np.ndarray:
    """Sampling probabilities that raise rare findings: each study weighs freq(its rarest label) ** -power,
    normalised to sum to 1. The labels are the drawn ones when every example has them, else the labeler's
    on the report; a study with none counts as the class 'no finding'. power 0: uniform; 1: every rarest
    class gets about the same share of the samples. `labels`: label_targets(examples, 'auto')'s, if known."""
    if power < 0:
        raise TrainError(f"--balance-labels {power}: give a power >= 0 (0: off, 0.5: square-root, 1: inverse frequency)")
    y = (label_targets(examples, "auto")[0] if labels is None else labels) > 0.5  # (n, K)
    y = np.concatenate([y, ~y.any(1, keepdims=True)], axis=1)                 # + 'no finding'
    freq = y.sum(0) / len(y)                                                  # (K + 1,)
    rarest = np.where(y, freq[None, :], np.inf).min(1)                        # (n,)
    w = rarest ** -power
    return w / w.sum()


def collate(data: StudyData, idx: Sequence[int]):
    """(pixels (b, V, 3, S, S), report ids (b, R), labels (b, R)); right-padded with label -100."""
    import torch

    from emrrg.encoder import stack_views

    R = max(len(data.ids[i]) for i in idx)
    ids = torch.zeros(len(idx), R, dtype=torch.long)
    labels = torch.full((len(idx), R), IGNORE, dtype=torch.long)
    for r, i in enumerate(idx):
        t = torch.tensor(data.ids[i])
        ids[r, :len(t)] = t
        labels[r, :len(t)] = t
    return stack_views([data.pixels(i) for i in idx]), ids, labels


def collate_weights(data: StudyData, idx: Sequence[int]):
    """(b, R) per-token loss weights of collate's batch (--finding-weight; padding 0), or None when all are 1."""
    import torch

    if data.token_weights is None:
        return None
    w = torch.zeros(len(idx), max(len(data.ids[i]) for i in idx))
    for r, i in enumerate(idx):
        w[r, :len(data.token_weights[i])] = torch.from_numpy(data.token_weights[i])
    return w


def lm_losses(model, px, ids, labels, bf16: bool = False, head=None, y=None, weights=None,
              finding_gates=None) -> dict:
    """{'lm': mean cross-entropy over the report tokens (teacher forcing), prompt and padding excluded}.
    With `weights` (b, R) (collate_weights), the weighted mean instead.

    Padding sits after the report, so causal attention never lets a real position see it: no
    attention mask is needed (and SDPA keeps its is_causal fast path).

    With `head` (emrrg-train --lm-label-loss), also 'label': the BCE of `head` on the LLM's last
    hidden state (after its final norm) at the prompt's last position, the one that predicts the first report
    token, against the (b, K) 0/1 targets `y`. The LLM must then carry the image's findings, read from the
    visual tokens, to where it starts writing; the head is for training only and is not saved.

    `finding_gates` (b, K): the finding tokens' gates (emrrg.findings; NaN rows: the classifier's own).
    """
    import torch
    import torch.nn.functional as F

    visual = model.encode_images(px, finding_gates)                           # (b, Lv, H)
    model.set_visual(visual)
    try:
        prompt = model.prompt_embeds(visual)                                  # (b, T0, H)
        rep = model.llama_model.get_input_embeddings()(ids)                   # (b, R, H)
        embeds = torch.cat([prompt, rep], dim=1)                              # (b, T0 + R, H)
        R = ids.shape[1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.llama_model(inputs_embeds=embeds, logits_to_keep=R + 1, use_cache=False,
                                    output_hidden_states=head is not None)
        logits = out.logits[:, :R].float()                                    # position T0-1+j predicts report token j
        flat = labels.reshape(-1)
        if weights is None:
            res = {"lm": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE)}
        else:
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE, reduction="none")
            w = weights.reshape(-1).to(ce.dtype) * (flat != IGNORE)
            res = {"lm": (ce * w).sum() / w.sum()}
        if head is not None:
            last = out.hidden_states[-1][:, prompt.shape[1] - 1].float()      # (b, H)
            res["label"] = F.binary_cross_entropy_with_logits(head(last), y)
        return res
    finally:
        model.set_visual(None)


def lm_loss(model, px, ids, labels, bf16: bool = False):
    """The report tokens' mean cross-entropy (lm_losses' 'lm')."""
    return lm_losses(model, px, ids, labels, bf16)["lm"]


def label_head(n_in: int, y_train: np.ndarray, gen):
    """A linear head from n_in features to the labels of `y_train` (n, K): its bias at their prior, its weights
    small (from the torch Generator `gen`), so its first BCE is the prior's. The encoder's pre-training and
    --lm-label-loss use one each; neither is saved in the checkpoint."""
    import torch

    head = torch.nn.Linear(n_in, y_train.shape[1])
    pos = torch.from_numpy(y_train.mean(0)).clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=gen)
        head.bias.copy_(torch.log(pos / (1 - pos)))
    return head


def native_bf16() -> bool:
    """Does this CPU compute bfloat16 natively (AVX512-BF16 or AMX tiles)? torch reports both; where it cannot
    tell, assume it does (the flag is then only as slow as the user expects)."""
    import torch

    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if p is not None]
    return not probes or any(p() for p in probes)


def use_scan(model, which: str) -> None:
    """Select the encoder's SelectiveScan implementation for training ('fast' or 'ref')."""
    from emrrg.ops.scan_fast import selective_scan_fast
    from emrrg.ops.selective_scan import selective_scan

    fn = selective_scan_fast if which == "fast" else selective_scan
    for layer in model.visual_encoder.layers:
        layer.mixer.scan_fn = fn


# ---- encoder label pre-training -----------------------------------------------------------------------

PRETRAIN_LABELS = ("auto", "drawn", "report")
# How the pre-training head turns the encoder's tokens into one logit per label. mean: a linear head on the
# mean token (a global feature). max: the same head on every token, the image's logit the largest token's
# (multiple-instance learning), so a finding a few patches show (a tube, a nodule, a pneumothorax's edge)
# must be detected in the tokens that cover it, the tokens the LLM attends to, not averaged away.
PRETRAIN_POOLS = ("mean", "max")


def report_labels(reports: Sequence[str]) -> np.ndarray:
    """(n, 14) 0/1 CheXpert labels of the training reports from the rule-based labeler (uncertain -> 1)."""
    from emrrg.metrics.labeler import CHEXPERT_CLASSES, label_reports

    return np.array([[lab[c] for c in CHEXPERT_CLASSES] for lab in label_reports(list(reports))], dtype=np.float32)


def has_drawn_labels(examples: Sequence[dict]) -> bool:
    """Does every example carry 'labels', the findings drawn on its image (emrrg.data.phantom writes them)?"""
    return bool(examples) and all(isinstance(e.get("labels"), list) for e in examples)


def drawn_labels(examples: Sequence[dict]) -> np.ndarray:
    """(n, 11) 0/1: the findings drawn on each image (the example's 'labels'), in emrrg.data.phantom's FINDINGS order."""
    from emrrg.data.phantom import FINDINGS

    col = {f: j for j, f in enumerate(FINDINGS)}
    y = np.zeros((len(examples), len(FINDINGS)), dtype=np.float32)
    for i, e in enumerate(examples):
        for f in e.get("labels") or ():
            if f not in col:
                raise TrainError(f"{e.get('id', i)}: drawn label {f!r} is not one of {', '.join(FINDINGS)}")
            y[i, col[f]] = 1.0
    return y


def label_targets(examples: Sequence[dict], which: str = "auto") -> tuple[np.ndarray, str]:
    """The pre-training targets and their source: 'drawn' (the images' own findings) or 'report' (the labeler
    on the report text, which also names findings that are not drawn). auto: drawn when every example has them."""
    if which not in PRETRAIN_LABELS:
        raise TrainError(f"--pretrain-labels {which!r}: choose one of {', '.join(PRETRAIN_LABELS)}")
    if which == "auto":
        which = "drawn" if has_drawn_labels(examples) else "report"
    if which == "drawn":
        if not has_drawn_labels(examples):
            raise TrainError("--pretrain-labels drawn: some examples have no 'labels' (drawn findings); "
                             "use --pretrain-labels report")
        return drawn_labels(examples), "drawn"
    return report_labels([e["report"] for e in examples]), "report"


def label_classes(source: str) -> tuple[str, ...]:
    """The names of label_targets' columns for its source: the phantom's FINDINGS or the CheXpert classes."""
    if source == "drawn":
        from emrrg.data.phantom import FINDINGS
        return tuple(FINDINGS)
    from emrrg.metrics.labeler import CHEXPERT_CLASSES
    return tuple(CHEXPERT_CLASSES)


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    """ROC AUC of scores `s` for 0/1 `y` (Mann-Whitney, ties counted half); None when one class is absent."""
    pos, neg = s[y > 0.5], s[y <= 0.5]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def label_head_metrics(y: np.ndarray, logits: np.ndarray) -> dict:
    """BCE, macro AUC (over the labels with both classes present) and each label's AUC (None where one class
    is absent), element accuracy at p = 0.5 and the fraction of studies whose whole label set is right, of
    a multi-label head's logits against `y`."""
    import torch
    import torch.nn.functional as F

    bce = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(y)))
    per_label = [_auc(y[:, j], logits[:, j]) for j in range(y.shape[1])]
    aucs = [a for a in per_label if a is not None]
    pred = logits > 0
    return {"n": int(len(y)), "bce": bce, "auc_macro": float(np.mean(aucs)) if aucs else None, "auc": per_label,
            "accuracy": float((pred == (y > 0.5)).mean()), "exact_sets": float((pred == (y > 0.5)).all(1).mean())}


def pool_logits(head, tokens, pool: str):
    """(b, K) label logits of the encoder's (b, N, D) tokens by PRETRAIN_POOLS' rule `pool`."""
    if pool == "mean":
        return head(tokens.mean(1))
    if pool == "max":
        return head(tokens).amax(1)
    raise TrainError(f"--pretrain-pool {pool!r}: choose one of {', '.join(PRETRAIN_POOLS)}")


def pretrain_encoder(model, data: "StudyData", steps: int, batch_size: int, lr: float, seed: int,
                     log=print, labels: str = "auto", val: "StudyData | None" = None, pool: str = "mean") -> dict:
    """Multi-label pre-training of the encoder on the training studies' labels.

    Upstream starts from a MambaXray-VL encoder pre-trained on X-ray image-report pairs; without one (a
    fresh encoder, `--train-encoder full`), this gives the encoder visual features worth projecting
    before the LLM sees them. A linear head on the encoder's tokens (`pool_logits`: their mean, or each
    token with the largest logit kept), binary cross-entropy, AdamW with a cosine schedule; the head is
    dropped afterwards. Only the encoder's trainable
    parameters move. The labels (`label_targets`) are the findings drawn on each image when the
    annotation has them (phantoms), else the CheXpert labels of the report text, so any annotation.json
    works. With `val`, the head is scored on it (BCE, macro AUC, accuracy) at every log point and at the end.

    Returns {"labels": source, "bce": per-step train BCE, "val": the final val metrics or None, "val_curve": [...]}.
    """
    import torch
    import torch.nn.functional as F

    y_np, source = label_targets(data.split.examples, labels)
    y_all = torch.from_numpy(y_np)                                           # (n, K)
    y_val = label_targets(val.split.examples, source)[0] if val is not None and len(val) else None
    enc = model.visual_encoder
    params = [p for p in enc.parameters() if p.requires_grad]
    if not params:
        raise TrainError("--encoder-pretrain-steps needs trainable encoder parameters")
    gen = torch.Generator().manual_seed(seed)
    head = label_head(enc.cfg.d_model, y_np, gen)
    opt = torch.optim.AdamW([{"params": params}, {"params": head.parameters()}], lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warm, steps, 0.0))
    rng = np.random.default_rng([seed, 1234])

    def score_val(step: int) -> dict:
        enc.eval()
        try:
            with torch.no_grad():
                out = [pool_logits(head, enc(torch.from_numpy(np.stack([val.pixels(i)[0]
                                                                        for i in range(k, min(k + 32, len(val)))]))), pool)
                       for k in range(0, len(val), 32)]
        finally:
            enc.train()
        return {"step": step, **label_head_metrics(y_val, torch.cat(out).numpy())}

    losses, curve, t0 = [], [], time.perf_counter()
    log(f"encoder pre-training on the {source} labels ({y_all.shape[1]} classes, {len(data)} studies, {pool} pooling)")
    enc.train()
    for step in range(1, steps + 1):
        idx = rng.choice(len(data), size=min(batch_size, len(data)), replace=False).tolist()
        px = torch.from_numpy(np.stack([data.pixels(i)[0] for i in idx]))   # (b, 3, S, S), first view
        logits = pool_logits(head, enc(px), pool)                            # (b, K)
        loss = F.binary_cross_entropy_with_logits(logits, y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % max(1, steps // 10) == 0 or step == steps:
            msg = (f"encoder pre-training {step}/{steps}: BCE {np.mean(losses[-max(1, steps // 10):]):.4f} "
                   f"({(time.perf_counter() - t0) / step:.2f} s/step)")
            if y_val is not None:
                curve.append(score_val(step))
                v = curve[-1]
                auc = "n/a" if v["auc_macro"] is None else f"{v['auc_macro']:.3f}"
                msg += (f"; val ({v['n']}): BCE {v['bce']:.4f}, macro AUC {auc}, accuracy {v['accuracy']:.3f}, "
                        f"label sets exact {v['exact_sets']:.3f}")
            log(msg)
    classes = label_classes(source)
    if curve:
        log("encoder pre-training, val AUC per label: " + ", ".join(
            f"{c} {'n/a' if a is None else f'{a:.3f}'}" for c, a in zip(classes, curve[-1]["auc"])))
    return {"labels": source, "classes": list(classes), "bce": losses, "val": curve[-1] if curve else None,
            "val_curve": curve}


# ---- finding tokens (emrrg.findings) ----------------------------------------------------------------------

def add_finding_tokens(model, data: "StudyData", annotation, log=print) -> dict:
    """--finding-tokens: give the model finding tokens for each label (the drawn findings, else the report's
    CheXpert labels) and fit their classifier on the frozen encoder's features of the train studies, its L2 strength
    chosen on the whole val split of `annotation` (whatever --val-limit). Returns fit_head's record with the
    val metrics."""
    from emrrg.evaluate import load_split
    from emrrg.findings import encoder_features, fit_head

    try:
        val_split = load_split(annotation, "val")
    except Exception:  # noqa: BLE001 - an annotation without val examples fits at the middle L2 strength
        val_split = None

    y, source = data.labels
    model.add_finding_tokens(label_classes(source))
    log(f"finding tokens: the frozen encoder's features of {len(data)} train studies for the classifier")
    t0 = time.perf_counter()
    x = encoder_features(model, data.pixels, len(data))
    x_val = y_val = None
    if val_split is not None and len(val_split.examples):
        val = StudyData(val_split, model.tokenizer, model.cfg.encoder.img_size, 1)
        x_val, y_val = encoder_features(model, val.pixels, len(val)), label_targets(val_split.examples, source)[0]
    rec = fit_head(model.finding_prompt.head, x, y, x_val, y_val)
    if x_val is not None:
        import torch
        with torch.no_grad():
            logits = model.finding_prompt.head(torch.from_numpy(x_val).float()).numpy()
        m = label_head_metrics(y_val, logits)
        rec["val"] = {k: m[k] for k in ("bce", "auc_macro", "accuracy", "exact_sets")}
        rec["val_auc"] = dict(zip(model.cfg.finding_tokens, m["auc"]))
    log(f"finding tokens: {len(model.cfg.finding_tokens)} {source} labels, classifier fitted on {len(data)} studies in "
        f"{time.perf_counter() - t0:.0f} s: {json.dumps(rec)}")
    return rec


def teacher_gates(y, teacher: float, seed) -> "torch.Tensor":
    """(b, K) finding gates for a training batch: each study's drawn labels `y` with probability `teacher`,
    else NaN (the classifier's own probabilities)."""
    import torch

    use = torch.from_numpy(np.random.default_rng(seed).random(len(y)) < teacher)
    return torch.where(use[:, None], y.float(), torch.full_like(y.float(), float("nan")))


# ---- checkpoints ------------------------------------------------------------------------------------

def _rng_state() -> dict:
    import torch
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    import torch
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def write_checkpoint(model, run_dir: Path, name: str, extra: dict[str, Any] | None = None, state: dict | None = None) -> Path:
    """Write RUN/name atomically: everything goes to a hidden staging folder, then two renames.

    A crash at any point leaves either the previous RUN/name or (between the renames) RUN/.name.old,
    which `find_last` picks up.
    """
    import torch

    from emrrg.checkpoint import save_checkpoint

    final, stage, old = run_dir / name, run_dir / f".{name}.staging", run_dir / f".{name}.old"
    shutil.rmtree(stage, ignore_errors=True)
    save_checkpoint(model, stage)
    for fname, obj in (extra or {}).items():
        (stage / fname).write_text(json.dumps(obj, indent=1, default=float) + "\n")
    if state is not None:
        torch.save(state, stage / TRAIN_STATE)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    stage.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_last(run_dir: Path) -> Path | None:
    for cand in (run_dir / "last", run_dir / ".last.old"):
        if (cand / TRAIN_STATE).is_file():
            return cand
    return None


class _Saver:
    """What save_checkpoint sees. Under QLoRA with a decoder whose base is saved (source 'random'), an
    f32 twin gets the trained parameters copied in first, so the checkpoint never holds 4-bit weights."""

    def __init__(self, model, qlora: bool):
        self.model = model
        self.twin = copy.deepcopy(model) if qlora and model.cfg.decoder.source == "random" else None

    def target(self):
        if self.twin is None:
            return self.model
        import torch
        src = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, p in self.twin.named_parameters():
                if n in src and src[n].requires_grad:
                    p.copy_(src[n])
        return self.twin


# ---- validation ---------------------------------------------------------------------------------------

def validate(model, split, batch_size: int, max_new_tokens: int | None, min_new_tokens: int | None) -> dict:
    """Greedy decoding on `split` with the run's repetition penalty; NLG (no METEOR) + CE + the score."""
    from emrrg.evaluate import TorchGenerator, predict_split, score_reports

    was_training = model.training
    model.eval()
    try:
        gen = TorchGenerator(model, batch_size)
        over = {"num_beams": 1, "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens}
        rows = predict_split(gen, split, over)
        res = score_reports([r["prediction"] for r in rows], [r["reference"] for r in rows], meteor=False)
        res["samples"] = [{"id": r["id"], "prediction": r["prediction"]} for r in rows[:3]]
        return res
    finally:
        model.train(was_training)


# ---- the loop -------------------------------------------------------------------------------------------

class _Progress:
    """tqdm bar (loss, lr, ETA) on a terminal; plain log lines every `every` steps otherwise."""

    def __init__(self, total: int, start: int, mode: str, every: int):
        from emrrg.runtime.logs import quiet

        self.total, self.every = total, every
        self.bar = None
        self.quiet = quiet()   # -q / EMRRG_LOG_LEVEL=error: no bar, no step lines (errors still reach stderr)
        tty = sys.stderr.isatty()
        if not self.quiet and (mode == "bar" or (mode == "auto" and tty)):
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="emrrg-train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)
        self.t0, self.s0 = time.perf_counter(), start

    def update(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)
        elif self.quiet:
            return
        elif step % self.every == 0 or step == self.total:
            el = time.perf_counter() - self.t0
            rate = el / max(1, step - self.s0)
            eta = rate * (self.total - step)
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {rate:.2f} s/step "
                  f"elapsed {el / 60:.1f} min ETA {eta / 60:.1f} min", flush=True)

    def write(self, msg: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


RESUME_KEEP = ("resume", "output", "threads", "progress", "log_every", "stop_after")


def _args_from_run(run_dir: Path, cli) -> argparse.Namespace:
    f = run_dir / "run.json"
    if not f.is_file():
        raise TrainError(f"--resume: {run_dir} has no run.json (not an emrrg-train run directory)")
    saved = json.loads(f.read_text())["args"]
    for k in RESUME_KEEP:
        saved[k] = getattr(cli, k)
    return argparse.Namespace(**saved)


def train(a, log=print) -> dict:
    """Run (or resume) a training job described by the parsed arguments `a`. Returns a summary."""
    from emrrg.runtime.logs import quiet

    if quiet():                   # -q / EMRRG_LOG_LEVEL=error: the run's files (log.jsonl, checkpoints) only
        log = lambda *_a, **_k: None  # noqa: E731

    import torch

    from emrrg.evaluate import load_split
    from emrrg.model import count_parameters

    run_dir = Path(a.output)
    if a.resume:
        a = _args_from_run(run_dir, a)
        last = find_last(run_dir)
        if last is None:
            raise TrainError(f"--resume: no checkpoint with {TRAIN_STATE} under {run_dir}")
    else:
        if (run_dir / "run.json").exists():
            raise TrainError(f"{run_dir} already holds a run; continue it with --resume or choose another -o")
        if not a.data:
            raise TrainError("--data is required")
        if not a.init and not (a.encoder and a.decoder):
            raise TrainError("give --init CKPT, or --encoder and --decoder presets")
        if a.lm_label_loss < 0:   # before the model loads
            raise TrainError(f"--lm-label-loss {a.lm_label_loss}: give a weight >= 0 (0: off)")
        if not 0 <= a.finding_teacher <= 1:
            raise TrainError(f"--finding-teacher {a.finding_teacher}: give a fraction in [0, 1]")
        last = None
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.bf16 and not native_bf16():
        logging.getLogger("emrrg.train").warning(   # a warning: stderr, and it survives -q
            "--bf16 on a CPU without native bfloat16 (AVX512-BF16 or AMX): autocast emulates it, many times slower "
            "than f32 (one demo training step: 217 s against 8 s in f32 on a 2-core AVX2 EPYC); drop --bf16 here")

    # data + model -------------------------------------------------------------------------------------
    if last is not None:
        from emrrg.checkpoint import load_checkpoint
        model = load_checkpoint(last)
    else:
        model = build_model(a, log=log)
    train_split = load_split(a.data, "train")
    val_split = None
    if a.val_limit != 0:
        try:
            val_split = load_split(a.data, "val", a.val_limit if a.val_limit and a.val_limit > 0 else None)
        except Exception:  # noqa: BLE001 - an annotation without val examples trains without validation
            val_split = None
    data = StudyData(train_split, model.tokenizer, model.cfg.encoder.img_size, a.max_report_tokens,
                     balance=getattr(a, "balance_labels", 0.0),  # runs saved before the flags have none
                     drop_prior_references=getattr(a, "drop_prior_references", False),
                     finding_weight=getattr(a, "finding_weight", 1.0))
    teacher, y_find = getattr(a, "finding_teacher", 0.5), None   # runs saved before the flags have none
    if getattr(a, "finding_tokens", False) and model.finding_prompt is None:
        add_finding_tokens(model, data, a.data, log)
    if model.finding_prompt is not None and teacher > 0:
        y_np, source = data.labels
        if tuple(label_classes(source)) != model.cfg.finding_tokens:
            raise TrainError(f"the model's finding tokens ({', '.join(model.cfg.finding_tokens)}) are not this data's "
                             f"{source} labels; use --finding-teacher 0")
        y_find = torch.from_numpy(y_np)
    saver = _Saver(model, a.qlora)  # before quantization: a twin (if any) keeps the f32 base
    if a.qlora:
        n4 = quantize_llm_4bit(model.llama_model)
        log(f"QLoRA: {n4} LLM linear layers held in NF4 (bitsandbytes), LoRA in f32")
    use_scan(model, a.scan)
    trainable = mark_trainable(model, a.train_encoder)
    if model.finding_prompt is not None and encoder_lr(a) > 0 and any(n.startswith("visual_encoder.") for n in trainable):
        logging.getLogger("emrrg.train").warning(
            "finding tokens: their classifier was fitted on the frozen encoder and is held; with the encoder "
            "training (--encoder-lr %g) it reads features it was not fitted on; hold it with --encoder-lr 0",
            encoder_lr(a))
    if not trainable:
        raise TrainError("nothing to train: give --lora-rank / --llm-lora-rank, or --train-encoder full")

    steps_per_epoch = math.ceil(len(data) / a.batch_size)
    total = a.steps if a.steps else a.epochs * steps_per_epoch
    warmup = int(a.warmup * total) if a.warmup < 1 else int(a.warmup)
    aux, y_aux, aux_w = None, None, getattr(a, "lm_label_loss", 0.0)  # runs saved before the flag have none
    groups = param_groups(model, a.lr, encoder_lr(a), a.weight_decay)
    if aux_w:
        y_np, source = data.labels
        y_aux = torch.from_numpy(y_np)
        aux = label_head(model.llama_proj.out_features, y_np, torch.Generator().manual_seed(a.seed))
        log(f"--lm-label-loss {aux_w}: BCE of a linear head on the LLM's last prompt position, "
            f"{y_np.shape[1]} {source} labels")
        groups.insert(0, {"params": list(aux.parameters()), "names": ["lm_label_head.weight", "lm_label_head.bias"],
                          "lr": a.lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total, a.min_lr_ratio))
    step, best, history = 0, None, []
    if last is not None:
        st = torch.load(last / TRAIN_STATE, map_location="cpu", weights_only=False)
        if st.get("version") != STATE_VERSION:
            raise TrainError(f"{last / TRAIN_STATE}: state version {st.get('version')} is not {STATE_VERSION}")
        if st["trainable"] != trainable:
            raise TrainError(f"{last}: the trainable parameters differ from the saved optimizer's")
        if aux is not None:
            if "lm_label_head" not in st:
                raise TrainError(f"{last / TRAIN_STATE}: no --lm-label-loss head saved")
            aux.load_state_dict(st["lm_label_head"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step, best = st["step"], st.get("best")
        _set_rng_state(st["rng"])
        log(f"resumed {run_dir} at step {step}/{total} (best val score {best})")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps({"args": vars(a), "trainable": trainable}, indent=1) + "\n")
        if a.encoder_pretrain_steps:
            try:   # the whole val split scores the label head (it is cheap: one encoder pass per study)
                pre_val = StudyData(load_split(a.data, "val"), model.tokenizer, model.cfg.encoder.img_size, 1)
            except Exception:  # noqa: BLE001 - an annotation without val examples pre-trains without a score
                pre_val = None
            pre = pretrain_encoder(model, data, a.encoder_pretrain_steps, a.encoder_pretrain_batch_size,
                                   encoder_lr(a, pretrain=True), a.seed, log=log,
                                   labels=a.pretrain_labels, val=pre_val, pool=a.pretrain_pool)
            bce = pre["bce"]
            with open(run_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"encoder_pretrain": {"labels": pre["labels"], "pool": a.pretrain_pool,
                                                         "classes": pre["classes"], "steps": len(bce), "bce_first": bce[0],
                                                         "bce_last": bce[-1],
                                                         "bce_last10pct_mean": float(np.mean(bce[-max(1, len(bce) // 10):])),
                                                         "val": pre["val"], "val_curve": pre["val_curve"]}})
                        + "\n")
        torch.manual_seed(a.seed)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: encoder {count_parameters(model.visual_encoder) / 1e6:.2f}M ({model.cfg.encoder.img_size}px, "
        f"{model.cfg.encoder.num_tokens} tokens), LLM {count_parameters(model.llama_model) / 1e6:.1f}M; "
        f"trainable {n_train / 1e6:.3f}M in {len(trainable)} tensors ({a.train_encoder} encoder); "
        f"{len(data)} train studies, {steps_per_epoch} steps/epoch, {total} steps, warm-up {warmup}")

    logf = open(run_dir / "log.jsonl", "a", encoding="utf-8")

    def save_last() -> None:
        state = {"version": STATE_VERSION, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "step": step, "best": best, "rng": _rng_state(), "trainable": trainable}
        if aux is not None:
            state["lm_label_head"] = aux.state_dict()
        write_checkpoint(saver.target(), run_dir, "last", state=state)

    def run_val() -> None:
        nonlocal best
        if val_split is None:
            return
        t = time.perf_counter()
        res = validate(model, val_split, a.val_batch_size, a.val_max_new_tokens, a.val_min_new_tokens)
        n, ce = res["nlg"], res["ce"]
        rec = {"step": step, "val": {"score": res["score"], "BLEU_4": n["BLEU_4"], "CIDEr": n["CIDEr"],
                                     "ROUGE_L": n["ROUGE_L"], "ce_f1": ce["f1_micro"], "n": n["n"]},
               "val_s": round(time.perf_counter() - t, 1)}
        improved = best is None or res["score"] > best["score"]
        if improved:
            best = {"step": step, **rec["val"]}
            write_checkpoint(saver.target(), run_dir, "best", extra={"val.json": {**rec, "samples": res["samples"]}})
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
        bar.write(f"val @ {step}: score {res['score']:.4f} (BLEU-4 {n['BLEU_4']:.4f} CIDEr {n['CIDEr']:.4f} "
                  f"CE-F1 {ce['f1_micro']:.4f}) in {rec['val_s']} s{' *best*' if improved else ''} | "
                  f"{res['samples'][0]['prediction'][:100]!r}")

    model.train()
    bar = _Progress(total, step, a.progress, a.log_every)
    t_start, ema = time.perf_counter(), None
    try:
        while step < total:
            epoch, k = divmod(step, steps_per_epoch)
            idx = data.plan(epoch, a.batch_size, a.seed)[k]
            px, ids, labels = collate(data, idx)
            t = time.perf_counter()
            parts, tw = {}, collate_weights(data, idx)
            gates = None if y_find is None else teacher_gates(y_find[idx], teacher, [a.seed, 77, step])
            if aux is None:
                loss = lm_losses(model, px, ids, labels, a.bf16, weights=tw, finding_gates=gates)["lm"]
            else:
                terms = lm_losses(model, px, ids, labels, a.bf16, head=aux, y=y_aux[idx], weights=tw,
                                  finding_gates=gates)
                loss = terms["lm"] + aux_w * terms["label"]
                parts = {"lm_loss": float(terms["lm"].detach()), "label_bce": float(terms["label"].detach())}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], a.clip)
            lr = opt.param_groups[-1]["lr"]
            opt.step()
            sched.step()
            step += 1
            lv = float(loss.detach())
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            rec = {"step": step, "loss": lv, "lr": lr, "grad_norm": float(gnorm), "tokens": int((labels != IGNORE).sum()),
                   "s": round(time.perf_counter() - t, 3), **parts}
            history.append(lv)
            logf.write(json.dumps(rec) + "\n")
            bar.update(step, ema, lr)
            if not math.isfinite(lv):
                raise TrainError(f"loss is {lv} at step {step}; lower --lr or check the data")
            if a.val_every and step % a.val_every == 0 and step < total:
                run_val()
            if a.save_every and step % a.save_every == 0 and step < total:
                save_last()
            # a time-boxed chunk saves and stops early; one that reaches the last step ends as a whole run does
            if a.stop_after and a.stop_after <= step < total:
                save_last()
                break
        else:
            run_val()
            save_last()
            if best is None:  # no validation split: the final weights are the result
                write_checkpoint(saver.target(), run_dir, "best", extra={"val.json": {"step": step, "val": None}})
    finally:
        bar.close()
        logf.close()
    wall = time.perf_counter() - t_start
    summary = {"run": str(run_dir), "step": step, "total": total, "wall_s": round(wall, 1), "losses": history,
               "best": best}
    log(f"done: step {step}/{total} in {wall / 60:.1f} min; best {best}")
    return summary


# ---- CLI ---------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from emrrg.config import DECODER_PRESETS, ENCODER_PRESETS, GENERATION_PRESETS

    p = CommandParser(prog="emrrg-train", formatter_class=DefaultsHelpFormatter,
                                description="Partial LoRA fine-tuning of EMRRG on an R2Gen annotation.json "
                                            "(teacher-forced LM loss on the report tokens).")
    p.add_argument("--data", help="R2Gen-style annotation.json (train / val / test; image paths relative to it) "
                                  "(default: none; required unless --resume)")
    p.add_argument("-o", "--output", required=True, help="run directory (run.json, log.jsonl, last/, best/)")
    p.add_argument("--resume", action="store_true", help="continue the run in -o from last/ with its saved arguments")
    m = p.add_argument_group("model")
    m.add_argument("--init", default=None, help="start from this emrrg checkpoint (emrrg-init / emrrg-import / a run) "
                                                   "(default: none; build from the presets)")
    m.add_argument("--encoder", default=None, choices=list(ENCODER_PRESETS), help="encoder preset (default: none; required without --init)")
    m.add_argument("--img-size", type=int, default=None,
                   help="the encoder's image size (default: the preset's, or --init's); with --init, a new size "
                        "re-grids the trained encoder (patch kernel and positions resampled)")
    m.add_argument("--patch-size", type=int, default=None,
                   help="the encoder's patch size (default: the preset's, or --init's); e.g. --init at 112 px / 16 "
                        "with --img-size 224 --patch-size 32 keeps the 7 x 7 token grid at twice the resolution")
    m.add_argument("--decoder", default=None, choices=list(DECODER_PRESETS), help="decoder preset (default: none; required without --init)")
    m.add_argument("--decoder-path", default=None, help="local HF Llama folder (for --decoder llama2-7b) (default: none)")
    m.add_argument("--hybrid-layers", default="", help="decoder layers with gated cross-attention ('every8', '7,15')")
    m.add_argument("--dataset", default="mimic", choices=list(GENERATION_PRESETS), help="generation preset")
    m.add_argument("--lora-rank", type=int, default=8, help="encoder Partial LoRA rank (0: none)")
    m.add_argument("--lora-alpha", type=float, default=16.0, help="encoder Partial LoRA scale numerator")
    m.add_argument("--llm-lora-rank", type=int, default=8,
                   help="peft LoRA rank on --llm-lora-targets (0: none); with --init, a larger rank than its adapter's "
                        "grows it (the same function, more to train)")
    m.add_argument("--llm-lora-targets", default="q_proj,v_proj",
                   help="the LLM projections LoRA adapts: q_proj,k_proj,v_proj,o_proj (self-attention), gate_proj,"
                        "up_proj,down_proj (MLP); with --init, a superset of its adapter's grows it")
    m.add_argument("--llm-lora-alpha", type=float, default=16.0, help="LLM LoRA (peft) alpha")
    m.add_argument("--train-encoder", default="lora", choices=("lora", "full"),
                   help="lora: Partial LoRA only (upstream); full: the whole encoder (no pre-trained encoder)")
    m.add_argument("--qlora", action="store_true", help="base LLM in bitsandbytes NF4 (QLoRA)")
    m.add_argument("--encoder-pretrain-steps", type=int, default=0,
                   help="before the LM loss: pre-train the encoder on the train studies' labels (--pretrain-labels; "
                        "for an encoder without pre-trained weights; 0: off)")
    m.add_argument("--pretrain-labels", default="auto", choices=PRETRAIN_LABELS,
                   help="targets of the encoder pre-training: drawn = the findings drawn on each image (the "
                        "examples' 'labels', as emrrg.data.phantom writes them); report = the labeler's CheXpert "
                        "labels of the report text; auto = drawn when every train example has them, else report")
    m.add_argument("--pretrain-pool", default="mean", choices=PRETRAIN_POOLS,
                   help="how the pre-training head reads the tokens: mean = a linear head on the mean token; max = "
                        "the head on every token, the image's logit the largest token's (a finding that a few "
                        "patches show must be found in those patches)")
    m.add_argument("--encoder-pretrain-batch-size", type=int, default=32, help="images per label pre-training step")
    m.add_argument("--encoder-pretrain-lr", type=float, default=None, help="(default: --encoder-lr)")
    o = p.add_argument_group("optimization")
    o.add_argument("--steps", type=int, default=0, help="optimizer steps (0: --epochs)")
    o.add_argument("--epochs", type=int, default=1, help="passes over the training split (when --steps is 0)")
    o.add_argument("--batch-size", type=int, default=8, help="studies per optimizer step")
    o.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (projector, LLM LoRA)")
    o.add_argument("--encoder-lr", type=float, default=None, help="peak learning rate of the encoder (default: --lr)")
    o.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    o.add_argument("--warmup", type=float, default=0.05, help="warm-up steps (a fraction of the steps if < 1)")
    o.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of the peak")
    o.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    o.add_argument("--balance-labels", type=float, default=0.0,
                   help="label-balanced sampling: each train study is drawn with weight freq(its rarest label) ** "
                        "-POWER (drawn labels when present, else the report's; 0: off, the plain shuffle; 0.5: "
                        "square-root; 1: inverse frequency)")
    o.add_argument("--max-report-tokens", type=int, default=128, help="report + EOS truncated to this many tokens")
    o.add_argument("--drop-prior-references", action="store_true",
                   help="train on the reports without their sentences that only refer to a prior study or describe "
                        "the technique (emrrg.data.reports; val / test references are scored as they are)")
    o.add_argument("--finding-weight", type=float, default=1.0,
                   help="loss weight of the report tokens in sentences that name a finding drawn on the image "
                        "(the labeler on each sentence), against 1 for the rest: the words the image decides; 1: off")
    o.add_argument("--lm-label-loss", type=float, default=0.0,
                   help="weight of an auxiliary BCE: a linear head on the LLM's last prompt position (where the "
                        "report starts) predicts the image's labels (drawn, else the labeler's); 0: off")
    m.add_argument("--finding-tokens", action="store_true",
                   help="after the visual tokens, give the LLM each label's words or their negation, blended by a "
                        "classifier fitted on the frozen encoder (emrrg.findings; hold the encoder with --encoder-lr 0)")
    o.add_argument("--finding-teacher", type=float, default=0.5,
                   help="with finding tokens: the fraction of studies whose gates are their drawn labels, "
                        "the rest the classifier's probabilities")
    o.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast for the LLM (f32 master weights); fast only where the CPU has native bf16 "
                        "(AVX512-BF16 / AMX): elsewhere it is emulated and many times slower, and the run warns")
    o.add_argument("--scan", default="fast", choices=("fast", "ref"), help="SelectiveScan for training")
    o.add_argument("--seed", type=int, default=0, help="seed of sampling, dropout and initialisation")
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is often faster on a busy machine) (default: torch's choice)")
    v = p.add_argument_group("validation and checkpoints")
    v.add_argument("--val-every", type=int, default=0, help="validate every N steps (and always at the end)")
    v.add_argument("--val-limit", type=int, default=-1, help="first N val studies (-1: all, 0: no validation)")
    v.add_argument("--val-batch-size", type=int, default=16, help="studies per validation batch")
    v.add_argument("--val-max-new-tokens", type=int, default=None, help="(default: the generation preset's)")
    v.add_argument("--val-min-new-tokens", type=int, default=None, help="(default: the generation preset's)")
    v.add_argument("--save-every", type=int, default=100, help="write last/ every N steps (and at the end)")
    v.add_argument("--stop-after", type=int, default=0, help="save and stop after this step (the schedule keeps --steps)")
    g = p.add_argument_group("generation settings stored in the checkpoint (default: the --dataset preset)")
    preset = "(default: the --dataset preset's)"
    g.add_argument("--gen-num-beams", type=int, default=None, help=f"beam count {preset}")
    g.add_argument("--gen-min-new-tokens", type=int, default=None, help=f"min new tokens {preset}")
    g.add_argument("--gen-max-new-tokens", type=int, default=None, help=f"max new tokens {preset}")
    g.add_argument("--gen-repetition-penalty", type=float, default=None, help=f"repetition penalty {preset}")
    g.add_argument("--gen-length-penalty", type=float, default=None, help=f"length penalty {preset}")
    g.add_argument("--gen-no-repeat-ngram-size", type=int, default=None, help=f"0 = off {preset}")
    p.add_argument("--progress", default="auto", choices=("auto", "bar", "log"),
                   help="tqdm bar on a terminal, log lines otherwise")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines (--progress log)")
    return p


def train_main(argv: list[str] | None = None) -> None:
    p = _parser()
    a = p.parse_args(argv)
    from emrrg.cli import _cli_errors

    with _cli_errors(p.prog):
        try:
            train(a)
        except TrainError as e:
            print(f"{p.prog}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    train_main()
