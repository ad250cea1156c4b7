"""The trained turns of a row, found in Axolotl's own tokenization of it.

A turn is one answer Axolotl trains on: a span of trained tokens (labels != -100) with
everything before it as the prompt. Where it sits in the row comes from the prompt strategy's
own boundaries, never from re-deriving a template:
- chat_template: the strategy's conversation thread and `find_turn` (the same calls its
  tokenizer makes), so roles, per-message training flags, `train_on_eos`/`train_on_eot`,
  system-prompt handling and reasoning rendering are Axolotl's decisions;
- input_output: the strategy tokenizes segment by segment, so each trained segment is a turn;
- single-field types (the alpaca family): the last trained span is the answer field.

A trained turn that TMS must not rewrite is still listed, with the reason in `kept`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from tms_axolotl_plugin.fingerprint import fingerprint

IGNORE_INDEX = -100

KEPT_NOT_ASSISTANT = "not an assistant turn"  # e.g. `roles_to_train: [user, assistant]`
KEPT_TOOL_CALL = "tool call"  # TMS answers in text; a call's arguments are not regenerated
KEPT_TRAINING_DETAIL = "training detail"  # only part of the turn is trained
KEPT_NOT_LAST = "tms.turns: last"


@dataclass(frozen=True)
class Turn:
    position: int  # where the answer goes back: message index, segment index, 0 for a field
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]  # the original label's trained tokens
    kept: str = ""  # non-empty: this trained turn keeps its label in every draw, and why

    @property
    def key(self) -> str:
        """Identity of the prompt: identical prompts share a key (and so a checkpoint's answer)."""
        return fingerprint(list(self.prompt_ids))


def trained_spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of trained labels."""
    spans, start = [], None
    for index, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = index
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, index))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans


def last_span_turn(input_ids: list[int], labels: list[int]) -> list[Turn]:
    """Single-field types: the last trained span is the answer, everything before the prompt."""
    spans = trained_spans(labels)
    if not spans or spans[0][0] == 0:
        return []  # nothing trained, or trained from the first token: no prompt
    start, end = spans[-1]
    return [Turn(0, tuple(input_ids[:start]), tuple(input_ids[start:end]))]


def segment_turns(strategy: Any, row: dict, input_ids: list[int], labels: list[int]) -> list[Turn]:
    """input_output: the strategy tokenizes each segment on its own; trained ones are turns."""
    turns, offset = [], 0
    for index, segment in enumerate(row.get("segments") or []):
        ids = strategy.tokenizer(segment["text"], add_special_tokens=False)["input_ids"]
        if input_ids[offset : offset + len(ids)] != list(ids):
            raise ValueError("input_output segments do not tokenize to the row's input_ids")
        if ids and offset > 0 and labels[offset] != IGNORE_INDEX:
            turns.append(Turn(index, tuple(input_ids[:offset]), tuple(ids)))
        offset += len(ids)
    return turns


class FindTurnRecorder:
    """Keeps the turn boundaries the strategy's own `find_turn` calls give while it tokenizes a
    row, so that the turns need not be located a second time (that doubled the data stage's
    cost). A turn located with `content_only` (trained in detail) is located again as a whole."""

    def __init__(self, strategy: Any):
        self.strategy = strategy
        self.found: dict[int, tuple[int, int] | None] = {}

    def __enter__(self) -> Self:
        original = getattr(self.strategy, "find_turn", None)
        if original is None:  # not a chat strategy: nothing to record
            return self

        def recording(*args, **kwargs):
            start_end = original(*args, **kwargs)
            index = kwargs.get("turn_idx", args[1] if len(args) > 1 else None)
            if index is not None:
                self.found[index] = None if kwargs.get("content_only") else start_end
            return start_end

        self.strategy.find_turn = recording  # on this instance only
        return self

    def __exit__(self, *_) -> None:
        self.strategy.__dict__.pop("find_turn", None)


def chat_turns(strategy: Any, row: dict, input_ids: list[int], labels: list[int],
               found: dict[int, tuple[int, int] | None] | None = None) -> list[Turn]:
    """chat_template: every turn with trained tokens, located by the strategy's `find_turn`.
    `found`: what `FindTurnRecorder` kept while the strategy tokenized the row; a turn it never
    located is one the strategy does not train (it locates every turn it may train)."""
    from axolotl.utils.dict import remove_none_values

    prompt = remove_none_values(row)
    thread = strategy.get_conversation_thread(prompt)
    messages = strategy._get_messages(prompt)
    tools = strategy._get_tools(prompt)
    # The thread may gain a system turn from the row's system field, or drop one.
    first = strategy.transform_message(messages[0]) if messages else {}
    prepended = int(first.get("role") != "system" and strategy.prompter.field_system in prompt)
    dropped = len(messages) + prepended - len(thread)
    locator = None
    turns = []
    for index, turn in enumerate(thread):
        if found and index not in found:
            continue
        if found and found[index] is not None:
            start, end = found[index]
        else:
            if locator is None:
                locator = strategy._build_turn_locator(thread, tools, input_ids)
            start, end = strategy.find_turn(turns=thread, turn_idx=index, tools=tools,
                                            locator=locator)
        if start == -1 or start == 0:
            continue
        if all(label == IGNORE_INDEX for label in labels[start:end]):
            continue  # an untrained turn (role, per-message flag): it never changes
        # The end-of-turn/EOS tokens Axolotl trains sit within 3 tokens after the content.
        after = [i for i in range(end, min(end + 4, len(labels))) if labels[i] != IGNORE_INDEX]
        stop = after[-1] + 1 if after else end
        kept = ""
        if turn.get("role") != "assistant":
            kept = KEPT_NOT_ASSISTANT
        elif turn.get("tool_calls"):
            kept = KEPT_TOOL_CALL
        elif turn.get("training_detail") or turn.get("reasoning_training_detail"):
            kept = KEPT_TRAINING_DETAIL
        position = index + dropped - prepended
        if not 0 <= position < len(messages):
            continue  # the system field's turn: not in the messages, never regenerated
        turns.append(Turn(position, tuple(input_ids[:start]), tuple(input_ids[start:stop]),
                          kept))
    return turns


def find_turns(strategy: Any, row: dict, tokens: dict[str, list[int]],
               found: dict[int, tuple[int, int] | None] | None = None) -> list[Turn]:
    """Every trained turn of `row`, in order, for the strategy that tokenized it (`found`: see
    `chat_turns`)."""
    from axolotl.prompt_strategies.chat_template import ChatTemplateStrategy
    from axolotl.prompt_strategies.input_output import RawInputOutputStrategy

    input_ids, labels = list(tokens["input_ids"]), list(tokens["labels"])
    if isinstance(strategy, ChatTemplateStrategy):
        return chat_turns(strategy, row, input_ids, labels, found)
    if isinstance(strategy, RawInputOutputStrategy):
        return segment_turns(strategy, row, input_ids, labels)
    return last_span_turn(input_ids, labels)


def keep_only_last(turns: list[Turn]) -> list[Turn]:
    """`tms.turns: last`: only the last regenerable turn is regenerated."""
    open_turns = [i for i, turn in enumerate(turns) if not turn.kept]
    if not open_turns:
        return turns
    last = open_turns[-1]
    return [t if i == last or t.kept else Turn(t.position, t.prompt_ids, t.answer_ids,
                                              KEPT_NOT_LAST)
            for i, t in enumerate(turns)]
