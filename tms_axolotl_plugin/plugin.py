"""`TMSPlugin`: the glue between Axolotl's plugin hooks and the TMS stages.

Every hook is a no-op for configs without a `tms:` block, so listing the plugin never changes a
plain Axolotl run. With a `tms:` block, one `axolotl train` runs the method:
- `load_datasets` (outer run): data, harvest, draws, regeneration; then hands Axolotl the
  student's mixture, so the outer run trains the student;
- in the harvest child run (`TMS_STAGE=harvest`), `add_callbacks_post_trainer` adds the callback
  that saves the T weights-only checkpoints, in the student run the one that marks its
  checkpoints as its own; in both runs it adds the PLD/retention callback;
- `post_train_unload` (after the final model is saved) records that the student finished, so
  a re-run skips it; not when training failed or was interrupted.
"""

from __future__ import annotations

import json
import os

from axolotl.integrations.base import BasePlugin

from tms_axolotl_plugin.config import tms_config_from
from tms_axolotl_plugin.logs import get_logger

LOG = get_logger(__name__)


def _stage() -> str:
    from tms_axolotl_plugin.harvest import STAGE_ENV

    return os.environ.get(STAGE_ENV, "pipeline")


class TMSPlugin(BasePlugin):
    """Trajectory-Mixed Supervision: harvest T SFT checkpoints, regenerate labels, train a student."""

    training_finished = False
    config_as_given: dict | None = None

    def get_input_args(self) -> str:
        return "tms_axolotl_plugin.config.TMSArgs"

    def register(self, cfg: dict):
        if cfg.get("tms") is not None:
            # Axolotl calls this with the YAML plus the command line's overrides, before
            # validation adds derived keys: what the harvest run and the fingerprints need.
            self.config_as_given = json.loads(json.dumps(
                {k: v for k, v in cfg.items() if k != "axolotl_config_path"}, default=str))
            from tms_axolotl_plugin.compat import allow_multiprocess_cpu

            allow_multiprocess_cpu()
            LOG.info("tms: plugin registered (stage: %s)", _stage())

    def load_datasets(self, cfg, preprocess: bool = False):
        tms = tms_config_from(cfg)
        if tms is None:
            return None
        from tms_axolotl_plugin.compat import cpu_device_map

        cpu_device_map(cfg)  # before the model loader reads it
        if preprocess or _stage() == "harvest":
            return None  # Axolotl loads the data itself
        from tms_axolotl_plugin.pipeline import run_pipeline

        return run_pipeline(cfg, tms, self.config_as_given)

    def add_callbacks_post_trainer(self, cfg, trainer):
        tms = tms_config_from(cfg)
        if tms is None:
            return []
        from pathlib import Path

        from tms_axolotl_plugin.harvest import HARVEST_DIRNAME, HarvestCheckpointCallback
        from tms_axolotl_plugin.metrics import metrics_callback

        callbacks = []
        if _stage() == "harvest":
            directory = Path(cfg.output_dir) / HARVEST_DIRNAME
            callbacks.append(HarvestCheckpointCallback(trainer, tms.num_checkpoints, directory))
        else:
            from tms_axolotl_plugin.student import StudentCheckpointOwnerCallback

            callbacks.append(StudentCheckpointOwnerCallback.from_env())
        stage = "harvest" if _stage() == "harvest" else "student"
        callbacks.append(metrics_callback(cfg, trainer, tms, stage))
        return [c for c in callbacks if c is not None]

    def post_train(self, cfg, model):
        self.training_finished = True  # called only after trainer.train() returned

    def post_train_unload(self, cfg):
        if tms_config_from(cfg) is None or _stage() == "harvest":
            return
        import sys

        from tms_axolotl_plugin import ranks
        from tms_axolotl_plugin.pipeline import mark_student_done

        # Axolotl calls this from a `finally:`, also when training or saving failed or was
        # interrupted; only a run that finished and saved without an exception is done.
        failed = sys.exc_info()[0] is not None
        if ranks.rank() == 0 and self.training_finished and not failed:
            mark_student_done(cfg)
