"""The loader under real torch.distributed (gloo, 2 CPU processes, 2 workers each)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import N_INDEXED, start_ranks


def _run(rank: int, world: int, path: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from cellsift.data import CellCollection, CellLoader, IterableCellDataset
        from cellsift.errors import ConfigError

        ds = IterableCellDataset(
            CellCollection(path), mode="block", batch_size=50, block_size=8, fetch_factor=2
        )
        assert ds.rank_world == (rank, world)
        coll = CellCollection(path)
        for given in ({"world_size": world}, {"rank": rank}):  # the other from the group
            one = IterableCellDataset(coll, mode="block", batch_size=50, **given)
            assert one.rank_world == (rank, world), given
        whole = IterableCellDataset(coll, mode="sequential", batch_size=50, world_size=1)
        assert whole.rank_world == (0, 1)  # one shard: every rank reads every cell
        with pytest.raises(ConfigError, match=r"world_size=4, but torch\.distributed runs 2"):
            IterableCellDataset(coll, batch_size=50, world_size=4).rank_world  # noqa: B018
        # a plain DataLoader's spawned workers (no process group): the shard as pickled
        plain = torch.utils.data.DataLoader(
            IterableCellDataset(coll, mode="sequential", batch_size=50, world_size=world),
            batch_size=None,
            num_workers=1,
            multiprocessing_context="spawn",
        )
        shard = torch.cat([b["obs_idx_n"] for b in plain])
        shards: list[torch.Tensor | None] = [None] * world
        dist.all_gather_object(shards, shard)
        if rank == 0:
            both = torch.cat(shards).numpy()  # type: ignore[arg-type]
            np.testing.assert_array_equal(np.sort(both), np.arange(len(both)))
            assert len(both) == coll.n_obs
        seen = [b["obs_idx_n"] for b in CellLoader(ds, num_workers=2)]
        mine = torch.cat(seen)
        gathered: list[torch.Tensor | None] = [None] * world
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            np.save(out, torch.cat(gathered).numpy())  # type: ignore[arg-type]
    finally:
        dist.destroy_process_group()


@pytest.mark.multi_device
def test_gloo_two_ranks_cover_every_cell_once(indexed_paths, tmp_path: Path):
    import random

    out = tmp_path / "seen.npy"
    port = random.randint(20_000, 40_000)
    start_ranks(_run, (2, str(indexed_paths["h5ad"]), str(out), port))
    seen = np.load(out)
    np.testing.assert_array_equal(np.sort(seen), np.arange(N_INDEXED))


def _run_shares(rank: int, world: int, path: str, port: int) -> None:
    """On each of 2 gloo ranks: a validation set of one cell, and training cells short of a
    batch per rank, are named before an epoch runs (a rank without validation cells made
    Lightning's loader check fail there and the other rank's gloo connection close)."""
    from types import SimpleNamespace

    from cellsift.data import CellDataModule
    from cellsift.errors import ConfigError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dm = CellDataModule(
            path, split_key="group", val_groups=["solo"], batch_size=16, pin_memory=False
        )
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=world)
        with pytest.raises(ConfigError, match=r"the 1 validation cells are fewer than the 2 pro"):
            dm.val_dataloader()
        assert len(dm.train_dataloader()) > 0  # (59 cells: a batch of 16 on each rank)
        small = CellDataModule(path, val_fraction=0, batch_size=64, pin_memory=False)
        small.setup("fit")
        small.trainer = SimpleNamespace(world_size=world)
        for _ in range(2):  # (a refused loader is not kept for the next call)
            with pytest.raises(ConfigError, match=r"the 60 training cells make no batch on ea"):
                small.train_dataloader()
    finally:
        dist.destroy_process_group()


@pytest.mark.multi_device
def test_shares_too_small_for_every_rank_are_named_before_training(tmp_path: Path):
    import random

    from cellsift.datasets import synthetic_atlas

    adata = synthetic_atlas(60, 40, n_studies=2, seed=0)
    adata.obs["group"] = ["solo"] + ["rest"] * 59
    adata.write_h5ad(tmp_path / "a.h5ad")
    port = random.randint(20_000, 40_000)
    start_ranks(_run_shares, (2, str(tmp_path / "a.h5ad"), port))
