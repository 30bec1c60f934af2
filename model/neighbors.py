"""Nearest neighbors in fc7 space: the paper's Figure 4 (right).

    from alexprep.model.neighbors import find_neighbors, neighbors_figure
    found = find_neighbors("runs/alexnet", "out/", queries=5, k=6)   # val queries, train images
    neighbors_figure(found, "out/", "neighbors.png")

Section 6.1: "If two images produce feature activation vectors with a small Euclidean
separation, we can say that the higher levels of the neural network consider them to be
similar." The vectors are fc7's 4096 activations (post-ReLU, no dropout) of each image's
centre crop, computed by the evaluation loader (the checkpoint's mean image, eval
preprocessing) in batches.

Features are cached: `CACHE/<weights digest>-<split>.f16.npy` (rows in sample order,
float16: 1.28M training images x 4096 x 2 bytes = 10.5 GB), with a JSON beside it that
says which checkpoint and build they belong to. The .npy is written through a memory map
under a temporary name and renamed when complete, and the JSON is written last (both
atomically), so a killed run leaves no cache that looks finished. A second call with the
same checkpoint and build reads the cache and does not run the network. CACHE defaults
to OUT/features.

The search reads the base features in chunks (`chunk_rows` rows, float32 while in use:
~128 MB at the default) and keeps a running top-k per query, so memory does not grow
with the split; the final k distances are recomputed exactly from the stored vectors
(a query that is itself in the base split is at distance 0).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alexprep.imagenet_prep.atomic import replace_synced, temporary_name, write_text_atomic
from alexprep.imagenet_prep.build_folder import BuildFolder
from alexprep.imagenet_prep.devices import device_name
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.loaders import eval_loader
from alexprep.imagenet_prep.samples import SplitSamples
from alexprep.imagenet_prep.shards import SplitIndex, read_split
from alexprep.model.checkpoint import load_checkpoint, normalize_of
from alexprep.model.distributed import resolve_devices
from alexprep.model.inference import model_from_checkpoint
from alexprep.model.figures import NEIGHBOR_CELL, clip_text, new_figure, pick_rows, save_figure
from alexprep.model.predict import center_crops, class_label, eval_stats, split_images

FEATURES_FORMAT = "alexprep-features"
FEATURE_DTYPE = np.float16  # halves the cache; fc7 values are O(1-10), far inside its range
FLOAT16_MAX = float(np.finfo(np.float16).max)
CHUNK_ROWS = 8192  # rows of base features searched at once: 8192 x 4096 x 4 B = 128 MB
HEADER = 0.6  # inches above the first row: the figure's title and the first row's captions
REFINE_EXTRA = 8  # candidates kept beyond k, so that rounding in the fast search cannot drop a true neighbor


# ---------------------------------------------------------------------------- features
def weights_digest(ckpt: dict) -> str:
    """16 hex digits of a SHA-256 over the network's weights, its configuration and the mean
    image: the features' identity, whatever file the checkpoint is in."""
    digest = hashlib.sha256()
    digest.update(json.dumps(ckpt.get("model_config", {}), sort_keys=True).encode())
    digest.update(normalize_of(ckpt).encode())
    tensors = sorted(ckpt["model"].items()) + [("stats.mean_image", ckpt["stats"]["mean_image"])]
    for name, tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return digest.hexdigest()[:16]


def cache_paths(cache_dir: Path, digest: str, split: str) -> tuple[Path, Path]:
    """The features file and its JSON record."""
    stem = f"{digest}-{split}"
    return Path(cache_dir) / f"{stem}.f16.npy", Path(cache_dir) / f"{stem}.json"


def _record(ckpt: dict, digest: str, index: SplitIndex, dims: int) -> dict:
    return {"format": FEATURES_FORMAT, "weights": digest, "step": ckpt.get("step"), "epoch": ckpt.get("epoch"),
            "build_id": index.build_id, "split": index.split, "rows": index.rows, "dims": dims,
            "dtype": np.dtype(FEATURE_DTYPE).name, "layer": "fc7", "crops": 1, "normalize": normalize_of(ckpt)}


def cached_features(ckpt: dict, index: SplitIndex, cache_dir: Path, digest: str | None = None) -> np.ndarray | None:
    """The cached features of `index`'s split for this checkpoint, memory-mapped read-only,
    or None when there are none (or they belong to another build or are incomplete)."""
    digest = digest or weights_digest(ckpt)
    npy, meta = cache_paths(cache_dir, digest, index.split)
    try:
        record = json.loads(meta.read_text())
        features = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    expected = _record(ckpt, digest, index, record.get("dims", -1))
    if record != expected or features.shape != (index.rows, record["dims"]) or features.dtype != FEATURE_DTYPE:
        return None
    return features


def split_features(checkpoint, root, split: str, *, cache_dir=None, batch_size: int = 64, device: str = "cpu",
                   backend: str = "auto", workers: int | None = None, model=None, digest: str | None = None,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """fc7 features (rows, 4096) float16 of every image of `split` of build folder `root`, in
    sample order: from the cache when it holds them, else computed in batches of
    `batch_size` and cached. Returned memory-mapped and read-only.

    checkpoint: a file, a run dir or a loaded checkpoint dict. cache_dir: default
    root/features. model: the checkpoint's network already built, and digest its
    `weights_digest` already computed (each saves a second or so at ImageNet scale).
    progress(done, total) is called after each batch while computing.
    """

    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(Path(checkpoint))
    root = Path(root)
    index = read_split(root, split)
    cache_dir = Path(cache_dir) if cache_dir is not None else BuildFolder(root).features
    digest = digest or weights_digest(ckpt)
    found = cached_features(ckpt, index, cache_dir, digest)
    if found is not None:
        return found

    _check_writable(cache_dir)
    if model is None:
        model = model_from_checkpoint(ckpt, resolve_devices((device,)))
    loader = eval_loader(root, batch_size=batch_size, device=device_name(model.input_device),
                         stats=eval_stats(ckpt, index), split=split, crops=1, normalize=normalize_of(ckpt),
                         backend=backend, workers=workers)
    npy, meta = cache_paths(cache_dir, digest, split)
    tmp = temporary_name(npy)
    try:
        dims = _write_features(model, loader, tmp, index, progress)
        replace_synced(tmp, npy)
    finally:
        loader.close()
        if tmp.exists():
            tmp.unlink()
    write_text_atomic(meta, json.dumps(_record(ckpt, digest, index, dims), indent=1) + "\n")
    return np.load(npy, mmap_mode="r")


def _check_writable(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the feature cache {cache_dir} ({exc.strerror or exc}): "
                        "choose another folder (--cache DIR)") from None
    if not os.access(cache_dir, os.W_OK):
        raise DataError(f"the feature cache {cache_dir} is not writable: choose another folder (--cache DIR)")


def _write_features(model, loader, tmp: Path, index: SplitIndex, progress) -> int:
    """Every image's fc7 features into the .npy file `tmp`, in sample order; returns their
    dimension."""
    n, row, out = index.rows, 0, None
    with torch.no_grad():
        for images, _ in loader:  # rank 0 of 1: the whole split, in sample order
            feats = model.features(images.to(model.input_device))  # (B, 4096)
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=FEATURE_DTYPE, shape=(n, feats.shape[1]))
            # Clamp rather than store inf: a pathological activation must not poison distances.
            out[row:row + len(feats)] = feats.clamp(max=FLOAT16_MAX).to(torch.float16).cpu().numpy()
            row += len(feats)
            if progress:
                progress(row, n)
    if out is None or row != n:
        raise DataError(f"{index.folder}: the loader gave {row} images, the manifest lists {n}")
    out.flush()
    return out.shape[1]


# ---------------------------------------------------------------------------- the search
def nearest(queries: np.ndarray, base: np.ndarray, k: int, *, chunk_rows: int = CHUNK_ROWS
            ) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `base` (N, D) nearest in Euclidean distance to each of `queries` (Q, D):
    (indices (Q, k) int64, distances (Q, k) float64), nearest first, ties by lower index.

    `base` may be a memory map of any size: it is read `chunk_rows` rows at a time, the
    squared distances ranked by |x|^2 - 2 q.x + |q|^2 in float32 with a running top
    (k + REFINE_EXTRA) per query, whose distances are then recomputed exactly in float64.
    """
    q = np.asarray(queries, np.float32)
    if q.ndim != 2 or base.ndim != 2 or q.shape[1] != base.shape[1]:
        raise ValueError(f"queries {q.shape} and base {base.shape} must be (Q, D) and (N, D)")
    n = base.shape[0]
    k = min(k, n)
    keep = min(n, k + REFINE_EXTRA)
    qq = (q * q).sum(axis=1)  # (Q,)
    best_d = np.zeros((len(q), 0), np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for start in range(0, n, chunk_rows):
        x = np.asarray(base[start:start + chunk_rows], np.float32)  # (C, D)
        d2 = (x * x).sum(axis=1)[None, :] - 2.0 * (q @ x.T) + qq[:, None]  # (Q, C)
        ids = np.broadcast_to(np.arange(start, start + len(x), dtype=np.int64), d2.shape)
        cand_d = np.concatenate([best_d, d2], axis=1)
        cand_i = np.concatenate([best_i, ids], axis=1)
        if cand_d.shape[1] > keep:
            part = np.argpartition(cand_d, keep - 1, axis=1)[:, :keep]
            cand_d = np.take_along_axis(cand_d, part, axis=1)
            cand_i = np.take_along_axis(cand_i, part, axis=1)
        best_d, best_i = cand_d, cand_i
    indices = np.empty((len(q), k), np.int64)
    distances = np.empty((len(q), k), np.float64)
    q64 = np.asarray(queries, np.float64)
    for j in range(len(q)):
        cand = np.sort(best_i[j])  # increasing rows: a sequential read of the memory map
        exact = np.sqrt(((np.asarray(base[cand], np.float64) - q64[j]) ** 2).sum(axis=1))
        order = np.lexsort((cand, exact))[:k]
        indices[j], distances[j] = cand[order], exact[order]
    return indices, distances


@dataclass(frozen=True)
class Neighbors:
    """Query images and their nearest images, as sample indices of their splits."""

    query_split: str
    split: str  # where the neighbors come from
    queries: np.ndarray  # (Q,) int64 sample indices in query_split
    indices: np.ndarray  # (Q, k) int64 sample indices in split, nearest first
    distances: np.ndarray  # (Q, k) float64 Euclidean distances of the fc7 vectors

    def to_json(self) -> dict:
        return {"query_split": self.query_split, "split": self.split, "queries": self.queries.tolist(),
                "indices": self.indices.tolist(), "distances": self.distances.tolist()}


def find_neighbors(checkpoint, root, *, queries: int = 5, k: int = 6, query_split: str = "val",
                    split: str = "train", rows=None, seed: int = 0, cache_dir=None, batch_size: int = 64,
                    device: str = "cpu", backend: str = "auto", workers: int | None = None,
                    chunk_rows: int = CHUNK_ROWS, progress: Callable[[str, int, int], None] | None = None
                    ) -> Neighbors:
    """For `queries` images of `query_split` (a seeded choice, or the sample indices `rows`),
    the `k` images of `split` whose fc7 features are nearest. Features of both splits are
    computed once and cached (see the module docstring). progress(split, done, total)."""

    if k < 1 or queries < 1:
        raise DataError(f"--k and --queries must be at least 1 (got k={k}, queries={queries})")
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(Path(checkpoint))
    cache = Path(cache_dir) if cache_dir is not None else BuildFolder(root).features
    digest = weights_digest(ckpt)
    model = None
    feats = {}
    for name in dict.fromkeys((query_split, split)):  # each split once
        feats[name] = cached_features(ckpt, read_split(Path(root), name), cache, digest)
        if feats[name] is None:
            if model is None:  # built only when some split's features are missing
                model = model_from_checkpoint(ckpt, resolve_devices((device,)))
            report = (lambda done, total, s=name: progress(s, done, total)) if progress else None
            feats[name] = split_features(ckpt, root, name, cache_dir=cache, batch_size=batch_size, device=device,
                                         backend=backend, workers=workers, model=model, digest=digest,
                                         progress=report)
    total = len(feats[query_split])
    if rows is None:
        chosen = pick_rows(total, queries, seed)
    else:
        chosen = np.asarray(rows, np.int64).reshape(-1)
        if chosen.size and (chosen.min() < 0 or chosen.max() >= total):
            raise DataError(f"query rows must be in 0..{total - 1} ({query_split} has {total} images)")
    query_feats = np.asarray(feats[query_split][chosen], np.float32)
    indices, distances = nearest(query_feats, feats[split], k, chunk_rows=chunk_rows)
    return Neighbors(query_split, split, chosen, indices, distances)


# ---------------------------------------------------------------------------- the figure
def neighbors_figsize(queries: int, k: int) -> tuple[float, float]:
    """Inches of the neighbors figure: a row per query, the query and its k neighbors."""
    return (k + 1) * NEIGHBOR_CELL, queries * NEIGHBOR_CELL + HEADER


def neighbors_figure(found: Neighbors, root, out, *, dpi: int = 100) -> Path:
    """The paper's Figure 4 (right): each query image (first column, its label) and its
    nearest images of `found.split` (label and distance). Returns the PNG's path."""
    root = Path(root)
    q_index, b_index = read_split(root, found.query_split), read_split(root, found.split)
    q_samples = SplitSamples(q_index)
    b_samples = q_samples if found.split == found.query_split else SplitSamples(b_index)
    rows, k = found.indices.shape
    fig = new_figure(neighbors_figsize(rows, k))
    height = fig.get_figheight()
    axes = fig.subplots(rows, k + 1, squeeze=False,
                        gridspec_kw={"left": 0.01, "right": 0.99, "top": 1 - HEADER / height, "bottom": 0.01, "wspace": 0.06,
                                     "hspace": 0.35})
    fig.suptitle(f"{found.query_split} images (left) and the {k} {found.split} images nearest in fc7 space",
                 fontsize=9, y=1 - 0.08 / height, va="top")

    def show(ax, samples, index, row, caption, bold=False):
        ax.imshow(center_crops(split_images(index, [row], samples))[0])
        ax.set_xticks([])
        ax.set_yticks([])
        label = int(samples.labels[row])
        name = class_label(index.classes.wnids[label], index.classes.names[label])
        ax.set_title(f"{clip_text(name, 22)}\n{caption}", fontsize=5.5, fontweight="bold" if bold else "normal", pad=2)

    for r in range(rows):
        show(axes[r, 0], q_samples, q_index, int(found.queries[r]), f"query #{int(found.queries[r])}", bold=True)
        for c in range(k):
            show(axes[r, c + 1], b_samples, b_index, int(found.indices[r, c]),
                 f"#{int(found.indices[r, c])}  d={found.distances[r, c]:.1f}")
    return save_figure(fig, out, dpi)


def neighbors(checkpoint, root, out, *, dpi: int = 100, **options) -> tuple[Path, Neighbors]:
    """`find_neighbors(checkpoint, root, **options)` drawn to `out`: (PNG path, neighbors)."""
    found = find_neighbors(checkpoint, root, **options)
    return neighbors_figure(found, root, out, dpi=dpi), found
