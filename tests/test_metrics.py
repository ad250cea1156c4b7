"""PLD, PLD drift and the retention probe in real `axolotl train` runs, and `tms report`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_ok, base_config, read_jsonl, run_axolotl_train, write_config
from tms_axolotl_plugin.offline_assets import mmlu_stem_jsonl
from tms_axolotl_plugin.pld import DriftTracker
from transformers import TrainerState

HELDOUT = 8
MC_QUESTIONS = 6


def test_pld_drift_is_value_minus_running_minimum():
    tracker = DriftTracker()
    series = [3.0, 2.5, 2.7, 2.2, 2.4, 3.1]
    assert [tracker.update(v) for v in series] == pytest.approx([0, 0, 0.2, 0, 0.2, 0.9])


@pytest.fixture(scope="module")
def metrics_run(tmp_path_factory, tiny_model_dir, short_answer_data):
    workdir = tmp_path_factory.mktemp("tms_metrics")
    questions = mmlu_stem_jsonl().read_text().splitlines()[:MC_QUESTIONS + 4]
    (workdir / "mc.jsonl").write_text("\n".join(questions) + "\n")
    cfg = base_config(
        tiny_model_dir, short_answer_data, workdir / "out",
        sequence_len=256, micro_batch_size=1, num_epochs=2, learning_rate=6e-3,
        use_tensorboard=True, save_strategy="epoch",
        plugins=["tms_axolotl_plugin.TMSPlugin"],
        tms={"num_checkpoints": 2, "seed": 5,
             "pld": {"heldout_size": HELDOUT, "eval_steps": 1, "max_overhead": 0},
             "retention": {"max_prompts": 8, "max_new_tokens": 16,
                           "mc_path": str(workdir / "mc.jsonl"),
                           "mc_max_questions": MC_QUESTIONS},
             "generation": {"max_new_tokens": 12, "batch_size": 8}},
    )
    cfg.pop("max_steps")
    config = write_config(workdir / "cfg.yml", cfg)
    first = run_axolotl_train(config, timeout=1200)
    assert_ok(first)
    second = run_axolotl_train(config, timeout=600)
    assert_ok(second)
    return workdir, first.stdout, second.stdout


def stages(workdir: Path) -> dict:
    return json.loads((workdir / "out" / "tms" / "stages.json").read_text())


def harvest_metrics(workdir: Path) -> list[dict]:
    return read_jsonl(Path(stages(workdir)["harvest"]["output_dir"]) / "tms_metrics.jsonl")


def student_metrics(workdir: Path) -> list[dict]:
    fp = stages(workdir)["student"]["fingerprint"]
    return read_jsonl(workdir / "out" / "tms" / "student" / f"metrics-{fp}.jsonl")


def independent_label_nll(model_dir: Path, rows: list[dict]) -> float:
    """Held-out label NLL with plain transformers, one example at a time (no padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        answer = tokenizer(row["messages"][-1]["content"] + "<|im_end|>",
                           add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(answer),
                                                   reduction="sum").item()
        count += len(answer)
    return total / count


def test_pld_matches_an_independent_recomputation_on_a_checkpoint(metrics_run):
    workdir, _, _ = metrics_run
    harvest = stages(workdir)["harvest"]
    step = harvest["steps"][0]
    logged = {row["step"]: row for row in harvest_metrics(workdir)}
    heldout_file = next((workdir / "out" / "tms" / "data").glob("heldout-*-0.jsonl"))
    rows = read_jsonl(heldout_file)
    assert len(rows) == HELDOUT
    checkpoint = Path(harvest["output_dir"]) / "tms_checkpoints" / f"checkpoint-{step}"
    expected = independent_label_nll(checkpoint, rows)
    # Same weights, same tokens; only batching/padding differ: agree to 1e-4 relative.
    assert logged[step]["tms/pld"] == pytest.approx(expected, rel=1e-4)


def test_metrics_are_logged_in_both_stages_at_the_cadence(metrics_run):
    workdir, first, _ = metrics_run
    for rows in (harvest_metrics(workdir), student_metrics(workdir)):
        steps = [row["step"] for row in rows]
        assert steps[0] == 0 and steps == sorted(set(steps))  # baseline, then every step
        assert steps == list(range(0, steps[-1] + 1))
        lowest = math.inf
        for row in rows:
            lowest = min(lowest, row["tms/pld"])
            assert row["tms/pld_drift"] == pytest.approx(row["tms/pld"] - lowest)
            assert row["tms/retention_nll"] > 0
            assert row["tms/retention_mc_acc"] * MC_QUESTIONS in range(MC_QUESTIONS + 1)
    assert "tms metrics (harvest):" in first and "tms metrics (student):" in first


def test_student_step0_reuses_the_harvest_baseline_which_is_the_base_models_value(
        metrics_run, tiny_model_dir):
    workdir, _, _ = metrics_run
    harvest0, student0 = harvest_metrics(workdir)[0], student_metrics(workdir)[0]
    assert student0["step"] == 0 and student0["reused_from"].endswith("tms_metrics.jsonl")
    assert "reused_from" not in harvest0
    for key in ("tms/pld", "tms/retention_nll", "tms/retention_mc_acc"):
        assert student0[key] == harvest0[key]
    heldout_file = next((workdir / "out" / "tms" / "data").glob("heldout-*-0.jsonl"))
    base_nll = independent_label_nll(tiny_model_dir, read_jsonl(heldout_file))
    assert student0["tms/pld"] == pytest.approx(base_nll, rel=1e-4)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tms_axolotl_plugin.evaluation import load_multiple_choice, multiple_choice_accuracy

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    items = load_multiple_choice(workdir / "mc.jsonl", MC_QUESTIONS)
    assert student0["tms/retention_mc_acc"] == multiple_choice_accuracy(
        base, AutoTokenizer.from_pretrained(tiny_model_dir), items)


def test_metrics_reach_trainer_log_history_and_tensorboard(metrics_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _, _ = metrics_run
    for run_dir in (Path(stages(workdir)["harvest"]["output_dir"]), workdir / "out"):
        state_files = sorted(run_dir.glob("checkpoint-*/trainer_state.json"))
        assert state_files, f"no trainer_state.json under {run_dir}"
        history = json.loads(state_files[-1].read_text())["log_history"]
        assert any("tms/pld" in entry and "tms/retention_nll" in entry for entry in history)
        events = list(run_dir.glob("runs/**/events.out.tfevents.*"))
        assert events, f"no TensorBoard events under {run_dir}"
        tags = set()
        for event_file in events:
            accumulator = EventAccumulator(str(event_file))
            accumulator.Reload()
            tags |= set(accumulator.Tags()["scalars"])
        assert {"train/tms/pld", "train/tms/pld_drift", "train/tms/retention_nll"} <= tags or {
            "tms/pld", "tms/pld_drift", "tms/retention_nll"} <= tags, sorted(tags)


def test_retention_reference_answers_are_generated_once_and_cached(metrics_run):
    workdir, first, second = metrics_run
    assert "tms retention: generated 8 base-model answers" in first
    assert "tms retention: using 8 cached base-model answers" in second
    assert "tms retention: generated" not in second
    cached = list((workdir / "out" / "tms" / "retention").glob("base-answers-*.jsonl"))
    assert len(cached) == 1 and len(read_jsonl(cached[0])) == 8


def test_tms_report_writes_plots_and_a_summary_with_correlations(metrics_run, tmp_path):
    workdir, _, _ = metrics_run
    proc = subprocess.run([sys.executable, "-m", "tms_axolotl_plugin", "report",
                           str(workdir / "out"), "--out", str(tmp_path / "report")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("pld.png", "retention.png", "drift_vs_retention.png", "retention_mc_acc.png"):
        image = tmp_path / "report" / name
        assert image.stat().st_size > 5000 and image.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    correlation = summary["drift_vs_retention"]
    assert correlation["points"] >= 10
    assert -1 <= correlation["pearson"] <= 1 and -1 <= correlation["spearman"] <= 1
    run = summary["runs"][0]
    assert run["harvest"]["pld_first"] > 0 and run["student"]["pld_first"] > 0
    assert "Pearson r" in (tmp_path / "report" / "summary.md").read_text()


def test_report_on_a_folder_without_metrics_fails_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tms_axolotl_plugin", "report", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "is not a TMS run folder" in proc.stderr


def test_scheduled_measurements_stay_within_the_overhead_budget(tmp_path):
    """A scheduled measurement runs only if it and the final one still fit the budget."""
    import time as clock

    from tms_axolotl_plugin.metrics import TMSMetricsCallback

    callback = TMSMetricsCallback(None, "student", tmp_path / "m.jsonl", None, None, every=1,
                                  max_overhead=0.03)
    callback._train_started = clock.perf_counter() - 100.0  # 100 s since training began
    callback.seconds, callback.measurements = 0.9, 1  # one 0.9 s measurement so far
    assert callback._within_budget()  # 0.9 + 2 * 0.9 <= 0.03 * 99.1
    callback.seconds, callback.measurements = 1.0, 2  # two cheaper ones, same total
    assert callback._within_budget()  # 1 + 2 * 0.5 <= 0.03 * 99
    callback.seconds, callback.measurements = 1.0, 1
    assert not callback._within_budget()  # 1 + 2 * 1 > 0.03 * 99
    callback.max_overhead = 0
    assert callback._within_budget()  # no limit


def test_budget_uses_the_reused_step0_cost_before_the_run_has_measured(tmp_path):
    import time as clock

    from tms_axolotl_plugin.metrics import TMSMetricsCallback

    harvest = tmp_path / "harvest.jsonl"
    harvest.write_text(json.dumps({"step": 0, "seconds": 2.0, "inputs": "k", "tms/pld": 1.5,
                                   "tms/pld_drift": 0.0}) + "\n")

    class LogRecorder:  # the two Trainer methods the callback calls when it records
        def __init__(self):
            self.logged: list[dict] = []

        def log(self, logs):
            self.logged.append(logs)

        def is_world_process_zero(self):
            return True

    trainer = LogRecorder()
    callback = TMSMetricsCallback(trainer, "student", tmp_path / "m.jsonl",
                                  [object()], None, every=1, max_overhead=0.03,
                                  inputs_key="k", step0_from=harvest)
    callback.on_train_begin(None, TrainerState(max_steps=100), None)
    assert trainer.logged == [{"tms/pld": 1.5, "tms/pld_drift": 0.0}]
    assert callback.measurements == 0 and callback.cost_estimate == 2.0
    callback._train_started = clock.perf_counter() - 100.0
    assert not callback._within_budget()  # 0 + 2 * 2.0 > 0.03 * 100
    callback._train_started = clock.perf_counter() - 200.0
    assert callback._within_budget()  # 0 + 2 * 2.0 <= 0.03 * 200


@pytest.mark.parametrize("every, max_steps, expected", [
    (None, 40, 4), (None, 3, 1), (5, 40, 5), (0.25, 40, 10), (0.01, 40, 1)])
def test_cadence_default_count_and_fraction_of_the_run(every, max_steps, expected):
    from tms_axolotl_plugin.metrics import cadence

    assert cadence(every, max_steps) == expected
