"""Build hook: `pip wheel .` compiles the SelectiveScan op library with CMake into the wheel.

Everything else (metadata, extras, entry points, the package-dir mapping) is in pyproject.toml. This file adds
one step to setuptools' build: build_ext runs CMake on plugins/ (the ONNX Runtime headers fetched the way
scripts/build_plugins.sh fetches them, or taken from $ORT_INCLUDE_DIR) and copies libemrrg_ops.so into
emrrg/runtime/lib/ of the wheel, where emrrg.runtime.oplib looks first. The wheel is therefore a platform wheel
(cp311-cp311-linux_x86_64, or linux_aarch64 when built on a Jetson).

CUDA and TensorRT stay off unless asked for: EMRRG_BUILD_CUDA=1 adds libemrrg_ops_cuda.so (the op library with
CUDA-EP kernels, for onnxruntime-gpu) when nvcc and the CUDA toolkit are found. EMRRG_NATIVE=1 compiles for
this CPU only. JOBS=N sets the parallel compile jobs.

Editable installs (`pip install -e .`, what scripts/setup.sh does) compile nothing here and leave the source
folders alone: scripts/build_plugins.sh builds build/plugins/, which oplib finds in a source checkout.
"""
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
LIB_SUBDIR = ("emrrg", "runtime", "lib")  # keep in step with emrrg.runtime.oplib.PACKAGE_LIB_DIR
LIBRARIES = ("libemrrg_ops.so", "libemrrg_ops_cuda.so")


def _on(name: str, default: str) -> str:
    return "ON" if os.environ.get(name, default).strip().lower() in ("1", "on", "true", "yes") else "OFF"


class BinaryDistribution(Distribution):
    """The wheel carries a compiled library, so it is tagged for this Python and platform."""

    def has_ext_modules(self):
        return True


class BuildOpLibrary(build_ext):
    """CMake build of plugins/ into build_temp, the op libraries copied into the package in build_lib."""

    def run(self):
        self._outputs = []
        if getattr(self, "editable_mode", False) or self.inplace:
            return
        if shutil.which("cmake") is None:  # a clear line instead of a FileNotFoundError traceback
            raise SystemExit("emrrg: building the wheel compiles the SelectiveScan op library and needs CMake >= 3.18 "
                             "and a C++17 compiler (g++ or clang++): install them (e.g. apt-get install cmake g++), "
                             "or install emrrg from a wheelhouse built elsewhere (scripts/wheelhouse.sh)")
        include = os.environ.get("ORT_INCLUDE_DIR", "").strip()
        if not include:
            fetched = subprocess.run(["bash", str(ROOT / "scripts" / "fetch_ort_headers.sh")], check=True,
                                     stdout=subprocess.PIPE, text=True)
            include = fetched.stdout.strip().splitlines()[-1]
        build = Path(self.build_temp).resolve() / "plugins"
        subprocess.run(["cmake", "-S", str(ROOT / "plugins"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        f"-DORT_INCLUDE_DIR={include}", f"-DEMRRG_NATIVE={_on('EMRRG_NATIVE', '0')}",
                        f"-DEMRRG_BUILD_CUDA={_on('EMRRG_BUILD_CUDA', '0')}", "-DEMRRG_BUILD_TENSORRT=OFF"],
                       check=True)
        subprocess.run(["cmake", "--build", str(build), "-j", os.environ.get("JOBS", str(os.cpu_count() or 1))],
                       check=True)
        if not (build / LIBRARIES[0]).is_file():
            raise RuntimeError(f"the CMake build in {build} did not produce {LIBRARIES[0]}")
        dest = Path(self.build_lib).joinpath(*LIB_SUBDIR)
        dest.mkdir(parents=True, exist_ok=True)
        for name in LIBRARIES:
            if (build / name).is_file():
                shutil.copy2(build / name, dest / name)
                self._outputs.append(str(dest / name))

    def get_outputs(self):
        return list(getattr(self, "_outputs", []))


setup(distclass=BinaryDistribution, cmdclass={"build_ext": BuildOpLibrary})
