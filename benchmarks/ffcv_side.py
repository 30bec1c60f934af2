"""FFCV's side of prep_throughput and loader_throughput, run in FFCV's own environment.

    benchmarks/.ffcv-venv/bin/python benchmarks/ffcv_side.py version
    ... ffcv_side.py write-files LIST.json OUT.beton --workers 1      # prep: source JPEGs -> .beton
    ... ffcv_side.py write-array PIXELS.npy LABELS.npy OUT.beton --mode jpg|raw
    ... ffcv_side.py serve --mean MEAN.npy --lighting L.npy --batch 64 --workers 2 NAME=X.beton ...
    ... ffcv_side.py serve --recipe rrc --mean MEAN.npy --std STD.npy --batch 64 --workers 2 NAME=X.beton

Needs only numpy, PIL, torch and ffcv (made by `make ffcv-env`, never in .venv): FFCV
pins its own numba and builds against system OpenCV and libturbojpeg. Everything prints
one JSON line per answer on stdout.

`serve` builds one `ffcv.loader.Loader` per .beton (OrderOption.RANDOM, FFCV's JPEG
decoder `SimpleRGBImageDecoder`, then `PaperAugment` below, then ToTensor), warms each up,
then answers `run NAME BATCHES SKIP` lines from stdin (SKIP untimed batches, then BATCHES
timed ones) so that the calling benchmark can alternate FFCV with its in-process
contenders under the same idle-machine rule. `--recipe rrc`: FFCV's own
`RandomResizedCropRGBImageDecoder((size, size))` (torchvision's scale and ratio; OpenCV's
INTER_AREA resize) instead, then `FlipNormalize` below.
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


def loader(path: str, *, batch: int, workers: int, augment, decoder=None):
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    return Loader(path, batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, drop_last=True,
                  os_cache=True, pipelines={"image": [decoder or SimpleRGBImageDecoder(), augment, ToTensor()],
                                            "label": [IntDecoder(), ToTensor()]})


def pipeline_parts(args) -> tuple:
    """(decoder, augment) of a .beton's pipeline: the paper's (SimpleRGBImageDecoder,
    PaperAugment) or RandomResizedCrop's (FFCV's RRC decoder, FlipNormalize)."""
    import numpy as np

    if args.recipe == "rrc":
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder

        return (RandomResizedCropRGBImageDecoder((args.size, args.size)),
                flip_normalize_class()(np.load(args.mean), np.load(args.std)))
    return None, paper_augment_class()(np.load(args.mean), np.load(args.lighting))


def serve(betons: dict, args) -> None:
    batch, workers = args.batch, args.workers
    streams = {}
    for name, path in betons.items():
        decoder, augment = pipeline_parts(args)
        ld = loader(path, batch=batch, workers=workers, augment=augment, decoder=decoder)

        def forever(ld=ld):
            while True:
                yield from ld

        streams[name] = forever()
    shapes = {}
    for name, stream in streams.items():  # warm-up: numba compiles, threads start, page cache
        t = time.perf_counter()
        for _ in range(4):
            x, y = next(stream)
        shapes[name] = {"images": list(x.shape), "dtype": str(x.dtype), "labels": list(y.shape),
                        "warmup_s": time.perf_counter() - t}
    say({"ready": shapes})
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        name, batches, skip = words[1], int(words[2]), int(words[3])
        stream = streams[name]
        for _ in range(skip):
            next(stream)
        t = time.perf_counter()
        images = 0
        for _ in range(batches):
            x, _ = next(stream)
            images += x.shape[0]
        say({"seconds": time.perf_counter() - t, "images": images})


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
    sv.add_argument("--recipe", choices=["paper", "rrc"], default="paper")
    sv.add_argument("--mean", required=True, help="paper: the mean image (S, S, 3); rrc: the channel mean (3,)")
    sv.add_argument("--lighting", help="paper: eigvecs * sqrt(eigvals), (3, 3)")
    sv.add_argument("--std", help="rrc: the channel std (3,)")
    sv.add_argument("--size", type=int, default=224, help="rrc: the output size")
    sv.add_argument("--batch", type=int, required=True)
    sv.add_argument("--workers", type=int, required=True)
    sv.add_argument("betons", nargs="+", help="NAME=PATH")
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
        serve(dict(b.split("=", 1) for b in args.betons), args)


if __name__ == "__main__":
    main(sys.argv[1:])
