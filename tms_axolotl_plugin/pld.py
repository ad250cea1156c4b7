"""Policy-Label Divergence (PLD) and the retention probe: answer NLL under the current model.

PLD is the mean per-token negative log-likelihood of the static (original) labels of held-out
examples, answer tokens only; its drift is PLD minus the lowest PLD seen so far. The retention
probe is the same quantity for the base model's own answers to off-task prompts, an estimate of
KL(base || current) up to a constant. Both are computed by `mean_answer_nll`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ScoredAnswer:
    """A prompt and the answer tokens whose likelihood is measured."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def save_scored_answers(path: Path, answers: list[ScoredAnswer]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for answer in answers:
            handle.write(json.dumps({"prompt_ids": answer.prompt_ids,
                                     "answer_ids": answer.answer_ids}) + "\n")
    tmp.replace(path)


def load_scored_answers(path: Path) -> list[ScoredAnswer]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
    return [ScoredAnswer(tuple(r["prompt_ids"]), tuple(r["answer_ids"])) for r in rows]


def mean_answer_nll(model, answers: list[ScoredAnswer], batch_size: int = 8,
                    max_length: int | None = None, rank: int = 0,
                    world_size: int = 1) -> float:
    """Mean per-token NLL of the answer tokens given their prompts (prompt tokens masked).

    With several ranks each scores its share and the sums are all-reduced, so every rank
    returns the same value.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    mine = answers[rank::world_size]
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # nll sum, token count
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            sequences, labels = [], []
            for item in batch:
                ids = list(item.prompt_ids) + list(item.answer_ids)
                lab = [IGNORE_INDEX] * len(item.prompt_ids) + list(item.answer_ids)
                if max_length:
                    ids, lab = ids[:max_length], lab[:max_length]
                sequences.append(ids)
                labels.append(lab)
            width = max(len(s) for s in sequences)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            target = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for row, (ids, lab) in enumerate(zip(sequences, labels, strict=True)):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                target[row, : len(lab)] = torch.tensor(lab)
            logits = model(input_ids=input_ids.to(device),
                           attention_mask=attention.to(device)).logits.float()
            shifted = target[:, 1:].to(device)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                  shifted.reshape(-1), ignore_index=IGNORE_INDEX,
                                  reduction="sum")
            totals[0] += nll.double()
            totals[1] += (shifted != IGNORE_INDEX).sum()
    if was_training:
        model.train()
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


class DriftTracker:
    """PLD drift: the current value minus the lowest value seen so far."""

    def __init__(self) -> None:
        self.lowest: float | None = None

    def update(self, value: float) -> float:
        self.lowest = value if self.lowest is None else min(self.lowest, value)
        return value - self.lowest
