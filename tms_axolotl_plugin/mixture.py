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

import json
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tms_axolotl_plugin.draws import LABEL, DrawPlan
from tms_axolotl_plugin.files import AtomicFile
from tms_axolotl_plugin.label_store import GeneratedLabel, LabelStore
from tms_axolotl_plugin.training_examples import (
    AnswerSlots,
    TrainingExample,
    with_answers,
)
from tms_axolotl_plugin.training_examples.table import ExampleTable, key_text
from tms_axolotl_plugin.turn_requests import answerable_turns

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MixtureStats:
        return cls(rows=data["rows"], original_labels=data["original_labels"],
                   by_checkpoint=Counter({int(k): v for k, v in data["by_checkpoint"].items()}),
                   turns=data["turns"], turns_regenerated=data["turns_regenerated"],
                   turns_label_drawn=data["turns_label_drawn"],
                   turns_kept=Counter(data["turns_kept"]),
                   fallback_empty=data["fallback_empty"],
                   fallback_truncated=data["fallback_truncated"],
                   unusable_examples=data["unusable_examples"])

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


@dataclass(frozen=True)
class RowTurn:
    """What mixing needs of one trained turn."""

    position: int
    key: str
    kept: str  # non-empty: keeps its label, and why
    answerable: bool  # not kept, and a checkpoint's answer fits the row


def mix_row(row: dict[str, Any], turns: list[RowTurn], draw: int, labels, slot: AnswerSlots,
            stats: MixtureStats, where: str) -> dict[str, Any]:
    """The row with the drawn target written into its answerable turns; counts into `stats`.
    `labels`: the drawn answers, by (prompt key, checkpoint)."""
    stats.turns += len(turns)
    for turn in turns:
        if turn.kept:
            stats.turns_kept[turn.kept] += 1
        elif not turn.answerable:
            stats.turns_kept[NO_ROOM] += 1
    answerable = [t for t in turns if t.answerable]
    answers: dict[int, str] = {}
    if draw == LABEL:
        stats.turns_label_drawn += len(answerable)
    for turn in answerable if draw != LABEL else []:
        answer = labels.get((turn.key, draw))
        if answer is None:
            raise KeyError(f"no generated answer for {where}, turn at {turn.position}, from "
                           f"checkpoint {draw}: the label store is incomplete")
        if answer.usable:
            answers[turn.position] = answer.text
        elif answer.finish_reason == "length":
            stats.fallback_truncated += 1
        else:
            stats.fallback_empty += 1
    stats.turns_regenerated += len(answers)
    target = draw if answers else LABEL
    stats.rows += 1
    if target == LABEL:
        stats.original_labels += 1
    else:
        stats.by_checkpoint[target] += 1
    return {**with_answers(slot, row, answers), DRAW_FIELD: draw, TARGET_FIELD: target}


def build_student_rows(
    examples: list[TrainingExample],
    plan: DrawPlan,
    labels: dict[tuple[str, int], GeneratedLabel],
    slots: list[AnswerSlots],
    sequence_len: int,
) -> tuple[list[list[dict[str, Any]]], MixtureStats]:
    """Rows per `datasets:` entry, epoch blocks in order; plus what was used (in memory: for
    small sets of examples; the pipeline streams with `write_student_mixture`).

    Examples no checkpoint could answer (no trained turn, or prompts that fill the sequence)
    keep their original row in every epoch.
    """
    rows: list[list[dict[str, Any]]] = [[] for _ in slots]
    stats = MixtureStats()
    turns = []
    for example in examples:
        caps = example.answer_caps(sequence_len)
        turns.append([RowTurn(t.position, t.key, t.kept, t in caps) for t in example.turns])
    for epoch in range(plan.num_epochs):
        for index, example in enumerate(examples):
            if epoch == 0 and not example.usable:
                stats.unusable_examples += 1
            rows[example.dataset_index].append(mix_row(
                example.row, turns[index], int(plan.targets[index, epoch]), labels,
                slots[example.dataset_index], stats, f"example {index}"))
    return rows, stats


MIX_BATCH_ROWS = 2048


def write_student_mixture(table: ExampleTable, train_rows: np.ndarray, plan: DrawPlan,
                          store: LabelStore, slots: list[AnswerSlots], sequence_len: int,
                          paths: dict[int, Path]) -> MixtureStats:
    """Stream the student's rows into one file per `datasets:` entry (`paths`, by entry index;
    entries without training rows have none), epoch blocks in order, batch by batch: the
    answers of each batch of rows are looked up in the store together."""
    answerable = answerable_turns(table, sequence_len)
    t = table.turns
    stats = MixtureStats()
    stats.unusable_examples = int(np.count_nonzero(
        (t.first[train_rows + 1] - t.first[train_rows]) == 0))
    with ExitStack() as stack:
        files = {index: stack.enter_context(AtomicFile(path)) for index, path in paths.items()}
        for epoch in range(plan.num_epochs):
            for start in range(0, len(train_rows), MIX_BATCH_ROWS):
                rows = train_rows[start: start + MIX_BATCH_ROWS]
                draws = plan.targets[start: start + MIX_BATCH_ROWS, epoch]
                turns = [[RowTurn(int(t.position[i]), key_text(t.key[i]), t.kept(i),
                                  bool(answerable.mask[i])) for i in t.of_row(int(row))]
                         for row in rows]
                needed = {(turn.key, int(draw)) for row_turns, draw in zip(turns, draws,
                                                                            strict=True)
                          if draw != LABEL for turn in row_turns if turn.answerable}
                labels = store.lookup(needed)
                texts = table.row_texts(int(rows[0]), int(rows[-1]) + 1)
                for offset, (row, draw) in enumerate(zip(rows, draws, strict=True)):
                    index = int(table.dataset_index[row])
                    mixed = mix_row(json.loads(texts[int(row - rows[0])]), turns[offset],
                                    int(draw), labels, slots[index], stats,
                                    f"example {start + offset}")
                    files[index].write(json.dumps(mixed, ensure_ascii=False, default=str)
                                       + "\n")
    return stats
