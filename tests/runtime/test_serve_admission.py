"""emrrg-serve admission and slow clients, on a real server process with raw sockets on loopback.

Slow uploads must not hold queue slots, slow or idle request heads are dropped after --header-timeout, a
request framed both ways (Content-Length + Transfer-Encoding) or with too many header fields is refused,
the bodies being read are bounded by --upload-budget-mb, and Retry-After follows the queue's real backlog.
No assertion is on a timing: every wait is a bounded loop that fails only when something never happens.
"""
from __future__ import annotations

import json
import math
import re
import socket
import threading
import time

import httpx
import pytest

from emrrg.runtime.serve import FIRST_GENERATION_GUESS_S, per_request_s, retry_after_s, serve_main
from tests.runtime.test_serve import HOST, Server, assert_error, check_report, jpeg_path

QUEUE_SIZE = 4                 # capacity 5: five uploads holding slots (the old design) would block everyone
MAX_MB = 8
HEADER_TIMEOUT_S = 2
SLOW_CLIENTS, SLOW_DECLARED = 5, 1 << 20
LIVENESS_S = 60.0              # bound on waiting for something that must happen (not a timing assertion)
# Slow generations: 8 beams x 300 new tokens on the tiny bundle take ~0.4-1 s with one thread here. A full
# queue of 6 + 1 of them gives Retry-After > 1 s for anything slower than 0.15 s per generation.
SLOW_GENERATION = {"beams": 8, "max_new_tokens": 300}
RETRY_QUEUE_SIZE, BURST = 6, 10


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    srv = Server(tiny_bundle, tmp_path_factory.mktemp("admission"), "--queue-size", str(QUEUE_SIZE),
                 "--max-request-mb", str(MAX_MB), "--header-timeout", str(HEADER_TIMEOUT_S))
    yield srv
    srv.stop()


def queue(srv: Server) -> dict:
    return httpx.get(srv.url + "/healthz", timeout=10).json()["queue"]


def wait_for(what: str, cond, timeout: float = LIVENESS_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened within {timeout:g} s: {what}")


def open_upload(srv: Server, declared: int, first: bytes = b"\0") -> socket.socket:
    """A raw POST that declares `declared` bytes and sends only `first` of them."""
    s = socket.create_connection((HOST, srv.port), timeout=10)
    s.sendall(b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (declared, first))
    return s


def read_response(s: socket.socket) -> tuple[int, dict, bytes, bool]:
    """(status, headers, body, closed) of one response on a raw socket; closed: the server closed after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = s.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    s.settimeout(LIVENESS_S)
    try:
        closed = s.recv(1) == b""
    except ConnectionResetError:
        closed = True
    return status, headers, body, closed


def raw_request(srv: Server, data: bytes) -> tuple[int, dict, bytes, bool]:
    with socket.create_connection((HOST, srv.port), timeout=LIVENESS_S) as s:
        s.sendall(data)
        return read_response(s)


# --------------------------------------------------------------------------- slow bodies

def test_slow_uploads_do_not_block_a_normal_client(server):
    """Five clients declare 1 MB each and trickle it a byte at a time; they hold upload budget, no queue
    slot, so a normal client still gets its report (with slots taken before the body, it got 503)."""
    slow = [open_upload(server, SLOW_DECLARED) for _ in range(SLOW_CLIENTS)]
    stop = threading.Event()

    def trickle() -> None:
        for _ in range(int(LIVENESS_S / 0.2)):  # bounded; stopped long before
            if stop.wait(0.2):
                return
            for s in slow:
                s.sendall(b"\0")

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        wait_for("5 slow uploads being read", lambda: queue(server)["uploads"] == SLOW_CLIENTS)
        q = queue(server)
        assert q["active"] == 0 and q["upload_bytes"] == SLOW_CLIENTS * SLOW_DECLARED
        r = httpx.post(server.url + "/v1/reports", params={"beams": 1, "max_new_tokens": 8},
                       content=jpeg_path().read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=LIVENESS_S)
        check_report(r, views=1)
        assert queue(server)["uploads"] == SLOW_CLIENTS   # the slow ones are still uploading
    finally:
        stop.set()
        t.join(timeout=10)
        for s in slow:
            s.close()
    wait_for("the slow uploads' budget given back", lambda: queue(server)["uploads"] == 0)


def test_upload_budget_full_gets_503_and_small_uploads_pass_again(server):
    # 4 x 8 MiB declared = the default budget (4 x --max-request-mb); one more byte does not fit.
    held = [open_upload(server, MAX_MB << 20) for _ in range(4)]
    try:
        wait_for("4 large uploads being read", lambda: queue(server)["uploads"] == 4)
        r = httpx.post(server.url + "/v1/reports", content=jpeg_path().read_bytes(),
                       headers={"Content-Type": "image/jpeg"}, timeout=LIVENESS_S)
        body = assert_error(r, 503, "uploads_busy")
        assert "--upload-budget-mb" in body["detail"] and int(r.headers["retry-after"]) >= 1
    finally:
        for s in held:
            s.close()
    wait_for("the large uploads' budget given back", lambda: queue(server)["uploads"] == 0)
    r = httpx.post(server.url + "/v1/reports", params={"beams": 1, "max_new_tokens": 4},
                   content=jpeg_path().read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=LIVENESS_S)
    check_report(r, views=1)


def test_upload_budget_below_the_request_cap_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        serve_main(["bundle", "--max-request-mb", "8", "--upload-budget-mb", "4"])
    assert e.value.code == 2 and "--upload-budget-mb 4 is below --max-request-mb 8" in capsys.readouterr().err


def test_body_timeout_gives_408_and_closes(tiny_bundle, tmp_path):
    srv = Server(tiny_bundle, tmp_path, "--body-timeout", "1")
    try:
        s = open_upload(srv, 4096, b"\0" * 10)
        s.settimeout(LIVENESS_S)
        status, headers, body, closed = read_response(s)
        s.close()
        assert status == 408 and json.loads(body)["error"] == "upload_timeout"
        assert headers["connection"] == "close" and closed
        assert queue(srv)["uploads"] == 0 and queue(srv)["active"] == 0
    finally:
        srv.stop()


# --------------------------------------------------------------------------- request heads

def test_slow_header_client_is_dropped(server):
    """A head trickled a byte at a time is cut off after --header-timeout, although bytes keep coming."""
    s = socket.create_connection((HOST, server.port), timeout=10)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    s.settimeout(0.2)
    got, sent = b"", 0
    try:
        for _ in range(int(LIVENESS_S / 0.2)):  # bounded; the server drops it long before
            try:
                s.sendall(b"a")
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        else:
            pytest.fail(f"still connected after trickling {sent} header bytes for {LIVENESS_S:g} s")
    finally:
        s.close()
    assert sent > 1 and (got == b"" or got.startswith(b"HTTP/1.1 408")), got
    assert "request head not complete" in server.log()


def test_idle_connection_is_dropped(server):
    with socket.create_connection((HOST, server.port), timeout=LIVENESS_S) as s:
        assert s.recv(1) == b""     # closed by the server, nothing sent


def test_content_length_with_transfer_encoding_is_400(server):
    status, headers, body, closed = raw_request(
        server, b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert status == 400 and json.loads(body)["error"] == "bad_framing"
    assert headers["connection"] == "close" and closed


def test_too_many_headers_is_431(server):
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    status, headers, body, closed = raw_request(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
    assert status == 431 and json.loads(body)["error"] == "too_many_headers" and closed


def test_oversized_head_is_refused(server):
    big = b"X-Big: " + b"a" * (20 << 10) + b"\r\n"
    status, _, body, closed = raw_request(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    # 431 when the head arrived whole (our check), h11's 400 when it was still incomplete at 16 KiB
    assert status in (400, 431) and closed, (status, body)


def test_server_still_serves_normally(server):
    r = httpx.post(server.url + "/v1/reports", params={"beams": 1, "max_new_tokens": 4},
                   content=jpeg_path().read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=LIVENESS_S)
    check_report(r, views=1)
    assert server.proc.poll() is None


# --------------------------------------------------------------------------- Retry-After

def test_retry_after_formula():
    assert per_request_s([]) == FIRST_GENERATION_GUESS_S
    assert retry_after_s(3, per_request_s([0.5, 1.5])) == 3
    assert retry_after_s(3, 0.01) == 1                     # never below 1
    assert retry_after_s(2, 1.2) == 3                      # rounded up
    assert retry_after_s(10**6, 10.0) == 3600              # capped


def test_retry_after_is_the_backlog_of_slow_generations(tiny_bundle, tmp_path):
    """A burst of slow generations fills a queue of 6 + 1 running: every 503's Retry-After is ceil(queue depth x
    mean recent generation time), computed from the server's own figures (its log line), and more than 1 s."""
    srv = Server(tiny_bundle, tmp_path, "--queue-size", str(RETRY_QUEUE_SIZE))
    body = jpeg_path().read_bytes()

    def post(i: int) -> None:
        results[i] = httpx.post(srv.url + "/v1/reports", params=SLOW_GENERATION, content=body,
                                headers={"Content-Type": "image/jpeg"}, timeout=300)

    try:
        results: list = [None]
        post(0)                                               # the recent mean is a slow generation's
        seed = check_report(results[0], views=1)
        results = [None] * BURST
        threads = [threading.Thread(target=post, args=(i,), daemon=True) for i in range(BURST)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        busy = [r for r in results if r is not None and r.status_code == 503]
        assert busy and all(r is not None for r in results)
        log = srv.log()
        for r in busy:
            assert_error(r, 503, "queue_full")
            rid = f"id={r.headers['x-request-id']} "
            line = next(ln for ln in log.splitlines() if rid in ln)
            depth = int(re.search(r" queue_depth=(\d+)", line).group(1))
            per = float(re.search(r" per_request_s=(\S+)", line).group(1))
            retry = int(r.headers["retry-after"])
            print(f"seed generation {seed['timings_ms']['total']:.0f} ms; queue depth {depth}, {per:.3f} s per "
                  f"generation -> Retry-After {retry}")
            assert depth == RETRY_QUEUE_SIZE + 1 and retry == max(1, math.ceil(depth * per))
            assert retry > 1
    finally:
        srv.stop()
