"""Embed a whole collection with a trained model, streaming, into an embeddings store.

The store is a directory written atomically::

    embeddings.zarr/
      embeddings          zarr v3 array, cells x latent float32 (chunks of 65,536 cells)
      metadata.parquet    the cells' obs columns (plus ``cell_index``), for the CellIndex
      attrs               model config, number of genes matched, source paths

:func:`load_embeddings` reads it back; ``CellIndex.build(*load_embeddings(path))`` indexes it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._utils import atomic_path, import_optional, logger, progress
from ..data import CellCollection
from ..data.loader import to_torch_csr

__all__ = ["embed_collection", "load_embeddings"]

CHUNK = 65_536


def embed_collection(
    model: Any,
    source: Any,
    out: str | os.PathLike[str],
    *,
    layer: str | None = None,
    obs_columns: Sequence[str] | None = None,
    batch_size: int = 8192,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress_bar: bool = False,
) -> Path:
    """Embed every cell of ``source`` (paths, glob, manifest or a CellCollection) with
    ``model`` (a MetricModel) and write the embeddings store ``out`` (module docstring).

    Genes are aligned to the model's vocabulary per store (an error below half overlap);
    ``obs_columns`` (default: all) go to ``metadata.parquet``. GPU when present.
    """
    zarr = import_optional("zarr")
    pq = import_optional("pyarrow.parquet")
    pa = import_optional("pyarrow")
    coll = (
        source
        if isinstance(source, CellCollection)
        else CellCollection(source, genes=model.genes, layer=layer, min_overlap=0.5)
    )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = model.module.to(dev).eval()
    latent = int(model.config["architecture"]["latent"])
    n = coll.n_obs
    with atomic_path(out, overwrite=overwrite) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        arr = root.create_array(
            "embeddings", shape=(n, latent), chunks=(CHUNK, latent), dtype="float32"
        )
        pending: list[np.ndarray] = []  # flushed a whole chunk at a time
        written = 0
        starts = range(0, n, batch_size)
        with torch.no_grad():
            for start in progress(
                starts, total=len(starts), desc="embed", enabled=progress_bar, unit="batch"
            ):
                rows = np.arange(start, min(start + batch_size, n))
                x = to_torch_csr(coll.read(rows)).to(dev)
                pending.append(module.embed({"x_ng": x}).float().cpu().numpy())
                held = sum(len(p) for p in pending)
                if held >= CHUNK or rows[-1] == n - 1:
                    block = np.concatenate(pending)
                    cut = held if rows[-1] == n - 1 else held - held % CHUNK
                    arr[written : written + cut] = block[:cut]
                    written, pending = written + cut, [block[cut:]]
        cols = list(obs_columns) if obs_columns is not None else _all_columns(coll)
        meta = pd.DataFrame({c: np.asarray(coll.obs_column(c)) for c in cols})
        for c in meta.columns:
            if meta[c].dtype == object:
                meta[c] = meta[c].astype(str)
        table = pa.Table.from_pandas(meta, preserve_index=False)
        pq.write_table(table, tmp / "metadata.parquet", row_group_size=1 << 17)
        root.attrs.update(
            {
                "cellsift": "embeddings",
                "n_cells": n,
                "latent": latent,
                "model": model.config,
                "sources": [str(s.path) for s in coll.stores],
            }
        )
    logger.info("embedded %d cells into %s", n, out)
    return Path(out)


def load_embeddings(path: str | os.PathLike[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """(embeddings, metadata) of a store written by :func:`embed_collection`."""
    zarr = import_optional("zarr")
    pq = import_optional("pyarrow.parquet")
    root = zarr.open_group(str(path), mode="r")
    if root.attrs.get("cellsift") != "embeddings":
        raise ValueError(f"{path} is not a cellsift embeddings store (see cellsift embed).")
    emb = np.asarray(root["embeddings"][:], dtype=np.float32)
    meta = pq.read_table(Path(path) / "metadata.parquet").to_pandas()
    return emb, meta


def _all_columns(coll: CellCollection) -> list[str]:
    cols: list[str] = []
    for s in coll.stores:
        cols += [c for c in s.obs_columns if c not in cols]
    return [c for c in cols if all(c in s.obs_columns for s in coll.stores)]
