"""LabelStore: the regenerated answers, one JSON line per (prompt, checkpoint), in indexed segments.

A store directory holds
    sampling.json                 the sampling parameters every answer here was drawn with
    labels-rank<r>.jsonl          writer rank r's answers, one JSON object per line
    labels-rank<r>-<s>.jsonl      its later segments, s = 00001, 00002, ... (a segment is full
                                  at SEGMENT_RECORDS answers)
    labels-rank<r>[-<s>].index    a full segment's sorted keys and line offsets (derived data)

Why JSON lines with an index, and not SQLite, WAL or parquet. An answer must be durable when
`append` returns, so every appended batch costs at least one fsync; this format costs exactly
one (a pwrite of the batch's lines, then fdatasync) and writes nothing but the answers. SQLite
was measured on this project's machine with the same batches of 256: with the rollback journal
(journal_mode=PERSIST, synchronous=NORMAL, PRIMARY KEY (prompt_key, checkpoint)) a commit syncs
4-5 times (journal, directory, database, journal reset), and the digest keys are random, so each
answer lands on a different B-tree leaf and a commit journals and rewrites about 1 MB of index
pages for 150 kB of answers: 27 ms per append at 500k answers and rising, over 200 s for 2M
answers where this format needs one fdatasync each (`bench/label_store.py --sqlite-baseline`
reproduces it). WAL would sync once per commit, but it needs a shared-memory index that every
process opening the file maps, which SQLite documents as not working on network file systems;
WAL under EXCLUSIVE locking avoids that memory but locks every reader out while a writer is
open. Parquet segments would mean a file (and a directory sync) per appended batch, or
buffering that is not durable, plus compaction and a pyarrow dependency. JSON lines are also
the format earlier versions wrote, so their stores (`labels-rank<r>.jsonl`) are read as they
are: no migration, and answers stay readable with head, jq or pandas.

Reading without materialising the store. A full segment gets an index when its writer moves on:
its keys (`prompt_key` NUL `checkpoint`, sorted) and the offset and length of each key's line,
two numpy arrays that readers memory-map. A lookup is a binary search per segment and one
pread per answer found, so memory is what a call asks for, not the store's size. The last
segment of each rank has no index yet: readers index it in memory by scanning it, which is
bounded by SEGMENT_RECORDS lines and reads only a line's key fields. A key written twice (a
restart on another number of ranks) counts once: its first occurrence, in the order rank,
segment, line, is the one every method returns.

Crash safety. Lines are only ever appended, at the writer's known end of file. A kill, or a
power loss before the fdatasync, can leave an incomplete tail; a segment's answers are its valid
prefix, the complete newline-terminated records up to the first line that is not one, so readers
never see a torn record, and the next writer of that rank cuts the file back to that prefix once,
when it opens the rank (that scan of the last segment is the only read a writer does; appends
read nothing). A killed append can therefore keep a prefix of its batch, never part of a record;
the restart generates the rest. An index is written under a temporary name, fsynced and renamed
into place; a segment without one is scanned. One process writes a rank: it holds an flock on
the rank's first segment while open (a second writer is refused).

Network file systems (NFS, Lustre). Nothing here needs shared memory, writable memory maps,
atomic O_APPEND or byte-range locks for reading, and readers open files read-only and create
nothing. A reader that races a writer on another node sees a prefix of the segment: regions not
yet visible read as zeros or incomplete lines and end the valid prefix. Where flock is not
supported (Lustre mounted without `-o flock`) the one-writer check is skipped with a warning.

Reading the answers yourself: every `labels-rank*.jsonl` is JSON lines with the fields of
`GeneratedLabel`: `head -n 3 labels-rank0.jsonl | jq .`, or
`pandas.concat(pandas.read_json(p, lines=True) for p in sorted(glob("labels-rank*.jsonl")))`
(a writer that was killed may have left a partial last line: drop it first; and a key that
appears twice counts once, first occurrence wins). In Python, `LabelStore(dir).iter_labels()`
streams them all and `lookup([(prompt_key, checkpoint), ...])` finds some.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.files import fsync_dir, write_text_atomic
from tms_axolotl_plugin.logs import get_logger

LOG = get_logger(__name__)

SAMPLING_RECORD = "sampling.json"
SEGMENT_RECORDS = 1 << 17  # answers per segment: bounds a scan of an unindexed one (~75 MB)
_QUERY_BATCH = 1 << 14  # keys searched at once by lookup / contains / count
_READ_CHUNK = 8 << 20
_SEGMENT_NAME = re.compile(r"labels-rank(\d+)(?:-(\d+))?\.jsonl")
# A line as `_line` writes it, and as earlier versions did (json.dumps of the dataclass): its key
# is read without parsing the text. Other lines are parsed in full.
_CANONICAL = re.compile(rb'\{"prompt_key": "([^"\\]*)", "checkpoint": (-?[0-9]+), "text": ')


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
    """The answers of one generation setting. Each writer rank appends to its own segments;
    any process reads them all. `segment_records`: answers per segment (tests make it small)."""

    def __init__(self, directory: Path, segment_records: int = SEGMENT_RECORDS):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_records = segment_records
        self._writers: dict[int, _Writer] = {}
        self._segments: dict[Path, _Segment] = {}

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
        if any(segment.stat().st_size for *_, segment in _segment_files(self.directory)):
            raise TMSError(
                f"the label store {self.directory} holds answers without a record of their "
                f"sampling settings ({SAMPLING_RECORD}: written by an older version, which let "
                "the checkpoint's generation_config change them); delete that directory to "
                "regenerate.")
        write_text_atomic(path, text)

    def append(self, rank: int, records: list[GeneratedLabel]) -> None:
        """Add `records` to rank `rank`'s segments; they are on disk when this returns. The
        cost does not depend on the store's size (the rank's file is opened, and its tail
        checked, once per process)."""
        if not records:
            return
        writer = self._writers.get(rank)
        if writer is None:
            writer = self._writers[rank] = _Writer(self.directory, rank, self.segment_records)
        writer.append(records)

    def lookup(self, pairs: Iterable[tuple[str, int]]) -> dict[tuple[str, int], GeneratedLabel]:
        """The stored answers among (prompt_key, checkpoint) `pairs`; missing ones are absent."""
        segments = self._current_segments()
        found: dict[tuple[str, int], GeneratedLabel] = {}
        for chunk in itertools.batched(pairs, _QUERY_BATCH):
            where, rows = _locate(_key_array(chunk), segments)
            for s in np.unique(where[where >= 0]).tolist():
                segment = segments[s]
                chosen = rows[where == s]
                spans = segment.spans[chosen]
                order = np.argsort(spans[:, 0])
                with _ReadOnly(segment.path) as fd:
                    for row, (offset, length) in zip(chosen[order].tolist(),
                                                     spans[order].tolist(), strict=True):
                        label = segment.label(_pread(fd, length - 1, offset), row)
                        found[(label.prompt_key, label.checkpoint)] = label
        return found

    def contains(self, pairs: Iterable[tuple[str, int]]) -> np.ndarray:
        """Which of `pairs` are stored, as a bool array in their order (no answer is read)."""
        segments = self._current_segments()
        stored = [_locate(_key_array(chunk), segments)[0] >= 0
                  for chunk in itertools.batched(pairs, _QUERY_BATCH)]
        return np.concatenate(stored) if stored else np.zeros(0, bool)

    def count(self) -> int:
        """The number of distinct stored (prompt_key, checkpoint)."""
        segments = self._current_segments()
        total = 0
        for s, segment in enumerate(segments):
            for start in range(0, len(segment.keys), _QUERY_BATCH):
                keys = np.asarray(segment.keys[start : start + _QUERY_BATCH])
                total += int(np.count_nonzero(_locate(keys, segments[:s])[0] < 0))
        return total

    def iter_labels(self, batch_size: int = 4096) -> Iterator[list[GeneratedLabel]]:
        """Every stored answer once, in lists of at most `batch_size`, reading each segment
        front to back."""
        segments = self._current_segments()
        batch: list[GeneratedLabel] = []
        for s, segment in enumerate(segments):
            by_offset = np.argsort(segment.spans[:, 0])
            with _ReadOnly(segment.path) as fd:
                for start in range(0, len(by_offset), batch_size):
                    rows = by_offset[start : start + batch_size]
                    if s:  # a key an earlier segment holds is that segment's answer
                        rows = rows[_locate(np.asarray(segment.keys[rows]), segments[:s])[0] < 0]
                    if not len(rows):
                        continue
                    spans = segment.spans[rows].tolist()
                    first = spans[0][0]
                    data = _pread(fd, spans[-1][0] + spans[-1][1] - first, first)
                    for row, (offset, length) in zip(rows.tolist(), spans, strict=True):
                        line = data[offset - first : offset - first + length - 1]
                        batch.append(segment.label(line, row))
                        if len(batch) == batch_size:
                            yield batch
                            batch = []
        if batch:
            yield batch

    def load(self) -> dict[tuple[str, int], GeneratedLabel]:
        """Every answer, keyed by (prompt_key, checkpoint). This builds them all in memory: for
        small stores and tests; large ones are read with `iter_labels`, `lookup`, `contains`."""
        return {(label.prompt_key, label.checkpoint): label
                for batch in self.iter_labels() for label in batch}

    def close(self) -> None:
        """Close the writers' files (releasing their ranks) and forget what was read. Optional:
        a store that is never closed is left just as consistent by the process's exit."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        self._segments.clear()

    def _current_segments(self) -> list[_Segment]:
        segments = []
        for *_, path in _segment_files(self.directory):
            segment = self._segments.get(path)
            if segment is None:
                segment = self._segments[path] = _Segment(path)
            segment.refresh()
            segments.append(segment)
        return segments


class _Segment:
    """A reader's view of one segment file: its keys, sorted, and the (offset, length) of each
    key's first line; memory-mapped from its index, or built by scanning a segment without one
    (grown incrementally while a writer appends)."""

    def __init__(self, path: Path):
        self.path = path
        self.index_path = path.with_suffix(".index")
        self.indexed = False
        self._index_unreadable = False
        self.keys, self.spans = _empty_index()
        self._scanned = _Scan()

    def refresh(self) -> None:
        if self.indexed:
            return
        if not self._index_unreadable and self.index_path.exists():
            try:
                self.keys, self.spans = _read_index(self.index_path)
                self.indexed, self._scanned = True, _Scan()
                return
            except (OSError, ValueError) as error:
                self._index_unreadable = True
                LOG.warning(f"{self.index_path} is unreadable ({error}); scanning {self.path}")
        try:
            with _ReadOnly(self.path) as fd:
                size = os.fstat(fd).st_size
                if size < self._scanned.end:  # cut back by hand: start over
                    self._scanned = _Scan()
                if size > self._scanned.end and self._scanned.extend(fd):
                    self.keys, self.spans = self._scanned.index()
        except FileNotFoundError:
            pass

    def label(self, line: bytes, row: int) -> GeneratedLabel:
        """The answer on `line`, which the index says is row `row`'s."""
        try:
            label = _parse(line)
        except (ValueError, TypeError) as error:
            raise TMSError(f"{self.path}: an indexed line is not an answer ({error}); delete "
                           f"{self.index_path.name} to have it rebuilt") from None
        if _key(label.prompt_key, label.checkpoint) != bytes(self.keys[row]):
            raise TMSError(f"{self.path}: a line does not hold the answer its index says; "
                           f"delete {self.index_path.name} to have it rebuilt")
        return label


class _Writer:
    """The one process appending rank `rank`'s answers. Opening it cuts the last segment back to
    its valid prefix and indexes any full segment left without an index."""

    def __init__(self, directory: Path, rank: int, segment_records: int):
        self.directory, self.rank, self.segment_records = directory, rank, segment_records
        self._lock = _lock_rank(directory, rank)
        self._fd: int | None = None
        self._scan = _Scan()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        directory, rank = self.directory, self.rank
        for stale in directory.glob(f".labels-rank{rank}[.-]*.tmp"):
            stale.unlink(missing_ok=True)  # an index whose writer was killed before the rename
        mine = [(number, path) for r, number, path in _segment_files(directory) if r == rank]
        for _, path in mine[:-1]:
            if not path.with_suffix(".index").exists():
                self._index_existing(path)
        self._number, path = mine[-1]  # mine holds at least the first segment (the lock's)
        if path.with_suffix(".index").exists():
            self._number += 1
            return
        self._fd = os.open(path, os.O_RDWR)
        self._cut_to_valid_prefix(self._fd, self._scan)
        if len(self._scan.keys) >= self.segment_records:
            self._seal()

    def append(self, records: list[GeneratedLabel]) -> None:
        if self._fd is None:
            self._fd = self._new_segment()
        lines = [_line(record) for record in records]
        start = self._scan.end
        try:
            _pwrite(self._fd, b"".join(lines), start)
            os.fdatasync(self._fd)
        except BaseException:
            try:  # leave nothing half-written for the next append to land behind
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise
        keys, offsets = self._scan.keys, self._scan.offsets
        for record, line in zip(records, lines, strict=True):
            keys.append(_key(record.prompt_key, record.checkpoint))
            offsets.append(start)
            start += len(line)
        self._scan.end = start
        if len(keys) >= self.segment_records:
            self._seal()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.close(self._lock)

    def _path(self, number: int) -> Path:
        name = f"labels-rank{self.rank}" + (f"-{number:05d}" if number else "")
        return self.directory / f"{name}.jsonl"

    def _new_segment(self) -> int:
        path = self._path(self._number)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if os.fstat(fd).st_size:
            os.close(fd)
            raise TMSError(f"{path} appeared while rank {self.rank}'s writer was open: only "
                           "one process may write a rank's answers")
        fsync_dir(self.directory)
        return fd

    def _seal(self) -> None:
        """Index the full active segment; the next append starts a new one."""
        assert self._fd is not None
        _write_index(self._path(self._number).with_suffix(".index"), *self._scan.index())
        os.close(self._fd)
        self._fd, self._scan = None, _Scan()
        self._number += 1

    @staticmethod
    def _cut_to_valid_prefix(fd: int, scan: _Scan) -> None:
        scan.extend(fd)
        if os.fstat(fd).st_size > scan.end:
            os.ftruncate(fd, scan.end)
            os.fsync(fd)

    def _index_existing(self, path: Path) -> None:
        """A full segment without an index: an older version's, or its index was deleted."""
        fd = os.open(path, os.O_RDWR)
        try:
            scan = _Scan()
            self._cut_to_valid_prefix(fd, scan)
            _write_index(path.with_suffix(".index"), *scan.index())
        finally:
            os.close(fd)


class _Scan:
    """The keys and line offsets of a segment's valid prefix, read front to back."""

    def __init__(self):
        self.keys: list[bytes] = []
        self.offsets = array("Q")
        self.end = 0  # where the valid prefix ends

    def extend(self, fd: int) -> bool:
        """Read on from `end` to the end of the valid prefix; whether any line was added."""
        added, pos, rest = False, self.end, b""
        while chunk := os.pread(fd, _READ_CHUNK, pos + len(rest)):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()  # not newline-terminated (yet)
            for line in lines:
                key = _line_key(line)
                if key is None:
                    self.end = pos
                    return added
                self.keys.append(key)
                self.offsets.append(pos)
                pos += len(line) + 1
                added = True
        self.end = pos
        return added

    def index(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted keys, (offset, length) of each key's first line)."""
        if not self.keys:
            return _empty_index()
        keys = np.array(self.keys)
        starts = np.array(self.offsets, np.uint64)
        lengths = np.diff(starts, append=np.uint64(self.end))
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        first = np.ones(len(keys), bool)
        first[1:] = keys[1:] != keys[:-1]
        spans = np.stack([starts[order], lengths[order]], axis=1)[first]
        return keys[first], spans


def _locate(keys: np.ndarray, segments: Sequence[_Segment]) -> tuple[np.ndarray, np.ndarray]:
    """For each key: the first segment holding it (-1: none) and its row in that index."""
    where = np.full(len(keys), -1, np.int64)
    rows = np.zeros(len(keys), np.int64)
    todo = np.arange(len(keys))
    for s, segment in enumerate(segments):
        if not todo.size:
            break
        if not len(segment.keys):
            continue
        found, at = _search(segment.keys, keys[todo])
        where[todo[found]] = s
        rows[todo[found]] = at[found]
        todo = todo[~found]
    return where, rows


def _search(index: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, row) of `keys` in the sorted, non-empty `index`. Keys are cast to the index's
    width (a wider one would make numpy copy the index); longer keys cannot be in it."""
    fits = None
    if keys.dtype.itemsize > index.dtype.itemsize:
        fits = np.char.str_len(keys) <= index.dtype.itemsize
    keys = keys.astype(index.dtype)
    rows = np.minimum(np.searchsorted(index, keys), len(index) - 1)
    found = index[rows] == keys
    return (found & fits if fits is not None else found), rows


def _segment_files(directory: Path) -> list[tuple[int, int, Path]]:
    """(rank, segment number, path) of every segment, in the order whose first occurrence of
    a key wins."""
    found = []
    for path in directory.glob("labels-rank*.jsonl"):
        if match := _SEGMENT_NAME.fullmatch(path.name):
            found.append((int(match[1]), int(match[2] or 0), path))
    return sorted(found)


def _lock_rank(directory: Path, rank: int) -> int:
    """Hold rank `rank`'s first segment (created if need be) under an exclusive flock."""
    path = directory / f"labels-rank{rank}.jsonl"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        fsync_dir(directory)
    except FileExistsError:
        fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TMSError(f"another process is writing rank {rank}'s answers in {directory}: each "
                       "rank has one writer (is the same run started twice?)") from None
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            os.close(fd)
            raise
        LOG.warning(f"{directory}: the file system does not support flock ({error}); a second "
                    f"writer of rank {rank} would not be detected")
    return fd


def _key(prompt_key: str, checkpoint: int) -> bytes:
    return prompt_key.encode("utf-8", "surrogatepass") + b"\0" + str(int(checkpoint)).encode()


def _key_array(pairs: Sequence[tuple[str, int]]) -> np.ndarray:
    return np.array([_key(prompt_key, checkpoint) for prompt_key, checkpoint in pairs])


_encode_str = json.encoder.encode_basestring  # json.dumps(s, ensure_ascii=False), minus overhead


def _line(label: GeneratedLabel) -> bytes:
    """The record as json.dumps(asdict(label), ensure_ascii=False) writes it, newline included."""
    text = (f'{{"prompt_key": {_encode_str(label.prompt_key)}, '
            f'"checkpoint": {int(label.checkpoint)}, "text": {_encode_str(label.text)}, '
            f'"finish_reason": {_encode_str(label.finish_reason)}, '
            f'"num_tokens": {int(label.num_tokens)}, "prompt_tokens": {int(label.prompt_tokens)}}}\n')
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate: escape it, so the line stays valid UTF-8
        return (json.dumps(asdict(label)) + "\n").encode()


def _line_key(line: bytes) -> bytes | None:
    """The key of a complete record's line; None if the line is not one."""
    match = _CANONICAL.match(line)
    if match and line.endswith(b"}") and b"\0" not in line:  # zeros: a region not yet written
        return match[1] + b"\0" + match[2]
    try:
        label = _parse(line)
    except (ValueError, TypeError):
        return None
    return _key(label.prompt_key, label.checkpoint)


def _parse(line: bytes) -> GeneratedLabel:
    label = GeneratedLabel(**json.loads(line))  # TypeError: missing or unknown fields
    if not isinstance(label.prompt_key, str) or type(label.checkpoint) is not int:
        raise TypeError("prompt_key must be a string and checkpoint an integer")
    return label


def _empty_index() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, "S1"), np.zeros((0, 2), np.uint64)


def _write_index(path: Path, keys: np.ndarray, spans: np.ndarray) -> None:
    """Both arrays, one after the other in .npy format, durably under `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.lib.format.write_array(handle, keys, allow_pickle=False)
            np.lib.format.write_array(handle, np.ascontiguousarray(spans), allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _read_index(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The (keys, spans) `_write_index` wrote, memory-mapped."""
    arrays = []
    with open(path, "rb") as handle:
        for _ in range(2):
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(handle)
            start = handle.tell()
            count = int(np.prod(shape))
            if fortran_order or dtype.hasobject:
                raise ValueError("not an index written by this module")
            if count:
                arrays.append(np.memmap(path, dtype, "r", start, shape))
            else:
                arrays.append(np.zeros(shape, dtype))
            handle.seek(start + count * dtype.itemsize)
    keys, spans = arrays
    if keys.dtype.kind != "S" or spans.shape != (len(keys), 2):
        raise ValueError("not an index written by this module")
    return keys, spans


class _ReadOnly:
    """A file descriptor opened read-only for the `with` block."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> int:
        self.fd = os.open(self.path, os.O_RDONLY)
        return self.fd

    def __exit__(self, *_) -> None:
        os.close(self.fd)


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:  # short reads: signals, network file systems
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise TMSError(f"a label-store segment ended {length - len(data)} bytes early")
        data += more
    return data


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
