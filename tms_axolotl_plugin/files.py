"""Files that are either complete or absent, even across a machine crash.

Stage outputs are never rewritten once they exist, so a file renamed into place must already be
on disk: the data is fsynced before the rename, and the directory after it (the rename itself
lives in the directory). A crash can then leave a stray `.tmp`, never a truncated file under
the final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, chunks: Iterable[str], mode: int | None = None) -> None:
    """Write `chunks` to `path` through a temporary file, durably. `mode`: permissions the
    file has from its creation on (e.g. 0o600), never wider for a moment."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never widened
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
