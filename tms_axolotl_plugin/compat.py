"""Work-arounds for upstream behaviour that would stop a TMS run. Each says why and when."""

from __future__ import annotations

import os

from tms_axolotl_plugin.logs import get_logger

LOG = get_logger(__name__)


def allow_multiprocess_cpu() -> None:
    """Let a multi-process run start on a machine without CUDA.

    Axolotl 0.21's `prepare_optim_env` asks torch whether GPU `LOCAL_RANK` can reach a peer
    GPU whenever WORLD_SIZE > 1; without a CUDA driver torch raises instead of answering, so
    every multi-process CPU run dies while loading its config. Without CUDA there is no peer
    access, so answer False. Does nothing where CUDA is available.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch

    if torch.cuda.is_available() or getattr(torch.cuda.can_device_access_peer, "_tms", False):
        return

    def no_peer_access(device, peer_device) -> bool:
        return False

    no_peer_access._tms = True
    torch.cuda.can_device_access_peer = no_peer_access
    LOG.info("tms: no CUDA in a multi-process run; reporting no GPU peer access to Axolotl")


def cpu_device_map(cfg) -> None:
    """Keep each rank's model on the CPU in a multi-process run without CUDA.

    Axolotl 0.21's `normalize_config` maps every rank to device `LOCAL_RANK` (a CUDA index)
    whenever WORLD_SIZE > 1, even on a machine without CUDA, so loading the model fails.
    """
    import torch

    if (cfg.world_size or 1) > 1 and not torch.cuda.is_available():
        cfg.device_map = {"": "cpu"}
