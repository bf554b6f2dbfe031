"""Low-rank factorization of weight matrices: randomized subspace iteration and exact SVD.

This package is numpy-only on purpose (no ONNX, no scipy): it is the numerical engine that
every pass, rank policy and report uses, and it must be importable and testable on its own.

Every factorization returns two factors ``A`` (m x r) and ``B`` (r x n) with ``W ~= A @ B``;
the square roots of the singular values are split into both factors
(``A = U sqrt(S)``, ``B = sqrt(S) V^T``). Balanced factors keep the intermediate activation
``X @ A`` on the same scale as the output, which matters once the factors are stored in float16.

Public functions
----------------
rsi, rsvd, svd, factorize
    Randomized subspace iteration (HMT 2011, Algorithm 4.4), the same without power
    iterations, the exact truncated SVD, and a dispatcher returning a :class:`Factorization`.
singular_values, squared_singular_values
    Leading singular values (exact up to a size limit, randomized beyond it), or their squares.
relative_frobenius_error, relative_spectral_error, squared_frobenius_norm, squared_residual_norm
    How far ``A @ B`` is from ``W``.
optimal_frobenius_error, energy_rank
    Eckart-Young bounds computed from singular values, so a report can say how close a
    factorization is to the best possible one and which rank keeps a given energy.

Modules
-------
factorization
    :func:`rsi`, :func:`rsvd`, :func:`svd`, :func:`factorize`, :class:`Factorization` and the
    cores behind them.
spectra
    :func:`singular_values`, :func:`squared_singular_values`.
errors
    The error measures and the Eckart-Young bounds.
_orthonormal, _checks
    Internals: the orthonormal bases of the thin sketches (Cholesky-QR tiers, Householder), and
    the argument validation of the public functions.

Import the public names from here; the private helpers (and the tolerances a test may patch)
live in the module that uses them, so patch them there.

References
----------
N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness: probabilistic
algorithms for constructing approximate matrix decompositions", SIAM Review 53(2), 2011.
"""

from __future__ import annotations

from onnx_lowrank.core.linalg.errors import (
    energy_rank,
    optimal_frobenius_error,
    relative_frobenius_error,
    relative_spectral_error,
    squared_frobenius_norm,
    squared_residual_norm,
)
from onnx_lowrank.core.linalg.factorization import Factorization, factorize, rsi, rsvd, svd
from onnx_lowrank.core.linalg.spectra import singular_values, squared_singular_values

__all__ = [
    "Factorization",
    "energy_rank",
    "factorize",
    "optimal_frobenius_error",
    "relative_frobenius_error",
    "relative_spectral_error",
    "rsi",
    "rsvd",
    "singular_values",
    "squared_frobenius_norm",
    "squared_residual_norm",
    "squared_singular_values",
    "svd",
]
