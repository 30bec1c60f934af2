"""The shard contract: plain pyarrow opens it, its schema says what it holds, and damage is
a clear error naming the shard."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
import io

from alexprep.imagenet_prep.classes import ClassList
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.samples import SplitSamples
from alexprep.imagenet_prep.shards import (
    ShardRecord, ShardWriter, SplitIndex, image_bytes_column, open_shard, read_split, shard_name, shard_schema,
)
from alexprep.imagenet_prep.transform import ImageSpec
from alexprep.imagenet_prep.verify import verify_build


def test_plain_pyarrow_reads_a_shard(photo_build):
    path = sorted((photo_build / "train").glob("*.arrow"))[0]
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    assert table.column_names == ["image", "label", "wnid", "key"]
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    row = table.slice(0, 1).to_pylist()[0]
    assert row["image"]["path"] is None
    with Image.open(io.BytesIO(row["image"]["bytes"])) as img:
        assert img.format == "JPEG" and img.size == (256, 256)
    assert row["key"].startswith("train/" + row["wnid"] + "/")


def test_schema_metadata_declares_images_and_class_names(photo_build, photo_build_raw):
    path = sorted((photo_build / "train").glob("*.arrow"))[0]
    schema = pa.ipc.open_stream(pa.memory_map(str(path))).schema
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    classes = json.loads((photo_build / "classes.json").read_text())["classes"]
    assert features["image"] == {"_type": "Image"}
    assert features["label"] == {"names": [c["wnid"] for c in classes], "_type": "ClassLabel"}
    info = json.loads(schema.metadata[b"alexprep"])
    assert info["encoding"] == "jpeg" and info["quality"] == 95 and info["size"] == 256
    assert info["build_id"] == read_split(photo_build, "train").build_id
    raw = sorted((photo_build_raw / "train").glob("*.arrow"))[0]
    raw_schema = pa.ipc.open_stream(pa.memory_map(str(raw))).schema
    assert raw_schema.field("image").type == pa.binary()
    assert json.loads(raw_schema.metadata[b"huggingface"])["info"]["features"]["image"]["_type"] == "Value"


def test_hugging_face_datasets_shows_images_and_class_names(photo_build, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    path = sorted((photo_build / "train").glob("*.arrow"))[0]
    ds = datasets.Dataset.from_file(str(path))
    assert isinstance(ds.features["image"], datasets.Image)
    wnids = [c["wnid"] for c in json.loads((photo_build / "classes.json").read_text())["classes"]]
    assert ds.features["label"].names == wnids
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (256, 256)
    assert ds.features["label"].int2str(row["label"]) == row["wnid"]
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    assert len(ds) == table.num_rows


def test_verify_passes_a_good_build(photo_build):
    report = verify_build(photo_build, decode_images=True)
    assert report.ok and report.shards == 8 and report.rows == 44


@pytest.fixture()
def damaged(photo_build, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(photo_build, out)
    return out


def test_truncated_shard_is_a_clear_error(damaged):
    index = read_split(damaged, "train")
    path = index.shard_path(index.shards[1])
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=f"{path.name} has 1000 bytes, the manifest says"):
        open_shard(index, index.shards[1])
    report = verify_build(damaged)
    assert not report.ok and len(report.bad) == 1 and path.name in report.bad[0]


def test_changed_bytes_fail_the_checksum(damaged):
    index = read_split(damaged, "val")
    path = index.shard_path(index.shards[0])
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # same size, one byte flipped inside an image
    path.write_bytes(bytes(data))
    report = verify_build(damaged)
    assert len(report.bad) == 1 and "checksum" in report.bad[0]


def test_the_manifest_hash_is_hashlibs_over_a_shard_larger_than_the_read_block(tmp_path):
    """A raw shard of 24 images (4.7 MB) is hashed in more than one 4 MiB block: the
    manifest's SHA-256 is hashlib's over the whole file, and a byte flipped past the first
    4 MiB fails the check."""
    from alexprep.imagenet_prep.build import BuildConfig, build_shards
    from alexprep.imagenet_prep.sample_data import write_photo_tree

    write_photo_tree(tmp_path / "src", classes=2, train_per_class=12, val_per_class=0, seed=3)
    out = tmp_path / "out"
    build_shards(tmp_path / "src", out, BuildConfig(spec=ImageSpec(encoding="raw"), shard_size=24, workers=1))
    index = read_split(out, "train")
    (shard,) = index.shards
    path = index.shard_path(shard)
    data = path.read_bytes()
    assert len(data) > 4 * 2**20 and shard.bytes == len(data)
    assert shard.sha256 == hashlib.sha256(data).hexdigest()
    assert verify_build(out).ok
    last = image_bytes_column(open_shard(index, shard))[23].as_py()
    at = data.index(last) + len(last) // 2  # the middle of the last image's pixels
    assert at > 4 * 2**20
    damaged = bytearray(data)
    damaged[at] ^= 0xFF
    path.write_bytes(bytes(damaged))
    report = verify_build(out)
    assert len(report.bad) == 1 and path.name in report.bad[0] and "checksum" in report.bad[0]


def test_missing_shard_is_named(damaged):
    index = read_split(damaged, "train")
    index.shard_path(index.shards[0]).unlink()
    with pytest.raises(DataError, match="train-00000-of-00006.arrow is missing"):
        open_shard(index, index.shards[0])
    assert "is missing" in verify_build(damaged).bad[0]


def test_shards_of_different_builds_are_not_mixed(damaged):
    manifest = damaged / "train" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["build_id"], data["parts"], data["part"] = "0123456789abcdef", 2, 1
    (damaged / "train" / "manifest-part-001-of-002.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="mixes shards of different builds"):
        read_split(damaged, "train")


def test_giving_the_split_folder_instead_of_out_is_explained(photo_build):
    with pytest.raises(DataError, match="give the build folder OUT, not OUT/train"):
        read_split(photo_build / "train", "train")


# ---------------------------------------------------------------------------- what opening reads
def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_bytes() -> int:
    """Bytes this process has had read from disk (page-cache misses), from /proc/self/io."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def test_opening_a_split_reads_its_index_not_its_images(tmp_path):
    """SplitSamples over shards not in the page cache reads their headers, labels and offsets,
    not their images: with the kernel's default read-around, every shard was read whole (at
    ImageNet scale ~51 GB before the first batch; benchmarks/scale.py)."""
    if not hasattr(os, "posix_fadvise") or not Path("/proc/self/io").exists():
        pytest.skip("needs posix_fadvise and /proc/self/io (Linux)")
    classes = ClassList(tuple(f"n{i:08d}" for i in range(10)))
    spec = ImageSpec()
    folder = tmp_path / "train"
    folder.mkdir()
    name = shard_name("train", 0, 1)
    rng = np.random.default_rng(0)
    # 512 incompressible 40 KB images (a q95 photo's size): 8 record batches, 20 MB.
    images = [rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes() for _ in range(512)]
    writer = ShardWriter(folder / name, shard_schema(classes, spec, "b", "train"))
    for i, data in enumerate(images):
        writer.add(data, i % 10, classes.wnids[i % 10], f"train/{i}.JPEG")
    size, sha = writer.finish()  # fsynced: its pages are clean, so they can be dropped
    writer.commit()
    index = SplitIndex(tmp_path, "train", "b", classes, spec, 1, [ShardRecord(name, 0, len(images), size, sha)])

    _drop_from_page_cache(folder / name)
    before = _read_bytes()
    (folder / name).read_bytes()
    if _read_bytes() - before < size // 2:
        pytest.skip("this file system keeps the file in memory (tmpfs?): nothing to measure")

    _drop_from_page_cache(folder / name)
    before = _read_bytes()
    samples = SplitSamples(index)
    read = _read_bytes() - before
    assert read < size // 20, f"opening the split read {read} of its {size} bytes"
    # ... and the views still read the right bytes (read-around is back for them), from one
    # view of the shard's map: no Arrow table or per-batch object is kept per shard (their
    # native metadata held ~65 bytes per sample at ImageNet scale).
    assert all(bytes(samples.view(i)) == data for i, data in enumerate(images))
    assert samples.labels.tolist() == [i % 10 for i in range(len(images))]
    assert len(samples._buffers) == len(index.shards)

    _drop_from_page_cache(folder / name)
    before = _read_bytes()
    open_shard(index, index.shards[0])  # what stats and verify open to check a shard
    assert _read_bytes() - before < size // 20


def test_build_folder_names_every_file_a_build_and_its_stats_write(stats_build):
    """BuildFolder spells every name: what build-shards and `alexprep stats` wrote is what it lists."""
    from alexprep.imagenet_prep.build_folder import BuildFolder, is_manifest, partial_name

    folder = BuildFolder(stats_build)
    named = {folder.classes, folder.lock, *folder.stats_paths().values()}
    for split in ("train", "val"):
        index = read_split(stats_build, split)
        shards = folder.shards(split)
        assert shards == sorted(index.shard_path(s) for s in index.shards) and shards
        assert folder.partials(split) == [p.parent / partial_name(p.name) for p in shards]
        assert folder.manifests(split) == [folder.manifest(split)] and is_manifest(f"{split}/manifest.json")
        named |= {*shards, *folder.partials(split), *folder.manifests(split), folder.split(split)}
    written = set(stats_build.rglob("*")) | set(stats_build.glob(".*"))
    assert written == named  # nothing a build writes goes unnamed, and every name is written


def test_local_folders_are_read_in_place(tmp_path):
    """A path, or a file:// URI given no cache directory, is read in place; any URI given
    a cache directory, and any other URI, goes through the cache (shard_cache.py)."""
    from alexprep.imagenet_prep.shards import local_folder

    assert local_folder(tmp_path) == tmp_path and local_folder(str(tmp_path), cache_dir=tmp_path) == tmp_path
    assert local_folder(f"file://{tmp_path}/out") == tmp_path / "out"
    assert local_folder(f"file://{tmp_path}/out", cache_dir=tmp_path) is None
    assert local_folder("s3://bucket/out") is None and local_folder("s3://bucket/out", cache_dir=tmp_path) is None
