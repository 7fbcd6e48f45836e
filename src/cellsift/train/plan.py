"""One Lightning training plan for every cellsift module.

Modules are plain ``nn.Module``s whose ``forward(batch)`` returns a dict with ``loss`` (and
any other scalars, which are logged, and ``z_nk`` embeddings, which feed the validation
silhouette). The plan owns the optimiser (AdamW), the learning-rate schedule (cosine over the
run), logging (losses, cells/s, learning rate), the stop on a non-finite loss, the stop on
SIGTERM or Ctrl-C at the end of a step with the run's state saved (:mod:`._stop`) and, at the
end of fit, the best weights by the metric a checkpoint callback monitors.

Under DDP the logged epoch values, training's and validation's, are cell-weighted means over
every rank's batches (summed by the plan, not by Lightning's reduction), cells/s counts every
rank's cells, and the validation silhouette is computed on every rank's validation cells,
gathered: the values that checkpoints and early stopping read are the same on every rank
and do not depend on the number of ranks (but for a loss of cells within a batch, as the
triplet loss: the batches differ with the ranks).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import shlex
import signal
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from .._utils import is_whole, state_differences
from .._warnings import CellsiftWarning, warn
from ..data.datamodule import CellDataModule
from ..errors import ConfigError, ResumeError, TrainingError, TrainingInterrupted
from ..losses.triplet import Distance
from ._stop import StopRequest
from .metrics import silhouette
from .resume import (
    clear_checkpoint_leftovers,
    hold_checkpoint_folders,
    read_checkpoint,
    write_checkpoints_atomically,
)

__all__ = ["TrainingPlan"]


def _rng_state() -> dict[str, Any]:
    """The random states that training draws from: torch (CPU and CUDA), numpy, Python."""
    import random

    import numpy as np

    # the global legacy generator: what libraries and user code draw from
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # noqa: NPY002
    assert isinstance(keys, np.ndarray)
    state: dict[str, Any] = {  # tensors and plain values: loadable with weights_only
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` outside DDP)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _over_ranks(sums: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """(sum, weight) per key, added over every rank's ``sums``."""
    out: dict[str, tuple[float, float]] = {}
    for rank in _gather_objects(sums):
        for key, (total, weight) in rank.items():
            had = out.get(key, (0.0, 0.0))
            out[key] = (had[0] + total, had[1] + weight)
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class TrainingPlan(pl.LightningModule):
    """Trains ``module`` (see the module docstring).

    Parameters
    ----------
    module
        The ``nn.Module`` to train.
    lr, weight_decay
        AdamW settings (SCimilarity: 5e-3, 0.01).
    scheduler
        ``"cosine"`` (annealed to 0 over the run's steps) or ``"none"``.
    asw_cells
        Labelled validation cells the silhouette (``val/asw``) is taken over: a sample
        spread over the validation set (the cells of the lowest hashes of their index,
        ``obs_idx_n``), the same cells every epoch and on any number of ranks (batches
        without ``obs_idx_n``: the first to arrive). Unlabelled cells (``y_n`` -1) are not
        counted.
    compile
        ``torch.compile`` the module's dense parts (its ``encoder`` and ``decoder``, or the
        whole module when it has neither); state-dict keys do not change.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        lr: float = 5e-3,
        weight_decay: float = 0.01,
        scheduler: Literal["cosine", "none"] = "cosine",
        asw_cells: int = 5_000,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not lr > 0 or not weight_decay >= 0:
            raise ConfigError(
                f"lr must be > 0 and weight_decay >= 0, not {lr:g} and {weight_decay:g}."
            )
        if not is_whole(asw_cells, least=2):
            raise ConfigError(
                f"asw_cells must be a whole number of at least 2 (a silhouette compares "
                f"cells), not {asw_cells!r}."
            )
        if scheduler not in ("cosine", "none"):
            raise ConfigError(
                f"scheduler is 'cosine' (annealed to 0 over the run) or 'none' (a constant "
                f"rate), not {scheduler!r}."
            )
        self.module = module
        if compile:
            parts = [getattr(module, n) for n in ("encoder", "decoder") if hasattr(module, n)]
            for part in parts or [module]:
                part.compile()
        self.lr, self.weight_decay, self.scheduler, self.asw_cells = (
            lr,
            weight_decay,
            scheduler,
            asw_cells,
        )
        self._val_z: list[torch.Tensor] = []
        self._val_y: list[torch.Tensor] = []
        self._val_i: list[torch.Tensor | None] = []
        self._batches_begun = 0  # (training batches this fit began: its logs hold something)
        #: when the last training step began, and its batch's cells
        self._tick: tuple[float, int] | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._stopped: dict[str, Any] | None = None  # (a resumed checkpoint's stop, if any)
        # the epoch and step a fit resumes from (its checkpoint's), until the fit starts
        self._resumed_at: tuple[int, int] | None = None
        # a resumed checkpoint's optimiser settings, compared once the trainer has built this
        # run's optimisers (on_fit_start: LightningCLI's --optimizer may replace the plan's)
        self._saved_optimization: dict[str, Any] | None = None
        self._own_schedule: Any = None  # (configure_optimizers' cosine, told from others)
        # its length in steps; for a run resumed on another number of devices, what its
        # steps are as this run counts them (the steps it would have made to there, less
        # those made), and (that step, as counted so, the schedule's position there)
        self._span: dict[str, Any] = {"steps": 1, "offset": 0, "from": None}
        # the checkpoint a run resumes from, until its loops' state is read (on_fit_start)
        self._resumed_from: dict[str, Any] | None = None
        self._rng_before_validation: dict[str, Any] | None = None  # (kept out of training's)
        #: This rank's (cell-weighted sum, cells) of each training scalar in this epoch
        self._epoch_sums: dict[str, tuple[float, float]] = {}
        #: This rank's (cell-weighted sum, cells) of each validation scalar in this epoch
        self._val_sums: dict[str, tuple[float, float]] = {}
        #: What the run is (a digest of the model's genes, its labels, its settings), set by
        #: whoever knows (MetricModel.train, MetricPlan): checkpoints keep it, and a run
        #: resumed on other data or with other settings of the same shapes is refused.
        self.run_identity: dict[str, Any] | None = None
        self.final_weights = "the last epoch's weights"
        self._stop = StopRequest()

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.module(batch)

    def _log_scalars(self, out: dict[str, Any], prefix: str, n: int) -> None:
        """Losses and counts of ``out``: training, per step (this rank's) and per epoch (the
        mean over every rank's batches, :meth:`on_train_epoch_end`); validation, per epoch
        (the mean over every rank's batches, :meth:`on_validation_epoch_end`: Lightning's
        own reduction over gloo ranks divides their summed batch sizes as integers)."""
        for key, value in out.items():
            if key.endswith("loss") or key.startswith("n_"):
                scalar = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
                if prefix == "train":
                    self.log(
                        f"{prefix}/{key}_step",
                        scalar,
                        batch_size=n,
                        prog_bar=key == "loss",
                        on_step=True,
                        on_epoch=False,
                    )
                sums = self._epoch_sums if prefix == "train" else self._val_sums
                total, weight = sums.get(key, (0.0, 0.0))
                sums[key] = (total + scalar * n, weight + n)

    def on_train_epoch_end(self) -> None:
        """``train/<scalar>_epoch``: the cell-weighted mean over the epoch's batches on every
        rank. The sums are the plan's own, kept in checkpoints, so that an epoch resumed
        from a mid-epoch checkpoint logs the mean over all of its batches, not only those
        after the checkpoint (Lightning keeps no logged values in a checkpoint)."""
        for key, (total, weight) in _over_ranks(self._epoch_sums).items():
            if weight > 0:  # the same value on every rank; synced so that Lightning knows it
                mean = total / weight
                self.log(f"train/{key}_epoch", mean, on_step=False, on_epoch=True, sync_dist=True)
        self._epoch_sums = {}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.module(batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the loss is {float(loss.detach())} at step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {batch_idx}); training stops. Lower the learning "
                "rate, or check the data for values that are not counts."
            )
        n = int(batch["x_ng"].shape[0])
        self._log_scalars(out, "train", n)
        if self.trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return loss

    def setup(self, stage: str) -> None:
        self._batches_begun = 0
        write_checkpoints_atomically(self.trainer)
        if stage == "fit":
            hold_checkpoint_folders(self.trainer)  # (another fit's folder: refused)
            clear_checkpoint_leftovers(self.trainer)
        _check_steps(self.trainer)
        _check_watched(self.trainer, self.asw_cells)
        if getattr(self.trainer, "fast_dev_run", False):
            # a trial run: Lightning keeps its last.ckpt regardless (over a real run's), which
            # ckpt_path="last" would then resume the real run from. This run's callbacks
            # become copies that keep none; the caller's own are left as they are
            callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
            for i, cb in enumerate(callbacks):
                if isinstance(cb, ModelCheckpoint) and cb.save_last:
                    callbacks[i] = copy.copy(cb)
                    callbacks[i].save_last = False
        if stage == "fit":
            _check_negatives(self.trainer, self.module)
        precision = str(self.trainer.precision)
        if precision.endswith("-true") and precision != "32-true":
            raise ConfigError(
                f"precision {precision!r} casts the weights themselves, but batches arrive as "
                "float32 counts (sparse in the first layer): use '32-true', or 'bf16-mixed' "
                "(or '16-mixed' on a GPU) for lower precision."
            )
        if precision == "bf16-mixed" and self.trainer.strategy.root_device.type == "cpu":
            _check_cpu_bfloat16()

    def on_fit_start(self) -> None:
        # Lightning sets no mode at the start of training (validation restores the one it
        # found): a module left in eval mode by embedding, loading or an earlier fit would
        # train without dropout and with frozen BatchNorm statistics
        self.train()
        resumed_at, self._resumed_at = self._resumed_at, None
        # (not resumed: the trainer's own counts, an earlier fit's on a trainer fitted before)
        done = getattr(self.trainer.fit_loop.epoch_progress.current, "processed", 0)
        at = resumed_at or (int(done), int(self.trainer.global_step))
        _say_time_spent(self.trainer, *at, resumed=resumed_at is not None)
        self._check_optimization()  # (a resumed run's optimisers exist, their state not yet)
        self._count_on_a_replanned_epoch()

    def _check_optimization(self) -> None:
        """Refuse to resume a checkpoint whose optimiser or schedule settings are not this
        run's (on_load_checkpoint keeps them): its state would override this run's."""
        saved, self._saved_optimization = self._saved_optimization, None
        if saved is None:
            return
        here = self._optimization()
        if "optimizer" not in saved:  # (a checkpoint of an older version: the plan's three)
            here = {k: v for k, v in here.items() if k in ("lr", "weight_decay", "scheduler")}
        if saved.get("optimizer") != here.get("optimizer"):  # (another class: its name says)
            saved, here = (
                {k: v for k, v in d.items() if k.startswith(_CLASSES)} for d in (saved, here)
            )
        if saved.get("scheduler") != here.get("scheduler"):
            saved, here = (
                {k: v for k, v in d.items() if not k.startswith("scheduler.")}
                for d in (saved, here)
            )
        # a setting one side lacks is one its torch version lacks (a default added since),
        # not one changed: compared where both hold it
        both = saved.keys() & here.keys()
        saved, here = ({k: v for k, v in d.items() if k in both} for d in (saved, here))
        changed = _changed_settings({"optimization": saved}, {"optimization": here})
        if changed:
            raise ResumeError(
                f"the checkpoint was trained with other optimiser settings ({'; '.join(changed)})"
                ": a resumed run goes on with the optimiser and schedule state it saved. "
                "Resume with those, or start a new run (or fine-tune the saved model bundle)."
            )

    def on_train_epoch_start(self) -> None:
        self._tick = None
        self._epoch_sums = {}  # (not called when a run resumes mid-epoch: on_load_checkpoint)

    def on_train_start(self) -> None:
        if getattr(self.trainer.train_dataloader, "recounted", None) is not None:
            raise ResumeError(
                "the checkpoint was written on another number of devices (or loader workers), "
                "and this run's training loader was made after Lightning restored its count "
                "of the epoch's batches, which then does not fit the rest of the epoch (a "
                "data module other than CellDataModule, or a strategy that restores "
                f"checkpoints after setting up, here {type(self.trainer.strategy).__name__}): "
                "resume on as many devices and workers as wrote it."
            )
        # the rates of this run's schedule at the step it starts from: a run resumed with more
        # epochs than it was started with would otherwise take its first step at the rate
        # the checkpoint's optimizer holds, that of the old schedule (the same value when
        # the length did not change)
        sched = self.lr_schedulers()
        if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            for group, base, factor in zip(
                sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True
            ):
                group["lr"] = base * factor(sched.last_epoch)
        # SIGTERM / SIGINT from here on: the run stops at the end of the step, its state saved
        # (cellsift.train._stop; Lightning restores the handlers it found when fit ends)
        self._stop = StopRequest()
        self._stop.install()
        self._stepped_at = self.trainer.global_step
        stopped, self._stopped = self._stopped, None  # (read once: a later fit's own)
        if stopped is not None and stopped["ckpt"] == str(self.trainer.ckpt_path):
            where = f"epoch {stopped['epoch']}, step {stopped['step']}"
            rank_zero_warn(
                f"the checkpoint was written as early stopping stopped its run ({where}): "
                "this run stops there too, as that one did (where min_epochs / min_steps let "
                "it). To train on, train the model it made anew (a new run from its weights).",
                category=CellsiftWarning,
            )
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        self._stop.restore()

    def _count_on_a_replanned_epoch(self) -> None:
        """A run resumed on another number of devices (or loader workers) than its checkpoint
        was written with: its loader plans the rest of the epoch anew, as batches of this
        run (``CellLoader.recounted``: how many of the epoch's batches that makes done).
        Lightning's count of the epoch's batches, in the loop state it is about to restore,
        is set to that (it ends the epoch, and validates, by its count; where nothing of the
        epoch is left here, it validates and ends it as after its last batch), and the
        cosine schedule goes on from the rate the checkpoint left to 0 at this run's last
        step (its steps hold another number of cells than the saved run's:
        :meth:`_go_on_with_schedule`). A resume on as many devices and workers goes on with
        the saved counts, and with the schedule as its checkpoint says it went on."""
        checkpoint, self._resumed_from = self._resumed_from, None
        trainer = self.trainer
        if checkpoint is None:
            return
        saved = checkpoint.get("cellsift_schedule")  # (None: of an older version)
        if isinstance(saved, dict) and (saved.get("offset") or saved.get("from")):
            # (a run resumed on other devices before: its schedule as it went on)
            self._go_on_with_schedule(saved["offset"], saved.get("from"))
        if trainer.train_dataloader is None:  # (as the cosine schedule's length reads it)
            if not isinstance(getattr(trainer, "datamodule", None), CellDataModule):
                # (other loaders are made after the loops restore, where Lightning gives
                # them the state it saved of them)
                return
            trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
        here = getattr(loader, "recounted", None)
        if here is None:
            return
        loader.recounted = None  # type: ignore[union-attr]
        length = int(trainer.num_training_batches)  # (finite: a CellLoader has a length)
        _recount_the_epoch(checkpoint, here, length)
        acc = trainer.accumulate_grad_batches
        per_epoch = math.ceil(length / acc)
        epoch = int(checkpoint.get("epoch", 0))
        done = epoch * per_epoch + (per_epoch if here >= length else here // acc)
        step = int(checkpoint.get("global_step", 0))
        # the schedule goes on from its position at the checkpoint (that of the run which
        # wrote it; an older checkpoint's: where this run's count puts it)
        at = _angle(saved, step) / math.pi if isinstance(saved, dict) and "steps" in saved else None
        self._go_on_with_schedule(done - step, None if at is None else (done, at))

    def _go_on_with_schedule(self, offset: int, start: Any) -> None:
        """The cosine schedule of a run resumed on another number of devices: its steps
        counted as this run counts them (``offset``: the steps it would have made to the
        checkpoint, less those made) and, where ``start`` (that count, the schedule's
        position there) is given, going on from that position, evenly, to its end at this
        run's last step: the rate neither jumps at the resume nor ends above 0. Its last step
        is that of this run's epochs, or ``max_steps`` (a count of steps made) before."""
        trainer, span = self.trainer, self._span
        if self._own_schedule is None:
            return
        epochs, length = trainer.max_epochs, trainer.num_training_batches
        whole = None  # (the steps of the run's epochs, as this run counts them)
        if epochs is not None and epochs >= 0 and math.isfinite(length):
            whole = math.ceil(length / trainer.accumulate_grad_batches) * max(epochs, 1)
        ends = trainer.max_steps + offset if trainer.max_steps >= 0 else None
        bounds = [x for x in (whole, ends) if x is not None]
        span["steps"] = max(min(bounds), 1) if bounds else span["steps"]
        span["offset"] = offset
        span["from"] = None if start is None else (int(start[0]), float(start[1]))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # every rank asks every step (one small all-reduce under DDP), so that a signal that
        # reached any rank stops every rank after the same step; the checkpoint is the one a
        # ModelCheckpoint would write here, which resumes exactly. Only after a batch that
        # stepped the optimiser: a batch of an unfinished accumulation (accumulate_grad_batches)
        # holds gradients that no checkpoint keeps
        if self.trainer.global_step == self._stepped_at:
            return
        self._stepped_at = self.trainer.global_step
        if 0 <= self.trainer.max_steps <= self.trainer.global_step:
            # the run ends at this step. Lightning validates at an epoch's end or where
            # should_stop asks, so a max_steps that ends an epoch early still validates the
            # weights it ends with (what EarlyStopping and a monitored checkpoint read)
            self.trainer.should_stop = True
        signum = self._stop.signum
        if not self.trainer.strategy.reduce_boolean_decision(signum is not None, all=False):
            return
        path = self._stop_checkpoint()
        self.trainer.save_checkpoint(path, weights_only=False)
        # this step's scalars go to the loggers as they would after this hook (the resumed
        # run logs from the next step on); Lightning has no public call for it
        connector = self.trainer._logger_connector
        connector.on_batch_end()
        connector.update_train_step_metrics()
        step = self.trainer.global_step
        name = "a signal to another rank" if signum is None else signal.Signals(signum).name
        found_as_last = any(
            isinstance(cb, ModelCheckpoint) and cb.dirpath
            for cb in self.trainer.checkpoint_callbacks
        )
        how = (
            "resume with ckpt_path='last' or that path (cellsift fit: --ckpt_path last)"
            if found_as_last  # (without a ModelCheckpoint, "last" names no file)
            else f"resume with ckpt_path={path!r} (cellsift fit: --ckpt_path {shlex.quote(path)})"
        )
        raise TrainingInterrupted(
            f"training stopped on {name} after step {step} (epoch {self.current_epoch}); "
            f"its state is saved in {path}: {how}, and it goes on as if never stopped.",
            checkpoint=path,
            step=step,
            signal=signum,
        )

    def _stop_checkpoint(self) -> str:
        """Where a stopped run saves its state: the ``last`` checkpoint of the run's
        ``ModelCheckpoint`` that keeps one (else of the first), which ``ckpt_path="last"``
        finds; without a ModelCheckpoint, ``last.ckpt`` in the trainer's root directory."""
        callbacks = [
            cb for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
        ]
        keeper = next((cb for cb in callbacks if cb.save_last and cb.dirpath), None)
        keeper = keeper or next((cb for cb in callbacks if cb.dirpath), None)
        if keeper is None:
            return os.path.join(self.trainer.default_root_dir, "last.ckpt")
        name = f"{keeper.CHECKPOINT_NAME_LAST}{keeper.FILE_EXTENSION}"
        return os.path.join(str(keeper.dirpath), name)

    def on_fit_end(self) -> None:
        """The best weights by the metric that a checkpoint callback monitors (e.g.
        ``val/asw``), where one kept them: the module ends with those, not the last epoch's
        (early stopping runs past the best). ``final_weights`` says which it holds. A fit
        in which no step ran (max_epochs 0, limit_train_batches 0) is an error: its weights
        are the initial ones."""
        if self.trainer.global_step == 0:
            raise TrainingError(
                "no training step ran (max_epochs, max_steps or limit_train_batches is 0, "
                "max_time was spent (a warning says so), or no training batch was made: a "
                "batch takes at least 2 cells): the model holds "
                "its initial weights (cellsift fit writes no bundle of them). Train for at "
                "least one step."
            )
        self._save_where_it_ended()
        best = next(
            (
                cb
                for cb in self.trainer.checkpoint_callbacks
                if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path
            ),
            None,
        )
        self.final_weights = "the last epoch's weights"
        if best is not None and Path(best.best_model_path).is_file():
            ckpt = read_checkpoint(  # (the optimiser state is never read)
                best.best_model_path,
                "It held the run's best weights: check the disk of the checkpoint directory "
                "(its last.ckpt, if any, holds the last weights).",
            )
            self.load_state_dict(ckpt["state_dict"])
            score = best.best_model_score
            value = f"{float(score):.4g} " if score is not None else ""
            self.final_weights = (
                f"the best weights by {best.monitor}, {value}at epoch {ckpt['epoch']}"
            )

    def _save_where_it_ended(self) -> None:
        """The ``last`` checkpoint of each ``ModelCheckpoint`` that keeps one as a file,
        written again where the fit ran its epochs out (max_epochs), before the best weights
        are loaded: ``ckpt_path="last"`` with more epochs goes on from there. Lightning
        writes it only where the callback saves: one saving every n steps leaves it up to
        n - 1 steps behind, and one whose save falls on an epoch's last step holds the state
        from before that epoch's validation and end, which a resumed run would do again (a
        second best checkpoint, ``-v1``, beside the first). A fit stopped before its epochs
        ran out (early stopping, max_steps) keeps its last as it is: Lightning keeps no stop
        in a checkpoint, so a resumed run would train on past the stop; from the last save
        it replays to the stop and stops again (one saved after the stop keeps it,
        ``cellsift_stopped``: the run resumed from it ends at once)."""
        trainer = self.trainer
        if getattr(trainer, "fast_dev_run", False) or trainer.should_stop:
            return  # (fast_dev_run: setup leaves it no last to keep)
        epochs = trainer.max_epochs
        if epochs is None or epochs < 0 or trainer.current_epoch < epochs:
            return  # (no limit of epochs, or not reached: stopped otherwise)
        written: set[str] = set()
        for cb in trainer.checkpoint_callbacks:
            if not (isinstance(cb, ModelCheckpoint) and cb.save_last is True and cb.dirpath):
                continue  # (save_last "link": a link to a saved one, as Lightning keeps it)
            path = cb.last_model_path or os.path.join(
                str(cb.dirpath), f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
            )
            if path not in written:  # (callbacks that share a folder share their last)
                cb.last_model_path = path  # (before: it is part of the callback's state)
                trainer.save_checkpoint(path, weights_only=cb.save_weights_only)
                written.add(path)

    # -- random state: a resumed run draws what the uninterrupted run would have drawn --------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # every rank builds the checkpoint (rank 0 writes it); each rank draws its own stream.
        # Written as a validation ends (ModelCheckpoint's on_validation_end runs before the
        # plan's): training's stream as it was before the validation drew from it
        # (a run resumed and saved before its first batch: the stream it restored, not yet set)
        rng = self._rng_before_validation or self._rng_to_restore
        checkpoint["cellsift_rng"] = {"per_rank": _gather_objects(rng or _rng_state())}
        checkpoint["cellsift_epoch_sums"] = _over_ranks(self._epoch_sums)  # (every rank's)
        if self.run_identity is not None:
            checkpoint["cellsift_data"] = self.run_identity
        checkpoint["cellsift_optimization"] = self._optimization()
        if self._own_schedule is not None:  # (where a run on other devices goes on from)
            span = self._span
            checkpoint["cellsift_schedule"] = {
                "steps": span["steps"],
                "offset": span["offset"],
                "from": None if span["from"] is None else list(span["from"]),
            }
        if self._trainer is not None and self.trainer.training:  # (a training batch ended)
            checkpoint["cellsift_validates_next"] = _validates_next(self.trainer)
        if self._trainer is not None and _asked_to_stop(self.trainer):
            # written after early stopping stopped the run (at a validation's end, before a
            # checkpoint callback saves): Lightning keeps no stop, and the run resumed from
            # here would train on until early stopping stops it again
            checkpoint["cellsift_stopped"] = {
                "epoch": self.trainer.current_epoch,
                "step": self.trainer.global_step,
            }
        # the TensorBoard run it belongs to, which a resumed run logs on in (cellsift.train.
        # resume: `cellsift fit --ckpt_path`, MetricModel.train(ckpt_path=...))
        logger = self.trainer.logger if self._trainer is not None else None
        if isinstance(logger, TensorBoardLogger):
            checkpoint["cellsift_log"] = {
                "save_dir": str(logger.save_dir),
                "name": logger.name,
                "version": logger.version,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a stop kept for the fit that resumes from this checkpoint (not a validation's or
        # a load of its weights: a later fit of this plan is its own)
        fit = self._trainer is not None and self.trainer.state.fn == "fit"
        ckpt = getattr(self._trainer, "ckpt_path", None) if fit else None
        stop = checkpoint.get("cellsift_stopped")
        self._stopped = {**stop, "ckpt": str(ckpt)} if stop and ckpt else None
        # the epochs as min_epochs counts them (Lightning's processed epochs: one more than
        # "epoch" in a checkpoint written as an epoch ended, a best-* one)
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        done = loops.get("epoch_progress", {}).get("current", {}).get("processed")
        epochs = int(done if done is not None else checkpoint.get("epoch", 0))
        self._resumed_at = (epochs, int(checkpoint.get("global_step", 0))) if ckpt else None
        # what the run is (data, settings) first: it says what differs in the user's terms,
        # where other weights' shapes would name tensors
        saved, here = checkpoint.get("cellsift_data"), self.run_identity
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        which = f"the checkpoint {path}" if path else "the checkpoint"
        if saved is not None and here is not None:
            what = [
                _identity_difference(k, saved, here)
                for k in ("genes", "labels")
                if saved.get(k) != here.get(k)
            ]
            if what:
                raise ResumeError(
                    f"{which} was trained on other {' and '.join(what)} than this run's "
                    "data: resume with the data it was made with (or the run it belongs to: "
                    "another run's checkpoints in the same folder?), or start a new run "
                    "without --ckpt_path."
                )
            changed = _changed_settings(saved.get("settings"), here.get("settings"))
            if changed:  # (checkpoints of older versions hold no settings)
                raise ResumeError(
                    f"{which} was trained with other settings ({'; '.join(changed)}): "
                    "a resumed run goes on with the settings it was made with. Resume with "
                    "those, or start a new run (or fine-tune the saved model bundle: "
                    "MetricModel.load(dir).train(...))."
                )
        _check_same_model(checkpoint.get("state_dict", {}), self.state_dict())
        # the optimiser's and schedule's state come from the checkpoint: other settings here
        # would be silently overridden by them (or, for the schedule, mismatched with them),
        # another optimiser fail at its first step. Compared where the run's optimisers exist
        self._saved_optimization = checkpoint.get("cellsift_optimization")  # (None: older)
        if self._trainer is not None and self.trainer.optimizers:  # (restored after setup)
            self._check_optimization()
        _finish_the_epoch(checkpoint)
        self._resumed_from = checkpoint  # (its loops are restored after on_fit_start)
        # the epoch's sums so far, for a run that goes on mid-epoch (a new epoch clears them):
        # every rank's, held by rank 0
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._epoch_sums = dict(checkpoint.get("cellsift_epoch_sums", {})) if rank == 0 else {}
        states = checkpoint.get("cellsift_rng", {}).get("per_rank", [])
        world = self.trainer.world_size if self._trainer is not None else 1
        if len(states) == world:
            self._rng_to_restore = states[rank]
        elif states:
            rank_zero_warn(
                f"the checkpoint holds the random states of {len(states)} ranks, this run has "
                f"{world}: random draws start afresh, so the resumed run will not repeat the "
                "interrupted one exactly.",
                category=CellsiftWarning,
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batches_begun += 1
        # cells/s of the last step: its batch's cells over the time from its start to this
        # one's (its forward, backward and step, and the loading of this batch)
        now = time.perf_counter()
        n = int(batch["x_ng"].shape[0])
        if self._tick is not None:  # every rank's cells (ranks take equal batches)
            then, before = self._tick
            cells = before * self.trainer.world_size
            self.log("train/cells_per_s", cells / max(now - then, 1e-9), batch_size=before)
        self._tick = (now, n)
        # restored here, not on load: between the two, Lightning may validate (the sanity
        # check; triplet mining draws), which the uninterrupted run did not do at this point.
        # (The loader's iterator draws from a generator of its own: CellLoader.)
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_validation_start(self) -> None:
        # validation draws (triplet mining in eval mode): kept out of training's random
        # stream, so that a run resumed from a checkpoint written just before a validation
        # (an epoch's last step) draws as the uninterrupted run did after it. That resumed
        # run validates first (_finish_the_epoch): from the checkpoint's stream, as the
        # uninterrupted run did
        if self._rng_to_restore is not None and not self.trainer.sanity_checking:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self._rng_before_validation = _rng_state()

    def on_validation_end(self) -> None:
        self._tick = None  # (the next step's rate is not the validation's)
        if self._rng_before_validation is not None:
            _set_rng_state(self._rng_before_validation)
            self._rng_before_validation = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.module(batch)
        self._log_scalars(out, "val", int(batch["x_ng"].shape[0]))
        if "z_nk" in out and "y_n" in batch:
            self._keep_for_silhouette(out["z_nk"].detach(), batch["y_n"], batch.get("obs_idx_n"))

    def _keep_for_silhouette(
        self, z: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None
    ) -> None:
        """Keep a batch's labelled cells for the silhouette: of batches with cell indices,
        the ``asw_cells`` of the lowest :func:`_spread_key` so far (at most twice as many
        held between compactions); once a batch without them has come, the first
        ``asw_cells`` of the cells held then and of those that arrive after, in the order
        they were held (cells a compaction left out are not among them)."""
        labelled = y >= 0
        z, y = z[labelled], y.detach()[labelled]
        key = None if idx is None else _spread_key(idx.detach()[labelled])
        if key is None or any(k is None for k in self._val_i):  # (in arrival order)
            left = self.asw_cells - sum(len(k) for k in self._val_y)
            if left > 0:
                self._val_z.append(z[:left])
                self._val_y.append(y[:left])
                self._val_i.append(None)
            return
        self._val_z.append(z)
        self._val_y.append(y)
        self._val_i.append(key)
        keys = [k for k in self._val_i if k is not None]
        if sum(len(k) for k in keys) > 2 * self.asw_cells:
            kz, ky, kk = _lowest_keys(self._val_z, self._val_y, keys, self.asw_cells)
            self._val_z, self._val_y, self._val_i = [kz], [ky], [kk]

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def on_validation_epoch_end(self) -> None:
        """``val/<scalar>``: the cell-weighted mean over every rank's validation batches; and
        the silhouette of ``asw_cells`` labelled validation cells spread over the set (the
        lowest :func:`_spread_key` of their index; batches without ``obs_idx_n``: in arrival
        order), of every rank's cells gathered: the same set and value on any number of
        ranks. Where those cells hold fewer than two labels there is no silhouette: an
        error naming why where a callback watches ``val/asw`` (Lightning's would name only
        the missing key), else a warning."""
        sums, self._val_sums = _over_ranks(self._val_sums), {}
        for key, (total, weight) in sums.items():
            if weight > 0:  # the same value on every rank; synced so that Lightning knows it
                self.log(f"val/{key}", total / weight, prog_bar=key == "loss", sync_dist=True)
        local = [
            (z.cpu(), y.cpu(), None if i is None else i.cpu())
            for z, y, i in zip(self._val_z, self._val_y, self._val_i, strict=True)
        ]
        self._val_z, self._val_y, self._val_i = [], [], []
        batches = [b for rank in _gather_objects(local) for b in rank]
        if not batches:
            return
        zs, ys = [b[0] for b in batches], [b[1] for b in batches]
        keys = [b[2] for b in batches if b[2] is not None]
        if len(keys) == len(batches):
            z, y, _ = _lowest_keys(zs, ys, keys, self.asw_cells)
        else:  # (in arrival order)
            z, y = torch.cat(zs)[: self.asw_cells], torch.cat(ys)[: self.asw_cells]
        z, y = z.to(self.device), y.to(self.device)
        triplet = getattr(self.module, "triplet", None)
        related = getattr(triplet, "related_ll", None)
        distance: Distance = getattr(triplet, "distance", "cosine")  # (the distance trained on)
        types = len(torch.unique(y))
        if types >= 2:
            # the same value on every rank; synced so that Lightning knows it is global
            self.log("val/asw", float(silhouette(z, y, related, distance)), sync_dist=True)
            return
        if self.trainer.sanity_checking:  # (a few batches only)
            return
        why = (
            f"no val/asw this validation: its {len(y):,} labelled cells sampled (asw_cells="
            f"{self.asw_cells:,}) hold {types} cell type(s), and a silhouette compares two or "
            "more"
        )
        watched = "val/asw" in _watching(self.trainer)
        if watched and self.trainer.state.fn == "fit":  # (callbacks watch in fits only)
            raise ConfigError(
                f"{why}; callbacks watch val/asw. Validate on cells of several types the model "
                "knows (val_groups, or a split_key / val_fraction), raise asw_cells, or watch "
                "val/loss instead."
            )
        rank_zero_warn(why + ".", category=CellsiftWarning)

    def _optimization(self) -> dict[str, Any]:
        """The optimiser's and schedule's settings, which a resumed run must share: those of
        the optimiser and schedule the trainer steps (the plan's, or LightningCLI's
        --optimizer / --lr_scheduler in their place), read from them once they exist."""
        plan = {"lr": self.lr, "weight_decay": self.weight_decay, "scheduler": self.scheduler}
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if not optimizers:
            return plan
        out: dict[str, Any] = {}
        for i, opt in enumerate(optimizers):
            key = "optimizer" if i == 0 else f"optimizer{i}"
            out[key] = type(opt).__name__
            own = {n: v for n, v in opt.defaults.items() if n not in _IMPLEMENTATION}
            out |= _settings(own, "" if i == 0 else f"{key}.")
            # the settings schedules keep in the optimiser's groups (OneCycleLR's max_lr; not
            # initial_lr, the optimiser's lr)
            group = {
                n: v
                for n, v in opt.param_groups[0].items()
                if n not in opt.defaults and n not in ("params", "initial_lr")
            }
            out |= _settings(group, "scheduler." if i == 0 else f"{key}.")
        out["scheduler"] = "none"
        for i, config in enumerate(self.trainer.lr_scheduler_configs):
            key = "scheduler" if i == 0 else f"scheduler{i}"
            sched = config.scheduler
            if sched is self._own_schedule:
                out[key] = "cosine"
                continue
            out[key] = type(sched).__name__
            out[f"{key}.interval"], out[f"{key}.frequency"] = config.interval, config.frequency
            out |= _schedule_settings(sched.state_dict(), key)
        return out

    def configure_optimizers(self) -> Any:
        params = list(self.module.parameters())
        # torch's fused AdamW (one kernel over all parameters) runs on CPUs and CUDA GPUs: on
        # the CPU it steps SCimilarity's model about 10x faster than the per-tensor loop
        fused = {p.device.type for p in params} <= {"cpu", "cuda"}
        # (Lightning's mixed precision unscales gradients before clipping them, which a fused
        # optimiser, unscaling inside its step, does not allow: clipped runs step per tensor)
        trainer = self._trainer
        if trainer is not None and trainer.gradient_clip_val and "mixed" in str(trainer.precision):
            fused = False
        opt = torch.optim.AdamW(
            params, lr=self.lr, weight_decay=self.weight_decay, fused=True if fused else None
        )
        if self.scheduler == "none":
            return opt
        estimated = self.trainer.estimated_stepping_batches
        if not math.isfinite(estimated):
            raise ConfigError(
                "the cosine schedule anneals the rate to 0 over the run's steps, and this run "
                "has no last step (max_epochs=-1 and no max_steps; max_time and early "
                "stopping end a run at no step known before): set max_epochs or max_steps, "
                "or train at a constant rate: scheduler='none' (MetricModel.train, "
                "TrainingPlan), cellsift fit --model.scheduler none."
            )
        span = self._span = {
            "steps": max(int(estimated), 1),
            "offset": 0,
            "from": None,
        }

        def cosine(step: int) -> float:  # from 1 at step 0 to 0 at this run's last step
            return 0.5 * (1.0 + math.cos(_angle(span, step)))

        # closed form, with the length read from this run: a run resumed with more epochs
        # than it was started with anneals to 0 at its new end (a restored CosineAnnealingLR
        # keeps its old length and, past it, climbs back to the full rate); a function (not
        # a callable object) so that checkpoints do not store the old length
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
        self._own_schedule = sched
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


#: The keys of the optimiser's and the schedule's classes (and the schedule's settings).
_CLASSES = ("optimizer", "scheduler")
#: Optimiser settings of how it computes, not what: free to differ between runs (devices).
_IMPLEMENTATION = frozenset({"foreach", "fused", "capturable", "differentiable"})
#: A schedule's state that its steps change (torch's schedules), not its settings.
_PROGRESS = frozenset(
    {
        "last_epoch",
        "verbose",
        "best",  # ReduceLROnPlateau
        "num_bad_epochs",
        "cooldown_counter",
        "T_cur",  # CosineAnnealingWarmRestarts
        "T_i",
    }
)


def _schedule_settings(state: dict[str, Any], key: str) -> dict[str, Any]:
    """A schedule's settings from its state, less its progress (which the checkpoint
    restores: the epoch, CosineAnnealingWarmRestarts' T_cur, ReduceLROnPlateau's best); of a
    schedule of schedules (SequentialLR, ChainedScheduler), its milestones and each inner
    schedule's settings."""
    out: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for name, value in state.items():
        if name == "_schedulers" and isinstance(value, list | tuple):
            for i, inner in enumerate(value):
                if isinstance(inner, dict):
                    out |= _schedule_settings(inner, f"{key}.{i}")
            continue
        name = _PRIVATE_SETTINGS.get(name, name)  # (SequentialLR's, OneCycleLR's)
        if not name.startswith("_") and name not in _PROGRESS:
            own[name] = value
    return out | _settings(own, f"{key}.")


def _settings(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` as comparable settings (:func:`_setting`), keyed ``prefix + name``; those
    that are none (a function, an object) left out."""
    read = {f"{prefix}{name}": _setting(value) for name, value in values.items()}
    return {k: v for k, v in read.items() if v is not _UNREADABLE}


#: Settings that schedules keep under private names, and the names they are compared by.
_PRIVATE_SETTINGS = {
    "_milestones": "milestones",  # SequentialLR
    "_schedule_phases": "phases",  # OneCycleLR: pct_start, three_phase
    "_anneal_func_type": "anneal_strategy",  # OneCycleLR
}
#: What _setting gives for a value that is no comparable setting (a function, an object).
_UNREADABLE = object()


def _setting(value: Any) -> Any:
    """``value`` as a comparable setting (numbers, text, flags, None and lists of them, a
    mapping as its sorted items; a one-number tensor as its number), or
    :data:`_UNREADABLE` for what is none of these."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        items = [_setting(v) for v in value]
        return _UNREADABLE if any(v is _UNREADABLE for v in items) else items
    if isinstance(value, Mapping):  # (MultiStepLR's milestones, a Counter)
        return _setting(sorted(([k, v] for k, v in value.items()), key=repr))
    return _UNREADABLE


def check_validation_interval(every: object, name: str, unset: str = "None") -> None:
    """``check_val_every_n_epoch`` (named ``name`` in the error) is a whole number of at
    least 1 or ``unset``: Lightning takes 0 and fails on its first epoch dividing by it."""
    if every is not None and not is_whole(every, least=1):
        raise ConfigError(
            f"{name} is how many epochs apart validations run, a whole number of at least 1 "
            f"(or {unset}), not {every!r}."
        )


def _validates_next(trainer: pl.Trainer) -> bool | None:
    """Whether the fit validates after the training batch that has just ended, as
    Lightning's epoch loop decides it then (``val_check_interval``, the epoch's last batch,
    ``check_val_every_n_epoch``); None where its loop does not say, or where the time since
    the last validation decides (a resumed run starts that clock afresh: its loop would
    not find the validation due, and would train on past it)."""
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return None
    try:
        fetcher = trainer.fit_loop._data_fetcher
        if fetcher is None:  # (no training under way)
            return None
        return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(fetcher))
    except (AttributeError, TypeError, AssertionError):  # (another Lightning's loops)
        return None


def _angle(span: Mapping[str, Any], step: int) -> float:
    """The cosine schedule's angle (0 to pi) at ``step`` (see ``_go_on_with_schedule``);
    ``pi * step / steps`` rounded as runs always computed it, where it was not continued."""
    steps = span["steps"]
    at = min(step + span.get("offset", 0), steps)
    start = span.get("from")
    if start is None:
        return math.pi * at / steps
    first, position = start
    if steps <= first:
        return math.pi
    return math.pi * (position + (at - first) * (1.0 - position) / (steps - first))


def _recount_the_epoch(checkpoint: dict[str, Any], done: int, length: int) -> None:
    """The checkpoint's count of its epoch's batches set to ``done`` (of ``length``): where
    a run resumed on another number of devices counts the epoch's batches otherwise. Where
    that is all of them, the checkpoint is as one written as the epoch's last batch ended
    (:func:`_finish_the_epoch`: the run validates and ends the epoch first)."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    batches = loop.get("epoch_loop.batch_progress")
    if not isinstance(batches, dict) or "ready" not in batches.get("current", {}):
        return  # (a checkpoint without loop state, or of a Lightning that keeps it otherwise)
    current = batches["current"]
    shift = done - current["ready"]
    for key in ("ready", "started", "processed", "completed"):
        current[key] += shift
    if done >= length:
        batches["is_last_batch"] = True
        _finish_the_epoch(checkpoint)


def _finish_the_epoch(checkpoint: dict[str, Any]) -> None:
    """A checkpoint written as a training batch ended (a ``ModelCheckpoint`` every n steps,
    the plan's own on a signal) comes before the validation due after that batch
    (``val_check_interval``; the epoch's last batch), and before the epoch's end (epoch
    means, early stopping, epoch-end checkpoints) after an epoch's last batch. Lightning
    resumes such a checkpoint with the next batch, skipping both: the resumed run would
    not validate there, and would log the next epoch's means over both. Its loop state is
    set to where the batch has completed and the validation has not begun (as a checkpoint
    written as that validation started), so that the resumed run validates (and ends the
    epoch) as the uninterrupted run did, then goes on. A checkpoint records whether a
    validation was due (``cellsift_validates_next``; one of an older version: after an
    epoch's last batch); checkpoints written anywhere else are left as they are."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    batches = loop.get("epoch_loop.batch_progress")
    validation = loop.get("epoch_loop.val_loop.batch_progress")
    if not (isinstance(batches, dict) and isinstance(validation, dict)):
        return  # (a checkpoint without loop state, or of a Lightning that keeps it otherwise)
    total, current = batches.get("total", {}), batches.get("current", {})
    keys = ("ready", "started", "processed", "completed")
    due = checkpoint.get("cellsift_validates_next") or batches.get("is_last_batch")
    if not all(k in total and k in current for k in keys) or not due:
        return
    if not total["ready"] == total["started"] == total["processed"] == total["completed"] + 1:
        return  # (not written as a training batch ended)
    total["completed"] += 1
    current["completed"] += 1
    done = validation.get("total", {}).get("completed", 0)
    # Lightning's sign of a validation under way: one batch started, none processed
    validation["total"] = {
        "ready": done + 1,
        "started": done + 1,
        "processed": done,
        "completed": done,
    }
    validation["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    validation["is_last_batch"] = False


def cpu_has_fast_bfloat16() -> bool:
    """Whether torch multiplies bfloat16 matrices on this CPU with oneDNN's kernels (x86
    CPUs with AVX-512 or AMX; ARM CPUs with bfloat16), not with its scalar fallback: on an
    AVX2-only CPU a bfloat16 product of 64 x 512 by 512 x 512 took 51-120x a float32 one's
    (one thread), a step of the default model minutes. Decided from the CPU, not timed (a
    timing on a loaded machine can miss it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # (a torch without the query)
        return bool(torch.cpu._is_avx512_supported())


def _check_cpu_bfloat16() -> None:
    """Warn where ``bf16-mixed`` on this CPU trains slower, not faster."""
    if not cpu_has_fast_bfloat16():
        rank_zero_warn(
            "precision 'bf16-mixed' on this CPU: torch has no fast bfloat16 matrix product "
            "here (its oneDNN kernels need AVX-512 or AMX; this CPU's capability: "
            f"{torch.backends.cpu.get_cpu_capability()}) and multiplies bfloat16 matrices "
            "with a scalar fallback, tens of times slower than float32, so training would be "
            "many times slower, not faster. Train in '32-true' on this machine (bf16-mixed "
            "pays on GPUs, and on CPUs with AVX-512 or AMX).",
            category=CellsiftWarning,
        )


def _check_negatives(trainer: pl.Trainer, module: nn.Module) -> None:
    """Warn where training labels can never be given a negative: under
    ``relatives="never"`` a label whose every other training label is its Cell Ontology
    relative (e.g. only "T cell" and its subtype "CD4-positive, alpha-beta T cell") forms
    no triplet, and its cells train by reconstruction only."""
    from ..data.datamodule import CellDataModule

    dm = trainer.datamodule  # type: ignore[attr-defined]
    triplet = getattr(module, "triplet", None)
    related = getattr(triplet, "related_ll", None)
    if (
        not isinstance(dm, CellDataModule)
        or not dm.label_key
        or dm.train is None
        or related is None
        or getattr(triplet, "relatives", "never") != "never"
    ):
        return
    labels = dm.label_set
    at = {lab: i for i, lab in enumerate(labels)}
    present = [lab for lab in dm.train.codes(dm.label_key)[1] if lab in at]
    if len(present) < 2:  # (the data module says so)
        return
    idx = torch.as_tensor([at[lab] for lab in present])
    alone = related.cpu()[idx][:, idx].all(dim=1)
    if not alone.any():
        return
    named = [present[i] for i in torch.nonzero(alone).flatten().tolist()]
    listed = ", ".join(repr(lab) for lab in named[:5]) + (", ..." if len(named) > 5 else "")
    what = (
        "every training label is a Cell Ontology relative of every other"
        if bool(alone.all())
        else f"{len(named)} of {len(present)} training labels ({listed}) are Cell Ontology "
        "relatives of every other training label"
    )
    warn(
        f"{what}, and relatives are never negatives (relatives='never'): "
        f"{'no triplet has' if bool(alone.all()) else 'their cells have'} a negative, so "
        "they train by reconstruction only. Add cells of unrelated types, or use "
        "relatives='resolved' where the studies label the relatives apart."
    )


def _check_steps(trainer: Any) -> None:
    """Trainer settings that Lightning takes as given and then divides by (a step in, or
    as the optimiser is made): named before the run starts."""
    accumulate = trainer.accumulate_grad_batches
    if not is_whole(accumulate, least=1):
        raise ConfigError(
            f"accumulate_grad_batches is the number of batches per optimiser step (1 or "
            f"more), not {accumulate!r}."
        )
    # (a time between validations, "DD:HH:MM:SS" or a timedelta, leaves it unset)
    interval = getattr(trainer, "val_check_interval", None)
    if not isinstance(interval, numbers.Real) or isinstance(interval, bool):
        return
    whole = isinstance(interval, numbers.Integral)
    if (not whole and not 0.0 < float(interval) <= 1.0) or (
        whole and not is_whole(interval, least=1)
    ):
        raise ConfigError(
            f"val_check_interval is a share of an epoch (a float in (0, 1]) or a number of "
            f"batches (1 or more) between validations, not {interval!r}."
        )


def _say_time_spent(trainer: pl.Trainer, epochs: int, step: int, resumed: bool) -> None:
    """Warn where a fit starts under a ``max_time`` (Lightning's Timer) already spent: one
    resumed from a checkpoint (of ``epochs`` processed and ``step``) whose run has trained
    for it (Lightning counts the time over the whole run, resumes included), or one on a
    trainer whose Timer an earlier fit spent, or a validation from a checkpoint restored.
    Such a fit ends at once, with no more training than the checkpoint's (unless
    ``min_epochs`` / ``min_steps`` are not met yet: it trains to them)."""
    from lightning.pytorch.callbacks import Timer
    from lightning.pytorch.trainer.states import RunningStage

    loop = trainer.fit_loop
    if (loop.min_epochs and epochs < loop.min_epochs) or (loop.min_steps and step < loop.min_steps):
        return
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        left = cb.time_remaining(RunningStage.TRAINING) if isinstance(cb, Timer) else None
        if left is not None and left <= 0:
            elapsed = cb.time_elapsed(RunningStage.TRAINING)
            spent, limit = (timedelta(seconds=int(t)) for t in (elapsed, elapsed + left))
            run = (
                f"the run resumed from {trainer.ckpt_path}"
                if resumed
                else "this fit (its Timer spent by an earlier fit on this trainer, or "
                "restored from a checkpoint by a validation or test on it)"
            )
            rank_zero_warn(
                f"{run} has trained for {spent} of its max_time ({limit}): Lightning counts "
                "max_time over the whole run, resumes included, so this one ends at once. "
                "Give a longer max_time to train on.",
                category=CellsiftWarning,
            )


def _asked_to_stop(trainer: pl.Trainer) -> bool:
    """Whether early stopping has stopped the fit: a run that has found what it trains
    for. Not the other stops, which a resumed run goes on past: ``max_steps`` (the plan
    sets ``should_stop`` as it ends the run: a run resumed with more steps goes on),
    ``max_time`` (Lightning's Timer: a run resumed with more time, or without a limit,
    goes on; with the same, it ends at once, and :func:`_say_time_spent` says so) or a
    callback of the user's."""
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

    if not trainer.should_stop or trainer.state.fn != "fit":
        return False
    return any(
        isinstance(cb, EarlyStopping) and cb.stopping_reason != EarlyStoppingReason.NOT_STOPPED
        for cb in trainer.callbacks  # type: ignore[attr-defined]
    )


def _spread_key(idx: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser of cell indices (int64, wrapping, logical shifts by masks): a
    bijection whose order spreads over the cells, so that the cells of the lowest keys are
    a sample of the set whatever its order (data stored sorted by cell type too), the same
    on any device."""
    x = idx.long() * -7046029254386353131  # 0x9E3779B97F4A7C15
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def _lowest_keys(
    zs: list[torch.Tensor], ys: list[torch.Tensor], keys: list[torch.Tensor], n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``n`` cells of the lowest keys (distinct: one per cell), in key order."""
    dev = zs[0].device
    z, y, k = (
        torch.cat(zs),
        torch.cat([t.to(dev) for t in ys]),
        torch.cat([t.to(dev) for t in keys]),
    )
    order = torch.argsort(k)[:n]
    return z[order], y[order], k[order]


def _watching(trainer: pl.Trainer) -> list[str]:
    """The validation metrics (``val/...``) the trainer's callbacks monitor, sorted."""
    return sorted(
        {
            str(cb.monitor)
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if str(getattr(cb, "monitor", None) or "").startswith("val/")
        }
    )


def _validation_metrics(plan: Any, dm: Any) -> set[str] | None:
    """The ``val/`` metrics a plan of a :class:`~cellsift.nn.MetricModule` logs on the
    data module ``dm``'s validation cells (its forward's losses and counts,
    :meth:`TrainingPlan._log_scalars`, and the silhouette where they are labelled); None for
    another module, whose outputs are known only as it runs."""
    from ..nn.metric import MetricModule

    module = getattr(plan, "module", None)
    if not isinstance(module, MetricModule):
        return None
    names = set(_ALWAYS)
    if dm.label_key:  # (batches with y_n)
        names |= set(_OF_LABELS)
        if module.classifier is not None:
            names |= set(_OF_HEAD)
    return {f"val/{n}" for n in names}


#: A MetricModule plan's ``val/`` metrics: always; where the cells are labelled; where the
#: model has a label head too (:func:`_validation_metrics`).
_ALWAYS, _OF_LABELS, _OF_HEAD = (
    ("loss", "recon_loss"),
    ("triplet_loss", "n_triplets", "asw"),
    ("label_loss",),
)
_MODULE_METRICS = frozenset(f"val/{n}" for n in (*_ALWAYS, *_OF_LABELS, *_OF_HEAD))


def _check_watched_names(trainer: pl.Trainer, dm: Any, drop: str) -> None:
    """A metric that strict callbacks watch and that this run's model cannot log: one of
    the model's that this run's settings do not log (a label head's loss without one), or
    another spelling of one it logs (``val/ASW``), is refused before the first epoch, not
    at its end (Lightning's word); another name, which a callback or plan of the user's
    may log, is warned of."""
    logged = _validation_metrics(trainer.lightning_module, dm)
    if logged is None:
        return
    strict = [  # (a callback with strict=False goes on without its metric)
        str(cb.monitor)
        for cb in trainer.callbacks  # type: ignore[attr-defined]
        if str(getattr(cb, "monitor", None) or "").startswith("val/")
        and getattr(cb, "strict", True)
    ]
    folded = {n.casefold(): n for n in logged}
    # (val/asw without labels: said by _check_watched, with why)
    refused = sorted(
        {
            n
            for n in strict
            if n not in logged
            and n != "val/asw"
            and (n in _MODULE_METRICS or n.casefold() in folded)
        }
    )
    if refused:
        raise ConfigError(
            f"callbacks watch {', '.join(refused)}, which this run does not log: it logs "
            f"{', '.join(sorted(logged))} (names are case-sensitive; a label head's loss needs "
            f"classifier_weight > 0, the triplet loss's labels). Watch one of those, {drop}"
        )
    others = sorted({n for n in strict if n not in logged and n not in _MODULE_METRICS})
    if others:
        warn(
            f"callbacks watch {', '.join(others)}, which the model does not log (it logs "
            f"{', '.join(sorted(logged))}): a callback or plan of yours must, or training "
            "stops at the first validation's end."
        )


def _check_watched(trainer: pl.Trainer, asw_cells: int) -> None:
    """Callbacks that watch validation metrics (early stopping, a monitored checkpoint) need
    validation cells of several types, and ``val/asw`` a sample of ``asw_cells`` of them
    (:meth:`TrainingPlan._keep_for_silhouette`) holding several: checked before the first
    epoch, not at its end."""
    from ..data.datamodule import CellDataModule

    watching = _watching(trainer)
    dm = trainer.datamodule  # type: ignore[attr-defined]
    if not watching or not isinstance(dm, CellDataModule):
        return
    drop = "or drop the EarlyStopping / monitored ModelCheckpoint callbacks."
    _check_watched_names(trainer, dm, drop)
    if trainer.limit_val_batches == 0:
        raise ConfigError(
            f"callbacks watch {', '.join(watching)}, but limit_val_batches=0 runs no "
            f"validation: leave it out, {drop}"
        )
    if dm.val is None and dm.split_key is None:
        raise ConfigError(
            f"callbacks watch {', '.join(watching)}, but the data module holds no validation "
            "cells: validation holds out whole groups of split_key, and none is set "
            "(split_key=None and study_key=None). Set its split_key to a column of groups "
            f"(e.g. donor_id; cellsift fit: --data.init_args.split_key donor_id), {drop}"
        )
    if dm.val is None:
        raise ConfigError(
            f"callbacks watch {', '.join(watching)}, but the data module holds no validation "
            "cells (val_fraction=0 and no val_groups): set its val_fraction (e.g. 0.1) or "
            "val_groups (MetricModel.train, which trains on every cell of stores or AnnData "
            "it is given: give it a CellDataModule(..., val_fraction=0.1); cellsift fit: "
            f"--data.init_args.val_fraction), {drop}"
        )
    strict_asw = [  # (an EarlyStopping with strict=False goes on without the metric)
        cb
        for cb in trainer.callbacks  # type: ignore[attr-defined]
        if str(getattr(cb, "monitor", None)) == "val/asw" and getattr(cb, "strict", True)
    ]
    if not dm.label_key and strict_asw and trainer.state.fn == "fit":  # (no labels: no silhouette)
        raise ConfigError(
            "callbacks watch val/asw, but the data module reads no labels (label_key=None): "
            "the silhouette compares cells of several labelled types. Set its label_key "
            "(cellsift fit: --data.init_args.label_key), watch val/loss instead, " + drop
        )
    if dm.label_key:  # (the labels the model knows: others validate unlabelled)
        # the validation cells' codes as their batches carry them (y_n: -1 for others)
        codes = dm.val.codes(dm.label_key, dm.label_set)[0]
        labels = [dm.label_set[i] for i in np.unique(codes[codes >= 0])]
        if len(labels) < 2:
            raise ConfigError(
                f"callbacks watch {', '.join(watching)}, but the validation cells hold "
                f"{len(labels)} cell type{'' if len(labels) == 1 else 's'} the model knows "
                f"({', '.join(labels) or 'none'}): the silhouette compares two or more. "
                f"Choose val_groups (or a split_key / val_fraction) whose cells hold several "
                f"types, {drop}"
            )
        # the whole set read (a float 1.0; an int counts batches); callbacks watch fits only
        whole = isinstance(trainer.limit_val_batches, float) and trainer.limit_val_batches == 1.0
        if "val/asw" in watching and whole and trainer.state.fn == "fit":
            # the cells the silhouette will sample (their rows: the batches' obs_idx_n)
            rows = torch.from_numpy(np.asarray(dm.val.cell_ids)[codes >= 0].astype(np.int64))
            sample = torch.argsort(_spread_key(rows))[:asw_cells].numpy()
            held = np.unique(codes[codes >= 0][sample])
            if len(held) < 2:
                raise ConfigError(
                    f"callbacks watch val/asw, but the {len(sample):,} labelled validation "
                    f"cells its silhouette samples (asw_cells={asw_cells:,}) hold one cell "
                    f"type ({dm.label_set[int(held[0])]}): the other types are too rare among "
                    "them. Raise asw_cells, choose val_groups whose cells hold several types "
                    f"more evenly, watch val/loss instead, {drop}"
                )


#: Settings added to a run's identity since it was first kept in checkpoints, by section,
#: with the value every run made before then had.
_ADDED_SETTINGS: dict[str, dict[str, Any]] = {"loss": {"ontology_aware": True}}


def _changed_settings(saved: dict[str, Any] | None, here: dict[str, Any] | None) -> list[str]:
    """``section.key there -> here`` for each setting that differs (none where either side
    holds no settings)."""
    if not saved or not here:
        return []
    out = []
    for section in sorted(set(saved) | set(here)):
        a, b = saved.get(section) or {}, here.get(section) or {}
        # a setting that checkpoints of older versions lack: its default then held
        a = {k: a.get(k, v) for k, v in _ADDED_SETTINGS.get(section, {}).items()} | a
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key} {a.get(key)!r} there, {b.get(key)!r} here")
    return out


def _identity_difference(key: str, saved: dict[str, Any], here: dict[str, Any]) -> str:
    """How a run's ``genes`` or ``labels`` differ between a checkpoint and this run, as
    counts (and the labels one has that the other lacks, a few)."""
    if key == "genes":
        there, now = saved.get("n_genes"), here.get("n_genes")
        if not (there and now):  # (checkpoints of older versions: the digest only)
            return "genes"
        if there == now:
            return f"genes (as many, {now:,}, but others or in another order)"
        return f"genes ({there:,} there, {now:,} here)"
    a, b = list(saved.get("labels") or []), list(here.get("labels") or [])
    held_there, held_here = set(a), set(b)
    only = [x for x in a if x not in held_here][:3]
    new = [x for x in b if x not in held_there][:3]
    extra = f"; e.g. {only} only there" if only else ""
    extra += f"; e.g. {new} only here" if new else ""
    return f"labels ({len(a):,} there, {len(b):,} here{extra})"


def _check_same_model(saved: dict[str, Any], here: dict[str, Any]) -> None:
    """Refuse a checkpoint of another model: other weights, or weights of other shapes (other
    settings, genes or labels) would fail deep in torch's load_state_dict."""
    what = state_differences(saved, here)
    if not what:
        return
    raise ResumeError(
        f"the checkpoint holds another model ({'; '.join(what)}): it was made with other "
        "settings (hidden, latent, a label head) or other data (genes, labels). Resume with "
        "the settings and data it was made with, or start a new run without --ckpt_path."
    )
