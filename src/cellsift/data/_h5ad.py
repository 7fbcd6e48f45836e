"""h5ad stores: X's arrays read straight from the file (or through h5py), metadata via h5py."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from ..errors import DataError
from ._anndata import AnnDataStore
from ._direct import ChunkedReader, open_h5_reader, too_many_open_files
from .writers import Format


def _unavailable_filters(mat: Any) -> Iterator[tuple[str, int, str]]:
    """Each HDF5 filter of the matrix ``mat``'s datasets (dense X; a CSR's arrays) that
    this HDF5 cannot apply (a plugin's, as zstd's or blosc's, not loaded): (the dataset,
    the filter's id, its name)."""
    parts = [mat] if isinstance(mat, h5py.Dataset) else [mat.get(n) for n in _CSR_ARRAYS]
    for ds in (p for p in parts if isinstance(p, h5py.Dataset)):
        plist = ds.id.get_create_plist()
        for i in range(plist.get_nfilters()):
            code, _, _, name = plist.get_filter(i)
            if not h5py.h5z.filter_avail(code):
                said = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
                yield ds.name, code, said


_CSR_ARRAYS = ("data", "indices", "indptr")


class H5adStore(AnnDataStore):
    """An h5ad file. X is never loaded whole: each read touches only the requested rows.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    layer
        ``None`` (X), a key of ``layers``, or ``"raw"``.
    rdcc_nbytes
        HDF5 chunk cache per dataset (bytes), when h5py reads.
    direct
        Read X's arrays straight from the file where their layout allows (default).
    """

    format: Format = "h5ad"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        layer: str | None = None,
        rdcc_nbytes: int = 4 << 20,
        direct: bool = True,
    ) -> None:
        self.rdcc_nbytes = rdcc_nbytes
        super().__init__(path, layer=layer, direct=direct)

    def _load_filters(self, mat: Any) -> None:
        """hdf5plugin, where installed, registers the HDF5 filters the matrix needs that
        this HDF5 lacks (before any of it is read)."""
        if next(_unavailable_filters(mat), None) is not None:
            with contextlib.suppress(ImportError):
                import hdf5plugin  # noqa: F401  (registers its filters with HDF5 on import)

    def _undecodable(self) -> tuple[str, str] | None:
        missing = next(_unavailable_filters(self._matrix(self.handle)), None)
        if missing is None:  # (an optional filter's chunks may be stored without it: read)
            return None
        dataset, code, name = missing
        return (
            f"{dataset} is compressed with the HDF5 filter "
            f"{f'{name} (id {code})' if name else code}, which this Python's HDF5 cannot "
            "decode (its plugin is not loaded).",
            "Install hdf5plugin (pip install hdf5plugin), or point HDF5_PLUGIN_PATH at the "
            "plugin; or write the file again with gzip.",
        )

    def _direct_readers(self, mat: Any) -> list[ChunkedReader | None]:
        return [open_h5_reader(self.file, mat[name]) for name in ("data", "indices")]

    def _open(self) -> Any:
        if self.file.is_dir():  # (h5py's words: a file it cannot read)
            raise self._error(
                "is a folder, not an h5ad file (a sharded store has a manifest.json in it).",
                "Pass an h5ad file, or the folder of a sharded store.",
            )
        try:
            return h5py.File(self.file, "r", rdcc_nbytes=self.rdcc_nbytes)
        except OSError as err:
            if err.errno == errno.EMFILE or "errno = 24," in str(err):  # (h5py's own words)
                raise DataError(too_many_open_files(self.path)) from None
            raise self._error(
                f"cannot be read as HDF5 ({' '.join(str(err).split())}); the file is "
                "truncated, corrupt or not an h5ad.",
                "Re-create or re-download it.",
            ) from err

    def _read_segments_api(
        self, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        mat = self._matrix(self.handle)
        total = int((ends - starts).sum())
        out = []
        for name in ("data", "indices"):
            ds = mat[name]
            buf = np.empty(total, dtype=np.float32 if name == "data" else np.int32)
            pos = 0
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
                if b > a:
                    ds.read_direct(buf, np.s_[a:b], np.s_[pos : pos + b - a])
                pos += b - a
            out.append(buf)
        return out[0], out[1]
