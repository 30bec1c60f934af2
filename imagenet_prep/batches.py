"""Batches as decided on the host, before any pixel is touched, and the streaming logic
both backends share: a backend is fed one endless stream of batch plans, so that its
prefetching runs on across epoch boundaries, and is restarted when an iteration does not
continue where the stream stands (docs/design.md, "Loaders"); and `BackendInput`, all a
backend is given."""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alexprep.imagenet_prep import augment, rrc
from alexprep.imagenet_prep.devices import torch_dtype
from alexprep.imagenet_prep.normalization import Normalization
from alexprep.imagenet_prep.samples import SplitSamples
from alexprep.imagenet_prep.transform import ImageSpec

if TYPE_CHECKING:  # the plans need no torch: only the backends that render them
    import torch


@dataclass(frozen=True)
class Batch:
    """One batch as decided on the host."""

    epoch: int
    number: int  # position in the epoch
    index: np.ndarray  # (B,) int64 sample indices in the split
    labels: np.ndarray  # (B,) int64
    # (B, K, 3) int64 rows (offset_x, offset_y, flip), K = 1 or 10; recipe "rrc": (B, 1, 5)
    # rows (x, y, w, h, flip), the window of the stored image resized to the output size
    windows: np.ndarray
    cmn_mean: np.ndarray  # (B, 3) float32: base - lighting shift, subtracted after the mean image
    draws: augment.Draws | rrc.RrcDraws | None = None  # training: the draws these came from

    def __len__(self) -> int:
        return len(self.index)


class EpochPlan(Sequence):
    """The batches of one epoch on one rank, made on demand by `make_batch(epoch, number,
    sample indices)` (draws are cheap, but a million samples' at once would be a needless
    pause at every epoch start)."""

    def __init__(self, make_batch: Callable[[int, int, np.ndarray], Batch], epoch: int, order: np.ndarray,
                 batch_size: int):
        self.make_batch, self.epoch, self.order, self.batch_size = make_batch, epoch, order, batch_size

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(f"batch {k} of {len(self)}")
        k %= len(self)
        return self.make_batch(self.epoch, k, self.order[k * self.batch_size:(k + 1) * self.batch_size])


def endless_batches(plan_of: Callable[[int], EpochPlan], epoch: int, start: int) -> Iterator[Batch]:
    """Epoch `epoch` from batch `start`, then every following epoch: what a backend's
    prefetching pipeline is fed, so that it does not drain at each epoch's end (over a
    small split that idles the workers for a large share of the time). Feeding ahead is
    speculative: a backend whose next iteration is not the continuation drops it."""
    while True:
        plan = plan_of(epoch)
        for number in range(start, len(plan)):
            yield plan[number]
        epoch, start = epoch + 1, 0


def stream_position(plan: EpochPlan, start: int) -> tuple[int, int]:
    """(epoch, batch) of the first batch a run from `start` yields; past the end of an epoch
    that is the next epoch's batch 0 (where an endless stream stands after it)."""
    return (plan.epoch, start) if start < len(plan) else (plan.epoch + 1, 0)


@dataclass(frozen=True)
class BackendInput:
    """Everything a backend reads, and the two things it calls: what the loader hands a
    backend in place of itself. The host's decisions come in the plans; the backend renders
    them from `samples` and reports the images that do not decode."""

    samples: SplitSamples  # the split's images, views of its memory-mapped shards
    spec: ImageSpec  # how they are stored: encoding, size, keep-aspect
    norm: Normalization  # what the images are normalised with
    # The loader's LoaderConfig (loaders.py, a layer above); a backend reads its batch_size,
    # threads, prefetch, train, crops, crop, recipe, decoder and dtype.
    config: Any
    device: torch.device  # where the batches go
    positions: int  # the paper's crop offsets per axis (33 for 224 in 256); 0 for recipe "rrc"
    eval_windows: np.ndarray | None  # evaluation's (K, 3) fixed windows (paper recipe); None in training
    plan: Callable[[int], EpochPlan]  # plan(epoch): that epoch's batches on this rank (Loader.plan)
    report_failures: Callable[[list[str]], None]  # images fed as grey: "shard row: reason" each

    @property
    def root(self) -> Path:
        """The build folder (its local mirror for a remote one), named in errors."""
        return self.samples.index.root


class BatchStream(abc.ABC):
    """What the DALI and torch backends share: one endless feed of batch plans, restarted
    only when an iteration does not follow on, and batches checked against the plan.

    A backend implements `_restart(feed)` (drop what was prefetched, start on `feed`) and
    `_produce()` -> ((epoch, number), images, labels), the next batch of the stream.
    """

    def __init__(self, source: BackendInput):
        self.input = source
        self._next = None  # (epoch, batch) the stream's next output is; None: not started
        self._generation = 0  # which iteration owns the stream (a new one supersedes the last)

    def run(self, plan: EpochPlan, start: int) -> Iterator:
        """Batches start.. of `plan`."""
        position = stream_position(plan, start)
        if self._next != position:
            self._restart(endless_batches(self.input.plan, *position))
            self._next = position
        self._generation += 1
        return self._iterate(self._generation, plan.epoch, range(start, len(plan)))

    def continues(self, plan: EpochPlan, start: int) -> bool:
        """Whether a run of `plan` from `start` continues the stream (keeps what it fed ahead)."""
        return self._next == stream_position(plan, start)

    def stop(self) -> None:
        """Drop what was fed ahead (a size-limited cache then lets go of its shards); the next
        run starts the stream afresh."""
        if self._next is not None:
            self._restart(iter(()))
            self._next = None

    def rest(self) -> None:
        """An evaluation pass is over. The torch backend ends its workers (the next pass
        starts them again); DALI keeps its pipeline."""

    def _iterate(self, generation: int, epoch: int, numbers: range):
        dtype = torch_dtype(self.input.config.dtype)
        last = len(numbers) and numbers[-1]
        for number in numbers:
            if generation != self._generation:
                raise RuntimeError("this iterator was superseded: the loader has started another epoch since")
            which, images, labels = self._produce()
            # By value: pin_memory turns tuples into lists in some torch releases.
            if tuple(which) != (epoch, number):  # a bug, never the user's doing
                raise RuntimeError(f"{type(self).__name__} returned batch {which[1]} of epoch {which[0]}, "
                                   f"expected {number} of {epoch}")
            self._next = (epoch, number + 1) if number != last else (epoch + 1, 0)
            if images.dtype != dtype:
                images = images.to(dtype)
            yield images, labels

    @abc.abstractmethod
    def _restart(self, feed: Iterator[Batch]) -> None:
        """Drop what was prefetched and start on `feed`."""

    @abc.abstractmethod
    def _produce(self) -> tuple:
        """The stream's next batch: ((epoch, number), images, labels)."""

    def close(self) -> None:
        self._next = None
