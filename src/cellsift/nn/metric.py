"""The metric-learning module (SCimilarity's): encoder + decoder, triplet + reconstruction loss.

A pure ``nn.Module`` on batch dicts: counts ``x_ng`` are normalised on the batch's device
(counts per ``target_sum``, log1p), embedded (L2-normalised ``z_nk``) and reconstructed;
``loss = triplet_weight * triplet + (1 - triplet_weight) * MSE(reconstruction, input)``.
Triplets are mined on the device with the Cell Ontology relatives of each label excluded
from its negatives (``related_ll``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..losses import TripletLoss
from ..losses.triplet import Distance, Negative, Relatives
from ..transforms import Densify, Log1p, NormalizeTotal
from .mlp import MLPDecoder, MLPEncoder

__all__ = ["MetricModule"]


class MetricModule(nn.Module):
    """Encoder/decoder trained with an ontology-aware triplet loss plus reconstruction.

    Parameters
    ----------
    n_genes, hidden, latent, dropout, input_dropout
        Architecture (SCimilarity's defaults: [1024, 1024, 1024] -> 128, 0.5, 0.4).
    related_ll
        Labels x labels boolean: pairs that must not be negatives (same label or ontology
        relatives); default: the same label only.
    relatives, ancestor_ll
        ``"resolved"``: relatives that a study's own labels tell apart may be negatives
        (needs ``ancestor_ll``; :class:`~cellsift.losses.TripletLoss`). Default ``"never"``.
    margin, negative, distance
        Triplet mining and loss (SCimilarity: 0.05, semihard).
    triplet_weight
        Weight of the triplet loss; reconstruction gets ``1 - triplet_weight`` (SCimilarity:
        0.001).
    target_sum
        Counts per cell after normalisation (before log1p).
    """

    def __init__(
        self,
        n_genes: int,
        hidden: Sequence[int] = (1024, 1024, 1024),
        latent: int = 128,
        *,
        dropout: float = 0.5,
        input_dropout: float = 0.4,
        related_ll: torch.Tensor | None = None,
        relatives: Relatives = "never",
        ancestor_ll: torch.Tensor | None = None,
        margin: float = 0.05,
        negative: Negative = "semihard",
        distance: Distance = "cosine",
        triplet_weight: float = 0.001,
        target_sum: float = 1e4,
    ) -> None:
        super().__init__()
        if not 0.0 <= triplet_weight <= 1.0:
            raise ValueError("triplet_weight must lie in [0, 1].")
        self.normalize = nn.Sequential(NormalizeTotal(target_sum), Log1p(), Densify())
        self.encoder = MLPEncoder(
            n_genes, hidden, latent, dropout=dropout, input_dropout=input_dropout
        )
        self.decoder = MLPDecoder(n_genes, hidden, latent, dropout=dropout)
        self.triplet = TripletLoss(margin, negative, distance, related_ll, relatives, ancestor_ll)
        self.triplet_weight = triplet_weight

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        """L2-normalised embeddings ``z_nk`` of a batch of counts."""
        return self.encoder(self.normalize(batch)["x_ng"])

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        x = self.normalize(batch)["x_ng"]
        z = self.encoder(x)
        recon = nn.functional.mse_loss(self.decoder(z), x)
        out: dict[str, Any] = {"z_nk": z, "recon_loss": recon}
        if "y_n" in batch:
            triplet, mined = self.triplet(z, batch["y_n"], batch.get("study_n"))
            out["triplet_loss"], out["n_triplets"] = triplet, len(mined)
        else:
            triplet = recon.new_zeros(())
        w = self.triplet_weight
        out["loss"] = w * triplet + (1.0 - w) * recon
        return out
