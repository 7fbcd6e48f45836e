"""CellCollection: many stores as one, filtered, with genes aligned to one vocabulary."""

from __future__ import annotations

import glob as _glob
import json
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils import (
    as_float,
    is_number,
    is_whole,
    logger,
    no_label,
    objects_whole_as_ints,
    repeated,
    text_or_none,
)
from .._utils import (
    positions as to_positions,
)
from .._warnings import warn
from ..errors import MIN_GENES_FIX, CellsiftError, ConfigError, DataError, MissingKeyError
from ._values import COUNT_LIMIT, first_fault
from .genes import (
    DuplicateGenesError,
    GeneMap,
    GeneVocabulary,
    _cleaned,
    _names,
    _strip_version,
    column_ids,
    id_column,
)
from .stores import CellStore, check_sorted_rows, is_anndata, open_store, refuse_other

__all__ = ["CellCollection", "resolve_paths"]

#: A store or where one is. ``os.PathLike`` unsubscripted: the command line's parser
#: (jsonargparse) reads ``os.PathLike[str] | CellStore`` as a class to build from a config
#: file, and turned ``--data.init_args.source atlas/manifest.json`` into the manifest's text.
StoreLike = str | os.PathLike | CellStore
ObsFilter = Mapping[str, Any] | Callable[[pd.DataFrame], np.ndarray]


def resolve_paths(source: StoreLike | Sequence[StoreLike]) -> list[StoreLike]:
    """Paths of a collection: a store, a list, a glob (``atlas/*.h5ad``) or a manifest
    (open stores and AnnData objects pass through).

    A manifest is a JSON file (or a directory holding ``manifest.json``) with
    ``{"files": [...]}``, paths relative to the manifest.
    """
    if isinstance(source, CellStore) or is_anndata(source):
        return [source]  # type: ignore[list-item]
    if isinstance(source, str | os.PathLike):
        p = Path(source)
        refuse_other(p, "cells")
        manifest = p / "manifest.json" if p.is_dir() else p
        if manifest.suffix == ".json" and manifest.exists():
            try:
                listed = json.loads(manifest.read_text())
            except (ValueError, UnicodeDecodeError) as err:  # (a cut or damaged file)
                raise DataError(
                    f"{manifest} is not JSON ({err}): the manifest is damaged or cut short. "
                    "Write it again (cellsift convert --shard-size writes one), or copy it "
                    "again."
                ) from None
            files = listed.get("files") if isinstance(listed, dict) else None
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise DataError(
                    f'{manifest} is not a manifest of stores: it needs "files", a list of '
                    'store paths relative to it ({"files": ["a.h5ad", "b.zarr"]}).'
                )
            if not files:
                raise DataError(
                    f"{manifest} lists no stores: its cells are in none. List the stores in "
                    'its "files" ({"files": ["a.h5ad", "b.zarr"]}), or write it again '
                    "(cellsift convert --shard-size writes one)."
                )
            return [manifest.parent / f for f in files]
        if any(ch in str(source) for ch in "*?[") and not p.exists():
            # (a file or folder that exists is itself, though its name holds [, * or ?)
            # (a sharded store's folder/*: its manifest lists the shards, it is not one)
            matched = _glob.glob(str(source))
            # a sharded store's manifest.json is left out where its folder, or a store in
            # it, is matched too (folder/*: the shards, listed once); manifests alone
            # (*/manifest.json) are their stores. (Compared as normalised text, siblings of
            # one glob; read as matched: "link/.." is the link's target's parent.)
            key = {f: os.path.normpath(f) for f in matched}
            near = {os.path.dirname(key[f]) for f in matched if Path(f).name != "manifest.json"}
            near |= set(key.values())
            found = sorted(
                f
                for f in matched
                if Path(f).name != "manifest.json" or os.path.dirname(key[f]) not in near
            )
            if not found:
                raise FileNotFoundError(f"no store matches {source}.")
            # (a sharded store among them, a folder named like a file, or a manifest: its
            # stores; a match that is no file, a broken link named with *: as it is)
            return [
                store for f in found for store in (resolve_paths(f) if Path(f).exists() else [f])
            ]
        return [source]
    if not isinstance(source, Sequence):
        raise TypeError(
            f"a collection reads stores (paths, a glob, a manifest, CellStore objects or "
            f"AnnData objects), not {type(source).__name__}."
        )
    out: list[StoreLike] = []
    for item in source:
        out.extend(resolve_paths(item))
    return out


def _once_each(stores: list[StoreLike]) -> None:
    """A warning for each store listed twice (by its real path, as a path or an open store
    of a file, or the same object in memory): its cells are read, trained on and counted
    once a listing."""
    seen: dict[Any, int] = {}
    for i, store in enumerate(stores):
        if isinstance(store, CellStore) and store.on_disk:
            path: Any = store.path  # (as given, for the message; its file: absolute)
            key: Any = os.path.realpath(store.file)
        elif isinstance(store, str | os.PathLike):
            path, key = store, os.path.realpath(store)
        else:
            path, key = None, id(store)
        if key in seen:
            first = stores[seen[key]]
            first = first.path if isinstance(first, CellStore) else first
            if path is None:
                name, also = f"store {i} ({type(store).__name__})", f" (as store {seen[key]})"
            else:
                name, also = str(path), "" if str(first) == str(path) else f" (also as {first})"
            warn(
                f"{name} is listed twice among the stores{also}: its cells are read as two "
                "stores' (trained on twice an epoch). List each store once where that is not "
                "meant (a glob and a path, or two globs, may meet)."
            )
        seen.setdefault(key, i)


class CellCollection:
    """Many cell stores read as one matrix with genes aligned to a vocabulary.

    Parameters
    ----------
    source
        Stores: paths, a glob, a manifest, open :class:`CellStore` objects, or AnnData
        objects in memory (their counts read by rows as a file's; a backed AnnData: pass
        its path).
    genes
        The vocabulary (a :class:`GeneVocabulary` or a list of ids). Default: the genes of
        the first store. Each store's columns map onto it; missing genes read as zeros.
    layer
        Where counts live in each store (``None`` = X, a layer name, or ``"raw"``).
    obs_filter
        Keep cells by obs: ``{"column": value or [values]}`` (compared as text, whole
        floats as ints: ``{"donor": [1015]}`` keeps donor "1015"; ``True`` or ``1`` keeps
        a flag's cells held as booleans or as 0/1) or a function of an obs
        frame (indexed by the cells' obs names, as an AnnData's obs is) returning a
        boolean mask.
    dropna
        obs columns that must be non-null (and not ``"unknown"``), e.g. the label column.
    min_genes, min_counts
        QC thresholds per cell (genes detected, total counts).
    min_overlap, overlap_of
        Least fraction of genes matched between each store and the vocabulary: of the
        smaller gene set, or, where the vocabulary is a model's input, of the vocabulary
        (:meth:`GeneVocabulary.align`).
    check_counts
        Read a sample of cells of each store and raise if they are not raw counts; then
        every batch read raises on a cell with values that are not counts (NaN, infinite,
        negative or not whole). Cells without counts are an error too (as the stores open,
        where their row lengths are free, else as they are read): drop them with
        ``min_genes=1``. Unchecked, every value and every cell is read as it is.
    """

    def __init__(
        self,
        source: StoreLike | Sequence[StoreLike],
        *,
        genes: GeneVocabulary | Sequence[str] | None = None,
        layer: str | None = None,
        obs_filter: ObsFilter | None = None,
        dropna: Sequence[str] = (),
        min_genes: int | None = None,
        min_counts: float | None = None,
        min_overlap: float = 0.5,
        overlap_of: Literal["smaller", "vocabulary"] = "smaller",
        check_counts: bool = True,
        store_options: Mapping[str, Any] | None = None,
    ) -> None:
        paths = resolve_paths(source)
        _once_each(paths)
        if not paths:
            raise ValueError("a collection needs at least one store.")
        if min_genes is not None and not is_whole(min_genes, least=0):
            raise ConfigError(f"min_genes is a number of genes (0 or more), not {min_genes!r}.")
        if min_counts is not None and not (is_number(min_counts) and min_counts >= 0):
            raise ConfigError(f"min_counts is a number of counts (0 or more), not {min_counts!r}.")
        if min_counts is not None:  # (compared with float sums; 10**400 is no float)
            min_counts = as_float(min_counts)
        allow_open_files(len(paths))
        opts = dict(store_options or {})
        try:
            self.stores: list[CellStore] = [
                # AnnDatas in memory named by their place in the list, told apart in origin()
                open_store(
                    p, layer=layer, name=f"adata[{i}]" if len(paths) > 1 else "adata", **opts
                )
                for i, p in enumerate(paths)
            ]
        except MissingKeyError as err:  # a store lacks the counts location layer= names
            if len(paths) > 1:
                raise MissingKeyError(
                    f"{err} layer= applies to every store of a collection; stores whose counts "
                    "live in different places are opened one by one and passed in: "
                    "CellCollection([open_store(a), open_store(b, layer='counts')])."
                ) from err
            raise
        # the gene tables stores held before (read, or edited by their user): kept, where
        # those the collection reads to align are let go once aligned
        held = ["var" in s.__dict__ for s in self.stores]
        self.offsets = np.concatenate(([0], np.cumsum([s.n_obs for s in self.stores]))).astype(
            np.int64
        )
        if genes is None:
            try:
                var = self.stores[0].var
            except CellsiftError:  # (cellsift's stores name themselves)
                raise
            except ValueError as err:  # (a store of the user's own kind, say)
                raise DataError(f"{self.stores[0].path}: its {err}") from err
            try:
                self.genes = GeneVocabulary.from_var(var)
            except ValueError as err:  # (named with the store that holds them)
                fix = (
                    _keep_one_of_each(self.stores[0])
                    if isinstance(err, DuplicateGenesError)
                    else ""
                )
                raise DataError(f"{self.stores[0].path}: its {err}{fix}") from err
        elif isinstance(genes, GeneVocabulary):
            self.genes = genes
        else:
            try:
                self.genes = GeneVocabulary(list(genes))
            except ValueError as err:  # (a ConfigError: the command line says it in a line)
                raise ConfigError(f"genes= (the vocabulary to read through): its {err}") from err
        self.gene_maps: list[GeneMap] = []
        for s, kept in zip(self.stores, held, strict=True):  # (its gene map is what reads need)
            self.gene_maps.append(
                self.genes.align(s.var, source=str(s.path), min_overlap=min_overlap, of=overlap_of)
            )
            if not kept:
                s.release_var()
        for s, gm in zip(self.stores, self.gene_maps, strict=True):
            if not gm.identity:
                logger.info(
                    "%s: %d of its %d genes matched (%s); %d of the %d vocabulary genes "
                    "are missing there and read as 0",
                    s.path,
                    gm.n_matched,
                    s.n_vars,
                    gm.key,
                    gm.n_vocab - gm.n_matched,
                    gm.n_vocab,
                )
        self.check_counts = check_counts
        for s in self.stores:
            if check_counts:
                _check_counts(s)
            elif min_genes:  # (its genes counted as the checks would count them)
                _sample_stored_zeros(s, uses="min_genes")
        # (read once, not by the first store alone)
        dropped_by = column_list(dropna, "dropna") or []
        removed: dict[str, int] = {}  # cells each filter removes, over all stores
        alone: dict[str, int] = {}  # cells only it removes (every other filter keeps them)
        masks = [
            self._keep_mask(s, obs_filter, dropped_by, min_genes, min_counts, removed, alone)
            for s in self.stores
        ]
        self.cell_ids = np.concatenate(
            [np.flatnonzero(m) + off for m, off in zip(masks, self.offsets[:-1], strict=True)]
        ).astype(np.int64)
        if self.offsets[-1] == 0:
            names = ", ".join(str(s.path) for s in self.stores[:3])
            more = f" and {len(self.stores) - 3} more" if len(self.stores) > 3 else ""
            raise DataError(f"{names}{more}: no cells in the collection's stores.")
        if len(self.cell_ids) == 0:
            n = int(self.offsets[-1])
            counts = "; ".join(f"{what} removes {k:,}" for what, k in removed.items() if k)
            dropped = any(what.startswith("dropna") and k for what, k in removed.items())
            labels = (
                "; a label column for training (dropna) must hold labels, not only missing or "
                "'unknown' values"
                if dropped
                else ""
            )
            raise DataError(
                f"the filters keep none of the {n:,} cells ({counts or 'there are none'}). "
                f"Loosen the filter that removes them all{labels}."
            )
        #: cells each filter removes, on its own (e.g. "min_genes=200": 1,203), over all stores
        self.removed = {what: k for what, k in removed.items() if k}
        #: cells only that filter removes (every other filter keeps them), over all stores
        self.removed_alone = {what: k for what, k in alone.items() if k}
        if len(self.cell_ids) < self.offsets[-1]:
            logger.info(
                "the collection keeps %s of %s cells (%s)",
                f"{len(self.cell_ids):,}",
                f"{int(self.offsets[-1]):,}",
                "; ".join(f"{what} removes {k:,}" for what, k in removed.items() if k),
            )
        self._obs_cache: dict[str, Any] = {}
        self._value_maps: dict[str, dict[str, str]] = {}

    # -- shape ----------------------------------------------------------------------------
    @property
    def n_obs(self) -> int:
        """Cells kept by the filters."""
        return len(self.cell_ids)

    @property
    def n_vars(self) -> int:
        return len(self.genes)

    @property
    def var_names(self) -> pd.Index:
        return self.genes.genes

    def __len__(self) -> int:
        return self.n_obs

    def __repr__(self) -> str:
        return (
            f"CellCollection({len(self.stores)} stores, {self.n_obs} cells of "
            f"{self.offsets[-1]}, {self.n_vars} genes)"
        )

    # -- filters --------------------------------------------------------------------------
    def _keep_mask(
        self,
        store: CellStore,
        obs_filter: ObsFilter | None,
        dropna: Sequence[str],
        min_genes: int | None,
        min_counts: float | None,
        removed: dict[str, int],
        alone: dict[str, int],
    ) -> np.ndarray:
        """The store's cells that every filter keeps; ``removed`` counts, per filter, the
        cells it removes (each filter on its own), ``alone`` those only it removes."""
        masks: dict[str, np.ndarray] = {}

        def apply(what: str, mask: np.ndarray) -> None:
            removed[what] = removed.get(what, 0) + int((~mask).sum())
            keep[:] &= mask
            masks[what] = masks[what] & mask if what in masks else mask

        keep = np.ones(store.n_obs, dtype=bool)
        if min_genes is not None:
            apply(f"min_genes={min_genes}", store.row_nnz() >= min_genes)
        if min_counts is not None:
            apply(f"min_counts={min_counts:g}", store.row_sums() >= min_counts)
        for col in dropna:
            values = store.obs_column(col)
            missing = no_label(values)  # blank, "Unknown", "NaN" too
            apply(_dropna_what(col), ~missing)
        if obs_filter is not None:
            if callable(obs_filter):
                result: Any = obs_filter(store.obs())
                if isinstance(getattr(result, "dtype", None), pd.BooleanDtype):
                    result = result.fillna(False)  # (nullable booleans: missing keeps none)
                got = np.asarray(result)
                if got.dtype != bool or got.shape != (store.n_obs,):
                    raise DataError(
                        f"{store.path}: obs_filter returned {got.dtype} values of shape "
                        f"{got.shape}; it must return one True/False per cell ({store.n_obs:,} "
                        "booleans), e.g. lambda obs: obs['tissue'] == 'blood' (not positions)."
                    )
                mask = got
            else:
                mask = np.ones(store.n_obs, dtype=bool)
                for col, wanted in obs_filter.items():
                    # compared as text, as obs_column joins stores (numbers in a YAML
                    # filter match a column of text; whole floats read as ints)
                    values = pd.Series(_as_text(store.obs_column(col)))
                    # several values: any collection but text (a numpy array, an Index, a range)
                    many = not isinstance(wanted, str | bytes) and np.ndim(wanted) == 1
                    allowed = (
                        list(wanted) if many or isinstance(wanted, set | frozenset) else [wanted]
                    )
                    texts = [t for v in allowed for t in filter_texts(v)]
                    mask &= values.isin(texts).to_numpy()
            apply("obs_filter", mask)
        for what, mask in masks.items():
            # kept by all the others (by none: True), not by this one
            others = np.logical_and.reduce([m for w, m in masks.items() if w != what], initial=True)
            alone[what] = alone.get(what, 0) + int((~mask & others).sum())
        nnz = None
        if self.check_counts:  # (unchecked, cells without counts are read as they are)
            nnz = store.row_nnz() if store.stored_zeros else store.stored_row_nnz()
        if nnz is not None:
            # checked where it is free (CSR stores, or counted already), among the cells kept
            empty = np.flatnonzero((nnz == 0) & keep)
            if len(empty):
                held = (  # (an AnnData in memory: its own mask too)
                    "; an AnnData in memory: adata[adata.X.getnnz(axis=1) > 0] (or its layer's)"
                    if store.format == "memory"
                    else ""
                )
                raise DataError(
                    f"{store.path}: {len(empty)} of {store.n_obs} cells have no counts at all, "
                    f"e.g. {_cell_name(store, int(empty[0]))}. Drop them with {MIN_GENES_FIX}"
                    f"{held}."
                )
        return keep

    # -- obs ------------------------------------------------------------------------------
    def origin(self, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Where each kept cell (those from ``start`` to ``stop``; default all) comes from:
        ``store`` (its path), ``store_row`` (its row there) and ``obs_name`` (its obs name
        there; the row, as text, for a store without names)."""
        cells = self.cell_ids[start:stop]
        k = np.searchsorted(self.offsets, cells, side="right") - 1
        local = cells - self.offsets[k]
        bounds = np.searchsorted(cells, self.offsets)  # cell_ids are sorted: a slice each
        names = np.empty(len(local), dtype=object)
        for i, s in enumerate(self.stores):
            rows = local[bounds[i] : bounds[i + 1]]
            obs_names = getattr(s, "obs_names", None) if len(rows) else None
            names[bounds[i] : bounds[i + 1]] = (
                np.asarray(obs_names)[rows] if obs_names is not None else rows
            )
        paths = pd.Categorical(np.array([str(s.path) for s in self.stores], dtype=object)[k])
        return pd.DataFrame({"store": paths, "store_row": local, "obs_name": text_or_none(names)})

    def _store_columns(self, name: str, absent_ok: bool) -> tuple[list[Any], bool]:
        """Each store's column ``name``; with ``absent_ok``, stores without it (where some
        have it) give missing values, typed as the others' values where they agree
        (booleans, whole numbers, numbers; else text). Also whether any was filled so."""
        held = [name in s.obs_columns for s in self.stores]
        if all(held) or not absent_ok or not any(held):  # (none: the first store says so)
            return _one_flag([s.obs_column(name) for s in self.stores]), False
        types = pd.api.types
        present = [s.obs_column(name) for s, h in zip(self.stores, held, strict=True) if h]
        present = _one_flag(present)
        kinds = [pd.Series(c[:0]).dtype for c in present]
        flags = [types.is_bool_dtype(k) for k in kinds]
        both = list(zip(flags, kinds, strict=True))
        # as numpy joins them where every store holds the column: booleans beside numbers
        # as 0/1; whole numbers as Int64 where they fit, UInt64 where all are unsigned and
        # some go beyond, else (beyond Int64 beside signed ones) as floats
        wide = any(_beyond_int64(c) for c in present)
        unsigned = all(f or types.is_unsigned_integer_dtype(k) for f, k in both)
        if all(flags):
            dtype: Any = "boolean"
        elif all(f or types.is_integer_dtype(k) for f, k in both) and (unsigned or not wide):
            dtype = "UInt64" if wide else "Int64"
        elif all(types.is_numeric_dtype(k) for k in kinds):
            dtype = "Float64"
        else:
            dtype = None  # text: None where missing
        if dtype in ("Int64", "UInt64", "Float64"):  # one type that the missing values' join
            present = [_joinable(c, dtype) for c in present]
        columns = iter(present)
        parts = [
            next(columns)
            if h
            else np.full(s.n_obs, None, dtype=object)
            if dtype is None
            else _all_missing(s.n_obs, dtype)
            for s, h in zip(self.stores, held, strict=True)
        ]
        return parts, True

    def obs_column(self, name: str, *, absent_ok: bool = False) -> pd.Categorical | np.ndarray:
        """``name`` over the kept cells (categories unified across stores; missing values
        stay missing). With ``absent_ok``, a column that some stores lack is missing for
        their cells (not an error, unless no store has it)."""
        if name not in self._obs_cache:
            columns, filled = self._store_columns(name, absent_ok)
            if filled:  # (not kept: a call without absent_ok raises for such a column)
                return self._joined(name, columns)
            self._obs_cache[name] = self._joined(name, columns)
        return self._obs_cache[name]

    def _joined(self, name: str, columns: list[Any]) -> pd.Categorical | np.ndarray:
        """The stores' ``columns`` of obs ``name`` as one column over the kept cells."""
        parts = [_plain_values(c) for c in columns]  # (a flag's forms made one: _one_flag)
        if any(isinstance(p, pd.Categorical) or np.asarray(p).dtype == object for p in parts):
            values = np.concatenate([_whole_floats_as_ints(p) for p in parts])
            values = values[self.cell_ids]
            col: Any = pd.Categorical(text_or_none(values))
        else:
            arrays = [np.asarray(p) for p in parts]
            if len({a.dtype for a in arrays}) > 1:  # joined in a wider type: float32
                arrays = [_as_written(a) for a in arrays]  # by the value it writes
            col = np.concatenate(arrays)[self.cell_ids]
        if name in self._value_maps:
            col = _map_values(col, self._value_maps[name])
        return col

    def obs_typed(self, name: str, *, absent_ok: bool = False) -> Any:
        """``name`` over the kept cells with its type where every store holds numbers or
        booleans (nullable ones too: an Int64 column with gaps stays Int64, a boolean one
        boolean; a metadata filter compares them as such), else as :meth:`obs_column`
        reads it (text, as labels and filters by value read it). ``absent_ok``: as
        :meth:`obs_column` takes it."""
        types = pd.api.types
        columns = self._store_columns(name, absent_ok)[0]  # (the stores' caches)
        parts = [pd.Series(c) for c in columns]
        if name not in self._value_maps and all(  # (text is read as text, not joined here)
            types.is_bool_dtype(p.dtype) or types.is_numeric_dtype(p.dtype) for p in parts
        ):
            extension = any(isinstance(p.dtype, pd.api.extensions.ExtensionDtype) for p in parts)
            if extension and len({p.dtype for p in parts}) > 1:  # joined in a nullable type:
                # narrow floats by the value they write (float32 0.1 is 0.1), as obs_column
                # joins numpy's (which it reads, below)
                parts = [
                    pd.Series(_joinable(p.array, "Float64"))
                    if types.is_float_dtype(p.dtype) and p.dtype.itemsize < 8
                    else p
                    for p in parts
                ]
            whole = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
            if types.is_bool_dtype(whole.dtype) or (
                types.is_numeric_dtype(whole.dtype)
                and isinstance(whole.dtype, pd.api.extensions.ExtensionDtype)
            ):  # (numpy's numbers are read as they are by obs_column too)
                return whole.array[self.cell_ids]
        return self.obs_column(name, absent_ok=absent_ok)

    def map_values(self, name: str, mapping: Mapping[str, str]) -> None:
        """Read obs ``name`` through ``mapping`` from now on (e.g. names -> Cell Ontology ids).

        Values without an entry stay as they are; subsets made afterwards share the mapping.
        """
        self._value_maps = {**self._value_maps, name: {str(k): str(v) for k, v in mapping.items()}}
        self._obs_cache.pop(name, None)

    def codes(
        self, name: str, categories: Sequence[str] | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """Integer codes of a categorical obs column over kept cells, and the categories.

        Values are compared as text, whole floats as ints (donor 1015.0 of a float column
        with gaps is "1015", as :class:`CellCollection`'s ``obs_filter`` reads it). Categories
        are sorted (stable codes for the same label set) unless given; missing
        values (also text that means none: blank, "unknown", "nan"; :func:`no_label`), and
        values outside given ``categories``, get code -1.
        """
        col = self.obs_column(name)  # text columns: categoricals already, missing values kept
        cat = col if isinstance(col, pd.Categorical) else pd.Categorical(_as_text(col))
        cat = cat.remove_unused_categories()
        none = cat.categories[no_label(np.asarray(cat.categories, dtype=object))]
        if len(none):
            cat = cat.remove_categories(none)
        cats = sorted(map(str, cat.categories)) if categories is None else list(categories)
        twice = repeated(cats)
        if twice:  # (pandas' "categories must be unique" named neither)
            raise ConfigError(
                f"the categories of {name!r} name {', '.join(map(repr, twice))} more than once: "
                "give each label once (a code is its place in the list)."
            )
        return pd.Categorical(cat, categories=cats).codes.astype(np.int64), cats

    def subset(self, positions: np.ndarray) -> CellCollection:
        """The same stores restricted to kept cells ``positions``: positions among this
        collection's cells (sorted, each once), or a boolean mask over them."""
        given = np.asarray(positions)
        if given.dtype == np.bool_:
            if given.shape != (self.n_obs,):
                raise IndexError(
                    f"a mask of the cells to keep has one entry per cell ({self.n_obs:,}), "
                    f"not shape {given.shape}."
                )
            rows = np.flatnonzero(given)
        else:
            rows = to_positions(given)
        check_sorted_rows(rows, self.n_obs, "positions", "cells of this collection")
        out = object.__new__(CellCollection)
        out.__dict__.update(self.__dict__)
        out.cell_ids = self.cell_ids[rows]
        out._obs_cache = {}
        return out

    # -- reading --------------------------------------------------------------------------
    def read(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of global rows ``rows`` (sorted, unique), genes in vocabulary order."""
        rows = to_positions(rows).reshape(-1)
        check_sorted_rows(rows, int(self.offsets[-1]), "rows", "the cells of all stores")
        bounds = np.searchsorted(rows, self.offsets)
        datas, idxs, ptrs = [], [], [np.zeros(1, dtype=np.int64)]
        nnz = 0
        for k, store in enumerate(self.stores):
            a, b = bounds[k], bounds[k + 1]
            if a == b:
                continue
            local = rows[a:b] - self.offsets[k]
            raw = store.read(local)
            if self.check_counts:  # every batch read (the sample checked at open misses cells)
                zeros = _check_batch(store, raw, local)
            x = self.gene_maps[k].apply(raw)
            if self.check_counts:
                _check_aligned(store, raw, x, local, zeros)
            indptr = x.indptr.astype(np.int64)
            datas.append(x.data)
            idxs.append(x.indices)
            ptrs.append(indptr[1:] + nnz)
            nnz += int(indptr[-1])
        data = np.concatenate(datas) if datas else np.zeros(0, np.float32)
        indices = np.concatenate(idxs) if idxs else np.zeros(0, np.int32)
        return sp.csr_matrix((data, indices, np.concatenate(ptrs)), shape=(len(rows), self.n_vars))


def _check_batch(store: CellStore, x: sp.csr_matrix, rows: np.ndarray) -> bool:
    """Raise a :class:`DataError` naming the store and the first cell whose values are not
    counts (:func:`refuse_non_counts`), that holds stored zeros only, or whose row holds a
    gene twice (one compiled pass over the values read, and one over the column indices:
    cheap next to reading them). Returns whether ``x`` stores zeros as entries."""
    data = x.data
    where = _where(store)

    def cell(row: int) -> str:
        return _cell_name(store, int(rows[row]))

    zeros = refuse_non_counts(store, x, rows)
    if zeros:  # zeros stored as entries
        # (the opening check counts genes from the values where its sample finds any; a
        # store whose zeros lie elsewhere counted them as genes when the filters ran)
        if not store.stored_zeros:
            store.stored_zeros = True
            logger.warning(
                "%s: stores zeros as entries (in %s, outside the sample checked when it "
                "opened), which min_genes counted as genes; drop them for exact gene counts: "
                "adata.X.eliminate_zeros(), then write the file again",
                where,
                cell(int(np.searchsorted(x.indptr, np.flatnonzero(data == 0)[0], "right") - 1)),
            )
        empty = np.flatnonzero(np.asarray(x.sum(axis=1, dtype=np.float64)).ravel() == 0)
        if len(empty):
            raise DataError(
                f"{where}: {cell(int(empty[0]))} has no counts (its stored entries are all "
                "zeros). Drop such cells with min_counts=1, which sums the values."
            )
    # (checked as the store opened where its row lengths are free: CSR; dense and SOMA
    # stores' cells are counted here, as they are read)
    empty = np.flatnonzero(np.diff(x.indptr) == 0)
    if len(empty):
        raise DataError(
            f"{where}: {cell(int(empty[0]))} has no counts at all. Drop such cells with "
            f"{MIN_GENES_FIX}."
        )
    _refuse_duplicates(store, x, rows)
    return bool(zeros)


def refuse_non_counts(store: CellStore, x: sp.csr_matrix, rows: np.ndarray) -> bool:
    """Raise a :class:`DataError` naming the store and the first cell of ``rows`` (read as
    ``x``) whose values are not counts: NaN, infinite, negative, not whole, or 2**24 or
    more (one compiled pass over the values). Returns whether ``x`` stores zeros as
    entries."""
    data = x.data
    where = _where(store)
    first, zeros = first_fault(data)
    if first < 0:
        return bool(zeros)
    row = int(np.searchsorted(x.indptr, first, side="right") - 1)
    v = data[first]
    what = (
        "counts are finite and non-negative"
        if not (v >= 0 and np.isfinite(v))
        else f"counts are below {COUNT_LIMIT:,}, {_TOO_LARGE}"
        if v >= COUNT_LIMIT
        else "counts are whole numbers (normalised or log-transformed values?)"
    )
    layers = _other_layers(store)
    held = _as_float32(v) if np.isfinite(v) and v >= COUNT_LIMIT else f"{v:.10g}"
    raise DataError(
        f"{where}: {_cell_name(store, int(rows[row]))} holds {held}; {what}. Fix or drop that cell"
        + (f", point layer= at raw counts ({_holder(store)} has: {layers})" if layers else "")
        + ", or pass check_counts=False if these values are meant."
    )


def _check_aligned(
    store: CellStore, raw: sp.csr_matrix, x: sp.csr_matrix, rows: np.ndarray, zeros: bool
) -> None:
    """A DataError naming the first cell whose counts (``raw``, checked) all lie in genes
    the collection's genes lack: aligned (``x``), it would read as an empty cell, which
    min_genes (counting the store's genes) let through. ``zeros``: ``raw`` stores zeros as
    entries (:func:`_check_batch`), where a row's entries are not all counts: summed then."""
    held = (
        np.diff(x.indptr) > 0
        if not zeros
        else np.asarray(x.sum(axis=1, dtype=np.float64)).ravel() > 0
    )
    lost = np.flatnonzero(~held & (np.diff(raw.indptr) > 0))
    if len(lost):
        where = _where(store)
        raise DataError(
            f"{where}: {_cell_name(store, int(rows[lost[0]]))} has counts only in genes "
            f"outside the {x.shape[1]:,} the collection reads (its first store's, or a model's), "
            "so it would read as an empty cell, with nothing to train, embed or label. Leave "
            "such cells out of the stores (their counts in those genes sum to 0), or pass "
            "check_counts=False to read them as empty."
        )


def _keep_one_of_each(store: CellStore) -> str:
    """How to keep one of each gene a store names twice: by the names the vocabulary took
    as ids (var_names, or an id column; of ``adata.raw`` where the counts are read there),
    their Ensembl versions left out where that leaves more duplicates (ids that differ in
    their version only are one gene); nothing where no id is named twice (the vocabulary
    refused them for another reason)."""
    var = store.var
    raw = store.layer == "raw"
    table = "raw" if raw else "adata"
    column = id_column(var)
    ids = _cleaned(_names(var.index)) if column is None else column_ids(var, column)
    ids = ids[ids.str.strip() != ""]  # (no id: refused as such, whatever its count)
    plain, stripped = ids.duplicated().sum(), _strip_version(ids).duplicated().sum()
    if not stripped:
        return ""
    names = f"{table}.var_names" if column is None else f"{table}.var[{column!r}]"
    if stripped > plain:
        names += '.str.replace(r"^(ENS[A-Z]*G\\d{11})\\.\\d+$", r"\\1", regex=True)'
    keep = f"adata = adata[:, ~{names}.duplicated()].copy()"
    if raw:
        keep = f"raw = adata.raw.to_adata(); adata.raw = raw[:, ~{names}.duplicated()].copy()"
    return (
        f" To do so, keep one of each (in Python: {keep}, then write it again), or pass "
        "genes= (a vocabulary)."
    )


def _dropna_what(col: str) -> str:
    """How :attr:`CellCollection.removed_alone` names the cells ``dropna`` removes for
    ``col``."""
    return f"dropna {col!r} (missing or 'unknown')"


def _cell_name(store: CellStore, cell: int) -> str:
    """``cell 12 ('AAACCTG-1')``: a store's cell by position and obs name (where it has names)."""
    names = getattr(store, "obs_names", None)
    return f"cell {cell}" + (f" ({names[cell]!r})" if names is not None else "")


def _refuse_duplicates(store: CellStore, x: sp.csr_matrix, rows: np.ndarray) -> None:
    """Raise a :class:`DataError` naming the first cell of ``rows`` (read as ``x``) whose row
    holds a gene twice: its counts would be normalised in parts. One pass over the column
    indices where they are sorted and unique, as files written by anndata are."""
    if x.has_canonical_format:
        return
    summed = x.copy()
    summed.sum_duplicates()
    shorter = np.flatnonzero(np.diff(summed.indptr) < np.diff(x.indptr))
    if len(shorter):
        raise DataError(
            f"{_where(store)}: "
            f"{_cell_name(store, int(rows[shorter[0]]))}'s row holds the same gene more than "
            "once (a CSR matrix with duplicate entries); its counts would be normalised in "
            "parts. Sum them and write the file again: adata.X.sum_duplicates(); "
            "adata.write_h5ad(...)."
        )


def _sample_stored_zeros(
    store: CellStore, n_sample: int = 512, uses: str = "the empty-cell check and min_genes"
) -> tuple[np.ndarray, Any]:
    """Read a sample of the store's cells (``n_sample``, spread over it), and where it holds
    zeros stored as entries, have genes per cell counted from the values (one pass over the
    file, for the empty-cell check and min_genes) rather than from the row pointer, which
    counts them. Returns the sample's rows and counts."""
    if store.n_obs == 0:
        return np.zeros(0, dtype=np.int64), sp.csr_matrix((0, store.n_vars), dtype=np.float32)
    rows = np.unique(np.linspace(0, store.n_obs - 1, min(n_sample, store.n_obs)).astype(np.int64))
    x = store.read(rows)
    if x.nnz and not x.data.all():
        store.stored_zeros = True
        logger.info(
            "%s (%s): zeros are stored as entries; genes per cell are counted from the values "
            "(one pass over the file as it opens, for %s)",
            store.path,
            "X" if store.layer is None else store.layer,
            uses,
        )
    return rows, x


def _check_counts(store: CellStore, n_sample: int = 512) -> None:
    """Raise if a sample of cells holds NaN, negative, non-integer or too large values
    (2**24 or more, which float32 would round), or a gene
    twice in a row (duplicate CSR entries). A store of no cells (a shard whose cells were
    all filtered out) has none to check."""
    if store.n_obs == 0:
        return
    rows, x = _sample_stored_zeros(store, n_sample)
    layers = _other_layers(store)
    where = _where(store)
    check_count_values(
        x.data,
        where,
        f" Point layer= at raw counts{f' ({_holder(store)} has: {layers})' if layers else ''}, "
        "or pass check_counts=False if these values are meant.",
    )
    _refuse_duplicates(store, x, rows)


def _plain_values(values: Any) -> Any:
    """A nullable pandas column (Int64, boolean, string) as objects with None where missing:
    numpy would turn whole numbers with missing values into floats (group 3 read as 3.0).
    Nullable floats as numpy floats with NaN where missing, read as numpy's floats are
    (whole ones as ints, narrow ones as written)."""
    if isinstance(values, pd.api.extensions.ExtensionArray) and not isinstance(
        values, pd.Categorical
    ):
        if pd.api.types.is_float_dtype(values.dtype):
            return values.to_numpy(dtype=values.dtype.numpy_dtype, na_value=np.nan)
        return values.to_numpy(dtype=object, na_value=None)
    return values


_FLAG_TEXTS = {"True": "bool", "False": "bool", "0": "01", "1": "01"}


def _text_kind(values: np.ndarray) -> str | None:
    """:func:`_flag_kind` of distinct values (objects or text)."""
    texts = {t for t in text_or_none(_whole_floats_as_ints(values)) if t is not None}
    kinds = {_FLAG_TEXTS.get(t) for t in texts}
    return "none" if not kinds else kinds.pop() if len(kinds) == 1 and None not in kinds else None


def _flag_kind(values: Any) -> str | None:
    """How a store's column may hold a flag: "bool" (booleans, or their text), "01" (the
    numbers 0 and 1, or their text), "none" (no value at all), else None. Missing values
    aside. Cheap for the columns that are no flag (a look at their first values)."""
    if isinstance(values, pd.Categorical):
        cats = np.asarray(values.categories, dtype=object)
        if _text_kind(cats) is None:  # (by the categories the cells use)
            used = np.bincount(values.codes[values.codes >= 0], minlength=len(cats)) > 0
            return _text_kind(cats[used])
        return _text_kind(cats) if (values.codes >= 0).any() else "none"
    arr = np.asarray(values).ravel()
    if arr.dtype == bool:
        return "bool"
    if arr.dtype.kind in "iuf":
        for part in (arr[:256], arr):  # (another number among the first: at once)
            present = part[~np.isnan(part)] if part.dtype.kind == "f" else part
            if not np.isin(present, (0, 1)).all():
                return None
        return "01" if len(present) else "none"
    if arr.dtype.kind not in "OUS":
        return None
    if _text_kind(pd.unique(arr[:256].astype(object))) is None:  # (barcodes: at once)
        return None
    return _text_kind(pd.unique(arr.astype(object)))


def _one_flag(parts: list[Any]) -> list[Any]:
    """The stores' columns of one obs name, where some hold booleans and the others only
    0 and 1 (``is_primary_data`` written either way) or no value, with the 0s and 1s as
    booleans (and a column of no value as missing booleans, not as numbers): one
    flag, read as ``obs_filter`` reads it (``True`` keeps both forms), not as four groups
    (or two stores' booleans joined as numbers). Other columns as they are."""
    if len(parts) < 2:
        return parts
    kinds = []
    for part in parts:  # (the first store's column that is no flag ends the look)
        kind = _flag_kind(part)
        if kind is None:
            return parts
        kinds.append(kind)
    if "bool" not in kinds or not {"01", "none"} & set(kinds):
        return parts
    out = []
    for part, kind in zip(parts, kinds, strict=True):
        if kind in ("01", "none"):  # (a store's column of missing values only: missing flags)
            texts = text_or_none(_whole_floats_as_ints(_plain_values(part)))
            flags = np.full(len(texts), None, dtype=object)
            flags[texts == "1"], flags[texts == "0"] = True, False
            missing = pd.isna(flags).any()
            part = pd.array(flags, dtype="boolean") if missing else flags.astype(bool)
        out.append(part)
    return out


def allow_open_files(n_stores: int) -> None:
    """Raise this process's soft limit on open files (``ulimit -n``, often 1024) toward its
    hard limit where ``n_stores`` might not fit under it: an h5ad store keeps its file open,
    and the direct readers keep up to :data:`~cellsift.data._direct.FILES`' limit more."""
    import resource

    from ._direct import FILES

    need = n_stores + FILES.limit + 256  # (and the rest of the process's files)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if raised > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        logger.info("open-file limit raised from %d to %d for %d stores", soft, raised, n_stores)
    if raised < need:  # the direct reads keep fewer, leaving room for the rest of the process
        FILES.limit = max(8, min(FILES.limit, (raised - n_stores) // 4))


def _as_written(arr: np.ndarray) -> np.ndarray:
    """Floats narrower than float64 as the float64 of the decimal they are written as
    (float32 0.1 is 0.1, not 0.10000000149011612), so that a store of float32 and one of
    float64 join to one value; other arrays as they are."""
    if arr.dtype.kind == "f" and arr.dtype.itemsize < 8:
        return arr.astype(str).astype(np.float64)
    return arr


#: pandas' nullable arrays by dtype name: values and a mask (True: missing)
_MASKED = {
    "boolean": (pd.arrays.BooleanArray, np.bool_),
    "Int64": (pd.arrays.IntegerArray, np.int64),
    "UInt64": (pd.arrays.IntegerArray, np.uint64),
    "Float64": (pd.arrays.FloatingArray, np.float64),
}


def _all_missing(n: int, dtype: str) -> Any:
    """``n`` missing values of pandas' nullable ``dtype`` (from arrays, not a list of n)."""
    kind, values = _MASKED[dtype]
    return kind(np.zeros(n, values), np.ones(n, np.bool_))


def _joinable(column: Any, dtype: str) -> Any:
    """A store's column of numbers as the nullable ``dtype`` ("Int64", "UInt64",
    "Float64") that missing values join: booleans as 0/1, narrow floats as the decimal they
    are written as (:func:`_as_written`: float32 0.1 is 0.1)."""
    if isinstance(column, pd.api.extensions.ExtensionArray):
        if dtype == "Float64" and pd.api.types.is_float_dtype(column.dtype):
            column = _plain_values(column)  # (as numpy's floats, NaN where missing)
        else:
            return pd.array(column, dtype=dtype)
    wide = {"Float64": np.float64, "UInt64": np.uint64}.get(dtype, np.int64)
    return pd.array(_as_written(np.asarray(column)).astype(wide), dtype=dtype)


def _beyond_int64(column: Any) -> bool:
    """Whether a store's column holds unsigned whole numbers beyond Int64's range."""
    dtype = pd.Series(column[:0]).dtype
    if not (pd.api.types.is_unsigned_integer_dtype(dtype) and dtype.itemsize == 8):
        return False
    values = pd.Series(column).dropna()
    return bool(len(values)) and int(values.max()) > np.iinfo(np.int64).max


def _whole_floats_as_ints(values: Any) -> np.ndarray:
    """``values`` as objects for a column joined across stores as text, whole floats (and
    float categories) as ints: a store that holds a column of whole numbers with gaps as
    floats would read donor 1000 as "1000.0" where another reads "1000". Dates as their
    text ("2020-01-31", as a store of text holds them), float32 as it is written ("0.1")."""
    if isinstance(values, pd.Categorical):
        if not len(values.categories):
            return np.asarray(values, dtype=object)
        cats = np.asarray(values.categories)
        # (by the categories, not numpy's reading of the column: whole-number categories
        # with a missing value would come as floats, donor 1 as "1.0")
        cats = _whole_floats_as_ints(cats) if cats.dtype.kind in "fmMO" else cats.astype(object)
        out: np.ndarray = cats[np.maximum(values.codes, 0)]
        out[values.codes < 0] = None
        return out
    arr = _as_written(np.asarray(values))
    if arr.dtype.kind in "mM":  # dates and durations as their text, not as nanoseconds
        return text_or_none(arr)
    if arr.dtype == object:  # (mixed objects: their whole floats)
        return objects_whole_as_ints(arr)
    if arr.dtype.kind != "f":
        return np.asarray(arr, dtype=object)
    out = arr.astype(object)
    whole = np.isfinite(arr) & (np.abs(arr) < 2**53)
    whole[whole] = arr[whole] == np.round(arr[whole])
    out[whole] = arr[whole].astype(np.int64).astype(object)
    return out


def column_list(value: Any, what: str) -> list[Any] | None:
    """Obs columns given as one name (text, not its letters), a list or any iterable of
    names (read once, here) as a list; None or False as None; anything else (True, bytes,
    a mapping, an array not of one axis) a ConfigError naming ``what``."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        return [value]
    listed = isinstance(value, Iterable) and not isinstance(
        value, bytes | bytearray | memoryview | Mapping
    )
    if not listed or getattr(value, "ndim", 1) != 1:
        raise ConfigError(
            f"{what} names obs columns (a list, or one column as text), not {value!r}."
        )
    return list(value)


def _as_text(values: Any) -> np.ndarray:
    """An obs column as text (None where missing), whole floats as ints (also the floats
    of a column of mixed objects: [1.0, "a"] reads "1", "a", as a filter of 1.0 does)."""
    values = _plain_values(values)
    if isinstance(values, pd.Categorical):  # (by its categories: [1, NaN] is not "1.0")
        return text_or_none(_whole_floats_as_ints(values))
    if np.asarray(values).dtype.kind in "fO":
        return text_or_none(_whole_floats_as_ints(values))
    return text_or_none(values)


def value_text(value: Any) -> str | None:
    """One value as :func:`_as_text` reads a column of it (1015.0 and 1015 are "1015"; None
    where missing): how a filter's or a split's given values meet the columns."""
    return _as_text(np.array([value]))[0]


#: a flag's two forms: booleans, and 0/1 (as numbers, or whole floats, read)
_FLAG_FORMS = {"True": "1", "False": "0", "1": "True", "0": "False"}


def filter_texts(value: Any) -> list[str]:
    """The texts of a column's values that a filter's given ``value`` keeps: its own
    (:func:`value_text`), and for a flag given as a boolean or as the number 0 or 1, the
    other form too, so that ``True`` keeps the cells of a column of booleans and of one of
    0/1 (one store's ``is_primary_data`` written as either). Text is only itself."""
    text = value_text(value)
    if text is None:
        return []
    flag = isinstance(value, bool | np.bool_) or (
        isinstance(value, numbers.Number) and text in ("0", "1")
    )
    return [text, _FLAG_FORMS[text]] if flag and text in _FLAG_FORMS else [text]


def check_count_values(data: np.ndarray, where: str, fix: str, chunk: int = 1 << 22) -> None:
    """Raise a :class:`DataError` naming ``where`` (and ending with ``fix``) if the stored
    values ``data`` hold NaN or infinities, negatives, non-integers or values of 2**24 or
    more (which float32, in which counts are read, would round): not raw counts.
    Read ``chunk`` values at a time, so that a whole atlas in memory costs no full-size
    temporaries."""
    for start in range(0, len(data), chunk):
        block = data[start : start + chunk]
        first = first_fault(block)[0]
        if first < 0:
            continue
        v = block[first]
        if not np.isfinite(v):
            raise DataError(
                f"{where}: contains NaN or infinite values (or values past float32's "
                f"largest, about 3.4e38, read as infinite); counts must be finite.{fix}"
            )
        if v < 0:
            raise DataError(
                f"{where}: contains negative values ({v:g}); these are not "
                f"counts (scaled or centred data?).{fix}"
            )
        if v >= COUNT_LIMIT:
            raise DataError(
                f"{where}: contains {_as_float32(v)}; counts are below {COUNT_LIMIT:,}, "
                f"{_TOO_LARGE}.{fix}"
            )
        raise DataError(
            f"{where}: contains non-integer values (e.g. {v:.4g}); these look "
            f"normalised or log-transformed, not raw counts.{fix}"
        )


#: Why a value of :data:`COUNT_LIMIT` or more is no count, for messages.
_TOO_LARGE = (
    "from where float32, in which counts are read, rounds whole numbers; no gene's count "
    "in one cell nears it: scaled values, or sums over cells (a pseudobulk's: embed one "
    "with check_counts=False, its cells' values checked as they were summed)"
)


def _as_float32(v: float) -> str:
    """A value of :data:`COUNT_LIMIT` or more as float32 reads it, for messages: whole
    digits up to 1e15, else in exponent form."""
    with np.errstate(over="ignore"):
        read = float(np.float32(v))
    if not np.isfinite(read):
        return f"a value beyond float32's largest ({v:.10g}; about 3.4e38)"
    text = f"{read:,.0f}" if read < 1e15 else f"{read:.6g}"
    return f"a value float32 reads as {text}"


def _other_layers(store: CellStore) -> str:
    """Where else the store's file (or AnnData in memory) holds counts, for messages: its
    layers and raw, quoted, e.g. ``'counts', 'raw'``; "" where it holds none."""
    if store.format == "memory":  # (an AnnData in memory names its own)
        return ", ".join(f"'{k}'" for k in store.count_places)  # type: ignore[attr-defined]
    root = getattr(store, "handle", None)
    if root is None:
        return ""
    try:
        names = [f"'{k}'" for k in root["layers"].keys()] if "layers" in root else []
        if "raw" in root:
            names.append("'raw'")
        return ", ".join(names)
    except Exception:  # non-AnnData stores have no layers to suggest
        return ""


def _holder(store: CellStore) -> str:
    """What holds a store's counts, for messages: "this AnnData" (in memory), else "this
    file"."""
    return "this AnnData" if store.format == "memory" else "this file"


def _where(store: CellStore) -> str:
    """A store's counts as messages name them: ``path (X)``, or its layer in place of X."""
    return f"{store.path} ({'X' if store.layer is None else store.layer})"


def _map_values(col: Any, mapping: Mapping[str, str]) -> pd.Categorical:
    """``col`` through ``mapping``, one lookup per category (missing values stay missing)."""
    cat = col if isinstance(col, pd.Categorical) else pd.Categorical(np.asarray(col).astype(str))
    if len(cat.categories) == 0:
        return cat
    mapped = np.asarray([mapping.get(str(c), str(c)) for c in cat.categories], dtype=object)
    values = np.where(cat.codes >= 0, mapped[np.maximum(cat.codes, 0)], None)
    return pd.Categorical(values)
