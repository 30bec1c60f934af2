"""Training-loader throughput, images/s, every contender doing the same augmentations.

    .venv/bin/python -m benchmarks.loader_throughput --quick          # ~3-4 min on 2 cores
    .venv/bin/python -m benchmarks.loader_throughput --device cuda    # the same on a GPU
    .venv/bin/python -m benchmarks.loader_throughput --quick --recipe rrc   # RandomResizedCrop

Per image, everywhere: a 224x224 crop at one of 33x33 offsets of the 256x256 image, a
flip with p = 0.5, the mean image's window subtracted, PCA lighting added; batches of
float32 NCHW tensors (on the GPU with --device cuda). Contenders:

- dali-arrow: `train_loader(backend="dali")` over our JPEG Arrow shards;
  dali-arrow-roi-decode: the same decoding only the crop window (why it is not the default);
  dali-arrow-raw: over `--encoding raw` shards (no decoding at all; 4x the disk);
- dali-files: DALI's `readers.file` over the same 256x256 JPEGs (the shards' very bytes)
  as files, the same operators;
- torch-twin: `train_loader(backend="torch")`, PIL decoding in DataLoader workers;
- imagefolder-original: what users write today, a torchvision-style ImageFolder in a
  DataLoader over the original JPEGs (decode, resize shorter side to 256, centre crop,
  random crop, flip, mean image, lighting), per-sample numpy in the workers;
- imagefolder-256: the same code over the 256x256 JPEG files (the loader alone);
- webdataset: tar shards of the 256x256 JPEGs through webdataset, if it installs
  (`pip install --target /tmp/benchdeps webdataset`; found there when present);
- ffcv-jpeg, ffcv-raw: FFCV's `Loader` (OrderOption.RANDOM, its JPEG decoder, the same
  work per image as an FFCV Operation, `benchmarks/ffcv_side.py`) over the same 256x256
  pixels written to .beton files (JPEG q95, and raw), in FFCV's own venv (`make
  ffcv-env`), as a subprocess that this one drives run by run; where that venv cannot be
  made, the reason is recorded. CPU only. PCA lighting is on for every contender, FFCV's
  included.

`--recipe rrc` (writes loader_throughput_rrc.json): torchvision's RandomResizedCrop(224)
recipe on a keep-aspect build of the same corpus (shorter side 256, longer at most 512),
a flip with p = 0.5, channel mean and std, float32 NCHW, no lighting. Contenders:

- rrc-dali, rrc-torch: `train_loader(recipe="rrc")` over the JPEG keep-aspect shards,
  backend "dali" (CPU) and "torch" (PIL in DataLoader workers);
- rrc-imagefolder-pil: the stored images as JPEG files in class folders, an ImageFolder
  in a DataLoader whose transform is torchvision's RandomResizedCrop + RandomHorizontalFlip
  + ToTensor + Normalize written with PIL, numpy and `random` (`PilRandomResizedCrop`:
  torchvision does not import next to the CPU torch pin, in .venv or FFCV's venv);
- rrc-ffcv-jpeg: FFCV's `RandomResizedCropRGBImageDecoder` then a flip-and-normalise
  Operation (ffcv_side.py), over a .beton written from those files (JPEG q95).

Method: all contenders are built and warmed up, then run in alternating order in this
one process, `--repeats` times each. Before each run the machine is let go idle (the
others' workers fill their prefetch queues and stop) and the timed loader's own queue is
drained untimed; the run then times `--batches` batches of a never-ending stream of
epochs (epoch restarts included). Every contender uses all cores (threads or worker
processes). Reported: median images/s and the spread, and each ratio per repeat (both
contenders timed in the same repeat) with its spread. Writes loader_throughput.json and
.png into --out (benchmarks/out/; --publish: also benchmarks/results/).
"""
from __future__ import annotations

import argparse
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

from benchmarks import common

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
def forever(make_epoch):
    while True:
        yield from make_epoch()


def to_device(batches, device):
    for x, y in batches:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def user_loader(dataset, batch: int, workers: int, device: str):
    """A user's DataLoader over a map-style dataset, endless, moved to the device."""
    from torch.utils.data import DataLoader

    dl = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                    persistent_workers=workers > 0, pin_memory=device == "cuda", prefetch_factor=2 if workers else None)
    return to_device(forever(lambda: iter(dl)), "cuda:0" if device == "cuda" else "cpu")


def rrc_contenders(data: dict, device: str, batch: int, workers: int, notes: dict) -> dict:
    """--recipe rrc: ours (DALI and torch backends), and the ImageFolder loop."""
    from alexprep.imagenet_prep import loaders

    made = {}
    build = data["builds"]["jpeg"]
    for name, backend in (("rrc-dali", "dali"), ("rrc-torch", "torch")):
        if backend == "dali" and importlib.util.find_spec("nvidia.dali") is None:
            notes["dali"] = "nvidia.dali does not import here: rrc-dali skipped"
            continue
        loader = loaders.train_loader(build, batch_size=batch, device="cuda:0" if device == "cuda" else "cpu",
                                      seed=0, backend=backend, workers=workers, recipe="rrc")
        made[name] = forever(lambda loader=loader: iter(loader))
    made["rrc-imagefolder-pil"] = user_loader(ImageFolder(data["files"], PilRandomResizedCrop(data["stats"])),
                                              batch, workers, device)
    return made


def contenders(data: dict, device: str, batch: int, workers: int, notes: dict) -> dict:
    from alexprep.imagenet_prep import loaders

    made = {}
    torch_device = "cuda:0" if device == "cuda" else "cpu"
    have_dali = importlib.util.find_spec("nvidia.dali") is not None

    def ours(name, build, backend, **kw):
        loader = loaders.train_loader(build, batch_size=batch, device=torch_device, seed=0, backend=backend,
                                      workers=workers, **kw)
        made[name] = forever(lambda: iter(loader))

    if have_dali:
        from alexprep.imagenet_prep import dali_backend

        ours("dali-arrow", data["builds"]["jpeg"], "dali")
        default = dali_backend.ROI_DECODE
        dali_backend.ROI_DECODE = not default  # read when the pipeline is built
        ours("dali-arrow-full-decode" if default else "dali-arrow-roi-decode", data["builds"]["jpeg"], "dali")
        dali_backend.ROI_DECODE = default
        ours("dali-arrow-raw", data["builds"]["raw"], "dali")
        made["dali-files"] = dali_files(data, torch_device, batch, workers)
    else:
        notes["dali"] = "nvidia.dali does not import here: DALI contenders skipped"
    ours("torch-twin", data["builds"]["jpeg"], "torch")
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
        made["webdataset"] = to_device(forever(lambda: iter(dl)), torch_device)
    return made


def dali_files(data: dict, torch_device: str, batch: int, workers: int):
    """DALI's file reader over the 256x256 JPEGs, the same operators as our pipeline
    (`dali_backend.image_graph`), the draws fed per iteration from augment.draw."""
    import torch
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.pytorch import feed_ndarray

    from alexprep.imagenet_prep import augment, dali_backend

    stats = data["stats"]
    mean = np.asarray(stats.mean_image, np.float32)
    gpu = torch_device.startswith("cuda")
    counter = {"i": 0}

    def draws():
        index = np.arange(counter["i"] * batch, (counter["i"] + 1) * batch)
        counter["i"] += 1
        d = augment.draw(0, 0, index)
        cmn = -augment.lighting_shift(d.alpha, stats.eigvals, stats.eigvecs)
        return (augment.crop_position(d.offset_x, 33), augment.crop_position(d.offset_y, 33),
                d.flip.astype(np.int32), cmn)

    pipe = Pipeline(batch_size=batch, num_threads=workers, device_id=0 if gpu else None, prefetch_queue_depth=2)
    with pipe:
        jpegs, labels = fn.readers.file(file_root=str(data["files"]), random_shuffle=True, initial_fill=1024,
                                        name="reader")
        pos_x, pos_y, mirror, cmn = fn.external_source(source=draws, num_outputs=4, batch=True,
                                                       dtype=[types.FLOAT, types.FLOAT, types.INT32, types.FLOAT])
        images = dali_backend.image_graph(jpegs, encoding="jpeg", size=256, crop=224, gpu=gpu, mean_image=mean,
                                      windows=[(pos_x, pos_y, mirror)], cmn_mean=cmn, std=[1.0, 1.0, 1.0],
                                      roi=dali_backend.ROI_DECODE)
        pipe.set_outputs(images, labels)
    pipe.build()

    def batches():
        while True:
            out, lab = pipe.run()
            dense = out.as_tensor()
            if pipe.exec_dynamic:  # zero-copy, as our DALI backend does
                with torch.device(torch_device):
                    x = torch.from_dlpack(dense)
            else:
                x = torch.empty(dense.shape(), dtype=torch.float32, device=torch_device)
                feed_ndarray(dense, x, cuda_stream=torch.cuda.current_stream() if gpu else None)
            y = torch.from_numpy(lab.as_array().reshape(-1).astype(np.int64)).to(torch_device)
            yield x, y

    return batches()


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


class FfcvServer:
    """FFCV's loaders, in FFCV's venv (benchmarks/ffcv_side.py serve), timed run by run on
    request so that they alternate with the in-process contenders."""

    def __init__(self, python: Path, betons: dict, options: list[str], batch: int, workers: int):
        """options: the pipeline's (`--mean M.npy --lighting L.npy`, or `--recipe rrc --mean
        M.npy --std S.npy`)."""
        cmd = [str(python), str(common.FFCV_SIDE), "serve", *options, "--batch", str(batch), "--workers",
               str(workers)] + [f"{k}={v}" for k, v in betons.items()]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._answer()["ready"]

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"ffcv_side.py serve ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def runner(self, name: str):
        def run(batches: int, skip: int) -> tuple[float, int]:
            self.proc.stdin.write(f"run {name} {batches} {skip}\n")
            self.proc.stdin.flush()
            got = self._answer()
            return got["seconds"], got["images"]

        return run

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


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


def ffcv_contenders(data: dict, work: Path, device: str, batch: int, workers: int, notes: dict):
    """(FfcvServer or None, {name: runner}): FFCV's Loader over the same 256x256 pixels
    written as .beton files, JPEG q95 and raw."""
    python, info, folder = _ffcv_ready(work, device, notes)
    if python is None:
        return None, {}
    from alexprep.imagenet_prep.samples import SplitSamples
    from alexprep.imagenet_prep.shards import read_split

    t0 = time.perf_counter()
    samples = SplitSamples(read_split(data["builds"]["raw"], "train"))  # the exact pixels the JPEG shards encode
    pixels = np.stack([samples.view(i) for i in range(len(samples))]).reshape(len(samples), 256, 256, 3)
    np.save(folder / "pixels.npy", pixels)
    np.save(folder / "labels.npy", samples.labels)
    stats = data["stats"]
    np.save(folder / "mean.npy", np.asarray(stats.mean_image, np.float32))
    np.save(folder / "lighting.npy", (stats.eigvecs * np.sqrt(np.clip(stats.eigvals, 0, None))).astype(np.float32))
    betons, written = {}, {}
    for mode, name in (("jpg", "ffcv-jpeg"), ("raw", "ffcv-raw")):
        betons[name] = folder / f"{name}.beton"
        got = subprocess.run([str(python), str(common.FFCV_SIDE), "write-array", str(folder / "pixels.npy"),
                              str(folder / "labels.npy"), str(betons[name]), "--mode", mode, "--quality", "95",
                              "--workers", str(workers)], capture_output=True, text=True)
        if got.returncode:
            notes["ffcv"] = f"writing {name}.beton failed: {got.stderr.strip()[-500:]}"
            return None, {}
        written[name] = json.loads(got.stdout.strip().splitlines()[-1])
    options = ["--mean", str(folder / "mean.npy"), "--lighting", str(folder / "lighting.npy")]
    try:
        server = FfcvServer(python, betons, options, batch, workers)
    except (RuntimeError, OSError, ValueError) as exc:
        notes["ffcv"] = f"FFCV's loader did not start: {exc}"
        return None, {}
    notes["ffcv"] = {**info, "betons": {k: {"bytes_per_image": v["bytes"] / v["images"]} for k, v in written.items()},
                     "warm_up": server.ready, "set_up_s": time.perf_counter() - t0,
                     "pipeline": "SimpleRGBImageDecoder -> PaperAugment (ffcv_side.py: 33x33 crop offsets, flip 0.5, "
                                 "minus mean image window, PCA lighting 0.1, float32 CHW) -> ToTensor; "
                                 "OrderOption.RANDOM, drop_last, os_cache, FFCV's default batches_ahead"}
    return server, {name: server.runner(name) for name in betons}


def ffcv_rrc_contenders(data: dict, work: Path, device: str, batch: int, workers: int, notes: dict):
    """--recipe rrc: (FfcvServer or None, {"rrc-ffcv-jpeg": runner}): FFCV's
    RandomResizedCropRGBImageDecoder over a .beton of the stored keep-aspect images."""
    python, info, folder = _ffcv_ready(work, device, notes)
    if python is None:
        return None, {}
    t0 = time.perf_counter()
    classes = sorted(d.name for d in data["files"].iterdir() if d.is_dir())
    items = [(str(p), i) for i, c in enumerate(classes) for p in sorted((data["files"] / c).iterdir())]
    (folder / "items.json").write_text(json.dumps(items))
    stats = data["stats"]
    np.save(folder / "mean.npy", np.asarray(stats.channel_mean, np.float32))
    np.save(folder / "std.npy", np.asarray(stats.channel_std, np.float32))
    beton = folder / "rrc-ffcv-jpeg.beton"
    got = subprocess.run([str(python), str(common.FFCV_SIDE), "write-files", str(folder / "items.json"), str(beton),
                          "--mode", "jpg", "--quality", "95", "--workers", str(workers)], capture_output=True, text=True)
    if got.returncode:
        notes["ffcv"] = f"writing rrc-ffcv-jpeg.beton failed: {got.stderr.strip()[-500:]}"
        return None, {}
    written = json.loads(got.stdout.strip().splitlines()[-1])
    options = ["--recipe", "rrc", "--mean", str(folder / "mean.npy"), "--std", str(folder / "std.npy")]
    try:
        server = FfcvServer(python, {"rrc-ffcv-jpeg": beton}, options, batch, workers)
    except (RuntimeError, OSError, ValueError) as exc:
        notes["ffcv"] = f"FFCV's loader did not start: {exc}"
        return None, {}
    notes["ffcv"] = {**info, "bytes_per_image": written["bytes"] / written["images"], "warm_up": server.ready,
                     "set_up_s": time.perf_counter() - t0,
                     "pipeline": "RandomResizedCropRGBImageDecoder((224, 224)) (torchvision's scale and ratio, "
                                 "OpenCV INTER_AREA) -> FlipNormalize (ffcv_side.py: flip 0.5, channel mean/std, "
                                 "float32 CHW) -> ToTensor; OrderOption.RANDOM, drop_last, os_cache"}
    return server, {"rrc-ffcv-jpeg": server.runner("rrc-ffcv-jpeg")}


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


def time_run(stream, batches: int, sync, skip: int = 0) -> tuple[float, int]:
    """Seconds and images for `batches` batches, after `skip` untimed ones: a loader comes
    back to the timer with its prefetch queue full (up to 2 batches for DALI, workers x 2
    for a DataLoader), and timing those would measure a queue, not a loader."""
    for _ in range(skip):
        next(stream)
    sync()
    t0 = time.perf_counter()
    images = 0
    for _ in range(batches):
        x, _ = next(stream)
        images += x.shape[0]
    sync()
    return time.perf_counter() - t0, images


def machine(device: str) -> dict:
    """benchmarks/common.py's machine report, plus the device and webdataset's version."""
    wds = sys.modules.get("webdataset") or _optional("webdataset")
    return {**common.machine(), "device": device, "platform": platform.platform(),
            "webdataset": getattr(wds, "__version__", None) if wds else None}


def plot(results: dict, path: Path, title: str) -> None:
    names = list(results)
    common.bar_chart(path, names, {"images/s": [results[n]["median"] for n in names]},
                     spread={"images/s": [(results[n]["min"], results[n]["max"]) for n in names]},
                     colors=["tab:green" if n.startswith(("dali-arrow", "rrc-dali", "rrc-torch")) else
                             "tab:orange" if "ffcv" in n else "tab:gray" for n in names],
                     horizontal=True, value_labels=True, figsize=(9, 0.5 * len(names) + 1.5), title=title,
                     value_axis="images/s (median; bars: min-max over repeats)")


@dataclass
class Config:
    """The run's sizes, from the flags and their --quick/full defaults."""
    images: int
    batch: int
    per_run: int  # batches per timed run
    repeats: int
    workers: int
    idle_limit: float  # seconds wait_idle waits before a run
    skip: int  # untimed batches before each run


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpus, few repeats (~3-4 min on 2 cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--recipe", choices=["paper", "rrc"], default="paper",
                        help="the paper's crops (default) or RandomResizedCrop on a keep-aspect build")
    parser.add_argument("--images", type=int, help="corpus size (default 512 quick, 2048 full)")
    parser.add_argument("--batch-size", type=int, help="default 64 quick, 128 full")
    parser.add_argument("--batches", type=int, help="batches per timed run (default 12 quick, 24 full)")
    parser.add_argument("--repeats", type=int, help="timed runs per contender (default 5 quick, 9 full)")
    parser.add_argument("--workers", type=int, help="threads/worker processes for every contender (default: all CPUs)")
    parser.add_argument("--only", help="comma-separated contender names")
    common.add_output_args(parser)
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    return parser


def make_config(args) -> Config:
    from alexprep.imagenet_prep.devices import available_cpus

    workers = args.workers or available_cpus()
    return Config(
        images=args.images or (512 if args.quick else 2048),
        batch=args.batch_size or (64 if args.quick else 128),
        per_run=args.batches or (12 if args.quick else 24),
        repeats=args.repeats or (5 if args.quick else 9),
        workers=workers,
        # On a machine others keep busy, waiting longer does not make it idle: --quick
        # gives up after 2.5 s (the contenders' own prefetching settles within ~2 s).
        idle_limit=2.5 if args.quick else 15.0,
        skip=max(2, 2 * workers),  # the deepest prefetch queue here: a DataLoader's workers x 2
    )


def local_runners(data: dict, args, cfg: Config, notes: dict, sync) -> dict:
    """name -> run(batches, skip) for the contenders in this process (--only applied)."""
    make = rrc_contenders if args.recipe == "rrc" else contenders
    streams = make(data, args.device, cfg.batch, cfg.workers, notes)
    if args.only:
        keep = set(args.only.split(","))
        streams = {k: v for k, v in streams.items() if k in keep}
    return {name: (lambda b, skip, stream=stream: time_run(stream, b, sync, skip=skip))
            for name, stream in streams.items()}


def warm_up(runners: dict, per_run: int) -> None:
    for name, run in runners.items():  # warm-up: workers started, pipelines primed, caches hot
        t0 = time.perf_counter()
        run(per_run, 0)
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)


def time_repeats(runners: dict, cfg: Config) -> tuple[dict[str, list[float]], int]:
    """images/s per contender per repeat, and how many runs started on a busy machine."""
    runs: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    busy_runs = 0
    for r in range(cfg.repeats):
        order = names if r % 2 == 0 else names[::-1]  # alternate, so drift hits everyone alike
        for name in order:
            busy_runs += not wait_idle(cfg.idle_limit)
            seconds, images = runners[name](cfg.per_run, cfg.skip)
            runs[name].append(images / seconds)
        print(f"  repeat {r + 1}/{cfg.repeats}: " + ", ".join(f"{k} {runs[k][-1]:.0f}" for k in names), flush=True)
    return runs, busy_runs


def summarize(runs: dict[str, list[float]]) -> dict:
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v),
                "iqr": float(np.subtract(*np.percentile(v, [75, 25]))), "runs": v} for k, v in runs.items()}


def ratios(runs: dict[str, list[float]], med: dict[str, float]) -> tuple[dict, dict]:
    """Ratios of the medians, and the same ratios per repeat with their spread."""
    checks, spreads = {}, {}
    pairs = [("dali-arrow", "dali-files"), ("dali-arrow", "imagefolder-original"), ("dali-arrow", "imagefolder-256"),
             ("dali-arrow", "ffcv-jpeg"), ("dali-arrow-raw", "ffcv-raw"), ("torch-twin", "ffcv-jpeg"),
             ("rrc-dali", "rrc-ffcv-jpeg"), ("rrc-torch", "rrc-ffcv-jpeg"), ("rrc-dali", "rrc-imagefolder-pil"),
             ("rrc-torch", "rrc-imagefolder-pil")]
    for a, b in pairs:
        if a in med and b in med:
            key = f"{a}_over_{b}".replace("-", "_")
            checks[key] = med[a] / med[b]
            spreads[key] = common.ratio_summary(runs[a], runs[b])  # per repeat: a and b timed in the same one
    return checks, spreads


AUGMENTATION = {
    "paper": "224 crop of 256 (33x33 offsets), flip 0.5, minus mean image, PCA lighting 0.1",
    "rrc": "RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)) of keep-aspect images (shorter side 256, "
           "longer <= 512), flip 0.5, channel mean and std, float32 NCHW, no lighting",
}


def build_report(args, cfg: Config, data: dict, runs: dict, results: dict, notes: dict, busy_runs: int) -> dict:
    checks, spreads = ratios(runs, {k: v["median"] for k, v in results.items()})
    return {
        "benchmark": "loader_throughput",
        "unit": "images/s",
        "machine": machine(args.device),
        "config": {"images": data["images"], "batch_size": cfg.batch, "batches_per_run": cfg.per_run,
                   "repeats": cfg.repeats, "untimed_batches_before_each_run": cfg.skip,
                   "workers": cfg.workers, "device": args.device, "quick": args.quick, "recipe": args.recipe,
                   "augmentation": AUGMENTATION[args.recipe]},
        "results": results,
        "ratios": checks,
        "ratios_per_repeat": spreads,
        "targets": {} if args.recipe == "rrc" else {"dali_arrow >= dali_files": checks.get("dali_arrow_over_dali_files", 0) >= 1,
                    "dali_arrow >= 2x imagefolder-original":
                        checks.get("dali_arrow_over_imagefolder_original", 0) >= 2,
                    "dali_arrow >= ffcv_jpeg (CPU)": checks.get("dali_arrow_over_ffcv_jpeg", 0) >= 1,
                    "dali_arrow_raw >= ffcv_raw (CPU)": checks.get("dali_arrow_raw_over_ffcv_raw", 0) >= 1},
        "notes": notes | {"runs_started_on_a_busy_machine": busy_runs, "idle_wait_limit_s": cfg.idle_limit,
                          "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }


def main(argv=None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    cfg = make_config(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="alexprep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    notes: dict = {}
    server = None
    try:
        print(f"preparing {cfg.images} images in {work} ...", flush=True)
        data = (prepare_rrc if args.recipe == "rrc" else prepare)(work, cfg.images, cfg.workers)
        print(f"  {data['seconds']:.1f} s", flush=True)
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        runners = local_runners(data, args, cfg, notes, sync)
        if not args.only or "ffcv" in args.only:
            ffcv = ffcv_rrc_contenders if args.recipe == "rrc" else ffcv_contenders
            server, remote = ffcv(data, work, args.device, cfg.batch, cfg.workers, notes)
            runners.update({k: v for k, v in remote.items() if not args.only or k in set(args.only.split(","))})
        warm_up(runners, cfg.per_run)
        runs, busy_runs = time_repeats(runners, cfg)
        results = summarize(runs)
    finally:
        if server is not None:
            server.close()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report = build_report(args, cfg, data, runs, results, notes, busy_runs)
    stem = "loader_throughput" + ("_rrc" if args.recipe == "rrc" else "") + ("_cuda" if args.device == "cuda" else "")
    m = report["machine"]
    title = (f"{m['cpu']}, {m['cores']} cores, {args.device}; batch {cfg.batch}, {data['images']} images"
             + ("; RandomResizedCrop" if args.recipe == "rrc" else ""))
    common.finish(stem, report, args, plot=lambda r, png: plot(r["results"], png, title))
    print(json.dumps({"median images/s": {k: round(v["median"]) for k, v in results.items()}, "ratios": report["ratios"],
                      "notes": notes}, indent=2))
    return report


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
