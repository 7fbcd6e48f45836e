"""scanpy-style tools: ``cellsift.tl.embed`` and ``cellsift.tl.annotate`` on AnnData.

import cellsift as cs
cs.tl.embed(adata, model)                       # obsm["X_cellsift"]
cs.tl.annotate(adata, index, model=model)       # obs["cellsift_cell_type"], ...
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np

from .tasks import CellIndex, KNNAnnotator

__all__ = ["annotate", "embed"]


def embed(
    adata: ad.AnnData,
    model: Any,
    *,
    layer: str | None = None,
    batch_size: int = 4096,
    key_added: str = "X_cellsift",
    device: str | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Embed raw counts (``adata.X`` or ``layers[layer]``) with ``model`` into
    ``obsm[key_added]``; genes are aligned to the model's with an overlap report."""
    adata = adata.copy() if copy else adata
    adata.obsm[key_added] = model.embed(adata, layer=layer, batch_size=batch_size, device=device)
    return adata if copy else None


def annotate(
    adata: ad.AnnData,
    reference: CellIndex | KNNAnnotator,
    *,
    model: Any = None,
    use_rep: str = "X_cellsift",
    label_key: str = "cell_type_ontology_term_id",
    k: int = 50,
    weighted: bool = True,
    ontology_aware: bool = True,
    min_support: float = 0.5,
    abstain: bool = True,
    safelist: list[str] | None = None,
    blocklist: list[str] | None = None,
    key_added: str = "cellsift",
    copy: bool = False,
) -> ad.AnnData | None:
    """Annotate cells by their nearest reference cells.

    Embeds with ``model`` first when ``obsm[use_rep]`` is absent. Writes
    ``obs[f"{key_added}_cell_type"]`` (Cell Ontology name, or ``unknown``),
    ``obs[f"{key_added}_cell_type_ontology_term_id"]``, ``obs[f"{key_added}_confidence"]``
    and ``obs[f"{key_added}_min_distance"]``. ``reference`` is a :class:`CellIndex` (an
    annotator is made with the options here, its abstention threshold calibrated on the
    reference when ``abstain``) or a ready :class:`KNNAnnotator`.
    """
    adata = adata.copy() if copy else adata
    if use_rep not in adata.obsm:
        if model is None:
            raise ValueError(f"obsm[{use_rep!r}] is absent: pass model= to embed the cells first.")
        embed(adata, model, key_added=use_rep)
    if isinstance(reference, KNNAnnotator):
        ann = reference
    else:
        ann = KNNAnnotator(
            reference,
            label_key=label_key,
            k=k,
            weighted=weighted,
            ontology_aware=ontology_aware,
            min_support=min_support,
        )
        if abstain:
            ann.calibrate()
    out = ann.annotate(np.asarray(adata.obsm[use_rep]), safelist=safelist, blocklist=blocklist)
    out.index = adata.obs_names
    adata.obs[f"{key_added}_cell_type"] = out["label_name"].astype("category")
    adata.obs[f"{key_added}_cell_type_ontology_term_id"] = out["label"].astype("category")
    adata.obs[f"{key_added}_confidence"] = out["confidence"].to_numpy()
    adata.obs[f"{key_added}_min_distance"] = out["min_distance"].to_numpy()
    return adata if copy else None
