"""argparse help that shows every default once (torch-free; every emrrg CLI uses it)."""
from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter, except where the help already says its default in words
    (e.g. "(default: the bundle's setting)"): then "(default: None)" is not appended after it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)
