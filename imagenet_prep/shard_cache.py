"""The node-local cache of a remote build's shards: each shard downloaded once per node,
checked against its manifest's size and SHA-256 before anything can map it, then memory-
mapped like a local shard (docs/design.md, "Remote build folders").

    CACHE/<key>/classes.json, stats.npz, stats.json   copied from the remote on every open
    CACHE/<key>/<split>/manifest*.json                  the remote's manifests
    CACHE/<key>/<split>/<shard>.arrow                   a verified shard (read_split finds it)
    CACHE/<key>/<split>/.<shard>.arrow.ok               what was verified: sha256, bytes, mtime_ns
    CACHE/<key>/<split>/.<shard>.arrow.lock             flock: one download per shard per node
    CACHE/<key>/<split>/.<shard>.arrow.download         a download in progress (never mapped)
    CACHE/<key>/<split>/.room.lock                      flock: a size-limited cache's accounting

<key> is the build id and a digest of the split's manifests (every shard's name, size and
SHA-256): the folder's identity is its content, so two builds made with equal options from
different images, or a build pushed again to the same URI, never share a folder, and a job
reading one never sees the other's bytes.

A shard's final name appears only by a rename after its hash matched, so a kill -9 at any
point leaves a temporary file the next holder of the lock overwrites. The hash is taken
over the file as written, read back after its fsync, not over the bytes received. A shard
whose marker matches the manifest's hash and the file's size and mtime is reused without
rehashing (a file changed in place since has another mtime; bit rot is what `alexprep
verify` is for).

The locks are flock(2): local to one node on most shared file systems (NFS, Lustre, GPFS,
BeeGFS, CIFS), so a cache there is named in a warning, and a size-limited one refused
(`shared_mount_problem`).

A cache smaller than its split (`cache_limit`) is an EvictingCache, for readers that need
a few shards at a time: see its docstring for what it keeps and how ranks share it.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np

from alexprep.imagenet_prep import remote as rm
from alexprep.imagenet_prep.atomic import write_bytes_atomic, write_text_atomic
from alexprep.imagenet_prep.build_folder import CLASSES, STATS, STATS_JSON, BuildFolder
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.locks import close_lock, flock, locked, open_lock
from alexprep.imagenet_prep.shards import ShardRecord, SplitIndex, file_sha256, read_split

SMALL_FILES = (CLASSES, STATS, STATS_JSON)  # what the loaders read besides shards
PREFETCH_WORKERS = 4  # parallel downloads per process: S3 serves each stream at a fraction of a NIC
RESERVE = 1 << 30  # free space left on the cache's disk after the split is in it
ROOM_LOCK = ".room.lock"  # in a split's folder: a size-limited cache's reservations, one at a time
ROOM_POLL_S = 0.05  # a download waiting for room looks again this often (other processes free it)
ROOM_WARN_S = 120  # a batch waiting this long for room says so (once): too many readers for the limit
PREFETCH_THREAD = "alexprep-prefetch"


class ShardMaps(Protocol):
    """A process's memory maps of a split's shards (samples.SplitSamples): an EvictingCache
    has them unmap a shard before it lets go of it, since letting go may delete the file."""

    def unmap(self, k: int) -> None:
        """Drop this process's map of shard k (the split's k-th)."""


class _Stopped(Exception):
    """The cache was closed while a background download ran."""


class ShardCache:
    """A remote split's shards, made local on demand (`fetch`) and ahead of use (`prefetch`)."""

    BACKGROUND_WAITS = False  # prefetch: a shard another process downloads is left to it, waited for last
    _UNPICKLED = ("_lock", "_queue", "_threads")  # what _init_threads makes again

    def __init__(self, remote: rm.RemoteFolder, index: SplitIndex, workers: int | None = None):
        self.remote, self.index, self.workers = remote, index, workers or PREFETCH_WORKERS
        self._local: set[str] = set()  # shards this process has seen verified
        self._pid = os.getpid()
        self._init_threads()
        self.downloads = 0  # shards this process downloaded (tests and benchmarks count them)
        self.downloaded_bytes = 0
        self.error: Exception | None = None  # the first background failure; fetch() redoes that shard
        self._told_replaced = False  # check_remote warned already

    def _init_threads(self) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[ShardRecord] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._stop = False

    def __getstate__(self):  # a spawned DataLoader worker: no threads, no queue
        return {k: v for k, v in self.__dict__.items() if k not in self._UNPICKLED}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_threads()

    # -- one shard
    def fetch(self, shard: ShardRecord, wait: bool = True) -> bool:
        """Make `shard` local and verified, downloading it unless this node has it; blocks
        while another thread or process downloads it (with `wait=False`, returns False
        instead). Raises DataError for a remote object that stays damaged or unreachable."""
        if shard.name in self._local:
            return True
        path = self.index.shard_path(shard)
        with locked(self._lock_path(shard), wait) as held:
            if not held:
                return False
            if not self._verified(shard, path):
                if os.getpid() != self._pid:  # a worker: the main process fetches before it dispatches
                    raise RuntimeError(f"{path} was not fetched before a worker needed it")
                self._download(shard, path)
        self._local.add(shard.name)
        return True

    def _marker(self, path: Path) -> Path:
        return path.with_name(f".{path.name}.ok")

    def _lock_path(self, shard: ShardRecord) -> Path:
        return self.index.folder / f".{shard.name}.lock"

    def _tmp(self, shard: ShardRecord) -> Path:
        return self.index.folder / f".{shard.name}.download"

    def _verified(self, shard: ShardRecord, path: Path) -> bool:
        """Whether `path` holds the manifest's shard: by its marker (no rehash), else by
        hashing it once (a crash between rename and marker); a wrong file is removed."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        want = {"sha256": shard.sha256, "bytes": shard.bytes, "mtime_ns": st.st_mtime_ns}
        if st.st_size == shard.bytes:
            try:
                if json.loads(self._marker(path).read_text()) == want:
                    return True
            except (OSError, ValueError):
                pass
            if file_sha256(path) == shard.sha256:
                write_text_atomic(self._marker(path), json.dumps(want))
                return True
        path.unlink()  # another build's or a damaged shard (a process that mapped it keeps its copy)
        return False

    def _download(self, shard: ShardRecord, path: Path) -> None:
        """Download under a temporary name, retrying dropped connections; a hash mismatch
        is downloaded once more, then is an error naming the object. Renamed into place
        only once size and SHA-256 match."""
        rel = f"{self.index.split}/{shard.name}"
        tmp = self._tmp(shard)
        try:
            for attempt in range(2):
                size, sha = self.remote.retrying(lambda: self._copy(rel, tmp), f"downloading {self.remote.name(rel)}")
                if (size, sha) == (shard.bytes, shard.sha256):
                    break
                self._check_not_replaced(shard)
            else:
                raise DataError(f"{self.remote.name(rel)} differs from its manifest (downloaded twice: {size} bytes, "
                                f"SHA-256 {sha[:12]}…; the manifest says {shard.bytes} bytes, {shard.sha256[:12]}…): "
                                f"the remote build is damaged; push it again (`alexprep push OUT {rm.display(self.remote.uri)}`)")
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            self._check_not_replaced(shard)  # a push of a build without it, under this job?
            raise DataError(f"{self.remote.name(rel)} is missing (its manifest lists it): push the build again") from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._publish(tmp, path)
        st = os.stat(path)
        write_text_atomic(self._marker(path), json.dumps({"sha256": sha, "bytes": size, "mtime_ns": st.st_mtime_ns}))
        with self._lock:
            self.downloads += 1
            self.downloaded_bytes += size

    def _check_not_replaced(self, shard: ShardRecord) -> None:
        """After a download that differs from this run's manifest: raise, in one line, if the
        remote's manifests no longer say what this run read when it opened the split (a
        push under a running job), rather than downloading again."""
        rel = f"{self.index.split}/{shard.name}"
        now = None
        try:
            for manifest in BuildFolder(self.index.root).manifests(self.index.split):
                listed = json.loads(self.remote.read_bytes(f"{self.index.split}/{manifest.name}"))["shards"]
                now = next((e.get("sha256") for e in listed if e.get("name") == shard.name), now)
        except FileNotFoundError:
            now = "gone"
        except (ValueError, KeyError, TypeError, AttributeError):
            now = "unreadable"
        if now == shard.sha256:
            return  # the manifest stands: a damaged transfer or object, downloaded again
        said = f"its manifest now says SHA-256 {now[:12]}…" if now and len(now) == 64 else \
            "its manifests are gone or being replaced"
        raise DataError(f"{self.remote.name(rel)} changed on the remote since this run opened it ({said}, this run's "
                        f"says {shard.sha256[:12]}…; a push to {rm.display(self.remote.uri)} under a running job?): "
                        "nothing of it was used; start the run again to read the build there now")

    def _publish(self, tmp: Path, path: Path) -> None:
        """A verified download under its final name."""
        os.replace(tmp, path)

    def _copy(self, rel: str, tmp: Path) -> tuple[int, str]:
        """Stream one object into `tmp` (truncating what a failed try left), fsynced so that
        a rename after it is durable; (bytes, SHA-256) of the file as written, read back
        (what a reader will map, whatever the stream or the disk did)."""
        with self.remote.open_input(rel) as src, open(tmp, "wb") as dst:
            while True:
                if self._stop:
                    raise _Stopped()
                chunk = src.read(rm.CHUNK)
                if not chunk:
                    break
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        return os.stat(tmp).st_size, file_sha256(tmp)

    def is_cached(self, shard: ShardRecord) -> bool:
        """Whether the shard is here by its marker (cheap: no lock, no hash)."""
        path = self.index.shard_path(shard)
        try:
            st = os.stat(path)
            mark = json.loads(self._marker(path).read_text())
        except (OSError, ValueError):
            return False
        return mark == {"sha256": shard.sha256, "bytes": shard.bytes, "mtime_ns": st.st_mtime_ns}

    # -- in the background
    def prefetch(self, shards: list[ShardRecord], epoch: int | None = None) -> None:
        """Download `shards` in this order in the background, `workers` at a time (replacing
        the order of an earlier call). Shards another process holds are waited for last.
        `epoch`: the epoch the order is for (an EvictingCache paces it by that epoch's batches).
        Each call also looks whether the remote still holds this run's build (`check_remote`)."""
        self.check_remote()
        with self._lock:
            self._queue = collections.deque(s for s in shards if s.name not in self._local)
            self._threads = [t for t in self._threads if t.is_alive()]
            while self._queue and len(self._threads) < self.workers and not self._stop:
                thread = threading.Thread(target=self._prefetch_loop, daemon=True, name=PREFETCH_THREAD)
                thread.start()
                self._threads.append(thread)

    def check_remote(self) -> bool:
        """Whether the remote's manifests still list this run's shards (names and SHA-256s);
        if not (a push under a running job), a one-line RuntimeWarning, once: the run goes
        on with the build it opened, whose shards it verifies, and stops in one line if it
        must download one the remote no longer holds. One try, no retries: a store that does
        not answer now is not this check's to report (True)."""
        split, listed = self.index.split, set()
        try:
            for manifest in BuildFolder(self.index.root).manifests(self.index.split):
                with self.remote.open_input(f"{split}/{manifest.name}") as f:
                    listed |= {(e["name"], e["sha256"]) for e in json.loads(f.read())["shards"]}
        except FileNotFoundError:
            listed = set()
        except (OSError, ValueError, KeyError, TypeError, DataError):
            return True
        if listed >= {(s.name, s.sha256) for s in self.index.shards}:
            return True
        if not self._told_replaced:
            self._told_replaced = True
            warnings.warn(f"{self.remote.name(split)} no longer holds the build this run opened (a push to "
                          f"{rm.display(self.remote.uri)} under a running job?): this run goes on with the build it "
                          f"opened, from its verified cache, and stops if it needs a shard the remote no longer has; "
                          f"start it again to read the new build", RuntimeWarning, stacklevel=2)
        return False

    def _next_queued(self) -> ShardRecord | None:
        """The next shard of the prefetch queue; None once it is empty or the cache closed."""
        with self._lock:
            return self._queue.popleft() if self._queue and not self._stop else None

    def _prefetch_loop(self) -> None:
        later = []
        try:
            while (shard := self._next_queued()) is not None:
                if not self.fetch(shard, wait=self.BACKGROUND_WAITS):
                    later.append(shard)  # another rank of this node is downloading it
            for shard in later:
                if not self._stop:
                    self.fetch(shard)
        except _Stopped:
            pass
        except Exception as exc:  # the loader's own fetch of that shard reports it
            self.error = self.error or exc

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the background downloads `prefetch` started have ended (or `timeout`
        seconds have passed); whether they all have."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def close(self) -> None:
        """Stop background downloads (each stops within one chunk; its file is removed)."""
        with self._lock:
            self._stop = True
            self._queue.clear()
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout=30)

    def summary(self) -> str:
        """"12 of 1252 shards (0.5 of 51.2 GB) cached in DIR": what is left to download."""
        cached = [s for s in self.index.shards if self.is_cached(s)]
        return (f"{len(cached)} of {len(self.index.shards)} {self.index.split} shards "
                f"({_size(sum(s.bytes for s in cached))} of {_size(sum(s.bytes for s in self.index.shards))}) "
                f"cached in {self.index.folder}")

    def check_space(self, limit: int | None, in_use: tuple[int, int] | None = None) -> bool:
        """Refuse, before anything downloads, a split that does not fit: over `limit` bytes,
        or more than the cache's disk has free (keeping RESERVE). A reader that needs a few
        shards at a time gives `in_use` = (shards it holds at once, shards it fetches ahead):
        a split over `limit` is then to be read through an EvictingCache (True), if `limit`
        holds that many of its largest shards."""
        total = sum(s.bytes for s in self.index.shards)
        evict = limit is not None and total > limit
        if evict:
            self._check_window(limit, total, in_use)
        need = (limit if evict else total) - sum(s.bytes for s in self.index.shards if self.is_cached(s))
        where = self.index.folder
        free = shutil.disk_usage(where).free
        if need > free - RESERVE:
            raise DataError(f"the cache {where.parent.parent} has {_size(free)} free; {self.remote.name(self.index.split)} "
                            f"needs {_size(need)} more (and {_size(RESERVE)} to spare): free space there or give "
                            f"another cache directory")
        return evict

    def _check_window(self, limit: int, total: int, in_use: tuple[int, int] | None) -> None:
        split, shards = self.remote.name(self.index.split), self.index.shards
        if in_use is None:
            raise DataError(f"{split} takes {_size(total)}, more than the cache limit of {_size(limit)}: raise the "
                            f"limit, use a cache on a larger disk, or train in quasi order (order=\"quasi\", "
                            f"--order quasi), which keeps only the shards in use")
        held, ahead = in_use
        largest = max(s.bytes for s in shards)
        least = min(total, held * largest)
        if limit < least:
            raise DataError(f"a cache limit of {_size(limit)} is too small for {split} ({_size(total)}): its reader "
                            f"holds up to {min(held, len(shards))} shards at once (those of its batches in flight and "
                            f"{ahead} fetched ahead), of up to {_size(largest)} each; give a limit of at least "
                            f"{limit_hint(least)}")


class EvictingCache(ShardCache):
    """A cache smaller than its split (`limit` bytes), for readers that need a few shards at
    a time (quasi-order training, evaluation): shards are kept only while in use, then
    deleted with their markers, so every epoch downloads the whole split again.

    The rule, for all processes of a node (ranks, loaders): a process holds a shared flock
    on each shard it uses, from `fetch` until `release_through` lets go of it (unmapping it
    first, through `maps`); downloading or deleting a shard takes its exclusive flock, so a
    shard is deleted only when nobody uses or downloads it: whoever lets go of it last
    deletes it.
    A download first waits until it fits under the limit beside every shard file of the
    split (a download counts at its full size), deleting shards nobody holds (an earlier
    run's) to make room. Background downloads stay `ahead` shards past those of the batches
    made, so that waiting never holds up a batch: `check_space` refuses limits below what
    the batches in flight and those `ahead` need. DataLoader workers take no lock: they read
    only shards the main process holds for their batch, and unmap them after it.
    """

    BACKGROUND_WAITS = True  # prefetch in plan order: wait for a shard another process downloads
    _UNPICKLED = ShardCache._UNPICKLED + ("_pins", "_until", "_busy", "_queued", "maps")
    maps: ShardMaps | None = None  # this process's maps of the split's shards (the loader's SplitSamples)

    def __init__(self, remote: rm.RemoteFolder, index: SplitIndex, limit: int, ahead: int, workers: int | None = None):
        super().__init__(remote, index, workers)
        self.limit, self.ahead = limit, ahead
        self.peak_bytes = 0  # the most a reservation counted in the split's folder (tests, benchmarks)
        self._position = {s.name: k for k, s in enumerate(index.shards)}

    def _init_threads(self) -> None:
        super()._init_threads()
        self._lock = threading.Condition()  # also signals: shards held, let go, fetched; the queue replaced
        self._pins: dict[str, int] = {}  # shard name -> the descriptor holding its shared lock
        self._until: dict[str, tuple[int, int]] = {}  # pinned shards made batches use: until (epoch, batch)
        self._busy: set[str] = set()  # shards a thread of this process is fetching
        self._queued: dict[str, int] = {}  # each shard's first place in the prefetch queue
        self._taken = 0  # places of the queue handed to prefetch threads
        self._frontier = 0  # places of the queue the made batches have reached
        self._queue_epoch = None  # the epoch of the batches the queue is for

    # -- holding shards
    def fetch(self, shard: ShardRecord, wait: bool = True) -> bool:
        """Make `shard` local and hold it until it is let go of (see the class docstring);
        in a DataLoader worker, only check that it is here (the main process holds it)."""
        if os.getpid() != self._pid:
            if not self.is_cached(shard):
                raise RuntimeError(f"{self.index.shard_path(shard)} was not fetched before a worker needed it")
            return True
        with self._lock:
            while shard.name in self._busy:
                self._lock.wait()
            if shard.name in self._pins:
                return True
            self._busy.add(shard.name)
        fd, held = open_lock(self._lock_path(shard)), False
        try:
            held = self._hold_verified(fd, shard, wait)
            if held:
                with self._lock:
                    self._pins[shard.name] = fd
            return held
        finally:
            if not held:
                close_lock(fd)
            with self._lock:
                self._busy.discard(shard.name)
                self._lock.notify_all()

    def _hold_verified(self, fd: int, shard: ShardRecord, wait: bool) -> bool:
        """Lock `fd` shared over the shard verified in place, downloading it first (under the
        exclusive lock) if it is not; False when `wait` is False and another holds it."""
        path = self.index.shard_path(shard)
        while True:
            if not flock(fd, fcntl.LOCK_SH, wait):
                return False
            if self.is_cached(shard):
                return True
            fcntl.flock(fd, fcntl.LOCK_UN)
            if not flock(fd, fcntl.LOCK_EX, wait):
                return False
            if not self._verified(shard, path):
                self._reserve(shard)
                self._download(shard, path)
            # Then shared again: flock converts by unlocking first, so an evictor may slip in: look again.

    def hold(self, shards: list[int], until: list[tuple[int, int]]) -> None:
        """A batch made for the stream uses shards `shards` (positions in the split, fetched):
        keep each until batch `until[i]` ((epoch, number), its last use) is handed out."""
        with self._lock:
            for k, last in zip(shards, until):
                name = self.index.shards[k].name
                self._until[name] = max(self._until.get(name, last), last)
                if last[0] == self._queue_epoch and name in self._queued:
                    self._frontier = max(self._frontier, self._queued[name] + 1)
            self._lock.notify_all()

    def release_through(self, position: tuple[int, int]) -> None:
        """Batch `position` ((epoch, number)) is out: let go of the shards no later batch uses."""
        with self._lock:
            done = [name for name, last in self._until.items() if last <= position]
        self._let_go(done)

    def release_held(self) -> None:
        """Let go of every shard held for made batches (their stream was dropped), leaving
        them in the cache: the next run may use them, or another reader delete them for room."""
        with self._lock:
            done = list(self._until)
        self._let_go(done, evict=False)

    def _let_go(self, names: list[str], evict: bool = True) -> None:
        for name in names:
            k = self._position[name]
            if self.maps is not None:
                self.maps.unmap(k)
            with self._lock:
                self._until.pop(name, None)
                fd = self._pins.pop(name, None)
                self._lock.notify_all()
            if fd is not None:
                close_lock(fd)
            if evict:
                self._evict(self.index.shards[k])

    # -- room
    def _reserve(self, shard: ShardRecord) -> None:
        """Wait until `shard` fits under the limit beside the split's other shard files, then
        create its download file (which counts at the shard's size from then on)."""
        started, warned = time.monotonic(), False
        while True:
            if self._stop:
                raise _Stopped()
            with locked(self.index.folder / ROOM_LOCK):
                used, present = self._used(besides=shard.name)
                if used + shard.bytes > self.limit:
                    used -= self._reclaim(present, used + shard.bytes - self.limit)
                if used + shard.bytes <= self.limit:
                    self._tmp(shard).open("wb").close()
                    self.peak_bytes = max(self.peak_bytes, used + shard.bytes)
                    return
            if not warned and time.monotonic() - started > ROOM_WARN_S and \
                    threading.current_thread().name != PREFETCH_THREAD:
                warned = True
                warnings.warn(f"a batch has waited {ROOM_WARN_S} s for room in {self.index.folder}: {_size(used)} of "
                              f"its {_size(self.limit)} limit are held by readers of this split (another loader of "
                              f"it, or ranks of another job?); give them a larger cache limit", RuntimeWarning)
            with self._lock:
                self._lock.wait(ROOM_POLL_S)

    def _used(self, besides: str) -> tuple[int, list[str]]:
        """Bytes the split's shard files take (a download at its shard's full size) and the
        shards with a file; `besides`, the shard this process is fetching, left out."""
        used, present = 0, []
        for entry in os.scandir(self.index.folder):
            name = entry.name
            download = name.startswith(".") and name.endswith(".download")
            if download:
                name = name[1:-len(".download")]
            if name == besides or name not in self._position:
                continue
            try:
                size = entry.stat().st_size
            except FileNotFoundError:  # deleted since the listing
                continue
            used += max(size, self.index.shards[self._position[name]].bytes) if download else size
            present.append(name)
        return used, present

    def _reclaim(self, present: list[str], excess: int) -> int:
        """Delete shards nobody holds until `excess` bytes are free, those this process will
        not fetch soon first; the bytes freed."""
        with self._lock:
            mine = set(self._pins) | self._busy
            soon = {s.name: i for i, s in enumerate(self._queue)}
        freed = 0
        for name in sorted(set(present) - mine, key=lambda n: soon.get(n, len(soon)), reverse=True):
            if freed >= excess:
                break
            freed += self._evict(self.index.shards[self._position[name]])
        return freed

    def _evict(self, shard: ShardRecord) -> int:
        """Delete the shard's file, marker and any download a killed process left, unless a
        process holds or downloads it (its exclusive lock, not waited for); the bytes freed."""
        path, freed = self.index.shard_path(shard), 0
        with locked(self._lock_path(shard), wait=False) as free:
            with self._lock:
                free = free and shard.name not in self._busy
            if not free:
                return 0
            for victim in (path, self._tmp(shard)):  # the shard first: a marker alone means nothing
                with contextlib.suppress(FileNotFoundError):
                    freed += victim.stat().st_size
                    victim.unlink()
            self._marker(path).unlink(missing_ok=True)
        return freed

    def _publish(self, tmp: Path, path: Path) -> None:
        with locked(self.index.folder / ROOM_LOCK):  # a listing never misses it mid-rename
            os.replace(tmp, path)

    # -- in the background
    def prefetch(self, shards: list[ShardRecord], epoch: int | None = None) -> None:
        """As ShardCache.prefetch, but never more than `ahead` places of the queue past those
        the batches made for `epoch` have reached; shards fetched ahead that the new queue
        does not need as soon are let go of."""
        with self._lock:
            self._queued, self._queue_epoch, self._taken = {}, epoch, 0
            for place, shard in enumerate(shards):
                self._queued.setdefault(shard.name, place)
            self._frontier = max((self._queued[n] + 1 for n, last in self._until.items()
                                  if last[0] == epoch and n in self._queued), default=0)
            stale = [n for n in self._pins if n not in self._until
                     and self._queued.get(n, len(shards)) >= self._frontier + self.ahead]
        self._let_go(stale)
        super().prefetch(shards, epoch)
        with self._lock:
            self._lock.notify_all()

    def _next_queued(self) -> ShardRecord | None:
        with self._lock:
            while self._queue and not self._stop and self._taken >= self._frontier + self.ahead:
                self._lock.wait()
            if not self._queue or self._stop:
                return None
            self._taken += 1
            return self._queue.popleft()

    def close(self) -> None:
        """Stop background downloads and let go of every shard (left in the cache: a next run
        may use them, or delete them for room)."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        super().close()
        with self._lock:
            names = list(self._pins)
        self._let_go(names, evict=False)

    def summary(self) -> str:
        return (f"{super().summary()}; kept under {_size(self.limit)}: only the shards in use, so each epoch "
                f"downloads the split again")


def limit_hint(n: int) -> str:
    """"1.2G (1153433600 bytes)": `n` rounded up, as --cache-limit takes it, and exact."""
    for power, unit in ((4, "T"), (3, "G"), (2, "M"), (1, "K")):
        if n >= 1000 ** power:
            return f"{math.ceil(n / 1000 ** power * 10) / 10:g}{unit} ({n} bytes)"
    return f"{n} bytes"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---------------------------------------------------------------------------- opening a split
def mirror(remote: rm.RemoteFolder, cache_dir: Path, split: str) -> tuple[SplitIndex, dict[str, int]]:
    """Copy a remote split's manifests and the build's small files into CACHE/<key>/ (see
    the module docstring) and read the split there; also returns the remote listing
    ({relative path: bytes}). Under the folder's lock, so ranks never see a half-copied set."""
    sizes = remote.sizes()
    names = sorted(r for r in sizes if re.fullmatch(rf"{re.escape(split)}/manifest[^/]*\.json", r))
    if not names:
        raise DataError(f"{remote.name(split)} has no manifest: {remote.name('')} is not a build folder, or its "
                        f"push did not finish (run `alexprep push OUT {rm.display(remote.uri)}` again)")
    texts = {r: pushed_bytes(remote, r, sizes) for r in names}
    root = Path(cache_dir) / content_key(remote, texts)
    try:
        (root / split).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cache directory {cache_dir} cannot be used ({exc})") from None
    with locked(BuildFolder(root).lock):
        for name in SMALL_FILES:
            if name in sizes:
                _write_if_changed(root / name, pushed_bytes(remote, name, sizes))
            else:
                (root / name).unlink(missing_ok=True)
        for stale in BuildFolder(root).manifests(split):
            if f"{split}/{stale.name}" not in texts:
                stale.unlink()
        for r, data in texts.items():
            _write_if_changed(root / r, data)
        return read_split(root, split), sizes


def pushed_bytes(remote: rm.RemoteFolder, rel: str, listing) -> bytes:
    """The bytes of small object `rel`, checked against the SHA-256 its push's marker names
    when there is one (`listing`: the folder's paths); read once more on a mismatch (a
    store's short or damaged body), then one line. Objects pushed without markers (by hand,
    by an older alexprep) are taken as they come."""
    prefix = f"{rm.PUSH_MARKS}/{rel}/"
    known = {path[len(prefix):].split(".", 1)[0] for path in listing if path.startswith(prefix)}
    for _ in range(2):
        data = remote.read_bytes(rel)
        if not known or hashlib.sha256(data).hexdigest() in known:
            return data
    raise DataError(f"{remote.name(rel)} is not what its push wrote (read twice: SHA-256 "
                    f"{hashlib.sha256(data).hexdigest()[:12]}…, the push recorded {sorted(known)[0][:12]}…): changed "
                    f"by other means, or the store returns it damaged; push the build again "
                    f"(`alexprep push OUT {rm.display(remote.uri)}`)")


def content_key(remote: rm.RemoteFolder, manifests: dict[str, bytes]) -> str:
    """The cache folder's name for a split whose manifests are `manifests` ({path: text}):
    "<build id>-<digest of every shard's name, size and SHA-256>"."""
    ids, lines = set(), set()
    for rel, data in manifests.items():
        try:
            manifest = json.loads(data)
            ids.add(manifest["build_id"])
            lines.update(f"{s['name']} {int(s['bytes'])} {s['sha256']}" for s in manifest["shards"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{remote.name(rel)} is not a readable manifest") from None
    build = ids.pop()
    if ids or not re.fullmatch(r"[0-9a-f]{8,64}", str(build)):
        raise DataError(f"{remote.name(rel.split('/')[0])} mixes manifests of different builds or has a bad build id: "
                        "push one build")
    digest = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()
    return f"{build[:16]}-{digest[:16]}"


def _write_if_changed(path: Path, data: bytes) -> None:
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    write_bytes_atomic(path, data)


SHARED_FILE_SYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs",
                       "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "9p", "panfs", "wekafs", "afs")


def mount_type(path) -> str:
    """The file system type of the mount holding `path` (its longest mount point that is a
    prefix), from /proc/self/mountinfo; "" where that cannot be read (not Linux)."""
    target, best, kind = os.path.realpath(path), "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split(" - ", 1)
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[0].split()[4])  # \040: a space
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best) and len(fields) == 2:
                best, kind = point, fields[1].split()[0]
    return kind


def shared_mount_problem(fs_type: str, limited: bool, where) -> tuple[str, bool] | None:
    """What is wrong with a cache on a file system of type `fs_type` (in `where`): (the
    line to show, whether to refuse); None on a node-local one. flock(2) on NFS, Lustre and
    the like is local to each node (or not offered), so processes of other nodes sharing the
    cache would download over each other's files (each download's hash, taken from the file
    as written, still keeps a torn one from use), and a size-limited cache would delete
    shards another node's readers map."""
    base = fs_type.split(".")[-1] if fs_type.startswith("fuse.") else fs_type
    if fs_type not in SHARED_FILE_SYSTEMS and base not in SHARED_FILE_SYSTEMS:
        return None
    why = (f"the cache directory {where} is on a shared file system ({fs_type}), where the cache's locks (flock) do "
           f"not reach other nodes")
    if limited:
        return (f"{why}: a size-limited cache there could delete shards another node reads; give a --cache-dir "
                "(cache_dir=) on a node-local disk, or drop the limit"), True
    return f"{why}: give each node a --cache-dir (cache_dir=) on its own local disk", False


def _check_mount(cache_dir, limited: bool) -> None:
    """Refuse or warn (see shared_mount_problem) for the cache in `cache_dir`."""
    found = Path(cache_dir)
    while not found.exists() and found != found.parent:
        found = found.parent
    problem = shared_mount_problem(mount_type(found), limited, cache_dir)
    if problem and problem[1]:
        raise DataError(problem[0])
    if problem:
        warnings.warn(problem[0], RuntimeWarning, stacklevel=3)


def open_split(uri: str, split: str, cache_dir, cache_limit: int | None = None,
               in_use=None) -> tuple[SplitIndex, ShardCache]:
    """A split of a remote build folder (a URI) through a verified cache in `cache_dir`, its
    shards fetched on use (a local one is read in place: shards.local_folder, read_split).
    Refuses, before anything downloads, a split missing objects or too big for the cache.

    `in_use(index)` -> (shards, ahead), for a reader that needs a few shards at a time:
    how many it holds at once and how many of those it fetches ahead. A split larger than
    `cache_limit` is then read through an EvictingCache, if the limit holds them."""
    index, remote = _mirrored(uri, split, cache_dir)
    cache = ShardCache(remote, index)
    window = in_use(index) if in_use is not None else None
    evicting = cache.check_space(cache_limit, window)
    _check_mount(cache_dir, evicting)
    if evicting:
        cache = EvictingCache(remote, index, cache_limit, window[1])
    return index, cache


def split_index(uri: str, split: str, cache_dir) -> SplitIndex:
    """A remote split's index alone (its manifests mirrored into `cache_dir`), for a look at
    its classes or build id: no space check, nothing downloaded."""
    return _mirrored(uri, split, cache_dir)[0]


def _mirrored(root: str, split: str, cache_dir) -> tuple[SplitIndex, rm.RemoteFolder]:
    """The remote split's index and folder (checked: every shard its manifests list is
    there with their sizes)."""
    if not rm.is_uri(root):  # a bug, never the user's doing
        raise ValueError(f"{root} is a local build folder: shards.read_split reads it in place")
    if cache_dir is None:
        raise DataError(f"{rm.display(root)} is remote: give a cache directory on a local disk with room for its "
                        f"{split} shards (--cache-dir, or cache_dir=)")
    remote = rm.open_folder(root)
    index, sizes = mirror(remote, Path(cache_dir), split)
    for shard in index.shards:
        rel = f"{split}/{shard.name}"
        if sizes.get(rel) != shard.bytes:
            found = "missing" if rel not in sizes else f"{sizes[rel]} bytes, the manifest says {shard.bytes}"
            raise DataError(f"{remote.name(rel)} is {found}: its push did not finish or the build changed; run "
                            f"`alexprep push OUT {rm.display(root)}` again")
    return index, remote


def first_use_order(index: SplitIndex, samples: np.ndarray, rest: bool = True) -> list[ShardRecord]:
    """The split's shards in the order `samples` (sample indices, in plan order) first
    touch them, then (`rest`) those they do not touch: the order to download them in."""
    ends = np.cumsum([s.rows for s in index.shards])
    touched = np.searchsorted(ends, np.asarray(samples, np.int64), side="right")
    shards, first = np.unique(touched, return_index=True)
    ordered = shards[np.argsort(first, kind="stable")].tolist()
    others = sorted(set(range(len(index.shards))) - set(ordered)) if rest else []
    return [index.shards[k] for k in ordered + others]
