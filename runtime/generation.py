"""Torch-free decoding loops (numpy): greedy and beam search with the upstream EMRRG settings.

The loops talk to a `StepModel`, which owns the KV cache (see `emrrg.runtime.decoder`):

    prefill(embeds (1, T, H) f32, num_rows)  -> logits (num_rows, V) of the last position
    step(tokens (n,) int64, rows (n,) int64) -> logits (n, V); `rows` says which cache row each
                                                 new token continues (beam reordering)

Semantics follow transformers 5's `generate` with `inputs_embeds` and no `input_ids`, so the
prompt is not part of the sequence that the repetition penalty sees (upstream EMRRG behaves the
same way):
- greedy: processors on the raw logits, then argmax;
- beam search: log_softmax, then processors, top 2·beams candidates, finished hypotheses scored
  sum_logprob / len**length_penalty, early_stopping=False heuristic. All in float32 as there.
Processors, in transformers' order: repetition penalty (score < 0 -> ·p, else /p, once per seen token),
no_repeat_ngram_size n (a token that would complete an n-gram already in the row's generated tokens
-> -inf) and min_new_tokens (EOS -> -inf until that many tokens exist).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import numpy as np

from emrrg.config import DECODE_KEYS, GenerationConfig

NEG = np.float32(-1.0e9)  # transformers' "very large negative" for masked beams


@dataclass
class DecodeSettings(GenerationConfig):
    """The upstream decoding settings (emrrg.config.GenerationConfig, torch-free) plus the EOS id."""

    eos_token_id: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()   # min_new_tokens <= max_new_tokens (emrrg.config.GenerationConfig)
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError("num_beams and max_new_tokens must be >= 1")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.no_repeat_ngram_size < 0:
            raise ValueError("no_repeat_ngram_size must be >= 0 (0 = off)")

    def as_generation(self) -> dict:
        """The decoding settings alone (the GenerationConfig fields), without the EOS id."""
        return {k: getattr(self, k) for k in DECODE_KEYS}


class StepModel(Protocol):
    def prefill(self, embeds: np.ndarray, num_rows: int) -> np.ndarray: ...
    def step(self, tokens: np.ndarray, rows: np.ndarray) -> np.ndarray: ...


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))).astype(np.float32)


def banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of `seq`: the continuations of every earlier occurrence of its
    last n-1 tokens (all of seq's tokens for n = 1). Nothing is banned before the row has n-1 tokens."""
    if n <= 0 or len(seq) + 1 < n:
        return []
    tail = seq[len(seq) - n + 1:]                                     # the n-1 tokens a new token would extend
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == tail]


def apply_processors(scores: np.ndarray, seqs: list[list[int]], s: DecodeSettings) -> np.ndarray:
    """Repetition penalty, no-repeat n-grams, then min-new-tokens, row by row (scores: (n, V) float32,
    modified in place)."""
    if s.repetition_penalty != 1.0:
        for r, seq in enumerate(seqs):
            if seq:
                idx = np.unique(np.asarray(seq, dtype=np.int64))
                v = scores[r, idx]
                scores[r, idx] = np.where(v < 0, v * np.float32(s.repetition_penalty), v / np.float32(s.repetition_penalty))
    if s.no_repeat_ngram_size:
        for r, seq in enumerate(seqs):
            banned = banned_ngram_tokens(seq, s.no_repeat_ngram_size)
            if banned:
                scores[r, banned] = -np.inf
    if seqs and len(seqs[0]) < s.min_new_tokens:
        scores[:, s.eos_token_id] = -np.inf
    return scores


def greedy(model: StepModel, embeds: np.ndarray, s: DecodeSettings,
           on_token: Callable[[int], None] | None = None) -> list[int]:
    return list(greedy_stream(model, embeds, s, on_token))


def greedy_stream(model: StepModel, embeds: np.ndarray, s: DecodeSettings,
                  on_token: Callable[[int], None] | None = None) -> Iterator[int]:
    """Yield tokens as they are chosen (EOS included, as transformers returns it)."""
    seq: list[int] = []
    logits = model.prefill(embeds, 1)
    while True:
        scores = apply_processors(logits.astype(np.float32, copy=True), [seq], s)
        tok = int(np.argmax(scores[0]))
        seq.append(tok)
        if on_token:
            on_token(tok)
        yield tok
        if tok == s.eos_token_id or len(seq) >= s.max_new_tokens:
            return
        logits = model.step(np.array([tok], dtype=np.int64), np.zeros(1, dtype=np.int64))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest, descending; ties go to the lower index."""
    return np.argsort(-x, kind="stable")[:k]


def beam_search(model: StepModel, embeds: np.ndarray, s: DecodeSettings) -> list[int]:
    """The best finished hypothesis (EOS included when it ended on one)."""
    nb, k = s.num_beams, 2 * s.num_beams          # one EOS id: keep max(2, 1 + 1) * beams candidates
    lp = np.float32(s.length_penalty)
    run_seqs: list[list[int]] = [[] for _ in range(nb)]
    run_scores = np.full(nb, NEG, dtype=np.float32)
    run_scores[0] = 0.0                           # only the first beam is live at the start
    fin_seqs: list[list[int]] = [[] for _ in range(nb)]
    fin_scores = np.full(nb, NEG, dtype=np.float32)
    fin_done = np.zeros(nb, dtype=bool)
    improvable = True
    logits = model.prefill(embeds, nb)
    cur = 0
    while True:
        logp = apply_processors(_log_softmax(logits), run_seqs, s)
        acc = (logp + run_scores[:, None]).reshape(-1)
        vocab = logp.shape[1]
        top = _topk(acc, k)
        top_lp = acc[top].astype(np.float32)
        beam, tok = top // vocab, top % vocab
        cand = [run_seqs[b] + [int(t)] for b, t in zip(beam, tok)]
        hits = (tok == s.eos_token_id) | (cur + 1 >= s.max_new_tokens)
        # The live beams for the next step: the best k candidates that did not stop.
        run_lp = top_lp + hits.astype(np.float32) * NEG
        nxt = _topk(run_lp, nb)
        run_seqs, run_scores, rows = [cand[i] for i in nxt], run_lp[nxt], beam[nxt]
        # Finished hypotheses: only the first `nb` candidates may finish, scored with the length penalty.
        f_lp = top_lp / np.float32((cur + 1) ** lp)
        if not improvable:
            f_lp = f_lp + NEG
        did = hits & (np.arange(k) < nb)
        f_lp = f_lp + (~did).astype(np.float32) * NEG
        m_scores = np.concatenate([fin_scores, f_lp])
        m_seqs = fin_seqs + cand
        m_done = np.concatenate([fin_done, did])
        keep = _topk(m_scores, nb)
        fin_scores, fin_seqs, fin_done = m_scores[keep], [m_seqs[i] for i in keep], m_done[keep]
        cur += 1
        # early_stopping=False heuristic: can the best live beam, at its current length, still beat the worst kept?
        best_possible = run_scores[0] / np.float32(cur ** lp)
        worst = np.where(fin_done, fin_scores.min(), NEG)
        improvable = improvable and bool(np.any(best_possible > worst))
        if not improvable or bool(np.all(hits)):
            break
        logits = model.step(np.array([q[-1] for q in run_seqs], dtype=np.int64), rows.astype(np.int64))
    return fin_seqs[0]


def generate(model: StepModel, embeds: np.ndarray, s: DecodeSettings,
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """Greedy for one beam (tokens stream through `on_token`), beam search otherwise."""
    if s.num_beams == 1:
        return greedy(model, embeds, s, on_token)
    out = beam_search(model, embeds, s)
    if on_token:
        for t in out:
            on_token(t)
    return out


class TextDeltas:
    """The text each new token adds to the report (the whole prefix is decoded each time, so a character
    split over tokens comes out whole, and the clean-up of Runtime.decode_text applies). Text that may still
    change (an incomplete character at the end) is held back until a later token settles it."""

    def __init__(self, decode_text: Callable[[list[int]], str]):
        self.decode_text, self.ids, self.shown = decode_text, [], ""

    def add(self, tok: int) -> str:
        self.ids.append(tok)
        return self._advance(self.decode_text(self.ids), final=False)

    def rest(self, report: str) -> str:
        """What the final report adds to the text given so far ("" when it adds nothing)."""
        return self._advance(report, final=True)

    def _advance(self, text: str, final: bool) -> str:
        if not text.startswith(self.shown) or (text.endswith("\ufffd") and not final):
            return ""
        delta, self.shown = text[len(self.shown):], text
        return delta
