"""Ontology-aware triplet mining and loss, vectorised on the batch's device.

The selection follows SCimilarity's: every anchor-positive pair of a label (positives from
another study whenever the anchor's label has cells there) gets one negative, chosen among
cells whose label is neither the anchor's nor an ontology relative of it (ancestor or
descendant), by the triplet loss ``d(a, p) - d(a, n) + margin`` of each candidate:

``semihard``  a random candidate with 0 < loss < margin
``hardest``   the candidate with the largest loss, if positive
``random``    a random candidate with loss > 0

Pairs without a candidate give no triplet. The distance that mines is the distance of the
loss (SCimilarity mines on squared euclidean distances, twice the cosine distance on unit
rows, and takes the euclidean distance in its loss: its margin means another window in each).

``relatives="resolved"`` relaxes the ontology rule where the data resolve it: a study that
labels some cells with a term and others with its descendant (e.g. "CD14-positive monocyte"
and "CD14-low, CD16-positive monocyte") says that its coarser cells are not of the finer
type. So a descendant-labelled cell is a negative of an anchor whose study (in the batch)
uses that descendant's label, and an ancestor-labelled cell is a negative of an anchor whose
label its own study uses. Relatives that no study tells apart stay excluded (SCimilarity's
rule, the default ``"never"``). Instead of SCimilarity's per-pair Python loop: one pass over
each anchor's row, then constant work per pair (:func:`mine_triplets`), on the batch's
device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from .._utils import as_float, is_number

__all__ = ["TripletLoss", "Triplets", "mine_triplets", "pairwise_distance"]

Distance = Literal["cosine", "euclidean"]
Negative = Literal["semihard", "hardest", "random"]


def _check_choice(name: str, value: object, choices: Any) -> None:
    """``value`` is one of the ``Literal`` type ``choices``; else an error listing them."""
    if value not in get_args(choices):
        listed = ", ".join(map(repr, get_args(choices)))
        raise ValueError(f"{name} must be one of {listed}, not {value!r}.")


Relatives = Literal["never", "resolved"]


def pairwise_distance(z_nk: torch.Tensor, distance: Distance = "cosine") -> torch.Tensor:
    """All pairwise distances of the rows of ``z_nk``: cosine (1 - cos) or euclidean.

    Differentiable, with finite gradients where distances are 0 (the diagonal): the
    euclidean square root is taken only of positive squared distances, of rows centred on
    their mean first (distances do not change; ``|a|^2 + |b|^2 - 2 a.b`` of rows far from
    the origin would lose the distance to rounding). A row that is not finite (a diverged
    model's) has NaN distances, and neither they nor it reach the other rows' gradients
    (a 0 x NaN term in a product would make every row's NaN).
    """
    _check_choice("distance", distance, Distance)
    if distance == "cosine":
        return _CosineDistance.apply(nn.functional.normalize(z_nk, dim=1))
    with torch.autocast(z_nk.device.type, enabled=False):  # (as cosine's: not in bf16)
        finite = torch.isfinite(z_nk).all(1, keepdim=True)
        kept = torch.where(finite, z_nk, 0.0)
        z_nk = torch.where(finite, z_nk - kept.sum(0) / finite.sum().clamp_min(1), 0.0)
        sq = (z_nk * z_nk).sum(1)
        d2 = torch.addmm(sq[:, None], z_nk, z_nk.T, alpha=-2.0).add_(sq[None, :])
        d2.fill_diagonal_(0.0)  # not the rounding error of |z|^2 + |z|^2 - 2 z.z
        zero = d2 <= 0
        d = torch.where(zero, 0.0, torch.where(zero, 1.0, d2).sqrt())
        spoilt = torch.where(finite[:, 0], 0.0, float("nan")).to(d.dtype)
        return d + spoilt[:, None] + spoilt[None, :]  # (the rows that are not finite: NaN)


def _finite_rows(z: torch.Tensor) -> torch.Tensor:
    """``z`` with its rows that are not finite as zeros: for the gradient's products, where
    such a row's weights are 0 (mining gives it no triplet) but 0 x NaN is NaN."""
    return torch.where(torch.isfinite(z).all(1, keepdim=True), z, 0.0)


def _cosine_distances(z: torch.Tensor) -> torch.Tensor:
    """``relu(1 - z @ z.T)`` of unit rows ``z``, in their precision (not autocast's).

    One product added into a matrix of ones (one pass over it fewer than ``1 - G``). Not by
    symmetric blocks (three quarters of the multiply-adds): the half-size products into
    strided blocks and the transposed copy took 1.07-1.45x the full product's time on the
    CPU at every size from 256 to 8,192 rows.
    """
    with torch.autocast(z.device.type, enabled=False):
        n = len(z)
        out = torch.ones(n, n, dtype=z.dtype, device=z.device)
        return out.addmm_(z, z.T, alpha=-1.0).relu_()


class _CosineDistance(torch.autograd.Function):
    """``relu(1 - z @ z.T)`` of unit rows ``z``: one n x n buffer (:func:`_cosine_distances`),
    and a backward of two products (``-(G + G.T) @ z``) without autograd's intermediate
    n x n gradients. In the input's precision, not autocast's: mining compares distances
    within a margin of 0.05, which bf16 rounds to a few steps."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        d = _cosine_distances(z)
        ctx.save_for_backward(z, d)
        return d

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        z, d = ctx.saved_tensors
        with torch.autocast(z.device.type, enabled=False):
            g = grad.to(z.dtype).masked_fill(d <= 0, 0.0)  # relu: no gradient where clipped
            z = _finite_rows(z)  # (a NaN row's 0 x NaN would spoil every row's gradient)
            return torch.mm(g, z).addmm_(g.T, z).neg_()  # (G + G.T) z; BLAS reads G.T in place


class _CosineTripletHinge(torch.autograd.Function):
    """Mean ``relu(d(a, p) - d(a, n) + margin)`` of mined triplets, given their cosine
    distances ``d = relu(1 - z_a . z_b)`` of unit rows ``z``.

    Backward without the n x n distance matrix's: each triplet whose hinge is positive
    weighs the similarities of its two pairs, so the gradient of ``z`` is one product
    ``W @ z`` with a symmetric W of 4 entries per triplet (through the distance matrix it
    took two n x n products and n x n gradients). The relu of ``d`` clips only parallel
    rows, whose similarity's gradient the normalisation of ``z`` projects away.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        z: torch.Tensor,
        a: torch.Tensor,
        p: torch.Tensor,
        neg: torch.Tensor,
        d_ap: torch.Tensor,
        d_an: torch.Tensor,
        margin: float,
    ) -> torch.Tensor:
        # d(a,p) + margin - d(a,n), rounded as mining's window (d(a,n) < d(a,p) + margin): a
        # mined triplet's hinge is positive (d(a,p) - d(a,n) + margin could round to 0), where
        # the loss's distances are mining's float32 ones (float64 embeddings' are finer)
        hinge = (d_ap + margin).sub_(d_an)
        active = hinge > 0
        count = len(hinge)
        # d(mean hinge)/d(z_a . z_p) = -1/count and d/d(z_a . z_n) = +1/count, where active
        w_an = active.to(z.dtype).mul_(1.0 / count)
        ctx.save_for_backward(z, a, p, neg, w_an)
        return hinge.clamp_min_(0.0).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        z, a, p, neg, w_an = ctx.saved_tensors
        n = len(z)
        with torch.autocast(z.device.type, enabled=False):
            at = torch.cat([a * n + p, p * n + a, a * n + neg, neg * n + a])
            w_an = w_an * grad.to(z.dtype)
            w = torch.cat([-w_an, -w_an, w_an, w_an])
            w_nn = torch.zeros(n * n, dtype=z.dtype, device=z.device).index_add_(0, at, w)
            # (a row no triplet holds, NaN: its 0 x NaN would spoil every row's gradient)
            return torch.mm(w_nn.view(n, n), _finite_rows(z)), None, None, None, None, None, None


@dataclass
class Triplets:
    """Indices of mined triplets into the batch, and the pairs considered; with the
    triplets' distances d(a, p) and d(a, n) as mining compared them (float32, no gradient),
    where the miner gives them."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    n_pairs: int
    d_ap: torch.Tensor | None = field(default=None, repr=False)
    d_an: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.anchor)


def _positive_pairs(
    y_n: torch.Tensor, study_n: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor, positive) index pairs: same label, distinct cells; another study if possible.

    Enumerated anchor by anchor over the cells of its label (work proportional to the number
    of same-label pairs, not n^2), so they come ordered by anchor then positive: the binary
    searches of the mining then walk the sorted keys forward, which the cache rewards.
    ``index_select`` / ``masked_select`` rather than fancy indexing: several times faster on
    the CPU for arrays of this size.
    """
    dev = y_n.device
    cells = torch.nonzero(y_n >= 0).flatten()  # the anchors, ascending
    if len(cells) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty
    y = y_n.index_select(0, cells)
    by_label = cells.index_select(0, torch.argsort(y, stable=True))  # ascending per label
    counts = torch.bincount(y)
    starts = torch.cumsum(counts, 0) - counts
    block = counts.index_select(0, y)  # each anchor's number of same-label cells
    anchor = torch.repeat_interleave(torch.arange(len(y), device=dev), block)
    first = torch.cumsum(block, 0) - block  # where each anchor's pairs begin
    offset = torch.arange(len(anchor), device=dev) - first.index_select(0, anchor)
    a = cells.index_select(0, anchor)
    p = by_label.index_select(0, starts.index_select(0, y).index_select(0, anchor) + offset)
    keep = a != p
    if study_n is not None:
        s = study_n.long() + 1  # -1 (no study): a study of its own
        s_cells = s.index_select(0, cells)
        n_studies = int(s.max().item()) + 1
        per_label_study = torch.bincount(y * n_studies + s_cells, minlength=len(counts) * n_studies)
        has_cross = block > per_label_study.index_select(0, y * n_studies + s_cells)
        keep &= ~has_cross.index_select(0, anchor) | (s.index_select(0, a) != s.index_select(0, p))
    return a.masked_select(keep), p.masked_select(keep)


_INDEX_BITS = 16  # cells per batch < 2**16
_MAX_CELLS = (1 << _INDEX_BITS) - 1
_ROW_SHIFT = _INDEX_BITS + 31  # above the cell index and a non-negative float32's 31 bits


def _float_key(x: torch.Tensor) -> torch.Tensor:
    """The bits of non-negative float32 values as int64: they order like the floats."""
    return (x.float().clamp_min(0.0) + 0.0).view(torch.int32).long()  # + 0.0 turns -0 into +0


def _negatives_sorted(
    d_nn: torch.Tensor,
    y: torch.Tensor,
    related_ll: torch.Tensor,
    also_allowed_nn: torch.Tensor | None,
    a: torch.Tensor,
    d_ap: torch.Tensor,
    upper: torch.Tensor,
    u: torch.Tensor | None,
    negative: Negative,
) -> torch.Tensor:
    """One negative per pair (-1: none) with torch operations, on any device.

    Each anchor's allowed negatives become one monotone int64 array of n * n keys, key =
    row << 47 (_ROW_SHIFT) | distance bits << 16 | cell: sorting a row sorts by distance
    (ties by cell) with disallowed negatives (inf) last, and the rows concatenated stay
    sorted. A pair's window is then found by binary search; ``hardest`` takes a masked row
    minimum instead.
    """
    n = len(y)
    labelled = y >= 0
    yc = y.clamp_min(0)
    banned = related_ll[yc][:, yc] | ~labelled[None, :]
    if also_allowed_nn is not None:
        banned &= ~also_allowed_nn
    # NaN (of either sign: its bits would sort as a negative key) is no candidate either
    banned |= d_nn.isnan()
    dist = d_nn.float().clamp_min(0.0).masked_fill_(banned, float("inf")).add_(0.0)  # +0
    if negative == "hardest":  # the largest loss is the nearest negative's
        d_min, nearest = dist.min(1)
        return torch.where(d_min.index_select(0, a) < upper, nearest.index_select(0, a), -1)
    assert u is not None
    cells = torch.arange(n, device=d_nn.device)
    keys = dist.view(torch.int32).long()
    keys.bitwise_left_shift_(_INDEX_BITS).bitwise_or_(cells[None, :])
    keys.bitwise_or_(cells[:, None] << _ROW_SHIFT)
    keys = torch.sort(keys, dim=1).values.flatten()
    row = a << _ROW_SHIFT
    # negatives closer than d(a,p) + margin: keys below (a, bits(d_ap + margin), 0)
    hi = torch.searchsorted(keys, row | (_float_key(upper) << _INDEX_BITS)) - a * n
    if negative == "semihard":  # and farther than d(a,p): keys above (a, bits(d_ap), max)
        lo = (
            torch.searchsorted(
                keys, row | (_float_key(d_ap) << _INDEX_BITS) | _MAX_CELLS, right=True
            )
            - a * n
        )
    else:
        lo = torch.zeros_like(hi)
    count = hi - lo
    pick = lo + (u * count.clamp_min(1)).long().clamp_max((count - 1).clamp_min(0))
    neg = keys.index_select(0, a * n + pick.clamp(0, n - 1)) & _MAX_CELLS
    return torch.where((count > 0) & ~upper.isnan(), neg, -1)  # NaN keys sort after inf


def _triplets_compiled(
    d_nn: torch.Tensor,
    y: torch.Tensor,
    related_ll: torch.Tensor,
    ancestor_ll: torch.Tensor | None,
    study: np.ndarray,
    margin: float,
    seed: int,
    negative: Negative,
) -> Triplets:
    """Triplets on the CPU: the compiled kernel (:func:`cellsift.losses._mining_cpu.
    triplets`). ``study``: the study codes, -1 where there are none; ``seed``: of the
    pairs' draws."""
    import numba

    from .._numba import first_call
    from . import _mining_cpu

    none = np.zeros((0, 0), dtype=np.bool_)
    ancestor, uses = none, none
    # without the resolved rule the kernel's study table has one slot (no study): the codes
    # must stay -1, as it does not check its indices
    rule_study = np.full(len(y), -1, dtype=np.int64)
    if ancestor_ll is not None and (study >= 0).any():
        ancestor = ancestor_ll.bool().numpy()
        uses = _label_use(y, torch.from_numpy(study), len(ancestor)).numpy()
        rule_study = study
    mode = {
        "semihard": _mining_cpu.SEMIHARD,
        "random": _mining_cpu.RANDOM,
        "hardest": _mining_cpu.HARDEST,
    }[negative]
    with first_call("the triplet mining kernel"):
        a, p, neg, d_ap, d_an, n_pairs = _mining_cpu.triplets(
            np.ascontiguousarray(d_nn.numpy(), dtype=np.float32),
            y.numpy(),
            study,
            np.ascontiguousarray(related_ll.numpy(), dtype=np.bool_),
            ancestor,
            uses,
            rule_study,
            _float32(margin),
            seed,
            mode,
            min(numba.get_num_threads(), torch.get_num_threads()),
        )
    a, p, neg, d_ap, d_an = (torch.from_numpy(x) for x in (a, p, neg, d_ap, d_an))
    return Triplets(a, p, neg, int(n_pairs), d_ap, d_an)


def _checked_margin(margin: Any) -> float:
    """``margin`` as a float, checked: a distance, a number >= 0 (a negative one leaves
    semihard windows empty, and random mode would pick negatives closer than the positives
    by more than it)."""
    if not (is_number(margin) and margin >= 0):
        raise ValueError(f"margin must be a number >= 0 (a distance), not {margin!r}.")
    return as_float(margin)  # (a whole number beyond float's range: inf)


def _float32(x: float) -> np.float32:
    """``x`` as float32; beyond its range infinite, without numpy's overflow warning."""
    with np.errstate(over="ignore"):
        return np.float32(x)


def _compiled_path(device: torch.device) -> bool:
    """Mine with the compiled per-row kernel (the CPU) rather than torch's sort (elsewhere)."""
    return device.type == "cpu"


def mine_triplets(
    z_nk: torch.Tensor,
    y_n: torch.Tensor,
    related_ll: torch.Tensor | None = None,
    study_n: torch.Tensor | None = None,
    *,
    margin: float = 0.05,
    negative: Negative = "semihard",
    distance: Distance = "cosine",
    dist_nn: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    ancestor_ll: torch.Tensor | None = None,
) -> Triplets:
    """Mine triplets of a batch (see the module docstring).

    ``hardest``: the largest loss is the anchor's nearest allowed negative's, so a row
    minimum over the allowed negatives serves every pair. ``semihard`` and ``random``: a
    pair's candidates are the allowed negatives in its window (``d(a,p) < d(a,n) < d(a,p) +
    margin`` for semihard, below ``d(a,p) + margin`` for random), and a uniform draw among
    them picks the negative. On the CPU a compiled kernel buckets each anchor's row by
    distance in one pass (:mod:`cellsift.losses._mining_cpu`); elsewhere each row is sorted
    and the window found by binary search. Positive pairs are enumerated per label block.

    Parameters
    ----------
    z_nk
        Embeddings (cells x dims).
    y_n
        Label codes (-1: no label; such cells are neither anchors nor negatives).
    related_ll
        Labels x labels boolean: True where two labels must not be negatives of each other
        (the same label, or ancestor/descendant; :meth:`CellOntology.related`). Default: only
        the same label.
    study_n
        Study codes; positives come from another study when the anchor's label has one there.
    dist_nn
        Precomputed distances (else computed with ``distance``).
    ancestor_ll
        Labels x labels boolean, ``[i, j]``: label j is a strict ancestor of label i. Given
        with ``study_n``, relatives that a study's labels tell apart may be negatives
        (``relatives="resolved"``, module docstring).
    """
    margin = _checked_margin(margin)  # (TripletLoss checks its own once, not per batch)
    with torch.no_grad():
        if dist_nn is None:  # (in float32 at least, as the loss mines)
            d = pairwise_distance(_no_half(z_nk), distance).float()
        else:
            d = dist_nn.detach().to(z_nk.device).float()
            if bool((d < 0).any()):  # (NaN is not < 0: a NaN costs only its own pairs)
                raise ValueError(
                    f"dist_nn holds negative distances (down to {float(d.min()):.3g}); "
                    "distances are >= 0: clip rounding errors (dist_nn.clamp_min(0))."
                )
    return _mine(d, y_n, related_ll, study_n, margin, negative, generator, ancestor_ll)


def _mine(
    d: torch.Tensor,
    y_n: torch.Tensor,
    related_ll: torch.Tensor | None,
    study_n: torch.Tensor | None,
    margin: float,
    negative: Negative,
    generator: torch.Generator | None,
    ancestor_ll: torch.Tensor | None,
) -> Triplets:
    """:func:`mine_triplets` on float32 distances ``d`` (>= 0 or NaN) on the batch's device."""
    _check_choice("negative", negative, Negative)
    dev = d.device
    with torch.no_grad():
        y = y_n.long().to(dev)
        if d.ndim != 2:
            raise ValueError(f"dist_nn is {tuple(d.shape)}, not cells x cells.")
        cells = d.shape[0]
        if y.ndim != 1 or len(y) != cells:
            raise ValueError(
                f"y_n must hold one label code per cell ({cells} cell{'' if cells == 1 else 's'}: "
                f"the embeddings' or distances' rows), not a tensor of shape {tuple(y.shape)}."
            )
        n = len(y)
        compiled = _compiled_path(dev)
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        # (the least and greatest code in one read from the device)
        low, high = (int(v) for v in torch.aminmax(y)) if n else (-1, -1)
        if low < -1:  # (the CPU kernel does not check its indices)
            raise ValueError(
                f"y_n holds label codes down to {low}: a label code is >= 0, or -1 for a "
                "cell without a label."
            )
        if high < 0:  # (no cell, or none with a label)
            return Triplets(empty, empty, empty, 0)
        lowest = int(study_n.min()) if study_n is not None and study_n.numel() else -1
        if study_n is not None and (tuple(study_n.shape) != (n,) or lowest < -1):
            raise ValueError(  # (the CPU kernel does not check its indices)
                f"study_n must hold one study code (>= 0, or -1 for none) per cell ({n}); "
                f"it has shape {tuple(study_n.shape)} and codes down to {lowest}."
            )
        if not compiled:  # (the compiled kernel enumerates its pairs itself)
            a, p = _positive_pairs(y, study_n.to(dev) if study_n is not None else None)
            if len(a) == 0:
                return Triplets(empty, empty, empty, 0)
        if n > _MAX_CELLS and not compiled:  # the sorted keys hold a cell in 16 bits
            raise ValueError(
                f"triplet mining on {dev.type} takes at most {_MAX_CELLS} cells a batch, not {n}."
            )
        n_labels = high + 1
        if ancestor_ll is not None and (ancestor_ll.ndim != 2 or n_labels > len(ancestor_ll)):
            raise ValueError(
                f"ancestor_ll is {tuple(ancestor_ll.shape)}: labels x labels over the label "
                f"codes of the batch (up to {n_labels - 1})."
            )
        if related_ll is None:  # the same label only: over ancestor_ll's labels where given
            size = max(n_labels, ancestor_ll.shape[0] if ancestor_ll is not None else 0)
            related_ll = torch.eye(size, dtype=torch.bool, device=dev)
        related_ll = related_ll.to(dev).bool()
        if related_ll.ndim != 2 or related_ll.shape[0] != related_ll.shape[1]:
            raise ValueError(f"related_ll is {tuple(related_ll.shape)}, not labels x labels.")
        if n_labels > related_ll.shape[0]:  # the CPU kernel does not check its indices
            raise ValueError(
                f"label code {n_labels - 1} is outside related_ll ({related_ll.shape[0]} labels)."
            )
        if ancestor_ll is not None and ancestor_ll.shape != related_ll.shape:
            raise ValueError(
                f"ancestor_ll is {tuple(ancestor_ll.shape)}, related_ll "
                f"{tuple(related_ll.shape)}: both are labels x labels over the same labels."
            )
        if tuple(d.shape) != (n, n):
            raise ValueError(f"dist_nn is {tuple(d.shape)}, not cells x cells ({n} x {n}).")
        if ancestor_ll is not None:  # strict ancestors: a label is none of its own (both paths)
            ancestor_ll = ancestor_ll.to(dev).bool() & ~torch.eye(
                len(ancestor_ll), dtype=torch.bool, device=dev
            )
        if compiled:  # the draws: SplitMix64 from a seed of the torch generator (hardest: none)
            seed = 0
            if negative != "hardest":
                seed = int(torch.randint(1 << 62, (1,), generator=generator))
            study = study_n.long().numpy() if study_n is not None else np.full(n, -1)
            return _triplets_compiled(d, y, related_ll, ancestor_ll, study, margin, seed, negative)
        u = None
        if negative != "hardest":
            u = torch.rand(len(a), generator=generator, device=dev, dtype=torch.float64)
        d_ap = d.flatten().index_select(0, a * n + p)
        upper = d_ap + margin
        resolved = None
        if ancestor_ll is not None and study_n is not None:
            resolved = _resolved_relatives(ancestor_ll.to(dev), y, study_n.long().to(dev))
        neg = _negatives_sorted(d, y, related_ll, resolved, a, d_ap, upper, u, negative)
        keep = neg >= 0
        t = Triplets(a.masked_select(keep), p.masked_select(keep), neg.masked_select(keep), len(a))
        t.d_ap, t.d_an = _triplet_distances(d, t)
        return t


def _resolved_relatives(
    ancestor_ll: torch.Tensor, y: torch.Tensor, study_n: torch.Tensor
) -> torch.Tensor:
    """n x n: relatives that the studies' own labels tell apart (module docstring).

    Anchor i, candidate j: j's label a descendant of i's, used by i's study; or j's label an
    ancestor of i's, in a study that uses i's label. Usage is read from the batch.
    """
    n = len(y)
    labelled = y >= 0
    yc = y.clamp_min(0)
    anc = ancestor_ll[yc][:, yc] & labelled[:, None] & labelled[None, :]  # j ancestor of i
    desc = anc.T  # j descendant of i
    if not (anc.any() or desc.any()):
        return torch.zeros(n, n, dtype=torch.bool, device=y.device)
    # [i, j]: i's study uses j's label
    by_anchor_study = study_uses_label(y, study_n, ancestor_ll.shape[0])[:, yc]
    by_anchor_study &= labelled[:, None]
    return (desc & by_anchor_study) | (anc & by_anchor_study.T)


def study_uses_label(y_n: torch.Tensor, study_n: torch.Tensor, n_labels: int) -> torch.Tensor:
    """Cells x labels boolean: does the cell's study label some cell of the batch so.

    Read from the batch (its cells with both a label and a study, codes < 0 meaning none);
    a cell without a study uses no label. The data's side of ``relatives="resolved"``.
    """
    return _label_use(y_n, study_n, n_labels)[study_n.clamp_min(0)] & (study_n >= 0)[:, None]


def _label_use(y_n: torch.Tensor, study_n: torch.Tensor, n_labels: int) -> torch.Tensor:
    """Studies x labels boolean: which labels each study gives cells of the batch; a row
    for every study code in the batch (its cells without a label too: they are looked up)."""
    known = (y_n >= 0) & (study_n >= 0)
    n_studies = max(int(study_n.max().item()) + 1, 1) if len(study_n) else 1
    used = torch.zeros(n_studies, n_labels, dtype=torch.bool, device=y_n.device)
    used[study_n[known], y_n[known]] = True
    return used


class TripletLoss(nn.Module):
    """Mean ``relu(d(a, p) - d(a, n) + margin)`` over mined triplets (0 when none).

    Mining and loss share one distance matrix; gradients flow through the loss only.
    ``relatives="resolved"`` needs ``ancestor_ll`` (labels x labels, ``[i, j]``: j is a
    strict ancestor of i) and lets relatives that a study tells apart be negatives.
    """

    def __init__(
        self,
        margin: float = 0.05,
        negative: Negative = "semihard",
        distance: Distance = "cosine",
        related_ll: torch.Tensor | None = None,
        relatives: Relatives = "never",
        ancestor_ll: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if relatives not in ("never", "resolved"):
            raise ValueError(f"relatives must be 'never' or 'resolved', not {relatives!r}.")
        _check_choice("negative", negative, Negative)
        _check_choice("distance", distance, Distance)
        if relatives == "resolved" and ancestor_ll is None:
            raise ValueError("relatives='resolved' needs ancestor_ll (CellOntology.closure).")
        self.margin, self.negative, self.distance = margin, negative, distance
        self.relatives = relatives
        if related_ll is not None:
            self.register_buffer("related_ll", related_ll.bool())
        else:
            self.related_ll = None
        if relatives == "resolved":
            assert ancestor_ll is not None
            self.register_buffer("ancestor_ll", ancestor_ll.bool())
        else:
            self.ancestor_ll = None

    @property
    def margin(self) -> float:
        """The hinge's margin, a distance (checked where set: :func:`_checked_margin`)."""
        return self._margin

    @margin.setter
    def margin(self, value: Any) -> None:
        self._margin = _checked_margin(value)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a loss pickled whole when its margin was a plain attribute: the property's now
        if "margin" in state:
            state["_margin"] = _checked_margin(state.pop("margin"))
        super().__setstate__(state)

    def forward(
        self,
        z_nk: torch.Tensor,
        y_n: torch.Tensor,
        study_n: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, Triplets]:
        rules = (self.related_ll, study_n, self.margin, self.negative, generator, self.ancestor_ll)
        z_nk = _no_half(z_nk)  # (a CPU autocast's embeddings are bf16)
        if self.distance == "cosine":  # distances without autograd; the hinge's own backward
            z = nn.functional.normalize(z_nk, dim=1)
            with torch.no_grad():
                d = _cosine_distances(z.detach())
            t = _mine(d.float(), y_n, *rules)
            if len(t) == 0:
                return z_nk.sum() * 0.0, t
            if d.dtype == torch.float32 and t.d_ap is not None and t.d_an is not None:
                d_ap, d_an = t.d_ap, t.d_an  # the very values mining compared
            else:  # (finer than the float32 that mines)
                d_ap, d_an = _triplet_distances(d, t)
            hinge = _CosineTripletHinge.apply(
                z, t.anchor, t.positive, t.negative, d_ap, d_an, self.margin
            )
            return hinge, t
        d = pairwise_distance(z_nk, self.distance)
        t = _mine(d.detach().float(), y_n, *rules)
        if len(t) == 0:
            return z_nk.sum() * 0.0, t
        d_ap, d_an = _triplet_distances(d, t)
        return (d_ap + self.margin - d_an).clamp_min(0.0).mean(), t  # (as mining rounds)


def _no_half(z: torch.Tensor) -> torch.Tensor:
    """``z`` in float32 where it is in half precision: distances that mine within a margin
    (0.05) are never computed in bf16 (steps of 0.004) or float16."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _triplet_distances(d: torch.Tensor, t: Triplets) -> tuple[torch.Tensor, torch.Tensor]:
    """d(a, p) and d(a, n) of the triplets: one index_select (faster than d[rows, cols] on
    the CPU) of row * n + column, so that through autograd one n x n gradient buffer serves
    both."""
    at = torch.cat([t.positive, t.negative]).add_(t.anchor.repeat(2), alpha=len(d))
    d_ap, d_an = d.flatten().index_select(0, at).chunk(2)
    return d_ap, d_an
