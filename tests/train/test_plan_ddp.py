"""The training plan under Lightning DDP: 2 CPU processes (gloo), launched as torchrun does."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import pytest
import torch
from test_plan import _setup as setup
from test_plan import _trainer as trainer_for

from cellsift.data.datamodule import CellDataModule
from cellsift.nn import MetricModule
from cellsift.train import TrainingPlan
from cellsift.train.metrics import silhouette
from conftest import start_ranks

WORLD = 2


def _setup(path: str) -> tuple[CellDataModule, MetricModule]:
    return setup(path, batch_size=128, fetch_factor=2, val_fraction=0.3)


def _as_rank(rank: int, port: int) -> None:
    """What torchrun sets: Lightning then runs this process as rank ``rank`` of WORLD."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )


def _rank(rank: int, path: str, out: str, port: int) -> None:
    _as_rank(rank, port)
    torch.manual_seed(0)
    dm, module = _setup(path)
    trainer = trainer_for(out, devices=WORLD, strategy="ddp", max_epochs=2)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trainer.fit(TrainingPlan(module, asw_cells=100_000), datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    warned = [str(w.message) for w in said]
    torch.save(
        {"state": module.state_dict(), "warned": warned, **metrics}, Path(out) / f"rank{rank}.pt"
    )


def _odd_setup(path: str) -> tuple[CellDataModule, MetricModule]:
    return setup(path, batch_size=128, fetch_factor=2, val_fraction=0.1)  # (357 cells)


def _validate_rank(rank: int, path: str, out: str, port: int) -> None:
    _as_rank(rank, port)
    torch.manual_seed(0)
    dm, module = _odd_setup(path)
    trainer = trainer_for(out, devices=WORLD, strategy="ddp")
    trainer.validate(TrainingPlan(module), datamodule=dm, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    torch.save(metrics, Path(out) / f"val{rank}.pt")


@pytest.mark.multi_device
def test_validation_losses_are_cell_means_on_any_number_of_ranks(synthetic_h5ad, tmp_path):
    """One model validated by 1 and by 2 processes: the reconstruction loss, a per-cell
    mean whatever the batches, is the same (review: Lightning's reduction over gloo ranks
    divided their summed batch sizes as integers, 0.13% off with 382 + 383 cells)."""
    port = random.randint(20_000, 40_000)
    start_ranks(_validate_rank, (str(synthetic_h5ad), str(tmp_path), port), nprocs=WORLD)
    r0, r1 = (torch.load(tmp_path / f"val{r}.pt") for r in range(WORLD))
    torch.manual_seed(0)
    dm, module = _odd_setup(str(synthetic_h5ad))
    assert dm.val.n_obs % 2  # (ranks of unequal cells: where the integer division bit)
    one = trainer_for(tmp_path)
    one.validate(TrainingPlan(module), datamodule=dm, verbose=False)
    want = float(one.callback_metrics["val/recon_loss"])
    assert r0["val/recon_loss"] == r1["val/recon_loss"]
    assert r0["val/recon_loss"] == pytest.approx(want, rel=1e-6)


@pytest.mark.multi_device
def test_ddp_keeps_replicas_equal_and_validates_on_the_whole_set(synthetic_h5ad, tmp_path):
    port = random.randint(20_000, 40_000)
    start_ranks(_rank, (str(synthetic_h5ad), str(tmp_path), port), nprocs=WORLD)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    dm, module = _setup(str(synthetic_h5ad))
    # gradients are all-reduced: every step leaves the replicas with the same weights (the
    # BatchNorm running statistics are each rank's own)
    for name, _ in module.named_parameters():
        torch.testing.assert_close(r0["state"][name], r1["state"][name], rtol=0, atol=1e-6)
    # both ranks log one silhouette and one validation loss, of every validation cell
    assert r0["val/asw"] == r1["val/asw"]
    assert r0["val/loss"] == r1["val/loss"]
    # the epoch means are every rank's (gathered): logged as such, Lightning does not ask
    # for sync_dist
    assert r0["train/loss_epoch"] == r1["train/loss_epoch"]
    assert not [w for w in r0["warned"] + r1["warned"] if "sync_dist" in w]
    module.load_state_dict(r0["state"])
    module.eval()
    z, y = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():  # one process: the whole validation set
            z.append(module(batch)["z_nk"])
            y.append(batch["y_n"])
    assert sum(len(t) for t in z) == dm.val.n_obs
    related = module.triplet.related_ll
    # rank 1 validated with its own BatchNorm running statistics (not broadcast in eval)
    full = float(silhouette(torch.cat(z), torch.cat(y), related))
    assert abs(r0["val/asw"] - full) < 2e-3, (r0["val/asw"], full)
