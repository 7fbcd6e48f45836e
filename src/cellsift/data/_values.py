"""One pass over stored values: where the first that is not a raw count is, and how many
are zeros.

A count is finite, non-negative, whole (within :data:`WHOLE_TOL`: sums of float counts
may carry rounding) and below :data:`COUNT_LIMIT`, from where float32, in which counts are
read, holds only some whole numbers. The compiled kernel reads each value once, without
temporaries, and checks all four: 0.4-0.5 ms for 1.2M float32 values, about half the time
of numpy's three separate tests (and three to four times its minimum and maximum, which test less).
"""

from __future__ import annotations

import numpy as np

#: A value further than this from the nearest whole number is not a count.
WHOLE_TOL = 1e-3
#: Counts are below 2**24: float32 holds every whole number up to it, not beyond.
COUNT_LIMIT = 1 << 24


def first_fault(data: np.ndarray) -> tuple[int, int]:
    """``(position of the first value that is not a count, or -1; number of zeros)`` in
    ``data`` (1-d)."""
    data = np.ascontiguousarray(data).ravel()
    if data.dtype.kind in "ui":  # whole and finite by type
        bad = np.flatnonzero((data < 0) | (data >= COUNT_LIMIT))  # (none < 0 where unsigned)
        return (int(bad[0]) if len(bad) else -1), int(len(data) - np.count_nonzero(data))
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float64)
    from ._count_kernels import count, first  # (numba on first use)

    tol = data.dtype.type(WHOLE_TOL)
    bad, zeros = count(data, tol)
    return (int(first(data, tol)) if bad else -1), int(zeros)
