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
