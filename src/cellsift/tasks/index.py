"""CellIndex: cell embeddings + their metadata, searched exactly or approximately.

Embeddings are stored L2-normalised (float32); distances are cosine distances ``1 - cos``.
Metadata lives in Parquet and is filtered lazily with pyarrow (only the columns a filter
names are read; it is never loaded whole into pandas). A loaded index holds its files open
(embeddings memory-mapped, metadata by a descriptor), so it reads the version it loaded,
consistent with itself, whatever is saved over its folder later. Search is one interface
over two engines:

``exact``  blocked matrix products in torch (GPU when present), top-k merged block by block
``ivf``    faiss IVF with 8-bit scalar-quantised lists (inner product on the normalised
           vectors), candidates (2k or more) re-ranked exactly on the stored float32
           vectors; the number of candidates and ``nprobe`` are calibrated at build time,
           leave-one-out on a sample of the indexed cells, to reach a target recall@k
           against exact search

Why faiss IVF (``benchmarks/search.py`` measures hnswlib and usearch in the same run): it
adds 136 bytes per cell to the vectors (an 8-bit code and an id; hnswlib with SCimilarity's
M = 80 adds ~660 bytes of graph, measured), builds in seconds rather than minutes, filters by an id
selector without touching the index, and exact re-ranking of its candidates keeps the
distances exact.

A filter (metadata predicate) selects cells without mutating the index. Small selections are
searched exactly within the selection (exact recall, and faster than probing an ANN for a
few matches); large ones through the ANN with an id selector, each query probing the lists
that hold selected cells, nearest first, as deep as its neighbours turn out to lie (a query
outside the selection finds its nearest selected cells far away, spread over many lists).

Directory layout (written atomically; ``CellIndex.load`` memory-maps the embeddings)::

    index/
      manifest.json       version, n_cells, dim, engine, parameters, file sizes and checksums
      embeddings.npy      n_cells x dim float32, L2-normalised
      metadata.parquet    one row per cell (+ ``cell_index``), may be absent; a categorical
                          column of numbers (not text) reads back as its numbers (Parquet
                          keeps the categories of text only)
      ivf.faiss           the faiss index, when the engine is ivf
"""

from __future__ import annotations

import decimal
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from .._utils import (
    as_float,
    atomic_dir,
    check_replaceable,
    holds,
    import_optional,
    is_number,
    is_whole,
    logger,
    model_fingerprint,
    positions,
    read_one_version,
    rename_apart,
)
from .._warnings import warn
from ..data.collection import _as_text, filter_texts
from ..data.stores import refuse_other
from ..errors import CellsiftError

__all__ = ["CellIndex", "CellIndexError", "SearchResult", "normalize_embeddings"]

FORMAT_VERSION = 1
Engine = Literal["exact", "ivf", "auto"]
FilterLike = (
    Any  # a pyarrow.compute.Expression, or {column: value or list of values; None: missing}
)

#: Selections up to this many cells (or this fraction of the index) are searched exactly.
EXACT_SELECTION_MAX = 200_000
EXACT_SELECTION_FRACTION = 0.05
#: The IVF lists hold 8-bit codes, so their candidates are re-ranked exactly on the stored
#: vectors: ``rerank`` times the larger of k and the k calibrated for. ``rerank`` starts at
#: RERANK and is calibrated (doubling, up to RERANK_MAX) where the codes cannot tell close
#: neighbours apart (tightly clustered embeddings), on RERANK_QUERIES sampled cells that
#: each search every list.
RERANK = 2
RERANK_MAX = 64
RERANK_QUERIES = 100
#: Added cells found this far below the calibrated target recall are warned of (the share
#: is measured on a sample of ADDED_SAMPLE of them).
ADDED_RECALL_SLACK = 0.02
ADDED_SAMPLE = 200
#: Most candidate values (queries x candidates x dims) re-ranked at a time.
RERANK_VALUES = 1 << 24
#: A filtered IVF search whose hits lie deeper than this share of the lists it probed
#: probes on, up to twice the cells (:meth:`CellIndex._ivf_within`).
FILTER_DEPTH = 0.6
#: Most query-to-list similarities (queries x lists with selected cells) ordered at a time.
ORDER_VALUES = 1 << 22
#: Indexes below this size use exact search under ``engine="auto"``.
AUTO_EXACT_BELOW = 50_000


class CellIndexError(CellsiftError):
    """A cell index that cannot be built, read or searched as asked."""


#: The columns :meth:`SearchResult.metadata` adds before the metadata's own.
RESULT_COLUMNS = ("query", "rank", "distance")


def _in_range(dist: np.ndarray) -> np.ndarray:
    """``dist`` (cosine distances, inf where no hit) clipped in place to [0, 2]: a cell's
    distance to itself or to its copy comes out of float32 products as about -1e-7 (the
    order of sorted distances stays as it was)."""
    np.maximum(dist, 0.0, out=dist)
    dist[np.isfinite(dist) & (dist > 2.0)] = 2.0
    return dist


def drop_beyond(dist: np.ndarray, idx: np.ndarray, max_distance: float) -> None:
    """A search's hits farther than ``max_distance`` dropped in place: their slots become
    inf / -1, as those of a search with fewer cells within reach (the rows stay sorted)."""
    far = dist > max_distance
    dist[far], idx[far] = np.inf, -1


def normalize_embeddings(x: Any, what: str = "embeddings") -> np.ndarray:
    """``x`` as C-contiguous float32 rows of unit L2 norm; an error for NaN or zero rows.

    Squared norms are summed in float64, so that float32 rows of any finite magnitude
    (1e20 or 1e-24 as well as 1) keep their direction; float64 rows, which may lie beyond
    float32's range, are first scaled by their largest entry.
    """
    a = as_embeddings(x)
    if a.ndim != 2:
        raise CellIndexError(f"{what} must be a 2-d array (cells x dims), not shape {a.shape}.")
    if not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a).all(1))
        rows = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise CellIndexError(
            f"{what}: {len(bad)} {'row holds' if len(bad) == 1 else 'rows hold'} NaN or inf "
            f"(row{'s' if len(bad) > 1 else ''} {rows}, from 0). A model embeds NaN where a "
            "cell's counts hold NaN or inf (read with the count checks off) or its weights "
            "do: mend or leave out those cells' counts, then embed them again."
        )
    out = np.empty(a.shape, dtype=np.float32)
    zero: list[np.ndarray] = []
    for start in range(0, len(a), _NORMALIZE_ROWS):
        block = a[start : start + _NORMALIZE_ROWS]
        if block.dtype == np.float64:
            scale = np.abs(block).max(axis=1, initial=0.0, keepdims=True)
            block = (block / np.where(scale == 0, 1.0, scale)).astype(np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        zero.append(np.flatnonzero(norms == 0) + start)
        np.divide(
            block,
            np.where(norms == 0, 1.0, norms)[:, None],
            out=out[start : start + _NORMALIZE_ROWS],
            casting="unsafe",
        )
    bad = np.concatenate(zero) if zero else np.zeros(0, dtype=np.int64)
    if len(bad):
        rows = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        one = len(bad) == 1
        raise CellIndexError(
            f"{what}: {len(bad)} {'row is' if one else 'rows are'} all zeros (row"
            f"{'' if one else 's'} {rows}, from 0), with no direction to compare by cosine. "
            "A model's embedding is never all zeros: these rows come from elsewhere (a "
            "placeholder, a failed write?); leave them out or embed those cells again."
        )
    return out


def _as_array(x: Any) -> np.ndarray:
    """``x`` as a numpy array; a tensor detached (a model's output may still hold its graph),
    on the CPU, and in float32 unless float64 (numpy holds no bfloat16: an autocast's)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype != torch.float64:
            x = x.float()
    return np.asarray(x)


def as_embeddings(x: Any) -> np.ndarray:
    """Embeddings as the index reads them (:func:`_as_array`): float64 kept (rows beyond
    float32's range keep their direction as they are normalised), else float32."""
    a = _as_array(x)
    return a if a.dtype == np.float64 else np.asarray(a, dtype=np.float32)


#: Rows normalised at a time (a float64 copy of a block's at most).
_NORMALIZE_ROWS = 1 << 16


@dataclass
class SearchResult:
    """Nearest cells of each query: cosine ``distances`` and ``indices`` (queries x k).

    Rows are sorted by distance; where fewer than k cells qualify the rest is -1 / inf.
    ``qc`` holds the query-coherence check of a centroid search (:func:`query_coherence`).
    """

    distances: np.ndarray
    indices: np.ndarray
    index: CellIndex
    qc: Any = None

    def metadata(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Metadata of the hits, one row per (query, rank): ``query``, ``rank`` and
        ``distance``, then the metadata ``columns`` (default: all).

        A metadata column named like one of those three is kept, renamed
        ``metadata_<name>`` (``metadata_<name>2``, ... where that name is taken too).
        """
        q, r = np.nonzero(self.indices >= 0)
        df = self.index.metadata_rows(self.indices[q, r], columns)
        df = df.rename(
            columns=rename_apart(
                map(str, df.columns),
                lambda c: f"metadata_{c}" if c in RESULT_COLUMNS else None,
                reserved=RESULT_COLUMNS,
            )
        )
        df.insert(0, "distance", self.distances[q, r])
        df.insert(0, "rank", r)
        df.insert(0, "query", q)
        return df.reset_index(drop=True)

    def summary(self, by: str | Sequence[str] = "dataset_id") -> pd.DataFrame:
        """Hits counted by metadata column(s) ``by``: cells, queries with a hit, mean
        distance; hits whose value is missing are counted under NaN. ``query`` and ``rank``
        name the hits' query and rank, unless the metadata hold a column of that name (which
        they then name)."""
        keys = _column_names(by)
        own = set(self.index.metadata_columns)
        read = [k for k in keys if k in own or k not in ("query", "rank")]
        q, r = np.nonzero(self.indices >= 0)
        meta = self.index.metadata_rows(self.indices[q, r], read) if read else None
        hits = pd.DataFrame({"query": q, "rank": r, "distance": self.distances[q, r]})
        g = hits.groupby(  # (hits whose value is missing counted too, under NaN)
            [meta[k] if meta is not None and k in read else hits[k] for k in keys],
            observed=True,
            dropna=False,
        )
        out = pd.DataFrame(
            {
                "hits": g.size(),
                "queries": g["query"].nunique(),
                "mean_distance": g["distance"].mean(),
            }
        )
        return out.sort_values("hits", ascending=False)


class CellIndex:
    """Searchable cell embeddings and metadata (see the module docstring).

    Build with :meth:`build`, extend with :meth:`add`, persist with :meth:`save` and
    :meth:`load`; query with :meth:`search`.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        metadata: Any = None,
        *,
        engine: Literal["exact", "ivf"] = "exact",
        ann: Any = None,
        params: dict[str, Any] | None = None,
        metadata_path: Path | None = None,
    ) -> None:
        self.embeddings = embeddings
        self._metadata = metadata  # a pyarrow Table in memory, or None when on disk
        # the metadata file as loaded, held open: a save over the index since (by another
        # handle, another process) puts other files in its place, whose metadata describe
        # other cells than these embeddings; this handle reads the ones it loaded
        self._metadata_file = _HeldParquet(metadata_path) if metadata_path else None
        self.engine = engine
        self.ann = ann
        self.params: dict[str, Any] = dict(params or {})
        self._kept_lists: tuple[Any, int, np.ndarray, np.ndarray] | None = None
        # the manifest digest of each folder this handle loaded from or saved to, as it was
        # then: saving over one that another handle has saved to since is refused (save)
        self._versions: dict[str, str] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_versions", {})  # (pickled by a cellsift without it)

    def __copy__(self) -> CellIndex:
        """A handle of its own: what :meth:`add`, :meth:`calibrate` and :meth:`save` change
        in place (the IVF lists, the parameters, the versions saved) is not shared."""
        new = self._searcher()
        new._versions, new._kept_lists = dict(self._versions), None
        if self.ann is not None:
            new.ann = import_optional("faiss").clone_index(self.ann)
        return new

    def _searcher(self) -> CellIndex:
        """A handle for searching with parameters of its own (:meth:`calibrate` on it
        changes only those): the embeddings, metadata and IVF lists are this index's, not
        copied (:meth:`add` and :meth:`save` are for the index itself)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.params = dict(self.params)
        return new

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        embeddings: Any,
        metadata: pd.DataFrame | Any = None,
        *,
        engine: Engine = "auto",
        k: int = 50,
        target_recall: float = 0.99,
        nlist: int | None = None,
        seed: int = 0,
        model: Any = None,
    ) -> CellIndex:
        """Index ``embeddings`` (cells x dims; normalised here) with optional ``metadata``.

        ``engine="auto"`` is exact below :data:`AUTO_EXACT_BELOW` cells, IVF above. For IVF,
        ``nprobe`` is calibrated so that recall@``k`` on a sample of indexed cells reaches
        ``target_recall``. ``model``: the model that embedded the cells (or its
        fingerprint; default: the one :func:`load_embeddings` notes in the metadata), so
        that queries embedded by another model are refused (:meth:`check_model`).
        """
        emb = normalize_embeddings(embeddings)
        model = _the_model_of(model, metadata)
        table = _as_table(metadata, len(emb))
        if engine == "auto":
            engine = "exact" if len(emb) < AUTO_EXACT_BELOW else "ivf"
        index = cls(emb, table, engine=engine)
        if model is not None:
            index.params["model"] = model
        if engine == "ivf":
            if len(emb) == 0:
                raise CellIndexError("no cells to index: an IVF index trains its lists on them.")
            index._build_ivf(nlist=nlist, seed=seed)
            index.calibrate(k=k, target_recall=target_recall, seed=seed)
        elif engine != "exact":
            raise ValueError(f"engine must be 'exact', 'ivf' or 'auto', not {engine!r}.")
        return index

    def rebuild(self, *, nlist: int | None = None, seed: int = 0) -> float:
        """Train the IVF lists anew over every indexed cell, the ones :meth:`add` appended
        too (whose lists were trained without them; add() warns where they are found short
        of the target), and calibrate ``nprobe`` again for the index's ``k`` and target
        recall; returns the recall reached. ``nlist``: as :meth:`build` (default: from the
        number of cells). Cells, metadata and model stay; save to persist. An exact index
        has no lists: nothing to rebuild (1.0)."""
        if self.engine != "ivf":
            return 1.0
        k = int(self.params.get("asked_k") or self.params.get("calibrated_k") or 50)
        target = float(self.params.get("target_recall", 0.99))
        self._build_ivf(nlist=nlist, seed=seed)
        self.params.pop("added_recall", None)  # (every cell is in the lists trained now)
        return self.calibrate(k=k, target_recall=target, seed=seed)

    def _build_ivf(self, nlist: Any, seed: int) -> None:
        """Train ``nlist`` lists (None: from the number of cells) over every indexed cell."""
        faiss = import_optional("faiss")
        n, d = self.embeddings.shape
        if nlist is not None and not (is_whole(nlist, least=1) and nlist <= n):
            raise CellIndexError(
                f"nlist must be a whole number of lists from 1 to the number of cells "
                f"({n}), not {nlist!r}."
            )
        nlist = (
            int(nlist) if nlist is not None else int(np.clip(4 * math.sqrt(n), 1, max(n // 39, 1)))
        )
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFScalarQuantizer(
            quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        rng = np.random.default_rng(seed)
        sample = self.embeddings[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))]
        ivf.cp.seed = seed
        # (faiss prints a warning of its own for under 39 cells a list: a small index's, or
        # a user's nlist; its recall is what calibrate() measures and reports)
        ivf.cp.min_points_per_centroid = 1
        ivf.train(np.ascontiguousarray(sample))
        for start in range(0, n, 1 << 18):
            ivf.add(np.ascontiguousarray(self.embeddings[start : start + (1 << 18)]))
        self.ann = ivf
        self._kept_lists = None  # (the old lists' cells: not kept alive)
        self.params.update(nlist=nlist, nprobe=max(1, nlist // 64), rerank=RERANK)

    def calibrate(
        self,
        *,
        k: int = 50,
        target_recall: float = 0.99,
        n_queries: int = 500,
        seed: int = 0,
        queries: Any = None,
    ) -> float:
        """Smallest ``nprobe`` (doubling, then bisecting) whose recall@k on a sample of the
        indexed cells reaches ``target_recall``; returns the recall reached.

        ``queries`` (embeddings): calibrated on a sample of these instead. The indexed cells
        stand for new cells like them; queries unlike them (another study, tissue or
        protocol; cells between the reference's populations) lie where the lists nearest a
        query hold fewer of its neighbours, and need more lists (an index calibrated to
        0.99 on its cells can find far fewer of theirs). The target then holds over these
        queries on average. :meth:`KNNAnnotator.annotate` calibrates the search parameters
        of a handle of its index (the index left as it is) so on the cells it annotates.

        ``nprobe`` is calibrated with candidates re-ranked :data:`RERANK` times k. Where that
        takes a quarter of the lists or more (the 8-bit codes cannot rank close neighbours:
        tightly clustered embeddings), the re-rank factor is calibrated first, every list
        probed: the smallest (doubling, up to :data:`RERANK_MAX`) whose recall reaches
        halfway from ``target_recall`` to 1, leaving the lists not probed most of the misses
        allowed; then ``nprobe`` again. Where the target cannot be reached, a warning says
        so and names exact search.

        Recall by distance: a cell found counts where it is as near as the exact k-th
        neighbour (both distances computed alike, in float64 from the stored vectors), so
        that cells at the same distance (duplicates) stand for each other."""
        check_k(k)
        if not (is_number(target_recall) and 0 < target_recall <= 1):
            raise CellIndexError(
                f"target_recall is a share of the true neighbours to find, in (0, 1], not "
                f"{target_recall!r}."
            )
        if self.engine != "ivf":
            return 1.0
        # the k and recall asked, which rebuild() calibrates for again (with more cells, k may
        # then be more than calibrated_k, which the cells at hand bound)
        self.params.update(asked_k=int(k), target_recall=float(target_recall))
        if self.n_cells < 2:  # no other cell to find: every list (the one) is probed
            nlist = self.params["nlist"]
            self.params.update(nprobe=nlist, calibrated_k=0, calibrated_recall=1.0)
            return 1.0
        rng = np.random.default_rng(seed + 1)
        if queries is None:  # the indexed cells, each one's own entry left out
            rows = np.sort(rng.choice(self.n_cells, min(n_queries, self.n_cells), replace=False))
            k = int(min(k, self.n_cells - 1))
            q, kth, recall_at = self._recall_of(rows, k)
        else:
            given = self._queries(queries)
            if not len(given):
                raise CellIndexError("calibrate(queries=...) needs at least one query.")
            pick = np.sort(rng.choice(len(given), min(n_queries, len(given)), replace=False))
            rows, k = None, int(min(k, self.n_cells))
            q, kth, recall_at = self._recall_of(None, k, given[pick])
        nlist = self.params["nlist"]
        rerank = RERANK
        # a quarter of the lists or more: the re-rank factor first. Not searched beyond that
        # (the costliest searches, of many lists), as the answer there would not be used
        quarter = max(nlist // 4, 2)
        rerankable = self.n_cells > rerank * (k + 1)
        nprobe, reached = _least_nprobe(
            lambda p: recall_at(p, rerank),
            quarter - 1 if rerankable else nlist,
            target_recall,
        )
        if rerankable and reached < target_recall:
            few = np.sort(rng.permutation(len(q))[:RERANK_QUERIES])
            own = None if rows is None else rows[few]
            rerank = self._calibrate_rerank(q[few], own, k, kth[few], target_recall)
            nprobe, reached = _least_nprobe(lambda p: recall_at(p, rerank), nlist, target_recall)
        pool = rerank * (k + 1)
        self.params.update(
            nprobe=nprobe,
            rerank=rerank,
            calibrated_k=k,
            calibrated_recall=round(reached, 4),
        )
        logger.info(
            "CellIndex: nprobe %d of %d lists, %d candidates re-ranked a query, give recall@%d "
            "%.4f",
            nprobe, nlist, pool, k, reached,
        )  # fmt: skip
        if reached < target_recall:
            whose = "cell's" if queries is None else "query's"
            warn(
                f"this IVF index finds {reached:.1%} of each {whose} {k} nearest cells, short of "
                f"the {target_recall:.1%} asked, with every list probed and {pool} candidates "
                "re-ranked: its 8-bit codes cannot tell these embeddings' neighbours apart. "
                "Search it exactly (engine='exact' when built, exact=True when searched; "
                "cellsift index --engine exact), or ask a lower target_recall."
            )
        return reached

    def _recall_of(
        self, rows: np.ndarray | None, k: int, queries: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, Callable[[int, int], float]]:
        """The indexed cells ``rows`` as queries (or ``queries``, normalised, where rows is
        None), the exact distance to each one's k-th nearest other cell, and their recall@k
        in IVF searches as a function of (nprobe, re-rank factor). Leave-one-out: each
        indexed cell stands for a new cell like it, so its own entry (found at distance 0 by
        every engine) is not counted."""
        q = np.ascontiguousarray(self.embeddings[rows] if rows is not None else queries)
        more = 1 if rows is not None else 0  # (its own entry, left out)
        kth = self._distances(q, _drop_self(self._exact(q, k + more, None)[1], rows, k)).max(1)

        def recall_at(nprobe: int, rerank: int) -> float:
            found = self._ivf(q, k + more, nprobe, None, pool=rerank * (k + 1))
            return _recall(self._distances(q, _drop_self(found[1], rows, k)), kth)

        return q, kth, recall_at

    def _calibrate_rerank(
        self,
        q: np.ndarray,
        rows: np.ndarray | None,
        k: int,
        kth: np.ndarray,
        target_recall: float,
    ) -> int:
        """The re-rank factor for :meth:`calibrate`: every list probed once for the largest
        candidate pool; the pools of smaller factors are its first candidates (faiss ranks
        them by their codes)."""
        goal = 1.0 - (1.0 - target_recall) / 2
        largest = min(RERANK_MAX * (k + 1), self.n_cells)
        cand = self._candidates(q, largest, self.params["nlist"], None)
        rerank = RERANK
        while True:
            pool = min(rerank * (k + 1), largest)
            found = _drop_self(self._rerank(q, cand[:, :pool], k + 1)[1], rows, k)
            if _recall(self._distances(q, found), kth) >= goal or pool >= largest:
                return rerank
            rerank *= 2

    def _distances(self, q: np.ndarray, idx: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """Cosine distances of each query to its cells ``idx`` (-1: inf) from the stored
        vectors, computed in ``dtype`` (float64: calibration's; float32: re-ranking's), a
        group of queries at a time (:data:`RERANK_VALUES`)."""
        out: np.ndarray = np.full(idx.shape, np.inf, dtype=dtype)
        step = max(1, RERANK_VALUES // max(idx.shape[1] * self.dim, 1))
        for lo in range(0, len(q), step):
            i = idx[lo : lo + step]
            vecs: np.ndarray = np.asarray(self.embeddings[np.maximum(i, 0).ravel()], dtype=dtype)
            # (the width given: a reshape cannot infer it for 0 queries)
            sims = np.einsum("qcd,qd->qc", vecs.reshape(*i.shape, self.dim), q[lo : lo + step])
            out[lo : lo + step] = np.where(i >= 0, 1.0 - sims, np.inf)
        return out

    # -- properties -------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return self.n_cells

    def __repr__(self) -> str:
        extra = (
            f", nlist={self.params['nlist']}, nprobe={self.params['nprobe']}"
            if (self.engine == "ivf")
            else ""
        )
        return f"CellIndex({self.n_cells:,} cells x {self.dim}, {self.engine}{extra})"

    # -- metadata ---------------------------------------------------------------------------
    def _dataset(self) -> Any:
        ds = import_optional("pyarrow.dataset")
        if self._metadata is not None:
            return ds.dataset(self._metadata)
        if self._metadata_file is not None:
            return self._metadata_file.dataset()
        raise CellIndexError("this index has no metadata; build it with metadata= to filter.")

    @property
    def metadata_columns(self) -> list[str]:
        if self._metadata is None and self._metadata_file is None:
            return []
        return [c for c in self._dataset().schema.names if c != "cell_index"]

    def select(self, filter: FilterLike) -> np.ndarray:
        """Sorted positions of the cells a metadata predicate selects (an error if none)."""
        rows = self._selected(filter)
        if len(rows) == 0:
            raise CellIndexError(
                f"the filter {_filter_text(filter)} selects no cells of the {self.n_cells:,} "
                "indexed; check the column values (CellIndex.metadata_rows shows some)."
            )
        return rows

    def _selected(self, filter: FilterLike) -> np.ndarray:
        """:meth:`select`'s positions, none without an error."""
        return rows_where(self._dataset(), filter)

    def metadata_rows(self, rows: Any, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Metadata of cells ``rows`` (any order, repeats allowed) as a DataFrame."""
        rows = positions(rows, CellIndexError)
        outside = rows[(rows < 0) | (rows >= self.n_cells)]
        if len(outside):
            raise CellIndexError(
                f"rows are cells 0 to {self.n_cells - 1} of the index, not {outside[0]}"
                + (
                    ": -1 in a search's indices is a slot with no cell (fewer cells within "
                    "reach than k); keep the indices >= 0."
                    if outside[0] == -1
                    else "."
                )
            )
        has = self.metadata_columns
        if columns is not None:
            cols = _column_names(columns)
            missing = [c for c in cols if c not in has and c != "cell_index"]
            if missing:
                raise CellIndexError(
                    f"the index metadata have no column {', '.join(map(repr, missing))}; "
                    + (
                        f"they have {', '.join(has)}."
                        if has
                        else "this index was built "
                        "without metadata (CellIndex.build(embeddings, metadata=...))."
                    )
                )
        cols = cols if columns is not None else has
        if (self._metadata is None and self._metadata_file is None) or not cols:
            return pd.DataFrame(index=range(len(rows)))  # (no columns: one row per cell still)
        uniq, inverse = np.unique(rows, return_inverse=True)
        tbl = _take(self._dataset(), uniq, cols)
        return tbl.to_pandas().iloc[inverse].reset_index(drop=True)

    # -- search -----------------------------------------------------------------------------
    def search(
        self,
        queries: Any,
        k: int = 50,
        *,
        filter: FilterLike | None = None,
        exact: bool = False,
        nprobe: int | None = None,
        max_distance: float | None = None,
        device: str | torch.device | None = None,
    ) -> SearchResult:
        """The ``k`` nearest indexed cells of each query embedding (cosine distance).

        ``filter`` restricts the search to cells whose metadata match, without changing the
        index; ``exact`` forces exact search; ``max_distance`` drops hits farther than it
        (their slots become -1 / inf; a cell's distance to a copy of itself is 0 within
        about 1e-7 either way: to keep copies, give at least 1e-6). An IVF search probes
        as many lists as calibrated (:meth:`calibrate`; ``nprobe`` to set it), more in
        proportion for a larger ``k``
        than calibrated for, and more again for a query whose probed lists hold fewer than
        ``k`` cells: every query gets ``k`` hits where ``k`` cells qualify. With a filter
        that leaves many cells (IVF), each query probes the lists holding selected cells,
        nearest first, until they hold as many selected cells as the calibrated number of
        lists holds cells, and on while its nearest cells lie in the last lists probed (a
        query far from the selection); a given ``nprobe`` sets the first of these only.

        Cells at one distance come in cell order, so that a smaller ``k``'s hits are the
        first of a larger ``k``'s: in exact search where their distances are equal as
        computed (one embedding's float32 products can differ by about 1e-7 with its place
        in the matrix product, and with the queries searched together; distances are
        clipped to [0, 2] after the order is set, so copies of a query, computed at -1e-7
        and 0, are all at 0 but in that order); IVF re-ranks its
        candidates so, but which of many cells at one distance become candidates is faiss's
        choice.
        """
        q = self._queries(queries)
        check_k(k)
        k = int(k)  # (faiss takes Python ints only)
        if max_distance is not None:
            max_distance = _check_distance(max_distance)
        # a whole number of any kind (2.0, as a config gives it; 10**400: min'd below)
        if nprobe is not None and not (is_number(nprobe) and nprobe >= 1 and nprobe % 1 == 0):
            raise CellIndexError(
                f"nprobe is the number of IVF lists each query probes, a whole number >= 1 "
                f"(None: as calibrated), not {nprobe!r}."
            )
        if device is not None:
            from ..models.bundle import check_device

            check_device(device)  # (before the work: a device this machine lacks, named)
        rows = self.select(filter) if filter is not None else None
        small = rows is not None and self._selection_searched_exactly(len(rows))
        if self.engine == "exact" or exact or small:
            dist, idx = self._exact(q, k, rows, device=device)
        else:
            probe = self._nprobe_for(k)
            if nprobe is not None:  # (faiss probes every list at most; its int is 64 bits)
                probe = int(min(nprobe, self.params["nlist"]))
            if rows is not None:
                dist, idx = self._ivf_within(q, k, probe, rows, deepen=nprobe is None)
            else:
                dist, idx = self._ivf(q, k, probe, None)
                # a query whose probed lists hold fewer than k cells (a large k) probes
                # more lists, up to all of them, until it has its k
                short = np.flatnonzero((idx[:, : min(k, self.n_cells)] < 0).any(1))
                while len(short) and probe < self.params["nlist"]:
                    probe = int(min(self.params["nlist"], probe * 4))
                    dist[short], idx[short] = self._ivf(q[short], k, probe, None)
                    short = short[(idx[short, : min(k, self.n_cells)] < 0).any(1)]
        _in_range(dist)
        if max_distance is not None:
            drop_beyond(dist, idx, max_distance)
        return SearchResult(dist, idx, self)

    def check_model(self, model: Any) -> None:
        """Refuse ``model`` (a model or its fingerprint) if the index knows it was built from
        another model's embeddings: distances between two models' embeddings mean nothing.
        Indexes built without a model pass any."""
        built = self.params.get("model")
        if built is None or model is None:
            return
        fp = _fingerprint_of(model)
        if fp != built:
            raise CellIndexError(
                f"this index holds embeddings of another model (fingerprint {built[:12]}, "
                f"this model {fp[:12]}): embed the queries with the model that built the "
                "index, or build an index with this model (cellsift embed, cellsift index)."
            )

    def _queries(self, queries: Any) -> np.ndarray:
        """Query embeddings, L2-normalised, checked against the index's width."""
        q = np.atleast_2d(_as_array(queries))
        if q.ndim == 2 and q.shape[1] == 0:
            raise CellIndexError(
                f"the queries hold no values (shape {q.shape}): pass embeddings of cells x "
                f"{self.dim} dims."
            )
        if q.ndim == 2 and q.shape[1] != self.dim:  # (before their values)
            raise CellIndexError(
                f"queries have {q.shape[1]} dims, the index {self.dim}: embed them with the "
                "model that built this index."
            )
        return normalize_embeddings(q, "queries")

    def search_within(
        self,
        queries: Any,
        max_distance: float,
        *,
        filter: FilterLike | None = None,
        max_hits: int = 100_000,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every indexed cell within ``max_distance`` of each query (exhaustive, exact):
        one (indices, distances) pair per query, sorted by distance, at most ``max_hits``.

        Distances are float32 (``1 - cos``), so a cell's distance to itself or to a copy is
        0 within about 1e-7 either way: to find copies, ask for ``max_distance=1e-6``, not
        0."""
        max_distance = _check_distance(max_distance)
        if not is_whole(max_hits, least=1):
            raise CellIndexError(
                f"max_hits is how many hits to keep per query, a whole number >= 1, not "
                f"{max_hits!r}."
            )
        q = self._queries(queries)
        rows = self.select(filter) if filter is not None else None
        # each query's nearest max_hits so far, kept block by block: memory queries x
        # max_hits, not queries x the cells within reach
        best = [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(q))]
        for start, block in self._blocks(rows):
            for first, last in self._query_chunks(len(q), len(block)):
                sims = (torch.from_numpy(q[first:last]) @ torch.from_numpy(block).T).numpy()
                apart = 1.0 - sims  # (float32, as the similarities)
                for i in range(last - first):
                    hit = np.flatnonzero(apart[i] <= max_distance)
                    if len(hit) == 0:
                        continue
                    ids = hit + start if rows is None else rows[start + hit]
                    kept_ids, kept_dist = best[first + i]
                    best[first + i] = _nearest(
                        np.concatenate([kept_ids, ids.astype(np.int64, copy=False)]),
                        np.concatenate([kept_dist, apart[i, hit]]),
                        max_hits,
                    )
        result = []
        for ids, dist in best:
            order = np.argsort(dist, kind="stable")
            result.append((ids[order], _in_range(dist[order])))
        return result

    #: Rows of the index compared with the queries at a time by exact search.
    BLOCK_ROWS = 1 << 18
    #: Similarities computed at a time by exact search (queries x rows, 128 MB as float32),
    #: so that its memory stays bounded whatever the number of queries.
    SIMILARITIES = 1 << 25

    def _query_chunks(self, n_queries: int, n_rows: int) -> list[tuple[int, int]]:
        """(first, last) query ranges whose similarities to ``n_rows`` rows fit in
        :attr:`SIMILARITIES`."""
        step = max(self.SIMILARITIES // max(n_rows, 1), 1)
        return [(a, min(a + step, n_queries)) for a in range(0, n_queries, step)]

    def _blocks(self, rows: np.ndarray | None) -> Any:
        """(offset, normalised embeddings) blocks of the index or of the selected rows."""
        n, block = (self.n_cells if rows is None else len(rows)), self.BLOCK_ROWS
        for start in range(0, n, block):
            if rows is None:  # a copy: memory-mapped blocks are read-only
                yield start, np.array(self.embeddings[start : start + block], copy=True)
            else:
                yield start, np.ascontiguousarray(self.embeddings[rows[start : start + block]])

    def _exact(
        self,
        q: np.ndarray,
        k: int,
        rows: np.ndarray | None,
        device: str | torch.device | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        n = self.n_cells if rows is None else len(rows)
        kk = min(k, n)
        best_s = torch.full((len(q), 0), -np.inf, device=dev)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=dev)
        qt = torch.from_numpy(q).to(dev)
        for start, block in self._blocks(rows):
            rows_t = torch.from_numpy(block).to(dev).T
            top = min(kk, rows_t.shape[1])
            s = torch.empty((len(q), top), device=dev)
            i = torch.empty((len(q), top), dtype=torch.long, device=dev)
            for first, last in self._query_chunks(len(q), rows_t.shape[1]):
                s[first:last], i[first:last] = _top_first(qt[first:last] @ rows_t, top)
            best_s = torch.cat([best_s, s], 1)
            best_i = torch.cat([best_i, i + start], 1)
            if start:  # merged with the earlier blocks' best: the best kk, nearest first
                best_s, best_i = _merged_top(best_s, best_i, kk)
        tied = torch.nonzero((best_s[:, 1:] == best_s[:, :-1]).any(1)).ravel()
        if len(tied):  # one block's topk: equal scores in any order, put by position
            best_s[tied], best_i[tied] = _merged_top(best_s[tied], best_i[tied], kk)
        idx = best_i.cpu().numpy()
        if rows is not None:
            idx = rows[idx]
        return _pad(1.0 - best_s.cpu().numpy(), idx, k)

    def _selection_searched_exactly(self, n_selected: int) -> bool:
        """Whether a filter selecting ``n_selected`` cells makes a search exact: few enough
        for exact search to be the cheaper (:data:`EXACT_SELECTION_MAX`,
        :data:`EXACT_SELECTION_FRACTION`)."""
        return n_selected <= max(EXACT_SELECTION_MAX, EXACT_SELECTION_FRACTION * self.n_cells)

    def _nprobe_for(self, k: int) -> int:
        """The lists an IVF search of ``k`` neighbours probes: as calibrated, more in
        proportion for a larger ``k`` than calibrated for."""
        probe, calibrated = int(self.params["nprobe"]), self.params.get("calibrated_k")
        if calibrated and k > calibrated:  # more neighbours: more lists
            probe = int(min(self.params["nlist"], math.ceil(probe * k / calibrated)))
        return probe

    def _ivf(
        self,
        q: np.ndarray,
        k: int,
        nprobe: int,
        rows: np.ndarray | None,
        pool: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The IVF's ``pool`` candidates of each query (default: :meth:`_pool`), re-ranked
        exactly; the k nearest."""
        kk = min(k, self.n_cells)
        pool = min(max(pool or self._pool(k), kk), self.n_cells)
        dist = np.full((len(q), kk), np.inf, dtype=np.float32)
        idx = np.full((len(q), kk), -1, dtype=np.int64)
        step = max(1, RERANK_VALUES // (pool * self.dim))  # (candidates held a group at a time)
        for lo in range(0, len(q), step):
            cand = self._candidates(q[lo : lo + step], pool, nprobe, rows)
            dist[lo : lo + step], idx[lo : lo + step] = self._rerank(q[lo : lo + step], cand, kk)
        return _pad(dist, idx, k)

    def _ivf_within(
        self, q: np.ndarray, k: int, nprobe: int, rows: np.ndarray, deepen: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """IVF search among the cells ``rows`` (a filter's), the k nearest of each query.

        A selection is unevenly spread over the lists: a filter on cell type fills some
        lists and leaves most empty. Each query probes the lists that hold selected cells,
        nearest first, until they hold as many selected cells as ``nprobe`` lists hold cells
        on average (what an unfiltered search scans). Where the nearest it found (as the
        codes rank them: k, or the k calibrated for where more) then include one from the
        last of its lists (``deepen``: past :data:`FILTER_DEPTH` of them), its neighbours
        lie on beyond: a query outside the selection, whose nearest selected cells are far
        and spread over many lists. It probes the next lists, up to twice the cells, and so
        on until its nearest lie nearer in or every such list is probed, as does a query
        that found fewer than k cells. The candidates of all its lists are re-ranked
        exactly at the end.
        """
        lists, centroids = self._lists()
        held = np.bincount(lists[rows], minlength=len(centroids))
        live = np.flatnonzero(held)  # the lists with selected cells
        held, centroids = held[live], centroids[live]
        kk, pool, wanted = min(k, self.n_cells), self._pool(k), min(k, len(rows))
        # how deep the hits lie: judged by as many as calibrated for, at least (fewer than
        # k = 50 hits would often all lie near the front by chance)
        deep = min(max(kk, int(self.params.get("calibrated_k") or 0)), pool)
        selector = self._selector(rows)
        scanned = nprobe * self.n_cells / self.params["nlist"]
        # lists ordered per query as far as needed: at first, 4 times as many as would
        # hold the budget were the selection spread evenly over them
        first = min(len(live), max(64, 4 * math.ceil(scanned * len(live) / len(rows))))
        dist = np.full((len(q), kk), np.inf, dtype=np.float32)
        idx = np.full((len(q), kk), -1, dtype=np.int64)
        step = max(1, min(RERANK_VALUES // (pool * self.dim), ORDER_VALUES // len(live)))
        for lo in range(0, len(q), step):
            qc = q[lo : lo + step]
            score = qc @ centroids.T
            order, budget = _list_order(score, first), np.full(len(qc), scanned)
            # each query's best candidates by the codes so far, from its first `done` lists
            best = np.full((len(qc), pool), -np.inf, dtype=np.float32)
            cand = np.full((len(qc), pool), -1, dtype=np.int64)
            done = np.zeros(len(qc), dtype=np.int64)
            todo = np.arange(len(qc))
            while len(todo):
                cum = np.cumsum(held[order[todo]], axis=1)
                if order.shape[1] < len(live) and (cum[:, -1] < budget[todo]).any():
                    order = _list_order(score, 4 * order.shape[1])  # more lists, in order
                    continue
                n_lists = np.minimum((cum < budget[todo, None]).sum(1) + 1, order.shape[1])
                width = int(n_lists.max())
                probed = order[todo, :width]
                columns = np.arange(width)[None, :]
                assign = np.where(
                    (columns >= done[todo, None]) & (columns < n_lists[:, None]), live[probed], -1
                )  # (the lists not probed yet)
                near = np.take_along_axis(score[todo], probed, 1)
                sim, new = self._preassigned(qc[todo], pool, assign, near, selector)
                best[todo], cand[todo] = _merged_best(best[todo], cand[todo], sim, new)
                done[todo] = n_lists
                i = cand[todo, :deep]  # (the nearest as the codes rank them)
                more = (i[:, :wanted] < 0).any(1)
                if deepen:
                    # (each hit's list among the live ones; none: the first, not counted)
                    found = np.where(i >= 0, np.searchsorted(live, lists[np.maximum(i, 0)]), 0)
                    more |= _deepest(probed, found, i >= 0, len(live)) > FILTER_DEPTH * n_lists
                todo = todo[more & (n_lists < len(live))]
                budget[todo] *= 2
            dist[lo : lo + step], idx[lo : lo + step] = self._rerank(qc, cand, kk)
        return _pad(dist, idx, k)

    def _pool(self, k: int) -> int:
        """Candidates re-ranked a query: ``rerank`` times the larger of k and the k
        calibrated for (whose recall holds for fewer neighbours too); for an index built from
        one cell, calibrated for no neighbour, the k it was asked for (as cells added to it
        are checked: :meth:`_check_added`)."""
        kk = min(k, self.n_cells)
        calibrated = int(self.params.get("calibrated_k") or self.params.get("asked_k") or 0)
        return min(self._rerank_factor() * max(kk, calibrated), self.n_cells)

    def _rerank_factor(self) -> int:
        """The re-rank factor searches use: 1 (the k best by their codes) for an index
        saved without one."""
        return int(self.params.get("rerank", 1))

    def _lists(self) -> tuple[np.ndarray, np.ndarray]:
        """Each indexed cell's IVF list and the lists' centroids, kept until the lists
        change (:meth:`add`, :meth:`rebuild`)."""
        kept = self._kept_lists
        if kept is None or kept[0] is not self.ann or kept[1] != self.ann.ntotal:
            faiss = import_optional("faiss")
            inverted = self.ann.invlists
            lists = np.full(self.ann.ntotal, -1, dtype=np.int32)
            for number in range(self.ann.nlist):
                size = inverted.list_size(number)
                if size:
                    ids = inverted.get_ids(number)
                    lists[faiss.rev_swig_ptr(ids, size)] = number
                    inverted.release_ids(number, ids)
            centroids = self.ann.quantizer.reconstruct_n(0, self.ann.nlist)
            kept = self._kept_lists = (self.ann, self.ann.ntotal, lists, centroids)
        return kept[2], kept[3]

    def _selector(self, rows: np.ndarray) -> Any:
        """A faiss id selector of the cells ``rows`` (its bitmap kept alive with it)."""
        faiss = import_optional("faiss")
        bitmap = np.zeros(self.n_cells, dtype=bool)
        bitmap[rows] = True
        packed = np.packbits(bitmap, bitorder="little")
        selector = faiss.IDSelectorBitmap(self.n_cells, faiss.swig_ptr(packed))
        selector.bitmap_ref = packed  # (faiss holds a pointer only)
        return selector

    def _candidates(
        self, q: np.ndarray, n: int, nprobe: int, rows: np.ndarray | None
    ) -> np.ndarray:
        """Each query's ``n`` best cells by the IVF's 8-bit codes (-1: none), best first."""
        faiss = import_optional("faiss")
        if self.ann is None:
            raise CellIndexError("this index has no IVF structure; build it with engine='ivf'.")
        params = faiss.SearchParametersIVF()
        params.nprobe = int(nprobe)
        if rows is not None:
            params.sel = self._selector(rows)
        return self.ann.search(q, int(n), params=params)[1]

    def _preassigned(
        self, q: np.ndarray, n: int, lists: np.ndarray, near: np.ndarray, selector: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each query's ``n`` best cells of ``selector`` by the IVF's 8-bit codes in its
        lists ``lists`` (-1: none; ``near``: its similarities to them): their similarities
        (-inf: none) and cells (-1), best first."""
        faiss = import_optional("faiss")
        params = faiss.SearchParametersIVF()
        params.nprobe = lists.shape[1]
        params.sel = selector
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        near = np.ascontiguousarray(near, dtype=np.float32)
        q = np.ascontiguousarray(q, dtype=np.float32)
        sim = np.empty((len(q), int(n)), dtype=np.float32)
        cells = np.empty((len(q), int(n)), dtype=np.int64)
        ptr = faiss.swig_ptr
        self.ann.search_preassigned_c(
            len(q), ptr(q), int(n), ptr(lists), ptr(near), ptr(sim), ptr(cells), False, params
        )
        sim[cells < 0] = -np.inf
        return sim, cells

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest of the candidates (-1: none) by the stored float32 vectors."""
        dist = self._distances(q, cand, np.float32)
        kk = min(k, cand.shape[1])
        order = np.argsort(dist, axis=1, kind="stable")
        # equal distances by position, as exact search orders them (a missing candidate, -1
        # at inf, after every cell): sorted so again only where the first k + 1 hold ties
        head = np.take_along_axis(dist, order[:, : kk + 1], 1)
        tied = np.flatnonzero((head[:, 1:] == head[:, :-1]).any(1))
        if len(tied):
            key = np.where(cand[tied] < 0, self.n_cells, cand[tied])
            order[tied] = np.lexsort((key, dist[tied]), axis=1)
        order = order[:, :kk]
        return np.take_along_axis(dist, order, 1), np.take_along_axis(cand, order, 1)

    # -- growing ----------------------------------------------------------------------------
    def add(
        self, embeddings: Any, metadata: pd.DataFrame | Any = None, *, model: Any = None
    ) -> np.ndarray:
        """Append cells (and their metadata, with the same columns: None where the new cells
        have no value, which whole numbers and flags keep as pandas' nullable types);
        returns their positions.

        ``model``: the model that embedded the new cells (or its fingerprint; default: the
        one :func:`load_embeddings` notes in the metadata). Cells of another model than the
        index's are refused: distances between two models' embeddings mean nothing. (Cells
        whose model is unknown, bare arrays, are taken, as :meth:`check_model` takes any
        model for an index built without one.)

        The IVF lists keep their centroids (no retraining): the new cells' own recall@k (k
        calibrated for, on a sample of them, leave-one-out) is measured, and a warning says
        when it falls short of the index's target (cells unlike those the lists were trained
        on): :meth:`rebuild` then. Save to persist.
        """
        emb = normalize_embeddings(embeddings)
        if emb.shape[1] != self.dim:
            raise CellIndexError(f"new embeddings have {emb.shape[1]} dims, the index {self.dim}.")
        _one_model(
            _the_model_of(model, metadata),
            self.params.get("model"),
            "the new cells were embedded by another model (fingerprint {0}) than this "
            "index's (fingerprint {1}): embed them with the model that built the index "
            "(cellsift embed), or build an index of the other model's embeddings.",
        )
        has_meta = self._metadata is not None or self._metadata_file is not None
        if has_meta != (metadata is not None):
            raise CellIndexError(
                "add() needs metadata exactly when the index has it (same columns)."
            )
        start = self.n_cells
        if metadata is not None:
            old = self._metadata if self._metadata is not None else self._dataset().to_table()
            new = _as_table(metadata, len(emb), start=start, text=_text_columns(old.schema))
            if set(new.schema.names) != set(old.schema.names):
                why = ""
                if "obs_name" in set(old.schema.names) - set(new.schema.names):
                    why = (
                        " (obs_name holds the cells' names, which the index took from its "
                        "metadata's row names: give the new cells' names as their row names)"
                    )
                elif "obs_name" in set(new.schema.names) - set(old.schema.names):
                    why = (
                        " (the new metadata's row names become obs_name, but the index holds "
                        "no cell names: pass the new metadata with reset_index(drop=True))"
                    )
                if not why:
                    why = (
                        ": give the new cells the index's columns (None in a column they "
                        "have no value of), and leave out others"
                    )
                raise CellIndexError(
                    f"metadata columns differ: index {sorted(old.schema.names)}, new "
                    f"{sorted(new.schema.names)}{why}."
                )
            self._metadata = _concat_metadata(old, new.select(old.schema.names))
            self._metadata_file = None
        self.embeddings = np.concatenate([np.asarray(self.embeddings), emb])
        if self.ann is not None:
            self.ann.add(emb)
            self._kept_lists = None  # (its lists' cells changed)
            self._check_added(start)
        return np.arange(start, self.n_cells)

    def _check_added(self, start: int) -> None:
        """Warn where the cells added from ``start`` on are found at a recall@k short of the
        index's target (the lists were trained without them); the lowest such recall since
        the lists were trained is kept in ``params["added_recall"]`` (saved with the index,
        said again as it loads, until :meth:`rebuild`)."""
        # (an index built from one cell calibrated for no neighbour: the k it was asked for)
        k = int(self.params.get("calibrated_k") or self.params.get("asked_k") or 0)
        k = min(k, self.n_cells - 1)
        added = self.n_cells - start
        if k < 1 or added == 0:
            return
        rng = np.random.default_rng(0)
        rows = start + np.sort(rng.choice(added, min(added, ADDED_SAMPLE), replace=False))
        reached = self._recall_of(rows, k)[2](int(self.params["nprobe"]), self._rerank_factor())
        target = float(self.params.get("target_recall", 0.99))
        if reached < target - ADDED_RECALL_SLACK:
            lowest = min(reached, float(self.params.get("added_recall", 1.0)))
            self.params["added_recall"] = round(lowest, 4)
            warn(
                f"the {added:,} cells added are found at recall@{k} {reached:.1%}, short of the "
                f"{target:.1%} this IVF index was calibrated to: its lists were trained "
                f"without cells like them. {_REBUILD}"
            )

    def _warn_if_added_short(self, root: Path) -> None:
        """As a saved index loads: where cells added to it were found short of its target
        (:meth:`_check_added`) and it was not rebuilt since, say so again."""
        added = self.params.get("added_recall")
        target = float(self.params.get("target_recall", 0.99))
        if added is not None and float(added) < target - ADDED_RECALL_SLACK:
            warn(
                f"{root}: cells added to this IVF index after its lists were trained were "
                f"found at a recall of {added:.1%}, short of the {target:.1%} it was "
                f"calibrated to. {_REBUILD}"
            )

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the index directory atomically (see the module docstring)."""
        pq = import_optional("pyarrow.parquet")
        check_index_path(path, overwrite)
        with atomic_dir(path, overwrite=overwrite, replaces=_REPLACES, what=_AN_INDEX) as tmp:
            self._check_not_saved_over(Path(path))  # (its lock held: no save between)
            np.save(tmp / "embeddings.npy", np.asarray(self.embeddings), allow_pickle=False)
            files = ["embeddings.npy"]
            if self._metadata is not None or self._metadata_file is not None:
                table = self._metadata if self._metadata is not None else self._dataset().to_table()
                pq.write_table(table, tmp / "metadata.parquet", row_group_size=METADATA_ROWS)
                files.append("metadata.parquet")
            if self.ann is not None:
                faiss = import_optional("faiss")
                faiss.write_index(self.ann, str(tmp / "ivf.faiss"))
                files.append("ivf.faiss")
            manifest = {
                "format": "cellsift.CellIndex",
                "version": FORMAT_VERSION,
                "n_cells": self.n_cells,
                "dim": self.dim,
                "metric": "cosine",
                "engine": self.engine,
                "params": self.params,
                "files": {f: _file_digest(tmp / f) for f in files},
            }
            raw = json.dumps(manifest, indent=2).encode()
            (tmp / "manifest.json").write_bytes(raw)
        # (after the save: a link saved over is a folder now, no longer its target)
        self._versions.update(dict.fromkeys(_folder_keys(Path(path)), _manifest_digest(raw)))
        held = self._metadata_file
        if held is not None and _same_place(held.path.parent, Path(path)):
            # saved over its own folder: the file it holds is its own copy now; the one in
            # its place (the same metadata) is what a copy of this index opens again
            self._metadata_file = _HeldParquet(Path(path) / "metadata.parquet")
        return Path(path)

    def _check_not_saved_over(self, path: Path) -> None:
        """Refuse to save over ``path`` where this handle loaded from it (or saved to it) and
        another handle or process has saved to it since: its cells (added there) would be
        lost without a word."""
        # (several: loaded through a link, saved to its folder since; any is this handle's)
        known = {self._versions[k] for k in _folder_keys(path) if k in self._versions}
        if not known:
            return
        try:
            now = _manifest_digest((path / "manifest.json").read_bytes())
        except OSError:  # (removed since, or no index there now: nothing of it is lost)
            return
        if now not in known:
            raise CellIndexError(
                f"{path} was saved by another handle or process since this index was loaded "
                "from it (or saved to it), so saving this one over it would drop what that "
                "save added: load the index again (CellIndex.load), add these cells to it "
                "and save that; or save this index elsewhere."
            )

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, mmap: bool = True, verify: bool = True
    ) -> CellIndex:
        """Open a saved index; embeddings memory-mapped unless ``mmap=False``.

        Each file's size (and, with ``verify``, its checksum) is checked against the manifest;
        a missing or altered file is an error naming it.
        """
        root = Path(path)
        # (as one version of the folder, where another process saves over it meanwhile)
        return read_one_version(
            root, lambda: cls._load(root, mmap=mmap, verify=verify), CellIndexError
        )

    @classmethod
    def _load(cls, root: Path, *, mmap: bool, verify: bool) -> CellIndex:
        man_path = root / "manifest.json"
        refuse_other(root, "index", CellIndexError)
        if not root.is_dir():
            what = "a file" if root.exists() else "missing"
            raise CellIndexError(
                f"{root} is not a CellIndex: the path is {what}, not an index folder "
                "(cellsift index writes one)."
            )
        try:
            raw = man_path.read_bytes()
            manifest = json.loads(raw.decode())
        except FileNotFoundError:
            raise CellIndexError(
                f"{root} is not a CellIndex: {man_path.name} is missing."
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CellIndexError(f"{man_path} is corrupt ({err}); rebuild the index.") from None
        if not isinstance(manifest, dict) or manifest.get("format") != "cellsift.CellIndex":
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest)
            raise CellIndexError(f"{root} is not a CellIndex (manifest format {found!r}).")
        version: Any = manifest.get("version")
        if not is_whole(version, least=1):
            raise CellIndexError(
                f"{man_path} is corrupt (its format version {version!r} is not a whole "
                "number); rebuild the index."
            )
        if version > FORMAT_VERSION:
            raise CellIndexError(
                f"{root} is a CellIndex of format version {version!r}; this cellsift reads "
                f"versions up to {FORMAT_VERSION}: upgrade cellsift, or rebuild the index."
            )
        _check_manifest(manifest, man_path)
        meta = root / "metadata.parquet"
        if meta.exists() and meta.name not in manifest["files"]:  # (its checksum unknown)
            raise CellIndexError(
                f"{man_path} is corrupt (it does not list the {meta.name} beside it); rebuild "
                "the index."
            )
        for name, want in manifest["files"].items():
            f = root / name
            if not f.exists():
                raise CellIndexError(f"{f} is missing; the index is incomplete, rebuild it.")
            if f.stat().st_size != want["bytes"] or (verify and _file_digest(f) != want):
                raise CellIndexError(
                    f"{f} does not match its checksum; the file is corrupt, rebuild the index."
                )
        try:
            emb = np.load(root / "embeddings.npy", mmap_mode="r" if mmap else None)
        except ValueError as err:
            raise CellIndexError(f"{root / 'embeddings.npy'} cannot be read ({err}).") from None
        if emb.shape != (manifest["n_cells"], manifest["dim"]) or emb.dtype != np.float32:
            raise CellIndexError(
                f"{root / 'embeddings.npy'} has shape {emb.shape} {emb.dtype}, not as its manifest says."
            )
        ann = None
        if manifest["engine"] == "ivf":
            faiss = import_optional("faiss")
            try:
                ann = faiss.read_index(str(root / "ivf.faiss"))
            except RuntimeError as err:
                first = str(err).strip().splitlines()[-1] if str(err).strip() else "faiss error"
                raise CellIndexError(
                    f"{root / 'ivf.faiss'} cannot be read ({first}); rebuild the index."
                ) from None
            held = {  # (what the manifest says of it, and what it holds)
                "cells": (manifest["n_cells"], ann.ntotal),
                "dims": (manifest["dim"], ann.d),
                "lists": (manifest["params"]["nlist"], getattr(ann, "nlist", None)),
            }
            wrong = [
                f"{said} {what} ({has} in it)" for what, (said, has) in held.items() if said != has
            ]
            if wrong:
                raise CellIndexError(
                    f"{root / 'ivf.faiss'} is not the index its manifest describes (the "
                    f"manifest says {', '.join(wrong)}); rebuild the index."
                )
        index = cls(
            emb,
            None,
            engine=manifest["engine"],
            ann=ann,
            params=manifest["params"],
            metadata_path=meta if meta.exists() else None,
        )
        parquet = index._metadata_file
        rows = None if parquet is None else parquet.dataset().count_rows()  # (its footer)
        if rows is not None and rows != manifest["n_cells"]:  # (a file its manifest
            # was written for by hand: its cells would take other cells' metadata)
            raise CellIndexError(
                f"{meta} holds {rows:,} rows for the {manifest['n_cells']:,} cells of the "
                "index; the index is corrupt, rebuild it."
            )
        index._versions.update(dict.fromkeys(_folder_keys(root), _manifest_digest(raw)))
        index._warn_if_added_short(root)
        return index


# -- helpers ----------------------------------------------------------------------------------
_REBUILD = (
    "Rebuild its lists over all the cells (index.rebuild(), then save), or search it exactly "
    "(exact=True)."
)

#: Rows per row group of a saved index's metadata (what a lookup of a few rows reads).
METADATA_ROWS = 1 << 17


def _take(dataset: Any, rows: np.ndarray, columns: list[str]) -> Any:
    """Rows ``rows`` (sorted, unique) of a metadata dataset as a pyarrow Table. Of a
    Parquet file, only the row groups holding them are read where that is not all of them
    (``Dataset.take`` reads every one: one row of a 1M-cell index, 0.02-0.03 s against
    0.004-0.01 s)."""
    fragments = list(dataset.get_fragments()) if hasattr(dataset, "files") else []
    if len(fragments) != 1 or not len(rows):
        return dataset.take(rows, columns=columns)
    (fragment,) = fragments
    meta = fragment.metadata
    sizes = np.array([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    starts = np.concatenate(([0], np.cumsum(sizes)))
    group = np.searchsorted(starts, rows, side="right") - 1
    wanted = np.unique(group)
    if len(wanted) == len(sizes):  # (every group: read whole, as take does)
        return dataset.take(rows, columns=columns)
    read = fragment.subset(row_group_ids=wanted.tolist()).to_table(
        columns=columns, schema=dataset.schema
    )
    # each row's place in what was read: its group's place there, plus its own in the group
    first = np.concatenate(([0], np.cumsum(sizes[wanted])))[np.searchsorted(wanted, group)]
    return read.take(first + rows - starts[group])


class _HeldParquet:
    """A Parquet file read as it was opened: held by a descriptor (reads at offsets, safe
    from threads), so a save that puts another file in its place (a rename) leaves this
    one readable, consistent with the embeddings loaded beside it. A file rewritten in
    place (same inode, other size or time) is an error naming the fix, not other rows.
    Pickled (to another process), it is opened again by its path, if still the same file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()  # (a copy opens it again from wherever it is then)
        self._open(None)

    def _open(self, loaded: tuple[int, int, int, int] | None) -> None:
        """Open the file; ``loaded``: the identity it had when loaded (None: now), where a
        copy opens it again. Another file there, or none, is said as it is read."""
        pa = import_optional("pyarrow")
        ds = import_optional("pyarrow.dataset")
        self._dataset: Any = None
        self.loaded = loaded
        try:
            self._file = pa.OSFile(str(self.path))
            opened = _identity(os.fstat(self._file.fileno()))
            if self.loaded is None:
                self.loaded = opened
            elif opened != self.loaded:
                return
            fragment = ds.ParquetFileFormat().make_fragment(self._file)
            self._dataset = ds.FileSystemDataset(
                [fragment], fragment.physical_schema, ds.ParquetFileFormat()
            )
        except (OSError, pa.ArrowException) as err:
            if loaded is None:
                raise CellIndexError(
                    f"{self.path} cannot be read ({err}); rebuild the index."
                ) from None

    def dataset(self) -> Any:
        if self._dataset is None or _identity(os.fstat(self._file.fileno())) != self.loaded:
            raise CellIndexError(
                f"{self.path} was rewritten, replaced or removed since this index was loaded "
                "from it (by another process or handle), so its metadata no longer describe "
                "these embeddings: load the index again (CellIndex.load)."
            )
        return self._dataset

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "loaded": self.loaded}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._open(state["loaded"])


def _manifest_digest(raw: bytes) -> str:
    """A saved version of an index: its manifest's digest (the manifest holds every file's)."""
    return hashlib.sha256(raw).hexdigest()


def _folder_keys(path: Path) -> set[str]:
    """An index folder's path as texts whatever its spelling (``..``, links above it; not
    its inode: each save puts a new folder in place): the folder it leads to, and its name
    in the folder it is in (a link of that name, which a save replaces by a folder)."""
    return {str(path.resolve()), str(path.absolute().parent.resolve() / path.name)}


def _same_place(a: Path, b: Path) -> bool:
    """Do ``a`` and ``b`` name one folder now (through links, ``..``, another spelling)?"""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """(device, inode, size, modification time in ns) of a file: another file put in its
    place, or the file rewritten, changes it."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """The manifest's entries have the shapes :meth:`CellIndex.save` writes, and list the
    files its engine needs; else an error naming what is wrong."""
    needed = ("files", "n_cells", "dim", "engine", "params")
    problems = [f"missing {k!r}" for k in needed if k not in manifest]
    files, engine, params = manifest.get("files"), manifest.get("engine"), manifest.get("params")
    if not problems:
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and is_whole(v.get("bytes"), least=0) for v in files.values()
        ):
            problems.append("'files' is not a map of file names to their sizes and checksums")
        if engine not in ("exact", "ivf"):
            problems.append(f"engine {engine!r} is neither 'exact' nor 'ivf'")
        if not isinstance(params, dict):
            problems.append("'params' is not a map")
        elif engine == "ivf" and not all(is_whole(params.get(p), least=1) for p in _IVF_PARAMS):
            problems.append(f"an IVF index's params lack whole numbers for {list(_IVF_PARAMS)}")
        else:  # (the optional ones, where given: of the kinds calibrate() writes)
            problems += [
                f"params {name!r} is {params[name]!r}, not {what}"
                for name, (ok, what) in _OPTIONAL_PARAMS.items()
                if params.get(name) is not None and not ok(params[name])
            ]
    if manifest.get("metric", "cosine") != "cosine":  # (the one an index searches by)
        problems.append(f"metric {manifest['metric']!r} is not 'cosine'")
    if not problems and isinstance(files, dict):
        wanted = ["embeddings.npy", *(["ivf.faiss"] if engine == "ivf" else [])]
        problems += [f"{name} is not listed" for name in wanted if name not in files]
        # (a file no index of its engine writes: an exact engine's ivf.faiss would be left
        # unread, and gone at the next save)
        kept = {*wanted, "metadata.parquet"}
        problems += [
            f"it lists {name!r}, which an index of engine {engine!r} does not hold"
            for name in files
            if name not in kept
        ]
    if problems:
        raise CellIndexError(f"{path} is corrupt ({'; '.join(problems)}); rebuild the index.")


#: The parameters of an IVF search a saved index must hold.
_IVF_PARAMS = ("nlist", "nprobe")


def _share(x: Any) -> bool:
    return is_number(x) and not isinstance(x, bool) and 0 <= x <= 1


#: Those it may hold: a check of each, and what it says it should be.
_OPTIONAL_PARAMS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "rerank": (lambda x: is_whole(x, least=1), "a whole number >= 1"),
    "asked_k": (lambda x: is_whole(x, least=1), "a whole number >= 1"),
    "calibrated_k": (lambda x: is_whole(x, least=0), "a whole number >= 0"),
    "target_recall": (lambda x: _share(x) and x > 0, "a share in (0, 1]"),
    "calibrated_recall": (_share, "a share in [0, 1]"),
    "added_recall": (_share, "a share in [0, 1]"),
    "model": (lambda x: isinstance(x, str), "text (the embedding model's fingerprint)"),
}
#: What a saved index holds in any case, and what it is called in messages.
_INDEX_FILES = ("manifest.json", "embeddings.npy")
#: What overwrite replaces: an index's folder, holding its own files only.
_REPLACES = holds(*_INDEX_FILES, only=(*_INDEX_FILES, "metadata.parquet", "ivf.faiss"))
_AN_INDEX = "a cell index"


def check_index_path(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse ``path`` for a new index, as :meth:`CellIndex.save` would, before the work:
    a name that says a store of cells (an index named .h5ad, .zarr or .soma, which no
    reader of those opens), or an output it may not replace."""
    from ..data.writers import named_format

    named = named_format(Path(path).name)
    if named is not None and not holds(*_INDEX_FILES)(Path(path)):  # (an index there: kept)
        raise CellIndexError(
            f"{path} is named as a {named} store, but an index is a folder of its own "
            "(manifest.json, embeddings.npy, ...): name it without that suffix (e.g. "
            "cells.index)."
        )
    check_replaceable(Path(path), overwrite, _REPLACES, _AN_INDEX)


def _nearest(ids: np.ndarray, dist: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` hits of least distance, ties to the earlier hit (as a stable sort of
    all of them would keep); all of them, in their order, when they are no more."""
    if len(dist) <= keep:
        return ids, dist
    cut = np.partition(dist, keep - 1)[keep - 1]
    near = np.flatnonzero(dist <= cut)  # (in their order: the stable sort breaks ties so)
    near = near[np.argsort(dist[near], kind="stable")[:keep]]
    return ids[near], dist[near]


def _check_distance(max_distance: Any) -> float:
    """``max_distance`` as a float, a number that is not NaN (cosine distances lie in [0,
    2]; inf keeps every hit; a whole number beyond float's range is inf), else a
    :class:`CellIndexError`."""
    if not is_number(max_distance):
        raise CellIndexError(
            f"max_distance is a cosine distance (a number; distances lie in [0, 2]), not "
            f"{max_distance!r}."
        )
    return as_float(max_distance)


def check_k(k: Any) -> None:
    """``k`` is a whole number of neighbours >= 1 (else a :class:`CellIndexError`)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise CellIndexError(f"k must be a whole number of neighbours >= 1, not {k!r}.")


def rows_where(
    ds: Any, filter: FilterLike, what: str = "the metadata", rows: str = "cell_index"
) -> np.ndarray:
    """Sorted values of column ``rows`` (the rows' positions: an index's ``cell_index``)
    of the rows of the Arrow dataset ``ds`` that ``filter`` selects, each value read as its
    column's type (:func:`_expression`); none without an error. ``what``: the table, in
    messages."""
    names = set(ds.schema.names)  # (the positions' column too: an index's is filtered on)
    missing = sorted({str(c) for c in filter} - names) if isinstance(filter, Mapping) else []
    if missing:
        raise CellIndexError(
            f"filter names columns {what} does not have: {missing}; it has {sorted(names - {rows})}."
        )
    pa = import_optional("pyarrow")
    try:
        tbl = ds.to_table(columns=[rows], filter=_expression(filter, ds.schema))
    except (
        pa.ArrowNotImplementedError,
        pa.ArrowTypeError,
        pa.ArrowInvalid,
        TypeError,
    ) as err:
        unread = _unread_values(filter, ds.schema)
        if unread:  # (text given to a column of numbers or flags: a command line's values)
            raise CellIndexError(
                f"the filter {_filter_text(filter)} cannot be compared with {what}: "
                + "; ".join(
                    f"{c!r} holds {kind}, which {', '.join(map(repr, values))} "
                    f"{'does' if len(values) == 1 else 'do'} not read as"
                    for c, kind, values in unread
                )
                + ": give numbers for a column of numbers, True or False for one of flags."
            ) from None
        types = ""
        if isinstance(filter, Mapping):  # each column's type against the values'
            types = "; ".join(
                f"{c!r} holds {ds.schema.field(str(c)).type}, the filter gives "
                + (
                    f"{type(next(iter(listed), None)).__name__} values"
                    if (listed := _as_list(v)) is not None
                    else type(v).__name__
                )
                for c, v in filter.items()
            )
            types = f" ({types})"
        absent = re.search(r"No match for FieldRef\.Name\((.*?)\)", str(err))
        if absent is not None:  # an expression naming a column the metadata lack
            raise CellIndexError(
                f"the filter {_filter_text(filter)} names a column {what} does not have "
                f"({absent.group(1)!r}); it has {sorted(names - {rows})}."
            ) from None
        raise CellIndexError(
            f"the filter {_filter_text(filter)} cannot be compared with {what}"
            f"{types}: give values of each column's type, e.g. text for a text column. "
            f"({' '.join(str(err).split())})"
        ) from None
    return np.sort(tbl.column(rows).to_numpy())


def frame_rows_where(df: pd.DataFrame, filter: FilterLike, what: str) -> np.ndarray:
    """Sorted positions of the rows of ``df`` (an AnnData's obs) that a mapping ``filter``
    selects, each value read as its column's type as :meth:`CellIndex.select` reads the
    metadata's (:func:`rows_where`; object columns typed as an index stores them)."""
    pa = import_optional("pyarrow")
    pds = import_optional("pyarrow.dataset")
    df = df.reset_index(drop=True)
    for col in df.columns:
        if df[col].dtype == object:  # (missing values kept missing, not "nan")
            df[col] = _objects_typed(df[col].to_numpy())
    table = pa.Table.from_pandas(df, preserve_index=False)
    position = "row"  # (a name apart from the frame's columns)
    while position in set(map(str, df.columns)):
        position += "_"
    table = table.append_column(position, pa.array(np.arange(len(df), dtype=np.int64)))
    return rows_where(pds.dataset(table), filter, what, rows=position)


def _as_table(metadata: Any, n: int, start: int = 0, text: frozenset[str] = frozenset()) -> Any:
    """``metadata`` (a DataFrame or an Arrow table) as an Arrow table with ``cell_index``
    from ``start``. Object columns as :func:`_objects_typed` reads them, those named in
    ``text`` (an index's columns of text, which new cells join) as text."""
    if metadata is None:
        return None
    pa = import_optional("pyarrow")
    if isinstance(metadata, pd.DataFrame):
        # the cells' names (an AnnData's obs_names) stay, as the column embedding stores use
        named = not isinstance(metadata.index, pd.RangeIndex) and "obs_name" not in metadata
        df = metadata.reset_index(drop=True)
        if named:
            df.insert(0, "obs_name", metadata.index.astype(str).to_numpy())
        if "cell_index" in df.columns:  # (renamed first: the index's text columns by name)
            df = df.rename(columns={"cell_index": _kept_cell_index(list(df.columns))})
        for col in df.columns:
            if df[col].dtype == object:  # as text, missing values kept missing (not "nan")
                values = df[col].to_numpy()
                df[col] = _as_text(values) if col in text else _objects_typed(values)
        table = pa.Table.from_pandas(df, preserve_index=False)
    elif isinstance(metadata, pa.Table):
        table = metadata
    else:
        raise TypeError("metadata must be a pandas DataFrame or a pyarrow Table.")
    if table.num_rows != n:
        raise CellIndexError(f"metadata has {table.num_rows} rows for {n} embeddings.")
    names = table.schema.names
    if "cell_index" in names:
        kept = _kept_cell_index(names)
        table = table.rename_columns([kept if c == "cell_index" else c for c in names])
    return table.append_column("cell_index", pa.array(np.arange(start, start + n, dtype=np.int64)))


def _column_names(columns: Any) -> list[str]:
    """Metadata column names as given (one name, or several) as the index stores them: as
    text (a DataFrame's column ``0`` is stored as ``"0"``)."""
    several = isinstance(columns, Iterable) and not isinstance(columns, str | bytes)
    return [str(c) for c in (columns if several else [columns])]


def _kept_cell_index(names: list[str]) -> str:
    """The name a metadata column called cell_index is kept under (the index's own column
    holds each cell's position), said."""
    kept = "cell_index_obs"
    while kept in names:
        kept += "_"
    warn(
        f"the metadata column 'cell_index' is stored as {kept!r} in the index: 'cell_index' "
        "there holds each cell's position in the index."
    )
    return kept


def _objects_typed(values: np.ndarray) -> Any:
    """A column of Python objects as pandas' nullable booleans where its values are all
    flags, nullable Int64 where all whole numbers (as ``[True, None]`` or a column that
    ``pd.concat`` filled with NaN for a frame without it holds them), else as text with
    missing values kept missing, whole floats as ints (the collection's ``_as_text``:
    the text a filter's value meets)."""
    kind = pd.api.types.infer_dtype(values, skipna=True)
    if kind in ("boolean", "integer") and not pd.isna(values).all():
        try:
            return pd.array(values, dtype="boolean" if kind == "boolean" else "Int64")
        except (OverflowError, TypeError, ValueError):  # (beyond Int64: as text)
            pass
    return _as_text(values)


def _text_columns(schema: Any) -> frozenset[str]:
    """The columns of an Arrow ``schema`` that hold text (plain or dictionary-encoded)."""
    return frozenset(f.name for f in schema if _is_text_type(_value_type(f.type)))


def _value_type(kind: Any) -> Any:
    """An Arrow type, a dictionary's as its values' type."""
    pa = import_optional("pyarrow")
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _is_text_type(kind: Any) -> bool:
    pa = import_optional("pyarrow")
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _concat_metadata(old: Any, new: Any) -> Any:
    """The index's metadata with the new cells' appended, column by column.

    Types are promoted as pyarrow does (int to float, one dictionary with another); a
    categorical column met by plain values (or the reverse) is decoded on both sides and
    stays a categorical when it was one in the index. An ordered categorical keeps its
    order (:func:`_in_order`). Types that do not promote (text and numbers) are an error
    naming the column.
    """
    pa = import_optional("pyarrow")
    columns = []
    for name in old.schema.names:
        a, b = old.column(name), new.column(name)
        if len(b) and b.null_count == len(b):  # no values at all: missing ones of the index's
            b = pa.nulls(len(b), a.type)
        elif len(a) == 0:  # (an index of no cells: its columns' types were pandas' guesses)
            a = pa.nulls(0, b.type)
        if pa.types.is_dictionary(a.type) and a.type.ordered:
            a, b = _in_order(a, b, name)
        recode = pa.types.is_dictionary(a.type) != pa.types.is_dictionary(b.type)
        if recode:
            a, b = (
                c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for c in (a, b)
            )
        try:
            both = pa.concat_tables(
                [pa.table({name: a}), pa.table({name: b})], promote_options="permissive"
            ).column(name)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise CellIndexError(
                f"metadata column {name!r} holds {old.schema.field(name).type} in the index "
                f"and {new.schema.field(name).type} in the new cells: give the new cells' "
                "column the index's type."
            ) from None
        if recode and pa.types.is_dictionary(old.schema.field(name).type):
            both = both.dictionary_encode()
        columns.append(both)
    # pandas' record of each column's dtype stays for the columns whose type held; one
    # promoted (nullable Int64 met by floats) reads back as its new type
    changed = {
        name
        for name, col in zip(old.schema.names, columns, strict=True)
        if col.type != old.schema.field(name).type
    }
    # whole numbers and flags that now have missing values read back as pandas' nullable
    # Int64 / boolean (as pd.concat gives them), not as floats and objects
    # (also where the type widened: an int32 column met by Int64's gaps is Int64)
    gaps = {name for name, col in zip(old.schema.names, columns, strict=True) if col.null_count}
    meta = dict(old.schema.metadata or {})
    if (changed or gaps) and b"pandas" in meta:
        record = json.loads(meta[b"pandas"])
        kinds = dict(zip(old.schema.names, (c.type for c in columns), strict=True))
        entries = []
        for c in record.get("columns", []):
            name = c.get("name")
            if name in changed:  # now of the type it was promoted to
                kind = kinds[name]
                if name not in gaps or not (pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
                    continue  # (read back as that type's own)
                c = {**c, "pandas_type": "bool" if pa.types.is_boolean(kind) else str(kind)}
                c["metadata"] = None
            if name in gaps and c.get("pandas_type") in _NULLABLE:
                c["numpy_type"] = _NULLABLE[c["pandas_type"]]  # (a categorical's: its codes')
            entries.append(c)
        record["columns"] = entries
        meta[b"pandas"] = json.dumps(record).encode()
    return pa.Table.from_arrays(columns, names=old.schema.names).replace_schema_metadata(
        meta or None
    )


def _in_order(a: Any, b: Any, name: str) -> tuple[Any, Any]:
    """The index's ordered categorical column ``a`` and the new cells' ``b`` (categorical
    or plain) as one ordered dictionary: ``a``'s categories in their order where ``b`` has
    no other value; ``b``'s where it is ordered and orders ``a``'s the same way (categories
    put between them). An error where ``b`` orders ``a``'s categories otherwise, or brings
    values no order of ``b``'s places among them."""
    pa = import_optional("pyarrow")
    old, new = a.to_pandas(), b.to_pandas()
    order = list(old.cat.categories)
    ordered = isinstance(new.dtype, pd.CategoricalDtype) and bool(new.cat.ordered)
    theirs = list(new.cat.categories) if ordered else []
    shared = [c for c in theirs if c in set(order)]
    extra = [v for v in pd.unique(new.dropna()) if v not in set(order)]
    text = [all(isinstance(v, str) for v in values) for values in (order, extra)]
    if extra and order and text[0] != text[1]:
        raise CellIndexError(
            f"metadata column {name!r} holds {'text' if text[0] else 'numbers'} in the index "
            f"and {'text' if text[1] else 'numbers'} in the new cells "
            f"({', '.join(map(str, extra[:5]))}): give the new cells' column the index's type."
        )
    why = ""
    if shared != [c for c in order if c in set(theirs)]:
        why = f"the new cells order them otherwise ({' < '.join(map(str, shared))})"
    elif extra and len(shared) < len(order):  # (not ordered, or not among all of the index's)
        why = (
            f"the new cells bring values it lacks ({', '.join(map(str, extra[:5]))}) with "
            "no order that places them among its categories"
        )
    if why:
        raise CellIndexError(
            f"metadata column {name!r} is an ordered categorical in the index "
            f"({' < '.join(map(str, order))}), and {why}: give the new cells' column as an "
            "ordered categorical of every category in its order (the index's among them)."
        )
    if extra:
        order = theirs
    kind = pd.CategoricalDtype(order, ordered=True)
    a, b = (pa.chunked_array([pa.array(pd.Categorical(x, dtype=kind))]) for x in (old, new))
    return a, b


#: numpy's whole-number and boolean dtypes, and pandas' nullable ones that hold gaps
_NULLABLE = {
    "bool": "boolean",
    **{f"{u}int{b}": f"{u.upper()}Int{b}" for u in ("", "u") for b in (8, 16, 32, 64)},
}


def _expression(filter: FilterLike, schema: Any = None) -> Any:
    """A mapping filter as an Arrow expression, each value read as its column's type in
    ``schema`` (:func:`_as_column_type`); an expression as it is. A mapping's expression is
    the same whatever the order of its columns and of a column's values (a threshold
    calibrated with it is compared with the next call's by expression)."""
    pa = import_optional("pyarrow")
    pc = import_optional("pyarrow.compute")
    if isinstance(filter, Mapping):
        expr = None
        for col, value in sorted(filter.items(), key=lambda item: str(item[0])):
            field = pc.field(str(col))  # (the stored name: an int would be a position)
            values = _as_list(value)
            if isinstance(value, np.ndarray) and value.ndim == 0:
                value = value.item()
            unsigned64 = False  # (a uint64 column: its value set typed so)
            if schema is not None and str(col) in schema.names:
                kind = schema.field(str(col)).type
                given = values if values is not None else [value]
                values = [form for v in given for form in _as_column_type(v, kind)]
                unsigned64 = pa.types.is_uint64(_value_type(kind))
                if pa.types.is_float16(_value_type(kind)):  # (Arrow compares no halffloat:
                    field = field.cast(pa.float32())  # as float32, which holds each exactly)
            if values is not None:
                given = _canonical([v for v in values if not _missing(v)])
                value_set: Any = given
                if unsigned64 and given and all(type(v) is int for v in given):
                    # (as int64, values above its range overflowed, and the column was cast
                    # to int64 to compare; other integer columns' as int64, whatever their
                    # width: _as_column_type left out values beyond it)
                    value_set = pa.array(given, type=pa.uint64())
                # (isin of no values compares a null type with the column's: refused)
                term = field.isin(value_set) if given else pc.scalar(False)
                if any(_missing(v) for v in values):
                    term = term | field.is_null()
            elif _missing(value):
                term = field.is_null()
            else:
                term = field == value
            expr = term if expr is None else expr & term
        if expr is None:
            raise CellIndexError("an empty filter selects nothing; pass None to search all cells.")
        return expr
    if not isinstance(filter, pc.Expression):
        raise CellIndexError(
            f"a filter is a mapping of columns to values ({{'donor': ['d1', 'd2']}}) or a "
            f"pyarrow.compute.Expression, not {type(filter).__name__} ({filter!r})."
        )
    return filter


def _unread_values(filter: FilterLike, schema: Any) -> list[tuple[str, Any, list[str]]]:
    """Of a mapping ``filter``, each column of numbers or flags in ``schema`` with the text
    values that :func:`_as_column_type` does not read as its type: (column, its type, the
    values)."""
    if not isinstance(filter, Mapping):
        return []
    types = import_optional("pyarrow").types
    out = []
    for col, value in filter.items():
        if str(col) not in schema.names:
            continue
        kind = schema.field(str(col)).type
        typed = _value_type(kind)  # (only numbers and flags read text as their values)
        if not (types.is_integer(typed) or types.is_floating(typed) or types.is_boolean(typed)):
            continue
        listed = _as_list(value)
        given = listed if listed is not None else [value]
        text = [f for v in given for f in _as_column_type(v, kind) if isinstance(f, str)]
        if text:
            out.append((str(col), typed, text))
    return out


def _filter_text(filter: FilterLike) -> str:
    """A filter in one line, for a message (an Arrow expression prints over several)."""
    return repr(filter) if isinstance(filter, Mapping) else " ".join(str(filter).split())


def _canonical(values: list[Any]) -> list[Any]:
    """A filter column's values in one order, each once: by type, then value within one
    (values of a type that do not order among themselves keep the order given)."""
    by_type: dict[str, list[Any]] = {}
    for v in values:
        by_type.setdefault(type(v).__name__, []).append(v)
    out = []
    for name in sorted(by_type):
        group = by_type[name]
        try:
            group = sorted(group)
        except TypeError:
            out += group
            continue
        out += [v for i, v in enumerate(group) if i == 0 or v != group[i - 1]]
    return out


def _as_column_type(value: Any, kind: Any) -> list[Any]:
    """A filter's value as a column of Arrow type ``kind`` holds it (the forms it may take
    there), where it reads as one: text columns as text ("1015" for 1015 or 1015.0, and
    "True" and "1" for True or 1, as metadata written as text holds flags; as
    :class:`~cellsift.data.CellCollection`'s filters read them), whole-number columns from
    whole numbers, flags and their text ("1015", "1015.0"; a number not whole: no form, as
    it equals none of their values), flag columns from flags, 0/1 and "True"/"False"
    (another number: no form, as it equals neither), float columns from numbers and their
    text, in the column's precision. Other values stay as given (and a comparison of
    another type is an error naming the column's type and the values not read as it)."""
    pa = import_optional("pyarrow")
    if _missing(value):
        return [value]
    if isinstance(value, np.generic):
        value = value.item()
    kind = _value_type(kind)
    text = isinstance(value, str)
    if _is_text_type(kind):
        return [value] if text or isinstance(value, bytes) else filter_texts(value)
    if pa.types.is_boolean(kind):
        forms = {"True": True, "False": False, "true": True, "false": False}
        if text and value in forms:
            return [forms[value]]
        if not text and not isinstance(value, bool) and is_number(value):
            # 0/1 are the flags; another number is neither (pyarrow would call it True)
            return [bool(value)] if value in (0, 1) else []
        return [value]
    if pa.types.is_integer(kind):
        if text:  # (read exactly: "5", "5.0", "1e3"; a number not whole equals no value)
            try:
                exact = decimal.Decimal(value.strip())
            except decimal.InvalidOperation:
                return [value]
            if exact.is_nan():  # (as a float column reads "nan": the missing cells)
                return [math.nan]
            if exact.is_infinite() or (not exact.is_zero() and exact.adjusted() > 20):
                return []  # (beyond 64 bits: equals none of its values)
            if exact != exact.to_integral_value():
                return []
            whole = int(exact)
        elif isinstance(value, bool | int):
            whole = int(value)
        elif isinstance(value, float):
            if not value.is_integer():
                return []
            whole = int(value)
        else:
            return [value]
        info = np.iinfo(kind.to_pandas_dtype())  # (beyond the column's type: equals none)
        return [whole] if info.min <= whole <= info.max else []
    if pa.types.is_floating(kind):  # (numbers and flags as floats: 24, 24.0, "24" alike)
        if text:
            try:
                number = float(value)
            except ValueError:
                return [value]
        elif isinstance(value, bool) or is_number(value):
            try:
                number = float(value)
            except OverflowError:  # (a whole number beyond float's range: equals no cell)
                return []
        else:
            return [value]
        # in the column's precision (0.1 is a float32 column's 0.1), where it holds it: a
        # value beyond its range equals no cell (not its infinite ones)
        with np.errstate(over="ignore"):
            held = kind.to_pandas_dtype()(number)
        return [float(held)] if np.isfinite(held) or not np.isfinite(number) else []
    return [value]


def _as_list(value: Any) -> list[Any] | None:
    """The values of a filter value that lists several (a list, tuple, set, range, dict's
    keys, array, Series, Categorical or any other iterable but text); None for one value."""
    if value is None or isinstance(value, str | bytes | Mapping):
        return None
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return None
    return list(value) if isinstance(value, Iterable) else None


def _the_model_of(model: Any, metadata: Any) -> str | None:
    """The fingerprint of the model that embedded cells: ``model``'s (a model, hashed once,
    or its fingerprint) where given, else the one :func:`load_embeddings` notes in
    ``metadata``; a :class:`CellIndexError` where both are given and differ."""
    noted = metadata.attrs.get("model_fingerprint") if isinstance(metadata, pd.DataFrame) else None
    given = None if model is None else _fingerprint_of(model)
    _one_model(
        noted,
        given,
        "the embeddings' metadata notes another model (fingerprint {0}, as load_embeddings "
        "noted it) than the one given (fingerprint {1}): pass the model that embedded them "
        "(or no model: the noted one is taken), or embed the cells with this one; where the "
        "metadata is of another embedding of the cells, drop its note "
        "(metadata.attrs.pop('model_fingerprint')).",
    )
    return noted if given is None else given


def _one_model(a: str | None, b: str | None, message: str) -> None:
    """A :class:`CellIndexError` of ``message`` (the two fingerprints, shortened, in its
    ``{0}`` and ``{1}``) where both are known and differ."""
    if a is not None and b is not None and a != b:
        raise CellIndexError(message.format(a[:12], b[:12]))


def _fingerprint_of(model: Any) -> str:
    """A model's fingerprint (a string is one already)."""
    return model if isinstance(model, str) else model_fingerprint(model)


def _missing(value: Any) -> bool:
    """None, NaN, pandas' NA or NaT: a filter value that selects missing values."""
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or value is pd.NA
        or value is pd.NaT
    )


#: Columns per group of :func:`_top_first`'s prefilter on the CPU.
_TOP_GROUP = 16


def _top_first(scores: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``top`` highest scores and their columns, equal scores at the cut taken
    from the first columns (``torch.topk`` takes any of them: a search's hits would then
    depend on ``k``, or on the platform, where cells lie at one distance).

    On the CPU a prefilter first: the columns fall into groups (columns j, j + G, j + 2G,
    ...), and each row's ``top + 1`` best group maxima bound its ``top + 1`` best scores from
    below; only the groups reaching that bound are searched (the same hits: a row tied at
    the cut is searched whole, as before)."""
    m, n = scores.shape
    g = _TOP_GROUP
    groups = n // g
    if scores.device.type != "cpu" or top == 0 or top >= n or groups < 4 * (top + 1):
        return _top_first_all(scores, top)
    best = scores[:, : groups * g].view(m, g, groups).amax(1)  # (the groups' maxima)
    bound = torch.topk(best, top + 1, dim=1, sorted=False)[0].amin(1, keepdim=True)
    if bool(torch.isnan(bound).any()):  # (a NaN bounds nothing; embeddings refuse them)
        return _top_first_all(scores, top)
    width = int((best >= bound).sum(1).max())  # (more than top + 1: equal maxima)
    if width * g > n // 4:
        return _top_first_all(scores, top)
    picked = torch.topk(best, width, dim=1, sorted=False)[1]
    cols = (picked.unsqueeze(2) + torch.arange(0, groups * g, groups)).view(m, -1)
    if groups * g < n:  # (the last columns, in no group: always searched)
        cols = torch.cat([cols, torch.arange(groups * g, n).expand(m, -1)], 1)
    vals, at = torch.topk(torch.gather(scores, 1, cols), top + 1, dim=1)
    cols = torch.gather(cols, 1, at)
    tied = torch.nonzero(vals[:, top - 1] == vals[:, top]).ravel()
    vals, cols = vals[:, :top], cols[:, :top]
    if len(tied):  # (rare) searched whole, for the first columns at the cut
        vals[tied], cols[tied] = _top_first_all(scores[tied], top)
    return vals, cols


def _top_first_all(scores: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_top_first` over every column."""
    if top == 0 or top >= scores.shape[1]:  # (every column: no cut)
        return torch.topk(scores, top, dim=1)
    vals, cols = torch.topk(scores, top + 1, dim=1)  # (one more: is the cut between ties?)
    tied = torch.nonzero(vals[:, top - 1] == vals[:, top]).ravel()
    vals, cols = vals[:, :top], cols[:, :top]
    if len(tied):  # (rare: duplicated cells) above the cut, then the first at it
        sc, at = scores[tied], vals[tied, -1:]
        above = sc > at
        fill = top - above.sum(1, keepdim=True)
        keep = above | ((sc == at) & ((sc == at).cumsum(1) <= fill))
        c = torch.nonzero(keep)[:, 1].view(len(tied), top)
        vals[tied], cols[tied] = _merged_top(torch.gather(sc, 1, c), c, top)  # (by score)
    return vals, cols


def _merged_top(
    scores: torch.Tensor, cols: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` highest of each row's candidates (``scores`` at cells ``cols``), highest
    first, equal scores by cell position."""
    by_cell = torch.argsort(cols, dim=1, stable=True)
    scores, cols = torch.gather(scores, 1, by_cell), torch.gather(cols, 1, by_cell)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :top]
    return torch.gather(scores, 1, order), torch.gather(cols, 1, order)


def _pad(dist: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad to k columns with inf / -1 (fewer candidates than k)."""
    dist = dist.astype(np.float32)
    if dist.shape[1] < k:
        extra = k - dist.shape[1]
        dist = np.pad(dist, ((0, 0), (0, extra)), constant_values=np.inf)
        idx = np.pad(idx, ((0, 0), (0, extra)), constant_values=-1)
    return dist, idx.astype(np.int64)


def _list_order(score: np.ndarray, width: int) -> np.ndarray:
    """Each query's ``width`` nearest lists (columns of ``score``, its similarities to
    them), nearest first, equal similarities by list: the first ``width`` of its lists in
    that order, whatever ``width`` (a wider order goes on from a narrower one)."""
    n = score.shape[1]
    if width >= n:
        return np.argsort(-score, axis=1, kind="stable")
    least = -np.partition(-score, width - 1, axis=1)[:, width - 1 : width]  # the width-th
    above = score > least
    tied = score == least  # (of these, the first by list, as many as width leaves)
    taken = above | (tied & (np.cumsum(tied, axis=1) <= width - above.sum(1, keepdims=True)))
    part = (np.flatnonzero(taken) % n).reshape(len(score), width)  # (by list in each row)
    near = np.take_along_axis(score, part, 1)
    return np.take_along_axis(part, np.argsort(-near, axis=1, kind="stable"), 1)


def _merged_best(
    sim_a: np.ndarray, cells_a: np.ndarray, sim_b: np.ndarray, cells_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The best of two sets of candidates (of other cells) per query, as many as each
    holds: by similarity, the first set's first where equal."""
    sim = np.concatenate([sim_a, sim_b], axis=1)
    order = np.argsort(-sim, axis=1, kind="stable")[:, : sim_a.shape[1]]
    cells = np.take_along_axis(np.concatenate([cells_a, cells_b], axis=1), order, 1)
    return np.take_along_axis(sim, order, 1), cells


def _deepest(probed: np.ndarray, found: np.ndarray, valid: np.ndarray, n_lists: int) -> np.ndarray:
    """For each query, how deep in its probed lists (``probed``, nearest first) the
    deepest of its hits lies (1: the first list; 0: no hit); ``found``: each hit's list,
    ``valid``: which hits are cells."""
    rank = np.zeros((len(probed), n_lists), dtype=np.int64)
    np.put_along_axis(rank, probed, np.arange(1, probed.shape[1] + 1)[None, :], 1)
    return np.where(valid, np.take_along_axis(rank, found, 1), 0).max(1, initial=0)


def _drop_self(idx: np.ndarray, rows: np.ndarray | None, k: int) -> np.ndarray:
    """Each query's first k neighbours other than the query cell itself (-1: none), from a
    search's indices (rows None: queries that are not indexed cells, their first k)."""
    if rows is None:
        return np.ascontiguousarray(idx[:, :k])
    out = np.full((len(idx), k), -1, dtype=np.int64)
    for i, (r, self_row) in enumerate(zip(idx, rows, strict=True)):
        rest = r[r != self_row][:k]
        out[i, : len(rest)] = rest
    return out


#: Distances this close count as equal in calibration: float64 sums of float32 products
#: (computed alike for the exact and the approximate neighbours), a rounding apart at most
_SAME_DISTANCE = 1e-12


def _recall(found: np.ndarray, kth: np.ndarray) -> float:
    """Share of each query's k nearest cells found: ``found`` holds the distances of the k
    cells found (inf: none), ``kth`` the exact k-th nearest distance of each query."""
    return float((found <= kth[:, None] + _SAME_DISTANCE).mean())


def _least_nprobe(
    recall_at: Callable[[int], float], most: int, target_recall: float
) -> tuple[int, float]:
    """The fewest lists, up to ``most``, (doubling, then bisecting) whose recall reaches the
    target (``most`` where none does), and its recall; each number of lists searched once."""
    recall = functools.cache(recall_at)
    lo, hi = 0, 1
    while hi < most and recall(hi) < target_recall:
        lo, hi = hi, min(hi * 2, most)
    if recall(hi) < target_recall:  # (none reaches it: nothing to bisect)
        return hi, recall(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if recall(mid) >= target_recall else (mid, hi)
    return hi, recall(hi)


def _file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "blake2b": h.hexdigest()}
