"""What every command shares: bad input becomes one line and exit code 2, no traceback."""
from __future__ import annotations

import contextlib
import functools
import re
import sys
from decimal import Decimal
from pathlib import Path

import click

from alexprep.imagenet_prep.errors import DataError
from alexprep.imagenet_prep.remote import is_uri


# --cache-dir and --cache-limit of the commands that read a remote build (train, evaluate)
CACHE_HELP = ("A remote SHARDS (a URI) is read through this node-local directory: each shard downloaded once, "
              "checked against its manifest's SHA-256, shared by the node's ranks.")
LIMIT_HELP = ("The most bytes a split may take in --cache-dir (20G, 500M, 123456). A larger split is refused "
              "before anything downloads, unless it is read a few shards at a time ({}): then only the shards "
              "in use are kept, and every pass downloads the split again.")


class BadInput(click.ClickException):
    """A click error with the usage exit code (2), for input the user must fix."""

    exit_code = 2


def user_errors(func):
    """Turn the library's DataError into BadInput (one line, exit code 2)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except DataError as exc:
            raise BadInput(str(exc)) from None

    return wrapper


@contextlib.contextmanager
def progress_bars(desc: str, unit: str = "img"):
    """Yields a `progress(done, total, name="")` callback for the library's long jobs: one
    tqdm bar on stderr per name (images/s, or bytes/s with unit="B", and time left), all
    closed at the end."""
    from tqdm import tqdm

    bars = {}

    def progress(done: int, total: int, name: str = "") -> None:
        if name not in bars:
            label = f"{desc} {name}".strip()
            scaled = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
            bars[name] = tqdm(total=total, unit=unit, desc=label, dynamic_ncols=True, file=sys.stderr, **scaled)
        bars[name].update(done - bars[name].n)

    try:
        yield progress
    finally:
        for bar in bars.values():
            bar.close()


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class UserPath(click.Path):
    """A path argument with `~` expanded, as a shell does only for an unquoted word
    (`--run-dir=~/runs` or `"~/imagenet"` reach us with the tilde); a pathlib.Path."""

    def __init__(self, **kwargs):
        super().__init__(path_type=Path, **kwargs)

    def convert(self, value, param, ctx):
        return super().convert(Path(value).expanduser() if isinstance(value, (str, Path)) else value, param, ctx)


class BuildRoot(click.ParamType):
    """A build folder OUT given as a local path (`~` expanded) or a URI (kept as given)."""

    name = "folder_or_uri"

    def convert(self, value, param, ctx) -> str:
        value = str(value)
        return value if is_uri(value) else str(Path(value).expanduser())


class ByteSize(click.ParamType):
    """A number of bytes: 123456, or with a unit, 500M, 20G, 1.5T (powers of 1000; Ki, Mi,
    Gi, Ti for powers of 1024; a trailing B is allowed)."""

    name = "size"
    UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]i?)?B?\s*", str(value), re.IGNORECASE)
        size = int(Decimal(match[1]) * self.UNITS[(match[2] or "").upper()]) if match else 0
        if size < 1:
            self.fail(f"{value!r} is not a size: give a number of bytes (123456) or one with a unit, "
                      f"K, M, G or T (500M, 20G, 1.5T)", param, ctx)
        return size
