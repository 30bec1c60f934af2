"""`alexprep push`: a finished build folder into object storage."""
from __future__ import annotations

import click

from alexprep.cli.common import UserPath, format_bytes, progress_bars, user_errors


@click.command("push")
@click.argument("out", type=UserPath())
@click.argument("uri")
@click.option("--workers", type=click.IntRange(min=1), default=8, show_default=True, help="Parallel uploads.")
@user_errors
def push_command(out, uri, workers):
    """Upload build folder OUT to URI (s3://, gs://, hdfs://, file://), for `alexprep train
    URI --cache-dir DIR` on other machines.

    Shards go up in parallel, then classes.json and stats, the manifests last: until a
    push finishes, URI is not taken for a build. Run the same command again after a
    failure or to publish a changed build: what differs from OUT on the remote is uploaded
    (what is there is checked, not a record kept here), so a push again repairs it. Credentials
    come from the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
    GOOGLE_APPLICATION_CREDENTIALS); options go in the URI's query.

    \b
    Example:
        alexprep push out/ s3://bucket/imagenet-256
        alexprep push out/ "s3://bucket/imagenet-256?endpoint_override=minio:9000&scheme=http"
    """
    from alexprep.imagenet_prep.push import push_build
    from alexprep.imagenet_prep.remote import display

    with progress_bars("push", unit="B") as progress:
        report = push_build(out, uri, workers=workers, progress=lambda done, total: progress(done, total))
    rate = report.uploaded_bytes / report.seconds if report.seconds else 0.0
    click.echo(f"pushed {out} to {display(uri)}: {report.uploaded} file(s), "
               f"{format_bytes(report.uploaded_bytes)} in {report.seconds:.1f} s ({format_bytes(rate)}/s); "
               f"{report.skipped} unchanged file(s) skipped")
