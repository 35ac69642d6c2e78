"""Natural-language generation metrics for reports: BLEU-1..4, METEOR, ROUGE-L, CIDEr.

The scorers are the COCO caption ones (``pycocoevalcap``), as R2Gen and EMRRG report them,
computed over the whole corpus (BLEU corpus-level with the "closest" brevity penalty, CIDEr-D
document frequencies from the references given). Text is tokenized first with the Stanford PTB
tokenizer that ships inside pycocoevalcap (lower-cased, punctuation dropped), and METEOR 1.5 runs
as the jar that ships there too; both need Java (>= 8) and nothing from the network.

Without Java, or when a jar fails, nothing crashes and nothing is faked: tokenization falls back
to a regex tokenizer that mimics PTB's lower-casing and punctuation removal, and ``METEOR`` is
``None``; the result says so in ``tokenizer`` and ``meteor_status``.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

__all__ = ["nlg_scores", "ptb_tokenize", "simple_tokenize", "java_available", "PUNCTUATION"]

# What pycocoevalcap's PTB wrapper removes after tokenizing, plus the lower-cased bracket tokens
# (with -lowerCase the tokenizer emits "-lrb-", which pycocoevalcap's upper-case list misses).
PUNCTUATION = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", "-lrb-", "-rrb-", "-lcb-", "-rcb-",
                         "-lsb-", "-rsb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"})
_PTB_TIMEOUT_S = 120


def _coco_dir() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("NLG metrics need pycocoevalcap; run: pip install pycocoevalcap")
    return Path(list(spec.submodule_search_locations)[0])


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH."""
    return shutil.which("java") is not None


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", (text or "").replace("|||", " ")).strip()


def simple_tokenize(texts: Sequence[str]) -> list[str]:
    """Regex stand-in for the PTB tokenizer: lower-case, split off punctuation, drop it."""
    out = []
    for t in texts:
        toks = re.findall(r"[a-z0-9_]+(?:[.'\-/][a-z0-9_]+)*|[^\sa-z0-9_]", _clean(t).lower())
        out.append(" ".join(w for w in toks if w not in PUNCTUATION and re.search(r"[a-z0-9_]", w)))
    return out


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Stanford PTBTokenizer (``-preserveLines -lowerCase``) as pycocoevalcap runs it, punctuation dropped.

    The input goes through a temporary file outside site-packages; raises on any Java failure.
    """
    jar = _coco_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if not jar.is_file():
        raise FileNotFoundError(f"{jar} is missing")
    if not texts:
        return []
    lines = [_clean(t) for t in texts]
    fd, tmp = tempfile.mkstemp(suffix=".txt", prefix="emrrg_ptb_")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        res = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                              "-lowerCase", tmp], capture_output=True, timeout=_PTB_TIMEOUT_S, check=True)
    finally:
        os.unlink(tmp)
    out_lines = res.stdout.decode("utf-8").split("\n")
    if len(out_lines) < len(lines):
        out_lines += [""] * (len(lines) - len(out_lines))
    out = []
    for src, line in zip(lines, out_lines):
        out.append("" if not src else " ".join(w for w in line.strip().split(" ") if w and w not in PUNCTUATION))
    return out


class _MeteorServer:
    """One METEOR 1.5 process (loading its paraphrase table takes seconds), reused across calls."""

    _lock = threading.Lock()
    _inst: Any = None
    _error: str | None = None

    @classmethod
    def get(cls) -> Any:
        with cls._lock:
            if cls._inst is None and cls._error is None:
                try:
                    from pycocoevalcap.meteor.meteor import Meteor

                    cls._inst = Meteor()
                    atexit.register(cls.close)
                except Exception as e:  # noqa: BLE001 - any failure means "no METEOR", reported
                    cls._error = f"{type(e).__name__}: {e}"
            if cls._inst is None:
                raise RuntimeError(cls._error or "METEOR unavailable")
            return cls._inst

    @classmethod
    def close(cls) -> None:
        with cls._lock:
            m, cls._inst = cls._inst, None
        if m is not None:
            try:
                m.meteor_p.stdin.close()
                m.meteor_p.kill()
                m.meteor_p.wait(timeout=10)
            except Exception:  # noqa: BLE001
                pass

    @classmethod
    def fail(cls, reason: str) -> None:
        cls.close()
        with cls._lock:
            cls._error = reason


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    """Corpus METEOR (the jar aggregates statistics over all segments; empty segments score 0)."""
    score, _ = _MeteorServer.get().compute_score(gts, res)
    return float(score)


def nlg_scores(preds: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], *, tokenizer: str = "auto",
               meteor: bool = True) -> dict[str, Any]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of generated reports against references.

    ``refs`` holds one reference string per prediction, or a list of references each.
    ``tokenizer``: ``"ptb"`` (Java; raise if it fails), ``"simple"`` (regex), or ``"auto"`` (PTB,
    falling back to simple). Returns ``BLEU_1`` ... ``BLEU_4``, ``METEOR`` (None when unavailable
    or ``meteor=False``), ``ROUGE_L``, ``CIDEr``, ``n``, ``tokenizer`` (what ran, and why when it
    fell back) and ``meteor_status`` (``"ok"``, ``"skipped"`` or ``"unavailable: <reason>"``).
    Empty predictions score 0; no predictions at all give zeros.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions vs {len(refs)} references")
    ref_lists = [[r] if isinstance(r, str) else list(r) for r in refs]
    if any(not rl for rl in ref_lists):
        raise ValueError("every prediction needs at least one reference")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out: dict[str, Any] = {"n": len(preds)}
    flat = list(preds) + [r for rl in ref_lists for r in rl]
    if tokenizer not in ("auto", "ptb", "simple"):
        raise ValueError("tokenizer must be 'auto', 'ptb' or 'simple'")
    if tokenizer == "simple":
        toks, out["tokenizer"] = simple_tokenize(flat), "simple"
    else:
        try:
            toks, out["tokenizer"] = ptb_tokenize(flat), "ptb"
        except Exception as e:  # noqa: BLE001
            if tokenizer == "ptb":
                raise
            toks, out["tokenizer"] = simple_tokenize(flat), f"simple (PTB unavailable: {type(e).__name__}: {e})"
    n = len(preds)
    res = {i: [toks[i]] for i in range(n)}
    gts: dict[int, list[str]] = {}
    k = n
    for i, rl in enumerate(ref_lists):
        gts[i] = toks[k:k + len(rl)]
        k += len(rl)

    if n == 0 or all(not res[i][0] for i in range(n)):
        out.update({f"BLEU_{j}": 0.0 for j in range(1, 5)})
        out.update({"ROUGE_L": 0.0, "CIDEr": 0.0, "METEOR": 0.0 if meteor else None,
                    "meteor_status": "ok (no words predicted)" if meteor else "skipped"})
        return out

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for j in range(4):
        out[f"BLEU_{j + 1}"] = float(bleu[j])
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if not meteor:
        out["METEOR"], out["meteor_status"] = None, "skipped"
    else:
        try:
            out["METEOR"], out["meteor_status"] = _meteor(gts, res), "ok"
        except Exception as e:  # noqa: BLE001
            reason = f"{type(e).__name__}: {e}"
            if not isinstance(e, RuntimeError):
                _MeteorServer.fail(reason)   # a broken process is not reused
            out["METEOR"], out["meteor_status"] = None, f"unavailable: {reason}"
    return out
