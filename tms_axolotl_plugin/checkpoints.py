"""Finding checkpoints on disk and choosing T evenly spaced ones (plain Python, no torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path

    @property
    def is_adapter(self) -> bool:
        return (self.path / "adapter_config.json").exists()


def has_weights(path: Path) -> bool:
    return any((path / name).exists() for name in WEIGHT_FILES)


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """`checkpoint-<step>` folders of a training run that hold weights, by step."""
    found = []
    for child in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        match = _CHECKPOINT_NAME.match(child.name)
        if match and child.is_dir() and has_weights(child):
            found.append(Checkpoint(int(match.group(1)), child))
    return sorted(found, key=lambda c: c.step)


def harvest_steps(total_steps: int, num_checkpoints: int) -> list[int]:
    """Steps at which the T harvest checkpoints are taken: round(t*S/T) for t = 1..T.

    Fails when the run is too short to give T distinct checkpoints.
    """
    if total_steps < num_checkpoints:
        raise ValueError(
            f"the harvest run has only {total_steps} optimizer steps, fewer than "
            f"tms.num_checkpoints={num_checkpoints}; lower num_checkpoints or train longer"
        )
    # Python's round() is banker's rounding; use half-up so spacing is symmetric.
    return [int(t * total_steps / num_checkpoints + 0.5) for t in range(1, num_checkpoints + 1)]


def select_evenly_spaced(checkpoints: list[Checkpoint], num_checkpoints: int) -> list[Checkpoint]:
    """T checkpoints spread evenly over an existing run; the last one is always included."""
    if len(checkpoints) < num_checkpoints:
        raise ValueError(
            f"found {len(checkpoints)} checkpoints but tms.num_checkpoints={num_checkpoints}"
        )
    n = len(checkpoints)
    picks = [int(t * n / num_checkpoints + 0.5) - 1 for t in range(1, num_checkpoints + 1)]
    return [checkpoints[i] for i in picks]
