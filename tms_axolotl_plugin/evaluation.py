"""Multiple-choice accuracy by log-likelihood (MMLU-style; `tms/retention_mc_acc` and the
replication bench) and GSM8K answer scoring. Plain functions over a model and tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.offline_assets import extract_final_number
from tms_axolotl_plugin.pld import last_logits

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class MultipleChoice:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


def load_multiple_choice(path: Path, limit: int | None = None) -> list[MultipleChoice]:
    """MMLU-style JSONL rows: `question` (str), `choices` (2-10 str), `answer` (0-based index)."""
    items = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise TMSError(f"{where}: not valid JSON ({error})") from None
        question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise TMSError(f"{where}: `question` must be a non-empty string")
        if not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS)
                and all(isinstance(c, str) for c in choices)):
            raise TMSError(f"{where}: `choices` must be a list of 2 to {len(LETTERS)} strings")
        if not isinstance(answer, int) or isinstance(answer, bool) \
                or not 0 <= answer < len(choices):
            raise TMSError(f"{where}: `answer` must be the index (0..{len(choices) - 1}) of "
                           f"the correct choice, got {answer!r}")
        items.append(MultipleChoice(question, tuple(choices), answer))
        if limit and len(items) == limit:
            break
    if not items:
        raise TMSError(f"{path} holds no multiple-choice questions")
    return items


def multiple_choice_prompt(item: MultipleChoice) -> str:
    lines = [item.question.strip(), ""]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices)]
    lines += ["", "Answer with the letter of the correct choice."]
    return "\n".join(lines)


def letter_token_ids(tokenizer, count: int) -> list[int]:
    """The single token each answer letter is written as at the start of the reply."""
    ids = []
    for letter in LETTERS[:count]:
        tokens = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"letter {letter!r} is not a single token for this tokenizer")
        ids.append(tokens[0])
    return ids


def multiple_choice_accuracy(model, tokenizer, items: list[MultipleChoice],
                             batch_size: int = 8) -> float:
    """Share of questions whose correct letter gets the highest next-token log-likelihood
    right after the assistant turn opens (the letters compete, nothing is generated)."""
    import torch

    if not items:
        raise ValueError("multiple_choice_accuracy needs at least one question")
    device = next(model.parameters()).device
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": multiple_choice_prompt(item)}],
        add_generation_prompt=True, tokenize=True, return_dict=False) for item in items]
    correct = 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch, ids = items[start : start + batch_size], prompts[start : start + batch_size]
            width = max(len(p) for p in ids)
            input_ids = torch.zeros((len(ids), width), dtype=torch.long)
            attention = torch.zeros((len(ids), width), dtype=torch.long)
            for row, prompt in enumerate(ids):  # left-pad so the last position is the reply's
                input_ids[row, width - len(prompt):] = torch.tensor(prompt)
                attention[row, width - len(prompt):] = 1
            position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
            inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
                      "position_ids": position_ids.to(device)}
            logits = last_logits(model, 1, **inputs)[:, -1]
            for row, item in enumerate(batch):
                letters = letter_token_ids(tokenizer, len(item.choices))
                correct += int(int(logits[row, letters].argmax()) == item.answer)
    if was_training:
        model.train()
    return correct / len(items)


def answer_is_correct(completion: str, reference: str) -> bool:
    """GSM8K scoring: the completion's final number equals the reference's."""
    predicted = extract_final_number(completion)
    return predicted is not None and predicted == extract_final_number(reference)
