"""Streaming writers: cells arrive in chunks and go straight to h5ad, Zarr or TileDB-SOMA.

No writer holds the count matrix in memory: only the current chunk, the row pointer and the
obs table (a few columns per cell) are kept. Writers write into a temporary path that is
moved into place on :meth:`StoreWriter.close`; :meth:`StoreWriter.abort` removes it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import numbers
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils import (
    TILEDB_NO_SIGNAL_HANDLERS,
    check_replaceable,
    import_optional,
    make_parent,
    objects_whole_as_ints,
    output_lock,
    place_output,
    reclaim_signals,
    remove_path,
    rename_apart,
    temp_sibling,
    text_or_none,
)
from ..errors import ConfigError, DataError

__all__ = ["FORMATS", "StoreWriter", "guess_format", "open_writer", "write_h5ad"]

Format = Literal["h5ad", "zarr", "soma"]
FORMATS: tuple[Format, ...] = ("h5ad", "zarr", "soma")

#: Elements per chunk of the CSR ``data``/``indices`` arrays: a random block of ~64 cells reads
#: a few chunks. Zarr shards group many chunks into one file.
CHUNK_ELEMS = 1 << 16
SHARD_ELEMS = 1 << 22
#: Values per submission of a SOMA X write: a chunk of cells is one query (one fragment)
#: submitted in pieces, so that a signal is answered within a piece (a fraction of a second).
SOMA_WRITE_VALUES = 1 << 20


def _store_marker(p: Path) -> Format | None:
    """The format of an existing store folder, by the files its format writes: a Zarr
    group that anndata encoded (its attributes say ``encoding-type: anndata``, or, written
    before anndata 0.8, it holds X and obs without an encoding), a TileDB
    group with a SOMA experiment's ``obs`` and ``ms``. Another Zarr group (an embeddings
    store, an image) or a folder that merely holds an ``ms`` is none."""
    zarr_attrs = _zarr_attributes(p)
    if zarr_attrs is not None:
        if zarr_attrs.get("encoding-type") == "anndata":
            return "zarr"
        # (anndata before 0.8 wrote no encoding: its groups X and obs tell it)
        unencoded = "encoding-type" not in zarr_attrs and "cellsift" not in zarr_attrs
        return "zarr" if unencoded and (p / "X").exists() and (p / "obs").exists() else None
    tiledb = (p / "__tiledb_group.tdb").is_file() or (p / "__group").is_dir()
    if tiledb and (p / "obs").is_dir() and (p / "ms").is_dir():
        return "soma"
    return None


def _zarr_attributes(p: Path) -> dict | None:
    """The attributes of the Zarr group ``p`` (version 3's zarr.json, version 2's .zattrs;
    empty where it has none); None where ``p`` is no Zarr group, or its metadata cannot be
    read."""
    try:
        if (p / "zarr.json").is_file():
            meta = json.loads((p / "zarr.json").read_text())
            attrs = meta.get("attributes", {}) if isinstance(meta, dict) else None
        elif (p / ".zgroup").is_file():
            zattrs = p / ".zattrs"
            attrs = json.loads(zattrs.read_text()) if zattrs.is_file() else {}
        else:
            return None
    except (OSError, ValueError):
        return {}  # (a Zarr group, but not one to tell as a store)
    return attrs if isinstance(attrs, dict) else {}


A_STORE = "a store (h5ad, Zarr, SOMA)"  # what a writer's output replaces


def is_store(path: Path, *, unreadable: bool = True) -> bool:
    """Is ``path`` a store that a conversion may replace: an h5ad file, a Zarr or SOMA
    folder (never another folder). ``unreadable``: what an h5ad file that HDF5 cannot
    open counts as (:func:`is_h5ad_file`)."""
    if path.is_dir():
        return _store_marker(path) is not None
    return is_h5ad_file(path, unreadable=unreadable)


def is_h5ad_file(path: Path, *, unreadable: bool = True) -> bool:
    """Is ``path`` an AnnData HDF5 file (named .h5ad or .h5): one anndata wrote (its root
    says ``encoding-type: anndata``, or, written by an older anndata, holds ``obs`` and
    ``var``), not another HDF5 file (a Cell Ranger matrix) or a file of another kind. A
    file locked by another process (an h5ad open in a notebook) is read without HDF5's
    lock to tell. An empty file, or an HDF5 file that cannot be opened (cut short,
    corrupt) is ``unreadable`` (default True: an output that overwrite replaces, as nothing
    readable is lost by it)."""
    if not (path.is_file() and path.suffix.lower() in (".h5ad", ".h5")):
        return False
    try:
        if path.stat().st_size == 0:
            return unreadable
        if not h5py.is_hdf5(path):
            return False
    except OSError:
        return False
    # read only, to look; a file another process holds open for writing refuses HDF5's
    # lock: looked at without it (not first: a file this process holds open refuses to be
    # opened again with other locking)
    for locking in (None, False):
        try:
            with h5py.File(path, "r", locking=locking) as f:
                encoding = f.attrs.get("encoding-type", b"")
                encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
                return encoding == "anndata" or ("obs" in f and "var" in f)
        except OSError:
            continue
    return unreadable  # (an HDF5 file that cannot be opened: cut short or corrupt)


#: The file name suffix each format writes.
SUFFIX: dict[str, str] = {"h5ad": ".h5ad", "zarr": ".zarr", "soma": ".soma"}


def check_named(path: str | os.PathLike[str], fmt: str, fix: str | None = None) -> None:
    """A ConfigError where ``path``'s suffix names another format than ``fmt`` (an HDF5 file
    named .zarr, which no reader would then open as what its name says); ``fix``: what to
    do instead (default: name it for ``fmt``, or leave the format out). An h5ad named
    as a folder (``out/``: pathlib drops the separator, and the file took the folder's
    name) is refused too."""
    text = os.fspath(path)
    if fmt == "h5ad" and text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        raise ConfigError(
            f"{text} names a folder (it ends in a separator), and an h5ad is one file: give "
            f"the file's name, e.g. {os.path.join(text, 'cells.h5ad')}."
        )
    fix = fix or f"name it *{SUFFIX.get(fmt, '')}, or leave the format out."
    named = named_format(Path(path).name)
    if named is not None and named != fmt:
        raise ConfigError(f"{path} is named as {named} but the format asked for is {fmt}: {fix}")
    table = Path(path).suffix.lower()
    if table in _TABLE_SUFFIXES:  # (an HDF5 or Zarr store no table reader opens)
        raise ConfigError(f"{path} is named as a {table} table, and this writes {fmt}: {fix}")


#: Suffixes of tables (text or Parquet), which no store written under them is.
_TABLE_SUFFIXES = frozenset({".csv", ".tsv", ".txt", ".parquet", ".json"})


def named_format(name: str) -> Format | None:
    """The format a file name's suffix names (``.h5ad``/``.h5``, ``.zarr``, ``.soma``/
    ``.tiledb``); None for another suffix."""
    name = name.lower()
    if name.endswith(".h5ad") or name.endswith(".h5"):
        return "h5ad"
    if name.endswith(".zarr"):
        return "zarr"
    if name.endswith(".soma") or name.endswith(".tiledb"):
        return "soma"
    return None


def guess_format(path: str | os.PathLike[str]) -> Format:
    """Tell a store's format from its path (an existing store is inspected)."""
    p = Path(path)
    marker = _store_marker(p) if p.is_dir() else None
    if marker is not None:
        return marker
    named = named_format(p.name)
    if named is not None:
        return named
    raise ConfigError(
        f"Cannot tell the format of {p}: name it *.h5ad, *.zarr or *.soma, or pass format=."
    )


class StoreWriter:
    """Write cells chunk by chunk; :meth:`close` moves the finished store into place."""

    format: Format

    def __init__(
        self,
        path: str | os.PathLike[str],
        var: pd.DataFrame,
        *,
        n_obs: int | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path = Path(path)
        check_replaceable(self.path, overwrite, is_store, A_STORE)
        self.overwrite = overwrite
        make_parent(self.path)
        # held until close or abort: no other process writes the store meanwhile
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(output_lock(self.path, A_STORE))
        self.tmp = temp_sibling(self.path)  # (a name: leftovers are the lock's to clear)
        with self._setting_up():
            self.var = _clean_frame(var)
            if not self.var.index.is_unique:
                dups = var.index[var.index.duplicated()].unique()[:5].tolist()
                raise DataError(
                    f"{path}: var_names must be unique to write a store, and {dups} appear "
                    "more than once. Make them unique first (adata.var_names_make_unique())."
                )
        self.n_vars = len(var)
        self.n_obs_expected = n_obs
        self.n_obs = 0
        self._obs: list[pd.DataFrame] = []

    # -- subclass hooks -----------------------------------------------------------------
    def _append_x(self, x: sp.csr_matrix) -> None:
        raise NotImplementedError

    def _finish(self, obs: pd.DataFrame) -> None:
        raise NotImplementedError

    # -- public -------------------------------------------------------------------------
    def append(self, x: sp.spmatrix | np.ndarray, obs: pd.DataFrame) -> None:
        """Append a chunk of cells: counts ``x`` (cells x genes) and their ``obs`` rows."""
        x = sp.csr_matrix(x)
        if x.shape[1] != self.n_vars:
            raise ValueError(f"chunk has {x.shape[1]} genes, the store {self.n_vars}.")
        if x.shape[0] != len(obs):
            raise ValueError(f"chunk has {x.shape[0]} cells but {len(obs)} obs rows.")
        if not x.has_canonical_format:  # (summed in a copy: csr_matrix(x) shares x's arrays)
            x = x.copy()
            x.sum_duplicates()
        self._append_x(x)
        self._obs.append(obs)
        self.n_obs += x.shape[0]

    def close(self) -> Path:
        """Finish the store and move it to its final path atomically."""
        try:
            if self.n_obs_expected is not None and self.n_obs != self.n_obs_expected:
                raise ValueError(f"{self.n_obs} cells written, {self.n_obs_expected} announced.")
            obs = (
                _concat_obs(self._obs, self.path)
                if self._obs
                else pd.DataFrame(index=pd.Index([], dtype=str))
            )
            self._finish(_clean_frame(obs))
            # (checked again: what appeared at the path while the cells were written)
            place_output(self.tmp, self.path, self.overwrite, is_store, A_STORE)
        except BaseException:
            self.abort()
            raise
        self._lock.close()
        return self.path

    def abort(self) -> None:
        """Remove the partial output."""
        try:
            if self.tmp.exists():
                remove_path(self.tmp)
        finally:
            self._lock.close()

    @contextlib.contextmanager
    def _setting_up(self) -> Iterator[None]:
        """Around a writer's creation of its temporary output: a failure there (a bad
        option, a column type the format lacks) removes it; the writer never reached a
        ``with`` that would."""
        try:
            yield
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _is_date(dtype: Any) -> bool:
    """Dates, times and durations (time zones too): text for the writers (:func:`_clean_frame`)."""
    return isinstance(dtype, pd.DatetimeTZDtype) or getattr(dtype, "kind", None) in ("m", "M")


def _check_reserved(df: pd.DataFrame, what: str, path: str | os.PathLike[str]) -> None:
    """anndata's files keep a frame's index under ``_index``: a column of that name cannot
    be written (anndata would say so only as the store is finished); nor can one, or an
    index, named ``""`` or ``"."`` (an h5ad whose obs anndata cannot read back)."""
    if "_index" in df.columns:
        raise DataError(
            f"{path}: {what} has a column named '_index', a name anndata keeps for the "
            f"index; rename it (adata.{what}.rename(columns={{'_index': ...}})) and convert "
            "again."
        )
    named = [(str(c), "column", f"adata.{what}.rename(columns=...)") for c in df.columns]
    if df.index.name is not None:
        named.append((str(df.index.name), "index name", f"adata.{what}.index.name = None"))
    for name, kind, fix in named:
        if name in ("", "."):
            raise DataError(
                f"{path}: the {what} {kind} {name!r} names no element of its own, and anndata "
                f"stores each under its name (a file written so does not read back); rename "
                f"it ({fix}) and convert again."
            )


def _object_text(values: np.ndarray) -> np.ndarray:
    """Objects as text (None where missing), whole floats as ints, as a collection reads a
    column of them: 1000.0 is donor "1000" in every format."""
    return text_or_none(objects_whole_as_ints(values))


def _mixed_kinds(values: np.ndarray) -> bool:
    """Whether objects mix kinds (text, True/False, numbers): one categorical of them would
    take True for 1 and False for 0, as pandas compares them."""
    return pd.api.types.infer_dtype(values, skipna=True) in ("mixed", "mixed-integer")


def _mixed(categories: pd.Index) -> bool:
    """Whether categories are objects not all text (text and numbers, or integers beyond
    int64): HDF5 stores categories of one kind only, as an array of numbers or of text."""
    return categories.dtype == object and not all(isinstance(v, str) for v in categories)


def _concat_obs(frames: list[pd.DataFrame], path: Path) -> pd.DataFrame:
    """``frames`` (chunks of obs, at least one) as one frame, where a column categorical in
    the first chunk that holds it stays so over the categories of every chunk
    (:class:`_CommonCategories`); cells of chunks without the column missing. pandas
    concatenates categoricals of other categories as objects, which would lose the unused
    categories, their order and ``ordered``."""
    union: dict[Any, _CommonCategories] = {}
    seen: set[Any] = set()
    codes: list[dict[Any, np.ndarray]] = []
    for frame in frames:
        mapped = {}
        for name in frame.columns:
            column = frame[name]
            if name not in seen and isinstance(column.dtype, pd.CategoricalDtype):
                union[name] = _CommonCategories(column.dtype, path, name)
            seen.add(name)
            if name in union:
                mapped[name] = union[name].codes(column)
        codes.append(mapped)
    plain = [frame.drop(columns=[n for n in union if n in frame.columns]) for frame in frames]
    out = pd.concat(plain)
    for name, common in union.items():
        held = [m.get(name, np.full(len(f), -1)) for m, f in zip(codes, frames, strict=True)]
        out[name] = pd.Categorical.from_codes(np.concatenate(held), dtype=common.dtype())
    order = list(dict.fromkeys(c for frame in frames for c in frame.columns))
    return out[order]


class _CommonCategories:
    """One obs column's categories over a writer's chunks: the first chunk's, in order,
    then each later chunk's new ones (text read as categories), ordered as the first
    one's, as a TileDB-SOMA store's enumeration grows. An ordered chunk whose order the
    common one contradicts is refused (:func:`_order_error`). Where True and False meet
    numbers (pandas takes True for 1), the categories are their text. Each chunk's codes
    are mapped onto the common categories: once for a chunk of the last one's categories
    (a column sliced into chunks, or each chunk rebuilt over the same ones:
    :func:`_same_categories`), else by one lookup per category of the chunk, so that the
    work is linear in the cells and categories. While every chunk holds the first one's
    categories, they are the column's as they are: no lookup at all."""

    def __init__(self, dtype: pd.CategoricalDtype, path: Path, name: Any) -> None:
        self.path, self.name, self.ordered = path, name, dtype.ordered
        self._first = dtype
        self.text = False
        #: the common categories, where each is, and their kinds ("bool", "number",
        #: "other"): made as a chunk of other categories first comes
        self.cats: list[Any] = []
        self.where: dict[Any, int] = {}
        self.kinds: set[str] = set()
        self._grown = False
        #: the last chunk's categories and where they are among the common ones (the
        #: first chunk's: where they are)
        self._last: tuple[pd.CategoricalDtype, np.ndarray | None] = (dtype, None)

    def dtype(self) -> pd.CategoricalDtype:
        if not self._grown:
            return self._first
        return pd.CategoricalDtype(self.cats, ordered=self.ordered)

    def codes(self, column: pd.Series) -> np.ndarray:
        """A chunk's column as codes of the common categories (-1: missing)."""
        if not isinstance(column.dtype, pd.CategoricalDtype):
            column = column.astype("category")
        dtype = column.dtype
        if not _same_categories(dtype, self._last[0]):
            self._last = (dtype, self._mapped(dtype))
        to_common = self._last[1]
        own = column.cat.codes.to_numpy()
        if to_common is None:  # (the first chunk's categories, the column's as they are)
            return own.astype(np.int64)
        if len(to_common) == 0:  # (no categories: every cell missing)
            return np.full(len(own), -1, dtype=np.int64)
        return np.where(own >= 0, to_common[np.maximum(own, 0)], -1)

    def _mapped(self, dtype: pd.CategoricalDtype) -> np.ndarray:
        """Where each of ``dtype``'s categories is among the common ones (new ones added)."""
        if not self._grown:  # (the first chunk's categories, looked up from now on)
            self._grown = True
            self.cats = list(self._first.categories)
            self.where = {c: i for i, c in enumerate(self.cats)}
            self.kinds = {_kind(c) for c in self.cats}
        own = dtype.categories
        if not self.text:
            self.kinds |= {_kind(c) for c in own}
            if {"bool", "number"} <= self.kinds:  # (True is not 1: all as text)
                self.text = True
                self.cats = list(_object_text(np.asarray(self.cats, dtype=object)))
                self.where = {c: i for i, c in enumerate(self.cats)}
        keys = _object_text(np.asarray(own, dtype=object)) if self.text else own
        before = len(self.cats)
        for c in keys:
            if c not in self.where:
                self.where[c] = len(self.cats)
                self.cats.append(c)
        to_common = np.fromiter((self.where[c] for c in keys), np.int64, len(own))
        # (its new categories go at the end in its order: its order holds where the
        # common places of its categories rise)
        if self.ordered and dtype.ordered and (np.diff(to_common) <= 0).any():
            raise _order_error(self.path, self.name, own, self.cats[:before])
        return to_common


#: what pandas.api.types.infer_dtype calls categories held as objects all of one kind,
#: among which equal values are the same category (unlike 1 and True; and floats, whose
#: equal values of two widths are other texts: np.float32(0.1) and 0.10000000149011612)
_ONE_KIND = frozenset({"string", "bytes", "integer", "boolean"})


def _same_categories(a: pd.CategoricalDtype, b: pd.CategoricalDtype) -> bool:
    """Whether ``a`` and ``b`` hold the same categories in the same order, as ordered:
    pandas' ``==`` takes unordered categories in any order as equal, and Index.equals
    takes 1 for True among objects, so categories held as objects are compared so only
    where each side holds one kind (strings, say: a chunk's column rebuilt by its caller
    over all the categories)."""
    if a is b:
        return True
    if a.ordered != b.ordered or a.categories.dtype != b.categories.dtype:
        return False
    if a.categories.dtype == object:
        kind = pd.api.types.infer_dtype(a.categories, skipna=False)
        if kind not in _ONE_KIND or pd.api.types.infer_dtype(b.categories, skipna=False) != kind:
            return False
    return bool(a.categories.equals(b.categories))


def _kind(value: Any) -> str:
    """ "bool" (True, False), "number" or "other": of these, pandas takes True for 1."""
    if isinstance(value, bool | np.bool_):
        return "bool"
    return "number" if isinstance(value, numbers.Number) else "other"


def _check_order(
    path: Path, name: Any, declared: pd.Index, grown: pd.Index, before: pd.Index
) -> None:
    """An ordered chunk's categories ``declared`` follow the order of the store's
    categories ``grown`` (those ``before`` it, then its new ones: categories grow at the
    end only); else :func:`_order_error`."""
    kept = set(declared)
    if [c for c in grown if c in kept] != list(declared):
        raise _order_error(path, name, declared, before)


def _order_error(path: Path, name: Any, declared: Any, before: Any) -> DataError:
    """The DataError of an ordered chunk whose order ``declared`` contradicts the
    categories ``before`` it."""
    return DataError(
        f"{path}: obs column {name!r} is an ordered categorical whose chunk declares the "
        f"order {list(declared)}, which the store cannot hold after {list(before)} (its "
        "categories grow at the end only). Give the first chunk every category, in order "
        "(pd.Categorical(values, categories=all_of_them, ordered=True))."
    )


def _clean_frame(df: pd.DataFrame, *, categories: bool = True) -> pd.DataFrame:
    """``df`` as the writers store it: the index as text; dates, times and durations as their
    text ("2020-01-31", "2020-01-31 10:00:00+01:00"; anndata and TileDB-SOMA store no
    datetimes with time zones); with ``categories`` (the AnnData layouts), text columns as
    categoricals (a column of text and numbers: all as text) and pandas' nullable floats as
    floats, missing values NaN (anndata writes no ``Float64`` arrays)."""
    df = df.copy()
    df.index = df.index.astype(str)
    if df.index.name is not None:  # (as text: anndata takes no other key)
        df.index.name = str(df.index.name)
    # an index named like a column: anndata keeps the name where the column holds the
    # index's values (text, as the index is written: left so, not made categories), and
    # refuses it otherwise (the name then dropped); TileDB-SOMA keeps it beside the columns
    alike = None
    if categories and df.index.name in df.columns:
        alike = df.index.name
        column = df[alike]
        texts = column.dtype == object or isinstance(column.dtype, pd.StringDtype)
        if isinstance(column.dtype, pd.CategoricalDtype):
            kind = column.cat.categories.dtype
            texts = pd.api.types.is_object_dtype(kind) or isinstance(kind, pd.StringDtype)
        same = texts and column.notna().all() and (column.astype(str).to_numpy() == df.index).all()
        if same:
            df[alike] = np.asarray(df.index, dtype=object)
        else:
            df.index.name = alike = None
    for col in df.columns:
        if col == alike:
            continue
        s = df[col]
        if _is_date(s.dtype):
            df[col] = text_or_none(s.array)
        elif isinstance(s.dtype, pd.CategoricalDtype) and _is_date(s.cat.categories.dtype):
            df[col] = s.cat.rename_categories(text_or_none(s.cat.categories.array))
        if categories and isinstance(df[col].dtype, pd.Float32Dtype | pd.Float64Dtype):
            df[col] = df[col].to_numpy(dtype=df[col].dtype.numpy_dtype, na_value=np.nan)
        if categories and df[col].dtype == object and _mixed_kinds(df[col].to_numpy()):
            df[col] = _object_text(df[col].to_numpy())  # (as TileDB-SOMA stores them)
        if categories and (df[col].dtype == object or isinstance(df[col].dtype, pd.StringDtype)):
            df[col] = df[col].astype("category")  # (anndata's writer refuses pandas' strings)
        if categories and isinstance(df[col].dtype, pd.CategoricalDtype):
            if _mixed(df[col].cat.categories):  # (as text: HDF5 holds categories of one kind)
                df[col] = pd.Categorical(text_or_none(df[col].to_numpy()))
    return df


#: The longest file or folder name most file systems take (ext4, XFS, APFS: 255 bytes).
NAME_MAX_BYTES = 255
_CSR_ATTRS = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"}
_ROOT_ATTRS = {"encoding-type": "anndata", "encoding-version": "0.1.0"}


class _AnnDataWriter(StoreWriter):
    """Shared logic of the AnnData layouts (h5ad and Zarr): X as CSR, obs/var via anndata."""

    def __init__(self, path: str | os.PathLike[str], var: pd.DataFrame, **kwargs: Any) -> None:
        _check_reserved(var, "var", path)
        super().__init__(path, var, **kwargs)
        self._indptr: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self._nnz = 0

    def append(self, x: sp.spmatrix | np.ndarray, obs: pd.DataFrame) -> None:
        _check_reserved(obs, "obs", self.path)  # (here, not once every cell is written)
        super().append(x, obs)

    def _append_x(self, x: sp.csr_matrix) -> None:
        self._write_elements(
            x.data.astype(np.float32, copy=False), x.indices.astype(np.int32, copy=False)
        )
        self._indptr.append(x.indptr[1:].astype(np.int64) + self._nnz)
        self._nnz += x.nnz

    def _write_elements(self, data: np.ndarray, indices: np.ndarray) -> None:
        raise NotImplementedError

    def _row_pointer(self) -> np.ndarray:
        """The row pointer to write: int32 as the column indices are, where the values'
        number fits (as anndata writes it; scipy's slices of a matrix whose pointer and
        indices differ in type fail), else int64."""
        indptr = np.concatenate(self._indptr)
        return indptr.astype(np.int32) if self._nnz <= np.iinfo(np.int32).max else indptr

    def _write_meta(self, root: Any, obs: pd.DataFrame) -> None:
        root.attrs.update(_ROOT_ATTRS)
        # obs/var are small: shard nothing (and say so, which also quiets anndata's notice).
        with ad.settings.override(auto_shard_zarr_v3=False):
            ad.io.write_elem(root, "obs", obs)
            ad.io.write_elem(root, "var", self.var)
            for key in ("uns", "obsm", "varm", "layers", "obsp", "varp"):
                ad.io.write_elem(root, key, {})


class _DroppingFile(io.FileIO):
    """A file that HDF5 writes through (h5py's file-object driver) and that, once a write to
    it failed (or once told to: :meth:`drop`), keeps what HDF5 writes in memory instead.

    HDF5 crashes the process (a segmentation fault) when a file whose write failed (a full
    disk, a file size limit) is closed or freed, even at exit: each time it flushes its
    caches again, and fails again. Through this file only the first failed write raises
    (in Python: it is kept as ``error``); HDF5's later writes, the flushes of its caches as
    the error unwinds and as the file closes, succeed in memory, and its reads see them, so
    that HDF5 closes the file as if the disk had taken it all (:func:`_close_h5` then
    raises the error: the output is incomplete, and is removed).
    """

    error: OSError | None = None
    interrupt: BaseException | None = None  # (Ctrl-C, SIGTERM: raised inside HDF5's call)
    _kept: list[tuple[int, bytes]] | None = None  # (offset, bytes), in the order written

    def drop(self) -> None:
        """From now on, keep HDF5's writes in memory (the output is not wanted)."""
        if self._kept is None:
            self._kept = []

    def _failed(self, err: BaseException) -> None:
        """A write or truncation that raised: kept (the first error, the first interrupt),
        and the rest of HDF5's writes go to memory."""
        if isinstance(err, OSError):
            self.error = self.error or err
        elif not isinstance(err, Exception):
            self.interrupt = self.interrupt or err
        self.drop()

    def write(self, b: Any) -> int:
        try:  # (all of it: an interrupt can come at any line HDF5's call runs)
            return self._write(memoryview(b).cast("B"))
        except BaseException as err:
            self._failed(err)
            raise

    def _write(self, view: memoryview) -> int:
        if self._kept is None:
            done = 0  # whole: a write short of the disk's end returns fewer bytes, which
            while done < len(view):  # HDF5's file-object driver would not notice
                wrote = super().write(view[done:])
                if not wrote:
                    raise OSError(errno.EIO, "a write to the file made no progress")
                done += wrote
            return done
        at = self.tell()
        self._kept.append((at, view.tobytes()))
        self.seek(at + len(view))
        return len(view)

    def readinto(self, buffer: Any) -> int:
        at = self.tell()
        view = memoryview(buffer).cast("B")
        n = super().readinto(view) or 0
        if self._kept is None:
            return n
        view[n:] = bytes(len(view) - n)  # (beyond the file: what only memory holds, or 0)
        for start, data in self._kept:  # (later writes over earlier ones)
            lo, hi = max(at, start), min(at + len(view), start + len(data))
            if lo < hi:
                view[lo - at : hi - at] = data[lo - start : hi - start]
        self.seek(at + len(view))
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        try:
            if self._kept is not None:  # (the file on disk stays as it is)
                return self.tell() if size is None else size
            return super().truncate(size)
        except BaseException as err:
            self._failed(err)
            raise


def _close_h5(file: h5py.File, raw: _DroppingFile, *, keep: bool = True) -> None:
    """Close ``file`` (written through ``raw``) and ``raw``. ``keep``: its content matters,
    and a write of it that failed (:class:`_DroppingFile`), however HDF5 took it, is raised;
    else what is left to write goes to memory. An interrupt raised inside HDF5's writes
    (Ctrl-C, SIGTERM) is raised as itself once the file is closed."""
    if not keep:
        raw.drop()
    try:
        if file.id.valid:
            file.close()
    except BaseException as err:  # (a write failed as it closed: again, into memory)
        raw.drop()
        with contextlib.suppress(Exception):
            if file.id.valid:
                file.close()
        raw.close()
        # (the file-object driver reports what its callback raised as another error)
        if raw.interrupt is not None and raw.interrupt is not err:
            raise raw.interrupt from None
        if keep and raw.error is not None and raw.error is not err:
            raise raw.error from err
        raise
    raw.close()
    if raw.interrupt is not None:
        raise raw.interrupt
    if keep and raw.error is not None:
        raise raw.error


def _open_h5(path: str | os.PathLike[str]) -> tuple[h5py.File, _DroppingFile]:
    """A new HDF5 file at ``path`` written through a :class:`_DroppingFile`, without a chunk
    cache: each write is made as it is asked for, so that one the disk refuses fails there,
    not as a dataset closes (where HDF5 would crash as it exits)."""
    raw = _DroppingFile(path, "w+")
    try:
        return h5py.File(raw, "w", rdcc_nbytes=0), raw
    except BaseException:
        raw.close()
        raise


def write_h5ad(adata: ad.AnnData, path: str | os.PathLike[str]) -> None:
    """``adata`` as an h5ad file at ``path`` (a temporary output: :func:`cellsift._utils.
    atomic_path`'s), as ``adata.write_h5ad`` writes it (text columns made categorical), but
    through a file that a failed write (a full disk) leaves closable: the error is raised
    instead of the process crashing (:class:`_DroppingFile`)."""
    adata.strings_to_categoricals()
    if adata.raw is not None:
        adata.strings_to_categoricals(adata.raw.var)
    file, raw = _open_h5(path)
    try:
        ad.io.write_elem(file, "/", adata)
    except BaseException:
        _close_h5(file, raw, keep=False)
        raise
    _close_h5(file, raw)


class H5adWriter(_AnnDataWriter):
    """h5ad (HDF5) with X as CSR in chunked datasets; uncompressed unless ``compression``."""

    format: Format = "h5ad"

    def __init__(
        self,
        path: str | os.PathLike[str],
        var: pd.DataFrame,
        *,
        compression: str | None = None,
        chunk_elems: int = CHUNK_ELEMS,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, var, **kwargs)
        self._chunk = chunk_elems
        # elements of no whole chunk yet: written a whole chunk at a time (with no chunk
        # cache, a part chunk would be read back, and recompressed, to be added to)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        with self._setting_up():  # (a failure removes the temporary output)
            self._file, self._raw = _open_h5(self.tmp)
            x = self._file.create_group("X")
            x.attrs.update(_CSR_ATTRS)
            opts = {"maxshape": (None,), "chunks": (chunk_elems,), "compression": compression}
            self._data = x.create_dataset("data", shape=(0,), dtype=np.float32, **opts)
            self._indices = x.create_dataset("indices", shape=(0,), dtype=np.int32, **opts)

    def _write_elements(self, data: np.ndarray, indices: np.ndarray) -> None:
        pending = sum(len(d) for d, _ in self._pending)
        if pending + len(data) < self._chunk:  # held back: a copy (the caller may fill its
            self._pending.append((data.copy(), indices.copy()))  # arrays again)
            return
        if self._pending:  # the chunk begun, completed from this append's head
            need = self._chunk - pending
            held = [*self._pending, (data[:need], indices[:need])]
            self._put(*(np.concatenate(part) for part in zip(*held, strict=True)))
            data, indices = data[need:], indices[need:]
        whole = len(data) // self._chunk * self._chunk  # (written from the caller's arrays)
        if whole:
            self._put(data[:whole], indices[:whole])
        # (the rest copied: a view would keep the whole append in memory)
        self._pending = [(data[whole:].copy(), indices[whole:].copy())] if whole < len(data) else []

    def _put(self, data: np.ndarray, indices: np.ndarray) -> None:
        """Write elements after those written."""
        n0 = len(self._data)
        for ds, values in ((self._data, data), (self._indices, indices)):
            ds.resize((n0 + len(data),))
            ds[n0:] = values

    def _finish(self, obs: pd.DataFrame) -> None:
        if self._pending:
            self._put(*(np.concatenate(part) for part in zip(*self._pending, strict=True)))
        x = self._file["X"]
        x.attrs["shape"] = (self.n_obs, self.n_vars)
        x.create_dataset("indptr", data=self._row_pointer())
        self._write_meta(self._file, obs)
        _close_h5(self._file, self._raw)

    def abort(self) -> None:
        try:
            if hasattr(self, "_file"):  # (none: its creation failed)
                _close_h5(self._file, self._raw, keep=False)
        finally:  # (the temporary output goes, whatever closing it raised)
            super().abort()


class ZarrWriter(_AnnDataWriter):
    """AnnData-Zarr, zarr format 3, ``data``/``indices`` in chunks grouped into shards.

    Elements are buffered and flushed a whole shard at a time, so no shard is rewritten.
    """

    format: Format = "zarr"

    def __init__(
        self,
        path: str | os.PathLike[str],
        var: pd.DataFrame,
        *,
        chunk_elems: int = CHUNK_ELEMS,
        shard_elems: int = SHARD_ELEMS,
        **kwargs: Any,
    ) -> None:
        import zarr

        super().__init__(path, var, **kwargs)
        with self._setting_up():  # (a failure removes the temporary output)
            self._check_names(self.var, "var")
            if shard_elems % chunk_elems:
                raise ValueError("shard_elems must be a multiple of chunk_elems.")
            self._root = zarr.open_group(self.tmp, mode="w", zarr_format=3)
            x = self._x_group = self._root.create_group("X")
            x.attrs.update(_CSR_ATTRS)
            # every shard gets its file, even one of fill values only: readers take a missing
            # shard for a lost one (an interrupted copy), never for zeros
            self._arrays = {
                name: x.create_array(
                    name,
                    shape=(0,),
                    dtype=dtype,
                    chunks=(chunk_elems,),
                    shards=(shard_elems,),
                    config={"write_empty_chunks": True},
                )
                for name, dtype in (("data", np.float32), ("indices", np.int32))
            }
            self._shard = shard_elems
            self._chunk = chunk_elems
            self._buffers: dict[str, list[np.ndarray]] = {"data": [], "indices": []}
            self._buffered = 0
            self._flushed = 0

    def append(self, x: sp.spmatrix | np.ndarray, obs: pd.DataFrame) -> None:
        self._check_names(obs, "obs")
        super().append(x, obs)

    def _check_names(self, frame: pd.DataFrame, what: str) -> None:
        """Each column (and the index, under its name) is a folder of the store: its name
        must be one folder's name."""
        named = [(str(col), "column", f"adata.{what}.rename(columns=...)") for col in frame]
        if frame.index.name is not None:
            fix = f"adata.{what}.index.name = None, or a shorter name"
            named.append((str(frame.index.name), "index name", fix))
        for name, kind, fix in named:
            size = len(name.encode())
            if "/" in name:
                why = "has a '/', which Zarr reads as a folder within a folder"
            elif name in ("", ".", ".."):
                why = "names no folder of its own"
            elif size > NAME_MAX_BYTES:
                why = (
                    f"is {size} bytes long, and most file systems take folder names of "
                    f"{NAME_MAX_BYTES} at most"
                )
            else:
                continue
            shown = name if len(name) <= 60 else name[:60] + "..."
            raise DataError(
                f"{self.path}: the {what} {kind} {shown!r} {why}; a Zarr store keeps each "
                f"column in a folder of its name. Rename it ({fix}), or write h5ad."
            )

    def _write_elements(self, data: np.ndarray, indices: np.ndarray) -> None:
        # held until a shard fills: copies, not the caller's arrays (a buffer it refills)
        self._buffers["data"].append(np.array(data, copy=True))
        self._buffers["indices"].append(np.array(indices, copy=True))
        self._buffered += len(data)
        if self._buffered >= self._shard:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        n = self._buffered if final else (self._buffered // self._shard) * self._shard
        if n == 0:
            return
        for name, arr in self._arrays.items():
            buf = np.concatenate(self._buffers[name])
            arr.resize((self._flushed + n,))
            arr[self._flushed : self._flushed + n] = buf[:n]
            self._buffers[name] = [buf[n:]]
        self._flushed += n
        self._buffered -= n

    def abort(self) -> None:
        """Remove the partial output once zarr's writes in flight have ended: a signal
        stops this thread inside zarr's wait, not the writes zarr's IO thread runs, which
        would otherwise make folders again in the output just removed."""
        _settle_zarr_io()
        super().abort()

    def _finish(self, obs: pd.DataFrame) -> None:
        self._flush(final=True)
        x = self._x_group
        x.attrs["shape"] = [self.n_obs, self.n_vars]
        indptr = self._row_pointer()
        x.create_array("indptr", data=indptr, chunks=(min(len(indptr), 1 << 20),))
        self._write_meta(self._root, obs)


def _settle_zarr_io(timeout: float = 60.0) -> None:
    """Wait (up to ``timeout`` seconds) for the tasks on zarr's IO event loop to end."""
    import asyncio
    import concurrent.futures

    from zarr.core import sync as zarr_sync

    loop = zarr_sync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def settle() -> None:
        this = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not this and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    # (a loop that stopped meanwhile, or writes still running at the timeout: the output is
    # removed all the same)
    with contextlib.suppress(RuntimeError, concurrent.futures.TimeoutError):
        asyncio.run_coroutine_threadsafe(settle(), loop).result(timeout + 1.0)


#: Metadata key of the obs and var dataframes of a SOMA store that cellsift writes: the input
#: columns stored under another name, as JSON ``{stored name: input name}``, which
#: :class:`~cellsift.data._soma.SomaStore` gives back under their own names.
SOMA_RENAMED = "cellsift_renamed_columns"

#: Metadata key of the obs and var dataframes of a SOMA store that cellsift writes: what
#: the stored columns do not say of the input frame, as JSON: ``index_name`` (its index's
#: name, or null: the names themselves are ``obs_id`` / ``feature_id``) and ``nullable``
#: (the stored names of its columns of pandas' nullable integers and booleans, which one
#: without missing values would not tell apart from a plain one: every Arrow field the
#: writer makes may hold nulls).
SOMA_FRAME = "cellsift_frame"

#: Columns that the SOMA layout fills itself: the join ids and the obs / var names.
SOMA_OBS_OWN = ("soma_joinid", "obs_id")
SOMA_VAR_OWN = ("soma_joinid", "feature_id")


class SomaWriter(StoreWriter):
    """TileDB-SOMA Experiment in the CELLxGENE Census layout.

    obs (``soma_joinid`` 0..n-1), measurement ``measurement`` (default ``RNA``) with var
    (``feature_id`` = var_names) and X layer ``layer`` (default ``raw``). The number of
    cells must be given up front (SOMA arrays have a fixed domain). X is tiled for reading
    cells (:func:`soma_row_tiles`) unless ``platform_config`` says otherwise. In that layout
    a chunk's counts (CSR: cells, then genes in order) are already in the array's global
    order, so they are written as such: no sort, one fragment per chunk, in pieces of
    :data:`SOMA_WRITE_VALUES` values between which a signal is answered.

    An input column named like one the layout fills itself (``obs_id`` in obs, ``feature_id``
    in var) is stored as ``<name>_orig``, one SOMA reserves (``soma_*``: the ``soma_joinid``
    that ``cellxgene_census.get_anndata`` leaves) as ``orig_<name>``; the renames are recorded
    in the dataframe's metadata (:data:`SOMA_RENAMED`), and reading gives the columns back
    under their own names. Categoricals are stored as SOMA enumerations, with all their
    categories (used or not, in their order and type) and their order flag.
    """

    format: Format = "soma"

    def __init__(
        self,
        path: str | os.PathLike[str],
        var: pd.DataFrame,
        *,
        n_obs: int | None = None,
        measurement: str = "RNA",
        layer: str = "raw",
        platform_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if n_obs is None:
            raise ValueError("SomaWriter needs n_obs up front (SOMA arrays have a fixed shape).")
        if n_obs < 1:
            raise ValueError(
                f"SomaWriter needs at least one cell, not n_obs={n_obs}: a TileDB-SOMA "
                "experiment's arrays cannot be empty (tiledbsoma.io refuses an empty AnnData "
                "too). Write an empty store as h5ad or Zarr."
            )
        super().__init__(path, var, n_obs=n_obs, **kwargs)
        self._n_total: int = n_obs
        with self._setting_up():  # (a failure removes the temporary output)
            soma = self._soma = import_optional("tiledbsoma")
            try:
                context = soma.SOMATileDBContext(tiledb_config=TILEDB_NO_SIGNAL_HANDLERS)
                self._exp = soma.Experiment.create(str(self.tmp), context=context)
            finally:
                reclaim_signals()  # (TileDB took SIGINT as it created the store)
            self._ms = self._exp.add_new_collection("ms")
            rna = self._ms.add_new_collection(measurement, soma.Measurement)
            var_df, renames = _set_aside(_clean_frame(var, categories=False), SOMA_VAR_OWN)
            index_name = var_df.index.name
            var_df.insert(0, "feature_id", var_df.index.astype(str))
            var_df = var_df.reset_index(drop=True)
            var_tbl = _arrow_table(var_df, start=0)
            v = rna.add_new_dataframe(
                "var", schema=var_tbl.schema, domain=[(0, max(self.n_vars - 1, 0))]
            )
            with self._ready(v, var_df, renames, index_name) as v:
                v.write(var_tbl)
            x_coll = rna.add_new_collection("X")
            #: Are X's coordinates in cell-major order its global order (our tiles: all genes)
            self._cell_major = platform_config is None
            self._x = x_coll.add_new_sparse_ndarray(
                layer,
                type=_pa().float32(),
                shape=(max(n_obs, 1), max(self.n_vars, 1)),
                platform_config=platform_config or soma_row_tiles(self.n_vars),
            )
            self._obs_df: Any = None
            #: categories of the obs categoricals so far: the enumerations of the store's obs
            self._categories: dict[str, pd.CategoricalDtype] = {}
            self._closables = [x_coll, rna]

    def _append_x(self, x: sp.csr_matrix) -> None:
        """The chunk's entries (``x`` canonical: genes sorted within a cell, no duplicates)."""
        if x.nnz == 0:
            return
        pa = _pa()
        rows = np.repeat(
            np.arange(self.n_obs, self.n_obs + x.shape[0], dtype=np.int64), np.diff(x.indptr)
        )
        cols, data = x.indices.astype(np.int64), x.data.astype(np.float32, copy=False)
        names = ["soma_dim_0", "soma_dim_1", "soma_data"]
        if not self._cell_major:  # another layout: TileDB sorts the chunk, in one submission
            self._x.write(pa.Table.from_arrays([pa.array(a) for a in (rows, cols, data)], names))
            return
        step = SOMA_WRITE_VALUES
        pieces = [
            pa.RecordBatch.from_arrays(
                [pa.array(a[i : i + step]) for a in (rows, cols, data)], names
            )
            for i in range(0, x.nnz, step)
        ]
        in_order = {"tiledb": {"write": {"sort_coords": False}}}  # the global order, as given
        self._x.write(pa.Table.from_batches(pieces), platform_config=in_order)

    def append(self, x: sp.spmatrix | np.ndarray, obs: pd.DataFrame) -> None:
        start = self.n_obs
        super().append(x, obs)
        self._obs.clear()  # obs goes to disk chunk by chunk
        obs_df, renames = _set_aside(_clean_frame(obs, categories=False), SOMA_OBS_OWN)
        index_name = obs_df.index.name
        obs_df = obs_df.assign(obs_id=obs_df.index.astype(str)).reset_index(drop=True)
        if self._obs_df is None:
            tbl = _arrow_table(obs_df, start=start)
            frame = self._exp.add_new_dataframe(
                "obs", schema=tbl.schema, domain=[(0, max(self._n_total - 1, 0))]
            )
            self._obs_df = self._ready(frame, obs_df, renames, index_name)
            self._categories = {
                str(c): obs_df[c].dtype
                for c in obs_df.columns
                if isinstance(obs_df[c].dtype, pd.CategoricalDtype)
            }
        else:
            tbl = _arrow_table(self._fit_categories(obs_df), start=start)
        self._obs_df.write(tbl)

    def _ready(self, frame: Any, df: pd.DataFrame, renames: dict[str, str], index_name: Any) -> Any:
        """``frame``, a new SOMA dataframe for ``df`` (whose input index was named
        ``index_name``), with its metadata (:data:`SOMA_RENAMED`, :data:`SOMA_FRAME`) and
        with the categories of ``df``'s categoricals as its enumerations, open to be
        written."""
        frame.metadata[SOMA_RENAMED] = json.dumps(renames)
        nullable = [  # (pandas' Int*, UInt* and boolean; categoricals' kind is "O")
            str(c)
            for c in df.columns
            if isinstance(df[c].dtype, pd.api.extensions.ExtensionDtype)
            and df[c].dtype.kind in "biu"
        ]
        frame.metadata[SOMA_FRAME] = json.dumps(
            {"index_name": None if index_name is None else str(index_name), "nullable": nullable}
        )
        enums = {
            str(c): _enumeration(df[c].cat.categories)
            for c in df.columns
            if isinstance(df[c].dtype, pd.CategoricalDtype) and len(df[c].cat.categories)
        }
        if not enums:
            return frame
        frame.extend_enumeration_values(enums, deduplicate=True)
        return self._reopen(frame)

    def _fit_categories(self, obs_df: pd.DataFrame) -> pd.DataFrame:
        """A chunk's categoricals over the store's categories, which grow by the chunk's new
        ones: so no write changes the enumerations itself (tiledbsoma then keeps only the
        categories in use, and mixes them up when several writes change them)."""
        new = {}
        for name, dtype in self._categories.items():
            if name not in obs_df.columns:
                continue
            col = obs_df[name].astype("category")
            extra = col.cat.categories.difference(dtype.categories, sort=False)
            # an enumeration grows at its end only (an unordered chunk declares no order)
            if dtype.ordered and col.cat.ordered:
                grown = dtype.categories.append(extra)
                _check_order(self.path, name, col.cat.categories, grown, dtype.categories)
            if len(extra):
                dtype = pd.CategoricalDtype(dtype.categories.append(extra), ordered=dtype.ordered)
                self._categories[name] = dtype
                new[name] = _enumeration(extra)
            obs_df[name] = col.astype(dtype)
        if new:
            self._obs_df.extend_enumeration_values(new, deduplicate=True)
            self._obs_df = self._reopen(self._obs_df)
        return obs_df

    def _reopen(self, frame: Any) -> Any:
        """``frame`` opened anew for writing: a handle writes with the enumerations it was
        opened with, not those it extended since."""
        uri = frame.uri
        frame.close()
        return self._soma.DataFrame.open(uri, "w", context=self._exp.context)

    def _finish(self, obs: pd.DataFrame) -> None:
        del obs
        if self._obs_df is None:
            raise ValueError("no cells were written.")
        for handle in (self._obs_df, self._x, *self._closables, self._ms, self._exp):
            handle.close()

    def abort(self) -> None:
        for handle in (getattr(self, "_obs_df", None), getattr(self, "_exp", None)):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # the store may already be closed or half-made
                pass
        super().abort()


def soma_row_tiles(n_vars: int, rows_per_tile: int = 64, capacity: int = 65_536) -> dict[str, Any]:
    """TileDB layout of X for reading cells: a tile spans all genes of ``rows_per_tile`` cells.

    TileDB's default (2048 x 2048 tiles) spreads each cell over many tiles, so reading a block
    of cells decodes several times the data it needs.
    """
    dims = {"soma_dim_0": {"tile": rows_per_tile}, "soma_dim_1": {"tile": max(n_vars, 1)}}
    return {"tiledb": {"create": {"dims": dims, "capacity": capacity}}}


def _pa() -> Any:
    import pyarrow as pa

    return pa


def _set_aside(df: pd.DataFrame, own: tuple[str, ...]) -> tuple[pd.DataFrame, dict[str, str]]:
    """``df`` with its columns named like ``own`` (those the SOMA layout fills itself) renamed
    ``<name>_orig``, and those SOMA reserves (``soma_*``) ``orig_<name>`` (numbered where that
    is taken, :func:`rename_apart`); and the renames as ``{stored name: input name}``."""

    def aside(col: str) -> str | None:
        if col.startswith("soma_"):
            return f"orig_{col}"
        return f"{col}_orig" if col in own else None

    moved = rename_apart(map(str, df.columns), aside, reserved=own)
    return df.rename(columns=moved), {new: old for old, new in moved.items()}


def _enumeration(categories: pd.Index) -> Any:
    """Categories as the values of a SOMA enumeration: numbers and booleans as they are,
    others as text."""
    pa = _pa()
    if categories.dtype.kind in ("b", "i", "u", "f"):
        return pa.array(categories)
    return pa.array(text_or_none(categories), type=pa.large_string())


def _arrow_table(df: pd.DataFrame, start: int) -> Any:
    """``df`` as an Arrow table with join ids ``start``, ``start + 1``, ...: text as text,
    categoricals as dictionaries over their categories (SOMA enumerations)."""
    pa = _pa()
    if "soma_joinid" in df.columns:  # (SomaWriter sets the input's column aside first)
        raise ValueError("the frame has a column 'soma_joinid', which would replace the join ids.")
    cols: dict[str, Any] = {
        "soma_joinid": pa.array(np.arange(start, start + len(df), dtype=np.int64))
    }
    for name in df.columns:
        s = df[name]
        if isinstance(s.dtype, pd.CategoricalDtype):
            codes = s.cat.codes.to_numpy()
            cols[str(name)] = pa.DictionaryArray.from_arrays(
                pa.array(codes.astype(np.int32), mask=codes < 0),
                _enumeration(s.cat.categories),
                ordered=s.cat.ordered,
            )
        elif s.dtype == object:  # (as text: a later chunk of the column may hold others)
            cols[str(name)] = pa.array(_object_text(s.to_numpy()), type=pa.large_string())
        elif s.dtype == bool:
            cols[str(name)] = pa.array(s.to_numpy(), type=pa.bool_())
        else:  # numbers (float16 as float32); pandas' nullable Int64 / boolean with their nulls
            s = s.astype(np.float32) if s.dtype == np.float16 else s
            try:
                cols[str(name)] = pa.array(s, from_pandas=True)
            except (pa.ArrowException, TypeError, ValueError) as err:
                raise DataError(
                    f"column {name!r} ({s.dtype}) cannot be stored in TileDB-SOMA ({err}): "
                    "convert it to numbers or text first, or write h5ad or Zarr."
                ) from err
    return pa.Table.from_pydict(cols)


_WRITERS: dict[str, type[StoreWriter]] = {
    "h5ad": H5adWriter,
    "zarr": ZarrWriter,
    "soma": SomaWriter,
}


def open_writer(
    path: str | os.PathLike[str],
    var: pd.DataFrame,
    *,
    format: Format | None = None,
    n_obs: int | None = None,
    overwrite: bool = False,
    **options: Any,
) -> StoreWriter:
    """Open a streaming writer for ``path`` (format from the suffix unless given)."""
    fmt = format or guess_format(path)
    if fmt not in _WRITERS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    check_named(path, fmt)
    return _WRITERS[fmt](path, var, n_obs=n_obs, overwrite=overwrite, **options)
