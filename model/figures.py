"""What a trained network learned, as the paper's section 6.1 shows it.

    from alexprep.model.figures import kernels_figure, predictions_figure
    kernels_figure("runs/alexnet", "kernels.png")               # Figure 3
    predictions_figure("runs/alexnet", "out/", "predictions.png")  # Figure 4, left

- Figure 3: conv1's 96 kernels (11x11x3), tower 1's 48 above tower 2's 48, each stretched
  to the full 0-1 range on its own (all three channels together, so its colour survives).
- Figure 4, left: validation images with their true label and a bar chart of the five
  most probable classes, the true class's bar in red (as in the paper) when it is there.
- Figure 4, right (nearest neighbors in fc7 space) is in `alexprep.model.neighbors`.

Figures are drawn with matplotlib's object API (Agg, no pyplot) at a fixed size: the PNG is exactly
figsize x dpi pixels (`*_figsize` give the inches).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from alexprep.imagenet_prep.atomic import temporary_name
from alexprep.imagenet_prep.samples import SplitSamples
from alexprep.imagenet_prep.shards import read_split
from alexprep.model.checkpoint import load_checkpoint, require_same_classes
from alexprep.model.inference import model_from_checkpoint
from alexprep.model.predict import Predictor, center_crops, class_label, split_images

KERNEL_COLUMNS = 16  # 48 kernels a tower in 3 rows of 16, as the paper's Figure 3
KERNELS_FIGSIZE = (10.0, 4.6)  # inches: the two towers' mosaics with their titles
PREDICTION_COLUMNS = 4  # images a row in the predictions figure
PREDICTION_CELL = (2.6, 3.9)  # inches per image: the picture, its label and five bars
NEIGHBOR_CELL = 1.6  # inches per image in the neighbors figure (square)


def _checkpoint(ckpt) -> dict:
    return ckpt if isinstance(ckpt, dict) else load_checkpoint(Path(ckpt))


def new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure on the Agg canvas (the object API: no pyplot, no global state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig, path, dpi: int) -> Path:
    """Write a figure as PNG, atomically, at exactly figsize x dpi pixels (no tight bbox)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": None})
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------- Figure 3
def contrast_stretch(kernels: np.ndarray) -> np.ndarray:
    """(..., 3, h, w) kernels -> (..., h, w, 3) in [0, 1], each kernel min-max stretched over
    its three channels together (a flat kernel becomes mid-grey)."""
    k = np.asarray(kernels, np.float64)
    lo = k.min(axis=(-3, -2, -1), keepdims=True)
    hi = k.max(axis=(-3, -2, -1), keepdims=True)
    span = hi - lo
    stretched = np.where(span > 0, (k - lo) / np.where(span > 0, span, 1.0), 0.5)
    return np.moveaxis(stretched, -3, -1)


def kernel_mosaic(kernels: np.ndarray, columns: int = KERNEL_COLUMNS, gap: int = 1) -> np.ndarray:
    """(n, 3, h, w) kernels -> one (rows*(h+gap)+gap, columns*(w+gap)+gap, 3) image in [0, 1],
    kernels in row-major order on a white ground."""
    tiles = contrast_stretch(kernels)  # (n, h, w, 3)
    n, h, w, _ = tiles.shape
    rows = math.ceil(n / columns)
    out = np.ones((rows * (h + gap) + gap, columns * (w + gap) + gap, 3))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[gap + r * (h + gap): gap + r * (h + gap) + h, gap + c * (w + gap): gap + c * (w + gap) + w] = tile
    return out


def kernels_figure(checkpoint, out, *, dpi: int = 100) -> Path:
    """The paper's Figure 3 from a checkpoint (file, run dir or loaded dict): conv1's 96
    kernels, tower 1 above tower 2. Returns the PNG's path."""

    ckpt = _checkpoint(checkpoint)
    kernels = model_from_checkpoint(ckpt).conv1_kernels().numpy()  # (2, 48, 3, 11, 11)
    fig = new_figure(KERNELS_FIGSIZE)
    axes = fig.subplots(2, 1)
    size = "x".join(str(s) for s in kernels.shape[-2:]) + f"x{kernels.shape[2]}"
    fig.suptitle(f"conv1: {kernels.shape[0] * kernels.shape[1]} kernels of {size}, step {ckpt.get('step', '?')}",
                 fontsize=11)
    for tower, ax in enumerate(axes):
        ax.imshow(kernel_mosaic(kernels[tower]), interpolation="nearest")
        ax.set_title(f"tower {tower + 1} (GPU {tower + 1} in the paper): {kernels.shape[1]} kernels", fontsize=9)
        ax.set_axis_off()
    fig.subplots_adjust(left=0.02, right=0.98, top=0.88, bottom=0.02, hspace=0.18)
    return save_figure(fig, out, dpi)


# ---------------------------------------------------------------------------- Figure 4, left
def pick_rows(total: int, n: int, seed: int = 0) -> np.ndarray:
    """`min(n, total)` distinct sample indices of a split, seeded, in increasing order."""
    if total <= 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(n, total), replace=False)).astype(np.int64)


def predictions_figsize(n: int) -> tuple[float, float]:
    """Inches of the predictions figure for n images."""
    columns = min(n, PREDICTION_COLUMNS)
    rows = math.ceil(n / columns)
    return columns * PREDICTION_CELL[0], rows * PREDICTION_CELL[1]


def predictions_figure(checkpoint, root, out, *, n: int = 8, split: str = "val", seed: int = 0, crops: int = 1,
                       device: str = "cpu", dpi: int = 100) -> Path:
    """The paper's Figure 4 (left): `n` images of `split` of build folder `root` (seeded
    choice), each with its true label and its top-5 classes with probabilities. The
    checkpoint's class list must be the build's. Returns the PNG's path."""
    ckpt = _checkpoint(checkpoint)
    index = read_split(Path(root), split)
    require_same_classes(ckpt, index)
    samples = SplitSamples(index)
    rows = pick_rows(len(samples), n, seed)
    images = split_images(index, rows, samples)  # (n, 256, 256, 3) uint8
    predictor = Predictor(ckpt, device)
    probs = predictor.probabilities(images, crops)  # (n, classes)
    labels = samples.labels[rows]
    classes = index.classes
    shown = center_crops(images)

    count = len(rows)
    columns = min(count, PREDICTION_COLUMNS)
    fig = new_figure(predictions_figsize(count))
    outer = fig.add_gridspec(math.ceil(count / columns), columns, left=0.03, right=0.97, top=0.98, bottom=0.02,
                             hspace=0.12, wspace=0.15)
    for i in range(count):
        r, c = divmod(i, columns)
        cell = outer[r, c].subgridspec(2, 1, height_ratios=[2.5, 1.0], hspace=0.22)
        ax = fig.add_subplot(cell[0])
        ax.imshow(shown[i])
        ax.set_xticks([])
        ax.set_yticks([])
        truth = int(labels[i])
        ax.set_xlabel(clip_text(class_label(classes.wnids[truth], classes.names[truth])), fontsize=8, fontweight="bold")
        top = predictor.top(probs[i], 5)
        bars = fig.add_subplot(cell[1])
        ypos = np.arange(len(top))
        # Light colours, so that the class names written over the bars stay legible.
        colours = ["#f08080" if s.index == truth else "#9ecae1" for s in top]
        bars.barh(ypos, [s.probability for s in top], color=colours, height=0.7)
        for y, s in zip(ypos, top):
            bars.text(0.02, y, f"{clip_text(class_label(s.wnid, s.name), 24)}  {100 * s.probability:.0f}%",
                      va="center", ha="left", fontsize=6.5)
        bars.set_xlim(0, 1)
        bars.invert_yaxis()  # the most probable on top
        bars.set_yticks([])
        bars.set_xticks([])
        for side in ("top", "right", "left"):
            bars.spines[side].set_visible(False)
    return save_figure(fig, out, dpi)


def clip_text(text: str, width: int = 30) -> str:
    """`text`, cut to `width` characters with an ellipsis where longer."""
    return text if len(text) <= width else text[: width - 1] + "…"
