"""The shard contract: plain pyarrow opens it, its schema says what it holds, and damage is
a clear error naming the shard."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image
import io

from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.shards import open_shard, read_split
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
