"""Phantom chest radiographs: the renderer of emrrg.data.phantom (which pairs them with reports).

``render_phantom(findings, seed, size)`` draws a deterministic frontal chest-radiograph-like image from
a set of finding labels (:data:`FINDINGS`) and, for ``support_devices``, device types (:data:`DEVICES`):
a nominal anatomy (lungs, heart, mediastinum, diaphragm, ribs, clavicles, vessels, soft tissue, noise)
jittered by the seed, changed by each finding's registered draw functions (``_GEOMETRY`` before the
anatomy is drawn, ``_OPACITY`` after it, ``_DEVICE_DRAW`` per device). The anatomy and every finding
draw from random streams of their own, so adding a finding never moves anything else; the same
arguments (and numpy / Pillow) give the same bytes.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["FINDINGS", "DEVICES", "SEVERITIES", "SIDES", "ZONES", "PhantomSpec", "render_phantom", "phantom_regions",
           "to_uint8", "to_uint16", "save_png"]

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
SEVERITIES = ("mild", "moderate", "severe")
SIDES = ("right", "left", "bilateral")
ZONES = ("upper", "mid", "lower")


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


# Tube and lead widths as fractions of the image width, from real device sizes on a ~43 cm adult PA
# field: ETT 7.5-8 mm ID (~11 mm outside, with its radiopaque stripe drawn inside), tracheostomy tube
# ~11 mm, enteric tube 16 Fr (5.3 mm), central venous catheter 7 Fr (2.3 mm, drawn 3.4 mm so that it
# survives the encoder's downsampling as a real line's edge contrast does), 28 Fr chest drain (9.3 mm),
# pacemaker lead ~2.5 mm. (The first renderer drew them at half these widths; at the demo
# encoder's 112 px they fell under one pixel and a linear probe found devices at AUC 0.67.)
DEVICE_WIDTH: dict[str, float] = {"ett": 0.024, "tracheostomy": 0.024, "enteric_tube": 0.012, "cvc": 0.008,
                                  "chest_drain": 0.02, "pacemaker": 0.008}


@_registered(_DEVICE_DRAW, "ett")
def _draw_ett(s: _Scene, ddraw: ImageDraw.ImageDraw, sub: np.random.Generator) -> None:
    cv, cx = s.cv, s.an.cx
    tip = s.an.carina_v - float(sub.uniform(0.03, 0.07))
    ddraw.line(cv.px([(cx - 0.004, 0.0), (cx - 0.004, tip)]), fill=0.7, width=cv.width(DEVICE_WIDTH["ett"]))
    ddraw.line(cv.px([(cx - 0.004, 0.0), (cx - 0.004, tip)]), fill=0.9, width=max(1, cv.width(0.004)))


@_registered(_DEVICE_DRAW, "tracheostomy")
def _draw_tracheostomy(s: _Scene, ddraw: ImageDraw.ImageDraw, sub: np.random.Generator) -> None:
    cv, cx = s.cv, s.an.cx
    tip = s.an.carina_v - float(sub.uniform(0.07, 0.1))
    ddraw.line(cv.px([(cx - 0.004, 0.1), (cx - 0.004, tip)]), fill=0.9, width=cv.width(DEVICE_WIDTH["tracheostomy"]))
    ddraw.line(cv.px([(cx - 0.06, 0.1), (cx + 0.055, 0.1)]), fill=1.0, width=cv.width(0.01))


@_registered(_DEVICE_DRAW, "enteric_tube")
def _draw_enteric_tube(s: _Scene, ddraw: ImageDraw.ImageDraw, sub: np.random.Generator) -> None:
    cv, cx = s.cv, s.an.cx
    gx = cx + 0.16 + float(sub.uniform(-0.02, 0.02))
    gy = float(_diaphragm_v(s.an, 1, 0.16)) + float(sub.uniform(0.05, 0.09))
    pts = [(cx + 0.008, 0.0), (cx + 0.012, 0.5)] + _curve((cx + 0.012, 0.5), (cx + 0.03, gy), (gx, gy))
    ddraw.line(cv.px(pts), fill=1.1, width=cv.width(DEVICE_WIDTH["enteric_tube"]))


@_registered(_DEVICE_DRAW, "cvc")
def _draw_cvc(s: _Scene, ddraw: ImageDraw.ImageDraw, sub: np.random.Generator) -> None:
    cv, cx = s.cv, s.an.cx
    sd = -1 if sub.uniform() < 0.7 else 1
    tip = (cx - 0.03, 0.44 + float(sub.uniform(-0.02, 0.03)))
    pts = _curve((cx + sd * 0.27, 0.11), (cx + sd * 0.06, 0.13), (cx - 0.03, 0.25)) + [tip]
    ddraw.line(cv.px(pts), fill=1.1, width=cv.width(DEVICE_WIDTH["cvc"]))


@_registered(_DEVICE_DRAW, "chest_drain")
def _draw_chest_drain(s: _Scene, ddraw: ImageDraw.ImageDraw, sub: np.random.Generator) -> None:
    cv, an, cx = s.cv, s.an, s.an.cx
    sd = -1 if sub.uniform() < 0.6 else 1
    pts = _curve((cx + sd * (an.w_lung + 0.07), 0.62), (cx + sd * (an.w_lung - 0.02), 0.55),
                 (cx + sd * 0.2, 0.2 + float(sub.uniform(0, 0.05))))
    ddraw.line(cv.px(pts), fill=1.0, width=cv.width(DEVICE_WIDTH["chest_drain"]))
    ddraw.line(cv.px(pts), fill=0.55, width=max(1, cv.width(0.004)))


@_registered(_DEVICE_DRAW, "pacemaker")
def _draw_pacemaker(s: _Scene, ddraw: ImageDraw.ImageDraw, sub: np.random.Generator) -> None:
    cv, cx, size = s.cv, s.an.cx, s.size
    gx, gy = cx + 0.3, 0.17 + float(sub.uniform(-0.015, 0.015))
    box = [(gx - 0.04) * size, (gy - 0.028) * size, (gx + 0.04) * size, (gy + 0.028) * size]
    ddraw.rounded_rectangle(box, radius=max(1, int(0.012 * size)), fill=3.0)
    for k, target in enumerate([(cx - 0.01, 0.55), (cx + 0.06, 0.66)]):
        pts = _curve((gx - 0.03, gy + 0.01), (cx + 0.02 + 0.03 * k, 0.2), target)
        ddraw.line(cv.px(pts), fill=1.3, width=cv.width(DEVICE_WIDTH["pacemaker"]))


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
