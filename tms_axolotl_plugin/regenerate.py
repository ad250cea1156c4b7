"""The regenerate stage: each needed checkpoint answers its drawn prompts, into the LabelStore.

Work is split across ranks by item (a hash of prompt and checkpoint), so no item is generated
twice and a restart on any number of ranks redoes only what the store lacks. Which items are
left is decided on keys alone, in batches; a request's token ids are read only as it is sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

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


def regenerate(
    requests: RequestSet | list[GenerationRequest],
    checkpoint_paths: dict[int, Path],
    backend: GenerationBackend,
    settings: SamplingSettings,
    store: LabelStore,
    rank: int = 0,
    world_size: int = 1,
) -> RegenerationReport:
    """Generate this rank's share of `requests` that the store does not hold yet. Requests are
    made as the backend takes them; answers go to the store batch by batch."""
    if isinstance(requests, list):
        requests = ListedRequests(requests)
    store.record_sampling(settings.as_dict())  # refuses a store sampled with other settings
    todo: dict[int, np.ndarray] = {}
    mine = 0
    for checkpoint in requests.checkpoints():
        indices = requests.indices_of(checkpoint)
        left = []
        for start in range(0, len(indices), CHECK_BATCH):
            chunk = indices[start: start + CHECK_BATCH]
            keys = requests.prompt_keys(chunk)
            ours = owned(keys, checkpoint, rank, world_size)
            stored = np.asarray(store.contains(
                [(k, checkpoint) for k, o in zip(keys, ours, strict=True) if o]), dtype=bool)
            mine += int(ours.sum())
            left.append(chunk[ours][~stored] if len(stored) else chunk[:0])
        todo[checkpoint] = np.concatenate(left) if left else indices[:0]
    total = sum(len(t) for t in todo.values())
    report = RegenerationReport(mine, mine - total, 0, 0, 0.0)
    if not total:
        return report
    started = time.perf_counter()
    checkpoints = [t for t in todo if len(todo[t])]
    jobs = [(checkpoint_paths[t], requests.iter_requests(todo[t])) for t in checkpoints]
    with tqdm(total=total, desc=f"tms regenerate [rank {rank}]", unit="answer",
              dynamic_ncols=True) as progress:
        for labels in backend.generate_many(jobs, settings):
            store.append(rank, labels)
            report.generated += len(labels)
            report.generated_tokens += sum(label.num_tokens for label in labels)
            progress.update(len(labels))
            elapsed = time.perf_counter() - started
            progress.set_postfix_str(
                f"checkpoint {labels[-1].checkpoint}/{checkpoints[-1]}, "
                f"{report.generated_tokens / max(elapsed, 1e-9):.0f} tok/s")
    report.seconds = time.perf_counter() - started
    return report
