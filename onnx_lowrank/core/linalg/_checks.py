"""Validation of the public functions' arguments, and the dtype rules they share.

Only the public functions of :mod:`onnx_lowrank.core.linalg` validate; the private cores trust
their inputs, so a matrix is checked once however many helpers it passes through.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Weights whose largest magnitude lies outside [2^-40, 2^40] are rescaled by a power of two
#: before the randomized methods run: their float32 products (Y = W Omega, the Gram matrices of
#: the thin factors) would overflow or underflow (seen: |w| ~ 1e19 broke eigh, |w| ~ 1e-23
#: gave zero factors, subnormal weights NaN). A power of two is exact, so ordinary weights are
#: untouched and rescaled ones lose nothing.
#: Here because :func:`_finite_magnitude` proves a W safe with it; the rescaling itself is
#: factorization's ``_rsi_core``.
_SAFE_EXPONENT = 40


def _as_matrix(W: Any, name: str = "W", *, check_finite: bool = True) -> np.ndarray:
    """Return W as a 2-D finite floating-point ndarray, or raise ValueError.

    ``check_finite=False`` leaves the finiteness check to the caller (:func:`_finite_magnitude`,
    which proves it as a by-product of the range check of the randomized methods).
    """
    arr = np.asarray(W)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got an array with shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise ValueError(
            f"{name} must be a floating-point array (float16, float32 or float64), got dtype "
            f"{arr.dtype}; convert it first, e.g. {name}.astype(numpy.float32)"
        )
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if not check_finite:
        return arr
    # A finite sum proves every entry finite (NaN and Inf propagate) in one SIMD pass without
    # the boolean temporary of isfinite(W).all(); only a non-finite sum (bad entries, or an
    # overflow of huge finite ones) pays for the entry-wise check. float16 accumulates in
    # float32, where 65504-sized entries cannot overflow a sum of any realistic length.
    with np.errstate(over="ignore", invalid="ignore"):
        total = arr.sum(dtype=np.float32 if arr.dtype.itemsize < 4 else None)
    if not np.isfinite(total):
        _raise_if_not_finite(arr, name)
    return arr


def _raise_if_not_finite(arr: np.ndarray, name: str) -> None:
    """Entry-wise finiteness check with the count of bad entries in the message."""
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ValueError(f"{name} contains non-finite values (NaN or Inf): {bad} of {arr.size} entries")


def _finite_magnitude(arr: np.ndarray, name: str = "W") -> float:
    """Magnitude of W for :func:`_rsi_core`'s range check; ValueError if W has NaN or Inf.

    The randomized methods need the range check anyway, so it doubles as the finiteness check
    (no pass of its own). Fast path, for float32/float64 W in C or Fortran order: one BLAS
    pass s2 = sum(w^2) (0.4 ms at 2048 x 2048, against 0.7 ms for max + min and 0.7 ms for
    the sum of :func:`_as_matrix`). A finite s2 proves every entry finite (NaN and Inf
    propagate); ``sqrt(s2) <= 2^(E-4)`` and ``sqrt(s2 / size) >= 2^-(E-4)`` prove
    2^-E <= max|W| <= 2^E (E = _SAFE_EXPONENT; the factor 2^4 covers any rounding of the
    float32 sum), so W needs no rescaling and 1.0 is returned. Otherwise (huge or tiny
    entries, float16, strided views) the exact max|W| = max(W.max(), -W.min()): max and
    min also propagate NaN and reach any Inf.
    """
    if arr.dtype in (np.float32, np.float64) and (arr.flags.c_contiguous or arr.flags.f_contiguous):
        flat = arr.reshape(-1, order="A")  # a view for C- and Fortran-ordered W
        with np.errstate(over="ignore", invalid="ignore"):
            s2 = float(np.dot(flat, flat))
        bound = 2.0 ** (2 * (_SAFE_EXPONENT - 4))
        if np.isfinite(s2) and arr.size / bound <= s2 <= bound:
            return 1.0
    hi = float(arr.max())
    lo = float(arr.min())
    if not (np.isfinite(hi) and np.isfinite(lo)):
        _raise_if_not_finite(arr, name)
    return max(hi, -lo)


def _check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank < 1:
        raise ValueError(f"rank must be a positive integer (>= 1), got {rank}")
    return int(rank)


def _check_nonneg_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _dtypes(arr: np.ndarray, compute_dtype: Any) -> tuple[np.dtype, np.dtype]:
    """(output dtype, compute dtype) for an input array.

    float16 (and anything of 4 bytes or less) computes and returns float32: numpy has no
    half-precision LAPACK and float16 GEMMs are emulated and slow. Wider floats (float64,
    longdouble) compute and return float64, LAPACK's widest real type.
    """
    out = np.dtype(np.float32) if arr.dtype.itemsize <= 4 else np.dtype(np.float64)
    if compute_dtype is None:
        return out, out
    comp = np.dtype(compute_dtype)
    if comp not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"compute_dtype must be None, numpy.float32 or numpy.float64, got {compute_dtype!r}")
    return out, comp


def _prepare(W: np.ndarray, comp: np.dtype) -> np.ndarray:
    """W in the compute dtype without copying when possible.

    C- or Fortran-ordered W is passed to BLAS as it is (numpy hands transposed layouts to
    gemm as a flag); only arbitrarily strided views are made contiguous, once, instead of
    once per matrix product.
    """
    if W.dtype != comp:
        return W.astype(comp, order="K")
    if not (W.flags.c_contiguous or W.flags.f_contiguous):
        return np.ascontiguousarray(W)
    return W


def _check_spectrum(values: Any, name: str = "singular_values") -> np.ndarray:
    s = np.asarray(values, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains non-finite values (NaN or Inf)")
    if np.any(s < 0):
        raise ValueError(f"{name} must be non-negative")
    # Descending order is what "leading values" means; sorting costs nothing at these sizes and
    # makes the functions correct for callers that pass eigenvalue-ordered (ascending) values.
    return np.sort(s)[::-1]


def _check_total_energy(total_energy: Any, s: np.ndarray) -> float:
    if total_energy is None:
        return float(np.sum(s * s))
    total = float(total_energy)
    if not np.isfinite(total) or total < 0:
        raise ValueError(f"total_energy must be a finite non-negative number, got {total_energy!r}")
    head = float(np.sum(s * s))
    # The leading values cannot hold more energy than the whole matrix; allow for rounding.
    if head > total * (1 + 1e-6) + np.finfo(np.float64).tiny:
        raise ValueError(
            f"total_energy={total:.6g} is smaller than the energy of the given singular values "
            f"({head:.6g}); pass ||W||_F^2"
        )
    return total


def _check_factors(W: np.ndarray, A: Any, B: Any) -> tuple[np.ndarray, np.ndarray]:
    A = np.asarray(A)
    B = np.asarray(B)
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"A and B must be 2-D, got shapes {A.shape} and {B.shape}")
    m, n = W.shape
    if A.shape[0] != m or B.shape[1] != n or A.shape[1] != B.shape[0]:
        raise ValueError(f"shapes do not chain: W {W.shape}, A {A.shape}, B {B.shape}; need A (m, r) and B (r, n)")
    for name, x in (("A", A), ("B", B)):
        if x.dtype.kind != "f":
            raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
        if x.size and not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contains non-finite values (NaN or Inf)")
    return A, B

