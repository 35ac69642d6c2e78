"""The errors `emrrg.export` raises on purpose, all under one base: `ExportError`.

`emrrg-export` catches ExportError (and the checkpoint / asset / image errors of the modules it reads
from), prints one line `emrrg-export: error: ...` and exits 2; anything else is a bug and keeps its
traceback. Each message says what is wrong and what to do. The module-specific errors derive from
these: CalibrationError (quantize_encoder), DecoderExportError / DecoderValidationError (decoder_onnx),
ScanExportError (onnx_ops). This module imports only the standard library, so every export module can import it.
"""
from __future__ import annotations

import errno
import re

# A full disk: no space (ENOSPC), a quota (EDQUOT), a file-size limit (EFBIG: RLIMIT_FSIZE or the filesystem's)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# ... or a short write that carries no errno: numpy's tofile / np.save says "N requested and M written"
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


class ExportError(RuntimeError):
    """An export that cannot go on; the message says why and what to do."""


class OptionError(ExportError, ValueError):
    """An export option (--extra-options KEY=VALUE, --llm-bits, --target) that is unknown or out of range."""


class QuantizationError(ExportError):
    """A quantized graph cannot be built or breaks a rule of its artifact (INT8 encoder or 4-bit decoder)."""


class NoPassingConfigError(QuantizationError):
    """No quantization configuration meets its accuracy thresholds, and the caller asked for strictness.
    `attempts` holds every configuration tried, with its figures."""

    def __init__(self, msg: str, attempts: list[dict]):
        super().__init__(msg)
        self.attempts = attempts


class ValidationError(ExportError):
    """An exported graph misses a named accuracy threshold against the PyTorch f32 reference."""


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` is a write that failed for lack of space (or a size limit), whichever layer reported it."""
    return isinstance(e, OSError) and (e.errno in DISK_FULL_ERRNOS or
                                       (e.errno is None and bool(_SHORT_WRITE.search(str(e)))))


def disk_full_message(e: OSError, where: object) -> str:
    """One line for a write that failed for lack of space in `where` (or a size limit): nothing was written."""
    what = ("a file reached this process's file-size limit (ulimit -f)" if e.errno == errno.EFBIG else
            f"no space left on the device holding {where}")
    return f"{what} while writing the bundle ({e}); nothing was written — free space or choose another --output"


__all__ = ["ExportError", "OptionError", "QuantizationError", "NoPassingConfigError", "ValidationError",
           "DISK_FULL_ERRNOS", "is_disk_full",
           "disk_full_message"]
