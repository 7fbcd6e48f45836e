"""Reading a model directory written by the real ``scimilarity`` package (fixture)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cellsift.errors import CellsiftError
from cellsift.models import read_scimilarity
from cellsift.transforms import Log1p, NormalizeTotal

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "scimilarity_tiny"


def test_embeddings_agree_with_scimilarity():
    model = read_scimilarity(FIXTURE)
    counts = torch.from_numpy(np.load(FIXTURE / "input_counts.npy"))
    x = Log1p()(NormalizeTotal(1e4)({"x_ng": counts}))["x_ng"]
    np.testing.assert_allclose(x.numpy(), np.load(FIXTURE / "expected_lognorm.npy"), atol=1e-5)
    with torch.no_grad():
        z = model.encoder(x)
    np.testing.assert_allclose(z.numpy(), np.load(FIXTURE / "expected_embeddings.npy"), atol=1e-5)
    assert model.genes[0] == "ENSG00000000001" and len(model.genes) == 50
    assert model.labels and model.decoder is not None
    with torch.no_grad():
        assert model.decoder(z).shape == (8, 50)


def test_incomplete_directory_is_named(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "m")
    (tmp_path / "m" / "layer_sizes.json").unlink()
    with pytest.raises(CellsiftError, match=r"missing layer_sizes\.json"):
        read_scimilarity(tmp_path / "m")
    (tmp_path / "m" / "layer_sizes.json").write_text("{}")
    (tmp_path / "m" / "gene_order.tsv").write_text("A\nB\n")
    with pytest.raises(CellsiftError, match="lists 2 genes but the encoder takes 50"):
        read_scimilarity(tmp_path / "m")
