"""Deterministic phantom chest radiographs paired with real-looking reports.

Every image is a frontal (PA) chest radiograph drawn from a finding set: lungs with vessel
markings and parenchymal texture, heart, mediastinum, aortic knob, hila, trachea, spine,
hemidiaphragms with a gastric bubble, posterior and anterior ribs, clavicles, humeral heads, soft
tissue, exposure gradient and noise. Patient right is image left, as on a real PA film. The
renderer builds an attenuation map and displays it linearly (as a log-processed digital
radiograph) with a soft shoulder for bone and metal. ``size`` x ``size`` grayscale, 8-bit or
16-bit PNG. numpy + Pillow only.

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
   text (uncertain -> drawn, like CheXbert's U-ones) and its own clause does not negate it or make
   it hypothetical ("No pneumothorax, although the sensitivity to detect pneumothorax is
   diminished": radlabels calls the second mention present; we do not draw it).
3. Map the counted labels with :data:`SOURCE_TO_FINDING`. Labels in :data:`IGNORED_SOURCE` are
   subtle or non-pulmonary findings we do not draw (aortic calcification, tortuous aorta, pleural
   thickening, hernia, ...): the report is kept and the image shows nothing for them. A report
   with a label in :data:`EXCLUDED_SOURCE` (conspicuous findings we cannot draw: subcutaneous
   emphysema, pneumomediastinum, pneumoperitoneum, tracheal deviation, ...) is left out.
4. A report with no renderable label becomes a "no renderable finding" (normal) image.

:func:`write_phantom_dataset` splits the usable reports 70/10/20 (train/val/test) with a
permutation fixed by the seed, so no report appears in two splits, renders one image per report by
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
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from emrrg.assets import MissingAssetError, _package_dir
from emrrg.data.annotation import SPLITS, write_annotation

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

FINDINGS: tuple[str, ...] = (
    "cardiomegaly",
    "enlarged_cardiomediastinum",
    "pleural_effusion",
    "pneumothorax",
    "consolidation",
    "lung_lesion",
    "atelectasis",
    "edema",
    "support_devices",
    "fracture",
    "hyperinflation",
)
DEVICES: tuple[str, ...] = ("ett", "tracheostomy", "enteric_tube", "cvc", "chest_drain", "pacemaker")

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


SEVERITIES = ("mild", "moderate", "severe")
SIDES = ("right", "left", "bilateral")
ZONES = ("upper", "mid", "lower")

_SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}


# ==============================================================================================
# Rendering


@dataclass(frozen=True)
class PhantomSpec:
    """What to draw: findings, per-finding attributes and device types.

    ``attributes[finding]`` may hold ``side`` (``right``/``left``/``bilateral``, patient sides),
    ``severity`` (``mild``/``moderate``/``severe``), ``zone`` (``upper``/``mid``/``lower``) and, for
    ``lung_lesion``, ``kind`` (``nodule``/``mass``). Missing ones are drawn at random from the
    finding's own stream. ``devices`` (see :data:`DEVICES`) is used when ``support_devices`` is
    drawn; empty -> a central venous catheter.
    """

    findings: tuple[str, ...] = ()
    attributes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [f for f in self.findings if f not in FINDINGS]
        if bad:
            raise ValueError(f"unknown findings {bad}; known: {FINDINGS}")
        bad = [d for d in self.devices if d not in DEVICES]
        if bad:
            raise ValueError(f"unknown devices {bad}; known: {DEVICES}")


@dataclass
class _Anatomy:
    """Geometry in normalized coordinates: x (0 left .. 1 right of the image), v (0 top .. 1 bottom)."""

    cx: float
    d_med: float           # lung medial border distance from the midline
    w_lung: float          # lung lateral border distance from the midline (plateau)
    d_apex_lat: float      # lateral border at the apex
    v_apex: float
    v_wide: float          # where the lateral border reaches w_lung
    k_apex: float
    d_apex_c: float
    dome: tuple[float, float]   # hemidiaphragm dome height (right, left)
    d_dome: float
    k_lat: float
    k_med: float
    heart_c: tuple[float, float]
    heart_ab: tuple[float, float]
    med_widen: float
    knob_r: float
    lucency: float
    carina_v: float
    rib_v0: float
    rib_dv: float
    contrast: float
    gamma: float


def _nominal_anatomy(rng: np.random.Generator) -> _Anatomy:
    j = lambda s: float(rng.normal(0.0, s))  # noqa: E731
    return _Anatomy(
        cx=0.5 + j(0.008), d_med=0.052 + j(0.003), w_lung=0.375 + j(0.008), d_apex_lat=0.19 + j(0.006),
        v_apex=0.115 + j(0.006), v_wide=0.6 + j(0.015), k_apex=3.0 + j(0.2), d_apex_c=0.17 + j(0.006),
        dome=(0.65 + j(0.01), 0.67 + j(0.01)), d_dome=0.19 + j(0.01), k_lat=3.2 + j(0.15), k_med=2.2 + j(0.1),
        heart_c=(0.04 + j(0.006), 0.625 + j(0.008)), heart_ab=(0.158 + j(0.006), 0.125 + j(0.005)),
        med_widen=0.0, knob_r=0.03 + j(0.002), lucency=0.36 + j(0.01), carina_v=0.37 + j(0.008),
        rib_v0=0.125 + j(0.004), rib_dv=0.062 + j(0.002), contrast=1.0 + j(0.03), gamma=1.0 + j(0.04),
    )


def _stream(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *key]))


def _finding_key(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _blur(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders (numpy only)."""
    if sigma_px <= 0:
        return a
    r = max(1, int(np.ceil(3 * sigma_px)))
    # Sparse layers (strokes, masks): blur only the bounding box of the content.
    rows, cols = np.flatnonzero(a.any(axis=1)), np.flatnonzero(a.any(axis=0))
    if rows.size == 0:
        return a.copy()
    r0, r1 = max(0, rows[0] - 2 * r), min(a.shape[0], rows[-1] + 2 * r + 1)
    c0, c1 = max(0, cols[0] - 2 * r), min(a.shape[1], cols[-1] + 2 * r + 1)
    if (r1 - r0) * (c1 - c0) < 0.8 * a.size and min(r1 - r0, c1 - c0) > r:
        out = np.zeros_like(a)
        out[r0:r1, c0:c1] = _blur_full(a[r0:r1, c0:c1], sigma_px, r)
        return out
    return _blur_full(a, sigma_px, r)


def _blur_full(a: np.ndarray, sigma_px: float, r: int) -> np.ndarray:
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    k /= k.sum()
    out = a
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        acc = np.zeros_like(out)
        n = out.shape[axis]
        for i, w in enumerate(k):
            acc += w * (p[i:i + n, :] if axis == 0 else p[:, i:i + n])
        out = acc
    return out


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish noise with ``cells`` features across the image (bilinear upsampling)."""
    g = rng.standard_normal((cells + 2, cells + 2))
    t = (np.arange(size) + 0.5) / size * cells + 0.5
    i0 = np.floor(t).astype(int)
    f = t - i0
    rows = g[i0, :] * (1 - f)[:, None] + g[i0 + 1, :] * f[:, None]
    out = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    return out.astype(np.float32)


def _soft_lt(a: np.ndarray, b: np.ndarray | float, size: int) -> np.ndarray:
    """Anti-aliased ``a < b`` for normalized coordinates (one pixel wide edge)."""
    return np.clip((b - a) * size + 0.5, 0.0, 1.0)


class _Canvas:
    """Pixel grid, normalized coordinates and a Pillow float layer for strokes."""

    def __init__(self, size: int):
        self.size = size
        c = ((np.arange(size, dtype=np.float64) + 0.5) / size).astype(np.float32)
        self.V, self.X = np.meshgrid(c, c, indexing="ij")

    def layer(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        img = Image.new("F", (self.size, self.size), 0.0)
        return img, ImageDraw.Draw(img)

    def px(self, pts: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
        s = self.size
        return [(float(x) * s, float(v) * s) for x, v in pts]

    def width(self, w: float) -> int:
        return max(1, int(round(w * self.size)))

    @staticmethod
    def array(img: Image.Image) -> np.ndarray:
        return np.asarray(img, dtype=np.float32)

    def window(self, x0: float, x1: float, v0: float, v1: float) -> tuple[slice, slice]:
        """Row and column slices covering the normalized box (clipped to the image)."""
        s = self.size
        c0, c1 = max(0, int(np.floor(x0 * s)) - 1), min(s, int(np.ceil(x1 * s)) + 1)
        r0, r1 = max(0, int(np.floor(v0 * s)) - 1), min(s, int(np.ceil(v1 * s)) + 1)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _lung_mask(cv: _Canvas, an: _Anatomy, side: int, *, shrink_lat: np.ndarray | float = 0.0,
               shrink_top: float = 0.0) -> np.ndarray:
    """Soft mask of one lung. ``side`` -1: patient right (image left), +1: patient left."""
    X, V, s = cv.X, cv.V, cv.size
    d = side * (X - an.cx)
    t = np.clip((V - an.v_apex) / (an.v_wide - an.v_apex), 0.0, 1.0)
    d_lat = an.d_apex_lat + (an.w_lung - an.d_apex_lat) * (1 - (1 - t) ** 2.2) - shrink_lat
    # Superior mediastinum: the medial border moves out when the mediastinum is widened.
    bump = np.clip(1 - ((V - 0.32) / 0.17) ** 2, 0.0, 1.0)
    d_med = an.d_med + an.med_widen * bump
    v_top = an.v_apex + shrink_top + an.k_apex * (d - an.d_apex_c) ** 2
    dome = an.dome[0] if side < 0 else an.dome[1]
    k = np.where(d > an.d_dome, an.k_lat, an.k_med)
    v_dia = dome + k * (d - an.d_dome) ** 2
    m = np.minimum(_soft_lt(d, d_lat, s), _soft_lt(d_med, d, s))
    m = np.minimum(m, _soft_lt(v_top, V, s))
    return np.minimum(m, _soft_lt(V, v_dia, s))


def _diaphragm_v(an: _Anatomy, side: int, d: np.ndarray | float) -> np.ndarray | float:
    dome = an.dome[0] if side < 0 else an.dome[1]
    k = np.where(np.asarray(d) > an.d_dome, an.k_lat, an.k_med)
    return dome + k * (np.asarray(d) - an.d_dome) ** 2


def _heart_mask(cv: _Canvas, an: _Anatomy) -> np.ndarray:
    """Heart silhouette: a tilted ellipse (apex down and to the patient's left) plus the right atrium."""
    hx, hv = an.cx + an.heart_c[0], an.heart_c[1]
    a, b = an.heart_ab
    th = np.deg2rad(22.0)
    dx, dv = cv.X - hx, cv.V - hv
    u = dx * np.cos(th) + dv * np.sin(th)
    w = -dx * np.sin(th) + dv * np.cos(th)
    main = np.clip((1.0 - np.sqrt((u / a) ** 2 + (w / b) ** 2)) * b * cv.size + 0.5, 0.0, 1.0)
    rx, rv = hx - 0.72 * a, hv + 0.01
    ra = np.clip((1.0 - np.sqrt(((cv.X - rx) / 0.055) ** 2 + ((cv.V - rv) / 0.08) ** 2)) * 0.055 * cv.size + 0.5, 0.0, 1.0)
    return np.maximum(main, ra)


def _disk(cv: _Canvas, x: float, v: float, r: float, edge_px: float = 1.0) -> np.ndarray:
    out = np.zeros_like(cv.X)
    pad = r + 2 * edge_px / cv.size
    rs, cs = cv.window(x - pad, x + pad, v - pad, v + pad)
    dist = np.sqrt((cv.X[rs, cs] - x) ** 2 + (cv.V[rs, cs] - v) ** 2)
    out[rs, cs] = np.clip((r - dist) * cv.size / edge_px + 0.5, 0.0, 1.0)
    return out


def _gauss(cv: _Canvas, x: float, v: float, sx: float, sv: float) -> np.ndarray:
    out = np.zeros_like(cv.X)
    rs, cs = cv.window(x - 4 * sx, x + 4 * sx, v - 4 * sv, v + 4 * sv)
    out[rs, cs] = np.exp(-0.5 * (((cv.X[rs, cs] - x) / sx) ** 2 + ((cv.V[rs, cs] - v) / sv) ** 2))
    return out


def _band(cv: _Canvas, x0: float, v0: float, x1: float, v1: float, half_w: float) -> np.ndarray:
    """Soft straight band (segment) of half-width ``half_w``."""
    out = np.zeros_like(cv.X)
    pad = half_w + 2.0 / cv.size
    rs, cs = cv.window(min(x0, x1) - pad, max(x0, x1) + pad, min(v0, v1) - pad, max(v0, v1) + pad)
    X, V = cv.X[rs, cs], cv.V[rs, cs]
    dx, dv = x1 - x0, v1 - v0
    L2 = dx * dx + dv * dv
    t = np.clip(((X - x0) * dx + (V - v0) * dv) / L2, 0.0, 1.0)
    dist = np.sqrt((X - x0 - t * dx) ** 2 + (V - v0 - t * dv) ** 2)
    out[rs, cs] = np.clip((half_w - dist) * cv.size + 0.5, 0.0, 1.0)
    return out


def _attr(spec: PhantomSpec, finding: str, key: str, rng: np.random.Generator, choices: Sequence[str],
          p: Sequence[float] | None = None) -> str:
    # Always draw, so a finding's stream does not depend on which attributes the report gave.
    drawn = str(rng.choice(list(choices), p=p))
    given = spec.attributes.get(finding, {}).get(key)
    return given if given in choices else drawn


def _sides(side: str) -> list[int]:
    return {"right": [-1], "left": [1], "bilateral": [-1, 1]}[side]


_SEV = {"mild": 0, "moderate": 1, "severe": 2}


def _vessel_tree(rng: np.random.Generator, hilum: tuple[float, float], side: int, n: int) -> list[tuple[list[tuple[float, float]], float, float]]:
    """Branching vessel polylines (normalized coords) as (points, width, intensity)."""
    out = []
    for i in range(n):
        # Angles fan from up-and-out (toward the apex) to down-and-out (toward the base).
        ang = np.deg2rad(-80 + 170 * (i + rng.uniform(0.1, 0.9)) / n)
        length = rng.uniform(0.3, 0.42)
        pts = [hilum]
        x, v = hilum
        heading = ang
        steps = 9
        for k in range(steps):
            heading += rng.normal(0.0, 0.12)
            step = length / steps
            x += side * np.cos(heading) * step
            v += np.sin(heading) * step * 1.05
            pts.append((x, v))
        out.append((pts, 2.2, 1.0))
        # One or two side branches from the middle of the trunk.
        for _ in range(int(rng.integers(1, 3))):
            j = int(rng.integers(2, steps - 2))
            bx, bv = pts[j]
            bh = heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.9)
            bl = length * rng.uniform(0.25, 0.45)
            bpts = [(bx, bv)]
            for _ in range(4):
                bh += rng.normal(0.0, 0.1)
                bx += side * np.cos(bh) * bl / 4
                bv += np.sin(bh) * bl / 4
                bpts.append((bx, bv))
            out.append((bpts, 1.4, 0.7))
    return out


def _draw_tapered(draw: ImageDraw.ImageDraw, cv: _Canvas, pts: list[tuple[float, float]], w0_px: float,
                  value: float, size_scale: float) -> None:
    p = cv.px(pts)
    n = len(p) - 1
    for k in range(n):
        frac = k / max(n, 1)
        w = max(1, int(round(w0_px * size_scale * (1.0 - 0.65 * frac))))
        draw.line([p[k], p[k + 1]], fill=float(value * (1.0 - 0.4 * frac)), width=w)


def _curve(p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float], n: int = 24) -> list[tuple[float, float]]:
    """Quadratic Bezier from p0 to p2 through control p1."""
    t = np.linspace(0.0, 1.0, n)
    x = (1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t ** 2 * p2[0]
    v = (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t ** 2 * p2[1]
    return list(zip(x.tolist(), v.tolist()))


# Display of the attenuation map T: x = slope * T + offset, soft shoulder above the knee.
_DISPLAY_SLOPE, _DISPLAY_OFFSET, _KNEE = 0.67, 0.13, 0.8


def _rib_pattern(cv: _Canvas, an: _Anatomy, side: int, fracture: tuple[int, float] | None) -> np.ndarray:
    """Posterior and anterior ribs of one hemithorax (attenuation units), vectorized over ribs."""
    size = cv.size
    out = np.zeros_like(cv.X)
    lo, hi = (an.cx - 0.47, an.cx - 0.03) if side < 0 else (an.cx + 0.03, an.cx + 0.47)
    rs, cs = cv.window(lo, hi, an.v_apex - 0.06, 1.0)
    X, V = cv.X[rs, cs], cv.V[rs, cs]
    d = side * (X - an.cx)
    # Posterior ribs rise from the spine, then arch laterally and fall.
    shape = -0.03 * np.sin(0.5 * np.pi * np.clip(d / 0.12, 0, 1)) + 1.7 * np.clip(d - 0.12, 0, None) ** 2
    u = V - shape - an.rib_v0
    q = u / an.rib_dv
    ri = np.rint(q)
    dist = np.abs(q - ri) * an.rib_dv
    gap = np.ones_like(q)
    if fracture is not None:
        i, db = fracture
        lateral = (ri == i) & (d > db)
        dist = np.where(lateral, np.abs(q - 0.11 - i) * an.rib_dv, dist)   # step-off: lateral fragment lower
        gap = np.where(np.abs(ri - i) < 0.5, np.clip(np.abs(d - db) * size / 1.3 - 0.5, 0, 1), 1.0)
    half = 0.0105 + 0.0006 * np.clip(ri, 0, 10)
    band = np.clip((half - dist) * size / 2.5 + 0.5, 0, 1)
    cortex = np.clip(1 - np.abs(dist - 0.75 * half) * size / 2.2, 0, 1)
    valid = (ri >= 0) & (ri <= 10) & (d > 0.035)
    post = (0.085 * band + 0.035 * cortex) * valid * gap
    # Anterior ribs: faint, falling toward the sternum.
    shape_a = 0.35 * (0.42 - np.clip(d, 0.06, 0.42)) ** 1.6
    qa = (V - shape_a - an.rib_v0 - 0.14) / (an.rib_dv * 1.05)
    ra = np.rint(qa)
    band_a = np.clip((0.008 - np.abs(qa - ra) * an.rib_dv * 1.05) * size + 0.5, 0, 1)
    ant = 0.04 * band_a * (ra >= 0) * (ra <= 5) * (d > 0.08)
    # Only inside the bony thorax.
    v_dia = _diaphragm_v(an, side, d)
    env = _soft_lt(d, an.w_lung + 0.055, size) * _soft_lt(an.v_apex - 0.05, V, size) * np.clip((v_dia + 0.07 - V) * size / 4, 0, 1)
    out[rs, cs] = (post + ant) * env
    return out


# ---- Findings: one registered draw function each -------------------------------------------------------
# A finding changes the picture in one of two stages, or both: GEOMETRY functions move the anatomy before it
# is drawn (a larger heart, a raised hemidiaphragm, a broken rib); OPACITY functions add to the overlay of
# attenuation after it (fluid, air, opacities, lines). Each reads and writes the _Scene and draws from its
# finding's own stream. They run in the order they are registered in, which is part of the output (the
# overlay is a float sum): do not reorder them. Devices are drawn by the DEVICE functions, one per type.


@dataclass
class _Scene:
    """The render's state that the finding draw functions read and change."""

    spec: PhantomSpec
    size: int
    cv: _Canvas
    an: _Anatomy
    info: dict[str, Any]
    fracture_at: tuple[int, int, float] | None = None  # (side, rib, d), from the fracture geometry
    # Set once the base anatomy is drawn (the OPACITY stage):
    lungs: dict[int, np.ndarray] = field(default_factory=dict)
    lung: np.ndarray | None = None
    heart: np.ndarray | None = None
    air: np.ndarray | None = None
    overlay: np.ndarray | None = None
    marking_mask: np.ndarray | None = None    # where vessel markings and texture show (air and fluid remove them)

    @property
    def scale(self) -> float:
        return self.size / 224.0


_GEOMETRY: dict[str, Any] = {}
_OPACITY: dict[str, Any] = {}
_DEVICE_DRAW: dict[str, Any] = {}


def _registered(table: dict[str, Any], name: str):
    def register(fn):
        if name in table:
            raise ValueError(f"{name} is registered twice")
        table[name] = fn
        return fn
    return register


@_registered(_GEOMETRY, "hyperinflation")
def _hyperinflation_geometry(s: _Scene, r: np.random.Generator) -> None:
    an = s.an
    sev = _SEV[_attr(s.spec, "hyperinflation", "severity", r, SEVERITIES, [0.4, 0.4, 0.2])]
    drop = 0.05 + 0.02 * sev
    an.dome = (an.dome[0] + drop, an.dome[1] + drop)
    an.k_lat *= 0.55
    an.k_med *= 0.5
    an.lucency *= 1.1 + 0.04 * sev
    an.heart_ab = (an.heart_ab[0] * 0.86, an.heart_ab[1] * 1.02)
    an.heart_c = (an.heart_c[0] - 0.01, an.heart_c[1] + 0.035)
    an.w_lung += 0.008
    s.info["hyperinflation"] = {"severity": SEVERITIES[sev]}


@_registered(_GEOMETRY, "cardiomegaly")
def _cardiomegaly_geometry(s: _Scene, r: np.random.Generator) -> None:
    an = s.an
    sev = _SEV[_attr(s.spec, "cardiomegaly", "severity", r, SEVERITIES, [0.45, 0.35, 0.2])]
    fa = (1.3, 1.42, 1.55)[sev] + float(r.uniform(-0.03, 0.03))
    an.heart_ab = (an.heart_ab[0] * fa, an.heart_ab[1] * (1.08 + 0.04 * sev))
    an.heart_c = (an.heart_c[0] + 0.015 + 0.008 * sev, an.heart_c[1] + 0.012)
    s.info["cardiomegaly"] = {"severity": SEVERITIES[sev], "scale": fa}


@_registered(_GEOMETRY, "enlarged_cardiomediastinum")
def _enlarged_cardiomediastinum_geometry(s: _Scene, r: np.random.Generator) -> None:
    an = s.an
    sev = _SEV[_attr(s.spec, "enlarged_cardiomediastinum", "severity", r, SEVERITIES, [0.4, 0.4, 0.2])]
    an.med_widen = 0.03 + 0.012 * sev + float(r.uniform(0, 0.005))
    an.knob_r *= 1.25
    s.info["enlarged_cardiomediastinum"] = {"severity": SEVERITIES[sev], "widen": an.med_widen}


@_registered(_GEOMETRY, "atelectasis")
def _atelectasis_geometry(s: _Scene, r: np.random.Generator) -> None:
    """Volume loss: the hemidiaphragm rises, the mediastinum shifts toward the collapse."""
    an = s.an
    side = _attr(s.spec, "atelectasis", "side", r, SIDES, [0.35, 0.35, 0.3])
    sev = _SEV[_attr(s.spec, "atelectasis", "severity", r, SEVERITIES, [0.5, 0.35, 0.15])]
    zone = _attr(s.spec, "atelectasis", "zone", r, ZONES, [0.15, 0.15, 0.7])
    lift = 0.02 + 0.015 * sev
    dome = list(an.dome)
    for sd in _sides(side):
        dome[0 if sd < 0 else 1] -= lift
    an.dome = (dome[0], dome[1])
    if side != "bilateral":
        an.cx += (0.006 + 0.006 * sev) * (-1 if side == "right" else 1)
    s.info["atelectasis"] = {"side": side, "severity": SEVERITIES[sev], "zone": zone, "lift": lift}


@_registered(_GEOMETRY, "fracture")
def _fracture_geometry(s: _Scene, r: np.random.Generator) -> None:
    side = _attr(s.spec, "fracture", "side", r, ("right", "left"))
    s.fracture_at = (-1 if side == "right" else 1, int(r.integers(3, 7)), float(r.uniform(0.24, 0.33)))
    s.info["fracture"] = {"side": side, "rib": s.fracture_at[1], "d": s.fracture_at[2]}


@_registered(_OPACITY, "pneumothorax")
def _pneumothorax_opacity(s: _Scene, r: np.random.Generator) -> None:
    """Pleural air: the lung edge pulls away from the chest wall; no markings beyond it."""
    cv, an, V, size, scale = s.cv, s.an, s.cv.V, s.size, s.scale
    side = _attr(s.spec, "pneumothorax", "side", r, SIDES, [0.45, 0.45, 0.1])
    sev = _SEV[_attr(s.spec, "pneumothorax", "severity", r, SEVERITIES, [0.5, 0.35, 0.15])]
    gap = (0.04, 0.075, 0.13)[sev] + float(r.uniform(0, 0.01))
    reach = (0.3, 0.5, 0.85)[sev]
    zone = np.zeros(s.overlay.shape, dtype=bool)
    for sd in _sides(side):
        taper = np.clip(1 - (V - an.v_apex) / reach, 0.0, 1.0) ** 0.6
        inner = _lung_mask(cv, an, sd, shrink_lat=gap * taper, shrink_top=gap * 0.9)
        ptx = np.clip(s.lungs[sd] - inner, 0, 1)
        zone |= ptx > 0.5
        s.marking_mask = np.clip(s.marking_mask - ptx, 0, 1)
        s.overlay -= 0.06 * ptx
        edge = 4 * _blur(ptx, 0.8 * scale) * _blur(inner, 0.8 * scale)
        s.overlay += 0.2 * np.clip(edge, 0, 1) * s.lungs[sd]
    s.info["pneumothorax"] = {"side": side, "severity": SEVERITIES[sev], "gap": gap, "zone": zone}


@_registered(_OPACITY, "pleural_effusion")
def _pleural_effusion_opacity(s: _Scene, r: np.random.Generator) -> None:
    """Dependent fluid with a meniscus that climbs the lateral chest wall."""
    an, X, V, size, scale, cx = s.an, s.cv.X, s.cv.V, s.size, s.scale, s.an.cx
    side = _attr(s.spec, "pleural_effusion", "side", r, SIDES, [0.35, 0.3, 0.35])
    sev = _SEV[_attr(s.spec, "pleural_effusion", "severity", r, SEVERITIES, [0.5, 0.35, 0.15])]
    height = (0.075, 0.16, 0.3)[sev] + float(r.uniform(0, 0.02))
    for sd in _sides(side):
        d = sd * (X - cx)
        v_cp = float(_diaphragm_v(an, sd, an.w_lung))
        lat = np.clip((d - an.d_med) / (an.w_lung - an.d_med), 0, 1)
        top = v_cp - height - 0.07 * lat ** 2          # meniscus: climbs the lateral chest wall
        fluid = _blur(_soft_lt(top, V, size), 1.5 * scale) * s.lungs[sd]
        depth = np.clip((V - top) / 0.12, 0, 1)
        s.overlay += fluid * s.air * (1 - 0.82 * s.heart) * (0.85 + 0.15 * depth)
        s.marking_mask = np.clip(s.marking_mask - fluid, 0, 1)
    s.info["pleural_effusion"] = {"side": side, "severity": SEVERITIES[sev], "height": height}


@_registered(_OPACITY, "consolidation")
def _consolidation_opacity(s: _Scene, r: np.random.Generator) -> None:
    """Patchy airspace opacity with air bronchograms."""
    cv, size, scale, cx = s.cv, s.size, s.scale, s.an.cx
    side = _attr(s.spec, "consolidation", "side", r, SIDES, [0.35, 0.35, 0.3])
    sev = _SEV[_attr(s.spec, "consolidation", "severity", r, SEVERITIES, [0.4, 0.4, 0.2])]
    zone = _attr(s.spec, "consolidation", "zone", r, ZONES, [0.2, 0.2, 0.6])
    patch_all = np.zeros_like(s.overlay)
    centers = []
    for sd in _sides(side):
        zv = {"upper": 0.28, "mid": 0.44, "lower": 0.56}[zone] + float(r.uniform(-0.02, 0.02))
        zd = float(r.uniform(0.17, 0.25))
        g = np.zeros_like(s.overlay)
        for _ in range(4 + 2 * sev):
            gx = cx + sd * (zd + float(r.normal(0, 0.04)))
            gy = zv + float(r.normal(0, 0.035))
            s_ = (0.035 + 0.015 * sev) * float(r.uniform(0.8, 1.25))
            g += _gauss(cv, gx, gy, s_, s_ * 0.9)
        mod = 0.65 + 0.35 * _smooth_noise(r, size, max(6, int(18 * scale)))
        patch = np.clip((g * mod - 0.35) * 1.6, 0, 1) * s.lungs[sd]
        # Air bronchograms: dark branching lines inside the opacity.
        blayer, bdraw = cv.layer()
        for _ in range(3):
            bx, bv = cx + sd * (zd - 0.06), zv + float(r.uniform(-0.03, 0.03))
            pts = [(bx, bv)]
            h = float(r.uniform(-0.4, 0.4))
            for _ in range(5):
                h += float(r.normal(0, 0.15))
                bx += sd * np.cos(h) * 0.022
                bv += np.sin(h) * 0.022
                pts.append((bx, bv))
            bdraw.line(cv.px(pts), fill=1.0, width=max(1, int(round(1.2 * scale))))
        bronch = _blur(cv.array(blayer), 0.6 * scale)
        patch_all += patch * (1 - 0.5 * bronch)
        centers.append((cx + sd * zd, zv))
    s.overlay += (0.3 + 0.06 * sev) * np.clip(patch_all, 0, 1.2)
    s.info["consolidation"] = {"side": side, "severity": SEVERITIES[sev], "zone": zone, "centers": centers}


@_registered(_OPACITY, "lung_lesion")
def _lung_lesion_opacity(s: _Scene, r: np.random.Generator) -> None:
    """A round nodule, or a larger lobulated mass."""
    X, V, size, cx = s.cv.X, s.cv.V, s.size, s.an.cx
    side = _attr(s.spec, "lung_lesion", "side", r, ("right", "left"))
    zone = _attr(s.spec, "lung_lesion", "zone", r, ZONES, [0.35, 0.35, 0.3])
    kind = _attr(s.spec, "lung_lesion", "kind", r, ("nodule", "mass"), [0.75, 0.25])
    sd = -1 if side == "right" else 1
    lv = {"upper": 0.26, "mid": 0.4, "lower": 0.53}[zone] + float(r.uniform(-0.03, 0.03))
    ld = float(r.uniform(0.18, 0.27))
    rad = float(r.uniform(0.015, 0.022)) if kind == "nodule" else float(r.uniform(0.035, 0.055))
    phase = float(r.uniform(0, 2 * np.pi))
    lx = cx + sd * ld
    ang = np.arctan2(V - lv, X - lx)
    wob = 1.0 + (0.12 * np.sin(3 * ang + phase) if kind == "mass" else 0.0)
    dist = np.sqrt((X - lx) ** 2 + (V - lv) ** 2)
    lesion = np.clip((rad * wob - dist) * size / 1.2 + 0.5, 0, 1)
    s.overlay += 0.42 * lesion * np.sqrt(np.clip(1 - (dist / (rad * wob * 1.05)) ** 2, 0, 1))
    s.info["lung_lesion"] = {"side": side, "zone": zone, "kind": kind, "center": (lx, lv), "radius": rad}


@_registered(_OPACITY, "atelectasis")
def _atelectasis_opacity(s: _Scene, r: np.random.Generator) -> None:
    """Plate-like lines (and a lobar wedge when severe); the stream goes on from the geometry stage."""
    cv, an, scale, cx = s.cv, s.an, s.scale, s.an.cx
    atel = s.info["atelectasis"]
    sev = _SEV[atel["severity"]]
    for sd in _sides(atel["side"]):
        dome = an.dome[0] if sd < 0 else an.dome[1]
        if sev == 2:
            # Lobar collapse: a dense wedge from the hilum to the base.
            tl, td = cv.layer()
            td.polygon(cv.px([(cx + sd * 0.08, 0.46), (cx + sd * 0.3, dome - 0.005), (cx + sd * 0.1, dome + 0.01)]), fill=1.0)
            s.overlay += 0.4 * _blur(cv.array(tl), 1.5 * scale) * s.lungs[sd]
        zv = {"upper": 0.3, "mid": 0.45, "lower": dome - 0.06}[atel["zone"]]
        llayer, ldraw = cv.layer()
        for k in range(1 + (sev >= 1)):
            v0 = zv - 0.035 * k + float(r.uniform(-0.01, 0.01))
            x0, x1 = cx + sd * float(r.uniform(0.09, 0.13)), cx + sd * float(r.uniform(0.26, 0.32))
            pts = _curve((x0, v0 + 0.012), ((x0 + x1) / 2, v0 + float(r.uniform(-0.012, 0.004))), (x1, v0 - 0.006), 12)
            ldraw.line(cv.px(pts), fill=1.0, width=max(1, int(round((1.6 + 0.6 * sev) * scale))))
        s.overlay += 0.3 * _blur(cv.array(llayer), 0.9 * scale) * s.lungs[sd]


@_registered(_OPACITY, "edema")
def _edema_opacity(s: _Scene, r: np.random.Generator) -> None:
    """Perihilar haze and Kerley B lines (the base anatomy also blurs and strengthens the vessels)."""
    cv, an, scale, cx = s.cv, s.an, s.scale, s.an.cx
    sev = _SEV[_attr(s.spec, "edema", "severity", r, SEVERITIES, [0.45, 0.35, 0.2])]
    haze = np.zeros_like(s.overlay)
    klayer, kdraw = cv.layer()
    for sd in (-1, 1):
        haze += _gauss(cv, cx + sd * 0.13, 0.47, 0.11, 0.13) * s.lungs[sd]
        # Kerley B lines: short horizontal lines at the lateral lung bases.
        for _ in range(5 + 2 * sev):
            kv = float(r.uniform(0.5, float(_diaphragm_v(an, sd, an.w_lung)) - 0.03))
            kx1 = cx + sd * (an.w_lung - 0.004)
            kx0 = kx1 - sd * float(r.uniform(0.025, 0.04))
            kdraw.line(cv.px([(kx0, kv), (kx1, kv)]), fill=1.0, width=max(1, int(round(scale))))
    s.overlay += 0.16 * _blur(cv.array(klayer), 0.5 * scale) * s.lung
    s.overlay += (0.22 + 0.08 * sev) * haze
    s.info["edema"] = {"severity": SEVERITIES[sev]}


@_registered(_DEVICE_DRAW, "ett")
def _draw_ett(s: _Scene, ddraw: ImageDraw.ImageDraw, sub: np.random.Generator) -> None:
    cv, cx = s.cv, s.an.cx
    tip = s.an.carina_v - float(sub.uniform(0.03, 0.07))
    ddraw.line(cv.px([(cx - 0.004, 0.0), (cx - 0.004, tip)]), fill=0.7, width=cv.width(0.011))
    ddraw.line(cv.px([(cx - 0.004, 0.0), (cx - 0.004, tip)]), fill=0.9, width=max(1, cv.width(0.004)))


@_registered(_DEVICE_DRAW, "tracheostomy")
def _draw_tracheostomy(s: _Scene, ddraw: ImageDraw.ImageDraw, sub: np.random.Generator) -> None:
    cv, cx = s.cv, s.an.cx
    tip = s.an.carina_v - float(sub.uniform(0.07, 0.1))
    ddraw.line(cv.px([(cx - 0.004, 0.1), (cx - 0.004, tip)]), fill=0.9, width=cv.width(0.014))
    ddraw.line(cv.px([(cx - 0.06, 0.1), (cx + 0.055, 0.1)]), fill=1.0, width=cv.width(0.01))


@_registered(_DEVICE_DRAW, "enteric_tube")
def _draw_enteric_tube(s: _Scene, ddraw: ImageDraw.ImageDraw, sub: np.random.Generator) -> None:
    cv, cx = s.cv, s.an.cx
    gx = cx + 0.16 + float(sub.uniform(-0.02, 0.02))
    gy = float(_diaphragm_v(s.an, 1, 0.16)) + float(sub.uniform(0.05, 0.09))
    pts = [(cx + 0.008, 0.0), (cx + 0.012, 0.5)] + _curve((cx + 0.012, 0.5), (cx + 0.03, gy), (gx, gy))
    ddraw.line(cv.px(pts), fill=1.1, width=max(1, cv.width(0.006)))


@_registered(_DEVICE_DRAW, "cvc")
def _draw_cvc(s: _Scene, ddraw: ImageDraw.ImageDraw, sub: np.random.Generator) -> None:
    cv, cx = s.cv, s.an.cx
    sd = -1 if sub.uniform() < 0.7 else 1
    tip = (cx - 0.03, 0.44 + float(sub.uniform(-0.02, 0.03)))
    pts = _curve((cx + sd * 0.27, 0.11), (cx + sd * 0.06, 0.13), (cx - 0.03, 0.25)) + [tip]
    ddraw.line(cv.px(pts), fill=1.1, width=max(1, cv.width(0.006)))


@_registered(_DEVICE_DRAW, "chest_drain")
def _draw_chest_drain(s: _Scene, ddraw: ImageDraw.ImageDraw, sub: np.random.Generator) -> None:
    cv, an, cx = s.cv, s.an, s.an.cx
    sd = -1 if sub.uniform() < 0.6 else 1
    pts = _curve((cx + sd * (an.w_lung + 0.07), 0.62), (cx + sd * (an.w_lung - 0.02), 0.55),
                 (cx + sd * 0.2, 0.2 + float(sub.uniform(0, 0.05))))
    ddraw.line(cv.px(pts), fill=1.0, width=cv.width(0.013))
    ddraw.line(cv.px(pts), fill=0.55, width=max(1, cv.width(0.004)))


@_registered(_DEVICE_DRAW, "pacemaker")
def _draw_pacemaker(s: _Scene, ddraw: ImageDraw.ImageDraw, sub: np.random.Generator) -> None:
    cv, cx, size = s.cv, s.an.cx, s.size
    gx, gy = cx + 0.3, 0.17 + float(sub.uniform(-0.015, 0.015))
    box = [(gx - 0.04) * size, (gy - 0.028) * size, (gx + 0.04) * size, (gy + 0.028) * size]
    ddraw.rounded_rectangle(box, radius=max(1, int(0.012 * size)), fill=3.0)
    for k, target in enumerate([(cx - 0.01, 0.55), (cx + 0.06, 0.66)]):
        pts = _curve((gx - 0.03, gy + 0.01), (cx + 0.02 + 0.03 * k, 0.2), target)
        ddraw.line(cv.px(pts), fill=1.3, width=max(1, cv.width(0.006)))


def _render(spec: PhantomSpec, seed: int, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    cv = _Canvas(size)
    X, V = cv.X, cv.V
    scale = size / 224.0
    rng = _stream(seed, 0)                 # anatomy, vessels and noise: the same for any finding set
    an = _nominal_anatomy(rng)
    has = set(spec.findings)
    s = _Scene(spec, size, cv, an, {})
    frng = {f: _stream(seed, 1, _finding_key(f)) for f in FINDINGS}

    # Anatomy-stream draws first, in a fixed order, so findings never shift them.
    vessel_trees = {sd: _vessel_tree(rng, (sd * 0.085, 0.45), sd, 13) for sd in (-1, 1)}
    texture = _smooth_noise(rng, size, max(8, int(40 * scale))) + 0.8 * _smooth_noise(rng, size, max(16, int(75 * scale)))
    lowfreq = _smooth_noise(rng, size, 4)
    fine_noise = rng.standard_normal((size, size), dtype=np.float32)

    # ---- Finding-driven geometry (each finding draws from its own stream) -------------------
    for name, move in _GEOMETRY.items():
        if name in has:
            move(s, frng[name])

    # ---- Base anatomy, as attenuation T -------------------------------------------------------
    cx = an.cx
    lungs = {sd: _lung_mask(cv, an, sd) for sd in (-1, 1)}
    lung = np.clip(lungs[-1] + lungs[1], 0, 1)
    heart = _heart_mask(cv, an)
    dabs = np.abs(X - cx)

    # Body: soft tissue fills the frame except the corners above the shoulders; thicker centrally
    # and in the abdomen.
    shoulder_v = 0.02 + 0.6 * np.clip(dabs - 0.1, 0, None) ** 2
    body = _soft_lt(shoulder_v, V, size) * _soft_lt(dabs, 0.49, size)
    T = body * (0.78 + 0.16 * (1 - np.clip(dabs / 0.48, 0, 1) ** 2))
    v_dia_map = np.where(X < cx, _diaphragm_v(an, -1, cx - X), _diaphragm_v(an, 1, X - cx))
    T += 0.12 * body * np.clip((V - v_dia_map) * size / 3, 0, 1)

    # Spine with vertebral bodies; clavicles; humeral heads.
    spine = np.clip((0.036 - dabs) * size / 3 + 0.5, 0, 1)
    vert = 0.5 + 0.5 * np.cos(2 * np.pi * (V - an.rib_v0) / (an.rib_dv * 0.72))
    T += spine * (0.09 + 0.05 * vert) * body
    for sd in (-1, 1):
        T += 0.3 * _disk(cv, cx + sd * 0.48, 0.15, 0.065, 2.0) * body
        T += 0.2 * _band(cv, cx + sd * 0.04, 0.175, cx + sd * 0.17, 0.135, 0.014)
        T += 0.2 * _band(cv, cx + sd * 0.17, 0.135, cx + sd * 0.33, 0.1, 0.012)

    # Lungs: air, more lucent at the periphery; the heart displaces the medial lower lungs.
    periph = np.clip(dabs / 0.38, 0, 1)
    air = an.lucency * 1.75 * lung * (0.85 + 0.15 * periph)
    T -= air * (1 - 0.82 * heart)
    T += 0.06 * heart

    # Aortic knob, hila, trachea, bronchi, gastric bubble.
    T += 0.35 * _disk(cv, cx + 0.062 + an.med_widen * 0.5, 0.35, an.knob_r, 1.5) * lung
    for sd in (-1, 1):
        T += 0.16 * _gauss(cv, cx + sd * 0.095, 0.45, 0.03, 0.045) * lung
    T -= 0.22 * _band(cv, cx - 0.004, 0.0, cx - 0.004, an.carina_v, 0.016)
    for sd in (-1, 1):
        T -= 0.12 * _band(cv, cx - 0.004, an.carina_v, cx + sd * 0.075, an.carina_v + 0.07, 0.01)
    gv = float(_diaphragm_v(an, 1, 0.17)) + 0.045
    T -= 0.35 * np.clip(_gauss(cv, cx + 0.17, gv, 0.045, 0.022) * 1.6 - 0.3, 0, 1) * (V > gv - 0.02)

    for sd in (-1, 1):
        frac = (s.fracture_at[1], s.fracture_at[2]) if s.fracture_at is not None and s.fracture_at[0] == sd else None
        T += _rib_pattern(cv, an, sd, frac) * body

    # Vessel markings (what a pneumothorax removes) and fine parenchymal texture.
    vlayer, vdraw = cv.layer()
    for sd in (-1, 1):
        for pts, w, val in vessel_trees[sd]:
            _draw_tapered(vdraw, cv, [(cx + x, v) for x, v in pts], w, val, scale)
    vessels = _blur(cv.array(vlayer), 0.7 * scale + (1.3 * scale if "edema" in has else 0.0))
    vessel_gain = 0.16 * (1.0 + 0.5 * np.clip((0.42 - V) / 0.3, 0, 1) * ("edema" in has))
    marking_mask = lung * (1.0 - 0.75 * heart)

    # ---- Pleural and parenchymal findings, on one overlay -------------------------------------
    s.lungs, s.lung, s.heart, s.air = lungs, lung, heart, air
    s.overlay, s.marking_mask = np.zeros_like(T), marking_mask
    for name, draw in _OPACITY.items():
        if name in has:
            draw(s, frng[name])

    T += s.overlay
    T += vessel_gain * vessels * s.marking_mask
    T += 0.07 * texture * s.marking_mask

    # ---- Devices ------------------------------------------------------------------------------
    if "support_devices" in has:
        devs = list(spec.devices) or ["cvc"]
        dlayer, ddraw = cv.layer()
        placed = []
        for dev in DEVICES:  # fixed order, one stream per device type
            if dev not in devs:
                continue
            sub = _stream(seed, 2, _finding_key(dev))
            placed.append(dev)
            _DEVICE_DRAW[dev](s, ddraw, sub)
        T += _blur(cv.array(dlayer), 0.45 * scale)
        s.info["support_devices"] = {"devices": placed}

    # ---- Acquisition: blur, exposure gradient, log-compression, contrast, quantum noise -------
    T = _blur(T, 0.5 * scale) * (1.0 + 0.04 * lowfreq) - 0.2 * (1.0 - body)
    # Linear in attenuation (as a log-processed digital radiograph) with a soft shoulder for bone
    # and metal, so a texture's contrast does not depend on the density it sits on.
    x = (_DISPLAY_SLOPE * T + _DISPLAY_OFFSET - 0.5) * an.contrast + 0.5
    img = np.where(x < _KNEE, x, _KNEE + (1.0 - _KNEE) * np.tanh((x - _KNEE) / (1.0 - _KNEE)))
    img = np.clip(img, 0.0, 1.0) ** an.gamma
    img = img + 0.006 * fine_noise
    s.info["anatomy"] = an
    return np.clip(img, 0.0, 1.0).astype(np.float32), s.info


def render_phantom(findings: Iterable[str] | PhantomSpec = (), seed: int = 0, size: int = 224, *,
                   attributes: Mapping[str, Mapping[str, str]] | None = None, devices: Sequence[str] = (),
                   return_info: bool = False) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """Render one phantom radiograph as float32 in [0, 1], shape (size, size).

    The anatomy, vessel tree and noise depend on ``seed`` only; every finding draws from a stream
    of its own, so ``render_phantom([], s)`` and ``render_phantom(["cardiomegaly"], s)`` differ in
    the heart only. ``return_info`` adds what was placed where (sides, centers, sizes).
    """
    spec = findings if isinstance(findings, PhantomSpec) else PhantomSpec(
        tuple(findings), dict(attributes or {}), tuple(devices))
    if size < 64:
        raise ValueError("size must be >= 64")
    img, info = _render(spec, seed, size)
    return (img, info) if return_info else img


def phantom_regions(seed: int = 0, size: int = 224) -> dict[str, np.ndarray]:
    """Boolean masks of the nominal (finding-free) anatomy of ``seed``, for checks and tests.

    Keys: ``right_lung``, ``left_lung``, ``heart``, ``heart_band`` (the horizontal band through
    the heart, both lungs' medial halves included), ``right_apex``/``left_apex``,
    ``right_apical_rim``/``left_apical_rim`` (the outer apical band a small pneumothorax fills),
    ``right_costophrenic``/``left_costophrenic`` (lower lateral lung corners),
    ``right_lower``/``left_lower`` (lower lung zones), ``right_perihilar``/``left_perihilar``,
    ``upper_mediastinum``, ``trachea``. Sides are the patient's (right = image left).
    """
    cv = _Canvas(size)
    an = _nominal_anatomy(_stream(seed, 0))
    X, V = cv.X, cv.V
    out: dict[str, np.ndarray] = {}
    for name, sd in (("right", -1), ("left", 1)):
        lung = _lung_mask(cv, an, sd) > 0.5
        d = sd * (X - an.cx)
        v_cp = float(_diaphragm_v(an, sd, an.w_lung))
        out[f"{name}_lung"] = lung
        out[f"{name}_apex"] = lung & (V < an.v_apex + 0.11) & (d > 0.1)
        # The outer apical rim, 2 px in from the chest wall: where even a small pneumothorax lies.
        rim_outer = _lung_mask(cv, an, sd, shrink_lat=2.0 / size, shrink_top=2.0 / size) > 0.5
        rim_inner = _lung_mask(cv, an, sd, shrink_lat=0.022, shrink_top=0.022) > 0.5
        out[f"{name}_apical_rim"] = rim_outer & ~rim_inner & (V < an.v_apex + 0.1)
        out[f"{name}_costophrenic"] = lung & (V > v_cp - 0.16) & (d > an.w_lung - 0.13)
        out[f"{name}_lower"] = lung & (V > 0.5) & (d > 0.12)
        out[f"{name}_perihilar"] = lung & (np.abs(V - 0.47) < 0.09) & (d > 0.07) & (d < 0.24)
    out["heart"] = _heart_mask(cv, an) > 0.5
    hv = an.heart_c[1]
    out["heart_band"] = (np.abs(V - (hv - 0.03)) < 0.06) & (np.abs(X - an.cx) < an.w_lung)
    out["upper_mediastinum"] = (V > 0.18) & (V < 0.45) & (np.abs(X - an.cx) < 0.11)
    out["trachea"] = (V > 0.05) & (V < an.carina_v - 0.02) & (np.abs(X - an.cx + 0.004) < 0.012)
    return out


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (round half to even, deterministic)."""
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_uint16(img: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint16 over the full 16-bit range."""
    return np.rint(np.clip(img, 0.0, 1.0) * 65535.0).astype(np.uint16)


def save_png(img: np.ndarray, path: str | Path, bit_depth: int = 8) -> Path:
    """Save a [0, 1] image as an 8-bit (``L``) or 16-bit (``I;16``) grayscale PNG, no metadata."""
    path = Path(path)
    if bit_depth == 8:
        pil = Image.fromarray(to_uint8(img))
    elif bit_depth == 16:
        pil = Image.fromarray(to_uint16(img))
    else:
        raise ValueError("bit_depth must be 8 or 16")
    pil.save(path, format="PNG", compress_level=6)
    return path


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


_NEG_BEFORE = re.compile(r"\b(?:no|not|without|negative for|free of|resolved|resolution of|removed)\b[^.;]*$")
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


def _split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.lower()) if s.strip()]


def parse_attributes(report: str, findings: Iterable[str]) -> dict[str, dict[str, str]]:
    """Side / severity / zone / nodule-vs-mass of each finding, from the sentences that assert it.

    Sides are the patient's. Only what the text states is returned; the renderer draws the rest.
    """
    sents = _split_sentences(report)
    out: dict[str, dict[str, str]] = {}
    for f in findings:
        kw = _KEYWORDS.get(f)
        if kw is None:
            continue
        rx = re.compile(kw)
        hits = []
        for s in sents:
            for m in rx.finditer(s):
                if not _NEG_BEFORE.search(s[:m.start()]):
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


# Second look at radlabels' positive mentions: a mention is not drawn when its clause (from the
# sentence start, ";" or "but/however/although") puts a negation or hypothetical cue before it,
# e.g. "No pneumothorax, although the sensitivity to detect pneumothorax is diminished".
_CLAUSE_START = re.compile(r"(?:[.!?;:](?=\s)|\n\s*\n|\b(?:but|however|although|though|whereas)\b)", re.I)
_CLAUSE_NEG = re.compile(
    r"\b(?:no|not|without|negative\s+for|free\s+of|resolved|resolution\s+of|removed|removal\s+of|"
    r"to\s+detect|assessment\s+for|evaluation\s+for|mistaken\s+for|rule\s+out|ruled\s+out)\b", re.I)


def _negated_in_clause(raw: str, offset: int) -> bool:
    starts = [m.end() for m in _CLAUSE_START.finditer(raw, 0, offset)]
    return bool(_CLAUSE_NEG.search(raw[starts[-1] if starts else 0:offset]))


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
        offsets = _token_offsets(raw, m.get("text", "").split(" "))
        spans = _kept_spans(raw)
        kept = lambda i: 0 <= i < len(offsets) and any(s0 <= offsets[i] < s1 for s0, s1 in spans)  # noqa: E731
        present: set[str] = set()
        for mt in m.get("matches", []):
            if mt.get("label") not in ("definitely present", "uncertain"):
                continue
            ix = mt.get("start_ix") or []
            if not (ix and all(kept(i) for i in ix)):
                continue
            if _negated_in_clause(raw, min(offsets[i] for i in ix)):
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


def _split_pools(cases: Sequence[PhantomCase], seed: int) -> dict[str, list[PhantomCase]]:
    order = _stream(seed, 99).permutation(len(cases))
    n = len(cases)
    n_train = int(round(n * _SPLIT_FRACTIONS["train"]))
    n_val = int(round(n * _SPLIT_FRACTIONS["val"]))
    idx = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {s: [cases[i] for i in sorted(idx[s])] for s in SPLITS}


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

    Reports are split 70/10/20 by a permutation fixed by ``seed`` (no report in two splits).
    ``n_*`` None -> one image per report of that split; a larger number cycles over the split's
    reports with fresh render seeds. Images go to ``out_dir/images/<id>.png``. ``workers`` > 1
    renders in processes; the output does not depend on it.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cases, _ = load_cases()
    pools = _split_pools(cases, seed)
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
            "split_fractions": _SPLIT_FRACTIONS, "findings": list(FINDINGS)}
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
