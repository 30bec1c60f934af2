"""Crash-safe writes: a temporary name beside the target, fsync, then an atomic rename.

After a crash (even kill -9) a final name holds either the whole file or nothing.
"""
from __future__ import annotations

import contextlib
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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)  # a full disk or a crash mid-write leaves no temporary file behind
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def remove_leftovers(folder: Path, names=None) -> int:
    """Delete temporary files that a crashed run left in `folder`; returns how many.

    With `names`, only the temporary files of those final names (a --part run removes its
    own shards' leftovers, never those another part is writing now)."""
    removed = 0
    names = None if names is None else set(names)
    if Path(folder).is_dir():
        for entry in os.scandir(folder):
            if entry.name.startswith(".") and TMP_MARK in entry.name:
                if names is not None and entry.name[1:].rsplit(TMP_MARK, 1)[0] not in names:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed
