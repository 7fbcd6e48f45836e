"""The compiled passes of :mod:`cellsift.data._values`, at module level so that numba's
cache finds them again: kernels defined inside a function are keyed by their closure, which
differs in every process, so each process compiled them anew (0.5 s here) and added them
to a cache that only grew. Imported on first use: ``import cellsift`` stays light."""

from __future__ import annotations

import numba
import numpy as np

from .._numba import njit_cached


@numba.njit(inline="always")
def _is_count(v, tol, one):  # type: ignore[no-untyped-def]
    # the distance to the nearer whole number, without rounding v + 0.5 (which, from 2**23
    # in float32, rounds an odd whole number up to the next even one)
    # and below 2**24 (16,777,216: _values.COUNT_LIMIT, written out as numba's cache would
    # keep another file's constant after it changed), from where float32, in which counts
    # are read, holds only some whole numbers: a larger value would be read rounded
    f = v - np.floor(v)
    return (v >= 0) and (v < 16777216.0) and (min(f, one - f) <= tol)  # (NaN fails them)


@njit_cached(nogil=True)
def count(data, tol):  # type: ignore[no-untyped-def]
    """Values that are not counts (further than ``tol``, of ``data``'s dtype, from a whole
    number: an argument, as numba's cache would keep a module constant of another file
    after it changed), and zeros (every value read: it vectorises)."""
    bad = 0
    zeros = 0
    one = data.dtype.type(1.0)
    for i in range(data.shape[0]):
        bad += np.int64(not _is_count(data[i], tol, one))
        zeros += np.int64(data[i] == 0)
    return bad, zeros


@njit_cached(nogil=True)
def first(data, tol):  # type: ignore[no-untyped-def]
    """Position of the first value that is not a count, or -1 (stops there)."""
    one = data.dtype.type(1.0)
    for i in range(data.shape[0]):
        if not _is_count(data[i], tol, one):
            return i
    return -1
