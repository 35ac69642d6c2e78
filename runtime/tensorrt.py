"""TensorRT backend for the encoder: build an engine on this GPU, cache it, run it. Torch-free.

    from emrrg.runtime import tensorrt as trt_backend

    ok, reason = trt_backend.available()            # never raises; reason says what to install or build
    enc = trt_backend.TensorRTEncoder(bundle_dir, bundle_dir / "encoder.onnx", precision="auto")
    tokens = enc.run(pixel_values)                  # (B, V, 3, S, S) f32 -> (B, L, H) f32 visual tokens

What it needs on the machine that runs it: NVIDIA's `tensorrt` Python package (TensorRT 10.x, e.g. 10.3 on
JetPack 6, or 11.x), a CUDA GPU with its driver, the CUDA runtime library (libcudart; it comes with
TensorRT's pip wheels, JetPack and the CUDA toolkit) and the SelectiveScan plugin library
`libemrrg_trt_plugin.so` (built by `bash scripts/build_plugins.sh` where TensorRT is installed, see
plugins/selective_scan/README.md). `tensorrt` is imported lazily inside functions; device memory goes
through the CUDA runtime via ctypes, so neither torch nor pycuda / cuda-python is needed.

Engines are built on the GPU that runs them (README, "GPU machines"):
  * TensorRT >= 11: a strongly typed network (weak typing is gone in 11); the types come from the ONNX
    file: "int8" = the explicit Q/DQ graph, "fp32" = f32 graph. An f16 engine needs an f16 ONNX file.
  * TensorRT 10.x: explicit quantization with builder flags: "int8" = Q/DQ graph + INT8 + FP16 flags,
    "fp16" = FP16 flag, "fp32" = no flag.
A timing cache per (GPU, TensorRT version) speeds up rebuilds. The engine cache key is the GPU name and
compute capability, the TensorRT version, the precision, the optimization profile and the ONNX file's
sha256; engines live in $EMRRG_ENGINE_CACHE when it is set, else in <bundle>/engines/ when that is
writable, else in $XDG_CACHE_HOME/emrrg/engines (~/.cache/emrrg/engines); see engine_cache_dir. After a build the engine is checked against ONNX Runtime on the CPU (the
reference): reference ms, engine ms and max |Δ| are logged and stored next to the plan (<plan>.json).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from emrrg.runtime.bundle import sha256_file
from emrrg.runtime.contract import ENCODER, ENCODER_FALLBACK, ENCODER_INPUT, ENCODER_OUTPUT, MANIFEST, Manifest, resolve_inside

log = logging.getLogger("emrrg.runtime.tensorrt")

PLUGIN_LIBRARY_NAME = "libemrrg_trt_plugin.so"
PLUGIN_ENV_VAR = "EMRRG_TRT_PLUGIN"
ENGINE_CACHE_ENV_VAR = "EMRRG_ENGINE_CACHE"
PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = "SelectiveScan", "1", "emrrg"  # = selectiveScanPlugin.h
OP_DOMAIN = "com.emrrg"
PRECISIONS = ("auto", "fp32", "fp16", "int8")
BUILD_COMMAND = "bash scripts/build_plugins.sh   (with TensorRT installed; cmake -DTENSORRT_ROOT=/path for a tar install)"
INSTALL_HINT = ("install TensorRT's Python package where the GPU is: `pip install tensorrt` on x86_64 "
                "(TensorRT 10.x/11.x with CUDA 12/13), or JetPack 6.x (TensorRT 10.3) / 7.x (TensorRT 11) on a Jetson "
                "(`sudo apt install python3-libnvinfer`)")
WORKSPACE_BYTES = 1 << 30
# Post-build check against ONNX Runtime CPU. The tokens are LayerNorm'd (O(1)). An f32 engine agrees to
# ~1e-5; fp16 / int8 engines differ by their rounding, which the export already measured against PyTorch.
# Above this NMSE the engine is suspicious (a wrong plugin mapping gives ~1): warn loudly.
WARN_NMSE = 1e-2



class TensorRTBackendError(RuntimeError):
    """TensorRT cannot be used here (not installed, no GPU, no plugin) or an engine failed to build/run."""


# ---------------------------------------------------------------------------------------------------
# Availability
# ---------------------------------------------------------------------------------------------------

def _import_tensorrt():
    try:
        import tensorrt as trt  # noqa: WPS433 (lazy by design: the runtime must import without it)
    except ImportError as e:
        raise TensorRTBackendError(f"TensorRT is not installed ({e}); {INSTALL_HINT}") from None
    except Exception as e:  # a broken install: missing libnvinfer, CUDA mismatch, ...
        raise TensorRTBackendError(f"`import tensorrt` failed: {type(e).__name__}: {e}; reinstall TensorRT "
                                   f"matching this CUDA driver ({INSTALL_HINT})") from None
    return trt


def trt_version() -> str:
    return str(_import_tensorrt().__version__)


def trt_major(version: str | None = None) -> int:
    m = re.match(r"(\d+)", version or trt_version())
    return int(m.group(1)) if m else 0


def plugin_candidates() -> list[Path]:
    """Where find_plugin_library() looks, in order ($EMRRG_TRT_PLUGIN alone when set): the installed package's lib/,
    then the build tree of a source checkout (the op library's places, emrrg.runtime.oplib)."""
    from emrrg.runtime.oplib import PACKAGE_LIB_DIR, build_tree

    env = os.environ.get(PLUGIN_ENV_VAR, "").strip()
    if env:
        p = Path(env).expanduser()
        return [p / PLUGIN_LIBRARY_NAME if p.is_dir() else p]
    build = build_tree()
    return [PACKAGE_LIB_DIR / PLUGIN_LIBRARY_NAME] + ([build / PLUGIN_LIBRARY_NAME] if build is not None else [])


def find_plugin_library() -> Path | None:
    return next((p for p in plugin_candidates() if p.is_file()), None)


def _missing_plugin_message() -> str:
    searched = ", ".join(str(p) for p in plugin_candidates())
    return (f"the TensorRT plugin library {PLUGIN_LIBRARY_NAME} was not found (searched: {searched}); build it with "
            f"{BUILD_COMMAND}, or point {PLUGIN_ENV_VAR} at it")


def available() -> tuple[bool, str]:
    """(True, "TensorRT x.y, GPU ..., plugin ...") when an engine can be built and run here, else (False, why).

    Never raises and never builds anything: it imports tensorrt, looks for the plugin library and asks
    the CUDA runtime for a device.
    """
    try:
        trt = _import_tensorrt()
        plugin = find_plugin_library()
        if plugin is None:
            return False, _missing_plugin_message()
        gpu = gpu_info()
        return True, f"TensorRT {trt.__version__}, GPU {gpu.name} (sm_{gpu.compute_capability}), plugin {plugin}"
    except TensorRTBackendError as e:
        return False, str(e)
    except Exception as e:  # noqa: BLE001 - availability must never raise
        return False, f"TensorRT backend check failed: {type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------------
# CUDA runtime through ctypes (device buffers, streams, device name)
# ---------------------------------------------------------------------------------------------------

_CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")
_H2D, _D2H = 1, 2  # cudaMemcpyKind


def _cudart_candidates() -> list[str]:
    names: list[str] = []
    found = ctypes.util.find_library("cudart")
    if found:
        names.append(found)
    names += list(_CUDART_NAMES)
    # pip wheels (tensorrt depends on nvidia-cuda-runtime-cu12/13): site-packages/nvidia/cuda_runtime/lib
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cuda_runtime/lib", "cu13/lib", "cu12/lib"):
            d = Path(root) / sub
            if d.is_dir():
                names += [str(p) for p in sorted(d.glob("libcudart.so*"), reverse=True)]
    for d in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/aarch64-linux/lib", "/usr/lib/aarch64-linux-gnu"):
        names += [str(p) for p in sorted(Path(d).glob("libcudart.so*"), reverse=True)] if Path(d).is_dir() else []
    return names


class _CudaRuntime:
    """The dozen CUDA runtime calls the backend needs; every call is checked."""

    def __init__(self):
        errors = []
        self.lib = None
        for name in _cudart_candidates():
            try:
                self.lib = ctypes.CDLL(name)
                self.path = name
                break
            except OSError as e:
                errors.append(f"{name}: {e}")
        if self.lib is None:
            raise TensorRTBackendError("the CUDA runtime library (libcudart) could not be loaded; it ships with "
                                       "TensorRT's pip wheels (nvidia-cuda-runtime), JetPack and the CUDA toolkit. Tried: "
                                       + "; ".join(errors[:4]))
        L = self.lib
        vp, sz, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
        for fn, args in {"cudaGetDeviceCount": [ctypes.POINTER(i)], "cudaGetDevice": [ctypes.POINTER(i)],
                         "cudaMalloc": [ctypes.POINTER(vp), sz], "cudaFree": [vp],
                         "cudaMemcpyAsync": [vp, vp, sz, i, vp], "cudaStreamCreate": [ctypes.POINTER(vp)],
                         "cudaStreamSynchronize": [vp], "cudaStreamDestroy": [vp],
                         "cudaDeviceGetAttribute": [ctypes.POINTER(i), i, i], "cudaGetLastError": []}.items():
            f = getattr(L, fn)
            f.argtypes, f.restype = args, i
        L.cudaGetErrorString.argtypes, L.cudaGetErrorString.restype = [i], ctypes.c_char_p

    def check(self, code: int, what: str) -> None:
        if code != 0:
            msg = self.lib.cudaGetErrorString(code)
            raise TensorRTBackendError(f"CUDA error in {what}: {msg.decode() if msg else code} ({code})")

    def device_count(self) -> int:
        n = ctypes.c_int(0)
        code = self.lib.cudaGetDeviceCount(ctypes.byref(n))
        if code != 0:  # e.g. no driver, or no device: report, do not raise
            self.lib.cudaGetLastError()
            return 0
        return n.value

    def device(self) -> int:
        d = ctypes.c_int(0)
        self.check(self.lib.cudaGetDevice(ctypes.byref(d)), "cudaGetDevice")
        return d.value

    def compute_capability(self, device: int) -> str:
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, device), "cudaDeviceGetAttribute")
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, device), "cudaDeviceGetAttribute")
        return f"{major.value}{minor.value}"

    def device_name(self, device: int) -> str:
        """Through the driver API (cuDeviceGetName), which every CUDA driver has; '' when unavailable."""
        try:
            cu = ctypes.CDLL("libcuda.so.1")
            cu.cuInit.argtypes, cu.cuInit.restype = [ctypes.c_uint], ctypes.c_int
            cu.cuDeviceGet.argtypes, cu.cuDeviceGet.restype = [ctypes.POINTER(ctypes.c_int), ctypes.c_int], ctypes.c_int
            cu.cuDeviceGetName.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
            cu.cuDeviceGetName.restype = ctypes.c_int
            dev = ctypes.c_int(0)
            buf = ctypes.create_string_buffer(256)
            if cu.cuInit(0) == 0 and cu.cuDeviceGet(ctypes.byref(dev), device) == 0 and \
                    cu.cuDeviceGetName(buf, 256, dev.value) == 0:
                return buf.value.decode(errors="replace").strip()
        except OSError:
            pass
        return ""

    def malloc(self, nbytes: int) -> int:
        p = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(p), max(1, int(nbytes))), f"cudaMalloc({nbytes})")
        return int(p.value)

    def free(self, ptr: int) -> None:
        if ptr:
            self.lib.cudaFree(ctypes.c_void_p(ptr))

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return int(s.value or 0)

    def destroy_stream(self, stream: int) -> None:
        if stream:
            self.lib.cudaStreamDestroy(ctypes.c_void_p(stream))

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def h2d(self, dst: int, src: np.ndarray, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src.ctypes.data), src.nbytes, _H2D,
                                            ctypes.c_void_p(stream)), "cudaMemcpyAsync(host->device)")

    def d2h(self, dst: np.ndarray, src: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst.ctypes.data), ctypes.c_void_p(src), dst.nbytes, _D2H,
                                            ctypes.c_void_p(stream)), "cudaMemcpyAsync(device->host)")


_cuda_lock = threading.Lock()
_cuda_rt: _CudaRuntime | None = None


def cuda_runtime() -> _CudaRuntime:
    global _cuda_rt
    with _cuda_lock:
        if _cuda_rt is None:
            _cuda_rt = _CudaRuntime()
        return _cuda_rt


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "87" for Orin, "90" for H100/H200
    index: int


def gpu_info() -> GpuInfo:
    cuda = cuda_runtime()
    if cuda.device_count() < 1:
        raise TensorRTBackendError("no CUDA GPU is visible (cudaGetDeviceCount returned 0 or failed: is the NVIDIA "
                                   "driver loaded, CUDA_VISIBLE_DEVICES set?)")
    dev = cuda.device()
    cc = cuda.compute_capability(dev)
    return GpuInfo(name=cuda.device_name(dev) or f"cuda-device-{dev}-sm{cc}", compute_capability=cc, index=dev)


# ---------------------------------------------------------------------------------------------------
# Plugin loading and the TensorRT logger
# ---------------------------------------------------------------------------------------------------

_plugin_lock = threading.Lock()
_loaded_plugins: dict[str, Any] = {}


def load_plugin(path: str | os.PathLike | None = None) -> Path:
    """Register libemrrg_trt_plugin.so with TensorRT's plugin registry (once per process)."""
    trt = _import_tensorrt()
    lib = Path(path) if path is not None else find_plugin_library()
    if lib is None or not lib.is_file():
        raise TensorRTBackendError(_missing_plugin_message() if path is None else f"{lib} does not exist; build it with "
                                   f"{BUILD_COMMAND}")
    key = str(lib.resolve())
    with _plugin_lock:
        if key in _loaded_plugins:
            return lib
        registry = trt.get_plugin_registry()
        try:
            handle = registry.load_library(key)
        except Exception as e:  # noqa: BLE001 - TensorRT raises its own types
            raise TensorRTBackendError(f"TensorRT could not load {lib} ({e}); rebuild it against this TensorRT "
                                       f"({trt.__version__}) with {BUILD_COMMAND}") from e
        get = getattr(registry, "get_creator", None) or getattr(registry, "get_plugin_creator")
        if get(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
            raise TensorRTBackendError(f"{lib} loaded but registered no {PLUGIN_NAMESPACE}::{PLUGIN_NAME} v{PLUGIN_VERSION} "
                                       "creator; it is not this project's plugin library, or a stale build")
        _loaded_plugins[key] = handle
    return lib


def _make_logger(trt, messages: list[str] | None = None):
    """A trt.ILogger that forwards to Python logging (and keeps errors for the exception text)."""
    sev = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity in (sev.INTERNAL_ERROR, sev.ERROR):
                log.error("TensorRT: %s", msg)
                if messages is not None:
                    messages.append(str(msg))
            elif severity == sev.WARNING:
                log.warning("TensorRT: %s", msg)
            elif severity == sev.INFO:
                log.debug("TensorRT: %s", msg)

    return _Logger()


# ---------------------------------------------------------------------------------------------------
# ONNX preparation (optional `onnx` package)
# ---------------------------------------------------------------------------------------------------

def prepare_onnx_for_tensorrt(onnx_path: str | os.PathLike) -> tuple[bytes | None, list[str]]:
    """Rewrite SelectiveScan nodes into the form the plugin maps unambiguously; (None, []) when none needs it.

    TensorRT's ONNX parser drops absent trailing inputs, but an absent input in the middle (an empty
    name, e.g. z given without D) would shift the others. Such nodes get their gaps removed and the
    attributes has_D / has_z / has_delta_bias written (the plugin reads them). Nodes without the
    plugin_version / plugin_namespace attributes (older exports) get them. Needs the `onnx` package;
    without it the file is parsed as it is (our exporter always writes all 8 inputs).
    Weights stay where they are (external data is not loaded; the parser is given the file's path).
    """
    try:
        import onnx
        import onnx.helper as oh
    except ImportError:
        return None, []
    model = onnx.load(str(onnx_path), load_external_data=False)
    notes: list[str] = []
    for nd in model.graph.node:
        if not (nd.domain == OP_DOMAIN and nd.op_type == PLUGIN_NAME):
            continue
        attrs = {a.name for a in nd.attribute}
        if "plugin_version" not in attrs:
            nd.attribute.append(oh.make_attribute("plugin_version", PLUGIN_VERSION))
            notes.append(f"{nd.name}: added plugin_version")
        if "plugin_namespace" not in attrs:
            nd.attribute.append(oh.make_attribute("plugin_namespace", PLUGIN_NAMESPACE))
            notes.append(f"{nd.name}: added plugin_namespace")
        names = list(nd.input)
        while names and names[-1] == "":
            names.pop()
        optional = names[5:]
        if "" in optional and not {"has_D", "has_z", "has_delta_bias"} & attrs:
            present = [(i < len(optional) and optional[i] != "") for i in range(3)]
            del nd.input[:]
            nd.input.extend([n for n in names if n != ""])
            for key, flag in zip(("has_D", "has_z", "has_delta_bias"), present):
                nd.attribute.append(oh.make_attribute(key, int(flag)))
            notes.append(f"{nd.name}: optional inputs compacted, has_D/z/delta_bias = {[int(p) for p in present]}")
        elif len(names) != len(nd.input):
            del nd.input[:]
            nd.input.extend(names)
    if not notes:
        return None, []
    return model.SerializeToString(), notes


# ---------------------------------------------------------------------------------------------------
# Engine key, cache and build
# ---------------------------------------------------------------------------------------------------

def external_data_files(onnx_path: str | os.PathLike) -> list[Path]:
    """The external-data files an ONNX file points at (relative to it), sorted; a location that leads out of
    the file's folder (absolute, '..', a symbolic link out) is a BundleError, before the file is read."""
    try:
        import onnx
    except ImportError:  # pragma: no cover - the TensorRT path installs onnx
        return []
    m = onnx.load(str(onnx_path), load_external_data=False)
    graphs, locs = [m.graph], set()
    while graphs:
        g = graphs.pop()
        for t in g.initializer:
            locs.update(e.value for e in t.external_data if e.key == "location")
        graphs.extend(a.g for n in g.node for a in n.attribute if a.HasField("g"))
    base = Path(onnx_path).parent
    for loc in locs:
        resolve_inside(base, loc, "the external data location", str(onnx_path))
    return sorted(base / loc for loc in locs)


def model_digest(file_sha256: Sequence[str]) -> str:
    """One id for an ONNX graph and its weights: sha256 over the graph file's and its data files' sha256s.
    The graph file alone is not enough: it holds only offsets into the data, so two exports of the same
    architecture can share it byte for byte while their weights differ."""
    if len(file_sha256) == 1:
        return file_sha256[0]
    return hashlib.sha256("\n".join(file_sha256).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "gpu"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine plan depends on; its slug names the cached file."""
    onnx_sha256: str
    gpu_name: str
    compute_capability: str
    trt_version: str
    precision: str
    profile: str  # e.g. "pixel_values:1x1x3x224x224/1x2x3x224x224/4x4x3x224x224"

    def slug(self, stem: str = "encoder") -> str:
        prof = hashlib.sha256(self.profile.encode()).hexdigest()[:8]
        return (f"{_slug(stem)}-{self.onnx_sha256[:16]}-{_slug(self.gpu_name)}-sm{self.compute_capability}"
                f"-trt{_slug(self.trt_version)}-{self.precision}-p{prof}")


def engine_cache_dir(bundle_dir: str | os.PathLike | None = None) -> Path:
    """The first writable of: $EMRRG_ENGINE_CACHE (when set; the bundle's folder is then not tried), else
    <bundle>/engines; then $XDG_CACHE_HOME/emrrg/engines (~/.cache/emrrg/engines without it)."""
    env = os.environ.get(ENGINE_CACHE_ENV_VAR, "").strip()
    candidates = [Path(env).expanduser()] if env else []
    if bundle_dir is not None and not env:
        candidates.append(Path(bundle_dir) / "engines")
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    candidates.append((Path(xdg) if xdg else Path.home() / ".cache") / "emrrg" / "engines")
    for d in candidates:
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise TensorRTBackendError(f"no writable engine cache directory (tried {', '.join(map(str, candidates))}); "
                               f"set {ENGINE_CACHE_ENV_VAR}")


def resolve_precision(precision: str, onnx_precision: str | None, major: int) -> str:
    """'auto' -> int8 for a Q/DQ ONNX, else fp16 on TensorRT 10 (weak typing) and fp32 on 11 (strong typing)."""
    if precision not in PRECISIONS:
        raise TensorRTBackendError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if onnx_precision == "int8":
        return "int8"
    return "fp32" if major >= 11 else "fp16"


def _profile_text(profile: Mapping[str, Sequence[Sequence[int]]]) -> str:
    return ";".join(f"{k}:" + "/".join("x".join(str(int(d)) for d in s) for s in v) for k, v in sorted(profile.items()))


def encoder_profile(image_size: int, max_batch: int = 4, max_views: int = 4, opt_views: int = 2) -> dict:
    """(min, opt, max) of pixel_values (B, V, 3, S, S): one study with 1..max_views views, up to max_batch studies."""
    s = int(image_size)
    opt_views = max(1, min(opt_views, max_views))
    return {ENCODER_INPUT: ((1, 1, 3, s, s), (1, opt_views, 3, s, s), (max_batch, max_views, 3, s, s))}


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _onnx_is_f16(onnx_path: Path) -> bool:
    """True when the graph input is float16 (needs `onnx`; False when it cannot tell)."""
    try:
        import onnx
        m = onnx.load(str(onnx_path), load_external_data=False)
        return any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in m.graph.input)
    except Exception:  # noqa: BLE001
        return False


def build_engine(onnx_path: str | os.PathLike, precision: str, profile: Mapping[str, Sequence[Sequence[int]]],
                 *, plugin_path: str | os.PathLike | None = None, timing_cache: str | os.PathLike | None = None,
                 workspace_bytes: int = WORKSPACE_BYTES) -> bytes:
    """Parse the ONNX file with the SelectiveScan plugin loaded and build a serialized engine (a plan).

    precision: fp32 | fp16 | int8 (not auto: see resolve_precision). profile: {input: (min, opt, max)}
    for every input with a dynamic dimension.
    """
    trt = _import_tensorrt()
    load_plugin(plugin_path)
    onnx_path = Path(onnx_path)
    major = trt_major(trt.__version__)
    errors: list[str] = []
    logger = _make_logger(trt, errors)
    builder = trt.Builder(logger)
    strongly_typed = major >= 11
    flags = 0
    if strongly_typed:
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        flags = (1 << int(flag)) if flag is not None else 0  # 11.x: strongly typed is the only mode anyway
        if precision == "fp16" and not _onnx_is_f16(onnx_path):
            raise TensorRTBackendError(
                f"TensorRT {trt.__version__} builds strongly typed networks only: an fp16 engine needs an fp16 ONNX "
                f"file, and {onnx_path.name} is f32. Use precision 'fp32', or 'int8' with an INT8 bundle "
                "(emrrg-export --int8), or convert the file first (ModelOpt AutoCast)")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    rewritten, notes = prepare_onnx_for_tensorrt(onnx_path)
    for n in notes:
        log.info("TensorRT ONNX preparation: %s", n)
    ok = parser.parse(rewritten, str(onnx_path)) if rewritten is not None else parser.parse_from_file(str(onnx_path))
    if not ok:
        msgs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTBackendError(f"TensorRT {trt.__version__} could not parse {onnx_path}:\n  " +
                                   "\n  ".join(msgs or errors or ["(no parser message)"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if not strongly_typed:  # TensorRT 10.x: explicit quantization + reduced precision through flags
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # "fp32" means f32 GEMMs (TF32 is on by default on Ampere+)
    prof = builder.create_optimization_profile()
    dynamic = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if any(int(d) < 0 for d in t.shape):
            if t.name not in profile:
                raise TensorRTBackendError(f"input {t.name!r} has dynamic shape {tuple(t.shape)} but the profile gives "
                                           f"no (min, opt, max) for it (profile: {sorted(profile)})")
            dynamic.append(t.name)
        if t.name in profile:
            lo, opt, hi = (tuple(int(d) for d in s) for s in profile[t.name])
            prof.set_shape(t.name, lo, opt, hi)
    config.add_optimization_profile(prof)
    cache_bytes = b""
    if timing_cache is not None and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):  # a cache from another TensorRT/GPU: start a fresh one
        log.warning("timing cache %s does not match this TensorRT/GPU; starting a new one", timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBackendError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} "
                                   f"(precision {precision}):\n  " + "\n  ".join(errors or ["(see the log above)"]))
    log.info("TensorRT %s: built a %s engine from %s in %.1f s (dynamic inputs: %s)", trt.__version__, precision,
             onnx_path.name, time.perf_counter() - t0, ", ".join(dynamic) or "none")
    if timing_cache is not None:
        try:
            _atomic_write(Path(timing_cache), bytes(memoryview(config.get_timing_cache().serialize())))
        except OSError as e:
            log.warning("could not save the timing cache %s: %s", timing_cache, e)
    return bytes(memoryview(plan))


# ---------------------------------------------------------------------------------------------------
# Running an engine
# ---------------------------------------------------------------------------------------------------

class TensorRTSession:
    """One engine + execution context + CUDA stream; run(feeds) -> {output name: array}, host numpy in/out."""

    def __init__(self, plan: bytes, *, plugin_path: str | os.PathLike | None = None):
        trt = _import_tensorrt()
        load_plugin(plugin_path)
        self._trt = trt
        self._errors: list[str] = []
        self._logger = _make_logger(trt, self._errors)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise TensorRTBackendError("TensorRT could not deserialize the engine (built by another TensorRT version, "
                                       "GPU or plugin build?): " + "; ".join(self._errors or ["no message"]))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TensorRTBackendError("TensorRT could not create an execution context: " + "; ".join(self._errors))
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self._cuda = cuda_runtime()
        self._stream = self._cuda.stream()
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._lock = threading.Lock()

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            self._cuda.free(ptr)
            ptr = self._cuda.malloc(nbytes)
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:  # one context, one stream: calls are serialized
            missing = [n for n in self.input_names if n not in feeds]
            if missing:
                raise TensorRTBackendError(f"missing engine inputs: {missing} (engine takes {self.input_names})")
            host_in = []
            for name in self.input_names:
                arr = np.ascontiguousarray(feeds[name], dtype=self.dtype(name))
                if not self.context.set_input_shape(name, tuple(int(d) for d in arr.shape)):
                    raise TensorRTBackendError(f"input {name!r} shape {arr.shape} is outside the engine's optimization "
                                               f"profile {self.engine.get_tensor_profile_shape(name, 0)} (min/opt/max)")
                ptr = self._buffer(name, arr.nbytes)
                self._cuda.h2d(ptr, arr, self._stream)
                self.context.set_tensor_address(name, ptr)
                host_in.append(arr)  # keep alive until the copies are done
            outs = {}
            for name in self.output_names:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                out = np.empty(shape, dtype=self.dtype(name))
                self.context.set_tensor_address(name, self._buffer(name, out.nbytes))
                outs[name] = out
            self._errors.clear()
            if not self.context.execute_async_v3(self._stream):
                raise TensorRTBackendError("TensorRT execution failed: " + "; ".join(self._errors or ["no message"]))
            for name, out in outs.items():
                self._cuda.d2h(out, self._buffers[name][0], self._stream)
            self._cuda.sync(self._stream)
            if self._errors:
                raise TensorRTBackendError("TensorRT reported errors while running: " + "; ".join(self._errors))
            return outs

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cuda.free(ptr)
        self._buffers.clear()
        self._cuda.destroy_stream(self._stream)
        self._stream = 0

    def __del__(self):  # best effort; the process may be exiting
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------------

def _default_check_pixels(image_size: int, n: int = 4) -> tuple[np.ndarray, str]:
    """Real X-rays from the offline asset packages when installed (the export's calibration source), else
    seeded synthetic pixels; (N, 1, 3, S, S) f32 and a description."""
    try:
        from emrrg.assets import real_xrays
        from emrrg.runtime.preprocess import preprocess_study
        imgs = real_xrays()[:n]
        if imgs:
            return np.stack([preprocess_study([p], size=image_size) for p in imgs]).astype(np.float32), \
                f"{len(imgs)} real X-rays (emrrg.assets.real_xrays)"
    except Exception as e:  # noqa: BLE001 - assets are optional at run time
        log.debug("no real X-rays for the engine check: %s", e)
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 1, 3, image_size, image_size)).astype(np.float32), \
        f"{n} synthetic inputs (no real X-rays installed)"


def _reference_session(onnx_path: Path, fallback_path: Path | None):
    """ONNX Runtime on the CPU: the custom-op file with the op library, else the pure-ONNX twin."""
    import onnxruntime as ort

    from emrrg.runtime import oplib
    from emrrg.runtime.sessions import session_options

    if oplib.find_op_library() is None and fallback_path is not None and Path(fallback_path).is_file():
        return ort.InferenceSession(str(fallback_path), session_options(), providers=["CPUExecutionProvider"]), \
            Path(fallback_path).name
    # with no op library and no twin, oplib=True raises OpLibraryMissingError naming the build command
    return ort.InferenceSession(str(onnx_path), session_options(oplib=True), providers=["CPUExecutionProvider"]), \
        onnx_path.name


def compare_outputs(out: np.ndarray, ref: np.ndarray) -> dict:
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    diff = out64 - ref64
    denom = float((ref64 ** 2).sum()) or 1.0
    a, b = out64.reshape(-1, out64.shape[-1]), ref64.reshape(-1, ref64.shape[-1])
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return {"max_abs_diff": float(np.abs(diff).max()) if diff.size else 0.0, "nmse": float((diff ** 2).sum() / denom),
            "mean_cosine": float(cos.mean()) if cos.size else 1.0, "finite": bool(np.isfinite(out64).all())}


class TensorRTEncoder:
    """The bundle's encoder as a TensorRT engine, built on first use for this GPU and cached.

    run(pixel_values) -> visual_tokens, (B, V, 3, S, S) f32 -> (B, L, H) f32. For drop-in use where an
    onnxruntime session was, run(["visual_tokens"], {"pixel_values": x}) returns [visual_tokens] too.
    """

    def __init__(self, bundle_dir: str | os.PathLike, onnx_path: str | os.PathLike, precision: str = "auto", *,
                 image_size: int | None = None, onnx_sha256: str | None = None, onnx_precision: str | None = None,
                 reference_onnx: str | os.PathLike | None = None, max_batch: int = 4, max_views: int = 4,
                 plugin_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 check_pixels: np.ndarray | None = None, check_source: str = "given inputs", rebuild: bool = False,
                 progress: Callable[[str], None] | None = None):
        self.bundle_dir, self.onnx_path = Path(bundle_dir), Path(onnx_path)
        if not self.onnx_path.is_file():
            raise TensorRTBackendError(f"{self.onnx_path} does not exist")
        trt = _import_tensorrt()
        self.plugin_path = load_plugin(plugin_path)
        self.trt_version = str(trt.__version__)
        self.gpu = gpu_info()
        manifest = _read_manifest(self.bundle_dir)
        self.image_size = int(image_size or (manifest.encoder.image_size if manifest else 224))
        onnx_precision = onnx_precision or _artifact_precision(manifest, self.onnx_path)
        self.precision = resolve_precision(precision, onnx_precision, trt_major(self.trt_version))
        self.profile = encoder_profile(self.image_size, max_batch, max_views)
        if onnx_sha256 is None:
            onnx_sha256 = model_digest([sha256_file(p) for p in (self.onnx_path, *external_data_files(self.onnx_path))])
        self.key = EngineKey(onnx_sha256=onnx_sha256, gpu_name=self.gpu.name,
                             compute_capability=self.gpu.compute_capability, trt_version=self.trt_version,
                             precision=self.precision, profile=_profile_text(self.profile))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else engine_cache_dir(self.bundle_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        stem = self.onnx_path.name.split(".")[0]
        self.plan_path = self.cache_dir / f"{self.key.slug(stem)}.plan"
        self.info_path = self.plan_path.with_suffix(".json")
        self.timing_cache_path = self.cache_dir / f"timing-{_slug(self.gpu.name)}-sm{self.gpu.compute_capability}-trt{_slug(self.trt_version)}.cache"
        say = progress or (lambda m: log.info("%s", m))
        self.session: TensorRTSession | None = None
        if self.plan_path.is_file() and not rebuild:
            try:
                self.session = TensorRTSession(self.plan_path.read_bytes(), plugin_path=self.plugin_path)
                say(f"TensorRT engine loaded from the cache: {self.plan_path}")
            except TensorRTBackendError as e:
                log.warning("cached engine %s is unusable (%s); rebuilding", self.plan_path, e)
        self.build_info: dict = json.loads(self.info_path.read_text()) if self.info_path.is_file() and self.session else {}
        if self.session is None:
            say(f"building a {self.precision} TensorRT engine for {self.gpu.name} from {self.onnx_path.name} "
                f"(TensorRT {self.trt_version}; cached afterwards as {self.plan_path.name})")
            t0 = time.perf_counter()
            plan = build_engine(self.onnx_path, self.precision, self.profile, plugin_path=self.plugin_path,
                                timing_cache=self.timing_cache_path)
            build_s = time.perf_counter() - t0
            self.session = TensorRTSession(plan, plugin_path=self.plugin_path)
            if check_pixels is None:
                check_pixels, check_source = _default_check_pixels(self.image_size)
            fallback = Path(reference_onnx) if reference_onnx is not None else _fallback_path(manifest)
            check = self.check_against_reference(check_pixels, fallback, check_source)
            self.build_info = {"key": asdict(self.key), "plan": self.plan_path.name, "build_s": round(build_s, 1),
                               "plugin": str(self.plugin_path), "plugin_sha256": sha256_file(self.plugin_path),
                               "onnx": str(self.onnx_path), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "check": check}
            _atomic_write(self.plan_path, plan)
            _atomic_write(self.info_path, (json.dumps(self.build_info, indent=2) + "\n").encode())

    def check_against_reference(self, pixels: np.ndarray, fallback: Path | None, source: str) -> dict:
        """Engine vs ONNX Runtime CPU on the same inputs, one study at a time: ms each and max |Δ|.

        Without a usable reference (no onnxruntime, no op library and no pure-ONNX twin) the check is
        skipped with a warning and the reason is recorded; the engine is still used.
        """
        try:
            sess, ref_name = _reference_session(self.onnx_path, fallback)
        except Exception as e:  # noqa: BLE001 - ImportError, OpLibraryMissingError, ORT load errors
            log.warning("TensorRT engine built but not checked against ONNX Runtime CPU: %s", e)
            return {"reference": None, "skipped": f"{type(e).__name__}: {e}", "inputs": source}
        ref_ms, eng_ms, outs, refs = [], [], [], []
        x0 = np.ascontiguousarray(pixels[:1], np.float32)
        sess.run([ENCODER_OUTPUT], {ENCODER_INPUT: x0})  # warm-up both
        self.run(x0)
        for i in range(len(pixels)):
            x = np.ascontiguousarray(pixels[i:i + 1], np.float32)
            t = time.perf_counter()
            refs.append(sess.run([ENCODER_OUTPUT], {ENCODER_INPUT: x})[0])
            ref_ms.append(1e3 * (time.perf_counter() - t))
            t = time.perf_counter()
            outs.append(self.run(x))
            eng_ms.append(1e3 * (time.perf_counter() - t))
        m = compare_outputs(np.concatenate(outs), np.concatenate(refs))
        result = {"reference": f"onnxruntime CPU ({ref_name})", "inputs": source, "n": len(pixels),
                  "reference_ms": round(float(np.median(ref_ms)), 3), "engine_ms": round(float(np.median(eng_ms)), 3),
                  **m}
        log.info("TensorRT %s engine vs %s on %s: reference %.1f ms, engine %.2f ms (median per study), "
                 "max |Δ| %.3g, NMSE %.3g, mean cosine %.6f", self.precision, result["reference"], source,
                 result["reference_ms"], result["engine_ms"], m["max_abs_diff"], m["nmse"], m["mean_cosine"])
        if not m["finite"]:
            raise TensorRTBackendError(f"the TensorRT engine produced NaN/inf on {source}; not using it")
        if m["nmse"] > WARN_NMSE:
            log.warning("the TensorRT engine differs from ONNX Runtime by NMSE %.3g (> %g): check the plugin build",
                        m["nmse"], WARN_NMSE)
        return result

    @classmethod
    def from_bundle(cls, bundle_dir: str | os.PathLike, manifest: Manifest | None = None, precision: str = "auto",
                    **kw) -> "TensorRTEncoder":
        """The encoder of a bundle; `manifest`: its checked manifest (emrrg.runtime.bundle.open_bundle), else read here."""
        from emrrg.runtime.bundle import read_manifest

        bundle_dir = Path(bundle_dir)
        m = manifest or read_manifest(bundle_dir)
        art = m.artifacts[ENCODER]
        sha = model_digest([m.files[r].sha256 for r in art.files])
        return cls(bundle_dir, m.path(ENCODER), precision, onnx_sha256=sha, onnx_precision=art.precision,
                   image_size=m.encoder.image_size, **kw)

    def run(self, pixel_values, feeds: Mapping[str, np.ndarray] | None = None):
        if feeds is not None:  # onnxruntime-style: run(output_names, {"pixel_values": x}) -> [tokens]
            return [self.run(feeds[ENCODER_INPUT])]
        assert self.session is not None
        x = np.ascontiguousarray(pixel_values, np.float32)
        return self.session.run({ENCODER_INPUT: x})[ENCODER_OUTPUT].astype(np.float32, copy=False)

    def summary(self) -> dict:
        return {"plan": str(self.plan_path), "precision": self.precision, "gpu": self.gpu.name,
                "tensorrt": self.trt_version, "check": self.build_info.get("check")}


def _read_manifest(bundle_dir: Path) -> Manifest | None:
    """The folder's manifest, checked against the contract (a defect is a BundleError); None without one
    (an ONNX file that is not in a bundle)."""
    from emrrg.runtime.bundle import read_manifest

    return read_manifest(bundle_dir) if os.path.lexists(Path(bundle_dir) / MANIFEST) else None


def _artifact_precision(manifest: Manifest | None, onnx_path: Path) -> str | None:
    for art in (manifest.artifacts.values() if manifest else ()):
        if art.path == onnx_path.name:
            return art.precision
    return None


def _fallback_path(manifest: Manifest | None) -> Path | None:
    return manifest.path(ENCODER_FALLBACK) if manifest and ENCODER_FALLBACK in manifest.artifacts else None


__all__ = ["available", "TensorRTEncoder", "TensorRTSession", "TensorRTBackendError", "EngineKey", "build_engine",
           "load_plugin", "find_plugin_library", "engine_cache_dir", "resolve_precision", "encoder_profile",
           "prepare_onnx_for_tensorrt", "gpu_info", "trt_version", "compare_outputs", "PLUGIN_LIBRARY_NAME"]
