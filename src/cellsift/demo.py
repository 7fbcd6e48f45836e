"""``cellsift demo`` / ``make demo``: the data path end to end on real or synthetic data.

Converts the data to Zarr and TileDB-SOMA, streams an epoch from each store in block-shuffled
and balanced (weighted) mode through the GPU-ready transforms, splits train/validation by
donor, and prints a summary. The first line says which data it runs on.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from .data import CellCollection, CellLoader, IterableCellDataset
from .data.convert import convert
from .data.datamodule import CellDataModule
from .datasets import synthetic_atlas
from .transforms import default_pipeline

__all__ = ["run_demo"]


def _source(out: Path, synthetic: bool, n_cells: int) -> tuple[Path, str, str]:
    """(h5ad path, study/donor column, description)."""
    from .datasets import shared_data_path

    if not synthetic:
        try:
            path = shared_data_path("kang2018")
            return path, "batch", f"real data: Kang 2018 PBMC, 8 donors ({path})"
        except FileNotFoundError as err:
            reason = str(err).split(".")[0]
    else:
        reason = "--synthetic was given"
    path = out / "synthetic_atlas.h5ad"
    if not path.exists():
        synthetic_atlas(n_cells, 2000, n_studies=6, path=path, seed=0)
    return path, "dataset_id", f"synthetic atlas, {n_cells:,} cells x 2,000 genes ({reason})"


def run_demo(
    out: str | Path = "demo_out", *, synthetic: bool = False, n_cells: int = 50_000
) -> int:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    h5ad, group_key, what = _source(out, synthetic, n_cells)
    print(f"cellsift demo on {what}")
    label_key = "cell_type_ontology_term_id"

    stores = {"h5ad": h5ad}
    for fmt in ("zarr", "soma"):
        dest = out / f"{h5ad.stem}.{fmt}"
        t = time.perf_counter()
        convert(h5ad, dest, overwrite=True)
        print(f"  converted to {fmt:5s} in {time.perf_counter() - t:5.1f} s -> {dest}")
        stores[fmt] = dest

    pipeline = default_pipeline()
    print("\n  store  mode       cells/s   batches  cells   distinct")
    freq: dict[str, Counter[str]] = {}
    for fmt, path in stores.items():
        coll = CellCollection(path)
        for mode in ("block", "weighted"):
            ds = IterableCellDataset(
                coll,
                mode=mode,
                batch_size=1024,
                block_size=64,
                fetch_factor=8,
                label_key=label_key,
                study_key=group_key,
            )
            loader = CellLoader(ds, num_workers=1)
            t, n, nb, seen = time.perf_counter(), 0, 0, set()
            counts: Counter[str] = Counter()
            for batch in loader:
                x = pipeline(batch)["x_ng"]
                assert x.shape[1] == coll.n_vars and bool(np.isfinite(x.numpy()).all())
                n += x.shape[0]
                nb += 1
                seen.update(batch["obs_idx_n"].tolist())
                counts.update(np.asarray(ds.categories["y_n"])[batch["y_n"].numpy()].tolist())
            rate = n / (time.perf_counter() - t)
            print(f"  {fmt:6s} {mode:9s} {rate:9,.0f} {nb:8d} {n:7,d} {len(seen):9,d}")
            freq[mode] = counts

    names = _names(h5ad, label_key)
    print("\n  cell type (share of cells drawn)   block-shuffled   weighted (balanced)")
    total_b, total_w = sum(freq["block"].values()), sum(freq["weighted"].values())
    for term, _ in freq["block"].most_common():
        print(
            f"  {names.get(term, term)[:34]:34s} {freq['block'][term] / total_b:14.1%}"
            f" {freq['weighted'][term] / total_w:19.1%}"
        )

    dm = CellDataModule(
        stores["zarr"], study_key=group_key, split_key=group_key, val_fraction=0.15, batch_size=1024
    )
    dm.setup()
    assert dm.train is not None and dm.val is not None
    print(
        f"\n  train/validation split by {group_key!r}: {dm.train.n_obs:,} training cells, "
        f"{dm.val.n_obs:,} validation cells (held out: {', '.join(dm.val_groups or [])})"
    )
    print(f"  outputs in {out}/")
    return 0


def _names(path: Path, label_key: str) -> dict[str, str]:
    coll = CellCollection(path)
    for col in ("cell_type_ontology_label", "cell_type"):
        if col in coll.stores[0].obs_columns:
            ids = np.asarray(coll.obs_column(label_key)).astype(str)
            names = np.asarray(coll.obs_column(col)).astype(str)
            return dict(zip(ids.tolist(), names.tolist(), strict=True))
    return {}
