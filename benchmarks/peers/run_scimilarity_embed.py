"""SCimilarity's documented embedding path on an h5ad of raw counts: cells/s, CPU.

With ``--write-model``, first writes a SCimilarity model directory for the h5ad's genes: their ``Encoder`` and
``Decoder`` (SCimilarity's architecture, ``--hidden`` / ``--latent``, randomly initialised
with torch seed 0) saved the way their ``MetricLearning.save_all`` saves them:
``save_state``, ``layer_sizes.json`` from the encoder's state dict, ``hyperparameters.json``,
``gene_order.tsv``, ``label_ints.csv``. (``save_all`` itself reads the gene order and labels
from a fitted Trainer's data module; there is no training here.)

Then times, as their documentation shows: ``CellEmbedding(model)``, ``align_dataset`` (the
counts in ``layers["counts"]``), ``lognorm_counts``, ``get_embeddings`` (buffer of 10,000
cells, their default); reading the h5ad is outside the timing. Writes the embeddings to
``--out`` (.npy) so the caller can compare them with its own.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from importlib.metadata import version

import numpy as np
from _common import peak_rss_mb


def write_model(path: str, genes: list[str], hidden: list[int], latent: int) -> None:
    import pandas as pd
    import torch
    from scimilarity.nn_models import Decoder, Encoder

    torch.manual_seed(0)
    # as MetricLearning.__init__ builds them (constructing MetricLearning itself would load
    # the Cell Ontology for its triplet selector)
    encoder = Encoder(len(genes), latent_dim=latent, hidden_dim=hidden)
    decoder = Decoder(len(genes), latent_dim=latent, hidden_dim=list(reversed(hidden)))
    layer_sizes = {k: list(v.size()) for k, v in encoder.state_dict().items()}
    os.makedirs(path, exist_ok=True)
    encoder.save_state(os.path.join(path, "encoder.ckpt"))
    decoder.save_state(os.path.join(path, "decoder.ckpt"))
    with open(os.path.join(path, "layer_sizes.json"), "w") as f:
        f.write(json.dumps(layer_sizes))
    hyper = {"latent_dim": latent, "hidden_dim": hidden, "dropout": 0.5, "input_dropout": 0.4}
    with open(os.path.join(path, "hyperparameters.json"), "w") as f:
        f.write(json.dumps(hyper))
    with open(os.path.join(path, "gene_order.tsv"), "w") as f:
        f.write("\n".join(genes))
    pd.Series({0: "B cell", 1: "T cell"}).to_csv(
        os.path.join(path, "label_ints.csv"), quoting=csv.QUOTE_NONNUMERIC
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--h5ad", required=True, help="raw counts in X, genes as var_names")
    p.add_argument("--model", required=True, help="SCimilarity model directory")
    p.add_argument("--write-model", action="store_true")
    p.add_argument("--hidden", default="1024,1024,1024")
    p.add_argument("--latent", type=int, default=128)
    p.add_argument("--out", required=True, help="embeddings (.npy)")
    args = p.parse_args()

    import anndata as ad
    from scimilarity import CellEmbedding, align_dataset, lognorm_counts

    adata = ad.read_h5ad(args.h5ad)
    if args.write_model:
        hidden = [int(h) for h in args.hidden.split(",")]
        write_model(args.model, list(map(str, adata.var_names)), hidden, args.latent)
    adata.layers["counts"] = adata.X.copy()  # where lognorm_counts reads raw counts
    t0 = time.perf_counter()
    ce = CellEmbedding(model_path=args.model)
    loaded = time.perf_counter()
    # warm-up on 256 cells, as cellsift's side has (its first call pays for allocations)
    ce.get_embeddings(lognorm_counts(align_dataset(adata[:256].copy(), ce.gene_order)).X)
    t1 = time.perf_counter()
    data = align_dataset(adata, ce.gene_order)
    data = lognorm_counts(data)
    emb = ce.get_embeddings(data.X)
    t2 = time.perf_counter()
    np.save(args.out, emb.astype(np.float32))
    print(
        json.dumps(
            {
                "seconds": t2 - t1,
                "load_seconds": loaded - t0,
                "cells_per_s": adata.n_obs / (t2 - t1),
                "n_cells": adata.n_obs,
                "n_genes": adata.n_vars,
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "version": version("scimilarity"),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
