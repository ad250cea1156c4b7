"""On one GPU: TMS runs whose harvest trains under FSDP2 (SHARDED_STATE_DICT) and under
DeepSpeed ZeRO-3, one process each, and whether every harvest checkpoint is whole weights that
transformers loads. What the CPU tests cannot run: Axolotl 0.21 builds its FSDP mesh on `cuda`,
and DeepSpeed needs CUDA. Prepared with scripts/gpu/sharded_harvest.sh, which says how to run it.

    python scripts/gpu/sharded_harvest.py ASSETS OUT [LAYOUT,...]

ASSETS holds the tiny Llama's config and tokenizer (no weights: they are drawn here, at random);
OUT gets one folder per layout and `sharded_harvest.json` with what was found. Layout `none`
(no sharding; fp32 without CUDA) is a dry run of this script on a CPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

LAYOUTS = {
    "none": {},
    "fsdp2": {"fsdp_version": 2, "fsdp_config": {
        "state_dict_type": "SHARDED_STATE_DICT", "reshard_after_forward": True,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}},
    "zero3": {"deepspeed": {
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": "auto"}, "gradient_accumulation_steps": "auto",
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}},
}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_model(assets: Path, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = out / "model"
    if not (model_dir / "model.safetensors").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(assets))
        model.save_pretrained(model_dir)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (assets / name).exists():
                (model_dir / name).write_bytes((assets / name).read_bytes())
    return model_dir


def write_data(out: Path) -> Path:
    path = out / "data.jsonl"
    with open(path, "w") as handle:
        for i in range(64):
            handle.write(json.dumps({"messages": [
                {"role": "user", "content": f"What is {i} plus {i + 3}?"},
                {"role": "assistant", "content": f"{i} + {i + 3} = {2 * i + 3}."}]}) + "\n")
    return path


def config(layout: str, model_dir: Path, data: Path, out: Path) -> Path:
    cfg = {
        "base_model": str(model_dir), "tokenizer_type": "AutoTokenizer",
        "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template",
                      "split": "train"}],
        "chat_template": "tokenizer_default", "dataset_prepared_path": str(out / "prepared"),
        "output_dir": str(out / "run"), "sequence_len": 128, "sample_packing": False,
        "micro_batch_size": 2, "gradient_accumulation_steps": 1, "num_epochs": 1,
        "learning_rate": 1e-3, "optimizer": "adamw_torch", "lr_scheduler": "constant",
        "bf16": cuda(), "attn_implementation": "sdpa", "save_strategy": "no",
        "plugins": ["tms_axolotl_plugin.TMSPlugin"],
        "tms": {"num_checkpoints": 2, "pld": {"enabled": False},
                "retention": {"enabled": False},
                "generation": {"backend": "hf", "max_new_tokens": 16, "batch_size": 16}},
        **LAYOUTS[layout],
    }
    if "deepspeed" in cfg:
        ds = out / "zero3.json"
        ds.write_text(json.dumps(cfg["deepspeed"]))
        cfg["deepspeed"] = str(ds)
    path = out / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def check_checkpoints(out: Path, model_dir: Path) -> dict:
    """Every harvest checkpoint: a whole model with the base model's tensor names and shapes."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    found = {}
    for checkpoint in sorted((out / "run" / "tms").glob("harvest-*/tms_checkpoints/*")):
        files = sorted(checkpoint.glob("*.safetensors"))
        got = {}
        for file in files:
            with safe_open(str(file), "pt") as f:
                got.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        missing = set(shapes) - set(got) - {"lm_head.weight"}  # tied to the embeddings
        wrong = [k for k in got if shapes.get(k) != got[k]]
        found[checkpoint.name] = {"files": [f.name for f in files], "tensors": len(got),
                                  "missing": sorted(missing), "wrong_shape": wrong,
                                  "whole": bool(got) and not missing and not wrong}
    return found


def main() -> int:
    assets, out_root = Path(sys.argv[1]), Path(sys.argv[2])
    out_root.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(assets, out_root)
    data = write_data(out_root)
    results = {}
    for layout in (sys.argv[3].split(",") if len(sys.argv) > 3 else ["fsdp2", "zero3"]):
        out = out_root / layout
        out.mkdir(exist_ok=True)
        log = out / "train.log"
        started = time.perf_counter()
        with open(log, "w") as handle:
            code = subprocess.call(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "1", "-m", "axolotl.cli.train",
                 str(config(layout, model_dir, data, out))],
                stdout=handle, stderr=subprocess.STDOUT, env=os.environ, timeout=420)
        stages = out / "run" / "tms" / "stages.json"
        results[layout] = {
            "exit": code, "seconds": round(time.perf_counter() - started, 1),
            "stages": json.loads(stages.read_text()) if stages.exists() else None,
            "checkpoints": check_checkpoints(out, model_dir),
            "log_tail": log.read_text()[-3000:] if code else ""}
        print(layout, json.dumps({k: v for k, v in results[layout].items()
                                  if k != "log_tail"}, default=str)[:1500], flush=True)
    (out_root / "sharded_harvest.json").write_text(json.dumps(results, indent=2, default=str))
    ok = all(r["exit"] == 0 and len(r["checkpoints"]) == 2
             and all(c["whole"] for c in r["checkpoints"].values()) for r in results.values())
    print("sharded harvest check:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
