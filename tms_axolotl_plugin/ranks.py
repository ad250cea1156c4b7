"""Coordinating the processes of a multi-process run through files, not collectives.

Harvest and regeneration can take hours. A rank waiting in a torch.distributed barrier for that
long hits the collective timeout, so ranks wait on marker files in the shared output_dir
instead: no timeout, and a failure on one rank is written down and re-raised on every other.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tms_axolotl_plugin.errors import TMSError

T = TypeVar("T")
POLL_SECONDS = 2.0

# Variables a launcher sets for its children; a nested launch must not inherit them.
DISTRIBUTED_ENV_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_", "FSDP_")
DISTRIBUTED_ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                        "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def clean_launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the launcher's rank variables."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in DISTRIBUTED_ENV_VARS and not key.startswith(DISTRIBUTED_ENV_PREFIXES)
    }
    env.update(extra or {})
    return env


def launch_id() -> str:
    """Same on every rank of one launch, different for the next launch (single node)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return run_id if run_id != "none" else str(os.getppid())


def _failure_file(directory: Path, name: str) -> Path:
    return directory / f"{name}.{launch_id()}.failed"


def record_failure(directory: Path, name: str, error: BaseException) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _failure_file(directory, name).write_text(f"{type(error).__name__}: {error}")


def wait_for(paths: list[Path], directory: Path, name: str,
             poll_seconds: float = POLL_SECONDS) -> None:
    """Block until every path exists; raise the same error as a rank that failed."""
    failure = _failure_file(directory, name)
    while True:
        if failure.exists():
            raise TMSError(f"another rank failed in stage '{name}': {failure.read_text()}")
        if all(path.exists() for path in paths):
            return
        time.sleep(poll_seconds)


def main_does_then_all_wait(directory: Path, name: str, work: Callable[[], T],
                            done: Path) -> T | None:
    """Rank 0 runs `work` and touches `done`; other ranks wait for `done` (or the failure).

    `done` should name the stage's inputs (a fingerprint), so a marker from an earlier run
    with other inputs never releases the waiting ranks early.
    """
    if rank() == 0:
        _failure_file(directory, name).unlink(missing_ok=True)
        try:
            result = work()
        except BaseException as error:
            record_failure(directory, name, error)
            raise
        done.parent.mkdir(parents=True, exist_ok=True)
        done.touch()
        return result
    wait_for([done], directory, name)
    return None
