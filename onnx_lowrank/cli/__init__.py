"""The ``onnx-lowrank`` command: parse, call the library, print, return the exit code.

One module per subcommand (:mod:`~onnx_lowrank.cli.optimize` for ``optimize`` and ``demo``,
:mod:`~onnx_lowrank.cli.bench`, :mod:`~onnx_lowrank.cli.analyze`, :mod:`~onnx_lowrank.cli.arm64`
for ``arm64-setup``), what they share in :mod:`~onnx_lowrank.cli.common`; here the parser that
puts them together and :func:`main`.

Exit codes: 0 success, 1 failure (bad model file, check failed, internal error), 2 usage error
(impossible option, output equal to input). Errors are one line on stderr, never a traceback
(``--verbose`` or ``ONNX_LOWRANK_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from onnx_lowrank.version import __version__
from onnx_lowrank.cli.common import Parser, UsageError, print_error
from onnx_lowrank.cli.optimize import (
    add_demo_arguments,
    add_optimize_arguments,
    config_from_args,
    run_demo,
    run_optimize,
)
from onnx_lowrank.config import ConfigError
from onnx_lowrank.model_io import ModelError

__all__ = ["main", "build_parser", "config_from_args"]

logger = logging.getLogger("onnx_lowrank")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``onnx-lowrank`` and all its subcommands.

    Returns
    -------
    argparse.ArgumentParser
        Each subcommand's namespace carries ``func``, the function that runs it.
    """
    parser = Parser(
        prog="onnx-lowrank",
        description="Make ONNX models smaller and faster by low-rank factorization of MatMul, Gemm "
        "and Conv weights, and measure what it cost with onnxruntime.",
    )
    # Imported here, not at the top: analyze and arm64 also run as ``python -m onnx_lowrank.cli.X``,
    # which must not find them already imported by this package.
    from onnx_lowrank.cli.analyze import add_analyze_arguments, run_analyze
    from onnx_lowrank.cli.arm64 import add_arm64_setup_arguments, run_arm64_setup
    from onnx_lowrank.cli.bench import add_bench_arguments, run_bench

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    opt = sub.add_parser("optimize", help="factorize a model's weights and write the result",
                         description="Factorize the constant weights of MatMul/Gemm/Conv nodes of IN and write OUT. "
                         "Prints one row per candidate layer (rank, parameters, error, or why it was skipped).")
    add_optimize_arguments(opt)
    opt.set_defaults(func=run_optimize)

    demo = sub.add_parser("demo", help="optimize the bundled digits model and report held-out accuracy",
                          description="Run optimize on the small real model shipped with onnx-lowrank (an MLP trained "
                          "on scikit-learn's digits), calibrated on 256 bundled training images, and compare held-out "
                          "accuracy before and after, and against uniform data-free ranks at the same size. Without a "
                          "rank policy it uses --target-params 0.2.")
    add_demo_arguments(demo)
    demo.set_defaults(func=run_demo)

    bench = sub.add_parser("bench", help="compare models with onnxruntime: accuracy, latency, size, mobile readiness",
                           description="Measure what compression cost and bought: accuracy of each COMPRESSED model "
                           "against ORIGINAL, latency (interleaved runs, medians), size, FLOPs and mobile readiness.")
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)

    analyze = sub.add_parser("analyze", help="which layers are compressible: spectra, energy ranks, what --energy/--ratio would save",
                             description="One row per factorizable layer: matrix shape, parameters, break-even rank, the "
                             "ranks that keep 90/95/99%% of the spectral energy, and what --energy / --ratio would save.")
    add_analyze_arguments(analyze)
    analyze.set_defaults(func=run_analyze)

    arm = sub.add_parser("arm64-setup", help="prepare the emulated ARM64 onnxruntime (qemu-user) used by bench --arm64",
                         description="Prepare, once, a cached ARM64 runtime: qemu-user-static, an arm64 Python 3.11 "
                         "sysroot and the aarch64 wheels of onnxruntime and numpy. Idempotent; --check only reports.")
    add_arm64_setup_arguments(arm)
    arm.set_defaults(func=run_arm64_setup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``onnx-lowrank`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    verbose = getattr(args, "verbose", False) or os.environ.get("ONNX_LOWRANK_DEBUG") == "1"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UsageError) as exc:
        return _fail(args, exc, 2, verbose)
    except ModelError as exc:
        return _fail(args, exc, 1, verbose)
    except KeyboardInterrupt:
        print("onnx-lowrank: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # the promise is one line, never a traceback
        if verbose:
            raise
        print(f"onnx-lowrank {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(rerun with --verbose for the traceback and please report it)", file=sys.stderr)
        return 1


def _fail(args: argparse.Namespace, exc: Exception, code: int, verbose: bool) -> int:
    if verbose:
        logger.exception("failed")
    print_error(args.command, exc)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
