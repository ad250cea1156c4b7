"""The generation requests of the draws: one per distinct (turn prompt, checkpoint), as arrays.

A drawn (row, checkpoint t) needs t's answer to every answerable turn of the row. Identical
prompts share an answer, capped so that it fits every row it goes into (see
`TrainingExample.answer_caps`: a row's free room in `sequence_len` is shared by its turns).
Everything is computed on the table's flat turn arrays, and `GenerationRequest`s (with their
token ids, read from the memory-mapped table) are made only as they are sent, so a million rows
cost a few arrays, not a million Python objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from tms_axolotl_plugin.draws import DrawPlan
from tms_axolotl_plugin.generation import GenerationRequest
from tms_axolotl_plugin.training_examples.table import ExampleTable, key_text


@dataclass(frozen=True)
class Answerable:
    """Per table turn: whether a checkpoint answers it, and the longest answer that fits."""

    mask: np.ndarray  # bool
    cap: np.ndarray  # int64; meaningful where mask


def answerable_turns(table: ExampleTable, sequence_len: int) -> Answerable:
    turns = table.turns
    is_open = turns.open
    rows = len(table)
    open_per_row = np.bincount(turns.row[is_open], minlength=rows)
    room = sequence_len - table.num_tokens
    share = np.where(open_per_row > 0, room // np.maximum(open_per_row, 1), 0)
    cap = turns.answer_len.astype(np.int64) + share[turns.row]
    return Answerable(is_open & (cap >= 1) & (turns.start < sequence_len), cap)


class RequestSet:
    """Requests by index, sorted by (checkpoint, prompt key); `checkpoint` is an array."""

    checkpoint: np.ndarray

    def __len__(self) -> int:
        return len(self.checkpoint)

    def checkpoints(self) -> list[int]:
        return sorted(int(t) for t in np.unique(self.checkpoint))

    def indices_of(self, checkpoint: int) -> np.ndarray:
        return np.flatnonzero(self.checkpoint == checkpoint)

    def per_checkpoint(self) -> dict[int, int]:
        values, counts = np.unique(self.checkpoint, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def prompt_keys(self, indices: np.ndarray) -> list[str]:
        raise NotImplementedError

    def request(self, index: int) -> GenerationRequest:
        raise NotImplementedError

    def iter_requests(self, indices: Iterable[int]) -> Iterator[GenerationRequest]:
        for index in indices:
            yield self.request(int(index))


@dataclass(eq=False)
class TurnRequests(RequestSet):
    """The draws' requests; the prompt of request i is the prompt of table turn `turn[i]`."""

    table: ExampleTable
    key: np.ndarray  # uint64
    checkpoint: np.ndarray  # int16
    max_new_tokens: np.ndarray  # int64
    turn: np.ndarray  # int64: a table turn with this prompt (its token ids are read from it)

    @classmethod
    def build(cls, table: ExampleTable, train_rows: np.ndarray, plan: DrawPlan,
              sequence_len: int, max_new_tokens: int) -> TurnRequests:
        """`plan` is over the training rows: its example i is table row `train_rows[i]`."""
        answerable = answerable_turns(table, sequence_len)
        valid = np.flatnonzero(answerable.mask)
        per_row = np.bincount(table.turns.row[valid], minlength=len(table))
        first = np.zeros(len(table) + 1, dtype=np.int64)
        np.cumsum(per_row, out=first[1:])

        examples, checkpoints = plan.needed_pair_arrays()
        rows = train_rows[examples]
        counts = per_row[rows]
        pair = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
        within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(
            np.cumsum(counts) - counts, counts)
        turn = valid[first[rows][pair] + within]
        key = table.turns.key[turn]
        checkpoint = checkpoints[pair].astype(np.int16)
        cap = np.minimum(answerable.cap[turn], max_new_tokens)
        order = np.lexsort((key, checkpoint))  # stable: the first turn of a prompt stays first
        key, checkpoint, cap, turn = key[order], checkpoint[order], cap[order], turn[order]
        if len(key):
            new = np.ones(len(key), dtype=bool)
            new[1:] = (key[1:] != key[:-1]) | (checkpoint[1:] != checkpoint[:-1])
            starts = np.flatnonzero(new)
            cap = np.minimum.reduceat(cap, starts)
            key, checkpoint, turn = key[starts], checkpoint[starts], turn[starts]
        return cls(table, key, checkpoint, cap, turn)

    def prompt_keys(self, indices: np.ndarray) -> list[str]:
        return [key_text(k) for k in self.key[indices]]

    def request(self, index: int) -> GenerationRequest:
        prompt = self.table.prompt_ids(int(self.turn[index]))
        return GenerationRequest(key_text(self.key[index]), int(self.checkpoint[index]),
                                 tuple(prompt.tolist()), int(self.max_new_tokens[index]))

    def work_fingerprint(self) -> str:
        """Names the set of (prompt, checkpoint) items (the regenerate stage's done markers)."""
        digest = hashlib.sha256(self.key.astype("<u8").tobytes())
        digest.update(self.checkpoint.astype("<i2").tobytes())
        return digest.hexdigest()[:16]


class ListedRequests(RequestSet):
    """A list of `GenerationRequest`s as a `RequestSet` (tests, benches)."""

    def __init__(self, requests: list[GenerationRequest]):
        self.requests = sorted(requests, key=lambda r: (r.checkpoint, r.prompt_key))
        self.checkpoint = np.asarray([r.checkpoint for r in self.requests], dtype=np.int16)

    def prompt_keys(self, indices: np.ndarray) -> list[str]:
        return [self.requests[int(i)].prompt_key for i in indices]

    def request(self, index: int) -> GenerationRequest:
        return self.requests[index]
