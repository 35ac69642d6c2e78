"""Quiet, scriptable commands (runtime/logs.py): -q/-v/EMRRG_LOG_LEVEL on every console script, a tiny
`emrrg-export --int8` that prints only the lines the user asked for, one JSON document on the stdout of each
--json command (the export with ORT's percentile calibrator too), progress bars only on a terminal.

The commands run as the user runs them: the installed console scripts in a subprocess, stdout and stderr
captured apart (so not a terminal), on the tiny checkpoint and bundle of tests/conftest.py."""
from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from emrrg.assets import chest_dicom
from emrrg.export.quantize_encoder import ENCODER_INT8_LADDER
from emrrg.runtime import logs
from emrrg.runtime.helpfmt import CommandParser
from tests.test_cli_help import SCRIPTS, capture_parser

BIN = Path(sys.executable).parent
EXPORT_TIMEOUT_S = 600  # a tiny INT8 + 4-bit export takes ~20-60 s on a loaded 2-core machine; margin for more
RUN_TIMEOUT_S = 180
PTY_READ_WAIT_S = 1.0   # after the bar closed, its last bytes are in the pty at once; 1 s is margin on a loaded machine

# What a default `emrrg-export --int8` may print, by stream. stdout: the summary the command exists to print.
SUMMARY = (re.compile(r"wrote \S+: [\d.]+ MiB in [\d.]+ s$"),
           re.compile(r"  \w+ +\S+ +[\d.]+ MiB$"),                       # one row per artifact
           re.compile(r"  decoder reference: .+$"))
# stderr: plain progress lines (stderr is not a terminal here) and the INT8 ladder's verdict per rung tried.
PROGRESS = re.compile(r"emrrg-export: \d+/\d+ steps, \d+ s( \(.+\))?$")
LADDER = re.compile(r"emrrg-export: int8 encoder \S+: (pass|miss) \(held-out mean token cosine [\d.]+\)$")
STEPS_INT8_4BIT = 8       # export/pipeline.py _steps() with --int8 and --llm-bits 4


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != logs.ENV}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _export(checkpoint: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "emrrg-export"), str(checkpoint), "-o", str(out), *args], capture_output=True,
                       text=True, timeout=EXPORT_TIMEOUT_S, env=_env(**env))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _unexpected(lines: list[str], allowed) -> list[str]:
    return [ln for ln in lines if not any(p.match(ln) for p in allowed)]


def test_tiny_int8_export_prints_only_what_was_asked(tiny_checkpoint, tmp_path):
    r = _export(tiny_checkpoint, tmp_path / "b", "--int8")
    out, err = r.stdout.splitlines(), r.stderr.splitlines()
    assert not _unexpected(out, SUMMARY), out
    assert out[0].startswith("wrote ") and len(out) >= 1 + 5, out      # the summary line and its artifact rows
    assert not _unexpected(err, (PROGRESS, LADDER)), err                # no ORT / torch.onnx / calibrator lines
    assert "\r" not in r.stderr, "a progress bar was drawn into a pipe"
    assert sum(bool(PROGRESS.match(ln)) for ln in err) <= STEPS_INT8_4BIT
    assert 1 <= sum(bool(LADDER.match(ln)) for ln in err) <= len(ENCODER_INT8_LADDER)


def test_quiet_export_prints_the_summary_alone(tiny_checkpoint, tmp_path):
    r = _export(tiny_checkpoint, tmp_path / "b", "--int8", "--llm-bits", "32", "-q")
    assert r.stderr == ""
    assert not _unexpected(r.stdout.splitlines(), SUMMARY), r.stdout


def test_export_json_with_the_percentile_calibrator(tiny_checkpoint, tmp_path):
    """ORT's percentile calibrator print()s "Collecting tensor data and making histogram ..." on stdout: the
    whole stdout must still be one JSON document."""
    r = _export(tiny_checkpoint, tmp_path / "b", "--int8", "--json", "--extra-options", "encoder_method=percentile")
    summary = json.loads(r.stdout)
    assert summary["artifacts"]["encoder"]["precision"] == "int8"
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["calibration"]["method"] == "percentile"
    assert "Collecting tensor data" not in r.stderr                       # the calibrator's prints: only with -v
    assert not _unexpected(r.stderr.splitlines(), (PROGRESS, LADDER)), r.stderr


@pytest.mark.parametrize("flags", [(), ("-q",), ("-v",)])
def test_run_json_is_one_document(tiny_bundle, flags):
    r = subprocess.run([str(BIN / "emrrg-run"), str(tiny_bundle), str(chest_dicom()), "--json", "--beams", "1",
                        "--max-new-tokens", "3", *flags], capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                       env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["tokens"] >= 1
    if flags == ("-q",):
        assert r.stderr == ""


def test_run_quiet_prints_the_report_alone(tiny_bundle):
    args = [str(BIN / "emrrg-run"), str(tiny_bundle), str(chest_dicom()), "--beams", "1", "--max-new-tokens", "3"]
    loud = subprocess.run(args, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_env())
    quiet = subprocess.run(args + ["-q"], capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=_env())
    assert loud.returncode == quiet.returncode == 0, (loud.stderr, quiet.stderr)
    assert loud.stderr.startswith("[ort-") and quiet.stderr == ""       # the timing line, not with -q
    assert loud.stdout == quiet.stdout != ""
    by_env = subprocess.run(args, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                            env=_env(**{logs.ENV: "warning"}))
    assert by_env.stderr == "" and by_env.stdout == quiet.stdout


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_has_quiet_and_verbose(name, monkeypatch):
    p = capture_parser(SCRIPTS[name], monkeypatch)
    for flag in ("-q", "--quiet", "-v", "--verbose"):
        assert flag in p._option_string_actions, (name, flag)


def test_level_from_flags_then_environment(monkeypatch, capsys):
    def level(*argv: str) -> int:
        CommandParser(prog="emrrg-x").parse_args(list(argv))
        return logs.level()

    try:
        monkeypatch.delenv(logs.ENV, raising=False)
        assert level() == logs.LEVELS["info"]
        assert level("-q") == logs.LEVELS["warning"] and logs.quiet() and logs.ort_severity() == logs.ORT_QUIET
        assert level("--verbose") == logs.LEVELS["debug"] and logs.verbose()
        assert logs.ort_severity() == logs.ORT_VERBOSE
        monkeypatch.setenv(logs.ENV, "ERROR")
        assert level() == logs.LEVELS["error"]
        assert level("-v") == logs.LEVELS["debug"]                      # a flag wins over the environment
        with pytest.raises(SystemExit) as e:
            CommandParser(prog="emrrg-x").parse_args(["-q", "-v"])
        assert e.value.code == 2
        capsys.readouterr()
        monkeypatch.setenv(logs.ENV, "loud")
        with pytest.raises(SystemExit) as e:
            CommandParser(prog="emrrg-x").parse_args([])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "EMRRG_LOG_LEVEL='loud'" in err and "debug" in err
    finally:
        monkeypatch.delenv(logs.ENV, raising=False)
        CommandParser(prog="pytest").parse_args([])                     # back to the default for later tests


def test_progress_plain_lines_off_a_terminal():
    stream = io.StringIO()
    bar = logs.Progress(3, "emrrg-test", units="steps", stream=stream)
    for name in ("a", "b", "c"):
        bar.set_note(name)
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and lines and lines[-1].startswith("emrrg-test: 3/3 steps")
    assert len(lines) <= 3


def test_progress_bar_on_a_terminal():
    pytest.importorskip("tqdm")
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))   # a terminal 80 columns wide
    with os.fdopen(slave, "w") as tty:
        bar = logs.Progress(2, "emrrg-test", units="steps", stream=tty)
        bar.update()
        bar.update()
        bar.close()
    drawn = b""
    while select.select([master], [], [], PTY_READ_WAIT_S)[0]:   # the pty hands the output over in pieces
        try:
            chunk = os.read(master, 65536)
        except OSError:   # EIO: the terminal side is closed and everything was read
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    drawn = drawn.decode(errors="replace")
    assert "\r" in drawn and "2/2" in drawn


def test_progress_silent_when_quiet_or_disabled(monkeypatch):
    stream = io.StringIO()
    logs.Progress(1, "x", enabled=False, stream=stream).update()
    try:
        CommandParser(prog="pytest").parse_args(["-q"])
        logs.Progress(1, "x", stream=stream).update()
    finally:
        CommandParser(prog="pytest").parse_args([])
    assert stream.getvalue() == ""
