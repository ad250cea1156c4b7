"""Files that are either complete or absent, even across a machine crash.

Stage outputs are never rewritten once they exist, so a file renamed into place must already be
on disk: the data is fsynced before the rename, and the directory after it (the rename itself
lives in the directory). A crash can then leave a stray `.tmp`, never a truncated file under
the final name.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A text file written through a temporary file and renamed into place by `commit`; gone
    without a trace if the writer fails first. `mode`: permissions the file has from its
    creation on (e.g. 0o600), never wider for a moment."""

    def __init__(self, path: Path, mode: int | None = None):
        self.path = Path(path)
        # Unique per writer: processes on different machines (containers) can share a pid,
        # and threads of one process do.
        self.tmp = self.path.with_name(
            f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o666 if mode is None else mode)
        if mode is not None:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never widened
        self.handle = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, text: str) -> None:
        self.handle.write(text)

    def commit(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def write_atomic(path: Path, chunks: Iterable[str], mode: int | None = None) -> None:
    """Write `chunks` to `path` through a temporary file, durably."""
    with AtomicFile(path, mode) as out:
        for chunk in chunks:
            out.write(chunk)


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    write_atomic(path, [text], mode)


def write_jsonl_atomic(path: Path, rows: Iterable[dict[str, Any]], **dumps: Any) -> int:
    """One JSON object per line; returns the number of rows written."""
    count = 0

    def lines():
        nonlocal count
        for row in rows:
            count += 1
            yield json.dumps(row, **dumps) + "\n"

    write_atomic(path, lines())
    return count
