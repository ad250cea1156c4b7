"""`TMSPlugin`: the glue between Axolotl's plugin hooks and the TMS stages.

Every hook is a no-op for configs without a `tms:` block, so listing the plugin never changes a
plain Axolotl run.
"""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin

from tms_axolotl_plugin.config import tms_config_from
from tms_axolotl_plugin.logs import get_logger

LOG = get_logger(__name__)


class TMSPlugin(BasePlugin):
    """Trajectory-Mixed Supervision: harvest T SFT checkpoints, regenerate labels, train a student."""

    def get_input_args(self) -> str:
        return "tms_axolotl_plugin.config.TMSArgs"

    def register(self, cfg: dict):
        if cfg.get("tms") is not None:
            LOG.info("tms: plugin registered; the `tms:` block is validated with the config")

    def load_datasets(self, cfg, preprocess: bool = False):
        tms = tms_config_from(cfg)
        if tms is None:
            return None
        LOG.info(
            "tms: load_datasets hook (T=%d, alpha=%s, schedule=%s)",
            tms.num_checkpoints,
            tms.alpha,
            tms.schedule,
        )
        return None

    def post_trainer_create(self, cfg, trainer):
        if tms_config_from(cfg) is not None:
            LOG.info("tms: post_trainer_create hook (trainer %s)", type(trainer).__name__)

    def post_train(self, cfg, model):
        if tms_config_from(cfg) is not None:
            LOG.info("tms: post_train hook")
