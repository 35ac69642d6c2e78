#!/usr/bin/env bash
# One command for a GPU machine: build the CUDA parts of plugins/ and run every GPU / TensorRT check.
#
#   bash scripts/gpu-check.sh            # from a checkout (or a copy of the working tree)
#
# Stages (each with a time limit; a failing stage is reported and the next one still runs):
#   python    pick an interpreter with torch (EMRRG_PYTHON, .venv/bin/python, else python3) and make the
#             checkout importable as emrrg.* without installing anything (a sitecustomize on PYTHONPATH;
#             no network needed). pytest is pip-installed only if missing (needs PyPI).
#   ort-hdrs  ONNX Runtime C API headers for the ORT op libraries: $ORT_INCLUDE_DIR, build/ort-headers (carry
#             it to an offline machine), else scripts/fetch_ort_headers.sh (apt, needs the network). Optional.
#   build     cmake + nvcc for this GPU's architecture (nvidia-smi / torch): the kernel, libemrrg_scan_shim.so,
#             libemrrg_ops.so + libemrrg_ops_cuda.so (with ORT headers), libemrrg_trt_plugin.so (when CMake
#             finds TensorRT: TENSORRT_ROOT or the system paths). Into build/gpu-check/plugins.
#   gpu-tests pytest tests/gpu -m "gpu and not tensorrt": the kernel vs the references for every dtype and
#             CPU-test shape, bit-equality with the CPU op, the ORT CUDA EP op (with onnxruntime-gpu).
#   trt-tests pytest tests/gpu/test_tensorrt.py when `import tensorrt` works: engines from single nodes, the
#             tiny encoder and a tiny bundle vs the references.
#   bench     benchmarks/scan_gpu.py --quick: kernel vs torch reference (vs mamba-ssm when installed).
# Then ONE summary table; exit status 1 if any stage FAILED (SKIPPED stages do not fail the run).
# Logs and results: build/gpu-check/{logs,results}/. Budget: < 8 minutes on an H200.
#
# Environment: EMRRG_PYTHON (interpreter), TENSORRT_ROOT, ORT_INCLUDE_DIR, CUDA_ARCH (e.g. 87),
# GPU_CHECK_SKIP_TRT=1, GPU_CHECK_SKIP_BENCH=1, JOBS.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GC="$ROOT/build/gpu-check"
LOGS="$GC/logs"
RESULTS="$GC/results"
BUILD="$GC/plugins"
mkdir -p "$LOGS" "$RESULTS"
T_START=$(date +%s)

declare -a S_NAME S_STATUS S_SECS S_NOTE
FAILED=0
record() {  # name status seconds note
  S_NAME+=("$1"); S_STATUS+=("$2"); S_SECS+=("$3"); S_NOTE+=("$4")
  [ "$2" = "FAIL" ] && FAILED=1
  printf '[gpu-check] %-10s %-5s %4ss  %s\n' "$1" "$2" "$3" "$4"
}
# run_stage NAME LIMIT_SECONDS CMD...: runs with a timeout, log in $LOGS/NAME.log; sets RC and SECS.
run_stage() {
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  RC=$?
  SECS=$(( $(date +%s) - t0 ))
  if [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then
    echo "[gpu-check] $name: timed out after ${limit}s (log: $LOGS/$name.log)" >>"$LOGS/$name.log"
  fi
  if [ "$RC" -ne 0 ]; then
    echo "---- last lines of $LOGS/$name.log ----"
    tail -n 40 "$LOGS/$name.log"
    echo "----"
  fi
}
pytest_counts() {  # summary line of a pytest log: "12 passed, 3 skipped"
  grep -Eo '[0-9]+ (passed|failed|skipped|error|errors|xfailed|deselected)' "$1" | tr '\n' ' ' | sed 's/ $//'
}

# ---- machine ------------------------------------------------------------------------------------------
GPU_LINE=$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null | head -n1)
echo "[gpu-check] GPU: ${GPU_LINE:-none found by nvidia-smi}; nvcc: $(command -v nvcc || echo none); cmake: $(command -v cmake || echo none)"

# ---- stage: python --------------------------------------------------------------------------------------
t0=$(date +%s)
PY=""
for cand in "${EMRRG_PYTHON:-}" "$ROOT/.venv/bin/python" python3 python; do
  [ -n "$cand" ] || continue
  command -v "$cand" >/dev/null 2>&1 || continue
  if timeout 120 "$cand" -c "import torch" >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
done
PY_NOTE=""
if [ -z "$PY" ]; then
  record python FAIL $(( $(date +%s) - t0 )) "no Python with torch (set EMRRG_PYTHON); the tests and benchmark need torch"
else
  # Make emrrg.* (emrrg/, runtime/ -> emrrg.runtime, export/ -> emrrg.export) importable from this checkout
  # without pip: a sitecustomize on PYTHONPATH extends the emrrg package path (pyproject's package-dir map).
  if ! (cd /tmp && timeout 120 "$PY" -c "import emrrg.runtime, emrrg.export, emrrg.ops" >/dev/null 2>&1) ||
     ! (cd /tmp && "$PY" -c "import emrrg, sys; sys.exit(0 if emrrg.__file__.startswith('$ROOT') else 1)" >/dev/null 2>&1); then
    mkdir -p "$GC/pyshim"
    cat >"$GC/pyshim/sitecustomize.py" <<PYEOF
# Written by scripts/gpu-check.sh: import emrrg.* from the checkout at $ROOT without installing it.
import sys
sys.path.insert(0, "$ROOT")
try:
    import emrrg
    for _p in ("$ROOT",):
        if _p not in emrrg.__path__:
            emrrg.__path__.append(_p)  # emrrg.runtime -> $ROOT/runtime, emrrg.export -> $ROOT/export
except Exception as _e:  # never break the interpreter
    print(f"gpu-check sitecustomize: {_e}", file=sys.stderr)
PYEOF
    export PYTHONPATH="$GC/pyshim${PYTHONPATH:+:$PYTHONPATH}"
    PY_NOTE="checkout on PYTHONPATH via build/gpu-check/pyshim; "
  fi
  if ! "$PY" -c "import pytest" >/dev/null 2>&1; then
    timeout 120 "$PY" -m pip install -q pytest >"$LOGS/pip-pytest.log" 2>&1 || true
  fi
  if (cd /tmp && "$PY" -c "import emrrg.runtime, emrrg.export, emrrg.ops, pytest" >"$LOGS/python.log" 2>&1); then
    TORCH=$("$PY" -c "import torch; print(torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" 2>/dev/null)
    TRT_PY=$("$PY" -c "import tensorrt; print(tensorrt.__version__)" 2>/dev/null || echo "not installed")
    ORT_PY=$("$PY" -c "import onnxruntime as o; print(o.__version__, ','.join(p[:-17] for p in o.get_available_providers()))" 2>/dev/null || echo "not installed")
    record python PASS $(( $(date +%s) - t0 )) "${PY_NOTE}$PY; torch $TORCH; tensorrt $TRT_PY; onnxruntime $ORT_PY"
  else
    record python FAIL $(( $(date +%s) - t0 )) "emrrg.* or pytest not importable with $PY (see $LOGS/python.log; pytest: pip install pytest)"
  fi
fi

# ---- stage: ort-hdrs ------------------------------------------------------------------------------------
t0=$(date +%s)
ORT_INC=${ORT_INCLUDE_DIR:-}
if [ -z "$ORT_INC" ] && [ -f "$ROOT/build/ort-headers/usr/include/onnxruntime/onnxruntime_cxx_api.h" ]; then
  ORT_INC="$ROOT/build/ort-headers/usr/include/onnxruntime"
fi
if [ -z "$ORT_INC" ]; then
  ORT_INC=$(timeout 90 bash scripts/fetch_ort_headers.sh 2>"$LOGS/ort-hdrs.log" | tail -n1) || ORT_INC=""
fi
if [ -n "$ORT_INC" ] && [ -f "$ORT_INC/onnxruntime_cxx_api.h" ]; then
  export EMRRG_HAVE_ORT_HEADERS=1
  record ort-hdrs PASS $(( $(date +%s) - t0 )) "$ORT_INC"
else
  ORT_INC=""
  export EMRRG_HAVE_ORT_HEADERS=0
  record ort-hdrs SKIP $(( $(date +%s) - t0 )) "no ONNX Runtime headers (offline?): ORT op libraries not built; carry build/ort-headers or set ORT_INCLUDE_DIR"
fi

# ---- stage: build ---------------------------------------------------------------------------------------
ARCH=${CUDA_ARCH:-}
if [ -z "$ARCH" ]; then
  ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
fi
if [ -z "$ARCH" ] && [ -n "$PY" ]; then
  ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null)
fi
ARCH=${ARCH:-87;90}
BUILT_NOTE=""
NVCC=$(command -v nvcc || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; } || true)
if ! command -v cmake >/dev/null 2>&1 || [ -z "$NVCC" ]; then
  record build FAIL 0 "cmake and nvcc are both needed (cmake: $(command -v cmake || echo missing), nvcc: ${NVCC:-missing})"
else
  GEN=""
  command -v ninja >/dev/null 2>&1 && [ ! -f "$BUILD/Makefile" ] && GEN="-G Ninja"
  ORT_ON=OFF
  [ -n "$ORT_INC" ] && ORT_ON=ON
  BUILD_CMD="cmake -S plugins -B $(printf %q "$BUILD") $GEN -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CUDA_COMPILER=$(printf %q "$NVCC") -DCMAKE_CUDA_ARCHITECTURES=$(printf %q "$ARCH") \
    -DORT_INCLUDE_DIR=$(printf %q "$ORT_INC") -DEMRRG_BUILD_ORT_OP=$ORT_ON \
    ${TENSORRT_ROOT:+-DTENSORRT_ROOT=$(printf %q "$TENSORRT_ROOT")} \
    && cmake --build $(printf %q "$BUILD") -j ${JOBS:-$(nproc)}"
  run_stage build 360 bash -c "$BUILD_CMD"
  if [ "$RC" -eq 0 ] && [ -f "$BUILD/libemrrg_scan_shim.so" ]; then
    for lib in libemrrg_scan_shim.so libemrrg_ops.so libemrrg_ops_cuda.so libemrrg_trt_plugin.so; do
      [ -f "$BUILD/$lib" ] && BUILT_NOTE="$BUILT_NOTE $lib"
    done
    SKIPPED_NOTE=$(grep -o 'SKIPPED: .*' "$LOGS/build.log" | sed 's/SKIPPED: *//' | tr '\n' ';' | sed 's/;$//')
    record build PASS "$SECS" "sm_$ARCH:$BUILT_NOTE${SKIPPED_NOTE:+ | skipped: $SKIPPED_NOTE}"
  else
    record build FAIL "$SECS" "cmake/nvcc failed for sm_$ARCH (rc $RC, log $LOGS/build.log)"
  fi
fi
export EMRRG_BUILD_DIR="$BUILD"
export EMRRG_SCAN_SHIM="$BUILD/libemrrg_scan_shim.so"
[ -f "$BUILD/libemrrg_ops.so" ] && export EMRRG_OPS_LIB="$BUILD/libemrrg_ops.so"
[ -f "$BUILD/libemrrg_trt_plugin.so" ] && export EMRRG_TRT_PLUGIN="$BUILD/libemrrg_trt_plugin.so"
export EMRRG_REQUIRE_GPU_BUILD=1
export PYTHONUNBUFFERED=1

# ---- stage: gpu-tests -----------------------------------------------------------------------------------
if [ -z "$PY" ]; then
  record gpu-tests FAIL 0 "no Python with torch"
else
  run_stage gpu-tests 300 "$PY" -m pytest tests/gpu -m "gpu and not tensorrt" -q -rs -p no:cacheprovider \
    --junitxml="$RESULTS/gpu-tests.xml"
  COUNTS=$(pytest_counts "$LOGS/gpu-tests.log")
  if [ "$RC" -eq 0 ] && grep -Eq '[0-9]+ passed' "$LOGS/gpu-tests.log"; then
    record gpu-tests PASS "$SECS" "$COUNTS"
  elif [ "$RC" -eq 0 ]; then
    record gpu-tests FAIL "$SECS" "nothing passed ($COUNTS): is a CUDA device visible to torch?"
  else
    record gpu-tests FAIL "$SECS" "rc $RC: ${COUNTS:-see log} ($LOGS/gpu-tests.log)"
  fi
fi

# ---- stage: trt-tests -----------------------------------------------------------------------------------
if [ "${GPU_CHECK_SKIP_TRT:-0}" = "1" ]; then
  record trt-tests SKIP 0 "GPU_CHECK_SKIP_TRT=1"
elif [ -z "$PY" ] || ! "$PY" -c "import tensorrt" >/dev/null 2>&1; then
  record trt-tests SKIP 0 "TensorRT's Python package is not installed (pip install tensorrt / JetPack); plugin untested"
elif [ ! -f "$BUILD/libemrrg_trt_plugin.so" ]; then
  record trt-tests SKIP 0 "tensorrt imports, but CMake found no TensorRT headers, so no plugin was built: set TENSORRT_ROOT to a tar/zip install of the same version (pip wheels ship no headers)"
else
  run_stage trt-tests 420 "$PY" -m pytest tests/gpu/test_tensorrt.py -q -rs -p no:cacheprovider \
    --junitxml="$RESULTS/trt-tests.xml"
  COUNTS=$(pytest_counts "$LOGS/trt-tests.log")
  if [ "$RC" -eq 0 ]; then record trt-tests PASS "$SECS" "$COUNTS"; else record trt-tests FAIL "$SECS" "rc $RC: ${COUNTS:-see log}"; fi
fi

# ---- stage: bench ---------------------------------------------------------------------------------------
if [ "${GPU_CHECK_SKIP_BENCH:-0}" = "1" ]; then
  record bench SKIP 0 "GPU_CHECK_SKIP_BENCH=1"
elif [ -z "$PY" ] || [ ! -f "$EMRRG_SCAN_SHIM" ]; then
  record bench SKIP 0 "no Python with torch or no shim library"
else
  run_stage bench 180 "$PY" benchmarks/scan_gpu.py --quick --out-dir "$RESULTS"
  if [ "$RC" -eq 0 ]; then
    record bench PASS "$SECS" "$RESULTS/scan_gpu.md"
  else
    record bench FAIL "$SECS" "rc $RC (log $LOGS/bench.log)"
  fi
fi

# ---- summary --------------------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - T_START ))
echo
echo "================================ emrrg gpu-check summary ================================"
echo "GPU: ${GPU_LINE:-unknown}   total ${TOTAL}s"
printf '| %-9s | %-6s | %5s | %s\n' stage status secs detail
printf '|%s|%s|%s|%s\n' "-----------" "--------" "-------" "--------------------------------------------"
for i in "${!S_NAME[@]}"; do
  printf '| %-9s | %-6s | %5s | %s\n' "${S_NAME[$i]}" "${S_STATUS[$i]}" "${S_SECS[$i]}" "${S_NOTE[$i]}"
done
if [ -f "$RESULTS/scan_gpu.md" ]; then
  echo
  grep '^|' "$RESULTS/scan_gpu.md"
fi
echo "logs: $LOGS   results: $RESULTS"
if [ "$FAILED" -ne 0 ]; then
  echo "gpu-check: FAILED"
  exit 1
fi
echo "gpu-check: OK (skipped stages are listed above)"
exit 0
