"""Where the loaders' time goes, per image (issue 29): CPU µs of one core per image for
each step of the torch backend, DALI from Arrow on the CPU and FFCV's own pipeline, on
the same images (the paper recipe, batch 64, one thread each).

    .venv/bin/python -m benchmarks.loader_breakdown --quick     # ~3 min on 2 cores
    .venv/bin/python -m benchmarks.loader_breakdown --publish   # results/loader_breakdown.json

What is timed (every cell a difference or a sum of CPU times measured in this run):
- torch backend, in this process, one thread, what a DataLoader worker runs: decode
  (`transform.decode`: OpenCV, PIL's pixels, on the shard's bytes) and the render step `ShardBatches._write`
  calls per image (`render_step`: render.render_into, one C++ pass), image by image; the
  render step split by timing it again with flip off/on, mean image None/given, 1/std
  none/given (the cast and the lighting shift are in the same pass: the crop row); the
  worker's whole `ShardBatches.__getitem__((Batch, slot, None))`; "Python per sample" is
  that minus decode and render. Hand-off: benchmarks/handoff.py's measurement (a real
  one-worker loader whose workers only fill the slot: main + worker CPU per image, less
  the fill).
- DALI from Arrow on the CPU as it runs now, `num_threads=1`: DALI decodes each crop window
  (a pipeline of the external source alone, then with `decoders.image_slice`: the
  increment), the host renders
  (`render.render_into` over the decoded batches, split as the torch backend's); hand-off:
  DALI's batch as numpy and the ring's next output; "Python per sample" is the real
  loader's whole CPU per image less those.
- DALI's operators (dali_backend.HOST_RENDER off, the CPU path before issue 29): pipelines
  built with `dali_backend`'s own operators, one more each time (external source ->
  decoders.image -> image - mean image -> the whole `image_graph`), fed the backend's own
  `_source` inputs; each operator's increment. Hand-off: `DaliBackend._to_torch`; "Python
  per sample" is the real loader's whole CPU per image less the operators and the hand-off
  (the `_source` feed, timed alone, and DALI's executor).
- FFCV 1.0.2, in its venv (ffcv_breakdown.py), one thread, on a JPEG q95 .beton of the
  same pixels: one Loader per added stage; decode split from crop + resize by
  `libffcv.imdecode` alone.

Repeats alternate between the three loaders (medians of >= 5, spreads in the JSON).
Writes loader_breakdown.json into --out.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks.common import (
    FFCV_SIDE, FfcvChild, add_output_args, check_work, bar_chart, ffcv_python, finish, machine, prepared_build, summary,
)

HERE = Path(__file__).resolve().parent
FFCV_BREAKDOWN = HERE / "ffcv_breakdown.py"
# The table's rows, in order: (key, label)
ROWS = (("decode", "decode"), ("crop", "crop"), ("flip_normalize", "flip + normalise"),
        ("lighting_mean", "lighting / mean image"), ("handoff", "hand-off to the trainer"),
        ("python", "Python per sample"), ("total", "total"), ("total_raw", "total, raw shards (no decode)"))


def cpu_us(run, images: int, clock=time.thread_time) -> float:
    """CPU µs per image of `run()`. thread_time for work done in this thread; process_time
    for work DALI's threads do."""
    start = clock()
    run()
    return 1e6 * (clock() - start) / images


# ---------------------------------------------------------------------------- torch backend
# The seam: the name in torch_backend that `ShardBatches._write` calls per image in "render"
# mode, as `step(out (1, K, 3, c, c), image (1, S, S, 3), windows (1, K, 3), cmn_mean (1, 3),
# mean_chw, inv_std)` (render.render_into: one C++ pass, numpy where it cannot be built).
# The one line to change when the worker's render changes (`check_render_step` refuses to
# time a stale one).
RENDER_STEP = "render_into"


def render_image(step, out, image, windows, cmn, mean_chw, inv_std) -> None:
    """The render step on one image, as `ShardBatches._write` calls it."""
    step(out[None], image[None], np.asarray(windows[None], np.int64), cmn[None], mean_chw, inv_std)


def render_step():
    """The worker's render step (`RENDER_STEP` in torch_backend)."""
    from alexprep.imagenet_prep import torch_backend

    return getattr(torch_backend, RENDER_STEP)


@contextlib.contextmanager
def counting_render():
    """Count the calls `ShardBatches._write` makes to the render step."""
    from alexprep.imagenet_prep import torch_backend

    calls, real = [], render_step()

    def counted(*args):
        calls.append(1)
        return real(*args)

    setattr(torch_backend, RENDER_STEP, counted)
    try:
        yield calls
    finally:
        setattr(torch_backend, RENDER_STEP, real)


def check_render_step(dataset, batch, out) -> None:
    """Exit with a clear message if `ShardBatches._write` no longer renders through
    `render_step()`, image by image (the torch column would time the wrong code)."""
    with counting_render() as calls:
        dataset._write(batch, out, [])
    if len(calls) != len(batch):
        sys.exit(f"loader_breakdown: ShardBatches._write called {RENDER_STEP} {len(calls)} times for a batch of "
                 f"{len(batch)}: it renders another way now; update RENDER_STEP and TorchParts")


class TorchParts:
    """The torch backend's worker, in this process: its dataset, an epoch's plans, the
    decoded images and what the render step is given."""

    def __init__(self, build: Path, batch: int):
        from alexprep.imagenet_prep.loaders import train_loader
        from alexprep.imagenet_prep.render import cpu_norm_arrays

        self.loader = train_loader(build, batch_size=batch, device="cpu", seed=0, backend="torch", workers=0)
        self.dataset = self.loader._backend.dataset
        self.plans = [self.loader.plan(0)[k] for k in range(len(self.loader))]
        self.images = sum(len(b) for b in self.plans)
        self.mean_chw, self.inv_std = cpu_norm_arrays(self.loader.norm)
        self.out = self.dataset.slots[0].numpy()
        check_render_step(self.dataset, self.plans[0], self.dataset.slots[0])

    def close(self) -> None:
        self.loader.close()

    def in_place(self) -> tuple[float, float]:
        """Decode and the whole render step, image by image as the worker runs them (the
        image still in cache when it is rendered, and freed after: keeping them all would
        add a page fault per 4 KiB of each new image): µs per image of each."""
        from alexprep.imagenet_prep.transform import decode

        samples, spec, step, clock = self.dataset._samples(), self.dataset.spec, render_step(), time.thread_time
        decoding = rendering = 0.0
        for b in self.plans:
            cmn = np.asarray(b.cmn_mean, np.float32)
            for i, sample in enumerate(b.index):
                t0 = clock()
                image = decode(samples.view(sample), spec)
                t1 = clock()
                render_image(step, self.out[i], image, b.windows[i], cmn[i], self.mean_chw, self.inv_std)
                rendering += clock() - t1
                decoding += t1 - t0
        return 1e6 * decoding / self.images, 1e6 * rendering / self.images

    def decoded(self) -> list[list[np.ndarray]]:
        """The epoch's images, decoded (untimed), for the render step's variants."""
        from alexprep.imagenet_prep.transform import decode

        samples, spec = self.dataset._samples(), self.dataset.spec
        return [[decode(samples.view(i), spec) for i in b.index] for b in self.plans]

    def whole(self) -> float:
        """The worker's whole per-batch call, as the DataLoader makes it: µs per image."""
        def run():
            for k, b in enumerate(self.plans):
                self.dataset[(b, k % len(self.dataset.slots), None)]
        return cpu_us(run, self.images)

    def render(self, decoded, *, flip: bool, mean: bool, std: bool) -> float:
        """The render step over the epoch's decoded images: µs per image."""
        step = render_step()
        mean_chw, inv_std = (self.mean_chw if mean else None), (self.inv_std if std else None)

        def run():
            for b, images in zip(self.plans, decoded):
                windows = b.windows if flip else b.windows * np.array([1, 1, 0])
                cmn = np.asarray(b.cmn_mean, np.float32)
                for i, image in enumerate(images):
                    render_image(step, self.out[i], image, windows[i], cmn[i], mean_chw, inv_std)
        return cpu_us(run, self.images)

    def plans_us(self, epochs: int = 4) -> float:
        """The main process's batch plans (order, draws, lighting): µs per image, part of
        the hand-off's measurement, timed alone for the JSON."""
        self._epoch = getattr(self, "_epoch", 0) + epochs  # new epochs: their orders are drawn too

        def run():
            for e in range(self._epoch, self._epoch + epochs):
                plan = self.loader.plan(e)
                for k in range(len(plan)):
                    plan[k]
        return cpu_us(run, epochs * self.images)

    def repeat(self) -> dict:
        """The parts, µs per image. The render step's split comes from variants timed over
        images decoded earlier (out of cache): differences, each against the one before;
        crop (with the cast and the lighting shift, in the same pass) is the in-place render
        less the others."""
        decode, render = self.in_place()
        split, _ = render_split(self.render, self.decoded())
        whole = self.whole()
        return {"decode": decode, "crop_cast": render - sum(split.values()), **split, "render": render,
                "whole": whole, "python": whole - decode - render, "plans_in_handoff": self.plans_us()}


def render_split(render, decoded) -> tuple[dict, float]:
    """The render step timed with flip, the mean image and 1/std added one at a time:
    ({"flip", "mean_image", "inv_std"}: µs per image of each, the whole variant's µs)."""
    a = render(decoded, flip=False, mean=False, std=False)
    b = render(decoded, flip=True, mean=False, std=False)
    c = render(decoded, flip=True, mean=True, std=False)
    d = render(decoded, flip=True, mean=True, std=True)
    return {"flip": b - a, "mean_image": c - b, "inv_std": d - c}, d


def torch_handoff(build: Path, batch: int, batches: int) -> float:
    """benchmarks/handoff.py's measurement of the slots hand-off: main + worker CPU µs per
    image of a one-worker loader whose worker only fills each slot, less the fill."""
    from alexprep.imagenet_prep.loaders import train_loader
    from benchmarks.handoff import fill_cost, handoff, timed_batches

    import torch

    with handoff("slots", no_pixel_work=True):
        loader = train_loader(build, batch_size=batch, device="cpu", seed=0, backend="torch", workers=1)
        try:
            cost = timed_batches(loader, batches, warmup=6)["cpu_us_per_image"]
        finally:
            loader.close()
    return cost - fill_cost(batch, torch.device("cpu"))


# ---------------------------------------------------------------------------- DALI
DALI_STAGES = ("source", "decode", "mean_image", "full")


def dali_stage_graph(stage: str, inputs, backend):
    """The paper graph up to `stage`, from dali_backend's own pieces: "full" is
    `image_graph` exactly as `DaliBackend._paper_graph` calls it; the others stop after
    the external source, after `fn.decoders.image`, or after `image - mean image`."""
    from nvidia.dali import fn, types

    from alexprep.imagenet_prep import dali_backend

    data = inputs[0]
    source, config = backend.input, backend.input.config
    if stage == "full":
        _, pos_x, pos_y, mirror, cmn_mean = inputs
        return dali_backend.image_graph(
            data, encoding=source.spec.encoding, size=source.spec.size, crop=config.crop, gpu=False,
            mean_image=source.norm.mean_image, windows=[(pos_x, pos_y, mirror)], cmn_mean=cmn_mean,
            std=[float(v) for v in source.norm.std], roi=dali_backend.ROI_DECODE)
    if stage == "source":
        return data
    if stage == "decode" and backend._windowed:  # training on JPEGs: each crop window decoded alone
        return dali_backend.window_graph(data, encoding="jpeg", anchor=inputs[1], shape=inputs[2])
    image = fn.decoders.image(data, output_type=types.RGB, **dali_backend.decoder_args(False, None))
    if stage == "decode":
        return image
    mean = source.norm.mean_image
    constant = fn.constant(fdata=mean.ravel().tolist(), shape=list(mean.shape), layout="HWC", dtype=types.FLOAT)
    return image - constant  # as image_graph subtracts it (uint8 - float32: no cast operator)


def operator_names(pipe) -> list[str]:
    """The DALI operators a pipeline holds ("__Image_5" -> "Image")."""
    return [op.name.strip("_").rsplit("_", 1)[0] for op in pipe._ops]


class DaliParts:
    """The DALI backend on the CPU: the real loader (one thread) and one pipeline per stage,
    all fed the backend's own `_source` inputs for an epoch's plans. host=True: as it runs
    now, DALI decoding and the host rendering (`render.render_into`); False: DALI's
    operators rendering (dali_backend.HOST_RENDER off, the path before issue 29)."""

    def __init__(self, build: Path, batch: int, batches: int, stages: bool = True, host: bool = True):
        """stages=False: the real loader alone (`whole`), as for raw shards."""
        from alexprep.imagenet_prep import dali_backend
        from alexprep.imagenet_prep.loaders import train_loader

        before, dali_backend.HOST_RENDER = dali_backend.HOST_RENDER, host  # read when the pipeline is built
        try:
            self.loader = train_loader(build, batch_size=batch, device="cpu", seed=0, backend="dali", workers=1)
        finally:
            dali_backend.HOST_RENDER = before
        self.backend = self.loader._backend
        self.host = self.backend._host
        if host and not self.host:
            raise RuntimeError("the C++ renderer could not be built here: DALI renders with its operators")
        self.batch, self.batches = batch, max(8, batches)  # runs timed per stage: >= 512 images at batch 64
        self.plans = [self.loader.plan(0)[k] for k in range(len(self.loader))]
        self.inputs = self._fed(self.plans)
        names = DALI_STAGES[:2] if self.host else DALI_STAGES
        self.pipes = {stage: self._pipeline(stage) for stage in names} if stages else {}
        self.operators = operator_names(self.pipes[names[-1]]) if stages else []
        for _ in self.loader:  # warm-up: an epoch through the real loader
            pass

    def _fed(self, plans) -> list[tuple]:
        """What `DaliBackend._source` feeds for each plan (its own code), kept alive here."""
        backend = self.backend
        saved = backend._feed, backend._inflight  # the live stream's, put back as they were
        backend._feed, backend._inflight = iter(plans), collections.deque()
        try:
            return [backend._source(None) for _ in plans]
        finally:
            backend._feed, backend._inflight = saved

    def _pipeline(self, stage: str):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        inputs, turn = self.inputs, [0]

        def source(_info):
            turn[0] += 1
            return inputs[turn[0] % len(inputs)]

        config = self.backend.input.config
        pipe = Pipeline(batch_size=self.batch, num_threads=1, device_id=None, prefetch_queue_depth=config.prefetch,
                        seed=0)
        with pipe, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the stages before "full" leave the windows unused
            dtypes = [types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT][:len(inputs[0])]
            fed = fn.external_source(source=source, num_outputs=len(dtypes), batch=True, batch_info=True,
                                     no_copy=True, dtype=dtypes)
            pipe.set_outputs(dali_stage_graph(stage, fed, self.backend))
            pipe.build()
        return pipe

    def close(self) -> None:
        self.pipes.clear()
        self.loader.close()

    def stage(self, stage: str) -> float:
        """CPU µs per image (every thread) of `batches` runs, after two untimed ones (so that
        the last pipeline's prefetching is over)."""
        pipe = self.pipes[stage]
        for _ in range(2):
            pipe.run()

        def run():
            for _ in range(self.batches):
                pipe.run()
        return cpu_us(run, self.batches * self.batch, time.process_time)

    def handoff(self) -> float:
        """µs per image, in this thread: `DaliBackend._to_torch` on the full pipeline's
        outputs; host=True: DALI's decoded batch as numpy (`_dense`) and the ring's next
        output batch (what `_rendered` does besides rendering)."""
        pipe, spent = self.pipes["decode" if self.host else "full"], 0.0
        for _ in range(self.batches):
            (out,) = pipe.run()
            t = time.thread_time()
            if self.host:
                self.backend._dense(out)
                number, _ = self.backend._ring.take()
                self.backend._ring.batch(number, self.batch)
            else:
                self.backend._to_torch(out)
            spent += time.thread_time() - t
        return 1e6 * spent / (self.batches * self.batch)

    def decoded(self) -> list[np.ndarray]:
        """Each plan's batch decoded by the decode pipeline (untimed; copies: DALI reuses its buffers)."""
        pipe, out = self.pipes["decode"], []
        for _ in self.plans:
            (batch,) = pipe.run()
            out.append(self.backend._dense(batch).copy())
        return out

    def render(self, decoded, *, flip: bool, mean: bool, std: bool) -> float:
        """The host's render (`render.render_into`) over decoded batches, this thread: µs per image."""
        from alexprep.imagenet_prep.render import render_into

        mean_chw, inv_std = self.backend._norm_arrays
        mean_chw, inv_std = (mean_chw if mean else None), (inv_std if std else None)
        out = self.backend._ring.slots[0].numpy()
        plans = self.plans[:len(decoded)]

        windowed = self.backend._windowed  # the decoded images are the windows: the mean read where they were

        def run():
            for b, images in zip(plans, decoded):
                windows = b.windows * np.array([0, 0, 1]) if windowed else b.windows
                windows = np.ascontiguousarray(windows if flip else windows * np.array([1, 1, 0]), np.int64)
                mean_at = np.ascontiguousarray(b.windows[:, :, :2], np.int64) if windowed else None
                render_into(out[:len(images)], images, windows, np.ascontiguousarray(b.cmn_mean, np.float32),
                            mean_chw, inv_std, mean_at)
        return cpu_us(run, sum(len(b) for b in plans))

    def feed(self) -> float:
        """`DaliBackend._source` alone: µs per image, in this thread."""
        return cpu_us(lambda: self._fed(self.plans), sum(len(b) for b in self.plans))

    def whole(self, epochs: int) -> float:
        """The real loader, `epochs` epochs, every thread: µs per image."""
        def run():
            for _ in range(epochs):
                for _ in self.loader:
                    pass
        return cpu_us(run, epochs * len(self.loader) * self.batch, time.process_time)

    def repeat(self, epochs: int) -> dict:
        if self.host:
            return self.repeat_host(epochs)
        t = {stage: self.stage(stage) for stage in DALI_STAGES}
        handoff, feed, whole = self.handoff(), self.feed(), self.whole(epochs)
        parts = {"decode": t["decode"] - t["source"], "cast_mean_image": t["mean_image"] - t["decode"],
                 "crop_mirror_normalize": t["full"] - t["mean_image"], "handoff": handoff}
        return {"stages": t, **parts, "feed": feed, "executor_floor": t["source"], "whole": whole,
                "python": whole - sum(parts.values())}


    def repeat_host(self, epochs: int) -> dict:
        """DALI decoding, the host rendering: the decoder's increment, the render split as the
        torch backend's, the hand-off, and the rest of the real loader."""
        t = {stage: self.stage(stage) for stage in self.pipes}
        split, render = render_split(self.render, self.decoded())
        handoff, feed, whole = self.handoff(), self.feed(), self.whole(epochs)
        decode = t["decode"] - t["source"]
        return {"stages": t, "decode": decode, "crop_cast": render - sum(split.values()), **split, "render": render,
                "handoff": handoff, "feed": feed, "executor_floor": t["source"], "whole": whole,
                "python": whole - decode - render - handoff}


# ---------------------------------------------------------------------------- FFCV
def write_betons(build: Path, work: Path, python: Path) -> dict[str, Path]:
    """JPEG q95 and raw .beton files of the build's decoded pixels (ffcv_side.py's
    `write-array`), and the channel mean and std FFCV's NormalizeImage takes."""
    from alexprep.imagenet_prep.loaders import train_loader
    from alexprep.imagenet_prep.transform import decode

    with train_loader(build, batch_size=1, device="cpu", seed=0, backend="torch", workers=0) as loader:
        samples, spec = loader.samples, loader.index.spec
        pixels = np.stack([decode(samples.view(i), spec) for i in range(len(samples))])
        np.save(work / "labels.npy", samples.labels_of(np.arange(len(samples))))
        np.save(work / "mean.npy", np.asarray(loader.stats.channel_mean, np.float32))
        np.save(work / "std.npy", np.asarray(loader.stats.channel_std, np.float32))
    np.save(work / "pixels.npy", pixels)
    betons = {}
    for mode in ("jpg", "raw"):
        betons[mode] = work / f"{mode}.beton"
        subprocess.run([str(python), str(FFCV_SIDE), "write-array", str(work / "pixels.npy"),
                        str(work / "labels.npy"), str(betons[mode]), "--mode", mode, "--quality", "95"],
                       check=True, capture_output=True, text=True)
    return betons


class FfcvParts(FfcvChild):
    """ffcv_breakdown.py in FFCV's venv, its Loaders built and warmed up once, one repeat
    per `repeat()`."""

    def __init__(self, python: Path, betons: dict, work: Path, batch: int, epochs: int):
        super().__init__([str(python), str(FFCV_BREAKDOWN), "--mean", str(work / "mean.npy"), "--std",
                          str(work / "std.npy"), "--batch", str(batch), "--epochs", str(epochs), "--raw",
                          str(betons["raw"]), str(betons["jpg"])], "ffcv_breakdown.py")

    def repeat(self) -> dict:
        r = self.ask("run")
        cpu = {name: v["cpu_us"] for name, v in r.items()}
        names = ["labels_only", "decoder", "flip", "normalize", "to_tensor", "to_torch_image"]
        step = {b: cpu[b] - cpu[a] for a, b in zip(names, names[1:])}
        parts = {"decode": cpu["imdecode"], "crop_resize": step["decoder"] - cpu["imdecode"], "flip": step["flip"],
                 "normalize": step["normalize"], "handoff": step["to_tensor"] + step["to_torch_image"]}
        whole = cpu["to_torch_image"]
        return {"cpu": cpu, **parts, "whole": whole, "python": whole - sum(parts.values()),
                "raw_whole": cpu["raw_whole"]}


# ---------------------------------------------------------------------------- the table
FUSED = "fused in crop"  # a cell whose work another row's operator does in the same pass


def host_rendered(parts: dict) -> dict:
    """The rows of a loader rendering in one pass (render.render_into): crop with the cast
    and the lighting shift, flip + 1/std, the mean image."""
    return {"decode": parts["decode"], "crop": parts["crop_cast"], "flip_normalize": parts["flip"] + parts["inv_std"],
            "lighting_mean": parts["mean_image"]}


def rows_of(torch_: dict, dali: dict | None, dali_operators: dict | None, ffcv: dict | None) -> dict:
    """One repeat's table: row -> loader -> µs per image (or FUSED / None: not done)."""
    handoff = torch_["handoff"]
    rows = {"torch": {**host_rendered(torch_), "handoff": handoff, "python": torch_["python"],
                      "total": torch_["whole"] + handoff, "total_raw": torch_["raw_whole"] + handoff}}
    if dali is not None:
        rows["dali"] = {**host_rendered(dali), "handoff": dali["handoff"], "python": dali["python"],
                        "total": dali["whole"], "total_raw": dali["raw_whole"]}
    if dali_operators is not None:
        d = dali_operators
        rows["dali_operators"] = {"decode": d["decode"], "crop": d["crop_mirror_normalize"], "flip_normalize": FUSED,
                                  "lighting_mean": d["cast_mean_image"], "handoff": d["handoff"],
                                  "python": d["python"], "total": d["whole"], "total_raw": d["raw_whole"]}
    if ffcv is not None:
        rows["ffcv"] = {"decode": ffcv["decode"], "crop": ffcv["crop_resize"],
                        "flip_normalize": ffcv["flip"] + ffcv["normalize"], "lighting_mean": None,
                        "handoff": ffcv["handoff"], "python": ffcv["python"], "total": ffcv["whole"],
                        "total_raw": ffcv["raw_whole"]}
    return {row: {loader: rows[loader][row] for loader in rows} for row, _ in ROWS}


def medians(repeats: list[dict]) -> dict:
    """Per row and loader: the summary over repeats (numbers), or the cell's word."""
    out = {}
    for row, _ in ROWS:
        out[row] = {}
        for loader in repeats[0][row]:
            values = [r[row][loader] for r in repeats]
            out[row][loader] = summary(values) if isinstance(values[0], float) else values[0]
    return out


def summarise(parts: list[dict]) -> dict:
    """Every numeric part of a loader's repeats: median and spread."""
    keys = [k for k, v in parts[0].items() if isinstance(v, float)]
    return {k: summary([p[k] for p in parts]) for k in keys}


# ---------------------------------------------------------------------------- the run
def open_contenders(builds: dict, work: Path, batch: int, epochs: int) -> tuple[dict, dict]:
    """Each loader's parts, built and warmed up (None where one cannot run here), and why
    those that cannot run do not."""
    from alexprep.imagenet_prep.errors import DataError

    opened = {"torch": (TorchParts(builds["jpeg"], batch), TorchParts(builds["raw"], batch))}
    batches, skipped = len(opened["torch"][0].plans), {}
    for name, host in (("dali", True), ("dali_operators", False)):
        try:
            opened[name] = (DaliParts(builds["jpeg"], batch, batches, host=host),
                            DaliParts(builds["raw"], batch, batches, stages=False, host=host))
        except (DataError, RuntimeError) as exc:  # DALI does not import here, or no C++ renderer
            skipped[name] = str(exc)
    python, versions = ffcv_python()
    if python is None:
        skipped["ffcv"] = versions["skipped"]
    else:
        opened["ffcv"] = (FfcvParts(python, write_betons(builds["jpeg"], work, python), work, batch, epochs),)
    return opened, {"skipped": skipped, "ffcv_versions": versions}


def one_repeat(opened: dict, build: Path, batch: int, epochs: int) -> dict:
    """Every part of every loader, one loader after another: {loader: {part: µs per image}}."""
    jpeg, raw = opened["torch"]
    parts = {"torch": {**jpeg.repeat(), "raw_whole": raw.whole(),
                       "handoff": torch_handoff(build, batch, batches=80)}}
    for name in ("dali", "dali_operators"):
        if name in opened:
            jpeg, raw = opened[name]
            d = jpeg.repeat(epochs)
            parts[name] = {**{k: v for k, v in d.items() if k != "stages"},
                           **{f"stage_{k}": v for k, v in d["stages"].items()}, "raw_whole": raw.whole(epochs)}
    if "ffcv" in opened:
        f = opened["ffcv"][0].repeat()
        parts["ffcv"] = {**{k: v for k, v in f.items() if k != "cpu"},
                         **{f"loader_{k}": v for k, v in f["cpu"].items()}}
    return parts


def run(work: Path, images: int, batch: int, repeats: int, epochs: int) -> dict:
    import torch

    torch.set_num_threads(1)  # one core: a DataLoader worker's setting
    builds = prepared_build(work, images, encodings=("jpeg", "raw"), shard_size=batch)["builds"]
    opened, why = open_contenders(builds, work, batch, epochs)
    try:
        # the loaders alternate within every repeat
        repeat_parts = [one_repeat(opened, builds["jpeg"], batch, epochs) for _ in range(repeats)]
    finally:
        for p in (p for pair in opened.values() for p in pair):
            p.close()
    per_repeat = [rows_of(p["torch"], p.get("dali"), p.get("dali_operators"), p.get("ffcv")) for p in repeat_parts]
    return {
        "images": images, "batch": batch, "repeats": repeats, "epochs_per_repeat": epochs,
        "recipe": "paper", "threads": 1, "unit": "CPU µs of one core per image",
        "rows": medians(per_repeat), "per_repeat": per_repeat,
        "parts": {k: summarise([p[k] for p in repeat_parts]) for k in opened},
        "dali_operators": opened["dali_operators"][0].operators if "dali_operators" in opened else [],
        "dali_host_operators": opened["dali"][0].operators if "dali" in opened else [],
        "render_step": RENDER_STEP, **why,
        "ffcv_warmup": opened["ffcv"][0].ready if "ffcv" in opened else None,
    }


def plot(payload: dict, path: Path) -> None:
    """The table as grouped bars, one group per row, one bar per loader (a fused or
    absent step as 0), whiskers from min to max over the repeats."""
    rows, cats = payload["rows"], [label for _, label in ROWS]
    loaders = list(rows["total"])

    def cell(row: str, loader: str, key: str) -> float:
        v = rows[row][loader]
        return v[key] if isinstance(v, dict) else 0.0

    series = {k: [cell(r, k, "median") for r, _ in ROWS] for k in loaders}
    spread = {k: [(cell(r, k, "min"), cell(r, k, "max")) for r, _ in ROWS] for k in loaders}
    bar_chart(path, cats, series, spread=spread, horizontal=True, value_axis="CPU µs of one core per image",
              title=f"Where the time goes, per image (paper recipe, batch {payload['batch']}, one thread)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 images, 5 repeats (~3 min on 2 cores)")
    parser.add_argument("--images", type=int, default=None, help="train images (default 512; 256 with --quick)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="at least 5 (default 5; 7 without --quick)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="whole epochs per repeat for the loaders timed whole (default: >= 2 and >= 512 images)")
    parser.add_argument("--work", type=Path, default=None, help="where the builds go (default: a temporary folder)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    check_work(parser, args.work)
    images = args.images or (256 if args.quick else 512)
    repeats = args.repeats or (5 if args.quick else 7)
    if repeats < 5 or images < 2 * args.batch:
        parser.error(f"need --repeats >= 5 and --images >= 2 batches ({2 * args.batch}); got {repeats}, {images}")
    epochs = args.epochs or max(2, -(-512 // images))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        payload = {"machine": machine(), **run(args.work or Path(tmp), images, args.batch, repeats, epochs)}
    payload["wall_s"] = time.perf_counter() - started
    finish("loader_breakdown", payload, args, plot=plot)
    for row, label in ROWS:
        cells = payload["rows"][row]
        print(f"{label:32s}" + "".join(f"{k} {v['median']:8.1f}  " if isinstance(v, dict) else f"{k} {v!s:>8}  "
                                       for k, v in cells.items()))


if __name__ == "__main__":
    main()
