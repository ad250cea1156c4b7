"""Stable fingerprints of the inputs that determine each stage's output."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def fingerprint(*parts: Any) -> str:
    """A short hex digest of JSON-serialisable parts (dict key order does not matter)."""
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()[:16]


def fingerprint_of_items(item_texts: Iterable[str], *rest: Any) -> str:
    """`fingerprint(items, *rest)` for a list too large to serialise at once: `item_texts` are
    the items' `canonical_json`, hashed as they stream in."""
    digest = hashlib.sha256(b"[[")
    for index, text in enumerate(item_texts):
        digest.update(text.encode() if index == 0 else b"," + text.encode())
    digest.update(b"]")
    for part in rest:
        digest.update(b"," + canonical_json(part).encode())
    digest.update(b"]")
    return digest.hexdigest()[:16]


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


_SMALL_FILE = 4 << 20
_SAMPLE = 64 << 10
_SAMPLES = 16


def _sampled_file_digest(path: Path, digest) -> None:
    """Small files whole; large ones (weights) by size and 16 evenly spaced 64 KiB blocks,
    first and last included: a retrained or swapped weight file changes them all."""
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        if size <= _SMALL_FILE:
            digest.update(handle.read())
            return
        for index in range(_SAMPLES):
            handle.seek((size - _SAMPLE) * index // (_SAMPLES - 1))
            digest.update(handle.read(_SAMPLE))


def content_digest(path: Path) -> str:
    """A cheap digest of what a local file or model folder holds (not where it lies or when it
    was written): a copied model keeps its digest, an edited config or new weights change it."""
    path = Path(path)
    digest = hashlib.sha256()
    # Hidden entries (.cache/ of a Hub download, lock files) change without the model changing.
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        _sampled_file_digest(file, digest)
    return digest.hexdigest()[:16]
