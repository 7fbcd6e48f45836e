"""Validation metrics, vectorised on the device."""

from __future__ import annotations

import torch

from ..losses.triplet import Distance, pairwise_distance

__all__ = ["silhouette"]


def silhouette(
    z_nk: torch.Tensor,
    y_n: torch.Tensor,
    related_ll: torch.Tensor | None = None,
    distance: Distance = "cosine",
) -> torch.Tensor:
    """Mean silhouette of labelled cells; ontology-aware when ``related_ll`` is given.

    ``a`` is a cell's mean distance to the other cells of its label, ``b`` the smallest mean
    distance to the cells of another label, where labels related to its own (ancestor or
    descendant, ``related_ll``) are not counted as other clusters: a CD4 T cell near T cells
    is not penalised. Cells with label < 0 are ignored; singletons score 0 (as scikit-learn).
    A labelled cell's embedding that is not finite (a diverged model) makes the score NaN,
    not a number a checkpoint or early stopping would take for one (unlabelled cells are
    not read). Where every label is related to every other, no cell has another cluster:
    the score is 0. ``related_ll``: labels x labels, any
    dtype whose nonzero entries mark relatives.
    """
    keep = y_n >= 0
    z, y = z_nk[keep], y_n[keep].long()
    labels, y = torch.unique(y, return_inverse=True)
    if len(labels) < 2:
        raise ValueError("the silhouette needs at least two labels.")
    if related_ll is not None:
        related_ll = torch.as_tensor(related_ll).to(z.device).bool()
        size = int(labels.max()) + 1
        if related_ll.ndim != 2 or min(related_ll.shape) < size:
            raise ValueError(
                f"related_ll is {tuple(related_ll.shape)} for label codes up to {size - 1}: "
                "give one row and one column per label code."
            )
    if not torch.isfinite(z).all():
        return torch.tensor(float("nan"))
    # in float64 (where the device has it): a float32 |a|^2 + |b|^2 - 2ab of equal points
    # is a rounding error, whose square root is about 1e-3 |z|
    d = pairwise_distance(z if z.device.type == "mps" else z.double(), distance).double()
    d.fill_diagonal_(0.0)  # (a cell's distance to itself, not float32's rounding of it)
    onehot = torch.nn.functional.one_hot(y, len(labels)).double()
    counts = onehot.sum(0)
    sums = d @ onehot  # cells x labels: total distance to each label
    own = counts[y] - 1
    a = sums[torch.arange(len(y)), y] / own.clamp_min(1)
    mean = sums / counts
    other = ~torch.eye(len(labels), dtype=torch.bool, device=z.device)
    if related_ll is not None:
        other &= ~related_ll[labels][:, labels]
    b = mean.masked_fill(~other[y], float("inf")).min(1).values
    top = torch.maximum(a, b)  # (a = b = 0: 0, as scikit-learn)
    s = torch.where((own > 0) & torch.isfinite(b) & (top > 0), (b - a) / top, 0.0)
    return s.mean().float()
