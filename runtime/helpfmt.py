"""argparse help that shows every default once (torch-free; every emrrg CLI uses it)."""
from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter, except where the help already says its default in words
    (e.g. "(default: the bundle's setting)"): then "(default: None)" is not appended after it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """The parser of every emrrg command: help with defaults (DefaultsHelpFormatter) and `--version`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        from emrrg import __version__

        self.add_argument("--version", action="version", version=f"%(prog)s (emrrg {__version__})")
