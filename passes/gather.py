"""Factorize embedding lookups: ``Gather`` of rows of a constant 2-D table.

Half of a small transformer's parameters sit in its token embedding (MiniLM-L6: 11.7M of
22.7M), which no matrix-product rule touches. A lookup ``Y = E[indices]`` of a table
``E (V x d)`` with ``E ~= A (V x r) @ B (r x d)`` is ``Y = A[indices] @ B``: the node becomes
``Gather(A, indices) -> MatMul(., B)``, exact at full rank, ``r (V + d)`` parameters instead of
``V d``.

Cases handled
-------------
* ``axis=0`` (the default) or ``axis=-2``: row lookups; int32 or int64 indices, negative indices
  (Gather counts them from the end, on ``A`` as on ``E``), scalar or N-D indices: the output
  keeps the shape ``indices.shape + (d,)``.
* The table given by an initializer, a ``Constant`` node, or behind Identity/Transpose/Cast.
* Several Gathers of one table share its factors (same share key), as nodes sharing a weight do.
* With ``--calibration``: each row's error is weighted by how often the calibration inputs read
  it (rows never read are projected on the subspace of the frequent ones).

Left alone, with a reason: other axes (column lookups), a table that is not constant or not
2-D, integer (quantized) tables, a table **tied** to a matrix product (an LM head reading the
same initializer, transposed or not): both uses are left dense, since factorizing one keeps the
dense table for the other and the model grows.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnx_lowrank.config import LowRankConfig

from .graph import FLOAT_TYPES, Candidate, ConstantWeight, GraphContext, Rewrite, attr, tied_reason
from .matmul import check_weight
from .skip import CONSTANT_FOLDABLE, Skip, missing_operand

__all__ = ["GatherCandidate", "match_gather"]


class GatherCandidate(Candidate):
    """``Gather(E, indices, axis=0)`` with the matrix view ``E (V x d)``.

    With calibration data the table is factorized for the error of the rows actually looked
    up: a lookup's input is a one-hot row, so its Gram matrix is the diagonal of how often each
    row was read (``diagonal_statistic``), and whitening by it weights each row's error by its
    frequency (see :func:`onnx_lowrank.core.whitening.make_whitener`).
    """

    #: The calibration statistic is the Gram matrix's diagonal: row counts (``row_counts``).
    diagonal_statistic = True

    def __init__(self, node: onnx.NodeProto, label: str, weight: ConstantWeight) -> None:
        matrix = weight.array if weight.lazy else weight.value
        super().__init__(node, label, weight, matrix, shape=weight.shape)

    @property
    def activation(self) -> str:
        return self.node.input[1]

    def row_counts(self, indices: np.ndarray) -> np.ndarray:
        """How often each of the V rows is read by ``indices`` (negative ones count from the end)."""
        rows = self.shape[0]
        flat = np.asarray(indices).astype(np.int64, copy=False).ravel()
        flat = np.where(flat < 0, flat + rows, flat)
        flat = flat[(flat >= 0) & (flat < rows)]  # out of range fails in onnxruntime anyway
        return np.bincount(flat, minlength=rows).astype(np.float64)

    def rewrite(self, ctx: GraphContext, factors, names: dict[str, str]) -> Rewrite:
        inits = self.factor_initializers(ctx, {"a": factors.a, "b": factors.b}, names)
        hidden = ctx.unique(f"{self.label}/lowrank_hidden")
        # Gather of the rows of A first, then the small MatMul: the product A @ B of two
        # constants is never formed (onnxruntime would fold it back into the table).
        nodes = [
            helper.make_node("Gather", [names["a"], self.node.input[1]], [hidden], axis=0,
                             name=ctx.unique(f"{self.label}/lowrank_a")),
            helper.make_node("MatMul", [hidden, names["b"]], list(self.node.output),
                             name=ctx.unique(f"{self.label}/lowrank_b")),
        ]
        return Rewrite(nodes, inits)

    def macs_after(self, rank: int, macs_before: int) -> int:
        return macs_before  # a lookup's MACs are unknown here (they depend on the indices)


def match_gather(node: onnx.NodeProto, label: str, ctx: GraphContext, config: LowRankConfig) -> Candidate | Skip:
    """A candidate for a Gather node of a constant table, or the :class:`Skip` saying why not."""
    if len(node.input) != 2 or not node.input[0] or not node.input[1]:
        return missing_operand("Gather", "a table and indices")
    table = ctx.constant(node.input[0])
    if table is None:
        return Skip(ctx.why_not_constant(node.input[0]))
    if ctx.constant(node.input[1]) is not None:
        return CONSTANT_FOLDABLE
    axis = int(attr(node, "axis", 0))
    if len(table.shape) == 2 and axis == -2:
        axis = 0
    if table.elem_type not in FLOAT_TYPES:
        dtype = onnx.TensorProto.DataType.Name(table.elem_type).lower()
        kind = " (quantized)" if "int" in dtype else ""
        return Skip(f"table {table.name!r} has dtype {dtype}{kind}, not a float type: left alone")
    reason = check_weight(table)
    if reason:
        return Skip(reason.replace("weight", "table", 1))
    if axis != 0:
        return Skip(f"Gather on axis {axis}: only row lookups (axis 0) of a table are factorized")
    tie = tied_reason(ctx, table, node)
    if tie:
        return Skip(tie)
    return GatherCandidate(node, label, table)
