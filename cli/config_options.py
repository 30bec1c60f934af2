"""Click options made from `TrainConfig`'s fields: each option's name, help, default and
range or choices are written once, in the field's metadata (model/config.py), and checked
once, by `TrainConfig` (click only converts the text to the field's type)."""
from __future__ import annotations

import dataclasses

import click

from alexprep.model.config import DEFAULTS, FIELDS, option_name


class IntList(click.ParamType):
    """Comma-separated integers ("30,60,80") as a tuple."""

    name = "list"

    def convert(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(int(x) for x in str(value).split(",") if x.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)


def _range(meta) -> str:
    """The field's range as click shows an IntRange's: x>=1, x>0, 0<=x<1."""
    at_least, above, below = meta["at_least"], meta["above"], meta["below"]
    if below is not None:
        low = f"{at_least}<=" if at_least is not None else f"{above}<" if above is not None else ""
        return f"{low}x<{below}"
    if at_least is not None:
        return f"x>={at_least}"
    return f"x>{above}" if above is not None else ""


def config_option(name: str, default=dataclasses.MISSING, help: str | None = None):
    """The click option of TrainConfig field `name`; `default` and `help` replace the
    field's for a command whose option means a little else (evaluate's batch)."""
    field, meta = FIELDS[name], FIELDS[name].metadata
    value = getattr(DEFAULTS, name) if default is dataclasses.MISSING else default
    text = meta["help"] if help is None else help
    if field.type == "bool":
        return click.option(option_name(name), name, is_flag=True, default=value, help=text)
    kinds = {"int": int, "float": float, "str": str, "tuple[int, ...]": IntList()}
    extra = {}
    if meta["choices"]:
        extra["metavar"] = "[" + "|".join(map(str, meta["choices"])) + "]"
    elif _range(meta):
        text = f"{text} [{_range(meta)}]"
    if isinstance(value, tuple):
        value = ",".join(map(str, value))
    return click.option(option_name(name), name, type=kinds[field.type], default=value, help=text,
                        show_default=value != "", **extra)


def config_options(*names: str):
    """The options of these TrainConfig fields, in this order (all with a CLI name when none
    are named)."""
    names = names or tuple(n for n in FIELDS if option_name(n) is not None)

    def decorate(func):
        for name in reversed(names):
            func = config_option(name)(func)
        return func

    return decorate


def given_on_command_line(ctx: click.Context, names) -> set[str]:
    """Which of these parameters the user typed (not defaults): what --resume compares."""
    return {n for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE}
