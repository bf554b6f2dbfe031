"""Calibration: run the model in onnxruntime and accumulate each target layer's input Gram matrix.

For every candidate layer the tensor that feeds its weight (the activation ``X``) is exposed as
an extra graph output; the model then runs sample by sample and ``G += F^T F`` is accumulated in
float64, where ``F`` are the layer's input feature rows (``X`` flattened to rows for MatMul,
``op(X)`` for Gemm, im2col patches for Conv). Activations are dropped after each sample: memory
is one ``K x K`` Gram per distinct layer input plus one sample's activations.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from tqdm.auto import tqdm

from onnx_lowrank.measure.errors import HarnessError
from onnx_lowrank.measure.sessions import accuracy_threads, create_session
from onnx_lowrank.model_io import ModelError, is_external
from onnx_lowrank.statistics import CalibrationStats

__all__ = ["collect_grams", "split_samples", "sample_count"]

logger = logging.getLogger(__name__)


def sample_count(inputs: Mapping[str, np.ndarray]) -> int:
    """Samples in a ``{input: (samples, ...)}`` dict."""
    return int(next(iter(inputs.values())).shape[0]) if inputs else 0


def split_samples(
    inputs: Mapping[str, np.ndarray], holdout: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split samples into (calibration, held-out); the held-out part is the last ``holdout``."""
    n = sample_count(inputs)
    k = int(round(n * holdout))
    if n < 2 or k < 1 or k >= n:
        raise ModelError(
            f"cannot hold out {holdout:g} of {n} calibration samples; give more samples or --validation DATA.npz"
        )
    return ({name: a[: n - k] for name, a in inputs.items()}, {name: a[n - k :] for name, a in inputs.items()})


def collect_grams(
    model: onnx.ModelProto,
    requests: Sequence[Any],
    inputs: Mapping[str, np.ndarray],
    *,
    progress: bool = False,
    base_dir: str | None = None,
) -> CalibrationStats:
    """Run ``model`` on ``inputs`` and accumulate the input Gram matrix of each request.

    Parameters
    ----------
    model : onnx.ModelProto
        The original model (not modified; an augmented copy is run).
    requests : sequence
        Objects with ``activation`` (tensor name), ``feature_key`` (hashable; requests with the
        same activation and key share one Gram) and ``features(array) -> (rows, K)``; the
        driver's candidates. Requests with ``diagonal_statistic`` true give
        ``row_counts(array) -> (K,)`` instead, accumulated as the Gram matrix's diagonal (a
        1-D array in :attr:`CalibrationStats.grams`).
    inputs : mapping of str to ndarray
        ``{input name: (samples, *input_shape)}`` as returned by
        :func:`onnx_lowrank.measure.inputs.load_inputs`.
    progress : bool
        Progress bar on stderr.
    base_dir : str, optional
        Directory of the model file when its external data was not loaded into memory.

    Returns
    -------
    CalibrationStats
    """
    start = time.perf_counter()
    wanted: dict[Any, Any] = {}
    for req in requests:
        wanted.setdefault((req.activation, req.feature_key), req)
    graph_inputs = {i.name for i in model.graph.input}
    exposed = sorted({act for act, _ in wanted if act not in graph_inputs})
    stats = CalibrationStats()
    n = sample_count(inputs)
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-calib-") as tmp:
        session = _session_with_outputs(model, exposed, Path(tmp), base_dir)
        names = [o.name for o in session.get_outputs()]
        index = {name: names.index(name) for name in exposed}
        bar = tqdm(range(n), desc="calibrating", unit="sample", disable=not progress, leave=False)
        pending: dict[Any, list[np.ndarray]] = defaultdict(list)
        waiting: dict[Any, int] = defaultdict(int)
        for i in bar:
            feed = {k: v[i] for k, v in inputs.items()}
            try:
                outs = session.run(names if exposed else None, feed)
            except Exception as exc:  # onnxruntime raises several types; one line for the user
                raise ModelError(f"calibration sample {i} failed in onnxruntime: {str(exc).splitlines()[0]}") from None
            for key, req in wanted.items():
                act_name = key[0]
                act = feed[act_name] if act_name in graph_inputs else outs[index[act_name]]
                if getattr(req, "diagonal_statistic", False):
                    # A lookup's inputs are one-hot rows: their Gram matrix is the diagonal of
                    # row counts, kept as a vector (30522 x 30522 would not fit).
                    counts = np.asarray(req.row_counts(np.asarray(act)), dtype=np.float64)
                    stats.grams[key] = stats.grams.get(key, 0.0) + counts
                    stats.rows[key] = stats.rows.get(key, 0) + int(np.asarray(act).size)
                    continue
                rows = np.asarray(req.features(np.asarray(act)), dtype=np.float64)
                pending[key].append(rows)
                waiting[key] += rows.shape[0]
                if waiting[key] >= _ROWS_PER_UPDATE:
                    _accumulate(stats, key, pending, waiting)
        for key in list(pending):
            _accumulate(stats, key, pending, waiting)
        bar.close()
        del session
    stats.samples = n
    stats.seconds = time.perf_counter() - start
    logger.info("calibration: %d samples, %d Gram matrices in %.2fs", n, len(stats.grams), stats.seconds)
    return stats


#: Feature rows gathered per layer input before one ``G += F^T F`` update. A per-sample update
#: of a K x K Gram matrix is memory bound when a sample gives few rows (one per image for a
#: classifier, a sentence's tokens for a transformer; profiled on MiniLM: 8.6 s in the updates
#: against 0.8 s in onnxruntime for 20 sentences); batching makes them one GEMM per this many
#: rows, at a cost of this many rows x K floats per layer input.
_ROWS_PER_UPDATE = 2048


def _accumulate(stats: CalibrationStats, key: Any, pending: dict, waiting: dict) -> None:
    if not pending[key]:
        return
    rows = np.concatenate(pending[key], axis=0) if len(pending[key]) > 1 else pending[key][0]
    pending[key] = []
    waiting[key] = 0
    if key not in stats.grams:
        stats.grams[key] = np.zeros((rows.shape[1], rows.shape[1]))
        stats.rows[key] = 0
    stats.grams[key] += rows.T @ rows
    stats.rows[key] += rows.shape[0]


def _session_with_outputs(
    model: onnx.ModelProto, names: Sequence[str], tmp: Path, base_dir: str | None = None
) -> ort.InferenceSession:
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {o.name for o in augmented.graph.output}
    types = _elem_types(model)
    for name in names:
        if name not in present:
            augmented.graph.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
    path = tmp / "calibration.onnx"
    external = any(is_external(t) for t in onnx.external_data_helper._get_all_tensors(augmented))
    if external:
        # Weights still on disk: onnxruntime refuses data files outside the model's directory
        # (symbolic links included), so the copy run for calibration reads them in; calibration
        # of such models costs one extra copy of the weights in memory (onnxruntime holds one).
        if base_dir is None:
            raise ModelError("calibration needs the model's external data directory")
        onnx.external_data_helper.load_external_data_for_model(augmented, base_dir)
    onnx.save_model(augmented, str(path), save_as_external_data=_large(augmented) or external,
                    all_tensors_to_one_file=True, location="calibration.onnx.data")
    del augmented
    try:
        # Exposed intermediate outputs survive graph optimization, so "all" is safe and fast.
        return create_session(str(path), threads=accuracy_threads(), record_assignment=False)
    except HarnessError as exc:
        raise ModelError(f"calibration: {exc}") from None


def _large(model: onnx.ModelProto) -> bool:
    return sum(len(t.raw_data) for t in model.graph.initializer) > 1_800_000_000


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, from the model's own value_info plus shape inference."""
    from onnx_lowrank.flops import load_model_skeleton

    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(load_model_skeleton(model), strict_mode=False)
        values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    except Exception:  # shape inference is best effort here; FLOAT is the fallback
        values = list(model.graph.value_info)
    for v in values:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    return types
