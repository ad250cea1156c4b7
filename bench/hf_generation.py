"""Throughput of the in-process transformers backend (`HFGenerator`) alone, optionally against
another version of generation.py on the same prompts and in the same process.

    PYTHONPATH=. HF_HUB_OFFLINE=1 flock /tmp/tms-bench.lock \
        $(scripts/env.sh trainer)/bin/python bench/hf_generation.py \
        [--prompts 32] [--max-new-tokens 64] [--batch-sizes 16] [--threads 2] \
        [--compare-with OLD_generation.py] [--rounds 1] [--name NAME]

Model: SmolLM2-135M-Instruct (fp32), GSM8K-train questions, sampled at temperature 1: the
prompts and settings of bench/vllm_regeneration.py's transformers run (32 prompts, 64 tokens,
batch 16). `--compare-with` runs another generation.py (e.g. the committed one:
`git show HEAD:tms_axolotl_plugin/generation.py > /tmp/old_generation.py`) on the same
requests, alternating with this one `--rounds` times (this shared machine's load drifts, so
the ratio of adjacent runs is the measure), and counts the answers that are the same.
tokens/s counts answer tokens over wall time, model load included (as the regenerate stage
reports it). Results are added to bench/results/hf_generation.json under `--name`, with the
command that produced them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from statistics import mean

from tms_axolotl_plugin import generation
from tms_axolotl_plugin.offline_assets import gsm8k_jsonl, smollm2_dir

RESULTS = Path(__file__).parent / "results" / "hf_generation.json"
ENV = "PYTHONPATH=. HF_HUB_OFFLINE=1 flock /tmp/tms-bench.lock $(scripts/env.sh trainer)/bin/python"


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("compared_generation", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def measure(module, batch_size: int, model: Path, prompts, max_new_tokens: int) -> dict:
    requests = [module.GenerationRequest(f"p{i}", 1, ids, max_new_tokens)
                for i, ids in enumerate(prompts)]
    backend = module.HFGenerator(batch_size=batch_size, dtype="float32")
    started, cpu = time.perf_counter(), time.process_time()
    labels = [label for batch in backend.generate(model, requests, module.SamplingSettings())
              for label in batch]
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    tokens = sum(label.num_tokens for label in labels)
    return {"batch_size": batch_size, "seconds": seconds, "cpu_seconds": cpu, "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "answers": {label.prompt_key: label.text for label in labels}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--compare-with", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--name", default="default")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in gsm8k_jsonl("train").read_text().splitlines()]
    prompts = [tuple(tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False))
               for row in rows[: args.prompts]]
    result: dict = {
        "command": f"{ENV} {shlex.join(['bench/hf_generation.py', *sys.argv[1:]])}",
        "model": "SmolLM2-135M-Instruct fp32", "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "load_average_at_start": os.getloadavg(), "runs": {}}
    versions = {"hf": generation}
    if args.compare_with:
        versions = {"compared": load_module(args.compare_with), **versions}
    reference, runs = None, {}
    for round_ in range(args.rounds):  # versions alternate: adjacent runs see similar load
        for name, module in (versions.items() if round_ % 2 == 0 else
                             reversed(versions.items())):
            for batch_size in args.batch_sizes:
                run = measure(module, batch_size, model, prompts, args.max_new_tokens)
                answers = run.pop("answers")
                reference = reference or answers
                run["same_answers_as_first_run"] = sum(answers[k] == reference[k]
                                                       for k in reference)
                runs.setdefault(f"{name} b{batch_size}", []).append(run)
    for key, key_runs in runs.items():
        result["runs"][key] = {"tokens_per_s": mean(r["tokens_per_s"] for r in key_runs),
                               "runs": key_runs}
    if args.compare_with:
        result["hf_over_compared_by_round"] = {
            f"b{b}": [new["tokens_per_s"] / old["tokens_per_s"] for new, old in
                      zip(runs[f"hf b{b}"], runs[f"compared b{b}"], strict=True)]
            for b in args.batch_sizes}
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    results[args.name] = result
    args.results.parent.mkdir(exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    for key, key_runs in runs.items():
        for r in key_runs:
            print(f"{key:14} {r['tokens']:6d} tokens {r['seconds']:7.1f}s "
                  f"({r['cpu_seconds']:6.1f}s CPU) {r['tokens_per_s']:7.1f} tok/s, same answers "
                  f"{r['same_answers_as_first_run']}/{args.prompts}")
    for b, ratios in result.get("hf_over_compared_by_round", {}).items():
        print(f"hf / compared, {b}: " + ", ".join(f"{r:.2f}" for r in ratios))

if __name__ == "__main__":
    main()
