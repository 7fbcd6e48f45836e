"""Triplet mining + loss for one batch: cellsift vs SCimilarity's TripletSelector + TripletLoss.

One 1000-cell batch of 128-d embeddings (clustered by label), 30 Cell Ontology labels, 5
studies, on the CPU, for each negative-selection mode. SCimilarity runs in a virtualenv of
its own (benchmarks/_peers.py; it pins zarr<3) on the same embeddings, with the Cell Ontology
written to a local OBO file (it would download one otherwise). Results are seconds per batch:
the median of timed calls after each side has warmed up for a second (a training run's steady
state). The two sides alternate over a few rounds per mode (this machine's speed drifts over
seconds): a side's figure is the median of its rounds' medians, the speedup the median of the
rounds' ratios. cellsift's ``detail`` also times its distance matrix alone and its mining
given the distances, for where its time goes.

    python benchmarks/mining.py --quick

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
WARMUP_SECONDS = 1.0  # each side warms up this long (at least one call) before timing
sys.path.insert(0, str(HERE))


def make_batch(
    n: int = 1000, dims: int = 128, n_labels: int = 30, n_studies: int = 5, seed: int = 0
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Embeddings clustered by label (with study shifts); labels are real CL leaf-ish terms."""
    from cellsift.ontology import load_cell_ontology

    cl = load_cell_ontology()
    pool = sorted(t for t in cl.terms if not cl.is_deprecated(t) and len(cl.ancestors(t)) > 6)
    rng = np.random.default_rng(seed)
    terms = list(rng.choice(pool, n_labels, replace=False))
    y = rng.integers(0, n_labels, n)
    s = rng.integers(0, n_studies, n)
    centers = rng.normal(0, 1, (n_labels, dims))
    shifts = rng.normal(0, 0.3, (n_studies, dims))
    z = centers[y] + shifts[s] + rng.normal(0, 2.0, (n, dims))  # overlapping, as mid-training
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return z.astype(np.float32), [terms[i] for i in y], s


def _median_seconds(call: Callable[[], object], repeats: int) -> float:
    warm_until = time.perf_counter() + WARMUP_SECONDS  # steady state, as a training run sees
    while time.perf_counter() < warm_until:  # the first calls pay for allocations and threads
        call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def time_cellsift(
    z: np.ndarray, labels: list[str], studies: np.ndarray, mode: str, repeats: int
) -> dict:
    """The loss call (distances, mining, loss), and, for where the time goes, its distance
    matrix alone and its mining given the distances."""
    from cellsift.losses import TripletLoss, mine_triplets, pairwise_distance
    from cellsift.ontology import load_cell_ontology

    cl = load_cell_ontology()
    cats = sorted(set(labels))
    related = torch.from_numpy(cl.related(cats))
    y = torch.tensor([cats.index(x) for x in labels])
    s = torch.from_numpy(studies)
    zt = torch.from_numpy(z).requires_grad_(True)
    loss_fn = TripletLoss(margin=0.05, negative=mode, related_ll=related)
    seconds = _median_seconds(lambda: loss_fn(zt, y, s), repeats)
    d = pairwise_distance(zt).detach()
    loss, trip = loss_fn(zt, y, s)
    return {
        "seconds_per_batch": seconds,
        "distance_seconds": _median_seconds(lambda: pairwise_distance(zt), repeats),
        "mining_seconds": _median_seconds(
            lambda: mine_triplets(zt, y, related, s, margin=0.05, negative=mode, dist_nn=d),
            repeats,
        ),
        "n_triplets": len(trip),
        "loss": float(loss.detach()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    import _peers

    # medians of many calls: other load on a machine moves single calls by tens of percent,
    # and over seconds more: each mode alternates the two sides over ROUNDS rounds, each
    # round's ratio compares times taken moments apart, and the medians over rounds are kept
    rounds = 3 if args.quick else 5
    repeats = 150 if args.quick else 300  # cellsift's calls take a few ms
    peer_repeats = 5 if args.quick else 10  # SCimilarity's ~0.3 s
    z, labels, studies = make_batch()
    results: dict[str, float] = {}
    detail: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    speedup: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "batch.npz"
        np.savez(npz, z=z, labels=np.array(labels), studies=studies.astype(str))
        obo = Path(tmp) / "cl.obo"
        subprocess.run([sys.executable, str(HERE / "_write_cl_obo.py"), str(obo)], check=True)
        for mode in ("semihard", "hardest", "random"):
            ours: list[dict] = []
            peers: list[dict] = []
            for _ in range(rounds):
                ours.append(time_cellsift(z, labels, studies, mode, repeats))
                if args.no_peers or "scimilarity" in skipped:
                    continue
                peer = _peers.run_peer(
                    "scimilarity",
                    [
                        "--npz",
                        str(npz),
                        "--obo",
                        str(obo),
                        "--mode",
                        mode,
                        "--repeats",
                        str(peer_repeats),
                        "--warmup-seconds",
                        str(WARMUP_SECONDS),
                    ],
                    timeout=1800,
                )
                if "skipped" in peer:  # (its earlier rounds' figures go too: none half-run)
                    skipped["scimilarity"] = f"{peer['skipped']} (in {mode}; later modes not run)"
                    peers.clear()
                    continue
                peers.append(peer)
            out = {
                k: float(np.median([o[k] for o in ours]))
                for k in ("seconds_per_batch", "distance_seconds", "mining_seconds")
            }
            out.update(
                n_triplets=ours[0]["n_triplets"],
                loss=ours[0]["loss"],
                rounds=[o["seconds_per_batch"] for o in ours],
            )
            results[f"cellsift/{mode}"] = out["seconds_per_batch"]
            detail[f"cellsift/{mode}"] = out
            print(
                f"# cellsift/{mode:9s} {out['seconds_per_batch'] * 1e3:9.2f} ms (distances "
                f"{out['distance_seconds'] * 1e3:.2f}, mining {out['mining_seconds'] * 1e3:.2f}"
                f"; rounds {', '.join(f'{t * 1e3:.2f}' for t in out['rounds'])})",
                flush=True,
            )
            if peers:
                theirs = [p["seconds_per_batch"] for p in peers]
                results[f"scimilarity/{mode}"] = float(np.median(theirs))
                detail[f"scimilarity/{mode}"] = {  # (its figure: the rounds' median)
                    **peers[0],
                    "seconds_per_batch": results[f"scimilarity/{mode}"],
                    "rounds": theirs,
                }
                ratios = [t / o["seconds_per_batch"] for t, o in zip(theirs, ours, strict=False)]
                speedup[mode] = round(float(np.median(ratios)), 1)
                print(
                    f"# scimilarity/{mode:6s} {results[f'scimilarity/{mode}'] * 1e3:9.2f} ms "
                    f"(rounds {', '.join(f'{t * 1e3:.1f}' for t in theirs)}); "
                    f"ratio per round {', '.join(f'{r:.1f}' for r in ratios)}",
                    flush=True,
                )
    print(
        json.dumps(
            {
                "benchmark": "mining",
                "unit": "seconds per batch",
                "results": results,
                "speedup_vs_scimilarity": speedup,
                "skipped": skipped,
                "detail": detail,
                "config": {
                    "n_cells": 1000,
                    "dims": 128,
                    "labels": 30,
                    "studies": 5,
                    "margin": 0.05,
                    "device": "cpu",
                    "threads": torch.get_num_threads(),
                    "rounds": rounds,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
