"""What the loaders subtract and divide by, taken from the build's statistics
(docs/design.md, "Augmentation semantics")."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alexprep.imagenet_prep.build_folder import BuildFolder
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.shards import SplitIndex
from alexprep.imagenet_prep.stats import DatasetStats

NORMALIZE = ("mean-image", "channel")


@dataclass(frozen=True)
class Normalization:
    """out = ((x - mean_image window) - base + lighting shift) / std, with mean_image None
    for "channel" and base = 0, std = 1 for "mean-image"."""

    mean_image: np.ndarray | None  # (S, S, 3) float32
    base: np.ndarray  # (3,) float32
    std: np.ndarray  # (3,) float32
    eigvals: np.ndarray  # (3,) float64, for the lighting shift
    eigvecs: np.ndarray  # (3, 3) float64

    @property
    def inv_std(self) -> np.ndarray:
        # DALI multiplies by 1/std computed in float32; the torch backend does the same, so
        # that the two agree to the bit.
        return (np.float32(1.0) / self.std).astype(np.float32)

    @classmethod
    def from_stats(cls, stats: DatasetStats, normalize: str, size: int) -> "Normalization":
        if normalize not in NORMALIZE:
            raise DataError(f"normalize must be one of {NORMALIZE}, not {normalize!r}")
        if normalize == "mean-image":
            if stats.mean_image is None:
                raise DataError("normalize='mean-image' needs a centre-crop build: this build's images differ in size "
                                "(--resize keep-aspect) and have no mean image; use normalize='channel'")
            mean = np.asarray(stats.mean_image, np.float32)
            if mean.shape != (size, size, 3):
                raise DataError(f"the statistics' mean image is {mean.shape[:2]}, the shards' images are "
                                f"{size}x{size}: they come from different builds")
            ones = np.ones(3, np.float32)
            return cls(np.ascontiguousarray(mean), np.zeros(3, np.float32), ones, stats.eigvals, stats.eigvecs)
        return cls(None, np.asarray(stats.channel_mean, np.float32), np.asarray(stats.channel_std, np.float32),
                   stats.eigvals, stats.eigvecs)


def resolve_stats(root: Path, stats, index: SplitIndex) -> DatasetStats:
    """`stats` as DatasetStats: None reads OUT/stats.npz, a path reads that file. Refuses
    statistics of another build, naming both."""
    if isinstance(stats, DatasetStats):
        source = "the statistics given"
    else:
        path = BuildFolder(root).stats if stats is None else Path(stats)
        source = str(path)
        if stats is None and not path.exists():
            raise DataError(f"{path} is missing: run `alexprep stats {root}` first, or pass stats=")
        stats = DatasetStats.load(path)
    if stats.build_id and index.build_id and stats.build_id != index.build_id:
        raise DataError(f"{source} belongs to build {stats.build_id}, but {index.folder} is build "
                        f"{index.build_id}: run `alexprep stats {root}` again")
    return stats
