"""The loaders that feed the trainer: `train_loader` and `eval_loader`.

    from alexprep.imagenet_prep.loaders import train_loader, eval_loader

    train = train_loader("OUT", batch_size=128, device="cuda:0", seed=0)
    for epoch in range(90):
        for images, labels in train:  # (128, 3, 224, 224) float32 on cuda:0, (128,) int64
            ...
    # exact resume mid-epoch: train.set_epoch(e, start_batch=k)

    val = eval_loader("OUT", batch_size=250, device="cuda:0", crops=10)
    for images, labels in val:  # (B, 10, 3, 224, 224): see augment.ten_crop_windows
        ...

What the images are (DESIGN.md, "Augmentation semantics"): 0-255 RGB, NCHW, minus the
training set's mean image (the same 224x224 window of it, mirrored with the image), plus
PCA lighting `eigvecs @ (alpha * sqrt(eigvals))` in training. With `normalize="channel"`:
`(x + lighting - channel_mean) / channel_std` instead.

Two backends, one set of semantics: "dali" (pipeline.py: DALI's CPU operators with
`device="cpu"`, nvJPEG and GPU operators with `device="cuda:N"`) and "torch"
(torch_pipeline.py: a DataLoader decoding with PIL in worker processes). Every draw is
made here on the host (augment.py), so both backends, any number of ranks, any batch size
and any resume point give each sample the same augmentation; given the same draws the
backends' tensors are identical on `--encoding raw` shards (JPEG decoders may differ by a
level or two).

What is dropped in training, per epoch (documented in augment.py): the last `n % W`
samples of that epoch's order (so that W ranks get equal, disjoint parts) and on each
rank its last `(n // W) % batch_size` samples (the incomplete batch). The order changes
every epoch, so no sample is always dropped. Evaluation drops and duplicates nothing.

Output tensors are the caller's: DALI's buffers are shared zero-copy (DLPack) and are not
reused while a tensor refers to them; the torch backend's come from shared memory.
Both backends prepare batches ahead across epoch boundaries (`endless_batches`); an
iteration that does not continue where the previous one stopped drops them and restarts.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from alexprep.imagenet_prep import augment
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.shards import SplitIndex, image_bytes_column, open_shard, read_split
from alexprep.imagenet_prep.stats import DatasetStats

BACKENDS = ("dali", "torch")
NORMALIZE = ("mean-image", "channel")
ORDERS = ("random", "quasi")
DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class LoaderConfig:
    """Everything a loader does; built by `train_loader` / `eval_loader` (or the trainer's
    config), checked here so that a bad value fails before any shard is opened."""

    batch_size: int  # per rank
    device: str = "cpu"  # "cpu" or "cuda:N"
    backend: str = "dali"  # "dali", or "torch" where DALI does not install
    train: bool = True  # random crops, flips and lighting; else fixed crops
    seed: int = 0  # with (epoch, sample index), fixes every draw and the order
    lighting_std: float = 0.1  # the paper's sigma for PCA lighting alphas; 0 disables
    normalize: str = "mean-image"  # the paper's; "channel" uses per-channel mean and std
    order: str = "random"  # "quasi" for datasets larger than RAM (see augment.epoch_order)
    buffer_shards: int = 4  # "quasi": shards shuffled together (~160 MB of q95 JPEGs)
    crops: int = 1  # eval: 1 (centre) or 10 (corners, centre and mirrors)
    rank: int = 0
    world_size: int = 1
    dtype: str = "float32"  # of the images; "bfloat16"/"float16" for GPU training
    crop: int = augment.CROP  # 224: the paper's input (the images are the shards' size)
    workers: int | None = None  # DALI threads / DataLoader processes; None: this process's CPUs
    prefetch: int = 2  # batches prepared ahead (DALI's prefetch_queue_depth)

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, not {self.batch_size!r}")
        if self.backend not in BACKENDS:
            raise DataError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        parse_device(self.device)  # the syntax only; availability is checked on use
        if self.normalize not in NORMALIZE:
            raise DataError(f"normalize must be one of {NORMALIZE}, not {self.normalize!r}")
        if self.order not in ORDERS:
            raise DataError(f"order must be one of {ORDERS}, not {self.order!r}")
        if self.buffer_shards < 1:
            raise DataError(f"buffer_shards must be at least 1, not {self.buffer_shards}")
        if self.crops not in (1, 10):
            raise DataError(f"crops must be 1 (centre) or 10 (corners, centre and their mirrors), not {self.crops}")
        if self.train and self.crops != 1:
            raise DataError("crops=10 is for evaluation; training takes one random crop per image")
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {self.rank} of world_size {self.world_size}: expected 0 <= rank < world_size")
        if not 0 <= self.seed < 2**64:
            raise DataError(f"seed must be an integer in [0, 2**64), not {self.seed}")
        if not self.lighting_std >= 0:
            raise DataError(f"lighting_std must be >= 0 (0 disables lighting), not {self.lighting_std}")
        if self.dtype not in DTYPES:
            raise DataError(f"dtype must be one of {DTYPES}, not {self.dtype!r}")
        if self.crop < 1:
            raise DataError(f"crop must be positive, not {self.crop}")
        if self.workers is not None and self.workers < 0:
            raise DataError(f"workers must be >= 0, not {self.workers}")
        if self.prefetch < 1:
            raise DataError(f"prefetch must be at least 1, not {self.prefetch}")

    @property
    def threads(self) -> int:
        return self.workers if self.workers is not None else available_cpus()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def parse_device(device) -> tuple[str, int | None]:
    """("cpu", None) or ("cuda", N) from "cpu", "cuda", "cuda:N" or a torch.device."""
    text = str(device)
    if text == "cpu":
        return "cpu", None
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not match:
        raise DataError(f"device must be 'cpu' or 'cuda:N', not {device!r}")
    return "cuda", int(match.group(1) or 0)


def check_device(device: str):
    """The torch.device for `device`, or a DataError saying why it cannot be used here."""
    import torch

    kind, number = parse_device(device)
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DataError(f"device {device!r}: CUDA is not available on this machine "
                        f"(torch {torch.__version__} sees no GPU); use device='cpu'")
    if number >= torch.cuda.device_count():
        raise DataError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", number)


def torch_dtype(dtype):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def dtype_name(dtype) -> str:
    """"float32" from torch.float32 or "float32"."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise DataError(f"dtype must be one of torch.float32, torch.bfloat16, torch.float16, not {dtype!r}")
    return name


# ---------------------------------------------------------------------------- samples
class SplitSamples:
    """Every image of a split as a zero-copy numpy view of its memory-mapped shard.

    Sample i is the i-th row in shard order (the index every draw is keyed by). Nothing is
    read until a view's bytes are: the OS pages shards in as they are used.
    """

    def __init__(self, index: SplitIndex):
        self.index = index
        self.shard_rows = np.array([s.rows for s in index.shards], np.int64)
        self._tables = [open_shard(index, s) for s in index.shards]  # keep the maps alive
        self._buffers: list[np.ndarray] = []
        chunk_ids, starts, stops, labels = [], [], [], []
        for shard, table in zip(index.shards, self._tables):
            label = table.column("label")
            if label.null_count:
                raise DataError(f"shard {index.shard_path(shard)} has rows without a label")
            labels.append(label.to_numpy().astype(np.int64, copy=False))
            for chunk in image_bytes_column(table).chunks:
                if chunk.null_count:
                    raise DataError(f"shard {index.shard_path(shard)} has rows without image bytes")
                _, offsets, data = chunk.buffers()[:3]
                width = np.int64 if chunk.type == _large_binary() else np.int32
                off = np.frombuffer(offsets, width)[chunk.offset: chunk.offset + len(chunk) + 1].astype(np.int64)
                self._buffers.append(np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8))
                chunk_ids.append(np.full(len(chunk), len(self._buffers) - 1, np.int32))
                starts.append(off[:-1])
                stops.append(off[1:])
        empty = np.zeros(0, np.int64)
        self._chunk = np.concatenate(chunk_ids) if chunk_ids else np.zeros(0, np.int32)
        self._start = np.concatenate(starts) if starts else empty
        self._stop = np.concatenate(stops) if stops else empty
        self.labels = np.concatenate(labels) if labels else empty
        self.classes = len(index.classes)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.classes):
            raise DataError(f"{index.folder}: labels outside 0..{self.classes - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    def view(self, i: int) -> np.ndarray:
        """Sample i's encoded bytes, a read-only view of the shard's memory map."""
        return self._buffers[self._chunk[i]][self._start[i]:self._stop[i]]

    def views(self, indices) -> list[np.ndarray]:
        return [self.view(i) for i in indices]


def _large_binary():
    import pyarrow as pa

    return pa.large_binary()


# ---------------------------------------------------------------------------- normalisation
@dataclass(frozen=True)
class Normalisation:
    """What is subtracted and divided: out = ((x - mean_image window) - base + shift) / std,
    with mean_image None for "channel" and base = 0, std = 1 for "mean-image"."""

    mean_image: np.ndarray | None  # (S, S, 3) float32
    base: np.ndarray  # (3,) float32
    std: np.ndarray  # (3,) float32
    eigvals: np.ndarray  # (3,) float64, for the lighting shift
    eigvecs: np.ndarray  # (3, 3) float64

    @property
    def inv_std(self) -> np.ndarray:
        # DALI multiplies by 1/std computed in float32; the torch twin does the same, so that
        # the two agree to the bit.
        return (np.float32(1.0) / self.std).astype(np.float32)

    @classmethod
    def from_stats(cls, stats: DatasetStats, normalize: str, size: int) -> "Normalisation":
        if normalize == "mean-image":
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
        path = Path(root) / "stats.npz" if stats is None else Path(stats)
        source = str(path)
        if stats is None and not path.exists():
            raise DataError(f"{path} is missing: run `alexprep stats {root}` first, or pass stats=")
        stats = DatasetStats.load(path)
    if stats.build_id and index.build_id and stats.build_id != index.build_id:
        raise DataError(f"{source} belongs to build {stats.build_id}, but {index.folder} is build "
                        f"{index.build_id}: run `alexprep stats {root}` again")
    return stats


# ---------------------------------------------------------------------------- batch plans
@dataclass(frozen=True)
class Batch:
    """One batch as decided on the host, before any pixel is touched."""

    epoch: int
    number: int  # position in the epoch
    index: np.ndarray  # (B,) int64 sample indices in the split
    labels: np.ndarray  # (B,) int64
    windows: np.ndarray  # (B, K, 3) int64 rows (offset_x, offset_y, flip), K = 1 or 10
    cmn_mean: np.ndarray  # (B, 3) float32: base - lighting shift, subtracted after the mean image
    draws: augment.Draws | None = None  # training: the draws these came from

    def __len__(self) -> int:
        return len(self.index)


class EpochPlan(Sequence):
    """The batches of one epoch on one rank, made on demand (draws are cheap; a million
    samples' at once would be a needless pause at every epoch start)."""

    def __init__(self, loader: "Loader", epoch: int, order: np.ndarray):
        self.loader, self.epoch, self.order = loader, epoch, order
        self.batch_size = loader.config.batch_size

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(f"batch {k} of {len(self)}")
        k %= len(self)
        return self.loader._make_batch(self.epoch, k, self.order[k * self.batch_size:(k + 1) * self.batch_size])


def endless_batches(loader: "Loader", epoch: int, start: int) -> Iterator[Batch]:
    """Epoch `epoch` from batch `start`, then every following epoch: what the backends feed
    their prefetching pipelines, so that these run on across epoch boundaries (a loader
    that drains at each epoch's end idles its workers there; over a small split that is
    a large share of the time). Feeding ahead is speculative: a backend whose next
    iteration is not the continuation drops what it prepared and restarts."""
    while True:
        plan = loader.plan(epoch)
        for number in range(start, len(plan)):
            yield plan[number]
        epoch, start = epoch + 1, 0


def stream_position(plan: "EpochPlan", start: int) -> tuple[int, int]:
    """(epoch, batch) of the first batch a run from `start` yields; past the end of an epoch
    that is the next epoch's batch 0 (where an endless stream stands after it)."""
    return (plan.epoch, start) if start < len(plan) else (plan.epoch + 1, 0)


# ---------------------------------------------------------------------------- the loader
class Loader:
    """Iterable of (images, labels); see the module docstring. Made by `train_loader` and
    `eval_loader`.

    `len(loader)` is the number of batches per epoch on this rank. Each `iter(loader)`
    runs epoch `loader.epoch` and advances it, so plain nested loops see a new order every
    epoch; `set_epoch(e, start_batch=k)` makes the next iteration epoch e from batch k.
    """

    def __init__(self, root, split: str, config: LoaderConfig, stats=None):
        self._pid = os.getpid()  # the process that owns the backend (see close)
        self.root = Path(root)
        self.split = split
        self.config = config
        self.device = check_device(config.device)
        self.index = read_split(self.root, split)
        self.size = self.index.spec.size
        if config.crop > self.size:
            raise DataError(f"crop {config.crop} is larger than the shards' {self.size}x{self.size} images")
        self.positions = self.size - config.crop + 1  # 33 crop offsets per axis for 224 in 256
        self.stats = resolve_stats(self.root, stats, self.index)
        self.norm = Normalisation.from_stats(self.stats, config.normalize, self.size)
        self.samples = SplitSamples(self.index)
        n = len(self.samples)
        if n == 0:
            raise DataError(f"{self.index.folder} has no samples")
        if config.train:
            per_rank = n // config.world_size
            if per_rank < config.batch_size:
                raise DataError(f"{self.index.folder} has {n} samples, {per_rank} per rank for "
                                f"{config.world_size} rank(s): fewer than one batch of {config.batch_size}")
            self._batches = per_rank // config.batch_size
        else:
            self._eval_index = augment.eval_split(n, config.rank, config.world_size)
            self._batches = -(-len(self._eval_index) // config.batch_size)
            self._eval_windows = (augment.ten_crop_windows(self.positions) if config.crops == 10
                                  else augment.centre_window(self.positions))
        self._epoch = 0
        self._start_batch = 0
        self._orders: dict[int, np.ndarray] = {}
        self._backend = self._make_backend()

    def _make_backend(self):
        if self.config.backend == "dali":
            from alexprep.imagenet_prep.pipeline import DaliBackend

            return DaliBackend(self)
        from alexprep.imagenet_prep.torch_pipeline import TorchBackend

        return TorchBackend(self)

    # -- plans
    def __len__(self) -> int:
        return self._batches

    @property
    def epoch(self) -> int:
        """The epoch the next iteration runs."""
        return self._epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration epoch `epoch`, from batch `start_batch` (an exact resume:
        the batches are those the uninterrupted epoch had from there on)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, not {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in 0..{len(self)}, not {start_batch}")
        self._epoch, self._start_batch = int(epoch), int(start_batch)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The batches of `epoch` (default: the next) on this rank, as host-side decisions:
        sample indices, labels, crop windows, lighting. What the loader then renders."""
        epoch = self._epoch if epoch is None else int(epoch)
        c = self.config
        if not c.train:
            return EpochPlan(self, epoch, self._eval_index)
        if epoch not in self._orders:  # the feed runs an epoch ahead: keep the last two
            order = augment.epoch_order(self.samples.shard_rows, c.seed, epoch, c.order, c.buffer_shards)
            mine = augment.rank_split(order, c.rank, c.world_size)
            self._orders[epoch] = mine[: self._batches * c.batch_size]
            while len(self._orders) > 2:
                del self._orders[next(iter(self._orders))]  # the oldest computed
        return EpochPlan(self, epoch, self._orders[epoch])

    def _make_batch(self, epoch: int, number: int, index: np.ndarray) -> Batch:
        c = self.config
        labels = self.samples.labels[index]
        if not c.train:
            windows = np.repeat(self._eval_windows[None], len(index), axis=0)
            cmn = np.repeat(self.norm.base[None], len(index), axis=0)
            return Batch(epoch, number, index, labels, windows, cmn)
        d = augment.draw(c.seed, epoch, index, c.lighting_std, self.positions)
        shift = augment.lighting_shift(d.alpha, self.norm.eigvals, self.norm.eigvecs)
        cmn = (self.norm.base[None, :] - shift).astype(np.float32)
        windows = np.stack([d.offset_x, d.offset_y, d.flip.astype(np.int64)], axis=1)[:, None, :]
        return Batch(epoch, number, index, labels, windows, cmn, d)

    # -- iteration
    def __iter__(self) -> Iterator:
        plan = self.plan(self._epoch)
        start = self._start_batch
        self._epoch, self._start_batch = self._epoch + 1, 0  # a broken-off epoch still advances
        return self._backend.run(plan, start)

    def close(self) -> None:
        """Stop worker processes and free the pipeline (also done when collected)."""
        backend = getattr(self, "_backend", None)  # None if __init__ failed before making it
        if backend is not None and os.getpid() == self._pid:
            backend.close()

    def __del__(self):
        # Only in the process that made it: a forked child (a DataLoader or build worker)
        # that collects an inherited Loader must not touch DALI's threads, which it lacks.
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------- public factories
def train_loader(root, *, batch_size: int, device: str, seed: int, stats=None, split: str = "train",
                 rank: int = 0, world_size: int = 1, lighting_std: float = 0.1, normalize: str = "mean-image",
                 order: str = "random", dtype="float32", backend: str = "dali", buffer_shards: int = 4,
                 workers: int | None = None, prefetch: int = 2) -> Loader:
    """Training batches `(images, labels)` of build folder `root`: images
    `(batch_size, 3, 224, 224)` of `dtype` on `device`, labels `(batch_size,)` int64.

    stats: None (read `root/stats.npz`), a path, or a DatasetStats. device: "cpu" or
    "cuda:N". backend: "dali" or "torch". rank/world_size: this process's part of each
    epoch (equal, disjoint parts). See the module docstring for what every image is.
    """
    config = LoaderConfig(batch_size=batch_size, device=str(device), backend=backend, train=True, seed=seed,
                          lighting_std=lighting_std, normalize=normalize, order=order, buffer_shards=buffer_shards,
                          rank=rank, world_size=world_size, dtype=dtype_name(dtype), workers=workers,
                          prefetch=prefetch)
    return Loader(root, split, config, stats)


def eval_loader(root, *, batch_size: int, device: str, stats=None, split: str = "val", crops: int = 1,
                rank: int = 0, world_size: int = 1, normalize: str = "mean-image", dtype="float32",
                backend: str = "dali", workers: int | None = None, prefetch: int = 2) -> Loader:
    """Evaluation batches `(images, labels)`: images `(B, 3, 224, 224)` (the centre crop) or
    `(B, 10, 3, 224, 224)` with crops=10, in the order of `augment.ten_crop_windows`
    (top-left, top-right, bottom-left, bottom-right, centre, then each of those mirrored).

    Every image of the split exactly once over all batches and ranks (rank r takes the
    r-th contiguous block); the last batch of a rank may be short, and ranks' batch counts
    may differ by one.
    """
    config = LoaderConfig(batch_size=batch_size, device=str(device), backend=backend, train=False,
                          normalize=normalize, crops=crops, rank=rank, world_size=world_size,
                          dtype=dtype_name(dtype), workers=workers, prefetch=prefetch)
    return Loader(root, split, config, stats)
