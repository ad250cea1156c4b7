"""The regenerate stage: each needed checkpoint answers its drawn prompts, into the LabelStore.

Work is split across workers by item (a hash of prompt and checkpoint), or, for vLLM engines
serving full weights, by contiguous spans of the items in checkpoint order (`checkpoint_spans`):
every worker gets the same number of items, and a span covers few checkpoints, each of which the
engine loads once. No item is generated twice, and a restart on any number of workers redoes
only what the store lacks. Which items are left is decided on keys alone, in batches; a
request's token ids are read only as it is sent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tms_axolotl_plugin.errors import TMSConfigError, TMSError
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


def engine_gpus(engine: Mapping[str, Any] | None) -> int:
    """GPUs one launched vLLM engine spans: `vllm.tensor_parallel_size` x `data_parallel_size`."""
    engine = engine or {}
    return int(engine.get("tensor_parallel_size") or 1) * int(
        engine.get("data_parallel_size") or 1)


def launches_engine_per_gpu(tms, world_size: int) -> bool:
    """Whether regeneration runs a launched vLLM engine on the GPUs of every process group of
    `engine_gpus` local ranks (`tms.sidecar.engines: per_gpu`), rather than one server. A single
    process launches one server, on the GPUs it sees."""
    g, s = tms.generation, tms.sidecar
    return (g.backend == "vllm" and not s.servers and s.engines == "per_gpu"
            and s.cuda_visible_devices is None and world_size > 1)


def _layout_problem(local_world_size: int, gpus_per_engine: int) -> str | None:
    if local_world_size % gpus_per_engine:
        return (f"{local_world_size} processes per node cannot be split into vLLM engines of "
                f"{gpus_per_engine} GPUs (vllm.tensor_parallel_size x vllm.data_parallel_size); "
                "make it divide the processes (GPUs) per node, or set tms.sidecar.engines: one")
    return None


def check_engine_layout(tms, engine: Mapping[str, Any] | None, world_size: int,
                        local_world_size: int) -> None:
    """At config load, on every rank: reject a launch whose per-GPU engines cannot be laid out
    on its nodes, naming the key to change (else it fails after the whole harvest)."""
    if not launches_engine_per_gpu(tms, world_size):
        return
    gpus = engine_gpus(engine)
    problem = _layout_problem(local_world_size, gpus)
    if problem:
        raise TMSConfigError(problem)
    port = tms.sidecar.port
    if port is not None and local_world_size > gpus:
        raise TMSConfigError(
            f"tms.sidecar.port: {port} is fixed, but each node runs {local_world_size // gpus} "
            "vLLM engines (tms.sidecar.engines: per_gpu, one per "
            f"{gpus} of its {local_world_size} processes), which cannot share one port; unset "
            "tms.sidecar.port (each engine takes a free one) or set tms.sidecar.engines: one")


def vllm_engine_ranks(world_size: int, local_world_size: int, gpus_per_engine: int) -> list[int]:
    """The ranks that each run a vLLM engine on their own GPUs: on every node, one per
    `gpus_per_engine` consecutive local ranks."""
    problem = _layout_problem(local_world_size, gpus_per_engine)
    if problem:
        raise TMSError(problem)
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


SPAN_SNAP = 0.05  # a share boundary this close to a checkpoint's edge (in shares) moves there


def checkpoint_spans(counts: list[tuple[int, int]], worker: int,
                     workers: int) -> list[tuple[int, int, int]]:
    """Worker `worker`'s share of all items laid end to end in checkpoint order, as
    (checkpoint, start, stop) positions within each checkpoint's items. `counts` is
    [(checkpoint, items)] in that order.

    The shares partition the items into equal parts, except that a boundary within SPAN_SNAP of
    a share from a checkpoint's edge moves onto it, so that no engine loads a checkpoint for a
    sliver of its items (draws make checkpoints only nearly equal): shares differ from the mean
    by at most 2 x SPAN_SNAP (balance <= 1.1). All shares together load each checkpoint once,
    plus once per boundary inside one; with checkpoints of nearly equal size a share covers at
    most ceil(T / workers) + 1 of them (T=10 on 8 engines: two). The split depends on `counts`
    alone, so every worker computes the same one."""
    edges = np.cumsum([0] + [n for _, n in counts])
    total = int(edges[-1])

    def boundary(w: int) -> int:
        ideal = w * total // workers
        if 0 < w < workers:
            nearest = int(edges[np.abs(edges - ideal).argmin()])
            if abs(nearest - ideal) <= SPAN_SNAP * total / workers:
                return nearest
        return ideal

    low, high = boundary(worker), boundary(worker + 1)
    spans = []
    for (checkpoint, n), offset in zip(counts, edges[:-1].tolist(), strict=True):
        start, stop = max(low - offset, 0), min(high - offset, n)
        if start < stop:
            spans.append((checkpoint, start, stop))
    return spans


def _left(requests: RequestSet, checkpoint: int, store: LabelStore, rank: int,
          world_size: int, span: tuple[int, int] | None = None) -> tuple[int, np.ndarray]:
    """(items of `checkpoint` this worker owns, those of them the store does not hold). Owned:
    by hash, or with `span` the items at those positions."""
    indices = requests.indices_of(checkpoint)
    if span is not None:
        indices, rank, world_size = indices[span[0]: span[1]], 0, 1
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
    by_checkpoint: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> RegenerationReport:
    """Generate this worker's share of `requests` that the store does not hold yet. Requests
    are made as the backend takes them; answers go to the store batch by batch. Once `stop()`
    is true (checked after each stored batch), TMSError is raised.

    The share: items whose hash falls to `rank` of `world_size`; or, `by_checkpoint`, the
    worker's span of the items in checkpoint order (`checkpoint_spans`), so that an engine
    serving full weights loads few checkpoints, each once."""
    if isinstance(requests, list):
        requests = ListedRequests(requests)
    store.record_sampling(settings.as_dict())  # refuses a store sampled with other settings
    report = RegenerationReport(0, 0, 0, 0, 0.0)
    started = time.perf_counter()
    spans = {}
    if by_checkpoint:
        counts = list(requests.per_checkpoint().items())
        spans = {t: (start, end) for t, start, end in checkpoint_spans(counts, rank, world_size)}
    todo = {}
    for checkpoint in (spans or requests.checkpoints()):
        mine, todo[checkpoint] = _left(requests, checkpoint, store, rank, world_size,
                                       spans.get(checkpoint))
        report.requested += mine
    total = sum(len(t) for t in todo.values())
    report.already_stored = report.requested - total
    checkpoints = [t for t in todo if len(todo[t])]
    if spans:
        LOG.info("tms regenerate [worker %d]: %d answers of checkpoint(s) %s", rank, total,
                 ", ".join(map(str, checkpoints)) or "none")
    jobs = [(checkpoint_paths[t], requests.iter_requests(todo[t])) for t in checkpoints]
    _generate(jobs, backend, settings, store, rank, report, total, checkpoints[-1:], stop)
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
    by_checkpoint: bool = False,
    on_done: Callable[[int, RegenerationReport], None] = lambda worker, report: None,
) -> None:
    """Run this process's generation workers (of `world_size` in all): one, or one thread each
    when there are several (user-run servers outnumbering the processes), each with its own
    backend (`backend_for(worker)`, closed after it) and its own store writer. A failed worker
    stops the others at their next batch; the first error is raised."""
    failed = threading.Event()

    def run(worker: int, worker_store: LabelStore) -> None:
        backend = None
        try:
            backend = backend_for(worker)
            report = regenerate(requests, checkpoint_paths, backend, settings, worker_store,
                                worker, world_size, by_checkpoint, stop=failed.is_set)
        except BaseException:
            failed.set()
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
        with ThreadPoolExecutor(len(workers), thread_name_prefix="tms-regenerate") as pool:
            futures = [pool.submit(run, w, s) for w, s in zip(workers, stores, strict=True)]
            errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None and not isinstance(e, _Stopped)),
                     next((e for e in errors if e is not None), None))
        if first is not None:
            raise first
    finally:
        for worker_store in stores:
            worker_store.close()


class _Stopped(TMSError):
    """A worker stopped because another worker of its process failed."""


def _generate(jobs, backend: GenerationBackend, settings: SamplingSettings, store: LabelStore,
              rank: int, report: RegenerationReport, total: int, last: list[int],
              stop: Callable[[], bool] = lambda: False) -> None:
    if not total:
        return
    started = time.perf_counter()
    generated_tokens = report.generated_tokens
    with tqdm(total=total, desc=f"tms regenerate [worker {rank}]", unit="answer",
              dynamic_ncols=True) as progress:
        for labels in backend.generate_many(jobs, settings):
            store.append(rank, labels)
            if stop():
                raise _Stopped(f"worker {rank} stopped: another worker of this process failed")
            report.generated += len(labels)
            report.generated_tokens += sum(label.num_tokens for label in labels)
            progress.update(len(labels))
            elapsed = time.perf_counter() - started
            progress.set_postfix_str(
                f"checkpoint {labels[-1].checkpoint}/{last[-1]}, "
                f"{(report.generated_tokens - generated_tokens) / max(elapsed, 1e-9):.0f} tok/s")
