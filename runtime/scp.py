"""emrrg-scp: a DICOM Storage SCP for X-ray consoles and PACS (pynetdicom). Torch-free.

    emrrg-scp BUNDLE [--ae-title EMRRG] [--host 127.0.0.1] [--port 11112] [--out emrrg-scp-out]
              [--forward HOST:PORT:AET] [--quiet-period 10] [--backend auto] [--threads N] [--beams N]
              [--max-new-tokens N] [--max-megapixels 64] [--allow-modality MOD ...] [--strict-inputs]

What it does, per C-STORE:
- Accepts every storage SOP class in the common transfer syntaxes (uncompressed little / big endian,
  deflated, RLE, JPEG baseline / extended / lossless, JPEG-LS, JPEG 2000: the ones the preprocessing
  decodes), so that the input gate, not the association, decides: a CT, a multi-frame object or an
  oversized image gets a DIMSE failure status 0xC000 with the gate's reason in Error Comment, and one
  log line without patient data.
- Stores what the gate accepts in OUT/studies/<StudyInstanceUID>/images/<SOPInstanceUID>.dcm exactly as
  received, fsynced and renamed into place BEFORE the success status goes back: an acknowledged image
  survives a crash or kill. A disk error answers 0xA700 (out of resources).

Per study (instances grouped by StudyInstanceUID):
- Complete when every association that sent to it has been released, or after --quiet-period seconds
  without a new instance (an aborted association leaves it to the quiet period).
- Then, in one worker thread: the report (Runtime.generate, the input gate over the whole study), the SR
  written to OUT/studies/<uid>/report-sr.dcm (emrrg.runtime.sr), and with --forward a C-STORE of the SR to
  that PACS. status.json records the state (processing / done / failed), the instance count and the
  forwarding; a failure writes FAILED.txt (or FORWARD_FAILED.txt) with the reason, and the images stay.
- On start, every study whose images are not all covered by a finished status.json (the service was
  killed mid-study or mid-report) is queued again after the quiet period. Late instances of a finished
  study start a new report (a new SR) over all its images.

Logs (logger "emrrg.scp") name a study as study#<8 hex of a hash of its UID> and never carry patient
attributes; reasons that may quote them (a PatientID mismatch) are in FAILED.txt next to the images.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import queue
import re
import signal
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from emrrg.runtime.helpfmt import CommandParser, DefaultsHelpFormatter, add_decoding_arguments

log = logging.getLogger("emrrg.scp")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # level: -q / -v / EMRRG_LOG_LEVEL (runtime/logs.py)

DEFAULT_AE_TITLE = "EMRRG"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11112
DEFAULT_QUIET_PERIOD_S = 10.0
STATUS_SUCCESS = 0x0000
STATUS_REFUSED = 0xC000          # Failure: cannot understand (the input gate refuses the instance)
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (the instance could not be stored)
ERROR_COMMENT_MAX = 64           # (0000,0902) Error Comment is an LO: 64 characters
TICK_S = 0.25                    # how often quiet periods are checked
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SR_NAME, STATUS_NAME, FAILED_NAME, FORWARD_FAILED_NAME = "report-sr.dcm", "status.json", "FAILED.txt", "FORWARD_FAILED.txt"


class ScpError(ValueError):
    """A known start-up problem (bad --forward, unusable --out, port in use); one line, says what to do."""


def transfer_syntaxes() -> list[str]:
    from pydicom import uid

    return [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
            uid.ExplicitVRBigEndian, uid.RLELossless, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit,
            uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEGLSNearLossless,
            uid.JPEG2000Lossless, uid.JPEG2000]


def study_tag(study_uid: str) -> str:
    """How logs name a study: a short hash, not the UID."""
    return "study#" + hashlib.sha256(study_uid.encode()).hexdigest()[:8]


def parse_forward(text: str) -> tuple[str, int, str]:
    """'HOST:PORT:AET' -> (host, port, ae_title); ScpError when malformed."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise ScpError(f"--forward {text!r}: expected HOST:PORT:AET, e.g. 127.0.0.1:4242:ORTHANC")
    host, port, aet = parts
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ScpError(f"--forward {text!r}: the port must be a number from 1 to 65535")
    if len(aet) > 16 or not aet.strip():
        raise ScpError(f"--forward {text!r}: an AE title has 1 to 16 characters")
    return host.strip("[]"), int(port), aet


# --------------------------------------------------------------------------- storage on disk

class StudyStore:
    """OUT/incoming (staging) and OUT/studies/<StudyInstanceUID>/{images/, report-sr.dcm, status.json, ...}."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.incoming, self.studies = self.root / "incoming", self.root / "studies"
        try:
            self.incoming.mkdir(parents=True, exist_ok=True)
            self.studies.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ScpError(f"--out {self.root}: cannot create the folders ({e.strerror})") from None
        if not os.access(self.root, os.W_OK):
            raise ScpError(f"--out {self.root}: not writable")
        for stale in self.incoming.glob("*"):     # staged but never acknowledged: the sender will resend
            stale.unlink(missing_ok=True)

    def stage(self, data: bytes) -> Path:
        from emrrg.runtime.sr import atomic_write

        return atomic_write(self.incoming / f"{uuid.uuid4().hex}.dcm", data)

    def study_dir(self, study_uid: str) -> Path:
        return self.studies / study_uid

    def commit(self, staged: Path, study_uid: str, sop_uid: str) -> Path:
        images = self.study_dir(study_uid) / "images"
        images.mkdir(parents=True, exist_ok=True)
        dest = images / f"{sop_uid}.dcm"
        os.replace(staged, dest)
        _fsync_dir(images)
        return dest

    def images(self, study_uid: str) -> list[Path]:
        """The study's images in arrival order."""
        files = list((self.study_dir(study_uid) / "images").glob("*.dcm"))
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def status(self, study_uid: str) -> dict:
        try:
            return json.loads((self.study_dir(study_uid) / STATUS_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def write_status(self, study_uid: str, **status) -> None:
        from emrrg.runtime.sr import atomic_write

        atomic_write(self.study_dir(study_uid) / STATUS_NAME, json.dumps(status, indent=1).encode())

    def write_reason(self, study_uid: str, name: str, reason: str | None) -> None:
        from emrrg.runtime.sr import atomic_write

        path = self.study_dir(study_uid) / name
        if reason is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write(path, (reason.rstrip() + "\n").encode())

    def unfinished(self) -> list[str]:
        """Studies with images that no finished report covers (killed while receiving or reporting)."""
        out = []
        for d in sorted(self.studies.iterdir()):
            if not d.is_dir() or not _UID.match(d.name):
                continue
            n = len(list((d / "images").glob("*.dcm")))
            st = self.status(d.name)
            if n and not (st.get("state") in ("done", "failed") and st.get("instances") == n):
                out.append(d.name)
        return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the SCP

@dataclass
class _Pending:
    last: float = field(default_factory=time.monotonic)   # arrival of the latest instance (monotonic s)
    assocs: set[int] = field(default_factory=set)          # associations that sent to it and are still open


class StorageSCP:
    """Receives, stores and groups instances; one worker thread writes each complete study's report and SR."""

    def __init__(self, runtime, out: str | os.PathLike, ae_title: str = DEFAULT_AE_TITLE,
                 forward: tuple[str, int, str] | None = None, quiet_period: float = DEFAULT_QUIET_PERIOD_S,
                 policy=None, beams: int | None = None, max_new_tokens: int | None = None):
        from emrrg.runtime.gate import InputPolicy

        self.runtime, self.store, self.ae_title = runtime, StudyStore(out), ae_title
        self.forward, self.quiet_period = forward, float(quiet_period)
        self.policy = policy or InputPolicy()
        self.beams, self.max_new_tokens = beams, max_new_tokens
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._ready: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        for uid in self.store.unfinished():
            self._pending[uid] = _Pending()
            log.info("%s: unfinished at start (%d images on disk), queued after the quiet period", study_tag(uid),
                     len(self.store.images(uid)))

    # ---- network -----------------------------------------------------------------------------------
    def start(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ts = transfer_syntaxes()
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ts)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_RELEASED, self.handle_released),
                    (evt.EVT_ABORTED, self.handle_aborted)]
        try:
            self._server = ae.start_server((host, port), block=False, evt_handlers=handlers)
        except OSError as e:
            raise ScpError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another SCP running there? "
                           "choose another --port") from None
        for target in (self._tick, self._work):
            t = threading.Thread(target=target, name=f"emrrg-scp-{target.__name__.strip('_')}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("listening on %s:%d as %s; out %s; forward %s; quiet period %.1f s", host, port, self.ae_title,
                 self.store.root, "%s:%d:%s" % self.forward if self.forward else "off", self.quiet_period)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting, let the report in progress finish (up to `timeout`), stop the threads. Queued studies
        stay on disk and are picked up at the next start."""
        if self._server is not None:
            self._server.shutdown()
        self._stop.set()
        self._ready.put(None)
        for t in self._threads:
            t.join(timeout)

    def handle_store(self, event):
        from emrrg.runtime.gate import check_study, read_view
        from emrrg.runtime.preprocess import ImageError

        calling = event.assoc.requestor.ae_title
        try:
            staged = self.store.stage(event.encoded_dataset(include_meta=True))
        except OSError as e:
            log.error("C-STORE from %s: cannot store the instance (%s): answered 0x%04X", calling,
                      e.strerror or type(e).__name__, STATUS_OUT_OF_RESOURCES)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot store the instance on disk")
        try:
            with warnings.catch_warnings(record=True):    # the gate's warnings go to the study's result
                warnings.simplefilter("always")
                view = read_view(staged, "instance", self.policy.max_megapixels)
                check_study([view], self.policy, reveal_ids=False)
            for what, value in (("StudyInstanceUID", view.study_uid), ("SOPInstanceUID", view.sop_instance_uid)):
                if not value or not _UID.match(value):
                    raise ImageError(f"instance: no valid {what}; the SCP files instances by it")
        except ImageError as e:
            staged.unlink(missing_ok=True)
            reason = str(e).removeprefix("instance: ")
            log.warning("C-STORE from %s refused (0x%04X): %s", calling, STATUS_REFUSED, reason)
            return _status(STATUS_REFUSED, reason)
        try:
            self.store.commit(staged, view.study_uid, view.sop_instance_uid)
        except OSError as e:
            staged.unlink(missing_ok=True)
            log.error("C-STORE from %s: cannot file the instance (%s)", calling, e.strerror or type(e).__name__)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot store the instance on disk")
        with self._lock:
            p = self._pending.setdefault(view.study_uid, _Pending())
            p.last = time.monotonic()
            p.assocs.add(id(event.assoc))
        log.info("C-STORE from %s: %s %s instance stored (%s)", calling, study_tag(view.study_uid),
                 view.modality or "?", view.view_position or "no view position")
        return STATUS_SUCCESS

    def handle_released(self, event) -> None:
        """Association released: its studies are complete unless another open association also sends to them."""
        key = id(event.assoc)
        with self._lock:
            done = [uid for uid, p in self._pending.items() if key in p.assocs and p.assocs == {key}]
            for p in self._pending.values():
                p.assocs.discard(key)
            for uid in done:
                del self._pending[uid]
        for uid in done:
            self._ready.put(uid)

    def handle_aborted(self, event) -> None:
        """Association aborted: the sender may not have finished; its studies wait for the quiet period."""
        key = id(event.assoc)
        with self._lock:
            for p in self._pending.values():
                p.assocs.discard(key)

    # ---- the studies -------------------------------------------------------------------------------
    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            now = time.monotonic()
            with self._lock:
                due = [uid for uid, p in self._pending.items() if now - p.last >= self.quiet_period]
                for uid in due:
                    del self._pending[uid]
            for uid in due:
                self._ready.put(uid)

    def _work(self) -> None:
        while not self._stop.is_set():
            uid = self._ready.get()
            if uid is None:
                return
            try:
                self.process(uid)
            except Exception as e:  # never let one study stop the worker
                log.error("%s: unexpected %s while reporting", study_tag(uid), type(e).__name__)

    def process(self, study_uid: str) -> dict:
        """Report, SR and forwarding for one study; returns the status written to status.json."""
        from emrrg.runtime.sr import write_sr

        tag, images = study_tag(study_uid), self.store.images(study_uid)
        if not images:
            return {}
        status = {"state": "processing", "instances": len(images), "study_instance_uid": study_uid}
        self.store.write_status(study_uid, **status)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                out = self.runtime.generate([str(p) for p in images], num_beams=self.beams,
                                            max_new_tokens=self.max_new_tokens,
                                            max_megapixels=self.policy.max_megapixels,
                                            allow_modality=self.policy.allow_modality,
                                            strict_inputs=self.policy.strict_inputs)
            sr_path = write_sr(self.store.study_dir(study_uid) / SR_NAME, images, out,
                               labels=[f"images/{p.name}" for p in images])
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            self.store.write_reason(study_uid, FAILED_NAME, reason)
            status.update(state="failed", reason=reason)
            # the log line first: status.json is the signal that the study is finished, so whoever waits on it
            # (the console, the tests) finds the line already written
            log.error("%s: report failed (%s); the %d images stay on disk, reason in %s", tag, type(e).__name__,
                      len(images), FAILED_NAME)
            self.store.write_status(study_uid, **status)
            return status
        self.store.write_reason(study_uid, FAILED_NAME, None)
        import pydicom

        sr_uid = str(pydicom.dcmread(sr_path, stop_before_pixels=True).SOPInstanceUID)
        status.update(state="done", sr=SR_NAME, sr_sop_instance_uid=sr_uid, tokens=out["tokens"],
                      stop_reason=out.get("stop_reason"), seconds=round(time.perf_counter() - t0, 2), forwarded=None)
        if self.forward:
            try:
                forward_sr(sr_path, *self.forward, calling_ae_title=self.ae_title)
                status["forwarded"] = "ok"
                self.store.write_reason(study_uid, FORWARD_FAILED_NAME, None)
            except ForwardError as e:
                status["forwarded"] = f"failed: {e}"
                self.store.write_reason(study_uid, FORWARD_FAILED_NAME, str(e))
                log.error("%s: forwarding the SR failed: %s", tag, e)
        log.info("%s: SR written (%d images, %d tokens, %.1f s)%s", tag, len(images), out["tokens"],
                 status["seconds"], ", forwarded" if status["forwarded"] == "ok" else "")
        self.store.write_status(study_uid, **status)
        return status


def _status(code: int, comment: str):
    from pydicom import Dataset

    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:ERROR_COMMENT_MAX]
    return ds


class ForwardError(RuntimeError):
    """The SR could not be C-STOREd to the --forward PACS."""


def forward_sr(path: str | os.PathLike, host: str, port: int, ae_title: str,
               calling_ae_title: str = DEFAULT_AE_TITLE, timeout: float = 30.0) -> None:
    """C-STORE one SR file to a PACS; ForwardError with the reason unless it answers success."""
    from pynetdicom import AE
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    sop_class = dcmread(path, stop_before_pixels=True).SOPClassUID
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise ForwardError(f"no association with {ae_title} at {host}:{port} (refused, rejected or unreachable)")
    try:
        status = assoc.send_c_store(Path(path))
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code != STATUS_SUCCESS:
        shown = "no response" if code is None else f"status 0x{int(code):04X}"
        raise ForwardError(f"{ae_title} at {host}:{port} answered the C-STORE with {shown}")


# --------------------------------------------------------------------------- CLI

def scp_main(argv: list[str] | None = None) -> None:
    from emrrg.runtime.report_runtime import BACKENDS
    from emrrg.runtime.extras import SR_MODULES, require_extra
    from emrrg.runtime.gate import add_input_arguments

    p = CommandParser(prog="emrrg-scp", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter, log_format=LOG_FORMAT)
    p.add_argument("bundle", help="bundle directory written by emrrg-export")
    p.add_argument("--ae-title", default=DEFAULT_AE_TITLE, help="this SCP's AE title")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="DICOM port to listen on")
    p.add_argument("--out", default="emrrg-scp-out", help="folder for received images, SRs and status files")
    p.add_argument("--forward", default=None, metavar="HOST:PORT:AET", help="C-STORE each SR to this PACS (default: keep SRs in --out only)")
    p.add_argument("--quiet-period", type=float, default=DEFAULT_QUIET_PERIOD_S, metavar="S",
                   help="a study is complete after S seconds without a new instance (or at association release)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="execution backend")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    add_decoding_arguments(p, min_new_tokens=False)
    add_input_arguments(p)
    a = p.parse_args(argv)
    require_extra("emrrg-scp", "runtime", ("pynetdicom", *SR_MODULES), "the DICOM Storage SCP")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)   # its DEBUG level dumps whole datasets
    logging.getLogger("highdicom").setLevel(logging.WARNING)    # a line per copied module, per SR

    from emrrg.runtime.bundle import BundleError
    from emrrg.runtime.report_runtime import BackendUnavailableError, Runtime
    from emrrg.runtime.gate import policy_from_args
    from emrrg.runtime.oplib import OpLibraryMissingError

    try:
        if len(a.ae_title) > 16 or not a.ae_title.strip():
            raise ScpError(f"--ae-title {a.ae_title!r}: an AE title has 1 to 16 characters")
        if not 0 < a.port < 65536:
            raise ScpError(f"--port {a.port}: choose a port from 1 to 65535")
        if a.quiet_period <= 0:
            raise ScpError("--quiet-period must be > 0 seconds")
        forward = parse_forward(a.forward) if a.forward else None
        policy = policy_from_args(a)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            rt = Runtime.from_pretrained(a.bundle, backend=a.backend, threads=a.threads)
        for w in caught:
            log.warning("%s", w.message)
        scp = StorageSCP(rt, a.out, a.ae_title, forward, a.quiet_period, policy, a.beams, a.max_new_tokens)
        scp.start(a.host, a.port)
    except (ScpError, BundleError, OpLibraryMissingError, BackendUnavailableError, ValueError) as e:
        print(f"emrrg-scp: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    log.info("stopping: finishing the report in progress")
    scp.stop()
    log.info("stopped")


if __name__ == "__main__":  # pragma: no cover
    scp_main()
