"""The student's training data: for every (example, epoch), its drawn target written into the row.

Epochs are laid out as consecutive blocks of one file and the student trains one pass over it:
packing fixes sequence lengths when the dataloader is built, so the per-epoch targets cannot be
swapped in between epochs; one pass over all blocks gives the same multiset of (example,
target) pairs with the same number of optimizer steps.

A draw of checkpoint t for (example, epoch) replaces every answerable trained turn of the row
with checkpoint t's answer to that turn's own prompt. Turns Axolotl does not train never change;
trained turns TMS must not rewrite (tool calls, partly trained turns, ...) keep their label and
are counted by reason.

Hygiene fallback (reward-free, no correctness check): a drawn answer that is empty or was cut
at the token limit without EOS is not trained on; that turn keeps its original label in that
epoch instead. Each fallback is counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tms_axolotl_plugin.draws import LABEL, DrawPlan
from tms_axolotl_plugin.label_store import GeneratedLabel
from tms_axolotl_plugin.training_examples import (
    AnswerSlots,
    TrainingExample,
    with_answers,
)

# Kept in the rows for audits (Axolotl drops unknown columns when it tokenizes):
DRAW_FIELD = "tms_draw"  # what the draw chose: 0 = original label, t = checkpoint t
TARGET_FIELD = "tms_target"  # t when at least one turn holds checkpoint t's answer, else 0
NO_ROOM = "no room in sequence_len"


@dataclass
class MixtureStats:
    rows: int = 0
    original_labels: int = 0  # rows trained on their original labels only
    by_checkpoint: Counter = field(default_factory=Counter)  # rows with checkpoint t's answers
    turns: int = 0  # trained turns over all rows and epochs
    turns_regenerated: int = 0
    turns_label_drawn: int = 0  # answerable turns of rows whose draw kept the label
    turns_kept: Counter = field(default_factory=Counter)  # never regenerated, by reason
    fallback_empty: int = 0  # turns
    fallback_truncated: int = 0  # turns
    unusable_examples: int = 0  # rows without a trained turn after a prompt: kept as they are

    @property
    def drawn_turns(self) -> int:
        """Answerable turns whose row drew a checkpoint."""
        return self.turns_regenerated + self.fallback_empty + self.fallback_truncated

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "original_labels": self.original_labels,
            "by_checkpoint": {str(k): v for k, v in sorted(self.by_checkpoint.items())},
            "turns": self.turns,
            "turns_regenerated": self.turns_regenerated,
            "turns_label_drawn": self.turns_label_drawn,
            "turns_kept": dict(sorted(self.turns_kept.items())),
            "fallback_empty": self.fallback_empty,
            "fallback_truncated": self.fallback_truncated,
            "fallback_rate": round((self.fallback_empty + self.fallback_truncated)
                                   / max(self.drawn_turns, 1), 4),
            "unusable_examples": self.unusable_examples,
        }


def build_student_rows(
    examples: list[TrainingExample],
    plan: DrawPlan,
    labels: dict[tuple[str, int], GeneratedLabel],
    slots: list[AnswerSlots],
    sequence_len: int,
) -> tuple[list[list[dict[str, Any]]], MixtureStats]:
    """Rows per `datasets:` entry, epoch blocks in order; plus what was used.

    Examples no checkpoint could answer (no trained turn, or prompts that fill the sequence)
    keep their original row in every epoch.
    """
    rows: list[list[dict[str, Any]]] = [[] for _ in slots]
    stats = MixtureStats()
    for epoch in range(plan.num_epochs):
        for index, example in enumerate(examples):
            draw = int(plan.targets[index, epoch])
            answerable = example.answerable_turns(sequence_len)
            if epoch == 0 and not example.usable:
                stats.unusable_examples += 1
            stats.turns += len(example.turns)
            for turn in example.turns:
                if turn.kept:
                    stats.turns_kept[turn.kept] += 1
                elif turn not in answerable:
                    stats.turns_kept[NO_ROOM] += 1
            answers: dict[int, str] = {}
            if draw == LABEL:
                stats.turns_label_drawn += len(answerable)
            for turn in answerable if draw != LABEL else []:
                answer = labels.get((turn.key, draw))
                if answer is None:
                    raise KeyError(
                        f"no generated answer for example {index}, turn at {turn.position}, "
                        f"from checkpoint {draw}: the label store is incomplete")
                if answer.usable:
                    answers[turn.position] = answer.text
                elif answer.finish_reason == "length":
                    stats.fallback_truncated += 1
                else:
                    stats.fallback_empty += 1
            stats.turns_regenerated += len(answers)
            target = draw if answers else LABEL
            row = with_answers(slots[example.dataset_index], example.row, answers)
            rows[example.dataset_index].append({**row, DRAW_FIELD: draw, TARGET_FIELD: target})
            stats.rows += 1
            if target == LABEL:
                stats.original_labels += 1
            else:
                stats.by_checkpoint[target] += 1
    return rows, stats
