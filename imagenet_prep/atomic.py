"""Crash-safe writes: a temporary name beside the target, fsync, then an atomic rename.

After a crash (even kill -9) a final name holds either the whole file or nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

TMP_MARK = ".tmp-"


def temporary_name(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def replace_synced(tmp: Path, path: Path) -> None:
    """Make the finished file `tmp` durable, then rename it to `path` (atomic)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = temporary_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def remove_leftovers(folder: Path) -> int:
    """Delete temporary files that a crashed run left in `folder`; returns how many."""
    removed = 0
    if Path(folder).is_dir():
        for entry in os.scandir(folder):
            if entry.name.startswith(".") and TMP_MARK in entry.name:
                os.unlink(entry.path)
                removed += 1
    return removed
