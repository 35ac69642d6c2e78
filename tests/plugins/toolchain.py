"""Where the plugin tests find the CUDA toolkit's and TensorRT's headers (compile-only: no library is linked).

TensorRT headers: every folder holding NvInferRuntime.h among
  1. EMRRG_TENSORRT_INCLUDE_DIRS, folders separated by os.pathsep (CI sets it to the public headers of the
     TensorRT versions we target, e.g. 10.3 for JetPack 6 and 11.1);
  2. $TENSORRT_ROOT/include (a tar/zip install, as plugins/CMakeLists.txt takes it);
  3. the Debian/Ubuntu and JetPack package locations /usr/include/{x86_64,aarch64}-linux-gnu.
CUDA headers: the first folder holding cuda_runtime_api.h among $CUDA_HOME/include, $CUDA_PATH/include,
the toolkit of the nvcc on PATH, and /usr/local/cuda/include.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

TRT_DIRS_ENV = "EMRRG_TENSORRT_INCLUDE_DIRS"
TRT_SYSTEM_DIRS = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu")


def cuda_include_dir() -> Path | None:
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parents[1]))
    roots.append("/usr/local/cuda")
    for root in roots:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return Path(root) / "include"
    return None


def tensorrt_version(include_dir: Path) -> str:
    """'10.3', '11.1', ... from NvInferVersion.h (11.x defines NV_TENSORRT_MAJOR through TRT_MAJOR_ENTERPRISE)."""
    text = (include_dir / "NvInferVersion.h").read_text(errors="replace")
    found = dict(re.findall(r"#define\s+(NV_TENSORRT_MAJOR|NV_TENSORRT_MINOR|TRT_MAJOR_ENTERPRISE|"
                            r"TRT_MINOR_ENTERPRISE)\s+(\w+)", text))

    def value(name: str) -> str:
        v = found.get(name, "?")
        return found.get(v, v)  # one level of indirection: NV_TENSORRT_MAJOR -> TRT_MAJOR_ENTERPRISE -> 11

    return f"{value('NV_TENSORRT_MAJOR')}.{value('NV_TENSORRT_MINOR')}"


def tensorrt_include_dirs() -> list[Path]:
    candidates = [d for d in os.environ.get(TRT_DIRS_ENV, "").split(os.pathsep) if d.strip()]
    if os.environ.get("TENSORRT_ROOT"):
        candidates.append(str(Path(os.environ["TENSORRT_ROOT"]) / "include"))
    candidates += TRT_SYSTEM_DIRS
    found: list[Path] = []
    for d in candidates:
        p = Path(d).expanduser().resolve()
        if (p / "NvInferRuntime.h").is_file() and (p / "NvInferVersion.h").is_file() and p not in found:
            found.append(p)
    return found


NO_TENSORRT_REASON = (f"no TensorRT headers found: set {TRT_DIRS_ENV} to folders holding NvInferRuntime.h "
                      f"(separated by '{os.pathsep}'), or TENSORRT_ROOT, or install the TensorRT dev package")
