"""Shared fixtures: offline models/data built by the project's own code, a clean plugin manager,
and a runner for real `axolotl train` subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Offline and quiet, for this process and every subprocess it starts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def reset_plugin_manager():
    """Axolotl's PluginManager is a process-wide singleton; give every test a fresh one."""
    from axolotl.integrations.base import PluginManager, reset_plugin_entry_points_cache

    def clear():
        reset_plugin_entry_points_cache()
        instance = PluginManager._instance
        if instance is not None:
            instance.plugins.clear()
            instance._cfg = None

    clear()
    yield
    clear()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from tms_axolotl_plugin.offline_assets import tiny_llama_dir

    return tiny_llama_dir()


@pytest.fixture(scope="session")
def smollm2_model_dir() -> Path:
    from tms_axolotl_plugin.offline_assets import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def gsm8k_train() -> Path:
    from tms_axolotl_plugin.offline_assets import gsm8k_jsonl

    return gsm8k_jsonl("train")


@pytest.fixture
def small_chat_dataset(tmp_path, gsm8k_train) -> Path:
    """The first 24 GSM8K training rows, in chat format."""
    out = tmp_path / "gsm8k_small.jsonl"
    with open(gsm8k_train) as src, open(out, "w") as dst:
        for i, line in enumerate(src):
            if i == 24:
                break
            dst.write(line)
    return out


SHORT_ANSWER_ROWS = 40


@pytest.fixture(scope="session")
def short_answer_data(tmp_path_factory, gsm8k_train) -> Path:
    """GSM8K questions with one-line answers, so a tiny model learns to stop (emit EOS) fast."""
    path = tmp_path_factory.mktemp("data") / "gsm8k_short.jsonl"
    rows = read_jsonl(gsm8k_train)[:SHORT_ANSWER_ROWS]
    with open(path, "w") as handle:
        for row in rows:
            row["messages"][1]["content"] = f"The answer is {row['final_answer']}."
            handle.write(json.dumps(row) + "\n")
    return path


def base_config(model_dir: Path, dataset: Path, output_dir: Path, **overrides) -> dict:
    """A small, valid CPU SFT config (chat_template data, sample packing on)."""
    cfg = {
        "base_model": str(model_dir),
        "tokenizer_type": "AutoTokenizer",
        "datasets": [
            {"path": str(dataset), "ds_type": "json", "type": "chat_template", "split": "train"}
        ],
        "chat_template": "tokenizer_default",
        "dataset_prepared_path": str(output_dir / "prepared"),
        "val_set_size": 0,
        "output_dir": str(output_dir),
        "sequence_len": 512,
        "sample_packing": True,
        "pad_to_sequence_len": True,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "max_steps": 4,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "learning_rate": 1e-3,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "attn_implementation": "sdpa",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 7,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "use_tensorboard": False,
    }
    cfg.update(overrides)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_axolotl_train(config: Path, *, timeout: int = 900, env: dict | None = None,
                      launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the real `axolotl train` entry point in a subprocess; return its combined output."""
    cmd = launcher or [sys.executable, "-m", "axolotl.cli.train"]
    full_env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    full_env.update(env or {})
    proc = subprocess.run(
        [*cmd, str(config)],
        cwd=config.parent,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    (config.parent / "train_output.log").write_text(proc.stdout)
    return proc


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, "axolotl train failed:\n" + proc.stdout[-6000:]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Sampling settings a checkpoint's generation_config.json may carry (Qwen2.5-Instruct ships
# top_k 20 and repetition_penalty 1.05); generation must ignore all of them.
LEAKY_GENERATION_CONFIG = {"do_sample": True, "top_k": 1, "min_p": 0.9,
                           "repetition_penalty": 1.5, "no_repeat_ngram_size": 1}


def sharpened_copy(model_dir: Path, target: Path, generation_config: dict | None = None) -> Path:
    """The tiny model with its logits sharpened 8x (final norm scaled): its plain samples at
    temperature 1 repeat tokens often (as its greedy decoding does) yet differ from seed to
    seed. `generation_config`: settings added to its generation_config.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    if generation_config:
        path = target / "generation_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **generation_config}))
    return target


def repeated_tokens(tokens) -> int:
    """How many tokens of an answer already occurred earlier in it."""
    return len(tokens) - len(set(tokens))
