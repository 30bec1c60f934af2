"""Small ImageNet-layout trees made from real photographs that ship in installed packages.

For the tests, the benchmarks and `make demo`: no network, no random noise. The photos
are scikit-image's and scikit-learn's sample images (imported lazily; they are test
extras, not runtime needs), cut into crops at ImageNet's typical sizes and qualities;
the demo's images are scikit-learn's 1,797 handwritten digits.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

# ImageNet's most common sizes (w, h), and some larger and smaller ones.
COMMON_SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (333, 500), (500, 500)]
LARGE_SIZES = [(1024, 768), (1600, 1200), (2000, 1500), (1200, 1600)]
SMALL_SIZES = [(200, 150), (150, 200), (120, 90)]


def photo_names() -> list[str]:
    return ["astronaut", "chelsea", "coffee", "rocket", "motorcycle", "china", "flower", "hubble", "retina", "ihc"]


def load_photo(name: str) -> np.ndarray:
    """One real colour photograph as (H, W, 3) uint8."""
    from skimage import data

    loaders = {
        "astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee, "rocket": data.rocket,
        "motorcycle": lambda: data.stereo_motorcycle()[0], "hubble": data.hubble_deep_field,
        "retina": data.retina, "ihc": data.immunohistochemistry,
    }
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    return np.ascontiguousarray(loaders[name]()[..., :3])


def photo_crop(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random window of the photo with the aspect ratio of `size`, resized to `size`
    (so each variant of a photo differs, like different pictures of one class)."""
    h, w = photo.shape[:2]
    tw, th = size
    scale = rng.uniform(0.5, 1.0)
    cw = min(w, int(scale * min(w, h * tw / th)))
    ch = max(1, min(h, int(cw * th / tw)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = Image.fromarray(photo[y:y + ch, x:x + cw])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img.resize(size, Image.Resampling.BICUBIC)


def jpeg_bytes(img: Image.Image, quality: int = 90, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def wnid_for(i: int) -> str:
    """Made-up wnids in ImageNet's format, sorting in class order."""
    return f"n{i + 1:08d}"


def write_photo_tree(root: Path, classes: int = 3, train_per_class: int = 4, val_per_class: int = 2,
                     sizes=None, seed: int = 0) -> dict[str, list[Path]]:
    """`root/train/<wnid>/*.JPEG` and `root/val/<wnid>/*.JPEG`, class c made from photo c.

    Returns the written paths per split.
    """
    rng = np.random.default_rng(seed)
    sizes = sizes or COMMON_SIZES
    names = photo_names()
    written: dict[str, list[Path]] = {"train": [], "val": []}
    for c in range(classes):
        photo = load_photo(names[c % len(names)])
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            folder = Path(root) / split / wnid_for(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = photo_crop(photo, sizes[int(rng.integers(len(sizes)))], rng)
                path = folder / f"{wnid_for(c)}_{i}.JPEG"
                path.write_bytes(jpeg_bytes(img, quality=int(rng.integers(75, 96))))
                written[split].append(path)
    return written


def write_corpus(folder: Path, n: int = 300, seed: int = 0) -> list[Path]:
    """`n` JPEGs with ImageNet's mix of sizes (80% common, 10% large, 10% small) and
    qualities (75-95), in one class folder per photo: the benchmark's input."""
    rng = np.random.default_rng(seed)
    names = photo_names()
    photos = {name: load_photo(name) for name in names}
    paths = []
    for i in range(n):
        bucket = rng.random()
        pool = COMMON_SIZES if bucket < 0.8 else LARGE_SIZES if bucket < 0.9 else SMALL_SIZES
        size = pool[int(rng.integers(len(pool)))]
        name = names[i % len(names)]
        sub = Path(folder) / "train" / f"n{names.index(name) + 1:08d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{name}_{i:05d}_{size[0]}x{size[1]}.JPEG"
        path.write_bytes(jpeg_bytes(photo_crop(photos[name], size, rng), quality=int(rng.integers(75, 96))))
        paths.append(path)
    return paths


def size_bucket(w: int, h: int) -> str:
    longer = max(w, h)
    return "small (<300 px)" if longer < 300 else "large (>800 px)" if longer > 800 else "common (~500 px)"


def write_digits_tree(root: Path, val_fraction: float = 0.2, seed: int = 0, kaggle_val: bool = False) -> dict:
    """scikit-learn's 1,797 handwritten digits (10 classes) as an ImageNet-layout tree.

    Each 8x8 digit (16 grey levels) is written as a 32x32 PNG, dark ink on white paper.
    With kaggle_val, val/ is flat with a LOC_val_solution.csv, as in Kaggle's ImageNet.
    Returns counts per split.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    n_val = int(round(len(order) * val_fraction))
    root = Path(root)
    rows = []
    counts = {"train": 0, "val": 0}
    names = {}
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        label = int(digits.target[i])
        wnid = wnid_for(label)
        names[wnid] = f"digit {label}"
        pixels = (255 - digits.images[i] * (255 / 16)).astype(np.uint8)
        img = Image.fromarray(pixels, "L").resize((32, 32), Image.Resampling.BILINEAR)
        if split == "val" and kaggle_val:
            folder, stem = root / "val", f"digits_val_{counts['val']:05d}"
            rows.append((stem, f"{wnid} 0 0 31 31"))
        else:
            folder, stem = root / split / wnid, f"digit_{i:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{stem}.png")
        counts[split] += 1
    if kaggle_val:
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ImageId", "PredictionString"])
            writer.writerows(rows)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in sorted(names.items())))
    return counts
