"""Triplet negatives on the CPU: one compiled pass over each anchor's row, no n x n sort.

:func:`cellsift.losses.mine_triplets` calls :func:`negatives` for batches on the CPU (on
other devices it sorts each row with torch). Per anchor, in parallel over anchors:

1. scan the row once for allowed negatives inside the union of the anchor's pair windows
   (``hardest``: the row minimum instead, and done);
2. counting-sort those candidates into as many equal-width distance buckets as there are
   candidates;
3. per pair, the buckets strictly inside its window are all candidates (their distances are
   bracketed by the bucket edges, and the bucket function is monotone in floating point),
   and only the two edge buckets are tested one by one. A uniform draw among the candidates
   picks the negative: the same distribution as picking uniformly from the sorted window.

Work: O(n) per anchor plus O(bucket size) per pair, against O(n log n) per anchor and two
binary searches per pair for the sort.
"""

from __future__ import annotations

import numba
import numpy as np

SEMIHARD, RANDOM, HARDEST = 0, 1, 2


@numba.njit(inline="always")
def _anchor_tables(yi, si, related, ancestor, uses, ok, coarse, used_by):  # type: ignore[no-untyped-def]
    """Anchor i's rules as lookups shifted by one (index 0: no label / no study).

    Cell j may be a negative iff ``ok[y_j + 1] | (coarse[y_j + 1] & used_by[s_j + 1])``:
    its label is unrelated to i's, or a finer label that i's study uses (``ok``); or it is a
    coarser label (``coarse``) in a study that uses i's label (``used_by``).
    """
    n_labels = related.shape[0]
    resolved = ancestor.shape[0] > 0
    ok[0], coarse[0], used_by[0] = False, False, False
    for lab in range(n_labels):
        finer = resolved and yi != lab and ancestor[lab, yi] and si >= 0 and uses[si, lab]
        ok[lab + 1] = not related[yi, lab] or finer
        coarse[lab + 1] = resolved and yi != lab and ancestor[yi, lab]
    for st in range(used_by.shape[0] - 1):
        used_by[st + 1] = resolved and uses[st, yi]


@numba.njit(inline="always")
def _bucket(x, low, scale, n_buckets):  # type: ignore[no-untyped-def]
    """floor((x - low) * scale) clipped to [0, n_buckets - 1]: monotone in x, branch-free."""
    return int(min(max((x - low) * scale, 0.0), n_buckets - 1.0))


@numba.njit(inline="always")
def _nth_in(o_v, o_j, start, stop, lo, hi, semihard, r):  # type: ignore[no-untyped-def]
    """Count of window members in o_v[start:stop]; with r >= 0, the r-th member's cell."""
    count = 0
    for q in range(start, stop):
        v = o_v[q]
        if v < hi and (not semihard or v > lo):
            if count == r:
                return o_j[q]
            count += 1
    return count if r < 0 else -1


@numba.njit(inline="always")
def _one_anchor(  # type: ignore[no-untyped-def]
    d, y, study, i, k0, k1, d_ap, upper, u, mode, semihard, out, related, ancestor, uses,
    ok, coarse, used_by, cand_v, cand_j, which, start, fill, o_v, o_j,
):  # fmt: skip
    """The negatives of anchor i's pairs k0:k1 (:func:`negatives`), in the scratch arrays."""
    n = d.shape[1]
    row = d[i]
    _anchor_tables(y[i], study[i], related, ancestor, uses, ok, coarse, used_by)
    if mode == HARDEST:  # the largest loss is the nearest negative's
        best, arg = np.inf, -1
        for j in range(n):
            v = row[j]
            if v < best and (ok[y[j] + 1] or (coarse[y[j] + 1] and used_by[study[j] + 1])):
                best, arg = v, j
        for k in range(k0, k1):
            out[k] = arg if best < upper[k] else -1
        return
    lo, hi = np.float32(np.inf), np.float32(-np.inf)  # the union of the windows
    for k in range(k0, k1):  # (comparisons, so that a NaN pair is skipped, not spread)
        if d_ap[k] < lo:
            lo = d_ap[k]
        if upper[k] > hi:
            hi = upper[k]
    if not semihard:
        lo = np.float32(-np.inf)
    c = 0  # candidates, collected without branches (a taken branch per cell mispredicts)
    for j in range(n):
        v = row[j]
        yj = y[j] + 1
        keep = (v > lo) & (v < hi) & (ok[yj] | (coarse[yj] & used_by[study[j] + 1]))
        cand_v[c], cand_j[c] = v, j
        c += keep
    if c == 0:
        for k in range(k0, k1):
            out[k] = -1
        return
    # equal-width buckets over the union window; random: from 0 (distances are >= 0, and
    # anything below still falls in bucket 0)
    n_buckets = c
    low = np.float64(lo) if semihard else 0.0
    span = np.float64(hi) - low
    scale = n_buckets / span if span > 0 and span < np.inf else 0.0
    start[: n_buckets + 1] = 0  # counting sort by bucket
    for q in range(c):
        b = _bucket(np.float64(cand_v[q]), low, scale, n_buckets)
        which[q] = b
        start[b + 1] += 1
    for b in range(n_buckets):
        start[b + 1] += start[b]
    fill[:n_buckets] = start[:n_buckets]
    for q in range(c):
        b = which[q]
        o_v[fill[b]], o_j[fill[b]] = cand_v[q], cand_j[q]
        fill[b] += 1
    for k in range(k0, k1):
        w_lo, w_hi = d_ap[k], upper[k]
        if w_hi != w_hi or (semihard and w_lo != w_lo):  # NaN
            out[k] = -1
            continue
        # edge buckets tested one by one; those strictly between are all inside
        b_hi = _bucket(np.float64(w_hi), low, scale, n_buckets)
        e1, inner_start = 0, 0  # random: no lower edge, every bucket below b_hi inside
        b_lo = -1
        if semihard:
            b_lo = _bucket(np.float64(w_lo), low, scale, n_buckets)
            e1 = _nth_in(o_v, o_j, start[b_lo], start[b_lo + 1], w_lo, w_hi, True, -1)
            inner_start = start[b_lo + 1]
        inner = max(start[b_hi] - inner_start, 0)
        e2 = 0
        if b_hi != b_lo:
            e2 = _nth_in(o_v, o_j, start[b_hi], start[b_hi + 1], w_lo, w_hi, semihard, -1)
        total = e1 + inner + e2
        if total == 0:
            out[k] = -1
            continue
        r = min(int(u[k] * total), total - 1)
        if r < e1:
            out[k] = _nth_in(o_v, o_j, start[b_lo], start[b_lo + 1], w_lo, w_hi, True, r)
        elif r < e1 + inner:
            out[k] = o_j[inner_start + r - e1]
        else:
            r -= e1 + inner
            out[k] = _nth_in(o_v, o_j, start[b_hi], start[b_hi + 1], w_lo, w_hi, semihard, r)


@numba.njit(parallel=True, cache=True, nogil=True)
def negatives(  # type: ignore[no-untyped-def]
    d, y, related, ancestor, uses, study, anchors, pair_start, d_ap, upper, u, mode, out, threads
):
    """One negative per pair (cell index, or -1 when the pair has no candidate) into ``out``.

    ``d``: n x n float32 distances. ``y``: label codes (-1 none). ``related``: labels x
    labels, never negatives of each other. ``ancestor`` ([i, j]: j a strict ancestor of i)
    and ``uses`` (studies x labels, which labels a study uses in the batch): the resolved
    relatives, or 0 x 0 for none. ``study``: study codes (-1 none). Pairs are grouped by
    anchor: ``anchors[t]`` owns pairs ``pair_start[t]:pair_start[t + 1]``; ``d_ap`` and
    ``upper`` (= d_ap + margin) bound each pair's window, ``u`` are its uniform draws.
    The anchors are split into one block per thread (``threads``: numba's thread count,
    read by the caller), each block with its own scratch arrays.
    """
    n = d.shape[1]
    semihard = mode == SEMIHARD
    n_blocks = max(min(threads, len(anchors)), 1)
    for block in numba.prange(n_blocks):
        ok = np.empty(related.shape[0] + 1, np.bool_)
        coarse = np.empty(related.shape[0] + 1, np.bool_)
        used_by = np.empty(uses.shape[0] + 1, np.bool_)
        cand_v = np.empty(n, np.float32)
        cand_j = np.empty(n, np.int64)
        which = np.empty(n, np.int64)
        start = np.empty(n + 1, np.int64)
        fill = np.empty(n, np.int64)
        o_v = np.empty(n, np.float32)
        o_j = np.empty(n, np.int64)
        for t in range(block * len(anchors) // n_blocks, (block + 1) * len(anchors) // n_blocks):
            _one_anchor(
                d, y, study, anchors[t], pair_start[t], pair_start[t + 1], d_ap, upper, u,
                mode, semihard, out, related, ancestor, uses, ok, coarse, used_by,
                cand_v, cand_j, which, start, fill, o_v, o_j,
            )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def positive_pairs(y, study):  # type: ignore[no-untyped-def]
    """(anchor, positive) pairs: same label, distinct cells, another study when possible.

    ``y``: label codes (-1: none, never paired); ``study``: study codes (-1: none, a study
    of its own). Ordered by anchor then positive, as :func:`cellsift.losses.triplet.
    _positive_pairs` orders them. Also returns the anchors that have pairs and where each
    one's pairs start (``pair_start``, one longer), the grouping :func:`negatives` takes.
    """
    n = len(y)
    n_labels, n_studies = 1, 1
    for i in range(n):
        n_labels = max(n_labels, y[i] + 1)
        n_studies = max(n_studies, study[i] + 2)
    start = np.zeros(n_labels + 1, np.int64)  # cells of each label, ascending
    per_study = np.zeros((n_labels, n_studies), np.int64)
    for i in range(n):
        if y[i] >= 0:
            start[y[i] + 1] += 1
            per_study[y[i], study[i] + 1] += 1
    for lab in range(n_labels):
        start[lab + 1] += start[lab]
    by_label = np.empty(start[n_labels], np.int64)
    fill = start[:-1].copy()
    total, n_anchors = 0, 0
    for i in range(n):
        if y[i] >= 0:
            by_label[fill[y[i]]] = i
            fill[y[i]] += 1
    for i in range(n):
        if y[i] >= 0:
            same = start[y[i] + 1] - start[y[i]]
            own = per_study[y[i], study[i] + 1]
            k = same - own if same > own else same - 1
            total += k
            n_anchors += k > 0
    a = np.empty(total, np.int64)
    p = np.empty(total, np.int64)
    anchors = np.empty(n_anchors, np.int64)
    pair_start = np.zeros(n_anchors + 1, np.int64)
    k, t = 0, 0
    for i in range(n):
        if y[i] < 0:
            continue
        cross = start[y[i] + 1] - start[y[i]] > per_study[y[i], study[i] + 1]
        k0 = k
        for q in range(start[y[i]], start[y[i] + 1]):
            j = by_label[q]
            if j != i and not (cross and study[j] == study[i]):
                a[k], p[k] = i, j
                k += 1
        if k > k0:
            anchors[t] = i
            pair_start[t + 1] = k
            t += 1
    return a, p, anchors, pair_start
