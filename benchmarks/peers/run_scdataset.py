"""scDataset over a backed h5ad with its BlockShuffling strategy, dense float32 batches.

BlockShuffling(block_size) shuffles contiguous blocks of rows; scDataset then reads
``batch_size * fetch_factor`` rows per fetch (indices sorted before the read), permutes the
fetched rows and cuts them into minibatches. The fetch callback follows scDataset's AnnData
example (``adata[indices].X``); rows are densified per minibatch in the batch callback rather
than per fetch, which keeps the fetch buffer sparse (a dense 16 x 1024-row buffer of ~60k genes
would be ~4 GB) and does the same total densifying work.
"""

from __future__ import annotations

from importlib.metadata import version

import anndata as ad
import numpy as np
import torch
from _common import emit, parse_args, time_batches
from scdataset import BlockShuffling, scDataset
from torch.utils.data import DataLoader


def fetch_rows(adata: ad.AnnData, indices: np.ndarray):
    return adata[indices].X  # scipy CSR rows read from the backed file (indices come sorted)


def batch_rows(csr, batch_indices: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(csr[batch_indices].toarray().astype(np.float32, copy=False))


def main() -> None:
    args = parse_args({"--h5ad": "h5ad file (X: CSR raw counts)"})
    torch.manual_seed(args.seed)
    adata = ad.read_h5ad(args.h5ad, backed="r")
    dataset = scDataset(
        adata,
        BlockShuffling(block_size=args.block_size),
        batch_size=args.batch_size,
        fetch_factor=args.fetch_factor,
        fetch_callback=fetch_rows,
        batch_callback=batch_rows,
        drop_last=True,  # per fetch: only full minibatches
        seed=args.seed,
    )
    kwargs = {"prefetch_factor": args.fetch_factor + 1} if args.num_workers > 0 else {}
    loader = DataLoader(dataset, batch_size=None, num_workers=args.num_workers, **kwargs)
    seconds, cells = time_batches(lambda: loader, args.n_batches, args.warmup)
    emit(
        seconds,
        cells,
        randomness=(
            f"blocks of {args.block_size} rows shuffled, fetch factor {args.fetch_factor} "
            f"({args.fetch_factor * args.batch_size} rows read, then permuted row-wise)"
        ),
        output="dense",
        version=version("scdataset"),
    )


if __name__ == "__main__":
    main()
