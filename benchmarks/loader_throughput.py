"""Training-loader throughput, images/s: our loaders against FFCV as its users run it, and
every contender doing the paper's work per image.

    .venv/bin/python -m benchmarks.loader_throughput --quick          # ~4 min on 2 cores
    .venv/bin/python -m benchmarks.loader_throughput --device cuda    # the same on a GPU (FFCV: CPU only)
    .venv/bin/python -m benchmarks.loader_throughput --quick --recipe rrc   # RandomResizedCrop

Per image, for our loaders and the user loops: a 224x224 crop at one of 33x33 offsets of
the 256x256 image, a flip with p = 0.5, the mean image's window subtracted, PCA lighting
added; batches of float32 contiguous NCHW tensors (on the GPU with --device cuda).
Contenders (CONTENDERS says exactly what each runs; it goes into each result's "note"):

- dali-arrow: `train_loader(backend="dali")` over our JPEG Arrow shards (on the CPU DALI
  decodes each crop window and the host renders in one C++ pass); dali-arrow-operators
  (CPU): the same rendered by DALI's operators, the path before issue 29;
  dali-arrow-whole-decode (CPU): decoding whole images; dali-arrow-roi-decode (GPU): the
  same decoding only the crop window (why it is not the default);
  dali-arrow-raw: over `--encoding raw` shards (no decoding at all; 4x the disk);
- dali-files: DALI's `readers.file` over the same 256x256 JPEGs (the shards' very bytes)
  as files, rendered as dali-arrow renders (on the CPU: DALI decodes, the host renders);
- torch-twin: `train_loader(backend="torch")`, decoding in DataLoader workers (OpenCV's
  libjpeg-turbo, PIL's pixels); torch-twin-numpy (CPU): the same rendering in numpy,
  torch-twin-pil-decode (CPU): decoding with PIL, the paths before issue 29;
- imagefolder-original: what users write today, a torchvision-style ImageFolder in a
  DataLoader over the original JPEGs (decode, resize shorter side to 256, centre crop,
  random crop, flip, mean image, lighting), per-sample numpy in the workers;
- imagefolder-256: the same code over the 256x256 JPEG files (the loader alone);
- webdataset: tar shards of the 256x256 JPEGs through webdataset, if it installs
  (`pip install --target /tmp/benchdeps webdataset`; found there when present);
- ffcv-jpeg, ffcv-raw: FFCV's `Loader` as its users run it, FFCV's classes only
  (ffcv_side.PIPELINES["own"]): `RandomResizedCropRGBImageDecoder((224, 224),
  scale=((224/256)^2,)*2, ratio=(1, 1))` (a fixed 224-of-256 window at a random
  position), `RandomHorizontalFlip`, `NormalizeImage` (the build's channel mean and std),
  `ToTensor`, `ToTorchImage` (an NCHW-shaped channels_last view, not contiguous NCHW as
  ours); no mean image and no lighting: less work per image than the paper's recipe ours do;
- ffcv-paperop-jpeg, ffcv-paperop-raw: the same work per image as ours, FFCV's
  `SimpleRGBImageDecoder` then `PaperAugment` (a numba Operation of ours, ffcv_side.py);
  FFCV's contenders read the same 256x256 pixels written to .beton files (JPEG q95, and
  raw), in FFCV's own venv (`make ffcv-env`), served by one subprocess that this one
  drives epoch by epoch; where that venv cannot be made, the reason is recorded. CPU only.

`--recipe rrc` (writes loader_throughput_rrc.json): torchvision's RandomResizedCrop(224)
recipe on a keep-aspect build of the same corpus (shorter side 256, longer at most 512),
a flip with p = 0.5, channel mean and std, float32 NCHW, no lighting. Contenders:

- rrc-dali, rrc-torch: `train_loader(recipe="rrc")` over the JPEG keep-aspect shards,
  backend "dali" (CPU: DALI decodes each window, the host resizes it with PIL and renders
  it) and "torch" (PIL in DataLoader workers); rrc-dali-operators: DALI's `fn.resize` and
  crop_mirror_normalize instead, the path before issue 29;
- rrc-imagefolder-pil: the stored images as JPEG files in class folders, an ImageFolder
  in a DataLoader whose transform is torchvision's RandomResizedCrop + RandomHorizontalFlip
  + ToTensor + Normalize written with PIL, numpy and `random` (`PilRandomResizedCrop`:
  torchvision does not import next to the CPU torch pin, in .venv or FFCV's venv);
- rrc-ffcv-jpeg: FFCV's own rrc pipeline, `RandomResizedCropRGBImageDecoder((224, 224))`
  with its defaults, `RandomHorizontalFlip`, `NormalizeImage`, `ToTensor`, `ToTorchImage`;
  rrc-ffcv-op-jpeg: the same decoder, then a flip-and-normalise Operation of ours giving
  contiguous CHW; over a .beton written from those files (JPEG q95).

What is timed, and why: epochs, as users run loaders. The corpus (--images) is one epoch;
each contender exposes "give me one epoch" (`iter(loader)` for ours, FFCV's and the
DataLoaders; ours continue their one endless stream, prefetching across the epoch
boundary, which is how the trainer runs them). The contenders alternate epoch by epoch in
this one process (FFCV through its server), the order reversed every round so that drift
hits everyone alike; before each epoch the machine is let go idle (the others' workers
stop). In each epoch the first `skip` = max(2, 2 x workers) batches are not timed, for
every contender alike: they hold start-up (FFCV starts its threads each epoch, a
DataLoader its workers' first batches) and the prefetch queue a loader comes back with
(the deepest here: a DataLoader's 2 x workers), neither of which is the loader's rate;
the rest of the epoch is timed to its end. Epoch 1 of each contender is dropped (numba
compiling, workers starting, page cache) and recorded as `first_epoch_dropped`; at least
five timed epochs follow (--epochs: 6 quick, 10 full). Short epochs made FFCV alternate
between ~1,300 and ~2,400 images/s (issue 29), so the epoch is long: 4,096 images at batch
64 quick (60 timed batches on 2 cores), 8,192 at batch 128 full. Reported per contender:
median images/s of the timed epochs and their spread (min, max, IQR); each ratio per round
(both contenders' epochs of the same round) with its spread. Writes loader_throughput.json
and .png into --out (benchmarks/out/; --publish: also benchmarks/results/).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import common, ffcv_side

BENCHDEPS = Path("/tmp/benchdeps")  # where optional contenders are pip-installed with --target


# ---------------------------------------------------------------------------- data
def prepare(work: Path, n: int, workers: int) -> dict:
    """The corpus, its shard builds and statistics, and the same images as files and tars."""
    from alexprep.imagenet_prep.shards import read_split

    t0 = time.perf_counter()
    prepared = common.prepared_build(work, n, encodings=("jpeg", "raw"), shard_size=128, workers=workers)
    builds, src = prepared["builds"], prepared["src"]
    # The JPEG shards' bytes, as files (class folders) and as webdataset tars.
    files = work / "files256" / "train"
    tars = work / "tars"
    tars.mkdir(parents=True)
    records = write_shard_files(read_split(builds["jpeg"], "train"), files)
    tar_count = 8  # >= workers, so that every worker gets shards
    for t in range(tar_count):
        with tarfile.open(tars / f"train-{t:04d}.tar", "w") as tar:
            for stem, data, label in records[t::tar_count]:
                for suffix, payload in ((".jpg", data), (".cls", str(label).encode())):
                    info = tarfile.TarInfo(stem + suffix)
                    info.size, info.mode, info.mtime = len(payload), 0o444, 0
                    tar.addfile(info, io.BytesIO(payload))
    stats = prepared["stats"]
    return {"src": src, "builds": builds, "files": files, "tars": sorted(tars.glob("*.tar")),
            "stats": stats, "seconds": time.perf_counter() - t0, "images": len(records)}


def write_shard_files(index, files: Path) -> list[tuple[str, bytes, int]]:
    """Each image of a JPEG split as files/<wnid>/<stem>.jpg (the shards' very bytes);
    returns (stem, bytes, label) per image."""
    from alexprep.imagenet_prep.shards import image_bytes_column, open_shard

    records = []
    for shard in index.shards:
        table = open_shard(index, shard)
        images = image_bytes_column(table).to_pylist()
        for data, label, wnid, key in zip(images, table.column("label").to_pylist(),
                                          table.column("wnid").to_pylist(), table.column("key").to_pylist()):
            path = files / wnid / (Path(key).stem + ".jpg")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            records.append((Path(key).stem, data, label))
    return records


def prepare_rrc(work: Path, n: int, workers: int) -> dict:
    """The corpus as a keep-aspect JPEG build with statistics, and its images as files."""
    from alexprep.imagenet_prep.shards import read_split

    t0 = time.perf_counter()
    prepared = common.prepared_build(work, n, encodings=("jpeg",), shard_size=128, workers=workers,
                                     resize="keep-aspect")
    files = work / "files-keep" / "train"
    records = write_shard_files(read_split(prepared["builds"]["jpeg"], "train"), files)
    return {"src": prepared["src"], "builds": prepared["builds"], "files": files, "stats": prepared["stats"],
            "seconds": time.perf_counter() - t0, "images": len(records)}


# ---------------------------------------------------------------------------- a user's loop
class UserAugment:
    """The per-sample augmentation as users write it with PIL and numpy (torchvision-style):
    what every non-pipeline contender runs in its DataLoader workers."""

    def __init__(self, stats, resize: bool):
        self.mean = np.asarray(stats.mean_image, np.float32)
        self.scale = np.sqrt(np.clip(stats.eigvals, 0, None)) * stats.eigvecs  # column i scaled by sqrt(lambda_i)
        self.resize = resize

    def __call__(self, img):
        from PIL import Image

        img = img.convert("RGB")
        if self.resize:  # Resize(256) then CenterCrop(256)
            w, h = img.size
            s = 256 / min(w, h)
            img = img.resize((max(256, round(w * s)), max(256, round(h * s))), Image.Resampling.BILINEAR)
            w, h = img.size
            left, top = (w - 256) // 2, (h - 256) // 2
            img = img.crop((left, top, left + 256, top + 256))
        rng = np.random.default_rng()
        ox, oy = rng.integers(0, 33, 2)  # RandomCrop(224): 33 positions per axis
        x = np.asarray(img, np.float32)[oy:oy + 224, ox:ox + 224] - self.mean[oy:oy + 224, ox:ox + 224]
        if rng.random() < 0.5:
            x = x[:, ::-1]
        x = x + (self.scale @ rng.normal(0, 0.1, 3)).astype(np.float32)
        import torch

        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def torchvision_rrc_params(width: int, height: int, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params with Python's `random`: (x, y, w, h)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class PilRandomResizedCrop:
    """RandomResizedCrop(224) + RandomHorizontalFlip() + ToTensor() + Normalize(mean, std)
    as torchvision does them on PIL images (crop, bilinear resize, flip), in PIL and numpy:
    what an ImageFolder user's transform does per sample, on 0-255 pixels as ours."""

    def __init__(self, stats, size: int = 224):
        self.mean = np.asarray(stats.channel_mean, np.float32)
        self.inv_std = (1 / np.asarray(stats.channel_std, np.float32)).astype(np.float32)
        self.size = size

    def __call__(self, img):
        import random

        import torch
        from PIL import Image

        img = img.convert("RGB")
        x, y, w, h = torchvision_rrc_params(img.width, img.height, random)
        img = img.crop((x, y, x + w, y + h)).resize((self.size, self.size), Image.Resampling.BILINEAR)
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = (np.asarray(img, np.float32) - self.mean) * self.inv_std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class ImageFolder:
    """torchvision.datasets.ImageFolder's behaviour: sorted class folders, PIL loader."""

    def __init__(self, root: Path, transform):
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.samples = [(p, i) for i, c in enumerate(classes) for p in sorted((root / c).iterdir())]
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
        return self.transform(img), label


# ---------------------------------------------------------------------------- contenders
# A contender is a function of no arguments that returns one epoch's iterator of (images,
# labels) batches: `iter(loader)` for our loaders, FFCV's and the DataLoaders, as their
# users run them (ours continue one endless stream across epochs; a DataLoader's persistent
# workers and FFCV's Loader start each epoch afresh).
def to_device(batches, device):
    for x, y in batches:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def user_loader(dataset, batch: int, workers: int, device: str):
    """A user's DataLoader over a map-style dataset (persistent workers), moved to the device."""
    from torch.utils.data import DataLoader

    dl = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                    persistent_workers=workers > 0, pin_memory=device == "cuda", prefetch_factor=2 if workers else None)
    return lambda: to_device(iter(dl), "cuda:0" if device == "cuda" else "cpu")


@contextlib.contextmanager
def switched(module, name: str, value):
    """module.name = value for the block (a switch read when a loader is built)."""
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


@contextlib.contextmanager
def env_set(name: str, value: str):
    """os.environ[name] = value for the block."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def start_workers(loader, setting) -> None:
    """Start the torch loader's workers now, inside `setting` (a context manager: what they
    inherit when they fork, or read where they work), so that they run the path before
    issue 29. The batch taken here belongs to an epoch the benchmark restarts."""
    with setting:
        next(iter(loader))


def rrc_contenders(data: dict, device: str, batch: int, workers: int, notes: dict) -> dict:
    """--recipe rrc: ours (DALI and torch backends), and the ImageFolder loop."""
    from alexprep.imagenet_prep import loaders

    made = {}
    build = data["builds"]["jpeg"]
    runs = [("rrc-dali", "dali", True), ("rrc-dali-operators", "dali", False), ("rrc-torch", "torch", True)]
    for name, backend, host_render in runs[:1] + runs[1:2] * (device == "cpu") + runs[2:]:
        if backend == "dali" and importlib.util.find_spec("nvidia.dali") is None:
            notes["dali"] = "nvidia.dali does not import here: rrc-dali skipped"
            continue
        from alexprep.imagenet_prep import dali_backend

        with switched(dali_backend, "HOST_RENDER", host_render):  # read when the pipeline is built
            loader = loaders.train_loader(build, batch_size=batch, device="cuda:0" if device == "cuda" else "cpu",
                                          seed=0, backend=backend, workers=workers, recipe="rrc")
        made[name] = loader.__iter__
    made["rrc-imagefolder-pil"] = user_loader(ImageFolder(data["files"], PilRandomResizedCrop(data["stats"])),
                                              batch, workers, device)
    return made


def contenders(data: dict, device: str, batch: int, workers: int, notes: dict) -> dict:
    from alexprep.imagenet_prep import loaders, transform

    made = {}
    torch_device = "cuda:0" if device == "cuda" else "cpu"
    have_dali = importlib.util.find_spec("nvidia.dali") is not None

    def ours(name, build, backend, **kw):
        loader = loaders.train_loader(build, batch_size=batch, device=torch_device, seed=0, backend=backend,
                                      workers=workers, **kw)
        made[name] = loader.__iter__
        return loader

    if have_dali:
        from alexprep.imagenet_prep import dali_backend

        ours("dali-arrow", data["builds"]["jpeg"], "dali")
        if device == "cpu":  # the same, rendered by DALI's operators (before issue 29): read at build
            with switched(dali_backend, "HOST_RENDER", False):
                ours("dali-arrow-operators", data["builds"]["jpeg"], "dali")
            with switched(dali_backend, "WINDOW_DECODE", False):
                ours("dali-arrow-whole-decode", data["builds"]["jpeg"], "dali")
        else:
            with switched(dali_backend, "ROI_DECODE", not dali_backend.ROI_DECODE):
                ours("dali-arrow-full-decode" if not dali_backend.ROI_DECODE else "dali-arrow-roi-decode",
                     data["builds"]["jpeg"], "dali")
        ours("dali-arrow-raw", data["builds"]["raw"], "dali")
        made["dali-files"] = dali_files(data, torch_device, batch, workers, data["images"] // batch)
    else:
        notes["dali"] = "nvidia.dali does not import here: DALI contenders skipped"
    ours("torch-twin", data["builds"]["jpeg"], "torch")
    if device == "cpu":
        # ALEXPREP_CPU_KERNEL is read where the workers render; OPENCV_DECODE where they decode.
        start_workers(ours("torch-twin-numpy", data["builds"]["jpeg"], "torch"), env_set("ALEXPREP_CPU_KERNEL", "0"))
        start_workers(ours("torch-twin-pil-decode", data["builds"]["jpeg"], "torch"),
                      switched(transform, "OPENCV_DECODE", False))
    for name, folder in (("imagefolder-original", data["src"]), ("imagefolder-256", data["files"])):
        made[name] = user_loader(ImageFolder(folder, UserAugment(data["stats"], resize=True)), batch, workers, device)

    wds = _optional("webdataset")
    if wds is None:
        notes["webdataset"] = f"webdataset is not installed (pip install --target {BENCHDEPS} webdataset)"
    else:
        notes["webdataset"] = f"webdataset {getattr(wds, '__version__', '?')} from {Path(wds.__file__).parent.parent}"
        augment = UserAugment(data["stats"], resize=True)
        ds = (wds.WebDataset([str(t) for t in data["tars"]], shardshuffle=len(data["tars"]), empty_check=False)
              .shuffle(1000).decode("pil").to_tuple("jpg", "cls").map_tuple(augment, int).batched(batch, partial=False))
        dl = wds.WebLoader(ds, batch_size=None, num_workers=workers, persistent_workers=True,
                           pin_memory=device == "cuda", prefetch_factor=2)
        made["webdataset"] = lambda: to_device(iter(dl), torch_device)
    return made


def _files_pipeline(files: Path, batch: int, workers: int, gpu: bool, host: bool, windows_drawn, draws, mean):
    """dali_files' pipeline, built: DALI's file reader, then each crop window decoded alone
    (host rendering, fed `windows_drawn`) or DALI's whole image_graph (fed `draws`)."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    from alexprep.imagenet_prep import dali_backend

    pipe = Pipeline(batch_size=batch, num_threads=workers, device_id=0 if gpu else None, prefetch_queue_depth=2)
    with pipe:
        jpegs, labels = fn.readers.file(file_root=str(files), random_shuffle=True, initial_fill=1024, name="reader")
        if host:  # as DaliBackend: each crop window decoded alone, the draws kept for the host's render
            anchor, shape = fn.external_source(source=windows_drawn, num_outputs=2, batch=True,
                                               dtype=[types.FLOAT, types.FLOAT])
            images = dali_backend.window_graph(jpegs, encoding="jpeg", anchor=anchor, shape=shape)
        else:
            pos_x, pos_y, mirror, cmn = fn.external_source(source=draws, num_outputs=4, batch=True,
                                                           dtype=[types.FLOAT, types.FLOAT, types.INT32, types.FLOAT])
            images = dali_backend.image_graph(jpegs, encoding="jpeg", size=256, crop=224, gpu=gpu, mean_image=mean,
                                              windows=[(pos_x, pos_y, mirror)], cmn_mean=cmn, std=[1.0, 1.0, 1.0],
                                              roi=dali_backend.ROI_DECODE)
        pipe.set_outputs(images, labels)
    pipe.build()
    return pipe


def _dali_to_torch(out, shared: bool, torch_device: str):
    """A DALI float batch as a torch tensor: zero-copy where DALI lends its buffer (as our
    DALI backend does), else copied with DALI's feed_ndarray."""
    import torch
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = out.as_tensor()
    if shared:
        with torch.device(torch_device):
            return torch.from_dlpack(dense)
    x = torch.empty(dense.shape(), dtype=torch.float32, device=torch_device)
    feed_ndarray(dense, x, cuda_stream=torch.cuda.current_stream() if torch_device.startswith("cuda") else None)
    return x


def dali_files(data: dict, torch_device: str, batch: int, workers: int, per_epoch: int):
    """DALI's file reader over the 256x256 JPEGs, rendered as our DALI backend renders (on
    the CPU: DALI decodes each crop window, the host renders with `render.render_into` into a ring of three
    batches; on the GPU, or without the C++ renderer: `dali_backend.image_graph`), the
    draws from augment.draw; an epoch is `per_epoch` batches of its one endless stream (the
    reader's own epochs are not exposed by `pipe.run()`)."""
    import torch

    from alexprep.imagenet_prep import augment, dali_backend, render
    from alexprep.imagenet_prep.batch_slots import BatchSlots

    stats = data["stats"]
    mean = np.asarray(stats.mean_image, np.float32)
    gpu = torch_device.startswith("cuda")
    host = not gpu and dali_backend.HOST_RENDER and render.kernel() is not None
    counter = {"i": 0}

    def drawn():
        index = np.arange(counter["i"] * batch, (counter["i"] + 1) * batch)
        counter["i"] += 1
        d = augment.draw(0, 0, index)
        return d, -augment.lighting_shift(d.alpha, stats.eigvals, stats.eigvecs).astype(np.float32)

    fed = collections.deque()  # the draws DALI was given, in order, for the host's render

    def windows_drawn():
        d, cmn = drawn()
        fed.append((d, cmn))
        return (np.stack([d.offset_x, d.offset_y], axis=-1).astype(np.float32), np.full((batch, 2), 224, np.float32))

    def draws():
        d, cmn = drawn()
        return (augment.crop_position(d.offset_x, 33), augment.crop_position(d.offset_y, 33),
                d.flip.astype(np.int32), cmn)

    pipe = _files_pipeline(data["files"], batch, workers, gpu, host, windows_drawn, draws, mean)
    ring = BatchSlots(3, (batch, 1, 3, 224, 224), torch.float32, torch.device("cpu"), shared=False) if host else None
    mean_chw = np.ascontiguousarray(mean.transpose(2, 0, 1))

    def rendered(out) -> torch.Tensor:
        d, cmn = fed.popleft()
        windows = np.zeros((batch, 1, 3), np.int64)
        windows[:, 0, 2] = d.flip
        mean_at = np.stack([d.offset_x, d.offset_y], axis=-1).astype(np.int64)[:, None, :]
        number, _ = ring.take()
        x = ring.batch(number, batch)
        pixels = torch.from_dlpack(out.as_tensor()).numpy() if pipe.exec_dynamic else np.asarray(out.as_tensor())
        render.render_into(x.numpy(), pixels, windows, cmn, mean_chw, None, np.ascontiguousarray(mean_at))
        return x[:, 0]

    def batches():
        for _ in range(per_epoch):
            out, lab = pipe.run()
            x = rendered(out) if host else _dali_to_torch(out, pipe.exec_dynamic, torch_device)
            y = torch.from_numpy(lab.as_array().reshape(-1).astype(np.int64)).to(torch_device)
            yield x, y

    return batches


def _optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    if BENCHDEPS.is_dir() and str(BENCHDEPS) not in sys.path:
        sys.path.append(str(BENCHDEPS))  # appended: the venv's numpy etc. keep precedence
        try:
            return importlib.import_module(name)
        except ImportError:
            return None
    return None


class FfcvServer(common.FfcvChild):
    """FFCV's loaders, in FFCV's venv (benchmarks/ffcv_side.py serve), timed epoch by epoch
    on request so that they alternate with the in-process contenders."""

    def __init__(self, python: Path, specs: dict, options: list[str], batch: int, workers: int):
        """specs: NAME -> (ffcv_side.PIPELINES kind, .beton path); options: the pipelines'
        statistics (`--mean C.npy --std S.npy`, and `--mean-image M.npy --lighting L.npy`
        for "paperop")."""
        super().__init__([str(python), str(common.FFCV_SIDE), "serve", *options, "--batch", str(batch), "--workers",
                          str(workers)] + [f"{name}={kind}:{path}" for name, (kind, path) in specs.items()],
                         "ffcv_side.py serve")

    def runner(self, name: str):
        """run(skip) -> one epoch's timing (time_epoch's dict), measured in FFCV's process."""
        return lambda skip: self.ask(f"epoch {name} {skip}")


def _ffcv_ready(work: Path, device: str, notes: dict):
    """(FFCV's python, its info, a fresh work folder), or (None, None, None) with the reason
    in notes["ffcv"]."""
    if device != "cpu":
        notes["ffcv"] = "CPU only here (FFCV's GPU path needs cupy; not set up)"
        return None, None, None
    python, info = common.ffcv_python()
    if python is None:
        notes["ffcv"] = info["skipped"]
        return None, None, None
    folder = work / "ffcv"
    folder.mkdir()
    return python, info, folder


def _write_beton(python: Path, command: list[str], beton: Path, workers: int, notes: dict) -> dict | None:
    """ffcv_side.py write-files/write-array (JPEG q95 or raw) -> its report, or None with why in notes."""
    got = subprocess.run([str(python), str(common.FFCV_SIDE), *command, str(beton), "--quality", "95",
                          "--workers", str(workers)], capture_output=True, text=True)
    if got.returncode:
        notes["ffcv"] = f"writing {beton.name} failed: {got.stderr.strip()[-500:]}"
        return None
    return json.loads(got.stdout.strip().splitlines()[-1])


def _serve(python: Path, specs: dict, options: list[str], batch: int, workers: int, notes: dict, extra: dict):
    """(FfcvServer, {name: runner}) for `specs`, or (None, {}) with why in notes["ffcv"]."""
    if not specs:
        return None, {}
    try:
        server = FfcvServer(python, specs, options, batch, workers)
    except (RuntimeError, OSError, ValueError) as exc:
        notes["ffcv"] = f"FFCV's loader did not start: {exc}"
        return None, {}
    notes["ffcv"] = {**extra, "ready": server.ready,
                     "loader": "ffcv.loader.Loader(OrderOption.RANDOM, drop_last=True, os_cache=True, "
                               "FFCV's default batches_ahead), one per contender, in one process"}
    return server, {name: server.runner(name) for name in specs}


# name -> (ffcv_side.PIPELINES kind, .beton) of the paper recipe's FFCV contenders.
FFCV_PAPER = {"ffcv-jpeg": ("own", "jpeg"), "ffcv-raw": ("own", "raw"),
              "ffcv-paperop-jpeg": ("paperop", "jpeg"), "ffcv-paperop-raw": ("paperop", "raw")}
FFCV_RRC = {"rrc-ffcv-jpeg": "rrc-own", "rrc-ffcv-op-jpeg": "rrc-op"}


def ffcv_contenders(data: dict, work: Path, device: str, batch: int, workers: int, notes: dict, wanted):
    """(FfcvServer or None, {name: runner}): FFCV's Loader over the same 256x256 pixels
    written as .beton files, JPEG q95 and raw, with FFCV's own pipeline and with ours."""
    names = [n for n in FFCV_PAPER if wanted(n)]
    python, info, folder = _ffcv_ready(work, device, notes) if names else (None, None, None)
    if python is None:
        return None, {}
    from alexprep.imagenet_prep.samples import SplitSamples
    from alexprep.imagenet_prep.shards import read_split

    t0 = time.perf_counter()
    samples = SplitSamples(read_split(data["builds"]["raw"], "train"))  # the exact pixels the JPEG shards encode
    pixels = np.stack([samples.view(i) for i in range(len(samples))]).reshape(len(samples), 256, 256, 3)
    np.save(folder / "pixels.npy", pixels)
    np.save(folder / "labels.npy", samples.labels)
    del pixels
    stats = data["stats"]
    np.save(folder / "mean_image.npy", np.asarray(stats.mean_image, np.float32))
    np.save(folder / "lighting.npy", (stats.eigvecs * np.sqrt(np.clip(stats.eigvals, 0, None))).astype(np.float32))
    np.save(folder / "mean.npy", np.asarray(stats.channel_mean, np.float64))
    np.save(folder / "std.npy", np.asarray(stats.channel_std, np.float64))
    betons, written = {}, {}
    for encoding in sorted({FFCV_PAPER[n][1] for n in names}):
        betons[encoding] = folder / f"{encoding}.beton"
        command = ["write-array", str(folder / "pixels.npy"), str(folder / "labels.npy"), "--mode",
                   {"jpeg": "jpg", "raw": "raw"}[encoding]]
        written[encoding] = _write_beton(python, command, betons[encoding], workers, notes)
        if written[encoding] is None:
            return None, {}
    (folder / "pixels.npy").unlink()
    options = ["--mean", str(folder / "mean.npy"), "--std", str(folder / "std.npy"),
               "--mean-image", str(folder / "mean_image.npy"), "--lighting", str(folder / "lighting.npy")]
    specs = {n: (FFCV_PAPER[n][0], betons[FFCV_PAPER[n][1]]) for n in names}
    extra = {**info, "betons": {k: {"bytes_per_image": v["bytes"] / v["images"]} for k, v in written.items()},
             "set_up_s": time.perf_counter() - t0}
    return _serve(python, specs, options, batch, workers, notes, extra)


def ffcv_rrc_contenders(data: dict, work: Path, device: str, batch: int, workers: int, notes: dict, wanted):
    """--recipe rrc: (FfcvServer or None, {name: runner}): FFCV's RandomResizedCropRGBImageDecoder
    over a .beton of the stored keep-aspect images (JPEG q95), with FFCV's own transforms
    (rrc-ffcv-jpeg) and with our flip-and-normalise Operation (rrc-ffcv-op-jpeg)."""
    names = [n for n in FFCV_RRC if wanted(n)]
    python, info, folder = _ffcv_ready(work, device, notes) if names else (None, None, None)
    if python is None:
        return None, {}
    t0 = time.perf_counter()
    classes = sorted(d.name for d in data["files"].iterdir() if d.is_dir())
    items = [(str(p), i) for i, c in enumerate(classes) for p in sorted((data["files"] / c).iterdir())]
    (folder / "items.json").write_text(json.dumps(items))
    stats = data["stats"]
    np.save(folder / "mean.npy", np.asarray(stats.channel_mean, np.float64))
    np.save(folder / "std.npy", np.asarray(stats.channel_std, np.float64))
    beton = folder / "rrc-jpeg.beton"
    written = _write_beton(python, ["write-files", str(folder / "items.json"), "--mode", "jpg"], beton, workers, notes)
    if written is None:
        return None, {}
    options = ["--mean", str(folder / "mean.npy"), "--std", str(folder / "std.npy")]
    extra = {**info, "bytes_per_image": written["bytes"] / written["images"], "set_up_s": time.perf_counter() - t0}
    return _serve(python, {n: (FFCV_RRC[n], beton) for n in names}, options, batch, workers, notes, extra)


# What each contender runs (its JSON note).
_FFCV = "FFCV 1.0.2 Loader in its own venv (benchmarks/ffcv_side.py), 2 threads: "
CONTENDERS = {
    "paper": {
        "dali-arrow": "train_loader(backend='dali') over our JPEG q95 Arrow shards: the paper's recipe (33x33 crop "
                      "offsets, flip, mean image, PCA lighting), float32 contiguous NCHW",
        "dali-arrow-operators": "dali-arrow rendered by DALI's operators (dali_backend.HOST_RENDER off: subtraction, "
                                "crop_mirror_normalize) instead of the host's C++ pass: the CPU path before issue 29",
        "dali-arrow-whole-decode": "dali-arrow decoding whole images, not only each crop window "
                                   "(dali_backend.WINDOW_DECODE off)",
        "dali-arrow-roi-decode": "dali-arrow decoding only the crop window (dali_backend.ROI_DECODE flipped; GPU)",
        "dali-arrow-full-decode": "dali-arrow decoding whole images (dali_backend.ROI_DECODE flipped; GPU)",
        "dali-arrow-raw": "train_loader(backend='dali') over --encoding raw shards (no decoding)",
        "dali-files": "DALI readers.file over the same 256x256 JPEGs as files, rendered as dali-arrow is (on the CPU "
                      "DALI decodes and the host renders: render.render_into)",
        "torch-twin": "train_loader(backend='torch'): decoding (OpenCV, PIL's pixels) in DataLoader workers, the "
                      "paper's recipe",
        "torch-twin-numpy": "torch-twin rendering in numpy in its workers (ALEXPREP_CPU_KERNEL=0 there) instead of "
                            "the C++ pass: the CPU path before issue 29",
        "torch-twin-pil-decode": "torch-twin decoding with PIL in its workers (transform.OPENCV_DECODE off) instead "
                                 "of OpenCV: the decoding before issue 29",
        "imagefolder-original": "ImageFolder + DataLoader over the original JPEGs: decode, Resize(256), "
                                "CenterCrop(256), the paper's recipe in per-sample numpy (UserAugment)",
        "imagefolder-256": "the same ImageFolder loop over the 256x256 JPEGs as files",
        "webdataset": "webdataset tar shards of the 256x256 JPEGs, UserAugment in WebLoader workers",
        "ffcv-jpeg": _FFCV + "JPEG q95 .beton of the same 256x256 pixels; " + ffcv_side.PIPELINES["own"],
        "ffcv-raw": _FFCV + "raw .beton of the same pixels; " + ffcv_side.PIPELINES["own"],
        "ffcv-paperop-jpeg": _FFCV + "JPEG q95 .beton; " + ffcv_side.PIPELINES["paperop"],
        "ffcv-paperop-raw": _FFCV + "raw .beton; " + ffcv_side.PIPELINES["paperop"],
    },
    "rrc": {
        "rrc-dali": "train_loader(recipe='rrc', backend='dali') over keep-aspect JPEG q95 shards: on the CPU DALI "
                    "decodes each window, the host resizes it (PIL) and renders it",
        "rrc-dali-operators": "rrc-dali with DALI's fn.resize and crop_mirror_normalize (dali_backend.HOST_RENDER "
                              "off): the CPU path before issue 29",
        "rrc-torch": "train_loader(recipe='rrc', backend='torch'): PIL crop and bilinear resize in DataLoader workers",
        "rrc-imagefolder-pil": "ImageFolder + DataLoader, torchvision's RandomResizedCrop + flip + ToTensor + "
                               "Normalize written in PIL/numpy (PilRandomResizedCrop)",
        "rrc-ffcv-jpeg": _FFCV + "JPEG q95 .beton of the stored keep-aspect images; " + ffcv_side.PIPELINES["rrc-own"],
        "rrc-ffcv-op-jpeg": _FFCV + "the same .beton; " + ffcv_side.PIPELINES["rrc-op"],
    },
}


# ---------------------------------------------------------------------------- timing
def _cpu_busy() -> tuple[int, int] | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_idle(limit_s: float = 15.0, threshold: float = 0.1) -> bool:
    """Wait until the other contenders' workers have filled their prefetch queues and
    stopped (CPU use under 10% over 0.2 s), so that they do not steal the timed one's cores.
    False if the machine stayed busy (someone else's work): the run is then flagged."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        a = _cpu_busy()
        time.sleep(0.2)
        b = _cpu_busy()
        if a is None or b is None:
            time.sleep(2.0)  # no /proc/stat: give them a fixed while
            return True
        if b[1] > a[1] and (b[0] - a[0]) / (b[1] - a[1]) < threshold:
            return True
    return False


def time_epoch(make_epoch, skip: int, sync) -> dict:
    """One whole epoch of a contender: its first `skip` batches untimed (start-up, and the
    prefetch queue a loader comes back with: up to 2 batches for DALI, workers x 2 for a
    DataLoader; timing those would measure a queue, not a loader), the rest timed. The
    same rule as ffcv_side.time_epoch, which FFCV's epochs run under."""
    t0 = time.perf_counter()
    batches = iter(make_epoch())
    for _ in range(skip):
        next(batches)
    sync()
    t1 = time.perf_counter()
    images = count = 0
    for x, _ in batches:
        images += x.shape[0]
        count += 1
    sync()
    return {"seconds": time.perf_counter() - t1, "images": images, "batches": count, "untimed_s": t1 - t0}


def machine(device: str) -> dict:
    """benchmarks/common.py's machine report, plus the device and webdataset's version."""
    wds = sys.modules.get("webdataset") or _optional("webdataset")
    return {**common.machine(), "device": device, "platform": platform.platform(),
            "webdataset": getattr(wds, "__version__", None) if wds else None}


def plot(results: dict, path: Path, title: str) -> None:
    names = list(results)
    common.bar_chart(path, names, {"images/s": [results[n]["median"] for n in names]},
                     spread={"images/s": [(results[n]["min"], results[n]["max"]) for n in names]},
                     colors=["tab:green" if n.startswith(("dali-arrow", "torch-twin", "rrc-dali", "rrc-torch")) else
                             "tab:orange" if "ffcv" in n else "tab:gray" for n in names],
                     horizontal=True, value_labels=True, figsize=(9, 0.5 * len(names) + 1.5), title=title,
                     value_axis="images/s (median of the timed epochs; bars: min-max)")


@dataclass(frozen=True)
class Config:
    """The run's sizes, from the flags and their --quick/full defaults."""
    images: int  # the corpus: one epoch
    batch: int
    epochs: int  # per contender, the first dropped
    workers: int
    idle_limit: float  # seconds wait_idle waits before an epoch
    skip: int  # untimed batches at the start of each epoch

    def __post_init__(self):
        if self.epochs < 2:
            raise ValueError(f"--epochs {self.epochs}: at least 2 (the first is dropped; 6 or more to be trusted)")
        if self.images // self.batch < self.skip + 2:
            raise ValueError(f"--images {self.images} is {self.images // self.batch} batches of {self.batch} an "
                             f"epoch; the first {self.skip} are not timed: give at least "
                             f"{(self.skip + 2) * self.batch} images")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4,096 images, batch 64, 6 epochs (~4 min on 2 cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--recipe", choices=["paper", "rrc"], default="paper",
                        help="the paper's crops (default) or RandomResizedCrop on a keep-aspect build")
    parser.add_argument("--images", type=int, help="corpus size, one epoch (default 4096 quick, 8192 full)")
    parser.add_argument("--batch-size", type=int, help="default 64 quick, 128 full")
    parser.add_argument("--epochs", type=int, help="epochs per contender, the first dropped (default 6 quick, 10 full)")
    parser.add_argument("--workers", type=int, help="threads/worker processes for every contender (default: all CPUs)")
    parser.add_argument("--only", help="comma-separated contender names")
    common.add_output_args(parser)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    return parser


def make_config(args) -> Config:
    from alexprep.imagenet_prep.devices import available_cpus

    workers = args.workers or available_cpus()
    return Config(
        images=args.images or (4096 if args.quick else 8192),
        batch=args.batch_size or (64 if args.quick else 128),
        epochs=args.epochs or (6 if args.quick else 10),
        workers=workers,
        # On a machine others keep busy, waiting longer does not make it idle: --quick
        # gives up after 2.5 s (the contenders' own prefetching settles within ~2 s).
        idle_limit=2.5 if args.quick else 15.0,
        skip=max(2, 2 * workers),  # the deepest prefetch queue here: a DataLoader's workers x 2
    )


def local_runners(data: dict, args, cfg: Config, notes: dict, sync, wanted) -> dict:
    """name -> run(skip) -> one epoch's timing, for the contenders in this process."""
    make = rrc_contenders if args.recipe == "rrc" else contenders
    epochs = {k: v for k, v in make(data, args.device, cfg.batch, cfg.workers, notes).items() if wanted(k)}
    return {name: (lambda skip, make_epoch=make_epoch: time_epoch(make_epoch, skip, sync))
            for name, make_epoch in epochs.items()}


def time_rounds(runners: dict, cfg: Config) -> tuple[dict[str, list[dict]], int]:
    """Each contender's epochs, alternated round by round (one epoch of each per round, the
    order reversed every round so that drift hits everyone alike), and how many epochs
    started on a machine that did not go idle."""
    epochs: dict[str, list[dict]] = {name: [] for name in runners}
    names = list(runners)
    busy = 0
    for r in range(cfg.epochs):
        for name in names if r % 2 == 0 else names[::-1]:
            idle = wait_idle(cfg.idle_limit)
            busy += not idle
            epochs[name].append({**runners[name](cfg.skip), "idle_before": idle})
        print(f"  epoch {r + 1}/{cfg.epochs}{' (dropped)' if r == 0 else ''}: "
              + ", ".join(f"{k} {_rate(epochs[k][-1]):.0f}" for k in names), flush=True)
    return epochs, busy


def _rate(epoch: dict) -> float:
    return epoch["images"] / epoch["seconds"]


def summarize(epochs: dict[str, list[dict]], what: dict) -> dict:
    """Per contender: median, min, max and IQR of the timed part's images/s over epochs 2..,
    the epochs themselves, and epoch 1 (dropped: compilation, workers starting, caches)."""
    out = {}
    for name, runs in epochs.items():
        kept = [_rate(e) for e in runs[1:]]
        out[name] = {"median": statistics.median(kept), "min": min(kept), "max": max(kept),
                     "iqr": float(np.subtract(*np.percentile(kept, [75, 25]))), "epochs": kept,
                     "timed_images_per_epoch": statistics.median(e["images"] for e in runs[1:]),
                     "untimed_s": [e["untimed_s"] for e in runs[1:]],
                     "first_epoch_dropped": {**runs[0], "images_per_s": _rate(runs[0])},
                     "note": what.get(name, "")}
    return out


PAIRS = [("dali-arrow", "ffcv-jpeg"), ("torch-twin", "ffcv-jpeg"), ("dali-arrow-raw", "ffcv-raw"),
         ("dali-arrow", "ffcv-paperop-jpeg"), ("dali-arrow-raw", "ffcv-paperop-raw"), ("torch-twin", "ffcv-paperop-jpeg"),
         ("dali-arrow", "dali-files"), ("dali-arrow", "imagefolder-original"), ("dali-arrow", "imagefolder-256"),
         ("rrc-dali", "rrc-ffcv-jpeg"), ("rrc-torch", "rrc-ffcv-jpeg"), ("rrc-dali", "rrc-ffcv-op-jpeg"),
         ("rrc-torch", "rrc-ffcv-op-jpeg"), ("rrc-dali", "rrc-imagefolder-pil"), ("rrc-torch", "rrc-imagefolder-pil"),
         ("dali-arrow", "dali-arrow-operators"), ("dali-arrow", "dali-arrow-whole-decode"),
         ("torch-twin", "torch-twin-numpy"), ("torch-twin", "torch-twin-pil-decode"),
         ("rrc-dali", "rrc-dali-operators")]
# The targets (issue 29) and the older ones: ratio key -> at least.
TARGETS = {"paper": {"dali_arrow_over_ffcv_jpeg": 1.0, "torch_twin_over_ffcv_jpeg": 0.85,
                     "dali_arrow_over_ffcv_paperop_jpeg": 1.0, "dali_arrow_raw_over_ffcv_paperop_raw": 1.0,
                     "dali_arrow_over_dali_files": 1.0, "dali_arrow_over_imagefolder_original": 2.0},
           "rrc": {"rrc_dali_over_rrc_ffcv_jpeg": 1.0}}


def ratios(results: dict) -> tuple[dict, dict]:
    """Ratios of the medians, and the same ratios per epoch (both contenders' epochs of
    the same round) with their spread."""
    checks, spreads = {}, {}
    for a, b in PAIRS:
        if a in results and b in results:
            key = f"{a}_over_{b}".replace("-", "_")
            checks[key] = results[a]["median"] / results[b]["median"]
            spreads[key] = common.ratio_summary(results[a]["epochs"], results[b]["epochs"])
    return checks, spreads


def targets(recipe: str, spreads: dict) -> dict:
    """Each target with the median per-epoch ratio measured (None: a contender did not run)."""
    out = {}
    for key, least in TARGETS[recipe].items():
        got = spreads.get(key, {}).get("median")
        out[key] = {"at_least": least, "measured": got, "met": None if got is None else got >= least}
    return out


AUGMENTATION = {
    "paper": "224 crop of 256 (33x33 offsets), flip 0.5, minus mean image, PCA lighting 0.1 (FFCV's own pipeline: "
             "the crop, flip and channel mean/std only)",
    "rrc": "RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)) of keep-aspect images (shorter side 256, "
           "longer <= 512), flip 0.5, channel mean and std, float32 NCHW, no lighting",
}


def build_report(args, cfg: Config, data: dict, results: dict, notes: dict, busy: int) -> dict:
    checks, spreads = ratios(results)
    return {
        "benchmark": "loader_throughput",
        "unit": "images/s",
        "machine": machine(args.device),
        "config": {"images": data["images"], "batch_size": cfg.batch, "epochs": cfg.epochs,
                   "timed_epochs": cfg.epochs - 1, "untimed_batches_each_epoch": cfg.skip,
                   "workers": cfg.workers, "device": args.device, "quick": args.quick, "recipe": args.recipe,
                   "augmentation": AUGMENTATION[args.recipe],
                   "protocol": "one epoch = the corpus; contenders alternate epoch by epoch in one process, order "
                               "reversed every round; each epoch's first untimed_batches_each_epoch batches untimed, "
                               "the rest timed; epoch 1 of each contender dropped (first_epoch_dropped)"},
        "results": results,
        "ratios": checks,
        "ratios_per_epoch": spreads,
        "targets": targets(args.recipe, spreads),
        "notes": notes | {"epochs_started_on_a_busy_machine": busy, "idle_wait_limit_s": cfg.idle_limit,
                    "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }


def main(argv=None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    try:
        cfg = make_config(args)
    except ValueError as exc:
        parser.error(str(exc))
    common.check_work(parser, args.work)
    started = time.perf_counter()
    only = set(args.only.split(",")) if args.only else None
    if only and only - set(CONTENDERS[args.recipe]):  # before minutes of building
        parser.error(f"--only: no contender {', '.join(sorted(only - set(CONTENDERS[args.recipe])))} in the "
                     f"{args.recipe} recipe (known: {', '.join(CONTENDERS[args.recipe])})")
    wanted = (lambda name: True) if only is None else only.__contains__
    work = args.work or Path(tempfile.mkdtemp(prefix="alexprep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    notes: dict = {}
    server = None
    try:
        print(f"preparing {cfg.images} images in {work} ...", flush=True)
        data = (prepare_rrc if args.recipe == "rrc" else prepare)(work, cfg.images, cfg.workers)
        print(f"  {data['seconds']:.1f} s", flush=True)
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        runners = local_runners(data, args, cfg, notes, sync, wanted)
        ffcv = ffcv_rrc_contenders if args.recipe == "rrc" else ffcv_contenders
        server, remote = ffcv(data, work, args.device, cfg.batch, cfg.workers, notes, wanted)
        runners.update(remote)
        if not runners:
            parser.error(f"--only {args.only}: none of them can run here ({json.dumps(notes)})")
        epochs, busy = time_rounds(runners, cfg)
        results = summarize(epochs, CONTENDERS[args.recipe])
    finally:
        if server is not None:
            server.close()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report = build_report(args, cfg, data, results, notes, busy)
    report["wall_s"] = time.perf_counter() - started  # the whole run: preparing, FFCV's set-up, every epoch
    stem = "loader_throughput" + ("_rrc" if args.recipe == "rrc" else "") + ("_cuda" if args.device == "cuda" else "")
    m = report["machine"]
    title = (f"{m['cpu']}, {m['cores']} cores, {args.device}; batch {cfg.batch}, {data['images']} images, "
             f"{cfg.epochs - 1} timed epochs" + ("; RandomResizedCrop" if args.recipe == "rrc" else ""))
    common.finish(stem, report, args, plot=lambda r, png: plot(r["results"], png, title))
    print(json.dumps({"median images/s": {k: round(v["median"]) for k, v in results.items()},
                      "ratios per epoch (median)": {k: round(v["median"], 3) for k, v in report["ratios_per_epoch"].items()}},
                     indent=2))
    return report


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
