"""Rule-based CheXpert-style labeler and clinical-efficacy (CE) scores.

The 14 CheXpert classes are found with the mention phrase lists that ship in the installed
``radtext`` package (``radtext/resources/chexpert_phrases.yml``, read at run time, never copied
here). Each mention then gets a ConText-style state of its own:

* pre-triggers in the mention's clause before it ("no", "without", "negative for", "free of",
  "no evidence of", "resolved", and hypothetical ones: "to detect", "evaluation for") negate it;
  the nearest trigger wins, so in "possible effusion, no pneumothorax" the pneumothorax is
  negated and the effusion is uncertain;
* post-triggers after it, up to the next comma ("is not seen", "are absent", "has resolved",
  "is normal", ...) negate it;
* uncertainty cues ("may", "possible", "cannot be excluded", "suspicious for", ...) make it
  uncertain; double negations ("cannot be excluded", "not ruled out") are uncertain, never
  negative;
* pseudo-triggers ("no change", "no interval change", ...) do not negate;
* a clause ends at ".", ";", ":" and at "but", "however", "although", "with", "which",
  "there is", ...; "normal"/"unremarkable" before a mention only reach two words;
* the neutral anatomical phrases of Cardiomegaly and Enlarged Cardiomediastinum ("the heart",
  "heart size", "cardiac silhouette", "mediastinum", "contour") only count when an abnormality
  cue ("enlarged", "widened", "prominent", ...) sits next to them, so "Heart size is normal." and
  "The mediastinal contours are stable." are negative and "The heart is enlarged." is positive.

Beyond radtext's lists we add a few mention phrases ("mediastinal widening", "ETT",
"tracheostomy") and exclusions ("Kerley B lines" and "plate-like" are no support devices).

A report's state per class follows CheXpert: positive if any mention is positive, else uncertain
if any is uncertain, else negative if any is negative, else blank. No Finding is positive when no
pathology class (all but Support Devices) is positive or uncertain and none of the "other
abnormality" phrases radtext lists under No Finding (emphysema, scoliosis, calcification, ...)
is asserted. :func:`label_report` turns the states into 1/0 with uncertain -> 1 by default
(CheXbert's "U-ones"; pass ``uncertain=0`` for U-zeros).

:func:`ce_scores` computes clinical efficacy as R2Gen / EMRRG report it: labels of the generated
report against labels of the reference, precision / recall / F1 over the positive class, micro
(pooled over the 14 classes) and macro (mean over the 14 classes; a class with no positive in
either gets 0, as scikit-learn's ``zero_division=0``).

:func:`iu_reports` reads the real IU X-Ray reports from the installed ``torchxrayvision`` package
(CC BY-NC-ND: evaluation only, read at run time, never copied into this repository).
"""
from __future__ import annotations

import functools
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from emrrg.assets import MissingAssetError, _package_dir

__all__ = [
    "CHEXPERT_CLASSES",
    "PATHOLOGY_CLASSES",
    "POSITIVE",
    "NEGATIVE",
    "UNCERTAIN",
    "chexpert_phrases",
    "label_states",
    "mention_state",
    "label_report",
    "label_reports",
    "ce_scores",
    "ce_from_labels",
    "iu_records",
    "iu_reports",
    "IUReport",
]

CHEXPERT_CLASSES: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# The classes whose presence rules out "No Finding" (CheXpert leaves Support Devices out).
PATHOLOGY_CLASSES: tuple[str, ...] = tuple(c for c in CHEXPERT_CLASSES if c not in ("No Finding", "Support Devices"))

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

_OTHER_KEY = "No Finding"  # radtext files its "other abnormality" phrases under this key

# Our own additions to radtext's exclude lists: phrases that contain a mention word but are not
# that finding ("Kerley B lines" are not support devices, "plate-like atelectasis" is no plate).
_EXTRA_EXCLUDES: dict[str, tuple[str, ...]] = {
    "Support Devices": (
        r"kerley\s*(?:b\s*)?lines?", r"\bb[- ]lines?", r"septal\s+lines?", r"pleural\s+lines?",
        r"plate[- ]?like", r"fissure\s+lines?", r"\blines?\s+of\s+kerley", r"skin\s*fold\s*lines?",
        r"support(?:ive)?\s+care", r"tubular", r"end\s*-?\s*plates?",
    ),
    "Lung Lesion": (r"mass\s+effect",),
}

# Our own additions to radtext's include lists: common report wordings its list misses.
_EXTRA_INCLUDES: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        r"mediastinal\s+(?:widening|enlargement)", r"widen(?:ed|ing)\s+(?:of\s+the\s+)?(?:superior\s+)?mediastin",
    ),
    "Support Devices": (r"\bett\b", r"tracheostomy", r"\bintubated\b"),
}

# ----------------------------------------------------------------------------------------------
# Trigger lexicon (ours). Each is a regular expression over lower-cased text.

_PRE_NEG = (
    r"\bno\s+(?:evidence|signs?|findings?)\s+(?:of|for|to\s+suggest)\b", r"\bno\b", r"\bnot\b",
    r"\bwithout\b", r"\bnegative\s+for\b", r"\bfree\s+of\b", r"\bclear\s+of\b", r"\bresolved\b",
    r"\bresolution\s+of\b", r"\bresolving\b", r"\babsence\s+of\b", r"\babsent\b", r"\bremoval\s+of\b",
    r"\brule\s+out\b", r"\bruled\s+out\b", r"\bexclude[sd]?\b", r"\bneither\b", r"\bnor\b",
    r"\bdisappearance\s+of\b", r"\bhealed\b", r"\brather\s+than\b", r"\bdenies\b",
    # Hypothetical mentions: "sensitivity to detect pneumothorax", "evaluation for effusion".
    r"\bto\s+(?:detect|assess|evaluate|exclude)\b", r"\bevaluat(?:e|ion)\s+(?:for|of)\b", r"\bassess(?:ment)?\s+for\b",
)
# "normal" and friends negate only what follows within two words ("normal heart size").
_PRE_NEG_NARROW = (r"\bnormal(?:\s+size)?\b", r"\bunremarkable\b", r"\bno\s+longer\b")
_PRE_UNC = (
    r"\bmay\b", r"\bmight\b", r"\bcould\b", r"\bpossibl[ey]\b", r"\bprobabl[ey]\b", r"\blikely\b",
    r"\bquestionabl[ey]\b", r"\bquestion\s+of\b", r"\bsuspicious\s+(?:for|of)\b", r"\bsuspect(?:ed)?\b",
    r"\bconcern(?:ing)?\s+for\b", r"\bsuggest(?:s|ive\s+of|ing)?\b", r"\bconsider(?:ed)?\b",
    r"\bdifferential\b", r"\bversus\b", r"\bvs\.?(?=\s)", r"\bcannot\s+(?:exclude|rule\s+out)\b",
    r"\bcan\s+not\s+(?:exclude|rule\s+out)\b", r"\bborderline\b", r"\bequivocal\b", r"\bindeterminate\b",
    r"\bpresum(?:ed|ably)\b", r"\bno\s+convincing\b", r"\bpotential(?:ly)?\b", r"\bvague(?:ly)?\b",
    r"\bmay\s+represent\b", r"\bcannot\s+be\s+(?:excluded|ruled\s+out)\b",
)
# Post-triggers: checked from the mention to the next comma; the nearest wins.
_POST_UNC = (
    r"\b(?:cannot|can\s*not|could\s+not|not)\s+(?:be\s+)?(?:(?:entirely|completely|totally|fully|definitely)\s+)?"
    r"(?:excluded|ruled\s+out|exclude|rule\s+out)\b",
    r"\bis\s+(?:not\s+)?(?:possible|suspected|questioned)\b", r"\bis\s+likely\b", r"\bmay\s+(?:be|represent)\b",
    r"\bif\s+any\b", r"\bversus\b", r"\bvs\.?(?=\s)", r"\bquestionable\b", r"\bsuspected\b", r"\bpossible\b",
    r"\bnot\s+(?:well\s+)?(?:assessed|evaluated)\b",
)
_POST_NEG = (
    r"\b(?:is|are|was|were|appears?|seems?|remains?)\s+(?:no\s+longer|not)\b",
    r"\b(?:has|have)\s+not\s+been\s+(?:seen|identified|demonstrated|visualized|appreciated|detected)\b",
    r"\bnot\s+(?:seen|identified|present|visualized|visible|appreciated|evident|demonstrated|detected|enlarged|widened)\b",
    r"\bno\s+longer\b", r"\b(?:is|are|were|was)\s+absent\b", r"\babsent\b",
    r"\b(?:has|have|had)\s+(?:since\s+)?(?:been\s+)?(?:resolved|removed|cleared)\b", r"\bresolved\b", r"\bremoved\b",
    r"\bwithin\s+normal\s+(?:\w+\s+){0,2}limits\b", r"\bnormal\s+in\s+(?:size|caliber|appearance|contour)\b",
    r"\b(?:is|are|was|were|appears?|remains?|seems?|looks?)\s+(?:\w+\s+)?(?:normal|unremarkable)\b", r"\bnegative\b",
    r"\bnone\b", r"\bupper\s+limits?\s+of\s+normal\b",
)
# "Heart size normal": a bare "normal" / "unremarkable" right after the mention (two words at most).
_POST_NEG_NARROW = (r"\bnormal\b", r"\bunremarkable\b")
_PSEUDO = (
    r"\bno\s+(?:significant\s+|definite\s+|substantial\s+|appreciable\s+)?(?:interval\s+)?"
    r"(?:change|increase|decrease|worsening|improvement|progression)\b",
    r"\bnot\s+(?:significantly\s+|substantially\s+)?(?:changed|increased|decreased|improved|worsened)\b",
    r"\bwithout\s+(?:significant\s+|interval\s+)*change\b", r"\bnot\s+only\b", r"\bno\s+doubt\b",
    r"\bgram[- ]negative\b", r"\bnot\s+(?:well\s+)?(?:assessed|evaluated)\b",
    r"\bto\s+suggest\b",  # "no opacity to suggest pneumonia": the "no" carries over
)
_TERMINATORS = (
    r"\bbut\b", r"\bhowever\b", r"\balthough\b", r"\bthough\b", r"\bexcept\b", r"\baside\s+from\b",
    r"\bapart\s+from\b", r"\bwhich\b", r"\bwhereas\b", r"\bwhile\b", r"\bwith\b", r"\bthere\s+(?:is|are|has|have|was|were)\b",
    r"\bsecondary\s+to\b", r"\bdue\s+to\b", r"\bconsistent\s+with\b", r"\bnow\b", r"\bstill\b",
)
# Cardiomegaly / Enlarged Cardiomediastinum: phrases without an abnormality word are neutral
# anatomy ("heart size") and need one of these cues beside them.
_ABNORMAL_IN_PHRASE = re.compile(r"enlarg|megaly|widen")
_ABNORMAL_CUE = re.compile(
    r"enlarg|\blarger?\b|widen|prominen|increas|megaly|dilat|\bbig\b|bulg|borderline|expan|globular|\bmass\b")
_CUE_WORDS = 6  # how far (in words) a cue may sit from a neutral mention

_DESCRIPTOR_CLASSES = ("Cardiomegaly", "Enlarged Cardiomediastinum")


def _any(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_RE_PRE_NEG = _any(_PRE_NEG)
_RE_PRE_NEG_NARROW = _any(_PRE_NEG_NARROW)
_RE_PRE_UNC = _any(_PRE_UNC)
_RE_POST_UNC = _any(_POST_UNC)
_RE_POST_NEG = _any(_POST_NEG)
_RE_POST_NEG_NARROW = _any(_POST_NEG_NARROW)
_RE_PSEUDO = _any(_PSEUDO)
_RE_TERM = _any(_TERMINATORS)
_RE_SENT = re.compile(r"(?<=[.!?])\s+|\n\s*\n|;|:(?!\d)|(?<=\D)\.(?=[A-Za-z])")
_RE_WORD = re.compile(r"[a-z0-9]+")


# ----------------------------------------------------------------------------------------------
# Phrase lists


def _radtext_phrase_file() -> Path:
    p = _package_dir("radtext", "radtext==1.0.dev2") / "resources" / "chexpert_phrases.yml"
    if not p.is_file():
        raise MissingAssetError(f"{p} is missing; reinstall: pip install --no-deps radtext==1.0.dev2")
    return p


def _parse_phrase_yaml(text: str) -> dict[str, dict[str, list[str]]]:
    """Parse the two-level ``Class: {include: [...], exclude: [...]}`` layout of radtext's file.

    A tiny reader for exactly that layout, so the labeler needs no YAML library.
    """
    out: dict[str, dict[str, list[str]]] = {}
    cls: str | None = None
    key: str | None = None
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("- '") else raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        body = line.strip()
        if indent == 0 and body.endswith(":"):
            cls = body[:-1].strip().strip("'\"")
            out[cls] = {"include": [], "exclude": []}
        elif body.startswith("- ") and cls is not None and key is not None:
            item = body[2:].strip()
            if len(item) >= 2 and item[0] == item[-1] == "'":
                item = item[1:-1].replace("''", "'")
            elif len(item) >= 2 and item[0] == item[-1] == '"':
                item = item[1:-1].encode().decode("unicode_escape")
            out[cls].setdefault(key, []).append(item)
        elif body.endswith(":") and cls is not None:
            key = body[:-1].strip()
            out[cls].setdefault(key, [])
        else:
            raise ValueError(f"unexpected line in CheXpert phrase file: {raw!r}")
    return out


@functools.lru_cache(maxsize=1)
def chexpert_phrases() -> dict[str, dict[str, tuple[str, ...]]]:
    """The mention phrases per class from the installed radtext package (``include``/``exclude``)."""
    parsed = _parse_phrase_yaml(_radtext_phrase_file().read_text(encoding="utf-8"))
    missing = [c for c in CHEXPERT_CLASSES if c not in parsed]
    if missing:
        raise ValueError(f"radtext's phrase file lacks classes {missing}")
    return {c: {k: tuple(v) for k, v in d.items()} for c, d in parsed.items()}


@dataclass(frozen=True)
class _ClassMatcher:
    name: str
    include: tuple[tuple[str, re.Pattern[str]], ...]
    exclude: re.Pattern[str] | None


@functools.lru_cache(maxsize=1)
def _matchers() -> tuple[_ClassMatcher, ...]:
    out = []
    for cls, d in chexpert_phrases().items():
        phrases = [p.lower() for p in d.get("include", ())] + list(_EXTRA_INCLUDES.get(cls, ()))
        inc = tuple((p, re.compile(p)) for p in phrases)
        exc_list = [p.lower() for p in d.get("exclude", ())] + list(_EXTRA_EXCLUDES.get(cls, ()))
        out.append(_ClassMatcher(cls, inc, _any(exc_list) if exc_list else None))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Core


def _lower(text: str) -> str:
    """Lower case with typographic apostrophes made plain; keeps every character offset."""
    return text.lower().replace("\u2019", "'")


def _normalize(text: str) -> str:
    return re.sub(r"[ \t\r\f\v]+", " ", _lower(text))


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _RE_SENT.split(_normalize(text)) if s and s.strip()]


def _clauses(sentence: str) -> list[tuple[int, int]]:
    """Clause spans of a sentence: a new clause starts at each terminator."""
    starts = [0] + [m.start() for m in _RE_TERM.finditer(sentence) if m.start() > 0]
    ends = starts[1:] + [len(sentence)]
    return list(zip(starts, ends))


def _clause_of(clauses: Sequence[tuple[int, int]], start: int, sentence: str) -> tuple[int, int]:
    return next((c for c in clauses if c[0] <= start < c[1]), (0, len(sentence)))


def _pseudo_spans(sentence: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _RE_PSEUDO.finditer(sentence)]


def _hits(regex: re.Pattern[str], text: str, pseudo: list[tuple[int, int]], offset: int = 0) -> list[tuple[int, int]]:
    out = []
    for m in regex.finditer(text):
        s, e = m.start() + offset, m.end() + offset
        if any(ps <= s < pe or ps < e <= pe for ps, pe in pseudo):
            continue
        out.append((s, e))
    return out


def _n_words(text: str) -> int:
    return len(_RE_WORD.findall(text))


def _mention_state(sentence: str, clause: tuple[int, int], span: tuple[int, int], pseudo: list[tuple[int, int]]) -> int:
    c0, c1 = clause
    s, e = span
    # Post window: from the mention to the next comma (or clause end).
    post = sentence[e:c1]
    comma = post.find(",")
    if comma >= 0:
        post = post[:comma]
    post_unc = _hits(_RE_POST_UNC, post, pseudo, e)
    if post_unc and any(re.search(r"exclud|rul", sentence[a:b]) for a, b in post_unc):
        return UNCERTAIN  # "cannot be excluded" beats any pre-negation
    pre = sentence[c0:s]
    cands: list[tuple[int, int]] = []  # (end position, state)
    for a, b in _hits(_RE_PRE_UNC, pre, pseudo, c0):
        cands.append((b, UNCERTAIN))
    for a, b in _hits(_RE_PRE_NEG, pre, pseudo, c0):
        cands.append((b, NEGATIVE))
    for a, b in _hits(_RE_PRE_NEG_NARROW, pre, pseudo, c0):
        if _n_words(sentence[b:s]) <= 2:
            cands.append((b, NEGATIVE))
    if cands:
        # Nearest trigger wins; on a tie (overlapping "cannot exclude" / "not") uncertainty wins.
        cands.sort(key=lambda t: (t[0], t[1] == UNCERTAIN))
        return cands[-1][1]
    post_hits = [(a, UNCERTAIN) for a, _ in post_unc] + [(a, NEGATIVE) for a, _ in _hits(_RE_POST_NEG, post, pseudo, e)]
    post_hits += [(a, NEGATIVE) for a, _ in _hits(_RE_POST_NEG_NARROW, post, pseudo, e) if _n_words(sentence[e:a]) <= 2]
    if post_hits:
        post_hits.sort(key=lambda t: (t[0], t[1] != UNCERTAIN))
        return post_hits[0][1]
    return POSITIVE


def _has_cue(sentence: str, clause: tuple[int, int], span: tuple[int, int]) -> bool:
    c0, c1 = clause
    before = _RE_WORD.findall(sentence[c0:span[0]])[-_CUE_WORDS:]
    after = _RE_WORD.findall(sentence[span[1]:c1])[:_CUE_WORDS]
    return bool(_ABNORMAL_CUE.search(" ".join(before + ["|"] + after)))


def _combine(states: Iterable[int]) -> int | None:
    st = set(states)
    for s in (POSITIVE, UNCERTAIN, NEGATIVE):
        if s in st:
            return s
    return None


def label_states(text: str) -> dict[str, int | None]:
    """CheXpert states per class: 1 positive, 0 negative, -1 uncertain, None not mentioned."""
    per_class: dict[str, list[int]] = {c: [] for c in CHEXPERT_CLASSES}
    other: list[int] = []
    for sent in _sentences(text):
        pseudo = _pseudo_spans(sent)
        clauses = _clauses(sent)
        for matcher in _matchers():
            excl = [(m.start(), m.end()) for m in matcher.exclude.finditer(sent)] if matcher.exclude else []
            for phrase, rx in matcher.include:
                for m in rx.finditer(sent):
                    s, e = m.start(), m.end()
                    if e == s or any(xs < e and s < xe for xs, xe in excl):
                        continue
                    clause = _clause_of(clauses, s, sent)
                    state = _mention_state(sent, clause, (s, e), pseudo)
                    if (matcher.name in _DESCRIPTOR_CLASSES and state != NEGATIVE
                            and not _ABNORMAL_IN_PHRASE.search(phrase.lower())
                            and not _has_cue(sent, clause, (s, e))):
                        state = NEGATIVE  # neutral anatomy named without an abnormality: normal
                    if matcher.name == _OTHER_KEY:
                        other.append(state)
                    else:
                        per_class[matcher.name].append(state)
    out: dict[str, int | None] = {c: _combine(per_class[c]) for c in CHEXPERT_CLASSES if c != "No Finding"}
    blocked = any(out[c] in (POSITIVE, UNCERTAIN) for c in PATHOLOGY_CLASSES) or _combine(other) in (POSITIVE, UNCERTAIN)
    result = {"No Finding": None if blocked else POSITIVE}
    result.update(out)
    return result


def mention_state(text: str, start: int, end: int) -> int:
    """The state (POSITIVE, NEGATIVE or UNCERTAIN) that :func:`label_states` gives a mention found by
    someone else at ``text[start:end]``: the same sentences, clauses, triggers and pseudo-triggers,
    without the phrase lists (so radtext is not needed) and without the Cardiomegaly descriptor rule.

    The phantom's report policy uses it to decide which mentions are drawn, so the images and the
    CE metric read negation the same way.
    """
    if not 0 <= start < end <= len(text):
        raise ValueError(f"mention span {start}:{end} outside a text of {len(text)} characters")
    low = _lower(text)
    s0, s1 = 0, len(low)
    for m in _RE_SENT.finditer(low):
        if m.end() <= start:
            s0 = m.end()
        elif m.start() >= end:
            s1 = m.start()
            break
    sent = low[s0:s1]
    a, b = start - s0, end - s0
    return _mention_state(sent, _clause_of(_clauses(sent), a, sent), (a, b), _pseudo_spans(sent))


def label_report(text: str, uncertain: int = 1) -> dict[str, int]:
    """Binary labels over the 14 CheXpert classes: 1 positive, 0 negative or not mentioned.

    ``uncertain`` is what an uncertain class becomes: 1 ("U-ones", as CheXbert-based CE), or 0.
    """
    if uncertain not in (0, 1):
        raise ValueError("uncertain must be 0 or 1")
    states = label_states(text)
    return {c: (uncertain if s == UNCERTAIN else int(s == POSITIVE)) for c, s in states.items()}


def label_reports(texts: Sequence[str], uncertain: int = 1) -> list[dict[str, int]]:
    """:func:`label_report` over a list of reports."""
    return [label_report(t, uncertain=uncertain) for t in texts]


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def ce_from_labels(pred_labels: Sequence[Mapping[str, int]], ref_labels: Sequence[Mapping[str, int]],
                   classes: Sequence[str] = CHEXPERT_CLASSES) -> dict:
    """CE precision / recall / F1 over the positive class from label dicts (see :func:`ce_scores`)."""
    if len(pred_labels) != len(ref_labels):
        raise ValueError(f"{len(pred_labels)} predictions vs {len(ref_labels)} references")
    per_class: dict[str, dict[str, float]] = {}
    TP = FP = FN = 0
    for c in classes:
        tp = sum(1 for p, r in zip(pred_labels, ref_labels) if p.get(c, 0) == 1 and r.get(c, 0) == 1)
        fp = sum(1 for p, r in zip(pred_labels, ref_labels) if p.get(c, 0) == 1 and r.get(c, 0) != 1)
        fn = sum(1 for p, r in zip(pred_labels, ref_labels) if p.get(c, 0) != 1 and r.get(c, 0) == 1)
        p, r, f = _prf(tp, fp, fn)
        per_class[c] = {"precision": p, "recall": r, "f1": f, "tp": tp, "fp": fp, "fn": fn, "support": tp + fn}
        TP, FP, FN = TP + tp, FP + fp, FN + fn
    mp, mr, mf = _prf(TP, FP, FN)
    k = max(len(classes), 1)
    return {
        "precision_micro": mp, "recall_micro": mr, "f1_micro": mf,
        "precision_macro": sum(d["precision"] for d in per_class.values()) / k,
        "recall_macro": sum(d["recall"] for d in per_class.values()) / k,
        "f1_macro": sum(d["f1"] for d in per_class.values()) / k,
        "per_class": per_class,
        "n": len(pred_labels),
    }


def ce_scores(preds: Sequence[str], refs: Sequence[str], uncertain: int = 1) -> dict:
    """Clinical efficacy of generated reports ``preds`` against ``refs``.

    Both sides are labeled with :func:`label_report`; returns ``precision_micro``,
    ``recall_micro``, ``f1_micro`` (TP/FP/FN pooled over the 14 classes), ``precision_macro``,
    ``recall_macro``, ``f1_macro`` (unweighted mean over the 14 classes, 0 for a class with no
    positive on either side), ``per_class`` and ``n``.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions vs {len(refs)} references")
    return ce_from_labels(label_reports(preds, uncertain), label_reports(refs, uncertain))


# ----------------------------------------------------------------------------------------------
# IU X-Ray reports (Open-i / Demner-Fushman 2016), from torchxrayvision's package data


@dataclass(frozen=True)
class IUReport:
    """One IU X-Ray report: its numeric id, FINDINGS, IMPRESSION and major MeSH terms."""

    id: int
    findings: str
    impression: str
    mesh: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(t for t in (self.findings, self.impression) if t)


def _iu_tgz() -> Path:
    p = _package_dir("torchxrayvision", "torchxrayvision==1.5.7") / "data" / "NLMCXR_reports.tgz"
    if not p.is_file():
        raise MissingAssetError(f"{p} is missing; reinstall: pip install --no-deps torchxrayvision==1.5.7")
    return p


@functools.lru_cache(maxsize=1)
def _iu_all() -> tuple[IUReport, ...]:
    out = []
    with tarfile.open(_iu_tgz(), "r:gz") as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            f = tar.extractfile(member)
            if f is None:
                continue
            root = ET.fromstring(f.read())
            sections = {el.get("Label", "").upper(): (el.text or "").strip() for el in root.iter("AbstractText")}
            mesh = tuple((el.text or "").strip() for el in root.iter("major"))
            out.append(IUReport(int(Path(member.name).stem), sections.get("FINDINGS", ""),
                                sections.get("IMPRESSION", ""), mesh))
    out.sort(key=lambda r: r.id)
    return tuple(out)


def iu_records(limit: int | None = None, require_text: bool = True) -> list[IUReport]:
    """IU X-Ray reports in id order (1, 2, 3, ...), read from the installed torchxrayvision.

    ``require_text`` drops reports with neither FINDINGS nor IMPRESSION.
    """
    recs = [r for r in _iu_all() if r.text or not require_text]
    return recs[:limit] if limit is not None else recs


def iu_reports(limit: int | None = None) -> list[str]:
    """FINDINGS + IMPRESSION of the IU X-Ray reports, in id order (see :func:`iu_records`)."""
    return [r.text for r in iu_records(limit)]
