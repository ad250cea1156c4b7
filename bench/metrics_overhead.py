"""PLD + retention overhead at the default cadence on a longer run (tiny Llama, CPU).

    python bench/metrics_overhead.py [--rows 400] [--epochs 1] [--sequence-len 256]
                                     [--micro-batch-size 1] [--grad-accum 1] [--out NAME]

Runs one TMS `axolotl train` (harvest + student) with the default metric settings (cadence:
about 10 per run, budget `tms.pld.max_overhead` = 3 %, held-out split 5 % of the rows capped at
`tms.pld.max_examples` = 256, 100 retention prompts) and reads each stage's
`tms metrics (<stage>): ... (X%)` line. Writes bench/results/<NAME>.json (default
metrics_overhead).

A measurement is a fixed number of forward tokens and a step is sequence_len x micro batch x
gradient accumulation tokens forward and backward, so the overhead depends on the tokens per
step far more than on the model: both costs scale with model size alike. The tiny model stands
in for a real one; the step size is what to set to match a real run.
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
RESULTS = REPO / "bench" / "results"


def main() -> None:
    from tms_axolotl_plugin.offline_assets import gsm8k_jsonl, tiny_llama_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--sequence-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--out", default="metrics_overhead", help="results file name")
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
        "output_dir": str(root / "out"), "sequence_len": args.sequence_len,
        "sample_packing": True, "pad_to_sequence_len": True,
        "micro_batch_size": args.micro_batch_size,
        "gradient_accumulation_steps": args.grad_accum, "num_epochs": args.epochs,
        "optimizer": "adamw_torch", "learning_rate": 5e-3, "bf16": False, "fp16": False,
        "tf32": False, "attn_implementation": "sdpa", "logging_steps": 10,
        "save_strategy": "no", "seed": 1, "dataloader_num_workers": 0,
        "tms": {"num_checkpoints": 2, "generation": {"max_new_tokens": 12}},
    }
    (root / "cfg.yml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}
    log = root / "log.txt"
    print(f"running in {root}; follow {log}", flush=True)
    with open(log, "w") as handle:  # streamed, so a long run can be followed
        proc = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(root / "cfg.yml")],
                              env=env, cwd=root, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"run failed, see {log}")
    output = log.read_text()
    result = {"rows": args.rows, "epochs": args.epochs, "sequence_len": args.sequence_len,
              "micro_batch_size": args.micro_batch_size, "grad_accum": args.grad_accum,
              "tokens_per_step": args.sequence_len * args.micro_batch_size * args.grad_accum,
              "machine": f"{os.cpu_count()} CPUs, no GPU", "stages": {}}
    pattern = (r"tms metrics \((\w+)\): (\d+) measurements, ([\d.]+)s of ([\d.]+)s training "
               r"wall time \(([\d.]+)%\); (\d+) scheduled")
    for stage, count, seconds, total, percent, skipped in re.findall(pattern, output):
        result["stages"][stage] = {"measurements": int(count), "metric_seconds": float(seconds),
                                   "training_seconds": float(total), "percent": float(percent),
                                   "skipped": int(skipped),
                                   "seconds_per_measurement": round(float(seconds) / int(count), 1)}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    for stage, r in result["stages"].items():
        print(f"{stage:8} {r['measurements']:3d} measurements  {r['metric_seconds']:7.1f}s of "
              f"{r['training_seconds']:7.1f}s  = {r['percent']:.1f}%  ({r['skipped']} skipped)")


if __name__ == "__main__":
    main()
