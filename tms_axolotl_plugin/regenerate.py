"""The regenerate stage: each needed checkpoint answers its drawn prompts, into the LabelStore.

Work is split across workers by item (a hash of prompt and checkpoint), or, for vLLM engines
serving full weights, by whole checkpoints taken from a queue the workers share (claim files),
so no item is generated twice and a restart on any number of workers redoes only what the
store lacks. Which items are
left is decided on keys alone, in batches; a request's token ids are read only as it is sent.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.generation import (
    GenerationBackend,
    GenerationRequest,
    SamplingSettings,
)
from tms_axolotl_plugin.label_store import LabelStore
from tms_axolotl_plugin.logs import get_logger
from tms_axolotl_plugin.turn_requests import ListedRequests, RequestSet

LOG = get_logger(__name__)


@dataclass
class RegenerationReport:
    requested: int
    already_stored: int
    generated: int
    generated_tokens: int
    seconds: float


def owner_rank(request: GenerationRequest, world_size: int) -> int:
    return request.seed % world_size


def owned(keys: list[str], checkpoint: int, rank: int, world_size: int) -> np.ndarray:
    """Which of these (prompt, checkpoint) items this rank generates."""
    if world_size == 1:
        return np.ones(len(keys), dtype=bool)
    return np.asarray([GenerationRequest(k, checkpoint, (), 0).seed % world_size == rank
                       for k in keys], dtype=bool)


CHECK_BATCH = 4096  # items looked up in the store at once


def vllm_engine_ranks(world_size: int, local_world_size: int, gpus_per_engine: int) -> list[int]:
    """The ranks that each run a vLLM engine on their own GPUs: on every node, one per
    `gpus_per_engine` consecutive local ranks."""
    if local_world_size % gpus_per_engine:
        raise TMSError(
            f"{local_world_size} processes per node cannot be split into vLLM engines of "
            f"{gpus_per_engine} GPUs (vllm.tensor_parallel_size x vllm.data_parallel_size); "
            "make it divide the GPUs per node, or set tms.sidecar.engines: one")
    return [r for r in range(world_size) if (r % local_world_size) % gpus_per_engine == 0]


def engine_devices(rank: int, local_world_size: int, gpus_per_engine: int,
                   visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for the engine of `rank`: its local GPUs, named as the launcher
    named them (an outer CUDA_VISIBLE_DEVICES maps local index i to its i-th entry)."""
    local = rank % local_world_size
    indices = range(local, local + gpus_per_engine)
    if visible:
        names = [name.strip() for name in visible.split(",") if name.strip()]
        if len(names) >= local + gpus_per_engine:
            return ",".join(names[i] for i in indices)
    return ",".join(str(i) for i in indices)


def checkpoint_queue(claim_file: Callable[[int], Path], owner: str) -> Callable[[int], bool]:
    """`claim(checkpoint)` for `regenerate`: True for the first worker to create the
    checkpoint's claim file (O_EXCL: atomic on local and network filesystems alike)."""
    def claim(checkpoint: int) -> bool:
        try:
            fd = os.open(claim_file(checkpoint), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        os.write(fd, f"{owner}\n".encode())
        os.close(fd)
        return True

    return claim


def _left(requests: RequestSet, checkpoint: int, store: LabelStore, rank: int,
          world_size: int) -> tuple[int, np.ndarray]:
    """(items of `checkpoint` this worker owns, those of them the store does not hold)."""
    indices = requests.indices_of(checkpoint)
    mine, left = 0, []
    for start in range(0, len(indices), CHECK_BATCH):
        chunk = indices[start: start + CHECK_BATCH]
        keys = requests.prompt_keys(chunk)
        ours = owned(keys, checkpoint, rank, world_size)
        stored = np.asarray(store.contains(
            [(k, checkpoint) for k, o in zip(keys, ours, strict=True) if o]), dtype=bool)
        mine += int(ours.sum())
        left.append(chunk[ours][~stored] if len(stored) else chunk[:0])
    return mine, np.concatenate(left) if left else indices[:0]


def regenerate(
    requests: RequestSet | list[GenerationRequest],
    checkpoint_paths: dict[int, Path],
    backend: GenerationBackend,
    settings: SamplingSettings,
    store: LabelStore,
    rank: int = 0,
    world_size: int = 1,
    claim: Callable[[int], bool] | None = None,
) -> RegenerationReport:
    """Generate this worker's share of `requests` that the store does not hold yet. Requests
    are made as the backend takes them; answers go to the store batch by batch.

    The share: items whose hash falls to `rank` of `world_size`; or, with `claim`, every item
    of each checkpoint that `claim(checkpoint)` grants (a queue of whole checkpoints shared by
    the workers: an engine serving full weights loads each checkpoint it answers once)."""
    if isinstance(requests, list):
        requests = ListedRequests(requests)
    store.record_sampling(settings.as_dict())  # refuses a store sampled with other settings
    report = RegenerationReport(0, 0, 0, 0, 0.0)
    started = time.perf_counter()
    if claim is None:
        todo = {}
        for checkpoint in requests.checkpoints():
            mine, todo[checkpoint] = _left(requests, checkpoint, store, rank, world_size)
            report.requested += mine
        total = sum(len(t) for t in todo.values())
        report.already_stored = report.requested - total
        checkpoints = [t for t in todo if len(todo[t])]
        jobs = [(checkpoint_paths[t], requests.iter_requests(todo[t])) for t in checkpoints]
        _generate(jobs, backend, settings, store, rank, report, total, checkpoints[-1:])
    else:
        for checkpoint in requests.checkpoints():
            if not claim(checkpoint):
                continue
            mine, left = _left(requests, checkpoint, store, 0, 1)
            report.requested += mine
            report.already_stored += mine - len(left)
            if len(left):
                LOG.info("tms regenerate [worker %d]: checkpoint %d, %d answers", rank,
                         checkpoint, len(left))
                _generate([(checkpoint_paths[checkpoint], requests.iter_requests(left))],
                          backend, settings, store, rank, report, len(left), [checkpoint])
    report.seconds = time.perf_counter() - started
    return report


def regenerate_workers(
    workers: Sequence[int],
    world_size: int,
    backend_for: Callable[[int], GenerationBackend],
    requests: RequestSet | list[GenerationRequest],
    checkpoint_paths: dict[int, Path],
    settings: SamplingSettings,
    store: LabelStore,
    claim: Callable[[int], bool] | None = None,
    on_done: Callable[[int, RegenerationReport], None] = lambda worker, report: None,
) -> None:
    """Run this process's generation workers (of `world_size` in all): one, or one thread each
    when there are several (user-run servers outnumbering the processes), each with its own
    backend (`backend_for(worker)`, closed after it) and its own store writer. A failed worker
    stops the others from claiming more checkpoints; the first error is raised once they end."""
    stop = threading.Event()

    def claim_unless_stopped(checkpoint: int) -> bool:
        return not stop.is_set() and claim(checkpoint)

    def run(worker: int, worker_store: LabelStore) -> None:
        backend = None
        try:
            backend = backend_for(worker)
            report = regenerate(requests, checkpoint_paths, backend, settings, worker_store,
                                worker, world_size,
                                claim=claim_unless_stopped if claim else None)
        except BaseException:
            stop.set()
            raise
        finally:
            if backend is not None:
                backend.close()
        on_done(worker, report)

    if len(workers) == 1:
        run(workers[0], store)
        return
    stores = [LabelStore(store.directory) for _ in workers]  # a store object per thread
    try:
        with ThreadPoolExecutor(max(len(workers), 1), thread_name_prefix="tms-regenerate") as pool:
            for done in [pool.submit(run, w, s) for w, s in zip(workers, stores, strict=True)]:
                done.result()
    finally:
        for worker_store in stores:
            worker_store.close()


def _generate(jobs, backend: GenerationBackend, settings: SamplingSettings, store: LabelStore,
              rank: int, report: RegenerationReport, total: int, last: list[int]) -> None:
    if not total:
        return
    started = time.perf_counter()
    generated_tokens = report.generated_tokens
    with tqdm(total=total, desc=f"tms regenerate [worker {rank}]", unit="answer",
              dynamic_ncols=True) as progress:
        for labels in backend.generate_many(jobs, settings):
            store.append(rank, labels)
            report.generated += len(labels)
            report.generated_tokens += sum(label.num_tokens for label in labels)
            progress.update(len(labels))
            elapsed = time.perf_counter() - started
            progress.set_postfix_str(
                f"checkpoint {labels[-1].checkpoint}/{last[-1]}, "
                f"{(report.generated_tokens - generated_tokens) / max(elapsed, 1e-9):.0f} tok/s")
