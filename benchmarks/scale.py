"""What does not scale: every stage of alexprep at three dataset sizes, extrapolated to
ImageNet-1k (1,281,167 training images, 1,000 classes, 50,000 validation images).

Run by hand (it needs tens of GB of disk and many minutes; not part of `make bench`):

    python benchmarks/scale.py --quick                      # 10k and 30k training images
    python benchmarks/scale.py                              # 10k, 30k and 100k
    python benchmarks/scale.py --sizes 2000,4000 --val-per-class 1   # a smoke run

1. Generates (once; cached in --cache and reused) an ImageNet-shaped source: 1,000 wnids,
   training images cut from the real sample photos (crops, rescales, flips, colour shifts)
   at ImageNet's mix of sizes and JPEG qualities (~110 KB on average), with ImageNet's
   quirks at their rates (22 CMYK JPEGs and one PNG named .JPEG in 1.28 M; grayscale
   images), and a validation split of --val-per-class images per class, flat, in Kaggle's
   layout with `LOC_val_solution.csv`. The tree of N images is the first N of one pool
   (hard links), so the sizes share their files.
2. At each size N, runs each stage in its own subprocess (so that peak RSS is the stage's):
   build-shards (2 workers, train split), stats, verify, reading the manifest and index,
   constructing `train_loader` and `eval_loader` (per backend), one epoch's plan, the
   first batch, loader images/s, a few training steps with 1,000 classes, checkpoint size
   and save/load, `evaluate` over a slice of the validation split, the neighbours cache
   (fc7 features of a small val build, the cache hit, and the search over N rows).
3. Fits cost = fixed + per_image * N per stage and extrapolates to 1.28 M images on one
   core and on 16; writes --out/scale.json and --out/scale.png.

Internal: `scale.py --stage NAME --params JSON` runs one stage and prints one JSON line.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGENET_TRAIN = 1_281_167
IMAGENET_VAL = 50_000
IMAGENET_CLASSES = 1000
TARGET_CORES = 16
BUILD_WORKERS = 2
LOADER_WORKERS = 2
# ImageNet's quirks (ILSVRC2012 train): 22 CMYK JPEGs and 1 PNG named .JPEG (the lists in
# TensorFlow's build_imagenet_data.py). Grayscale JPEGs: an estimate of ~1%, not counted
# from the archive here.
CMYK_EVERY = IMAGENET_TRAIN // 22  # one CMYK image every ~58k, the first at index CMYK_FIRST
CMYK_FIRST = 777
PNG_AT = 4321  # the one PNG (in ImageNet: n02105855_2933.JPEG)
GRAY_RATE = 0.01
# Sizes (w, h) and their shares: most photos near 500 px on the longer side, some large
# (up to ~2,000 px), some small; JPEG qualities as Flickr-era cameras and editors wrote them.
COMMON = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (500, 500), (400, 300), (500, 281)]
LARGE = [(800, 600), (1024, 768), (1280, 960), (1600, 1200), (2048, 1536), (1200, 1600)]
SMALL = [(200, 150), (150, 200), (250, 188), (120, 90)]
SHARES = (0.86, 0.06, 0.08)  # common, large, small
QUALITIES = ((0.25, 85, 90), (0.45, 91, 95), (0.30, 96, 98))  # share, low, high (inclusive)
FULL_CHROMA = 0.4  # share saved with 4:4:4 chroma (cameras at high quality), the rest 4:2:0
NOISE_SIGMA = 4  # sensor-like noise added to the (smooth, resampled) photo crops
# With these, the mean file is ~110 KB, as in ImageNet's train set (138 GB / 1.28 M).
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alexprep-scale"
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


# ---------------------------------------------------------------------------- machine and memory
def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    mem = _proc_fields("/proc/meminfo", ("MemTotal",)).get("MemTotal", 0) / 2**20
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "mem_gib": round(mem, 1), "loadavg_at_start": load,
            "python": platform.python_version()}


def _proc_fields(path: str, names) -> dict:
    """kB fields of /proc/self/status or /proc/meminfo, in kB."""
    out = {}
    try:
        for line in Path(path).read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in names:
                out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def read_bytes() -> int:
    """Bytes this process has caused to be read from disk (page-cache misses)."""
    try:
        return next(int(l.split()[1]) for l in Path("/proc/self/io").read_text().splitlines()
                    if l.startswith("read_bytes"))
    except (OSError, StopIteration):
        return 0


def children_anon_mb() -> float:
    """Anonymous memory of this process's live children (loader workers), in MB."""
    me, total = str(os.getpid()), 0
    for pid in (d for d in os.listdir("/proc") if d.isdigit()):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(l.split(":", 1) for l in status.splitlines() if ":" in l)
        if fields.get("PPid", "").strip() == me:
            total += int(fields.get("RssAnon", "0 kB").split()[0])
    return total / 1024


def _pss(pid: str) -> tuple[int, int]:
    """(Pss, Pss_Anon) of a process in kB: shared pages split between their sharers, so the
    sum over a process and its forked workers counts each page once."""
    pss = anon = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Pss_Anon:"):
                anon = int(line.split()[1])
    except OSError:
        pass
    return pss, anon


def tree_pss() -> tuple[float, float]:
    """(Pss, Pss_Anon) in MB of this process and its live children together."""
    me = str(os.getpid())
    pids = [me]
    for pid in (d for d in os.listdir("/proc") if d.isdigit()):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me:
            pids.append(pid)
    total = [0, 0]
    for pid in pids:
        pss, anon = _pss(pid)
        total[0] += pss
        total[1] += anon
    return total[0] / 1024, total[1] / 1024


class PssPeak:
    """The peak of tree_pss() while a block runs, sampled every `every` seconds."""

    def __init__(self, every: float = 0.25):
        import threading

        self.every, self.peak, self.peak_anon = every, 0.0, 0.0
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        pss, anon = tree_pss()
        self.samples.append((pss, anon))
        self.peak, self.peak_anon = max(self.peak, pss), max(self.peak_anon, anon)

    @property
    def median(self) -> tuple[float, float]:
        """(Pss, Pss_Anon) MB, medians over the run: what it holds throughout, where the peak
        is one decode's transient (a longer run meets more of them)."""
        return (statistics.median(s[0] for s in self.samples) if self.samples else 0.0,
                statistics.median(s[1] for s in self.samples) if self.samples else 0.0)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def memory() -> dict:
    """This process's memory now, in MB: rss, anonymous part, peak (VmHWM), and the peak of
    its finished children (workers)."""
    f = _proc_fields("/proc/self/status", ("VmRSS", "RssAnon", "VmHWM"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB on Linux
    return {"rss_mb": f.get("VmRSS", 0) / 1024, "anon_mb": f.get("RssAnon", 0) / 1024,
            "peak_mb": f.get("VmHWM", 0) / 1024, "children_peak_mb": children / 1024}


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def tree_cpu() -> float:
    """CPU seconds used so far by this process (all threads), its live children (read from
    /proc) and its finished children: a cost that, unlike wall time, barely depends on what
    else the machine runs."""
    total = time.process_time()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total += usage.ru_utime + usage.ru_stime
    me = str(os.getpid())
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return total
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # ppid; then utime, stime at fields 11 and 12
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


class Clock:
    """Wall and CPU seconds of a block: `with Clock() as c: ...; c.wall, c.cpu`."""

    def __enter__(self):
        self.t, self.c = time.perf_counter(), tree_cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, tree_cpu() - self.c


# ---------------------------------------------------------------------------- the source tree
def wnid(c: int) -> str:
    return f"n{c + 1:08d}"


class Generator:
    """Deterministic images: image k of a split is a pure function of (split, k)."""

    def __init__(self):
        from alexprep.imagenet_prep.sample_data import load_photo, photo_names

        self.photos = [load_photo(n) for n in photo_names()]
        side = max(max(s) for s in LARGE) + 64
        self.noise = np.random.default_rng(2).normal(0, NOISE_SIGMA, (side, side, 3)).astype(np.int16)

    def image(self, split: str, k: int) -> bytes:
        from PIL import Image

        from alexprep.imagenet_prep.sample_data import photo_crop

        rng = np.random.default_rng([0 if split == "train" else 1, k])
        u = rng.random()
        pool = COMMON if u < SHARES[0] else LARGE if u < SHARES[0] + SHARES[1] else SMALL
        size = pool[int(rng.integers(len(pool)))]
        img = photo_crop(self.photos[int(rng.integers(len(self.photos)))], size, rng)
        gains = rng.uniform(0.8, 1.2, 3)  # a colour shift: per-channel gain
        lut = [min(255, int(v * g)) for g in gains for v in range(256)]
        img = img.point(lut)
        pixels = np.asarray(img, np.int16)
        h, w = pixels.shape[:2]
        oy, ox = (int(v) for v in rng.integers(0, 64, 2))
        img = Image.fromarray(np.clip(pixels + self.noise[oy:oy + h, ox:ox + w], 0, 255).astype(np.uint8))
        v = rng.random()
        acc = 0.0
        for share, lo, hi in QUALITIES:
            acc += share
            if v < acc:
                break
        quality = int(rng.integers(lo, hi + 1))
        options = {"quality": quality, "subsampling": 0 if rng.random() < FULL_CHROMA else 2}
        buf = io.BytesIO()
        if split == "train" and k == PNG_AT:
            img.save(buf, format="PNG")
        elif k % CMYK_EVERY == CMYK_FIRST:
            img.convert("CMYK").save(buf, format="JPEG", **options)
        elif rng.random() < GRAY_RATE:
            img.convert("L").save(buf, format="JPEG", quality=quality)
        else:
            img.save(buf, format="JPEG", **options)
        return buf.getvalue()


_GEN: Generator | None = None


def _write_images(task) -> int:
    """Worker: write the images (split, k, path) of one chunk that are missing; returns bytes."""
    global _GEN
    if _GEN is None:
        _GEN = Generator()
    total = 0
    for split, k, path in task:
        path = Path(path)
        if path.exists():
            continue
        data = _GEN.image(split, k)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        total += len(data)
    return total


def pool_path(cache: Path, classes: int, k: int) -> Path:
    c = k % classes
    return cache / "pool" / "train" / wnid(c) / f"{wnid(c)}_{k // classes:06d}.JPEG"


def val_name(j: int) -> str:
    return f"ILSVRC2012_val_{j + 1:08d}"


def generate(cache: Path, classes: int, n_train: int, n_val: int, workers: int, log) -> dict:
    """Write the missing images of the pool (train 0..n_train-1, val 0..n_val-1)."""
    import multiprocessing as mp

    todo = [("train", k, str(pool_path(cache, classes, k))) for k in range(n_train)]
    todo += [("val", j, str(cache / "val" / "val" / f"{val_name(j)}.JPEG")) for j in range(n_val)]
    missing = [t for t in todo if not os.path.exists(t[2])]
    t0 = time.perf_counter()
    if missing:
        log(f"generating {len(missing)} images into {cache} with {workers} processes")
        chunks = [missing[i:i + 500] for i in range(0, len(missing), 500)]
        done = 0
        with mp.get_context("fork").Pool(workers) as pool:
            for i, _ in enumerate(pool.imap_unordered(_write_images, chunks)):
                done += len(chunks[i])
                if i % 20 == 19:
                    log(f"  {done}/{len(missing)} ({time.perf_counter() - t0:.0f} s)")
    names = "".join(f"{wnid(c)} class {c}\n" for c in range(classes))
    for folder in (cache / "pool", cache / "val"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "LOC_synset_mapping.txt").write_text(names)
    write_val_csv(cache / "val" / "LOC_val_solution.csv", range(n_val), classes)
    return {"generated": len(missing), "generate_s": time.perf_counter() - t0}


def write_val_csv(path: Path, rows, classes: int) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for j in rows:
            w.writerow([val_name(j), f"{wnid(j % classes)} 0 0 10 10"])


def source_stats(paths: list[Path]) -> dict:
    """Mean file size and the mix of sizes, CMYK, grayscale and PNG of some files."""
    from PIL import Image

    from alexprep.imagenet_prep.sample_data import size_bucket

    sizes = [p.stat().st_size for p in paths]
    kinds: dict[str, int] = {}
    buckets: dict[str, int] = {}
    for p in paths:
        with Image.open(p) as im:
            kind = f"{im.format} {im.mode}"
            kinds[kind] = kinds.get(kind, 0) + 1
            b = size_bucket(*im.size)
            buckets[b] = buckets.get(b, 0) + 1
    return {"files": len(paths), "mean_kb": float(np.mean(sizes)) / 1e3, "kinds": kinds, "sizes": buckets}


def train_tree(cache: Path, classes: int, n: int) -> Path:
    """cache/trees/train-N: the first n pool images as an ImageFolder tree (hard links)."""
    root = cache / "trees" / f"train-{n}"
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for k in range(n):
        src = pool_path(cache, classes, k)
        dst = root / "train" / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
    shutil.copy(cache / "pool" / "LOC_synset_mapping.txt", root / "LOC_synset_mapping.txt")
    done.write_text("")
    return root


def small_val_tree(cache: Path, classes: int, n: int) -> Path:
    """cache/trees/val-N: the first n val images, flat, with their CSV (for the features)."""
    root = cache / "trees" / f"val-{n}"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "val").mkdir(parents=True)
    for j in range(n):
        os.link(cache / "val" / "val" / f"{val_name(j)}.JPEG", root / "val" / f"{val_name(j)}.JPEG")
    write_val_csv(root / "LOC_val_solution.csv", range(n), classes)
    shutil.copy(cache / "val" / "LOC_synset_mapping.txt", root / "LOC_synset_mapping.txt")
    (root / ".complete").write_text("")
    return root


# ---------------------------------------------------------------------------- stages (one per subprocess)
def stage_build(p: dict) -> dict:
    from alexprep.imagenet_prep.build import BuildConfig, build_shards

    out = Path(p["out"])
    shutil.rmtree(out, ignore_errors=True)
    with PssPeak() as pss, Clock() as c:
        report = build_shards(Path(p["src"]), out, BuildConfig(workers=p["workers"], splits=(p["split"],)))
    split = report.splits[0]
    manifest = out / p["split"] / "manifest.json"
    return {"wall_s": c.wall, "cpu_s": c.cpu, "written": split.written, "skipped": len(split.skipped),
            "shards": split.shards_total, "shard_bytes": split.bytes, "manifest_bytes": manifest.stat().st_size,
            "skipped_reasons": [s["reason"] for s in split.skipped][:5],
            "pss_peak_mb": pss.peak, "pss_anon_peak_mb": pss.peak_anon, "pss_median_mb": pss.median[0],
            "pss_anon_median_mb": pss.median[1]}


def stage_stats(p: dict) -> dict:
    from alexprep.imagenet_prep.stats import compute_stats, write_stats

    with Clock() as c:
        stats = compute_stats(Path(p["out"]))
        write_stats(Path(p["out"]), stats)
    return {"wall_s": c.wall, "cpu_s": c.cpu}


def stage_verify(p: dict) -> dict:
    from alexprep.imagenet_prep.verify import verify_build

    with Clock() as c:
        report = verify_build(Path(p["out"]))
    if not report.ok:
        raise RuntimeError(f"verify: {report.bad[:3]}")
    return {"wall_s": c.wall, "cpu_s": c.cpu, "rows": report.rows}


def stage_index(p: dict) -> dict:
    """Reading the manifest, then the split's index over the memory-mapped shards."""
    from alexprep.imagenet_prep.samples import SplitSamples
    from alexprep.imagenet_prep.shards import read_split

    if p.get("cold"):  # drop the shards from the page cache: a first open after a reboot or on a new node
        for path in (Path(p["out"]) / "train").glob("*.arrow"):
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    read0 = read_bytes()
    with Clock() as m:
        index = read_split(Path(p["out"]), "train")
    before = memory()["anon_mb"]
    with Clock() as c:
        samples = SplitSamples(index)
    after = memory()["anon_mb"]
    return {"manifest_s": m.wall, "manifest_cpu": m.cpu, "samples_s": c.wall, "samples_cpu": c.cpu,
            "samples_anon_mb": after - before, "rows": len(samples), "read_mb": (read_bytes() - read0) / 1e6,
            "shard_mb": sum(s.bytes for s in index.shards) / 1e6}


def stage_loader(p: dict) -> dict:
    """Constructing train_loader, its epoch plan, the first batch, images/s; then eval_loader
    over the same (train) split: construction and first batch."""
    from alexprep.imagenet_prep.loaders import eval_loader, train_loader

    root, backend, b = Path(p["out"]), p["backend"], p["batch"]
    r: dict = {"mem_start": memory()}

    def record(name: str, clock: Clock) -> None:
        r[f"{name}_s"], r[f"{name}_cpu"] = clock.wall, clock.cpu

    import tracemalloc

    pss = PssPeak().__enter__()
    tracemalloc.start()  # Python and numpy allocations: exact, unlike RSS
    with Clock() as c:
        loader = train_loader(root, batch_size=b, device="cpu", seed=0, backend=backend, workers=p["workers"])
    record("construct", c)
    r["traced_constructed_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
    r["mem_constructed"] = memory()
    with Clock() as c:
        plan = loader.plan(0)
    record("plan", c)
    loader.plan(1)  # the feed runs an epoch ahead: two epochs' orders are held
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    r["traced_held_mb"], r["traced_peak_mb"] = current / 2**20, peak / 2**20
    with Clock() as c:
        for batch in plan:  # every batch's host-side decisions (draws, lighting, windows)
            pass
    record("plan_batches", c)
    r["plan_images"] = len(plan) * b
    r["mem_planned"] = memory()
    with Clock() as c:
        it = iter(loader)
        next(it)
    record("first_batch", c)
    with Clock() as c:
        for _ in range(p["batches"]):
            next(it)
    record("batches", c)
    r["images_per_s"] = p["batches"] * b / c.wall
    r["workers_anon_mb"] = children_anon_mb()
    r["mem_loaded"] = memory()
    r["cpu_per_image_s"] = c.cpu / (p["batches"] * b)
    loader.close()
    del it, loader
    with Clock() as c:
        ev = eval_loader(root, batch_size=b, device="cpu", split="train", backend=backend, workers=p["workers"])
    record("eval_construct", c)
    with Clock() as c:
        next(iter(ev))
    record("eval_first_batch", c)
    ev.close()
    pss.__exit__()
    r["pss_peak_mb"], r["pss_anon_peak_mb"] = pss.peak, pss.peak_anon
    r["mem_end"] = memory()
    return r


def stage_train(p: dict) -> dict:
    """A few training steps with 1,000 classes; the checkpoint's size, save and load."""
    import torch

    from alexprep.model.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    from alexprep.model.config import TrainConfig
    from alexprep.model.train import train

    torch.set_num_threads(p["threads"])
    run_dir = Path(p["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(batch_size=p["batch"], max_steps=p["steps"], epochs=1, final_crops=0, log_every=1,
                         backend=p["backend"], loader_workers=p["workers"], checkpoint_minutes=1e6)
    t = time.perf_counter()
    train(Path(p["out"]), run_dir, config, progress=False, log=lambda *a, **k: None)
    wall = time.perf_counter() - t
    steps = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s.get("kind", s.get("type")) == "step" or "compute_s" in s]
    step_s = [s["compute_s"] + s["data_wait_s"] for s in steps]
    ckpt_path = list_checkpoints(run_dir / "checkpoints")[-1]
    t = time.perf_counter()
    ckpt = load_checkpoint(ckpt_path)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    saved = save_checkpoint(run_dir / "resaved", ckpt, keep_last=1)
    save_s = time.perf_counter() - t
    shutil.copy(ckpt_path, Path(p["ckpt_copy"]))
    return {"wall_s": wall, "steps": len(step_s), "step_s": step_s, "setup_s": wall - sum(step_s),
            "ckpt_bytes": ckpt_path.stat().st_size, "ckpt_load_s": load_s, "ckpt_save_s": save_s,
            "resaved_bytes": saved.stat().st_size}


def stage_evaluate(p: dict) -> dict:
    """`evaluate` over a contiguous slice of the validation split (rank 0 of W), 1 and 10 crops."""
    import torch

    from alexprep.imagenet_prep.loaders import eval_loader
    from alexprep.imagenet_prep.shards import read_split
    from alexprep.model.checkpoint import load_checkpoint, normalize_of
    from alexprep.model.evaluate import evaluate
    from alexprep.model.inference import model_from_checkpoint
    from alexprep.model.predict import eval_stats

    torch.set_num_threads(p["threads"])
    root = Path(p["val_root"])
    ckpt = load_checkpoint(Path(p["ckpt"]))
    model = model_from_checkpoint(ckpt)
    index = read_split(root, "val")
    r = {"val_rows": index.rows}
    for crops, images in ((1, p["images"]), (10, max(1, p["images"] // 8))):
        world = max(1, index.rows // images)
        t = time.perf_counter()
        loader = eval_loader(root, batch_size=max(1, 64 // crops), device="cpu", stats=eval_stats(ckpt, index),
                             crops=crops, rank=0, world_size=world, normalize=normalize_of(ckpt),
                             backend=p["backend"], workers=p["workers"])
        construct = time.perf_counter() - t
        t = time.perf_counter()
        result = evaluate(model, loader)
        wall = time.perf_counter() - t
        loader.close()
        n = len(loader._eval_index)
        r[f"crops{crops}"] = {"images": n, "construct_s": construct, "wall_s": wall, "images_per_s": n / wall,
                              "top1_error": result.top1_error if hasattr(result, "top1_error") else None}
    return r


def stage_neighbors(p: dict) -> dict:
    """fc7 features of a small val build (computed, then the cache hit), and the search of
    5 queries over a base of N rows (the real features repeated to N rows)."""
    import torch

    from alexprep.model.checkpoint import load_checkpoint
    from alexprep.model.neighbors import FEATURE_DTYPE, nearest, split_features

    torch.set_num_threads(p["threads"])
    cache = Path(p["cache_dir"])
    shutil.rmtree(cache, ignore_errors=True)
    ckpt = load_checkpoint(Path(p["ckpt"]))
    t = time.perf_counter()
    feats = split_features(ckpt, Path(p["root"]), "val", cache_dir=cache, backend=p["backend"], workers=p["workers"])
    compute_s = time.perf_counter() - t
    t = time.perf_counter()
    again = split_features(ckpt, Path(p["root"]), "val", cache_dir=cache, backend=p["backend"])
    hit_s = time.perf_counter() - t
    assert again.shape == feats.shape
    n = p["base_rows"]
    base_path = cache / "base.npy"
    base = np.lib.format.open_memmap(base_path, mode="w+", dtype=FEATURE_DTYPE, shape=(n, feats.shape[1]))
    for start in range(0, n, len(feats)):
        stop = min(n, start + len(feats))
        base[start:stop] = feats[: stop - start]
    base.flush()
    del base
    base = np.load(base_path, mmap_mode="r")
    t = time.perf_counter()
    nearest(np.asarray(feats[:5], np.float32), base, 6)
    search_s = time.perf_counter() - t
    size = base_path.stat().st_size
    del base
    shutil.rmtree(cache, ignore_errors=True)
    return {"images": len(feats), "compute_s": compute_s, "per_image_s": compute_s / len(feats), "hit_s": hit_s,
            "base_rows": n, "search_s": search_s, "base_bytes": size}


def stage_imagenet_index(p: dict) -> dict:
    """ImageNet-1k's index measured, not extrapolated: 1,252 shards of ~1,024 rows (1,281,167
    in all, 1,000 classes) holding one small real JPEG each row (a flat 256x256 q95 image,
    1.7 KB: 2.2 GB instead of 51 GB), written once with ShardWriter and a manifest as
    build-shards writes them. Then, timed: read_split, SplitSamples (warm, and with the page
    cache dropped: bytes read), train_loader and eval_loader construction, the epoch plan,
    every batch plan of an epoch, the first batch; tracemalloc's bytes per sample."""
    from alexprep.imagenet_prep.classes import ClassList
    from alexprep.imagenet_prep.shards import build_id
    from alexprep.imagenet_prep.stats import DatasetStats
    from alexprep.imagenet_prep.transform import ImageSpec

    root, n = Path(p["root"]), IMAGENET_TRAIN
    classes = ClassList(tuple(wnid(c) for c in range(IMAGENET_CLASSES)))
    spec = ImageSpec()
    build = build_id(spec, 1024, 0, classes)
    r: dict = {}
    if not (root / "train" / "manifest.json").exists():
        r["written_s"] = _write_imagenet_index(root, n, classes, spec, build)
    mean = np.full((256, 256, 3), 120.0)
    cov = np.diag([3000.0, 200.0, 50.0])
    stats = DatasetStats(mean, mean.mean(axis=(0, 1)), np.full(3, 60.0), cov, np.diag(cov).copy(), np.eye(3), n, build)
    r.update(_time_imagenet_index(root))
    for backend in p["backends"]:
        r[backend] = _time_imagenet_loaders(root, n, stats, backend)
    return r


def _write_imagenet_index(root: Path, n: int, classes, spec, build: str) -> float:
    """Write the n-row index's shards and manifest into root/train; the seconds it took."""
    from PIL import Image

    from alexprep.imagenet_prep.classes import save_classes
    from alexprep.imagenet_prep.shards import ShardRecord, ShardWriter, shard_name, shard_schema

    shutil.rmtree(root, ignore_errors=True)
    (root / "train").mkdir(parents=True)
    save_classes(classes, root / "classes.json")
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (120, 110, 100)).save(buf, "JPEG", quality=95)
    image = buf.getvalue()
    count = -(-n // 1024)
    bounds = [j * n // count for j in range(count + 1)]
    schema = shard_schema(classes, spec, build, "train")
    records = []
    with Clock() as c:
        for j in range(count):
            writer = ShardWriter(root / "train" / shard_name("train", j, count), schema)
            for i in range(bounds[j], bounds[j + 1]):
                w = classes.wnids[i % IMAGENET_CLASSES]
                writer.add(image, i % IMAGENET_CLASSES, w, f"train/{w}/{w}_{i}.JPEG")
            size, sha = writer.finish()
            writer.commit()
            records.append(ShardRecord(shard_name("train", j, count), j, writer.rows, size, sha).to_json())
        manifest = {"format": "alexprep-shards", "version": 1, "split": "train", "build_id": build, "part": 0,
                    "parts": 1, "shard_count": count, "image": {"size": spec.size, "encoding": spec.encoding,
                    "quality": spec.quality, "resample": spec.resample}, "classes": IMAGENET_CLASSES,
                    "shards": records, "skipped": [], "ignored": []}
        (root / "train" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return c.wall


def _time_imagenet_index(root: Path) -> dict:
    """read_split, then SplitSamples warm and with the page cache dropped (bytes read)."""
    from alexprep.imagenet_prep.samples import SplitSamples
    from alexprep.imagenet_prep.shards import read_split

    r: dict = {}
    with Clock() as c:
        index = read_split(root, "train")
    r["read_split_s"] = c.wall
    r["shards"], r["rows"] = len(index.shards), index.rows
    SplitSamples(index)  # warm the page cache
    with Clock() as c:
        SplitSamples(index)
    r["split_samples_warm_s"], r["split_samples_warm_cpu"] = c.wall, c.cpu
    files = sorted((root / "train").glob("*.arrow"))
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    read0 = read_bytes()
    with Clock() as c:
        SplitSamples(index)
    r["split_samples_cold_s"], r["cold_read_mb"] = c.wall, (read_bytes() - read0) / 1e6
    r["shard_mb"] = sum(f.stat().st_size for f in files) / 1e6
    return r


def _time_imagenet_loaders(root: Path, n: int, stats, backend: str) -> dict:
    """train_loader's construction, epoch plan, batch plans, first batch and bytes per
    sample (tracemalloc); eval_loader's construction."""
    import tracemalloc

    from alexprep.imagenet_prep.loaders import eval_loader, train_loader

    b: dict = {}
    tracemalloc.start()
    with Clock() as c:
        loader = train_loader(root, batch_size=128, device="cpu", seed=0, stats=stats, backend=backend, workers=2)
    b["train_loader_s"] = c.wall
    with Clock() as c:
        plan = loader.plan(0)
    b["plan_s"] = c.wall
    loader.plan(1)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    b["held_bytes_per_sample"], b["peak_bytes_per_sample"] = held / n, peak / n
    with Clock() as c:
        for _ in plan:
            pass
    b["epoch_batch_plans_s"] = c.wall
    with Clock() as c:
        it = iter(loader)
        next(it)
    b["first_batch_s"] = c.wall
    loader.close()
    del it, loader
    with Clock() as c:
        ev = eval_loader(root, batch_size=128, device="cpu", split="train", stats=stats, backend=backend, workers=2)
    b["eval_loader_s"] = c.wall
    ev.close()
    return b


STAGES = {"build": stage_build, "stats": stage_stats, "verify": stage_verify, "index": stage_index,
          "loader": stage_loader, "train": stage_train, "evaluate": stage_evaluate, "neighbors": stage_neighbors,
          "imagenet_index": stage_imagenet_index}


def run_stage(name: str, params: dict, log, timeout: float = 3600) -> dict:
    """Run one stage in a fresh interpreter; its result with wall time and peak RSS."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--stage", name, "--params", json.dumps(params)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t
    log(f"  {name:10s} {result['process_s']:7.1f} s  peak {result['mem']['peak_mb']:.0f} MB"
        f" (children {result['mem']['children_peak_mb']:.0f} MB)")
    return result


def stage_main(name: str, params: str) -> None:
    result = STAGES[name](json.loads(params))
    result["mem"] = memory()
    print(json.dumps(result))


# ---------------------------------------------------------------------------- analysis
def fit(ns, ys) -> tuple[float, float]:
    """Least-squares (fixed, per_image) of y = fixed + per_image * n; fixed is floored at 0."""
    ns, ys = np.asarray(ns, float), np.asarray(ys, float)
    if len(ns) < 2:
        return 0.0, float(ys[0] / ns[0])
    per, fixed = np.polyfit(ns, ys, 1)
    if fixed < 0:
        return 0.0, float((ns * ys).sum() / (ns * ns).sum())
    if per < 0:  # noise: the cost does not grow
        return float(ys.mean()), 0.0
    return float(fixed), float(per)


# Each cost: (label, how to read it from a size's results, kind, cores it used).
# kind "per_image": a per-image cost that grows with N; "fixed": should not grow (the
# targets' fixed costs); "rate": a per-image cost measured on a fixed number of images.
def cost_table(backends: list[str]) -> list[tuple]:
    rows = [
        ("build-shards (train)", lambda r: r["build"]["cpu_s"], "per_image", BUILD_WORKERS),
        ("stats", lambda r: r["stats"]["cpu_s"], "per_image", 1),
        ("verify", lambda r: r["verify"]["cpu_s"], "per_image", 1),
        ("manifest read", lambda r: r["index"]["manifest_cpu"], "fixed", 1),
        ("split index (SplitSamples)", lambda r: r["index"]["samples_cpu"], "fixed", 1),
        ("split index, cold page cache (wall)", lambda r: r["index_cold"]["samples_s"], "fixed", 1),
    ]
    for b in backends:
        rows += [
            (f"train_loader() [{b}]", lambda r, b=b: r[f"loader_{b}"]["construct_cpu"], "fixed", 1),
            (f"epoch plan [{b}]", lambda r, b=b: r[f"loader_{b}"]["plan_cpu"], "fixed", 1),
            (f"first batch [{b}]", lambda r, b=b: r[f"loader_{b}"]["first_batch_cpu"], "fixed", LOADER_WORKERS),
            (f"eval_loader() [{b}]", lambda r, b=b: r[f"loader_{b}"]["eval_construct_cpu"], "fixed", 1),
            (f"eval first batch [{b}]", lambda r, b=b: r[f"loader_{b}"]["eval_first_batch_cpu"], "fixed",
             LOADER_WORKERS),
            (f"epoch's batch plans (draws) [{b}]", lambda r, b=b: r[f"loader_{b}"]["plan_batches_cpu"], "per_image", 1),
            (f"loading, per image [{b}]", lambda r, b=b: r[f"loader_{b}"]["cpu_per_image_s"], "rate", 1),
        ]
    rows += [
        ("trainer set-up (loaders, model)", lambda r: r["train"]["setup_s"], "fixed", 1),
        ("training step (batch 32, CPU)", lambda r: float(np.median(r["train"]["step_s"][1:] or r["train"]["step_s"])),
         "step", 0),
        ("checkpoint save", lambda r: r["train"]["ckpt_save_s"], "fixed", 1),
        ("checkpoint load", lambda r: r["train"]["ckpt_load_s"], "fixed", 1),
        ("evaluate 1 crop, per image", lambda r: 1 / r["evaluate"]["crops1"]["images_per_s"], "rate", 0),
        ("evaluate 10 crops, per image", lambda r: 1 / r["evaluate"]["crops10"]["images_per_s"], "rate", 0),
        ("fc7 features, per image", lambda r: r["neighbors"]["per_image_s"], "rate", 0),
        ("features cache hit", lambda r: r["neighbors"]["hit_s"], "fixed", 1),
        ("neighbour search over N", lambda r: r["neighbors"]["search_s"], "per_image", 1),
    ]
    return rows


def analyse(sizes: list[int], results: dict, backends: list[str], cores: int) -> list[dict]:
    out = []
    for label, get, kind, used in cost_table(backends):
        try:
            ys = [get(results[n]) for n in sizes]
        except (KeyError, ZeroDivisionError, TypeError):
            continue
        row = {"stage": label, "kind": kind, "cores_used": used, "sizes": sizes, "values_s": ys}
        if kind in ("per_image", "fixed"):
            fixed, per = fit(sizes, ys)
            row.update(fixed_s=fixed, per_image_s=per, per_image_at_size_s=[y / n for y, n in zip(ys, sizes)])
            row["per_image_growth"] = row["per_image_at_size_s"][-1] / row["per_image_at_size_s"][0] - 1
            # The costs are CPU seconds (all processes and threads): one core takes that long; a
            # stage that runs in parallel (build's workers) takes 1/16 of it on 16 cores (assumed
            # linear), the others the same (they run on one core).
            parallel = kind == "per_image" and used > 1
            core = per * IMAGENET_TRAIN  # CPU seconds: what one core takes
            row["imagenet_1core_s"] = fixed + core
            row["imagenet_16core_s"] = fixed + (core / TARGET_CORES if parallel else core)
        elif kind == "rate":
            per = float(np.mean(ys))
            row.update(per_image_s=per, per_image_growth=ys[-1] / ys[0] - 1)
            n = IMAGENET_VAL if label.startswith(("evaluate", "eval")) else IMAGENET_TRAIN
            core_factor = max(1, used) if used else cores
            row["imagenet_images"] = n
            row["imagenet_1core_s"] = per * n * core_factor
            row["imagenet_16core_s"] = per * n * core_factor / TARGET_CORES
        else:  # a training step: per step, not per image
            row.update(per_step_s=float(np.mean(ys)))
        out.append(row)
    return out


def rss_table(sizes: list[int], results: dict, backends: list[str]) -> list[dict]:
    """Peak RSS per stage and size, and its growth per sample between the smallest and largest."""
    rows = []
    specs = [("build-shards main", lambda r: r["build"]["mem"]["peak_mb"]),
             ("build-shards worker", lambda r: r["build"]["mem"]["children_peak_mb"]),
             ("build-shards, all processes: PSS", lambda r: r["build"]["pss_peak_mb"]),
             ("build-shards, all processes: anon PSS", lambda r: r["build"]["pss_anon_peak_mb"]),
             ("build-shards, all processes: median anon PSS", lambda r: r["build"].get("pss_anon_median_mb", 0)),
             ("stats", lambda r: r["stats"]["mem"]["peak_mb"]),
             ("verify", lambda r: r["verify"]["mem"]["peak_mb"]),
             ("split index (anon)", lambda r: r["index"]["samples_anon_mb"]),
             ("split index, cold: MB read from disk", lambda r: r["index_cold"]["read_mb"])]
    for b in backends:
        specs += [(f"loaders [{b}], all processes: PSS", lambda r, b=b: r[f"loader_{b}"]["pss_peak_mb"]),
                  (f"loaders [{b}], all processes: anon PSS", lambda r, b=b: r[f"loader_{b}"]["pss_anon_peak_mb"]),
                  (f"loaders [{b}]: numpy+Python held (tracemalloc)", lambda r, b=b: r[f"loader_{b}"]["traced_held_mb"]),
                  (f"loaders [{b}]: numpy+Python peak (tracemalloc)", lambda r, b=b: r[f"loader_{b}"]["traced_peak_mb"]),
                  (f"loaders [{b}] main", lambda r, b=b: r[f"loader_{b}"]["mem"]["peak_mb"]),
                  (f"loaders [{b}] main, anon at end", lambda r, b=b: r[f"loader_{b}"]["mem"]["anon_mb"]),
                  (f"loaders [{b}] workers", lambda r, b=b: r[f"loader_{b}"]["mem"]["children_peak_mb"]),
                  (f"loaders [{b}] main, anon after batches", lambda r, b=b: r[f"loader_{b}"]["mem_loaded"]["anon_mb"]),
                  (f"loaders [{b}] workers, anon after batches", lambda r, b=b: r[f"loader_{b}"]["workers_anon_mb"])]
    specs += [("train (3 steps)", lambda r: r["train"]["mem"]["peak_mb"])]
    for label, get in specs:
        try:
            mb = [get(results[n]) for n in sizes]
        except KeyError:
            continue
        per = (mb[-1] - mb[0]) * 2**20 / (sizes[-1] - sizes[0]) if len(sizes) > 1 else 0.0
        rows.append({"stage": label, "peak_mb": mb, "bytes_per_sample": per,
                     "imagenet_mb": mb[-1] + per * (IMAGENET_TRAIN - sizes[-1]) / 2**20})
    return rows


def plot(path: Path, costs: list[dict], sizes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in costs if "fixed_s" in c]
    cols = 4
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    xs = np.geomspace(min(sizes), IMAGENET_TRAIN, 50)
    for ax, c in zip(axes.flat, shown):
        ax.loglog(sizes, c["values_s"], "o", color="C0", label="measured")
        ax.loglog(xs, c["fixed_s"] + c["per_image_s"] * xs, "--", color="C1", label="fit, extrapolated")
        ax.axvline(IMAGENET_TRAIN, color="0.7", lw=0.8)
        ax.set_title(c["stage"], fontsize=9)
        ax.set_xlabel("training images N", fontsize=8)
        ax.set_ylabel("s", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("alexprep: cost against N (dashed: fixed + per-image fit, to ImageNet-1k's 1.28 M)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fmt_s(s: float) -> str:
    return f"{s * 1e6:.0f} µs" if s < 1e-2 else f"{s:.2f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def report(costs: list[dict], rss: list[dict], sizes: list[int]) -> str:
    lines = ["stage | " + " | ".join(f"N={n}" for n in sizes) + " | fixed | per image | growth | 1.28M 1 core | 1.28M 16 cores"]
    for c in costs:
        vals = " | ".join(fmt_s(v) for v in c["values_s"])
        if "per_step_s" in c:
            lines.append(f"{c['stage']} | {vals} | | | | |")
            continue
        fixed = fmt_s(c["fixed_s"]) if "fixed_s" in c else ""
        lines.append(f"{c['stage']} | {vals} | {fixed} | {fmt_s(c['per_image_s'])} | {c['per_image_growth'] * 100:+.0f}% "
                     f"| {fmt_s(c['imagenet_1core_s'])} | {fmt_s(c['imagenet_16core_s'])}")
    lines.append("")
    lines.append("peak RSS | " + " | ".join(f"N={n}" for n in sizes) + " | bytes/sample | at 1.28M")
    for r in rss:
        lines.append(f"{r['stage']} | " + " | ".join(f"{m:.0f} MB" for m in r["peak_mb"])
                     + f" | {r['bytes_per_sample']:.0f} | {r['imagenet_mb']:.0f} MB")
    return "\n".join(lines)


def targets(costs: list[dict], rss: list[dict]) -> dict:
    per_image = {c["stage"]: c["per_image_growth"] for c in costs
                 if c["stage"].startswith(("build", "stats", "loading"))}
    fixed = {c["stage"]: c["fixed_s"] + c["per_image_s"] * IMAGENET_TRAIN for c in costs
             if c["kind"] == "fixed" and not c["stage"].startswith(("checkpoint", "features", "trainer"))}
    mem = {r["stage"]: r["bytes_per_sample"] for r in rss if r["stage"].startswith(("build", "loaders", "split"))
           and "read from disk" not in r["stage"]}
    return {
        "per_image_growth_le_10pct": {k: [v, v <= 0.10] for k, v in per_image.items()},
        "rss_lt_100_bytes_per_sample": {k: [v, v < 100] for k, v in mem.items()},
        "fixed_at_1.28M_lt_30s": {k: [v, v < 30] for k, v in fixed.items()},
    }


# ---------------------------------------------------------------------------- main
@dataclass
class Setup:
    """What main's steps share: the flags, the folders, the loader backends, the log."""
    args: argparse.Namespace
    sizes: list[int]
    backends: list[str]
    cache: Path  # generated images of this class count
    builds: Path  # builds, under cache
    out: Path
    log: Callable[[str], None]
    val_out: Path | None = None  # the validation build, linked into each size's build
    small_out: Path | None = None  # the small validation build for the neighbours stage


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes 10k and 30k")
    ap.add_argument("--sizes", help="comma-separated training-set sizes (default 10000,30000,100000)")
    ap.add_argument("--classes", type=int, default=IMAGENET_CLASSES)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"generated images and builds ({DEFAULT_CACHE})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--backends", default=None, help="loader backends to measure (default: torch, and dali if installed)")
    ap.add_argument("--batch", type=int, default=64, help="loader batch size")
    ap.add_argument("--batches", type=int, default=20, help="batches timed for images/s")
    ap.add_argument("--eval-images", type=int, default=256)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--gen-workers", type=int, default=2)
    ap.add_argument("--no-imagenet-index", action="store_true",
                    help="skip the direct measurement of the index at 1.28 M rows (2.2 GB of shards, ~2 min)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    return ap.parse_args()


def make_setup(args: argparse.Namespace) -> Setup:
    sizes = [int(s) for s in (args.sizes or ("10000,30000" if args.quick else "10000,30000,100000")).split(",")]
    if args.backends:
        backends = args.backends.split(",")
    else:
        from alexprep.imagenet_prep.loaders import pick_backend

        backends = ["torch"] + (["dali"] if pick_backend("auto") == "dali" else [])
    cache = args.cache.expanduser() / f"c{args.classes}"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    builds = cache / "builds"
    builds.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    return Setup(args, sizes, backends, cache, builds, out, log)


def prepare_source(st: Setup, info: dict, n_val: int) -> None:
    """Generate (or reuse) the source images; their statistics into info."""
    args, sizes = st.args, st.sizes
    info["generation"] = generate(st.cache, args.classes, max(sizes), n_val, args.gen_workers, st.log)
    sample = sorted(set(range(0, max(sizes), max(1, max(sizes) // 2000))) | {CMYK_FIRST, PNG_AT})
    info["source"] = source_stats([pool_path(st.cache, args.classes, k) for k in sample if k < max(sizes)])
    st.log(f"source: {info['source']}")


def build_val(st: Setup, n_val: int) -> dict:
    """The validation builds (full and small) where missing; the full one's build stage result."""
    # The validation build: built once (same classes and options as every train build, so the
    # same build id), linked into each size's build folder.
    st.val_out = st.builds / f"val-{n_val}"
    val_info = {}
    if not (st.val_out / "val" / "manifest.json").exists():
        st.log(f"building the validation split ({n_val} images)")
        val_info = run_stage("build", {"src": str(st.cache / "val"), "out": str(st.val_out), "split": "val",
                                       "workers": BUILD_WORKERS}, st.log)
    small_n = min(n_val, 128)
    st.small_out = st.builds / f"val-small-{small_n}"
    if not (st.small_out / "val" / "manifest.json").exists():
        run_stage("build", {"src": str(small_val_tree(st.cache, st.args.classes, small_n)), "out": str(st.small_out),
                            "split": "val", "workers": BUILD_WORKERS}, st.log)
    return val_info


def measure_size(st: Setup, n: int) -> dict:
    """Every stage at training-set size n, each in its own subprocess."""
    args, backends, builds, log = st.args, st.backends, st.builds, st.log
    log(f"N = {n}")
    tree = train_tree(st.cache, args.classes, n)
    bout = builds / f"train-{n}"
    r: dict = {}
    r["build"] = run_stage("build", {"src": str(tree), "out": str(bout), "split": "train",
                                     "workers": BUILD_WORKERS}, log)
    r["stats"] = run_stage("stats", {"out": str(bout)}, log)
    r["verify"] = run_stage("verify", {"out": str(bout)}, log)
    (bout / "val").symlink_to((st.val_out / "val").resolve())
    r["index"] = run_stage("index", {"out": str(bout)}, log)
    r["index_cold"] = run_stage("index", {"out": str(bout), "cold": True}, log)
    for b in backends:
        r[f"loader_{b}"] = run_stage("loader", {"out": str(bout), "backend": b, "batch": args.batch,
                                                "batches": args.batches, "workers": LOADER_WORKERS}, log)
    ckpt = builds / "scale-checkpoint.pt"
    r["train"] = run_stage("train", {"out": str(bout), "run_dir": str(builds / "run"), "batch": 32,
                                     "steps": args.train_steps, "backend": backends[0],
                                     "workers": LOADER_WORKERS, "threads": 2, "ckpt_copy": str(ckpt)}, log)
    r["evaluate"] = run_stage("evaluate", {"val_root": str(st.val_out), "ckpt": str(ckpt), "images": args.eval_images,
                                           "backend": backends[0], "workers": LOADER_WORKERS, "threads": 2}, log)
    r["neighbors"] = run_stage("neighbors", {"root": str(st.small_out), "ckpt": str(ckpt), "base_rows": n,
                                             "cache_dir": str(builds / "features"), "backend": backends[0],
                                             "workers": LOADER_WORKERS, "threads": 2}, log)
    shutil.rmtree(builds / "run", ignore_errors=True)
    return r


def write_report(st: Setup, info: dict, results: dict[int, dict], started: float) -> None:
    """Fits, targets, scale.json, scale.png, scale.txt, and the summary on stdout."""
    out = st.out
    done = sorted(results)
    costs = analyse(done, results, st.backends, info["machine"]["cores"])
    rss = rss_table(done, results, st.backends)
    info["machine"]["loadavg_at_end"] = os.getloadavg()
    payload = {**info, "wall_s": time.perf_counter() - started, "costs": costs, "rss": rss,
               "targets": targets(costs, rss), "results": {str(k): v for k, v in results.items()}}
    (out / "scale.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(out / "scale.png", costs, done)
    text = report(costs, rss, done)
    if "imagenet_index" in info:
        text += "\n\nImageNet-1k's index, measured at 1,281,167 rows:\n" + json.dumps(
            {k: v for k, v in info["imagenet_index"].items() if k != "mem"}, indent=1)
    (out / "scale.txt").write_text(text + "\n")
    print(text)
    print(json.dumps(payload["targets"], indent=1))
    print(f"wrote {out / 'scale.json'}, {out / 'scale.png'} in {payload['wall_s'] / 60:.1f} min")


def main() -> None:
    args = parse_args()
    if args.stage:
        return stage_main(args.stage, args.params)

    st = make_setup(args)
    started = time.perf_counter()
    info = {"machine": machine(), "sizes": st.sizes, "classes": args.classes, "backends": st.backends,
            "build_workers": BUILD_WORKERS, "loader_workers": LOADER_WORKERS, "batch": args.batch}
    n_val = args.classes * args.val_per_class
    prepare_source(st, info, n_val)
    info["val_build"] = build_val(st, n_val)
    if not args.no_imagenet_index:
        st.log("ImageNet-1k's index (1,281,167 rows of small JPEGs, 1,252 shards), measured directly")
        info["imagenet_index"] = run_stage("imagenet_index", {"root": str(args.cache.expanduser() / "imagenet-index"),
                                                              "backends": st.backends}, st.log)

    results: dict[int, dict] = {}
    for n in st.sizes:
        results[n] = measure_size(st, n)
        payload = {**info, "results": {str(k): v for k, v in results.items()}}
        (st.out / "scale.json").write_text(json.dumps(payload, indent=1) + "\n")  # partial, in case of a later failure
    write_report(st, info, results, started)


if __name__ == "__main__":
    main()
