"""`alexprep replay`: a training run's batch again, from its run folder (config.json and the
"run" rows of metrics.jsonl) and its build, without iterating to it (imagenet_prep/replay.py;
docs/design.md, "Replay, fingerprints, parity").

    out = replay_run("runs/alexnet", epoch=3, batch=17, rank=None, grid="grid.png")
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.fingerprint import plan_of_build
from alexprep.imagenet_prep.loaders import pick_backend
from alexprep.imagenet_prep.remote import is_uri
from alexprep.imagenet_prep.replay import FedTensors, batch_tensors, replay_batch, save_grid
from alexprep.imagenet_prep.run_plan import RunPlan
from alexprep.imagenet_prep.shards import SplitIndex
from alexprep.model.config import TrainConfig
from alexprep.model.metrics import MetricsLog


def run_record(run_dir: Path, epoch: int, batch: int) -> tuple[TrainConfig, dict]:
    """The run's config and the "run" row in force at (epoch, batch): the last start or
    resume at or before it (a resume may change the world size)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise DataError(f"{run_dir} is not a training run folder (no config.json)")
    config = TrainConfig.from_json(json.loads(path.read_text()))
    starts = [r for r in MetricsLog(Path(run_dir) / "metrics.jsonl").rows("run")
              if (r["epoch"], r["batch"]) <= (epoch, batch)]
    if not starts:
        raise DataError(f"{run_dir}/metrics.jsonl has no record of the run's start before epoch {epoch} batch "
                        f"{batch} (a run from an alexprep without replay, or one that never reached it)")
    return config, starts[-1]


@dataclass(frozen=True)
class RunBatch:
    """Where a run's batch comes from: the run's config, its start row, the build, the plan."""

    config: TrainConfig
    start: dict  # the "run" row in force (run_record)
    root: object  # the build folder or URI
    plan: RunPlan
    index: SplitIndex
    rank: int | None
    cache_dir: object = None

    @property
    def world_size(self) -> int:
        return int(self.start["world_size"])


def open_run(run_dir, epoch: int, batch: int, rank: int | None = None, build=None, cache_dir=None) -> RunBatch:
    """The run in `run_dir` at (epoch, batch), its build checked to be the one it trained on.
    `build`: the build folder, when not where the run read it (always for a URI: its
    secrets are never recorded)."""
    run_dir = Path(run_dir).expanduser()
    config, start = run_record(run_dir, epoch, batch)
    root = build if build is not None else start["build"]
    if build is None and (is_uri(root) or "***" in root):
        raise DataError(f"the run read a remote build ({root}): give it again with --build URI (and --cache-dir)")
    world_size = int(start["world_size"])
    if rank is not None and not 0 <= rank < world_size:
        raise DataError(f"--rank {rank}: that part of the run had {world_size} rank(s), 0..{world_size - 1}")
    plan, index = plan_of_build(root, batch_size=config.batch_size, seed=config.seed, order=config.order,
                                lighting_std=config.lighting_std, cache_dir=cache_dir)
    if index.build_id != start["build_id"]:
        raise DataError(f"{root} is build {index.build_id}; the run trained on build {start['build_id']}")
    plan.check_batch(epoch, batch)
    return RunBatch(config, start, root, plan, index, rank, cache_dir)


def run_tensors(run: RunBatch, epoch: int, batch: int, backend: str | None = None) -> FedTensors:
    """The tensors the model received for that batch (that rank's, or all ranks' together),
    rendered by the run's backend (or `backend`) on the CPU: DALI where the run used it and
    it imports here, else torch (identical on raw shards; on JPEG, `alexprep parity` says
    how close)."""
    backend = backend or run.start["backend"]
    if backend == "dali" and pick_backend("auto") != "dali":
        backend = "torch"
    config, ranks = run.config, (run.world_size if run.rank is not None else 1)
    return batch_tensors(run.root, epoch, batch, batch_size=config.batch_size // ranks, rank=run.rank or 0,
                         world_size=ranks, seed=config.seed, lighting_std=config.lighting_std, order=config.order,
                         normalize=config.normalize, backend=backend, decoder=config.decoder,
                         cache_dir=run.cache_dir)


def replay_run(run_dir, epoch: int, batch: int, rank: int | None = None, build=None, grid=None,
               backend: str | None = None, cache_dir=None) -> dict:
    """Batch `batch` of `epoch` of the run in `run_dir` (rank `rank`'s part, or all ranks'):
    each sample's key, label, class and draws as JSON-ready data; with `grid`, a PNG of the
    tensors the model received (run_tensors), captioned with the keys."""
    run = open_run(run_dir, epoch, batch, rank, build, cache_dir)
    fed = replay_batch(run.index, run.plan, epoch, batch, rank, run.world_size)
    out = {"run": str(run_dir), "build_id": run.index.build_id, **fed.to_json()}
    if grid is not None:
        tensors = run_tensors(run, epoch, batch, backend)
        if not (tensors.batch.index == fed.index).all():  # two computations of one plan: a bug if they differ
            raise RuntimeError("the loader's plan of this batch differs from the replayed one")
        out["grid"] = str(save_grid(grid, tensors, fed.keys))
    return out
