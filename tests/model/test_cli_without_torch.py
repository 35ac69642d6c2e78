"""The PyTorch commands on a runtime-only install: one line naming the extra, exit 2, no traceback.

Each command runs in a subprocess whose import system refuses `torch` (a meta-path finder raising
ModuleNotFoundError, what a missing package raises), so the check is the real entry point on a Python
that cannot import torch. The wheelhouse test covers a venv that never had it."""
import subprocess
import sys
import textwrap

import pytest

BLOCK_TORCH = textwrap.dedent("""
    import importlib, importlib.abc, sys
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, NoTorch())
    mod, fn = sys.argv[1].split(":")
    sys.argv = [mod] + sys.argv[2:]
    getattr(importlib.import_module(mod), fn)()
""")


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
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, entry, *[a.format(tmp=tmp_path) for a in args]],
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'emrrg[export]'" in lines[0]
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "run").exists()


def test_option_errors_still_come_first_without_torch(tmp_path):
    """emrrg-export validates --extra-options before it asks for torch: the typo is the error shown."""
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "emrrg.export.cli:export_main", str(tmp_path), "-o",
                        str(tmp_path / "b"), "--extra-options", "block_size=7"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "block_size" in r.stderr and "PyTorch" not in r.stderr, r.stderr


def test_runtime_cli_help_without_torch():
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "emrrg.runtime.cli:run_main", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "emrrg-run" in r.stdout, r.stderr
