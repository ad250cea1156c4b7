#!/usr/bin/env bash
# Prepares the one-GPU check of harvests under FSDP2 and ZeRO-3 (scripts/gpu/sharded_harvest.py):
# .whl/ (Axolotl's wheels for the GPU image, DeepSpeed, this project) and .gpu-assets/ (the tiny
# Llama's config and tokenizer; its weights are drawn on the GPU machine). Then, with a lent device:
#   run(command='bash scripts/gpu/sharded_harvest.sh --on-device', carry=['.whl', '.gpu-assets'],
#       timeout_s=540)
# It prints "sharded harvest check: PASSED|FAILED"; $OUT/sharded_harvest.json has the details.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--on-device" ]; then
  python -m pip install -q --no-deps --no-index --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" WANDB_MODE=disabled \
    AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_BUILD_OPS=0
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  exec python scripts/gpu/sharded_harvest.py .gpu-assets "${OUT:-/tmp/sharded-harvest}"
fi
bash ../shared/gpu/axolotl_wheels.sh .whl
trainer=$(scripts/env.sh trainer)
# DeepSpeed (ZeRO-3) is not in the GPU image: its pure-Python wheel (no ops built) and its deps.
DS_BUILD_OPS=0 "$trainer/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl hjson py-cpuinfo msgpack ninja einops
"$trainer/bin/python" -m pip wheel -q --no-deps -w .whl .
mkdir -p .gpu-assets
assets=$(PYTHONPATH=. "$trainer/bin/python" -c \
  "from tms_axolotl_plugin.offline_assets import tiny_llama_dir; print(tiny_llama_dir())")
cp "$assets"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu-assets/
du -sh .whl .gpu-assets
