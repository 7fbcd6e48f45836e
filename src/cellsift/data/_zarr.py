"""AnnData-Zarr stores (zarr format 3, sharded or not).

Row reads of sharded local arrays go straight to the shard files (``_zarr_shards``); other
arrays go through zarr's asynchronous API on an event loop owned by this process, all ranges
of one read requested at once so zarr fetches and decodes their chunks concurrently.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ._anndata import AnnDataStore
from ._zarr_shards import ShardedArrayReader, read_ranges
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
        self._pool: tuple[int, ThreadPoolExecutor] | None = None
        super().__init__(path, layer=layer)
        base = self.path / {None: "X", "raw": "raw/X"}.get(layer, f"layers/{layer}")
        readers = [ShardedArrayReader.open(base / n) for n in ("data", "indices")] if direct else []
        self._direct = readers if readers and all(r is not None for r in readers) else None

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
        state["_pool"] = None
        return state

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool[0] != os.getpid():
            self._pool = (
                os.getpid(),
                ThreadPoolExecutor(
                    max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="cellsift-zarr"
                ),
            )
        return self._pool[1]

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

    def _read_segments(self, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._direct is not None:
            data, indices = read_ranges(self._direct, starts, ends, self._threads())  # type: ignore[arg-type]
            return data.astype(np.float32, copy=False), indices.astype(np.int32, copy=False)
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
