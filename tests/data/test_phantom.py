"""Phantom chest radiographs: determinism, what each finding does where, and report pairing.

Effect checks render the same seed with and without one finding (the anatomy, vessels and noise
depend on the seed only) and measure the region the finding belongs to. Thresholds sit well
inside what seeds 0-9 give (printed before each assert); a finding in FINDINGS without a check
fails ``test_every_finding_has_an_effect_check``.
"""
from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest
from PIL import Image

from emrrg.data import phantom as ph
from emrrg.data import phantom_render as pr
from emrrg.data.annotation import SPLITS, load_annotation

HAS_RADLABELS = importlib.util.find_spec("radlabels") is not None
HAS_RADTEXT = importlib.util.find_spec("radtext") is not None
needs_radlabels = pytest.mark.skipif(not HAS_RADLABELS, reason="radlabels (offline report asset) not installed")

SEEDS = (0, 1, 2)
SIZE = 224

# Minimum effect sizes, display units in [0, 1] unless a ratio.
MIN_CARDIOMEGALY_AREA_RATIO = 1.1   # bright (heart-like) area in the heart band, seeds 0-9 give 1.19-1.22
MIN_EFFUSION_GAIN = 0.1             # costophrenic mean, mild effusion gives 0.2-0.28
MAX_PTX_TEXTURE_RATIO = {"moderate": 0.9, "severe": 0.8}   # seeds 0-2 give <= 0.79 / 0.71
MIN_CONSOLIDATION_GAIN = 0.015      # lower-zone mean, 0.023-0.06
MIN_ATELECTASIS_GAIN = 0.03         # lower-zone mean (elevated hemidiaphragm + bands), 0.05-0.07
MIN_EDEMA_GAIN = 0.06               # perihilar mean, both sides, ~0.12
MIN_HYPERINFLATION_RATIO = 1.05     # dark (lung) area, ~1.11
MIN_MEDIASTINUM_RATIO = 1.2         # bright area in the upper mediastinum band, 1.42-1.58
UNTOUCHED = 1e-6                    # the other side must not change at all


def _render(findings, seed, **attributes):
    attrs = {f: attributes for f in findings} if attributes else None
    return ph.render_phantom(list(findings), seed, SIZE, attributes=attrs)


def _hpx_energy(img: np.ndarray, mask: np.ndarray, k: int = 5) -> float:
    """Energy of the horizontal high-pass (image minus a 1 x k mean): vessel texture, not ribs."""
    from numpy.lib.stride_tricks import sliding_window_view

    p = np.pad(img, ((0, 0), (k // 2, k // 2)), mode="reflect")
    hp = img - sliding_window_view(p, (1, k)).mean(axis=(-1, -2))
    return float((hp[mask] ** 2).mean())


def _erode(m: np.ndarray, n: int) -> np.ndarray:
    for _ in range(n):
        m = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
    return m


# ---------------------------------------------------------------------------------------------
# Rendering


def test_render_is_deterministic_and_seeded():
    a = ph.render_phantom(["cardiomegaly", "support_devices"], 7, devices=("ett", "cvc"))
    b = ph.render_phantom(["cardiomegaly", "support_devices"], 7, devices=("ett", "cvc"))
    c = ph.render_phantom(["cardiomegaly", "support_devices"], 8, devices=("ett", "cvc"))
    assert a.dtype == np.float32 and a.shape == (SIZE, SIZE)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0


def test_looks_like_a_chest_film():
    img = _render([], 0)
    R = ph.phantom_regions(0)
    lung = np.median(img[R["right_lung"] | R["left_lung"]])
    heart = np.median(img[R["heart"]])
    corner = img[:4, :4].mean()
    print(f"lung {lung:.3f} heart {heart:.3f} corner {corner:.3f}")
    assert lung < heart - 0.15           # lungs dark, heart bright
    assert corner < 0.1                  # air above the shoulders
    assert 0.25 < img.mean() < 0.8


@pytest.mark.parametrize("size", [128, 320])
def test_other_sizes(size):
    img = ph.render_phantom(["pleural_effusion", "lung_lesion"], 3, size)
    assert img.shape == (size, size) and np.isfinite(img).all()


def test_unknown_finding_is_an_error():
    with pytest.raises(ValueError):
        ph.render_phantom(["dragon"], 0)


def _bright_area_ratio(seed, finding, region):
    """How much more of `region` is brighter than halfway between lung and heart with a mild `finding`."""
    R = ph.phantom_regions(seed)
    base, sick = _render([], seed), _render([finding], seed, severity="mild")
    thr = (np.median(base[R["right_lung"]]) + np.median(base[R["heart"]])) / 2
    return (sick[R[region]] > thr).mean() / (base[R[region]] > thr).mean()


def _check_cardiomegaly(seed):
    ratio = _bright_area_ratio(seed, "cardiomegaly", "heart_band")
    print(f"cardiomegaly seed {seed}: bright heart-band area x{ratio:.3f}")
    assert ratio > MIN_CARDIOMEGALY_AREA_RATIO


def _check_enlarged_cardiomediastinum(seed):
    ratio = _bright_area_ratio(seed, "enlarged_cardiomediastinum", "upper_mediastinum")
    print(f"mediastinum seed {seed}: bright upper-mediastinal area x{ratio:.3f}")
    assert ratio > MIN_MEDIASTINUM_RATIO


def _check_pleural_effusion(seed):
    R = ph.phantom_regions(seed)
    base, sick = _render([], seed), _render(["pleural_effusion"], seed, side="right", severity="mild")
    gain = sick[R["right_costophrenic"]].mean() - base[R["right_costophrenic"]].mean()
    other = np.abs(sick[R["left_lung"]] - base[R["left_lung"]]).max()
    upper = np.abs(sick[R["right_apex"]] - base[R["right_apex"]]).max()
    print(f"effusion seed {seed}: right costophrenic +{gain:.3f}, left lung max diff {other:.2e}, apex {upper:.2e}")
    assert gain > MIN_EFFUSION_GAIN
    assert other < UNTOUCHED and upper < UNTOUCHED   # basal only, one side only


def _check_pneumothorax(seed):
    R = ph.phantom_regions(seed)
    base = _render([], seed)
    for sev, max_ratio in MAX_PTX_TEXTURE_RATIO.items():
        sick, info = ph.render_phantom(["pneumothorax"], seed, SIZE, return_info=True,
                                       attributes={"pneumothorax": {"side": "right", "severity": sev}})
        zone = _erode(info["pneumothorax"]["zone"], 2) & R["right_apex"]
        ratio = _hpx_energy(sick, zone) / _hpx_energy(base, zone)
        darker = sick[zone].mean() - base[zone].mean()
        print(f"pneumothorax {sev} seed {seed}: apical texture energy x{ratio:.3f} over {zone.sum()} px, mean {darker:+.3f}")
        assert zone.sum() > 100
        assert ratio < max_ratio           # no lung markings beyond the visceral pleural line
        assert darker < 0                  # and more lucent there
        assert np.abs(sick[R["left_lung"]] - base[R["left_lung"]]).max() < UNTOUCHED


def _check_consolidation(seed):
    R = ph.phantom_regions(seed)
    base = _render([], seed)
    sick = _render(["consolidation"], seed, side="right", zone="lower", severity="mild")
    gain = sick[R["right_lower"]].mean() - base[R["right_lower"]].mean()
    other = np.abs(sick[R["left_lung"]] - base[R["left_lung"]]).max()
    print(f"consolidation seed {seed}: right lower zone +{gain:.3f}, left max diff {other:.2e}")
    assert gain > MIN_CONSOLIDATION_GAIN and other < UNTOUCHED


def _check_lung_lesion(seed):
    base = _render([], seed)
    sick, info = ph.render_phantom(["lung_lesion"], seed, SIZE, return_info=True,
                                   attributes={"lung_lesion": {"kind": "nodule"}})
    x, v = info["lung_lesion"]["center"]
    r = info["lung_lesion"]["radius"]
    cv = pr._Canvas(SIZE)
    dist = np.sqrt((cv.X - x) ** 2 + (cv.V - v) ** 2) * SIZE
    inside = dist < 0.6 * r * SIZE
    outside = dist > r * SIZE + 3
    gain = sick[inside].mean() - base[inside].mean()
    leak = np.abs(sick[outside] - base[outside]).max()
    print(f"nodule seed {seed}: r {r * SIZE:.1f}px, core +{gain:.3f}, outside max diff {leak:.2e}")
    assert gain > 0.1 and leak < UNTOUCHED   # a round opacity, nothing else


def _check_atelectasis(seed):
    R = ph.phantom_regions(seed)
    base = _render([], seed)
    sick, info = ph.render_phantom(["atelectasis"], seed, SIZE, return_info=True,
                                   attributes={"atelectasis": {"side": "right", "severity": "mild", "zone": "lower"}})
    gain_r = sick[R["right_lower"]].mean() - base[R["right_lower"]].mean()
    gain_l = sick[R["left_lower"]].mean() - base[R["left_lower"]].mean()
    print(f"atelectasis seed {seed}: right lower +{gain_r:.3f}, left lower {gain_l:+.3f}, lift {info['atelectasis']['lift']}")
    assert gain_r > MIN_ATELECTASIS_GAIN and gain_r > 5 * abs(gain_l)


def _check_edema(seed):
    R = ph.phantom_regions(seed)
    base, sick = _render([], seed), _render(["edema"], seed, severity="mild")
    gains = [sick[R[f"{s}_perihilar"]].mean() - base[R[f"{s}_perihilar"]].mean() for s in ("right", "left")]
    print(f"edema seed {seed}: perihilar +{gains[0]:.3f} / +{gains[1]:.3f}")
    assert min(gains) > MIN_EDEMA_GAIN      # bilateral


def _check_support_devices(seed):
    R = ph.phantom_regions(seed)
    base = _render([], seed)
    ett = ph.render_phantom(["support_devices"], seed, SIZE, devices=("ett",))
    gain = ett[R["trachea"]].mean() - base[R["trachea"]].mean()
    pm = ph.render_phantom(["support_devices"], seed, SIZE, devices=("pacemaker",))
    bright = int((pm > 0.97).sum()) - int((base > 0.97).sum())
    print(f"devices seed {seed}: trachea +{gain:.3f} with an ETT, {bright} new near-white px with a pacemaker")
    assert gain > 0.1 and bright > 50


def _check_fracture(seed):
    base = _render([], seed)
    sick, info = ph.render_phantom(["fracture"], seed, SIZE, return_info=True, attributes={"fracture": {"side": "left"}})
    changed = np.abs(sick - base) > 1e-6
    cols = np.nonzero(changed.any(axis=0))[0]
    cx = info["anatomy"].cx * SIZE
    print(f"fracture seed {seed}: {changed.sum()} px changed, columns {cols.min()}-{cols.max()} (midline {cx:.0f})")
    assert 30 < changed.sum() < 0.03 * SIZE * SIZE    # one rib, locally
    assert cols.min() > cx                            # patient left = image right


def _check_hyperinflation(seed):
    R = ph.phantom_regions(seed)
    base, sick = _render([], seed), _render(["hyperinflation"], seed, severity="mild")
    thr = (np.median(base[R["right_lung"]]) + np.median(base[R["heart"]])) / 2
    ratio = (sick < thr).mean() / (base < thr).mean()
    print(f"hyperinflation seed {seed}: dark lung area x{ratio:.3f}")
    assert ratio > MIN_HYPERINFLATION_RATIO


EFFECT_CHECKS = {
    "cardiomegaly": _check_cardiomegaly,
    "enlarged_cardiomediastinum": _check_enlarged_cardiomediastinum,
    "pleural_effusion": _check_pleural_effusion,
    "pneumothorax": _check_pneumothorax,
    "consolidation": _check_consolidation,
    "lung_lesion": _check_lung_lesion,
    "atelectasis": _check_atelectasis,
    "edema": _check_edema,
    "support_devices": _check_support_devices,
    "fracture": _check_fracture,
    "hyperinflation": _check_hyperinflation,
}


def test_every_finding_has_an_effect_check():
    assert set(EFFECT_CHECKS) == set(ph.FINDINGS)


def test_every_finding_and_device_has_a_draw_function():
    """One registered draw function per finding (geometry and/or opacity stage), one per device type; the
    opacity stage runs in a fixed order (the overlay is a float sum, its order is part of the output)."""
    drawn = set(pr._GEOMETRY) | set(pr._OPACITY) | {"support_devices"}
    assert drawn == set(ph.FINDINGS)
    assert set(pr._DEVICE_DRAW) == set(ph.DEVICES)
    assert list(pr._OPACITY) == ["pneumothorax", "pleural_effusion", "consolidation", "lung_lesion", "atelectasis",
                                 "edema"]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("finding", ph.FINDINGS)
def test_finding_changes_its_region(finding, seed):
    EFFECT_CHECKS[finding](seed)


# The demo encoder sees 112 px (the runtime's BILINEAR resize of the 224 px render). A tube must stay a
# line there: its 20 most changed input values (after normalization) move by at least this much. The
# first renderer's half-width tubes moved by 0.65-0.87 (ETT, enteric tube, CVC: under one pixel at 112 px,
# a linear probe on the demo encoder found devices at AUC 0.67); the real-size ones by 0.95-2.2.
DEVICE_MIN_CONTRAST_112 = 0.9


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_devices_survive_the_demo_encoders_resolution(tmp_path, seed):
    from emrrg.runtime.preprocess import preprocess_study

    def inputs(spec):
        path = tmp_path / "x.png"
        ph.save_png(ph.render_phantom(spec, seed, 224), path)
        return preprocess_study([path], size=112)[0, 0]

    base = inputs(ph.PhantomSpec((), {}, ()))
    for dev in pr.DEVICES:
        diff = np.abs(inputs(ph.PhantomSpec(("support_devices",), {}, (dev,))) - base).ravel()
        assert np.sort(diff)[-20] >= DEVICE_MIN_CONTRAST_112, dev


def test_findings_use_their_own_random_streams():
    """Adding a finding never moves another one: the nodule sits where it sat alone."""
    _, alone = ph.render_phantom(["lung_lesion"], 4, return_info=True)
    _, crowd = ph.render_phantom(["lung_lesion", "edema", "pleural_effusion", "support_devices"], 4, return_info=True)
    assert alone["lung_lesion"]["center"] == crowd["lung_lesion"]["center"]


def test_render_speed():
    t = time.perf_counter()
    n = 30
    for i in range(n):
        ph.render_phantom(ph.FINDINGS[i % len(ph.FINDINGS):][:3], i)
    per = (time.perf_counter() - t) / n
    print(f"{per * 1e3:.1f} ms per 224 px image -> {1000 * per:.0f} s per 1000")
    assert per < 0.08   # generous: shared CI machines; ~0.02 s when idle


def test_png_8_and_16_bit(tmp_path):
    img = _render(["edema"], 1)
    p8 = ph.save_png(img, tmp_path / "a.png", 8)
    p16 = ph.save_png(img, tmp_path / "b.png", 16)
    a8, a16 = np.asarray(Image.open(p8)), np.asarray(Image.open(p16))
    assert a8.dtype == np.uint8 and a8.shape == (SIZE, SIZE)
    assert a16.dtype in (np.uint16, np.int32) and a16.max() > 255
    assert np.abs(a16.astype(np.float64) / 65535 - img).max() < 1e-4
    assert np.abs(a8.astype(np.float64) / 255 - img).max() <= 0.5 / 255 + 1e-6


# ---------------------------------------------------------------------------------------------
# Reports


def test_clean_report_keeps_findings_and_cuts_unfinished_sentences():
    raw = ("FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n \n INDICATION: ___ with cough, ? pneumonia.\n \n"
           " COMPARISON: ___.\n \n FINDINGS: \n \n Small left pleural effusion. Heart size is normal.\n \n"
           " IMPRESSION: \n 1. Small left effusion.\n 2. No pneumothor\n")
    out = ph.clean_report(raw)
    assert out == "Small left pleural effusion. Heart size is normal. Small left effusion."
    assert "pneumonia" not in out
    wet = "WET READ: ___ ___ ___ 9:22 PM\n  Unchanged moderate cardiomegaly.\n  An enteric tube descends\n"
    assert ph.clean_report(wet) == "Unchanged moderate cardiomegaly."
    reason = "FINAL REPORT\nREASON FOR EXAM: fever.\n\nMild cardiomegaly is stable. No effusion.\n"
    assert ph.clean_report(reason) == "Mild cardiomegaly is stable. No effusion."
    assert ph.clean_report("FINDINGS: Partially visualized is") == ""


def test_parse_attributes():
    a = ph.parse_attributes("No pneumothorax. Small right pleural effusion. Bibasilar atelectasis. "
                            "Large left upper lobe mass.", ["pleural_effusion", "atelectasis", "lung_lesion", "pneumothorax"])
    assert a["pleural_effusion"] == {"side": "right", "severity": "mild"}
    assert a["atelectasis"]["side"] == "bilateral" and a["atelectasis"]["zone"] == "lower"
    assert a["lung_lesion"]["kind"] == "mass" and a["lung_lesion"]["side"] == "left"
    assert a["lung_lesion"]["severity"] == "severe" and a["lung_lesion"]["zone"] == "upper"
    assert "pneumothorax" not in a   # only negated mentions


@needs_radlabels
def test_cases_policy_statistics():
    cases, stats = ph.load_cases()
    summary = ph.dataset_statistics(cases)
    print(json.dumps({**stats, **summary}, indent=1))
    assert stats["reports"] == 1000
    assert stats["usable"] == len(cases) > 700
    assert stats["usable"] + stats["excluded_empty"] + sum(stats["excluded_unrenderable"].values()) >= stats["reports"]
    assert 0 < summary["no_renderable_finding"] < len(cases) // 2
    for f in ph.FINDINGS:
        assert summary["findings"][f] >= 10, f      # every finding occurs
    for c in cases:
        assert c.report and c.report[-1] in ".!?"
        assert set(c.spec.findings) <= set(ph.FINDINGS)
        assert not set(c.source_labels) & ph.EXCLUDED_SOURCE
        assert bool(c.spec.devices) == ("support_devices" in c.spec.findings)


@needs_radlabels
@pytest.mark.skipif(not HAS_RADTEXT, reason="radtext (CheXpert phrase lists) not installed")
def test_drawn_findings_are_in_the_paired_report():
    from emrrg.metrics.labeler import label_report

    cases, _ = ph.load_cases()
    hit: dict[str, list[int]] = {}
    for c in cases:
        for f, named in ph.findings_named(c.spec.findings, label_report(c.report)).items():
            if named is not None:
                hit.setdefault(f, []).append(int(named))
    rates = {f: float(np.mean(v)) for f, v in hit.items()}
    overall = float(np.mean([x for v in hit.values() for x in v]))
    print({f: round(r, 3) for f, r in rates.items()}, f"overall {overall:.3f}")
    assert overall > 0.9
    assert min(rates.values()) > 0.5      # lung lesions are the weakest (radlabels' "lesion" is broad)


@pytest.mark.skipif(not HAS_RADTEXT, reason="radtext (CheXpert phrase lists) not installed")
def test_findings_named():
    from emrrg.metrics.labeler import label_report

    report = "Moderate cardiomegaly. There is a small right pleural effusion. No pneumothorax."
    named = ph.findings_named(["cardiomegaly", "pleural_effusion", "pneumothorax", "hyperinflation"],
                              label_report(report))
    assert named == {"cardiomegaly": True, "pleural_effusion": True, "pneumothorax": False, "hyperinflation": None}
    # the demo's looping report never names the heart
    loop = "No pneumothorax is present. There is a right-sided pleural effusion. There is no pneumothorax."
    assert ph.findings_named(["pleural_effusion", "cardiomegaly"], label_report(loop)) == {
        "pleural_effusion": True, "cardiomegaly": False}
    with pytest.raises(ValueError, match="unknown finding 'nodule'"):
        ph.findings_named(["nodule"], {})


# ---------------------------------------------------------------------------------------------
# Dataset


@needs_radlabels
def test_split_pools_are_fixed_and_disjoint():
    cases, _ = ph.load_cases()
    table = ph.source_splits()
    assert len(table) == 1000      # every radlabels report has its split, usable or not
    pools = ph._split_pools(cases)
    ids = {s: {c.source_id for c in pools[s]} for s in SPLITS}
    assert sum(len(v) for v in ids.values()) == len(cases)
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    # about 70/10/20 of the usable reports (the list was drawn 70/10/20 over the first policy's usable set)
    assert abs(len(ids["train"]) - 0.7 * len(cases)) <= 0.02 * len(cases)
    assert abs(len(ids["val"]) - 0.1 * len(cases)) <= 0.02 * len(cases)
    # A report's split does not depend on which others are usable: drop half the cases, nobody moves.
    half = ph._split_pools(cases[::2])
    assert all(c.source_id in ids[s] for s in SPLITS for c in half[s])
    stray = ph.PhantomCase("synth_9999", "x.", ph.PhantomSpec((), {}, ()), ())
    with pytest.raises(ph.MissingAssetError, match="synth_9999.*not in"):
        ph._split_pools([stray])


@needs_radlabels
def test_write_dataset_is_byte_identical_and_r2gen_shaped(tmp_path):
    kw = dict(n_train=8, n_val=3, n_test=4, seed=0, size=SIZE)
    a = ph.write_phantom_dataset(tmp_path / "a", **kw)
    b = ph.write_phantom_dataset(tmp_path / "b", workers=2, **kw)
    assert a.name == "annotation.json" and a.read_bytes() == b.read_bytes()
    ann = load_annotation(a, check_images=True)
    assert [len(ann[s]) for s in SPLITS] == [8, 3, 4]
    pngs = sorted((tmp_path / "a" / "images").glob("*.png"))
    assert len(pngs) == 15
    for p in pngs:
        assert p.read_bytes() == (tmp_path / "b" / "images" / p.name).read_bytes()
    ids = [ex["id"] for s in SPLITS for ex in ann[s]]
    assert len(ids) == len(set(ids))
    src = {s: {ex["source_id"] for ex in ann[s]} for s in SPLITS}
    assert not (src["train"] & src["val"]) and not (src["train"] & src["test"]) and not (src["val"] & src["test"])
    ex = ann["train"][0]
    assert set(ex) >= {"id", "report", "image_path", "labels"}
    assert isinstance(ex["image_path"], list) and ex["image_path"][0].startswith("images/")
    img = np.asarray(Image.open(tmp_path / "a" / ex["image_path"][0]))
    assert img.shape == (SIZE, SIZE) and img.dtype == np.uint8
    # The PNG is the render of the recorded seed and labels.
    spec = ph.PhantomSpec(tuple(ex["labels"]), ex["attributes"], tuple(ex["devices"]))
    assert np.array_equal(img, ph.to_uint8(ph.render_phantom(spec, ex["seed"], SIZE)))
    # Another seed: the same splits, other pixels.
    ph.write_phantom_dataset(tmp_path / "c", n_train=1, n_val=0, n_test=0, seed=1, size=SIZE)
    name = "images/phantom_train_00000.png"
    assert (tmp_path / "c" / name).read_bytes() != (tmp_path / "a" / name).read_bytes()


@needs_radlabels
def test_more_images_than_reports_cycle_with_new_seeds(tmp_path):
    cases, _ = ph.load_cases()
    n_val = len(ph._split_pools(cases)["val"])
    ann = load_annotation(ph.write_phantom_dataset(tmp_path, n_train=0, n_val=n_val + 2, n_test=0, size=96))
    first, again = ann["val"][0], ann["val"][n_val]
    assert first["source_id"] == again["source_id"] and first["seed"] != again["seed"]


@needs_radlabels
def test_cli(tmp_path, capsys):
    assert ph.main(["-o", str(tmp_path), "--n-train", "2", "--n-val", "1", "--n-test", "1", "--bit-depth", "16"]) == 0
    path = capsys.readouterr().out.strip()
    ann = load_annotation(path, check_images=True)
    img = Image.open(tmp_path / ann["test"][0]["image_path"][0])
    assert img.mode.startswith("I")
