"""`cellsift fit`: LightningCLI on the shipped config, TensorBoard logs, bundle, resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from cellsift._warnings import CellsiftWarning
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


class SignalAtStep(pl.Callback):
    """Sends signal ``sig`` at a global step, as a scheduler does: from another process to
    the whole process group (the DataLoader workers too; a worker killed by it would fail
    the step), or to one DDP rank alone (``rank``)."""

    def __init__(self, step: int, sig: str = "SIGTERM", rank: int | None = None) -> None:
        self.step, self.signum, self.rank = step, getattr(signal, sig), rank

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step != self.step:
            return
        if self.rank is not None:
            if trainer.global_rank == self.rank:
                os.kill(os.getpid(), self.signum)
            return
        group = os.getpgrp()
        sender = os.fork()
        if sender == 0:
            os.killpg(group, self.signum)
            os._exit(0)
        os.waitpid(sender, 0)
        time.sleep(0.5)  # what a dead worker would do to this process has happened by now


class BadCellOnRank(pl.Callback):
    """Raises the error a bad count raises (a DataError) on one DDP rank at a global step,
    as where only that rank's batches hold the cell."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            from cellsift.errors import DataError

            raise DataError(f"bad.h5ad (X): cell 7 ('cell_7') holds nan (rank {self.rank}).")


class StallOnRank(pl.Callback):
    """One DDP rank stalls at a global step outside any collective (a long read, an NCCL
    collective that does not see a peer leave), its process id written to ``pidfile``."""

    def __init__(self, step: int, rank: int, pidfile: str) -> None:
        self.step, self.rank, self.pidfile = step, rank, pidfile

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            Path(self.pidfile).write_text(str(os.getpid()))
            time.sleep(300)


class SecondSignal(pl.Callback):
    """At a global step, a first SIGTERM (held for the end of the step) and a second signal
    ``sig`` in a step that does not end."""

    def __init__(self, step: int, sig: str) -> None:
        self.step, self.signum = step, getattr(signal, sig)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step != self.step:
            return
        os.kill(os.getpid(), signal.SIGTERM)
        assert trainer.lightning_module._stop.signum == signal.SIGTERM
        os.kill(os.getpid(), self.signum)
        time.sleep(10)
        raise AssertionError("the second signal did not stop the step")


class SignalAtFitEnd(pl.Callback):
    """SIGTERM to this process as the fit ends (training done, the bundle not written yet):
    outside a training step, where a fit does not hold the signal."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        raise AssertionError("SIGTERM did not stop the fit")


#: Two fits in threads of one process: A set up, B set up, A failed (its run_fit done).
_A_READY, _B_READY, _A_DONE = (threading.Event() for _ in range(3))


class FailOnceTheOtherFitIsSetUp(pl.Callback):
    """Fit A: fails before its first batch, once fit B has set up."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _A_READY.set()
        _B_READY.wait(300)
        raise RuntimeError("fit A fails before its first batch")


class TrainOnceTheOtherFitHasFailed(pl.Callback):
    """Fit B: set up, trains once fit A has failed."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _B_READY.set()
        _A_DONE.wait(300)


class RecordCells(pl.Callback):
    """Writes each training batch's cells (epoch, step, cell indices) to a file of its
    process in ``folder``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx) -> None:
        cells = ",".join(map(str, batch["obs_idx_n"].tolist()))
        with open(self.folder / f"cells-{os.getpid()}.txt", "a") as f:
            f.write(f"{trainer.current_epoch} {trainer.global_step} {cells}\n")


def _recorded(folder: Path) -> list[tuple[int, int, np.ndarray]]:
    """RecordCells' batches: (epoch, step, cells)."""
    out = []
    for path in folder.glob("cells-*.txt"):
        for line in path.read_text().splitlines():
            epoch, step, cells = line.split()
            out.append((int(epoch), int(step), np.array(cells.split(","), dtype=np.int64)))
    return out


def _args(
    source: Path, root: Path, *extra: str, callbacks: list | None = None, name: str = "config"
) -> list[str]:
    """The shipped config, pointed at ``root`` and made small; ``extra`` overrides."""
    config = yaml.safe_load(CONFIG.read_text())
    for cb in config["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
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


def _fit_process(args: list[str]) -> subprocess.CompletedProcess:
    """``cellsift fit ARGS`` in a process of its own, as a user runs it (this folder on the
    path, for the callbacks the tests define)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    return subprocess.run(
        [sys.executable, "-m", "cellsift.cli", "fit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


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
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    # the bundle holds the best checkpoint's weights (by validation silhouette)
    from safetensors.torch import load_file

    weights = load_file(run / "model" / "model.safetensors")
    state = torch.load(best, weights_only=True)["state_dict"]
    best_epoch = int(best.name.split("epoch=")[1].split("-")[0])
    asw = [v for _, v in scalars["val/asw"]]
    assert best_epoch == int(np.argmax(asw))
    for (
        key,
        value,
    ) in weights.items():  # "encoder.network..." in the bundle, "module.encoder..." here
        torch.testing.assert_close(value, state[f"module.{key}"], rtol=0, atol=0, msg=key)

    # the bundle: the data's genes and CL labels, linked into the model by the CLI
    model = MetricModel.load(run / "model")
    adata = ad.read_h5ad(synthetic_h5ad)
    assert list(model.genes.genes) == list(adata.var_names)
    labels = sorted(set(adata.obs["cell_type_ontology_term_id"].astype(str)))
    assert model.labels == labels
    assert model.label_names == load_cell_ontology().names(labels)
    z = model.embed(adata[:50])
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)


def test_fit_validates_where_max_steps_ends_an_epoch_early(synthetic_h5ad, tmp_path):
    """max_steps short of an epoch: the run validates the weights it ends with, which the
    config's EarlyStopping and best checkpoint watch (they found no val/asw before)."""
    steps = ("--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1")
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, *steps)]) == 0
    run = tmp_path / "metric" / "version_0"
    scalars = _scalars(run)
    assert [step for step, _ in scalars["train/loss_step"]] == [0, 1, 2]  # one epoch is ~9
    assert [step for step, _ in scalars["val/asw"]] == [2]  # after the last step
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    assert best.name == "best-epoch=0-step=3.ckpt"
    assert (run / "model" / "model.safetensors").exists()


def test_fit_keeps_checkpoints_of_a_callback_without_a_folder_where_last_finds_them(
    synthetic_h5ad, tmp_path
):
    """A config's ModelCheckpoint without dirpath keeps its checkpoints in the logger's
    folder of runs (<save_dir>/<name>/checkpoints), not in one run's version_0: a run
    resumed with --ckpt_path last goes on from them, in the same TensorBoard run. The
    shipped config's are such (review: a fixed folder for every run let `last` resume
    another run's checkpoint, one of another save_dir)."""
    shipped = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"]
    assert not [cb for cb in shipped if "dirpath" in cb["init_args"]]
    args = _args(synthetic_h5ad, tmp_path, "--trainer.log_every_n_steps", "1")
    config = yaml.safe_load(Path(args[1]).read_text())
    for cb in config["trainer"]["callbacks"]:
        cb["init_args"].pop("dirpath", None)
    config["trainer"]["max_epochs"] = 1
    Path(args[1]).write_text(yaml.safe_dump(config))
    assert main(["fit", *args]) == 0
    kept = tmp_path / "metric" / "checkpoints"
    assert (kept / "last.ckpt").exists() and list(kept.glob("best-*.ckpt"))
    assert not (tmp_path / "metric" / "version_0" / "checkpoints").exists()
    first = torch.load(kept / "last.ckpt", weights_only=True)["global_step"]
    resume = ("--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert main(["fit", *args, *resume]) == 0
    assert [p.name for p in (tmp_path / "metric").glob("version_*")] == ["version_0"]
    steps = [step for step, _ in _scalars(tmp_path / "metric" / "version_0")["train/loss_step"]]
    assert steps == list(range(2 * first))  # the second epoch's, after the first's


_FIT_UNDER_A_LIMIT = r"""
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # (Python ignores SIGXFSZ)
from cellsift.cli import main
sys.exit(main(["fit", *sys.argv[2:]]))
"""


def test_fit_into_a_folder_another_fit_writes_is_refused_in_one_line(
    synthetic_h5ad, tmp_path, capsys, held_elsewhere
):
    """A second run of one config (its checkpoints in ``<save_dir>/<name>/checkpoints``, as
    the first's) while the first runs: refused in one line, exit 2, before training."""
    from cellsift.train.resume import FIT_LOCK

    args = _args(synthetic_h5ad, tmp_path, "--trainer.max_steps", "1")
    folder = tmp_path / "checkpoints"
    with held_elsewhere(folder / FIT_LOCK) as holder:
        assert main(["fit", *args]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith(f"cellsift fit: error: {folder} is the checkpoint folder of another")
    assert f"(process {holder.pid})" in said and "--trainer.logger.init_args.name" in said
    assert not list(folder.glob("*.ckpt"))
    assert not (tmp_path / "metric").exists()  # no run folder of a run that never trained
    assert main(["fit", *args]) == 0  # (that run ended)
    run = tmp_path / "metric" / "version_0"
    kept = sorted(p.name for p in run.iterdir())
    assert "model" in kept and "config.yaml" in kept
    # refused again: the run before it is kept whole, and the refused run's folder goes,
    # as does its resume's (a run folder that was there: kept whole)
    with held_elsewhere(folder / FIT_LOCK):
        assert main(["fit", *args]) == 2
        assert main(["fit", *args, "--ckpt_path", "last"]) == 2
    assert sorted(p.name for p in run.iterdir()) == kept
    assert [p.name for p in (tmp_path / "metric").iterdir()] == ["version_0"]
    # another process's run given the same version (its events file): kept
    other = tmp_path / "metric" / "version_1"
    other.mkdir()
    (other / "config.yaml").write_text("theirs")
    events = other / "events.out.tfevents.1.another-host.1.0"
    events.write_text("")
    with held_elsewhere(folder / FIT_LOCK):
        assert main(["fit", *args, "--trainer.logger.init_args.version", "1"]) == 2
    assert events.exists() and (other / "config.yaml").exists()


@pytest.mark.parametrize("step", [0, 1])
def test_a_fit_that_failed_keeps_its_run_folder_once_it_has_trained(
    synthetic_h5ad, tmp_path, capsys, step
):
    """A bad cell met in the first batch: the run never trained, and its folder of logs
    goes with it; met in the second, the run's logs and config stay."""
    bad = {"class_path": "test_fit_cli.BadCellOnRank", "init_args": {"step": step, "rank": 0}}
    args = _args(synthetic_h5ad, tmp_path, "--trainer.log_every_n_steps", "1", callbacks=[bad])
    assert main(["fit", *args]) == 2
    assert "cell 7 ('cell_7') holds nan" in capsys.readouterr().err
    run = tmp_path / "metric" / "version_0"
    if step == 0:
        assert not (tmp_path / "metric").exists()
    else:
        assert (run / "config.yaml").exists() and "train/loss_step" in _scalars(run)


def test_a_fit_failing_in_one_thread_removes_only_its_own_run_folder(synthetic_h5ad, tmp_path):
    """Fits in two threads of one process: A sets up, B sets up, A fails before its first
    batch: A's run folder goes, B's (set up after A's, its events file of the same
    process) stays and B trains (review185: B's was removed, and B failed writing to it)."""
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    a = {"class_path": "test_fit_cli.FailOnceTheOtherFitIsSetUp"}
    b = {"class_path": "test_fit_cli.TrainOnceTheOtherFitHasFailed"}
    one = ("--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1")
    args_a = _args(synthetic_h5ad, tmp_path / "A", *one, callbacks=[a], name="a")
    args_b = _args(synthetic_h5ad, tmp_path / "B", *one, callbacks=[b], name="b")
    status = {}

    def fit(name, args, done=None):
        try:
            status[name] = main(["fit", *args])
        except RuntimeError as err:
            status[name] = str(err)
        finally:
            if done is not None:
                done.set()

    for event in (_A_READY, _B_READY, _A_DONE):
        event.clear()
    first = threading.Thread(target=fit, args=("A", args_a, _A_DONE))
    first.start()
    assert _A_READY.wait(300)
    second = threading.Thread(target=fit, args=("B", args_b))
    second.start()
    first.join(300)
    second.join(300)
    assert status == {"A": "fit A fails before its first batch", "B": 0}
    assert not (tmp_path / "A" / "metric").exists()
    run_b = tmp_path / "B" / "metric" / "version_0"
    assert (run_b / "config.yaml").exists() and "train/loss_step" in _scalars(run_b)


def test_a_checkpoint_the_disk_refuses_is_said_naming_it_and_the_last_one_is_kept(
    synthetic_h5ad, tmp_path
):
    """A checkpoint write that the machine stops (a file size limit here; a full disk
    alike): one line naming the checkpoint (not a temporary file elsewhere), the last
    checkpoint whole, and no partial file beside it. Lightning's writer staged the file in
    the system's temporary folder and copied it over the last one where the two are on
    different file systems, and its error named the staged file."""
    root = tmp_path / "run"
    root.mkdir()
    args = _args(synthetic_h5ad, root)
    assert main(["fit", *args, "--trainer.max_steps", "1"]) == 0
    last = root / "checkpoints" / "last.ckpt"
    size = last.stat().st_size
    assert size > 200_000  # (the limit below is under one checkpoint)
    done = subprocess.run(
        [sys.executable, "-c", _FIT_UNDER_A_LIMIT, str(size // 2), *args,
         "--trainer.max_steps", "3", "--ckpt_path", "last"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith(f"cellsift fit: error: [Errno 27] File too large: {last};"), said
    assert torch.load(last, weights_only=True)["global_step"] == 1
    left = sorted(p.name for p in last.parent.iterdir())
    assert [n for n in left if not n.startswith("best-")] == ["last.ckpt"], left


_DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")


@pytest.mark.parametrize(
    "devices", [1, pytest.param(2, marks=pytest.mark.multi_device)], ids=["1proc", "2ddp"]
)
def test_fit_resumes_mid_epoch_after_a_kill(synthetic_h5ad, tmp_path, devices):
    """One run interrupted three times, each resumed with `--ckpt_path last`: stopped by a
    scheduler's SIGTERM inside epoch 1, then at its last step (before its validation), then
    every process SIGKILLed inside epoch 2; it ends with exactly the uninterrupted run's
    batches and each rank's random draws: the same weights, bit for bit, and the same curves.
    With 2 DDP processes (gloo) Lightning launches the second rank itself, as for a user."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    ddp = _DDP if devices == 2 else ()
    cmd = [sys.executable, "-m", "cellsift.cli", "fit"]

    def fit(*args: str, callbacks: list | None = None, name: str) -> subprocess.CompletedProcess:
        every_step = ("--trainer.log_every_n_steps", "1")
        run_args = _args(
            synthetic_h5ad, tmp_path, *ddp, *every_step, *args, callbacks=callbacks, name=name
        )
        return subprocess.run(  # (a session of its own: SignalAtStep signals its group)
            [*cmd, *run_args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            start_new_session=True,
        )

    def said_stopped(done: subprocess.CompletedProcess, step: int) -> None:
        """Every rank stopped after ``step`` (epoch 0), its state saved, exit status 143."""
        assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
        said = [line for line in done.stderr.splitlines() if line.startswith("cellsift fit: ")]
        assert said and f"after step {step} (epoch 0)" in said[0], done.stderr[-3000:]
        assert "--ckpt_path last" in said[0]
        last = tmp_path / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=False)["global_step"] == step

    def resume(*args: str, callbacks: list | None = None, name: str) -> subprocess.CompletedProcess:
        done = fit("--ckpt_path", "last", *args, callbacks=callbacks, name=name)
        assert "Restored all states" in done.stderr + done.stdout, done.stderr[-3000:]
        return done

    # the uninterrupted run (2 epochs); every rank reaches the end, rank 0 writes the bundle
    full = fit(name="full")
    assert full.returncode == 0, full.stderr[-3000:]
    assert "all_gather is deprecated" not in full.stderr
    assert "litlogger" not in full.stderr  # nor Lightning's advert for a cloud logger
    run_full = tmp_path / "metric" / "version_0"
    assert len(_scalars(run_full)["val/asw"]) == 2
    z = MetricModel.load(run_full / "model").embed(ad.read_h5ad(synthetic_h5ad)[:20])
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    n_steps = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    n_train = n_steps // 2  # batches per epoch (per rank)
    assert n_train >= 3
    for f in (tmp_path / "checkpoints").iterdir():
        f.unlink()

    # stopped by a scheduler's SIGTERM in the first epoch, sent to every process of the job
    # (the loader's worker too) or, under DDP, to rank 1 alone: every rank stops after that
    # step with its state saved (each rank's place in the epoch)
    stop_at = n_train // 2
    term = {
        "class_path": "test_fit_cli.SignalAtStep",
        "init_args": {"step": stop_at, "rank": 1 if devices == 2 else None},
    }
    worker = ("--data.init_args.num_workers", "1") if devices == 1 else ()
    said_stopped(fit(*worker, callbacks=[term], name="stopped"), stop_at)

    # resumed, and stopped again at the first epoch's last step, before its validation
    term["init_args"]["step"] = n_train
    said_stopped(resume(callbacks=[term], name="stopped_at_epoch_end"), n_train)

    # resumed (it validates that epoch first, as the uninterrupted run did), and every
    # process killed outright inside epoch 2, a checkpoint written after every step
    kill = {"class_path": "test_fit_cli.KillAtStep", "init_args": {"step": n_train * 3 // 2}}
    killed = resume(callbacks=[_checkpoint_every_step(tmp_path), kill], name="crash")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # (the newest last*.ckpt, as "last" finds it: this callback's, beside the stopped runs')
    last = max((tmp_path / "checkpoints").glob("last*.ckpt"), key=lambda f: f.stat().st_mtime)
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["epoch"] == 1 and n_train < ckpt["global_step"] < n_steps

    resumed = resume(name="resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # each part logs on in the interrupted run's TensorBoard run, and the bundle lands there
    run = tmp_path / "metric" / "version_1"
    assert not (tmp_path / "metric" / "version_2").exists()
    _assert_same_weights(run_full, run)
    # no batch ran twice or was skipped (a restarted epoch would end at a later step); one
    # value per step, those the signals ended too (logged before they stopped), and what
    # the killed part logged after its checkpoint purged
    full_scalars, scalars = _scalars(run_full), _scalars(run)
    assert scalars["epoch"][-1][0] + 1 == n_steps
    steps = [step for step, _ in scalars["train/loss_step"]]
    assert steps == list(range(n_steps)), steps
    # the same validations at the same steps, and the same epoch means
    for tag in ("val/asw", "train/loss_epoch"):
        assert [s for s, _ in scalars[tag]] == [s for s, _ in full_scalars[tag]], tag
        np.testing.assert_allclose(
            [v for _, v in scalars[tag]], [v for _, v in full_scalars[tag]], rtol=1e-5
        )


def _assert_same_weights(run_a: Path, run_b: Path) -> None:
    from safetensors.torch import load_file

    a, b = (load_file(r / "model" / "model.safetensors") for r in (run_a, run_b))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_fit_stopped_at_once_by_a_second_signal_exits_with_the_signals_status(
    synthetic_h5ad, tmp_path, capsys, sig
):
    """Lightning ends a fit interrupted at once with status 1, as if it had failed: `cellsift
    fit` says it was interrupted and exits with the second signal's status (130, 143)."""
    second = {"class_path": "test_fit_cli.SecondSignal", "init_args": {"step": 2, "sig": sig}}
    args = _args(synthetic_h5ad, tmp_path, "--trainer.max_epochs", "1", callbacks=[second])
    handler = signal.getsignal(signal.SIGINT)
    assert main(["fit", *args]) == 128 + getattr(signal, sig)
    how = "terminated" if sig == "SIGTERM" else "interrupted"
    assert f"cellsift fit: {how};" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler


def test_fit_terminated_outside_a_step_says_so_and_leaves_no_partial_bundle(
    synthetic_h5ad, tmp_path
):
    """SIGTERM once training is done (as the bundle is about to be written): the command
    ends as Ctrl-C ends it, status 143 and one line, with no bundle half written."""
    late = {"class_path": "test_fit_cli.SignalAtFitEnd"}
    run = _fit_process(
        _args(synthetic_h5ad, tmp_path, "--trainer.max_epochs", "1", callbacks=[late])
    )
    assert run.returncode == 143, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1] == (
        "cellsift fit: terminated; no partial output was left in place."
    )
    assert not list(tmp_path.rglob("model")) and not list(tmp_path.rglob(".model.*"))


def test_fit_says_settings_lightning_meets_late_in_one_line(synthetic_h5ad, tmp_path, capsys):
    """An EarlyStopping that watches a metric nothing logs (warned of before training: a
    callback of the user's may log it); validation without groups to hold out: one line
    each, exit status 2, the second before a step."""
    watch = {"class_path": "lightning.pytorch.callbacks.EarlyStopping"}
    watch["init_args"] = {"monitor": "val/accuracy"}
    args = _args(synthetic_h5ad, tmp_path, "--trainer.max_epochs", "1", callbacks=[watch])
    with pytest.warns(CellsiftWarning, match=r"watch val/accuracy, which the model does not"):
        assert main(["fit", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cellsift fit: error: Early stopping conditioned on metric")
    assert not any(line.lstrip().startswith("File ") for line in err)
    no_groups = ("--data.init_args.split_key", "null", "--data.init_args.study_key", "null")
    with pytest.warns(CellsiftWarning, match=r"val_fraction=0.15 holds out no cells"):
        assert main(["fit", *_args(synthetic_h5ad, tmp_path, *no_groups, name="no_groups")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "whole groups of split_key, and none is set" in err[-1]
    assert "--data.init_args.split_key donor_id" in err[-1]


def test_a_fast_dev_run_leaves_nothing_a_real_run_would_take_up(synthetic_h5ad, tmp_path, caplog):
    """fast_dev_run tries the settings on a step: it keeps no checkpoint (which the real
    run's ckpt_path='last' would resume from) and writes no bundle."""
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, "--trainer.fast_dev_run", "true")]) == 0
    assert "fast_dev_run, so no model bundle is written" in caplog.text
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("model.safetensors"))


def test_runs_sharing_a_folder_keep_their_ranks_errors_apart(tmp_path):
    """The notes a rank leaves for rank 0 are its run's: another run in the same root
    directory neither reads them as its own nor removes them."""
    import types

    from cellsift.errors import DataError
    from cellsift.train import cli

    def run(run_id: str, rank: int) -> None:
        cli._RUN.clear()
        cli._RUN.update(root=tmp_path, run=run_id, rank=rank, world=2, start=time.time())

    try:
        run("b", 1)  # run B's rank 1 meets a bad cell
        bad = DataError("cell 7 holds nan (run B)")
        cli._RankErrors().on_exception(types.SimpleNamespace(global_rank=1), None, bad)
        run("a", 0)  # run A's rank 0, its collective cut short by something else
        assert cli._peer_error(wait=0.2) is None
        cli._clear_rank_errors()  # run A ends
        run("b", 0)
        assert str(cli._peer_error(wait=0.2)) == "cell 7 holds nan (run B)"
        cli._clear_rank_errors()
        assert not list(tmp_path.iterdir())
    finally:
        cli._RUN.clear()


def test_rank_0_keeps_its_error_until_the_other_ranks_have_read_it(tmp_path):
    """Rank 0, failing on its input, clears its note only once each other rank has read
    it (that rank then says rank 0's error, not its collective's traceback), has left an
    error of its own, or, started by this process, has exited; else after the wait. The
    ranks it started are no longer watched by Lightning's watcher (which SIGKILLs the
    process once one exits with a nonzero status, as they do with an input error)."""
    import threading
    import types

    from cellsift._utils import read_error
    from cellsift.errors import DataError
    from cellsift.train import cli

    def as_rank(rank: int, launcher: object = None, world: int = 2) -> None:
        cli._RUN.clear()
        cli._RUN.update(root=tmp_path, run="r", rank=rank, world=world, launcher=launcher)

    def fails(rank: int, message: str) -> None:
        error = DataError(message)
        cli._RankErrors().on_exception(types.SimpleNamespace(global_rank=rank), None, error)

    def waited(wait: float = 20.0) -> float:
        start = time.monotonic()
        cli._let_ranks_read_errors(wait=wait)
        return time.monotonic() - start

    try:
        as_rank(0)
        fails(0, "cell 7 holds nan (rank 0)")
        as_rank(1)  # its collective cut short: it reads rank 0's error, and says so
        assert str(cli._peer_error(wait=1.0)) == "cell 7 holds nan (rank 0)"
        as_rank(0)
        assert waited() < 2.0  # (read already)
        cli._clear_rank_errors()
        assert not list(tmp_path.iterdir())

        # rank 1 reads it while rank 0 waits (ranks another launcher started: torchrun)
        fails(0, "cell 7 holds nan (rank 0)")
        note, read = cli._rank_error_file(0), cli._rank_read_file(1)

        def rank_1_reads() -> None:
            time.sleep(0.5)
            assert str(read_error(note)) == "cell 7 holds nan (rank 0)"
            read.touch()

        reader = threading.Thread(target=rank_1_reads)
        reader.start()
        took = waited()
        reader.join()
        assert read.exists() and 0.4 < took < 10.0
        cli._clear_rank_errors()

        # a rank that failed on its own input has nothing to read
        fails(1, "cell 9 holds nan (rank 1)")
        assert waited() < 2.0
        cli._clear_rank_errors()

        # a rank that never reads it: rank 0 goes on after the wait
        fails(0, "cell 7 holds nan (rank 0)")
        assert 0.5 <= waited(0.5) < 5.0
        cli._clear_rank_errors()

        # ranks this process started (1 and 2 of 4; rank 3, on another machine, reads it
        # late): no longer watched while rank 0 waits, and counted once they have exited
        procs = [
            subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({t})"])
            for t in (0.2, 0.6)
        ]
        launcher = types.SimpleNamespace(procs=list(procs))
        watched, seen_watched = launcher.procs, []
        as_rank(0, launcher, world=4)
        fails(0, "cell 7 holds nan (rank 0)")
        fails(1, "cell 1 holds nan (rank 1)")  # (rank 1 failed on its own)

        def rank_3_reads() -> None:
            time.sleep(1.0)
            seen_watched.append(list(watched))
            cli._rank_read_file(3).touch()

        reader = threading.Thread(target=rank_3_reads)
        reader.start()
        took = waited()
        reader.join()
        assert seen_watched == [[]] and 0.9 < took < 10.0
        assert watched == [] and all(p.poll() is not None for p in procs)
        cli._clear_rank_errors()
        assert not list(tmp_path.iterdir())
        procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])]
        as_rank(0, types.SimpleNamespace(procs=list(procs)))
        fails(0, "cell 7 holds nan (rank 0)")
        try:
            assert 0.5 <= waited(0.5) < 5.0  # (still running: rank 0 goes on)
        finally:
            procs[0].kill()
            procs[0].wait()
        cli._clear_rank_errors()
        assert not list(tmp_path.iterdir())
    finally:
        cli._RUN.clear()


@pytest.mark.multi_device
@pytest.mark.parametrize("rank", [0, 1])
def test_fit_says_one_ranks_bad_input_in_one_line(synthetic_h5ad, tmp_path, rank):
    """Under DDP (2 gloo processes) a bad cell only one rank reads: the other rank's
    collective is cut short; each process says that rank's error in one line (no
    traceback of the collective), the command exits with status 2, as one process does,
    and leaves no note of it behind."""
    bad = {"class_path": "test_fit_cli.BadCellOnRank", "init_args": {"step": 1, "rank": rank}}
    run = _fit_process(_args(synthetic_h5ad, tmp_path, *_DDP, callbacks=[bad]))
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    said = [line for line in run.stderr.splitlines() if line.startswith("cellsift fit: error:")]
    assert len(said) == 2, run.stderr[-3000:]
    assert all(f"cell 7 ('cell_7') holds nan (rank {rank})" in line for line in said)
    assert not list(tmp_path.glob(".cellsift-fit-*"))


@pytest.mark.multi_device
def test_a_rank_that_does_not_stop_after_rank_0s_error_is_ended(synthetic_h5ad, tmp_path):
    """Rank 0 fails on its input while rank 1 is busy outside any collective: rank 0 says
    its error and, after its wait, ends the rank it started (left running, it would hold
    its device until its collective timed out), exit status 2, nothing left behind."""
    pidfile = tmp_path / "rank1.pid"
    bad = {"class_path": "test_fit_cli.BadCellOnRank", "init_args": {"step": 1, "rank": 0}}
    stall = {
        "class_path": "test_fit_cli.StallOnRank",
        "init_args": {"step": 1, "rank": 1, "pidfile": str(pidfile)},
    }
    start = time.monotonic()
    run = _fit_process(_args(synthetic_h5ad, tmp_path, *_DDP, callbacks=[bad, stall]))
    # (its pipes held open by a rank left running, the command would end with it: 300 s)
    assert run.returncode == 2 and time.monotonic() - start < 150, run.stderr[-3000:]
    said = [line for line in run.stderr.splitlines() if line.startswith("cellsift fit: error:")]
    assert len(said) == 1 and "cell 7 ('cell_7') holds nan (rank 0)" in said[0]
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not list(tmp_path.glob(".cellsift-fit-*"))


def test_fit_trains_labels_outside_the_cell_ontology_as_they_are(tmp_path, capsys):
    """Cell-line labels: refused with the two settings that take them as they are, and with
    those, trained into a bundle that keeps them as written."""
    from cellsift.datasets import synthetic_atlas

    adata = synthetic_atlas(500, 200, n_studies=2, seed=4)
    obs = adata.obs["cell_type_ontology_term_id"].astype(str)
    lines = {t: f"line-{i}" for i, t in enumerate(sorted(set(obs)))}
    adata.obs["cell_type_ontology_term_id"] = adata.obs["cell_line"] = obs.map(lines)
    path = tmp_path / "lines.h5ad"
    adata.write_h5ad(path)
    one = ("--trainer.max_epochs", "1")
    assert main(["fit", *_args(path, tmp_path, *one)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'line-0'" in err[0]
    assert "--data.init_args.harmonize_labels false --model.ontology_aware false" in err[0]
    as_they_are = ("--data.init_args.harmonize_labels", "false", "--model.ontology_aware", "false")
    bundle = tmp_path / "bundle"
    extra = (*one, *as_they_are, "--model.bundle_dir", str(bundle))
    extra += ("--data.init_args.label_key", "cell_line")
    assert main(["fit", *_args(path, tmp_path, *extra, name="lines")]) == 0
    model = MetricModel.load(bundle)
    assert model.labels == model.label_names == sorted(lines.values())
    assert model.config["loss"]["ontology_aware"] is False
    assert model.label_key == "cell_line"  # what fine-tuning the bundle reads labels from
    # a new run into the same bundle_dir: refused before training (hunt231: replaced the
    # earlier run's bundle without a word); the run that wrote it resumes into it
    written = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    capsys.readouterr()
    assert main(["fit", *_args(path, tmp_path, *extra, name="lines")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"--model.bundle_dir {bundle} holds a model bundle already" in err[-1]
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == written
    # (hunt253) --ckpt_path last that finds no checkpoint starts a new run: refused too (it
    # replaced the bundle); the model's genes or labels in a config are the data's to set
    # (dropped without a word), and a watched metric the run does not log is named before
    # the first epoch (Lightning named it at the epoch's end)
    for folder in ("elsewhere", "typo"):
        (tmp_path / folder).mkdir()
    elsewhere = _args(path, tmp_path / "elsewhere", *extra, "--ckpt_path", "last", name="lines")
    assert main(["fit", *elsewhere]) == 2
    assert "--ckpt_path last finds no checkpoint to resume" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == written
    linked = tmp_path / "linked.yaml"
    linked.write_text("model:\n  labels: [line-0, line-1]\n")
    for given in (("--config", str(linked)), ("--model.labels", "[line-0,line-1]")):
        assert main(["fit", *_args(path, tmp_path, *one, *as_they_are, *given)]) == 2
        assert "set data.init_args.labels instead" in capsys.readouterr().err
    typo = ("--trainer.callbacks.monitor", "val/ASW")  # (the EarlyStopping's)
    assert main(["fit", *_args(path, tmp_path / "typo", *one, *as_they_are, *typo)]) == 2
    assert "callbacks watch val/ASW, which this run does not log: it logs val/asw" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "typo" / "checkpoints").exists() or not any(
        (tmp_path / "typo" / "checkpoints").iterdir()
    )
    trial = (*extra, "--trainer.fast_dev_run", "true")  # (writes no bundle: review212)
    assert main(["fit", *_args(path, tmp_path, *trial, name="lines")]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == written
    resumed = (*extra[:-2], "--trainer.max_epochs", "2", *extra[-2:], "--ckpt_path", "last")
    assert main(["fit", *_args(path, tmp_path, *resumed, name="lines")]) == 0
    assert MetricModel.load(bundle).labels == sorted(lines.values())


def test_an_empty_label_among_those_given_is_said_in_one_line(synthetic_h5ad, tmp_path, capsys):
    """An empty label in data.init_args.labels: the model refuses it in one line (review237:
    a ValueError's traceback; before, a bundle written that load refused)."""
    given = ["--model.ontology_aware", "false", "--data.init_args.harmonize_labels", "false"]
    given += ["--data.init_args.labels", '["x", ""]']
    with warnings.catch_warnings():  # (the cells' labels are not among those given)
        warnings.simplefilter("ignore", CellsiftWarning)
        assert main(["fit", *_args(synthetic_h5ad, tmp_path, *given)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "label 1 has the empty label" in err[-1] and err[-1].startswith("cellsift fit: error")
    assert not any(line.lstrip().startswith("File ") for line in err)
    assert not list(tmp_path.rglob("model"))


def test_a_new_run_without_a_logger_keeps_the_bundle_an_earlier_one_wrote(tmp_path, capsys):
    """Without a logger a fit's bundle is <default_root_dir>/model, the same folder for every
    run there: a new run is refused (hunt253: it replaced the earlier run's bundle, exit
    0); the run that wrote it resumes into it."""
    from cellsift.datasets import synthetic_atlas

    path = tmp_path / "atlas.h5ad"
    synthetic_atlas(400, 50, n_studies=2, seed=3).write_h5ad(path)
    args = _args(path, tmp_path, "--trainer.max_epochs", "1", "--trainer.logger", "false")
    assert main(["fit", *args]) == 0
    bundle = tmp_path / "model"
    written = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    capsys.readouterr()
    assert main(["fit", *args, "--seed_everything", "5"]) == 2
    assert f"{bundle} (this run's folder" in capsys.readouterr().err
    # an empty --ckpt_path (a script's unset variable): refused, neither resumed nor a new
    # run (hunt268: named the working folder "a folder, not a checkpoint file")
    for empty in ("", " "):
        assert main(["fit", *args, "--ckpt_path", empty]) == 2
        assert "ckpt_path (--ckpt_path, or the config's) is empty: give the" in (
            capsys.readouterr().err
        )
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == written
    resumed = [*args, "--trainer.max_epochs", "2", "--ckpt_path", "last"]
    assert main(["fit", *resumed]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} != written


def test_fit_names_bad_labels_and_missing_columns_in_one_line(tmp_path, capsys):
    from cellsift.datasets import synthetic_atlas

    adata = synthetic_atlas(400, 50, n_studies=2, seed=3)
    good = tmp_path / "good.h5ad"
    adata.write_h5ad(good)
    adata.obs["cell_type_ontology_term_id"] = (
        adata.obs["cell_type_ontology_term_id"]
        .astype(str)
        .replace({"CL:0000236": "not a cell type"})
    )
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    assert main(["fit", *_args(path, tmp_path, "--trainer.max_epochs", "1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cellsift fit: error: ")
    assert "not a cell type" in err[0]
    # a study column the data lack: named, with the columns they have
    no_study = ("--data.init_args.study_key", "study", "--data.init_args.split_key", "donor_id")
    assert main(["fit", *_args(good, tmp_path, *no_study, name="no_study")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "study_key='study' names no obs column" in err[0]
        and "dataset_id" in err[0]
    )
    # its fix in the command's options, not the library's arguments (review)
    assert "Pass --data.init_args.study_key the column" in err[0]
    assert (
        "or --data.init_args.study_key null for data of one study (then validate on the "
        "groups of a --data.init_args.split_key, or pass --data.init_args.val_fraction 0)" in err[0]
    )
    assert "=None" not in err[0] and "val_fraction=" not in err[0]
    # no validation cells, with the config's callbacks watching val/asw: said before training
    no_val = ("--data.init_args.val_fraction", "0")
    assert main(["fit", *_args(good, tmp_path, *no_val, name="no_val")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "watch val/asw" in err[0] and "val_fraction" in err[0]
    assert not (tmp_path / "checkpoints").exists()  # nothing trained
    # validation cells, but a trainer that runs no validation: said before training too
    no_runs = ("--trainer.limit_val_batches", "0")
    assert main(["fit", *_args(good, tmp_path, *no_runs, name="no_runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "limit_val_batches=0 runs no validation" in err[0]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--data.init_args.val_groups", "[donor_999]"],
            r"val_groups \['donor_999'\] are not groups of 'donor_id' among the cells kept",
        ),
        (  # numbers, as a YAML list of donor ids gives them: read as text
            ["--data.init_args.val_groups", "[1015]"],
            r"val_groups \['1015'\] are not groups of 'donor_id' among the cells kept",
        ),
        (["--data.init_args.collection_options", '{"min_gene": 1}'], r"\['min_gene'\], which"),
        (["--data.init_args.batch_size", "1"], "batch_size must be at least 2 for training"),
        (["--model.classifier_weight", "1.0"], r"classifier_weight must lie in \[0, 1 - trip"),
        (["--model.triplet_weight", "1.5"], r"triplet_weight must lie in \[0, 1\], not 1.5"),
        (["--model.lr", "-1"], "lr must be > 0"),
        (["--model.asw_cells", "1"], "asw_cells must be a whole number of at least 2"),
        (["--trainer.max_epochs", "0"], "no training step ran"),
        (["--trainer.max_epochs", "-1"], r"this run has no last step \(max_epochs=-1 and no"),
        (["--ckpt_path", "best"], r"--ckpt_path best names the best checkpoint of a fit run in"),
        (["--model.dropout", "1.5"], r"dropout is a probability in \[0, 1\), not 1.5"),
        (["--model.hidden", "[]"], r"hidden lists the widths of at least one layer"),
        (["--model.hidden", "[0]"], r"hidden lists the widths .* not \[0\]"),
        (["--model.latent", "0"], "latent is the embedding's width, at least 2, not 0"),
        (["--model.margin", "-1"], "margin is a finite distance, at least 0, not -1"),
        (["--model.target_sum", "0"], "target_sum is the counts per cell .* above 0"),
        (["--data.init_args.val_fraction", "1.5"], r"val_fraction .* in \[0, 1\), not 1.5"),
        (["--data.init_args.num_workers", "-1"], "num_workers counts loader processes"),
        (
            ["--data.init_args.mode", "blocks"],
            r"--data.init_args.mode: 'blocks' is not valid \(expected one of 'sequential'",
        ),
        (
            ["--data.init_args.batch_sise", "3"],
            r"--data\.init_args\.batch_sise is not an option of CellDataModule",
        ),
        (["--trainer.precision", "17"], r"precision: '17' is not valid \(expected .*'bf16-mixed'"),
        # Lightning's own checks of the trainer, and the settings it divides by unchecked
        (["--trainer.max_epochs", "-3"], r"`max_epochs` must be a non-negative integer or -1"),
        (["--trainer.devices", "0"], r"`Trainer\(devices='0'\)` value is not a valid input"),
        (["--trainer.accumulate_grad_batches", "0"], r"accumulate_grad_batches is .* not 0\."),
        (["--trainer.val_check_interval", "0"], r"val_check_interval is a share .* not 0\."),
        (["--trainer.val_check_interval", "0.0"], r"val_check_interval is a share .* not 0\.0"),
        (["--trainer.val_check_interval", "1.5"], r"invalid value 1.5 for val_check_interval"),
        (["--trainer.val_check_interval", "100000"], r"`val_check_interval` \(100000\) must be"),
        # a setting of the class inside the optional data section, named as it was given
        (
            ["--data.init_args.pin_memory", "maybe"],
            r"--data\.init_args\.pin_memory: 'maybe' is not valid \(expected bool or null\) \(",
        ),
        (
            ["--data.init_args.val_groups", "5x"],
            r"--data\.init_args\.val_groups: '5x' is not valid \(expected a list or null\) \(",
        ),
        (["--model.margin", "abc"], r"--model\.margin: 'abc' is not valid \(expected float\) \("),
        # a class_path that names no class: the reason, not the whole section's value
        (
            ["--data", "cellsift.data.datamodule.CellDataModul"],
            r"--data: class_path 'cellsift\.data\.datamodule\.CellDataModul' cannot be used "
            r"\(module 'cellsift\.data\.datamodule' has no attribute 'CellDataModul'\)",
        ),
        (  # a class whose arguments are not all given: named as options
            ["--optimizer", "AdamW", "--lr_scheduler", "StepLR"],
            r"--lr_scheduler: StepLR needs step_size \(--lr_scheduler\.step_size\) \(",
        ),
        (
            ["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLoger"],
            r"--trainer\.logger: class_path '.*TensorBoardLoger' cannot be used \(module",
        ),
        (["--model.hidden", "[a]"], r"--model\.hidden: 'a' is not valid \(expected int\) \("),
        # settings Lightning refuses as its Trainer is made, or divides by (hunt208: its
        # ValueError, or ZeroDivisionError in the sanity check, with a traceback)
        (["--trainer.strategy", "ddp_foo"], r"a trainer setting: You selected an invalid strat"),
        (["--trainer.num_nodes", "0"], r"a trainer setting: `num_nodes` must be a positive int"),
        (
            ["--trainer.check_val_every_n_epoch", "0"],
            r"--trainer\.check_val_every_n_epoch is how many epochs apart .* not 0\.",
        ),
        (  # a callback's own check, as jsonargparse makes it (hunt231: two tracebacks, exit 1)
            [
                "--trainer.callbacks",
                '[{"class_path": "lightning.pytorch.callbacks.EarlyStopping", '
                '"init_args": {"monitor": "val/asw", "mode": "maximum"}}]',
            ],
            r"trainer\.callbacks: EarlyStopping: `mode` can be min, max, got maximum$",
        ),
        (  # a whole config's file given to one section (hunt268: its first setting was
            # named as an unknown option, under a name nested a level too deep)
            ["--data", str(CONFIG.with_name("data.yaml"))],
            r"--data \S+data\.yaml holds a whole config's sections \(data\), not the data "
            r"section's settings: give it with --config \S+data\.yaml, or give --data",
        ),
        (["--model=" + str(CONFIG)], r"--model \S+metric\.yaml holds .*\(seed_everything, "),
        (  # no labels, no silhouette: the shipped callbacks watch it (hunt208: an epoch ran)
            ["--data.init_args.label_key", "null", "--data.init_args.mode", "block"],
            r"callbacks watch val/asw, but the data module reads no labels \(label_key=None\)",
        ),
    ],
)
def test_fit_says_bad_settings_in_one_line(synthetic_h5ad, tmp_path, capsys, extra, message):
    import re

    assert main(["fit", *_args(synthetic_h5ad, tmp_path, *extra)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cellsift fit: error: ") and re.search(message, err[-1])
    assert not any(line.lstrip().startswith("File ") for line in err)  # no traceback
    assert not (tmp_path / "lightning_logs").exists() and not list(tmp_path.rglob("model"))


def test_fit_says_a_config_that_is_no_text_file_in_one_line(synthetic_h5ad, tmp_path, capsys):
    """The data given as --config (hunt212: jsonargparse's UnicodeDecodeError, a traceback)."""
    for given in (["--config", str(synthetic_h5ad)], [f"--config={synthetic_h5ad}"]):
        assert main(["fit", *given]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cellsift fit: error: --config "), err
        assert "is not a YAML file: it is not text (byte 0 is 0x89)" in err[0], err
    # a text file read from its head only: a character cut where the head ends is no error
    from cellsift.train.cli import _check_config_files

    cut = tmp_path / "long.yaml"
    cut.write_text("# " + "a" * ((1 << 16) - 3) + "\u00e9\nseed_everything: 7\n", encoding="utf-8")
    assert cut.read_bytes()[(1 << 16) - 1 : (1 << 16) + 1] == "\u00e9".encode()
    _check_config_files(["--config", str(cut)])
    # settings given inline, longer than a file's name can be: read as settings (review201:
    # "File name too long")
    long = '{"seed_everything": 7' + " " * 300 + "}"
    assert len(long) > 255
    with pytest.raises(SystemExit) as printed:  # (--print_config: printed, then exit 0)
        main(["fit", "--config", long, "--print_config"])
    assert printed.value.code in (0, None)
    assert "seed_everything: 7" in capsys.readouterr().out


def test_only_a_callbacks_refused_setting_is_said_as_one():
    """A callback's __init__ refusing a setting, as jsonargparse wraps it: one line naming
    the callback. The same exception raised by a callback's work, or one raised ``from
    None`` while it was handled, is no setting (review212: a KeyError in training said as
    "trainer.callbacks: Buggy: ...", exit 2)."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from cellsift.train.cli import _misconfigured_callback

    class Strict(pl.Callback):
        def __init__(self, mode: str) -> None:
            if mode not in ("min", "max"):
                raise MisconfigurationException(f"mode can be min, max, got {mode}")

        def on_train_start(self, trainer, module) -> None:
            raise MisconfigurationException("an optional feature is unavailable")

    def made(make) -> BaseException:
        try:
            try:
                make()
            except MisconfigurationException as err:
                raise ValueError("Does not validate against any of the Union subtypes") from err
        except ValueError as wrapped:
            return wrapped
        raise AssertionError("nothing raised")

    said = _misconfigured_callback(made(lambda: Strict("maximum")))
    assert str(said) == "trainer.callbacks: Strict: mode can be min, max, got maximum"
    assert _misconfigured_callback(made(lambda: Strict("min").on_train_start(None, None))) is None
    try:
        try:
            Strict("maximum")
        except MisconfigurationException:
            raise KeyError("a bug") from None
    except KeyError as bug:
        assert _misconfigured_callback(bug) is None


def test_fit_refuses_a_bundle_dir_it_would_not_write_before_training(
    synthetic_h5ad, tmp_path, capsys
):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    args = _args(synthetic_h5ad, tmp_path, "--model.bundle_dir", str(notes))
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cellsift fit: error: ") and "not a model bundle" in err[-1]
    assert not (tmp_path / "checkpoints").exists()  # no step trained
    assert [p.name for p in notes.iterdir()] == ["notes.txt"]


def test_fit_refuses_a_validation_split_of_one_cell_type(tmp_path, capsys):
    from cellsift.datasets import synthetic_atlas

    adata = synthetic_atlas(1_500, 50, n_studies=3, seed=0)
    keep = (adata.obs["dataset_id"] != "study_02") | (
        adata.obs["cell_type_ontology_term_id"] == "CL:0000624"
    )
    path = tmp_path / "one_type_val.h5ad"
    adata[keep.to_numpy()].copy().write_h5ad(path)
    extra = [
        "--data.init_args.split_key",
        "dataset_id",
        "--data.init_args.val_groups",
        "[study_02]",
    ]
    assert main(["fit", *_args(path, tmp_path, *extra)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "validation cells hold 1 cell type the model knows (CL:0000624)" in err[-1]
    assert not (tmp_path / "checkpoints").exists()  # said before training
    assert not (tmp_path / "metric").exists()  # (nor its TensorBoard run and config)


def test_fit_refuses_to_resume_a_checkpoint_of_another_model(synthetic_h5ad, tmp_path, capsys):
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, "--trainer.max_epochs", "1")]) == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.exists()
    bigger = ["--model.hidden", "[64, 48]", "--ckpt_path", str(last)]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, *bigger, name="bigger")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"the checkpoint {last} was trained with other settings" in err
    assert "architecture.hidden [64, 32] there, [64, 48] here" in err
    # a checkpoint that does not say what it was trained on (older versions): the weights'
    # shapes are compared
    import torch

    state = torch.load(last, weights_only=False)
    del state["cellsift_data"]
    torch.save(state, tmp_path / "older.ckpt")
    bigger = ["--model.hidden", "[64, 48]", "--ckpt_path", str(tmp_path / "older.ckpt")]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, *bigger, name="older")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the checkpoint holds another model" in err and "(32,) there, (48,) here" in err
    # other data of the same shapes (the genes in another order): refused, not resumed
    import anndata as ad

    other = ad.read_h5ad(synthetic_h5ad)
    other = other[:, other.var_names[::-1]].copy()
    other.write_h5ad(tmp_path / "reordered.h5ad")
    resume = ["--ckpt_path", str(last)]
    assert main(["fit", *_args(tmp_path / "reordered.h5ad", tmp_path, *resume, name="re")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"the checkpoint {last} was trained on other genes (as many, " in err
    # fewer genes and other labels: counted, the labels named (review: tensor names)
    fewer = ad.read_h5ad(synthetic_h5ad)[:, :250].copy()
    labels = fewer.obs["cell_type_ontology_term_id"]
    first = sorted(labels.unique())[0]
    fewer = fewer[(labels != first).to_numpy()].copy()
    fewer.write_h5ad(tmp_path / "fewer.h5ad")
    assert main(["fit", *_args(tmp_path / "fewer.h5ad", tmp_path, *resume, name="few")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "other genes (300 there, 250 here) and labels (" in err
    assert f"e.g. ['{first}'] only there" in err
    # a truncated checkpoint: named, in one line
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(last.read_bytes()[:50_000])
    resume = ["--ckpt_path", str(trunc)]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, *resume, name="trunc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trunc.ckpt cannot be read as a checkpoint" in err and "truncated, corrupt" in err
    # a file torch reads that is no training state (here a plain tensor file)
    import torch

    torch.save({"weights": torch.zeros(2)}, tmp_path / "weights.pt")
    resume = ["--ckpt_path", str(tmp_path / "weights.pt")]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, *resume, name="pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "weights.pt cannot be read as a checkpoint (it holds no Lightning training" in err
    # the same shapes, other settings: refused, naming them
    other = ["--model.margin", "0.2", "--model.negative", "hardest", "--ckpt_path", str(last)]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, *other, name="other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trained with other settings (loss.margin 0.05 there, 0.2 here; loss.negative" in err
    # other optimiser settings, which the checkpoint's optimiser and schedule state would
    # override (a schedule turned off would keep the rate the cosine had reached): refused
    other = ["--model.lr", "0.05", "--model.scheduler", "none", "--ckpt_path", str(last)]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, *other, name="opt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "other optimiser settings (optimization.lr 0.005 there, 0.05 here; "
        "optimization.scheduler 'cosine' there, 'none' here)" in err
    )
    # "last" resolved to a file that is corrupt: named, in one line
    last.write_bytes(last.read_bytes()[:50_000])
    resume = ["--ckpt_path", "last"]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, *resume, name="last")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "last.ckpt cannot be read as a checkpoint" in err


def test_fit_resumes_only_with_the_optimiser_and_schedule_that_trained(
    synthetic_h5ad, tmp_path, capsys
):
    """LightningCLI's --optimizer replaces the plan's optimiser: the checkpoint records the
    one that trained, so that a resume with another learning rate (which the saved state
    would silently override) or another optimiser (which failed at its first step, a
    traceback) is refused in one line. --lr_scheduler alone, which LightningCLI ignores, is
    refused; a folder given as the checkpoint is named as what it is."""
    sgd = ["--optimizer", "SGD", "--optimizer.lr", "0.1", "--trainer.max_epochs", "1"]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, *sgd)]) == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)["cellsift_optimization"]
    assert saved["optimizer"] == "SGD" and saved["lr"] == 0.1 and saved["scheduler"] == "none"
    faster = [*sgd[:3], "0.5", "--ckpt_path", str(last)]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, *faster, name="faster")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "other optimiser settings (optimization.lr 0.1 there, 0.5 here)" in err
    plan = ["--ckpt_path", str(last)]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path, *plan, name="plan")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "(optimization.optimizer 'SGD' there, 'AdamW' here; optimization.scheduler 'none' "
        "there, 'cosine' here)" in err
    )
    step = ["--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1"]
    (tmp_path / "step").mkdir()
    assert main(["fit", *_args(synthetic_h5ad, tmp_path / "step", *step)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--lr_scheduler takes effect only with --optimizer" in err
    assert not (tmp_path / "step" / "checkpoints").exists()
    bundle = tmp_path / "metric" / "version_0" / "model"
    for folder, what in ((bundle, "a model bundle"), (tmp_path / "checkpoints", "a folder")):
        resume = ["--ckpt_path", str(folder)]
        assert main(["fit", *_args(synthetic_h5ad, tmp_path, *resume, name="dir")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{folder} is {what}, not a checkpoint file" in err


def test_fit_resume_compares_schedule_settings_not_progress_nor_torch_versions(
    synthetic_h5ad, tmp_path, capsys
):
    """A schedule's settings are compared, not its progress (CosineAnnealingWarmRestarts'
    T_cur moves as it steps); MultiStepLR's milestones are settings. A default one side
    lacks (an optimiser setting a newer torch added) is no difference, and a checkpoint of
    an older version (the plan's lr, weight_decay and scheduler) resumes as it did."""
    warm = ["--optimizer", "AdamW", "--lr_scheduler", "CosineAnnealingWarmRestarts"]
    warm += ["--lr_scheduler.T_0", "5"]
    for folder in ("warm", "steps", "plan"):
        (tmp_path / folder).mkdir()
    args = _args(synthetic_h5ad, tmp_path / "warm", *warm, "--trainer.max_epochs", "2")
    assert main(["fit", *args]) == 0
    last = tmp_path / "warm" / "checkpoints" / "last.ckpt"
    resume = [*warm, "--trainer.max_epochs", "3", "--ckpt_path", str(last)]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path / "warm", *resume, name="again")]) == 0
    steps = ["--optimizer", "SGD", "--lr_scheduler", "MultiStepLR"]
    args = _args(synthetic_h5ad, tmp_path / "steps", *steps, "--lr_scheduler.milestones", "[1]")
    assert main(["fit", *[*args, "--trainer.max_epochs", "1"]]) == 0
    last = tmp_path / "steps" / "checkpoints" / "last.ckpt"
    later = [*steps, "--lr_scheduler.milestones", "[2]", "--ckpt_path", str(last)]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path / "steps", *later, name="later")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(optimization.scheduler.milestones [[1, 1]] there, [[2, 1]] here)" in err
    # CyclicLR keeps its base_lr only as base_lrs: a setting, not progress
    cyclic = ["--optimizer", "SGD", "--lr_scheduler", "CyclicLR", "--lr_scheduler.max_lr", "0.1"]
    (tmp_path / "cyclic").mkdir()
    args = _args(synthetic_h5ad, tmp_path / "cyclic", *cyclic, "--lr_scheduler.base_lr", "0.01")
    assert main(["fit", *args, "--trainer.max_epochs", "1"]) == 0
    last = tmp_path / "cyclic" / "checkpoints" / "last.ckpt"
    other = [*cyclic, "--lr_scheduler.base_lr", "0.05", "--ckpt_path", str(last)]
    assert main(["fit", *_args(synthetic_h5ad, tmp_path / "cyclic", *other, name="o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "optimization.scheduler.base_lrs [0.01] there, [0.05] here" in err
    # LightningCLI's ReduceLROnPlateau (its class takes *args): its state holds the settings
    plateau = ["--optimizer", "AdamW", "--lr_scheduler", "ReduceLROnPlateau"]
    plateau += ["--lr_scheduler.monitor", "val/loss"]
    (tmp_path / "plateau").mkdir()
    args = _args(synthetic_h5ad, tmp_path / "plateau", *plateau, "--trainer.max_epochs", "1")
    assert main(["fit", *args]) == 0
    last = tmp_path / "plateau" / "checkpoints" / "last.ckpt"
    for patience, rc in (("10", 0), ("20", 2)):
        resume = [*plateau, "--lr_scheduler.patience", patience, "--ckpt_path", str(last)]
        resume += ["--trainer.max_epochs", "2"]
        assert main(["fit", *_args(synthetic_h5ad, tmp_path / "plateau", *resume, name="p")]) == rc
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(optimization.scheduler.patience 10 there, 20 here)" in err
    # the plan's own optimiser: a setting the checkpoint lacks, or the older record
    assert (
        main(["fit", *_args(synthetic_h5ad, tmp_path / "plan", "--trainer.max_epochs", "1")]) == 0
    )
    last = tmp_path / "plan" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    record = ckpt["cellsift_optimization"]
    for saved in (
        {k: v for k, v in record.items() if k != "eps"},
        {"lr": record["lr"], "weight_decay": record["weight_decay"], "scheduler": "cosine"},
    ):
        torch.save({**ckpt, "cellsift_optimization": saved}, tmp_path / "edited.ckpt")
        resume = ["--trainer.max_epochs", "2", "--ckpt_path", str(tmp_path / "edited.ckpt")]
        assert main(["fit", *_args(synthetic_h5ad, tmp_path / "plan", *resume, name="r")]) == 0
        faster = ["--model.lr", "0.05", *resume]
        assert main(["fit", *_args(synthetic_h5ad, tmp_path / "plan", *faster, name="f")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "(optimization.lr 0.005 there, 0.05 here)" in err


def test_fit_reads_a_manifest_of_shards_given_on_the_command_line(synthetic_h5ad, tmp_path):
    """The documented source, ``--data.init_args.source atlas/manifest.json``, reaches the
    data module as the path (the parser once put the manifest's text in its place)."""
    from cellsift.data.convert import convert
    from cellsift.train.cli import run_fit

    shards = tmp_path / "shards"
    convert(synthetic_h5ad, shards, format="zarr", shard_size=1_000)
    manifest = shards / "manifest.json"
    args = _args(manifest, tmp_path, "--data.init_args.source", str(manifest))
    cli = run_fit([*args, "--trainer.max_epochs", "1"])
    assert cli.datamodule.source == str(manifest)
    assert cli.datamodule.collection.n_obs == ad.read_h5ad(synthetic_h5ad).n_obs
    assert (tmp_path / "metric" / "version_0" / "model" / "model.safetensors").exists()


def test_fit_reads_a_list_of_stores(synthetic_h5ad, tmp_path, capsys):
    """A list as data source (on the command line or in the config) stays a list of stores,
    not the text of one; a single path stays a path."""
    two = f"[{synthetic_h5ad}, {synthetic_h5ad}]"
    for value, want in (
        (two, [str(synthetic_h5ad)] * 2),
        (str(synthetic_h5ad), str(synthetic_h5ad)),
    ):
        args = _args(synthetic_h5ad, tmp_path, "--data.init_args.source", value, "--print_config")
        with pytest.raises(SystemExit):
            main(["fit", *args])
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["data"]["init_args"]["source"] == want


def test_verbose_fit_prints_lightnings_lines_once(synthetic_h5ad, tmp_path):
    """`cellsift -v fit`: Lightning's records through its own handler only, not the root
    one's too (review: each printed twice)."""
    args = _args(synthetic_h5ad, tmp_path, "--trainer.fast_dev_run", "1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "cellsift.cli", "-v", "fit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    assert sum("Seed set to 0" in line for line in lines) == 1, lines


@pytest.mark.multi_device
@pytest.mark.parametrize(
    ("before", "after", "killed_at"),
    [(2, 1, 3), (1, 2, 6), (1, 2, 9)],
    ids=["2to1", "1to2", "1to2-nothing-left"],
)
def test_fit_resumes_mid_epoch_on_another_number_of_devices(
    synthetic_h5ad, tmp_path, before, after, killed_at
):
    """Killed mid-epoch on ``before`` processes, resumed with ``--ckpt_path last`` on
    ``after``: the rest of the epoch is the cells no process trained on yet, planned anew
    (none twice, none lost but what the last batch leaves out), Lightning's count of the
    epoch goes on as the new run counts it (it validates once at the epoch's end and runs
    the next epoch whole) and the cosine schedule goes on from the rate the checkpoint
    left, to 0 at the end. Killed at step 9 of 10 on 1 process, what is left of the epoch
    makes no batch on 2: the resumed run validates and ends the epoch first."""
    devices = {n: (() if n == 1 else _DDP) for n in (1, 2)}
    every_step = ("--trainer.log_every_n_steps", "1", "--data.init_args.mode", "block")
    runs = {}
    for name in ("killed", "resumed"):
        (tmp_path / name).mkdir()
        runs[name] = {
            "class_path": "test_fit_cli.RecordCells",
            "init_args": {"folder": str(tmp_path / name)},
        }
    # (2 processes take 4 batches each an epoch, 1 takes 10)
    ckpts = tmp_path / "checkpoints"
    kill = {"class_path": "test_fit_cli.KillAtStep", "init_args": {"step": killed_at}}
    killed = _fit_process(
        _args(
            synthetic_h5ad,
            tmp_path,
            *devices[before],
            *every_step,
            callbacks=[_checkpoint_every_step(tmp_path), kill, runs["killed"]],
            name="crash",
        )
    )
    assert killed.returncode != 0
    ckpt = torch.load(ckpts / "last.ckpt", weights_only=False)
    saved_step = ckpt["global_step"]
    assert ckpt["epoch"] == 0 and 0 < saved_step <= killed_at
    resumed = _fit_process(
        _args(
            synthetic_h5ad,
            tmp_path,
            *devices[after],
            *every_step,
            "--ckpt_path",
            "last",
            callbacks=[runs["resumed"]],
            name="resume",
        )
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first = [c for e, step, c in _recorded(tmp_path / "killed") if step < saved_step]
    rest = _recorded(tmp_path / "resumed")
    assert {e for e, _, _ in rest} == ({1} if killed_at == 9 else {0, 1})
    epoch0 = np.concatenate(first + [c for e, _, c in rest if e == 0])
    epoch1 = np.concatenate([c for e, _, c in rest if e == 1])
    for cells in (epoch0, epoch1):
        assert len(np.unique(cells)) == len(cells)  # no cell twice in an epoch
    # every training cell but fewer than a batch per process (the last batches left out)
    trained = (
        set(epoch1) | set(epoch0) | {i for _, _, c in _recorded(tmp_path / "killed") for i in c}
    )
    assert len(epoch0) > len(trained) - BATCH * after
    assert len(epoch1) > len(trained) - BATCH * after
    # one validation per epoch, at its end; the cosine schedule falls step by step across
    # the resume, to this run's last step's rate
    scalars = _scalars(tmp_path / "metric" / "version_0")
    steps1 = sorted({step for e, step, _ in rest if e == 1})
    assert [step for step, _ in scalars["val/asw"]] == [steps1[0] - 1, steps1[-1]]
    lr = [v for _, v in sorted(scalars["train/lr"])]
    assert lr == sorted(lr, reverse=True) and lr[0] == pytest.approx(5e-3)
    assert len(lr) == steps1[-1] + 1  # (one rate per step)

    def cosine(position: float) -> float:
        return 5e-3 * 0.5 * (1 + np.cos(np.pi * position))

    # the first resumed step's rate is the one the checkpoint's run had there (its 2 epochs
    # of 4 steps on 2 processes, 10 on 1); then the schedule goes on evenly from there to
    # this run's end: from this run's count of the steps done (its epoch's batches less
    # those left) to its 2 epochs' steps
    assert lr[saved_step] == pytest.approx(cosine(saved_step / (8 if before == 2 else 20)))
    total, left = 2 * len(steps1), len({step for e, step, _ in rest if e == 0})
    done = total // 2 - left
    start = saved_step / (8 if before == 2 else 20)
    last = start + (total - 1 - done) * (1 - start) / (total - done)
    assert lr[-1] == pytest.approx(cosine(last))


def test_only_lightnings_own_refusals_are_called_settings():
    """What cellsift fit says in one line as a trainer setting is an error raised in
    Lightning's own code as it makes its Trainer (an unknown strategy); an error raised in
    a user's code that Lightning calls keeps its traceback (review198)."""
    from cellsift.train.cli import _raised_in_lightning

    with pytest.raises(ValueError) as lightnings:
        pl.Trainer(strategy="ddp_foo", logger=False)
    assert _raised_in_lightning(lightnings.value)

    class Mine(pl.Callback):
        def setup(self, trainer: pl.Trainer, pl_module: object, stage: str) -> None:
            raise TypeError("a bug of mine")

    with pytest.raises(TypeError) as users:
        Mine().setup(None, None, "fit")  # type: ignore[arg-type]
    assert not _raised_in_lightning(users.value)
