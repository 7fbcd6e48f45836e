"""MetricModule learns: triplet loss falls and labels separate on a synthetic atlas."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
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
            (first if epoch == 0 else last).append(float(out["triplet_loss"].detach()))
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


def _with_label_head(labels: list[str]) -> MetricModule:
    """A small module with a label head over ``labels`` (CL ids), relatives and ancestors
    from the Cell Ontology."""
    cl = load_cell_ontology()
    return MetricModule(
        10,
        (8,),
        4,
        related_ll=torch.from_numpy(cl.related(labels)),
        ancestor_ll=torch.from_numpy(cl.closure(labels)[0]),
        classifier_weight=0.3,
    )


def test_label_loss_credits_a_label_and_its_descendants():
    """The ontology-aware label loss against numpy: -log of the probability summed over the
    cell's label and every label of the set below it in the Cell Ontology (each cell from a
    study of its own: no study labels apart what it is credited with)."""
    cl = load_cell_ontology()
    labels = ["CL:0000576", "CL:0001054", "CL:0002396", "CL:0000236", "CL:0000084"]
    module = _with_label_head(labels)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, len(labels), generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, -1, 0])
    p = torch.softmax(logits, 1).numpy()
    expected = []
    for i, lab in enumerate(y.tolist()):
        if lab < 0:
            continue
        credited = [
            m for m, other in enumerate(labels) if m == lab or labels[lab] in cl.ancestors(other)
        ]
        expected.append(-np.log(p[i, credited].sum()))
    # a monocyte is credited with both monocyte subtypes; CD14+ with CD16+ (a CL descendant)
    assert module.credit_ll[0].tolist() == [True, True, True, False, False]
    assert module.credit_ll[1].tolist() == [False, True, True, False, False]
    got = module.label_loss(logits, y, torch.arange(7))
    np.testing.assert_allclose(float(got), np.mean(expected), rtol=1e-10)
    assert float(module.label_loss(logits, torch.full((7,), -1))) == 0.0


def test_label_loss_is_float32_under_bf16_autocast():
    """Under bf16 autocast (precision="bf16-mixed") the label loss is computed in float32, as
    torch's cross-entropy is (hunt245: in bf16, 6.28125 for 6.27888)."""
    labels = ["CL:0000576", "CL:0001054", "CL:0002396", "CL:0000236", "CL:0000084"]
    module = _with_label_head(labels)
    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(64, len(labels), generator=gen)).bfloat16()
    y = torch.randint(0, len(labels), (64,), generator=gen)
    want = module.label_loss(logits.float(), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = module.label_loss(logits, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (no labelled cell: 0, as float32)
        assert module.label_loss(logits, torch.full((64,), -1)).dtype == torch.float32


def test_label_loss_credits_nothing_below_a_label_the_study_tells_apart():
    """A study labelling cells T cell and others CD4-positive says its T cells are not
    CD4-positive, and so not of a CD4-positive subtype either (one another study uses)."""
    labels = ["CL:0000084", "CL:0000624", "CL:0000897", "CL:0000236"]  # T, CD4, CD4 memory, B
    module = _with_label_head(labels)
    y, study = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1])
    logits = torch.tensor(
        [[-20.0, -20.0, 20.0, -20.0], [0, 5.0, 0, 0], [0, 0, 5.0, 0], [0, 0, 0, 5.0]],
        dtype=torch.float64,
    )
    p = torch.softmax(logits, 1)
    # cell 0 (T, study 0 uses CD4): credited T only; cell 1 (CD4): CD4 and CD4 memory
    want = -(p[0, 0].log() + (p[1, 1] + p[1, 2]).log() + p[2, 2].log() + p[3, 3].log()) / 4
    torch.testing.assert_close(module.label_loss(logits, y, study), want)


def test_loss_adds_the_weighted_label_loss(synthetic_h5ad):
    coll = CellCollection(synthetic_h5ad)
    ds = IterableCellDataset(
        coll, mode="sequential", batch_size=64, label_key="cell_type_ontology_term_id"
    )
    batch = next(iter(CellLoader(ds)))
    labels = ds.categories["y_n"]
    cl = load_cell_ontology()
    torch.manual_seed(0)
    module = MetricModule(
        coll.n_vars,
        (32,),
        8,
        related_ll=torch.from_numpy(cl.related(labels)),
        ancestor_ll=torch.from_numpy(cl.closure(labels)[0]),
        triplet_weight=0.2,
        classifier_weight=0.5,
    )
    out = module(batch)
    expected = 0.2 * out["triplet_loss"] + 0.5 * out["label_loss"] + 0.3 * out["recon_loss"]
    torch.testing.assert_close(out["loss"], expected)
    module.eval()
    p = module.predict_proba(batch)
    torch.testing.assert_close(p.sum(1), torch.ones(64))
    with pytest.raises(
        ValueError, match=r"classifier_weight must lie in \[0, 1 - triplet_weight\]"
    ):
        MetricModule(coll.n_vars, (32,), 8, triplet_weight=0.6, classifier_weight=0.5)
    # weights adding up to 1, as written (in floats 0.07 + 0.93 > 1): no reconstruction
    related = torch.from_numpy(cl.related(labels))
    for w, wc in ((0.07, 0.93), (0.33, 0.67), (0.55, 0.45)):
        full = MetricModule(
            coll.n_vars, (32,), 8, related_ll=related, triplet_weight=w, classifier_weight=wc
        )
        out = full(batch)
        torch.testing.assert_close(out["loss"], w * out["triplet_loss"] + wc * out["label_loss"])
    with pytest.raises(ValueError, match="no label head"):
        MetricModule(coll.n_vars, (32,), 8).predict_proba(batch)


@pytest.mark.parametrize("relatives", ["never", "resolved"])
def test_label_loss_does_not_credit_a_descendant_the_study_uses(relatives):
    """In a study that labels both CD14-positive and CD16-positive monocytes, a CD14-labelled
    cell is not credited with CD16 (else the head could call every CD14-positive monocyte
    CD16-positive at no cost); in a study without CD16 labels it is. Without study codes
    the batch is one study. (The triplets' relatives setting does not change this.)"""
    cl = load_cell_ontology()
    labels = ["CL:0001054", "CL:0002396", "CL:0000236"]  # CD14+ mono, CD16+ mono (below it), B
    module = MetricModule(
        10,
        (8,),
        4,
        related_ll=torch.from_numpy(cl.related(labels)),
        relatives=relatives,
        ancestor_ll=torch.from_numpy(cl.closure(labels)[0]),
        classifier_weight=0.3,
    )
    logits = torch.tensor([[0.0, 2.0, -1.0], [0.0, 2.0, -1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([0, 0, 1, 2])
    study = torch.tensor([0, 1, 0, 1])  # study 0 uses CD16, study 1 does not
    p = torch.softmax(logits, 1)
    expected = -torch.stack(
        [p[0, 0].log(), (p[1, 0] + p[1, 1]).log(), p[2, 1].log(), p[3, 2].log()]
    ).mean()
    torch.testing.assert_close(module.label_loss(logits, y, study), expected)
    one_study = -torch.stack([p[0, 0].log(), p[1, 0].log(), p[2, 1].log(), p[3, 2].log()]).mean()
    torch.testing.assert_close(module.label_loss(logits, y), one_study)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"latent": 0}, "latent is the embedding's width"),
        ({"latent": -5}, "latent is the embedding's width"),
        ({"hidden": []}, "hidden lists the widths of at least one layer"),
        ({"hidden": [16, 0]}, "hidden lists the widths"),
        ({"dropout": 1.0}, r"dropout is a probability in \[0, 1\)"),
        ({"input_dropout": float("nan")}, r"input_dropout is a probability"),
        ({"margin": -0.1}, "margin is a finite distance, at least 0"),
        ({"margin": float("inf")}, "margin is a finite distance"),  # (no bundle holds it)
        ({"margin": 10**400}, "margin is a finite distance"),  # (beyond float's range)
        ({"target_sum": 10**400}, "target_sum is the counts per cell"),
        (
            {"classifier_weight": 0.1, "related_ll": torch.zeros(0, 0, dtype=torch.bool)},
            r"a label head \(classifier_weight > 0\) calls one of the model's labels, and",
        ),
        ({"target_sum": 0.0}, "target_sum is the counts per cell"),
        ({"target_sum": -1.0}, "target_sum is the counts per cell"),
        ({"n_genes": 1}, "at least two genes, not n_genes=1: .* every cell would embed alike"),
        # not numbers: a text (a TypeError of a comparison) or True (taken for 1; hunt177)
        ({"classifier_weight": "0.5"}, r"classifier_weight is a number, not '0.5' \(str\)"),
        ({"classifier_weight": True}, r"classifier_weight is a number, not True \(bool\)"),
        ({"triplet_weight": "0.1"}, r"triplet_weight is a number, not '0.1'"),
        ({"dropout": "0.5"}, r"dropout is a number, not '0.5'"),
        ({"margin": None}, r"margin is a number, not None"),
        ({"target_sum": True}, r"target_sum is a number, not True"),
    ],
)
def test_settings_that_cannot_make_a_model_are_named(settings, message):
    from cellsift.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        MetricModule(**{"n_genes": 20, "hidden": [16], "latent": 8, **settings})
    MetricModule(np.int64(20), hidden=[np.int64(16)], latent=np.int64(8))  # numpy's ints too
    # a Fraction is a real number to the model and to its loss alike
    assert MetricModule(20, [16], 8, margin=Fraction(1, 20)).triplet.margin == 0.05
