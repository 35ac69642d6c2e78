"""emrrg-serve's /metrics (Prometheus), token streaming (SSE), offline docs and /v1/model, on a real server process.

Metrics are read with prometheus-client's own parser of the text format; streams are read as the bytes of
a text/event-stream and split into events as the SSE specification says (blank-line separated, `event:`
and `data:` fields). Every wait is a bounded loop; nothing asserts a timing.
"""
from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.runtime.test_serve import Server, assert_error, check_report, client, dicom_bytes, jpeg_path  # noqa: F401

LIVENESS_S = 60.0               # bound on waiting for something that must happen (not a timing assertion)
SLOW = {"beams": 8, "max_new_tokens": 300}   # long enough to be seen running by a scrape loop


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    srv = Server(tiny_bundle, tmp_path_factory.mktemp("serve-obs"), "--queue-size", "3")
    yield srv
    srv.stop()


def scrape(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def post_jpeg(client: httpx.Client, **params) -> httpx.Response:
    return client.post("/v1/reports", params=params, content=jpeg_path().read_bytes(),
                       headers={"Content-Type": "image/jpeg"})


# --------------------------------------------------------------------------- /metrics

def test_metrics_count_requests_stages_and_tokens(client):
    before = scrape(client)
    outs = [check_report(post_jpeg(client, beams=1, max_new_tokens=n), views=1) for n in (5, 9)]
    assert_error(client.post("/v1/reports", content=b"plain text, not an image",
                             headers={"Content-Type": "application/octet-stream"}), 415)
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("emrrg_requests_total", route="/v1/reports", method="POST", status="200") == 2
    assert delta("emrrg_requests_total", route="/v1/reports", method="POST", status="415") == 1
    assert delta("emrrg_generated_tokens_total") == sum(o["tokens"] for o in outs) == 14
    for stage in ("load", "preprocess", "encode", "prefill", "decode", "queue_wait"):
        assert delta("emrrg_stage_seconds_count", stage=stage) == 2, stage
        assert delta("emrrg_stage_seconds_sum", stage=stage) >= 0, stage
    assert delta("emrrg_stage_seconds_sum", stage="decode") == pytest.approx(
        sum(o["timings_ms"]["decode"] for o in outs) / 1e3, rel=0.05, abs=2e-3)   # the JSON rounds to 0.01 ms
    assert delta("emrrg_tokens_per_second_count") == 2 and delta("emrrg_tokens_per_second_sum") > 0
    assert value(after, "emrrg_model_ready") == 1 and value(after, "emrrg_queue_capacity") == 4
    assert value(after, "emrrg_requests_total", route="/metrics", method="GET", status="200") >= 1


def test_metrics_show_the_queue_while_a_report_runs(client, server):
    done: list = []
    t = threading.Thread(target=lambda: done.append(post_jpeg(httpx.Client(base_url=server.url, timeout=120), **SLOW)),
                         daemon=True)
    t.start()
    seen = 0.0
    deadline = time.monotonic() + LIVENESS_S
    while time.monotonic() < deadline and not done:
        m = scrape(client)
        seen = max(seen, value(m, "emrrg_queue_depth") + value(m, "emrrg_uploads_in_progress"))
        if value(m, "emrrg_queue_running") == 1:
            assert value(m, "emrrg_queue_depth") >= 1
            break
        time.sleep(0.01)
    t.join(timeout=120)
    assert done and done[0].status_code == 200
    assert seen >= 1, "the running report never showed in emrrg_queue_depth"
    deadline = time.monotonic() + LIVENESS_S
    while value(scrape(client), "emrrg_queue_depth") != 0:
        assert time.monotonic() < deadline, "queue depth never went back to 0"
        time.sleep(0.05)


# --------------------------------------------------------------------------- /docs offline, /v1/model

@pytest.mark.parametrize("page, script", [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")])
def test_docs_pages_load_everything_from_the_server(client, page, script):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert any(u.endswith(script) for u in urls), urls
    assert "http://" not in r.text and "https://" not in r.text, "the page names an outside host (CDN or fonts)"
    for u in urls:
        asset = client.get(u)
        assert asset.status_code == 200 and len(asset.content) > 1000, (u, asset.status_code)
    assert "/openapi.json" in r.text and client.get("/openapi.json").status_code == 200


def test_model_names_no_path_of_the_export_machine(client, tiny_bundle):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    temp_paths = [v for v in _strings(manifest.get("validation", {})) if v.startswith("/")]
    assert temp_paths, "the tiny bundle's manifest no longer names its export's temporary files: test nothing"
    r = client.get("/v1/model")
    assert r.status_code == 200
    got = r.json()
    assert not [v for v in _strings(got) if v.startswith("/")], got
    assert "/tmp" not in r.text and str(tiny_bundle.parent) not in r.text
    for path in temp_paths:   # the file name stays: which graph the export checked
        assert path.rsplit("/", 1)[-1] in r.text
    assert got["artifacts"]["tokenizer"]["path"] == manifest["artifacts"]["tokenizer"]["path"]


def _strings(o):
    if isinstance(o, dict):
        for v in o.values():
            yield from _strings(v)
    elif isinstance(o, list):
        for v in o:
            yield from _strings(v)
    elif isinstance(o, str):
        yield o


# --------------------------------------------------------------------------- SSE

def parse_events(text: str) -> list[tuple[str, dict]]:
    """text/event-stream -> [(event type, JSON data)]: events end at a blank line; comments (':') skipped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        kind, data = "message", []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, val = line.partition(":")
            val = val[1:] if val.startswith(" ") else val
            if field == "event":
                kind = val
            elif field == "data":
                data.append(val)
        if data:
            events.append((kind, json.loads("\n".join(data))))
    return events


@pytest.mark.parametrize("settings", [{"beams": 1, "max_new_tokens": 40}, {"beams": 3, "max_new_tokens": 25}],
                         ids=["greedy", "beams3"])
def test_stream_sends_each_token_then_the_report(client, settings):
    plain = check_report(post_jpeg(client, **settings), views=1)
    with client.stream("POST", "/v1/reports", params={**settings, "stream": "true"}, content=jpeg_path().read_bytes(),
                       headers={"Content-Type": "image/jpeg"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-store" and r.headers["x-request-id"]
        text = "".join(r.iter_text())
    events = parse_events(text)
    kinds = [k for k, _ in events]
    assert kinds == ["token"] * (len(kinds) - 1) + ["report"], kinds
    tokens = [d for k, d in events if k == "token"]
    report = events[-1][1]
    assert set(report) == set(plain) and report["request_id"] == r.headers["x-request-id"]
    assert len(tokens) == report["tokens"] == plain["tokens"]
    assert all(isinstance(t["id"], int) and isinstance(t["text"], str) for t in tokens)
    assert "".join(t["text"] for t in tokens) == report["report"] == plain["report"]
    assert report["report"].strip()


def test_stream_refusals_are_ordinary_json_errors(client):
    r = client.post("/v1/reports", params={"stream": "true"}, content=b"not an image at all",
                    headers={"Content-Type": "application/octet-stream"})
    assert_error(r, 415, "unsupported_media_type")
    r = client.post("/v1/reports", params={"stream": "true"}, content=dicom_bytes(),
                    headers={"Content-Type": "application/dicom", "Accept": "application/dicom"})
    assert_error(r, 406, "not_acceptable")
    assert_error(client.post("/v1/reports", params={"stream": "maybe"}, content=dicom_bytes(),
                             headers={"Content-Type": "application/dicom"}), 422, "bad_parameter")


def test_client_leaving_mid_stream_frees_the_queue(client, server):
    with httpx.Client(base_url=server.url, timeout=60) as other:
        with other.stream("POST", "/v1/reports", params={**SLOW, "beams": 1, "stream": "true"},
                          content=jpeg_path().read_bytes(), headers={"Content-Type": "image/jpeg"}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("event: token"):
                    break   # leave after the first token
    deadline = time.monotonic() + LIVENESS_S
    while value(scrape(client), "emrrg_queue_depth") != 0:
        assert time.monotonic() < deadline, "the abandoned stream never gave its queue slot back"
        time.sleep(0.05)
    check_report(post_jpeg(client, beams=1, max_new_tokens=4), views=1)
