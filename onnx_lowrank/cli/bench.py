"""The ``bench`` subcommand: ``onnx-lowrank bench ORIGINAL [COMPRESSED ...]``.

Parses the options into a :class:`~onnx_lowrank.bench.BenchConfig` (whose defaults the options
take), runs :func:`onnx_lowrank.bench.bench`, prints its tables on stdout and writes the JSON
(``--json``) and the plot (``--plot``).

Exit codes: 0 success; 1 a failure (a model does not run, ``--max-error`` exceeded, a mobile
check failed, a file missing); 2 a usage error. Errors are one line on stderr,
``onnx-lowrank bench: error: ...``, as for every subcommand.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

from onnx_lowrank.cli.common import print_error
from onnx_lowrank.bench import DEFAULT_RUNS, DEFAULT_SAMPLES, DEFAULT_TIME_BUDGET_S, BenchConfig, bench
from onnx_lowrank.measure.errors import HarnessError, InputError, one_line
from onnx_lowrank.measure.inputs import DEFAULT_INT_RANGE
from onnx_lowrank.measure.sessions import OPT_LEVELS

__all__ = ["add_bench_arguments", "config_from_args", "run_bench"]

#: BenchConfig's defaults, the defaults of the options named like its fields.
_D: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(BenchConfig)}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to a parser.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The ``bench`` subparser (or a standalone parser).
    """
    parser.add_argument("original", help="the reference .onnx model")
    parser.add_argument("compressed", nargs="*", help="compressed model(s) to compare with the original")
    g = parser.add_argument_group("inputs")
    g.add_argument("--inputs", default=_D["inputs"], metavar="NPZ",
                   help="real inputs: one array per model input name, first axis = samples")
    g.add_argument("--labels", default=_D["labels"], metavar="NPY",
                   help="class labels (one per prediction) for task accuracy; "
                   "default: the 'labels' array of --inputs if present")
    g.add_argument("--shape", action="append", default=list(_D["shape"]), metavar="NAME=DxD",
                   help="shape of an input with symbolic dims (input_ids=1x128), or one symbolic dim (batch=1); repeatable")
    g.add_argument("--int-range", default=_D["int_range"], metavar="LO:HI",
                   help=f"range [LO, HI) of generated integer inputs such as token ids (default {DEFAULT_INT_RANGE[0]}:{DEFAULT_INT_RANGE[1]})")
    g.add_argument("--samples", type=int, default=_D["samples"], metavar="N",
                   help=f"number of samples (default {DEFAULT_SAMPLES} generated, or all of --inputs)")
    g.add_argument("--seed", type=int, default=_D["seed"], help=f"seed of generated inputs (default {_D['seed']})")
    t = parser.add_argument_group("latency")
    t.add_argument("--runs", type=int, default=_D["runs"], metavar="N",
                   help=f"timed rounds, each running every model once, interleaved (default {DEFAULT_RUNS}, "
                   f"at most {DEFAULT_TIME_BUDGET_S:g} s); 0 skips latency")
    t.add_argument("--time-budget", type=float, default=_D["time_budget"], metavar="SECONDS",
                   help="time spent in timed rounds per provider")
    t.add_argument("--warmup", type=int, default=_D["warmup"], metavar="N",
                   help=f"untimed rounds first (default {_D['warmup']})")
    t.add_argument("--threads", type=int, default=_D["threads"], metavar="N",
                   help=f"intra-op threads (default {_D['threads']}: multi-thread timings on shared machines are noise)")
    t.add_argument("--opt-level", choices=list(OPT_LEVELS), default=_D["opt_level"],
                   help=f"onnxruntime graph optimization level (default {_D['opt_level']})")
    providers = ",".join(_D["providers"])
    t.add_argument("--providers", default=providers, metavar="A,B",
                   help=f"execution providers to time, comma-separated (default {providers}); "
                   "unavailable ones are reported, never timed under their name")
    o = parser.add_argument_group("checks and output")
    o.add_argument("--mobile", action="store_true", default=_D["mobile"],
                   help="NNAPI/CoreML usability, conversion to ORT format (arm) and its required operators")
    a = parser.add_argument_group(
        "ARM64 (emulated)",
        "Run the models on onnxruntime's ARM64 CPU build (the kernels of Android/iOS CPU execution) under "
        "qemu-user emulation and compare their outputs with x86. Prepare the runtime once with "
        "'onnx-lowrank arm64-setup'. Emulated run times are NOT reported as latency: qemu translates every "
        "ARM instruction into several x86 ones on this machine's cores and memory, so the time says nothing "
        "about a phone; only outputs and operator coverage are real.")
    a.add_argument("--arm64", action="store_true", default=_D["arm64"],
                   help="run original and compressed models (and their .ort files with --mobile) on ARM64 "
                   "onnxruntime; report ARM64 accuracy and the ARM64-vs-x86 difference of each model")
    a.add_argument("--arm64-cache", default=_D["arm64_cache"], metavar="DIR",
                   help="the runtime prepared by arm64-setup (default $ONNX_LOWRANK_ARM64_CACHE, else "
                   "~/.cache/onnx-lowrank/arm64)")
    a.add_argument("--arm64-samples", type=int, default=_D["arm64_samples"], metavar="N",
                   help=f"samples run under emulation (default {_D['arm64_samples']}; each costs an emulated run)")
    o.add_argument("--max-error", type=float, default=_D["max_error"], metavar="E",
                   help="exit 1 when any output's rel_l2 (mean_abs for near-zero outputs) exceeds E")
    o.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    o.add_argument("--plot", metavar="PATH.png", help="draw latency distributions and accuracy (needs matplotlib)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`~onnx_lowrank.bench.BenchConfig` of parsed ``bench`` options (named like its fields)."""
    return BenchConfig(**{name: getattr(args, name) for name in _D})


def _check_outputs(args: argparse.Namespace) -> None:
    """Usage errors of the files the command writes, before any model runs."""
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise InputError(f"{opt}: directory {parent} does not exist")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plot needs matplotlib: pip install onnx-lowrank[plot]") from None


def _bench(args: argparse.Namespace) -> list[str]:
    """Run the benchmark, print its tables, write the JSON and the plot; returns the failures."""
    _check_outputs(args)
    result = bench(args.original, args.compressed, config_from_args(args), progress=sys.stderr.isatty())
    print(result.format_table())
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(result.to_json() + "\n")
        except OSError as exc:
            raise InputError(f"cannot write --json {args.json}: {exc.strerror}") from exc
    if args.plot:
        result.plot(args.plot)
    return result.failures


def run_bench(args: argparse.Namespace) -> int:
    """Run the ``bench`` subcommand.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed by a parser set up with :func:`add_bench_arguments`.

    Returns
    -------
    int
        Exit code: 0 success, 1 failure, 2 usage error.
    """
    try:
        failures = _bench(args)
    except InputError as exc:
        print_error("bench", exc)
        return 2
    except HarnessError as exc:  # a model that does not run, a file that is missing
        print_error("bench", exc)
        return 1
    except KeyboardInterrupt:
        print_error("bench", "interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - a user sees one line, a developer asks for the traceback
        if logging.getLogger("onnx_lowrank").isEnabledFor(logging.DEBUG):
            raise
        print_error("bench", f"unexpected {type(exc).__name__}: {one_line(exc)}")
        return 1
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0
