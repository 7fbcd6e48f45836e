"""Query coherence: does a set of query cells describe one population or several?

A centroid search (SCimilarity's) embeds the mean profile of a set of cells and returns the
cells nearest it. When the set mixes populations, its centroid can sit between them, and the
hits then describe none of them. The check: split the query cells' embeddings in a few
clusters (spherical k-means), search with the mean embedding of each cluster and of the
whole set, and measure how many of the whole set's hits each cluster finds too. The
clusters of one population find mostly the same cells (on clustered test embeddings with
3 clusters: overlap 0.7-0.9 for k = 50-200); those of a 50/50 mix of two populations find
their own population's cells (0.1-0.3). Below 0.5 the check warns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .._warnings import warn
from .index import CellIndex, FilterLike, normalize_embeddings

__all__ = ["QueryCoherence", "query_coherence"]

#: Below this coherence the check warns that the query cells are heterogeneous.
MIN_COHERENCE = 0.5


@dataclass
class QueryCoherence:
    """Result of :func:`query_coherence`.

    Attributes
    ----------
    coherence
        Mean over the query cells of their cluster's overlap (cluster-size weighted).
    clusters
        One row per cluster: ``cells`` (query cells in it) and ``overlap`` (the fraction of
        the whole set's hits that the cluster's own centroid search also returns).
    cluster_n
        Each query cell's cluster.
    """

    coherence: float
    clusters: pd.DataFrame
    cluster_n: np.ndarray

    @property
    def coherent(self) -> bool:
        return self.coherence >= MIN_COHERENCE


def query_coherence(
    index: CellIndex,
    cells: Any,
    k: int = 100,
    *,
    n_clusters: int = 3,
    min_cluster_cells: int = 5,
    filter: FilterLike | None = None,
    seed: int = 0,
    warn_below: float | None = MIN_COHERENCE,
) -> QueryCoherence:
    """How consistently the subpopulations of a query set find the set's nearest cells.

    Parameters
    ----------
    index
        The index searched.
    cells
        Embeddings of the query cells (cells x dims).
    k
        Hits per search.
    n_clusters
        Clusters of the query cells, at most one per ``min_cluster_cells`` cells.
    filter
        Metadata filter of the searches (as the set's search).
    warn_below
        Warn when the coherence is below this (None: never).
    """
    import faiss

    z = normalize_embeddings(np.atleast_2d(cells), "query cells")
    if len(z) == 0:
        raise ValueError("no query cells: pass at least one embedding.")
    whole = index.search(z.mean(0, keepdims=True), k, filter=filter).indices[0]
    whole = set(whole[whole >= 0].tolist())
    if not whole:
        raise ValueError("the set's search found no cells; nothing to compare against.")
    n_cl = int(max(1, min(n_clusters, len(z) // max(min_cluster_cells, 1))))
    if n_cl > 1:
        km = faiss.Kmeans(
            z.shape[1],
            n_cl,
            niter=25,
            seed=seed,
            spherical=True,
            min_points_per_centroid=1,  # few cells are fine: the clusters are only compared
        )
        km.train(z)
        cluster = km.index.search(z, 1)[1][:, 0]
    else:
        cluster = np.zeros(len(z), dtype=np.int64)
    ids = np.unique(cluster)
    centroids = np.stack([z[cluster == c].mean(0) for c in ids])
    found = index.search(centroids, len(whole), filter=filter).indices
    overlap = np.array(
        [len(whole.intersection(row[row >= 0].tolist())) / len(whole) for row in found]
    )
    sizes = np.array([(cluster == c).sum() for c in ids])
    coherence = float((overlap * sizes).sum() / sizes.sum())
    clusters = pd.DataFrame(
        {"cells": sizes, "overlap": overlap}, index=pd.Index(ids, name="cluster")
    )
    if warn_below is not None and coherence < warn_below:
        warn(
            f"the query cells look heterogeneous (coherence {coherence:.2f} < {warn_below}): "
            f"their {len(ids)} clusters find different cells than the whole set, so its "
            "centroid may sit between populations; search the clusters separately "
            "(cellsift.tl.search_clusters)."
        )
    remap = np.searchsorted(ids, cluster)
    return QueryCoherence(coherence, clusters.reset_index(drop=True), remap)
