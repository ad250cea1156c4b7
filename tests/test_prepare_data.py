"""prepare_data.py: hub rows (MATH problem/solution, GSM8K question/answer) become chat examples
the plugin can train on and GRPO prompts with the same user turn; no hub access here."""

from __future__ import annotations

import json

import pytest

from conftest import base_config, write_config
from tms_axolotl_plugin.prepare_data import (
    MATH_INSTRUCTION,
    SOURCES,
    convert_rows,
    grpo_row,
    gsm8k_row,
    main,
    math_row,
    prepare,
)
from tms_axolotl_plugin.rewards import score_answer

MATH_ROW = {  # a MATH training row as the hub serves it
    "problem": "What is the value of $\\sqrt{36 \\times \\sqrt{16}}$?",
    "level": "Level 1",
    "type": "Prealgebra",
    "solution": "Calculating from the inside out, $$\\sqrt{36 \\times \\sqrt{16}} = \\sqrt{36 "
                "\\times 4} = \\sqrt{144} = \\boxed{12}.$$",
}
MATH_EMPTY_BOX = {**MATH_ROW, "solution": "so there are $\\boxed{}$ primes in that range."}
GSM8K_ROW = {  # a GSM8K training row as the hub serves it
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                "many clips in May. How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
              "<<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


def test_sources_are_the_documented_hub_datasets():
    assert (SOURCES["math"].path, SOURCES["math"].name) == \
        ("DigitalLearningGmbH/MATH-lighteval", "default")
    assert (SOURCES["gsm8k"].path, SOURCES["gsm8k"].name) == ("openai/gsm8k", "main")


def test_math_row_becomes_a_chat_example_with_its_boxed_answer():
    row = math_row(MATH_ROW)
    user, assistant = row["messages"]
    assert user == {"role": "user", "content": f"{MATH_ROW['problem']}\n\n{MATH_INSTRUCTION}"}
    assert assistant == {"role": "assistant", "content": MATH_ROW["solution"]}
    assert row["answer"] == "12"
    assert (row["level"], row["subject"]) == ("Level 1", "Prealgebra")
    assert score_answer(assistant["content"], row["answer"]) == 1.0


def test_gsm8k_row_keeps_the_solution_and_extracts_the_number():
    row = gsm8k_row(GSM8K_ROW)
    assert row["messages"] == [
        {"role": "user", "content": GSM8K_ROW["question"]},
        {"role": "assistant", "content": GSM8K_ROW["answer"]},
    ]
    assert row["answer"] == "72"
    assert gsm8k_row({"question": "q", "answer": "Total: 1,080 apples.\n#### 1,080"})["answer"] \
        == "1080"


def test_rows_without_a_final_answer_are_skipped_and_counted():
    rows, skipped = convert_rows("math", [MATH_ROW, MATH_EMPTY_BOX, MATH_ROW])
    assert len(rows) == 2 and skipped == 1
    rows, skipped = convert_rows("gsm8k", [GSM8K_ROW, {"question": "q", "answer": "no marker"}])
    assert len(rows) == 1 and skipped == 1


def test_grpo_row_is_the_prompt_without_the_answer():
    chat = math_row(MATH_ROW)
    assert grpo_row(chat) == {"prompt": [chat["messages"][0]], "answer": "12"}


def test_prepare_writes_chat_and_grpo_files_for_both_splits(tmp_path):
    def fake_hub(source, split, revision):
        assert (source.path, revision) == ("openai/gsm8k", "abc123")
        return [GSM8K_ROW] * (3 if split == "train" else 2)

    counts = prepare("gsm8k", tmp_path, revision="abc123", load=fake_hub)
    assert counts == {"train": {"rows": 3, "skipped_without_answer": 0},
                      "test": {"rows": 2, "skipped_without_answer": 0}}
    chat = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    grpo = [json.loads(line) for line in (tmp_path / "train_grpo.jsonl").read_text().splitlines()]
    assert len(chat) == len(grpo) == 3
    assert grpo[0]["prompt"] == chat[0]["messages"][:1] and grpo[0]["answer"] == "72"
    assert len((tmp_path / "test_grpo.jsonl").read_text().splitlines()) == 2


def test_cli_rejects_unknown_datasets(capsys):
    with pytest.raises(SystemExit):
        main(["mmlu", "--out", "x"])
    assert "invalid choice" in capsys.readouterr().err


def test_prepared_rows_split_into_prompt_and_answer_for_the_plugin(tmp_path, tiny_model_dir):
    """The plugin finds the prompt a checkpoint answers and the label in prepared rows."""
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer

    from tms_axolotl_plugin.training_examples import load_training_examples

    rows, _ = convert_rows("math", [MATH_ROW])
    gsm, _ = convert_rows("gsm8k", [GSM8K_ROW])
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + gsm))
    raw = base_config(tiny_model_dir, data, tmp_path / "out")
    raw.update(plugins=["tms_axolotl_plugin.TMSPlugin"], tms={"num_checkpoints": 2},
               train_on_inputs=False)
    cfg = load_cfg(str(write_config(tmp_path / "cfg.yml", raw)))
    tokenizer = load_tokenizer(cfg)
    examples = load_training_examples(cfg, tokenizer)
    assert [e.usable for e in examples] == [True, True]
    for example, row in zip(examples, rows + gsm, strict=True):
        (turn,) = example.turns
        prompt = tokenizer.decode(turn.prompt_ids)
        answer = tokenizer.decode(turn.answer_ids)
        assert row["messages"][0]["content"] in prompt
        assert row["messages"][1]["content"] in answer and row["messages"][1]["content"] not in prompt
