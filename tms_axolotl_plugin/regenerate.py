"""The regenerate stage: each needed checkpoint answers its drawn prompts, into the LabelStore.

Work is split across ranks by item (a hash of prompt and checkpoint), so no item is generated
twice and a restart on any number of ranks redoes only what the store lacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from tms_axolotl_plugin.generation import GenerationBackend, GenerationRequest, SamplingSettings
from tms_axolotl_plugin.label_store import LabelStore
from tms_axolotl_plugin.logs import get_logger

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


def regenerate(
    requests: list[GenerationRequest],
    checkpoint_paths: dict[int, Path],
    backend: GenerationBackend,
    settings: SamplingSettings,
    store: LabelStore,
    rank: int = 0,
    world_size: int = 1,
) -> RegenerationReport:
    """Generate this rank's share of `requests` that the store does not hold yet."""
    store.record_sampling(settings.as_dict())  # refuses a store sampled with other settings
    stored = store.load()
    mine = [r for r in requests if owner_rank(r, world_size) == rank]
    todo = [r for r in mine if (r.prompt_key, r.checkpoint) not in stored]
    report = RegenerationReport(len(mine), len(mine) - len(todo), 0, 0, 0.0)
    if not todo:
        return report
    started = time.perf_counter()
    checkpoints = sorted({r.checkpoint for r in todo})
    jobs = [(checkpoint_paths[t], [r for r in todo if r.checkpoint == t]) for t in checkpoints]
    with tqdm(total=len(todo), desc=f"tms regenerate [rank {rank}]", unit="answer",
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
