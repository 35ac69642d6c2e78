"""The input gate (emrrg.runtime.gate) and the loader's own limits, on real files.

Real CT / MR / US / NM / CR objects come from pydicom-data; synthetic DICOMs, PNGs, JPEGs and the bombs are
built in tmp_path (tests/runtime/image_inputs.py). The CLI tests run `emrrg-run` in-process on the tiny bundle.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from emrrg.assets import chest_dicom, pneumonia_images, pydicom_data_dir
from emrrg.runtime.gate import (
    InputPolicy, InputWarning, check_study, load_study, read_view, read_views,
)
from emrrg.runtime.preprocess import ImageError, RefusedInputError, load_image, preprocess
from tests.runtime.image_inputs import (
    chest_elements, dicom_bytes, jpeg_bomb, measure_load_rss, png_bomb, rle_dicom_bomb, set_jpeg_size, with_raw_ds,
    write_dicom,
)

SEED = 0
# Growth of peak RSS allowed for refusing a bomb: the header read and the error message. The bombs took
# 1.6 GB (JPEG, PNG) and 4 GB (RLE) before the budget; refusing them measures < 1 MB.
BOMB_RSS_MB = 16
# Loading the 1841 x 1955 16-bit RG1 film grows peak RSS by ~31 MB (7 MB file, 7 MB decoded, 14 MB float32);
# the bound allows pydicom / pillow version drift but fails a whole-image float64 copy (29 MB more).
FILM_RSS_MB = 60
CORPUS = Path(__file__).resolve().parents[1] / "data" / "fuzz_corpus"


def pixels(shape=(24, 32)) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, 4096, size=shape)


def chest(tmp_path: Path, name: str = "cr.dcm", shape=(24, 32), **over) -> Path:
    return write_dicom(tmp_path / name, pixels(shape), **chest_elements(**over))


# --------------------------------------------------------------------------- modality and SOP class

REFUSED_MODALITIES = {"CT": "693_UNCR.dcm", "MR": "MR2_UNCR.dcm", "US": "US1_UNCR.dcm", "NM": "JPEG-LL.dcm"}


@pytest.mark.parametrize("modality", list(REFUSED_MODALITIES))
def test_real_non_radiographs_refused(modality: str) -> None:
    path = pydicom_data_dir() / REFUSED_MODALITIES[modality]
    with pytest.raises(RefusedInputError) as info:
        load_study([path], 64)
    msg = str(info.value)
    print(msg)
    assert f"modality {modality}" in msg and "not a projection radiograph" in msg and str(path) in msg
    assert f"--allow-modality {modality}" in msg and "\n" not in msg


def test_refusal_comes_from_the_header_before_any_pixel(tmp_path: Path) -> None:
    # Pixel data cut in half: a decode would fail with "truncated"; the gate must refuse the CT first.
    ct = (pydicom_data_dir() / "693_UNCR.dcm").read_bytes()
    (cut := tmp_path / "ct_cut.dcm").write_bytes(ct[: len(ct) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(cut)
    with pytest.raises(RefusedInputError, match="modality CT"):
        load_study([cut], 64)
    # and in a study, the second view's refusal comes before the first view's pixels are read
    with pytest.raises(RefusedInputError, match="modality CT"):
        load_study([chest_dicom("RG1_UNCR.dcm"), cut], 64)


def test_allow_modality_lets_ct_through() -> None:
    path = pydicom_data_dir() / "693_UNCR.dcm"
    px, views = load_study([path], 64, InputPolicy(allow_modality=("ct",)))
    assert px.shape == (1, 3, 64, 64) and np.isfinite(px).all()
    assert views[0].modality == "CT" and views[0].checks["modality"] == "allowed"
    with pytest.raises(RefusedInputError, match="modality MR"):  # allowing CT allows nothing else
        load_study([pydicom_data_dir() / "MR2_UNCR.dcm"], 64, InputPolicy(allow_modality=("CT",)))
    with pytest.raises(ValueError, match="not a string"):
        InputPolicy(allow_modality="CT")


@pytest.mark.parametrize("modality", ["CR", "DX", "DR", "RG"])
def test_projection_modalities_accepted(tmp_path: Path, modality: str) -> None:
    _, views = load_study([chest(tmp_path, Modality=modality)], 32)
    assert views[0].checks["modality"] == "pass"


def test_missing_modality_refused_unless_allowed_as_none(tmp_path: Path) -> None:
    path = chest(tmp_path)
    ds = pydicom.dcmread(path)
    del ds.Modality
    ds.save_as(path)
    with pytest.raises(RefusedInputError, match=r"no Modality element \(0008,0060\).*--allow-modality NONE"):
        load_study([path], 32)
    assert load_study([path], 32, InputPolicy(allow_modality=("NONE",)))[1][0].checks["modality"] == "allowed"


def test_multiframe_refused_even_when_allowed(tmp_path: Path) -> None:
    frames = write_dicom(tmp_path / "mf.dcm", np.random.default_rng(SEED).integers(0, 4096, (3, 16, 24)),
                         **chest_elements())
    for policy in (InputPolicy(), InputPolicy(allow_modality=("CR",))):
        with pytest.raises(RefusedInputError, match=r"multi-frame object \(3 frames\)"):
            load_study([frames], 32, policy)
    assert load_image(frames).shape == (16, 24)  # the loader alone still reads the first frame


@pytest.mark.parametrize("name, allow, words", [
    ("US1_UNCR.dcm", "US", "SOP class Ultrasound Image Storage is an ultrasound"),
    ("OBXXXX1A_rle_2frame.dcm", "US", "Ultrasound Multi-frame"),
    ("SC_rgb_2frame.dcm", "OT", "multi-frame object (2 frames, color)"),
    ("emri_small.dcm", "MR", "multi-frame object (10 frames)"),
])
def test_ultrasound_and_cine_refused_whatever_is_allowed(name: str, allow: str, words: str) -> None:
    with pytest.raises(RefusedInputError) as info:
        load_study([pydicom_data_dir() / name], 32, InputPolicy(allow_modality=(allow,)))
    print(info.value)
    assert words in str(info.value)


# --------------------------------------------------------------------------- body part, view position

def test_body_part_not_chest_warns_or_refuses_when_strict() -> None:
    path = pydicom_data_dir() / "RG3_UNCR.dcm"  # a real CR of an extremity
    with pytest.warns(InputWarning, match="BodyPartExamined is 'EXTREMITY', not the chest"):
        px, views = load_study([path], 32)
    assert views[0].checks["body_part"] == "warn" and len(views[0].warnings) == 1 and np.isfinite(px).all()
    with pytest.raises(RefusedInputError, match="EXTREMITY.*refused by --strict-inputs"):
        load_study([path], 32, InputPolicy(strict_inputs=True))


@pytest.mark.parametrize("value, result", [("CHEST", "pass"), ("THORAX", "pass"), ("Chest PA", "pass"),
                                           ("LUNG", "pass"), (None, "absent"), ("CHESTABDOMEN", "warn"),
                                           ("TSPINE", "warn")])
def test_body_part_variants(tmp_path: Path, value, result: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error" if result != "warn" else "ignore", InputWarning)
        views = check_study(read_views([chest(tmp_path, BodyPartExamined=value)]), InputPolicy(strict_inputs=False))
    assert views[0].checks["body_part"] == result
    if result != "warn":  # strict refuses only what would warn
        check_study(read_views([chest(tmp_path, BodyPartExamined=value)]), InputPolicy(strict_inputs=True))


def test_view_position_and_json_of_real_film() -> None:
    (view,) = check_study([read_view(chest_dicom("RG1_UNCR.dcm"))])
    j = view.to_json()
    print(j)
    assert j["view_position"] == "PA" and j["modality"] == "CR" and j["body_part"] == "CHEST"
    assert j["header_checked"] is True and j["size"] == [1841, 1955] and j["frames"] == 1
    assert j["sop_class"] == "Computed Radiography Image Storage"
    assert set(j["header_checks"]) == {"modality", "single_frame", "body_part", "same_patient", "same_study"}
    assert not ({"patient_id", "study_uid", "sop_instance_uid"} & set(j)), "identifiers stay out of the JSON"


def test_png_and_jpeg_accepted_without_header_checks() -> None:
    _, views = load_study([pneumonia_images()[0]], 32)
    j = views[0].to_json()
    assert j["kind"] == "jpeg" and j["header_checked"] is False and j["header_checks"] == {}
    assert "could not be checked" in j["note"] and j["modality"] is None


# --------------------------------------------------------------------------- one study, one patient

def test_two_patients_refused_naming_both(tmp_path: Path) -> None:
    a = chest(tmp_path, "a.dcm", patient="PAT-A", SOPInstanceUID="1.2.3.1")
    b = chest(tmp_path, "b.dcm", patient="PAT-B", SOPInstanceUID="1.2.3.2")
    with pytest.raises(RefusedInputError) as info:
        load_study([a, b], 32)
    msg = str(info.value)
    print(msg)
    assert "different patients" in msg and "'PAT-A'" in msg and "'PAT-B'" in msg and "a.dcm" in msg and "b.dcm" in msg
    with pytest.raises(RefusedInputError) as info:  # the service's form: the IDs are withheld
        check_study(read_views([a, b]), reveal_ids=False)
    assert "PatientID values differ" in str(info.value) and "PAT-" not in str(info.value)


def test_three_studies_refused_naming_the_uids(tmp_path: Path) -> None:
    files = [chest(tmp_path, f"{i}.dcm", study=f"1.2.840.99.{i}", SOPInstanceUID=f"1.2.3.{i}") for i in range(3)]
    with pytest.raises(RefusedInputError, match=r"different studies \(StudyInstanceUID '1.2.840.99.0' vs '1.2.840.99.1'\)"):
        load_study(files, 32)


def test_two_views_of_one_study_and_a_png_pass(tmp_path: Path) -> None:
    a = chest(tmp_path, "a.dcm", SOPInstanceUID="1.2.3.1")
    b = chest(tmp_path, "b.dcm", SOPInstanceUID="1.2.3.2", ViewPosition="LL")
    px, views = load_study([a, b, pneumonia_images()[0]], 32)
    assert px.shape == (3, 3, 32, 32)
    assert [v.view_position for v in views] == ["PA", "LL", None]
    assert views[1].checks["same_patient"] == views[1].checks["same_study"] == "pass"


def test_same_image_twice_warns(tmp_path: Path) -> None:
    a = chest(tmp_path, "a.dcm")
    with pytest.warns(InputWarning, match="same image"):
        load_study([a, a], 32)
    with pytest.raises(RefusedInputError, match="same image"):
        load_study([a, a], 32, InputPolicy(strict_inputs=True))


# --------------------------------------------------------------------------- finite values

NON_FINITE = {  # elements -> words of the refusal
    "window_width_inf": (dict(WindowWidth="inf"), "WindowWidth"),
    "window_width_1e400": (dict(WindowWidth="1e400"), "WindowWidth"),
    "window_center_nan": (dict(WindowCenter="nan"), "WindowCenter"),
    "rescale_slope_1e308": (dict(RescaleSlope="1e308"), "RescaleSlope"),
    "rescale_slope_inf": (dict(RescaleSlope="inf"), "RescaleSlope"),
    "rescale_slope_nan": (dict(RescaleSlope="nan"), "RescaleSlope"),
    "rescale_slope_0": (dict(RescaleSlope="0"), "RescaleSlope is 0"),
    "rescale_intercept_-1e400": (dict(RescaleIntercept="-1e400"), "RescaleIntercept"),
    "rescale_to_1e35": (dict(RescaleSlope="1e31"), "values up to"),
}


def _raw_ds_file(path: Path, **raw: str) -> Path:
    """A chest DICOM with DS elements written as raw strings."""
    path.write_bytes(with_raw_ds(chest(path.parent, path.name).read_bytes(), **raw))
    return path


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_header_values_refused(tmp_path: Path, case: str) -> None:
    elements, words = NON_FINITE[case]
    path = _raw_ds_file(tmp_path / f"{case}.dcm", **elements)
    for fn in (lambda: load_image(path), lambda: preprocess(path), lambda: load_study([path], 32)):
        with pytest.raises(ImageError) as info:
            fn()
        assert words in str(info.value) and "\n" not in str(info.value), info.value
    print(info.value)


@pytest.mark.parametrize("width", ["0", "-5"])
def test_zero_or_negative_window_falls_back_to_minmax(tmp_path: Path, width: str) -> None:
    path = _raw_ds_file(tmp_path / "w.dcm", WindowWidth=width)
    with pytest.warns(UserWarning, match="invalid VOI"):
        g = load_image(path)
    p = pixels()
    np.testing.assert_allclose(g, (p - p.min()) / (p.max() - p.min()), atol=1e-6)


# --------------------------------------------------------------------------- pixel budget and bombs

BOMBS = {"jpeg": ("bomb.jpg", jpeg_bomb, "13000 x 13000"), "png": ("bomb.png", png_bomb, "13000 x 13000"),
         "rle_dicom": ("bomb.dcm", rle_dicom_bomb, "65535 x 30000")}


@pytest.mark.parametrize("kind", list(BOMBS))
def test_bomb_refused_before_decode_with_small_rss(tmp_path: Path, kind: str) -> None:
    name, make, size = BOMBS[kind]
    (path := tmp_path / name).write_bytes(make())
    with pytest.raises(RefusedInputError, match=f"declared image size {size}"):
        load_image(path)
    with pytest.raises(RefusedInputError, match=f"declared image size {size}"):
        read_view(path)
    r = measure_load_rss(path)
    print(f"{kind} ({path.stat().st_size} bytes): {r}")
    assert r["outcome"].startswith("RefusedInputError") and r["delta_mb"] < BOMB_RSS_MB


def test_real_film_rss_proportional() -> None:
    r = measure_load_rss(chest_dicom("RG1_UNCR.dcm"))
    print(r)
    assert r["outcome"] == "accepted" and r["delta_mb"] < FILM_RSS_MB


def test_budget_is_configurable_and_names_the_size() -> None:
    film = chest_dicom("RG1_UNCR.dcm")  # 1841 x 1955 = 3.6 megapixels
    with pytest.raises(RefusedInputError, match=r"1841 x 1955 pixels = 3.6 megapixels exceeds the limit of 2 megapixels"):
        preprocess(film, 32, max_megapixels=2)
    with pytest.raises(RefusedInputError, match="limit of 2 megapixels"):
        load_study([film], 32, InputPolicy(max_megapixels=2))
    with pytest.raises(RefusedInputError, match="<ndarray>: declared image size 300 x 200 pixels x 3 samples"):
        preprocess(np.zeros((200, 300, 3), np.uint8), 32, max_megapixels=0.1)
    assert preprocess(film, 32, max_megapixels=4).shape == (3, 32, 32)
    for bad in (0, -1, float("nan"), "many"):
        with pytest.raises(ValueError):
            InputPolicy(max_megapixels=bad)


def test_pillow_limit_off_does_not_let_a_bomb_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    (path := tmp_path / "bomb.png").write_bytes(png_bomb())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # some libraries switch pillow's own check off
    with pytest.raises(RefusedInputError, match="13000 x 13000"):
        load_image(path)


def test_pillow_limit_still_refuses_above_a_raised_budget(tmp_path: Path) -> None:
    (path := tmp_path / "huge.png").write_bytes(png_bomb(20000, 20000))  # 400 MP: above pillow's 179 MP error
    with pytest.raises(RefusedInputError, match="decompression-bomb limit"):
        load_image(path, max_megapixels=1000)


def test_rle_data_too_short_for_its_header_refused(tmp_path: Path) -> None:
    (path := tmp_path / "rle.dcm").write_bytes(rle_dicom_bomb(2000, 2000))  # 4 MP: inside the budget
    with pytest.raises(ImageError, match="RLE pixel data of .* bytes cannot hold the declared 2000 x 2000"):
        load_image(path)


def test_codestream_larger_than_header_refused(tmp_path: Path) -> None:
    # A JPEG-baseline DICOM whose header says 16 x 16 but whose JPEG frame header says 13000 x 13000.
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((16, 16)), bits=8, **chest_elements())))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([set_jpeg_size(jpeg_bomb(), 13000, 13000)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path := tmp_path / "lying.dcm")
    with pytest.raises(RefusedInputError, match=r"\(codestream\): declared image size 13000 x 13000"):
        load_image(path)
    ds.PixelData = encapsulate([set_jpeg_size(jpeg_bomb(), 40, 40)])  # small, but still larger than 16 x 16
    ds.save_as(path)
    with pytest.raises(ImageError, match="codestream declares 40 x 40 pixels, the DICOM header 16 x 16"):
        load_image(path)


# --------------------------------------------------------------------------- fuzz corpus and fuzzing

def _corpus() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.is_file() and p.name != "README.md")


def test_corpus_present() -> None:
    files = _corpus()
    assert len(files) >= 20 and all(p.stat().st_size < 16_384 for p in files)


@pytest.mark.parametrize("path", _corpus() if CORPUS.is_dir() else [], ids=lambda p: p.name)
def test_corpus_file_accepted_finite_or_image_error(path: Path) -> None:
    from tests.runtime.image_inputs import run_case

    try:
        outcome = run_case(path)
    except ImageError as e:
        outcome = f"ImageError: {e}"
        assert "\n" not in str(e)
    print(outcome)


# --------------------------------------------------------------------------- emrrg-run

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emrrg.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("emrrg-run: error: "), (r.returncode, r.stderr)
    return lines[0]


def test_cli_refuses_before_loading_the_bundle(tmp_path: Path) -> None:
    # The bundle path does not exist: the error must be the gate's, so the gate ran first.
    line = _one_error_line(run_cli(tmp_path / "no-bundle", pydicom_data_dir() / "693_UNCR.dcm"))
    assert "modality CT" in line
    (bomb := tmp_path / "bomb.jpg").write_bytes(jpeg_bomb())
    assert "13000 x 13000" in _one_error_line(run_cli(tmp_path / "no-bundle", bomb))
    a = chest(tmp_path, "a.dcm", patient="PAT-A", SOPInstanceUID="1.2.3.1")
    b = chest(tmp_path, "b.dcm", patient="PAT-B", SOPInstanceUID="1.2.3.2")
    line = _one_error_line(run_cli(tmp_path / "no-bundle", a, b))
    assert "'PAT-A'" in line and "'PAT-B'" in line
    line = _one_error_line(run_cli(tmp_path / "no-bundle", _raw_ds_file(tmp_path / "inf.dcm", WindowWidth="inf")))
    assert "WindowWidth" in line
    line = _one_error_line(run_cli(tmp_path / "no-bundle", pydicom_data_dir() / "RG3_UNCR.dcm", "--strict-inputs"))
    assert "EXTREMITY" in line
    line = _one_error_line(run_cli(tmp_path / "no-bundle", chest_dicom("RG1_UNCR.dcm"), "--max-megapixels", "2"))
    assert "limit of 2 megapixels" in line
    r = run_cli(tmp_path / "no-bundle", chest_dicom("RG1_UNCR.dcm"), "--max-megapixels", "0")
    assert r.returncode == 2 and "max_megapixels must be > 0" in r.stderr


def test_cli_json_reports_inputs_and_allow_modality(tiny_bundle: Path) -> None:
    r = run_cli(tiny_bundle, chest_dicom("RG1_UNCR.dcm"), pydicom_data_dir() / "RG1_J2KR.dcm", "--json",
                "--beams", "1", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [v["view_position"] for v in out["inputs"]] == ["PA", "PA"]
    assert all(v["header_checks"]["modality"] == "pass" and v["header_checked"] for v in out["inputs"])
    r = run_cli(tiny_bundle, pydicom_data_dir() / "693_UNCR.dcm", "--allow-modality", "CT", "--allow-modality", "MR",
                "--json", "--beams", "1", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    (view,) = json.loads(r.stdout)["inputs"]
    assert view["modality"] == "CT" and view["header_checks"]["modality"] == "allowed"
    r = run_cli(tiny_bundle, pydicom_data_dir() / "RG3_UNCR.dcm", "--json", "--beams", "1", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert "emrrg-run: warning:" in r.stderr and "EXTREMITY" in r.stderr
    assert r.stderr.count("BodyPartExamined") == 1, "the warning is printed once"
    assert json.loads(r.stdout)["inputs"][0]["warnings"]
