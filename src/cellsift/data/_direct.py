"""Direct reads of the 1-d arrays a CSR matrix is made of, from local files.

zarr-python and h5py spend most of a small read in their own machinery, and h5py holds the
GIL while it reads. For the ``data`` and ``indices`` arrays of h5ad and AnnData-Zarr stores,
element ranges are served here instead: where each chunk lies in the file is learnt once
(a zarr shard's index, checked against its crc32c; HDF5's chunk index), the chunks a read
needs are fetched with ``os.pread`` and decoded (zstd, blosc, gzip or none) in a thread pool,
all without the GIL. Arrays of other kinds (filters, codecs or stores not handled here) are
read through zarr or h5py.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import threading
import uuid
import zlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np

from .._utils import logger
from ..errors import DataError

__all__ = [
    "FILES",
    "ChunkedReader",
    "DecodingReader",
    "H5ChunkReader",
    "H5ContiguousReader",
    "OpenFiles",
    "ShardedArrayReader",
    "read_ranges",
]

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


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What tells a file from another written at its path since: its device and inode (a
    file moved there) and size (one rewritten where it is, as anndata truncates an h5ad
    file). Not its time of change: a file only touched (as some clusters' scratch spaces
    ask of files kept) is the same file, and a run reading it goes on."""
    return (st.st_dev, st.st_ino, st.st_size)


class OpenFiles:
    """Read-only descriptors of the files that direct readers read, for all of this process's
    readers: at most ``limit`` kept open when idle, the least recently used closed first, so
    that a collection of thousands of stores holds a bounded number. Each reader has its own
    (a store opened again after its file was replaced reads the new file), and a file opened
    again after its descriptor was closed must be the one first opened (else an error, not
    another file's bytes). A descriptor is closed only when no read uses it. A forked child
    closes the copies it inherited and opens its own."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._after_fork()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        for fd in getattr(self, "_fds", {}).values():  # (the parent's, copied by fork)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds: OrderedDict[tuple[str, Path], int] = OrderedDict()
        self._users: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._fds)

    def release(self, fd: int) -> None:
        """A read done with ``fd`` (from :meth:`acquire`)."""
        with self._lock:
            users = self._users[fd] - 1
            if users:
                self._users[fd] = users
            else:
                del self._users[fd]
                self._close_idle(self.limit)

    def acquire(self, reader: ChunkedReader, file: Path) -> int | None:
        """``reader``'s descriptor of ``file`` (None: the file does not exist, and never did
        for this reader); the caller gives back a descriptor it got (:meth:`release`)."""
        key = (reader.token, file)
        with self._lock:
            fd = self._fds.get(key)
            if fd is not None and file_identity(os.fstat(fd)) != reader.opened.get(file):
                # (a file written where it is while its descriptor stayed open: the next
                # read says so, not the new bytes at the old offsets)
                raise DataError(
                    f"{file} was rewritten since the store opened it (its size changed: "
                    "written anew, or written to): open the store again to read it now."
                )
            if fd is None:
                fd = self._open(file)
                known = reader.opened.get(file)
                if fd is None:
                    if known is not None:
                        raise DataError(
                            f"{file} was removed since it was first read (a store's file): "
                            "restore it, or open the store again."
                        )
                    return None
                st = os.fstat(fd)
                if known is not None and known != file_identity(st):
                    os.close(fd)
                    raise DataError(
                        f"{file} was replaced since the store opened it (rewritten or moved "
                        "there): open the store again to read the new file."
                    )
                if known is None and reader.anchor is not None:
                    # a file first opened now must belong to the store the reader opened
                    # (its metadata file unchanged), not to one that replaced it since
                    anchor, identity = reader.anchor
                    try:
                        now = os.stat(anchor)
                        same = file_identity(now) == identity
                    except FileNotFoundError:
                        same = False
                    if not same:
                        os.close(fd)
                        raise DataError(
                            f"{anchor.parent} was replaced or removed since the store was "
                            "opened (rewritten or moved there): open the store again to read "
                            "the new one."
                        )
                reader.opened[file] = file_identity(st)
                self._fds[key] = fd
            self._fds.move_to_end(key)
            self._users[fd] = self._users.get(fd, 0) + 1
            self._close_idle(self.limit)
            return fd

    def _open(self, file: Path) -> int | None:
        """A new descriptor of ``file`` (lock held); None where it does not exist. At the
        process's limit, the idle ones go first, and fewer are kept from then on (room for
        what else the process opens: loader workers' pipes, sockets)."""
        for attempt in range(2):
            try:
                return os.open(file, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            except OSError as err:
                if err.errno != errno.EMFILE:
                    raise
                if attempt:
                    raise DataError(too_many_open_files(file)) from None
                self.limit = max(self.limit // 2, 8)
                self._close_idle(0)
        raise AssertionError("unreachable")

    def _close_idle(self, keep: int) -> None:
        """Close the least recently used idle descriptors beyond ``keep`` (lock held)."""
        excess = len(self._fds) - keep
        if excess <= 0:
            return
        # the oldest first; as many more as are in use, which stay
        for key in list(itertools.islice(self._fds, excess + len(self._users))):
            if len(self._fds) <= keep:
                return
            fd = self._fds[key]
            if fd not in self._users:
                del self._fds[key]
                os.close(fd)

    def forget(self, root: Path) -> None:
        """Close the idle descriptors of ``root`` and the files under it (a closed store)."""
        with self._lock:
            for key in [k for k in self._fds if k[1] == root or root in k[1].parents]:
                fd = self._fds[key]
                if fd not in self._users:
                    del self._fds[key]
                    os.close(fd)


def too_many_open_files(file: Path | str) -> str:
    """The message for a file that the process's open-file limit keeps closed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raise_it = (
        f"raise it (ulimit -n {hard} in the shell that runs this)"
        if hard == resource.RLIM_INFINITY or soft < hard
        else "raise the hard limit (ulimit -Hn as root, or the system's limits.conf)"
    )
    return (
        f"{file}: this process may open {soft} files at once (ulimit -n), and they are all "
        f"open: {raise_it}, or merge small stores into fewer, larger ones (cellsift convert)."
    )


#: The descriptors of this process's direct readers.
FILES = OpenFiles()


class ChunkedReader(ABC):
    """Reads element ranges of one 1-d array straight from its local file(s), through the
    process's shared descriptors (:data:`FILES`)."""

    dtype: np.dtype
    path: Path

    def __init__(self) -> None:
        #: this reader's descriptors in :data:`FILES`, and the files it read (each one's
        #: :func:`file_identity`)
        self.token = uuid.uuid4().hex
        self.opened: dict[Path, tuple[int, ...]] = {}
        #: a file read when the reader was made (its metadata) and its identity: a file of
        #: the array first opened later is read only while that one is unchanged
        self.anchor: tuple[Path, tuple[int, ...]] | None = None

    def _pin(self, file: Path, fd: int | None = None) -> None:
        """Take ``file`` (of descriptor ``fd``, the one the store read it through, where
        known) as the one the reader reads: its first direct read refuses another file
        that has replaced it since."""
        st = os.fstat(fd) if fd is not None else os.stat(file)
        self.opened[file] = file_identity(st)

    def _acquire(self, file: Path, absent_ok: bool = False) -> int | None:
        """This reader's descriptor of ``file`` from :data:`FILES` (give it back with
        ``FILES.release``); for a file that does not exist None where ``absent_ok``, else an
        error."""
        fd = FILES.acquire(self, file)
        if fd is None and not absent_ok:
            raise FileNotFoundError(f"{file} does not exist (moved or removed).")
        return fd

    def _pread(self, file: Path, nbytes: int, offset: int | None, absent_ok: bool = False) -> bytes:
        """``nbytes`` of ``file`` at ``offset`` (None: its last ``nbytes``); for a file that
        does not exist b"" where ``absent_ok``, else an error."""
        fd = self._acquire(file, absent_ok)
        if fd is None:
            return b""
        try:
            if offset is None:  # (a file shorter than that: an interrupted copy)
                offset = max(os.fstat(fd).st_size - nbytes, 0)
            raw = os.pread(fd, nbytes, offset)
        finally:
            FILES.release(fd)
        if len(raw) != nbytes:
            raise DataError(
                f"{file}: {nbytes} bytes expected at offset {offset}, "
                f"{len(raw)} found: the file is truncated or corrupt; re-create it."
            )
        return raw

    @abstractmethod
    def fetch(
        self, starts: np.ndarray, ends: np.ndarray, pool: ThreadPoolExecutor
    ) -> Callable[[], np.ndarray]:
        """Start reading element ranges ``[starts, ends)``; the returned function finishes the
        read and returns their elements, concatenated."""


class DecodingReader(ChunkedReader):
    """Arrays stored in equal chunks decoded whole (compressed): which chunks a read needs,
    decoded in the pool a bounded group at a time, then the ranges cut out of them."""

    chunk_elems: int

    # -- ranges ----------------------------------------------------------------------------
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

    @abstractmethod
    def _chunk(self, chunk: int) -> np.ndarray:
        """Decoded chunk ``chunk`` (``chunk_elems`` values; the last may be shorter)."""

    #: Most decoded chunks held at once by one read (bounds memory on scattered reads).
    max_chunks_held = 256

    def fetch(
        self, starts: np.ndarray, ends: np.ndarray, pool: ThreadPoolExecutor
    ) -> Callable[[], np.ndarray]:
        """Decode what the ranges need (in the pool) and assemble them, a group at a time.

        Ranges are sorted, so the chunks they need rise: they are split into groups that need
        at most ``max_chunks_held`` chunks, decoded in parallel and assembled one group at a
        time. The first group is queued at once; the returned function finishes the read.
        """
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        first_chunk = starts // self.chunk_elems
        group = (first_chunk - (first_chunk[0] if len(starts) else 0)) // self.max_chunks_held
        bounds = np.concatenate(([0], np.flatnonzero(np.diff(group)) + 1, [len(starts)]))

        def decode(lo: int, hi: int) -> tuple[list[int], Any]:
            ids = self.chunks_of(starts[lo:hi], ends[lo:hi]).tolist()
            return ids, pool.map(self._chunk, ids)

        first = decode(int(bounds[0]), int(bounds[1])) if len(bounds) > 1 else ([], iter(()))

        def finish() -> np.ndarray:
            parts = []
            pending = first
            for k in range(len(bounds) - 1):
                lo, hi = int(bounds[k]), int(bounds[k + 1])
                ids, decoded = pending
                chunks = dict(zip(ids, decoded, strict=True))
                if k + 2 < len(bounds):
                    pending = decode(hi, int(bounds[k + 2]))
                parts.append(self.assemble(starts[lo:hi], ends[lo:hi], chunks))
            return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

        return finish


class ShardedArrayReader(DecodingReader):
    """Reads element ranges of one sharded 1-d zarr v3 array (see the module docstring)."""

    def __init__(self, path: Path, meta: dict[str, Any], decoder: Any, endian: str) -> None:
        super().__init__()
        self.path = path
        self.shape = int(meta["shape"][0])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
        self.shard_elems = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        shard = meta["codecs"][0]["configuration"]
        self.chunk_elems = int(shard["chunk_shape"][0])
        self.chunks_per_shard = self.shard_elems // self.chunk_elems
        self.fill_value = meta.get("fill_value", 0) or 0
        self.separator = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self.decoder = decoder
        self._check_crc = shard["index_codecs"][-1]["name"] == "crc32c"
        self._indexes: dict[int, np.ndarray | None] = {}
        #: Shards that may have no file. None: any (zarr's meaning: a shard with no file
        #: holds only the fill value). A store that knows the array must be whole (CSR
        #: ``data``, ``indices``) sets the few that may; any other missing shard is an error.
        self.absent: set[int] | None = None

    def _key(self, shard: int) -> Path:
        return self.path / "c" / str(shard) if self.separator == "/" else self.path / f"c.{shard}"

    @property
    def n_shards(self) -> int:
        return -(-self.shape // self.shard_elems)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ShardedArrayReader | None:
        """A reader for the array at ``path``, or None when it is not of the handled kind."""
        path = Path(path)
        try:
            with open(path / "zarr.json", "rb") as f:  # (its identity as read: the anchor)
                meta = json.loads(f.read())
                st = os.fstat(f.fileno())
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
        reader = cls(path, meta, *dec)
        reader.anchor = (path / "zarr.json", file_identity(st))
        return reader

    # -- shard files and indexes ----------------------------------------------------------
    def _index(self, shard: int) -> np.ndarray | None:
        if shard not in self._indexes:
            n = self.chunks_per_shard * 16 + (4 if self._check_crc else 0)
            raw = self._pread(self._key(shard), n, None, absent_ok=True)  # (the file's end)
            if not raw:
                if self.absent is not None and shard not in self.absent:
                    raise DataError(
                        f"{self._key(shard)} is missing: shard {shard} of the array {self.path} "
                        "holds values its row pointer needs, so the store is incomplete or "
                        "corrupt (an interrupted copy?). Copy the store again or re-create it."
                    )
                self._indexes[shard] = None  # holds only the fill value: zarr wrote no file
            else:
                body = raw[: self.chunks_per_shard * 16]
                if self._check_crc:
                    import google_crc32c

                    if google_crc32c.value(body) != int.from_bytes(raw[-4:], "little"):
                        raise DataError(
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
        raw = self._pread(self._key(shard), int(index[local, 1]), int(index[local, 0]))
        out = self.decoder.decode(raw) if self.decoder is not None else raw
        return np.frombuffer(out, dtype=self.dtype)


def _h5_descriptor(ds: Any) -> int | None:
    """The descriptor through which h5py reads ``ds``'s file (its default driver's), or
    None where the driver keeps none."""
    try:
        handle = ds.file.id.get_vfd_handle()
    except Exception:  # (another driver: the file's path is stat'ed instead)
        return None
    return handle if isinstance(handle, int) else None


class H5ChunkReader(DecodingReader):
    """A chunked HDF5 dataset, uncompressed or gzip, without other filters.

    Uncompressed: the wanted bytes of each chunk go straight into the output with one
    ``preadv`` per piece (no chunk is read whole). gzip: whole chunks, decoded in the pool.
    """

    def __init__(self, file: Path, ds: Any) -> None:
        super().__init__()
        self.path, self.dtype = file, ds.dtype
        self._pin(file, _h5_descriptor(ds))
        self.chunk_elems = int(ds.chunks[0])
        self.size = int(ds.shape[0])
        self.gzip = ds.compression == "gzip"
        found: list[tuple[int, int, int, int]] = []
        ds.id.chunk_iter(
            lambda info: found.append(
                (info.chunk_offset[0], info.byte_offset, info.size, info.filter_mask)
            )
        )
        n_chunks = -(-self.size // self.chunk_elems)
        self.offsets = np.full(n_chunks, -1, dtype=np.int64)  # -1: never written (zeros)
        self.sizes = np.zeros(n_chunks, dtype=np.int64)
        #: chunks stored without the gzip filter (bit 0 of HDF5's filter mask: the filter
        #: skipped for this chunk, as a writer of raw chunks may)
        self.unfiltered = np.zeros(n_chunks, dtype=bool)
        for start, offset, nbytes, mask in found:
            self.offsets[start // self.chunk_elems] = offset
            self.sizes[start // self.chunk_elems] = nbytes
            self.unfiltered[start // self.chunk_elems] = bool(mask & 1)

    def _chunk(self, chunk: int) -> np.ndarray:
        if self.offsets[chunk] < 0:
            return np.zeros(self.chunk_elems, dtype=self.dtype)
        raw = self._pread(self.path, int(self.sizes[chunk]), int(self.offsets[chunk]))
        decoded = zlib.decompress(raw) if self.gzip and not self.unfiltered[chunk] else raw
        return np.frombuffer(decoded, dtype=self.dtype)

    def fetch(
        self, starts: np.ndarray, ends: np.ndarray, pool: ThreadPoolExecutor
    ) -> Callable[[], np.ndarray]:
        if self.gzip:
            return super().fetch(starts, ends, pool)
        # split ranges at chunk borders: each piece is contiguous in the file
        keep = ends > starts
        a, b = starts[keep], ends[keep]
        c = self.chunk_elems
        first = a // c
        n = (b - 1) // c - first + 1
        k = np.repeat(first, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        lo = np.maximum(np.repeat(a, n), k * c)
        hi = np.minimum(np.repeat(b, n), (k + 1) * c)
        file_off = self.offsets[k] + (lo - k * c) * self.dtype.itemsize
        file_off[self.offsets[k] < 0] = -1
        out = _read_pieces(self, file_off, hi - lo)
        return lambda: out


class H5ContiguousReader(ChunkedReader):
    """A contiguous HDF5 dataset: each range is one ``preadv`` into the output."""

    def __init__(self, file: Path, ds: Any) -> None:
        super().__init__()
        self.path, self.dtype = file, ds.dtype
        self._pin(file, _h5_descriptor(ds))
        self.offset = int(ds.id.get_offset())

    def fetch(
        self, starts: np.ndarray, ends: np.ndarray, pool: ThreadPoolExecutor
    ) -> Callable[[], np.ndarray]:
        keep = ends > starts
        out = _read_pieces(
            self, self.offset + starts[keep] * self.dtype.itemsize, ends[keep] - starts[keep]
        )
        return lambda: out


def _read_pieces(reader: ChunkedReader, file_off: np.ndarray, n_elems: np.ndarray) -> np.ndarray:
    """Elements at byte offsets ``file_off`` (-1: zeros), ``n_elems`` each, concatenated."""
    out = np.empty(int(n_elems.sum()), dtype=reader.dtype)
    view = out.data.cast("B")
    size = reader.dtype.itemsize
    pos = 0
    fd = reader._acquire(reader.path)
    assert fd is not None  # (a missing file raises)
    try:
        for off, n in zip(file_off.tolist(), (n_elems * size).tolist(), strict=True):
            if off < 0:
                out[pos // size : (pos + n) // size] = 0
            elif os.preadv(fd, [view[pos : pos + n]], off) != n:
                raise DataError(
                    f"{reader.path}: {n} bytes expected at offset {off}: the file is "
                    "truncated or corrupt; re-create it."
                )
            pos += n
    finally:
        FILES.release(fd)
    return out


def open_h5_reader(file: Path, ds: Any) -> ChunkedReader | None:
    """A direct reader for h5py dataset ``ds`` of ``file``, or None when h5py must read it.

    Direct where the chunks are raw or deflated only: h5py names a pipeline ``gzip`` when
    it holds other filters too (N-bit, a plugin's), so the filters are counted as well.
    """
    plist = ds.id.get_create_plist()
    plain = (
        ds.ndim == 1
        and ds.shape[0] > 0
        and ds.dtype.kind in "iuf"
        and not ds.shuffle
        and not ds.fletcher32
        and ds.scaleoffset is None
        and ds.compression in (None, "gzip")
        and plist.get_nfilters() == (ds.compression is not None)
        and plist.get_external_count() == 0
    )
    if not plain:
        logger.debug(
            "%s: dataset %s has filters h5py must apply; reading through h5py", file, ds.name
        )
        return None
    if ds.chunks is None:
        if ds.compression is not None or ds.id.get_offset() is None:
            return None
        return H5ContiguousReader(file, ds)
    return H5ChunkReader(file, ds)


def read_ranges(
    readers: list[ChunkedReader], starts: np.ndarray, ends: np.ndarray, pool: ThreadPoolExecutor
) -> list[np.ndarray]:
    """The same element ranges of several arrays (e.g. CSR data and indices), decoded in ``pool``.

    All decoding is queued before any result is assembled, so the arrays are read together.
    """
    pending = [r.fetch(starts, ends, pool) for r in readers]
    return [finish() for finish in pending]
