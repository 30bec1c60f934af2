"""`alexprep evaluate`: a checkpoint's top-1 and top-5 error over a split."""
from __future__ import annotations

import json

import click

from alexprep.cli.common import CACHE_HELP, LIMIT_HELP, BuildRoot, ByteSize, UserPath, user_errors
from alexprep.cli.config_options import config_option, config_options


@click.command("evaluate")
@click.argument("checkpoint", type=UserPath())
@click.argument("shards", type=BuildRoot())
@click.option("--crops", type=click.Choice(["1", "10", "both"]), default="both", show_default=True,
              help="Centre crop, the paper's 10 crops (softmax averaged), or both.")
@click.option("--split", default="val", show_default=True)
@config_option("batch_size", 64, "Images per batch (a tenth as many with --crops 10: ten inputs each).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@config_options("backend", "precision")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: top1_error, top5_error, count, crops.")
@click.option("--cache-dir", type=UserPath(), default=None, help=CACHE_HELP)
@click.option("--cache-limit", type=ByteSize(), default=None, help=LIMIT_HELP.format("evaluation reads in order"))
@user_errors
def evaluate_command(checkpoint, shards, crops, split, batch_size, device, backend, precision, as_json, cache_dir,
                     cache_limit):
    """Top-1 and top-5 error of a checkpoint over a whole split, as in the paper's tables.

    CHECKPOINT is a checkpoint file or a run dir (its newest checkpoint). Every image of
    the split is counted once. The mean image and class list come from the checkpoint.

    \b
    Example:
        alexprep evaluate runs/alexnet out/
        alexprep evaluate runs/alexnet/checkpoints/checkpoint-e090-s0900000.pt out/ --crops 10 --json
        alexprep evaluate runs/alexnet s3://bucket/imagenet-256 --cache-dir /nvme/alexprep --cache-limit 2G
    """
    from alexprep.model.inference import evaluate_checkpoint
    from alexprep.model.evaluate import error_table

    wanted = (1, 10) if crops == "both" else (int(crops),)
    results = evaluate_checkpoint(checkpoint, shards, crops=wanted, split=split, batch_size=batch_size,
                                  device=device, backend=backend, precision=precision, cache_dir=cache_dir,
                                  cache_limit=cache_limit)
    if as_json:
        payload = [r.to_json() for r in results]
        click.echo(json.dumps(payload[0] if len(payload) == 1 else payload, indent=1))
    else:
        click.echo(error_table(results))
