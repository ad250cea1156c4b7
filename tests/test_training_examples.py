"""Training examples through Axolotl's real prompt strategies (training_examples.py): the prompt a
checkpoint answers is exactly what the trainer sees before the answer, and a regenerated answer
goes back into the row where Axolotl will train on it."""

from __future__ import annotations

import json

import pytest

from conftest import base_config, write_config
from tms_axolotl_plugin.training_examples import (
    IGNORE_INDEX,
    answer_slots_for,
    load_training_examples,
    tokenize_row,
    tokenizing_strategy,
    with_answers,
)
from tms_axolotl_plugin.training_examples.turns import (
    KEPT_NOT_LAST,
    KEPT_TOOL_CALL,
    find_turns,
    keep_only_last,
    last_span_turn,
    trained_spans,
)
from tms_axolotl_plugin.training_examples.write_back import split_reasoning

PLUGIN = "tms_axolotl_plugin.TMSPlugin"
MASK = IGNORE_INDEX

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5"},
    {"instruction": "Say hello in French.", "input": "", "output": "Bonjour !"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load_axolotl(tmp_path, model_dir, dataset, **dataset_overrides):
    """cfg and tokenizer exactly as `axolotl train` builds them from a YAML with the plugin."""
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer

    raw = base_config(model_dir, dataset, tmp_path / "out")
    raw["datasets"][0].update(dataset_overrides)
    raw["plugins"] = [PLUGIN]
    raw["tms"] = {"num_checkpoints": 2}
    cfg = load_cfg(str(write_config(tmp_path / "cfg.yml", raw)))
    return cfg, load_tokenizer(cfg)


@pytest.fixture
def chat(tmp_path, tiny_model_dir, small_chat_dataset):
    rows = [json.loads(line) for line in small_chat_dataset.read_text().splitlines()[:6]]
    data = write_jsonl(tmp_path / "chat.jsonl", rows + [MULTI_TURN])
    cfg, tokenizer = load_axolotl(tmp_path, tiny_model_dir, data)
    return cfg, tokenizer, load_training_examples(cfg, tokenizer)


@pytest.fixture
def alpaca(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    cfg, tokenizer = load_axolotl(tmp_path, tiny_model_dir, data, type="alpaca")
    return cfg, tokenizer, load_training_examples(cfg, tokenizer)


def chat_prompt_ids(tokenizer, messages) -> tuple[int, ...]:
    return tuple(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=False))


def retokenized(cfg, tokenizer, row, index=0):
    """The turns Axolotl's same strategy finds in a (rewritten) row, and its trained text."""
    strategy = tokenizing_strategy(cfg.datasets[index], tokenizer, cfg)
    tokens = tokenize_row(strategy, row)
    trained = [i for i, label in zip(tokens["input_ids"], tokens["labels"], strict=True)
               if label != MASK]
    return find_turns(strategy, row, tokens), tokenizer.decode(trained)


# ---- chat_template ------------------------------------------------------------------------


def test_every_chat_row_becomes_one_usable_example_in_file_order(chat):
    _, _, examples = chat
    assert len(examples) == 7
    assert all(e.usable and e.dataset_index == 0 for e in examples)
    # the raw row as loaded (the JSON loader gives it the other rows' columns as None)
    assert examples[-1].row["messages"] == MULTI_TURN["messages"]


def test_chat_prompt_is_the_rendered_conversation_up_to_the_generation_prompt(chat):
    _, tokenizer, examples = chat
    for example in examples:
        messages = example.row["messages"]
        turn = example.turns[-1]
        assert turn.prompt_ids == chat_prompt_ids(tokenizer, messages[:-1])
        text = tokenizer.decode(turn.prompt_ids)
        assert text.endswith(f"<|im_start|>user\n{messages[-2]['content']}<|im_end|>\n"
                             "<|im_start|>assistant\n")


def test_chat_prompt_keeps_the_template_default_system_prompt(chat):
    _, tokenizer, examples = chat
    text = tokenizer.decode(examples[0].turns[0].prompt_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_chat_answer_is_the_assistant_content_and_the_end_of_turn_token(chat):
    _, tokenizer, examples = chat
    for example in examples:
        content = example.row["messages"][-1]["content"]
        assert tokenizer.decode(example.turns[-1].answer_ids) == content + "<|im_end|>"


def test_every_trained_assistant_turn_is_a_turn_with_the_conversation_up_to_it(chat):
    _, tokenizer, examples = chat
    multi = examples[-1]
    assert [t.position for t in multi.turns] == [2, 4] and not any(t.kept for t in multi.turns)
    first, last = multi.turns
    assert first.prompt_ids == chat_prompt_ids(tokenizer, MULTI_TURN["messages"][:2])
    assert tokenizer.decode(first.answer_ids) == "Hello!<|im_end|>"
    assert tokenizer.decode(last.prompt_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(last.answer_ids) == "4<|im_end|>"


def test_identical_prompts_share_a_key_and_different_prompts_do_not(chat):
    _, _, examples = chat
    keys = [t.key for e in examples for t in e.turns]
    assert len(set(keys)) == len(keys)
    again = type(examples[0].turns[0])(0, examples[0].turns[0].prompt_ids, (1,))
    assert again.key == examples[0].turns[0].key


def test_with_answers_replaces_exactly_the_given_turns(chat):
    cfg, tokenizer, examples = chat
    (slots,) = answer_slots_for(cfg, tokenizer)
    original = json.loads(json.dumps(examples[-1].row))
    rewritten = with_answers(slots, examples[-1].row, {2: "Hey.", 4: "Four."})
    assert examples[-1].row == original, "the source row is not modified"
    assert [m["content"] for m in rewritten["messages"]] == [
        "Be brief.", "Hi", "Hey.", "What is 2+2?", "Four."
    ]
    assert [m["role"] for m in rewritten["messages"]] == [m["role"] for m in original["messages"]]
    assert {k: v for k, v in rewritten.items() if k != "messages"} == {
        k: v for k, v in original.items() if k != "messages"
    }


def test_rewritten_chat_row_trains_on_the_new_answers_after_the_same_prompts(chat):
    cfg, tokenizer, examples = chat
    (slots,) = answer_slots_for(cfg, tokenizer)
    example = examples[-1]
    row = with_answers(slots, example.row, {2: "Hey there.", 4: "A regenerated answer.\n#### 4"})
    turns, trained = retokenized(cfg, tokenizer, row)
    assert trained == "Hey there.<|im_end|>A regenerated answer.\n#### 4<|im_end|>"
    assert turns[0].prompt_ids == example.turns[0].prompt_ids
    # the second turn's context now holds the first turn's new answer
    assert tokenizer.decode(turns[1].prompt_ids).endswith(
        "assistant\nHey there.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_custom_field_and_role_mappings_and_legacy_keys_find_and_replace_the_turn(
        tmp_path, tiny_model_dir):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    data = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    for keys in ({"message_property_mappings": {"role": "from", "content": "value"}},
                 {"message_field_role": "from", "message_field_content": "value"}):
        cfg, tokenizer = load_axolotl(tmp_path, tiny_model_dir, data,
                                      field_messages="conversations", **keys)
        (example,) = load_training_examples(cfg, tokenizer)
        (turn,) = example.turns
        assert tokenizer.decode(turn.prompt_ids).endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                          "<|im_start|>assistant\n")
        assert tokenizer.decode(turn.answer_ids) == "Yo<|im_end|>"
        (slots,) = answer_slots_for(cfg, tokenizer)
        assert with_answers(slots, example.row, {turn.position: "Hello there"}) == {
            "conversations": [{"from": "human", "value": "Hi"},
                              {"from": "gpt", "value": "Hello there"}]}


def test_per_message_training_flags_decide_which_turns_are_turns(tmp_path, tiny_model_dir):
    messages = [dict(m) for m in MULTI_TURN["messages"]]
    messages[4]["train"] = False  # the last assistant turn is not trained
    data = write_jsonl(tmp_path / "flags.jsonl", [{"messages": messages}])
    cfg, tokenizer = load_axolotl(tmp_path, tiny_model_dir, data, message_field_training="train")
    (example,) = load_training_examples(cfg, tokenizer)
    assert [t.position for t in example.turns] == [2]
    (slots,) = answer_slots_for(cfg, tokenizer)
    row = with_answers(slots, example.row, {2: "Hey."})
    assert row["messages"][4] == messages[4], "the untrained turn is never written"
    _, trained = retokenized(cfg, tokenizer, row)
    assert trained == "Hey.<|im_end|>"


def test_train_on_eos_all_with_a_trailing_user_turn_keeps_the_assistant_turns_as_answers(
        tmp_path, tiny_model_dir):
    messages = MULTI_TURN["messages"] + [{"role": "user", "content": "Thanks!"}]
    data = write_jsonl(tmp_path / "eos.jsonl", [{"messages": messages}])
    cfg, tokenizer = load_axolotl(tmp_path, tiny_model_dir, data, train_on_eos="all")
    (example,) = load_training_examples(cfg, tokenizer)
    assert [t.position for t in example.turns] == [2, 4]
    assert [tokenizer.decode(t.answer_ids) for t in example.turns] == [
        "Hello!<|im_end|>", "4<|im_end|>"]
    assert tokenizer.decode(example.turns[1].prompt_ids).endswith("<|im_start|>assistant\n")


def test_tool_call_turns_are_kept_and_the_text_reply_after_the_tool_is_a_turn(
        tmp_path, tiny_model_dir):
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny."}]
    tools = [{"type": "function", "function": {"name": "weather", "description": "forecast",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    data = write_jsonl(tmp_path / "tools.jsonl", [{"messages": messages, "tools": tools}])
    cfg, tokenizer = load_axolotl(tmp_path, tiny_model_dir, data, chat_template="qwen3")
    (example,) = load_training_examples(cfg, tokenizer)
    assert [(t.position, t.kept) for t in example.turns] == [(1, KEPT_TOOL_CALL), (3, "")]
    assert "<tool_response>" in tokenizer.decode(example.turns[1].prompt_ids)


def test_reasoning_is_split_back_into_the_field_the_template_renders(tmp_path, tiny_model_dir):
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "reasoning_content": "two and two", "content": "4"}]
    data = write_jsonl(tmp_path / "think.jsonl", [{"messages": messages}])
    cfg, tokenizer = load_axolotl(tmp_path, tiny_model_dir, data, chat_template="qwen3")
    (example,) = load_training_examples(cfg, tokenizer)
    (turn,) = example.turns
    # the template opens the thinking block: the checkpoint answers inside it
    assert tokenizer.decode(turn.prompt_ids).endswith("<|im_start|>assistant\n<think>\n")
    assert tokenizer.decode(turn.answer_ids) == "two and two\n</think>\n\n4<|im_end|>"
    (slots,) = answer_slots_for(cfg, tokenizer)
    answer = "add them: four\n</think>\n\nThe answer is 4."
    row = with_answers(slots, example.row, {1: answer})
    assert row["messages"][1] == {"role": "assistant", "reasoning_content": "add them: four",
                                  "content": "The answer is 4."}
    (again,), trained = retokenized(cfg, tokenizer, row)
    assert again.prompt_ids == turn.prompt_ids
    assert trained == answer + "<|im_end|>", "the student trains on exactly the answer"


def test_split_thinking_rows_keep_the_tags_in_the_content(tmp_path, tiny_model_dir):
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>two and two</think>4"}]
    data = write_jsonl(tmp_path / "split.jsonl", [{"messages": messages}])
    cfg, tokenizer = load_axolotl(tmp_path, tiny_model_dir, data, chat_template="qwen3",
                                  split_thinking=True)
    (example,) = load_training_examples(cfg, tokenizer)
    (slots,) = answer_slots_for(cfg, tokenizer)
    answer = "add them\n</think>\n\nIt is 4."
    row = with_answers(slots, example.row, {1: answer})
    assert row["messages"][1]["content"] == "<think>" + answer
    (again,), trained = retokenized(cfg, tokenizer, row)
    assert again.prompt_ids == example.turns[0].prompt_ids
    assert trained == "add them\n</think>\n\nIt is 4.<|im_end|>"


def test_a_reasoning_field_the_template_ignores_is_cleared_on_rewrite(chat):
    cfg, tokenizer, _ = chat
    (slots,) = answer_slots_for(cfg, tokenizer)  # ChatML: no reasoning in the template
    row = {"messages": [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Yo", "reasoning_content": "old"}]}
    assert with_answers(slots, row, {1: "Hello"})["messages"][1] == {
        "role": "assistant", "content": "Hello", "reasoning_content": None}


@pytest.mark.parametrize("text,expected", [
    ("plain reply", (None, "plain reply")),
    ("<think>a</think>b", ("a", "b")),
    ("a\n</think>\n\nb", ("a", "b")),  # the prompt opened the block
    ("<reasoning> x </reasoning>\ny", ("x", "y")),
])
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


def test_turns_last_keeps_only_the_last_open_turn_regenerable():
    from tms_axolotl_plugin.training_examples import Turn

    turns = [Turn(1, (1,), (2,)), Turn(3, (1, 2), (3,)), Turn(5, (1, 2, 3), (4,), KEPT_TOOL_CALL)]
    assert [t.kept for t in keep_only_last(turns)] == [KEPT_NOT_LAST, "", KEPT_TOOL_CALL]


# ---- input_output -------------------------------------------------------------------------


def test_input_output_trained_segments_are_turns_written_back_in_place(tmp_path, tiny_model_dir):
    segments = [{"label": False, "text": "Q: hi\nA:"}, {"label": True, "text": " hello</s>"},
                {"label": False, "text": "\nQ: bye\nA:"}, {"label": True, "text": " ciao"}]
    data = write_jsonl(tmp_path / "io.jsonl", [{"segments": segments}])
    cfg, tokenizer = load_axolotl(tmp_path, tiny_model_dir, data, type="input_output")
    (example,) = load_training_examples(cfg, tokenizer)
    assert [t.position for t in example.turns] == [1, 3]
    assert tokenizer.decode(example.turns[1].prompt_ids) == "Q: hi\nA: hello</s>\nQ: bye\nA:"
    (slots,) = answer_slots_for(cfg, tokenizer)
    row = with_answers(slots, example.row, {1: " hey", 3: " adieu"})
    assert [s["text"] for s in row["segments"]] == ["Q: hi\nA:", " hey", "\nQ: bye\nA:",
                                                    " adieu"]
    _, trained = retokenized(cfg, tokenizer, row)
    assert trained == " hey adieu"


# ---- alpaca -------------------------------------------------------------------------------


def test_alpaca_prompt_ends_at_the_response_header_and_answer_is_the_output(alpaca):
    _, tokenizer, examples = alpaca
    assert len(examples) == 2 and all(len(e.turns) == 1 for e in examples)
    with_input, without_input = (tokenizer.decode(e.turns[0].prompt_ids) for e in examples)
    assert with_input.endswith(
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    assert without_input.endswith("### Instruction:\nSay hello in French.\n\n### Response:\n")
    assert "### Input:" not in without_input
    for example, row in zip(examples, ALPACA_ROWS, strict=True):
        assert tokenizer.decode(example.turns[0].answer_ids) == row["output"] + tokenizer.eos_token


def test_alpaca_with_answers_replaces_output_and_trains_on_it(alpaca):
    cfg, tokenizer, examples = alpaca
    (slots,) = answer_slots_for(cfg, tokenizer)
    rewritten = with_answers(slots, examples[0].row, {0: "Five."})
    assert rewritten == {**ALPACA_ROWS[0], "output": "Five."}
    assert examples[0].row == ALPACA_ROWS[0]
    (turn,), trained = retokenized(cfg, tokenizer, rewritten)
    assert turn.prompt_ids == examples[0].turns[0].prompt_ids
    assert trained == "Five." + tokenizer.eos_token


def test_dict_format_type_writes_the_answer_into_its_output_field(tmp_path, tiny_model_dir):
    rows = [{"q": "Capital of France?", "a": "Paris."}]
    data = write_jsonl(tmp_path / "custom.jsonl", rows)
    cfg, tokenizer = load_axolotl(tmp_path, tiny_model_dir, data, type={
        "field_instruction": "q", "field_output": "a",
        "format": "Question: {instruction}\nAnswer: ", "no_input_format": "Question: "
        "{instruction}\nAnswer: "})
    (example,) = load_training_examples(cfg, tokenizer)
    (turn,) = example.turns
    assert tokenizer.decode(turn.prompt_ids).endswith("Question: Capital of France?\nAnswer: ")
    (slots,) = answer_slots_for(cfg, tokenizer)
    row = with_answers(slots, example.row, {0: "Lyon."})
    assert row == {"q": "Capital of France?", "a": "Lyon."}
    (again,), trained = retokenized(cfg, tokenizer, row)
    assert again.prompt_ids == turn.prompt_ids and trained.startswith("Lyon.")


# ---- unsupported types --------------------------------------------------------------------


def test_unsupported_dataset_type_is_rejected_naming_the_type(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "Once upon a time"}])
    with pytest.raises(Exception, match=r"datasets\[0\]\.type"):
        load_axolotl(tmp_path, tiny_model_dir, data, type="completion")


# ---- trained spans on hand-made labels -----------------------------------------------------


def test_trained_spans_are_the_maximal_runs_of_trained_labels():
    assert trained_spans([MASK, 5, 6, MASK, MASK, 9, MASK, 1]) == [(1, 3), (5, 6), (7, 8)]
    assert trained_spans([MASK, MASK]) == [] and trained_spans([]) == []


def test_single_field_answer_is_the_last_trained_span_after_a_prompt():
    ids = [10, 11, 12, 13, 14, 15]
    (turn,) = last_span_turn(ids, [MASK, MASK, MASK, 13, 14, 15])
    assert (turn.prompt_ids, turn.answer_ids) == ((10, 11, 12), (13, 14, 15))
    assert last_span_turn([1, 2, 3], [MASK, MASK, MASK]) == []
    assert last_span_turn([1, 2, 3], [1, 2, 3]) == [], "trained from the first token: no prompt"


def test_answer_caps_share_the_rows_free_room_so_the_rewritten_row_still_fits():
    from tms_axolotl_plugin.training_examples import TrainingExample, Turn

    first, second = Turn(2, (1,) * 10, (5,) * 6), Turn(4, (1,) * 20, (6,) * 4)
    tool = Turn(6, (1,) * 28, (7,) * 3, KEPT_TOOL_CALL)
    example = TrainingExample(0, {}, [first, second, tool], num_tokens=32)
    assert example.answer_caps(40) == {first: 6 + 4, second: 4 + 4}, "8 free tokens, 2 turns"
    assert example.answer_caps(32) == {first: 6, second: 4}, "no slack: at most as long"
    assert example.answer_caps(26) == {first: 3, second: 1}, "an over-long row gets shorter"
    assert example.answer_caps(22) == {first: 1}, "no room left for the second answer"
    assert example.answerable_turns(22) == [first]


@pytest.mark.parametrize("row,overrides,position", [
    ({"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Yo"}]}, {}, 1),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Yo"}]}, {"drop_system_message": True}, 2),
    ({"messages": json.dumps([{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Yo"}])}, {}, 1),
], ids=["system_field", "drop_system_message", "json_string_messages"])
def test_turn_positions_are_message_indices_whatever_the_system_handling(
        tmp_path, tiny_model_dir, row, overrides, position):
    data = write_jsonl(tmp_path / "sys.jsonl", [row])
    cfg, tokenizer = load_axolotl(tmp_path, tiny_model_dir, data, **overrides)
    (example,) = load_training_examples(cfg, tokenizer)
    (turn,) = example.turns
    assert turn.position == position
    (slots,) = answer_slots_for(cfg, tokenizer)
    rewritten = with_answers(slots, example.row, {position: "Hello"})
    messages = rewritten["messages"]
    messages = json.loads(messages) if isinstance(messages, str) else messages
    assert messages[position]["content"] == "Hello"
    (again,), trained = retokenized(cfg, tokenizer, rewritten)
    assert again.prompt_ids == turn.prompt_ids and trained == "Hello<|im_end|>"
