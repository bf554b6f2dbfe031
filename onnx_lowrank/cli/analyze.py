"""The ``analyze`` subcommand: ``onnx-lowrank analyze MODEL`` prints which layers are compressible.

The analysis itself is :func:`onnx_lowrank.analyze.analyze_model`; this module parses the
options, calls it, and prints the table (or writes the JSON and the plot).

Exit codes: 0 success, 1 a bad model or an unwritable output, 2 a usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from onnx_lowrank.analyze import (
    DEFAULT_ENERGIES,
    DEFAULT_EXACT_LIMIT,
    DEFAULT_RATIOS,
    analyze_model,
    format_analysis,
    plot_spectra,
    to_json,
)
from onnx_lowrank.cli.common import CONFIG_DEFAULTS, config_kwargs, print_error
from onnx_lowrank.config import CONV_SCHEMES, ConfigError, LowRankConfig
from onnx_lowrank.model_io import ModelError

__all__ = ["add_analyze_arguments", "run_analyze", "main"]


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _listed(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``onnx-lowrank analyze MODEL``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The ``analyze`` subparser (or a standalone parser).
    """
    parser.add_argument("model", metavar="MODEL", help="the .onnx model (external data next to it is read)")
    parser.add_argument("--json", metavar="PATH", help="write the analysis as JSON to PATH ('-' for stdout, "
                        "instead of the table)")
    parser.add_argument("--plot", metavar="PATH.png", help="draw the normalized spectra (needs matplotlib)")
    parser.add_argument("--exact-limit", type=int, default=DEFAULT_EXACT_LIMIT, metavar="N",
                        help=f"exact SVD when min(m, n) <= N, RSI estimate above (default {DEFAULT_EXACT_LIMIT})")
    parser.add_argument("--energies", type=_fractions, default=DEFAULT_ENERGIES, metavar="LIST",
                        help=f"energy levels to report (default {_listed(DEFAULT_ENERGIES)})")
    parser.add_argument("--ratios", type=_fractions, default=DEFAULT_RATIOS, metavar="LIST",
                        help=f"parameter ratios to report (default {_listed(DEFAULT_RATIOS)})")
    # named like LowRankConfig's fields, with its defaults: config_kwargs() builds the config
    t = parser.add_argument_group("which layers (as optimize)")
    op_types = ",".join(CONFIG_DEFAULTS["op_types"])
    t.add_argument("--op-types", default=op_types, metavar="LIST",
                   help=f"comma-separated op types (default {op_types})")
    t.add_argument("--include", action="append", default=list(CONFIG_DEFAULTS["include"]), metavar="REGEX")
    t.add_argument("--exclude", action="append", default=list(CONFIG_DEFAULTS["exclude"]), metavar="REGEX")
    t.add_argument("--min-params", type=int, default=CONFIG_DEFAULTS["min_params"], metavar="N")
    t.add_argument("--conv-scheme", choices=CONV_SCHEMES, default=CONFIG_DEFAULTS["conv_scheme"])
    t.add_argument("--multiple-of", type=int, default=CONFIG_DEFAULTS["multiple_of"], metavar="N",
                   help="rank rounding, as optimize (default 1, 16 for Conv)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log details on stderr")


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``analyze`` for parsed arguments; returns the exit code (0 ok, 1 bad model, 2 usage)."""
    try:
        config = LowRankConfig(**config_kwargs(args))
        if args.plot and Path(args.plot).suffix.lower() != ".png":
            raise ConfigError(f"--plot writes a PNG file, got {args.plot!r}")
        result = analyze_model(args.model, config, exact_limit=args.exact_limit,
                               energies=tuple(args.energies), ratios=tuple(args.ratios))
        if args.plot:
            plot_spectra(result, args.plot)
    except ConfigError as exc:
        print_error("analyze", exc)
        return 2
    except ModelError as exc:
        print_error("analyze", exc)
        return 1
    text = to_json(result)
    if args.json == "-":
        print(text)
    else:
        if args.json:
            try:
                Path(args.json).write_text(text + "\n")
            except OSError as exc:
                print_error("analyze", f"cannot write {args.json}: {exc.strerror or exc}")
                return 1
        print(format_analysis(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m onnx_lowrank.cli.analyze MODEL ...`` (the same as ``onnx-lowrank analyze``)."""
    from onnx_lowrank import analyze

    parser = argparse.ArgumentParser(prog="onnx-lowrank analyze", description=(analyze.__doc__ or "").split("\n\n")[0])
    add_analyze_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_analyze(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
