"""The student is recorded as done only when Axolotl's training returned and nothing failed.

Axolotl 0.21 calls `post_train_unload` from a `finally:` block, so it also runs after a crash
or Ctrl-C; `post_train` runs only once `trainer.train()` has returned.
"""

import pytest
from axolotl.utils.dict import DictDefault

from tms_axolotl_plugin.pipeline import StagePaths, read_stages, record_stage
from tms_axolotl_plugin.plugin import TMSPlugin


@pytest.fixture
def student_running(tmp_path):
    paths = StagePaths(tmp_path / "tms")
    paths.root.mkdir()
    record_stage(paths, "student", fingerprint="abc", status="running", schedule="iterative")
    return DictDefault({"output_dir": str(tmp_path), "tms": {"num_checkpoints": 2}}), paths


def status(paths) -> str:
    return read_stages(paths)["student"]["status"]


def test_finished_training_marks_the_student_done(student_running):
    cfg, paths = student_running
    plugin = TMSPlugin()
    plugin.post_train(cfg, model=None)
    plugin.post_train_unload(cfg)
    assert status(paths) == "done"
    assert read_stages(paths)["student"]["schedule"] == "iterative"  # kept for `tms report`


def test_training_that_never_returned_is_not_done(student_running):
    cfg, paths = student_running
    TMSPlugin().post_train_unload(cfg)
    assert status(paths) == "running"


def test_failure_after_training_is_not_done(student_running):
    cfg, paths = student_running
    plugin = TMSPlugin()
    plugin.post_train(cfg, model=None)
    with pytest.raises(KeyboardInterrupt):
        try:
            raise KeyboardInterrupt  # e.g. Ctrl-C while the final model is saved
        finally:
            plugin.post_train_unload(cfg)
    assert status(paths) == "running"
