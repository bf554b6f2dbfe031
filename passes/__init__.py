"""The low-rank graph pass: find factorizable nodes, choose ranks, factorize, rewrite, clean up.

The driver walks the top-level graph once. Each op family lives in its own module
(``matmul``, ``gemm``, ``conv``) that turns one node into a :class:`~.graph.Candidate` or a
reason to leave it alone; this module applies the user's filters and rank policy, factorizes
each distinct weight once (nodes sharing a weight share its factors), splices the new nodes in
place of the old ones (so topological order holds) and removes weights nobody reads any more.

Every MatMul/Gemm/Conv node that is not factorized gets a row with the reason, including those
inside If/Loop/Scan bodies and local functions, which are left intact.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from onnx_lowrank.config import LowRankConfig
from onnx_lowrank.heap import release_free_memory
from onnx_lowrank.core.ranks import break_even_rank
from onnx_lowrank.report import LayerResult

from .gemm import match_gemm
from .graph import QUANTIZED_OPS, Candidate, GraphContext, NonFiniteWeight, Rewrite, subgraph_nodes, unique_labels
from .matmul import match_matmul
from .planning import PassState, attach_whiteners, choose_ranks, estimate_macs, join_notes, latency_guard

__all__ = ["apply_lowrank", "find_candidates", "run_job", "FactorJob", "JobResult", "PassState", "MATCHERS", "FAMILIES"]

logger = logging.getLogger(__name__)

Matcher = Callable[[onnx.NodeProto, str, GraphContext, LowRankConfig], "Candidate | str"]

#: op type -> module hook turning a node into a candidate (or a reason).
MATCHERS: dict[str, Matcher] = {"MatMul": match_matmul, "Gemm": match_gemm}
try:  # Conv support lives in its own module; see passes/conv.py
    from .conv import match_conv

    MATCHERS["Conv"] = match_conv
except ImportError:  # pragma: no cover - only while conv.py is absent
    pass

FAMILIES = ("MatMul", "Gemm", "Conv")

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
        ``{input name: (samples, ...)}``; enables whitening (``config.whiten``).
    input_shapes : mapping, optional
        Concrete input shapes for the MAC estimates (symbolic dimensions default to 1).
    state : PassState, optional
        Reused work (Gram matrices, factorizations) across repeated runs on the same model.
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
    selected = latency_guard(selected, config)
    clock = _tick(state, "plan", clock)  # candidates, MACs, calibration, rank choice

    rewrites = _factorize_all(selected, ctx, config, state, progress)
    clock = _tick(state, "factorize", clock)
    for row, cand in active:
        row.note = join_notes(row.note, cand.note)
    if rewrites:
        _splice(model, rewrites)
        _remove_orphans(model, [cand for cand, _, _ in selected])
        release_free_memory()  # the factor arrays, now copied into the model
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
    ``analyze`` can inspect the same layers that ``optimize`` would consider. Rows of nodes
    that are left alone carry their ``reason`` and a ``None`` candidate.
    """
    ctx = ctx if ctx is not None else GraphContext(model)
    found: list[tuple[LayerResult, Candidate | None]] = []
    for node, label in zip(model.graph.node, unique_labels(model.graph)):
        if node.op_type in QUANTIZED_OPS:
            found.append((LayerResult(label, node.op_type, "skipped", reason="quantized operator: left alone"), None))
            continue
        if node.op_type not in FAMILIES or node.domain not in ("", "ai.onnx"):
            continue
        found.append(_consider(node, label, ctx, config))

    for owner, inner in subgraph_nodes(model.graph):
        if inner.op_type in FAMILIES:
            found.append((LayerResult(inner.name or inner.op_type, inner.op_type, "skipped",
                                      reason=f"inside the subgraph of {owner!r}: subgraphs are left intact"), None))
    for function in model.functions:
        for inner in function.node:
            if inner.op_type in FAMILIES:
                found.append((LayerResult(inner.name or inner.op_type, inner.op_type, "skipped",
                                          reason=f"inside local function {function.name!r}: functions are left intact"), None))
    return found


def _consider(
    node: onnx.NodeProto, label: str, ctx: GraphContext, config: LowRankConfig
) -> tuple[LayerResult, Candidate | None]:
    op = node.op_type
    row = LayerResult(label, op, "skipped")
    if op not in config.op_types:
        row.reason = f"op type {op} not selected (--op-types {','.join(config.op_types)})"
        return row, None
    if any(_OWN_FACTOR.search(name) for name in node.input[:2] if name):
        row.reason = "already a low-rank factor (made by onnx-lowrank)"
        return row, None
    matcher = MATCHERS.get(op)
    if matcher is None:
        row.reason = f"{op} is not supported by this installation"
        return row, None
    found = matcher(node, label, ctx, config)
    if isinstance(found, str):
        row.reason = found
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


def _factorize_all(
    selected: list[tuple[Candidate, int, LayerResult]],
    ctx: GraphContext,
    config: LowRankConfig,
    state: PassState,
    progress: bool,
) -> dict[int, Rewrite]:
    """Factorize each distinct (weight, view, rank) once and build every node's rewrite.

    The numerical work (factorization and error measures) of distinct weights runs in
    ``config.jobs`` threads (0: one per core) with one BLAS thread each; the rewrites are then
    built in graph order, so names and bytes do not depend on the number of jobs.
    """
    unique: dict[tuple[Any, int], tuple[Candidate, int, str]] = {}
    for cand, rank, row in selected:
        unique.setdefault((cand.share_key, rank), (cand, rank, row.node))

    jobs_list = []
    for cand, rank, label in unique.values():
        cached = state.factors.get(cand.share_key)
        target = rank
        if cached is None and state.prefactorize:
            target = max(rank, break_even_rank(cand.params_before, cand.factored_params, cand.max_rank) - 1)
        jobs_list.append(FactorJob(cand, rank, target, config, cached, label))

    # Largest weights first: the long jobs do not end up alone on one core at the end, and the
    # largest temporaries come before the factors of the other weights pile up. Results are put
    # back in graph order; each job is computed alike in any order (one BLAS thread each).
    costs = [_job_cost(job) for job in jobs_list]
    order = sorted(range(len(jobs_list)), key=lambda i: -costs[i])
    ordered = [jobs_list[i] for i in order]
    bar = tqdm(total=len(jobs_list), desc="factorizing", unit="weight", disable=not progress, leave=False)
    done: list[JobResult] = []
    if config.dask:
        from onnx_lowrank.distributed import run_jobs

        done = run_jobs(config.dask, ordered, progress=bar.update)
    else:
        jobs = config.jobs or os.cpu_count() or 1
        # One BLAS thread per job, always: OpenBLAS results can depend on its thread count (seen
        # here: 2 of 8 768x768 factors differed in their last bits between 1 and 2 threads), and
        # one thread per job is what makes the output byte-identical for every --jobs. numpy
        # releases the GIL in BLAS/LAPACK, so the jobs' threads do run in parallel.
        with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=max(1, min(jobs, len(jobs_list)))) as pool:
            for result in pool.map(run_job, ordered):
                done.append(result)
                bar.update(1)
    bar.close()
    results: list[JobResult] = [done[k] for k in np.argsort(order, kind="stable")]
    del done, ordered
    for job, result in zip(jobs_list, results):
        if result.full is not None:
            state.factors[job.candidate.share_key] = result.full
    skipped = {key: r.skipped for key, r in zip(unique, results) if r.skipped is not None}
    computed = {key: (r.factors, r.rel_error, r.whitened_error, r.optimal_error, {}) for key, r in zip(unique, results)}

    del results, jobs_list  # the factors live on in ``computed`` and then in the rewrites only
    uses = Counter((cand.share_key, rank) for cand, rank, _ in selected)
    rewrites: dict[int, Rewrite] = {}
    for cand, rank, row in selected:
        key = (cand.share_key, rank)
        if key in skipped:
            row.reason = skipped[key]
            continue
        factors, rel_error, whitened_error, optimal_error, names = computed[key]
        uses[key] -= 1
        if not uses[key]:
            del computed[key]  # its last node: the factors live on in this rewrite's kernels only
        if names:
            logger.info("%s shares weight %r: reusing its factors", row.node, cand.weight.name)
        rewrites[id(cand.node)] = cand.rewrite(ctx, factors, names)
        row.status = "factorized"
        row.reason = None
        row.rank = rank
        row.params_after = cand.factored_params(rank)
        row.rel_error = rel_error
        row.whitened_error = whitened_error
        row.optimal_error = optimal_error
        conv_macs = getattr(cand, "macs", None)  # convs count their intermediate resolutions
        counted = None
        if conv_macs is not None and state.shapes:
            counted = conv_macs(rank, state.shapes.get(cand.node.input[0]), state.shapes.get(cand.node.output[0]))
        if counted is not None:
            row.macs_before, row.macs_after = counted
        elif row.macs_before is not None and row.params_before:
            row.macs_after = cand.macs_after(rank, row.macs_before)
    return rewrites


def _job_cost(job: FactorJob) -> int:
    """Relative cost of a job: m n min(m, n), the order of its exact spectrum's flops."""
    m, n = job.candidate.shape
    return m * n * min(m, n)


@dataclass
class FactorJob:
    """One weight to factorize: everything a worker (thread, process or cluster node) needs."""

    candidate: Candidate
    rank: int
    target: int  # > rank: factorize there and keep the result for later truncations
    config: LowRankConfig
    cached: Any = None  # a larger factorization of the same weight, to truncate
    label: str = ""


@dataclass
class JobResult:
    factors: Any
    rel_error: float
    whitened_error: float | None
    optimal_error: float | None
    full: Any = None  # the factorization at ``target``, to cache
    seconds: float = 0.0
    skipped: str | None = None  # why the weight was left alone once read (NaN or Inf)


def run_job(job: FactorJob) -> JobResult:
    """Factorize one weight and measure its errors (pure: safe in threads and remote workers)."""
    start = time.perf_counter()
    cand, rank = job.candidate, job.rank
    try:
        cand.hold()  # a lazily loaded weight is read once for all that follows, then dropped
    except NonFiniteWeight as exc:  # its first read: planning needed no spectrum of it
        return JobResult(None, float("nan"), None, None, seconds=time.perf_counter() - start, skipped=str(exc))
    try:
        # The optimum first: its exact spectrum (a float64 Gram matrix and eigvalsh's copy of
        # it) is the largest temporary of a job, best taken before the factors exist.
        optimal_error = cand.optimal_error(rank)
        full = None
        factors = cand.truncate(job.cached, rank) if job.cached is not None else None
        if factors is None:
            full = cand.factorize(job.target, job.config)
            factors = cand.truncate(full, rank) if job.target != rank else full
            if factors is None:  # this scheme's factors cannot be truncated: factorize at the rank
                full, factors = None, cand.factorize(rank, job.config)
        result = JobResult(factors, cand.relative_error(factors), cand.whitened_error(factors),
                           optimal_error, full=full if job.target != rank else None,
                           seconds=time.perf_counter() - start)
    finally:
        cand.release()
    release_free_memory()  # the job's temporaries, kept resident by glibc otherwise
    logger.debug("%s: rank %d in %.3fs", job.label, rank, result.seconds)
    return result


_TRIM_EVERY_BYTES = 4 << 20


def _splice(model: onnx.ModelProto, rewrites: dict[int, Rewrite]) -> None:
    """Put each rewrite's nodes in place of its node; write its factors into the model one at a
    time, dropping each array once written (memory: the model plus the factors once)."""
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    freed = 0
    for node in graph.node:
        rewrite = rewrites.get(id(node))
        if rewrite is None:
            nodes.append(node)
            continue
        nodes.extend(rewrite.nodes)
        while rewrite.initializers:
            name, array = rewrite.initializers.pop(0)
            graph.initializer.append(numpy_helper.from_array(array, name))
            added.append(graph.initializer[-1])
            freed += array.nbytes
            del array
            if freed > _TRIM_EVERY_BYTES:
                # The arrays were allocated by the jobs' threads, the model's copies are not:
                # without this the memory freed here cannot serve the copies made next.
                release_free_memory()
                freed = 0
    del graph.node[:]
    graph.node.extend(nodes)
    if model.ir_version < 4:  # IR < 4 requires every initializer to be a graph input as well
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in added)


def _remove_orphans(model: onnx.ModelProto, candidates: list[Candidate]) -> None:
    """Drop the replaced weights, and the Constant/Identity/Transpose/Cast nodes feeding them,
    once nothing reads them; leave everything else in the model as it was."""
    ctx = GraphContext(model)
    pending = [cand.weight.name for cand in candidates]
    removed_nodes: set[int] = set()
    removed_inits: set[str] = set()
    gone: set[str] = set()
    while pending:
        name = pending.pop()
        legacy_input = ctx.legacy_inputs and name in ctx.graph_inputs and name in ctx.initializers
        if ctx.is_used_elsewhere(name, removed_nodes) or (name in ctx.graph_inputs and not legacy_input):
            continue
        if name in ctx.initializers:
            removed_inits.add(name)
            continue
        producer = ctx.producers.get(name)
        if producer is None or id(producer) in removed_nodes:
            continue
        if producer.op_type in ("Constant", "Identity", "Transpose", "Cast") and len(producer.output) == 1:
            removed_nodes.add(id(producer))
            gone.update(producer.output)
            pending.extend(i for i in producer.input if i)
    if removed_nodes:
        _delete_where(model.graph.node, lambda n: id(n) in removed_nodes)
    if removed_inits:
        _delete_where(model.graph.initializer, lambda t: t.name in removed_inits)
        if ctx.legacy_inputs:  # IR < 4 lists initializers as inputs: drop the removed ones too
            _delete_where(model.graph.input, lambda i: i.name in removed_inits)
    gone |= removed_inits
    if gone:
        _delete_where(model.graph.value_info, lambda v: v.name in gone)


def _delete_where(container: Any, doomed: Callable[[Any], bool]) -> None:
    """Delete the matching messages of a repeated field in place, keeping the others' order.

    Rebuilding the field (``del field[:]``, then ``extend`` with the kept messages) copies every
    kept message: all of a model's weights, 7.4 s over the 72 probe trials of
    ``--allocation weighted`` on MiniLM.
    """
    for i in reversed([i for i, item in enumerate(container) if doomed(item)]):
        del container[i]
