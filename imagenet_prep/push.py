"""Publishing a finished build folder to a URI: `alexprep push OUT s3://bucket/path`
(docs/design.md, "Remote build folders").

A reader takes a folder for a build only through its manifests, so the order keeps a half-
finished upload from ever being one: remote manifests that differ from OUT's are deleted
first, then the shards and their statistics partials go up in parallel, then classes.json
and stats.*, and the manifests last.

What is on the remote decides what goes up, never a record kept on this machine: a push
after another build's push, after a kill, or after someone overwrote an object repairs the
remote. Object stores keep no content hash that pyarrow can read (S3's ETag is an MD5 only
for single-part uploads; user metadata is not written), so each upload leaves a marker
object beside the build,

    URI/.pushed/<path>/<SHA-256 of the bytes sent>.<the object's version after the upload>

where the version is what changes whenever the object is written again (its ETag on S3
and GCS, its modification time elsewhere). A file is skipped only when the remote object
has the local size, a marker with the local SHA-256, and still the version that marker
names; a marker is deleted before its object is replaced, so a kill in between leaves no
marker and the next push uploads the object again. Manifests are compared byte for byte.
Readers check the manifests and small files they read against their markers' SHA-256
(shard_cache.mirror): a store's short or damaged body never becomes a build's index.
"""
from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from alexprep.imagenet_prep import layout
from alexprep.imagenet_prep import remote as rm
from alexprep.imagenet_prep.build_folder import ROOT_FILES, BuildFolder, is_manifest, partial_name
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.shards import file_sha256, read_split

MARKS = rm.PUSH_MARKS  # the folder of upload markers beside the build (see above)
WORKERS = 8


@dataclass
class PushReport:
    uploaded: int = 0
    uploaded_bytes: int = 0
    skipped: int = 0
    seconds: float = 0.0
    order: list[str] = field(default_factory=list)  # relative paths in the order their uploads finished


@dataclass(frozen=True)
class _File:
    rel: str  # path relative to OUT and to the URI
    size: int
    sha256: str  # from the manifest for shards; computed for the rest


def _local_files(out: Path) -> tuple[list[_File], list[_File], list[_File]]:
    """(shards and partials, classes and stats, manifests) of a complete build in OUT."""
    splits = [s for s in layout.SPLITS if (out / s).is_dir()]
    if not splits:
        raise DataError(f"{out} holds no train/ or val/ split: is it a build folder?")
    data, manifests = [], []
    for split in splits:
        index = read_split(out, split)
        if len(index.shards) != index.shard_count:
            raise DataError(f"{index.folder}: the manifests list {len(index.shards)} of {index.shard_count} shards; "
                            "finish the build (every --part) before pushing it")
        for shard in index.shards:
            data.append(_File(f"{split}/{shard.name}", shard.bytes, shard.sha256))
            partial = index.folder / partial_name(shard.name)
            if partial.exists():
                data.append(_hashed(out, f"{split}/{partial.name}"))
        manifests += [_hashed(out, f"{split}/{p.name}") for p in BuildFolder(out).manifests(split)]
    small = [_hashed(out, name) for name in ROOT_FILES if (out / name).exists()]  # after the shards, before the manifests
    return data, small, manifests


def _hashed(out: Path, rel: str) -> _File:
    path = out / rel
    return _File(rel, path.stat().st_size, file_sha256(path))


class _Pusher:
    """One push: what the remote has, what to skip, the uploads."""

    def __init__(self, out: Path, remote: rm.RemoteFolder, workers: int, progress):
        self.out, self.remote, self.workers, self.progress = out, remote, workers, progress
        self.report = PushReport()
        self.listing: dict[str, tuple[int, int]] = {}  # relative path -> (bytes, mtime) on the remote
        self.marks: dict[str, list[tuple[str, str]]] = {}  # relative path -> its markers' (SHA-256, version)
        self.same_manifests: set[str] = set()  # remote manifests already byte-identical to OUT's
        self._done_bytes = 0
        self._lock = threading.Lock()

    def unpublish_differing(self, manifests: list[_File]) -> None:
        """List the remote (objects and markers), then delete the manifests that OUT will
        not write identically: until the new ones land, the remote is no build."""
        self.listing = self.remote.listing()
        for rel in self.listing:
            if rel.startswith(MARKS + "/"):
                path, _, mark = rel[len(MARKS) + 1:].rpartition("/")
                sha, _, version = mark.partition(".")
                self.marks.setdefault(path, []).append((sha, version))
        local = {m.rel: m for m in manifests}
        for rel in [r for r in self.listing if is_manifest(r) and not r.startswith(MARKS + "/")]:
            mine = local.get(rel)
            if mine is not None and mine.size == self.listing[rel][0] and \
                    hashlib.sha256(self.remote.read_bytes(rel)).hexdigest() == mine.sha256:
                self.same_manifests.add(rel)
            else:
                self.remote.delete(rel)

    def needed(self, f: _File) -> bool:
        """Whether `f` must go up (see the module docstring); a HEAD request where a marker
        says the remote holds its bytes."""
        if is_manifest(f.rel):
            return f.rel not in self.same_manifests
        if self.listing.get(f.rel, (None,))[0] != f.size:
            return True
        versions = {version for sha, version in self.marks.get(f.rel, []) if sha == f.sha256}
        return not versions or self.remote.version(f.rel) not in versions

    def select(self, files: list[_File]) -> list[_File]:
        """The files of `files` that must go up, checked `workers` at a time."""
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            return [f for f, need in zip(files, pool.map(self.needed, files)) if need]

    def push(self, files: list[_File], total: int) -> None:
        """Upload `files` in parallel; returns when all are up (raises the first failure)."""
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            for future in [pool.submit(self._upload_one, f, total) for f in files]:
                future.result()

    def _upload_one(self, f: _File, total: int) -> None:
        for sha, version in self.marks.get(f.rel, []):  # before the object changes
            self.remote.delete(f"{MARKS}/{f.rel}/{sha}.{version}")
        sha = self.remote.retrying(lambda: self._upload(f, total), f"uploading {self.remote.name(f.rel)}")
        if sha != f.sha256:
            self.remote.delete(f.rel)
            raise DataError(f"{self.out / f.rel} differs from its manifest (SHA-256) and was not pushed: run "
                            f"`alexprep verify {self.out}` and rebuild what it names")
        self.remote.write_bytes(f"{MARKS}/{f.rel}/{f.sha256}.{self.remote.version(f.rel)}", b"")
        with self._lock:
            self.report.uploaded += 1
            self.report.uploaded_bytes += f.size
            self.report.order.append(f.rel)

    def _upload(self, f: _File, total: int) -> str:
        digest = hashlib.sha256()
        with open(self.out / f.rel, "rb") as src, self.remote.open_output(f.rel) as dst:
            while chunk := src.read(rm.CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                with self._lock:
                    self._done_bytes += len(chunk)
                    done = min(self._done_bytes, total)
                if self.progress:
                    self.progress(done, total)
        return digest.hexdigest()


def push_build(out, uri: str, workers: int = WORKERS, progress=None) -> PushReport:
    """Upload build folder `out` to `uri` (see the module docstring for the order and what is
    skipped). `progress(done_bytes, total_bytes)` is called as bytes go up."""
    start = time.perf_counter()
    out = Path(out).expanduser()
    if not out.is_dir():
        raise DataError(f"{out} is not a build folder (run `alexprep build-shards SRC {out}` first)")
    if not rm.is_uri(uri):
        raise DataError(f"{uri} is not a URI: push to s3://bucket/path, gs://…, hdfs://… or file:///path")
    data, small, manifests = _local_files(out)
    pusher = _Pusher(out, rm.open_folder(uri), workers, progress)
    pusher.unpublish_differing(manifests)
    phases = [pusher.select(phase) for phase in (data, small, manifests)]
    total = sum(f.size for phase in phases for f in phase)
    pusher.report.skipped = len(data) + len(small) + len(manifests) - sum(len(p) for p in phases)
    for phase in phases:  # shards, then classes and stats, then the manifests: each whole before the next
        pusher.push(phase, total)
    pusher.report.seconds = time.perf_counter() - start
    return pusher.report
