#!/usr/bin/env bash
# Run the whole test suite. Builds (once) the trainer and sidecar venvs and the offline assets.
# Extra arguments go to pytest, e.g. scripts/test.sh -k config
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
trainer=$(scripts/env.sh trainer)
export TMS_SIDECAR_PYTHON=${TMS_SIDECAR_PYTHON:-$(scripts/env.sh sidecar)/bin/python}
export TMS_LINT_ENV=${TMS_LINT_ENV:-$(scripts/env.sh lint)}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
set +e
"$trainer/bin/python" -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure here, not a pass.
[ "$rc" -eq 5 ] && echo "test.sh: no tests ran" >&2
exit "$rc"
