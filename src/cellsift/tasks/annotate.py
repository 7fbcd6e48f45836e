"""kNN annotation against a CellIndex: vectorised voting, confidence, abstention, ontology.

Each query cell's ``k`` nearest reference cells vote for their labels (weighted by
``1 - distance / 2``, at least 1e-6, when ``weighted``: a neighbour opposite the query
still votes, as a sliver). Votes are counted with one ``bincount`` over all
queries. Confidence statistics per cell: the winning label's share of the votes, its margin
over the second label, the distance to the nearest reference cell and the mean distance to
the ``k`` that vote.

Abstention: a query is ``unknown`` when its neighbours are farther than
``distance_threshold``, or when the winner has no more than ``min_support`` of the votes. The
distance is by default the mean over the ``k`` voting neighbours (``abstain_on="mean"``):
one stray reference cell next to a population the reference lacks (a mislabelled cell, a
doublet) then does not vouch for the whole population, as it does with the nearest cell's
distance (``abstain_on="nearest"``). :meth:`KNNAnnotator.calibrate` sets the threshold to a
``quantile`` of the same statistic on cells of known types. Best are held-out cells
(labelled cells neither trained on nor indexed): they are exchangeable with new cells of
known types, so (split-conformal) at most about ``1 - quantile`` of those abstain. Without
held-out cells the reference is its own calibration set (each sampled cell's nearest *other*
reference cells, or nearest of other studies with ``group_key``); a model pulls the cells it
trained on together, so that threshold is lower and abstains more.

Ontology-aware mode: votes also count for every Cell Ontology ancestor of the voted label
(within the terms that are ancestors of the reference labels); the call is the most specific
term holding more than ``min_support`` of the votes (default: a strict majority). Cells whose
neighbours split between two T-cell subtypes (CD4 and CD8 alpha-beta T cells) are then
called by their nearest common ancestor ("mature alpha-beta T cell") rather than either
subtype at random. Several terms, none an ancestor of another, may qualify: below a
majority, terms of several lineages; at a majority too, where the ontology joins lineages
below the root (a monocyte's vote counts for both "mononuclear phagocyte" and "myeloid
cell"). Of the most specific qualifying terms (none of whose descendants qualifies), the
best supported is called; on an even vote, a reference label before a coarser term, and
among either, the first by its id.

Safelists and blocklists restrict the reference by filtering the index (nothing is deleted).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from .._utils import (
    as_float,
    import_optional,
    is_number,
    is_whole,
    logger,
    no_label,
    wrong_kind,
)
from .._warnings import CellsiftWarning, warn
from ..data.collection import _as_text, value_text
from ..errors import ConfigError, DataError
from ..ontology import OntologyError, load_cell_ontology
from .index import CellIndex, CellIndexError, _as_list, _filter_text, as_embeddings, check_k

__all__ = ["UNKNOWN", "KNNAnnotator"]

UNKNOWN = "unknown"
_UNSET: Any = object()  # (no calibration)
#: Shares are sums of float weights over a sum of them: an even split can come out a hair
#: above one half. A call needs its share to pass ``min_support`` by more than that.
_ROUNDING = 1e-12


@dataclass
class _Labels:
    terms: list[str]  # label vocabulary (reference labels, then added ancestors)
    codes: np.ndarray  # per indexed cell: code into terms (-1: none)
    n_reference: int  # the first n_reference terms are reference labels


def label_lists(*lists: Any) -> tuple[Any, ...]:
    """Safelists and blocklists as lists, read once (an iterator read for its length, or
    by one step of several, would be empty for the next); None and a single string (an
    error where they are read) as they are."""
    return tuple(v if v is None or isinstance(v, str) else list(v) for v in lists)


def calibration_conflict(by: str, on: str) -> ConfigError:
    """The error for a threshold asked of both groups of the reference (``by``, as the caller
    names it) and held-out cells (``on``)."""
    return ConfigError(
        f"{by} groups the reference cells that calibrate without {on}; held-out cells ({on}) "
        "are not in the reference: pass one of them."
    )


def without_abstention(option: str, off: str) -> ConfigError:
    """The error for ``option`` (one that sets the abstention threshold) given with
    abstention off (``off``: as the caller names it)."""
    return ConfigError(
        f"{option} sets the abstention threshold, which {off} leaves out: pass one of them."
    )


def _as_given(safelist: Any, blocklist: Any, filter: Any) -> tuple[Any, Any, Any]:
    """A reference selection kept to be built again later: the lists, and a mapping filter's
    values, copied as lists (one its caller changes later, or an iterator, stays as read)."""
    safelist, blocklist = label_lists(safelist, blocklist)
    if isinstance(filter, Mapping):
        filter = {c: v if (vs := _as_list(v)) is None else vs for c, v in filter.items()}
    return safelist, blocklist, filter


class KNNAnnotator:
    """Annotate query embeddings by their nearest reference cells in ``index``.

    Parameters
    ----------
    index
        A :class:`CellIndex` whose metadata hold ``label_key``.
    label_key
        Metadata column of reference labels (Cell Ontology ids for ``ontology_aware``).
    k, weighted
        Neighbours that vote, and whether nearer ones count more. An even vote goes to
        the label first in sorted order (scikit-learn's rule); in ontology mode, to a
        reference label before a coarser term.
    ontology_aware
        Propagate votes to ancestors and call the most specific well-supported term.
    min_support
        A call needs more than this share of the votes (else ``unknown``; in ontology mode,
        a coarser term): the default 0.5 asks for a strict majority, so neighbours split
        evenly between two subtypes give their common ancestor.
    distance_threshold
        Distance beyond which a cell is ``unknown`` (see :meth:`calibrate`; None: never
        abstain on distance).
    abstain_on
        The distance compared with the threshold: ``"mean"`` over the ``k`` voting
        neighbours (robust to single stray reference cells) or the ``"nearest"`` one's.
    """

    def __init__(
        self,
        index: CellIndex,
        *,
        label_key: str = "cell_type_ontology_term_id",
        k: int = 50,
        weighted: bool = True,
        ontology_aware: bool = False,
        min_support: float = 0.5,
        distance_threshold: float | None = None,
        abstain_on: Literal["mean", "nearest"] = "mean",
    ) -> None:
        if not isinstance(index, CellIndex):
            opened = "load the index first, CellIndex.load(path)"
            raise wrong_kind("index", "a CellIndex (CellIndex.load(path))", index, opened)
        check_k(k)
        if k > index.n_cells:  # every call counts the whole reference's votes
            warn(
                f"k={k} neighbours, and the reference holds {index.n_cells:,} cells: every "
                "query is voted on by all of them (weighted by distance where weighted), so "
                "its call mostly follows the reference's make-up. Pass a k well below that."
            )
        if not 0.0 <= min_support < 1.0:
            raise CellIndexError(
                f"min_support must be in [0, 1) (a call needs more than that share of the "
                f"votes), not {min_support!r}."
            )
        if abstain_on not in ("mean", "nearest"):
            raise ValueError(f"abstain_on must be 'mean' or 'nearest', not {abstain_on!r}.")
        if not index.metadata_columns:
            raise CellIndexError(
                f"the index holds no metadata, so no labels ({label_key!r}) to annotate "
                "with: build it with the cells' metadata (CellIndex.build(embeddings, "
                "metadata), or cellsift index from an embeddings store of cellsift embed, "
                "which keeps the obs columns)."
            )
        if label_key not in index.metadata_columns:
            raise CellIndexError(
                f"the index metadata have no {label_key!r} column; it has {index.metadata_columns}."
            )
        self.index, self.label_key, self.k = index, label_key, k
        self.weighted, self.ontology_aware = weighted, ontology_aware
        self.min_support = min_support
        self.distance_threshold = distance_threshold  # (checked, and set as given)
        self.abstain_on = abstain_on
        self._load_labels()

    @property
    def distance_threshold(self) -> float | None:
        """The distance beyond which a call is ``unknown`` (None: no abstention by
        distance); :meth:`calibrate` sets it, or set it by hand."""
        return self._distance_threshold

    @distance_threshold.setter
    def distance_threshold(self, value: float | None) -> None:
        if value is not None and not is_number(value):
            raise ConfigError(
                f"distance_threshold is a distance beyond which a call is unknown (a number; "
                f"calibrate() sets one), or None for no abstention, not {value!r}."
            )
        self._distance_threshold = None if value is None else as_float(value)
        #: the reference selection (safelist, blocklist, filter, as given: _as_given)
        #: :meth:`calibrate` set the threshold on; unset, a threshold given as a number
        #: (by hand: no selection to hold queries to)
        self._calibrated_on: Any = _UNSET

    def __repr__(self) -> str:
        threshold = self.distance_threshold
        abstain = "no abstention" if threshold is None else f"unknown beyond {threshold:.4g}"
        return (
            f"KNNAnnotator(k={self.k}, {len(self._labels.terms)} labels in "
            f"{self.label_key!r} of {self.index.n_cells:,} cells, "
            f"{'ontology-aware' if self.ontology_aware else 'plain'} votes, {abstain} "
            f"({self.abstain_on} distance))"
        )

    def _load_labels(self) -> None:
        """Read the reference labels of every indexed cell (and in ontology mode their
        ancestors)."""
        self._labels = self._read_labels()
        # the reference's own label values, each to the term it names (ontology mode)
        self._term_of = {t: t for t in self._labels.terms}
        self._up: np.ndarray | None = None
        if self.ontology_aware:
            self._extend_with_ancestors()
        else:
            self._warn_of_spellings()

    def _warn_of_spellings(self) -> None:
        """Warn where plain votes split: reference labels that name one Cell Ontology term
        (its id in some studies, its name in others) are counted apart, so that neither
        may reach a majority; the calls would then name that term anyway."""
        cl = load_cell_ontology()
        spellings: dict[str, list[str]] = {}
        for label in self._labels.terms:
            term = cl.term(label)
            if term is not None:
                spellings.setdefault(term, []).append(label)
        shared = [names for names in spellings.values() if len(names) > 1]
        if not shared:
            return
        listed = "; ".join(" and ".join(repr(n) for n in names) for names in shared[:3])
        warn(
            f"the reference's {self.label_key!r} spells {len(shared)} cell "
            f"type{'s' if len(shared) > 1 else ''} more than one way ({listed}"
            f"{'; ...' if len(shared) > 3 else ''}): a type's spellings name one Cell "
            "Ontology term, but plain votes count each apart, so its votes split and its "
            "calls may fall short of a majority. Pass ontology_aware=True (cellsift annotate: "
            "without --no-ontology), or write the labels one way (CellOntology.harmonize) "
            "in the reference."
        )

    def _sync_labels(self) -> None:
        """Read the labels again where the index grew since (:meth:`CellIndex.add`): the
        new cells vote too."""
        if len(self._labels.codes) != self.index.n_cells:
            logger.info(
                "KNNAnnotator: the index holds %d cells, %d when the labels were read; "
                "reading them again",
                self.index.n_cells,
                len(self._labels.codes),
            )
            self._load_labels()

    def _read_labels(self) -> _Labels:
        """One pass over the label column (and cell_index): codes per indexed cell.

        Cells without a label (missing, or ``unknown`` as CELLxGENE writes it) get code -1:
        they can be neighbours but cast no vote.
        """
        tbl = self.index._dataset().to_table(columns=[self.label_key, "cell_index"])
        # as categories (a dictionary column is one already; its nulls stay missing): the
        # labels are decided once per category, not once per cell
        # (whole numbers with missing values stay whole: label 4, not 4.0)
        col = tbl.column(self.label_key).to_pandas(integer_object_nulls=True)
        cat = col.array if isinstance(col.dtype, pd.CategoricalDtype) else pd.Categorical(col)
        # categories no cell holds (left by a filter of the reference) are no labels
        cat = cat.remove_unused_categories()
        # as the collection reads a label column: whole floats (a column of ints with
        # missing values, written as floats) as ints, "4", not "4.0"
        names = pd.Index(_as_text(np.asarray(cat.categories)).astype(str))
        ok = ~no_label(names)
        # in sorted order, numbers as numbers (2 before 10), as scikit-learn's classes: an
        # even vote goes to the first
        numbers = pd.api.types.is_numeric_dtype(cat.categories.dtype)
        order = np.argsort(np.asarray(cat.categories if numbers else names), kind="stable")
        terms = list(dict.fromkeys(names[order][ok[order]]))  # (1 and 1.0 read alike: once)
        if len(terms) == 0:
            raise CellIndexError(
                f"the index metadata's {self.label_key!r} holds no labels (all missing or "
                "'unknown'): index labelled reference cells, or pass another label_key."
            )
        place = {t: i for i, t in enumerate(terms)}
        lookup = np.full(len(names) + 1, -1, dtype=np.int32)  # the last slot: missing (-1)
        lookup[:-1][ok] = [place[t] for t in names[ok]]
        codes = np.full(self.index.n_cells, -1, dtype=np.int32)
        codes[tbl.column("cell_index").to_numpy()] = lookup[np.asarray(cat.codes)]
        return _Labels([str(t) for t in terms], codes, len(terms))

    def _extend_with_ancestors(self) -> None:
        cl = load_cell_ontology()
        refs = self._labels.terms
        # labels that name one term (an id and its name, a deprecated id and its successor)
        # vote as that one term
        try:
            harmonized = cl.harmonize(refs)
        except OntologyError as err:
            raise OntologyError(
                f"{err} Ontology-aware annotation needs Cell Ontology labels; to annotate "
                "with these labels as they are, pass ontology_aware=False."
            ) from None
        self._term_of = dict(zip(refs, harmonized, strict=True))
        # in the order of their ids, whatever the reference's spelling (an id, a name): an
        # even vote goes to the first by its id
        ids = sorted(set(harmonized))
        pos = {t: i for i, t in enumerate(ids)}
        to_term = np.asarray([pos[t] for t in harmonized], dtype=np.int32)
        codes = self._labels.codes
        codes = np.where(codes >= 0, to_term[np.maximum(codes, 0)], -1).astype(np.int32)
        extra = sorted({a for t in ids for a in cl.ancestors(t)} - set(ids))
        terms = ids + extra
        # up[l, m]: a vote for l also counts for m (m is l or an ancestor of l)
        pos = {t: i for i, t in enumerate(terms)}
        up = np.eye(len(terms), dtype=np.float32)
        for i, t in enumerate(terms):
            for a in cl.ancestors(t):
                if a in pos:
                    up[i, pos[a]] = 1.0
        self._labels = _Labels(terms, codes, len(ids))
        self._up = up

    # -- calibration --------------------------------------------------------------------------
    def calibrate(
        self,
        embeddings: Any = None,
        *,
        quantile: float = 0.99,
        n_cells: int = 5_000,
        group_key: str | None = None,
        seed: int = 0,
        safelist: Sequence[str] | None = None,
        blocklist: Sequence[str] | None = None,
        filter: Any = None,
    ) -> float:
        """Set the abstention threshold from cells of known types; returns it.

        ``embeddings``: held-out cells (of the reference's types, not in the index and not
        trained on; e.g. a random tenth of the labelled cells kept out of training). Each is
        searched as a query would be (with the index's own search parameters: many queries
        unlike the reference are searched at more lists, whose distances can only be the
        same or nearer); the threshold is the split-conformal ``quantile`` of
        their distances (``abstain_on``: mean over the ``k`` nearest reference cells, or the
        nearest one's; the ``ceil((n + 1) q)``-th smallest of n), so new cells of known
        types abstain with probability at most ``1 - quantile``.

        Without ``embeddings``: a sample of ``n_cells`` labelled reference cells, each scored by its
        ``k`` nearest *other* reference cells, or with ``group_key`` (a study or donor column)
        by its nearest cells of other groups (leave-one-group-out: new studies sit farther
        than a study's cells from each other). Trained-on cells understate new cells'
        distances; prefer held-out cells where there are any.

        ``safelist``, ``blocklist`` and ``filter`` select the reference cells, as
        :meth:`annotate` takes them: calibrate with the selection the queries will be
        annotated against (a smaller reference sits farther from the queries; the cells
        sampled without ``embeddings`` come from the selection too). :meth:`annotate` with
        another selection than the threshold's warns.
        """
        self._sync_labels()
        given = _as_given(safelist, blocklist, filter)  # (an iterator: read once, here)
        expr = self._reference_filter(*given)
        if not 0.0 < quantile < 1.0:
            raise ConfigError(f"quantile must be in (0, 1), not {quantile}.")
        if embeddings is None and not is_whole(n_cells, least=1):
            raise ConfigError(
                f"n_cells is how many reference cells to calibrate on, at least 1, not {n_cells!r}."
            )
        if embeddings is not None and group_key is not None:
            raise calibration_conflict("group_key", "embeddings")
        if embeddings is not None:
            q = as_embeddings(embeddings)
            if q.ndim != 2:
                raise DataError(
                    f"calibration embeddings must be a cells x dims array, not of shape {q.shape}."
                )
            if len(q) == 0:
                raise DataError(
                    "no calibration cells: pass held-out labelled cells of the reference's "
                    "types, or none at all (the reference then calibrates itself)."
                )
            other = np.concatenate(
                [
                    self._statistic(
                        self.index.search(q[s : s + 16_384], self._k_used, filter=expr).distances
                    )
                    for s in range(0, len(q), 16_384)
                ]
            )
            other = other[np.isfinite(other)]
        else:
            other = self._reference_scores(n_cells, group_key, seed, expr)
        threshold = _conformal_quantile(np.sort(other), quantile)
        if np.isnan(threshold):  # the annotator keeps its threshold
            raise DataError(
                f"quantile {quantile} needs at least {_needed(quantile)} calibration cells, "
                f"got {len(other)}: pass more cells, a lower quantile (quantile=), or set "
                "no threshold (no calls of unknown by distance: leave calibrate out; "
                "tl.annotate: abstain=False)."
            )
        self.distance_threshold = threshold
        # (after the threshold, whose setting unsets it) the selection as given, built
        # again as the index's columns are typed when compared: added cells may widen a
        # column's type, which types a filter's values
        self._calibrated_on = given
        logger.info(
            "KNNAnnotator: distance threshold %.4f (quantile %.3f of %d cells)",
            self.distance_threshold,
            quantile,
            len(other),
        )
        return self.distance_threshold

    def _reference_scores(
        self, n_cells: int, group_key: str | None, seed: int, expr: Any = None
    ) -> np.ndarray:
        """Distances to the nearest other (or other-group) reference cells, for a sample
        (of the cells ``expr`` selects, searched among them)."""
        rng = np.random.default_rng(seed)
        k = self._k_used
        chosen = np.arange(self.index.n_cells) if expr is None else self.index.select(expr)
        pool = chosen[self._labels.codes[chosen] >= 0]  # (cells of known types: labelled ones)
        among = "" if expr is None else " that the selection (safelist, blocklist, filter) keeps"
        if len(pool) < (2 if group_key is None else 1):
            raise CellIndexError(
                f"calibrating on the reference scores its labelled cells against the other "
                f"reference cells{among}, and there {'is' if len(pool) == 1 else 'are'} "
                f"{len(pool)}: pass held-out cells (calibrate(embeddings)), or select more."
            )
        rows = np.sort(rng.choice(pool, min(n_cells, len(pool)), replace=False))
        if group_key is None:
            res = self.index.search(np.asarray(self.index.embeddings[rows]), k + 1, filter=expr)
            # the nearest hit is normally the cell itself: drop it (else the farthest hit)
            hit = res.indices == rows[:, None]
            drop = np.where(hit.any(1), hit.argmax(1), k)
            others = ~(np.arange(k + 1)[None, :] == drop[:, None])
            other = self._statistic(res.distances[others].reshape(len(rows), k))
        else:
            # the groups as the metadata holds them (numbers, booleans, text): compared as
            # such, not as text, which Arrow and pandas spell differently (1015 / 1015.0).
            # Cells without a group sit out; they are others to every group.
            codes, values = pd.factorize(self.index.metadata_rows(rows, [group_key])[group_key])
            # each group's cells among those selected, read once: a group without others
            # beside it (one group) has none to leave it out against
            sizes = self.index.metadata_rows(chosen, [group_key])[group_key].value_counts()
            other = np.full(len(rows), np.nan)
            pa = import_optional("pyarrow")
            pc = import_optional("pyarrow.compute")
            field = pc.field(group_key)
            for c, g in enumerate(values):
                mine = codes == c
                value = pa.scalar(g.item() if isinstance(g, np.generic) else g)
                others = (field != value) | field.is_null()
                others = others if expr is None else others & expr
                if sizes.get(g, 0) == len(chosen):
                    continue
                res = self.index.search(
                    np.asarray(self.index.embeddings[rows[mine]]), k, filter=others
                )
                other[mine] = self._statistic(res.distances)
            if np.isnan(other).all():
                raise CellIndexError(
                    f"calibrating by {group_key!r} needs at least two groups in the reference"
                    f"{among}."
                )
        return np.asarray(other[np.isfinite(other)], dtype=np.float64)

    @property
    def _k_used(self) -> int:
        """Neighbours the abstention statistic reads."""
        return self.k if self.abstain_on == "mean" else 1

    def _statistic(self, distances: np.ndarray) -> np.ndarray:
        """The abstention statistic of each row of sorted neighbour distances."""
        if self.abstain_on == "nearest":
            return np.asarray(distances[:, 0], dtype=np.float64)
        return _mean_distance(distances)

    # -- annotation ---------------------------------------------------------------------------
    def annotate(
        self,
        embeddings: Any,
        *,
        safelist: Sequence[str] | None = None,
        blocklist: Sequence[str] | None = None,
        filter: Any = None,
        batch_size: int = 16_384,
    ) -> pd.DataFrame:
        """Labels and confidence of query ``embeddings`` (one row per query cell).

        Columns: ``label`` (a reference label, an ancestor in ontology mode, or
        ``unknown``), ``label_id`` and ``label_name`` (the Cell Ontology id and name where
        the label names a CL term: an id in any form, a name, a synonym; else the label),
        (plain votes count labels as written: one term spelt two ways in the reference, an
        id and a name, is two labels there, one in ontology mode),
        ``confidence`` (the call's share of the ``k`` neighbours' votes; a neighbour
        without a label votes for nothing; for a call of ``unknown``, the share of
        ``knn_label``), ``margin`` (over the runner-up reference
        label), ``min_distance`` (to the nearest reference cell), ``mean_distance`` (over
        the ``k`` neighbours), ``knn_label`` (the plain majority label; ``unknown`` when no
        neighbour has a label).
        ``safelist`` / ``blocklist`` restrict the reference labels (exactly those labels,
        not their subtypes); in ontology mode they may name the terms by id or name, as the
        reference's labels may; an empty safelist is an error, an empty blocklist blocks
        nothing. ``filter`` restricts by any metadata. Cells added to the index since the
        annotator was made (:meth:`CellIndex.add`) are read and vote.
        """
        self._sync_labels()
        expr = self._reference_filter(safelist, blocklist, filter)
        mismatch = self._calibrated_elsewhere(expr)
        if mismatch is not None:
            warn(mismatch)
        if not is_whole(batch_size, least=1):
            raise ConfigError(
                f"batch_size must be a whole number of at least 1 cell, not {batch_size!r}."
            )
        q = as_embeddings(embeddings)
        if q.ndim == 1:  # one cell, as CellIndex.search takes it
            q = q[None]
        if q.ndim != 2:
            raise DataError(
                f"query embeddings must be a cells x dims array, not of shape {q.shape}."
            )
        index, exact = self._index_for(q, expr)
        parts = [
            self._annotate_block(index, q[s : s + batch_size], expr, exact)
            for s in range(0, len(q), batch_size)
        ]
        if not parts:  # no queries: the columns all the same
            none = np.zeros((0, self.index.dim), np.float32)
            parts = [self._annotate_block(index, none, expr, exact)]
        out = pd.concat(parts, ignore_index=True)
        # labels that name CL terms get their ids and names; others (a lab's own) keep theirs
        cl = load_cell_ontology()
        ids = {t: cl.term(t) or t for t in out["label"].unique()}
        # (as text even with no queries, where pandas maps an empty column to float64)
        out.insert(1, "label_id", out["label"].map(ids).astype(object))
        # (a label naming no current term, a deprecated one without a successor among them,
        # is its own name: a deprecated term's label may be blank)
        names = {i: cl.name(i) if cl.term(i) == i else i for i in set(ids.values())}
        out.insert(2, "label_name", out["label_id"].map(names).astype(object))
        return out

    def check_selection(
        self,
        safelist: Sequence[str] | None = None,
        blocklist: Sequence[str] | None = None,
        filter: Any = None,
    ) -> None:
        """Raise where the reference cells ``safelist``, ``blocklist`` and ``filter`` select
        (as :meth:`annotate` and :meth:`calibrate` take them) cannot be: labels the reference
        does not hold, metadata columns it lacks or values of another type, a filter that
        keeps no cell. What those would raise, before the queries are embedded."""
        self._sync_labels()
        expr = self._reference_filter(safelist, blocklist, filter)
        rows = None
        if filter is not None:  # (its columns and values' types, named as given)
            rows = self.index._selected(filter)
        if expr is not None and (safelist is not None or blocklist is not None):
            rows = self.index._selected(expr)  # (the whole selection: labels too)
        if rows is not None and len(rows) == 0:
            given = [
                f"{name}={_filter_text(value) if name == 'filter' else repr(value)}"
                for name, value in (
                    ("safelist", safelist),
                    ("blocklist", blocklist),
                    ("filter", filter),
                )
                if value is not None
            ]
            raise CellIndexError(
                f"{' and '.join(given)} leave none of the reference's {self.index.n_cells:,} "
                "cells to vote: select reference cells that the queries can be compared with."
            )

    def threshold_mismatch(
        self,
        safelist: Sequence[str] | None = None,
        blocklist: Sequence[str] | None = None,
        filter: Any = None,
    ) -> str | None:
        """Why the threshold :meth:`calibrate` set does not fit queries annotated against
        the reference cells that ``safelist``, ``blocklist`` and ``filter`` leave, else None
        (it fits, or was set by hand): what :meth:`annotate` warns of."""
        self._sync_labels()
        return self._calibrated_elsewhere(self._reference_filter(safelist, blocklist, filter))

    def _calibrated_elsewhere(self, expr: Any) -> str | None:
        """Why a threshold calibrated by :meth:`calibrate` does not fit queries annotated
        against the reference cells ``expr`` selects (None: it fits, or was set by hand).
        Selections are compared as written (two that select the same cells may differ)."""
        if self._calibrated_on is _UNSET or self.distance_threshold is None:
            return None
        calibrated = self._reference_filter(*self._calibrated_on)
        if (calibrated is None and expr is None) or (
            calibrated is not None and expr is not None and calibrated.equals(expr)
        ):
            return None
        return (
            "the distance threshold was calibrated against "
            f"{'the whole reference' if calibrated is None else 'a selection of it'}"
            f", and these queries are annotated against "
            f"{'the whole reference' if expr is None else 'another selection'} "
            "(safelist, blocklist, filter), which sits at other distances from "
            "them: calibrate() with the same safelist, blocklist and filter."
        )

    def _reference_filter(
        self, safelist: Sequence[str] | None, blocklist: Sequence[str] | None, filter: Any
    ) -> Any:
        pc = import_optional("pyarrow.compute")
        from .index import _expression

        terms = []
        safelist, blocklist = label_lists(safelist, blocklist)
        if blocklist is not None and not isinstance(blocklist, str) and not blocklist:
            blocklist = None  # blocks nothing
        if safelist is not None:
            terms.append(
                pc.field(self.label_key).isin(self._reference_values(safelist, "safelist"))
            )
        if blocklist is not None:
            values = self._reference_values(blocklist, "blocklist")
            terms.append(
                ~pc.field(self.label_key).isin(values) | pc.field(self.label_key).is_null()
            )
        if filter is not None:
            terms.append(_expression(filter, self.index._dataset().schema))
        expr = None
        for t in terms:
            expr = t if expr is None else expr & t
        return expr

    def _reference_values(self, labels: Sequence[str], what: str) -> list[str]:
        """The reference's label values that ``labels`` name: the same values, or in
        ontology mode the values naming the same terms (an id, its name, a deprecated id).
        Labels the reference does not hold are an error naming them (a misspelt blocklist
        would otherwise block nothing)."""
        if isinstance(labels, str):
            raise TypeError(f"{what} is a list of labels, not one string: {what}=[{labels!r}].")
        # (as the reference's values were read: 0.0 and 0 are "0", as in a column of
        # whole numbers with missing values, which pandas holds as floats; but a text
        # column holding "1.0" is met by 1.0 as written)
        reference = self._term_of

        def text(v: Any) -> str | None:
            if isinstance(v, str):
                return v
            read = value_text(v)
            return str(v) if read not in reference and str(v) in reference else read

        texts = [text(v) for v in labels]
        wanted = [v for v in texts if v is not None]
        if len(wanted) < len(texts):
            raise CellIndexError(
                f"{what} holds a missing value (None or NaN), which names no label: leave it out."
            )
        if not wanted:
            raise CellIndexError(
                f"{what} is empty: it would keep no reference cell; name the reference labels "
                f"to keep, or pass {what}=None to keep them all."
            )
        named = dict(zip(wanted, wanted, strict=True))  # each to its term
        if self.ontology_aware:
            try:
                named = dict(zip(wanted, load_cell_ontology().harmonize(wanted), strict=True))
            except OntologyError as err:
                raise OntologyError(f"{what}: {err}") from None
        terms, held_terms = set(named.values()), set(self._term_of.values())
        missing = [v for v in wanted if named[v] not in held_terms]
        if missing:
            held = list(self._term_of)
            some = ", ".join(repr(v) for v in held[:8])
            raise CellIndexError(
                f"{what} names {len(missing)} label{'s' if len(missing) > 1 else ''} that the "
                f"reference's {self.label_key!r} does not hold: {', '.join(map(repr, missing[:10]))}"
                f" (it holds {len(held)}: {some}{', ...' if len(held) > 8 else ''})."
            )
        return sorted(raw for raw, term in self._term_of.items() if term in terms)

    #: Votes tallied at a time (queries x labels, 64 MB as float64): a block's queries are
    #: searched together, then voted on in groups that fit, whatever the number of labels.
    VOTES = 1 << 23

    #: Queries an IVF reference is calibrated on (:meth:`_index_for`).
    CALIBRATION_QUERIES = 500
    #: Queries as few as this are searched exactly: the calibration (an exact search of its
    #: sample, then IVF searches of it at several settings) costs more than an exact search
    #: of 1,500 queries (100k reference cells x 64 dims: 0.68 s; exact search of 600, 1,500
    #: and 5,000 queries 0.21, 0.49 and 1.65 s).
    EXACT_QUERIES = 1_500

    def _index_for(self, q: np.ndarray, expr: Any = None) -> tuple[CellIndex, bool]:
        """The index to search the queries ``q`` in (among the reference cells ``expr``
        selects), and whether exactly: an exact one as it is, and so an IVF index where the
        selection is one that its search takes exactly (few cells); else an IVF index
        with search parameters of its own (the index left as it is),
        calibrated on a sample of the queries for the index's target recall at ``k``,
        where they need more lists or candidates than its own cells (queries unlike the
        reference: a new study, other tissue), never fewer: the target then holds over
        the queries on average (a minority of them unlike the rest can fall short of it,
        if less than before). Searched exactly where the queries are few
        (:data:`EXACT_QUERIES`), or where even every list probed falls short of the target
        (8-bit codes that cannot rank these queries' neighbours): exact search is then
        both right and cheaper."""
        index = self.index
        if index.engine != "ivf" or not len(q) or index.n_cells < 2:
            return index, False
        if len(q) <= self.EXACT_QUERIES:
            return index, True
        if expr is not None and index._selection_searched_exactly(len(index.select(expr))):
            return index, True  # (no calibration of a search it would not make)
        params = index.params
        calibrated = int(params.get("calibrated_k") or 0)
        probe, rerank = index._nprobe_for(self.k), index._rerank_factor()
        target = float(params.get("target_recall") or 0.99)
        mine = index._searcher()
        with warnings.catch_warnings():  # (short of the target: said below, searched exactly)
            warnings.simplefilter("ignore", CellsiftWarning)
            reached = mine.calibrate(
                # (for the index's k where more: the candidates re-ranked follow it)
                k=max(self.k, calibrated),
                target_recall=target,
                n_queries=self.CALIBRATION_QUERIES,
                queries=q,
            )
        if reached < target:
            logger.info(
                "KNNAnnotator: an IVF search of these queries finds %.4f of their neighbours "
                "at most (%.4f asked): searched exactly",
                reached, target,
            )  # fmt: skip
            return index, True
        mine.params.update(
            nprobe=max(int(mine.params["nprobe"]), probe),
            rerank=max(mine._rerank_factor(), rerank),
        )
        if mine.params["nprobe"] > probe or mine.params["rerank"] > rerank:
            logger.info(
                "KNNAnnotator: the queries need %d lists of %d and %d x k candidates for recall "
                "@%d %.4f (the index's own cells: %d, %d x)",
                mine.params["nprobe"], params["nlist"], mine.params["rerank"],
                mine.params["calibrated_k"], reached, probe, rerank,
            )  # fmt: skip
        return mine, False

    def _annotate_block(
        self, index: CellIndex, q: np.ndarray, expr: Any, exact: bool
    ) -> pd.DataFrame:
        res = index.search(q, self.k, filter=expr, exact=exact)
        step = max(self.VOTES // max(len(self._labels.terms), 1), 1)
        parts = [
            self._vote(res.indices[a : a + step], res.distances[a : a + step])
            for a in range(0, len(q), step)
        ]
        if not parts:
            return self._vote(res.indices, res.distances)
        return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]

    def _vote(self, idx: np.ndarray, dist: np.ndarray) -> pd.DataFrame:
        """Calls of queries whose neighbours are ``idx`` at ``dist``."""
        valid = idx >= 0
        codes = np.where(valid, self._labels.codes[np.maximum(idx, 0)], -1)
        if self.weighted:  # (in float64: float32 sums would split an even vote unevenly)
            w = np.where(valid, np.clip(1.0 - dist.astype(np.float64) / 2.0, 1e-6, None), 0.0)
        else:
            w = valid.astype(np.float64)
        n_q, n_t = len(idx), len(self._labels.terms)
        keep = codes >= 0
        flat = (np.arange(n_q)[:, None] * n_t + codes)[keep]
        votes = np.bincount(flat, weights=w[keep], minlength=n_q * n_t).reshape(n_q, n_t)
        voted = votes.sum(1) > 0  # some neighbour has a label
        # shares of all k neighbours' weight: an unlabelled neighbour votes for nothing, so
        # one labelled cell among unlabelled ones is no majority
        total = w.sum(1)
        share = votes / np.maximum(total, 1e-12)[:, None]
        ref = share[:, : self._labels.n_reference]
        # an even vote: the label first in sorted order, as scikit-learn's (numpy's default
        # sort leaves equal keys in any order, which differs by platform)
        order = np.argsort(-ref, axis=1, kind="stable")[:, :2]
        top = np.take_along_axis(ref, order, 1)
        terms = np.asarray(self._labels.terms, dtype=object)
        knn_label = np.where(voted, terms[order[:, 0]], UNKNOWN)
        second = top[:, 1] if top.shape[1] > 1 else np.zeros(n_q)
        if self._up is not None:
            # votes for a term and all its descendants, summed before the one division
            # (shares summed: 0.4 + 0.2 > 0.6, and a parent would beat its only child)
            support = (votes @ self._up) / np.maximum(total, 1e-12)[:, None]
            ok = support > self.min_support + _ROUNDING  # (never a term no one voted for)
            # the most specific qualifying terms: none of their descendants qualifies; of
            # several (other lineages, with min_support below a half), the most supported
            qualifying = ok.astype(np.float32)
            finer = qualifying @ self._up - qualifying  # qualifying strict descendants
            specific = ok & (finer == 0)  # (of no common lineage: none is another's ancestor)
            # the most supported; of even ones, the first: reference labels in sorted order,
            # then coarser terms (as plain votes; sums of shares differ in their last bits)
            best = np.where(specific, support, -1.0).max(1, keepdims=True)
            call = np.argmax(specific & (support >= best - _ROUNDING), axis=1)
            label = terms[call]
            has = ok.any(1)  # (none: an unknown call, with the majority label's share)
            conf = support[np.arange(n_q), call]
        else:
            label = knn_label.copy()
            conf = top[:, 0]
            has = conf > self.min_support + _ROUNDING
        min_d = dist[:, 0]
        mean_d = _mean_distance(dist)
        unknown = ~has | ~voted
        if self.distance_threshold is not None:
            unknown |= ~(self._statistic(dist) <= self.distance_threshold)
        label = np.where(unknown, UNKNOWN, label)
        # an unknown call's confidence is the plain majority label's share, whatever made
        # it unknown (beyond the threshold, a term's support would speak for a call not made)
        conf = np.where(unknown, top[:, 0], conf)
        return pd.DataFrame(
            {
                "label": label.astype(str),
                "confidence": conf.astype(np.float32),
                "margin": (top[:, 0] - second).astype(np.float32),
                "min_distance": min_d.astype(np.float32),
                "mean_distance": mean_d.astype(np.float32),
                "knn_label": knn_label.astype(str),
            }
        )


def _mean_distance(distances: np.ndarray) -> np.ndarray:
    """Mean of each row's finite distances (missing neighbours, -1 / inf where a filter
    selects fewer than k cells, are left out; NaN where none is found)."""
    d = np.asarray(distances, dtype=np.float64)
    ok = np.isfinite(d)
    n = ok.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, d, 0.0).sum(1) / n, np.nan)


def _needed(quantile: float) -> int:
    """Fewest calibration scores whose split-conformal ``quantile`` is finite."""
    return int(np.ceil(quantile / (1.0 - quantile) - 1e-9))


def _conformal_quantile(sorted_scores: np.ndarray, quantile: float) -> float:
    """The ``ceil((n + 1) q)``-th smallest of n sorted scores; NaN when that exceeds n."""
    n = len(sorted_scores)
    rank = int(np.ceil((n + 1) * quantile - 1e-9))
    return float(sorted_scores[rank - 1]) if 1 <= rank <= n else float("nan")
