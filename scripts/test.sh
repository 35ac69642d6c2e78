#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. GPU / TensorRT tests skip without the hardware.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
