"""Any training batch again, computed directly from the run's plan (run_plan.RunPlan), with no
iteration to it: its samples (key, label, class), their draws, and the exact tensors the
loader handed the model (docs/design.md, "Replay, fingerprints, parity").

    fed = replay_batch(OUT, plan, epoch=3, number=17)                 # the global batch
    tensors = batch_tensors(OUT, 3, 17, batch_size=64, rank=1, world_size=2, seed=0)
    save_grid("grid.png", tensors, fed.keys)
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from alexprep.imagenet_prep.atomic import write_bytes_atomic
from alexprep.imagenet_prep.augment import Draws
from alexprep.imagenet_prep.batches import Batch
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.loaders import train_loader
from alexprep.imagenet_prep.normalization import Normalization
from alexprep.imagenet_prep.run_plan import RunPlan
from alexprep.imagenet_prep.shards import SplitIndex, open_shard


@dataclass(frozen=True)
class ReplayedBatch:
    """One batch as the plan decides it: row i is the i-th image the model received."""

    epoch: int
    number: int
    rank: int | None  # None: the global batch, all ranks together
    world_size: int
    index: np.ndarray  # (B,) sample indices in the split
    labels: np.ndarray  # (B,) int64
    keys: list[str]  # each image's source path below its split folder
    wnids: list[str]
    names: list[str]  # class names ("" where the build has none)
    draws: object  # augment.Draws or rrc.RrcDraws, row i for index[i]

    def to_json(self) -> dict:
        rows = []
        for i, sample in enumerate(self.index.tolist()):
            row = {"sample": sample, "key": self.keys[i], "label": int(self.labels[i]), "wnid": self.wnids[i],
                   "class": self.names[i], "flip": bool(self.draws.flip[i]),
                   "lighting_alpha": [float(a) for a in self.draws.alpha[i]]}
            if isinstance(self.draws, Draws):
                row["crop_offset"] = [int(self.draws.offset_x[i]), int(self.draws.offset_y[i])]
            else:
                row["window"] = dict(zip("xywh", (int(v) for v in self.draws.windows[i, :4])))
            rows.append(row)
        return {"epoch": self.epoch, "batch": self.number, "rank": self.rank, "world_size": self.world_size,
                "samples": rows}


def replay_batch(index: SplitIndex, plan: RunPlan, epoch: int, number: int, rank: int | None = None,
                 world_size: int = 1) -> ReplayedBatch:
    """Batch `number` of `epoch` (rank `rank` of `world_size`, or all ranks): its samples
    from the plan, their keys and labels from the shards that hold them (only those)."""
    sample_index = plan.batch_index(epoch, number, rank, world_size)
    draws = plan.draws(epoch, sample_index)
    keys, labels = sample_rows(index, plan, sample_index)
    classes = index.classes
    names = list(classes.names) if classes.names else [""] * len(classes.wnids)
    return ReplayedBatch(epoch, number, rank, world_size, sample_index, labels, keys,
                         [classes.wnids[k] for k in labels.tolist()], [names[k] or "" for k in labels.tolist()],
                         draws)


def sample_rows(index: SplitIndex, plan: RunPlan, samples: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The keys and labels of `samples`, reading the key and label columns of their shards."""
    ends = np.cumsum(plan.shard_rows)
    shard_of = np.searchsorted(ends, samples, side="right")
    rows = samples - (ends - plan.shard_rows)[shard_of]
    keys: list[str] = [""] * len(samples)
    labels = np.empty(len(samples), np.int64)
    for k in np.unique(shard_of).tolist():
        mine = np.flatnonzero(shard_of == k)
        table = open_shard(index, index.shards[k]).select(["key", "label"]).take(rows[mine])
        for i, key in zip(mine.tolist(), table.column("key").to_pylist()):
            keys[i] = key
        labels[mine] = table.column("label").to_numpy()
    return keys, labels


@dataclass
class FedTensors:
    """What a training loader handed the model for one batch, and how it made it."""

    images: torch.Tensor  # (B, 3, c, c) float32, as the model received them
    labels: torch.Tensor  # (B,) int64
    batch: Batch  # the loader's plan of it: sample indices, windows, lighting
    norm: Normalization  # what was subtracted and divided, to undo it for a picture


def batch_tensors(root, epoch: int, number: int, *, batch_size: int, rank: int = 0, world_size: int = 1,
                  **loader_options) -> FedTensors:
    """Batch `number` of `epoch` from a training loader made as the run made it (batch_size
    per rank; loader_options as train_loader's: seed, lighting_std, order, normalize,
    backend, ...), started at that batch (`set_epoch`): the loader's own code renders
    exactly that batch, on the CPU, in this process."""
    options = dict(device="cpu", workers=0, prefetch=1) | loader_options
    with train_loader(root, batch_size=batch_size, rank=rank, world_size=world_size, **options) as loader:
        if not 0 <= number < len(loader):
            raise DataError(f"batch {number} does not exist: an epoch has batches 0..{len(loader) - 1} on each rank")
        loader.set_epoch(epoch, start_batch=number)
        batch = loader.plan(epoch)[number]
        images, labels = next(iter(loader))
        return FedTensors(images.clone(), labels.clone(), batch, loader.norm)


def denormalised(fed: FedTensors) -> np.ndarray:
    """(B, c, c, 3) uint8: the tensors with the normalisation undone (the mean image's window,
    mirrored with the image, and the base less the lighting shift added back, times std):
    the pixels the model saw, lighting included."""
    x = fed.images.float().numpy().transpose(0, 2, 3, 1) * fed.norm.std  # (B, c, c, 3)
    x = x + fed.batch.cmn_mean[:, None, None, :]
    c = x.shape[1]
    if fed.norm.mean_image is not None:
        for b, (ox, oy, flip) in enumerate(fed.batch.windows[:, 0, :3].tolist()):
            window = fed.norm.mean_image[oy:oy + c, ox:ox + c]
            x[b] += window[:, ::-1] if flip else window
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def save_grid(path, fed: FedTensors, captions: list[str]) -> Path:
    """A PNG of the batch's images, denormalised, each captioned (its key), written atomically."""
    tiles = denormalised(fed)
    n, c = len(tiles), tiles.shape[1]
    cols = math.ceil(math.sqrt(n))
    band = 14  # a caption line of PIL's default bitmap font
    grid = Image.new("RGB", (cols * c, math.ceil(n / cols) * (c + band)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        x, y = (i % cols) * c, (i // cols) * (c + band)
        grid.paste(Image.fromarray(tile), (x, y))
        draw.text((x + 2, y + c + 1), caption[-(c // 6):], fill="black")  # the key's end: its file name
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    path = Path(path)
    write_bytes_atomic(path, buffer.getvalue())
    return path
