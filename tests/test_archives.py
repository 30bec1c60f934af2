"""build-shards straight from the archives as downloaded: the same shards as the extracted
tree, parallel, resumable, splittable, and damaged archives reported without losing the rest."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from alexprep.cli.main import cli
from alexprep.imagenet_prep import archives
from alexprep.imagenet_prep.build import BuildConfig, build_shards
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.sample_data import jpeg_bytes, load_photo, write_photo_tree
from alexprep.imagenet_prep.shards import read_split

from test_build import shard_bytes
from test_layout import flatten_val, write_meta_mat

IDS = {"n00000003": 1, "n00000001": 2, "n00000002": 3}  # meta.mat's order is not sorted-wnid order


def add_quirks(folder: Path) -> None:
    """The quirks of ImageNet's files (as in test_build's quirk tree), in one class folder."""
    photo = Image.fromarray(load_photo("coffee"))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    (folder / "png_named.JPEG").write_bytes(buf.getvalue())
    (folder / "cmyk.JPEG").write_bytes(jpeg_bytes(photo.convert("CMYK"), 90))
    (folder / "gray.JPEG").write_bytes(jpeg_bytes(photo.convert("L"), 90))
    full = jpeg_bytes(photo, 90)
    (folder / "truncated.JPEG").write_bytes(full[: len(full) // 3])
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "notes.JPEG").write_bytes(b"this is text, not a JPEG\n")
    (folder / "README.txt").write_text("not an image")


def tar_of(folder: Path, target, arcnames=None) -> None:
    """An uncompressed tar of the files of `folder` (flat), as image-net.org's are."""
    with tarfile.open(target if isinstance(target, str | Path) else None, "w", fileobj=None if isinstance(
            target, str | Path) else target, format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name, recursive=False)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> tuple[Path, Path]:
    """(the extracted tree, a folder of the same files as image-net.org's archives)."""
    base = tmp_path_factory.mktemp("imagenet")
    tree = base / "tree"
    write_photo_tree(tree, classes=3, train_per_class=4, val_per_class=3, seed=11)
    add_quirks(tree / "train" / "n00000002")
    truth = flatten_val(tree)
    devkit = tree / "ILSVRC2012_devkit_t12"
    write_meta_mat(devkit, IDS)
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{IDS[truth[s]]}\n" for s in sorted(truth)))
    downloads = base / "downloads"
    downloads.mkdir()
    with tarfile.open(downloads / archives.TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
        for cls in sorted((tree / "train").iterdir()):
            class_tar = base / f"{cls.name}.tar"
            tar_of(cls, class_tar)
            outer.add(class_tar, arcname=class_tar.name)
    tar_of(tree / "val", downloads / archives.VAL_TAR)
    with tarfile.open(downloads / archives.DEVKIT_TGZ, "w:gz") as tgz:
        tgz.add(devkit, arcname=devkit.name)
    return tree, downloads


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory, imagenet) -> tuple[Path, Path]:
    """(Kaggle's tree extracted, a folder holding Kaggle's zip of it): stored and deflated members."""
    tree, _ = imagenet
    base = tmp_path_factory.mktemp("kaggle")
    extracted = base / "extracted"
    cls_loc = extracted / "ILSVRC" / "Data" / "CLS-LOC"
    shutil.copytree(tree / "train", cls_loc / "train")
    shutil.copytree(tree / "val", cls_loc / "val")
    (cls_loc / "test").mkdir()
    (cls_loc / "test" / "ILSVRC2012_test_00000001.JPEG").write_bytes((tree / "val").joinpath(
        sorted(os.listdir(tree / "val"))[0]).read_bytes())
    truth = {}
    for line, stem in zip((tree / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt")
                          .read_text().split(), sorted(p.stem for p in (tree / "val").iterdir())):
        truth[stem] = {v: k for k, v in IDS.items()}[int(line)]
    (extracted / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{s},{w} 1 2 3 4\n" for s, w in truth.items()))
    (extracted / "LOC_synset_mapping.txt").write_text("".join(f"{w} name of {w}\n" for w in sorted(IDS)))
    zipped = base / "zipped"
    zipped.mkdir()
    with zipfile.ZipFile(zipped / archives.KAGGLE_ZIP, "w") as zf:
        for i, path in enumerate(sorted(p for p in extracted.rglob("*"))):
            method = zipfile.ZIP_DEFLATED if i % 2 else zipfile.ZIP_STORED
            zf.write(path, path.relative_to(extracted).as_posix(), compress_type=method)
    return extracted, zipped


def build(src, out, **options):
    options = {"shard_size": 4, "workers": 1} | options
    return build_shards(src, out, BuildConfig(**options))


def manifest(out: Path, split: str) -> dict:
    return json.loads((out / split / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tree_build(tmp_path_factory, imagenet) -> Path:
    out = tmp_path_factory.mktemp("tree_build") / "out"
    build(imagenet[0], out)
    return out


@pytest.mark.parametrize("pool_min", [archives.POOL_MIN_ITEMS, 1], ids=["indexed-here", "indexed-in-a-pool"])
def test_archives_build_the_same_bytes_as_the_extracted_tree(imagenet, tree_build, tmp_path, monkeypatch, pool_min):
    monkeypatch.setattr(archives, "POOL_MIN_ITEMS", pool_min)  # ImageNet's 1,000 class tars take the pool
    tree, downloads = imagenet
    out = tmp_path / "out"
    build(downloads, out, workers=2)
    assert shard_bytes(out) == shard_bytes(tree_build) and len(shard_bytes(out)) > 8
    assert (out / "classes.json").read_text() == (tree_build / "classes.json").read_text()
    for split in ("train", "val"):
        ours, theirs = manifest(out, split), manifest(tree_build, split)
        assert ours["counts"] == theirs["counts"] and ours["ignored"] == theirs["ignored"]
        assert [(s["key"], s["reason"]) for s in ours["skipped"]] == [(s["key"], s["reason"]) for s in theirs["skipped"]]
    skipped = {Path(s["key"]).name: s for s in manifest(out, "train")["skipped"]}
    assert set(skipped) == {"truncated.JPEG", "empty.JPEG", "notes.JPEG"}
    assert skipped["notes.JPEG"]["archive"] == f"{downloads / archives.TRAIN_TAR}:n00000002.tar/notes.JPEG"
    assert manifest(out, "train")["counts"]["ignored"] == 1  # README.txt inside a class tar
    names = [c["name"] for c in json.loads((out / "classes.json").read_text())["classes"]]
    assert names == [f"words of n0000000{i}" for i in (1, 2, 3)]  # from meta.mat inside the .tar.gz


def test_parts_and_resume_from_archives(imagenet, tree_build, tmp_path):
    _, downloads = imagenet
    out = tmp_path / "out"
    for part in (1, 0):
        build(downloads, out, part=part, parts=2)
    assert shard_bytes(out) == shard_bytes(tree_build)
    resumed = tmp_path / "resumed"
    build(downloads, resumed)
    for p in sorted((resumed / "train").glob("train-0000[13]*")):  # as if killed before these two
        p.unlink()
    (resumed / "train" / ".train-00001-of-00005.arrow.tmp-99999").write_bytes(b"half a shard")
    (resumed / "train" / "manifest.json").unlink()
    result = CliRunner().invoke(cli, ["build-shards", str(downloads), str(resumed), "--shard-size", "4",
                                      "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "5 shards (2 built, 3 kept)" in result.output
    assert shard_bytes(resumed) == shard_bytes(tree_build)
    assert not [p for p in resumed.rglob("*") if ".tmp-" in p.name]


def test_one_archive_given_directly(imagenet, tree_build, tmp_path):
    _, downloads = imagenet
    out = tmp_path / "out"
    build(downloads / archives.VAL_TAR, out)  # the devkit beside it labels it
    assert shard_bytes(out) == {k: v for k, v in shard_bytes(tree_build).items() if k.startswith("val")}
    only_val = tmp_path / "only_val"
    only_val.mkdir()
    shutil.copy(downloads / archives.VAL_TAR, only_val)
    with pytest.raises(DataError, match=f"holds the val images unlabelled: add {archives.DEVKIT_TGZ}"):
        build(only_val / archives.VAL_TAR, tmp_path / "out2")
    result = CliRunner().invoke(cli, ["build-shards", str(only_val), str(tmp_path / "out3"), "--workers", "1", "--shard-size", "4",
                                      "--devkit", str(downloads / archives.DEVKIT_TGZ)])
    assert result.exit_code == 0, result.output
    assert shard_bytes(tmp_path / "out3") == shard_bytes(out)


def test_kaggle_zip_builds_the_same_bytes_as_its_tree(kaggle, tmp_path):
    extracted, zipped = kaggle
    a, b = tmp_path / "tree", tmp_path / "zip"
    build(extracted, a)
    build(zipped, b, workers=2)
    assert shard_bytes(a) == shard_bytes(b) and read_split(b, "val").rows == 9
    assert (a / "classes.json").read_text() == (b / "classes.json").read_text()
    assert "name of n00000001" in (b / "classes.json").read_text()  # LOC_synset_mapping.txt from the zip
    c = tmp_path / "direct"
    build(zipped / archives.KAGGLE_ZIP, c)
    assert shard_bytes(c) == shard_bytes(a)


def test_kaggle_zip_without_its_csv_names_the_file(kaggle, tmp_path):
    extracted, _ = kaggle
    target = tmp_path / archives.KAGGLE_ZIP
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(extracted.rglob("*")):
            if path.name != "LOC_val_solution.csv":
                zf.write(path, path.relative_to(extracted).as_posix())
    with pytest.raises(DataError, match="LOC_val_solution.csv is neither in the zip nor in .*: add it"):
        build(tmp_path, tmp_path / "out")


def test_damaged_archives_are_reported_and_the_rest_built(imagenet, tree_build, tmp_path):
    tree, downloads = imagenet
    src = tmp_path / "src"
    shutil.copytree(downloads, src)
    train = src / archives.TRAIN_TAR
    # Class tar n00000001 replaced by bytes that are not a tar (same size: the outer tar stays whole).
    with tarfile.open(train) as outer:
        first = outer.getmember("n00000001.tar")
    with open(train, "r+b") as f:
        f.seek(first.offset_data)
        f.write(b"this is not a tar archive" + bytes(1000))
    # The train tar truncated in the middle of its last class tar's last image.
    with tarfile.open(train) as outer:
        last = outer.getmember("n00000003.tar")
    with tarfile.open(fileobj=archives._Window(os.open(train, os.O_RDONLY), last.offset_data, last.size)) as inner:
        final = inner.getmembers()[-1]
    cut = last.offset_data + final.offset_data + final.size // 2
    os.truncate(train, cut)
    result = CliRunner().invoke(cli, ["build-shards", str(src), str(tmp_path / "out"), "--shard-size", "4",
                                      "--workers", "2", "--split", "train"])
    assert result.exit_code == 0, result.output
    m = manifest(tmp_path / "out", "train")
    problems = {s["key"]: s for s in m["skipped"]}
    assert "not a tar archive" in problems["train/n00000001.tar"]["reason"]
    assert problems["train/n00000001.tar"]["archive"] == str(train)
    assert "ends early" in problems["train/n00000003.tar"]["reason"]
    cut_key = f"train/n00000003/{final.name}"
    assert f"{train} is truncated" in problems[cut_key]["reason"] and problems[cut_key]["archive"].startswith(str(train))
    assert "notes.JPEG" in " ".join(problems)  # a member that is not an image, as from the tree
    # Nothing else lost: every other image of the tree is in the shards.
    whole = manifest(tree_build, "train")["counts"]["written"]
    assert m["counts"]["written"] == whole - 4 - 1
    assert m["counts"]["inputs"] == m["counts"]["written"] + m["counts"]["skipped"]
    assert "train/n00000001.tar: " in result.output and f"(in {train})" in result.output


def test_a_truncated_zip_is_one_line(kaggle, tmp_path):
    _, zipped = kaggle
    data = (zipped / archives.KAGGLE_ZIP).read_bytes()
    (tmp_path / archives.KAGGLE_ZIP).write_bytes(data[: len(data) * 2 // 3])
    result = CliRunner().invoke(cli, ["build-shards", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{tmp_path / archives.KAGGLE_ZIP} is not a readable zip" in result.output
    assert "download it again" in result.output


def test_indexing_reads_headers_not_data(imagenet, monkeypatch):
    _, downloads = imagenet
    read = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: read.append(n) or real(fd, n, off))
    split = archives.splits_in_archive(downloads / archives.TRAIN_TAR)["train"]
    dirs, entries, problems = split.scan()
    entries = list(entries)
    assert dirs == {"n00000001", "n00000002", "n00000003"} and not problems
    assert len(entries) == 4 + 4 + 4 + 7
    size = (downloads / archives.TRAIN_TAR).stat().st_size
    assert sum(read) < 0.05 * size, (sum(read), size)  # ~2 blocks of 512 bytes per member
