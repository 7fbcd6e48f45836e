"""IterableCellDataset and CellLoader: whole batches, sharded by rank and worker, resumable.

Each worker of each rank reads whole fetches (see :mod:`cellsift.data.sampling`): fetch ``i``
of a rank goes to worker ``i % num_workers``. The DataLoader hands batches out round-robin
over workers, so the batch order of a rank is fixed by (seed, epoch, rank, world,
num_workers) and a run can resume from any batch: :class:`CellLoader` counts the batches it
handed out; its ``state_dict`` goes into Lightning checkpoints, and after
``load_state_dict`` each worker skips exactly the batches already consumed, without reading
them. A state saved by another number of ranks or workers (or with ``drop_last`` otherwise,
which training sets on several ranks) says which cells every rank read: the rest of that
epoch is planned anew for this loader (:class:`~cellsift.data.sampling.Segment`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import multiprocessing
import multiprocessing.util
import os
import signal
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.context import BaseContext
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from .._utils import is_whole
from ..errors import ConfigError, ResumeError
from .collection import CellCollection
from .sampling import (
    EpochPlan,
    Mode,
    SamplingConfig,
    Segment,
    _worker_skips,
    balanced_weights,
    make_plan,
)

__all__ = ["CellLoader", "IterableCellDataset", "to_torch_csr"]

Batch = dict[str, Any]

#: Parts of one epoch read before the rest of it was planned anew that a loader keeps (an
#: epoch resumed on another number of processes or workers, again and again).
MAX_PARTS = 16


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class IterableCellDataset(IterableDataset):
    """Batches of cells from a :class:`CellCollection`, as dicts of tensors.

    Each batch holds ``x_ng`` (counts, torch sparse CSR, genes in vocabulary order),
    ``obs_idx_n`` (global row of each cell across the collection's stores), and one
    integer-code tensor per entry of ``obs_keys`` (e.g. ``y_n``, ``study_n``).

    Parameters
    ----------
    collection
        The cells.
    mode
        ``"sequential"``, ``"block"`` (block-shuffled) or ``"weighted"`` (balanced draws).
    batch_size, block_size, fetch_factor
        Cells per batch; contiguous cells per block; batches per read.
    obs_keys
        Batch key -> obs column, coded as integers (categories sorted); with
        ``{"y_n": label_key, "study_n": study_key}`` for the keys that are given (obs_keys
        naming other columns for those two is an error).
    label_key, study_key
        obs columns of cell type and study (weighted mode balances both).
    weights
        Per-cell weights for weighted mode (default: :func:`balanced_weights` of the labels
        and studies).
    class_scale, study_scale, max_ratio
        :func:`balanced_weights`' scales and cap. A label with far fewer cells than
        ``class_scale`` is drawn ~1/count (full balancing), one with far more ~1/log(count).
        SCimilarity's defaults (1e4, 1e6) were set for millions of cells, where most labels
        are far above them; on a small atlas they balance fully, but for the cap: no cell is
        drawn more than ``max_ratio`` (100) times as often as the median cell, so a label of a
        handful of cells among thousands stays below an equal share. Lower the scales for
        gentler balancing, raise ``max_ratio`` to let rare labels reach an equal share; pass
        ``weights=`` for any other scheme.
    categories
        Batch key -> fixed category list (e.g. a model's labels); other values code as -1
        (weighted mode still balances and draws them by their own labels).
    seed, drop_last, cells_per_block, num_samples, min_batch
        See :class:`~cellsift.data.sampling.SamplingConfig`.
    rank, world_size
        Override the distributed rank (default: from ``torch.distributed``).
    prefetch
        Fetches read ahead by a background thread of each worker, overlapping reads with
        batch assembly (0: read in turn). Memory holds ``1 + prefetch`` fetches per worker.
    """

    def __init__(
        self,
        collection: CellCollection,
        *,
        mode: Mode = "block",
        batch_size: int = 1024,
        block_size: int = 64,
        fetch_factor: int = 16,
        label_key: str | None = None,
        study_key: str | None = None,
        obs_keys: Mapping[str, str] | None = None,
        weights: np.ndarray | None = None,
        class_scale: float = 1e4,
        study_scale: float = 1e6,
        max_ratio: float = 100.0,
        categories: Mapping[str, list[str]] | None = None,
        seed: int = 0,
        drop_last: bool = False,
        cells_per_block: int = 32,
        num_samples: int | None = None,
        min_batch: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 1,
    ) -> None:
        super().__init__()
        if not is_whole(prefetch, least=0):
            raise ConfigError(
                f"prefetch is a number of batches read ahead (0 or more), not {prefetch!r}."
            )
        if world_size is not None and not is_whole(world_size, least=1):
            raise ConfigError(
                f"world_size is a number of processes (1 or more), not {world_size!r}."
            )
        if rank is not None and not (
            is_whole(rank, least=0) and (world_size is None or rank < world_size)
        ):
            raise ConfigError(
                f"rank is this process's place among world_size={world_size} (0 to "
                f"world_size - 1), not {rank!r}."
            )
        self.prefetch = prefetch
        self.collection = collection
        self.cfg = SamplingConfig(
            mode,
            batch_size,
            block_size,
            fetch_factor,
            seed,
            drop_last,
            cells_per_block,
            num_samples,
            min_batch,
        )
        # the label and study columns as batch keys y_n / study_n, beside any obs_keys given
        # (which may name them too, the same columns)
        keys = dict(obs_keys or {})
        for key, column, option in (
            ("y_n", label_key, "label_key"),
            ("study_n", study_key, "study_key"),
        ):
            if not column:
                continue
            if keys.get(key, column) != column:
                raise ConfigError(
                    f"{option}={column!r}, but obs_keys gives {key!r} (the batch key of "
                    f"{option}) the column {keys[key]!r}: name one column for it."
                )
            keys[key] = column
        self.obs_keys = keys
        self.codes: dict[str, np.ndarray] = {}
        self.categories: dict[str, list[str]] = {}
        for key, column in self.obs_keys.items():
            fixed = (categories or {}).get(key)
            self.codes[key], self.categories[key] = collection.codes(column, fixed)
        self.weights = None
        if weights is not None and mode != "weighted":  # (else read nowhere)
            raise ConfigError(
                f"weights are the cells' draw weights of mode='weighted', and mode is "
                f"{mode!r}: pass mode='weighted', or leave weights out."
            )
        if mode == "weighted":
            balanced = weights is None
            if balanced:
                if "y_n" not in self.codes:
                    raise ConfigError("weighted mode needs label_key (and study_key) or weights=.")
                # balanced over the data's own labels and studies: cells of a label outside
                # the fixed categories (a model's) train unlabelled, and are drawn as any
                # other; those of studies outside them, as their own studies (not as one)
                own = {
                    key: collection.codes(self.obs_keys[key])[0]
                    if (categories or {}).get(key) is not None
                    else self.codes[key]
                    for key in ("y_n", "study_n")
                    if key in self.codes
                }
                weights = balanced_weights(
                    own["y_n"],
                    own.get("study_n"),
                    class_scale=class_scale,
                    study_scale=study_scale,
                    max_ratio=max_ratio,
                )
            label_key = self.obs_keys.get("y_n") if balanced else None
            self.weights = _checked_weights(weights, collection.n_obs, label_key)
        self._rank, self._world = rank, world_size
        self.num_workers = 0  # set by CellLoader: fixes the batch order for resume
        # (epoch, batches of it already consumed by this rank, the number of parts of an
        # epoch read before it was planned anew, that epoch) and those parts (Segment's
        # fields), in shared memory so that persistent worker processes see what the main
        # process sets before each epoch.
        self._position = torch.zeros(4, dtype=torch.int64).share_memory_()
        self._parts = torch.zeros((MAX_PARTS, 4), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._position[0] = value

    @property
    def skip(self) -> int:
        return int(self._position[1])

    @skip.setter
    def skip(self, value: int) -> None:
        self._position[1] = value

    def earlier(self, epoch: int) -> tuple[Segment, ...]:
        """The parts of ``epoch`` read before the rest of it was planned anew (none, but
        in an epoch resumed on another number of processes or workers)."""
        n, of = int(self._position[2]), int(self._position[3])
        if n == 0 or of != epoch:
            return ()
        return tuple(
            Segment(int(w), int(k), int(b), bool(d)) for w, k, b, d in self._parts[:n].tolist()
        )

    def set_earlier(self, epoch: int, parts: tuple[Segment, ...]) -> None:
        if len(parts) > MAX_PARTS:
            raise ResumeError(
                f"the saved position is of an epoch read in {len(parts) + 1} parts, each on "
                f"another number of processes or workers; at most {MAX_PARTS + 1} are kept. "
                "Resume on as many processes and workers as the last part was read with."
            )
        for i, p in enumerate(parts):
            self._parts[i] = torch.tensor([p.world, p.workers, p.batches, int(p.drop_last)])
        self._position[2], self._position[3] = len(parts), epoch

    # -- plan ----------------------------------------------------------------------------
    @property
    def rank_world(self) -> tuple[int, int]:
        """(rank, world size): as given; what is not given, from ``torch.distributed`` (0
        and 1 without a process group). A world size given alone takes the group's rank
        where the group has that many processes; one shard (1) is rank 0 on every process,
        and without a group the first shard is read; a world size other than the group's
        needs the rank given too."""
        group_rank, group_world = _dist_rank_world()
        world = self._world if self._world is not None else group_world
        rank = self._rank
        if rank is None:
            if world == group_world:
                rank = group_rank
            elif world == 1 or group_world == 1:
                rank = 0
            else:
                raise ConfigError(
                    f"world_size={world}, but torch.distributed runs {group_world} processes: "
                    "pass this process's rank too (or neither, to shard by the group)."
                )
        if rank >= world:
            given = "given" if self._world is not None else "from torch.distributed"
            raise ConfigError(
                f"rank {rank} is not below the world size {world} ({given}): pass "
                "world_size too, or neither, to take both from torch.distributed."
            )
        return rank, world

    def __getstate__(self) -> dict[str, Any]:
        """As pickled for a DataLoader's spawned workers, which have no process group:
        with the rank and world size of this process's group fixed in."""
        state = self.__dict__.copy()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            state["_rank"], state["_world"] = self.rank_world
        return state

    def resolve_rank(self) -> None:
        """Fix rank and world size from ``torch.distributed`` of this (main) process.

        DataLoader workers have no process group: they must be given the rank before they start.
        """
        self._rank, self._world = self.rank_world

    def plan(
        self, epoch: int | None = None, earlier: tuple[Segment, ...] | None = None
    ) -> EpochPlan:
        """This rank's plan of ``epoch`` (default: the dataset's): of what is left of it
        after its ``earlier`` parts (default: those it holds, :meth:`earlier`; ``()``: the
        epoch read whole)."""
        rank, world = self.rank_world
        epoch = self.epoch if epoch is None else epoch
        return make_plan(
            self.cfg,
            self.collection.n_obs,
            epoch,
            rank,
            world,
            self.weights,
            self.earlier(epoch) if earlier is None else earlier,
        )

    def __repr__(self) -> str:
        cfg = self.cfg
        try:
            rank, world = self.rank_world
            shard = f", rank {rank} of {world}" if world > 1 else ""
        except ConfigError:  # (a shard that cannot be read: shown as given)
            shard = f", rank {self._rank} of {self._world or '?'}"
        keys = f", keys {sorted(self.obs_keys)}" if self.obs_keys else ""
        return (
            f"IterableCellDataset({self.collection.n_obs:,} cells, {cfg.mode} mode, "
            f"batches of {cfg.batch_size}, epoch {self.epoch}{shard}{keys})"
        )

    def __len__(self) -> int:
        """Batches this rank yields per epoch (read whole: the rest of an epoch planned anew,
        resumed on another number of processes or workers, has fewer)."""
        return self.plan(earlier=()).total_batches

    def fingerprint(self) -> dict[str, Any]:
        _, world = self.rank_world
        return {
            **dataclasses.asdict(self.cfg),
            "n_cells": self.collection.n_obs,
            # which cells (a filter or a store that keeps their number, but not them), in
            # which stores
            "cells": self._cells_digest,
            # and their counts (a store rewritten with other values for the same cells)
            "counts": self._counts_digest,
            "world_size": world,
            "num_workers": self.num_workers,
            "weights": _digest(self.weights),
        }

    @functools.cached_property
    def _cells_digest(self) -> str | None:
        ids = np.asarray(self.collection.cell_ids, dtype=np.int64)
        return _digest(np.concatenate([ids, np.asarray(self.collection.offsets, np.int64)]))

    #: Cells whose counts :meth:`fingerprint` keeps a digest of, spread over the cells.
    COUNTS_SAMPLE = 16

    @functools.cached_property
    def _counts_digest(self) -> str | None:
        """A digest of the counts of :attr:`COUNTS_SAMPLE` cells spread over the cells, as
        read (genes aligned, explicit zeros dropped: a store converted to another format,
        or moved, keeps it; one rewritten with other counts does not)."""
        ids = np.asarray(self.collection.cell_ids, dtype=np.int64)
        if len(ids) == 0:
            return None
        picks = np.linspace(0, len(ids) - 1, min(len(ids), self.COUNTS_SAMPLE)).astype(np.int64)
        x = sp.csr_matrix(self.collection.read(np.unique(ids[picks])), dtype=np.float32)
        x.eliminate_zeros()
        x.sort_indices()
        parts = (x.indptr.astype(np.int64), x.indices.astype(np.int64), x.data)
        return _digest(np.concatenate([np.asarray(p, np.float64) for p in parts]))

    # -- iteration -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan()
        skips, turn = _worker_skips(plan.stream_batches(n_workers), self.skip)
        # Fetch stream s is fetches s, s + W, ...; on resume the DataLoader starts again with
        # worker 0, so worker 0 takes the stream whose turn it is, and so on around.
        stream = (wid + turn) % n_workers
        to_skip = skips[stream]
        todo: list[tuple[int, int]] = []  # (fetch, first batch to yield)
        for i in range(stream, plan.n_fetches, n_workers):
            nb = plan.n_batches(i)
            if to_skip >= nb:
                to_skip -= nb
                continue
            todo.append((i, to_skip))
            to_skip = 0
        if self.prefetch <= 0:
            for i, first in todo:
                yield from self._batches(plan, i, self._read_fetch(plan, i), first)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellsift-prefetch") as pool:
            ahead: deque[Future[Any]] = deque()
            for i, _ in todo[: self.prefetch + 1]:
                ahead.append(pool.submit(self._read_fetch, plan, i))
            for k, (i, first) in enumerate(todo):
                fetched = ahead.popleft().result()
                if k + self.prefetch + 1 < len(todo):
                    ahead.append(
                        pool.submit(self._read_fetch, plan, todo[k + self.prefetch + 1][0])
                    )
                yield from self._batches(plan, i, fetched, first)

    def _read_fetch(
        self, plan: EpochPlan, i: int
    ) -> tuple[Any, np.ndarray | None, np.ndarray, np.ndarray]:
        """Read fetch ``i``: counts of its distinct cells, and how its cells index them.

        The index is None when the cells are already sorted and distinct (sequential mode):
        batches are then plain row slices of what was read.
        """
        pos = plan.fetch(i)
        rows = self.collection.cell_ids[pos]
        if len(rows) < 2 or bool(np.all(rows[1:] > rows[:-1])):
            return self.collection.read(rows), None, rows, pos
        uniq, inverse = np.unique(rows, return_inverse=True)
        return self.collection.read(uniq), inverse, rows, pos

    def _batches(
        self,
        plan: EpochPlan,
        i: int,
        fetched: tuple[Any, np.ndarray | None, np.ndarray, np.ndarray],
        first: int,
    ) -> Iterator[Batch]:
        x, inverse, rows, pos = fetched
        bs = self.cfg.batch_size
        for b in range(first, plan.n_batches(i)):
            sel = slice(b * bs, (b + 1) * bs)
            xb = (
                x
                if plan.n_batches(i) == 1 and inverse is None
                else x[sel if inverse is None else inverse[sel]]
            )
            yield self._batch(xb, rows[sel], pos[sel])

    def _batch(self, x: Any, rows: np.ndarray, pos: np.ndarray) -> Batch:
        batch: Batch = {
            "x_ng": to_torch_csr(x),
            "obs_idx_n": torch.from_numpy(rows.astype(np.int64)),
        }
        for key, codes in self.codes.items():
            batch[key] = torch.from_numpy(codes[pos])
        return batch


def to_torch_csr(x: sp.csr_matrix) -> torch.Tensor:
    """A scipy CSR matrix as a torch sparse CSR tensor (float32 values, int32 indices: a batch
    of 2**31 values or more is an error), sharing memory where the dtypes allow."""
    if x.indptr[-1] > np.iinfo(np.int32).max:
        raise ConfigError(
            f"a batch of {x.shape[0]:,} cells holds {int(x.indptr[-1]):,} values, more than "
            "a batch's int32 positions reach (2**31 - 1): pass a smaller batch_size."
        )
    return torch.sparse_csr_tensor(
        torch.from_numpy(x.indptr.astype(np.int32)),
        torch.from_numpy(x.indices.astype(np.int32, copy=False)),
        torch.from_numpy(x.data.astype(np.float32, copy=False)),
        size=x.shape,
        check_invariants=False,
    )


def _digest(weights: np.ndarray | None) -> str | None:
    """A short digest of an array: weighted mode's per-cell weights (they decide every
    draw), the cells read."""
    if weights is None:
        return None
    little = np.ascontiguousarray(weights, dtype=weights.dtype.newbyteorder("<"))  # (any host)
    return hashlib.blake2b(little.tobytes(), digest_size=8).hexdigest()


def _checked_weights(weights: Any, n_cells: int, label_key: str | None) -> np.ndarray:
    """Weighted mode's weights, one per cell (finite, >= 0, some > 0), or an error naming
    what is wrong, as the dataset is made (not at the first batch, in a worker);
    ``label_key``: the labels balanced weights were made from."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_cells,):
        raise ConfigError(f"weights has shape {w.shape}; it needs one weight per cell ({n_cells}).")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ConfigError(
            "weights must be finite and >= 0; they hold NaN, infinite or negative ones."
        )
    if not (w > 0).any():
        why = (
            f": no cell has a label in {label_key!r} (balanced weights are over labelled cells)"
            if label_key
            else ""
        )
        raise ConfigError(f"weights are all 0, so weighted mode has no cell to draw{why}.")
    return w


def _needs_spawn(dataset: IterableCellDataset) -> bool:
    """TileDB's thread pools do not survive fork(): SOMA stores need spawned workers."""
    return any(store.format == "soma" for store in dataset.collection.stores)


#: Per start method, a flag this process sets as it exits (pid: whose flags they are). A
#: shared byte without a lock: a worker reads it in a signal handler, which a second signal
#: can interrupt (a lock held there would never be released).
_exiting: dict[str, Any] = {}
_exiting_pid: int | None = None


def _exit_flag(context: BaseContext) -> Any:
    """The flag that tells this process's workers it is exiting. It is set by a
    multiprocessing finaliser, which runs before multiprocessing ends the process's children
    with SIGTERM at exit (also in a multiprocessing child, which runs no ``atexit``)."""
    global _exiting_pid
    if _exiting_pid != os.getpid():  # (a forked child: the flags and finaliser are the parent's)
        _exiting.clear()
        _exiting_pid = os.getpid()
        multiprocessing.util.Finalize(None, _set_exiting, exitpriority=100)
    method = context.get_start_method()
    if method not in _exiting:
        _exiting[method] = context.RawValue("b", 0)
    return _exiting[method]


def _set_exiting() -> None:
    for flag in _exiting.values():
        flag.value = 1


def _worker_init(exiting: Any, stopping: Any, user_init: Any, worker_id: int) -> None:
    """A worker leaves SIGTERM and SIGINT to the main process. A scheduler signals every
    process of a job (Ctrl-C: of the terminal's process group): a worker that died of it
    would fail the main process's next step with "DataLoader worker killed by signal",
    before it could stop cleanly (a fit saves its state at the end of the step). The main
    process ends its workers when it stops: a SIGTERM once it is exiting (``exiting`` is
    set) or shutting this iterator's workers down (``stopping``: torch terminates workers
    that did not end when asked, as after an error in one) ends the worker, and a worker
    whose main process died exits."""
    signal.signal(signal.SIGTERM, functools.partial(_on_sigterm, exiting, stopping))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if user_init is not None:
        user_init(worker_id)


def _on_sigterm(exiting: Any, stopping: Any, signum: int, frame: Any) -> None:
    if exiting.value or stopping.value:  # the main process ends its workers: end cleanly,
        os._exit(0)  # as torch's own workers do (killed by a signal, torch's handler raises)


class _WorkersIter(_MultiProcessingDataLoaderIter):
    """torch's iterator over a loader's workers, which says when it shuts them down
    (``stopping``, read by the workers' SIGTERM handler, :func:`_worker_init`)."""

    def __init__(self, loader: DataLoader, stopping: Any) -> None:
        self._stopping = stopping
        super().__init__(loader)

    def _shutdown_workers(self) -> None:
        self._stopping.value = 1
        super()._shutdown_workers()


class _EpochSampler:
    """The loader's ``sampler``, through which a training loop says which of its epochs the
    next ``iter()`` is (Lightning calls ``set_epoch`` at each epoch's start, as for a
    ``DistributedSampler``); iterating it is iterating the sampler it stands for."""

    def __init__(self, loader: CellLoader, sampler: Any) -> None:
        # (a weak reference: a cycle would keep the loader, and its workers, alive until
        # the garbage collector runs, past the point where they should shut down)
        self.loader, self.sampler = weakref.ref(loader), sampler

    def __iter__(self) -> Iterator[Any]:
        return iter(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        loader = self.loader()
        if loader is not None:
            loader._number_epoch(epoch)


@dataclasses.dataclass
class _Pass:
    """One ``iter()`` of a :class:`CellLoader`: the epoch it runs, the batches it skips, the
    training loop's number of that epoch (None: not numbered), and whether a batch was asked
    of it yet (until then, it can still be told which epoch it is)."""

    epoch: int
    skip: int
    run: int | None = None
    started: bool = False


#: What a loader's fingerprint says of how it reads (processes, workers, drop_last, which
#: follows the number of processes in training), not what: a position saved with others is
#: resumed by planning the rest of its epoch anew.
_HOW = ("world_size", "num_workers", "drop_last")
#: The fingerprint's digests, as a difference in them is said.
_DIGESTS = {
    "cells": "the cells read",
    "counts": "the cells' counts (a store rewritten since?)",
    "weights": "the sampling weights (labels or studies)",
}


class CellLoader(DataLoader):
    """A DataLoader over an :class:`IterableCellDataset` that can save and restore its position.

    Each ``iter()`` runs one epoch (the dataset's ``epoch``, then the next). ``state_dict()``
    records the epoch and the batches handed out; ``load_state_dict()`` makes the next
    ``iter()`` continue with exactly the batches an uninterrupted run would have produced.
    Lightning stores this state in its checkpoints. A state saved by another number of
    ranks or workers resumes with the rest of its epoch planned anew (the cells no rank took
    yet; ``recounted`` says how many of this loader's batches of the epoch that makes done).
    A training loop that numbers its epochs
    (``sampler.set_epoch``, as Lightning does, before or just after the ``iter()``, as long
    as no batch was taken) says which epoch a restored run goes on with: the restored one
    (whatever is left of it, if anything: a checkpoint written before the loop ended that
    epoch) or a later one. Without numbers, an epoch restored with every batch handed out
    is over, and the next one begins.

    Workers are persistent (started once per run); they are spawned rather than forked when
    a store needs it (TileDB-SOMA, where an explicit ``fork`` is refused). They ignore
    SIGINT, and SIGTERM until the main process exits or shuts them down: both are the main
    process's to act on (a fit stops at the end of the step and saves its state).
    """

    def __init__(
        self,
        dataset: IterableCellDataset,
        *,
        num_workers: int = 0,
        prefetch_factor: int | None = 2,
        pin_memory: bool = False,
        multiprocessing_context: Any = None,
        **kwargs: Any,
    ) -> None:
        if multiprocessing_context is None and num_workers and _needs_spawn(dataset):
            multiprocessing_context = "spawn"
        # each iter() draws the workers' base seed: from a generator of the loader's own, not
        # torch's global one, which training draws from (and checkpoints, for resumed runs to
        # draw the same). The batches depend on the dataset's seed and epoch alone.
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        if num_workers:
            context = multiprocessing_context
            if not isinstance(context, BaseContext):
                context = multiprocessing.get_context(context)
            if context.get_start_method() == "fork" and _needs_spawn(dataset):
                raise ConfigError(
                    "TileDB-SOMA stores cannot be read by forked loader workers (TileDB's "
                    "threads do not survive fork(): the workers would hang). Leave "
                    "multiprocessing_context unset (the workers are then spawned), or pass "
                    "'spawn' or 'forkserver'."
                )
            multiprocessing_context = context
            self._exiting = _exit_flag(context)
        self._user_init = kwargs.pop("worker_init_fn", None)
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor if num_workers else None,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            multiprocessing_context=multiprocessing_context,
            **kwargs,
        )
        self.cell_dataset = dataset
        dataset.num_workers = max(num_workers, 1)
        self._epoch = dataset.epoch  # epoch of the next iter()
        self._current = dataset.epoch  # epoch of the state: in progress or last started
        self._consumed = 0
        self._skip = 0
        self._pass: _Pass | None = None  # the last iter()
        #: the training loop's number of the next iter()'s epoch (None: not numbered yet),
        #: and (epoch, batches, its number) of a restored state, until the loop numbers one
        self._run_next: int | None = None
        self._restored: tuple[int, int, int] | None = None
        self._keep_skip = False  # the next iter() runs out a restored epoch, even if all done
        #: where a state saved with another number of processes or workers was restored:
        #: the batches of its epoch done, as this loader counts them (its epoch's batches
        #: less those left), for a training loop to count on from
        self.recounted: int | None = None

    # DataLoader sets ``sampler`` as it is made: the sampler a training loop numbers epochs on
    @property  # type: ignore[override]
    def sampler(self) -> _EpochSampler:
        return self._epoch_sampler

    @sampler.setter
    def sampler(self, value: Any) -> None:
        self._epoch_sampler = _EpochSampler(self, value)

    def _number_epoch(self, run: int) -> None:
        """The training loop's number of the epoch about to run: that of the last ``iter()``
        where no batch was taken of it yet and it has none (the loop numbers its first epoch
        after that ``iter()``), else that of the next. After a restore it says which epoch
        that is: the restored one (what is left of it), or one that many after it."""
        last = self._pass
        pending = last is not None and not last.started and last.run is None
        if self._restored is not None:
            epoch, batches, restored_run = self._restored
            self._restored = None
            ahead = run - restored_run
            target = (epoch + ahead, batches if ahead == 0 else 0) if ahead >= 0 else None
            if target is not None and pending:
                assert last is not None
                last.epoch, last.skip = target
                self._current, self._consumed = target
                self._epoch, self._skip = target[0] + 1, 0
            elif target is not None:
                self._epoch, self._skip = target
                self._run_next = run
                self._keep_skip = True
                return
        if pending:
            assert last is not None
            last.run = run
        else:
            self._run_next = run

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        ds = self.cell_dataset
        ds.resolve_rank()
        if self._skip and self._skip >= ds.plan(self._epoch).total_batches and not self._keep_skip:
            # restored after the epoch's last batch: over, unless the training loop says
            # otherwise (:meth:`_number_epoch`), and the next one begins
            self._epoch, self._skip = self._epoch + 1, 0
        self._keep_skip = False
        run = self._pass = _Pass(self._epoch, self._skip, self._run_next)
        self._current, self._consumed = run.epoch, run.skip
        self._epoch, self._skip, self._run_next = run.epoch + 1, 0, None
        return self._batches(run)

    def _batches(self, run: _Pass) -> Iterator[Batch]:
        """The pass's batches, counted; its epoch is settled at the first batch asked for."""
        run.started = True
        ds = self.cell_dataset
        ds.epoch, ds.skip = run.epoch, run.skip
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def _get_iterator(self) -> Any:
        """torch's iterator; over workers, one whose workers are told when it shuts them
        down (a flag of their own: a later iterator's workers are not)."""
        if self.num_workers == 0:
            return super()._get_iterator()
        stopping = self.multiprocessing_context.RawValue("b", 0)
        self.worker_init_fn = functools.partial(
            _worker_init, self._exiting, stopping, self._user_init
        )
        return _WorkersIter(self, stopping)

    def __len__(self) -> int:
        return len(self.cell_dataset)

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` will run (or the one being run, during iteration)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch = self._current = epoch
        self._consumed = self._skip = 0
        self._pass, self._run_next, self._restored, self._keep_skip = None, None, None, False
        self.cell_dataset.set_earlier(epoch, ())
        self.recounted = None

    def state_dict(self) -> dict[str, Any]:
        """Epoch in progress and batches consumed (and the training loop's number of that
        epoch, where it numbers them), plus what must match on resume."""
        return {
            "epoch": self._current,
            "batches": self._consumed,
            "run_epoch": (
                self._pass.run
                if self._pass is not None
                else self._restored[2]
                if self._restored is not None
                else None
            ),
            "fingerprint": self.cell_dataset.fingerprint(),
            # (the parts of the epoch read on other numbers of processes or workers)
            "earlier": [
                [p.world, p.workers, p.batches, p.drop_last]
                for p in self.cell_dataset.earlier(self._current)
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        lacking = [k for k in ("epoch", "batches", "fingerprint") if k not in state]
        if lacking:
            raise ResumeError(
                f"this is not a loader state: it lacks {', '.join(lacking)}. Pass what "
                "CellLoader.state_dict() returned (a checkpoint keeps it)."
            )
        ds = self.cell_dataset
        saved, mine = state["fingerprint"], ds.fingerprint()
        diff = {k: (v, mine.get(k)) for k, v in saved.items() if k not in _HOW and mine.get(k) != v}
        if "cells" in diff or "n_cells" in diff:  # (other cells: other counts, no rewrite)
            diff.pop("counts", None)
        if diff:
            detail = ", ".join(
                f"{_DIGESTS[k]} differ" if k in _DIGESTS else f"{k}: saved {a}, now {b}"
                for k, (a, b) in diff.items()
            )
            raise ResumeError(
                f"the saved loader state does not fit this loader ({detail}). Resume with the "
                "same data and sampling options, and the same validation groups (val_groups=: "
                "the run's log names them)."
            )
        epoch, batches = int(state["epoch"]), int(state["batches"])
        earlier = tuple(
            Segment(int(w), int(k), int(b), bool(d)) for w, k, b, d in state.get("earlier", [])
        )
        self.recounted = None
        if any(saved.get(k, mine[k]) != mine[k] for k in _HOW):
            # read by another number of processes or workers: the rest of the epoch (the
            # cells no rank took yet) is planned anew, for this loader
            how = Segment(
                int(saved["world_size"]),
                int(saved["num_workers"]),
                batches,
                bool(saved["drop_last"]),
            )
            counted = len(ds)  # (this loader's count of the epoch's batches)
            if batches >= self._part_batches(epoch, earlier, how) > 0:  # epoch read whole
                earlier, batches = (), counted
            elif batches:  # a part read: one of the earlier (none read: no part of its own)
                earlier, batches = (*earlier, how), 0
            left = ds.plan(epoch, earlier).total_batches - batches
            self.recounted = counted - left
        ds.set_earlier(epoch, earlier)
        self._epoch = self._current = epoch
        self._skip = self._consumed = batches
        run = state.get("run_epoch")  # (None: not numbered, or an older checkpoint)
        self._pass, self._run_next, self._keep_skip = None, None, False
        self._restored = None if run is None else (self._current, self._consumed, int(run))

    def _part_batches(self, epoch: int, earlier: tuple[Segment, ...], part: Segment) -> int:
        """The batches of each rank in ``part`` of ``epoch`` (after its ``earlier`` parts),
        as it was read; more saved as taken is an error."""
        ds = self.cell_dataset
        cfg = dataclasses.replace(ds.cfg, drop_last=part.drop_last)
        plan = make_plan(cfg, ds.collection.n_obs, epoch, 0, part.world, ds.weights, earlier)
        if part.batches > plan.total_batches:
            raise ResumeError(
                f"the saved position ({part.batches} batches of epoch {epoch}) is past the "
                f"{plan.total_batches} batches each of its {part.world} ranks had: the state "
                "is not of this data and these sampling options."
            )
        return plan.total_batches
