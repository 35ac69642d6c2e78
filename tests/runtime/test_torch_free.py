"""emrrg.runtime must run where torch is not installed: import every runtime module with torch blocked.

A fresh interpreter installs a `sys.meta_path` finder that records and refuses every import of
torch (hard or soft: `try: import torch except ImportError` counts too, since it pulls torch in
wherever torch is installed). It then imports each module found by walking the package with
pkgutil, so new modules are covered without editing this file, and preprocesses real X-rays.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs in a child interpreter: sys.argv[1:] are extra module names to import (the canary test uses it).
HARNESS = r'''
import importlib, json, pkgutil, sys, traceback

attempts = []

class BlockTorch:
    """Refuse torch as if it were not installed, and remember who asked."""
    def find_spec(self, name, path=None, target=None):
        if name != "torch" and not name.startswith("torch."):
            return None
        frames = [f for f in traceback.extract_stack()[:-1]
                  if not f.filename.startswith("<frozen") and "importlib" not in f.filename]
        attempts.append({"module": name, "importer": f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"})
        raise ModuleNotFoundError(f"No module named {name!r} (blocked by test_torch_free)", name=name)

sys.meta_path.insert(0, BlockTorch())

errors = {}
def record_error(name):
    errors[name] = traceback.format_exc(limit=-1).strip().splitlines()[-1]

import emrrg.runtime
modules = ["emrrg.runtime"]
for info in pkgutil.walk_packages(emrrg.runtime.__path__, "emrrg.runtime.", onerror=record_error):
    if info.name.rsplit(".", 1)[-1] != "__main__":  # importing __main__ would run the CLI
        modules.append(info.name)
for name in modules + sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        record_error(name)

shapes = []
try:
    from emrrg.assets import chest_dicom, pneumonia_images
    from emrrg.runtime.preprocess import preprocess, preprocess_study
    shapes.append(list(preprocess(chest_dicom("RG1_J2KR.dcm")).shape))
    shapes.append(list(preprocess_study(pneumonia_images()[:2]).shape))
except Exception:
    record_error("preprocess")

print(json.dumps({
    "modules": modules + sys.argv[1:],
    "errors": errors,
    "torch_attempts": attempts,
    "torch_loaded": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
    "shapes": shapes,
}))
'''


def run_harness(*extra_modules: str, pythonpath: Path | None = None) -> dict:
    env = None
    if pythonpath is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pythonpath), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", HARNESS, *extra_modules], capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, f"harness crashed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runtime_never_imports_torch() -> None:
    report = run_harness()
    print("imported:", *report["modules"], sep="\n  ")
    assert "emrrg.runtime.preprocess" in report["modules"]
    assert not report["torch_attempts"], f"runtime modules tried to import torch: {report['torch_attempts']}"
    assert not report["torch_loaded"]
    assert not report["errors"], f"runtime modules failed to import without torch: {report['errors']}"
    assert report["shapes"] == [[3, 224, 224], [2, 3, 224, 224]]


@pytest.mark.parametrize("body", ["import torch\n", "try:\n    import torch\nexcept ImportError:\n    torch = None\n",
                                  "from torch import nn\n"], ids=["hard", "soft", "from"])
def test_harness_catches_a_torch_import(tmp_path: Path, body: str) -> None:
    # The check must be able to fail: a module that imports torch, in any form, is reported.
    (tmp_path / "canary_runtime_module.py").write_text(body)
    report = run_harness("canary_runtime_module", pythonpath=tmp_path)
    print(report["torch_attempts"])
    assert any("canary_runtime_module.py" in a["importer"] for a in report["torch_attempts"])
    assert not report["torch_loaded"]


# Windows has no `resource` module: the runtime must import and still report a peak RSS figure without it.
NO_RESOURCE = r'''
import builtins, importlib.abc, json, sys

class BlockResource(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "resource":
            raise ModuleNotFoundError("No module named 'resource'", name=name)
        return None

sys.modules.pop("resource", None)
sys.meta_path.insert(0, BlockResource())
real_open = builtins.open
def no_proc(file, *a, **k):  # no VmHWM either, as on Windows and macOS (psutil keeps its own sources)
    if str(file) == "/proc/self/status":
        raise FileNotFoundError(file)
    return real_open(file, *a, **k)
builtins.open = no_proc

import emrrg.runtime.cli, emrrg.runtime.report_runtime, emrrg.runtime.serve
from emrrg.runtime.report_runtime import peak_rss_mb
print(json.dumps({"rss": peak_rss_mb(), "resource": "resource" in sys.modules}))
'''


def test_runtime_imports_and_measures_without_resource_module():
    r = subprocess.run([sys.executable, "-c", NO_RESOURCE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["resource"] is False
    # On Linux psutil itself imports `resource`, so here the figure is the documented 0.0 ("no figure");
    # on Windows psutil has no such import and reports the peak working set.
    assert isinstance(out["rss"], float) and out["rss"] >= 0.0
