"""An AnnData in memory as a store: what a collection, a data module and training read.

The counts (``X``, ``layers[layer]`` or ``raw``) are held as they are, CSR or dense, and
read by row sets like a file's. A CSC matrix is turned into CSR once (reading rows of a CSC
matrix touches every column). A backed AnnData is refused: its file is the store to pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils import adata_counts, canonical, logger, repeated
from ..errors import DataError
from .stores import CellStore


class MemoryStore(CellStore):
    """Cells of an in-memory AnnData (``name`` stands for its path in messages).

    DataLoader workers get the matrix with the store (a fork shares it without a copy).
    """

    format = "memory"  # type: ignore[assignment]

    def __init__(self, adata: Any, *, layer: str | None = None, name: str = "adata") -> None:
        if getattr(adata, "isbacked", False):
            raise DataError(
                f"{name} is a backed AnnData ({adata.filename}): pass its file path instead, "
                "which cellsift reads by rows itself."
            )
        super().__init__(name, layer=layer, on_disk=False)
        # (a view's matrix is its own subset; a damaged sparse one is refused there)
        x, var, _ = adata_counts(adata, layer, name)
        if sp.issparse(x):
            if x.format != "csr":
                logger.info("%s: %s counts turned into CSR to read by rows", name, x.format)
            x = canonical(sp.csr_matrix(x))  # (a copy only where duplicates or zeros are stored)
        elif isinstance(x, np.ndarray):
            if x.ndim != 2:
                raise DataError(f"{name}: counts must be cells x genes, not {x.ndim}-d.")
        else:
            raise DataError(
                f"{name}: counts of type {type(x).__name__} cannot be read by rows; hold them "
                "as a scipy sparse matrix or a numpy array (adata.X = adata.X.compute() for a "
                "dask array), or write the AnnData to h5ad and pass the path."
            )
        self._x = x
        #: where else the AnnData holds counts (its layers, raw), for messages
        self.count_places = [str(k) for k in adata.layers.keys()] + (
            ["raw"] if adata.raw is not None else []
        )
        self._var = var.copy()
        self._var.index = self._var.index.astype(str)
        self._obs = adata.obs.copy()
        names = [str(c) for c in self._obs.columns]  # (read by name as text, as files hold)
        if len(set(names)) < len(names):
            twice = repeated(names)
            raise DataError(
                f"{name}: obs columns {twice} are named alike once written as text (e.g. 0 "
                "and '0'); rename one (adata.obs.rename(columns=...))."
            )
        self._obs.columns = pd.Index(names, dtype=object)
        self._obs_names = pd.Index(adata.obs_names.astype(str), name=adata.obs_names.name)

    def _open(self) -> Any:
        return self._x

    @property
    def n_obs(self) -> int:
        return int(self._x.shape[0])

    @property
    def obs_columns(self) -> list[str]:
        return list(self._obs.columns)

    @property
    def obs_names(self) -> pd.Index:
        return self._obs_names

    def _load_obs_column(self, name: str) -> Any:
        col = self._obs[name]  # categoricals and nullable columns as pandas keeps them
        return (
            col.array if isinstance(col.dtype, pd.api.extensions.ExtensionDtype) else col.to_numpy()
        )

    def _load_var(self) -> pd.DataFrame:
        return self._var

    def stored_row_nnz(self) -> np.ndarray | None:
        return np.diff(self._x.indptr) if sp.issparse(self._x) else None

    def _read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix(self._x[rows], dtype=np.float32)
