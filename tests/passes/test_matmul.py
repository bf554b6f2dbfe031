"""MatMul pass: every variant at forced full rank reproduces onnxruntime's output; structure; skips."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import assert_clean, init, make_model, rel_err, run, vi
from onnx_lowrank import LowRankConfig, optimize

FULL = LowRankConfig(rank=100000, force=True)


def _matmul_right(x_shape, m=24, n=16, *, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, n)).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [vi("x", x_shape, elem)], [vi("y", list(x_shape[:-1]) + [n], elem)], [init("w", w)],
    )
    return model, w


@pytest.mark.parametrize("x_shape", [[5, 24], [2, 5, 24], [2, 3, 5, 24], [24]])
def test_right_weight_full_rank_reproduces_outputs(x_shape):
    model, _ = _matmul_right(x_shape)
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    out, report = optimize(model, FULL)
    assert report.layers[0].status == "factorized" and report.layers[0].rank == 16
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-4
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul"]
    assert out.graph.node[0].input[0] == "x"  # activation first: (X @ A) @ B, never A @ B
    assert_clean(out)


@pytest.mark.parametrize("x_shape", [[16, 7], [3, 16, 7], [16]])
def test_left_weight_full_rank_reproduces_outputs(x_shape):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((20, 16)).astype(np.float32)
    y_shape = [20] if len(x_shape) == 1 else list(x_shape[:-2]) + [20, x_shape[-1]]
    model = make_model([helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")],
                       [vi("x", x_shape)], [vi("y", y_shape)], [init("w", w)])
    x = rng.standard_normal(x_shape).astype(np.float32)
    out, report = optimize(model, FULL)
    assert report.layers[0].status == "factorized"
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-4
    first, second = out.graph.node
    assert first.input[1] == "x" and second.input[1] == first.output[0]  # A @ (B @ X)
    assert_clean(out)


def test_truncated_rank_gives_predicted_error():
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    v, _ = np.linalg.qr(rng.standard_normal((48, 48)))
    s = 1.0 / np.arange(1, 49)
    w = (u[:, :48] * s) @ v.T
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", [10, 64])], [vi("y", [10, 48])], [init("w", w.astype(np.float32))])
    out, report = optimize(model, LowRankConfig(rank=8, method="svd"))
    row = report.layers[0]
    predicted = np.sqrt(np.sum(s[8:] ** 2) / np.sum(s**2))
    assert row.rank == 8
    assert row.rel_error == pytest.approx(predicted, rel=1e-3)
    assert row.optimal_error == pytest.approx(predicted, rel=1e-3)
    # The model computes exactly X @ A @ B with the stored factors.
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    a, b = inits["w/lowrank_a"], inits["w/lowrank_b"]
    assert a.shape == (64, 8) and b.shape == (8, 48)
    assert rel_err(a @ b, w) == pytest.approx(predicted, rel=1e-3)
    x = rng.standard_normal((10, 64)).astype(np.float32)
    assert rel_err(run(out, {"x": x})[0], x @ a @ b) < 1e-5
    # sqrt(sigma) in both factors: the factors have equal column/row norms.
    assert np.allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-3)


def test_node_and_initializer_names_derive_from_original():
    model, _ = _matmul_right([4, 24])
    out, _ = optimize(model, LowRankConfig(rank=4))
    assert [n.name for n in out.graph.node] == ["mm/lowrank_a", "mm/lowrank_b"]
    assert sorted(t.name for t in out.graph.initializer) == ["w/lowrank_a", "w/lowrank_b"]
    assert out.graph.node[0].output[0] == "mm/lowrank_hidden"


def test_input_model_is_not_modified():
    model, _ = _matmul_right([4, 24])
    before = model.SerializeToString()
    optimize(model, LowRankConfig(rank=4))
    assert model.SerializeToString() == before


def test_same_seed_same_bytes_and_other_seed_differs():
    model, _ = _matmul_right([4, 96], m=96, n=80)
    a = optimize(model, LowRankConfig(rank=10, seed=7))[0].SerializeToString()
    b = optimize(model, LowRankConfig(rank=10, seed=7))[0].SerializeToString()
    c = optimize(model, LowRankConfig(rank=10, seed=8))[0].SerializeToString()
    assert a == b and a != c


def test_shared_weight_is_factorized_once():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((24, 16)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x1", "w"], ["y1"], name="mm1"),
         helper.make_node("MatMul", ["x2", "w"], ["y2"], name="mm2")],
        [vi("x1", [3, 24]), vi("x2", [5, 24])], [vi("y1", [3, 16]), vi("y2", [5, 16])], [init("w", w)],
    )
    out, report = optimize(model, FULL)
    assert [r.status for r in report.layers] == ["factorized", "factorized"]
    assert len(out.graph.initializer) == 2  # one A and one B, used by both chains
    feeds = {"x1": rng.standard_normal((3, 24)).astype(np.float32), "x2": rng.standard_normal((5, 24)).astype(np.float32)}
    for got, want in zip(run(out, feeds), run(model, feeds)):
        assert rel_err(got, want) < 1e-4
    assert_clean(out)


def test_weight_from_constant_node_and_behind_transpose_and_cast():
    rng = np.random.default_rng(5)
    w_t = rng.standard_normal((16, 24)).astype(np.float16)  # stored transposed and half
    const = helper.make_node("Constant", [], ["w_half_t"], name="const",
                             value=numpy_helper.from_array(w_t, "w_half_t"))
    nodes = [
        const,
        helper.make_node("Transpose", ["w_half_t"], ["w_half"], name="tr", perm=[1, 0]),
        helper.make_node("Cast", ["w_half"], ["w"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [vi("x", [4, 24])], [vi("y", [4, 16])])
    x = rng.standard_normal((4, 24)).astype(np.float32)
    out, report = optimize(model, FULL)
    assert report.layers[0].status == "factorized"
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul"]  # the chain is gone
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < 1e-4
    assert_clean(out)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_half_and_double_weights_keep_their_dtype(dtype):
    model, _ = _matmul_right([4, 24], dtype=dtype)
    x = np.random.default_rng(6).standard_normal((4, 24)).astype(dtype)
    out, _ = optimize(model, FULL)
    assert {t.data_type for t in out.graph.initializer} == {helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}
    tol = 2e-3 if dtype == np.float16 else 1e-10
    assert rel_err(run(out, {"x": x})[0], run(model, {"x": x})[0]) < tol
    assert_clean(out)


def test_bfloat16_weight_is_stored_as_bfloat16():
    import ml_dtypes

    w = np.random.default_rng(7).standard_normal((24, 16)).astype(ml_dtypes.bfloat16)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", [4, 24], TensorProto.BFLOAT16)], [vi("y", [4, 16], TensorProto.BFLOAT16)],
                       [numpy_helper.from_array(w, "w")])
    out, _ = optimize(model, FULL)
    a, b = (numpy_helper.to_array(t) for t in out.graph.initializer)
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.BFLOAT16}
    assert rel_err(a.astype(np.float32) @ b.astype(np.float32), w.astype(np.float32)) < 2e-2
    assert_clean(out)


def _reasons(model, config=FULL):
    return [(r.node, r.status, r.reason) for r in optimize(model, config)[1].layers]


def test_skip_reasons():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    w3 = rng.standard_normal((2, 8, 6)).astype(np.float32)
    wi = rng.integers(-3, 3, (8, 6)).astype(np.int32)
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["y1"], name="graph_input"),
        helper.make_node("MatMul", ["c1", "c2"], ["y2"], name="two_consts"),
        helper.make_node("MatMul", ["x", "w3"], ["y3"], name="batched"),
        helper.make_node("MatMul", ["xi", "wi"], ["y4"], name="integer"),
        helper.make_node("Relu", ["x"], ["rx"], name="relu"),
        helper.make_node("MatMul", ["x", "rx_t"], ["y5"], name="activation"),
        helper.make_node("Transpose", ["rx"], ["rx_t"], name="t"),
    ]
    # Keep the graph valid: y5 depends on rx_t produced after it would break topo order, so reorder.
    nodes = nodes[:5] + [nodes[6], nodes[5]]
    model = make_model(
        nodes,
        [vi("x", [8, 8]), vi("w_in", [8, 6]), vi("xi", [3, 8], TensorProto.INT32)],
        [vi("y1", [8, 6]), vi("y2", [8, 6]), vi("y3", [2, 8, 6]), vi("y4", [3, 6], TensorProto.INT32), vi("y5", [8, 8])],
        [init("c1", np.eye(8, dtype=np.float32)), init("c2", w), init("w3", w3), init("wi", wi)],
    )
    reasons = {node: reason for node, status, reason in _reasons(model)}
    assert reasons["graph_input"] == "weight 'w_in' is a graph input (not a constant)"
    assert reasons["two_consts"] == "both inputs are constants (constant-foldable): left alone"
    assert reasons["batched"] == "weight 'w3' is 3-D [2, 8, 6], only 2-D weights are factorized"
    assert reasons["integer"] == "weight 'wi' has dtype int32, not a float type"
    assert reasons["activation"] == "weight 'rx_t' is computed at run time by Transpose node 't'"


def test_non_finite_weight_is_left_alone():
    w = np.ones((8, 6), np.float32)
    w[2, 3] = np.nan
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", [2, 8])], [vi("y", [2, 6])], [init("w", w)])
    out, report = optimize(model, FULL)
    assert report.layers[0].reason == "weight 'w' contains NaN or Inf: left alone"
    assert out.graph.node[0].op_type == "MatMul" and len(out.graph.node) == 1


def test_subgraph_nodes_left_intact_and_outer_weight_kept():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((12, 10)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t_out"], name="inner_mm")],
                               "then", [], [vi("t_out", [3, 10])])
    else_g = helper.make_graph([helper.make_node("Identity", ["y"], ["e_out"], name="inner_id")],
                               "else", [], [vi("e_out", [3, 10])])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="outer_mm"),
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    model = make_model(nodes, [vi("x", [3, 12]), vi("cond", [], TensorProto.BOOL)], [vi("z", [3, 10])], [init("w", w)])
    out, report = optimize(model, FULL)
    rows = {r.node: r for r in report.layers}
    assert rows["outer_mm"].status == "factorized"
    assert rows["inner_mm"].reason == "inside the subgraph of 'branch': subgraphs are left intact"
    assert "w" in {t.name for t in out.graph.initializer}  # still read by the subgraph
    x = rng.standard_normal((3, 12)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert rel_err(run(out, feeds)[0], run(model, feeds)[0]) < 1e-4
    onnx.checker.check_model(out, full_check=True)


def test_second_run_does_not_factorize_again():
    model, _ = _matmul_right([4, 96], m=96, n=80)
    once, _ = optimize(model, LowRankConfig(ratio=0.5))
    twice, report = optimize(once, LowRankConfig(ratio=0.5))
    assert all(r.reason == "already a low-rank factor (made by onnx-lowrank)" for r in report.layers)
    assert twice.SerializeToString() == once.SerializeToString()


def test_graph_output_value_info_and_metadata_preserved():
    model, _ = _matmul_right([4, 24])
    model.doc_string = "doc"
    helper.set_model_props(model, {"author": "me"})
    model.graph.value_info.append(vi("y", [4, 16]))
    out, _ = optimize(model, LowRankConfig(rank=4))
    assert out.doc_string == "doc" and out.metadata_props[0].key == "author"
    assert out.opset_import == model.opset_import and out.ir_version == model.ir_version
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output
    assert [v.name for v in out.graph.value_info] == ["y"]


def test_initializer_that_is_also_an_input():
    w = np.random.default_rng(10).standard_normal((24, 16)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [vi("x", [4, 24]), vi("w", [24, 16])], [vi("y", [4, 16])], [init("w", w)])
    _, report = optimize(model, FULL)  # IR 8: an overridable default, left alone
    assert report.layers[0].reason == ("weight 'w' is a graph input with a default initializer (callers may "
                                       "override it); remove it from the graph inputs to factorize it")
    model.ir_version = 3  # IR 3 required initializers among the inputs: a plain constant
    out, report = optimize(model, FULL)
    assert report.layers[0].status == "factorized"
    assert sorted(i.name for i in out.graph.input) == ["w/lowrank_a", "w/lowrank_b", "x"]
    onnx.checker.check_model(out, full_check=True)
