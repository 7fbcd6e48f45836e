"""What h5ad and AnnData-Zarr stores share: the AnnData on-disk layout."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils import RAW_CLASH, csr_fault, error_text, index_fault
from ..errors import CellsiftError
from . import _csr
from ._direct import ChunkedReader, read_ranges
from .stores import CellStore

_io_pool: ThreadPoolExecutor | None = None
_io_lock = threading.Lock()


def _forget_io_pool() -> None:  # a forked child: the parent's threads are not its own
    global _io_pool, _io_lock
    _io_pool, _io_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_io_pool)


def io_threads() -> ThreadPoolExecutor:
    """The process's pool for the direct reads' file reads and decoding, shared by every
    store (a pool a store would start as many threads as there are stores)."""
    global _io_pool
    with _io_lock:
        if _io_pool is None:
            workers = min(4, os.cpu_count() or 1)
            _io_pool = ThreadPoolExecutor(workers, thread_name_prefix="cellsift-io")
        return _io_pool


class AnnDataStore(CellStore):
    """Counts in ``X``, ``layers[layer]`` or ``raw/X``; obs/var per the AnnData encoding.

    With ``direct`` (the default) the CSR arrays are read straight from the files where their
    layout allows (:mod:`cellsift.data._direct`), in a small thread pool.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, layer: str | None = None, direct: bool = True
    ) -> None:
        super().__init__(path, layer=layer)
        root = self.handle  # open now: a corrupt file fails here, with its name
        self._direct: list[ChunkedReader] | None = None
        with self._reading("its layout (the groups and attributes that say what it holds)"):
            # layer "raw": adata.raw, or where there is none a layer so named (as in memory)
            self._raw = layer == "raw" and (_held(root, "raw/X") or not _held(root, "layers/raw"))
            self._check_layout(root)
            if direct and not self._dense:
                readers = self._direct_readers(self._matrix(root))
                if readers and all(r is not None for r in readers):
                    self._direct = readers  # type: ignore[assignment]

    def _direct_readers(self, mat: Any) -> list[ChunkedReader | None]:
        """Direct readers of the matrix's ``data`` and ``indices`` (None where not possible)."""
        return []

    def _threads(self) -> ThreadPoolExecutor:
        return io_threads()

    # -- layout -------------------------------------------------------------------------
    def _matrix(self, root: Any) -> Any:
        key = self._matrix_key()
        if self.layer == "raw" and _held(root, "raw/X") and _held(root, "layers/raw"):
            raise self._error(*RAW_CLASH)
        # (a name that is no one element of layers, "", "..", "c/data": none the file holds,
        # not a path h5py or zarr would resolve elsewhere or refuse as a path)
        named = self.layer in (None, "raw") or (
            str(self.layer) not in ("", ".", "..") and "/" not in str(self.layer)
        )
        if not (named and _held(root, key)):
            have = ["X (layer=None)"] if _held(root, "X") else []
            if _held(root, "layers"):
                have += [f"layers[{k!r}]" for k in root["layers"]]
            have += ["raw"] if _held(root, "raw/X") else []
            raise self._no_layer(
                f"has no {key}.",
                f"Choose layer= among: {', '.join(have)}."
                if have
                else "It holds no counts matrix (no X, layers or raw).",
            )
        return root[key]

    def other_elements(self) -> list[str]:
        """The file's elements besides the counts read, obs and var (other layers, X, raw,
        obsm, varm, obsp, varp, uns), as ``layers['spliced']``, ``obsm['X_umap']``, ``uns``."""
        root, read = self.handle, self._matrix_key()
        with self._reading("its other elements (layers, obsm, varm, obsp, varp, uns)"):
            out = ["X"] if read != "X" and _held(root, "X") else []
            out += ["raw"] if not read.startswith("raw/") and _held(root, "raw") else []
            for group in ("layers", "obsm", "varm", "obsp", "varp"):
                if _held(root, group):
                    out += [f"{group}[{k!r}]" for k in root[group] if f"{group}/{k}" != read]
            if _held(root, "uns") and len(root["uns"]):
                out.append("uns")
        return out

    def _load_filters(self, mat: Any) -> None:
        """A format's readiness to decode the matrix ``mat`` (h5ad: HDF5's filters)."""

    def _undecodable(self) -> tuple[str, str] | None:
        """What of the matrix this format cannot decode here (h5ad: an HDF5 filter whose
        plugin is not loaded) and the fix; None where it can decode all of it."""
        return None

    def _matrix_key(self) -> str:
        if self.layer is None:
            return "X"
        return "raw/X" if self._raw else f"layers/{self.layer}"

    def _check_layout(self, root: Any) -> None:
        for group in ("obs", "var"):  # (a missing raw is named by the matrix's check)
            if not _held(root, group):  # (what a write that did not finish can leave)
                raise self._error(
                    f"has no {group} (the {'cells' if group == 'obs' else 'genes'}' "
                    "table): the file is incomplete, perhaps from a write that did not finish.",
                    "Re-create it (adata.write_h5ad / write_zarr).",
                )
        mat = self._matrix(root)
        enc = _attr(mat, "encoding-type")
        if enc == "csc_matrix":
            if self.layer is None:
                fix = "adata.X = adata.X.tocsr()"
            elif self._raw:
                fix = "adata.raw = anndata.AnnData(adata.raw.X.tocsr(), var=adata.raw.var)"
            else:
                fix = f"adata.layers[{self.layer!r}] = adata.layers[{self.layer!r}].tocsr()"
            write = "write_zarr" if self.format == "zarr" else "write_h5ad"
            raise self._error(
                "stores counts column-major (CSC): reading cells would read the whole matrix.",
                f"Rewrite it row-major: {fix}; adata.{write}(path).",
            )
        self._load_filters(mat)
        self._dense = enc in (None, "array")
        if self._dense:
            kind = getattr(getattr(mat, "dtype", None), "kind", "f")
            if kind not in "biuf":  # (text or records: no counts, whatever is read)
                raise self._error(
                    f"holds {self._matrix_key()} of {mat.dtype} values, not counts.",
                    "Pass the layer of raw counts (layer=...), or write the counts there.",
                )
            if _attr(mat, "h5sparse_format") is not None:  # (anndata before 0.7; no encoding)
                raise self._error(
                    f"holds {self._matrix_key()} in the sparse layout of anndata before 0.7 "
                    "(h5sparse), which cells are not read from one by one.",
                    "Write it again with today's anndata: "
                    "anndata.read_h5ad(path).write_h5ad(new_path).",
                )
            if len(getattr(mat, "shape", ())) != 2:  # (a group of another layout: no shape)
                raise self._error("X is neither CSR nor a 2-d array.", "Write it with anndata.")
            self._shape = tuple(int(s) for s in mat.shape)
            return
        if enc != "csr_matrix":
            raise self._error(f"X has unknown encoding {enc!r}.", "Write it with anndata >= 0.8.")
        self._shape = tuple(int(s) for s in _attr(mat, "shape"))
        indptr = self.indptr
        sizes = []
        for part in ("data", "indices"):  # (one missing: the file's damage, named)
            with self._reading(f"{self._matrix_key()}/{part}"):
                sizes.append(int(mat[part].shape[0]))
        n_data, n_idx = sizes
        if len(indptr) != self._shape[0] + 1 or indptr[-1] != n_data or n_idx != n_data:
            raise self._error(
                f"is truncated or corrupt: X's row pointer ends at {indptr[-1]} and has "
                f"{len(indptr)} entries, but X holds {n_data} values for {self._shape[0]} cells.",
                "Re-create or re-download the file.",
            )
        fault = csr_fault(indptr, None, self._shape[1])
        if fault is not None:
            raise self._error(
                f"is corrupt: in {self._matrix_key()}, {fault}.",
                "Re-create or re-download the file.",
            )

    @property
    def n_obs(self) -> int:
        return self._shape[0]

    @contextlib.contextmanager
    def _reading(self, element: str) -> Iterator[None]:
        """An element that h5py, zarr or its codecs cannot decode (a chunk cut short or
        overwritten) named as the store's damage, not as the codec's error."""
        opened = self._handle  # (the file as the read begins)
        try:
            yield
        except CellsiftError:
            raise
        except (OSError, RuntimeError, ValueError, KeyError, zlib.error) as err:
            if sys.is_finalizing():  # (a read the interpreter's exit cut short: no damage)
                raise
            # (closed by another thread during the read: no damage)
            if opened is not None and (
                self._handle is not opened
                or not getattr(getattr(opened, "id", None), "valid", True)
            ):
                raise
            try:  # (an intact file whose codec is missing: said so)
                undecodable = self._undecodable()
            except (OSError, RuntimeError, ValueError, KeyError):
                undecodable = None
            if undecodable is not None:
                raise self._error(*undecodable) from err
            kind = "zlib.error" if isinstance(err, zlib.error) else None
            raise self._error(
                f"{element} cannot be read ({error_text(err, kind)}): the file is "
                "damaged or incomplete (a copy or write that did not finish?).",
                "Re-create it, or copy it again.",
            ) from err

    @cached_property
    def indptr(self) -> np.ndarray:
        if self._dense:
            return np.arange(self.n_obs + 1, dtype=np.int64) * self._shape[1]
        with self._reading(f"{self._matrix_key()}/indptr"):
            return np.asarray(self._matrix(self.handle)["indptr"][...], dtype=np.int64)

    @cached_property
    def obs_columns(self) -> list[str]:
        return [str(c) for c in _attr(self.handle["obs"], "column-order", [])]

    def _load_obs_column(self, name: str) -> Any:
        with self._reading(f"obs/{name}"):
            return _plain(ad.io.read_elem(self.handle["obs"][name]))

    @cached_property
    def obs_names(self) -> pd.Index:
        obs = self.handle["obs"]
        key = _attr(obs, "_index")
        with self._reading(f"obs/{key}"):
            names = pd.Index(_plain(ad.io.read_elem(obs[key]))).astype(str)
        self._check_length(f"obs/{key}, the cells' names,", len(names), self.n_obs, "cells")
        # (anndata keeps the index under its name, or under "_index" where it has none)
        return names.rename(None if key == "_index" else str(key))

    def _load_var(self) -> pd.DataFrame:
        root = self.handle
        with self._reading("raw/var" if self._raw else "var"):
            var = ad.io.read_elem(root["raw/var"] if self._raw else root["var"])
        var.index = var.index.astype(str)
        # (the genes are the matrix's columns: read as another count, counts land under other genes)
        where = "raw/var" if self._raw else "var"
        self._check_length(
            f"{where}, the genes' table,",
            len(var),
            self._shape[1],
            f"genes of {self._matrix_key()}",
        )
        return var

    def stored_row_nnz(self) -> np.ndarray | None:
        return None if self._dense else np.diff(self.indptr)

    # -- reading ------------------------------------------------------------------------
    def _read_block(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        if self._dense:  # the block as stored: no float32 copy, no CSR
            with self._reading(f"{self._matrix_key()} of cells {start}-{stop - 1}"):
                return np.asarray(self._matrix(self.handle)[start:stop])
        return super()._read_block(start, stop)

    def _read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        if self._dense:
            if len(rows) == 0:
                return sp.csr_matrix((0, self._shape[1]), dtype=np.float32)
            with self._reading(f"{self._matrix_key()} of cells {int(rows[0])}-{int(rows[-1])}"):
                mat = self._matrix(self.handle)
                if rows[-1] - rows[0] + 1 == len(rows):  # a run of cells: one slice, not a list
                    block = mat[int(rows[0]) : int(rows[-1]) + 1]
                else:
                    block = mat[rows, :]
            return sp.csr_matrix(np.asarray(block, dtype=np.float32))
        # Direct reads cost microseconds a call: read exactly the wanted rows. Through h5py or
        # zarr a call costs far more, and ranges with small gaps are merged into one read.
        gap = 0 if self._direct is not None else _csr.MAX_GAP
        which = f" of cells {int(rows[0])}-{int(rows[-1])}" if len(rows) else ""
        with self._reading(f"{self._matrix_key()}{which}"):
            x = _csr.read_rows(self.indptr, rows, self._shape[1], self._read_segments, gap)
        # (its row pointer is made of the store's, checked on opening: the indices only)
        fault = index_fault(x.indices, self._shape[1])
        if fault is not None:
            raise self._error(
                f"is corrupt: in {self._matrix_key()}{which}, {fault}.",
                "Re-create or re-download the file.",
            )
        return x

    def _read_segments(self, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._direct is not None:
            data, indices = read_ranges(self._direct, starts, ends, self._threads())
            return data.astype(np.float32, copy=False), _csr.as_int32(indices)
        return self._read_segments_api(starts, ends)

    def _read_segments_api(
        self, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read ranges through the backend's own API (h5py, zarr)."""
        raise NotImplementedError


def _plain(values: Any) -> Any:
    """numpy's variable-width strings (zarr v3) as object arrays, like every other store."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "T":
        return values.astype(object)
    return values


def _attr(node: Any, key: str, default: Any = None) -> Any:
    value = node.attrs.get(key, default)
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return value


def _held(root: Any, key: str) -> bool:
    """Does the store hold element ``key``? (anndata writes absent elements as "null".)"""
    return key in root and _attr(root[key], "encoding-type") != "null"
