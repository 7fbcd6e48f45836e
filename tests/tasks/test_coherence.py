"""Query coherence against brute-force overlaps, on clustered embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsift._warnings import CellsiftWarning
from cellsift.tasks import CellIndex, query_coherence


def _clustered(n_per=400, n_pop=4, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_pop, dim))
    pop = np.repeat(np.arange(n_pop), n_per)
    z = centers[pop] + 0.35 * rng.normal(size=(len(pop), dim))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return z.astype(np.float32), pop


def _top(z_index, q, k):
    return np.argsort(-(z_index @ q), kind="stable")[:k]


def test_one_population_is_coherent_and_overlaps_match_brute_force():
    z, pop = _clustered()
    index = CellIndex.build(z, pd.DataFrame({"pop": pop}), engine="exact")
    rng = np.random.default_rng(1)
    query = z[pop == 0][:60] + 0.05 * rng.normal(size=(60, z.shape[1])).astype(np.float32)
    qc = query_coherence(index, query, k=50)
    assert qc.coherent and qc.coherence > 0.6 and len(qc.clusters) == 3
    # every cluster's overlap, recomputed by brute force from the returned clusters
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    c = qn.mean(0)
    whole = set(_top(z, c / np.linalg.norm(c), 50).tolist())
    for cl, row in qc.clusters.iterrows():
        m = qn[qc.cluster_n == cl].mean(0)
        got = set(_top(z, m / np.linalg.norm(m), 50).tolist())
        assert row["overlap"] == pytest.approx(len(whole & got) / 50)
        assert row["cells"] == (qc.cluster_n == cl).sum()
    w = qc.clusters["cells"].to_numpy()
    assert qc.coherence == pytest.approx((qc.clusters["overlap"] * w).sum() / w.sum())
    # coherent by the caller's threshold, as the warning is (hunt232: by 0.4 always)
    above = qc.coherence + 0.01
    with pytest.warns(CellsiftWarning, match="heterogeneous"):
        strict = query_coherence(index, query, k=50, warn_below=above)
    assert strict.coherence == qc.coherence and not strict.coherent
    assert query_coherence(index, query, k=50, warn_below=None).coherent


def test_mixed_populations_are_flagged():
    z, pop = _clustered()
    index = CellIndex.build(z, engine="exact")
    query = np.concatenate([z[pop == 0][:50], z[pop == 2][:50]])
    with pytest.warns(CellsiftWarning, match="heterogeneous"):
        qc = query_coherence(index, query, k=50)
    assert not qc.coherent and qc.coherence < 0.3
    # the clusters split the two populations
    for cl in np.unique(qc.cluster_n):
        members = np.flatnonzero(qc.cluster_n == cl)
        assert len(set((members >= 50).tolist())) == 1


def test_small_sets_and_errors():
    z, _pop = _clustered(n_per=50)
    index = CellIndex.build(z, engine="exact")
    qc = query_coherence(index, z[:3], k=10)  # too few cells to split: one cluster
    assert len(qc.clusters) == 1 and qc.coherence == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no query cells"):
        query_coherence(index, np.zeros((0, z.shape[1]), dtype=np.float32))
    # (hunt247) a number of clusters below 1 was one cluster (coherence 1.0, coherent) for
    # any set; hits outside the index counted against the clusters, fractions were cut to
    # a cell, and the search's result itself failed on a comparison
    for key, value in (
        ("n_clusters", 0),
        ("n_clusters", -2),
        ("n_clusters", 2.5),
        ("min_cluster_cells", 0),
        ("min_cluster_cells", True),
    ):
        with pytest.raises(ValueError, match=rf"{key} must be a whole number >= 1, not"):
            query_coherence(index, z[:30], k=10, **{key: value})
    query = z[:30]  # (one population)
    with pytest.raises(ValueError, match=r"0 to 199 \(-1: no cell\), not 1000"):
        query_coherence(index, query, k=10, hits=np.array([1000, 3]))
    with pytest.raises(ValueError, match=r"positions \(integers\), not float64"):
        query_coherence(index, query, k=10, hits=np.array([1.7, 3.0]))
    found = index.search(query.mean(0, keepdims=True), 10)
    with pytest.raises(ValueError, match=r"result\.indices\[0\]\), not the SearchResult"):
        query_coherence(index, query, k=10, hits=found)
    given = query_coherence(index, query, k=10, hits=np.append(found.indices[0], -1))
    assert given.coherence == query_coherence(index, query, k=10).coherence > 0.5  # (-1: none)


def test_given_hits_and_cluster_queries_are_what_is_compared():
    z, pop = _clustered()
    index = CellIndex.build(z, engine="exact")
    query = z[pop == 1][:40]
    centre = z[pop == 3].mean(0)
    hits = _top(z, centre, 50)  # another population's cells: nothing in common
    with pytest.warns(CellsiftWarning, match="heterogeneous"):
        qc = query_coherence(index, query, k=50, hits=hits)
    assert qc.coherence == 0
    seen = []

    def embed_clusters(cluster):  # each cluster's query: population 3's centre
        seen.append(cluster.copy())
        return np.repeat(centre[None], cluster.max() + 1, axis=0)

    qc = query_coherence(index, query, k=50, hits=hits, embed_clusters=embed_clusters)
    np.testing.assert_array_equal(seen[0], qc.cluster_n)
    assert set(seen[0].tolist()) == set(range(len(qc.clusters)))
    np.testing.assert_allclose(qc.clusters["overlap"], 1.0)
    assert qc.coherence == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one embedding per cluster"):
        query_coherence(index, query, k=50, embed_clusters=lambda c: z[:1])


def test_one_set_of_cells_is_one_result_in_any_order():
    """k-means draws its starting centroids by row position: the cells are clustered in an
    order of their values, so the obs order of the same cells changes nothing."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 32))
    pop = np.repeat(np.arange(4), 400)
    z = centers[pop] + 0.9 * rng.normal(size=(len(pop), 32))
    z = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
    index = CellIndex.build(z, engine="exact")
    query = np.concatenate([z[pop == 0][:60], z[pop == 1][:20]])  # a 75/25 mix
    want = query_coherence(index, query, k=50, warn_below=None)
    for seed in range(8):
        order = np.random.default_rng(seed).permutation(len(query))
        got = query_coherence(index, query[order], k=50, warn_below=None)
        assert got.coherence == want.coherence
        pd.testing.assert_frame_equal(got.clusters, want.clusters)
        np.testing.assert_array_equal(got.cluster_n, want.cluster_n[order])
    # nor do rounding-level differences (another batch size, BLAS or device; float64)
    for seed in range(8):
        moved = query.copy()
        flip = np.random.default_rng(100 + seed).random(moved.shape) < 0.3
        moved[flip] = np.nextafter(moved[flip], np.float32(2))
        assert query_coherence(index, moved, k=50, warn_below=None).coherence == want.coherence
    got = query_coherence(index, query.astype(np.float64), k=50, warn_below=None)
    assert got.coherence == want.coherence
