"""Cellarium's DistributedAnnDataCollection + iterable dataset over h5ad shards, dense batches.

Follows Cellarium's documented setup: a brace-expansion filename pattern plus ``shard_size`` /
``last_shard_size`` (built here from the shard folder's ``manifest.json``), batch key
``x_ng = AnnDataField("X", densify)``, ``iteration_strategy="cache_efficient"`` and a plain
DataLoader with Cellarium's ``collate_fn``. With ``shuffle=True`` it shuffles the order of the
shards and the cells within each shard, never across shards; each shard is read whole into
memory when first touched (LRU cache of 2 shards, as a batch can straddle two).
"""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path

import torch
from _common import emit, parse_args, time_batches
from braceexpand import braceexpand
from cellarium.ml.data import (
    DistributedAnnDataCollection,
    IterableDistributedAnnDataCollectionDataset,
)
from cellarium.ml.utilities.data import AnnDataField, collate_fn, densify
from torch.utils.data import DataLoader


def shard_pattern(shards_dir: Path, files: list[str]) -> str | list[str]:
    """``dir/shard-{00000..00003}.h5ad`` for consecutively numbered files, else the plain list."""
    paths = [str(shards_dir / f) for f in files]
    first, last = (re.fullmatch(r"(.*?)(\d+)(\.h5ad)", f) for f in (files[0], files[-1]))
    if first and last:
        pattern = str(shards_dir / f"{first[1]}{{{first[2]}..{last[2]}}}{first[3]}")
        if list(braceexpand(pattern)) == paths:
            return pattern
    return paths


def main() -> None:
    args = parse_args({"--shards-dir": "folder of h5ad shards with a manifest.json"})
    torch.manual_seed(args.seed)
    shards_dir = Path(args.shards_dir)
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    files, n_obs = manifest["files"], manifest["n_obs"]
    if len(set(n_obs[:-1])) <= 1:  # equal shards except possibly the last
        sizes = {"shard_size": n_obs[0], "last_shard_size": n_obs[-1]}
    else:
        sizes = {"limits": [sum(n_obs[: i + 1]) for i in range(len(n_obs))]}
    dadc = DistributedAnnDataCollection(shard_pattern(shards_dir, files), max_cache_size=2, **sizes)
    dataset = IterableDistributedAnnDataCollectionDataset(
        dadc,
        batch_keys={"x_ng": AnnDataField(attr="X", convert_fn=densify)},
        batch_size=args.batch_size,
        iteration_strategy="cache_efficient",
        shuffle=True,
        shuffle_seed=args.seed,
        drop_incomplete_batch=True,
    )
    loader = DataLoader(dataset, num_workers=args.num_workers, collate_fn=collate_fn)

    def batches():
        for batch in loader:  # the dataset bumps its own epoch after each pass
            yield batch["x_ng"]

    seconds, cells = time_batches(batches, args.n_batches, args.warmup)
    emit(
        seconds,
        cells,
        randomness=(
            f"shard order shuffled, cells shuffled within each shard only "
            f"({len(files)} shards of {n_obs[0]} cells, whole shard loaded into memory)"
        ),
        output="dense",
        version=version("cellarium-ml"),
    )


if __name__ == "__main__":
    main()
