"""LabelStore: the regenerated answers, one JSON line per (prompt, checkpoint).

Append-only files, one per writer rank, flushed and fsynced per batch, so a run killed in the
middle of regeneration keeps every finished item and a restart generates only the rest. A
half-written last line (the kill landed mid-write) is dropped when the file is reopened.
The exact sampling parameters the answers were drawn with are kept next to them
(`sampling.json`); answers drawn with other parameters are never mixed into the same store.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.files import write_text_atomic

SAMPLING_RECORD = "sampling.json"

@dataclass(frozen=True)
class GeneratedLabel:
    prompt_key: str  # digest of the prompt token ids
    checkpoint: int  # 1..T
    text: str
    finish_reason: str  # "stop" (ended with EOS) or "length" (hit the token cap)
    num_tokens: int  # generated tokens, EOS included
    prompt_tokens: int

    @property
    def usable(self) -> bool:
        """Reward-free hygiene: empty or truncated answers are not used as labels."""
        return self.finish_reason == "stop" and bool(self.text.strip())


class LabelStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def record_sampling(self, params: dict[str, Any]) -> None:
        """Keep the sampling parameters of this store's answers; refuse different ones. Every
        rank may call it: they write the same record."""
        path = self.directory / SAMPLING_RECORD
        text = json.dumps(params, sort_keys=True, indent=1) + "\n"
        if path.exists():
            recorded = json.loads(path.read_text())
            if recorded != json.loads(text):
                raise TMSError(
                    f"the label store {self.directory} holds answers sampled with {recorded}, "
                    f"not with {params}; answers of different sampling settings are never "
                    "mixed. Use another output_dir, or delete that directory to regenerate.")
            return
        if any(self.directory.glob("labels-rank*.jsonl")):
            raise TMSError(
                f"the label store {self.directory} holds answers without a record of their "
                f"sampling settings ({SAMPLING_RECORD}: written by an older version, which let "
                "the checkpoint's generation_config change them); delete that directory to "
                "regenerate.")
        write_text_atomic(path, text)

    def _shard(self, rank: int) -> Path:
        return self.directory / f"labels-rank{rank}.jsonl"

    def load(self) -> dict[tuple[str, int], GeneratedLabel]:
        """Every complete record from every shard, keyed by (prompt_key, checkpoint)."""
        labels: dict[tuple[str, int], GeneratedLabel] = {}
        for shard in sorted(self.directory.glob("labels-rank*.jsonl")):
            # Bytes split on "\n" only: splitlines() also breaks at U+2028 etc. (json.dumps
            # leaves them unescaped), and a kill can cut a UTF-8 character in the tail. The
            # unterminated tail is skipped: the next append cuts it.
            for line in shard.read_bytes().split(b"\n")[:-1]:
                try:
                    record = GeneratedLabel(**json.loads(line))
                except (ValueError, TypeError):
                    continue  # the torn tail of a killed writer
                labels.setdefault((record.prompt_key, record.checkpoint), record)
        return labels

    def append(self, rank: int, records: list[GeneratedLabel]) -> None:
        if not records:
            return
        shard = self._shard(rank)
        _drop_torn_tail(shard)
        with open(shard, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _drop_torn_tail(path: Path) -> None:
    """Cut a file back to its last newline, so appends never glue onto a partial record."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data.endswith(b"\n"):
            return
        handle.truncate(data.rfind(b"\n") + 1)
