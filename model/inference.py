"""Using a trained checkpoint: rebuild its network, and evaluate it on a build folder."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from alexprep.imagenet_prep.loaders import eval_loader, split_index
from alexprep.model.alexnet import AlexNet, AlexNetConfig
from alexprep.model.config import check_value, rank_batch_size
from alexprep.model.checkpoint import load_checkpoint, normalize_of, require_same_classes, stats_from_checkpoint
from alexprep.model.distributed import resolve_devices
from alexprep.model.evaluate import EvalResult, evaluate


def model_from_checkpoint(ckpt: dict, devices=("cpu",)) -> AlexNet:
    """The checkpoint's network, in eval mode, on `devices` (any placement loads any)."""
    model = AlexNet(AlexNetConfig(**ckpt["model_config"]), devices=devices)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def evaluate_checkpoint(checkpoint, root, *, crops=(1, 10), split: str = "val", batch_size: int = 64,
                        device: str = "cpu", backend: str = "auto", precision: str = "fp32",
                        cache_dir=None, cache_limit: int | None = None) -> list[EvalResult]:
    """Errors of a checkpoint over `split` of build folder `root` (a path, or a URI read
    through `cache_dir`, keeping at most `cache_limit` bytes there), for each crop setting."""
    for name, value in (("batch_size", batch_size), ("backend", backend), ("precision", precision)):
        check_value(name, value)  # the rules of the training options of these names
    ckpt = load_checkpoint(Path(checkpoint))
    index = split_index(root, split, cache_dir)
    require_same_classes(ckpt, index)
    devices = resolve_devices((device,))
    model = model_from_checkpoint(ckpt, devices)
    # The training set's statistics and the run's normalization apply, whatever build the
    # evaluation shards are from; the class list check above guarantees the labels agree.
    stats = stats_from_checkpoint(ckpt)
    stats = dataclasses.replace(stats, build_id=index.build_id)
    results = []
    for n in crops:
        loader = eval_loader(root, batch_size=rank_batch_size(batch_size, 1, n), device=device,
                             stats=stats, split=split, crops=n, normalize=normalize_of(ckpt),
                             backend=backend, cache_dir=cache_dir, cache_limit=cache_limit)
        try:
            results.append(evaluate(model, loader, precision))
        finally:
            loader.close()
    return results
