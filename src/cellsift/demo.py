"""``cellsift demo`` / ``make demo``: the main job end to end on real or synthetic data.

Converts the data to Zarr and TileDB-SOMA, streams an epoch from each store in block-shuffled
and balanced (weighted) mode through the GPU-ready transforms, then holds one donor out,
trains a MetricModel on the rest, indexes the trained-on cells (CellIndex) and annotates
the held-out cells by kNN on its embedding (KNNAnnotator: accuracy and macro-F1 next to a
PCA + kNN baseline; ontology-aware calls, abstaining beyond a distance threshold calibrated
on the validation donors, which the model did not train on) and writes a UMAP. The first
line says which data it runs on.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ._utils import import_optional
from .errors import ConfigError, TrainingInterrupted

# (the library is imported as the demo runs: the command line reads the settings below
# without it)

__all__ = ["EPOCHS", "MIN_CELLS", "SYNTHETIC_CELLS", "run_demo"]

#: The smallest synthetic atlas the demo runs on.
MIN_CELLS = 2_000
#: The synthetic atlas of a demo without the real data: about as long to run as Kang's
#: (9,913 cells trained on against 9,523: 4 min 9 s against 4 min 32 s on 2 cores).
SYNTHETIC_CELLS = 12_000
#: The demo's epochs of training.
EPOCHS = 40


def _source(out: Path, synthetic: bool, n_cells: int | None) -> tuple[Path, str, str]:
    """(h5ad path, study/donor column, description)."""
    from .datasets import SYNTHETIC_VERSION, shared_data_path, synthetic_atlas

    if not synthetic and n_cells is None:
        try:
            path = shared_data_path("kang2018")
            return path, "batch", f"real data: Kang 2018 PBMC, 8 donors ({path})"
        except FileNotFoundError as err:  # (where it looked, and how to point at the data)
            reason = str(err).split(" (the files come from")[0]
    else:
        reason = "--synthetic was given" if synthetic else "--n-cells was given"
    n_cells = SYNTHETIC_CELLS if n_cells is None else n_cells
    # (one of another size, or from another version of the generator, is not this one)
    path = out / f"synthetic_atlas_{n_cells}_v{SYNTHETIC_VERSION}.h5ad"
    if not path.exists():
        synthetic_atlas(n_cells, 2000, n_studies=6, path=path, seed=0)
    return path, "dataset_id", f"synthetic atlas, {n_cells:,} cells x 2,000 genes ({reason})"


def run_demo(
    out: str | Path = "demo_out",
    *,
    synthetic: bool = False,
    n_cells: int | None = None,
    epochs: int = EPOCHS,
) -> int:
    """The demo, written to ``out``: on the real data where found, unless ``synthetic`` or
    ``n_cells`` (a synthetic atlas of that many cells; default :data:`SYNTHETIC_CELLS`)
    asks for a synthetic atlas; the model trains for ``epochs``. Returns the exit
    status."""
    # the demo's extra (its baselines, plots and the SOMA store): said before any work
    for module in ("scanpy", "umap", "sklearn", "tiledbsoma"):
        import_optional(module, "demo")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(
            f"the demo trains for a whole number of epochs, at least 1, not {epochs!r}."
        )
    if n_cells is not None and n_cells < MIN_CELLS:
        raise ConfigError(
            f"the demo needs at least {MIN_CELLS:,} cells (a held-out study, and validation "
            f"studies with enough cells to calibrate the abstention threshold), not {n_cells:,}."
        )
    import numpy as np

    from .data import CellCollection, CellLoader, IterableCellDataset
    from .data.convert import convert
    from .ontology import load_cell_ontology
    from .transforms import default_pipeline

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # (a file there, a file on the way, a folder not this user's)
        raise ConfigError(
            f"the demo cannot make its output folder {out} ({err.strerror or err}): name a "
            "folder this user may write (cellsift demo --out)."
        ) from None
    h5ad, group_key, what = _source(out, synthetic, n_cells)
    print(f"cellsift demo on {what}")
    label_key = "cell_type_ontology_term_id"

    stores = {"h5ad": h5ad}
    for fmt in ("zarr", "soma"):
        dest = out / f"{h5ad.stem}.{fmt}"
        t = time.perf_counter()
        convert(h5ad, dest, overwrite=True)
        print(f"  converted to {fmt:5s} in {time.perf_counter() - t:5.1f} s -> {dest}")
        stores[fmt] = dest

    pipeline = default_pipeline()
    # (the first batch waits for the loader's worker to start, a fresh process where the
    # store needs one (SOMA): the rate is that of the batches after it)
    print("\n  store  mode      1st batch     cells/s   batches      cells   distinct")
    freq: dict[str, Counter[str]] = {}
    for fmt, path in stores.items():
        coll = CellCollection(path)
        for mode in ("block", "weighted"):
            ds = IterableCellDataset(
                coll,
                mode=mode,
                batch_size=1024,
                block_size=64,
                fetch_factor=8,
                label_key=label_key,
                study_key=group_key,
            )
            loader = CellLoader(ds, num_workers=1)
            t, n, nb, seen = time.perf_counter(), 0, 0, set()
            first, n_first = t, 0
            counts: Counter[str] = Counter()
            for batch in loader:
                x = pipeline(batch)["x_ng"]
                assert x.shape[1] == coll.n_vars and bool(np.isfinite(x.numpy()).all())
                n += x.shape[0]
                nb += 1
                seen.update(batch["obs_idx_n"].tolist())
                counts.update(np.asarray(ds.categories["y_n"])[batch["y_n"].numpy()].tolist())
                if nb == 1:
                    first, n_first = time.perf_counter(), n
            end = time.perf_counter()
            # (one batch: no rate after it to give)
            rate = f"{(n - n_first) / (end - first):,.0f}" if nb > 1 else "-"
            print(
                f"  {fmt:6s} {mode:9s} {first - t:7.2f} s {rate:>11s} {nb:9d} {n:10,d}"
                f" {len(seen):10,d}"
            )
            freq[mode] = counts
            del loader  # (its workers end now, not after the training below)

    cl = load_cell_ontology()
    print("\n  cell type (share of cells drawn)   block-shuffled   weighted (balanced)")
    total_b, total_w = sum(freq["block"].values()), sum(freq["weighted"].values())
    for term, _ in freq["block"].most_common():
        print(
            f"  {cl.name(term)[:34]:34s} {freq['block'][term] / total_b:14.1%}"
            f" {freq['weighted'][term] / total_w:19.1%}"
        )

    _train_and_annotate(h5ad, group_key, out, epochs)
    print(f"  outputs in {out}/")
    return 0


def _train_and_annotate(h5ad: Path, group_key: str, out: Path, epochs: int = EPOCHS) -> None:
    """Hold one donor (or study) out, train a MetricModel, annotate the held-out cells by kNN."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scanpy as sc
    import torch
    from sklearn.metrics import f1_score
    from sklearn.neighbors import KNeighborsClassifier

    from .data.datamodule import CellDataModule
    from .models import SMALL_ATLAS_LOADER, SMALL_ATLAS_MODEL, MetricModel
    from .ontology import load_cell_ontology
    from .tasks import UNKNOWN, CellIndex, KNNAnnotator

    label_key = "cell_type_ontology_term_id"
    adata = ad.read_h5ad(h5ad)
    groups = adata.obs[group_key].astype(str)
    held = groups.value_counts().index[0]  # the largest group: the hardest to leave out
    test = (groups == held).to_numpy()
    y = adata.obs[label_key].astype(str).to_numpy()
    print(
        f"\n  MetricModel: training on all but {group_key} {held!r} ({(~test).sum():,} cells, "
        f"{epochs} epoch{'s' if epochs != 1 else ''}) ..."
    )
    torch.manual_seed(0)
    model = MetricModel.from_collection(h5ad, **SMALL_ATLAS_MODEL)
    dm = CellDataModule(
        h5ad,
        study_key=group_key,
        split_key=group_key,
        val_fraction=0.1,
        **SMALL_ATLAS_LOADER,
        obs_filter=lambda obs: (obs[group_key].astype(str) != held).to_numpy(),
    )
    fit_dir = out / "fit"  # (a stop's checkpoint, removed: the demo does not resume)
    t = time.perf_counter()
    try:
        model.train(
            dm,
            max_epochs=epochs,
            accelerator="auto",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=fit_dir,
            callbacks=[_epoch_lines(epochs, dm, group_key)],
        )
    except TrainingInterrupted as err:  # the demo does not resume: its state is not kept
        if err.checkpoint is not None:
            Path(err.checkpoint).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # (its folder, where nothing else is in it)
            fit_dir.rmdir()
        name = signal.Signals(err.signal).name if err.signal is not None else "a signal"
        raise TrainingInterrupted(
            f"the demo stopped on {name} while training (after step {err.step}); run "
            "cellsift demo again to start over.",
            checkpoint=None,
            step=err.step,
            signal=err.signal,
        ) from None
    trained_s = time.perf_counter() - t
    z = model.embed(adata)
    model.save(out / "metric_model", overwrite=True)

    # Reference: the trained-on cells. The validation groups were not trained on: they stand
    # for new cells of known types and calibrate the abstention threshold.
    val = groups.isin(dm.val_groups or []).to_numpy()
    ref = ~test & ~val
    meta = pd.DataFrame({label_key: y[ref], group_key: groups.to_numpy()[ref]})
    index = CellIndex.build(z[ref], meta, engine="exact")
    ann = KNNAnnotator(index, k=15, weighted=False, ontology_aware=True)
    threshold = ann.calibrate(z[val], quantile=0.99)
    calls = ann.annotate(z[test])
    pred = calls["knn_label"].to_numpy()
    acc, f1 = float((pred == y[test]).mean()), float(f1_score(y[test], pred, average="macro"))

    pca = adata.copy()
    sc.pp.normalize_total(pca, target_sum=1e4)
    sc.pp.log1p(pca)
    sc.pp.pca(pca, n_comps=50)
    xp = pca.obsm["X_pca"]
    pca_pred = KNeighborsClassifier(15).fit(xp[ref], y[ref]).predict(xp[test])
    pacc, pf1 = (
        float((pca_pred == y[test]).mean()),
        float(f1_score(y[test], pca_pred, average="macro")),
    )
    print(
        f"  trained in {trained_s:.0f} s; held-out {held!r}: {test.sum():,} cells annotated by "
        f"kNN (k=15) against the {ref.sum():,} trained-on cells"
    )
    print(f"  {'':28s} accuracy  macro-F1")
    print(f"  {'cellsift MetricModel':28s} {acc:8.3f} {f1:9.3f}")
    print(f"  {'PCA(50) + kNN (baseline)':28s} {pacc:8.3f} {pf1:9.3f}")
    cl = load_cell_ontology()
    label = calls["label"].to_numpy()
    ok = np.array([c == t or c in cl.ancestors(t) for c, t in zip(label, y[test], strict=True)])
    print(
        f"  ontology-aware calls: {ok.mean():.1%} the cell's type or an ancestor, "
        f"{(label == UNKNOWN).mean():.1%} unknown (distance threshold {threshold:.4f} on the "
        f"mean distance to the 15 voters: quantile 0.99 of {val.sum():,} validation cells, "
        f"{group_key} {', '.join(dm.val_groups or [])})"
    )
    # (umap-learn compiles its kernels in each process: a wait of its own, said first)
    print(f"  UMAP of the {len(z):,} cells' embedding ...", flush=True)
    _umap_png(
        z,
        names=np.array(load_cell_ontology().names(y)),
        held=test,
        title=f"{group_key} {held}",
        path=out / "umap.png",
    )
    print(f"  UMAP of the embedding -> {out / 'umap.png'}; model bundle -> {out / 'metric_model'}")


#: Lines the demo prints as it trains, at most (one every few epochs, and the last).
PROGRESS_LINES = 8


def _epoch_lines(epochs: int, dm: Any, group_key: str) -> Any:
    """A callback printing the split the training reads from the data module ``dm`` (the
    cells it trains on, and the validation groups of ``group_key``), then its progress every few epochs (about
    :data:`PROGRESS_LINES` lines in all, the last epoch's among them): the epoch's mean
    training loss, the validation loss and silhouette, and the time since training began."""
    import lightning.pytorch as pl

    every = max(1, -(-epochs // PROGRESS_LINES))

    class EpochLines(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            if dm.train is not None and dm.val is not None:
                print(
                    f"  {dm.train.n_obs:,} cells to train on; validation: {dm.val.n_obs:,} "
                    f"cells of {group_key} {', '.join(map(str, dm.val_groups or []))} (not "
                    "trained on)",
                    flush=True,
                )
            self.began, self.said = time.perf_counter(), 0

        def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            # (current_epoch: the epochs ended, each one's scalars logged by now)
            if trainer.current_epoch and trainer.current_epoch % every == 0:
                self.say(trainer, trainer.current_epoch)

        def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            if trainer.current_epoch > self.said:
                self.say(trainer, trainer.current_epoch)

        def say(self, trainer: pl.Trainer, done: int) -> None:
            self.said = done
            got = trainer.callback_metrics
            parts = [
                f"{what} {float(got[key]):.4f}"
                for key, what in (
                    ("train/loss_epoch", "loss"),
                    ("val/loss", "validation loss"),
                    ("val/asw", "silhouette"),
                )
                if key in got
            ]
            if not parts:  # (nothing logged yet: the first epoch of a resumed run)
                return
            print(
                f"    epoch {done:{len(str(epochs))}d}/{epochs}: {', '.join(parts)} "
                f"({time.perf_counter() - self.began:.0f} s)",
                flush=True,
            )

    return EpochLines()


def _umap_png(z: Any, *, names: Any, held: Any, title: str, path: Path) -> None:
    """UMAP of the embedding (cosine), coloured by cell type and by held-out cells."""
    import anndata as ad
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import umap

    from . import pl

    xy = umap.UMAP(metric="cosine", random_state=0, n_jobs=1).fit_transform(z)
    obs = pd.DataFrame(
        {
            "cell type": pd.Categorical(names, categories=sorted(set(names.tolist()))),
            "cells": pd.Categorical(
                np.where(held, "held out", "reference"), categories=["reference", "held out"]
            ),
        }
    )
    obs.index = obs.index.astype(str)
    cells = ad.AnnData(obs=obs, obsm={"X_umap": np.asarray(xy)})
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    pl.embedding(cells, "cell type", size=2, palette="tab20", legend_loc="best", ax=axes[0])
    pl.embedding(
        cells,
        "cells",
        size=2,
        palette={"reference": "lightgrey", "held out": "crimson"},
        legend_loc="best",
        title=title,
        ax=axes[1],
    )
    fig.tight_layout()
    pl._savefig(fig, path, dpi=110)
    plt.close(fig)
