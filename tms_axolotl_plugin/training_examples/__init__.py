"""Training examples as Axolotl sees them: raw rows, their trained turns, and rewriting.

Each row is tokenized by the same prompt strategy Axolotl builds for its `datasets:` entry, and
every turn Axolotl trains on becomes a `Turn` (see `turns`): its prompt is every token before
it, so a checkpoint answers exactly what the trainer sees at that point of the conversation,
chat template, system prompt and generation prompt included. Regenerated answers go back into
a copy of the raw row (see `write_back`), which the same strategy tokenizes again for the
student, so masking and packing work as in plain SFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tms_axolotl_plugin.errors import TMSConfigError
from tms_axolotl_plugin.files import write_jsonl_atomic
from tms_axolotl_plugin.training_examples.turns import (
    IGNORE_INDEX,
    FindTurnRecorder,
    Turn,
    find_turns,
    keep_only_last,
)
from tms_axolotl_plugin.training_examples.write_back import (
    AnswerSlots,
    answer_slots,
    with_answers,
)

__all__ = ["IGNORE_INDEX", "SOURCE_KEYS", "AnswerSlots", "TrainingExample", "Turn",
           "answer_slots", "answer_slots_for", "dataset_entry_for", "load_source",
           "load_training_examples",
           "tokenize_row", "tokenize_with_turns", "tokenizing_strategy", "with_answers", "write_rows"]

# Keys of a dataset entry that say where the data comes from; the rest say how to tokenize it.
SOURCE_KEYS = ("path", "name", "data_files", "revision", "split", "ds_type", "shards",
               "shards_idx", "weight", "preprocess_shards", "trust_remote_code")


@dataclass
class TrainingExample:
    dataset_index: int  # which entry of `datasets:`
    row: dict[str, Any]  # the raw row, as loaded
    turns: list[Turn] = field(default_factory=list)  # every trained turn, in order
    num_tokens: int = 0  # the row's length as Axolotl tokenizes it

    @property
    def usable(self) -> bool:
        """Axolotl trains something in it after a prompt."""
        return bool(self.turns)

    def answer_caps(self, sequence_len: int) -> dict[Turn, int]:
        """The turns a checkpoint answers, each with the most tokens its answer may have so
        that the row, every such turn replaced, still fits `sequence_len` (Axolotl would drop
        a longer row): the row's free room is shared equally between them."""
        open_turns = [t for t in self.turns if not t.kept]
        if not open_turns:
            return {}
        share = (sequence_len - self.num_tokens) // len(open_turns)
        caps = {t: len(t.answer_ids) + share for t in open_turns}
        return {t: cap for t, cap in caps.items()
                if cap >= 1 and len(t.prompt_ids) < sequence_len}

    def answerable_turns(self, sequence_len: int) -> list[Turn]:
        """The turns a checkpoint answers: not kept, with room for an answer in the row."""
        return list(self.answer_caps(sequence_len))


def load_source(ds_cfg: Any, cfg: Any):
    """One `datasets:` entry's rows as a (memory-mapped) `datasets.Dataset`, loaded by
    Axolotl's own loader (local, hub, cloud)."""
    from axolotl.utils.data.shared import load_dataset_with_config
    from datasets import DatasetDict, IterableDatasetDict

    dataset = load_dataset_with_config(ds_cfg, cfg.hf_use_auth_token, streaming=False)
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        split = ds_cfg.get("split") or "train"
        if split not in dataset:
            raise TMSConfigError(f"dataset {ds_cfg.get('path')!r} has no split {split!r}")
        dataset = dataset[split]
    return dataset


def load_raw_rows(ds_cfg: Any, cfg: Any) -> list[dict[str, Any]]:
    return [dict(row) for row in load_source(ds_cfg, cfg)]


def tokenizing_strategy(ds_cfg: Any, tokenizer: Any, cfg: Any):
    """The same prompt-tokenizing strategy Axolotl builds for this dataset entry."""
    from axolotl.prompt_strategies import load as load_strategy

    ds_type = ds_cfg.get("type")
    if hasattr(ds_type, "items"):  # a user-defined format given inline, as Axolotl loads it
        return load_strategy("user_defined", tokenizer, cfg, dict(ds_type))
    strategy = load_strategy(ds_type, tokenizer, cfg, ds_cfg)
    if strategy is None and isinstance(ds_type, str) and ds_type.split(":")[0] == "alpaca":
        from axolotl.prompt_tokenizers import AlpacaPromptTokenizingStrategy
        from axolotl.prompters import AlpacaPrompter

        style = ds_type.split(":")[1] if ":" in ds_type else None
        strategy = AlpacaPromptTokenizingStrategy(
            AlpacaPrompter(style), tokenizer, cfg.train_on_inputs, cfg.sequence_len
        )
    if strategy is None:
        raise TMSConfigError(f"Axolotl has no prompt strategy for type {ds_cfg.get('type')!r}")
    return strategy


def tokenize_row(strategy: Any, row: dict[str, Any]) -> dict[str, list[int]]:
    if getattr(strategy, "supports_batched", False):
        batch = strategy.tokenize_prompt({key: [value] for key, value in row.items()})
        return {key: values[0] for key, values in batch.items()}
    return strategy.tokenize_prompt(row)


def tokenize_with_turns(strategy: Any, row: dict[str, Any]) -> tuple[list[int], list[Turn]]:
    """The row's token ids as Axolotl tokenizes it, and its trained turns (the boundaries the
    strategy found while tokenizing are reused)."""
    with FindTurnRecorder(strategy) as recorder:
        tokens = tokenize_row(strategy, row)
    return list(tokens["input_ids"]), find_turns(strategy, row, tokens, recorder.found)


def load_training_examples(cfg: Any, tokenizer: Any, turns: str = "all") -> list[TrainingExample]:
    """Every row of every `datasets:` entry, with its trained turns (`turns: last`: only the
    last one is regenerated, the others keep their label), in memory: for small data and
    tests (the pipeline tokenizes into an on-disk `ExampleTable`)."""
    examples: list[TrainingExample] = []
    for index, ds_cfg in enumerate(cfg.datasets):
        strategy = tokenizing_strategy(ds_cfg, tokenizer, cfg)
        keep = getattr(strategy, "filter_rows", None)
        for row in load_raw_rows(ds_cfg, cfg):
            example = TrainingExample(index, row)
            if keep is None or keep(row):
                input_ids, found = tokenize_with_turns(strategy, row)
                example.turns = keep_only_last(found) if turns == "last" else found
                example.num_tokens = len(input_ids)
            examples.append(example)
    return examples


def answer_slots_for(cfg: Any, tokenizer: Any) -> list[AnswerSlots]:
    """Where answers go back, per `datasets:` entry."""
    return [answer_slots(tokenizing_strategy(d, tokenizer, cfg), d) for d in cfg.datasets]


def dataset_entry_for(ds_cfg: Any, data_file: Path) -> dict[str, Any]:
    """A `datasets:` entry that tokenizes `data_file` exactly as `ds_cfg` tokenizes its source."""
    entry = {k: v for k, v in dict(ds_cfg).items() if k not in SOURCE_KEYS and v is not None}
    entry.update({"path": str(data_file), "ds_type": "json", "split": "train"})
    return entry


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    write_jsonl_atomic(path, rows, ensure_ascii=False, default=str)
