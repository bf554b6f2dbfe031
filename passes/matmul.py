"""Factorize MatMul nodes with a constant 2-D weight.

Cases handled
-------------
* ``Y = X @ W`` with W (m x n) constant on the right and X of any rank (broadcast batch
  dimensions, 1-D X too): becomes ``(X @ A) @ B``.
* ``Y = W @ X`` with W constant on the left: becomes ``A @ (B @ X)``.
* W given by an initializer, a ``Constant`` node, or behind Identity/Transpose/Cast of one.

Left alone, with a reason: both inputs constant (constant-foldable), weight not constant, not
2-D (batched weights), not a float type. The two new MatMuls always take the activation
first, so no node multiplies two constants (onnxruntime would fold ``A @ B`` back into W).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnx_lowrank.config import LowRankConfig

from .graph import (FLOAT_TYPES, Candidate, ConstantWeight, GraphContext, Rewrite, all_finite, non_finite_reason,
                    tied_reason)
from .skip import CONSTANT_FOLDABLE, Skip, missing_operand

__all__ = ["MatMulCandidate", "match_matmul"]


class MatMulCandidate(Candidate):
    """``X @ W`` (``side="right"``) or ``W @ X`` (``side="left"``) with the matrix view ``W``."""

    def __init__(self, node: onnx.NodeProto, label: str, weight: ConstantWeight, side: str) -> None:
        matrix = weight.array if weight.lazy else weight.value
        super().__init__(node, label, weight, matrix, shape=weight.shape)
        # Right weight: inputs are the rows of W (y = x W). Left weight: y = W x, inputs are
        # the columns of W, i.e. the columns of X.
        self.operand = side
        self.side = "rows" if side == "right" else "cols"

    @property
    def activation(self) -> str:
        return self.node.input[0] if self.operand == "right" else self.node.input[1]

    def features(self, activation: np.ndarray) -> np.ndarray:
        if self.operand == "right" or activation.ndim == 1:
            return activation.reshape(-1, self.input_dim)
        return np.swapaxes(activation, -1, -2).reshape(-1, self.input_dim)

    def rewrite(self, ctx: GraphContext, factors, names: dict[str, str]) -> Rewrite:
        inits = self.factor_initializers(ctx, {"a": factors.a, "b": factors.b}, names)
        x = self.activation
        hidden = ctx.unique(f"{self.label}/lowrank_hidden")
        if self.operand == "right":
            first = (x, names["a"])  # (X @ A) @ B
            second = (hidden, names["b"])
        else:
            first = (names["b"], x)  # A @ (B @ X)
            second = (names["a"], hidden)
        nodes = [
            helper.make_node("MatMul", list(first), [hidden], name=ctx.unique(f"{self.label}/lowrank_a")),
            helper.make_node("MatMul", list(second), list(self.node.output), name=ctx.unique(f"{self.label}/lowrank_b")),
        ]
        return Rewrite(nodes, inits)


def match_matmul(node: onnx.NodeProto, label: str, ctx: GraphContext, config: LowRankConfig) -> Candidate | Skip:
    """A candidate for a MatMul node, or the :class:`Skip` saying why it is left alone."""
    if len(node.input) != 2:
        return missing_operand("MatMul")
    left, right = (ctx.constant(name) for name in node.input)
    if left is not None and right is not None:
        return CONSTANT_FOLDABLE
    if right is not None:
        weight, side = right, "right"
    elif left is not None:
        weight, side = left, "left"
    else:
        return Skip(ctx.why_not_constant(node.input[1]))
    reason = check_weight(weight)
    if reason:
        return Skip(reason)
    tie = tied_reason(ctx, weight, node)
    if tie:
        return Skip(tie)
    return MatMulCandidate(node, label, weight, side)


def check_weight(weight: ConstantWeight, ndim: int = 2) -> str | None:
    """Why a constant cannot be factorized as an ``ndim``-D float weight, or ``None``.

    A weight left on disk is not read here for its NaN/Inf check: reading every weight once in
    planning and again to factorize it took 5.7 of the 17 s of a 2.4 GiB model. It is checked
    when first read (:attr:`Candidate.matrix` raises :class:`NonFiniteWeight`).
    """
    if weight.elem_type not in FLOAT_TYPES:
        dtype = onnx.TensorProto.DataType.Name(weight.elem_type).lower()
        return f"weight {weight.name!r} has dtype {dtype}, not a float type"
    if len(weight.shape) != ndim:
        kind = "a vector" if len(weight.shape) == 1 else f"{len(weight.shape)}-D"
        return f"weight {weight.name!r} is {kind} {list(weight.shape)}, only {ndim}-D weights are factorized"
    if not weight.lazy and not all_finite(weight.value):
        return non_finite_reason(weight)
    return None
