"""Embedding raw counts with a trained model: cellsift's MetricModel.embed vs SCimilarity's path.

One SCimilarity model (their architecture, 28,000 genes -> 1024 x 3 -> 128, random weights
written by their own classes in their virtualenv; benchmarks/peers/run_scimilarity_embed.py)
embeds the same cells both ways, on the CPU:

``scimilarity``   ``CellEmbedding`` -> ``align_dataset`` -> ``lognorm_counts`` ->
                  ``get_embeddings`` (their documented path)
``cellsift``      ``import_scimilarity`` of that directory (a bundle), ``MetricModel.load``,
                  then ``MetricModel.embed`` of the raw counts (genes aligned, counts per
                  10k, log1p, encoder; on the CPU the first layer reads only the stored
                  counts)
``cellsift/dense``  the same with the batch densified first (the encoder's dense path)

Both read the same h5ad (reading is not timed). The embeddings must agree: a largest
difference above ``AGREE`` fails the run (exit status 1, after the JSON line). The sides
alternate over a few rounds (this machine's speed drifts over seconds): a side's figure is
the median of its rounds, the speedup the median of the rounds' ratios. Results are cells
per second.

    python benchmarks/embed.py --quick

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

N_GENES = 28_000
AGREE = 1e-4  # largest |difference| of the two sides' embeddings (float32 sums in 2 orders)


def time_cellsift(model: Any, h5ad: Path, dense: bool) -> tuple[float, np.ndarray]:
    import anndata as ad

    adata = ad.read_h5ad(h5ad)
    module = model.module
    if dense:  # normalise and densify the whole batch, then the encoder's dense layers

        def run(a: Any) -> np.ndarray:
            fn = lambda batch: module.encoder(module.normalize(batch)["x_ng"])  # noqa: E731
            return model._apply(a, fn, module.encoder.latent, None, 4096, "cpu")

    else:
        run = model.embed
    run(adata[:256])  # warm-up: compiled kernel, the first layer's transposed weight
    t = time.perf_counter()
    z = run(adata)
    return adata.n_obs / (time.perf_counter() - t), z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    import anndata as ad

    import _peers
    from cellsift.datasets import synthetic_atlas
    from cellsift.models import MetricModel, import_scimilarity

    n_cells = 8_192 if args.quick else 50_000
    rounds = 3 if args.quick else 5
    rates: dict[str, list[float]] = {}
    detail: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    disagree: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        h5ad = synthetic_atlas(n_cells, N_GENES, n_studies=4, path=Path(tmp) / "cells.h5ad")
        model_dir = Path(tmp) / "scimilarity_model"
        model = None
        for r in range(rounds):
            want = None
            if args.no_peers:
                skipped["scimilarity"] = "--no-peers"
            elif "scimilarity" not in skipped:
                peer = _peers.run_peer(
                    "scimilarity",
                    ["--h5ad", str(h5ad), "--model", str(model_dir),
                     *(["--write-model"] if r == 0 else []),
                     "--out", str(Path(tmp) / "scimilarity.npy")],
                    timeout=3600,
                    script="run_scimilarity_embed",
                )  # fmt: skip
                if "skipped" in peer:  # (its earlier rounds' figures go too: none half-run)
                    skipped["scimilarity"] = f"{peer['skipped']} (in round {r + 1})"
                    rates.pop("scimilarity", None)
                    detail.pop("scimilarity", None)
                else:
                    want = np.load(Path(tmp) / "scimilarity.npy")
                    rates.setdefault("scimilarity", []).append(peer["cells_per_s"])
                    detail["scimilarity"] = peer
                    print(f"# scimilarity     {peer['cells_per_s']:10,.0f} cells/s", flush=True)
            if model is None:
                if want is not None:  # their model, imported
                    model = MetricModel.load(import_scimilarity(model_dir, Path(tmp) / "bundle"))
                else:  # the same architecture, random weights
                    genes = list(map(str, ad.read_h5ad(h5ad, backed="r").var_names))
                    model = MetricModel(genes=genes, labels=["B cell", "T cell"])
            for name, dense in (("cellsift", False), ("cellsift/dense", True)):
                rate, z = time_cellsift(model, h5ad, dense)
                line = f"# {name:15s} {rate:10,.0f} cells/s"
                rates.setdefault(name, []).append(rate)
                if want is not None:
                    diff = float(np.abs(z - want).max())
                    seen = detail.setdefault(name, {}).get("max_abs_diff_vs_scimilarity", 0.0)
                    detail[name]["max_abs_diff_vs_scimilarity"] = max(seen, diff)
                    line += f"  (max |diff| vs scimilarity {diff:.1e})"
                    if diff > AGREE and name not in disagree:
                        disagree.append(name)
                print(line, flush=True)
    results = {name: float(np.median(r)) for name, r in rates.items()}
    for name, r in rates.items():
        detail.setdefault(name, {})["rounds"] = r
    if "scimilarity" in results:  # (its last round's run, with the rounds' median)
        detail["scimilarity"]["cells_per_s"] = results["scimilarity"]
    ratios = {"sparse_vs_dense": round(results["cellsift"] / results["cellsift/dense"], 2)}
    if "scimilarity" in results:
        per_round = [c / s for c, s in zip(rates["cellsift"], rates["scimilarity"], strict=True)]
        ratios["cellsift_vs_scimilarity"] = round(float(np.median(per_round)), 2)
    print(
        json.dumps(
            {
                "benchmark": "embed",
                "unit": "cells/s",
                "results": results,
                "ratios": ratios,
                "skipped": skipped,
                "detail": detail,
                "config": {
                    "n_cells": n_cells,
                    "n_genes": N_GENES,
                    "architecture": "28000 -> 1024 x 3 -> 128",
                    "device": "cpu",
                    "threads": torch.get_num_threads(),
                    "rounds": rounds,
                },
                **({"disagree": disagree} if disagree else {}),
            }
        )
    )
    if disagree:  # (a speed of different embeddings is no result)
        sys.exit(f"embed: {', '.join(disagree)} disagreed with scimilarity by more than {AGREE}")


if __name__ == "__main__":
    main()
