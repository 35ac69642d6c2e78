"""Deterministic phantom chest radiographs paired with real-looking reports.

Every image is a frontal (PA) chest radiograph drawn from a finding set: lungs with vessel
markings and parenchymal texture, heart, mediastinum, aortic knob, hila, trachea, spine,
hemidiaphragms with a gastric bubble, posterior and anterior ribs, clavicles, humeral heads, soft
tissue, exposure gradient and noise. Patient right is image left, as on a real PA film. The
renderer builds an attenuation map and displays it linearly (as a log-processed digital
radiograph) with a soft shoulder for bone and metal. ``size`` x ``size`` grayscale, 8-bit or
16-bit PNG. numpy + Pillow only. The renderer is :mod:`emrrg.data.phantom_render` (one registered draw
function per finding); this module pairs its images with reports (the policy below) and writes the
dataset, and re-exports the renderer's public names.

Renderable findings (:data:`FINDINGS`) and how each is drawn:

============================== ========================================================================
``cardiomegaly``               heart silhouette 1.3-1.55x wider (cardiothoracic ratio ~0.55-0.65)
``enlarged_cardiomediastinum`` superior mediastinum widened, larger aortic knob
``pleural_effusion``           basal fluid density with a meniscus rising laterally; blunts the
                               costophrenic angle, hides the hemidiaphragm and the markings in it
``pneumothorax``               apicolateral lucent space without markings between the chest wall and
                               a thin visceral pleural line; the lung edge is retracted
``consolidation``              patchy confluent opacity with air bronchograms (also pneumonia,
                               air-space opacity, infiltrate, ground glass)
``lung_lesion``                round opacity: nodule (r ~ 3-5 px at 224) or lobulated mass
``atelectasis``                plate-like linear opacities (a wedge when severe) and volume loss:
                               elevated hemidiaphragm, mediastinum shifted to that side
``edema``                      bilateral perihilar haze, Kerley B lines, blurred vessels, cephalization
``support_devices``            bright thin curves: endotracheal / tracheostomy tube, enteric tube,
                               central venous catheter, chest drain, pacemaker generator and leads
``fracture``                   one posterior rib broken: gap and step-off
``hyperinflation``             low flat hemidiaphragms, more lucent lungs, narrow heart (emphysema)
============================== ========================================================================

Side (patient left/right/bilateral), severity (mild/moderate/severe), zone (upper/mid/lower),
nodule-vs-mass and device types are read from the paired report where it names them, else drawn
from the finding's own random stream (the anatomy has a stream of its own too, so adding a finding
never moves anything else).

Reports and labels come from ``radlabels`` (MIT): 1,000 synthetic MIMIC-style reports
(``samples/synthetic_reports/*.txt``) with 49 finding labels (``synthetic_labels.json``) and the
token positions of every label mention (``synthetic_matches.json``), read from the installed
package at run time. The label set is chosen first, then rendered. Policy, per report:

1. Clean the text: keep FINDINGS / IMPRESSION and any other free-text section; drop the preamble's
   upper-case title lines, the first paragraph of EXAMINATION, INDICATION, HISTORY, COMPARISON,
   TECHNIQUE, REASON FOR EXAM, NOTIFICATION, RECOMMENDATION (later paragraphs without a header of
   their own are findings) and WET READ's time stamp; drop list numbering; cut a report that
   stops mid-sentence (many do) after its last full sentence; a report with no full sentence left
   is left out.
2. A label counts when one of its "definitely present" or "uncertain" mentions lies in the kept
   text (uncertain -> drawn, like CheXbert's U-ones) and the CE labeler
   (:func:`emrrg.metrics.labeler.mention_state`: the same sentences, clauses, negation and
   hypothetical triggers that score generated reports) does not read it as negative ("No
   pneumothorax, although the sensitivity to detect pneumothorax is diminished": radlabels calls
   the second mention present; we do not draw it). Side / severity / zone are read only from
   mentions that the labeler does not negate either.
3. Map the counted labels with :data:`SOURCE_TO_FINDING`. Labels in :data:`IGNORED_SOURCE` are
   subtle or non-pulmonary findings we do not draw (aortic calcification, tortuous aorta, pleural
   thickening, hernia, ...): the report is kept and the image shows nothing for them. A report
   with a label in :data:`EXCLUDED_SOURCE` (conspicuous findings we cannot draw: subcutaneous
   emphysema, pneumomediastinum, pneumoperitoneum, tracheal deviation, ...) is left out.
4. A report with no renderable label becomes a "no renderable finding" (normal) image.

:func:`write_phantom_dataset` splits the usable reports about 70/10/20 (train/val/test) by a split
list fixed per radlabels report (``phantom_split.json``, see :func:`source_splits`; no report appears
in two splits, and a policy change never moves one), renders one image per report by
default (or ``n_*`` images, cycling over the split's reports with fresh render seeds), and writes
an R2Gen ``annotation.json``. Same arguments (and numpy / Pillow) -> byte-identical PNGs and
annotation, whatever ``workers`` is.

CLI: ``python -m emrrg.data.phantom -o DIR [--n-train N --n-val N --n-test N --seed S --size PX
--bit-depth 8|16 --workers N --stats]``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from emrrg.assets import MissingAssetError, _package_dir
from emrrg.data.annotation import SPLITS, write_annotation
from emrrg.data.phantom_render import (DEVICES, FINDINGS, PhantomSpec, phantom_regions, render_phantom, save_png,
                                       to_uint8, to_uint16)
from emrrg.data.reports import split_report_sentences
from emrrg.metrics.labeler import NEGATIVE, mention_state

__all__ = [
    "FINDINGS",
    "DEVICES",
    "SOURCE_TO_FINDING",
    "SOURCE_TO_DEVICE",
    "IGNORED_SOURCE",
    "EXCLUDED_SOURCE",
    "FINDING_TO_CHEXPERT",
    "findings_named",
    "PhantomSpec",
    "PhantomCase",
    "render_phantom",
    "phantom_regions",
    "to_uint8",
    "to_uint16",
    "save_png",
    "clean_report",
    "parse_attributes",
    "load_cases",
    "dataset_statistics",
    "write_phantom_dataset",
    "main",
]


SOURCE_TO_FINDING: dict[str, str] = {
    "cardiomegaly": "cardiomegaly",
    "enlarged_cardiomediastinum": "enlarged_cardiomediastinum",
    "pleural_effusion": "pleural_effusion",
    "pneumothorax": "pneumothorax",
    "consolidation": "consolidation",
    "air_space_opacity": "consolidation",
    "pneumonia": "consolidation",
    "lung_opacity": "consolidation",
    "infiltration": "consolidation",
    "ground_glass_opacity": "consolidation",
    "lung_nodule_or_mass": "lung_lesion",
    "lung_lesion": "lung_lesion",
    "atelectasis": "atelectasis",
    "lobar_segmental_collapse": "atelectasis",
    "whole_lung_or_majority_collapse": "atelectasis",
    "pulmonary_edema": "edema",
    "pulmonary_congestion_pulmonary_venous_congestion": "edema",
    "interstitial_thickening": "edema",
    "peribronchial_cuffing": "edema",
    "endotracheal_tube": "support_devices",
    "tracheostomy_tube": "support_devices",
    "enteric_tube": "support_devices",
    "central_venous_catheter": "support_devices",
    "intercostal_drain": "support_devices",
    "pacemaker_electronic_cardiac_device_or_wires": "support_devices",
    "implantable_electronic_device": "support_devices",
    "support_devices_generic": "support_devices",
    "fracture_generic": "fracture",
    "acute_rib_fracture": "fracture",
    "non_acute_rib_fracture": "fracture",
    "hyperinflation": "hyperinflation",
    "emphysema": "hyperinflation",
    "bullous_disease": "hyperinflation",
}
SOURCE_TO_DEVICE: dict[str, str] = {
    "endotracheal_tube": "ett",
    "tracheostomy_tube": "tracheostomy",
    "enteric_tube": "enteric_tube",
    "central_venous_catheter": "cvc",
    "intercostal_drain": "chest_drain",
    "pacemaker_electronic_cardiac_device_or_wires": "pacemaker",
    "implantable_electronic_device": "pacemaker",
    "support_devices_generic": "cvc",
}
# Subtle or outside-the-lung findings: not drawn, report kept.
IGNORED_SOURCE: frozenset[str] = frozenset({
    "calcification_of_the_aorta", "tortuous_aorta", "pleural_thickening", "pleural_other", "hiatus_hernia",
    "other_hernia", "hilar_lymphadenopathy", "pulmonary_fibrosis", "pulmonary_artery_enlargement",
    "bronchial_wall_thickening",
})
# Conspicuous findings we cannot draw: the report is left out.
EXCLUDED_SOURCE: frozenset[str] = frozenset({
    "subcutaneous_emphysema", "pneumomediastinum", "pneumoperitoneum", "tracheal_deviation",
    "shoulder_dislocation", "nonsurgical_internal_foreign_body",
})
# CheXpert classes a report describing the finding is expected to assert (any one of them).
FINDING_TO_CHEXPERT: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("Cardiomegaly", "Enlarged Cardiomediastinum"),
    "enlarged_cardiomediastinum": ("Enlarged Cardiomediastinum", "Cardiomegaly"),
    "pleural_effusion": ("Pleural Effusion",),
    "pneumothorax": ("Pneumothorax",),
    "consolidation": ("Consolidation", "Lung Opacity", "Pneumonia"),
    "lung_lesion": ("Lung Lesion",),
    "atelectasis": ("Atelectasis", "Lung Opacity"),
    "edema": ("Edema", "Lung Opacity"),
    "support_devices": ("Support Devices",),
    "fracture": ("Fracture",),
    "hyperinflation": (),  # not a CheXpert class (radtext lists it among the "other" findings)
}


def findings_named(findings: Iterable[str], labels: Mapping[str, int]) -> dict[str, bool | None]:
    """Per drawn finding: does a report whose CheXpert ``labels`` are given (``emrrg.metrics.labeler``'s
    ``label_report``) name it, i.e. assert one of its :data:`FINDING_TO_CHEXPERT` classes? None for a
    finding with no CheXpert class (hyperinflation)."""
    out: dict[str, bool | None] = {}
    for f in findings:
        if f not in FINDING_TO_CHEXPERT:
            raise ValueError(f"unknown finding {f!r}; known: {', '.join(FINDINGS)}")
        classes = FINDING_TO_CHEXPERT[f]
        out[f] = any(labels.get(c) for c in classes) if classes else None
    return out


# The split of each of radlabels' 1,000 reports, fixed in a file that ships with the package (as
# MIMIC-CXR ships its official split list), so that a change of the policy above (which reports are
# usable, what is drawn) never moves a report to another split: the demo checkpoint was trained on
# train, chosen on val and scored on test, and stays so. The file holds the 70/10/20 split that the
# first policy's 843 usable reports got from a seed-0 permutation, and the other 157 reports
# assigned 70/10/20 by a hash of their id.
_SPLIT_FILE = Path(__file__).with_name("phantom_split.json")
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}


# ==============================================================================================
# Reports


_DROP_SECTIONS = (
    "EXAMINATION", "EXAM", "INDICATION", "INDICATIONS", "HISTORY", "CLINICAL HISTORY", "COMPARISON",
    "COMPARISONS", "TECHNIQUE", "PROCEDURE", "REASON FOR EXAM", "REASON FOR EXAMINATION", "CLINICAL INFORMATION",
    "CLINICAL INDICATION", "NOTIFICATION", "RECOMMENDATION", "RECOMMENDATIONS", "REFERENCE EXAM", "TYPE OF EXAMINATION",
    "STUDY", "DATE",
)
_HEADER_RE = re.compile(r"(?m)(?:^|(?<=[\s.]))([A-Z][A-Z&/()'\- ]*[A-Z)])\s*:(?!\d)")
_TIME_RE = re.compile(r"\s*(?:___\s*)+(?:\d{1,2}\s*:\s*\d{2}\s*(?:[AP]M)?)?", re.I)
_NUMBERING_RE = re.compile(r"(?:(?<=^)|(?<=\s))\d{1,2}\s*[.)]\s+(?=[A-Za-z_])")


def _is_dropped(header: str | None) -> bool:
    if header is None:
        return False
    h = re.sub(r"\s+", " ", header.strip().upper())
    return any(h == x or h.endswith(" " + x) for x in _DROP_SECTIONS) or h.startswith(("INDICATION", "HISTORY"))


def _sections(text: str) -> list[tuple[str | None, int, int]]:
    """(header, body start, body end) in order; the text before the first header has header None."""
    out: list[tuple[str | None, int, int]] = []
    pos, header = 0, None
    for m in _HEADER_RE.finditer(text):
        h = m.group(1).strip()
        if len(h) < 3:
            continue
        out.append((header, pos, m.start()))
        header, pos = h, m.end()
    out.append((header, pos, len(text)))
    return out


def _kept_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` that :func:`clean_report` keeps (module docstring, step 1)."""
    spans: list[tuple[int, int]] = []
    for header, b0, b1 in _sections(text):
        if header is None:
            # Preamble: "FINAL REPORT", "CHEST (PA AND LAT)": upper-case title lines carry no findings.
            for m in re.finditer(r"[^\n]+", text[b0:b1]):
                if re.search(r"[a-z]", m.group(0)):
                    spans.append((b0 + m.start(), b0 + m.end()))
        elif _is_dropped(header):
            # The header's own paragraph goes; later paragraphs without a header are findings.
            m = re.search(r"\n[ \t]*\n", text[b0:b1])
            if m:
                spans.append((b0 + m.end(), b1))
        else:
            if header.upper().startswith("WET READ"):
                m = _TIME_RE.match(text, b0)
                b0 = m.end() if m else b0
            spans.append((b0, b1))
    # Cut an unfinished last sentence (many of these reports stop mid-sentence).
    last = -1
    for s0, s1 in spans:
        # A list number ("2. No pneumothor") is no sentence end.
        for m in re.finditer(r"(?<!\b\d)(?<!\b\d\d)[.!?](?=\s|$)", text[s0:s1]):
            last = s0 + m.end()
    if last >= 0:
        spans = [(s0, min(s1, last)) for s0, s1 in spans if s0 < last]
    elif len(" ".join(text[s0:s1] for s0, s1 in spans).split()) < 4:
        spans = []
    return [(s0, s1) for s0, s1 in spans if s1 > s0]


def clean_report(text: str) -> str:
    """The reportable text of a raw MIMIC-style report (see the module docstring, step 1)."""
    out = " ".join(text[s0:s1] for s0, s1 in _kept_spans(text))
    out = _NUMBERING_RE.sub("", out)
    out = re.sub(r"\s+", " ", out).strip()
    out = re.sub(r"\s+([.,;:])", r"\1", out)
    out = re.sub(r"\.{2,}", ".", out)
    if out and out[-1] not in ".!?":
        out += "."
    return out


_KEYWORDS: dict[str, str] = {
    "cardiomegaly": r"cardiomegaly|heart|cardiac",
    "enlarged_cardiomediastinum": r"mediastin|cardiomediastinal",
    "pleural_effusion": r"effusion|pleural fluid",
    "pneumothorax": r"pneumothora",
    "consolidation": r"consolidat|opaci|infiltrat|air\s*-?\s*space|pneumonia|ground[- ]glass",
    "lung_lesion": r"nodul|\bmass|lesion",
    "atelectasis": r"atelecta|collapse",
    "edema": r"edema|congestion|interstitial",
    "fracture": r"fractur",
    "hyperinflation": r"hyperinfl|hyperexpan|emphysem|bull",
}
_SEVERITY_WORDS = (
    ("severe", r"\b(?:large|severe|extensive|massive|marked(?:ly)?|substantial|near[- ]complete|complete|dense|big|significant)\b"),
    ("moderate", r"\bmoderate(?:ly)?\b"),
    ("mild", r"\b(?:small|trace|tiny|minimal|mild(?:ly)?|minor|slight(?:ly)?|subtle)\b"),
)
_DEVICE_WORDS = (
    ("ett", r"\b(?:et|ett|endotracheal)\b"),
    ("tracheostomy", r"tracheostomy|\btrach\b"),
    ("enteric_tube", r"\b(?:ng|og|enteric|nasogastric|orogastric|feeding|dobhoff|dobbhoff)\b"),
    ("cvc", r"\b(?:picc|cvc|central (?:venous )?(?:line|catheter)|ij|subclavian|port|port-a-cath|swan|catheter)\b"),
    ("chest_drain", r"chest tube|pigtail|\bdrain\b|thoracostomy"),
    ("pacemaker", r"pacemaker|pacer|\bicd\b|defibrillator|\bleads?\b|aicd"),
)


def parse_attributes(report: str, findings: Iterable[str]) -> dict[str, dict[str, str]]:
    """Side / severity / zone / nodule-vs-mass of each finding, from the sentences that assert it.

    Sides are the patient's. Only what the text states is returned; the renderer draws the rest.
    """
    sents = [s.lower() for s in split_report_sentences(report)]
    out: dict[str, dict[str, str]] = {}
    for f in findings:
        kw = _KEYWORDS.get(f)
        if kw is None:
            continue
        rx = re.compile(kw)
        hits = []
        for s in sents:
            for m in rx.finditer(s):
                if mention_state(s, m.start(), m.end()) != NEGATIVE:
                    hits.append(s)
                    break
        if not hits:
            continue
        blob = " ".join(hits)
        attrs: dict[str, str] = {}
        right = bool(re.search(r"\bright\b", blob))
        left = bool(re.search(r"\bleft\b", blob))
        if re.search(r"\bbi(?:lateral(?:ly)?|basilar|basal|apical)\b|\bboth\b", blob) or (right and left):
            attrs["side"] = "bilateral"
        elif right:
            attrs["side"] = "right"
        elif left:
            attrs["side"] = "left"
        for sev, srx in _SEVERITY_WORDS:
            if re.search(srx, blob):
                attrs["severity"] = sev
                break
        if re.search(r"\b(?:bases?|(?:bi)?basilar|(?:bi)?basal|lower|retrocardiac|infrahilar)\b", blob):
            attrs["zone"] = "lower"
        elif re.search(r"\b(?:upper|apex|apical|apices|biapical)\b", blob):
            attrs["zone"] = "upper"
        elif re.search(r"\b(?:mid|middle|lingula\w*|perihilar|hilar)\b", blob):
            attrs["zone"] = "mid"
        if f == "lung_lesion":
            attrs["kind"] = "mass" if re.search(r"\bmass", blob) else "nodule"
        if f in ("fracture", "lung_lesion") and attrs.get("side") == "bilateral":
            attrs["side"] = "right" if blob.find("right") <= blob.find("left") else "left"
        out[f] = attrs
    return out


def _devices_from(report: str, sources: Iterable[str]) -> tuple[str, ...]:
    devs = {SOURCE_TO_DEVICE[s] for s in sources if s in SOURCE_TO_DEVICE}
    text = report.lower()
    if "support_devices_generic" in sources or not devs:
        for name, rx in _DEVICE_WORDS:
            if re.search(rx, text):
                devs.add(name)
    if not devs:
        devs.add("cvc")
    return tuple(d for d in DEVICES if d in devs)


@dataclass(frozen=True)
class PhantomCase:
    """One usable source report: its cleaned text and what to draw for it."""

    source_id: str
    report: str
    spec: PhantomSpec
    source_labels: tuple[str, ...]


def _radlabels_samples() -> Path:
    d = _package_dir("radlabels", "radlabels==0.2.0") / "samples"
    for name in ("synthetic_reports", "synthetic_labels.json", "synthetic_matches.json"):
        if not (d / name).exists():
            raise MissingAssetError(f"{d / name} is missing; reinstall: pip install --no-deps radlabels==0.2.0")
    return d


def _token_offsets(raw: str, tokens: Sequence[str]) -> list[int]:
    """Character offset in ``raw`` of each token of radlabels' space-joined tokenization (-1: not found)."""
    out, pos = [], 0
    for t in tokens:
        k = raw.find(t, pos)
        if k < 0:
            out.append(-1)
            continue
        out.append(k)
        pos = k + len(t)
    return out


def load_cases() -> tuple[list[PhantomCase], dict[str, Any]]:
    """All usable radlabels reports turned into cases, plus statistics of the policy's decisions."""
    cases, stats = _load_cases_cached()
    return list(cases), json.loads(json.dumps(stats))


@functools.lru_cache(maxsize=1)
def _load_cases_cached() -> tuple[tuple[PhantomCase, ...], dict[str, Any]]:
    d = _radlabels_samples()
    labels = json.loads((d / "synthetic_labels.json").read_text(encoding="utf-8"))
    matches = json.loads((d / "synthetic_matches.json").read_text(encoding="utf-8"))
    cases: list[PhantomCase] = []
    stats: dict[str, Any] = {"reports": 0, "usable": 0, "excluded_unrenderable": {}, "excluded_empty": 0,
                             "dropped_mentions": 0, "negated_mentions": 0}
    for rid in sorted(labels):
        stats["reports"] += 1
        raw = (d / "synthetic_reports" / f"{rid}.txt").read_text(encoding="utf-8")
        report = clean_report(raw)
        if len(report.split()) < 3:
            stats["excluded_empty"] += 1
            continue
        m = matches.get(rid, {})
        tokens = m.get("text", "").split(" ")
        offsets = _token_offsets(raw, tokens)
        spans = _kept_spans(raw)
        kept = lambda i: 0 <= i < len(offsets) and any(s0 <= offsets[i] < s1 for s0, s1 in spans)  # noqa: E731
        present: set[str] = set()
        for mt in m.get("matches", []):
            if mt.get("label") not in ("definitely present", "uncertain"):
                continue
            ix = mt.get("start_ix") or []
            if not (ix and all(kept(i) for i in ix)):
                continue
            if mention_state(raw, min(offsets[i] for i in ix), max(offsets[i] + len(tokens[i]) for i in ix)) == NEGATIVE:
                stats["negated_mentions"] += 1
                continue
            present.add(mt["disease"])
        claimed = {k for k, v in labels[rid].items() if v in ("definitely present", "uncertain")}
        stats["dropped_mentions"] += len(claimed - present)
        bad = sorted(present & EXCLUDED_SOURCE | {p for p in present if p not in SOURCE_TO_FINDING
                                                   and p not in IGNORED_SOURCE and p not in EXCLUDED_SOURCE})
        if bad:
            for b in bad:
                stats["excluded_unrenderable"][b] = stats["excluded_unrenderable"].get(b, 0) + 1
            continue
        findings = tuple(f for f in FINDINGS if any(SOURCE_TO_FINDING.get(p) == f for p in present))
        attrs = parse_attributes(report, findings)
        devices = _devices_from(report, present) if "support_devices" in findings else ()
        cases.append(PhantomCase(rid, report, PhantomSpec(findings, attrs, devices), tuple(sorted(present))))
        stats["usable"] += 1
    return tuple(cases), stats


def dataset_statistics(cases: Sequence[PhantomCase]) -> dict[str, Any]:
    """Finding and device frequencies over ``cases``."""
    freq = {f: sum(f in c.spec.findings for c in cases) for f in FINDINGS}
    dev = {d: sum(d in c.spec.devices for c in cases) for d in DEVICES}
    normal = sum(not c.spec.findings for c in cases)
    return {"cases": len(cases), "no_renderable_finding": normal, "findings": freq, "devices": dev}


@functools.lru_cache(maxsize=1)
def source_splits() -> dict[str, str]:
    """radlabels report id -> "train" / "val" / "test" (the fixed split list)."""
    table = json.loads(_SPLIT_FILE.read_text(encoding="utf-8"))
    return {rid: split for split in SPLITS for rid in table[split]}


def _split_pools(cases: Sequence[PhantomCase]) -> dict[str, list[PhantomCase]]:
    table = source_splits()
    pools: dict[str, list[PhantomCase]] = {s: [] for s in SPLITS}
    for c in cases:
        if c.source_id not in table:
            raise MissingAssetError(f"radlabels report {c.source_id!r} is not in {_SPLIT_FILE}; "
                                    "reinstall: pip install --no-deps radlabels==0.2.0")
        pools[table[c.source_id]].append(c)
    return pools


def _sample_seed(seed: int, split: str, k: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 7, _SPLIT_CODE[split], k]).generate_state(1)[0])


def _render_job(job: tuple[str, PhantomSpec, int, int, int]) -> str:
    path, spec, sseed, size, bit_depth = job
    save_png(render_phantom(spec, sseed, size), path, bit_depth)
    return path


def write_phantom_dataset(out_dir: str | Path, n_train: int | None = None, n_val: int | None = None,
                          n_test: int | None = None, seed: int = 0, size: int = 224, bit_depth: int = 8,
                          workers: int = 1) -> Path:
    """Render a phantom dataset into ``out_dir`` and return the path of its ``annotation.json``.

    Reports go to the split the fixed split list gives them (about 70/10/20, no report in two
    splits); ``seed`` picks the render seeds.
    ``n_*`` None -> one image per report of that split; a larger number cycles over the split's
    reports with fresh render seeds. Images go to ``out_dir/images/<id>.png``. ``workers`` > 1
    renders in processes; the output does not depend on it.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cases, _ = load_cases()
    pools = _split_pools(cases)
    want = {"train": n_train, "val": n_val, "test": n_test}
    splits: dict[str, list[dict[str, Any]]] = {}
    jobs: list[tuple[str, PhantomSpec, int, int, int]] = []
    for split in SPLITS:
        pool = pools[split]
        n = len(pool) if want[split] is None else int(want[split])
        if n > 0 and not pool:
            raise ValueError(f"no reports in split {split!r}")
        entries = []
        for k in range(n):
            case = pool[k % len(pool)]
            sid = f"phantom_{split}_{k:05d}"
            rel = f"images/{sid}.png"
            sseed = _sample_seed(seed, split, k)
            jobs.append((str(out / rel), case.spec, sseed, size, bit_depth))
            entries.append({
                "id": sid,
                "report": case.report,
                "image_path": [rel],
                "labels": list(case.spec.findings),
                "devices": list(case.spec.devices),
                "attributes": {f: dict(a) for f, a in case.spec.attributes.items()},
                "source_id": case.source_id,
                "source_labels": list(case.source_labels),
                "seed": sseed,
            })
        splits[split] = entries
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            list(ex.map(_render_job, jobs, chunksize=16))
    else:
        for job in jobs:
            _render_job(job)
    meta = {"generator": "emrrg.data.phantom", "seed": seed, "size": size, "bit_depth": bit_depth,
            "split_file": _SPLIT_FILE.name, "findings": list(FINDINGS)}
    (out / "phantom_meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return write_annotation(out / "annotation.json", splits)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emrrg.data.phantom -o DIR``: write a phantom dataset, print annotation.json's path."""
    p = argparse.ArgumentParser(prog="python -m emrrg.data.phantom", description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", help="output folder (images/ and annotation.json)")
    p.add_argument("--n-train", type=int, default=None, help="train images (default: one per train report)")
    p.add_argument("--n-val", type=int, default=None, help="val images (default: one per val report)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default: one per test report)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="render processes (the output does not depend on it)")
    p.add_argument("--stats", action="store_true", help="print the report policy's statistics and exit")
    a = p.parse_args(argv)
    if a.stats:
        cases, stats = load_cases()
        print(json.dumps({**stats, **dataset_statistics(cases)}, indent=1))
        return 0
    if not a.out:
        p.error("-o/--out is required")
    path = write_phantom_dataset(a.out, a.n_train, a.n_val, a.n_test, seed=a.seed, size=a.size,
                                 bit_depth=a.bit_depth, workers=a.workers)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
