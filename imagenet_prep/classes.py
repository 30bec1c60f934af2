"""The class list: which wnid is class index i, with human names where known.

Index = position of the wnid in sorted order (Caffe, torchvision and Kaggle agree). The
list is fixed once per build folder (`OUT/classes.json`) and reused by every split and
part, so a val-only build or a tree missing a class never shifts indices.

Names come from Kaggle's `LOC_synset_mapping.txt` ("n01440764 tench, Tinca tinca") or the
ILSVRC2012 devkit's `data/meta.mat`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from alexprep.imagenet_prep.atomic import write_text_atomic
from alexprep.imagenet_prep.errors import DataError


@dataclass(frozen=True)
class ClassList:
    """wnids in index order, and a name for each ('' where unknown)."""

    wnids: tuple[str, ...]
    names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.names:
            object.__setattr__(self, "names", ("",) * len(self.wnids))
        if len(self.names) != len(self.wnids):
            raise ValueError("one name per wnid")
        if len(set(self.wnids)) != len(self.wnids):
            raise DataError("the class list repeats a wnid")
        if list(self.wnids) != sorted(self.wnids):
            raise DataError("class lists are kept in sorted wnid order (class index = sorted position)")

    def __len__(self) -> int:
        return len(self.wnids)

    def index(self, wnid: str) -> int:
        try:
            return self._lookup[wnid]
        except KeyError:
            raise DataError(f"class {wnid!r} is not in the build's class list ({len(self)} classes)") from None

    @property
    def _lookup(self) -> dict[str, int]:
        cached = self.__dict__.get("_lookup_cache")
        if cached is None:
            cached = {w: i for i, w in enumerate(self.wnids)}
            object.__setattr__(self, "_lookup_cache", cached)
        return cached

    @classmethod
    def from_wnids(cls, wnids, names: dict[str, str] | None = None) -> "ClassList":
        ordered = tuple(sorted(set(wnids)))
        names = names or {}
        return cls(ordered, tuple(names.get(w, "") for w in ordered))

    def with_names(self, names: dict[str, str]) -> "ClassList":
        return ClassList(self.wnids, tuple(names.get(w, n) or n for w, n in zip(self.wnids, self.names)))

    def to_json(self) -> dict:
        return {"classes": [{"index": i, "wnid": w, "name": n} for i, (w, n) in enumerate(zip(self.wnids, self.names))]}

    @classmethod
    def from_json(cls, data: dict) -> "ClassList":
        rows = data["classes"]
        return cls(tuple(r["wnid"] for r in rows), tuple(r.get("name", "") for r in rows))


def save_classes(classes: ClassList, path: Path) -> None:
    write_text_atomic(path, json.dumps(classes.to_json(), indent=1) + "\n")


def load_classes(path: Path) -> ClassList:
    try:
        return ClassList.from_json(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise DataError(f"{path} is missing: run `alexprep build-shards` first") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a class list written by alexprep ({exc})") from None


def read_class_file(path: Path) -> ClassList:
    """`--classes FILE`: a classes.json, or text with one wnid per line (optionally followed
    by its name, as in LOC_synset_mapping.txt)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--classes {path}: no such file")
    if path.suffix == ".json":
        return load_classes(path)
    names = read_synset_mapping(path)
    if not names:
        raise DataError(f"--classes {path}: no wnids in it (one per line, e.g. 'n01440764 tench')")
    return ClassList.from_wnids(names, names)


def read_synset_mapping(path: Path) -> dict[str, str]:
    """Kaggle's LOC_synset_mapping.txt: 'n01440764 tench, Tinca tinca' per line."""
    names: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts:
            names[parts[0]] = parts[1] if len(parts) > 1 else ""
    return names


def read_devkit_meta(devkit: Path) -> tuple[dict[int, str], dict[str, str]]:
    """The devkit's data/meta.mat, read as torchvision's ImageNet does.

    Returns (ILSVRC2012_ID -> wnid, wnid -> words) over the leaf synsets only: meta.mat also
    lists the non-leaf synsets of the hierarchy (num_children > 0), which are not classes.
    The IDs follow meta.mat's order, which is NOT sorted-wnid order.
    """
    meta_path = Path(devkit) / "data" / "meta.mat"
    if not meta_path.is_file():
        raise DataError(f"--devkit {devkit}: data/meta.mat is missing (expected ILSVRC2012_devkit_t12/data/meta.mat)")
    from scipy.io import loadmat  # only needed for the devkit

    try:
        synsets = loadmat(str(meta_path), squeeze_me=True)["synsets"]
    except Exception as exc:  # scipy raises many types for a bad .mat
        raise DataError(f"{meta_path} could not be read as the ILSVRC2012 meta.mat ({exc})") from None
    id_to_wnid: dict[int, str] = {}
    words: dict[str, str] = {}
    for row in synsets:
        ilsvrc_id, wnid, word, num_children = int(row["ILSVRC2012_ID"]), str(row["WNID"]), str(row["words"]), int(row["num_children"])
        if num_children == 0:
            id_to_wnid[ilsvrc_id] = wnid
            words[wnid] = word
    return id_to_wnid, words
