"""The RandomResizedCrop recipe's windows, drawn on the host (docs/design.md, "Loaders").

torchvision's `RandomResizedCrop.get_params`, vectorised over samples and fed by the
counter-based generator of augment.py, so that a sample's window depends only on (seed,
epoch, sample index) and its stored image's size: up to 10 tries of an area fraction
uniform in `scale` and a log aspect ratio uniform in log(`ratio`), w = round(√(area·r)),
h = round(√(area/r)) (half to even, as Python's round), the first try with 0 < w ≤ W and
0 < h ≤ H taken, its offset uniform over all positions; after 10 misses, the centre crop
of the whole image clamped to the ratio range. Evaluation's window is the central square
that torchvision's Resize(resize) + CenterCrop(size) keeps, rounded to whole pixels.

A window is a row (x, y, w, h, flip) of int64 in the stored image's pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from alexprep.imagenet_prep import augment
from alexprep.imagenet_prep.errors import DataError

TRIES = 10  # torchvision's
SCALE = (0.08, 1.0)  # area fraction of the image
RATIO = (3 / 4, 4 / 3)  # width / height
CROP_FRACTION = 0.875  # evaluation: the default resize is size / 0.875 (256 for 224)
_DOMAIN_RRC = 0x727263  # "rrc": words apart from the paper's draws and the epoch order
_WORDS = 2 * TRIES + 2  # an area and a log-ratio per try, then the x and y offsets


@dataclass(frozen=True)
class RrcDraws:
    """One epoch's RandomResizedCrop choices for some samples (row i for index[i])."""

    index: np.ndarray  # (N,) int64 sample indices
    windows: np.ndarray  # (N, 5) int64 rows (x, y, w, h, flip) in the stored image's pixels
    alpha: np.ndarray  # (N, 3) float64 PCA lighting alphas (zeros when lighting is off)
    tries: np.ndarray  # (N,) int64: the try taken, 1..10; 0 for the fallback
    area_fraction: np.ndarray  # (N,) float64 drawn for the try taken (NaN for the fallback)
    log_ratio: np.ndarray  # (N,) float64 likewise

    def __len__(self) -> int:
        return len(self.index)

    @property
    def flip(self) -> np.ndarray:
        return self.windows[:, 4].astype(bool)


def check_params(scale, ratio) -> tuple[tuple[float, float], tuple[float, float]]:
    """scale and ratio as float pairs, or a DataError saying what is wrong."""
    out = []
    for name, pair in (("scale", scale), ("ratio", ratio)):
        try:
            a, b = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise DataError(f"{name} must be a pair (min, max), not {pair!r}") from None
        if not (0 < a <= b and math.isfinite(b)) or (name == "scale" and b > 1):
            limit, default = ("0 < min <= max <= 1", SCALE) if name == "scale" else ("0 < min <= max", RATIO)
            raise DataError(f"{name} must satisfy {limit}, not {pair!r} (torchvision's default: {default})")
        out.append((a, b))
    return out[0], out[1]


def draw_rrc(seed: int, epoch: int, index, heights, widths, scale=SCALE, ratio=RATIO,
             lighting_std: float = 0.0) -> RrcDraws:
    """The windows of samples `index` (stored sizes heights[i] x widths[i]) in `epoch`, and
    their flips (p = 0.5) and lighting alphas, which are the paper recipe's draws of the
    same (seed, epoch, sample) (augment.draw)."""
    (s0, s1), (r0, r1) = check_params(scale, ratio)
    index = np.asarray(index, np.int64).reshape(-1)
    height = np.asarray(heights, np.int64).reshape(-1)
    width = np.asarray(widths, np.int64).reshape(-1)
    words = augment.counter_words(seed, epoch, index, _WORDS, _DOMAIN_RRC)
    area = (height * width).astype(np.float64)[:, None]
    fraction = s0 + (s1 - s0) * augment.unit_interval(words[:, 0:2 * TRIES:2], open_zero=False)  # (N, 10)
    log_r = math.log(r0) + (math.log(r1) - math.log(r0)) * augment.unit_interval(words[:, 1:2 * TRIES:2], False)
    w = np.rint(np.sqrt(area * fraction * np.exp(log_r))).astype(np.int64)
    h = np.rint(np.sqrt(area * fraction / np.exp(log_r))).astype(np.int64)
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = np.argmax(fits, axis=1)  # the first try that fits (0 where none does)
    rows = np.arange(len(index))
    hit = fits[rows, first]
    fw, fh = fallback_size(height, width, r0, r1)
    w_taken = np.where(hit, w[rows, first], fw)
    h_taken = np.where(hit, h[rows, first], fh)
    x = np.where(hit, augment.uniform_int(words[:, 2 * TRIES], width - w_taken + 1), (width - w_taken) // 2)
    y = np.where(hit, augment.uniform_int(words[:, 2 * TRIES + 1], height - h_taken + 1), (height - h_taken) // 2)
    paper = augment.draw(seed, epoch, index, lighting_std, positions=1)  # its flip and alpha
    windows = np.stack([x.astype(np.int64), y.astype(np.int64), w_taken, h_taken, paper.flip.astype(np.int64)], 1)
    return RrcDraws(index, windows, paper.alpha, np.where(hit, first + 1, 0),
                    np.where(hit, fraction[rows, first], np.nan), np.where(hit, log_r[rows, first], np.nan))


def fallback_size(height: np.ndarray, width: np.ndarray, r0: float, r1: float) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's window after 10 misses: the whole image, narrowed to the ratio range
    (w = W, h = round(W / r0) when W/H < r0; h = H, w = round(H * r1) when W/H > r1)."""
    in_ratio = width / height
    w = np.where(in_ratio > r1, np.rint(height * r1), width).astype(np.int64)
    h = np.where(in_ratio < r0, np.rint(width / r0), height).astype(np.int64)
    return w, h


def center_windows(heights, widths, size: int, resize: int) -> np.ndarray:
    """(N, 5) evaluation windows: the central square of side round(min(H, W) * size /
    resize), placed as torchvision's CenterCrop places it (offsets rounded half to even).
    Resized to size x size it is Resize(resize) + CenterCrop(size) up to that rounding;
    with the shorter side equal to `resize` it is that crop exactly, and no resampling."""
    height = np.asarray(heights, np.int64).reshape(-1)
    width = np.asarray(widths, np.int64).reshape(-1)
    short = np.minimum(height, width)
    side = np.clip(np.rint(short * (size / resize)).astype(np.int64), 1, short)
    x = np.rint((width - side) / 2).astype(np.int64)
    y = np.rint((height - side) / 2).astype(np.int64)
    return np.stack([x, y, side, side, np.zeros_like(side)], axis=1)


def default_resize(size: int) -> int:
    """The evaluation resize for output `size`: round(size / 0.875), 256 for 224."""
    return int(round(size / CROP_FRACTION))
