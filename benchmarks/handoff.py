"""The torch backend's batch hand-off, alone and in the loader: per-batch shared tensors
("fresh", the hand-off before issue 25) against the ring of slots made once ("slots").

    .venv/bin/python -m benchmarks.handoff --quick            # ~2 min on 2 cores
    .venv/bin/python -m benchmarks.handoff --device cuda      # to the device (gpu_check runs this too)

1. hand-off alone, µs per image: a real `train_loader(backend="torch")` whose workers do no
   pixel work (`ShardBatches._write` becomes one `fill_` of the batch, the write every
   worker does anyway), timed from a worker's finished batch to the batch the trainer
   receives, which it touches once per page (as a model's first layer would read it).
   On the CPU that batch is the float32 images; with --device cuda the uint8 windows are
   copied to the device and rendered there (synchronised at the end of the timing). The
   fill alone, timed in one process, is reported too: the hand-off's own cost is the
   rest. Wall time with one worker (its work and the main process's overlap) and the CPU
   time of the main process and the worker together.
2. loader images/s, both recipes (paper, rrc over keep-aspect JPEG shards), the real
   pixel work, the same workers for both hand-offs.

Both hand-offs run in the same process, alternately, `--repeats` times; medians and
spreads. Writes handoff.json (handoff_cuda.json with --device cuda) into --out.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import add_output_args, check_work, finish, machine, prepared_build, ratio_summary, summary

HANDOFFS = ("fresh", "slots")


@contextlib.contextmanager
def handoff(kind: str, *, no_pixel_work: bool = False):
    """Loaders made inside use hand-off `kind`; with no_pixel_work their workers only fill
    each batch (forked workers inherit the patched method)."""
    from alexprep.imagenet_prep.torch_backend import ShardBatches, TorchBackend

    saved = TorchBackend.handoff, ShardBatches._write
    TorchBackend.handoff = kind
    if no_pixel_work:
        ShardBatches._write = lambda self, batch, out, failures: out[:len(batch)].fill_(1)
    try:
        yield
    finally:
        TorchBackend.handoff, ShardBatches._write = saved


def endless(loader):
    """The loader's batches epoch after epoch (a finished epoch moves the loader to the next:
    its stream runs on, as in training; a set_epoch here skipped one and restarted it)."""
    while True:
        yield from loader


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes `pids` (from /proc; 0 where unreadable)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def touch(images: torch.Tensor) -> None:
    """Read one value per 4 KiB page: what faults a fresh mapping in, without the bandwidth."""
    if images.device.type == "cpu":
        flat = images.reshape(-1)
        flat[::max(1, 4096 // flat.element_size())].sum().item()


def timed_batches(loader, batches: int, warmup: int) -> dict:
    """Wall and CPU µs per image over `batches` batches, after `warmup` untimed ones."""
    stream = endless(loader)
    for _ in range(warmup):
        images, _labels = next(stream)
        touch(images)
        del images, _labels
    pids = [os.getpid()] + [w.pid for w in getattr(loader._backend._iterator, "_workers", [])]
    device = loader.device
    cpu, start, images_seen = cpu_seconds(pids), time.perf_counter(), 0
    for _ in range(batches):
        images, labels = next(stream)
        touch(images)
        images_seen += len(labels)
        del images, labels
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - start, cpu_seconds(pids) - cpu
    return {"wall_us_per_image": 1e6 * wall / images_seen, "cpu_us_per_image": 1e6 * cpu / images_seen,
            "images_per_s": images_seen / wall}


def fill_cost(batch: int, device: torch.device) -> float:
    """µs per image of filling a batch in place: the worker's own write, in both hand-offs."""
    from alexprep.imagenet_prep.torch_backend import pixel_dtype, pixel_shape

    mode = "windows" if device.type == "cuda" else "render"
    out = torch.empty(pixel_shape(mode, batch, 1, 224), dtype=pixel_dtype(mode))
    out.fill_(0)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        out.fill_(1)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times) / batch


def handoff_alone(build: Path, device: str, *, batch: int, batches: int, repeats: int, workers: int = 1) -> dict:
    """Section 1: each hand-off's µs per image with no pixel work, alternately."""
    from alexprep.imagenet_prep.loaders import train_loader

    runs: dict[str, list[dict]] = {kind: [] for kind in HANDOFFS}
    for _ in range(repeats):
        for kind in HANDOFFS:
            with handoff(kind, no_pixel_work=True):
                loader = train_loader(build, batch_size=batch, device=device, seed=0, backend="torch",
                                      workers=workers)
                try:
                    runs[kind].append(timed_batches(loader, batches, warmup=2 * workers + 4))
                finally:
                    loader.close()
    fill = fill_cost(batch, torch.device(device))
    result = {"batch": batch, "workers": workers, "fill_us_per_image": fill}
    for kind in HANDOFFS:
        result[kind] = {key: summary([r[key] for r in runs[kind]]) for key in runs[kind][0]}
    for key in ("wall_us_per_image", "cpu_us_per_image"):
        new = [r[key] - fill for r in runs["slots"]]
        old = [r[key] - fill for r in runs["fresh"]]
        result[f"{key}_less_fill_slots_over_fresh"] = ratio_summary(new, old)
    return result


def loader_rates(builds: dict[str, Path], device: str, *, batch: int, batches: int, repeats: int,
                 workers: int) -> dict:
    """Section 2: images/s of the real loader, each recipe, each hand-off, alternately."""
    from alexprep.imagenet_prep.loaders import train_loader

    result = {}
    for recipe, build in builds.items():
        runs: dict[str, list[float]] = {kind: [] for kind in HANDOFFS}
        for _ in range(repeats):
            for kind in HANDOFFS:
                with handoff(kind):
                    loader = train_loader(build, batch_size=batch, device=device, seed=0, backend="torch",
                                          workers=workers, recipe=recipe)
                    try:
                        runs[kind].append(timed_batches(loader, batches, warmup=2 * workers + 2)["images_per_s"])
                    finally:
                        loader.close()
        result[recipe] = {"workers": workers, "batch": batch, **{k: summary(v) for k, v in runs.items()},
                          "slots_over_fresh": ratio_summary(runs["slots"], runs["fresh"])}
    return result


def make_builds(work: Path, images: int) -> dict[str, Path]:
    """A center-crop JPEG build (the paper recipe) and a keep-aspect one (rrc)."""
    paper = prepared_build(work / "paper", images)["builds"]["jpeg"]
    rrc = prepared_build(work / "rrc", images, resize="keep-aspect")["builds"]["jpeg"]
    return {"paper": paper, "rrc": rrc}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats (~2 min on 2 cores)")
    parser.add_argument("--images", type=int, default=256, help="train images in each build")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2, help="loader workers for section 2 (both hand-offs)")
    parser.add_argument("--work", type=Path, default=None, help="where the builds go (default: a temporary folder)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    check_work(parser, args.work)
    repeats = args.repeats or (3 if args.quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        builds = make_builds(args.work or Path(tmp), args.images)
        payload = {
            "machine": machine(), "device": args.device,
            "handoff_alone": handoff_alone(builds["paper"], args.device, batch=args.batch,
                                           batches=10 if args.quick else 30, repeats=repeats),
            "loader": loader_rates(builds, args.device, batch=args.batch // 2, batches=6 if args.quick else 16,
                                   repeats=repeats, workers=args.workers),
        }
    name = "handoff" if args.device == "cpu" else "handoff_cuda"
    finish(name, payload, args)
    alone = payload["handoff_alone"]
    costs = "; ".join(f"{kind} {alone[kind]['wall_us_per_image']['median']:.1f}, "
                      f"{alone[kind]['cpu_us_per_image']['median']:.1f}" for kind in HANDOFFS)
    print(f"hand-off alone, µs/image (wall, cpu): {costs}; fill {alone['fill_us_per_image']:.1f}")
    for recipe, r in payload["loader"].items():
        print(f"loader {recipe}: fresh {r['fresh']['median']:.0f} img/s, slots {r['slots']['median']:.0f} img/s")


if __name__ == "__main__":
    main()
