"""Lightning DataModule: train/validation split by study or donor (never by cell)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

from .._utils import is_number, is_whole, logger, no_label, repeated
from .._warnings import CellsiftWarning, warn
from ..errors import ConfigError, ResumeError
from .collection import (
    CellCollection,
    ObsFilter,
    StoreLike,
    _as_text,
    _dropna_what,
    column_list,
    filter_texts,
    value_text,
)
from .genes import GeneVocabulary
from .loader import CellLoader, IterableCellDataset
from .sampling import Mode

#: the share of cells without a label from which their leaving training is a warning (below:
#: logged)
UNLABELLED_WARN = 0.01

__all__ = ["CellDataModule", "split_groups"]


#: What to pass where the data module's study_key or split_key names no obs column.
_KEY_FIXES = {
    "study_key": "Pass study_key= the column of studies (or donors) to take positives from, "
    "or study_key=None for data of one study (then validate on the groups of a split_key=, "
    "or pass val_fraction=0).",
    "split_key": "Pass split_key= the column of groups (e.g. donors) to hold out whole for "
    "validation, split_key=None to hold out groups of study_key, or val_fraction=0 to "
    "validate on none.",
}


def split_groups(
    groups: np.ndarray, val_fraction: float, seed: int = 0, n_cells: int | None = None
) -> list[str]:
    """Whole groups (studies, donors) for validation: about ``val_fraction`` of the cells
    (``n_cells``, where cells of no group, which always train, are among them; default:
    the cells of ``groups``).

    The groups are gone through in a seeded random order, and each is taken where it brings
    the validation cells nearer ``val_fraction`` of all (a group larger than twice what is
    still wanted is passed over: one study of most of an atlas is not held out for a tenth);
    at least one group stays for training. Where every group is that large (a few studies),
    the smallest is taken, and the log says the share.
    """
    names, counts = np.unique(np.asarray(groups).astype(str), return_counts=True)
    if len(names) < 2:
        raise ConfigError(
            f"a split by group needs at least 2 groups, found {len(names)}; pass val_fraction=0 "
            "or a split_key with several values (e.g. donor_id)."
        )
    n_cells = int(counts.sum()) if n_cells is None else n_cells
    target = val_fraction * n_cells
    chosen: list[str] = []
    total = 0
    for i in np.random.default_rng(seed).permutation(len(names)):
        if len(chosen) == len(names) - 1:
            break
        if abs(total + counts[i] - target) < abs(total - target):
            chosen.append(str(names[i]))
            total += counts[i]
    if not chosen and target > 0:
        smallest = int(np.argmin(counts))
        chosen, total = [str(names[smallest])], counts[smallest]
        logger.info(
            "val_fraction=%g: every group holds more than twice that share of the cells; the "
            "smallest, %r, validates (%.1f%% of the cells)",
            val_fraction,
            str(names[smallest]),
            100 * total / n_cells,
        )
    return chosen


class CellDataModule(pl.LightningDataModule):
    """Train and validation loaders over a collection, split by ``split_key`` groups.

    Parameters
    ----------
    source
        Stores (paths, glob, manifest, AnnData objects in memory) as for
        :class:`CellCollection`.
    label_key, study_key
        obs columns of cell type and study; batches carry ``y_n`` and ``study_n``.
    split_key
        obs column whose groups are held out whole (default ``study_key``).
    val_groups
        Groups to validate on; default: chosen by seed to make ``val_fraction`` of cells.
    mode, batch_size, block_size, fetch_factor, seed, num_workers
        Training loader options (validation reads sequentially).
    class_scale, study_scale, max_ratio
        Balancing scales and cap of ``mode="weighted"`` (:func:`~cellsift.data.
        balanced_weights`; :class:`~cellsift.data.IterableCellDataset`).
    collection_options
        More :class:`CellCollection` options (``layer``, ``min_genes``, ...).
    labels
        Fixed label vocabulary (e.g. a model's): ``y_n`` codes index it; other labels are -1.
    harmonize_labels
        Read ``label_key`` as Cell Ontology terms: names and ids map to current CL ids (an
        error lists values that are not CL terms).
    coarsen_labels
        A number of studies (e.g. 2; needs ``harmonize_labels`` and ``study_key``): a label
        seen in fewer studies of the data trains as its nearest ancestor among the labels
        that are seen in as many (:meth:`~cellsift.ontology.CellOntology.coarsen_rare`,
        SCimilarity's most viable parent); cells of a label without one are left out, as
        unlabelled cells are. What moved and what was left out is logged.
    pin_memory
        Batches in page-locked memory, so that their copy to the GPU runs beside the step
        (Lightning copies with ``non_blocking``). Default: when the trainer trains on CUDA.
    """

    def __init__(
        self,
        source: list[StoreLike] | StoreLike,
        *,
        genes: GeneVocabulary | Sequence[str] | None = None,
        label_key: str | None = "cell_type_ontology_term_id",
        study_key: str | None = "dataset_id",
        split_key: str | None = None,
        val_groups: Sequence[str | int] | None = None,
        val_fraction: float = 0.1,
        mode: Mode = "block",
        batch_size: int = 1024,
        block_size: int = 64,
        fetch_factor: int = 16,
        class_scale: float = 1e4,
        study_scale: float = 1e6,
        max_ratio: float = 100.0,
        seed: int = 0,
        num_workers: int = 0,
        obs_filter: ObsFilter | None = None,
        collection_options: Mapping[str, Any] | None = None,
        labels: Sequence[str] | None = None,
        harmonize_labels: bool = False,
        coarsen_labels: int | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.genes = genes
        self.label_key, self.study_key = label_key, study_key
        self.split_key = split_key or study_key
        if isinstance(val_groups, str) or not isinstance(val_groups, Iterable | None):
            val_groups = [val_groups]  # one group (not its letters; a number)
        # (groups read as text, as the split column is: a YAML [1015] names donor "1015",
        # and a whole float 1015.0 (a column with gaps) does too)
        # each given group's texts: its own, and a flag's other form (True is also 1; as
        # obs_filter reads a flag written as booleans in one store and 0/1 in another)
        self._given: dict[str, list[str]] | None = None
        if val_groups is not None:
            self._given = {}
            for g in val_groups:
                forms = self._given.setdefault(str(value_text(g)), [])
                forms += [f for f in filter_texts(g) if f not in forms]
        self.val_groups = list(self._given) if self._given is not None else None
        self.val_fraction = val_fraction
        self.seed, self.batch_size = seed, batch_size
        self.loader_options = {
            "mode": mode,
            "batch_size": batch_size,
            "block_size": block_size,
            "fetch_factor": fetch_factor,
            "class_scale": class_scale,
            "study_scale": study_scale,
            "max_ratio": max_ratio,
            "seed": seed,
        }
        self.num_workers = num_workers
        self.obs_filter = obs_filter
        self.collection_options = dict(collection_options or {})
        if "dropna" in self.collection_options:  # (an iterator read once, not spent by
            # the first setup)
            self.collection_options["dropna"] = column_list(
                self.collection_options["dropna"], "collection_options['dropna']"
            )
        self.labels = list(labels) if labels is not None else None
        if self.labels is not None:
            twice = repeated(self.labels)
            if twice:
                raise ConfigError(
                    f"labels name {', '.join(map(repr, twice))} more than once: give each "
                    "label once (a label's code is its place in the list)."
                )
        if mode == "weighted" and not label_key:
            raise ConfigError(
                "mode='weighted' balances the draws over label_key's labels (and study_key's "
                "studies): name label_key, or read the cells with mode='block'."
            )
        self.harmonize_labels = harmonize_labels
        self.coarsen_labels = coarsen_labels
        self.pin_memory = pin_memory
        self.collection: CellCollection | None = None
        self.train: CellCollection | None = None
        self.val: CellCollection | None = None
        self.categories: dict[str, list[str]] = {}
        self._train_loader: CellLoader | None = None
        #: a checkpoint's loader position and validation groups, held until the loader is made
        self._train_loader_state: dict[str, Any] | None = None
        self._held_val_groups: list[Any] | None = None

    def reset(self) -> None:
        """Forget what :meth:`setup` read (the collection, the split's collections, the
        training loader), so that the next ``setup()`` reads the data again with the
        module's settings as they are then (e.g. another gene vocabulary or label set). The
        validation groups it drew stay, and so does a training loader state to restore."""
        self.collection = self.train = self.val = None
        self.categories = {}
        self._train_loader = None

    def setup(self, stage: str | None = None) -> None:
        if self.collection is not None:
            return
        # checked here, not in __init__: the command line builds the module while it parses
        # and would bury the message in its own
        if not is_whole(self.seed, least=0):
            raise ConfigError(f"seed must be a non-negative integer, not {self.seed!r}.")
        if not is_whole(self.batch_size, least=2):
            raise ConfigError(
                "batch_size must be at least 2 for training (BatchNorm normalises over the "
                f"batch), a whole number, not {self.batch_size!r}."
            )
        if not (is_number(self.val_fraction) and 0.0 <= self.val_fraction < 1.0):
            raise ConfigError(
                f"val_fraction is the share of cells to validate on, in [0, 1), not "
                f"{self.val_fraction!r}."
            )
        if not is_whole(self.num_workers, least=0):
            raise ConfigError(
                f"num_workers counts loader processes (0: read in the training process), not "
                f"{self.num_workers!r}."
            )
        if self.coarsen_labels is not None:
            if not is_whole(self.coarsen_labels, least=1):
                raise ConfigError(
                    "coarsen_labels is the number of studies a label must be seen in (1 or "
                    f"more), not {self.coarsen_labels!r}."
                )
            lacking = [
                what
                for what, ok in (
                    ("harmonize_labels=True (it moves Cell Ontology ids)", self.harmonize_labels),
                    ("a study_key (it counts studies)", self.study_key),
                )
                if not ok
            ]
            if lacking:
                raise ConfigError(
                    f"coarsen_labels={self.coarsen_labels} needs {' and '.join(lacking)}."
                )
        options = dict(self.collection_options)
        # the label column is always required; columns dropna names too
        dropna = [self.label_key] if self.label_key else []
        extra = options.pop("dropna", None) or ()
        extra = [extra] if isinstance(extra, str) else list(extra)  # (one column as text)
        dropna += [c for c in extra if c not in dropna]
        for own in ("obs_filter", "genes", "source"):
            if own in options:
                raise ConfigError(
                    f"collection_options has {own}, which the data module takes itself: pass "
                    f"CellDataModule({own}=...) (data.init_args.{own})."
                )
        allowed = set(inspect.signature(CellCollection).parameters) - {
            "source",
            "genes",
            "obs_filter",
        }
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(
                f"collection_options has {unknown}, which CellCollection does not take; it "
                f"takes {sorted(allowed)}."
            )
        coll = CellCollection(
            self.source,
            genes=self.genes,
            obs_filter=self.obs_filter,
            dropna=dropna,
            **options,
        )
        self.collection = coll
        # (among the cells the other filters keep: those only the label leaves out)
        what = _dropna_what(self.label_key) if self.label_key else ""
        unlabelled = coll.removed_alone.get(what, 0)
        total = coll.n_obs + unlabelled
        if unlabelled:
            said = (
                f"{unlabelled:,} of {total:,} cells ({unlabelled / total:.1%}) have no label in "
                f"{self.label_key!r} (missing, blank or 'unknown') and are left out of "
                "training and validation; label them to train on them."
            )
            if unlabelled >= UNLABELLED_WARN * total:  # (each rank reads the same: said once)
                rank_zero_warn(said, category=CellsiftWarning)
            else:
                logger.info(said)
        for what, key in (("study_key", self.study_key), ("split_key", self.split_key)):
            store = next((s for s in coll.stores if key and key not in s.obs_columns), None)
            if store is not None:  # (study_key's default names CELLxGENE's column)
                raise ConfigError(
                    f"{what}={key!r} names no obs column of {store.path}, which has "
                    f"{', '.join(store.obs_columns)}. {_KEY_FIXES[what]}"
                )
        if self.label_key and self.harmonize_labels:
            from ..ontology import OntologyError, load_cell_ontology

            raw = coll.codes(self.label_key)[1]  # the distinct labels, missing ones left out
            try:
                harmonized = self._harmonized(load_cell_ontology(), raw)
            except OntologyError as err:
                raise OntologyError(
                    f"{self.label_key!r}: {err} For labels outside the Cell Ontology (cell "
                    "lines, a lab's own annotation), read them as they are: "
                    "harmonize_labels=False, with a model made with ontology_aware=False "
                    "(`cellsift fit`: --data.init_args.harmonize_labels false "
                    "--model.ontology_aware false)."
                ) from None
            if self.coarsen_labels is not None:
                coll = self.collection = self._coarsened(coll, harmonized)
            else:
                coll.map_values(self.label_key, harmonized)
        if self.label_key:
            codes, present = coll.codes(self.label_key)
            self.categories["y_n"] = present
            self._check_labels(codes, present)
        if self.study_key:
            self.categories["study_n"] = coll.codes(self.study_key)[1]
        if self.split_key is None and self.val_groups is not None:
            raise ConfigError(
                f"val_groups {self.val_groups} are groups of a split_key, and none is set "
                "(split_key=None and study_key=None): pass split_key= the obs column they "
                "are values of."
            )
        if self.split_key is None and self.val_fraction > 0:
            warn(
                f"val_fraction={self.val_fraction:g} holds out no cells: validation holds out "
                "whole groups of split_key, and none is set (split_key=None and "
                "study_key=None), so every cell trains. Pass split_key= a column of groups "
                "(e.g. donor_id) to validate, or val_fraction=0."
            )
        if self.split_key is None or (self.val_groups is None and self.val_fraction <= 0):
            self.train, self.val = coll, None
            return
        # as text, whole floats as ints (obs_filter's reading: donor 1015.0 is "1015")
        values = _as_text(coll.obs_column(self.split_key))
        known = ~no_label(values)  # cells without a group ("unknown", too) stay in training
        groups = np.where(known, values, "").astype(str)
        if self.val_groups is None:  # (given ones were read as text when the module was made)
            self.val_groups = [
                str(g)
                for g in split_groups(groups[known], self.val_fraction, self.seed, len(groups))
            ]
        held = set(groups[known])
        wanted = self._given if self._given is not None else {g: [g] for g in self.val_groups}
        forms = {g: [f for f in texts if f in held] for g, texts in wanted.items()}
        absent = [g for g in wanted if not forms[g]]
        if absent:
            shown = sorted(held)
            raise ConfigError(
                f"val_groups {absent} are not groups of {self.split_key!r} among the cells "
                f"kept (the data and filters: obs_filter, dropna, min_genes), which hold "
                f"{', '.join(shown[:10])}{', ...' if len(shown) > 10 else ''}."
            )
        # the groups held out, as the column holds them (1 given for a flag read as True; a
        # later setup, of other data, matches the given groups again)
        self.val_groups = list(dict.fromkeys(f for texts in forms.values() for f in texts))
        is_val = np.isin(groups, self.val_groups) & known
        if is_val.all() or not is_val.any():
            raise ConfigError(
                f"val_groups {self.val_groups} leave no training or no validation "
                f"cells in {self.split_key!r}."
            )
        self.train = coll.subset(np.flatnonzero(~is_val))
        self.val = coll.subset(np.flatnonzero(is_val))
        logger.info(
            "split by %s: %d training cells, %d validation cells (%s)",
            self.split_key,
            self.train.n_obs,
            self.val.n_obs,
            ", ".join(self.val_groups),
        )

    def _coarsened(self, coll: CellCollection, harmonized: dict[str, str]) -> CellCollection:
        """``coll`` with its labels read as ``harmonized`` and then coarsened
        (``coarsen_labels``): the cells of labels without a viable ancestor left out."""
        from ..ontology import load_cell_ontology

        assert self.label_key and self.study_key
        cl = load_cell_ontology()
        coll.map_values(self.label_key, harmonized)
        labels, names = coll.codes(self.label_key)
        studies, study_names = coll.codes(self.study_key)
        # one entry per (label, study) the data holds, what coarsen_rare counts; of current
        # terms (a model's label that CL has deprecated since stays as it is)
        pairs = np.unique(np.stack([labels, studies], axis=1), axis=0)
        current = np.array(
            [name in cl.terms and not cl.is_deprecated(name) for name in names], dtype=bool
        )
        pairs = pairs[(pairs[:, 0] >= 0) & current[np.maximum(pairs[:, 0], 0)]]
        moved, report = cl.coarsen_rare(
            [names[i] for i in pairs[:, 0]],
            [study_names[i] if i >= 0 else None for i in pairs[:, 1]],
            min_studies=int(self.coarsen_labels),  # type: ignore[arg-type]
        )
        to = {names[i]: m for i, m in zip(pairs[:, 0], moved, strict=True)}
        n_cells = np.bincount(labels[labels >= 0], minlength=len(names))
        for label, parent in sorted(report.moved.items()):
            logger.info(
                "coarsen_labels: %s (%d cells, %d studies) trains as %s",
                label,
                n_cells[names.index(label)],
                report.studies[label],
                parent,
            )
        dropped = sorted(report.dropped)
        coll.map_values(
            self.label_key,
            {raw: to.get(term) or term for raw, term in harmonized.items()},
        )
        if not dropped:
            return coll
        gone = np.isin(labels, [names.index(label) for label in dropped])
        if not (labels[~gone] >= 0).any():  # (no labelled cell left: no triplet to train)
            n_studies = int((np.unique(studies) >= 0).sum())
            raise ConfigError(
                f"coarsen_labels={self.coarsen_labels} leaves out every labelled cell: none of "
                f"the {len(dropped)} labels, nor an ancestor among them, is seen in "
                f"{self.coarsen_labels} of the data's {n_studies} studies ({self.study_key!r}). "
                "Pass a lower coarsen_labels, or none."
            )
        warn(
            f"coarsen_labels={self.coarsen_labels}: {int(gone.sum()):,} cells of "
            f"{len(dropped)} label{'s' if len(dropped) > 1 else ''} seen in fewer studies "
            f"and without such an ancestor among the labels are left out "
            f"({', '.join(dropped[:5])}{', ...' if len(dropped) > 5 else ''})."
        )
        return coll.subset(np.flatnonzero(~gone))

    def _harmonized(self, cl: Any, raw: list[str]) -> dict[str, str]:
        """CL ids of the data's labels ``raw``; with fixed ``labels`` (a model's, saved under
        perhaps an older Cell Ontology), a label that is one of them, or names the same
        current term as one of them, becomes that one: a model fine-tuned after a CL
        release deprecated one of its terms still trains its own label."""
        fixed = set(self.labels or ())
        rest = [r for r in raw if r not in fixed]
        # a value naming one of the labels as written (a deprecated term, in another
        # spelling; also one CL left without a successor) trains that label; the others
        # train the label of the current term they name
        named = {r: cl.resolve(r) for r in rest}
        todo = [r for r in rest if named[r] not in fixed]
        ids = dict(zip(todo, cl.harmonize(todo), strict=True))
        own: dict[str, str] = {}  # current id -> the model's label
        for label in self.labels or ():  # (one that names no current term: matched as written)
            term = cl.term(label)
            # (where the model holds a current term and deprecated ones now replaced by it,
            # the data's cells of that term train the current one, whatever the order)
            if term is not None and (term not in own or label == term):
                own[term] = label
        return {
            r: r if r in fixed else named[r] if named[r] in fixed else own.get(ids[r], ids[r])
            for r in raw
        }

    def _check_labels(self, codes: np.ndarray, present: list[str]) -> None:
        """Warn where labels will not train: cells whose label the fixed ``labels`` (a
        model's) lack train unlabelled; with fewer than two labels no triplet has a
        negative, and only the reconstruction trains."""
        known = set(self.labels) if self.labels is not None else set(present)
        outside = [i for i, lab in enumerate(present) if lab not in known]
        if outside:
            n = int(np.isin(codes, outside).sum())
            warn(
                f"{n:,} of {len(codes):,} cells carry labels the model does not have "
                f"({', '.join(repr(present[i]) for i in outside[:5])}"
                f"{', ...' if len(outside) > 5 else ''}); they train unlabelled "
                "(reconstruction only). Train a model built for these labels "
                "(MetricModel.from_collection) to learn them."
            )
        usable = len(present) - len(outside)
        if usable < 2:
            warn(
                f"the training cells hold {usable} usable label"
                f"{'' if usable == 1 else 's'} in {self.label_key!r}: triplets need a "
                "negative of another label, so only the reconstruction trains."
            )
            return
        cells = np.bincount(codes[codes >= 0], minlength=len(present))
        cells[outside] = 0
        if cells.max() < 2:
            warn(
                f"no label in {self.label_key!r} has two cells (its {usable:,} labels have one "
                "each): triplets need a positive of the anchor's label, so only the "
                f"reconstruction trains. Is {self.label_key!r} a column of cell names rather "
                "than cell types?"
            )

    @property
    def gene_vocabulary(self) -> GeneVocabulary:
        """The genes batches carry (the given ones, else the first store's)."""
        self.setup()
        assert self.collection is not None
        return self.collection.genes

    @property
    def label_set(self) -> list[str]:
        """The labels ``y_n`` codes index: the fixed ``labels``, else those of the data."""
        self.setup()
        return list(self.labels) if self.labels is not None else self.categories.get("y_n", [])

    def _dataset(self, coll: CellCollection, **overrides: Any) -> IterableCellDataset:
        opts = {**self.loader_options, **overrides}
        categories = dict(self.categories)
        if self.label_key:
            categories["y_n"] = self.label_set
        return IterableCellDataset(
            coll,
            label_key=self.label_key,
            study_key=self.study_key,
            categories=categories,
            **opts,
        )

    def train_dataloader(self) -> CellLoader:
        assert self.train is not None, "call setup() first"
        if self._train_loader is None:  # one loader for the whole run: it carries the position
            world = self.trainer.world_size if self.trainer is not None else 1
            # no batch of one cell: BatchNorm cannot normalise it in training
            ds = self._dataset(self.train, drop_last=world > 1, min_batch=2)
            loader = CellLoader(ds, num_workers=self.num_workers, pin_memory=self._pins())
            if len(loader) == 0:  # (said before an empty epoch; none kept)
                n = self.train.n_obs
                if world == 1:  # (a batch holds 2 cells at least: BatchNorm)
                    raise ConfigError(
                        f"{'1 training cell makes' if n == 1 else f'{n} training cells make'} "
                        "no batch of 2 cells or more, which training needs: keep more cells "
                        "for training (split_key, val_groups, val_fraction, obs_filter)."
                    )
                lower = (
                    f"Lower batch_size (to {n // world} or less), or train"
                    if n // world >= 2  # (a batch holds 2 cells at least)
                    else "Train"
                )
                raise ConfigError(
                    f"the {n:,} training cells make no batch on each of the {world} processes: "
                    f"each takes whole batches of batch_size={self.batch_size} from its share "
                    f"of an epoch's cells (the rest is left out). {lower} on fewer devices."
                )
            self._train_loader = loader
            if self._train_loader_state is not None:  # resuming: the checkpoint's position
                self._train_loader.load_state_dict(self._train_loader_state)
                self._train_loader_state = None
        return self._train_loader

    # Lightning checkpoints the data module's state and restores it before the model asks for
    # its loader. The loader's own state also goes into the fit loop's part of the checkpoint,
    # but Lightning applies that only to loaders it creates after the loops are restored, and
    # a model that reads ``trainer.estimated_stepping_batches`` in ``configure_optimizers``
    # (the cosine schedule) makes Lightning create the loader before: the position would be
    # lost and the resumed epoch would start over from its first batch.
    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (epoch, batches consumed), and the validation
        groups, for checkpoints; before the loader is made, the position a checkpoint gave
        (:meth:`load_state_dict`), which it will start from."""
        if self._train_loader is not None:
            return {
                "train": self._train_loader.state_dict(),
                "val_groups": copy.copy(self.val_groups),
            }
        if self._train_loader_state is not None:  # (a copy: the state to resume stays as given)
            held = self.val_groups if self.val_groups is not None else self._held_val_groups
            return {"train": copy.deepcopy(self._train_loader_state), "val_groups": copy.copy(held)}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training loader where :meth:`state_dict` was taken; a run that held
        out other validation groups than this module's is refused, naming them."""
        state = state_dict.get("train")
        if state is None:
            return
        held = state_dict.get("val_groups")
        # (as sets: the groups' order does not change the split)
        if held is not None and self.val_groups is not None and set(held) != set(self.val_groups):
            raise ResumeError(
                f"the checkpoint's run validated on {self.split_key} {list(held)}, and this "
                f"data module holds out {self.val_groups}: pass val_groups={list(held)} "
                "(data.init_args.val_groups) to go on with the run's split."
            )
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._train_loader_state = copy.deepcopy(dict(state))
            self._held_val_groups = None if held is None else list(held)

    def val_dataloader(self) -> CellLoader | list[Any]:
        if self.val is None:
            return []
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.val.n_obs < world:  # (a process without validation cells stops every other)
            raise ConfigError(
                f"the {self.val.n_obs} validation cells are fewer than the {world} processes, "
                "which validate on a share each: hold out groups of at least "
                f"{world} cells (val_groups, val_fraction), or train on fewer devices."
            )
        ds = self._dataset(self.val, mode="sequential", fetch_factor=1)
        return CellLoader(ds, num_workers=self.num_workers, pin_memory=self._pins())

    def _pins(self) -> bool:
        """Whether loaders pin their batches: ``pin_memory``, else whether the trainer
        (when there is one) trains on CUDA."""
        if self.pin_memory is not None:
            return self.pin_memory
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"
