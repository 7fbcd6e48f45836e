"""MetricModel: SCimilarity-style metric learning with the AnnData contract (scvi-style).

Holds a pure :class:`~cellsift.nn.MetricModule`, the gene vocabulary it reads and its Cell
Ontology label set; trains through the one :class:`~cellsift.train.TrainingPlan`; embeds
AnnData (genes aligned by the vocabulary) or collections; saves and loads as a bundle.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment

from .._utils import (
    BACKED_ROWS,
    adata_counts,
    canonical,
    check_csr,
    is_whole,
    logger,
    model_fingerprint,
)
from .._warnings import UntrainedDecoderWarning, warn
from ..data import CellCollection, GeneVocabulary
from ..data.collection import check_count_values
from ..data.datamodule import CellDataModule
from ..data.loader import to_torch_csr
from ..errors import ConfigError, DataError
from ..nn import MetricModule
from ..nn.metric import hidden_widths
from ..ontology import OntologyError, load_cell_ontology
from ..train import TrainingPlan
from ..train._stop import interrupts_kept
from ..train.plan import check_validation_interval
from ..train.resume import checkpoint_file, continued_run, place_checkpoints, read_checkpoint
from .bundle import (
    BundleError,
    inference_on,
    load_bundle,
    load_weights,
    metric_settings,
    save_bundle,
)

__all__ = ["SMALL_ATLAS_LOADER", "SMALL_ATLAS_MODEL", "MetricModel"]

#: MetricModel settings for small atlases (thousands to ~100k cells): SCimilarity's
#: architecture and loss, with the triplet term's weight raised from its 0.001 and dropout
#: lowered from 0.5 / 0.4 (both set for millions of cells), so that a few thousand cells'
#: labels shape the embedding. ``relatives="resolved"``: atlases that label CD14-positive
#: and CD16-positive monocytes (Cell Ontology relatives) as distinct populations within a
#: study get them contrasted, which SCimilarity's rule never does. Chosen once on one Kang
#: 2018 donor.
SMALL_ATLAS_MODEL: dict[str, Any] = {
    "triplet_weight": 0.1,
    "dropout": 0.1,
    "input_dropout": 0.1,
    "relatives": "resolved",
}
#: CellDataModule settings to go with them: class-balanced batches of 256 (SCimilarity: 1000),
#: so a few thousand training cells still give enough optimiser steps in 40 epochs.
SMALL_ATLAS_LOADER: dict[str, Any] = {
    "mode": "weighted",
    "batch_size": 256,
    "block_size": 64,
    "fetch_factor": 4,
}


class MetricModel:
    """An encoder whose distances mean biological similarity (SCimilarity's method).

    Parameters
    ----------
    genes
        The genes the model reads, in input order.
    labels
        Cell Ontology ids or names of the training labels (harmonised to CL ids); with
        ``ontology_aware=False``, any labels (e.g. cell lines), taken as they are.
    hidden, latent, dropout, input_dropout, margin, negative, triplet_weight, relatives, target_sum
        See :class:`~cellsift.nn.MetricModule` (SCimilarity's defaults; ``relatives="resolved"``
        lets Cell Ontology relatives that a study's labels tell apart be negatives).
    classifier_weight
        Weight of an ontology-aware label head's loss (default 0: none, as in SCimilarity);
        see :class:`~cellsift.nn.MetricModule`.
    label_names
        With ``labels`` given as CL ids: their names, and the ids taken as they are, not
        harmonised again (a saved model's: a newer Cell Ontology, in which some of its ids
        were deprecated since, must not rename, merge or refuse them).
    ontology_aware
        The labels are Cell Ontology terms (default): they are harmonised to current CL ids,
        and a label's ontology relatives are never its negatives. False: the labels are taken
        as they are and are related to themselves only (labels outside the Cell Ontology:
        cell lines, perturbations, a lab's own annotation); training data are read as they
        are too, with no harmonisation.
    """

    def __init__(
        self,
        genes: GeneVocabulary | Sequence[str],
        labels: Sequence[str],
        *,
        hidden: Sequence[int] = (1024, 1024, 1024),
        latent: int = 128,
        dropout: float = 0.5,
        input_dropout: float = 0.4,
        margin: float = 0.05,
        negative: str = "semihard",
        triplet_weight: float = 0.001,
        relatives: str = "never",
        classifier_weight: float = 0.0,
        target_sum: float = 1e4,
        label_names: Sequence[str] | None = None,
        ontology_aware: bool = True,
    ) -> None:
        for name, value in (("genes", genes), ("labels", labels), ("label_names", label_names)):
            if isinstance(value, str):
                raise TypeError(f"{name} is a list, not the text {value!r}: pass [{value!r}].")
        self.genes = genes if isinstance(genes, GeneVocabulary) else GeneVocabulary(list(genes))
        if not isinstance(ontology_aware, bool):
            raise TypeError(f"ontology_aware is True or False, not {ontology_aware!r}.")
        cl = load_cell_ontology()
        if ontology_aware and label_names is None:
            try:
                self.labels = list(dict.fromkeys(cl.harmonize(labels)))  # names, ids may meet
            except OntologyError as err:
                raise OntologyError(
                    f"{err} To train on labels outside the Cell Ontology (cell lines, a lab's "
                    "own annotation) as they are, pass ontology_aware=False (`cellsift fit`: "
                    "--model.ontology_aware false)."
                ) from None
            self.label_names = cl.names(self.labels)
        else:  # taken as they are: a saved model's, or labels outside the ontology
            self.labels = [str(t) for t in labels]
            self.label_names = list(self.labels if label_names is None else label_names)
            if len(self.labels) != len(self.label_names) or len(set(self.labels)) != len(
                self.labels
            ):
                raise ValueError("label_names must be parallel to labels, which must be unique.")
            # (as a bundle holds them: a model it could not load again is refused here)
            for i, (label, name) in enumerate(zip(self.labels, self.label_names, strict=True)):
                if not label or not isinstance(name, str):
                    what = "empty label" if not label else f"name {name!r}"
                    raise ConfigError(
                        f"labels are non-empty text, and label_names text: label {i} has the "
                        f"{what}. Leave out cells without a label, and give names as text."
                    )
        #: False for a model loaded without decoder weights (:meth:`load`): it embeds, but
        #: :meth:`train` asks before fine-tuning it against a random decoder
        self.decoder_trained = True
        # (Python numbers: numpy's, which the module takes, would not go into JSON)
        self.config: dict[str, Any] = {
            "model": "MetricModel",
            "architecture": {
                "n_genes": len(self.genes),
                "hidden": [int(h) for h in hidden_widths(hidden)],
                "latent": int(latent),
                "dropout": float(dropout),
                "input_dropout": float(input_dropout),
            },
            "loss": {
                "margin": float(margin),
                "negative": negative,
                "triplet_weight": float(triplet_weight),
                "relatives": relatives,
                "classifier_weight": float(classifier_weight),
                "ontology_aware": ontology_aware,
            },
            "normalization": {"target_sum": float(target_sum), "log1p": True},
            "ontology": {"version": cl.version} if ontology_aware else None,
        }
        # (a saved id the installed ontology lacks relates to itself only)
        n = len(self.labels)
        idx = [i for i, t in enumerate(self.labels) if ontology_aware and t in cl.terms]
        anc = np.zeros((n, n), dtype=bool)
        rel = np.eye(n, dtype=bool)
        if idx:  # (a deprecated label stands for its successor: the same as it, if present)
            known = [self.labels[i] for i in idx]
            anc[np.ix_(idx, idx)], rel[np.ix_(idx, idx)] = cl.relations(known, stacklevel=3)
        related = torch.from_numpy(rel)
        ancestors = torch.from_numpy(anc)
        self.module = MetricModule(
            len(self.genes),
            hidden,
            latent,
            dropout=dropout,
            input_dropout=input_dropout,
            related_ll=related,
            relatives=relatives,  # type: ignore[arg-type]
            ancestor_ll=ancestors,
            margin=margin,
            negative=negative,  # type: ignore[arg-type]
            triplet_weight=triplet_weight,
            classifier_weight=classifier_weight,
            target_sum=target_sum,
        )
        self.trainer: pl.Trainer | None = None
        #: the obs column :meth:`train` reads labels from where it is given stores (that of
        #: ``from_collection``, of the data module it last trained on; saved in the bundle)
        self.label_key = "cell_type_ontology_term_id"
        #: a loaded bundle's other fields of each label (e.g. an import's source_name)
        self._label_fields: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        a = self.config["architecture"]
        return (
            f"MetricModel({a['n_genes']} genes -> {a['hidden']} -> {a['latent']}, "
            f"{len(self.labels)} labels)"
        )

    @classmethod
    def from_collection(
        cls,
        source: Any,
        *,
        label_key: str = "cell_type_ontology_term_id",
        layer: str | None = None,
        check_counts: bool = True,
        **kwargs: Any,
    ) -> MetricModel:
        """A model for the genes and labels of a collection (or anything CellCollection takes,
        read with ``layer`` and ``check_counts`` as it takes them)."""
        if isinstance(source, CellCollection):
            if layer is not None or not check_counts:
                raise ConfigError(
                    "layer= and check_counts= are the reading of stores a collection is built "
                    "from; this one is built: pass them to CellCollection(...)."
                )
            coll = source
        else:
            coll = CellCollection(
                source, dropna=[label_key], layer=layer, check_counts=check_counts
            )
        labels = coll.codes(label_key)[1]  # the distinct labels, sorted, missing ones left out
        model = cls(coll.genes, labels, **kwargs)
        model.label_key = label_key  # (what train() reads the labels from)
        return model

    # -- training -------------------------------------------------------------------------
    def train(
        self,
        data: CellDataModule | Any,
        *,
        max_epochs: int = 20,
        lr: float = 5e-3,
        weight_decay: float = 0.01,
        accelerator: str = "auto",
        devices: Any = "auto",
        default_root_dir: str | os.PathLike[str] | None = None,
        ckpt_path: str | None = None,
        compile: bool = False,
        scheduler: Literal["cosine", "none"] = "cosine",
        asw_cells: int = 5_000,
        study_key: str | None = "dataset_id",
        allow_untrained_decoder: bool = False,
        layer: str | None = None,
        check_counts: bool = True,
        **trainer_kwargs: Any,
    ) -> pl.Trainer:
        """Train on a :class:`CellDataModule` (or stores to build one from: paths, a glob,
        a manifest, AnnData objects in memory).

        The data are read through the model's gene vocabulary and label set. Extra keyword
        arguments go to ``lightning.pytorch.Trainer`` (e.g. ``precision="bf16-mixed"``);
        ``lr``, ``weight_decay``, ``scheduler`` (``"cosine"``, annealed to 0 over the run, or
        ``"none"``, a constant rate: to train until early stopping or ``max_time`` with
        ``max_epochs=-1``), ``asw_cells`` (the validation silhouette's cells) and ``compile``
        (the encoder and decoder compiled) go to the :class:`TrainingPlan`. Where ``data``
        is not a data module (whose own settings hold otherwise), it is read with
        ``study_key``, the obs column
        of studies (positives from another study; None: none), labels from
        :attr:`label_key` (``from_collection``'s), counts from ``layer`` (checked unless
        ``check_counts`` is False), and every labelled cell trains (cells without a label,
        or labelled ``unknown``, are left out; a warning says how many from 1% on): give a
        :class:`CellDataModule` (``val_fraction``, ``split_key``) to hold studies out for
        validation. The data must hold at least half the model's genes (or 5,000), as
        :meth:`embed` asks; the model's others read as zero.

        Unless the callbacks hold a ``ModelCheckpoint`` (or checkpointing is off), a
        checkpoint is kept at each epoch's end in ``<default_root_dir>/checkpoints``, with
        ``last.ckpt`` (a ``ModelCheckpoint`` without ``dirpath`` keeps its checkpoints
        there too); ``ckpt_path`` resumes a run from a checkpoint file or from ``"last"``
        (as an uninterrupted run would have gone on), and with Lightning's default logger
        the resumed run logs on in the TensorBoard run that wrote the checkpoint. With a
        ``ModelCheckpoint`` that monitors a metric (e.g. ``val/asw``, with early stopping),
        the model ends with the best weights it kept.

        A model loaded without trained decoder weights (``decoder_trained`` False) is refused
        unless ``allow_untrained_decoder``: its reconstruction loss would pull the trained
        encoder towards a random decoder.
        """
        if not self.decoder_trained and not allow_untrained_decoder:
            raise ConfigError(
                "this model has no trained decoder (its bundle held no decoder weights), so "
                "fine-tuning would train the encoder against a random decoder's "
                "reconstruction; import the model with its decoder (SCimilarity's "
                "decoder.ckpt), or pass allow_untrained_decoder=True to train a decoder from "
                "scratch along with the encoder."
            )
        every = trainer_kwargs.get("check_val_every_n_epoch")
        check_validation_interval(every, "check_val_every_n_epoch")
        if every is not None:  # (numpy's whole numbers too: Lightning takes Python's only)
            trainer_kwargs["check_val_every_n_epoch"] = int(every)
        label_key = self.label_key
        if isinstance(data, CellDataModule):
            if layer is not None or not check_counts:
                raise ConfigError(
                    "layer= and check_counts= are the reading of data given as stores; a data "
                    "module reads as its collection_options say: pass them there "
                    "(CellDataModule(..., collection_options={'layer': ...}))."
                )
            dm = data
            label_key = dm.label_key or label_key  # (the model's, once it has trained)
        else:
            dm = CellDataModule(
                data,
                study_key=study_key,
                label_key=self.label_key,
                val_fraction=0.0,
                collection_options={"layer": layer, "check_counts": check_counts},
            )
        aware = self.config["loss"]["ontology_aware"]
        read_as = (dm.genes, dm.labels, dm.harmonize_labels, dm.collection_options)
        dm.genes, dm.labels, dm.harmonize_labels = self.genes, self.labels, aware
        # the model's genes must be held enough (as embed asks), not only the data's
        dm.collection_options = {"overlap_of": "vocabulary", **dm.collection_options}
        if dm.collection is not None and read_as != (
            self.genes,
            self.labels,
            aware,
            dm.collection_options,
        ):
            dm.reset()  # set up (inspected) before: read again as the model reads them
        plan = TrainingPlan(
            self.module,
            lr=lr,
            weight_decay=weight_decay,
            scheduler=scheduler,
            asw_cells=asw_cells,
            compile=compile,
        )
        plan.run_identity = self.run_identity()
        root = Path(default_root_dir) if default_root_dir is not None else Path.cwd()
        callbacks = trainer_kwargs.pop("callbacks", None) or []
        # (as Trainer takes them: a list, or one callback)
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
        # in one place across runs, so that ckpt_path="last" finds the last one
        place_checkpoints(callbacks, root / "checkpoints")
        if trainer_kwargs.get("enable_checkpointing", True) is not False and not any(
            isinstance(cb, ModelCheckpoint) for cb in callbacks
        ):
            callbacks.append(ModelCheckpoint(dirpath=root / "checkpoints", save_last=True))
        run_logger = trainer_kwargs.pop("logger", None)
        if run_logger is None or run_logger is True:  # Lightning's default, continuing a run
            # Lightning's default logger names a SLURM job's run by its job id
            run = continued_run(ckpt_path, callbacks, root, "lightning_logs") or {
                "version": SLURMEnvironment.job_id()
            }
            run_logger = TensorBoardLogger(root, name="lightning_logs", **run)
        elif ckpt_path is not None:  # (continued_run reads it above: checked there)
            found = checkpoint_file(ckpt_path, callbacks)
            if found is not None:  # (a file that is no checkpoint: said, not torch's words)
                read_checkpoint(found)
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            default_root_dir=root,
            callbacks=callbacks,
            logger=run_logger,
            **trainer_kwargs,
        )
        with warnings.catch_warnings(), interrupts_kept():
            if ckpt_path is not None:  # a run going on: its checkpoint directory is not empty
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* not empty")
            trainer.fit(plan, datamodule=dm, ckpt_path=ckpt_path)
        self.module.eval()
        self.trainer = trainer
        self.label_key = label_key
        if not self.decoder_trained:  # trained now, with the encoder
            self.decoder_trained = True
            self.config.pop("decoder_trained", None)
        return trainer

    def run_identity(self) -> dict[str, Any]:
        """What a training run is: a digest of the genes the model reads in order, its labels,
        and its settings (architecture, loss, normalisation). Checkpoints keep it, so that a
        run is not resumed on other data or with other settings."""
        genes = hashlib.blake2b("\t".join(self.genes.genes).encode(), digest_size=16)
        settings = {k: self.config[k] for k in ("architecture", "loss", "normalization")}
        return {
            "genes": genes.hexdigest(),
            "n_genes": len(self.genes),
            "labels": list(self.labels),
            "settings": copy.deepcopy(settings),  # (plain values: the config holds no others)
        }

    @property
    def fingerprint(self) -> str:
        """A digest of the settings and weights: embeddings stores and indexes record it, and
        refuse queries of another model (:meth:`~cellsift.tasks.CellIndex.check_model`)."""
        return model_fingerprint(self)

    # -- inference ------------------------------------------------------------------------
    def aligned_counts(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        check_counts: bool = True,
        source: str = "adata",
        rows: np.ndarray | None = None,
    ) -> sp.csr_matrix:
        """Counts of ``adata.X`` (or ``layers[layer]``; ``"raw"``: ``adata.raw``) as CSR in
        the model's gene order: genes matched by id or symbol, missing ones zero; fewer than
        half the model's genes found, a warning, and an error where they are also fewer than
        5,000. With ``check_counts``, values that are not raw counts (NaN,
        negative, non-integer, 2**24 or more: e.g. log-normalised data, which the model would normalise
        again) are an error. ``source`` names the data in messages (e.g. its file).
        ``rows``: those cells only (positions, ascending; default all), read as the others
        (a backed AnnData, or a view of one, which cannot be sliced again, by row blocks).
        ``adata`` is never changed; the result may share its arrays (counts already float32
        CSR in the model's gene order): copy it before changing it in place."""
        x, var, others = adata_counts(adata, layer, source)
        align = self._aligner(var, others, layer, check_counts, source)
        if sp.issparse(x) or isinstance(x, np.ndarray):  # (checked whole by adata_counts)
            return align(x if rows is None else x[rows], checked=True)
        # backed (anndata's on-disk matrices): read in row blocks
        return sp.vstack(
            list(_blocks(x, rows, BACKED_ROWS, align))
            or [sp.csr_matrix((0, len(self.genes)), dtype=np.float32)],
            format="csr",
        )

    def aligned_blocks(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        check_counts: bool = True,
        source: str = "adata",
        rows: np.ndarray | None = None,
        block_rows: int = BACKED_ROWS,
    ) -> Iterator[sp.csr_matrix]:
        """:meth:`aligned_counts` ``block_rows`` cells at a time, in order (the last block
        fewer): for work over more cells than their aligned counts would fit in memory (a
        backed atlas); the genes are aligned once."""
        x, var, others = adata_counts(adata, layer, source)
        align = self._aligner(var, others, layer, check_counts, source)
        whole = sp.issparse(x) or isinstance(x, np.ndarray)  # (checked whole by adata_counts)
        yield from _blocks(x, rows, block_rows, align, checked=whole)

    def _aligner(
        self,
        var: pd.DataFrame,
        others: list[str],
        layer: str | None,
        check_counts: bool,
        source: str,
    ) -> Callable[..., sp.csr_matrix]:
        """Counts of a block of cells (of genes ``var``) -> CSR in the model's gene order,
        checked as :meth:`aligned_counts` says."""
        has = f" (this AnnData has: {', '.join(others)})" if others else ""
        where = f"{source} ({'X' if layer is None else layer})"
        gm = self.genes.align(var, source=source, min_overlap=0.5, of="vocabulary")
        if not gm.identity:
            logger.info(
                "%d of the model's %d genes found (%s)", gm.n_matched, len(self.genes), gm.key
            )

        def align(block: Any, first: int = 0, checked: bool = False) -> sp.csr_matrix:
            """``block``: the cells from row ``first`` on; ``checked``: its structure already
            (a slice of a matrix in memory, which adata_counts checks whole)."""
            if not checked:  # (a block read from a file damaged on disk)
                check_csr(block, where, first)
            out = canonical(gm.apply(sp.csr_matrix(block, dtype=np.float32)))
            if check_counts:
                check_count_values(
                    out.data,
                    where,
                    f" Point layer= at raw counts{has}, or pass check_counts=False if these "
                    "values are meant.",
                )
            return out

        return align

    def _apply(
        self,
        adata: ad.AnnData,
        fn: Callable[[dict[str, Any]], torch.Tensor],
        width: int,
        layer: str | None,
        batch_size: int,
        device: str | torch.device | None,
        check_counts: bool = True,
        source: str = "adata",
    ) -> np.ndarray:
        """``fn(batch)`` over the aligned counts of ``adata`` in blocks, into one array. With
        ``check_counts``, cells without counts in the model's genes are an error: they carry
        nothing to embed or label. Read, aligned and checked a block of rows at a time, in
        memory or backed (the aligned counts never whole in memory); an error names the
        first faulty block's cells."""
        _check_batch_size(batch_size)  # (here: no batch runs for no cells)
        x, var, others = adata_counts(adata, layer, source)
        align = self._aligner(var, others, layer, check_counts, source)
        in_memory = sp.issparse(x) or isinstance(x, np.ndarray)  # (checked whole there)
        out = np.empty((x.shape[0], width), dtype=np.float32)
        step = BACKED_ROWS
        with inference_on(self.module, device) as dev:  # (the device checked before a read)
            for start in range(0, x.shape[0], step):
                block = align(x[start : start + step], start, in_memory)
                if check_counts:
                    self.check_cells_have_counts(
                        block,
                        adata.obs_names,
                        first=start,
                        layer=layer,
                        source=source,
                        anyway="; or, to embed them anyway, pass check_counts=False",
                    )
                self._run(block, fn, width, batch_size, dev, out=out[start : start + step])
        return out

    def check_cells_have_counts(
        self,
        x: sp.csr_matrix,
        obs_names: pd.Index,
        *,
        rows: np.ndarray | None = None,
        first: int = 0,
        layer: str | None = None,
        source: str = "adata",
        anyway: str = "",
    ) -> None:
        """A DataError naming the cells (of ``rows``, default all) without counts in the
        aligned counts ``x`` (:meth:`aligned_counts`): they carry nothing to embed, label or
        explain. ``first``: the cell (of ``obs_names``) that is ``x``'s first row, where
        ``x`` holds a block of them. ``anyway``: how to go on with them, where there is a way."""
        nnz = np.diff(x.indptr)
        rows = np.arange(x.shape[0]) if rows is None else np.asarray(rows)
        empty = rows[nnz[rows] == 0]
        if len(empty):
            names = obs_names[first + empty[:3]].tolist()
            where = f"{source} ({'X' if layer is None else layer})"
            how = "" if layer is None else f", layer={layer!r}"
            of = f"{len(rows)}"
            if x.shape[0] < len(obs_names):  # (a block of the cells)
                of = f"the {len(rows)} cells in rows {first}-{first + x.shape[0] - 1} of"
                of = f"{of} {len(obs_names)}"
            raise DataError(
                f"{where}: {len(empty)} of {of} cells have no counts in the model's "
                f"genes (e.g. {names}); they carry nothing to embed or label. Drop them: keep "
                f"= np.diff(model.aligned_counts(adata{how}).indptr) > 0, then adata[keep]"
                f"{anyway}."
            )

    def _run(
        self,
        x: sp.csr_matrix,
        fn: Callable[[dict[str, Any]], torch.Tensor],
        width: int,
        batch_size: int,
        dev: torch.device,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """``fn(batch)`` over counts already in the model's gene order (:meth:`aligned_counts`),
        on ``dev``, where the module is in eval mode (:func:`~cellsift.models.bundle.
        inference_on`), each batch written into ``out`` (cells x ``width``; default: a new
        array): no per-batch results kept and joined (their buffers, freed between kept
        ones, would stay with the process). ``batch_size`` checked by the caller."""
        if out is None:
            out = np.empty((x.shape[0], width), dtype=np.float32)
        with torch.no_grad(), self.module.encoder.weights_unchanged():
            for start in range(0, x.shape[0], batch_size):
                t = to_torch_csr(_row_view(x, start, start + batch_size)).to(dev)
                # (as float32 whatever the module's type: numpy has no bfloat16)
                out[start : start + batch_size] = fn({"x_ng": t}).float().cpu().numpy()
        return out

    def embed_aligned(
        self,
        x: sp.csr_matrix,
        *,
        batch_size: int = 4096,
        device: str | torch.device | None = None,
    ) -> np.ndarray:
        """Embeddings of raw counts already in the model's gene order (cells x genes, as
        :meth:`aligned_counts` returns them; a dense array or a list of rows is read as
        one): no alignment and no checks of the values."""
        if isinstance(x, ad.AnnData):
            raise TypeError(
                "embed_aligned takes counts already in the model's gene order, not an "
                "AnnData: model.embed(adata) aligns its genes (or model.aligned_counts(adata))."
            )
        if not sp.issparse(x):  # (anndata's backed sparse X reads itself into memory)
            x = x.to_memory() if hasattr(x, "to_memory") else np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"x must be cells x genes (2-D), not {x.ndim}-D {x.shape}.")
        if x.shape[1] != len(self.genes):
            raise ValueError(
                f"x has {x.shape[1]} genes, the model {len(self.genes)}: align the counts "
                "with model.aligned_counts(adata) first."
            )
        latent = self.config["architecture"]["latent"]
        _check_batch_size(batch_size)
        with inference_on(self.module, device) as dev:
            return self._run(sp.csr_matrix(x), self.module.embed, latent, batch_size, dev)

    def embed(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        batch_size: int = 4096,
        device: str | torch.device | None = None,
        check_counts: bool = True,
        source: str = "adata",
    ) -> np.ndarray:
        """Embeddings (cells x latent) of raw counts in ``adata.X``, ``adata.layers[layer]``
        or (``layer="raw"``) ``adata.raw``.

        Genes are aligned to the model's by id or symbol (missing genes are zeros); too little
        overlap is an error naming the count, as are values that are not raw counts (see
        :meth:`aligned_counts`; ``source`` names the data in those messages).
        """
        latent = self.config["architecture"]["latent"]
        return self._apply(
            adata, self.module.embed, latent, layer, batch_size, device, check_counts, source
        )

    def predict(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        batch_size: int = 4096,
        device: str | torch.device | None = None,
        check_counts: bool = True,
        source: str = "adata",
    ) -> pd.DataFrame:
        """The label head's calls for the cells of ``adata`` (a model trained with
        ``classifier_weight > 0``): ``label`` (CL id), ``label_name`` and ``probability``,
        indexed by ``adata.obs_names``; ``.attrs["probabilities"]`` holds cells x labels."""
        if self.module.classifier is None:
            raise ValueError(
                "this MetricModel has no label head; train one with classifier_weight > 0, "
                "or annotate by kNN on its embedding (cellsift.tl.annotate)."
            )
        p = self._apply(
            adata,
            self.module.predict_proba,
            len(self.labels),
            layer,
            batch_size,
            device,
            check_counts,
            source,
        )
        lost = ~np.isfinite(p).all(1)
        if lost.any():  # (argmax would read a row of NaN as the first label)
            raise DataError(
                f"{source}: the label head gives {int(lost.sum()):,} of "
                f"{len(p):,} cells NaN probabilities: its weights or the model's are not "
                "finite (a model diverged in training), or those cells' counts are not "
                "(check_counts=False let NaN through)."
            )
        best = p.argmax(1) if len(p) else np.zeros(0, dtype=int)
        ids, names = np.asarray(self.labels), np.asarray(self.label_names)
        out = pd.DataFrame(
            {"label": ids[best], "label_name": names[best], "probability": p.max(1, initial=0)},
            index=adata.obs_names,
        )
        out.attrs["probabilities"] = p
        return out

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Save as a bundle directory (config.json, model.safetensors, genes.tsv, labels.json)."""
        labels = [
            {**self._label_fields.get(i, {}), "id": i, "name": n}
            for i, n in zip(self.labels, self.label_names, strict=True)
        ]
        return save_bundle(
            path,
            config={**self.config, "label_key": self.label_key},
            genes=self.genes,
            labels=labels,
            modules=self._modules(),
            overwrite=overwrite,
        )

    def _modules(self) -> dict[str, torch.nn.Module]:
        """The weights a bundle holds, by name."""
        out: dict[str, torch.nn.Module] = {
            "encoder": self.module.encoder,
            "decoder": self.module.decoder,
        }
        if self.module.classifier is not None:
            out["classifier"] = self.module.classifier
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str = "cpu") -> MetricModel:
        """Load a bundle saved by :meth:`save` (or made by ``import_scimilarity``).

        ``device`` must be one torch can use here (else a ConfigError naming one to use).
        The bundle's files are checked against each other: settings, labels or weights that
        do not fit are a :class:`BundleError` naming the file and the key. A bundle without
        trained decoder weights (``import_scimilarity`` without decoder.ckpt, other writers)
        loads with ``decoder_trained = False`` and an ``UntrainedDecoderWarning``: it embeds
        as its encoder was trained, but fine-tuning it would train the encoder against a
        random decoder's reconstruction.
        """
        b = load_bundle(path, device=device)
        settings = metric_settings(path, b, cls)
        try:
            model = cls(
                b.genes,
                b.label_ids,
                label_names=[lab.get("name", lab["id"]) for lab in b.labels],
                **settings,
            )
        except (TypeError, ValueError) as err:  # settings the model itself refuses
            raise BundleError(
                f"{path}: config.json's settings do not make a MetricModel ({err}). The "
                "bundle was edited or written by another tool; save the model again with "
                "cellsift."
            ) from err
        modules = model._modules()
        if "encoder" not in b.weights:
            raise BundleError(
                f"{path}: model.safetensors has no encoder weights (it holds "
                f"{', '.join(sorted(b.weights)) or 'none'}); without them the model cannot "
                "embed. Save the model again with cellsift."
            )
        unused = sorted(set(b.weights) - set(modules))
        if unused:
            raise BundleError(
                f"{path}: model.safetensors holds {', '.join(unused)} weights, which a "
                "MetricModel of config.json's settings has no place for (a label head needs "
                "loss.classifier_weight > 0); the files are of different models. Save the "
                "model again with cellsift."
            )
        for name, module in modules.items():
            if name in b.weights:
                load_weights(path, name, module, b.weights[name])
        if model.module.classifier is not None and "classifier" not in b.weights:
            raise BundleError(
                f"{path}: config.json asks for a label head (classifier_weight > 0) but "
                "model.safetensors has no classifier weights; save the model again."
            )
        # a bundle saved from a model loaded without decoder weights keeps saying so
        trained = "decoder" in b.weights and b.config.get("decoder_trained", True) is not False
        model.decoder_trained = trained
        if not trained:
            model.config["decoder_trained"] = False
            warn(
                f"{path} has no trained decoder weights: its embeddings are the trained "
                "encoder's, but fine-tuning it (model.train) would train the encoder against a "
                "random decoder's reconstruction. Embed with it as it is; to fine-tune, import "
                "the model with its decoder (SCimilarity's decoder.ckpt), or pass "
                "allow_untrained_decoder=True to model.train to train a decoder from scratch.",
                UntrainedDecoderWarning,
            )
        model.label_key = b.config.get("label_key", model.label_key)  # (checked: a text)
        # where it came from (an import's source, its labels' source names) and the Cell
        # Ontology its labels were harmonised to (not the installed one) stay with it
        for key in ("source", "ontology"):
            if key in b.config:
                model.config[key] = b.config[key]
        model._label_fields = {
            lab["id"]: {k: v for k, v in lab.items() if k not in ("id", "name")} for lab in b.labels
        }
        model.module.to(device).eval()
        return model


def _blocks(
    x: Any,
    rows: np.ndarray | None,
    block_rows: int,
    align: Callable[..., sp.csr_matrix],
    checked: bool = False,
) -> Iterator[sp.csr_matrix]:
    """``x``'s rows (``rows``, or all) ``block_rows`` at a time, each block aligned (read
    from a backed matrix block by block; a block numbered in messages from its first row)."""
    n = x.shape[0] if rows is None else len(rows)
    for i in range(0, n, block_rows):
        if rows is None:
            yield align(x[i : i + block_rows], i, checked=checked)
        else:
            yield align(x[rows[i : i + block_rows]], int(rows[i]), checked=checked)


def _check_batch_size(batch_size: Any) -> None:
    """``batch_size`` counts cells embedded at a time: a whole number >= 1."""
    if not is_whole(batch_size, least=1):
        raise ConfigError(f"batch_size must be a whole number of at least 1, not {batch_size!r}.")


def _row_view(x: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of CSR ``x``, sharing its values and column indices where scipy's
    slice copies them (80 ms of 0.93 s embedding 8,000 cells): for reading only, as a batch's tensors,
    which share them in turn, are read by the model's transforms and first layer."""
    if not (x.data.flags.writeable and x.indices.flags.writeable):
        return x[start:stop]  # (read-only memory, e.g. mapped: torch takes writable arrays)
    stop = min(stop, x.shape[0])
    ptr = x.indptr[start : stop + 1]
    lo, hi = int(ptr[0]), int(ptr[-1])
    out = sp.csr_matrix((stop - start, x.shape[1]), dtype=x.dtype)
    out.indptr, out.indices, out.data = ptr - lo, x.indices[lo:hi], x.data[lo:hi]
    return out
