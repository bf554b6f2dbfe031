"""The ``bench`` subcommand: ``onnx-lowrank bench ORIGINAL [COMPRESSED ...]``.

What a compressed model cost (accuracy of every output against the original, task accuracy with
labels) and what it bought (size, parameters, FLOPs, latency per execution provider, mobile
readiness), as a table on stdout and optionally as JSON (``--json``) and a plot (``--plot``).

The JSON has exactly the keys of the issue::

    {"models": [{"path", "params", "size_bytes", "flops", ...}, ...],
     "accuracy": {output: {"max_abs", "rel_l2", "cosine", ...}},
     "latency": {provider: {"original_ms", "compressed_ms", "ratio", "p90_original_ms",
                            "p90_compressed_ms", "flop_ratio", ...}},
     "providers": {"requested", "used", "unavailable", ...},
     "mobile": {"nnapi", "coreml", "ort_format"},
     "arm64": {"available", "status", "onnxruntime", "outputs", ...}}   # with --arm64

``accuracy``, ``latency``, ``mobile`` and ``arm64`` compare the original with the first compressed model;
with several compressed models, each further one's entry in ``models`` carries its own
``accuracy``, ``latency``, ``mobile`` and ``arm64``. Latency is keyed by the provider that actually ran the
nodes, never by a requested provider that onnxruntime silently replaced by the CPU.

Exit codes: 0 success; 1 a failure (a model does not run, ``--max-error`` exceeded, a mobile
check failed); 2 a usage error. Errors are one line on stderr starting with ``error: ``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from onnx_lowrank.measure import arm64 as A
from onnx_lowrank.measure import harness as H

logger = logging.getLogger(__name__)

__all__ = ["add_bench_arguments", "run_bench", "format_report", "bench"]

# Defaults when neither --runs nor --time-budget is given: 100 interleaved rounds, cut short after
# 20 s so a large model does not hold the terminal for minutes (medians settle well before that).
_DEFAULT_RUNS = 100
_DEFAULT_BUDGET_S = 20.0
# Generated samples when no --inputs: enough for stable accuracy means, cheap for small models.
_DEFAULT_SAMPLES = 16
_CPU = "CPUExecutionProvider"


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
    g.add_argument("--inputs", metavar="NPZ", help="real inputs: one array per model input name, first axis = samples")
    g.add_argument("--labels", metavar="NPY", help="class labels (one per prediction) for task accuracy; "
                   "default: the 'labels' array of --inputs if present")
    g.add_argument("--shape", action="append", default=[], metavar="NAME=DxD",
                   help="shape of an input with symbolic dims (input_ids=1x128), or one symbolic dim (batch=1); repeatable")
    g.add_argument("--int-range", metavar="LO:HI",
                   help=f"range [LO, HI) of generated integer inputs such as token ids (default {H.DEFAULT_INT_RANGE[0]}:{H.DEFAULT_INT_RANGE[1]})")
    g.add_argument("--samples", type=int, metavar="N",
                   help=f"number of samples (default {_DEFAULT_SAMPLES} generated, or all of --inputs)")
    g.add_argument("--seed", type=int, default=0, help="seed of generated inputs (default 0)")
    t = parser.add_argument_group("latency")
    t.add_argument("--runs", type=int, metavar="N",
                   help=f"timed rounds, each running every model once, interleaved (default {_DEFAULT_RUNS}, "
                   f"at most {_DEFAULT_BUDGET_S:g} s); 0 skips latency")
    t.add_argument("--time-budget", type=float, metavar="SECONDS", help="time spent in timed rounds per provider")
    t.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed rounds first (default 5)")
    t.add_argument("--threads", type=int, default=1, metavar="N",
                   help="intra-op threads (default 1: multi-thread timings on shared machines are noise)")
    t.add_argument("--opt-level", choices=list(H.OPT_LEVELS), default="all",
                   help="onnxruntime graph optimization level (default all)")
    t.add_argument("--providers", default=_CPU, metavar="A,B",
                   help=f"execution providers to time, comma-separated (default {_CPU}); "
                   "unavailable ones are reported, never timed under their name")
    o = parser.add_argument_group("checks and output")
    o.add_argument("--mobile", action="store_true",
                   help="NNAPI/CoreML usability, conversion to ORT format (arm) and its required operators")
    a = parser.add_argument_group(
        "ARM64 (emulated)",
        "Run the models on onnxruntime's ARM64 CPU build (the kernels of Android/iOS CPU execution) under "
        "qemu-user emulation and compare their outputs with x86. Prepare the runtime once with "
        "'onnx-lowrank arm64-setup'. Emulated run times are NOT reported as latency: qemu translates every "
        "ARM instruction into several x86 ones on this machine's cores and memory, so the time says nothing "
        "about a phone; only outputs and operator coverage are real.")
    a.add_argument("--arm64", action="store_true",
                   help="run original and compressed models (and their .ort files with --mobile) on ARM64 "
                   "onnxruntime; report ARM64 accuracy and the ARM64-vs-x86 difference of each model")
    a.add_argument("--arm64-cache", metavar="DIR",
                   help="the runtime prepared by arm64-setup (default $ONNX_LOWRANK_ARM64_CACHE, else "
                   "~/.cache/onnx-lowrank/arm64)")
    a.add_argument("--arm64-samples", type=int, default=A.DEFAULT_SAMPLES, metavar="N",
                   help=f"samples run under emulation (default {A.DEFAULT_SAMPLES}; each costs an emulated run)")
    o.add_argument("--max-error", type=float, metavar="E",
                   help="exit 1 when any output's rel_l2 (mean_abs for near-zero outputs) exceeds E")
    o.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    o.add_argument("--plot", metavar="PATH.png", help="draw latency distributions and accuracy (needs matplotlib)")


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
        report, failures = bench(args)
    except H.InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except H.HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a user sees one line, a developer asks for the traceback
        if logging.getLogger("onnx_lowrank").isEnabledFor(logging.DEBUG):
            raise
        print(f"error: unexpected {type(exc).__name__}: {H._one_line(exc)}", file=sys.stderr)
        return 1
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> list[str]:
    for path in [args.original, *args.compressed]:
        if not os.path.isfile(path):
            raise H.InputError(f"model file not found: {path}")
    for opt, path in (("--inputs", args.inputs), ("--labels", args.labels)):
        if path is not None and not os.path.isfile(path):
            raise H.InputError(f"{opt} file not found: {path}")
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise H.InputError(f"{opt}: directory {parent} does not exist")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise H.InputError("--plot needs matplotlib: pip install onnx-lowrank[plot]") from None
    if args.threads < 1:
        raise H.InputError(f"--threads must be >= 1, got {args.threads}")
    if args.runs is not None and args.runs < 0:
        raise H.InputError(f"--runs must be >= 0, got {args.runs}")
    if args.time_budget is not None and args.time_budget <= 0:
        raise H.InputError(f"--time-budget must be > 0, got {args.time_budget}")
    if args.warmup < 0:
        raise H.InputError(f"--warmup must be >= 0, got {args.warmup}")
    if args.samples is not None and args.samples < 1:
        raise H.InputError(f"--samples must be >= 1, got {args.samples}")
    if getattr(args, "arm64_samples", 1) < 1:
        raise H.InputError(f"--arm64-samples must be >= 1, got {args.arm64_samples}")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    if not providers:
        raise H.InputError("--providers is empty; e.g. --providers CPUExecutionProvider")
    known = set(ort.get_all_providers())
    for p in providers:
        if p not in known:
            raise H.InputError(f"unknown execution provider {p!r} (onnxruntime knows: {', '.join(sorted(known))})")
    return list(dict.fromkeys(providers))


def _prepare_inputs(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    labels = None
    if args.inputs:
        if args.shape or args.int_range:
            logger.warning("--shape and --int-range are ignored with --inputs")
        inputs = H.load_inputs(args.inputs, args.original)
        with np.load(args.inputs, allow_pickle=False) as data:
            has_labels = "labels" in data.files
        if has_labels and not args.labels:
            labels = H.load_labels(args.inputs)
        source = f"{H.num_samples(inputs)} samples from {os.path.basename(args.inputs)}"
    else:
        shapes = H.parse_shapes(args.shape)
        int_range = H.parse_int_range(args.int_range)
        n = args.samples or _DEFAULT_SAMPLES
        inputs = H.make_inputs(args.original, shapes=shapes, int_range=int_range, samples=n, seed=args.seed)
        source = f"{n} generated samples (seed {args.seed})"
    if args.labels:
        labels = H.load_labels(args.labels)
    total = H.num_samples(inputs)
    if args.inputs and args.samples is not None and args.samples < total:
        inputs = {k: v[: args.samples] for k, v in inputs.items()}
        source = f"{args.samples} of {total} samples from {os.path.basename(args.inputs)}"
        if labels is not None and labels.size % total == 0:
            labels = labels[: args.samples * (labels.size // total)]
    for path in args.compressed:
        H.normalize_inputs(inputs, H.input_specs(path), source=f"inputs for {path}")
    return inputs, labels, source


def _latency_key(requested: str, counts: Sequence[dict[str, int]]) -> str:
    ran: set[str] = set()
    for c in counts:
        ran.update(p for p, n in c.items() if n != 0)
    if requested in ran:
        return requested
    if _CPU in ran or not ran:
        return _CPU
    return sorted(ran)[0]


def bench(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Run the benchmark and write/print its outputs.

    Parameters
    ----------
    args : argparse.Namespace
        See :func:`add_bench_arguments`.

    Returns
    -------
    report : dict
        The JSON report.
    failures : list of str
        Checks that failed (exit code 1 when not empty).

    Raises
    ------
    onnx_lowrank.measure.harness.InputError
        Usage errors.
    onnx_lowrank.measure.harness.HarnessError
        A model that does not load or run.
    """
    providers = _check_args(args)
    paths = [args.original, *args.compressed]
    inputs, labels, source = _prepare_inputs(args)
    sample_shapes = {k: tuple(v.shape[1:]) for k, v in inputs.items()}

    models = []
    for i, path in enumerate(paths):
        stats = H.model_stats(path, sample_shapes)
        stats["role"] = "original" if i == 0 else "compressed"
        models.append(stats)

    if args.runs == 0:
        runs, budget = None, None
    elif args.runs is None and args.time_budget is None:
        runs, budget = _DEFAULT_RUNS, _DEFAULT_BUDGET_S
    else:
        runs, budget = args.runs, args.time_budget

    available = ort.get_available_providers()
    unavailable: list[str] = []
    idle: list[str] = []
    used: list[str] = []
    latency_by_model: list[dict[str, Any]] = [{} for _ in args.compressed]
    orig_latency: dict[str, Any] = {}
    raw_times: dict[str, list[list[float]]] = {}
    requested_as: dict[str, list[str]] = {}
    accuracy_by_model: list[dict[str, Any]] = []
    x86_outputs: list[dict[str, list[Any]]] | None = None  # per model, of the first provider's run
    feeds = [H.sample_feed(inputs, i) for i in range(H.num_samples(inputs))]

    for p in providers:
        sessions = [
            H.create_session(path, providers=[p], threads=args.threads, opt_level=args.opt_level)
            for path in paths
        ]
        registered = sessions[0].get_providers()
        counts = [H.provider_assignment(s) for s in sessions]
        if p not in available or p not in registered:
            unavailable.append(p)
            logger.info("%s is not available; onnxruntime falls back to %s", p, ", ".join(registered))
        elif all(c.get(p, 0) == 0 for c in counts):
            idle.append(p)
            logger.info("%s is registered but was assigned no node; the CPU ran everything", p)
        for c in counts:
            for name, n in c.items():
                if n != 0 and name not in used:
                    used.append(name)
        key = _latency_key(p, counts)

        if not accuracy_by_model:
            outputs = [H.run_samples(s, inputs) for s in sessions]
            if x86_outputs is None:
                x86_outputs = outputs
            accuracy_by_model = [
                H.compare_outputs(outputs[0], out, labels=labels) for out in outputs[1:]
            ]
            if labels is not None and not args.compressed:
                H.compare_outputs(outputs[0], outputs[0], labels=labels)  # validates the labels


        if key in requested_as:
            requested_as[key].append(p)
        if runs is None and budget is None or key in raw_times:
            continue
        requested_as[key] = [p]
        fns = [(lambda k, s=s: s.run(None, feeds[k % len(feeds)])) for s in sessions]
        times = H.interleaved_timings(
            fns,
            runs=runs,
            time_budget=budget,
            warmup=args.warmup,
            progress=sys.stderr.isatty(),
            description=f"latency {key}",
        )
        raw_times[key] = times
        summ = [H.summarize_timings(t) for t in times]
        common = {
            "runs": summ[0]["runs"],
            "warmup": args.warmup,
            "threads": args.threads,
            "opt_level": args.opt_level,
            "requested": requested_as[key],  # every requested provider that ended up here
            "session_providers": registered,
        }
        orig_latency[key] = {"original_ms": summ[0]["median_ms"], "p90_original_ms": summ[0]["p90_ms"], **common}
        for j in range(1, len(paths)):
            ratio = summ[j]["median_ms"] / summ[0]["median_ms"] if summ[0]["median_ms"] > 0 else None
            latency_by_model[j - 1][key] = {
                "original_ms": summ[0]["median_ms"],
                "compressed_ms": summ[j]["median_ms"],
                "ratio": ratio,
                "p90_original_ms": summ[0]["p90_ms"],
                "p90_compressed_ms": summ[j]["p90_ms"],
                "flop_ratio": _ratio(models[j]["flops"], models[0]["flops"]),
                **common,
                "nodes_by_provider": {"original": counts[0], "compressed": counts[j]},
            }
        del sessions

    mobile_by_model: list[dict[str, Any]] = []
    if args.mobile:
        mobile_by_model = H.mobile_report(args.original, args.compressed, inputs)

    arm64_by_model: list[dict[str, Any]] = []
    if getattr(args, "arm64", False):
        assert x86_outputs is not None
        arm64_by_model = _arm64(args, paths, inputs, x86_outputs)

    report: dict[str, Any] = {
        "models": models,
        "accuracy": accuracy_by_model[0] if accuracy_by_model else {},
        "latency": latency_by_model[0] if latency_by_model else orig_latency,
        "providers": {
            "requested": providers,
            "available": available,
            "used": used,
            "unavailable": unavailable,
            "idle": idle,
        },
        "mobile": mobile_by_model[0] if mobile_by_model else {},
    }
    if arm64_by_model:
        report["arm64"] = arm64_by_model[0]
    for j in range(1, len(args.compressed)):
        models[j + 1]["accuracy"] = accuracy_by_model[j]
        models[j + 1]["latency"] = latency_by_model[j]
        if mobile_by_model:
            models[j + 1]["mobile"] = mobile_by_model[j]
        if arm64_by_model:
            models[j + 1]["arm64"] = arm64_by_model[j]

    failures = _failures(args, accuracy_by_model, mobile_by_model)
    for sec in arm64_by_model:
        failures += [f"ARM64: {f}" for f in A.section_failures(sec)]
    failures = list(dict.fromkeys(failures))
    meta = {
        "source": source,
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "opt_level": args.opt_level,
        "labels": labels is not None,
    }
    print(format_report(report, meta=meta, compressed=args.compressed, accuracy_by_model=accuracy_by_model,
                        latency_by_model=latency_by_model, mobile_by_model=mobile_by_model,
                        arm64_by_model=arm64_by_model))
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(_jsonable(report), f, indent=2, allow_nan=False)
                f.write("\n")
        except OSError as exc:
            raise H.InputError(f"cannot write --json {args.json}: {exc.strerror}") from exc
    if args.plot:
        _plot(args.plot, paths, raw_times, accuracy_by_model)
    return report, failures


def _arm64(
    args: argparse.Namespace,
    paths: Sequence[str],
    inputs: dict[str, np.ndarray],
    x86_outputs: list[dict[str, list[Any]]],
) -> list[dict[str, Any]]:
    """The ``arm64`` sections (one per compressed model); never raises for an unready runtime."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onnx_lowrank_arm64_ort_") as tmp:
        ort_models: list[str | None] | None = None
        if args.mobile:
            # the .ort files a phone would load, converted by this (x86) onnxruntime's tools
            ort_models = []
            for i, path in enumerate(paths):
                try:
                    ort_path, _ = H.convert_to_ort(path, os.path.join(tmp, f"model{i}"))
                    ort_models.append(str(ort_path))
                except Exception as exc:  # noqa: BLE001 - the mobile section reports the failure
                    logger.info("no .ort file of %s for ARM64: %s", path, H._one_line(exc))
                    ort_models.append(None)
        return A.arm64_section(
            paths[0], paths[1:], inputs, x86_outputs,
            cache=args.arm64_cache, samples=args.arm64_samples, opt_level=args.opt_level, ort_models=ort_models,
        )


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def _failures(
    args: argparse.Namespace, accuracy_by_model: list[dict[str, Any]], mobile_by_model: list[dict[str, Any]]
) -> list[str]:
    failures = []
    for path, acc in zip(args.compressed, accuracy_by_model):
        if args.max_error is not None:
            worst = H.max_error(acc)
            if worst > args.max_error:
                failures.append(f"{path}: error {worst:.4g} exceeds --max-error {args.max_error:g}")
    for path, mob in zip(args.compressed, mobile_by_model):
        ortf = mob["ort_format"]
        for role in ("original", "compressed"):
            r = ortf[role]
            name = args.original if role == "original" else path
            if "error" in r:
                failures.append(f"{name}: ORT format check failed: {r['error']}")
            elif not r.get("outputs_match", False):
                failures.append(f"{name}: the .ort model's outputs differ from the .onnx model's "
                                f"(max abs diff {r.get('max_abs_diff', float('nan')):.3g})")
        # Not a failure: the optimized graph of a factorized model can need a kernel the original's
        # optimized graph fused away (MatMul+Add -> Gemm), which only matters for a reduced build
        # configured from the original; the table and JSON say so.
    return list(dict.fromkeys(failures))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _fmt_num(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _fmt_flops(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def _table(rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(rows[0])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(
    report: dict[str, Any],
    *,
    meta: dict[str, Any],
    compressed: Sequence[str],
    accuracy_by_model: list[dict[str, Any]],
    latency_by_model: list[dict[str, Any]],
    mobile_by_model: list[dict[str, Any]],
    arm64_by_model: Sequence[dict[str, Any]] = (),
) -> str:
    """Render a report as readable text tables.

    Parameters
    ----------
    report : dict
        As built by :func:`bench`.
    meta : dict
        ``source``, ``onnxruntime``, ``threads``, ``opt_level``.
    compressed : sequence of str
        Paths of the compressed models.
    accuracy_by_model, latency_by_model, mobile_by_model, arm64_by_model : list of dict
        Per compressed model.

    Returns
    -------
    str
    """
    out: list[str] = []
    out.append(
        f"onnx-lowrank bench: onnxruntime {meta['onnxruntime']}, {meta['source']}, "
        f"threads {meta['threads']}, opt-level {meta['opt_level']}"
    )
    models = report["models"]
    rows = [["model", "path", "params", "size", "FLOPs", "params x", "FLOPs x"]]
    for i, m in enumerate(models):
        name = "original" if i == 0 else (f"compressed{i}" if len(models) > 2 else "compressed")
        flops = _fmt_flops(m["flops"]) + ("" if m["flops_complete"] else "*")
        rows.append([
            name, os.path.basename(m["path"]), f"{m['params']:,}", _fmt_bytes(m["size_bytes"]), flops,
            "" if i == 0 else _fmt_num(_ratio(m["params"], models[0]["params"]), ".3f"),
            "" if i == 0 else _fmt_num(_ratio(m["flops"], models[0]["flops"]), ".3f"),
        ])
    out += ["", "size", _table(rows, right={2, 3, 4, 5, 6})]
    if any(not m["flops_complete"] for m in models):
        out.append("  * some MatMul/Gemm/Conv shapes unknown; those nodes are not in the FLOP count")

    warnings_seen: list[str] = []
    for j, acc in enumerate(accuracy_by_model):
        title = "accuracy vs original" + (f" ({os.path.basename(compressed[j])})" if len(compressed) > 1 else "")
        rows = [["output", "max_abs", "mean_abs", "rel_l2", "cosine", "top1", "kl", "task acc (orig -> comp)"]]
        for name, m in acc.items():
            if "skipped" in m:
                rows.append([name, f"skipped: {m['skipped']}", "", "", "", "", "", ""])
                continue
            task = ""
            if "task_accuracy_original" in m:
                task = f"{m['task_accuracy_original']:.4f} -> {m['task_accuracy_compressed']:.4f}"
            rows.append([
                name, _fmt_num(m["max_abs"]), _fmt_num(m["mean_abs"]), _fmt_num(m["rel_l2"]),
                _fmt_num(m["cosine"], ".5f"), _fmt_num(m.get("top1_agreement"), ".4f"),
                _fmt_num(m.get("kl")), task,
            ])
            warnings_seen += m.get("warnings", [])
        out += ["", title, _table(rows)]
    for w in dict.fromkeys(warnings_seen):
        out.append(f"  warning: {w}")

    latency_sets = latency_by_model if compressed else [report["latency"]]
    for j, lat in enumerate(latency_sets):
        if not lat:
            continue
        title = "latency, ms (median / p90)" + (
            f" ({os.path.basename(compressed[j])})" if len(compressed) > 1 else ""
        )
        rows = [["provider", "original", "compressed", "ratio", "FLOP ratio", "runs"]]
        for key, e in lat.items():
            rows.append([
                key,
                f"{_fmt_num(e['original_ms'], '.3f')} / {_fmt_num(e['p90_original_ms'], '.3f')}",
                f"{_fmt_num(e.get('compressed_ms'), '.3f')} / {_fmt_num(e.get('p90_compressed_ms'), '.3f')}"
                if "compressed_ms" in e else "-",
                _fmt_num(e.get("ratio"), ".3f"),
                _fmt_num(e.get("flop_ratio"), ".3f"),
                str(e["runs"]),
            ])
        out += ["", title, _table(rows)]

    prov = report["providers"]
    out += ["", "providers"]
    out.append(f"  requested:   {', '.join(prov['requested'])}")
    out.append(f"  used:        {', '.join(prov['used']) or '-'}")
    if prov["unavailable"]:
        out.append(f"  unavailable: {', '.join(prov['unavailable'])} (onnxruntime fell back to the CPU; "
                   f"installed: {', '.join(prov['available'])})")
    if prov["idle"]:
        out.append(f"  idle:        {', '.join(prov['idle'])} (registered, but ran no node)")

    for j, mob in enumerate(mobile_by_model):
        title = "mobile" + (f" ({os.path.basename(compressed[j])})" if len(compressed) > 1 else "")
        rows = [["model", "NNAPI", "CoreML", ".ort outputs", ".ort size", "required operators"]]
        for role in ("original", "compressed"):
            o = mob["ort_format"][role]
            if "error" in o:
                ort_cell, size_cell, ops_cell = "failed", "-", o["error"][:60]
            else:
                ort_cell = ("match" if o.get("outputs_match") else "DIFFER") + f" ({_fmt_num(o.get('max_abs_diff'), '.2g')})"
                size_cell = _fmt_bytes(o.get("ort_size_bytes", 0))
                ops_cell = str(sum(len(v) for v in o.get("required_operators", {}).values())) + " types"
            rows.append([role, _fmt_usability(mob["nnapi"][role]), _fmt_usability(mob["coreml"][role]),
                         ort_cell, size_cell, ops_cell])
        out += ["", title, _table(rows, right=set())]
        new = mob["ort_format"]["new_operators"]
        out.append("  new operator types needed by the compressed model: " + (", ".join(new) if new else "none"))
        if new:
            out.append("  (a reduced onnxruntime build configured from the original lacks these kernels: "
                       "generate its config from the compressed model)")
    for j, sec in enumerate(arm64_by_model):
        out += ["", _format_arm64(sec, os.path.basename(compressed[j]) if len(compressed) > 1 else None)]
    return "\n".join(out)


def _format_arm64(sec: dict[str, Any], which: str | None) -> str:
    title = "ARM64 onnxruntime under qemu" + (f" ({which})" if which else "")
    if not sec["available"]:
        return f"{title}\n  {sec['status']}"
    rt = sec["runtime"]
    lines = [f"{title}: onnxruntime {sec['onnxruntime']} ({rt['machine']}), {sec['samples']} samples; "
             "outputs only: emulated time is not latency"]
    for m in sec["models"]:
        if not m["ran"]:
            lines.append(f"  {m['role']} does not run on ARM64: {m['error']}")
    rows = [["output", "orig ARM64-x86", "comp ARM64-x86", "comp vs orig rel_l2", "cosine", "top1"]]

    def cell(c: dict[str, Any] | None) -> str:
        if c is None:
            return "-"
        if "error" in c:
            return c["error"]
        return f"{_fmt_num(c['max_abs'], '.2g')} {'ok' if c['match'] else 'DIFFER'}"

    for name, e in sec["outputs"].items():
        acc = e.get("compressed_vs_original") or {}
        rows.append([name, cell(e["arm64_vs_x86"].get("original")), cell(e["arm64_vs_x86"].get("compressed")),
                     _fmt_num(acc.get("rel_l2")), _fmt_num(acc.get("cosine"), ".5f"),
                     _fmt_num(acc.get("top1_agreement"), ".4f")])
    lines.append(_table(rows))
    for role, r in (sec.get("ort_format") or {}).items():
        if r is None:
            continue
        if "error" in r:
            lines.append(f"  {role} .ort on ARM64: failed: {r['error'][:100]}")
        else:
            worst = max((c.get("max_abs", 0.0) for c in r["arm64_vs_x86"].values()), default=0.0)
            ok = all(c.get("match") for c in r["arm64_vs_x86"].values())
            lines.append(f"  {role} .ort on ARM64 vs .onnx on x86: max abs {worst:.2g} {'ok' if ok else 'DIFFER'}")
    return "\n".join(lines)


def _fmt_usability(u: dict[str, Any]) -> str:
    if "error" in u:
        return "check failed"
    if "mlprogram" in u:  # CoreML: show the better of the two formats
        order = {"NO": 0, "MAYBE": 1, "YES": 2}
        u = max(u["mlprogram"], u["neuralnetwork"], key=lambda d: order[d["verdict"]])
    s = f"{u['verdict']} {u['supported_nodes']}/{u['nodes']} nodes, {u['partitions']} part."
    if "verdict_with_fixed_shapes" in u:
        s += f" (fixed shapes: {u['verdict_with_fixed_shapes']})"
    return s


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------


def _plot(
    path: str,
    model_paths: Sequence[str],
    raw_times: dict[str, list[list[float]]],
    accuracy_by_model: list[dict[str, Any]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [os.path.basename(p) for p in model_paths]
    n_lat = len(raw_times)
    fig, axes = plt.subplots(1, n_lat + 1, figsize=(5 * (n_lat + 1), 4), squeeze=False)
    for ax, (key, times) in zip(axes[0], raw_times.items()):
        ax.boxplot([np.asarray(t) * 1e3 for t in times], showfliers=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=15)
        ax.set_ylabel("ms per run")
        ax.set_title(f"latency, {key}")
    ax = axes[0][-1]
    if accuracy_by_model:
        outputs = list(accuracy_by_model[0])
        width = 0.8 / len(accuracy_by_model)
        for j, acc in enumerate(accuracy_by_model):
            vals = [acc[o].get("rel_l2") or 0.0 for o in outputs]
            ax.bar(np.arange(len(outputs)) + j * width, vals, width, label=labels[j + 1])
        ax.set_xticks(np.arange(len(outputs)) + 0.4 - width / 2, outputs, rotation=15)
        ax.set_ylabel("relative L2 error")
        ax.set_title("accuracy vs original")
        ax.legend()
    else:
        ax.set_axis_off()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise H.InputError(f"cannot write --plot {path}: {exc.strerror}") from exc
    finally:
        plt.close(fig)
