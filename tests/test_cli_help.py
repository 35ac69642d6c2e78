"""Every console script: `--version`, and a `--help` that shows each option's default.

The parser of each command in pyproject.toml's [project.scripts] is captured as the command builds it
(CommandParser.parse_args is stopped before it parses), then each option is checked as argparse would
print it: a help text that states the default, by value ("(default: 4)") or in words ("(default: the
bundle's setting)"). A bare "(default: None)" says nothing and counts as missing."""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from emrrg import __version__
from emrrg.runtime.helpfmt import CommandParser, DefaultsHelpFormatter

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def capture_parser(entry: str, monkeypatch) -> argparse.ArgumentParser:
    mod, fn = entry.split(":")
    def stop(self, *args, **kwargs):
        raise _Captured(self)
    monkeypatch.setattr(CommandParser, "parse_args", stop)
    with pytest.raises(_Captured) as got:
        getattr(importlib.import_module(mod), fn)([])
    return got.value.parser


def test_every_script_is_checked():
    assert len(SCRIPTS) >= 10, sorted(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_shows_every_default(name, monkeypatch):
    p = capture_parser(SCRIPTS[name], monkeypatch)
    fmt = DefaultsHelpFormatter(p.prog)
    missing = []
    for a in p._actions:
        if not a.option_strings or isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if a.help == argparse.SUPPRESS or a.required:   # a required option has no default to show
            continue
        text = fmt._expand_help(a) if a.help and a.help.strip() else ""   # argparse prints nothing without help
        if "default" not in text.lower() or re.search(r"\(default: None\)$", text):
            missing.append(f"{'/'.join(a.option_strings)}: {a.help!r}")
    assert not missing, f"{name}: options whose --help does not state the default:\n" + "\n".join(missing)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_version(name, monkeypatch):
    p = capture_parser(SCRIPTS[name], monkeypatch)
    assert "--version" in p._option_string_actions, name


def test_version_prints_and_exits_zero():
    r = subprocess.run([sys.executable, "-c", "from emrrg.runtime.cli import run_main; run_main(['--version'])"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"emrrg-run (emrrg {__version__})", (r.stdout, r.stderr)
