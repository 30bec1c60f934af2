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


@click.command("parity")
@click.argument("shards", type=BuildRoot())
@click.option("--samples", type=click.IntRange(min=1), default=16, show_default=True,
              help="Training images compared (batch 0 of --epoch).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epoch", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--recipe", "recipes", type=click.Choice(["paper", "rrc"]), multiple=True,
              help="Only this recipe (repeatable) [default: both where the build allows them].")
@click.option("-o", "--output", type=UserPath(dir_okay=False), default=None, help="Also write the report as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@user_errors
def parity_command(shards, samples, seed, epoch, recipes, output, as_json) -> None:
    """Compare the backends here and a plain PIL + numpy rendering, operation by operation.

    Per recipe and operation (decode, crop or resize, flip, mean, lighting), the largest and
    mean difference in 0-255 levels of the same samples with the same draws.

    \b
    Example:
        alexprep parity out/ -o parity.json
    """
    from alexprep.imagenet_prep.atomic import write_text_atomic
    from alexprep.imagenet_prep.parity import parity_report

    report = parity_report(shards, samples=samples, seed=seed, epoch=epoch, recipes=recipes or None)
    text = json.dumps(report, indent=1)
    if output is not None:
        write_text_atomic(output, text + "\n")
    if as_json:
        click.echo(text)
        return
    click.echo(f"{report['samples']} samples of build {report['build_id']} ({report['encoding']}), "
               f"differences in 0-255 levels, largest / mean:")
    for recipe, operations in report["recipes"].items():
        pairs = list(next(iter(operations.values())))
        click.echo(f"\n{recipe:<10}" + "".join(f"{p:>26}" for p in pairs))
        for operation, row in operations.items():
            cells = ["-" if row[p] is None else f"{row[p]['max']:.3g} / {row[p]['mean']:.3g}" for p in pairs]
            click.echo(f"{operation:<10}" + "".join(f"{c:>26}" for c in cells))
