"""Replication-bench evaluation: multiple-choice log-likelihood accuracy and GSM8K scoring."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.evaluation import (
    MultipleChoice,
    answer_is_correct,
    letter_token_ids,
    load_multiple_choice,
    multiple_choice_accuracy,
    multiple_choice_prompt,
)
from tms_axolotl_plugin.offline_assets import mmlu_stem_jsonl


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def mmlu_items(count: int) -> list[MultipleChoice]:
    rows = [json.loads(line) for line in mmlu_stem_jsonl().read_text().splitlines()[:count]]
    return [MultipleChoice(r["question"], tuple(r["choices"]), r["answer"]) for r in rows]


def predicted_letter_alone(model, tokenizer, item: MultipleChoice) -> int:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": multiple_choice_prompt(item)}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return int(logits[letter_token_ids(tokenizer, len(item.choices))].argmax())


def test_batched_left_padded_accuracy_equals_scoring_each_question_alone(tiny):
    model, tokenizer = tiny
    items = mmlu_items(12)
    predictions = [predicted_letter_alone(model, tokenizer, item) for item in items]
    # Make the expected accuracy informative: mark every other prediction as the answer.
    relabelled = [MultipleChoice(item.question, item.choices,
                                 p if i % 2 == 0 else (p + 1) % len(item.choices))
                  for i, (item, p) in enumerate(zip(items, predictions))]
    assert multiple_choice_accuracy(model, tokenizer, relabelled, batch_size=5) == 0.5


def test_prompt_lists_lettered_choices():
    prompt = multiple_choice_prompt(MultipleChoice("What is 2+2?", ("3", "4"), 1))
    assert "A. 3\nB. 4" in prompt and prompt.startswith("What is 2+2?")


@pytest.mark.parametrize("completion, reference, correct", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18", True),
    ("The answer is 1,080.", "1080", True),
    ("So the total is 17.", "18", False),
    ("I do not know.", "18", False),
])
def test_gsm8k_answer_scoring(completion, reference, correct):
    assert answer_is_correct(completion, reference) is correct


def test_multiple_choice_file_loads_with_a_cap(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(mmlu_stem_jsonl().read_text().splitlines()[:5]) + "\n\n")
    items = load_multiple_choice(path, limit=3)
    assert len(items) == 3 and all(0 <= item.answer < len(item.choices) for item in items)


@pytest.mark.parametrize("row, message", [
    ('{"question": "Q?", "choices": ["a", "b"], "answer": 2}', "`answer` must be the index"),
    ('{"question": "Q?", "choices": ["a"], "answer": 0}', "`choices` must be a list of 2 to 10"),
    ('{"choices": ["a", "b"], "answer": 0}', "`question` must be a non-empty string"),
    ('{"question": "Q?", "choices": ["a", "b"], "answer": true}', "`answer` must be the index"),
    ("not json", "not valid JSON"),
])
def test_bad_multiple_choice_rows_name_the_line_and_the_problem(tmp_path, row, message):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"question": "ok?", "choices": ["a", "b"], "answer": 1}\n' + row + "\n")
    with pytest.raises(TMSError, match=f"line 2: {message}"):
        load_multiple_choice(path)
