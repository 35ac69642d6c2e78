"""The PyTorch commands on a runtime-only install: one line naming the extra, exit 2, no traceback.

Each command runs in a subprocess whose import system refuses `torch` (a meta-path finder raising
ModuleNotFoundError, what a missing package raises), so the check is the real entry point on a Python
that cannot import torch. The wheelhouse test covers a venv that never had it."""
import pytest

from tests.import_blocker import run_blocked


@pytest.mark.parametrize("entry,args", [
    ("emrrg.cli:init_main", ["-o", "{tmp}/ckpt"]),
    ("emrrg.cli:import_main", ["{tmp}/upstream.pth", "-o", "{tmp}/ckpt"]),
    ("emrrg.cli:generate_main", ["{tmp}/ckpt", "{tmp}/x.png"]),
    ("emrrg.train:train_main", ["--data", "{tmp}/annotation.json", "-o", "{tmp}/run"]),
    ("emrrg.export.cli:export_main", ["{tmp}/ckpt", "-o", "{tmp}/bundle"]),
])
def test_torch_command_without_torch_names_the_extra(tmp_path, entry, args):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    r = run_blocked("torch", entry, *[a.format(tmp=tmp_path) for a in args])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'emrrg[export]'" in lines[0]
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "run").exists()


def test_option_errors_still_come_first_without_torch(tmp_path):
    """emrrg-export validates --extra-options before it asks for torch: the typo is the error shown."""
    r = run_blocked("torch", "emrrg.export.cli:export_main", str(tmp_path), "-o", str(tmp_path / "b"),
                    "--extra-options", "block_size=7")
    assert r.returncode == 2 and "block_size" in r.stderr and "PyTorch" not in r.stderr, r.stderr


def test_runtime_cli_help_without_torch():
    r = run_blocked("torch", "emrrg.runtime.cli:run_main", "--help")
    assert r.returncode == 0 and "emrrg-run" in r.stdout, r.stderr
