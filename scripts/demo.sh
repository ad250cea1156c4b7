#!/usr/bin/env bash
# The main job on CPU: TMS on SmolLM2-135M-Instruct with a GSM8K subset, one `axolotl train`.
# Builds the trainer venv and the offline model/data on first use. Outputs: outputs/demo/.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
trainer=$(scripts/env.sh trainer)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 \
  WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
out=${TMS_DEMO_DIR:-$repo/outputs/demo}
rows=${TMS_DEMO_ROWS:-64}
mkdir -p "$out"
"$trainer/bin/python" - "$out" "$rows" <<'PY'
import json, string, sys
from pathlib import Path
from tms_axolotl_plugin.offline_assets import gsm8k_jsonl, smollm2_dir

out, rows = Path(sys.argv[1]), int(sys.argv[2])
data = out / f"gsm8k_train_{rows}.jsonl"
with open(gsm8k_jsonl("train")) as src, open(data, "w") as dst:
    for i, line in zip(range(rows), src):
        dst.write(line)
template = string.Template(Path("example_configs/tms_cpu_demo.yml").read_text())
config = template.substitute(SMOLLM2_DIR=smollm2_dir(), DATA_FILE=data, OUTPUT_DIR=out)
(out / "config.yml").write_text(config)
print(out / "config.yml")
PY
exec "$trainer/bin/axolotl" train "$out/config.yml"
