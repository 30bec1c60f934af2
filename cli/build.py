"""`alexprep build-shards`."""
from __future__ import annotations

import click

from alexprep.cli.common import BadInput, UserPath, format_bytes, progress_bars, user_errors
from alexprep.imagenet_prep.build import DEFAULT_SHARD_SIZE, BuildConfig, DiskFull, build_shards, default_workers
from alexprep.imagenet_prep.transform import ENCODINGS, RESAMPLE_FILTERS, RESIZE_MODES, ImageSpec


class PartType(click.ParamType):
    """`i/N`: part i (0-based) of N."""

    name = "i/N"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            i, n = (int(x) for x in str(value).split("/"))
        except ValueError:
            self.fail(f"{value!r} is not i/N (e.g. 0/4)", param, ctx)
        if not (n >= 1 and 0 <= i < n):
            self.fail(f"{value!r}: need 0 <= i < N (parts are numbered 0..N-1)", param, ctx)
        return i, n


@click.command("build-shards")
@click.argument("src", type=UserPath())
@click.argument("out", type=UserPath())
@click.option("--split", type=click.Choice(["train", "val", "all"]), default="all", show_default=True,
              help="Which split to build (those present in SRC).")
@click.option("--encoding", type=click.Choice(ENCODINGS), default="jpeg", show_default=True,
              help="JPEG bytes, or raw 256x256x3 uint8 (6x larger, no decoding, exact).")
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True,
              help="JPEG quality (cuda-convnet2 used 95).")
@click.option("--resample", type=click.Choice(sorted(RESAMPLE_FILTERS)), default="bicubic", show_default=True,
              help="Antialiasing filter for the resize (bicubic and lanczos differ by less than q95's error).")
@click.option("--resize", type=click.Choice(RESIZE_MODES), default="center-crop", show_default=True,
              help="center-crop: the paper's 256x256 centre crop. keep-aspect: the whole image, shorter side "
                   "--shorter-side, longer side at most --max-side, nothing cropped (for RandomResizedCrop "
                   "recipes); each row records its height and width.")
@click.option("--shorter-side", type=int, default=None, show_default="256",
              help="keep-aspect only: the shorter side's size.")
@click.option("--max-side", type=int, default=None, show_default="2 x --shorter-side",
              help="keep-aspect only: the longer side's cap (a wider image gets a shorter side below "
                   "--shorter-side).")
@click.option("--shard-size", type=click.IntRange(min=1), default=DEFAULT_SHARD_SIZE, show_default=True,
              help="Images per shard (at the default, tens of MB of q95 JPEG: docs/build.md).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the spread of samples over shards.")
@click.option("--workers", type=click.IntRange(min=1), default=default_workers(), show_default="all cores",
              help="Worker processes.")
@click.option("--part", type=PartType(), default="0/1", show_default=True,
              help="Build only part i of N (0-based), e.g. --part $SLURM_ARRAY_TASK_ID/16.")
@click.option("--on-error", type=click.Choice(["report", "fail"]), default="report", show_default=True,
              help="Unreadable files are always listed; 'fail' also exits with code 1.")
@click.option("--overwrite", is_flag=True, help="Replace a different build found in OUT.")
@click.option("--val-labels", type=UserPath(),
              help="Labels of a flat val/ folder: LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt.")
@click.option("--devkit", type=UserPath(),
              help="The ILSVRC2012 devkit: its folder (holds data/meta.mat) or ILSVRC2012_devkit_t12.tar.gz.")
@click.option("--classes", "classes_file", type=UserPath(),
              help="The class list: a classes.json, or one wnid per line.")
@click.option("--no-stats", is_flag=True, help="Do not keep statistics partials (`stats --recompute` can still compute them).")
@user_errors
def build_shards_command(src, out, split, encoding, quality, resample, resize, shorter_side, max_side, shard_size, seed, workers, part,
                         on_error, overwrite, val_labels, devkit, classes_file, no_stats):
    """Convert ImageNet (archives as downloaded, or any ImageFolder tree) into 256x256 Arrow shards.

    Reads the archives in place (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and
    ILSVRC2012_devkit_t12.tar.gz, or Kaggle's zip) in SRC or given as SRC, or finds
    train/ and val/ under SRC (or the Kaggle tree ILSVRC/Data/CLS-LOC/); rescales
    each image's shorter side to 256, crops the central 256x256 (--resize keep-aspect:
    keeps the whole image, longer side capped) and writes shards to OUT,
    with each shard's statistics partial beside it. Safe to kill and rerun: finished
    shards are kept. Unreadable files are reported, never fatal.

    \b
    Example:
        alexprep build-shards ~/downloads/ out/   # the .tar files as downloaded
        alexprep build-shards ~/imagenet out/
        alexprep build-shards ~/kaggle-imagenet out/ --split val
        alexprep build-shards ~/imagenet out/ --part 3/16   # on machine 3 of 16
        alexprep build-shards ~/imagenet out/ --resize keep-aspect --shorter-side 256 --max-side 512
    """
    config = BuildConfig(
        spec=_image_spec(encoding, quality, resample, resize, shorter_side, max_side),
        shard_size=shard_size, seed=seed, workers=workers, part=part[0], parts=part[1],
        splits=("train", "val") if split == "all" else (split,), on_error=on_error, overwrite=overwrite,
        accumulate_stats=not no_stats, val_labels=val_labels, devkit=devkit, classes_file=classes_file,
    )
    try:
        with progress_bars("build-shards") as progress:
            report = build_shards(src, out, config, progress=progress)
    except DiskFull as exc:  # not bad input (exit 2), a failure: one line, exit 1
        raise click.ClickException(exc.strerror) from None
    written = sum(r.written for r in report.splits)
    rate = written / report.seconds if report.seconds else 0.0
    click.echo(f"built {out} (build id {report.build_id}, part {part[0]}/{part[1]}) in {report.seconds:.1f} s, "
               f"{rate:.0f} images/s")
    for r in report.splits:
        click.echo(f"  {r.split}: {r.written} written, {len(r.skipped)} skipped, {r.ignored} non-image files ignored, "
                   f"{r.shards_built + r.shards_reused} shards ({r.shards_built} built, {r.shards_reused} kept), "
                   f"{format_bytes(r.bytes)}")
    if report.skipped:
        click.echo(f"skipped {len(report.skipped)} unreadable file(s) (also listed in the manifests):")
        for s in report.skipped:
            click.echo(f"  {s['key']}: {s['reason']}" + (f" (in {s['archive']})" if s.get("archive") else ""))
        if on_error == "fail":
            raise SystemExit(1)


def _image_spec(encoding, quality, resample, resize, shorter_side, max_side) -> ImageSpec:
    """The ImageSpec of the options; a bad combination is one line, exit code 2."""
    if resize != "keep-aspect":
        given = [name for name, v in (("--shorter-side", shorter_side), ("--max-side", max_side)) if v is not None]
        if given:
            raise BadInput(f"{' and '.join(given)} apply to --resize keep-aspect only (the centre crop is 256x256)")
        return ImageSpec(encoding=encoding, quality=quality, resample=resample)
    size = 256 if shorter_side is None else shorter_side
    if size < 1 or (max_side is not None and max_side < 1):
        raise BadInput(f"--shorter-side and --max-side must be positive (got {shorter_side}, {max_side})")
    if max_side is not None and max_side < size:
        raise BadInput(f"--max-side {max_side} is smaller than --shorter-side {size}: the longer side cannot be "
                       "shorter than the shorter one")
    try:
        return ImageSpec(size=size, encoding=encoding, quality=quality, resample=resample, resize=resize,
                         max_side=max_side)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
