"""onnxruntime sessions set up for measurement, and running them sample by sample.

- :func:`create_session`: one intra-op thread by default, sequential execution, a chosen graph
  optimization level (:data:`OPT_LEVELS`), the provider assignment of every node recorded;
- :func:`provider_assignment`: which execution provider really ran how many nodes (an
  unavailable provider silently falls back to the CPU);
- :func:`run_samples`: one run per sample of an input dict (see :mod:`onnx_lowrank.measure.inputs`);
- :func:`accuracy_threads`: the thread count of sessions that measure outputs, not time.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank.measure.errors import HarnessError, InputError, MissingFileError, one_line
from onnx_lowrank.measure.inputs import ModelLike, num_samples, sample_feed

__all__ = [
    "OPT_LEVELS",
    "accuracy_threads",
    "create_session",
    "provider_assignment",
    "run_samples",
]

#: ``--opt-level`` names -> onnxruntime graph optimization levels.
OPT_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _model_source(model: ModelLike) -> str | bytes:
    if isinstance(model, onnx.ModelProto):
        try:
            return model.SerializeToString()
        except ValueError as exc:
            raise HarnessError(
                f"model is too large to pass in memory ({exc}); save it with external data and pass the path"
            ) from exc
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise MissingFileError(f"model file not found: {path}")
    return path


def accuracy_threads() -> int:
    """onnxruntime threads for sessions that measure outputs, not time (calibration, probes).

    Two where there are two cores: onnxruntime's CPU kernels split work by output rows, so the
    outputs are the same bits for any thread count (checked for 1 to 4 threads on MiniLM-L6,
    EfficientNet-Lite0 and the digits MLP), and two threads halve the probes' inference time
    on MiniLM (1.1 -> 0.6 s per 16 sentences). More threads than that gained nothing here.
    """
    return min(2, os.cpu_count() or 1)


def create_session(
    model: ModelLike,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int = 1,
    opt_level: str = "all",
    record_assignment: bool = True,
) -> ort.InferenceSession:
    """Create an inference session set up for reproducible measurement.

    Parameters
    ----------
    model : onnx.ModelProto or path-like
        A path is preferred (onnxruntime then finds external data next to it).
    providers : sequence of str
        Execution providers in priority order. An unavailable provider makes onnxruntime fall
        back to CPU silently; check ``session.get_providers()`` and :func:`provider_assignment`.
    threads : int, default 1
        ``intra_op_num_threads``; ``inter_op_num_threads`` is always 1 (sequential execution).
        One thread is the default because multi-thread timings on shared machines are noise.
    opt_level : {"disable", "basic", "extended", "all"}
        Graph optimization level.
    record_assignment : bool, default True
        Record which provider each node was assigned to (onnxruntime >= 1.23).

    Returns
    -------
    onnxruntime.InferenceSession

    Raises
    ------
    InputError
        Unknown ``opt_level`` or a missing model file.
    HarnessError
        When onnxruntime cannot load the model.
    """
    if opt_level not in OPT_LEVELS:
        raise InputError(f"unknown optimization level {opt_level!r}; choose from {', '.join(OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = OPT_LEVELS[opt_level]
    so.log_severity_level = 3  # errors only: the provider fallback warning is reported by us
    if record_assignment:
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    source = _model_source(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Specified provider ... is not in available provider names"
        try:
            return ort.InferenceSession(source, sess_options=so, providers=list(providers))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            name = source if isinstance(source, str) else "model"
            raise HarnessError(f"onnxruntime cannot load {name}: {one_line(exc)}") from exc


def provider_assignment(session: ort.InferenceSession) -> dict[str, int]:
    """Count the nodes each execution provider was assigned in a session.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        Created with ``record_assignment=True`` (see :func:`create_session`).

    Returns
    -------
    dict of str to int
        Provider name -> number of nodes of the optimized graph. When the running onnxruntime
        cannot report assignments, all nodes are attributed to the first provider of the session.
    """
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:  # noqa: BLE001 - older onnxruntime, or recording not enabled
        subgraphs = None
    if not subgraphs:
        return {session.get_providers()[0]: -1}  # -1: count unknown
    counts: dict[str, int] = {}
    for sg in subgraphs:
        counts[sg.ep_name] = counts.get(sg.ep_name, 0) + len(sg.get_nodes())
    return counts


def run_samples(
    session: ort.InferenceSession, inputs: Mapping[str, np.ndarray]
) -> dict[str, list[Any]]:
    """Run a session once per sample.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
    inputs : mapping of str to numpy.ndarray
        Sample arrays, ``(samples, *input_shape)``.

    Returns
    -------
    dict of str to list
        Output name -> one value per sample (arrays for tensor outputs).

    Raises
    ------
    HarnessError
        When a run fails (the message carries onnxruntime's reason).
    """
    names = [o.name for o in session.get_outputs()]
    out: dict[str, list[Any]] = {n: [] for n in names}
    for i in range(num_samples(inputs)):
        try:
            values = session.run(names, sample_feed(inputs, i))
        except Exception as exc:  # noqa: BLE001
            raise HarnessError(f"inference failed on sample {i}: {one_line(exc)}") from exc
        for n, v in zip(names, values):
            out[n].append(v)
    return out
