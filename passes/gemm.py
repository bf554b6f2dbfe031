"""Factorize Gemm nodes (``Y = alpha * op(A) @ op(B) + beta * C``) with one constant operand.

Cases handled
-------------
* Constant B (a PyTorch ``Linear`` exports ``transB=1``): the matrix view is ``op(B)`` (K x N),
  factorized as ``F1 (K x r) @ F2 (r x N)``; the node becomes
  ``Gemm(X, F1, transA, alpha) -> Gemm(., F2, C, beta)``.
* Constant A (weight on the left): view ``op(A)`` (M x K) ``= F1 @ F2``; the node becomes
  ``Gemm(F2, X, transB, alpha) -> Gemm(F1, ., C, beta)``.
* Every ``transA``/``transB``/``alpha``/``beta`` combination; ``C`` absent, scalar, vector or
  matrix (it stays on the second node, whose output has the original shape, so broadcasting is
  unchanged). Factors keep the original storage orientation: with ``transB=1`` they are stored
  transposed, as the weight was.

* Opsets below 11, where ``C`` is mandatory on every Gemm: the first node is a ``MatMul``
  (behind a ``Transpose`` of the activation when it is transposed), the second a Gemm that
  carries ``C``, ``alpha``, ``beta`` (and opset 6's ``broadcast``).

Left alone, with a reason: both operands constant, weight not constant / not 2-D / not float.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import helper

from onnx_lowrank.config import LowRankConfig

from .graph import Candidate, ConstantWeight, GraphContext, Rewrite, attr, tied_reason
from .matmul import check_weight
from .skip import CONSTANT_FOLDABLE, Skip, missing_operand

__all__ = ["GemmCandidate", "match_gemm"]


class GemmCandidate(Candidate):
    """A Gemm with constant ``B`` (``side="right"``) or constant ``A`` (``side="left"``)."""

    def __init__(self, node: onnx.NodeProto, label: str, weight: ConstantWeight, side: str, *,
                 legacy: bool = False) -> None:
        #: Opset < 11: C is mandatory, so only the second node can be a Gemm.
        self.legacy = legacy
        self.operand = side
        self.side = "rows" if side == "right" else "cols"
        self.trans_a = int(attr(node, "transA", 0))
        self.trans_b = int(attr(node, "transB", 0))
        self.alpha = float(attr(node, "alpha", 1.0))
        self.beta = float(attr(node, "beta", 1.0))
        transposed = self.trans_b if side == "right" else self.trans_a
        shape = tuple(reversed(weight.shape)) if transposed else weight.shape
        if weight.lazy:
            matrix = functools.partial(weight.array, transpose=bool(transposed))
        else:
            matrix = weight.value.T if transposed else weight.value
        super().__init__(node, label, weight, matrix, view="T" if transposed else "", shape=shape)
        self.transposed = bool(transposed)

    @property
    def activation(self) -> str:
        return self.node.input[0] if self.operand == "right" else self.node.input[1]

    def features(self, activation: np.ndarray) -> np.ndarray:
        x = np.asarray(activation)
        if self.operand == "right":  # rows of op(A)
            return (x.T if self.trans_a else x).reshape(-1, self.input_dim)
        return x if self.trans_b else x.T  # columns of op(B) as rows

    def rewrite(self, ctx: GraphContext, factors, names: dict[str, str]) -> Rewrite:
        if self.legacy:
            return self._rewrite_legacy(ctx, factors, names)
        # Keep the weight's storage orientation: op(stored) must equal the factor.
        a, b = (factors.a.T, factors.b.T) if self.transposed else (factors.a, factors.b)
        inits = self.factor_initializers(ctx, {"a": a, "b": b}, names)
        hidden = ctx.unique(f"{self.label}/lowrank_hidden")
        c = list(self.node.input[2:3]) if len(self.node.input) > 2 and self.node.input[2] else []
        t = int(self.transposed)
        if self.operand == "right":
            x = self.node.input[0]
            first = _gemm([x, names["a"]], hidden, transA=self.trans_a, transB=t, alpha=self.alpha)
            second = _gemm([hidden, names["b"], *c], self.node.output[0], transB=t, beta=self.beta)
        else:
            x = self.node.input[1]
            first = _gemm([names["b"], x], hidden, transA=t, transB=self.trans_b, alpha=self.alpha)
            second = _gemm([names["a"], hidden, *c], self.node.output[0], transA=t, beta=self.beta)
        first.name = ctx.unique(f"{self.label}/lowrank_a")
        second.name = ctx.unique(f"{self.label}/lowrank_b")
        return Rewrite([first, second], inits)


    def _rewrite_legacy(self, ctx: GraphContext, factors, names: dict[str, str]) -> Rewrite:
        """``MatMul`` then a Gemm with C: opsets before 11 require C on every Gemm.

        ``alpha`` moves to the second node (``alpha (X A) B = (X A) (alpha B)`` in exact
        arithmetic; it scales the output either way). The MatMul's factor is stored as it is
        multiplied (MatMul has no transpose flag); the Gemm's keeps the weight's orientation.
        """
        t = int(self.transposed)
        if self.operand == "right":  # Y = op(X) F1 F2: MatMul(op(X), F1) -> Gemm(., F2, C)
            inits = self.factor_initializers(ctx, {"a": factors.a, "b": factors.b.T if t else factors.b}, names)
            x, flag = self.node.input[0], self.trans_a
        else:  # Y = F1 F2 op(X): MatMul(F2, op(X)) -> Gemm(F1, ., C)
            inits = self.factor_initializers(ctx, {"a": factors.a.T if t else factors.a, "b": factors.b}, names)
            x, flag = self.node.input[1], self.trans_b
        nodes = []
        if flag:  # the activation is transposed by the Gemm: MatMul needs it done first
            xt = ctx.unique(f"{self.label}/lowrank_input_t")
            nodes.append(helper.make_node("Transpose", [x], [xt], perm=[1, 0],
                                          name=ctx.unique(f"{self.label}/lowrank_t")))
            x = xt
        hidden = ctx.unique(f"{self.label}/lowrank_hidden")
        first = [x, names["a"]] if self.operand == "right" else [names["b"], x]
        nodes.append(helper.make_node("MatMul", first, [hidden], name=ctx.unique(f"{self.label}/lowrank_a")))
        if self.operand == "right":
            second = _gemm([hidden, names["b"], self.node.input[2]], self.node.output[0], transB=t,
                           alpha=self.alpha, beta=self.beta)
        else:
            second = _gemm([names["a"], hidden, self.node.input[2]], self.node.output[0], transA=t,
                           alpha=self.alpha, beta=self.beta)
        for a in self.node.attribute:
            if a.name == "broadcast":  # opset 6 and before: C broadcasts only when asked to
                second.attribute.append(a)
        second.name = ctx.unique(f"{self.label}/lowrank_b")
        nodes.append(second)
        return Rewrite(nodes, inits)


def _gemm(inputs: list[str], output: str, **attrs: float) -> onnx.NodeProto:
    # Attributes at their default value are omitted, as exporters do.
    defaults = {"transA": 0, "transB": 0, "alpha": 1.0, "beta": 1.0}
    kept = {k: v for k, v in attrs.items() if v != defaults[k]}
    if "beta" in kept and len(inputs) < 3:
        del kept["beta"]  # beta without C means nothing
    return helper.make_node("Gemm", inputs, [output], **kept)


def match_gemm(node: onnx.NodeProto, label: str, ctx: GraphContext, config: LowRankConfig) -> Candidate | Skip:
    """A candidate for a Gemm node, or the :class:`Skip` saying why it is left alone."""
    opset = next((o.version for o in ctx.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    legacy = opset < 11
    if len(node.input) < (3 if legacy else 2) or (legacy and not node.input[2]):
        return missing_operand("Gemm", "C (required before opset 11)" if legacy else "two inputs")
    left, right = ctx.constant(node.input[0]), ctx.constant(node.input[1])
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
    return GemmCandidate(node, label, weight, side, legacy=legacy)
