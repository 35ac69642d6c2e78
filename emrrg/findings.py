"""Finding tokens: a classification-guided prompt that keeps the export contract.

A linear classifier reads the encoder's tokens (their mean and their per-channel max) and gives one
probability p_k per finding. Each finding then becomes `slots` extra LLM input tokens after the visual tokens:

    slot_k,j = p_k * present_k,j + (1 - p_k) * absent_k,j

present_k starts as the LLM's input embeddings of " pleural effusion," and absent_k as those of " no pleural
effusion," (each padded with "," to the same number of slots), and both train with the LM. At p = 1 or 0 the
LLM reads its own words for the finding or its negation; in between, a blend of the two.

The blend must turn the tokens, not scale them: a Llama-family LLM normalises each input token (RMSNorm)
before it reads it, so a token times p reads as the token itself for any p > 0. Hence the two word
sequences, and no multiplication by p alone.

Everything is continuous (no threshold in the graph), so the tokens are part of the encoder's output like
the visual ones: the ONNX graph, the INT8 export, the bundle and the torch-free runtime see only a longer
visual sequence (`EMRRGConfig.num_visual_tokens`).

Training (`emrrg-train --finding-tokens`): the classifier is fitted once, on the frozen encoder's tokens of
the training studies (`fit_head`: L2-regularised logistic regression by LBFGS, the strength chosen on the val
split), then held. The LM learns to read the tokens with the gates p set, per study, to the drawn findings
(probability `--finding-teacher`) or to the classifier's own probabilities (so it also sees the soft values
it meets at inference).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The L2 strengths fit_head tries (per-sample mean BCE + lam * |W|^2 on standardised features).
HEAD_L2 = (1e-4, 1e-3, 1e-2, 1e-1)
PAD_TEXT = ","


def phrase(name: str) -> str:
    """A finding's name as words ('pleural_effusion' -> 'pleural effusion')."""
    return name.replace("_", " ")


def slot_texts(name: str) -> tuple[str, str]:
    """The text of a finding's present and absent slots (before padding)."""
    return f" {phrase(name)}{PAD_TEXT}", f" no {phrase(name)}{PAD_TEXT}"


def slot_count(tokenizer, names: Sequence[str]) -> int:
    """Slots per finding: the longest of the names' present / absent texts in the tokenizer's tokens."""
    return max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for n in names for t in slot_texts(n))


class FindingTokens(nn.Module):
    """(b, L, D) encoder tokens -> (b, K * slots, H) finding tokens, `slots` per name."""

    def __init__(self, names: Sequence[str], slots: int, d_model: int, hidden: int):
        super().__init__()
        self.names = tuple(names)
        k = len(self.names)
        self.head = nn.Linear(2 * d_model, k)
        self.present = nn.Parameter(torch.zeros(k, slots, hidden))
        self.absent = nn.Parameter(torch.zeros(k, slots, hidden))

    @staticmethod
    def features(tokens: torch.Tensor) -> torch.Tensor:
        """(b, L, D) -> (b, 2D): the mean token and the per-channel max over tokens."""
        return torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(tokens))                              # (b, K)

    def forward(self, tokens: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        """`gates` (b, K) in [0, 1] replace the classifier's probabilities (training's teacher forcing); a row of
        NaN keeps the classifier's for that study."""
        g = torch.sigmoid(self.logits(tokens))
        if gates is not None:
            gates = gates.to(g.dtype)
            g = torch.where(torch.isnan(gates), g, gates)
        g = g.to(self.present.dtype)[:, :, None, None]                        # (b, K, 1, 1)
        out = g * self.present + (1 - g) * self.absent                       # (b, K, S, H)
        return out.flatten(1, 2)                                             # (b, K * S, H)

    @torch.no_grad()
    def init_from_embeddings(self, tokenizer, embedding: nn.Embedding) -> None:
        """Each finding's slots: the input embeddings of slot_texts' present / absent words, padded with PAD_TEXT."""
        w = embedding.weight
        pad = tokenizer(PAD_TEXT, add_special_tokens=False)["input_ids"][-1]
        slots = self.present.shape[1]
        for k, name in enumerate(self.names):
            for vec, text in zip((self.present, self.absent), slot_texts(name)):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids = ids + [pad] * (slots - len(ids))
                vec[k] = w[torch.tensor(ids, device=w.device)].to(vec.dtype)


def _logreg(x: torch.Tensor, y: torch.Tensor, lam: float, iters: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised multi-label logistic regression (LBFGS): weights (K, F) and bias (K,) on `x` as given."""
    w = torch.zeros(y.shape[1], x.shape[1], dtype=torch.float64, requires_grad=True)
    prior = y.mean(0).clamp(1e-3, 1 - 1e-3)
    b = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w.T + b, y) + lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


@torch.no_grad()
def encoder_features(model, pixels: Callable[[int], np.ndarray], n: int, batch: int = 16) -> np.ndarray:
    """(n, 2D) FindingTokens.features of the model's encoder for studies 0..n-1 (`pixels(i)`: (V, 3, S, S))."""
    from emrrg.encoder import stack_views

    enc = model.visual_encoder
    was = enc.training
    enc.eval()
    out = []
    try:
        for s in range(0, n, batch):
            px = stack_views([pixels(i) for i in range(s, min(s + batch, n))])
            out.append(FindingTokens.features(enc.encode_study(px)).double().numpy())
    finally:
        enc.train(was)
    return np.concatenate(out)


def fit_head(head: nn.Linear, x: np.ndarray, y: np.ndarray, x_val: np.ndarray | None = None,
             y_val: np.ndarray | None = None, l2: Sequence[float] = HEAD_L2) -> dict:
    """Fit `head` (F -> K) to the 0/1 targets `y` (n, K) of the features `x` (n, F). The features are standardised
    for the fit and the scaling folded back into the weights, so the head reads raw features. With a val split,
    the L2 strength with the lowest val BCE wins; without one, the middle of `l2`. Returns the choice and BCEs."""
    mu = x.mean(0)
    sd = x.std(0) + 1e-6
    xt = torch.from_numpy((x - mu) / sd)
    yt = torch.from_numpy(y.astype(np.float64))
    cands = list(l2) if x_val is not None and len(x_val) else [list(l2)[len(l2) // 2]]
    best = None
    for lam in cands:
        w, b = _logreg(xt, yt, lam)
        w_raw, b_raw = w / torch.from_numpy(sd), b - (w / torch.from_numpy(sd)) @ torch.from_numpy(mu)
        rec = {"l2": lam, "train_bce": float(F.binary_cross_entropy_with_logits(torch.from_numpy(x) @ w_raw.T + b_raw, yt))}
        if x_val is not None and len(x_val):
            rec["val_bce"] = float(F.binary_cross_entropy_with_logits(torch.from_numpy(x_val) @ w_raw.T + b_raw,
                                                                      torch.from_numpy(y_val.astype(np.float64))))
        if best is None or rec.get("val_bce", 0.0) < best[0].get("val_bce", 0.0):
            best = (rec, w_raw, b_raw)
    rec, w_raw, b_raw = best
    head.weight.data.copy_(w_raw.to(head.weight.dtype))
    head.bias.data.copy_(b_raw.to(head.bias.dtype))
    return rec
