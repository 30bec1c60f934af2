"""`alexprep verify`: a build folder's shards against their manifests."""
from __future__ import annotations

import click

from alexprep.cli.common import BuildRoot, user_errors


@click.command("verify")
@click.argument("out", type=BuildRoot())
@click.option("--decode", "decode_images", is_flag=True, help="Also decode every image (slower).")
@user_errors
def verify_command(out, decode_images):
    """Check every shard of a build folder (a path or a URI) against its manifest.

    Size, row count and SHA-256 of each shard; with --decode, every image decodes to
    256x256x3 (keep-aspect builds: to the height x width its row records). A URI is read
    where it is (each object hashed as it streams; nothing cached). Exit code 1 and the
    list of bad shards if any.

    \b
    Example:
        alexprep verify out/ --decode
        alexprep verify "s3://bucket/imagenet-256?region=us-east-1"
    """
    from alexprep.imagenet_prep.remote import display
    from alexprep.imagenet_prep.verify import verify_build

    report = verify_build(out, decode_images=decode_images)
    click.echo(f"{display(out)}: {report.shards} shards, {report.rows} images checked"
               f"{' (decoded)' if decode_images else ''}: {'all good' if report.ok else f'{len(report.bad)} bad'}")
    for line in report.bad:
        click.echo(f"  {line}")
    if not report.ok:
        raise SystemExit(1)
