"""The paper's training recipe (section 5) as plain functions around one loop.

    from alexprep.model.train import TrainConfig, train
    train("OUT", "runs/alexnet", TrainConfig())            # the paper's recipe
    train("OUT", "runs/alexnet", TrainConfig(), resume=True)

Defaults are the paper's: batch 128, the paper's momentum rule (optim.PaperSGD) with
momentum 0.9 and weight decay 5e-4 on weights, lr 0.01 divided by 10 when the validation
error stops improving (at most 3 times), 90 epochs, biases 1 in conv2/4/5 and fc6/7.

A run dir holds config.json, metrics.jsonl, curves.png, checkpoints/ and final.json.
Checkpoints are written every epoch, every `checkpoint_minutes`, on SIGTERM/SIGINT and at
`max_steps`; `resume=True` continues exactly where the newest one stopped, mid-epoch
included (the loaders' draws are keyed by (seed, epoch, sample), and the dropout RNG
state travels in the checkpoint).

Under `torchrun`, each process owns one tower pair, the loaders give each rank its part of
every global batch, and DDP averages gradients (NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from alexprep.imagenet_prep.atomic import write_text_atomic
from alexprep.imagenet_prep.errors import DataError
from alexprep.model.alexnet import AlexNet
from alexprep.model.config import TrainConfig
from alexprep.model.checkpoint import (
    FORMAT, list_checkpoints, load_checkpoint, save_checkpoint, stats_to_tensors,
)
from alexprep.model.evaluate import EvalResult, autocast, error_table, evaluate
from alexprep.model.metrics import MetricsLog, plot_curves
from alexprep.model.optim import LrSchedule, PaperSGD, param_groups


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------- set-up
@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(devices: tuple[str, ...]) -> Ranks:
    """torch.distributed from torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if any(str(d).startswith("cuda") or d == "auto" for d in devices) and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve_devices(devices: tuple[str, ...], ranks: Ranks) -> tuple[torch.device, ...]:
    """The tower devices of this process; "auto": two GPUs per process where there are
    enough, one GPU otherwise, else the CPU."""
    if tuple(devices) == ("auto",):
        n = torch.cuda.device_count()
        if n >= 2 * ranks.local_world_size:
            return (torch.device(f"cuda:{2 * ranks.local_rank}"), torch.device(f"cuda:{2 * ranks.local_rank + 1}"))
        if n >= 1:
            return (torch.device(f"cuda:{ranks.local_rank % n}"),)
        return (torch.device("cpu"),)
    out = []
    for d in devices:
        try:
            device = torch.device(d)
        except (RuntimeError, TypeError):
            raise DataError(f"unknown device {d!r}: use cpu, cuda:N or auto") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DataError(f"device {d}: CUDA is not available on this machine (use --device cpu)")
            if (device.index or 0) >= torch.cuda.device_count():
                raise DataError(f"device {d}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        elif device.type != "cpu":
            raise DataError(f"unsupported device {d!r}: use cpu or cuda:N")
        out.append(device)
    return tuple(out)


def pick_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    try:
        import nvidia.dali  # noqa: F401

        return "dali"
    except ImportError:
        return "torch"


def _loader_device(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"


def make_loaders(root, config: TrainConfig, ranks: Ranks, device: torch.device):
    from alexprep.imagenet_prep.loaders import eval_loader, train_loader

    if config.batch_size % ranks.world_size:
        raise DataError(f"batch size {config.batch_size} is not divisible by the {ranks.world_size} ranks")
    backend = pick_backend(config.backend)
    extra = {"workers": config.loader_workers} if config.loader_workers else {}
    train = train_loader(root, batch_size=config.batch_size // ranks.world_size, device=_loader_device(device),
                         seed=config.seed, rank=ranks.rank, world_size=ranks.world_size,
                         lighting_std=config.lighting_std, normalize=config.normalize, order=config.order,
                         backend=backend, **extra)
    eval_batch = config.eval_batch_size or config.batch_size
    val = eval_loader(root, batch_size=eval_batch, device=_loader_device(device), stats=train.stats, crops=1,
                      rank=ranks.rank, world_size=ranks.world_size, normalize=config.normalize, backend=backend, **extra)
    return train, val


# ---------------------------------------------------------------------------- checkpoints
def run_checkpoint(model, optimizer, schedule, config, train_loader, epoch, batch, step, running, last_eval) -> dict:
    """The whole state of a run as one dict of tensors and plain values."""
    module = model.module if hasattr(model, "module") else model
    index = train_loader.index
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "format": FORMAT,
        "version": 1,
        "model": module.state_dict(),
        "model_config": asdict(module.config),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "epoch": epoch,  # the epoch in progress ...
        "batch": batch,  # ... and its next batch (0 at an epoch boundary)
        "step": step,
        "running": running,  # this epoch's sums so far, so that a resumed epoch's metrics are exact
        "last_eval": last_eval,
        "rng": rng,
        "config": config.to_json(),
        "classes": {"wnids": list(index.classes.wnids), "names": list(index.classes.names)},
        "stats": stats_to_tensors(train_loader.stats),
        "build_id": index.build_id,
        "image": asdict(index.spec),  # how the build made its 256x256 images, for predict on files
    }


class _StopSignal:
    """SIGTERM / SIGINT set a flag: the loop checkpoints at the next step and stops."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------- the loop
def train(root, run_dir, config: TrainConfig = TrainConfig(), *, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    """Train AlexNet on build folder `root`, writing to `run_dir`; returns the final results
    (or the state at a stop: {"stopped": reason, "step": …})."""
    root, run_dir = Path(root), Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    ckpt = None
    if resume:
        if not list_checkpoints(ckpt_dir):
            raise DataError(f"--resume: {run_dir} holds no checkpoint to resume from")
        ckpt = load_checkpoint(run_dir)
        config = dataclasses.replace(TrainConfig.from_json(ckpt["config"]), max_steps=config.max_steps)
    elif (run_dir / "config.json").exists() or list_checkpoints(ckpt_dir):
        raise DataError(f"{run_dir} holds another run: pass --resume to continue it, or choose a new --run-dir")

    ranks = init_distributed(config.devices)
    devices = resolve_devices(config.devices, ranks)
    train_loader, val_loader = make_loaders(root, config, ranks, devices[0])
    try:
        return _train(root, run_dir, config, ckpt, ranks, devices, train_loader, val_loader, progress, log)
    finally:
        train_loader.close()
        val_loader.close()


def _train(root, run_dir, config, ckpt, ranks, devices, train_loader, val_loader, progress, log) -> dict:
    ckpt_dir = run_dir / "checkpoints"
    classes = train_loader.index.classes
    if ckpt is not None and list(classes.wnids) != list(ckpt["classes"]["wnids"]):
        raise DataError(f"{run_dir}'s checkpoint has {len(ckpt['classes']['wnids'])} classes, "
                        f"{root} has {len(classes)}: resume on the build it was trained on")

    torch.manual_seed(config.seed)  # the same initial weights in every process and placement
    model = AlexNet(config.model_config(len(classes)), devices=devices)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = PaperSGD(param_groups(model, config.weight_decay, config.decay_biases), lr=config.lr,
                         momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = LrSchedule(config.lr, config.lr_factor, config.patience, config.max_drops, tuple(config.milestones))
    epoch, batch, step = 0, 0, 0
    running = {"loss_sum": 0.0, "correct": 0, "seen": 0, "steps": 0, "wait": 0.0, "busy": 0.0}
    last_eval: dict = {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        epoch, batch, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        running, last_eval = dict(ckpt["running"]), dict(ckpt["last_eval"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    if ranks.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[devices[0]] if len(devices) == 1 and devices[0].type == "cuda" else None)

    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=ranks.main)
    if ranks.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", json.dumps(config.to_json(), indent=1) + "\n")
    tb = _tensorboard(run_dir, config.tensorboard and ranks.main)

    def checkpoint(at_epoch, at_batch) -> Path | None:
        if not math.isfinite(running["loss_sum"]):
            raise TrainingDiverged(_diverged_message(step, ckpt_dir))
        if not ranks.main:
            return None
        return save_checkpoint(ckpt_dir, run_checkpoint(model, optimizer, schedule, config, train_loader, at_epoch,
                                                        at_batch, step, running, last_eval), config.keep_last)

    device = devices[0]
    last_ckpt_time = time.monotonic()
    with _StopSignal() as stop:
        while epoch < config.epochs:
            schedule.apply(optimizer)
            model.train()
            train_loader.set_epoch(epoch, start_batch=batch)
            with torch.random.fork_rng(devices=[]):  # loaders must not consume the dropout RNG
                batches = iter(train_loader)
            bar = _bar(progress and ranks.main, len(train_loader), batch, f"epoch {epoch + 1}/{config.epochs}")
            t_ready = time.perf_counter()
            for images, labels in batches:
                t_data = time.perf_counter()
                if config.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast(device, config.precision):
                    logits = model(images)
                loss = F.cross_entropy(logits.float(), labels.to(logits.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step, batch = step + 1, batch + 1
                loss_value = float(loss.detach())  # one sync per step: the clock below needs it anyway
                running["loss_sum"] += loss_value
                running["correct"] += int((logits.detach().argmax(1) == labels.to(logits.device)).sum())
                running["seen"] += len(labels)
                running["steps"] += 1
                t_done = time.perf_counter()
                running["wait"] += t_data - t_ready
                running["busy"] += t_done - t_data
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(_diverged_message(step, ckpt_dir))
                if bar:
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{schedule.lr:g}")
                    bar.update(1)
                if step % config.log_every == 0:
                    metrics.write("step", epoch=epoch, step=step, loss=loss_value, lr=schedule.lr,
                                  images_per_s=len(labels) * ranks.world_size / max(t_done - t_ready, 1e-9),
                                  data_wait_s=t_data - t_ready, compute_s=t_done - t_data,
                                  data_wait_fraction=running["wait"] / max(running["wait"] + running["busy"], 1e-9))
                    if tb:
                        tb.add_scalar("train/loss", loss_value, step)
                t_ready = time.perf_counter()
                reason = None
                if config.max_steps and step >= config.max_steps:
                    reason = f"max_steps={config.max_steps}"
                elif stop.received:
                    reason = stop.received
                if reason or time.monotonic() - last_ckpt_time > 60 * config.checkpoint_minutes:
                    at_end = batch == len(train_loader)
                    path = checkpoint(epoch + 1 if at_end and reason else epoch, 0 if at_end and reason else batch) \
                        if not (at_end and reason) else None
                    last_ckpt_time = time.monotonic()
                    if reason and not at_end:
                        if bar:
                            bar.close()
                        log(f"stopped at step {step} ({reason}); checkpoint {path}; continue with --resume")
                        return {"stopped": reason, "step": step, "checkpoint": str(path)}
                    if reason:
                        break  # finish this epoch's validation and checkpoint first
            if bar:
                bar.close()
            with torch.random.fork_rng(devices=[]):
                val = evaluate(model, val_loader, config.precision)
            dropped = schedule.end_of_epoch(epoch, val.top1_error)
            wall = running["wait"] + running["busy"]
            last_eval = val.to_json()
            metrics.write("epoch", epoch=epoch, step=step, lr=schedule.lr if not dropped else schedule.lr / config.lr_factor,
                          train_loss=running["loss_sum"] / max(running["steps"], 1),
                          train_top1_error=1 - running["correct"] / max(running["seen"], 1),
                          val_top1_error=val.top1_error, val_top5_error=val.top5_error,
                          images_per_s=running["seen"] * ranks.world_size / max(wall, 1e-9),
                          data_wait_fraction=running["wait"] / max(wall, 1e-9), lr_dropped=dropped)
            if tb:
                tb.add_scalar("val/top1_error", val.top1_error, epoch)
                tb.add_scalar("val/top5_error", val.top5_error, epoch)
            log(f"epoch {epoch + 1}: loss {running['loss_sum'] / max(running['steps'], 1):.4f}, "
                f"val top-1 {100 * val.top1_error:.1f}%, top-5 {100 * val.top5_error:.1f}%"
                + (f"; lr divided by {1 / config.lr_factor:g} to {schedule.lr:g}" if dropped else ""))
            epoch, batch = epoch + 1, 0
            running = {"loss_sum": 0.0, "correct": 0, "seen": 0, "steps": 0, "wait": 0.0, "busy": 0.0}
            checkpoint(epoch, 0)
            last_ckpt_time = time.monotonic()
            if ranks.main:
                plot_curves(metrics, run_dir / "curves.png")
            reason = (f"max_steps={config.max_steps}" if config.max_steps and step >= config.max_steps
                      else stop.received)
            if reason and epoch < config.epochs:
                log(f"stopped after epoch {epoch} ({reason}); continue with --resume")
                return {"stopped": reason, "step": step}

    results = [EvalResult(**last_eval)] if last_eval else []
    if config.final_crops == 10:
        ten = eval_loader_like(val_loader, root, config, ranks, devices[0], crops=10)
        try:
            results.append(evaluate(model, ten, config.precision))
        finally:
            ten.close()
    final = {"step": step, "epochs": epoch, "results": [r.to_json() for r in results]}
    if ranks.main:
        metrics.write("final", **final)
        write_text_atomic(run_dir / "final.json", json.dumps(final, indent=1) + "\n")
        log(error_table(results))
    return final


def eval_loader_like(val_loader, root, config: TrainConfig, ranks: Ranks, device: torch.device, crops: int):
    from alexprep.imagenet_prep.loaders import eval_loader

    batch = config.eval_batch_size or max(1, config.batch_size // (10 if crops == 10 else 1))
    extra = {"workers": config.loader_workers} if config.loader_workers else {}
    return eval_loader(root, batch_size=batch, device=_loader_device(device), stats=val_loader.stats, crops=crops,
                       rank=ranks.rank, world_size=ranks.world_size, normalize=config.normalize,
                       backend=pick_backend(config.backend), **extra)


def _diverged_message(step: int, ckpt_dir: Path) -> str:
    found = list_checkpoints(ckpt_dir)
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
    return (f"the loss became NaN or infinite at step {step}; {kept}. Lower --lr, or try --bias-init caffe")


def _bar(enabled: bool, total: int, start: int, desc: str):
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="batch", dynamic_ncols=True, file=sys.stderr, leave=False)


def _tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DataError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(run_dir / "tensorboard"))
