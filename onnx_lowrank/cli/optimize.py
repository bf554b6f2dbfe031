"""The ``optimize`` and ``demo`` subcommands: factorize a model (or the bundled digits model), print
the per-layer table, and with ``--check`` measure the written model against its input.

The options that build a :class:`~onnx_lowrank.config.LowRankConfig` are named like its fields
(``--power-iters`` is ``power_iters``) and take their defaults from it
(:data:`~onnx_lowrank.cli.common.CONFIG_DEFAULTS`), so the help never disagrees with the library.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from onnx_lowrank.api import default_model_path, optimize
from onnx_lowrank.cli.common import (
    CONFIG_DEFAULTS,
    UsageError,
    config_kwargs,
    fraction,
    non_negative_int,
    positive_int,
)
from onnx_lowrank.core.prediction import RUINED_THRESHOLD, is_large
from onnx_lowrank.config import ALLOCATIONS, CONV_SCHEMES, DEFAULT_RATIO, LATENCY_MODES, METHODS, WHITEN_MODES, LowRankConfig
from onnx_lowrank.model_io import ModelError, check_output_path, model_file_size, save_model
from onnx_lowrank.report import Report

__all__ = [
    "CHECK_SAMPLES",
    "DEMO_TARGET_PARAMS",
    "add_config_arguments",
    "add_demo_arguments",
    "add_optimize_arguments",
    "config_from_args",
    "run_demo",
    "run_optimize",
]

#: The demo's budget when no rank policy is given: 20% of the layers' parameters, where the
#: calibrated global allocation still matches the original's accuracy and uniform ranks do not.
DEMO_TARGET_PARAMS = 0.2
#: Generated samples of ``--check`` without ``--inputs``: enough for a stable error on small
#: models, cheap on large ones.
CHECK_SAMPLES = 8

_D = CONFIG_DEFAULTS
_METHOD_HELP = {"rsi": "randomized subspace iteration", "rsvd": "no power iterations", "svd": "exact LAPACK SVD"}


def _default(name: str) -> Any:
    """The argparse default of the option for config field ``name``, in the form the user types."""
    value = _D[name]
    if name == "op_types":
        return ",".join(value)
    return list(value) if isinstance(value, tuple) else value


def _marked(text: str, name: str, choice: str | None = None) -> str:
    """``text`` followed by `` (default)`` when ``choice`` (default: ``text``) is the config's default
    of field ``name``."""
    return f"{text} (default)" if _D[name] == (text if choice is None else choice) else text


def add_config_arguments(parser: argparse.ArgumentParser, *, search: bool = False) -> None:
    """Options that build a :class:`LowRankConfig` (shared by ``optimize`` and ``demo``).

    Parameters
    ----------
    parser : argparse.ArgumentParser
    search : bool, default False
        Also add ``--max-error`` (the budget search; ``optimize`` only).
    """
    g = parser.add_argument_group(
        f"rank policy (choose one; default --ratio {DEFAULT_RATIO:g}; or --max-error with --calibration)"
    )
    policy = g.add_mutually_exclusive_group()
    policy.add_argument("--rank", type=positive_int, default=_default("rank"), metavar="K",
                        help="fixed rank K for every layer (clamped to min(m, n))")
    policy.add_argument("--ratio", type=fraction, default=_default("ratio"), metavar="F",
                        help="keep fraction F of each layer's parameters, 0 < F <= 1")
    policy.add_argument("--energy", type=fraction, default=_default("energy"), metavar="E",
                        help="keep fraction E of each layer's squared singular values, 0 < E <= 1")
    policy.add_argument("--target-params", type=fraction, default=_default("target_params"), metavar="F",
                        help="global budget: keep at most F of the candidate layers' parameters in total, ranks "
                        "allocated across layers to minimize the summed normalized (whitened) error")
    policy.add_argument("--target-flops", type=fraction, default=_default("target_flops"), metavar="F",
                        help="global budget on MACs instead of parameters (shapes from calibration data, else batch 1)")
    if search:
        g.add_argument("--max-error", type=fraction, default=_default("max_error"), metavar="E",
                       help="find the smallest global budget whose relative output error on held-out samples is "
                       "<= E (needs --calibration; held out: --validation, else the last --holdout of it); "
                       "to fail a --check instead, see --check-max-error")
    g.add_argument("--multiple-of", type=positive_int, default=_default("multiple_of"), metavar="N",
                   help="round ranks up to a multiple of N (down if up reaches break-even); default 1, 16 for Conv")
    g.add_argument("--force", action="store_true", default=_default("force"),
                   help="factorize even when the rank saves no parameters (rank clamped to min(m, n))")
    f = parser.add_argument_group("factorization")
    f.add_argument("--method", choices=METHODS, default=_default("method"),
                   help="; ".join(f"{m}: {_marked(_METHOD_HELP[m], 'method', m)}" for m in METHODS))
    f.add_argument("--power-iters", type=non_negative_int, default=_default("power_iters"), metavar="Q",
                   help=f"RSI power iterations (default {_D['power_iters']})")
    f.add_argument("--oversample", type=non_negative_int, default=_default("oversample"), metavar="P",
                   help=f"extra sketch columns (default {_D['oversample']})")
    f.add_argument("--seed", type=non_negative_int, default=_default("seed"), metavar="S",
                   help=f"random seed; same seed, same bytes (default {_D['seed']})")
    f.add_argument("--jobs", type=non_negative_int, default=_default("jobs"), metavar="N",
                   help="factorize N weights in parallel, one BLAS thread each; output identical for every N "
                   f"(default {_D['jobs']}: one per core)")
    f.add_argument("--dask", default=_default("dask"), metavar="ADDRESS",
                   help="run the factorizations as tasks on a dask.distributed cluster: a scheduler address "
                   "(tcp://host:8786) or local:N for N local worker processes; output identical to the local run "
                   "(pip install 'onnx-lowrank[distributed]')")
    f.add_argument("--conv-scheme", choices=CONV_SCHEMES, default=_default("conv_scheme"),
                   help=f"how Conv weights are factorized (default {_D['conv_scheme']})")
    d = parser.add_argument_group("calibration data (activation-aware factorization)")
    d.add_argument("--calibration", metavar="DATA.npz",
                   help="real inputs, one array per model input (first axis = samples): each layer is factorized "
                   "for its output error on them (whitening), and energies/budgets use the whitened spectra")
    d.add_argument("--whiten", choices=WHITEN_MODES, default=_default("whiten"),
                   help="full: Cholesky of the input Gram matrix (SVD-LLM); diag: per-feature scaling (ASVD); "
                   "none; auto = full when --calibration is given")
    d.add_argument("--whiten-eps", type=fraction, default=_default("whiten_eps"), metavar="EPS",
                   help=f"relative jitter of the Gram matrix, G + EPS*trace(G)/K*I (default {_D['whiten_eps']:g})")
    d.add_argument("--validation", metavar="DATA.npz",
                   help="held-out inputs for --max-error (default: the last --holdout of the calibration samples)")
    d.add_argument("--holdout", type=fraction, default=_default("holdout"), metavar="F",
                   help=f"fraction of calibration samples held out for --max-error (default {_D['holdout']:g})")
    d.add_argument("--allocation", choices=ALLOCATIONS, default=_default("allocation"),
                   help="how --target-params/--target-flops/--max-error spend the budget: "
                   f"{_marked('energy', 'allocation')} (normalized, whitened spectral energy per parameter), "
                   f"{_marked('weighted', 'allocation')} (the same, each layer weighted by its measured output "
                   "sensitivity: 2 onnxruntime probes per layer), "
                   f"{_marked('measured', 'allocation')} (each layer truncated alone to up to 7 ranks, the model's "
                   "output loss measured in onnxruntime); weighted and measured need --calibration. "
                   f"{_marked('auto', 'allocation')}: weighted with --calibration, else energy")
    d.add_argument("--latency", choices=LATENCY_MODES, default=_default("latency"),
                   help="keep layers dense when factorized they would not run faster in onnxruntime: "
                   f"model (cost model) or measure (timed once per layer shape here); default {_D['latency']}")
    t = parser.add_argument_group("which layers")
    t.add_argument("--op-types", default=_default("op_types"), metavar="LIST",
                   help=f"comma-separated op types (default {_default('op_types')})")
    t.add_argument("--include", action="append", default=_default("include"), metavar="REGEX",
                   help="only layers whose node or weight name matches (repeatable)")
    t.add_argument("--exclude", action="append", default=_default("exclude"), metavar="REGEX",
                   help="leave layers whose node or weight name matches dense (repeatable)")
    t.add_argument("--min-params", type=non_negative_int, default=_default("min_params"), metavar="N",
                   help="leave layers with fewer than N weight parameters dense")


def config_from_args(args: argparse.Namespace) -> LowRankConfig:
    """The :class:`LowRankConfig` described by parsed command-line options.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed by a parser set up with :func:`add_config_arguments`; fields without an option
        keep their defaults.

    Returns
    -------
    LowRankConfig

    Raises
    ------
    onnx_lowrank.config.ConfigError
        An impossible value or combination (exit code 2).
    """
    return LowRankConfig(**config_kwargs(args))


def add_optimize_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``optimize`` options to a parser (the subparser, or a standalone parser)."""
    parser.add_argument("input", metavar="IN", help="input .onnx model (external data next to it is read)")
    parser.add_argument("output", metavar="OUT", help="output .onnx path (never the input; written atomically)")
    add_config_arguments(parser, search=True)
    c = parser.add_argument_group("accuracy check (onnxruntime, OUT against IN)")
    c.add_argument("--check", action="store_true",
                   help="after writing OUT, run both models on the same inputs and report the error per output")
    c.add_argument("--check-max-error", type=fraction, metavar="E",
                   help="with --check: exit 1 when the worst relative L2 error of an output exceeds E (default "
                   f"{RUINED_THRESHOLD:g}, above which a model is probably ruined)")
    c.add_argument("--inputs", metavar="DATA.npz", help="with --check: real inputs, one array per model input (first axis = samples)")
    c.add_argument("--shape", action="append", default=[], metavar="NAME=DxD",
                   help="with --check and no --inputs: value of a symbolic dimension or input shape (repeatable)")
    c.add_argument("--samples", type=positive_int, default=CHECK_SAMPLES, metavar="N",
                   help=f"with --check and no --inputs: random samples (default {CHECK_SAMPLES})")
    _add_output_arguments(parser)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` options to a parser."""
    parser.add_argument("--output", metavar="OUT", help="where to write the optimized model (default: a temporary directory)")
    parser.add_argument("--data-free", action="store_true", help="do not use the bundled calibration images")
    add_config_arguments(parser)
    _add_output_arguments(parser)


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    o = parser.add_argument_group("output")
    o.add_argument("--report", metavar="PATH.json", help="write the per-layer report as JSON")
    o.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of the table")
    o.add_argument("--quiet", action="store_true",
                   help="print nothing on success (the warning about a probably ruined model is still printed)")
    o.add_argument("--verbose", "-v", action="store_true", help="log progress details (and tracebacks) on stderr")


def _optimize_to(input_path: str | Path, output: str | Path, args: argparse.Namespace) -> Report:
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


def _emit(report: Report, args: argparse.Namespace, extra: dict[str, Any] | None = None) -> None:
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


def run_optimize(args: argparse.Namespace) -> int:
    """Run ``optimize`` for parsed arguments; returns the exit code (0 ok, 1 check failed, or no
    rank option given and the result predicted ruined).

    Raises
    ------
    UsageError, onnx_lowrank.config.ConfigError
        Impossible options (exit code 2).
    onnx_lowrank.model_io.ModelError
        An unreadable model or an unwritable output (exit code 1).
    """
    config_from_args(args)  # usage errors before touching any file
    try:
        check_output_path(args.output, args.input)
    except ModelError as exc:
        if "is the input model" in str(exc):
            raise UsageError(str(exc)) from None
        raise
    if args.report:
        check_output_path(args.report, args.input)
    if args.max_error is not None and not (args.calibration or args.validation):
        raise UsageError("--max-error is the target of a budget search and needs --calibration DATA.npz (the error is "
                         "measured on held-out samples); to fail --check above an error, use --check-max-error E")
    if args.check_max_error is not None and not args.check:
        raise UsageError("--check-max-error needs --check (it limits the error --check measures)")
    if args.check_max_error is not None and not args.check_max_error > 0:
        raise UsageError(f"--check-max-error must be > 0, got {args.check_max_error}")
    # No rank option at all: the default policy, which must not report success on a model it
    # predicts ruined (explicit options only warn; their output is what was asked for).
    default_policy = all(getattr(args, p, None) is None for p in _POLICY_OPTIONS)
    if args.check:
        _check_inputs_first(args)  # a bad --shape or a missing --inputs fails before OUT is written
    report = _optimize_to(args.input, args.output, args)
    extra = None
    if args.check:
        extra = {"check": _check(args)}
    _emit(report, args, extra)
    code = 0
    predicted = report.predicted_output_error
    if is_large(predicted):
        print(_ruined_warning(predicted, args, default_policy), file=sys.stderr)
        if default_policy:
            code = 1
    if extra is not None:
        worst = extra["check"]["max_rel_l2"]
        if not args.quiet and not args.json:
            print(_format_check(extra["check"]))
        limit = args.check_max_error if args.check_max_error is not None else RUINED_THRESHOLD
        if is_large(worst, limit):
            why = (f"--check-max-error {limit:g}" if args.check_max_error is not None else
                   f"{limit:g}, above which a model is probably ruined (docs/prediction.md; set --check-max-error "
                   "to choose the limit)")
            print(f"onnx-lowrank optimize: check failed: worst output error {worst:.4g} exceeds {why} "
                  f"({args.output} was written; raise the rank or loosen the limit)", file=sys.stderr)
            code = 1
    return code


#: The options that choose a rank policy; with none of them the run uses the default policy.
_POLICY_OPTIONS = ("rank", "ratio", "energy", "target_params", "target_flops", "max_error")


def _ruined_warning(predicted: float, args: argparse.Namespace, default_policy: bool) -> str:
    """The one stderr line about a model predicted ruined: what was predicted and what to do."""
    fixes = []
    if not getattr(args, "calibration", None):
        fixes.append("--calibration DATA.npz (factorize for real inputs)")
    fixes.append("a larger budget (e.g. --ratio 0.8 or --energy 0.99)")
    fixes.append("--exclude REGEX to keep the worst layers dense")
    line = (f"onnx-lowrank optimize: warning: predicted output error {predicted:.2f} > {RUINED_THRESHOLD:g}: "
            f"{args.output} is probably ruined (estimate from the layers' errors, see docs/prediction.md); "
            f"try {', or '.join(fixes)}")
    if default_policy:
        line += (f"; exit code 1 because this is the default policy (--ratio {DEFAULT_RATIO:g}); "
                 "give a rank option explicitly to accept it")
    return line


def _check_inputs_first(args: argparse.Namespace) -> None:
    """What ``--check`` will need, validated before any work or write."""
    from onnx_lowrank.measure.errors import InputError, MissingFileError
    from onnx_lowrank.measure.inputs import check_shapes, parse_shapes

    if args.inputs:
        if not Path(args.inputs).is_file():
            raise ModelError(f"--inputs file not found: {args.inputs}")
        return
    try:
        check_shapes(args.input, parse_shapes(args.shape) or None)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    except MissingFileError as exc:
        raise ModelError(str(exc)) from None


def _check(args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy of OUT against IN on real (``--inputs``) or generated inputs."""
    from onnx_lowrank.measure.accuracy import compare_models, max_error
    from onnx_lowrank.measure.errors import HarnessError, InputError
    from onnx_lowrank.measure.inputs import GENERATED_CAUTION, load_inputs, make_inputs, num_samples, parse_shapes

    try:
        if args.inputs:
            inputs = load_inputs(args.inputs, args.input)
        else:
            inputs = make_inputs(args.input, shapes=parse_shapes(args.shape) or None,
                                 samples=args.samples, seed=args.seed)
        accuracy = compare_models(args.input, args.output, inputs)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    except HarnessError as exc:
        raise ModelError(str(exc)) from None
    return {
        "inputs": (f"{num_samples(inputs)} real samples from {args.inputs}" if args.inputs else
                   f"{args.samples} generated samples (seed {args.seed}; {GENERATED_CAUTION})"),
        "accuracy": accuracy,
        "max_rel_l2": max_error(accuracy),
        "max_error": args.check_max_error,
    }


def _format_check(check: dict[str, Any]) -> str:
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
        verdict += f"--check-max-error {check['max_error']:g}"
    lines.append("  " + verdict)
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    """Run ``demo`` for parsed arguments; returns the exit code."""
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


def _heldout_accuracy(model: Any, pixels: Any, labels: Any) -> float:
    import numpy as np
    import onnxruntime as ort

    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))
