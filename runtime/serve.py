"""emrrg-serve: an HTTP report service for an X-ray console (FastAPI + uvicorn). Torch-free.

    emrrg-serve BUNDLE [--host 127.0.0.1] [--port 8080] [--backend auto] [--threads N]
                [--queue-size 4] [--max-request-mb 64] [--beams N] [--max-new-tokens N]
                [--upload-budget-mb 4 x max-request-mb] [--body-timeout 30] [--header-timeout 10]
                [--graceful-timeout 30] [--max-megapixels 64] [--allow-modality MOD ...] [--strict-inputs]
                [--api-key KEY (or $EMRRG_API_KEY)] [--ssl-certfile CERT.pem --ssl-keyfile KEY.pem]

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
  GET /metrics    Prometheus text format: requests by route and status, queue depth, seconds per stage
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

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import signal
import sys
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .bundle import BundleError, load_manifest
from .engine import BACKENDS
from .gate import InputPolicy, ViewInfo, add_input_arguments, check_study, policy_from_args, read_view
from .preprocess import ImageBytes, ImageError, RefusedInputError, describe_unknown, load_image, sniff
from emrrg.runtime.helpfmt import CommandParser, DefaultsHelpFormatter, count_int, positive_int

log = logging.getLogger("emrrg.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_QUEUE_SIZE = 4
DEFAULT_MAX_REQUEST_MB = 64.0
DEFAULT_GRACEFUL_TIMEOUT_S = 30
MAX_VIEWS = 8                 # views per study; IU X-Ray has 2, MIMIC-CXR studies rarely more than 4
DEFAULT_BODY_TIMEOUT_S = 30.0  # a whole body: 64 MiB at 20 Mbit/s; a console on a LAN sends it in well under 1 s
DEFAULT_HEADER_TIMEOUT_S = 10.0  # a whole request head (a few hundred bytes from a console)
UPLOAD_BUDGET_FACTOR = 4      # default --upload-budget-mb: this many maximal uploads read at once
MAX_HEADERS = 100             # header fields per request (Apache's LimitRequestFields default)
MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11's own default, set explicitly)
RECENT_GENERATIONS = 20       # generation times averaged for Retry-After
FIRST_GENERATION_GUESS_S = 2.0  # Retry-After's seconds per queued request before any generation has run
RETRY_AFTER_CAP_S = 3600
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


# --------------------------------------------------------------------------- API models

class Timings(BaseModel):
    preprocess: float = Field(description="decoding the upload + resize/normalize, ms")
    encoder: float = Field(description="vision encoder (+ visual K/V of hybrid layers), ms")
    prefill: float = Field(description="decoder prefill over the prompt, ms")
    decode: float = Field(description="per-token decoding, ms")
    total: float = Field(description="preprocess to last token, ms (queue wait excluded)")


class InputView(BaseModel):
    model_config = ConfigDict(extra="allow")
    label: str = Field(description='"upload" or "view N"')
    kind: str = Field(description="dicom, png, jpeg or image")
    header_checked: bool = Field(description="a DICOM header was read and checked (false for PNG / JPEG)")
    modality: Optional[str] = None
    body_part: Optional[str] = Field(None, description="BodyPartExamined")
    view_position: Optional[str] = Field(None, description="ViewPosition, e.g. PA, AP, LL")
    sop_class: Optional[str] = None
    photometric: Optional[str] = None
    size: Optional[list[Optional[int]]] = Field(None, description="[columns, rows]")
    frames: int = 1
    header_checks: dict[str, str] = Field(description="check -> pass / allowed / absent / warn")
    warnings: list[str] = Field(description="what the gate accepted but a person should look at")
    note: Optional[str] = None


class ReportResponse(BaseModel):
    request_id: str
    report: str = Field(description="the generated report text")
    tokens: int = Field(description="number of generated tokens")
    backend: str = Field(description="execution backend, e.g. ort-cpu")
    bundle_sha256: str = Field(description="digest of the bundle that wrote the report")
    timings_ms: Timings
    peak_rss_mb: float = Field(description="peak resident memory of the server process so far, MB")
    queue_wait_ms: float = Field(description="time between the upload being decoded and generation starting, ms")
    views: int = Field(description="number of views (images) in the study")
    inputs: list[InputView] = Field(description="what the input gate read and checked per view, in order")


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable code, e.g. queue_full, undecodable_image")
    detail: str = Field(description="one-line message for a person")
    request_id: str


class QueueInfo(BaseModel):
    capacity: int = Field(description="queue_size + 1 (the one running)")
    queue_size: int
    active: int = Field(description="admitted requests not yet finished (uploading, waiting or running)")
    running: bool
    waiting: int
    uploads: int = Field(description="request bodies being read (they hold no queue slot)")
    upload_bytes: int = Field(description="upload budget reserved by those bodies")
    upload_budget_bytes: int = Field(description="--upload-budget-mb, in bytes")
    mean_generation_s: Optional[float] = Field(description="mean of the last 20 generation times (null before any)")
    retry_after_s: int = Field(description="the Retry-After a full queue would answer now")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model_loaded: bool
    state: Literal["loading", "ready", "failed", "stopping"]
    backend: Optional[str] = None
    queue: QueueInfo


class ArtifactInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: Optional[str] = None
    precision: Optional[str] = None
    target: Optional[str] = None
    bytes: Optional[int] = None


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    bundle_sha256: str
    backend: str
    emrrg_version: Optional[str] = None
    format_version: Optional[int] = None
    source_sha256: Optional[str] = None
    artifacts: dict[str, ArtifactInfo]
    generation: dict[str, Any]
    validation: dict[str, Any]


class ApiError(Exception):
    """An error answer: HTTP status, a code, a PHI-free one-line message, optional headers."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None,
                 log_fields: dict[str, Any] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}
        self.log_fields = log_fields or {}   # extra key=value pairs for the request's log line


class _ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


# --------------------------------------------------------------------------- uploads

@dataclass
class _View:
    label: str                      # "upload" or "view N": what error messages and logs call it
    data: bytearray = field(default_factory=bytearray)
    declared: str = ""              # the declared media type ("" when none)


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


def decode_views(views: list[_View], policy: InputPolicy | None = None) -> tuple[list[np.ndarray], list[ViewInfo]]:
    """Uploaded bytes -> (H, W) float32 gray images and what the input gate saw, read from memory (no file).

    Every view is sniffed, and its header read and checked with the others (emrrg.runtime.gate; PatientID
    values are withheld from messages) before any pixel is decoded. Raises ApiError 415 (not a PNG/JPEG/
    DICOM), 422 `refused_input` (the gate refuses: modality, multi-frame, mixed patients or studies, above
    --max-megapixels, ...) or 422 `undecodable_image`; messages name the view label, never a file name.
    """
    policy = policy or InputPolicy()
    kinds = []
    for v in views:
        kinds.append(sniff(v.data))
        if kinds[-1] is None:
            raise ApiError(415, "unsupported_media_type",
                           f"{v.label}: not a PNG, JPEG or DICOM image ({describe_unknown(v.data)})")
    sources = [ImageBytes(v.data, v.label) for v in views]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = [_as_api_error(src, kind, lambda: read_view(src, src.name, policy.max_megapixels))
                 for src, kind in zip(sources, kinds)]
        try:
            check_study(infos, policy, reveal_ids=False)
        except ImageError as e:
            raise ApiError(422, "refused_input", str(e)) from None
        arrays = [_as_api_error(src, kind, lambda: load_image(src, policy.max_megapixels))
                  for src, kind in zip(sources, kinds)]
    if caught:
        log.debug("%d decoder / input warning(s) suppressed (%s)", len(caught),
                  ", ".join(sorted({w.category.__name__ for w in caught})))
    return arrays, infos


def _as_api_error(src: ImageBytes, kind: str, fn):
    """fn(), with an ImageError as 422 refused_input / undecodable_image naming the view label."""
    try:
        return fn()
    except ImageError as e:
        msg = str(e) if str(e).startswith(f"{src.name}:") else f"{src.name}: {e}"
        code = "refused_input" if isinstance(e, RefusedInputError) else "undecodable_image"
        raise ApiError(422, code, msg) from None
    except Exception as e:  # anything else a decoder raises: name the type only
        raise ApiError(422, "undecodable_image",
                       f"{src.name}: cannot decode the {kind.upper()} image ({type(e).__name__})") from None


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


# --------------------------------------------------------------------------- the service

class _Slot:
    """A place in the bounded queue. Freed when the handler is done AND every job it started has ended."""

    def __init__(self, svc: "ReportService"):
        self._svc, self._holds, self._lock = svc, 1, threading.Lock()

    def hold(self, fut: Future) -> None:
        with self._lock:
            self._holds += 1
        fut.add_done_callback(lambda _f: self._drop())

    def release(self) -> None:  # the handler's own hold; call exactly once
        self._drop()

    def _drop(self) -> None:
        with self._lock:
            self._holds -= 1
            last = self._holds == 0
        if last:
            self._svc._free_slot()


class ReportService:
    """One Runtime behind a bounded queue: a single generation thread and a single decode thread."""

    def __init__(self, bundle: str | os.PathLike, backend: str = "auto", threads: int | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE, max_request_bytes: int = int(DEFAULT_MAX_REQUEST_MB * 2**20),
                 upload_budget_bytes: int | None = None, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 beams: int | None = None, max_new_tokens: int | None = None, warmup: bool = True,
                 policy: InputPolicy | None = None):
        if queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        self.bundle, self.backend_request, self.threads = Path(bundle), backend, threads
        self.queue_size, self.capacity = queue_size, queue_size + 1
        self.max_request_bytes = max_request_bytes
        self.upload_budget_bytes = upload_budget_bytes or UPLOAD_BUDGET_FACTOR * max_request_bytes
        if self.upload_budget_bytes < max_request_bytes:
            raise ValueError("the upload budget must hold at least one maximal request (--max-request-mb)")
        self.body_timeout_s = body_timeout_s
        self.default_beams, self.default_max_new_tokens = beams, max_new_tokens
        self.warmup = warmup
        self.policy = policy or InputPolicy()   # the input gate's options (--max-megapixels, --allow-modality, ...)
        self.runtime = None
        self.state = "loading"
        self.max_beams = self.max_new_tokens_limit = None
        self.on_fatal = None              # called (from the worker) when the bundle cannot be loaded
        self._lock = threading.Lock()
        self._active = 0
        self._running = False
        self._recent: deque[float] = deque(maxlen=RECENT_GENERATIONS)   # seconds per generation, for Retry-After
        self._uploads: dict[object, tuple[int, float]] = {}   # bodies being read: (bytes reserved, deadline)
        self._gen: ThreadPoolExecutor | None = None
        self._dec: ThreadPoolExecutor | None = None

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._gen = ThreadPoolExecutor(1, thread_name_prefix="emrrg-generate")
        self._dec = ThreadPoolExecutor(1, thread_name_prefix="emrrg-decode")
        self._gen.submit(self._load)

    def stop(self) -> None:
        if self.state != "failed":
            self.state = "stopping"
        for pool in (self._dec, self._gen):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _load(self) -> None:
        from .engine import Runtime

        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                rt = Runtime.from_pretrained(self.bundle, backend=self.backend_request, threads=self.threads)
            for w in caught:
                log.warning("%s", w.message)
            m = rt.manifest
            self.max_beams = int(rt.decoder.max_rows)
            self.max_new_tokens_limit = int(rt.decoder.max_len - len(m["prompt"]["before_ids"]) -
                                            int(m["encoder"]["num_tokens"]) - len(m["prompt"]["after_ids"]))
            for name, v, lim in (("--beams", self.default_beams, self.max_beams),
                                 ("--max-new-tokens", self.default_max_new_tokens, self.max_new_tokens_limit)):
                if v is not None and v > lim:
                    raise ValueError(f"{name} {v} exceeds this bundle's limit of {lim}")
            if self.warmup:  # first ORT runs allocate; do it before the first patient does
                t1 = time.perf_counter()
                rt.generate([np.zeros((rt.image_size, rt.image_size), np.float32)], num_beams=1, max_new_tokens=1)
                log.info("warm-up generation took %.0f ms", 1e3 * (time.perf_counter() - t1))
        except Exception as e:
            self.state = "failed"
            kind = "" if isinstance(e, (BundleError, ValueError)) else f"{type(e).__name__}: "
            log.error("cannot load the bundle %s: %s%s", self.bundle, kind, e)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        self.runtime = rt
        self.state = "ready"
        log.info("model ready in %.1f s: backend %s, bundle sha256 %s, queue %d + 1 running, max request %.1f MB",
                 time.perf_counter() - t0, rt.backend, rt.sha256, self.queue_size, self.max_request_bytes / 2**20)

    # ---- admission -------------------------------------------------------------------------------
    def queue_info(self) -> dict:
        with self._lock:
            active, running = self._active, self._running
            uploads, upload_bytes = len(self._uploads), sum(n for n, _ in self._uploads.values())
            recent = list(self._recent)
        return {"capacity": self.capacity, "queue_size": self.queue_size, "active": active,
                "running": running, "waiting": max(0, active - int(running)), "uploads": uploads,
                "upload_bytes": upload_bytes, "upload_budget_bytes": self.upload_budget_bytes,
                "mean_generation_s": per_request_s(recent) if recent else None,
                "retry_after_s": retry_after_s(active, per_request_s(recent))}

    def check_admission(self) -> None:
        """503 at the request head, before any of the body is read: not ready, or the queue is already full."""
        self._admit(take=False)

    def admit(self) -> _Slot:
        """A queue slot for a request whose body has been read, or 503 (queue full, not ready)."""
        return self._admit(take=True)

    def _admit(self, take: bool) -> _Slot | None:
        if self.state != "ready":
            what = {"loading": "the model is still loading", "failed": "the model failed to load",
                    "stopping": "the service is shutting down"}[self.state]
            retry = "5" if self.state == "loading" else "30"
            raise ApiError(503, "unavailable", f"{what}; retry later", {"Retry-After": retry})
        with self._lock:
            if self._active >= self.capacity:
                raise self._queue_full()
            if not take:
                return None
            self._active += 1
            return _Slot(self)

    def _queue_full(self) -> ApiError:  # call with self._lock held
        depth, running, per = self._active, int(self._running), per_request_s(list(self._recent))
        retry = retry_after_s(depth, per)
        return ApiError(503, "queue_full", f"the report queue is full ({running} running, {depth - running} waiting, "
                                           f"capacity {self.capacity}); retry after {retry} s",
                        {"Retry-After": str(retry)}, log_fields={"queue_depth": depth, "per_request_s": repr(per)})

    @contextmanager
    def reserve_upload(self, declared: int | None):
        """Hold `declared` bytes (a chunked body: --max-request-mb) of the upload budget while a body is read;
        503 uploads_busy when the bodies already being read leave too little."""
        need = self.max_request_bytes if declared is None else declared
        key, now = object(), time.monotonic()
        with self._lock:
            held = sum(n for n, _ in self._uploads.values())
            if held + need > self.upload_budget_bytes:
                wait = min(deadline for _, deadline in self._uploads.values()) - now
                retry = int(min(RETRY_AFTER_CAP_S, max(1, math.ceil(wait))))
                raise ApiError(503, "uploads_busy", f"{len(self._uploads)} uploads already hold {held / 2**20:.1f} of "
                                                    f"{self.upload_budget_bytes / 2**20:g} MB (--upload-budget-mb); "
                                                    f"retry after {retry} s", {"Retry-After": str(retry)})
            self._uploads[key] = (need, now + self.body_timeout_s)
        try:
            yield
        finally:
            with self._lock:
                del self._uploads[key]

    def _free_slot(self) -> None:
        with self._lock:
            self._active -= 1

    # ---- work ------------------------------------------------------------------------------------
    def check_settings(self, beams: int | None, max_new_tokens: int | None) -> tuple[int | None, int | None]:
        beams = beams if beams is not None else self.default_beams
        max_new_tokens = max_new_tokens if max_new_tokens is not None else self.default_max_new_tokens
        if beams is not None and self.max_beams is not None and beams > self.max_beams:
            raise ApiError(422, "bad_parameter", f"beams={beams} exceeds this bundle's limit of {self.max_beams}")
        if max_new_tokens is not None and self.max_new_tokens_limit is not None and \
                max_new_tokens > self.max_new_tokens_limit:
            raise ApiError(422, "bad_parameter", f"max_new_tokens={max_new_tokens} exceeds this bundle's limit "
                                                 f"of {self.max_new_tokens_limit}")
        return beams, max_new_tokens

    async def decode(self, views: list[_View], slot: _Slot) -> tuple[list[np.ndarray], list[ViewInfo], float]:
        def job():
            t = time.perf_counter()
            arrays, infos = decode_views(views, self.policy)
            return arrays, infos, 1e3 * (time.perf_counter() - t)
        fut = self._dec.submit(job)
        slot.hold(fut)
        return await asyncio.wrap_future(fut)

    async def generate(self, arrays: list[np.ndarray], beams: int | None, max_new_tokens: int | None,
                       slot: _Slot, gone: threading.Event) -> dict | None:
        return await self.submit_generation(arrays, beams, max_new_tokens, slot, gone)

    def submit_generation(self, arrays: list[np.ndarray], beams: int | None, max_new_tokens: int | None,
                          slot: _Slot, gone: threading.Event,
                          on_token: Callable[[int], None] | None = None) -> "asyncio.Future[dict | None]":
        """Queue a generation (the slot is held until it ends); its result is None when the client left first.
        `on_token` is called from the generation thread with each token; once `gone` is set the generation
        stops at its next token."""
        queued = time.perf_counter()

        def each_token(tok: int) -> None:
            if gone.is_set():
                raise _ClientGone()
            on_token(tok)

        def job():
            if gone.is_set():
                return None  # the client left while waiting: do not spend minutes on it
            start = time.perf_counter()
            with self._lock:
                self._running = True
            try:
                out = self.runtime.generate(arrays, num_beams=beams, max_new_tokens=max_new_tokens,
                                            max_megapixels=self.policy.max_megapixels,
                                            on_token=each_token if on_token is not None else None)
            except _ClientGone:
                return None
            except ImageError as e:  # the last checks on the decoded arrays (e.g. non-finite values)
                raise ApiError(422, "undecodable_image", str(e)) from None
            finally:
                with self._lock:
                    self._running = False
                    self._recent.append(time.perf_counter() - start)
            out["queue_wait_ms"] = 1e3 * (start - queued)
            return out
        fut = self._gen.submit(job)
        slot.hold(fut)
        return asyncio.wrap_future(fut)


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


def per_request_s(recent: list[float]) -> float:
    """Mean of the recent generation times; FIRST_GENERATION_GUESS_S before any generation has run."""
    return sum(recent) / len(recent) if recent else FIRST_GENERATION_GUESS_S


def retry_after_s(depth: int, per_request: float) -> int:
    """Retry-After for a full queue: ceil(requests admitted x seconds per request), >= 1, <= RETRY_AFTER_CAP_S."""
    return int(min(RETRY_AFTER_CAP_S, max(1, math.ceil(depth * per_request))))


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
    from .sr import NotDicomError, SRError, read_headers

    try:
        return read_headers([v.data for v in views], [v.label for v in views])
    except NotDicomError as e:
        raise ApiError(406, "not_acceptable", f"{e}; or ask for Accept: application/json") from None
    except SRError as e:
        raise ApiError(422, "bad_sr_source", f"{e}; or ask for Accept: application/json") from None


def _sr_response(headers: list, out: dict) -> Response:
    """The report as a DICOM SR file (application/dicom); 500 sr_failed when it cannot be built."""
    from .sr import SRError, build_sr, sr_bytes

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


class TextDeltas:
    """The text each new token adds to the report (the whole prefix is decoded each time, so a character
    split over tokens comes out whole, and the clean-up of Runtime.decode_text applies). Text that may still
    change (an incomplete character at the end) is held back until a later token settles it."""

    def __init__(self, decode_text: Callable[[list[int]], str]):
        self.decode_text, self.ids, self.shown = decode_text, [], ""

    def add(self, tok: int) -> str:
        self.ids.append(tok)
        return self._advance(self.decode_text(self.ids), final=False)

    def rest(self, report: str) -> str:
        """What the final report adds to the text given so far ("" when it adds nothing)."""
        return self._advance(report, final=True)

    def _advance(self, text: str, final: bool) -> str:
        if not text.startswith(self.shown) or (text.endswith("\ufffd") and not final):
            return ""
        delta, self.shown = text[len(self.shown):], text
        return delta


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


# --------------------------------------------------------------------------- CLI

def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, auth: bool = False, tls: bool = False) -> bool:
    """Log a loud warning when the service would be reachable from other machines without an API key or
    without TLS; True when it warned."""
    if is_loopback(host) or (auth and tls):
        return False
    where = "ALL network interfaces" if host in ("0.0.0.0", "::", "") else f"{host}"
    lacks = " and ".join(x for x, have in (("NO authentication (--api-key)", auth), ("NO TLS (--ssl-certfile)", tls))
                         if not have)
    risk = ("anyone who can reach this port can upload patient\n!! images and read reports" if not auth else
            "images, reports and the API key cross the network\n!! in clear text")
    bar = "!" * 78
    log.warning("\n%s\n!! emrrg-serve is bound to %s, not to loopback.\n"
                "!! It has %s: %s. Bind to 127.0.0.1 behind an\n"
                "!! authenticating TLS proxy, or give --api-key and --ssl-certfile/--ssl-keyfile, and let a\n"
                "!! firewall limit this port to the X-ray console.\n%s", bar, where, lacks, risk, bar)
    return True


def api_key_text(s: str) -> str:
    """argparse type of --api-key: printable ASCII without spaces (it travels in an HTTP header)."""
    if not s or not all(33 <= ord(c) <= 126 for c in s):
        raise argparse.ArgumentTypeError("must be 1 or more printable ASCII characters without spaces "
                                         f"(set it with --api-key or ${API_KEY_ENV})")
    return s


def check_tls_files(certfile: str, keyfile: str) -> None:
    """Load the certificate and key as uvicorn will, so a wrong path or a mismatched pair is one line at
    start-up, not a traceback from the server."""
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile)
    except FileNotFoundError as e:
        raise ValueError(f"no such file: {e.filename or certfile}") from None
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"cannot use --ssl-certfile {certfile} with --ssl-keyfile {keyfile} "
                         f"({getattr(e, 'reason', None) or e}): give a PEM certificate and its unencrypted PEM key") from None


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _setup_logging() -> None:
    """The service's log on stderr: CommandParser already set the format and the level of emrrg and uvicorn
    (-q, -v, EMRRG_LOG_LEVEL: runtime/logs.py); this covers create_app callers that did not parse a command line."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
        for name in ("emrrg", "uvicorn.error"):
            logging.getLogger(name).setLevel(logging.INFO)
    # pydicom's own log messages can quote element values; its real failures surface as exceptions anyway.
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def head_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline on request heads: while the server is not working on a request
    (a new connection, after a response, while a body it has answered keeps arriving), the next request head
    must be complete within `timeout_s`, else the connection is closed, with a 408 when part of a head came.
    uvicorn alone waits for a head forever (its keep-alive timer stops at the first byte)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._sync_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._sync_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._sync_head_timer()

        def connection_lost(self, exc) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def _sync_head_timer(self) -> None:
            waiting = (self.conn.their_state is h11.IDLE or self.conn.our_state is h11.DONE) and \
                not self.transport.is_closing()
            if not waiting:
                self._stop_head_timer()
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            partial = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
            if partial:
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            log.info("closed a connection: %s within --header-timeout %g s",
                     "request head not complete" if partial else "no new request", timeout_s)
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    return HeadTimeoutProtocol


def _positive_float(s: str) -> float:
    v = float(s)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _port(s: str) -> int:
    v = int(s)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {v}")
    return v


def serve_main(argv: list[str] | None = None) -> None:
    p = CommandParser(prog="emrrg-serve", formatter_class=DefaultsHelpFormatter, log_format=LOG_FORMAT,
                      log_names=("uvicorn",),
                                description="HTTP report service for an X-ray console: POST /v1/reports (DICOM/PNG/"
                                            "JPEG, or multipart 'views'), GET /healthz, GET /v1/model, /openapi.json.")
    p.add_argument("bundle", help="bundle directory written by emrrg-export")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (anything but loopback is warned about: "
                                                        "no authentication, no TLS)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT, help="TCP port")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="execution backend")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--queue-size", type=count_int, default=DEFAULT_QUEUE_SIZE,
                   help="requests that may wait while one runs; more get 503 with Retry-After")
    p.add_argument("--max-request-mb", type=_positive_float, default=DEFAULT_MAX_REQUEST_MB,
                   help="largest accepted request body in MiB (413 above)")
    p.add_argument("--upload-budget-mb", type=_positive_float, default=None,
                   help=f"MiB of request bodies that may be read at once, apart from the queue; each reserves its "
                        f"Content-Length, a chunked one --max-request-mb; more get 503 (default: {UPLOAD_BUDGET_FACTOR} x "
                        f"--max-request-mb)")
    p.add_argument("--body-timeout", type=_positive_float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds for a whole request body to arrive after its head (408 and close after)")
    p.add_argument("--header-timeout", type=_positive_float, default=DEFAULT_HEADER_TIMEOUT_S,
                   help="seconds for a whole request head (line + headers) to arrive; the connection is closed after")
    p.add_argument("--beams", type=positive_int, default=None,
                   help="beam count for requests that give none (default: the bundle's setting; 1 = greedy)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="max new tokens for requests that give none (default: the bundle's setting)")
    add_input_arguments(p)
    p.add_argument("--graceful-timeout", type=_positive_float, default=DEFAULT_GRACEFUL_TIMEOUT_S,
                   help="seconds to let running and queued requests finish on SIGTERM/SIGINT")
    env_key = os.environ.get(API_KEY_ENV) or None
    p.add_argument("--api-key", type=api_key_text, default=None,
                   help=f"require this key on every request but {', '.join(sorted(OPEN_PATHS))}: 'Authorization: "
                        f"Bearer KEY' or 'X-API-Key: KEY', else 401. Prefer ${API_KEY_ENV}: a command line is "
                        f"visible to other local users (default: ${API_KEY_ENV} when set, else no authentication)")
    p.add_argument("--ssl-certfile", default=None,
                   help="PEM certificate (chain) to serve HTTPS with; needs --ssl-keyfile (default: none, plain HTTP)")
    p.add_argument("--ssl-keyfile", default=None,
                   help="PEM private key (unencrypted) of --ssl-certfile (default: none, plain HTTP)")
    a = p.parse_args(argv)
    if a.api_key is None and env_key is not None:
        try:
            a.api_key = api_key_text(env_key)
        except argparse.ArgumentTypeError as e:
            p.error(f"${API_KEY_ENV}: {e}")
    if (a.ssl_certfile is None) != (a.ssl_keyfile is None):
        p.error("--ssl-certfile and --ssl-keyfile go together: give both (or neither, for plain HTTP)")
    if a.upload_budget_mb is not None and a.upload_budget_mb < a.max_request_mb:
        p.error(f"--upload-budget-mb {a.upload_budget_mb:g} is below --max-request-mb {a.max_request_mb:g}: "
                "a body of the largest accepted size could never be read; raise it")

    import uvicorn

    _setup_logging()
    try:
        load_manifest(a.bundle)  # fail fast on a wrong path; the full check runs while loading
        if a.ssl_certfile:
            check_tls_files(a.ssl_certfile, a.ssl_keyfile)
    except (BundleError, ValueError) as e:
        print(f"emrrg-serve: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    warn_if_exposed(a.host, auth=a.api_key is not None, tls=a.ssl_certfile is not None)
    service = ReportService(a.bundle, backend=a.backend, threads=a.threads, queue_size=a.queue_size,
                            max_request_bytes=int(a.max_request_mb * 2**20), beams=a.beams,
                            upload_budget_bytes=int(a.upload_budget_mb * 2**20) if a.upload_budget_mb else None,
                            body_timeout_s=a.body_timeout,
                            max_new_tokens=a.max_new_tokens, policy=policy_from_args(a))
    config = uvicorn.Config(create_app(service, api_key=a.api_key), host=a.host, port=a.port, log_config=None, access_log=False,
                            lifespan="on", server_header=False, timeout_graceful_shutdown=int(math.ceil(a.graceful_timeout)),
                            http=head_timeout_protocol(a.header_timeout), h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            ssl_certfile=a.ssl_certfile, ssl_keyfile=a.ssl_keyfile)
    server = uvicorn.Server(config)
    service.on_fatal = lambda: setattr(server, "should_exit", True)

    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown), then re-raises the signal once it is done;
    # these handlers receive that re-raise, so a graceful stop exits 0 instead of dying by the signal.
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: received.append(s))
    server.run()
    if service.state == "failed":
        print("emrrg-serve: error: the bundle could not be loaded (see the log above)", file=sys.stderr)
        raise SystemExit(2)
    if not server.started:
        raise SystemExit(1)
    if received:
        log.info("exited after %s", signal.Signals(received[0]).name)


if __name__ == "__main__":  # pragma: no cover
    serve_main()
