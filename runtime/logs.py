"""How loud every emrrg command is: -q/--quiet, -v/--verbose and EMRRG_LOG_LEVEL, in one place. Torch-free.

CommandParser (runtime/helpfmt.py) adds -q/-v to every console command and calls `configure` right after
parsing, so each command gets the same behaviour without code of its own:

* emrrg's own messages (loggers under "emrrg") go to stderr as `PROG: message` at the chosen level:
  -q = warning (errors and warnings only), default = info (or EMRRG_LOG_LEVEL), -v = debug.
* Third-party noise is dropped unless --verbose: other libraries' log records below ERROR, their
  Future/Deprecation warnings and the UserWarnings of torch.onnx / transformers / torchvision, and ONNX
  Runtime's own log (graph warnings such as "Removing initializer ...": `ort_severity()`).
* Progress bars only on a terminal: `Progress` draws a tqdm bar when its stream is a TTY and writes a plain
  line at most every PLAIN_EVERY_S seconds otherwise (log files, pipes, CI); nothing with -q.
* Results (the report, a summary, the one `--json` document) are printed on stdout by the commands
  themselves, whatever the level; everything else goes to stderr.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from typing import IO, Sequence

ENV = "EMRRG_LOG_LEVEL"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
QUIET, DEFAULT, VERBOSE = "warning", "info", "debug"
# ONNX Runtime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. Its warnings are about graphs emrrg
# wrote and checked itself (unused initializers, pre-processing hints), so only errors unless --verbose.
ORT_QUIET, ORT_VERBOSE = 3, 2
PLAIN_EVERY_S = 10.0  # a plain progress line at most this often: enough to see it move, few lines in a log file
# Python warnings from libraries whose advice is for developers of emrrg, not for its users.
_NOISY_WARNING_MODULES = (r"torch\.onnx.*", r"torch\._dynamo.*", r"torch\.export.*", r"transformers.*",
                          r"torchvision.*", r"onnxscript.*", r"onnx_ir.*", r"peft.*", r"onnxruntime.*")

_state = {"level": logging.INFO, "prog": "emrrg", "own": ("emrrg",)}


class LogLevelError(ValueError):
    """EMRRG_LOG_LEVEL holds a value that is not a level name."""


def add_verbosity_arguments(p) -> None:
    """-q/--quiet and -v/--verbose (one or the other) on an argparse parser; dest `log_level`."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=QUIET, default=None,
                   help=f"print only results, warnings and errors (default: ${ENV}, else {DEFAULT})")
    g.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=VERBOSE,
                   help="also print debug lines and other libraries' warnings (ONNX Runtime, torch.onnx, ...) "
                        "(default: off)")


def level_name(flag: str | None = None, environ=os.environ) -> str:
    """The level's name: -q/-v when given, else EMRRG_LOG_LEVEL, else info. A bad EMRRG_LOG_LEVEL: LogLevelError."""
    if flag:
        return flag
    text = (environ.get(ENV) or "").strip().lower()
    if not text:
        return DEFAULT
    if text not in LEVELS:
        raise LogLevelError(f"{ENV}={environ.get(ENV)!r} is not a log level; set it to one of "
                            f"{', '.join(LEVELS)} (or unset it)")
    return text


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and _state["level"] <= logging.DEBUG:
            msg += "\n" + self.formatException(record.exc_info)
        own = _is_own(record.name)
        kind = "" if record.levelno == logging.INFO and own else f"{record.levelname.lower()}: "
        where = "" if own else f"{record.name}: "
        return f"{_state['prog']}: {where}{kind}{msg}"


def _is_own(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in _state["own"])


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (a test's capture, a redirect), never to a
    stream that was replaced or closed since configure() ran."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _ThirdPartyFilter(logging.Filter):
    """Other libraries' records pass only from ERROR up, unless --verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _is_own(record.name) or record.levelno >= logging.ERROR or _state["level"] <= logging.DEBUG


def configure(prog: str, name: str = DEFAULT, fmt: str | None = None, own: Sequence[str] = ()) -> int:
    """Set up logging for command `prog` at level `name` (level_name's result); returns the numeric level.

    `fmt`: a logging format for long-running services (timestamps) instead of `PROG: message`; `own`: more
    logger names treated as the command's own (e.g. uvicorn for emrrg-serve). Safe to call again."""
    level = LEVELS[name]
    _state.update(level=level, prog=prog, own=("emrrg", *own))
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_emrrg", False)), None)
    if handler is None:
        handler = _StderrHandler()
        handler._emrrg = True
        handler.addFilter(_ThirdPartyFilter())
        root.addHandler(handler)
    handler.setFormatter(logging.Formatter(fmt) if fmt else _Formatter())
    root.setLevel(logging.WARNING)  # other libraries: warnings and errors at most (their debug is a flood)
    for n in _state["own"]:
        logging.getLogger(n).setLevel(level)
    quiet_warnings()
    if "onnxruntime" in sys.modules:  # else whoever imports it calls quiet_onnxruntime(): parsing stays light
        quiet_onnxruntime()
    if level > logging.DEBUG:  # transformers' own handler reads this when it first logs ("generation flags ...")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return level


def level() -> int:
    """The numeric level configure() set (INFO before any command configured it)."""
    return _state["level"]


def verbose() -> bool:
    return _state["level"] <= logging.DEBUG


def quiet() -> bool:
    return _state["level"] > logging.INFO


def quiet_warnings() -> None:
    """Unless --verbose: ignore Future/Deprecation warnings and the UserWarnings of _NOISY_WARNING_MODULES.
    Warnings a command records itself (catch_warnings(record=True), e.g. emrrg-run's) are not affected."""
    if verbose():
        return
    for cat in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=cat)
    for module in _NOISY_WARNING_MODULES:
        warnings.filterwarnings("ignore", category=UserWarning, module=module)


@contextlib.contextmanager
def results_only_stdout():
    """Inside: Python-level prints to stdout go to stderr, so that a command's stdout holds only its result
    (the one --json document) whatever a library prints on the way."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def ort_severity() -> int:
    """SessionOptions.log_severity_level for every ONNX Runtime session emrrg makes."""
    return ORT_VERBOSE if verbose() else ORT_QUIET


def quiet_onnxruntime() -> None:
    """ONNX Runtime's default logger at ort_severity(): it covers the sessions emrrg does not create itself
    (the INT8 calibrator's, onnxruntime.quantization's), whose graph warnings otherwise reach the console.
    Imports onnxruntime: called where it is about to be used (Runtime.from_pretrained, the torch commands)."""
    try:
        import onnxruntime as ort
    except ImportError:  # the torch-side commands run without it too
        return
    ort.set_default_logger_severity(ort_severity())


def torch_loggers_quiet() -> None:
    """After `import torch` (which resets its loggers' levels): torch.onnx's registration lines, e.g. 'torchvision
    is not installed. Skipping ...' once per operator, only with --verbose. Does not import torch itself."""
    if not verbose():
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)


class Progress:
    """A progress display on `stream` (stderr): a tqdm bar on a terminal, a plain line at most every
    PLAIN_EVERY_S seconds (and one at the end) otherwise, nothing when quiet or `enabled` is False. `units`
    names what is counted, plural as the plain line prints it ("3/8 studies")."""

    def __init__(self, total: int, desc: str, units: str = "steps", enabled: bool = True, stream: IO | None = None):
        self.total, self.desc, self.units, self.n, self.note = total, desc, units, 0, ""
        self.stream = stream or sys.stderr
        self.t0 = self.shown = time.perf_counter()
        self.on = enabled and not quiet()
        self.bar = None
        if self.on and _isatty(self.stream):
            try:
                from tqdm import tqdm
            except ImportError:  # the runtime extra has no tqdm: plain lines
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, file=self.stream, leave=True, dynamic_ncols=True,
                                bar_format="{desc}: {n}/{total} [{elapsed}<{remaining}] {postfix}")

    def set_note(self, note: str) -> None:
        """What is running now (a step's name): the bar's postfix, the plain line's tail."""
        self.note = note
        if self.bar is not None:
            self.bar.set_postfix_str(note)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.on and (time.perf_counter() - self.shown >= PLAIN_EVERY_S or self.n >= self.total):
            self._line()

    def _line(self) -> None:
        self.shown = time.perf_counter()
        note = f" ({self.note})" if self.note else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.units}, {self.shown - self.t0:.0f} s{note}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False
