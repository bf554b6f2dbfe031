"""Measured-sensitivity rank allocation: spend the budget where the model's output loses least.

Spectral energy says how much of a weight a rank keeps, not how much the model's output cares.
Here each layer (each shared weight) is truncated alone to a few candidate ranks, with the other
layers dense, and the model's output error on calibration samples is measured in onnxruntime.
The budget then goes, greedily, to the upgrades (a larger candidate rank, or staying dense) with
the largest measured loss reduction per unit of cost. This is AIMET's greedy compression-ratio
search without its user callback and its slowness: one factorization per weight (sliced to every
candidate rank) and one short onnxruntime evaluation per (layer, rank).
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnx_lowrank.measure import accuracy, inputs, sessions
from onnx_lowrank.config import LowRankConfig
from onnx_lowrank.passes import PassState, find_candidates
from onnx_lowrank.passes.planning import attach_whiteners, estimate_macs
from onnx_lowrank.core.ranks import break_even_rank
from onnx_lowrank.search.trials import TrialModels

__all__ = ["SensitivityTable", "LayerOptions", "measure_sensitivity", "allocate_measured", "layer_weights",
           "CANDIDATE_FRACTIONS", "PROBE_FRACTIONS"]

logger = logging.getLogger(__name__)

#: Candidate ranks as fractions of each layer's break-even rank (DESIGN.md: 20..80% worked on
#: MiniLM at 50-70% budgets); 10% serves aggressive budgets, and rank 1 is always measured too,
#: so that every budget has a feasible starting point.
CANDIDATE_FRACTIONS = (0.1, 0.2, 0.35, 0.5, 0.65, 0.8)

#: ``--allocation weighted`` probes each layer at rank 1 and at half its break-even rank only:
#: the energy curve supplies the shape, the probes its scale (measured on MiniLM at
#: ``--target-params 0.7``: 72 trials give held-out error 0.507, the 252 of ``measured`` 0.515).
PROBE_FRACTIONS = (0.5,)

#: Calibration samples used to measure each truncation (the loss is an average; more samples
#: cost time linearly and changed the ranking little).
MAX_EVAL_SAMPLES = 32


@dataclass
class LayerOptions:
    """A shared weight's options: ``(rank, cost, loss)`` by increasing cost, dense last (rank None)."""

    labels: list[str]
    options: list[tuple[int | None, float, float]]
    #: Normalized (whitened) energy lost at each measured rank, in the order of ``options``
    #: (dense excluded): what the energy allocation predicts for the same truncations.
    tails: list[float] = field(default_factory=list)


@dataclass
class SensitivityTable:
    layers: list[LayerOptions]
    dense_total: float
    unit: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "seconds": round(self.seconds, 3),
            "layers": [{"nodes": l.labels, "options": [{"rank": r, "cost": c, "loss": loss} for r, c, loss in l.options]}
                       for l in self.layers],
        }


def measure_sensitivity(
    model: onnx.ModelProto,
    config: LowRankConfig,
    calibration: Mapping[str, np.ndarray],
    state: PassState,
    *,
    evaluation: Mapping[str, np.ndarray] | None = None,
    input_shapes: Mapping[str, Any] | None = None,
    progress: bool = False,
    fractions: tuple[float, ...] = CANDIDATE_FRACTIONS,
) -> SensitivityTable:
    """Output loss of the model with each layer alone truncated to each candidate rank.

    Parameters
    ----------
    model : onnx.ModelProto
        The original model (not modified).
    config : LowRankConfig
        Targets and method; ``target_flops`` makes costs MACs instead of parameters.
    calibration : mapping
        Calibration samples (the whitening).
    evaluation : mapping, optional
        Held-out samples; the first :data:`MAX_EVAL_SAMPLES` measure the loss. Without them the
        calibration samples are used, which flatters layers with fewer calibration rows than
        features.
    state : PassState
        Shared with the final run: Gram matrices, whiteners and factorizations are computed once.
    fractions : tuple of float
        Candidate ranks as fractions of each layer's break-even rank (rank 1 is always added).

    Returns
    -------
    SensitivityTable
    """
    start = time.perf_counter()
    flops = config.target_flops is not None
    found = [(row, cand) for row, cand in find_candidates(model, config) if cand is not None]
    # Gram matrices of every layer in one calibration pass, before the per-layer trials.
    attach_whiteners(model, found, config, calibration, state, progress=progress)
    groups: dict[Any, list] = defaultdict(list)
    for row, cand in found:
        groups[cand.share_key].append((row, cand))
    source = evaluation if evaluation is not None else calibration
    n = inputs.num_samples(source)
    evaluation = {k: v[: min(n, MAX_EVAL_SAMPLES)] for k, v in source.items()}
    reference = sessions.run_samples(sessions.create_session(model, threads=sessions.accuracy_threads()), evaluation)
    if flops and state.macs is None:
        state.macs, state.shapes = estimate_macs(model, input_shapes)

    jobs = []
    for key, members in groups.items():
        cand = members[0][1]
        be = break_even_rank(cand.params_before, cand.factored_params, cand.max_rank)
        ranks = sorted({1} | {max(1, int(round(f * be))) for f in fractions if int(round(f * be)) < be})
        jobs.append((key, members, be, ranks))
    total_trials = sum(len(j[3]) for j in jobs)
    bar = tqdm(total=total_trials, desc="measuring sensitivity", unit="trial", disable=not progress, leave=False)
    layers: list[LayerOptions] = []
    dense_total = 0.0
    with TrialModels(model, state) as trials:
        for key, members, be, ranks in jobs:
            layers.append(_measure_layer(trials, members, be, ranks, config, calibration, evaluation, reference,
                                         input_shapes, state, flops, bar))
            dense_total += layers[-1].options[-1][1]
    bar.close()
    table = SensitivityTable(layers, dense_total, "MACs" if flops else "parameters", time.perf_counter() - start)
    logger.info("sensitivity of %d layers x %d ranks measured in %.1fs", len(layers), len(fractions) + 1, table.seconds)
    return table


def _measure_layer(trials: TrialModels, members: list, be: int, ranks: list[int], config: LowRankConfig,
                   calibration: Mapping[str, np.ndarray], evaluation: Mapping[str, np.ndarray],
                   reference: list[np.ndarray], input_shapes: Mapping[str, Any] | None, state: PassState,
                   flops: bool, bar: Any) -> LayerOptions:
    """One shared weight truncated alone to each of ``ranks``: its options, dense last."""
    labels = [row.node for row, _ in members]
    cand = members[0][1]
    rows_per = 1.0  # a shared weight is stored once
    if flops:  # MACs = parameters x rows per inference, summed over the weight's nodes
        known = [(state.macs or {}).get(label) for label in labels]
        rows_per = float(sum(m / cand.params_before for m in known if m)) or float(len(labels))
    dense = cand.params_before * rows_per
    options: list[tuple[int | None, float, float]] = []
    sigma, total = cand.spectrum(be)
    energies = np.asarray(sigma, dtype=np.float64) ** 2
    tails = [max(0.0, 1.0 - float(np.sum(energies[:rank])) / total) if total > 0 else 0.0 for rank in ranks]
    for rank in ranks:
        cfg = replace(config, include=tuple(f"^{re.escape(label)}$" for label in labels), latency="off")
        trial, _ = trials.build(cfg, calibration, input_shapes, {label: rank for label in labels})
        outputs = sessions.run_samples(trials.session(trial), evaluation)
        loss = accuracy.max_error(accuracy.compare_outputs(reference, outputs))
        options.append((rank, cand.factored_params(rank) * rows_per, float(loss)))
        bar.update(1)
    options.append((None, dense, 0.0))
    # A larger rank never loses more than a smaller one; measured noise aside.
    best = float("inf")
    monotone = []
    for rank, cost, loss in options:
        best = min(best, loss)
        monotone.append((rank, cost, best))
    return LayerOptions(labels, monotone, tails)


def allocate_measured(table: SensitivityTable, fraction: float) -> tuple[dict[str, int | None], float]:
    """Ranks by label within ``fraction`` of the dense cost, minimizing the summed measured loss.

    Every layer starts at its smallest candidate rank; the upgrade (to any larger option) with
    the best loss reduction per added cost that still fits is taken until none fits.

    Returns
    -------
    ranks : dict
        Node label -> rank, ``None`` for dense.
    loss : float
        The summed measured loss of the choice (an additive estimate of the combined loss).
    """
    budget = fraction * table.dense_total
    current = [0] * len(table.layers)
    used = sum(layer.options[0][1] for layer in table.layers)
    while True:
        best: tuple[float, int, int] | None = None
        for i, layer in enumerate(table.layers):
            _, cost0, loss0 = layer.options[current[i]]
            for j in range(current[i] + 1, len(layer.options)):
                _, cost, loss = layer.options[j]
                added = cost - cost0
                if used + added > budget or loss >= loss0:
                    continue
                ratio = (loss0 - loss) / max(added, 1e-12)
                if best is None or ratio > best[0]:
                    best = (ratio, i, j)
        if best is None:
            break
        _, i, j = best
        used += table.layers[i].options[j][1] - table.layers[i].options[current[i]][1]
        current[i] = j
    ranks: dict[str, int | None] = {}
    loss = 0.0
    for layer, k in zip(table.layers, current):
        rank, _, layer_loss = layer.options[k]
        loss += layer_loss
        for label in layer.labels:
            ranks[label] = rank
    return ranks, loss


#: Floor of losses and tails in :func:`layer_weights`: an exactly low-rank layer loses nothing
#: and its weight must stay finite.
_TINY = 1e-12


def layer_weights(table: SensitivityTable) -> dict[str, float]:
    """Output sensitivity of each layer, in squared output error per unit of normalized energy.

    Parameters
    ----------
    table : SensitivityTable
        Measured losses and the matching energy tails (:func:`measure_sensitivity` with
        :data:`PROBE_FRACTIONS`).

    Returns
    -------
    dict
        Node label -> weight; the global allocation multiplies the layer's normalized energies
        by it (``--allocation weighted``).

    Notes
    -----
    Truncating layer ``l`` alone to rank ``r`` costs the model's output a relative error
    ``e_l(r)``; its normalized energy lost is ``t_l(r)``. Modelling ``e_l(r)^2 = w_l t_l(r)``
    (independent small errors add in squares), each probe gives ``w_l = e_l^2 / t_l`` and the
    geometric mean of the probes is taken (the maximum over-weighted layers whose rank-1 probe
    is off the model's linear range, the mean was dominated by it). Summing ``w_l t_l(r_l)``
    over layers then estimates the squared output error of the whole allocation, which the
    greedy minimizes: the energy allocation's ``w_l = 1`` treated every layer as equally
    important to the output.
    """
    weights: dict[str, float] = {}
    for layer in table.layers:
        logs = [np.log(max(loss * loss, _TINY) / max(tail, _TINY))
                for (rank, _, loss), tail in zip(layer.options, layer.tails) if rank is not None]
        w = float(np.exp(np.mean(logs))) if logs else 1.0
        for label in layer.labels:
            weights[label] = w
    return weights
