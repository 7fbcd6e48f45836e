"""The same results on an accelerator as on the CPU: transforms, embedding, label calls,
bundles, training, exact search. (Mining on the accelerator: tests/losses/test_triplet.py.)

Marked ``gpu``; the accelerator is ``CELLSIFT_TEST_DEVICE`` (default ``cuda``), and the tests
skip where it is absent. ``CELLSIFT_TEST_DEVICE=cpu`` runs them on the CPU alone.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from cellsift.data.loader import to_torch_csr
from cellsift.models import MetricModel
from cellsift.tasks import CellIndex
from cellsift.transforms import default_pipeline
from conftest import TEST_DEVICE, device_available, train_without

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not device_available(), reason=f"needs {TEST_DEVICE}"),
]

#: Lightning's accelerator name for the test device
ACCELERATOR = {"cuda": "gpu"}.get(torch.device(TEST_DEVICE).type, torch.device(TEST_DEVICE).type)


def _close_rows(a: np.ndarray, b: np.ndarray) -> None:
    """Unit rows that agree to matrix-product rounding (TF32 where a GPU allows it)."""
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-4)
    assert (a * b).sum(1).min() > 0.9999  # cosine between the two runs' embeddings of a cell
    np.testing.assert_allclose(a, b, atol=1e-2)


@pytest.fixture(scope="module")
def adata(synthetic_h5ad):
    return ad.read_h5ad(synthetic_h5ad)


def test_transforms_match_the_cpu(adata):
    x = adata.X.tocsr().copy()
    x[11] = 0  # an empty cell stays zero
    x.eliminate_zeros()
    out = default_pipeline().to(TEST_DEVICE)({"x_ng": to_torch_csr(x).to(TEST_DEVICE)})["x_ng"]
    ref = default_pipeline()({"x_ng": to_torch_csr(x)})["x_ng"]  # the CPU's: scanpy's values
    np.testing.assert_allclose(out.cpu().numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    assert out[11].abs().sum() == 0


def test_embedding_label_calls_and_bundle_match_the_cpu(synthetic_h5ad, adata, tmp_path):
    torch.manual_seed(0)
    model = MetricModel.from_collection(
        synthetic_h5ad, hidden=(128, 64), latent=16, classifier_weight=0.2, triplet_weight=0.1
    )
    z_cpu = model.embed(adata, device="cpu")
    p_cpu = model.predict(adata, device="cpu").attrs["probabilities"]
    # the CPU's first layer reads the stored counts (a compiled kernel); a GPU's densifies
    z_dev = model.embed(adata, device=TEST_DEVICE)
    p_dev = model.predict(adata, device=TEST_DEVICE).attrs["probabilities"]
    _close_rows(z_dev, z_cpu)
    np.testing.assert_allclose(p_dev, p_cpu, atol=1e-3)
    again = MetricModel.load(model.save(tmp_path / "bundle"), device=TEST_DEVICE)
    assert next(again.module.parameters()).device.type == torch.device(TEST_DEVICE).type
    _close_rows(again.embed(adata), z_cpu)  # on the device it was loaded to


@pytest.mark.parametrize(
    "precision, compile",
    [("32-true", False), ("bf16-mixed", False), ("bf16-mixed", True)],
)
def test_training_on_the_device_separates_a_held_out_study(
    synthetic_h5ad, adata, tmp_path, precision, compile
):
    if precision == "bf16-mixed" and TEST_DEVICE.startswith("cuda"):
        if not torch.cuda.is_bf16_supported():
            pytest.skip("this GPU has no bf16")
    held = "study_03"
    torch.manual_seed(0)
    model = MetricModel.from_collection(
        synthetic_h5ad, hidden=(128, 64), latent=16, triplet_weight=0.1
    )
    dm = train_without(
        model,
        synthetic_h5ad,
        held,
        tmp_path,
        max_epochs=8,
        val_fraction=0.15,
        split_key="donor_id",
        trainer={"accelerator": ACCELERATOR, "precision": precision, "compile": compile},
    )
    cuda = torch.device(TEST_DEVICE).type == "cuda"
    assert dm.train_dataloader().pin_memory == cuda  # batches pinned for the copy to a GPU
    assert model.trainer is not None
    metrics = model.trainer.callback_metrics
    assert np.isfinite(float(metrics["train/loss_epoch"]))
    assert float(metrics["train/n_triplets_epoch"]) > 0
    assert "val/asw" in metrics
    test = (adata.obs["dataset_id"] == held).to_numpy()
    y = adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy()

    def knn_accuracy(z: np.ndarray) -> float:
        knn = KNeighborsClassifier(15, metric="cosine").fit(z[~test], y[~test])
        return float((knn.predict(z[test]) == y[test]).mean())

    torch.manual_seed(0)
    untrained = MetricModel.from_collection(synthetic_h5ad, hidden=(128, 64), latent=16)
    z = model.embed(adata, device="cpu")  # a model trained there embeds here
    assert knn_accuracy(z) > knn_accuracy(untrained.embed(adata)) + 0.1


def test_exact_search_on_the_device_is_brute_force():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32))
    x = (centers[rng.integers(0, 40, 20_000)] + 0.6 * rng.normal(size=(20_000, 32))).astype(
        np.float32
    )
    q = (x[::200] + 0.05 * rng.normal(size=(100, 32))).astype(np.float32)
    index = CellIndex.build(x, pd.DataFrame({"i": np.arange(len(x))}), engine="exact")
    res = index.search(q, 20, device=TEST_DEVICE)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = 1.0 - qn.astype(np.float64) @ xn.T.astype(np.float64)
    want = np.sort(d, axis=1)[:, :20]
    np.testing.assert_allclose(res.distances, want, atol=2e-3)  # TF32 rounding at most
    got_d = np.take_along_axis(d, res.indices, 1)
    np.testing.assert_allclose(got_d, want, atol=2e-3)  # the hits are the nearest cells
    assert (np.diff(res.distances, axis=1) >= 0).all()
