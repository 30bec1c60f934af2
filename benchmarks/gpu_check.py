"""The GPU check (issue #12): every GPU path of alexprep, measured in one short run.

    make gpu-check OUT=/tmp/gpu-check                     # on a lent GPU machine (no .venv needed)
    python benchmarks/gpu_check.py --out DIR [--device auto|cuda|cpu] [--budget-s 270]

Writes DIR/gpu_check.json after every section (so a run cut short still brings numbers
back) and a short table on stdout at the end. Each measurement sits beside its baseline
from the same run:

- data: a corpus made from scikit-learn's two sample photos (scikit-image is not needed),
  built to JPEG and raw shards with the library's own build-shards and stats;
- lrn: the normalisation + max-pool blocks alone (eager, fused Triton kernel, compiled)
  against max pooling alone, the fused kernel's numbers checked against the eager path's;
- convs: our grouped convolutions against dense ones of equal multiply-adds, forward and
  both gradients, fp32 / TF32 / bf16, NCHW / channels_last, cuDNN benchmark_limit 10 and 0;
- model: our AlexNet's forward + backward images/s at batch 128 in fp32 (TF32 off), TF32,
  bf16 autocast and channels_last, against torchvision's alexnet() in the same settings
  (and ours with the LRN + pool as PyTorch operations, the fused kernel's baseline);
- syncs: the trainer's steps under torch.cuda.set_sync_debug_mode("error"): 0 host syncs;
- two_device: the placement ("cuda:0", "cpu") against one device, same weights and input:
  outputs and gradients compared (fp32, TF32 off; tolerances in the JSON), and its speed;
- loader: the torch backend's training batches/s on the device: PIL decoding in workers
  and nvJPEG decoding (torchvision) on JPEG shards, and raw shards;
- handoff: the torch backend's batch hand-off alone (workers do no pixel work), µs per
  image to the device: per-batch shared tensors + pin-memory thread against the ring of
  pinned slots (issue 25); the loader section also times one core's decode-only rate and
  sets issue 25's targets beside the raw and JPEG rows;
- trainer: `alexprep train`'s own loop (model/train.py) for a few hundred steps: images/s
  and the fraction of wall time spent waiting for data (goal on a GPU: under 5%);
- resume: N steps uninterrupted against N/2, a mid-epoch checkpoint, and a resume to N:
  the final weights compared bit for bit;
- eval: 1-crop and 10-crop evaluation images/s (loader alone and loader + model);
- digits: `alexprep demo`'s training run in fp32 and in bf16 channels_last, same seed: the
  final errors side by side (does the faster precision learn as well?);
- compile: torch.compile'd training steps (compile time apart) against eager, last
  because it is the slowest to warm up.

Peak GPU memory is recorded with every GPU measurement. A section that fails records
{"error": ...} and the run goes on; a contender that cannot run says why; nothing is
estimated. `--device cpu` runs the same code at tiny sizes (the CPU smoke in `make test`).

Self-contained on purpose: imports only alexprep, torch, torchvision, numpy and the
standard library. Where alexprep is not installed (the lent GPU machine has no .venv and
no network), it makes build/gpu-path/alexprep/{imagenet_prep,model,cli} symlinks to the
source folders and imports through them.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

STARTED = time.monotonic()
# Deterministic cuBLAS for the resume comparison (read when cuBLAS starts, so set before
# torch touches CUDA); it fixes the workspace size, which costs nothing measurable here.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIM = REPO / "build" / "gpu-path"
PACKAGES = ("imagenet_prep", "model", "cli")


def make_shim(shim: Path = SHIM, source: Path = REPO) -> Path:
    """shim/alexprep/<package> -> the source folders, as pyproject's package-dir maps them
    (relative links, so the tree can move)."""
    pkg = shim / "alexprep"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:
        link = pkg / name
        if not link.exists():
            try:
                link.symlink_to(os.path.relpath(source / name, pkg), target_is_directory=True)
            except FileExistsError:  # made meanwhile by another process
                pass
    return shim


def ensure_alexprep() -> str:
    """Import alexprep as installed, or through the symlink shim; returns which."""
    try:
        import alexprep.model.alexnet  # noqa: F401

        return f"installed ({Path(alexprep.model.alexnet.__file__).parent.parent})"
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "alexprep" or m.startswith("alexprep.")]:
        del sys.modules[name]
    shim = str(make_shim())
    sys.path.insert(0, shim)
    # DataLoader and build workers fork (sys.path inherited); a spawned child reads this.
    os.environ["PYTHONPATH"] = os.pathsep.join([shim, *filter(None, [os.environ.get("PYTHONPATH")])])
    importlib.invalidate_caches()
    import alexprep.model.alexnet  # noqa: F401

    return f"shim {shim}"


IMPORTED_VIA = ensure_alexprep()

from alexprep.imagenet_prep.build import BuildConfig, build_shards  # noqa: E402
from alexprep.imagenet_prep.loaders import eval_loader, train_loader  # noqa: E402
from alexprep.imagenet_prep.sample_data import COMMON_SIZES, LARGE_SIZES, SMALL_SIZES, jpeg_bytes, load_photo, photo_crop  # noqa: E402,E501
from alexprep.imagenet_prep.stats import compute_stats, write_stats  # noqa: E402
from alexprep.imagenet_prep.transform import ImageSpec  # noqa: E402
from alexprep.model.alexnet import (  # noqa: E402
    POOL_KERNEL, POOL_STRIDE, AlexNet, AlexNetConfig, fused_lrn_max_pool, local_response_norm_max_pool,
)
from alexprep.model.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from alexprep.model.config import TrainConfig  # noqa: E402
from alexprep.model.evaluate import evaluate  # noqa: E402
from alexprep.model.train import train  # noqa: E402

MB = 2**20
CLASSES = 10
SECTIONS = ("machine", "data", "lrn", "convs", "model", "two_device", "syncs", "loader", "handoff", "gpu_decode",
            "trainer", "resume", "eval", "digits", "compile")
# The model section's contenders: ours (towers as grouped convolutions, as one device runs
# them; the fused Triton LRN + pool where Triton imports), the same with the LRN + pool as
# PyTorch operations, ours with the towers as two separate halves on the same device,
# torchvision's.
MODELS = ("alexprep", "alexprep-eager-lrn", "alexprep-split", "torchvision")
# The convs section: the grouped convolutions of the towers (total in / out channels, maps'
# side, kernel, padding; groups=2), against dense ones of equal multiply-adds (in / 2 -> out).
CONV_LAYERS = {"conv2": (96, 256, 27, 5, 2), "conv4": (384, 384, 13, 3, 1), "conv5": (384, 256, 13, 3, 1)}
PRECISIONS = ("fp32", "tf32", "bf16")
# The trainer section's runs (TrainConfig fields over its base): the first is the longest.
TRAINER_RUNS = {
    "fp32": {},
    "fp32_log_every_10": dict(log_every=10),
    "bf16_channels_last": dict(precision="bf16", channels_last=True),
    "fp32_compiled": dict(compile=True),
    "bf16_channels_last_compiled": dict(precision="bf16", channels_last=True, compile=True),
    # The fastest eager setting on raw shards (no decoding): is the GPU ever waiting for data?
    "bf16_channels_last_raw": dict(precision="bf16", channels_last=True, shards="raw"),
}
# Issue 25's targets for the loader section (H200 + 16 cores): raw shards, images/s; JPEG
# shards, a share of (training workers x one core's decode-only rate).
LOADER_RAW_TARGET = 30_000
LOADER_JPEG_SHARE = 0.9
# Issue 30's targets for the gpu_decode section (H200 + 16 cores): nvImageCodec's hardware
# decoder, loader-only images/s on JPEG shards, and the same over PIL workers'.
NVIMGCODEC_TARGET = 30_000
NVIMGCODEC_OVER_PIL = 2.5
# The gpu_decode section's contenders: (name, decoder, NvImageCodecDecoder's arguments).
# "hw-plain": whole images, nvJPEG's own chroma upsampling, in case the hardware decoder
# refuses ROI or PIL's upsampling (its `fallbacks` would show it).
GPU_DECODERS = (("nvimgcodec/hw", "nvimgcodec", dict(backends=("hw",))),
                ("nvimgcodec/hw-plain", "nvimgcodec", dict(backends=("hw",), roi=False, fancy_upsampling=False)),
                ("nvimgcodec/cuda", "nvimgcodec", dict(backends=("cuda",))),
                ("pil", "pil", None), ("torchvision", "torchvision", None))
# scikit-learn's sample photos: the only real photos on the lent GPU machine (no scikit-image).
PHOTOS = ("china", "flower")


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    name: str
    batch: int  # model, two-device, loader and trainer batch
    train_images: int
    val_images: int
    raw_images: int  # the raw build's train split (196 KB an image)
    model_warmup: int  # untimed steps per contender (the first also timed, as first_step_s)
    model_blocks: int  # timed blocks ...
    block_steps: int  # ... of this many steps, one sync per block
    split_steps: int  # timed steps of the two-device placement
    loader_warmup: int  # batches before the clock starts (workers' start-up)
    loader_batches: int  # timed batches
    trainer_steps: int  # steps of each throughput run of the trainer
    trainer_warmup: int  # first steps not counted
    resume_steps: int  # uninterrupted length; the resumed run stops at half and continues
    eval_batch: int  # 1-crop eval batch
    eval_batch_10: tuple  # 10-crop eval batches (images, x10 crops each)
    warm_passes: bool  # untimed warm-up passes before the two-device and eval timings
    smoke: bool  # the CPU smoke: a step of AlexNet costs seconds there, so fewer contenders


# full: ~50 steps an epoch, so the trainer's runs cross epoch ends (validation, checkpoint)
# and the resume's checkpoint (35) is mid-epoch with the epoch end (50) before its end (70).
FULL = Sizes("full", batch=128, train_images=6400, val_images=1024, raw_images=3200, model_warmup=3,
             model_blocks=8, block_steps=5, split_steps=3, loader_warmup=4, loader_batches=40,
             trainer_steps=300, trainer_warmup=20, resume_steps=70, eval_batch=128, eval_batch_10=(12, 64),
             warm_passes=True, smoke=False)
# tiny: 3 steps an epoch; the resume stops at 2 (mid-epoch) and ends at 4, past an epoch end.
TINY = Sizes("tiny", batch=2, train_images=6, val_images=2, raw_images=4, model_warmup=1, model_blocks=1,
             block_steps=1, split_steps=1, loader_warmup=1, loader_batches=3, trainer_steps=3, trainer_warmup=1,
             resume_steps=4, eval_batch=2, eval_batch_10=(2,), warm_passes=False, smoke=True)
SMOKE_SKIP = "left out of the CPU smoke (a step of AlexNet takes seconds on 2 busy cores)"


# ----------------------------------------------------------------------------- helpers
class SectionTimeout(Exception):
    pass


def reason(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:400] if lines else ''}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


class Peak:
    """Peak GPU memory of what runs inside (allocated by tensors, and reserved by the
    caching allocator), in MiB; None on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.allocated_mb = self.reserved_mb = None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.allocated_mb = round(torch.cuda.max_memory_allocated(self.device) / MB, 1)
            self.reserved_mb = round(torch.cuda.max_memory_reserved(self.device) / MB, 1)

    def to_json(self) -> dict:
        if self.device.type != "cuda":
            return {"peak_gpu_memory_mb": None, "peak_gpu_memory_note": "no GPU: the device is the CPU"}
        return {"peak_gpu_memory_mb": self.allocated_mb, "peak_gpu_reserved_mb": self.reserved_mb}


def rate_summary(images: int, seconds: list[float]) -> dict:
    """images/s over repeated timings of `images` images: median, slowest, fastest."""
    med = statistics.median(seconds)
    return {"images_per_s": round(images / med, 1), "images_per_s_min": round(images / max(seconds), 1),
            "images_per_s_max": round(images / min(seconds), 1), "timings": len(seconds)}


def have_torchvision() -> str | None:
    """None if torchvision's models import, else why not."""
    try:
        import torchvision  # noqa: F401
        import torchvision.models  # noqa: F401
    except Exception as exc:  # ImportError, or a build that does not match torch
        return f"torchvision is not importable here ({reason(exc)})"
    return None


def free_cuda() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise SectionTimeout in the main thread after `seconds` (a hung section must not
    take the rest of the run with it). Blocking C calls finish first."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout(f"section ran past its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- the run
class Check:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.gpu = self.device.type == "cuda"
        self.sizes = FULL if args.sizes == "full" else TINY
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.work_dir))
        self.deadline = STARTED + args.budget_s
        self.result: dict = {
            "benchmark": "gpu_check",
            "issue": 12,
            "device": str(self.device),
            "sizes": asdict(self.sizes),
            "budget_s": args.budget_s,
            "sections": {},
        }
        self.jpeg = self.raw = None  # build folders, once the data section made them
        self.current = None  # the section running
        self.cuda_failed = None  # where a CUDA error poisoned the context, if one did

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def flush(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - STARTED, 1)
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        tmp.replace(path)

    def section(self, name: str, fn, cap_s: float, needs_s: float = 5.0) -> None:
        """Run one section within min(its cap, what is left); record an error, never raise.

        A CUDA error such as an illegal memory access poisons the process's CUDA context:
        it is recorded where it surfaced, and every later section says so instead of running."""
        t0 = time.monotonic()
        left = self.left()
        print(f"[gpu_check {t0 - STARTED:6.1f} s] {name} ...", file=sys.stderr, flush=True)
        self.current = name
        if self.cuda_failed:
            out = {"skipped": f"the CUDA context failed in an earlier section ({self.cuda_failed})"}
        elif left < needs_s:
            out = {"skipped": f"out of time: {left:.0f} s left of the {self.args.budget_s:.0f} s budget, "
                              f"this section needs about {needs_s:.0f} s"}
        else:
            limit = min(cap_s, left)
            try:
                with alarm(limit + 30):
                    out = fn(time.monotonic() + limit)
            except Exception as exc:
                out = {**self.result["sections"].get(name, {}), "error": reason(exc),
                       "traceback": traceback.format_exc()[-3000:]}
            try:
                free_cuda()
            except Exception as exc:  # the context is gone: keep what the section recorded
                out["cuda_error_after"] = reason(exc)
                self.cuda_failed = f"{name}: {reason(exc)}"
        out.pop("partial", None)
        out["section_s"] = round(time.monotonic() - t0, 1)
        self.result["sections"][name] = out
        self.flush()

    def partial(self, rows: list[dict]) -> None:
        """The current section's rows so far, on disk: a crash of the whole process (a
        CUDA fault can take it down) still leaves them in the JSON."""
        self.result["sections"][self.current] = {"partial": True, "rows": rows}
        self.flush()

    # ------------------------------------------------------------------------- machine
    def machine(self, deadline) -> dict:
        from alexprep.cli.info import environment_report

        info = {"imported_alexprep": IMPORTED_VIA, **environment_report(),
                "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                "platform": platform.platform(), "torch_cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                "torchvision": None, "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
        try:
            import torchvision

            info["torchvision"] = torchvision.__version__
        except Exception as exc:
            info["torchvision_missing"] = reason(exc)
        if self.gpu:
            p = torch.cuda.get_device_properties(self.device)
            info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                        compute_capability=f"{p.major}.{p.minor}")
        return info

    # ------------------------------------------------------------------------- data
    def data(self, deadline) -> dict:
        s = self.sizes
        src = self.work / "src"
        t = time.perf_counter()
        n = write_photo_corpus(src, s.train_images, s.val_images, workers=max(1, self.args.cpu_workers))
        corpus_s = time.perf_counter() - t
        out = {"photos": list(PHOTOS), "classes": CLASSES, "source_images": n, "corpus_s": round(corpus_s, 2)}
        workers = max(1, self.args.cpu_workers)
        shard = 256 if self.gpu else 8
        # raw has a val split too: the trainer validates at each epoch's end.
        for encoding, splits, limit in (("jpeg", ("train", "val"), None), ("raw", ("train", "val"), s.raw_images)):
            folder = self.work / f"out-{encoding}"
            tree = src if limit is None else self._subset(src, limit)
            t = time.perf_counter()
            report = build_shards(tree, folder, BuildConfig(spec=ImageSpec(encoding=encoding), shard_size=shard,
                                                            workers=workers, splits=splits))
            build_s = time.perf_counter() - t
            t = time.perf_counter()
            write_stats(folder, compute_stats(folder))
            written = sum(1 for _ in folder.rglob("*.arrow"))
            out[encoding] = {"build_s": round(build_s, 2), "stats_s": round(time.perf_counter() - t, 2),
                             "shards": written, "workers": workers,
                             "images": _count_images(report), "bytes": _folder_bytes(folder)}
            if encoding == "jpeg":
                self.jpeg = folder
            else:
                self.raw = folder
        return out

    def _subset(self, src: Path, n: int) -> Path:
        """A tree of the first n train images and every val image (hard links), for the raw build."""
        sub = self.work / "src-raw"
        files = sorted((src / "train").rglob("*.JPEG"))[:n] + sorted((src / "val").rglob("*.JPEG"))
        for f in files:
            dest = sub / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, dest)
            except OSError:
                shutil.copyfile(f, dest)
        return sub

    # ------------------------------------------------------------------------- lrn
    def lrn(self, deadline) -> dict:
        """The response normalisation + max pool block alone (what training runs between
        conv1/conv2 and the next layer), forward + backward, against max pooling alone
        (torchvision's AlexNet has no LRN) and against the same function torch.compile'd."""
        s, device = self.sizes, self.device
        alpha = AlexNetConfig().lrn_alpha
        shapes = {"norm1+pool1": (s.batch, 96, 55, 55), "norm2+pool2": (s.batch, 256, 27, 27)}

        def lrn_pool(t):
            return local_response_norm_max_pool(t, alpha=alpha, groups=2)

        def pool_only(t):
            return F.max_pool2d(t, POOL_KERNEL, POOL_STRIDE)

        def fused(t):
            return local_response_norm_max_pool(t, alpha=alpha, groups=2, fused=True)

        contenders = [("max_pool2d alone", pool_only), ("lrn+pool eager", lrn_pool), ("lrn+pool fused", fused)]
        if not s.smoke:
            contenders.append(("lrn+pool compiled", torch.compile(lrn_pool, backend="inductor", dynamic=False)))
        no_fused = ("the Triton kernel runs on CUDA (on the CPU in the interpreter: tests/test_lrn_pool.py)"
                    if not self.gpu else None if fused_lrn_max_pool() else "Triton does not import")
        rows = []
        # bf16 as training runs it: autocast, channels_last (conv outputs are bf16 there).
        for (stage, shape), (precision, layout) in ((st, pl) for st in shapes.items()
                                                    for pl in (("fp32", "nchw"), ("bf16", "channels_last"))):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.relu(torch.randn(shape, device=device)).to(dtype).contiguous(memory_format=fmt).requires_grad_()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                grad = torch.randn_like(pool_only(x.detach()))
            for name, fn in contenders:
                row = {"stage": stage, "shape": list(shape), "precision": precision, "layout": layout,
                       "contender": name}
                if name == "lrn+pool fused" and no_fused:
                    row["skipped"] = no_fused
                elif time.monotonic() > deadline:
                    row["skipped"] = "out of this section's time"
                else:
                    try:
                        row.update(self._block_timing(fn, x, grad, precision))
                        if name == "lrn+pool fused":
                            row.update(_agreement(fused, lrn_pool, x, grad, precision))
                    except Exception as exc:
                        row["error"] = reason(exc)
                rows.append(row)
                self.partial(rows)
        for r in rows:
            base = next((b.get("ms") for b in rows if b["stage"] == r["stage"] and b["precision"] == r["precision"]
                         and b["contender"] == "max_pool2d alone"), None)
            if base and r.get("ms"):
                r["vs_pool_alone"] = round(r["ms"] / base, 2)
        return {"what": "forward + backward of one block on a random post-ReLU input, ms per call (median of "
                        "blocks of calls, one sync per block; the compiled contender's first call, its "
                        "compilation, apart); bf16: a bf16 channels_last input under autocast, as training "
                        "runs it; 'fused': the Triton kernel (model/lrn_pool_kernel.py), its output and input "
                        "gradient against the eager path's (max |difference| / max |eager|); target: "
                        "vs_pool_alone <= 1.2", "rows": rows}

    def _block_timing(self, fn, x, grad, precision: str) -> dict:
        device, reps = self.device, (1 if self.sizes.smoke else 20)

        def call():
            x.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                y = fn(x)
            y.backward(grad.to(y.dtype))

        sync(device)
        t = time.perf_counter()
        call()
        sync(device)
        first = time.perf_counter() - t
        times = []
        for _ in range(3 if not self.sizes.smoke else 1):
            sync(device)
            t = time.perf_counter()
            for _ in range(reps):
                call()
            sync(device)
            times.append((time.perf_counter() - t) / reps)
        return {"ms": round(1000 * statistics.median(times), 3), "first_call_s": round(first, 3)}

    # ------------------------------------------------------------------------- convs
    def convs(self, deadline) -> dict:
        """Our grouped convolutions against dense ones of equal multiply-adds, each pass
        (forward, input gradient, weight gradient) alone; in a fresh process per cuDNN
        benchmark_limit (its algorithm cache cannot be emptied in place)."""
        if self.sizes.smoke:
            return {"skipped": "GPU only: cuDNN's algorithms (the CPU's are checked by train_throughput)"}
        out = {"what": "ms per call, median of 3 blocks of 20 calls after a warm-up; grouped = the towers' "
                       "groups=2 convolution, dense = in/2 -> out channels, groups=1, equal multiply-adds; "
                       "bf16: the tensors in bf16, as autocast casts them; cudnn.benchmark on",
               "batch": self.sizes.batch, "rows": []}
        for limit in (None, 0):
            left = deadline - time.monotonic()
            if left < 10:
                out["rows"].append({"benchmark_limit": limit, "skipped": "out of this section's time"})
                continue
            with mp.get_context("spawn").Pool(1) as pool:
                rows = pool.apply_async(conv_timings, (str(self.device), self.sizes.batch, limit)).get(left)
            out["rows"].extend(rows)
            self.partial(out["rows"])
        return out

    # ------------------------------------------------------------------------- syncs
    def syncs(self, deadline) -> dict:
        """The trainer's steps under torch.cuda.set_sync_debug_mode("error") (model/train.py
        SYNC_DEBUG_ENV), each run in its own process: a host sync inside a step raises,
        naming the operation; the reads every log_every steps are outside the steps."""
        if not self.gpu:
            return {"skipped": "torch's sync debug mode watches CUDA streams only"}
        rows = []
        plan = {"fp32": {}, "bf16_channels_last": dict(precision="bf16", channels_last=True),
                "bf16_channels_last_compiled": dict(precision="bf16", channels_last=True, compile=True)}
        for name, kw in plan.items():
            row = {"name": name, **kw}
            if time.monotonic() > deadline - (60 if kw.get("compile") else 10):
                row["skipped"] = "out of this section's time"
            else:
                config = self._config(max_steps=25, log_every=10, **kw)
                try:
                    train_in_new_process(self.jpeg, self.work / "runs" / f"syncs-{name}", config, self.device,
                                         env={"ALEXPREP_SYNC_DEBUG": "error"})
                    row.update(host_syncs_in_steps=0, steps=25)
                except Exception as exc:
                    text = str(exc)
                    row.update(host_syncs_in_steps="at least 1", error=reason(exc),
                               where=[ln.strip() for ln in text.splitlines() if "alexprep" in ln][-4:])
            rows.append(row)
            self.partial(rows)
        return {"what": "alexprep.model.train.train() for 25 steps, log_every=10, with ALEXPREP_SYNC_DEBUG=error; "
                        "target: 0 host syncs inside a step", "rows": rows}

    # ------------------------------------------------------------------------- digits
    def digits(self, deadline) -> dict:
        """Does bf16 learn as fp32 does? `alexprep demo`'s run (scikit-learn's digits, same
        seed) on the GPU in fp32 and in bf16 channels_last, each in its own process."""
        if self.sizes.smoke:
            return {"skipped": "a digits run takes minutes on a CPU (that is `make demo`)"}
        from alexprep.imagenet_prep.sample_data import write_digits_tree

        src, out = self.work / "digits", self.work / "digits-out"
        write_digits_tree(src, kaggle_val=True)
        build_shards(src, out, BuildConfig(shard_size=256, workers=max(1, self.args.cpu_workers)))
        write_stats(out, compute_stats(out))
        rows = []
        for name, kw in {"fp32": {}, "bf16_channels_last": dict(precision="bf16", channels_last=True)}.items():
            row = {"name": name, **kw}
            if time.monotonic() > deadline - 20:
                row["skipped"] = "out of this section's time"
                rows.append(row)
                continue
            config = TrainConfig(batch_size=32, epochs=6, bias_init="caffe", max_drops=0, backend="torch",
                                 log_every=10, devices=(str(self.device),), **{"precision": "fp32", **kw})
            run_dir = self.work / "runs" / f"digits-{name}"
            t = time.perf_counter()
            try:
                train_in_new_process(out, run_dir, config, self.device)
                final = json.loads((run_dir / "final.json").read_text())
                row.update(run_s=round(time.perf_counter() - t, 1), results=final.get("results"))
            except Exception as exc:
                row["error"] = reason(exc)
            rows.append(row)
            self.partial(rows)
        return {"what": "the demo's recipe (batch 32, 6 epochs, biases 0.1, seed 0) on the GPU; final 1- and "
                        "10-crop errors on the digits' val split; the precision is kept if its errors are "
                        "fp32's within binomial noise", "rows": rows, "verdict": _same_error(rows)}

    # ------------------------------------------------------------------------- model
    def _model_contender(self, model_name: str, module, layout: str, precision: str, compiled: bool = False,
                         compile_backend: str | None = None, baseline_fn=None) -> dict:
        """Forward + backward images/s of one configuration, and its peak GPU memory."""
        s, device = self.sizes, self.device
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        module.to(memory_format=fmt).train()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(s.batch, 3, 224, 224, generator=g).to(device).contiguous(memory_format=fmt)
        y = torch.randint(0, 1000, (s.batch,), generator=g).to(device)
        fn = module
        row = {"model": model_name, "layout": layout, "precision": precision, "compile": compiled, "batch": s.batch}
        if compiled:
            row["compile_backend"] = compile_backend
            fn = torch.compile(module, backend=compile_backend)

        def step(f):
            for p in module.parameters():
                p.grad = None
            set_tf32(precision == "tf32")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(f(x), y)
            loss.backward()

        def block(f) -> float:
            sync(device)
            t = time.perf_counter()
            for _ in range(s.block_steps):
                step(f)
            sync(device)
            return time.perf_counter() - t

        with Peak(device) as peak:
            sync(device)
            t = time.perf_counter()
            step(fn)  # cuDNN's benchmark search, or torch.compile's compilation
            sync(device)
            row["first_step_s"] = round(time.perf_counter() - t, 3)
            for _ in range(s.model_warmup - 1):
                step(fn)
            times, base = [], []
            for _ in range(s.model_blocks):
                times.append(block(fn))
                if baseline_fn is not None:  # interleaved: the eager baseline, same moment
                    base.append(block(baseline_fn))
        row.update(rate_summary(s.batch * s.block_steps, times))
        row.update(peak.to_json())
        if base:
            row["eager_baseline_images_per_s"] = rate_summary(s.batch * s.block_steps, base)["images_per_s"]
            row["vs_eager"] = round(row["images_per_s"] / row["eager_baseline_images_per_s"], 3)
        x = y = None
        set_tf32(False)
        return row

    def _make_model(self, model_name: str):
        torch.manual_seed(0)
        if model_name == "alexprep":
            return AlexNet(devices=(self.device,)), None
        if model_name == "alexprep-eager-lrn":
            return AlexNet(devices=(self.device,), fused_lrn=False), None
        if model_name == "alexprep-split":
            return AlexNet(devices=(self.device, self.device)), None
        missing = have_torchvision()
        if missing:
            return None, missing
        import torchvision

        return torchvision.models.alexnet(num_classes=1000).to(self.device), None

    def model(self, deadline) -> dict:
        """Eager contenders: each layout builds its model once; precisions share it."""
        rows = []
        precisions = self.args.precisions
        for model_name in self.args.models:
            for layout in ("nchw", "channels_last"):
                module, missing = self._make_model(model_name)
                for precision in precisions:
                    row = {"model": model_name, "layout": layout, "precision": precision, "compile": False}
                    if missing:
                        row["skipped"] = missing
                    elif precision == "tf32" and not self.gpu:
                        row["skipped"] = "TF32 is a CUDA setting (Ampere and later)"
                    elif self.sizes.smoke and ((layout, precision) != ("nchw", "fp32")
                                               or model_name in ("alexprep-split", "alexprep-eager-lrn")):
                        row["skipped"] = SMOKE_SKIP
                    elif time.monotonic() > deadline:
                        row["skipped"] = "out of this section's time"
                    else:
                        try:
                            row = self._model_contender(model_name, module, layout, precision)
                        except Exception as exc:
                            row["error"] = reason(exc)
                    rows.append(row)
                module = None
                free_cuda()
        _relate(rows)
        return {"what": "forward + cross-entropy + backward on random inputs already on the device, "
                        "images/s; median over timed blocks (one sync per block); fp32 means TF32 off",
                "rows": rows, "baselines": "vs_alexprep_fp32: our fp32 NCHW eager; "
                                           "vs_torchvision: torchvision's alexnet() in the same settings"}

    def compile(self, deadline) -> dict:
        """torch.compile'd steps against eager, each pair interleaved; compile time apart."""
        backend = "inductor" if self.gpu else "eager"
        rows = []
        try:
            import torch._dynamo.config as dynamo_config

            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo_config, name):
                    setattr(dynamo_config, name, 64)
        except ImportError:
            pass
        plan = [("alexprep", "nchw", "fp32"), ("torchvision", "nchw", "fp32"),
                ("alexprep", "channels_last", "bf16"), ("torchvision", "channels_last", "bf16")]
        for i, (model_name, layout, precision) in enumerate(plan):
            row = {"model": model_name, "layout": layout, "precision": precision, "compile": True,
                   "compile_backend": backend}
            left = deadline - time.monotonic()
            module, missing = self._make_model(model_name)
            if missing:
                row["skipped"] = missing
            elif self.sizes.smoke and i >= 1:
                row["skipped"] = SMOKE_SKIP
            elif left < self.args.compile_needs_s:
                row["skipped"] = (f"out of time: {left:.0f} s left, a compilation may take "
                                  f"{self.args.compile_needs_s:.0f} s")
            else:
                try:
                    import torch._dynamo

                    torch._dynamo.reset()
                    row = self._model_contender(model_name, module, layout, precision, compiled=True,
                                                compile_backend=backend, baseline_fn=module)
                except Exception as exc:
                    row["error"] = reason(exc)
            rows.append(row)
            module = None
            free_cuda()
        return {"what": "first_step_s is the compilation (forward + backward); images/s after it, each "
                        "compiled block interleaved with an eager block of the same model and settings",
                "backend_note": None if self.gpu else "CPU smoke: backend 'eager' (dynamo tracing, no inductor "
                                                      "code generation), so that the smoke stays short",
                "rows": rows}

    # ------------------------------------------------------------------------- two devices
    def two_device(self, deadline) -> dict:
        s, device = self.sizes, self.device
        second = torch.device("cpu")
        placement = (device, second)
        out = {"placement": [str(d) for d in placement], "baseline": [str(device)], "batch": s.batch}
        if not self.gpu:
            out["note"] = "no GPU: ('cpu', 'cpu') runs the two-tower code path; ('cuda:0', 'cpu') needs CUDA"
        set_tf32(False)
        torch.manual_seed(0)
        one = AlexNet(num_classes=1000, devices=(device,), dropout=0.0)
        split = AlexNet(num_classes=1000, devices=placement, dropout=0.0)
        split.load_state_dict(one.state_dict())
        g = torch.Generator().manual_seed(1)
        x = torch.randn(s.batch, 3, 224, 224, generator=g).to(device)
        y = torch.randint(0, 1000, (s.batch,), generator=g).to(device)
        out["compare"] = compare_placements(one, split, x, y)
        one.zero_grad(set_to_none=True)
        split.zero_grad(set_to_none=True)
        for name, m in (("one_device", one), ("two_device", split)):
            if time.monotonic() > deadline:
                out[name] = {"skipped": "out of this section's time"}
                continue
            times = []
            with Peak(device) as peak:
                warm = int(s.warm_passes)
                for i in range(s.split_steps + warm):
                    for p in m.parameters():
                        p.grad = None
                    sync(device)
                    t = time.perf_counter()
                    F.cross_entropy(m(x), y).backward()
                    sync(device)
                    if i >= warm:
                        times.append(time.perf_counter() - t)
            out[name] = {**rate_summary(s.batch, times), **peak.to_json(), "precision": "fp32"}
        if "images_per_s" in out.get("two_device", {}) and "images_per_s" in out.get("one_device", {}):
            out["two_over_one"] = round(out["two_device"]["images_per_s"] / out["one_device"]["images_per_s"], 4)
        return out

    # ------------------------------------------------------------------------- loader
    def _loader_rate(self, root: Path, decoder: str, deadline) -> dict:
        s, device = self.sizes, self.device
        row = {"shards": root.name.replace("out-", ""), "decoder_asked": decoder}
        t = time.perf_counter()
        loader = train_loader(root, batch_size=s.batch, device=str(device), seed=0, backend="torch",
                              decoder=decoder)
        try:
            backend = getattr(loader, "_backend", None)
            row.update(workers=loader.config.threads, decoder=getattr(backend, "decoder", None),
                       mode=getattr(backend, "mode", None), batches_per_epoch=len(loader))
            with Peak(device) as peak:
                got, first = 0, None
                t_block = None
                while got < s.loader_warmup + s.loader_batches and time.monotonic() < deadline:
                    for images, labels in loader:
                        got += 1
                        if first is None:
                            sync(device)
                            first = time.perf_counter() - t
                        if got == s.loader_warmup:
                            sync(device)
                            t_block = time.perf_counter()
                        if got >= s.loader_warmup + s.loader_batches or time.monotonic() > deadline:
                            break
                sync(device)
                timed = got - s.loader_warmup
                if t_block is None or timed <= 0:
                    raise RuntimeError("out of this section's time before any timed batch")
                elapsed = time.perf_counter() - t_block
            assert images.shape == (s.batch, 3, 224, 224) and images.device.type == device.type, images.shape
            row.update(images_per_s=round(timed * s.batch / elapsed, 1), timed_batches=timed,
                       first_batch_s=round(first, 3), **peak.to_json(),
                       decode_failures=loader.decode_failure_count, fallbacks=getattr(backend, "fallbacks", None))
        finally:
            loader.close()
        return row

    def loader(self, deadline) -> dict:
        rows = []
        contenders = [(self.jpeg, "pil"), (self.jpeg, "torchvision"), (self.raw, "pil")]
        for root, decoder in contenders:
            name = f"{root.name.replace('out-', '')}/{decoder}"
            if decoder == "torchvision" and have_torchvision():
                rows.append({"name": name, "skipped": have_torchvision()})
                continue
            if time.monotonic() > deadline:
                rows.append({"name": name, "skipped": "out of this section's time"})
                continue
            try:
                rows.append({"name": name, **self._loader_rate(root, decoder, deadline)})
            except Exception as exc:
                rows.append({"name": name, "error": reason(exc)})
        base = next((r.get("images_per_s") for r in rows if r["name"] == "jpeg/pil"), None)
        for r in rows:
            if base and r.get("images_per_s"):
                r["vs_jpeg_pil"] = round(r["images_per_s"] / base, 3)
        one_core = self._decode_one_core(deadline)
        rows.append(one_core)
        self._loader_targets(rows, one_core.get("images_per_s"))
        return {"what": "train_loader(backend='torch') batches on the device, images/s after warm-up "
                        "(workers started, nvJPEG initialised); 'pil' decodes in CPU workers, 'torchvision' "
                        "decodes each batch with nvJPEG on the GPU (CPU on a CPU device); raw shards "
                        "need no decoding", "rows": rows}

    def _decode_one_core(self, deadline) -> dict:
        """One core's decode-only rate: the JPEG shards' images decoded by PIL in this
        process, one after another (what one loader worker could do at best)."""
        from alexprep.imagenet_prep.transform import decode

        loader = train_loader(self.jpeg, batch_size=self.sizes.batch, device="cpu", seed=0, backend="torch",
                              workers=0)
        try:
            samples, spec = loader.samples, loader.index.spec
            n = min(len(samples), 2000)
            decode(samples.view(0), spec)  # warm
            t, done = time.perf_counter(), 0
            while done < n and (done < 20 or time.monotonic() < deadline):
                decode(samples.view(done % len(samples)), spec)
                done += 1
            rate = done / (time.perf_counter() - t)
        finally:
            loader.close()
        return {"name": "jpeg/decode_one_core", "images_per_s": round(rate, 1), "images": done}

    def _loader_targets(self, rows: list[dict], one_core: float | None) -> None:
        """Issue 25's targets beside the rows they judge (meaningful on the GPU machine)."""
        from alexprep.imagenet_prep.devices import training_workers

        workers = training_workers()
        for r in rows:
            if r.get("name") == "raw/pil" and r.get("images_per_s"):
                r.update(target_images_per_s=LOADER_RAW_TARGET, meets_target=r["images_per_s"] >= LOADER_RAW_TARGET)
            if r.get("name") == "jpeg/pil" and r.get("images_per_s") and one_core:
                target = round(LOADER_JPEG_SHARE * workers * one_core, 1)
                r.update(target_images_per_s=target, meets_target=r["images_per_s"] >= target,
                         target_rule=f"{LOADER_JPEG_SHARE} x {workers} training workers x one core's decode-only rate")

    # ------------------------------------------------------------------------- gpu_decode
    def gpu_decode(self, deadline) -> dict:
        """Issue 30: each decoder's loader-only images/s on the JPEG shards, what it takes
        from a training step, and (nvImageCodec) how far its batches are from PIL's."""
        from alexprep.imagenet_prep.gpu_decoders import have_nvimgcodec

        rows = []
        for name, decoder, options in GPU_DECODERS:
            self.partial(rows)
            skip = None
            if decoder == "nvimgcodec":
                skip = ("needs CUDA" if self.device.type != "cuda" else None) or \
                    (None if have_nvimgcodec() else "nvImageCodec is not installed (GPU.md: bringing the wheels)")
            elif decoder == "torchvision":
                skip = have_torchvision()
            if skip or time.monotonic() > deadline:
                rows.append({"name": name, "skipped": skip or "out of this section's time"})
                continue
            try:
                with _nvimgcodec_options(options):
                    row = {"name": name, **self._loader_rate(self.jpeg, decoder, deadline)}
                    row.update(self._step_cost(decoder, deadline))
                    if decoder == "nvimgcodec":
                        row["vs_pil_levels"] = self._vs_pil(decoder)
                rows.append(row)
            except Exception as exc:
                rows.append({"name": name, "error": reason(exc), "traceback": traceback.format_exc()[-2000:]})
            free_cuda()
        pil = next((r.get("images_per_s") for r in rows if r["name"] == "pil"), None)
        for r in rows:
            if r["name"] == "nvimgcodec/hw" and r.get("images_per_s"):
                over = round(r["images_per_s"] / pil, 3) if pil else None
                r.update(target_images_per_s=NVIMGCODEC_TARGET, vs_pil=over, target_vs_pil=NVIMGCODEC_OVER_PIL,
                         meets_target=r["images_per_s"] >= NVIMGCODEC_TARGET and (over or 0) >= NVIMGCODEC_OVER_PIL)
        return {"what": "train_loader(backend='torch', decoder=...) on JPEG shards: loader-only images/s after "
                        "warm-up; step_ms_alone / step_ms_while_decoding: an AlexNet fp32 training step on the "
                        "loader's batches against the same step on a fixed batch, timed before and after (taken_ms: "
                        "the difference, the decoder's cost to training incl. any wait for data; near 0 it is "
                        "noise and may be negative); vs_pil_levels: one batch against "
                        "PIL workers', 0-255 levels (the test's tolerance: gpu_decoders tests)", "rows": rows}

    def _step_cost(self, decoder: str, deadline) -> dict:
        """ms per fp32 training step on a fixed batch, and with each step's batch from the loader."""
        s, device = self.sizes, self.device
        model, _ = self._make_model("alexprep")
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        fixed = torch.randn(s.batch, 3, 224, 224, device=device)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def per_step(batches) -> float:
            for x, y in itertools.islice(batches, 1):  # warm: cuDNN's search, the loader's workers
                step(x, y)
            sync(device)
            t, n = time.perf_counter(), 0
            for x, y in itertools.islice(batches, max(2, s.block_steps * s.model_blocks)):
                step(x, y)
                n += 1
                if time.monotonic() > deadline:
                    break
            sync(device)
            return 1000 * (time.perf_counter() - t) / max(n, 1)

        labels = torch.zeros(s.batch, dtype=torch.int64, device=device)
        before = per_step(iter(lambda: (fixed, labels), None))
        loader = train_loader(self.jpeg, batch_size=s.batch, device=str(device), seed=1, backend="torch",
                              decoder=decoder)
        try:
            fed = per_step(x for _ in itertools.count() for x in loader)
        finally:
            loader.close()
        alone = (before + per_step(iter(lambda: (fixed, labels), None))) / 2  # before and after: drift
        return {"step_ms_alone": round(alone, 2), "step_ms_while_decoding": round(fed, 2),
                "taken_ms": round(fed - alone, 2)}

    def _vs_pil(self, decoder: str) -> dict:
        """One batch through `decoder` against PIL workers' (same draws): 0-255 levels."""
        batches, fallbacks = [], []
        for d in (decoder, "pil"):  # the paper's recipe: mean image subtracted, no division: levels
            loader = train_loader(self.jpeg, batch_size=self.sizes.batch, device=str(self.device), seed=2,
                                  backend="torch", decoder=d)
            try:
                batches.append(next(iter(loader))[0].float())
                fallbacks.append(getattr(loader._backend, "fallbacks", None))
            finally:
                loader.close()
        d = (batches[0] - batches[1]).abs()
        return {"mean": round(d.mean().item(), 4), "max": round(d.max().item(), 2), "fallbacks": fallbacks[0]}

    # ------------------------------------------------------------------------- handoff
    @contextlib.contextmanager
    def _handoff_kind(self, kind: str):
        """Loaders made inside use the torch backend's hand-off `kind` ("fresh": a shared tensor
        per batch and the pin-memory thread; "slots": the ring), their workers doing no pixel
        work but one fill of the batch (forked workers inherit the patched method)."""
        from alexprep.imagenet_prep.torch_backend import ShardBatches, TorchBackend

        saved = TorchBackend.handoff, ShardBatches._write
        TorchBackend.handoff = kind
        ShardBatches._write = lambda self, batch, out, failures: out[:len(batch)].fill_(1)
        try:
            yield
        finally:
            TorchBackend.handoff, ShardBatches._write = saved

    def _handoff_rate(self, kind: str, deadline) -> float:
        s, device = self.sizes, self.device
        with self._handoff_kind(kind):
            loader = train_loader(self.raw, batch_size=s.batch, device=str(device), seed=0, backend="torch", workers=1)
        try:
            got, images, t = 0, 0, None
            while got < s.loader_warmup + s.loader_batches and time.monotonic() < deadline:
                for x, y in loader:
                    got += 1
                    if got == s.loader_warmup:
                        sync(device)
                        t = time.perf_counter()
                    elif t is not None:
                        images += len(y)
                    if got >= s.loader_warmup + s.loader_batches or time.monotonic() > deadline:
                        break
            sync(device)
            if not images:
                raise RuntimeError("out of this section's time before any timed batch")
            return 1e6 * (time.perf_counter() - t) / images
        finally:
            loader.close()

    def handoff(self, deadline) -> dict:
        """The torch backend's hand-off alone: per-batch shared tensors + pin-memory thread
        ("fresh") against the ring of pinned slots ("slots"), alternately, twice each."""
        runs: dict[str, list[float]] = {"fresh": [], "slots": []}
        for _ in range(2):
            for kind in runs:
                if time.monotonic() < deadline:
                    runs[kind].append(self._handoff_rate(kind, deadline))
        rows = [{"name": kind, "us_per_image": round(statistics.median(v), 2), "runs": [round(x, 2) for x in v]}
                for kind, v in runs.items() if v]
        out = {"what": "train_loader(backend='torch', workers=1) over raw shards whose worker only fills each "
                       "batch (no decoding or cutting): wall µs per image from the worker's finished batch to "
                       "the rendered batch on the device (synchronised at the end); 'fresh' is the hand-off "
                       "before issue 25, 'slots' the ring; target: slots <= 1/3 of fresh", "rows": rows}
        if len(rows) == 2:
            out["slots_over_fresh"] = round(rows[1]["us_per_image"] / rows[0]["us_per_image"], 4)
        if time.monotonic() < deadline:
            out["rrc_device_vs_cpu"] = self._rrc_agreement()
        return out

    def _rrc_agreement(self) -> dict:
        """recipe="rrc": the device's batches (windows cut in the workers, resized on the
        device in one batched call) against the CPU's (PIL in the workers), two batches."""
        diffs = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rrc on a centre-crop build: its windows are what matters
            made = [train_loader(self.jpeg, batch_size=self.sizes.batch, device=d, seed=0, backend="torch",
                                 recipe="rrc", workers=2) for d in (str(self.device), "cpu")]
        try:
            for (x, _), (x0, _) in zip(*made):
                diffs.append((x.cpu() - x0).abs())
                if len(diffs) == 2:
                    break
            d = torch.stack(diffs)
            return {"mode": getattr(made[0]._backend, "mode", None), "max": round(float(d.max()), 5),
                    "mean": round(float(d.mean()), 6), "tolerance": "a level of PIL: max <= 0.05, mean <= 0.005",
                    "within": bool(d.max() <= 0.05 and d.mean() <= 0.005)}
        finally:
            for loader in made:
                loader.close()

    # ------------------------------------------------------------------------- trainer
    def _config(self, **kw) -> TrainConfig:
        s = self.sizes
        base = dict(batch_size=s.batch, epochs=90, final_crops=0, backend="torch", devices=(str(self.device),),
                    precision="fp32", bias_init="caffe", keep_last=2, log_every=1, eval_batch_size=s.eval_batch)
        base.update(kw)
        return TrainConfig(**base)

    def _train_run(self, name: str, config: TrainConfig, shards: str = "jpeg") -> dict:
        s = self.sizes
        run_dir = self.work / "runs" / name
        t = time.perf_counter()
        peak = train_in_new_process(self.raw if shards == "raw" else self.jpeg, run_dir, config, self.device)
        wall = time.perf_counter() - t
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if r["kind"] == "step"]
        epochs = [r for r in rows if r["kind"] == "epoch"]
        row = {"name": name, "shards": shards, "precision": config.precision, "channels_last": config.channels_last,
               "compile": config.compile, "decoder": config.decoder, "log_every": config.log_every,
               "steps": config.max_steps, "batch": config.batch_size,
               "run_s": round(wall, 2), "epoch_ends": len(epochs), **peak}
        # Wall clock from the rows' timestamps (ms): the trainer's own step timing leaves out
        # the host sync where it reads the loss, validation and checkpoints (see GPU.md).
        timed = [r for r in steps if r["step"] >= s.trainer_warmup]
        if len(timed) < 2:
            row["skipped"] = "too few logged steps after warm-up to time"
            return row
        first, last = timed[0], timed[-1]
        row["counted_steps"] = last["step"] - first["step"]
        row["images_per_s_wall"] = round(row["counted_steps"] * config.batch_size
                                         / max(last["time"] - first["time"], 1e-9), 1)
        # Intervals between rows of one epoch: no validation or checkpoint inside them.
        pairs = [(a, b) for a, b in zip(timed, timed[1:]) if a["epoch"] == b["epoch"]]
        steady = sum(b["time"] - a["time"] for a, b in pairs)
        if pairs:
            row["images_per_s_steady"] = round(sum(b["step"] - a["step"] for a, b in pairs) * config.batch_size
                                               / max(steady, 1e-9), 1)
        if config.log_every == 1 and pairs:
            # Each row's data_wait_s is its step's time in the loader's next(), inside the interval.
            wait = [b["data_wait_s"] for a, b in pairs]
            row.update(
                data_wait_fraction=round(sum(wait) / max(steady, 1e-9), 4),
                data_wait_goal="under 0.05 on a GPU",
                data_wait_ms_median=round(1000 * statistics.median(wait), 2),
                trainer_reported_data_wait_fraction=round(
                    sum(b["data_wait_s"] for a, b in pairs)
                    / max(sum(b["data_wait_s"] + b["compute_s"] for a, b in pairs), 1e-9), 4),
            )
        else:
            row["data_wait_note"] = ("rows every log_every steps carry only their own step's wait: see the "
                                     "log_every=1 run for the fraction")
            row["trainer_reported_data_wait_fraction_last"] = steps[-1].get("data_wait_fraction")
        ckpts = list_checkpoints(run_dir / "checkpoints")
        row["checkpoints_kept"] = [p.name for p in ckpts]
        row["checkpoint_mb"] = round(ckpts[-1].stat().st_size / MB, 1) if ckpts else None
        shutil.rmtree(run_dir, ignore_errors=True)
        return row

    def trainer(self, deadline) -> dict:
        s = self.sizes
        smoked = ("fp32", "bf16_channels_last_raw")  # the smoke runs the first and the raw shards' run
        runs = [(name, kw, name in smoked or not s.smoke) for name, kw in TRAINER_RUNS.items()
                if self.args.trainer_runs is None or name in self.args.trainer_runs]
        rows = []
        for name, kw, wanted in runs:
            self.partial(rows)
            if not wanted:
                rows.append({"name": name, "skipped": SMOKE_SKIP})
                continue
            if time.monotonic() > deadline:
                rows.append({"name": name, "skipped": "out of this section's time"})
                continue
            try:
                steps = s.trainer_steps if not rows else max(s.trainer_steps // 3, s.trainer_warmup + 2)
                kw = dict(kw)
                shards = kw.pop("shards", "jpeg")
                rows.append(self._train_run(name, self._config(max_steps=steps, **kw), shards))
            except Exception as exc:
                rows.append({"name": name, "error": reason(exc), "traceback": traceback.format_exc()[-2000:]})
            free_cuda()
        return {"what": "alexprep.model.train.train() for max_steps steps (epochs of the corpus, each ending "
                        "in validation and a checkpoint), backend torch, the default decoder (PIL in workers); "
                        "'compiled': TrainConfig(compile=True), its compilation inside the warm-up steps; "
                        "images_per_s_wall from metrics.jsonl timestamps after "
                        f"{s.trainer_warmup} warm-up steps, epoch ends included; images_per_s_steady and "
                        "data_wait_fraction (time in the loader's next() / wall time) over intervals inside "
                        "an epoch; with log_every=1 the trainer syncs every step, so the GPU idles while "
                        "the host waits for data and the fraction is the GPU's idle share; log_every=10 "
                        "syncs every 10th step (the default is 50), letting the host queue steps ahead",
                "rows": rows}

    # ------------------------------------------------------------------------- resume
    def _resume_pair(self, mode: str) -> dict:
        """mode: "<deterministic|default>_<new|same>_process" (where the resumed part runs)."""
        s = self.sizes
        n, half = s.resume_steps, s.resume_steps // 2
        deterministic = mode.startswith("deterministic")
        new_process = "new_process" in mode
        # `train --deterministic` (TrainConfig.deterministic) sets and restores the settings
        # itself; the resume takes it from the run's config.json.
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            whole, parts = self.work / f"resume-{mode}-whole", self.work / f"resume-{mode}-parts"
            config = self._config(max_steps=n, log_every=max(1, n // 4), deterministic=deterministic)
            t = time.perf_counter()
            train(self.jpeg, whole, config, progress=False, log=lambda *a: None)
            whole_s = time.perf_counter() - t
            first = train(self.jpeg, parts, self._config(max_steps=half, log_every=max(1, n // 4),
                                                         deterministic=deterministic),
                          progress=False, log=lambda *a: None)
            mid = load_checkpoint(parts)
            t = time.perf_counter()
            if new_process:  # as a real resume runs: a fresh process
                resume_in_new_process(self.jpeg, parts, n)
            else:
                train(self.jpeg, parts, self._config(max_steps=n), resume=True, progress=False,
                      log=lambda *a: None)
            resumed_s = time.perf_counter() - t
        caught = sorted({str(w.message).splitlines()[0][:200] for w in seen
                         if "deterministic" in str(w.message).lower()})
        a, b = load_checkpoint(whole), load_checkpoint(parts)
        probe = train_loader(self.jpeg, batch_size=s.batch, device="cpu", seed=0, backend="torch", workers=0)
        per_epoch = len(probe)
        probe.close()
        diff = _state_diff(a["model"], b["model"])
        momentum = _state_diff(_momenta(a["optimizer"]), _momenta(b["optimizer"]))
        row = {"mode": mode, "steps": n, "checkpoint_at": mid["step"], "steps_per_epoch": per_epoch,
               "mid_epoch": mid["batch"] not in (0, per_epoch), "first_part_stopped": first.get("stopped"),
               "final_step": [a["step"], b["step"]], "uninterrupted_s": round(whole_s, 2),
               "resumed_part_s": round(resumed_s, 2),
               "weights": diff, "momentum": momentum,
               "exact": diff["tensors_differing"] == 0 and momentum["tensors_differing"] == 0
               and a["step"] == b["step"] == n,
               "nondeterminism_warnings": caught}
        if deterministic:
            row["settings"] = ("TrainConfig(deterministic=True), as `train --deterministic`: "
                               "torch.use_deterministic_algorithms(True) (an operation without a deterministic "
                               "kernel fails the row, naming it), CUBLAS_WORKSPACE_CONFIG="
                               f"{os.environ.get('CUBLAS_WORKSPACE_CONFIG')}, cudnn.deterministic on, "
                               "cudnn.benchmark off")
        if new_process:
            row["nondeterminism_warnings_note"] = "the new process's warnings are not collected"
        shutil.rmtree(whole, ignore_errors=True)
        shutil.rmtree(parts, ignore_errors=True)
        return row

    def resume(self, deadline) -> dict:
        modes = (["deterministic_new_process", "default_same_process", "deterministic_same_process"]
                 if self.gpu else ["default_new_process"])
        rows = []
        for mode in modes:
            if time.monotonic() > deadline:
                rows.append({"mode": mode, "skipped": "out of this section's time"})
                continue
            try:
                rows.append(self._resume_pair(mode))
            except Exception as exc:
                rows.append({"mode": mode, "error": reason(exc), "traceback": traceback.format_exc()[-2000:]})
            free_cuda()
        out = {"what": "train(max_steps=N) against train(max_steps=N/2) + train(resume=True, max_steps=N) in "
                       "the same process: the final checkpoints' weights and momenta compared bit for bit",
               "rows": rows}
        if not self.gpu:
            out["note"] = "on the CPU every kernel used is deterministic: 'default' is expected to be exact"
        return out

    # ------------------------------------------------------------------------- eval
    def eval(self, deadline) -> dict:
        s, device = self.sizes, self.device
        set_tf32(False)
        torch.manual_seed(0)
        model = AlexNet(num_classes=CLASSES, devices=(device,)).eval()
        rows = []
        plan = [(1, s.eval_batch)] + [(10, b) for b in s.eval_batch_10]
        for crops, batch in plan:
            name = f"{crops}-crop/batch {batch}"
            if time.monotonic() > deadline:
                rows.append({"name": name, "skipped": "out of this section's time"})
                continue
            try:
                loader = eval_loader(self.jpeg, batch_size=batch, device=str(device), crops=crops, backend="torch")
                try:
                    row = {"name": name, "crops": crops, "batch_images": batch,
                           "forward_batch": batch * crops, "images": len(loader.samples),
                           "decoder": getattr(getattr(loader, "_backend", None), "decoder", None),
                           "workers": loader.config.threads}
                    if s.warm_passes:  # workers, nvJPEG, cuDNN's benchmark search
                        for _ in loader:
                            pass
                        evaluate(model, loader, "fp32")
                    with Peak(device) as peak:
                        sync(device)
                        t = time.perf_counter()
                        for images, labels in loader:
                            pass
                        sync(device)
                        loader_s = time.perf_counter() - t
                        t = time.perf_counter()
                        result = evaluate(model, loader, "fp32")
                        sync(device)
                        eval_s = time.perf_counter() - t
                    row.update(loader_images_per_s=round(row["images"] / loader_s, 1),
                               eval_images_per_s=round(row["images"] / eval_s, 1),
                               crops_per_s=round(row["images"] * crops / eval_s, 1),
                               counted=result.count, **peak.to_json())
                finally:
                    loader.close()
            except Exception as exc:
                row = {"name": name, "error": reason(exc)}
            rows.append(row)
        base = next((r.get("eval_images_per_s") for r in rows if r.get("crops") == 1), None)
        for r in rows:
            if base and r.get("eval_images_per_s"):
                r["vs_1crop"] = round(r["eval_images_per_s"] / base, 3)
        return {"what": "eval_loader(backend='torch') over the val split, then alexprep.model.evaluate.evaluate "
                        "(softmax averaged over the crops), fp32; images/s of a pass after a warm-up pass; the "
                        "trainer's final 10-crop evaluation uses batch = train batch / 10",
                "rows": rows}

    # ------------------------------------------------------------------------- all
    def run(self) -> dict:
        a = self.args
        self.section("machine", self.machine, 30, needs_s=0)
        if self.wanted("data"):
            self.section("data", self.data, a.cap_data, needs_s=5)
        have_data = self.jpeg is not None and self.raw is not None
        for name, fn, cap in (("lrn", self.lrn, a.cap_lrn), ("convs", self.convs, a.cap_convs),
                              ("model", self.model, a.cap_model), ("two_device", self.two_device, a.cap_two_device)):
            if self.wanted(name):
                self.section(name, fn, cap)
        for name, fn, cap in (("syncs", self.syncs, a.cap_syncs), ("loader", self.loader, a.cap_loader),
                              ("handoff", self.handoff, a.cap_handoff),
                              ("gpu_decode", self.gpu_decode, a.cap_gpu_decode),
                              ("trainer", self.trainer, a.cap_trainer), ("resume", self.resume, a.cap_resume),
                              ("eval", self.eval, a.cap_eval), ("digits", self.digits, a.cap_digits),
                              ("compile", self.compile, 600)):
            if not self.wanted(name):
                continue
            if have_data or name == "compile":
                self.section(name, fn, cap, needs_s=10 if name == "compile" else 5)
            else:
                self.result["sections"][name] = {"skipped": "the data section did not build the shards"}
                self.flush()
        self.result["summary"] = summary(self.result)
        self.flush()
        return self.result

    def wanted(self, name: str) -> bool:
        """Whether --sections asks for `name` (the data section comes with any that needs it)."""
        asked = self.args.sections
        if name == "data":
            needs_data = {"data", "syncs", "loader", "handoff", "gpu_decode", "trainer", "resume", "eval"}
            return asked is None or bool(set(asked) & needs_data)
        return asked is None or name in asked

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


# ----------------------------------------------------------------------------- pieces
@contextlib.contextmanager
def _nvimgcodec_options(options: dict | None):
    """decoder="nvimgcodec" opened with these NvImageCodecDecoder arguments (None: as it is)."""
    from alexprep.imagenet_prep import torch_backend
    from alexprep.imagenet_prep.gpu_decoders import NvImageCodecDecoder

    if options is None:
        yield
        return
    opened = torch_backend.open_batch_decoder
    torch_backend.open_batch_decoder = lambda device: NvImageCodecDecoder(device, **options)
    try:
        yield
    finally:
        torch_backend.open_batch_decoder = opened


def compare_placements(one, split, x, y) -> dict:
    """Logits and every parameter's gradient of two placements of the same weights, fed
    the same batch, each against a float64 copy of the one-device model.

    Not against each other: at the paper's initialisation float32 itself is far from
    exact (conv1's gradient comes out ~5% off float64's on the CPU, in either placement:
    tiny gradients summed over 400k positions), so two correct float32 placements may
    differ by that much. The split placement is right when its distance to float64 is of
    the one-device model's size: at most GRAD_FACTOR times it, plus a floor."""
    import copy

    exact = copy.deepcopy(one).double()
    results = {}
    for name, m, inp in (("one", one, x), ("split", split, x), ("float64", exact, x.double())):
        m.train()
        logits = m(inp)
        F.cross_entropy(logits, y).backward()
        results[name] = (logits.detach().double(), [p.grad.detach().to(x.device).double() for p in m.parameters()])
    ref_out, ref_grads = results["float64"]
    names = [n for n, _ in one.named_parameters()]

    def error(name: str) -> tuple[float, list[float]]:
        out, grads = results[name]
        return (_rel(out, ref_out), [_rel(g, r) for g, r in zip(grads, ref_grads)])

    (one_out, one_grads), (split_out, split_grads) = error("one"), error("split")
    ratios = [(s - FLOOR) / o if o > 0 else (0.0 if s <= FLOOR else float("inf"))
              for s, o in zip(split_grads, one_grads)]
    worst = max(range(len(names)), key=lambda i: ratios[i])
    ok_out = split_out <= GRAD_FACTOR * one_out + FLOOR
    return {
        "what": "logits and every parameter's gradient of cross-entropy, same weights and input; fp32, "
                "TF32 off, dropout 0; error = max |x - float64| / max |float64|, float64 = the one-device "
                "model in float64 on the same device",
        "one_vs_float64": {"output": one_out, "grad_worst": max(one_grads),
                           "grad_worst_parameter": names[max(range(len(names)), key=lambda i: one_grads[i])]},
        "split_vs_float64": {"output": split_out, "grad_worst": max(split_grads),
                             "grad_worst_parameter": names[max(range(len(names)), key=lambda i: split_grads[i])]},
        "worst_ratio": {"parameter": names[worst], "split": split_grads[worst], "one": one_grads[worst],
                        "ratio": round(ratios[worst], 3)},
        "split_vs_one": {"output": _rel(results["split"][0], results["one"][0]),
                         "grad_worst": max(_rel(a, b) for a, b in zip(results["split"][1], results["one"][1]))},
        "rule": f"split's error <= {GRAD_FACTOR} x one device's error + {FLOOR:g}, for the logits and every "
                "gradient",
        "ok": ok_out and all(r <= GRAD_FACTOR for r in ratios),
    }


GRAD_FACTOR = 4.0  # two float32 computations' errors against float64 differ by chance, by less than this
FLOOR = 1e-6  # below this relative error, differences are float32's last bits


def _agreement(fused, eager, x, grad, precision: str) -> dict:
    """The fused block's output and input gradient against the eager block's, same input."""
    outs = []
    for fn in (fused, eager):
        t = x.detach().clone().requires_grad_()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = fn(t)
        y.backward(grad.to(y.dtype))
        outs.append((y.detach().double(), t.grad.double()))
    (fy, fg), (ey, eg) = outs
    return {"output_vs_eager": _rel(fy, ey), "grad_vs_eager": _rel(fg, eg)}


def conv_timings(device_name: str, batch: int, limit) -> list[dict]:
    """Rows of CONV_LAYERS' grouped and dense forms (a spawned process: fresh cuDNN cache)."""
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    if limit is not None:
        torch.backends.cudnn.benchmark_limit = limit
    rows = []
    for layer, (cin, cout, side, kernel, pad) in CONV_LAYERS.items():
        for precision, layout in ((p, lay) for p in PRECISIONS for lay in ("nchw", "channels_last")):
            set_tf32(precision == "tf32")
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            row = {"layer": layer, "precision": precision, "layout": layout,
                   "benchmark_limit": torch.backends.cudnn.benchmark_limit}
            for form, groups in (("grouped", 2), ("dense", 1)):
                x = torch.randn(batch, cin // (2 // groups), side, side, device=device, dtype=dtype)
                x = x.contiguous(memory_format=fmt)
                w = (torch.randn(cout, cin // 2, kernel, kernel, device=device, dtype=dtype) * 0.01)
                w = w.contiguous(memory_format=fmt)
                row[form] = _conv_passes(x, w, pad, groups)
            row["grouped_vs_dense"] = {k: round(row["grouped"][k] / row["dense"][k], 3) for k in row["grouped"]}
            rows.append(row)
    set_tf32(False)
    return rows


def _conv_passes(x, w, pad: int, groups: int) -> dict:
    """ms of forward, input gradient and weight gradient of one convolution."""
    g = torch.randn_like(F.conv2d(x, w, None, padding=pad, groups=groups))
    args = ([0], [1, 1], [pad, pad], [1, 1], False, [0, 0], groups)
    passes = {"forward": lambda: F.conv2d(x, w, None, padding=pad, groups=groups),
              "input_grad": lambda: torch.ops.aten.convolution_backward(g, x, w, *args, [True, False, False]),
              "weight_grad": lambda: torch.ops.aten.convolution_backward(g, x, w, *args, [False, True, False])}
    out = {}
    for name, fn in passes.items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(3):
            sync(x.device)
            t = time.perf_counter()
            for _ in range(20):
                fn()
            sync(x.device)
            times.append((time.perf_counter() - t) / 20)
        out[name] = round(1000 * statistics.median(times), 4)
    return out


def _same_error(rows: list[dict]) -> dict | None:
    """bf16's final errors against fp32's: equal within twice the binomial standard error
    of a difference of two error rates on the same n images."""
    done = {r["name"]: r["results"] for r in rows if r.get("results")}
    if len(done) < 2:
        return None
    verdict = {}
    for a, b in zip(done["fp32"], done["bf16_channels_last"]):
        n, p = a.get("count") or a.get("images"), a["top1_error"]
        tolerance = 2 * math.sqrt(2 * max(p * (1 - p), 1e-4) / n) if n else None
        diff = b["top1_error"] - p
        verdict[f"{a.get('crops', '?')}-crop"] = {"fp32": p, "bf16": b["top1_error"], "difference": round(diff, 4),
                                                  "tolerance": tolerance and round(tolerance, 4),
                                                  "same": bool(tolerance and abs(diff) <= tolerance)}
    return verdict


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a - ref).abs().max().item() / max(ref.abs().max().item(), 1e-300)


def train_in_new_process(root: Path, run_dir: Path, config: TrainConfig, device: torch.device,
                         env: dict | None = None) -> dict:
    """train() in a fresh Python, so that a CUDA fault (an illegal memory access poisons the
    whole process) fails this run alone, with its stderr; returns its peak GPU memory."""
    dev = str(device)
    stdout = _python_with_alexprep([
        f"config = TrainConfig.from_json(json.loads({json.dumps(config.to_json())!r}))",
        f"train({str(root)!r}, {str(run_dir)!r}, config, progress=False, log=lambda *a: None)",
        "peak = {}",
        f"if torch.device({dev!r}).type == 'cuda':",
        f"    peak = {{'peak_gpu_memory_mb': round(torch.cuda.max_memory_allocated({dev!r}) / 2**20, 1),",
        f"            'peak_gpu_reserved_mb': round(torch.cuda.max_memory_reserved({dev!r}) / 2**20, 1)}}",
        "print('PEAK ' + json.dumps(peak))",
    ], timeout=600, env=env)
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("PEAK "))[5:])


def resume_in_new_process(root: Path, run_dir: Path, max_steps: int) -> None:
    """train(resume=True) in a fresh Python, as a real resume runs (its settings from config.json)."""
    _python_with_alexprep([
        f"train({str(root)!r}, {str(run_dir)!r}, TrainConfig(max_steps={max_steps}), resume=True, progress=False,"
        " log=lambda *a: None)",
    ], timeout=300)


def _python_with_alexprep(lines: list[str], timeout: float, env: dict | None = None) -> str:
    """Run `lines` in a fresh Python that imports alexprep the way this one did (with json,
    torch, TrainConfig and train imported); its stdout, or RuntimeError with its stderr."""
    import subprocess

    code = "\n".join(["import json, sys, torch", f"sys.path[:0] = {[p for p in sys.path if p]!r}",
                      "from alexprep.model.config import TrainConfig", "from alexprep.model.train import train",
                      *lines])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode:
        raise RuntimeError(f"exit code {proc.returncode} in its own process: {proc.stderr.strip()[-1500:]}")
    return proc.stdout


def _relate(rows: list[dict]) -> None:
    """Each row against our fp32 NCHW eager row and against torchvision's same settings."""
    base = next((r.get("images_per_s") for r in rows
                 if r["model"] == "alexprep" and r["layout"] == "nchw" and r["precision"] == "fp32"), None)
    tv = {(r["layout"], r["precision"]): r.get("images_per_s") for r in rows if r["model"] == "torchvision"}
    for r in rows:
        if not r.get("images_per_s"):
            continue
        if base:
            r["vs_alexprep_fp32"] = round(r["images_per_s"] / base, 3)
        other = tv.get((r["layout"], r["precision"]))
        if r["model"].startswith("alexprep") and other:
            r["vs_torchvision"] = round(r["images_per_s"] / other, 3)


def _state_diff(a: dict, b: dict) -> dict:
    differing, worst, worst_name = 0, 0.0, None
    for k in a:
        x, y = a[k], b[k]
        if not torch.equal(x, y):
            differing += 1
            d = (x.double() - y.double()).abs().max().item()
            if d >= worst:
                worst, worst_name = d, k
    return {"tensors": len(a), "tensors_differing": differing, "max_abs_diff": worst, "worst": worst_name}


def _momenta(opt_state: dict) -> dict:
    out = {}
    for k, v in opt_state.get("state", {}).items():
        for name, t in v.items():
            if torch.is_tensor(t):
                out[f"{k}.{name}"] = t
    return out


def _count_images(report) -> dict:
    return {r.split: {"written": r.written, "skipped": len(r.skipped)} for r in report.splits}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


_PHOTO_CACHE: dict = {}


def _write_one(job) -> None:
    path, i, seed = job
    rng = np.random.default_rng([seed, i])
    photo = _PHOTO_CACHE[PHOTOS[i % len(PHOTOS)]]
    bucket = rng.random()
    pool = COMMON_SIZES if bucket < 0.8 else LARGE_SIZES if bucket < 0.9 else SMALL_SIZES
    size = pool[int(rng.integers(len(pool)))]
    Path(path).write_bytes(jpeg_bytes(photo_crop(photo, size, rng), quality=int(rng.integers(75, 96))))


def write_photo_corpus(root: Path, train_images: int, val_images: int, workers: int) -> int:
    """root/{train,val}/<wnid>/*.JPEG: crops of scikit-learn's two sample photos at
    ImageNet's mix of sizes and qualities, CLASSES classes, written in parallel."""
    for name in PHOTOS:
        _PHOTO_CACHE[name] = load_photo(name)
    jobs = []
    for split, n, seed in (("train", train_images, 0), ("val", val_images, 1)):
        for i in range(n):
            folder = root / split / f"n{i % CLASSES + 1:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((str(folder / f"{split}_{i:05d}.JPEG"), i, seed))
    if workers > 1 and len(jobs) > 64 and os.name == "posix":
        with mp.get_context("fork").Pool(workers) as pool:
            pool.map(_write_one, jobs, chunksize=32)
    else:
        for job in jobs:
            _write_one(job)
    return len(jobs)


def summary(result: dict) -> dict:
    """The headline numbers, one level deep, for the table and a quick look."""
    sec = result["sections"]
    out: dict = {}

    def rows(name):
        return sec.get(name, {}).get("rows", [])

    for r in rows("lrn"):
        if r.get("vs_pool_alone"):
            out[f"lrn {r['stage']} {r['precision']} {r['contender']} vs pool alone"] = r["vs_pool_alone"]
    for r in rows("convs"):
        if "grouped_vs_dense" in r and r["benchmark_limit"] != 0:
            out[f"convs {r['layer']} {r['precision']} {r['layout']} grouped/dense fwd,dgrad,wgrad"] = \
                ",".join(f"{v:.2f}" for v in r["grouped_vs_dense"].values())
    for r in rows("syncs"):
        out[f"syncs {r['name']} host syncs in steps"] = r.get("host_syncs_in_steps", r.get("skipped"))
    if sec.get("digits", {}).get("verdict"):
        for crops, v in sec["digits"]["verdict"].items():
            out[f"digits {crops} bf16 vs fp32 error"] = f"{v['bf16']:.4f} vs {v['fp32']:.4f} (same: {v['same']})"
    for r in rows("model") + rows("compile"):
        key = f"model {r['model']} {r['layout']} {r['precision']}{' compiled' if r.get('compile') else ''}"
        out[key] = r.get("images_per_s", r.get("skipped") or r.get("error"))
    two = sec.get("two_device", {})
    if "compare" in two:
        out["two_device ok"] = two["compare"]["ok"]
        out["two_device images/s"] = two.get("two_device", {}).get("images_per_s")
        out["one_device images/s"] = two.get("one_device", {}).get("images_per_s")
    for r in rows("loader"):
        out[f"loader {r['name']}"] = r.get("images_per_s", r.get("skipped") or r.get("error"))
    for r in rows("handoff"):
        out[f"handoff {r['name']} us/image"] = r["us_per_image"]
    for r in rows("gpu_decode"):
        out[f"gpu_decode {r['name']}"] = r.get("images_per_s", r.get("skipped") or r.get("error"))
        if "taken_ms" in r:
            out[f"gpu_decode {r['name']} ms taken from a step"] = r["taken_ms"]
    for r in rows("trainer"):
        out[f"trainer {r['name']}"] = r.get("images_per_s_wall", r.get("skipped") or r.get("error"))
        if "data_wait_fraction" in r:
            out[f"trainer {r['name']} data wait"] = r["data_wait_fraction"]
    for r in rows("resume"):
        out[f"resume {r['mode']} exact"] = r.get("exact", r.get("skipped") or r.get("error"))
    for r in rows("eval"):
        out[f"eval {r['name']}"] = r.get("eval_images_per_s", r.get("skipped") or r.get("error"))
    for name, s in sec.items():
        if "error" in s:
            out[f"{name} error"] = s["error"]
    return out


def print_table(result: dict) -> None:
    print(f"gpu_check on {result['device']} ({result['sections'].get('machine', {}).get('gpu') or 'no GPU'}), "
          f"sizes {result['sizes']['name']}, {result['elapsed_s']} s")
    for key, value in result.get("summary", {}).items():
        if isinstance(value, float):
            value = f"{value:,.4g}" if value < 1 else f"{value:,.1f}"
        print(f"  {key:<52} {value}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json")
    parser.add_argument("--device", default="auto", help="auto (cuda:0 where CUDA is), cuda, cuda:N or cpu")
    parser.add_argument("--sizes", choices=["full", "tiny"], default=None,
                        help="full (batch 128, thousands of images) on CUDA, tiny (the smoke) on the CPU")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="wall-clock budget from start; sections past it are skipped, saying so")
    parser.add_argument("--compile-needs-s", type=float, default=None,
                        help="seconds left needed to start one more compilation (default 60 on CUDA, 5 on CPU)")
    parser.add_argument("--cpu-workers", type=int, default=None, help="processes for the corpus and builds")
    parser.add_argument("--work-dir", default=None, help="where the corpus and shards go (default: tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    lists = {"sections": (SECTIONS, None, "comma-separated subset (default: all; machine always runs)"),
             "models": (MODELS, ",".join(MODELS), "the model section's contenders"),
             "precisions": (PRECISIONS, ",".join(PRECISIONS), "the model section's precisions"),
             "trainer_runs": (tuple(TRAINER_RUNS), None, "the trainer section's runs (default: all)")}
    for name, (allowed, default, what) in lists.items():
        parser.add_argument(f"--{name.replace('_', '-')}", default=default, help=f"{what}, of {','.join(allowed)}")
    for name, cap in (("data", 60), ("lrn", 40), ("convs", 60), ("model", 60), ("syncs", 60), ("two-device", 40),
                      ("loader", 45), ("handoff", 40), ("gpu-decode", 90),
                      ("trainer", 75), ("resume", 90), ("eval", 30), ("digits", 90)):
        parser.add_argument(f"--cap-{name}", type=float, default=cap, help=f"section cap, s (default {cap})")
    args = parser.parse_args(argv)
    for name, (allowed, _, _) in lists.items():  # "a,b" -> ["a", "b"], each one of `allowed`
        text = getattr(args, name)
        if text is not None:
            chosen = [x.strip() for x in text.split(",") if x.strip()]
            if set(chosen) - set(allowed):
                parser.error(f"--{name.replace('_', '-')}: unknown {', '.join(sorted(set(chosen) - set(allowed)))}; "
                             f"choose from {', '.join(allowed)}")
            setattr(args, name, chosen)
    if args.device in ("auto", "cuda"):
        args.device = "cuda:0" if args.device == "cuda" or torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available (torch {torch.__version__}, "
                     f"CUDA build {torch.version.cuda})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.sizes = args.sizes or ("full" if gpu else "tiny")
    if args.compile_needs_s is None:
        args.compile_needs_s = 60.0 if gpu else 5.0
    if args.cpu_workers is None:
        args.cpu_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if gpu:
        torch.cuda.set_device(torch.device(args.device))
        torch.backends.cudnn.benchmark = True  # as the trainer sets it (model/train.py configure_cuda)
    check = Check(args)
    try:
        result = check.run()
    finally:
        if not args.keep:
            check.close()
        else:
            print(f"kept {check.work}", file=sys.stderr)
    print_table(result)
    print(f"wrote {check.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
