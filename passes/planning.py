"""Deciding ranks before anything is rewritten: whitening, per-layer or global ranks, latency.

The driver hands over the candidates (nodes with a matrix view); this module attaches the
calibration whiteners, estimates each node's MACs, applies the rank policy (a per-layer policy,
or one global budget allocated across layers) and the latency guard, and returns the rank of
each candidate or the reason it stays dense.

What needs a runtime comes in through :class:`PassState` as plain data or callables that the
workflow layer (:mod:`onnx_lowrank.api`) fills in: the activation statistics of the calibration
inputs (``statistics``) and measured latency ratios (``latency_ratio``). This module imports no
onnxruntime, so the pass runs where only onnx is installed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import onnx

from onnx_lowrank.config import LowRankConfig
from onnx_lowrank.core.allocation import AllocationLayer, allocate
from onnx_lowrank.core.latency_model import predicted_ratio
from onnx_lowrank.core.ranks import break_even_rank, select_rank
from onnx_lowrank.core.whitening import make_whitener
from onnx_lowrank.flops import count_flops, tensor_shapes
from onnx_lowrank.report import LayerResult
from onnx_lowrank.statistics import CalibrationStats

from .graph import Candidate, NonFiniteWeight, unique_labels

__all__ = [
    "PassState", "StatisticsCollector", "LatencyRatio", "attach_whiteners", "estimate_macs", "choose_ranks",
    "latency_guard", "join_notes",
]

logger = logging.getLogger(__name__)


class StatisticsCollector(Protocol):
    """Runs the model on calibration inputs and returns the Gram matrices the candidates ask for.

    ``requests`` are candidates (their ``activation``, ``feature_key`` and ``features``); the
    workflow layer passes :func:`onnx_lowrank.measure.calibration.collect_grams`.
    """

    def __call__(self, model: onnx.ModelProto, requests: Sequence[Any], inputs: Mapping[str, np.ndarray], *,
                 progress: bool = False, base_dir: str | None = None) -> CalibrationStats: ...


#: ``(m, n, rank, rows) -> time ratio`` of the factorized form over the dense one, measured
#: (``--latency measure``): :func:`onnx_lowrank.measure.latency.measured_ratio`.
LatencyRatio = Callable[[int, int, int, int], float]


@dataclass
class PassState:
    """Work reused across runs of the pass on one model (the ``max_error`` search runs it often).

    ``stats`` holds the calibration Gram matrices; ``factors`` the factorization of each shared
    weight at the largest rank computed so far, from which lower ranks are sliced (the factors
    are ordered by singular value, so the first ``r`` components are the rank-``r`` truncation).
    With ``prefactorize`` every weight is factorized once just below its break-even rank.
    """

    stats: CalibrationStats | None = None
    factors: dict[Any, Any] = field(default_factory=dict)
    prefactorize: bool = False
    macs: dict[str, int] | None = None
    shapes: dict[str, list[int | None]] | None = None
    whiteners: dict[Any, Any] = field(default_factory=dict)
    #: Measured output sensitivity per node label (``--allocation weighted``), or ``None``.
    layer_weights: dict[str, float] | None = None
    #: Directory of a model whose external data was not loaded (read weight by weight).
    base_dir: str | None = None
    #: Time per stage of the pass (plan, factorize, rewrite), summed over runs.
    seconds: dict[str, float] = field(default_factory=dict)
    #: How to get activation statistics the state does not hold yet (calibration runs); filled
    #: in by the workflow layer, which owns the runtime. ``None``: calibration data is refused.
    statistics: StatisticsCollector | None = None
    #: Measured latency ratio for ``--latency measure``; ``None`` falls back to the cost model.
    latency_ratio: LatencyRatio | None = None
    #: Runs the factorization jobs (``onnx_lowrank.distributed`` hands in a dask cluster's);
    #: ``None``: local threads (:func:`onnx_lowrank.passes.jobs.run_local`).
    executor: Any = None


Selected = list[tuple[Candidate, int, LayerResult]]


def attach_whiteners(
    model: onnx.ModelProto,
    active: Sequence[tuple[LayerResult, Candidate]],
    config: LowRankConfig,
    calibration: Mapping[str, np.ndarray] | None,
    state: PassState,
    *,
    progress: bool = False,
) -> None:
    """Give every candidate the whitener of its (shared) weight's inputs, from calibration data."""
    mode = config.whiten
    if calibration is None or mode == "none":
        return
    mode = "full" if mode == "auto" else mode
    supported = [(row, cand) for row, cand in active if cand.activation is not None]
    for row, cand in active:
        if cand.activation is None:
            cand.note = join_notes(cand.note, "no calibration whitening for this layer type: factorized data-free")
    if not supported:
        return
    have = state.stats.grams if state.stats is not None else {}
    missing = [c for _, c in supported if (c.activation, c.feature_key) not in have]
    if missing:  # one onnxruntime pass for every layer input not seen yet (usually all, once)
        if state.statistics is None:
            raise ValueError("calibration data needs PassState.statistics (e.g. "
                             "onnx_lowrank.measure.calibration.collect_grams) to measure the layer inputs")
        stats = state.statistics(model, missing, calibration, progress=progress, base_dir=state.base_dir)
        if state.stats is None:
            state.stats = stats
        else:
            state.stats.grams.update(stats.grams)
            state.stats.rows.update(stats.rows)
            state.stats.seconds += stats.seconds
    groups: dict[Any, list[Candidate]] = defaultdict(list)
    for _, cand in supported:
        groups[cand.share_key].append(cand)
    thin: list[str] = []  # layers whose whitener is new in this run: warned about once per state
    for members in groups.values():
        # Nodes sharing a weight share its factors: the output error to minimize is the sum of
        # theirs, whose Gram matrix is the sum of their Gram matrices.
        cache_key = (members[0].share_key, mode, config.whiten_eps)
        keys = {(c.activation, c.feature_key) for c in members}
        whitener = state.whiteners.get(cache_key)
        new = whitener is None
        if new:
            gram = sum(state.stats.grams[k] for k in keys)
            whitener = state.whiteners[cache_key] = make_whitener(gram, mode, eps=config.whiten_eps)
        rows = sum(state.stats.rows.get(k, 0) for k in keys)
        features = members[0].input_dim
        for cand in members:
            cand.set_whitener(whitener)
            if whitener.fallback:
                cand.note = join_notes(cand.note, f"not whitened: {whitener.fallback}")
            elif mode == "full" and rows < features:
                # The Gram matrix has rank <= rows: the whitening sees only that many input
                # directions, and its error on the calibration data flatters the layer (measured on
                # EfficientNet-Lite0's classifier: 0.0002 on the calibration crops, 0.42 on others).
                cand.note = join_notes(cand.note, f"calibration gave {rows} input rows for {features} features: "
                                                  "its whitened error is optimistic; give more samples")
                if new:
                    thin.append(cand.label)
    if thin:
        logger.warning("%d layer(s) got fewer calibration rows than input features (e.g. %s): whitening may not "
                       "carry over to other inputs; give more calibration samples", len(thin), thin[0])


def estimate_macs(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None
) -> tuple[dict[str, int], dict[str, list[int | None]]]:
    """MACs of each MatMul/Gemm/Conv node (by label), and every tensor's inferred shape.

    Symbolic dimensions the caller does not fix are taken as 1, which is what a batch-1
    deployment runs; nodes whose shapes stay unknown are absent.
    """
    labels = unique_labels(model.graph)
    try:  # one shape inference serves the MAC counts and the convs' intermediate shapes
        shapes = tensor_shapes(model, _concrete_input_shapes(model, input_shapes))
        report = count_flops(model, known_shapes=shapes)
    except Exception as exc:  # shape inference is best effort: MACs are informative only
        logger.info("MAC estimate unavailable: %s", exc)
        return {}, {}
    return {labels[n.index]: int(n.macs) for n in report.nodes if n.macs is not None}, shapes


def _concrete_input_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None
) -> dict[str, list[int]]:
    shapes = {k: list(v) for k, v in (input_shapes or {}).items()}
    initializers = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in shapes or inp.name in initializers or not inp.type.HasField("tensor_type"):
            continue
        dims = inp.type.tensor_type.shape.dim
        shapes[inp.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims]
    return shapes


def choose_ranks(
    active: Sequence[tuple[LayerResult, Candidate]],
    config: LowRankConfig,
    weights: Mapping[str, float] | None = None,
) -> Selected:
    """Ranks of the candidates by the configured policy; rows of dense layers get the reason.

    ``weights`` (node label -> factor) scale each layer's normalized energies in a global
    allocation: the measured output sensitivity of ``--allocation weighted``.
    """
    policy, value = config.policy
    if policy in ("target_params", "target_flops"):
        return _global_ranks(active, config, policy, float(value), weights)
    selected: Selected = []
    for row, cand in active:
        try:
            choice = select_rank(
                config,
                params_before=cand.params_before,
                max_rank=cand.max_rank,
                factored_params=cand.factored_params,
                spectrum=cand.spectrum,
                default_multiple_of=cand.default_multiple_of,
            )
        except NonFiniteWeight as exc:  # read from disk for its spectrum, and found bad
            row.reason = str(exc)
            continue
        row.break_even_rank = choice.break_even
        row.note = join_notes(row.note, choice.note)
        if choice.rank is None:
            row.reason = choice.reason
        else:
            selected.append((cand, choice.rank, row))
    return selected


def _global_ranks(
    active: Sequence[tuple[LayerResult, Candidate]],
    config: LowRankConfig,
    policy: str,
    fraction: float,
    weights: Mapping[str, float] | None = None,
) -> Selected:
    # A layer without a measurement (none expected) counts like the median measured one.
    fallback = float(np.median(list(weights.values()))) if weights else 1.0
    groups: dict[Any, list[tuple[LayerResult, Candidate]]] = defaultdict(list)
    for row, cand in active:
        groups[cand.share_key].append((row, cand))
    layers: list[AllocationLayer] = []
    dense_total = 0.0
    for key, members in groups.items():
        cand = members[0][1]
        be = break_even_rank(cand.params_before, cand.factored_params, cand.max_rank)
        for row, _ in members:
            row.break_even_rank = be
        if policy == "target_flops":
            # MACs scale with parameters at fixed rows per inference: cost = params x rows.
            known = [r.macs_before / r.params_before for r, _ in members if r.macs_before and r.params_before]
            rows = float(sum(known)) if len(known) == len(members) else float(len(members))
            if len(known) != len(members):
                for row, _ in members:
                    row.note = join_notes(row.note, "MACs unknown (shapes unresolved): budgeted by parameters")
        else:
            rows = 1.0  # a shared weight is stored once
        dense = cand.params_before * rows
        if be < 2:
            for row, _ in members:
                row.reason = f"unprofitable at any rank (break-even {be})"
            dense_total += dense
            continue
        try:
            sigma, total = cand.spectrum(be)
        except NonFiniteWeight as exc:  # read from disk for its spectrum, and found bad: not a candidate
            for row, _ in members:
                row.reason = str(exc)
            continue
        dense_total += dense
        energies = np.asarray(sigma, dtype=np.float64) ** 2
        layers.append(AllocationLayer(
            key=key, energies=energies, total_energy=total,
            cost=(lambda r, c=cand, k=rows: c.factored_params(r) * k), dense_cost=dense, break_even=be,
            # Measured output sensitivity (``--allocation weighted``): the layer's normalized
            # error counted in units of the model's squared output error.
            weight=weights.get(members[0][0].node, fallback) if weights else 1.0,
        ))
    budget = fraction * dense_total
    # Layers that cannot gain stay dense and use their full cost from the budget.
    fixed = dense_total - sum(layer.dense_cost for layer in layers)
    result = allocate(layers, budget - fixed)
    unit = "MACs" if policy == "target_flops" else "parameters"
    logger.info("global allocation: %.4g of %.4g %s, total normalized error %.4g",
                result.used + fixed, dense_total, unit, result.total_error)
    if not result.reachable:
        logger.warning("budget %g of the %s is below rank 1 everywhere: using rank 1", fraction, unit)
    selected: Selected = []
    for key, members in groups.items():
        if key not in result.ranks:
            continue
        rank = result.ranks[key]
        for row, cand in members:
            if rank is None:
                row.reason = (f"kept dense by the global {unit} budget {fraction:g}: the budget is better spent "
                              f"keeping it whole than at a rank below its break-even {row.break_even_rank}")
            else:
                selected.append((cand, rank, row))
    return selected


def latency_guard(selected: Selected, config: LowRankConfig, measured: LatencyRatio | None = None) -> Selected:
    """Drop layers whose factorized form would not run faster (``config.latency``).

    ``measured`` times a MatMul/Gemm layer's two forms (``--latency measure``); without it, and
    for convs, the cost model :func:`~onnx_lowrank.core.latency_model.predicted_ratio` decides.
    """
    if config.latency == "off":
        return selected
    kept: Selected = []
    for cand, rank, row in selected:
        m, n = cand.shape
        rows = 1
        if row.macs_before and row.params_before:
            rows = max(1, round(row.macs_before / row.params_before))
        if config.latency == "measure" and cand.op_type != "Conv" and measured is not None:
            ratio, how = measured(m, n, rank, rows), "measured"
        else:
            ratio, how = predicted_ratio(m, n, rank, rows, op=cand.op_type), "predicted"
        if ratio >= 1.0:
            row.reason = (f"slower in onnxruntime: {how} time ratio {ratio:.2f} at rank {rank} "
                          f"({rows} rows per inference)")
            continue
        row.note = join_notes(row.note, f"{how} time ratio {ratio:.2f}")
        kept.append((cand, rank, row))
    return kept


def join_notes(a: str | None, b: str | None) -> str | None:
    """Two optional report notes as one (``None`` when both are empty; repeats dropped)."""
    parts = [p for p in (a, b) if p]
    return "; ".join(dict.fromkeys(parts)) or None
