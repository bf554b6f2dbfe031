"""The library entry point: ``optimize(model_or_path, config) -> (model, report)``."""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Union

import numpy as np
import onnx

from onnx_lowrank.passes import PassState, apply_lowrank

from onnx_lowrank.measure.calibration import sample_count, split_samples
from onnx_lowrank.config import ConfigError, LowRankConfig
from onnx_lowrank.flops import count_params, load_model_skeleton
from onnx_lowrank.model_io import ModelError, SpilledWeights, external_data_bytes, load_model, load_weights, model_file_size
from onnx_lowrank.report import Report

__all__ = ["optimize", "default_model_path"]

Inputs = Union[str, "os.PathLike[str]", Mapping[str, np.ndarray]]

#: Models whose external data exceed this are optimized with their weights left on disk and read
#: one at a time (1 GiB: above it, holding the model and its factors would dominate memory).
LAZY_THRESHOLD = 1 << 30

logger = logging.getLogger(__name__)


def optimize(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    config: LowRankConfig | None = None,
    *,
    calibration: Inputs | None = None,
    validation: Inputs | None = None,
    progress: bool = False,
    check: bool = True,
    lazy: bool | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Factorize the constant weights of MatMul, Gemm and Conv nodes into low-rank pairs.

    Parameters
    ----------
    model_or_path : onnx.ModelProto or path-like
        The model, or the path of an ``.onnx`` file (its external data is loaded too). A
        ``ModelProto`` passed in is never modified: the result is a new message. Its weights
        are written to a temporary file and read from there one at a time (unless ``lazy`` is
        False, or ``config`` needs the model in memory: ``max_error``, measured allocation),
        so that memory holds it once plus the result.
    config : LowRankConfig, optional
        Method, rank policy and targets; ``LowRankConfig()`` (RSI, keep 50% of each layer's
        parameters) when omitted.
    calibration : path-like or mapping of str to ndarray, optional
        Calibration inputs: an ``.npz`` with one array per model input (first axis = samples)
        or the same as a dict. Each target layer is then factorized for its output error on
        these inputs (``config.whiten``), and energies and global allocation use the whitened
        spectra.
    validation : path-like or mapping, optional
        Held-out inputs for ``config.max_error``; by default the last ``config.holdout`` of the
        calibration samples are held out (and not used for calibration).
    progress : bool
        Progress bars on stderr (calibration, factorization, search).
    check : bool
        Run ``onnx.checker`` on the result's graph (a data-free copy, so any size is cheap).
    lazy : bool, optional
        For a path: keep the weights on disk (in the external data file, or inside the
        ``.onnx`` file of a single-file model) and read each one when its turn comes, so memory
        holds about one weight at a time plus the factors. The returned model then still refers
        to the input's files for the weights it did not change: save it with
        ``save_model(model, out, input_path=path)``, which copies them over (into a single
        file again for a single-file input). ``None`` (default) does so when the external data
        exceeds :data:`LAZY_THRESHOLD`; below, the weights are read one at a time all the same
        and the unchanged ones read in at the end, so the result is self-contained. ``False``
        reads every weight into memory first (a ``ModelProto`` is then copied in memory
        instead of its weights spilled to a temporary file).

    Returns
    -------
    model : onnx.ModelProto
        The rewritten model: each factorized node replaced by two chained nodes
        ``(X @ A) @ B`` with ``A (m x r)`` and ``B (r x n)``; opset, metadata, graph inputs,
        outputs and value_info preserved.
    report : Report
        One row per candidate node (rank, parameters, relative and optimal error, or the reason
        it was skipped) and totals; ``report.to_json()`` is the ``--report`` file.

    Notes
    -----
    A weight ``W (m x n)`` costs ``m n`` parameters dense and ``r (m + n)`` factorized, so a
    layer is only factorized below its break-even rank ``m n / (m + n)`` unless
    ``config.force`` is set.

    References
    ----------
    N. Halko, P. G. Martinsson, J. A. Tropp, "Finding structure with randomness: probabilistic
    algorithms for constructing approximate matrix decompositions", SIAM Review 53(2), 2011.
    """
    with ExitStack() as scratch:  # holds the weights of a ModelProto spilled to disk, if any
        return _optimize(model_or_path, config, calibration, validation, progress, check, lazy, scratch)


def _optimize(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    config: LowRankConfig | None,
    calibration: Inputs | None,
    validation: Inputs | None,
    progress: bool,
    check: bool,
    lazy: bool | None,
    scratch: ExitStack,
) -> tuple[onnx.ModelProto, Report]:
    config = config if config is not None else LowRankConfig()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    input_path: str | None = None
    size_before: int | None = None
    base_dir: str | None = None
    spill: SpilledWeights | None = None
    read_back = False
    allocation = config.allocation_for(calibration is not None)
    in_memory_modes = config.runs_model(calibration is not None)
    if isinstance(model_or_path, onnx.ModelProto):
        if lazy is not False and not in_memory_modes:
            # Weights to a temporary file, read back one at a time: a plain copy would hold the
            # model twice, and protobuf keeps the memory of the weights replaced by factors.
            try:
                spill = scratch.enter_context(SpilledWeights(model_or_path))
                model, base_dir = spill.model, spill.directory
            except OSError as exc:
                logger.warning("cannot spill the weights to a temporary file (%s): working in memory", exc)
        if spill is None:
            model = onnx.ModelProto()
            model.CopyFrom(model_or_path)
    elif isinstance(model_or_path, (str, os.PathLike)):
        input_path = str(model_or_path)
        # Validates the file first, reading no weight (those inside a single-file model neither).
        model = load_model(model_or_path, lazy=True)
        size_before = model_file_size(model_or_path)
        base_dir = str(Path(model_or_path).resolve().parent)
        chosen = lazy is None
        if chosen:
            lazy = external_data_bytes(model_or_path) > LAZY_THRESHOLD
        if lazy and in_memory_modes and config.allocation == "auto" and config.max_error is None:
            # The weighted allocation's probes would load the model; its weights stay on disk.
            allocation, in_memory_modes = "energy", False
            logger.warning("the model's weights stay on disk: using --allocation energy, not weighted")
        # Below the threshold the weights are read one at a time all the same, and the ones left
        # unchanged read in at the end: the weights replaced by factors are never held.
        read_back = chosen and not lazy and not in_memory_modes
        if not lazy and not read_back:
            model, base_dir = load_model(model_or_path), None
        elif lazy and in_memory_modes:
            raise ConfigError(f"{'--max-error' if config.max_error is not None else '--allocation ' + allocation} runs "
                              "the model in memory, which this model is too large for (its weights are read from disk "
                              "one at a time); use --allocation energy")
    else:
        raise TypeError(f"optimize() takes an onnx.ModelProto or a path, not {type(model_or_path).__name__}")
    seconds["load"] = time.perf_counter() - start

    params_before = count_params(model)
    details: dict[str, Any] = {}
    calib = _inputs(calibration, model, "calibration") if calibration is not None else None
    valid = _inputs(validation, model, "validation") if validation is not None else None
    if config.max_error is not None and calib is None:
        raise ConfigError("--max-error needs --calibration DATA.npz: the error is measured on held-out samples")
    if allocation in ("weighted", "measured") and calib is None:
        raise ConfigError(f"--allocation {allocation} needs --calibration DATA.npz: losses are measured on it")
    probe_data = None  # (whitening, held-out) samples of the weighted allocation's probes
    if valid is None and calib is not None and (config.max_error is not None or allocation == "measured"):
        # Errors are measured on samples the whitening never saw: in-sample, a layer with fewer
        # calibration rows than features looks free (its whitened error is ~0 on those rows).
        calib, valid = split_samples(calib, config.holdout)
    elif allocation == "weighted" and config.max_error is None:
        if valid is not None:
            probe_data = (calib, valid)
        elif config.allocation == "auto" and sample_count(calib) * config.holdout < 1:  # type: ignore[arg-type]
            allocation = "energy"
            logger.warning("too few calibration samples to hold some out for the weighted allocation: "
                           "using --allocation energy")
        else:
            # The probes need held-out samples; the final factorization then whitens with all.
            probe_data = split_samples(calib, config.holdout)  # type: ignore[arg-type]
    if calib is not None:
        details["calibration"] = {"samples": sample_count(calib), "whiten": _whiten_mode(config)}
    if valid is not None:
        details["validation"] = {"samples": sample_count(valid)}
    shapes = {name: list(a.shape[1:]) for name, a in calib.items()} if calib is not None else None

    start = time.perf_counter()
    table = None
    state = new_pass_state(config, prefactorize=config.max_error is not None or allocation == "measured",
                           base_dir=base_dir)
    if allocation != "none":
        details["allocation"] = {"method": allocation}
    if allocation == "measured":
        from onnx_lowrank.search.sensitivity import measure_sensitivity

        table = measure_sensitivity(model, config, calib, state, evaluation=valid, input_shapes=shapes,  # type: ignore[arg-type]
                                    progress=progress)
        details["sensitivity"] = table.to_dict()
        seconds["sensitivity"] = time.perf_counter() - start
    elif allocation == "weighted":
        from onnx_lowrank.search.sensitivity import PROBE_FRACTIONS, layer_weights, measure_sensitivity

        fit, held = probe_data if probe_data is not None else (calib, valid)
        # Probes whiten with their own split; a search (max_error) whitens with it too, so the
        # Gram matrices are shared, while a single run then whitens with every sample.
        probe_state = state if probe_data is None else new_pass_state(config, base_dir=base_dir)
        probes = measure_sensitivity(model, config, fit, probe_state, evaluation=held, input_shapes=shapes,  # type: ignore[arg-type]
                                     progress=progress, fractions=PROBE_FRACTIONS)
        state.layer_weights = layer_weights(probes)
        if probe_state is not state:
            state.macs, state.shapes = probe_state.macs, probe_state.shapes
        details["allocation"].update({
            "trials": sum(len(layer.options) - 1 for layer in probes.layers),
            "seconds": round(probes.seconds, 3),
            "weights": {label: round(w, 6) for label, w in state.layer_weights.items()},
        })
        seconds["sensitivity"] = time.perf_counter() - start
    if config.max_error is not None:
        model, rows, search = _search_budget(model, config, calib, valid, shapes, state, table, progress)  # type: ignore[arg-type]
        details["search"] = search
    else:
        fixed = None
        if table is not None:
            from onnx_lowrank.search.sensitivity import allocate_measured

            fixed, loss = allocate_measured(table, float(config.target_params or config.target_flops))  # type: ignore[arg-type]
            details["sensitivity"]["estimated_loss"] = loss
        rows = apply_lowrank(model, config, calibration=calib, input_shapes=shapes, state=state,
                             fixed_ranks=fixed, progress=progress)
    if state.stats is not None:
        details["calibration"]["seconds"] = round(state.stats.seconds, 3)
    seconds["optimize"] = time.perf_counter() - start
    seconds.update(state.seconds)  # its split: plan (incl. calibration), factorize, rewrite
    if spill is not None or read_back:
        start = time.perf_counter()
        if spill is not None:
            spill.restore(model)  # the result is self-contained, as the argument was
        else:
            load_weights(model, model_or_path)  # type: ignore[arg-type]
        seconds["load"] += time.perf_counter() - start

    if check:
        start = time.perf_counter()
        try:
            # The graph is checked on a data-free copy: checking the model itself would serialize
            # all of its weights once more (and weights left on disk are not readable from here).
            onnx.checker.check_model(load_model_skeleton(model))
        except onnx.checker.ValidationError as exc:  # a bug of ours, never the user's input
            raise ModelError(f"internal error: the rewritten model fails onnx.checker: {exc}") from exc
        seconds["check"] = time.perf_counter() - start

    report = Report(
        layers=rows,
        config=config.to_dict(),
        model_params_before=params_before,
        model_params_after=count_params(model),
        input_path=input_path,
        size_before=size_before,
        seconds=seconds,
        details=details,
    )
    done = report.factorized
    logger.info("factorized %d of %d candidate layers", len(done), len(rows))
    return model, report


def new_pass_state(config: LowRankConfig, **fields: Any) -> PassState:
    """A :class:`PassState` with what the pass needs from the runtime, for ``config``.

    The pass imports no onnxruntime: its activation statistics (calibration runs), measured
    latency ratios (``--latency measure``) and the job executor (``--dask``) are handed in here.

    Parameters
    ----------
    config : LowRankConfig
    **fields
        Other :class:`PassState` fields (``prefactorize``, ``base_dir``).

    Returns
    -------
    PassState
    """
    from onnx_lowrank.measure.calibration import collect_grams

    state = PassState(statistics=collect_grams, **fields)
    if config.latency == "measure":
        from onnx_lowrank.measure.latency import measured_ratio

        state.latency_ratio = measured_ratio
    if config.dask:
        from onnx_lowrank.distributed import executor

        state.executor = executor(config.dask)
    return state


def _inputs(data: Inputs, model: onnx.ModelProto, what: str) -> dict[str, np.ndarray]:
    from onnx_lowrank.measure import errors, inputs

    try:
        if isinstance(data, Mapping):
            return inputs.normalize_inputs(dict(data), inputs.input_specs(model), source=what)
        return inputs.load_inputs(data, model)
    except (errors.InputError, errors.MissingFileError) as exc:
        raise ModelError(f"--{what}: {exc}") from None


def _whiten_mode(config: LowRankConfig) -> str:
    return "full" if config.whiten == "auto" else config.whiten


def _search_budget(
    model: onnx.ModelProto,
    config: LowRankConfig,
    calibration: dict[str, np.ndarray],
    validation: dict[str, np.ndarray],
    shapes: dict[str, list[int]] | None,
    state: PassState,
    table: Any,
    progress: bool,
) -> tuple[onnx.ModelProto, list, dict[str, Any]]:
    """Smallest global parameter budget whose held-out relative output error is <= max_error.

    Bisection on ``target_params`` over (0, 1]: the error falls as the budget grows (each
    allocation contains the smaller ones' ranks up to ties), 7 steps resolve the budget to 1/128.
    Factorizations are computed once per weight just below break-even and sliced, and the Gram
    matrices once, so each step costs an allocation, a rewrite and one onnxruntime evaluation.
    """
    from onnx_lowrank.measure import accuracy, sessions

    from onnx_lowrank.search.trials import TrialModels

    limit = float(config.max_error)  # type: ignore[arg-type]
    reference = sessions.run_samples(sessions.create_session(model, threads=sessions.accuracy_threads()), validation)
    steps: list[dict[str, float]] = []

    def evaluate(fraction: float) -> tuple[onnx.ModelProto, list, float]:
        cfg = replace(config, max_error=None, target_params=fraction)
        fixed = None
        if table is not None:
            from onnx_lowrank.search.sensitivity import allocate_measured

            fixed, _ = allocate_measured(table, fraction)
        trial, rows = trials.build(cfg, calibration, shapes, fixed, progress=progress and not steps)
        outputs = sessions.run_samples(trials.session(trial), validation)
        error = accuracy.max_error(accuracy.compare_outputs(reference, outputs))
        steps.append({"target_params": round(fraction, 6), "error": float(error)})
        logger.info("budget %.4f: held-out error %.4g", fraction, error)
        return trial, rows, error

    with TrialModels(model, state) as trials:
        lo, hi = 0.0, 1.0
        best = None
        for _ in range(7):
            mid = (lo + hi) / 2
            trial, rows, error = evaluate(mid)
            if error <= limit:
                hi, best = mid, (trial, rows, error)
            else:
                lo = mid
        compressed = best is not None
        if best is None:  # nothing below the limit except keeping every layer dense
            best = evaluate(1.0)
            logger.warning("no budget below 1 keeps the held-out error under %g: every layer is kept dense", limit)
        trial, rows, error = best
        trials.materialize(trial)  # its unchanged weights, back from the spill before it goes
    search = {"max_error": limit, "target_params": hi, "error": error, "steps": steps,
              "reached": error <= limit, "compressed": compressed}
    return trial, rows, search


def default_model_path() -> Path:
    """The small real model shipped with the package (an MLP trained on scikit-learn's digits)."""
    return Path(__file__).resolve().parent / "data" / "digits_mlp.onnx"
