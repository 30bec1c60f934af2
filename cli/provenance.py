"""`alexprep replay`, `alexprep fingerprint` and `alexprep parity`: what a run was fed, and
how the backends compare (docs/design.md, "Replay, fingerprints, parity")."""
from __future__ import annotations

import json

import click

from alexprep.cli.common import BuildRoot, UserPath, user_errors
from alexprep.model.config import TrainConfig

DEFAULTS = TrainConfig()


@click.command("replay")
@click.argument("run_dir", type=UserPath(exists=True, file_okay=False))
@click.option("--epoch", type=click.IntRange(min=0), required=True, help="The epoch, from 0.")
@click.option("--batch", "number", type=click.IntRange(min=0), required=True, help="The batch of that epoch, from 0.")
@click.option("--rank", type=click.IntRange(min=0), default=None,
              help="That rank's part of the batch (default: all ranks together, the global batch).")
@click.option("-o", "--output", "grid", type=UserPath(dir_okay=False), default=None,
              help="Also write the tensors the model received, denormalised, as a PNG grid captioned with keys.")
@click.option("--build", type=BuildRoot(), default=None,
              help="The build folder, if not where the run read it (needed for a URI: none is recorded).")
@click.option("--backend", type=click.Choice(["dali", "torch"]), default=None,
              help="Render -o with this backend (default: the run's).")
@click.option("--cache-dir", type=UserPath(file_okay=False), default=None, help="For a --build URI.")
@user_errors
def replay_command(run_dir, epoch, number, rank, grid, build, backend, cache_dir) -> None:
    """Show a batch a training run fed the network: keys, labels, classes and draws, as JSON.

    Computed from the run's config.json, metrics.jsonl and build, without iterating to it.

    \b
    Example:
        alexprep replay runs/alexnet --epoch 3 --batch 17 -o grid.png
        alexprep replay runs/alexnet --epoch 3 --batch 17 --rank 1 > batch.json
    """
    from alexprep.model.replay import replay_run

    out = replay_run(run_dir, epoch, number, rank, build=build, grid=grid, backend=backend, cache_dir=cache_dir)
    click.echo(json.dumps(out, indent=1))


@click.command("fingerprint")
@click.argument("shards", type=BuildRoot())
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=DEFAULTS.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size, show_default=True,
              help="The global batch.")
@click.option("--world-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ranks (must divide the batch; the fingerprints are the same at every such world size).")
@click.option("--order", type=click.Choice(["random", "quasi"]), default=DEFAULTS.order, show_default=True)
@click.option("--recipe", type=click.Choice(["paper", "rrc"]), default="paper", show_default=True)
@click.option("--lighting-std", type=float, default=None, help="PCA lighting alpha std [default: the recipe's].")
@click.option("--cache-dir", type=UserPath(file_okay=False), default=None, help="For a URI: its manifests go here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of one line per epoch.")
@user_errors
def fingerprint_command(shards, seed, epochs, batch_size, world_size, order, recipe, lighting_std, cache_dir,
                        as_json) -> None:
    """Print each epoch's fingerprint of a training run of SHARDS, without training.

    SHA-256 of the build id, the shards' SHA-256s and the epoch's order and draws: what
    `alexprep train` writes to metrics.jsonl and final.json with the same options.

    \b
    Example:
        alexprep fingerprint out/ --seed 0 --epochs 90
    """
    from alexprep.imagenet_prep.errors import DataError
    from alexprep.imagenet_prep.fingerprint import build_fingerprints

    if batch_size % world_size:
        raise DataError(f"batch size {batch_size} is not divisible by the {world_size} ranks")
    out = build_fingerprints(shards, epochs, batch_size=batch_size, seed=seed, order=order, recipe=recipe,
                             lighting_std=lighting_std, cache_dir=cache_dir)
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    for row in out["epochs"]:
        click.echo(f"epoch {row['epoch']}: {row['fingerprint']}")
