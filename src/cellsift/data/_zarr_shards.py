"""Direct reads of 1-d, sharded zarr v3 arrays on local disk.

zarr-python spends most of a small read in its own machinery. For the arrays a CSR matrix is
made of, read ranges are served here instead: each shard's index (offset, size of every
chunk; checked against its crc32c) is read once, the chunks a read needs are fetched with
``os.pread`` and decoded in a thread pool (the codecs release the GIL). Arrays this module
does not understand (other codecs, non-local stores) are read through zarr's API.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np

from .._utils import logger

__all__ = ["ShardedArrayReader"]

_EMPTY = np.uint64(2**64 - 1)


def _decoder(codecs: list[dict[str, Any]]) -> tuple[Any, str] | None:
    """(numcodecs decoder or None, byte order) for [bytes, <compressor>?]; None if unsupported."""
    if not codecs or codecs[0]["name"] != "bytes":
        return None
    endian = codecs[0].get("configuration", {}).get("endian", "little")
    rest = codecs[1:]
    if not rest:
        return (None, endian)
    if len(rest) > 1:
        return None
    name, conf = rest[0]["name"], rest[0].get("configuration", {})
    if name == "zstd":
        return (numcodecs.Zstd(level=conf.get("level", 0)), endian)
    if name == "blosc":
        return (numcodecs.Blosc(), endian)
    if name == "gzip":
        return (numcodecs.GZip(), endian)
    return None


class ShardedArrayReader:
    """Reads element ranges of one sharded 1-d zarr v3 array (see the module docstring)."""

    def __init__(self, path: Path, meta: dict[str, Any], decoder: Any, endian: str) -> None:
        self.path = path
        self.shape = int(meta["shape"][0])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
        self.shard_elems = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        shard = meta["codecs"][0]["configuration"]
        self.chunk_elems = int(shard["chunk_shape"][0])
        self.chunks_per_shard = self.shard_elems // self.chunk_elems
        self.fill_value = meta.get("fill_value", 0) or 0
        sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self._key = (lambda s: path / "c" / str(s)) if sep == "/" else (lambda s: path / f"c.{s}")
        self.decoder = decoder
        self._check_crc = shard["index_codecs"][-1]["name"] == "crc32c"
        self._indexes: dict[int, np.ndarray | None] = {}
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ShardedArrayReader | None:
        """A reader for the array at ``path``, or None when it is not of the handled kind."""
        path = Path(path)
        try:
            meta = json.loads((path / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        codecs = meta.get("codecs", [])
        if (
            meta.get("zarr_format") != 3
            or len(meta.get("shape", [])) != 1
            or meta.get("chunk_key_encoding", {}).get("name") != "default"
            or len(codecs) != 1
            or codecs[0]["name"] != "sharding_indexed"
        ):
            logger.debug("%s: not a 1-d sharded zarr v3 array; reading through zarr", path)
            return None
        conf = codecs[0]["configuration"]
        index_codecs = [c["name"] for c in conf.get("index_codecs", [])]
        dec = _decoder(conf["codecs"])
        if (
            dec is None
            or conf.get("index_location", "end") != "end"
            or index_codecs not in (["bytes"], ["bytes", "crc32c"])
        ):
            logger.debug("%s: unhandled sharding codecs; reading through zarr", path)
            return None
        return cls(path, meta, *dec)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"], state["_pid"] = {}, None
        state.pop("_key")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        path = self.path
        self._key = lambda s: path / "c" / str(s)

    # -- shard files and indexes ----------------------------------------------------------
    def _fd(self, shard: int) -> int | None:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            try:
                self._fds[shard] = os.open(self._key(shard), os.O_RDONLY)
            except FileNotFoundError:
                return None  # a shard never written: all fill value
        return self._fds[shard]

    def _index(self, shard: int) -> np.ndarray | None:
        if shard not in self._indexes:
            fd = self._fd(shard)
            if fd is None:
                self._indexes[shard] = None
            else:
                n = self.chunks_per_shard * 16 + (4 if self._check_crc else 0)
                size = os.fstat(fd).st_size
                raw = os.pread(fd, n, size - n)
                if len(raw) != n:
                    raise OSError(
                        f"{self._key(shard)}: shard is truncated (index unreadable): re-create or re-convert the store."
                    )
                body = raw[: self.chunks_per_shard * 16]
                if self._check_crc:
                    import google_crc32c

                    if google_crc32c.value(body) != int.from_bytes(raw[-4:], "little"):
                        raise OSError(
                            f"{self._key(shard)}: shard index fails its checksum "
                            "(corrupt file): re-create or re-convert the store."
                        )
                self._indexes[shard] = np.frombuffer(body, dtype="<u8").reshape(-1, 2)
        return self._indexes[shard]

    def _chunk(self, chunk: int) -> np.ndarray:
        shard, local = divmod(chunk, self.chunks_per_shard)
        index = self._index(shard)
        if index is None or index[local, 0] == _EMPTY:
            return np.full(self.chunk_elems, self.fill_value, dtype=self.dtype)
        fd = self._fd(shard)
        assert fd is not None
        offset, nbytes = int(index[local, 0]), int(index[local, 1])
        raw = os.pread(fd, nbytes, offset)
        if len(raw) != nbytes:
            raise OSError(
                f"{self._key(shard)}: chunk {local} is truncated (corrupt file): re-create or re-convert the store."
            )
        out = self.decoder.decode(raw) if self.decoder is not None else raw
        return np.frombuffer(out, dtype=self.dtype)

    # -- reads ----------------------------------------------------------------------------
    def chunks_of(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Chunk ids the (non-empty) ranges touch."""
        keep = ends > starts
        first = starts[keep] // self.chunk_elems
        n = (ends[keep] - 1) // self.chunk_elems - first + 1
        offsets = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        return np.unique(np.repeat(first, n) + offsets)

    def assemble(
        self, starts: np.ndarray, ends: np.ndarray, chunks: dict[int, np.ndarray]
    ) -> np.ndarray:
        """The concatenated elements of the ranges, from decoded ``chunks``."""
        parts = []
        c = self.chunk_elems
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            while a < b:
                k = a // c
                stop = min(b, (k + 1) * c)
                parts.append(chunks[k][a - k * c : stop - k * c])
                a = stop
        if not parts:
            return np.zeros(0, dtype=self.dtype)
        return np.concatenate(parts)


def read_ranges(
    readers: list[ShardedArrayReader],
    starts: np.ndarray,
    ends: np.ndarray,
    pool: ThreadPoolExecutor,
) -> list[np.ndarray]:
    """The same element ranges of several arrays (e.g. CSR data and indices), decoded in ``pool``."""
    jobs = []
    for r in readers:
        ids = r.chunks_of(starts, ends).tolist()
        jobs.append((r, ids, pool.map(r._chunk, ids)))
    return [
        r.assemble(starts, ends, dict(zip(ids, decoded, strict=True))) for r, ids, decoded in jobs
    ]
