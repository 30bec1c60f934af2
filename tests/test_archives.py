"""build-shards straight from the archives as downloaded: the same shards as the extracted
tree, parallel, resumable, splittable, and damaged archives reported without losing the rest."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import warnings
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from alexprep.cli.main import cli
from alexprep.imagenet_prep import archives
from alexprep.imagenet_prep.build import BuildConfig, build_shards
from alexprep.imagenet_prep.classes import read_devkit_meta
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.sample_data import jpeg_bytes, load_photo, wnid_for, write_photo_tree
from alexprep.imagenet_prep.shards import image_bytes_column, open_shard, read_split

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


def imagenet_downloads(base: Path, classes: int = 3, train_per_class: int = 4, val_per_class: int = 3,
                       quirks: bool = False) -> Path:
    """image-net.org's three downloads of a small photo tree made in `base/tree` (the tree
    kept beside them, its val flattened as ImageNet's is), in `base/downloads`; the class
    tars in `base`."""
    tree = base / "tree"
    write_photo_tree(tree, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class, seed=11)
    if quirks:
        add_quirks(tree / "train" / "n00000002")
    truth = flatten_val(tree)
    ids = IDS if classes == 3 else {wnid_for(c): classes - c for c in range(classes)}
    devkit = tree / "ILSVRC2012_devkit_t12"
    write_meta_mat(devkit, ids)
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ids[truth[s]]}\n" for s in sorted(truth)))
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
    return downloads


def val_truth(downloads: Path) -> dict[str, str]:
    """The val images' wnids (file name -> wnid), from the tree `imagenet_downloads` kept."""
    devkit = downloads.parent / "tree" / "ILSVRC2012_devkit_t12"
    wnid_of_id = read_devkit_meta(devkit)[0]
    lines = (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    return {p.name: wnid_of_id[int(line)] for p, line in zip(sorted((devkit.parent / "val").iterdir()), lines)}


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> tuple[Path, Path]:
    """(the extracted tree, a folder of the same files as image-net.org's archives)."""
    base = tmp_path_factory.mktemp("imagenet")
    downloads = imagenet_downloads(base, quirks=True)
    return base / "tree", downloads


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


def images(out: Path, split: str = "train") -> dict[str, tuple[int, str, bytes]]:
    """Every image of a built split: key -> (label, wnid, encoded bytes); a key twice fails."""
    index = read_split(out, split)
    rows: dict[str, tuple[int, str, bytes]] = {}
    for shard in index.shards:
        table = open_shard(index, shard)
        for key, label, wnid, data in zip(*(table.column(c).to_pylist() for c in ("key", "label", "wnid")),
                                          image_bytes_column(table).to_pylist()):
            assert key not in rows, f"{key} written twice"
            rows[key] = (label, wnid, data)
    return rows


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


def test_damaged_class_tars_are_reported_and_the_rest_built(imagenet, tree_build, tmp_path):
    _, downloads = imagenet
    src = tmp_path / "src"
    shutil.copytree(downloads, src)
    train = src / archives.TRAIN_TAR
    class_tars = downloads.parent  # where the fixture made them
    # A whole train tar whose class tar n00000001 is bytes that are not a tar, and whose
    # n00000003.tar was cut in the middle of its last image before it was packed.
    cut_n3 = tmp_path / "n00000003.tar"
    whole_n3 = (class_tars / "n00000003.tar").read_bytes()
    with tarfile.open(class_tars / "n00000003.tar") as inner:
        final = inner.getmembers()[-1]
    cut_n3.write_bytes(whole_n3[: final.offset_data + final.size // 2])
    garbage = tmp_path / "n00000001.tar"
    garbage.write_bytes(b"this is not a tar archive" + bytes(1000))
    with tarfile.open(train, "w", format=tarfile.GNU_FORMAT) as outer:
        for path in (garbage, class_tars / "n00000002.tar", cut_n3):
            outer.add(path, arcname=path.name)
    result = CliRunner().invoke(cli, ["build-shards", str(src), str(tmp_path / "out"), "--shard-size", "4",
                                      "--workers", "2", "--split", "train"])
    assert result.exit_code == 0, result.output
    m = manifest(tmp_path / "out", "train")
    problems = {s["key"]: s for s in m["skipped"]}
    assert "not a tar archive" in problems["train/n00000001.tar"]["reason"]
    assert problems["train/n00000001.tar"]["archive"] == f"{train}:n00000001.tar"
    assert "class tar ends at byte" in problems["train/n00000003.tar"]["reason"]
    assert f"download {archives.TRAIN_TAR} again" in problems["train/n00000003.tar"]["reason"]
    cut_key = f"train/n00000003/{final.name}"
    assert "the tar ends inside this member" in problems[cut_key]["reason"]
    assert problems[cut_key]["archive"] == f"{train}:n00000003.tar/{final.name}"
    assert "notes.JPEG" in " ".join(problems)  # a member that is not an image, as from the tree
    # Nothing else lost: every other image of the tree is in the shards, with the tree's bytes.
    assert m["counts"]["written"] == manifest(tree_build, "train")["counts"]["written"] - 4 - 1
    assert m["counts"]["inputs"] == m["counts"]["written"] + m["counts"]["skipped"]
    ours, theirs = images(tmp_path / "out"), images(tree_build)
    assert ours == {k: v for k, v in theirs.items() if k in ours} and len(ours) == m["counts"]["written"]
    assert "train/n00000001.tar: " in result.output and f"(in {train}:n00000001.tar)" in result.output


def test_a_truncated_train_tar_is_named_before_the_classes(tmp_path):
    """The issue's case: the train tar cut at two thirds beside a whole val tar and the
    devkit. Its class tars after the cut are missing, so the classes it still holds are not
    the class list: the download is named first, in one line."""
    downloads = imagenet_downloads(tmp_path / "imagenet", classes=6)
    train = downloads / archives.TRAIN_TAR
    os.truncate(train, train.stat().st_size * 2 // 3)
    result = CliRunner().invoke(cli, ["build-shards", str(downloads), str(tmp_path / "out"), "--workers", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = result.output.strip()
    assert "\n" not in line and "class list" not in line
    with tarfile.open(train) as outer:  # the class tar that the cut falls in
        cut_in = next(m.name for m in outer if m.offset_data + m.size > train.stat().st_size)
    assert line.startswith(f"Error: {train} ends at byte {train.stat().st_size}, inside {cut_in}")
    assert f"the download is truncated" in line and f"download {archives.TRAIN_TAR} again" in line
    assert not (tmp_path / "out").exists()
    # The val split does not follow from the train tar: with the devkit it builds, and its
    # class list is the devkit's, not what the partial train tar still holds.
    result = CliRunner().invoke(cli, ["build-shards", str(downloads), str(tmp_path / "val"), "--workers", "1",
                                      "--split", "val"])
    assert result.exit_code == 0, result.output
    wnids = [c["wnid"] for c in json.loads((tmp_path / "val" / "classes.json").read_text())["classes"]]
    assert wnids == [f"n0000000{i}" for i in range(1, 7)]
    # Without the devkit (labels given as Kaggle's CSV), the train tar is the class list: refused alike.
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"{Path(n).stem},{w} 1 2 3 4\n" for n, w in val_truth(downloads).items()))
    (downloads / archives.DEVKIT_TGZ).unlink()
    result = CliRunner().invoke(cli, ["build-shards", str(downloads), str(tmp_path / "val2"), "--workers", "1",
                                      "--split", "val", "--val-labels", str(csv)])
    assert result.exit_code == 2 and f"{train} ends at byte" in result.output, result.output


def test_a_truncated_or_damaged_val_tar_is_one_line(imagenet, tmp_path):
    _, downloads = imagenet
    val = tmp_path / archives.VAL_TAR
    data = (downloads / archives.VAL_TAR).read_bytes()
    val.write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(cli, ["build-shards", str(val), str(tmp_path / "out"), "--workers", "1",
                                      "--devkit", str(downloads / archives.DEVKIT_TGZ)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"{val} ends at byte {len(data) // 2}" in result.output and "the images from there on" in result.output
    # Whole in length, a header in the middle overwritten: damaged, not truncated.
    with tarfile.open(downloads / archives.VAL_TAR) as tar:
        third = tar.getmembers()[2]
    val.write_bytes(data[: third.offset] + b"garbage!" * 64 + data[third.offset + 512:])
    result = CliRunner().invoke(cli, ["build-shards", str(val), str(tmp_path / "out"), "--workers", "1",
                                      "--devkit", str(downloads / archives.DEVKIT_TGZ)])
    assert result.exit_code == 2, result.output
    assert f"{val} is damaged at byte {third.offset}" in result.output and "the archive is damaged" in result.output
    val.write_bytes(b"<html>404 Not Found</html>\n" * 40)  # a download that saved an error page
    result = CliRunner().invoke(cli, ["build-shards", str(val), str(tmp_path / "out"), "--workers", "1",
                                      "--devkit", str(downloads / archives.DEVKIT_TGZ)])
    assert result.exit_code == 2 and f"{val} is not a tar archive" in result.output, result.output
    assert f"download {archives.VAL_TAR} again" in result.output


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


# ---------------------------------------------------------------------------- as tar -x reads them
needs_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar to extract and to append")
# --sparse-version and --format=gnu are GNU tar's (bsdtar, macOS's tar, has neither).
needs_gnu_tar = pytest.mark.skipif(shutil.which("tar") is None or "GNU tar" not in subprocess.run(
    ["tar", "--version"], capture_output=True, text=True).stdout, reason="needs GNU tar to write sparse members")


def photo_classes(base: Path, classes: int = 2, per_class: int = 3, seed: int = 5) -> Path:
    """Class folders of real photos, as a class tar holds them: base/train/<wnid>/."""
    write_photo_tree(base, classes=classes, train_per_class=per_class, val_per_class=0, seed=seed)
    return base / "train"


def train_tar_of(class_tars: list[Path], downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    with tarfile.open(downloads / archives.TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
        for path in class_tars:
            outer.add(path, arcname=path.name)
    return downloads / archives.TRAIN_TAR


def tar_x(archive: Path, into: Path) -> str:
    """`tar -x` of an archive into a folder; what tar complained of (it goes on past what
    it cannot make, e.g. a hard link to nothing)."""
    into.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["tar", "-xf", str(archive), "-C", str(into)], capture_output=True, text=True).stderr


def side_by_side(train: Path, tmp_path: Path) -> tuple[dict, dict, dict]:
    """The train tar built in place, and built from its extraction as image-net.org says
    (`tar -x` of the train tar, then of each class tar into train/<wnid>/): (the archive
    build's images, the extraction build's images, the archive build's skipped by key)."""
    staging, tree = tmp_path / "class_tars", tmp_path / "extracted"
    tar_x(train, staging)
    for class_tar in sorted(staging.glob("*.tar")):
        tar_x(class_tar, tree / "train" / class_tar.stem)
    build(train, tmp_path / "from_archive", splits=("train",))
    build(tree, tmp_path / "from_tree", splits=("train",))
    skipped: dict[str, list[dict]] = {}
    for entry in manifest(tmp_path / "from_archive", "train")["skipped"]:
        skipped.setdefault(entry["key"], []).append(entry)
    return images(tmp_path / "from_archive"), images(tmp_path / "from_tree"), skipped


def add_entry(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    tar.addfile(info)


@needs_tar
def test_links_read_as_tar_x_leaves_them(tmp_path):
    classes = photo_classes(tmp_path / "photos")
    first = classes / "n00000001"
    target = sorted(first.iterdir())[0].name
    os.link(first / target, first / "z_hard.JPEG")  # tarfile stores the second name as a hard link
    (first / "sub").mkdir()
    os.link(first / target, first / "sub" / "deeper.JPEG")
    os.symlink(target, first / "z_symbolic.JPEG")
    class_tars = []
    for folder in sorted(classes.iterdir()):
        class_tars.append(tmp_path / f"{folder.name}.tar")
        with tarfile.open(class_tars[-1], "w", format=tarfile.GNU_FORMAT) as tar:
            for path in sorted(folder.rglob("*")):
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
            if folder == first:
                add_entry(tar, "z_link_to_link.JPEG", tarfile.LNKTYPE, "./z_hard.JPEG")
                add_entry(tar, "z_ghost.JPEG", tarfile.LNKTYPE, "missing.JPEG")  # tar -x cannot make it
    with tarfile.open(class_tars[0]) as tar:
        assert {m.name: m.type for m in tar}["z_hard.JPEG"] == tarfile.LNKTYPE
    ours, extracted, skipped = side_by_side(train_tar_of(class_tars, tmp_path / "downloads"), tmp_path)
    key = "train/n00000001/"
    # The extraction followed the symbolic link; the archive build skips it and says so.
    assert ours == {k: v for k, v in extracted.items() if k != key + "z_symbolic.JPEG"}
    for name in ("z_hard.JPEG", "sub/deeper.JPEG", "z_link_to_link.JPEG"):
        assert ours[key + name] == ours[key + target]
    assert key + "z_ghost.JPEG" not in extracted
    assert "symbolic link to" in skipped[key + "z_symbolic.JPEG"][0]["reason"]
    assert "hard link to 'missing.JPEG'" in skipped[key + "z_ghost.JPEG"][0]["reason"]
    assert skipped[key + "z_ghost.JPEG"][0]["archive"].endswith(f"{archives.TRAIN_TAR}:n00000001.tar/z_ghost.JPEG")
    assert len(skipped) == 2


@needs_tar
def test_a_repeated_name_keeps_the_last_copy(tmp_path):
    classes = photo_classes(tmp_path / "photos")
    others = photo_classes(tmp_path / "others", seed=9)  # the same names, other crops
    class_tars = []
    for folder in sorted(classes.iterdir()):
        class_tars.append(tmp_path / f"{folder.name}.tar")
        tar_of(folder, class_tars[-1])
    name = sorted((classes / "n00000001").iterdir())[1].name
    # `tar -r` appends a second copy of one image to class tar 1, and a second class tar 2
    # (of other photos) to the train tar: tar -x keeps the last of each.
    subprocess.run(["tar", "-rf", str(class_tars[0]), "-C", str(others / "n00000001"), name], check=True)
    train = train_tar_of(class_tars, tmp_path / "downloads")
    again = tmp_path / "again" / "n00000002.tar"
    again.parent.mkdir()
    tar_of(others / "n00000002", again)
    subprocess.run(["tar", "-rf", str(train), "-C", str(again.parent), again.name], check=True)
    ours, extracted, skipped = side_by_side(train, tmp_path)
    assert ours == extracted and len(ours) == 6
    assert ours[f"train/n00000001/{name}"][2] != ours[f"train/n00000001/{sorted(ours)[0].rsplit('/', 1)[1]}"][2]
    assert "earlier copy" in skipped[f"train/n00000001/{name}"][0]["reason"]
    assert "earlier copy" in skipped["train/n00000002.tar"][0]["reason"]
    assert len(skipped) == 2
    result = CliRunner().invoke(cli, ["verify", str(tmp_path / "from_archive")])
    assert result.exit_code == 0 and "all good" in result.output, result.output


def test_verify_names_a_key_written_twice(tmp_path):
    """A build folder holding one key twice (as archive builds once wrote from a tar holding
    a name twice) does not pass as all good."""
    classes = photo_classes(tmp_path / "photos", classes=1, per_class=4)
    out = tmp_path / "out"
    build(classes.parent, out, shard_size=2, splits=("train",))
    index = read_split(out, "train")
    keys = [open_shard(index, s).column("key")[0].as_py() for s in index.shards]
    shard = index.shards[1]
    table = open_shard(index, shard)
    table = table.set_column(table.schema.get_field_index("key"), "key",
                             pa.array([keys[0]] + table.column("key").to_pylist()[1:]))
    path = index.shard_path(shard)
    with pa.OSFile(str(path) + ".new", "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(str(path) + ".new", path)  # a new file: the old one is still memory-mapped
    m = manifest(out, "train")
    m["shards"][1].update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (out / "train" / "manifest.json").write_text(json.dumps(m))
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 1, result.output
    assert f"key {keys[0]!r} is written 2 times" in result.output and "1 bad" in result.output


def sparse_jpeg(path: Path, hole: int = 60_000) -> bytes:
    """A JPEG with a comment segment of `hole` zero bytes after its SOI, written as a hole
    (seeked over), so that `tar --sparse` stores the file sparse: read as a regular member,
    it would be the wrong bytes."""
    data = jpeg_bytes(Image.fromarray(load_photo("coffee")).resize((96, 72)), 90)
    head, tail = data[:2], data[2:]
    with open(path, "wb") as f:
        f.write(head + b"\xff\xfe" + (hole + 2).to_bytes(2, "big"))
        f.seek(hole, os.SEEK_CUR)
        f.write(tail)
    return path.read_bytes()


@needs_gnu_tar
@pytest.mark.parametrize("flavour", [["--format=gnu"], ["--format=pax", "--sparse-version=0.0"],
                                     ["--format=pax", "--sparse-version=0.1"],
                                     ["--format=pax", "--sparse-version=1.0"]],
                         ids=["gnu", "pax-0.0", "pax-0.1", "pax-1.0"])
def test_sparse_members_read_as_tar_x_writes_them(tmp_path, flavour):
    classes = photo_classes(tmp_path / "photos")
    sparse_jpeg(classes / "n00000001" / "n00000001_sparse.JPEG")
    sparse_jpeg(classes / "n00000002" / "n00000002_sparse.JPEG", hole=20_000)
    class_tars = []
    for folder in sorted(classes.iterdir()):
        class_tars.append(tmp_path / f"{folder.name}.tar")
        subprocess.run(["tar", "--sparse", *flavour, "-cf", str(class_tars[-1]), "-C", str(folder),
                        *sorted(p.name for p in folder.iterdir())], check=True)
    with tarfile.open(class_tars[0]) as tar:
        assert tar.getmember("n00000001_sparse.JPEG").sparse, "tar did not store the file sparse"
    ours, extracted, skipped = side_by_side(train_tar_of(class_tars, tmp_path / "downloads"), tmp_path)
    assert ours == extracted and len(ours) == 8 and not skipped
    split = archives.splits_in_archive(tmp_path / "downloads" / archives.TRAIN_TAR)["train"]
    members = {rel: m for rel, m in split.scan()[1]}
    for wnid in ("n00000001", "n00000002"):
        rel = f"{wnid}/{wnid}_sparse.JPEG"
        assert archives.read_member(members[rel]) == (classes / rel).read_bytes()


@pytest.mark.skipif(shutil.which("unzip") is None, reason="needs unzip to extract")
def test_kaggle_zip_read_as_unzip_leaves_it(tmp_path):
    classes = photo_classes(tmp_path / "photos")
    again = sorted((photo_classes(tmp_path / "others", seed=9) / "n00000001").iterdir())[1]
    base = archives.KAGGLE_BASE + "train/"
    zipped = tmp_path / "zipped" / archives.KAGGLE_ZIP
    zipped.parent.mkdir()
    with warnings.catch_warnings(), zipfile.ZipFile(zipped, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns of the name it is given twice
        for path in sorted(classes.rglob("*.JPEG")):
            zf.write(path, base + path.relative_to(classes).as_posix())
        zf.write(again, f"{base}n00000001/{again.name}")  # a second copy: unzip -o keeps the last
        link = zipfile.ZipInfo(f"{base}n00000001/z_symbolic.JPEG")
        link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16  # as Info-ZIP stores a link
        zf.writestr(link, "n00000001_0.JPEG")
    extracted = tmp_path / "extracted"
    subprocess.run(["unzip", "-o", "-q", str(zipped), "-d", str(extracted)], check=True)
    assert (extracted / base / "n00000001" / "z_symbolic.JPEG").is_symlink()
    build(zipped.parent, tmp_path / "from_zip", splits=("train",))
    build(extracted, tmp_path / "from_tree", splits=("train",))
    ours, theirs = images(tmp_path / "from_zip"), images(tmp_path / "from_tree")
    key = f"{base}n00000001/"
    assert ours == {k: v for k, v in theirs.items() if k != key + "z_symbolic.JPEG"} and len(ours) == 6
    assert ours[key + again.name][2] == theirs[key + again.name][2]
    skipped = {s["key"]: s["reason"] for s in manifest(tmp_path / "from_zip", "train")["skipped"]}
    assert "earlier copy" in skipped[key + again.name] and "symbolic link" in skipped[key + "z_symbolic.JPEG"]


@needs_gnu_tar
def test_a_sparse_member_too_large_is_refused_alone(tmp_path):
    """1.5 GiB of holes stores in a few blocks: expanded it would be more than any image,
    so that member is refused with its reason, and the rest is built."""
    classes = photo_classes(tmp_path / "photos")
    with open(classes / "n00000001" / "huge.JPEG", "wb") as f:
        f.write(b"\xff\xd8" + b"x" * 100)
        f.truncate(1536 << 20)
    class_tars = []
    for folder in sorted(classes.iterdir()):
        class_tars.append(tmp_path / f"{folder.name}.tar")
        subprocess.run(["tar", "--sparse", "-cf", str(class_tars[-1]), "-C", str(folder),
                        *sorted(p.name for p in folder.iterdir())], check=True)
    assert class_tars[0].stat().st_size < 1 << 20
    out = tmp_path / "out"
    build(train_tar_of(class_tars, tmp_path / "downloads"), out, splits=("train",))
    skipped = {s["key"]: s["reason"] for s in manifest(out, "train")["skipped"]}
    assert list(skipped) == ["train/n00000001/huge.JPEG"]
    assert f"a sparse member expanding to {1536 << 20} bytes" in skipped["train/n00000001/huge.JPEG"]
    assert len(images(out)) == 6


def test_a_train_tar_with_a_class_outside_its_devkit_is_one_line(imagenet, tmp_path):
    _, downloads = imagenet
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    write_meta_mat(devkit, {"n00000001": 1, "n00000002": 2})  # n00000003 missing
    tgz = tmp_path / archives.DEVKIT_TGZ
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(devkit, arcname=devkit.name)
    result = CliRunner().invoke(cli, ["build-shards", str(downloads / archives.TRAIN_TAR), str(tmp_path / "out"),
                                      "--workers", "1", "--devkit", str(tgz)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "holds class n00000003, not among the 2 classes of the devkit" in result.output
