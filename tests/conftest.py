"""Shared fixtures: index-valued atlases in every format, a small synthetic atlas; the
accelerator that the device tests compare with the CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cellsift.datasets import indexed_atlas, synthetic_atlas

N_INDEXED = 2_000

#: The accelerator whose results the device tests (marked ``gpu``) compare with the CPU's:
#: ``CELLSIFT_TEST_DEVICE`` (default ``cuda``); they skip where it is absent.
TEST_DEVICE = os.environ.get("CELLSIFT_TEST_DEVICE", "cuda")


#: What each rank of ``start_ranks`` needs, imported once by the process it is forked from.
RANK_PRELOAD = ["torch", "lightning.pytorch", "anndata", "cellsift.data", "cellsift.tasks"]


def start_ranks(fn: Any, args: tuple, nprocs: int = 2) -> None:
    """``fn(rank, *args)`` on ``nprocs`` processes, as ``torch.multiprocessing.spawn``
    runs it (an error in one raises here), each forked from a server that imported torch,
    Lightning and cellsift once: a spawned rank imports them anew, seconds of the suite
    each. The ranks get this process's ``sys.path`` and folder, not the environment it
    has now (the server's is the one it started with): set a rank's variables in ``fn``."""
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(RANK_PRELOAD)
    torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The DDP tests (marked ``multi_device``), the longest, first: a worker of pytest-xdist
    starts on them while the other takes the short tests, and work stealing evens out the
    rest (at the end of a worker's share, one would run on alone)."""
    items.sort(key=lambda item: item.get_closest_marker("multi_device") is None)


def device_available() -> bool:
    """Whether torch can run on ``TEST_DEVICE`` here (``cpu``: always)."""
    kind = torch.device(TEST_DEVICE).type
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind == "cpu"


@pytest.fixture
def held_elsewhere() -> Any:
    """A context manager: ``path``'s output lock held by another process (as a run of
    cellsift holds it) for the block, which gets that process (its ``pid``)."""
    import contextlib
    import subprocess
    import sys

    hold = (
        "import sys\nfrom pathlib import Path\nfrom cellsift._utils import output_lock\n"
        "with output_lock(Path(sys.argv[1]), 'cellsift fit'):\n"
        "    print('held', flush=True); sys.stdin.readline()\n"
    )

    @contextlib.contextmanager
    def held(path: Path) -> Any:
        holder = subprocess.Popen(
            [sys.executable, "-c", hold, str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            yield holder
        finally:
            holder.communicate("\n")

    return held


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def indexed_paths(data_dir: Path) -> dict[str, Path]:
    """The same index-valued atlas (cell i has count i + 1 in gene 0) as h5ad, Zarr, SOMA."""
    return {
        fmt: indexed_atlas(N_INDEXED, 12, path=data_dir / f"indexed.{fmt}", chunk_size=700)
        for fmt in ("h5ad", "zarr", "soma")
    }


@pytest.fixture(scope="session")
def synthetic_h5ad(data_dir: Path) -> Path:
    return synthetic_atlas(3_000, 300, n_studies=4, path=data_dir / "synthetic.h5ad", seed=1)


def decode(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Global index of each cell from its counts (indexed_atlas)."""
    return batch["x_ng"].to_dense()[:, 0].numpy().astype(np.int64) - 1


def train_without(
    model: Any,
    path: Path,
    held: str,
    root: Path,
    *,
    max_epochs: int,
    val_fraction: float,
    trainer: dict[str, Any] | None = None,
    **data: Any,
) -> Any:
    """Train a MetricModel on the atlas at ``path`` without study ``held``, quietly (on the
    CPU unless ``trainer`` says otherwise; ``data``: CellDataModule options). Returns the
    data module."""
    from cellsift.data.datamodule import CellDataModule

    dm = CellDataModule(
        path,
        batch_size=256,
        block_size=16,
        fetch_factor=4,
        val_fraction=val_fraction,
        obs_filter=lambda obs: (obs["dataset_id"] != held).to_numpy(),
        **data,
    )
    model.train(
        dm,
        max_epochs=max_epochs,
        **{"accelerator": "cpu", "devices": 1, **(trainer or {})},
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    return dm
