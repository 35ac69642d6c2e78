"""emrrg-export's error contract: every known failure is one line `emrrg-export: error: ...`, exit 2, and nothing
is left behind; --extra-options are checked against one table (export/options.py) before any work starts.

The full-disk test runs twice, each time making the export's own writes fail in the kernel (nothing is patched):
on a 512 KiB tmpfs mounted for the test (ENOSPC; skipped where this process may not mount, i.e. without root /
CAP_SYS_ADMIN), and under a file-size limit on the exporting process (RLIMIT_FSIZE with SIGXFSZ ignored, so a
write past it fails with EFBIG; runs everywhere).
"""
import inspect
import os
import pkgutil
import re
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

import emrrg.export
from emrrg.export.cli import export_main, one_line
from emrrg.export.errors import ExportError, OptionError
from emrrg.export.options import EXTRA_OPTIONS, OPTIONS, check_extra_options, extra_help, split_extra_options

REPO = Path(__file__).resolve().parents[2]
# The tiny checkpoint's f32 bundle is ~1.1 MiB (its encoder alone ~0.45 MiB): a disk of half that fills mid-export.
SMALL_DISK = "512k"
FILE_SIZE_LIMIT = 128 * 1024  # bytes per file: encoder.weights and decoder.onnx are larger
# Teacher-forced top-1 is a fraction of positions: no decoder reaches more than 1.0.
UNREACHABLE_TOP1 = 1.01
HEAVY_MODULES = ("torch", "onnx", "onnxruntime", "transformers")
_PROBE = ("import sys\nfrom emrrg.export.cli import export_main\ntry:\n    export_main(sys.argv[1:])\n"
          "except SystemExit as e:\n    code = e.code\n"
          f"print(repr([m for m in {HEAVY_MODULES!r} if m in sys.modules]), code)\n")


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return [ln for ln in lines if ln.startswith("emrrg-export:")]


def cli(argv, **kw):
    return subprocess.run([sys.executable, "-m", "emrrg.export.cli", *argv, "--no-progress"], capture_output=True,
                          text=True, cwd=REPO, timeout=600, **kw)


def test_bad_value_fails_before_any_work(tmp_path):
    """block_size=7 with a checkpoint that does not exist: the message is about the option (so it was checked
    first), and neither torch nor onnx was imported."""
    r = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "no-such-checkpoint"), "-o", str(tmp_path / "b"),
                        "--extra-options", "block_size=7"], capture_output=True, text=True, cwd=REPO, timeout=120)
    loaded, code = r.stdout.strip().rsplit(" ", 1)
    assert code == "2" and loaded == "[]", (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr          # exactly one line
    line = r.stderr.strip()
    assert line.startswith("emrrg-export: error: --extra-options block_size=7:"), line
    assert "16, 32, 64, 128" in line and "checkpoint" not in line, line
    assert os.listdir(tmp_path) == []


def test_misspelled_key_lists_the_known_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_main([str(tmp_path / "ck"), "-o", str(tmp_path / "b"), "--extra-options", "blok_size=32", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(error_lines(err)) == 1 == len(err.strip().splitlines()), err
    assert "unknown key 'blok_size' (did you mean block_size?)" in err
    assert all(o.key in err for o in EXTRA_OPTIONS), err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, needles", [
    (["--llm-bits", "32", "--extra-options", "block_size=32"], ["block_size", "4-bit decoder", "--llm-bits 4"]),
    (["--extra-options", "encoder_method=entropy"], ["encoder_method", "INT8 encoder", "--int8"]),
    (["--extra-options", "block_size"], ["KEY=VALUE", "'block_size'"]),
    (["--extra-options", "block_size=32", "block_size=64"], ["given twice"]),
    (["--extra-options", "symmetric=true", "method=affine"], ["contradicts"]),
])
def test_option_errors_are_one_line(tmp_path, capsys, argv, needles):
    with pytest.raises(SystemExit) as e:
        export_main([str(tmp_path / "ck"), "-o", str(tmp_path / "b"), *argv, "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(error_lines(err)) == 1 == len(err.strip().splitlines()), err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("key, bad", [("block_size", "7"), ("block_size", "2048"), ("block_size", "32.0"),
                                      ("symmetric", "ture"), ("lm_head_bits", "16"), ("accuracy_level", "5"),
                                      ("method", "nf4"), ("refine", "-1"), ("eval_prompts", "0"),
                                      ("encoder_smooth_alpha", "1.5"), ("encoder_smooth_alpha", "nan"),
                                      ("encoder_method", "mse"), ("encoder_w3_float", "maybe"),
                                      ("encoder_float_worst_inputs", "-0.1")])
def test_bad_values_name_the_key_the_value_and_what_it_takes(key, bad):
    with pytest.raises(OptionError) as e:
        check_extra_options({key: bad}, int8=True, llm_bits=4)
    assert str(e.value) == f"--extra-options {key}={bad}: {key} takes {OPTIONS[key].allowed()}"


def test_values_are_typed_and_defaults_come_from_the_code():
    import emrrg.export.decoder_eval as de
    from emrrg.export.pipeline import ExportOptions, _ladder
    from emrrg.export.quantize_decoder import DEFAULT_LADDER, QuantConfig

    v = check_extra_options(split_extra_options(["block_size=64", "symmetric=YES", "encoder_smooth_alpha=0",
                                                 "encoder_w3_float=off"]), int8=True, llm_bits=4)
    assert v == {"block_size": 64, "symmetric": True, "encoder_smooth_alpha": 0.0, "encoder_w3_float": False}
    (cfg,) = _ladder(v)
    assert (cfg.block_size, cfg.method, cfg.lm_head_bits, cfg.accuracy_level) == (64, "sym", 8, 4)
    assert _ladder(check_extra_options({"eval_tokens": "8"}, int8=False, llm_bits=4)) is DEFAULT_LADDER
    assert ExportOptions(extra={"method": "asym"}).values() == {"method": "asym"}
    q = QuantConfig()
    assert [OPTIONS[k].default for k in ("block_size", "method", "lm_head_bits", "accuracy_level", "refine")] == \
        [q.block_size, q.method, q.lm_head_bits, q.accuracy_level, q.refine]
    assert OPTIONS["prompt_tokens"].default == de.PROMPT_TOKENS
    import emrrg.export.quantize_encoder as qe
    q_int8 = inspect.signature(qe.quantize_int8).parameters
    assert OPTIONS["encoder_method"].choices == qe.CALIBRATION_METHODS
    assert OPTIONS["encoder_method"].default == q_int8["method"].default
    assert OPTIONS["encoder_smooth_alpha"].default == q_int8["smooth_alpha"].default == \
        qe.ENCODER_INT8_LADDER[0]["smooth_alpha"]


def test_help_and_readme_list_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        export_main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert " ".join(extra_help().split()) in help_text
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Export"):readme.index("\n## ", readme.index("## Export") + 1)]
    for o in EXTRA_OPTIONS:
        default = str(o.default).lower() if isinstance(o.default, bool) else str(o.default)
        assert re.search(rf"`{o.key}`\s*\|\s*`{re.escape(default)}`", section), f"README: {o.key} default {default}"


def test_every_export_error_derives_from_export_error():
    import importlib

    found = {}
    for m in pkgutil.iter_modules(emrrg.export.__path__):
        if m.name == "tensorrt_engine":
            continue  # reads the runtime's TensorRT errors; defines none
        mod = importlib.import_module(f"emrrg.export.{m.name}")
        for name, cls in vars(mod).items():
            if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == mod.__name__:
                found[name] = cls
    assert {"ExportError", "QuantizationError", "NoPassingConfigError", "ValidationError", "CalibrationError",
            "DecoderExportError", "ScanExportError", "OptionError"} <= set(found)
    assert not [n for n, c in found.items() if not issubclass(c, ExportError)]
    import emrrg.export.quantize_decoder as qd
    import emrrg.export.quantize_encoder as qe
    from emrrg.export.bundle import ExportError as from_bundle
    assert qd.QuantizationError is qe.QuantizationError and from_bundle is ExportError


def test_one_line_joins_multi_line_details():
    assert one_line("encoder.onnx misses its thresholds {...}:\n  held_out: NMSE 1\n  calibration: cos 0") == \
        "encoder.onnx misses its thresholds {...}: held_out: NMSE 1; calibration: cos 0"


def test_export_bundle_checks_options_before_the_checkpoint(tmp_path):
    from emrrg.export.pipeline import ExportOptions, export_bundle
    with pytest.raises(OptionError, match="did you mean encoder_method"):
        export_bundle(tmp_path / "no-such-checkpoint", tmp_path / "b",
                      ExportOptions(int8=True, extra={"encoder_methd": "minmax"}), progress=False)
    assert os.listdir(tmp_path) == []


def test_strict_without_a_passing_decoder_config(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """--strict and a 4-bit threshold no decoder can meet: one line, exit 2, no bundle and no staging directory."""
    import emrrg.export.quantize_decoder as qd

    monkeypatch.setattr(qd, "TOP1_MIN", UNREACHABLE_TOP1)
    out = tmp_path / "out" / "b"
    out.parent.mkdir()
    with pytest.raises(SystemExit) as e:
        export_main([str(tiny_checkpoint), "-o", str(out), "--llm-bits", "4", "--strict", "--no-progress",
                     "--extra-options", "block_size=32", "eval_prompts=1", "eval_tokens=4", "prompt_tokens=64"])
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert e.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("emrrg-export: error: --strict: 4-bit decoder: no configuration reached top-1 >= 1.01")
    assert "nothing was written" in lines[0] and "--llm-bits 32" in lines[0]
    assert os.listdir(out.parent) == []


@contextmanager
def small_disk(path: Path):
    """A SMALL_DISK tmpfs mounted at `path`; skips where this process may not mount one."""
    path.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs", str(path)], capture_output=True,
                           text=True)
    except OSError as e:  # no mount(8) here
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _limit_file_size():  # preexec_fn of the exporting process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


@pytest.mark.parametrize("full", ["tmpfs", "file-size limit"])
def test_full_disk_leaves_nothing(tiny_checkpoint, tmp_path, full):
    disk = tmp_path / "disk"
    if full == "tmpfs":
        with small_disk(disk):
            r = cli([str(tiny_checkpoint), "-o", str(disk / "b"), "--llm-bits", "32"])
            left = os.listdir(disk)
    else:
        disk.mkdir()
        r = cli([str(tiny_checkpoint), "-o", str(disk / "b"), "--llm-bits", "32"], preexec_fn=_limit_file_size)
        left = os.listdir(disk)
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(error_lines(r.stderr)) == 1 == len(r.stderr.strip().splitlines()), r.stderr[-3000:]
    assert ("no space left on the device" if full == "tmpfs" else "file-size limit") in r.stderr, r.stderr
    assert "nothing was written" in r.stderr
    assert left == []


def test_refine_applies_to_affine_and_asym_not_sym():
    """refine: least-squares grid refits for affine, AWQ's clipping search for asym (what the ladder's asym AWQ rung
    uses); symmetric rounding has neither."""
    from emrrg.export.options import OptionError, check_extra_options

    for method in ("affine", "asym"):
        assert check_extra_options({"method": method, "refine": "6"}, int8=False, llm_bits=4)["refine"] == 6
    with pytest.raises(OptionError, match="method=affine or asym"):
        check_extra_options({"method": "sym", "refine": "6"}, int8=False, llm_bits=4)
