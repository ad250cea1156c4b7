"""Checkpoints on disk and the T evenly spaced harvest steps (checkpoints.py)."""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import pytest

from tms_axolotl_plugin.checkpoints import (
    Checkpoint,
    harvest_steps,
    has_weights,
    list_checkpoints,
    select_evenly_spaced,
)


def half_up(value: Fraction) -> int:
    return int(value + Fraction(1, 2))  # exact: floor(x + 1/2) for x >= 0


@pytest.mark.parametrize(
    "steps,num_checkpoints,expected",
    [
        (10, 10, list(range(1, 11))),
        (100, 10, list(range(10, 101, 10))),
        (5, 2, [3, 5]),  # 2.5 rounds up (Python's round() would give 2)
        (15, 10, [2, 3, 5, 6, 8, 9, 11, 12, 14, 15]),  # every .5 rounds up
        (7, 3, [2, 5, 7]),
        (1, 1, [1]),
        (13, 1, [13]),
    ],
)
def test_harvest_steps_are_round_half_up_of_t_times_S_over_T(steps, num_checkpoints, expected):
    assert harvest_steps(steps, num_checkpoints) == expected


def test_harvest_steps_match_exact_half_up_rounding_and_end_at_the_last_step():
    for steps in range(1, 120):
        for num_checkpoints in range(1, min(steps, 25) + 1):
            got = harvest_steps(steps, num_checkpoints)
            want = [half_up(Fraction(t * steps, num_checkpoints))
                    for t in range(1, num_checkpoints + 1)]
            assert got == want, (steps, num_checkpoints)
            assert got[-1] == steps
            assert len(set(got)) == num_checkpoints and got == sorted(got), "T distinct steps"
            assert got[0] >= 1


def test_harvest_steps_fail_when_the_run_is_shorter_than_T():
    with pytest.raises(ValueError, match=r"only 9 optimizer steps.*num_checkpoints=10"):
        harvest_steps(9, 10)


def _fake_list(n: int) -> list[Checkpoint]:
    return [Checkpoint(step, Path(f"checkpoint-{step}")) for step in range(5, 5 * n + 1, 5)]


@pytest.mark.parametrize(
    "n,num_checkpoints,expected_steps",
    [
        (10, 5, [10, 20, 30, 40, 50]),
        (10, 10, [5 * i for i in range(1, 11)]),
        (10, 1, [50]),
        (7, 3, [10, 25, 35]),  # indices round(t*7/3) - 1 = 1, 4, 6
        (4, 3, [5, 15, 20]),
    ],
)
def test_select_evenly_spaced_picks_T_including_the_last(n, num_checkpoints, expected_steps):
    picked = select_evenly_spaced(_fake_list(n), num_checkpoints)
    assert [c.step for c in picked] == expected_steps


def test_select_evenly_spaced_gives_T_distinct_checkpoints_for_every_pool_size():
    for n in range(1, 40):
        pool = _fake_list(n)
        for num_checkpoints in range(1, n + 1):
            picked = select_evenly_spaced(pool, num_checkpoints)
            assert len(picked) == num_checkpoints
            assert len(set(picked)) == num_checkpoints
            assert picked[-1] == pool[-1]
            assert [c.step for c in picked] == sorted(c.step for c in picked)


def test_select_evenly_spaced_fails_when_too_few_checkpoints_exist():
    with pytest.raises(ValueError, match=r"found 3 checkpoints but tms.num_checkpoints=4"):
        select_evenly_spaced(_fake_list(3), 4)


# ---- real checkpoint folders ---------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_model_dir):
    """The tiny model saved in the three layouts a run can leave: single file, sharded, LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("layouts")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.save_pretrained(root / "sharded", max_shard_size="5MB")
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(root / "lora")
    return {"single": Path(tiny_model_dir), "sharded": root / "sharded", "lora": root / "lora"}


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".complete"))
    return target


def test_saved_layouts_hold_the_files_that_count_as_weights(saved_model):
    assert (saved_model["single"] / "model.safetensors").exists()
    assert (saved_model["sharded"] / "model.safetensors.index.json").exists()
    assert (saved_model["lora"] / "adapter_model.safetensors").exists()
    for path in saved_model.values():
        assert has_weights(path)


def test_list_checkpoints_sorts_by_step_numerically_and_skips_folders_without_weights(
    tmp_path, saved_model
):
    run = tmp_path / "run"
    run.mkdir()
    for step in (10, 9, 100, 2):
        _copy(saved_model["single"], run / f"checkpoint-{step}")
    _copy(saved_model["sharded"], run / "checkpoint-11")
    (run / "checkpoint-5").mkdir()  # no weights: a save interrupted before writing them
    (run / "checkpoint-5" / "config.json").write_text("{}")
    (run / "checkpoint-6").mkdir()
    (run / "checkpoint-6" / "trainer_state.json").write_text("{}")
    _copy(saved_model["single"], run / "checkpoint-final")  # not a checkpoint-<step> name
    _copy(saved_model["single"], run / "checkpoint-3.tmp")
    (run / "checkpoint-7").write_text("a file, not a folder")

    found = list_checkpoints(run)
    assert [c.step for c in found] == [2, 9, 10, 11, 100]
    assert [c.path for c in found] == [run / f"checkpoint-{s}" for s in (2, 9, 10, 11, 100)]
    assert not any(c.is_adapter for c in found)


def test_list_checkpoints_finds_lora_adapter_checkpoints(tmp_path, saved_model):
    run = tmp_path / "run"
    run.mkdir()
    _copy(saved_model["lora"], run / "checkpoint-4")
    _copy(saved_model["lora"], run / "checkpoint-12")
    found = list_checkpoints(run)
    assert [c.step for c in found] == [4, 12]
    assert all(c.is_adapter for c in found)


def test_list_checkpoints_of_a_missing_or_empty_run_is_empty(tmp_path):
    assert list_checkpoints(tmp_path / "missing") == []
    assert list_checkpoints(tmp_path) == []


def test_found_checkpoints_load_as_models(tmp_path, saved_model):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    run.mkdir()
    _copy(saved_model["single"], run / "checkpoint-3")
    _copy(saved_model["sharded"], run / "checkpoint-6")
    picked = select_evenly_spaced(list_checkpoints(run), 2)
    for checkpoint in picked:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint.path))
        assert model.config.num_hidden_layers == 2
