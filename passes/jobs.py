"""Factorization jobs: one per distinct (weight, view, rank), run by an executor.

A :class:`FactorJob` carries everything a worker needs (the candidate with its matrix view or a
picklable loader, the rank, the config); :func:`run_job` is pure, so the same job gives the same
bytes in a thread, a process or on a cluster node. :func:`factorize_all` builds the jobs of the
selected layers, hands them to an executor and turns the results into the rewrites of every
node. The executor is plain data flow: :func:`run_local` (threads, one BLAS thread each) by
default; :mod:`onnx_lowrank.distributed` hands in a dask cluster's. This module imports neither.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from onnx_lowrank.config import LowRankConfig
from onnx_lowrank.core.ranks import break_even_rank
from onnx_lowrank.heap import release_free_memory
from onnx_lowrank.report import LayerResult

from .graph import Candidate, GraphContext, NonFiniteWeight, Rewrite

__all__ = ["FactorJob", "JobResult", "JobExecutor", "run_job", "run_local", "factorize_all"]

logger = logging.getLogger(__name__)

#: ``(jobs, progress) -> results`` in the order of ``jobs``; ``progress(k)`` after k more are done.
JobExecutor = Callable[[Sequence["FactorJob"], Callable[[int], Any]], list["JobResult"]]


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
    """Factors of one job and their errors (relative, whitened, Eckart-Young optimum)."""

    factors: Any
    rel_error: float
    whitened_error: float | None
    optimal_error: float | None
    full: Any = None  # the factorization at ``target``, to cache
    seconds: float = 0.0
    skipped: str | None = None  # why the weight was left alone once read (NaN or Inf)


def run_job(job: FactorJob) -> JobResult:
    """Factorize one weight and measure its errors (pure: safe in threads and remote workers).

    Parameters
    ----------
    job : FactorJob

    Returns
    -------
    JobResult
        ``skipped`` says why when the weight, read for the first time here, holds NaN or Inf.
    """
    # One BLAS thread, whoever runs the job: OpenBLAS results can depend on its thread count,
    # and a job must give the same bytes in any executor.
    with threadpool_limits(limits=1):
        return _run_job(job)


def _run_job(job: FactorJob) -> JobResult:
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


def run_local(jobs: Sequence[FactorJob], progress: Callable[[int], Any], *, workers: int = 0) -> list[JobResult]:
    """Run ``jobs`` in ``workers`` threads (0: one per core), one BLAS thread each.

    One BLAS thread per job, always: OpenBLAS results can depend on its thread count (seen here:
    2 of 8 768x768 factors differed in their last bits between 1 and 2 threads), and one thread
    per job is what makes the output byte-identical for every ``--jobs``. numpy releases the GIL
    in BLAS/LAPACK, so the jobs' threads do run in parallel.
    """
    workers = workers or os.cpu_count() or 1
    done: list[JobResult] = []
    with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        for result in pool.map(run_job, jobs):
            done.append(result)
            progress(1)
    return done


def _job_cost(job: FactorJob) -> int:
    """Relative cost of a job: m n min(m, n), the order of its exact spectrum's flops."""
    m, n = job.candidate.shape
    return m * n * min(m, n)


def factorize_all(
    selected: Sequence[tuple[Candidate, int, LayerResult]],
    ctx: GraphContext,
    config: LowRankConfig,
    *,
    cache: dict[Any, Any],
    prefactorize: bool = False,
    shapes: dict[str, list[int | None]] | None = None,
    executor: JobExecutor | None = None,
    progress: bool = False,
) -> dict[int, Rewrite]:
    """Factorize each distinct (weight, view, rank) once and build every node's rewrite.

    Parameters
    ----------
    selected : sequence of (Candidate, rank, LayerResult)
        The planner's choice; rows are filled in (rank, parameters, errors, MACs) or, for a weight
        found non-finite when read, given the reason.
    ctx : GraphContext
        Fresh names for the new nodes and factors.
    config : LowRankConfig
    cache : dict
        Factorizations by share key, at the largest rank computed so far: lower ranks are
        truncated from them (updated in place).
    prefactorize : bool
        Factorize a weight not in ``cache`` just below its break-even rank, to truncate later.
    shapes : dict, optional
        Inferred tensor shapes (convs count the MACs of their intermediate resolutions).
    executor : JobExecutor, optional
        Runs the jobs; :func:`run_local` with ``config.jobs`` threads when ``None``.
    progress : bool
        Progress bar on stderr.

    Returns
    -------
    dict of int to Rewrite
        By ``id`` of the node to replace. The rewrites are built in graph order after all jobs,
        so names and bytes do not depend on the executor or the number of jobs.
    """
    unique: dict[tuple[Any, int], tuple[Candidate, int, str]] = {}
    for cand, rank, row in selected:
        unique.setdefault((cand.share_key, rank), (cand, rank, row.node))

    jobs_list = []
    for cand, rank, label in unique.values():
        cached = cache.get(cand.share_key)
        target = rank
        if cached is None and prefactorize:
            target = max(rank, break_even_rank(cand.params_before, cand.factored_params, cand.max_rank) - 1)
        jobs_list.append(FactorJob(cand, rank, target, config, cached, label))

    # Largest weights first: the long jobs do not end up alone on one core at the end, and the
    # largest temporaries come before the factors of the other weights pile up. Results are put
    # back in graph order; each job is computed alike in any order (one BLAS thread each).
    costs = [_job_cost(job) for job in jobs_list]
    order = sorted(range(len(jobs_list)), key=lambda i: -costs[i])
    ordered = [jobs_list[i] for i in order]
    bar = tqdm(total=len(jobs_list), desc="factorizing", unit="weight", disable=not progress, leave=False)
    if executor is None:
        done = run_local(ordered, bar.update, workers=config.jobs)
    else:
        done = executor(ordered, bar.update)
    bar.close()
    results: list[JobResult] = [done[k] for k in np.argsort(order, kind="stable")]
    del done, ordered
    for job, result in zip(jobs_list, results):
        if result.full is not None:
            cache[job.candidate.share_key] = result.full
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
        if conv_macs is not None and shapes:
            counted = conv_macs(rank, shapes.get(cand.node.input[0]), shapes.get(cand.node.output[0]))
        if counted is not None:
            row.macs_before, row.macs_after = counted
        elif row.macs_before is not None and row.params_before:
            row.macs_after = cand.macs_after(rank, row.macs_before)
    return rewrites
