"""The student's training data: for every (example, epoch), its drawn target written into the row.

Epochs are laid out as consecutive blocks of one file and the student trains one pass over it:
packing fixes sequence lengths when the dataloader is built, so the per-epoch targets cannot be
swapped in between epochs; one pass over all blocks gives the same multiset of (example,
target) pairs with the same number of optimizer steps.

Hygiene fallback (reward-free, no correctness check): a drawn answer that is empty or was cut
at the token limit without EOS is not trained on; that (example, epoch) keeps its original
label instead. Each fallback is counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tms_axolotl_plugin.draws import LABEL, DrawPlan
from tms_axolotl_plugin.label_store import GeneratedLabel
from tms_axolotl_plugin.training_examples import TrainingExample, with_answer

# Kept in the rows for audits (Axolotl drops unknown columns when it tokenizes):
DRAW_FIELD = "tms_draw"  # what the draw chose: 0 = original label, t = checkpoint t
TARGET_FIELD = "tms_target"  # what was trained on, after the hygiene fallback


@dataclass
class MixtureStats:
    rows: int = 0
    original_labels: int = 0
    by_checkpoint: Counter = field(default_factory=Counter)
    fallback_empty: int = 0
    fallback_truncated: int = 0
    unusable_examples: int = 0  # rows without a separable prompt/answer: kept as they are
    prompt_fills_sequence: int = 0  # prompts of sequence_len tokens or more: kept as they are

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "original_labels": self.original_labels,
            "by_checkpoint": {str(k): v for k, v in sorted(self.by_checkpoint.items())},
            "fallback_empty": self.fallback_empty,
            "fallback_truncated": self.fallback_truncated,
            "unusable_examples": self.unusable_examples,
            "prompt_fills_sequence": self.prompt_fills_sequence,
        }


def build_student_rows(
    examples: list[TrainingExample],
    plan: DrawPlan,
    labels: dict[tuple[str, int], GeneratedLabel],
    dataset_configs: list[Any],
    sequence_len: int,
) -> tuple[list[list[dict[str, Any]]], MixtureStats]:
    """Rows per `datasets:` entry, epoch blocks in order; plus what was used.

    Examples no checkpoint could answer (no separable answer, or a prompt that fills the
    sequence) keep their original row in every epoch.
    """
    rows: list[list[dict[str, Any]]] = [[] for _ in dataset_configs]
    stats = MixtureStats()
    for epoch in range(plan.num_epochs):
        for index, example in enumerate(examples):
            draw = int(plan.targets[index, epoch])
            target = draw if example.can_regenerate(sequence_len) else LABEL
            if epoch == 0 and not example.usable:
                stats.unusable_examples += 1
            elif epoch == 0 and not example.can_regenerate(sequence_len):
                stats.prompt_fills_sequence += 1
            row = example.row
            if target != LABEL:
                answer = labels.get((example.key, target))
                if answer is None:
                    raise KeyError(
                        f"no generated answer for example {index} from checkpoint {target}: "
                        "the label store is incomplete"
                    )
                if answer.usable:
                    row = with_answer(dataset_configs[example.dataset_index], row, answer.text)
                else:
                    if answer.finish_reason == "length":
                        stats.fallback_truncated += 1
                    else:
                        stats.fallback_empty += 1
                    target = LABEL
            rows[example.dataset_index].append({**row, DRAW_FIELD: draw, TARGET_FIELD: target})
            stats.rows += 1
            if target == LABEL:
                stats.original_labels += 1
            else:
                stats.by_checkpoint[target] += 1
    return rows, stats
