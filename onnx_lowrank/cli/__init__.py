"""The ``onnx-lowrank`` command: parse, call the library, print, return the exit code.

Exit codes: 0 success, 1 failure (bad model file, check failed, internal error), 2 usage error
(impossible option, output equal to input). Errors are one line on stderr, never a traceback
(``--verbose`` or ``ONNX_LOWRANK_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from onnx_lowrank import __version__
from onnx_lowrank.analyze import add_analyze_arguments, run_analyze
from onnx_lowrank.api import default_model_path, optimize
from onnx_lowrank.cli.arm64 import add_arm64_setup_arguments, run_arm64_setup
from onnx_lowrank.cli.bench import add_bench_arguments, run_bench
from onnx_lowrank.config import ALLOCATIONS, CONV_SCHEMES, LATENCY_MODES, METHODS, WHITEN_MODES, ConfigError, LowRankConfig
from onnx_lowrank.model_io import ModelError, check_output_path, model_file_size, save_model

__all__ = ["main", "build_parser", "config_from_args"]

logger = logging.getLogger("onnx_lowrank")


#: The demo's budget when no rank policy is given: 20% of the layers' parameters, where the
#: calibrated global allocation still matches the original's accuracy and uniform ranks do not.
DEMO_TARGET_PARAMS = 0.2


class UsageError(Exception):
    """A bad combination of arguments: exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return value


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that build a :class:`LowRankConfig` (shared by ``optimize`` and ``demo``)."""
    g = parser.add_argument_group("rank policy (choose one; default --ratio 0.5; or --max-error with --calibration)")
    policy = g.add_mutually_exclusive_group()
    policy.add_argument("--rank", type=_positive_int, metavar="K", help="fixed rank K for every layer (clamped to min(m, n))")
    policy.add_argument("--ratio", type=_fraction, metavar="F", help="keep fraction F of each layer's parameters, 0 < F <= 1")
    policy.add_argument("--energy", type=_fraction, metavar="E", help="keep fraction E of each layer's squared singular values, 0 < E <= 1")
    policy.add_argument("--target-params", type=_fraction, metavar="F",
                        help="global budget: keep at most F of the candidate layers' parameters in total, ranks "
                        "allocated across layers to minimize the summed normalized (whitened) error")
    policy.add_argument("--target-flops", type=_fraction, metavar="F",
                        help="global budget on MACs instead of parameters (shapes from calibration data, else batch 1)")
    g.add_argument("--multiple-of", type=_positive_int, metavar="N",
                   help="round ranks up to a multiple of N (down if up reaches break-even); default 1, 16 for Conv")
    g.add_argument("--force", action="store_true",
                   help="factorize even when the rank saves no parameters (rank clamped to min(m, n))")
    f = parser.add_argument_group("factorization")
    f.add_argument("--method", choices=METHODS, default="rsi",
                   help="rsi: randomized subspace iteration (default); rsvd: no power iterations; svd: exact LAPACK SVD")
    f.add_argument("--power-iters", type=_positive_int, default=2, metavar="Q", help="RSI power iterations (default 2)")
    f.add_argument("--oversample", type=_positive_int, default=10, metavar="P", help="extra sketch columns (default 10)")
    f.add_argument("--seed", type=_positive_int, default=0, metavar="S", help="random seed; same seed, same bytes (default 0)")
    f.add_argument("--jobs", type=_positive_int, default=0, metavar="N",
                   help="factorize N weights in parallel, one BLAS thread each; output identical for every N "
                   "(default 0: one per core)")
    f.add_argument("--dask", metavar="ADDRESS",
                   help="run the factorizations as tasks on a dask.distributed cluster: a scheduler address "
                   "(tcp://host:8786) or local:N for N local worker processes; output identical to the local run "
                   "(pip install 'onnx-lowrank[distributed]')")
    f.add_argument("--conv-scheme", choices=CONV_SCHEMES, default="weight-svd", help="how Conv weights are factorized (default weight-svd)")
    d = parser.add_argument_group("calibration data (activation-aware factorization)")
    d.add_argument("--calibration", metavar="DATA.npz",
                   help="real inputs, one array per model input (first axis = samples): each layer is factorized "
                   "for its output error on them (whitening), and energies/budgets use the whitened spectra")
    d.add_argument("--whiten", choices=WHITEN_MODES, default="auto",
                   help="full: Cholesky of the input Gram matrix (SVD-LLM); diag: per-feature scaling (ASVD); "
                   "none; auto = full when --calibration is given")
    d.add_argument("--whiten-eps", type=_fraction, default=1e-3, metavar="EPS",
                   help="relative jitter of the Gram matrix, G + EPS*trace(G)/K*I (default 1e-3)")
    d.add_argument("--validation", metavar="DATA.npz",
                   help="held-out inputs for --max-error (default: the last --holdout of the calibration samples)")
    d.add_argument("--holdout", type=_fraction, default=0.2, metavar="F",
                   help="fraction of calibration samples held out for --max-error (default 0.2)")
    d.add_argument("--allocation", choices=ALLOCATIONS, default="auto",
                   help="how --target-params/--target-flops/--max-error spend the budget: energy (normalized, whitened "
                   "spectral energy per parameter), weighted (the same, each layer weighted by its measured output "
                   "sensitivity: 2 onnxruntime probes per layer), measured (each layer truncated alone to up to 7 "
                   "ranks, the model's output loss measured in onnxruntime); weighted and measured need --calibration. "
                   "auto (default): weighted with --calibration, else energy")
    d.add_argument("--latency", choices=LATENCY_MODES, default="off",
                   help="keep layers dense when factorized they would not run faster in onnxruntime: "
                   "model (cost model) or measure (timed once per layer shape here); default off")
    t = parser.add_argument_group("which layers")
    t.add_argument("--op-types", default="MatMul,Gemm,Conv", metavar="LIST", help="comma-separated op types (default MatMul,Gemm,Conv)")
    t.add_argument("--include", action="append", default=[], metavar="REGEX", help="only layers whose node or weight name matches (repeatable)")
    t.add_argument("--exclude", action="append", default=[], metavar="REGEX", help="leave layers whose node or weight name matches dense (repeatable)")
    t.add_argument("--min-params", type=_positive_int, default=0, metavar="N", help="leave layers with fewer than N weight parameters dense")


def config_from_args(args: argparse.Namespace) -> LowRankConfig:
    """The :class:`LowRankConfig` described by parsed command-line options."""
    return LowRankConfig(
        method=args.method,
        rank=args.rank,
        ratio=args.ratio,
        energy=args.energy,
        power_iters=args.power_iters,
        oversample=args.oversample,
        seed=args.seed,
        force=args.force,
        multiple_of=args.multiple_of,
        min_params=args.min_params,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        op_types=tuple(t.strip() for t in args.op_types.split(",") if t.strip()),
        conv_scheme=args.conv_scheme,
        target_params=args.target_params,
        target_flops=args.target_flops,
        whiten=args.whiten,
        whiten_eps=args.whiten_eps,
        # --max-error is a search target with calibration data, and a gate of --check without.
        max_error=args.max_error if getattr(args, "calibration", None) and getattr(args, "max_error", None) else None,
        holdout=args.holdout,
        latency=args.latency,
        allocation=args.allocation,
        jobs=args.jobs,
        dask=args.dask,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-lowrank",
        description="Make ONNX models smaller and faster by low-rank factorization of MatMul, Gemm "
        "and Conv weights, and measure what it cost with onnxruntime.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    opt = sub.add_parser("optimize", help="factorize a model's weights and write the result",
                         description="Factorize the constant weights of MatMul/Gemm/Conv nodes of IN and write OUT. "
                         "Prints one row per candidate layer (rank, parameters, error, or why it was skipped).")
    opt.add_argument("input", metavar="IN", help="input .onnx model (external data next to it is read)")
    opt.add_argument("output", metavar="OUT", help="output .onnx path (never the input; written atomically)")
    add_config_arguments(opt)
    c = opt.add_argument_group("accuracy check (onnxruntime, OUT against IN)")
    c.add_argument("--check", action="store_true",
                   help="after writing OUT, run both models on the same inputs and report the error per output")
    c.add_argument("--max-error", type=_fraction, metavar="E",
                   help="with --calibration: find the smallest global budget whose relative output error on held-out "
                   "samples is <= E; with --check: exit 1 when the worst relative L2 error of an output exceeds E")
    c.add_argument("--inputs", metavar="DATA.npz", help="with --check: real inputs, one array per model input (first axis = samples)")
    c.add_argument("--shape", action="append", default=[], metavar="NAME=DxD",
                   help="with --check and no --inputs: value of a symbolic dimension or input shape (repeatable)")
    c.add_argument("--samples", type=_positive_int, default=8, metavar="N", help="with --check and no --inputs: random samples (default 8)")
    _add_output_arguments(opt)
    opt.set_defaults(func=_run_optimize)

    demo = sub.add_parser("demo", help="optimize the bundled digits model and report held-out accuracy",
                          description="Run optimize on the small real model shipped with onnx-lowrank (an MLP trained "
                          "on scikit-learn's digits), calibrated on 256 bundled training images, and compare held-out "
                          "accuracy before and after, and against uniform data-free ranks at the same size. Without a "
                          "rank policy it uses --target-params 0.2.")
    demo.add_argument("--output", metavar="OUT", help="where to write the optimized model (default: a temporary directory)")
    demo.add_argument("--data-free", action="store_true", help="do not use the bundled calibration images")
    add_config_arguments(demo)
    _add_output_arguments(demo)
    demo.set_defaults(func=_run_demo)

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


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    o = parser.add_argument_group("output")
    o.add_argument("--report", metavar="PATH.json", help="write the per-layer report as JSON")
    o.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of the table")
    o.add_argument("--quiet", action="store_true", help="print nothing on success")
    o.add_argument("--verbose", "-v", action="store_true", help="log progress details (and tracebacks) on stderr")


def _optimize_to(input_path: str | Path, output: str | Path, args: argparse.Namespace):
    config = config_from_args(args)
    progress = not args.quiet and sys.stderr.isatty()
    # The CLI always saves with the input at hand, so a model can keep its weights on disk
    # whatever its size and format (memory: about one weight at a time plus the factors); the
    # output is written like the input, with external data or as one file (streamed). Modes
    # that run the model in memory repeatedly (--max-error, the weighted and measured
    # allocations) load it.
    in_memory_modes = config.runs_model(getattr(args, "calibration", None) is not None)
    lazy = None if in_memory_modes else True
    model, report = optimize(input_path, config, calibration=getattr(args, "calibration", None),
                             validation=getattr(args, "validation", None), progress=progress, lazy=lazy)
    start = time.perf_counter()
    save_model(model, output, input_path=input_path)
    report.seconds["save"] = time.perf_counter() - start
    report.output_path = str(output)
    report.size_after = model_file_size(output)
    return report


def _emit(report, args: argparse.Namespace, extra: dict | None = None) -> None:
    data = report.to_dict()
    if extra:
        data.update(extra)
    if args.report:
        tmp = Path(args.report).with_name(f".{Path(args.report).name}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, args.report)
    if args.json:
        print(json.dumps(data, indent=2))
    elif not args.quiet:
        print(report.format_table())


def _run_optimize(args: argparse.Namespace) -> int:
    config_from_args(args)  # usage errors before touching any file
    try:
        check_output_path(args.output, args.input)
    except ModelError as exc:
        if "is the input model" in str(exc):
            raise UsageError(str(exc)) from None
        raise
    if args.report:
        check_output_path(args.report, args.input)
    if args.max_error is not None and not (args.check or args.calibration):
        raise UsageError("--max-error needs --calibration DATA.npz (search) or --check (gate)")
    if args.max_error is not None and not args.max_error > 0:
        raise UsageError(f"--max-error must be > 0, got {args.max_error}")
    report = _optimize_to(args.input, args.output, args)
    extra = None
    if args.check:
        extra = {"check": _check(args)}
    _emit(report, args, extra)
    if extra is not None:
        worst = extra["check"]["max_rel_l2"]
        if not args.quiet and not args.json:
            print(_format_check(extra["check"]))
        if args.max_error is not None and worst > args.max_error:
            print(f"onnx-lowrank optimize: check failed: worst output error {worst:.4g} exceeds --max-error "
                  f"{args.max_error:g} ({args.output} was written; raise the rank or loosen the limit)", file=sys.stderr)
            return 1
    return 0


def _check(args: argparse.Namespace) -> dict:
    """Accuracy of OUT against IN on real (``--inputs``) or generated inputs."""
    from onnx_lowrank.measure import harness

    try:
        if args.inputs:
            inputs = harness.load_inputs(args.inputs, args.input)
        else:
            inputs = harness.make_inputs(args.input, shapes=harness.parse_shapes(args.shape) or None,
                                         samples=args.samples, seed=args.seed)
        accuracy = harness.compare_models(args.input, args.output, inputs)
    except harness.InputError as exc:
        raise UsageError(str(exc)) from None
    except harness.HarnessError as exc:
        raise ModelError(str(exc)) from None
    return {
        "inputs": args.inputs or f"{args.samples} generated samples (seed {args.seed})",
        "accuracy": accuracy,
        "max_rel_l2": harness.max_error(accuracy),
        "max_error": args.max_error,
    }


def _format_check(check: dict) -> str:
    lines = [f"\ncheck against the original on {check['inputs']}:"]
    for name, m in check["accuracy"].items():
        if "skipped" in m:
            lines.append(f"  {name}: skipped ({m['skipped']})")
            continue
        parts = [f"rel_l2 {m['rel_l2']:.4g}" if m.get("rel_l2") is not None else "rel_l2 n/a",
                 f"max_abs {m['max_abs']:.4g}", f"cosine {m['cosine']:.5f}" if m.get("cosine") is not None else ""]
        if "top1_agreement" in m:
            parts.append(f"top1 agreement {m['top1_agreement']:.4f}")
        lines.append(f"  {name}: " + ", ".join(p for p in parts if p))
        lines.extend(f"  warning: {w}" for w in m.get("warnings", []))
    verdict = f"worst relative L2 error {check['max_rel_l2']:.4g}"
    if check["max_error"] is not None:
        verdict += " <= " if check["max_rel_l2"] <= check["max_error"] else " > "
        verdict += f"--max-error {check['max_error']:g}"
    lines.append("  " + verdict)
    return "\n".join(lines)


def _run_demo(args: argparse.Namespace) -> int:
    import numpy as np

    model_path = default_model_path()
    data = np.load(model_path.with_name("digits_heldout.npz"))
    if args.calibration is None and not args.data_free:
        args.calibration = str(model_path.with_name("digits_calibration.npz"))
    policies = ("rank", "ratio", "energy", "target_params", "target_flops")
    if all(getattr(args, p) is None for p in policies):
        args.target_params = DEMO_TARGET_PARAMS
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-demo-") as tmp:
        output = Path(args.output) if args.output else Path(tmp) / "digits_mlp.lowrank.onnx"
        report = _optimize_to(model_path, output, args)
        before = _heldout_accuracy(model_path, data["pixels"], data["labels"])
        after = _heldout_accuracy(output, data["pixels"], data["labels"])
        # The baseline users would try first: the same size by uniform data-free ranks.
        totals = report.totals()
        kept = (totals["candidate_params"] - totals["factorized_params_before"] + totals["factorized_params_after"]) \
            / max(totals["candidate_params"], 1)
        baseline, _ = optimize(model_path, LowRankConfig(ratio=max(min(kept, 1.0), 1e-3), seed=args.seed))
        baseline_acc = _heldout_accuracy(baseline, data["pixels"], data["labels"])
        accuracy = {"original": before, "optimized": after, "uniform_data_free_same_size": baseline_acc,
                    "kept_fraction": kept, "samples": int(len(data["labels"]))}
        _emit(report, args, {"heldout_accuracy": accuracy})
    if not args.quiet and not args.json:
        how = "calibrated on 256 bundled training images" if args.calibration else "data-free"
        print(f"\nheld-out accuracy on {len(data['labels'])} digits images ({how}, {kept:.0%} of the layers' parameters kept):")
        print(f"  original {before:.4f} -> optimized {after:.4f} ({after - before:+.4f})")
        print(f"  uniform data-free ranks at the same size (--ratio {kept:.2f}): {baseline_acc:.4f}")
        if args.output:
            print(f"optimized model written to {args.output}")
    return 0


def _heldout_accuracy(model, pixels, labels) -> float:
    import numpy as np
    import onnxruntime as ort

    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


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
        return _fail(parser, args, exc, 2, verbose)
    except ModelError as exc:
        return _fail(parser, args, exc, 1, verbose)
    except KeyboardInterrupt:
        print("onnx-lowrank: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # the promise is one line, never a traceback
        if verbose:
            raise
        print(f"onnx-lowrank {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(rerun with --verbose for the traceback and please report it)", file=sys.stderr)
        return 1


def _fail(parser: argparse.ArgumentParser, args: argparse.Namespace, exc: Exception, code: int, verbose: bool) -> int:
    if verbose:
        logger.exception("failed")
    print(f"onnx-lowrank {args.command}: error: {exc}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
