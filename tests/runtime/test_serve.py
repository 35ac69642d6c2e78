"""emrrg-serve as a real server process on loopback, serving the tiny bundle.

One server (queue size 2, 8 MiB request cap, its own $TMPDIR and log file) serves most tests; the
shutdown and load-failure tests start their own. Every wait is bounded in count and time, and only
127.0.0.1 is ever contacted.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from emrrg.assets import chest_dicom, pneumonia_images
from emrrg.runtime.report_runtime import Runtime
from emrrg.runtime.serve import serve_main, warn_if_exposed

HOST = "127.0.0.1"
QUEUE_SIZE = 2
MAX_MB = 8                       # RG1_UNCR.dcm (7.2 MB) fits; 9 MB does not
STARTUP_TIMEOUT_S = 90.0
# RSS over a window of 200 requests, measured after a 200-request warm-up, may grow by at most this much.
# Per request the server allocates ~10 MB transient (a 1.4k x 1.8k float32 image, the body, ORT buffers);
# a leak of even one image per request would add 2 GB, of 100 kB per request 20 MB, in every window. The
# warm-up takes up the allocator's settling (glibc arenas, pydantic/ORT caches), which on a loaded machine
# alone reached 29 MB over the first 200 requests; the bound leaves room for noise, not per-request growth.
RSS_GROWTH_BOUND_MB = 25.0
PHI = {"PatientName": "Qzxvorth^Wombatsson", "PatientID": "PID-QZ-8675309", "PatientBirthDate": "19010203",
       "OtherPatientIDs": "OPID-77Q1-XK", "InstitutionName": "Kestrelwood Infirmary",
       "AccessionNumber": "ACCQ77Z19", "ReferringPhysicianName": "Drumblewick^Ysolde"}
PHI_STRINGS = ["Qzxvorth", "Wombatsson", "PID-QZ-8675309", "19010203", "OPID-77Q1-XK", "Kestrelwood",
               "ACCQ77Z19", "Drumblewick", "Ysolde"]


# --------------------------------------------------------------------------- server process

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`env` adds environment variables; `ca` (a CA / self-signed certificate file) makes it an HTTPS server
    whose certificate is verified against that file."""

    def __init__(self, bundle: Path, workdir: Path, *extra: str, env: dict | None = None, ca: Path | None = None):
        self.workdir = workdir
        self.verify = ssl.create_default_context(cafile=str(ca)) if ca else True
        self.scratch = workdir / "scratch"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "server.log"
        env = {**os.environ, "TMPDIR": str(self.scratch), "PYTHONUNBUFFERED": "1", **(env or {})}
        for attempt in range(3):  # the free port may be taken between probing and binding
            self.port = free_port()
            self.url = f"{'https' if ca else 'http'}://{HOST}:{self.port}"
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "emrrg.runtime.serve", str(bundle), "--host", HOST, "--port", str(self.port),
                 "--threads", "1", *extra], stdout=self._log, stderr=subprocess.STDOUT, env=env)
            if self._wait_ready():
                return
            self.stop()
            if "address already in use" not in self.log().lower():
                break
        raise AssertionError(f"server did not become ready:\n{self.log()[-3000:]}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for _ in range(int(STARTUP_TIMEOUT_S / 0.1)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            try:
                h = httpx.get(self.url + "/healthz", timeout=2.0, verify=self.verify).json()
                if h["model_loaded"]:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        raise AssertionError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    srv = Server(tiny_bundle, tmp_path_factory.mktemp("serve"), "--queue-size", str(QUEUE_SIZE),
                 "--max-request-mb", str(MAX_MB))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):   # also imported by the other service tests, each with its own `server`
    with httpx.Client(base_url=server.url, timeout=60.0, verify=server.verify) as c:
        yield c


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    return Runtime.from_pretrained(tiny_bundle)


def dicom_bytes() -> bytes:
    return chest_dicom().read_bytes()


def jpeg_path() -> Path:
    return pneumonia_images()[0]


def phi_dicom(pixels: bool = True) -> bytes:
    ds = pydicom.dcmread(chest_dicom())
    for k, v in PHI.items():
        setattr(ds, k, v)
    if not pixels:  # a non-image object (as a structured report) that still carries the patient module
        for k in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                  "SamplesPerPixel", "PhotometricInterpretation"):
            if k in ds:
                delattr(ds, k)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    buf = io.BytesIO()
    ds.save_as(buf)
    data = buf.getvalue()
    assert b"Wombatsson" in data
    return data


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail", "request_id"}, body
    assert body["detail"] and body["request_id"] == r.headers["x-request-id"]
    if code:
        assert body["error"] == code, body
    return body


REPORT_FIELDS = {"request_id", "report", "tokens", "backend", "bundle_sha256", "timings_ms", "peak_rss_mb",
                 "queue_wait_ms", "views", "inputs"}


def check_report(r: httpx.Response, views: int) -> dict:
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == REPORT_FIELDS
    assert set(out["timings_ms"]) == {"preprocess", "encoder", "prefill", "decode", "total"}
    assert all(v >= 0 for v in out["timings_ms"].values())
    assert out["views"] == views and out["backend"] in ("ort-cpu", "ort-cpu-pure")
    assert len(out["inputs"]) == views and all(set(v) >= {"kind", "header_checked", "header_checks"} for v in out["inputs"])
    assert len(out["bundle_sha256"]) == 64 and out["peak_rss_mb"] > 0 and out["queue_wait_ms"] >= 0
    assert out["request_id"] == r.headers["x-request-id"]
    assert r.headers["cache-control"] == "no-store"
    return out


# --------------------------------------------------------------------------- good requests

def test_raw_dicom_report_equals_runtime(client, runtime):
    r = client.post("/v1/reports", params={"beams": 1, "max_new_tokens": 12}, content=dicom_bytes(),
                    headers={"Content-Type": "application/dicom"})
    out = check_report(r, views=1)
    ref = runtime.generate([str(chest_dicom())], num_beams=1, max_new_tokens=12)
    assert out["tokens"] == ref["tokens"] == 12
    assert out["report"] == ref["report"] and out["bundle_sha256"] == ref["bundle_sha256"]


def test_raw_jpeg_report(client, runtime):
    r = client.post("/v1/reports", params={"beams": 2, "max_new_tokens": 12}, content=jpeg_path().read_bytes(),
                    headers={"Content-Type": "image/jpeg"})
    out = check_report(r, views=1)
    assert out["report"] == runtime.generate([str(jpeg_path())], num_beams=2, max_new_tokens=12)["report"]


def test_multipart_two_views(client, runtime):
    files = [("views", ("frontal.dcm", dicom_bytes(), "application/dicom")),
             ("views", ("lateral.jpeg", jpeg_path().read_bytes(), "image/jpeg"))]
    r = client.post("/v1/reports", params={"beams": 3, "max_new_tokens": 12}, files=files,
                    data={"note": "extra form fields are ignored"})
    out = check_report(r, views=2)
    ref = runtime.generate([str(chest_dicom()), str(jpeg_path())], num_beams=3, max_new_tokens=12)
    assert out["report"] == ref["report"] and out["tokens"] == ref["tokens"]


def test_healthz_and_model(client, runtime):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["model_loaded"] is True and h["state"] == "ready"
    assert h["queue"]["capacity"] == QUEUE_SIZE + 1 and h["queue"]["queue_size"] == QUEUE_SIZE
    m = client.get("/v1/model")
    assert m.status_code == 200
    want = runtime.summary()
    got = m.json()
    assert got["bundle_sha256"] == want["bundle_sha256"] and set(got["artifacts"]) == set(want["artifacts"])
    assert got["generation"] == want["generation"]


def test_openapi_lists_routes(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert "post" in paths["/v1/reports"] and "get" in paths["/healthz"] and "get" in paths["/v1/model"]
    post = paths["/v1/reports"]["post"]
    assert {"application/dicom", "image/png", "image/jpeg", "application/octet-stream",
            "multipart/form-data"} <= set(post["requestBody"]["content"])
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ReportResponse")
    assert {"413", "415", "422", "503"} <= set(post["responses"])
    assert "Retry-After" in post["responses"]["503"]["headers"]
    props = spec["components"]["schemas"]["ReportResponse"]["properties"]
    assert {"report", "tokens", "backend", "bundle_sha256", "timings_ms", "peak_rss_mb", "request_id",
            "queue_wait_ms"} <= set(props)
    assert {p["name"] for p in post["parameters"]} == {"beams", "max_new_tokens", "stream"}


# --------------------------------------------------------------------------- bad requests

def _chunks(total: int, size: int = 1 << 16):
    sent = 0
    while sent < total:  # bounded: total / size iterations
        n = min(size, total - sent)
        sent += n
        yield b"\0" * n


BAD = {
    # id: (request kwargs, status, error code)
    "text-plain": (dict(content=b"Findings: none.\n" * 50, headers={"Content-Type": "text/plain"}), 415,
                   "unsupported_media_type"),
    "text-as-octet-stream": (dict(content=b"just some text\n" * 50, headers={"Content-Type": "application/octet-stream"}),
                             415, "unsupported_media_type"),
    "text-part": (dict(files=[("views", ("notes.txt", b"hello\n", "text/plain"))]), 415, "unsupported_media_type"),
    "random-bytes": (dict(content=np.random.default_rng(7).integers(16, 256, 4096, dtype=np.uint8).tobytes(),
                          headers={"Content-Type": "application/octet-stream"}), 415, "unsupported_media_type"),
    "random-second-view": (dict(files=[("views", ("a.jpeg", jpeg_path().read_bytes(), "image/jpeg")),
                                       ("views", ("b.bin", bytes(range(16, 256)) * 8, "application/octet-stream"))]),
                           415, "unsupported_media_type"),
    "dicom-cut-in-header": (dict(content=dicom_bytes()[:600], headers={"Content-Type": "application/dicom"}), 422,
                            "undecodable_image"),
    "dicom-cut-in-pixels": (dict(content=dicom_bytes()[:3_000_000], headers={"Content-Type": "application/dicom"}),
                            422, "undecodable_image"),
    "dicom-without-pixels": (dict(content=phi_dicom(pixels=False), headers={"Content-Type": "application/dicom"}),
                             422, "undecodable_image"),
    "jpeg-cut": (dict(content=jpeg_path().read_bytes()[:20_000], headers={"Content-Type": "image/jpeg"}), 422,
                 "undecodable_image"),
    "empty-body": (dict(content=b"", headers={"Content-Type": "application/dicom"}), 400, "empty_body"),
    "empty-view": (dict(files=[("views", ("a.dcm", b"", "application/dicom"))]), 400, "empty_view"),
    "no-views-part": (dict(files=[("image", ("a.jpeg", b"\xff\xd8\xff", "image/jpeg"))]), 400, "no_views"),
    "multipart-cut": (dict(content=b"--XyZ\r\nContent-Disposition: form-data; name=\"views\"; filename=\"a\"\r\n\r\nabc",
                           headers={"Content-Type": "multipart/form-data; boundary=XyZ"}), 400, "bad_multipart"),
    "oversize-content-length": (dict(content=b"\0" * ((MAX_MB << 20) + 1), headers={"Content-Type": "application/dicom"}),
                                413, "payload_too_large"),
    "oversize-chunked": (dict(content=_chunks((MAX_MB + 1) << 20), headers={"Content-Type": "application/dicom"}),
                         413, "payload_too_large"),
    "beams-zero": (dict(params={"beams": 0}, content=b"x"), 422, "bad_parameter"),
    "beams-over-bundle-limit": (dict(params={"beams": 9}, content=b"x"), 422, "bad_parameter"),
    "max-new-tokens-not-int": (dict(params={"max_new_tokens": "many"}, content=b"x"), 422, "bad_parameter"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_upload_gets_4xx_with_message(client, server, case):
    kwargs, status, code = BAD[case]
    if case == "oversize-chunked":
        kwargs = dict(kwargs, content=_chunks((MAX_MB + 1) << 20))  # a generator is used up once
    r = client.post("/v1/reports", **kwargs)
    body = assert_error(r, status, code)
    print(f"{case}: {status} {body['detail']}")
    if code in ("unsupported_media_type", "undecodable_image"):  # names the upload / view, never a path
        assert body["detail"].startswith("view 2:" if case == "random-second-view" else
                                         "view 1:" if "files" in kwargs else "upload:"), body["detail"]
    assert "/tmp" not in body["detail"] and str(server.scratch) not in body["detail"]
    assert server.proc.poll() is None


def test_oversize_rejected_by_header_before_the_body(server):
    # Only the headers go out: the 413 must come from Content-Length alone.
    conn = http.client.HTTPConnection(HOST, server.port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/reports")
        conn.putheader("Content-Type", "application/dicom")
        conn.putheader("Content-Length", str(10 << 30))
        conn.endheaders()
        r = conn.getresponse()
        body = json.loads(r.read())
    finally:
        conn.close()
    assert r.status == 413 and body["error"] == "payload_too_large" and "MB" in body["detail"]


def test_server_still_serves_after_bad_uploads(client):
    assert client.get("/healthz").json()["model_loaded"]
    r = client.post("/v1/reports", params={"beams": 1, "max_new_tokens": 2}, content=jpeg_path().read_bytes(),
                    headers={"Content-Type": "image/jpeg"})
    check_report(r, views=1)


# --------------------------------------------------------------------------- queue

def test_queue_full_gets_503_with_retry_after(server):
    n = 4 * QUEUE_SIZE
    body = jpeg_path().read_bytes()
    barrier = threading.Barrier(n, timeout=30)
    results: list = [None] * n

    def post(i: int) -> None:
        # http.client on a connection opened before the barrier: the posts leave within a few ms of
        # each other, while each admitted one keeps the model busy (3 beams x 60 tokens + decoding).
        conn = http.client.HTTPConnection(HOST, server.port, timeout=120)
        try:
            conn.connect()
            barrier.wait()
            conn.request("POST", "/v1/reports?beams=3&max_new_tokens=60", body=body,
                         headers={"Content-Type": "image/jpeg"})
            r = conn.getresponse()
            results[i] = httpx.Response(r.status, headers=r.getheaders(), content=r.read())
        except Exception as e:  # recorded, asserted below
            results[i] = e
        finally:
            conn.close()

    threads = [threading.Thread(target=post, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads)
    assert all(isinstance(r, httpx.Response) for r in results), results
    codes = sorted(r.status_code for r in results)
    print("statuses:", codes, "retry-after:", [r.headers.get("retry-after") for r in results if r.status_code == 503])
    assert set(codes) <= {200, 503}
    ok = [r for r in results if r.status_code == 200]
    busy = [r for r in results if r.status_code == 503]
    assert ok and busy
    for r in ok:
        check_report(r, views=1)
    for r in busy:
        assert_error(r, 503, "queue_full")
        assert int(r.headers["retry-after"]) >= 1


def test_request_abandoned_while_queued_is_skipped(server):
    # Two long jobs hold the model (one running, one waiting); B gives up while waiting behind them. B's
    # generation must never run: its log line says 499 (client gone) with no tokens. Two jobs, not one: the
    # built decoder writes 8 x 400 tiny-model tokens in ~0.3 s, about B's patience.
    body = jpeg_path().read_bytes()
    before = server.log().count("status=499")
    out: list = []

    def long_job():
        out.append(httpx.post(server.url + "/v1/reports", params={"beams": 8, "max_new_tokens": 400}, content=body,
                              headers={"Content-Type": "image/jpeg"}, timeout=120))

    jobs = [threading.Thread(target=long_job, daemon=True) for _ in range(2)]
    for j in jobs:
        j.start()
    deadline = time.monotonic() + 20
    for _ in range(2000):  # until one runs and the other waits
        q = httpx.get(server.url + "/healthz", timeout=5).json()["queue"]
        if time.monotonic() > deadline or (q["running"] and q["waiting"] >= 1):
            break
        time.sleep(0.005)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/reports", params={"beams": 8, "max_new_tokens": 400}, content=body,
                   headers={"Content-Type": "image/jpeg"}, timeout=0.3)
    for j in jobs:
        j.join(timeout=120)
    assert len(out) == 2 and all(r.status_code == 200 for r in out)
    for _ in range(50):  # B's line is written once the long jobs have ended and B's job was skipped
        lines = [ln for ln in server.log().splitlines() if "status=499" in ln]
        if len(lines) > before:
            break
        time.sleep(0.1)
    assert len(lines) == before + 1 and "tokens=" not in lines[-1] and "error=client_gone" in lines[-1], \
        server.log()[-3000:]


# --------------------------------------------------------------------------- privacy

def test_patient_data_never_logged_or_returned(client, server):
    data = phi_dicom()
    phi_name = "Wombatsson_Qzxvorth_PID-QZ-8675309.dcm"
    answers = [
        client.post("/v1/reports", params={"beams": 1, "max_new_tokens": 4}, content=data,
                    headers={"Content-Type": "application/dicom"}),
        client.post("/v1/reports", params={"beams": 1, "max_new_tokens": 4},
                    files=[("views", (phi_name, data, "application/dicom")),
                           ("views", ("Kestrelwood.jpeg", jpeg_path().read_bytes(), "image/jpeg"))]),
        client.post("/v1/reports", content=data[:4096], headers={"Content-Type": "application/dicom"}),  # header only
        client.post("/v1/reports", files=[("views", (phi_name, data[: len(data) // 2], "application/dicom"))]),
        client.post("/v1/reports", files=[("views", (phi_name, phi_dicom(pixels=False), "application/dicom"))]),
        client.post("/v1/reports", files=[("views", (phi_name, b"Qzxvorth Wombatsson PID-QZ-8675309", "text/plain"))]),
    ]
    assert [r.status_code for r in answers] == [200, 200, 422, 422, 422, 415]
    time.sleep(0.3)  # the log line is written after the response is sent
    log = server.log()
    for r in answers:
        text = r.text + json.dumps(dict(r.headers))
        for s in PHI_STRINGS:
            assert s.lower() not in text.lower(), (s, text)
        rid = r.headers["x-request-id"]
        lines = [ln for ln in log.splitlines() if f"id={rid} " in ln]
        assert len(lines) == 1 and f"status={r.status_code}" in lines[0], lines  # one line per request
    for s in PHI_STRINGS:
        assert s.lower() not in log.lower(), f"{s!r} appears in the server log"


# --------------------------------------------------------------------------- memory

def test_rss_does_not_grow_over_200_requests(client, server):
    jpeg = jpeg_path().read_bytes()

    def one(i: int) -> None:
        if i % 10 == 9:  # error paths must not leak either
            assert client.post("/v1/reports", content=jpeg[:20_000], headers={"Content-Type": "image/jpeg"}).status_code == 422
            return
        r = client.post("/v1/reports", params={"beams": 1, "max_new_tokens": 2}, content=jpeg,
                        headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text

    start = server.rss_mb()
    for i in range(200):
        one(i)
    before = server.rss_mb()
    t0 = time.monotonic()
    for i in range(200):
        one(i)
    after = server.rss_mb()
    print(f"RSS {start:.1f} MB -> {before:.1f} MB over a 200-request warm-up, -> {after:.1f} MB over 200 more "
          f"({time.monotonic() - t0:.1f} s)")
    assert after - before < RSS_GROWTH_BOUND_MB


def test_uploads_never_touch_disk(server):
    # uploads are decoded from memory (preprocess.ImageBytes): after every test above, the server's $TMPDIR is
    # still empty (hidden files aside: this machine's own tooling may leave a session marker in $TMPDIR), and no
    # file the server holds open lies there or in /dev/shm
    assert [p.name for p in server.scratch.iterdir() if not p.name.startswith(".")] == []
    fds = Path(f"/proc/{server.proc.pid}/fd")
    held = [os.readlink(fd) for fd in fds.iterdir() if os.path.exists(fd)]
    assert not [h for h in held if h.startswith(("/dev/shm", str(server.scratch)))], held


# --------------------------------------------------------------------------- life cycle

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown_finishes_requests(tiny_bundle, tmp_path, sig):
    srv = Server(tiny_bundle, tmp_path, "--queue-size", "2")
    try:
        results: list = []

        def post() -> None:
            try:
                results.append(httpx.post(srv.url + "/v1/reports", params={"beams": 3, "max_new_tokens": 100},
                                          content=jpeg_path().read_bytes(), headers={"Content-Type": "image/jpeg"},
                                          timeout=60.0))
            except Exception as e:
                results.append(e)

        threads = [threading.Thread(target=post, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        for _ in range(400):  # until both are admitted (one running, one waiting)
            if time.monotonic() > deadline or httpx.get(srv.url + "/healthz", timeout=5).json()["queue"]["active"] >= 2:
                break
            time.sleep(0.02)
        srv.proc.send_signal(sig)
        for t in threads:
            t.join(timeout=60)
        rc = srv.proc.wait(timeout=30)
    finally:
        srv.stop()
    assert [getattr(r, "status_code", r) for r in results] == [200, 200]
    assert rc == 0
    log = srv.log()
    assert "stopped" in log and f"exited after {sig.name}" in log


def test_bad_bundle_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "emrrg.runtime.serve", str(tmp_path / "missing"),
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such bundle directory" in proc.stderr


def test_corrupt_bundle_stops_server_with_2(tiny_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    p = bundle / "embed_tokens.npy"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "emrrg.runtime.serve", str(bundle), "--port", str(port)],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sha256 mismatch" in proc.stderr and "could not be loaded" in proc.stderr


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        serve_main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for want in ("--host", "(default: 127.0.0.1)", "(default: 8080)", "(default: auto)", "--queue-size",
                 "(default: 4)", "(default: 64.0)", "--beams", "--max-new-tokens", "--threads"):
        assert want in " ".join(out.split()), want


def test_warns_loudly_unless_loopback(caplog):
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert warn_if_exposed(host) is False
    with caplog.at_level("WARNING", logger="emrrg.serve"):
        assert warn_if_exposed("0.0.0.0") is True
        assert warn_if_exposed("192.168.1.20") is True
    assert "NO authentication" in caplog.text and "ALL network interfaces" in caplog.text
