"""Command-line overrides (`axolotl train cfg.yml --learning_rate 2e-5`) reach the config the
TMS stages use: the harvest run's config and the fingerprints.

Axolotl's `load_cfg` applies the overrides to the YAML and then calls the plugin's `register`;
the test runs that real path in a fresh process (it sets environment variables).
"""

import json
import subprocess
import sys

from conftest import REPO, base_config, write_config

SCRIPT = """
import json, sys
from axolotl.cli.config import load_cfg
from axolotl.integrations.base import PluginManager
from tms_axolotl_plugin.config import tms_config_from
from tms_axolotl_plugin.pipeline import Pipeline, raw_config
from tms_axolotl_plugin.stage_inputs import signature

cfg = load_cfg(sys.argv[1], learning_rate=0.123, seed=99)
plugin = PluginManager.get_instance().plugins["tms_axolotl_plugin.TMSPlugin"]
pipeline = Pipeline(cfg, tms_config_from(cfg), plugin.config_as_given)
print(json.dumps({"given": plugin.config_as_given, "raw": pipeline.raw,
                  "from_file": raw_config(cfg),
                  "harvest": signature(pipeline.raw, "harvest"),
                  "data": signature(pipeline.raw, "data")}))
"""


def test_overrides_reach_the_harvest_config_and_fingerprints(tmp_path, tiny_model_dir,
                                                             small_chat_dataset):
    cfg = base_config(tiny_model_dir, small_chat_dataset, tmp_path / "out",
                      plugins=["tms_axolotl_plugin.TMSPlugin"], tms={"num_checkpoints": 2})
    config = write_config(tmp_path / "cfg.yml", cfg)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(config)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                               "AXOLOTL_DO_NOT_TRACK": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("given", "raw"):
        assert result[name]["learning_rate"] == 0.123 and result[name]["seed"] == 99, name
    # In the fingerprints of the stages they decide.
    assert result["harvest"]["learning_rate"] == 0.123 and result["data"]["seed"] == 99
    assert result["from_file"]["learning_rate"] == 1e-3  # the file alone misses them
    # Nothing else changed: the config as given is the YAML plus the overrides.
    assert result["given"] == {**json.loads(json.dumps(cfg)), "learning_rate": 0.123, "seed": 99}
