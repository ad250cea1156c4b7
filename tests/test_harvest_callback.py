"""HarvestCheckpointCallback: T checkpoints even when the trainer's planned step count was high.

Axolotl plans `max_steps` from an estimate of the packed dataloader length, and a run can end a
step or two before it (seen in CI: 32 planned, 30 run). The callback must still leave T.
"""

from pathlib import Path

from transformers import TrainerControl, TrainerState, TrainingArguments

from tms_axolotl_plugin.harvest import HarvestCheckpointCallback


class RecordingTrainer:
    """Just the two Trainer methods the callback calls; save_model writes a stand-in weights
    file (or, `weights=False`, nothing a model loader would find)."""

    def __init__(self, weights: bool = True):
        self.saved: list[str] = []
        self.weights = weights

    def save_model(self, output_dir: str) -> None:
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / ("model.safetensors" if self.weights else "config.json")).write_text(
            "ok")
        self.saved.append(Path(output_dir).name)

    def is_world_process_zero(self) -> bool:
        return True


def run_steps(tmp_path, planned: int, actual: int, num_checkpoints: int,
              weights: bool = True) -> list[str]:
    trainer = RecordingTrainer(weights)
    callback = HarvestCheckpointCallback(trainer, num_checkpoints, tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[])
    state, control = TrainerState(max_steps=planned), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step in range(1, actual + 1):
        state.global_step = step
        callback.on_step_end(args, state, control)
    callback.on_train_end(args, state, control)
    return trainer.saved


def test_checkpoints_at_planned_steps_when_the_run_is_as_planned(tmp_path):
    assert run_steps(tmp_path, 32, 32, 4) == [
        "checkpoint-8", "checkpoint-16", "checkpoint-24", "checkpoint-32"]


def test_last_checkpoint_is_taken_where_a_shorter_run_ends(tmp_path):
    assert run_steps(tmp_path, 32, 30, 2) == ["checkpoint-16", "checkpoint-30"]


def test_a_longer_run_keeps_its_final_weights_as_the_last_checkpoint(tmp_path):
    assert run_steps(tmp_path, 10, 11, 2) == ["checkpoint-5", "checkpoint-11"]


def test_a_save_that_leaves_no_weights_stops_the_harvest_at_the_first_checkpoint(tmp_path):
    """What FSDP with a sharded state dict, or ZeRO-3 without the 16-bit gather, would leave:
    the run stops there, not after the whole SFT run with "left 0 of T checkpoints"."""
    import pytest

    from tms_axolotl_plugin.errors import TMSError

    with pytest.raises(TMSError, match="checkpoint-8 holds no model weights"):
        run_steps(tmp_path, 32, 32, 4, weights=False)
