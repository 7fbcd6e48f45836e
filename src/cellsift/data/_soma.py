"""TileDB-SOMA Experiments in the CELLxGENE Census layout."""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._utils import TILEDB_NO_SIGNAL_HANDLERS, import_optional, reclaim_signals, text_or_none
from .._warnings import warn
from .stores import CellStore
from .writers import SOMA_FRAME, SOMA_RENAMED, Format

#: TileDB settings of reads: result buffers of 128 MB (libtiledbsoma's default is 1 GiB per
#: buffer), so memory follows the batches read, not the library's defaults; and no
#: "preprocess tile merge" in the sparse global-order reader (on by default in TileDB
#: 2.30, which tiledbsoma 2.3 ships): a race in its parallel merge corrupts the heap
#: (TileDB-Inc/TileDB#5723, fixed after 2.30.0). Reads of the obs or var of a store of
#: several fragments (one per chunk written) crashed the process now and then: a
#: segfault in the merge's worker thread, or an abort in a later read. No signal handlers of
#: TileDB's (:data:`~cellsift._utils.TILEDB_NO_SIGNAL_HANDLERS`).
TILEDB_CONFIG: dict[str, Any] = {
    "soma.init_buffer_bytes": 128 << 20,
    "sm.query.sparse_global_order.preprocess_tile_merge": 0,
    **TILEDB_NO_SIGNAL_HANDLERS,
}


_F = TypeVar("_F", bound=Callable[..., Any])


def _reads(part: str) -> Callable[[_F], _F]:
    """A SOMA read whose array is missing or damaged (an interrupted copy: a lost array or
    fragment) raises tiledbsoma's error, which names a file deep in the store: said as a
    DataError naming the store, the part and the fix. A query that TileDB cancelled on
    Ctrl-C stays as it is (an interruption, not damage)."""

    def wrap(method: _F) -> _F:
        @functools.wraps(method)
        def reading(self: SomaStore, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except Exception as err:  # (tiledbsoma looked up here only: every read passes)
                if not isinstance(err, import_optional("tiledbsoma").SOMAError) or (
                    "Query cancelled" in str(err)
                ):
                    raise
                said = " ".join(str(err).split())  # (TileDB's lines, the file it lacks)
                said = said if len(said) <= 400 else said[:400] + " ..."
                raise self._error(
                    f"its {part} cannot be read ({type(err).__name__}: {said}): the store is "
                    "incomplete or corrupt (an interrupted copy?).",
                    "Copy the store again or re-create it.",
                ) from err

        return reading  # type: ignore[return-value]

    return wrap


#: Seconds after its last change that a fragment without its commit, newer than every
#: commit, is taken for a write in progress (warned of), not a lost commit (refused).
WRITE_GRACE = 60.0


def _check_commits(store: SomaStore, part: str, uri: str) -> None:
    """Every data fragment of a local array has its commit: TileDB reads a fragment whose
    commit file is missing as if it were not there, so a copy that stopped between an
    array's ``__fragments`` and its ``__commits`` would read cells or counts as absent,
    silently. A commit is a ``<fragment>.wrt`` file, or the fragment named in a file of
    consolidated commits (``.con``, ``.ignore``).

    Refused: a fragment without a commit that some commit was written after (a commit
    lost: written later, it should have been too), or an array without any commit. A
    fragment written after every commit is what a write in progress looks like (its commit
    comes last): TileDB reads without it, and a warning says so, within
    :data:`WRITE_GRACE` seconds of its last change; older, it is refused too (a copy that
    kept the files' times, ``cp -a``, and lost the newest commit; or a write that never
    finished). Arrays elsewhere (an object store's URI) are not listed."""
    path = uri.removeprefix("file://") if uri.startswith("file://") or "://" not in uri else None
    if path is None or not os.path.isdir(os.path.join(path, "__fragments")):
        return
    fragments = os.path.join(path, "__fragments")
    written = os.listdir(fragments)
    commits = os.path.join(path, "__commits")
    names = os.listdir(commits) if os.path.isdir(commits) else []
    committed = {n.removesuffix(".wrt") for n in names if n.endswith(".wrt")}
    lost = sorted(f for f in written if f not in committed)
    if not lost:
        return
    listed = b"".join(  # (named in consolidated commits: committed too)
        Path(commits, n).read_bytes() for n in names if not n.endswith(".wrt")
    )
    lost = [f for f in lost if f.encode() not in listed]
    if not lost:
        return
    last_commit = max((os.stat(os.path.join(commits, n)).st_mtime_ns for n in names), default=None)
    recent = time.time_ns() - int(WRITE_GRACE * 1e9)
    behind = []
    for f in lost:
        changed = os.stat(os.path.join(fragments, f)).st_mtime_ns
        if last_commit is None or changed <= last_commit or changed < recent:
            behind.append(f)
    n = len(written)
    if behind:
        raise store._error(
            f"its {part} holds {len(behind)} of {n} data fragments without their commit (e.g. "
            f"{behind[0]}: {commits} lacks it), which TileDB would read as absent: the store "
            "is incomplete or corrupt (an interrupted copy, or a write that did not finish?).",
            "Copy the store again or re-create it (a write that did not finish: remove that "
            "fragment's folder, which TileDB reads without).",
        )
    warn(
        f"{store.path}: its {part} holds {len(lost)} of {n} data fragments written after its "
        f"last commit and not committed (e.g. {lost[0]}): a write in progress, or one that "
        "did not finish; TileDB reads the store without them."
    )


class SomaStore(CellStore):
    """A TileDB-SOMA Experiment: obs, ``ms[measurement].var`` and ``X[layer]``.

    Rows are obs positions; the store maps them to ``soma_joinid`` (identical for
    experiments written by cellsift or ``tiledbsoma.io``).

    Parameters
    ----------
    path
        The experiment's URI (a directory).
    measurement
        Measurement name (Census: ``"RNA"``).
    layer
        X layer holding counts. Default: ``"raw"`` (Census, cellsift), else the experiment's
        only X layer (``tiledbsoma.io.from_anndata`` names the AnnData's X ``"data"``).
    var_id
        var column with gene ids. Default: ``"feature_id"`` (Census, cellsift), else the
        column ``tiledbsoma.io.from_anndata`` kept the AnnData's named var index in, else
        ``"var_id"`` (its name for an unnamed index).
    tiledb_config
        TileDB settings, over :data:`TILEDB_CONFIG`.
    """

    format: Format = "soma"
    #: Most cells read by one TileDB query.
    max_rows_per_query = 4096

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        layer: str | None = None,
        measurement: str = "RNA",
        var_id: str | None = None,
        tiledb_config: dict[str, Any] | None = None,
    ) -> None:
        self.measurement = measurement
        self.var_id = var_id
        self.tiledb_config = {**TILEDB_CONFIG, **(tiledb_config or {})}
        self._default_layer = layer is None
        super().__init__(path, layer=layer or "raw")
        self._check_layout()

    @_reads("measurement and X layers")
    def _check_layout(self) -> None:
        exp, measurement = self.handle, self.measurement
        incomplete = "it is incomplete (an ingest or a copy that did not finish?)."
        # (its members' names: "in" opens the member, and a damaged one is named where read)
        missing = [part for part in ("obs", "ms") if part not in list(exp.keys())]
        if missing:
            raise self._error(
                f"is an experiment without {' or '.join(missing)}: {incomplete}",
                "Re-create it, or copy it again.",
            )
        if measurement not in exp.ms:
            raise self._error(
                f"has no measurement {measurement!r} (it has {list(exp.ms.keys())}).",
                "Pass measurement= with one of these.",
            )
        missing = [part for part in ("var", "X") if part not in list(exp.ms[measurement].keys())]
        if missing:
            raise self._error(
                f"has a measurement {measurement!r} without {' or '.join(missing)}: {incomplete}",
                "Re-create it, or copy it again.",
            )
        layers = list(exp.ms[measurement].X.keys())
        # tiledbsoma.io writes an AnnData's raw (where scanpy keeps counts) as a measurement
        # "raw": the one X layer beside it is then the normalised values, not the counts
        raw_apart = measurement != "raw" and "raw" in exp.ms
        if self.layer not in layers and self._default_layer and len(layers) == 1:
            if not raw_apart:
                self.layer = layers[0]  # (tiledbsoma.io's "data")
        if self.layer in exp.ms[measurement].X:  # (opens it: a damaged array is named here)
            x = exp.ms[measurement].X[self.layer]
            ms = exp.ms[measurement]
            for part, array in (
                ("obs", lambda: exp.obs),
                ("var", lambda: ms.var),
                ("X", lambda: x),
            ):
                try:
                    uri = array().uri
                except import_optional("tiledbsoma").SOMAError:  # (named where it is read)
                    continue
                _check_commits(self, part, uri)
            kind = type(x).__name__
            if kind != "SparseNDArray":  # (tiledbsoma.io's X_kind=DenseNDArray)
                raise self._error(
                    f"holds X layer {self.layer!r} as a {kind}; cells are read from sparse "
                    "layers (SparseNDArray, as CELLxGENE Census and tiledbsoma.io by default "
                    "write them).",
                    "Ingest it again with tiledbsoma.io.from_anndata(..., "
                    "X_kind=tiledbsoma.SparseNDArray), or read it with tiledbsoma.io.to_anndata "
                    "and pass the AnnData.",
                )
            return
        default = ""
        if self._default_layer:
            default = f" (the default: the experiment has {len(layers)} X layers, not one)"
            if raw_apart and len(layers) == 1:
                default = " (the default; its one layer is not taken, as a measurement 'raw' is"
                default += " beside it)"
        fix = "Pass layer= with one of these."
        if raw_apart:
            fix += (
                " tiledbsoma.io keeps an AnnData's raw (counts, as scanpy leaves them) in the "
                "measurement 'raw': pass measurement='raw' to read those."
            )
        raise self._no_layer(
            f"has no X layer {self.layer!r}{default} in measurement {measurement!r} (it has "
            f"{layers}).",
            fix,
        )

    def _open(self) -> Any:
        soma = import_optional("tiledbsoma")
        try:
            context = soma.SOMATileDBContext(tiledb_config=self.tiledb_config)
            # (its links resolved here: TileDB reads "link/.." as text, the parent of the link)
            return soma.Experiment.open(os.path.realpath(self.file), context=context)
        except Exception as err:  # tiledbsoma raises several types for unreadable stores
            raise self._error(
                f"cannot be opened as a TileDB-SOMA Experiment ({type(err).__name__}: {err}).",
                "Check the path; re-create the store if it is corrupt.",
            ) from err
        finally:
            reclaim_signals()  # (TileDB took SIGINT as it opened the store)

    @cached_property
    @_reads("obs")
    def joinids(self) -> np.ndarray:
        tbl = self.handle.obs.read(column_names=["soma_joinid"]).concat()
        return np.sort(tbl.column("soma_joinid").to_numpy())

    @property
    def n_obs(self) -> int:
        return len(self.joinids)

    @cached_property
    def _contiguous(self) -> bool:
        j = self.joinids
        return len(j) == 0 or (j[0] == 0 and j[-1] == len(j) - 1)

    @cached_property
    @_reads("obs")
    def _obs_stored(self) -> dict[str, str]:
        """obs column -> its name in the store: all but ``soma_joinid`` and the obs names'
        (``obs_id``, or tiledbsoma.io's named index: :attr:`_obs_names_column`); the writer's input columns that it
        stored under another name (:data:`~cellsift.data.writers.SOMA_RENAMED`) under their
        own names."""
        obs = self.handle.obs
        names = self._obs_names_column
        stored = [n for n in obs.schema.names if n not in ("soma_joinid", names)]
        return _own_names(stored, _renamed(obs))

    @cached_property
    def _obs_names_column(self) -> str | None:
        """The obs column of the obs names: that of an AnnData's named index (``tiledbsoma.io``
        keeps it under its name, and says which), else ``obs_id`` (cellsift's writer,
        ``tiledbsoma.io`` for an unnamed index); None."""
        names = self.handle.obs.schema.names
        named = _original_index(self.handle.obs)  # (first: "obs_id" beside it is a column)
        if named is not None and named in names:
            return named
        return "obs_id" if "obs_id" in names else None

    @cached_property
    def _obs_info(self) -> tuple[str | None, set[str]]:
        """What cellsift's writer recorded of obs (:func:`_frame_info`), read once."""
        return _frame_info(self.handle.obs)

    @property
    def obs_columns(self) -> list[str]:
        """obs columns but the join ids and the obs names, under the writer's input names."""
        return list(self._obs_stored)

    @cached_property
    @_reads("obs")
    def obs_names(self) -> pd.Index | None:
        """The ``obs_id`` column (cellsift's SOMA writer and ``tiledbsoma.io`` keep the obs
        names there; ``tiledbsoma.io``, an AnnData's named index under its name), or None."""
        col = self._obs_names_column
        if col is None:
            return None
        tbl = self.handle.obs.read(column_names=["soma_joinid", col]).concat().to_pandas()
        names = tbl.sort_values("soma_joinid")[col].astype(str).to_numpy()
        return pd.Index(names, name=_index_name(self._obs_info, col, "obs_id", self.handle.obs))

    @_reads("obs")
    def _load_obs_column(self, name: str) -> Any:
        stored = self._obs_stored[name]
        tbl = self.handle.obs.read(column_names=["soma_joinid", stored]).concat()
        arr = tbl.column(stored)
        # integers and booleans with nulls as pandas' nullable arrays (not float / object),
        # and those the input held as such
        nullable = arr.null_count > 0 or stored in self._obs_info[1]
        values = _as_nullable(arr) if nullable and _nullable_kind(arr.type) else arr.to_pandas()
        # (by position: the column may be the input's own "soma_joinid")
        col = values.iloc[np.argsort(tbl.column("soma_joinid").to_numpy(), kind="stable")]
        if isinstance(col.dtype, pd.CategoricalDtype):  # an enumeration: its categories, order
            return col.array
        if col.dtype == object:
            # text as categories; missing values stay missing (not the text "None")
            return pd.Categorical(text_or_none(col))
        if isinstance(col.dtype, pd.api.extensions.ExtensionDtype):
            return col.array  # pandas' nullable numbers, with their missing values
        return col.to_numpy()

    @_reads("var")
    def _load_var(self) -> pd.DataFrame:
        frame = self.handle.ms[self.measurement].var
        tbl = frame.read().concat()
        var = tbl.to_pandas()
        # integers and booleans with nulls, and those the input held as nullable, as
        # pandas' nullable arrays (as obs columns are read: not float / object)
        info = _frame_info(frame)
        nullable = info[1] | {n for n in tbl.schema.names if tbl[n].null_count}
        for name in nullable & set(tbl.schema.names):
            if _nullable_kind(tbl.schema.field(name).type):
                var[name] = _as_nullable(tbl.column(name)).array
        var = var.sort_values("soma_joinid")
        var_id = self.var_id
        if var_id is None:  # cellsift's and Census' name, else tiledbsoma.io's
            named = _original_index(frame)  # (tiledbsoma.io: a named index, under its name)
            var_id = next(
                (c for c in ("feature_id", named, "var_id") if c is not None and c in var),
                "feature_id",
            )
        columns = [str(c) for c in var.columns if c != "soma_joinid"]
        if var_id not in columns:  # (soma_joinid: positions, no gene ids)
            also = "" if self.var_id is not None else " (nor 'var_id', tiledbsoma.io's default)"
            problem = f"var has no column {var_id!r}{also}."
            if var_id == "soma_joinid":
                problem = "var's 'soma_joinid' holds the join ids (positions), not gene ids."
            raise self._error(problem, f"Pass var_id= with one of {columns}.")
        var.index = pd.Index(
            var.pop(var_id).astype(str).to_numpy(),
            name=_index_name(info, var_id, "feature_id", frame),
        )
        var = var.drop(columns=["soma_joinid"])
        own = _own_names([str(c) for c in var.columns], _renamed(frame))
        return var.rename(columns={v: k for k, v in own.items() if k != v})

    @cached_property
    @_reads("var")
    def _gene_joinids(self) -> np.ndarray | None:
        """The var join ids in order, where they are not the genes' positions (0 to
        n_vars - 1; a store written by cellsift or ``tiledbsoma.io``'s are); else None."""
        frame = self.handle.ms[self.measurement].var
        j = np.sort(frame.read(column_names=["soma_joinid"]).concat()["soma_joinid"].to_numpy())
        return None if len(j) and j[0] == 0 and j[-1] == len(j) - 1 else j

    @cached_property
    def _gene_lookup(self) -> np.ndarray | None:
        """Each join id's gene position (-1: none) from 0 to the largest, where the join ids
        are not the positions and spread over few more numbers than genes (a lookup reads
        a query's values several times faster than a binary search); else None."""
        genes = self._gene_joinids
        if genes is None or not len(genes) or genes[0] < 0:
            return None
        if int(genes[-1]) >= 4 * len(genes) + 1024:  # (a table mostly empty)
            return None
        table = np.full(int(genes[-1]) + 1, -1, dtype=np.int32)
        table[genes] = np.arange(len(genes), dtype=np.int32)
        return table

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_gene_lookup", None)  # (made again where read: not sent to each worker)
        return state

    def _gene_positions(self, joinids: np.ndarray) -> np.ndarray:
        """The positions in var of the genes of X's values (their ``soma_dim_1``); a
        DataError where var lacks one (a store whose X and var do not agree)."""
        genes, table = self._gene_joinids, self._gene_lookup
        if genes is None:
            cols, held = joinids, (joinids >= 0) & (joinids < self.n_vars)
        elif table is not None:
            inside = (joinids >= 0) & (joinids < len(table))
            cols = table[np.where(inside, joinids, 0)]
            held = inside & (cols >= 0)
        else:
            cols = np.searchsorted(genes, joinids)
            held = cols < len(genes)
            held[held] = genes[cols[held]] == joinids[held]
        if not held.all():
            lost = int(joinids[~held][0])
            raise self._error(
                f"X layer {self.layer!r} holds values of the gene of join id {lost}, which "
                f"var (of {self.n_vars:,} genes) lacks: X and var do not agree.",
                "Re-create the store, or copy it again.",
            )
        return cols

    @property
    @_reads("X")
    def nnz(self) -> int | None:
        return int(self.handle.ms[self.measurement].X[self.layer].nnz)

    def _read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        # TileDB's memory grows with the points of one query (7.6 GB for 16k scattered cells):
        # read at most max_rows_per_query cells a query.
        n = self.max_rows_per_query
        if len(rows) <= n:
            return self._query(rows)
        return sp.vstack(
            [self._query(rows[i : i + n]) for i in range(0, len(rows), n)], format="csr"
        )

    @_reads("X")
    def _query(self, rows: np.ndarray) -> sp.csr_matrix:
        joinids = rows if self._contiguous else self.joinids[rows]
        x = self.handle.ms[self.measurement].X[self.layer]
        if len(rows) == 0:
            return sp.csr_matrix((0, self.n_vars), dtype=np.float32)
        coords = (
            slice(int(joinids[0]), int(joinids[-1]))
            if joinids[-1] - joinids[0] + 1 == len(joinids)
            else joinids
        )
        # TileDB's own order is ~10x faster to read than row-major; group rows here instead.
        tbl = x.read(coords=(coords,), result_order="auto").tables().concat()
        # position of each value's cell: a lookup table over the span of the joinids, O(n)
        lookup = np.empty(int(joinids[-1] - joinids[0]) + 1, dtype=np.int64)
        lookup[joinids - joinids[0]] = np.arange(len(joinids))
        pos = lookup[tbl.column("soma_dim_0").to_numpy() - joinids[0]]
        data = tbl.column("soma_data").to_numpy()
        cols = self._gene_positions(tbl.column("soma_dim_1").to_numpy())
        if len(pos) > 1 and np.any(pos[1:] < pos[:-1]):
            order = np.argsort(pos, kind="stable")
            pos, data, cols = pos[order], data[order], cols[order]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(np.bincount(pos, minlength=len(rows)), out=indptr[1:])
        # (values in Arrow's read-only memory where they are float32: a collection's read
        # copies them into its batch, and a gene reordering into its own)
        return sp.csr_matrix(
            (data.astype(np.float32, copy=False), cols.astype(np.int32), indptr),
            shape=(len(rows), self.n_vars),
        )


def _renamed(frame: Any) -> dict[str, str]:
    """``{stored name: input name}`` of the columns that cellsift's SOMA writer stored under
    another name (:data:`~cellsift.data.writers.SOMA_RENAMED`); none for other stores."""
    try:
        renamed = json.loads(frame.metadata.get(SOMA_RENAMED, "{}"))
    except (TypeError, ValueError):
        return {}
    if not isinstance(renamed, dict):
        return {}
    return {str(k): str(v) for k, v in renamed.items()}


def _own_names(stored: list[str], renamed: dict[str, str]) -> dict[str, str]:
    """``{name: stored name}`` of columns ``stored``: renamed columns under their input names
    (a name another column already has stays stored)."""
    names = set(stored)
    out: dict[str, str] = {}
    for n in stored:
        name = renamed.get(n, n)
        out[n if name in names or name in out else name] = n
    return out


def _nullable_kind(kind: Any) -> bool:
    """An Arrow type that pandas holds as a nullable array: integers, booleans."""
    pa = import_optional("pyarrow")
    return bool(pa.types.is_integer(kind) or pa.types.is_boolean(kind))


def _as_nullable(arr: Any) -> pd.Series:
    """An Arrow column of integers or booleans as pandas' nullable array of the same width
    (``Int32``, ``UInt8``, ``boolean``): missing values kept missing, not NaN in floats or
    None in objects."""
    pa = import_optional("pyarrow")

    def nullable(kind: Any) -> Any:
        if pa.types.is_boolean(kind):
            return pd.BooleanDtype()
        if pa.types.is_integer(kind):
            sign = "UInt" if pa.types.is_unsigned_integer(kind) else "Int"
            return pd.api.types.pandas_dtype(f"{sign}{kind.bit_width}")
        return None

    return arr.to_pandas(types_mapper=nullable)


def _frame_info(frame: Any) -> tuple[str | None, set[str]]:
    """What cellsift's SOMA writer recorded of a dataframe's input (:data:`~cellsift.data.
    writers.SOMA_FRAME`): its index's name, and its columns of pandas' nullable integers and
    booleans; none for other stores."""
    try:
        info = json.loads(frame.metadata.get(SOMA_FRAME, "{}"))
    except (TypeError, ValueError):
        return None, set()
    if not isinstance(info, dict):
        return None, set()
    name = info.get("index_name")
    nullable = info.get("nullable")
    return (
        name if isinstance(name, str) else None,
        {str(c) for c in nullable} if isinstance(nullable, list) else set(),
    )


def _index_name(
    info: tuple[str | None, set[str]], column: str, plain: str, frame: Any
) -> str | None:
    """The name of the index that the names in ``column`` of ``frame`` were: as cellsift's
    writer recorded it, where they are the names it wrote (``plain``, not another column
    named by ``var_id``), else the column's own where ``tiledbsoma.io`` wrote a named index
    under its name (which it records only for a named index; not ``soma_joinid``)."""
    recorded = info[0]  # (:func:`_frame_info` of ``frame``)
    if recorded is not None and column == plain:
        return recorded
    named = _original_index(frame)
    return column if named == column and column != "soma_joinid" else None


def _original_index(frame: Any) -> str | None:
    """The column ``tiledbsoma.io.from_anndata`` wrote a DataFrame's named index to (its
    ``soma_dataframe_original_index_name`` metadata), or None."""
    try:
        name = json.loads(frame.metadata.get("soma_dataframe_original_index_name", "null"))
    except (TypeError, ValueError):
        return None
    return name if isinstance(name, str) else None
