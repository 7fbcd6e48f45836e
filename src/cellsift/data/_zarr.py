"""AnnData-Zarr stores (zarr format 3, sharded or not).

Row reads of sharded local arrays go straight to the shard files (``_direct``); other
arrays go through zarr's asynchronous API on an event loop owned by this process, all ranges
of one read requested at once so zarr fetches and decodes their chunks concurrently.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np

from ._anndata import AnnDataStore
from ._direct import ChunkedReader, ShardedArrayReader
from .writers import Format


class ZarrStore(AnnDataStore):
    """An AnnData-Zarr store (a directory). X is never loaded whole.

    Parameters
    ----------
    path
        The ``.zarr`` directory.
    layer
        ``None`` (X), a key of ``layers``, or ``"raw"``.
    direct
        Read sharded local arrays from their shard files (default); False: always through zarr.
    """

    format: Format = "zarr"

    def __init__(
        self, path: str | os.PathLike[str], *, layer: str | None = None, direct: bool = True
    ) -> None:
        self._aio: tuple[int, Any, dict[str, Any]] | None = None
        super().__init__(path, layer=layer, direct=direct)

    def _direct_readers(self, mat: Any) -> list[ChunkedReader | None]:
        base = self.path / {None: "X", "raw": "raw/X"}.get(self.layer, f"layers/{self.layer}")
        return [ShardedArrayReader.open(base / name) for name in ("data", "indices")]

    def _open(self) -> Any:
        import zarr

        try:
            return zarr.open_group(self.path, mode="r")
        except Exception as err:  # zarr raises several types for unreadable stores
            raise self._error(
                f"cannot be opened as Zarr ({type(err).__name__}: {err}).",
                "Check the path; re-create the store if it is corrupt.",
            ) from err

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_aio"] = None
        return state

    def _async_arrays(self) -> tuple[Any, dict[str, Any]]:
        if self._aio is None or self._aio[0] != os.getpid():
            from zarr.api.asynchronous import open_array

            loop = asyncio.new_event_loop()
            base = {None: "X", "raw": "raw/X"}.get(self.layer, f"layers/{self.layer}")
            arrays = {
                name: loop.run_until_complete(
                    open_array(store=str(self.path), path=f"{base}/{name}", mode="r")
                )
                for name in ("data", "indices")
            }
            self._aio = (os.getpid(), loop, arrays)
        return self._aio[1], self._aio[2]

    def _read_segments_api(
        self, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        loop, arrays = self._async_arrays()
        ranges = [slice(a, b) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]

        async def fetch() -> list[Any]:
            return await asyncio.gather(
                *(arrays[name].getitem(r) for name in ("data", "indices") for r in ranges)
            )

        parts = loop.run_until_complete(fetch())
        data, indices = parts[: len(ranges)], parts[len(ranges) :]
        cat = np.concatenate
        return (cat(data).astype(np.float32, copy=False), cat(indices).astype(np.int32, copy=False))
