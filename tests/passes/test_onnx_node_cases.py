"""onnx's own operator test cases for Gemm and MatMul at forced full rank.

``onnx.backend.test.case.node`` generates the cases of onnx's conformance suite (model, inputs,
expected outputs). Their weights are graph inputs; each case is turned into one model per
operand that can hold a constant weight (that operand becomes an initializer), factorized with
``rank=100000, force=True``, and must reproduce onnx's expected output.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builders import run
from onnx_lowrank import LowRankConfig, optimize


def _cases(op_type: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case import node

        return node.collect_testcases(op_type)


CASES = [(c, i) for op in ("Gemm", "MatMul") for c in _cases(op) for i in (0, 1)
         if len(c.data_sets[0][0]) > i]


def _with_constant(case, index):
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    inputs, expected = case.data_sets[0]
    name = model.graph.input[index].name
    weight = inputs[index]
    del model.graph.input[index]
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(weight), name))
    feeds = {i.name: x for i, x in zip(case.model.graph.input, inputs) if i.name != name}
    return model, feeds, expected


@pytest.mark.parametrize("case,index", CASES, ids=[f"{c.name}-input{i}" for c, i in CASES])
def test_onnx_node_case_full_rank(case, index):
    model, feeds, expected = _with_constant(case, index)
    out, report = optimize(model, LowRankConfig(rank=100000, force=True))
    row = report.layers[0]
    weight = model.graph.initializer[-1]
    if len(weight.dims) != 2:  # batched or vector operands: left alone, with the reason
        assert row.status == "skipped" and "only 2-D weights are factorized" in row.reason
    else:
        assert row.status == "factorized", row.reason
    got = run(out, feeds)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    onnx.checker.check_model(out, full_check=True)
