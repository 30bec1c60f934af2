"""The node-local cache of a remote build's shards: each shard downloaded once per node,
checked against its manifest's size and SHA-256 before anything can map it, then memory-
mapped like a local shard (docs/design.md, "Remote build folders").

    CACHE/<build id>/classes.json, stats.npz, stats.json   copied from the remote on every open
    CACHE/<build id>/<split>/manifest*.json                  the remote's manifests
    CACHE/<build id>/<split>/<shard>.arrow                   a verified shard (read_split finds it)
    CACHE/<build id>/<split>/.<shard>.arrow.ok               what was verified: sha256, bytes, mtime_ns
    CACHE/<build id>/<split>/.<shard>.arrow.lock             flock: one download per shard per node
    CACHE/<build id>/<split>/.<shard>.arrow.download         a download in progress (never mapped)

A shard's final name appears only by a rename after its hash matched, so a kill -9 at any
point leaves a temporary file the next holder of the lock overwrites. A shard whose marker
matches the manifest's hash and the file's size and mtime is reused without rehashing (a
file changed in place since has another mtime; bit rot is what `alexprep verify` is for).
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from alexprep.imagenet_prep import remote as rm
from alexprep.imagenet_prep.atomic import write_bytes_atomic, write_text_atomic
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.shards import ShardRecord, SplitIndex, file_sha256, read_split

SMALL_FILES = ("classes.json", "stats.npz", "stats.json")  # what the loaders read besides shards
PREFETCH_WORKERS = 4  # parallel downloads per process: S3 serves each stream at a fraction of a NIC
RESERVE = 1 << 30  # free space left on the cache's disk after the split is in it
# Lock descriptors open now (locked or about to be), closed in forked children. flock locks
# belong to the open file, which a fork shares: a DataLoader worker forked while a download
# thread held (or was about to take) a shard's lock would otherwise keep that shard locked
# after the parent let go, until the worker exits (seen: a test hung on it). _FORK_GUARD
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


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True):
    """flock `path` exclusively (as build_lock.py does: the kernel drops it if we die);
    yields False at once instead of waiting when `wait` is False and another holds it."""
    with _FORK_GUARD:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _HELD.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        with _FORK_GUARD:
            _HELD.discard(fd)
            os.close(fd)


class _Stopped(Exception):
    """The cache was closed while a background download ran."""


class ShardCache:
    """A remote split's shards, made local on demand (`fetch`) and ahead of use (`prefetch`)."""

    def __init__(self, remote: rm.RemoteFolder, index: SplitIndex, workers: int | None = None):
        self.remote, self.index, self.workers = remote, index, workers or PREFETCH_WORKERS
        self._local: set[str] = set()  # shards this process has seen verified
        self._pid = os.getpid()
        self._init_threads()
        self.downloads = 0  # shards this process downloaded (tests and benchmarks count them)
        self.downloaded_bytes = 0
        self.error: Exception | None = None  # the first background failure; fetch() redoes that shard

    def _init_threads(self) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[ShardRecord] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._stop = False

    def __getstate__(self):  # a spawned DataLoader worker: no threads, no queue
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_queue", "_threads")}

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
        with _locked(path.with_name(f".{shard.name}.lock"), wait) as held:
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
        tmp = path.with_name(f".{shard.name}.download")
        try:
            for attempt in range(2):
                with rm.remote_errors(self.remote.uri):
                    size, sha = rm.retrying(lambda: self._copy(rel, tmp), f"downloading {self.remote.name(rel)}")
                if (size, sha) == (shard.bytes, shard.sha256):
                    break
            else:
                raise DataError(f"{self.remote.name(rel)} differs from its manifest (downloaded twice: {size} bytes, "
                                f"SHA-256 {sha[:12]}…; the manifest says {shard.bytes} bytes, {shard.sha256[:12]}…): "
                                f"the remote build is damaged; push it again (`alexprep push OUT {rm.display(self.remote.uri)}`)")
        except FileNotFoundError:
            raise DataError(f"{self.remote.name(rel)} is missing (its manifest lists it): push the build again") from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.replace(tmp, path)
        st = os.stat(path)
        write_text_atomic(self._marker(path), json.dumps({"sha256": sha, "bytes": size, "mtime_ns": st.st_mtime_ns}))
        with self._lock:
            self.downloads += 1
            self.downloaded_bytes += size

    def _copy(self, rel: str, tmp: Path) -> tuple[int, str]:
        """Stream one object into `tmp` (truncating what a failed try left), hashing as it
        goes; fsynced, so that a rename after it is durable."""
        digest, size = hashlib.sha256(), 0
        with self.remote.open_input(rel) as src, open(tmp, "wb") as dst:
            while True:
                if self._stop:
                    raise _Stopped()
                chunk = src.read(rm.CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        return size, digest.hexdigest()

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
    def prefetch(self, shards: list[ShardRecord]) -> None:
        """Download `shards` in this order in the background, `workers` at a time (replacing
        the order of an earlier call). Shards another process holds are waited for last."""
        with self._lock:
            self._queue = collections.deque(s for s in shards if s.name not in self._local)
            self._threads = [t for t in self._threads if t.is_alive()]
            while self._queue and len(self._threads) < self.workers and not self._stop:
                thread = threading.Thread(target=self._prefetch_loop, daemon=True, name="alexprep-prefetch")
                thread.start()
                self._threads.append(thread)

    def _prefetch_loop(self) -> None:
        later = []
        try:
            while True:
                with self._lock:
                    shard = self._queue.popleft() if self._queue and not self._stop else None
                if shard is None:
                    break
                if not self.fetch(shard, wait=False):
                    later.append(shard)  # another rank of this node is downloading it
            for shard in later:
                if not self._stop:
                    self.fetch(shard)
        except _Stopped:
            pass
        except Exception as exc:  # the loader's own fetch of that shard reports it
            self.error = self.error or exc

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

    def check_space(self, limit: int | None) -> None:
        """Refuse, before anything downloads, a split that does not fit: over `limit`
        bytes, or more than the cache's disk has free (keeping RESERVE)."""
        total = sum(s.bytes for s in self.index.shards)
        need = sum(s.bytes for s in self.index.shards if not self.is_cached(s))
        where = self.index.folder
        if limit is not None and total > limit:
            raise DataError(f"{self.remote.name(self.index.split)} takes {_size(total)}, more than the cache limit "
                            f"of {_size(limit)}: raise the limit or use a cache on a larger disk")
        free = shutil.disk_usage(where).free
        if need > free - RESERVE:
            raise DataError(f"the cache {where.parent.parent} has {_size(free)} free; {self.remote.name(self.index.split)} "
                            f"needs {_size(need)} more (and {_size(RESERVE)} to spare): free space there or give "
                            f"another cache directory")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---------------------------------------------------------------------------- opening a split
def mirror(remote: rm.RemoteFolder, cache_dir: Path, split: str) -> tuple[SplitIndex, dict[str, int]]:
    """Copy a remote split's manifests and the build's small files into
    CACHE/<build id>/ and read the split there; also returns the remote listing
    ({relative path: bytes}). Under the build's lock, so ranks never see a half-copied set."""
    sizes = remote.sizes()
    names = sorted(r for r in sizes if re.fullmatch(rf"{re.escape(split)}/manifest[^/]*\.json", r))
    if not names:
        raise DataError(f"{remote.name(split)} has no manifest: {remote.name('')} is not a build folder, or its "
                        f"push did not finish (run `alexprep push OUT {rm.display(remote.uri)}` again)")
    texts = {r: remote.read_bytes(r) for r in names}
    ids = set()
    for r, data in texts.items():
        try:
            ids.add(json.loads(data)["build_id"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{remote.name(r)} is not a readable manifest") from None
    build = ids.pop()
    if ids or not re.fullmatch(r"[0-9a-f]{8,64}", str(build)):
        raise DataError(f"{remote.name(split)} mixes manifests of different builds or has a bad build id: push one build")
    root = Path(cache_dir) / build
    try:
        (root / split).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cache directory {cache_dir} cannot be used ({exc})") from None
    with _locked(root / ".lock"):
        for name in SMALL_FILES:
            if name in sizes:
                _write_if_changed(root / name, remote.read_bytes(name))
            else:
                (root / name).unlink(missing_ok=True)
        for stale in (root / split).glob("manifest*.json"):
            if f"{split}/{stale.name}" not in texts:
                stale.unlink()
        for r, data in texts.items():
            _write_if_changed(root / r, data)
        return read_split(root, split), sizes


def _write_if_changed(path: Path, data: bytes) -> None:
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    write_bytes_atomic(path, data)


def open_split(root, split: str, cache_dir=None, cache_limit: int | None = None) -> tuple[SplitIndex, ShardCache | None]:
    """A split of a build folder: a local one read in place (cache None), or a remote one
    (a URI) through a verified cache in `cache_dir`, its shards fetched on use. Refuses,
    before anything downloads, a remote split missing objects or too big for the cache."""
    if not rm.is_uri(root):
        return read_split(Path(root), split), None
    if cache_dir is None:
        if urlsplit(root).scheme == "file":  # a mounted folder: read in place
            return read_split(Path(urlsplit(root).path), split), None
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
    cache = ShardCache(remote, index)
    cache.check_space(cache_limit)
    return index, cache


def first_use_order(index: SplitIndex, samples: np.ndarray) -> list[ShardRecord]:
    """The split's shards in the order `samples` (sample indices, in plan order) first
    touch them, then those they do not touch: the order to download them in."""
    ends = np.cumsum([s.rows for s in index.shards])
    touched = np.searchsorted(ends, np.asarray(samples, np.int64), side="right")
    shards, first = np.unique(touched, return_index=True)
    ordered = shards[np.argsort(first, kind="stable")].tolist()
    rest = sorted(set(range(len(index.shards))) - set(ordered))
    return [index.shards[k] for k in ordered + rest]
