"""`cellsift fit`: LightningCLI on the shipped config, TensorBoard logs, bundle, resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from cellsift.cli import main
from cellsift.models import MetricModel
from cellsift.ontology import load_cell_ontology

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "metric.yaml"
BATCH = 256


class KillAtStep(pl.Callback):
    """SIGKILLs the process at a global step (a crash that runs no clean-up)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _args(
    source: Path, root: Path, *extra: str, callbacks: list | None = None, name: str = "config"
) -> list[str]:
    """The shipped config, pointed at ``root`` and made small; ``extra`` overrides."""
    config = yaml.safe_load(CONFIG.read_text())
    for cb in config["trainer"]["callbacks"]:
        if "dirpath" in cb["init_args"]:
            cb["init_args"]["dirpath"] = str(root / "checkpoints")
    config["trainer"]["callbacks"] += callbacks or []
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(root)
    config["trainer"].update(max_epochs=2, enable_progress_bar=False, default_root_dir=str(root))
    config["model"].update(hidden=[64, 32], latent=16)
    config["data"]["init_args"].update(
        source=str(source),
        num_workers=0,
        batch_size=BATCH,
        split_key="donor_id",
        val_fraction=0.15,
        collection_options={"min_genes": 1},
    )
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["--config", str(path), *extra]


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def _checkpoint_every_step(root: Path) -> dict:
    """A ModelCheckpoint (as a config entry) writing ``last.ckpt`` after every step."""
    return {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(root / "checkpoints"),
            "save_last": True,
            "save_top_k": 0,
            "every_n_train_steps": 1,
        },
    }


def test_fit_trains_logs_and_writes_a_bundle(synthetic_h5ad, tmp_path):
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, "--trainer.log_every_n_steps", "2")]) == 0
    run = tmp_path / "metric" / "version_0"
    scalars = _scalars(run)
    for tag in ("train/loss_step", "train/cells_per_s", "train/lr", "val/asw", "val/loss"):
        assert tag in scalars, tag
    assert len(scalars["val/asw"]) == 2  # one per epoch
    assert (run / "config.yaml").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert any(p.name.startswith("best-") for p in (tmp_path / "checkpoints").iterdir())

    # the bundle: the data's genes and CL labels, linked into the model by the CLI
    model = MetricModel.load(run / "model")
    adata = ad.read_h5ad(synthetic_h5ad)
    assert list(model.genes.genes) == list(adata.var_names)
    labels = sorted(set(adata.obs["cell_type_ontology_term_id"].astype(str)))
    assert model.labels == labels
    assert model.label_names == load_cell_ontology().names(labels)
    z = model.embed(adata[:50])
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)


def test_fit_resumes_mid_epoch_after_a_kill(synthetic_h5ad, tmp_path):
    """A SIGKILL mid-epoch 2; `--ckpt_path last` finishes with exactly the uninterrupted
    run's batches and random draws: the same weights, bit for bit."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    every_step = _checkpoint_every_step(tmp_path)
    kill = {"class_path": "test_fit_cli.KillAtStep", "init_args": {"step": 0}}
    cmd = [sys.executable, "-m", "cellsift.cli", "fit"]
    # the uninterrupted run (2 epochs), in a process of its own as the others
    full = subprocess.run([*cmd, *_args(synthetic_h5ad, tmp_path, name="full")], env=env)
    assert full.returncode == 0
    n_steps = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    n_train = n_steps // 2
    assert n_train >= 4
    for f in (tmp_path / "checkpoints").iterdir():
        f.unlink()

    kill["init_args"]["step"] = n_train + n_train // 2  # mid-epoch 2
    crash = _args(synthetic_h5ad, tmp_path, callbacks=[every_step, kill], name="crash")
    killed = subprocess.run([*cmd, *crash], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 1 and n_train < ckpt["global_step"] < 2 * n_train

    resume = _args(synthetic_h5ad, tmp_path, "--ckpt_path", "last", name="resume")
    resumed = subprocess.run([*cmd, *resume], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stderr + resumed.stdout
    run = tmp_path / "metric" / "version_2"
    # epoch 2 went on from the kill: no batch ran twice or was skipped (a restarted epoch would
    # end at a later step), and the weights are the uninterrupted run's
    assert _scalars(run)["epoch"][-1][0] + 1 == 2 * n_train
    _assert_same_weights(tmp_path / "metric" / "version_0", run)


def _assert_same_weights(run_a: Path, run_b: Path) -> None:
    from safetensors.torch import load_file

    a, b = (load_file(r / "model" / "model.safetensors") for r in (run_a, run_b))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_fit_rejects_labels_that_are_not_cell_ontology(tmp_path):
    from cellsift.datasets import synthetic_atlas

    adata = synthetic_atlas(400, 50, n_studies=2, seed=3)
    adata.obs["cell_type_ontology_term_id"] = (
        adata.obs["cell_type_ontology_term_id"]
        .astype(str)
        .replace({"CL:0000236": "not a cell type"})
    )
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(Exception, match="not a cell type"):
        main(["fit", *_args(path, tmp_path, "--trainer.max_epochs", "1")])


@pytest.mark.multi_device
def test_fit_on_two_ddp_processes_writes_one_bundle(synthetic_h5ad, tmp_path):
    """`cellsift fit --trainer.devices 2 --trainer.strategy ddp` on the CPU (gloo): Lightning
    launches the second rank; every rank reaches the end and rank 0 writes the bundle."""
    args = _args(
        synthetic_h5ad,
        tmp_path,
        *("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cellsift.cli", "fit", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all_gather is deprecated" not in proc.stderr
    run = tmp_path / "metric" / "version_0"
    assert len(_scalars(run)["val/asw"]) == 2
    model = MetricModel.load(run / "model")
    z = model.embed(ad.read_h5ad(synthetic_h5ad)[:20])
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)


@pytest.mark.multi_device
def test_fit_on_two_ddp_processes_resumes_mid_epoch_after_a_kill(synthetic_h5ad, tmp_path):
    """Both ranks SIGKILLed inside epoch 2; `--ckpt_path last` on 2 ranks again goes on from
    the checkpoint's batch and each rank's random state, to the uninterrupted run's weights."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")
    cmd = [sys.executable, "-m", "cellsift.cli", "fit"]
    full_args = _args(synthetic_h5ad, tmp_path, *ddp, name="full")
    full = subprocess.run([*cmd, *full_args], env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    n_steps = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert n_steps >= 6  # two epochs of at least 3 batches per rank
    for f in (tmp_path / "checkpoints").iterdir():
        f.unlink()

    every_step = _checkpoint_every_step(tmp_path)
    kill = {"class_path": "test_fit_cli.KillAtStep", "init_args": {"step": n_steps * 3 // 4}}
    crash = _args(synthetic_h5ad, tmp_path, *ddp, callbacks=[every_step, kill], name="crash")
    killed = subprocess.run([*cmd, *crash], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 1 and n_steps // 2 < ckpt["global_step"] < n_steps

    resume = _args(synthetic_h5ad, tmp_path, *ddp, "--ckpt_path", "last", name="resume")
    resumed = subprocess.run([*cmd, *resume], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stderr + resumed.stdout
    # the resumed run ends at the uninterrupted run's last step with its weights: each rank
    # went on with its own batches and its own random draws
    run = tmp_path / "metric" / "version_2"
    assert _scalars(run)["epoch"][-1][0] + 1 == n_steps
    _assert_same_weights(tmp_path / "metric" / "version_0", run)
