"""onnxruntime harness: what a compressed model cost (accuracy) and what it bought (size, latency,
mobile readiness).

The pieces, each usable alone:

- inputs: :func:`input_specs`, :func:`make_inputs` (generated from the model's input specs),
  :func:`load_inputs` (real data from an ``.npz``), :func:`parse_shapes`, :func:`parse_int_range`;
- accuracy: the metric functions (:func:`max_abs_error`, :func:`rel_l2_error`,
  :func:`cosine_similarity`, :func:`top1_agreement`, :func:`mean_kl`, :func:`task_accuracy`),
  :func:`output_metrics` for one output and :func:`compare_models` for two models;
- latency: :func:`interleaved_timings` (A B A B ..., injectable clock) and :func:`summarize_timings`;
- providers: :func:`create_session`, :func:`provider_assignment`;
- mobile: :func:`mobile_usability` (NNAPI / CoreML partitions), :func:`ort_format_check`
  (conversion to ORT format for ARM, outputs confirmed, required operators);
- size: :func:`model_size_bytes`, :func:`model_stats`.

Sample layout: an input dict maps each model input name to an array whose first axis indexes
samples; ``inputs[name][i]`` is what the model receives for sample ``i`` (so it has the model
input's rank, typically with batch 1). :func:`load_inputs` also accepts arrays with the model
input's rank, whose first axis is then both the batch and the sample axis (each sample becomes a
batch of one).

Errors meant for the user (a missing file, an input the model does not have, a wrong shape, a
symbolic dimension left unset) raise :class:`InputError`; failures of the models themselves raise
:class:`HarnessError`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import pathlib
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank import flops as _flops
from onnx_lowrank.model_io import ModelError, model_file_size

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INT_RANGE",
    "HarnessError",
    "InputError",
    "InputSpec",
    "NEAR_ZERO_RMS",
    "OPT_LEVELS",
    "accuracy_threads",
    "compare_models",
    "compare_outputs",
    "convert_to_ort",
    "cosine_similarity",
    "create_session",
    "input_specs",
    "interleaved_timings",
    "is_logits_like",
    "load_inputs",
    "load_labels",
    "make_inputs",
    "max_abs_error",
    "max_error",
    "mean_kl",
    "mobile_report",
    "mobile_usability",
    "model_size_bytes",
    "model_stats",
    "new_operators",
    "normalize_inputs",
    "num_samples",
    "ort_format_check",
    "output_metrics",
    "parse_int_range",
    "parse_shapes",
    "provider_assignment",
    "rel_l2_error",
    "run_samples",
    "sample_feed",
    "summarize_timings",
    "task_accuracy",
    "top1_agreement",
]

ModelLike = Union[onnx.ModelProto, str, "os.PathLike[str]"]

#: ``--opt-level`` names -> onnxruntime graph optimization levels.
OPT_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

#: A reference output whose root-mean-square is below this is "near zero": its relative error is
#: dominated by the tiny denominator and says nothing (a text detector's probability map on a photo
#: without text). Float32 networks produce O(1) activations, so 1e-3 is three orders below them.
NEAR_ZERO_RMS = 1e-3

# Integer inputs with these words in their name get a fixed value instead of random draws:
# transformer attention masks must be 1 (attend everywhere) and token type ids 0 (one segment);
# random values there would measure a model state no user ever sees.
_ONES_NAMES = ("mask",)
_ZEROS_NAMES = ("token_type", "segment")

#: Default range of generated integer inputs, half-open [lo, hi): valid token ids for any
#: vocabulary of at least 100 entries, valid class/index values for small tables.
DEFAULT_INT_RANGE = (0, 100)

# Outputs of the .ort file must agree with the .onnx file within these tolerances: both run the
# same CPU kernels, but the ORT-format graph was optimized for ARM (no NCHWc layout), so the float
# summation order can differ slightly.
_ORT_RTOL = 1e-3
_ORT_ATOL = 1e-5


class HarnessError(RuntimeError):
    """A model could not be loaded, run or converted (exit code 1 in the CLI)."""


class InputError(HarnessError, ValueError):
    """User-supplied inputs or options are wrong (exit code 2 in the CLI)."""


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """A graph input of a model.

    Attributes
    ----------
    name : str
        Input name.
    dtype : numpy.dtype
        Element type.
    shape : tuple
        Declared dimensions: ``int`` for fixed ones, ``str`` for named symbolic ones
        (``"batch"``), ``None`` for anonymous ones.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def rank(self) -> int:
        """Number of dimensions."""
        return len(self.shape)


def _load_proto(model: ModelLike, *, with_data: bool = False) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise InputError(f"model file not found: {path}")
    try:
        return onnx.load(path, load_external_data=with_data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise HarnessError(f"cannot read ONNX model {path}: {exc}") from exc


def input_specs(model: ModelLike) -> list[InputSpec]:
    """List the inputs a model must be fed.

    Parameters
    ----------
    model : onnx.ModelProto or path-like
        The model (a path is read without external data).

    Returns
    -------
    list of InputSpec
        Graph inputs that are not initializers, in graph order.
    """
    proto = _load_proto(model)
    inits = {t.name for t in proto.graph.initializer}
    specs = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise HarnessError(f"input {vi.name!r} is not a tensor; only tensor inputs are supported")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value") and d.dim_value >= 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(vi.name, dtype, tuple(dims)))
    return specs


_SHAPE_RE = re.compile(r"^\s*([^=\s][^=]*?)\s*=\s*(\d+(?:\s*[xX,]\s*\d+)*)\s*$")


def parse_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``--shape`` arguments.

    Parameters
    ----------
    items : sequence of str
        Each ``NAME=D1xD2x...``: ``NAME`` is a model input (the value is its full shape) or a
        symbolic dimension name such as ``batch`` (the value is a single integer).
        ``,`` is accepted in place of ``x``.

    Returns
    -------
    dict of str to tuple of int

    Raises
    ------
    InputError
        On a malformed item or a name given twice.
    """
    out: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        m = _SHAPE_RE.match(item)
        if not m:
            raise InputError(
                f"bad --shape {item!r}: expected NAME=D1xD2x... (e.g. input_ids=1x128, or batch=1 "
                "for a symbolic dimension)"
            )
        name = m.group(1)
        if name in out:
            raise InputError(f"--shape {name} given twice")
        out[name] = tuple(int(v) for v in re.split(r"\s*[xX,]\s*", m.group(2)))
    return out


def parse_int_range(text: str | None) -> tuple[int, int] | None:
    """Parse ``--int-range LO:HI`` (half-open, like :func:`numpy.random.Generator.integers`).

    Parameters
    ----------
    text : str or None

    Returns
    -------
    tuple of int or None

    Raises
    ------
    InputError
        When the text is not ``LO:HI`` with integers ``LO < HI``.
    """
    if text is None:
        return None
    m = re.fullmatch(r"\s*(-?\d+)\s*:\s*(-?\d+)\s*", text)
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise InputError(f"bad --int-range {text!r}: expected LO:HI with integers LO < HI, e.g. 0:30522")
    return int(m.group(1)), int(m.group(2))


def _resolve_shapes(
    specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int] | int] | None
) -> dict[str, tuple[int, ...]]:
    shapes = dict(shapes or {})
    by_name = {s.name: s for s in specs}
    dim_names = {d for s in specs for d in s.shape if isinstance(d, str)}
    dim_values: dict[str, int] = {}
    full: dict[str, tuple[int, ...]] = {}
    for key, value in shapes.items():
        value_t = (int(value),) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
        if any(v <= 0 for v in value_t):
            raise InputError(f"--shape {key}: dimensions must be positive, got {value_t}")
        if key in by_name:
            spec = by_name[key]
            if len(value_t) != spec.rank:
                raise InputError(
                    f"--shape {key}={'x'.join(map(str, value_t))} has rank {len(value_t)} but input "
                    f"{key!r} has rank {spec.rank} {_fmt_spec_shape(spec.shape)}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, value_t)):
                if isinstance(want, int) and want != got:
                    raise InputError(
                        f"--shape {key}: dimension {axis} is fixed to {want} in the model, got {got}"
                    )
            full[key] = value_t
        elif key in dim_names:
            if len(value_t) != 1:
                raise InputError(f"--shape {key}: a symbolic dimension takes one integer, e.g. {key}=1")
            dim_values[key] = value_t[0]
        else:
            known = ", ".join(by_name) or "(none)"
            dims = ", ".join(sorted(dim_names)) or "(none)"
            raise InputError(
                f"--shape {key}: the model has no input or symbolic dimension of that name "
                f"(inputs: {known}; symbolic dims: {dims})"
            )
    resolved: dict[str, tuple[int, ...]] = {}
    unset: list[str] = []
    for spec in specs:
        if spec.name in full:
            resolved[spec.name] = full[spec.name]
            continue
        dims = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                dims.append(d)
            elif isinstance(d, str) and d in dim_values:
                dims.append(dim_values[d])
            else:
                unset.append(f"{spec.name}[{axis}]" + (f" ({d})" if d else ""))
                dims.append(-1)
        resolved[spec.name] = tuple(dims)
    if unset:
        example = next(s for s in specs if any(not isinstance(d, int) for d in s.shape))
        hint = "x".join(str(d) if isinstance(d, int) else "N" for d in example.shape)
        raise InputError(
            f"symbolic dimension(s) not set: {', '.join(unset)}; set them with --shape "
            f"{example.name}={hint} (or --shape DIM=N per named dim), or pass real data with --inputs"
        )
    return resolved


def _fmt_spec_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def make_inputs(
    model: ModelLike,
    *,
    shapes: Mapping[str, Sequence[int] | int] | None = None,
    int_range: tuple[int, int] | None = None,
    samples: int = 1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Generate random inputs from a model's input specs.

    Parameters
    ----------
    model : onnx.ModelProto or path-like
        The model.
    shapes : mapping, optional
        Concrete shapes for inputs with symbolic dimensions: input name -> full shape, or
        symbolic dimension name -> int (see :func:`parse_shapes`).
    int_range : tuple of int, optional
        Half-open range ``[lo, hi)`` of integer inputs such as token ids. Default
        ``DEFAULT_INT_RANGE``. Integer inputs named like ``*mask*`` are all ones and
        ``*token_type*`` / ``*segment*`` all zeros, whatever the range.
    samples : int, default 1
        Number of samples.
    seed : int, default 0
        Seed of the generator; the same seed gives the same inputs.

    Returns
    -------
    dict of str to numpy.ndarray
        ``inputs[name]`` has shape ``(samples, *input_shape)`` and the model's dtype. Floats are
        drawn from N(0, 1), booleans uniformly.

    Raises
    ------
    InputError
        When a symbolic dimension is not set by ``shapes`` (the message names it).
    """
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}")
    specs = input_specs(model)
    concrete = _resolve_shapes(specs, shapes)
    lo, hi = int_range or DEFAULT_INT_RANGE
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = (samples, *concrete[spec.name])
        lname = spec.name.lower()
        if spec.dtype == np.bool_:
            arr = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif np.issubdtype(spec.dtype, np.integer):
            if any(w in lname for w in _ONES_NAMES):
                arr = np.ones(shape, dtype=spec.dtype)
            elif any(w in lname for w in _ZEROS_NAMES):
                arr = np.zeros(shape, dtype=spec.dtype)
            else:
                info = np.iinfo(spec.dtype)
                arr = rng.integers(max(lo, info.min), min(hi, int(info.max) + 1), size=shape)
                arr = arr.astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.floating):
            arr = rng.standard_normal(size=shape, dtype=np.float32).astype(spec.dtype)
        else:
            raise InputError(
                f"cannot generate input {spec.name!r} of type {spec.dtype}; pass real data with --inputs"
            )
        out[spec.name] = arr
    return out


def load_inputs(npz_path: str | os.PathLike[str], model: ModelLike) -> dict[str, np.ndarray]:
    """Load real inputs from an ``.npz`` file and check them against the model.

    Parameters
    ----------
    npz_path : path-like
        One array per model input name, first axis = samples. Each array has the model input's
        rank plus one (``data[i]`` is fed as is), or the model input's rank (the first axis is the
        batch axis; each sample is fed as a batch of one). Keys that are not model inputs (such as
        ``labels``) are ignored.
    model : onnx.ModelProto or path-like
        The model the inputs are for.

    Returns
    -------
    dict of str to numpy.ndarray
        In the layout of :func:`make_inputs`: ``(samples, *input_shape)``, model dtypes.

    Raises
    ------
    InputError
        Missing file, a model input absent from the file, a wrong rank, a fixed dimension that
        does not match, an unsafe dtype (float data for an integer input), or inputs with
        different sample counts.
    """
    path = os.fspath(npz_path)
    if not os.path.isfile(path):
        raise InputError(f"inputs file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for bad files
        raise InputError(f"cannot read {path} as .npz: {exc}") from exc
    specs = input_specs(model)
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        others = sorted(set(arrays) - set(names))
        raise InputError(
            f"{os.path.basename(path)} has no array for model input(s) {', '.join(map(repr, missing))}"
            f" (model inputs: {', '.join(names)}; unmatched keys in the file: {', '.join(others) or 'none'})"
        )
    extra = sorted(set(arrays) - set(names) - {"labels"})
    if extra:
        logger.warning("ignoring arrays that are not model inputs: %s", ", ".join(extra))
    return normalize_inputs({n: arrays[n] for n in names}, specs, source=os.path.basename(path))


def normalize_inputs(
    inputs: Mapping[str, np.ndarray],
    specs: Sequence[InputSpec],
    *,
    source: str = "inputs",
) -> dict[str, np.ndarray]:
    """Check sample arrays against input specs and bring them to ``(samples, *input_shape)``.

    Parameters
    ----------
    inputs : mapping of str to numpy.ndarray
        Sample arrays (see :func:`load_inputs` for the two accepted layouts).
    specs : sequence of InputSpec
        The model's inputs.
    source : str
        Name used in error messages.

    Returns
    -------
    dict of str to numpy.ndarray

    Raises
    ------
    InputError
        See :func:`load_inputs`.
    """
    out: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for spec in specs:
        if spec.name not in inputs:
            raise InputError(f"{source}: no array for model input {spec.name!r}")
        arr = np.asarray(inputs[spec.name])
        if arr.ndim == spec.rank + 1:
            pass
        elif arr.ndim == spec.rank and spec.rank >= 1 and not _fixed_not_one(spec.shape[0]):
            arr = arr[:, None]  # first axis is the batch axis: each sample is a batch of one
        else:
            raise InputError(
                f"{source}: input {spec.name!r} has shape {tuple(arr.shape)} but the model expects "
                f"{_fmt_spec_shape(spec.shape)} per sample (array rank {spec.rank + 1}, first axis = samples)"
            )
        sample_shape = arr.shape[1:]
        for axis, (want, got) in enumerate(zip(spec.shape, sample_shape)):
            if isinstance(want, int) and want != got:
                raise InputError(
                    f"{source}: input {spec.name!r} has sample shape {tuple(sample_shape)} but the model "
                    f"expects {_fmt_spec_shape(spec.shape)} (dimension {axis}: {got} != {want})"
                )
        if arr.dtype != spec.dtype:
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise InputError(
                    f"{source}: input {spec.name!r} is {arr.dtype} but the model expects {spec.dtype}"
                )
            arr = arr.astype(spec.dtype)
        out[spec.name] = np.ascontiguousarray(arr)
        counts[spec.name] = arr.shape[0]
    if len(set(counts.values())) > 1:
        raise InputError(
            f"{source}: inputs have different sample counts: "
            + ", ".join(f"{k}={v}" for k, v in counts.items())
        )
    if counts and next(iter(counts.values())) == 0:
        raise InputError(f"{source}: no samples")
    return out


def _fixed_not_one(d: int | str | None) -> bool:
    return isinstance(d, int) and d != 1


def load_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """Load task labels (class indices, one per prediction) from ``.npy`` or the ``labels`` key of an ``.npz``.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    numpy.ndarray
        Integer labels, flattened.

    Raises
    ------
    InputError
        When the file is missing, unreadable, has no ``labels`` key (npz) or is not integer.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputError(f"labels file not found: {p}")
    try:
        data = np.load(p, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                if "labels" not in data.files:
                    raise InputError(f"{p} has no 'labels' array (keys: {', '.join(data.files)})")
                arr = data["labels"]
        else:
            arr = data
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read labels from {p}: {exc}") from exc
    arr = np.asarray(arr)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise InputError(f"labels in {p} must be integer class indices, got {arr.dtype}")
    return arr.reshape(-1).astype(np.int64)


def num_samples(inputs: Mapping[str, np.ndarray]) -> int:
    """Number of samples in an input dict (1 for a model without inputs: it runs once per round)."""
    for arr in inputs.values():
        return int(arr.shape[0])
    return 1


def sample_feed(inputs: Mapping[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    """The feed dict of sample ``index`` (wrapping around)."""
    n = num_samples(inputs)
    return {k: v[index % n] for k, v in inputs.items()}


# --------------------------------------------------------------------------------------------
# sessions and providers
# --------------------------------------------------------------------------------------------


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
        raise InputError(f"model file not found: {path}")
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
            raise HarnessError(f"onnxruntime cannot load {name}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


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
            raise HarnessError(f"inference failed on sample {i}: {_one_line(exc)}") from exc
        for n, v in zip(names, values):
            out[n].append(v)
    return out


# --------------------------------------------------------------------------------------------
# accuracy metrics
# --------------------------------------------------------------------------------------------


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
    """Accuracy per output from outputs already computed (see :func:`run_samples`).

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
        Samples, as returned by :func:`make_inputs` or :func:`load_inputs` (arrays with the
        model input's rank are taken as batch-of-one samples).
    labels : numpy.ndarray, optional
        Class labels for task accuracy (see :func:`compare_outputs`).
    providers : sequence of str
        Execution providers for both sessions.
    threads : int, default 1
        ``intra_op_num_threads``.
    opt_level : str, default "all"
        Graph optimization level (see :data:`OPT_LEVELS`).

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


# --------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# size
# --------------------------------------------------------------------------------------------


def model_size_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model: the ``.onnx`` file plus every external data file it references.

    :func:`onnx_lowrank.model_io.model_file_size` with the harness's errors: ``InputError`` for
    a missing model file, ``HarnessError`` for a missing external data file.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise InputError(f"model file not found: {p}")
    try:
        return model_file_size(p)
    except ModelError as exc:
        raise HarnessError(str(exc)) from None


def model_stats(
    path: str | os.PathLike[str], input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Any]:
    """Size, parameter count and FLOPs of a model file.

    Parameters
    ----------
    path : path-like
    input_shapes : mapping, optional
        Concrete input shapes for the FLOP count (see :func:`onnx_lowrank.flops.count_flops`).

    Returns
    -------
    dict
        ``path``, ``params``, ``size_bytes``, ``flops``, ``macs``, ``flops_complete`` (False when
        some MatMul/Gemm/Conv shapes were unknown and left out), ``counted_nodes``.
    """
    report = _flops.count_flops(path, input_shapes)
    return {
        "path": os.fspath(path),
        "params": report.params,
        "size_bytes": model_size_bytes(path),
        "flops": report.flops,
        "macs": report.macs,
        "flops_complete": report.complete,
        "counted_nodes": len(report.nodes),
    }


# --------------------------------------------------------------------------------------------
# mobile
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """Silence onnxruntime's tools (print to stdout, logging, native warnings) for a block."""
    sink = io.StringIO()
    root = logging.getLogger()
    # the tools call logging.basicConfig() and log INFO lines: keep the root handlers as they were
    # and mute records up to WARNING while they run
    old_handlers = list(root.handlers)
    old_disable = logging.root.manager.disable
    ort.set_default_logger_severity(3)
    try:
        logging.disable(logging.WARNING)
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(old_disable)
        root.handlers[:] = old_handlers
        ort.set_default_logger_severity(2)  # onnxruntime's default: warnings
        if sink.getvalue():
            logger.debug("onnxruntime tools said:\n%s", sink.getvalue())


def _partition_summary(info: Any) -> dict[str, Any]:
    nodes = int(info.num_nodes)
    return {
        "nodes": nodes,
        "supported_nodes": int(info.num_supported_nodes),
        "partitions": int(info.num_partitions),
        "partition_sizes": [len(g) for g in info.supported_groups],
        "unsupported_ops": sorted(info.unsupported_ops),
        "unsupported_due_to_dynamic_shape": int(info.nodes_unsupported_due_to_dynamic_input),
        "verdict": info.suitability().name if nodes else "NO",
    }


def mobile_usability(model_path: str | os.PathLike[str]) -> dict[str, Any]:
    """onnxruntime's mobile usability check (NNAPI and CoreML) of a model.

    This is what ``python -m onnxruntime.tools.check_onnx_model_mobile_usability`` does, but
    returning numbers instead of logging them: the model is optimized to the BASIC level (as the
    conversion to ORT format does), shapes are inferred, and the partitions each provider could
    take are estimated from its supported-operator list.

    Parameters
    ----------
    model_path : path-like

    Returns
    -------
    dict
        ``{"nnapi": {...}, "coreml": {"mlprogram": {...}, "neuralnetwork": {...}, "verdict"}}``;
        each provider entry has ``nodes``, ``supported_nodes``, ``partitions``,
        ``partition_sizes``, ``unsupported_ops``, ``verdict`` (``YES`` / ``MAYBE`` / ``NO``: should
        the provider perform well on the model as is) and, when the model has dynamic input shapes
        and the verdict is not YES, ``verdict_with_fixed_shapes``. On failure, ``{"error": str}``.
    """
    try:
        with _quiet_ort():  # the tools configure logging at import time
            from onnxruntime.tools.mobile_helpers import usability_checker as uc
            from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model
    except Exception as exc:  # noqa: BLE001 - tools missing from a minimal onnxruntime
        return {"error": f"onnxruntime mobile tools unavailable: {_one_line(exc)}"}
    src = pathlib.Path(os.fspath(model_path)).resolve()
    quiet = logging.getLogger(__name__ + ".usability")
    quiet.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="onnx_lowrank_usability_") as tmp, _quiet_ort():
            opt_path = pathlib.Path(tmp) / "model.onnx"
            optimize_model(src, opt_path, use_external_initializers=True)
            wrapper = ModelProtoWithShapeInfo(opt_path)
            model = wrapper.model_with_shape_info
            dynamic_inputs, _ = uc.check_shapes(model.graph, quiet)
            checkers = {
                "nnapi": uc.check_nnapi_partitions,
                "coreml_mlprogram": lambda m, fixed: uc.check_coreml_partitions(
                    m, fixed, "coreml_supported_mlprogram_ops.md"
                ),
                "coreml_neuralnetwork": lambda m, fixed: uc.check_coreml_partitions(
                    m, fixed, "coreml_supported_neuralnetwork_ops.md"
                ),
            }
            results: dict[str, dict[str, Any]] = {}
            for key, fn in checkers.items():
                summary = _partition_summary(fn(model, True))
                if summary["verdict"] != "YES" and dynamic_inputs:
                    summary["verdict_with_fixed_shapes"] = _partition_summary(fn(model, False))["verdict"]
                results[key] = summary
            del wrapper
    except Exception as exc:  # noqa: BLE001 - the checker is best effort; say why it failed
        return {"error": f"mobile usability check failed: {_one_line(exc)}"}
    order = {"NO": 0, "MAYBE": 1, "YES": 2}
    ml, nn = results["coreml_mlprogram"], results["coreml_neuralnetwork"]
    return {
        "nnapi": results["nnapi"],
        "coreml": {
            "mlprogram": ml,
            "neuralnetwork": nn,
            "verdict": max(ml["verdict"], nn["verdict"], key=order.__getitem__),
        },
    }


def _parse_required_operators(path: pathlib.Path) -> dict[str, list[str]]:
    ops: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(";")
        if len(parts) < 3:
            continue
        key = f"{parts[0]};{parts[1]}"
        # with type reduction an entry looks like Op{...}; keep the operator name
        names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)(?:\{[^}]*\})?(?:,|$)", parts[2])
        ops.setdefault(key, set()).update(names)
    return {k: sorted(v) for k, v in sorted(ops.items())}


def convert_to_ort(
    model_path: str | os.PathLike[str], workdir: str | os.PathLike[str]
) -> tuple[pathlib.Path, pathlib.Path | None]:
    """Convert a model to ORT format for ARM (``onnxruntime.tools.convert_onnx_models_to_ort``).

    Fixed optimization style, target platform ``arm``: the file an Android/iOS build of
    onnxruntime loads.

    Parameters
    ----------
    model_path : path-like
        The ``.onnx`` model (external data next to it is found).
    workdir : path-like
        An empty directory for the converted files.

    Returns
    -------
    ort_path : pathlib.Path
        The ``.ort`` file (under ``workdir/ort``).
    config : pathlib.Path or None
        The required-operators config the converter wrote (None if it wrote none).

    Raises
    ------
    HarnessError
        When the converter produced no ``.ort`` file.
    """
    src = pathlib.Path(os.fspath(model_path)).resolve()
    work = pathlib.Path(os.fspath(workdir)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if src.suffix.lower() != ".onnx" or src.name.lower().endswith(".optimized.onnx"):
        # the converter only picks up *.onnx files: save a copy (weights as external data)
        staged = work / "src" / "model.onnx"
        staged.parent.mkdir()
        proto = onnx.load(str(src))
        onnx.save(proto, str(staged), save_as_external_data=True, location="model.onnx.data")
        src = staged
    out_dir = work / "ort"
    with _quiet_ort():
        # imported here: the tools configure logging at import time
        from onnxruntime.tools.convert_onnx_models_to_ort import (
            OptimizationStyle,
            convert_onnx_models_to_ort,
        )

        convert_onnx_models_to_ort(
            src,
            output_dir=out_dir,
            optimization_styles=[OptimizationStyle.Fixed],
            target_platform="arm",
        )
    ort_files = sorted(out_dir.rglob("*.ort"))
    configs = sorted(out_dir.glob("*.config"))
    if not ort_files:
        raise HarnessError("the converter produced no .ort file")
    return ort_files[0], (configs[0] if configs else None)


def ort_format_check(
    model_path: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    workdir: str | os.PathLike[str],
    *,
    max_samples: int = 4,
) -> dict[str, Any]:
    """Convert a model to ORT format for ARM, run the ``.ort`` file and compare with the ``.onnx``.

    Uses ``onnxruntime.tools.convert_onnx_models_to_ort`` (fixed optimization style, target
    platform ``arm``), which also writes the required-operators config a reduced (mobile) build of
    onnxruntime is made from.

    Parameters
    ----------
    model_path : path-like
        The ``.onnx`` model (external data next to it is found).
    inputs : mapping of str to numpy.ndarray
        Samples (see :func:`make_inputs`); the first ``max_samples`` are compared.
    workdir : path-like
        An empty directory for the converted files.
    max_samples : int, default 4

    Returns
    -------
    dict
        ``converted`` (bool), ``ort_path``, ``ort_size_bytes``, ``outputs_match`` (bool: every
        output within rtol 1e-3 / atol 1e-5), ``max_abs_diff``, ``required_operators``
        (``"domain;opset"`` -> sorted operator types); ``error`` when conversion or the run failed.
    """
    result: dict[str, Any] = {"converted": False}
    try:
        ort_path, config = convert_to_ort(model_path, workdir)
        src = pathlib.Path(os.fspath(model_path)).resolve()
        result.update(
            converted=True,
            ort_path=str(ort_path),
            ort_size_bytes=ort_path.stat().st_size,
            required_operators=_parse_required_operators(config) if config is not None else {},
        )
        n = min(max_samples, num_samples(inputs))
        subset = {k: v[:n] for k, v in inputs.items()}
        s_onnx = create_session(src, record_assignment=False)
        s_ort = create_session(str(ort_path), record_assignment=False)
        ref, got = run_samples(s_onnx, subset), run_samples(s_ort, subset)
        worst, match = 0.0, True
        for name, values in ref.items():
            for r, g in zip(values, got.get(name, [])):
                r, g = np.asarray(r), np.asarray(g)
                if r.shape != g.shape:
                    match = False
                    continue
                if r.size:
                    worst = max(worst, float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))))
                    match = match and bool(np.allclose(g, r, rtol=_ORT_RTOL, atol=_ORT_ATOL, equal_nan=True))
            if name not in got:
                match = False
        result.update(outputs_match=match, max_abs_diff=worst, samples_compared=n)
    except Exception as exc:  # noqa: BLE001 - report the failure in the result
        result["error"] = _one_line(exc)
    return result


def new_operators(original: Mapping[str, Sequence[str]], compressed: Mapping[str, Sequence[str]]) -> list[str]:
    """Operator types the compressed model needs that the original does not.

    Parameters
    ----------
    original, compressed : mapping
        ``required_operators`` of :func:`ort_format_check`.

    Returns
    -------
    list of str
        ``"domain;opset;Op"`` entries; a reduced onnxruntime build made for the original lacks
        their kernels. Should be empty for a factorized model.
    """
    have = {(k, op) for k, ops in original.items() for op in ops}
    return sorted(f"{k};{op}" for k, ops in compressed.items() for op in ops if (k, op) not in have)


def mobile_report(
    original: str | os.PathLike[str],
    compressed: Sequence[str | os.PathLike[str]],
    inputs: Mapping[str, np.ndarray],
) -> list[dict[str, Any]]:
    """Mobile readiness of an original model and its compressed versions.

    Parameters
    ----------
    original : path-like
    compressed : sequence of path-like
    inputs : mapping of str to numpy.ndarray
        Samples used to confirm that the ``.ort`` files compute what the ``.onnx`` files do.

    Returns
    -------
    list of dict
        One per compressed model: ``{"nnapi": {"original", "compressed"}, "coreml": {"original",
        "compressed"}, "ort_format": {"original", "compressed", "new_operators"}}``.
    """
    with tempfile.TemporaryDirectory(prefix="onnx_lowrank_mobile_") as tmp:
        ref_usability = mobile_usability(original)
        ref_ort = ort_format_check(original, inputs, pathlib.Path(tmp) / "original")
        _strip_temp_path(ref_ort)
        reports = []
        for i, path in enumerate(compressed):
            usability = mobile_usability(path)
            comp_ort = ort_format_check(path, inputs, pathlib.Path(tmp) / f"compressed{i}")
            _strip_temp_path(comp_ort)
            reports.append(
                {
                    "nnapi": {"original": _pick(ref_usability, "nnapi"), "compressed": _pick(usability, "nnapi")},
                    "coreml": {"original": _pick(ref_usability, "coreml"), "compressed": _pick(usability, "coreml")},
                    "ort_format": {
                        "target_platform": "arm",
                        "original": ref_ort,
                        "compressed": comp_ort,
                        "new_operators": new_operators(
                            ref_ort.get("required_operators", {}), comp_ort.get("required_operators", {})
                        ),
                    },
                }
            )
    return reports


def _pick(usability: Mapping[str, Any], key: str) -> dict[str, Any]:
    if "error" in usability:
        return {"error": usability["error"]}
    return dict(usability[key])


def _strip_temp_path(res: dict[str, Any]) -> None:
    # the .ort file lives in a temporary directory that is deleted: keep only its name
    if "ort_path" in res:
        res["ort_path"] = os.path.basename(res["ort_path"])
