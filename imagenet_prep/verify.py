"""Checking a build folder against its manifests: every shard present, whole and unchanged.
A remote one (a URI) is checked where it is: each object's SHA-256 taken over a stream,
nothing kept on disk (with decode_images, one shard at a time in a temporary folder)."""
from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from alexprep.imagenet_prep import layout
from alexprep.imagenet_prep import remote as rm
from alexprep.imagenet_prep.build_folder import is_manifest
from alexprep.imagenet_prep.devices import available_cpus
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.shards import file_sha256, image_bytes_column, open_shard, read_split, row_sizes
from alexprep.imagenet_prep.transform import decode


@dataclass
class VerifyReport:
    shards: int = 0
    rows: int = 0
    bad: list[str] = field(default_factory=list)  # "path: reason"

    @property
    def ok(self) -> bool:
        return not self.bad


def verify_build(root: Path, decode_images: bool = False, on_shard=None, workers: int | None = None) -> VerifyReport:
    """Check size, row count and checksum of every shard (and with decode_images, that every
    image decodes to size x size x 3, or for keep-aspect builds to the row's recorded
    height x width x 3, within the build's size limits). Missing splits are fine; a folder
    with none is not. Shards are checked by `workers` threads (default: the cores; hashing
    and decoding release the GIL). `root` may be a URI (see the module docstring)."""
    if rm.is_uri(root):
        return _verify_remote(root, decode_images, on_shard, workers)
    root = Path(root).expanduser()
    report = VerifyReport()
    if not root.is_dir():
        raise DataError(f"{root} is not a build folder (it does not exist or is a file)")
    splits = [s for s in layout.SPLITS if (root / s).is_dir()]
    if not splits:
        raise DataError(f"{root} holds no train/ or val/ split: is it a build folder?")
    with ThreadPoolExecutor(max(1, workers or available_cpus())) as pool:
        for split in splits:
            index = read_split(root, split)
            if len(index.shards) != index.shard_count:
                have = {s.index for s in index.shards}
                missing = [i for i in range(index.shard_count) if i not in have]
                report.bad.append(f"{index.folder}: manifests list {len(index.shards)} of {index.shard_count} "
                                  f"shards (missing indices {missing[:5]}{'…' if len(missing) > 5 else ''})")
            good = []
            checked = pool.map(lambda shard: _check_shard(index, shard, decode_images), index.shards)
            for shard, (rows, problem) in zip(index.shards, checked):
                report.shards += 1
                report.rows += rows
                if problem:
                    report.bad.append(problem)
                else:
                    good.append(shard)
                if on_shard:
                    on_shard()
            report.bad += _repeated_keys(index, good)
    return report


def _repeated_keys(index, shards) -> list[str]:
    """A key written more than once in `shards` (those that match their manifests: a damaged
    one is reported by its own check, and its keys may not even decode), named with its
    shards. A build writes each image once. Keys are compared by hash first, so that a
    split's 1.28M keys are never all held as strings at once."""
    hashes = []
    for shard in shards:
        keys = open_shard(index, shard).column("key").to_pylist()
        hashes.append(np.fromiter(map(hash, keys), np.int64, len(keys)))
    values, counts = np.unique(np.concatenate(hashes or [np.zeros(0, np.int64)]), return_counts=True)
    suspects = values[counts > 1]
    if not len(suspects):
        return []
    shards_of: dict[str, list[str]] = {}
    for shard, shard_hashes in zip(shards, hashes):
        rows = np.flatnonzero(np.isin(shard_hashes, suspects))
        if len(rows):
            keys = open_shard(index, shard).column("key").take(pa.array(rows)).to_pylist()
            for key in keys:
                shards_of.setdefault(key, []).append(shard.name)
    return [f"{index.folder}: key {key!r} is written {len(names)} times (in {', '.join(sorted(names))}): a build "
            "writes each image once; rebuild this split" for key, names in sorted(shards_of.items()) if len(names) > 1]


def _verify_remote(uri: str, decode_images: bool, on_shard, workers: int | None) -> VerifyReport:
    """verify_build for a URI: its manifests (and classes.json) copied to a temporary folder,
    then every object streamed and hashed, `workers` (default 8: network-bound) at a time."""
    from alexprep.imagenet_prep.shard_cache import mirror

    remote, report = rm.open_folder(uri), VerifyReport()
    listed = remote.sizes()
    splits = [s for s in layout.SPLITS if any(r.startswith(f"{s}/") and is_manifest(r) for r in listed)]
    if not splits:
        raise DataError(f"{rm.display(uri)} holds no manifest of a train/ or val/ split: is it a build folder "
                        "whose push finished?")
    with tempfile.TemporaryDirectory(prefix="alexprep-verify-") as tmp, ThreadPoolExecutor(workers or 8) as pool:
        for split in splits:
            index, _ = mirror(remote, Path(tmp), split)
            for rows, problem in pool.map(lambda shard: _check_object(remote, index, shard, decode_images),
                                          index.shards):
                report.shards += 1
                report.rows += rows
                if problem:
                    report.bad.append(problem)
                if on_shard:
                    on_shard()
    return report


def _check_object(remote, index, shard, decode_images: bool) -> tuple[int, str | None]:
    """(rows, None) for a remote shard that matches its manifest, else (0, what is wrong)."""
    rel = f"{index.split}/{shard.name}"
    try:
        if not decode_images:
            size, sha = remote.sha256(rel)
            if (size, sha) != (shard.bytes, shard.sha256):
                return 0, f"shard {remote.name(rel)}: {size} bytes, checksum {sha[:12]}…; the manifest says " \
                          f"{shard.bytes} bytes, {shard.sha256[:12]}…"
            return shard.rows, None
        path = index.shard_path(shard)
        try:
            path.write_bytes(remote.read_bytes(rel))
            rows, problem = _check_shard(index, shard, True)
        finally:
            path.unlink(missing_ok=True)
        return rows, problem and problem.replace(str(path), remote.name(rel))
    except FileNotFoundError:
        return 0, f"shard {remote.name(rel)}: missing (its manifest lists it)"
    except DataError as exc:
        return 0, str(exc)


def _check_shard(index, shard, decode_images: bool) -> tuple[int, str | None]:
    """(rows, None) for a shard that matches its manifest, else (0, what is wrong)."""
    path = index.shard_path(shard)
    try:
        table = open_shard(index, shard)
        if file_sha256(path) != shard.sha256:
            raise DataError(f"shard {path}: checksum differs from the manifest")
        spec = index.spec
        sizes = row_sizes(table)
        if spec.keep_aspect and sizes is None:
            raise DataError(f"shard {path}: no height/width columns, but the build is keep-aspect")
        if decode_images:
            for i, data in enumerate(image_bytes_column(table).to_pylist()):
                _check_image(path, i, data, spec, sizes)
        return table.num_rows, None
    except DataError as exc:
        return 0, str(exc)


def _check_image(path, i: int, data: bytes, spec, sizes) -> None:
    want = (spec.size, spec.size, 3) if sizes is None else (int(sizes[i, 0]), int(sizes[i, 1]), 3)
    if sizes is not None and not _size_fits(want[:2], spec.size, spec.max_side):
        raise DataError(f"shard {path} row {i}: recorded size {want[0]}x{want[1]} breaks the "
                        f"build's shorter side {spec.size}, longer side at most {spec.max_side}")
    try:
        if spec.encoding == "raw" and len(data) != want[0] * want[1] * 3:
            raise ValueError(f"{len(data)} bytes, not {want[0]}x{want[1]}x3")
        shape = decode(data, spec, want[:2]).shape
    except Exception as exc:
        raise DataError(f"shard {path} row {i}: does not decode ({exc})") from None
    if shape != want:
        raise DataError(f"shard {path} row {i}: decodes to {shape}, not {want}")


def _size_fits(shape: tuple[int, int], size: int, max_side: int) -> bool:
    """A keep-aspect image: shorter side `size`, longer at most `max_side`, or (a capped
    panorama) longer side `max_side` and shorter below `size`."""
    short, long = min(shape), max(shape)
    return short >= 1 and long <= max_side and (short == size or (long == max_side and short < size))
