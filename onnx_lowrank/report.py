"""What an optimize run did, per layer and in total, as a table or as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from onnx_lowrank.core.prediction import predicted_output_error

__all__ = ["LayerResult", "Report", "format_count", "format_bytes"]


@dataclass
class LayerResult:
    """One candidate node: factorized (with rank and error) or skipped (with the reason).

    ``rel_error`` is ``||W - A B||_F / ||W||_F`` of the layer's matrix view. With calibration
    data, ``whitened_error`` is the relative error of the layer's output on that data,
    ``||X (W - A B)|| / ||X W||``, which is what the factorization then minimizes.
    ``optimal_error`` is the Eckart-Young optimum at the same rank of whichever error was
    minimized (``None`` where the exact spectrum was not computed, ``min(m, n) > 1024``).
    """

    node: str
    op: str
    status: str  # "factorized" or "skipped"
    weight: str | None = None
    shape: tuple[int, int] | None = None
    reason: str | None = None
    rank: int | None = None
    break_even_rank: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    rel_error: float | None = None
    whitened_error: float | None = None
    optimal_error: float | None = None
    scheme: str | None = None
    note: str | None = None
    macs_before: int | None = None
    macs_after: int | None = None

    @property
    def factorized(self) -> bool:
        return self.status == "factorized"


@dataclass
class Report:
    """The per-layer rows plus totals of one optimize run; ``to_dict`` is the ``--report`` JSON."""

    layers: list[LayerResult] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    model_params_before: int = 0
    model_params_after: int = 0
    input_path: str | None = None
    output_path: str | None = None
    size_before: int | None = None
    size_after: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def factorized(self) -> list[LayerResult]:
        return [row for row in self.layers if row.factorized]

    @property
    def skipped(self) -> list[LayerResult]:
        return [row for row in self.layers if not row.factorized]

    @property
    def predicted_output_error(self) -> float:
        """Data-free prediction of the model's relative output error: the root-sum-square of the
        factorized layers' errors (whitened output errors where calibrated, else weight errors);
        see :mod:`onnx_lowrank.core.prediction` and docs/prediction.md. Not a measurement."""
        return predicted_output_error(
            r.whitened_error if r.whitened_error is not None else r.rel_error for r in self.factorized
        )

    def totals(self) -> dict[str, Any]:
        """Parameter, size and time totals (the ``totals`` object of the JSON)."""
        done = self.factorized
        before = sum(r.params_before or 0 for r in done)
        after = sum(r.params_after or 0 for r in done)
        candidates = sum(r.params_before or 0 for r in self.layers if r.params_before and not _unselected(r))
        # Embedding tables whose family was not selected: shown so that "half the candidates"
        # is not mistaken for half the model (MiniLM-L6: 11.9M of its 22.6M parameters).
        tables = sum(r.params_before or 0 for r in self.layers if r.op == "Gather" and _unselected(r))
        totals: dict[str, Any] = {
            "layers": len(self.layers),
            "factorized": len(done),
            "skipped": len(self.layers) - len(done),
            "factorized_params_before": before,
            "factorized_params_after": after,
            "candidate_params": candidates,
            "unselected_table_params": tables,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "model_params_ratio": _ratio(self.model_params_after, self.model_params_before),
            "size_before": self.size_before,
            "size_after": self.size_after,
            "size_ratio": _ratio(self.size_after, self.size_before),
            "predicted_output_error": self.predicted_output_error,
            "seconds": dict(self.seconds),
        }
        macs = [r for r in self.layers if r.macs_before is not None]
        if macs:
            totals["macs_before"] = sum(r.macs_before or 0 for r in macs)
            totals["macs_after"] = sum(
                (r.macs_after if r.factorized and r.macs_after is not None else r.macs_before) or 0
                for r in macs
            )
        return totals

    def to_dict(self) -> dict[str, Any]:
        layers = []
        for row in self.layers:
            d = asdict(row)
            d["shape"] = list(row.shape) if row.shape else None
            layers.append(d)
        return {
            "input": self.input_path,
            "output": self.output_path,
            "config": self.config,
            "layers": layers,
            "totals": self.totals(),
            **self.details,
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def format_table(self, *, max_reason: int = 160) -> str:
        """The human table: one row per candidate node, then totals."""
        whitened = any(r.whitened_error is not None for r in self.layers)
        header = ["node", "op", "shape", "rank", "params", "-> after", "w.err"]
        header += ["out.err", "optimal", "status"] if whitened else ["optimal", "status"]
        rows: list[list[str]] = []
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}" if r.shape else "-"
            if r.factorized:
                status = "factorized" + (f" ({r.scheme})" if r.scheme and r.scheme != "svd" else "")
                errors = [_fmt_err(r.rel_error)] + ([_fmt_err(r.whitened_error)] if whitened else [])
                rows.append([
                    r.node, r.op, shape, str(r.rank), format_count(r.params_before),
                    format_count(r.params_after), *errors, _fmt_err(r.optimal_error), status,
                ])
            else:
                reason = r.reason or "skipped"
                if len(reason) > max_reason:
                    reason = reason[: max_reason - 3] + "..."
                rows.append([
                    r.node, r.op, shape, "-", format_count(r.params_before), "-", "-", "-",
                    *(["-"] if whitened else []), f"skipped: {reason}",
                ])
        widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
        widths[-1] = len(header[-1])  # the last column is free text, do not pad it
        lines = [_row(header, widths), _row(["-" * w for w in widths], widths)]
        lines += [_row(row, widths) for row in rows]
        lines.append("")
        legend = "w.err: relative error of the weight, ||W - AB|| / ||W||"
        if whitened:
            legend += ("; out.err: relative error of the layer's output on the calibration data (what was "
                       "minimized); optimal: the best possible out.err at that rank")
        else:
            legend += "; optimal: the best possible at that rank (Eckart-Young)"
        lines.append(legend)
        notes = [f"  {r.node}: {r.note}" for r in self.layers if r.note]
        if notes:
            lines.append("notes:")
            lines.extend(notes)
        t = self.totals()
        lines.append("")
        lines.append(
            f"factorized {t['factorized']} of {t['layers']} candidate layers; their parameters "
            f"{format_count(t['factorized_params_before'])} -> {format_count(t['factorized_params_after'])}"
        )
        lines.append(
            f"model parameters {format_count(t['model_params_before'])} -> "
            f"{format_count(t['model_params_after'])} ({_fmt_ratio(t['model_params_ratio'])})"
        )
        if self.model_params_before:
            share = t["candidate_params"] / self.model_params_before
            line = (f"candidate layers hold {format_count(t['candidate_params'])} of the model's "
                    f"{format_count(self.model_params_before)} parameters ({share:.1%})")
            if t["unselected_table_params"]:
                line += (f"; embedding tables not selected: {format_count(t['unselected_table_params'])} "
                         f"(add Gather to --op-types to budget them too)")
            lines.append(line)
        if "macs_before" in t:
            lines.append(
                f"MACs of candidate layers {format_count(t['macs_before'])} -> {format_count(t['macs_after'])} "
                f"({_fmt_ratio(_ratio(t['macs_after'], t['macs_before']))})"
            )
        if self.size_before is not None and self.size_after is not None:
            lines.append(
                f"file size {format_bytes(self.size_before)} -> {format_bytes(self.size_after)} "
                f"({_fmt_ratio(t['size_ratio'])})"
            )
        alloc = self.details.get("allocation")
        if alloc:
            how = {"energy": "normalized energy per parameter",
                   "weighted": "energy weighted by measured output sensitivity",
                   "measured": "measured output loss per layer and rank"}.get(alloc["method"], alloc["method"])
            probes = f", {alloc['trials']} onnxruntime probes in {alloc['seconds']:.1f}s" if "trials" in alloc else ""
            lines.append(f"global allocation: {alloc['method']} ({how}{probes})")
        search = self.details.get("search")
        if search:
            verdict = "within" if search["reached"] else "ABOVE"
            lines.append(
                f"budget search: --target-params {search['target_params']:.4f}, held-out error "
                f"{search['error']:.4g} ({verdict} --max-error {search['max_error']:g})"
            )
            if not search.get("compressed", True):
                lines.append("  no compressed model met the limit: every layer was kept dense")
        source = ("from the layers' output errors on the calibration data" if whitened
                  else "data-free, from the layers' weight errors")
        lines.append(f"predicted output error {self.predicted_output_error:.2f} ({source}; not measured)")
        if self.seconds:
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
            lines.append(f"time: {parts}")
        return "\n".join(lines)


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


def _ratio(after: int | None, before: int | None) -> float | None:
    if not before or after is None:
        return None
    return after / before


def _fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"x{ratio:.3f}"


def _unselected(row: LayerResult) -> bool:
    """A row skipped because its op family was not selected (``--op-types``)."""
    return bool(row.reason) and row.reason.startswith("op type ")


def _fmt_err(err: float | None) -> str:
    return "-" if err is None else f"{err:.4f}"


def format_count(n: int | None) -> str:
    """``1234567 -> '1.23M'``; exact below 10 000."""
    if n is None:
        return "-"
    if n < 10_000:
        return str(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_bytes(n: int | None) -> str:
    """Bytes in KiB/MiB/GiB."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
