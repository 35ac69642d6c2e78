"""emrrg-serve's HTTP app (FastAPI): the API, its middleware (request ids, access log, API key, framing
checks), uploads, metrics, streaming and docs. Torch-free. The command line is emrrg.runtime.serve, the queue and
the model emrrg.runtime.serve_service, the JSON schemas emrrg.runtime.serve_models.

API (OpenAPI schema at /openapi.json, interactive docs at /docs):

  POST /v1/reports[?beams=N&max_new_tokens=N&stream=true]
      Body: ONE view as the raw file (Content-Type application/dicom, image/png, image/jpeg or
      application/octet-stream; no Content-Type means octet-stream), or multipart/form-data with
      one or more file parts named `views` (the views of one study, averaged as upstream; other
      parts are ignored). The bytes are sniffed (PNG, JPEG, DICOM with or without the preamble);
      a declared type only has to be one of the above (any image/* in a multipart part).
      beams / max_new_tokens override the server's defaults (--beams / --max-new-tokens, else the
      bundle's generation settings).
      200  ReportResponse: the JSON of `emrrg-run --json` (report, tokens, backend, bundle_sha256,
           timings_ms {preprocess, encoder, prefill, decode, total}, peak_rss_mb) plus request_id,
           queue_wait_ms, views and inputs (per view: kind, header_checked, modality, body_part,
           view_position, header_checks, warnings; never patient or study identifiers).
           timings_ms.preprocess and .total include decoding the upload;
           queue_wait_ms is the time between the upload being decoded and generation starting.
      400  empty body, malformed multipart, no `views` part, an empty view, more than 8 views; both
           Content-Length and Transfer-Encoding (error bad_framing; the connection is closed)
      401  unauthorized: the server has --api-key (or $EMRRG_API_KEY) and the request sent no key or a wrong
           one (checked before the body is read; with WWW-Authenticate: Bearer)
      408  the body did not arrive within --body-timeout (30 s) of the request head (the connection
           is closed)
      413  body larger than --max-request-mb (by Content-Length, or counted while reading)
      415  not a PNG, JPEG or DICOM (by the declared type, or by the bytes: text, random data)
      422  an image that cannot be decoded (truncated, corrupt, a DICOM without pixel data,
           non-finite rescale / window values; error undecodable_image), a study the input gate refuses
           (not a projection radiograph, multi-frame, two patients or studies, larger than
           --max-megapixels; error refused_input, decided from the headers before any pixel is
           decoded), or beams / max_new_tokens out of range
      431  more than 100 header fields or a request head over 16 KiB (one still incomplete at 16 KiB
           gets h11's plain-text 400 instead); the connection is closed
      503  queue_full: the queue is full (checked before the body is read, and again once it is);
           uploads_busy: the bodies being read already hold --upload-budget-mb; unavailable: the model
           is still loading or the service is stopping. With a Retry-After header in seconds, >= 1:
           queue_full: ceil(admitted requests x mean time of the last 20 generations); uploads_busy:
           until the oldest upload's --body-timeout ends
      500  generation failed (the message names the exception type only)
      With `Accept: application/dicom` (preferred to application/json) the 200 body is instead the report
      as a DICOM SR (Enhanced SR, emrrg.runtime.sr) for the uploaded DICOM views, built from their
      headers; 406 when a view is a PNG / JPEG (an SR must reference DICOM instances), 422 bad_sr_source
      when a header lacks the UIDs an SR reference needs.
      With stream=true the 200 body is text/event-stream (server-sent events): one `token` event per generated
      token, data {"id": token id, "text": the text it adds} (the texts joined are the report), then one
      `report` event whose data is the ReportResponse JSON; a generation that fails after the stream began
      ends it with an `error` event (the error JSON). Refusals before generation starts are the statuses
      above; stream=true with Accept: application/dicom is 406. A client that leaves stops the generation.
      Every error body is {"error": code, "detail": message, "request_id": id}.
  GET /healthz    200 {"status": "ok", "model_loaded": bool, "state": "loading|ready|failed|stopping",
                       "backend": str|null, "queue": {"capacity", "queue_size", "active", "running", "waiting",
                       "uploads", "upload_bytes", "upload_budget_bytes", "mean_generation_s", "retry_after_s"}}
  GET /metrics    (behind the API key like /v1/*) Prometheus text format: requests by route and status, queue depth, seconds per stage
                  (load, preprocess, encode, prefill, decode, queue_wait), tokens and tokens/s (ServeMetrics)
  GET /v1/model   200 Runtime.summary(): bundle_sha256, backend, versions, artifacts, generation,
                      validation (503 until the model is loaded); absolute paths cut to file names
  GET /docs, /redoc  Swagger UI / ReDoc from local files (the fastapi-offline package; no CDN)
  Every response carries an X-Request-ID header (a server-made id; client ids are not adopted).

Design:
- ONE Runtime, loaded at start-up in the single generation thread, which runs one report at a time
  (the Runtime may be shared between threads, but one report already uses every core);
  the port is bound at once, /healthz says when the model is ready, and a bundle that fails to load
  stops the server with exit status 2. Uploads are decoded in a separate single decode thread.
- Admission: at most --queue-size requests waiting plus the one running. A request takes a queue
  slot only once its whole body has been read (within --max-request-mb and --body-timeout), and keeps
  it until its generation has ended: a slow or stalled upload never holds a slot, so it cannot keep
  other clients at 503. When the queue is already full at the request head, the answer is 503 without
  reading the body.
- Upload memory: bodies being read are bounded apart from the queue, by a byte budget
  (--upload-budget-mb, default 4 x --max-request-mb): a body reserves its declared Content-Length (a
  chunked one, --max-request-mb) before its first byte is read and gives it back once it is read;
  a request that does not fit gets 503 uploads_busy. So at most upload budget + (queue_size + 1) x
  --max-request-mb of request bodies are held at once.
- Slow clients: a request head (request line + headers) must be complete within --header-timeout
  seconds of the connection opening or of the previous response (an idle keep-alive connection is
  closed after uvicorn's 5 s), else the connection is closed (with a 408 when part of a head
  arrived); the same bound covers a client that keeps trickling a body the server has already
  answered. A body must arrive within --body-timeout of its head (408, connection closed). Heads are
  limited to 16 KiB and 100 header fields (431). Trickling bytes does not reset either clock.
- Uploads are read and decoded from memory (preprocess.ImageBytes): nothing is written to disk.
- Logging (Python logging, logger "emrrg.serve"): one line per request with id, method, route,
  status, byte counts, views and timings (/healthz at DEBUG). Never pixel data, DICOM tags, upload
  file names or query strings; errors name the view ("view 2"), never the client's file name.
  Warnings raised while decoding are counted, not printed (they could quote DICOM values).
- Authentication: with --api-key (or $EMRRG_API_KEY) every request but /healthz, /openapi.json and the docs
  pages must present the key ('Authorization: Bearer KEY' or 'X-API-Key: KEY'), compared in constant time
  (hmac.compare_digest) before the body is read; else 401 unauthorized with WWW-Authenticate. The key is never
  logged. TLS: --ssl-certfile / --ssl-keyfile (PEM) make uvicorn serve HTTPS; the pair is loaded once at
  start-up so a wrong file is one line and exit 2.
- Binds to 127.0.0.1 by default and warns loudly when bound elsewhere without an API key or without TLS.
- SIGTERM / SIGINT: stop accepting, let running and queued requests finish (up to
  --graceful-timeout seconds), stop the worker threads, exit 0.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from emrrg.runtime.gate import ViewInfo
from emrrg.runtime.generation import TextDeltas
from emrrg.runtime.serve_models import ErrorResponse, Health, ModelInfo, ReportResponse
from emrrg.runtime.serve_service import (
    ApiError, ReportService, _ClientGone, _Slot, _View,
)

log = logging.getLogger("emrrg.serve")

MAX_VIEWS = 8                 # views per study; IU X-Ray has 2, MIMIC-CXR studies rarely more than 4
MAX_HEADERS = 100             # header fields per request (Apache's LimitRequestFields default)
MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11's own default, set explicitly)
BEAMS_CAP, MAX_NEW_TOKENS_CAP = 64, 4096   # schema bounds; the bundle's own limits are checked too
RAW_TYPES = ("application/dicom", "image/png", "image/jpeg", "application/octet-stream")
_KNOWN_PATHS = ("/v1/reports", "/healthz", "/v1/model", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                "/redoc")
# Paths answered without the API key: liveness for load balancers and orchestrators, and the API's own description
# (the docs page must fetch /openapi.json); neither says anything about patients or reports.
OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
DOCS_ASSETS = "/docs/assets"   # Swagger UI / ReDoc files served from the fastapi-offline package (no CDN); open too
API_KEY_ENV = "EMRRG_API_KEY"
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}/[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
# Histogram buckets of /metrics. Stage times: from a tiny model's milliseconds to a slow CPU's minute-long
# beam search. Tokens/s: from a slow CPU with 8 beams (~1/s) to a GPU's thousands.
STAGE_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


# --------------------------------------------------------------------------- uploads

def _check_declared(label: str, media_type: str, multipart_part: bool) -> None:
    """415 unless the declared type can hold a DICOM / PNG / JPEG."""
    if not media_type or media_type in RAW_TYPES:
        return
    if multipart_part and media_type.startswith("image/"):
        return  # browsers label parts by extension; the bytes decide
    shown = repr(media_type) if _MEDIA_TYPE.match(media_type) else "an invalid media type"
    raise ApiError(415, "unsupported_media_type",
                   f"{label}: declared type {shown} is not a DICOM, PNG or JPEG image; send "
                   f"application/dicom, image/png, image/jpeg or application/octet-stream")


class _MultipartViews:
    """Streaming multipart/form-data parser that keeps the `views` file parts in memory."""

    def __init__(self, boundary: bytes):
        self.views: list[_View] = []
        self.ignored_parts = 0
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._hname, self._hval = b"", b""
        self._cur: _View | None = None
        self._open = False
        cb = {"on_part_begin": self._part_begin, "on_part_data": self._part_data, "on_part_end": self._part_end,
              "on_header_field": self._header_field, "on_header_value": self._header_value,
              "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
              "on_end": self._end}
        self.parser = MultipartParser(boundary, cb)

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError:
            raise ApiError(400, "bad_multipart", "malformed multipart/form-data body") from None

    def finish(self) -> list[_View]:
        self.parser.finalize()
        if not self.ended or self._open:
            raise ApiError(400, "bad_multipart", "multipart/form-data body ends before its closing boundary")
        if not self.views:
            raise ApiError(400, "no_views", "multipart/form-data body has no file part named 'views' "
                                            f"({self.ignored_parts} other part(s) ignored)")
        return self.views

    def _part_begin(self) -> None:
        self._headers, self._cur, self._open = {}, None, True

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._hval += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._hname.strip().lower()] = self._hval.strip()
        self._hname, self._hval = b"", b""

    def _headers_finished(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        if opts.get(b"name") != b"views":
            self.ignored_parts += 1
            return
        if len(self.views) >= MAX_VIEWS:
            raise ApiError(400, "too_many_views", f"more than {MAX_VIEWS} views in one study")
        label = f"view {len(self.views) + 1}"
        declared = parse_options_header(self._headers.get(b"content-type", b""))[0].decode("latin-1")
        _check_declared(label, declared, multipart_part=True)
        self._cur = _View(label, declared=declared)
        self.views.append(self._cur)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._cur is not None:
            self._cur.data += data[start:end]

    def _part_end(self) -> None:
        self._open = False
        if self._cur is not None and not self._cur.data:
            raise ApiError(400, "empty_view", f"{self._cur.label} is empty (0 bytes)")

    def _end(self) -> None:
        self.ended = True


# --------------------------------------------------------------------------- metrics

class ServeMetrics:
    """Prometheus metrics of one app, in its own registry (two apps in one process do not share counters).

    emrrg_requests_total{route,method,status}  answers, counted by the access log (routes as logged)
    emrrg_stage_seconds{stage}                 per report: load (reading + checking + decoding the upload),
                                               preprocess (resize / normalize), encode, prefill, decode,
                                               queue_wait (decoded upload -> generation start)
    emrrg_generated_tokens_total               tokens written
    emrrg_tokens_per_second                    per report: tokens / (prefill + decode) seconds
    emrrg_queue_depth, emrrg_queue_running, emrrg_queue_capacity, emrrg_uploads_in_progress,
    emrrg_model_ready                          read from the service at each scrape
    """

    def __init__(self, service: "ReportService"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = CollectorRegistry(auto_describe=True)
        self.requests = Counter("emrrg_requests", "HTTP answers by route, method and status",
                                ["route", "method", "status"], registry=reg)
        self.stage = Histogram("emrrg_stage_seconds", "time per stage of a report", ["stage"],
                               buckets=STAGE_BUCKETS_S, registry=reg)
        self.tokens = Counter("emrrg_generated_tokens", "tokens generated", registry=reg)
        self.tokens_per_s = Histogram("emrrg_tokens_per_second", "tokens / (prefill + decode) seconds, per report",
                                      buckets=TOKENS_PER_S_BUCKETS, registry=reg)
        for name, doc, fn in (
                ("emrrg_queue_depth", "admitted requests not yet finished (waiting + running)", lambda: service._active),
                ("emrrg_queue_running", "1 while a generation runs", lambda: int(service._running)),
                ("emrrg_queue_capacity", "--queue-size + 1", lambda: service.capacity),
                ("emrrg_uploads_in_progress", "request bodies being read (no queue slot yet)",
                 lambda: len(service._uploads)),
                ("emrrg_model_ready", "1 once the model is loaded and serving", lambda: int(service.state == "ready"))):
            Gauge(name, doc, registry=reg).set_function(fn)

    def observe_report(self, timings_ms: dict, load_ms: float, queue_wait_ms: float, tokens: int) -> None:
        for stage, ms in (("load", load_ms), ("preprocess", timings_ms["preprocess"] - load_ms),
                          ("encode", timings_ms["encoder"]), ("prefill", timings_ms["prefill"]),
                          ("decode", timings_ms["decode"]), ("queue_wait", queue_wait_ms)):
            self.stage.labels(stage).observe(max(0.0, ms) / 1e3)
        self.tokens.inc(tokens)
        gen_s = (timings_ms["prefill"] + timings_ms["decode"]) / 1e3
        if tokens and gen_s > 0:
            self.tokens_per_s.observe(tokens / gen_s)

    def exposition(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST,
                        headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------- the app

_REQUEST_BODY = {
    "required": True,
    "description": "One view as the raw file, or multipart/form-data with one or more `views` file parts "
                   "(the views of one study). The bytes are sniffed: PNG, JPEG or DICOM.",
    "content": {
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in RAW_TYPES},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["views"],
            "properties": {"views": {"type": "array", "maxItems": MAX_VIEWS,
                                     "items": {"type": "string", "format": "binary"},
                                     "description": "DICOM / PNG / JPEG views of ONE study"}}}},
    },
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying (>= 1)", "schema": {"type": "integer"}}}
_ERRORS = {
    200: {"description": "the report: JSON, with Accept: application/dicom a DICOM SR (Enhanced SR), with stream=true "
                         "server-sent events (`token` per token, then `report` with the JSON)",
          "content": {"application/dicom": {"schema": {"type": "string", "format": "binary"}},
                      "text/event-stream": {"schema": {"type": "string"}}}},
    401: {"model": ErrorResponse, "description": "no or wrong API key (only when the server has --api-key)"},
    406: {"model": ErrorResponse, "description": "Accept: application/dicom, but a view is not DICOM"},
    400: {"model": ErrorResponse, "description": "empty body, malformed multipart, no or empty views, too many views"},
    408: {"model": ErrorResponse, "description": "the body did not arrive within --body-timeout"},
    413: {"model": ErrorResponse, "description": "request body larger than --max-request-mb"},
    415: {"model": ErrorResponse, "description": "not a DICOM, PNG or JPEG (declared type or bytes)"},
    422: {"model": ErrorResponse, "description": "undecodable image, a study the input gate refuses, or beams / "
                                                 "max_new_tokens out of range"},
    500: {"model": ErrorResponse, "description": "generation failed"},
    431: {"model": ErrorResponse, "description": "more than 100 header fields, or a head over 16 KiB"},
    503: {"model": ErrorResponse, "description": "queue full, upload budget full, model loading, or shutting down",
          "headers": _RETRY_AFTER},
}


def _error_json(status: int, code: str, detail: str, request: Request, headers: dict | None = None) -> JSONResponse:
    rid = request.scope.get("emrrg", {}).get("id", "-")
    ctx = request.scope.get("emrrg")
    if ctx is not None:
        ctx["fields"]["error"] = code
    return JSONResponse({"error": code, "detail": detail, "request_id": rid}, status_code=status, headers=headers)


def _framing_refusal(scope: dict) -> ApiError | None:
    """431 for more than MAX_HEADERS header fields or a head over MAX_HEADER_BYTES (h11 only bounds a head that
    is still incomplete, so one that arrives in a single read could be larger); 400 for Content-Length together
    with Transfer-Encoding, which h11 would quietly read as chunked while a proxy in front may have framed it by
    the length (request smuggling; RFC 9112 section 6.1 lets a server refuse it). All close the connection."""
    close = {"Connection": "close"}
    headers = scope.get("headers") or []
    if len(headers) > MAX_HEADERS:
        return ApiError(431, "too_many_headers", f"the request has {len(headers)} header fields; at most "
                                                 f"{MAX_HEADERS} are accepted", close)
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
        sum(len(k) + len(v) + 4 for k, v in headers)
    if size > MAX_HEADER_BYTES:
        return ApiError(431, "headers_too_large", f"the request head has {size} bytes; at most {MAX_HEADER_BYTES} "
                                                  "are accepted", close)
    names = {k.lower() for k, _ in headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return ApiError(400, "bad_framing", "the request has both Content-Length and Transfer-Encoding; "
                                            "send only one of them", close)
    return None


def is_open_path(path: str) -> bool:
    """Paths answered without the API key: OPEN_PATHS and the docs pages' own assets."""
    return path in OPEN_PATHS or path.startswith(DOCS_ASSETS + "/")


def presented_key(scope: dict) -> bytes | None:
    """The API key a request presents: `Authorization: Bearer KEY` (as OpenAI-style clients send it) or
    `X-API-Key: KEY`; None when it presents neither."""
    for name, value in scope.get("headers") or []:
        name = name.lower()
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
        elif name == b"x-api-key":
            return value.strip()
    return None


def _auth_refusal(scope: dict, api_key: bytes) -> ApiError | None:
    """401 unless the request presents the API key; compared in constant time (hmac.compare_digest), so the
    answer's timing does not tell how much of a guess was right."""
    given = presented_key(scope)
    challenge = {"WWW-Authenticate": 'Bearer realm="emrrg-serve"'}
    if given is None:
        return ApiError(401, "unauthorized", "no API key: send the header 'Authorization: Bearer <key>' "
                                             "(or 'X-API-Key: <key>') with the key the server was started with",
                        challenge)
    if not hmac.compare_digest(given, api_key):
        return ApiError(401, "unauthorized", "wrong API key: send the key the server was started with "
                                             f"(--api-key or ${API_KEY_ENV})", challenge)
    return None


async def _send_error(send, exc: ApiError, rid: str) -> None:
    """An error answer written straight to ASGI (below FastAPI's exception handlers)."""
    body = json.dumps({"error": exc.code, "detail": exc.detail, "request_id": rid}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items())]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _AccessLog:
    """Pure ASGI middleware: request id, X-Request-ID header, one log line per request, last-resort 500."""

    def __init__(self, app, api_key: str | None = None, metrics: ServeMetrics | None = None):
        self.app, self.metrics = app, metrics
        self.api_key = api_key.encode("latin-1") if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = secrets.token_hex(8)
        ctx = {"id": rid, "fields": {}}
        scope["emrrg"] = ctx
        t0 = time.perf_counter()
        counts = {"in": 0, "out": 0, "status": 0}

        async def receive_counted():
            msg = await receive()
            if msg["type"] == "http.request":
                counts["in"] += len(msg.get("body", b""))
            return msg

        async def send_logged(msg):
            if msg["type"] == "http.response.start":
                counts["status"] = msg["status"]
                msg = dict(msg)
                msg["headers"] = [*msg.get("headers", []), (b"x-request-id", rid.encode())]
            elif msg["type"] == "http.response.body":
                counts["out"] += len(msg.get("body", b""))
            await send(msg)

        try:
            refusal = _framing_refusal(scope)
            if refusal is None and self.api_key is not None and not is_open_path(scope.get("path", "")):
                refusal = _auth_refusal(scope, self.api_key)
            if refusal is not None:
                ctx["fields"]["error"] = refusal.code
                await _send_error(send_logged, refusal, rid)
            else:
                await self.app(scope, receive_counted, send_logged)
        except Exception as e:  # never let a traceback (and whatever its message quotes) reach the log
            ctx["fields"]["error"] = f"internal ({type(e).__name__})"
            log.debug("unhandled exception in request %s", rid, exc_info=True)
            if counts["status"] == 0:
                await _send_error(send_logged, ApiError(500, "internal_error", f"internal error ({type(e).__name__})"),
                                  rid)
        path = scope.get("path", "")
        route = path if path in _KNOWN_PATHS else "<other>"
        status = counts["status"] or 499  # 499: the client left before an answer
        if self.metrics is not None:
            self.metrics.requests.labels(route, scope.get("method", ""), str(status)).inc()
        extra = "".join(f" {k}={v}" for k, v in ctx["fields"].items())
        level = logging.DEBUG if route == "/healthz" and status == 200 else logging.INFO
        log.log(level, "%s %s id=%s status=%d in_bytes=%d out_bytes=%d wall_ms=%.1f%s", scope.get("method"), route,
                rid, status, counts["in"], counts["out"], 1e3 * (time.perf_counter() - t0), extra)


async def _read_views(request: Request, service: ReportService, media_type: str, params: dict, ctx: dict) -> list[_View]:
    """The body as views, within --max-request-mb (413) and --body-timeout (408, closing the connection)."""
    limit = service.max_request_bytes
    try:
        if media_type == "multipart/form-data":
            mp = _MultipartViews(params[b"boundary"])
            await asyncio.wait_for(_read_multipart(request, limit, mp), service.body_timeout_s)
            views = mp.finish()
            if mp.ignored_parts:
                ctx["ignored_parts"] = mp.ignored_parts
            return views
        body = await asyncio.wait_for(_read_raw(request, limit), service.body_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "upload_timeout", f"the request body did not arrive within {service.body_timeout_s:g} s "
                                              "(--body-timeout)", {"Connection": "close"}) from None
    except ClientDisconnect:
        raise _ClientGone() from None
    if not body:
        raise ApiError(400, "empty_body", "empty body: POST one DICOM, PNG or JPEG file, or "
                                          "multipart/form-data with 'views' file parts")
    return [_View("upload", body, media_type)]


async def _read_raw(request: Request, limit: int) -> bytearray:
    buf = bytearray()
    async for chunk in request.stream():
        if len(buf) + len(chunk) > limit:
            raise _too_large(limit)
        buf += chunk
    return buf


async def _read_multipart(request: Request, limit: int, parser: _MultipartViews) -> int:
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise _too_large(limit)
        if chunk:
            parser.feed(chunk)
    return n


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"request body exceeds the limit of {limit / 2**20:g} MB "
                                              "(--max-request-mb); send smaller images or raise the limit")


def wants_dicom(accept: str | None) -> bool:
    """True when the Accept header asks for application/dicom at least as much as for JSON (q values)."""
    q: dict[str, float] = {}
    for part in (accept or "").split(","):
        media, *params = [x.strip() for x in part.split(";")]
        weight = 1.0
        for prm in params:
            key, _, value = prm.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        q[media.lower()] = max(q.get(media.lower(), 0.0), weight)
    dicom = q.get("application/dicom", 0.0)
    return dicom > 0 and dicom >= max(q.get("application/json", 0.0), q.get("application/*", 0.0), q.get("*/*", 0.0))


def _sr_headers(views: list[_View]) -> list:
    """The uploaded views' DICOM headers for an SR response (read from the bytes, no pixels), or 406 / 422."""
    from emrrg.runtime.sr import NotDicomError, SRError, read_headers

    try:
        return read_headers([v.data for v in views], [v.label for v in views])
    except NotDicomError as e:
        raise ApiError(406, "not_acceptable", f"{e}; or ask for Accept: application/json") from None
    except SRError as e:
        raise ApiError(422, "bad_sr_source", f"{e}; or ask for Accept: application/json") from None


def _sr_response(headers: list, out: dict) -> Response:
    """The report as a DICOM SR file (application/dicom); 500 sr_failed when it cannot be built."""
    from emrrg.runtime.sr import SRError, build_sr, sr_bytes

    try:
        sr = build_sr(headers, out)
    except SRError as e:
        raise ApiError(500, "sr_failed", f"the DICOM SR could not be built: {e}") from None
    return Response(sr_bytes(sr), media_type="application/dicom",
                    headers={"Cache-Control": "no-store",
                             "Content-Disposition": f'attachment; filename="{sr.SOPInstanceUID}.dcm"'})


def public_summary(summary: dict) -> dict:
    """Runtime.summary() for /v1/model, with every absolute path (the export machine's temporary files that
    the manifest's validation section names) cut to its file name: a client learns which graph was checked,
    not the layout of the machine that built the bundle."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, str) and (v.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:[\\/]", v)):
            return re.split(r"[\\/]", v.rstrip("/\\"))[-1]
        return v
    return clean(summary)


def add_offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from the files of the fastapi-offline package, served under DOCS_ASSETS, so
    the pages work on a network without the internet. Without that package both answer 404 saying so."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html

    try:
        import fastapi_offline
        from starlette.staticfiles import StaticFiles
    except ImportError:
        async def no_docs() -> None:
            raise ApiError(404, "docs_unavailable", "the docs pages need the fastapi-offline package, which is not "
                                                    "installed (pip install 'emrrg[serve]'); the API description "
                                                    "is at /openapi.json")
        app.get("/docs", include_in_schema=False)(no_docs)
        app.get("/redoc", include_in_schema=False)(no_docs)
        return
    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
                                   oauth2_redirect_url=f"{root}/docs/oauth2-redirect")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> Response:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png", with_google_fonts=False)


def create_app(service: ReportService, api_key: str | None = None) -> FastAPI:
    """The FastAPI app around a ReportService; the service starts and stops with the app's lifespan.
    With `api_key`, every path except OPEN_PATHS answers 401 unless the request presents it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            log.info("stopping: waiting for the worker threads")
            await asyncio.get_running_loop().run_in_executor(None, service.stop)
            log.info("stopped")

    app = FastAPI(title="emrrg-serve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Chest X-ray report generation (EMRRG edge runtime). One model, a bounded queue. "
                              "Started with --api-key, it needs 'Authorization: Bearer KEY' on every path but "
                              "/healthz, /openapi.json and /docs.")
    app.state.service = service
    add_offline_docs(app)
    app.state.metrics = metrics = ServeMetrics(service)
    app.add_middleware(_AccessLog, api_key=api_key, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.log_fields and "emrrg" in request.scope:
            request.scope["emrrg"]["fields"].update(exc.log_fields)
        return _error_json(exc.status, exc.code, exc.detail, request, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:  # never echo the input value
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "query")
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return _error_json(422, "bad_parameter", "; ".join(parts) or "invalid request", request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_json(exc.status_code, code, str(exc.detail), request, getattr(exc, "headers", None))

    @app.get("/healthz", response_model=Health, summary="Liveness, and whether the model is loaded")
    async def healthz() -> dict:
        rt = service.runtime
        return {"status": "ok", "model_loaded": rt is not None and service.state == "ready",
                "state": service.state, "backend": rt.backend if rt is not None else None,
                "queue": service.queue_info()}

    @app.get("/v1/model", response_model=ModelInfo, summary="The loaded bundle (Runtime.summary())",
             responses={503: {"model": ErrorResponse, "description": "model not loaded yet", "headers": _RETRY_AFTER}})
    async def model_info() -> dict:
        if service.runtime is None:
            raise ApiError(503, "unavailable", f"the model is not loaded (state: {service.state})", {"Retry-After": "5"})
        return public_summary(service.runtime.summary())

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        return metrics.exposition()

    @app.post("/v1/reports", response_model=ReportResponse, responses=_ERRORS, openapi_extra={"requestBody": _REQUEST_BODY},
              summary="Write a report for one study (one or more views)")
    async def create_report(
        request: Request, response: Response,
        beams: Optional[int] = Query(None, ge=1, le=BEAMS_CAP, description="beam count (1 = greedy); default: server/bundle"),
        max_new_tokens: Optional[int] = Query(None, ge=1, le=MAX_NEW_TOKENS_CAP, description="default: server/bundle"),
        stream: bool = Query(False, description="answer as server-sent events (text/event-stream): one `token` event "
                                                "per generated token, then one `report` event with the JSON"),
    ) -> Any:
        ctx = request.scope["emrrg"]["fields"]
        media_type, params = parse_options_header(request.headers.get("content-type"))
        media_type = media_type.decode("latin-1")
        is_multipart = media_type == "multipart/form-data"
        if not is_multipart:
            _check_declared("upload", media_type, multipart_part=False)
        declared_len = request.headers.get("content-length")
        if declared_len is not None:
            try:
                n = int(declared_len)
            except ValueError:
                raise ApiError(400, "bad_request", "invalid Content-Length header") from None
            ctx["declared_bytes"] = n
            if n > service.max_request_bytes:
                raise _too_large(service.max_request_bytes)
            if n == 0:
                raise ApiError(400, "empty_body", "empty body: POST one DICOM, PNG or JPEG file, or "
                                                  "multipart/form-data with 'views' file parts")
        if is_multipart and not params.get(b"boundary"):
            raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary parameter")
        beams, max_new_tokens = service.check_settings(beams, max_new_tokens)
        want_sr = wants_dicom(request.headers.get("accept"))
        if want_sr and stream:
            raise ApiError(406, "not_acceptable", "stream=true answers with text/event-stream, not a DICOM SR; "
                                                  "drop stream=true to get the SR, or ask for Accept: text/event-stream")
        settings = {"beams": beams if beams is not None else "default",   # logged once generation has run
                    "max_new_tokens": max_new_tokens if max_new_tokens is not None else "default"}
        service.check_admission()                   # a full queue answers 503 before the body is read
        slot = watcher = None
        gone = threading.Event()
        try:
            with service.reserve_upload(n if declared_len is not None else None):   # not a queue slot
                views = await _read_views(request, service, media_type, params, ctx)
                slot = service.admit()              # a queue slot, now that the whole body is here
            ctx["views"] = len(views)
            sr_headers = _sr_headers(views) if want_sr else None      # refused before any pixel is decoded
            watcher = asyncio.create_task(_watch_disconnect(request, gone))
            arrays, infos, load_ms = await service.decode(views, slot)
            del views
            if stream:   # errors before this point are ordinary JSON answers; after it, `error` events
                ctx["output"] = "sse"
                return _event_stream(service, arrays, beams, max_new_tokens, slot, gone, request.scope["emrrg"]["id"],
                                     lambda out: report_json(request, out, load_ms, infos, ctx, metrics, settings))
            out = await service.generate(arrays, beams, max_new_tokens, slot, gone)
            del arrays
        except _ClientGone:
            ctx["error"] = "client_gone"
            return Response(status_code=499)
        finally:
            if watcher is not None:
                watcher.cancel()
            if slot is not None:
                slot.release()
        if out is None:
            ctx["error"] = "client_gone"
            return Response(status_code=499)
        response.headers["Cache-Control"] = "no-store"
        body = report_json(request, out, load_ms, infos, ctx, metrics, settings)
        if sr_headers is not None:
            ctx["output"] = "dicom-sr"
            return await asyncio.to_thread(_sr_response, sr_headers, out)
        return body

    return app


def report_json(request: Request, out: dict, load_ms: float, infos: list[ViewInfo], ctx: dict,
                metrics: ServeMetrics, settings: dict) -> dict:
    """The ReportResponse of a finished generation (its timings now include decoding the upload); also fills
    the request's log fields (`settings`: the decoding settings, then the generation's) and the metrics."""
    ctx.update(settings)
    t = out["timings_ms"]
    t["preprocess"] += load_ms
    t["total"] += load_ms
    metrics.observe_report(t, load_ms, out["queue_wait_ms"], out["tokens"])
    ctx.update(tokens=out["tokens"], queue_ms=f"{out['queue_wait_ms']:.1f}", preprocess_ms=f"{t['preprocess']:.1f}",
               encoder_ms=f"{t['encoder']:.1f}", prefill_ms=f"{t['prefill']:.1f}",
               decode_ms=f"{t['decode']:.1f}", total_ms=f"{t['total']:.1f}")
    return {"request_id": request.scope["emrrg"]["id"], "report": out["report"], "tokens": out["tokens"],
            "backend": out["backend"], "bundle_sha256": out["bundle_sha256"],
            "timings_ms": {k: round(v, 2) for k, v in t.items()}, "peak_rss_mb": out["peak_rss_mb"],
            "queue_wait_ms": round(out["queue_wait_ms"], 2), "views": ctx["views"],
            "inputs": [v.to_json() for v in infos]}


def sse(event: str, data: dict) -> bytes:
    """One server-sent event: its type and a one-line JSON payload."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _event_stream(service: ReportService, arrays: list[np.ndarray], beams: int | None, max_new_tokens: int | None,
                  slot: _Slot, gone: threading.Event, request_id: str, finish: Callable[[dict], dict]) -> Response:
    """POST /v1/reports?stream=true: the generation queued now (holding the slot), answered as text/event-stream:
    `token` events {"id", "text"} (one per token; the texts joined are the report), then `report` with the
    ReportResponse JSON, or `error` with the error JSON when generation fails. A client that leaves stops the
    generation at its next token."""
    from starlette.responses import StreamingResponse

    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()
    done = object()
    fut = service.submit_generation(arrays, beams, max_new_tokens, slot, gone,
                                    on_token=lambda tok: loop.call_soon_threadsafe(tokens.put_nowait, tok))
    fut.add_done_callback(lambda _f: tokens.put_nowait(done))

    async def events():
        deltas = TextDeltas(service.runtime.decode_text)
        held = None    # each token event waits for the next token: the last one also carries what the end settles
        try:
            while (tok := await tokens.get()) is not done:
                if held is not None:
                    yield sse("token", held)
                held = {"id": tok, "text": deltas.add(tok)}
            try:
                out = fut.result()
            except ApiError as e:
                yield sse("error", {"error": e.code, "detail": e.detail, "request_id": request_id})
                return
            except Exception as e:
                log.debug("generation failed", exc_info=True)
                yield sse("error", {"error": "internal_error", "detail": f"generation failed ({type(e).__name__})",
                                    "request_id": request_id})
                return
            if out is None:
                return
            if held is not None:
                held["text"] += deltas.rest(out["report"])
                yield sse("token", held)
            yield sse("report", finish(out))
        finally:
            gone.set()   # a client that left mid-stream: the generation stops at its next token

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _watch_disconnect(request: Request, gone: threading.Event) -> None:
    """After the body is read, the next ASGI message is http.disconnect when the client leaves."""
    try:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                gone.set()
                return
    except Exception:  # pragma: no cover - the server tearing the connection down
        return


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("emrrg")
    except Exception:
        return "0"
