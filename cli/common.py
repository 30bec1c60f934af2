"""What every command shares: bad input becomes one line and exit code 2, no traceback."""
from __future__ import annotations

import functools

import click

from alexprep.imagenet_prep.errors import DataError


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


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
