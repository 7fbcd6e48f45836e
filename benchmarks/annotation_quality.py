"""Cell-type annotation of held-out donors / studies: MetricModel + kNN vs PCA + kNN vs logreg.

Kang 2018 PBMC (../shared/data; every donor held out in turn, `--quick`: the largest) and a synthetic
atlas (every study held out in turn; `--quick`: one of the four). On each split, the same training cells
and the same held-out cells for every method:

``cellsift``  a MetricModel trained on the training cells but a random tenth (the held-out
              calibration cells; class- and study-balanced batches, donors or studies as
              the triplet "studies"), kNN (k=15, cosine) on its embedding of every training
              cell
``pca_knn``   counts per 10k, log1p, PCA(50) fitted on the training cells, kNN (k=15)
``logreg``    CellTypist-style: counts per 10k, log1p, genes scaled on the training cells
              (clipped at 10), multinomial logistic regression
``cellsift_head``  where the MetricModel settings give it a label head
              (``classifier_weight > 0``), the head's own calls (``MetricModel.predict``)

Scores: macro-F1 and accuracy on the held-out cells, averaged over splits (per split in
``detail``). Macro-F1 two ways: ``f1`` averages over every label in the truth or the
predictions (scikit-learn's default), so a label absent from the held-out cells that a method
predicts for even one cell enters the mean with F1 0 (one cell of 5,000 can move it by
0.1); ``f1_present`` averages over the labels present in the held-out cells (a cell
predicted as an absent label still costs its true label's recall). For cellsift also, through CellIndex + KNNAnnotator (ontology-aware; reference:
the trained-on cells; abstention threshold: quantile 0.99 of the calibration cells' mean
distance to their k nearest reference cells, the statistic queries are held to): ontology-aware accuracy (the label or an ancestor), and, for a type
the model has never seen (a second MetricModel trained without B cells, which are also left
out of its reference and calibration cells), the share of held-out B cells called ``unknown``
or an ancestor (target >= 0.8) against the share of other cells that abstain (<= 0.05). The MetricModel settings are one set for both datasets (below), not tuned per
dataset.

    python benchmarks/annotation_quality.py --quick

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

#: cellsift's settings for small atlases (cellsift.models.SMALL_ATLAS_MODEL / _LOADER), one
#: set for both datasets, not tuned per dataset.
TRAIN = {"max_epochs": 40, "lr": 5e-3}
K = 15


def lognorm(x: sp.csr_matrix) -> sp.csr_matrix:
    x = sp.csr_matrix(x, dtype=np.float32)
    scale = 1e4 / np.maximum(np.asarray(x.sum(1)).ravel(), 1.0)
    x = sp.diags(scale.astype(np.float32)) @ x
    x.data = np.log1p(x.data)
    return x


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float, float]:
    """Macro-F1 over the labels of truth and predictions, over the labels present in the
    truth, and accuracy."""
    from sklearn.metrics import f1_score

    present = np.unique(y_true)
    return (
        float(f1_score(y_true, y_pred, average="macro")),
        float(f1_score(y_true, y_pred, labels=present, average="macro")),
        float((y_true == y_pred).mean()),
    )


def pca_knn(x: sp.csr_matrix, y: np.ndarray, train: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier

    xl = lognorm(x).toarray()
    pca = PCA(50, random_state=0).fit(xl[train])
    z = pca.transform(xl)
    return KNeighborsClassifier(K).fit(z[train], y[train]).predict(z[~train])


def logreg(x: sp.csr_matrix, y: np.ndarray, train: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    xl = lognorm(x).toarray()
    mu, sd = xl[train].mean(0), xl[train].std(0) + 1e-6
    xs = np.clip((xl - mu) / sd, -10, 10)
    clf = LogisticRegression(C=0.1, max_iter=300).fit(xs[train], y[train])
    return clf.predict(xs[~train])


#: Share of the training cells kept out of training and out of the reference, to calibrate
#: the abstention threshold on (cells exchangeable with new cells of known types).
CALIBRATION = 0.1


def cellsift_embed(
    path: Path, group_key: str, held: str, seed: int, exclude: np.ndarray
) -> tuple[np.ndarray, Any]:
    """Embeddings of every cell by a MetricModel trained without group ``held`` and without
    the cells where the boolean ``exclude`` (one per cell of ``path``) is True; and the model."""
    import anndata as ad

    from cellsift.data.datamodule import CellDataModule
    from cellsift.models import SMALL_ATLAS_LOADER, SMALL_ATLAS_MODEL, MetricModel

    torch.manual_seed(seed)
    model = MetricModel.from_collection(path, **SMALL_ATLAS_MODEL)
    dm = CellDataModule(
        path,
        study_key=group_key,
        val_fraction=0,
        seed=seed,
        obs_filter=lambda obs: (obs[group_key].astype(str) != held).to_numpy() & ~exclude,
        **SMALL_ATLAS_LOADER,
    )
    root = tempfile.mkdtemp(prefix="cellsift-bench-")  # (what a stopped run saves: kept)
    model.train(
        dm,
        accelerator="auto",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **TRAIN,
    )
    os.rmdir(root)  # (empty: the run finished)
    return model.embed(ad.read_h5ad(path)), model


def knn(z: np.ndarray, y: np.ndarray, train: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    return KNeighborsClassifier(K, metric="cosine").fit(z[train], y[train]).predict(z[~train])


def ontology_scores(
    z: np.ndarray,
    z_novel: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    cal: np.ndarray,
    removed: str,
) -> dict[str, float]:
    """CellIndex + KNNAnnotator (ontology-aware) on the trained-on cells, abstention
    calibrated on the held-out calibration cells ``cal``:

    ``onto_acc``: held-out cells called their label or one of its ancestors;
    ``onto_exact``: called exactly their label; ``abstain``: called unknown.
    On ``z_novel`` (a model trained without ``removed``'s cells), with ``removed`` taken out
    of the reference and calibration cells too: ``removed_unknown_or_ancestor`` (of its
    held-out cells; target >= 0.8) and ``others_abstain`` (of the other cells; <= 0.05).
    """
    import pandas as pd

    from cellsift.ontology import load_cell_ontology
    from cellsift.tasks import UNKNOWN, CellIndex, KNNAnnotator

    cl = load_cell_ontology()
    yq = y[~train]

    def run(z: np.ndarray, keep: np.ndarray) -> np.ndarray:
        ref = train & ~cal & keep
        index = CellIndex.build(
            z[ref], pd.DataFrame({"cell_type_ontology_term_id": y[ref]}), engine="exact"
        )
        ann = KNNAnnotator(index, k=K, ontology_aware=True, min_support=0.5)
        ann.calibrate(z[cal & keep], quantile=0.99)
        return ann.annotate(z[~train])["label"].to_numpy()

    def ok(call: str, truth: str) -> bool:
        return call == truth or call in cl.ancestors(truth)

    calls = run(z, np.ones(len(y), dtype=bool))
    out = {
        "onto_acc": float(np.mean([ok(c, t) for c, t in zip(calls, yq, strict=True)])),
        "onto_exact": float(np.mean(calls == yq)),
        "abstain": float(np.mean(calls == UNKNOWN)),
    }
    calls = run(z_novel, y != removed)
    gone = yq == removed
    out["removed_unknown_or_ancestor"] = float(
        np.mean([c == UNKNOWN or c in cl.ancestors(removed) for c in calls[gone]])
    )
    out["others_abstain"] = float(np.mean(calls[~gone] == UNKNOWN))
    return {k: round(v, 4) for k, v in out.items()}


def evaluate(
    path: Path, group_key: str, groups_to_hold: list[str] | None, removed: str
) -> dict[str, Any]:
    import anndata as ad

    adata = ad.read_h5ad(path)
    groups = adata.obs[group_key].astype(str).to_numpy()
    y = adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    x = sp.csr_matrix(adata.X)
    held_out = groups_to_hold or sorted(set(groups))
    per: dict[str, dict[str, float]] = {}
    for i, held in enumerate(held_out):
        train = groups != held
        cal = train & (np.random.default_rng(i).random(len(y)) < CALIBRATION)
        t = time.perf_counter()
        z, model = cellsift_embed(path, group_key, held, i, cal)
        # the unseen-type test's own model: B cells never trained on (nor referenced)
        z_novel, _ = cellsift_embed(path, group_key, held, i, cal | (y == removed))
        preds = {
            "cellsift": knn(z, y, train),
            "pca_knn": pca_knn(x, y, train),
            "logreg": logreg(x, y, train),
        }
        if model.module.classifier is not None:  # the label head's own calls, for reference
            preds["cellsift_head"] = model.predict(adata)["label"].to_numpy()[~train]
        scores: dict[str, float] = {"n_cells": int((~train).sum())}
        for name, pred in preds.items():
            f1, f1_present, acc = macro_f1(y[~train], pred)
            scores[f"{name}_f1"], scores[f"{name}_acc"] = round(f1, 4), round(acc, 4)
            scores[f"{name}_f1_present"] = round(f1_present, 4)
        scores.update(
            {
                f"cellsift_{k}": v
                for k, v in ontology_scores(z, z_novel, y, train, cal, removed).items()
            }
        )
        per[held] = scores
        print(
            f"#   {group_key} {held:>12s}: "
            + "  ".join(
                f"{n} F1 {scores[f'{n}_f1']:.3f} (present {scores[f'{n}_f1_present']:.3f})"
                for n in preds
            )
            + f"  ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    out: dict[str, Any] = {}
    for key in next(iter(per.values())):
        if key != "n_cells":
            out[key] = round(float(np.mean([s[key] for s in per.values()])), 4)
    out["splits"] = len(per)
    return {"summary": out, "per_split": per}


def main() -> None:
    from cellsift.models import SMALL_ATLAS_LOADER, SMALL_ATLAS_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--datasets",
        nargs="+",
        choices=("kang2018", "synthetic"),
        default=["kang2018", "synthetic"],
        help="the datasets to evaluate (default: both)",
    )
    args = ap.parse_args()
    from cellsift.datasets import shared_data_path, synthetic_atlas

    results: dict[str, Any] = {}
    detail: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    kang: Path | None = None
    if "kang2018" not in args.datasets:
        skipped["kang2018"] = "not asked for (--datasets)"
    else:
        try:
            kang = shared_data_path("kang2018")
        except FileNotFoundError as err:
            skipped["kang2018"] = str(err)
    if kang is not None:
        print(f"# kang2018: {kang}", flush=True)
        donors = ["1015"] if args.quick else None  # the largest donor
        r = evaluate(kang, "batch", donors, removed="CL:0000236")  # B cells
        results["kang2018"], detail["kang2018"] = r["summary"], r["per_split"]
    if "synthetic" not in args.datasets:
        skipped["synthetic"] = "not asked for (--datasets)"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            n = 6_000 if args.quick else 20_000
            path = synthetic_atlas(n, 2_000, n_studies=4, path=Path(tmp) / "synthetic.h5ad", seed=7)
            print(f"# synthetic: {n:,} cells x 2,000 genes, 4 studies", flush=True)
            studies = ["study_00"] if args.quick else None
            r = evaluate(path, "dataset_id", studies, removed="CL:0000236")
            results["synthetic"], detail["synthetic"] = r["summary"], r["per_split"]
    targets = {
        name: {
            "f1_at_least_pca_and_logreg": bool(
                r["cellsift_f1"] >= max(r["pca_knn_f1"], r["logreg_f1"])
            ),
            "f1_present_at_least_pca_and_logreg": bool(
                r["cellsift_f1_present"] >= max(r["pca_knn_f1_present"], r["logreg_f1_present"])
            ),
            "removed_type_unknown_or_ancestor_ge_0.8": bool(
                r["cellsift_removed_unknown_or_ancestor"] >= 0.8
            ),
            "others_abstain_le_0.05": bool(r["cellsift_others_abstain"] <= 0.05),
        }
        for name, r in results.items()
    }
    print(
        json.dumps(
            {
                "benchmark": "annotation_quality",
                "unit": "macro-F1 (and accuracy) of held-out cells, mean over splits",
                "results": results,
                "targets": targets,
                "skipped": skipped,
                "detail": detail,
                "config": {
                    "model": SMALL_ATLAS_MODEL,
                    "train": TRAIN,
                    "loader": SMALL_ATLAS_LOADER,
                    "k": K,
                    "calibration": CALIBRATION,
                },
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
