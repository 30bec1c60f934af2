"""Arrow shards: their schema, writing one crash-safely, the manifests, and reading a split.

A shard is an Apache Arrow IPC *stream* file (what Hugging Face `datasets` memory-maps;
`Dataset.from_file` rejects the IPC file format), read zero-copy with
`pa.ipc.open_stream(pa.memory_map(path)).read_all()`.

Columns: `image` (struct<bytes: binary, path: string>, Hugging Face's Image storage, JPEG
bytes; plain `binary` of raw 256x256x3 HWC uint8 for `--encoding raw`), `label` (int64,
the class index), `wnid` (string), `key` (the source path relative to SRC); for
`--resize keep-aspect` builds also `height` and `width` (int32, the stored image's size,
which differs from row to row; raw bytes are then height x width x 3). Centre-crop shards
have no size columns: every image is size x size, and their bytes are as before.

Where shards, partials and manifests lie in a build folder, and their names: build_folder.py.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from alexprep.imagenet_prep import remote as rm
from alexprep.imagenet_prep.atomic import temporary_name
# The names are build_folder.py's; shard_name and the others are imported from here too.
from alexprep.imagenet_prep.build_folder import BuildFolder, manifest_name, partial_name, shard_name  # noqa: F401
from alexprep.imagenet_prep.classes import ClassList, load_classes
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.transform import ImageSpec

FORMAT_VERSION = 1
ROWS_PER_BATCH = 64  # record batches in a stream: small enough to bound a writer's memory
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SIZE_COLUMNS = ("height", "width")  # keep-aspect builds only


def build_id(spec: ImageSpec, shard_size: int, seed: int, classes: ClassList) -> str:
    """A hash of everything that changes a shard's bytes, and of the class list."""
    payload = {
        "format": FORMAT_VERSION,
        "size": spec.size,
        "encoding": spec.encoding,
        "quality": spec.quality if spec.encoding == "jpeg" else None,
        "resample": spec.resample,
        "shard_size": shard_size,
        "seed": seed,
        "wnids": list(classes.wnids),
    }
    if spec.keep_aspect:  # only then: centre-crop builds keep the ids they always had
        payload |= {"resize": spec.resize, "max_side": spec.max_side}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- schema
def shard_schema(classes: ClassList, spec: ImageSpec, build: str, split: str) -> pa.Schema:
    """The schema, with the metadata that lets Hugging Face `datasets` show images and class
    names, and that records how the images were made."""
    if spec.encoding == "jpeg":
        image_type, image_feature = IMAGE_STRUCT, {"_type": "Image"}
    else:  # PIL cannot decode raw pixel bytes, so they are not declared as an Image
        image_type, image_feature = pa.binary(), {"dtype": "binary", "_type": "Value"}
    features = {
        "image": image_feature,
        "label": {"names": list(classes.wnids), "_type": "ClassLabel"},
        "wnid": {"dtype": "string", "_type": "Value"},
        "key": {"dtype": "string", "_type": "Value"},
    }
    described = {"build_id": build, "split": split, "encoding": spec.encoding, "size": spec.size,
                 "quality": spec.quality, "resample": spec.resample, "format": FORMAT_VERSION}
    fields = [("image", image_type), ("label", pa.int64()), ("wnid", pa.string()), ("key", pa.string())]
    if spec.keep_aspect:
        features |= {name: {"dtype": "int32", "_type": "Value"} for name in SIZE_COLUMNS}
        described |= {"resize": spec.resize, "max_side": spec.max_side}
        fields += [(name, pa.int32()) for name in SIZE_COLUMNS]
    metadata = {
        "huggingface": json.dumps({"info": {"features": features}}),
        "alexprep": json.dumps(described),
    }
    return pa.schema(fields, metadata=metadata)


def row_sizes(table: pa.Table) -> np.ndarray | None:
    """(rows, 2) int32 (height, width) of a keep-aspect shard's images; None for a
    centre-crop shard (every image size x size)."""
    if "height" not in table.column_names:
        return None
    return np.stack([table.column(name).to_numpy() for name in SIZE_COLUMNS], axis=1)


def image_bytes_column(table: pa.Table) -> pa.ChunkedArray:
    """The encoded images of a shard table, whichever storage its encoding uses."""
    column = table.column("image")
    if pa.types.is_struct(column.type):
        return pa.chunked_array([chunk.field("bytes") for chunk in column.chunks], pa.binary())
    return column


class ShardWriter:
    """Streams rows into `path` under a temporary name; `commit()` fsyncs and renames.

    Memory is bounded by one record batch, whatever the shard size.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        self.schema = schema
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self._sized = SIZE_COLUMNS[0] in schema.names
        self._rows: list[tuple] = []
        self.rows = 0

    def add(self, image: bytes, label: int, wnid: str, key: str, shape: tuple[int, int] | None = None) -> None:
        """One row; `shape` = (height, width) of the image, required by (and only stored in)
        keep-aspect shards."""
        if self._sized:
            if shape is None:
                raise ValueError("a keep-aspect shard needs each image's (height, width)")
            self._rows.append((image, label, wnid, key, int(shape[0]), int(shape[1])))
        else:
            self._rows.append((image, label, wnid, key))
        if len(self._rows) >= ROWS_PER_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        images, labels, wnids, keys, *sizes = zip(*self._rows)
        if pa.types.is_struct(self.schema.field("image").type):
            image_array = pa.array([{"bytes": b, "path": None} for b in images], IMAGE_STRUCT)
        else:
            image_array = pa.array(images, pa.binary())
        batch = pa.record_batch(
            [image_array, pa.array(labels, pa.int64()), pa.array(wnids, pa.string()), pa.array(keys, pa.string())]
            + [pa.array(values, pa.int32()) for values in sizes],
            schema=self.schema,
        )
        self._writer.write_batch(batch)
        self.rows += len(self._rows)
        self._rows = []

    def finish(self) -> tuple[int, str]:
        """Close the temporary file; returns (size in bytes, sha256). Call commit() after."""
        self._flush()
        self._writer.close()
        self._sink.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        return os.path.getsize(self.tmp), file_sha256(self.tmp)

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        except Exception:
            pass
        if self.tmp.exists():
            self.tmp.unlink()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- manifests
@dataclass(frozen=True)
class ShardRecord:
    """What a manifest says of one shard."""

    name: str
    index: int
    rows: int
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "index": self.index, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, d: dict) -> "ShardRecord":
        return cls(d["name"], int(d["index"]), int(d["rows"]), int(d["bytes"]), d["sha256"])


@dataclass
class SplitIndex:
    """Every shard of one split of a build folder, all parts together."""

    root: Path
    split: str
    build_id: str
    classes: ClassList
    spec: ImageSpec
    shard_count: int
    shards: list[ShardRecord]
    skipped: list[dict] = field(default_factory=list)
    manifests: list[dict] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return BuildFolder(self.root).split(self.split)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def shard_path(self, shard: ShardRecord) -> Path:
        return self.folder / shard.name

    def partial_path(self, shard: ShardRecord) -> Path:
        return self.folder / partial_name(shard.name)


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable manifest ({exc})") from None
    if manifest.get("format") != "alexprep-shards":
        raise DataError(f"{path} is not an alexprep manifest")
    return manifest


def local_folder(root, cache_dir=None) -> Path | None:
    """Where build folder `root` is read in place: a path, or a file:// URI given no cache
    directory (a mounted folder); None for a URI read through a cache (shard_cache.py)."""
    if not rm.is_uri(root):
        return Path(root)
    if cache_dir is None and urlsplit(root).scheme == "file":
        return Path(urlsplit(root).path)
    return None


def read_split(root: Path, split: str) -> SplitIndex:
    """Read every manifest of a split (a whole build or all its --part runs) as one dataset.

    Refuses, naming what is wrong: a missing build folder or split, parts of different
    builds, a part missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a build folder (run `alexprep build-shards SRC {root}` first)")
    folder = BuildFolder(root).split(split)
    paths = BuildFolder(root).manifests(split)
    if not paths:
        if not folder.is_dir():
            raise DataError(f"{root} has no {split}/ split (give the build folder OUT, not OUT/{split})")
        raise DataError(f"{folder} has no manifest: its build did not finish (run the same build-shards command again)")
    manifests = [read_manifest(p) for p in paths]
    ids = {m["build_id"] for m in manifests}
    if len(ids) > 1:
        detail = ", ".join(f"{Path(p).name}: {m['build_id']}" for p, m in zip(paths, manifests))
        raise DataError(f"{folder} mixes shards of different builds ({detail}): rebuild with one set of options")
    classes = load_classes(BuildFolder(root).classes)
    first = manifests[0]
    whole = [m for m in manifests if m["parts"] == 1]
    if whole:
        manifests = whole[:1]
    else:
        parts = {m["parts"] for m in manifests}
        if len(parts) > 1:
            raise DataError(f"{folder} holds manifests of --part runs with different N ({sorted(parts)})")
        n = parts.pop()
        have = {m["part"] for m in manifests}
        missing = [f"{i}/{n}" for i in range(n) if i not in have]
        if missing:
            raise DataError(f"{folder}: --part {', '.join(missing)} not built yet (found {len(have)} of {n} parts)")
    shards = sorted((ShardRecord.from_json(s) for m in manifests for s in m["shards"]), key=lambda s: s.index)
    skipped = [s for m in manifests for s in m["skipped"]]
    spec = ImageSpec(**first["image"])
    return SplitIndex(root, split, first["build_id"], classes, spec, first["shard_count"], shards, skipped, manifests)


# ---------------------------------------------------------------------------- reading
class ShardMap:
    """A shard's read-only memory map, and how the kernel is told it will be read.

    A stream's record-batch headers (and the small label and offset buffers) lie every
    ROWS_PER_BATCH rows through the file. Reading them through a map with the kernel's
    default read-around pulls in the images around each one: opening a split read every
    shard whole (measured: 100% of the bytes with the page cache cold, i.e. ~51 GB for
    ImageNet, the whole dataset read before the first batch). Under MADV_RANDOM only the
    pages touched are read (~0.5% of a shard). `normal()` restores read-around for reading
    the images themselves.
    """

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._advise("MADV_RANDOM")
        self.buffer = pa.py_buffer(self.map)  # the whole file; the table's buffers are slices of it

    def _advise(self, name: str) -> None:
        if hasattr(self.map, "madvise") and hasattr(mmap, name):  # Linux, macOS; not Windows
            self.map.madvise(getattr(mmap, name))

    def normal(self) -> None:
        self._advise("MADV_NORMAL")

    def read_table(self) -> pa.Table:
        """The stream's table, zero-copy: its buffers are slices of the map."""
        return pa.ipc.open_stream(self.buffer).read_all()


def map_shard(index: SplitIndex, shard: ShardRecord) -> tuple[pa.Table, ShardMap]:
    """Memory-map one shard for random access (see ShardMap), checking its size and row
    count against the manifest, so that a truncated or replaced shard is a clear error
    naming it. Call the map's `normal()` before reading the images in order."""
    path = index.shard_path(shard)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing (the manifest lists it): rebuild or copy it back") from None
    if size != shard.bytes:
        raise DataError(f"shard {path} has {size} bytes, the manifest says {shard.bytes}: it is truncated or from another build")
    try:
        shard_map = ShardMap(path)
        table = shard_map.read_table()
    except (pa.ArrowInvalid, OSError, ValueError) as exc:  # ValueError: mmap of an empty file
        raise DataError(f"shard {path} does not read as an Arrow stream ({exc})") from None
    if table.num_rows != shard.rows:
        raise DataError(f"shard {path} has {table.num_rows} rows, the manifest says {shard.rows}")
    return table, shard_map


def open_shard(index: SplitIndex, shard: ShardRecord) -> pa.Table:
    """Memory-map one shard, checked as `map_shard` does; only the pages of its headers are
    read from disk here, the images when they are used."""
    table, shard_map = map_shard(index, shard)
    shard_map.normal()
    return table


def read_labels(index: SplitIndex) -> np.ndarray:
    """All labels of a split in shard order, without touching the image bytes."""
    out = []
    for shard in index.shards:
        out.append(map_shard(index, shard)[0].column("label").to_numpy().copy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)
