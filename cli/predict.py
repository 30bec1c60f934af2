"""`alexprep predict`: classify image files with a trained checkpoint."""
from __future__ import annotations

import json

import click

from alexprep.cli.common import UserPath, user_errors


@click.command("predict")
@click.argument("checkpoint", type=UserPath())
@click.argument("images", nargs=-1, required=True, type=UserPath())
@click.option("--crops", type=click.Choice(["1", "10"]), default="1", show_default=True,
              help="Centre crop, or the paper's 10 crops with softmax averaged.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Classes listed per image.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list: per image {path, top: [{index, wnid, name, probability}]} or {path, error}.")
@user_errors
def predict_command(checkpoint, images, crops, top, batch_size, device, as_json):
    """Classify image files the way evaluation does: top-5 classes with probabilities.

    CHECKPOINT is a checkpoint file or a run dir (its newest checkpoint); it carries
    the mean image and class list, so no build folder is needed. Each image's shorter
    side is rescaled to 256, the central 256x256 cut, then the centre 224x224 crop (or
    the paper's 10 crops) minus the mean image goes through the network. Files that
    cannot be read are listed with the reason and the others are still classified;
    the exit code is then 1 (0 when every file was classified).

    \b
    Example:
        alexprep predict runs/alexnet cat.jpg dog.png
        alexprep predict runs/alexnet/checkpoints/checkpoint-e090-s0900000.pt photos/*.jpg --crops 10 --json
    """
    from alexprep.model.predict import class_label, classify_files

    results = classify_files(checkpoint, images, crops=int(crops), top=top, device=device, batch_size=batch_size)
    bad = [r for r in results if not r.ok]
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results], indent=1))
    else:
        for r in results:
            if not r.ok:
                continue
            click.echo(r.path)
            for rank, s in enumerate(r.top, 1):
                click.echo(f"  {rank}. {100 * s.probability:5.1f}%  {class_label(s.wnid, s.name, short=False)}")
        if bad:
            click.echo(f"{len(bad)} of {len(results)} file(s) could not be classified:", err=True)
            for r in bad:
                click.echo(f"  {r.path}: {r.error}", err=True)
    if bad:
        raise SystemExit(1)
