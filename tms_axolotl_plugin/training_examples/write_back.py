"""Putting regenerated answers back into a copy of a raw row, where the same strategy trains them.

`AnswerSlots` says, per `datasets:` entry, where a turn's answer lives in a row: a message of
the conversation (chat_template), a segment (input_output), or one field (alpaca family). For
chat rows with reasoning, an answer is split back into the fields the row uses, so that the
student's tokenization of it is what the template makes of a real reply with that reasoning:
- the template renders reasoning from a message field (`reasoning_content`, `field_thinking`):
  the answer's thinking block goes to that field, the rest to the content;
- `split_thinking: true`: the content keeps the tags and Axolotl splits them, as for the data;
- the template renders no reasoning: the whole answer is the content, and a stale reasoning
  field of the replaced message is cleared.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

# The thinking delimiters Axolotl's `split_thinking` recognises.
THINKING_TAGS = (("<think>", "</think>"), ("<reasoning>", "</reasoning>"),
                 ("<|begin_of_thought|>", "<|end_of_thought|>"))


@dataclass(frozen=True)
class AnswerSlots:
    kind: str  # "chat", "segments" or "field"
    field: str  # the messages field, "segments", or the answer field
    content_key: str = "content"
    reasoning_key: str | None = None  # the message field the template renders reasoning from
    clear_key: str | None = None  # a reasoning field the template ignores: cleared on rewrite
    split_thinking: bool = False
    eos_token: str | None = None  # input_output: kept at the end of a segment that had it


def answer_slots(strategy: Any, ds_cfg: Any) -> AnswerSlots:
    """Where answers go in rows of the dataset entry this strategy tokenizes."""
    from axolotl.prompt_strategies.chat_template import ChatTemplateStrategy
    from axolotl.prompt_strategies.input_output import RawInputOutputStrategy

    if isinstance(strategy, ChatTemplateStrategy):
        prompter = strategy.prompter
        mappings = prompter.message_property_mappings
        think = prompter.template_thinking_key
        field = mappings.get(think) or prompter.field_thinking or think
        rendered = think in prompter.chat_template_msg_variables
        return AnswerSlots("chat", prompter.field_messages, mappings.get("content", "content"),
                           reasoning_key=field if rendered and not strategy.split_thinking
                           else None,
                           clear_key=None if rendered else field,
                           split_thinking=bool(strategy.split_thinking))
    if isinstance(strategy, RawInputOutputStrategy):
        return AnswerSlots("segments", "segments", eos_token=strategy.eos_token)
    from tms_axolotl_plugin.dataset_support import answer_field

    return AnswerSlots("field", answer_field(ds_cfg))


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(thinking, reply) of a generated answer; the prompt may already have opened the block."""
    for opening, closing in THINKING_TAGS:
        if closing in text:
            head, _, tail = text.partition(closing)
            if opening in head:
                head = head.split(opening, 1)[1]
            return head.strip(), tail.lstrip()
    return None, text


def with_opening_tag(text: str) -> str:
    """A thinking block opened by the prompt, closed by the answer: give it its opening tag."""
    for opening, closing in THINKING_TAGS:
        if closing in text and opening not in text.split(closing, 1)[0]:
            return opening + text
    return text


def with_answers(slots: AnswerSlots, row: dict[str, Any], answers: dict[int, str]) -> dict:
    """A copy of `row` whose turns at the given positions hold the given answers."""
    row = copy.deepcopy(row)
    if not answers:
        return row
    if slots.kind == "field":
        (text,) = answers.values()
        row[slots.field] = text
        return row
    items = row.get(slots.field)
    as_json = isinstance(items, str)  # some datasets store the conversation as a JSON string
    if as_json:
        items = json.loads(items)
    for position, text in answers.items():
        item = items[position]
        if slots.kind == "segments":
            had_eos = bool(slots.eos_token) and item["text"].endswith(slots.eos_token)
            item["text"] = text + (slots.eos_token if had_eos else "")
            continue
        if slots.split_thinking:
            item[slots.content_key] = with_opening_tag(text)
        elif slots.reasoning_key:
            reasoning, reply = split_reasoning(text)
            item[slots.reasoning_key] = reasoning
            item[slots.content_key] = reply
        else:
            item[slots.content_key] = text
            if slots.clear_key and item.get(slots.clear_key) is not None:
                item[slots.clear_key] = None
    row[slots.field] = json.dumps(items, ensure_ascii=False) if as_json else items
    return row
