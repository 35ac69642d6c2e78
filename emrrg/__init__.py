"""EMRRG edge runtime: export, quantize and run the EMRRG report generator (arXiv 2510.16776).

This package file must stay torch-free: `emrrg.runtime` is imported through it on machines
that have only numpy, onnxruntime and tokenizers. Model code lives in submodules that are
imported on demand (`emrrg.model`, `emrrg.ops`, ...).
"""
__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by transformers / peft when installed) logs, on every import on AVX-512-BF16 CPUs,
# that it could not fetch a CPU kernel from a model hub through the optional `kernels` package. emrrg never
# downloads anything at run time and does not install `kernels`, so that warning is noise: keep its errors.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)


# A plain checkout on sys.path (no install): pyproject.toml's package-dir installs the folders runtime/ and
# export/ as emrrg.runtime and emrrg.export, and an install (wheel or editable) resolves those names itself.
# Without one, this finder maps exactly those two names to the checkout's folders (README, "Layout").
# tests/test_imports.py checks the table against pyproject.toml and imports every module this way.
SOURCE_FOLDERS = {"emrrg.runtime": "runtime", "emrrg.export": "export"}


def source_checkout():
    """The repository root when this package runs from a source checkout (plugins/ and pyproject.toml beside
    emrrg/: a plain checkout or an editable install), else None (an installed wheel)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "plugins" / "CMakeLists.txt").is_file():
        return root
    return None


class _CheckoutFinder:
    """importlib meta path finder for SOURCE_FOLDERS in a source checkout; appended last, so an install wins."""

    def __init__(self, root):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        import importlib.util

        folder = SOURCE_FOLDERS.get(name)
        if folder is None:
            return None
        init = self.root / folder / "__init__.py"
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


def _install_checkout_finder() -> None:
    import sys
    from pathlib import Path

    root = source_checkout()
    if root is None or (Path(__file__).resolve().parent / "runtime").is_dir():
        return
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutFinder(root))


_install_checkout_finder()
