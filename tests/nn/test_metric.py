"""MetricModule learns: triplet loss falls and labels separate on a synthetic atlas."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import silhouette_score

from cellsift.data import CellCollection, CellLoader, IterableCellDataset
from cellsift.nn import MetricModule
from cellsift.ontology import load_cell_ontology


def test_training_separates_cell_types(synthetic_h5ad):
    torch.manual_seed(0)
    coll = CellCollection(synthetic_h5ad)
    ds = IterableCellDataset(
        coll,
        mode="block",
        batch_size=256,
        block_size=16,
        fetch_factor=4,
        label_key="cell_type_ontology_term_id",
        study_key="dataset_id",
    )
    labels = ds.categories["y_n"]
    related = torch.from_numpy(load_cell_ontology().related(labels))
    module = MetricModule(coll.n_vars, (64, 64), 16, related_ll=related, triplet_weight=0.5)
    opt = torch.optim.AdamW(module.parameters(), lr=5e-3, weight_decay=0.01)
    loader = CellLoader(ds)
    held = next(
        iter(
            CellLoader(
                IterableCellDataset(
                    coll, mode="sequential", batch_size=1500, label_key="cell_type_ontology_term_id"
                )
            )
        )
    )

    def asw() -> float:
        module.eval()
        with torch.no_grad():
            z = module.embed(held).numpy()
        module.train()
        return float(silhouette_score(z, held["y_n"].numpy(), metric="cosine"))

    before = asw()
    first, last = [], []
    for epoch in range(6):
        for batch in loader:
            out = module(batch)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            (first if epoch == 0 else last).append(float(out["triplet_loss"]))
    assert np.isfinite(first).all() and out["n_triplets"] > 0
    assert np.mean(last[-5:]) < np.mean(first[:5])
    assert asw() > before + 0.05  # cell types separate in the embedding


def test_forward_without_labels_reconstructs_only(synthetic_h5ad):
    coll = CellCollection(synthetic_h5ad)
    batch = next(iter(CellLoader(IterableCellDataset(coll, mode="sequential", batch_size=32))))
    module = MetricModule(coll.n_vars, (16,), 8)
    out = module(batch)
    assert "triplet_loss" not in out
    torch.testing.assert_close(out["loss"], 0.999 * out["recon_loss"])
    torch.testing.assert_close(out["z_nk"].norm(dim=1), torch.ones(32))
