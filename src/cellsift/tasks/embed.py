"""Embed a whole collection with a trained model, streaming, into an embeddings store.

The store is a directory, moved into place only once complete::

    emb.zarr/
      zarr.json           group attrs: model config, sources, n_cells, the shards' row ranges
      shard-00000/        zarr v3 array, rows [start, stop) x latent float32 (one per rank)
      ...
      metadata.parquet    the cells' obs columns and origin (store, store_row, obs_name)

Each rank of a multi-device run (``devices=N`` spawns N processes, one per GPU, or joins a
running ``torch.distributed`` job) embeds one contiguous slice of the cells and writes its
shard atomically into a staging directory beside ``out`` (``.emb.zarr.partial-of-N``);
rank 0 then writes the metadata and moves the whole store into place. A killed run leaves
the staging directory: run the same command again and the finished shards are kept (its
half-written ones, temporary files, are removed; the store never holds them).

One run at a time writes an output: the run holds a lock beside it (``.emb.zarr.lock``,
released by the kernel when a process dies however it dies), and another run of the same
output stops with :class:`~cellsift.errors.OutputInUseError` naming the holder's process.
Spawned ranks end when their main process does, even one killed outright.

:func:`load_embeddings` reads it back; ``CellIndex.build(*load_embeddings(path))`` indexes it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from .._utils import (
    atomic_path,
    check_model_object,
    check_replaceable,
    holds,
    import_optional,
    is_whole,
    logger,
    model_fingerprint,
    output_lock,
    place_output,
    progress,
    read_error,
    read_one_version,
    refuse_inside,
    remove_path,
    temporaries,
    text_or_none,
    write_error,
)
from .._warnings import warn
from ..data import CellCollection
from ..data.collection import _cell_name, resolve_paths
from ..data.loader import to_torch_csr
from ..data.stores import CellStore, is_anndata, refuse_other
from ..data.writers import check_named
from ..errors import (
    USER_ERRORS,
    ConfigError,
    DataError,
    MissingKeyError,
    OutputInUseError,
    ProcessDiedError,
)

#: What an existing ``out`` must be for ``overwrite`` to replace it: a store, holding its
#: own files only.
_REPLACES = holds(
    "zarr.json",
    "metadata.parquet",
    # (the shards as written; "embeddings": the one array of a store of version 1)
    only=("zarr.json", "metadata.parquet", "shard-" + "[0-9]" * 5, "embeddings"),
)
_WHAT = "an embeddings store"

__all__ = ["embed_collection", "load_embeddings"]

CHUNK = 65_536
#: What a damaged store's error says to do.
_DAMAGED = "the embeddings store is damaged; remove it and embed the cells again (cellsift embed)."
STORE_VERSION = 2


def embed_collection(
    model: Any,
    source: Any,
    out: str | os.PathLike[str],
    *,
    layer: str | None = None,
    obs_columns: Sequence[str] | None = None,
    batch_size: int = 8192,
    device: str | torch.device | None = None,
    devices: int = 1,
    overwrite: bool = False,
    progress_bar: bool = False,
    check_counts: bool = True,
    store_options: dict[str, Any] | None = None,
    min_genes: int | None = None,
) -> Path:
    """Embed every cell of ``source`` (paths, glob, manifest or a CellCollection) with
    ``model`` (a MetricModel) and write the embeddings store ``out`` (module docstring).

    Genes are aligned to the model's vocabulary per store (an error below half overlap);
    ``obs_columns`` (default: all, of any store; missing for the cells of stores without
    them) go to ``metadata.parquet``, with each cell's origin
    (``store``, ``store_row``, ``obs_name``: :meth:`CellCollection.origin`), so that
    search hits lead back to their cells. GPU when present.

    ``check_counts``: values that are not raw counts are an error (every batch read is
    checked, :class:`CellCollection`); False embeds them as they are. ``store_options``
    open each store (:func:`~cellsift.data.open_store`: a SOMA store's ``measurement``,
    ``var_id``). ``min_genes``: leave out cells with fewer genes detected (1: cells without
    counts, which a store may not hold otherwise). A CellCollection given as ``source`` keeps
    its own settings.

    ``devices`` > 1 spawns that many processes (NCCL on GPUs, one each; gloo on the CPU),
    each embedding one shard. Called inside an initialised ``torch.distributed`` job, every
    rank embeds its own shard and all ranks return once the store is in place.
    """
    check_model_object(model)
    out = Path(out)
    if obs_columns is not None:  # (one column as text, not its letters; an iterator read once)
        obs_columns = [obs_columns] if isinstance(obs_columns, str) else list(obs_columns)
    for name, value in (("batch_size", batch_size), ("devices", devices)):
        if not is_whole(value, least=1):
            raise ConfigError(f"{name} must be a whole number of at least 1, not {value!r}.")
    if device is not None:
        from ..models.bundle import check_device  # (cellsift.models imports Lightning)

        check_device(device)  # (before a staging folder is made)
    if isinstance(source, CellCollection) and source.genes != model.genes:
        raise ConfigError(
            "the CellCollection reads other genes (or another order) than the model's: "
            "build it with genes=model.genes, or pass its stores' paths (aligned here)."
        )
    check_named(  # (a name that says a store of cells' counts)
        out,
        "zarr",
        "an embeddings store is a Zarr folder of its own: name it *.zarr (or without a "
        "store's suffix).",
    )
    check_replaceable(out, overwrite, _REPLACES, _WHAT)
    stores = source.stores if isinstance(source, CellCollection) else resolve_paths(source)
    if any(is_anndata(s) or getattr(s, "format", None) == "memory" for s in stores):
        raise DataError(
            "embed_collection writes a store that a killed run resumes, from stores on disk; "
            "an AnnData in memory is embedded with cellsift.tl.embed(adata, model) (into "
            "adata.obsm), or written first (adata.write_h5ad) and its path passed."
        )
    refuse_inside_inputs(out, stores)
    kwargs: dict[str, Any] = {
        "layer": layer,
        "obs_columns": obs_columns,
        "batch_size": batch_size,
        "device": device,
        "overwrite": overwrite,
        "progress_bar": progress_bar,
        "check_counts": check_counts,
        "store_options": store_options,
        "min_genes": min_genes,
    }
    if devices > 1 and not (dist.is_available() and dist.is_initialized()):
        with output_lock(out, _LOCKED_BY, resumes=True):  # (the ranks leave it to this process)
            _spawn_ranks(model, source, out, devices, kwargs)
        return out
    return _embed_rank(model, source, out, **kwargs)


#: who holds an output's lock, for the message of a run that finds it held
_LOCKED_BY = "cellsift embed / embed_collection"


def _spawn_ranks(model: Any, source: Any, out: Path, devices: int, kwargs: dict) -> None:
    """Run :func:`_embed_rank` in ``devices`` spawned processes and wait for them; a
    signal or a rank's failure stops them all (the finished shards are kept)."""
    port = _free_port()
    ranks = torch.multiprocessing.start_processes(
        _spawned,
        args=(devices, port, os.getpid(), model, source, out, kwargs),
        nprocs=devices,
        start_method="spawn",
        join=False,
    )
    # (torch logs each rank it stops after another's failure; the failure is said once)
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    try:
        while not ranks.join():
            pass
    except BaseException as err:  # (SIGTERM or Ctrl-C to this process alone, a rank's failure)
        _end(ranks.processes)  # the finished shards stay: a rerun resumes from them
        failure = _rank_failure(out, devices)
        if failure is not None:  # a rank's own error (bad input), as one process says it
            raise failure from None
        if isinstance(err, torch.multiprocessing.ProcessExitedException):
            how = (
                f"was killed by {err.signal_name} (out of memory, or a scheduler?)"
                if err.signal_name
                else f"ended with exit status {err.exit_code}"
            )
            raise ProcessDiedError(
                f"embedding process {err.error_index} of {devices} {how}; the shards "
                f"finished are kept: the same command again goes on from them ({out})."
            ) from None
        raise
    finally:
        spawn_log.setLevel(level)
        for rank in range(devices):
            _rank_error_file(out, rank).unlink(missing_ok=True)


def _free_port() -> int:
    """A port the system has free now, for the ranks to meet on: not one drawn from
    Python's random numbers, which a seeded run draws alike in every run (two at once on
    one machine then met on one port), and whose sequence the draw would move on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _end(processes: Sequence[Any], grace: float = 10.0) -> None:
    """Stop the ranks still running (SIGTERM, then SIGKILL after ``grace`` seconds): a
    signal to the main process alone would otherwise leave them writing the output."""
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in alive:
        p.join(max(deadline - time.monotonic(), 0.0))
        if p.is_alive():
            p.kill()
            p.join()


def _rank_error_file(out: Path, rank: int) -> Path:
    return out.with_name(f".{out.name}.rank-{rank:05d}.error")


def _rank_failure(out: Path, world: int) -> BaseException | None:
    """The first rank's error about the input or settings, as it raised it (None: none)."""
    return next(
        (e for r in range(world) if (e := read_error(_rank_error_file(out, r))) is not None), None
    )


def _thread_locked_bars() -> None:
    """Progress bars of this process locked by a thread lock, not tqdm's default of a
    multiprocessing one: a rank ended by SIGTERM (the run interrupted) leaves no semaphore
    behind, which Python's resource tracker would report at exit as leaked."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _spawned(
    rank: int,
    world: int,
    port: int,
    parent: int,
    model: Any,
    source: Any,
    out: Path,
    kwargs: dict,
) -> None:
    _exit_with(parent)
    _thread_locked_bars()
    kwargs = {**kwargs, "locked": True}  # (by the parent, for the run)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        if cuda and kwargs["device"] is None:
            torch.cuda.set_device(rank)
            kwargs = {**kwargs, "device": f"cuda:{rank}"}
        _embed_rank(model, source, out, **kwargs)
    except USER_ERRORS as err:  # for the main process to raise (_rank_failure)
        write_error(_rank_error_file(out, rank), err)  # (else its traceback reaches it)
        raise
    finally:
        dist.destroy_process_group()


def _exit_with(parent: int, every: float = 0.2) -> None:
    """End this process once ``parent`` has ended (a watch thread): a main process killed
    outright (SIGKILL, out of memory) can stop no rank itself, and its orphans would write
    on beside the run that the same command starts again."""

    def watch() -> None:
        while os.getppid() == parent:  # (an orphan is adopted by another process)
            time.sleep(every)
        logger.warning("embedding rank: the main process (%d) has ended; stopping", parent)
        os._exit(1)

    threading.Thread(target=watch, name="cellsift-parent-watch", daemon=True).start()


@contextlib.contextmanager
def _run_lock(out: Path, rank: int, distributed: bool) -> Iterator[None]:
    """``out``'s write lock (:func:`~cellsift._utils.output_lock`) for a run not spawned
    by :func:`embed_collection` (which holds it for its ranks): rank 0 takes it, and in a
    ``torch.distributed`` job tells the other ranks whether it could, so that all stop."""
    if not distributed:
        with output_lock(out, _LOCKED_BY, resumes=True):
            yield
        return
    with contextlib.ExitStack() as held:
        outcome: list[Any] = [None]
        if rank == 0:
            try:
                held.enter_context(output_lock(out, _LOCKED_BY, resumes=True))
            except OutputInUseError as err:
                outcome = [str(err)]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise OutputInUseError(outcome[0])
        yield


def _embed_rank(
    model: Any, source: Any, out: Path, *, locked: bool = False, **options: Any
) -> Path:
    """Embed this rank's shard of ``out`` (:func:`_embed_shard`, ``options`` its
    keywords), holding the output's write lock unless the caller holds it (``locked``)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    with contextlib.nullcontext() if locked else _run_lock(out, rank, distributed):
        return _embed_shard(model, source, out, rank, world, distributed, **options)


def _embed_shard(
    model: Any,
    source: Any,
    out: Path,
    rank: int,
    world: int,
    distributed: bool,
    *,
    layer: str | None,
    obs_columns: Sequence[str] | None,
    batch_size: int,
    device: str | torch.device | None,
    overwrite: bool,
    progress_bar: bool,
    check_counts: bool,
    store_options: dict[str, Any] | None,
    min_genes: int | None = None,
) -> Path:
    """This rank's shard of ``out`` (and on rank 0 the store's metadata and finish)."""
    coll = (
        source
        if isinstance(source, CellCollection)
        else CellCollection(
            source,
            genes=model.genes,
            layer=layer,
            min_overlap=0.5,
            overlap_of="vocabulary",
            check_counts=check_counts,
            store_options=store_options,
            min_genes=min_genes,
        )
    )
    if obs_columns is not None:  # (named before the cells are embedded, not after)
        have = _all_columns(coll)
        missing = [c for c in obs_columns if c not in have]
        if missing:
            raise MissingKeyError(
                f"obs_columns {missing} are not obs columns of any store; they have {have}."
            )
    n = coll.n_obs
    bounds = [n * r // world for r in range(world + 1)]
    staging = out.with_name(f".{out.name}.partial-of-{world}")
    if rank == 0:  # a killed run's over another number of processes splits the cells otherwise
        for other in out.parent.glob(f".{glob.escape(out.name)}.partial-of-*"):
            if other != staging and other.is_dir():
                logger.warning(
                    "removing %s, left by a run of this output over another number of "
                    "processes (its shards hold other cells)",
                    other,
                )
                remove_path(other)
    staging.mkdir(parents=True, exist_ok=True)
    shard = staging / f"shard-{rank:05d}"
    fingerprint = model_fingerprint(model)  # hashes the encoder's weights: once
    digest = _digest(fingerprint, coll)
    if _shard_done(shard, bounds[rank], bounds[rank + 1], digest, coll.check_counts):
        logger.info("rank %d: shard %s already complete, kept", rank, shard.name)
    else:
        # a killed run's half-written shard (the staging folder is this output's, the
        # shard this rank's: no other process writes it)
        for stale in temporaries(staging, shard.name):
            logger.info("rank %d: removing %s, left by a run that did not finish", rank, stale)
            remove_path(stale)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        _write_shard(
            model, coll, shard, (bounds[rank], bounds[rank + 1]), dev, batch_size, progress_bar
        )
        _set_attrs(
            shard,
            {
                "start": bounds[rank],
                "stop": bounds[rank + 1],
                "digest": digest,
                "checked": bool(coll.check_counts),
            },
        )
    if distributed:
        dist.barrier()
    if rank == 0:
        _finalize(model, fingerprint, coll, staging, out, bounds, obs_columns, overwrite)
    if distributed:
        dist.barrier()
    return out


def _write_shard(
    model: Any,
    coll: CellCollection,
    shard: Path,
    span: tuple[int, int],
    dev: torch.device,
    batch_size: int,
    progress_bar: bool,
) -> None:
    """Embed rows ``span`` = [start, stop) into the zarr array ``shard`` (atomically)."""
    from ..models.bundle import inference_on  # (cellsift.models imports Lightning)

    zarr = import_optional("zarr")
    start, stop = span
    module = model.module
    with inference_on(module, dev):  # (its mode and device restored after)
        latent = int(model.config["architecture"]["latent"])
        with atomic_path(shard, overwrite=True) as tmp:
            arr = zarr.create_array(  # (zstd's checksum: a chunk damaged on disk is an error)
                tmp,
                shape=(stop - start, latent),
                chunks=(CHUNK, latent),
                dtype="float32",
                compressors=zarr.codecs.ZstdCodec(checksum=True),
            )
            pending: list[np.ndarray] = []  # flushed a whole chunk at a time
            written = 0
            starts = range(start, stop, batch_size)
            with torch.no_grad(), module.encoder.weights_unchanged():
                for s in progress(
                    starts, total=len(starts), desc="embed", enabled=progress_bar, unit="batch"
                ):
                    rows = np.arange(s, min(s + batch_size, stop))  # kept cells' positions
                    counts = coll.read(coll.cell_ids[rows])
                    if coll.check_counts:
                        _check_some_counts(coll, counts, rows)
                    x = to_torch_csr(counts).to(dev)
                    pending.append(module.embed({"x_ng": x}).float().cpu().numpy())
                    held = sum(len(p) for p in pending)
                    last = rows[-1] == stop - 1
                    if held >= CHUNK or last:
                        block = np.concatenate(pending)
                        cut = held if last else held - held % CHUNK
                        arr[written : written + cut] = block[:cut]
                        written, pending = written + cut, [block[cut:]]


def _check_some_counts(coll: CellCollection, counts: Any, rows: np.ndarray) -> None:
    """Cells without counts in the model's genes (their counts all in other genes) carry
    nothing to embed: they would all land on one point. An error naming some. (Row sums,
    not stored entries: a store may hold explicit zeros; counts are >= 0.)"""
    empty = rows[np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel() == 0]
    if len(empty) == 0:
        return
    ids = coll.cell_ids[empty[:3]]
    k = np.searchsorted(coll.offsets, ids, side="right") - 1
    where = [
        f"{coll.stores[j].path} {_cell_name(coll.stores[j], int(i - coll.offsets[j]))}"
        for i, j in zip(ids, k, strict=True)
    ]
    raise DataError(
        f"{len(empty)} of {len(rows)} cells read (rows {rows[0]}-{rows[-1]}) have no counts in "
        f"the model's genes (e.g. {'; '.join(where)}); they carry nothing to embed. Leave "
        "them out of the stores, or embed them anyway with check_counts=False (cellsift "
        "embed: --no-check-counts)."
    )


def _set_attrs(shard: Path, attrs: dict) -> None:
    """Mark a shard complete: its attrs, written last (an atomic replace of zarr.json)."""
    meta = json.loads((shard / "zarr.json").read_text())
    meta["attributes"] = {**meta.get("attributes", {}), **attrs}
    with atomic_path(shard / "zarr.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(meta))


def refuse_inside_inputs(out: str | os.PathLike[str], stores: Sequence[Any]) -> None:
    """A :class:`ConfigError` where ``out`` lies inside a store of ``stores`` (paths or open
    stores: each a manifest or a glob names), or inside the folder of a sharded store
    (:func:`~cellsift.data.convert.convert`'s layout) that holds one: a glob reads its
    shards, and convert --overwrite replaces it whole. (A project folder that holds a
    manifest of stores listed by name is no store.)"""
    from ..data.convert import _is_sharded_store

    folders: set[Path] = set()  # (each folder once: a sharded store lists thousands)
    for store in stores:
        path = store.file if isinstance(store, CellStore) else store
        if not isinstance(path, str | os.PathLike):
            continue
        refuse_inside(out, the_input_store=path)
        # (a shard that is a link: the folder holding it, and the one it leads into)
        folders.update({Path(path).absolute().parent, Path(path).resolve().parent})
    for folder in folders:
        if _is_sharded_store(folder):
            refuse_inside(out, the_input_store=folder)


def _shard_done(shard: Path, start: int, stop: int, digest: str, checked: bool) -> bool:
    """Whether ``shard`` holds rows [start, stop) embedded by this model from these stores
    (a finished earlier run), their counts checked where this run checks them (a shard an
    earlier run wrote with check_counts=False is written again)."""
    meta = shard / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    if checked and attrs.get("checked") is False:
        return False
    return (attrs.get("start"), attrs.get("stop"), attrs.get("digest")) == (start, stop, digest)


def _finalize(
    model: Any,
    fingerprint: str,
    coll: CellCollection,
    staging: Path,
    out: Path,
    bounds: list[int],
    obs_columns: Sequence[str] | None,
    overwrite: bool,
) -> None:
    """Metadata and group attrs into the staging directory, then move it to ``out``."""
    # every rank is done: whatever temporary output is left is a killed run's, not the store's
    for folder in (staging, *(staging / f"shard-{r:05d}" for r in range(len(bounds) - 1))):
        for stale in temporaries(folder):
            remove_path(stale)
    zarr = import_optional("zarr")
    cols = list(obs_columns) if obs_columns is not None else _all_columns(coll)
    _write_metadata(coll, cols, staging / "metadata.parquet")
    shards = [
        {"path": f"shard-{r:05d}", "start": bounds[r], "stop": bounds[r + 1]}
        for r in range(len(bounds) - 1)
    ]
    root = zarr.open_group(staging, mode="a", zarr_format=3)
    root.attrs.update(
        {
            "cellsift": "embeddings",
            "version": STORE_VERSION,
            "n_cells": bounds[-1],
            "latent": int(model.config["architecture"]["latent"]),
            "model": model.config,
            "model_fingerprint": fingerprint,
            "sources": [str(s.path) for s in coll.stores],
            "shards": shards,
        }
    )
    place_output(staging, out, overwrite, _REPLACES, _WHAT)  # (checked again as placed)
    logger.info(
        "embedded %d cells into %s (%d shard%s)",
        bounds[-1],
        out,
        len(shards),
        "" if len(shards) == 1 else "s",
    )


#: Cells a row group of the metadata holds, and so that its writer holds at once as text.
METADATA_ROWS = 1 << 17
#: The metadata's columns of each cell's origin (:meth:`CellCollection.origin`).
ORIGIN_COLUMNS = ("store", "store_row", "obs_name")


def _write_metadata(coll: CellCollection, cols: list[str], path: Path) -> None:
    """The cells' metadata into the Parquet file ``path`` (atomically): the obs ``cols``
    (numbers and booleans keep their type, nullable ones too; others as text) and each
    cell's origin (store, store_row, obs_name). Written a row group at a time: the columns
    are held as the collection reads them (categories, numbers), and only a row group's
    cells as text (a million cells' text would take gigabytes as Python objects)."""
    pq = import_optional("pyarrow.parquet")
    pa = import_optional("pyarrow")
    typed = {c: coll.obs_typed(c, absent_ok=True) for c in cols}
    for c in cols:
        lacking = [str(st.path) for st in coll.stores if c not in st.obs_columns]
        if lacking:
            logger.info(
                "obs column %r is missing for the cells of %d store%s without it (%s)",
                c,
                len(lacking),
                "" if len(lacking) == 1 else "s",
                ", ".join(lacking[:3]) + (", ..." if len(lacking) > 3 else ""),
            )
    names = {c: c for c in cols}  # obs column -> its name in the metadata
    for c in ORIGIN_COLUMNS:  # each cell's store, row and obs name
        if c in names.values():  # an obs column of that name: kept under another
            kept = f"{c}_obs"
            while kept in names.values():
                kept += "_"
            names = {k: kept if v == c else v for k, v in names.items()}
            warn(
                f"the obs column {c!r} is stored as {kept!r} in the embeddings' metadata: "
                f"{c!r} there holds each cell's origin (store, store_row, obs_name)."
            )
    n = len(coll.cell_ids)
    with atomic_path(path, overwrite=True) as tmp, contextlib.ExitStack() as opened:
        writer = None
        for start in range(0, max(n, 1), METADATA_ROWS):  # (0 cells: one empty group)
            stop = min(n, start + METADATA_ROWS)
            block = pd.DataFrame({names[c]: _column(v[start:stop]) for c, v in typed.items()})
            for c, values in coll.origin(start, stop).items():
                block[c] = values.to_numpy()
            text = [c for c in block.columns if block[c].dtype == object]
            for c in text:  # as text, missing values kept missing (not "nan")
                block[c] = text_or_none(block[c].to_numpy())
            table = pa.Table.from_pandas(block, preserve_index=False)
            if writer is None:  # (text as text in every group, one of only None too)
                fields = [
                    pa.field(f.name, pa.string()) if f.name in text else f for f in table.schema
                ]
                schema = pa.schema(fields, metadata=_text_in_pandas_metadata(table, text))
                writer = opened.enter_context(pq.ParquetWriter(tmp, schema))
            writer.write_table(table.cast(schema), row_group_size=METADATA_ROWS)


def _text_in_pandas_metadata(table: Any, text: list[str]) -> dict[bytes, bytes]:
    """``table``'s schema metadata with its ``text`` columns named text in pandas' (a
    column of only missing values in the first row group is "empty" there)."""
    metadata = dict(table.schema.metadata or {})
    if b"pandas" in metadata:
        described = json.loads(metadata[b"pandas"])
        for column in described.get("columns", []):
            if column.get("name") in text:
                column["pandas_type"], column["numpy_type"] = "unicode", "object"
        metadata[b"pandas"] = json.dumps(described).encode()
    return metadata


def _column(values: Any) -> Any:
    """A metadata column: pandas' nullable arrays as they are, others as numpy arrays."""
    if isinstance(values, pd.api.extensions.ExtensionArray) and not isinstance(
        values, pd.Categorical
    ):
        return values
    return np.asarray(values)


def load_embeddings(path: str | os.PathLike[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """(embeddings, metadata) of a store written by :func:`embed_collection`; the
    metadata's ``attrs["model_fingerprint"]`` names the model that embedded them. Both of
    one version of the store, where another process saves over it meanwhile."""
    path = Path(path)
    refuse_other(path, "embeddings")
    return read_one_version(path, lambda: _read_embeddings(path), DataError)


def _read_embeddings(path: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """:func:`load_embeddings`' reads: the shards, then the metadata."""
    zarr = import_optional("zarr")
    pq = import_optional("pyarrow.parquet")
    try:
        root = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, ValueError) as err:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist.") from None
        raise DataError(
            f"{path} is not a cellsift embeddings store ({err}); write one with cellsift embed."
        ) from err
    if root.attrs.get("cellsift") != "embeddings" or "shards" not in root.attrs:
        raise DataError(
            f"{path} is not a cellsift embeddings store of this version; write one with "
            "cellsift embed."
        )
    parts = []
    for s in root.attrs["shards"]:
        where = f"{path}/{s['path']}"
        try:
            arr = root[s["path"]]
        except (KeyError, ValueError, OSError) as err:
            part = path / s["path"]
            what = (
                "is missing"
                if not part.is_dir()
                else "has no zarr.json"
                if not (part / "zarr.json").is_file()
                else f"cannot be read ({type(err).__name__}: {err})"
            )
            raise DataError(f"{where} {what}: {_DAMAGED}") from None
        if arr.shape[0] != s["stop"] - s["start"]:
            raise DataError(
                f"{where} holds {arr.shape[0]} rows, not the expected "
                f"{s['stop'] - s['start']}: {_DAMAGED}"
            )
        if arr.nchunks_initialized != arr.nchunks:  # a missing chunk would read as zeros
            raise DataError(
                f"{where} lacks {arr.nchunks - arr.nchunks_initialized} of its "
                f"{arr.nchunks} chunks: {_DAMAGED}"
            )
        try:
            parts.append(np.asarray(arr[:], dtype=np.float32))
        except (RuntimeError, ValueError, OSError, TypeError) as err:  # codecs' errors
            raise DataError(
                f"{where} cannot be read, a chunk is truncated or corrupt "
                f"({type(err).__name__}: {err}): {_DAMAGED}"
            ) from None
    emb = np.concatenate(parts) if parts else np.zeros((0, root.attrs["latent"]), np.float32)
    pa = import_optional("pyarrow")
    try:
        meta = pq.read_table(path / "metadata.parquet").to_pandas()
    except FileNotFoundError:
        raise _MissingPart(f"{path / 'metadata.parquet'} is missing: {_DAMAGED}") from None
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path / 'metadata.parquet'} cannot be read ({err}): {_DAMAGED}") from None
    # the model these came from: CellIndex.build(emb, meta) records it
    meta.attrs["model_fingerprint"] = root.attrs.get("model_fingerprint")
    if len(meta) != len(emb):
        raise DataError(
            f"{path}: {len(emb)} embeddings but {len(meta)} metadata rows; embed again."
        )
    return emb, meta


class _MissingPart(DataError, FileNotFoundError):
    """A file of an embeddings store is missing (a DataError, and a FileNotFoundError as
    reading the file raised before)."""


def _digest(fingerprint: str, coll: CellCollection) -> str:
    """Of the model (its fingerprint) and the input (each store's path, counts location
    (a SOMA store's measurement too), how its genes map onto the model's, and the size and
    modification time of each of its files; the cells kept): a kept shard must match both."""
    h = hashlib.blake2b(digest_size=16)
    h.update(fingerprint.encode())
    sources = [
        [
            str(s.path),
            getattr(s, "layer", None),
            getattr(s, "measurement", None),
            hashlib.blake2b(np.ascontiguousarray(m.col_map, np.int64).tobytes()).hexdigest(),
            _files_state(Path(s.file)),
        ]
        for s, m in zip(coll.stores, coll.gene_maps, strict=True)
    ]
    h.update(json.dumps([sources, coll.n_obs]).encode())
    h.update(np.ascontiguousarray(coll.cell_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def _files_state(path: Path) -> str:
    """A digest of the size and modification time of ``path``'s files: a directory store's
    (Zarr, SOMA) every file, by its path within, since a chunk rewritten in place changes its
    own entry only, not its folder's."""
    h = hashlib.blake2b(digest_size=16)
    if not path.is_dir():
        st = path.stat()
        h.update(f"{st.st_size} {st.st_mtime_ns}".encode())
        return h.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()  # (a fixed order: os.walk lists entries as the file system keeps them)
        for name in sorted(files):
            full = os.path.join(root, name)
            st = os.stat(full)
            rel = os.path.relpath(full, path)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _all_columns(coll: CellCollection) -> list[str]:
    """The obs columns of any of the stores, in the order they first appear."""
    return list(dict.fromkeys(c for s in coll.stores for c in s.obs_columns))
