#!/usr/bin/env bash
# The main job on the embedded default, offline:
#   set up -> export the demo checkpoint with `emrrg-export --int8` (INT8 encoder, 4-bit decoder) ->
#   `emrrg-run` (torch-free) on a phantom test image and on the real adult chest X-ray RG1_UNCR.dcm.
# The demo checkpoint (demo/) is a small encoder + the real SmolLM2-135M decoder with LoRA, trained on
# PHANTOM images (emrrg.data.phantom). NOT FOR CLINICAL USE: on a real radiograph its report is a demo.
# Without demo/ (e.g. a trimmed checkout) it falls back to a random base encoder over SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORK=${EMRRG_DEMO_DIR:-.cache/demo}
mkdir -p "$WORK"
CKPT=demo/checkpoint
if [ ! -f "$CKPT/config.json" ]; then
  CKPT="$WORK/base-smollm2"
  echo "[demo] no trained demo checkpoint in demo/; using a random base encoder over SmolLM2 ($CKPT)"
  [ -f "$CKPT/config.json" ] || .venv/bin/emrrg-init --encoder base --decoder smollm2-135m -o "$CKPT"
fi
BUNDLE="$WORK/bundle-int8"
if [ ! -f "$BUNDLE/manifest.json" ]; then
  echo "[demo] emrrg-export $CKPT --int8 --llm-bits 4"
  .venv/bin/emrrg-export "$CKPT" -o "$BUNDLE" --int8 --llm-bits 4
fi
PHANTOM="$WORK/phantom_effusion_cardiomegaly.png"
XRAY=$(.venv/bin/python - "$PHANTOM" <<'PY'
import sys
from emrrg.assets import chest_dicom
from emrrg.data.phantom import render_phantom, save_png
save_png(render_phantom(["pleural_effusion", "cardiomegaly"], seed=12345, size=224), sys.argv[1])
print(chest_dicom("RG1_UNCR.dcm"))
PY
)
echo
echo "[demo] phantom test image (pleural effusion + cardiomegaly drawn): $PHANTOM"
.venv/bin/emrrg-run "$BUNDLE" "$PHANTOM" --max-new-tokens "${EMRRG_DEMO_TOKENS:-80}"
echo
echo "[demo] real adult PA chest X-ray (pydicom-data RG1_UNCR.dcm, MONOCHROME1, 15-bit): $XRAY"
.venv/bin/emrrg-run "$BUNDLE" "$XRAY" --max-new-tokens "${EMRRG_DEMO_TOKENS:-80}"
echo
echo "[demo] NOT FOR CLINICAL USE: the demo model is trained on phantom images."
