"""Parameter and multiply-accumulate (MAC) counting for ONNX models.

The counts cover the operators whose weights onnx-lowrank factorizes: ``MatMul``, ``Gemm``,
``Conv`` and ``ConvTranspose``. Every such node of the main graph is counted, whether its weight
is a constant or an activation (attention's ``Q @ K^T`` is a ``MatMul`` of two activations), so
the totals describe the compute of the whole model in these operators, and a factorized model is
compared with its original on equal terms.

Shapes come from ONNX shape inference run on a weight-free copy of the model (large and external
initializers become typed graph inputs, so a multi-gigabyte model is never serialized), with the
graph inputs pinned to the concrete shapes the caller gives. A node whose shapes stay unknown is
reported with ``macs=None`` and a reason; it is left out of the totals, and the report says so.

Conventions: one MAC is one multiply and one add; ``flops = 2 * macs``. Bias additions and
element-wise epilogues are not counted (they are the same in a model and its factorized version,
and small next to the products).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence, Union

import onnx

logger = logging.getLogger(__name__)

__all__ = [
    "COUNTED_OPS",
    "FlopReport",
    "NodeFlops",
    "count_flops",
    "tensor_shapes",
    "count_params",
    "load_model_skeleton",
]

ModelLike = Union[onnx.ModelProto, str, "os.PathLike[str]"]

#: Operator types whose MACs are counted.
COUNTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul", "ConvInteger",
               "QLinearConv")

# Quantized ops (int8 models from onnxruntime.quantization) do the same products as their float
# counterparts; their operands sit at other input positions.
_QUANTIZED = {"MatMulInteger": ("MatMul", (0, 1)), "QLinearMatMul": ("MatMul", (0, 3)),
              "ConvInteger": ("Conv", (0, 1)), "QLinearConv": ("Conv", (0, 3))}

# Initializers above this many elements are replaced by typed graph inputs in the copy used for
# shape inference: shape inference only reads their dims, and tiny initializers (Reshape targets,
# Slice bounds) must keep their values so that data propagation can resolve downstream shapes.
_SKELETON_MAX_ELEMENTS = 4096


@dataclass
class NodeFlops:
    """Count for one node.

    Attributes
    ----------
    name : str
        Node name (``"<op_type>_<index>"`` when the node has no name).
    op_type : str
        ``MatMul``, ``Gemm``, ``Conv`` or ``ConvTranspose``.
    macs : int or None
        Multiply-accumulates for the given input shapes; None when shapes are unknown.
    flops : int or None
        ``2 * macs``.
    weight : str or None
        Name of the constant weight input (initializer or ``Constant`` output), if any.
    weight_shape : list of int or None
        Shape of that weight.
    weight_params : int
        Number of elements of that weight (0 when the weight is not a constant).
    reason : str or None
        Why ``macs`` is None.
    """

    name: str
    op_type: str
    macs: int | None
    flops: int | None
    weight: str | None = None
    weight_shape: list[int] | None = None
    weight_params: int = 0
    reason: str | None = None
    index: int = -1  # position in graph.node (names may repeat)


@dataclass
class FlopReport:
    """Totals and per-node counts of a model.

    Attributes
    ----------
    macs : int
        Sum of the MACs of all nodes whose shapes are known.
    flops : int
        ``2 * macs``.
    params : int
        Elements of all initializers and ``Constant`` node values (subgraphs included).
    nodes : list of NodeFlops
        One entry per counted node of the main graph, in graph order.
    unresolved : list of str
        Names of counted nodes whose shapes stayed unknown (not in the totals).
    skipped_subgraph_nodes : int
        Counted-type nodes inside ``If``/``Loop``/``Scan`` subgraphs, which are not counted
        (their trip count is data dependent).
    """

    macs: int
    flops: int
    params: int
    nodes: list[NodeFlops] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)
    skipped_subgraph_nodes: int = 0

    @property
    def complete(self) -> bool:
        """True when every counted node had known shapes."""
        return not self.unresolved

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the report."""
        out = asdict(self)
        out["complete"] = self.complete
        return out


def _load(model: ModelLike, *, with_data: bool) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(os.fspath(model), load_external_data=with_data)


def _tensor_elements(t: onnx.TensorProto) -> int:
    return math.prod(t.dims)


def _attr_elements(attr: onnx.AttributeProto) -> int:
    if attr.type == onnx.AttributeProto.TENSOR:
        return _tensor_elements(attr.t)
    if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
        return math.prod(attr.sparse_tensor.values.dims)
    if attr.type in (onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS):
        return len(attr.floats) + len(attr.ints)
    if attr.type in (onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT):
        return 1
    return 0


def _graph_params(graph: onnx.GraphProto) -> int:
    total = sum(_tensor_elements(t) for t in graph.initializer)
    total += sum(math.prod(s.values.dims) for s in graph.sparse_initializer)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            total += sum(_attr_elements(a) for a in node.attribute)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += _graph_params(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(_graph_params(g) for g in attr.graphs)
    return total


def count_params(model: ModelLike) -> int:
    """Count the parameters of a model.

    Parameters
    ----------
    model : onnx.ModelProto or path-like
        The model. A path is read without its external data (only shapes are needed).

    Returns
    -------
    int
        Number of elements of all initializers and ``Constant`` node values, including those of
        subgraphs. Integer constants (shapes, indices) are counted too; they are negligible.
    """
    return _graph_params(_load(model, with_data=False).graph)


def load_model_skeleton(model: ModelLike) -> onnx.ModelProto:
    """Weight-free copy of a model for shape inference.

    Initializers with more than a few thousand elements, and every initializer stored as
    external data, become typed graph inputs; smaller initializers keep their values so that
    shape-carrying constants still propagate.

    Parameters
    ----------
    model : onnx.ModelProto or path-like
        The model. A path is read without its external data.

    Returns
    -------
    onnx.ModelProto
        A new model; the argument is not modified.
    """
    src = _load(model, with_data=False)
    graph = onnx.GraphProto()
    graph.name = src.graph.name
    graph.node.extend(src.graph.node)
    graph.output.extend(src.graph.output)
    graph.value_info.extend(src.graph.value_info)
    graph.input.extend(src.graph.input)
    existing_inputs = {i.name for i in src.graph.input}
    for init in src.graph.initializer:
        external = init.data_location == onnx.TensorProto.EXTERNAL
        if external or _tensor_elements(init) > _SKELETON_MAX_ELEMENTS:
            if init.name not in existing_inputs:
                graph.input.append(
                    onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                )
        else:
            graph.initializer.append(init)
    out = onnx.ModelProto()
    out.ir_version = src.ir_version
    out.opset_import.extend(src.opset_import)
    out.functions.extend(src.functions)
    out.graph.CopyFrom(graph)
    return out


def _set_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> None:
    init_names = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in init_names or vi.name not in input_shapes:
            continue
        shape = list(input_shapes[vi.name])
        tt = vi.type.tensor_type
        tt.shape.Clear()
        for d in shape:
            tt.shape.dim.add().dim_value = int(d)


def _shape_of(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(d is not None and d >= 0 for d in shape)


def _broadcast(a: Sequence[int], b: Sequence[int]) -> list[int]:
    n = max(len(a), len(b))
    a = [1] * (n - len(a)) + list(a)
    b = [1] * (n - len(b)) + list(b)
    return [max(x, y) for x, y in zip(a, b)]


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_macs(
    node: onnx.NodeProto, shapes: Mapping[str, list[int | None] | None]
) -> tuple[int | None, str | None]:
    op, positions = _QUANTIZED.get(node.op_type, (node.op_type, (0, 1)))

    def get(i: int) -> list[int | None] | None:
        j = positions[i]
        if j >= len(node.input) or not node.input[j]:
            return None
        return shapes.get(node.input[j])

    if op == "MatMul":
        a, b = get(0), get(1)
        if not (_known(a) and _known(b)):
            return None, "input shapes unknown"
        k = a[-1]
        m = a[-2] if len(a) >= 2 else 1
        n = b[-1] if len(b) >= 2 else 1
        batch = _broadcast(a[:-2], b[:-2])
        return math.prod(batch) * m * k * n, None
    if op == "Gemm":
        a, b = get(0), get(1)
        if not (_known(a) and _known(b)) or len(a) != 2 or len(b) != 2:
            return None, "input shapes unknown"
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return m * k * n, None
    if op == "Conv":
        w = get(1)
        y = shapes.get(node.output[0])
        if not (_known(w) and _known(y)):
            return None, "weight or output shape unknown"
        # each output element is a dot product over (C_in / group) * prod(kernel)
        return math.prod(y) * math.prod(w[1:]), None
    if op == "ConvTranspose":
        x, w = get(0), get(1)
        if not (_known(x) and _known(w)):
            return None, "input or weight shape unknown"
        # W is (C_in, C_out / group, *kernel): each input element is scattered into
        # (C_out / group) * prod(kernel) outputs
        return math.prod(x) * math.prod(w[1:]), None
    return None, f"op {op} not counted"


def _constant_shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = list(a.t.dims)
                elif a.name in ("value_floats", "value_ints"):
                    out[node.output[0]] = [len(a.floats) + len(a.ints)]
                elif a.name in ("value_float", "value_int"):
                    out[node.output[0]] = []
    return out


def _count_subgraph_nodes(graph: onnx.GraphProto, inside: bool) -> int:
    total = 0
    for node in graph.node:
        if inside and node.op_type in COUNTED_OPS:
            total += 1
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                total += _count_subgraph_nodes(a.g, True)
            elif a.type == onnx.AttributeProto.GRAPHS:
                total += sum(_count_subgraph_nodes(g, True) for g in a.graphs)
    return total


def tensor_shapes(
    model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, list[int | None]]:
    """Shape of every tensor (``None`` for unknown dimensions) from ONNX shape inference.

    Runs on :func:`load_model_skeleton` (no weight is read or serialized) with the graph inputs
    pinned to ``input_shapes``. Inference is best effort: on failure the declared shapes are used.
    """
    skeleton = load_model_skeleton(model)
    if input_shapes:
        _set_input_shapes(skeleton, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is best effort; report what we can
        logger.warning("ONNX shape inference failed (%s); counting from declared shapes only", exc)
        inferred = skeleton
    g = inferred.graph
    out: dict[str, list[int | None]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        shape = _shape_of(vi)
        if shape is not None:
            out[vi.name] = shape
    return out


def count_flops(
    model: ModelLike,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    known_shapes: Mapping[str, list[int | None]] | None = None,
) -> FlopReport:
    """Count parameters and MACs/FLOPs of ``MatMul``/``Gemm``/``Conv``/``ConvTranspose`` nodes.

    Parameters
    ----------
    model : onnx.ModelProto or path-like
        The model. A path is read without its external data (only shapes are needed).
    input_shapes : mapping of str to sequence of int, optional
        Concrete shape of each graph input, e.g. ``{"input_ids": (1, 128)}``. Inputs not listed
        keep the shape declared in the model; a node whose shapes then depend on a symbolic
        dimension is reported unresolved.
    known_shapes : mapping, optional
        Tensor shapes already computed by :func:`tensor_shapes` (then ``input_shapes`` is
        ignored), so that callers needing both shapes and counts infer once.

    Returns
    -------
    FlopReport
        Totals (``macs``, ``flops = 2 * macs``, ``params``) and per-node counts.

    Notes
    -----
    MatMul ``[..., M, K] @ [..., K, N]`` costs ``batch * M * K * N`` MACs; Gemm ``M * K * N``;
    Conv ``prod(Y.shape) * (C_in / group) * prod(kernel)``; ConvTranspose
    ``prod(X.shape) * (C_out / group) * prod(kernel)``. Nodes inside control-flow subgraphs are
    not counted and are reported in ``skipped_subgraph_nodes``.
    """
    src = _load(model, with_data=False)
    shapes: dict[str, list[int | None] | None] = dict(
        tensor_shapes(src, input_shapes) if known_shapes is None else known_shapes
    )
    constants = _constant_shapes(src.graph)
    for name, dims in constants.items():
        shapes[name] = list(dims)

    report = FlopReport(macs=0, flops=0, params=_graph_params(src.graph))
    for index, node in enumerate(src.graph.node):
        if node.op_type not in COUNTED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        macs, reason = _node_macs(node, shapes)
        weight = node.input[1] if len(node.input) > 1 and node.input[1] in constants else None
        if weight is None and node.op_type in ("MatMul", "Gemm") and node.input[0] in constants:
            weight = node.input[0]
        wshape = constants.get(weight) if weight else None
        entry = NodeFlops(
            name=node.name or f"{node.op_type}_{index}",
            op_type=node.op_type,
            macs=macs,
            flops=None if macs is None else 2 * macs,
            weight=weight,
            weight_shape=wshape,
            weight_params=math.prod(wshape) if wshape is not None else 0,
            reason=reason,
            index=index,
        )
        report.nodes.append(entry)
        if macs is None:
            report.unresolved.append(entry.name)
        else:
            report.macs += macs
    report.flops = 2 * report.macs
    report.skipped_subgraph_nodes = _count_subgraph_nodes(src.graph, False)
    if report.unresolved:
        logger.info(
            "%d node(s) with unknown shapes are not in the FLOP total: %s",
            len(report.unresolved),
            ", ".join(report.unresolved[:5]) + (" ..." if len(report.unresolved) > 5 else ""),
        )
    return report
