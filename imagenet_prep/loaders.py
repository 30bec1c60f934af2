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

What the images are, what training drops, and how the two backends (dali_backend.py,
torch_backend.py) stay identical: docs/design.md, "Loaders". In short: 0-255 RGB, NCHW,
minus the mean image's window and plus PCA lighting in training (or channel mean and std
with `normalize="channel"`); every draw is made on the host (augment.py), keyed by (seed,
epoch, sample index), so backends, ranks, batch sizes and resume points agree.

`recipe="rrc"` is torchvision's and timm's RandomResizedCrop recipe on a `--resize
keep-aspect` build (rrc.py; docs/design.md, "Loaders"):

    train = train_loader("OUT", batch_size=256, device="cuda:0", seed=0, recipe="rrc")
    val = eval_loader("OUT", batch_size=256, device="cuda:0", recipe="rrc")  # resize 256, centre 224
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from alexprep.imagenet_prep import augment, rrc, shard_cache
from alexprep.imagenet_prep import remote as rm
from alexprep.imagenet_prep.batches import BackendInput, Batch, EpochPlan
from alexprep.imagenet_prep.dali_backend import DaliBackend
from alexprep.imagenet_prep.devices import (
    check_device, dtype_name, evaluation_workers, local_world_size, parse_device, training_workers, DTYPES,
)
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.normalization import NORMALIZE, Normalization, resolve_stats
from alexprep.imagenet_prep.samples import SplitSamples
from alexprep.imagenet_prep.shard_cache import EvictingCache, ShardCache, first_use_order
from alexprep.imagenet_prep.shards import SplitIndex, local_folder, read_split
from alexprep.imagenet_prep.torch_backend import DECODERS, TorchBackend

BACKENDS = ("dali", "torch")
ORDERS = ("random", "quasi")
RECIPES = ("paper", "rrc")  # the paper's 224 crops of 256x256 images; RandomResizedCrop
# What each recipe normalises with and its lighting sigma when not given: the paper's mean
# image and PCA lighting; for "rrc" the channel mean and std and no lighting, as
# torchvision's and timm's ImageNet recipes (lighting_std=0.1 turns it on).
RECIPE_DEFAULTS = {"paper": ("mean-image", 0.1), "rrc": ("channel", 0.0)}
MAX_FAILURES_LISTED = 100  # decode failures kept with their shard and row (all are counted)


def pick_backend(backend: str, decoder: str = "auto") -> str:
    """"dali" or "torch" for "auto": DALI where it imports, unless a decoder is named (a
    torch-backend choice, which DALI would otherwise ignore in silence). The one place "auto"
    is resolved (LoaderConfig calls it: the loaders take "auto", and so do TrainConfig,
    evaluation and the feature extraction, which pass it on)."""
    if backend == "dali" and decoder != "auto":
        raise DataError(f"decoder={decoder!r} chooses the torch backend's decoding; DALI decodes its own way: "
                        f"drop the decoder or use backend='torch'")
    if backend != "auto":
        return backend
    if decoder != "auto":
        return "torch"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "torch"
    return "dali"


def open_split(root, split: str, cache_dir=None, cache_limit: int | None = None,
               in_use=None) -> tuple[SplitIndex, ShardCache | None]:
    """A split of build folder `root`: a local one read in place (cache None), or a remote
    one (a URI) through a verified cache in `cache_dir` (shard_cache.open_split, which
    `in_use` and `cache_limit` are for)."""
    folder = local_folder(root, cache_dir)
    if folder is None:
        return shard_cache.open_split(root, split, cache_dir, cache_limit, in_use)
    index = read_split(folder, split)
    if cache_limit is not None:  # a flag with no effect would mislead: say so
        raise DataError(f"a cache limit applies to a remote build read through a cache directory; "
                        f"{rm.display(root) if rm.is_uri(root) else root} is read in place: drop the limit "
                        f"(--cache-limit, cache_limit=)")
    return index, None


def split_index(root, split: str, cache_dir=None) -> SplitIndex:
    """A split's index alone (a remote one's manifests mirrored into `cache_dir`), for a look
    at its classes or build id: no space check, nothing downloaded."""
    folder = local_folder(root, cache_dir)
    return read_split(folder, split) if folder is not None else shard_cache.split_index(root, split, cache_dir)


@dataclass(frozen=True)
class LoaderConfig:
    """Everything a loader does; built by `train_loader` / `eval_loader` (or the trainer's
    config), checked here so that a bad value fails before any shard is opened."""

    batch_size: int  # per rank
    device: str = "cpu"  # "cpu" or "cuda:N"
    backend: str = "auto"  # "dali", "torch", or "auto": DALI where it imports, else torch (pick_backend)
    train: bool = True  # random crops, flips and lighting; else fixed crops
    seed: int = 0  # with (epoch, sample index), fixes every draw and the order
    lighting_std: float | None = None  # sigma of PCA lighting alphas; 0 disables; None: the recipe's
    normalize: str | None = None  # "mean-image" (the paper's) or "channel"; None: the recipe's
    order: str = "random"  # "quasi" for datasets larger than RAM (see augment.epoch_order)
    buffer_shards: int = 4  # "quasi": shards shuffled together (~110 MB of q95 JPEGs)
    crops: int = 1  # eval: 1 (centre) or 10 (corners, centre and mirrors)
    rank: int = 0
    world_size: int = 1
    dtype: str = "float32"  # of the images; "bfloat16"/"float16" for GPU training
    crop: int = augment.CROP  # 224: the paper's input (the images are the shards' size)
    workers: int | None = None  # DALI threads / DataLoader processes; None: sized by devices (`threads`)
    prefetch: int = 2  # batches prepared ahead (DALI's prefetch_queue_depth)
    decoder: str = "auto"  # torch backend: "pil" (workers), "torchvision" (batched, nvJPEG on CUDA),
    # "nvimgcodec" (batched, the GPU's hardware JPEG decoders; gpu_decoders.py)
    recipe: str = "paper"  # or "rrc": RandomResizedCrop of keep-aspect images to crop x crop
    scale: tuple = rrc.SCALE  # rrc: the window's area fraction range
    ratio: tuple = rrc.RATIO  # rrc: the window's width / height range
    resize: int | None = None  # rrc evaluation: the shorter side before the centre crop; None: crop / 0.875
    cache_dir: str | None = None  # a remote build's node-local shard cache (shard_cache.py)
    cache_limit: int | None = None  # bytes the split may take in it: more is refused before downloading,
    # unless the loader reads a few shards at a time (order="quasi", evaluation): then only those are kept

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise DataError(f"recipe must be one of {RECIPES}, not {self.recipe!r}")
        normalize, lighting_std = RECIPE_DEFAULTS[self.recipe]
        scale, ratio = rrc.check_params(self.scale, self.ratio)
        resolved = dict(scale=scale, ratio=ratio, backend=pick_backend(self.backend, self.decoder),
                        resize=rrc.default_resize(self.crop) if self.resize is None else self.resize,
                        normalize=normalize if self.normalize is None else self.normalize,
                        lighting_std=lighting_std if self.lighting_std is None else self.lighting_std)
        for name, value in resolved.items():
            object.__setattr__(self, name, value)  # frozen: resolved once, here
        self._check()

    def _check(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, not {self.batch_size!r}")
        if self.backend not in BACKENDS:
            raise DataError(f"backend must be auto, dali or torch, not {self.backend!r}")
        parse_device(self.device)  # the syntax only; availability is checked on use
        checks = [
            (self.normalize in NORMALIZE, f"normalize must be one of {NORMALIZE}, not {self.normalize!r}"),
            (self.order in ORDERS, f"order must be one of {ORDERS}, not {self.order!r}"),
            (self.buffer_shards >= 1, f"buffer_shards must be at least 1, not {self.buffer_shards}"),
            (self.crops in (1, 10),
             f"crops must be 1 (centre) or 10 (corners, centre and their mirrors), not {self.crops}"),
            (not (self.train and self.crops != 1),
             "crops=10 is for evaluation; training takes one random crop per image"),
            (0 <= self.rank < self.world_size,
             f"rank {self.rank} of world_size {self.world_size}: expected 0 <= rank < world_size"),
            (0 <= self.seed < 2**64, f"seed must be an integer in [0, 2**64), not {self.seed}"),
            (self.lighting_std >= 0, f"lighting_std must be >= 0 (0 disables lighting), not {self.lighting_std}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, not {self.dtype!r}"),
            (self.crop >= 1, f"crop must be positive, not {self.crop}"),
            (self.workers is None or self.workers >= 0, f"workers must be >= 0, not {self.workers}"),
            (self.prefetch >= 1, f"prefetch must be at least 1, not {self.prefetch}"),
            (self.decoder in DECODERS, f"decoder must be one of {DECODERS}, not {self.decoder!r}"),
            (self.recipe == "paper" or self.normalize == "channel",
             "recipe='rrc' resizes each window, which has no counterpart in a mean image: use normalize='channel'"),
            (self.recipe == "paper" or self.crops == 1,
             "crops=10 is the paper's evaluation; recipe='rrc' evaluates the centre crop (crops=1)"),
            (self.resize >= self.crop, f"resize ({self.resize}, the shorter side before the centre crop) must be "
                                       f"at least the output size {self.crop}"),
            (self.cache_limit is None or self.cache_limit > 0, f"cache_limit must be > 0 bytes, not {self.cache_limit}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(message)

    @property
    def threads(self) -> int:
        """DALI threads or DataLoader workers: this rank's CPUs less two in training; in
        evaluation as many where the torch backend ends its workers after each pass, else
        what training leaves (devices.evaluation_workers)."""
        if self.workers is not None:
            return self.workers
        return training_workers() if self.train else evaluation_workers(self.backend == "torch")

    @property
    def batches_in_flight(self) -> int:
        """Batches a backend makes (their shards fetched) ahead of the one it hands out: the
        DataLoader's workers times their prefetch (torch), the pipeline's queue and the batch
        being fed (DALI)."""
        if self.backend == "torch":
            return self.threads * self.prefetch if self.threads else 1
        return self.prefetch + 1

    def shards_in_use(self, shard_rows) -> tuple[int, int] | None:
        """(shards, ahead) for a size-limited cache (shard_cache.EvictingCache): the most shards
        of a split with `shard_rows` that this loader, and the ranks of its node, hold at once,
        and how many of them it fetches ahead of its batches (one window, and at least one per
        download thread). None in random order: any batch may need any shard."""
        if self.train and self.order != "quasi":
            return None
        # The batches in flight, one more being handed out, and a rank one step ahead.
        samples = (self.batches_in_flight + 2) * self.batch_size
        if self.train:  # the ranks read the same windows: rank r takes every W-th sample of them
            ahead = max(self.buffer_shards, shard_cache.PREFETCH_WORKERS)
            return augment.quasi_span(shard_rows, self.buffer_shards, samples * self.world_size) + ahead, ahead
        ahead = shard_cache.PREFETCH_WORKERS  # evaluation: each rank of the node reads its own block
        return min(local_world_size(), self.world_size) * (augment.sequential_span(shard_rows, samples) + ahead), ahead


class Loader:
    """Iterable of (images, labels); see the module docstring. Made by `train_loader` and
    `eval_loader`.

    `len(loader)` is the number of batches per epoch on this rank. Each `iter(loader)`
    runs epoch `loader.epoch` and advances it, so plain nested loops see a new order every
    epoch; `set_epoch(e, start_batch=k)` makes the next iteration epoch e from batch k.
    `with eval_loader(...) as val:` closes it (its workers, pipeline and shard maps) on exit.
    """

    def __init__(self, root, split: str, config: LoaderConfig, stats=None):
        self._pid = os.getpid()  # the process that owns the backend (see close)
        self.split = split
        self.config = config
        self.device = check_device(config.device)
        # A remote build (a URI) is read through its cache: root is then its local mirror.
        self.index, self._cache = open_split(root, split, config.cache_dir, config.cache_limit,
                                             lambda index: config.shards_in_use([s.rows for s in index.shards]))
        self._evicting = isinstance(self._cache, EvictingCache)
        self.root = self.index.root
        self.size = self.index.spec.size
        self._check_recipe()
        # The paper's crop offsets per axis: 33 for 224 in 256 (rrc draws whole windows)
        self.positions = self.size - config.crop + 1 if config.recipe == "paper" else 0
        self.stats = resolve_stats(self.root, stats, self.index)
        self.norm = Normalization.from_stats(self.stats, config.normalize, self.size)
        self.samples = SplitSamples(self.index, self._cache.fetch if self._cache else None, transient=self._evicting)
        if self._evicting:
            self._cache.maps = self.samples  # the cache unmaps a shard here before it lets go of it
            self._last_uses: dict[int, np.ndarray] = {}
        self.decode_failures: list[str] = []  # "shard row: reason", the first MAX_FAILURES_LISTED
        self.decode_failure_count = 0
        n = len(self.samples)
        if n == 0:
            raise DataError(f"{self.index.folder} has no samples")
        self.eval_windows = None
        if config.train:
            per_rank = n // config.world_size
            if per_rank < config.batch_size:
                raise DataError(f"{self.index.folder} has {n} samples, {per_rank} per rank for "
                                f"{config.world_size} rank(s): fewer than one batch of {config.batch_size}")
            self._batches = per_rank // config.batch_size
        else:
            self._eval_index = augment.eval_split(n, config.rank, config.world_size)
            self._batches = -(-len(self._eval_index) // config.batch_size)
            if config.recipe == "paper":
                self.eval_windows = augment.eval_windows(config.crops, self.positions)
        self._epoch = 0
        self._start_batch = 0
        self._orders: dict[int, np.ndarray] = {}
        source = BackendInput(self.samples, self.index.spec, self.norm, config, self.device, self.positions,
                              self.eval_windows, self.plan, self.report_decode_failures)
        self._backend = DaliBackend(source) if config.backend == "dali" else TorchBackend(source)
        if self._cache is not None:  # a remote build: start downloading what the first epoch needs
            self._cache.prefetch(first_use_order(self.index, self.plan().order, rest=not self._evicting), self._epoch)

    @property
    def cache(self):
        """A remote build's shard cache (shard_cache.ShardCache), or None for a local one."""
        return self._cache

    def _check_recipe(self) -> None:
        """The paper's recipe needs centre-crop shards; rrc is meant for keep-aspect ones and
        says so on centre-crop ones, whose windows then come from the centre squares."""
        c, spec, folder = self.config, self.index.spec, self.index.folder
        if c.recipe == "paper" and spec.keep_aspect:
            raise DataError(f"{folder} holds --resize keep-aspect images of varying sizes; the paper's recipe "
                            f"(alexprep train and evaluate, and the loaders' default) takes {spec.size}x{spec.size} "
                            "centre-crop builds (build-shards without --resize). Keep-aspect builds feed other "
                            "models through train_loader(..., recipe='rrc') (docs/loaders.md, 'The RandomResizedCrop recipe')")
        if c.recipe == "paper" and c.crop > self.size:
            raise DataError(f"crop {c.crop} is larger than the shards' {self.size}x{self.size} images")
        if c.recipe == "rrc" and not spec.keep_aspect:
            warnings.warn(f"recipe='rrc' on {folder}, a centre-crop build: windows are drawn from its "
                          f"{spec.size}x{spec.size} centre squares, not the whole images torchvision's recipe "
                          f"sees (build with --resize keep-aspect for that)", UserWarning, stacklevel=4)

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
        sample indices, labels, crop windows, lighting. What the backend then renders."""
        epoch = self._epoch if epoch is None else int(epoch)
        c = self.config
        if not c.train:
            return EpochPlan(self._make_batch, epoch, self._eval_index, c.batch_size)
        if epoch not in self._orders:  # the feed runs an epoch ahead: keep the last two
            order = augment.epoch_order(self.samples.shard_rows, c.seed, epoch, c.order, c.buffer_shards)
            mine = augment.rank_split(order, c.rank, c.world_size)
            self._orders[epoch] = mine[: self._batches * c.batch_size]
            while len(self._orders) > 2:
                del self._orders[next(iter(self._orders))]  # the oldest computed
        return EpochPlan(self._make_batch, epoch, self._orders[epoch], c.batch_size)

    def _make_batch(self, epoch: int, number: int, index: np.ndarray) -> Batch:
        c = self.config
        labels = self.samples.labels_of(index)  # a remote build's shards are fetched here
        if self._evicting:
            self._hold(epoch, index)
        if c.recipe == "rrc":
            return self._make_rrc_batch(epoch, number, index, labels)
        if not c.train:
            windows = np.repeat(self.eval_windows[None], len(index), axis=0)
            cmn = np.repeat(self.norm.base[None], len(index), axis=0)
            return Batch(epoch, number, index, labels, windows, cmn)
        d = augment.draw(c.seed, epoch, index, c.lighting_std, self.positions)
        shift = augment.lighting_shift(d.alpha, self.norm.eigvals, self.norm.eigvecs)
        cmn = (self.norm.base[None, :] - shift).astype(np.float32)
        windows = np.stack([d.offset_x, d.offset_y, d.flip.astype(np.int64)], axis=1)[:, None, :]
        return Batch(epoch, number, index, labels, windows, cmn, d)

    def _make_rrc_batch(self, epoch: int, number: int, index: np.ndarray, labels: np.ndarray) -> Batch:
        """Windows (B, 1, 5) rows (x, y, w, h, flip) from each image's stored size: drawn
        (training) or the centre window (evaluation); see rrc.py."""
        c, heights, widths = self.config, self.samples.heights[index], self.samples.widths[index]
        if not c.train:
            windows = rrc.center_windows(heights, widths, c.crop, c.resize)
            cmn = np.repeat(self.norm.base[None], len(index), axis=0)
            return Batch(epoch, number, index, labels, windows[:, None], cmn)
        d = rrc.draw_rrc(c.seed, epoch, index, heights, widths, c.scale, c.ratio, c.lighting_std)
        shift = augment.lighting_shift(d.alpha, self.norm.eigvals, self.norm.eigvecs)
        cmn = (self.norm.base[None, :] - shift).astype(np.float32)
        return Batch(epoch, number, index, labels, d.windows[:, None], cmn, d)

    # -- a size-limited cache (shard_cache.EvictingCache)
    def _hold(self, epoch: int, index: np.ndarray) -> None:
        """Keep the shards of a batch being made until their last batch of `epoch` is out."""
        last = self._last_use(epoch)
        shards = np.unique(self.samples.shard_of(index))
        self._cache.hold(shards.tolist(), [(epoch, int(b)) for b in last[shards]])

    def _last_use(self, epoch: int) -> np.ndarray:
        """Each shard's last batch in `epoch` on this rank (-1: none): when the cache may let it go."""
        key = epoch if self.config.train else -1  # evaluation reads the same batches every time
        if key not in self._last_uses:
            plan = self.plan(epoch)
            reversed_shards = self.samples.shard_of(plan.order)[::-1]
            shards, from_end = np.unique(reversed_shards, return_index=True)
            last = np.full(len(self.index.shards), -1, np.int64)
            last[shards] = (len(plan.order) - 1 - from_end) // plan.batch_size
            self._last_uses[key] = last
            while len(self._last_uses) > 3:  # the feed runs an epoch ahead of what is handed out
                del self._last_uses[next(iter(self._last_uses))]
        return self._last_uses[key]

    def _releasing(self, batches: Iterator, epoch: int, start: int) -> Iterator:
        """`batches`, letting go of each shard once its last batch is out. An evaluation pass
        then drops what was fed ahead and lets go of everything: nothing stays held between
        passes (another loader of the split may need the room)."""
        for number, item in enumerate(batches, start):
            self._cache.release_through((epoch, number))
            yield item
        if not self.config.train:
            self._backend.stop()
            self._cache.release_held()

    def report_decode_failures(self, failures: list[str]) -> None:
        """Called by the backend for images that did not decode (fed as grey instead)."""
        self.decode_failure_count += len(failures)
        room = MAX_FAILURES_LISTED - len(self.decode_failures)
        self.decode_failures.extend(failures[:max(0, room)])

    # -- iteration
    def __iter__(self) -> Iterator:
        plan = self.plan(self._epoch)
        start = self._start_batch
        if self._evicting and not self._backend.continues(plan, start):
            self._backend.stop()  # what was fed ahead is dropped: so are the shards held for it
            self._cache.release_held()
        if self._cache is not None:  # the shards of a remote build, in the order this run needs them
            self._cache.prefetch(first_use_order(self.index, plan.order[start * plan.batch_size:],
                                                 rest=not self._evicting), plan.epoch)
        self._epoch, self._start_batch = self._epoch + 1, 0  # a broken-off epoch still advances
        batches = self._backend.run(plan, start)
        if not self.config.train:
            batches = self._resting(batches)
        return self._releasing(batches, plan.epoch, start) if self._evicting else batches

    def _resting(self, batches):
        """An evaluation pass, after which the backend stops working ahead: evaluation's
        workers hold no cores between passes, which training's need (docs/design.md, "Loaders")."""
        yield from batches
        self._backend.rest()

    def close(self) -> None:
        """Stop worker processes and free the pipeline (also done when collected)."""
        backend = getattr(self, "_backend", None)  # None if __init__ failed before making it
        if backend is not None and os.getpid() == self._pid:
            backend.close()
        cache = getattr(self, "_cache", None)
        if cache is not None and os.getpid() == self._pid:
            cache.close()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # Only in the process that made it: a forked child (a DataLoader or build worker)
        # that collects an inherited Loader must not touch DALI's threads, which it lacks.
        try:
            self.close()
        except Exception:
            pass


def train_loader(root, *, batch_size: int, device: str, seed: int, stats=None, split: str = "train",
                 rank: int = 0, world_size: int = 1, lighting_std: float | None = None, normalize: str | None = None,
                 order: str = "random", dtype="float32", backend: str = "auto", buffer_shards: int = 4,
                 workers: int | None = None, prefetch: int = 2, decoder: str = "auto",
                 recipe: str = "paper", size: int = augment.CROP, scale=rrc.SCALE, ratio=rrc.RATIO,
                 cache_dir=None, cache_limit: int | None = None) -> Loader:
    """Training batches `(images, labels)` of build folder `root`: images
    `(batch_size, 3, size, size)` of `dtype` on `device`, labels `(batch_size,)` int64.

    stats: None (read `root/stats.npz`), a path, or a DatasetStats. device: "cpu" or
    "cuda:N". backend: "dali", "torch" or "auto" (DALI where it imports, else torch). rank/world_size: this process's part of each
    epoch (equal, disjoint parts). See the module docstring for what every image is.
    recipe: "paper" (224 crops of 256x256 centre-crop builds, mean image, lighting 0.1) or
    "rrc" (RandomResizedCrop(size, scale, ratio) of keep-aspect builds, channel mean and
    std, no lighting unless lighting_std is given). normalize and lighting_std default to
    the recipe's.
    root may be a URI (s3://, gs://, hdfs://, file://): its shards are then downloaded into
    `cache_dir`, verified, as training needs them (docs/design.md, "Remote build folders").
    cache_limit: the most bytes the split may take there; with order="quasi" a larger split
    is read keeping only the shards in use (each epoch then downloads it all again).
    """
    config = LoaderConfig(batch_size=batch_size, device=str(device), backend=backend, train=True, seed=seed,
                          lighting_std=lighting_std, normalize=normalize, order=order, buffer_shards=buffer_shards,
                          rank=rank, world_size=world_size, dtype=dtype_name(dtype), workers=workers,
                          prefetch=prefetch, decoder=decoder, recipe=recipe, crop=size, scale=scale, ratio=ratio,
                          cache_dir=_str(cache_dir), cache_limit=cache_limit)
    return Loader(root, split, config, stats)


def eval_loader(root, *, batch_size: int, device: str, stats=None, split: str = "val", crops: int = 1,
                rank: int = 0, world_size: int = 1, normalize: str | None = None, dtype="float32",
                backend: str = "auto", workers: int | None = None, prefetch: int = 2,
                decoder: str = "auto", recipe: str = "paper", size: int = augment.CROP, resize: int | None = None,
                cache_dir=None, cache_limit: int | None = None) -> Loader:
    """Evaluation batches `(images, labels)`: images `(B, 3, 224, 224)` (the centre crop) or
    `(B, 10, 3, 224, 224)` with crops=10, in the order of `augment.ten_crop_windows`
    (top-left, top-right, bottom-left, bottom-right, centre, then each of those mirrored).

    Every image of the split exactly once over all batches and ranks (rank r takes the
    r-th contiguous block); the last batch of a rank may be short, and ranks' batch counts
    may differ by one.

    recipe="rrc": the central window torchvision's Resize(resize) + CenterCrop(size) keeps
    (resize default: size / 0.875, 256 for 224), resized to size x size (rrc.center_windows).
    """
    config = LoaderConfig(batch_size=batch_size, device=str(device), backend=backend, train=False,
                          normalize=normalize, crops=crops, rank=rank, world_size=world_size,
                          dtype=dtype_name(dtype), workers=workers, prefetch=prefetch, decoder=decoder,
                          recipe=recipe, crop=size, resize=resize, cache_dir=_str(cache_dir), cache_limit=cache_limit)
    return Loader(root, split, config, stats)


def _str(path) -> str | None:
    return None if path is None else str(path)
