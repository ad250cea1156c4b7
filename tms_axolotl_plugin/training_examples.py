"""Training examples as Axolotl sees them: raw rows, the exact prompt tokens, and rewriting.

The prompt a checkpoint answers is taken from Axolotl's own tokenization of the row: every
token before the last trained span (labels != -100). So the generator sees exactly what the
trainer sees, chat template, system prompt and generation prompt included. A regenerated answer
is put back into a copy of the raw row, which Axolotl's same prompt strategy tokenizes again
for the student, so masking and packing work as in plain SFT.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tms_axolotl_plugin.errors import TMSConfigError
from tms_axolotl_plugin.files import write_jsonl_atomic
from tms_axolotl_plugin.fingerprint import fingerprint

SUPPORTED_TYPES = ("chat_template", "alpaca")
IGNORE_INDEX = -100
# Keys of a dataset entry that say where the data comes from; the rest say how to tokenize it.
SOURCE_KEYS = ("path", "name", "data_files", "revision", "split", "ds_type", "shards",
               "shards_idx", "weight", "preprocess_shards", "trust_remote_code")


@dataclass
class TrainingExample:
    dataset_index: int  # which entry of `datasets:`
    row: dict[str, Any]  # the raw row, as loaded
    prompt_ids: list[int] = field(default_factory=list)
    answer_ids: list[int] = field(default_factory=list)  # the original label's trained tokens

    @property
    def usable(self) -> bool:
        return bool(self.prompt_ids) and bool(self.answer_ids)

    def can_regenerate(self, sequence_len: int) -> bool:
        """A checkpoint can answer it: it has a separable prompt that leaves room for tokens."""
        return self.usable and len(self.prompt_ids) < sequence_len

    @property
    def key(self) -> str:
        """Identity of the prompt: identical prompts share a key (and so a checkpoint's answer)."""
        return fingerprint(self.prompt_ids)


def base_type(ds_cfg: Any) -> str:
    ds_type = ds_cfg.get("type")
    if not isinstance(ds_type, str):
        return repr(ds_type)
    return ds_type.split(":")[0].split(".")[0]


def check_supported(datasets: list[Any]) -> None:
    for index, ds_cfg in enumerate(datasets or []):
        kind = base_type(ds_cfg)
        if kind not in SUPPORTED_TYPES:
            raise TMSConfigError(
                f"datasets[{index}].type is {ds_cfg.get('type')!r}; TMS can regenerate answers "
                f"only for types {', '.join(SUPPORTED_TYPES)} (it must know where the answer "
                "sits in a row). Convert the data to one of these types."
            )
        for key in ("shards", "weight"):
            if ds_cfg.get(key) not in (None, 1, 1.0):
                raise TMSConfigError(
                    f"datasets[{index}].{key} is not supported with `tms:`; subsample the data "
                    "file instead"
                )


def load_raw_rows(ds_cfg: Any, cfg: Any) -> list[dict[str, Any]]:
    """The rows of one `datasets:` entry, loaded by Axolotl's own loader (local, hub, cloud)."""
    from axolotl.utils.data.shared import load_dataset_with_config
    from datasets import DatasetDict, IterableDatasetDict

    dataset = load_dataset_with_config(ds_cfg, cfg.hf_use_auth_token, streaming=False)
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        split = ds_cfg.get("split") or "train"
        if split not in dataset:
            raise TMSConfigError(f"dataset {ds_cfg.get('path')!r} has no split {split!r}")
        dataset = dataset[split]
    return [dict(row) for row in dataset]


def tokenizing_strategy(ds_cfg: Any, tokenizer: Any, cfg: Any):
    """The same prompt-tokenizing strategy Axolotl builds for this dataset entry."""
    from axolotl.prompt_strategies import load as load_strategy

    strategy = load_strategy(ds_cfg.get("type"), tokenizer, cfg, ds_cfg)
    if strategy is None and base_type(ds_cfg) == "alpaca":
        from axolotl.prompt_tokenizers import AlpacaPromptTokenizingStrategy
        from axolotl.prompters import AlpacaPrompter

        style = ds_cfg.get("type").split(":")[1] if ":" in ds_cfg.get("type") else None
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


def split_prompt_and_answer(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Prompt = every token before the last trained span; answer = that span's trained tokens."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not trained or trained[0] == 0 and len(trained) == len(labels):
        return [], []  # nothing trained, or everything trained (train_on_inputs): no prompt
    end = trained[-1]
    start = end
    while start - 1 >= 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(input_ids[:start]), list(labels[start : end + 1])


def load_training_examples(cfg: Any, tokenizer: Any) -> list[TrainingExample]:
    """Every row of every `datasets:` entry, with its prompt and answer tokens."""
    check_supported(cfg.datasets)
    examples: list[TrainingExample] = []
    for index, ds_cfg in enumerate(cfg.datasets):
        strategy = tokenizing_strategy(ds_cfg, tokenizer, cfg)
        keep = getattr(strategy, "filter_rows", None)
        for row in load_raw_rows(ds_cfg, cfg):
            example = TrainingExample(index, row)
            if keep is None or keep(row):
                tokens = tokenize_row(strategy, row)
                example.prompt_ids, example.answer_ids = split_prompt_and_answer(
                    tokens["input_ids"], tokens["labels"]
                )
            examples.append(example)
    return examples


def with_answer(ds_cfg: Any, row: dict[str, Any], answer: str) -> dict[str, Any]:
    """A copy of `row` whose trained answer is replaced by `answer`."""
    row = copy.deepcopy(row)
    if base_type(ds_cfg) == "alpaca":
        row["output"] = answer
        return row
    field_messages = ds_cfg.get("field_messages") or "messages"
    mapping = ds_cfg.get("message_property_mappings") or {}
    role_key = mapping.get("role") or ds_cfg.get("message_field_role") or "role"
    content_key = mapping.get("content") or ds_cfg.get("message_field_content") or "content"
    trained_roles = set(ds_cfg.get("roles_to_train") or ["assistant"])
    aliases = ds_cfg.get("roles") or {"assistant": ["assistant", "gpt"]}
    for role, sources in aliases.items():
        if role in trained_roles:
            trained_roles.update(sources)
    messages = row.get(field_messages)
    if isinstance(messages, str):  # some datasets store the conversation as a JSON string
        messages = json.loads(messages)
    for message in reversed(messages or []):
        if message.get(role_key) in trained_roles:
            message[content_key] = answer
            row[field_messages] = messages
            return row
    raise ValueError(f"row has no message with a trained role ({sorted(trained_roles)})")


def dataset_entry_for(ds_cfg: Any, data_file: Path) -> dict[str, Any]:
    """A `datasets:` entry that tokenizes `data_file` exactly as `ds_cfg` tokenizes its source."""
    entry = {k: v for k, v in dict(ds_cfg).items() if k not in SOURCE_KEYS and v is not None}
    entry.update({"path": str(data_file), "ds_type": "json", "split": "train"})
    return entry


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    write_jsonl_atomic(path, rows, ensure_ascii=False, default=str)
