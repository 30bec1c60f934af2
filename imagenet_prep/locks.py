"""Every lock alexprep takes on files: flock(2) on a lock file that stays in place.

flock, not a PID file: the kernel drops the lock when its holder dies (even by kill -9),
so a stale lock never blocks. The files stay in place (removing a lock file races).

Two users: `build_lock` keeps two build-shards runs from writing into one folder at once;
the shard cache (shard_cache.py) takes `locked` and the descriptor functions for one
download per shard per node, its room accounting and the shared holds of an evicting
cache. flock is local to one node on most shared file systems (docs/design.md, "Remote
build folders").

A flock belongs to the open file, which a fork shares: a child forked while this process
held (or was about to take) a lock would keep it after the parent let go, until the child
exits. Every descriptor opened here is registered, and a forked child closes its copies
(closing, not unlocking, which would release the parent's lock): only the process that
took a lock holds it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
from pathlib import Path

from alexprep.imagenet_prep.build_folder import PART_LOCK, BuildFolder
from alexprep.imagenet_prep.errors import DataError

# Lock descriptors open now (locked or about to be), closed in forked children. _FORK_GUARD
# keeps a fork from landing between a descriptor's open and its registration here.
_HELD: set[int] = set()
_FORK_GUARD = threading.Lock()


def _after_fork_in_child() -> None:
    global _FORK_GUARD
    _FORK_GUARD = threading.Lock()  # the parent's was held by the forking thread
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)  # the child's duplicate only: the parent's lock stands
    _HELD.clear()


os.register_at_fork(before=lambda: _FORK_GUARD.acquire(), after_in_parent=lambda: _FORK_GUARD.release(),
                    after_in_child=_after_fork_in_child)


def open_lock(path: Path) -> int:
    """A descriptor of lock file `path` (made if missing), registered: forked children close theirs."""
    with _FORK_GUARD:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _HELD.add(fd)
    return fd


def close_lock(fd: int) -> None:
    """Close a descriptor of `open_lock`, which drops its lock."""
    with _FORK_GUARD:
        _HELD.discard(fd)
        os.close(fd)


def flock(fd: int, mode: int, wait: bool = True) -> bool:
    """flock `fd` in `mode` (fcntl.LOCK_SH or LOCK_EX); False at once, instead of waiting,
    when `wait` is False and another holds it."""
    try:
        fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def locked(path: Path, wait: bool = True):
    """flock `path` exclusively for the block; yields False at once instead of waiting when
    `wait` is False and another holds it."""
    fd = open_lock(path)
    try:
        yield flock(fd, fcntl.LOCK_EX, wait)
    finally:
        close_lock(fd)


# ---------------------------------------------------------------------------- a build folder's lock
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
        return not flock(fd, fcntl.LOCK_SH, wait=False)
    finally:
        os.close(fd)  # closing drops the probe's shared lock


def _running_parts(out: Path) -> list[tuple[int, int, str]]:
    found = []
    for entry in sorted(os.scandir(out), key=lambda e: e.name):
        m = PART_LOCK.match(entry.name)
        if m and _held_by_someone(Path(entry.path)):
            found.append((int(m.group(1)), int(m.group(2)), _holder(Path(entry.path))))
    return found


def _take(fd: int, mode: int, label: str, me: str) -> bool:
    """Lock `fd` without waiting; on success write who holds it (`label: me`) into the file."""
    if not flock(fd, mode, wait=False):
        return False
    if mode == fcntl.LOCK_EX:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{label}: {me}\n".encode(), 0)
    return True


@contextlib.contextmanager
def build_lock(out: Path, part: int = 0, parts: int = 1):
    """Hold OUT for one build-shards run, or refuse at once (DataError) naming the holder.

    A whole build takes OUT/.lock exclusively. A --part run takes OUT/.lock shared and its
    own OUT/.lock-part-i-of-N exclusively: parts write disjoint shards, so any number of
    them run at once (on one machine, or on several into a shared folder), but never
    beside a whole build, nor the same part twice, nor parts of a different N.
    """
    out, folder = Path(out), BuildFolder(out)
    me = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    fds: list[int] = []
    try:
        fds.append(open_lock(folder.lock))
        if parts == 1:
            if not _take(fds[0], fcntl.LOCK_EX, "build-shards, whole build", me):
                running = _running_parts(out)
                who = ("--part runs " + ", ".join(f"{i}/{n} ({h})" for i, n, h in running)) if running \
                    else f"another build-shards ({_holder(folder.lock)})"
                raise DataError(f"OUT {out} is being built by {who}: wait for it to finish, or choose another OUT")
        else:
            if not _take(fds[0], fcntl.LOCK_SH, "", me):
                raise DataError(f"OUT {out} is being built by another build-shards ({_holder(folder.lock)}): "
                                "wait for it to finish, or choose another OUT")
            fds.append(open_lock(folder.part_lock(part, parts)))
            if not _take(fds[1], fcntl.LOCK_EX, f"build-shards --part {part}/{parts}", me):
                raise DataError(f"--part {part}/{parts} is already being built into {out} "
                                f"({_holder(folder.part_lock(part, parts))})")
            other = [(i, n, h) for i, n, h in _running_parts(out) if n != parts]
            if other:
                i, n, h = other[0]
                raise DataError(f"OUT {out} is being built by --part {i}/{n} ({h}): parts of one build share N, "
                                f"so --part {part}/{parts} cannot run beside it")
        yield
    finally:
        for fd in fds:
            close_lock(fd)  # releases the lock
