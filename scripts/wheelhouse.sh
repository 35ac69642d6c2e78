#!/usr/bin/env bash
# Collect an offline wheelhouse: the emrrg platform wheel (with the SelectiveScan op library compiled in, see
# setup.py) and every wheel its extras need, so that a machine with no network installs with
#
#   pip install --no-index --find-links OUT 'emrrg[runtime]'
#
# Usage: bash scripts/wheelhouse.sh OUT [--extras runtime[,serve,...]]     (default extras: runtime)
#
# Needs the network to the package index (and, the first time, apt for the ONNX Runtime headers, as
# scripts/build_plugins.sh). Run it with the Python and on the CPU architecture of the target machines: the
# wheels are chosen for this interpreter (e.g. cp311, linux_x86_64; on a Jetson, linux_aarch64).
# Environment: PYTHON (default .venv/bin/python, else python3), and setup.py's EMRRG_NATIVE / ORT_INCLUDE_DIR.
set -euo pipefail
usage() { echo "usage: bash scripts/wheelhouse.sh OUT [--extras runtime[,serve,...]]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
EXTRAS=runtime
while [ $# -gt 0 ]; do
  case "$1" in
    --extras) [ $# -ge 2 ] || usage; EXTRAS=$2; shift 2 ;;
    --extras=*) EXTRAS=${1#--extras=}; shift ;;
    *) echo "wheelhouse.sh: error: unknown argument '$1'" >&2; usage ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python; } || PY=python3
# setuptools reuses build/lib*: a module deleted from the sources since the last wheel would ship again
rm -rf build/lib.* build/bdist.*
echo "[wheelhouse] emrrg[$EXTRAS] and its dependencies -> $OUT" >&2
"$PY" -m pip --disable-pip-version-check wheel -q --wheel-dir "$OUT" ".[$EXTRAS]"
if ! ls "$OUT"/emrrg-*.whl >/dev/null 2>&1; then
  echo "[wheelhouse] error: no emrrg wheel was written to $OUT" >&2
  exit 1
fi
echo "[wheelhouse] $(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1); install with:" >&2
echo "  pip install --no-index --find-links $OUT 'emrrg[$EXTRAS]'" >&2
