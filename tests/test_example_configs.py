"""The example configs load through Axolotl's own config loading and validation, offline.

The GPU configs name a hub model (Qwen/Qwen2.5-1.5B-Instruct). `load_cfg` would fetch its config
from the hub while normalising, so they are checked with the steps of `load_cfg` that decide
whether a config is accepted: `prepare_plugins`, then `validate_config` with the capabilities
`axolotl.cli.config.gpu_capabilities` reports on an H100.
"""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO, run_axolotl_train, write_config

EXAMPLES = REPO / "example_configs"
PLUGIN = "tms_axolotl_plugin.TMSPlugin"
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
DEMO = "tms_cpu_demo.yml"
TMS_CONFIGS = ["tms_math.yml", "tms_gsm8k.yml", "tms_math_lora.yml", "iterative_sft_math.yml"]
GPU_CONFIGS = [*TMS_CONFIGS, "sft_math.yml", "grpo_math.yml"]
# What gpu_capabilities() reports on one H100 (WORLD_SIZE gives n_gpu).
H100 = {"bf16": True, "fp8": True, "tf32": True, "compute_capability": "sm_90"}
# The settings that make up the training budget the baselines share with tms_math.yml.
BUDGET_KEYS = ["base_model", "sequence_len", "sample_packing", "micro_batch_size",
               "gradient_accumulation_steps", "num_epochs", "optimizer", "lr_scheduler",
               "learning_rate", "warmup_ratio", "weight_decay", "max_grad_norm", "bf16",
               "attn_implementation", "gradient_checkpointing", "deepspeed", "seed",
               "train_on_inputs", "chat_template"]


def raw(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def validate_gpu_config(name: str, n_gpu: int = 1):
    """`load_cfg`'s acceptance steps for `name` as on `n_gpu` H100s; no hub access."""
    import torch
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(raw(name))
    cfg.axolotl_config_path = str(EXAMPLES / name)
    prepare_plugins(cfg)
    return validate_config(
        cfg,
        capabilities={**H100, "n_gpu": n_gpu},
        env_capabilities={"torch_version": torch.__version__.split("+", maxsplit=1)[0]},
    )


@pytest.fixture
def in_repo(monkeypatch):
    """Relative paths in the configs (deepspeed JSON, data) are relative to the repo root."""
    monkeypatch.chdir(REPO)


def test_cpu_demo_config_loads_through_axolotl(tmp_path):
    from axolotl.cli.config import load_cfg

    from tms_axolotl_plugin.demo import render_demo_config

    cfg = load_cfg(str(render_demo_config(tmp_path, rows=16)))
    assert cfg.tms["num_checkpoints"] == 4 and cfg.tms["generation"]["max_new_tokens"] == 320
    assert cfg.sample_packing and cfg.plugins == ["tms_axolotl_plugin.TMSPlugin"]
    assert (REPO / "example_configs" / "tms_cpu_demo.yml").exists()


def test_every_example_config_is_checked_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.yml")) == sorted([DEMO, *GPU_CONFIGS])


@pytest.mark.parametrize("name", [DEMO, *GPU_CONFIGS])
def test_every_example_config_opens_with_a_comment_block(name):
    lines = (EXAMPLES / name).read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header).lower()
    assert len(header) >= 3, f"{name} must open with a comment block saying what it runs"
    assert "min" in text or "hour" in text, f"{name}: say roughly how long it takes"
    if name in GPU_CONFIGS:
        assert "hardware" in text and "gpu" in text, f"{name}: say what hardware it needs"
        assert "not measured" in text, f"{name}: say the durations are estimates"


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_config_passes_axolotl_validation_offline(name, in_repo):
    cfg = validate_gpu_config(name)
    assert cfg.base_model == MODEL
    assert cfg.bf16 is True
    assert cfg.attn_implementation == "flash_attention_2"  # `flash_attention: true`, canonical
    assert cfg.datasets[0]["path"].startswith("data/")
    if cfg.deepspeed:
        ds = json.loads((REPO / cfg.deepspeed).read_text())
        assert ds["zero_optimization"]["stage"] == 2
        assert ds["train_micro_batch_size_per_gpu"] == "auto"


@pytest.mark.parametrize("name", TMS_CONFIGS)
def test_tms_configs_run_the_method_with_vllm_regeneration_and_metrics(name, in_repo):
    cfg = validate_gpu_config(name)
    assert cfg.plugins == [PLUGIN]
    tms = cfg.tms
    assert tms["num_checkpoints"] == 10 and tms["alpha"] == 0.25
    assert tms["generation"]["backend"] == "vllm" and tms["generation"]["temperature"] == 1.0
    assert tms["sidecar"]["host"] == "127.0.0.1" and not tms["sidecar"]["allow_remote"]
    assert tms["pld"]["enabled"] and tms["retention"]["enabled"]
    assert cfg.sample_packing is True and cfg.train_on_inputs is False
    assert cfg.datasets[0]["type"] == "chat_template"
    assert cfg.vllm["max_model_len"] == cfg.sequence_len


def test_flagship_is_a_full_fine_tune_with_zero2(in_repo):
    cfg = validate_gpu_config("tms_math.yml")
    assert cfg.adapter is None
    assert cfg.deepspeed == "example_configs/deepspeed/zero2.json"
    assert cfg.tms["schedule"] == "offline" and cfg.tms["student_init"] == "base"
    assert cfg.datasets[0]["path"] == "data/math/train.jsonl"


@pytest.mark.parametrize("n_gpu", [2, 8])
def test_flagship_validates_on_several_gpus(n_gpu, in_repo):
    assert validate_gpu_config("tms_math.yml", n_gpu=n_gpu).tms["num_checkpoints"] == 10


def test_gsm8k_config_reads_gsm8k(in_repo):
    cfg = validate_gpu_config("tms_gsm8k.yml")
    assert cfg.datasets[0]["path"] == "data/gsm8k/train.jsonl"


def test_lora_config_trains_an_adapter_served_by_vllm(in_repo):
    cfg = validate_gpu_config("tms_math_lora.yml")
    assert cfg.adapter == "lora" and cfg.lora_r == 32 and cfg.lora_target_linear
    assert cfg.tms["generation"]["backend"] == "vllm"


def test_iterative_sft_differs_from_tms_only_in_the_schedule():
    tms, iterative = raw("tms_math.yml"), raw("iterative_sft_math.yml")
    assert iterative["tms"].pop("schedule") == "iterative"
    tms["tms"].pop("schedule")
    for config in (tms, iterative):
        del config["output_dir"], config["dataset_prepared_path"]
    assert iterative == tms


@pytest.mark.parametrize("name", ["sft_math.yml", "iterative_sft_math.yml", "grpo_math.yml"])
def test_baselines_share_the_flagship_model_and_problems(name):
    flagship, baseline = raw("tms_math.yml"), raw(name)
    assert baseline["base_model"] == flagship["base_model"]
    assert baseline["datasets"][0]["path"].startswith("data/math/train")
    if name != "grpo_math.yml":  # GRPO's budget is in samples, not SFT epochs (see its header)
        for key in BUDGET_KEYS:
            assert baseline.get(key) == flagship.get(key), key


def test_sft_baseline_is_plain_axolotl(in_repo):
    cfg = validate_gpu_config("sft_math.yml")
    assert not cfg.plugins and "tms" not in cfg
    assert cfg.val_set_size == 0.05


def test_grpo_baseline_uses_axolotl_grpo_with_the_math_reward(in_repo):
    cfg = validate_gpu_config("grpo_math.yml")
    assert cfg.rl == "grpo" and not cfg.plugins and "tms" not in cfg
    assert cfg.trl["reward_funcs"] == ["tms_axolotl_plugin.rewards.math_answer_reward"]
    assert cfg.trl["use_vllm"] and cfg.trl["vllm_mode"] == "server"
    assert cfg.trl["vllm_server_host"] == cfg.vllm["host"] == "127.0.0.1"
    assert cfg.trl["num_generations"] == 8
    assert cfg.sample_packing is False
    assert cfg.datasets[0]["path"] == "data/math/train_grpo.jsonl"
    assert not cfg.datasets[0].get("type")  # rows are already in TRL's prompt form


@pytest.mark.parametrize("n_gpu", [2, 4])
def test_grpo_batch_holds_whole_groups_on_several_training_gpus(n_gpu, in_repo):
    assert validate_gpu_config("grpo_math.yml", n_gpu=n_gpu).rl == "grpo"


def test_grpo_reward_function_resolves_through_axolotl():
    from axolotl.core.trainers.grpo import GRPOStrategy

    from tms_axolotl_plugin.rewards import math_answer_reward

    name = raw("grpo_math.yml")["trl"]["reward_funcs"][0]
    assert GRPOStrategy.get_reward_func(name) is math_answer_reward


PROBE = '''
import json, os
from tms_axolotl_plugin.rewards import math_answer_reward

def probe_reward(completions, answer, **kwargs):
    rewards = math_answer_reward(completions, answer, **kwargs)
    with open(os.environ["TMS_REWARD_PROBE"], "a") as handle:
        handle.write(json.dumps({"completions": completions, "answer": answer,
                                 "prompts": kwargs["prompts"], "rewards": rewards}) + "\\n")
    return rewards
'''


@pytest.mark.slow
def test_grpo_config_trains_with_prepared_rows_and_the_reward(tmp_path, tiny_model_dir):
    """grpo_math.yml, shrunk to a tiny model on CPU without vLLM, runs Axolotl's GRPO on rows
    written by prepare_data: TRL hands the reward the completions and the `answer` column."""
    from tms_axolotl_plugin.prepare_data import convert_rows, grpo_row, write_jsonl

    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}
            for i in range(8)]
    chat_rows, _ = convert_rows("gsm8k", rows)
    data = tmp_path / "train_grpo.jsonl"
    write_jsonl(data, (grpo_row(r) for r in chat_rows))
    (tmp_path / "grpo_probe.py").write_text(PROBE)

    cfg = raw("grpo_math.yml")
    for key in ("deepspeed", "vllm", "saves_per_epoch", "save_total_limit"):
        cfg.pop(key)
    cfg.update(base_model=str(tiny_model_dir), tokenizer_type="AutoTokenizer",
               datasets=[{"path": str(data), "ds_type": "json", "split": "train"}],
               dataset_prepared_path=str(tmp_path / "prepared"), output_dir=str(tmp_path / "run"),
               bf16=False, fp16=False, tf32=False, attn_implementation="sdpa",
               gradient_checkpointing=False, optimizer="adamw_torch", micro_batch_size=2,
               gradient_accumulation_steps=1, max_steps=2, save_strategy="no",
               use_tensorboard=False, report_to="none", dataloader_num_workers=0)
    cfg["trl"].update(use_vllm=False, num_generations=2, max_completion_length=8,
                      log_completions=False,
                      reward_funcs=[cfg["trl"]["reward_funcs"][0], "grpo_probe.probe_reward"],
                      reward_weights=[1.0, 0.0])
    cfg["trl"].pop("vllm_mode")
    probe = tmp_path / "probe.jsonl"
    result = run_axolotl_train(write_config(tmp_path / "grpo.yml", cfg), timeout=900,
                               env={"TMS_REWARD_PROBE": str(probe)})
    assert result.returncode == 0, result.stdout[-4000:]
    calls = [json.loads(line) for line in probe.read_text().splitlines()]
    assert calls, "the reward function was never called"
    known = {r["answer"] for r in chat_rows}
    for call in calls:
        assert set(call["answer"]) <= known and len(call["rewards"]) == len(call["completions"])
        assert call["completions"][0][0]["role"] == "assistant"  # chat completions
        assert call["prompts"][0][-1]["content"].startswith("What is")
    assert "rewards/math_answer_reward/mean" in result.stdout
