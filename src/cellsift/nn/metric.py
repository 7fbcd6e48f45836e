"""The metric-learning module (SCimilarity's): encoder + decoder, triplet + reconstruction loss.

A pure ``nn.Module`` on batch dicts: counts ``x_ng`` are normalised on the batch's device
(counts per ``target_sum``, log1p), embedded (L2-normalised ``z_nk``) and reconstructed;
``loss = triplet_weight * triplet + (1 - triplet_weight) * MSE(reconstruction, input)``.
Triplets are mined on the device with the Cell Ontology relatives of each label excluded
from its negatives (``related_ll``).

With ``classifier_weight > 0`` a cosine label head on the embedding (one unit prototype per
label; logits ``16 * cos(z, prototype)``, so labels become directions that kNN on the sphere
also reads) adds an ontology-aware cross-entropy (scPRINT's label heads, flattened to the
training label set): a cell's label is credited with the probability of that label and of
all its descendants in the set, so a cell labelled "monocyte" is satisfied by any monocyte
subtype while a "CD14-positive monocyte" must be told from its siblings. A descendant
that the cell's own study uses as a label (read from the batch, as ``relatives="resolved"``
mining does; without study codes the batch counts as one study) is not credited, nor any
label below it: a study that labels cells "CD14-positive monocyte" and others "CD14-low,
CD16-positive monocyte" (a CL descendant) means the first are not the second, nor of its
subtypes (credited, the head could call every CD14-positive monocyte CD16-positive at no
cost). Only the label's own descendants are read so: a label the study uses beside it that
is neither ancestor nor descendant ("CD4-positive T cell" beside "memory T cell") says less,
as the study's cells of one may include the other's, and what lies below both stays
credited. (``relatives="resolved"`` mining frees the told-apart label itself as a negative
and keeps what lies below it excluded, the cautious side.) Then ``loss = triplet_weight * triplet +
classifier_weight * label + (1 - triplet_weight - classifier_weight) * MSE``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .._utils import as_float, is_number, is_whole
from ..errors import ConfigError
from ..losses import TripletLoss
from ..losses.triplet import Distance, Negative, Relatives, study_uses_label
from ..transforms import Densify, Log1p, NormalizeTotal
from .mlp import MLPDecoder, MLPEncoder

__all__ = ["MetricModule"]


class CosineClassifier(nn.Module):
    """Logits ``scale * cos(z, w_l)`` of unit embeddings against one prototype per label."""

    def __init__(self, latent: int, n_labels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_labels, latent) / latent**0.5)
        self.scale = scale

    def forward(self, z_nk: torch.Tensor) -> torch.Tensor:
        return (
            self.scale
            * nn.functional.normalize(z_nk, dim=1)
            @ nn.functional.normalize(self.weight, dim=1).T
        )


def hidden_widths(hidden: Any) -> list[Any]:
    """``hidden`` as a list, or a :class:`ConfigError` where it is no list of widths."""
    if isinstance(hidden, str) or not isinstance(hidden, Iterable):
        raise ConfigError(
            f"hidden lists the widths of the hidden layers, e.g. [1024, 1024, 1024] (one "
            f"layer: [{hidden!r}]), not {hidden!r}."
        )
    return list(hidden)


def _check_number(name: str, value: Any) -> None:
    """A :class:`ConfigError` where a setting ``name`` is no real number (a text "0.5", or
    True, which Python would read as 1), rather than a TypeError of a comparison or a
    boolean taken for a weight."""
    if not is_number(value, nan=True):  # (NaN: each setting's own range check says why)
        raise ConfigError(f"{name} is a number, not {value!r} ({type(value).__name__}).")


def _check_settings(
    n_genes: int,
    hidden: Sequence[int],
    latent: int,
    dropout: float,
    input_dropout: float,
    margin: float,
    target_sum: float,
) -> None:
    """A :class:`ConfigError` naming the first setting that cannot make a model (a zero-wide
    layer, a dropout of 1 or more, a negative margin, a total of 0 that makes every cell
    alike), rather than a torch error deep in construction or a model that trains to
    nothing."""

    for name, v in (
        ("dropout", dropout),
        ("input_dropout", input_dropout),
        ("margin", margin),
        ("target_sum", target_sum),
    ):
        _check_number(name, v)
    hidden = hidden_widths(hidden)
    if not is_whole(n_genes) or n_genes < 2:
        raise ConfigError(
            f"a model reads at least two genes, not n_genes={n_genes!r}: each cell's counts "
            "are scaled to the same total, so one gene alone is the same in every cell "
            "that has counts, and every cell would embed alike."
        )
    if not hidden or any(not is_whole(h) or h < 1 for h in hidden):
        raise ConfigError(
            f"hidden lists the widths of at least one layer, each a positive whole number, "
            f"not {hidden!r} (SCimilarity: [1024, 1024, 1024])."
        )
    if not is_whole(latent) or latent < 2:
        raise ConfigError(
            f"latent is the embedding's width, at least 2, not {latent!r}: embeddings are "
            "scaled to unit length, which in one dimension leaves each cell at -1 or 1."
        )
    for name, p in (("dropout", dropout), ("input_dropout", input_dropout)):
        if not 0.0 <= p < 1.0:  # (NaN fails too)
            raise ConfigError(f"{name} is a probability in [0, 1), not {p!r}.")
    # (as floats: Python compares a whole number beyond float's range, 10**400, as below inf)
    if not 0.0 <= as_float(margin) < float("inf"):
        raise ConfigError(
            f"margin is a finite distance, at least 0, not {margin!r} (SCimilarity: 0.05)."
        )
    if not 0.0 < as_float(target_sum) < float("inf"):
        raise ConfigError(
            f"target_sum is the counts per cell after normalisation, above 0, not "
            f"{target_sum!r} (default 1e4)."
        )


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
        ``ancestor_ll`` (``[i, j]``: label j a strict ancestor of label i) is also what the
        label head credits descendants by: without it the label loss is a plain
        cross-entropy (:class:`~cellsift.models.MetricModel` always passes it).
    margin, negative, distance
        Triplet mining and loss (SCimilarity: 0.05, semihard).
    triplet_weight
        Weight of the triplet loss; reconstruction gets ``1 - triplet_weight`` (SCimilarity:
        0.001).
    classifier_weight
        Weight of the ontology-aware label loss (module docstring; default 0: no head, as in
        SCimilarity). Reconstruction gets what the two weights leave.
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
        classifier_weight: float = 0.0,
        target_sum: float = 1e4,
    ) -> None:
        super().__init__()
        _check_settings(n_genes, hidden, latent, dropout, input_dropout, margin, target_sum)
        _check_number("triplet_weight", triplet_weight)
        _check_number("classifier_weight", classifier_weight)
        if not 0.0 <= triplet_weight <= 1.0:
            raise ConfigError(f"triplet_weight must lie in [0, 1], not {triplet_weight:g}.")
        # (within rounding: 0.07 + 0.93 is above 1 in floats)
        if not 0.0 <= classifier_weight <= 1.0 - triplet_weight + 1e-9:
            raise ConfigError(
                f"classifier_weight must lie in [0, 1 - triplet_weight] = [0, "
                f"{1.0 - triplet_weight:g}], not {classifier_weight:g}."
            )
        self.normalize = nn.Sequential(NormalizeTotal(target_sum), Log1p(), Densify())
        self.encoder = MLPEncoder(
            n_genes, hidden, latent, dropout=dropout, input_dropout=input_dropout
        )
        self.decoder = MLPDecoder(n_genes, hidden, latent, dropout=dropout)
        self.triplet = TripletLoss(margin, negative, distance, related_ll, relatives, ancestor_ll)
        self.triplet_weight, self.classifier_weight = triplet_weight, classifier_weight
        self.classifier: CosineClassifier | None = None
        if classifier_weight > 0:
            if related_ll is None:
                raise ValueError("classifier_weight > 0 needs the label set (related_ll).")
            n_labels = related_ll.shape[0]
            if n_labels == 0:
                raise ConfigError(
                    "a label head (classifier_weight > 0) calls one of the model's labels, "
                    "and it has none: give the labels, or classifier_weight=0."
                )
            self.classifier = CosineClassifier(latent, n_labels)
            # [l, m]: a cell labelled l is credited with label m's probability (m is l or a
            # descendant of l)
            credit = torch.eye(n_labels, dtype=torch.bool)
            if ancestor_ll is not None:
                credit |= ancestor_ll.bool().T
            self.register_buffer("credit_ll", credit)

    def _inputs(self, batch: dict[str, Any], dense: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised counts for the encoder (sparse where it reads them so:
        :meth:`MLPEncoder.reads_sparse`), and densified (when ``dense``, else the same)."""
        *scale, densify = self.normalize  # NormalizeTotal, Log1p; then Densify
        for transform in scale:
            batch = transform(batch)
        x = batch["x_ng"]
        if self.encoder.reads_sparse(x):
            return x, densify(batch)["x_ng"] if dense else x
        x = densify(batch)["x_ng"]
        return x, x

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        """L2-normalised embeddings ``z_nk`` of a batch of counts."""
        return self.encoder(self._inputs(batch, dense=False)[0])

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        x, x_dense = self._inputs(batch, dense=True)
        z = self.encoder(x)
        recon = nn.functional.mse_loss(self.decoder(z), x_dense)
        out: dict[str, Any] = {"z_nk": z, "recon_loss": recon}
        if "y_n" in batch:
            triplet, mined = self.triplet(z, batch["y_n"], batch.get("study_n"))
            out["triplet_loss"], out["n_triplets"] = triplet, len(mined)
        else:
            triplet = recon.new_zeros(())
        w, wc = self.triplet_weight, self.classifier_weight
        label = recon.new_zeros(())
        if self.classifier is not None and "y_n" in batch:
            label = self.label_loss(self.classifier(z), batch["y_n"], batch.get("study_n"))
            out["label_loss"] = label
        out["loss"] = w * triplet + wc * label + max(1.0 - w - wc, 0.0) * recon
        return out

    def label_loss(
        self, logits_nl: torch.Tensor, y_n: torch.Tensor, study_n: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean ``-log P(label or a credited descendant)`` over labelled cells (0 when none).

        Descendants that the cell's study (``study_n``; without it, the batch) uses in the
        batch are not credited (module docstring), whatever the triplets' ``relatives``.
        """
        known = y_n >= 0
        # (in float32 under autocast too, as its cross-entropy computes it: bf16 logsumexps
        # are off by about 0.1%)
        logits_nl = logits_nl.to(torch.promote_types(logits_nl.dtype, torch.float32))
        if not bool(known.any()):
            return logits_nl.sum() * 0.0
        logits, y = logits_nl[known], y_n[known].long()
        credit_ll: torch.Tensor = self.credit_ll  # type: ignore[assignment]
        credit = credit_ll[y]
        study = torch.zeros_like(y) if study_n is None else study_n[known].long()
        told_apart = study_uses_label(y, study, credit.shape[1])
        own = nn.functional.one_hot(y, credit.shape[1]).bool()
        # a descendant the study tells apart is not credited, nor anything below it (a cell
        # that is not CD4-positive is no CD4-positive memory cell either)
        apart = told_apart & credit & ~own
        below = (apart.to(logits.dtype) @ credit_ll.to(logits.dtype)) > 0
        credit = credit & (~below | own)
        credited = logits.masked_fill(~credit, float("-inf"))
        return (torch.logsumexp(logits, 1) - torch.logsumexp(credited, 1)).mean()

    def predict_proba(self, batch: dict[str, Any]) -> torch.Tensor:
        """Label probabilities ``p_nl`` of the label head (needs ``classifier_weight > 0``)."""
        if self.classifier is None:
            raise ValueError("this model has no label head; train it with classifier_weight > 0.")
        return torch.softmax(self.classifier(self.embed(batch)), 1)
