"""emrrg-batch: reports for a whole archive on Ray Data, embedded on this machine or on a Ray cluster.

    emrrg-batch BUNDLE INPUT -o OUT [--address auto|HOST:PORT|ray://HOST:PORT] [--workers N]
                [--threads-per-worker T] [--batch-size B] [--sr] [--resume]

INPUT is a folder tree of DICOM files (grouped into studies by StudyInstanceUID, read by the input gate's
header reader `emrrg.runtime.gate.read_view`; a file without one, a PNG / JPEG or an unreadable file is a
study of its own, keyed by its path relative to INPUT), or a CSV / Parquet manifest with the columns
`study_id` and `path` (one row per image; relative paths are relative to the manifest's folder).

OUT is a Parquet dataset (one file per finished batch, `OUT/part-*.parquet`, each written to a hidden
temporary file and renamed) with exactly one row per study: study_id, status ("ok" or "error"), error
(the reason, one line), report, tokens, stop_reason, backend, bundle_sha256, timings (preprocess_ms,
encoder_ms, prefill_ms, decode_ms, total_ms), the image paths, the gate's view facts and warnings, which
Ray node and process wrote it, and when (finished_at). With --sr each report is also a DICOM SR in OUT/_sr/
(a folder name Parquet readers skip); an SR that cannot be written leaves the report "ok" and says why in
`error`.

Execution (Ray Data):
  1. folder INPUT only: Ray tasks read every file's header (the gate's read_view); the driver groups them.
  2. Ray tasks run the input gate and decode + resize the views of each study (`prepare_study`): the pixels
     the encoder will see, as (V, S, S) gray in [0, 1], so the actors only normalize them.
  3. `map_batches` on a fixed pool of `--workers` actors (`ActorPoolStrategy`), each holding one
     `Runtime` with `--threads-per-worker` ONNX Runtime threads and asking Ray for that many CPUs, so
     workers x threads = the cores used. Without --address Ray starts embedded with exactly that many CPUs,
     no dashboard and no usage reporting; with --address the same job runs on the cluster (the bundle,
     the images and Python with emrrg[runtime,batch] must be at the same paths on every node).
  4. The driver writes each batch of results as one Parquet part (and its SRs) as it arrives.

Nothing lost, nothing twice: every study is caught on its own (a study that fails in the gate, the decoder
or the model becomes an error row; the run goes on). A worker process that dies is restarted by Ray and its
batch retried (`max_restarts=-1`, `max_task_retries=--retries`); a batch that kills its worker on every
retry is dropped by Ray Data (`max_errored_blocks`) and its studies are run again one by one, so only the
study that kills the worker is left, as an error row ("no result: ..."). `--resume` skips the studies OUT already holds for
this bundle (key: study_id + bundle_sha256), so a killed run keeps every part it finished.

Test hooks (environment variables of the emrrg-batch process, forwarded to its actors; for tests of the
fault handling, never set them in production): EMRRG_BATCH_TEST_EXIT_AT=N makes an actor process exit
(os._exit) when it starts its N-th study; with EMRRG_BATCH_TEST_EXIT_ONCE=FILE only the first actor that
gets there (and creates FILE) does. EMRRG_BATCH_TEST_EXIT_ON=STUDY_ID makes every actor exit whenever it
starts that study (a study that kills its worker). EMRRG_BATCH_TEST_DELAY_S=S makes every actor sleep S
seconds before each study, so a run lasts long enough to be interrupted.

Ray and pyarrow come with the `batch` extra (pip install emrrg[batch]); without them the command says so
and exits 2. Torch-free, like the rest of emrrg.runtime.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from emrrg.runtime import logs
from emrrg.runtime.extras import require_extra
from emrrg.runtime.helpfmt import CommandParser, DefaultsHelpFormatter, add_decoding_arguments, count_int, positive_int

PROG = "emrrg-batch"
BATCH_MODULES = ("ray", "pyarrow")   # the batch extra: ray[data], pyarrow
PART_GLOB = "part-*.parquet"
SR_DIR = "_sr"                  # the leading underscore: pyarrow / pandas / Spark skip it when reading OUT
MANIFEST_COLUMNS = ("study_id", "path")
DEFAULT_BATCH_SIZE = 4          # studies per actor call and per Parquet part: small, so a kill loses little
DEFAULT_RETRIES = 3             # retries of a batch whose worker process died (a dead worker always restarts)
MAX_BLOCKS = 10_000             # input blocks; past this, blocks hold more than one batch each
PROGRESS_EVERY_S = 5.0          # the studies/s line, when stderr is not a terminal
EXIT_AT_ENV, EXIT_ONCE_ENV, EXIT_ON_ENV = "EMRRG_BATCH_TEST_EXIT_AT", "EMRRG_BATCH_TEST_EXIT_ONCE", "EMRRG_BATCH_TEST_EXIT_ON"
DELAY_ENV = "EMRRG_BATCH_TEST_DELAY_S"
TEST_HOOKS = (EXIT_AT_ENV, EXIT_ONCE_ENV, EXIT_ON_ENV, DELAY_ENV)
TEST_HOOK_EXIT_CODE = 70
_SKIP_NAMES = {"DICOMDIR"}      # the media directory of a DICOM CD/DVD: an index, not an image


class BatchError(ValueError):
    """A known problem with the command's input, output or options: one line, says what to do."""


@dataclass(frozen=True)
class Study:
    study_id: str
    paths: tuple[str, ...]


# --------------------------------------------------------------------------- Arrow schemas (pyarrow is lazy)

def _schemas():
    import pyarrow as pa

    strings = pa.list_(pa.string())
    ms = [(k, pa.float64()) for k in ("preprocess_ms", "encoder_ms", "prefill_ms", "decode_ms", "total_ms")]
    result = pa.schema([
        ("study_id", pa.string()), ("status", pa.string()), ("error", pa.string()), ("report", pa.string()),
        ("tokens", pa.int32()), ("stop_reason", pa.string()), ("backend", pa.string()),
        ("bundle_sha256", pa.string()), *ms, ("views", pa.int32()), ("paths", strings),
        ("inputs", pa.string()), ("warnings", strings), ("sr_path", pa.string()), ("node_id", pa.string()),
        ("worker_pid", pa.int32()), ("finished_at", pa.timestamp("ms", tz="UTC"))])
    prepared = pa.schema([
        ("study_id", pa.string()), ("paths", strings), ("error", pa.string()), ("preprocess_ms", pa.float64()),
        ("inputs", pa.string()), ("warnings", strings), ("pixels", pa.binary()), ("size", pa.int32())])
    worker = result.append(pa.field("sr", pa.binary()))              # SR bytes, written out by the driver
    headers = pa.schema([("path", pa.string()), ("study_uid", pa.string())])
    return result, prepared, worker, headers


def result_schema():
    """The schema of OUT's rows."""
    return _schemas()[0]


# --------------------------------------------------------------------------- finding the studies

def list_files(root: Path) -> list[str]:
    """Every file under `root`, sorted, skipping hidden files and folders and DICOMDIR indexes."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and f not in _SKIP_NAMES]
    return out


def scan_headers(paths: Sequence[str]) -> list[dict]:
    """path -> StudyInstanceUID (None when the gate's reader finds none or cannot read the file: that
    file becomes a study of its own, and its error row comes from the gate when the study runs)."""
    from emrrg.runtime.gate import read_view

    rows = []
    for p in paths:
        try:
            uid = read_view(p).study_uid
        except Exception:  # noqa: BLE001 - any unreadable file: reported when its study runs
            uid = None
        rows.append({"path": p, "study_uid": uid})
    return rows


def group_studies(rows: Iterable[dict], root: Path) -> list[Study]:
    """Scanned headers -> studies: one per StudyInstanceUID (paths sorted), and one per file without one."""
    by_uid: dict[str, list[str]] = {}
    alone: list[Study] = []
    for r in rows:
        if r["study_uid"]:
            by_uid.setdefault(r["study_uid"], []).append(r["path"])
        else:
            alone.append(Study(Path(r["path"]).relative_to(root).as_posix(), (r["path"],)))
    studies = [Study(uid, tuple(sorted(ps))) for uid, ps in by_uid.items()] + alone
    return sorted(studies, key=lambda s: s.study_id)


def read_manifest(path: Path) -> list[Study]:
    """A CSV or Parquet manifest (columns study_id, path; one row per image) -> studies, in first-seen order."""
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several classes
            raise BatchError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
        columns = table.column_names
        records = table.select([c for c in MANIFEST_COLUMNS if c in columns]).to_pylist() \
            if set(MANIFEST_COLUMNS) <= set(columns) else None
    elif path.suffix.lower() in (".csv", ".tsv"):
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                columns = list(reader.fieldnames or [])
                records = list(reader) if set(MANIFEST_COLUMNS) <= set(columns) else None
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise BatchError(f"{path}: not a readable CSV file ({e})") from None
    else:
        raise BatchError(f"{path}: a manifest must be .csv, .tsv or .parquet; or give a folder of DICOM files")
    if records is None:
        raise BatchError(f"{path}: a manifest needs the columns {', '.join(MANIFEST_COLUMNS)} (one row per image); "
                         f"it has {', '.join(map(str, columns)) or 'none'}")
    groups: dict[str, list[str]] = {}
    for i, r in enumerate(records):
        sid, p = ("" if r.get(k) is None else str(r.get(k)).strip() for k in MANIFEST_COLUMNS)
        if not sid or not p:
            raise BatchError(f"{path}: row {i + 1} has an empty study_id or path; every row names one image of one study")
        groups.setdefault(sid, []).append(str((path.parent / p) if not os.path.isabs(p) else Path(p)))
    return [Study(sid, tuple(ps)) for sid, ps in groups.items()]


# --------------------------------------------------------------------------- OUT: parts, resume keys, SRs

def done_keys(out: Path) -> set[tuple[str, str]]:
    """(study_id, bundle_sha256) of every row in OUT's finished parts."""
    import pyarrow.parquet as pq

    keys: set[tuple[str, str]] = set()
    for part in sorted(out.glob(PART_GLOB)):
        try:
            t = pq.read_table(part, columns=["study_id", "bundle_sha256"])
        except Exception as e:  # noqa: BLE001
            raise BatchError(f"{part}: not a readable Parquet part ({str(e).splitlines()[0][:160]}); move it "
                             "away and rerun with --resume (its studies run again)") from None
        keys.update(zip(t.column("study_id").to_pylist(), t.column("bundle_sha256").to_pylist()))
    return keys


def sr_name(study_id: str) -> str:
    """A file name for a study's SR: the id when it is filename-safe (UIDs are), else a safe form + hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", study_id).strip(".") or "study"
    if safe != study_id:
        import hashlib

        safe = f"{safe[:80]}-{hashlib.sha256(study_id.encode()).hexdigest()[:10]}"
    return f"{safe}.dcm"


class PartWriter:
    """Writes result batches into OUT as Parquet parts (atomically) and skips any study already written."""

    def __init__(self, out: Path, done: set[tuple[str, str]]):
        self.out, self.done = out, done
        self.run = uuid.uuid4().hex[:8]
        self.seq = self.ok = self.errors = self.rows = 0

    def write(self, rows: list[dict]) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from emrrg.runtime.sr import atomic_write

        rows = [r for r in rows if (r["study_id"], r["bundle_sha256"]) not in self.done]
        fresh: dict[tuple[str, str], dict] = {}
        for r in rows:
            fresh.setdefault((r["study_id"], r["bundle_sha256"]), r)      # a study once, even if Ray sent it twice
        rows = list(fresh.values())
        if not rows:
            return 0
        for r in rows:                       # the SRs first: a part on disk means its SRs are there
            sr = r.pop("sr", None)
            if sr:
                (self.out / SR_DIR).mkdir(exist_ok=True)
                path = atomic_write(self.out / SR_DIR / sr_name(r["study_id"]), sr, durable=False)
                r["sr_path"] = str(path)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=result_schema()), buf)
        self.seq += 1
        atomic_write(self.out / f"part-{self.run}-{self.seq:06d}.parquet", buf.getvalue())
        self.done.update(fresh)
        self.rows += len(rows)
        self.ok += sum(r["status"] == "ok" for r in rows)
        self.errors += sum(r["status"] != "ok" for r in rows)
        return len(rows)


# --------------------------------------------------------------------------- stage 2: the gate and the pixels, in tasks

def gray_views(paths: Sequence[str], size: int, max_megapixels: float) -> np.ndarray:
    """Each view decoded and resized as `preprocess` does it, before the ImageNet normalization: (V, S, S) in
    [0, 1]. `preprocess` of one of these (S, S) arrays at size S gives exactly `preprocess(path, S)`."""
    from PIL import Image

    from emrrg.runtime.preprocess import load_image

    out = np.empty((len(paths), size, size), np.float32)
    for i, p in enumerate(paths):
        img = Image.fromarray(np.ascontiguousarray(load_image(p, max_megapixels), dtype=np.float32))  # mode 'F'
        out[i] = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)   # a bilinear mean of [0, 1] values; the clip only removes rounding


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


def prepare_study(study_id: str, paths: Sequence[str], size: int, policy) -> dict:
    """The input gate (headers, then the study checks) and the pixels of one study; never raises: a refused or
    unreadable study comes back with `error` set."""
    from emrrg.runtime.gate import check_study, read_views

    t0 = time.perf_counter()
    row = {"study_id": study_id, "paths": list(paths), "error": None, "inputs": None, "warnings": [],
           "pixels": None, "size": size}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            views = check_study(read_views(list(paths), policy), policy, reveal_ids=False)
            px = gray_views(paths, size, policy.max_megapixels)
        row["inputs"] = json.dumps([v.to_json() for v in views])
        row["warnings"] = list(dict.fromkeys(str(w.message) for w in caught))
        row["pixels"] = px.tobytes()
    except Exception as e:  # noqa: BLE001 - a bad study never stops the run
        row["error"] = _one_line(e)
    row["preprocess_ms"] = 1e3 * (time.perf_counter() - t0)
    return row


class _Prepare:
    """Ray Data task UDF (a plain callable so it pickles by reference): a block of studies -> prepared rows."""

    def __init__(self, size: int, policy):
        self.size, self.policy = size, policy

    def __call__(self, batch):
        import pyarrow as pa

        rows = [prepare_study(r["study_id"], r["paths"], self.size, self.policy) for r in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=_schemas()[1])


def _scan_batch(batch):
    import pyarrow as pa

    return pa.Table.from_pylist(scan_headers(batch.column("path").to_pylist()), schema=_schemas()[3])


# --------------------------------------------------------------------------- stage 3: the model, in actors

class ReportWorker:
    """One Runtime per actor. Called with a batch of prepared studies, returns one result row per study."""

    def __init__(self, bundle: str, threads: int, backend: str, bundle_sha256: str, decode: dict, sr: bool):
        from emrrg.runtime.report_runtime import Runtime

        self.rt = Runtime.from_pretrained(bundle, backend=backend, threads=threads)
        if self.rt.sha256 != bundle_sha256:
            from emrrg.runtime.bundle import BundleError

            raise BundleError(f"{bundle}: this node's bundle (sha256 {self.rt.sha256[:12]}) is not the driver's "
                              f"({bundle_sha256[:12]}); give every node the same bundle")
        self.decode, self.sr = decode, sr
        self.count = 0
        self.exit_at = int(os.environ.get(EXIT_AT_ENV) or 0)
        self.exit_on = os.environ.get(EXIT_ON_ENV)
        self.delay_s = float(os.environ.get(DELAY_ENV) or 0)
        self.node_id, self.pid = _node_id(), os.getpid()

    def __call__(self, batch):
        import pyarrow as pa

        rows = []
        for r in batch.to_pylist():
            rows.append(self.report(r))
            rows[-1]["finished_at"] = datetime.now(timezone.utc)
        return pa.Table.from_pylist(rows, schema=_schemas()[2])

    def _test_hooks(self, study_id: str) -> None:
        self.count += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.exit_on == study_id:
            self._exit(f"{EXIT_ON_ENV}={study_id}")
        if self.exit_at and self.count == self.exit_at:
            once = os.environ.get(EXIT_ONCE_ENV)
            if once:
                try:
                    os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return                    # another actor already took the one fault
            self._exit(f"{EXIT_AT_ENV}={self.exit_at}")

    def _exit(self, hook: str) -> None:
        sys.stderr.write(f"{PROG}: test hook {hook}: worker {self.pid} exits now\n")
        sys.stderr.flush()
        os._exit(TEST_HOOK_EXIT_CODE)

    def report(self, r: dict) -> dict:
        rt = self.rt
        row = {k: None for k in result_schema().names}
        row.update(study_id=r["study_id"], paths=r["paths"], inputs=r["inputs"], warnings=r["warnings"] or [],
                   preprocess_ms=r["preprocess_ms"], views=len(r["paths"]), backend=rt.backend,
                   bundle_sha256=rt.sha256, node_id=self.node_id, worker_pid=self.pid, status="error", sr=None)
        row["total_ms"] = r["preprocess_ms"]
        if r["error"]:
            row["error"] = r["error"]
            return row
        self._test_hooks(r["study_id"])
        try:
            size = int(r["size"])
            px = np.frombuffer(r["pixels"], np.float32).reshape(-1, size, size)
            out = rt.generate(list(px), **self.decode)
        except Exception as e:  # noqa: BLE001 - one study's failure is its own row
            row["error"] = _one_line(e)
            return row
        t = out["timings_ms"]
        row.update(status="ok", report=out["report"], tokens=out["tokens"], stop_reason=out["stop_reason"],
                   encoder_ms=t["encoder"], prefill_ms=t["prefill"], decode_ms=t["decode"],
                   total_ms=r["preprocess_ms"] + t["total"])
        row["preprocess_ms"] = r["preprocess_ms"] + t["preprocess"]
        if self.sr:
            try:
                from emrrg.runtime.sr import build_sr, sr_bytes

                row["sr"] = sr_bytes(build_sr(r["paths"], out))
            except Exception as e:  # noqa: BLE001 - the report stands without its SR
                row["error"] = f"--sr: {_one_line(e)}"
        return row


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (tests call the worker directly)
        return None


# --------------------------------------------------------------------------- the driver

def _import_ray():
    require_extra(PROG, "batch", BATCH_MODULES, "running on Ray Data")       # one line and exit 2 without them
    import ray
    import ray.data  # noqa: F401

    return ray


def start_ray(ray, address: str | None, cpus: int) -> None:
    """Embedded (no address): a private local Ray with `cpus` CPUs, no dashboard, no usage reporting (its gRPC
    ports still listen on every interface, behind Ray's token authentication). With an address: connect."""
    import logging

    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 logging_level=logging.WARNING, configure_logging=True)
    else:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise BatchError(f"--address {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0][:200]}); "
                             "start one with `ray start --head` or check the address") from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _data_context(ray, progress_bars: bool):
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = -1        # a batch whose worker died on every retry: dropped, its studies rerun alone
    ctx.enable_progress_bars = progress_bars
    ctx.print_on_execution_start = False
    return ctx


def list_input(source: Path) -> list[Study] | list[str]:
    """INPUT, before Ray starts: a manifest's studies, or a folder's files (grouped later by `scan_folder`)."""
    if source.is_file():
        found = read_manifest(source)
    elif source.is_dir():
        found = list_files(source)
    else:
        raise BatchError(f"{source}: no such folder or manifest; give a folder of DICOM files or a .csv / .parquet manifest")
    if not found:
        raise BatchError(f"{source}: no {'studies' if source.is_file() else 'files'} in it; nothing to do")
    return found


def scan_folder(ray, source: Path, files: list[str]) -> list[Study]:
    """A folder's files -> studies: Ray tasks read the headers, the driver groups them."""
    ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=min(len(files), MAX_BLOCKS // 10))
    rows: list[dict] = []
    for b in ds.map_batches(_scan_batch, batch_format="pyarrow").iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += b.to_pylist()
    if len(rows) != len(files):
        raise BatchError(f"{source}: the header scan returned {len(rows)} of {len(files)} files; run again")
    return group_studies(rows, source)


def run_pass(ray, studies: list[Study], batch_size: int, writer: PartWriter, a, size: int, policy, sha: str,
             progress) -> None:
    """One Ray Data execution over `studies`: prepare in tasks, report in the actor pool, write every batch."""
    hooks = {k: os.environ[k] for k in TEST_HOOKS if os.environ.get(k)}
    decode = {k: v for k, v in (("num_beams", a.beams), ("max_new_tokens", a.max_new_tokens),
                                ("min_new_tokens", a.min_new_tokens)) if v is not None}
    decode.update(max_megapixels=policy.max_megapixels)
    blocks = max(1, min(MAX_BLOCKS, math.ceil(len(studies) / batch_size)))
    ds = ray.data.from_items([{"study_id": s.study_id, "paths": list(s.paths)} for s in studies],
                             override_num_blocks=blocks)
    with warnings.catch_warnings():   # Ray 2.60 deprecates passing actor options as **ray_remote_args (removed in 2.64)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        ds = ds.map_batches(_Prepare(size, policy), batch_size=batch_size, batch_format="pyarrow",
                            num_cpus=0, compute=ray.data.TaskPoolStrategy(size=a.workers))
        # One by one (the pass after a batch killed its worker on every retry), an actor takes a study only when
        # it is idle: a study queued on the actor that a poison study kills would fail with it, and two deaths
        # (the poison's try and its retry) would use up its own retries (seen in CI: an innocent study lost).
        in_flight = 1 if batch_size == 1 else None
        ds = ds.map_batches(ReportWorker, batch_size=batch_size, batch_format="pyarrow", num_cpus=a.threads,
                            compute=ray.data.ActorPoolStrategy(size=a.workers, max_tasks_in_flight_per_actor=in_flight),
                            runtime_env={"env_vars": hooks} if hooks else None,
                            fn_constructor_args=(a.bundle, a.threads, a.backend, sha, decode, a.sr),
                            max_restarts=-1, max_task_retries=a.retries)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.write(batch.to_pylist())
        progress()


class _Progress:
    """The studies/s line on stderr (at most every PROGRESS_EVERY_S; Ray's bars replace it on a terminal)."""

    def __init__(self, writer: PartWriter, total: int, quiet: bool):
        self.writer, self.total, self.quiet = writer, total, quiet
        self.t0 = self.last = time.monotonic()
        self.start_rows = writer.rows

    def rate(self) -> float:
        return (self.writer.rows - self.start_rows) / max(time.monotonic() - self.t0, 1e-9)

    def __call__(self) -> None:
        now = time.monotonic()
        if self.quiet or now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        done, rate = self.writer.rows - self.start_rows, self.rate()
        eta = f", about {(self.total - done) / rate:.0f} s left" if rate > 0 else ""
        print(f"{PROG}: {done}/{self.total} studies ({self.writer.errors} errors), {rate:.2f} studies/s{eta}",
              file=sys.stderr, flush=True)


def _last_line(e: BaseException) -> str:
    """The last informative line of a Ray error (its text ends with the remote traceback's exception line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and set(ln.strip()) - set("^~ ")]
    return lines[-1][:300] if lines else type(e).__name__


def _lost_row(s: Study, sha: str, reason: str) -> dict:
    row = {k: None for k in result_schema().names}
    row.update(study_id=s.study_id, status="error", error=reason, bundle_sha256=sha, paths=list(s.paths),
               views=len(s.paths), warnings=[], finished_at=datetime.now(timezone.utc))
    return row


def _split(a, cores: int) -> tuple[int, int]:
    """--workers and --threads-per-worker, the missing one (or both) filled so that workers x threads = cores."""
    if a.workers and a.threads:
        return a.workers, a.threads
    if a.workers:
        return a.workers, max(1, cores // a.workers)
    threads = a.threads or 1
    return max(1, cores // threads), threads


def _cluster_split(ray, a) -> tuple[int, int]:
    nodes = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    workers, threads = _split(a, int(sum(nodes)))
    if not any(c >= threads for c in nodes):
        raise BatchError(f"--threads-per-worker {threads}: no node of this cluster has {threads} CPUs "
                         f"(largest: {int(max(nodes, default=0))}); ask for fewer threads per worker")
    if workers * threads > sum(nodes):
        raise BatchError(f"{workers} workers x {threads} threads = {workers * threads} CPUs, but the cluster has "
                         f"{int(sum(nodes))}; ask for fewer workers")
    return workers, threads


def run_batch(a) -> PartWriter:
    """The whole job (argparse namespace `a`, see batch_main); returns the writer with its counts."""
    from emrrg.runtime.bundle import bundle_digest, open_bundle
    from emrrg.runtime.gate import policy_from_args

    ray = _import_ray()
    manifest = open_bundle(a.bundle)                  # every file's sha256, once, before any worker starts
    sha, size = bundle_digest(manifest.raw), manifest.encoder.image_size
    a.bundle = str(Path(a.bundle).resolve())
    source = Path(a.input).resolve()
    out = Path(a.output)
    if out.exists() and not out.is_dir():
        raise BatchError(f"-o {out}: is a file; OUT is a folder (a Parquet dataset)")
    out.mkdir(parents=True, exist_ok=True)
    done = done_keys(out)
    if done and not a.resume:
        raise BatchError(f"-o {out}: already holds results for {len(done)} studies; add --resume to skip them and "
                         "finish the run, or choose an empty folder")
    policy = policy_from_args(a)
    found = list_input(source)
    if a.sr:
        import highdicom  # noqa: F401 - fail now, not after the first batch (emrrg[runtime] installs it)
    if a.address is None:
        a.workers, a.threads = _split(a, len(os.sched_getaffinity(0)))
        start_ray(ray, None, a.workers * a.threads)
    else:
        start_ray(ray, a.address, 0)
    try:
        if a.address is not None:
            a.workers, a.threads = _cluster_split(ray, a)
        _data_context(ray, sys.stderr.isatty())
        studies = found if source.is_file() else scan_folder(ray, source, found)
        writer = PartWriter(out, done)
        pending = [s for s in studies if (s.study_id, sha) not in done]
        if not logs.quiet():
            print(f"{PROG}: {len(studies)} studies, {len(studies) - len(pending)} already in {out}; "
                  f"{a.workers} workers x {a.threads} threads", file=sys.stderr, flush=True)
        progress = _Progress(writer, len(pending), sys.stderr.isatty() or logs.quiet())  # -q: no progress lines
        batch_size = a.batch_size
        while pending:
            run_pass(ray, pending, batch_size, writer, a, size, policy, sha, progress)
            pending = [s for s in pending if (s.study_id, sha) not in writer.done]
            if batch_size == 1 or not pending:
                break
            print(f"{PROG}: {len(pending)} studies were in batches whose worker died on every retry; "
                  "running them one by one", file=sys.stderr, flush=True)
            batch_size = 1
        writer.write([_lost_row(s, sha, f"no result: its Ray task failed {a.retries + 1} times, alone in its batch (a "
                                        "worker process died, or raised outside the per-study guard); see the Ray "
                                        "worker logs") for s in pending])
        rate = progress.rate()
    except ray.exceptions.RayError as e:        # e.g. every actor failed to load the bundle: one line, not a trace
        raise BatchError(f"Ray stopped the run: {_last_line(e)}; the finished parts are kept (rerun with --resume "
                         "once fixed); the Ray logs have the details") from None
    finally:
        ray.shutdown()
    if not logs.quiet():   # -q: the output folder says it all (errors are rows there; failures still exit 2)
        print(f"{PROG}: {writer.rows} studies written to {out} ({writer.ok} reports, {writer.errors} errors), "
              f"{rate:.2f} studies/s", file=sys.stderr, flush=True)
    return writer


def build_parser() -> argparse.ArgumentParser:
    from emrrg.runtime.report_runtime import BACKENDS
    from emrrg.runtime.gate import add_input_arguments

    p = CommandParser(prog=PROG, description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("bundle", help="bundle directory written by emrrg-export (same path on every node)")
    p.add_argument("input", help="a folder tree of DICOM files, or a .csv / .parquet manifest with columns study_id, path")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder: a Parquet dataset, one row per study")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on: auto (the one started on this machine by `ray start`), HOST:PORT or "
                        "ray://HOST:PORT (default: start Ray embedded on this machine)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="model actors, each with one Runtime (default: cores / threads per worker)")
    p.add_argument("--threads-per-worker", dest="threads", type=positive_int, default=None, metavar="T",
                   help="ONNX Runtime threads and Ray CPUs per actor (default: cores / workers, or 1)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, metavar="B",
                   help="studies per actor call and per Parquet part")
    p.add_argument("--retries", type=count_int, default=DEFAULT_RETRIES, metavar="N",
                   help="retries of a batch whose worker process died (the worker itself is always restarted)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="execution backend of every actor")
    add_decoding_arguments(p)
    p.add_argument("--sr", action="store_true", help=f"also write each report as a DICOM SR into OUT/{SR_DIR}/")
    p.add_argument("--resume", action="store_true",
                   help="skip the studies OUT already holds for this bundle (study_id + bundle sha256)")
    add_input_arguments(p)
    return p


def batch_main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    from emrrg.runtime.bundle import BundleError
    from emrrg.runtime.oplib import OpLibraryMissingError

    try:
        run_batch(a)
    except (BatchError, BundleError, OpLibraryMissingError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the finished parts are kept: rerun with --resume to finish", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":  # pragma: no cover
    batch_main()
