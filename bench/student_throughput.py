"""Student training throughput vs plain Axolotl SFT on the same config, measured side by side.

    python bench/student_throughput.py [--rows 48] [--model smollm2|tiny]

Runs two real `axolotl train` processes one after the other on this machine: (1) plain SFT
of the config without the plugin, (2) the same config with `tms:` (harvest, regenerate,
student). Compares Axolotl's own per-step `tokens/train_per_sec_per_gpu` of the plain run and
of the student stage (steps after the first two, to skip warm-up). Writes
bench/results/student_throughput.json.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "student_throughput.json"


def config(model: Path, data: Path, out: Path, tms: bool) -> dict:
    cfg = {
        "base_model": str(model),
        "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template",
                      "split": "train"}],
        "chat_template": "tokenizer_default", "dataset_prepared_path": str(out / "prepared"),
        "output_dir": str(out), "sequence_len": 512, "sample_packing": True,
        "pad_to_sequence_len": True, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
        "num_epochs": 1, "optimizer": "adamw_torch", "lr_scheduler": "cosine",
        "learning_rate": 2e-5, "bf16": False, "fp16": False, "tf32": False,
        "attn_implementation": "sdpa", "logging_steps": 1, "save_strategy": "no", "seed": 42,
        "dataloader_num_workers": 0,
    }
    if tms:
        cfg["plugins"] = ["tms_axolotl_plugin.TMSPlugin"]
        cfg["tms"] = {"num_checkpoints": 2, "pld": {"enabled": False}, "retention": {"enabled": False},
                      "generation": {"max_new_tokens": 192, "batch_size": 16}}
    return cfg


def step_throughputs(text: str) -> list[float]:
    values = []
    for match in re.finditer(r"\{'loss'[^}]*\}", text):
        entry = ast.literal_eval(match.group(0))
        if "tokens/train_per_sec_per_gpu" in entry:
            values.append(float(entry["tokens/train_per_sec_per_gpu"]))
    return values


def run(cfg: dict, workdir: Path) -> str:
    path = workdir / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}
    proc = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(path)], env=env,
                          cwd=workdir, capture_output=True, text=True)
    (workdir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"run failed, see {workdir / 'log.txt'}")
    return proc.stdout + proc.stderr


def main() -> None:
    from tms_axolotl_plugin.offline_assets import gsm8k_jsonl, smollm2_dir, tiny_llama_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    args = parser.parse_args()
    model = smollm2_dir() if args.model == "smollm2" else tiny_llama_dir()
    root = Path(tempfile.mkdtemp(prefix="tms-bench-"))
    data = root / "data.jsonl"
    data.write_text("".join(gsm8k_jsonl("train").read_text().splitlines(True)[: args.rows]))

    (root / "plain").mkdir()
    plain = step_throughputs(run(config(model, data, root / "plain" / "out", False), root / "plain"))
    (root / "tms").mkdir()
    tms_text = run(config(model, data, root / "tms" / "out", True), root / "tms")
    student = step_throughputs(tms_text.split("tms student:")[-1])
    plain_mean, student_mean = statistics.mean(plain[2:]), statistics.mean(student[2:])
    result = {
        "model": args.model, "rows": args.rows, "machine": f"{platform.machine()}, "
        f"{os.cpu_count()} CPUs", "metric": "mean tokens/train_per_sec_per_gpu over steps 3..",
        "plain_sft_tokens_per_s": plain_mean, "tms_student_tokens_per_s": student_mean,
        "ratio_student_over_plain": student_mean / plain_mean,
        "plain_steps": len(plain), "student_steps": len(student), "workdir": str(root),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"plain SFT   {plain_mean:10.1f} tokens/s  ({len(plain)} steps)")
    print(f"TMS student {student_mean:10.1f} tokens/s  ({len(student)} steps)")
    print(f"ratio {result['ratio_student_over_plain']:.3f}; written to {RESULTS}")


if __name__ == "__main__":
    main()
