"""anndata's AnnLoader over a backed h5ad: fully random rows, dense float32 batches.

AnnLoader wraps the backed AnnData in an AnnCollection and, with ``shuffle=True``, draws each
batch from one global permutation of all rows (its ``BatchIndexSampler``); the batch's rows are
read from the h5ad and its default converter densifies them into a torch tensor.

AnnLoader's own ``num_workers > 0`` path falls back to per-row DataLoader batching, which cannot
collate its AnnCollectionView rows (TypeError in default_collate). For ``--num-workers > 0`` the
same whole-batch sampling is therefore passed in explicitly (a shuffled BatchSampler as
``sampler`` with ``batch_size=None``), so each worker reads whole random batches.
"""

from __future__ import annotations

import warnings
from importlib.metadata import version

import anndata as ad
import numpy as np
import torch
from _common import emit, parse_args, time_batches
from anndata.experimental import AnnLoader
from torch.utils.data import BatchSampler, RandomSampler


def batch_x(view) -> torch.Tensor:
    return view.X  # dense float32 torch.Tensor from AnnLoader's default converter


def main() -> None:
    args = parse_args({"--h5ad": "h5ad file (X: CSR raw counts)"})
    np.random.seed(args.seed)  # noqa: NPY002 - AnnLoader shuffles with np.random.permutation
    torch.manual_seed(args.seed)
    adata = ad.read_h5ad(args.h5ad, backed="r")
    if args.num_workers == 0:
        kwargs = {"batch_size": args.batch_size, "shuffle": True, "drop_last": True}
    else:
        rows = RandomSampler(range(adata.n_obs))
        kwargs = {
            "batch_size": None,
            "sampler": BatchSampler(rows, batch_size=args.batch_size, drop_last=True),
            "collate_fn": batch_x,
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # AnnLoader is deprecated in 0.12.17+
        loader = AnnLoader(adata, num_workers=args.num_workers, **kwargs)

    def batches():
        for batch in loader:
            yield batch if isinstance(batch, torch.Tensor) else batch_x(batch)

    seconds, cells = time_batches(batches, args.n_batches, args.warmup)
    emit(
        seconds,
        cells,
        randomness="fully random rows (global permutation each epoch)",
        output="dense",
        version=version("anndata"),
    )


if __name__ == "__main__":
    main()
