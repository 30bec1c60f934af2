"""`alexprep train`: its options are TrainConfig's fields (cli/config_options.py)."""
from __future__ import annotations

import click

from alexprep.cli.common import CACHE_HELP, LIMIT_HELP, BuildRoot, ByteSize, UserPath, user_errors
from alexprep.cli.config_options import config_options, given_on_command_line
from alexprep.model.config import TrainConfig


def _devices(device: str | None, devices: str | None) -> tuple[str, ...]:
    if device and devices:
        raise click.UsageError("give --device (both towers on one) or --devices A,B (one tower each), not both")
    if devices:
        return tuple(d.strip() for d in devices.split(",") if d.strip())
    return (device or "cpu",)


@click.command("train")
@click.argument("shards", type=BuildRoot())
@click.option("--run-dir", type=UserPath(), required=True, help="Where checkpoints and logs go.")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir where it stopped, with its settings "
              "(an option given that differs is refused, but for the few that may change).")
@config_options()
@click.option("--device", default=None, help="Both towers on this device: cpu, cuda:N [default: cpu].")
@click.option("--devices", default=None, help="One tower per device, e.g. cuda:0,cuda:1; 'auto' under torchrun.")
@click.option("--cache-dir", type=UserPath(), default=None, help=CACHE_HELP)
@click.option("--cache-limit", type=ByteSize(), default=None,
              help=LIMIT_HELP.format("--order quasi; validation reads in order"))
@click.pass_context
@user_errors
def train_command(ctx, shards, run_dir, resume, device, devices, cache_dir, cache_limit, **options):
    """Train the paper's AlexNet on a build folder, with the paper's recipe.

    SHARDS is the build folder OUT of build-shards (with OUT/stats.npz from `alexprep
    stats`), or the URI it was pushed to with --cache-dir. Defaults are section 5 of the paper. Checkpoints every epoch, every
    --checkpoint-minutes and on Ctrl-C / SIGTERM; --resume continues where it stopped
    (bit-exact on CUDA only with --deterministic), with the run's settings: of the options
    given with it, only --epochs, --max-steps, --log-every and those that change how the
    run is kept or watched may differ (each change is recorded in metrics.jsonl).

    \b
    Example:
        alexprep train out/ --run-dir runs/alexnet --device cuda:0
        alexprep train out/ --run-dir runs/alexnet --resume --epochs 100
        alexprep train s3://bucket/imagenet-256 --run-dir runs/a --cache-dir /nvme/alexprep
        alexprep train s3://bucket/imagenet-256 --run-dir runs/b --cache-dir /nvme/alexprep --order quasi --cache-limit 20G
        torchrun --nproc-per-node 4 -m alexprep.cli.main train out/ --run-dir runs/r --devices auto
    """
    config = TrainConfig(devices=_devices(device, devices), **options)
    given = given_on_command_line(ctx, options)
    if given_on_command_line(ctx, ("device", "devices")):
        given.add("devices")
    from alexprep.model.train import TrainingDiverged, train

    try:
        train(shards, run_dir, config, resume=resume, given=given, log=click.echo, cache_dir=cache_dir,
              cache_limit=cache_limit)
    except TrainingDiverged as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(1)
