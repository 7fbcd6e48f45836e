"""Cell stores: one file or database of cells, read by sorted row sets as CSR counts.

``open_store(path)`` picks the backend from the path. Every store exposes ``n_obs``,
``var_names``, lazily loaded obs columns and ``read(rows) -> CSR``; none ever materialises
the whole count matrix. Handles are opened lazily and re-opened in a forked process (a
DataLoader worker), so stores can be pickled into workers.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils import positions
from ..errors import ConfigError, DataError, MissingKeyError
from .writers import Format, _zarr_attributes, guess_format, is_store

__all__ = ["CellStore", "open_store"]

#: Most values (stored entries, or cells x genes for a dense store) that one chunk of a
#: whole-store scan holds: 64 Mi, 256 MB as float32, whatever the number of genes.
SCAN_VALUES = 1 << 26


#: What each kind of path that cellsift reads is, for messages when one is passed for another.
KINDS = {
    "cells": "a store of cells' counts (h5ad, Zarr or TileDB-SOMA)",
    "model": "a model bundle (MetricModel.save, cellsift fit)",
    "index": "a CellIndex (cellsift index)",
    "embeddings": "an embeddings store (cellsift embed)",
}


def kind_of(path: Path) -> str | None:
    """Which of :data:`KINDS` ``path`` is, read from the files each kind writes; None when
    it is none of them (or does not exist)."""
    if path.is_dir():
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return "model"
        manifest = _json(path / "manifest.json")
        if isinstance(manifest, dict) and manifest.get("format") == "cellsift.CellIndex":
            return "index"
        if (_zarr_attributes(path) or {}).get("cellsift") == "embeddings":
            return "embeddings"
    return "cells" if is_store(path, unreadable=False) else None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def refuse_other(path: Path, wanted: str, error: type[Exception] = DataError) -> None:
    """``error`` naming what ``path`` is when it is another kind of cellsift path than
    ``wanted`` (a key of :data:`KINDS`): an index passed as a model, a model as cells."""
    kind = kind_of(path)
    if kind is not None and kind != wanted:
        raise error(f"{path} is {KINDS[kind]}, not {KINDS[wanted]}.")


def _no_such_path(path: str | os.PathLike[str]) -> str:
    """That ``path`` does not exist; where it starts with ``~``, that Python does not
    expand it to the home folder (a shell does, unquoted), and the path written out."""
    said = f"{path} does not exist."
    if str(path).startswith("~") and os.path.expanduser(path) != str(path):
        said += (
            f" '~' is not expanded to a home folder here: write the path out "
            f"({os.path.expanduser(path)})."
        )
    return said


def check_sorted_rows(rows: np.ndarray, n: int, name: str, of: str) -> None:
    """An IndexError unless ``rows`` (1-d) rise strictly (sorted, each once) within
    [0, ``n``)."""
    if rows.ndim != 1:
        raise IndexError(f"{name} are a 1-d list of cells, not of shape {rows.shape}.")
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(
            f"{name} must lie in [0, {n}) ({of}), not {int(rows.min())} .. {int(rows.max())}."
        )
    if len(rows) > 1 and not (np.diff(rows) > 0).all():
        raise IndexError(f"{name} must be sorted, each once (np.unique gives them so).")


class CellStore(ABC):
    """A store of cells: counts by row, obs columns, var.

    Subclasses implement ``_open``, ``_read_rows``, ``_load_obs_column``, ``_load_var``,
    ``obs_columns`` and ``n_obs``.
    """

    format: Format

    def __init__(
        self, path: str | os.PathLike[str], *, layer: str | None = None, on_disk: bool = True
    ) -> None:
        self.path = Path(path)  # as given: messages and outputs name it so (in memory: a name)
        # what the store opens its files by, later and in loader processes: made absolute
        # now (a relative path would lead elsewhere once the working folder changes), with
        # its links and ".." kept (the folder a link's ".." leads to is the system's to say)
        self.file = self.path.absolute() if on_disk else self.path
        self.on_disk = on_disk
        self.layer = layer
        self._pid: int | None = None
        self._handle: Any = None
        self._obs_cache: dict[str, Any] = {}
        if on_disk and not self.path.exists():
            raise FileNotFoundError(_no_such_path(self.path))

    # -- handle management --------------------------------------------------------------
    #: Files in a store's folder whose change says the store was rewritten (Zarr's
    #: metadata: rewritten in place, the folder keeps its inode).
    _anchors: tuple[str, ...] = ()

    @property
    def handle(self) -> Any:
        """The open backend handle of this process (re-opened after a fork, or after
        :meth:`close`): of the file or folder first opened, unchanged, else a
        :class:`DataError` (what was read of the store, its size and genes, is of that
        one)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = None
            self._same_as_first_opened()
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def _identity(self) -> tuple[Any, ...]:
        """What tells this store's file (its inode and size: ``file_identity``) or folder
        (its inode, and those of its :attr:`_anchors`) from another written at its path."""
        from ._direct import file_identity

        st = os.stat(self.file)
        if not stat.S_ISDIR(st.st_mode):
            return file_identity(st)
        anchors = []
        for name in self._anchors:
            with contextlib.suppress(FileNotFoundError):
                anchors.append((name, *file_identity(os.stat(self.file / name))))
        return (st.st_dev, st.st_ino, *anchors)

    def _same_as_first_opened(self) -> None:
        if not self.on_disk:
            return
        first = self.__dict__.get("_first_identity")
        try:
            now = self._identity()
        except FileNotFoundError:
            if first is None:  # (the store's own error, as it opens)
                return
            raise DataError(
                f"{self.path} was removed since the store opened it: restore it, or open "
                "the store again."
            ) from None
        if first is None:
            self._first_identity = now
        elif first != now:
            raise DataError(
                f"{self.path} was replaced or rewritten since the store opened it: open the "
                "store again to read what is there now."
            )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        """Close the store's files (it opens them again when read)."""
        from ._direct import FILES

        if self._handle is not None and self._pid == os.getpid() and hasattr(self._handle, "close"):
            self._handle.close()
        self._handle = None
        if self.file.exists():  # (a store in memory: only a name)
            FILES.forget(self.file)

    def _error(self, what: str, fix: str) -> DataError:
        return DataError(f"{self.path}: {what} {fix}")

    def _check_length(
        self, what: str, n: int, expected: int, of: str, unit: str = "entries"
    ) -> None:
        """An element of ``n`` ``unit`` where the matrix has ``expected`` ``of`` (anndata
        refuses such a file; read, cells would take other values or read past the end)
        named as the file's damage."""
        if n != expected:
            raise self._error(
                f"{what} holds {n:,} {unit} for {expected:,} {of}: the file is damaged or "
                "incomplete.",
                "Write it again, or copy it again from its source.",
            )

    def _no_layer(self, what: str, fix: str) -> MissingKeyError:
        """The counts location ``layer`` names is not in this store."""
        return MissingKeyError(f"{self.path}: {what} {fix}")

    # -- backend hooks ------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> Any: ...

    @abstractmethod
    def _read_rows(self, rows: np.ndarray) -> sp.csr_matrix: ...

    @abstractmethod
    def _load_obs_column(self, name: str) -> Any: ...

    @abstractmethod
    def _load_var(self) -> pd.DataFrame: ...

    @property
    @abstractmethod
    def obs_columns(self) -> list[str]: ...

    @property
    @abstractmethod
    def n_obs(self) -> int: ...

    # -- shared API ---------------------------------------------------------------------
    @cached_property
    def var(self) -> pd.DataFrame:
        """Gene table: index = var_names, plus any columns (e.g. ``gene_ids``, ``feature_name``)."""
        return self._load_var()

    @property
    def var_names(self) -> pd.Index:
        return self.var.index

    @cached_property
    def n_vars(self) -> int:
        return len(self.var)

    def release_var(self) -> None:
        """Let go of the gene table read so far (read again when next asked for), its gene
        count kept: a collection keeps each store's gene map, not its table, which for a
        few thousand genes of text is about half a megabyte a store."""
        _ = self.n_vars
        self.__dict__.pop("var", None)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_obs, self.n_vars

    def obs_column(self, name: str) -> Any:
        """One obs column, loaded on first use (categorical or numpy array)."""
        if name not in self._obs_cache:
            if name not in self.obs_columns:
                where = "adata.obs." if self.format == "memory" else "the file."
                has = ", ".join(self.obs_columns)
                raise MissingKeyError(
                    f"{self.path}: obs has no column {name!r}; it has {has}. Pick one of "
                    f"these or add the column to {where}"
                    if has
                    else f"{self.path}: obs has no column {name!r}, nor any other. Add it to "
                    f"{where}"
                )
            column = self._load_obs_column(name)
            self._check_length(f"obs column {name!r}", len(column), self.n_obs, "cells", "values")
            self._obs_cache[name] = column
        return self._obs_cache[name]

    def stored_row_nnz(self) -> np.ndarray | None:
        """Genes detected per cell if the store keeps them (a CSR row pointer), else None."""
        return None

    #: The counts store zeros as entries (found by the collection's opening check): a row
    #: pointer then overcounts genes, and genes per cell are counted from the values.
    stored_zeros = False

    def row_nnz(self, exact: bool = False) -> np.ndarray:
        """Genes detected per cell: free with a row pointer (CSR) that holds no stored zeros,
        else one pass over the values (cached). ``exact``: from the values whatever the
        opening sample found (zeros stored outside it are not counted either)."""
        stored = None if self.stored_zeros or exact else self.stored_row_nnz()
        if stored is not None:
            return stored
        if "__row_nnz" not in self._obs_cache:
            self._scan_rows()
        return self._obs_cache["__row_nnz"]

    @property
    def nnz(self) -> int | None:
        """Stored nonzero entries, when known without reading the data."""
        stored = None if self.stored_zeros else self.stored_row_nnz()
        return None if stored is None else int(stored.sum())

    def read(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of ``rows`` (sorted, unique, in ``[0, n_obs)``) as float32 CSR."""
        rows = positions(rows)  # (float rows: an error, not truncated to others)
        check_sorted_rows(rows, self.n_obs, "rows", f"the cells of {self.path}")
        return self._read_rows(rows)

    def iter_chunks(self, chunk_size: int = 65_536) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Scan the whole store in row order: ``(start_row, counts)`` chunks of at most
        ``chunk_size`` cells and about :data:`SCAN_VALUES` values (see :meth:`chunk_bounds`)."""
        for start, stop in self.chunk_bounds(chunk_size):
            yield start, self.read(np.arange(start, stop))

    def chunk_bounds(self, chunk_size: int = 65_536) -> list[tuple[int, int]]:
        """Row ranges ``[start, stop)`` that scan the store, each of at most ``chunk_size``
        cells and :data:`SCAN_VALUES` values (a single cell may hold more), counted by
        :meth:`values_per_row`."""
        return cut_by_values(self.values_per_row(), chunk_size)

    def values_per_row(self) -> np.ndarray:
        """Values each cell holds, to plan scans by: the row pointer's where the store keeps
        one; else the store's mean where its total is known (SOMA); else every gene (dense)."""
        stored = self.stored_row_nnz()
        if stored is not None:
            return stored
        total = self.nnz
        per = -(-total // self.n_obs) if total is not None and self.n_obs else self.n_vars
        return np.full(self.n_obs, max(per, 1), dtype=np.int64)

    def _read_block(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        """Counts of cells ``start`` to ``stop - 1`` as CSR, or as the dense block a store
        holds them in (read without a sparse copy)."""
        return self.read(np.arange(start, stop))

    def _scan_rows(self) -> None:
        """Genes detected and total counts per cell, in one pass (both cached)."""
        nnz = np.zeros(self.n_obs, dtype=np.int64)
        sums = np.zeros(self.n_obs, dtype=np.float64)
        for start, stop in self.chunk_bounds():
            x = self._read_block(start, stop)
            if isinstance(x, np.ndarray):
                nnz[start:stop] = np.count_nonzero(x, axis=1)
                sums[start:stop] = x.sum(1, dtype=np.float64)
            else:
                nnz[start:stop], sums[start:stop] = _csr_row_nnz_and_sums(x)
        self._obs_cache["__row_nnz"], self._obs_cache["__row_sums"] = nnz, sums

    def row_sums(self) -> np.ndarray:
        """Total counts per cell (one sequential pass, cached)."""
        if "__row_sums" not in self._obs_cache:
            self._scan_rows()
        return self._obs_cache["__row_sums"]

    def obs(self, columns: list[str] | None = None) -> pd.DataFrame:
        """An obs DataFrame of ``columns`` (all by default), indexed by the cells' obs
        names as an AnnData's obs is (where the store has names; else by position)."""
        # (one column as text, not its letters)
        cols = (
            self.obs_columns
            if columns is None
            else [columns]
            if isinstance(columns, str)
            else columns
        )
        names = getattr(self, "obs_names", None)  # (positions where the store has none)
        index = names if names is not None else pd.RangeIndex(self.n_obs)
        return pd.DataFrame({c: self.obs_column(c) for c in cols}, index=index)

    def __repr__(self) -> str:
        layer = f", layer={self.layer!r}" if self.layer else ""
        return f"{type(self).__name__}({str(self.path)!r}{layer}: {self.n_obs} cells x {self.n_vars} genes)"


def _csr_row_nnz_and_sums(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Nonzero values and their float64 sum per row of ``x``, with temporaries of a byte a
    value (the zeros' mask) beside those of its stored zeros: a scan chunk holds 64 Mi
    values, whose int64 running counts or float64 copy would take 512 MB each."""
    ptr = x.indptr.astype(np.int64) - int(x.indptr[0])
    data = x.data[int(x.indptr[0]) : int(x.indptr[-1])]
    lengths = np.diff(ptr)
    zeros = np.flatnonzero(data == 0)  # (stored zeros: few, or none)
    rows_of_zeros = np.searchsorted(ptr, zeros, side="right") - 1
    nnz = lengths - np.bincount(rows_of_zeros, minlength=len(lengths))
    sums = np.zeros(len(lengths), dtype=np.float64)
    # in float64, by row blocks of about 2**20 values (reduceat casts its whole input)
    for lo, hi in cut_by_values(lengths, max(len(lengths), 1), 1 << 20):
        held = np.flatnonzero(lengths[lo:hi]) + lo  # (reduceat gives an empty row a value)
        if len(held):
            block = data[ptr[lo] : ptr[hi]].astype(np.float64)
            sums[held] = np.add.reduceat(block, ptr[held] - ptr[lo])
    return nnz, sums


def cut_by_values(
    values: np.ndarray, max_rows: int, max_values: int | None = None
) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` over rows holding ``values`` values each: at most
    ``max_rows`` rows and ``max_values`` (default :data:`SCAN_VALUES`) values a range (a
    single row may hold more)."""
    if max_values is None:
        max_values = SCAN_VALUES
    if max_rows < 1:
        raise ValueError(f"a chunk holds at least 1 cell, not {max_rows}.")
    ends = np.cumsum(values, dtype=np.int64)
    bounds, start, n = [], 0, len(values)
    while start < n:
        base = int(ends[start - 1]) if start else 0
        fits = int(np.searchsorted(ends, base + max_values, side="right"))
        stop = min(n, start + max_rows, max(fits, start + 1))
        bounds.append((start, stop))
        start = stop
    return bounds


def is_anndata(value: Any) -> bool:
    """An AnnData object (in memory, a view or backed)."""
    import anndata as ad

    return isinstance(value, ad.AnnData)


def open_store(
    path: str | os.PathLike[str] | CellStore | Any,
    *,
    format: Format | None = None,
    layer: str | None = None,
    name: str = "adata",
    **options: Any,
) -> CellStore:
    """Open a store by path: ``*.h5ad`` (HDF5), ``*.zarr`` (AnnData-Zarr), a TileDB-SOMA
    Experiment; or an AnnData in memory (:class:`~cellsift.data._memory.MemoryStore`, which
    takes no ``options``; ``name`` stands for its path in messages and in
    :meth:`CellCollection.origin`).

    ``layer`` selects where counts live: ``None`` for X, a name in ``layers``, or ``"raw"``
    (AnnData stores; for SOMA the X layer name, default ``"raw"``).
    """
    if isinstance(path, CellStore):
        return path
    if is_anndata(path):
        from ._memory import MemoryStore

        if options:
            raise TypeError(
                f"{name}: an AnnData in memory takes no store options ({', '.join(options)}: "
                "they are for stores read from files). Open file stores with open_store(path, "
                "...) and pass them with the AnnData in a list."
            )
        return MemoryStore(path, layer=layer, name=name)
    if not Path(path).exists():
        raise FileNotFoundError(_no_such_path(path))
    refuse_other(Path(path), "cells")
    fmt = format or guess_format(path)
    cls: type[CellStore]
    if fmt == "h5ad":
        from ._h5ad import H5adStore as cls
    elif fmt == "zarr":
        from ._zarr import ZarrStore as cls
    elif fmt == "soma":
        from ._soma import SomaStore as cls
    else:
        raise ConfigError(f"unknown store format {fmt!r} for {path}; use h5ad, zarr or soma.")
    takes = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "path")]
    other = [n for n in options if n not in takes]
    if other:  # (a SOMA store's measurement= given for an h5ad file, say)
        a = {"h5ad": "an h5ad", "zarr": "a Zarr", "soma": "a TileDB-SOMA"}[fmt]
        why = f"its options: {', '.join(t for t in takes if t != 'layer')}"
        if fmt != "soma" and set(other) <= {"measurement", "var_id"}:
            why = f"{'that is' if len(other) == 1 else 'those are'} for TileDB-SOMA stores"
        raise ConfigError(f"{path} is {a} store, which takes no option {', '.join(other)} ({why}).")
    return cls(path, layer=layer, **options)
