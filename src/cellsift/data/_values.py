"""One pass over stored values: how many are not raw counts, and how many are zeros.

A count is finite, non-negative and whole (within :data:`WHOLE_TOL`: sums of float counts
may carry rounding). The compiled kernel reads each value once, without temporaries, and
checks all three: about as fast as numpy's minimum and maximum together, three times faster
than its three separate tests.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

#: A value further than this from the nearest whole number is not a count.
WHOLE_TOL = 1e-3


@cache
def _kernel() -> Any:
    """The compiled pass (numba imported on first use: ``import cellsift`` stays light)."""
    import numba

    @numba.njit(cache=True, nogil=True)
    def faults(data):  # type: ignore[no-untyped-def]
        bad = 0
        zeros = 0
        tol = data.dtype.type(WHOLE_TOL)
        half = data.dtype.type(0.5)
        for i in range(data.shape[0]):
            v = data[i]
            r = v - np.floor(v + half)
            # (NaN fails every comparison: not a count)
            bad += np.int64(not ((v >= 0) and (v < np.inf) and (abs(r) <= tol)))
            zeros += np.int64(v == 0)
        return bad, zeros

    return faults


def count_faults(data: np.ndarray) -> tuple[int, int]:
    """``(values that are not counts, zeros)`` among ``data`` (1-d)."""
    data = np.ascontiguousarray(data).ravel()
    if data.dtype.kind in "ui":  # whole and finite by type
        neg = int(np.count_nonzero(data < 0)) if data.dtype.kind == "i" and len(data) else 0
        return neg, int(len(data) - np.count_nonzero(data))
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float64)
    bad, zeros = _kernel()(data)
    return int(bad), int(zeros)


def not_count(data: np.ndarray) -> np.ndarray:
    """Boolean mask of the values of ``data`` that are not counts (the kernel's test)."""
    data = np.asarray(data)
    if data.dtype.kind in "ui":
        return data < 0
    with np.errstate(invalid="ignore"):
        v = data.astype(np.float64)
        return ~((v >= 0) & (v < np.inf) & (np.abs(v - np.floor(v + 0.5)) <= WHOLE_TOL))
