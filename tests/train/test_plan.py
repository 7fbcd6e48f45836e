"""The training plan under a real Lightning Trainer."""

from __future__ import annotations

import time
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from cellsift._warnings import CellsiftWarning
from cellsift.data.datamodule import CellDataModule
from cellsift.errors import ConfigError, TrainingError
from cellsift.nn import MetricModule
from cellsift.ontology import load_cell_ontology
from cellsift.train import TrainingPlan


def _trainer(tmp_path, **kw):
    """A quiet CPU trainer, one device unless ``kw`` says otherwise."""
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    return pl.Trainer(default_root_dir=tmp_path, **(options | kw))


def _setup(path, **options):
    """A data module split by donor (``options`` override its loader settings) and a small
    MetricModule for its genes and labels."""
    options = {
        "batch_size": 256,
        "block_size": 16,
        "fetch_factor": 4,
        "val_fraction": 0.2,
    } | options
    dm = CellDataModule(path, split_key="donor_id", **options)
    dm.setup()
    related = torch.from_numpy(load_cell_ontology().related(dm.categories["y_n"]))
    module = MetricModule(
        dm.collection.n_vars, (64, 64), 16, related_ll=related, triplet_weight=0.5
    )
    return dm, module


def test_fit_logs_losses_lr_and_asw(synthetic_h5ad, tmp_path):
    torch.manual_seed(0)
    dm, module = _setup(synthetic_h5ad)
    plan = TrainingPlan(module)
    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.validate(plan, datamodule=dm)
    asw_before = float(trainer.callback_metrics["val/asw"])
    trainer.fit(plan, datamodule=dm)
    m = trainer.callback_metrics
    for key in (
        "train/loss_epoch",
        "train/triplet_loss_epoch",
        "train/recon_loss_epoch",
        "train/cells_per_s",
        "val/loss",
        "val/asw",
    ):
        assert key in m, key
    assert float(m["val/asw"]) > asw_before  # held-out donors separate better
    assert float(m["train/lr"]) < 5e-3  # cosine schedule has decayed
    assert trainer.optimizers[0].defaults["fused"]  # one kernel over all parameters


class _RatesLogged(TrainingPlan):
    def __init__(self, module):
        super().__init__(module)
        self.rates: list[float] = []

    def log(self, name, value, *args, **kwargs):
        if name == "train/cells_per_s":
            self.rates.append(float(value))
        super().log(name, value, *args, **kwargs)


class _SlowValidation(pl.Callback):
    """The first validation after a training step (the one mid-epoch, which a step follows;
    not the sanity check's, before any) takes long beside a step of 64 cells (milliseconds;
    under a loaded machine's contention, seen up to 2 s), so that a step's rate that held
    it stands out."""

    SECONDS = 6.0

    def __init__(self) -> None:
        self.slept = False

    def on_validation_end(self, trainer, plan):
        if not trainer.sanity_checking and not self.slept:
            self.slept = True
            time.sleep(self.SECONDS)


def test_cells_per_s_leaves_out_a_validation_within_the_epoch(synthetic_h5ad, tmp_path):
    """The step after a mid-epoch validation measures nothing, rather than the validation's
    seconds."""
    torch.manual_seed(0)
    dm, module = _setup(synthetic_h5ad, batch_size=64, val_fraction=0.1)
    plan = _RatesLogged(module)
    slow = _SlowValidation()
    trainer = _trainer(tmp_path, max_epochs=1, val_check_interval=0.5, callbacks=[slow])
    trainer.fit(plan, datamodule=dm)
    assert slow.slept
    steps = trainer.global_step
    # no rate for the epoch's first step, nor for the first after the validation mid-way
    assert steps >= 8 and len(plan.rates) == steps - 2
    # every step's seconds its own, not the validation's sleep
    assert min(plan.rates) > 64 / _SlowValidation.SECONDS


class _Clock:
    """A clock that moves one second at each reading: each step takes one second."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_cells_per_s_counts_the_cells_of_the_step_timed(synthetic_h5ad, tmp_path, monkeypatch):
    """A step's rate is its batch's cells over its seconds (from its start to the next
    step's), so the epoch's short last batch is timed with its own cells (hunt245: the last
    full step's seconds over the short batch's cells, 319 cells/s beside 4,500)."""
    from cellsift.train import plan as plan_module

    torch.manual_seed(0)
    dm, module = _setup(synthetic_h5ad, batch_size=64, val_fraction=0.1)
    plan = _RatesLogged(module)
    monkeypatch.setattr(plan_module, "time", _Clock())  # (one second a step)
    trainer = _trainer(tmp_path, max_epochs=1, num_sanity_val_steps=0)
    sizes: list[int] = []
    step = plan.training_step

    def counted(batch, batch_idx):
        sizes.append(int(batch["x_ng"].shape[0]))
        return step(batch, batch_idx)

    monkeypatch.setattr(plan, "training_step", counted)
    trainer.fit(plan, datamodule=dm)
    assert sizes[-1] < 64 == sizes[0]  # (a short last batch)
    assert plan.rates == [float(n) for n in sizes[:-1]]


class _Explodes(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, batch):
        out = self.inner(batch)
        self.calls += 1
        if self.calls == 3:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_stops_with_the_step(synthetic_h5ad, tmp_path):
    dm, module = _setup(synthetic_h5ad)
    trainer = _trainer(tmp_path, max_epochs=1, num_sanity_val_steps=0)
    with pytest.raises(TrainingError, match=r"nan at step 2 \(epoch 0, batch 2\)"):
        trainer.fit(TrainingPlan(_Explodes(module)), datamodule=dm)


def test_validation_every_so_often_takes_each_of_lightnings_forms(synthetic_h5ad, tmp_path):
    """A share of an epoch, a number of batches, or a time (text, timedelta, dict) between
    validations trains; none of batches, a share of 0 or above 1 is refused before a step."""
    import datetime

    dm, module = _setup(synthetic_h5ad)
    for every in (0.5, np.float32(0.5), 2, "00:00:05:00", datetime.timedelta(minutes=5)):
        trainer = _trainer(tmp_path, max_steps=2, val_check_interval=every)
        trainer.fit(TrainingPlan(module), datamodule=dm)
        assert trainer.global_step == 2
    for every in (0, 0.0):
        trainer = _trainer(tmp_path, max_steps=2, val_check_interval=every)
        with pytest.raises(ConfigError, match=f"val_check_interval is .* not {every}"):
            trainer.fit(TrainingPlan(module), datamodule=dm)
        assert trainer.global_step == 0


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gradients_are_clipped_under_mixed_precision(synthetic_h5ad, tmp_path, precision):
    """Mixed precision unscales gradients before clipping them, which a fused optimiser
    does not allow: a clipped run steps per tensor and trains; an unclipped one fuses."""
    dm, module = _setup(synthetic_h5ad)
    trainer = _trainer(
        tmp_path,
        max_steps=2,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        precision=precision,
        gradient_clip_val=1.0,
    )
    plan = TrainingPlan(module)
    with _bf16_on_this_cpu():
        trainer.fit(plan, datamodule=dm)
    assert trainer.global_step == 2
    assert not trainer.optimizers[0].defaults["fused"]
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0, precision=precision)
    with _bf16_on_this_cpu():
        trainer.fit(TrainingPlan(module), datamodule=dm)
    assert trainer.optimizers[0].defaults["fused"]


def _bf16_on_this_cpu() -> object:
    """A block that trains in bf16-mixed on the CPU: warned of where torch has no fast
    bfloat16 product on this CPU (AVX2 only), else quietly. (16-mixed on the CPU is
    Lightning's bf16-mixed.)"""
    import contextlib

    from cellsift.train.plan import cpu_has_fast_bfloat16

    if not cpu_has_fast_bfloat16():
        said = r"'bf16-mixed' on this CPU: torch has no fast bfloat16 matrix product here"
        return pytest.warns(CellsiftWarning, match=said + r".*Train in '32-true'")
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("error", CellsiftWarning)
    return stack


def test_the_cpus_bfloat16_speed_is_told_apart():
    """cpu_has_fast_bfloat16 against a timing (one thread, best of 7): a CPU it says has
    none multiplies bfloat16 matrices many times slower than float32 ones (51-120x on
    AVX2), one it says has them at most a few times slower."""
    from cellsift.train.plan import cpu_has_fast_bfloat16

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (a loaded second core inflates the small float32 product)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(64, 512, generator=gen), torch.randn(512, 512, generator=gen)

        def best(x, y):
            times = []
            for _ in range(8):
                t = time.perf_counter()
                x @ y
                times.append(time.perf_counter() - t)
            return min(times[1:])

        slower = best(a.bfloat16(), b.bfloat16()) / best(a, b)
    finally:
        torch.set_num_threads(threads)
    assert slower > 10 if not cpu_has_fast_bfloat16() else slower < 5


def test_metric_plan_refuses_labels_the_model_would_not_line_up_with():
    """The data's label codes index the linked labels as they are: names, or a name and its
    id side by side, would shift every code after them."""
    from cellsift.errors import ConfigError
    from cellsift.train.cli import MetricPlan

    genes = [f"ENSG{i:011d}" for i in range(10)]
    MetricPlan(genes, ["CL:0000236", "CL:0000624"], hidden=(8,), latent=4)  # fine
    for labels in (["B cell", "CL:0000624"], ["CL:0000236", "B cell", "CL:0000624"]):
        with pytest.raises(ConfigError, match=r"e.g. 'B cell'.*harmonize_labels: true") as e:
            MetricPlan(genes, labels, hidden=(8,), latent=4)
        # which id to list where data.init_args.labels gives them (harmonised already)
        assert "'B cell' is CL:0000236" in str(e.value)
        assert "list data.init_args.labels, where given, as those ids" in str(e.value)


def test_plan_settings_that_are_no_schedule_are_refused():
    """A scheduler other than the two (a typo) is refused, not trained as the cosine."""
    from cellsift.errors import ConfigError

    module = torch.nn.Linear(2, 2)
    for bad in ("None", "constant", None):
        with pytest.raises(ConfigError, match=r"scheduler is 'cosine' .* or 'none'"):
            TrainingPlan(module, scheduler=bad)  # type: ignore[arg-type]
    # (hunt261) asw_cells a fraction: refused here, not a TypeError of a slice at the end
    # of the first validation
    for bad in (1e4, 100.5, 1, "50"):
        with pytest.raises(ConfigError, match=r"asw_cells must be a whole number of at least 2"):
            TrainingPlan(module, asw_cells=bad)  # type: ignore[arg-type]


class _Validations(pl.Callback):
    """What a run validated (step, epoch, val/asw, val/loss) and each epoch's training
    loss mean, as the loggers got them."""

    def __init__(self):
        self.seen: list[tuple] = []

    def on_validation_end(self, trainer, plan):
        if not trainer.sanity_checking:
            m = trainer.callback_metrics
            asw, loss = float(m["val/asw"]), float(m["val/loss"])
            self.seen.append(("val", trainer.global_step, trainer.current_epoch, asw, loss))

    def on_train_epoch_start(self, trainer, plan):
        if "train/loss_epoch" in trainer.callback_metrics:  # (the epoch before's)
            self.seen.append(("epoch", float(trainer.callback_metrics["train/loss_epoch"])))


@pytest.mark.parametrize(
    "validation", ["at-epoch-end", "mid-epoch-only", "none", "mid-epoch-at-the-checkpoint"]
)
def test_a_run_resumed_from_an_epochs_last_step_ends_as_the_uninterrupted_one(
    synthetic_h5ad, tmp_path, validation
):
    """A checkpoint of an epoch's last step is written before that epoch's validation and
    end: the resumed run validates that epoch (early stopping and monitored checkpoints
    see it), logs its means, and goes on, as the uninterrupted run did. So does one of a
    step within the epoch after which a validation is due (val_check_interval). Validation's
    triplet mining draws are kept out of training's stream, so the resumed run ends with
    the uninterrupted run's weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    # (batches of 240: an odd number of them an epoch, 11 of the 2,434 training cells)
    data = {"batch_size": 240, **({"val_fraction": 0} if validation == "none" else {})}
    mid = validation.startswith("mid-epoch")
    trainer_options = {"val_check_interval": 0.5} if mid else {}

    def run(root, **fit):
        torch.manual_seed(0)
        dm, module = _setup(synthetic_h5ad, mode="weighted", seed=1, **data)
        ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1)
        seen = _Validations()
        trainer = _trainer(
            root,
            max_epochs=3,
            enable_checkpointing=True,
            callbacks=[ckpt, seen],
            num_sanity_val_steps=0,
            **trainer_options,
        )
        plan = TrainingPlan(module)
        trainer.fit(plan, datamodule=dm, **fit)
        return trainer, plan, seen.seen

    whole, plan, seen = run(tmp_path / "whole")
    per_epoch = whole.global_step // 3
    if mid:
        assert per_epoch % 2 == 1  # (so that no validation falls on an epoch's last step)
    at = per_epoch // 2 if validation == "mid-epoch-at-the-checkpoint" else per_epoch
    if at != per_epoch:
        assert ("val", at, 0) in [e[:3] for e in seen]
    first = tmp_path / "whole" / f"epoch=0-step={at}.ckpt"
    assert first.exists()
    resumed, again, seen_again = run(tmp_path / "resumed", ckpt_path=first)
    assert resumed.global_step == whole.global_step
    for (key, a), b in zip(
        plan.module.state_dict().items(), again.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    # what the uninterrupted run logged from the checkpoint's step on: epoch 0's
    # validation (where it validated at its end) and means, then the epochs after
    after = [e for e in seen if e[0] == "epoch" or e[1] >= at]
    assert [e[:3] for e in seen_again] == [e[:3] for e in after]

    def values(events):
        return [v for e in events for v in (e[1:] if e[0] == "epoch" else e[3:])]

    np.testing.assert_allclose(values(seen_again), values(after), rtol=1e-6)
    if validation in ("at-epoch-end", "mid-epoch-at-the-checkpoint"):
        assert seen_again[0][:3] == ("val", at, 0)


@pytest.mark.parametrize("every", ["an-epoch", "an-epoch-and-a-step"])
def test_a_finished_run_goes_on_from_where_it_ended(synthetic_h5ad, tmp_path, every):
    """A run's last checkpoint is written again as it ends: resumed with its own length it
    does nothing again (before: a checkpoint saved on the epoch's last step, before that
    epoch's validation, validated again and kept a second best, "-v1"); given more epochs
    it goes on from its last step (before: from the last save every n steps) and ends as
    the uninterrupted run of that length, with one best checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, epochs, steps, **fit):
        torch.manual_seed(0)
        dm, module = _setup(synthetic_h5ad, mode="weighted", seed=1)
        callbacks = [
            ModelCheckpoint(
                dirpath=root, filename="best-{epoch}-{step}", monitor="val/asw", mode="max"
            ),
            ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=steps),
        ]
        seen = _Validations()
        trainer = _trainer(
            root,
            max_epochs=epochs,
            enable_checkpointing=True,
            callbacks=[*callbacks, seen],
            num_sanity_val_steps=0,
        )
        plan = TrainingPlan(module, scheduler="none")
        trainer.fit(plan, datamodule=dm, **fit)
        return trainer, plan, [e[:3] for e in seen.seen if e[0] == "val"]

    whole, plan, seen = run(tmp_path / "whole", 3, 10**6)
    per_epoch = whole.global_step // 3
    steps = per_epoch if every == "an-epoch" else per_epoch + 1
    root = tmp_path / "split"
    first, _, _ = run(root, 2, steps)
    assert first.global_step == 2 * per_epoch
    again, _, validated = run(root, 2, steps, ckpt_path="last")
    assert again.global_step == 2 * per_epoch
    assert validated == []
    assert len(list(root.glob("best-*.ckpt"))) == 1
    on, plan_on, validated = run(root, 3, steps, ckpt_path="last")
    assert on.global_step == whole.global_step
    assert validated == [("val", 3 * per_epoch, 2)] == seen[2:]
    for (key, a), b in zip(
        plan.module.state_dict().items(), plan_on.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    assert len(list(root.glob("best-*.ckpt"))) == 1


@pytest.mark.parametrize("saved", ["every-4-steps", "every-epoch"])
def test_a_run_stopped_early_and_resumed_stops_where_it_stopped(synthetic_h5ad, tmp_path, saved):
    """A run stopped by early stopping keeps its last checkpoint of the steps (not one
    written where it stopped again as it ends: Lightning keeps no stop in a checkpoint, and
    a resumed run trained on past it, review): a job that always resumes from "last"
    replays to the stop, stops there again and ends with the same weights. A last
    checkpoint saved at each epoch's end (MetricModel.train's) is written after early
    stopping asked to stop: it keeps that stop, and the run resumed from it ends at once,
    saying so (it trained another epoch, hunt175)."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from cellsift._warnings import CellsiftWarning

    every = {"every_n_train_steps": 4} if saved == "every-4-steps" else {}

    def run(**fit):
        torch.manual_seed(0)
        dm, module = _setup(synthetic_h5ad, mode="weighted", seed=1)
        callbacks = [
            ModelCheckpoint(
                dirpath=tmp_path, filename="best-{epoch}-{step}", monitor="val/asw", mode="max"
            ),
            ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, **every),
            EarlyStopping(monitor="val/asw", mode="max", patience=1, min_delta=1.0),
        ]
        trainer = _trainer(
            tmp_path,
            max_epochs=30,
            enable_checkpointing=True,
            callbacks=callbacks,
            num_sanity_val_steps=0,
        )
        plan = TrainingPlan(module, scheduler="none")
        trainer.fit(plan, datamodule=dm, **fit)
        return trainer, plan

    first, plan = run()
    assert first.current_epoch < 5  # (stopped early)
    if saved == "every-epoch":
        with pytest.warns(CellsiftWarning, match=r"as early stopping stopped its run .*stops th"):
            again, plan_again = run(ckpt_path="last")
    else:
        again, plan_again = run(ckpt_path="last")
    assert again.global_step == first.global_step
    for (key, a), b in zip(
        plan.module.state_dict().items(), plan_again.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


@pytest.mark.serial  # (validations a second apart: a slow step would add one)
def test_a_run_resumed_under_a_time_between_validations_logs_on_the_same_steps(
    synthetic_h5ad, tmp_path
):
    """With a time between validations, a resumed run starts that clock afresh and does not
    find the validation due that the uninterrupted run made after the checkpoint's step:
    the checkpoint is resumed as Lightning reads it, with its logged steps those of the
    uninterrupted run (not one behind, as a checkpoint set to validate first would leave
    them)."""
    from datetime import timedelta

    from lightning.pytorch.callbacks import ModelCheckpoint

    at = 3

    class Slow(pl.Callback):  # the time between validations passes at step `at`
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == at and not trainer.ckpt_path:
                time.sleep(1.2)

    def run(root, **fit):
        torch.manual_seed(0)
        dm, module = _setup(synthetic_h5ad, mode="weighted", seed=1)
        ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1)
        trainer = _trainer(
            root,
            max_epochs=1,
            enable_checkpointing=True,
            callbacks=[Slow(), ckpt],
            num_sanity_val_steps=0,
            val_check_interval=timedelta(seconds=1),
        )
        trainer.fit(TrainingPlan(module), datamodule=dm, **fit)
        return trainer

    whole = run(tmp_path / "whole")
    assert whole.global_step > at + 1
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "whole" / f"epoch=0-step={at}.ckpt")
    assert resumed.global_step == whole.global_step
    stepped = [t.fit_loop.epoch_loop._batches_that_stepped for t in (whole, resumed)]
    assert stepped[0] == stepped[1]


def test_an_epoch_resumed_mid_way_logs_the_mean_over_all_its_batches(synthetic_h5ad, tmp_path):
    """The training epoch means of an epoch resumed from a mid-epoch checkpoint are those
    of the uninterrupted epoch (Lightning keeps no logged values in a checkpoint: without
    the plan's own sums they would cover the batches after the checkpoint only)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    keys = ("train/loss_epoch", "train/triplet_loss_epoch", "train/n_triplets_epoch")

    def run(root, **fit):
        torch.manual_seed(0)
        dm, module = _setup(synthetic_h5ad, mode="block", seed=1)
        ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1)
        trainer = _trainer(
            root, max_epochs=1, enable_checkpointing=True, callbacks=[ckpt], num_sanity_val_steps=0
        )
        trainer.fit(TrainingPlan(module), datamodule=dm, **fit)
        return trainer

    whole = run(tmp_path / "whole")
    steps = whole.global_step
    assert steps > 3
    want = {k: float(whole.callback_metrics[k]) for k in keys if k in whole.callback_metrics}
    assert "train/loss_epoch" in want
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "whole" / "epoch=0-step=3.ckpt")
    assert resumed.global_step == steps
    got = {k: float(resumed.callback_metrics[k]) for k in want}
    assert got == pytest.approx(want, rel=1e-6)


def test_resuming_from_last_without_a_checkpoint_says_where_it_looked(tmp_path, caplog):
    """A job that always passes ckpt_path="last" starts afresh the first time; run from
    another directory it would retrain silently, so the directory searched is named."""
    import logging

    from lightning.pytorch.callbacks import ModelCheckpoint

    from cellsift.train.resume import continued_run

    where = tmp_path / "checkpoints"
    with caplog.at_level(logging.WARNING, logger="cellsift"):
        assert continued_run("last", [ModelCheckpoint(dirpath=where)], tmp_path, "run") is None
    assert f"no last*.ckpt in {where}, so training starts from the beginning" in caplog.text
    caplog.clear()  # two callbacks in one folder (a best and a last): named once
    two = [ModelCheckpoint(dirpath=where, monitor="val/asw"), ModelCheckpoint(dirpath=where)]
    with caplog.at_level(logging.WARNING, logger="cellsift"):
        assert continued_run("last", two, tmp_path, "run") is None
    assert f"no last*.ckpt in {where}, so training" in caplog.text


def test_a_setting_added_since_a_checkpoint_was_kept_reads_as_its_old_default():
    """A checkpoint from before loss.ontology_aware existed was trained ontology-aware: it
    resumes into such a run, and is refused by a run with the setting off."""
    from cellsift.train.plan import _changed_settings

    old = {"loss": {"margin": 0.05}}
    assert _changed_settings(old, {"loss": {"margin": 0.05, "ontology_aware": True}}) == []
    assert _changed_settings(old, {"loss": {"margin": 0.05, "ontology_aware": False}}) == [
        "loss.ontology_aware True there, False here"
    ]


def test_a_schedules_settings_do_not_move_as_it_steps_and_name_what_differs():
    """The resume check's record of a schedule (its state less its progress) is the same
    after any number of steps, for each of torch's schedules, those of schedules too; and it
    tells two schedules of other settings apart (an inner schedule's gamma, OneCycleLR's
    pct_start, which it keeps under private names)."""
    from cellsift.train.plan import _schedule_settings

    sched = torch.optim.lr_scheduler

    def built(opt: torch.optim.Optimizer, name: str, value: float = 0.5) -> object:
        make = {
            "StepLR": lambda: sched.StepLR(opt, 2, value),
            "MultiStepLR": lambda: sched.MultiStepLR(opt, [2, 5], value),
            "ConstantLR": lambda: sched.ConstantLR(opt, value, total_iters=3),
            "LinearLR": lambda: sched.LinearLR(opt, value, total_iters=3),
            "ExponentialLR": lambda: sched.ExponentialLR(opt, value),
            "PolynomialLR": lambda: sched.PolynomialLR(opt, 6, value),
            "CosineAnnealingLR": lambda: sched.CosineAnnealingLR(opt, 4),
            "CosineAnnealingWarmRestarts": lambda: sched.CosineAnnealingWarmRestarts(opt, 2, 2),
            "CyclicLR": lambda: sched.CyclicLR(opt, 0.01, 0.1, step_size_up=2),
            "OneCycleLR": lambda: sched.OneCycleLR(opt, 0.1, total_steps=20, pct_start=value),
            "ReduceLROnPlateau": lambda: sched.ReduceLROnPlateau(opt, patience=1),
            "SequentialLR": lambda: sched.SequentialLR(
                opt, [sched.LinearLR(opt, 0.5, total_iters=2), sched.ExponentialLR(opt, value)], [3]
            ),
            "ChainedScheduler": lambda: sched.ChainedScheduler(
                [sched.StepLR(opt, 2, 0.5), sched.ExponentialLR(opt, value)]
            ),
        }
        return make[name]()

    for name in (
        "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR",
        "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR",
        "ReduceLROnPlateau", "SequentialLR", "ChainedScheduler",
    ):  # fmt: skip
        weights = [torch.nn.Parameter(torch.ones(3))]
        opt = torch.optim.SGD(weights, lr=0.1, momentum=0.9)
        schedule = built(opt, name)
        first = _schedule_settings(schedule.state_dict(), "s")
        for step in range(9):
            opt.step()
            schedule.step(*([1.0 + step % 2] if name == "ReduceLROnPlateau" else []))
            assert _schedule_settings(schedule.state_dict(), "s") == first, name
        if name in ("SequentialLR", "ChainedScheduler", "StepLR", "ExponentialLR", "OneCycleLR"):
            other = built(torch.optim.SGD(weights, lr=0.1, momentum=0.9), name, value=0.25)
            assert _schedule_settings(other.state_dict(), "s") != first, name


def test_validation_asw_is_of_the_distance_trained_on(synthetic_h5ad, tmp_path):
    """A model whose triplet loss is euclidean is scored on euclidean distances, as its
    embedding is trained: the silhouette of its validation cells computed so, by hand."""
    from cellsift.train import silhouette

    torch.manual_seed(0)
    dm = CellDataModule(synthetic_h5ad, split_key="donor_id", batch_size=256, val_fraction=0.2)
    dm.setup()
    related = torch.from_numpy(load_cell_ontology().related(dm.categories["y_n"]))
    module = MetricModule(
        dm.collection.n_vars, (64, 64), 16, related_ll=related, distance="euclidean"
    )
    trainer = _trainer(tmp_path)
    trainer.validate(TrainingPlan(module), datamodule=dm)
    module.eval()
    z, y = [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            z.append(module(batch)["z_nk"])
            y.append(batch["y_n"])
    z_all, y_all = torch.cat(z)[:5_000], torch.cat(y)[:5_000]
    euclidean = float(silhouette(z_all, y_all, related, "euclidean"))
    cosine = float(silhouette(z_all, y_all, related, "cosine"))
    assert abs(euclidean - cosine) > 1e-3  # (the two differ here)
    assert float(trainer.callback_metrics["val/asw"]) == pytest.approx(euclidean, abs=1e-5)


def _saving_every(root, steps: int, callbacks: list, **kw) -> pl.Trainer:
    """A trainer (no sanity validation) that keeps a checkpoint every ``steps`` steps in
    ``root``, named by epoch and step."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=steps, save_top_k=-1)
    return _trainer(
        root,
        enable_checkpointing=True,
        callbacks=[ckpt, *callbacks],
        num_sanity_val_steps=0,
        **kw,
    )


class _OwnData(pl.LightningDataModule):
    """A data module of a user's own around a CellLoader: Lightning saves and restores the
    loader's position itself (in its fit loop's state)."""

    def __init__(self, dm: CellDataModule, num_workers: int = 0) -> None:
        super().__init__()
        self.dm, self.num_workers, self.loader = dm, num_workers, None

    def train_dataloader(self):
        from cellsift.data import CellLoader

        if self.loader is None:
            self.loader = CellLoader(self.dm._dataset(self.dm.train), num_workers=self.num_workers)
        return self.loader


class _Batches(pl.Callback):
    def __init__(self) -> None:
        self.cells: list[np.ndarray] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.cells.append(batch["obs_idx_n"].numpy().copy())


def test_a_loader_of_a_users_data_module_resumes_where_lightning_saved_it(synthetic_h5ad, tmp_path):
    """A CellLoader in a data module of the user's own, under a plan without a schedule
    (nothing builds the loader before Lightning restores its loops): the resumed run reads
    on from the checkpoint's batch; resumed with another number of loader workers, the run
    is refused with a ResumeError naming the fix (Lightning restores its count of the epoch
    before such a loader says how much of it is left)."""

    from cellsift.errors import ResumeError

    def run(root, workers=0, **fit):
        torch.manual_seed(0)
        dm, module = _setup(synthetic_h5ad, mode="block", seed=1)
        batches = _Batches()
        trainer = _saving_every(root, 3, [batches], max_epochs=1, limit_val_batches=0)
        data = _OwnData(dm, workers)
        trainer.fit(TrainingPlan(module, scheduler="none"), datamodule=data, **fit)
        return batches.cells

    whole = run(tmp_path / "whole")
    assert len(whole) > 4
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "whole" / "epoch=0-step=3.ckpt")
    assert len(resumed) == len(whole) - 3
    for x, y in zip(resumed, whole[3:], strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ResumeError, match="as many devices and workers as wrote it"):
        run(tmp_path / "other", 2, ckpt_path=tmp_path / "whole" / "epoch=0-step=3.ckpt")


class _RankZeroOf(CellDataModule):
    """A data module whose training loader reads as rank 0 of ``world`` processes (the
    share, and the saved state, of such a rank), in one process."""

    def __init__(self, *args, world: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.world = world

    def _dataset(self, coll, **overrides):
        if coll is self.train:
            overrides |= {"rank": 0, "world_size": self.world, "drop_last": self.world > 1}
        return super()._dataset(coll, **overrides)


class _Rates(pl.Callback):
    def __init__(self) -> None:
        self.lr: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


@pytest.mark.parametrize(("before", "after", "max_steps"), [(2, 1, -1), (2, 1, 20), (1, 2, 9)])
def test_a_run_resumed_on_other_ranks_goes_on_along_its_schedule(
    synthetic_h5ad, tmp_path, before, after, max_steps
):
    """A run of ``before`` ranks resumed on ``after`` goes on from the rate its checkpoint
    left (no jump, also where max_steps ends it: its steps now hold other numbers of cells)
    and falls step by step to 0 at its last step; resumed again from one of its own
    checkpoints on as many ranks, it goes on with its rates exactly (its checkpoints keep
    how its schedule goes on)."""

    def run(root, world, **fit):
        torch.manual_seed(0)
        dm = _RankZeroOf(
            synthetic_h5ad,
            world=world,
            split_key="donor_id",
            batch_size=128,
            block_size=16,
            fetch_factor=4,
            val_fraction=0.2,
            mode="block",
        )
        dm.setup()
        related = torch.from_numpy(load_cell_ontology().related(dm.categories["y_n"]))
        module = MetricModule(dm.collection.n_vars, (32,), 8, related_ll=related)
        rates = _Rates()
        trainer = _saving_every(root, 1, [rates], max_epochs=2, max_steps=max_steps)
        trainer.fit(TrainingPlan(module), datamodule=dm, **fit)
        return rates.lr, trainer.global_step

    whole, _ = run(tmp_path / "a", before)
    first, end = run(tmp_path / "b", after, ckpt_path=tmp_path / "a" / "epoch=0-step=3.ckpt")
    steps = sorted(first)
    assert steps[0] == 3 and steps[-1] == end - 1
    assert first[3] == whole[3]  # (the rate the checkpoint's run had there)
    rates = [whole[s] for s in range(3)] + [first[s] for s in steps]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == len(rates)
    assert rates[-1] < 0.05 * 5e-3  # (the schedule ends at this run's last step)
    if max_steps > 0:
        assert end == max_steps
    again, end_again = run(tmp_path / "c", after, ckpt_path=tmp_path / "b" / "epoch=0-step=6.ckpt")
    assert end_again == end
    assert again == {s: first[s] for s in steps if s >= 6}


def test_a_finished_run_given_more_epochs_takes_the_rates_of_the_longer_run(
    synthetic_h5ad, tmp_path
):
    """A run resumed with more epochs than it ran (README: ``--ckpt_path last`` with more
    ``max_epochs``) follows the schedule of its new length: from its first step on, the
    rates are those a run started with the new max_epochs takes at the same steps (the
    finished run's rate of 0 goes back up), and they fall to 0 at the new end."""

    def run(root, epochs, **fit):
        torch.manual_seed(0)
        dm, module = _setup(synthetic_h5ad, seed=1)
        rates = _Rates()
        trainer = _saving_every(root, 10**6, [rates], max_epochs=epochs)
        trainer.fit(TrainingPlan(module), datamodule=dm, **fit)
        trainer.save_checkpoint(root / "end.ckpt")
        return rates.lr, trainer.global_step

    whole, end = run(tmp_path / "a", 4)
    short, half = run(tmp_path / "b", 2)
    assert 2 * half == end
    assert short[half - 1] < 0.05 * 5e-3  # (the short run annealed to its end)
    on, end_on = run(tmp_path / "b", 4, ckpt_path=tmp_path / "b" / "end.ckpt")
    assert end_on == end
    assert sorted(on) == list(range(half, end))
    assert on == {s: whole[s] for s in range(half, end)}
    assert on[half] > 0.4 * 5e-3 and on[end - 1] < 0.05 * 5e-3


def test_the_cosine_rates_are_those_of_the_closed_form_bit_for_bit():
    """A run's rates, step by step, are 0.5 (1 + cos(pi t / T)) as runs of earlier versions
    computed them (a checkpoint of one resumes with exactly its rates)."""
    import math
    import types

    for steps in (20, 37, 500):
        plan = TrainingPlan(torch.nn.Linear(2, 2))
        plan._trainer = types.SimpleNamespace(
            estimated_stepping_batches=steps, gradient_clip_val=0, precision="32-true"
        )
        sched = plan.configure_optimizers()["lr_scheduler"]["scheduler"]
        factors = [sched.lr_lambdas[0](t) for t in range(steps + 2)]
        want = [0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps)) for t in range(steps + 2)]
        assert factors == want


def _splitmix64(idx: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser in numpy's uint64 (the reference for the plan's int64 one)."""
    x = idx.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (x ^ (x >> np.uint64(31))).view(np.int64)


def _sorted_by_type(tmp_path):
    """The synthetic atlas stored sorted by cell type, the most common first (as many
    atlases are sorted)."""
    import anndata as ad

    from cellsift.datasets import synthetic_atlas

    a = ad.read_h5ad(synthetic_atlas(3_000, 300, n_studies=4, path=tmp_path / "s.h5ad", seed=1))
    types = a.obs["cell_type"].astype(str)
    a = a[np.argsort(-types.map(types.value_counts()).to_numpy(), kind="stable")].copy()
    a.write_h5ad(tmp_path / "sorted.h5ad")
    return tmp_path / "sorted.h5ad"


def _known(path, labels: list[str] | None, **kw):
    """A data module split by donor whose model knows ``labels`` (None: the data's), and a
    small MetricModule for them."""
    dm = CellDataModule(
        path, split_key="donor_id", val_fraction=0.2, batch_size=64, labels=labels, **kw
    )
    dm.setup()
    related = torch.from_numpy(load_cell_ontology().related(dm.label_set))
    return dm, MetricModule(dm.collection.n_vars, (64, 64), 16, related_ll=related)


def test_validation_asw_is_of_a_sample_spread_over_the_validation_cells(tmp_path):
    """Data stored sorted by cell type: the first 150 validation cells by index are of one
    type, which the model does not know (unlabelled, y_n -1), and gave no val/asw. The
    silhouette is of the 150 labelled cells of the lowest hashes of their index: computed
    here by hand, with SplitMix64 in numpy's unsigned arithmetic."""
    import warnings

    from cellsift.train import silhouette

    torch.manual_seed(0)
    path = _sorted_by_type(tmp_path)
    everything = CellDataModule(path, split_key="donor_id", val_fraction=0.2).label_set
    with warnings.catch_warnings():  # (the CD4 T cells train unlabelled: said)
        warnings.simplefilter("ignore")
        dm, module = _known(path, [lab for lab in everything if lab != "CL:0000624"])
    trainer = _trainer(tmp_path)
    trainer.validate(TrainingPlan(module, asw_cells=150), datamodule=dm)
    module.eval()
    z, y, idx = [], [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            z.append(module(batch)["z_nk"])
            y.append(batch["y_n"])
            idx.append(batch["obs_idx_n"])
    z_all, y_all, i_all = torch.cat(z), torch.cat(y), torch.cat(idx).numpy()
    assert (y_all[np.argsort(i_all)][:150] == -1).all()  # (what the first cells are)
    labelled = (y_all >= 0).numpy()
    keys = _splitmix64(i_all[labelled])
    pick = np.argsort(keys)[:150]
    z_s, y_s = z_all[labelled][pick], y_all[labelled][pick]
    assert len(torch.unique(y_s)) >= 5  # spread over the types
    want = float(silhouette(z_s, y_s, module.triplet.related_ll))
    assert float(trainer.callback_metrics["val/asw"]) == pytest.approx(want, abs=1e-5)


def test_no_silhouette_of_one_type_is_said_and_refused_where_watched(tmp_path):
    """Validation cells of a common type and a rare one the model knows, two sampled: one
    type, no silhouette. A warning says why; with a callback watching val/asw, an error
    naming the fix at the first validation (Lightning named only the missing key)."""
    import warnings

    from lightning.pytorch.callbacks import EarlyStopping

    from cellsift._warnings import CellsiftWarning
    from cellsift.errors import ConfigError

    torch.manual_seed(0)
    with warnings.catch_warnings():  # (the other types train unlabelled: said)
        warnings.simplefilter("ignore")
        dm, module = _known(_sorted_by_type(tmp_path), ["CL:0000624", "CL:0000786"])
    watching = [EarlyStopping(monitor="val/asw", mode="max")]  # (which watch fits only)
    with pytest.warns(CellsiftWarning, match=r"no val/asw this validation: its 2 labelled cells"):
        trainer = _trainer(tmp_path, callbacks=watching)
        trainer.validate(TrainingPlan(module, asw_cells=2), datamodule=dm)
    # the sample is known before training where the whole validation set is read: said
    # then, not after the first epoch (review167)
    trainer = _trainer(
        tmp_path,
        max_epochs=1,
        num_sanity_val_steps=0,
        callbacks=[EarlyStopping(monitor="val/asw", mode="max")],
    )
    with pytest.raises(ConfigError, match=r"the 2 labelled validation cells its silhouette sa"):
        trainer.fit(TrainingPlan(module, asw_cells=2), datamodule=dm)
    assert trainer.global_step == 0
    # where part of it is (limit_val_batches: a share, or a number of batches, 1 too:
    # review168), at the validation that samples it
    for part in (0.5, 1):
        trainer = _trainer(
            tmp_path,
            max_epochs=1,
            limit_train_batches=1,
            limit_val_batches=part,
            num_sanity_val_steps=0,
            callbacks=[EarlyStopping(monitor="val/asw", mode="max")],
        )
        with pytest.raises(ConfigError, match=r"callbacks watch val/asw\. .*raise asw_cells"):
            trainer.fit(TrainingPlan(module, asw_cells=2), datamodule=dm)
        assert trainer.global_step == 1


def test_watched_silhouette_needs_types_the_model_knows(synthetic_h5ad, tmp_path):
    """A model's fixed labels of which the validation cells hold one (B cells): the others
    validate unlabelled, so there is no silhouette; refused before the first epoch."""
    import warnings

    from lightning.pytorch.callbacks import EarlyStopping

    from cellsift.errors import ConfigError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm, module = _known(synthetic_h5ad, ["CL:0000236", "CL:0000000"])
    trainer = _trainer(
        tmp_path, max_epochs=1, callbacks=[EarlyStopping(monitor="val/asw", mode="max")]
    )
    with pytest.raises(ConfigError, match=r"watch val/asw, but the validation cells hold 1 "):
        trainer.fit(TrainingPlan(module), datamodule=dm)


def test_a_cosine_schedule_needs_a_run_with_a_last_step(synthetic_h5ad, tmp_path):
    """max_epochs=-1 without max_steps (early stopping or max_time to end it): the cosine
    schedule has no length to anneal over; a ConfigError names the settings (it was an
    OverflowError of Lightning's infinite estimate, hunt175). A constant rate trains."""
    from cellsift.errors import ConfigError

    dm, module = _setup(synthetic_h5ad)
    with pytest.raises(ConfigError, match=r"no last step \(max_epochs=-1 and no max_steps"):
        _trainer(tmp_path, max_epochs=-1, max_time="00:00:00:30").fit(
            TrainingPlan(module), datamodule=dm
        )
    trainer = _trainer(tmp_path, max_epochs=-1, limit_train_batches=2, max_time="00:00:00:30")
    trainer.callbacks.append(_StopAfter(3))
    trainer.fit(TrainingPlan(module, scheduler="none"), datamodule=dm)
    assert trainer.global_step == 3


class _StopAfter(pl.Callback):
    """Stops the fit after ``steps`` optimiser steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def test_a_fit_removes_what_killed_checkpoint_writes_left_in_its_folder(
    synthetic_h5ad, tmp_path, caplog
):
    """A checkpoint write killed outright (SIGKILL, the out-of-memory killer) leaves its
    hidden temporary file, up to a whole checkpoint: the next fit with that folder removes
    it (a best-* name is never written again), but not one of a checkpoint whose lock
    another process holds (its write in progress), nor files of other names."""
    import logging
    import subprocess
    import sys

    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    killed = ckpts / ".best-epoch=3-step=120.ckpt.tmp-0123abcd"
    busy = ckpts / ".last.ckpt.tmp-89abcdef"
    other = ckpts / ".notes.txt.tmp-01234567"
    # written beside another process's lock: one whose writer was killed, one being written
    killed_beside = ckpts / ".best-epoch=4-step=150.ckpt.unlocked-0123abcd"
    writing_beside = ckpts / ".last.ckpt.unlocked-89abcdef"
    for path in (killed, busy, other, killed_beside, writing_beside):
        path.write_bytes(b"partial")
    # one opened by a writer not yet locked (empty until it is: review175, it was removed)
    opened_beside = ckpts / ".best-epoch=5-step=180.ckpt.unlocked-456789ab"
    opened_beside.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "for path in sys.argv[1:]:\n"
         "    fcntl.flock(os.open(path, os.O_RDWR | os.O_CREAT), fcntl.LOCK_EX)\n"
         "print('held', flush=True); time.sleep(60)",
         str(ckpts / ".last.ckpt.lock"), str(writing_beside)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        dm, module = _setup(synthetic_h5ad)
        keep = ModelCheckpoint(dirpath=ckpts, save_top_k=0)
        trainer = _trainer(
            tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[keep], limit_val_batches=0
        )
        with caplog.at_level(logging.WARNING, logger="cellsift"):
            trainer.fit(TrainingPlan(module, scheduler="none"), datamodule=dm)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert not killed.exists() and busy.exists() and other.exists()
    assert f"removing {killed.name}, left by a write that did not finish" in caplog.text
    assert not killed_beside.exists() and writing_beside.exists()  # (review174: both kept)
    assert opened_beside.exists()


def test_a_fit_into_another_running_fits_checkpoint_folder_is_refused(
    synthetic_h5ad, tmp_path, held_elsewhere
):
    """Two runs in one checkpoint folder overwrite each other's last.ckpt: a fit whose folder
    another fit holds (a process of its own, holding the lock as a fit does) is refused as
    it sets up, naming the folder and that process, with nothing written. A fit holds its
    folders until it ends or fails: then another process, or this one, fits there."""
    import subprocess
    import sys

    from lightning.pytorch.callbacks import ModelCheckpoint

    from cellsift.errors import OutputInUseError
    from cellsift.train.resume import FIT_LOCK

    ckpts = tmp_path / "ckpts"
    try_lock = (
        "import sys\n"
        "from pathlib import Path\n"
        "from cellsift._utils import output_lock\n"
        "with output_lock(Path(sys.argv[1]), 'cellsift fit'):\n"
        "    print('taken')\n"
    )

    def fit(fail_at=None, disk_full=False):
        class Fail(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == fail_at:
                    raise ValueError("a failing step")

            def on_exception(self, *args):  # (as a save on exception to a full disk)
                if disk_full:
                    raise OSError(28, "No space left on device")

        torch.manual_seed(0)
        dm, module = _setup(synthetic_h5ad)
        keep = ModelCheckpoint(dirpath=ckpts, save_last=True, save_top_k=0)
        trainer = _trainer(
            tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[Fail(), keep]
        )
        trainer.fit(TrainingPlan(module, scheduler="none"), datamodule=dm)
        return trainer

    with held_elsewhere(ckpts / FIT_LOCK) as holder:  # (another fit's lock, as a fit holds it)
        with pytest.raises(OutputInUseError) as err:
            fit()
        said = str(err.value)
        assert said.startswith(f"{ckpts.resolve()} is the checkpoint folder of another fit")
        assert f"(process {holder.pid})" in said and "a folder of its own" in said
        assert [p.name for p in ckpts.iterdir()] == [f".{FIT_LOCK}.lock"]
    trainer = fit()  # (that fit ended: its folder is free)
    assert (ckpts / "last.ckpt").exists() and trainer.global_step == 2

    def taken_by_another_process():
        done = subprocess.run(
            [sys.executable, "-c", try_lock, str(ckpts / FIT_LOCK)],
            capture_output=True,
            text=True,
        )
        return done.returncode == 0 and done.stdout.strip() == "taken"

    assert taken_by_another_process()  # (released as that fit ended)
    with pytest.raises(ValueError, match="a failing step"):
        fit(fail_at=1)
    assert taken_by_another_process()  # (released as it failed)
    # another callback's on_exception raised before the lock's release: this process's
    # next fit releases it (review178: it was refused, as "an earlier writer")
    with pytest.raises(OSError, match="No space left"):
        fit(fail_at=1, disk_full=True)
    assert fit().global_step == 2
    assert taken_by_another_process()
    assert not (ckpts / f".{FIT_LOCK}.lock").exists()


def test_a_checkpoint_folder_that_cannot_hold_a_lock_is_fitted_unlocked(
    synthetic_h5ad, tmp_path, monkeypatch, caplog
):
    """A lock file this user may not make (review178: every fit failed at setup with a
    bare PermissionError, a trial run's too): the fit goes on unlocked, logging so; one
    there that this user may not open is refused."""
    import logging

    from lightning.pytorch.callbacks import ModelCheckpoint

    from cellsift import _utils
    from cellsift.errors import OutputInUseError
    from cellsift.train.resume import FIT_LOCK

    open_lock = _utils._open_lock

    def refused(lock):  # (the folder's lock; a checkpoint's own lock is made)
        if lock.name != f".{FIT_LOCK}.lock":
            return open_lock(lock)
        raise PermissionError(13, "Permission denied", str(lock))

    monkeypatch.setattr(_utils, "_open_lock", refused)
    dm, module = _setup(synthetic_h5ad)
    keep = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, save_top_k=0)
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[keep])
    with caplog.at_level(logging.WARNING, logger="cellsift"):
        trainer.fit(TrainingPlan(module, scheduler="none"), datamodule=dm)
    assert trainer.global_step == 1 and (tmp_path / "ckpts" / "last.ckpt").exists()
    assert "ckpts: not locked against other fits ([Errno 13] Permission denied" in caplog.text
    # a lock file there that this user may not open is another user's fit's: refused, as
    # _open_lock says (review179: it was fitted unlocked)
    (tmp_path / "ckpts" / f".{FIT_LOCK}.lock").touch()
    dm, module = _setup(synthetic_h5ad)
    keep = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True, save_top_k=0)
    trainer = _trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[keep])
    with pytest.raises(OutputInUseError, match=r"ckpts holds another user's fit lock .* remove"):
        trainer.fit(TrainingPlan(module, scheduler="none"), datamodule=dm)


def test_a_run_resumed_under_the_time_it_has_spent_says_so(synthetic_h5ad, tmp_path):
    """Lightning counts max_time over the whole run, resumes included: a run resumed under
    the max_time that stopped it ends at once, and a warning says so (and how to train
    on); with more time it trains on, unwarned."""
    from datetime import timedelta

    from lightning.pytorch.callbacks import ModelCheckpoint, Timer

    def run(seconds, min_steps=None, max_steps=-1, **fit):
        torch.manual_seed(0)
        dm, module = _setup(synthetic_h5ad, mode="weighted", seed=1)
        keep = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        timer = Timer(duration=timedelta(seconds=seconds), interval="step")
        trainer = _trainer(
            tmp_path,
            max_epochs=-1,
            min_steps=min_steps,
            max_steps=max_steps,
            enable_checkpointing=True,
            callbacks=[keep, timer],
        )
        trainer.fit(TrainingPlan(module, scheduler="none"), datamodule=dm, **fit)
        return trainer

    first = run(2).global_step
    with pytest.warns(
        CellsiftWarning, match=r"has trained for 0:00:0\d of its max_time \(0:00:02\)"
    ):
        again = run(2, ckpt_path="last")
    assert again.global_step == first
    with warnings.catch_warnings():
        warnings.simplefilter("error", CellsiftWarning)
        # min_steps not met yet: Lightning trains on to them (review173: it warned)
        assert run(2, ckpt_path="last", min_steps=first + 2).global_step == first + 2
        # (time to spare however slow the steps were so far; two steps more)
        assert run(120, ckpt_path="last", max_steps=first + 4).global_step == first + 4


def test_a_second_fit_on_a_trainer_whose_time_is_spent_says_so(synthetic_h5ad, tmp_path):
    """A trainer fitted until its max_time, fitted again (min_epochs met by the first):
    the second fit ends at once, and the warning says the earlier fit spent the time
    (review175: it blamed a checkpoint, or said nothing with min_epochs)."""
    from datetime import timedelta

    from lightning.pytorch.callbacks import Timer

    dm, module = _setup(synthetic_h5ad, mode="weighted", seed=1)
    timer = Timer(duration=timedelta(microseconds=1), interval="epoch")
    trainer = _trainer(tmp_path, max_epochs=5, min_epochs=1, callbacks=[timer])
    plan = TrainingPlan(module, scheduler="none")
    trainer.fit(plan, datamodule=dm)
    steps = trainer.global_step
    with pytest.warns(CellsiftWarning, match=r"spent by an earlier fit on this trainer"):
        trainer.fit(plan, datamodule=dm)
    assert trainer.global_step == steps


def test_a_resume_from_an_epochs_end_under_spent_time_counts_epochs_as_min_epochs_does(
    synthetic_h5ad, tmp_path
):
    """A checkpoint written as an epoch ended holds that epoch's number ("epoch" 0 after
    the first), but min_epochs counts it done: resumed under a spent max_time with
    min_epochs=1, the run ends at once, and says so (review174: it said nothing)."""
    from datetime import timedelta

    from lightning.pytorch.callbacks import ModelCheckpoint, Timer

    def run(epochs, min_epochs=None, **fit):
        torch.manual_seed(0)
        dm, module = _setup(synthetic_h5ad, mode="weighted", seed=1)
        each = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
        timer = Timer(duration=timedelta(microseconds=1), interval="epoch")
        trainer = _trainer(
            tmp_path,
            max_epochs=epochs,
            min_epochs=min_epochs,
            enable_checkpointing=True,
            callbacks=[each, timer],
        )
        trainer.fit(TrainingPlan(module, scheduler="none"), datamodule=dm, **fit)
        return trainer

    first = run(5)
    assert first.current_epoch == 1 and (tmp_path / "epoch=0.ckpt").exists()  # (after one)
    with pytest.warns(CellsiftWarning, match=r"ends at once"):
        again = run(5, min_epochs=1, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert again.global_step == first.global_step


def test_only_early_stopping_is_kept_as_a_stop(synthetic_h5ad, tmp_path):
    """A run stopped by its time (Lightning's Timer: max_time) or a callback of the user's
    goes on when resumed (review166: the first version kept every stop). The stop of an
    early-stopped checkpoint is for the fit resumed from it: a validation from it, then a
    fit of the same plan without it, trains (review166: it ended at once)."""
    from datetime import timedelta

    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, Timer

    def run(root, stop, epochs=2, **fit):
        torch.manual_seed(0)
        dm, module = _setup(synthetic_h5ad, mode="weighted", seed=1)
        keep = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
        trainer = _trainer(
            root,
            max_epochs=epochs,
            enable_checkpointing=True,
            callbacks=[keep, *stop],
            num_sanity_val_steps=0,
        )
        trainer.fit(TrainingPlan(module, scheduler="none"), datamodule=dm, **fit)
        return trainer

    whole = run(tmp_path / "whole", [])
    first = run(tmp_path / "timer", [Timer(duration=timedelta(microseconds=1), interval="epoch")])
    assert first.global_step == whole.global_step // 2  # (after the first epoch)
    assert run(tmp_path / "timer", [], ckpt_path="last").global_step == whole.global_step
    first = run(tmp_path / "user", [_StopAfter(1)])
    assert first.global_step == 1  # (Lightning ends that epoch there: the resumed run
    assert run(tmp_path / "user", [], ckpt_path="last").global_step > 1  # trains the next)
    # an early-stopped run's last checkpoint: validated from, then a new fit of the plan
    root = tmp_path / "early"
    early = [EarlyStopping(monitor="val/asw", mode="max", patience=0, min_delta=1.0)]
    first = run(root, early, epochs=30)
    assert first.current_epoch < 5
    torch.manual_seed(0)
    dm, module = _setup(synthetic_h5ad, mode="weighted", seed=1)
    plan = TrainingPlan(module, scheduler="none")
    trainer = _trainer(root)
    trainer.validate(plan, datamodule=dm, ckpt_path=str(root / "last.ckpt"))
    trainer = _trainer(root, max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(plan, datamodule=dm)
    assert trainer.global_step == whole.global_step // 2


def test_watching_the_silhouette_without_labels_is_refused_where_it_would_fail(
    synthetic_h5ad, tmp_path
):
    """Unlabelled data log no silhouette: a fit whose callback must have val/asw is refused
    before training; an EarlyStopping told to go on without it (strict=False), and a
    validation (callbacks watch fits only), run (review198: both were refused)."""
    from lightning.pytorch.callbacks import EarlyStopping

    dm = CellDataModule(
        synthetic_h5ad, label_key=None, split_key="donor_id", val_fraction=0.2, mode="block"
    )
    dm.setup()
    module = MetricModule(dm.collection.n_vars, (16,), 8)
    strict = _trainer(tmp_path, max_epochs=1, callbacks=[EarlyStopping("val/asw", mode="max")])
    with pytest.raises(ConfigError, match="callbacks watch val/asw, but the data module reads no"):
        strict.fit(TrainingPlan(module), datamodule=dm)
    assert strict.global_step == 0
    lenient = EarlyStopping("val/asw", mode="max", strict=False)
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[lenient])
    trainer.fit(TrainingPlan(module), datamodule=dm)
    assert trainer.global_step > 0 and "val/loss" in trainer.callback_metrics
    checked = _trainer(tmp_path, callbacks=[EarlyStopping("val/asw", mode="max")])
    checked.validate(TrainingPlan(module), datamodule=dm, verbose=False)
    assert "val/loss" in checked.callback_metrics
    # the model's metrics this run cannot log are refused (a label head's loss without
    # one, the triplet loss without labels; hunt253), but not where a callback goes on
    # without them (strict=False); a name a callback of the user's logs is warned of and
    # watched (review225: refused)
    for name in ("val/label_loss", "val/triplet_loss", "val/LOSS"):
        refused = _trainer(tmp_path, max_epochs=1, callbacks=[EarlyStopping(name)])
        with pytest.raises(ConfigError, match=rf"watch {name}, which this run does not log"):
            refused.fit(TrainingPlan(module), datamodule=dm)
        assert refused.global_step == 0

    class Logs(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            pl_module.log("val/knn_acc", 0.5)

    own = [
        Logs(),
        EarlyStopping("val/knn_acc", mode="max"),
        EarlyStopping("val/label_loss", strict=False),
    ]
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=own)
    with pytest.warns(CellsiftWarning, match=r"watch val/knn_acc, which the model does not log"):
        trainer.fit(TrainingPlan(module), datamodule=dm)
    assert trainer.global_step > 0 and trainer.callback_metrics["val/knn_acc"] == 0.5


def test_a_checkpoint_whose_pickle_is_damaged_is_named_whatever_its_bytes_became(tmp_path):
    """Bytes overwritten inside an intact checkpoint's pickled part: reading it either
    gives the training state or the one-line DataError naming the file, wherever the
    damage lies (hunt263: text that is no UTF-8 was torch's UnicodeDecodeError). A file
    of torch's format before 1.6 is read; one of objects a safe read refuses, or none,
    is said so (review231: "corrupt", with the terminal codes of torch's message)."""
    import pathlib
    import struct
    import zipfile

    from cellsift.errors import DataError
    from cellsift.train.resume import read_checkpoint

    state = {
        "state_dict": {"encoder.weight": torch.ones(3, 2)},
        "epoch": 2,
        "global_step": 14,
        "hyper_parameters": {"lr": 0.005, "scheduler": "cosine", "hidden": [16, 8]},
        "loops": {"fit_loop": {"state_dict": {"name": "épochs"}}},
    }
    path = tmp_path / "whole.ckpt"
    torch.save(state, path)
    raw = path.read_bytes()
    entry = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("data.pkl"))
    # (the data follow the local header, whose name and extra field lengths are its own)
    name_length, extra_length = struct.unpack(
        "<HH", raw[entry.header_offset + 26 : entry.header_offset + 30]
    )
    start = entry.header_offset + 30 + name_length + extra_length
    assert raw[start : start + 1] == b"\x80"  # (a pickle's PROTO opcode)
    named = 0
    for offset in range(0, entry.compress_size - 1, 2):
        damaged = bytearray(raw)
        damaged[start + offset : start + offset + 2] = b"\xff\xfe"
        (tmp_path / "damaged.ckpt").write_bytes(bytes(damaged))
        try:
            read_checkpoint(tmp_path / "damaged.ckpt")
        except DataError as err:
            assert "damaged.ckpt cannot be read as a checkpoint" in str(err), offset
            named += 1
    assert named > 0
    torch.save(state, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    assert read_checkpoint(tmp_path / "legacy.ckpt")["global_step"] == 14
    torch.save({**state, "hyper_parameters": {"root": pathlib.Path("/x")}}, tmp_path / "o.ckpt")
    with pytest.raises(
        DataError, match=r"o\.ckpt holds objects .*\(a pathlib\.\w*Path\): not a"
    ) as err:
        read_checkpoint(tmp_path / "o.ckpt")
    assert "\x1b" not in str(err.value)
    with pytest.raises(DataError, match=r"none\.ckpt does not exist: there is no checkpoint there"):
        read_checkpoint(tmp_path / "none.ckpt")
    # an old-format file cut short: cut short, not of other objects (review232)
    legacy = (tmp_path / "legacy.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(legacy[: len(legacy) // 2])
    with pytest.raises(DataError, match=r"cut\.ckpt cannot be read as a checkpoint"):
        read_checkpoint(tmp_path / "cut.ckpt")
    # torch's own objects (a module among the settings) are objects, not damage (review233)
    torch.save({**state, "hyper_parameters": {"m": torch.nn.Linear(2, 2)}}, tmp_path / "m.ckpt")
    with pytest.raises(
        DataError, match=r"m\.ckpt holds objects .*\(a torch\.nn\.modules\.linear\.Linear\)"
    ):
        read_checkpoint(tmp_path / "m.ckpt")
    # a module the file names is not imported to tell (review234: importing it ran its code)
    import sys

    (tmp_path / "marking_module.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('imported').touch()\nclass Thing:\n    pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import marking_module  # type: ignore[import-not-found]

        torch.save(
            {**state, "hyper_parameters": {"t": marking_module.Thing()}}, tmp_path / "t.ckpt"
        )
    finally:
        sys.modules.pop("marking_module", None)
    (tmp_path / "imported").unlink()
    try:
        with pytest.raises(DataError, match=r"t\.ckpt holds objects .*\(a marking_module\.Thing\)"):
            read_checkpoint(tmp_path / "t.ckpt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("marking_module", None)
    assert not (tmp_path / "imported").exists()
    from cellsift.train.resume import _names_something

    assert not _names_something("nump") and not _names_something(".X")  # (review235)
