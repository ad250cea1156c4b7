"""Training examples through Axolotl's real prompt strategies (training_examples.py): the prompt a
checkpoint answers is exactly what the trainer sees before the answer, and a regenerated answer
goes back into the row where Axolotl will train on it."""

from __future__ import annotations

import json

import pytest

from conftest import base_config, write_config
from tms_axolotl_plugin.errors import TMSConfigError
from tms_axolotl_plugin.training_examples import (
    IGNORE_INDEX,
    check_supported,
    load_training_examples,
    split_prompt_and_answer,
    tokenize_row,
    tokenizing_strategy,
    with_answer,
)

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


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


# ---- chat_template ------------------------------------------------------------------------


def test_every_chat_row_becomes_one_usable_example_in_file_order(chat):
    cfg, _, examples = chat
    assert len(examples) == 7
    assert all(e.usable and e.dataset_index == 0 for e in examples)
    # the raw row as loaded (the JSON loader gives it the other rows' columns as None)
    assert examples[-1].row["messages"] == MULTI_TURN["messages"]


def test_chat_prompt_is_the_rendered_conversation_up_to_the_generation_prompt(chat):
    _, tokenizer, examples = chat
    for example in examples:
        messages = example.row["messages"]
        assert example.prompt_ids == chat_prompt_ids(tokenizer, messages[:-1])
        text = tokenizer.decode(example.prompt_ids)
        assert text.endswith(f"<|im_start|>user\n{messages[-2]['content']}<|im_end|>\n"
                             "<|im_start|>assistant\n")


def test_chat_prompt_keeps_the_template_default_system_prompt(chat):
    _, tokenizer, examples = chat
    text = tokenizer.decode(examples[0].prompt_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_chat_answer_is_the_assistant_content_and_the_end_of_turn_token(chat):
    _, tokenizer, examples = chat
    for example in examples:
        content = example.row["messages"][-1]["content"]
        assert tokenizer.decode(example.answer_ids) == content + "<|im_end|>"


def test_multi_turn_prompt_includes_earlier_assistant_turns(chat):
    _, tokenizer, examples = chat
    text = tokenizer.decode(examples[-1].prompt_ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(examples[-1].answer_ids) == "4<|im_end|>"


def test_identical_prompts_share_a_key_and_different_prompts_do_not(chat):
    _, _, examples = chat
    keys = [e.key for e in examples]
    assert len(set(keys)) == len(keys)
    again = type(examples[0])(0, {}, list(examples[0].prompt_ids), [1])
    assert again.key == examples[0].key


def test_with_answer_replaces_only_the_last_assistant_message(chat):
    cfg, _, examples = chat
    original = json.loads(json.dumps(examples[-1].row))
    rewritten = with_answer(cfg.datasets[0], examples[-1].row, "Four.")
    assert examples[-1].row == original, "the source row is not modified"
    assert [m["content"] for m in rewritten["messages"]] == [
        "Be brief.", "Hi", "Hello!", "What is 2+2?", "Four."
    ]
    assert [m["role"] for m in rewritten["messages"]] == [m["role"] for m in original["messages"]]
    assert {k: v for k, v in rewritten.items() if k != "messages"} == {
        k: v for k, v in original.items() if k != "messages"
    }


def test_rewritten_chat_row_trains_on_the_new_answer_after_the_same_prompt(chat):
    cfg, tokenizer, examples = chat
    strategy = tokenizing_strategy(cfg.datasets[0], tokenizer, cfg)
    for example in (examples[0], examples[-1]):
        row = with_answer(cfg.datasets[0], example.row, "A regenerated answer.\n#### 42")
        tokens = tokenize_row(strategy, row)
        prompt, answer = split_prompt_and_answer(tokens["input_ids"], tokens["labels"])
        assert prompt == example.prompt_ids
        assert tokenizer.decode(answer) == "A regenerated answer.\n#### 42<|im_end|>"
        # other columns of the row (GSM8K's question/final_answer) are carried along unchanged
        assert {k: v for k, v in row.items() if k != "messages"} == {
            k: v for k, v in example.row.items() if k != "messages"
        }


def test_with_answer_follows_custom_field_and_role_mappings(tmp_path, tiny_model_dir):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]
    data = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    cfg, tokenizer = load_axolotl(
        tmp_path, tiny_model_dir, data,
        field_messages="conversations",
        message_property_mappings={"role": "from", "content": "value"},
        roles={"user": ["human"], "assistant": ["gpt"]},
    )
    (example,) = load_training_examples(cfg, tokenizer)
    assert tokenizer.decode(example.prompt_ids).endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                        "<|im_start|>assistant\n")
    assert tokenizer.decode(example.answer_ids) == "Yo<|im_end|>"
    rewritten = with_answer(cfg.datasets[0], example.row, "Hello there")
    assert rewritten == {"conversations": [{"from": "human", "value": "Hi"},
                                           {"from": "gpt", "value": "Hello there"}]}


# ---- alpaca -------------------------------------------------------------------------------


def test_alpaca_prompt_ends_at_the_response_header_and_answer_is_the_output(alpaca):
    _, tokenizer, examples = alpaca
    assert len(examples) == 2 and all(e.usable for e in examples)
    with_input, without_input = (tokenizer.decode(e.prompt_ids) for e in examples)
    assert with_input.endswith(
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    assert without_input.endswith("### Instruction:\nSay hello in French.\n\n### Response:\n")
    assert "### Input:" not in without_input
    for example, row in zip(examples, ALPACA_ROWS, strict=True):
        assert tokenizer.decode(example.answer_ids) == row["output"] + tokenizer.eos_token


def test_alpaca_with_answer_replaces_output_and_trains_on_it(alpaca):
    cfg, tokenizer, examples = alpaca
    rewritten = with_answer(cfg.datasets[0], examples[0].row, "Five.")
    assert rewritten == {**ALPACA_ROWS[0], "output": "Five."}
    assert examples[0].row == ALPACA_ROWS[0]
    tokens = tokenize_row(tokenizing_strategy(cfg.datasets[0], tokenizer, cfg), rewritten)
    prompt, answer = split_prompt_and_answer(tokens["input_ids"], tokens["labels"])
    assert prompt == examples[0].prompt_ids
    assert tokenizer.decode(answer) == "Five." + tokenizer.eos_token


# ---- unsupported types --------------------------------------------------------------------


def test_unsupported_dataset_type_raises_naming_the_type(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "Once upon a time"}])
    cfg, tokenizer = load_axolotl(tmp_path, tiny_model_dir, data, type="completion")
    with pytest.raises(TMSConfigError, match=r"datasets\[0\]\.type is 'completion'"):
        load_training_examples(cfg, tokenizer)


@pytest.mark.parametrize("ds_type", ["completion", "pretrain", "alpaca_chat.load_qa", None])
def test_check_supported_rejects_types_without_a_known_answer_field(ds_type):
    with pytest.raises(TMSConfigError, match="chat_template, alpaca"):
        check_supported([{"type": "chat_template"}, {"type": ds_type}])


@pytest.mark.parametrize("ds_type", ["chat_template", "alpaca", "alpaca:chatml"])
def test_check_supported_accepts_chat_template_and_alpaca(ds_type):
    check_supported([{"type": ds_type}])


# ---- split_prompt_and_answer on hand-made labels -------------------------------------------


def test_split_takes_everything_before_the_trained_span_as_prompt():
    ids = [10, 11, 12, 13, 14, 15]
    labels = [MASK, MASK, MASK, 13, 14, 15]
    assert split_prompt_and_answer(ids, labels) == ([10, 11, 12], [13, 14, 15])


def test_split_picks_the_last_trained_span_of_a_multi_turn_conversation():
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    labels = [MASK, MASK, 3, 4, MASK, MASK, MASK, 8, 9, MASK]  # two turns, trailing "\n" masked
    prompt, answer = split_prompt_and_answer(ids, labels)
    assert prompt == [1, 2, 3, 4, 5, 6, 7]  # the earlier trained turn is part of the prompt
    assert answer == [8, 9]


def test_split_of_all_masked_labels_is_empty():
    assert split_prompt_and_answer([1, 2, 3], [MASK, MASK, MASK]) == ([], [])
    assert split_prompt_and_answer([], []) == ([], [])


def test_split_of_fully_trained_sequence_is_empty_because_there_is_no_prompt():
    assert split_prompt_and_answer([1, 2, 3], [1, 2, 3]) == ([], [])


def test_split_with_a_trained_first_token_and_a_later_turn_keeps_the_later_turn():
    ids = [1, 2, 3, 4, 5]
    labels = [1, MASK, MASK, 4, 5]
    assert split_prompt_and_answer(ids, labels) == ([1, 2, 3], [4, 5])
