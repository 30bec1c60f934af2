"""`alexprep train` and `alexprep evaluate`."""
from __future__ import annotations

import json

import click

from alexprep.cli.common import BuildRoot, ByteSize, UserPath, user_errors
from alexprep.model.config import PRECISIONS, TrainConfig

DEFAULTS = TrainConfig()


def _devices(device: str | None, devices: str | None) -> tuple[str, ...]:
    if device and devices:
        raise click.UsageError("give --device (both towers on one) or --devices A,B (one tower each), not both")
    if devices:
        return tuple(d.strip() for d in devices.split(",") if d.strip())
    return (device or "cpu",)


CACHE_HELP = ("A remote SHARDS (a URI) is read through this node-local directory: each shard downloaded once, "
              "checked against its manifest's SHA-256, shared by the node's ranks.")
LIMIT_HELP = ("The most bytes a split may take in --cache-dir (20G, 500M, 123456). A larger split is refused "
              "before anything downloads, unless it is read a few shards at a time ({}): then only the shards "
              "in use are kept, and every pass downloads the split again.")


@click.command("train")
@click.argument("shards", type=BuildRoot())
@click.option("--run-dir", type=UserPath(), required=True, help="Where checkpoints and logs go.")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir where it stopped.")
@click.option("--epochs", type=click.IntRange(min=1), default=DEFAULTS.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size, show_default=True,
              help="The global batch (split over torchrun ranks).")
@click.option("--lr", type=float, default=DEFAULTS.lr, show_default=True, help="Initial learning rate.")
@click.option("--momentum", type=float, default=DEFAULTS.momentum, show_default=True)
@click.option("--weight-decay", type=float, default=DEFAULTS.weight_decay, show_default=True)
@click.option("--decay-biases", is_flag=True, help="Apply weight decay to biases too (cuda-convnet did not).")
@click.option("--bias-lr-mult", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.bias_lr_mult,
              show_default=True, help="Biases learn at this multiple of the lr (the paper: 1; cuda-convnet2 and "
              "Caffe's AlexNet: 2).")
@click.option("--patience", type=click.IntRange(min=1), default=DEFAULTS.patience, show_default=True,
              help="Epochs without a better val top-1 error before the lr is divided by 10.")
@click.option("--max-drops", type=click.IntRange(min=0), default=DEFAULTS.max_drops, show_default=True)
@click.option("--plateau-threshold", type=click.FloatRange(min=0, max=1, max_open=True),
              default=DEFAULTS.plateau_threshold, show_default=True,
              help="An epoch counts as better only if its val error is below the best by this fraction of it.")
@click.option("--milestones", default="", help="A fixed step schedule instead: divide at these epochs, e.g. 30,60,80.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option("--order", type=click.Choice(["random", "quasi"]), default=DEFAULTS.order, show_default=True,
              help="Each epoch's order: random (the paper's), or quasi: shards shuffled, then the samples of each "
              "4 shards together (reads stay within a few shards: for a split larger than RAM or --cache-limit).")
@click.option("--lighting-std", type=float, default=DEFAULTS.lighting_std, show_default=True,
              help="PCA lighting alpha std (0 disables).")
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True)
@click.option("--decoder", type=click.Choice(["auto", "pil", "torchvision"]), default="auto", show_default=True,
              help="Torch backend: decode in CPU workers (pil) or in batches with torchvision (nvJPEG on CUDA).")
@click.option("--device", default=None, help="Both towers on this device: cpu, cuda:N [default: cpu].")
@click.option("--devices", default=None, help="One tower per device, e.g. cuda:0,cuda:1; 'auto' under torchrun.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULTS.precision, show_default=True,
              help="fp32 (TF32 off on GPUs); tf32 (TF32 matmuls and convolutions, Ampere and later); "
              "bf16 autocast. Only fp32 is the paper's arithmetic.")
@click.option("--channels-last", is_flag=True, help="NHWC memory format.")
@click.option("--compile", "compile_", is_flag=True,
              help="Experimental: torch.compile the training step (fused kernels; the first steps compile). "
              "Not yet verified on a GPU: see benchmarks/GPU.md.")
@click.option("--deterministic", is_flag=True,
              help="Deterministic kernels and no cuDNN algorithm search, so that --resume is bit-exact on CUDA "
              "(slower). Without it a resumed run continues where it stopped, not bit-exact on CUDA.")
@click.option("--bias-init", type=click.Choice(["paper", "caffe"]), default=DEFAULTS.bias_init, show_default=True,
              help="paper: biases 1 in conv2/4/5, fc6/7; caffe: 0.1 (learns sooner).")
@click.option("--lrn", type=click.Choice(["cuda-convnet", "paper"]), default=DEFAULTS.lrn, show_default=True)
@click.option("--final-crops", type=click.Choice(["0", "1", "10"]), default="10", show_default=True,
              help="Evaluation at the end (0 to skip).")
@click.option("--checkpoint-minutes", type=float, default=DEFAULTS.checkpoint_minutes, show_default=True)
@click.option("--keep-last", type=click.IntRange(min=1), default=DEFAULTS.keep_last, show_default=True,
              help="Checkpoints kept on disk.")
@click.option("--log-every", type=click.IntRange(min=1), default=DEFAULTS.log_every, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=0), default=0, help="Stop with a checkpoint after N steps.")
@click.option("--workers", type=click.IntRange(min=0), default=0, help="Loader worker processes (0: default).")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard events.")
@click.option("--verify-shards", is_flag=True,
              help="Check every shard's SHA-256 against its manifest before training (sizes are always checked).")
@click.option("--cache-dir", type=UserPath(), default=None, help=CACHE_HELP)
@click.option("--cache-limit", type=ByteSize(), default=None,
              help=LIMIT_HELP.format("--order quasi; validation reads in order"))
@user_errors
def train_command(shards, run_dir, resume, epochs, batch_size, lr, momentum, weight_decay, decay_biases,
                  bias_lr_mult, patience, max_drops, plateau_threshold, milestones, seed, order, lighting_std, backend,
                  decoder, device, devices, precision, channels_last, compile_, deterministic, bias_init, lrn, final_crops,
                  checkpoint_minutes, keep_last, log_every, max_steps, workers, tensorboard, verify_shards, cache_dir,
                  cache_limit):
    """Train the paper's AlexNet on a build folder, with the paper's recipe.

    SHARDS is the build folder OUT of build-shards (with OUT/stats.npz from `alexprep
    stats`), or the URI it was pushed to with --cache-dir. Defaults are section 5 of the paper. Checkpoints every epoch, every
    --checkpoint-minutes and on Ctrl-C / SIGTERM; --resume continues where it stopped
    (bit-exact on CUDA only with --deterministic).

    \b
    Example:
        alexprep train out/ --run-dir runs/alexnet --device cuda:0
        alexprep train out/ --run-dir runs/alexnet --resume
        alexprep train s3://bucket/imagenet-256 --run-dir runs/a --cache-dir /nvme/alexprep
        alexprep train s3://bucket/imagenet-256 --run-dir runs/b --cache-dir /nvme/alexprep --order quasi --cache-limit 20G
        torchrun --nproc-per-node 4 -m alexprep.cli.main train out/ --run-dir runs/r --devices auto
    """
    try:
        steps = tuple(int(x) for x in milestones.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{milestones!r} is not a comma-separated list of epochs", param_hint="--milestones")
    config = TrainConfig(
        batch_size=batch_size, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
        decay_biases=decay_biases, bias_lr_mult=bias_lr_mult, patience=patience, max_drops=max_drops,
        plateau_threshold=plateau_threshold, milestones=steps, seed=seed, order=order,
        lighting_std=lighting_std, backend=backend, decoder=decoder, devices=_devices(device, devices),
        precision=precision, channels_last=channels_last, compile=compile_, deterministic=deterministic,
        bias_init=bias_init, lrn=lrn, final_crops=int(final_crops),
        checkpoint_minutes=checkpoint_minutes, keep_last=keep_last, log_every=log_every, max_steps=max_steps,
        loader_workers=workers, tensorboard=tensorboard, verify_shards=verify_shards,
    )
    from alexprep.model.train import TrainingDiverged, train

    try:
        train(shards, run_dir, config, resume=resume, log=click.echo, cache_dir=cache_dir, cache_limit=cache_limit)
    except TrainingDiverged as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(1)


@click.command("evaluate")
@click.argument("checkpoint", type=UserPath())
@click.argument("shards", type=BuildRoot())
@click.option("--crops", type=click.Choice(["1", "10", "both"]), default="both", show_default=True,
              help="Centre crop, the paper's 10 crops (softmax averaged), or both.")
@click.option("--split", default="val", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
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
