"""Checkpoints: one dict, written atomically, loadable with `weights_only=True`.

Everything inference needs travels with the weights (class list, mean image, eigen,
build id), so a checkpoint can classify images without the build folder.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from alexprep.imagenet_prep.atomic import replace_synced, temporary_name
from alexprep.imagenet_prep.classes import ClassList
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.stats import STATS_KEYS, DatasetStats

FORMAT = "alexprep-checkpoint"
NAME = re.compile(r"^checkpoint-e(\d{3,})-s(\d{7,})\.pt$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"checkpoint-e{epoch:03d}-s{step:07d}.pt"


def stats_to_tensors(stats: DatasetStats) -> dict:
    out = {k: torch.from_numpy(np.asarray(getattr(stats, k), np.float64)) for k in STATS_KEYS if k != "count"}
    return out | {"count": int(stats.count), "build_id": stats.build_id}


def stats_from_checkpoint(ckpt: dict) -> DatasetStats:
    s = ckpt["stats"]
    return DatasetStats(**{k: s[k].numpy() for k in STATS_KEYS if k != "count"}, count=int(s["count"]),
                        build_id=s["build_id"])


def classes_from_checkpoint(ckpt: dict) -> ClassList:
    return ClassList(tuple(ckpt["classes"]["wnids"]), tuple(ckpt["classes"]["names"]))


def require_same_classes(ckpt: dict, index) -> None:
    """The shards' labels (of SplitIndex `index`) mean what the checkpoint's outputs mean,
    or a DataError saying so."""
    wnids = list(ckpt["classes"]["wnids"])
    if list(index.classes.wnids) != wnids:
        raise DataError(f"the checkpoint knows {len(wnids)} classes, {index.root} has {len(index.classes)}"
                        + ("" if len(wnids) != len(index.classes) else " with other wnids")
                        + ": use a build with the training run's class list")


def normalize_of(ckpt: dict) -> str:
    """The normalization the run trained with ("mean-image", the paper's, or "channel")."""
    return ckpt.get("config", {}).get("normalize", "mean-image")


def save_checkpoint(folder: Path, ckpt: dict, keep_last: int) -> Path:
    """Write `ckpt` under its epoch/step name (temporary name, then rename), then delete all
    but the newest `keep_last` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(ckpt["epoch"], ckpt["step"])
    tmp = temporary_name(path)
    torch.save(ckpt, tmp)
    replace_synced(tmp, path)
    for old in list_checkpoints(folder)[:-keep_last] if keep_last > 0 else []:
        old.unlink()
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first (by step)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(2)), p) for p in folder.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():  # a run dir: its newest checkpoint
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not found:
            raise DataError(f"{path} holds no checkpoint")
        path = found[-1]
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise DataError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise DataError(f"{path} is not an alexprep checkpoint")
    return ckpt
