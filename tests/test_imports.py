"""Every module imports from a plain checkout on sys.path, with no install (README, "Layout").

The subprocess starts with `-S` (no site processing, so no .pth file and no editable-install finder), puts the
checkout first on sys.path and site-packages after it (the dependencies, not emrrg), then imports each module
under its installed name. Each module's source is also compiled with warnings as errors (an invalid escape
sequence in a docstring is a SyntaxWarning today and an error in a later Python).
"""
import json
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import emrrg

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # ~100 imports, torch, transformers and onnx among them, in one fresh interpreter on a loaded 2-core machine

# Modules whose import needs an optional extra that the test environment may lack: skipped by name, with why.
OPTIONAL = {
    "emrrg.runtime.batch": ("ray", "the batch extra (Ray Data)"),
    "emrrg.runtime.serve": ("fastapi", "the serve extra (FastAPI)"),
    "emrrg.runtime.serve_app": ("fastapi", "the serve extra (FastAPI)"),
    "emrrg.runtime.serve_models": ("pydantic", "the serve extra (FastAPI's pydantic)"),
}

CHILD = r"""
import importlib, json, sys, warnings
checkout, names = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = [checkout]
out = {"meta_path": [type(f).__name__ for f in sys.meta_path], "errors": {}, "files": {}}
for name in names:
    try:
        mod = importlib.import_module(name)
        out["files"][name] = getattr(mod, "__file__", None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(open(mod.__file__, encoding="utf-8").read(), mod.__file__, "exec")
    except BaseException as e:
        out["errors"][name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def package_dirs() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def all_modules() -> dict[str, Path]:
    """Every .py module of the installed packages, by import name -> source file of the checkout."""
    mods = {}
    for pkg, folder in package_dirs().items():
        root = REPO / folder
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def test_checkout_finder_matches_pyproject():
    mapped = {k: v for k, v in package_dirs().items() if k.replace(".", "/") != v}
    assert mapped == emrrg.SOURCE_FOLDERS


def test_every_module_imports_from_a_plain_checkout():
    mods = all_modules()
    assert "emrrg.runtime.generation" in mods and "emrrg.export.bundle" in mods and "emrrg.ops.directions" in mods
    optional_missing = {m: why for m, (dep, why) in OPTIONAL.items()
                        if subprocess.run([sys.executable, "-c", f"import {dep}"], capture_output=True).returncode}
    names = [m for m in mods if m not in optional_missing]
    env_path = site.getsitepackages()
    child = f"import sys; sys.path += {env_path!r}\n" + CHILD
    r = subprocess.run([sys.executable, "-S", "-c", child, str(REPO), json.dumps(names)], capture_output=True,
                       text=True, timeout=TIMEOUT_S, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not any("editable" in f.lower() for f in out["meta_path"]), out["meta_path"]   # really no install
    assert out["errors"] == {}, "\n".join(f"{k}: {v}" for k, v in out["errors"].items())
    for name, path in out["files"].items():
        assert Path(path) == mods[name], (name, path)
    if optional_missing:
        print("skipped:", "; ".join(f"{m} ({why} is not installed)" for m, why in optional_missing.items()))
    print(f"{len(out['files'])} modules imported from {REPO} without an install")


@pytest.mark.parametrize("folder", ["emrrg", "runtime", "export"])
def test_no_relative_imports(folder):
    """Absolute `emrrg.` imports only: a relative one across folders names a folder that does not exist."""
    import re
    bad = []
    for f in sorted((REPO / folder).rglob("*.py")):
        rel = str(f.relative_to(REPO))
        bad += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(f.read_text().splitlines(), 1)
                if re.match(r"\s*from \.", line)]
    assert not bad, "relative imports:\n" + "\n".join(bad)
