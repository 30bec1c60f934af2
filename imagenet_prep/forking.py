"""Forking worker processes from a process that may hold DALI pipelines.

A forked child inherits the parent's garbage. If the child's garbage collector then
frees an inherited DALI pipeline, its finaliser waits for pipeline threads that exist only
in the parent, and the child hangs. Freezing the collector around the fork (Python's own
recipe for fork servers, `gc.freeze`) moves every inherited object into a generation the
child never collects.
"""
from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def frozen_gc():
    """Wrap the calls that fork workers (Pool(), iter(DataLoader))."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
