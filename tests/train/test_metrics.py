from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import silhouette_score

from cellsift.train import silhouette


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_plain_silhouette_matches_sklearn(metric):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (300,), generator=g)
    z = torch.randn(5, 8, generator=g)[y] + 0.8 * torch.randn(300, 8, generator=g)
    want = silhouette_score(z.numpy(), y.numpy(), metric=metric)
    got = silhouette(z, y, distance=metric)
    assert abs(float(got) - want) < 1e-5


def test_ontology_aware_silhouette_ignores_relatives():
    g = torch.Generator().manual_seed(1)
    # labels 0 (T cell) and 1 (CD4 T) overlap; label 2 (B cell) is far away
    centers = torch.tensor([[1.0, 0.0], [1.05, 0.0], [-1.0, 0.0]])
    y = torch.randint(0, 3, (400,), generator=g)
    z = centers[y] + 0.1 * torch.randn(400, 2, generator=g)
    related = torch.eye(3, dtype=torch.bool)
    related[0, 1] = related[1, 0] = True
    plain = float(silhouette(z, y, distance="euclidean"))
    aware = float(silhouette(z, y, related, distance="euclidean"))
    assert aware > plain + 0.3  # T and CD4 T being close is not a fault
    y[:5] = -1
    assert np.isfinite(float(silhouette(z, y, related, distance="euclidean")))


def test_silhouette_of_degenerate_embeddings_matches_sklearn():
    """Cells of two labels at the same points (a = b = 0) and a collapsed embedding (every
    distance 0, self-distances included): scikit-learn's values, not NaN or -0.5."""
    shared = np.array([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]] * 3 + [[1.0, 0, 0]] * 2)
    cases = [
        (shared, np.array([0, 0, 0, 1, 1, 1, 2, 2])),
        (np.ones((6, 3)), np.array([0, 0, 1, 1, 2, 2])),
    ]
    for z, y in cases:
        got = float(silhouette(torch.tensor(z, dtype=torch.float32), torch.tensor(y)))
        assert got == pytest.approx(silhouette_score(z, y, metric="cosine"), abs=1e-6)


def test_euclidean_silhouette_of_equal_points_is_exact_in_float32():
    """Equal points of float32 embeddings far from the origin: distance 0, not the square
    root of float32's rounding of |a|^2 + |b|^2 - 2ab (about 1e-3 |z|)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 10
    z = np.repeat(centres, 5, axis=0).astype(np.float32)
    y = np.repeat(np.arange(3), 5)
    got = float(silhouette(torch.from_numpy(z), torch.from_numpy(y), distance="euclidean"))
    assert got == pytest.approx(silhouette_score(z.astype(np.float64), y), abs=1e-7)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_a_diverged_embedding_scores_nan_not_a_number(metric):
    """One NaN coordinate (a diverged model): the score is NaN, which a checkpoint or early
    stopping that watches it sees, not 0.0 or a plausible value; the euclidean distances of
    a NaN row to the others are NaN, not 0."""
    from cellsift.losses import pairwise_distance

    g = torch.Generator().manual_seed(0)
    y = torch.arange(150) % 3
    z = torch.randn(3, 8, generator=g)[y] * 5 + torch.randn(150, 8, generator=g)
    assert np.isfinite(float(silhouette(z, y, distance=metric)))
    z[7, 2] = float("nan")
    assert np.isnan(float(silhouette(z, y, distance=metric)))
    d = pairwise_distance(z, metric)
    others = torch.arange(150) != 7  # (its distance to itself is 0 as any cell's)
    assert torch.isnan(d[7, others]).all() and torch.isfinite(d[:7, :7]).all()


def test_relatives_of_any_dtype_and_the_wrong_shape():
    """A 0/1 relatives matrix (ints, floats, numpy) reads as the boolean one; one smaller
    than the label codes is an error saying so."""
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 3, (120,), generator=g)
    z = torch.randn(3, 4, generator=g)[y] + 0.3 * torch.randn(120, 4, generator=g)
    related = torch.eye(3, dtype=torch.bool)
    related[0, 1] = related[1, 0] = True
    want = float(silhouette(z, y, related))
    for other in (related.to(torch.uint8), related.long(), related.float(), related.numpy()):
        assert float(silhouette(z, y, other)) == pytest.approx(want, abs=1e-7)
    with pytest.raises(ValueError, match=r"related_ll is \(2, 2\) for label codes up to 2"):
        silhouette(z, y, related[:2, :2])
