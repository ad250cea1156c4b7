"""Policy-Label Divergence (PLD) and the retention probe: answer NLL under the current model.

PLD is the mean per-token negative log-likelihood of the static (original) labels of held-out
examples, answer tokens only; its drift is PLD minus the lowest PLD seen so far. The retention
probe is the same quantity for the base model's own answers to off-task prompts, an estimate of
KL(base || current) up to a constant. Both are computed by `mean_answer_nll`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tms_axolotl_plugin.files import write_jsonl_atomic

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ScoredAnswer:
    """A prompt and the answer tokens whose likelihood is measured."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def save_scored_answers(path: Path, answers: list[ScoredAnswer]) -> None:
    write_jsonl_atomic(path, ({"prompt_ids": answer.prompt_ids, "answer_ids": answer.answer_ids}
                              for answer in answers))


def load_scored_answers(path: Path) -> list[ScoredAnswer]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return [ScoredAnswer(tuple(r["prompt_ids"]), tuple(r["answer_ids"])) for r in rows]


def mean_answer_nll(model, answers: list[ScoredAnswer], batch_size: int = 8,
                    max_length: int | None = None, rank: int = 0,
                    world_size: int = 1) -> float:
    """Mean per-token NLL of the answer tokens given their prompts (prompt tokens masked).

    Answers are scored in batches of similar length, and the output head runs only over the
    positions from the batch's earliest answer token on (`logits_to_keep`), which skips most
    of the vocabulary projection for prompt tokens. With several ranks each scores its share,
    every rank runs the same number of forward passes (sharded models gather weights inside
    forward) and the sums are all-reduced, so every rank returns the same value.
    """
    import torch
    import torch.nn.functional as F

    if not answers:
        raise ValueError("mean_answer_nll needs at least one answer")
    device = next(model.parameters()).device
    by_length = sorted(answers, key=lambda a: len(a.prompt_ids) + len(a.answer_ids))
    mine = by_length[rank::world_size]
    num_batches = math.ceil(math.ceil(len(answers) / world_size) / batch_size)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # nll sum, token count
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for index in range(num_batches):
            batch = mine[index * batch_size : (index + 1) * batch_size]
            counted = bool(batch)
            if not counted:  # this rank's share ran out; keep forward calls in step
                batch = by_length[:1]
            input_ids, attention, target, first_answer = _padded_batch(batch, max_length)
            width = input_ids.shape[1]
            # Logits at position p predict token p+1: keep positions first_answer-1 .. width-1.
            keep = min(width, max(1, width - first_answer + 1))
            logits = last_logits(model, keep, input_ids=input_ids.to(device),
                                 attention_mask=attention.to(device))
            shifted = target[:, width - logits.shape[1] + 1 :].to(device)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                  shifted.reshape(-1), ignore_index=IGNORE_INDEX,
                                  reduction="sum")
            if counted:
                totals[0] += nll.double()
                totals[1] += (shifted != IGNORE_INDEX).sum()
    if was_training:
        model.train()
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


def _padded_batch(batch: list[ScoredAnswer], max_length: int | None):
    """Right-padded ids, attention mask and answer-only targets; and the earliest answer start."""
    import torch

    rows = []
    for item in batch:
        ids = list(item.prompt_ids) + list(item.answer_ids)
        labels = [IGNORE_INDEX] * len(item.prompt_ids) + list(item.answer_ids)
        if max_length:
            ids, labels = ids[:max_length], labels[:max_length]
        rows.append((ids, labels, min(len(item.prompt_ids), len(ids))))
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labels, _) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        target[row, : len(labels)] = torch.tensor(labels)
    return input_ids, attention, target, min(start for _, _, start in rows)


def last_logits(model, keep: int, **inputs):
    """Logits of the last `keep` positions; all positions for models without logits_to_keep."""
    try:
        return model(**inputs, logits_to_keep=keep).logits
    except TypeError as error:
        if "logits_to_keep" not in str(error):
            raise
        return model(**inputs).logits


class DriftTracker:
    """PLD drift: the current value minus the lowest value seen so far."""

    def __init__(self) -> None:
        self.lowest: float | None = None

    def update(self, value: float) -> float:
        self.lowest = value if self.lowest is None else min(self.lowest, value)
        return value - self.lowest
