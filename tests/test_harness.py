"""Tests of the onnxruntime measurements (onnx_lowrank.measure): inputs, metrics (known answers),
latency logic, providers, size, mobile checks."""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import DATA
from onnx_lowrank.measure.accuracy import (
    compare_models,
    compare_outputs,
    cosine_similarity,
    max_abs_error,
    max_error,
    mean_kl,
    output_metrics,
    rel_l2_error,
    task_accuracy,
    top1_agreement,
)
from onnx_lowrank.measure.errors import HarnessError, InputError, MissingFileError
from onnx_lowrank.measure.inputs import load_inputs, load_labels, make_inputs, parse_int_range, parse_shapes
from onnx_lowrank.measure.mobile import mobile_usability, new_operators, ort_format_check
from onnx_lowrank.measure.sessions import OPT_LEVELS, accuracy_threads, create_session, provider_assignment, run_samples
from onnx_lowrank.measure.size import model_size_bytes, model_stats
from onnx_lowrank.measure.timing import interleaved_timings, summarize_timings

# --------------------------------------------------------------------------------------------
# tiny models


def _save(nodes, inputs, outputs, inits, path, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _mlp_weights(seed=0):
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 32)) / 4).astype(np.float32)
    w2 = (rng.standard_normal((32, 5)) / 4).astype(np.float32)
    return w1, w2


def mlp(path, rank=None, seed=0):
    """x[N,16] -> MatMul(16x32) -> Relu -> Gemm(32x5) -> logits[N,5]; rank factorizes the MatMul."""
    w1, w2 = _mlp_weights(seed)
    inits = [numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(np.full(5, 0.1, np.float32), "b2")]
    if rank is None:
        inits.append(numpy_helper.from_array(w1, "W1"))
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"])]
    else:
        u, s, vt = np.linalg.svd(w1, full_matrices=False)
        inits += [
            numpy_helper.from_array((u[:, :rank] * s[:rank]).astype(np.float32), "A"),
            numpy_helper.from_array(vt[:rank].astype(np.float32), "B"),
        ]
        nodes = [helper.make_node("MatMul", ["x", "A"], ["t"]), helper.make_node("MatMul", ["t", "B"], ["h"])]
    nodes += [helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Gemm", ["r", "W2", "b2"], ["logits"])]
    return _save(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        inits,
        path,
    )


def token_model(path):
    """ids[batch, seq] int64 + attention_mask -> Gather(embedding 50x8) -> MatMul(8x4)."""
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((50, 8)).astype(np.float32)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "ax"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["em"]),
        helper.make_node("MatMul", ["em", "W"], ["y"]),
    ]
    return _save(
        nodes,
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        [
            numpy_helper.from_array(emb, "E"),
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(np.array([-1], np.int64), "ax"),
        ],
        path,
    )


def conv_model(path, extra_op=None):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    if extra_op:
        nodes[-1] = helper.make_node("Relu", ["c"], ["r"])
        nodes.append(helper.make_node(extra_op, ["r"], ["y"]))
    return _save(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(w, "W")],
        path,
    )


# --------------------------------------------------------------------------------------------
# metrics: known answers


def test_max_abs_error():
    assert max_abs_error(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.5, 2.0])) == 1.0


def test_rel_l2_error():
    assert rel_l2_error(np.array([3.0, 4.0]), np.array([3.0, 5.0])) == pytest.approx(0.2)  # 1 / 5
    assert rel_l2_error(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_l2_error(np.zeros(3), np.ones(3)) is None  # undefined, not inf


def test_cosine_similarity():
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(0.0)
    assert cosine_similarity(np.array([1.0, 1.0]), np.array([2.0, 2.0])) == pytest.approx(1.0)
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([-3.0, 0.0])) == pytest.approx(-1.0)
    ref = np.array([[1.0, 0.0], [1.0, 1.0]])
    tst = np.array([[0.0, 1.0], [1.0, 1.0]])
    assert cosine_similarity(ref, tst, per_sample=True) == pytest.approx(0.5)  # mean(0, 1)
    assert cosine_similarity(np.zeros(2), np.zeros(2)) == 1.0
    assert cosine_similarity(np.zeros(2), np.ones(2)) is None


def test_top1_agreement():
    ref = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    tst = np.array([[0.2, 0.8], [0.1, 0.9], [0.4, 0.6], [0.9, 0.1]])
    assert top1_agreement(ref, tst) == 0.75


def test_mean_kl_logits_and_probabilities():
    # p = softmax([0, 0]) = (1/2, 1/2); q = softmax([ln 3, 0]) = (3/4, 1/4)
    # KL(p || q) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    expected = 0.5 * math.log(4 / 3)
    assert mean_kl(np.array([[0.0, 0.0]]), np.array([[math.log(3), 0.0]])) == pytest.approx(expected)
    # rows averaged: a second identical row pair adds 0
    two = mean_kl(np.array([[0.0, 0.0], [1.0, 2.0]]), np.array([[math.log(3), 0.0], [1.0, 2.0]]))
    assert two == pytest.approx(expected / 2)
    # already-softmaxed outputs are used as probabilities, not softmaxed again
    assert mean_kl(np.array([[0.5, 0.5]]), np.array([[0.75, 0.25]])) == pytest.approx(expected)
    assert mean_kl(np.array([[5.0, -1.0]]), np.array([[5.0, -1.0]])) == pytest.approx(0.0, abs=1e-12)


def test_task_accuracy():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.2, 0.7]])
    assert task_accuracy(logits, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    with pytest.raises(InputError, match="2 entries but the model made 3"):
        task_accuracy(logits, np.array([1, 0]))


def test_output_metrics_logits_like_and_near_zero():
    ref = [np.array([[2.0, 0.0]]), np.array([[0.0, 2.0]])]
    tst = [np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])]
    m = output_metrics(ref, tst)
    assert m["max_abs"] == 1.0
    assert m["mean_abs"] == 0.25
    assert m["rel_l2"] == pytest.approx(1 / math.sqrt(8))
    assert m["cosine"] == pytest.approx(1.0)
    assert m["top1_agreement"] == 1.0
    assert m["kl"] > 0
    assert "warnings" not in m
    # a near-zero reference: relative error is huge but meaningless -> absolute errors + a warning
    ref0 = [np.full((1, 3), 1e-5, np.float32)]
    tst0 = [np.full((1, 3), 3e-5, np.float32)]
    m0 = output_metrics(ref0, tst0, name="probmap")
    assert m0["rel_l2"] == pytest.approx(2.0, rel=1e-4)
    assert m0["max_abs"] == pytest.approx(2e-5, rel=1e-4)
    assert any("near zero" in w and "probmap" in w for w in m0["warnings"])
    # an embedding-like 1-D output is not logits-like; an integer output gets equal_fraction
    assert "top1_agreement" not in output_metrics([np.ones(4)], [np.ones(4)])
    mi = output_metrics([np.array([1, 2, 3, 4])], [np.array([1, 2, 0, 4])])
    assert mi["equal_fraction"] == 0.75
    assert "skipped" in output_metrics([np.ones((1, 2))], [np.ones((1, 3))])


def test_compare_outputs_labels_and_max_error():
    ref = {"logits": [np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]])]}
    tst = {"logits": [np.array([[0.0, 1.0]]), np.array([[0.0, 1.0]])]}
    acc = compare_outputs(ref, tst, labels=np.array([1, 0]))
    assert acc["logits"]["task_accuracy_original"] == 1.0
    assert acc["logits"]["task_accuracy_compressed"] == 0.5
    assert acc["logits"]["top1_agreement"] == 0.5
    assert max_error(acc) == pytest.approx(acc["logits"]["rel_l2"])
    with pytest.raises(InputError, match="no output looks like class scores"):
        compare_outputs({"e": [np.ones(3)]}, {"e": [np.ones(3)]}, labels=np.array([0]))


# --------------------------------------------------------------------------------------------
# inputs


def test_parse_shapes_and_int_range():
    assert parse_shapes(["input_ids=1x128", "batch=4", "x=2,3"]) == {
        "input_ids": (1, 128),
        "batch": (4,),
        "x": (2, 3),
    }
    for bad in ("input_ids", "x=1xa", "=3", "x=1x"):
        with pytest.raises(InputError, match="bad --shape"):
            parse_shapes([bad])
    assert parse_int_range("0:30522") == (0, 30522)
    with pytest.raises(InputError, match="bad --int-range"):
        parse_int_range("5:5")


def test_make_inputs_shapes_dtypes_and_seed(tmp_path, caplog):
    path = token_model(tmp_path / "tok.onnx")
    free = make_inputs(path)  # free dimensions are 1, with a note naming them and the --shape to set
    assert all(a.shape == (1, 1, 1) for a in free.values())
    msg = caplog.text
    assert "input_ids[0] (batch)" in msg and "input_ids[1] (seq)" in msg and "set to 1" in msg and "--shape" in msg
    shared = make_inputs(path, shapes={"input_ids": (1, 6)})  # the mask shares the named dims batch, seq
    assert shared["attention_mask"].shape == (1, 1, 6)
    inp = make_inputs(path, shapes={"batch": 1, "seq": 6}, int_range=(3, 7), samples=4, seed=5)
    assert inp["input_ids"].shape == (4, 1, 6) and inp["input_ids"].dtype == np.int64
    assert inp["input_ids"].min() >= 3 and inp["input_ids"].max() < 7
    assert np.all(inp["attention_mask"] == 1)  # masks attend everywhere
    again = make_inputs(path, shapes={"batch": 1, "seq": 6}, int_range=(3, 7), samples=4, seed=5)
    np.testing.assert_array_equal(inp["input_ids"], again["input_ids"])
    with pytest.raises(InputError, match="no input or symbolic dimension of that name"):
        make_inputs(path, shapes={"sequence": 6})
    with pytest.raises(InputError, match="has rank 1 but input 'input_ids' has rank 2"):
        make_inputs(path, shapes={"input_ids": (6,)})


def test_make_inputs_floats(tmp_path):
    inp = make_inputs(mlp(tmp_path / "m.onnx"), shapes={"N": 2}, samples=3)
    assert inp["x"].shape == (3, 2, 16) and inp["x"].dtype == np.float32
    assert abs(float(inp["x"].mean())) < 0.5 and 0.5 < float(inp["x"].std()) < 1.5  # N(0, 1)


def test_load_inputs_layouts_and_errors(tmp_path):
    path = mlp(tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((6, 16))  # rank of the input: batch axis = samples
    np.savez(tmp_path / "a.npz", x=x, labels=np.arange(6))
    got = load_inputs(tmp_path / "a.npz", path)
    assert got["x"].shape == (6, 1, 16) and got["x"].dtype == np.float32
    np.savez(tmp_path / "b.npz", x=x.reshape(3, 2, 16))  # rank + 1: fed as is
    assert load_inputs(tmp_path / "b.npz", path)["x"].shape == (3, 2, 16)

    np.savez(tmp_path / "c.npz", X=x)
    with pytest.raises(InputError, match=r"no array for model input\(s\) 'x'.*unmatched keys in the file: X"):
        load_inputs(tmp_path / "c.npz", path)
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 12), np.float32))
    with pytest.raises(InputError, match=r"sample shape \(1, 12\).*\[N, 16\]"):
        load_inputs(tmp_path / "d.npz", path)
    np.savez(tmp_path / "e.npz", x=np.zeros((6,), np.float32))
    with pytest.raises(InputError, match="has shape"):
        load_inputs(tmp_path / "e.npz", path)
    with pytest.raises(MissingFileError, match="not found"):  # an input failure, not a usage error
        load_inputs(tmp_path / "missing.npz", path)

    tok = token_model(tmp_path / "tok.onnx")
    np.savez(tmp_path / "f.npz", input_ids=np.zeros((2, 1, 4)), attention_mask=np.ones((2, 1, 4), np.int64))
    with pytest.raises(InputError, match="is float64 but the model expects int64"):
        load_inputs(tmp_path / "f.npz", tok)
    np.savez(tmp_path / "g.npz", input_ids=np.zeros((2, 1, 4), np.int32), attention_mask=np.ones((3, 1, 4), np.int64))
    with pytest.raises(InputError, match="different sample counts"):
        load_inputs(tmp_path / "g.npz", tok)


def test_load_labels(tmp_path):
    np.save(tmp_path / "l.npy", np.array([[1], [2]], np.int32))
    np.testing.assert_array_equal(load_labels(tmp_path / "l.npy"), [1, 2])
    np.savez(tmp_path / "l.npz", labels=np.array([3.0, 4.0]))
    np.testing.assert_array_equal(load_labels(tmp_path / "l.npz"), [3, 4])
    np.save(tmp_path / "bad.npy", np.array([0.5]))
    with pytest.raises(InputError, match="integer class indices"):
        load_labels(tmp_path / "bad.npy")


# --------------------------------------------------------------------------------------------
# models end to end


def test_compare_models_identity_and_factorized(tmp_path):
    orig = mlp(tmp_path / "o.onnx")
    inputs = make_inputs(orig, shapes={"N": 1}, samples=8)
    same = compare_models(orig, orig, inputs)["logits"]
    assert same["max_abs"] == 0.0 and same["rel_l2"] == 0.0
    assert same["cosine"] == pytest.approx(1.0) and same["top1_agreement"] == 1.0
    assert same["kl"] == pytest.approx(0.0, abs=1e-12)

    full_rank = compare_models(orig, mlp(tmp_path / "f.onnx", rank=16), inputs)["logits"]
    assert full_rank["rel_l2"] < 1e-5  # rank 16 of a 16x32 matrix is exact
    low = compare_models(orig, mlp(tmp_path / "l.onnx", rank=2), inputs)["logits"]
    assert low["rel_l2"] > full_rank["rel_l2"] and low["samples"] == 8
    # ModelProto in memory works too, and raw rank-R arrays are batch-of-one samples
    acc = compare_models(onnx.load(str(orig)), orig, {"x": inputs["x"][:, 0]})
    assert acc["logits"]["max_abs"] == 0.0


def test_provider_fallback_is_detected(tmp_path):
    path = mlp(tmp_path / "m.onnx")
    s = create_session(path, providers=["XnnpackExecutionProvider"])
    assert s.get_providers() == ["CPUExecutionProvider"]  # silent fallback
    counts = provider_assignment(s)
    assert set(counts) == {"CPUExecutionProvider"}
    assert "XnnpackExecutionProvider" not in counts


def test_create_session_options_and_errors(tmp_path):
    path = mlp(tmp_path / "m.onnx")
    s = create_session(path, threads=1, opt_level="basic")
    opts = s.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.graph_optimization_level == OPT_LEVELS["basic"]
    with pytest.raises(InputError, match="unknown optimization level"):
        create_session(path, opt_level="max")
    with pytest.raises(MissingFileError, match="not found"):
        create_session(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(HarnessError, match="cannot load"):
        create_session(tmp_path / "junk.onnx")


# --------------------------------------------------------------------------------------------
# latency logic with a fake clock (no timing assertions)


class FakeClock:
    """Advances only when a timed function runs: each function adds its own cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaving_order_and_medians():
    clock = FakeClock()
    calls = []
    costs_a = iter([5, 1, 2, 3, 4] + [0] * 100)  # seconds per timed call
    costs_b = iter([1, 1, 1, 9, 1] + [0] * 100)

    def make(name, costs, warm):
        def fn(k):
            calls.append((name, k))
            if warm[0] > 0:  # warm-up calls cost nothing and are not timed
                warm[0] -= 1
                return
            clock.now += next(costs)

        return fn

    a = make("A", costs_a, [2])
    b = make("B", costs_b, [2])
    times = interleaved_timings([a, b], runs=5, warmup=2, clock=clock)
    assert calls == [("A", 0), ("B", 0), ("A", 1), ("B", 1)] + [
        (n, k) for k in range(5) for n in ("A", "B")
    ]
    assert times == [[5, 1, 2, 3, 4], [1, 1, 1, 9, 1]]
    sa, sb = summarize_timings(times[0]), summarize_timings(times[1])
    assert sa["median_ms"] == 3000.0 and sb["median_ms"] == 1000.0
    assert sa["p90_ms"] == pytest.approx(4600.0)  # numpy linear: index 0.9 * 4 = 3.6 -> 4 + 0.6 * (5 - 4) s
    assert sb["p90_ms"] == pytest.approx(5800.0)  # 1 + 0.6 * (9 - 1) s
    assert sa["runs"] == 5


def test_time_budget_and_min_runs():
    clock = FakeClock()

    def tick(k):
        clock.now += 1.0

    times = interleaved_timings([tick, tick, tick], time_budget=10.0, warmup=0, min_runs=1, clock=clock)
    # each round costs 3 s: rounds start at 0, 3, 6, 9 -> 4 rounds, then 12 >= 10 stops
    assert [len(t) for t in times] == [4, 4, 4]
    times = interleaved_timings([tick], time_budget=0.5, warmup=0, min_runs=5, clock=clock)
    assert len(times[0]) == 5  # never fewer than min_runs
    times = interleaved_timings([tick], runs=3, time_budget=100.0, warmup=0, clock=clock)
    assert len(times[0]) == 3  # whichever ends first
    with pytest.raises(InputError):
        interleaved_timings([tick], runs=0)


# --------------------------------------------------------------------------------------------
# size and mobile


def test_size_with_external_data(tmp_path):
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    size = model_size_bytes(path)
    assert size == path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    assert size > w.nbytes
    stats = model_stats(path, {"x": (1, 64)})
    assert stats["params"] == 64 * 64 and stats["flops"] == 2 * 64 * 64 and stats["flops_complete"]
    # onnxruntime finds the external data next to the model
    inputs = make_inputs(path, samples=2)
    assert compare_models(path, path, inputs)["y"]["max_abs"] == 0.0


def test_ort_format_round_trip_and_required_operators(tmp_path):
    orig = conv_model(tmp_path / "conv.onnx")
    inputs = make_inputs(orig, samples=2)
    res = ort_format_check(orig, inputs, tmp_path / "work")
    assert res["converted"] and res["outputs_match"], res
    assert res["max_abs_diff"] <= 1e-4 and res["samples_compared"] == 2
    ops = {op for v in res["required_operators"].values() for op in v}
    assert ops == {"FusedConv"}  # the config lists the optimized graph's kernels: Conv + Relu fused
    # a model needing an operator type the original does not: reported as new
    other = conv_model(tmp_path / "conv_sig.onnx", extra_op="Softsign")
    res2 = ort_format_check(other, inputs, tmp_path / "work2")
    new = new_operators(res["required_operators"], res2["required_operators"])
    assert len(new) == 1 and new[0].endswith(";Softsign"), new
    assert new_operators(res["required_operators"], res["required_operators"]) == []


def test_mobile_usability_reports_partitions(tmp_path):
    u = mobile_usability(conv_model(tmp_path / "conv.onnx"))
    assert set(u) == {"nnapi", "coreml"}
    nn = u["nnapi"]
    assert nn["nodes"] == 2 and nn["supported_nodes"] == 2 and nn["partitions"] == 1
    assert nn["verdict"] == "YES"
    assert u["coreml"]["verdict"] in {"YES", "MAYBE", "NO"}
    assert {"mlprogram", "neuralnetwork"} <= set(u["coreml"])
    # dynamic shapes: the fixed-shape verdict is reported next to the as-is one
    d = mobile_usability(mlp(tmp_path / "m.onnx"))["nnapi"]
    assert d["verdict"] == "NO" and d["verdict_with_fixed_shapes"] == "YES"


def test_accuracy_sessions_give_the_same_bits_for_any_thread_count():
    # Calibration and the allocation's probes run onnxruntime with accuracy_threads(): that is
    # only sound while the outputs do not depend on the thread count.
    assert accuracy_threads() == min(2, os.cpu_count() or 1)
    pixels = np.load(DATA / "digits_heldout.npz")["pixels"][:512].reshape(16, 32, 64)  # batches of 32 rows
    outputs = [run_samples(create_session(DATA / "digits_mlp.onnx", threads=t), {"pixels": pixels}) for t in (1, 2, 3)]
    for other in outputs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(outputs[0]["logits"], other["logits"]))
