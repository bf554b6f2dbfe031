"""Gather on a constant table (embeddings): exact at full rank, every skip with its reason, ties."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import assert_clean, init, make_model, rel_err, run, vi
from onnx_lowrank import LowRankConfig, optimize
from onnx_lowrank.core.linalg import optimal_frobenius_error

V, D = 60, 12
RNG = np.random.default_rng(0)
TABLE = RNG.standard_normal((V, D)).astype(np.float32)
FULL = LowRankConfig(rank=D, force=True, op_types=("Gather",))


def lookup_model(indices_shape, index_type=TensorProto.INT64, table=TABLE, axis=None, out_shape=None):
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node("Gather", ["E", "ids"], ["y"], name="emb", **attrs)
    out = out_shape if out_shape is not None else [*indices_shape, table.shape[1]]
    elem = helper.np_dtype_to_tensor_dtype(table.dtype)
    return make_model([node], [vi("ids", indices_shape, index_type)], [vi("y", out, elem)], [init("E", table)])


@pytest.mark.parametrize("index_type,indices", [
    (TensorProto.INT64, np.array([[1, 5, 59], [0, 7, 7]], np.int64)),      # N-D, repeated
    (TensorProto.INT32, np.array([3, 0, 59, 2], np.int32)),               # int32
    (TensorProto.INT64, np.array([-1, -60, 4], np.int64)),                # negative
    (TensorProto.INT64, np.array(11, np.int64)),                          # scalar index
    (TensorProto.INT32, np.arange(24, dtype=np.int32).reshape(2, 3, 4)),  # 3-D
], ids=["2d", "int32", "negative", "scalar", "3d"])
def test_full_rank_equals_original(index_type, indices):
    model = lookup_model(list(indices.shape), index_type)
    out, report = optimize(model, FULL)
    row = report.layers[0]
    assert (row.op, row.status, row.rank, row.shape) == ("Gather", "factorized", D, (V, D))
    assert [n.op_type for n in out.graph.node] == ["Gather", "MatMul"]
    assert out.graph.node[0].input[1] == "ids" and out.graph.node[-1].output[0] == "y"
    want, = run(model, {"ids": indices})
    got, = run(out, {"ids": indices})
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-5
    assert_clean(out)


def test_truncated_table_error_is_eckart_young_and_saves_parameters():
    rank = 4
    out, report = optimize(lookup_model(["n"]), LowRankConfig(rank=rank, method="svd", op_types=("Gather",)))
    row = report.layers[0]
    sigma = np.linalg.svd(TABLE.astype(np.float64), compute_uv=False)
    optimum = optimal_frobenius_error(sigma, rank, total_energy=float(np.sum(TABLE.astype(np.float64) ** 2)))
    assert row.rel_error == pytest.approx(optimum, rel=1e-4)
    assert row.params_after == rank * (V + D) < V * D
    assert report.model_params_after == rank * (V + D)
    ids = np.arange(V, dtype=np.int64)
    a, b = (np.asarray(onnx.numpy_helper.to_array(t)) for t in out.graph.initializer)
    np.testing.assert_allclose(run(out, {"ids": ids})[0], (a @ b)[ids], rtol=1e-5, atol=1e-6)


def test_float16_table_stays_half():
    table = TABLE.astype(np.float16)
    out, report = optimize(lookup_model([3], table=table), FULL)
    assert report.layers[0].factorized
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
    ids = np.array([1, 2, 3], np.int64)
    assert rel_err(run(out, {"ids": ids})[0], run(lookup_model([3], table=table), {"ids": ids})[0]) < 2e-3


def _reason(model, config=FULL):
    return optimize(model, config)[1].layers[0].reason


def test_skips_with_reasons():
    assert "only row lookups (axis 0)" in _reason(lookup_model([2], axis=1, out_shape=[V, 2]))
    int8 = lookup_model([3], table=(TABLE * 10).astype(np.int8))
    assert "int8 (quantized)" in _reason(int8)
    # A rank at or above break-even (V D / (V + D) = 10) is refused unless forced.
    assert "break-even" in _reason(lookup_model([3]), LowRankConfig(rank=11, op_types=("Gather",)))
    # A table fed at run time is not a constant.
    node = helper.make_node("Gather", ["E", "ids"], ["y"], name="emb")
    dynamic = make_model([node], [vi("E", [V, D]), vi("ids", [3], TensorProto.INT64)], [vi("y", [3, D])])
    assert optimize(dynamic, FULL)[1].layers == []  # not a table lookup: no row at all


def test_dequantized_table_is_left_alone():
    q = init("Eq", (TABLE * 10).astype(np.int8))
    scale = init("s", np.array(0.1, np.float32))
    nodes = [helper.make_node("DequantizeLinear", ["Eq", "s"], ["E"], name="dq"),
             helper.make_node("Gather", ["E", "ids"], ["y"], name="emb")]
    model = make_model(nodes, [vi("ids", [3], TensorProto.INT64)], [vi("y", [3, D])], [q, scale])
    out, report = optimize(model, FULL)
    assert report.layers == [] and len(out.graph.node) == 2  # computed, not a constant table: untouched


def test_not_selected_by_default_but_counted_in_the_report():
    model = lookup_model([3])
    out, report = optimize(model, LowRankConfig(rank=2))
    row = report.layers[0]
    assert row.reason.startswith("op type Gather not selected")
    assert row.params_before == V * D
    assert report.totals()["unselected_table_params"] == V * D
    assert "embedding tables not selected: 720" in report.format_table()
    assert out.SerializeToString() == model.SerializeToString()


def test_gathers_of_one_table_share_its_factors():
    nodes = [helper.make_node("Gather", ["E", "a"], ["ya"], name="g1"),
             helper.make_node("Gather", ["E", "b"], ["yb"], name="g2")]
    model = make_model(nodes, [vi("a", [2], TensorProto.INT64), vi("b", [3], TensorProto.INT64)],
                       [vi("ya", [2, D]), vi("yb", [3, D])], [init("E", TABLE)])
    out, report = optimize(model, LowRankConfig(rank=4, op_types=("Gather",)))
    assert [r.status for r in report.layers] == ["factorized", "factorized"]
    assert sorted(t.name for t in out.graph.initializer) == ["E/lowrank_a", "E/lowrank_b"]
    assert_clean(out)


@pytest.mark.parametrize("head", ["matmul_transpose", "gemm_transb"])
def test_tied_lm_head_is_left_dense_with_a_reason(head):
    """An LM head reading the embedding table (transposed) ties the two uses: both stay dense."""
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed")]
    if head == "matmul_transpose":
        nodes += [helper.make_node("Transpose", ["E"], ["Et"], name="tie_t", perm=[1, 0]),
                  helper.make_node("MatMul", ["h", "Et"], ["logits"], name="lm_head")]
    else:
        nodes += [helper.make_node("Gemm", ["h", "E"], ["logits"], name="lm_head", transB=1)]
    model = make_model(nodes, [vi("ids", [4], TensorProto.INT64)], [vi("logits", [4, V])], [init("E", TABLE)])
    out, report = optimize(model, LowRankConfig(rank=2, op_types=("Gather", "MatMul", "Gemm")))
    rows = {r.node: r for r in report.layers}
    assert set(rows) == {"embed", "lm_head"}
    for row in rows.values():
        assert row.status == "skipped"
        assert "tied table 'E'" in row.reason
    assert out.SerializeToString() == model.SerializeToString()
    # Only MatMul/Gemm selected: the head alone is still refused (the table would stay for the lookup).
    _, report = optimize(model, LowRankConfig(rank=2))
    assert "tied table 'E'" in {r.node: r for r in report.layers}["lm_head"].reason


def test_calibration_weights_rows_by_how_often_they_are_read():
    """Frequency-weighted factorization: the rows the calibration reads are reconstructed better
    than by the data-free factorization, rows never read still get their projection."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 20, (30, 5)).astype(np.int64)  # rows 0..19 only
    model = lookup_model(["n"])
    config = LowRankConfig(rank=4, method="svd", op_types=("Gather",))
    free, free_report = optimize(model, config)
    calibrated, report = optimize(model, config, calibration={"ids": ids})
    seen, unseen = np.arange(20, dtype=np.int64), np.arange(20, V, dtype=np.int64)

    def error(m, rows):
        return rel_err(run(m, {"ids": rows})[0], TABLE[rows])

    assert free_report.layers[0].whitened_error is None
    assert report.layers[0].whitened_error is not None
    assert error(calibrated, seen) < error(free, seen) - 0.02
    assert error(calibrated, unseen) < 0.9  # a projection, not zeros (which would be 1.0)
    # The whitened error is the frequency-weighted error on the calibration lookups themselves.
    counts = np.bincount(ids.ravel(), minlength=V).astype(np.float64)
    diff = run(calibrated, {"ids": np.arange(V, dtype=np.int64)})[0].astype(np.float64) - TABLE
    weights = counts + 1e-3 * counts.sum() / V  # the default --whiten-eps jitter
    want = np.sqrt((weights[:, None] * diff**2).sum() / (weights[:, None] * TABLE.astype(np.float64) ** 2).sum())
    assert report.layers[0].whitened_error == pytest.approx(want, rel=1e-3)
