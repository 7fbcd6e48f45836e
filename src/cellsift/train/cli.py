"""``cellsift fit``: LightningCLI over the training plan and the data module.

    cellsift fit --config configs/metric.yaml [--trainer.max_epochs 10] [--ckpt_path last]

The ``model`` section configures a :class:`~cellsift.models.MetricModel`; what comes from the
data (its gene vocabulary and label set) is linked from the ``data`` section when both are
built, so a config never lists genes or labels. At the end of fit the trained model is
written as a bundle (``<log dir>/model`` unless ``model.bundle_dir`` names a place), which
:meth:`MetricModel.load` reads: the best weights by the metric a checkpoint callback
monitors (``val/asw`` in configs/metric.yaml), else those of the last epoch.

``--ckpt_path last`` resumes a run from its last checkpoint, mid-epoch included (the
loader's position is part of the checkpoint), and logs on in the TensorBoard run that wrote
the checkpoint (unless the config fixes the logger's version): its curves go on from the
checkpoint's step, what the interrupted run logged after that step is dropped, and the
bundle lands in that run's directory.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import re
import socket
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from .._utils import logger, read_error, write_error
from ..data.datamodule import CellDataModule
from ..errors import USER_ERRORS, ConfigError, TrainingInterrupted
from ..models.bundle import check_bundle_path
from ._stop import interrupts_kept
from .plan import TrainingPlan, check_validation_interval
from .resume import checkpoint_file, continued_run, place_checkpoints, read_checkpoint

__all__ = ["FitCLI", "MetricPlan", "run_fit"]


class MetricPlan(TrainingPlan):
    """The training plan of a :class:`~cellsift.models.MetricModel` built for the data.

    Parameters
    ----------
    genes, labels
        Linked from the data module by ``cellsift fit`` (its ``gene_vocabulary`` and
        ``label_set``); pass them when building the plan in Python.
    hidden, latent, dropout, input_dropout, margin, negative, triplet_weight, relatives
        The model (SCimilarity's defaults); see :class:`~cellsift.nn.MetricModule`.
    classifier_weight, target_sum
        Weight of the ontology-aware label head (0: none) and the normalisation's total.
    lr, weight_decay, scheduler, asw_cells, compile
        The plan; see :class:`TrainingPlan`.
    bundle_dir
        Where the bundle goes at the end of fit (default: ``<log dir>/model``).
    ontology_aware
        False: the labels are not Cell Ontology terms (cell lines, a lab's own annotation)
        and are taken as they are (with ``data.init_args.harmonize_labels: false``); see
        :class:`~cellsift.models.MetricModel`.
    """

    def __init__(
        self,
        genes: Any = None,
        labels: list[str] | None = None,
        *,
        hidden: tuple[int, ...] = (1024, 1024, 1024),
        latent: int = 128,
        dropout: float = 0.5,
        input_dropout: float = 0.4,
        margin: float = 0.05,
        negative: Literal["semihard", "hardest", "random"] = "semihard",
        triplet_weight: float = 0.001,
        relatives: Literal["never", "resolved"] = "never",
        classifier_weight: float = 0.0,
        target_sum: float = 1e4,
        lr: float = 5e-3,
        weight_decay: float = 0.01,
        scheduler: Literal["cosine", "none"] = "cosine",
        asw_cells: int = 5_000,
        compile: bool = False,
        bundle_dir: str | None = None,
        ontology_aware: bool = True,
    ) -> None:
        from ..models.metric import MetricModel

        if genes is None or labels is None:
            raise ValueError(
                "MetricPlan needs the genes and labels of the data: `cellsift fit` links them "
                "from the data section; in Python pass genes= and labels=."
            )
        model = MetricModel(
            genes,
            labels,
            hidden=hidden,
            latent=latent,
            dropout=dropout,
            input_dropout=input_dropout,
            margin=margin,
            negative=negative,
            triplet_weight=triplet_weight,
            relatives=relatives,
            classifier_weight=classifier_weight,
            target_sum=target_sum,
            ontology_aware=ontology_aware,
        )
        if model.labels != list(labels):  # the data's label codes index `labels` as they are
            from ..ontology import load_cell_ontology

            ids = load_cell_ontology().harmonize(list(labels))
            changed = [f"{a!r} is {b}" for a, b in zip(labels, ids, strict=True) if a != b]
            raise ConfigError(
                "the data's labels are not current Cell Ontology ids (e.g. "
                f"{', '.join(changed[:3])}), so the model's labels (harmonised) would not line "
                "up with the data's codes: list data.init_args.labels, where given, as those "
                "ids (labels listed are kept as written), and set "
                "data.init_args.harmonize_labels: true where it is not."
            )
        super().__init__(
            model.module,
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            asw_cells=asw_cells,
            compile=compile,
        )
        self.metric_model = model
        self.bundle_dir = bundle_dir
        if bundle_dir:  # refused now, not after the training it would have held
            check_bundle_path(bundle_dir, overwrite=True)
        self.run_identity = model.run_identity()

    def on_fit_end(self) -> None:
        super().on_fit_end()  # the best weights by the monitored metric, where kept
        # every rank: under DDP ``log_dir`` is a broadcast from rank 0
        root = self.trainer.log_dir or self.trainer.default_root_dir
        trial = getattr(self.trainer, "fast_dev_run", False)
        if trial:  # a trial of the settings: its one step is no model
            logger.warning("cellsift fit: fast_dev_run, so no model bundle is written")
        elif self.trainer.is_global_zero:
            path = Path(self.bundle_dir) if self.bundle_dir else Path(root) / "model"
            label_key = getattr(self.trainer.datamodule, "label_key", None)  # type: ignore[attr-defined]
            if label_key:  # (kept in the bundle: what fine-tuning it reads labels from)
                self.metric_model.label_key = label_key
            self.metric_model.module.eval()
            self.metric_model.save(path, overwrite=True)
            logger.warning(
                "cellsift fit: model bundle written to %s, with %s", path, self.final_weights
            )
        self.trainer.strategy.barrier("cellsift fit: bundle written")


class FitCLI(LightningCLI):
    """LightningCLI with the data's genes and labels linked into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in _LINKED.items():
            parser.link_arguments(source, target, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """A config that sets the model's genes or labels, which the data's replace as the
        classes are made (the link), is refused: they were dropped without a word."""
        model = self.config[self.config.subcommand].get("model") or {}
        given = [k for k in ("genes", "labels") if model.get(k) is not None]
        if given:
            raise ConfigError(_linked_message(given))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint given with --ckpt_path first (for its
        # hyperparameters): an unreadable file is said in one line, naming it
        # ("last" names a file only once the callbacks exist: continued_run reads it)
        path = self.config[self.config.subcommand].get("ckpt_path")
        if path is not None and not str(path).strip():  # (a script's unset "$CKPT": meant
            # to resume, perhaps; Lightning's fit refuses it with a traceback)
            raise ConfigError(
                "ckpt_path (--ckpt_path, or the config's) is empty: give the checkpoint to "
                "resume from (a .ckpt of the run, or last), or leave it out (null) to start a "
                "new run."
            )
        if path == "best" and not Path(path).exists():
            raise ConfigError(
                "--ckpt_path best names the best checkpoint of a fit run in the same process, "
                "which a new `cellsift fit` has none of: resume with --ckpt_path last, or "
                "with the checkpoint file's path (the best: checkpoints/best-*.ckpt in the "
                "logger's folder)."
            )
        if path is not None and Path(path).exists():  # (a folder: named as one)
            read_checkpoint(path)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Lightning's Trainer; a setting it refuses as it is made (a strategy name it does
        not know, an accelerator whose package is missing, num_nodes 0) is a ConfigError of
        its words, as are validation intervals below 1, which it takes and divides by."""
        trainer = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        check_validation_interval(
            trainer.get("check_val_every_n_epoch"), "--trainer.check_val_every_n_epoch", "null"
        )
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError, ImportError) as err:
            if not _raised_in_lightning(err):  # (a user's callback's own error: as it is)
                raise
            raise ConfigError(f"a trainer setting: {' '.join(str(err).split())}") from None

    def before_fit(self) -> None:
        """A run resumed from a checkpoint logs on in the TensorBoard run that wrote it.
        A ``ModelCheckpoint`` without ``dirpath`` keeps its checkpoints in the logger's
        folder of runs (``<save_dir>/<name>/checkpoints``, as configs/metric.yaml's do),
        where ``--ckpt_path last`` finds them, not in one run's ``version_N``."""
        config = self.config[self.subcommand]
        if config.get("lr_scheduler") is not None and config.get("optimizer") is None:
            raise ConfigError(  # (LightningCLI applies a schedule with its optimizer only)
                "--lr_scheduler takes effect only with --optimizer (e.g. --optimizer AdamW "
                "--optimizer.lr 0.005), which replaces the model's optimiser and schedule; "
                "without it the model's own schedule runs: --model.scheduler cosine or none."
            )
        run_logger = self.trainer.logger
        if isinstance(run_logger, TensorBoardLogger):
            where = Path(run_logger.save_dir) / run_logger.name / "checkpoints"
        else:
            where = Path(self.trainer.default_root_dir) / "checkpoints"
        place_checkpoints(self.trainer.checkpoint_callbacks, where)
        self._check_new_bundle(config.get("ckpt_path"))
        logger = _continued_logger(self.trainer, config.get("ckpt_path"), config.trainer.logger)
        if logger is not None:
            self.trainer.logger = logger
        _RUN.clear()  # where ranks leave their errors about the input, for rank 0 to say
        _RUN.update(
            root=Path(self.trainer.default_root_dir),
            run="",  # (agreed by the ranks once they are joined: _RankErrors.setup)
            rank=self.trainer.global_rank,
            world=self.trainer.world_size,
            launcher=self.trainer.strategy.launcher,  # (rank 0's: the ranks it starts)
        )
        _FIT.run = (self.trainer, _runs_before(self.trainer.logger))
        if _RUN["world"] > 1:
            self.trainer.callbacks.append(_RankErrors())  # type: ignore[attr-defined]

    def _check_new_bundle(self, ckpt_path: str | None) -> None:
        """A new run (no checkpoint given, or ``last`` finding none) whose
        bundle's folder holds one already is refused: ``--model.bundle_dir``, or the run's
        own folder where the earlier run's is the same (no logger, a logger's fixed
        version). A run resumed rewrites its own bundle; a trial writes none."""
        if getattr(self.trainer, "fast_dev_run", False):
            return
        # (a path given is Lightning's to read, a missing one its error; "hpc", a URL: as
        # they are. "last" finding no checkpoint starts a new run)
        if ckpt_path and ckpt_path != "last":
            return
        if ckpt_path == "last" and checkpoint_file("last", self.trainer.checkpoint_callbacks):
            return
        bundle = getattr(self.model, "bundle_dir", None)
        path = Path(bundle) if bundle else _run_folder(self.trainer) / "model"
        if not (path.is_dir() and any(path.iterdir())):
            return
        where = (
            f"--model.bundle_dir {bundle}"
            if bundle
            else f"{path} (this run's folder: runs without a logger, or of a logger's fixed "
            "version, share it)"
        )
        other = "give another folder" if bundle else "give --model.bundle_dir a folder"
        resume = (
            f" (--ckpt_path {ckpt_path} finds no checkpoint to resume: this run is a new one)"
            if ckpt_path
            else ", or resume the run that wrote it (--ckpt_path last)"
        )
        raise ConfigError(
            f"{where} holds a model bundle already (an earlier run's), which this new run "
            f"would replace: {other} or remove that one{resume}."
        )


def _run_folder(trainer: pl.Trainer) -> Path:
    """Where a fit writes its bundle without ``--model.bundle_dir`` (``<folder>/model``), as
    :meth:`MetricPlan.on_fit_end` names it."""
    return Path(trainer.log_dir or trainer.default_root_dir)


#: This process's run under ``cellsift fit`` (FitCLI.before_fit): root, run (an id that
#: rank 0 makes and sends every rank as training sets up), rank, world, launcher (the
#: strategy's, which on rank 0 starts the other ranks of this machine), started (those
#: ranks' processes, once no longer watched: :func:`_unwatch_started_ranks`).
_RUN: dict[str, Any] = {}

#: This thread's fit (``run``: its trainer and :func:`_runs_before`), for
#: :func:`_remove_untrained_run` (fits of other threads have their own).
_FIT = threading.local()

#: What a fit writes in its run's folder as it sets up: LightningCLI's config, the logger's
#: hyperparameters, TensorBoard's events (named by host and process).
_SETUP_FILES = ("config.yaml", "hparams.yaml")
_EVENTS = "events.out.tfevents."


def _runs_before(run_logger: Any) -> tuple[Path, frozenset[str] | None, frozenset[str]] | None:
    """The logger's folder of runs (``<save_dir>/<name>``), the runs in it before this fit
    (None: no such folder) and their TensorBoard events files (``run/file``); None for a
    logger without one."""
    root = getattr(run_logger, "root_dir", None)
    if not root:
        return None
    root = Path(root)
    with contextlib.suppress(OSError):
        runs = frozenset(p.name for p in root.iterdir())
        events = frozenset(f"{p.parent.name}/{p.name}" for p in root.glob(f"*/{_EVENTS}*"))
        return root, runs, events
    return root, None, frozenset()


def _this_process_events(name: str) -> bool:
    """A TensorBoard events file of this host's process (their names say which)."""
    if not name.startswith(_EVENTS):  # events.out.tfevents.<time>.<host>.<pid>.<n>
        return False
    parts = name[len(_EVENTS) :].split(".")
    return parts[1:-2] == socket.gethostname().split(".") and parts[-2] == str(os.getpid())


def _remove_untrained_run() -> None:
    """On rank 0, as a fit fails before its first training batch (refused as it set up:
    a held checkpoint folder, a validation split it cannot use): the run's folder of logs
    that it made (its config.yaml, hparams.yaml and empty TensorBoard events) goes, so that
    the next fit is not the second version of a run that never trained. A run folder that
    was there before (a resumed run's) loses only the events file this fit began; one that
    holds anything else (another process's events: a run given the same version) stays."""
    trainer, runs = getattr(_FIT, "run", None) or (None, None)
    if trainer is None or runs is None or trainer.logger is None:
        return
    # (the plan's own count: the loop's restores a resumed run's; none: the plan was never
    # attached, nothing written)
    if getattr(trainer.lightning_module, "_batches_begun", 0):
        return  # (it trained: what it logged is kept)
    root, before, events = runs
    with contextlib.suppress(OSError):
        run = Path(trainer.logger.log_dir)
        if run.parent != root or not run.is_dir():
            return
        began = [
            path
            for path in run.glob(f"{_EVENTS}*")
            if f"{run.name}/{path.name}" not in events and _this_process_events(path.name)
        ]
        if before is not None and run.name in before:  # (a run this fit went on with)
            for path in began:
                path.unlink()
            return
        made = [path for path in run.iterdir() if path.name in _SETUP_FILES]
        if len(made) + len(began) != len(list(run.iterdir())):
            return
        for path in made + began:
            path.unlink()
        run.rmdir()
        if before is None:  # (the folder of runs was made for it)
            root.rmdir()


def _rank_error_file(rank: int) -> Path:
    # (named by the run: two runs may share a root directory)
    return _RUN["root"] / f".cellsift-fit-{_RUN['run']}-rank-{rank:05d}.error"


def _rank_read_file(rank: int) -> Path:
    """Left by rank ``rank`` once it has read another rank's error (for rank 0 to clear
    the notes only then)."""
    return _rank_error_file(rank).with_suffix(".read")


class _RankErrors(pl.Callback):
    """A rank's error about the input (a bad count only it reads), kept for rank 0: the
    other ranks see only a collective cut short (gloo's "Connection closed by peer"), and
    rank 0's status is the command's."""

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        # one id for the run's notes (runs may share a folder), rank 0's, sent to every rank
        # once they are joined (however they were started: Lightning, torchrun, SLURM)
        _RUN["run"] = str(trainer.strategy.broadcast(uuid.uuid4().hex[:12], src=0))

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, USER_ERRORS) or isinstance(exception, TrainingInterrupted):
            return  # (signals reach every rank by the plan's own means)
        if not _RUN.get("run"):  # (ranks started otherwise than by rank 0: no shared id)
            return
        with contextlib.suppress(OSError):
            _RUN["root"].mkdir(parents=True, exist_ok=True)
        write_error(_rank_error_file(trainer.global_rank), exception)


def _peer_error(wait: float = 2.0) -> BaseException | None:
    """Another rank's error about the input, of this run (None: none within ``wait``
    seconds: the rank that failed writes it as it stops)."""
    if _RUN.get("world", 1) < 2 or not _RUN.get("run"):
        return None
    deadline = time.monotonic() + wait
    while True:
        for rank in range(_RUN["world"]):
            err = None if rank == _RUN["rank"] else read_error(_rank_error_file(rank))
            if err is not None:
                with contextlib.suppress(OSError):
                    _rank_read_file(_RUN["rank"]).touch()
                return err
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


#: Lightning's words on a setting, raised as RuntimeError or ValueError once the run meets
#: it (a monitored metric never logged, validation less often than an epoch's batches).
_LIGHTNING_SETTING = re.compile(r"^(Early stopping conditioned on metric|`val_check_interval`)")


def _raised_in_lightning(err: BaseException) -> bool:
    """Whether ``err`` was raised by Lightning's own code (its innermost frame in its
    package): its word on a setting, not a bug of code it called."""
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    package = Path(pl.__file__).resolve().parent.parent  # (lightning: fabric and pytorch)
    return Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(package)


def _misconfigured_callback(err: BaseException) -> ConfigError | None:
    """Lightning's word on a callback's setting (``ModelCheckpoint(mode="maximum")``), which
    jsonargparse raises as the cause of its own error while it makes the callbacks: one
    line naming the callback. Only an error raised in a callback's ``__init__`` (a setting
    refused as it is made), reached through causes and contexts that are not suppressed:
    an error of a callback's work, or one raised ``from None``, is not a setting."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, MisconfigurationException):
            break
        seen.add(id(cause))
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    if cause is None or id(cause) in seen:
        return None
    name, tb = None, cause.__traceback__
    while tb is not None:  # (the callback whose __init__ refused the setting)
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and isinstance(owner, pl.Callback):
            name = type(owner).__name__
        tb = tb.tb_next
    if name is None:
        return None
    return ConfigError(f"trainer.callbacks: {name}: {' '.join(str(cause).split())}")


def _lightning_setting(err: Exception) -> ConfigError | None:
    """A ConfigError of Lightning's message where ``err`` is its word on a setting."""
    text = " ".join(str(err).split())
    said = isinstance(err, RuntimeError | ValueError) and _LIGHTNING_SETTING.match(text)
    return ConfigError(text) if said else None


def _clear_rank_errors() -> None:
    if not _RUN.get("run"):
        return
    for rank in range(_RUN.get("world", 0)):
        for note in (_rank_error_file(rank), _rank_read_file(rank)):
            with contextlib.suppress(OSError):  # (a folder it cannot write: no notes left)
                note.unlink(missing_ok=True)


def _unwatch_started_ranks() -> None:
    """The run ends on an error about the input: the ranks this process started (Lightning's
    launcher: the other ranks of its machine) exit with status 2 as they say it. Lightning's
    watcher SIGKILLs this process once it sees one exit with a nonzero status, which would
    take this process's own status and message: it watches the launcher's list of them,
    emptied here (they are kept in ``_RUN["started"]``)."""
    procs = getattr(_RUN.get("launcher"), "procs", None)
    if isinstance(procs, list):
        _RUN.setdefault("started", []).extend(procs)
        procs.clear()


def _let_ranks_read_errors(wait: float = 5.0) -> None:
    """On rank 0 as the run fails, before the ranks' errors are cleared: where a rank left
    one (world > 1), the other ranks are to say it too, rather than the traceback of a
    collective cut short. So this rank leaves the process group now (their collectives
    end at once, not as this process exits, after the clearing), then waits, at most
    ``wait`` seconds, until every other rank has read an error (``_rank_read_file``) or
    left its own; the ranks it started count once they have exited (one that died
    otherwise). A rank that never meets a collective (NCCL does not see a peer leave)
    costs the whole wait; one that this process started is then ended (SIGKILL, as
    Lightning ends them on Ctrl-C), not left holding its device until its collective
    times out."""
    if _RUN.get("world", 1) < 2 or not _RUN.get("run"):
        return
    world = range(_RUN["world"])
    if not any(_rank_error_file(rank).exists() for rank in world):
        return  # (no error of the input: the ranks' tracebacks are all there is)
    _unwatch_started_ranks()  # (before they can exit)
    started = _RUN.get("started", [])
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # (a group a failed collective left broken)
            dist.destroy_process_group()

    def settled(rank: int) -> bool:
        if _rank_read_file(rank).exists() or _rank_error_file(rank).exists():
            return True
        # (Lightning's launcher starts ranks 1, 2, ... of rank 0's machine, in order)
        return 1 <= rank <= len(started) and started[rank - 1].poll() is not None

    others = [rank for rank in world if rank != _RUN["rank"]]
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if all(settled(rank) for rank in others):
            return
        time.sleep(0.05)
    for rank, proc in enumerate(started, start=1):
        if proc.poll() is None:
            logger.info("rank %d has not stopped %.0f s after the run failed: ended", rank, wait)
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)


def _continued_logger(
    trainer: pl.Trainer, ckpt_path: str | None, logger_config: Any
) -> TensorBoardLogger | None:
    """The configured TensorBoard logger, set to continue the run that wrote the checkpoint
    (:func:`~cellsift.train.resume.continued_run`); None where there is nothing to continue
    (no checkpoint or one without a run, another logger, a version fixed in the config,
    another directory)."""
    logger = trainer.logger
    init = getattr(logger_config, "init_args", None)
    if not ckpt_path or not isinstance(logger, TensorBoardLogger) or init is None:
        return None
    if init.get("version") is not None:
        return None
    run = continued_run(ckpt_path, trainer.checkpoint_callbacks, logger.save_dir, logger.name)
    return None if run is None else type(logger)(**{**init.as_dict(), **run})


def _check_config_files(args: list[str]) -> None:
    """A ConfigError where a ``--config`` file is not text (a data file given by mistake):
    jsonargparse reads it as UTF-8 and raises the decoder's error as a traceback. Its first
    64 KiB are read (a data file's header says so at once; an h5ad's first byte), not a
    file of gigabytes whole."""
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            given = args[i + 1]
        elif arg.startswith("--config="):
            given = arg.split("=", 1)[1]
        else:
            continue
        # (a missing one: jsonargparse's own words, said in one line; a name too long to be
        # a file's: the settings themselves, given inline)
        if not os.path.isfile(given):
            continue
        with open(given, "rb") as f:
            head = f.read(1 << 16)
        try:  # (a character cut at the end of the head: not an error)
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"--config {given} is not a YAML file: it is not text (byte {err.start} is "
                f"0x{err.object[err.start]:02x}); pass the run's settings, e.g. "
                "configs/metric.yaml, and the data with --data.init_args.source."
            ) from None


#: A config file's sections of settings, and all its top-level keys (LightningCLI's fit).
_SETTINGS_SECTIONS = ("model", "data", "trainer", "optimizer", "lr_scheduler")
_SECTIONS = (*_SETTINGS_SECTIONS, "seed_everything", "ckpt_path")


def _section_file(args: list[str]) -> ConfigError | None:
    """Where a bad setting came from a whole config's file given to one section (``--data
    configs/data.yaml``, whose ``data:`` key then nests a level too deep, so that its first
    setting is named as unknown): a ConfigError that says to give it with ``--config``."""
    import yaml

    for i, arg in enumerate(args):
        section, _, given = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or section not in _SETTINGS_SECTIONS:
            continue
        if not given and i + 1 < len(args):
            given = args[i + 1]
        if not os.path.isfile(given):
            continue
        try:
            with open(given, encoding="utf-8") as f:
                held = yaml.safe_load(f)
        except (OSError, ValueError, yaml.YAMLError):
            continue
        keys = [k for k in held if k in _SECTIONS] if isinstance(held, dict) else []
        if keys:
            return ConfigError(
                f"--{section} {given} holds a whole config's sections ({', '.join(keys)}), "
                f"not the {section} section's settings: give it with --config {given}, or "
                f"give --{section} a file of what its {section}: key holds."
            )
    return None


#: The model's settings that the data module gives (``FitCLI``'s links), by their source.
_LINKED = {"data.gene_vocabulary": "model.genes", "data.label_set": "model.labels"}


def _linked_message(keys: Sequence[str]) -> str:
    """Why ``model.<key>`` of ``keys`` (genes, labels) is not set in a fit's config."""
    named = " and ".join(f"model.{k}" for k in keys)
    there = " and ".join(f"data.init_args.{k}" for k in keys)
    return (
        f"{named} {'is' if len(keys) == 1 else 'are'} the data module's, which the model "
        f"takes from it (its genes and labels as read): set {there} instead."
    )


def run_fit(argv: Sequence[str] | None = None) -> FitCLI:
    """``cellsift fit ARGS``: train with LightningCLI (see the module docstring)."""
    args = list(argv or [])
    if args and args[0] == "fit":
        args = args[1:]
    _check_config_files(args)
    _RUN.clear()  # (FitCLI.before_fit sets it for this run)
    _FIT.run = None
    # the arguments are the command line's, passed on; Ctrl-C stays an interrupt
    with warnings.catch_warnings(), interrupts_kept():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        failed = True
        try:
            cli = FitCLI(
                MetricPlan,
                CellDataModule,
                subclass_mode_data=True,
                args=["fit", *args],
                save_config_kwargs={"overwrite": True},
                # a bad argument raises (said in one line) rather than printing the usage
                parser_kwargs={"prog": "cellsift", "exit_on_error": False},
            )
            failed = False
            return cli
        except argparse.ArgumentError as err:
            linked = re.findall(r"--> model\.(genes|labels)\b", str(err))
            if linked:  # (jsonargparse's "invalid Optional value" of a link's target)
                raise ConfigError(_linked_message(sorted(set(linked)))) from None
            raise _section_file(args) or ConfigError(
                f"{_one_line(str(err))} (cellsift fit --help lists the options)."
            ) from None
        except MisconfigurationException as err:  # Lightning's word on a trainer setting
            raise ConfigError(" ".join(str(err).split())) from None
        except USER_ERRORS:
            _unwatch_started_ranks()
            raise
        except Exception as err:
            # Lightning's word on a setting (a callback's, wrapped by jsonargparse as it made
            # the callbacks); or, on several ranks, one rank's bad input that ended the others
            # in a collective cut short: said as one process says it
            said = _lightning_setting(err) or _misconfigured_callback(err) or _peer_error()
            if said is not None:
                _unwatch_started_ranks()
                raise said from None
            raise
        finally:
            if _RUN.get("rank") == 0:
                _let_ranks_read_errors()
                _clear_rank_errors()
                if failed:
                    _remove_untrained_run()
            _FIT.run = None  # (not kept alive past the run)


_KEY = re.compile(r'\s*(?:- )?Parser key "([^"]+)":\s*(.*)')
_CLASS = re.compile(r"\s*- Problem with given class_path '([^']+)'")
_UNKNOWN = re.compile(r"\s*Option '([^']+)' is not accepted")
_LEVELS = (("key", _KEY), ("class", _CLASS), ("unknown", _UNKNOWN))
_REQUIRED = re.compile(r"the following arguments are required: (.+)$")


def _unusable_class(lines: list[str], at: int, depth: int) -> bool:
    """The class_path of ``lines[at]`` names no usable class: the line under it, deeper, is
    the reason (``module 'x' has no attribute 'Y'``), not a setting of the class."""
    if at + 1 >= len(lines) or len(lines[at + 1]) - len(lines[at + 1].lstrip()) <= depth:
        return False
    return not any(p.match(lines[at + 1]) for _, p in _LEVELS)


_EXPECTED = re.compile(r"Expected an? (.+?)(?:\. Got value: (.*))?$")


def _one_line(message: str) -> str:
    """jsonargparse's message for a bad setting in one line, naming the setting as the
    command line does: ``--data.init_args.pin_memory: 'maybe' is not valid (expected bool
    or null)``, ``--data.init_args.batch_sise is not an option of CellDataModule``.

    jsonargparse nests its message as the setting nests (the class of an optional ``data``,
    the types of a union), each level indented under the one above: the innermost key is
    the setting at fault, and the keys and classes above it make its name."""
    lines = [line.rstrip() for line in message.strip().splitlines() if line.strip()]
    above: list[tuple[int, str, str]] = []  # (indent, "key" | "class", name): enclosing levels
    fault = None  # (indent, line, kind, name, its enclosing levels): the innermost key
    for at, line in enumerate(lines):
        kind, found = next(
            ((k, m) for k, p in _LEVELS if (m := p.match(line)) is not None), (None, None)
        )
        if kind is None or found is None:
            continue
        depth = len(line) - len(line.lstrip())
        while above and above[-1][0] >= depth:
            above.pop()
        if kind == "class" and _unusable_class(lines, at, depth):
            kind = "unusable"  # (a class_path that names no class: the reason lies below)
        if kind != "class" and (fault is None or depth > fault[0]):
            fault = (depth, at, kind, found.group(1), list(above))
        above.append((depth, kind, found.group(1)))
    if fault is None:
        return "; ".join(line.strip() for line in lines)
    depth, at, kind, name, levels = fault
    setting, after_class, owner = "", False, ""
    for _, what, label in [*levels, *([(depth, "key", name)] if kind != "unusable" else [])]:
        if what == "class":
            after_class, owner = True, label.rsplit(".", 1)[-1]
            continue
        dot = ".init_args." if after_class else "."
        setting, after_class = (setting + dot if setting else "--") + label, False
    if kind == "unknown":
        return f"{setting} is not an option" + (f" of {owner}" if owner else "")
    if kind == "unusable":
        reason = lines[at + 1].strip()
        missing = _REQUIRED.match(reason)
        if missing is not None:  # (the class is fine: arguments it needs are not given)
            needed = [a.strip() for a in missing.group(1).split(",")]
            options = ", ".join(f"{setting}.{a}" for a in needed)
            return f"{setting}: {name.rsplit('.', 1)[-1]} needs {', '.join(needed)} ({options})"
        return f"{setting}: class_path {name!r} cannot be used ({reason})"
    block = [lines[at].split(":", 1)[1].strip()]  # the key's own line, then its level's
    for line in lines[at + 1 :]:
        if len(line) - len(line.lstrip()) <= depth:
            break
        block.append(line.strip().removeprefix("- "))
    given, expected = None, []
    for text in block:
        if text.startswith("Given value: ") and given is None:
            given = text[len("Given value: ") :]
        elif (kind_found := _EXPECTED.match(text)) is not None:
            expected.append(kind_found.group(1))
            given = kind_found.group(2) if kind_found.group(2) is not None else given
    if given is None:
        return f"{setting}: " + "; ".join(text for text in block if text)
    kinds = _kinds(expected)
    return f"{setting}: {given!r} is not valid" + (f" (expected {kinds})" if kinds else "")


_TYPE_WORDS = {"NoneType": "null", "Sequence": "a list", "tuple": "a list", "list": "a list"}
_TYPE_WORDS |= {"Mapping": "a mapping", "dict": "a mapping"}


def _kinds(expected: list[str]) -> str:
    """jsonargparse's expected types in words: ``int``, ``null``, ``a list``, ``one of 'a',
    'b'`` (the values of all its literals together)."""
    words, values = [], []
    for kind in expected:
        if (cls := re.fullmatch(r"<class '([\w.]+)'>", kind)) is not None:
            name = cls.group(1).rsplit(".", 1)[-1]
            words.append(_TYPE_WORDS.get(name, name))
        elif (literal := re.fullmatch(r"typing\.Literal\[(.*)\]", kind)) is not None:
            values.append(literal.group(1))
        else:  # jsonargparse's own words: "path but X is not ...", "dot import path string: X"
            words.append("a " + re.split(r": | but ", kind)[0])
    if values:
        words.insert(0, "one of " + ", ".join(values))
    words = list(dict.fromkeys(words))
    return " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)
