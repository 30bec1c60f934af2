"""Publishing a finished build folder to a URI: `alexprep push OUT s3://bucket/path`
(docs/design.md, "Remote build folders").

A reader takes a folder for a build only through its manifests, so the order keeps a half-
finished upload from ever being one: remote manifests that differ from OUT's are deleted
first, then the shards and their statistics partials go up in parallel, then classes.json
and stats.*, and the manifests last.

A second push uploads only what differs. An object is skipped when its remote size is the
local file's and its SHA-256 is known to be the local one: recorded in
OUT/.push-<hash of the URI>.jsonl when this machine uploaded it, or, for a shard, listed in
the remote's own manifest (so a push from another machine skips what is already there).
Object stores keep no hash we can ask for cheaply (S3's ETag is an MD5 only for single-part
uploads), and sizes alone would not do: every raw shard has the same size.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from alexprep.imagenet_prep import layout
from alexprep.imagenet_prep import remote as rm
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.shards import file_sha256, partial_name, read_split

ROOT_FILES = ("classes.json", "stats.npz", "stats.json", "stats.png")  # after the shards, before the manifests
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
        manifests += [_hashed(out, f"{split}/{p.name}") for p in sorted(index.folder.glob("manifest*.json"))]
    small = [_hashed(out, name) for name in ROOT_FILES if (out / name).exists()]
    return data, small, manifests


def _hashed(out: Path, rel: str) -> _File:
    path = out / rel
    return _File(rel, path.stat().st_size, file_sha256(path))


class _Record:
    """OUT/.push-<hash>.jsonl: one line per finished upload, appended (a torn last line
    after a kill is ignored)."""

    def __init__(self, out: Path, uri: str):
        self.path = out / f".push-{hashlib.sha256(rm.display(uri).encode()).hexdigest()[:12]}.jsonl"
        self.known: dict[str, tuple[int, str]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.known[entry["path"]] = (int(entry["bytes"]), entry["sha256"])
                except (ValueError, KeyError, TypeError):
                    continue
        self._lock = threading.Lock()

    def add(self, f: _File) -> None:
        with self._lock, open(self.path, "a") as out:
            out.write(json.dumps({"path": f.rel, "bytes": f.size, "sha256": f.sha256}) + "\n")
            out.flush()
        self.known[f.rel] = (f.size, f.sha256)


class _Pusher:
    """One push: what the remote has, what to skip, the uploads."""

    def __init__(self, out: Path, remote: rm.RemoteFolder, workers: int, progress):
        self.out, self.remote, self.workers, self.progress = out, remote, workers, progress
        self.record = _Record(out, remote.uri)
        self.report = PushReport()
        self.sizes: dict[str, int] = {}
        self.remote_said: dict[str, str] = {}  # path -> SHA-256 the remote is known to hold
        self._done_bytes = 0
        self._lock = threading.Lock()

    def unpublish_differing(self, manifests: list[_File]) -> None:
        """Read the remote's manifests (what they say of its shards), then delete those that
        OUT will not write identically: until the new ones land, the remote is no build."""
        self.sizes = self.remote.sizes()
        local = {m.rel: m for m in manifests}
        for rel in [r for r in self.sizes if r.rsplit("/", 1)[-1].startswith("manifest") and r.endswith(".json")]:
            data = self.remote.read_bytes(rel)
            try:
                split = rel.split("/", 1)[0]
                for shard in json.loads(data)["shards"]:
                    self.remote_said[f"{split}/{shard['name']}"] = shard["sha256"]
            except (ValueError, KeyError, TypeError):
                pass
            mine = local.get(rel)
            if mine is None or mine.size != len(data) or mine.sha256 != hashlib.sha256(data).hexdigest():
                self.remote.delete(rel)
                del self.sizes[rel]
            else:
                self.remote_said[rel] = mine.sha256  # the same bytes are there already

    def needed(self, f: _File) -> bool:
        if self.sizes.get(f.rel) != f.size:
            return True
        return self.record.known.get(f.rel) != (f.size, f.sha256) and self.remote_said.get(f.rel) != f.sha256

    def push(self, files: list[_File], total: int) -> None:
        """Upload `files` in parallel; returns when all are up (raises the first failure)."""
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            for future in [pool.submit(self._upload_one, f, total) for f in files]:
                future.result()

    def _upload_one(self, f: _File, total: int) -> None:
        sha = rm.retrying(lambda: self._upload(f, total), f"uploading {self.remote.name(f.rel)}")
        if sha != f.sha256:
            self.remote.delete(f.rel)
            raise DataError(f"{self.out / f.rel} differs from its manifest (SHA-256) and was not pushed: run "
                            f"`alexprep verify {self.out}` and rebuild what it names")
        self.record.add(f)
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
    out = Path(out)
    if not out.is_dir():
        raise DataError(f"{out} is not a build folder (run `alexprep build-shards SRC {out}` first)")
    if not rm.is_uri(uri):
        raise DataError(f"{uri} is not a URI: push to s3://bucket/path, gs://…, hdfs://… or file:///path")
    data, small, manifests = _local_files(out)
    pusher = _Pusher(out, rm.open_folder(uri), workers, progress)
    pusher.unpublish_differing(manifests)
    phases = [[f for f in phase if pusher.needed(f)] for phase in (data, small, manifests)]
    total = sum(f.size for phase in phases for f in phase)
    pusher.report.skipped = len(data) + len(small) + len(manifests) - sum(len(p) for p in phases)
    for phase in phases:  # shards, then classes and stats, then the manifests: each whole before the next
        pusher.push(phase, total)
    pusher.report.seconds = time.perf_counter() - start
    return pusher.report
