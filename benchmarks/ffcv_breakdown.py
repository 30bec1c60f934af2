"""FFCV's side of loader_breakdown: where FFCV's own pipeline spends its time, per image,
run in FFCV's environment (it imports nothing of alexprep).

    benchmarks/.ffcv-venv/bin/python benchmarks/ffcv_breakdown.py --mean MEAN.npy --std STD.npy \\
        --batch 64 --epochs 2 JPEG.beton [--raw RAW.beton]

The pipeline FFCV's users run for a fixed 224-of-256 window:
`RandomResizedCropRGBImageDecoder((224, 224), scale=(s, s), ratio=(1, 1))`, s = (224/256)^2,
then `RandomHorizontalFlip()`, `NormalizeImage(mean, std, float32)`, `ToTensor()`,
`ToTorchImage()`, one thread (`num_workers=1`), `OrderOption.RANDOM`. It is timed as a
series of Loaders, each adding one stage to the last (the first loads only the labels:
the Loader's own per-batch work), so that each stage's cost is its increment. The
decoder's decode is split from its crop + resize by timing `ffcv.libffcv.imdecode` alone
on the same JPEG bytes, read from the .beton.

Each Loader is built and warmed up (numba compiles it) once; then every `run` line on
stdin times one repeat of all of them and prints one JSON line: CPU µs per image
(`time.process_time`, every thread of the process: "µs of one core") and wall µs per
image, over `--epochs` whole epochs. `quit` ends it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

CROP, SIZE = 224, 256
SCALE = (CROP / SIZE) ** 2  # the fixed 224-of-256 window's area share: a random position, no resize


def say(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def stages(mean, std) -> list[tuple[str, list]]:
    """(name, the image pipeline) of each Loader: one more of FFCV's stages each time; the
    first loads no image."""
    import numpy as np
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    def decoder():
        return RandomResizedCropRGBImageDecoder((CROP, CROP), scale=(SCALE, SCALE), ratio=(1.0, 1.0))

    full = [decoder, RandomHorizontalFlip, lambda: NormalizeImage(mean, std, np.float32), ToTensor, ToTorchImage]
    names = ["decoder", "flip", "normalize", "to_tensor", "to_torch_image"]
    return [("labels_only", None)] + [(names[k], [make() for make in full[:k + 1]]) for k in range(len(full))]


def make_loader(path: str, image_pipeline, batch: int):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    return Loader(path, batch_size=batch, num_workers=1, order=OrderOption.RANDOM, drop_last=True, os_cache=True,
                  pipelines={"image": image_pipeline, "label": [IntDecoder(), ToTensor()]})


def timed_epochs(loader, epochs: int) -> dict:
    """CPU and wall µs per image over `epochs` whole epochs."""
    images = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(epochs):
        for batch in loader:  # (images, labels), or (labels,) where no image is loaded
            images += len(batch[-1])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_us": 1e6 * cpu / images, "wall_us": 1e6 * wall / images, "images": images}


def jpeg_bytes(path: str) -> list:
    """Each sample's encoded image, as the decoder reads it from the .beton (a view of
    the file's memory map)."""
    import numpy as np
    from ffcv.reader import Reader

    reader = Reader(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    size_at = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    meta = reader.metadata[f"f{reader.field_names.index('image')}"]  # fields are stored as f0, f1, ...
    return [(data[int(p):int(p) + size_at[int(p)]], int(h), int(w))
            for p, h, w in zip(meta["data_ptr"], meta["height"], meta["width"])]


def imdecode_alone(encoded: list) -> dict:
    """CPU µs per image of FFCV's `imdecode` (libjpeg-turbo through libffcv) on each image's
    bytes, whole, into one buffer: the decode inside the RRC decoder."""
    import numpy as np
    from ffcv.libffcv import imdecode

    out = np.empty(max(h * w * 3 for _, h, w in encoded), np.uint8)
    cpu, wall = time.process_time(), time.perf_counter()
    for data, h, w in encoded:
        imdecode(data, out, h, w, h, w, 0, 0, 1, 1, False, False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_us": 1e6 * cpu / len(encoded), "wall_us": 1e6 * wall / len(encoded), "images": len(encoded)}


def main(argv: list[str]) -> None:
    import numpy as np
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mean", required=True, help="the channel mean (3,), 0-255")
    parser.add_argument("--std", required=True, help="the channel std (3,), 0-255")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="whole epochs timed per stage per repeat")
    parser.add_argument("--raw", help="a raw .beton of the same pixels: the whole pipeline on it too")
    parser.add_argument("beton", help="the JPEG .beton")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core: FFCV's numba threads are num_workers=1 already
    mean, std = np.load(args.mean).astype(np.float32), np.load(args.std).astype(np.float32)
    loaders = {name: make_loader(args.beton, pipe, args.batch) for name, pipe in stages(mean, std)}
    if args.raw:
        loaders["raw_whole"] = make_loader(args.raw, stages(mean, std)[-1][1], args.batch)
    ready = {}
    for name, loader in loaders.items():  # numba compiles each pipeline in its first epoch
        t = time.perf_counter()
        for batch in loader:
            pass
        x = batch[0]
        ready[name] = {"warmup_s": time.perf_counter() - t, "out": [list(x.shape), str(x.dtype)]}
    encoded = jpeg_bytes(args.beton)
    imdecode_alone(encoded)
    say({"ready": ready})
    for line in sys.stdin:
        if line.split()[:1] != ["run"]:
            break
        result = {name: timed_epochs(loader, args.epochs) for name, loader in loaders.items()}
        result["imdecode"] = imdecode_alone(encoded)
        say(result)


if __name__ == "__main__":
    main(sys.argv[1:])
