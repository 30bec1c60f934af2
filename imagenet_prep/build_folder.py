"""The names of a build folder's files, in one place (docs/design.md, "The build folder OUT").

    OUT/classes.json                                the class list, fixed once per build folder
    OUT/stats.npz, stats.json, stats.png            `alexprep stats` (the loaders read stats.npz)
    OUT/.lock, .lock-part-002-of-016                build-shards' flocks (locks.py)
    OUT/features/                                   fc7 features cached by `alexprep inspect neighbors`
    OUT/<split>/<split>-00000-of-01252.arrow        a shard
    OUT/<split>/<split>-00000-of-01252.stats.npz    its statistics partial and its record
    OUT/<split>/manifest.json                       or manifest-part-002-of-016.json per --part

A remote cache's folder (shard_cache.py) mirrors this layout, so that it reads as one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CLASSES = "classes.json"
STATS = "stats.npz"  # what the loaders read
STATS_JSON = "stats.json"
STATS_PNG = "stats.png"
STATS_FILES = (STATS, STATS_JSON, STATS_PNG)
ROOT_FILES = (CLASSES, *STATS_FILES)  # a build's files beside its splits
FEATURES = "features"  # the default cache of model/neighbors.py
LOCK = ".lock"  # a whole build holds it exclusively, a --part run shared (locks.build_lock)
SHARD_SUFFIX = ".arrow"
PARTIAL_SUFFIX = ".stats.npz"
SHARD_GLOB = f"*{SHARD_SUFFIX}"
PARTIAL_GLOB = f"*{PARTIAL_SUFFIX}"
MANIFEST_GLOB = "manifest*.json"
PART_LOCK = re.compile(r"^\.lock-part-(\d+)-of-(\d+)$")


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def partial_name(shard: str) -> str:
    """The statistics partial beside a shard: train-00000-of-00010.stats.npz."""
    return shard[: -len(SHARD_SUFFIX)] + PARTIAL_SUFFIX


def manifest_name(part: int, parts: int) -> str:
    return "manifest.json" if parts == 1 else f"manifest-part-{part:03d}-of-{parts:03d}.json"


def part_lock_name(part: int, parts: int) -> str:
    return f".lock-part-{part:03d}-of-{parts:03d}"


def is_manifest(name: str) -> bool:
    """Whether a file name (or a "split/name" path) is a manifest's."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith("manifest") and base.endswith(".json")


@dataclass(frozen=True)
class BuildFolder:
    """A build folder OUT's paths (they need not exist yet)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def classes(self) -> Path:
        return self.root / CLASSES

    @property
    def stats(self) -> Path:
        return self.root / STATS

    def stats_paths(self) -> dict[str, Path]:
        """{"npz", "json", "png"}: `alexprep stats`'s outputs."""
        return {"npz": self.root / STATS, "json": self.root / STATS_JSON, "png": self.root / STATS_PNG}

    @property
    def features(self) -> Path:
        return self.root / FEATURES

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    def part_lock(self, part: int, parts: int) -> Path:
        return self.root / part_lock_name(part, parts)

    def split(self, split: str) -> Path:
        return self.root / split

    def manifest(self, split: str, part: int = 0, parts: int = 1) -> Path:
        return self.root / split / manifest_name(part, parts)

    def manifests(self, split: str) -> list[Path]:
        """The split's manifests (a whole build's, or one per --part run), sorted."""
        return sorted(self.split(split).glob(MANIFEST_GLOB))

    def shards(self, split: str) -> list[Path]:
        """Every shard file in the split, listed or not (sorted)."""
        return sorted(self.split(split).glob(SHARD_GLOB))

    def partials(self, split: str) -> list[Path]:
        """Every statistics partial in the split (sorted)."""
        return sorted(self.split(split).glob(PARTIAL_GLOB))
