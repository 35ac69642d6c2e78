"""argparse help that shows every default once (torch-free; every emrrg CLI uses it)."""
from __future__ import annotations

import argparse

from emrrg.runtime import logs


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter, except where the help already says its default in words
    (e.g. "(default: the bundle's setting)"): then "(default: None)" is not appended after it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """The parser of every emrrg command: help with defaults (DefaultsHelpFormatter), `--version`, and
    -q/--quiet, -v/--verbose and EMRRG_LOG_LEVEL, applied by parse_args (runtime/logs.py).

    log_format: a logging format for services (default `PROG: message`); log_names: more logger names that
    count as the command's own, so their INFO lines are shown (e.g. uvicorn)."""

    def __init__(self, *args, log_format: str | None = None, log_names: tuple[str, ...] = (), **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        from emrrg import __version__

        self.log_format, self.log_names = log_format, log_names
        self.add_argument("--version", action="version", version=f"%(prog)s (emrrg {__version__})")
        logs.add_verbosity_arguments(self)

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        try:
            name = logs.level_name(ns.log_level)
        except logs.LogLevelError as e:
            self.exit(2, f"{self.prog}: error: {e}\n")
        logs.configure(self.prog, name, fmt=self.log_format, own=self.log_names)
        return ns


# ---- argument types and options shared by the runtime commands (emrrg-run, -serve, -scp, -batch) ----------
def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def count_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def add_decoding_arguments(p: argparse.ArgumentParser, min_new_tokens: bool = True, applies_to: str = "") -> None:
    """--beams / --max-new-tokens [/ --min-new-tokens]: per-run overrides of the bundle's decoding settings.

    applies_to: what the override is for, in the help (emrrg-serve: " for requests that give none")."""
    p.add_argument("--beams", type=positive_int, default=None,
                   help=f"beam count{applies_to} (default: the bundle's setting; 1 = greedy)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help=f"max new tokens{applies_to} (default: the bundle's setting)" if applies_to
                   else "(default: the bundle's setting)")
    if min_new_tokens:
        p.add_argument("--min-new-tokens", type=count_int, default=None, help="(default: the bundle's setting)")
