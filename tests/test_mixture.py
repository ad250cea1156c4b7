"""The student's rows (mixture.py): each (example, epoch) with its drawn target written into
every answerable trained turn, epoch blocks in order, the reward-free hygiene fallback to the
original label per turn, and turns that TMS keeps counted by reason."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from tms_axolotl_plugin.draws import DrawPlan
from tms_axolotl_plugin.label_store import GeneratedLabel
from tms_axolotl_plugin.mixture import (
    DRAW_FIELD,
    NO_ROOM,
    TARGET_FIELD,
    build_student_rows,
)
from tms_axolotl_plugin.training_examples import AnswerSlots, TrainingExample, Turn
from tms_axolotl_plugin.training_examples.turns import KEPT_TOOL_CALL

CHAT = AnswerSlots("chat", "messages")
ALPACA = AnswerSlots("field", "output")
SEQ = 512  # sequence_len: every test prompt fits


def chat_row(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        "id": question,
    }


def example(index: int, dataset_index: int = 0, row: dict | None = None,
            usable: bool = True, kept: dict[int, str] | None = None) -> TrainingExample:
    """One turn per assistant message (a field row: one turn), each with its own prompt."""
    row = row if row is not None else chat_row(f"q{index}", f"label {index}")
    kept = kept or {}
    positions = [i for i, m in enumerate(row.get("messages", [])) if m["role"] == "assistant"]
    turns = [Turn(p, (1, 100 + index, 2, p), (7, 8), kept.get(p, ""))
             for p in positions or [0]] if usable else []
    return TrainingExample(dataset_index, row, turns)


def key(ex: TrainingExample, turn: int = -1) -> str:
    return ex.turns[turn].key


def generated(ex: TrainingExample, t: int, text: str | None = None,
              finish: str = "stop", turn: int = -1) -> GeneratedLabel:
    name = ex.row.get("id", ex.row.get("instruction"))
    text = f"answer of checkpoint {t} to {name} turn {ex.turns[turn].position}" \
        if text is None else text
    return GeneratedLabel(key(ex, turn), t, text, finish, num_tokens=5, prompt_tokens=3)


def store_for(examples, plan, overrides=None) -> dict:
    """Every drawn (turn, checkpoint) answer; `overrides[(i, t)] = (text, finish)` for the
    last turn of example i."""
    overrides = overrides or {}
    labels = {}
    for i, t in plan.needed_pairs():
        for turn in range(len(examples[i].turns)):
            last = turn == len(examples[i].turns) - 1
            text, finish = overrides.get((i, t), (None, "stop")) if last else (None, "stop")
            label = generated(examples[i], t, text, finish, turn)
            labels[(label.prompt_key, label.checkpoint)] = label
    return labels


def plan_of(targets) -> DrawPlan:
    return DrawPlan(np.array(targets, dtype=np.int16), num_checkpoints=4)


def last_content(row: dict) -> str:
    return row["messages"][-1]["content"]


def test_rows_come_in_epoch_blocks_in_example_order():
    examples = [example(i) for i in range(3)]
    plan = plan_of([[0, 2], [1, 0], [0, 0]])
    (rows,), stats = build_student_rows(examples, plan, store_for(examples, plan), [CHAT], SEQ)
    assert [row["id"] for row in rows] == ["q0", "q1", "q2", "q0", "q1", "q2"]
    assert [row[DRAW_FIELD] for row in rows] == [0, 1, 0, 2, 0, 0]
    assert [row[TARGET_FIELD] for row in rows] == [0, 1, 0, 2, 0, 0]
    assert stats.rows == 6


def test_original_label_rows_are_the_row_unchanged():
    examples = [example(i) for i in range(2)]
    before = copy.deepcopy([e.row for e in examples])
    plan = plan_of([[0], [0]])
    (rows,), stats = build_student_rows(examples, plan, {}, [CHAT], SEQ)
    for row, original in zip(rows, before, strict=True):
        assert {k: v for k, v in row.items() if k not in (DRAW_FIELD, TARGET_FIELD)} == original
    assert stats.original_labels == 2 and not stats.by_checkpoint


MULTI = {"messages": [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
], "id": "multi"}


def test_a_drawn_checkpoint_answers_every_trained_turn_of_the_row():
    examples = [example(0), example(1, row=MULTI)]
    before = copy.deepcopy([e.row for e in examples])
    plan = plan_of([[3, 1], [2, 0]])
    labels = store_for(examples, plan)
    (rows,), stats = build_student_rows(examples, plan, labels, [CHAT], SEQ)
    assert last_content(rows[0]) == labels[(key(examples[0]), 3)].text
    assert [m["content"] for m in rows[1]["messages"]] == [
        "Hi", labels[(key(examples[1], 0), 2)].text, "2+2?", labels[(key(examples[1], 1), 2)].text]
    assert "turn 1" in rows[1]["messages"][1]["content"], "each turn has its own answer"
    assert last_content(rows[2]) == labels[(key(examples[0]), 1)].text
    assert rows[3]["messages"] == MULTI["messages"], "a label draw keeps every turn"
    assert [e.row for e in examples] == before, "the examples' own rows are not modified"
    assert stats.by_checkpoint == {3: 1, 2: 1, 1: 1}
    assert stats.original_labels == 1
    assert (stats.turns, stats.turns_regenerated, stats.turns_label_drawn) == (6, 4, 2)


def test_kept_turns_keep_their_label_in_every_draw_and_are_counted_by_reason():
    examples = [example(0, row=MULTI, kept={1: KEPT_TOOL_CALL})]
    plan = plan_of([[2, 4]])
    labels = store_for(examples, plan)
    (rows,), stats = build_student_rows(examples, plan, labels, [CHAT], SEQ)
    for row, t in zip(rows, (2, 4), strict=True):
        assert row["messages"][1]["content"] == "Hello"
        assert row["messages"][3]["content"] == labels[(key(examples[0]), t)].text
        assert row[TARGET_FIELD] == t
    assert stats.turns_kept == {KEPT_TOOL_CALL: 2} and stats.turns_regenerated == 2


def test_one_turn_falling_back_leaves_the_other_turns_regenerated():
    examples = [example(0, row=MULTI)]
    plan = plan_of([[2]])
    labels = store_for(examples, plan, {(0, 2): ("cut at the cap", "length")})
    (rows,), stats = build_student_rows(examples, plan, labels, [CHAT], SEQ)
    assert rows[0]["messages"][1]["content"] == labels[(key(examples[0], 0), 2)].text
    assert rows[0]["messages"][3]["content"] == "4"
    assert rows[0][TARGET_FIELD] == 2
    assert stats.fallback_truncated == 1 and stats.turns_regenerated == 1
    assert stats.as_dict()["fallback_rate"] == 0.5


def test_rows_go_to_their_own_dataset_entry():
    alpaca_row = {"instruction": "Say hi", "input": "", "output": "Hi"}
    examples = [example(0, 0), example(1, 1, row=alpaca_row), example(2, 0)]
    plan = plan_of([[0], [4], [1]])
    labels = store_for(examples, plan)
    labels[(key(examples[1]), 4)] = generated(examples[1], 4, "Hello there")
    (chat_rows, alpaca_rows), stats = build_student_rows(examples, plan, labels,
                                                         [CHAT, ALPACA], SEQ)
    assert [r["id"] for r in chat_rows] == ["q0", "q2"]
    assert alpaca_rows == [{**alpaca_row, "output": "Hello there", DRAW_FIELD: 4,
                            TARGET_FIELD: 4}]
    assert stats.rows == 3


@pytest.mark.parametrize(
    "text,finish,counter",
    [
        ("", "stop", "fallback_empty"),
        ("   \n", "stop", "fallback_empty"),
        ("an answer cut at the cap", "length", "fallback_truncated"),
        ("", "length", "fallback_truncated"),
    ],
)
def test_unusable_answer_falls_back_to_the_original_label_and_is_counted(text, finish, counter):
    examples = [example(0), example(1)]
    plan = plan_of([[2, 2], [3, 0]])
    labels = store_for(examples, plan)
    labels[(key(examples[0]), 2)] = generated(examples[0], 2, text, finish)
    (rows,), stats = build_student_rows(examples, plan, labels, [CHAT], SEQ)
    fallen_back = [rows[0], rows[2]]  # example 0 in both epochs
    for row in fallen_back:
        assert last_content(row) == "label 0"
        assert row[DRAW_FIELD] == 2, "the audit keeps what was drawn"
        assert row[TARGET_FIELD] == 0, "but records that the label was trained on"
    assert getattr(stats, counter) == 2
    other = "fallback_truncated" if counter == "fallback_empty" else "fallback_empty"
    assert getattr(stats, other) == 0
    assert stats.original_labels == 3  # two fallbacks + one drawn label
    assert stats.by_checkpoint == {3: 1}
    assert last_content(rows[1]) == labels[(key(examples[1]), 3)].text


def test_missing_store_entry_raises_key_error_naming_example_and_checkpoint():
    examples = [example(0), example(1)]
    plan = plan_of([[0], [3]])
    with pytest.raises(KeyError, match="example 1, turn at 1, from checkpoint 3"):
        build_student_rows(examples, plan, {}, [CHAT], SEQ)


def test_unusable_example_keeps_its_row_and_needs_no_generated_answer():
    examples = [example(0, usable=False), example(1)]
    plan = plan_of([[2, 1], [0, 0]])
    (rows,), stats = build_student_rows(examples, plan, {}, [CHAT], SEQ)
    assert [last_content(r) for r in rows] == ["label 0", "label 1", "label 0", "label 1"]
    assert [r[DRAW_FIELD] for r in rows] == [2, 0, 1, 0]
    assert all(r[TARGET_FIELD] == 0 for r in rows)
    assert stats.unusable_examples == 1  # counted once, not once per epoch
    assert stats.original_labels == 4


def test_prompt_that_fills_the_sequence_keeps_its_row_and_needs_no_generated_answer():
    examples = [example(0), example(1)]  # 4-token prompts
    plan = plan_of([[2, 1], [1, 0]])
    labels = {k: v for k, v in store_for(examples, plan).items() if k[0] == key(examples[1])}
    (rows,), stats = build_student_rows(examples, plan, labels, [CHAT], sequence_len=4)
    assert [r[TARGET_FIELD] for r in rows] == [0, 0, 0, 0]  # neither prompt leaves room
    assert stats.turns_kept == {NO_ROOM: 4} and stats.unusable_examples == 0
    (rows,), stats = build_student_rows(examples, plan, labels | store_for(examples, plan),
                                        [CHAT], sequence_len=5)
    assert [r[TARGET_FIELD] for r in rows] == [2, 1, 1, 0] and not stats.turns_kept


def test_stats_as_dict_is_json_friendly():
    examples = [example(0), example(1)]
    plan = plan_of([[2, 0], [3, 2]])
    labels = store_for(examples, plan, {(1, 3): ("", "length")})
    _, stats = build_student_rows(examples, plan, labels, [CHAT], SEQ)
    assert stats.as_dict() == {
        "rows": 4,
        "original_labels": 2,
        "by_checkpoint": {"2": 2},
        "turns": 4,
        "turns_regenerated": 2,
        "turns_label_drawn": 1,
        "turns_kept": {},
        "fallback_empty": 0,
        "fallback_truncated": 1,
        "fallback_rate": 0.3333,
        "unusable_examples": 0,
    }
