"""The `alexprep` click group; each command group lives in its own module."""
from __future__ import annotations

import importlib.metadata
import warnings

import click

from alexprep.cli.demo import demo_command
from alexprep.cli.build import build_shards_command
from alexprep.cli.evaluate import evaluate_command
from alexprep.cli.info import info
from alexprep.cli.inspect import inspect_group
from alexprep.cli.predict import predict_command
from alexprep.cli.provenance import fingerprint_command, parity_command, replay_command
from alexprep.cli.push import push_command
from alexprep.cli.stats import stats_command
from alexprep.cli.train import train_command
from alexprep.cli.verify import verify_command


def package_version() -> str:
    try:
        return importlib.metadata.version("alexprep")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_version(), prog_name="alexprep")
def cli() -> None:
    """alexprep: the AlexNet paper as a tool.

    ImageNet (any ImageFolder tree) to 256x256 Arrow shards, the training set's
    mean image and RGB PCA, the paper's augmentations, and the two-tower AlexNet.

    \b
    Example:
        alexprep build-shards ~/imagenet out/
        alexprep stats out/
    """


cli.add_command(build_shards_command)
cli.add_command(verify_command)
cli.add_command(push_command)
cli.add_command(info)
cli.add_command(stats_command)
cli.add_command(train_command)
cli.add_command(evaluate_command)
cli.add_command(demo_command)
cli.add_command(inspect_group)
cli.add_command(predict_command)
cli.add_command(replay_command)
cli.add_command(fingerprint_command)
cli.add_command(parity_command)


def _one_line(message, category, filename, lineno, line=None) -> str:
    """A warning as the CLI's other messages: one line, without the source line Python adds."""
    return f"warning: {message}\n"


def main() -> None:
    warnings.formatwarning = _one_line
    cli()


if __name__ == "__main__":
    main()
