"""Commands whose dependencies come through an optional extra: one line naming the extra, exit 2, when missing.

`emrrg-serve` is launched from here (not from serve.py, which imports FastAPI at module level), so a runtime-only
install answers with `pip install 'emrrg[serve]'` instead of a traceback. Torch-free.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Sequence

SERVE_MODULES = ("fastapi", "uvicorn", "python_multipart", "prometheus_client")  # the serve extra (pyproject.toml)
SR_MODULES = ("highdicom",)                                  # DICOM SR output: in the runtime extra


def missing(modules: Sequence[str]) -> list[str]:
    """The modules of `modules` that cannot be imported (found with find_spec, nothing is imported)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install or an import blocker: as good as absent
            found = False
        if not found:
            out.append(name)
    return out


def require_extra(prog: str, extra: str, modules: Sequence[str], what: str) -> None:
    """Print one line naming `extra` and exit 2 when any of `modules` is missing."""
    absent = missing(modules)
    if absent:
        print(f"{prog}: error: {what} needs {', '.join(absent)}, which is not installed; install it with: "
              f"pip install 'emrrg[{extra}]'", file=sys.stderr)
        raise SystemExit(2)


def serve_main(argv: list[str] | None = None) -> None:
    """Entry point of emrrg-serve."""
    require_extra("emrrg-serve", "serve", SERVE_MODULES, "the HTTP service")
    from emrrg.runtime.serve import serve_main as main

    main(argv)
