"""The mixture draws: which target each (example, epoch) of the student gets.

For every training example and every student epoch the target is the original label with
probability alpha, otherwise the answer of checkpoint t drawn uniformly from 1..T (the
iterative-SFT baseline always uses t = T). The draws are fixed by the seed *before* any
generation, so only the (example, checkpoint) pairs that were drawn need generating.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABEL = 0  # target code for "keep the original label"; checkpoints are 1..T


@dataclass(frozen=True)
class DrawPlan:
    """`targets[i, e]` is 0 (original label) or the checkpoint index t in 1..T."""

    targets: np.ndarray  # shape (num_examples, num_epochs), int16
    num_checkpoints: int
    all_checkpoints: bool = False

    @property
    def num_examples(self) -> int:
        return int(self.targets.shape[0])

    @property
    def num_epochs(self) -> int:
        return int(self.targets.shape[1])

    def needed_pair_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(examples, checkpoints) of the pairs to generate, sorted by checkpoint then example."""
        n, T = self.num_examples, self.num_checkpoints
        if self.all_checkpoints:
            return np.tile(np.arange(n, dtype=np.int64), T), np.repeat(
                np.arange(1, T + 1, dtype=np.int64), n)
        codes = np.unique(self.targets.astype(np.int64) * n
                          + np.arange(n, dtype=np.int64)[:, None])
        codes = codes[codes >= n]  # target 0: the label, nothing to generate
        return codes % n, codes // n

    def needed_pairs(self) -> list[tuple[int, int]]:
        """(example, checkpoint) pairs to generate, sorted by checkpoint then example."""
        examples, checkpoints = self.needed_pair_arrays()
        return list(zip(examples.tolist(), checkpoints.tolist(), strict=True))

    def label_fraction(self) -> float:
        return float((self.targets == LABEL).mean()) if self.targets.size else 0.0

    def savings(self) -> dict[str, float]:
        """How many generations the lazy draws avoid versus generating all T per prompt."""
        needed = len(self.needed_pair_arrays()[0])
        full = self.num_examples * self.num_checkpoints
        return {
            "generations": needed,
            "all_checkpoints_generations": full,
            "saved": full - needed,
            "per_prompt": needed / max(self.num_examples, 1),
        }


def draw_targets(
    num_examples: int,
    num_epochs: int,
    num_checkpoints: int,
    alpha: float,
    seed: int,
    schedule: str = "offline",
    all_checkpoints: bool = False,
) -> DrawPlan:
    """Draw every (example, epoch) target.

    The label coin and the checkpoint index come from two independent streams of one seed,
    so changing alpha changes only which draws keep their label; the checkpoint drawn for
    every other (example, epoch) stays the same and its answer can be reused.
    """
    if num_examples < 0 or num_epochs < 1 or num_checkpoints < 1:
        raise ValueError("need num_examples >= 0, num_epochs >= 1 and num_checkpoints >= 1")
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN, which would silently mean "never a label"
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    coin_rng, checkpoint_rng = (
        np.random.Generator(np.random.PCG64(seq))
        for seq in np.random.SeedSequence(seed).spawn(2)
    )
    keep_label = coin_rng.random((num_examples, num_epochs)) < alpha
    if schedule == "iterative":
        checkpoint = np.full((num_examples, num_epochs), num_checkpoints)
    elif schedule == "offline":
        checkpoint = checkpoint_rng.integers(1, num_checkpoints + 1, (num_examples, num_epochs))
    else:
        raise ValueError(f"unknown schedule {schedule!r}: expected 'offline' or 'iterative'")
    targets = np.where(keep_label, LABEL, checkpoint).astype(np.int16)
    return DrawPlan(targets, num_checkpoints, all_checkpoints)
