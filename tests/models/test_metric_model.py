"""MetricModel end to end: train, embed a held-out study, annotate by kNN, save, load."""

from __future__ import annotations

import os
import signal
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.neighbors import KNeighborsClassifier

from cellsift.data import CellDataModule
from cellsift.errors import (
    ConfigError,
    DataError,
    GeneAlignmentError,
    MissingKeyError,
    TrainingInterrupted,
)
from cellsift.models import MetricModel
from cellsift.train._stop import SIGNALS, StopRequest
from conftest import train_without


@pytest.fixture(scope="module")
def trained(synthetic_h5ad, tmp_path_factory):
    held = "study_03"
    model = MetricModel.from_collection(
        synthetic_h5ad, hidden=(128, 64), latent=16, triplet_weight=0.1
    )
    train_without(
        model,
        synthetic_h5ad,
        held,
        tmp_path_factory.mktemp("fit"),
        max_epochs=8,
        val_fraction=0.15,
        split_key="donor_id",
    )
    return model, ad.read_h5ad(synthetic_h5ad), held


def test_held_out_study_is_annotated_by_knn(trained, synthetic_h5ad):
    import scanpy as sc

    model, adata, held = trained
    z = model.embed(adata)
    assert z.shape == (adata.n_obs, 16)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    test = (adata.obs["dataset_id"] == held).to_numpy()
    y = adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy()

    def knn_accuracy(emb, metric="cosine"):
        knn = KNeighborsClassifier(15, metric=metric).fit(emb[~test], y[~test])
        return (knn.predict(emb[test]) == y[test]).mean()

    pca = adata.copy()  # the usual baseline: PCA(50) of log-normalised counts, then kNN
    sc.pp.normalize_total(pca, target_sum=1e4)
    sc.pp.log1p(pca)
    sc.pp.pca(pca, n_comps=50)
    untrained = MetricModel.from_collection(synthetic_h5ad, hidden=(128, 64), latent=16)
    accuracy = knn_accuracy(z)
    assert accuracy > knn_accuracy(pca.obsm["X_pca"], "euclidean") + 0.03
    assert accuracy > knn_accuracy(untrained.embed(adata)) + 0.1
    assert model.trainer is not None and "val/asw" in model.trainer.callback_metrics


def test_save_load_and_gene_alignment(trained, tmp_path):
    model, adata, _ = trained
    sub = adata[:200].copy()
    z = model.embed(sub)
    again = MetricModel.load(model.save(tmp_path / "bundle"))
    np.testing.assert_allclose(again.embed(sub), z, atol=1e-6)
    assert again.labels == model.labels and again.genes == model.genes
    # a model of another precision loads as float32, with the fingerprint it had (hunt248:
    # another, which its embeddings stores and indexes refused); float64 weights that
    # float32 holds exactly are the float32 model's
    for dtype in (torch.float64, torch.bfloat16):
        other = MetricModel.load(model.save(tmp_path / "again", overwrite=True))
        other.module.to(dtype)
        loaded = MetricModel.load(other.save(tmp_path / str(dtype)))
        assert {p.dtype for p in loaded.module.parameters()} == {torch.float32}
        assert loaded.fingerprint == other.fingerprint
        assert (other.fingerprint == model.fingerprint) == (dtype == torch.float64)
        np.testing.assert_allclose(loaded.embed(sub), other.embed(sub), atol=1e-2)
    shuffled = sub[:, np.random.default_rng(0).permutation(sub.n_vars)].copy()
    np.testing.assert_allclose(model.embed(shuffled), z, atol=1e-5)  # aligned by gene id
    bad = sub.copy()
    bad.var_names = [f"Gm{i}" for i in range(bad.n_vars)]
    bad.var = bad.var.drop(columns=["feature_name"])
    with pytest.raises(GeneAlignmentError, match="adata: only 0 of its"):
        model.embed(bad)
    # a query subset to a tenth of the model's genes (a panel, variable genes): all of its
    # genes are the model's, but most of the model's input would read as 0
    panel = sub[:, : sub.n_vars // 10].copy()
    with pytest.raises(GeneAlignmentError, match=r"only \d+ of the model's \d+ .*gene panel"):
        model.embed(panel)


def test_label_head_predicts_held_out_study_and_survives_a_bundle(synthetic_h5ad, tmp_path):
    import torch

    torch.manual_seed(0)
    held = "study_03"
    model = MetricModel.from_collection(
        synthetic_h5ad,
        hidden=(128, 64),
        latent=16,
        dropout=0.1,
        input_dropout=0.1,
        triplet_weight=0.1,
        classifier_weight=0.5,
        relatives="resolved",  # the atlas labels CD14+ and CD16+ monocytes (CL relatives) apart
    )
    train_without(model, synthetic_h5ad, held, tmp_path / "fit", max_epochs=15, val_fraction=0)
    adata = ad.read_h5ad(synthetic_h5ad)
    is_test = (adata.obs["dataset_id"] == held).to_numpy()
    y = adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    fitted = model.predict(adata[~is_test].copy())["label"].to_numpy()
    assert (fitted == y[~is_test]).mean() > 0.9  # the head fits its training cells
    test = adata[is_test].copy()
    calls = model.predict(test)
    assert list(calls.index) == list(test.obs_names)
    # new study: as good as kNN on the same embedding (logistic regression on this small,
    # noisy atlas: ~0.7; the most frequent label: 0.33)
    z = model.embed(adata)
    knn = KNeighborsClassifier(15, metric="cosine").fit(z[~is_test], y[~is_test])
    knn_accuracy = (knn.predict(z[is_test]) == y[is_test]).mean()
    accuracy = (calls["label"].to_numpy() == y[is_test]).mean()
    assert accuracy > 0.6 and accuracy > knn_accuracy - 0.05
    p = calls.attrs["probabilities"]
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(calls["probability"], p.max(1))
    assert set(calls["label"]) <= set(model.labels)

    path = model.save(tmp_path / "bundle")
    again = MetricModel.load(path)
    np.testing.assert_allclose(again.predict(test).attrs["probabilities"], p, atol=1e-6)

    headless = MetricModel.from_collection(synthetic_h5ad, hidden=(128, 64), latent=16)
    with pytest.raises(ValueError, match="no label head"):
        headless.predict(test)
    # a bundle whose config asks for a head its weights lack
    import json

    from cellsift.models import BundleError
    from cellsift.models.bundle import load_bundle, save_bundle

    b = load_bundle(path)
    assert set(b.weights) == {"encoder", "decoder", "classifier"}
    broken = save_bundle(
        tmp_path / "broken",
        config=json.loads((path / "config.json").read_text()),
        modules={"encoder": model.module.encoder, "decoder": model.module.decoder},
        genes=b.genes,
        labels=b.labels,
    )
    with pytest.raises(BundleError, match="no classifier weights"):
        MetricModel.load(broken)


class _Stopped(Exception):
    pass


def _fit(path, root, *, data=None, **train):
    """A small MetricModel trained on the CPU from seed 0 with checkpoints and TensorBoard
    logs in ``root`` (``data``: CellDataModule options)."""
    from cellsift.data.datamodule import CellDataModule

    torch.manual_seed(0)
    model = MetricModel.from_collection(path, hidden=(64, 32), latent=16)
    dm = CellDataModule(path, **{"batch_size": 256, **(data or {})})
    quiet = {"enable_progress_bar": False, "enable_model_summary": False}
    model.train(dm, accelerator="cpu", default_root_dir=root, **quiet, **train)
    return model


def test_training_resumed_from_last_ends_as_an_uninterrupted_run(synthetic_h5ad, tmp_path):
    """``train(ckpt_path="last")`` finds the last checkpoint of a run in the same root, goes
    on from it, ends with the weights of a run never stopped, and logs in the same run."""
    import lightning.pytorch as pl

    class StopAtEpoch(pl.Callback):  # a crash at the start of the second epoch
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise _Stopped

    def train(root, **kw):
        return _fit(
            synthetic_h5ad, root, data={"split_key": "donor_id", "seed": 3}, max_epochs=3, **kw
        )

    whole = train(tmp_path / "whole")
    with pytest.raises(_Stopped):
        train(tmp_path / "run", callbacks=[StopAtEpoch()])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    resumed = train(tmp_path / "run", ckpt_path="last")
    assert resumed.trainer is not None and resumed.trainer.current_epoch == 3
    for (key, a), b in zip(
        whole.module.state_dict().items(), resumed.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    assert [p.name for p in (tmp_path / "run" / "lightning_logs").iterdir()] == ["version_0"]

    # Ctrl-C in the second epoch: the run stops after that step, saving its state where
    # ckpt_path="last" finds it, gives the signal back, and goes on as if never stopped
    class CtrlCAtStep(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGINT)

    stop = CtrlCAtStep()
    stop.step = whole.trainer.global_step // 2 + 1
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="stopped on SIGINT after step") as err:
        train(tmp_path / "ctrl_c", callbacks=[stop])
    assert signal.getsignal(signal.SIGINT) is handler
    assert err.value.step == stop.step and err.value.exit_status == 130
    assert Path(err.value.checkpoint) == tmp_path / "ctrl_c" / "checkpoints" / "last.ckpt"
    assert torch.load(err.value.checkpoint, weights_only=False)["global_step"] == stop.step
    resumed = train(tmp_path / "ctrl_c", ckpt_path="last")
    for (key, a), b in zip(
        whole.module.state_dict().items(), resumed.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    # without checkpoints, "last" names no file: the state's own path is the one to give
    off = {"enable_checkpointing": False}
    with pytest.raises(
        TrainingInterrupted, match=r"resume with ckpt_path='[^']*last\.ckpt'"
    ) as err:
        train(tmp_path / "no_checkpoints", callbacks=[stop], **off)
    assert Path(err.value.checkpoint) == tmp_path / "no_checkpoints" / "last.ckpt"
    assert "ckpt_path='last'" not in str(err.value)
    resumed = train(tmp_path / "no_checkpoints", ckpt_path=err.value.checkpoint, **off)
    for (key, a), b in zip(
        whole.module.state_dict().items(), resumed.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_a_fast_dev_run_keeps_no_last_checkpoint_and_leaves_the_callback_as_given(
    synthetic_h5ad, tmp_path
):
    """fast_dev_run: Lightning would keep last.ckpt (over a real run's), which "last" would
    resume from; none is kept, and the caller's callback, given to the real run next, keeps
    its own last."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    keep = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(synthetic_h5ad, tmp_path, callbacks=[keep], fast_dev_run=True, logger=False)
    assert keep.save_last is True and not list(tmp_path.rglob("*.ckpt"))
    _fit(synthetic_h5ad, tmp_path, callbacks=[keep], max_steps=2, logger=False)
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


def test_a_checkpoint_callback_without_a_folder_keeps_what_last_resumes(synthetic_h5ad, tmp_path):
    """A ModelCheckpoint given without dirpath keeps its checkpoints in
    <default_root_dir>/checkpoints, where ckpt_path="last" looks (Lightning's default, the
    logger's version_0/checkpoints, is not looked in by the resumed run, version_1): a run
    stopped by a signal goes on from where it stopped, in the same TensorBoard run."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    def train(root, **kw):
        best = ModelCheckpoint(monitor="val/asw", mode="max", save_last=True)
        callbacks = [best, *kw.pop("callbacks", [])]
        data = {"split_key": "donor_id", "seed": 3}
        return _fit(synthetic_h5ad, root, data=data, max_epochs=2, callbacks=callbacks, **kw)

    class CtrlCAtStep(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    whole = train(tmp_path / "whole")
    with pytest.raises(TrainingInterrupted, match="stopped on SIGINT after step 3") as err:
        train(tmp_path / "run", callbacks=[CtrlCAtStep()])
    assert Path(err.value.checkpoint) == tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed = train(tmp_path / "run", ckpt_path="last")
    assert resumed.trainer is not None and resumed.trainer.global_step == whole.trainer.global_step
    for (key, a), b in zip(
        whole.module.state_dict().items(), resumed.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    assert [p.name for p in (tmp_path / "run" / "lightning_logs").iterdir()] == ["version_0"]


def test_a_signal_within_an_accumulation_stops_the_run_after_its_step(synthetic_h5ad, tmp_path):
    """With accumulate_grad_batches=2, a signal at a batch that does not step the optimiser
    stops the run after the next batch, which does: no half-accumulated gradient is lost,
    and the resumed run ends with the weights of a run never stopped."""
    import lightning.pytorch as pl

    def train(root, **kw):
        return _fit(
            synthetic_h5ad,
            root,
            data={"split_key": "donor_id", "seed": 3},
            max_epochs=2,
            accumulate_grad_batches=2,
            **kw,
        )

    class CtrlCAtBatch(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.current_epoch == 0 and batch_idx == 2:  # the first of a pair
                os.kill(os.getpid(), signal.SIGINT)

    whole = train(tmp_path / "whole")
    with pytest.raises(TrainingInterrupted, match="stopped on SIGINT after step 2 ") as err:
        train(tmp_path / "run", callbacks=[CtrlCAtBatch()])
    assert torch.load(err.value.checkpoint, weights_only=False)["global_step"] == 2
    resumed = train(tmp_path / "run", ckpt_path="last")
    for (key, a), b in zip(
        whole.module.state_dict().items(), resumed.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_training_resumed_from_a_checkpoint_written_as_validation_ends(synthetic_h5ad, tmp_path):
    """Validation twice an epoch, a checkpoint as each ends (ModelCheckpoint writes them then
    when validation runs within epochs): resumed from the one after an epoch's last step, the
    run goes on with the next epoch's first batch, not one epoch later; from one within an
    epoch, with the random draws of training, not those validation made. Either way it ends
    with the uninterrupted run's weights."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Batches(pl.Callback):
        def __init__(self):
            self.first_cells = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.first_cells.append(batch["obs_idx_n"][:4].tolist())

    data = {"val_fraction": 0.25, "mode": "weighted", "batch_size": 128, "block_size": 16}
    every = {"max_epochs": 2, "val_check_interval": 0.5, "logger": False}

    def train(root, **kw):
        return _fit(synthetic_h5ad, root, data=data, **every, **kw)

    def keep_all(root):
        return sorted((root / "all").iterdir())

    seen = Batches()
    keep = ModelCheckpoint(dirpath=tmp_path / "all", save_top_k=-1, filename="{step}")
    whole = train(tmp_path / "whole", callbacks=[seen, keep])
    assert len(seen.first_cells) == whole.trainer.global_step
    written = sorted(torch.load(p, weights_only=False)["global_step"] for p in keep_all(tmp_path))
    assert len(written) == 4  # within and at the end of each epoch
    for step in written[1:3]:  # epoch 0's end; within epoch 1
        ckpt = tmp_path / "all" / f"step={step}.ckpt"
        torch.manual_seed(123)  # (what the resumed run draws comes from the checkpoint)
        after = Batches()
        resumed = train(tmp_path / f"from_{step}", callbacks=[after], ckpt_path=str(ckpt))
        assert after.first_cells == seen.first_cells[step:]
        for (key, a), b in zip(
            whole.module.state_dict().items(), resumed.module.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{key}, from step {step}")


def test_a_data_module_inspected_before_training_is_read_as_the_model_reads(tmp_path):
    """A data module whose setup ran before train() (reading its gene vocabulary) holds its
    own genes and labels, here Cell Ontology names: train() reads it again through the
    model's genes and (harmonised) labels, so every cell trains labelled, not unlabelled."""
    import lightning.pytorch as pl

    from cellsift.data.datamodule import CellDataModule
    from cellsift.datasets import synthetic_atlas

    adata = synthetic_atlas(1200, 300, n_studies=2, seed=4)
    path = tmp_path / "atlas.h5ad"
    adata.write_h5ad(path)

    class Labelled(pl.Callback):
        def __init__(self):
            self.labelled = self.cells = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.labelled += int((batch["y_n"] >= 0).sum())
            self.cells += len(batch["y_n"])

    model = MetricModel.from_collection(path, hidden=(32,), latent=8)
    dm = CellDataModule(path, label_key="cell_type", batch_size=128, val_fraction=0.2)
    assert dm.gene_vocabulary is not None  # (reading it sets the module up)
    count = Labelled()
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    model.train(
        dm,
        max_epochs=1,
        accelerator="cpu",
        default_root_dir=tmp_path,
        callbacks=[count],
        enable_checkpointing=False,
        **quiet,
    )
    assert count.cells > 0 and count.labelled == count.cells


def test_a_label_or_gene_given_as_text_is_refused_not_read_as_letters():
    for genes, labels in ((["g1", "g2"], "CL:0000236"), ("g1", ["CL:0000236"])):
        with pytest.raises(TypeError, match=r"is a list, not the text"):
            MetricModel(genes, labels, hidden=(8,), latent=4)
    from cellsift.errors import ConfigError

    for hidden in (8, "8"):  # (8: a TypeError, int is not iterable)
        with pytest.raises(ConfigError, match=r"hidden lists the widths .*\(one layer: \["):
            MetricModel(["g1", "g2"], ["CL:0000236"], hidden=hidden, latent=4)


def test_settings_a_fit_cannot_honour_are_refused_before_training(synthetic_h5ad, tmp_path):
    """Early stopping on val/asw without validation cells (said before the first epoch, not
    by Lightning at its end), a precision that casts the weights themselves and validations
    0 epochs apart: errors that name the fix; nothing is trained."""
    from lightning.pytorch.callbacks import EarlyStopping

    from cellsift.errors import ConfigError

    stop = EarlyStopping(monitor="val/asw", mode="max")
    with pytest.raises(
        ConfigError, match=r"watch val/asw, but .* no validation cells.*val_fraction"
    ):
        _fit(
            synthetic_h5ad,
            tmp_path / "a",
            data={"val_fraction": 0.0},
            max_epochs=1,
            callbacks=[stop],
        )
    model = MetricModel.from_collection(synthetic_h5ad, hidden=(16,), latent=4)
    with pytest.raises(  # (stores or AnnData given: a data module of train()'s own)
        ConfigError, match=r"no validation cells.*give it a CellDataModule\(\.\.\., val_frac"
    ):
        model.train(synthetic_h5ad, max_epochs=1, accelerator="cpu", callbacks=[stop])
    for precision in ("bf16-true", "64-true"):
        with pytest.raises(
            ConfigError, match=rf"precision '{precision}' casts the weights .*bf16-mixed"
        ):
            _fit(synthetic_h5ad, tmp_path / "b", max_epochs=1, precision=precision)
    for every in (0, 1.5):  # (Lightning takes 0, then divides by it as the epoch ends)
        with pytest.raises(
            ConfigError, match=rf"check_val_every_n_epoch is how many .* not {every}\."
        ):
            _fit(synthetic_h5ad, tmp_path / "c", max_epochs=1, check_val_every_n_epoch=every)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_second_signal_stops_at_once():
    """The first SIGINT / SIGTERM of a fit is held for the end of the step; a second one
    (a step that does not end) interrupts at once and gives the signals back."""
    before = {s: signal.getsignal(s) for s in SIGNALS}
    request = StopRequest()
    assert request.install()
    os.kill(os.getpid(), signal.SIGTERM)
    assert request.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # (the handler runs at the next bytecode)
    assert {s: signal.getsignal(s) for s in SIGNALS} == before


@pytest.mark.parametrize("second", ["SIGINT", "SIGTERM"])
def test_a_second_signal_during_a_fit_raises_the_interrupt(synthetic_h5ad, tmp_path, second):
    """Lightning turns an interrupt inside ``trainer.fit`` into ``sys.exit(1)`` and leaves
    SIGINT ignored: a fit stopped at once by a second signal raises the interrupt instead
    (``Terminated`` for SIGTERM), and SIGINT has its handler back."""
    import lightning.pytorch as pl

    from cellsift._utils import Terminated

    class TwoSignals(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step != 2:
                return
            os.kill(os.getpid(), signal.SIGTERM)  # held for the end of the step
            assert trainer.lightning_module._stop.signum == signal.SIGTERM
            os.kill(os.getpid(), getattr(signal, second))  # and this step does not end
            time.sleep(10)
            raise AssertionError("the second signal did not stop the step")

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as err:
        _fit(
            synthetic_h5ad,
            tmp_path,
            callbacks=[TwoSignals()],
            max_epochs=1,
            enable_checkpointing=False,
            logger=False,
        )
    assert isinstance(err.value, Terminated) == (second == "SIGTERM")
    assert signal.getsignal(signal.SIGINT) is handler
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped at once: no state saved


def test_training_on_an_anndata_in_memory_is_training_on_its_file(synthetic_h5ad, tmp_path):
    """model.train(adata) reads the same batches as from the h5ad (a loader worker too),
    so it ends with the same weights."""
    adata = ad.read_h5ad(synthetic_h5ad)
    data = {"split_key": "donor_id", "seed": 1, "num_workers": 1}
    kw = {"max_epochs": 1, "enable_checkpointing": False, "logger": False}
    from_file = _fit(synthetic_h5ad, tmp_path / "file", data=data, **kw)
    in_memory = _fit(adata, tmp_path / "memory", data=data, **kw)
    assert from_file.labels == in_memory.labels and from_file.genes == in_memory.genes
    for (key, a), b in zip(
        from_file.module.state_dict().items(), in_memory.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    with pytest.raises(DataError, match=r"an AnnData in memory is embedded with cellsift.tl.embed"):
        from cellsift.tasks import embed_collection

        embed_collection(in_memory, adata, tmp_path / "emb.zarr")


def test_training_warns_of_labels_that_cannot_train(synthetic_h5ad, tmp_path):
    """Labels the model lacks train unlabelled, one label gives no triplets: both said."""
    from cellsift._warnings import CellsiftWarning

    adata = ad.read_h5ad(synthetic_h5ad)
    model = MetricModel.from_collection(adata, hidden=(16,), latent=4)
    first = model.labels[0]
    other = adata.copy()
    labels = other.obs["cell_type_ontology_term_id"].astype(str)
    other.obs["cell_type_ontology_term_id"] = labels.replace({first: "CL:0000000"})
    n = int((labels == first).sum())
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    kw = {"max_epochs": 1, "accelerator": "cpu", "enable_checkpointing": False, **quiet}
    with pytest.warns(CellsiftWarning, match=f"{n:,} of .* cells carry labels the model does"):
        model.train(other, default_root_dir=tmp_path, **kw)
    one = adata.copy()
    one.obs["cell_type_ontology_term_id"] = first
    single = MetricModel.from_collection(one, hidden=(16,), latent=4)
    with pytest.warns(CellsiftWarning, match="1 usable label .* only the reconstruction"):
        single.train(one, default_root_dir=tmp_path, study_key=None, **kw)
    each = adata[:60].copy()  # a label per cell (a column of cell names): no positives
    each.obs["name"] = [f"cell{i}" for i in range(each.n_obs)]
    named = MetricModel.from_collection(
        each, label_key="name", ontology_aware=False, hidden=(16,), latent=4
    )
    with pytest.warns(CellsiftWarning, match=r"no label in 'name' has two cells \(its 60 "):
        named.train(each, default_root_dir=tmp_path, study_key=None, **kw)
    # relatives are never negatives: T cells and their CD4 subtype alone form no triplet,
    # and with B cells beside them only a label related to every other one is named
    t_cells, cd4, b_cells = "CL:0000084", "CL:0000624", "CL:0000236"
    codes = adata.obs["cell_type_ontology_term_id"].astype(str).factorize()[0]
    for kinds, said in (
        ([t_cells, cd4], "every training label is a Cell Ontology relative of every other"),
        ([t_cells, cd4, b_cells, "CL:0000000"], r"1 of 4 training labels \('CL:0000000'\)"),
    ):
        related = adata.copy()
        related.obs["cell_type_ontology_term_id"] = np.asarray(kinds)[codes % len(kinds)]
        model = MetricModel.from_collection(related, hidden=(16,), latent=4)
        with pytest.warns(CellsiftWarning, match=said):
            model.train(related, default_root_dir=tmp_path, **kw)
    apart = adata.copy()
    apart.obs["cell_type_ontology_term_id"] = np.asarray([t_cells, cd4, b_cells])[codes % 3]
    model = MetricModel.from_collection(apart, hidden=(16,), latent=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CellsiftWarning)
        model.train(apart, default_root_dir=tmp_path, **kw)
    resolved = MetricModel.from_collection(related, hidden=(16,), latent=4, relatives="resolved")
    with warnings.catch_warnings():  # (the studies may tell the relatives apart)
        warnings.simplefilter("error", CellsiftWarning)
        resolved.train(related, default_root_dir=tmp_path, **kw)


def test_labels_outside_the_cell_ontology_train_as_they_are(tmp_path):
    """Cell lines (and a label that happens to be a CL name) train with
    ontology_aware=False: taken as written, related to themselves only, kept by the bundle;
    fine-tuning on data with a label the model lacks trains those cells unlabelled."""
    from cellsift._warnings import CellsiftWarning
    from cellsift.datasets import synthetic_atlas
    from cellsift.ontology import OntologyError

    adata = synthetic_atlas(600, 300, n_studies=2, seed=5)
    ids = sorted(set(adata.obs["cell_type_ontology_term_id"].astype(str)))
    lines = ["T cell", "CD4-positive, alpha-beta T cell", "HCC827", "H1975", "A549", "H2228"]
    lines += [f"LINE-{k}" for k in range(len(ids))]  # (every cell labelled)
    as_lines = dict(zip(ids, lines[: len(ids)], strict=True))
    assert len(as_lines) >= 4
    obs = adata.obs["cell_type_ontology_term_id"].astype(str)
    adata.obs["cell_type_ontology_term_id"] = obs.map(as_lines)
    with pytest.raises(OntologyError, match=r"HCC827.*pass ontology_aware=False"):
        MetricModel.from_collection(adata, hidden=(16,), latent=4)
    model = MetricModel.from_collection(adata, hidden=(16,), latent=4, ontology_aware=False)
    assert model.labels == model.label_names == sorted(as_lines.values())
    # "T cell" is an ancestor of the CD4 T cell in CL; here they are two unrelated labels
    torch.testing.assert_close(
        model.module.triplet.related_ll, torch.eye(len(model.labels), dtype=torch.bool)
    )
    aware = MetricModel(model.genes, ["T cell", "CD4-positive, alpha-beta T cell"])
    assert aware.module.triplet.related_ll.all()
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    kw = {"max_epochs": 1, "accelerator": "cpu", "enable_checkpointing": False, **quiet}
    model.train(adata, default_root_dir=tmp_path, **kw)
    assert model.trainer.global_step > 0
    model.save(tmp_path / "lines")
    loaded = MetricModel.load(tmp_path / "lines")
    assert loaded.labels == model.labels and loaded.label_names == model.label_names
    assert loaded.config["loss"]["ontology_aware"] is False
    torch.testing.assert_close(loaded.module.triplet.related_ll, model.module.triplet.related_ll)
    np.testing.assert_allclose(loaded.embed(adata[:64]), model.embed(adata[:64]), atol=1e-6)
    more = adata.copy()
    obs = more.obs["cell_type_ontology_term_id"].astype(str)
    more.obs["cell_type_ontology_term_id"] = obs.replace({"A549": "PC9"})
    n = int((obs == "A549").sum())
    with pytest.warns(CellsiftWarning, match=f"{n:,} of .* cells carry labels the model does"):
        loaded.train(more, default_root_dir=tmp_path, **kw)


def test_a_run_trained_on_for_more_epochs_anneals_to_its_new_end(synthetic_h5ad, tmp_path):
    """A finished 1-epoch run resumed with max_epochs=3: the cosine schedule runs over the
    3 epochs (a schedule restored with its old length climbs back to the full rate)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def train(epochs, **kw):
        model = _fit(
            synthetic_h5ad, tmp_path, data={"val_fraction": 0}, max_epochs=epochs, lr=1e-3,
            log_every_n_steps=1, **kw,
        )  # fmt: skip
        return model.trainer

    n = train(1).global_step
    trainer = train(3, ckpt_path="last")
    assert trainer.global_step == 3 * n
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    events.Reload()
    lr = {e.step: e.value for e in events.Scalars("train/lr")}
    after = [lr[s] for s in sorted(lr) if s >= n]
    assert (np.diff(after) <= 1e-12).all()  # only down
    want = 0.5 * (1 + np.cos(np.pi * 2 * n / (3 * n))) * 1e-3  # two thirds through the run
    assert abs(lr[2 * n] - want) < 1e-3 * np.pi / n


def test_embedding_refuses_values_that_are_not_raw_counts(synthetic_h5ad):
    """Log-normalised data (which the model would normalise again), NaN or negatives in an
    in-memory AnnData: an error that names the problem and the fix, as for stores."""
    import scanpy as sc

    model = MetricModel.from_collection(synthetic_h5ad, hidden=(32,), latent=8)
    adata = ad.read_h5ad(synthetic_h5ad)[:200].copy()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    with pytest.raises(DataError, match=r"adata \(X\): contains non-integer.*'counts'"):
        model.embed(adata)
    z = model.embed(adata, layer="counts")  # the raw counts
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    with pytest.raises(KeyError, match=r"no layer 'raw'.*'counts'"):
        model.embed(adata, layer="raw")
    with_raw = adata.copy()
    with_raw.X = with_raw.layers["counts"].copy()
    with_raw.raw = with_raw  # .raw: the counts, as scanpy workflows keep them
    with_raw.X = adata.X.copy()
    np.testing.assert_allclose(model.embed(with_raw, layer="raw"), z, atol=1e-6)
    assert model.embed(adata, check_counts=False).shape == z.shape  # when meant
    bad = adata.layers["counts"].toarray()
    bad[3, 5] = np.nan
    adata.layers["nan"] = bad
    with pytest.raises(DataError, match="NaN"):
        model.embed(adata, layer="nan")
    adata.layers["neg"] = -adata.layers["counts"]
    with pytest.raises(DataError, match="negative"):
        model.embed(adata, layer="neg")


def test_embedding_refuses_cells_without_counts_in_the_models_genes(synthetic_h5ad, capsys):
    model = MetricModel.from_collection(synthetic_h5ad, hidden=(32,), latent=8)
    adata = ad.read_h5ad(synthetic_h5ad)[:100].copy()
    x = adata.X.toarray()
    x[[4, 7]] = 0  # two emptied cells
    adata.X = sp.csr_matrix(x)
    with pytest.raises(
        DataError, match=r"2 of 100 cells have no counts in the model's genes"
    ) as err:
        model.embed(adata)
    assert str(err.value).endswith("; or, to embed them anyway, pass check_counts=False.")
    # the command names its own ways, not Python's (review)
    from cellsift.cli import _error

    _error("annotate", err.value)
    said = capsys.readouterr().err
    assert (
        "Leave them out with --drop-empty; or, to embed them anyway, pass --no-check-counts."
        in said
    )
    assert "np.diff" not in said and "check_counts=" not in said
    # counts only in genes the model lacks count as empty too
    extra = ad.AnnData(
        sp.hstack([adata.X[:10], np.ones((10, 1), dtype=np.float32)], format="csr"),
        var=pd.DataFrame(index=[*adata.var_names, "ENSG99999999999"]),
    )
    with pytest.raises(DataError, match=r"2 of 10 cells"):
        model.embed(extra)
    kept = adata[np.asarray(adata.X.sum(1)).ravel() > 0]  # the fix the message gives
    assert model.embed(kept).shape == (98, 8)
    assert np.isfinite(model.embed(adata, check_counts=False)).all()


def test_embedding_a_backed_anndata_equals_the_in_memory_one(synthetic_h5ad, tmp_path, monkeypatch):
    from cellsift.models import metric

    model = MetricModel.from_collection(synthetic_h5ad, hidden=(32,), latent=8)
    want = model.embed(ad.read_h5ad(synthetic_h5ad))
    monkeypatch.setattr(metric, "BACKED_ROWS", 97)  # several blocks, the last one short
    backed = ad.read_h5ad(synthetic_h5ad, backed="r")
    np.testing.assert_array_equal(model.embed(backed), want)
    dense = ad.read_h5ad(synthetic_h5ad)
    dense.X = dense.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    np.testing.assert_allclose(
        model.embed(ad.read_h5ad(tmp_path / "dense.h5ad", backed="r")), want, atol=1e-6
    )
    # counts in a layer of a file without X (review: asking whether it held X opened it)
    full = ad.read_h5ad(synthetic_h5ad)
    ad.AnnData(obs=full.obs, var=full.var, layers={"counts": full.X}).write_h5ad(
        tmp_path / "no_x.h5ad"
    )
    no_x = ad.read_h5ad(tmp_path / "no_x.h5ad", backed="r")
    np.testing.assert_array_equal(model.embed(no_x, layer="counts"), want)
    with pytest.raises(MissingKeyError, match=r"has no layer 'n' \(this AnnData has: 'counts'\)"):
        model.embed(no_x, layer="n")
    with pytest.raises(MissingKeyError, match=r"has no X: pass layer= where the counts are"):
        model.embed(no_x)
    held = "has no layer 'n' \\(this AnnData has: X \\(layer=None\\)\\)"
    for with_x in (backed, full, full[:50]):  # (a view: its parent asked)
        with pytest.raises(MissingKeyError, match=held):
            model.embed(with_x, layer="n")
    # a file closed since: not opened again to word a message (review: it failed where the
    # file had moved), but opened to read X, as anndata does
    backed.file.close()
    closed = r"has no layer 'n' \(this AnnData has: X \(layer=None\), if its file holds one\)"
    with pytest.raises(MissingKeyError, match=closed):  # (review: X left out, as if none)
        model.embed(backed, layer="n")
    assert not backed.file.is_open
    np.testing.assert_array_equal(model.embed(backed), want)


def test_a_backed_anndata_is_embedded_a_block_at_a_time(synthetic_h5ad, tmp_path, monkeypatch):
    """An AnnData, backed or in memory, is read, aligned and embedded a block of rows at a
    time: the process never holds its aligned counts whole (before: every block and their
    join, twice the data; in memory, a whole aligned copy); a cell without counts in a later block is named by its rows there."""
    import tracemalloc

    from cellsift.models import metric

    model = MetricModel.from_collection(synthetic_h5ad, hidden=(32,), latent=8)
    one = ad.read_h5ad(synthetic_h5ad)
    many = ad.concat([one] * 7, index_unique="-")  # 21,000 cells
    x = many.X.tolil()
    x[15_003] = 0  # an empty cell in the 31st block of 500
    many.X = x.tocsr()
    many.write_h5ad(tmp_path / "many.h5ad")
    monkeypatch.setattr(metric, "BACKED_ROWS", 500)
    backed = ad.read_h5ad(tmp_path / "many.h5ad", backed="r")
    name = many.obs_names[15_003]
    said = rf"1 of the 500 cells in rows 15000-15499 of 21000 cells .*\['{name}'\]"
    with pytest.raises(DataError, match=said):
        model.embed(backed)
    kept = many[np.diff(many.X.indptr) > 0].copy()
    kept.write_h5ad(tmp_path / "kept.h5ad")
    backed = ad.read_h5ad(tmp_path / "kept.h5ad", backed="r")
    aligned = model.aligned_counts(kept)
    size = aligned.data.nbytes + aligned.indices.nbytes + aligned.indptr.nbytes
    shuffled = kept[:, ::-1].copy()  # (genes in another order: aligned, not taken as is)
    for data in (backed, shuffled):  # in memory too: no aligned copy of it whole
        tracemalloc.start()  # (numpy's arrays; torch's are not traced)
        try:
            got = model.embed(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 0.75 * size, (data is backed, peak, size)
    np.testing.assert_array_equal(got, model.embed(backed))


def test_training_runs_in_train_mode_after_embedding_loading_or_an_earlier_fit(
    synthetic_h5ad, tmp_path
):
    """Embedding and loading leave the module in eval mode; training must not inherit it
    (no dropout, BatchNorm statistics frozen)."""
    import lightning.pytorch as pl

    modes: list[bool] = []

    class Mode(pl.Callback):
        def on_train_batch_start(self, trainer, plan, batch, batch_idx):
            if batch_idx == 0:
                modes.append(plan.module.training and plan.module.encoder.training)

    def fit(model):
        train_without(
            model,
            synthetic_h5ad,
            "none",
            tmp_path,
            max_epochs=1,
            val_fraction=0,
            trainer={"callbacks": [Mode()], "limit_train_batches": 2},
        )

    model = MetricModel.from_collection(synthetic_h5ad, hidden=(32,), latent=8)
    model.embed(ad.read_h5ad(synthetic_h5ad)[:10])  # eval mode
    fit(model)
    fit(model)  # a second fit of the same model
    model.save(tmp_path / "bundle")
    loaded = MetricModel.load(tmp_path / "bundle")  # fine-tuning a saved model
    assert not loaded.module.training
    fit(loaded)
    assert modes == [True, True, True]
    assert not loaded.module.training  # back in eval mode for embedding after fit


def test_embedding_leaves_the_module_in_its_mode_and_on_its_device(synthetic_h5ad):
    """Inference runs in eval mode and gives the same embedding whatever mode the module is
    in; a module in train mode (a custom training loop's) is left in it, on its device."""
    model = MetricModel.from_collection(synthetic_h5ad, hidden=(32,), latent=8)
    cells = ad.read_h5ad(synthetic_h5ad)[:20].copy()
    model.module.eval()
    want = model.embed(cells)
    assert not model.module.training
    model.module.train()
    np.testing.assert_array_equal(model.embed(cells, device="cpu"), want)
    np.testing.assert_array_equal(model.embed_aligned(model.aligned_counts(cells)), want)
    assert model.module.training and model.module.encoder.training
    assert next(model.module.parameters()).device.type == "cpu"
    model.module.encoder.eval()  # a part the loop froze stays frozen
    model.embed(cells)
    assert model.module.training and model.module.decoder.training
    assert not model.module.encoder.training


def test_a_fit_without_a_step_is_an_error(synthetic_h5ad, tmp_path):
    from cellsift.errors import TrainingError

    model = MetricModel.from_collection(synthetic_h5ad, hidden=(32,), latent=8)
    with pytest.raises(TrainingError, match="no training step ran"):
        train_without(model, synthetic_h5ad, "none", tmp_path, max_epochs=0, val_fraction=0)


def test_training_on_a_last_batch_of_one_cell(tmp_path):
    """513 cells in batches of 256: the epoch's last cell would be a batch of its own, which
    BatchNorm cannot normalise in training."""
    from cellsift.datasets import synthetic_atlas

    path = synthetic_atlas(513, 200, n_studies=2, path=tmp_path / "a.h5ad", seed=0)
    model = MetricModel.from_collection(path, hidden=(32,), latent=8)
    dm = train_without(model, path, "none", tmp_path, max_epochs=1, val_fraction=0)
    assert model.trainer.global_step == 2 and len(dm.train_dataloader()) == 2


def test_the_fingerprint_reads_what_decides_the_embedding_only(synthetic_h5ad):
    """Settings of the loss, the label head, the decoder and the installed Cell Ontology do
    not change a model's embeddings, nor its fingerprint; the encoder's weights do."""
    model = MetricModel.from_collection(synthetic_h5ad, hidden=(32,), latent=8)
    fp = model.fingerprint
    model.config["ontology"]["version"] = "1999-01-01"
    model.config["loss"]["margin"] = 0.5
    with torch.no_grad():
        model.module.decoder.network[-1].weight.add_(1.0)
    assert model.fingerprint == fp
    with torch.no_grad():
        next(model.module.encoder.parameters()).view(-1)[0] += 1.0
    assert model.fingerprint != fp


def test_the_empty_cell_fix_in_the_message_works(synthetic_h5ad):
    """Cells with counts only in genes the model lacks: the filter the error gives drops them;
    attributions of other cells do not trip on them."""
    from cellsift.tasks import attribute_difference

    model = MetricModel.from_collection(synthetic_h5ad, hidden=(32,), latent=8)
    adata = ad.read_h5ad(synthetic_h5ad)[:40].copy()
    extra = ad.AnnData(
        sp.hstack([adata.X, np.ones((40, 1), dtype=np.float32)], format="csr"),
        obs=adata.obs,
        var=pd.DataFrame(index=[*adata.var_names, "ENSG99999999999"]),
    )
    x = extra.X.tolil()
    x[3, :-1] = 0  # cell 3: a count in the unknown gene only
    extra.X = x.tocsr()
    with pytest.raises(DataError, match=r"1 of 40 cells have no counts.*aligned_counts\(adata\)"):
        model.embed(extra)
    keep = np.diff(model.aligned_counts(extra).indptr) > 0
    assert keep.sum() == 39 and not keep[3]
    assert model.embed(extra[keep]).shape == (39, 8)
    a = np.zeros(40, bool)
    a[:5] = True
    a[3] = False
    b = np.zeros(40, bool)
    b[10:15] = True
    import warnings

    with warnings.catch_warnings():  # few integration steps: convergence is not the point
        warnings.simplefilter("ignore")
        attribute_difference(model, extra, a, b, n_steps=4)  # cell 3 in neither group


def test_numpy_settings_go_into_json(tmp_path):
    """Sizes and rates as numpy numbers (read from an array or a table) make a model whose
    config, run identity and bundle are plain JSON."""
    import numpy as np

    from cellsift.models import MetricModel

    genes = [f"g{i}" for i in range(10)]
    model = MetricModel(
        genes, ["CL:0000236", "CL:0000084"], hidden=np.array([8, 8]), latent=np.int64(4),
        dropout=np.float32(0.25), margin=np.float64(0.1),
    )  # fmt: skip
    assert model.run_identity()["settings"]["architecture"]["hidden"] == [8, 8]
    loaded = MetricModel.load(model.save(tmp_path / "m"))
    assert loaded.config["architecture"]["latent"] == 4 and loaded.config["loss"]["margin"] == 0.1


def test_training_on_stores_reads_the_models_label_column_and_trains_every_cell(tmp_path):
    """model.train(adata) reads labels from the column from_collection read them from, and
    trains every cell (a validation split is a CellDataModule's to make): no study held
    out, and one study is no error."""
    from cellsift.datasets import synthetic_atlas

    adata = synthetic_atlas(600, 200, n_studies=3, seed=2)
    coarse = {"CL:0000624": "T cell", "CL:0000625": "T cell"}
    ids = adata.obs["cell_type_ontology_term_id"].astype(str)
    adata.obs["coarse"] = [coarse.get(c, c) for c in ids]
    del adata.obs["cell_type_ontology_term_id"]
    model = MetricModel.from_collection(adata, label_key="coarse", hidden=(16,), latent=4)
    assert "CL:0000084" in model.labels  # T cell
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}

    def train(model, data):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*labels the model does not have")
            return model.train(
                data,
                max_epochs=1,
                accelerator="cpu",
                default_root_dir=tmp_path,
                enable_checkpointing=False,
                **quiet,
            )

    for data in (adata, adata[adata.obs["dataset_id"] == "study_00"].copy()):
        dm = train(model, data).datamodule
        assert dm.val is None and dm.train.n_obs == data.n_obs
    # the bundle keeps the label column: the loaded model fine-tunes on it as it trained
    loaded = MetricModel.load(model.save(tmp_path / "bundle"))
    assert loaded.label_key == "coarse"
    assert train(loaded, adata).datamodule.label_key == "coarse"


def test_training_reads_the_counts_where_they_are_and_enough_of_the_models_genes(
    synthetic_h5ad, tmp_path
):
    """scanpy's layout (X normalised, counts in a layer): from_collection and train take
    layer= (and check_counts=), as the error says; data holding a tenth of the model's genes
    are refused as embed refuses them, not trained with the rest read as zero; a file that
    is no checkpoint is said so whatever the logger."""
    adata = ad.read_h5ad(synthetic_h5ad)
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.astype(np.float32) / 7
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    kw = {"max_epochs": 1, "accelerator": "cpu", "enable_checkpointing": False, **quiet}
    with pytest.raises(DataError, match=r"Point layer= at raw counts"):
        MetricModel.from_collection(adata, hidden=(16,), latent=4)
    model = MetricModel.from_collection(adata, hidden=(16,), latent=4, layer="counts")
    with pytest.raises(DataError, match=r"Point layer= at raw counts"):
        model.train(adata, default_root_dir=tmp_path, **kw)
    model.train(adata, default_root_dir=tmp_path, layer="counts", **kw)
    assert model.trainer.global_step > 0
    with pytest.raises(ConfigError, match=r"collection_options=\{'layer'"):
        model.train(CellDataModule(adata), layer="counts", **kw)
    panel = adata[:, : adata.n_vars // 10].copy()
    before = model.embed(adata[:50], layer="counts")
    with pytest.raises(GeneAlignmentError, match=r"only 30 of the model's 300 \(need 150\)"):
        model.train(panel, default_root_dir=tmp_path, layer="counts", **kw)
    np.testing.assert_array_equal(model.embed(adata[:50], layer="counts"), before)
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(DataError, match=r"notes\.ckpt cannot be read as a checkpoint"):
        model.train(adata, layer="counts", ckpt_path=str(tmp_path / "notes.ckpt"), **kw)


def test_cells_without_counts_in_memory_name_a_cell_and_fixes_that_work(synthetic_h5ad, tmp_path):
    """An AnnData in memory holding a cell without counts: the error names that cell and
    ways to drop such cells that the in-memory path takes (it named only CellCollection's
    min_genes and convert, neither of which from_collection or train took as such;
    hunt179). Each named way works."""
    from cellsift.data import CellCollection

    adata = ad.read_h5ad(synthetic_h5ad)[:300].copy()
    x = sp.csr_matrix(adata.X).tolil()
    x[3] = 0
    adata.X = x.tocsr()
    adata.X.eliminate_zeros()
    with pytest.raises(
        DataError, match=r"1 of 300 cells have no counts at all, e\.g\. cell 3 \("
    ) as err:
        MetricModel.from_collection(adata, hidden=(16,), latent=4)
    assert "CellDataModule(..., collection_options={'min_genes': 1})" in str(err.value)
    assert "adata[adata.X.getnnz(axis=1) > 0]" in str(err.value)
    model = MetricModel.from_collection(CellCollection(adata, min_genes=1), hidden=(16,), latent=4)
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    kw = {"max_epochs": 1, "accelerator": "cpu", "enable_checkpointing": False, **quiet}
    dm = CellDataModule(
        adata,
        label_key=model.label_key,
        study_key=None,
        val_fraction=0,
        batch_size=64,
        collection_options={"min_genes": 1},
    )
    model.train(dm, default_root_dir=tmp_path, **kw)
    assert model.trainer.global_step > 0
    model.train(adata[adata.X.getnnz(axis=1) > 0], default_root_dir=tmp_path, **kw)


def test_values_that_are_not_counts_in_memory_name_the_anndatas_layers(synthetic_h5ad):
    """Log-normalised X with the counts in a layer, trained on in memory: the error names
    the AnnData's layers as it does a file's (it named none: a store in memory has no file
    to list; hunt179)."""
    adata = ad.read_h5ad(synthetic_h5ad)[:200].copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.log1p()
    model = MetricModel.from_collection(adata, layer="counts", hidden=(16,), latent=4)
    with pytest.raises(DataError, match=r"layer= at raw counts \(this AnnData has: 'counts'\)"):
        model.train(adata, max_epochs=1, accelerator="cpu", logger=False)


def test_train_takes_one_callback_and_the_plans_schedule(synthetic_h5ad, tmp_path):
    """One callback, as Trainer takes it (not only a list); scheduler='none', which a run
    bounded by max_time alone (max_epochs=-1) needs, as the cosine schedule's error says;
    asw_cells reaches the plan; a schedule that is none of the two is refused; numpy's
    whole numbers of epochs between validations are taken."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor

    from cellsift.errors import ConfigError

    rates = LearningRateMonitor()
    with pytest.raises(ConfigError, match=r"scheduler='none' \(MetricModel\.train"):
        _fit(synthetic_h5ad, tmp_path / "a", max_epochs=-1, max_time={"seconds": 5})
    trainer = None

    class Seen(pl.Callback):
        def on_train_end(self, trainer_, plan):
            nonlocal trainer
            trainer = trainer_

    seen = Seen()
    _fit(
        synthetic_h5ad,
        tmp_path / "b",
        max_epochs=-1,
        max_time={"seconds": 3},
        scheduler="none",
        asw_cells=50,
        callbacks=seen,
        logger=False,
    )
    assert trainer is not None and trainer.global_step > 0
    plan = trainer.lightning_module
    assert plan.scheduler == "none" and plan.asw_cells == 50
    assert not trainer.lr_scheduler_configs  # a constant rate
    # (a numpy whole number of epochs between validations: Lightning takes Python's only)
    _fit(
        synthetic_h5ad,
        tmp_path / "c",
        max_steps=2,
        callbacks=rates,
        check_val_every_n_epoch=np.int64(1),
    )
    assert rates.lrs  # (the single callback ran)
    with pytest.raises(ConfigError, match="scheduler is 'cosine'"):
        _fit(synthetic_h5ad, tmp_path / "d", max_steps=1, scheduler="cosin")


def test_a_one_dimensional_embedding_is_refused():
    """Unit-length embeddings of width 1 are -1 or 1: every cell at one of two points."""
    from cellsift.errors import ConfigError

    genes = [f"ENSG{i:011d}" for i in range(10)]
    with pytest.raises(ConfigError, match=r"latent is the embedding's width, at least 2"):
        MetricModel(genes, ["CL:0000236", "CL:0000624"], hidden=(8,), latent=1)
    MetricModel(genes, ["CL:0000236", "CL:0000624"], hidden=(8,), latent=2)


@pytest.mark.parametrize(
    ("labels", "names", "message"),
    [
        (["", "b"], None, "label 0 has the empty label"),
        (["a", "b"], [1, 2], "label 0 has the name 1"),
        (["a", "b"], ["x", None], "label 1 has the name None"),
        (["a", "b"], [float("nan"), "y"], "label 0 has the name nan"),
    ],
)
def test_labels_a_bundle_could_not_hold_are_refused_when_the_model_is_made(
    tmp_path, labels, names, message
):
    """An empty label, or names that are not text: refused as the model is made (hunt273:
    saved without a word into a bundle that load then called edited by another tool)."""
    with pytest.raises(ValueError, match=message):
        MetricModel(["g1", "g2"], labels, hidden=(4,), latent=2, ontology_aware=False,
                    label_names=names)  # fmt: skip
    model = MetricModel(["g1", "g2"], ["a", " "], hidden=(4,), latent=2, ontology_aware=False)
    assert MetricModel.load(model.save(tmp_path / "m")).labels == ["a", " "]
