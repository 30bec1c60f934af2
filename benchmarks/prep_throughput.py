"""How fast build-shards turns JPEGs into 256x256 shards, against what users would write.

Run: python -m benchmarks.prep_throughput [--quick]

On a corpus of real-photo JPEGs with ImageNet's mix of sizes and qualities, per image
and per size bucket, in one run, alternating contenders after a warm-up:
  (a) build-shards' per-image path: read, draft decode, box resize, centre crop, q95 encode,
      statistics partial (and the same without statistics: their cost);
  (b) the plain path users write with stock Pillow (open, convert, resize the shorter
      side, centre crop, save; no draft), run in its own venv since Pillow and
      pillow-simd both own `PIL`;
  (c) OpenCV: imdecode, INTER_AREA resize, crop, imencode q95;
  (d) decode only, with draft: the limit for any path that must decode.
Then whole builds (listing, Arrow writing included) with 1 and 2 workers, with and without
statistics, against FFCV's `DatasetWriter` over the same source JPEGs with 1 and 2 workers
(`RGBImageField(max_resolution=256, jpeg_quality=95)`, its closest setting: it caps the
longer side at 256 and keeps the aspect ratio, where we crop 256x256; run in FFCV's own
venv from `make ffcv-env`, fed PIL RGB images as its ImageNet example's ImageFolder does),
with output bytes per image, and peak RSS of a build of N and 10N images. Every ratio is
also given per repeat (both sides timed in the same repeat) with its spread. Writes
prep_throughput.json and .png into --out (benchmarks/out/; --publish: also
benchmarks/results/).
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from alexprep.imagenet_prep import archives
from alexprep.imagenet_prep.build import BuildConfig, build_shards
from alexprep.imagenet_prep.sample_data import size_bucket
from alexprep.imagenet_prep.stats import PartialStats
from alexprep.imagenet_prep.transform import ImageSpec, encode, load_center_crop
from benchmarks import common
from benchmarks.common import machine, summary

SPEC = ImageSpec()
PILLOW_VENV = Path(__file__).resolve().parent / ".pillow-venv"
IMAGENET_IMAGES = 1_281_167 + 50_000


ACCUMULATOR = PartialStats.empty()  # one per shard in a build: allocated once, as there


def ours(data: bytes, with_stats: bool) -> bytes:
    pixels = load_center_crop(data, SPEC)
    if with_stats:
        ACCUMULATOR.add(pixels)
    return encode(pixels, SPEC)


def opencv_path(data: bytes) -> bytes:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    h, w = bgr.shape[:2]
    s = 256 / min(w, h)
    bgr = cv2.resize(bgr, (max(256, round(w * s)), max(256, round(h * s))), interpolation=cv2.INTER_AREA)
    top, left = (bgr.shape[0] - 256) // 2, (bgr.shape[1] - 256) // 2
    return cv2.imencode(".jpg", bgr[top:top + 256, left:left + 256], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def decode_only(data: bytes) -> None:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (256, 256))
    img.load()


CPU_SECONDS: dict[str, list[float]] = {}  # per contender, per run: this thread's CPU time over the corpus


def time_each(files: dict[Path, bytes], fn, name: str | None = None) -> dict[Path, float]:
    """Wall seconds per file; the run's CPU time (thread_time, which others' jobs on a
    shared machine inflate far less than wall time) goes to CPU_SECONDS[name]."""
    out = {}
    cpu = time.thread_time()
    for path, data in files.items():
        t = time.perf_counter()
        fn(data)
        out[path] = time.perf_counter() - t
    if name:
        CPU_SECONDS.setdefault(name, []).append(time.thread_time() - cpu)
    return out


def pillow_env() -> tuple[Path | None, str]:
    """A venv with stock Pillow for contender (b); created once with pip."""
    python = PILLOW_VENV / "bin" / "python"
    if not python.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(PILLOW_VENV)], check=True, capture_output=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "pillow"], check=True, capture_output=True, timeout=300)
        except (subprocess.SubprocessError, OSError) as exc:
            shutil.rmtree(PILLOW_VENV, ignore_errors=True)
            return None, f"could not create a stock-Pillow venv: {exc}"
    return python, ""


def time_plain(python: Path, files: list[Path]) -> dict[Path, float]:
    script = common.HERE / "plain_pillow.py"
    result = subprocess.run([str(python), str(script)], input="\n".join(map(str, files)), capture_output=True,
                            text=True, check=True)
    payload = json.loads(result.stdout)
    time_plain.version = payload["pil"]
    return {Path(p): t for p, t in payload["times"].items()}


LAST_BUILD_BYTES_PER_IMAGE = {}
BUILD_CPU_SECONDS: dict[str, list[float]] = {}  # "1 worker"/"2 workers": CPU of main + workers per build


def _cpu_with_children() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def build_time(src: Path, workers: int, stats: bool) -> float:
    out = Path(tempfile.mkdtemp(prefix="prep_bench_out"))
    try:
        cpu = _cpu_with_children()
        t = time.perf_counter()
        report = build_shards(src, out / "o", BuildConfig(workers=workers, accumulate_stats=stats, shard_size=32))
        seconds = time.perf_counter() - t
        if stats:  # the pool's workers are reaped when build_shards returns, so their CPU is in
            BUILD_CPU_SECONDS.setdefault(f"{workers} worker{'s' * (workers > 1)}", []).append(
                _cpu_with_children() - cpu)
        written = sum(r.written for r in report.splits)
        LAST_BUILD_BYTES_PER_IMAGE["build-shards"] = sum(r.bytes for r in report.splits) / max(written, 1)
        return seconds
    finally:
        shutil.rmtree(out)


def pack_as_downloaded(tree: Path, downloads: Path) -> Path:
    """tree/train/<wnid>/* as image-net.org ships it: ILSVRC2012_img_train.tar, a tar of one
    uncompressed tar per class (issue #17: build-shards reads it in place)."""
    downloads.mkdir(parents=True, exist_ok=True)
    train_tar = downloads / archives.TRAIN_TAR
    with tarfile.open(train_tar, "w", format=tarfile.GNU_FORMAT) as outer:
        for cls in sorted((tree / "train").iterdir()):
            class_tar = downloads / f"{cls.name}.tar"
            with tarfile.open(class_tar, "w", format=tarfile.GNU_FORMAT) as inner:
                for path in sorted(cls.iterdir()):
                    inner.add(path, arcname=path.name, recursive=False)
            outer.add(class_tar, arcname=class_tar.name)
            class_tar.unlink()
    return train_tar


def listing_us_per_image(train_tar: Path, images: int, repeats: int = 3) -> dict:
    """Reading the train tar's index (headers only, one process): microseconds per image."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in archives.splits_in_archive(train_tar)["train"].scan()[1]:
            pass
        times.append(1e6 * (time.perf_counter() - t) / images)
    return summary(times)


def ffcv_write_time(python: Path, items: Path, workers: int) -> float:
    """Seconds for FFCV's DatasetWriter over the source JPEGs listed in `items` (its own
    process start and imports not counted; its worker pool's start is)."""
    out = Path(tempfile.mkdtemp(prefix="prep_bench_ffcv"))
    try:
        got = subprocess.run([str(python), str(common.FFCV_SIDE), "write-files", str(items), str(out / "w.beton"),
                              "--workers", str(workers), "--max-resolution", "256", "--quality", "95"],
                             capture_output=True, text=True, check=True)
        answer = json.loads(got.stdout.strip().splitlines()[-1])
        LAST_BUILD_BYTES_PER_IMAGE["ffcv"] = answer["bytes"] / answer["images"]
        return answer["seconds"]
    finally:
        shutil.rmtree(out)


def peak_rss_of_build(src: Path) -> float:
    """Peak RSS in MB of the largest process of a CLI build (main or worker)."""
    out = Path(tempfile.mkdtemp(prefix="prep_bench_rss"))
    code = ("import resource, sys; from alexprep.cli.main import cli\n"
            "try:\n    cli([sys.argv[1], sys.argv[2], '--workers', '2'])\nexcept SystemExit:\n    pass\n"
            "r = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
            "print(r)")
    try:
        result = subprocess.run([sys.executable, "-c", code, str(src), str(out / "o"), "build-shards"],
                                capture_output=True, text=True, check=True)
        return int(result.stdout.strip().splitlines()[-1]) / 1024
    finally:
        shutil.rmtree(out)


@dataclass
class PerImage:
    """The per-image contenders' timings over the small corpus."""
    paths: list[Path]
    buckets: dict[Path, str]  # size bucket of each image
    bucket_names: list[str]
    runs: dict[str, list[dict]]  # contender -> per repeat, seconds per image
    per_image: dict[str, dict]  # contender -> "all" and each bucket -> images/s summary
    why_not: str  # why stock Pillow (b) was skipped, "" if it was not


@dataclass
class WholeBuilds:
    """Whole builds (ours and FFCV's writer) over the larger corpus."""
    images: int
    builds: dict[str, list[float]]  # name -> images/s per repeat
    whole: dict[str, dict]  # name -> summary of builds[name]
    ffcv_info: dict
    archive_listing_us_per_image: dict  # reading the train tar's headers, one process


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller RSS corpus")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=None)
    common.add_output_args(parser)
    return parser.parse_args()


def measure_per_image(work: Path, images: int, repeats: int) -> PerImage:
    print(f"writing a corpus of {images} real-photo JPEGs ...", flush=True)
    paths = common.corpus(work / "corpus", images, seed=0)
    files = {p: p.read_bytes() for p in paths}
    sizes = {p: Image.open(p).size for p in paths}
    buckets = {p: size_bucket(*sizes[p]) for p in paths}
    python, why_not = pillow_env()
    contenders = {
        "a_build_shards_path": lambda: time_each(files, lambda d: ours(d, True), "a_build_shards_path"),
        "a_without_stats": lambda: time_each(files, lambda d: ours(d, False), "a_without_stats"),
        "c_opencv": lambda: time_each(files, opencv_path, "c_opencv"),
        "d_decode_only_draft": lambda: time_each(files, decode_only, "d_decode_only_draft"),
    }
    if python:
        contenders["b_plain_stock_pillow"] = lambda: time_plain(python, paths)
    for fn in contenders.values():  # warm-up: page cache, imports, allocators
        fn()
    CPU_SECONDS.clear()
    runs: dict[str, list[dict]] = {k: [] for k in contenders}
    for r in range(repeats):
        for name, fn in contenders.items():  # alternating
            runs[name].append(fn())
        print(f"  repeat {r + 1}/{repeats} done", flush=True)

    def rate(name: str, subset) -> dict:
        per_repeat = [len(subset) / sum(run[p] for p in subset) for run in runs[name]]
        return summary(per_repeat)

    bucket_names = sorted(set(buckets.values()))
    per_image = {name: {"all": rate(name, paths), **{b: rate(name, [p for p in paths if buckets[p] == b])
                                                     for b in bucket_names}} for name in contenders}
    return PerImage(paths, buckets, bucket_names, runs, per_image, why_not)


def measure_whole_builds(work: Path, big: Path, images: int, repeats: int) -> WholeBuilds:
    big_paths = common.corpus(big, images, seed=1)
    ffcv_python, ffcv_info = common.ffcv_python()
    items = work / "ffcv-items.json"
    wnids = sorted({p.parent.name for p in big_paths})
    items.write_text(json.dumps([[str(p), wnids.index(p.parent.name)] for p in big_paths]))
    # Whole builds on the larger corpus, in shards of 32, so that shard imbalance and the
    # fixed costs (listing, pool start, manifests) do not hide how the workers scale.
    print(f"whole builds of {len(big_paths)} images (1 and 2 workers, with and without statistics"
          + (", FFCV's writer" if ffcv_python else "") + ") ...", flush=True)
    downloads = work / "downloads"
    train_tar = pack_as_downloaded(big, downloads)
    whole_builds = {"1 worker": lambda: build_time(big, 1, True),
                    "1 worker, no stats": lambda: build_time(big, 1, False),
                    "2 workers": lambda: build_time(big, 2, True),
                    "1 worker, archive": lambda: build_time(downloads, 1, True),
                    "2 workers, archive": lambda: build_time(downloads, 2, True)}
    if ffcv_python:
        whole_builds["ffcv writer, 1 worker"] = lambda: ffcv_write_time(ffcv_python, items, 1)
        whole_builds["ffcv writer, 2 workers"] = lambda: ffcv_write_time(ffcv_python, items, 2)
    builds: dict[str, list[float]] = {k: [] for k in whole_builds}
    for name in ("1 worker", "1 worker, archive", "ffcv writer, 1 worker"):  # warm-up: page cache, imports
        if name in whole_builds:
            whole_builds[name]()
    for r in range(repeats):
        for name, fn in (whole_builds.items() if r % 2 == 0 else reversed(whole_builds.items())):
            builds[name].append(len(big_paths) / fn())
        print(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in builds.items()),
              flush=True)
    whole = {k: summary(v) for k, v in builds.items()}
    listing = listing_us_per_image(train_tar, len(big_paths))
    return WholeBuilds(len(big_paths), builds, whole, ffcv_info, listing)


def _minus_one(ratio: dict) -> dict:
    """An overhead from a ratio: every value (and per-repeat value) less 1."""
    return {key: (v - 1 if isinstance(v, float) else [x - 1 for x in v] if isinstance(v, list) else v)
            for key, v in ratio.items()}


def ratios_per_repeat(runs: dict[str, list[dict]], builds: dict[str, list[float]], repeats: int) -> dict:
    per_repeat = {  # each a ratio of two contenders timed in the same repeat: its spread over repeats
        "a_over_d": common.ratio_summary([1 / sum(r.values()) for r in runs["a_build_shards_path"]],
                                         [1 / sum(r.values()) for r in runs["d_decode_only_draft"]]),
        "stats_overhead_per_image": common.ratio_summary([sum(r.values()) for r in runs["a_build_shards_path"]],
                                                         [sum(r.values()) for r in runs["a_without_stats"]]),
        "stats_overhead_whole_build": common.ratio_summary(builds["1 worker, no stats"], builds["1 worker"]),
        "two_workers_over_one": common.ratio_summary(builds["2 workers"], builds["1 worker"]),
        "archive_over_tree_1_worker": common.ratio_summary(builds["1 worker, archive"], builds["1 worker"]),
        "archive_over_tree_2_workers": common.ratio_summary(builds["2 workers, archive"], builds["2 workers"]),
    }
    if len(BUILD_CPU_SECONDS.get("2 workers", [])) >= repeats:  # CPU spent per image, 2 workers over 1
        per_repeat["two_workers_cpu_over_one"] = common.ratio_summary(BUILD_CPU_SECONDS["2 workers"][-repeats:],
                                                                      BUILD_CPU_SECONDS["1 worker"][-repeats:])
    cpu = CPU_SECONDS  # the same ratios from CPU time, per repeat
    per_repeat["a_over_d_cpu_time"] = common.ratio_summary(cpu["d_decode_only_draft"], cpu["a_build_shards_path"])
    per_repeat["stats_overhead_per_image_cpu_time"] = common.ratio_summary(cpu["a_build_shards_path"],
                                                                           cpu["a_without_stats"])
    for k in ("stats_overhead_per_image", "stats_overhead_whole_build", "stats_overhead_per_image_cpu_time"):
        per_repeat[k] = _minus_one(per_repeat[k])
    if "ffcv writer, 1 worker" in builds:
        per_repeat["build_shards_over_ffcv_writer_1_worker"] = common.ratio_summary(builds["1 worker"],
                                                                                    builds["ffcv writer, 1 worker"])
        per_repeat["build_shards_over_ffcv_writer_2_workers"] = common.ratio_summary(builds["2 workers"],
                                                                                     builds["ffcv writer, 2 workers"])
        per_repeat["ffcv_writer_2_workers_over_1"] = common.ratio_summary(builds["ffcv writer, 2 workers"],
                                                                          builds["ffcv writer, 1 worker"])
    return per_repeat


def median_ratios(per_image: dict[str, dict], whole: dict[str, dict]) -> dict:
    med = lambda name: per_image[name]["all"]["median"]  # noqa: E731
    ratios = {
        "a_over_d (target >= 0.6)": med("a_build_shards_path") / med("d_decode_only_draft"),
        "a_over_c_opencv": med("a_build_shards_path") / med("c_opencv"),
        "stats_overhead_per_image (target <= 0.15)": med("a_without_stats") / med("a_build_shards_path") - 1,
        "stats_overhead_whole_build": whole["1 worker, no stats"]["median"] / whole["1 worker"]["median"] - 1,
        "two_workers_over_one (target >= 1.8)": whole["2 workers"]["median"] / whole["1 worker"]["median"],
        "archive_over_tree_1_worker (target >= 0.9)": (
            whole["1 worker, archive"]["median"] / whole["1 worker"]["median"]),
        "archive_over_tree_2_workers (target >= 0.9)": (
            whole["2 workers, archive"]["median"] / whole["2 workers"]["median"]),
    }
    if "b_plain_stock_pillow" in per_image:
        ratios["a_over_b_plain (target >= 2)"] = med("a_build_shards_path") / med("b_plain_stock_pillow")
    if "ffcv writer, 1 worker" in whole:
        ratios["build_shards_over_ffcv_writer_1_worker (target >= 1.5)"] = (
            whole["1 worker"]["median"] / whole["ffcv writer, 1 worker"]["median"])
        ratios["build_shards_over_ffcv_writer_2_workers"] = (
            whole["2 workers"]["median"] / whole["ffcv writer, 2 workers"]["median"])
    return ratios


def check_targets(ratios: dict, whole: dict[str, dict]) -> dict:
    targets = {  # issue #13's targets, each against the median ratio of this run
        "a_over_d >= 0.6": ratios["a_over_d (target >= 0.6)"] >= 0.6,
        "stats_overhead_per_image <= 0.10": ratios["stats_overhead_per_image (target <= 0.15)"] <= 0.10,
        "two_workers_over_one >= 1.8": ratios["two_workers_over_one (target >= 1.8)"] >= 1.8,
        "archive_over_tree >= 0.9 (issue #17)": min(ratios["archive_over_tree_1_worker (target >= 0.9)"],
                                                    ratios["archive_over_tree_2_workers (target >= 0.9)"]) >= 0.9,
    }
    if "ffcv writer, 1 worker" in whole:
        targets["build_shards_over_ffcv_writer_1_worker >= 1.5"] = (
            ratios["build_shards_over_ffcv_writer_1_worker (target >= 1.5)"] >= 1.5)
    return targets


def build_result(pi: PerImage, wb: WholeBuilds, repeats: int, rss: dict) -> dict:
    ratios = median_ratios(pi.per_image, wb.whole)
    per_core = wb.whole["1 worker"]["median"]
    hours_16 = IMAGENET_IMAGES / (per_core * 16 * min(1.0, ratios["two_workers_over_one (target >= 1.8)"] / 2)) / 3600
    paths, buckets = pi.paths, pi.buckets
    return {
        "benchmark": "prep_throughput",
        "machine": machine(),
        "whole_build_images": wb.images,
        "corpus": {"images": len(paths), "buckets": {b: sum(1 for p in paths if buckets[p] == b)
                                                     for b in pi.bucket_names}},
        "repeats": repeats,
        "per_image_images_per_s_one_core": pi.per_image,
        "whole_build_images_per_s": wb.whole,
        "ratios": ratios,
        "ratios_per_repeat": ratios_per_repeat(pi.runs, wb.builds, repeats),
        "targets": check_targets(ratios, wb.whole),
        "output_bytes_per_image": dict(LAST_BUILD_BYTES_PER_IMAGE),
        "per_image_cpu_ms_one_core": {k: summary([1e3 * v / len(paths) for v in vs]) for k, vs in CPU_SECONDS.items()},
        "ffcv": {**wb.ffcv_info, "field": "RGBImageField(write_mode='jpg', max_resolution=256, jpeg_quality=95): "
                                         "longer side capped at 256, aspect ratio kept (ours: a 256x256 crop)",
                 "dataset": "PIL Image.open(path).convert('RGB') per index (torchvision ImageFolder's loader)"},
        "peak_rss_mb": rss,
        "archive": {"what": "the larger corpus packed as ILSVRC2012_img_train.tar (a tar of per-class tars), "
                            "built in place; ratios archive_over_tree_* above",
                    "listing_us_per_image_one_process": wb.archive_listing_us_per_image},
        "imagenet_1k_hours_on_16_cores_extrapolated": hours_16,
        "plain_pillow": {"version": getattr(time_plain, "version", None), "skipped": pi.why_not or None},
    }


def main() -> None:
    args = parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    rss_sizes = (args.images, args.images * (4 if args.quick else 10))
    work = Path(tempfile.mkdtemp(prefix="prep_bench"))
    try:
        pi = measure_per_image(work, args.images, repeats)
        big = work / "big"
        wb = measure_whole_builds(work, big, rss_sizes[1], repeats)
        print("peak RSS ...", flush=True)
        rss = {str(rss_sizes[0]): peak_rss_of_build(work / "corpus"), str(rss_sizes[1]): peak_rss_of_build(big)}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = build_result(pi, wb, repeats, rss)
    common.finish("prep_throughput", result, args, plot=plot)
    print(json.dumps({"ratios": result["ratios"], "targets": result["targets"],
                      "bytes_per_image": result["output_bytes_per_image"],
                      "whole_build_images_per_s": {k: v["median"] for k, v in wb.whole.items()},
                      "per_image_all": {k: v["all"]["median"] for k, v in pi.per_image.items()},
                      "peak_rss_mb": rss, "imagenet_hours_16_cores": result["imagenet_1k_hours_on_16_cores_extrapolated"]},
                     indent=1))


def plot(result: dict, path: Path) -> None:
    per_image = result["per_image_images_per_s_one_core"]
    names = list(per_image)
    buckets = [b for b in next(iter(per_image.values())) if b != "all"] + ["all"]
    m = result["machine"]
    common.bar_chart(path, buckets, {n: [per_image[n][b]["median"] for b in buckets] for n in names},
                     spread={n: [(per_image[n][b]["min"], per_image[n][b]["max"]) for b in buckets] for n in names},
                     value_axis="images/s on one core (median)", figsize=(10, 4.5),
                     title=f"256x256 preprocessing per image — {m['cpu']}, {m['pil']['name']} {m['pil']['version']}")


if __name__ == "__main__":
    main()
