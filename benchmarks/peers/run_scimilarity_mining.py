"""SCimilarity's own triplet mining + triplet loss on given embeddings, one batch, CPU.

Mirrors ``MetricLearning.get_losses``/``training_step`` (scimilarity/training_models.py): the
batch's labels are Cell Ontology *names* mapped to ints (``label2int`` as in their
``MetricLearningDataModule``, collated by ``scCollator`` into a float ``torch.Tensor``), studies
are a numpy str array, and ``TripletLoss(embedding, labels, int2label, studies)`` mines the
triplets (``TripletSelector.get_triplets_idx``) and returns per-triplet losses, averaged as in
``training_step``. Timed: that call plus the mean, once per repeat.

``TripletSelector`` loads the ontology in its constructor through
``scimilarity.ontologies.import_cell_ontology(url=<cl-basic.obo on purl.obolibrary.org>)``;
there is no network here, so that default is pointed at the local ``--obo`` file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib.metadata import version

import numpy as np
import torch
from _common import peak_rss_mb
from scimilarity import ontologies
from scimilarity.triplet_selector import TripletLoss


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--npz", required=True, help="z [n,d] float32, labels CL ids [n], studies [n]")
    p.add_argument("--obo", required=True, help="local Cell Ontology OBO file")
    p.add_argument("--mode", choices=("semihard", "hardest", "random"), default="semihard")
    p.add_argument("--margin", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup-seconds", type=float, default=1.0, help="at least one call")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    # Same function object as triplet_selector's import, so the default covers both names.
    ontologies.import_cell_ontology.__defaults__ = (args.obo,)
    # Their defaults: sample_across_studies=True, perturb_labels=False.
    loss_fn = TripletLoss(margin=args.margin, negative_selection=args.mode)
    id2name = loss_fn.triplet_selector.id2name

    data = np.load(args.npz, allow_pickle=False)
    z = torch.from_numpy(np.ascontiguousarray(data["z"], dtype=np.float32)).requires_grad_()
    names = [id2name[str(t)] for t in data["labels"]]  # KeyError: id not in the ontology
    # Their data module enumerates set(names); sorted only to make the ints reproducible.
    label2int = {name: i for i, name in enumerate(sorted(set(names)))}
    int2label = {i: name for name, i in label2int.items()}
    labels = torch.Tensor([label2int[n] for n in names])  # as scCollator builds them
    studies = np.array([str(s) for s in data["studies"]])

    # semihard/random pick negatives with the legacy global np.random.choice
    np.random.seed(args.seed)  # noqa: NPY002
    warm_until = time.perf_counter() + args.warmup_seconds
    while True:
        loss_fn(z, labels, int2label, studies)[0].mean()
        if time.perf_counter() >= warm_until:
            break
    times: list[float] = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        triplet_losses, n_hard, n_viable, idx = loss_fn(z, labels, int2label, studies)
        loss = triplet_losses.mean()
        times.append(time.perf_counter() - t0)
    # get_triplets_idx returns the placeholder [0, 0, 0] when it found no triplet.
    n_triplets = 0 if idx == ([0], [0], [0]) else len(idx[0])
    result = {
        "seconds_per_batch": statistics.median(times),
        "all_seconds": times,
        "n_triplets": n_triplets,
        "loss": float(loss),
        "num_hard_triplets": int(n_hard),
        "num_viable_triplets": int(n_viable),
        "n_cells": int(z.shape[0]),
        "n_labels": len(label2int),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "mode": args.mode,
        "version": version("scimilarity"),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
