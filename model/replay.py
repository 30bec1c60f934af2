"""`alexprep replay`: a training run's batch again, from its run folder (config.json and the
"run" rows of metrics.jsonl) and its build, without iterating to it (imagenet_prep/replay.py;
docs/design.md, "Replay, fingerprints, parity").

    out = replay_run("runs/alexnet", epoch=3, batch=17, rank=None, grid="grid.png")
"""
from __future__ import annotations

import json
from pathlib import Path

from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.fingerprint import plan_of_build
from alexprep.imagenet_prep.loaders import pick_backend
from alexprep.imagenet_prep.remote import is_uri
from alexprep.imagenet_prep.replay import batch_tensors, replay_batch, save_grid
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


def replay_run(run_dir, epoch: int, batch: int, rank: int | None = None, build=None, grid=None,
               backend: str | None = None, cache_dir=None) -> dict:
    """Batch `batch` of `epoch` of the run in `run_dir` (rank `rank`'s part, or all ranks'):
    each sample's key, label, class and draws as JSON-ready data; with `grid`, a PNG of the
    tensors the model received, rendered by the run's backend (or `backend`) on the CPU.
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
    fed = replay_batch(index, plan, epoch, batch, rank, world_size)
    out = {"run": str(run_dir), "build_id": index.build_id, **fed.to_json()}
    if grid is not None:
        backend = backend or start["backend"]
        if backend == "dali" and pick_backend("auto") != "dali":
            backend = "torch"  # identical tensors on raw shards; on JPEG, parity says how close
        out["backend"] = backend
        per_rank = config.batch_size // world_size if rank is not None else config.batch_size
        tensors = batch_tensors(root, epoch, batch, batch_size=per_rank, rank=rank or 0,
                                world_size=world_size if rank is not None else 1, seed=config.seed,
                                lighting_std=config.lighting_std, order=config.order, normalize=config.normalize,
                                backend=backend, decoder=config.decoder,
                                cache_dir=cache_dir)
        if not (tensors.batch.index == fed.index).all():  # two computations of one plan: a bug if they differ
            raise RuntimeError("the loader's plan of this batch differs from the replayed one")
        out["grid"] = str(save_grid(grid, tensors, fed.keys))
    return out
