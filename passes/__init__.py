"""The low-rank graph pass: find factorizable nodes, choose ranks, factorize, rewrite.

Layout (one concept a module; nothing here imports onnxruntime):

* :mod:`.driver` -- walk the graph, ask each rule, plan, run the jobs, rewrite, report;
* :mod:`.matmul`, :mod:`.gemm`, :mod:`.conv` -- one rule module per op family: a node becomes a
  :class:`~.graph.Candidate` (a matrix view of its constant weight, and how to rebuild the node
  from factors) or a :class:`~.skip.Skip` with the reason;
* :mod:`.graph` -- the read-only index the rules match on (constants, consumers, fresh names);
* :mod:`.planning` -- whitening, ranks, the latency guard; measurements come in as data;
* :mod:`.jobs` -- factorization jobs and their executor (local threads, or a dask cluster's);
* :mod:`.rewrite` -- the one graph edit, on onnx-graphsurgeon.
"""

from .driver import FAMILIES, MATCHERS, apply_lowrank, find_candidates
from .graph import Candidate, GraphContext, Rewrite
from .jobs import FactorJob, JobResult, factorize_all, run_job, run_local
from .planning import PassState
from .skip import Skip

__all__ = [
    "FAMILIES", "MATCHERS", "Candidate", "FactorJob", "GraphContext", "JobResult", "PassState", "Rewrite", "Skip",
    "apply_lowrank", "factorize_all", "find_candidates", "run_job", "run_local",
]
