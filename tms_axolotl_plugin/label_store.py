"""LabelStore: the regenerated answers, one JSON line per (prompt, checkpoint), in indexed segments.

A store directory holds
    sampling.json                 the sampling parameters every answer here was drawn with
    labels-rank<r>.jsonl          writer rank r's answers, one JSON object per line
    labels-rank<r>-<s>.jsonl      its later segments, s = 00001, 00002, ... (a segment is full
                                  at SEGMENT_RECORDS answers)
    labels-rank<r>[-<s>].index    a full segment's sorted keys and line offsets (derived data)

Why JSON lines with an index, and not SQLite, WAL or parquet. An answer must be durable when
`append` returns, so every appended batch costs at least one fsync; this format costs exactly
one (a pwrite of the batch's lines, then fdatasync) and writes nothing but the answers: 3.0 ms
per append of 256 answers, 23 s for 2M, on this project's 2-core machine. SQLite with the
rollback journal (the mode that works on network file systems; journal_mode=PERSIST,
synchronous=NORMAL, PRIMARY KEY (prompt_key, checkpoint), one transaction per batch) syncs 4-5
times per commit (journal, directory, database, journal reset), and the digest keys are random,
so each answer lands on another B-tree leaf and a commit journals and rewrites ~1 MB of index
pages for ~150 kB of answers: 17.8 ms per append over its first 300k answers, 19.9 ms over the
last tenth of them and rising (`bench/label_store.py --sqlite-baseline`). WAL syncs once per
commit but needs a shared-memory index mapped by every process that opens the file, which
SQLite documents as not working on network file systems; WAL under EXCLUSIVE locking avoids
that memory but locks every reader out while a writer is open. Parquet segments would mean a
file (and a directory sync) per appended batch, or buffering that is not durable, plus
compaction. JSON lines are also what earlier versions wrote, so their stores (`labels-rank<r>.
jsonl`) are read as they are, with no migration, and answers stay readable with jq or pandas.
Lines are encoded and parsed with orjson when it is installed (5-10 times faster than the json
module, which writes the spaced lines earlier versions wrote); either reads both.

Reading without materialising the store. A segment gets an index when it is full or its writer
closes: its keys (`prompt_key` NUL `checkpoint`, sorted) and the offset and length of each key's
line, two numpy arrays that readers memory-map. A lookup is a binary search per segment and one
pread per answer found, so memory is what a call asks for, not the store's size. A segment
without an index (its writer is still open, or was killed) is indexed in memory by each reader,
which scans it: at most SEGMENT_RECORDS lines, of which only the key fields are parsed. A key written twice (a restart on
another number of ranks) counts once: its first occurrence, in the order rank (numerically),
segment, line, is the one every method returns.

Crash safety. Lines are only ever appended, at the writer's known end of file. A kill, or a
power loss before the fdatasync, can leave an incomplete tail; a segment's answers are its valid
prefix, the complete newline-terminated records up to the first line that is not one, so readers
never see a torn record, and the next writer of that rank cuts the file back to that prefix once,
when it opens the rank (that scan of the last segment is the only read a writer does; appends
read nothing). A killed append can therefore keep a prefix of its batch, never part of a record;
the restart generates the rest. An index is written under a temporary name, fsynced and renamed
into place; a segment without one is scanned. One process writes a rank: it holds an flock on
the rank's first segment while open, and a second writer is refused.

Network file systems (NFS, Lustre). Nothing here needs shared memory, writable memory maps,
atomic O_APPEND or locks for reading; readers open files read-only and create nothing. A reader
that races a writer on another node sees a prefix of a segment: regions not yet visible read as
zeros or incomplete lines, which end the valid prefix. Where flock is not supported (Lustre
mounted without `-o flock`), the one-writer check is skipped with a warning.

Reading the answers yourself: each `labels-rank*.jsonl` holds JSON lines with the fields of
`GeneratedLabel`: `head -n 3 labels-rank0.jsonl | jq .`, or in pandas
`pd.concat(pd.read_json(p, lines=True) for p in sorted(Path(d).glob("labels-rank*.jsonl")))`
(a writer that was killed may have left a partial last line, which the next one cuts; a key that
appears twice counts once, first occurrence wins). In Python, `LabelStore(d).iter_labels()`
streams them all and `LabelStore(d).lookup([(prompt_key, checkpoint), ...])` finds some.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import numbers
import os
import re
import uuid
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tms_axolotl_plugin.errors import TMSError
from tms_axolotl_plugin.files import fsync_dir, write_text_atomic
from tms_axolotl_plugin.logs import get_logger

try:  # 5-10 times faster than the json module both ways, which does the same without it
    import orjson
except ImportError:
    orjson = None

LOG = get_logger(__name__)

SAMPLING_RECORD = "sampling.json"
SEGMENT_RECORDS = 1 << 18  # answers per segment: bounds a scan of an unindexed one (~150 MB)
_QUERY_BATCH = 1 << 14  # keys searched at once by lookup / contains / count
_READ_CHUNK = 8 << 20
_ORJSON_LINE = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY if orjson else 0
_SEGMENT_NAME = re.compile(r"labels-rank(\d+)(?:-(\d+))?\.jsonl")
# A line as `_lines` writes it (compact with orjson, spaced with json, as earlier versions did):
# its key is read without parsing the text. Other lines are parsed in full.
_CANONICAL = re.compile(rb'\{"prompt_key": ?"([^"\\]*)", ?"checkpoint": ?(-?[0-9]+), ?"text": ?"')


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
                spans = segment.spans[rows[where == s]]
                spans = spans[np.argsort(spans[:, 0])].tolist()
                with _ReadOnly(segment.path) as fd:
                    lines = [_pread(fd, length - 1, offset) for offset, length in spans]
                found.update({(label.prompt_key, label.checkpoint): label
                              for label in segment.labels(lines)})
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
                    batch += segment.labels(segment.lines(fd, segment.spans[rows]))
                    while len(batch) >= batch_size:
                        yield batch[:batch_size]
                        batch = batch[batch_size:]
        if batch:
            yield batch

    def load(self) -> dict[tuple[str, int], GeneratedLabel]:
        """Every answer, keyed by (prompt_key, checkpoint). This builds them all in memory: for
        small stores and tests; large ones are read with `iter_labels`, `lookup`, `contains`."""
        return {(label.prompt_key, label.checkpoint): label
                for batch in self.iter_labels() for label in batch}

    def close(self) -> None:
        """Index the writers' last segments, so that readers need not scan them, close their
        files (releasing their ranks) and forget what was read. A store that is not closed is
        just as consistent; its readers scan those segments."""
        try:
            for writer in self._writers.values():
                writer.close()
        finally:
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

    def lines(self, fd: int, spans: np.ndarray) -> list[bytes]:
        """The lines at `spans` (in file order), without their newlines."""
        first, end = int(spans[0, 0]), int(spans[-1, 0] + spans[-1, 1])
        data = _pread(fd, end - first, first)
        if np.array_equal(spans[1:, 0], spans[:-1, 0] + spans[:-1, 1]):  # no line skipped
            lines = data.split(b"\n")[:-1]  # JSON escapes every newline in a value
            if len(lines) == len(spans):
                return lines
        return [data[offset - first : offset - first + length - 1]
                for offset, length in spans.tolist()]

    def labels(self, lines: list[bytes]) -> list[GeneratedLabel]:
        try:
            return [_parse(line) for line in lines]
        except (ValueError, TypeError) as error:
            raise TMSError(f"{self.path}: an indexed line is not an answer ({error}); delete "
                           f"{self.index_path.name} to have it rebuilt") from None


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
            self.close(seal=False)
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
        data = _lines(records)
        if self._fd is None:
            self._fd = self._new_segment()
        start = self._scan.end
        try:
            _pwrite(self._fd, data, start)
            os.fdatasync(self._fd)
        except BaseException:
            try:  # leave nothing half-written for the next append to land behind
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise
        # Every line ends at its one newline: JSON escapes those inside values.
        ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + (start + 1)
        self._scan.offsets.frombytes(np.concatenate([[start], ends[:-1]]).astype("<u8").tobytes())
        self._scan.keys += [_key(r.prompt_key, r.checkpoint) for r in records]
        self._scan.end = int(ends[-1])
        if len(self._scan.keys) >= self.segment_records:
            self._seal()

    def close(self, seal: bool = True) -> None:
        try:
            if seal and self._fd is not None and self._scan.keys:
                self._seal()
        finally:
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
    todo = np.argsort(keys)  # sorted needles make each binary search cheaper
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
    keys = keys.astype(index.dtype, copy=False)
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
    return f"{prompt_key}\0{checkpoint:d}".encode("utf-8", "surrogatepass")


def _key_array(pairs: Sequence[tuple[str, int]]) -> np.ndarray:
    return np.array([_key(prompt_key, checkpoint) for prompt_key, checkpoint in pairs])


def _lines(labels: list[GeneratedLabel]) -> bytes:
    """One JSON object a line per answer, with the fields of GeneratedLabel in order."""
    labels = [_checked(label) for label in labels]
    if orjson is not None:
        try:
            return b"".join([orjson.dumps(label, option=_ORJSON_LINE) for label in labels])
        except TypeError:  # orjson.JSONEncodeError: a lone surrogate in a text
            pass
    return "".join(map(_json_line, labels)).encode()


def _json_line(label: GeneratedLabel) -> str:
    line = json.dumps(vars(label), ensure_ascii=False, default=int)  # int: numpy integers
    try:
        line.encode()
    except UnicodeEncodeError:  # a lone surrogate: escaped, so the line stays valid UTF-8
        line = json.dumps(vars(label), default=int)
    return line + "\n"


def _checked(label: GeneratedLabel) -> GeneratedLabel:
    """The key fields as str and int: a line the reader would not take for an answer would
    end its segment's valid prefix."""
    if type(label.prompt_key) is str and type(label.checkpoint) is int:
        return label
    if (not isinstance(label.prompt_key, str) or isinstance(label.checkpoint, bool)
            or not isinstance(label.checkpoint, numbers.Integral)):
        raise TypeError(f"an answer's prompt_key is a string and its checkpoint an integer, "
                        f"not {label.prompt_key!r} and {label.checkpoint!r}")
    return replace(label, prompt_key=str(label.prompt_key), checkpoint=int(label.checkpoint))


def _line_key(line: bytes) -> bytes | None:
    """The key of a complete record's line; None if the line is not one."""
    match = _CANONICAL.match(line)
    if match and line.endswith(b"}") and b"\0" not in line:  # zeros: a region not yet written
        return match[1] + b"\0" + match[2]
    try:
        label = _parse(line)
    except (ValueError, TypeError):
        return None
    if not isinstance(label.prompt_key, str) or type(label.checkpoint) is not int:
        return None
    return _key(label.prompt_key, label.checkpoint)


_FIELDS = frozenset(GeneratedLabel.__dataclass_fields__)


def _parse(line: bytes) -> GeneratedLabel:
    """The answer on one line (without its newline). Millions are read this way, so the
    fields are set at once: the dataclass's generated __init__ costs as much as the parsing."""
    fields = None
    if orjson is not None:
        try:
            fields = orjson.loads(line)
        except ValueError:  # e.g. an escaped lone surrogate, which orjson refuses
            pass
    if fields is None:
        fields = json.loads(line)
    if type(fields) is not dict or fields.keys() != _FIELDS:
        raise TypeError(f"the fields of an answer are {sorted(_FIELDS)}")
    label = object.__new__(GeneratedLabel)
    object.__setattr__(label, "__dict__", fields)
    return label


def _empty_index() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, "S1"), np.zeros((0, 2), np.uint64)


def _write_index(path: Path, keys: np.ndarray, spans: np.ndarray) -> None:
    """Both arrays, one after the other in .npy format, durably under `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
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
