"""Inputs of a model: its input specs, generated samples, real samples from ``.npz`` files, labels.

- :func:`input_specs` lists what a model must be fed (:class:`InputSpec`);
- :func:`make_inputs` generates samples from those specs (``--shape`` and ``--int-range`` parsed
  by :func:`parse_shapes` and :func:`parse_int_range`);
- :func:`load_inputs` reads real samples from an ``.npz`` and checks them against the model
  (:func:`normalize_inputs` does the same for arrays in memory); :func:`load_labels` reads task
  labels;
- :func:`num_samples` and :func:`sample_feed` index a sample dict.

Sample layout: an input dict maps each model input name to an array whose first axis indexes
samples; ``inputs[name][i]`` is what the model receives for sample ``i`` (so it has the model
input's rank, typically with batch 1). :func:`load_inputs` also accepts arrays with the model
input's rank, whose first axis is then both the batch and the sample axis (each sample becomes a
batch of one).

Nothing here runs onnxruntime; mistakes in the user's inputs raise
:class:`~onnx_lowrank.measure.errors.InputError`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np
import onnx

from onnx_lowrank.measure.errors import HarnessError, InputError, MissingFileError

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATED_CAUTION",
    "check_shapes",
    "DEFAULT_INT_RANGE",
    "InputSpec",
    "ModelLike",
    "input_specs",
    "load_inputs",
    "load_labels",
    "make_inputs",
    "normalize_inputs",
    "num_samples",
    "parse_int_range",
    "parse_shapes",
    "sample_feed",
]

#: A model given in memory or by path (a path lets onnxruntime find external data next to it).
ModelLike = Union[onnx.ModelProto, str, "os.PathLike[str]"]

# Integer inputs with these words in their name get a fixed value instead of random draws:
# transformer attention masks must be 1 (attend everywhere) and token type ids 0 (one segment);
# random values there would measure a model state no user ever sees.
_ONES_NAMES = ("mask",)
_ZEROS_NAMES = ("token_type", "segment")

#: Default range of generated integer inputs, half-open [lo, hi): valid token ids for any
#: vocabulary of at least 100 entries, valid class/index values for small tables.
DEFAULT_INT_RANGE = (0, 100)


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
        raise MissingFileError(f"model file not found: {path}")
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
            for want, got in zip(spec.shape, value_t):
                if isinstance(want, str) and want:  # a named dim: the other inputs sharing it agree
                    dim_values.setdefault(want, got)
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
                # A free dimension is 1, what a batch-1 deployment runs (as Polygraphy and
                # onnxruntime's perf tool do); the note says how to choose another value.
                dims.append(1)
        resolved[spec.name] = tuple(dims)
    if unset:
        example = next(s for s in specs if any(not isinstance(d, int) for d in s.shape))
        hint = "x".join(str(d) if isinstance(d, int) else "N" for d in example.shape)
        logger.warning("note: free dimension(s) %s set to 1; choose them with --shape %s=%s (or --shape DIM=N "
                       "per named dim), or pass real data with --inputs", ", ".join(unset), example.name, hint)
    return resolved


def check_shapes(model: ModelLike, shapes: Mapping[str, Sequence[int] | int] | None) -> None:
    """Validate ``--shape`` values against the model's inputs, before any work is done.

    Raises
    ------
    InputError
        A name that is neither an input nor a symbolic dimension, a rank or fixed dimension
        that disagrees with the model.
    """
    _resolve_shapes(input_specs(model), shapes)


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
        When ``shapes`` names no input or dimension of the model, or contradicts a fixed one.

    Notes
    -----
    Symbolic dimensions that ``shapes`` does not set are 1, with a logged note naming them.
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
        raise MissingFileError(f"inputs file not found: {path}")
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
        raise MissingFileError(f"labels file not found: {p}")
    try:
        data = np.load(p, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                if "labels" not in data.files:
                    raise InputError(f"{p} has no 'labels' array (keys: {', '.join(data.files)})")
                arr = data["labels"]
        else:
            arr = data
    except (InputError, MissingFileError):
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


#: Said next to every figure computed on generated inputs: random data can make a ruined model
#: look fine (a real classifier at 0.10 top-1 agreement on real inputs scored 0.91-1.00 on these).
GENERATED_CAUTION = "caution: generated, not real data; figures may not hold on real inputs (--inputs DATA.npz)"
