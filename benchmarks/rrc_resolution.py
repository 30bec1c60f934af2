"""The RandomResizedCrop recipe's resolution: how many of its 224×224 windows are upscaled,
and what a build costs, for `--shorter-side` 256 / 320 / 384 / 512 (docs/loaders.md).

    python -m benchmarks.rrc_resolution [--draws 50000] [--images 240] [--out DIR] [--publish]

`recipe="rrc"` crops from the build's `--resize keep-aspect` copy, whose shorter side is
(at most) `--shorter-side`, not from the original as torchvision does: FFCV's trade-off.
For each shorter side S this measures, on ImageNet's mix of image sizes:

1. the share of windows that the resize to 224×224 stretches on at least one axis, i.e.
   whose width or height, counted in the original's pixels, is under 224. Windows are
   drawn by the recipe's own code (`imagenet_prep.rrc.draw_rrc`) on each size's stored
   copy (`ImageSpec.target_size`, `--max-side` 2S); a stored copy larger than its original
   (an upscale) carries no more detail than the original, so a window's extent counts at
   most its original pixels. torchvision's baseline: the same draws on the originals.
2. the bytes per image of a real build (q95 JPEG shards) of benchmarks/scale.py's
   ImageNet-like JPEGs (real photos that ship in scikit-image and scikit-learn, cut to the
   same mix of sizes, with noise and qualities that give ImageNet's mean file size): the
   bytes a build takes per image and per stored pixel.

ImageNet's mix of sizes is not on this machine: the mix is benchmarks/scale.py's (most
photos near 500 px on the longer side, e.g. 500×375, 375×500, 500×333; 6% large up to
2,048 px, 8% small), written into the JSON.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import add_output_args, finish, machine
from benchmarks.scale import COMMON, LARGE, SHARES, SMALL

SIDES = (256, 320, 384, 512)
OUTPUT = 224  # the recipe's output size


def size_mix() -> list[tuple[int, int, float]]:
    """(width, height, share) of ImageNet-like originals: each pool's share spread evenly."""
    return [(w, h, share / len(pool)) for pool, share in zip((COMMON, LARGE, SMALL), SHARES) for w, h in pool]


def upscaled_share(width: int, height: int, side: int | None, draws: int, seed: int = 0) -> float:
    """The share of rrc windows on a `width`×`height` original whose width or height in
    original pixels is under 224, drawn on the keep-aspect copy of shorter side `side`
    (None: on the original, as torchvision)."""
    from alexprep.imagenet_prep.rrc import draw_rrc
    from alexprep.imagenet_prep.transform import ImageSpec

    sw, sh = (width, height) if side is None else ImageSpec(resize="keep-aspect", size=side).target_size(width, height)
    index = np.arange(draws)
    windows = draw_rrc(seed, 0, index, np.full(draws, sh), np.full(draws, sw)).windows
    w_orig = windows[:, 2] * min(1.0, width / sw)  # an upscaled copy adds no detail
    h_orig = windows[:, 3] * min(1.0, height / sh)
    return float(np.mean((w_orig < OUTPUT) | (h_orig < OUTPUT)))


def window_table(draws: int) -> dict:
    """For torchvision and each shorter side: the mix's share of upscaled windows, and
    that of a 500×375 original alone."""
    mix = size_mix()
    rows = {}
    for side in (None, *SIDES):
        per_size = {f"{w}x{h}": upscaled_share(w, h, side, draws) for w, h, _ in mix}
        rows["torchvision" if side is None else str(side)] = {
            "upscaled_share": sum(per_size[f"{w}x{h}"] * share for w, h, share in mix),
            "upscaled_share_500x375": per_size["500x375"], "per_size": per_size}
    return rows


def write_tree(root: Path, images: int) -> None:
    """`images` ImageNet-like JPEGs in root/train/<wnid>/: benchmarks/scale.py's generator
    (real photos cut to the mix's sizes, a colour shift, sensor-like noise, the qualities
    and chroma subsampling of Flickr-era files; its mean file is ImageNet's ~110 KB)."""
    from benchmarks.scale import Generator, wnid

    generator = Generator()
    for k in range(images):
        folder = root / "train" / wnid(k % 10)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{k:05d}.JPEG").write_bytes(generator.image("train", k))


def build_costs(images: int, workers: int) -> dict:
    """Per shorter side: a keep-aspect q95 build of the same JPEGs, its bytes per image
    (all shard files) and per stored pixel; "source": the JPEGs themselves, what
    torchvision reads."""
    import pyarrow as pa

    from alexprep.imagenet_prep.build import BuildConfig, build_shards
    from alexprep.imagenet_prep.transform import ImageSpec

    rows = {}
    with tempfile.TemporaryDirectory(prefix="rrc-resolution-") as tmp:
        src = Path(tmp) / "src"
        write_tree(src, images)
        files = list((src / "train").rglob("*.JPEG"))
        rows["source"] = {"images": len(files), "bytes_per_image": sum(f.stat().st_size for f in files) / len(files)}
        for side in SIDES:
            out = Path(tmp) / f"out-{side}"
            build_shards(src, out, BuildConfig(spec=ImageSpec(resize="keep-aspect", size=side), workers=workers,
                                               shard_size=64))
            shards = sorted((out / "train").glob("*.arrow"))
            pixels = written = 0
            for shard in shards:
                table = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()
                pixels += int(np.sum(np.asarray(table["height"]) * np.asarray(table["width"])))
                written += table.num_rows
            size = sum(s.stat().st_size for s in shards)
            rows[str(side)] = {"images": written, "bytes_per_image": size / written,
                               "bytes_per_stored_pixel": size / pixels, "stored_pixels_per_image": pixels / written}
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=50_000, help="windows drawn per image size and shorter side")
    parser.add_argument("--images", type=int, default=240, help="photos in each build")
    parser.add_argument("--workers", type=int, default=2)
    add_output_args(parser)
    args = parser.parse_args(argv)
    windows, builds = window_table(args.draws), build_costs(args.images, args.workers)
    payload = {
        "machine": machine(),
        "what": "share of RandomResizedCrop(224) windows upscaled on at least one axis (width or height under 224 "
                "in the original's pixels), drawn by imagenet_prep.rrc.draw_rrc on each keep-aspect copy "
                "(--max-side 2S); bytes per image of keep-aspect q95 builds of scale.py's ImageNet-like JPEGs",
        "size_mix": {"source": "benchmarks/scale.py (COMMON, LARGE, SMALL, SHARES): most ImageNet train photos "
                               "are near 500 px on the longer side; an estimate, not counted from the archive",
                     "sizes": [{"width": w, "height": h, "share": s} for w, h, s in size_mix()],
                     "mean_width": sum(w * s for w, h, s in size_mix()),
                     "mean_height": sum(h * s for w, h, s in size_mix())},
        "draws_per_size": args.draws, "images_per_build": args.images, "workers": args.workers,
        "windows": windows, "builds": builds,
    }
    finish("rrc_resolution", payload, args)
    for key, row in windows.items():
        cost = builds.get("source" if key == "torchvision" else key, {})
        print(f"{key:>11}: {row['upscaled_share'] * 100:5.1f}% upscaled (500x375: "
              f"{row['upscaled_share_500x375'] * 100:.1f}%)"
              + (f", {cost['bytes_per_image'] / 1e3:.1f} KB per image" if cost else ""))


if __name__ == "__main__":
    main()
