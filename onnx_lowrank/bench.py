"""Benchmark a compressed model against its original with onnxruntime: ``onnx-lowrank bench``.

What a compressed model cost (accuracy of every output against the original, task accuracy with
labels) and what it bought (size, parameters, FLOPs, latency per execution provider, mobile
readiness, ARM64 outputs), callable from Python::

    from onnx_lowrank.bench import BenchConfig, bench

    result = bench("model.onnx", ["model.lowrank.onnx"], BenchConfig(inputs="data.npz", runs=50))
    print(result.format_table())
    result.report["accuracy"]["logits"]["top1_agreement"]

:class:`BenchConfig` holds one field per option of the command (defaults there);
:func:`bench` runs it and returns a :class:`BenchResult`, whose ``report`` is the JSON document
of ``--json`` with exactly these keys::

    {"models": [{"path", "params", "size_bytes", "flops", ...}, ...],
     "accuracy": {output: {"max_abs", "rel_l2", "cosine", ...}},
     "latency": {provider: {"original_ms", "compressed_ms", "ratio", "p90_original_ms",
                            "p90_compressed_ms", "flop_ratio", ...}},
     "providers": {"requested", "used", "unavailable", ...},
     "mobile": {"nnapi", "coreml", "ort_format"},
     "arm64": {"available", "status", "onnxruntime", "outputs", ...}}   # with arm64=True

``accuracy``, ``latency``, ``mobile`` and ``arm64`` compare the original with the first compressed model;
with several compressed models, each further one's entry in ``models`` carries its own
``accuracy``, ``latency``, ``mobile`` and ``arm64``. Latency is keyed by the provider that actually ran the
nodes, never by a requested provider that onnxruntime silently replaced by the CPU.

Usage errors raise :class:`~onnx_lowrank.measure.errors.InputError`, models that do not load or
run :class:`~onnx_lowrank.measure.errors.HarnessError`; failed checks (``max_error`` exceeded, a
mobile or ARM64 check) are listed in :attr:`BenchResult.failures`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from onnx_lowrank.measure import arm64 as A
from onnx_lowrank.measure.accuracy import compare_outputs, max_error
from onnx_lowrank.measure.errors import InputError, MissingFileError, one_line
from onnx_lowrank.measure.inputs import (
    GENERATED_CAUTION,
    input_specs,
    load_inputs,
    load_labels,
    make_inputs,
    normalize_inputs,
    num_samples,
    parse_int_range,
    parse_shapes,
    sample_feed,
)
from onnx_lowrank.measure.mobile import convert_to_ort, mobile_report
from onnx_lowrank.measure.sessions import create_session, provider_assignment, run_samples
from onnx_lowrank.measure.size import model_stats
from onnx_lowrank.measure.timing import interleaved_timings, summarize_timings

logger = logging.getLogger(__name__)

__all__ = [
    "BenchConfig",
    "BenchResult",
    "DEFAULT_RUNS",
    "DEFAULT_SAMPLES",
    "DEFAULT_TIME_BUDGET_S",
    "bench",
    "format_report",
]

#: Defaults when neither --runs nor --time-budget is given: 100 interleaved rounds, cut short after
#: 20 s so a large model does not hold the terminal for minutes (medians settle well before that).
DEFAULT_RUNS = 100
DEFAULT_TIME_BUDGET_S = 20.0
#: Generated samples when no --inputs: enough for stable accuracy means, cheap for small models.
DEFAULT_SAMPLES = 16
_CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class BenchConfig:
    """What ``bench`` measures and how: one field per option of ``onnx-lowrank bench``.

    Values are checked by :func:`bench` (the messages name the command-line options).

    Parameters
    ----------
    inputs : str, optional
        ``.npz`` of real inputs: one array per model input name, first axis = samples. Without
        it, ``samples`` inputs are generated from the model's input specs.
    labels : str, optional
        Class labels (one per prediction, ``.npy`` or the ``labels`` array of an ``.npz``) for task
        accuracy; default: the ``labels`` array of ``inputs`` if present.
    shape : tuple of str or mapping, optional
        Shapes of generated inputs with symbolic dimensions: ``NAME=DxD`` items as ``--shape``
        (``"input_ids=1x128"``, ``"batch=1"``), or the parsed mapping (``{"batch": 1}``).
    int_range : str or tuple of int, optional
        Range ``[LO, HI)`` of generated integer inputs such as token ids, ``"LO:HI"`` or a pair;
        default :data:`~onnx_lowrank.measure.inputs.DEFAULT_INT_RANGE`.
    samples : int, optional
        Number of samples: generated (default :data:`DEFAULT_SAMPLES`), or the first ones of
        ``inputs`` (default all).
    seed : int
        Seed of generated inputs.
    runs : int, optional
        Timed rounds, each running every model once, interleaved; 0 skips latency. With neither
        ``runs`` nor ``time_budget``: :data:`DEFAULT_RUNS` rounds, at most
        :data:`DEFAULT_TIME_BUDGET_S` seconds.
    time_budget : float, optional
        Seconds spent in timed rounds per provider.
    warmup : int
        Untimed rounds first.
    threads : int
        onnxruntime intra-op threads; 1 because multi-thread timings on shared machines are noise.
    opt_level : {"disable", "basic", "extended", "all"}
        onnxruntime graph optimization level.
    providers : tuple of str
        Execution providers to time (a comma-separated string is split); an unavailable one is
        reported, never timed under its name.
    mobile : bool
        NNAPI/CoreML usability, conversion to ORT format (arm) and its required operators.
    arm64 : bool
        Also run the models (and their ``.ort`` files with ``mobile``) on onnxruntime's ARM64 CPU
        build under qemu-user and compare them with x86 (see :mod:`onnx_lowrank.measure.arm64`).
    arm64_cache : str, optional
        The runtime prepared by ``onnx-lowrank arm64-setup`` (default
        :func:`onnx_lowrank.measure.arm64_setup.default_cache`).
    arm64_samples : int
        Samples run under emulation (each costs an emulated run).
    max_error : float, optional
        A failure when any output's ``rel_l2`` (``mean_abs`` for near-zero outputs) exceeds it.
    """

    inputs: str | None = None
    labels: str | None = None
    shape: tuple[str, ...] | Mapping[str, Sequence[int] | int] = ()
    int_range: str | tuple[int, int] | None = None
    samples: int | None = None
    seed: int = 0
    runs: int | None = None
    time_budget: float | None = None
    warmup: int = 5
    threads: int = 1
    opt_level: str = "all"
    providers: tuple[str, ...] = (_CPU,)
    mobile: bool = False
    arm64: bool = False
    arm64_cache: str | None = None
    arm64_samples: int = A.DEFAULT_SAMPLES
    max_error: float | None = None

    def __post_init__(self) -> None:
        # Accept lists and "A,B" strings from callers but store tuples, as LowRankConfig does.
        if isinstance(self.providers, str):
            object.__setattr__(self, "providers", tuple(p.strip() for p in self.providers.split(",")))
        else:
            object.__setattr__(self, "providers", tuple(self.providers))
        if isinstance(self.shape, str):
            object.__setattr__(self, "shape", (self.shape,))
        elif not isinstance(self.shape, Mapping):
            object.__setattr__(self, "shape", tuple(self.shape))


@dataclass
class BenchResult:
    """What :func:`bench` measured.

    Attributes
    ----------
    report : dict
        The JSON document (see the module docstring).
    failures : list of str
        Checks that failed (``onnx-lowrank bench`` exits 1 when not empty).
    meta : dict
        ``source`` (where the samples came from), ``onnxruntime``, ``threads``, ``opt_level``,
        ``labels``.
    paths : list of str
        The original model, then the compressed ones.
    accuracy_by_model, latency_by_model, mobile_by_model, arm64_by_model : list of dict
        Per compressed model (the first of each is also in ``report``).
    raw_times : dict
        Provider -> per-model lists of timed seconds (for plots).
    """

    report: dict[str, Any]
    failures: list[str]
    meta: dict[str, Any]
    paths: list[str]
    accuracy_by_model: list[dict[str, Any]] = field(default_factory=list)
    latency_by_model: list[dict[str, Any]] = field(default_factory=list)
    mobile_by_model: list[dict[str, Any]] = field(default_factory=list)
    arm64_by_model: list[dict[str, Any]] = field(default_factory=list)
    raw_times: dict[str, list[list[float]]] = field(default_factory=dict)

    @property
    def compressed(self) -> list[str]:
        """Paths of the compressed models."""
        return self.paths[1:]

    def format_table(self) -> str:
        """The readable tables ``onnx-lowrank bench`` prints (see :func:`format_report`)."""
        return format_report(self.report, meta=self.meta, compressed=self.compressed,
                             accuracy_by_model=self.accuracy_by_model, latency_by_model=self.latency_by_model,
                             mobile_by_model=self.mobile_by_model, arm64_by_model=self.arm64_by_model)

    def to_json(self) -> str:
        """The report as JSON text (non-finite numbers as ``null``), as ``--json`` writes it."""
        return json.dumps(_jsonable(self.report), indent=2, allow_nan=False)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Draw latency distributions and accuracy to a PNG file (needs matplotlib).

        Raises
        ------
        InputError
            The file cannot be written.
        """
        _plot(os.fspath(path), self.paths, self.raw_times, self.accuracy_by_model)


# --------------------------------------------------------------------------------------------


def _check_config(original: str, compressed: Sequence[str], config: BenchConfig) -> list[str]:
    for path in [original, *compressed]:
        if not os.path.isfile(path):
            raise MissingFileError(f"model file not found: {path}")
    for opt, path in (("--inputs", config.inputs), ("--labels", config.labels)):
        if path is not None and not os.path.isfile(path):
            raise MissingFileError(f"{opt} file not found: {path}")
    if config.threads < 1:
        raise InputError(f"--threads must be >= 1, got {config.threads}")
    if config.runs is not None and config.runs < 0:
        raise InputError(f"--runs must be >= 0, got {config.runs}")
    if config.time_budget is not None and config.time_budget <= 0:
        raise InputError(f"--time-budget must be > 0, got {config.time_budget}")
    if config.warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {config.warmup}")
    if config.samples is not None and config.samples < 1:
        raise InputError(f"--samples must be >= 1, got {config.samples}")
    if config.arm64_samples < 1:
        raise InputError(f"--arm64-samples must be >= 1, got {config.arm64_samples}")
    providers = [p.strip() for p in config.providers if p.strip()]
    if not providers:
        raise InputError("--providers is empty; e.g. --providers CPUExecutionProvider")
    known = set(ort.get_all_providers())
    for p in providers:
        if p not in known:
            raise InputError(f"unknown execution provider {p!r} (onnxruntime knows: {', '.join(sorted(known))})")
    return list(dict.fromkeys(providers))


def _prepare_inputs(
    original: str, compressed: Sequence[str], config: BenchConfig
) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
    labels = None
    if config.inputs:
        if config.shape or config.int_range:
            logger.warning("--shape and --int-range are ignored with --inputs")
        inputs = load_inputs(config.inputs, original)
        with np.load(config.inputs, allow_pickle=False) as data:
            has_labels = "labels" in data.files
        if has_labels and not config.labels:
            labels = load_labels(config.inputs)
        source = f"{num_samples(inputs)} samples from {os.path.basename(config.inputs)}"
    else:
        shapes = dict(config.shape) if isinstance(config.shape, Mapping) else parse_shapes(config.shape)
        int_range = parse_int_range(config.int_range) if isinstance(config.int_range, str) else config.int_range
        n = config.samples or DEFAULT_SAMPLES
        inputs = make_inputs(original, shapes=shapes, int_range=int_range, samples=n, seed=config.seed)
        source = f"{n} generated samples (seed {config.seed}; {GENERATED_CAUTION})"
    if config.labels:
        labels = load_labels(config.labels)
    total = num_samples(inputs)
    if config.inputs and config.samples is not None and config.samples < total:
        inputs = {k: v[: config.samples] for k, v in inputs.items()}
        source = f"{config.samples} of {total} samples from {os.path.basename(config.inputs)}"
        if labels is not None and labels.size % total == 0:
            labels = labels[: config.samples * (labels.size // total)]
    for path in compressed:
        normalize_inputs(inputs, input_specs(path), source=f"inputs for {path}")
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


def bench(
    original: str | os.PathLike[str],
    compressed: Sequence[str | os.PathLike[str]] = (),
    config: BenchConfig | None = None,
    *,
    progress: bool = False,
) -> BenchResult:
    """Measure what compressing ``original`` into each of ``compressed`` cost and bought.

    Every model runs on the same samples (``config.inputs``, or generated ones); accuracy compares
    each compressed model's outputs with the original's, latency interleaves the runs of all
    models (A B A B ...), per requested execution provider.

    Parameters
    ----------
    original : path-like
        The reference ``.onnx`` model.
    compressed : sequence of path-like
        Compressed models to compare with it (none: the original alone is measured).
    config : BenchConfig, optional
        What to measure (default ``BenchConfig()``).
    progress : bool, default False
        Show a progress bar of the timed rounds on stderr.

    Returns
    -------
    BenchResult
        ``report`` is the JSON document; ``failures`` the checks that failed.

    Raises
    ------
    onnx_lowrank.measure.errors.InputError
        Usage errors: a missing file, inputs that do not fit a model, an impossible option.
    onnx_lowrank.measure.errors.HarnessError
        A model that does not load or run.

    Examples
    --------
    >>> result = bench("model.onnx", ["model.lowrank.onnx"], BenchConfig(shape=("batch=1",)))  # doctest: +SKIP
    >>> result.report["latency"]["CPUExecutionProvider"]["ratio"]  # doctest: +SKIP
    """
    config = config if config is not None else BenchConfig()
    original = os.fspath(original)
    compressed = [os.fspath(p) for p in compressed]
    providers = _check_config(original, compressed, config)
    paths = [original, *compressed]
    inputs, labels, source = _prepare_inputs(original, compressed, config)
    sample_shapes = {k: tuple(v.shape[1:]) for k, v in inputs.items()}

    models = []
    for i, path in enumerate(paths):
        stats = model_stats(path, sample_shapes)
        stats["role"] = "original" if i == 0 else "compressed"
        models.append(stats)

    if config.runs == 0:
        runs, budget = None, None
    elif config.runs is None and config.time_budget is None:
        runs, budget = DEFAULT_RUNS, DEFAULT_TIME_BUDGET_S
    else:
        runs, budget = config.runs, config.time_budget

    available = ort.get_available_providers()
    unavailable: list[str] = []
    idle: list[str] = []
    used: list[str] = []
    latency_by_model: list[dict[str, Any]] = [{} for _ in compressed]
    orig_latency: dict[str, Any] = {}
    raw_times: dict[str, list[list[float]]] = {}
    requested_as: dict[str, list[str]] = {}
    accuracy_by_model: list[dict[str, Any]] = []
    x86_outputs: list[dict[str, list[Any]]] | None = None  # per model, of the first provider's run
    feeds = [sample_feed(inputs, i) for i in range(num_samples(inputs))]

    for p in providers:
        sessions = [
            create_session(path, providers=[p], threads=config.threads, opt_level=config.opt_level)
            for path in paths
        ]
        registered = sessions[0].get_providers()
        counts = [provider_assignment(s) for s in sessions]
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
            outputs = [run_samples(s, inputs) for s in sessions]
            if x86_outputs is None:
                x86_outputs = outputs
            accuracy_by_model = [
                compare_outputs(outputs[0], out, labels=labels) for out in outputs[1:]
            ]
            if labels is not None and not compressed:
                compare_outputs(outputs[0], outputs[0], labels=labels)  # validates the labels

        if key in requested_as:
            requested_as[key].append(p)
        if runs is None and budget is None or key in raw_times:
            continue
        requested_as[key] = [p]
        fns = [(lambda k, s=s: s.run(None, feeds[k % len(feeds)])) for s in sessions]
        times = interleaved_timings(
            fns,
            runs=runs,
            time_budget=budget,
            warmup=config.warmup,
            progress=progress,
            description=f"latency {key}",
        )
        raw_times[key] = times
        summ = [summarize_timings(t) for t in times]
        common = {
            "runs": summ[0]["runs"],
            "warmup": config.warmup,
            "threads": config.threads,
            "opt_level": config.opt_level,
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
    if config.mobile:
        mobile_by_model = mobile_report(original, compressed, inputs)

    arm64_by_model: list[dict[str, Any]] = []
    if config.arm64:
        assert x86_outputs is not None
        arm64_by_model = _arm64(config, paths, inputs, x86_outputs)

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
    for j in range(1, len(compressed)):
        models[j + 1]["accuracy"] = accuracy_by_model[j]
        models[j + 1]["latency"] = latency_by_model[j]
        if mobile_by_model:
            models[j + 1]["mobile"] = mobile_by_model[j]
        if arm64_by_model:
            models[j + 1]["arm64"] = arm64_by_model[j]

    failures = _failures(original, compressed, config, accuracy_by_model, mobile_by_model)
    for sec in arm64_by_model:
        failures += [f"ARM64: {f}" for f in A.section_failures(sec)]
    failures = list(dict.fromkeys(failures))
    meta = {
        "source": source,
        "onnxruntime": ort.__version__,
        "threads": config.threads,
        "opt_level": config.opt_level,
        "labels": labels is not None,
    }
    return BenchResult(report=report, failures=failures, meta=meta, paths=paths,
                       accuracy_by_model=accuracy_by_model, latency_by_model=latency_by_model,
                       mobile_by_model=mobile_by_model, arm64_by_model=arm64_by_model, raw_times=raw_times)


def _arm64(
    config: BenchConfig,
    paths: Sequence[str],
    inputs: dict[str, np.ndarray],
    x86_outputs: list[dict[str, list[Any]]],
) -> list[dict[str, Any]]:
    """The ``arm64`` sections (one per compressed model); never raises for an unready runtime."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onnx_lowrank_arm64_ort_") as tmp:
        ort_models: list[str | None] | None = None
        if config.mobile:
            # the .ort files a phone would load, converted by this (x86) onnxruntime's tools
            ort_models = []
            for i, path in enumerate(paths):
                try:
                    ort_path, _ = convert_to_ort(path, os.path.join(tmp, f"model{i}"))
                    ort_models.append(str(ort_path))
                except Exception as exc:  # noqa: BLE001 - the mobile section reports the failure
                    logger.info("no .ort file of %s for ARM64: %s", path, one_line(exc))
                    ort_models.append(None)
        return A.arm64_section(
            paths[0], paths[1:], inputs, x86_outputs,
            cache=config.arm64_cache, samples=config.arm64_samples, opt_level=config.opt_level, ort_models=ort_models,
        )


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def _failures(
    original: str,
    compressed: Sequence[str],
    config: BenchConfig,
    accuracy_by_model: list[dict[str, Any]],
    mobile_by_model: list[dict[str, Any]],
) -> list[str]:
    failures = []
    for path, acc in zip(compressed, accuracy_by_model):
        if config.max_error is not None:
            worst = max_error(acc)
            if worst > config.max_error:
                failures.append(f"{path}: error {worst:.4g} exceeds --max-error {config.max_error:g}")
    for path, mob in zip(compressed, mobile_by_model):
        ortf = mob["ort_format"]
        for role in ("original", "compressed"):
            r = ortf[role]
            name = original if role == "original" else path
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
        raise InputError(f"cannot write --plot {path}: {exc.strerror}") from exc
    finally:
        plt.close(fig)
