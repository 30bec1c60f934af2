"""A build folder in object storage: push and download throughput, and the time to the
first training batch with a cold and a warm node-local cache.

Run: python -m benchmarks.remote_throughput [--quick] [--repeats N]

Builds shards from real-photo JPEGs, serves them from moto's S3 server on 127.0.0.1
(reached through pyarrow's S3 filesystem, as `alexprep train s3://...` would be), pushes
the build, then measures: download throughput into an empty cache with 1 and with the
default number of parallel downloads; the time from `train_loader(URI, cache_dir=...)` to
its first batch with the cache cold (order "random", whose first batch touches nearly
every shard, and "quasi", whose first batch needs `buffer_shards` of them) and warm, and
the same for the local build; and a cache smaller than the split: quasi order with the
least `cache_limit` the loader takes (buffer_shards=1), its first batch from cold and a
whole epoch (every shard downloaded again) against the same epoch from a warm, unlimited
cache. moto is a Python server on the same 2 cores: these numbers
say what the client costs and how the cold start scales, not what S3 serves (tens of
MB/s per stream, hundreds with parallel streams). Writes remote_throughput.json and .png
into --out (benchmarks/out/; --publish: also benchmarks/results/).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import add_output_args, bar_chart, finish, machine, prepared_build, summary

BATCH = 64
LIMITED = dict(order="quasi", buffer_shards=1)  # the limited-cache rows' loader: the fewest shards at a time


def start_s3() -> tuple[object, str]:
    """moto's S3 server on 127.0.0.1 and a bucket in it; (server, URI of a folder there)."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_EC2_METADATA_DISABLED="true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    bucket = f"bench{uuid.uuid4().hex[:8]}"
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?{query}&allow_bucket_creation=true")
    fs.create_dir(bucket)
    return server, f"s3://{bucket}/imagenet?{query}"


def download_rate(uri: str, cache: Path, workers: int) -> float:
    """MB/s filling an empty cache with the whole train split, `workers` downloads at once."""
    from alexprep.imagenet_prep.remote import open_folder
    from alexprep.imagenet_prep.shard_cache import ShardCache, open_split

    shutil.rmtree(cache, ignore_errors=True)
    index, _ = open_split(uri, "train", cache)
    fetcher = ShardCache(open_folder(uri), index, workers)
    start = time.perf_counter()
    fetcher.prefetch(index.shards)
    for thread in list(fetcher._threads):
        thread.join()
    seconds = time.perf_counter() - start
    assert fetcher.downloads == len(index.shards), fetcher.error
    return fetcher.downloaded_bytes / seconds / 1e6


def fill(uri: str, cache: Path) -> None:
    """Every train shard into `cache` (what a cache holds after a first epoch)."""
    from alexprep.imagenet_prep.shard_cache import open_split

    index, fetcher = open_split(uri, "train", cache)
    for shard in index.shards:
        fetcher.fetch(shard)


def first_batch(root: str, cache: Path | None, order: str, **options) -> float:
    """Seconds from creating the loader to holding its first batch."""
    from alexprep.imagenet_prep.loaders import train_loader

    start = time.perf_counter()
    loader = train_loader(root, batch_size=BATCH, device="cpu", seed=0, backend="torch", workers=0, order=order,
                          cache_dir=cache, **options)
    try:
        next(iter(loader))
        return time.perf_counter() - start
    finally:
        loader.close()


def least_limit(local: Path) -> int:
    """The smallest cache_limit the limited rows' loader takes (shard_cache.EvictingCache)."""
    from alexprep.imagenet_prep.loaders import LoaderConfig
    from alexprep.imagenet_prep.shards import read_split

    shards = read_split(local, "train").shards
    held, _ = LoaderConfig(batch_size=BATCH, backend="torch", workers=0, **LIMITED).shards_in_use([s.rows for s in shards])
    return min(sum(s.bytes for s in shards), held * max(s.bytes for s in shards))


def second_epoch(root: str, cache: Path, limit: int | None) -> tuple[float, float]:
    """Seconds for the limited rows' loader's second epoch (the first filled the cache as
    it could) and the MB it downloaded."""
    from alexprep.imagenet_prep.loaders import train_loader

    loader = train_loader(root, batch_size=BATCH, device="cpu", seed=0, backend="torch", workers=0, cache_dir=cache,
                          cache_limit=limit, **LIMITED)
    try:
        for _ in loader:
            pass
        before, start = loader.cache.downloaded_bytes, time.perf_counter()
        for _ in loader:
            pass
        return time.perf_counter() - start, (loader.cache.downloaded_bytes - before) / 1e6
    finally:
        loader.close()


def measure_limited(uri: str, local: Path, work: Path, repeats: int) -> dict:
    """The limited-cache rows, `repeats` times: first batch from cold, then an epoch with
    the limit and one from a warm, unlimited cache."""
    from alexprep.imagenet_prep.shards import read_split

    limit, runs = least_limit(local), {k: [] for k in ("cold_first_batch_s", "epoch_s", "epoch_mb", "warm_epoch_s")}
    if limit >= sum(s.bytes for s in read_split(local, "train").shards):
        return {"skipped": "the loader holds every one of the split's shards at once (a --quick build): nothing to evict"}
    for _ in range(repeats):
        shutil.rmtree(work / "cache-l", ignore_errors=True)
        runs["cold_first_batch_s"].append(first_batch(uri, work / "cache-l", cache_limit=limit, **LIMITED))
        seconds, mb = second_epoch(uri, work / "cache-l", limit)
        runs["epoch_s"].append(seconds)
        runs["epoch_mb"].append(mb)
        fill(uri, work / "cache-w")
        runs["warm_epoch_s"].append(second_epoch(uri, work / "cache-w", None)[0])
    return {"limit_bytes": limit, **{k: summary(v) for k, v in runs.items()}}


def measure(uri: str, local: Path, work: Path, repeats: int) -> dict:
    """Every timing, `repeats` times, alternating what is measured."""
    from alexprep.imagenet_prep.shard_cache import PREFETCH_WORKERS

    keys = ["download_1", f"download_{PREFETCH_WORKERS}", "cold_random", "cold_quasi", "warm_random", "local_random"]
    runs: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(repeats):
        runs["download_1"].append(download_rate(uri, work / "cache-d", 1))
        runs[f"download_{PREFETCH_WORKERS}"].append(download_rate(uri, work / "cache-d", PREFETCH_WORKERS))
        for order in ("random", "quasi"):
            shutil.rmtree(work / "cache", ignore_errors=True)
            runs[f"cold_{order}"].append(first_batch(uri, work / "cache", order))
        fill(uri, work / "cache")  # closing the loader stopped its background downloads: finish them
        runs["warm_random"].append(first_batch(uri, work / "cache", "random"))
        runs["local_random"].append(first_batch(str(local), None, "random"))
    return {k: summary(v) for k, v in runs.items()}


def plot(payload: dict, path: Path) -> None:
    t = dict(payload["first_batch_s"])
    labels = ["cold cache, random order", "cold cache, quasi order", "warm cache", "local build"]
    keys = ["cold_random", "cold_quasi", "warm_random", "local_random"]
    limited = payload.get("limited_cache", {})
    if "cold_first_batch_s" in limited:
        t["limited"] = limited["cold_first_batch_s"]
        labels.insert(2, f"cold cache of {limited['limit_bytes'] / 1e6:.0f} MB, quasi, 1-shard windows")
        keys.insert(2, "limited")
    bar_chart(path, labels, {"seconds": [t[k]["median"] for k in keys]},
              spread={"seconds": [(t[k]["min"], t[k]["max"]) for k in keys]}, horizontal=True,
              title=f"time to the first batch of {BATCH} from moto S3 on 127.0.0.1 "
                    f"({payload['shards']} shards, {payload['megabytes']:.0f} MB)", value_axis="seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="640 images (10 shards), 1 repeat")
    parser.add_argument("--images", type=int, default=None, help="train images (default 2560; 640 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
    add_output_args(parser)
    args = parser.parse_args()
    images = args.images or (640 if args.quick else 2560)
    repeats = args.repeats or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="remote_throughput_"))
    server = None
    try:
        build = prepared_build(work, images, shard_size=64)["builds"]["jpeg"]
        server, uri = start_s3()
        from alexprep.imagenet_prep.push import push_build
        from alexprep.imagenet_prep.shards import read_split

        pushed = push_build(build, uri)
        index = read_split(build, "train")
        timings = measure(uri, build, work, repeats)
        limited = measure_limited(uri, build, work, repeats)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    downloads = {k: v for k, v in timings.items() if k.startswith("download")}
    payload = {"machine": machine(), "images": images, "shards": len(index.shards),
               "megabytes": sum(s.bytes for s in index.shards) / 1e6, "batch": BATCH, "repeats": repeats,
               "push_mb_per_s": pushed.uploaded_bytes / pushed.seconds / 1e6,
               "download_mb_per_s": downloads,
               "first_batch_s": {k: v for k, v in timings.items() if not k.startswith("download")},
               "limited_cache": {**limited, "loader": LIMITED},
               "ratios": {"cold_over_warm_first_batch": timings["cold_random"]["median"] / timings["warm_random"]["median"],
                          "warm_over_local_first_batch": timings["warm_random"]["median"] / timings["local_random"]["median"]}}
    print(f"push {payload['push_mb_per_s']:.1f} MB/s; download " +
          ", ".join(f"{k.split('_')[1]} at once {v['median']:.1f} MB/s" for k, v in downloads.items()))
    print("first batch: " + ", ".join(f"{k} {v['median']:.2f} s" for k, v in payload["first_batch_s"].items()))
    if "skipped" not in limited:
        print(f"limited cache ({limited['limit_bytes'] / 1e6:.1f} MB): first batch "
              f"{limited['cold_first_batch_s']['median']:.2f} s, epoch {limited['epoch_s']['median']:.2f} s downloading "
              f"{limited['epoch_mb']['median']:.1f} MB; warm unlimited epoch {limited['warm_epoch_s']['median']:.2f} s")
    finish("remote_throughput", payload, args, plot)


if __name__ == "__main__":
    main()
