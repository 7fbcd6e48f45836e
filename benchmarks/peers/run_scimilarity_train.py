"""SCimilarity's own training loop on an h5ad: cells/s of full training steps, CPU.

Their ``MetricLearningDataModule`` (scimilarity/anndata_data_models.py: the h5ad read into
memory, cells with Cell Ontology *names* in ``--label-column``, study in ``--study-column``,
batches of ``--batch-size`` collated by ``scCollator``) and their ``MetricLearning`` module
(encoder/decoder, TripletSelector mining, AdamW, cosine schedule) under a Lightning Trainer
for ``--warmup + --steps`` steps. Each step is timed from the start of one training batch to
the start of the next, so the data loading, mining, forward, backward and optimiser step
are all inside. ``TripletSelector`` loads the ontology through
``scimilarity.ontologies.import_cell_ontology`` (cl-basic.obo from purl.obolibrary.org by
default); there is no network here, so that default is pointed at the local ``--obo`` file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from importlib.metadata import version

import torch
from _common import peak_rss_mb


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--h5ad", required=True)
    p.add_argument("--obo", required=True, help="local Cell Ontology OBO file")
    p.add_argument("--label-column", default="cell_type")
    p.add_argument("--study-column", default="dataset_id")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = p.parse_args()

    from scimilarity import ontologies

    ontologies.import_cell_ontology.__defaults__ = (args.obo,)
    import pytorch_lightning as pl
    from scimilarity.anndata_data_models import MetricLearningDataModule
    from scimilarity.training_models import MetricLearning

    t0 = time.perf_counter()
    dm = MetricLearningDataModule(
        train_path=args.h5ad,
        label_column=args.label_column,
        study_column=args.study_column,
        batch_size=args.batch_size,
        num_workers=1,  # their default (their loader requires a worker process)
    )
    load_s = time.perf_counter() - t0
    model = MetricLearning(dm.n_genes)  # their defaults: SCimilarity's published ones

    stamps: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, *a: object) -> None:
            stamps.append(time.perf_counter())

        def on_train_end(self, *a: object) -> None:
            stamps.append(time.perf_counter())

    trainer = pl.Trainer(
        max_steps=args.warmup + args.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,  # no validation set: their val_dataloader() returns None
        callbacks=[Clock()],
    )
    trainer.fit(model, datamodule=dm)
    steps = [b - a for a, b in itertools.pairwise(stamps)][args.warmup :]
    per_step = statistics.median(steps)
    print(
        json.dumps(
            {
                "cells_per_s": args.batch_size / per_step,
                "seconds_per_step": per_step,
                "all_seconds": steps,
                "load_s": load_s,
                "n_genes": dm.n_genes,
                "threads": torch.get_num_threads(),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "version": version("scimilarity"),
            }
        )
    )


if __name__ == "__main__":
    main()
