"""Reading a sorted set of rows of an on-disk CSR matrix with few, large reads.

Rows map to element ranges ``indptr[r]:indptr[r+1]``. Ranges closer than ``max_gap``
elements are merged into one read (reading a few unwanted elements is cheaper than another
call); the runs of consecutive wanted rows are then copied out of the read buffer (nothing
is copied when the reads held exactly the wanted elements).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

#: Merge element ranges separated by fewer elements than this (32k elements = 256 KB).
MAX_GAP = 1 << 15

ReadSegments = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def as_int32(indices: np.ndarray) -> np.ndarray:
    """Column indices as int32 (every store's gene count fits), where they fit: a damaged
    file's index beyond int32 stays as it is, for the read's check to name (a cast would
    wrap it into the genes)."""
    if indices.dtype == np.int32:
        return indices
    info = np.iinfo(np.int32)
    if len(indices) and (indices.max() > info.max or indices.min() < info.min):
        return indices.astype(np.int64, copy=False)
    return indices.astype(np.int32)


def segments(
    indptr: np.ndarray, rows: np.ndarray, max_gap: int = MAX_GAP
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Element ranges to read for ``rows`` (sorted, unique).

    Returns ``seg_start, seg_end`` (the merged reads) and ``row_start, row_len`` (each row's
    first element and length).
    """
    row_start = indptr[rows]
    row_len = indptr[rows + 1] - row_start
    if len(rows) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, row_start, row_len
    row_end = row_start + row_len
    breaks = np.flatnonzero(row_start[1:] - row_end[:-1] > max_gap) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks - 1, [len(rows) - 1]))
    return row_start[first], row_end[last], row_start, row_len


def read_rows(
    indptr: np.ndarray,
    rows: np.ndarray,
    n_cols: int,
    read_segments: ReadSegments,
    max_gap: int = MAX_GAP,
) -> sp.csr_matrix:
    """Rows ``rows`` (sorted, unique) as CSR, via ``read_segments(starts, ends) -> data, indices``.

    ``read_segments`` returns the concatenated elements of all ranges, in order.
    """
    seg_start, seg_end, row_start, row_len = segments(indptr, rows, max_gap)
    out_indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(row_len, out=out_indptr[1:])
    nnz = int(out_indptr[-1])
    if len(seg_start) == 0:
        data, indices = np.zeros(0, np.float32), np.zeros(0, np.int32)
    else:
        data, indices = read_segments(seg_start, seg_end)
        if len(data) != nnz:  # the reads hold gaps: copy out the runs of consecutive rows
            seg_off = np.concatenate(([0], np.cumsum(seg_end - seg_start)[:-1]))
            seg_of_row = np.searchsorted(seg_start, row_start, side="right") - 1
            buf_start = row_start - seg_start[seg_of_row] + seg_off[seg_of_row]
            run_first = np.flatnonzero(
                np.diff(buf_start, prepend=-1) != np.concatenate(([0], row_len[:-1]))
            )  # a run breaks where a row does not follow its neighbour
            run_end = np.concatenate((run_first[1:], [len(rows)]))
            a = buf_start[run_first].tolist()
            b = (buf_start[run_end - 1] + row_len[run_end - 1]).tolist()
            data = np.concatenate([data[i:j] for i, j in zip(a, b, strict=True)])
            indices = np.concatenate([indices[i:j] for i, j in zip(a, b, strict=True)])
    return sp.csr_matrix((data, indices, out_indptr), shape=(len(rows), n_cols), copy=False)
