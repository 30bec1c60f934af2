"""The lock that keeps two build-shards runs from writing into one folder at once.

flock, not a PID file: the kernel drops the lock when its holder dies (even by kill -9),
so a stale lock never blocks. The files stay in place (removing a lock file races).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
from pathlib import Path

from alexprep.imagenet_prep.errors import DataError

LOCK_NAME = ".lock"
_HELD: list[int] = []  # lock fds held by this process, closed (never unlocked) in forked workers
_PART_LOCK = re.compile(r"^\.lock-part-(\d+)-of-(\d+)$")


def part_lock_name(part: int, parts: int) -> str:
    return f".lock-part-{part:03d}-of-{parts:03d}"


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(path: Path) -> str:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def _held_by_someone(path: Path) -> bool:
    """Whether another process holds an exclusive lock on `path` (probed, not taken)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return not _try_lock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)  # closing drops the probe's shared lock


def _running_parts(out: Path) -> list[tuple[int, int, str]]:
    found = []
    for entry in sorted(os.scandir(out), key=lambda e: e.name):
        m = _PART_LOCK.match(entry.name)
        if m and _held_by_someone(Path(entry.path)):
            found.append((int(m.group(1)), int(m.group(2)), _holder(Path(entry.path))))
    return found


@contextlib.contextmanager
def build_lock(out: Path, part: int = 0, parts: int = 1):
    """Hold OUT for one build-shards run, or refuse at once (DataError) naming the holder.

    A whole build takes OUT/.lock exclusively. A --part run takes OUT/.lock shared and its
    own OUT/.lock-part-i-of-N exclusively: parts write disjoint shards, so any number of
    them run at once (on one machine, or on several into a shared folder), but never
    beside a whole build, nor the same part twice, nor parts of a different N.
    """
    out = Path(out)
    me = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    fds: list[int] = []
    try:
        main = _open_lock(out / LOCK_NAME)
        fds.append(main)
        if parts == 1:
            if not _try_lock(main, fcntl.LOCK_EX):
                running = _running_parts(out)
                who = ("--part runs " + ", ".join(f"{i}/{n} ({h})" for i, n, h in running)) if running \
                    else f"another build-shards ({_holder(out / LOCK_NAME)})"
                raise DataError(f"OUT {out} is being built by {who}: wait for it to finish, or choose another OUT")
            os.ftruncate(main, 0)
            os.pwrite(main, f"build-shards, whole build: {me}\n".encode(), 0)
        else:
            if not _try_lock(main, fcntl.LOCK_SH):
                raise DataError(f"OUT {out} is being built by another build-shards ({_holder(out / LOCK_NAME)}): "
                                "wait for it to finish, or choose another OUT")
            mine = _open_lock(out / part_lock_name(part, parts))
            fds.append(mine)
            if not _try_lock(mine, fcntl.LOCK_EX):
                raise DataError(f"--part {part}/{parts} is already being built into {out} "
                                f"({_holder(out / part_lock_name(part, parts))})")
            os.ftruncate(mine, 0)
            os.pwrite(mine, f"build-shards --part {part}/{parts}: {me}\n".encode(), 0)
            other = [(i, n, h) for i, n, h in _running_parts(out) if n != parts]
            if other:
                i, n, h = other[0]
                raise DataError(f"OUT {out} is being built by --part {i}/{n} ({h}): parts of one build share N, "
                                f"so --part {part}/{parts} cannot run beside it")
        _HELD.extend(fds)
        yield
    finally:
        for fd in fds:
            if fd in _HELD:
                _HELD.remove(fd)
            os.close(fd)  # releases the lock


def close_inherited_locks() -> None:
    """In a forked worker: drop the inherited lock descriptors (closing, not unlocking, which
    would release the parent's lock), so that only live build processes keep OUT locked."""
    while _HELD:
        with contextlib.suppress(OSError):
            os.close(_HELD.pop())
