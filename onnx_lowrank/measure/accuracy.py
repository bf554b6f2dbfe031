"""Accuracy: how far a compressed model's outputs drift from the original's.

- metrics of one pair of arrays, with known answers: :func:`max_abs_error`, :func:`rel_l2_error`,
  :func:`cosine_similarity`, :func:`top1_agreement`, :func:`mean_kl`, :func:`task_accuracy`;
- :func:`output_metrics` for one output over all samples (with warnings for near-zero
  references, :data:`NEAR_ZERO_RMS`, and NaN/inf), :func:`compare_outputs` for every output of
  two runs, :func:`compare_models` to run two models and compare them;
- :func:`max_error`: the worst error over all outputs, the number ``--max-error`` limits.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from onnx_lowrank.measure.errors import HarnessError, InputError
from onnx_lowrank.measure.inputs import ModelLike, input_specs, normalize_inputs
from onnx_lowrank.measure.sessions import create_session, run_samples

logger = logging.getLogger(__name__)

__all__ = [
    "NEAR_ZERO_RMS",
    "compare_models",
    "compare_outputs",
    "cosine_similarity",
    "is_logits_like",
    "max_abs_error",
    "max_error",
    "mean_kl",
    "output_metrics",
    "rel_l2_error",
    "task_accuracy",
    "top1_agreement",
]

#: A reference output whose root-mean-square is below this is "near zero": its relative error is
#: dominated by the tiny denominator and says nothing (a text detector's probability map on a photo
#: without text). Float32 networks produce O(1) activations, so 1e-3 is three orders below them.
NEAR_ZERO_RMS = 1e-3


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def max_abs_error(reference: np.ndarray, test: np.ndarray) -> float:
    """Largest absolute difference, ``max |reference - test|``.

    Parameters
    ----------
    reference, test : numpy.ndarray
        Same shape.

    Returns
    -------
    float
    """
    ref, tst = _f64(reference), _f64(test)
    return float(np.max(np.abs(ref - tst))) if ref.size else 0.0


def rel_l2_error(reference: np.ndarray, test: np.ndarray) -> float | None:
    """Relative Frobenius error ``||reference - test|| / ||reference||``.

    Parameters
    ----------
    reference, test : numpy.ndarray
        Same shape.

    Returns
    -------
    float or None
        None when the reference is exactly zero (the ratio is undefined; look at ``max_abs``).
    """
    ref, tst = _f64(reference), _f64(test)
    denom = float(np.linalg.norm(ref.ravel()))
    num = float(np.linalg.norm((ref - tst).ravel()))
    if denom == 0.0:
        return 0.0 if num == 0.0 else None
    return num / denom


def cosine_similarity(reference: np.ndarray, test: np.ndarray, *, per_sample: bool = False) -> float | None:
    """Cosine of the angle between two outputs.

    Parameters
    ----------
    reference, test : numpy.ndarray
        Same shape.
    per_sample : bool, default False
        If True, the first axis indexes samples: return the mean of the per-sample cosines
        (each sample flattened), the usual figure for embeddings.

    Returns
    -------
    float or None
        1.0 when both are zero; None when exactly one of them is zero.
    """
    ref, tst = _f64(reference), _f64(test)
    if per_sample and ref.ndim >= 1 and ref.shape[0] > 0:
        values = [cosine_similarity(r, t) for r, t in zip(ref, tst)]
        if any(v is None for v in values):
            return None
        return float(np.mean(values))
    a, b = ref.ravel(), tst.ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return None
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def top1_agreement(reference: np.ndarray, test: np.ndarray) -> float:
    """Fraction of rows whose argmax over the last axis agrees.

    Parameters
    ----------
    reference, test : numpy.ndarray
        Logits (or probabilities), classes on the last axis; all leading axes are rows.

    Returns
    -------
    float
    """
    ref, tst = np.asarray(reference), np.asarray(test)
    c = ref.shape[-1]
    return float(np.mean(ref.reshape(-1, c).argmax(-1) == tst.reshape(-1, c).argmax(-1)))


def _looks_like_probabilities(x: np.ndarray) -> bool:
    # already a softmax output: non-negative rows that sum to 1 (float32 rounding allows 1e-3)
    return bool(np.all(x >= 0) and np.allclose(x.sum(-1), 1.0, atol=1e-3))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def mean_kl(reference: np.ndarray, test: np.ndarray, *, inputs_are: str = "auto") -> float:
    """Mean over rows of KL(softmax(reference) || softmax(test)), in nats.

    Parameters
    ----------
    reference, test : numpy.ndarray
        Logits, classes on the last axis; all leading axes are rows.
    inputs_are : {"auto", "logits", "probabilities"}
        "auto" treats the outputs as probabilities (no softmax applied) when every row of both is
        non-negative and sums to 1: a softmax of probabilities would understate the divergence.

    Returns
    -------
    float
    """
    ref, tst = _f64(reference), _f64(test)
    c = ref.shape[-1]
    ref, tst = ref.reshape(-1, c), tst.reshape(-1, c)
    probs = inputs_are == "probabilities" or (
        inputs_are == "auto" and _looks_like_probabilities(ref) and _looks_like_probabilities(tst)
    )
    if probs:
        tiny = np.finfo(np.float64).tiny  # log(0) guard; a zero-probability class contributes 0
        p = ref / ref.sum(-1, keepdims=True)
        q = tst / tst.sum(-1, keepdims=True)
        logp, logq = np.log(np.maximum(p, tiny)), np.log(np.maximum(q, tiny))
    else:
        logp, logq = _log_softmax(ref), _log_softmax(tst)
        p = np.exp(logp)
    kl = np.sum(np.where(p > 0, p * (logp - logq), 0.0), axis=-1)
    return float(np.mean(np.maximum(kl, 0.0)))


def task_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax over the last axis equals the label.

    Parameters
    ----------
    logits : numpy.ndarray
        Classes on the last axis; all leading axes are rows.
    labels : numpy.ndarray
        One integer label per row.

    Returns
    -------
    float

    Raises
    ------
    InputError
        When the number of labels differs from the number of rows.
    """
    arr = np.asarray(logits)
    pred = arr.reshape(-1, arr.shape[-1]).argmax(-1)
    lab = np.asarray(labels).reshape(-1)
    if lab.size != pred.size:
        raise InputError(
            f"labels have {lab.size} entries but the model made {pred.size} predictions "
            f"(samples x rows of an output of shape {arr.shape[1:]} per sample)"
        )
    return float(np.mean(pred == lab))


def is_logits_like(value: np.ndarray) -> bool:
    """Whether an output looks like class scores: floating, rank >= 2, last dim >= 2.

    Parameters
    ----------
    value : numpy.ndarray
        One sample's output.

    Returns
    -------
    bool
    """
    arr = np.asarray(value)
    return bool(np.issubdtype(arr.dtype, np.floating) and arr.ndim >= 2 and arr.shape[-1] >= 2)


def output_metrics(
    reference: Sequence[np.ndarray],
    test: Sequence[np.ndarray],
    *,
    near_zero_rms: float = NEAR_ZERO_RMS,
    name: str = "output",
) -> dict[str, Any]:
    """Accuracy of one output over all samples.

    Parameters
    ----------
    reference, test : sequence of numpy.ndarray
        One array per sample (the original's and the compressed model's output).
    near_zero_rms : float
        Reference RMS below which relative errors are flagged meaningless.
    name : str
        Output name, used in warnings.

    Returns
    -------
    dict
        ``max_abs``, ``mean_abs``, ``rel_l2`` (over all samples), ``cosine`` (mean of per-sample
        cosines), ``cosine_min``, ``ref_rms``, ``ref_max_abs``, ``samples``; for logits-like
        outputs (:func:`is_logits_like`) also ``top1_agreement`` and ``kl``; for integer or
        boolean outputs ``equal_fraction``; ``warnings`` (list of str) when relevant.
    """
    if len(reference) != len(test):
        raise HarnessError(f"output {name!r}: {len(reference)} reference samples vs {len(test)}")
    if not all(isinstance(r, np.ndarray) for r in reference) or not all(
        isinstance(t, np.ndarray) for t in test
    ):
        return {"skipped": "not a tensor output", "samples": len(reference)}
    for i, (r, t) in enumerate(zip(reference, test)):
        if r.shape != t.shape:
            return {
                "skipped": f"shapes differ on sample {i}: {r.shape} vs {t.shape}",
                "samples": len(reference),
                "warnings": [f"output {name!r} changed shape"],
            }
    ref = np.concatenate([_f64(r).ravel() for r in reference]) if reference else np.zeros(0)
    tst = np.concatenate([_f64(t).ravel() for t in test]) if test else np.zeros(0)
    per_sample_cos = [cosine_similarity(r, t) for r, t in zip(reference, test)]
    res: dict[str, Any] = {
        "max_abs": max_abs_error(ref, tst),
        "mean_abs": float(np.mean(np.abs(ref - tst))) if ref.size else 0.0,
        "rel_l2": rel_l2_error(ref, tst),
        "cosine": None if any(c is None for c in per_sample_cos) else float(np.mean(per_sample_cos)),
        "cosine_min": None if any(c is None for c in per_sample_cos) else float(np.min(per_sample_cos)),
        "ref_rms": float(np.sqrt(np.mean(ref**2))) if ref.size else 0.0,
        "ref_max_abs": float(np.max(np.abs(ref))) if ref.size else 0.0,
        "samples": len(reference),
    }
    notes: list[str] = []
    if not np.all(np.isfinite(tst)) and np.all(np.isfinite(ref)):
        notes.append(f"output {name!r} of the compressed model has NaN/inf")
    if res["ref_rms"] < near_zero_rms:
        notes.append(
            f"output {name!r} is near zero (reference RMS {res['ref_rms']:.3g} < {near_zero_rms:g}): "
            "rel_l2 and cosine are not meaningful, judge by max_abs / mean_abs"
        )
    first = reference[0] if reference else np.zeros(0)
    if np.issubdtype(first.dtype, np.integer) or first.dtype == np.bool_:
        res["equal_fraction"] = float(np.mean(ref == tst)) if ref.size else 1.0
    if reference and is_logits_like(first):
        ref_rows = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference])
        tst_rows = np.concatenate([t.reshape(-1, t.shape[-1]) for t in test])
        res["top1_agreement"] = top1_agreement(ref_rows, tst_rows)
        res["kl"] = mean_kl(ref_rows, tst_rows)
    if notes:
        res["warnings"] = notes
        for n in notes:
            logger.warning("%s", n)
    return res


def compare_outputs(
    reference: Mapping[str, Sequence[Any]],
    test: Mapping[str, Sequence[Any]],
    *,
    labels: np.ndarray | None = None,
    near_zero_rms: float = NEAR_ZERO_RMS,
) -> dict[str, dict[str, Any]]:
    """Accuracy per output from outputs already computed.

    The outputs come from :func:`~onnx_lowrank.measure.sessions.run_samples`.

    Parameters
    ----------
    reference, test : mapping of str to sequence
        Output name -> per-sample values, of the original and the compressed model.
    labels : numpy.ndarray, optional
        One class index per prediction of the first logits-like output; adds
        ``task_accuracy_original`` and ``task_accuracy_compressed`` to that output.
    near_zero_rms : float
        See :func:`output_metrics`.

    Returns
    -------
    dict of str to dict
        Output name -> metrics (:func:`output_metrics`).

    Raises
    ------
    InputError
        Labels given but no logits-like output, or a label count that does not match.
    """
    result: dict[str, dict[str, Any]] = {}
    for name, ref_values in reference.items():
        if name not in test:
            result[name] = {"skipped": "output missing from the compressed model"}
            continue
        result[name] = output_metrics(ref_values, test[name], near_zero_rms=near_zero_rms, name=name)
    if labels is not None:
        target = next((n for n, m in result.items() if "top1_agreement" in m), None)
        if target is None:
            raise InputError("labels given but no output looks like class scores (float, rank >= 2, last dim >= 2)")
        ref_rows = np.concatenate([np.asarray(r).reshape(-1, np.asarray(r).shape[-1]) for r in reference[target]])
        tst_rows = np.concatenate([np.asarray(t).reshape(-1, np.asarray(t).shape[-1]) for t in test[target]])
        result[target]["task_accuracy_original"] = task_accuracy(ref_rows, labels)
        result[target]["task_accuracy_compressed"] = task_accuracy(tst_rows, labels)
    return result


def compare_models(
    original: ModelLike,
    compressed: ModelLike,
    inputs: Mapping[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int = 1,
    opt_level: str = "all",
) -> dict[str, dict[str, Any]]:
    """Run two models on the same inputs and measure how far the compressed one drifts.

    Parameters
    ----------
    original, compressed : onnx.ModelProto or path-like
        The reference model and the model under test (same input and output names).
    inputs : mapping of str to numpy.ndarray
        Samples, as returned by :func:`~onnx_lowrank.measure.inputs.make_inputs` or
        :func:`~onnx_lowrank.measure.inputs.load_inputs` (arrays with the model input's rank are
        taken as batch-of-one samples).
    labels : numpy.ndarray, optional
        Class labels for task accuracy (see :func:`compare_outputs`).
    providers : sequence of str
        Execution providers for both sessions.
    threads : int, default 1
        ``intra_op_num_threads``.
    opt_level : str, default "all"
        Graph optimization level (see :data:`~onnx_lowrank.measure.sessions.OPT_LEVELS`).

    Returns
    -------
    dict of str to dict
        Output name -> metrics: ``max_abs``, ``rel_l2``, ``cosine``, ... (see
        :func:`output_metrics`).

    Raises
    ------
    InputError
        Inputs that do not fit the model.
    HarnessError
        A model that does not load or run.

    Examples
    --------
    >>> from onnx_lowrank.measure.inputs import make_inputs
    >>> inputs = make_inputs("model.onnx", shapes={"batch": 1}, samples=8)  # doctest: +SKIP
    >>> acc = compare_models("model.onnx", "model.lowrank.onnx", inputs)  # doctest: +SKIP
    >>> max_error(acc) < 0.05  # doctest: +SKIP
    """
    data = normalize_inputs(inputs, input_specs(original))
    s_ref = create_session(original, providers=providers, threads=threads, opt_level=opt_level)
    s_tst = create_session(compressed, providers=providers, threads=threads, opt_level=opt_level)
    return compare_outputs(run_samples(s_ref, data), run_samples(s_tst, data), labels=labels)


def max_error(accuracy: Mapping[str, Mapping[str, Any]], metric: str = "rel_l2") -> float:
    """Worst value of an error metric over all outputs, for gating (``optimize --check``).

    Parameters
    ----------
    accuracy : mapping
        As returned by :func:`compare_models`.
    metric : str, default "rel_l2"
        An error metric (larger is worse): ``rel_l2``, ``max_abs``, ``mean_abs`` or ``kl``.
        For a near-zero output (see :data:`NEAR_ZERO_RMS`) ``rel_l2`` is replaced by that
        output's ``mean_abs``, since its relative error is meaningless.

    Returns
    -------
    float
        ``inf`` when an output was skipped (changed shape, missing) or the metric is undefined.
    """
    worst = 0.0
    for m in accuracy.values():
        if "skipped" in m and m.get("warnings"):
            return math.inf
        if "skipped" in m:
            continue
        value = m.get(metric)
        if metric == "rel_l2" and m.get("ref_rms", 1.0) < NEAR_ZERO_RMS:
            value = m.get("mean_abs")
        if value is None:
            return math.inf
        worst = max(worst, float(value))
    return worst
