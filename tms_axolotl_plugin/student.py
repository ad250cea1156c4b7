"""The student's checkpoints: resumed only when this student wrote them.

The student run resumes from `checkpoint-*` folders in `output_dir` (Axolotl's auto-resume).
A folder there may come from anything: a plain SFT run into the same directory, a student of
other data or settings. `StudentCheckpointOwnerCallback` writes the student fingerprint into
every checkpoint the student saves; before the student starts, every `checkpoint-*` without
this student's fingerprint is moved aside (never deleted), so it can be neither resumed nor lost.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import TrainerCallback

from tms_axolotl_plugin.logs import get_logger

LOG = get_logger(__name__)
OWNER_FILE = "tms_student_fingerprint"
FINGERPRINT_ENV = "TMS_STUDENT_FINGERPRINT"  # set by the pipeline for the student run


def checkpoint_owner(checkpoint: Path) -> str | None:
    owner = checkpoint / OWNER_FILE
    return owner.read_text().strip() if owner.exists() else None


def set_aside_foreign_checkpoints(output_dir: Path, student_fp: str, keep_root: Path) -> str:
    """Move every `checkpoint-*` of `output_dir` not written by student `student_fp` under
    `keep_root`; returns what was done, for the log."""
    checkpoints = sorted(p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir())
    foreign = [p for p in checkpoints if checkpoint_owner(p) != student_fp]
    if not foreign:
        ours = len(checkpoints)
        return (f"resuming from its own checkpoints ({ours} found)" if ours
                else "starting fresh (no checkpoints in output_dir)")
    keep = keep_root / "set-aside"
    keep.mkdir(parents=True, exist_ok=True)
    for path in foreign:
        target = keep / path.name
        suffix = 1
        while target.exists():
            target, suffix = keep / f"{path.name}.{suffix}", suffix + 1
        shutil.move(str(path), target)
    owners = sorted({checkpoint_owner(keep / p.name) or "no TMS student" for p in foreign})
    start = "resuming from its own checkpoints" if len(foreign) < len(checkpoints) \
        else "starting fresh"
    return (f"{start}; moved {len(foreign)} checkpoint(s) it did not write (from: "
            f"{', '.join(owners)}) to {keep}")


class StudentCheckpointOwnerCallback(TrainerCallback):
    """Marks each checkpoint the student saves as this student's."""

    def __init__(self, student_fp: str):
        self.student_fp = student_fp

    @classmethod
    def from_env(cls) -> StudentCheckpointOwnerCallback | None:
        fp = os.environ.get(FINGERPRINT_ENV)
        return cls(fp) if fp else None

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / OWNER_FILE).write_text(self.student_fp)
