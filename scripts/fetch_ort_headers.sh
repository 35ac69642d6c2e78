#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ API headers (Debian trixie's libonnxruntime-dev, ~85 KB) into
# build/ort-headers/ without touching the system's apt state (plugins/selective_scan/README.md). The C API is ABI-stable: the 1.21 headers build a library that loads into pip's
# onnxruntime >= 1.21.
#
# The mirror is the machine's own: copied at run time from /etc/apt/sources.list.d/debian.sources
# (or EMRRG_DEBIAN_MIRROR), never written into this repository. Idempotent: a second run only checks.
#
# Prints the include directory (…/usr/include/onnxruntime) as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST="$ROOT/build/ort-headers"
INC="$DEST/usr/include/onnxruntime"

if [ -f "$INC/onnxruntime_cxx_api.h" ]; then
  echo "[ort-headers] already present" >&2
  echo "$INC"
  exit 0
fi

SOURCES=${EMRRG_DEBIAN_SOURCES:-/etc/apt/sources.list.d/debian.sources}
MIRROR=${EMRRG_DEBIAN_MIRROR:-}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
if [ -z "$MIRROR" ]; then
  if [ ! -r "$SOURCES" ]; then
    echo "[ort-headers] error: cannot read $SOURCES; set EMRRG_DEBIAN_MIRROR to a Debian mirror URI" >&2
    exit 1
  fi
  # First URIs line that is the main archive (not the -security one).
  MIRROR=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$SOURCES")
  # Fall back to a one-line-style sources.list if the deb822 file has none.
  if [ -z "$MIRROR" ] && [ -r /etc/apt/sources.list ]; then
    MIRROR=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list)
  fi
fi
if [ -z "$MIRROR" ]; then
  echo "[ort-headers] error: no Debian mirror found in $SOURCES; set EMRRG_DEBIAN_MIRROR" >&2
  exit 1
fi
if [ -r "$KEYRING" ]; then SIGNED="Signed-By: $KEYRING"; else SIGNED=""; fi

WORK="$ROOT/build/ort-headers-apt"
mkdir -p "$WORK/sources.list.d" "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/debs"
cat > "$WORK/sources.list.d/trixie.sources" <<SRC
Types: deb
URIs: $MIRROR
Suites: trixie
Components: main
$SIGNED
SRC

APT_OPTS=(
  -o "APT::Sandbox::User=$(id -un)"
  -o "Dir::Etc::sourcelist=/dev/null"
  -o "Dir::Etc::sourceparts=$WORK/sources.list.d"
  -o "Dir::State::Lists=$WORK/lists"
  -o "Dir::Cache=$WORK/cache"
  -o "Debug::NoLocking=1"
  -q
)
echo "[ort-headers] apt update (trixie, isolated lists in $WORK)" >&2
apt-get "${APT_OPTS[@]}" update >&2
echo "[ort-headers] apt download libonnxruntime-dev" >&2
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" download libonnxruntime-dev >&2)
DEB=$(ls -t "$WORK"/debs/libonnxruntime-dev_*.deb | head -n1)
mkdir -p "$DEST"
dpkg -x "$DEB" "$DEST"
if [ ! -f "$INC/onnxruntime_cxx_api.h" ]; then
  echo "[ort-headers] error: $DEB did not contain usr/include/onnxruntime/onnxruntime_cxx_api.h" >&2
  exit 1
fi
echo "[ort-headers] $(basename "$DEB") -> $DEST" >&2
echo "$INC"
