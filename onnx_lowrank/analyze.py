"""Which layers of a model are compressible, and by how much (``onnx-lowrank analyze``).

For every MatMul/Gemm/Conv node with a constant weight (the same candidates ``optimize`` would
consider, with the same filters) this reports the matrix view ``W (m x n)``, its parameters, the
break-even rank below which factorizing saves parameters, the ranks that keep 90/95/99% of the
spectral energy ``sum sigma_i^2``, and what ``--energy E`` and ``--ratio F`` would do to the
layer (parameters after; for a ratio, the energy that survives). Nodes that cannot be factorized
are listed with the reason.

Spectra are exact (LAPACK SVD without vectors, float64) when ``min(m, n) <= exact_limit`` and
estimated by randomized subspace iteration above it (flagged ``"estimated": true`` and marked
``~`` in the table). An estimate computes the leading values only, as many as the largest
requested energy needs (doubling from the break-even rank), against the exact total energy
``||W||_F^2``; RSI values are lower bounds, so estimated energy ranks err on the high side.

JSON (``--json PATH``)::

    {"model": path, "exact_limit": int, "energies": [...], "ratios": [...],
     "layers": [{"name", "op", "weight", "shape": [m, n], "params", "break_even_rank",
                 "max_rank", "energy_rank": {"0.9": r, "0.95": r, "0.99": r},
                 "estimated", "spectrum_values", "scheme",
                 "energy_params": {"0.9": p, ...},   # parameters after --energy E (dense: unchanged)
                 "ratio_rank": {"0.5": r, ...},       # rank --ratio F picks (null: stays dense)
                 "ratio_energy": {"0.5": e, ...}}],   # energy kept at that rank
     "skipped": [{"name", "op", "reason"}],
     "totals": {"layers", "skipped", "estimated_layers", "params", "model_params",
                "energy": {"0.9": {"params_after", "param_ratio", "factorized"}, ...},
                "ratio": {"0.5": {"params_after", "param_ratio", "energy_kept"}, ...}}}

``params`` in the totals counts each distinct weight once (nodes may share a weight). The command
line (options, printing, exit codes) is :mod:`onnx_lowrank.cli.analyze`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_lowrank.core import linalg
from onnx_lowrank.config import ConfigError, LowRankConfig
from onnx_lowrank.flops import count_params
from onnx_lowrank.model_io import ModelError, load_model
from onnx_lowrank.passes import find_candidates
from onnx_lowrank.passes.graph import Candidate
from onnx_lowrank.core.ranks import break_even_rank, select_rank
from onnx_lowrank.report import format_count

__all__ = [
    "analyze_model",
    "format_analysis",
    "plot_spectra",
    "to_json",
    "DEFAULT_EXACT_LIMIT",
    "DEFAULT_ENERGIES",
    "DEFAULT_RATIOS",
]

logger = logging.getLogger(__name__)

#: Spectra of matrices with min(m, n) up to this are exact: values-only LAPACK SVD of a
#: 1024 x 4096 float64 matrix takes ~1 s on a 2-core machine; larger ones are RSI estimates.
#: Same limit as the optimize report's ``optimal_error``.
DEFAULT_EXACT_LIMIT = 1024
#: The energy levels of the issue's table.
DEFAULT_ENERGIES = (0.9, 0.95, 0.99)
#: Parameter ratios whose effect is shown (the ones the benchmarks use).
DEFAULT_RATIOS = (0.3, 0.5, 0.7)


def _key(x: float) -> str:
    """JSON key of a fraction: 0.9 -> "0.9", 0.95 -> "0.95"."""
    return f"{x:g}"


class _Spectrum:
    """Leading singular values of one candidate, computed lazily and cached (exact or RSI)."""

    def __init__(self, cand: Candidate, exact_limit: int, seed: int) -> None:
        self.cand = cand
        self.exact_limit = exact_limit
        self.seed = seed
        # Candidates with their own notion of spectrum (grouped convs: per-rank energy summed
        # over groups; Tucker-2) answer through Candidate.spectrum.
        self.custom = type(cand).spectrum is not Candidate.spectrum
        self.exact = cand.max_rank <= exact_limit
        self.values = np.zeros(0)
        self.total = linalg.squared_frobenius_norm(cand.matrix)

    @property
    def estimated(self) -> bool:
        return not self.exact and len(self.values) < self.cand.max_rank

    def get(self, k: int) -> tuple[np.ndarray, float]:
        k = min(max(int(k), 1), self.cand.max_rank)
        if len(self.values) >= k:
            return self.values, self.total
        if self.custom:
            want = self.cand.max_rank if self.exact else k
            values, total = self.cand.spectrum(want)
            self.values, self.total = np.asarray(values, dtype=np.float64), float(total)
        elif self.exact or k >= self.cand.max_rank:
            self.values = linalg.singular_values(self.cand.matrix, exact_limit=self.cand.max_rank)
        else:
            self.values = linalg.singular_values(self.cand.matrix, k=k, exact_limit=self.exact_limit,
                                                 seed=self.seed)
        return self.values, self.total

    def energy_rank(self, energy: float, start: int) -> int:
        """Smallest rank keeping ``energy``; estimates grow the computed prefix until it does."""
        k = max(start, 1)
        while True:
            values, total = self.get(k)
            if total <= 0.0:
                return 0
            kept = np.cumsum(values**2)
            if kept[-1] >= energy * total * (1 - 1e-9) or len(values) >= self.cand.max_rank:
                return linalg.energy_rank(values, energy, total_energy=max(total, float(kept[-1])))
            k = min(2 * len(values), self.cand.max_rank)

    def energy_at(self, rank: int) -> float:
        values, total = self.get(rank)
        if total <= 0.0:
            return 1.0
        return float(min(np.sum(values[:rank] ** 2) / total, 1.0))


@dataclass(frozen=True)
class _Options:
    energies: tuple[float, ...]
    ratios: tuple[float, ...]
    exact_limit: int


def analyze_model(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    config: LowRankConfig | None = None,
    *,
    exact_limit: int = DEFAULT_EXACT_LIMIT,
    energies: tuple[float, ...] = DEFAULT_ENERGIES,
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
) -> dict[str, Any]:
    """Per-layer spectra, energy ranks and the savings of the rank policies.

    Parameters
    ----------
    model_or_path : onnx.ModelProto or path-like
        The model (never modified) or its ``.onnx`` path (external data is read).
    config : LowRankConfig, optional
        Which layers (``op_types``, ``include``, ``exclude``, ``min_params``), the Conv scheme,
        ``multiple_of`` and ``force`` -- the settings that decide which layers ``optimize``
        would factorize and at which rank. Its rank policy is ignored.
    exact_limit : int
        Exact spectrum when ``min(m, n) <= exact_limit``, RSI estimate above.
    energies : tuple of float
        Energy levels for ``energy_rank`` and the ``--energy`` savings, each in (0, 1].
    ratios : tuple of float
        Parameter ratios for the ``--ratio`` rows, each in (0, 1].

    Returns
    -------
    dict
        The JSON document described in the module docstring.

    Raises
    ------
    ModelError
        The path is not a readable ONNX model.
    ConfigError
        An energy or ratio outside (0, 1], or a negative ``exact_limit``.
    """
    config = config if config is not None else LowRankConfig()
    for name, values in (("energies", energies), ("ratios", ratios)):
        for v in values:
            if not (isinstance(v, (int, float)) and 0.0 < float(v) <= 1.0):
                raise ConfigError(f"{name} must be fractions in (0, 1], got {v!r}")
    if isinstance(exact_limit, bool) or not isinstance(exact_limit, int) or exact_limit < 0:
        raise ConfigError(f"--exact-limit must be an integer >= 0, got {exact_limit!r}")
    opts = _Options(tuple(float(e) for e in energies), tuple(float(r) for r in ratios), exact_limit)

    path: str | None = None
    if isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
    elif isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        model = load_model(model_or_path)
    else:
        raise TypeError(f"analyze_model() takes an onnx.ModelProto or a path, not {type(model_or_path).__name__}")

    layers: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    spectra: dict[Any, _Spectrum] = {}
    seen_weights: set[Any] = set()
    totals_params = 0
    energy_after = {_key(e): 0 for e in opts.energies}
    energy_factorized = {_key(e): 0 for e in opts.energies}
    ratio_after = {_key(r): 0 for r in opts.ratios}
    ratio_energy_num = {_key(r): 0.0 for r in opts.ratios}
    energy_den = 0.0

    for row, cand in find_candidates(model, config):
        if cand is None:
            skipped.append({"name": row.node, "op": row.op, "reason": row.reason})
            continue
        spec = spectra.get(cand.share_key)
        if spec is None:
            spec = spectra[cand.share_key] = _Spectrum(cand, opts.exact_limit, config.seed)
        layer = _analyze_layer(row.node, cand, spec, config, opts)
        layers.append(layer)
        if cand.share_key in seen_weights:
            continue  # a shared weight is stored (and saved) once
        seen_weights.add(cand.share_key)
        totals_params += layer["params"]
        for e in opts.energies:
            p = layer["energy_params"][_key(e)]
            energy_after[_key(e)] += p
            energy_factorized[_key(e)] += int(p < layer["params"])
        for r in opts.ratios:
            k = _key(r)
            rank = layer["ratio_rank"][k]
            ratio_after[k] += cand.factored_params(rank) if rank is not None else layer["params"]
            ratio_energy_num[k] += spec.total * (layer["ratio_energy"][k] if rank is not None else 1.0)
        energy_den += spec.total

    totals: dict[str, Any] = {
        "layers": len(layers),
        "skipped": len(skipped),
        "estimated_layers": sum(1 for layer in layers if layer["estimated"]),
        "params": totals_params,
        "model_params": count_params(model),
        "energy": {
            k: {"params_after": energy_after[k], "param_ratio": _ratio(energy_after[k], totals_params),
                "factorized": energy_factorized[k]}
            for k in energy_after
        },
        "ratio": {
            k: {"params_after": ratio_after[k], "param_ratio": _ratio(ratio_after[k], totals_params),
                # energy kept over all candidate weights, weighted by each weight's ||W||_F^2
                "energy_kept": (ratio_energy_num[k] / energy_den) if energy_den > 0 else None}
            for k in ratio_after
        },
    }
    return {
        "model": path,
        "exact_limit": opts.exact_limit,
        "energies": list(opts.energies),
        "ratios": list(opts.ratios),
        "layers": layers,
        "skipped": skipped,
        "totals": totals,
    }


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _analyze_layer(
    name: str, cand: Candidate, spec: _Spectrum, config: LowRankConfig, opts: _Options
) -> dict[str, Any]:
    params = cand.params_before
    be = break_even_rank(params, cand.factored_params, cand.max_rank)
    # Start the estimate at the break-even rank: ranks above it are never used without --force.
    start = min(be, cand.max_rank)
    energy_rank = {_key(e): spec.energy_rank(e, start) for e in opts.energies}

    energy_params: dict[str, int] = {}
    for e in opts.energies:
        choice = select_rank(
            LowRankConfig(energy=e, multiple_of=config.multiple_of, force=config.force),
            params_before=params, max_rank=cand.max_rank, factored_params=cand.factored_params,
            spectrum=spec.get, default_multiple_of=cand.default_multiple_of,
        )
        energy_params[_key(e)] = cand.factored_params(choice.rank) if choice.rank is not None else params

    ratio_rank: dict[str, int | None] = {}
    ratio_energy: dict[str, float | None] = {}
    for r in opts.ratios:
        choice = select_rank(
            LowRankConfig(ratio=r, multiple_of=config.multiple_of, force=config.force),
            params_before=params, max_rank=cand.max_rank, factored_params=cand.factored_params,
            spectrum=spec.get, default_multiple_of=cand.default_multiple_of,
        )
        ratio_rank[_key(r)] = choice.rank
        ratio_energy[_key(r)] = spec.energy_at(choice.rank) if choice.rank is not None else None

    m, n = cand.shape
    return {
        "name": name,
        "op": cand.op_type,
        "weight": cand.weight.name,
        "shape": [int(m), int(n)],
        "params": int(params),
        "break_even_rank": int(be),
        "max_rank": int(cand.max_rank),
        "energy_rank": energy_rank,
        "estimated": bool(spec.estimated),
        "spectrum_values": int(len(spec.values)),
        "scheme": cand.scheme,
        "energy_params": energy_params,
        "ratio_rank": ratio_rank,
        "ratio_energy": ratio_energy,
        # normalized spectrum for --plot; dropped from the JSON by to_json
        "_sigma": (spec.values / spec.values[0]).tolist() if len(spec.values) and spec.values[0] > 0 else [],
    }


# --------------------------------------------------------------------------------------------
# presentation
# --------------------------------------------------------------------------------------------


def format_analysis(result: dict[str, Any], *, max_name: int = 48) -> str:
    """The human table: one row per factorizable layer, then skipped layers and totals."""
    energies = [_key(e) for e in result["energies"]]
    ratios = [_key(r) for r in result["ratios"]]
    header = ["node", "op", "shape", "params", "break-even"] + [f"r@{float(e):.0%}" for e in energies] + \
        [f"E@ratio {r}" for r in ratios]
    rows = []
    for layer in result["layers"]:
        mark = "~" if layer["estimated"] else ""
        name = layer["name"]
        if len(name) > max_name:
            name = "..." + name[-(max_name - 3):]
        cells = [name, layer["op"], f"{layer['shape'][0]}x{layer['shape'][1]}", format_count(layer["params"]),
                 str(layer["break_even_rank"])]
        for e in energies:
            r = layer["energy_rank"][e]
            over = "!" if r >= layer["break_even_rank"] else ""
            cells.append(f"{mark}{r}{over}")
        for r in ratios:
            value = layer["ratio_energy"][r]
            cells.append("dense" if value is None else f"{mark}{value:.3f}")
        rows.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in [header, ["-" * w for w in widths], *rows]]
    t = result["totals"]
    lines.append("")
    if t["estimated_layers"]:
        lines.append(f"~ estimated by RSI (min(m, n) > {result['exact_limit']}): {t['estimated_layers']} layer(s); "
                     "estimated ranks err high")
    lines.append("r@E: smallest rank keeping fraction E of sum(sigma^2); '!' = at or above break-even "
                 "(--energy would leave the layer dense)")
    lines.append("E@ratio F: energy kept by the rank --ratio F picks")
    lines.append(f"{t['layers']} factorizable layer(s), {format_count(t['params'])} weight parameters "
                 f"of {format_count(t['model_params'])} in the model; {t['skipped']} node(s) skipped")
    for e in energies:
        s = t["energy"][e]
        lines.append(f"  --energy {e}: {format_count(t['params'])} -> {format_count(s['params_after'])} "
                     f"({_pct(s['param_ratio'])}), {s['factorized']} layer(s) factorized")
    for r in ratios:
        s = t["ratio"][r]
        kept = "n/a" if s["energy_kept"] is None else f"{s['energy_kept']:.3f}"
        lines.append(f"  --ratio {r}: {format_count(t['params'])} -> {format_count(s['params_after'])} "
                     f"({_pct(s['param_ratio'])}), energy kept {kept}")
    if result["skipped"]:
        lines.append("skipped:")
        for s in result["skipped"]:
            lines.append(f"  {s['name']} ({s['op']}): {s['reason']}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def plot_spectra(result: dict[str, Any], path: str | os.PathLike[str], *, title: str | None = None) -> None:
    """Normalized spectra (sigma_i / sigma_1 against i / min(m, n)) and cumulative energy.

    Raises
    ------
    ModelError
        matplotlib is not installed (the ``plot`` extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ModelError("--plot needs matplotlib: pip install 'onnx-lowrank[plot]'") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    shapes = sorted({tuple(layer["shape"]) + (layer["op"],) for layer in result["layers"]})
    cmap = plt.get_cmap("tab10")
    colors = {s: cmap(i % 10) for i, s in enumerate(shapes)}
    labelled: set[tuple] = set()
    for layer in result["layers"]:
        sigma = np.asarray(layer.get("_sigma") or [])
        if sigma.size == 0:
            continue
        key = tuple(layer["shape"]) + (layer["op"],)
        label = None if key in labelled else f"{layer['op']} {key[0]}x{key[1]}"
        labelled.add(key)
        x = np.arange(1, sigma.size + 1) / layer["max_rank"]
        style = "--" if layer["estimated"] else "-"
        ax1.semilogy(x, sigma, style, color=colors[key], alpha=0.6, lw=1, label=label)
        # cumulative energy of the computed prefix; the exact total is not kept per layer, so use
        # the prefix (exact spectra are complete; estimated ones are dashed)
        energy = np.cumsum(sigma**2)
        ax2.plot(x, energy / energy[-1], style, color=colors[key], alpha=0.6, lw=1)
    ax1.set_xlabel("rank / min(m, n)")
    ax1.set_ylabel("sigma_i / sigma_1")
    ax1.set_title("normalized singular values")
    ax1.grid(True, which="both", alpha=0.3)
    if labelled:
        ax1.legend(fontsize=7, loc="lower left")
    for e in result["energies"]:
        ax2.axhline(e, color="grey", lw=0.6, ls=":")
    ax2.set_xlabel("rank / min(m, n)")
    ax2.set_ylabel("fraction of sum sigma^2")
    ax2.set_title("cumulative energy (dashed: RSI-estimated prefix)")
    ax2.grid(True, alpha=0.3)
    fig.suptitle(title or (Path(result["model"]).name if result.get("model") else "spectra"))
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)


def to_json(result: dict[str, Any]) -> str:
    """The JSON document (without the internal plotting data)."""
    clean = dict(result)
    clean["layers"] = [{k: v for k, v in layer.items() if not k.startswith("_")} for layer in result["layers"]]
    return json.dumps(clean, indent=2)
