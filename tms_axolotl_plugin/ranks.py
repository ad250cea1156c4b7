"""Coordinating the processes of a multi-process run through files, not collectives.

Harvest and regeneration can take hours. A rank waiting in a torch.distributed barrier for that
long hits the collective timeout, so ranks wait on marker files in the shared output_dir
instead: no timeout, and a failure on one rank is written down and re-raised on every other.

Every failure and release marker carries the launch identity: a random id that rank 0 draws at
the start of each launch and hands to the other ranks (through the process group, or before
there is one through the torchrun agent's store). It is the same on
every rank of a launch and new for every launch (container restarts where the launcher is pid
1, torchrun restarts, a requeued job with a fixed rendezvous id), so no rank ever acts on a
marker an earlier launch left behind.
"""

from __future__ import annotations

import os
import time
import uuid
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

_launch_id: str | None = None
# Called on every poll of a wait; raise to stop waiting (`nodes.NodeWatch.check`: a dead node).
_wait_checks: list[Callable[[], None]] = []


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


def _process_group_ready() -> bool:
    """Whether Axolotl (when this runs inside it) has, or now creates, a process group."""
    import torch.distributed as dist

    try:
        from axolotl.utils.distributed import is_distributed
    except ImportError:
        return False
    return is_distributed() and dist.is_initialized()


def _share_through_agent_store(drawn: str) -> str | None:
    """Share rank 0's id through the store of torchrun's elastic agent (also behind
    `accelerate launch`), which exists before any process group and is new for every launch
    and restart. None when the launcher has no such store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or \
            not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        return None
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                     world_size(), is_master=False, timeout=timedelta(minutes=30))
    key = f"tms_launch_id/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if rank() == 0:
        store.set(key, drawn)
    return store.get(key).decode()  # waits until rank 0 has set it


def agree_on_launch_id() -> str:
    """Draw this launch's id on rank 0 and give it to every rank. A collective: every rank of
    the launch calls it once, at the same point (the start of the pipeline)."""
    global _launch_id
    drawn = uuid.uuid4().hex
    if world_size() > 1:
        import torch.distributed as dist

        group = dist.is_available() and dist.is_initialized()
        shared = None if group else _share_through_agent_store(drawn)
        if shared is None:
            if not (group or _process_group_ready()):
                raise TMSError(
                    f"this run has WORLD_SIZE={world_size()} but neither a torch.distributed "
                    "process group nor a torchrun agent store, so its ranks cannot agree on a "
                    "launch identity; start it with `axolotl train`, `accelerate launch` or "
                    "`torchrun`")
            box = [drawn]
            dist.broadcast_object_list(box, src=0)
            shared = box[0]
        drawn = shared
    _launch_id = drawn
    return drawn


def launch_id() -> str:
    """This launch's id (see `agree_on_launch_id`); a single process draws its own."""
    if _launch_id is None:
        if world_size() > 1:
            raise TMSError("ranks.agree_on_launch_id() must run on every rank first")
        return agree_on_launch_id()
    return _launch_id


def _failure_file(directory: Path, name: str) -> Path:
    return launch_file(directory, name, "failed")


def _release_file(directory: Path, name: str) -> Path:
    return launch_file(directory, name, "ready")


# Suffixes of the files that belong to one launch: `<name>.<launch id>.<suffix>`.
LAUNCH_FILE_SUFFIXES = ("failed", "ready", "probe", "heartbeat", "rendezvous", "exited")


def forget_other_launches(directory: Path) -> None:
    """Rank 0: remove markers of earlier launches (nobody reads them; they only pile up)."""
    current = launch_id()
    for suffix in LAUNCH_FILE_SUFFIXES:
        for path in list(directory.glob(f"*.{suffix}")):
            if path.name.rsplit(".", 2)[-2] != current:
                path.unlink(missing_ok=True)


def launch_file(directory: Path, name: str, suffix: str) -> Path:
    """`directory/<name>.<launch id>.<suffix>`: a file of this launch only."""
    assert suffix in LAUNCH_FILE_SUFFIXES, suffix
    return directory / f"{name}.{launch_id()}.{suffix}"


def raise_if_failed(directory: Path, name: str) -> None:
    failure = _failure_file(directory, name)
    if failure.exists():
        raise TMSError(f"another rank failed in stage '{name}': {failure.read_text()}")


def released(directory: Path, name: str) -> bool:
    """Whether rank 0 has finished `main_does_then_all_wait(directory, name, ...)`."""
    return _release_file(directory, name).exists()


def record_failure(directory: Path, name: str, error: BaseException) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    _failure_file(directory, name).write_text(f"{type(error).__name__}: {error}")


def add_wait_check(check: Callable[[], None]) -> None:
    _wait_checks.append(check)


def run_wait_checks() -> None:
    for check in list(_wait_checks):
        check()


def wait_for(paths: list[Path], directory: Path, name: str,
             poll_seconds: float = POLL_SECONDS) -> None:
    """Block until every path exists; raise the same error as a rank of this launch that
    failed in stage `name`, or the error of a wait check (a node that died)."""
    while True:
        raise_if_failed(directory, name)
        if all(path.exists() for path in paths):
            return
        run_wait_checks()
        time.sleep(poll_seconds)


def main_does_then_all_wait(directory: Path, name: str, work: Callable[[], T]) -> T | None:
    """Rank 0 runs `work` (which may find the stage already done); the other ranks wait until
    it has, in this launch, then read its result from disk."""
    if rank() == 0:
        try:
            result = work()
        except BaseException as error:
            record_failure(directory, name, error)
            raise
        directory.mkdir(parents=True, exist_ok=True)
        _release_file(directory, name).touch()
        return result
    wait_for([_release_file(directory, name)], directory, name)
    return None
