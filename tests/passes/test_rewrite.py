"""apply_rewrites on its own: hand-built Rewrites on small models; what goes, what stays, byte for byte."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import init, make_model, rel_err, run, vi
from onnx_lowrank.passes.graph import GraphContext, Rewrite
from onnx_lowrank.passes.rewrite import apply_rewrites


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _svd_split(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact full-rank split ``w = a @ b`` (sqrt of the singular values in both factors)."""
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    root = np.sqrt(s)
    return (u * root).astype(np.float32), (root[:, None] * vt).astype(np.float32)


def _matmul_pair(x: str, out: str, a: str, b: str, label: str) -> list[onnx.NodeProto]:
    hidden = f"{label}/lowrank_hidden"
    return [helper.make_node("MatMul", [x, a], [hidden], name=f"{label}/lowrank_a"),
            helper.make_node("MatMul", [hidden, b], [out], name=f"{label}/lowrank_b")]


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _bytes(messages) -> list[bytes]:
    return [m.SerializeToString() for m in messages]


def _mlp(seed: int = 0):
    """pre: x + b0 -> mm: @ w -> post: + b1; initializers b0, w, b1 (in that order)."""
    rng = _rng(seed)
    w = rng.standard_normal((12, 8)).astype(np.float32)
    b0 = rng.standard_normal((12,)).astype(np.float32)
    b1 = rng.standard_normal((8,)).astype(np.float32)
    model = make_model(
        [helper.make_node("Add", ["x", "b0"], ["x1"], name="pre"),
         helper.make_node("MatMul", ["x1", "w"], ["h"], name="mm"),
         helper.make_node("Add", ["h", "b1"], ["y"], name="post")],
        [vi("x", [5, 12])], [vi("y", [5, 8])], [init("b0", b0), init("w", w), init("b1", b1)])
    return model, w


# -- (a) one MatMul at full rank ----------------------------------------------------------------

@pytest.mark.parametrize("split", ["identity", "svd"])
def test_full_rank_matmul_pair_keeps_outputs_and_order(split):
    model, w = _mlp()
    original = onnx.ModelProto()
    original.CopyFrom(model)
    x = _rng(1).standard_normal((5, 12)).astype(np.float32)
    expected = run(original, {"x": x})[0]

    a, b = (w, np.eye(8, dtype=np.float32)) if split == "identity" else _svd_split(w)
    ctx = GraphContext(model)
    mm = _node(model, "mm")
    rewrite = Rewrite(_matmul_pair("x1", "h", "w/lowrank_a", "w/lowrank_b", "mm"),
                      [("w/lowrank_a", a), ("w/lowrank_b", b)])
    apply_rewrites(model, {id(mm): rewrite}, ["w"], ctx)
    onnx.checker.check_model(model, full_check=True)

    got = run(model, {"x": x})[0]
    assert rel_err(got, expected) < 1e-5
    # The new nodes stand where mm stood: pre before them, post after.
    assert [n.name for n in model.graph.node] == ["pre", "mm/lowrank_a", "mm/lowrank_b", "post"]
    assert [n.op_type for n in model.graph.node] == ["Add", "MatMul", "MatMul", "Add"]
    assert _bytes([_node(model, "pre"), _node(model, "post")]) == _bytes([_node(original, "pre"),
                                                                         _node(original, "post")])
    # w removed; b0, b1 byte-identical in their order; factors appended at the end.
    names = [t.name for t in model.graph.initializer]
    assert names == ["b0", "b1", "w/lowrank_a", "w/lowrank_b"]
    assert _bytes(model.graph.initializer[:2]) == _bytes([original.graph.initializer[0], original.graph.initializer[2]])
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[2]), a)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[3]), b)
    assert model.graph.initializer[2].data_type == TensorProto.FLOAT
    assert rewrite.initializers == []  # the arrays are dropped once copied into the model


def test_rewrite_not_producing_the_old_outputs_is_refused():
    model, w = _mlp()
    mm = _node(model, "mm")
    bad = Rewrite(_matmul_pair("x1", "not_h", "w/lowrank_a", "w/lowrank_b", "mm"),
                  [("w/lowrank_a", w), ("w/lowrank_b", np.eye(8, dtype=np.float32))])
    with pytest.raises(AssertionError, match="does not produce the node's outputs"):
        apply_rewrites(model, {id(mm): bad}, ["w"], GraphContext(model))


# -- (b) weight behind pass-through nodes -------------------------------------------------------

@pytest.mark.parametrize("chain", [["Transpose"], ["Transpose", "Identity"], ["Identity", "Transpose", "Cast"],
                                   ["Constant", "Transpose", "Identity"]])
def test_pass_through_producers_go_with_the_weight(chain):
    rng = _rng(2)
    w = rng.standard_normal((12, 8)).astype(np.float32)
    stored = np.ascontiguousarray(w.T)  # stored transposed, as exporters do
    nodes, inits, name = [], [], "w_stored"
    if chain[0] == "Constant":
        nodes.append(helper.make_node("Constant", [], ["w_stored"], value=numpy_helper.from_array(stored),
                                      name="const"))
        chain = chain[1:]
    else:
        inits.append(init("w_stored", stored))
    for i, op in enumerate(chain):
        attrs = {"perm": [1, 0]} if op == "Transpose" else {"to": TensorProto.FLOAT} if op == "Cast" else {}
        nodes.append(helper.make_node(op, [name], [f"w{i}"], name=f"{op.lower()}{i}", **attrs))
        name = f"w{i}"
    keep = init("keep", rng.standard_normal((8,)).astype(np.float32))
    nodes += [helper.make_node("MatMul", ["x", name], ["h"], name="mm"),
              helper.make_node("Add", ["h", "keep"], ["y"], name="post")]
    model = make_model(nodes, [vi("x", [3, 12])], [vi("y", [3, 8])], inits + [keep])
    x = rng.standard_normal((3, 12)).astype(np.float32)
    expected = run(model, {"x": x})[0]

    ctx = GraphContext(model)
    assert ctx.constant(name) is not None
    a, b = _svd_split(w)
    apply_rewrites(model, {id(_node(model, "mm")): Rewrite(_matmul_pair("x", "h", "w/a", "w/b", "mm"),
                                                            [("w/a", a), ("w/b", b)])}, [name], ctx)
    onnx.checker.check_model(model, full_check=True)
    assert [n.name for n in model.graph.node] == ["mm/lowrank_a", "mm/lowrank_b", "post"]
    assert [t.name for t in model.graph.initializer] == ["keep", "w/a", "w/b"]
    assert rel_err(run(model, {"x": x})[0], expected) < 1e-5


# -- (c) a weight still read elsewhere stays ----------------------------------------------------

def _replace_mm1(model, label="mm1", x="x", out="h1", weight="w"):
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w_stored"))
    a, b = _svd_split(w.T)
    ctx = GraphContext(model)
    rw = Rewrite(_matmul_pair(x, out, f"{label}/a", f"{label}/b", label), [(f"{label}/a", a), (f"{label}/b", b)])
    apply_rewrites(model, {id(_node(model, label)): rw}, [weight], ctx)


def test_weight_read_by_another_node_is_kept():
    rng = _rng(3)
    w_stored = rng.standard_normal((8, 8)).astype(np.float32)
    model = make_model([helper.make_node("Transpose", ["w_stored"], ["w"], perm=[1, 0], name="tr"),
                        helper.make_node("MatMul", ["x", "w"], ["h1"], name="mm1"),
                        helper.make_node("MatMul", ["h1", "w"], ["y"], name="mm2")],
                       [vi("x", [2, 8])], [vi("y", [2, 8])], [init("w_stored", w_stored)])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    tr_bytes = _node(model, "tr").SerializeToString()
    _replace_mm1(model)
    assert [n.name for n in model.graph.node] == ["tr", "mm1/lowrank_a", "mm1/lowrank_b", "mm2"]
    assert _node(model, "tr").SerializeToString() == tr_bytes
    assert [t.name for t in model.graph.initializer] == ["w_stored", "mm1/a", "mm1/b"]
    assert rel_err(run(model, {"x": x})[0], expected) < 1e-5


def test_source_read_by_another_node_keeps_it_but_drops_the_transpose():
    rng = _rng(4)
    w_stored = rng.standard_normal((8, 8)).astype(np.float32)
    model = make_model([helper.make_node("Transpose", ["w_stored"], ["w"], perm=[1, 0], name="tr"),
                        helper.make_node("MatMul", ["x", "w"], ["h1"], name="mm1"),
                        helper.make_node("MatMul", ["h1", "w_stored"], ["y"], name="mm2")],
                       [vi("x", [2, 8])], [vi("y", [2, 8])], [init("w_stored", w_stored)])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    _replace_mm1(model)
    assert [n.name for n in model.graph.node] == ["mm1/lowrank_a", "mm1/lowrank_b", "mm2"]
    assert [t.name for t in model.graph.initializer] == ["w_stored", "mm1/a", "mm1/b"]
    assert rel_err(run(model, {"x": x})[0], expected) < 1e-5


def test_weight_that_is_a_graph_output_is_kept():
    rng = _rng(5)
    w_stored = rng.standard_normal((8, 8)).astype(np.float32)
    model = make_model([helper.make_node("Transpose", ["w_stored"], ["w"], perm=[1, 0], name="tr"),
                        helper.make_node("MatMul", ["x", "w"], ["h1"], name="mm1")],
                       [vi("x", [2, 8])], [vi("h1", [2, 8]), vi("w", [8, 8])], [init("w_stored", w_stored)])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    expected = run(model, {"x": x})
    _replace_mm1(model)
    onnx.checker.check_model(model, full_check=True)
    assert [n.name for n in model.graph.node] == ["tr", "mm1/lowrank_a", "mm1/lowrank_b"]
    assert [t.name for t in model.graph.initializer] == ["w_stored", "mm1/a", "mm1/b"]
    got = run(model, {"x": x})
    assert rel_err(got[0], expected[0]) < 1e-5
    np.testing.assert_array_equal(got[1], expected[1])


def test_weight_captured_by_an_if_subgraph_is_kept():
    rng = _rng(6)
    w_stored = rng.standard_normal((8, 8)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("Identity", ["w_stored"], ["t"], name="then_id")], "then", [],
                               [vi("t", [8, 8])])
    else_g = helper.make_graph([helper.make_node("Neg", ["w_stored"], ["e"], name="else_neg")], "else", [],
                               [vi("e", [8, 8])])
    model = make_model([helper.make_node("Transpose", ["w_stored"], ["w"], perm=[1, 0], name="tr"),
                        helper.make_node("MatMul", ["x", "w"], ["h1"], name="mm1"),
                        helper.make_node("If", ["c"], ["z"], then_branch=then_g, else_branch=else_g, name="if")],
                       [vi("x", [2, 8]), vi("c", [], TensorProto.BOOL)], [vi("h1", [2, 8]), vi("z", [8, 8])],
                       [init("w_stored", w_stored)])
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32), "c": np.array(False)}
    expected = run(model, feeds)
    if_bytes = _node(model, "if").SerializeToString()
    _replace_mm1(model)
    onnx.checker.check_model(model, full_check=True)
    # The Transpose fed only mm1: it goes; the initializer it read stays for the If.
    assert [n.name for n in model.graph.node] == ["mm1/lowrank_a", "mm1/lowrank_b", "if"]
    assert _node(model, "if").SerializeToString() == if_bytes
    assert [t.name for t in model.graph.initializer] == ["w_stored", "mm1/a", "mm1/b"]
    got = run(model, feeds)
    assert rel_err(got[0], expected[0]) < 1e-5
    np.testing.assert_array_equal(got[1], -w_stored)


# -- (d) no global cleanup ----------------------------------------------------------------------

def test_dead_untouched_nodes_stay_and_keep_their_order():
    rng = _rng(7)
    w = rng.standard_normal((6, 6)).astype(np.float32)
    dead_w = rng.standard_normal((6, 6)).astype(np.float32)
    model = make_model(
        [helper.make_node("Relu", ["x"], ["unused"], name="dead"),  # output read by nothing
         helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
         helper.make_node("MatMul", ["s", "w"], ["h"], name="mm"),
         helper.make_node("MatMul", ["x", "dead_w"], ["unused2"], name="dead_mm"),  # dead, with a weight
         helper.make_node("Tanh", ["h"], ["y"], name="tanh")],
        [vi("x", [2, 6])], [vi("y", [2, 6])], [init("w", w), init("dead_w", dead_w)])
    original = onnx.ModelProto()
    original.CopyFrom(model)
    a, b = _svd_split(w)
    ctx = GraphContext(model)  # built first: it holds the node wrappers whose ids key the rewrites
    apply_rewrites(model, {id(_node(model, "mm")): Rewrite(_matmul_pair("s", "h", "w/a", "w/b", "mm"),
                                                            [("w/a", a), ("w/b", b)])}, ["w"], ctx)
    assert [n.name for n in model.graph.node] == ["dead", "sig", "mm/lowrank_a", "mm/lowrank_b", "dead_mm", "tanh"]
    for name in ("dead", "sig", "dead_mm", "tanh"):
        assert _node(model, name).SerializeToString() == _node(original, name).SerializeToString()
    assert [t.name for t in model.graph.initializer] == ["dead_w", "w/a", "w/b"]
    assert model.graph.initializer[0].SerializeToString() == original.graph.initializer[1].SerializeToString()
    x = rng.standard_normal((2, 6)).astype(np.float32)
    assert rel_err(run(model, {"x": x})[0], run(original, {"x": x})[0]) < 1e-5


# -- (e) IR 3: initializers are graph inputs ----------------------------------------------------

def test_ir3_removed_weight_leaves_inputs_and_factors_join_them():
    rng = _rng(8)
    w = rng.standard_normal((10, 6)).astype(np.float32)
    bias = rng.standard_normal((6,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Add", ["h", "bias"], ["y"], name="add")], "g",
        [vi("x", [4, 10]), vi("w", [10, 6]), vi("bias", [6])], [vi("y", [4, 6])],
        [init("w", w), init("bias", bias)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    ctx = GraphContext(model)
    assert ctx.constant("w") is not None
    a, b = _svd_split(w)
    bias_input = model.graph.input[2].SerializeToString()
    apply_rewrites(model, {id(_node(model, "mm")): Rewrite(_matmul_pair("x", "h", "w/a", "w/b", "mm"),
                                                            [("w/a", a), ("w/b", b)])}, ["w"], ctx)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 3
    assert [i.name for i in model.graph.input] == ["x", "bias", "w/a", "w/b"]
    assert model.graph.input[1].SerializeToString() == bias_input
    shapes = {i.name: ([d.dim_value for d in i.type.tensor_type.shape.dim], i.type.tensor_type.elem_type)
              for i in model.graph.input[2:]}
    assert shapes == {"w/a": ([10, 6], TensorProto.FLOAT), "w/b": ([6, 6], TensorProto.FLOAT)}
    assert [t.name for t in model.graph.initializer] == ["bias", "w/a", "w/b"]
    assert rel_err(run(model, {"x": x})[0], expected) < 1e-5


# -- (f) value_info -----------------------------------------------------------------------------

def test_value_info_of_removed_tensors_dropped_others_kept():
    rng = _rng(9)
    w_stored = rng.standard_normal((6, 10)).astype(np.float32)
    model = make_model(
        [helper.make_node("Transpose", ["w_stored"], ["wt"], perm=[1, 0], name="tr"),
         helper.make_node("Identity", ["wt"], ["w"], name="id"),
         helper.make_node("Relu", ["x"], ["xr"], name="relu"),
         helper.make_node("MatMul", ["xr", "w"], ["h"], name="mm"),
         helper.make_node("Tanh", ["h"], ["y"], name="tanh")],
        [vi("x", [4, 10])], [vi("y", [4, 6])], [init("w_stored", w_stored)])
    infos = [vi("w_stored", [6, 10]), vi("wt", [10, 6]), vi("xr", [4, 10]), vi("w", [10, 6]), vi("h", [4, 6])]
    model.graph.value_info.extend(infos)
    kept = [model.graph.value_info[2].SerializeToString(), model.graph.value_info[4].SerializeToString()]
    a, b = _svd_split(w_stored.T)
    ctx = GraphContext(model)
    apply_rewrites(model, {id(_node(model, "mm")): Rewrite(_matmul_pair("xr", "h", "w/a", "w/b", "mm"),
                                                            [("w/a", a), ("w/b", b)])}, ["w"], ctx)
    assert [v.name for v in model.graph.value_info] == ["xr", "h"]
    assert _bytes(model.graph.value_info) == kept
    assert [n.name for n in model.graph.node] == ["relu", "mm/lowrank_a", "mm/lowrank_b", "tanh"]
    onnx.checker.check_model(model, full_check=True)


# -- (g) model-level fields ---------------------------------------------------------------------

def test_model_level_fields_unchanged():
    model, w = _mlp()
    model.doc_string = "a model with a story"
    model.producer_name, model.producer_version = "exporter", "9.9"
    model.domain, model.model_version = "org.example", 7
    model.graph.doc_string = "graph doc"
    onnx.helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    before = {f: getattr(model, f) for f in ("doc_string", "producer_name", "producer_version", "domain",
                                             "model_version", "ir_version")}
    meta, opsets = _bytes(model.metadata_props), _bytes(model.opset_import)
    graph_fields = (model.graph.name, model.graph.doc_string, _bytes(model.graph.input), _bytes(model.graph.output))
    a, b = _svd_split(w)
    ctx = GraphContext(model)
    apply_rewrites(model, {id(_node(model, "mm")): Rewrite(_matmul_pair("x1", "h", "w/a", "w/b", "mm"),
                                                            [("w/a", a), ("w/b", b)])}, ["w"], ctx)
    assert {f: getattr(model, f) for f in before} == before
    assert _bytes(model.metadata_props) == meta
    assert _bytes(model.opset_import) == opsets
    assert (model.graph.name, model.graph.doc_string, _bytes(model.graph.input),
            _bytes(model.graph.output)) == graph_fields


# -- (h) two nodes sharing one weight -----------------------------------------------------------

def test_shared_weight_factors_stored_once():
    rng = _rng(10)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h1"], name="mm1"),
                        helper.make_node("Relu", ["h1"], ["r"], name="relu"),
                        helper.make_node("MatMul", ["r", "w"], ["y"], name="mm2")],
                       [vi("x", [3, 8])], [vi("y", [3, 8])], [init("w", w)])
    x = rng.standard_normal((3, 8)).astype(np.float32)
    expected = run(model, {"x": x})[0]
    a, b = _svd_split(w)
    first = Rewrite(_matmul_pair("x", "h1", "w/lowrank_a", "w/lowrank_b", "mm1"),
                    [("w/lowrank_a", a), ("w/lowrank_b", b)])
    second = Rewrite(_matmul_pair("r", "y", "w/lowrank_a", "w/lowrank_b", "mm2"))  # reuses the names
    ctx = GraphContext(model)
    apply_rewrites(model, {id(_node(model, "mm1")): first, id(_node(model, "mm2")): second}, ["w", "w"], ctx)
    onnx.checker.check_model(model, full_check=True)
    assert [t.name for t in model.graph.initializer] == ["w/lowrank_a", "w/lowrank_b"]
    assert [n.name for n in model.graph.node] == ["mm1/lowrank_a", "mm1/lowrank_b", "relu",
                                                  "mm2/lowrank_a", "mm2/lowrank_b"]
    readers = [n.input[1] for n in model.graph.node if n.op_type == "MatMul"]
    assert readers == ["w/lowrank_a", "w/lowrank_b"] * 2
    assert rel_err(run(model, {"x": x})[0], expected) < 1e-5
