# Two entry points; each builds what it needs (venvs outside the repo, keyed by their pins).
.PHONY: demo test envs assets

demo:  ## the main job on CPU: a real `axolotl train` of SmolLM2-135M-Instruct with TMS
	scripts/demo.sh

test:  ## the whole test suite
	scripts/test.sh

envs:
	scripts/env.sh trainer && scripts/env.sh sidecar

assets: envs
	PYTHONPATH=. HF_HUB_OFFLINE=1 $$(scripts/env.sh trainer)/bin/python -m tms_axolotl_plugin.offline_assets all
