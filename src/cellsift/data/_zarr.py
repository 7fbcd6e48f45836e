"""AnnData-Zarr stores (zarr format 3, sharded or not).

Row reads of sharded local arrays go straight to the shard files (``_direct``); other
arrays go through zarr's asynchronous API on an event loop owned by this process, all ranges
of one read requested at once so zarr fetches and decodes their chunks concurrently.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from . import _csr
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
    _anchors = ("zarr.json", ".zgroup", ".zattrs")

    def __init__(
        self, path: str | os.PathLike[str], *, layer: str | None = None, direct: bool = True
    ) -> None:
        self._aio: tuple[int, dict[str, Any]] | None = None
        super().__init__(path, layer=layer, direct=direct)
        if not self._dense:
            self._check_complete()

    @property
    def _base(self) -> str:
        return "raw/X" if self._raw else "X" if self.layer is None else f"layers/{self.layer}"

    def _check_complete(self) -> None:
        """Refuse a store whose ``data`` or ``indices`` lacks a chunk (or shard) file.

        zarr reads a missing chunk as its fill value: a file lost in a copy would read as
        zeros. zarr leaves a chunk out only when every value in it is the fill value, which a
        chunk of counts (nonzero values) never is; a chunk of column indices can be (cells that
        each hold one value, in gene 0), which the row pointer tells. One listing per folder.
        """
        mat = self._matrix(self.handle)
        readers = dict(zip(("data", "indices"), self._direct or (), strict=False))
        for name in ("data", "indices"):
            arr = mat[name]
            size = int(arr.shape[0])
            step = int((getattr(arr, "shards", None) or arr.chunks)[0])
            keys = [arr.metadata.encode_chunk_key((k,)) for k in range(-(-size // step))]
            absent = []
            for k in _missing(self.file / self._base / name, keys):
                lo, hi = k * step, min(size, (k + 1) * step)
                if name == "indices" and self._row_starts_only(lo, hi):
                    absent.append(k)  # may hold only gene 0 (the fill value): zarr wrote none
                    continue
                first, last = np.searchsorted(self.indptr, [lo, hi - 1], side="right") - 1
                raise self._error(
                    f"{self._base}/{name}/{keys[k]} is missing, so cells {first} to {last} "
                    "would read as zeros: the store is incomplete or corrupt (an interrupted "
                    "copy?), or that chunk held only zeros stored as entries, which zarr does "
                    "not write.",
                    "Copy the store again or re-create it (after adata.X.eliminate_zeros(), for "
                    "stored zeros).",
                )
            reader = readers.get(name)
            if isinstance(reader, ShardedArrayReader):
                reader.absent = set(absent)

    def _row_starts_only(self, lo: int, hi: int) -> bool:
        """Every element in ``[lo, hi)`` is the first of its row (each row there holds at
        most one value)."""
        indptr = self.indptr
        a, b = np.searchsorted(indptr, [lo, hi], side="left")
        starts = indptr[a:b]
        return len(starts) > 0 and 1 + int(np.count_nonzero(np.diff(starts))) == hi - lo

    def _direct_readers(self, mat: Any) -> list[ChunkedReader | None]:
        return [
            ShardedArrayReader.open(self.file / self._base / name) for name in ("data", "indices")
        ]

    def _open(self) -> Any:
        import zarr

        marked = any((self.file / m).exists() for m in ("zarr.json", ".zgroup"))
        if (self.file / "manifest.json").is_file() and not marked:
            raise self._error(
                "is a sharded store (manifest.json lists its shards), not one Zarr store.",
                "Read all of it with CellCollection(path), or open one shard with open_store.",
            )
        try:
            return zarr.open_group(self.file, mode="r")
        except Exception as err:  # zarr raises several types for unreadable stores
            raise self._error(
                f"cannot be opened as Zarr ({type(err).__name__}: {err}).",
                "Check the path; re-create the store if it is corrupt.",
            ) from err

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_aio"] = None
        return state

    def _async_arrays(self) -> dict[str, Any]:
        """The matrix's data and indices as zarr's async arrays, opened on :data:`IO_LOOP`
        (once a process)."""
        if self._aio is None or self._aio[0] != os.getpid():
            from zarr.api.asynchronous import open_array

            arrays = {
                name: IO_LOOP.run(
                    open_array(store=str(self.file), path=f"{self._base}/{name}", mode="r")
                )
                for name in ("data", "indices")
            }
            self._aio = (os.getpid(), arrays)
        return self._aio[1]

    def _read_segments_api(
        self, starts: np.ndarray, ends: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._async_arrays()
        ranges = [slice(a, b) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]

        async def fetch() -> list[Any]:
            return await asyncio.gather(
                *(arrays[name].getitem(r) for name in ("data", "indices") for r in ranges)
            )

        parts = IO_LOOP.run(fetch())
        data, indices = parts[: len(ranges)], parts[len(ranges) :]
        cat = np.concatenate
        return cat(data).astype(np.float32, copy=False), _csr.as_int32(cat(indices))


class _LoopThread:
    """An event loop running in a thread of its own, which any thread hands coroutines to
    and waits for: zarr's reads of many ranges at once (gathered), from the loader's thread
    and the caller's together, and from a thread that runs a loop itself (a notebook's),
    where a loop of the caller's thread could not run. Started on first use; a forked
    process (whose copy has no thread running it, and maybe a lock a parent's thread held)
    starts its own."""

    def __init__(self) -> None:
        self._forget()
        if hasattr(os, "register_at_fork"):  # (no fork where it lacks: Windows)
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._running()).result()

    def _running(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(
                    target=self._loop.run_forever, name="cellsift-zarr-io", daemon=True
                ).start()
            return self._loop


#: The event loop zarr's asynchronous reads run on (:class:`_LoopThread`).
IO_LOOP = _LoopThread()


def _missing(folder: Path, keys: list[str]) -> list[int]:
    """Positions of ``keys`` (relative to ``folder``) with no file: one listing per folder."""
    found: dict[str, set[str]] = {}
    out = []
    for k, key in enumerate(keys):
        parent, _, name = key.rpartition("/")
        if parent not in found:
            try:
                found[parent] = set(os.listdir(folder / parent))
            except FileNotFoundError:
                found[parent] = set()
        if name not in found[parent]:
            out.append(k)
    return out
