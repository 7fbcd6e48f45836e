"""h5ad stores: X's arrays read straight from the file (or through h5py), metadata via h5py."""

from __future__ import annotations

import errno
import os
from typing import Any

import h5py
import numpy as np

from ..errors import DataError
from ._anndata import AnnDataStore
from ._direct import ChunkedReader, open_h5_reader, too_many_open_files
from .writers import Format


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
