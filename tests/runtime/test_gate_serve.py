"""emrrg-serve with the input gate: refusals are 422 with a one-line message, accepted studies report `inputs`.

A real server process on loopback (the Server helper of test_serve.py) started with `--allow-modality CT
--max-megapixels 8`, so the options' path from the command line to the gate is tested too.
"""
from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from emrrg.assets import chest_dicom, pneumonia_images, pydicom_data_dir
from tests.runtime.image_inputs import (
    chest_elements, dicom_bytes, jpeg_bomb, png_bomb, rle_dicom_bomb, set_jpeg_size, with_raw_ds,
)
from tests.runtime.test_serve import Server, assert_error, check_report, client  # noqa: F401  (client uses this module's server)

PATIENTS = ("GATE-PAT-Q7Z1", "GATE-PAT-X9W4")


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    srv = Server(tiny_bundle, tmp_path_factory.mktemp("serve-gate"), "--queue-size", "2", "--allow-modality", "CT",
                 "--max-megapixels", "8")
    yield srv
    srv.stop()


def post(client: httpx.Client, *files: tuple[str, bytes]) -> httpx.Response:
    return client.post("/v1/reports", params={"beams": 1, "max_new_tokens": 3},
                       files=[("views", (name, data, "application/octet-stream")) for name, data in files])


def _small_chest(patient: str, sop: str, **over) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 4096, (64, 64))
    return dicom_bytes(pixels, **chest_elements(patient=patient, SOPInstanceUID=sop, **over))


REFUSED = {  # case -> (files, error code, words in the detail)
    "mr": (lambda: [("mr.dcm", (pydicom_data_dir() / "MR2_UNCR.dcm").read_bytes())], "refused_input", "view 1: modality MR"),
    "us": (lambda: [("us.dcm", (pydicom_data_dir() / "US1_UNCR.dcm").read_bytes())], "refused_input", "modality US"),
    "nm-second-view": (lambda: [("a.dcm", chest_dicom().read_bytes()), ("nm.dcm", (pydicom_data_dir() / "JPEG-LL.dcm").read_bytes())],
                       "refused_input", "view 2: modality NM"),
    "jpeg-bomb": (lambda: [("b.jpg", jpeg_bomb())], "refused_input", "13000 x 13000"),
    "png-bomb": (lambda: [("b.png", png_bomb())], "refused_input", "13000 x 13000"),
    "rle-bomb": (lambda: [("b.dcm", rle_dicom_bomb())], "refused_input", "65535 x 30000"),
    "over-server-budget": (lambda: [("j.jpg", set_jpeg_size(pneumonia_images()[0].read_bytes(), 3000, 3000))],
                           "refused_input", "limit of 8 megapixels"),
    "window-inf": (lambda: [("w.dcm", with_raw_ds(_small_chest("P", "1.2.3.1"), WindowWidth="inf"))],
                   "undecodable_image", "WindowWidth"),
    "rescale-1e308": (lambda: [("s.dcm", with_raw_ds(_small_chest("P", "1.2.3.1"), RescaleSlope="1e308"))],
                      "undecodable_image", "RescaleSlope"),
    "multiframe": (lambda: [("mf.dcm", dicom_bytes(np.zeros((2, 16, 16)), **chest_elements()))], "refused_input",
                   "multi-frame"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_inputs_get_422(client, server, case):
    files, code, words = REFUSED[case]
    body = assert_error(post(client, *files()), 422, code)
    print(f"{case}: {body['detail']}")
    assert words in body["detail"] and "\n" not in body["detail"]
    assert "/tmp" not in body["detail"] and str(server.scratch) not in body["detail"]
    assert server.proc.poll() is None


def test_two_patients_422_without_patient_ids_in_answer_or_log(client, server):
    r = post(client, ("a.dcm", _small_chest(PATIENTS[0], "1.2.3.1")), ("b.dcm", _small_chest(PATIENTS[1], "1.2.3.2")))
    body = assert_error(r, 422, "refused_input")
    print(body["detail"])
    assert "view 1 and view 2 belong to different patients" in body["detail"]
    time.sleep(0.3)  # the access log line is written after the answer
    for pid in PATIENTS:
        assert pid not in r.text and pid not in server.log()


def test_allowed_ct_and_inputs_in_the_answer(client):
    out = check_report(post(client, ("ct.dcm", (pydicom_data_dir() / "693_UNCR.dcm").read_bytes())), views=1)
    assert out["inputs"][0]["modality"] == "CT" and out["inputs"][0]["header_checks"]["modality"] == "allowed"
    out = check_report(post(client, ("a.dcm", chest_dicom().read_bytes()), ("b.jpg", pneumonia_images()[0].read_bytes())),
                       views=2)
    a, b = out["inputs"]
    assert a["label"] == "view 1" and a["view_position"] == "PA" and a["header_checked"] is True
    assert a["header_checks"]["body_part"] == "pass"
    assert b["kind"] == "jpeg" and b["header_checked"] is False and "could not be checked" in b["note"]


def test_body_part_warning_in_the_answer(client, server):
    out = check_report(post(client, ("x.dcm", (pydicom_data_dir() / "RG3_UNCR.dcm").read_bytes())), views=1)
    (view,) = out["inputs"]
    assert view["header_checks"]["body_part"] == "warn" and "EXTREMITY" in view["warnings"][0]
    assert view["warnings"][0].startswith("view 1:")
    time.sleep(0.3)
    assert "EXTREMITY" not in server.log(), "DICOM values stay out of the log"


def test_openapi_documents_inputs(client):
    props = client.get("/openapi.json").json()["components"]["schemas"]["ReportResponse"]["properties"]
    assert "inputs" in props
