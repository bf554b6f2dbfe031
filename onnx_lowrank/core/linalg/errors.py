"""Error measures of a factorization and the Eckart-Young bounds it is compared with.

``||W - A B||`` in the Frobenius and spectral norms (float64, with bounded temporary memory),
and, from singular values alone, the optimal error of a rank and the rank that keeps an energy.

References
----------
C. Eckart, G. Young, "The approximation of one matrix by another of lower rank",
Psychometrika 1, 1936.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from onnx_lowrank.core.linalg._checks import (
    _as_matrix,
    _check_factors,
    _check_nonneg_int,
    _check_spectrum,
    _check_total_energy,
)

__all__ = [
    "energy_rank",
    "optimal_frobenius_error",
    "relative_frobenius_error",
    "relative_spectral_error",
    "squared_frobenius_norm",
    "squared_residual_norm",
]

# Row-block size (elements) for the float64 residual in the error measures: bounds its
# temporary memory to ~2 MiB (~6 MiB for the widest transformer weights, whose blocks keep at
# least _MIN_BLOCK_ROWS rows so that the GEMMs stay efficient) however large W is. The Gram
# matrices of the exact spectra use blocks of at least n rows (see squared_singular_values).
_RESIDUAL_BLOCK_ELEMENTS = 1 << 18
_MIN_BLOCK_ROWS = 64

# energy_rank: cumulative energies are compared with a relative slack of this size so that
# hand-made spectra give the answer a human expects (0.5 + 0.3 < 0.8 in binary floating point).
_ENERGY_RTOL = 1e-9


def _block_rows(n: int) -> int:
    """Rows per block of a float64 temporary with ``n`` columns (see _RESIDUAL_BLOCK_ELEMENTS)."""
    return max(_MIN_BLOCK_ROWS, _RESIDUAL_BLOCK_ELEMENTS // max(n, 1))


def _residual_row_blocks(W: np.ndarray, A: np.ndarray, B: np.ndarray) -> Iterator[np.ndarray]:
    """Yield float64 blocks of A @ B - W, a few rows at a time (bounded temporary memory).

    The sign is the residual's opposite: the block is A_i @ B minus W_i in place, one float64
    temporary per block; every caller uses the residual's norm only.
    """
    m, n = W.shape
    rows = _block_rows(n)
    B64 = B.astype(np.float64)
    for i in range(0, m, rows):
        E = A[i : i + rows].astype(np.float64) @ B64
        E -= W[i : i + rows]
        yield E



def squared_frobenius_norm(W: Any) -> float:
    """``||W||_F^2`` accumulated in float64, without a float64 copy of W.

    Parameters
    ----------
    W : array_like
        Real floating-point array of any shape.

    Returns
    -------
    float
        The sum of the squares of W's entries.

    Notes
    -----
    ``np.sum(np.square(W, dtype=np.float64))`` would hold a float64 copy of W (10 MiB for a
    1280 x 1000 float32 classifier); einsum casts through a small buffer instead.
    """
    arr = np.asarray(W)
    axes = "abcdefghijklmnopqrstuvwxyz"[: arr.ndim]
    return float(np.einsum(f"{axes},{axes}->", arr, arr, dtype=np.float64))


def squared_residual_norm(W: Any, A: Any, B: Any) -> float:
    """``||W - A B||_F^2`` in float64, the residual formed ~2 MiB of rows at a time.

    Parameters
    ----------
    W : array_like, shape (m, n)
    A : array_like, shape (m, r)
    B : array_like, shape (r, n)

    Returns
    -------
    float
    """
    arr = _as_matrix(W)
    A, B = _check_factors(arr, A, B)
    return float(sum(np.einsum("ij,ij->", E, E) for E in _residual_row_blocks(arr, A, B)))


def relative_frobenius_error(W: Any, A: Any, B: Any) -> float:
    """Relative Frobenius error ``||W - A B||_F / ||W||_F``, computed in float64.

    Parameters
    ----------
    W : array_like, shape (m, n)
    A : array_like, shape (m, r)
    B : array_like, shape (r, n)

    Returns
    -------
    float
        The relative error; 0.0 when W and A @ B are both zero, inf when only W is zero.

    Notes
    -----
    The residual is formed a block of rows at a time, so the extra memory stays ~2 MiB
    for any size of W.
    """
    arr = _as_matrix(W)
    num = squared_residual_norm(arr, A, B)
    den = squared_frobenius_norm(arr)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))


def relative_spectral_error(W: Any, A: Any, B: Any) -> float:
    """Relative spectral error ``||W - A B||_2 / ||W||_2`` (largest singular values), float64.

    Parameters
    ----------
    W : array_like, shape (m, n)
    A : array_like, shape (m, r)
    B : array_like, shape (r, n)

    Returns
    -------
    float
        The relative error; 0.0 when W and A @ B are both zero, inf when only W is zero.

    Notes
    -----
    Exact (LAPACK SVD without vectors of the float64 residual), so it costs about as much as
    an exact SVD of W; meant for tests, reports on small layers and benchmarks.
    """
    arr = _as_matrix(W)
    A, B = _check_factors(arr, A, B)
    E = np.concatenate(list(_residual_row_blocks(arr, A, B)), axis=0)
    num = float(np.linalg.norm(E, 2))
    den = float(np.linalg.norm(arr.astype(np.float64), 2))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def optimal_frobenius_error(
    singular_values: Any, rank: int, *, total_energy: float | None = None
) -> float:
    """Eckart-Young optimum of the relative Frobenius error of a rank-``rank`` approximation.

    ``sqrt(sum_{i > rank} s_i^2 / total)`` with ``total = sum_i s_i^2``.

    Parameters
    ----------
    singular_values : array_like, shape (k,)
        Singular values of W (any order; they are sorted descending). All of them, or only
        the leading ones when ``total_energy`` is given.
    rank : int
        Rank r >= 0 of the approximation; r >= k gives the tail of the given values
        (0.0 when all values are given).
    total_energy : float, optional
        ``||W||_F^2``. Lets the caller pass only the leading singular values (e.g. the
        randomized estimates): the tail energy is then ``total_energy - sum_{i <= r} s_i^2``.

    Returns
    -------
    float
        The optimal relative error in [0, 1]; 0.0 for a zero matrix.

    References
    ----------
    C. Eckart, G. Young, Psychometrika 1, 1936.
    """
    s = _check_spectrum(singular_values)
    rank = _check_nonneg_int(rank, "rank")
    total = _check_total_energy(total_energy, s)
    if total == 0.0:
        return 0.0
    if total_energy is None:
        # Summing the tail directly is exact to rounding; total - head would cancel when the
        # tail is tiny.
        tail = float(np.sum(s[rank:] ** 2))
    else:
        tail = max(total - float(np.sum(s[:rank] ** 2)), 0.0)
    return float(min(np.sqrt(tail / total), 1.0))


def energy_rank(singular_values: Any, energy: float, *, total_energy: float | None = None) -> int:
    """Smallest rank r whose leading singular values keep ``energy`` of the squared total.

    Parameters
    ----------
    singular_values : array_like, shape (k,)
        Singular values of W (any order; sorted descending here).
    energy : float
        Fraction in (0, 1] of ``sum s_i^2`` (or of ``total_energy``) to keep.
    total_energy : float, optional
        ``||W||_F^2``, when only the leading singular values are given.

    Returns
    -------
    int
        The smallest r with ``sum_{i <= r} s_i^2 >= energy * total`` (compared with a
        relative slack of 1e-9 so that rounding does not push a hand-made exact answer up
        by one). At least 1 for a nonzero matrix; **0 for a zero matrix** (there is nothing
        to keep: a rank policy should leave such a layer alone or drop it).

    Raises
    ------
    ValueError
        If energy is outside (0, 1], or if the given leading values do not reach the
        requested energy of ``total_energy`` (more values are needed to answer).
    """
    s = _check_spectrum(singular_values)
    energy = float(energy)
    if not (0.0 < energy <= 1.0):
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    total = _check_total_energy(total_energy, s)
    if total == 0.0:
        return 0
    cumulative = np.cumsum(s * s)
    target = energy * total * (1.0 - _ENERGY_RTOL)
    r = int(np.searchsorted(cumulative, target, side="left")) + 1
    if r > s.size:
        # Only possible with total_energy: the given values hold less than the target.
        # A shortfall within float32 rounding of ||W||_F^2 counts as reached.
        if cumulative[-1] >= energy * total * (1.0 - 1e-6):
            return int(s.size)
        raise ValueError(
            f"the {s.size} given singular values hold {cumulative[-1] / total:.4g} of the energy, "
            f"less than the requested {energy}; pass more singular values"
        )
    return max(r, 1)
