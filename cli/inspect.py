"""`alexprep inspect kernels | predict | neighbors`: the paper's Figures 3 and 4."""
from __future__ import annotations

from pathlib import Path

import click

from alexprep.cli.common import UserPath, progress_bars, user_errors

_checkpoint_arg = click.argument("checkpoint", type=UserPath())
_shards_arg = click.argument("shards", type=UserPath())
_dpi = click.option("--dpi", type=click.IntRange(min=20, max=600), default=100, show_default=True,
                    help="Pixels per inch of the PNG.")
_device = click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")


@click.group("inspect")
def inspect_group() -> None:
    """See what a trained network learned: the paper's Figures 3 and 4.

    \b
    Example:
        alexprep inspect kernels runs/alexnet -o kernels.png
        alexprep inspect predict runs/alexnet out/ -o predictions.png
        alexprep inspect neighbors runs/alexnet out/ -o neighbors.png
    """


@inspect_group.command("kernels", short_help="conv1's 96 kernels as a grid (Figure 3).")
@_checkpoint_arg
@click.option("-o", "--output", type=UserPath(), default=Path("kernels.png"), show_default=True)
@_dpi
@user_errors
def kernels_command(checkpoint, output, dpi):
    """Draw conv1's 96 kernels as a grid (the paper's Figure 3).

    CHECKPOINT is a checkpoint file or a run dir (its newest checkpoint). Tower 1's 48
    kernels (11x11x3) are drawn above tower 2's, each contrast-stretched on its own so its
    colour and orientation show.

    \b
    Example:
        alexprep inspect kernels runs/alexnet -o kernels.png
    """
    from alexprep.model.figures import kernels_figure

    click.echo(f"wrote {kernels_figure(checkpoint, output, dpi=dpi)}")


@inspect_group.command("predict", short_help="Images with their top-5 predictions (Figure 4, left).")
@_checkpoint_arg
@_shards_arg
@click.option("-o", "--output", type=UserPath(), default=Path("predictions.png"), show_default=True)
@click.option("--n", "count", type=click.IntRange(min=1, max=64), default=8, show_default=True, help="Images shown.")
@click.option("--split", default="val", show_default=True, help="Which split of SHARDS the images come from.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the choice of images.")
@click.option("--crops", type=click.Choice(["1", "10"]), default="1", show_default=True,
              help="Centre crop, or the paper's 10 crops with softmax averaged.")
@_device
@_dpi
@user_errors
def predict_command(checkpoint, shards, output, count, split, seed, crops, device, dpi):
    """Draw images with their true label and top-5 predictions (Figure 4, left).

    SHARDS is the build folder OUT; its class list must be the training run's. Each
    image shows the centre crop the network saw, its true class, and bars of the five
    most probable classes (the true class in red). Class names are the build's.

    \b
    Example:
        alexprep inspect predict runs/alexnet out/ -o predictions.png --n 8
    """
    from alexprep.model.figures import predictions_figure

    path = predictions_figure(checkpoint, shards, output, n=count, split=split, seed=seed, crops=int(crops),
                              device=device, dpi=dpi)
    click.echo(f"wrote {path}")


@inspect_group.command("neighbors", short_help="Nearest images in fc7 space (Figure 4, right).")
@_checkpoint_arg
@_shards_arg
@click.option("-o", "--output", type=UserPath(), default=Path("neighbors.png"), show_default=True)
@click.option("--queries", type=click.IntRange(min=1, max=64), default=5, show_default=True,
              help="Query images (rows of the figure).")
@click.option("--k", type=click.IntRange(min=1, max=32), default=6, show_default=True,
              help="Nearest images shown per query.")
@click.option("--query-split", default="val", show_default=True, help="Split the queries come from.")
@click.option("--split", default="train", show_default=True, help="Split searched for neighbors.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the choice of queries.")
@click.option("--cache", "cache_dir", type=UserPath(), default=None,
              help="Feature cache folder [default: SHARDS/features].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@_device
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Loader workers [default: the evaluation share of the cores, devices.evaluation_workers].")
@_dpi
@user_errors
def neighbors_command(checkpoint, shards, output, queries, k, query_split, split, seed, cache_dir, batch_size,
                      device, backend, workers, dpi):
    """Draw query images and their nearest images in fc7 space (Figure 4, right).

    Each query (from --query-split) is followed by the --k images of --split whose
    4096-d fc7 activations are nearest in Euclidean distance. The features of both
    splits are computed once, in batches, and cached as float16 (1.28M ImageNet
    training images take ~10.5 GB); later calls with the same checkpoint reuse them.

    \b
    Example:
        alexprep inspect neighbors runs/alexnet out/ -o neighbors.png --queries 5 --k 6
        alexprep inspect neighbors runs/alexnet out/ --query-split train --cache /scratch/features
    """
    from alexprep.model.neighbors import neighbors

    with progress_bars("fc7 features of") as progress:
        path, found = neighbors(checkpoint, shards, output, queries=queries, k=k, query_split=query_split,
                                 split=split, seed=seed, cache_dir=cache_dir, batch_size=batch_size, device=device,
                                 backend=backend, workers=workers, dpi=dpi,
                                 progress=lambda name, done, total: progress(done, total, name))
    click.echo(f"wrote {path}")
    for q, row, dist in zip(found.queries, found.indices, found.distances):
        pairs = ", ".join(f"#{i} ({d:.1f})" for i, d in zip(row, dist))
        click.echo(f"  {query_split} #{q}: {pairs}")
