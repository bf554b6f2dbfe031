"""What every op module needs from the graph: constants, consumers, fresh names, and the candidate type.

An op module (``matmul``, ``gemm``, ``conv``) looks at one node and either returns a
:class:`Candidate` (a matrix view of its constant weight plus how to rewrite the node from
factors) or a one-line reason why the node is left alone. The driver in ``__init__`` owns rank
selection, factorization, sharing factors between nodes and cleanup.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_lowrank.core import linalg
from onnx_lowrank.config import LowRankConfig
from onnx_lowrank.model_io import is_external
from onnx_lowrank.core.whitening import Whitener

__all__ = [
    "Candidate",
    "NonFiniteWeight",
    "ConstantWeight",
    "GraphContext",
    "Rewrite",
    "FLOAT_TYPES",
    "QUANTIZED_OPS",
    "tied_reason",
]

logger = logging.getLogger(__name__)

#: Weight element types we factorize. Half types are factorized in float32 and stored back.
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float32,
    onnx.TensorProto.BFLOAT16: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
}

#: Ops of quantized models. Their weights are integers with scales; low rank would need
#: re-quantization, so they are reported and left alone.
QUANTIZED_OPS = {"MatMulInteger", "QLinearMatMul", "QLinearConv", "ConvInteger", "MatMulNBits",
                 "QGemm", "DynamicQuantizeMatMul"}

# Nodes that pass a constant through unchanged in value (Identity) or in a way we can replay
# on the array (Transpose, Cast): exporters put weights behind them.
_PASS_THROUGH = {"Identity", "Transpose", "Cast"}


class ConstantWeight:
    """A weight input resolved to its value.

    ``source`` names the initializer or Constant output that holds the data; ``chain`` the
    Identity/Transpose/Cast nodes between it and the consuming node (outermost last). ``value``
    is either held in memory or read on each access from the model's external data file (models
    loaded lazily, to bound memory), so callers that need it repeatedly keep their own copy.
    """

    def __init__(
        self,
        name: str,
        source: str,
        value: np.ndarray | Callable[[], np.ndarray],
        elem_type: int,
        chain: tuple[str, ...] = (),
        *,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.elem_type = elem_type
        self.chain = chain
        if callable(value):
            if shape is None:
                raise ValueError("a lazily loaded weight needs its shape")
            self._load: Callable[[], np.ndarray] | None = value
            self._value: np.ndarray | None = None
            self.shape = tuple(int(d) for d in shape)
        else:
            self._load, self._value = None, value
            self.shape = tuple(value.shape)

    @property
    def lazy(self) -> bool:
        return self._load is not None

    @property
    def value(self) -> np.ndarray:
        return self._load() if self._load is not None else self._value  # type: ignore[return-value]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def array(self, *, transpose: bool = False) -> np.ndarray:
        """The value, transposed if asked (a picklable loader for lazy candidates)."""
        value = self.value
        return value.T if transpose else value


class NonFiniteWeight(ValueError):
    """A weight read from disk has NaN or Inf: its layer is left alone (the message says so)."""


def all_finite(array: np.ndarray) -> bool:
    """Whether every entry is finite: one summing pass, the entry-wise check only if it overflows."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(array.sum()):
            return True
    return bool(np.all(np.isfinite(array)))


def non_finite_reason(weight: ConstantWeight) -> str:
    return f"weight {weight.name!r} contains NaN or Inf: left alone"


@dataclass
class Rewrite:
    """Nodes that replace one node, and the initializers they need as ``(name, array)``."""

    nodes: list[onnx.NodeProto]
    initializers: list[tuple[str, np.ndarray]] = field(default_factory=list)


class GraphContext:
    """Read-only index of the top-level graph plus a generator of unique names."""

    def __init__(self, model: onnx.ModelProto, *, base_dir: str | None = None) -> None:
        self.model = model
        #: Directory of the model file: external tensors not loaded into memory are read from
        #: there, one weight at a time (bounded memory for models of several GB).
        self.base_dir = base_dir
        graph = model.graph
        self.graph = graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.graph_inputs = {i.name for i in graph.input}
        # IR < 4 required every initializer to be listed as a graph input: there they are plain
        # constants. From IR 4 on, an initializer that is also an input is a default value the
        # caller may override, so it is not a constant.
        self.legacy_inputs = model.ir_version < 4
        self.graph_outputs = {o.name for o in graph.output}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producers[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        # Names read inside If/Loop/Scan bodies (outer-scope captures) and local functions:
        # a tensor referenced there must never be removed.
        self.subgraph_refs: set[str] = set()
        self._names: set[str] = set()
        for g in _all_graphs(graph):
            self._names.update(n.name for n in g.node)
            self._names.update(o for n in g.node for o in n.output)
            self._names.update(t.name for t in g.initializer)
            self._names.update(t.values.name for t in g.sparse_initializer)
            self._names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
            if g is not graph:
                self.subgraph_refs.update(i for n in g.node for i in n.input)
        self._cache: dict[str, ConstantWeight | None] = {}

    # -- names ---------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        """A name not used anywhere in the model, derived from ``base``."""
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    @staticmethod
    def node_label(node: onnx.NodeProto, index: int) -> str:
        """The node's name, or ``<op_type>_<index>`` for unnamed nodes (common in hand-made graphs)."""
        return node.name or f"{node.op_type}_{index}"


    # -- constants -----------------------------------------------------------------------
    def constant(self, name: str) -> ConstantWeight | None:
        """Resolve a tensor name to a constant value, or ``None`` if it is not constant."""
        if name not in self._cache:
            self._cache[name] = self._resolve(name, depth=0)
        return self._cache[name]

    def _resolve(self, name: str, depth: int) -> ConstantWeight | None:
        if depth > 8 or not name:  # guards against pathological chains
            return None
        if name in self.initializers:
            if name in self.graph_inputs and not self.legacy_inputs:
                return None  # an initializer that is also an input can be overridden at run time
            t = self.initializers[name]
            if is_external(t):
                if self.base_dir is None:
                    return None  # data not loaded and nowhere to read it from
                header = onnx.TensorProto()
                header.CopyFrom(t)  # external tensors hold no data: the copy is tiny
                loader = functools.partial(_read_external, header, self.base_dir)
                return ConstantWeight(name, name, loader, t.data_type, shape=tuple(t.dims))
            # Converted when needed, not now: a candidate holds its matrix only while it is being
            # factorized, so memory holds the model once plus the weights in flight.
            loader = functools.partial(numpy_helper.to_array, t)
            return ConstantWeight(name, name, loader, t.data_type, shape=tuple(t.dims))
        node = self.producers.get(name)
        if node is None:
            return None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            tensor = _constant_tensor(node)
            if tensor is None:
                return None
            return ConstantWeight(name, name, numpy_helper.to_array(tensor), tensor.data_type)
        if node.op_type in _PASS_THROUGH and node.domain in ("", "ai.onnx") and node.input:
            inner = self._resolve(node.input[0], depth + 1)
            if inner is None:
                return None
            elem_type, shape, perm = inner.elem_type, inner.shape, None
            if node.op_type == "Transpose":
                perm = _attr(node, "perm", None)
                perm = list(perm) if perm is not None else list(reversed(range(len(shape))))
                shape = tuple(shape[i] for i in perm)
            elif node.op_type == "Cast":
                elem_type = int(_attr(node, "to", elem_type))
            loader = functools.partial(_through, inner, perm, elem_type)
            chain = inner.chain + (node.name or name,)
            if inner.lazy:
                return ConstantWeight(name, inner.source, loader, elem_type, chain, shape=shape)
            return ConstantWeight(name, inner.source, loader(), elem_type, chain)
        return None

    def why_not_constant(self, name: str) -> str:
        """One-line reason a weight input is not a usable constant."""
        if name in self.graph_inputs and name in self.initializers:
            return (f"weight {name!r} is a graph input with a default initializer (callers may override it); "
                    "remove it from the graph inputs to factorize it")
        if name in self.graph_inputs:
            return f"weight {name!r} is a graph input (not a constant)"
        node = self.producers.get(name)
        if node is None:
            return f"weight {name!r} is not produced in this graph (outer-scope value)"
        source = node
        for _ in range(8):  # look through Identity/Transpose/Cast for a quantized source
            if source.op_type not in _PASS_THROUGH or not source.input or source.input[0] not in self.producers:
                break
            source = self.producers[source.input[0]]
        if source.op_type == "DequantizeLinear":
            return f"weight {name!r} comes from DequantizeLinear (quantized model): left alone"
        return f"weight {name!r} is computed at run time by {node.op_type} node {node.name!r}"

    def is_used_elsewhere(self, name: str, exclude: set[int]) -> bool:
        """Whether ``name`` is read by a node other than those whose ``id`` is in ``exclude``."""
        if name in self.graph_outputs or name in self.subgraph_refs:
            return True
        return any(id(n) not in exclude for n in self.consumers.get(name, ()))


class Candidate:
    """A node whose constant weight has a matrix view ``W (m x n)`` ready to factorize.

    Op modules subclass this and implement :meth:`rewrite`. The default factorization is
    ``W ~= A @ B`` by :func:`onnx_lowrank.core.linalg.factorize`; schemes with other factor shapes
    (Tucker-2) override :meth:`factored_params`, :meth:`factorize` and :meth:`relative_error`.

    Parameters
    ----------
    node, label : the node and its display name
    weight : ConstantWeight
        The resolved constant.
    matrix : ndarray
        The matrix view in the compute dtype (float32, or float64 for double weights).
    view : str
        Tag of how ``matrix`` derives from the weight (``""``, ``"T"``, ...): nodes that share a
        weight and a view share the factors.
    """

    scheme: str = "svd"
    #: Which side of ``matrix`` the layer's inputs multiply: ``"rows"`` (``y = x W``) or
    #: ``"cols"`` (``y = W x``). Whitening by calibration data works on that side.
    side: str = "rows"

    def __init__(
        self,
        node: onnx.NodeProto,
        label: str,
        weight: ConstantWeight,
        matrix: np.ndarray | Callable[[], np.ndarray],
        *,
        view: str = "",
        shape: tuple[int, int] | None = None,
    ) -> None:
        self.node = node
        self.label = label
        self.weight = weight
        self._compute = FLOAT_TYPES[weight.elem_type]
        if callable(matrix):  # read when needed, dropped by release(): bounded memory
            if shape is None:
                raise ValueError("a lazily loaded matrix needs its shape")
            self._matrix_loader: Callable[[], np.ndarray] | None = matrix
            self._matrix: np.ndarray | None = None
            self._shape = (int(shape[0]), int(shape[1]))
        else:
            self._matrix_loader = None
            self._matrix = np.ascontiguousarray(matrix, dtype=self._compute)
            self._shape = self._matrix.shape
        self._holds = 0
        self.view = view
        self._spectrum: tuple[np.ndarray, float] | None = None
        self.whitener: Whitener | None = None
        #: Extra information for the report (fallbacks of a scheme, whitening unavailable, ...).
        self.note: str | None = None

    # -- calibration -------------------------------------------------------------------------
    @property
    def activation(self) -> str | None:
        """Tensor that carries this layer's inputs, or ``None`` when whitening is unsupported."""
        return None

    @property
    def input_dim(self) -> int:
        return self.shape[0] if self.side == "rows" else self.shape[1]

    @property
    def feature_key(self) -> tuple[Any, ...]:
        """Layers reading the same activation with the same key share one Gram matrix."""
        return (type(self).__name__, self.side, self.input_dim)

    def features(self, activation: np.ndarray) -> np.ndarray:
        """Input feature rows ``F (N, input_dim)`` of one calibration sample's activation."""
        raise NotImplementedError

    def set_whitener(self, whitener: Whitener | None) -> None:
        """Factorize for the output error on calibration data from now on (see ``whiten``)."""
        self.whitener = whitener
        self._spectrum = None

    def whitened_error(self, factors: Any) -> float | None:
        """Relative output error on the calibration data, when whitened."""
        if self.whitener is None:
            return None
        return self.whitener.relative_error(self.matrix, factors.a, factors.b, self.side)

    # -- sizes -----------------------------------------------------------------------------
    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def matrix(self) -> np.ndarray:
        """The matrix view, in the compute dtype (read from disk first if lazily loaded).

        Raises
        ------
        NonFiniteWeight
            A weight read from disk has NaN or Inf (in-memory ones are refused when matched).
        """
        if self._matrix is None:
            assert self._matrix_loader is not None
            matrix = np.ascontiguousarray(self._matrix_loader(), dtype=self._compute)
            if not all_finite(matrix):
                raise NonFiniteWeight(non_finite_reason(self.weight))
            return matrix
        return self._matrix

    def hold(self) -> np.ndarray:
        """Load a lazy matrix and keep it until the matching :meth:`release` (holds nest)."""
        if self._matrix is None:
            self._matrix = self.matrix
        self._holds += 1
        return self._matrix

    def release(self) -> None:
        """Drop a lazily loaded matrix when its last hold ends (in-memory models keep theirs)."""
        self._holds = max(self._holds - 1, 0)
        if self._matrix_loader is not None and self._holds == 0:
            self._matrix = None

    @contextlib.contextmanager
    def held(self) -> Iterator[np.ndarray]:
        """``with cand.held() as matrix``: the matrix, read from disk at most once inside."""
        matrix = self.hold()
        try:
            yield matrix
        finally:
            self.release()

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape  # type: ignore[return-value]

    @property
    def params_before(self) -> int:
        return self.weight.size

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    @property
    def default_multiple_of(self) -> int:
        return 1

    def factored_params(self, rank: int) -> int:
        m, n = self.shape
        return rank * (m + n)

    @property
    def share_key(self) -> tuple[str, str, str]:
        return (self.weight.source + "|" + "|".join(self.weight.chain), self.view, self.scheme)

    # -- numerics --------------------------------------------------------------------------
    def spectrum(self, k: int) -> tuple[np.ndarray, float]:
        """Leading singular values (at least ``k`` where available) and ``||W||_F^2``."""
        if self._spectrum is None or len(self._spectrum[0]) < min(k, self.max_rank):
            # With calibration data the spectrum is that of the whitened matrix: the energy of
            # the layer's output on that data, which is what ranks should preserve.
            matrix = self.matrix
            target = matrix if self.whitener is None else self.whitener.apply(matrix, self.side)
            total = linalg.squared_frobenius_norm(target)
            sigma = np.sqrt(linalg.squared_singular_values(target, min(max(k, 1), self.max_rank)))
            self._spectrum = (np.asarray(sigma, dtype=np.float64), total)
        return self._spectrum

    def factorize(self, rank: int, config: LowRankConfig) -> Any:
        """Factors at ``rank``; the result is only consumed by this class's :meth:`rewrite`."""
        if self.whitener is not None:
            return self.whitener.factorize(self.matrix, rank, side=self.side, method=config.method,
                                           power_iters=config.power_iters, oversample=config.oversample,
                                           seed=config.seed)
        return linalg.factorize(
            self.matrix,
            rank,
            method=config.method,
            power_iters=config.power_iters,
            oversample=config.oversample,
            seed=config.seed,
        )

    def truncate(self, factors: Any, rank: int) -> Any | None:
        """The rank-``rank`` factors contained in larger ones, or ``None`` if ``factors`` are too
        small or of a kind that cannot be truncated. Components are ordered by singular value, so
        the leading ``rank`` of them are the rank-``rank`` truncation."""
        if not isinstance(factors, linalg.Factorization) or factors.a.shape[1] < rank:
            return None
        return linalg.Factorization(a=np.ascontiguousarray(factors.a[:, :rank]),
                                    b=np.ascontiguousarray(factors.b[:rank]),
                                    singular_values=factors.singular_values[:rank], method=factors.method)

    def relative_error(self, factors: Any) -> float:
        """``||W - A B||_F / ||W||_F`` of the matrix view."""
        return float(linalg.relative_frobenius_error(self.matrix, factors.a, factors.b))

    def macs_after(self, rank: int, macs_before: int) -> int:
        """MACs of the factorized form: per input row, ``r (m + n)`` instead of ``m n``."""
        return int(round(macs_before * self.factored_params(rank) / self.params_before))

    def optimal_error(self, rank: int, exact_limit: int = 1024) -> float | None:
        """Eckart-Young optimum at ``rank``, when the exact spectrum is cheap enough to know.

        With a whitener it is the optimum of the output error on the calibration data (the
        whitened matrix's spectrum), comparable with :meth:`whitened_error`.
        """
        if self.max_rank > exact_limit:
            return None
        sigma, total = self.spectrum(self.max_rank)
        if total <= 0.0:
            return 0.0
        return float(linalg.optimal_frobenius_error(sigma, rank, total_energy=total))

    # -- graph -----------------------------------------------------------------------------
    def rewrite(self, ctx: GraphContext, factors: Any, names: dict[str, str]) -> Rewrite:
        """Nodes (and initializers) replacing :attr:`node`.

        ``names`` maps factor roles (``"a"``, ``"b"``, ...) to initializer names already
        created by the driver for shared factors; the op module emits the initializers only for
        roles it finds missing, so a weight shared by several nodes is stored once.
        """
        raise NotImplementedError

    def factor_initializers(
        self, ctx: GraphContext, arrays: dict[str, np.ndarray], names: dict[str, str]
    ) -> list[tuple[str, np.ndarray]]:
        """Initializers ``<weight>/lowrank_<role>`` for the roles not yet in ``names`` (shared),
        as ``(name, array)``: the driver writes them into the model one at a time."""
        out = []
        for role, array in arrays.items():
            if role not in names:
                names[role] = ctx.unique(f"{self.weight.source}/lowrank_{role}")
                out.append((names[role], self.store(array)))
        return out

    def store(self, array: np.ndarray) -> np.ndarray:
        """Cast a factor to the weight's storage dtype (float16/bfloat16 weights stay half)."""
        return np.ascontiguousarray(array.astype(helper.tensor_dtype_to_np_dtype(self.weight.elem_type), copy=False))


def _read_external(header: onnx.TensorProto, base_dir: str) -> np.ndarray:
    """Read one external tensor from disk (``header`` carries its location, offset, length)."""
    tensor = onnx.TensorProto()
    tensor.CopyFrom(header)
    onnx.external_data_helper.load_external_data_for_tensor(tensor, base_dir)
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]
    return numpy_helper.to_array(tensor)


def _through(inner: ConstantWeight, perm: list[int] | None, elem_type: int) -> np.ndarray:
    """The value behind a Transpose (``perm``) or Cast (``elem_type``) node."""
    value = inner.value
    if perm is not None:
        value = np.transpose(value, perm)
    if elem_type != inner.elem_type:
        value = value.astype(helper.tensor_dtype_to_np_dtype(elem_type))
    return value


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name == "value_float":
            return numpy_helper.from_array(np.array(a.f, dtype=np.float32))
        if a.name == "value_floats":
            return numpy_helper.from_array(np.array(list(a.floats), dtype=np.float32))
    return None  # sparse or integer constants are never weights we factorize


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """Value of attribute ``name`` of ``node``, or ``default``."""
    return _attr(node, name, default)


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _all_graphs(g)


def tied_reason(ctx: GraphContext, weight: ConstantWeight, node: onnx.NodeProto) -> str | None:
    """Why ``weight`` is tied between a lookup and a matrix product (both left dense), or ``None``.

    A table read by a Gather and also by another op (an LM head's MatMul/Gemm, through a
    Transpose or not) cannot be replaced by the factors of either use alone: the other still
    needs the dense table, so the model would grow.
    """
    readers = [n for n in ctx.consumers.get(weight.source, ()) if n is not node]
    gathers = [n for n in readers if n.op_type == "Gather" and n.input[0] == weight.source]
    others = [n for n in readers if n not in gathers]
    if node.op_type == "Gather":
        if not others:
            return None
        other = others[0]
    else:
        if not gathers:
            return None
        other = gathers[0]
    return (f"tied table {weight.source!r}: also read by {other.op_type} node {other.name!r}; "
            "a lookup and a matrix product sharing one table are left dense together")


def subgraph_nodes(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.NodeProto]]:
    """Every node inside If/Loop/Scan bodies of ``graph``, with the label of its owner node."""
    for i, node in enumerate(graph.node):
        owner = node.name or f"{node.op_type}_{i}"
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in subs:
                for inner in g.node:
                    yield owner, inner
                yield from subgraph_nodes(g)


def unique_labels(graph: onnx.GraphProto) -> list[str]:
    """A distinct display label per node of ``graph``: its name, ``<op_type>_<index>`` when
    unnamed, and ``<name>#<k>`` for the k-th repeat of a duplicated name (names need not be unique
    in ONNX, but report rows, MAC estimates and fixed ranks are keyed by label)."""
    labels: list[str] = []
    seen: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        base = GraphContext.node_label(node, index)
        count = seen.get(base, 0)
        seen[base] = count + 1
        labels.append(base if count == 0 else f"{base}#{count + 1}")
    return labels
