#!/usr/bin/env bash
# The main job on CPU: TMS on SmolLM2-135M-Instruct with a GSM8K subset, one `axolotl train`.
# Builds the trainer venv and the offline model/data on first use. Outputs: outputs/demo/.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
trainer=$(scripts/env.sh trainer)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PATH="$trainer/bin:$PATH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 \
  WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
out=${TMS_DEMO_DIR:-$repo/outputs/demo}
rows=${TMS_DEMO_ROWS:-64}
mkdir -p "$out"
config=$("$trainer/bin/python" -m tms_axolotl_plugin.demo "$out" "$rows")
exec "$trainer/bin/axolotl" train "$config"
