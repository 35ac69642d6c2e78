#!/usr/bin/env bash
# Build the EMRRG plugins into build/plugins: libemrrg_ops.so (the ONNX Runtime CPU op library for
# com.emrrg::SelectiveScan) and, where nvcc exists, the CUDA kernel library (compile-only on a machine
# without a GPU). Idempotent: a second run with nothing changed only re-checks (about a second).
#
# Needs: g++ (C++17), cmake >= 3.18, apt-get + dpkg (only the first time, for the ONNX Runtime headers;
# see scripts/fetch_ort_headers.sh). Works on a fresh machine of this project's kind.
#
# Environment:
#   EMRRG_NATIVE=1        compile for this CPU (-march=native; the library may not run on other CPUs).
#                         Default: portable -march=x86-64-v3 (AVX2 + FMA) when this CPU has AVX2, else the
#                         compiler's default ISA (correct but slower).
#   EMRRG_BUILD_CUDA=0    skip the CUDA kernel even when nvcc is found (it is compile-only here).
#   ORT_INCLUDE_DIR=DIR   use these ONNX Runtime headers instead of fetching Debian's.
#   EMRRG_BUILD_DIR=DIR   build folder (default build/plugins).
#   JOBS=N                parallel compile jobs (default: nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${EMRRG_BUILD_DIR:-$ROOT/build/plugins}

if [ -z "${ORT_INCLUDE_DIR:-}" ]; then
  ORT_INCLUDE_DIR=$(bash scripts/fetch_ort_headers.sh | tail -n1)
fi
if [ ! -f "$ORT_INCLUDE_DIR/onnxruntime_cxx_api.h" ]; then
  echo "[build-plugins] error: no onnxruntime_cxx_api.h in $ORT_INCLUDE_DIR" >&2
  exit 1
fi

NATIVE=OFF
case "${EMRRG_NATIVE:-0}" in 1|ON|on|true|yes) NATIVE=ON ;; esac
CUDA=ON
case "${EMRRG_BUILD_CUDA:-1}" in 0|OFF|off|false|no) CUDA=OFF ;; esac

GEN=()
command -v ninja >/dev/null 2>&1 && [ ! -f "$BUILD/Makefile" ] && GEN=(-G Ninja)

# Re-run the configure step only when a setting changed (cmake itself re-runs when CMakeLists change).
STAMP="$BUILD/.emrrg-configure"
WANT="ort=$ORT_INCLUDE_DIR native=$NATIVE cuda=$CUDA"
if [ ! -f "$BUILD/CMakeCache.txt" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[build-plugins] configuring $BUILD ($WANT)"
  cmake -S plugins -B "$BUILD" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DORT_INCLUDE_DIR="$ORT_INCLUDE_DIR" \
    -DEMRRG_NATIVE="$NATIVE" \
    -DEMRRG_BUILD_CUDA="$CUDA"
  echo "$WANT" > "$STAMP"
fi
cmake --build "$BUILD" -j "${JOBS:-$(nproc)}"

LIB="$BUILD/libemrrg_ops.so"
if [ ! -f "$LIB" ]; then
  echo "[build-plugins] error: $LIB was not produced" >&2
  exit 1
fi
echo "[build-plugins] ok: $LIB"
