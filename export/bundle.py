"""Bundle writer: everything goes into a hidden temporary sibling, then one rename publishes it.

Interrupting an export (Ctrl-C, SIGTERM, an error, a full disk) removes the temporary directory, so
no bundle and no partial files are left. A SIGKILL cannot be caught; its leftover `.NAME.tmp-PID`
directory is removed by the next export into the same folder once that PID is gone.
The layout, the names and the manifest's schema are the contract (`emrrg.runtime.contract`), shared with the
reader (`emrrg.runtime.bundle`); write_manifest checks its output against it before the bundle is published.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from emrrg import __version__
from emrrg.runtime.bundle import file_entry
from emrrg.runtime.contract import (FORMAT, FORMAT_VERSION, MANIFEST, BundleError, check_embedding, check_paths,
                                parse_manifest)
from emrrg.export.errors import ExportError, disk_full_message, is_disk_full  # ExportError stays importable from here

TMP_MARK = ".tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(out: Path) -> None:
    for p in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """`kill PID` should clean up like Ctrl-C does: turn SIGTERM into KeyboardInterrupt while we write."""
    try:
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publishable_modes(root: Path) -> None:
    """Files 0644 and folders 0755 (less the umask): some writers (torch's external data) create 0600 files,
    and a bundle is read by other accounts (the console's service user) than the one that exported it."""
    mask = _current_umask()
    os.chmod(root, 0o755 & ~mask)
    for p in root.rglob("*"):
        os.chmod(p, (0o755 if p.is_dir() else 0o644) & ~mask)


@contextmanager
def staged_bundle(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes `out` (atomically), on any failure it vanishes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; choose another --output or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _sigterm_as_interrupt():
            yield tmp
            _publishable_modes(tmp)
            if out.exists():  # --overwrite: swap the old bundle out only once the new one is complete
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise ExportError(disk_full_message(e, out.parent)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill in format fields, per-artifact bytes/sha256, and the list of every file; check the result against
    the contract exactly as the runtime will read it (ExportError if it breaks it); write manifest.json."""
    files = {p.relative_to(root).as_posix(): file_entry(root, p.relative_to(root).as_posix())
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}
    for art in manifest.get("artifacts", {}).values():
        for key in ("bytes", "sha256"):
            art[key] = files[art["path"]][key]
        art["bytes"] += sum(files[d]["bytes"] for d in art.get("data", []))
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "emrrg_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **manifest, "files": files}
    text = json.dumps(full, indent=2, default=_jsonable)
    try:
        check_embedding(check_paths(root, parse_manifest(json.loads(text), MANIFEST), MANIFEST), MANIFEST)
    except BundleError as e:
        raise ExportError(f"the bundle being written breaks the bundle contract, nothing was written "
                          f"(an emrrg-export bug; please report it): {e}") from None
    (root / MANIFEST).write_text(text)
    return full


def _jsonable(x):
    try:
        import numpy as np
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def share_external_data(root: Path, models: list[str], data_name: str, threshold: int = 1024,
                        align: int = 4096) -> dict[str, Any]:
    """Store the large initializers of several ONNX files in `root` once, in one external-data file.

    The custom-op encoder and its pure-ONNX twin carry the same weights (f32, or the same INT8 Q/DQ
    initializers): shipped inline, every bundle would hold them twice. Each distinct tensor (by dtype,
    shape and bytes) of at least `threshold` bytes is written once to `root/data_name`, at an `align`ed
    offset (ORT maps it), and every file that holds it points there. Tensors the files do not share are
    written there too. ONNX Runtime and TensorRT's parser resolve the location next to the model file.
    Returns {'data': data_name, 'bytes', 'tensors', 'shared'}.
    """
    import hashlib

    import onnx
    from onnx import external_data_helper, numpy_helper

    seen: dict[str, tuple[int, int]] = {}
    refs = 0
    with open(root / data_name, "wb") as f:
        for name in models:
            m = onnx.load(str(root / name))
            for t in m.graph.initializer:
                if not t.HasField("raw_data"):
                    if t.data_type == onnx.TensorProto.STRING:
                        continue
                    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
                if len(t.raw_data) < threshold:
                    continue
                key = hashlib.sha256(f"{t.data_type}:{list(t.dims)}:".encode() + t.raw_data).hexdigest()
                if key not in seen:
                    off = -f.tell() % align
                    f.write(b"\0" * off)
                    seen[key] = (f.tell(), len(t.raw_data))
                    f.write(t.raw_data)
                offset, length = seen[key]
                external_data_helper.set_external_data(t, location=data_name, offset=offset, length=length)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                refs += 1
            tmp = root / f"{name}.partial"
            tmp.write_bytes(m.SerializeToString())
            os.replace(tmp, root / name)
            del m
    for name in models:
        onnx.checker.check_model(str(root / name))
    return {"data": data_name, "bytes": (root / data_name).stat().st_size, "tensors": len(seen),
            "shared": refs - len(seen)}
