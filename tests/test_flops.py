"""Known-answer tests of parameter and MAC counting (onnx_lowrank.flops)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import flops


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    # no onnx.checker: outputs are declared without shapes on purpose (inference fills them)
    return model


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _w(name, *shape, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def test_matmul_with_weight():
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x", [1, 64])], [_vi("y", None)], [_w("W", 64, 128)])
    r = flops.count_flops(m)
    assert r.macs == 64 * 128
    assert r.flops == 2 * 64 * 128
    assert r.params == 64 * 128
    (node,) = r.nodes
    assert (node.op_type, node.weight, node.weight_shape, node.weight_params) == ("MatMul", "W", [64, 128], 8192)
    assert r.complete


def test_batched_matmul_of_two_activations():
    # attention-like Q @ K^T: no constant weight, still counted; batch dims broadcast
    m = _model(
        [helper.make_node("MatMul", ["q", "k"], ["s"])],
        [_vi("q", [2, 3, 4, 5]), _vi("k", [3, 5, 6])],
        [_vi("s", None)],
    )
    r = flops.count_flops(m)
    assert r.macs == 2 * 3 * 4 * 5 * 6
    assert r.nodes[0].weight is None and r.nodes[0].weight_params == 0
    assert r.params == 0


def test_gemm_trans_b_and_bias():
    m = _model(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)],
        [_vi("x", [4, 8])],
        [_vi("y", None)],
        [_w("W", 16, 8), _w("b", 16)],
    )
    r = flops.count_flops(m)
    assert r.macs == 4 * 8 * 16
    assert r.params == 16 * 8 + 16


def test_conv_grouped_and_transpose():
    m = _model(
        [
            helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),  # 3 -> 8 channels, 8x8
            helper.make_node("Conv", ["a", "W2"], ["b"], pads=[1, 1, 1, 1], group=8),  # depthwise
            helper.make_node("Conv", ["b", "W3"], ["c"], strides=[2, 2]),  # 1x1 stride 2 -> 4x4
            helper.make_node("ConvTranspose", ["c", "W4"], ["d"], strides=[2, 2]),  # 4x4 -> 9x9
        ],
        [_vi("x", [1, 3, 8, 8])],
        [_vi("d", None)],
        [_w("W1", 8, 3, 3, 3), _w("W2", 8, 1, 3, 3), _w("W3", 4, 8, 1, 1), _w("W4", 4, 2, 3, 3)],
    )
    r = flops.count_flops(m)
    macs = {n.name: n.macs for n in r.nodes}
    assert macs["Conv_0"] == (8 * 8 * 8) * (3 * 3 * 3)
    assert macs["Conv_1"] == (8 * 8 * 8) * (1 * 3 * 3)
    assert macs["Conv_2"] == (4 * 4 * 4) * 8
    assert macs["ConvTranspose_3"] == (4 * 4 * 4) * (2 * 3 * 3)  # each input element -> C_out/g * k
    assert r.macs == sum(macs.values())
    assert r.params == 8 * 27 + 8 * 9 + 32 + 4 * 2 * 9


def test_symbolic_dims_unresolved_then_resolved():
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x", ["batch", "seq", 32])], [_vi("y", None)], [_w("W", 32, 16)])
    r = flops.count_flops(m)
    assert r.macs == 0 and r.unresolved == ["MatMul_0"] and not r.complete
    assert r.nodes[0].reason
    r = flops.count_flops(m, {"x": (2, 10, 32)})
    assert r.macs == 2 * 10 * 32 * 16 and r.complete


def test_shapes_propagate_through_reshape_constant():
    # a Reshape whose target is a small initializer must keep its value in the skeleton
    m = _model(
        [
            helper.make_node("Reshape", ["x", "shape"], ["x2"]),
            helper.make_node("MatMul", ["x2", "W"], ["y"]),
        ],
        [_vi("x", [1, 4, 8])],
        [_vi("y", None)],
        [numpy_helper.from_array(np.array([4, 8], np.int64), "shape"), _w("W", 8, 5)],
    )
    r = flops.count_flops(m)
    assert r.macs == 4 * 8 * 5


def test_params_count_constant_nodes_and_subgraphs():
    const = helper.make_node("Constant", [], ["W"], value=_w("Wc", 10, 3))
    then_g = helper.make_graph(
        [helper.make_node("Constant", [], ["t"], value_floats=[1.0, 2.0, 3.0])], "then", [], [_vi("t", [3])]
    )
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["e"], value=_w("E", 3))], "else", [], [_vi("e", [3])]
    )
    m = _model(
        [
            const,
            helper.make_node("MatMul", ["x", "W"], ["y"]),
            helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g),
        ],
        [_vi("x", [2, 10]), _vi("cond", [], TensorProto.BOOL)],
        [_vi("y", None), _vi("z", None)],
    )
    assert flops.count_params(m) == 30 + 3 + 3
    r = flops.count_flops(m)
    assert r.macs == 2 * 10 * 3
    assert r.nodes[0].weight == "W" and r.nodes[0].weight_params == 30


def test_external_data_not_loaded(tmp_path):
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x", [3, 256])], [_vi("y", None)], [_w("W", 256, 512)])
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    r = flops.count_flops(path)
    assert r.macs == 3 * 256 * 512
    assert r.params == 256 * 512
    assert flops.count_params(str(path)) == 256 * 512
    skeleton = flops.load_model_skeleton(path)
    assert not skeleton.graph.initializer  # became a typed input, no data read
    assert "W" in {i.name for i in skeleton.graph.input}


def test_factorized_pair_ratio():
    # (x @ A) @ B with A 64x16, B 16x128 versus x @ W: ratio r (m + n) / (m n)
    dense = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x", [8, 64])], [_vi("y", None)], [_w("W", 64, 128)])
    low = _model(
        [helper.make_node("MatMul", ["x", "A"], ["t"]), helper.make_node("MatMul", ["t", "B"], ["y"])],
        [_vi("x", [8, 64])],
        [_vi("y", None)],
        [_w("A", 64, 16), _w("B", 16, 128)],
    )
    ratio = flops.count_flops(low).flops / flops.count_flops(dense).flops
    assert ratio == pytest.approx(16 * (64 + 128) / (64 * 128))


def test_int8_quantized_model_counts_the_same_macs(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from onnx_lowrank.flops import count_flops

    src = Path(__file__).resolve().parents[1] / "onnx_lowrank" / "data" / "digits_mlp.onnx"
    out = tmp_path / "int8.onnx"
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    shapes = {"pixels": [4, 64]}
    before, after = count_flops(str(src), shapes), count_flops(str(out), shapes)
    assert {n.op_type for n in after.nodes} >= {"MatMulInteger"}
    assert after.macs == before.macs == 4 * (64 * 256 + 256 * 256 + 256 * 10)
