"""Finding the samples of an input tree: which files, which split, which class.

Layouts read (docs/design.md):
- `SRC/train/<wnid>/*` and `SRC/val/<wnid>/*` (ImageFolder trees; any class names),
- the Kaggle tree `SRC/ILSVRC/Data/CLS-LOC/{train,val}`,
- a flat `val/*.JPEG` labelled by Kaggle's `LOC_val_solution.csv` or by the devkit's
  `ILSVRC2012_validation_ground_truth.txt` + `data/meta.mat`,
- the archives as downloaded (`ILSVRC2012_img_train.tar`, `ILSVRC2012_img_val.tar`,
  `ILSVRC2012_devkit_t12.tar.gz`, Kaggle's zip), read in place (archives.py), in SRC or
  given as SRC; their members list exactly as the same files extracted would,
- SRC itself as an ImageFolder tree (taken as the train split) when it has no train/val.

Files are judged by content later, not by extension here: hidden files and known
non-image files are ignored and counted; every other file is a candidate sample.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from alexprep.imagenet_prep import archives
from alexprep.imagenet_prep.archives import ArchiveSplit
from alexprep.imagenet_prep.classes import ClassList, read_devkit_meta, read_synset_mapping
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.listing import ListingBuilder, SplitListing

SPLITS = ("train", "val")
# Extensions that are never images; everything else is opened and judged by content.
NON_IMAGE_SUFFIXES = frozenset(
    ".txt .json .csv .tsv .xml .mat .tar .gz .tgz .zip .md .py .sh .npz .npy .pdf .html .htm "
    ".yaml .yml .log .arrow .parquet .db .ini .cfg .pkl".split()
)
KAGGLE_SUBDIR = Path("ILSVRC") / "Data" / "CLS-LOC"
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


@dataclass(frozen=True)
class ValLabelSource:
    """Where flat validation images get their wnids."""

    val_labels: Path | None = None  # LOC_val_solution.csv or the devkit ground truth
    devkit: Path | None = None  # holds data/meta.mat (needed with the ground truth file)
    synsets: Path | None = None  # LOC_synset_mapping.txt, where it is not in SRC (read from Kaggle's zip)


def find_split_folders(src: Path, workers: int = 1) -> dict:
    """The splits of SRC: folders (Path), or splits inside archives (ArchiveSplit). Raises
    DataError when SRC is neither a readable tree nor archives as downloaded."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"SRC {src} does not exist")
    if src.is_file():
        found = archives.splits_in_archive(src, workers)
        if not found:
            raise DataError(f"SRC {src} is not a folder, nor an archive of ImageNet as downloaded "
                            f"({archives.TRAIN_TAR}, {archives.VAL_TAR} or a zip holding train/ or val/)")
        return found
    if not src.is_dir():
        raise DataError(f"SRC {src} is not a folder")
    for base in (src, src / KAGGLE_SUBDIR):
        found = {s: base / s for s in SPLITS if (base / s).is_dir()}
        if found:
            # An extracted split wins; a split still in its archive beside it is read in place.
            extra = archives.find_archives(src, workers) if base == src and len(found) < len(SPLITS) else {}
            return {s: found.get(s) or extra[s] for s in SPLITS if s in found or s in extra}
    found = archives.find_archives(src, workers)
    if found:
        return found
    # A bare ImageFolder tree: class folders directly under SRC.
    if any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(src)):
        return {"train": src}
    raise DataError(f"SRC {src} has no train/ or val/ folder, no class folders and no ImageNet archives "
                    f"({archives.TRAIN_TAR}, {archives.VAL_TAR}, {archives.KAGGLE_ZIP}): nothing to build")


def label_root(src: Path) -> Path:
    """Where label files are looked for: SRC, or the folder of an archive given as SRC."""
    src = Path(src)
    return src.parent if src.is_file() else src


def _is_ignored(name: str) -> bool:
    # splitext, not Path(name).suffix: a Path per file interns its name (sys.intern), and the
    # intern table's growth over 1.28M names is memory the listing's budget does not have.
    return name.startswith(".") or os.path.splitext(name)[1].lower() in NON_IMAGE_SUFFIXES


def _walk_files(folder: Path):
    """Yield (path, name) of every file below folder, skipping hidden folders."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            yield os.path.join(dirpath, name), name


def _key(path: str, src: Path) -> str:
    return Path(os.path.relpath(path, src)).as_posix()


def list_split(split: str, folder, src: Path, labels: ValLabelSource = ValLabelSource()) -> SplitListing:
    """List one split: class folders (ImageFolder), or flat files labelled from a label file.

    `folder` is a folder, or an ArchiveSplit listed the same way as its files extracted."""
    if isinstance(folder, ArchiveSplit):
        dirs, entries, problems = folder.scan()
        listing = _list_entries(SplitListing(split, folder, folder.prefix), dirs, entries, src, labels)
        listing.problems = problems
        return listing
    class_dirs = {e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")}
    prefix = _key(str(folder), src) + "/" if Path(folder) != Path(src) else ""
    return _list_entries(SplitListing(split, folder, prefix), class_dirs, _tree_entries(folder, class_dirs), src, labels)


def _tree_entries(folder: Path, class_dirs: set):
    """(path relative to folder, path) of its files and of every file in its class folders,
    one class folder at a time."""
    for e in os.scandir(folder):
        if e.is_file():
            yield e.name, str(folder / e.name)
    for wnid in class_dirs:
        for path, _ in _walk_files(folder / wnid):
            yield Path(os.path.relpath(path, folder)).as_posix(), path


def _list_entries(listing: SplitListing, dirs: set, entries, src: Path, labels: ValLabelSource) -> SplitListing:
    """Fill `listing` from (path relative to its folder, source) pairs and the folder's
    top-level folders, whether the files are on disk or in an archive: one rule for both.
    Files directly in the split folder are its images when it has no class folders (labelled
    from a label file), else they belong to no class and are ignored and counted."""
    prefix, split = listing.prefix, listing.split
    class_dirs = {d for d in dirs if not d.startswith(".")}
    builder, unlabelled, wnid_of = ListingBuilder(listing), [], None
    for rel, source in entries:
        if "/" not in rel:
            if _is_ignored(rel) or class_dirs:
                listing.ignored.append(prefix + rel)
                continue
            wnid_of = read_val_labels(src, labels) if wnid_of is None else wnid_of
            wnid = wnid_of.get(Path(rel).stem)
            if wnid is None:
                unlabelled.append(rel)
            else:
                builder.add(rel, source, wnid)
            continue
        parts = rel.split("/")
        # Files in hidden folders are skipped (as os.walk is told to), not counted.
        if parts[0] not in class_dirs or any(p.startswith(".") for p in parts[1:-1]):
            continue
        if _is_ignored(parts[-1]):
            listing.ignored.append(prefix + rel)
        else:
            builder.add(rel, source, parts[0])
    if unlabelled:
        unlabelled.sort()
        more = f" and {len(unlabelled) - 3} more" if len(unlabelled) > 3 else ""
        raise DataError(f"{split}: no label for {', '.join(unlabelled[:3])}{more} in {describe_label_source(src, labels)}")
    listing.ignored.sort()
    return builder.finish()


def _auto_label_source(src: Path, labels: ValLabelSource) -> ValLabelSource:
    """Fill in label files that sit in SRC (Kaggle) or in the devkit folder."""
    src = label_root(src)
    devkit = labels.devkit
    if devkit is None and (src / DEVKIT_DIR).is_dir():
        devkit = src / DEVKIT_DIR
    val_labels = labels.val_labels
    if val_labels is None:
        for candidate in (
            src / KAGGLE_VAL_CSV,
            src / DEVKIT_GROUND_TRUTH,
            *((devkit / "data" / DEVKIT_GROUND_TRUTH,) if devkit else ()),
        ):
            if candidate.is_file():
                val_labels = candidate
                break
    return ValLabelSource(val_labels, devkit, labels.synsets)


def describe_label_source(src: Path, labels: ValLabelSource) -> str:
    found = _auto_label_source(Path(src), labels)
    return str(found.val_labels) if found.val_labels else "(no label file: give --val-labels)"


def read_val_labels(src: Path, labels: ValLabelSource) -> dict[str, str]:
    """Image stem ('ILSVRC2012_val_00000001') -> wnid, from Kaggle's CSV or the devkit."""
    found = _auto_label_source(Path(src), labels)
    path = found.val_labels
    if path is None:
        raise DataError(
            "the validation images sit in one flat folder and no labels were found: give "
            f"--val-labels {KAGGLE_VAL_CSV} (Kaggle) or --val-labels {DEVKIT_GROUND_TRUTH} --devkit DIR"
        )
    if not Path(path).is_file():
        raise DataError(f"--val-labels {path}: no such file")
    if Path(path).suffix.lower() == ".csv":
        return _read_kaggle_csv(Path(path))
    if found.devkit is None:
        raise DataError(f"{path} holds ILSVRC2012_IDs: give --devkit DIR (the folder holding data/meta.mat) to map them to wnids")
    id_to_wnid, _ = read_devkit_meta(found.devkit)
    wnid_of = {}
    for line_no, line in enumerate(Path(path).read_text().split(), start=1):
        try:
            wnid_of[f"ILSVRC2012_val_{line_no:08d}"] = id_to_wnid[int(line)]
        except (ValueError, KeyError):
            raise DataError(f"{path} line {line_no}: {line!r} is not an ILSVRC2012_ID of a class in meta.mat") from None
    return wnid_of


def _read_kaggle_csv(path: Path) -> dict[str, str]:
    wnid_of = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected Kaggle's columns ImageId,PredictionString")
        for row in reader:
            tokens = row["PredictionString"].split()
            if tokens:
                wnid_of[row["ImageId"]] = tokens[0]  # first token of each box is its wnid
    return wnid_of


def known_class_names(src: Path, labels: ValLabelSource) -> dict[str, str]:
    """Human names for wnids, from LOC_synset_mapping.txt or the devkit, where present."""
    src = label_root(src)
    found = _auto_label_source(src, labels)
    if labels.synsets is not None:
        return read_synset_mapping(labels.synsets)
    if (src / KAGGLE_SYNSETS).is_file():
        return read_synset_mapping(src / KAGGLE_SYNSETS)
    if found.devkit and (found.devkit / "data" / "meta.mat").is_file():
        return read_devkit_meta(found.devkit)[1]
    return {}


def _mapped_classes(train: ArchiveSplit, names: dict[str, str], built: bool) -> ClassList:
    """The devkit's or the synset mapping's classes; the train archive's (read only when it
    is built now) must be among them."""
    if built:
        extra = sorted(set(train.class_names()) - set(names))
        if extra:
            raise DataError(f"{train} holds class {extra[0]}{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}, "
                            f"not among the {len(names)} classes of the devkit or synset mapping beside it: give "
                            "--classes FILE, or the devkit of these archives")
    return ClassList.from_wnids(names.keys(), names)


def infer_class_list(src: Path, folders: dict[str, Path], listings: dict[str, SplitListing], labels: ValLabelSource) -> ClassList:
    """The class list for a new build folder when none is given: the train tree's class
    folders (even when only val is built now); else the devkit's 1000 classes or Kaggle's
    synset mapping; else the val tree's class folders. A train split still in its archive
    takes the devkit's or the mapping's classes when one is present, so that a partial
    download never shrinks the list (archives.py refuses a truncated one in one line)."""
    src = Path(src)
    names = known_class_names(src, labels)
    if "train" in folders:
        train = folders["train"]
        if isinstance(train, ArchiveSplit) and names:
            return _mapped_classes(train, names, "train" in listings)
        wnids = train.class_names() if isinstance(train, ArchiveSplit) else [
            e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith(".")]
        if wnids:
            return ClassList.from_wnids(wnids, names)
    found = _auto_label_source(src, labels)
    if found.devkit and (found.devkit / "data" / "meta.mat").is_file():
        return ClassList.from_wnids(read_devkit_meta(found.devkit)[1].keys(), names)
    if names:
        return ClassList.from_wnids(names.keys(), names)
    if "val" in listings and len(listings["val"]):
        return ClassList.from_wnids(listings["val"].wnids, names)
    raise DataError("cannot tell the class list: build the train split first, or give --classes FILE")
