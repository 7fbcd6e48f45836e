"""Triplets on the CPU: one compiled pass over each anchor's row, no n x n sort.

:func:`cellsift.losses.mine_triplets` calls :func:`triplets` for batches on the CPU (on
other devices it sorts each row with torch). It enumerates the positive pairs itself, then,
per anchor, in parallel over anchors:

0. the anchor's allowed negatives as a mask over the batch, built once per label and study
   and shared by the anchors of both (so that step 1 reads contiguous memory only);
1. one vectorised pass over the row gives each cell its bucket: a candidate (an allowed
   negative inside the union of the anchor's pair windows) one of n / 4 equal-width
   distance buckets over that union, any other cell one of a few spare buckets past the
   last (``hardest``: the row minimum instead, and done);
2. a counting sort by bucket (unsigned indices, no branch per cell), so that the buckets a
   pair's window meets are one contiguous run of candidates;
3. per pair, rejection sampling: a uniform draw from that run is kept if it lies inside the
   window, else drawn again. A kept draw is uniform over the window's candidates; after
   ``tries`` rejections (the window holds few of the run's candidates, or none), the run is
   counted and one of its window members drawn exactly, which is uniform too, so the pick
   has the distribution of a uniform draw from the sorted window whatever ``tries`` is.
   Pair k's draws are SplitMix64's outputs ``k * (tries + 1)`` onwards from a seed that the
   caller draws from torch's generator, so they do not depend on threads or scheduling.

Work: O(n) per anchor plus about one draw per pair (windows span many buckets, so the run
is mostly window), against O(n log n) per anchor and two
binary searches per pair for the sort. The pairs that found a negative come back compacted.
"""

from __future__ import annotations

import numba
import numpy as np

from .._numba import njit_cached

SEMIHARD, RANDOM, HARDEST = 0, 1, 2
TRIES = 4  # proposals per pair before the exact draw
_INF_KEY = np.int64(0x7F800000) << 32  # hardest: keys from here on are no distance (inf, NaN)
_NO_KEY = np.int64(0x7FFFFFFFFFFFFFFF)  # a cell that is no negative
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment


@numba.njit(inline="always")
def _uniform(seed, k):  # type: ignore[no-untyped-def]
    """Pair k's draw in [0, 1): the k-th output of SplitMix64 from ``seed`` (uint64).

    Counter-based, so a pair's draw depends on its index only, not on which thread mines
    it or in what order.
    """
    x = seed + np.uint64(k + 1) * _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return np.float64(x >> np.uint64(11)) * (1.0 / 9007199254740992.0)  # 53 bits / 2**53


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


SPARE = 8  # buckets past the last, for the cells that are no candidates (a power of 2)


@numba.njit(inline="always")
def _n_buckets(n):  # type: ignore[no-untyped-def]
    """Candidate buckets of a row of ``n`` cells: a quarter as many as cells (about two
    candidates to a bucket where half the row is in the window), at least one."""
    return max(n // 4, 1)


@numba.njit(inline="always")
def _bucket(x, low, scale, n_buckets):  # type: ignore[no-untyped-def]
    """floor((x - low) * scale) clipped to [0, n_buckets - 1], in float32 (as the row's
    cells are bucketed): monotone in x, branch-free. NaN (0 x inf: an infinite ``x`` where
    the span was infinite and ``scale`` 0, or ``x == low`` where a span too small for
    float32 made ``scale`` infinite) is bucket 0: ``max`` keeps its first argument unless
    the second is greater, and NaN is greater than nothing."""
    return int(min(np.float32(n_buckets - 1), max(np.float32(0.0), (x - low) * scale)))


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
def _allowed_mask(y, study, related, ancestor, uses, yi, si, ok, coarse, used_by, allowed):
    """``allowed[j]``: may cell j be a negative of an anchor of label ``yi`` in study ``si``.

    The anchor's rules (:func:`_anchor_tables`) read once per cell into a mask that every
    anchor of the same label and study shares, so that each anchor's pass over its row reads
    contiguous memory only.
    """
    _anchor_tables(yi, si, related, ancestor, uses, ok, coarse, used_by)
    for j in range(len(y)):
        yj = y[j] + 1
        allowed[j] = ok[yj] | (coarse[yj] & used_by[study[j] + 1])


@numba.njit(inline="always")
def _one_anchor(  # type: ignore[no-untyped-def]
    row, allowed, k0, k1, d_ap, upper, seed, mode, semihard, tries, out, which, start, o_v, o_j,
):  # fmt: skip
    """The negatives of one anchor's pairs (``out[k0:k1]``); the pairs' windows are
    ``d_ap[:k1 - k0]`` and ``upper[:k1 - k0]``, their draws :func:`_uniform` (pair k's
    ``tries + 1`` from ``k * (tries + 1)``)."""
    n = row.shape[0]
    m = k1 - k0
    if mode == HARDEST:  # the largest loss is the nearest negative's
        # one integer minimum over keys (distance bits, then cell): a distance >= 0 orders
        # as its bits do, NaN's above infinity's, and the first of equal distances wins
        # (a reduction the compiler vectorises, not a branch per cell)
        bits = row.view(np.int32)
        best = _NO_KEY
        for j in range(n):
            key = (np.int64(bits[j] & 0x7FFFFFFF) << 32) | j  # (-0.0 as 0.0)
            best = min(best, key if allowed[j] else _NO_KEY)
        arg = -1 if best >= _INF_KEY else best & 0xFFFFFFFF
        for k in range(m):
            out[k0 + k] = arg if arg >= 0 and row[arg] < upper[k] else -1
        return
    lo, hi = np.float32(np.inf), np.float32(-np.inf)  # the union of the windows
    for k in range(m):  # (comparisons, so that a NaN pair is skipped, not spread)
        if d_ap[k] < lo:
            lo = d_ap[k]
        if upper[k] > hi:
            hi = upper[k]
    if not semihard:
        lo = np.float32(-np.inf)
    # equal-width buckets over the union window (_n_buckets); random: from 0 (distances are
    # >= 0, and anything below still falls in bucket 0)
    n_buckets = _n_buckets(n)
    low = lo if semihard else np.float32(0.0)
    span = np.float64(hi) - np.float64(low)
    scale = np.float32(n_buckets / span if span > 0 and span < np.inf else 0.0)
    top = np.float32(n_buckets - 1)
    # every cell's bucket (a loop the compiler vectorises): a candidate's (as _bucket), or
    # one of the SPARE buckets past the last for the other cells (spread, so that their counts
    # are not one chain of dependent stores); the sort then moves every cell, branch-free
    for j in range(n):
        v = row[j]
        ok = (v > lo) & (v < hi) & allowed[j]
        b = np.uint32(min(top, max(np.float32(0.0), (v - low) * scale)))
        which[j] = b if ok else np.uint32(n_buckets) + (np.uint32(j) & np.uint32(SPARE - 1))
    start[: n_buckets + SPARE + 1] = 0
    for j in range(n):
        start[which[j] + np.uint32(1)] += np.uint32(1)
    for b in range(n_buckets + SPARE):
        start[b + 1] += start[b]
    c = start[n_buckets]
    if c == 0:
        out[k0:k1] = -1
        return
    for j in range(n):
        b = which[j]
        o_j[start[b]] = j
        o_v[start[b]] = row[j]
        start[b] += np.uint32(1)
    # (now start[b] is where bucket b + 1 begins: bucket b is start[b - 1]:start[b])
    for k in range(m):
        w_lo, w_hi = d_ap[k], upper[k]
        if w_hi != w_hi or (semihard and w_lo != w_lo):  # NaN
            out[k0 + k] = -1
            continue
        # proposal: the buckets that meet the window, contiguous in o_v; a uniform proposal
        # inside the window is accepted (rejection sampling: uniform over the window)
        b_hi = _bucket(w_hi, low, scale, n_buckets)
        first = 0
        if semihard:
            b_lo = _bucket(w_lo, low, scale, n_buckets)
            first = start[b_lo - 1] if b_lo > 0 else 0
        size = start[b_hi] - first
        pick = -1
        draw = (k0 + k) * (tries + 1)
        for t in range(tries):
            if size == 0:
                break
            q = first + min(int(_uniform(seed, draw + t) * size), size - 1)
            v = o_v[q]
            if v < w_hi and (not semihard or v > w_lo):
                pick = o_j[q]
                break
        else:  # tries rejections: the exact draw among the window's members
            total = _nth_in(o_v, o_j, first, first + size, w_lo, w_hi, semihard, -1)
            if total > 0:
                r = min(int(_uniform(seed, draw + tries) * total), total - 1)
                pick = _nth_in(o_v, o_j, first, first + size, w_lo, w_hi, semihard, r)
        out[k0 + k] = pick


@njit_cached(parallel=True, nogil=True)
def triplets(  # type: ignore[no-untyped-def]
    d, y, study, related, ancestor, uses, rule_study, margin, seed, mode, threads, tries=TRIES
):
    """Positive pairs and one negative per pair: (anchor, positive, negative) of the pairs
    that found a negative, ordered by anchor then positive (as :func:`cellsift.losses.
    triplet._positive_pairs` orders them), their distances d(a, p) and d(a, n) (read from
    ``d``), and the number of pairs.

    ``d``: n x n float32 distances. ``y``: label codes (-1 none). ``study``: study codes of
    the positives' rule (-1 none, a study of its own). ``related``: labels x labels, never
    negatives of each other. ``ancestor`` ([i, j]: j a strict ancestor of i) and ``uses``
    (studies x labels, which labels a study uses in the batch): the resolved relatives, or
    0 x 0 for none; ``rule_study`` their study codes (all -1 without them: the kernel
    checks no indices). ``margin``: float32. ``seed``: of the pairs' uniform draws
    (semihard, random), a non-negative int64. Anchors of one label and study share a mask of
    allowed negatives; they are processed grouped so, split into one block per thread
    (``threads``: numba's thread count, read by the caller), each with its own scratch.
    ``tries``: proposals per pair before its exact draw (module docstring; any value gives
    the same distribution).
    """
    n = d.shape[1]
    useed = np.uint64(seed)
    by_label, start, per_study, anchors, pair_start = label_blocks(y, study)
    total = pair_start[-1]
    a = np.empty(total, np.int64)
    p = np.empty(total, np.int64)
    out = np.empty(total, np.int64)
    dist_ap = np.empty(total, np.float32)
    dist_an = np.empty(total, np.float32)
    n_rule = uses.shape[0] + 1
    group = np.empty(len(anchors), np.int64)
    for t in range(len(anchors)):
        group[t] = y[anchors[t]] * n_rule + rule_study[anchors[t]] + 1
    order = np.argsort(group, kind="mergesort")
    semihard = mode == SEMIHARD
    n_blocks = max(min(threads, len(anchors)), 1)
    for block in numba.prange(n_blocks):
        ok = np.empty(related.shape[0] + 1, np.bool_)
        coarse = np.empty(related.shape[0] + 1, np.bool_)
        used_by = np.empty(n_rule, np.bool_)
        allowed = np.empty(n, np.bool_)
        d_ap = np.empty(n, np.float32)
        upper = np.empty(n, np.float32)
        which = np.empty(n, np.uint32)
        bucket_start = np.empty(_n_buckets(n) + SPARE + 1, np.uint32)
        o_v = np.empty(n, np.float32)
        o_j = np.empty(n, np.uint32)
        current = -1
        for r in range(block * len(anchors) // n_blocks, (block + 1) * len(anchors) // n_blocks):
            t = order[r]
            i = anchors[t]
            if group[t] != current:
                current = group[t]
                _allowed_mask(
                    y, rule_study, related, ancestor, uses, y[i], rule_study[i],
                    ok, coarse, used_by, allowed,
                )  # fmt: skip
            k0, k1 = pair_start[t], pair_start[t + 1]
            _anchor_pairs(i, y, study, by_label, start, per_study, a, p, k0)
            row = d[i]
            for k in range(k1 - k0):
                d_ap[k] = row[p[k0 + k]]
                upper[k] = d_ap[k] + margin
            _one_anchor(
                row, allowed, k0, k1, d_ap, upper, useed, mode, semihard, tries, out,
                which, bucket_start, o_v, o_j,
            )  # fmt: skip
            for k in range(k1 - k0):  # the triplets' distances, while the row is in cache
                dist_ap[k0 + k] = d_ap[k]
                dist_an[k0 + k] = row[max(out[k0 + k], 0)]
    kept = 0
    for k in range(total):  # the pairs with a negative, in order
        if out[k] >= 0:
            a[kept], p[kept], out[kept] = a[k], p[k], out[k]
            dist_ap[kept], dist_an[kept] = dist_ap[k], dist_an[k]
            kept += 1
    return a[:kept], p[:kept], out[:kept], dist_ap[:kept], dist_an[:kept], total


@njit_cached(nogil=True)
def label_blocks(y, study):  # type: ignore[no-untyped-def]
    """The batch's cells by label, and its anchors with where each one's pairs start.

    ``y``: label codes (-1: none, never paired); ``study``: study codes (-1: none, a study
    of its own). Returns the labelled cells ordered by label (ascending within a label),
    where each label's cells start (one longer), the cells of each label per study (labels
    x studies + 1), the cells with at least one positive (ascending) and where each one's
    pairs start (``pair_start``, one longer: ``pair_start[-1]`` pairs in all).
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
    for i in range(n):
        if y[i] >= 0:
            by_label[fill[y[i]]] = i
            fill[y[i]] += 1
    n_anchors = 0
    for i in range(n):
        n_anchors += y[i] >= 0 and start[y[i] + 1] - start[y[i]] > 1
    anchors = np.empty(n_anchors, np.int64)
    pair_start = np.zeros(n_anchors + 1, np.int64)
    t = 0
    for i in range(n):
        if y[i] < 0:
            continue
        same = start[y[i] + 1] - start[y[i]]
        own = per_study[y[i], study[i] + 1]
        k = same - own if same > own else same - 1  # another study's cells, if any
        if k > 0:
            anchors[t] = i
            pair_start[t + 1] = pair_start[t] + k
            t += 1
    return by_label, start, per_study, anchors, pair_start


@numba.njit(inline="always")
def _anchor_pairs(i, y, study, by_label, start, per_study, a, p, k):  # type: ignore[no-untyped-def]
    """Anchor i's pairs into ``a[k:]``, ``p[k:]``: the other cells of its label, of another
    study when its label has cells there (SCimilarity's rule), ascending."""
    yi = y[i]
    cross = start[yi + 1] - start[yi] > per_study[yi, study[i] + 1]
    for q in range(start[yi], start[yi + 1]):
        j = by_label[q]
        if j != i and not (cross and study[j] == study[i]):
            a[k], p[k] = i, j
            k += 1
