"""Cell search: CellIndex (exact, faiss IVF) vs hnswlib with SCimilarity's parameters, and usearch.

Clustered synthetic embeddings (1M x 128; ``--quick``: 50k, which hnswlib's build at
SCimilarity's parameters keeps to a few minutes; ``--n``: any): 400 cell-type clusters with
study shifts and noise, L2-normalised, as cell embeddings are. The 1,000 queries are new cells of the same
atlas (drawn like the indexed ones, not indexed); k = 50. For every index, in the same run and on the same vectors:
recall@50 against exact search, queries/s (all 1,000 queries in one call, every library on
all cores), build time and bytes per cell of the searchable structure (vectors + graph or
lists, as saved to disk). Filtered search selects 1% of the cells by a metadata column
(``sample``), without changing the index (searched exactly within the selection), and 25%
by cell type (100 of the 400 types: most lists hold none of them, and most queries are of
another type), searched through the IVF (the size past which a selection is searched so,
200k cells at 1M, scaled with the atlas) and exactly, for the ratio; hnswlib filters with a
Python predicate, on 100 of the queries.

``hnswlib`` is built as SCimilarity builds its search index (cosine, M = 80,
ef_construction = 1000) and queried as its cell searches query it (``CellQuery.
search_nearest`` and ``search_centroid_nearest``: ef = k where none is given); ``hnswlib/ef100``
at ef = 100, the default of its lower-level ``get_nearest_neighbors``, for reference;
``hnswlib/at_ivf_recall`` at the least ef of a ladder (50 to 800) whose recall reaches
cellsift IVF's, for queries/s at matched recall.
hnswlib's filtered rows (a Python predicate per visited node: one thread, 100 queries, one
call) are compared with cellsift's filtered search run the same way (``.../one_thread``),
beside cellsift's own rows on every core.
``usearch`` is a candidate engine at its defaults. Both come from the ``[bench]`` extra.

    python benchmarks/search.py --quick

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
import pandas as pd
import torch

K = 50
N_QUERIES = 1000
#: one thread count for every engine: torch's (OMP_NUM_THREADS where set, else the cores),
#: which cellsift's exact search runs on; faiss (cellsift's IVF) and the peers are given it
THREADS = torch.get_num_threads()


def make_embeddings(n: int, dim: int = 128, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    n_types, n_studies = 400, 50
    centers = rng.normal(size=(n_types, dim)).astype(np.float32)
    shifts = (0.25 * rng.normal(size=(n_studies, dim))).astype(np.float32)
    t = rng.integers(0, n_types, n)
    s = rng.integers(0, n_studies, n)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 1 << 17):  # in blocks: bounded temporary memory
        sl = slice(start, start + (1 << 17))
        x[sl] = centers[t[sl]] + shifts[s[sl]]
        x[sl] += 0.7 * rng.standard_normal(size=x[sl].shape, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = pd.DataFrame(
        {
            "study": pd.Categorical([f"study_{i:02d}" for i in s]),
            "sample": pd.Categorical([f"sample_{i:03d}" for i in rng.integers(0, 100, n)]),
            "cell_type": t,
        }
    )
    return x, meta


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(g, t)) for g, t in zip(got, truth, strict=True))
    return hits / truth.size


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def timed(fn: Any, repeats: int = 3) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="cells (default 1M; --quick 50k)")
    args = ap.parse_args()
    if args.n is not None and args.n < 100 * K:  # (hnswlib fails a search of fewer)
        ap.error(f"--n must be at least {100 * K:,}: the 1% filter must select k = {K} cells.")
    import faiss
    import pyarrow as pa

    import cellsift.tasks.index as index_module

    faiss.omp_set_num_threads(THREADS)
    from cellsift.tasks import CellIndex
    from cellsift.tasks.index import EXACT_SELECTION_MAX

    n = args.n or (50_000 if args.quick else 1_000_000)
    t = time.perf_counter()
    x, meta = make_embeddings(n + N_QUERIES)
    # queries: new cells of the same atlas (drawn like the indexed ones, not indexed)
    q, x, meta = x[n:], x[:n], meta.iloc[:n].reset_index(drop=True)
    print(f"# {n:,} x {x.shape[1]} embeddings in {time.perf_counter() - t:.0f} s", flush=True)
    results: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}

    def record(name: str, **entry: float) -> None:
        results[name] = {k: round(float(v), 4) for k, v in entry.items()}
        print(f"# {name:34s} " + "  ".join(f"{k} {v:,.4g}" for k, v in entry.items()), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        # exact: the ground truth, and an engine of its own
        t = time.perf_counter()
        exact = CellIndex.build(x, meta, engine="exact")
        build = time.perf_counter() - t
        secs, res = timed(lambda: exact.search(q, K))  # (best of 3, as every engine's)
        truth = res.indices
        exact.save(Path(tmp) / "exact")
        record(
            "cellsift/exact",
            recall=1.0,
            qps=N_QUERIES / secs,
            build_s=build,
            bytes_per_cell=dir_bytes(Path(tmp) / "exact") / n
            - (Path(tmp) / "exact" / "metadata.parquet").stat().st_size / n,
        )

        t = time.perf_counter()
        ivf = CellIndex.build(x, meta, engine="ivf", k=K, target_recall=0.99)
        build = time.perf_counter() - t
        secs, res = timed(lambda: ivf.search(q, K))
        ivf.save(Path(tmp) / "ivf")
        record(
            "cellsift/ivf",
            recall=recall(res.indices, truth),
            qps=N_QUERIES / secs,
            build_s=build,
            bytes_per_cell=(
                dir_bytes(Path(tmp) / "ivf")
                - (Path(tmp) / "ivf" / "metadata.parquet").stat().st_size
            )
            / n,
            nprobe=ivf.params["nprobe"],
            nlist=ivf.params["nlist"],
        )
        # filtered: one sample of 100 (1% of the cells), without touching the index
        loaded = CellIndex.load(Path(tmp) / "ivf")
        flt = {"sample": "sample_007"}
        rows = np.flatnonzero(meta["sample"] == "sample_007")
        sub_truth = exact.search(q, K, filter=flt, exact=True).indices

        def filtered(name: str, flt: dict, rows: np.ndarray, truth: np.ndarray) -> None:
            """The saved IVF index searched with ``flt`` (its cells ``rows``), timed."""
            secs, res = timed(lambda: loaded.search(q, K, filter=flt))
            found = res.indices[res.indices >= 0]  # (fewer selected cells than k: padded)
            assert np.isin(found, rows).all()
            record(
                name, recall=recall(res.indices, truth), qps=N_QUERIES / secs, selected=len(rows)
            )

        filtered("cellsift/ivf/filtered_1pct", flt, rows, sub_truth)

        # filtered by cell type: 100 of the 400 types (25% of the cells). Most lists hold
        # none of them, and three queries in four are of another type, whose nearest
        # selected cells lie far away. At 1M cells such a selection is past the size
        # searched exactly; the threshold is scaled with the atlas (--quick: 10k of 50k)
        scaled_max = round(EXACT_SELECTION_MAX * n / 1_000_000)
        index_module.EXACT_SELECTION_MAX = scaled_max
        flt_types = {"cell_type": list(range(100))}
        rows_types = np.flatnonzero(meta["cell_type"].to_numpy() < 100)
        secs, res = timed(lambda: exact.search(q, K, filter=flt_types, exact=True))
        types_truth = res.indices
        record(
            "cellsift/exact/filtered_types_25pct",
            recall=1.0,
            qps=N_QUERIES / secs,
            selected=len(rows_types),
        )
        filtered("cellsift/ivf/filtered_types_25pct", flt_types, rows_types, types_truth)
        index_module.EXACT_SELECTION_MAX = EXACT_SELECTION_MAX

        try:
            import hnswlib
        except ImportError:
            skipped["hnswlib"] = "not installed: pip install -e '.[bench]'"
        else:
            t = time.perf_counter()
            h = hnswlib.Index(space="cosine", dim=x.shape[1])
            h.init_index(max_elements=n, M=80, ef_construction=1000)
            h.add_items(x, np.arange(n), num_threads=THREADS)
            build = time.perf_counter() - t
            h.save_index(str(Path(tmp) / "hnsw.bin"))
            for name, ef in (("hnswlib", K), ("hnswlib/ef100", 100)):
                h.set_ef(ef)
                secs, (labels, _) = timed(lambda: h.knn_query(q, k=K, num_threads=THREADS))
                record(
                    name,
                    recall=recall(labels, truth),
                    qps=N_QUERIES / secs,
                    build_s=build,
                    bytes_per_cell=(Path(tmp) / "hnsw.bin").stat().st_size / n,
                    ef=ef,
                )
            # and at the least ef (of a ladder) whose recall reaches cellsift IVF's, for qps
            # at matched recall
            target = results["cellsift/ivf"]["recall"]
            reached = False
            for ef in (K, 60, 70, 80, 100, 125, 150, 200, 300, 400, 600, 800):
                h.set_ef(ef)
                if recall(h.knn_query(q, k=K, num_threads=THREADS)[0], truth) >= target:
                    reached = True
                    break
            secs, (labels, _) = timed(lambda: h.knn_query(q, k=K, num_threads=THREADS))
            record(
                "hnswlib/at_ivf_recall",
                recall=recall(labels, truth),
                qps=N_QUERIES / secs,
                ef=ef,
                reached=reached,  # (0: no ef of the ladder reached it; the last one's figures)
            )
            h.set_ef(K)
            # hnswlib's filtered search: a Python predicate per visited node; cellsift's
            # filtered search timed the same way beside it (one thread, 100 queries, one call)
            for what, selected, within, flt_ in (
                ("filtered_1pct", rows, sub_truth, flt),
                ("filtered_types_25pct", rows_types, types_truth, flt_types),
            ):
                allowed = np.zeros(n, dtype=bool)
                allowed[selected] = True
                secs, (labels, _) = timed(
                    lambda: h.knn_query(q[:100], k=K, num_threads=1, filter=lambda i: allowed[i]),  # noqa: B023
                    repeats=1,
                )
                record(
                    f"hnswlib/{what}",
                    recall=recall(labels, within[:100]),
                    qps=100 / secs,
                    selected=len(selected),
                )
                fresh = CellIndex.load(Path(tmp) / "ivf")  # (its selection caches cold too)
                if what == "filtered_types_25pct":  # (through the IVF, as its row above)
                    index_module.EXACT_SELECTION_MAX = scaled_max
                arrow_threads = pa.cpu_count()  # (the filter's scan runs in arrow's pool)
                torch.set_num_threads(1)
                faiss.omp_set_num_threads(1)
                pa.set_cpu_count(1)
                try:
                    secs, res = timed(lambda: fresh.search(q[:100], K, filter=flt_), repeats=1)  # noqa: B023
                finally:
                    torch.set_num_threads(THREADS)
                    faiss.omp_set_num_threads(THREADS)
                    pa.set_cpu_count(arrow_threads)
                    index_module.EXACT_SELECTION_MAX = EXACT_SELECTION_MAX
                record(
                    f"cellsift/ivf/{what}/one_thread",
                    recall=recall(res.indices, within[:100]),
                    qps=100 / secs,
                    selected=len(selected),
                )
            del h
        try:
            from usearch.index import Index as UIndex
        except ImportError:
            skipped["usearch"] = "not installed: pip install -e '.[bench]'"
        else:
            t = time.perf_counter()
            u = UIndex(ndim=x.shape[1], metric="cos", dtype="f32")
            u.add(np.arange(n), x, threads=THREADS)
            build = time.perf_counter() - t
            secs, m = timed(lambda: u.search(q, K, threads=THREADS))
            u.save(str(Path(tmp) / "usearch.bin"))
            record(
                "usearch",
                recall=recall(np.asarray(m.keys), truth),
                qps=N_QUERIES / secs,
                build_s=build,
                bytes_per_cell=(Path(tmp) / "usearch.bin").stat().st_size / n,
            )
    targets = {}
    if "hnswlib" in results:
        c, h = results["cellsift/ivf"], results["hnswlib"]
        targets = {
            "recall_ge_0.99": c["recall"] >= 0.99,
            "qps_ge_hnswlib": c["qps"] >= h["qps"],
            "bytes_le_hnswlib": c["bytes_per_cell"] <= h["bytes_per_cell"],
            "filtered_recall_ge_0.99": results["cellsift/ivf/filtered_1pct"]["recall"] >= 0.99,
            "filtered_types_recall_ge_0.99": (
                results["cellsift/ivf/filtered_types_25pct"]["recall"] >= 0.99
            ),
            "qps_vs_hnswlib": round(c["qps"] / h["qps"], 2),
            "qps_vs_hnswlib_at_ivf_recall": round(
                c["qps"] / results["hnswlib/at_ivf_recall"]["qps"], 2
            ),
            "build_speedup_vs_hnswlib": round(h["build_s"] / c["build_s"], 1),
            **{  # like for like: one thread, 100 queries, one call each
                f"{what}_qps_vs_hnswlib": round(
                    results[f"cellsift/ivf/{what}/one_thread"]["qps"]
                    / results[f"hnswlib/{what}"]["qps"],
                    1,
                )
                for what in ("filtered_1pct", "filtered_types_25pct")
            },
        }
    print(
        json.dumps(
            {
                "benchmark": "search",
                "unit": "recall@50, queries/s, seconds, bytes/cell",
                "results": results,
                "targets": targets,
                "skipped": skipped,
                "config": {
                    "n_cells": n,
                    "dim": int(x.shape[1]),
                    "queries": N_QUERIES,
                    "k": K,
                    "threads": THREADS,
                },
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
