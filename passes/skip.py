"""Why a node is left alone: the one type every rule returns instead of a candidate.

Every MatMul/Gemm/Conv node that is not factorized gets a row in the report with a reason
(DESIGN.md: skip-with-reason). A rule's ``match_*`` returns either a
:class:`~onnx_lowrank.passes.graph.Candidate` or a :class:`Skip`; the driver and the planner
record ``Skip.reason`` on the node's row. The reasons that several rules share are built here,
so they read the same whichever op family hit them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Skip", "CONSTANT_FOLDABLE", "missing_operand"]


@dataclass(frozen=True)
class Skip:
    """A node left dense, and the one-line reason the report gives for it."""

    reason: str

    def __str__(self) -> str:
        return self.reason


#: Both operands are constants: constant folding (onnxsim, onnxruntime) computes the product
#: once; factorizing it would only add a node.
CONSTANT_FOLDABLE = Skip("both inputs are constants (constant-foldable): left alone")


def missing_operand(op_type: str, what: str = "two inputs") -> Skip:
    """A node without the operands its op needs (a malformed or unusual export)."""
    return Skip(f"{op_type} without {what}")
