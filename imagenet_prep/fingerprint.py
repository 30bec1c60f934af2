"""Each training epoch's fingerprint: one SHA-256 of what the network was fed, the build's
identity (its build id, every shard's SHA-256 from the manifests) and the epoch's order and
draws for all ranks (docs/design.md, "Replay, fingerprints, parity").

A pure function of the build and the run's plan (run_plan.RunPlan), so that a resumed
run, an uninterrupted one, a run at another world size and `alexprep fingerprint` agree,
and two builds of different images never do. It hashes whole arrays (little-endian, fixed
widths), never a Python loop over samples: 1.7 s an epoch at ImageNet's 1.28M samples on
the shared 2-core machine (load ~5), mostly the epoch order's sort and the draws.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from alexprep.imagenet_prep import augment, rrc
from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.loaders import LoaderConfig, split_index
from alexprep.imagenet_prep.run_plan import RunPlan
from alexprep.imagenet_prep.samples import SplitSamples
from alexprep.imagenet_prep.shards import SplitIndex

VERSION = "alexprep-fingerprint-1"  # changes if what is hashed, or how, ever changes


def epoch_fingerprint(plan: RunPlan, build_id: str, shard_sha256s, epoch: int) -> str:
    """The SHA-256 (hex) of epoch `epoch`: the build's identity, then the samples fed in
    global batch order and their draws (crop offsets or windows, flips, lighting alphas)."""
    digest = hashlib.sha256()
    head = {"version": VERSION, "build_id": build_id, "shards": list(shard_sha256s), "recipe": plan.recipe,
            "global_batch": plan.global_batch}
    digest.update(json.dumps(head, sort_keys=True).encode() + b"\n")
    index = plan.fed_order(epoch)
    draws = plan.draws(epoch, index)
    if isinstance(draws, rrc.RrcDraws):
        arrays = [index, draws.windows, draws.alpha]
    else:
        arrays = [index, draws.offset_x, draws.offset_y, draws.flip, draws.alpha]
    for array in arrays:
        digest.update(_bytes(array))
    return digest.hexdigest()


def _bytes(array: np.ndarray) -> bytes:
    """An array's values as little-endian bytes of a fixed width, whatever the platform."""
    array = np.asarray(array)
    kind = {"b": "u1", "i": "<i8", "u": "<u8", "f": "<f8"}[array.dtype.kind]
    return np.ascontiguousarray(array, dtype=kind).tobytes()


def build_identity(index: SplitIndex) -> tuple[str, list[str]]:
    """(build id, each shard's SHA-256 in manifest order) of a split."""
    return index.build_id, [s.sha256 for s in index.shards]


def plan_of_build(root, *, batch_size: int, seed: int, order: str = "random", recipe: str = "paper",
                  lighting_std: float | None = None, crop: int = augment.CROP, buffer_shards: int = 4,
                  cache_dir=None, split: str = "train") -> tuple[RunPlan, SplitIndex]:
    """The plan a training run of build `root` would follow, from its manifests alone (the
    paper's recipe) or with its images' stored sizes (rrc), and the split's index.
    `lighting_std` None: the recipe's (loaders.RECIPE_DEFAULTS)."""
    config = LoaderConfig(batch_size=batch_size, backend="torch", seed=seed, order=order, recipe=recipe,
                          lighting_std=lighting_std, crop=crop, buffer_shards=buffer_shards)
    index = split_index(root, split, cache_dir)
    if recipe == "paper" and (index.spec.keep_aspect or crop > index.spec.size):
        raise DataError(f"{index.folder}: the paper's recipe takes {crop}x{crop} crops of centre-crop builds at "
                        f"least that size; this build is {index.spec.resize} {index.spec.size} (use --recipe rrc)")
    rows = np.array([s.rows for s in index.shards], np.int64)
    sizes = {}
    if recipe == "rrc":  # the windows need each image's stored size: the shards' size columns
        samples = SplitSamples(index)
        sizes = dict(heights=samples.heights, widths=samples.widths)
    positions = max(index.spec.size - crop + 1, 1) if recipe == "paper" else 1
    plan = RunPlan(rows, batch_size, seed, order, buffer_shards, recipe, float(config.lighting_std), positions,
                   scale=config.scale, ratio=config.ratio, **sizes)
    return plan, index


def build_fingerprints(root, epochs: int, **plan_options) -> dict:
    """{"build_id", "epochs": [{"epoch", "fingerprint"}, ...]}: what a training run of
    `root` with these options writes to metrics.jsonl, without training."""
    plan, index = plan_of_build(root, **plan_options)
    build_id, shas = build_identity(index)
    rows = [{"epoch": e, "fingerprint": epoch_fingerprint(plan, build_id, shas, e)} for e in range(epochs)]
    return {"build_id": build_id, "samples": plan.samples, "batches_per_epoch": plan.batches, "epochs": rows}
