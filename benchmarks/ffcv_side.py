"""FFCV's side of prep_throughput and loader_throughput, run in FFCV's own environment.

    benchmarks/.ffcv-venv/bin/python benchmarks/ffcv_side.py version
    ... ffcv_side.py write-files LIST.json OUT.beton --workers 1      # prep: source JPEGs -> .beton
    ... ffcv_side.py write-array PIXELS.npy LABELS.npy OUT.beton --mode jpg|raw
    ... ffcv_side.py serve --mean MEAN.npy --std STD.npy --mean-image M.npy --lighting L.npy \
            --batch 64 --workers 2 ffcv-jpeg=own:J.beton ffcv-paperop-jpeg=paperop:J.beton ...

Needs only numpy, PIL, torch and ffcv (made by `make ffcv-env`, never in .venv): FFCV
pins its own numba and builds against system OpenCV and libturbojpeg. Everything prints
one JSON line per answer on stdout.

`serve` builds one `ffcv.loader.Loader` per NAME=PIPELINE:PATH (OrderOption.RANDOM,
drop_last, os_cache), the image pipeline one of PIPELINES below: FFCV's own classes as its
users write them ("own", "rrc-own"), or FFCV's decoders followed by an Operation of ours
doing the paper's or the rrc recipe's work ("paperop", "rrc-op"). It then answers
`epoch NAME SKIP` lines from stdin: one whole epoch (`iter(loader)`), its first SKIP
batches untimed, the rest timed, so that the calling benchmark alternates FFCV's epochs
with its in-process contenders' under the same protocol and idle-machine rule.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace


def say(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- writing
class ImageFiles:
    """A list of (path, label) as FFCV's writer wants a dataset: (PIL RGB image, label) per
    index, as torchvision's ImageFolder gives it (FFCV's own ImageNet script writes from one)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.items[i]
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB"), int(label)


class PixelArray:
    """(N, S, S, 3) uint8 pixels and their labels, as FFCV's writer wants a dataset."""

    def __init__(self, pixels, labels):
        self.pixels, self.labels = pixels, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.pixels[i], int(self.labels[i])


def write(dataset, out: str, *, workers: int, mode: str, max_resolution: int | None, quality: int) -> dict:
    import os

    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(write_mode=mode, max_resolution=max_resolution, jpeg_quality=quality),
              "label": IntField()}
    t = time.perf_counter()
    writer = DatasetWriter(out, fields, num_workers=workers)
    writer.from_indexed_dataset(dataset)
    seconds = time.perf_counter() - t
    from ffcv.reader import Reader

    # The .beton grows in whole pages (8 MiB by default), so its file size says little for
    # a small dataset: the bytes its samples' allocations hold (the JPEGs or raw pixels).
    payload = int(Reader(out).alloc_table["size"].sum())
    return {"seconds": seconds, "images": len(dataset), "bytes": payload, "file_bytes": os.path.getsize(out)}


# ---------------------------------------------------------------------------- loading
def paper_augment_class():
    """The paper's per-image work as an FFCV Operation (FFCV has no mean-image subtraction,
    no PCA lighting and no 33x33 crop): a crop-size window at an offset uniform over all
    (S - crop + 1)^2 positions, a horizontal flip with p = 0.5, the mean image's window
    subtracted (mirrored with the image), the PCA lighting shift `lighting @ alpha`,
    alpha ~ N(0, 0.1), added, written as float32 CHW. One numba-compiled loop per batch,
    parallel over images (FFCV's threads)."""
    import numpy as np
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class PaperAugment(Operation):
        def __init__(self, mean_image, lighting, crop: int = 224, alpha_std: float = 0.1):
            super().__init__()
            self.mean_image = np.ascontiguousarray(mean_image, np.float32)  # (S, S, 3)
            self.lighting = np.ascontiguousarray(lighting, np.float32)  # (3, 3): eigvecs * sqrt(eigvals)
            self.crop = int(crop)
            self.alpha_std = float(alpha_std)

        def generate_code(self):
            each = Compiler.get_iterator()
            mean, light, c, sd = self.mean_image, self.lighting, self.crop, self.alpha_std

            def paper_augment(images, dst):
                span = images.shape[1] - c + 1
                for i in each(images.shape[0]):
                    ox = np.random.randint(0, span)
                    oy = np.random.randint(0, span)
                    flip = np.random.random() < 0.5
                    a0 = np.random.normal(0.0, sd)
                    a1 = np.random.normal(0.0, sd)
                    a2 = np.random.normal(0.0, sd)
                    for k in range(3):
                        shift = np.float32(light[k, 0] * a0 + light[k, 1] * a1 + light[k, 2] * a2)
                        for y in range(c):
                            for x in range(c):
                                sx = ox + (c - 1 - x if flip else x)
                                dst[i, k, y, x] = (np.float32(images[i, oy + y, sx, k]) - mean[oy + y, sx, k]) + shift
                return dst

            paper_augment.is_parallel = True
            return paper_augment

        def declare_state_and_memory(self, previous_state):
            shape = (3, self.crop, self.crop)
            dtype = np.dtype("float32")
            return replace(previous_state, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)

    return PaperAugment


def flip_normalize_class():
    """The rest of the RandomResizedCrop recipe as an FFCV Operation: a horizontal flip with
    p = 0.5 and (x - channel mean) / channel std, written as float32 CHW (what our loaders
    give). One numba-compiled loop per batch, parallel over images."""
    import numpy as np
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class FlipNormalize(Operation):
        def __init__(self, mean, std):
            super().__init__()
            self.mean = np.ascontiguousarray(mean, np.float32)
            self.inv_std = (np.float32(1) / np.asarray(std, np.float32)).astype(np.float32)

        def generate_code(self):
            each = Compiler.get_iterator()
            mean, inv_std = self.mean, self.inv_std

            def flip_normalize(images, dst):
                h, w = images.shape[1], images.shape[2]
                for i in each(images.shape[0]):
                    flip = np.random.random() < 0.5
                    for k in range(3):
                        for y in range(h):
                            for x in range(w):
                                sx = w - 1 - x if flip else x
                                dst[i, k, y, x] = (np.float32(images[i, y, sx, k]) - mean[k]) * inv_std[k]
                return dst

            flip_normalize.is_parallel = True
            return flip_normalize

        def declare_state_and_memory(self, previous_state):
            h, w = previous_state.shape[:2]
            dtype = np.dtype("float32")
            return replace(previous_state, shape=(3, h, w), dtype=dtype), AllocationQuery((3, h, w), dtype)

    return FlipNormalize


# What each pipeline runs, for the benchmark's notes. ToTorchImage returns a permuted view:
# NCHW-shaped, channels_last in memory (NHWC), not the contiguous NCHW our loaders give.
PIPELINES = {
    "own": "FFCV's own pipeline, its classes only: RandomResizedCropRGBImageDecoder((224, 224), "
           "scale=((224/256)^2,)*2, ratio=(1, 1)) (a fixed 224-of-256 window at a random position; the whole "
           "JPEG decoded, then the window copied by OpenCV's resize at 1:1), RandomHorizontalFlip(), "
           "NormalizeImage(channel mean, channel std, float32), ToTensor(), ToTorchImage() (an NCHW-shaped "
           "channels_last view, not contiguous NCHW as ours); no mean image, no PCA lighting: less work per "
           "image than the paper's recipe our loaders do",
    "paperop": "SimpleRGBImageDecoder() then PaperAugment (an Operation of ours, numba: one of 33x33 crop "
               "offsets, flip 0.5, minus the mean image's window, PCA lighting 0.1, float32 contiguous CHW), "
               "ToTensor(): the same work per image as our loaders",
    "rrc-own": "FFCV's own rrc pipeline, its classes only: RandomResizedCropRGBImageDecoder((224, 224)) with its "
               "defaults (torchvision's scale and ratio; whole JPEG decoded, OpenCV INTER_AREA resize), "
               "RandomHorizontalFlip(), NormalizeImage(channel mean, channel std, float32), ToTensor(), "
               "ToTorchImage() (an NCHW-shaped channels_last view, not contiguous NCHW as ours)",
    "rrc-op": "RandomResizedCropRGBImageDecoder((224, 224)) with its defaults, then FlipNormalize (an Operation "
              "of ours, numba: flip 0.5, channel mean and std, float32 contiguous CHW), ToTensor()",
}


def fixed_window_scale(crop: int, side: int) -> tuple[float, float]:
    """RandomResizedCrop's area scale that, with ratio (1, 1), makes its window exactly crop x
    crop of a side x side image: FFCV's way to write the paper's random 224-of-256 crop
    ((224/256)^2 = 0.765625 is exact in binary, so sqrt(area * scale) is 224.0)."""
    s = (crop / side) ** 2
    return (s, s)


def image_pipeline(kind: str, args) -> list:
    """The image field's decoder and transforms for pipeline `kind` (see PIPELINES)."""
    import numpy as np
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    size = (args.size, args.size)
    if kind == "paperop":
        augment = paper_augment_class()(np.load(args.mean_image), np.load(args.lighting), crop=args.size)
        return [SimpleRGBImageDecoder(), augment, ToTensor()]
    mean, std = np.load(args.mean).astype(np.float64), np.load(args.std).astype(np.float64)
    if kind == "rrc-op":
        return [RandomResizedCropRGBImageDecoder(size), flip_normalize_class()(mean, std), ToTensor()]
    if kind == "own":
        decoder = RandomResizedCropRGBImageDecoder(size, scale=fixed_window_scale(args.size, args.side), ratio=(1, 1))
    elif kind == "rrc-own":
        decoder = RandomResizedCropRGBImageDecoder(size)
    else:
        raise ValueError(f"unknown pipeline {kind!r} (known: {', '.join(PIPELINES)})")
    return [decoder, RandomHorizontalFlip(), NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]


def loader(path: str, image_pipeline: list, *, batch: int, workers: int):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    return Loader(path, batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, drop_last=True,
                  os_cache=True, pipelines={"image": image_pipeline, "label": [IntDecoder(), ToTensor()]})


def time_epoch(ld, skip: int) -> dict:
    """One whole epoch of `ld`: the first `skip` batches (start-up, the queue filling)
    untimed, the rest timed; the same rule as loader_throughput.time_epoch."""
    t0 = time.perf_counter()
    batches = iter(ld)
    for _ in range(skip):
        next(batches)
    t1 = time.perf_counter()
    images = count = 0
    x = None
    for x, _ in batches:
        images += x.shape[0]
        count += 1
    out = {"seconds": time.perf_counter() - t1, "images": images, "batches": count, "untimed_s": t1 - t0}
    if x is not None:  # what the trainer is handed
        out["shape"], out["dtype"] = list(x.shape), str(x.dtype)
        out["contiguous"] = x.is_contiguous()
    return out


def serve(specs: dict, args) -> None:
    """specs: NAME -> (pipeline kind, .beton path)."""
    loaders = {name: loader(path, image_pipeline(kind, args), batch=args.batch, workers=args.workers)
               for name, (kind, path) in specs.items()}
    say({"ready": {name: {"pipeline": kind, "batches_per_epoch": len(loaders[name])}
                   for name, (kind, _) in specs.items()}})
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        name, skip = words[1], int(words[2])
        say(time_epoch(loaders[name], skip))


def parse_specs(items: list[str]) -> dict:
    """["NAME=KIND:PATH", ...] -> {NAME: (KIND, PATH)}."""
    specs = {}
    for item in items:
        name, _, rest = item.partition("=")
        kind, _, path = rest.partition(":")
        if not name or kind not in PIPELINES or not path:
            raise SystemExit(f"ffcv_side.py serve: {item!r} is not NAME=KIND:PATH with KIND one of "
                             f"{', '.join(PIPELINES)}")
        specs[name] = (kind, path)
    return specs


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("version")
    wf = sub.add_parser("write-files")
    wf.add_argument("items")
    wf.add_argument("out")
    wa = sub.add_parser("write-array")
    wa.add_argument("pixels")
    wa.add_argument("labels")
    wa.add_argument("out")
    for p in (wf, wa):
        p.add_argument("--workers", type=int, default=1)
        p.add_argument("--mode", default="jpg", choices=["jpg", "raw"])
        p.add_argument("--max-resolution", type=int, default=None)
        p.add_argument("--quality", type=int, default=95)
    sv = sub.add_parser("serve")
    sv.add_argument("--mean", help="own, rrc-own, rrc-op: the channel mean (3,), 0-255")
    sv.add_argument("--std", help="own, rrc-own, rrc-op: the channel std (3,), 0-255")
    sv.add_argument("--mean-image", help="paperop: the mean image (S, S, 3)")
    sv.add_argument("--lighting", help="paperop: eigvecs * sqrt(eigvals), (3, 3)")
    sv.add_argument("--size", type=int, default=224, help="the output size")
    sv.add_argument("--side", type=int, default=256, help="own: the stored images' side")
    sv.add_argument("--batch", type=int, required=True)
    sv.add_argument("--workers", type=int, required=True)
    sv.add_argument("betons", nargs="+", help="NAME=KIND:PATH, KIND one of PIPELINES")
    args = parser.parse_args(argv)
    if args.cmd == "version":
        from importlib.metadata import version

        import ffcv  # noqa: F401 - imports, or this fails

        # ffcv.__version__ is stale in its releases (1.0.2 says 0.0.3rc1): the distribution's.
        say({name: version(name) for name in ("ffcv", "numba", "numpy", "pillow", "opencv-python-headless", "torch")})
    elif args.cmd == "write-files":
        items = json.loads(open(args.items).read())
        say(write(ImageFiles(items), args.out, workers=args.workers, mode=args.mode,
                  max_resolution=args.max_resolution, quality=args.quality))
    elif args.cmd == "write-array":
        import numpy as np

        data = PixelArray(np.load(args.pixels, mmap_mode="r"), np.load(args.labels))
        say(write(data, args.out, workers=args.workers, mode=args.mode, max_resolution=args.max_resolution,
                  quality=args.quality))
    else:
        serve(parse_specs(args.betons), args)


if __name__ == "__main__":
    main(sys.argv[1:])
