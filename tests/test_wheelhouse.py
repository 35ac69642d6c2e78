"""The offline laptop install, exactly as the README gives it: scripts/wheelhouse.sh collects the emrrg platform
wheel (op library inside) and every runtime wheel; a fresh venv installs from it with --no-index and runs a report
with the op library (backend ort-cpu, not the pure-ONNX fallback), and cannot import torch.

Marked `wheelhouse` (deselect with -m 'not wheelhouse'); it needs the package index once, to collect the wheels
(pip's cache makes a second run quick), and compiles the op library into the wheel (about half a minute)."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from emrrg.assets import chest_dicom

pytestmark = pytest.mark.wheelhouse

REPO = Path(__file__).resolve().parents[1]
STEP_TIMEOUT_S = 900  # one step (collect the wheels, install them): generous for a cold pip cache on 2 cores


def _clean_env() -> dict:
    """The environment of a laptop: no op library or build folder pointed at, no source tree on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("EMRRG_OPS_LIB", "EMRRG_BUILD_DIR", "PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PIP_")}
    return env


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    r = subprocess.run(["bash", str(REPO / "scripts" / "wheelhouse.sh"), str(out), "--extras", "runtime"],
                       env={**_clean_env(), "PYTHON": sys.executable}, capture_output=True, text=True,
                       timeout=STEP_TIMEOUT_S)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="module")
def laptop_venv(wheelhouse, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("laptop") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=STEP_TIMEOUT_S)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "install", "-q",
                        "--no-index", "--find-links", str(wheelhouse), "emrrg[runtime]"],
                       env=_clean_env(), cwd=venv.parent, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    assert r.returncode == 0, r.stdout + r.stderr
    return venv


def test_the_wheel_is_a_platform_wheel_with_the_op_library(wheelhouse):
    import zipfile
    (wheel,) = wheelhouse.glob("emrrg-*.whl")
    tag = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert wheel.name.endswith(f"-{tag}.whl") and f"-cp{sys.version_info[0]}{sys.version_info[1]}-" in wheel.name
    assert "emrrg/runtime/lib/libemrrg_ops.so" in zipfile.ZipFile(wheel).namelist()
    assert not list(wheelhouse.glob("torch-*.whl"))


def test_offline_install_runs_a_report_on_the_op_library(laptop_venv, tiny_bundle):
    bin_dir = laptop_venv / "bin"
    r = subprocess.run([str(bin_dir / "emrrg-run"), str(tiny_bundle), str(chest_dicom()), "--json",
                        "--beams", "1", "--max-new-tokens", "4"],
                       env=_clean_env(), cwd=laptop_venv.parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["backend"] == "ort-cpu" and out["tokens"] == 4, out
    # the library it used is the wheel's, inside the venv (no source tree, no build folder)
    where = subprocess.run([str(bin_dir / "python"), "-c",
                            "from emrrg.runtime import oplib; print(oplib.find_op_library()); "
                            "print(oplib.build_tree())"],
                           env=_clean_env(), cwd=laptop_venv.parent, capture_output=True, text=True, timeout=120)
    lib, build = where.stdout.split()
    assert Path(lib).is_relative_to(laptop_venv) and build == "None", where.stdout + where.stderr


def test_offline_install_has_no_torch_and_no_server_stack(laptop_venv):
    for module in ("torch", "fastapi"):
        r = subprocess.run([str(laptop_venv / "bin" / "python"), "-c", f"import {module}"], env=_clean_env(),
                           cwd=laptop_venv.parent, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (module, r.stderr)


def test_offline_install_serve_names_its_extra(laptop_venv, tiny_bundle):
    """emrrg-serve is installed by the runtime extra, without FastAPI: one line naming the serve extra, exit 2."""
    r = subprocess.run([str(laptop_venv / "bin" / "emrrg-serve"), str(tiny_bundle)], env=_clean_env(),
                       cwd=laptop_venv.parent, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "pip install 'emrrg[serve]'" in lines[0], r.stderr

