"""The paper's training recipe (section 5): `train` sets a run up, `train_one_epoch` runs the
steps of one epoch, `end_of_epoch` validates, logs and checkpoints.

    from alexprep.model.train import TrainConfig, train
    train("OUT", "runs/alexnet", TrainConfig())            # the paper's recipe
    train("OUT", "runs/alexnet", TrainConfig(), resume=True)

Defaults, the run dir and what a checkpoint holds: docs/design.md, "Training". A resumed
run continues where the newest checkpoint stopped, mid-epoch included: the loaders' draws
are keyed by (seed, epoch, sample), and each rank's dropout RNG state travels in the
checkpoint. Bit-exact on the CPU; on CUDA only with `TrainConfig(deterministic=True)`.
Under `torchrun`, each process owns one tower pair, the loaders give each rank its part of
every global batch, DDP averages gradients, and the ranks agree every step on whether to
stop (distributed.any_rank).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from alexprep.imagenet_prep import augment
from alexprep.imagenet_prep.atomic import remove_leftovers, write_text_atomic
from alexprep.imagenet_prep.devices import device_name
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.fingerprint import build_identity, epoch_fingerprint
from alexprep.imagenet_prep.loaders import Loader, eval_loader, train_loader
from alexprep.imagenet_prep.remote import display, is_uri
from alexprep.imagenet_prep.run_plan import RunPlan
from alexprep.imagenet_prep.verify import verify_build
from alexprep.model.alexnet import AlexNet
from alexprep.model.checkpoint import (
    FORMAT, list_checkpoints, load_checkpoint, require_same_classes, save_checkpoint, stats_to_tensors,
)
from alexprep.model.config import TrainConfig, non_default_fields, rank_batch_size, resumed_config
from alexprep.model.distributed import (
    Ranks, all_reduce, any_rank, gather_objects, init_distributed, resolve_devices, use_devices,
)
from alexprep.model.evaluate import EvalResult, autocast, error_table, evaluate
from alexprep.model.metrics import MetricsLog, plot_curves
from alexprep.model.optim import LrSchedule, PaperSGD, param_groups

# torch.compile's backend for `TrainConfig.compile`: inductor generates fused kernels
# (Triton on GPUs, C++ on the CPU); the tests set "eager" (tracing only) to stay fast.
COMPILE_BACKEND = "inductor"
_DOMAIN_DROPOUT = 0x64726F70  # "drop": the counter-based generator's domain for dropout seeds


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------- run state
@dataclass
class EpochSums:
    """The epoch in progress, summed so far; saved with a mid-epoch checkpoint so that a
    resumed epoch's metrics are those of the uninterrupted one."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0  # on this rank
    steps: int = 0
    wait: float = 0.0  # seconds waiting for the loader
    busy: float = 0.0  # seconds in the step itself

    @property
    def wall(self) -> float:
        return self.wait + self.busy


@dataclass
class RunState:
    """Where a run stands: the position in the epoch stream and the epoch's sums."""

    epoch: int = 0  # the epoch in progress ...
    batch: int = 0  # ... and its next batch (0 at an epoch boundary)
    step: int = 0
    sums: EpochSums = field(default_factory=EpochSums)
    last_eval: dict = field(default_factory=dict)
    decode_failures: int = 0  # images that did not decode, over the whole run


@dataclass
class Run:
    """What a training run holds for its whole length."""

    root: Path | str  # a build folder, or the URI of a remote one
    run_dir: Path
    config: TrainConfig
    ranks: Ranks
    devices: tuple[torch.device, ...]
    model: torch.nn.Module  # DDP-wrapped under torchrun
    optimizer: PaperSGD
    schedule: LrSchedule
    train_loader: Loader
    val_loader: Loader
    metrics: MetricsLog
    log: object = print
    progress: bool = True
    tensorboard: object = None
    forward: object = None  # what a training step calls: `model`, or its torch.compile'd self

    def __post_init__(self):
        if self.forward is None:
            self.forward = self.model

    @property
    def module(self) -> AlexNet:
        return self.model.module if hasattr(self.model, "module") else self.model

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


# ---------------------------------------------------------------------------- set-up
def make_loaders(root, config: TrainConfig, ranks: Ranks, device: torch.device,
                 cache_dir=None, cache_limit: int | None = None) -> tuple[Loader, Loader]:
    batch = rank_batch_size(config.batch_size, ranks.world_size, train=True)
    common = loader_options(config, ranks, device, cache_dir, cache_limit)
    train = train_loader(root, batch_size=batch, seed=config.seed,
                         lighting_std=config.lighting_std, order=config.order, **common)
    try:
        val = make_eval_loader(root, config, common, train.stats, crops=1)
    except BaseException:
        train.close()
        raise
    return train, val


def loader_options(config: TrainConfig, ranks: Ranks, device: torch.device, cache_dir=None,
                   cache_limit: int | None = None) -> dict:
    """What the run's train, validation and 10-crop loaders share (a remote build's cache
    and its limit included: they are the node's, not the run's, so not in TrainConfig)."""
    return dict(device=device_name(device), rank=ranks.rank, world_size=ranks.world_size, normalize=config.normalize,
                backend=config.backend, workers=config.loader_workers or None, decoder=config.decoder,
                cache_dir=cache_dir, cache_limit=cache_limit)


def make_eval_loader(root, config: TrainConfig, common: dict, stats, crops: int) -> Loader:
    batch = rank_batch_size(config.eval_batch_size or config.batch_size, common["world_size"], crops)
    return eval_loader(root, batch_size=batch, stats=stats, crops=crops, **common)


def configure_cuda(precision: str, devices, benchmark: bool = True) -> None:
    """fp32 means fp32: cuDNN convolutions and matmuls default to TF32 on Ampere and later,
    which `--precision tf32` asks for by name. cuDNN picks its fastest algorithms for the
    fixed input shapes (benchmark mode), unless the run is deterministic."""
    if not any(d.type == "cuda" for d in devices):
        return
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = benchmark


DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")  # the workspaces CUDA's docs name for reproducible cuBLAS


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """`--deterministic` for the run's length, then the process's settings back: deterministic
    kernels (an op that has none raises), cuBLAS's fixed workspace, and cuDNN's deterministic
    algorithms without its benchmark search (a new process may find other ones). cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG when it starts: set here if CUDA has not started, else required."""
    if not enabled:
        yield
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_CUBLAS:
        if torch.cuda.is_initialized():
            raise DataError("deterministic training needs CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts, and "
                            "this process has started CUDA: export CUBLAS_WORKSPACE_CONFIG=:4096:8 before Python "
                            "starts, or train before any other CUDA work")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS[0]
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.benchmark, cudnn.deterministic)
    torch.use_deterministic_algorithms(True)
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.benchmark, cudnn.deterministic = before[2:]


def dropout_seed(seed: int, rank: int) -> int:
    """Each rank's dropout RNG seed: distinct per rank (the same seed would give the i-th
    sample of every rank the same mask), a pure function of (seed, rank)."""
    return int(augment.counter_words(seed, 0, [rank], 1, _DOMAIN_DROPOUT)[0, 0] >> 1)


def verify_shards(root, log) -> None:
    if is_uri(root):  # the cache checks each shard's SHA-256 as it arrives (docs/design.md)
        log(f"{display(root)} is remote: each shard is checked against its manifest's SHA-256 as it is downloaded")
        return
    log(f"checking every shard of {root} against its manifest's SHA-256 ...")
    report = verify_build(root)
    if not report.ok:
        raise DataError(f"{len(report.bad)} shard(s) differ from their manifests: {'; '.join(report.bad[:3])}. "
                        f"Rebuild them (the same build-shards command) or copy them again")
    log(f"{report.shards} shards, {report.rows} images: all match their manifests")


# ---------------------------------------------------------------------------- checkpoints
def rng_state(devices) -> dict:
    """This process's dropout RNG: the CPU generator and the model's GPUs' (in tower
    order, so that a resume on other GPU indices restores them in place)."""
    state = {"torch": torch.get_rng_state()}
    cuda = [d for d in dict.fromkeys(devices) if d.type == "cuda"]
    if cuda:
        state["cuda"] = [torch.cuda.get_rng_state(d) for d in cuda]
    return state


def restore_rng(states: list[dict], run: Run, state: RunState) -> None:
    """Restore this rank's RNG state; at another world size, reseed from (seed, rank, step)."""
    ranks = run.ranks
    if len(states) != ranks.world_size:
        torch.manual_seed(dropout_seed(run.config.seed ^ state.step, ranks.rank))
        run.log(f"resumed on {ranks.world_size} rank(s) from a run of {len(states)}: dropout masks reseeded")
        return
    mine = states[ranks.rank]
    torch.set_rng_state(mine["torch"])
    cuda = [d for d in dict.fromkeys(run.devices) if d.type == "cuda"]
    for device, saved in zip(cuda, mine.get("cuda", [])):
        torch.cuda.set_rng_state(saved, device)


def save_run_checkpoint(run: Run, state: RunState) -> Path | None:
    """The whole state of a run as one dict, written by rank 0 (every rank sends its RNG)."""
    rngs = gather_objects(rng_state(run.devices))
    if not run.ranks.main:
        return None
    index = run.train_loader.index
    ckpt = {
        "format": FORMAT,
        "version": 2,
        "model": run.module.state_dict(),
        "model_config": asdict(run.module.config),
        "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(),
        "epoch": state.epoch,
        "batch": state.batch,
        "step": state.step,
        "running": asdict(state.sums),
        "last_eval": state.last_eval,
        "decode_failures": state.decode_failures,
        "rng": rngs,  # one per rank
        "config": run.config.to_json(),
        "classes": {"wnids": list(index.classes.wnids), "names": list(index.classes.names)},
        "stats": stats_to_tensors(run.train_loader.stats),
        "build_id": index.build_id,
        "image": asdict(index.spec),  # how the build made its 256x256 images, for predict on files
    }
    return save_checkpoint(run.ckpt_dir, ckpt, run.config.keep_last)


def resume_from(ckpt: dict, run: Run) -> RunState:
    run.module.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.schedule.load_state_dict(ckpt["schedule"])
    state = RunState(ckpt["epoch"], ckpt["batch"], ckpt["step"], EpochSums(**ckpt["running"]),
                     dict(ckpt["last_eval"]), int(ckpt.get("decode_failures", 0)))
    rng = ckpt["rng"]
    restore_rng(rng if isinstance(rng, list) else [rng], run, state)  # version 1 kept one state
    saved, now = TrainConfig.from_json(ckpt["config"]).to_json(), run.config.to_json()
    changed = {name: [saved[name], value] for name, value in now.items() if saved.get(name) != value}
    run.metrics.write("resume", epoch=state.epoch, step=state.step, changed=changed)  # the run's config history
    if changed and run.ranks.main:
        run.log("resumed with " + ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in changed.items()))
    return state


class StopSignal:
    """SIGTERM / SIGINT set a flag: the ranks agree to checkpoint at the next step and stop."""

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
def train(root, run_dir, config: TrainConfig = TrainConfig(), *, resume: bool = False, given=None,
          progress: bool = True, log=print, cache_dir=None, cache_limit: int | None = None) -> dict:
    """Train AlexNet on build folder `root`, writing to `run_dir`; returns the final results
    (or the state at a stop: {"stopped": reason, "step": …}). `root` may be a URI, read
    through the node-local `cache_dir`, each split keeping at most `cache_limit` bytes there
    (docs/design.md, "Remote build folders"). With `resume`, the run continues with its
    saved config; the fields named in `given` (by default those of `config` that are not
    TrainConfig's defaults) are compared with it (config.resumed_config)."""
    root, run_dir = (root if is_uri(root) else Path(root).expanduser()), Path(run_dir).expanduser()
    ckpt = None
    if resume:
        if not list_checkpoints(run_dir / "checkpoints"):
            raise DataError(f"--resume: {run_dir} holds no checkpoint to resume from")
        ckpt = load_checkpoint(run_dir)
        given = non_default_fields(config) if given is None else given
        config = resumed_config(TrainConfig.from_json(ckpt["config"]), config, given)
        # A checkpoint half-written when the last run was killed (a whole one's size, ~470 MB).
        remove_leftovers(run_dir / "checkpoints")
    elif (run_dir / "config.json").exists() or list_checkpoints(run_dir / "checkpoints"):
        raise DataError(f"{run_dir} holds another run: pass --resume to continue it, or choose a new --run-dir")
    with deterministic_mode(config.deterministic):
        return _run(root, run_dir, config, ckpt, progress, log, cache_dir, cache_limit)


def _run(root, run_dir: Path, config: TrainConfig, ckpt, progress, log, cache_dir, cache_limit) -> dict:
    """train() once its config is known: ranks, devices, loaders, then the epochs."""
    ranks = init_distributed(config.devices)
    devices = resolve_devices(config.devices, ranks)
    use_devices(devices)
    configure_cuda(config.precision, devices, benchmark=not config.deterministic)
    if config.verify_shards and ranks.main:
        verify_shards(root, log)
    train_data, val_data = make_loaders(root, config, ranks, devices[0], cache_dir, cache_limit)
    if train_data.cache is not None and ranks.main:
        log(f"{display(root)}: {train_data.cache.summary()}; the rest download in the background, in the order "
            "the batches need them")
    try:
        run = setup_run(root, run_dir, config, ckpt, ranks, devices, train_data, val_data, progress, log)
        state = resume_from(ckpt, run) if ckpt is not None else RunState()
        write_run_row(run, state)
        return run_epochs(run, state)
    finally:
        train_data.close()
        val_data.close()


def write_run_row(run: Run, state: RunState) -> None:
    """A metrics row at every start and resume: where it starts, on how many ranks, with which
    backend, from which build (a URI masked): what `alexprep replay` needs beyond config.json."""
    loader = run.train_loader
    run.metrics.write("run", epoch=state.epoch, batch=state.batch, world_size=run.ranks.world_size,
                      backend=loader.config.backend, build_id=loader.index.build_id,
                      build=display(run.root) if is_uri(run.root) else str(Path(run.root).resolve()))


def setup_run(root, run_dir, config, ckpt, ranks, devices, train_data, val_data, progress, log) -> Run:
    """The model (the same initial weights in every process and placement), its optimizer
    and schedule, the metrics log; each rank's dropout RNG seeded apart."""
    classes = train_data.index.classes
    if ckpt is not None:
        require_same_classes(ckpt, train_data.index)
    torch.manual_seed(config.seed)
    model = AlexNet(config.model_config(len(classes)), devices=devices)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(dropout_seed(config.seed, ranks.rank))
    optimizer = PaperSGD(param_groups(model, config.weight_decay, config.decay_biases, config.bias_lr_mult),
                         lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    schedule = LrSchedule(config.lr, config.lr_factor, config.patience, config.max_drops, tuple(config.milestones),
                          threshold=config.plateau_threshold)
    if ranks.distributed:
        from torch.nn.parallel import DistributedDataParallel

        one_gpu = len(devices) == 1 and devices[0].type == "cuda"
        model = DistributedDataParallel(model, device_ids=[devices[0]] if one_gpu else None)
    if ranks.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", json.dumps(config.to_json(), indent=1) + "\n")
    # Only the training step is compiled: checkpoints keep the module's own state_dict keys,
    # and evaluation (other batch sizes, dropout off) runs eager rather than compiling again.
    forward = model
    if config.compile:
        forward = torch.compile(model, backend=COMPILE_BACKEND)
        log("--compile: the first training step compiles the model (about 30 s on a 2-core CPU), then runs faster")
    return Run(root, run_dir, config, ranks, devices, model, optimizer, schedule, train_data, val_data,
               MetricsLog(run_dir / "metrics.jsonl", enabled=ranks.main), log, progress,
               _tensorboard(run_dir, config.tensorboard and ranks.main), forward)


def run_epochs(run: Run, state: RunState) -> dict:
    """Epochs until the config's last, a stop signal or max_steps; then the final evaluation."""
    config = run.config
    with StopSignal() as stop:
        while state.epoch < config.epochs:
            reason = train_one_epoch(run, state, stop)
            if reason and state.batch < len(run.train_loader):  # stopped mid-epoch, checkpointed
                return {"stopped": reason, "step": state.step}
            end_of_epoch(run, state)
            reason = reason or _stop_reason(run, state, stop)
            if reason and state.epoch < config.epochs:
                run.log(f"stopped after epoch {state.epoch} ({reason}); continue with --resume")
                return {"stopped": reason, "step": state.step}
    return final_evaluation(run, state)


def train_one_epoch(run: Run, state: RunState, stop: StopSignal) -> str | None:
    """The steps of epoch `state.epoch` from batch `state.batch`. Returns why it stopped
    early (a signal or max_steps, checkpointed), or None at the epoch's end.

    Loss and correct counts are summed on the device and read every `log_every` steps, so
    the host queues the next step without waiting for this one (one sync per step would
    idle the GPU while Python catches up). `wait` is the time spent in the loader's
    `next()`, with the device's work still queued: on the torch backend that includes
    launching the GPU decoding and rendering, which is data work. `busy` is the rest of
    the wall time, syncs and checkpoints included, so that wait + busy is the epoch's.
    """
    config, loader, sums = run.config, run.train_loader, state.sums
    run.schedule.apply(run.optimizer)
    run.model.train()
    loader.set_epoch(state.epoch, start_batch=state.batch)
    with torch.random.fork_rng(devices=[]):  # the loaders must not consume the dropout RNG
        batches = iter(loader)
    bar = _bar(run.progress and run.ranks.main, len(loader), state.batch, f"epoch {state.epoch + 1}/{config.epochs}")
    pending = DeviceSums()
    last_checkpoint = time.monotonic()
    clock = time.perf_counter()  # when the last step ended: waiting for data starts here
    window = [clock, 0, 0.0]  # since the last step row: its start, images, seconds waited
    try:
        for images, labels in batches:
            t_data = time.perf_counter()
            sums.wait += t_data - clock
            window[1], window[2] = window[1] + len(labels), window[2] + t_data - clock
            with sync_check(run.devices):
                loss, correct = train_step(run, images, labels)
                pending.add(loss, correct)
            state.step, state.batch = state.step + 1, state.batch + 1
            sums.seen, sums.steps = sums.seen + len(labels), sums.steps + 1
            if bar:
                bar.update(1)
            if state.step % config.log_every == 0:
                loss_mean = _collect(run, state, pending, since=config.log_every)  # waits for the device
                _log_step(run, state, loss_mean, window)
                window = [time.perf_counter(), 0, 0.0]
                if bar:
                    bar.set_postfix(loss=f"{loss_mean:.3f}", lr=f"{run.schedule.lr:g}")
            due = time.monotonic() - last_checkpoint > 60 * config.checkpoint_minutes
            reason, due = _agree(run, state, stop, due)
            if reason or due:  # agreed: every rank checkpoints (and stops) at this step
                if _checkpoint_at_step(run, state, pending, reason):
                    return reason
                last_checkpoint = time.monotonic()
            # Busy time ends here, not at the step's return: on a GPU the step only queues
            # work, and the syncs above (every log_every steps) are where it is paid for.
            end = time.perf_counter()
            sums.busy += end - t_data
            clock = end
        _collect(run, state, pending)
        return None
    finally:
        if bar:
            bar.close()


def _checkpoint_at_step(run: Run, state: RunState, pending: "DeviceSums", reason: str | None) -> bool:
    """Checkpoint mid-epoch; returns whether the epoch stops here (a stop, or its last
    batch: the epoch's end checkpoints after validation)."""
    _collect(run, state, pending)
    if state.batch == len(run.train_loader):
        return True
    path = save_run_checkpoint(run, state)
    if reason:
        run.log(f"stopped at step {state.step} ({reason}); checkpoint {path}; continue with --resume")
    return reason is not None


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step; returns the loss and the number of correct top-1 guesses, on the device."""
    if run.config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(run.devices[0], run.config.precision):
        logits = run.forward(images)
    labels = labels.to(logits.device, non_blocking=True)
    loss = F.cross_entropy(logits.float(), labels)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return loss, (logits.detach().argmax(1) == labels).sum()


# `ALEXPREP_SYNC_DEBUG=warn` (or `error`): every training step runs under
# torch.cuda.set_sync_debug_mode, so that an operation that makes the host wait for the GPU
# inside a step warns (or raises, naming it). The reads every log_every steps are outside.
SYNC_DEBUG_ENV = "ALEXPREP_SYNC_DEBUG"


@contextlib.contextmanager
def sync_check(devices):
    """Around one training step: torch's sync debug mode as SYNC_DEBUG_ENV asks, on CUDA."""
    mode = os.environ.get(SYNC_DEBUG_ENV, "")
    if mode not in ("warn", "error") or not any(d.type == "cuda" for d in devices):
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


class DeviceSums:
    """Loss and correct counts summed where the loss is, read only when asked (a read is
    a host sync)."""

    def __init__(self):
        self.sums: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, correct: torch.Tensor) -> None:
        step = torch.stack([loss.detach().double(), correct.double()])
        self.sums = step if self.sums is None else self.sums + step

    def take(self) -> tuple[float, float]:
        if self.sums is None:
            return 0.0, 0.0
        loss_sum, correct = self.sums.tolist()
        self.sums = None
        return loss_sum, correct


def _collect(run: Run, state: RunState, pending: DeviceSums, since: int | None = None) -> float:
    """Move the device sums into the epoch's (one host sync); stop every rank if any saw a
    NaN or infinite loss. Returns the mean loss of the last `since` steps."""
    loss_sum, correct = pending.take()
    state.sums.loss_sum += loss_sum
    state.sums.correct += int(correct)
    if any_rank(not math.isfinite(loss_sum)):
        raise TrainingDiverged(_diverged_message(state.step, run.ckpt_dir))
    return loss_sum / max(since or 1, 1)


def _agree(run: Run, state: RunState, stop: StopSignal, due: bool) -> tuple[str | None, bool]:
    """(why to stop, whether to checkpoint), the same on every rank: max_steps is the same
    step everywhere; a signal or a checkpoint time on any rank counts for all, in one
    small all-reduce per step (ranks that saw a signal a step apart would otherwise leave
    the others blocked in DDP's next all-reduce, and a late rank 0 would never save)."""
    signal_seen, due = all_reduce([stop.received is not None, due], op="max")
    if run.config.max_steps and state.step >= run.config.max_steps:
        return f"max_steps={run.config.max_steps}", bool(due)
    if signal_seen:
        return stop.received or "a signal received by another rank", bool(due)
    return None, bool(due)


def _stop_reason(run: Run, state: RunState, stop: StopSignal) -> str | None:
    return _agree(run, state, stop, False)[0]


def _log_step(run: Run, state: RunState, loss: float, window: list) -> None:
    """A metrics row for the steps since the last one (window: their start, images and
    seconds spent waiting for data)."""
    seconds = max(time.perf_counter() - window[0], 1e-9)
    run.metrics.write("step", epoch=state.epoch, step=state.step, loss=loss, lr=run.schedule.lr,
                      images_per_s=window[1] * run.ranks.world_size / seconds, data_wait_s=window[2],
                      compute_s=seconds - window[2], data_wait_fraction=window[2] / seconds,
                      epoch_data_wait_fraction=state.sums.wait / max(state.sums.wall, 1e-9))
    if run.tensorboard:
        run.tensorboard.add_scalar("train/loss", loss, state.step)


def end_of_epoch(run: Run, state: RunState) -> None:
    """Validate, maybe divide the lr, log the epoch, checkpoint at the next epoch's start."""
    config, sums = run.config, state.sums
    with torch.random.fork_rng(devices=[]):
        val = evaluate(run.model, run.val_loader, config.precision)
    dropped = run.schedule.end_of_epoch(state.epoch, val.top1_error)
    failures = run.train_loader.decode_failure_count - state.decode_failures
    state.decode_failures = run.train_loader.decode_failure_count
    state.last_eval = val.to_json()
    # What this epoch fed, all ranks together (fingerprint.py): rank 0 alone writes metrics.
    fingerprint = epoch_fingerprint(RunPlan.of_loader(run.train_loader), *build_identity(run.train_loader.index),
                                    state.epoch) if run.ranks.main else None
    run.metrics.write("epoch", epoch=state.epoch, fingerprint=fingerprint, step=state.step,
                      lr=run.schedule.lr if not dropped else run.schedule.lr / config.lr_factor,
                      train_loss=sums.loss_sum / max(sums.steps, 1),
                      train_top1_error=1 - sums.correct / max(sums.seen, 1),
                      val_top1_error=val.top1_error, val_top5_error=val.top5_error,
                      images_per_s=sums.seen * run.ranks.world_size / max(sums.wall, 1e-9),
                      data_wait_fraction=sums.wait / max(sums.wall, 1e-9), lr_dropped=dropped,
                      decode_failures=failures)
    if run.tensorboard:
        run.tensorboard.add_scalar("val/top1_error", val.top1_error, state.epoch)
        run.tensorboard.add_scalar("val/top5_error", val.top5_error, state.epoch)
    run.log(f"epoch {state.epoch + 1}: loss {sums.loss_sum / max(sums.steps, 1):.4f}, "
            f"val top-1 {100 * val.top1_error:.1f}%, top-5 {100 * val.top5_error:.1f}%"
            + (f"; lr divided by {1 / config.lr_factor:g} to {run.schedule.lr:g}" if dropped else ""))
    if failures:
        run.log(f"warning: {failures} training image(s) did not decode this epoch and were fed as grey: "
                + "; ".join(run.train_loader.decode_failures[:3]) + f". Run {_verify_hint(run.root)}")
    state.epoch, state.batch, state.sums = state.epoch + 1, 0, EpochSums()
    save_run_checkpoint(run, state)
    if run.ranks.main:
        plot_curves(run.metrics, run.run_dir / "curves.png")


def final_evaluation(run: Run, state: RunState) -> dict:
    """The last validation, and the paper's 10-crop evaluation when asked; final.json."""
    config = run.config
    results = [EvalResult(**state.last_eval)] if state.last_eval else []
    if config.final_crops == 10:
        val = run.val_loader.config
        common = loader_options(config, run.ranks, run.devices[0], val.cache_dir, val.cache_limit)
        ten = make_eval_loader(run.root, config, common, run.val_loader.stats, crops=10)
        try:
            results.append(evaluate(run.model, ten, config.precision))
        finally:
            ten.close()
    fingerprints = {r["epoch"]: r["fingerprint"] for r in run.metrics.rows("epoch") if r.get("fingerprint")}
    final = {"step": state.step, "epochs": state.epoch, "results": [r.to_json() for r in results],
             "decode_failures": state.decode_failures,
             "fingerprints": [fingerprints.get(e) for e in range(state.epoch)]}
    if run.ranks.main:
        run.metrics.write("final", **final)
        write_text_atomic(run.run_dir / "final.json", json.dumps(final, indent=1) + "\n")
        run.log(error_table(results))
        if state.decode_failures:
            run.log(f"warning: {state.decode_failures} training image(s) did not decode during this run "
                    f"(metrics.jsonl has them per epoch)")
    return final


def _verify_hint(root) -> str:
    """The verify command for `root`: a URI's options and secrets are masked when shown, so
    it is named as the URI given to train."""
    if is_uri(root):
        return f"`alexprep verify URI` with the URI given to train ({display(root)})"
    return f"`alexprep verify {root}`"


def _diverged_message(step: int, ckpt_dir: Path) -> str:
    found = list_checkpoints(ckpt_dir)
    kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
    return (f"the loss became NaN or infinite by step {step}; {kept}. Lower --lr, or try --bias-init caffe")


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
