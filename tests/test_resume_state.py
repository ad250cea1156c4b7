"""State a rerun reads: durable files, the student's own checkpoints, markers of other launches."""

from __future__ import annotations

import os
import stat

import pytest

from tms_axolotl_plugin import ranks
from tms_axolotl_plugin.files import write_jsonl_atomic, write_text_atomic
from tms_axolotl_plugin.student import OWNER_FILE, set_aside_foreign_checkpoints


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "stages.json"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert write_jsonl_atomic(tmp_path / "rows.jsonl", iter([{"a": 1}, {"a": 2}])) == 2
    assert (tmp_path / "rows.jsonl").read_text() == '{"a": 1}\n{"a": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "stages.json"]


def test_atomic_write_with_a_private_mode_is_never_wider(tmp_path):
    old = os.umask(0)  # the widest umask: the mode alone decides
    try:
        write_text_atomic(tmp_path / "harvest_config.yml", "key: value\n", mode=0o600)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "harvest_config.yml").stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "data.jsonl"
    write_text_atomic(path, "complete\n")

    def rows():
        yield {"a": 1}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, rows())
    assert path.read_text() == "complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def checkpoint(root, step, owner=None):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    if owner:
        (folder / OWNER_FILE).write_text(owner)
    return folder


def test_student_keeps_its_own_checkpoints_and_sets_aside_all_others(tmp_path):
    out = tmp_path / "out"
    checkpoint(out, 4, owner="fp-now")
    checkpoint(out, 8, owner="fp-now")
    checkpoint(out, 6, owner="fp-old")  # a student of other settings
    checkpoint(out, 100)  # a plain SFT run into the same folder
    message = set_aside_foreign_checkpoints(out, "fp-now", out / "tms")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    kept = out / "tms" / "set-aside"
    assert sorted(p.name for p in kept.iterdir()) == ["checkpoint-100", "checkpoint-6"]
    assert message.startswith("resuming from its own checkpoints; moved 2 checkpoint(s)")
    assert "fp-old" in message and "no TMS student" in message
    # Set aside again later under the same name: nothing is overwritten.
    checkpoint(out, 100)
    set_aside_foreign_checkpoints(out, "fp-now", out / "tms")
    assert sorted(p.name for p in kept.iterdir()) == ["checkpoint-100", "checkpoint-100.1",
                                                      "checkpoint-6"]


def test_student_without_checkpoints_starts_fresh(tmp_path):
    assert set_aside_foreign_checkpoints(tmp_path, "fp", tmp_path / "tms") == \
        "starting fresh (no checkpoints in output_dir)"


def test_markers_of_other_launches_are_removed_and_this_launch_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(ranks, "_launch_id", "now")
    for name in ("harvest.old.failed", "retention.old.ready", "harvest.now.failed",
                 "student-start.now.ready", "harvest-abc.done"):
        (tmp_path / name).touch()
    ranks.forget_other_launches(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "harvest-abc.done", "harvest.now.failed", "student-start.now.ready"]
