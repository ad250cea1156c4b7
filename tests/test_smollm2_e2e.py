"""TMS end to end with the real SmolLM2-135M-Instruct (LoRA) on a small GSM8K subset, on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import assert_ok, base_config, read_jsonl, run_axolotl_train, write_config

pytestmark = pytest.mark.slow


def test_tms_with_smollm2_lora_on_gsm8k(tmp_path, smollm2_model_dir, gsm8k_train):
    data = tmp_path / "gsm8k_12.jsonl"
    data.write_text("".join(line + "\n" for line in gsm8k_train.read_text().splitlines()[:12]))
    cfg = base_config(
        smollm2_model_dir, data, tmp_path / "out",
        adapter="lora", lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_linear=True,
        lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False,
        learning_rate=2e-4, micro_batch_size=2, sequence_len=512,
        plugins=["tms_axolotl_plugin.TMSPlugin"],
        tms={"num_checkpoints": 2, "alpha": 0.25, "seed": 3, "pld": {"enabled": False}, "retention": {"enabled": False},
             "generation": {"max_new_tokens": 160, "batch_size": 16}},
    )
    cfg.pop("max_steps")
    proc = run_axolotl_train(write_config(tmp_path / "cfg.yml", cfg), timeout=1800)
    assert_ok(proc)

    stages = json.loads((tmp_path / "out" / "tms" / "stages.json").read_text())
    harvest_dir = Path(stages["harvest"]["output_dir"])
    for step in stages["harvest"]["steps"]:
        assert (harvest_dir / "tms_checkpoints" / f"checkpoint-{step}" /
                "adapter_model.safetensors").exists()
    records = [r for shard in (tmp_path / "out" / "tms" / "labels").glob("*/labels-rank*.jsonl")
               for r in read_jsonl(shard)]
    assert records
    stopped = [r for r in records if r["finish_reason"] == "stop"]
    assert stopped, "SmolLM2 should finish some GSM8K answers within 160 tokens"
    assert all(r["text"].strip() for r in stopped)
    rows = read_jsonl(next((tmp_path / "out" / "tms" / "student").glob("mixture-*-0.jsonl")))
    regenerated = [r for r in rows if r["tms_target"]]
    texts = {r["text"] for r in stopped}
    assert all(r["messages"][-1]["content"] in texts for r in regenerated)
    assert stages["student"]["status"] == "done"
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
