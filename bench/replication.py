"""Small-scale replication on CPU: base vs SFT (harvest) vs TMS student vs iterative SFT.

    TMS_SIDECAR_PYTHON=$(scripts/env.sh sidecar)/bin/python PYTHONPATH=. \
    $(scripts/env.sh trainer)/bin/python bench/replication.py [--rows 96] [--epochs 2]

SmolLM2-135M-Instruct (fp32) trained on the first `--rows` GSM8K-train problems with the demo
config (example_configs/tms_cpu_demo.yml), regeneration through the vLLM sidecar:
1. one TMS run (`axolotl train`): its harvest run is the SFT baseline, its student is TMS;
2. an iterative-SFT run (`tms.schedule: iterative`) on the same harvested checkpoints
   (`tms.harvest_from`), same data, epochs and steps;
3. every model (and the base model) is evaluated on: GSM8K-test accuracy (greedy, final-number
   exact match, first `--gsm8k-test` problems), retention NLL (base-model answers to the ~100
   shipped off-task prompts), MMLU-STEM accuracy by letter log-likelihood (a fixed seeded
   sample of `--mmlu` questions) and PLD (NLL of the held-out GSM8K labels).
Writes bench/results/replication.{json,md} and PLD/retention curves (bench/results/replication/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

from tms_axolotl_plugin.demo import render_demo_config
from tms_axolotl_plugin.offline_assets import gsm8k_jsonl, mmlu_stem_jsonl, smollm2_dir

RESULTS = Path(__file__).parent / "results"
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024}


def train(config: Path, log: Path) -> float:
    """`axolotl train config` in a child process (as a user runs it); returns wall seconds."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    started = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, "-m", "axolotl.cli.train", str(config)],
                               stdout=handle, stderr=subprocess.STDOUT, env=env)
    if code:
        sys.exit(f"axolotl train {config} failed (exit {code}); see {log}")
    return time.perf_counter() - started


def configure(out: Path, args, sidecar_python: str) -> Path:
    config = render_demo_config(out / "tms", rows=args.rows)
    cfg = yaml.safe_load(config.read_text())
    cfg["output_dir"] = str(out / "tms_run")
    cfg["num_epochs"] = args.epochs
    cfg["learning_rate"] = args.lr
    cfg["vllm"] = dict(ENGINE)
    cfg["tms"]["generation"].update(backend="vllm", max_new_tokens=args.answer_tokens)
    cfg["tms"]["generation"].pop("batch_size", None)
    cfg["tms"]["sidecar"] = {"python": sidecar_python, "concurrency": 32}
    # Curves need more than the budgeted start and end points: measure every 4 steps.
    cfg["tms"]["pld"].update(eval_steps=4, max_overhead=0)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return config


def iterative_config(out: Path, tms_config: Path, harvest_dir: Path) -> Path:
    cfg = yaml.safe_load(tms_config.read_text())
    cfg["output_dir"] = str(out / "iterative_sft_run")
    cfg["dataset_prepared_path"] = str(out / "iterative" / "prepared")
    cfg["tms"]["schedule"] = "iterative"
    cfg["tms"]["harvest_from"] = str(harvest_dir / "tms_checkpoints")
    path = out / "iterative" / "config.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def gsm8k_accuracies(models: dict[str, Path], count: int, max_new_tokens: int,
                     sidecar_python: str, workdir: Path) -> dict[str, float]:
    """Greedy answers from every model through one vLLM server (weights reloaded in place)."""
    from transformers import AutoTokenizer

    from tms_axolotl_plugin.config import TMSConfig
    from tms_axolotl_plugin.evaluation import answer_is_correct
    from tms_axolotl_plugin.generation import GenerationRequest, SamplingSettings
    from tms_axolotl_plugin.vllm_backend import VLLMGenerator

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    rows = [json.loads(line) for line in gsm8k_jsonl("test").read_text().splitlines()][:count]
    prompts = [tuple(tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False))
               for row in rows]
    tms = TMSConfig.model_validate({"generation": {"backend": "vllm"}, "sidecar": {
        "python": sidecar_python, "concurrency": 32}})
    backend = VLLMGenerator(tms, ENGINE, str(smollm2_dir()), workdir / "sidecar")
    accuracy = {}
    try:
        for index, (name, path) in enumerate(models.items()):
            requests = [GenerationRequest(f"q{i}", index, ids, max_new_tokens)
                        for i, ids in enumerate(prompts)]
            labels = {label.prompt_key: label.text for batch in
                      backend.generate(path, requests, SamplingSettings(greedy=True))
                      for label in batch}
            right = sum(answer_is_correct(labels[f"q{i}"], row["final_answer"])
                        for i, row in enumerate(rows))
            accuracy[name] = right / len(rows)
            print(f"gsm8k {name}: {right}/{len(rows)}", flush=True)
    finally:
        backend.close()
    return accuracy


def likelihood_metrics(models: dict[str, Path], heldout: Path, mmlu_count: int,
                       workdir: Path) -> dict[str, dict[str, float]]:
    """Retention NLL, PLD and MMLU-STEM accuracy under each model (transformers, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tms_axolotl_plugin.evaluation import MultipleChoice, multiple_choice_accuracy
    from tms_axolotl_plugin.pld import load_scored_answers, mean_answer_nll
    from tms_axolotl_plugin.retention import (
        base_answers_path,
        ensure_base_answers,
        load_retention_prompts,
    )

    base = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = load_retention_prompts(None, 1000)
    cfg = SimpleNamespace(base_model=str(base))
    path = base_answers_path(cfg, tokenizer, prompts, 128, workdir / "retention")
    retention = load_scored_answers(ensure_base_answers(cfg, tokenizer, prompts, 128, path))
    labels = load_scored_answers(heldout)
    rows = [json.loads(line) for line in mmlu_stem_jsonl().read_text().splitlines()]
    sample = random.Random(0).sample(rows, mmlu_count)
    questions = [MultipleChoice(r["question"], tuple(r["choices"]), r["answer"]) for r in sample]
    results = {}
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        results[name] = {
            "retention_nll": mean_answer_nll(model, retention, batch_size=8),
            "pld": mean_answer_nll(model, labels, batch_size=8),
            "mmlu_stem_acc": multiple_choice_accuracy(model, tokenizer, questions),
        }
        print(name, results[name], flush=True)
    results["_counts"] = {"retention_prompts": len(retention), "heldout_labels": len(labels),
                          "mmlu_questions": len(questions)}
    return results


def markdown(result: dict) -> str:
    lines = ["| model | GSM8K acc | retention NLL | Δ retention vs base | MMLU-STEM acc | PLD |",
             "|---|---|---|---|---|---|"]
    base = result["metrics"]["base"]["retention_nll"]
    for name in result["models"]:
        m = result["metrics"][name]
        lines.append(f"| {name} | {result['gsm8k'][name]:.3f} | {m['retention_nll']:.4f} | "
                     f"{m['retention_nll'] - base:+.4f} | {m['mmlu_stem_acc']:.3f} | "
                     f"{m['pld']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=96, help="GSM8K-train problems")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--answer-tokens", type=int, default=320)
    parser.add_argument("--gsm8k-test", type=int, default=100)
    parser.add_argument("--mmlu", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("outputs/replication"))
    args = parser.parse_args()
    sidecar_python = os.environ["TMS_SIDECAR_PYTHON"]
    out = args.out.resolve()
    started = time.perf_counter()

    tms_config = configure(out, args, sidecar_python)
    tms_run = Path(yaml.safe_load(tms_config.read_text())["output_dir"])
    seconds = {"tms_run": train(tms_config, out / "tms" / "train.log")}
    stages = json.loads((tms_run / "tms" / "stages.json").read_text())
    harvest_dir = Path(stages["harvest"]["output_dir"])
    it_config = iterative_config(out, tms_config, harvest_dir)
    seconds["iterative_run"] = train(it_config, out / "iterative" / "train.log")
    iterative_run = out / "iterative_sft_run"

    models = {"base": smollm2_dir(), "SFT (harvest)": harvest_dir, "TMS student": tms_run,
              "iterative SFT": iterative_run}
    eval_started = time.perf_counter()
    gsm8k = gsm8k_accuracies(models, args.gsm8k_test, 256, sidecar_python, out / "eval")
    heldout = next((tms_run / "tms" / "data").glob("heldout-*.scored.jsonl"))
    metrics = likelihood_metrics(models, heldout, args.mmlu, out / "eval")
    seconds["evaluation"] = time.perf_counter() - eval_started

    from tms_axolotl_plugin.report import write_report

    report = write_report([tms_run, iterative_run], RESULTS / "replication")
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "model": "SmolLM2-135M-Instruct fp32",
        "settings": {**vars(args), "out": str(args.out), "T": 4, "alpha": 0.25},
        "models": list(models), "gsm8k": gsm8k, "metrics": metrics,
        "training_curves": report, "seconds": {**seconds,
                                               "total": time.perf_counter() - started},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "replication.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / "replication.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
