"""What every subcommand of ``onnx-lowrank`` shares: the parser class, usage errors, argument types,
the defaults of :class:`~onnx_lowrank.config.LowRankConfig`, and one-line error printing.

Exit codes: 0 success, 1 failure (bad model file, check failed, internal error), 2 usage error
(impossible option, output equal to input).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable, NoReturn

from onnx_lowrank.config import LowRankConfig

__all__ = [
    "CONFIG_DEFAULTS",
    "Parser",
    "UsageError",
    "comma_list",
    "config_kwargs",
    "fraction",
    "non_negative_int",
    "positive_int",
    "print_error",
]


class UsageError(Exception):
    """A bad combination of arguments: exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--rank``, ``--samples``, ``--multiple-of``)."""
    return _int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0, for options where 0 means something (``--jobs 0``: one per
    core, ``--power-iters 0``: plain randomized SVD, ``--seed 0``)."""
    return _int(text, 0)


def fraction(text: str) -> float:
    """argparse type: a number (ranges are checked by the config, whose messages say why)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def comma_list(text: str) -> tuple[str, ...]:
    """``"MatMul, Gemm"`` -> ``("MatMul", "Gemm")``: the items of a comma-separated option."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


#: LowRankConfig's field defaults, the single source of the CLI's defaults and of their help text.
CONFIG_DEFAULTS: dict[str, Any] = {f.name: _field_default(f) for f in dataclasses.fields(LowRankConfig)}

# Options whose parsed value is not yet the config's type; every other option whose dest is a
# LowRankConfig field name is passed as is.
_CONFIG_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "op_types": lambda v: comma_list(v) if isinstance(v, str) else tuple(v),
    "include": tuple,
    "exclude": tuple,
}


def config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`LowRankConfig` keyword arguments held by parsed options.

    Options are named like the config's fields (``--power-iters`` has dest ``power_iters``);
    fields a subcommand has no option for are left out, so they keep the config's defaults.

    Parameters
    ----------
    args : argparse.Namespace

    Returns
    -------
    dict
        Field name -> value, converted to the field's type.
    """
    out: dict[str, Any] = {}
    for name in CONFIG_DEFAULTS:
        if hasattr(args, name):
            value = getattr(args, name)
            convert = _CONFIG_CONVERTERS.get(name)
            out[name] = convert(value) if convert is not None and value is not None else value
    return out


def print_error(command: str, message: object) -> None:
    """The one-line error of a subcommand on stderr: ``onnx-lowrank COMMAND: error: MESSAGE``."""
    print(f"onnx-lowrank {command}: error: {message}", file=sys.stderr)
