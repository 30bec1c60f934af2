"""Forking worker processes from a process that may hold DALI pipelines.

A forked child inherits the parent's garbage. If the child's garbage collector then
frees an inherited DALI pipeline, its finaliser waits for pipeline threads that exist only
in the parent, and the child hangs. Freezing the collector around the fork (Python's own
recipe for fork servers, `gc.freeze`) moves every inherited object into a generation the
child never collects.

Before the fork the heap's free pages are also handed back to the OS (glibc's
`malloc_trim`): otherwise the parent's next allocations land in pages the children
still share, and each such page is copied, so that the children's private memory grows
with what the parent once held (build-shards' listing, benchmarks/scale.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or None), "malloc_trim", None)
    except OSError:
        return None


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc; a no-op elsewhere): before a fork,
    and in a long-lived worker after each task, whose freed buffers would otherwise stay
    in its resident memory."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def frozen_gc():
    """Wrap the calls that fork workers (Pool(), iter(DataLoader))."""
    trim_heap()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
