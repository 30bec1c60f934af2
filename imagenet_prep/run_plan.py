"""A training run's plan without its images: which samples every batch of every epoch holds,
on every rank, and their draws. What `replay` and the fingerprints compute directly, with
no loader and no iteration to the batch (docs/design.md, "Replay, fingerprints, parity").

    plan = RunPlan.of_loader(loader)          # or RunPlan(shard_rows, global_batch=128, seed=0)
    index = plan.batch_index(epoch=3, number=17, rank=1, world_size=2)   # sample indices
    draws = plan.draws(3, index)              # augment.Draws (rrc: rrc.RrcDraws)

It composes the loaders' own plan functions (augment.epoch_order, augment.draw,
rrc.draw_rrc) as `Loader.plan` does. Global batch k of an epoch is the k-th block of
`global_batch` samples of the epoch order; rank r of W takes every W-th sample of it
(augment.rank_split), so the batch numbers, the samples fed and their draws are the same
at every world size that divides the global batch: n // global_batch batches an epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alexprep.imagenet_prep import augment, rrc
from alexprep.imagenet_prep.errors import DataError


@dataclass(frozen=True)
class RunPlan:
    """What fixes every epoch's order and draws: the split's shard sizes, the global batch
    and the loader's random options (its recipe's defaults resolved)."""

    shard_rows: np.ndarray  # (shards,) int64 rows per shard, in manifest order
    global_batch: int  # the batch all ranks together take per step (TrainConfig.batch_size)
    seed: int
    order: str = "random"  # or "quasi" (augment.epoch_order)
    buffer_shards: int = 4
    recipe: str = "paper"  # or "rrc"
    lighting_std: float = 0.1
    positions: int = augment.SIZE - augment.CROP + 1  # paper: crop offsets per axis (33 for 224 in 256)
    heights: np.ndarray | None = None  # rrc: each sample's stored size (SplitSamples.heights)
    widths: np.ndarray | None = None
    scale: tuple = rrc.SCALE
    ratio: tuple = rrc.RATIO

    def __post_init__(self) -> None:
        object.__setattr__(self, "shard_rows", np.asarray(self.shard_rows, np.int64))
        if self.global_batch < 1:
            raise DataError(f"the batch size must be at least 1, not {self.global_batch}")
        if self.batches < 1:
            raise DataError(f"the split has {self.samples} samples: fewer than one batch of {self.global_batch}")
        if self.recipe == "rrc" and (self.heights is None or self.widths is None):
            raise DataError("recipe 'rrc' draws its windows from each image's stored size: give heights and widths")

    @classmethod
    def of_loader(cls, loader) -> "RunPlan":
        """The plan of a training `Loader` (loaders.py) with all its ranks: its config's
        options, global batch = batch_size x world_size."""
        c = loader.config
        if not c.train:
            raise DataError("a run's plan is its training loader's; evaluation draws nothing")
        rrc_sizes = dict(heights=loader.samples.heights, widths=loader.samples.widths) if c.recipe == "rrc" else {}
        rows = [s.rows for s in loader.index.shards]
        positions = max(loader.index.spec.size - c.crop + 1, 1) if c.recipe == "paper" else 1
        return cls(rows, c.batch_size * c.world_size, c.seed, c.order, c.buffer_shards, c.recipe,
                   float(c.lighting_std), positions, scale=c.scale, ratio=c.ratio, **rrc_sizes)

    @property
    def samples(self) -> int:
        return int(self.shard_rows.sum())

    @property
    def batches(self) -> int:
        """Batches per epoch: n // global_batch at any world size dividing it (module doc)."""
        return self.samples // self.global_batch

    def fed_order(self, epoch: int) -> np.ndarray:
        """The samples an epoch feeds, all ranks together, in global batch order: the epoch
        order less its last n % global_batch samples."""
        order = augment.epoch_order(self.shard_rows, self.seed, epoch, self.order, self.buffer_shards)
        return order[:self.batches * self.global_batch]

    def batch_index(self, epoch: int, number: int, rank: int | None = None, world_size: int = 1) -> np.ndarray:
        """Sample indices of batch `number` of `epoch`: the global batch (rank None), or rank
        `rank`'s part of it at `world_size` ranks, in the order that rank's loader gives them."""
        self.check_batch(epoch, number)
        if self.global_batch % world_size:
            raise DataError(f"the global batch {self.global_batch} is not divisible by {world_size} ranks")
        order = augment.epoch_order(self.shard_rows, self.seed, epoch, self.order, self.buffer_shards)
        block = order[number * self.global_batch:(number + 1) * self.global_batch]
        if rank is None:
            return block
        augment.check_rank(rank, world_size)
        return block[rank::world_size]  # = augment.rank_split(order, rank, W) batch `number` (module doc)

    def check_batch(self, epoch: int, number: int) -> None:
        if epoch < 0:
            raise DataError(f"epoch must be >= 0, not {epoch}")
        if not 0 <= number < self.batches:
            raise DataError(f"batch {number} does not exist: an epoch has batches 0..{self.batches - 1} "
                            f"({self.samples} samples, global batch {self.global_batch})")

    def draws(self, epoch: int, index: np.ndarray) -> augment.Draws | rrc.RrcDraws:
        """The draws of samples `index` in `epoch`, as the training loader makes them."""
        if self.recipe == "rrc":
            return rrc.draw_rrc(self.seed, epoch, index, self.heights[index], self.widths[index], self.scale,
                                self.ratio, self.lighting_std)
        return augment.draw(self.seed, epoch, index, self.lighting_std, self.positions)
