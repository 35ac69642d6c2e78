"""emrrg-scp end to end with real components: dcmtk's storescu sends, our SCP (a real process) reports, and a real
Orthanc PACS (Debian package `orthanc`, started on loopback with a temporary config and storage) receives the SR.

Every wait is bounded; only 127.0.0.1 is contacted. The tools come from scripts/setup.sh (apt); without them
these tests skip and say so.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, EnhancedSRStorage

from emrrg.assets import chest_dicom
from emrrg.runtime.scp import FAILED_NAME, SR_NAME, STATUS_REFUSED, parse_forward, ScpError, study_tag
from tests.runtime.dicom_views import derive_view, lateral_view

HOST = "127.0.0.1"
ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_START_S = 30.0       # Orthanc answers GET /system within ~4 s; a loaded CI machine gets more
SCP_START_S = 90.0           # loads the tiny bundle (seconds) before it listens
REPORT_WAIT_S = 180.0        # receive -> tiny-bundle report (8 tokens) -> SR -> C-STORE, on 2 shared cores
QUIET_S = 2.0                # the SCP's quiet period in these tests
PATIENT_STRINGS = ("CompressedSamples", "9RG1", "19400305", "someone-else")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def need(tool: str) -> str:
    path = shutil.which(tool) or (tool if os.path.exists(tool) else None)
    if path is None:
        pytest.skip(f"{tool} is not installed; scripts/setup.sh installs it with apt (dcmtk, orthanc)")
    return path


def wait_for(what: str, fn, timeout: float, step: float = 0.25):
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 1):
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_process(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; only this process, by its PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --------------------------------------------------------------------------- Orthanc

class Orthanc:
    def __init__(self, workdir: Path, emrrg_port: int):
        need(ORTHANC)
        self.http, self.dicom = free_port(), free_port()
        cfg = {"Name": "emrrg-test", "StorageDirectory": str(workdir / "storage"),
               "IndexDirectory": str(workdir / "index"), "HttpPort": self.http, "DicomPort": self.dicom,
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomAet": "ORTHANC",
               "DicomModalities": {"emrrg": ["EMRRG", HOST, emrrg_port]}, "Plugins": []}
        (workdir / "orthanc.json").write_text(json.dumps(cfg))
        self.log = open(workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([ORTHANC, str(workdir / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("Orthanc's GET /system", lambda: self.proc.poll() is None and self._up(), ORTHANC_START_S)

    def _up(self) -> bool:
        try:
            return self.get("/system")["DicomAet"] == "ORTHANC"
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://{HOST}:{self.http}{path}", timeout=10) as r:
            return json.loads(r.read())

    def study_instances(self, study_uid: str) -> list[dict]:
        """Orthanc's instances (simplified tags) under the study with this StudyInstanceUID."""
        for sid in self.get("/studies"):
            study = self.get(f"/studies/{sid}")
            if study["MainDicomTags"].get("StudyInstanceUID") == study_uid:
                return [self.get(f"/instances/{i['ID']}/simplified-tags") for i in self.get(f"/studies/{sid}/instances")]
        return []

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


# --------------------------------------------------------------------------- our SCP

class Scp:
    def __init__(self, bundle: Path, out: Path, port: int | None = None, *extra: str):
        self.port, self.out = port or free_port(), out
        self.log_path = out.parent / f"{out.name}-scp.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emrrg.runtime.scp", str(bundle), "--ae-title", "EMRRG", "--host", HOST,
             "--port", str(self.port), "--out", str(out), "--threads", "1", "--beams", "1", "--max-new-tokens", "8",
             *extra], stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        def listening():
            assert self.proc.poll() is None, f"the SCP exited ({self.proc.returncode}):\n{self.log()[-3000:]}"
            return "listening on" in self.log()
        wait_for("the SCP to listen", listening, SCP_START_S)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self, study_uid: str) -> dict:
        try:
            return json.loads((self.out / "studies" / study_uid / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_finished(self, study_uid: str, instances: int) -> dict:
        def finished():
            st = self.status(study_uid)
            return st if st.get("state") in ("done", "failed") and st.get("instances") == instances else None
        return wait_for(f"{study_tag(study_uid)} to be reported", finished, REPORT_WAIT_S)

    def stop(self) -> int:
        stop_process(self.proc)
        self._log.close()
        return self.proc.returncode


def storescu(port: int, *files: Path) -> subprocess.CompletedProcess:
    """dcmtk's storescu: all files in ONE association, calling AE CONSOLE, called AE EMRRG."""
    return subprocess.run([need("storescu"), "-aet", "CONSOLE", "-aec", "EMRRG", HOST, str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def c_store(port: int, path: Path, release: bool = True):
    """pynetdicom as the sender, for the DIMSE status and Error Comment; returns (status dataset, association)."""
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title="CONSOLE")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(HOST, port, ae_title="EMRRG")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    if release:
        assoc.release()
    return status, assoc


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    mixed = derive_view(d / "mixed-a.dcm", new_study=True)
    return {"frontal": chest_dicom("RG1_UNCR.dcm"), "lateral": lateral_view(d / "lateral.dcm"),
            "ct": derive_view(d / "ct.dcm", new_study=True, Modality="CT", SOPClassUID=CTImageStorage),
            "mixed_a": mixed, "mixed_b": derive_view(d / "mixed-b.dcm", PatientID="someone-else",
                                                     StudyInstanceUID=uid_of(mixed))}


@pytest.fixture(scope="module")
def pacs(tiny_bundle, tmp_path_factory):
    """Orthanc on loopback, and our SCP forwarding to it."""
    need(ORTHANC)
    need("storescu")
    work = tmp_path_factory.mktemp("pacs")
    scp_port = free_port()
    orthanc = Orthanc(work, scp_port)
    try:
        scp = Scp(tiny_bundle, work / "out", scp_port, "--forward", f"{HOST}:{orthanc.dicom}:ORTHANC",
                  "--quiet-period", str(QUIET_S))
    except BaseException:
        orthanc.stop()
        raise
    yield scp, orthanc
    scp.stop()
    orthanc.stop()


def uid_of(path: Path, key: str = "StudyInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True)[key].value)


# --------------------------------------------------------------------------- tests

def test_storescu_study_reaches_orthanc_as_an_sr_under_the_right_study(pacs, views):
    scp, orthanc = pacs
    sent = storescu(scp.port, views["frontal"], views["lateral"])
    assert sent.returncode == 0, sent.stderr
    study = uid_of(views["frontal"])
    st = scp.wait_finished(study, 2)
    assert st["state"] == "done" and st["forwarded"] == "ok", st
    images = sorted(p.name for p in (scp.out / "studies" / study / "images").iterdir())
    assert images == sorted(f"{uid_of(views[v], 'SOPInstanceUID')}.dcm" for v in ("frontal", "lateral"))
    # every received instance is on disk byte for byte as sent
    for v in ("frontal", "lateral"):
        kept = scp.out / "studies" / study / "images" / f"{uid_of(views[v], 'SOPInstanceUID')}.dcm"
        assert pydicom.dcmread(kept).PixelData == pydicom.dcmread(views[v]).PixelData
    sr_file = scp.out / "studies" / study / SR_NAME
    sr = pydicom.dcmread(sr_file)
    assert sr.SOPInstanceUID == st["sr_sop_instance_uid"] and sr.StudyInstanceUID == study

    def sr_in_orthanc():
        return [i for i in orthanc.study_instances(study) if i.get("SOPInstanceUID") == sr.SOPInstanceUID]
    found = wait_for("the SR in Orthanc", sr_in_orthanc, 30)
    assert found[0]["SOPClassUID"] == EnhancedSRStorage and found[0]["Modality"] == "SR"
    assert found[0]["PatientID"] == sr.PatientID and found[0]["StudyInstanceUID"] == study
    print(f"Orthanc: SR {sr.SOPInstanceUID} under study {study} ({len(orthanc.get('/instances'))} instances stored)")


def test_a_ct_is_refused_with_a_failure_status_and_a_reason(pacs, views):
    scp, _ = pacs
    status, _ = c_store(scp.port, views["ct"])
    assert status.Status == STATUS_REFUSED
    assert "modality CT" in status.ErrorComment and len(status.ErrorComment) <= 64
    study = uid_of(views["ct"])
    assert not (scp.out / "studies" / study).exists()
    line = [x for x in scp.log().splitlines() if "refused" in x][-1]
    assert "modality CT" in line and not any(s in line for s in PATIENT_STRINGS)


def test_two_studies_in_one_association_give_two_srs(pacs, views, tmp_path):
    scp, orthanc = pacs
    first, second = (derive_view(tmp_path / f"study{i}.dcm", new_study=True) for i in (1, 2))
    sent = storescu(scp.port, first, second)
    assert sent.returncode == 0, sent.stderr
    srs = []
    for path in (first, second):
        study = uid_of(path)
        st = scp.wait_finished(study, 1)
        assert st["state"] == "done" and st["forwarded"] == "ok", st
        srs.append(st["sr_sop_instance_uid"])
        assert wait_for("the SR in Orthanc", lambda: [i for i in orthanc.study_instances(study)
                                                     if i.get("SOPInstanceUID") == st["sr_sop_instance_uid"]], 30)
    assert len(set(srs)) == 2


def test_a_study_the_model_refuses_keeps_its_images_and_says_why(pacs, views):
    """Two instances of one study naming two patients pass one by one, and fail as a study: no SR, the images
    stay, FAILED.txt gives the reason, the log names the study only by its hash."""
    scp, _ = pacs
    study = uid_of(views["mixed_a"])
    sent = storescu(scp.port, views["mixed_a"], views["mixed_b"])
    assert sent.returncode == 0, sent.stderr
    st = scp.wait_finished(study, 2)
    assert st["state"] == "failed" and "different patients" in st["reason"], st
    folder = scp.out / "studies" / study
    assert len(list((folder / "images").glob("*.dcm"))) == 2
    assert "different patients" in (folder / FAILED_NAME).read_text()
    line = [x for x in scp.log().splitlines() if study_tag(study) in x and "failed" in x][-1]
    assert not any(s in line for s in PATIENT_STRINGS), line


def test_killed_mid_study_and_restarted_loses_no_instance(tiny_bundle, views, tmp_path):
    """The SCP is SIGKILLed while an association is still open (quiet period 600 s: nothing reported yet); the
    acknowledged instance is on disk, and the restarted SCP reports the study."""
    out = tmp_path / "out"
    scp = Scp(tiny_bundle, out, None, "--quiet-period", "600")
    try:
        status, assoc = c_store(scp.port, views["frontal"], release=False)
        assert status.Status == 0x0000
        scp.proc.kill()
        scp.proc.wait(timeout=30)
        assoc.abort()
    finally:
        scp.stop()
    study = uid_of(views["frontal"])
    kept = out / "studies" / study / "images" / f"{uid_of(views['frontal'], 'SOPInstanceUID')}.dcm"
    assert kept.read_bytes()[128:132] == b"DICM" and not (out / "studies" / study / "status.json").exists()
    restarted = Scp(tiny_bundle, out, None, "--quiet-period", str(QUIET_S))
    try:
        st = restarted.wait_finished(study, 1)
        assert st["state"] == "done" and (out / "studies" / study / SR_NAME).exists()
        assert "unfinished at start" in restarted.log()
    finally:
        assert restarted.stop() == 0                  # SIGTERM: a clean stop


@pytest.mark.parametrize("text", ["nohost", "h:0:AET", "h:99999:AET", "h:11112:", "h:x:AET",
                                  "h:104:WAY_TOO_LONG_AE_TITLE"])
def test_forward_must_be_host_port_aet(text):
    with pytest.raises(ScpError, match="--forward"):
        parse_forward(text)
    assert parse_forward("127.0.0.1:4242:ORTHANC") == ("127.0.0.1", 4242, "ORTHANC")
