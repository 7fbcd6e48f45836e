"""Query coherence: does a set of query cells describe one population or several?

A centroid search (SCimilarity's) embeds the mean profile of a set of cells and returns the
cells nearest it. When the set mixes populations, its centroid can sit between them, and the
hits then describe none of them. The check: split the query cells' embeddings in a few
clusters (spherical k-means), search with the mean embedding of each cluster and of the
whole set, and measure how many of the whole set's hits each cluster finds too. The
clusters of a mix of populations find their own population's cells, and share almost none
of the whole set's hits; those of one population share some, the fewer the larger the
population is against ``k`` (its cells are many equally good hits).

Measured on Kang 2018 PBMC (a MetricModel trained 12 epochs on 7 donors, the eighth donor's
cells as queries, the 7 donors' 6,800 cells indexed, k = 100): single author-labelled types
scored 0.24-0.62 (CD4 T, 1,182 query cells: 0.24; megakaryocytes, 18 cells: 0.04); 50/50
mixes of two of the five large types 0.00-0.05; mixes that include dendritic cells or
megakaryocytes (43 and 18 cells), or CD8 T + NK, 0.10-0.28. Coherence rises with ``k``
(CD4 T: 0.12 at k = 50, 0.38 at k = 200). Below 0.1 the check warns: such a set's
subpopulations find nearly disjoint cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .._warnings import warn
from .index import CellIndex, FilterLike, normalize_embeddings

__all__ = ["QueryCoherence", "query_coherence"]

#: Below this coherence the check warns that the query cells are heterogeneous (set on
#: real data at k = 100: module docstring).
MIN_COHERENCE = 0.1


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
