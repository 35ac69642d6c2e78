"""DICOM SR output (emrrg.runtime.sr): built with highdicom from real headers, checked by tools nobody here wrote.

Sources: the real adult chest film RG1_UNCR.dcm (PA) and a lateral view derived from it with pydicom (new
SOPInstanceUID, ViewPosition LL, same study). dicom3tools' `dciodvfy` and dcmtk's `dsrdump` (installed by
scripts/setup.sh through apt) validate the written files; their tests skip, saying why, only when the tool
is absent.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import EnhancedSRStorage

from emrrg import __version__
from emrrg.assets import chest_dicom, pneumonia_images
from tests.runtime.dicom_views import lateral_view
from emrrg.runtime.sr import DISCLAIMER, SRError, build_sr, read_headers, report_sections, sr_bytes, write_sr

REPORT = "Findings: The heart size is normal – no effusion. Impression: No acute cardiopulmonary process, café."
RESULT = {"report": REPORT, "backend": "ort-cpu", "bundle_sha256": "ab" * 32, "tokens": 31, "stop_reason": "eos",
          "decoding": {"num_beams": 3, "repetition_penalty": 1.3, "length_penalty": 2.0, "min_new_tokens": 24,
                       "max_new_tokens": 96}}
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                 "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID")
# dciodvfy warnings that are expected, each with the reason it is not ours to fix:
DCIODVFY_ALLOWED_WARNINGS = {
    # RG1's Referring Physician's Name is "ward", a one-component name; the SR copies it unchanged
    # (the patient and study modules are copied as they are, not corrected).
    "Referring Physician's Name  PN [1] = <ward> - Retired Person Name form",
}
# dsrdump warnings that are expected: dcmtk 3.6.7's VR checker cannot check UTF-8 values (it says so and
# reads the file anyway); the SR is UTF-8 because the generated text is Unicode.
DSRDUMP_ALLOWED_WARNINGS = {"W: The VR checker does not support this Specific Character Set: ISO_IR 192"}
TOOL_TIMEOUT_S = 60


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def frontal() -> Path:
    return chest_dicom("RG1_UNCR.dcm")


@pytest.fixture(scope="module")
def lateral(tmp_path_factory) -> Path:
    """RG1 as the study's lateral view: a new instance (new SOPInstanceUID, ViewPosition LL, instance 2)."""
    return lateral_view(tmp_path_factory.mktemp("lateral") / "lateral.dcm")


def content_items(ds, depth=0):
    """(depth, dataset) of every content item under ds, depth first."""
    for item in ds.get("ContentSequence", []):
        yield depth, item
        yield from content_items(item, depth + 1)


def name_of(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def texts(sr, meaning: str) -> list[str]:
    return [it.TextValue for _, it in content_items(sr) if it.ValueType == "TEXT" and name_of(it) == meaning]


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dicom3tools' IOD verifier on one file."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed; scripts/setup.sh installs it with apt")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    lines = (proc.stdout + proc.stderr).splitlines()
    print("\n".join(lines))
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def dsrdump(path: Path) -> tuple[str, list[str]]:
    """(the document as dcmtk's dsrdump prints it, long values in full; its E:/W: lines)."""
    if shutil.which("dsrdump") is None:
        pytest.skip("dsrdump (dcmtk) is not installed; scripts/setup.sh installs it with apt")
    proc = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, [x for x in proc.stderr.splitlines() if x[:2] in ("E:", "W:", "F:")]


def assert_valid(path: Path, report_text: str) -> None:
    errors, warnings = dciodvfy(path)
    assert errors == [], errors
    unexpected = [w for w in warnings if not any(a in w for a in DCIODVFY_ALLOWED_WARNINGS)]
    assert unexpected == [], unexpected
    out, msgs = dsrdump(path)
    print(out)
    assert [m for m in msgs if m not in DSRDUMP_ALLOWED_WARNINGS] == []
    assert "Enhanced SR Document" in out
    assert f'"{report_text}"' in out or report_text in out
    assert "Verification Flag   : UNVERIFIED" in out and "Preliminary Flag    : PRELIMINARY" in out


# --------------------------------------------------------------------------- the document

@pytest.fixture(scope="module")
def sr_file(frontal, lateral, tmp_path_factory):
    before = {p: sha256(p) for p in (frontal, lateral)}
    out = write_sr(tmp_path_factory.mktemp("sr") / "report.dcm", [frontal, lateral], RESULT)
    assert {p: sha256(p) for p in (frontal, lateral)} == before, "a source file changed"
    return out


def test_sr_header_copies_patient_and_study_and_is_a_new_unverified_instance(sr_file, frontal, lateral):
    sr = pydicom.dcmread(sr_file)
    src = [pydicom.dcmread(p, stop_before_pixels=True) for p in (frontal, lateral)]
    assert sr.SOPClassUID == EnhancedSRStorage and sr.Modality == "SR"
    assert sr.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    for key in PATIENT_STUDY:
        assert str(sr[key].value) == str(src[0][key].value), key
    assert sr.SOPInstanceUID not in {s.SOPInstanceUID for s in src}
    assert sr.SeriesInstanceUID not in {s.SeriesInstanceUID for s in src}
    assert (sr.VerificationFlag, sr.PreliminaryFlag, sr.CompletionFlag) == ("UNVERIFIED", "PRELIMINARY", "COMPLETE")
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    # every source instance is evidence of the current procedure, under its own series
    refs = {(s.ReferencedSOPClassUID, s.ReferencedSOPInstanceUID)
            for st in sr.CurrentRequestedProcedureEvidenceSequence for se in st.ReferencedSeriesSequence
            for s in se.ReferencedSOPSequence}
    assert refs == {(s.SOPClassUID, s.SOPInstanceUID) for s in src}
    assert sr.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == src[0].StudyInstanceUID


def test_sr_content_text_views_algorithm_and_disclaimer(sr_file, frontal, lateral):
    sr = pydicom.dcmread(sr_file)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    assert name_of(sr) == "Diagnostic Imaging Report"
    assert texts(sr, "Finding") == ["The heart size is normal – no effusion."]
    assert texts(sr, "Impression") == ["No acute cardiopulmonary process, café."]
    assert texts(sr, "Comment") == [DISCLAIMER]
    assert "radiologist" in DISCLAIMER and "machine" in DISCLAIMER
    assert texts(sr, "Algorithm Name") == ["EMRRG"] and texts(sr, "Algorithm Version") == [__version__]
    params = texts(sr, "Algorithm Parameters")
    assert f"bundle_sha256: {'ab' * 32}" in params and "backend: ort-cpu" in params
    for k, v in RESULT["decoding"].items():
        assert f"{k}: {v}" in params
    observer = {name_of(it): it for _, it in content_items(sr) if it.RelationshipType == "HAS OBS CONTEXT"}
    assert observer["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Device"
    assert observer["Device Observer Name"].TextValue == "EMRRG"
    # each text section is inferred from both images, each with its view as a CID 4010 code
    src = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: v for p, v in ((frontal, "PA"), (lateral, "LL"))}
    want = {"PA": ("272479007", "postero-anterior"), "LL": ("399173006", "left lateral")}
    images = [it for _, it in content_items(sr) if it.ValueType == "IMAGE"]
    assert len(images) == 4                                  # 2 sections x 2 views
    for it in images:
        uid = it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        view = it.ContentSequence[0]
        assert name_of(view) == "Image View" and view.RelationshipType == "HAS ACQ CONTEXT"
        code = view.ConceptCodeSequence[0]
        assert (code.CodeValue, code.CodeMeaning) == want[src[uid]]
    # highdicom reads its own output back as an SR document
    assert hd.sr.EnhancedSR.from_dataset(sr).content is not None


def test_sr_passes_dciodvfy_and_dsrdump(sr_file):
    assert_valid(sr_file, "The heart size is normal – no effusion.")


def test_cut_report_is_partial_and_text_without_headings_is_one_finding(frontal, tmp_path):
    res = {**RESULT, "report": "lungs are clear", "stop_reason": "max_new_tokens"}
    sr = pydicom.dcmread(write_sr(tmp_path / "cut.dcm", [frontal], res))
    assert sr.CompletionFlag == "PARTIAL" and "max_new_tokens (96" in sr.CompletionFlagDescription
    assert texts(sr, "Finding") == ["lungs are clear"] and texts(sr, "Impression") == []


def test_missing_type2_attributes_stay_empty_and_valid(frontal, tmp_path):
    """A source without AccessionNumber / ReferringPhysicianName / StudyID: empty in the SR, still 0 errors."""
    ds = pydicom.dcmread(frontal)
    for key in ("AccessionNumber", "ReferringPhysicianName", "StudyID"):
        delattr(ds, key)
    src = tmp_path / "bare.dcm"
    ds.save_as(src, enforce_file_format=True)
    out = write_sr(tmp_path / "bare-sr.dcm", [src], RESULT)
    sr = pydicom.dcmread(out)
    assert all(k in sr and not sr[k].value for k in ("AccessionNumber", "ReferringPhysicianName", "StudyID"))
    assert "AccessionNumber" not in pydicom.dcmread(src, stop_before_pixels=True)   # the source is untouched
    errors, _ = dciodvfy(out)
    assert errors == []


def test_headers_from_uploaded_bytes_equal_headers_from_files(frontal, lateral):
    from_files = read_headers([frontal, lateral])
    from_bytes = read_headers([frontal.read_bytes(), bytearray(lateral.read_bytes())])
    assert [d.SOPInstanceUID for d in from_bytes] == [d.SOPInstanceUID for d in from_files]
    assert "PixelData" not in from_bytes[0]                  # header only
    built = pydicom.dcmread(__import__("io").BytesIO(sr_bytes(build_sr(from_bytes, RESULT))))
    assert built.SOPClassUID == EnhancedSRStorage


# --------------------------------------------------------------------------- refusals

def test_png_source_is_refused_with_a_clear_error(frontal, tmp_path):
    png = pneumonia_images()[0]
    with pytest.raises(SRError, match=r"a (PNG|JPEG) image has no DICOM header.*give the DICOM files"):
        write_sr(tmp_path / "x.dcm", [frontal, png], RESULT)
    assert list(tmp_path.iterdir()) == []                  # nothing written, no temp file left


@pytest.mark.parametrize("change, message", [
    (dict(SOPInstanceUID="1.2.3.5", StudyInstanceUID="1.2.3.4"), "different study"),
    (dict(SOPInstanceUID="1.2.3.5", PatientID="someone-else"), "different patient"),
], ids=["other-study", "other-patient"])
def test_views_that_are_not_one_study_are_refused(frontal, tmp_path, change, message):
    ds = pydicom.dcmread(frontal, stop_before_pixels=True)
    for k, v in change.items():
        setattr(ds, k, v)
    with pytest.raises(SRError, match=message) as e:
        read_headers([frontal, ds])
    assert "someone-else" not in str(e.value) and "9RG1" not in str(e.value)   # no patient data in messages


def test_a_second_copy_of_one_instance_is_referenced_once(frontal, lateral):
    headers = read_headers([frontal, lateral, frontal])
    assert [h.ViewPosition for h in headers] == ["PA", "LL"]


def test_header_without_uids_and_non_dicom_are_refused(frontal, tmp_path):
    ds = pydicom.dcmread(frontal, stop_before_pixels=True)
    del ds.SOPInstanceUID
    with pytest.raises(SRError, match="has no SOPInstanceUID"):
        read_headers([ds])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(SRError, match="not a DICOM file"):
        read_headers([text])


def test_failed_build_leaves_an_existing_file_alone(frontal, tmp_path):
    out = tmp_path / "report.dcm"
    out.write_bytes(b"old")
    with pytest.raises(SRError, match="empty"):
        write_sr(out, [frontal], {**RESULT, "report": "  "})
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.dcm"]


def test_control_characters_from_the_model_do_not_reach_the_sr(frontal, tmp_path):
    out = write_sr(tmp_path / "ctl.dcm", [frontal], {**RESULT, "report": "lungs\x00 clear\x07\tok\x1b"})
    assert texts(pydicom.dcmread(out), "Finding") == ["lungs  clear  ok"]
    errors, _ = dciodvfy(out)
    assert errors == []


# --------------------------------------------------------------------------- emrrg-run --sr, end to end

def test_cli_writes_a_valid_sr_for_a_two_view_study(tiny_bundle, frontal, lateral, tmp_path, capsys):
    from emrrg.runtime.cli import run_main

    out_path = tmp_path / "study-sr.dcm"
    run_main([str(tiny_bundle), str(frontal), str(lateral), "--sr", str(out_path), "--json", "--beams", "1",
              "--max-new-tokens", "12", "--threads", "1"])
    captured = capsys.readouterr()
    res = __import__("json").loads(captured.out)
    assert res["sr"] == str(out_path) and f"wrote the DICOM SR {out_path}" in captured.err
    assert res["stop_reason"] in ("eos", "max_new_tokens") and res["decoding"]["num_beams"] == 1
    sr = pydicom.dcmread(out_path)
    findings, impression = report_sections(res["report"])
    assert findings and texts(sr, "Finding") == [findings] and texts(sr, "Impression") == ([impression] if impression else [])
    params = texts(sr, "Algorithm Parameters")
    assert f"bundle_sha256: {res['bundle_sha256']}" in params and f"backend: {res['backend']}" in params
    assert "max_new_tokens: 12" in params
    assert sr.CompletionFlag == ("COMPLETE" if res["stop_reason"] == "eos" else "PARTIAL")
    refs = {s.ReferencedSOPInstanceUID for st in sr.CurrentRequestedProcedureEvidenceSequence
            for se in st.ReferencedSeriesSequence for s in se.ReferencedSOPSequence}
    assert refs == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (frontal, lateral)}
    assert_valid(out_path, texts(sr, "Finding")[0])


def test_cli_refuses_sr_for_a_png_view_before_loading_the_model(tiny_bundle, frontal, tmp_path, capsys):
    from emrrg.runtime.cli import run_main

    out_path = tmp_path / "x.dcm"
    with pytest.raises(SystemExit) as e:
        run_main([str(tiny_bundle), str(frontal), str(pneumonia_images()[0]), "--sr", str(out_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no DICOM header" in err[0] and "give the DICOM files" in err[0], err
    assert not out_path.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as e:
        run_main([str(tiny_bundle), str(frontal), "--sr", str(tmp_path / "missing" / "x.dcm")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- emrrg-serve, Accept: application/dicom

@pytest.fixture(scope="module")
def sr_server(tiny_bundle, tmp_path_factory):
    from tests.runtime.test_serve import Server

    srv = Server(tiny_bundle, tmp_path_factory.mktemp("serve-sr"), "--max-new-tokens", "8", "--beams", "1")
    yield srv
    srv.stop()


def test_service_returns_an_sr_for_accept_application_dicom(sr_server, frontal, lateral, tmp_path):
    import httpx

    files = [("views", ("a.dcm", frontal.read_bytes(), "application/dicom")),
             ("views", ("b.dcm", lateral.read_bytes(), "application/dicom"))]
    r = httpx.post(sr_server.url + "/v1/reports", files=files, timeout=120,
                   headers={"Accept": "application/dicom, application/json;q=0.5"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom" and r.headers["cache-control"] == "no-store"
    path = tmp_path / "served.dcm"
    path.write_bytes(r.content)
    sr = pydicom.dcmread(path)
    assert sr.SOPClassUID == EnhancedSRStorage and r.headers["content-disposition"].endswith(f'"{sr.SOPInstanceUID}.dcm"')
    src = [pydicom.dcmread(p, stop_before_pixels=True) for p in (frontal, lateral)]
    assert sr.StudyInstanceUID == src[0].StudyInstanceUID and sr.PatientID == src[0].PatientID
    images = {it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for _, it in content_items(sr)
              if it.ValueType == "IMAGE"}
    assert images == {s.SOPInstanceUID for s in src}
    assert_valid(path, texts(sr, "Finding")[0])
    # the same upload without the Accept header is answered in JSON, as before
    r = httpx.post(sr_server.url + "/v1/reports", content=frontal.read_bytes(), timeout=120,
                   headers={"Content-Type": "application/dicom"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json" and r.json()["report"]


def test_service_answers_406_for_an_sr_of_a_png(sr_server):
    import httpx

    r = httpx.post(sr_server.url + "/v1/reports", content=pneumonia_images()[0].read_bytes(), timeout=60,
                   headers={"Content-Type": "image/png", "Accept": "application/dicom"})
    assert r.status_code == 406, r.text
    body = r.json()
    assert body["error"] == "not_acceptable" and "no DICOM header" in body["detail"]
    assert "application/json" in body["detail"]
