"""emrrg-serve with an API key and TLS, as a real server process on loopback.

The server gets its key from $EMRRG_API_KEY and serves HTTPS with a self-signed certificate that the test
makes with the openssl command (a P-256 key, subjectAltName IP:127.0.0.1); the clients verify the server
against that certificate. Every request but /healthz and the API description needs the key.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from emrrg.assets import chest_dicom
from tests.runtime.test_serve import Server, assert_error, check_report, client, dicom_bytes, free_port  # noqa: F401

KEY = "k3y-Z9q-8675309-emrrg"
SETTINGS = {"beams": 1, "max_new_tokens": 8}


def make_certificate(d: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (scripts/setup.sh installs it)")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=emrrg-test",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory, tls):
    cert, key = tls
    srv = Server(tiny_bundle, tmp_path_factory.mktemp("serve-secure"), "--queue-size", "2",
                 "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), env={"EMRRG_API_KEY": KEY}, ca=cert)
    yield srv
    srv.stop()


def post(client: httpx.Client, headers: dict) -> httpx.Response:
    return client.post("/v1/reports", params=SETTINGS, content=dicom_bytes(),
                       headers={"Content-Type": "application/dicom", **headers})


def test_right_key_gets_the_report_over_https(client, server):
    assert server.url.startswith("https://")
    out = check_report(post(client, {"Authorization": f"Bearer {KEY}"}), views=1)
    again = check_report(post(client, {"X-API-Key": KEY}), views=1)
    assert out["report"] == again["report"] and out["tokens"] == SETTINGS["max_new_tokens"]
    assert client.get("/v1/model", headers={"authorization": f"bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY[:-1]}"},
    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Bearer {KEY[:-1]}Q"}, {"X-API-Key": KEY.upper()},
], ids=["none", "empty-bearer", "basic-scheme", "prefix", "longer", "last-char", "case"])
def test_missing_or_wrong_key_gets_401(client, headers):
    for method, path in (("POST", "/v1/reports"), ("GET", "/v1/model"), ("GET", "/no/such/path")):
        if method == "POST":
            r = post(client, headers)
        else:
            r = client.get(path, headers=headers)
        body = assert_error(r, 401, "unauthorized")
        assert "key" in body["detail"] and "\n" not in body["detail"]
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert KEY not in r.text


def test_open_paths_need_no_key(client):
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["model_loaded"] is True
    assert client.get("/openapi.json").status_code == 200


def test_the_key_is_never_logged(client, server):
    post(client, {"Authorization": f"Bearer {KEY}"})
    post(client, {"Authorization": f"Bearer {KEY}-wrong"})
    log = server.log()
    assert "status=401" in log and "status=200" in log
    assert KEY not in log


def test_tls_is_real(server):
    with pytest.raises(httpx.ConnectError):   # the system's CAs do not trust the test's certificate
        httpx.get(server.url + "/healthz", timeout=10)
    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port gets no HTTP answer
        httpx.get(server.url.replace("https://", "http://") + "/healthz", timeout=10)


def _refusal(tiny_bundle: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "emrrg.runtime.serve", str(tiny_bundle), "--port", str(free_port()),
                           *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "EMRRG_API_KEY": "", **(env or {})})


def test_bad_tls_and_key_options_exit_2_with_one_line(tiny_bundle, tls, tmp_path):
    cert, key = tls
    other_cert, other_key = make_certificate(tmp_path)
    cases = [
        (("--ssl-certfile", str(cert)), None, "go together"),
        (("--ssl-certfile", str(tmp_path / "missing.pem"), "--ssl-keyfile", str(key)), None, "no such file"),
        (("--ssl-certfile", str(cert), "--ssl-keyfile", str(other_key)), None, "cannot use --ssl-certfile"),
        (("--api-key", "has space"), None, "printable ASCII"),
        ((), {"EMRRG_API_KEY": "tab\tkey"}, "$EMRRG_API_KEY"),
    ]
    for args, env, want in cases:
        proc = _refusal(tiny_bundle, *args, env=env)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert want in last and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        assert "has space" not in proc.stderr and "tab\tkey" not in proc.stderr   # a key is never echoed
    assert other_cert.exists()


def test_report_over_https_equals_plain_runtime(client, tiny_bundle):
    from emrrg.runtime.report_runtime import Runtime

    ref = Runtime.from_pretrained(tiny_bundle).generate([str(chest_dicom())], num_beams=1,
                                                        max_new_tokens=SETTINGS["max_new_tokens"])
    assert check_report(post(client, {"X-API-Key": KEY}), views=1)["report"] == ref["report"]


def test_exposed_warning_names_what_is_missing(caplog):
    from emrrg.runtime.serve import warn_if_exposed

    with caplog.at_level("WARNING", logger="emrrg.serve"):
        assert warn_if_exposed("0.0.0.0", auth=True, tls=True) is False
        assert caplog.text == ""
        assert warn_if_exposed("0.0.0.0", auth=True, tls=False) is True
    assert "NO TLS" in caplog.text and "NO authentication" not in caplog.text


def test_docs_pages_need_no_key(client):
    page = client.get("/docs")
    assert page.status_code == 200
    js = client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and b"SwaggerUIBundle" in js.content
