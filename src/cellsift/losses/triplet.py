"""Ontology-aware triplet mining and loss, vectorised on the batch's device.

The selection follows SCimilarity's: every anchor-positive pair of a label (positives from
another study whenever the anchor's label has cells there) gets one negative, chosen among
cells whose label is neither the anchor's nor an ontology relative of it (ancestor or
descendant), by the triplet loss ``d(a, p) - d(a, n) + margin`` of each candidate:

``semihard``  a random candidate with 0 < loss < margin
``hardest``   the candidate with the largest loss, if positive
``random``    a random candidate with loss > 0

Pairs without a candidate give no triplet. The distance that mines is the distance of the
loss. Instead of SCimilarity's per-pair CPU loop: one sort of each anchor's negatives by
distance, then a binary search per pair, on the batch's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

__all__ = ["TripletLoss", "Triplets", "mine_triplets", "pairwise_distance"]

Distance = Literal["cosine", "euclidean"]
Negative = Literal["semihard", "hardest", "random"]


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
    """(anchor, positive) index pairs: same label, distinct cells; another study if possible."""
    valid = y_n >= 0
    same = (y_n[:, None] == y_n[None, :]) & valid[:, None] & valid[None, :]
    same.fill_diagonal_(False)
    if study_n is not None:
        cross = same & (study_n[:, None] != study_n[None, :])
        has_cross = cross.any(1, keepdim=True)
        same = torch.where(has_cross, cross, same)
    a, p = torch.nonzero(same, as_tuple=True)
    return a, p


def _sorted_negatives(
    d_nn: torch.Tensor, allowed_nn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each anchor's allowed negatives by distance: (distances, indices), disallowed last (inf).

    On the CPU, distance and index are packed into one int64 key (the bits of a non-negative
    float32 order like the float) and sorted by numpy's SIMD sort, far faster than
    ``torch.sort`` there; elsewhere ``torch.sort``. Ties go to the smaller index.
    """
    masked = d_nn.float().masked_fill(~allowed_nn, float("inf"))
    if masked.device.type != "cpu":
        return torch.sort(masked, dim=1, stable=True)
    n = masked.shape[1]
    bits = masked.numpy().view(np.int32).astype(np.int64)
    keys = (bits << 32) | np.arange(n, dtype=np.int64)[None, :]
    keys.sort(axis=1)
    dist = (keys >> 32).astype(np.int32).view(np.float32)
    return torch.from_numpy(dist), torch.from_numpy(keys & 0xFFFFFFFF)


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
) -> Triplets:
    """Mine triplets of a batch (see the module docstring).

    Each anchor's allowed negatives are sorted by distance once; a pair's candidates are then
    a window of that order (``d(a,p) < d(a,n) < d(a,p) + margin`` for semihard, below
    ``d(a,p) + margin`` otherwise), found by binary search, and a uniform draw within it picks
    the negative (the nearest one for hardest). Work: one n x n sort and O(log n) per pair.

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
    """
    if negative not in ("semihard", "hardest", "random"):
        raise ValueError(f"negative must be semihard, hardest or random, not {negative!r}.")
    dev = z_nk.device
    with torch.no_grad():
        d = (pairwise_distance(z_nk, distance) if dist_nn is None else dist_nn).detach()
        y = y_n.long().to(dev)
        n = len(y)
        n_labels = int(y.max().item()) + 1 if n else 0
        if related_ll is None:
            related_ll = torch.eye(max(n_labels, 1), dtype=torch.bool, device=dev)
        related_ll = related_ll.to(dev)
        allowed = ~related_ll[y.clamp_min(0)][:, y.clamp_min(0)] & (y >= 0)[None, :]
        a, p = _positive_pairs(y, study_n.to(dev) if study_n is not None else None)
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        if len(a) == 0:
            return Triplets(empty, empty, empty, 0)
        sorted_d, sorted_i = _sorted_negatives(d, allowed)
        sorted_d, sorted_i = sorted_d.to(dev), sorted_i.to(dev)
        n_allowed = allowed.sum(1)
        d_ap = d[a, p].double()
        # one monotone 1-d array: row r's distances shifted by r * stride (float64: exact)
        finite = sorted_d[torch.isfinite(sorted_d)]
        stride = (float(finite.max()) if len(finite) else 0.0) + 2.0
        flat = sorted_d.double().nan_to_num(posinf=stride - 1.0)
        flat = (flat + torch.arange(n, device=dev, dtype=torch.float64)[:, None] * stride).flatten()
        base = a.double() * stride
        row0 = a * n
        hi = torch.searchsorted(flat, base + d_ap + margin, right=False) - row0
        hi = torch.minimum(hi, n_allowed[a])
        if negative == "semihard":
            lo = torch.searchsorted(flat, base + d_ap, right=True) - row0
        else:
            lo = torch.zeros_like(hi)
        count = hi - lo
        keep = count > 0
        if negative == "hardest":
            pick = torch.zeros_like(lo)
        else:
            u = torch.rand(len(a), generator=generator, device=dev, dtype=torch.float64)
            pick = lo + (u * count.clamp_min(1)).long().clamp_max((count - 1).clamp_min(0))
        neg = sorted_i[a, pick.clamp(0, n - 1)]
        return Triplets(a[keep], p[keep], neg[keep].long(), len(a))


class TripletLoss(nn.Module):
    """Mean ``relu(d(a, p) - d(a, n) + margin)`` over mined triplets (0 when none).

    Mining and loss share one distance matrix; gradients flow through the loss only.
    """

    def __init__(
        self,
        margin: float = 0.05,
        negative: Negative = "semihard",
        distance: Distance = "cosine",
        related_ll: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.margin, self.negative, self.distance = margin, negative, distance
        if related_ll is not None:
            self.register_buffer("related_ll", related_ll.bool())
        else:
            self.related_ll = None

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
        )
        if len(t) == 0:
            return z_nk.sum() * 0.0, t
        loss = (d[t.anchor, t.positive] - d[t.anchor, t.negative] + self.margin).clamp_min(0.0)
        return loss.mean(), t
