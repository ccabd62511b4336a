"""Crash-safe file primitives: synced writes, file digests, and temporary directories renamed into place."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def write_synced(path: Path, data: str | bytes) -> None:
    """Write and fsync a small file (the caller renames it into place, or it is the last file of a directory)."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe(path: Path, sync: bool = False) -> dict:
    """A file's size and SHA-256, optionally fsyncing it first."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def mismatch(path: Path, expected: dict) -> str | None:
    """What differs between a file and its `describe` record, in words; None when it matches."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{size} bytes, the manifest says {expected['size']}"
    if describe(path)["sha256"] != expected["sha256"]:
        return "contents differ from the manifest's SHA-256"
    return None


def temp_dir_beside(path: Path) -> Path:
    """A new hidden directory next to `path` (to be renamed into it), with mkdir's modes, not mkdtemp's private ones."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp
