"""The pass's driver: walk the graph, ask each rule, plan, run the jobs, rewrite, report.

The driver walks the top-level graph once. Each op family lives in its own rule module
(``matmul``, ``gemm``, ``conv``) that turns one node into a :class:`~.graph.Candidate` or a
:class:`~.skip.Skip`; this module applies the user's filters, hands the candidates to the
planner (:mod:`.planning`: whitening, ranks, latency), the chosen ranks to the jobs
(:mod:`.jobs`: each distinct weight factorized once, nodes sharing a weight share its factors)
and the factors to the one graph edit (:mod:`.rewrite`, on onnx-graphsurgeon).

Every MatMul/Gemm/Conv node that is not factorized gets a row with the reason, including those
inside If/Loop/Scan bodies and local functions, which are left intact.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from onnx_lowrank.config import LowRankConfig
from onnx_lowrank.report import LayerResult

from .conv import match_conv
from .gather import match_gather
from .gemm import match_gemm
from .graph import QUANTIZED_OPS, Candidate, GraphContext, subgraph_nodes, unique_labels
from .jobs import factorize_all
from .matmul import match_matmul
from .planning import PassState, attach_whiteners, choose_ranks, estimate_macs, join_notes, latency_guard
from .rewrite import apply_rewrites
from .skip import Skip

__all__ = ["apply_lowrank", "find_candidates", "MATCHERS", "FAMILIES", "Matcher"]

logger = logging.getLogger(__name__)

#: A rule: one node -> its candidate, or the reason it is left alone.
Matcher = Callable[[onnx.NodeProto, str, GraphContext, LowRankConfig], "Candidate | Skip"]

#: op type -> the rule module's matcher.
MATCHERS: dict[str, Matcher] = {"MatMul": match_matmul, "Gemm": match_gemm, "Conv": match_conv,
                                 "Gather": match_gather}

FAMILIES = tuple(MATCHERS)
#: Families of matrix products: every node of these gets a report row. A Gather gets one only
#: when it looks up rows of a constant 2-D table (an embedding), not for shape arithmetic.
_PRODUCTS = ("MatMul", "Gemm", "Conv")

# Our own output: factor initializers named "<weight>/lowrank_a|b|c[_k]". Factorizing them again
# would only stack error, so a second run leaves them alone (whatever their nodes are named).
_OWN_FACTOR = re.compile(r"/lowrank_[a-z](_\d+)?$")


def apply_lowrank(
    model: onnx.ModelProto,
    config: LowRankConfig,
    *,
    calibration: Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    state: PassState | None = None,
    fixed_ranks: Mapping[str, int | None] | None = None,
    progress: bool = False,
) -> list[LayerResult]:
    """Factorize the model's eligible weights in place.

    Parameters
    ----------
    model : onnx.ModelProto
        Modified in place (callers that must keep the original pass a copy).
    config : LowRankConfig
        Targets, rank policy and method.
    calibration : mapping of str to ndarray, optional
        ``{input name: (samples, ...)}``; enables whitening (``config.whiten``). Its activation
        statistics come from ``state.statistics`` (the workflow layer supplies the runtime).
    input_shapes : mapping, optional
        Concrete input shapes for the MAC estimates (symbolic dimensions default to 1).
    state : PassState, optional
        Reused work (Gram matrices, factorizations) across repeated runs on the same model, and
        what the workflow hands in: activation statistics, latency ratios, the job executor.
    fixed_ranks : mapping of str to int or None, optional
        Ranks decided elsewhere (the measured-sensitivity allocation), by node label; ``None``
        or a missing label keeps the layer dense. Replaces the config's rank policy.
    progress : bool
        Show progress bars on stderr.

    Returns
    -------
    list of LayerResult
        One row per MatMul/Gemm/Conv (and quantized matrix op) node, in graph order.
    """
    state = state if state is not None else PassState()
    clock = time.perf_counter()
    ctx = GraphContext(model, base_dir=state.base_dir)
    found = find_candidates(model, config, ctx=ctx)
    rows = [row for row, _ in found]
    active = [(row, cand) for row, cand in found if cand is not None]
    if not active:
        return rows

    if state.macs is None:
        state.macs, state.shapes = estimate_macs(model, input_shapes)
    for row, _ in active:
        row.macs_before = state.macs.get(row.node)
    attach_whiteners(model, active, config, calibration, state, progress=progress)
    if fixed_ranks is None:
        selected = choose_ranks(active, config, state.layer_weights)
    else:
        selected = []
        for row, cand in active:
            rank = fixed_ranks.get(row.node)
            if rank is None:
                row.reason = "kept dense by the measured-sensitivity allocation (budget better spent elsewhere)"
            else:
                selected.append((cand, rank, row))
    selected = latency_guard(selected, config, state.latency_ratio)
    clock = _tick(state, "plan", clock)  # candidates, MACs, calibration, rank choice

    rewrites = factorize_all(selected, ctx, config, cache=state.factors, prefactorize=state.prefactorize,
                             shapes=state.shapes, executor=state.executor, progress=progress)
    clock = _tick(state, "factorize", clock)
    for row, cand in active:
        row.note = join_notes(row.note, cand.note)
    if rewrites:
        apply_rewrites(model, rewrites, [cand.weight.name for cand, _, _ in selected], ctx)
    _tick(state, "rewrite", clock)
    return rows


def _tick(state: PassState, stage: str, since: float) -> float:
    now = time.perf_counter()
    state.seconds[stage] = state.seconds.get(stage, 0.0) + (now - since)
    return now


def find_candidates(
    model: onnx.ModelProto, config: LowRankConfig, *, ctx: GraphContext | None = None
) -> list[tuple[LayerResult, Candidate | None]]:
    """Every MatMul/Gemm/Conv (and quantized matrix op) node with its candidate, or the reason.

    Applies the op-type, include/exclude and min-params filters but no rank policy, so
    ``analyze`` can inspect the same layers that ``optimize`` would consider.

    Parameters
    ----------
    model : onnx.ModelProto
        Read only.
    config : LowRankConfig
        Its filters (``op_types``, ``include``, ``exclude``, ``min_params``, ``conv_scheme``).
    ctx : GraphContext, optional
        An index of ``model`` already built (with a ``base_dir`` for weights left on disk).

    Returns
    -------
    list of (LayerResult, Candidate or None)
        Rows of nodes that are left alone carry their ``reason`` and a ``None`` candidate.
    """
    ctx = ctx if ctx is not None else GraphContext(model)
    found: list[tuple[LayerResult, Candidate | None]] = []
    for node, label in zip(model.graph.node, unique_labels(model.graph)):
        if node.op_type in QUANTIZED_OPS:
            found.append((LayerResult(label, node.op_type, "skipped", reason="quantized operator: left alone"), None))
            continue
        if node.op_type not in FAMILIES or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Gather" and not _is_table_lookup(node, ctx):
            continue
        found.append(_consider(node, label, ctx, config))

    for owner, inner in subgraph_nodes(model.graph):
        if inner.op_type in _PRODUCTS:
            found.append((LayerResult(inner.name or inner.op_type, inner.op_type, "skipped",
                                      reason=f"inside the subgraph of {owner!r}: subgraphs are left intact"), None))
    for function in model.functions:
        for inner in function.node:
            if inner.op_type in _PRODUCTS:
                found.append((LayerResult(inner.name or inner.op_type, inner.op_type, "skipped",
                                          reason=f"inside local function {function.name!r}: functions are left intact"), None))
    return found


def _is_table_lookup(node: onnx.NodeProto, ctx: GraphContext) -> bool:
    """Whether a Gather reads a constant 2-D table (whose header says so; nothing is read)."""
    table = ctx.constant(node.input[0]) if node.input else None
    return table is not None and len(table.shape) == 2


def _consider(
    node: onnx.NodeProto, label: str, ctx: GraphContext, config: LowRankConfig
) -> tuple[LayerResult, Candidate | None]:
    op = node.op_type
    row = LayerResult(label, op, "skipped")
    if op not in config.op_types:
        row.reason = f"op type {op} not selected (--op-types {','.join(config.op_types)})"
        if op == "Gather":  # its size still counts in the report: half of a small transformer
            table = ctx.constant(node.input[0])
            row.weight, row.shape, row.params_before = table.name, table.shape, table.size  # type: ignore[union-attr]
        return row, None
    if any(_OWN_FACTOR.search(name) for name in node.input[:2] if name):
        row.reason = "already a low-rank factor (made by onnx-lowrank)"
        return row, None
    found = MATCHERS[op](node, label, ctx, config)
    if isinstance(found, Skip):
        row.reason = found.reason
        return row, None
    cand = found
    row.weight = cand.weight.name
    row.shape = cand.shape
    row.params_before = cand.params_before
    row.scheme = cand.scheme
    names = (label, cand.weight.name, cand.weight.source)
    if config.include and not any(re.search(p, n) for p in config.include for n in names):
        row.reason = f"not matched by --include {' '.join(config.include)}"
        return row, None
    hit = next((p for p in config.exclude for n in names if re.search(p, n)), None)
    if hit is not None:
        row.reason = f"excluded by --exclude {hit}"
        return row, None
    if cand.params_before < config.min_params:
        row.reason = f"{cand.params_before} parameters < --min-params {config.min_params}"
        return row, None
    return row, cand
