"""`alexprep stats`: the training set's mean image and RGB covariance."""
from __future__ import annotations

import json

import click

from alexprep.cli.common import UserPath, progress_bars, user_errors


@click.command("stats")
@click.argument("out", type=UserPath())
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON (for scripts) instead of a summary.")
@click.option("--recompute", is_flag=True,
              help="Compute from the shard pixels, not the shards' partial sums (for builds made with --no-stats, "
                   "or to check the partials).")
@click.option("--workers", type=click.IntRange(min=1), default=None, show_default="all cores",
              help="Threads decoding shards for --recompute.")
@user_errors
def stats_command(out, as_json, recompute, workers):
    """Compute the training set's mean image and RGB covariance (PCA lighting).

    Merges the exact integer sums kept beside every train shard (all --part runs
    together) into OUT/stats.npz: mean_image (256x256x3), channel_mean, channel_std,
    rgb_cov, eigvals (descending) and eigvecs (columns), on the 0-255 RGB scale, over
    every pixel of the 256x256 centre crops. Also writes OUT/stats.json (the same
    numbers for people) and OUT/stats.png (the mean image and the eigenvectors as
    colour swatches). A missing or unfinished build is an error and writes nothing.
    Builds made with --resize keep-aspect (images of different sizes) get everything
    but the mean image, over every pixel of the whole stored images.

    \b
    Example:
        alexprep stats out/
        alexprep stats out/ --json | jq .eigvals
        alexprep stats out/ --recompute    # from the pixels themselves
    """
    from alexprep.imagenet_prep.stats import check_against_partials, compute_stats, stats_json, write_stats

    with progress_bars("stats --recompute") as progress:
        stats = compute_stats(out, recompute=recompute, progress=progress if recompute else None, workers=workers)
    source = "recompute" if recompute else "partials"
    check = check_against_partials(out, stats) if recompute else None
    paths = write_stats(out, stats, source=source)

    if as_json:
        report = stats_json(stats, source=source)
        report["written"] = {k: str(p) for k, p in paths.items()}
        if recompute:
            report["partials_check"] = check
        click.echo(json.dumps(report, indent=1))
        return
    how = "recomputed from the shard pixels" if recompute else "from the shards' partial sums"
    click.echo(f"train statistics of {out} (build {stats.build_id}): {stats.count:,} images, {how}, 0-255 RGB")
    for name, values in (("channel mean", stats.channel_mean), ("channel std ", stats.channel_std)):
        click.echo(f"  {name}  " + "  ".join(f"{c} {v:7.3f}" for c, v in zip("RGB", values)))
    if not stats.has_mean_image:
        click.echo("  mean image    none: image sizes differ (--resize keep-aspect); normalise per channel")
    click.echo("  eigenvalues   " + "  ".join(f"{v:10.3f}" for v in stats.eigvals)
               + "   (sqrt: " + ", ".join(f"{v:.2f}" for v in stats.eigvals.clip(0) ** 0.5) + ")")
    click.echo("  eigenvectors (columns, largest component positive):")
    for c, row in zip("RGB", stats.eigvecs):
        click.echo(f"             {c}  " + "  ".join(f"{v:+10.4f}" for v in row))
    if recompute:
        click.echo(f"  against the shards' partials: {_describe(check)}")
    click.echo(f"wrote {paths['npz']}, {paths['json'].name}, {paths['png'].name}")


def _describe(check: dict | None) -> str:
    if check is None:
        return "none to compare with (built with --no-stats, or some missing)"
    if check["identical"]:
        return "identical"
    mean = ("" if check["mean_image_max_abs"] is None  # keep-aspect builds have no mean image
            else f"mean image within {check['mean_image_max_abs']:.3g} levels, ")
    return (f"{mean}channel mean within "
            f"{check['channel_mean_max_abs']:.3g}, rgb_cov {100 * check['rgb_cov_rel']:.3g}% apart, eigenvectors "
            f"within {max(check['eigvec_angle_deg']):.3g} deg (JPEG shards decode to slightly different pixels)")
