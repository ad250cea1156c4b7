"""Stable fingerprints of the inputs that determine each stage's output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def fingerprint(*parts: Any) -> str:
    """A short hex digest of JSON-serialisable parts (dict key order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def model_dir_digest(path: Path) -> str:
    """Digest of a model or adapter folder: the names, sizes and mtimes of its files.

    Hashing multi-GB weights on every run would cost minutes; a checkpoint that is rewritten
    gets a new mtime, which is what matters for staleness.
    """
    path = Path(path)
    if not path.is_dir():  # a hub id: the name is all we have
        return fingerprint(str(path))
    entries = sorted(
        (p.relative_to(path).as_posix(), p.stat().st_size, int(p.stat().st_mtime))
        for p in path.rglob("*")
        if p.is_file()
    )
    return fingerprint(entries)
