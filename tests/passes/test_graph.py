"""GraphContext on its own: constants (and why not), fresh names, labels, readers, lazy weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import init, make_model, vi
from onnx_lowrank.passes.graph import ConstantWeight, GraphContext, subgraph_nodes, unique_labels


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _raw_model(nodes, inputs, outputs, initializers=(), *, ir_version=8, opset=17, value_info=()):
    """A model without the checker (IR 3 and deliberately odd graphs)."""
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers),
                              value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _all_names(model: onnx.ModelProto) -> set[str]:
    """Every node, tensor, initializer and value_info name of every (sub)graph."""
    names: set[str] = set()

    def walk(g: onnx.GraphProto) -> None:
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        for n in g.node:
            names.add(n.name)
            names.update(n.input)
            names.update(n.output)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(model.graph)
    names.discard("")
    return names


# -- constants ----------------------------------------------------------------------------------

def test_constant_resolves_initializer():
    w = _rng(0).standard_normal((6, 5)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", [2, 6])], [vi("y", [2, 5])], [init("w", w)])
    c = GraphContext(model).constant("w")
    assert isinstance(c, ConstantWeight)
    assert (c.name, c.source, c.chain) == ("w", "w", ())
    assert c.elem_type == TensorProto.FLOAT and c.shape == (6, 5) and c.size == 30
    np.testing.assert_array_equal(c.value, w)
    np.testing.assert_array_equal(c.array(transpose=True), w.T)
    assert c.value.dtype == np.float32


def test_constant_resolves_constant_node():
    w = _rng(1).standard_normal((4, 3)).astype(np.float32)
    model = make_model(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w), name="const"),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [vi("x", [2, 4])], [vi("y", [2, 3])])
    c = GraphContext(model).constant("w")
    assert c is not None and not c.lazy
    assert (c.source, c.chain, c.shape) == ("w", (), (4, 3))
    np.testing.assert_array_equal(c.value, w)


def test_constant_node_value_floats():
    model = make_model(
        [helper.make_node("Constant", [], ["v"], value_floats=[1.5, -2.0, 3.25], name="const"),
         helper.make_node("Add", ["x", "v"], ["y"], name="add")],
        [vi("x", [3])], [vi("y", [3])])
    c = GraphContext(model).constant("v")
    np.testing.assert_array_equal(c.value, np.array([1.5, -2.0, 3.25], np.float32))


def test_constant_through_identity_transpose_cast_replays_the_chain():
    w0 = _rng(2).standard_normal((2, 3, 4)).astype(np.float32)
    perm = [2, 0, 1]
    nodes = [
        helper.make_node("Identity", ["w0"], ["w1"], name="id"),
        helper.make_node("Transpose", ["w1"], ["w2"], perm=perm, name="tr"),
        helper.make_node("Cast", ["w2"], ["w3"], to=TensorProto.FLOAT16, name="cast"),
        helper.make_node("Add", ["x", "w3"], ["y"], name="add"),
    ]
    model = make_model(nodes, [vi("x", [4, 2, 3], TensorProto.FLOAT16)], [vi("y", [4, 2, 3], TensorProto.FLOAT16)],
                       [init("w0", w0)])
    c = GraphContext(model).constant("w3")
    expected = np.transpose(w0, perm).astype(np.float16)
    assert c.source == "w0"
    assert c.chain == ("id", "tr", "cast")  # outermost last
    assert c.elem_type == TensorProto.FLOAT16
    assert c.shape == (4, 2, 3)
    assert c.value.dtype == np.float16
    np.testing.assert_array_equal(c.value, expected)
    # Intermediate links resolve too, with their partial chains.
    mid = GraphContext(model).constant("w2")
    assert mid.chain == ("id", "tr") and mid.elem_type == TensorProto.FLOAT
    np.testing.assert_array_equal(mid.value, np.transpose(w0, perm))


def test_transpose_without_perm_reverses_axes():
    w0 = _rng(3).standard_normal((2, 3, 5)).astype(np.float32)
    model = make_model([helper.make_node("Transpose", ["w0"], ["w1"], name="tr"),
                        helper.make_node("Add", ["x", "w1"], ["y"], name="add")],
                       [vi("x", [5, 3, 2])], [vi("y", [5, 3, 2])], [init("w0", w0)])
    c = GraphContext(model).constant("w1")
    assert c.shape == (5, 3, 2)
    np.testing.assert_array_equal(c.value, w0.transpose(2, 1, 0))


def test_graph_input_is_not_constant():
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", [2, 4]), vi("w", [4, 3])], [vi("y", [2, 3])])
    ctx = GraphContext(model)
    assert ctx.constant("w") is None
    assert ctx.why_not_constant("w") == "weight 'w' is a graph input (not a constant)"


def _input_with_default(ir_version: int) -> onnx.ModelProto:
    w = _rng(4).standard_normal((4, 3)).astype(np.float32)
    return _raw_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                      [vi("x", [2, 4]), vi("w", [4, 3])], [vi("y", [2, 3])], [init("w", w)],
                      ir_version=ir_version, opset=8 if ir_version < 4 else 17)


def test_initializer_that_is_an_input_is_not_constant_from_ir4():
    ctx = GraphContext(_input_with_default(8))
    assert not ctx.legacy_inputs
    assert ctx.constant("w") is None
    reason = ctx.why_not_constant("w")
    assert "graph input with a default initializer" in reason and "'w'" in reason


def test_initializer_listed_as_input_is_constant_in_ir3():
    model = _input_with_default(3)
    ctx = GraphContext(model)
    assert ctx.legacy_inputs
    c = ctx.constant("w")
    assert c is not None and c.source == "w"
    np.testing.assert_array_equal(c.value, numpy_helper.to_array(model.graph.initializer[0]))


def test_weight_computed_by_a_node_names_op_and_node():
    model = make_model([helper.make_node("Relu", ["p"], ["w"], name="make_w"),
                        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", [2, 4]), vi("p", [4, 3])], [vi("y", [2, 3])])
    ctx = GraphContext(model)
    assert ctx.constant("w") is None
    assert ctx.why_not_constant("w") == "weight 'w' is computed at run time by Relu node 'make_w'"


def test_pass_through_of_a_computed_value_is_not_constant():
    model = make_model([helper.make_node("Relu", ["p"], ["r"], name="relu"),
                        helper.make_node("Transpose", ["r"], ["w"], name="tr"),
                        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", [2, 4]), vi("p", [3, 4])], [vi("y", [2, 3])])
    ctx = GraphContext(model)
    assert ctx.constant("w") is None
    assert ctx.why_not_constant("w") == "weight 'w' is computed at run time by Transpose node 'tr'"


def test_outer_scope_value_reason():
    ctx = GraphContext(_raw_model([], [vi("x", [1])], [vi("x", [1])]))
    assert ctx.why_not_constant("nowhere") == "weight 'nowhere' is not produced in this graph (outer-scope value)"


@pytest.mark.parametrize("through", [[], ["Transpose"], ["Identity", "Transpose"]])
def test_dequantize_linear_source_gives_quantized_reason(through):
    q = _rng(5).integers(-100, 100, (4, 3)).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["d0"], name="dq")]
    name = "d0"
    for i, op in enumerate(through):
        nodes.append(helper.make_node(op, [name], [f"d{i + 1}"], name=f"{op.lower()}_{i}"))
        name = f"d{i + 1}"
    transposed = through.count("Transpose") % 2 == 1
    k = 3 if transposed else 4
    nodes.append(helper.make_node("MatMul", ["x", name], ["y"], name="mm"))
    model = make_model(nodes, [vi("x", [2, k])], [vi("y", [2, 4 if transposed else 3])],
                       [init("q", q), init("scale", np.array(0.05, np.float32)), init("zp", np.array(0, np.int8))])
    ctx = GraphContext(model)
    assert ctx.constant(name) is None
    assert ctx.why_not_constant(name) == (f"weight {name!r} comes from DequantizeLinear (quantized model): "
                                          "left alone")


# -- names --------------------------------------------------------------------------------------

def _model_with_if_subgraph() -> onnx.ModelProto:
    """Outer graph uses ``t``; the If branches use ``t_1`` (node name), ``t_2`` (tensor), ``t_3``
    (value_info of the inner graph) and read the outer initializer ``w``."""
    w = _rng(6).standard_normal((3,)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("Add", ["w", "w"], ["t_2"], name="t_1")], "then", [],
                               [vi("t_2", [3])], value_info=[vi("t_3", [3])])
    else_g = helper.make_graph([helper.make_node("Identity", ["w"], ["e"], name="e_id")], "else", [], [vi("e", [3])])
    nodes = [helper.make_node("Relu", ["x"], ["t"], name="relu"),
             helper.make_node("If", ["c"], ["z"], then_branch=then_g, else_branch=else_g, name="if")]
    return make_model(nodes, [vi("x", [3]), vi("c", [], TensorProto.BOOL)], [vi("t", [3]), vi("z", [3])],
                      [init("w", w)])


def test_unique_never_returns_a_used_name_even_inside_subgraphs():
    model = _model_with_if_subgraph()
    used = _all_names(model)
    assert {"t", "t_1", "t_2", "t_3"} <= used
    ctx = GraphContext(model)
    first = ctx.unique("t")
    assert first == "t_4"  # t, t_1 (node in the If), t_2 (tensor in the If), t_3 (inner value_info) taken
    second = ctx.unique("t")
    assert second == "t_5"  # names handed out are taken too
    assert ctx.unique("fresh") == "fresh"
    assert ctx.unique("fresh") == "fresh_1"
    assert ctx.unique("e_id") == "e_id_1"
    assert not ({first, second} & used)


def test_unique_avoids_names_of_nested_loop_bodies():
    inner = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["deep"], name="deep_node")], "inner",
                              [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL)],
                              [vi("deep", [], TensorProto.BOOL)])
    then_g = helper.make_graph([helper.make_node("Loop", ["n", "c"], [], body=inner, name="loop")], "then", [],
                               [])
    model = _raw_model([helper.make_node("If", ["c"], [], then_branch=then_g, else_branch=then_g, name="if")],
                       [vi("c", [], TensorProto.BOOL), vi("n", [], TensorProto.INT64)], [])
    ctx = GraphContext(model)
    assert ctx.unique("deep") == "deep_1"
    assert ctx.unique("deep_node") == "deep_node_1"
    assert ctx.unique("cond_in") == "cond_in_1"  # a subgraph input


def test_unique_avoids_sparse_initializer_names():
    model = _raw_model([], [vi("x", [2])], [vi("x", [2])])
    dense = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sp")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "sp_idx")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(dense, indices, [4]))
    assert model.graph.sparse_initializer[0].values.name == "sp"
    assert GraphContext(model).unique("sp") != "sp"


def test_unique_labels_unnamed_and_duplicated():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),  # unnamed
        helper.make_node("Relu", ["a"], ["b"], name="dup"),
        helper.make_node("Relu", ["b"], ["c"], name="dup"),
        helper.make_node("Relu", ["c"], ["d"]),  # unnamed
        helper.make_node("Relu", ["d"], ["e"], name="dup"),
        helper.make_node("Relu", ["e"], ["f"], name="MatMul_0"),  # collides with the generated label
    ]
    graph = helper.make_graph(nodes, "g", [vi("x", [1, 2])], [vi("f", [1, 2])],
                              [init("w", np.eye(2, dtype=np.float32))])
    labels = unique_labels(graph)
    assert labels == ["MatMul_0", "dup", "dup#2", "Relu_3", "dup#3", "MatMul_0#2"]
    assert len(set(labels)) == len(labels)
    assert GraphContext.node_label(nodes[0], 0) == "MatMul_0"
    assert GraphContext.node_label(nodes[1], 1) == "dup"


def test_subgraph_nodes_names_owners():
    model = _model_with_if_subgraph()
    found = sorted((owner, n.name, n.op_type) for owner, n in subgraph_nodes(model.graph))
    assert found == [("if", "e_id", "Identity"), ("if", "t_1", "Add")]


# -- readers ------------------------------------------------------------------------------------

def test_is_used_elsewhere_consumers():
    w = _rng(7).standard_normal((4, 4)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
                        helper.make_node("MatMul", ["h", "w"], ["y"], name="mm2")],
                       [vi("x", [2, 4])], [vi("y", [2, 4])], [init("w", w)])
    ctx = GraphContext(model)
    mm1, mm2 = model.graph.node
    assert ctx.is_used_elsewhere("w", {id(mm1)}) is True
    assert ctx.is_used_elsewhere("w", {id(mm2)}) is True
    assert ctx.is_used_elsewhere("w", {id(mm1), id(mm2)}) is False
    assert ctx.is_used_elsewhere("h", {id(mm2)}) is False
    assert ctx.is_used_elsewhere("h", set()) is True


def test_is_used_elsewhere_graph_output():
    w = _rng(8).standard_normal((4, 4)).astype(np.float32)
    model = _raw_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                        helper.make_node("Relu", ["h"], ["y"], name="relu")],
                       [vi("x", [2, 4])], [vi("y", [2, 4]), vi("h", [2, 4])], [init("w", w)])
    ctx = GraphContext(model)
    mm, relu = model.graph.node
    assert ctx.is_used_elsewhere("h", {id(relu)}) is True  # the caller reads it
    assert ctx.is_used_elsewhere("w", {id(mm)}) is False


def test_is_used_elsewhere_subgraph_capture():
    model = _model_with_if_subgraph()
    ctx = GraphContext(model)
    assert "w" in ctx.subgraph_refs
    assert ctx.consumers.get("w", []) == []  # only the If branches read it
    assert ctx.is_used_elsewhere("w", set()) is True
    assert ctx.is_used_elsewhere("x", {id(model.graph.node[0])}) is False


# -- lazy external weights ----------------------------------------------------------------------

def _save_external(tmp_path, w: np.ndarray, nodes, inputs, outputs, extra=()):
    model = make_model(nodes, inputs, outputs, [init("w", w), *extra])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    return onnx.load_model(str(path), load_external_data=False)


def test_lazy_external_weight(tmp_path):
    w = _rng(9).standard_normal((16, 8)).astype(np.float32)
    b = _rng(10).standard_normal((8,)).astype(np.float32)
    lazy = _save_external(tmp_path, w, [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                                        helper.make_node("Add", ["h", "b"], ["y"], name="add")],
                          [vi("x", [2, 16])], [vi("y", [2, 8])], [init("b", b)])
    t = next(t for t in lazy.graph.initializer if t.name == "w")
    assert t.data_location == TensorProto.EXTERNAL and not t.raw_data  # nothing in memory

    assert GraphContext(lazy).constant("w") is None  # nowhere to read it from

    ctx = GraphContext(lazy, base_dir=str(tmp_path))
    c = ctx.constant("w")
    assert c is not None and c.lazy
    assert c.shape == (16, 8) and c.elem_type == TensorProto.FLOAT
    np.testing.assert_array_equal(c.value, w)
    np.testing.assert_array_equal(c.value, w)  # read again from disk: same values
    np.testing.assert_array_equal(ctx.constant("b").value, b)
    # The model itself stays unloaded.
    assert not next(t for t in lazy.graph.initializer if t.name == "w").raw_data


def test_lazy_external_weight_behind_transpose_stays_lazy(tmp_path):
    w = _rng(11).standard_normal((8, 16)).astype(np.float32)
    lazy = _save_external(tmp_path, w, [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0], name="tr"),
                                        helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")],
                          [vi("x", [2, 16])], [vi("y", [2, 8])])
    c = GraphContext(lazy, base_dir=str(tmp_path)).constant("wt")
    assert c.lazy and c.source == "w" and c.chain == ("tr",) and c.shape == (16, 8)
    np.testing.assert_array_equal(c.value, w.T)
