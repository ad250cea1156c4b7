"""Whole harvest checkpoints out of sharded training (FSDP, DeepSpeed ZeRO-3).

Each harvest checkpoint must be a model (or adapter) that vLLM and transformers load as it is.
`Trainer.save_model` writes one only in some layouts: under FSDP with a sharded state dict it
writes no weights at all, and under ZeRO-3 without `stage3_gather_16bit_weights_on_model_save`
it writes a DeepSpeed checkpoint that needs `zero_to_fp32.py`. So:
- FSDP (1 or 2), any `state_dict_type`: the harvest gathers a full state dict itself, offloaded
  to CPU on rank 0 (`full_state_dict`: torch's own gathers, the ones accelerate's
  `get_state_dict` uses), and writes it as safetensors;
- ZeRO-3: the gather is DeepSpeed's 16-bit one, which the DeepSpeed config must allow; a config
  that does not is rejected when it is loaded (`check_harvest_sharding`), before any training.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tms_axolotl_plugin.errors import TMSConfigError

GATHER_KEY = "stage3_gather_16bit_weights_on_model_save"


def _deepspeed_config(value: Any) -> dict | None:
    """The DeepSpeed config a `deepspeed:` value names (a JSON file or a mapping); None when it
    cannot be read here (Axolotl reports that itself)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, (str, Path)):
        try:
            return json.loads(Path(value).read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return None


def check_harvest_sharding(config: Mapping[str, Any]) -> None:
    """Reject a training layout whose harvest checkpoints could not be loaded by vLLM or
    transformers, naming the key to change."""
    deepspeed = _deepspeed_config(config.get("deepspeed"))
    if not deepspeed:
        return
    zero = deepspeed.get("zero_optimization") or {}
    if str(zero.get("stage")) == "3" and zero.get(GATHER_KEY) is not True:
        raise TMSConfigError(
            f"`deepspeed: {config.get('deepspeed')}` is ZeRO-3 without "
            f"`zero_optimization.{GATHER_KEY}: true` (it is {zero.get(GATHER_KEY)!r}): the "
            "harvest's checkpoints would be DeepSpeed shards that vLLM and transformers cannot "
            f"load. Set `\"{GATHER_KEY}\": true` in that file (Axolotl's deepspeed_configs/"
            "zero3*.json do), or train with FSDP, whose checkpoints the plugin gathers itself.")


def full_state_dict(model) -> dict:
    """Every rank (a collective): the whole state dict of an FSDP-sharded `model` (FSDP1's
    wrapper or an FSDP2 `fully_shard` module), on CPU on rank 0 and empty on the others,
    whatever state dict type the model was set up with."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def save_whole_model(trainer, target: Path) -> None:
    """Every rank: write `target` as a model (or adapter) directory with whole weights."""
    if getattr(trainer, "is_fsdp_enabled", False) and "FULL_STATE_DICT" not in str(
            trainer.accelerator.state.fsdp_plugin.state_dict_type):
        state_dict = full_state_dict(trainer.model)
        if trainer.args.should_save:
            trainer._save(str(target), state_dict=state_dict)
        return
    trainer.save_model(str(target))  # gathers under FULL_STATE_DICT and ZeRO-3 (checked)
