"""Classifying images with a trained checkpoint, the way evaluation does.

    from alexprep.model.predict import Predictor
    predictor = Predictor.from_checkpoint("runs/alexnet")          # a file or a run dir
    for p in predictor.classify_files(["cat.jpg", "broken.jpg"], crops=10):
        print(p.path, p.error or [(s.wnid, s.name, s.probability) for s in p.top])

An image file goes through what build-shards and the evaluation loaders do to a
validation image: the shorter side rescaled to 256 and the central 256x256 cut
(`transform.load_center_crop`), then the centre 224x224 crop, or the paper's 10 crops
(4 corners, centre and their mirrors, softmax outputs averaged), minus the same window of
the training set's mean image. The tensors come from the torch loader's own per-image
renderer (`render.render_one`), so they are bit-identical to what the loaders
feed evaluation from raw shards.

Everything comes from the checkpoint (mean image, class list, normalisation), so no build
folder is needed. One difference from evaluating shards: a file is not JPEG-encoded at
quality 95 and decoded again on the way, as a shard image is.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from alexprep.imagenet_prep import augment
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.normalization import Normalization
from alexprep.imagenet_prep.render import cpu_norm_arrays, render_one
from alexprep.imagenet_prep.samples import SplitSamples
from alexprep.imagenet_prep.shards import SplitIndex
from alexprep.imagenet_prep.stats import DatasetStats
from alexprep.imagenet_prep.transform import ImageSpec, UnreadableImage, decode, load_center_crop
from alexprep.model.checkpoint import (
    classes_from_checkpoint, load_checkpoint, normalize_of, stats_from_checkpoint,
)
from alexprep.model.distributed import resolve_devices
from alexprep.model.inference import model_from_checkpoint


@dataclass(frozen=True)
class ClassScore:
    """One class of a prediction."""

    index: int  # the class index (position of the wnid in sorted order)
    wnid: str
    name: str  # '' where the build knew no name
    probability: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Prediction:
    """The top classes of one file, or why it could not be classified."""

    path: str
    top: tuple[ClassScore, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "top": [s.to_json() for s in self.top]}


# ---------------------------------------------------------------------------- the tensors
def crop_windows(crops: int, size: int = augment.SIZE, crop: int = augment.CROP) -> np.ndarray:
    """(K, 3) rows (offset_x, offset_y, flip): augment.eval_windows, a DataError for a bad
    `crops`."""
    try:
        return augment.eval_windows(crops, size - crop + 1)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def normalized_crops(images: np.ndarray, norm: Normalization, crops: int = 1,
                     crop: int = augment.CROP) -> torch.Tensor:
    """(N, S, S, 3) uint8 images -> (N, K, 3, crop, crop) float32 network inputs.

    The evaluation loaders' arithmetic: each window minus the same (mirrored) window of the
    mean image, minus the channel base, times 1/std (the last two are 0 and 1 for the
    paper's mean-image normalisation).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, S, S, 3) uint8, not {images.shape} {images.dtype}")
    windows = crop_windows(crops, images.shape[1], crop)
    mean_chw, inv_std = cpu_norm_arrays(norm)  # as the torch loader's workers hold them
    base = np.asarray(norm.base, np.float32)
    out = np.empty((len(images), len(windows), 3, crop, crop), np.float32)
    for i, image in enumerate(images):
        render_one(out[i], image, windows, base, mean_chw, inv_std)
    return torch.from_numpy(out)


def center_crops(images: np.ndarray, crop: int = augment.CROP) -> np.ndarray:
    """(N, S, S, 3) uint8 -> their centre (N, crop, crop, 3) windows: what the network sees."""
    ox, oy, _ = crop_windows(1, images.shape[1], crop)[0]
    return images[:, oy:oy + crop, ox:ox + crop]


def split_images(index: SplitIndex, rows: Sequence[int], samples: SplitSamples | None = None) -> np.ndarray:
    """Samples `rows` of a split, decoded: (len(rows), S, S, 3) uint8."""
    samples = samples or SplitSamples(index)
    size = index.spec.size
    out = np.empty((len(rows), size, size, 3), np.uint8)
    for i, row in enumerate(rows):
        out[i] = decode(samples.view(int(row)), index.spec)
    return out


def eval_stats(ckpt: dict, index: SplitIndex) -> DatasetStats:
    """The checkpoint's training statistics, accepted by loaders of `index`'s build (the
    class lists must agree, checked by the caller where labels matter)."""
    return dataclasses.replace(stats_from_checkpoint(ckpt), build_id=index.build_id)


def class_label(wnid: str, name: str, short: bool = True) -> str:
    """'n01440764 tench' (the first of the names when short), or the wnid alone."""
    if short:
        name = name.split(",")[0].strip()
    return f"{wnid} {name}" if name else wnid


# ---------------------------------------------------------------------------- the predictor
class Predictor:
    """A checkpoint's network with its mean image and class list, ready to classify."""

    def __init__(self, ckpt: dict, device: str = "cpu"):
        devices = resolve_devices((device,))
        self.model = model_from_checkpoint(ckpt, devices)
        self.stats = stats_from_checkpoint(ckpt)
        self.classes = classes_from_checkpoint(ckpt)
        self.size = int(self.stats.mean_image.shape[0])  # the shards' 256
        # Files are prepared as the training build prepared its images (its resize filter).
        self.spec = ImageSpec(**ckpt["image"]) if "image" in ckpt else ImageSpec(size=self.size)
        self.norm = Normalization.from_stats(self.stats, normalize_of(ckpt), self.size)

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu") -> "Predictor":
        """From a checkpoint file, or a run dir (its newest checkpoint)."""
        return cls(load_checkpoint(Path(path)), device)

    @torch.no_grad()
    def probabilities(self, images: np.ndarray, crops: int = 1) -> torch.Tensor:
        """Softmax outputs (N, classes) on the CPU for (N, S, S, 3) uint8 images, averaged over
        the crops as the paper's 10-crop evaluation does."""
        x = normalized_crops(images, self.norm, crops)  # (N, K, 3, 224, 224)
        n, k = x.shape[:2]
        logits = self.model(x.reshape(n * k, *x.shape[2:]).to(self.model.input_device))
        return logits.float().softmax(dim=1).reshape(n, k, -1).mean(dim=1).cpu()

    def top(self, probabilities: torch.Tensor, k: int = 5) -> tuple[ClassScore, ...]:
        """The k most probable classes of one row of `probabilities`, most probable first."""
        values, indices = probabilities.topk(min(k, len(probabilities)))
        return tuple(ClassScore(int(i), self.classes.wnids[i], self.classes.names[i], float(v))
                     for v, i in zip(values.tolist(), indices.tolist()))

    def load_file(self, path) -> np.ndarray:
        """A file's central (S, S, 3) crop, as build-shards makes it; UnreadableImage if not."""
        try:
            data = Path(path).read_bytes()
        except IsADirectoryError:
            raise UnreadableImage("a directory, not an image file") from None
        except FileNotFoundError:
            raise UnreadableImage("no such file") from None
        except OSError as exc:
            raise UnreadableImage(f"cannot be read ({exc.strerror or exc})") from None
        return load_center_crop(data, self.spec)

    def classify_files(self, paths: Iterable, *, crops: int = 1, top: int = 5,
                       batch_size: int = 32) -> list[Prediction]:
        """A Prediction per path, in order: the `top` classes, or the reason a file could not
        be classified. Files are decoded and run `batch_size` at a time (bounded memory)."""
        crop_windows(crops)  # a bad crops value fails before any file is read
        results: list[Prediction | str] = []  # a path: a placeholder until its batch runs
        pending: list[tuple[int, np.ndarray]] = []

        def flush():
            if not pending:
                return
            probs = self.probabilities(np.stack([image for _, image in pending]), crops)
            for (slot, _), row in zip(pending, probs):
                results[slot] = Prediction(results[slot], self.top(row, top))
            pending.clear()

        for path in paths:
            try:
                image = self.load_file(path)
            except UnreadableImage as exc:
                results.append(Prediction(str(path), error=str(exc)))
                continue
            results.append(str(path))
            pending.append((len(results) - 1, image))
            if len(pending) >= batch_size:
                flush()
        flush()
        return results


def classify_files(checkpoint, paths: Iterable, *, crops: int = 1, top: int = 5, device: str = "cpu",
                   batch_size: int = 32) -> list[Prediction]:
    """`Predictor.from_checkpoint(checkpoint, device).classify_files(paths, ...)`."""
    return Predictor.from_checkpoint(checkpoint, device).classify_files(paths, crops=crops, top=top,
                                                                        batch_size=batch_size)
