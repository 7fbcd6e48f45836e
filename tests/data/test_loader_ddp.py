"""The loader under real torch.distributed (gloo, 2 CPU processes, 2 workers each)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import N_INDEXED


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
    torch.multiprocessing.start_processes(
        _run, args=(2, str(indexed_paths["h5ad"]), str(out), port), nprocs=2, start_method="spawn"
    )
    seen = np.load(out)
    np.testing.assert_array_equal(np.sort(seen), np.arange(N_INDEXED))
