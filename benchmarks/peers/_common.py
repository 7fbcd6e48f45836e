"""Shared CLI, timing loop and result line for the peer scripts.

Imported by the scripts in this folder, which run inside a peer's own virtualenv: only the
standard library and torch may be assumed here.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Iterator

import torch


def parse_args(data_args: dict[str, str], argv: list[str] | None = None) -> argparse.Namespace:
    """Common benchmark options plus the peer's data arguments (``{"--h5ad": help}``)."""
    p = argparse.ArgumentParser()
    for flag, help_text in data_args.items():
        p.add_argument(flag, required=True, help=help_text)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--n-batches", type=int, default=50, help="timed batches")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=64, help="contiguous rows shuffled as a unit")
    p.add_argument("--fetch-factor", type=int, default=16, help="batches read per I/O fetch")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    return p.parse_args(argv)


def time_batches(
    make_iter: Callable[[], Iterable[torch.Tensor]], n_batches: int, warmup: int
) -> tuple[float, int]:
    """Pull ``warmup`` untimed then ``n_batches`` timed batches, starting new epochs as needed.

    Returns ``(seconds, cells)`` for the timed part. ``make_iter`` must yield torch tensors whose
    first dimension is the number of cells in the batch.
    """
    it: Iterator[torch.Tensor] = iter(make_iter())

    def next_batch() -> torch.Tensor:
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(make_iter())
            return next(it)

    for _ in range(warmup):
        next_batch()
    cells = 0
    t0 = time.perf_counter()
    for _ in range(n_batches):
        cells += next_batch().shape[0]
    return time.perf_counter() - t0, cells


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MiB.

    Not ``ru_maxrss``: on Linux it survives exec, so a child would report the peak of the
    process that started it.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def emit(seconds: float, cells: int, *, randomness: str, output: str, version: str) -> None:
    """Print the result object as the last stdout line."""
    result = {
        "cells_per_s": cells / seconds if seconds > 0 else 0.0,
        "n_cells_timed": cells,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "randomness": randomness,
        "output": output,
        "version": version,
    }
    print(json.dumps(result), flush=True)
