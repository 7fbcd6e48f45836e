"""tiledbsoma-ml's ExperimentDataset over a TileDB-SOMA Experiment, dense float32 batches.

With ``shuffle=True`` the obs joinids are cut into shuffle chunks of ``shuffle_chunk_size``
contiguous rows, the chunks are shuffled, regrouped into IO batches of ``io_batch_size`` rows
(here ``fetch_factor * batch_size``, mirroring scDataset's fetch), each IO batch is permuted
row-wise, read from the X layer and sliced into minibatches. X comes back as a dense numpy
array (the library default, ``return_sparse_X=False``); ``use_eager_fetch`` (default on) reads
the next IO batch in a background thread even with ``num_workers=0``. There is no drop-last
option: minibatches span IO batches, and only the last one of an epoch is short (its cells are
counted as they are).
"""

from __future__ import annotations

from importlib.metadata import version

import tiledbsoma
import torch
from _common import emit, parse_args, time_batches
from tiledbsoma_ml import ExperimentDataset, experiment_dataloader


def main() -> None:
    args = parse_args({"--soma": "TileDB-SOMA Experiment URI"})
    torch.manual_seed(args.seed)
    io_batch_size = args.fetch_factor * args.batch_size
    with tiledbsoma.Experiment.open(args.soma) as exp:
        with exp.axis_query(measurement_name="RNA") as query:
            dataset = ExperimentDataset(
                query,
                layer_name="raw",
                batch_size=args.batch_size,
                io_batch_size=io_batch_size,
                shuffle=True,
                shuffle_chunk_size=args.block_size,
                seed=args.seed,
            )
        loader = experiment_dataloader(dataset, num_workers=args.num_workers)
        epoch = 0

        def batches():
            nonlocal epoch
            dataset.set_epoch(epoch)  # a new shuffle per epoch, as the library asks
            epoch += 1
            for X, _obs in loader:
                yield torch.from_numpy(X)

        seconds, cells = time_batches(batches, args.n_batches, args.warmup)
    emit(
        seconds,
        cells,
        randomness=(
            f"chunks of {args.block_size} rows shuffled, IO batch of {io_batch_size} rows "
            f"(fetch factor {args.fetch_factor}) permuted row-wise"
        ),
        output="dense",
        version=version("tiledbsoma-ml"),
    )


if __name__ == "__main__":
    main()
