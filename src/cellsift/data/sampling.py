"""Which cells each rank reads in an epoch, in which order, grouped into fetches.

A *fetch* is the unit of reading: ``fetch_factor`` batches' worth of cells read with one
sorted store read, shuffled together (except in sequential mode) and cut into batches.
Every fetch is a pure function of ``(seed, epoch, rank, fetch index)``, so a worker can
skip to any batch without reading anything, and runs are reproducible.

Modes
-----
``sequential``
    Cells in store order. Each rank takes a contiguous share; batches come out in order
    (one batch per fetch).
``block``
    The cells are cut into contiguous blocks of ``block_size``; the blocks are permuted per
    epoch, each rank takes a contiguous share of the permuted order, and the cells of a fetch
    (several blocks) are shuffled together. Every cell is seen exactly once per epoch.
``weighted``
    Draws with replacement, P(cell) proportional to its weight (``balanced_weights``). A block
    is drawn with probability proportional to its total weight, then ``cells_per_block`` cells
    from it in proportion to their weights: each draw has exactly the target marginal
    probability while reads stay contiguous (``block_size=1`` gives independent draws).
    With the defaults (blocks of 64, 32 cells per block) a batch's worth of 1024 cells is
    drawn from 32 blocks, twice as many as block mode's 16; a fetch then shuffles
    ``fetch_factor`` such draws together, so that a batch of the default fetch of 16 mixes
    about 300 blocks (block mode: 250). Fewer cells per block means more diverse batches and
    more reading (each drawn block is read, and decoded in compressed stores).
    No work per batch grows with the number of cells.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from .._utils import is_whole
from ..errors import ConfigError, ResumeError

__all__ = ["EpochPlan", "SamplingConfig", "Segment", "balanced_weights", "make_plan"]

Mode = Literal["sequential", "block", "weighted"]


def balanced_weights(
    labels: np.ndarray,
    studies: np.ndarray | None = None,
    *,
    class_scale: float = 1e4,
    study_scale: float = 1e6,
    max_ratio: float = 100.0,
) -> np.ndarray:
    """Class- and study-balanced sampling weights (SCimilarity's scheme).

    ``w = 1/log1p(n_class/class_scale) * 1/log1p(n_study/study_scale)``, where ``n_class``
    and ``n_study`` count the labelled cells sharing a cell's label and study; weights are
    clipped to ``max_ratio`` times their median so tiny groups do not dominate. Negative
    labels (missing) get weight 0, and count in no study (as SCimilarity, which leaves
    them out first): a study of few labelled cells among many without is not sampled as a
    large one. Negative studies (missing) count as one study of their own: their cells are
    balanced against the studies as a whole, not each as a study of one cell (which would
    give each the largest weight).
    """
    for name, value, ok, bound in (
        ("class_scale", class_scale, class_scale > 0, "> 0"),
        ("study_scale", study_scale, study_scale > 0, "> 0"),
        ("max_ratio", max_ratio, max_ratio >= 1, ">= 1"),
    ):
        if not (ok and np.isfinite(value)):
            raise ConfigError(f"{name} must be a finite number {bound}, not {value}.")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(
            f"labels must be one integer code per cell (negative: missing), not an array of "
            f"{labels.dtype} of shape {labels.shape}; code text labels first (CellCollection.codes)."
        )
    w = _inverse_log_count(labels, class_scale)
    if studies is not None:
        studies = np.asarray(studies)
        if studies.ndim != 1 or not np.issubdtype(studies.dtype, np.integer):
            raise ConfigError(
                f"studies must be one integer code per cell (negative: missing), not an array "
                f"of {studies.dtype} of shape {studies.shape}; code text studies first "
                "(CellCollection.codes)."
            )
        if studies.shape != labels.shape:
            raise ConfigError(
                f"studies must give one study per cell: {len(studies)} for {len(labels)} labels."
            )
        labelled = labels >= 0
        s = studies[labelled]
        # (every negative code one missing study, whichever it is)
        w[labelled] *= _inverse_log_count(np.where(s < 0, -1, s), study_scale)
    w[labels < 0] = 0.0
    pos = w[w > 0]
    if len(pos):
        np.minimum(w, max_ratio * np.median(pos), out=w)
    return w


def _inverse_log_count(codes: np.ndarray, scale: float) -> np.ndarray:
    _, inv, counts = np.unique(codes, return_inverse=True, return_counts=True)
    return (1.0 / np.log1p(counts / scale))[inv].astype(np.float64)


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample; fixed for a run (part of the resume fingerprint).

    ``drop_last``: every rank's batches are full (the remainder of the epoch is left out).
    Training on several ranks needs it (the data module sets it there): without it, ranks
    can get different numbers of batches, which suits reading every cell (embedding) only;
    ``min_batch``: a rank's last batch with fewer cells than this is left out (training
    takes 2: BatchNorm cannot normalise one cell), the other batches are unchanged;
    ``num_samples``: the cells drawn an epoch in weighted mode (None: as many as there are
    cells), shared among the ranks (with ``drop_last``, the whole batches of them each rank
    can have as many of).
    """

    mode: Mode = "block"
    batch_size: int = 1024
    block_size: int = 64
    fetch_factor: int = 16
    seed: int = 0
    drop_last: bool = False
    cells_per_block: int = 32
    num_samples: int | None = None
    min_batch: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("sequential", "block", "weighted"):
            raise ConfigError(f"mode must be sequential, block or weighted, not {self.mode!r}.")
        for name in ("batch_size", "block_size", "fetch_factor", "cells_per_block", "min_batch"):
            if not is_whole(getattr(self, name), 1):
                raise ConfigError(
                    f"{name} must be a whole number >= 1, not {getattr(self, name)!r}."
                )
        if self.num_samples is not None and not is_whole(self.num_samples, 1):
            raise ConfigError(
                f"num_samples (cells drawn per epoch in weighted mode) must be a whole number "
                f">= 1, or None for as many as there are cells; not {self.num_samples!r}."
            )
        if self.num_samples is not None and self.mode != "weighted":
            raise ConfigError(
                f"num_samples is the number of cells drawn per epoch in weighted mode; "
                f"{self.mode} mode reads every cell once an epoch: leave num_samples out, or "
                "sample with mode='weighted'."
            )
        if not is_whole(self.seed, 0):
            raise ConfigError(f"seed must be a non-negative integer, not {self.seed!r}.")

    @property
    def fetch_size(self) -> int:
        # Sequential reads are contiguous anyway; one batch per fetch keeps the batches in
        # order whatever the number of workers (the DataLoader takes them round-robin).
        return self.batch_size * (1 if self.mode == "sequential" else self.fetch_factor)


@dataclass(frozen=True)
class Segment:
    """A part of an epoch read before the rest of it was planned anew: by ``world`` ranks of
    ``workers`` workers each (``drop_last`` as they read), each rank having taken
    ``batches`` batches (a run resumed on another number of processes or workers)."""

    world: int
    workers: int
    batches: int
    drop_last: bool


class EpochPlan:
    """The fetches of one rank in one epoch.

    ``fetch(i)`` gives the cell positions of fetch ``i`` (indices into the collection's kept
    cells) in the order they are yielded; ``n_batches(i)`` how many batches it makes.

    ``earlier``: the parts of this epoch already read otherwise (:class:`Segment`, in
    order). The plan is then of the rest: the cells no earlier part took (in weighted mode,
    the draws left), shared among this plan's ranks as an epoch's cells are; its fetches
    are shuffled (drawn) anew. Every cell is still seen once per epoch, but for those that
    ``drop_last`` leaves out of the last part.
    """

    def __init__(
        self,
        cfg: SamplingConfig,
        n_cells: int,
        epoch: int,
        rank: int,
        world: int,
        weights: np.ndarray | None = None,
        earlier: Sequence[Segment] = (),
    ) -> None:
        self.cfg, self.epoch, self.rank, self.world = cfg, epoch, rank, world
        self.n_cells = n_cells
        self.part = 0  # which part of the epoch this plan is (its fetches' random keys)
        source: int | np.ndarray  # the epoch's draws (weighted), else its cells in order
        if cfg.mode == "weighted":
            if weights is None:
                raise ValueError("weighted mode needs per-cell weights.")
            self._init_weighted(weights)
            source = cfg.num_samples or n_cells
        else:
            source = self._epoch_order()
        for segment in earlier:
            source = self._left_after(segment, source)
            self.part += 1
        self._share(source)

    def _share(self, source: int | np.ndarray) -> None:
        """This rank's share of ``source`` (a number of draws, or cells in order)."""
        cfg, world, rank = self.cfg, self.world, self.rank
        if cfg.min_batch > 1 and world > 1 and not cfg.drop_last:
            raise ConfigError(
                "min_batch > 1 on several ranks needs drop_last=True: left out per rank, a "
                "short last batch would give the ranks different numbers of batches."
            )
        # (the ranks' shares of the cells in order, or of the draws, add up to the whole;
        # drop_last: to as many whole batches on every rank as it holds)
        n = len(source) if isinstance(source, np.ndarray) else int(source)
        if cfg.drop_last:
            n = (n // (world * cfg.batch_size)) * world * cfg.batch_size
        lo, hi = rank * n // world, (rank + 1) * n // world
        if isinstance(source, np.ndarray):
            self._order = source[lo:hi]
        self.n_rank = hi - lo
        if 0 < self.n_rank % cfg.batch_size < cfg.min_batch:  # too small a last batch
            self.n_rank -= self.n_rank % cfg.batch_size
        self.n_fetches = -(-self.n_rank // cfg.fetch_size)

    def _left_after(self, segment: Segment, source: int | np.ndarray) -> int | np.ndarray:
        """What is left of ``source`` (draws, or cells in order) once ``segment`` read it."""
        if segment.world > 1 and not segment.drop_last:
            raise ResumeError(
                f"the saved position is of {segment.world} ranks reading without drop_last, "
                "whose numbers of batches differ: which cells the other ranks read is not "
                "known. Resume on as many ranks and workers as it was saved with."
            )
        taken = []
        for rank in range(segment.world):
            part = copy.copy(self)  # (the same epoch, weights and part of it)
            part.cfg = replace(self.cfg, drop_last=segment.drop_last)
            part.rank, part.world = rank, segment.world
            part._share(source)
            taken.append(part._taken(segment.workers, segment.batches))
        if not isinstance(source, np.ndarray):
            return int(source) - sum(int(t) for t in taken)
        read = np.zeros(self.n_cells, dtype=bool)
        for cells in taken:
            read[cells] = True
        return source[~read[source]]

    def _taken(self, workers: int, batches: int) -> np.ndarray | int:
        """The cells of the first ``batches`` batches this rank hands out over ``workers``
        workers (in weighted mode, their number)."""
        skips, _ = _worker_skips(self.stream_batches(workers), batches)
        bs, out, n = self.cfg.batch_size, [], 0
        for w in range(workers):
            left = skips[w]
            for i in range(w, self.n_fetches, workers):
                if left == 0:
                    break
                took = min(left, self.n_batches(i))
                left -= took
                if self.cfg.mode == "weighted":
                    n += min(took * bs, self.fetch_len(i))
                else:
                    out.append(self.fetch(i)[: took * bs])
        if self.cfg.mode == "weighted":
            return n
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    # -- epoch order (sequential, block) --------------------------------------------------
    def _rng(self, *key: int) -> np.random.Generator:
        # (a later part of the epoch draws its own: the part keyed last, from 1 on)
        part = (self.part,) if self.part else ()
        return np.random.default_rng([self.cfg.seed, self.epoch, *key, *part])

    def _epoch_order(self) -> np.ndarray:
        n, b = self.n_cells, self.cfg.block_size
        if self.cfg.mode == "sequential":
            return np.arange(n, dtype=np.int64)
        n_blocks = -(-n // b)
        perm = self._rng(1 << 30).permutation(n_blocks)
        starts = perm * b
        lens = np.minimum(starts + b, n) - starts
        return np.repeat(starts - np.concatenate(([0], np.cumsum(lens)[:-1])), lens) + np.arange(
            n, dtype=np.int64
        )

    # -- weighted -------------------------------------------------------------------------
    def _init_weighted(self, weights: np.ndarray) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) != self.n_cells or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError("weights must be finite, >= 0, one per cell, and not all 0.")
        b = self.cfg.block_size
        n_blocks = -(-self.n_cells // b)
        padded = np.zeros(n_blocks * b)
        padded[: self.n_cells] = w
        self._w_blocks = padded.reshape(n_blocks, b)
        self._block_cdf = np.cumsum(self._w_blocks.sum(1))

    def _weighted_fetch(self, i: int, size: int) -> np.ndarray:
        rng = self._rng(self.rank, i)
        k = min(self.cfg.cells_per_block, self.cfg.block_size, size)  # (no more than a block)
        n_draws = -(-size // k)
        blocks = np.searchsorted(
            self._block_cdf, rng.random(n_draws) * self._block_cdf[-1], side="right"
        )
        blocks = np.minimum(blocks, len(self._block_cdf) - 1)
        cdf = np.cumsum(self._w_blocks[blocks], axis=1)  # n_draws x block_size
        u = rng.random((n_draws, k)) * cdf[:, -1:]
        within = (u[:, :, None] >= cdf[:, None, :]).sum(2)  # per draw: cell within its block
        within = np.minimum(within, self.cfg.block_size - 1)
        pos = (blocks[:, None] * self.cfg.block_size + within).ravel()[:size]
        return pos[rng.permutation(size)]

    # -- fetches --------------------------------------------------------------------------
    def fetch_len(self, i: int) -> int:
        return min(self.cfg.fetch_size, self.n_rank - i * self.cfg.fetch_size)

    def n_batches(self, i: int) -> int:
        return -(-self.fetch_len(i) // self.cfg.batch_size)

    def fetch(self, i: int) -> np.ndarray:
        size = self.fetch_len(i)
        if self.cfg.mode == "weighted":
            return self._weighted_fetch(i, size)
        lo = i * self.cfg.fetch_size
        cells = self._order[lo : lo + size]
        if self.cfg.mode == "block":
            cells = cells[self._rng(self.rank, i).permutation(len(cells))]
        return cells

    def stream_batches(self, workers: int) -> list[int]:
        """The batches of each of ``workers`` workers (worker ``w`` reads fetches ``w``,
        ``w + workers``, ...)."""
        return [
            sum(self.n_batches(i) for i in range(w, self.n_fetches, workers))
            for w in range(workers)
        ]

    @property
    def total_batches(self) -> int:
        return sum(self.n_batches(i) for i in range(self.n_fetches))


def make_plan(
    cfg: SamplingConfig,
    n_cells: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    weights: np.ndarray | None = None,
    earlier: Sequence[Segment] = (),
) -> EpochPlan:
    """The plan of ``rank`` (of ``world``) for ``epoch`` (of the rest of it, after the
    ``earlier`` parts: :class:`EpochPlan`)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world}).")
    return EpochPlan(cfg, n_cells, epoch, rank, world, weights, earlier)


def _worker_skips(counts: list[int], n: int) -> tuple[list[int], int]:
    """Batches each worker stream has delivered once ``n`` batches came out, and whose turn is next.

    The DataLoader takes one batch from each worker in turn, passing over workers that are
    done; ``counts`` is how many batches each worker makes.
    """
    if n > sum(counts):
        raise ResumeError(f"cannot skip {n} batches: the epoch has only {sum(counts)}.")
    n_workers = len(counts)
    active = [c for c in counts if c > 0]  # (a worker with no batches takes no turn)
    rounds = min(min(active, default=0), n // max(len(active), 1))  # whole rounds, then step
    skips = [min(rounds, c) for c in counts]
    remaining, w = n - sum(skips), 0
    while remaining > 0:
        if skips[w] < counts[w]:
            skips[w] += 1
            remaining -= 1
        w = (w + 1) % n_workers
    for _ in range(n_workers):  # the next worker with batches left
        if skips[w] < counts[w]:
            break
        w = (w + 1) % n_workers
    return skips, w
