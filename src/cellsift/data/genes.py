"""Gene vocabularies and the alignment of a store's genes to them (an index map, no padding)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils import atomic_path
from .._warnings import warn
from ..errors import GeneAlignmentError

__all__ = ["GeneMap", "GeneVocabulary"]

#: var columns that may hold gene ids (Ensembl), and gene symbols.
ID_COLUMNS = ("gene_ids", "gene_id", "feature_id", "ensembl_id")
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "gene_name", "symbol")
#: var columns tried in this order after var_names when a store is aligned.
GENE_COLUMNS = ID_COLUMNS + SYMBOL_COLUMNS
#: A model's query must carry at least this many of its genes (or ``min_overlap`` of them,
#: whichever is fewer): SCimilarity's ``gene_overlap_threshold``.
MODEL_MIN_GENES = 5000

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$")


#: The share of names that are Ensembl ids from which they are taken as ids (a few genes of
#: an atlas may lack one and keep a symbol in the id column).
MOSTLY = 0.9


def _mostly_ensembl(names: pd.Index) -> bool:
    """Are at least :data:`MOSTLY` of ``names`` Ensembl gene ids?"""
    return len(names) > 0 and float(names.str.match(_ENSEMBL).mean()) >= MOSTLY


def _names(values: pd.Index | pd.Series) -> pd.Index:
    """Gene names as text, a missing one (NaN, None) as "": no gene's name, never matched."""
    # (pandas' text, not numpy's: numpy's drops trailing NULs, "C\x00" would read "C")
    kept = np.where(pd.isna(values), "", np.asarray(values, dtype=object))
    return pd.Index(kept, dtype=object).astype(str)


_ODD = r"[\r\x00\ufeff]"  # a carriage return, a NUL, a byte order mark
#: White space as str.strip() reads it, in ASCII (a fast test of ASCII names for it).
_ASCII_SPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def _maybe_odd(joined: str) -> bool:
    """Does text hold white space, a NUL or a byte order mark? (Fast: a scan in C a
    character for ASCII text; else one split on white space.)"""
    if "\x00" in joined or "\ufeff" in joined:
        return True
    if joined.isascii():
        return any(c in joined for c in _ASCII_SPACE)
    parts = joined.split(maxsplit=1)
    return len(parts) != 1 or len(parts[0]) != len(joined)


def _cleaned(names: pd.Index) -> pd.Index:
    """Names as text editors and spreadsheets leave them, read as they mean: white space
    around them (a padded table; a trailing carriage return: text with Windows line ends)
    and a leading byte order mark (text saved "with BOM") stripped. A name that then equals
    another name as written, or another such name, keeps its spelling (the one written so
    is the gene; two alike would name neither), and so does one holding a carriage return
    or a byte order mark elsewhere, or a NUL (which names no gene)."""
    joined = "".join(names)  # (the common case, none: one scan in C, not one a name)
    if not _maybe_odd(joined):
        return names
    odd = np.asarray(names.str.contains(_ODD)) | np.asarray(names.str.strip() != names)
    if not odd.any():  # (white space within names only)
        return names
    fixed = names[odd].str.strip().str.removeprefix("\ufeff").str.strip()
    keep = ~fixed.str.contains(_ODD) & (fixed != "")
    keep &= ~fixed.isin(names[~odd]) & ~fixed.duplicated(keep=False)
    out = np.asarray(names, dtype=object).copy()
    out[np.flatnonzero(odd)[keep]] = fixed[keep]
    return pd.Index(out, dtype=object)


def _symbols_beside_ids(names: pd.Index, column: pd.Series | None) -> pd.Index:
    """The symbols of a store whose genes an id column names and whose var_names are
    symbols, some made unique by ``var_names_make_unique()`` (10x read by scanpy: MATR3,
    MATR3-1, which name one gene each by their order in the file only, so another file's
    MATR3-1 may be the other gene). A symbol column (``column``) tells, gene by gene: its
    value where it is the var_name, or the var_name's stem (MATR3 for MATR3-1: then named
    twice, and so no gene's), else the var_name (a column of other text, a gap). Without
    one, a var_name and the names made of it (X, X-1: a gene of its own such as
    IGHV1-69-2 too, which nothing here tells from a copy) are no symbol: the ids name
    those genes."""
    dashed = np.flatnonzero(np.asarray(names.str.contains("-", regex=False), dtype=bool))
    stem = pd.Series("", index=range(len(names)), dtype=object)
    stem.iloc[dashed] = names[dashed].str.extract(r"^(.+)-\d+$", expand=False).fillna("")
    stem = pd.Index(stem.to_numpy(), dtype=object)
    if column is None:
        copy = (stem != "") & stem.isin(names)
        made = copy | names.isin(stem[copy])
        return pd.Index(np.where(made, "", names), dtype=object)
    given = _cleaned(_names(column))
    agrees = (given == names) | ((given == stem) & (stem != ""))
    usable = (given != "") & (given.str.casefold() != "nan") & ~given.str.match(_ENSEMBL.pattern)
    return pd.Index(np.where(agrees & usable, given, names), dtype=object)


def _unambiguous(names: pd.Index) -> np.ndarray:
    """Which of ``names`` can identify a gene: not "" (none) and not shared with another."""
    return (names != "") & ~names.duplicated(keep=False)


def _of_text(values: pd.Series) -> bool:
    """Can a var column hold gene names (text, or categories of text)?"""
    kind = values.dtype
    if isinstance(kind, pd.CategoricalDtype):
        kind = kind.categories.dtype
    return pd.api.types.is_object_dtype(kind) or pd.api.types.is_string_dtype(kind)


def _columns(var: pd.DataFrame) -> dict[Any, pd.Series]:
    """var's columns by their labels: a label given to several columns (as a concat can
    leave) names the first where they hold the same values, else none of them."""
    labels = pd.Index(var.columns)
    out: dict[Any, pd.Series] = {}
    for label in labels.unique():
        at = labels.get_indexer_for([label])  # (NaN too)
        first = var.iloc[:, at[0]]
        if all(first.equals(var.iloc[:, j]) for j in at[1:]):
            out[label] = first
    return out


def id_columns(var: pd.DataFrame) -> list[Any]:
    """The labels of var's columns that may hold gene ids: the usual ones
    (:data:`ID_COLUMNS`), then any other column of text whose first names are mostly
    Ensembl ids (scanpy's concatenate writes ``gene_ids-0``), in var's order."""
    columns = _columns(var)
    usual = [c for c in ID_COLUMNS if c in columns]
    return usual + [
        c
        for c, values in columns.items()
        if c not in GENE_COLUMNS
        and _of_text(values)
        and _mostly_ensembl(_cleaned(_names(values.iloc[:ID_SAMPLE])))
    ]


#: The names of a var column looked at to tell whether it holds ids (:func:`id_columns`).
ID_SAMPLE = 200


def id_column(var: pd.DataFrame) -> str | None:
    """The var column :meth:`GeneVocabulary.from_var` takes gene ids from: None where
    var_names are Ensembl ids, else the first id column (:func:`id_columns`) of unique
    Ensembl ids (names as :func:`_cleaned` reads them; a gene without one, at most 1 in
    10, takes its var_name: :func:`column_ids`), if any."""
    if _mostly_ensembl(_cleaned(_names(var.index))):
        return None
    return next(
        (
            c
            for c in id_columns(var)
            if _mostly_ensembl(ids := column_ids(var, c)) and not ids.has_duplicates
        ),
        None,
    )


def column_ids(var: pd.DataFrame, column: Any) -> pd.Index:
    """The gene ids of var's ``column``, as a vocabulary takes them: cleaned
    (:func:`_cleaned`), a gene without one (missing, blank: a transgene, a merge's gap)
    named by its var_name."""
    ids = _cleaned(_names(_columns(var)[column]))
    return pd.Index(np.where(ids == "", _cleaned(_names(var.index)), ids), dtype=object)


def _kind_of_names(names: pd.Index) -> str:
    """What a list of gene names holds, for messages: Ensembl ids of which species prefix
    (ENSG: human, ENSMUSG: mouse), or other names (symbols), with examples."""
    sample = pd.Index(np.asarray(names[:2000], dtype=str))
    if len(sample) == 0:
        return "none"
    is_id = np.asarray(sample.str.match(_ENSEMBL), dtype=bool)
    ensembl, others = sample[is_id], sample[~is_id][:2].tolist()
    if len(ensembl):
        prefix = ensembl.str.extract(r"^(ENS[A-Z]*G)", expand=False).value_counts().index[0]
        ids = f"Ensembl ids ({prefix}..., e.g. {ensembl[0]!r})"
    examples = ", ".join(repr(g) for g in others)
    # (shares as _mostly_ensembl takes them: 1 in 10 ids is "not Ensembl ids", as 9 in 10
    # are ids, which (1 - MOSTLY) * n, a hair under n / 10, did not say)
    if float(is_id.mean()) >= MOSTLY:
        return ids
    if float((~is_id).mean()) >= MOSTLY:
        return f"not Ensembl ids (symbols? e.g. {examples})"
    return f"a mix of {ids} and other names (e.g. {examples})"


def _strip_version(ids: pd.Index) -> pd.Index:
    """ENSG00000141510.17 -> ENSG00000141510 (Ensembl versions differ between releases)."""
    # (a name without a dot is its own stripped form: only dotted names are matched)
    return pd.Index(
        [g.split(".")[0] if "." in g and _ENSEMBL.match(g) else g for g in ids.astype(str)]
    )


#: Whose genes a vocabulary holds, by ``align``'s ``of``.
_WHOSE = {"vocabulary": "model", "smaller": "vocabulary"}


@dataclass(frozen=True)
class _Tried:
    """One key tried in :meth:`GeneVocabulary.align`: var's names (``label``: a column's,
    None for var_names) against the vocabulary's ids or symbols (``target``)."""

    score: tuple[int, bool, bool]
    key: str
    label: Any
    ids: pd.Index
    target: pd.Index
    hit: np.ndarray
    clear: np.ndarray


def _positions(target: pd.Index, names: pd.Index) -> np.ndarray:
    """The vocabulary positions of ``names``, each one of ``target`` (the vocabulary's ids
    or symbols, "" where a gene has none)."""
    named = np.flatnonzero(target != "")
    return named[target[named].get_indexer(names)]


class DuplicateGenesError(ValueError):
    """A vocabulary's ids name a gene twice (a ValueError, as every refused vocabulary)."""


@dataclass(frozen=True)
class GeneMap:
    """How one store's columns map onto a vocabulary.

    ``col_map[j]`` is the vocabulary position of store column ``j``, or -1 when the
    vocabulary lacks it. ``identity`` marks a store whose genes are the vocabulary, in order.
    ``twice``: store columns left out (-1) that by another of their names (an id, a symbol)
    are a vocabulary gene another column gives: column -> that gene's position.
    """

    col_map: np.ndarray
    n_matched: int
    key: str
    identity: bool
    n_vocab: int
    twice: Mapping[int, int] = field(default_factory=dict)

    @cached_property
    def keeps_order(self) -> bool:
        """Do the matched columns keep their order in the vocabulary? (Else each row's
        column indices must be sorted again after mapping.)"""
        matched = self.col_map[self.col_map >= 0]
        return bool(np.all(np.diff(matched) > 0))

    def apply(self, x: sp.csr_matrix) -> sp.csr_matrix:
        """``x`` (cells x the store's genes) with columns in vocabulary order, each row's
        column indices sorted (as torch's sparse CSR tensors require).

        Genes the vocabulary lacks are dropped; vocabulary genes the store lacks stay zero.
        ``x`` is never changed; the result may share its arrays (an identity map: ``x``).
        """
        given = x
        if not x.has_sorted_indices:  # a valid CSR, as some tools write it
            x = x.sorted_indices()
        if self.identity:
            return x
        mapped = self.col_map[x.indices]
        keep = mapped >= 0
        indptr = x.indptr.astype(np.int64)
        data = x.data
        if not keep.all():
            indptr = np.concatenate(([0], np.cumsum(keep)))[indptr]
            data, mapped = data[keep], mapped[keep]
        out = sp.csr_matrix(
            (data, mapped.astype(np.int32), indptr), shape=(x.shape[0], self.n_vocab)
        )
        if not self.keeps_order:  # (an order-keeping map keeps sorted rows sorted)
            # sorted in place: not in the caller's values (every gene kept: its very array),
            # nor in a store's read-only buffer (TileDB's Arrow)
            if not out.data.flags.writeable or np.shares_memory(out.data, given.data):
                out.data = out.data.copy()
            out.sort_indices()
        return out


class GeneVocabulary:
    """An ordered list of genes (Ensembl ids or symbols) that models and batches use.

    Parameters
    ----------
    genes
        Gene ids in model order. Must be unique.
    symbols
        Optional symbols, parallel to ``genes``; stores may then match by either. "" marks a
        gene without a symbol.
    """

    def __init__(
        self, genes: Sequence[str] | pd.Index, symbols: Sequence[str] | None = None
    ) -> None:
        self.genes = pd.Index(np.asarray(genes, dtype=str))
        empty = np.flatnonzero(self.genes.str.strip() == "")
        if len(empty):
            raise ValueError(
                f"gene {empty[0]} of the vocabulary has an empty id"
                + (f" ({len(empty) - 1} more too)" if len(empty) > 1 else "")
                + "; every gene needs an id (name the store's genes, or leave those out)."
            )
        self.symbols = None if symbols is None else pd.Index(np.asarray(symbols, dtype=str))
        for what, names in (("id", self.genes), ("symbol", self.symbols)):
            if names is None:
                continue
            # (a carriage return: names read from text with Windows line ends; no file of
            # genes, genes.tsv included, would read them back as written. A store's
            # symbols are cleaned by from_var instead)
            # a byte order mark: text an editor saved as "UTF-8 with BOM", read as UTF-8,
            # puts one before the first name (which then matches no gene)
            odd = np.flatnonzero(names.str.contains(_ODD))
            if len(odd):
                raise ValueError(
                    f"gene {odd[0]}'s {what} {names[odd[0]]!r} holds a carriage return, a NUL "
                    f"or a byte order mark{f' ({len(odd) - 1} more too)' if len(odd) > 1 else ''}"
                    ": names read from text with Windows line ends keep their '\\r', and text "
                    "saved with a byte order mark read as UTF-8 keeps it ('\\ufeff'). Strip "
                    "them: a list's, [g.strip().lstrip('\\ufeff') for g in genes] (or read "
                    "the file with encoding='utf-8-sig'); a store's, adata.var_names = "
                    "adata.var_names.str.strip().str.lstrip('\\ufeff'), then write it again."
                )
        # alignment reads names cleaned of padding, and ignores Ensembl versions: two ids
        # that are one there are one gene ("ENSG...1.1 " beside "ENSG...1")
        stripped = self._stripped()
        if stripped.has_duplicates:
            dups = self.genes[stripped.duplicated(keep=False)].unique()[:5].tolist()
            padded = (
                " (white space around them ignored)" if any(g != g.strip() for g in dups) else ""
            )
            versions = (
                " (Ensembl versions ignored)"
                if any(_ENSEMBL.match(g.strip()) for g in dups)
                else ""
            )
            raise DuplicateGenesError(
                f"gene vocabulary has duplicate ids{versions}{padded}, e.g. {dups}; make them "
                "unique."
            )
        if self.symbols is not None and len(self.symbols) != len(self.genes):
            raise ValueError("symbols must be parallel to genes.")
        named = None if self.symbols is None else self.symbols[self.symbols != ""]
        if named is not None and named.has_duplicates:
            dups = named[named.duplicated()].unique()[:5].tolist()
            raise ValueError(
                f"gene symbols must name one gene each, and {dups} name several; pass unique "
                "symbols, or none (genes then align by id only)."
            )

    def _stripped(self) -> pd.Index:
        """``genes`` as alignment reads them: cleaned of padding (:func:`_cleaned`), without
        Ensembl versions (kept for the ``genes`` they were made of)."""
        kept = getattr(self, "_stripped_of", None)
        if kept is None or kept[0] is not self.genes:
            kept = self._stripped_of = (self.genes, _strip_version(_cleaned(self.genes)))
        return kept[1]

    def __len__(self) -> int:
        return len(self.genes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocabulary) and self.genes.equals(other.genes)

    def __repr__(self) -> str:
        n = len(self)
        shown = f": {', '.join(self.genes[:3])}{', ...' if n > 3 else ''}" if n else ""
        return f"GeneVocabulary({n} gene{'' if n == 1 else 's'}{shown})"

    @classmethod
    def from_var(cls, var: pd.DataFrame, symbols: str | None = None) -> GeneVocabulary:
        """Vocabulary of a store's var: Ensembl ids where the store has them, and symbols.

        The ids are var_names, unless var_names are not Ensembl ids and an id column
        (``gene_ids``, ``gene_id``, ``feature_id``, ``ensembl_id``, else any other column of
        Ensembl ids: :func:`id_columns`) holds unique ones (a gene without one, at most 1 in
        10, named by its var_name): then that column gives the ids and var_names the
        symbols, but those ``var_names_make_unique()`` made, as a symbol column tells
        (:func:`_symbols_beside_ids`; 10x and the Kang 2018 data keep symbols as
        var_names, Ensembl ids in ``gene_ids``). Symbols otherwise come from the
        ``symbols`` column if given, else the first symbol column found (``feature_name``,
        ``gene_symbols``, ``gene_symbol``, ``gene_name``, ``symbol``). Symbols that name two
        genes alike cannot identify genes, and are left out ("", as missing ones); white
        space around a symbol is stripped ("TP53 " and, text read with Windows line ends,
        "TP53\\r" are TP53), as is a leading byte order mark (text saved "with BOM", read
        as UTF-8); symbols holding a carriage return, a byte order mark or a NUL still are
        left out, which no genes.tsv holds.
        """
        names = _cleaned(_names(var.index))  # (as align reads them: "TP53 " is TP53)
        ids, syms = names, None
        columns = _columns(var)
        id_col = id_column(var)
        sym_col = next((c for c in SYMBOL_COLUMNS if c in columns), None)
        if id_col is not None:
            ids = column_ids(var, id_col)
            syms = _symbols_beside_ids(names, None if sym_col is None else columns[sym_col])
        if symbols is not None:
            if symbols not in columns:
                raise ValueError(
                    f"var has no column {symbols!r} of symbols"
                    + (" (its name is given to two columns)" if symbols in var.columns else "")
                    + "; pass the name of a column of var."
                )
            syms = _names(columns[symbols])
        elif syms is None:
            syms = _names(columns[sym_col]) if sym_col else None
        if syms is not None:  # (those still odd are no symbol: the vocabulary refuses them)
            syms = _cleaned(syms)
            syms = syms.where(~syms.str.contains(_ODD), "")
        if syms is None or not _unambiguous(syms).any():
            return cls(ids)
        return cls(ids, np.where(_unambiguous(syms), syms, "").tolist())

    # -- persistence (genes.tsv) ----------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``genes.tsv`` (columns gene_id and, if known, symbol) atomically."""
        df = pd.DataFrame({"gene_id": self.genes})
        if self.symbols is not None:
            df["symbol"] = self.symbols
        with atomic_path(path, overwrite=True) as tmp:
            df.to_csv(tmp, sep="\t", index=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GeneVocabulary:
        # every name as written: no "NA" / "null" / "None" read as missing, and no line
        # skipped (a blank line is a gene without an id, not nothing)
        df = pd.read_csv(
            Path(path),
            sep="\t",
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            skip_blank_lines=False,
        )
        # (spaces around a header are an editor's; names are kept as written, as a
        # vocabulary of any names round-trips)
        df.columns = df.columns.str.strip()
        if "gene_id" not in df.columns:
            raise ValueError(f"{path}: a genes.tsv needs a 'gene_id' column.")
        empty = np.flatnonzero(df["gene_id"].str.strip() == "")
        if len(empty):
            raise ValueError(
                f"{path}: gene {empty[0]} (line {empty[0] + 2}) has no gene_id"
                + (f", and {len(empty) - 1} more" if len(empty) > 1 else "")
                + "; every gene the model reads needs its id."
            )
        return cls(df["gene_id"], df["symbol"] if "symbol" in df.columns else None)

    # -- alignment ------------------------------------------------------------------------
    def align(
        self,
        var: pd.DataFrame,
        *,
        source: str = "store",
        min_overlap: float = 0.5,
        of: Literal["smaller", "vocabulary"] = "smaller",
        warn_twice: bool = True,
    ) -> GeneMap:
        """Map the genes of ``var`` (a store's var table) onto this vocabulary.

        var_names, the columns of ids (:func:`id_columns`) and the usual symbol columns are
        each tried against the vocabulary's ids and symbols (Ensembl versions ignored, white
        space around names stripped); the one that finds the most vocabulary genes is used
        (on a tie, one without duplicates among its matches, so that a symbols column that
        names two genes alike does not win over unique var_names; then a match by ids over
        one by symbols; then var_names first). The store's genes it leaves unmatched are
        then matched by the others (var_names and the usual columns: another column of ids
        may be other genes', orthologues' or paralogues'), in the same order, onto
        vocabulary genes not matched yet (a gene whose Ensembl id changed between
        releases, found by its symbol), each by a name that names one gene of the store;
        ``GeneMap.key`` says how many so (``"gene_ids->ids (+10 by var_names->symbols)"``).
        Names that several of the store's genes share, where no other key tells those
        apart, are an error (``of="smaller"``) or read as 0 with a warning (``of="vocabulary"``),
        as are too few matches, naming the store and the count:

        ``of="smaller"``  fewer than ``min_overlap`` x min(genes in store, vocabulary): the
                          stores of one atlas share most genes of the smaller gene set
        ``of="vocabulary"``  the vocabulary is a model's input (its missing genes read as
                          0): fewer than ``min_overlap`` of its genes or
                          :data:`MODEL_MIN_GENES`, whichever is fewer; between that and
                          ``min_overlap`` of its genes, a warning

        A gene of the store that names, by another of its names, a vocabulary gene another
        of its genes gives is not read (``GeneMap.twice``), with a warning unless
        ``warn_twice`` is False (a caller that refuses them itself).
        """
        if of not in ("smaller", "vocabulary"):
            raise ValueError(f"of must be 'smaller' or 'vocabulary', not {of!r}.")
        if len(var) == 0:  # (before any count reads "all 0 of its genes")
            raise GeneAlignmentError(
                f"{source}: no genes (its var is empty, its counts 0 columns wide): there is "
                "nothing to read. Use the cells' counts over genes."
            )
        # (names as from_var reads a vocabulary's symbols: "TP53\r", "TP53 " are TP53 here too)
        # candidates: (var's column label, or None for var_names; its names as read)
        by_label = _columns(var)
        labels = id_columns(var) + [c for c in SYMBOL_COLUMNS if c in by_label]
        candidates: list[tuple[Any, pd.Index]] = [(None, _cleaned(_names(var.index)))]
        candidates += [(c, _cleaned(_names(by_label[c]))) for c in labels]
        targets = [("ids", self._stripped())]  # (a vocabulary's names padded: read so too)
        if self.symbols is not None:
            targets.append(("symbols", _cleaned(self.symbols)))
        tried: list[_Tried] = []
        for label, ids in candidates:
            ids = _strip_version(ids)
            for tname, tgt in targets:
                hit = np.asarray(ids.isin(tgt[tgt != ""]))
                # genes found by names of one gene each; then no name shared among the hits
                # (several genes of the store, so which one?); then ids over symbols
                clear = hit & _unambiguous(ids)
                score = (int(clear.sum()), bool(np.array_equal(hit, clear)), tname == "ids")
                name = "var_names" if label is None else str(label)
                tried.append(_Tried(score, f"{name}->{tname}", label, ids, tgt, hit, clear))
        # the best (on a tie, the first tried: var_names first)
        order = sorted(range(len(tried)), key=lambda i: tried[i].score, reverse=True)
        best = tried[order[0]]
        key, column, ids, target, hit, clear = (
            best.key, best.label, best.ids, best.target, best.hit, best.clear
        )  # fmt: skip
        col_map = np.full(len(ids), -1, dtype=np.int64)
        col_map[clear] = _positions(target, ids[clear])
        # genes the best key leaves unmatched, matched by another (an id of another
        # release, its symbol the vocabulary's): by names of one gene each, onto
        # vocabulary genes not matched otherwise, the keys in the order of their matches;
        # var_names and the usual columns only (another column of ids may be of other
        # genes: orthologues, paralogues; it serves as the best key only)
        used = np.zeros(len(self), dtype=bool)
        used[col_map[clear]] = True
        filled = []
        for other in (tried[i] for i in order[1:]):
            if (col_map >= 0).all() or used.all():
                break
            if other.label is not None and other.label not in GENE_COLUMNS:
                continue
            free = other.clear & (col_map < 0)
            if not free.any():
                continue
            at = np.flatnonzero(free)
            pos = _positions(other.target, other.ids[at])
            new = ~used[pos]
            if new.any():
                col_map[at[new]], used[pos[new]] = pos[new], True
                filled.append(f"+{int(new.sum())} by {other.key}")
        if filled:
            key += f" ({', '.join(filled)})"
        # var's genes left unmatched whose names by another key are of vocabulary genes
        # matched already (an id in var_names, the same gene's symbol beside it): said below
        # (by its Ensembl id; by its symbol only where it has no Ensembl id of another gene:
        # a gene not in the vocabulary whose symbol another release gave the vocabulary's,
        # one of two genes that share a symbol, is another gene)
        twice: dict[int, int] = {}
        vocab_ids = self._stripped()
        for other in tried:
            if other.label is not None and other.label not in GENE_COLUMNS:
                continue
            rows = np.flatnonzero(other.clear & (col_map < 0))
            if not len(rows):
                continue
            by_id = other.key.endswith("->ids")
            for row, gene in zip(rows, _positions(other.target, other.ids[rows]), strict=True):
                if not used[gene] or row in twice:
                    continue
                if by_id or not any(
                    _ENSEMBL.match(str(t.ids[row])) and t.ids[row] != vocab_ids[gene]
                    for t in tried
                    # (the columns read: not another column of ids, orthologues')
                    if t.label is None or t.label in GENE_COLUMNS or t.label == column
                ):
                    twice[int(row)] = int(gene)
        n_matched = int(used.sum())
        # vocabulary genes named by several of var's (by the best key), matched by none
        shared = ids[hit & ~clear].unique()
        shared = shared[~used[_positions(target, shared)]] if len(shared) else shared
        how = "with adata.var_names_make_unique()" if column is None else f"in var[{column!r}]"
        # (names that are Ensembl ids already: no other column of ids to offer)
        by_ids = (
            ""
            if any(_ENSEMBL.match(str(g)) for g in shared[:5])
            else (", or align by a unique id column such as Ensembl ids")
        )
        fix = f"To use them, make the names unique {how}{by_ids}."
        named_as = dict(candidates)[column][hit & ~clear]  # (None: var_names)
        if len(named_as) and named_as.is_unique:  # (unique as written: by their versions only)
            names = "adata.var_names" if column is None else f"adata.var[{column!r}]"
            fix = (
                "They differ in their Ensembl version only and name one gene: to use them, "
                rf"keep one of each (adata = adata[:, ~{names}.str.replace(r'\.\d+$', '', "
                "regex=True).duplicated()].copy())."
            )
        if len(shared) and of != "vocabulary":
            raise GeneAlignmentError(
                f"{source}: duplicate gene ids among its genes ({key}), e.g. "
                f"{shared[:5].tolist()}: each names several of its genes. {fix}"
            )
        if of == "vocabulary":
            need = min(min_overlap * len(self), MODEL_MIN_GENES)
        else:
            need = min_overlap * min(len(var), len(self))
        if n_matched == 0 or n_matched < need:
            what = "the model's" if of == "vocabulary" else "the vocabulary's"
            beside = ""  # (symbols matter beside ids only: genes named by symbols are so)
            if any(_ENSEMBL.match(g) for g in self.genes[:2000]):
                held = self.symbols is not None and (self.symbols != "").any()
                beside = ", with their symbols" if held else ", with no symbols beside them"
            if n_matched >= MOSTLY * len(var) and of == "vocabulary":  # too few genes
                mine = (
                    f"all {n_matched} of its genes"
                    if n_matched == len(var)
                    else f"{n_matched} of its {len(var)} genes"
                )
                raise GeneAlignmentError(
                    f"{source}: {mine} are {what}, but they are only "
                    f"{n_matched} of {what} {len(self)} (need {int(np.ceil(need))}): the "
                    "data hold a gene panel or a subset (variable genes), not the whole "
                    "transcriptome the model reads. Use the data with all their genes: "
                    "point layer= at the raw counts where X holds the subset ('raw': "
                    "adata.raw)."
                )
            # (the names the best key matched, where they matched any)
            names_of, names_are = var.index, "var_names are"
            if n_matched and column is not None:
                names_of, names_are = _names(by_label[column]), f"var[{column!r}] holds"
            raise GeneAlignmentError(
                f"{source}: only {n_matched} of its {len(var)} genes match {what} "
                f"{len(self)} genes (need {int(np.ceil(need))}; best key {key}). Check that "
                "both use the same kind of ids (Ensembl ids vs symbols) and species, and that "
                "the data are not subset to a gene panel or to variable genes; a var column "
                f"of Ensembl ids ({', '.join(ID_COLUMNS)} or any other) is matched "
                f"automatically. Its {names_are} {_kind_of_names(names_of)}; {what} genes are "
                f"{_kind_of_names(self.genes)}{beside}.{self._case_hint(var, n_matched, need)}"
            )
        if of == "vocabulary" and n_matched < min_overlap * len(self):
            warn(
                f"{source}: {n_matched} of the model's {len(self)} genes are found "
                f"({100 * n_matched // len(self)}%; best key {key}); the "
                "missing ones read as 0, "
                "which can shift embeddings and labels.",
                stacklevel=3,
            )
        if len(shared):
            warn(
                f"{source}: {len(shared)} of the model's genes are each named by several of "
                f"its genes ({key}), e.g. {shared[:5].tolist()}, so they read as 0. {fix}",
                stacklevel=3,
            )
        if twice and warn_twice:
            names = var.index
            shown = ", ".join(
                f"{names[row]!r} ({self.genes[gene]}, read from "
                f"{names[int(np.flatnonzero(col_map == gene)[0])]!r})"
                for row, gene in list(twice.items())[:3]
            )
            warn(
                f"{source}: {len(twice)} of its genes are not read: each names, by another of "
                f"its names (an Ensembl id, a symbol), a gene of the {_WHOSE[of]} that another "
                f"of its genes gives ({key}), e.g. {shown}. Where they are one gene, sum "
                "their counts into one column first.",
                stacklevel=3,
            )
        identity = len(var) == len(self) and bool(np.array_equal(col_map, np.arange(len(self))))
        return GeneMap(col_map, n_matched, key, identity, len(self), twice)

    def _case_hint(self, var: pd.DataFrame, n_matched: int, need: float) -> str:
        """Where the data's var_names would match enough of the genes (ids or symbols)
        ignoring case, a sentence saying so: genes match as written, and symbols that
        differ in case are most often another species' (mouse Cd3e, human CD3E)."""
        ours = {str(g).casefold() for g in self.genes}
        if self.symbols is not None:
            ours |= {str(g).casefold() for g in self.symbols if g}
        names = pd.Index(var.index.astype(str))
        found = np.asarray(names.str.casefold().isin(list(ours)))
        folded = int(found.sum())
        if folded < need or folded <= n_matched:
            return ""
        said = f" {folded} of its var_names match ignoring case (genes are matched as written): "
        theirs = names[found]
        if not (theirs == theirs.str.lower()).mean() >= MOSTLY:  # (mouse-style: Cd3e)
            return said + (
                "mouse and human symbols differ so (Cd3e, CD3E): are the data of the model's "
                "species? Map them to its genes (orthologues) rather than changing their case."
            )
        # written in lower case (cd3e): the model's own genes, as some tools write them, or
        # another species' (mouse symbols lower-cased)
        upper = [g for g in (self.symbols if self.symbols is not None else self.genes) if g]
        fix = (
            "upper-case them (adata.var_names = adata.var_names.str.upper())"
            if np.mean([g == g.upper() for g in upper[:2000]]) >= MOSTLY
            else "write them as the model's genes are written"
        )
        return said + (
            f"they are written in lower case. If they are genes of the model's species, {fix}; "
            "if of another (mouse symbols lower-cased), map them to its genes (orthologues)."
        )
