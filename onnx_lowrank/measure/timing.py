"""Latency measurement: interleaved timings (A B A B ...) and their summary.

:func:`interleaved_timings` runs several functions round by round so that the drifts of a shared
machine hit every model equally (the clock is injectable for tests); :func:`summarize_timings`
gives medians and the 90th percentile in milliseconds.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from onnx_lowrank.measure.errors import InputError

__all__ = ["interleaved_timings", "summarize_timings"]


def interleaved_timings(
    functions: Sequence[Callable[[int], Any]],
    *,
    runs: int | None = None,
    time_budget: float | None = None,
    warmup: int = 5,
    min_runs: int = 5,
    clock: Callable[[], float] = time.perf_counter,
    progress: bool = False,
    description: str = "latency",
) -> list[list[float]]:
    """Time several functions interleaved: A B A B ... (or A B C A B C ...).

    Interleaving makes slow drifts of a shared machine (other jobs, frequency scaling) hit every
    model equally, so their ratio stays honest even when absolute times wander.

    Parameters
    ----------
    functions : sequence of callable
        Each is called with the round index (use it to pick a sample: the same sample for every
        function within a round).
    runs : int, optional
        Number of timed rounds. If both ``runs`` and ``time_budget`` are None, 50 rounds.
    time_budget : float, optional
        Stop starting new rounds after this many seconds of timed rounds (measured with
        ``clock``), once at least ``min_runs`` rounds are done. With ``runs`` too, whichever
        ends first.
    warmup : int, default 5
        Untimed rounds first (also interleaved): the first runs pay for allocations and caches.
    min_runs : int, default 5
        Lower bound on rounds under a time budget, so medians are never of one value.
    clock : callable, default time.perf_counter
        Returns seconds; injectable so tests can use a fake clock.
    progress : bool, default False
        Show a tqdm progress bar on stderr.
    description : str
        Progress bar label.

    Returns
    -------
    list of list of float
        ``times[j][k]``: seconds of function ``j`` in round ``k``; all lists have the same length.
    """
    if runs is None and time_budget is None:
        runs = 50
    if runs is not None and runs < 1:
        raise InputError(f"--runs must be >= 1, got {runs}")
    if time_budget is not None and time_budget <= 0:
        raise InputError(f"--time-budget must be > 0, got {time_budget}")
    for w in range(warmup):
        for fn in functions:
            fn(w)
    times: list[list[float]] = [[] for _ in functions]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=runs, desc=description, unit="round", leave=False)
    start = clock()
    k = 0
    try:
        while True:
            if runs is not None and k >= runs:
                break
            if time_budget is not None and k >= min_runs and clock() - start >= time_budget:
                break
            for j, fn in enumerate(functions):
                t0 = clock()
                fn(k)
                t1 = clock()
                times[j].append(t1 - t0)
            k += 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return times


def summarize_timings(seconds: Sequence[float]) -> dict[str, float]:
    """Median and 90th percentile of timings, in milliseconds.

    Parameters
    ----------
    seconds : sequence of float

    Returns
    -------
    dict
        ``median_ms``, ``p90_ms`` (linear interpolation, numpy's default), ``min_ms``, ``runs``.
    """
    arr = np.asarray(seconds, dtype=np.float64) * 1e3
    if arr.size == 0:
        return {"median_ms": math.nan, "p90_ms": math.nan, "min_ms": math.nan, "runs": 0}
    return {
        "median_ms": float(np.median(arr)),
        "p90_ms": float(np.percentile(arr, 90)),
        "min_ms": float(np.min(arr)),
        "runs": int(arr.size),
    }
