"""PLD + retention overhead at the default cadence on a longer run (tiny Llama, CPU).

    python bench/metrics_overhead.py [--rows 400]

Runs one TMS `axolotl train` (harvest + student) with the default metric settings (cadence:
about 10 per run, budget `tms.pld.max_overhead` = 3 %) and reads each stage's
`tms metrics (<stage>): ... (X%)` line. Writes bench/results/metrics_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "metrics_overhead.json"


def main() -> None:
    from tms_axolotl_plugin.offline_assets import gsm8k_jsonl, tiny_llama_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tms-overhead-"))
    data = root / "data.jsonl"
    with open(data, "w") as handle:
        for line in gsm8k_jsonl("train").read_text().splitlines()[: args.rows]:
            row = json.loads(line)
            row["messages"][1]["content"] = f"The answer is {row['final_answer']}."
            handle.write(json.dumps(row) + "\n")
    cfg = {
        "base_model": str(tiny_llama_dir()), "plugins": ["tms_axolotl_plugin.TMSPlugin"],
        "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template",
                      "split": "train"}],
        "chat_template": "tokenizer_default", "dataset_prepared_path": str(root / "prepared"),
        "output_dir": str(root / "out"), "sequence_len": 256, "sample_packing": True,
        "pad_to_sequence_len": True, "micro_batch_size": 1, "num_epochs": 1,
        "optimizer": "adamw_torch", "learning_rate": 5e-3, "bf16": False, "fp16": False,
        "tf32": False, "attn_implementation": "sdpa", "logging_steps": 10,
        "save_strategy": "no", "seed": 1, "dataloader_num_workers": 0,
        "tms": {"num_checkpoints": 2, "pld": {"heldout_size": 32},
                "generation": {"max_new_tokens": 12}},
    }
    (root / "cfg.yml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}
    proc = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(root / "cfg.yml")],
                          env=env, cwd=root, capture_output=True, text=True)
    (root / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"run failed, see {root / 'log.txt'}")
    result = {"rows": args.rows, "machine": f"{os.cpu_count()} CPUs, no GPU", "stages": {}}
    pattern = (r"tms metrics \((\w+)\): (\d+) measurements, ([\d.]+)s of ([\d.]+)s training "
               r"wall time \(([\d.]+)%\); (\d+) scheduled")
    for stage, count, seconds, total, percent, skipped in re.findall(pattern, proc.stdout):
        result["stages"][stage] = {"measurements": int(count), "metric_seconds": float(seconds),
                                   "training_seconds": float(total), "percent": float(percent),
                                   "skipped": int(skipped)}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for stage, r in result["stages"].items():
        print(f"{stage:8} {r['measurements']:3d} measurements  {r['metric_seconds']:7.1f}s of "
              f"{r['training_seconds']:7.1f}s  = {r['percent']:.1f}%  ({r['skipped']} skipped)")


if __name__ == "__main__":
    main()
