"""Ontology-aware triplet mining and loss, vectorised on the batch's device.

The selection follows SCimilarity's: every anchor-positive pair of a label (positives from
another study whenever the anchor's label has cells there) gets one negative, chosen among
cells whose label is neither the anchor's nor an ontology relative of it (ancestor or
descendant), by the triplet loss ``d(a, p) - d(a, n) + margin`` of each candidate:

``semihard``  a random candidate with 0 < loss < margin
``hardest``   the candidate with the largest loss, if positive
``random``    a random candidate with loss > 0

Pairs without a candidate give no triplet. The distance that mines is the distance of the
loss.

``relatives="resolved"`` relaxes the ontology rule where the data resolve it: a study that
labels some cells with a term and others with its descendant (e.g. "CD14-positive monocyte"
and "CD14-low, CD16-positive monocyte") says that its coarser cells are not of the finer
type. So a descendant-labelled cell is a negative of an anchor whose study (in the batch)
uses that descendant's label, and an ancestor-labelled cell is a negative of an anchor whose
label its own study uses. Relatives that no study tells apart stay excluded (SCimilarity's
rule, the default ``"never"``). Instead of SCimilarity's per-pair CPU loop: one sort of each anchor's negatives by
distance, then a binary search per pair (for hardest, one masked row minimum), on the
batch's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["TripletLoss", "Triplets", "mine_triplets", "pairwise_distance"]

Distance = Literal["cosine", "euclidean"]
Negative = Literal["semihard", "hardest", "random"]
Relatives = Literal["never", "resolved"]


def pairwise_distance(z_nk: torch.Tensor, distance: Distance = "cosine") -> torch.Tensor:
    """All pairwise distances of the rows of ``z_nk``: cosine (1 - cos) or euclidean."""
    if distance == "cosine":
        z = nn.functional.normalize(z_nk, dim=1)
        return (1.0 - z @ z.T).clamp_min(0.0)
    if distance == "euclidean":
        sq = (z_nk * z_nk).sum(1)
        return (sq[:, None] + sq[None, :] - 2.0 * z_nk @ z_nk.T).clamp_min(0.0).sqrt()
    raise ValueError(f"distance must be 'cosine' or 'euclidean', not {distance!r}.")


@dataclass
class Triplets:
    """Indices of mined triplets into the batch, and the pairs considered."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    n_pairs: int

    def __len__(self) -> int:
        return len(self.anchor)


def _positive_pairs(
    y_n: torch.Tensor, study_n: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor, positive) index pairs: same label, distinct cells; another study if possible.

    Enumerated label block by label block (work proportional to the number of same-label
    pairs, not n^2), returned ordered by anchor then positive: the binary searches of the
    mining then walk the sorted keys forward, which the cache rewards.
    """
    dev = y_n.device
    cells = torch.nonzero(y_n >= 0).flatten()
    if len(cells) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty
    y = y_n[cells]
    order = torch.argsort(y, stable=True)
    cells, y = cells[order], y[order]
    counts = torch.bincount(y)
    block = counts[y]  # size of each cell's label block
    starts = torch.cumsum(counts, 0) - counts
    anchor = torch.repeat_interleave(torch.arange(len(y), device=dev), block)
    first = torch.cumsum(block, 0) - block  # where each anchor's pairs begin
    offset = torch.arange(len(anchor), device=dev) - torch.repeat_interleave(first, block)
    a, p = cells[anchor], cells[starts[y[anchor]] + offset]
    keep = a != p
    if study_n is not None:
        s = study_n.long()
        n_studies = int(s.max().item()) + 1
        per_label_study = torch.bincount(
            y * n_studies + s[cells], minlength=len(counts) * n_studies
        )
        has_cross = block > per_label_study[y * n_studies + s[cells]]  # label seen in another study
        keep &= ~has_cross[anchor] | (s[a] != s[p])
    a, p = a[keep], p[keep]
    order = torch.argsort(a, stable=True)  # p ascends within a label block already
    return a[order], p[order]


_INDEX_BITS = 16  # cells per batch < 2**16
_MAX_CELLS = (1 << _INDEX_BITS) - 1
_ROW_SHIFT = _INDEX_BITS + 31  # above the cell index and a non-negative float32's 31 bits


def _float_key(x: torch.Tensor) -> torch.Tensor:
    """The bits of non-negative float32 values as int64: they order like the floats."""
    return (x.float().clamp_min(0.0) + 0.0).view(torch.int32).long()  # + 0.0 turns -0 into +0


def _sorted_negative_keys(d_nn: torch.Tensor, allowed_nn: torch.Tensor) -> torch.Tensor:
    """Each anchor's negatives by distance as one monotone int64 array of n * n keys.

    Key = row << 47 (_ROW_SHIFT) | distance bits << 16 | cell: sorting a row sorts by distance (ties by
    cell), disallowed negatives (distance inf) last; rows concatenated stay sorted. On the CPU
    numpy's SIMD sort does the work (several times faster than ``torch.sort`` there).
    """
    n = d_nn.shape[0]
    dist = d_nn.float().clamp_min(0.0).masked_fill_(~allowed_nn, float("inf")).add_(0.0)
    keys = dist.view(torch.int32).long()  # the one n x n int64 buffer, then built in place
    cells = torch.arange(n, device=d_nn.device)
    keys.bitwise_left_shift_(_INDEX_BITS).bitwise_or_(cells[None, :]).bitwise_or_(
        cells[:, None] << _ROW_SHIFT
    )
    if keys.device.type == "cpu":
        keys.numpy().sort(axis=1)
    else:
        keys = torch.sort(keys, dim=1).values
    return keys.flatten()


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

    ``hardest``: the largest loss is the anchor's nearest allowed negative's, so a masked
    row minimum serves every pair. ``semihard`` and ``random``: each anchor's allowed
    negatives are sorted once by distance; a pair's candidates are then a window of that order
    (``d(a,p) < d(a,n) < d(a,p) + margin`` for semihard, below ``d(a,p) + margin`` for
    random), found by binary search, and a uniform draw within it picks the negative. Work:
    one n x n sort and O(log n) per pair; positive pairs are enumerated per label block.

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
    if negative not in ("semihard", "hardest", "random"):
        raise ValueError(f"negative must be semihard, hardest or random, not {negative!r}.")
    dev = z_nk.device
    with torch.no_grad():
        d = (pairwise_distance(z_nk, distance) if dist_nn is None else dist_nn).detach().float()
        y = y_n.long().to(dev)
        n = len(y)
        a, p = _positive_pairs(y, study_n.to(dev) if study_n is not None else None)
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        if len(a) == 0:
            return Triplets(empty, empty, empty, 0)
        if n > _MAX_CELLS:
            raise ValueError(f"triplet mining takes at most {_MAX_CELLS} cells a batch, not {n}.")
        n_labels = int(y.max().item()) + 1
        if related_ll is None:
            related_ll = torch.eye(n_labels, dtype=torch.bool, device=dev)
        allowed = _allowed_negatives(related_ll.to(dev), y)
        if ancestor_ll is not None and study_n is not None:
            allowed |= _resolved_relatives(ancestor_ll.to(dev), y, study_n.long().to(dev))
        d_ap = d[a, p]
        upper = d_ap + margin
        if negative == "hardest":  # the largest loss is the nearest negative's
            d_min, nearest = d.masked_fill(~allowed, float("inf")).min(1)
            keep = d_min[a] < upper
            return Triplets(a[keep], p[keep], nearest[a][keep], len(a))
        keys = _sorted_negative_keys(d, allowed)
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
        keep = count > 0
        u = torch.rand(len(a), generator=generator, device=dev, dtype=torch.float64)
        pick = lo + (u * count.clamp_min(1)).long().clamp_max((count - 1).clamp_min(0))
        neg = keys[a * n + pick.clamp(0, n - 1)] & _MAX_CELLS
        return Triplets(a[keep], p[keep], neg[keep], len(a))


def _allowed_negatives(related_ll: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """n x n: may cell j be a negative of anchor i (labelled, not related to i's label)."""
    labelled = y >= 0
    yc = y.clamp_min(0)
    if y.device.type == "cpu":  # numpy's fancy indexing is several times faster here
        rel = related_ll.numpy()[yc.numpy()][:, yc.numpy()]
        return torch.from_numpy(~rel) & labelled[None, :]
    return ~related_ll[yc][:, yc] & labelled[None, :]


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
    known = (y_n >= 0) & (study_n >= 0)
    n_studies = int(study_n.max().item()) + 1 if known.any() else 1
    used = torch.zeros(n_studies, n_labels, dtype=torch.bool, device=y_n.device)
    used[study_n[known], y_n[known]] = True
    return used[study_n.clamp_min(0)] & (study_n >= 0)[:, None]


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

    def forward(
        self,
        z_nk: torch.Tensor,
        y_n: torch.Tensor,
        study_n: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, Triplets]:
        d = pairwise_distance(z_nk, self.distance)
        t = mine_triplets(
            z_nk,
            y_n,
            self.related_ll,
            study_n,
            margin=self.margin,
            negative=self.negative,
            distance=self.distance,
            dist_nn=d.detach(),
            generator=generator,
            ancestor_ll=self.ancestor_ll,
        )
        if len(t) == 0:
            return z_nk.sum() * 0.0, t
        loss = (d[t.anchor, t.positive] - d[t.anchor, t.negative] + self.margin).clamp_min(0.0)
        return loss.mean(), t
