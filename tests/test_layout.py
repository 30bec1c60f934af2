"""Input layouts build-shards reads: ImageFolder, Kaggle's tree and CSV, the devkit."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from alexprep.imagenet_prep.build import BuildConfig, build_shards
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.layout import find_split_folders, list_split
from alexprep.imagenet_prep.sample_data import write_photo_tree
from alexprep.imagenet_prep.shards import read_split

CLASSES = ["n00000001", "n00000002", "n00000003"]


def rows_by_key(out: Path, split: str) -> dict[str, tuple[int, str]]:
    index = read_split(out, split)
    result = {}
    for shard in index.shards:
        table = pa.ipc.open_stream(pa.memory_map(str(index.shard_path(shard)))).read_all()
        for key, label, wnid in zip(*(table.column(c).to_pylist() for c in ("key", "label", "wnid"))):
            result[key] = (label, wnid)
    return result


def flatten_val(tree: Path) -> dict[str, str]:
    """Move val/<wnid>/x.JPEG to val/ILSVRC2012_val_0000000k.JPEG; returns stem -> wnid."""
    truth = {}
    files = sorted((tree / "val").glob("*/*.JPEG"))
    for k, path in enumerate(files, start=1):
        stem = f"ILSVRC2012_val_{k:08d}"
        truth[stem] = path.parent.name
        path.rename(tree / "val" / f"{stem}.JPEG")
    for d in (tree / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    return truth


def write_meta_mat(devkit: Path, leaf_ids: dict[str, int]) -> None:
    """A devkit meta.mat: leaf synsets with the given IDs, plus non-leaf synsets."""
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images"]
    rows = [(i, w, f"words of {w}", "gloss", 0, 0, 10) for w, i in leaf_ids.items()]
    top = max(leaf_ids.values())
    # Non-leaf synsets (num_children > 0) are in meta.mat but are not classes; one sorts first.
    rows += [(top + 1, "n00000000", "entity", "gloss", 3, 5, 0), (top + 2, "n09999999", "thing", "gloss", 2, 4, 0)]
    synsets = np.zeros(len(rows), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        synsets[i] = row
    (devkit / "data").mkdir(parents=True)
    savemat(devkit / "data" / "meta.mat", {"synsets": synsets})


@pytest.fixture()
def tree(tmp_path) -> Path:
    root = tmp_path / "src"
    write_photo_tree(root, classes=3, train_per_class=2, val_per_class=2, seed=3)
    return root


def test_imagefolder_labels_are_sorted_wnid_positions(tree, tmp_path):
    out = tmp_path / "out"
    build_shards(tree, out, BuildConfig(shard_size=4, workers=1))
    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert [c["wnid"] for c in classes] == CLASSES
    for split in ("train", "val"):
        rows = rows_by_key(out, split)
        assert len(rows) == 6
        for key, (label, wnid) in rows.items():
            assert key.split("/")[1] == wnid == CLASSES[label]


def test_kaggle_tree_with_csv_and_synset_names(tree, tmp_path):
    src = tmp_path / "kaggle"
    (src / "ILSVRC" / "Data").mkdir(parents=True)
    shutil.move(str(tree), src / "ILSVRC" / "Data" / "CLS-LOC")
    truth = flatten_val(src / "ILSVRC" / "Data" / "CLS-LOC")
    lines = ["ImageId,PredictionString"] + [f"{stem},{w} 1 2 3 4 {w} 5 6 7 8" for stem, w in truth.items()]
    (src / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (src / "LOC_synset_mapping.txt").write_text("".join(f"{w} name of {w}, alias\n" for w in CLASSES))
    out = tmp_path / "out"
    build_shards(src, out, BuildConfig(shard_size=4, workers=1))  # the CSV is found in SRC
    rows = rows_by_key(out, "val")
    assert {Path(k).stem: w for k, (_, w) in rows.items()} == truth
    assert all(CLASSES[label] == w for label, w in rows.values())
    names = [c["name"] for c in json.loads((out / "classes.json").read_text())["classes"]]
    assert names == [f"name of {w}, alias" for w in CLASSES]


def test_devkit_ids_follow_meta_order_not_sorted_order(tree, tmp_path):
    truth = flatten_val(tree)
    # ILSVRC2012_IDs in an order that is not sorted-wnid order, as in the real meta.mat.
    ids = {"n00000003": 1, "n00000001": 2, "n00000002": 3}
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    write_meta_mat(devkit, ids)
    gt = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{ids[truth[stem]]}\n" for stem in sorted(truth)))
    out = tmp_path / "out"
    build_shards(tree, out, BuildConfig(shard_size=4, workers=1, splits=("val",), devkit=devkit, val_labels=gt))
    rows = rows_by_key(out, "val")
    assert {Path(k).stem: w for k, (_, w) in rows.items()} == truth
    # A val-only build takes the class list from the train tree, so indices do not shift,
    # and the non-leaf synsets of meta.mat are not classes.
    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert [c["wnid"] for c in classes] == CLASSES
    assert all(CLASSES[label] == w for label, w in rows.values())


def test_val_only_build_without_train_uses_devkit_classes(tree, tmp_path):
    truth = flatten_val(tree)
    shutil.rmtree(tree / "train")
    # The devkit knows a fourth class that has no val image here: indices must still count it.
    ids = {"n00000003": 1, "n00000001": 2, "n00000002": 3, "n00000004": 4}
    write_meta_mat(tree / "ILSVRC2012_devkit_t12", ids)  # found automatically in SRC
    (tree / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ids[truth[s]]}\n" for s in sorted(truth)))
    out = tmp_path / "out"
    build_shards(tree, out, BuildConfig(shard_size=4, workers=1))
    classes = json.loads((out / "classes.json").read_text())["classes"]
    assert [c["wnid"] for c in classes] == CLASSES + ["n00000004"]
    assert [c["name"] for c in classes][0] == "words of n00000001"


def test_val_tree_missing_a_class_keeps_indices(tree, tmp_path):
    shutil.rmtree(tree / "val" / "n00000001")
    out = tmp_path / "out"
    build_shards(tree, out, BuildConfig(shard_size=4, workers=1))
    assert {label for label, _ in rows_by_key(out, "val").values()} == {1, 2}


def test_val_wnid_not_in_class_list_is_named(tree, tmp_path):
    (tree / "val" / "n00000001").rename(tree / "val" / "n07777777")
    with pytest.raises(DataError, match="n07777777"):
        build_shards(tree, tmp_path / "out", BuildConfig(workers=1))


def test_unlabelled_flat_val_image_is_named(tree, tmp_path):
    truth = flatten_val(tree)
    first = sorted(truth)[0]
    rows = [f"{stem},{w} 1 2 3 4" for stem, w in truth.items() if stem != first]
    (tree / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=f"no label for {first}.JPEG"):
        build_shards(tree, tmp_path / "out", BuildConfig(workers=1))


def test_flat_val_without_any_labels_says_what_to_give(tree, tmp_path):
    flatten_val(tree)
    with pytest.raises(DataError, match="--val-labels"):
        build_shards(tree, tmp_path / "out", BuildConfig(workers=1))


def test_bare_imagefolder_is_the_train_split(tree):
    folders = find_split_folders(tree / "train")
    assert list(folders) == ["train"]


def test_stray_files_are_ignored_and_counted(tree):
    (tree / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tree / "train" / "n00000001" / "README.txt").write_text("about this class")
    (tree / "train" / "n00000001" / ".hidden.JPEG").write_bytes(b"x")
    (tree / "train" / "n00000002" / "notes.xml").write_text("<a/>")
    listing = list_split("train", tree / "train", tree)
    assert len(listing) == 6
    assert listing.ignored == sorted([
        "train/.DS_Store", "train/n00000001/.hidden.JPEG", "train/n00000001/README.txt", "train/n00000002/notes.xml",
    ])


# ---------------------------------------------------------------------------- the listing's memory
def _empty_tree(root: Path, classes: int, per_class: int) -> Path:
    for c in range(classes):
        wnid = f"n{1440764 + 7919 * c:08d}"
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            (folder / f"{wnid}_{10000 + 13 * i}.JPEG").touch()
    return root


def _listing_bytes(root: Path) -> tuple[int, int, int]:
    """(files, bytes held, peak bytes) of listing a tree and planning its shards."""
    import gc
    import tracemalloc

    from alexprep.imagenet_prep.build import plan_shards

    gc.collect()
    tracemalloc.start()
    try:
        listing = list_split("train", root / "train", root)
        plans = plan_shards(listing, 1000, 0)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(len(p.rows) for p in plans) == len(listing)
    return len(listing), held, peak


def test_listing_costs_under_100_bytes_a_file(tmp_path):
    """ImageNet's 1.28M files listed as Python objects took ~1 KB each (benchmarks/scale.py):
    the growth from 4,000 to 12,000 files, keys ~30 bytes, stays under 100 bytes a file."""
    _listing_bytes(_empty_tree(tmp_path / "a", 20, 200))  # one-time costs (caches, imports) first
    small = _listing_bytes(tmp_path / "a")
    large = _listing_bytes(_empty_tree(tmp_path / "b", 60, 200))
    files = large[0] - small[0]
    held, peak = (large[1] - small[1]) / files, (large[2] - small[2]) / files
    assert held < 70 and peak < 100, (held, peak)


def test_listing_sorts_rows_given_in_any_order(tmp_path):
    """A zip lists its members in any order: rows of a class folder that come back later are
    merged, and every row keeps its own byte range."""
    import random

    from alexprep.imagenet_prep.archives import ArchiveSplit, Member
    from alexprep.imagenet_prep.listing import ListingBuilder, SplitListing

    split = ArchiveSplit(tmp_path / "k.zip", "zip", "ILSVRC/Data/CLS-LOC/train/")
    rels = [f"{w}/{w}_{i}.JPEG" for w in ("n02", "n01", "n01-x") for i in (3, 1, 2)]
    random.Random(0).shuffle(rels)
    builder = ListingBuilder(SplitListing("train", split, split.prefix))
    for n, rel in enumerate(rels):
        builder.add(rel, Member(str(split.archive), 100 * n, n + 1, split.prefix + rel, 8, n, 7 * n), rel.split("/")[0])
    listing = builder.finish()
    keys = [split.prefix + r for r in rels]
    assert listing.keys() == sorted(keys) and listing.wnids == ["n01", "n01-x", "n02"]
    for i, key in enumerate(listing.keys()):
        n = keys.index(key)
        assert listing.source(i) == Member(str(split.archive), 100 * n, n + 1, key, 8, n, 7 * n)
        assert listing.wnid(i) == key.split("/")[-2] and listing.index_of(key) == i
    assert listing.index_of(split.prefix + "n01/missing.JPEG") is None
