"""Conversion between h5ad, Zarr and TileDB-SOMA, streamed chunk by chunk, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.extensions import ExtensionArray

from .._utils import atomic_path, check_replaceable, progress, refuse_inside
from .._warnings import warn
from ..errors import ConfigError, DataError
from .collection import refuse_non_counts, resolve_paths
from .stores import CellStore, cut_by_values, open_store
from .writers import (
    A_STORE,
    FORMATS,
    SUFFIX,
    Format,
    check_named,
    guess_format,
    is_store,
    open_writer,
)

__all__ = ["convert"]

_A_SHARDED_STORE = "a sharded store"


def _is_sharded_store(path: Path) -> bool:
    """Is ``path`` a sharded store as :func:`convert` writes one: a folder whose
    ``manifest.json`` names a store format and its shard files, and that holds nothing
    else? (Not any folder with a manifest: a CellIndex or a project folder, or a sharded
    store's folder that also keeps notes or the source, is never replaced.)"""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        held = {p.name for p in path.iterdir()}
    except (OSError, ValueError):
        return False
    if not (
        isinstance(manifest, dict)
        and manifest.get("format") in FORMATS
        and isinstance(manifest.get("files"), list)
        and all(isinstance(f, str) for f in manifest["files"])
    ):
        return False
    listed = {Path(f).parts[0] for f in manifest["files"] if Path(f).parts}
    return held <= listed | {"manifest.json"}


def _obs_chunk(store: CellStore, columns: list[str], rows: np.ndarray) -> pd.DataFrame:
    """The obs rows ``rows`` of ``store``: columns with their dtypes (categoricals and
    pandas' nullable arrays kept, missing values missing), indexed by the obs names."""
    data = {}
    for c in columns:
        col = store.obs_column(c)
        if isinstance(col, pd.Series):
            col = col.array
        data[c] = col[rows] if isinstance(col, ExtensionArray) else np.asarray(col)[rows]
    names = getattr(store, "obs_names", None)
    index = np.asarray(names)[rows] if names is not None else rows.astype(str)
    return pd.DataFrame(data, index=pd.Index(index, name=getattr(names, "name", None)))


def _chunks(store: CellStore, rows: np.ndarray, chunk_size: int) -> list[np.ndarray]:
    """``rows`` cut into chunks of at most ``chunk_size`` cells and ``SCAN_VALUES`` values
    (:meth:`CellStore.values_per_row`)."""
    return [rows[a:b] for a, b in cut_by_values(store.values_per_row()[rows], chunk_size)]


def convert(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    format: Format | None = None,
    layer: str | None = None,
    shard_size: int | None = None,
    min_genes: int | None = None,
    chunk_size: int = 50_000,
    overwrite: bool = False,
    progress_bar: bool = False,
    source_options: dict[str, Any] | None = None,
    check_counts: bool = True,
    **writer_options: Any,
) -> Path:
    """Convert a store to another format, never holding the count matrix in memory.

    Parameters
    ----------
    source, dest
        Input store and output path (format from ``dest``'s suffix unless ``format``).
    layer
        Where the counts are in ``source`` (``None`` = X, a layer name, or ``"raw"``).
    shard_size
        Split the output into shards of this many cells: ``dest`` becomes a directory with
        ``shard-00000.<fmt>``, ... and a ``manifest.json`` (readable by CellCollection).
    min_genes
        Drop cells with fewer genes detected (``1`` drops empty cells).
    chunk_size
        Most cells read and written at a time (fewer where they would hold more than
        :data:`~cellsift.data.stores.SCAN_VALUES` values: a dense matrix of many genes).
    check_counts
        Refuse values that are not raw counts (NaN, negative, non-integer: e.g.
        log-normalised X while the counts sit in a layer): a sample of the source's cells
        before anything is written, then every cell as it is read, the first such cell
        named (the output is then not written).

    The output appears only when complete: a failed or interrupted conversion leaves nothing.
    What else an h5ad or Zarr source holds (other layers, obsm, uns, ...) is not written: a
    warning names it.
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be at least 1 cell, not {chunk_size}.")
    if resolve_paths(source) != [source]:  # a manifest (a sharded store) or a glob
        raise ConfigError(
            f"{source} is a manifest or a glob of stores (a sharded store): convert reads one "
            "store, by its path. Convert them one by one, or read them all as one with "
            "CellCollection."
        )
    store = open_store(source, layer=layer, **(source_options or {}))
    if store.var_names.has_duplicates:  # (every format's var keeps unique names)
        twice = store.var_names[store.var_names.duplicated()].unique()[:5].tolist()
        raise DataError(
            f"{store.path}: var_names hold the same name more than once, e.g. {twice}; "
            "make them unique in the input (adata.var_names_make_unique() where they are "
            "symbols) and convert it again."
        )
    dest = Path(dest)
    if shard_size is not None:
        fmt = format or (guess_format(dest.with_suffix(dest.suffix or ".h5ad")))
        check_replaceable(dest, overwrite, _is_sharded_store, _A_SHARDED_STORE)  # before the work
    else:
        fmt = format or guess_format(dest)
        check_named(dest, fmt)  # (a store that its own name misdescribes)
        check_replaceable(dest, overwrite, is_store, A_STORE)
    # the source's file, whether given by its path or as a store opened on it (an AnnData
    # in memory has none); inside a store overwrite would replace (one of its shards)
    src = store.file if store.on_disk else None
    refuse_inside(dest, the_input_store=src)
    if src is not None and dest.resolve() in src.resolve().parents:  # (it would be deleted)
        raise ConfigError(
            f"{dest} holds the input {source}: writing there would replace it (and whatever "
            "else is there) while it is read. Write the output elsewhere."
        )
    if check_counts and store.n_obs > 0:
        # a sample, as a collection checks when it opens: log-normalised values written as
        # counts would surface only at training, with the file's counts layer left behind
        from .collection import _check_counts

        _check_counts(store)
    others: list[str] = getattr(store, "other_elements", list)()
    shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
    if others and src is not None and dest.exists() and os.path.samefile(src, dest):
        raise ConfigError(  # (overwrite: the source itself replaced, and what it holds lost)
            f"{dest} is the input: converting it in place would drop its {shown}, which "
            "convert does not carry over. Write the output elsewhere."
        )
    if others:  # a store for reading cells: what else the file holds is not copied
        warn(
            f"{source}: convert writes the counts ({store.layer or 'X'}), obs and var; the "
            f"file's {shown} are not carried over. Keep the source for them."
        )
    keep = np.ones(store.n_obs, dtype=bool)
    if min_genes is not None:  # (from the values: zeros stored as entries are not genes)
        keep = store.row_nnz(exact=min_genes > 0) >= min_genes
    rows_all = np.flatnonzero(keep)
    if len(rows_all) == 0:
        why = f" with at least {min_genes} genes" if min_genes is not None else ""
        raise DataError(
            f"{source}: no cells{why} to write ({store.n_obs} in the store); nothing to convert."
        )
    columns = list(store.obs_columns)
    var = store.var.copy()

    def write(path: Path, rows: np.ndarray, desc: str, overwrite: bool) -> None:
        writer = open_writer(
            path, var, format=fmt, n_obs=len(rows), overwrite=overwrite, **writer_options
        )
        with writer:
            steps = _chunks(store, rows, chunk_size)
            for chunk in progress(
                steps, total=len(steps), desc=desc, enabled=progress_bar, unit="chunk"
            ):
                x = store.read(chunk)
                if check_counts:  # (the sample above: cells of another kind elsewhere)
                    refuse_non_counts(store, x, chunk)
                if not x.data.all():  # zeros stored as entries are not carried over
                    x = x.copy()  # (a store's arrays may be read-only)
                    x.eliminate_zeros()
                writer.append(x, _obs_chunk(store, columns, chunk))

    if shard_size is None:  # the writer refuses dest, or moves the store into place at the end
        write(dest, rows_all, f"converting to {fmt}", overwrite)
        return dest
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, not {shard_size}.")
    with atomic_path(
        dest, overwrite=overwrite, replaces=_is_sharded_store, what=_A_SHARDED_STORE
    ) as tmp:
        tmp.mkdir()
        files, sizes = [], []
        for k, lo in enumerate(range(0, len(rows_all), shard_size)):
            name = f"shard-{k:05d}{SUFFIX[fmt]}"
            rows = rows_all[lo : lo + shard_size]
            write(tmp / name, rows, f"shard {k}", overwrite=False)
            files.append(name)
            sizes.append(len(rows))
        manifest = {"format": fmt, "files": files, "n_obs": sizes, "source": str(source)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return dest
