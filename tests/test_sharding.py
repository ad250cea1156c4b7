"""Whole weights out of sharded training: `sharding.full_state_dict` gathers real FSDP1 and
FSDP2 (`fully_shard`) shards of the tiny model, in two CPU processes over gloo."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

# Each process shards the model, runs a forward and backward pass (so the shards are in use),
# gathers, and rank 0 writes what it got; rank 1 reports how many tensors it got.
WORKER = textwrap.dedent("""
    import functools, json, sys
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from tms_axolotl_plugin.sharding import full_state_dict

    model_dir, layout, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if layout == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
        model = FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=functools.partial(
            transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}))
        FSDP.set_state_dict_type(model, StateDictType.SHARDED_STATE_DICT)  # as a user sets it
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model(input_ids=ids, labels=ids).loss.backward()
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, out)
    else:
        print(json.dumps({"rank1_tensors": len(state)}))
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("layout", ["fsdp1", "fsdp2"])
def test_full_state_dict_gathers_the_whole_unsharded_weights(tmp_path, tiny_model_dir, layout):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "gathered.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(tiny_model_dir), layout, str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert '{"rank1_tensors": 0}' in proc.stdout  # rank 0 only: nothing held twice
    gathered = load_file(out)
    truth = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert set(gathered) == set(truth)
    for name, tensor in truth.items():  # no step was taken: the weights are the model's
        assert gathered[name].shape == tensor.shape and torch.equal(gathered[name], tensor), name
