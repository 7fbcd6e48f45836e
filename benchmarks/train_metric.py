"""Full MetricModel training steps streaming from a Zarr store: cellsift vs SCimilarity.

A synthetic atlas with 28,000 genes (SCimilarity's gene space is 28,231) is written as Zarr
(read by cellsift, streamed) and h5ad (read by SCimilarity's own data module, which loads it
into memory). Both train SCimilarity's published model (28k -> 1024 x 3 -> 128 and back,
dropout 0.5 / input 0.4, semihard triplets + reconstruction, AdamW, cosine) with batches of
1,000 cells, under Lightning, for a few warm-up steps and then timed steps; a step is timed
from one training batch's start to the next, so loading, mining, forward, backward and the
optimiser step are all inside. Variants of cellsift: fp32, bf16-mixed, torch.compile, a
larger batch, and the same step on batches already in memory (the ceiling the loader is
measured against). On a GPU (``--device cuda``) the same variants run there.

    python benchmarks/train_metric.py --quick            # CPU, 12k cells
    python benchmarks/train_metric.py --device cuda      # on a GPU machine

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
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


class _Clock:
    """Lightning callback: the start time of every training batch, and the end of training."""

    def __new__(cls) -> Any:
        import lightning.pytorch as pl

        class Clock(pl.Callback):
            def __init__(self) -> None:
                self.stamps: list[float] = []

            def _sync(self, pl_module: Any) -> None:
                if pl_module.device.type == "cuda":
                    torch.cuda.synchronize()

            def on_train_batch_start(self, trainer: Any, pl_module: Any, *a: Any) -> None:
                self._sync(pl_module)
                self.stamps.append(time.perf_counter())

            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                self._sync(pl_module)
                self.stamps.append(time.perf_counter())

        return Clock()


def _per_step(stamps: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)][warmup:]


def run_cellsift(
    zarr: Path,
    *,
    device: str,
    batch_size: int,
    precision: str,
    compile: bool,
    warmup: int,
    steps: int,
    num_workers: int,
) -> dict[str, Any]:

    from cellsift.data.datamodule import CellDataModule
    from cellsift.models import MetricModel

    model = MetricModel.from_collection(zarr)
    dm = CellDataModule(
        zarr, mode="weighted", batch_size=batch_size, val_fraction=0, num_workers=num_workers
    )
    clock = _Clock()
    model.train(
        dm,
        max_epochs=-1,
        max_steps=warmup + steps,
        accelerator=device,
        devices=1,
        precision=precision,
        compile=compile,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        default_root_dir=str(zarr.parent),  # (a run stopped by a signal saves its state there)
    )
    times = _per_step(clock.stamps, warmup)
    per = statistics.median(times)
    return {"cells_per_s": batch_size / per, "seconds_per_step": per, "all_seconds": times}


def run_in_memory(
    zarr: Path, *, device: str, batch_size: int, precision: str, warmup: int, steps: int
) -> dict[str, Any]:
    """The same module, optimiser and step on batches already on the device (no loader)."""
    from cellsift.data import CellCollection
    from cellsift.data.loader import to_torch_csr
    from cellsift.models import MetricModel

    coll = CellCollection(zarr)
    model = MetricModel.from_collection(coll)
    codes, _ = coll.codes("cell_type_ontology_term_id")
    study, _ = coll.codes("dataset_id")
    rows = np.sort(np.random.default_rng(0).choice(coll.n_obs, batch_size, replace=False))
    batch = {
        "x_ng": to_torch_csr(coll.read(rows)).to(device),
        "y_n": torch.from_numpy(codes[rows]).to(device),
        "study_n": torch.from_numpy(study[rows]).to(device),
    }
    module = model.module.to(device).train()
    opt = torch.optim.AdamW(module.parameters(), lr=5e-3, weight_decay=0.01, fused=True)
    dtype = torch.bfloat16 if precision.startswith("bf16") else None
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = module(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    per = statistics.median(times)
    return {"cells_per_s": batch_size / per, "seconds_per_step": per, "all_seconds": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--num-workers", type=int, default=1)
    args = ap.parse_args()
    import _peers
    from cellsift.datasets import synthetic_atlas

    gpu = args.device == "cuda"
    n_cells = 12_000 if args.quick else 100_000
    warmup, steps = (2, 4) if args.quick and not gpu else (5, 20) if not gpu else (20, 100)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    variants: dict[str, dict[str, Any]] = {
        "cellsift/fp32": {"batch_size": 1000, "precision": "32-true", "compile": False},
        "cellsift/bf16": {"batch_size": 1000, "precision": "bf16-mixed", "compile": False},
        "cellsift/compile": {"batch_size": 1000, "precision": "32-true", "compile": True},
    }
    if gpu:
        variants["cellsift/bf16_compile_b4096"] = {
            "batch_size": 4096,
            "precision": "bf16-mixed",
            "compile": True,
        }
    results: dict[str, float] = {}
    detail: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    if not gpu:  # (a CPU without fast bfloat16 products takes minutes a step in bf16-mixed)
        from cellsift.train.plan import cpu_has_fast_bfloat16

        if not cpu_has_fast_bfloat16():
            del variants["cellsift/bf16"]
            skipped["cellsift/bf16"] = (
                "torch has no fast bfloat16 matrix product on this CPU "
                f"({torch.backends.cpu.get_cpu_capability()}; its oneDNN kernels need AVX-512 "
                "or AMX): cellsift warns against bf16-mixed here"
            )
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        zarr = synthetic_atlas(n_cells, N_GENES, n_studies=6, path=Path(tmp) / "atlas.zarr")
        peers = not (gpu or args.no_peers)  # the h5ad is SCimilarity's only
        if peers:
            h5ad = synthetic_atlas(n_cells, N_GENES, n_studies=6, path=Path(tmp) / "atlas.h5ad")
        print(f"# atlas {n_cells:,} x {N_GENES:,} written in {time.perf_counter() - t:.0f} s")
        for name, v in variants.items():
            out = run_cellsift(
                zarr,
                device=args.device,
                warmup=warmup,
                steps=steps,
                num_workers=args.num_workers,
                **v,
            )
            results[name], detail[name] = out["cells_per_s"], {**out, **v}
            print(f"# {name:34s} {out['cells_per_s']:10,.0f} cells/s", flush=True)
        for name, prec in (("cellsift/in_memory_fp32", "32-true"),):
            out = run_in_memory(
                zarr,
                device=args.device,
                batch_size=1000,
                precision=prec,
                warmup=warmup,
                steps=steps,
            )
            results[name], detail[name] = out["cells_per_s"], out
            print(f"# {name:34s} {out['cells_per_s']:10,.0f} cells/s", flush=True)
        if not peers:
            skipped["scimilarity"] = "run on the CPU only" if gpu else "--no-peers"
        else:
            obo = Path(tmp) / "cl.obo"
            subprocess.run([sys.executable, str(HERE / "_write_cl_obo.py"), str(obo)], check=True)
            peer = _peers.run_peer(
                "scimilarity",
                [
                    "--h5ad",
                    str(h5ad),
                    "--obo",
                    str(obo),
                    "--warmup",
                    str(warmup),
                    "--steps",
                    str(steps),
                ],
                timeout=3600,
                script="run_scimilarity_train",
            )
            if "skipped" in peer:
                skipped["scimilarity"] = peer["skipped"]
            else:
                results["scimilarity"], detail["scimilarity"] = peer["cells_per_s"], peer
                print(f"# {'scimilarity':34s} {peer['cells_per_s']:10,.0f} cells/s", flush=True)
    ratios = {}
    if "scimilarity" in results:
        ratios["fp32_vs_scimilarity"] = round(results["cellsift/fp32"] / results["scimilarity"], 2)
    ratios["fp32_vs_in_memory"] = round(
        results["cellsift/fp32"] / results["cellsift/in_memory_fp32"], 2
    )
    print(
        json.dumps(
            {
                "benchmark": "train_metric",
                "unit": "cells/s",
                "results": results,
                "ratios": ratios,
                "skipped": skipped,
                "detail": detail,
                "config": {
                    "n_cells": n_cells,
                    "n_genes": N_GENES,
                    "device": args.device,
                    "device_name": torch.cuda.get_device_name() if gpu else "cpu",
                    "threads": torch.get_num_threads(),
                    "warmup_steps": warmup,
                    "timed_steps": steps,
                    "num_workers": args.num_workers,
                    "quick": args.quick,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
