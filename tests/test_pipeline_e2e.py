"""TMS end to end from real `axolotl train` subprocesses on CPU (tiny Llama unless stated).

One harvest run is shared (module fixture); the other tests copy its output folder, so they
start with the harvest finished, exactly as a user re-running a command would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
from scipy import stats

from conftest import REPO, assert_ok, base_config, read_jsonl, run_axolotl_train, write_config
from tms_axolotl_plugin.draws import draw_targets
from tms_axolotl_plugin.label_store import LabelStore

pytestmark = pytest.mark.slow

T = 3
ALPHA = 0.25
NUM_ROWS = 40
EPOCHS = 2


def tms_block(**overrides) -> dict:
    block = {
        "num_checkpoints": T,
        "alpha": ALPHA,
        "seed": 11,
        "pld": {"enabled": False},
        "retention": {"enabled": False},
        "generation": {"max_new_tokens": 12, "batch_size": 8},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            block[key] = {**block.get(key, {}), **value}
        else:
            block[key] = value
    return block


def make_config(workdir: Path, model_dir: Path, data: Path, tms: dict, **overrides) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = base_config(
        model_dir, data, workdir / "out",
        sequence_len=256, micro_batch_size=1, num_epochs=EPOCHS, learning_rate=6e-3,
        plugins=["tms_axolotl_plugin.TMSPlugin"], tms=tms,
    )
    cfg.pop("max_steps")
    cfg.update(overrides)
    return write_config(workdir / "cfg.yml", cfg)


def stages(workdir: Path) -> dict:
    return json.loads((workdir / "out" / "tms" / "stages.json").read_text())


def mixture_rows(workdir: Path, fingerprint: str | None = None) -> list[dict]:
    fingerprint = fingerprint or stages(workdir)["student"]["fingerprint"]
    return read_jsonl(workdir / "out" / "tms" / "student" / f"mixture-{fingerprint}-0.jsonl")


def store_records(workdir: Path) -> list[dict]:
    """Every stored answer of every label store of the run, each (prompt, checkpoint) once."""
    records = []
    for directory in (workdir / "out" / "tms" / "labels").iterdir():
        store = LabelStore(directory)
        records += [asdict(label) for batch in store.iter_labels() for label in batch]
        store.close()
    return records


def copy_run(source: Path, target: Path, *, keep=("data", "harvest-", "markers")) -> None:
    """Copy a finished run's data and harvest (not its labels or student) to a new workdir."""
    (target / "out" / "tms").mkdir(parents=True)
    for item in (source / "out" / "tms").iterdir():
        if item.name.startswith(keep) and item.is_dir():
            shutil.copytree(item, target / "out" / "tms" / item.name)
    harvest = stages(source)["harvest"]
    (target / "out" / "tms" / "stages.json").write_text(json.dumps({"harvest": harvest}))
    for marker in (target / "out" / "tms" / "markers").glob("*"):
        if not marker.name.startswith("harvest-"):
            marker.unlink()


def plant_plain_sft_checkpoint(output_dir: Path, model_dir: Path, step: int = 2) -> Path:
    """What a plain SFT run into the same output_dir leaves: a resumable checkpoint."""
    checkpoint = output_dir / f"checkpoint-{step}"
    shutil.copytree(model_dir, checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps(
        {"global_step": step, "max_steps": 100, "log_history": []}))
    return checkpoint


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, short_answer_data):
    workdir = tmp_path_factory.mktemp("tms_full")
    config = make_config(workdir, tiny_model_dir, short_answer_data, tms_block())
    plant_plain_sft_checkpoint(workdir / "out", tiny_model_dir)
    proc = run_axolotl_train(config, timeout=1200)
    assert_ok(proc)
    return workdir, proc.stdout


def test_full_pipeline_harvests_regenerates_and_trains_the_student(full_run, tiny_model_dir):
    workdir, output = full_run
    out = workdir / "out"
    # The plugin's hooks ran in both processes: registration, harvest callback, stages.
    assert "tms: plugin registered (stage: pipeline)" in output
    assert "tms: plugin registered (stage: harvest)" in output
    for stage in ("data:", "harvest:", "draws:", "regenerate:", "mixture:", "student:"):
        assert f"tms {stage}" in output

    # T weights-only checkpoints at round(t*S/T); the harvest run is a complete SFT run.
    harvest = stages(workdir)["harvest"]
    harvest_dir = Path(harvest["output_dir"])
    total = int(re.search(r"weights-only checkpoints at steps \[([\d, ]+)\]", output)
                .group(1).split(", ")[-1])
    assert harvest["steps"] == [int(t * total / T + 0.5) for t in range(1, T + 1)]
    for step in harvest["steps"]:
        ckpt = harvest_dir / "tms_checkpoints" / f"checkpoint-{step}"
        assert (ckpt / "model.safetensors").exists()
        assert not (ckpt / "optimizer.pt").exists()  # weights only
    assert (harvest_dir / "model.safetensors").exists()  # the SFT baseline stays on disk

    # The store holds exactly the drawn (example, checkpoint) pairs: no more, no fewer.
    rows = mixture_rows(workdir)
    assert len(rows) == (NUM_ROWS) * EPOCHS
    records = store_records(workdir)
    stored = Counter((r["prompt_key"], r["checkpoint"]) for r in records)
    assert max(stored.values()) == 1, "an item was generated twice"
    plan = draw_targets(NUM_ROWS, EPOCHS, T, ALPHA, 11)
    assert len(stored) == len(plan.needed_pairs())
    assert sorted(Counter(t for _, t in stored).items()) == sorted(
        Counter(t for _, t in plan.needed_pairs()).items())

    # Original labels at a rate consistent with alpha, checkpoints uniform.
    draws = [r["tms_draw"] for r in rows]
    kept = sum(d == 0 for d in draws)
    assert stats.binomtest(kept, len(draws), ALPHA).pvalue > 0.001
    by_checkpoint = Counter(d for d in draws if d)
    assert stats.chisquare([by_checkpoint[t] for t in range(1, T + 1)]).pvalue > 0.001

    # Rows trained on a regenerated answer carry that answer; fallbacks are counted.
    texts = {(r["prompt_key"], r["checkpoint"]): r for r in records}
    summary = json.loads(next((out / "tms" / "student").glob("*.stats.json")).read_text())
    regenerated = [r for r in rows if r["tms_target"]]
    assert len(regenerated) >= len(rows) // 4, "the tiny model should stop for most prompts"
    fallbacks = sum(1 for r in rows if r["tms_draw"] and not r["tms_target"])
    assert fallbacks == summary["fallback_empty"] + summary["fallback_truncated"]
    answers = {record["text"] for record in texts.values() if record["finish_reason"] == "stop"}
    for row in regenerated:
        assert row["messages"][-1]["content"] in answers

    # The plain SFT checkpoint left in output_dir was set aside, not resumed as the student.
    assert "tms student:   starting fresh; moved 1 checkpoint(s) it did not write (from: no " \
           "TMS student)" in output
    assert (out / "tms" / "set-aside" / "checkpoint-2" / "trainer_state.json").exists()
    assert not (out / "checkpoint-2").exists()
    assert "Resuming" not in output.split("tms student:")[-1]

    # The student trained through Axolotl's path and the final model exists.
    assert stages(workdir)["student"]["status"] == "done"
    assert stages(workdir)["student"]["schedule"] == "offline"
    assert (out / "model.safetensors").exists()


def test_student_rows_mask_the_prompt_and_train_the_regenerated_answer(full_run, tiny_model_dir):
    """Inspect the student's tokenized dataset as Axolotl prepared it for the trainer."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    workdir, _ = full_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = mixture_rows(workdir)
    expected_answers = Counter(r["messages"][-1]["content"] for r in rows)
    prepared = [p for p in (workdir / "out" / "prepared").iterdir() if p.is_dir()]
    trained_answers = Counter()
    for folder in prepared:
        dataset = load_from_disk(str(folder))
        if len(dataset) != len(rows):
            continue  # the harvest run's prepared data
        for sample in dataset:
            labels, ids = sample["labels"], sample["input_ids"]
            trained = [i for i, label in enumerate(labels) if label != -100]
            first = trained[0]
            prompt = tokenizer.decode(ids[:first])
            assert prompt.endswith("<|im_start|>assistant\n")
            assert all(labels[i] == ids[i] for i in trained)
            answer = tokenizer.decode([ids[i] for i in trained]).removesuffix("<|im_end|>")
            trained_answers[answer] += 1
    assert trained_answers == expected_answers


def test_second_identical_run_skips_every_stage(full_run):
    workdir, _ = full_run
    model = workdir / "out" / "model.safetensors"
    before = model.stat().st_mtime
    proc = run_axolotl_train(workdir / "cfg.yml", timeout=600)
    assert_ok(proc)
    assert "tms data:      reusing the tokenized table" in proc.stdout
    assert "tms data:      tokenized" not in proc.stdout
    assert "tms harvest:   skipped: finished earlier" in proc.stdout
    assert "tms regenerate: skipped" in proc.stdout
    assert "tms student:   skipped: finished earlier" in proc.stdout
    assert "stage: harvest" not in proc.stdout  # no harvest child process
    assert model.stat().st_mtime == before


def test_changing_alpha_redoes_only_draws_new_pairs_and_student(full_run, tmp_path,
                                                                tiny_model_dir, short_answer_data):
    source, _ = full_run
    copy_run(source, tmp_path)
    # The copied run regenerates nothing it already stored: copy the store too.
    shutil.copytree(source / "out" / "tms" / "labels", tmp_path / "out" / "tms" / "labels")
    for done in (tmp_path / "out" / "tms" / "labels").glob("*/done-*"):
        done.unlink()
    config = make_config(tmp_path, tiny_model_dir, short_answer_data, tms_block(alpha=0.6))
    proc = run_axolotl_train(config, timeout=900)
    assert_ok(proc)
    assert "tms harvest:   skipped: finished earlier" in proc.stdout
    old = set(draw_targets(NUM_ROWS, EPOCHS, T, ALPHA, 11).needed_pairs())
    new = set(draw_targets(NUM_ROWS, EPOCHS, T, 0.6, 11).needed_pairs())
    assert new <= old  # a higher alpha only drops draws: nothing new to generate
    match = re.search(r"rank 0: (\d+) answers generated .* (\d+) already stored", proc.stdout)
    assert match and int(match.group(1)) == 0 and int(match.group(2)) == len(new)
    assert stages(tmp_path)["student"]["status"] == "done"
    assert stages(tmp_path)["student"]["fingerprint"] != stages(source)["student"]["fingerprint"]


def test_harvest_trained_again_gets_new_answers_and_a_new_student(
        full_run, tmp_path, tiny_model_dir, short_answer_data):
    source, _ = full_run
    run_id = Path(stages(source)["harvest"]["output_dir"]) / "tms_run_id"
    assert re.fullmatch(r"[0-9a-f]{32}", run_id.read_text())
    copy_run(source, tmp_path)
    shutil.copytree(source / "out" / "tms" / "labels", tmp_path / "out" / "tms" / "labels")
    # What a harvest trained again (its folder deleted) leaves: the same fingerprint, a new
    # run id. Answers of the old weights must not be reused.
    copied = next((tmp_path / "out" / "tms").glob("harvest-*")) / "tms_run_id"
    copied.write_text("0" * 32)
    config = make_config(tmp_path, tiny_model_dir, short_answer_data, tms_block())
    proc = run_axolotl_train(config, timeout=900)
    assert_ok(proc)
    assert "tms harvest:   skipped: finished earlier" in proc.stdout
    needed = len(draw_targets(NUM_ROWS, EPOCHS, T, ALPHA, 11).needed_pairs())
    match = re.search(r"rank 0: (\d+) answers generated .* (\d+) already stored", proc.stdout)
    assert match and int(match.group(1)) == needed and int(match.group(2)) == 0
    assert stages(tmp_path)["student"]["fingerprint"] != stages(source)["student"]["fingerprint"]


def test_run_killed_during_regeneration_resumes_without_redoing_items(
        full_run, tmp_path, tiny_model_dir, short_answer_data):
    source, _ = full_run
    copy_run(source, tmp_path)
    # A new temperature means a new label store: generation starts from nothing.
    tms = tms_block(generation={"temperature": 0.8, "batch_size": 1})
    config = make_config(tmp_path, tiny_model_dir, short_answer_data, tms)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "axolotl.cli.train", str(config)],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    labels_dir = tmp_path / "out" / "tms" / "labels"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        shards = list(labels_dir.glob("*/labels-rank0.jsonl"))
        if shards and len(shards[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(read_jsonl(next(labels_dir.glob("*/labels-rank0.jsonl"))))
    needed = len(draw_targets(NUM_ROWS, EPOCHS, T, ALPHA, 11).needed_pairs())
    assert 3 <= done_before < needed, "the kill should land in the middle of regeneration"

    proc = run_axolotl_train(config, timeout=900)
    assert_ok(proc)
    match = re.search(r"rank 0: (\d+) answers generated .* (\d+) already stored", proc.stdout)
    assert match, proc.stdout[-3000:]
    generated, already = int(match.group(1)), int(match.group(2))
    assert already >= done_before and generated + already == needed
    stored = Counter((r["prompt_key"], r["checkpoint"]) for r in store_records(tmp_path))
    assert len(stored) == needed and max(stored.values()) == 1


def test_harvest_from_with_iterative_schedule(full_run, tmp_path, tiny_model_dir,
                                              short_answer_data):
    source, _ = full_run
    harvest_dir = Path(stages(source)["harvest"]["output_dir"]) / "tms_checkpoints"
    tms = tms_block(harvest_from=str(harvest_dir), schedule="iterative")
    config = make_config(tmp_path, tiny_model_dir, short_answer_data, tms)
    proc = run_axolotl_train(config, timeout=900)
    assert_ok(proc)
    assert "tms harvest:   skipped: taking 3 checkpoints from" in proc.stdout
    assert "stage: harvest" not in proc.stdout
    records = store_records(tmp_path)
    assert records and {r["checkpoint"] for r in records} == {T}
    assert {r["tms_draw"] for r in mixture_rows(tmp_path)} <= {0, T}
    assert (tmp_path / "out" / "model.safetensors").exists()


def first_logged_loss(output: str) -> float:
    return float(re.search(r"'loss': '([\d.]+)'", output).group(1))


def test_student_init_last_checkpoint_starts_from_the_harvested_model(
        full_run, tmp_path, tiny_model_dir, short_answer_data):
    source, source_output = full_run
    copy_run(source, tmp_path)
    config = make_config(tmp_path, tiny_model_dir, short_answer_data,
                         tms_block(student_init="last_checkpoint"))
    proc = run_axolotl_train(config, timeout=900)
    assert_ok(proc)
    assert "init last_checkpoint" in proc.stdout
    # A student that starts from the trained checkpoint starts with a far lower loss than
    # the base model did at the start of the harvest run.
    harvest_log = (Path(stages(source)["harvest"]["output_dir"]) / "harvest.log").read_text()
    assert first_logged_loss(proc.stdout.split("tms student:")[-1]) < 0.5 * first_logged_loss(
        harvest_log)


def test_two_process_run_gives_the_same_student_mixture(full_run, tmp_path, tiny_model_dir,
                                                        short_answer_data):
    source, _ = full_run
    # The number of processes decides the harvest (effective batch), so a two-process run
    # would train its own; it takes the one-process harvest's checkpoints instead, so that
    # regeneration and the mixture on two ranks can be compared with the one-process run.
    harvest = Path(stages(source)["harvest"]["output_dir"]) / "tms_checkpoints"
    config = make_config(tmp_path, tiny_model_dir, short_answer_data,
                         tms_block(harvest_from=str(harvest)))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "-m", "axolotl.cli.train"]
    proc = run_axolotl_train(config, timeout=1200, launcher=launcher)
    assert_ok(proc)
    # Rank 0 tokenized the rows once; rank 1 read its table.
    assert proc.stdout.count("tms data:      tokenized") == 1
    assert proc.stdout.count("rank 1 reads the table tokenized by rank 0") == 1
    # Generation was split between the ranks, not duplicated.
    counts = [int(n) for n in re.findall(r"rank \d: (\d+) answers generated", proc.stdout)]
    assert len(counts) == 2 and all(counts)
    stored = Counter((r["prompt_key"], r["checkpoint"]) for r in store_records(tmp_path))
    assert max(stored.values()) == 1 and sum(counts) == len(stored)
    # Same draws, same answers: the same rows as the one-process run, in the same order; the
    # student itself is another one (trained on two processes).
    assert stages(tmp_path)["student"]["fingerprint"] != stages(source)["student"]["fingerprint"]
    assert mixture_rows(tmp_path) == mixture_rows(source)
    assert stages(tmp_path)["student"]["status"] == "done"


def test_deleted_harvest_is_trained_again_without_any_hub_call(full_run, tmp_path,
                                                               tiny_model_dir,
                                                               short_answer_data):
    """A finished harvest whose folder is gone (its marker survives) is trained again, not
    skipped; `hub_model_id` and the sidecar key never reach the harvest run, which finishes
    with the Hub offline."""
    source, _ = full_run
    copy_run(source, tmp_path)
    harvest_dir = next((tmp_path / "out" / "tms").glob("harvest-*"))
    shutil.rmtree(harvest_dir)
    assert list((tmp_path / "out" / "tms" / "markers").glob("harvest-*.done"))
    tms = tms_block(sidecar={"api_key": "never-written-key"})
    config = make_config(tmp_path, tiny_model_dir, short_answer_data, tms,
                         hub_model_id="someone/tms-student", hub_strategy="every_save")
    proc = run_axolotl_train(config, timeout=1200, env={"HF_HUB_OFFLINE": "1"})
    assert "holds 0 of 3 checkpoints now; training the harvest again" in proc.stdout
    assert "tms harvest:   done: 3 checkpoints" in proc.stdout, proc.stdout[-4000:]
    harvest_config = harvest_dir / "harvest_config.yml"
    text = harvest_config.read_text()
    assert "hub_" not in text and "never-written-key" not in text
    assert harvest_config.stat().st_mode & 0o777 == 0o600
    harvest_log = (harvest_dir / "harvest.log").read_text()
    assert "someone/tms-student" not in harvest_log and "OfflineModeIsEnabled" not in harvest_log
    assert len(list((harvest_dir / "tms_checkpoints").glob("checkpoint-*"))) == T
    # The same settings do reach the student: Axolotl's trainer tries to create its repo, which
    # fails offline (the student's push is Axolotl's behaviour, not the plugin's).
    assert "OfflineModeIsEnabled" in proc.stdout.split("tms student:")[-1]
