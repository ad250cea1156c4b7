"""The data stage's result on disk: every row and its trained turns, tokenized once per run.

`build_example_table` tokenizes the rows of every `datasets:` entry in parallel (`datasets.map`
over `dataset_num_proc` processes, as Axolotl preprocesses its own data) into Arrow files in a
directory named by the data fingerprint; `ExampleTable.open` memory-maps them. Rank 0 builds it
once; the other ranks, later launches and resumes only open it. Columns, one row per raw row, in
`datasets:` order:

    dataset_index  int16          which `datasets:` entry
    row            string         the raw row's `canonical_json` (what the fingerprint hashes)
    input_ids      list<int32>    the row as Axolotl tokenizes it (empty: the strategy drops it)
    num_tokens     int32
    turn_position  list<int32>    per trained turn: where its answer goes back (see `Turn`)
    turn_start     list<int32>    its prompt is input_ids[:start] ...
    turn_stop      list<int32>    ... and its label input_ids[start:stop]
    turn_kept      list<string>   why it keeps its label ("" = regenerated)
    turn_key       list<uint64>   the prompt's key (`Turn.key`, 16 hex digits) as a number

Prompts are prefixes of the row's tokens, so the table holds each token once however many turns
a row has. The table holds every trained turn (`tms.turns: last` is applied when it is opened, so it
does not decide the table). The turns are also kept as flat numpy arrays (`TurnArrays`, a few tens of bytes per
turn) for the vectorised draws and requests; token ids are read from the memory map on demand.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tms_axolotl_plugin.files import write_text_atomic
from tms_axolotl_plugin.fingerprint import canonical_json
from tms_axolotl_plugin.logs import get_logger
from tms_axolotl_plugin.training_examples.turns import KEPT_NOT_LAST, Turn

LOG = get_logger(__name__)

TABLE_FORMAT = 1  # bumped when the columns or their meaning change: older tables are rebuilt
META = "table.json"
MIN_ROWS_PER_PROCESS = 1000  # below this a worker pool costs more than it saves
ROWS_PER_BATCH = 1000
COLUMNS = ("dataset_index", "row", "input_ids", "num_tokens", "turn_position", "turn_start",
           "turn_stop", "turn_kept", "turn_key")


def features():
    from datasets import Features, List, Value

    ints = List(Value("int32"))
    return Features({
        "dataset_index": Value("int16"), "row": Value("string"), "input_ids": ints,
        "num_tokens": Value("int32"), "turn_position": ints, "turn_start": ints,
        "turn_stop": ints, "turn_kept": List(Value("string")),
        "turn_key": List(Value("uint64")),
    })


def rows_of(batch: dict[str, list]) -> list[dict[str, Any]]:
    """A column batch (as datasets gives it) as rows, like iterating the dataset."""
    columns = list(batch)
    return [dict(zip(columns, values, strict=True)) for values in zip(*batch.values(),
                                                                     strict=True)]


def iter_row_texts(dataset, batch_size: int = ROWS_PER_BATCH) -> Iterator[str]:
    """Every row's canonical JSON, streamed in batches."""
    for batch in dataset.iter(batch_size=batch_size):
        for row in rows_of(batch):
            yield canonical_json(row)


class RowTokenizer:
    """The `datasets.map` function: one batch of raw rows in, their table columns out."""

    def __init__(self, strategy: Any, dataset_index: int):
        self.strategy = strategy
        self.dataset_index = dataset_index

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        from tms_axolotl_plugin.training_examples import tokenize_with_turns

        out: dict[str, list] = {name: [] for name in COLUMNS}
        keep = getattr(self.strategy, "filter_rows", None)
        for row in rows_of(batch):
            input_ids: list[int] = []
            found: list[Turn] = []
            if keep is None or keep(row):
                input_ids, found = tokenize_with_turns(self.strategy, row)
            out["dataset_index"].append(self.dataset_index)
            out["row"].append(canonical_json(row))
            out["input_ids"].append(input_ids)
            out["num_tokens"].append(len(input_ids))
            out["turn_position"].append([t.position for t in found])
            out["turn_start"].append([len(t.prompt_ids) for t in found])
            out["turn_stop"].append([len(t.prompt_ids) + len(t.answer_ids) for t in found])
            out["turn_kept"].append([t.kept for t in found])
            out["turn_key"].append(np.asarray([int(t.key, 16) for t in found], dtype=np.uint64))
        return out


@dataclass(frozen=True)
class TurnArrays:
    """Every trained turn of the table, flat, in row order."""

    row: np.ndarray  # int64: the table row of each turn
    position: np.ndarray  # int32
    start: np.ndarray  # int32: prompt length
    stop: np.ndarray  # int32: prompt + label length
    kept_code: np.ndarray  # int8: index into `reasons`
    reasons: tuple[str, ...]  # why a turn keeps its label; "" = it is regenerated
    key: np.ndarray  # uint64
    first: np.ndarray  # int64, one per table row + 1: row r's turns are first[r]:first[r+1]

    @property
    def answer_len(self) -> np.ndarray:
        return self.stop - self.start

    @property
    def open(self) -> np.ndarray:
        """Turns a checkpoint may answer (not kept for a reason)."""
        return np.asarray([r == "" for r in self.reasons], dtype=bool)[self.kept_code] \
            if self.reasons else np.zeros(len(self.key), dtype=bool)

    def kept(self, turn: int) -> str:
        return self.reasons[int(self.kept_code[turn])]

    def of_row(self, row: int) -> range:
        return range(int(self.first[row]), int(self.first[row + 1]))


def key_text(key: int) -> str:
    return format(int(key), "016x")


class ExampleTable:
    """The memory-mapped table of one data fingerprint."""

    def __init__(self, dataset, directory: Path, turns: str = "all"):
        import pyarrow as pa
        import pyarrow.compute as pc

        self.dataset = dataset
        self.directory = directory
        table = dataset.data.table  # memory-mapped
        self.dataset_index = table.column("dataset_index").to_numpy().astype(np.int16)
        self.num_tokens = table.column("num_tokens").to_numpy().astype(np.int64)

        def flat_arrow(name: str):
            column = pc.list_flatten(table.column(name))
            if isinstance(column, pa.ChunkedArray):
                column = (column.combine_chunks() if column.num_chunks
                          else pa.array([], column.type))
            return column

        def flat(name: str, dtype) -> np.ndarray:
            return flat_arrow(name).to_numpy(zero_copy_only=False).astype(dtype, copy=False)

        kept = pc.dictionary_encode(flat_arrow("turn_kept"))
        counts = pc.list_value_length(table.column("turn_start")).to_numpy(
            zero_copy_only=False).astype(np.int64)
        first = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=first[1:])
        row = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        kept_code = kept.indices.to_numpy(zero_copy_only=False).astype(np.int8)
        reasons = tuple(kept.dictionary.to_pylist())
        if turns == "last":
            kept_code, reasons = _keep_only_last(row, kept_code, reasons)
        self.turns = TurnArrays(
            row=row, position=flat("turn_position", np.int32),
            start=flat("turn_start", np.int32), stop=flat("turn_stop", np.int32),
            kept_code=kept_code, reasons=reasons, key=flat("turn_key", np.uint64), first=first)
        self._input_ids = _ListColumn(table.column("input_ids"))
        self._rows = table.column("row")

    @classmethod
    def open(cls, directory: Path, turns: str = "all") -> ExampleTable:
        """`turns: last`: of each row's regenerated turns only the last one stays so."""
        from datasets import Dataset, concatenate_datasets

        meta = json.loads((directory / META).read_text())
        parts = [Dataset.from_file(str(directory / name)) for name in meta["files"]]
        dataset = concatenate_datasets(parts) if len(parts) != 1 else parts[0]
        return cls(dataset, directory, turns)

    def __len__(self) -> int:
        return len(self.num_tokens)

    def input_ids(self, row: int) -> np.ndarray:
        """The row's token ids (a view into the memory map)."""
        return self._input_ids[row]

    def prompt_ids(self, turn: int) -> np.ndarray:
        return self.input_ids(int(self.turns.row[turn]))[: int(self.turns.start[turn])]

    def row_texts(self, start: int, stop: int) -> list[str]:
        """The canonical JSON of rows start..stop-1."""
        return self._rows.slice(start, stop - start).to_pylist()

    def row(self, index: int) -> dict[str, Any]:
        return json.loads(self.row_texts(index, index + 1)[0])

    def turn_objects(self, row: int) -> list[Turn]:
        """The row's turns as `Turn`s, token ids included (for the few rows that need them)."""
        ids = self.input_ids(row)
        t = self.turns
        return [Turn(int(t.position[i]), tuple(ids[: t.start[i]].tolist()),
                     tuple(ids[t.start[i]: t.stop[i]].tolist()), t.kept(i))
                for i in t.of_row(row)]


def _keep_only_last(row: np.ndarray, kept_code: np.ndarray, reasons: tuple[str, ...]):
    """`keep_only_last` on flat arrays: every open turn but the last of its row is kept."""
    if "" not in reasons:
        return kept_code, reasons
    open_turns = np.flatnonzero(kept_code == reasons.index(""))
    last = np.ones(len(open_turns), dtype=bool)
    last[:-1] = row[open_turns[1:]] != row[open_turns[:-1]]
    if KEPT_NOT_LAST not in reasons:
        reasons = (*reasons, KEPT_NOT_LAST)
    kept_code = kept_code.copy()
    kept_code[open_turns[~last]] = reasons.index(KEPT_NOT_LAST)
    return kept_code, reasons


class _ListColumn:
    """Row access into a chunked list<int32> column without copying it."""

    def __init__(self, column):
        self.values, self.offsets, starts = [], [], [0]
        for chunk in column.chunks:
            self.values.append(chunk.values.to_numpy(zero_copy_only=False))
            self.offsets.append(chunk.offsets.to_numpy())
            starts.append(starts[-1] + len(chunk))
        self.starts = np.asarray(starts, dtype=np.int64)

    def __getitem__(self, row: int) -> np.ndarray:
        chunk = int(np.searchsorted(self.starts, row, side="right")) - 1
        local = row - int(self.starts[chunk])
        offsets = self.offsets[chunk]
        return self.values[chunk][offsets[local]: offsets[local + 1]]


def table_processes(cfg: Any, rows: int) -> int:
    wanted = int(cfg.get("dataset_num_proc") or cfg.get("dataset_processes") or os.cpu_count()
                 or 1)
    return max(1, min(wanted, rows // MIN_ROWS_PER_PROCESS))


def build_example_table(directory: Path, sources: list, strategies: list,
                        cfg: Any) -> list[str]:
    """Tokenize every source into a new table at `directory` (published whole, by rename);
    returns its files. Open it with `ExampleTable.open`."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir(parents=True)
    try:
        files = []
        for index, (source, strategy) in enumerate(zip(sources, strategies, strict=True)):
            processes = table_processes(cfg, len(source))
            mapped = source.map(
                RowTokenizer(strategy, index), batched=True,
                batch_size=ROWS_PER_BATCH, num_proc=processes if processes > 1 else None,
                remove_columns=source.column_names, features=features(),
                cache_file_name=str(staging / f"dataset-{index}.arrow"),
                load_from_cache_file=False, new_fingerprint=f"tms-{directory.name}-{index}",
                desc=f"tms tokenize datasets[{index}] ({processes} process(es))")
            files += [Path(f["filename"]).name for f in mapped.cache_files]
            del mapped
        write_text_atomic(staging / META, json.dumps(
            {"format": TABLE_FORMAT, "files": files, "rows": sum(len(s) for s in sources)},
            indent=1))
        if directory.exists():  # an older, incomplete table (no meta): replaced
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files


def table_versions() -> dict[str, Any]:
    """What the table's content depends on beyond the data fingerprint: its format and the
    libraries that tokenize."""
    from importlib.metadata import version

    return {"format": TABLE_FORMAT, **{name: version(name) for name in (
        "axolotl", "transformers", "tokenizers", "datasets")}}


def table_is_complete(directory: Path) -> bool:
    meta = Path(directory) / META
    if not meta.exists():
        return False
    return json.loads(meta.read_text()).get("format") == TABLE_FORMAT
