"""Loader throughput: random minibatches of 1024 cells from h5ad, Zarr and TileDB-SOMA.

cellsift (each store, each mode) and its peers read the same files in the same run: anndata's
AnnLoader, scDataset, tiledbsoma-ml and Cellarium's DistributedAnnDataCollection, each in a
virtualenv of its own (benchmarks/_peers.py). annbatch needs Python >= 3.12 and is reported
as skipped on Python 3.11. Every loader delivers batches of raw counts from one
process (num_workers=0) after the same warm-up; ``scan`` is a single-threaded sequential scan
(read + decode, ``store.iter_chunks``) of each store, for reference (not a ceiling: the
loader's sequential mode reads ahead in a thread of its own and can pass it). cellsift reads
with its counts checks off (``check_counts=False``; on by default, about 11% of an h5ad
read), as the peers check nothing. cellsift's own batches are CSR (training densifies them on the GPU);
``.../dense`` entries densify on the CPU like the peers and are the like-for-like comparison.
The full run also streams a 2M-cell atlas to show that memory is
bounded by batch size x prefetch, not by the atlas.

    python benchmarks/loader.py --quick      # ~50k cells x 10k genes
    python benchmarks/loader.py              # 500k cells x 20k genes, plus the 2M-cell RSS run

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
sys.path.insert(0, str(HERE))

BATCH = 1024
BLOCK = 64
FETCH = 16


def _writers_digest() -> str:
    """A digest of the code that reads and writes the converted stores (cellsift.data and
    its helpers): stores a changed converter would write otherwise are converted anew, not
    taken from the cache."""
    import cellsift._utils
    import cellsift.data

    digest = hashlib.sha256()
    folder = Path(cellsift.data.__file__ or "").parent
    for file in [*sorted(folder.glob("*.py")), Path(cellsift._utils.__file__ or "")]:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def make_atlas(n_cells: int, n_genes: int, formats: tuple[str, ...]) -> dict[str, Path]:
    """The benchmark atlas in each format (cached under benchmarks/.data: the h5ad by the
    generator's version, the stores converted from it by the converter's code)."""
    from cellsift.data.convert import convert
    from cellsift.datasets import SYNTHETIC_VERSION, synthetic_atlas

    folder = DATA / f"atlas_{n_cells}x{n_genes}_v{SYNTHETIC_VERSION}"
    converted = folder / f"converted_{_writers_digest()}"
    converted.mkdir(parents=True, exist_ok=True)
    paths = {"h5ad": folder / "atlas.h5ad"}
    if not paths["h5ad"].exists():
        t = time.perf_counter()
        synthetic_atlas(
            n_cells, n_genes, n_studies=8, path=paths["h5ad"], seed=0, progress_bar=True
        )
        print(
            f"# generated {n_cells:,} x {n_genes:,} in {time.perf_counter() - t:.0f} s", flush=True
        )
    for fmt in formats:
        if fmt == "h5ad":
            continue
        paths[fmt] = converted / f"atlas.{fmt}"
        if not paths[fmt].exists():
            convert(paths["h5ad"], paths[fmt], progress_bar=True)
    shards = converted / "shards"
    if not shards.exists():
        convert(paths["h5ad"], shards, format="h5ad", shard_size=max(10_000, n_cells // 8))
    paths["shards"] = shards
    return paths


# -- cellsift, one configuration per fresh process ---------------------------------------
def run_one(spec: dict) -> dict:
    meter = PeakRSS()
    out = _run_one(spec)
    out["peak_rss_mb"] = meter.stop()
    return out


def _run_one(spec: dict) -> dict:
    import torch

    from cellsift.data import CellCollection, CellLoader, IterableCellDataset, open_store

    if spec["mode"] == "scan":
        store = open_store(spec["path"])
        t, cells = time.perf_counter(), 0
        for _, x in store.iter_chunks(16_384):
            cells += x.shape[0]
        return {"cells_per_s": cells / (time.perf_counter() - t)}
    coll = CellCollection(spec["path"], check_counts=False)
    ds = IterableCellDataset(
        coll,
        mode=spec["mode"],
        batch_size=BATCH,
        block_size=spec["block"],
        fetch_factor=FETCH,
        label_key="cell_type_ontology_term_id",
        study_key="dataset_id",
    )
    loader = CellLoader(ds, num_workers=spec["workers"])
    it = iter(loader)

    def next_batch() -> torch.Tensor:
        nonlocal it
        try:
            return next(it)["x_ng"]
        except StopIteration:
            it = iter(loader)
            return next(it)["x_ng"]

    # Training densifies on the GPU: native batches stay CSR. "dense" densifies on the CPU,
    # the output the peers deliver, for the like-for-like comparison.
    from cellsift.transforms import Densify

    densify = Densify()
    out = (lambda x: densify({"x_ng": x})["x_ng"]) if spec.get("dense") else (lambda x: x)
    for _ in range(spec["warmup"]):
        out(next_batch())
    t, cells, n = time.perf_counter(), 0, 0
    while n < spec["n_batches"] or (spec.get("epoch") and cells < coll.n_obs):
        cells += out(next_batch()).shape[0]
        n += 1
    return {"cells_per_s": cells / (time.perf_counter() - t), "n_cells_timed": cells}


class PeakRSS:
    """Peak resident memory of this process and its children (DataLoader workers), sampled.

    ``ru_maxrss`` is no use here: on Linux it survives exec, so a child reports the peak of
    the benchmark process that started it.
    """

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak / 2**20, 1)


def cellsift(spec: dict, timeout: float = 900) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--run-one", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode:
        raise RuntimeError(f"cellsift run {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    ap.add_argument("--no-peers", action="store_true", help="measure cellsift only")
    ap.add_argument("--rss-cells", type=int, default=None, help="cells of the RSS atlas")
    ap.add_argument("--rounds", type=int, default=None, help="repeats; the best is kept")
    args = ap.parse_args()
    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return

    import _peers

    n_cells, n_genes = (50_000, 10_000) if args.quick else (500_000, 20_000)
    n_batches, warmup = (60, 10) if args.quick else (200, 20)
    rounds = args.rounds or (2 if args.quick else 3)
    rss_cells = args.rss_cells or (None if args.quick else 2_000_000)
    paths = make_atlas(n_cells, n_genes, ("h5ad", "zarr", "soma"))
    results: dict[str, float] = {}
    rss: dict[str, float] = {}
    notes: dict[str, str] = {}
    scan: dict[str, float] = {}
    skipped: dict[str, str] = dict(_peers.UNAVAILABLE)

    # Every measurement runs in `rounds` interleaved rounds and keeps its best: a burst of
    # load on a shared machine then spoils one round, not the comparison.
    jobs: list[tuple[str, Callable[[], dict]]] = []
    for fmt in ("h5ad", "zarr", "soma"):
        path = str(paths[fmt])
        base = {"path": path, "n_batches": n_batches, "warmup": warmup, "workers": 0}
        jobs += [
            (f"scan/{fmt}", partial(cellsift, {"path": path, "mode": "scan"})),
            (
                f"cellsift/{fmt}/sequential",
                partial(cellsift, {**base, "mode": "sequential", "block": 1}),
            ),
            (
                f"cellsift/{fmt}/block{BLOCK}",
                partial(cellsift, {**base, "mode": "block", "block": BLOCK}),
            ),
            (f"cellsift/{fmt}/block1", partial(cellsift, {**base, "mode": "block", "block": 1})),
            (
                f"cellsift/{fmt}/weighted",
                partial(cellsift, {**base, "mode": "weighted", "block": BLOCK}),
            ),
            (
                f"cellsift/{fmt}/block{BLOCK}/dense",
                partial(cellsift, {**base, "mode": "block", "block": BLOCK, "dense": True}),
            ),
        ]
    jobs.append(
        (
            f"cellsift/h5ad/block{BLOCK}/workers2",
            partial(
                cellsift,
                {
                    "path": str(paths["h5ad"]),
                    "n_batches": n_batches,
                    "warmup": warmup,
                    "workers": 2,
                    "mode": "block",
                    "block": BLOCK,
                },
            ),
        )
    )
    if not args.no_peers:
        common = [
            "--batch-size",
            str(BATCH),
            "--n-batches",
            str(n_batches),
            "--warmup",
            str(warmup),
            "--block-size",
            str(BLOCK),
            "--fetch-factor",
            str(FETCH),
        ]
        peer_args = {
            "annloader": ["--h5ad", str(paths["h5ad"])],
            "scdataset": ["--h5ad", str(paths["h5ad"])],
            "tiledbsoma_ml": ["--soma", str(paths["soma"])],
            "cellarium": ["--shards-dir", str(paths["shards"])],
        }
        for name, data_args in peer_args.items():
            jobs.append((name, partial(_peers.run_peer, name, data_args + common, 1800)))

    # each peer runs right after the cellsift job it is compared with (dense batches of its
    # store): this machine's speed drifts over minutes, and a round runs for minutes
    peer_by_store = {"h5ad": ("annloader", "scdataset", "cellarium"), "soma": ("tiledbsoma_ml",)}
    peer_jobs = {key: job for key, job in jobs if not key.startswith(("cellsift/", "scan/"))}
    ordered = []
    for key, job in jobs:
        if key in peer_jobs:
            continue
        ordered.append((key, job))
        for fmt, names in peer_by_store.items():
            if key == f"cellsift/{fmt}/block{BLOCK}/dense":
                ordered += [(p, peer_jobs.pop(p)) for p in names if p in peer_jobs]
    jobs = ordered + list(peer_jobs.items())

    for r in range(rounds):
        for key, job in jobs:
            if key in skipped:
                continue
            out = job()
            if "skipped" in out:  # (its earlier rounds' figures go too: none half-run)
                skipped[key] = out["skipped"]  # (peers only: cellsift's runs raise)
                for table in (results, rss, notes):
                    table.pop(key, None)
                print(f"# {key:34s} skipped: {out['skipped']}", flush=True)
                continue
            print(
                f"# round {r + 1} {key:34s} {out['cells_per_s']:>12,.0f} cells/s  "
                f"rss {out['peak_rss_mb']:,.0f} MB",
                flush=True,
            )
            if key.startswith("scan/"):
                fmt = key.split("/")[1]
                scan[fmt] = max(scan.get(fmt, 0.0), round(out["cells_per_s"], 1))
                continue
            results[key] = max(results.get(key, 0.0), round(out["cells_per_s"], 1))
            rss[key] = max(rss.get(key, 0.0), out["peak_rss_mb"])
            if "randomness" in out:
                notes[key] = out["randomness"]

    if rss_cells:
        big = make_atlas(rss_cells, 2_000, ("h5ad",))
        out = cellsift(
            {
                "path": str(big["h5ad"]),
                "n_batches": 0,
                "warmup": 0,
                "workers": 2,
                "mode": "block",
                "block": BLOCK,
                "epoch": True,
            },
            timeout=7200,
        )
        key = f"cellsift/h5ad/block{BLOCK}/stream_{rss_cells}_cells"
        results[key], rss[key] = round(out["cells_per_s"], 1), out["peak_rss_mb"]
        print(f"# {key} {out['cells_per_s']:,.0f} cells/s, peak rss {out['peak_rss_mb']:,.0f} MB")

    ratios = {}
    for fmt in ("h5ad", "zarr", "soma"):
        block = results[f"cellsift/{fmt}/block{BLOCK}"]
        ratios[f"{fmt}/weighted_vs_block{BLOCK}"] = round(
            results[f"cellsift/{fmt}/weighted"] / block, 2
        )
        ratios[f"{fmt}/block{BLOCK}_vs_scan"] = round(block / scan[fmt], 2)
        peers = [results[p] for p in peer_by_store.get(fmt, ()) if p in results]
        if peers:  # like for like: dense float32 batches from one process
            dense = results[f"cellsift/{fmt}/block{BLOCK}/dense"]
            ratios[f"{fmt}/block{BLOCK}_dense_vs_best_peer"] = round(dense / max(peers), 2)
    print(
        json.dumps(
            {
                "benchmark": "loader",
                "unit": "cells/s",
                "results": results,
                "scan": scan,
                "ratios": ratios,
                "peak_rss_mb": rss,
                "skipped": skipped,
                "peer_randomness": notes,
                "config": {
                    "n_cells": n_cells,
                    "n_genes": n_genes,
                    "batch_size": BATCH,
                    "block_size": BLOCK,
                    "fetch_factor": FETCH,
                    "num_workers": 0,
                    "rounds": rounds,
                    "quick": args.quick,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
