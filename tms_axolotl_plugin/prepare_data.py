"""MATH or GSM8K from the Hugging Face Hub as the JSONL files the example configs read.

    python -m tms_axolotl_plugin.prepare_data math  --out data/math
    python -m tms_axolotl_plugin.prepare_data gsm8k --out data/gsm8k

Run it once on a machine with Hub access (it uses the `datasets` library). For each split
(train, test) it writes:

- `<split>.jsonl`: `{"messages": [user, assistant], "answer", ...}` for SFT and TMS
  (`type: chat_template`; the assistant turn is the reference solution, verbatim);
- `<split>_grpo.jsonl`: `{"prompt": [user], "answer"}` for GRPO: TRL samples answers to
  `prompt` and hands `answer` (the final answer alone) to the reward function.

Both files hold the same problems in the same order with the same user turn, so SFT, TMS,
iterative SFT and GRPO train on the same data. The hub columns cannot be read directly: MATH
(`problem`/`solution`) and GSM8K (`question`/`answer`) are two flat columns, and the plugin
needs a `chat_template` (messages) or `alpaca` dataset to know where the answer sits.

Sources: MATH is `DigitalLearningGmbH/MATH-lighteval` (config `default`: all 7 subjects, the
original 7,500 train / 5,000 test split, columns problem/level/type/solution; the copy verl's
math recipes and lighteval read). `EleutherAI/hendrycks_math` holds the same data as one
config per subject. GSM8K is `openai/gsm8k`, config `main` (7,473 train / 1,319 test).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tms_axolotl_plugin.files import write_jsonl_atomic
from tms_axolotl_plugin.rewards import extract_answer, last_boxed, normalize_answer

# Qwen2.5's own chain-of-thought instruction for math: GRPO's reward reads the \boxed answer.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SPLITS = ("train", "test")


@dataclass(frozen=True)
class HubSource:
    path: str
    name: str
    convert: Callable[[dict[str, Any]], dict[str, Any] | None]


def math_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """A MATH row as a chat example; None when its solution has no \\boxed answer."""
    answer = last_boxed(row["solution"])
    if answer is None or not answer.strip():
        return None
    return {
        "messages": [
            {"role": "user", "content": f"{row['problem'].strip()}\n\n{MATH_INSTRUCTION}"},
            {"role": "assistant", "content": row["solution"].strip()},
        ],
        "answer": answer.strip(),
        "level": row.get("level"),
        "subject": row.get("type"),
    }


def gsm8k_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """A GSM8K row as a chat example (solution verbatim, as in the CPU demo's data)."""
    solution = row["answer"]
    if "####" not in solution:
        return None
    answer = extract_answer(solution)
    if answer is None:
        return None
    return {
        "messages": [
            {"role": "user", "content": row["question"].strip()},
            {"role": "assistant", "content": solution.strip()},
        ],
        "answer": normalize_answer(answer),  # "1,080" -> "1080"
    }


def grpo_row(chat_row: dict[str, Any]) -> dict[str, Any]:
    """The GRPO form of a chat example: the prompt turns (no answer) and the final answer."""
    return {"prompt": chat_row["messages"][:-1], "answer": chat_row["answer"]}


SOURCES = {
    "math": HubSource("DigitalLearningGmbH/MATH-lighteval", "default", math_row),
    "gsm8k": HubSource("openai/gsm8k", "main", gsm8k_row),
}


def convert_rows(name: str, rows: Iterable[dict[str, Any]]) -> tuple[list[dict], int]:
    """Chat examples for dataset `name`, and how many source rows had no final answer."""
    convert = SOURCES[name].convert
    converted, skipped = [], 0
    for row in rows:
        example = convert(row)
        if example is None:
            skipped += 1
        else:
            converted.append(example)
    return converted, skipped


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    # ASCII escapes (json's default): raw U+2028/U+2029 are line breaks to some JSONL readers.
    return write_jsonl_atomic(path, rows)


def load_hub_split(source: HubSource, split: str, revision: str | None) -> Iterator[dict]:
    from datasets import load_dataset

    yield from load_dataset(source.path, source.name, split=split, revision=revision)


def prepare(name: str, out: Path, revision: str | None = None,
            load: Callable[[HubSource, str, str | None], Iterable[dict]] = load_hub_split
            ) -> dict[str, dict[str, int]]:
    """Write `<split>.jsonl` and `<split>_grpo.jsonl` under `out`; returns the row counts."""
    source = SOURCES[name]
    counts = {}
    for split in SPLITS:
        rows, skipped = convert_rows(name, load(source, split, revision))
        write_jsonl(out / f"{split}.jsonl", rows)
        write_jsonl(out / f"{split}_grpo.jsonl", (grpo_row(r) for r in rows))
        counts[split] = {"rows": len(rows), "skipped_without_answer": skipped}
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tms_axolotl_plugin.prepare_data",
        description="Write MATH or GSM8K as chat-message JSONL for the example configs.")
    parser.add_argument("dataset", choices=sorted(SOURCES))
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--revision", default=None, help="hub revision (commit) to pin")
    args = parser.parse_args(argv)
    counts = prepare(args.dataset, args.out, args.revision)
    source = SOURCES[args.dataset]
    print(f"{source.path} ({source.name}) -> {args.out}: {json.dumps(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
