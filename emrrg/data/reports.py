"""Training-target clean-up of report text.

:func:`drop_prior_references` removes the sentences of a report that only refer to a prior study or
describe how the film was taken ("Comparison is made to the patient's prior study of ___ at 10:45 a.m.",
"Portable semi-erect chest film ___ at ___ is submitted."). A model that sees one image cannot know
either, so trained on them it states them for every study: a comparison with a study that does not
exist is a hallucination a reader can catch at once, and on stage 6's demo checkpoint such sentences open most
reports and take a fifth of its 128-token budget without naming a finding. The idea follows the
prior-reference removal of report-generation work on MIMIC-CXR (Ramesh et al., 2022); the rule here is
ours and deliberately narrow:

- a sentence is dropped only when it matches :data:`PRIOR_OR_TECHNIQUE` **and** the CE labeler
  (:func:`emrrg.metrics.labeler.label_states`) finds no CheXpert finding in it, positive, negative or
  uncertain: "Compared to the prior study, the effusion has increased." keeps its finding and stays;
- sentences are :func:`split_report_sentences`'s.

Only training targets are changed (``emrrg-train --drop-prior-references``); the references that
validation and test reports are scored against keep every sentence.
"""
from __future__ import annotations

import re

__all__ = ["PRIOR_OR_TECHNIQUE", "split_report_sentences", "sentence_spans", "drop_prior_references",
           "drawn_finding_spans"]

PRIOR_OR_TECHNIQUE = re.compile(
    r"\b(?:compar(?:e|ed|es|ing|ison)"
    r"|(?:prior|previous|earlier|preceding)\s+(?:study|studies|exam|examinations?|radiographs?|films?|images?)"
    r"|is\s+submitted|(?:was|were)\s+(?:obtained|submitted|provided)"
    r"|(?:single|frontal|portable|semi-?erect|upright|supine)\b[^.!?]*\b(?:view|views|film|radiograph|chest))\b",
    re.IGNORECASE)
_END = re.compile(r"[.!?]+(?=\s|$)")
_DOTTED_ABBREVIATION = re.compile(r"\b\w\.\w\.$")       # a.m. p.m. e.g. i.e.


def sentence_spans(report: str) -> list[tuple[int, int]]:
    """(start, end) character spans of `report`'s sentences, surrounding whitespace excluded.

    A sentence ends at . ! ? followed by whitespace or the end of the text, so a decimal ("1.5 cm") ends none;
    after a dotted abbreviation ("a.m.", "p.m.") only when the next word starts with a capital letter or
    ``_`` (anonymised text): "at 3 p.m. today" stays one sentence, "at 10:45 a.m. Portable film" is two.
    Case is not otherwise needed, so a looping lower-case report still splits."""
    bounds, start = [], 0
    for m in _END.finditer(report):
        if _DOTTED_ABBREVIATION.search(report, 0, m.end()):
            nxt = report[m.end():].lstrip()[:1]
            if nxt and not (nxt.isupper() or nxt == "_"):
                continue
        bounds.append((start, m.end()))
        start = m.end()
    bounds.append((start, len(report)))
    out = []
    for a, b in bounds:
        a += len(report[a:b]) - len(report[a:b].lstrip())
        b -= len(report[a:b]) - len(report[a:b].rstrip())
        if b > a:
            out.append((a, b))
    return out


def split_report_sentences(report: str) -> list[str]:
    """The sentences of `report` (:func:`sentence_spans`), each with its own punctuation and inner spacing."""
    return [report[a:b] for a, b in sentence_spans(report)]


def _names_a_finding(sentence: str) -> bool:
    from emrrg.metrics.labeler import label_states

    return any(v is not None for k, v in label_states(sentence).items() if k != "No Finding")


def drop_prior_references(report: str) -> str:
    """`report` without its prior-study and technique sentences that name no finding, the kept ones joined by
    one space. A report with none of them, or made only of them (a target must not become empty), is
    returned as it is."""
    sentences = split_report_sentences(report)
    kept = [s for s in sentences if not (PRIOR_OR_TECHNIQUE.search(s) and not _names_a_finding(s))]
    return " ".join(kept) if kept and len(kept) < len(sentences) else report


def drawn_finding_spans(report: str, findings) -> list[tuple[int, int]]:
    """The :func:`sentence_spans` of `report` whose sentence, labelled alone by the CE labeler, names one of the
    drawn `findings` (emrrg.data.phantom's names; :func:`emrrg.data.phantom.findings_named`). These are the
    sentences an image decides; ``emrrg-train --finding-weight`` weighs their tokens' loss."""
    from emrrg.data.phantom import findings_named
    from emrrg.metrics.labeler import label_report

    findings = list(findings)
    if not findings:
        return []
    return [(a, b) for a, b in sentence_spans(report)
            if any(findings_named(findings, label_report(report[a:b])).values())]
