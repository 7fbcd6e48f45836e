"""anndata's AnnLoader over a backed h5ad: fully random rows, dense float32 batches.

AnnLoader wraps the backed AnnData in an AnnCollection and, with ``shuffle=True`` and no worker
processes, draws each batch from one global permutation of all rows (``BatchIndexSampler``); the
batch's rows are read from the h5ad and its default converter densifies them into a torch tensor.
With ``--num-workers > 0`` AnnLoader switches to plain per-row DataLoader batching instead.
"""

from __future__ import annotations

import warnings
from importlib.metadata import version

import anndata as ad
import numpy as np
import torch
from _common import emit, parse_args, time_batches
from anndata.experimental import AnnLoader


def main() -> None:
    args = parse_args({"--h5ad": "h5ad file (X: CSR raw counts)"})
    np.random.seed(args.seed)  # noqa: NPY002 - AnnLoader shuffles with np.random.permutation
    torch.manual_seed(args.seed)
    adata = ad.read_h5ad(args.h5ad, backed="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # AnnLoader is deprecated in 0.12.17+
        loader = AnnLoader(
            adata, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers
        )

    def batches():
        for batch in loader:
            yield batch.X  # dense float32 torch.Tensor from the default converter

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
