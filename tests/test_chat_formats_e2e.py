"""Every chat format Axolotl users train on, through one real `axolotl train` with the plugin.

One run (module fixture), one `datasets:` entry per format: 3-turn conversations, per-message
training flags, `train_on_eos: all` with a trailing user turn, reasoning rendered by the qwen3
template, tool calls, legacy `message_field_*` keys, a dict-format (user-defined) alpaca type and
`input_output` segments. The tests then check the student's rows against the data, the label
store and Axolotl's own tokenization, in this process.
"""

from __future__ import annotations

import json

import pytest

from conftest import assert_ok, base_config, read_jsonl, run_axolotl_train, write_config
from tms_axolotl_plugin.training_examples import (
    answer_slots_for,
    load_training_examples,
    tokenize_row,
    tokenizing_strategy,
    with_answers,
)
from tms_axolotl_plugin.training_examples.turns import KEPT_TOOL_CALL, find_turns

pytestmark = pytest.mark.slow

T = 2
ROWS = 8  # per format
NUMBERS = [(a, b) for a in range(2, 6) for b in range(3, 5)][:ROWS]
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "adds two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}}}}}]


def conversation(a: int, b: int) -> list[dict]:
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is {a}+{b}?"},
            {"role": "assistant", "content": f"{a + b}."},
            {"role": "user", "content": f"And {a}*{b}?"},
            {"role": "assistant", "content": f"{a * b}."},
            {"role": "user", "content": f"And {a}-{b}?"},
            {"role": "assistant", "content": f"{a - b}."}]


def format_rows(kind: str, a: int, b: int) -> dict:
    row_id = f"{kind}-{a}-{b}"
    if kind == "multi":
        return {"id": row_id, "messages": conversation(a, b)}
    if kind == "flags":
        messages = conversation(a, b)
        messages[4]["train"] = False  # the middle answer is context only
        return {"id": row_id, "messages": messages}
    if kind == "eos_all":
        return {"id": row_id, "messages": conversation(a, b)[:5]
                + [{"role": "user", "content": "Thanks!"}]}
    if kind == "reasoning":
        return {"id": row_id, "messages": [
            {"role": "user", "content": f"What is {a}+{b}?"},
            {"role": "assistant", "reasoning_content": f"{a} plus {b}", "content": f"{a + b}."},
            {"role": "user", "content": f"And {a}*{b}?"},
            {"role": "assistant", "reasoning_content": f"{a} times {b}",
             "content": f"{a * b}."}]}
    if kind == "tools":
        call = {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
        return {"id": row_id, "tools": TOOLS, "messages": [
            {"role": "user", "content": f"Add {a} and {b}."},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": str(a + b)},
            {"role": "assistant", "content": f"It is {a + b}."}]}
    if kind == "legacy":
        return {"id": row_id, "conversations": [
            {"from": "human", "value": f"What is {a}+{b}?"}, {"from": "gpt", "value": f"{a + b}."},
            {"from": "human", "value": f"And {a}*{b}?"}, {"from": "gpt", "value": f"{a * b}."}]}
    if kind == "custom":
        return {"id": row_id, "q": f"What is {a}+{b}?", "a": f"{a + b}."}
    if kind == "segments":
        return {"id": row_id, "segments": [
            {"label": False, "text": f"Q: {a}+{b}?\nA:"}, {"label": True, "text": f" {a + b}."},
            {"label": False, "text": f"\nQ: {a}*{b}?\nA:"}, {"label": True, "text": f" {a * b}."}]}
    raise ValueError(kind)


ENTRIES = {
    "multi": {"type": "chat_template"},
    "flags": {"type": "chat_template", "message_field_training": "train"},
    "eos_all": {"type": "chat_template", "train_on_eos": "all"},
    "reasoning": {"type": "chat_template", "chat_template": "qwen3"},
    "tools": {"type": "chat_template", "chat_template": "qwen3"},
    "legacy": {"type": "chat_template", "field_messages": "conversations",
               "message_field_role": "from", "message_field_content": "value"},
    "custom": {"type": {"field_instruction": "q", "field_output": "a",
                        "format": "Question: {instruction}\nAnswer:",
                        "no_input_format": "Question: {instruction}\nAnswer:"}},
    "segments": {"type": "input_output"},
}
KINDS = list(ENTRIES)


@pytest.fixture(scope="module")
def formats_run(tmp_path_factory, tiny_model_dir):
    workdir = tmp_path_factory.mktemp("tms_formats")
    datasets = []
    for kind, entry in ENTRIES.items():
        path = workdir / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(format_rows(kind, a, b)) + "\n" for a, b in NUMBERS))
        datasets.append({"path": str(path), "ds_type": "json", "split": "train", **entry})
    cfg = base_config(
        tiny_model_dir, workdir / "unused.jsonl", workdir / "out", datasets=datasets,
        sequence_len=512, micro_batch_size=1, num_epochs=2, learning_rate=6e-3,
        plugins=["tms_axolotl_plugin.TMSPlugin"],
        tms={"num_checkpoints": T, "alpha": 0.25, "seed": 3,
             "pld": {"enabled": False}, "retention": {"enabled": False},
             "generation": {"max_new_tokens": 16, "batch_size": 16}},
    )
    cfg.pop("max_steps")
    config = write_config(workdir / "cfg.yml", cfg)
    proc = run_axolotl_train(config, timeout=1500)
    assert_ok(proc)
    return workdir, config, proc.stdout


@pytest.fixture(scope="module")
def audit(formats_run):
    """The data's turns as the plugin finds them, the student's rows, and the label store."""
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer

    workdir, config, output = formats_run
    cfg = load_cfg(str(config))
    tokenizer = load_tokenizer(cfg)
    examples = {(e.dataset_index, e.row["id"]): e for e in load_training_examples(cfg, tokenizer)}
    tms = workdir / "out" / "tms"
    stages = json.loads((tms / "stages.json").read_text())
    student_fp = stages["student"]["fingerprint"]
    mixture = {index: read_jsonl(tms / "student" / f"mixture-{student_fp}-{index}.jsonl")
               for index in range(len(KINDS))}
    store = {}
    for shard in (tms / "labels").glob("*/labels-rank*.jsonl"):
        for record in read_jsonl(shard):
            store[(record["prompt_key"], record["checkpoint"])] = record
    stats = json.loads((tms / "student" / f"mixture-{student_fp}.stats.json").read_text())
    return {"cfg": cfg, "tokenizer": tokenizer, "examples": examples, "mixture": mixture,
            "store": store, "stats": stats, "output": output, "stages": stages,
            "slots": answer_slots_for(cfg, tokenizer)}


def drawn(audit, index):
    """(student row, the data's example, checkpoint t) for rows that drew a checkpoint."""
    for row in audit["mixture"][index]:
        if row["tms_draw"]:
            yield row, audit["examples"][(index, row["id"])], row["tms_draw"]


def test_the_run_finishes_with_the_student_trained_on_every_format(audit):
    assert audit["stages"]["student"]["status"] == "done"
    assert all(len(rows) == 2 * ROWS for rows in audit["mixture"].values()), \
        "every row of every format is in the student's data, once per epoch"
    assert "tms mixture:" in audit["output"] and "trained turns" in audit["output"]


@pytest.mark.parametrize("kind", KINDS)
def test_drawn_rows_hold_each_turns_own_answer_and_nothing_else_changes(audit, kind):
    index = KINDS.index(kind)
    slots = audit["slots"][index]
    regenerated = 0
    for row, example, t in drawn(audit, index):
        answers = {}
        for turn in example.turns:
            record = audit["store"].get((turn.key, t))
            if turn.kept:
                assert record is None, "a kept turn is never sent to a checkpoint"
                continue
            usable = record["finish_reason"] == "stop" and record["text"].strip()
            if usable:
                answers[turn.position] = record["text"]
        # Exactly the row the data would give with these answers: untrained turns, kept turns
        # and every other column are byte-identical to the data.
        expected = with_answers(slots, example.row, answers)
        assert {k: v for k, v in row.items() if not k.startswith("tms_")} == expected
        assert row["tms_target"] == (t if answers else 0)
        regenerated += len(answers)
    assert regenerated > 0, f"no {kind} turn was regenerated: the test proves nothing"


@pytest.mark.parametrize("kind", KINDS)
def test_student_tokenization_trains_exactly_the_regenerated_and_kept_turns(audit, kind):
    """Axolotl's tokenization of each student row: its trained turns are the data's turns, in
    the same positions, with the new answers' tokens trained."""
    cfg, tokenizer = audit["cfg"], audit["tokenizer"]
    index = KINDS.index(kind)
    strategy = tokenizing_strategy(cfg.datasets[index], tokenizer, cfg)
    for row, example, t in drawn(audit, index):
        data_row = {k: v for k, v in row.items() if not k.startswith("tms_")}
        tokens = tokenize_row(strategy, data_row)
        turns = find_turns(strategy, data_row, tokens)
        assert [u.position for u in turns] == [u.position for u in example.turns]
        trained = [i for i, label in enumerate(tokens["labels"]) if label != -100]
        covered = {i for u in turns for i in range(len(u.prompt_ids),
                                                   len(u.prompt_ids) + len(u.answer_ids))}
        outside = [i for i in trained if i not in covered]
        if kind != "eos_all":  # there Axolotl also trains every user turn's end token
            assert outside == [], "only the turns' tokens are trained"
        for before, after in zip(example.turns, turns, strict=True):
            record = audit["store"].get((before.key, t))
            if before.kept or not (record and record["finish_reason"] == "stop"
                                   and record["text"].strip()):
                assert after.answer_ids == before.answer_ids
            else:
                text = tokenizer.decode(after.answer_ids, skip_special_tokens=True)
                assert text.strip() == record["text"].strip() or kind == "reasoning"


def test_earlier_turns_are_answered_with_their_own_context(audit):
    """A 3-turn row draws three requests, each ending right after its own question."""
    tokenizer = audit["tokenizer"]
    index = KINDS.index("multi")
    _, example, t = next(drawn(audit, index))
    assert len(example.turns) == 3
    for turn, question in zip(example.turns, (1, 3, 5), strict=True):
        text = tokenizer.decode(turn.prompt_ids)
        assert text.endswith(example.row["messages"][question]["content"]
                             + "<|im_end|>\n<|im_start|>assistant\n")
        assert (turn.key, t) in audit["store"], "every turn of a drawn row is generated"


def test_per_message_flags_and_eos_all_decide_the_turns(audit):
    flags = next(iter(audit["examples"][(KINDS.index("flags"), f"flags-{a}-{b}")]
                      for a, b in NUMBERS[:1]))
    assert [t.position for t in flags.turns] == [2, 6], "the untrained middle turn is context"
    eos = audit["examples"][(KINDS.index("eos_all"), "eos_all-2-3")]
    assert [t.position for t in eos.turns] == [2, 4], "a trailing user turn is not an answer"


def test_tool_call_turns_keep_their_label_and_are_counted(audit):
    tools = audit["examples"][(KINDS.index("tools"), "tools-2-3")]
    assert [(t.position, t.kept) for t in tools.turns] == [(1, KEPT_TOOL_CALL), (3, "")]
    assert audit["stats"]["turns_kept"][KEPT_TOOL_CALL] == 2 * ROWS  # every row, both epochs


def test_regenerated_reasoning_turns_never_keep_the_old_reasoning(audit):
    """The answer's own thinking (or none) goes into the reasoning field, never the data's."""
    index = KINDS.index("reasoning")
    checked = 0
    for row, example, t in drawn(audit, index):
        last = example.turns[-1]
        record = audit["store"][(last.key, t)]
        if not (record["finish_reason"] == "stop" and record["text"].strip()):
            continue
        message = row["messages"][last.position]
        original = example.row["messages"][last.position]["reasoning_content"]
        if "</think>" in record["text"]:
            assert message["reasoning_content"] == record["text"].split("</think>")[0].strip()
        else:
            assert message["reasoning_content"] is None and message["content"] == record["text"]
        assert message["reasoning_content"] != original
        checked += 1
    assert checked > 0


def test_summary_counts_turns_and_fallbacks(audit):
    stats = audit["stats"]
    assert stats["turns"] == sum(len(e.turns) for e in audit["examples"].values()) * 2
    assert stats["turns_regenerated"] + stats["turns_label_drawn"] + sum(
        stats["turns_kept"].values()) + stats["fallback_empty"] + stats["fallback_truncated"] \
        == stats["turns"]


def test_the_run_ends_with_a_summary_of_stages_turns_and_the_report_command(audit, formats_run):
    workdir, _, output = formats_run
    summary = (workdir / "out" / "tms" / "summary.md").read_text()
    assert "tms run summary" in output and summary.splitlines()[0] in output
    for stage in ("data", "harvest", "draws", "regenerate", "mixture", "student"):
        assert f"| {stage} |" in summary
    assert f"{audit['stats']['turns_regenerated']} regenerated" in summary
    assert "Answers generated per checkpoint: 1: " in summary
    assert f"tms report {workdir / 'out'}" in summary
