"""emrrg-serve's service: one Runtime behind a bounded queue (admission, upload budget, decoding uploads
through the input gate, generation), without HTTP. Torch-free; the HTTP app and the CLI are emrrg.runtime.serve."""
from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from emrrg.runtime.bundle import BundleError
from emrrg.runtime.gate import InputPolicy, ViewInfo, check_study, read_view
from emrrg.runtime.preprocess import ImageBytes, ImageError, RefusedInputError, describe_unknown, load_image, sniff

log = logging.getLogger("emrrg.serve")

DEFAULT_QUEUE_SIZE = 4
DEFAULT_MAX_REQUEST_MB = 64.0
DEFAULT_BODY_TIMEOUT_S = 30.0  # a whole body: 64 MiB at 20 Mbit/s; a console on a LAN sends it in well under 1 s
UPLOAD_BUDGET_FACTOR = 4      # default --upload-budget-mb: this many maximal uploads read at once
RECENT_GENERATIONS = 20       # generation times averaged for Retry-After
FIRST_GENERATION_GUESS_S = 2.0  # Retry-After's seconds per queued request before any generation has run
RETRY_AFTER_CAP_S = 3600


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
        from emrrg.runtime.report_runtime import Runtime

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


def per_request_s(recent: list[float]) -> float:
    """Mean of the recent generation times; FIRST_GENERATION_GUESS_S before any generation has run."""
    return sum(recent) / len(recent) if recent else FIRST_GENERATION_GUESS_S


def retry_after_s(depth: int, per_request: float) -> int:
    """Retry-After for a full queue: ceil(requests admitted x seconds per request), >= 1, <= RETRY_AFTER_CAP_S."""
    return int(min(RETRY_AFTER_CAP_S, max(1, math.ceil(depth * per_request))))
