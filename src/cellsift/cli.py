"""The ``cellsift`` command: ``info``, ``convert``, ``fit``, ``embed``, ``index``, ``search``,
``annotate``, ``demo``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._utils import Terminated, logger, refuse_inside, terminated
from .errors import MIN_GENES_FIX

if TYPE_CHECKING:
    from .errors import TrainingInterrupted

__all__ = ["main"]


def _info(args: argparse.Namespace) -> int:
    from .data import open_store, resolve_paths

    for path in resolve_paths(args.path):
        store = open_store(path, layer=args.layer, **_soma_options(args))
        print(_describe(store))
    return 0


def _describe(store) -> str:  # type: ignore[no-untyped-def]
    import numpy as np
    import pandas as pd

    from ._utils import text_or_none
    from .data.genes import _cleaned, _mostly_ensembl, _names

    lines = [
        f"{store.path}",
        f"  format     {store.format}",
        f"  cells      {store.n_obs:,}",
        f"  genes      {store.n_vars:,}",
    ]
    if (nnz := store.nnz) is not None:
        density = nnz / max(store.n_obs * store.n_vars, 1)
        # (the matrix's stored entries, read from its row pointer: explicit zeros count)
        lines.append(f"  stored     {nnz:,} values ({density:.1%} of cells x genes)")
    names = store.var_names[:3].tolist()
    if names:  # (the kind the genes are aligned as: Ensembl ids where most are)
        ensembl = _mostly_ensembl(_cleaned(_names(store.var_names)))
        kind = "Ensembl ids" if ensembl else "symbols or other ids"
        more = ", ..." if store.n_vars > len(names) else ""
        lines.append(f"  var_names  {', '.join(names)}{more} ({kind})")
    if len(store.var.columns):
        lines.append(f"  var        {', '.join(map(str, store.var.columns))}")
    lines.append("  obs")
    for col in store.obs_columns:
        raw = pd.Series(store.obs_column(col))
        values = pd.Series(text_or_none(raw.array))  # (dates as dates)
        missing = int(values.isna().sum())  # counted apart, not shown as a value "nan"
        categorical = isinstance(raw.dtype, pd.CategoricalDtype)
        if categorical or pd.api.types.is_numeric_dtype(raw.dtype):
            # numbers in their order, not as text's; categories in theirs
            kept = raw.dropna().drop_duplicates().sort_values()
            uniq = pd.unique(np.asarray(text_or_none(kept.array), dtype=object))
        else:
            uniq = np.unique(values.dropna().to_numpy().astype(str))
        show = ", ".join(uniq[:4].tolist()) + (", ..." if len(uniq) > 4 else "")
        noun = "value" if len(uniq) == 1 else "values"
        lines.append(
            f"    {col:32s} {len(uniq):>7,} {noun}: {show}"
            + (f" ({missing:,} {'cell' if missing == 1 else 'cells'} missing)" if missing else "")
        )
    return "\n".join(lines)


def _convert(args: argparse.Namespace) -> int:
    from .data.convert import convert

    refuse_inside(args.output, the_input_store=args.input)
    out = convert(
        args.input,
        args.output,
        format=args.format,
        layer=args.layer,
        shard_size=args.shard_size,
        min_genes=args.min_genes,
        chunk_size=args.chunk_size,
        overwrite=args.overwrite,
        progress_bar=True,
        check_counts=not args.no_check_counts,
        source_options=_soma_options(args),
    )
    print(f"wrote {out}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from .data.collection import resolve_paths
    from .models import MetricModel
    from .tasks import embed_collection
    from .tasks.embed import refuse_inside_inputs

    refuse_inside(args.out, the_model_bundle=args.model)
    refuse_inside_inputs(args.out, resolve_paths(args.data))  # (a manifest's, a glob's too)
    model = MetricModel.load(args.model)
    out = embed_collection(
        model,
        args.data,
        args.out,
        layer=args.layer,
        batch_size=args.batch_size,
        devices=args.devices,
        overwrite=args.overwrite,
        progress_bar=True,
        check_counts=not args.no_check_counts,
        store_options=_soma_options(args),
        min_genes=args.min_genes,
    )
    print(f"wrote {out}")
    return 0


def _index(args: argparse.Namespace) -> int:
    from .tasks import CellIndex, load_embeddings
    from .tasks.index import AUTO_EXACT_BELOW, check_index_path

    refuse_inside(args.out, the_embeddings_store=args.embeddings)
    check_index_path(args.out, args.overwrite)  # refused before the work, not after it
    emb, meta = load_embeddings(args.embeddings)
    k = {} if args.k is None else {"k": args.k}  # (the index's default, where none is given)
    index = CellIndex.build(emb, meta, engine=args.engine, **k)
    if args.k is not None and index.engine == "exact":
        from ._warnings import warn

        why = "--engine exact"
        if args.engine != "exact":
            why = f"auto: fewer than {AUTO_EXACT_BELOW:,} cells"
        warn(
            f"--k {args.k} is not used: the index is exact ({why}), which searches every "
            "cell; --k sets the k an IVF index's recall is calibrated for."
        )
    index.save(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {index!r}")
    return 0


def _annotate(args: argparse.Namespace) -> int:

    from . import tl
    from ._utils import atomic_path, check_replaceable
    from .data.writers import check_named, is_h5ad_file, write_h5ad
    from .errors import ConfigError, DataError
    from .models import MetricModel
    from .tasks import CellIndex, KNNAnnotator
    from .tasks.annotate import calibration_conflict, without_abstention

    refuse_inside(args.out, the_model_bundle=args.model, the_index=args.index)
    # (the query itself may be written over: the output holds its cells and counts)
    if (
        args.calibrate_on is not None
        and Path(args.out).resolve() == Path(args.calibrate_on).resolve()
    ):
        raise ConfigError(
            f"{args.out} is the --calibrate-on file, which this command reads (and would "
            "replace with the annotated queries): write the output elsewhere."
        )
    check_named(  # (a name that says another kind of store)
        args.out,
        "h5ad",
        "annotate writes an h5ad file (the queries with their calls): name it *.h5ad, and "
        "convert it afterwards (cellsift convert) for a copy in another format.",
    )
    check_replaceable(
        Path(args.out), args.overwrite, is_h5ad_file, "an h5ad file"
    )  # before the work
    for option in ("calibrate_on", "calibrate_by", "quantile"):
        if getattr(args, option) is not None and args.no_abstain:
            raise without_abstention(f"--{option.replace('_', '-')}", "--no-abstain")
    if args.calibrate_layer is not None and args.calibrate_on is None:
        raise ConfigError(
            "--calibrate-layer locates the counts of the --calibrate-on file, which was not "
            "given: pass both, or neither (the reference then calibrates itself)."
        )
    # (the annotator's default quantile, where none is given)
    quantile = {} if args.quantile is None else {"quantile": args.quantile}
    if args.calibrate_on is not None and args.calibrate_by is not None:
        raise calibration_conflict("--calibrate-by", "--calibrate-on")
    model = MetricModel.load(args.model)
    index = CellIndex.load(args.index)
    index.check_model(model)  # before any embedding
    # the reference's labels read and checked (column, Cell Ontology terms) before any work;
    # by default as the model was trained: its label column, and plain votes for labels it
    # took as written (outside the Cell Ontology: cell lines, a lab's own)
    label_key, aware = tl.labels_of(index, model, args.label_key)
    annotator = KNNAnnotator(
        index,
        label_key=label_key,
        k=args.k,
        ontology_aware=aware if args.ontology is None else args.ontology,
        abstain_on=args.abstain_on,
        min_support=args.min_support,
    )
    # the reference cells that vote, checked before any embedding
    selection: dict[str, Any] = {"safelist": args.safelist, "blocklist": args.blocklist}
    if args.filter:
        selection["filter"] = args.filter
    annotator.check_selection(**selection)
    if args.calibrate_by is not None and args.calibrate_by not in index.metadata_columns:
        raise ConfigError(
            f"--calibrate-by {args.calibrate_by!r}: the index metadata has no such column "
            f"(it has {', '.join(map(repr, index.metadata_columns))})."
        )
    adata = _read_h5ad(args.data)
    if adata.n_obs == 0:  # (as cellsift embed: an empty query is a mistake, not a result)
        raise DataError(f"{args.data}: no cells to annotate.")
    check = not args.no_check_counts
    if args.drop_empty:
        adata = _with_counts(adata, model, args.layer, str(args.data), check, over=args.out)
    # a calibration on the reference itself first (what it meets, one group or too few
    # cells, is said before the queries are embedded); on held-out cells after the queries
    # are embedded (a bad query file is said before those are)
    if not args.no_abstain and args.calibrate_on is None:
        annotator.calibrate(group_key=args.calibrate_by, **quantile, **selection)
    tl.embed(adata, model, layer=args.layer, source=str(args.data), check_counts=check)
    if not args.no_abstain and args.calibrate_on is not None:
        # its counts where --calibrate-layer says (X: "X"), else where the queries' are
        place = args.layer if args.calibrate_layer is None else args.calibrate_layer
        calibration = _read_h5ad(args.calibrate_on)
        if args.drop_empty:
            with _hints_for("--calibrate-layer"):
                calibration = _with_counts(
                    calibration,
                    model,
                    None if place == "X" else place,
                    str(args.calibrate_on),
                    check,
                )
        with _hints_for("--calibrate-layer"):
            tl.embed(
                calibration,
                model,
                layer=None if place == "X" else place,
                source=str(args.calibrate_on),
                check_counts=check,
            )
        annotator.calibrate(calibration.obsm["X_cellsift"], **quantile, **selection)
    tl.annotate(adata, annotator, **selection)
    with atomic_path(
        args.out, overwrite=args.overwrite, replaces=is_h5ad_file, what="an h5ad file"
    ) as tmp:
        write_h5ad(adata, tmp)
    counts = adata.obs["cellsift_cell_type"].value_counts()
    print(f"wrote {args.out}: {adata.n_obs:,} cell{'' if adata.n_obs == 1 else 's'} annotated")
    for name, c in counts.head(15).items():
        print(f"  {c:>9,}  {name}")
    return 0


#: The tables ``cellsift search`` writes, by their names' suffix.
_TABLES = {".parquet": "parquet", ".csv": ",", ".tsv": "\t"}


def _is_table(path: Path) -> bool:
    """:data:`~cellsift._utils.Replaceable` of ``cellsift search``'s outputs: a file named
    as one of :data:`_TABLES`."""
    return path.is_file() and path.suffix.lower() in _TABLES


def _search(args: argparse.Namespace) -> int:
    import numpy as np

    from . import tl
    from ._utils import atomic_path, check_replaceable, rename_apart
    from .errors import ConfigError, DataError
    from .models import MetricModel
    from .tasks import CellIndex, SearchResult
    from .tasks.index import drop_beyond

    out = Path(args.out)
    refuse_inside(args.out, the_model_bundle=args.model, the_index=args.index)
    if _replaces_the_file(out, Path(args.data)):
        raise ConfigError(
            f"{args.out} is the query file, which this command reads (and would replace with "
            "the table of hits): write the output elsewhere."
        )
    if out.suffix.lower() not in _TABLES:
        raise ConfigError(
            f"{args.out}: search writes a table of hits; name it *.parquet, *.csv or *.tsv "
            "(its suffix says which)."
        )
    check_replaceable(out, args.overwrite, _is_table, "a table of hits")  # before the work
    if args.groupby is not None and args.centroid:
        raise ConfigError(
            "--groupby searches with each group's centroid, --centroid with the centroid of "
            "every cell (or of --cells): pass one of them."
        )
    centroids = args.centroid or args.groupby is not None
    if args.drop_empty and centroids:
        raise ConfigError(
            "--drop-empty leaves out query cells without counts in the model's genes, which a "
            "centroid's sum leaves out anyway: pass it without --centroid and --groupby."
        )
    if args.no_qc and not args.centroid:
        raise ConfigError(
            "--no-qc leaves out the query-coherence check of a --centroid search; other "
            "searches have none: pass it with --centroid, or leave it out."
        )
    model = MetricModel.load(args.model)
    index = CellIndex.load(args.index)
    index.check_model(model)  # before any embedding
    search: dict[str, Any] = {"filter": args.filter} if args.filter else {}
    columns = None if args.columns is None else list(dict.fromkeys(args.columns))  # (once)
    for column in [*(columns or []), *([args.summary_by] if args.summary_by else [])]:
        if column not in index.metadata_columns:
            held = ", ".join(map(repr, index.metadata_columns)) or "none: it was built without"
            raise ConfigError(f"{column!r}: the index metadata has no such column (it has {held}).")
    adata = _read_h5ad(args.data)
    rows = np.arange(adata.n_obs)  # (the query cells' rows in the file)
    if args.cells:
        rows = _cells_where(adata, args.cells, args.data)
        adata = adata[rows].copy()
    if adata.n_obs == 0:
        raise DataError(f"{args.data}: no cells to search with.")
    check = not args.no_check_counts
    if args.groupby is not None:
        if args.groupby not in adata.obs:
            raise ConfigError(
                f"--groupby {args.groupby!r}: {args.data} has no such obs column (it has "
                f"{', '.join(map(repr, map(str, adata.obs.columns)))})."
            )
        without = int(adata.obs[args.groupby].isna().sum())
        if without == adata.n_obs:
            raise DataError(
                f"{args.data}: none of the {adata.n_obs:,} cells searched with has a value in "
                f"--groupby {args.groupby!r}; name a column of groups (clusters, samples)."
            )
        if without:
            print(f"{args.data}: left out {without:,} cells without a value in {args.groupby!r}")
        by_group = tl.search_clusters(
            adata,
            model,
            index,
            args.groupby,
            k=args.k,
            layer=args.layer,
            check_counts=check,
            **search,
        )
        names = np.array(list(by_group), dtype=object)
        result = SearchResult(
            np.concatenate([r.distances for r in by_group.values()]),
            np.concatenate([r.indices for r in by_group.values()]),
            index,
        )
    elif args.centroid:
        result = tl.search_centroid(
            adata,
            model,
            index,
            k=args.k,
            layer=args.layer,
            qc=not args.no_qc,
            check_counts=check,
            **search,
        )
        names = np.array(["centroid"], dtype=object)
    else:
        if args.drop_empty:
            keep = _counted(adata, model, args.layer, str(args.data), check)
            if keep is not None:
                adata, rows = adata[keep].copy(), rows[keep]
        tl.embed(adata, model, layer=args.layer, source=str(args.data), check_counts=check)
        result = index.search(adata.obsm["X_cellsift"], args.k, **search)
        names = adata.obs_names.to_numpy(dtype=object)
    if args.max_distance is not None:  # (every mode's hits alike)
        drop_beyond(result.distances, result.indices, args.max_distance)
    if columns is not None and "obs_name" in index.metadata_columns:
        columns = ["obs_name", *(c for c in columns if c != "obs_name")]  # (which cell)
    table = result.metadata(columns)
    # the hit's row in the index (named or not), and each query cell's row in the query
    # file (obs names may repeat); metadata columns of those names are kept, renamed
    own = ["cell_index", *([] if centroids else ["query_row"])]
    table = table.rename(
        columns=rename_apart(
            map(str, table.columns[3:]),
            lambda c: f"metadata_{c}" if c in own else None,
            reserved=[*table.columns[:3], *own],
        )
    )
    q = table["query"].to_numpy()
    table.insert(3, "cell_index", result.indices[q, table["rank"].to_numpy()])
    if "obs_name" in table:  # (which cell, beside its distance)
        table.insert(4, "obs_name", table.pop("obs_name"))
    if not centroids:
        table.insert(1, "query_row", rows[q])
    table["query"] = names[q].astype(str)
    with atomic_path(
        out, overwrite=args.overwrite, replaces=_is_table, what="a table of hits"
    ) as tmp:
        kind = _TABLES[out.suffix.lower()]
        if kind == "parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, sep=kind, index=False)
    queries = len(names)
    print(
        f"wrote {args.out}: {len(table):,} hit{'' if len(table) == 1 else 's'} of {queries:,} "
        f"{'quer' + ('y' if queries == 1 else 'ies')}"
    )
    if args.centroid and result.qc is not None:
        qc = result.qc
        verdict = (
            "coherent" if qc.coherent else "heterogeneous: its subpopulations find other cells"
        )
        print(f"query coherence {qc.coherence:.3f} (threshold {qc.threshold:.2f}): {verdict}")
    if args.summary_by is not None:
        summary = result.summary(args.summary_by)
        print(summary.head(15).to_string())
    return 0


def _cells_where(adata: Any, wanted: dict[str, list[str]], source: str) -> Any:
    """Rows of the cells whose obs hold the ``--cells`` values (a column given again: any of
    its values; other columns: all), each read as its column's type, as ``--filter`` reads
    the index metadata; an error where a column is missing or no cell is left."""
    from .errors import ConfigError, DataError
    from .tasks.index import CellIndexError, frame_rows_where

    for column in wanted:
        if column not in adata.obs:
            raise ConfigError(
                f"--cells {column}=...: {source} has no obs column {column!r} (it has "
                f"{', '.join(map(repr, map(str, adata.obs.columns)))})."
            )
    try:
        rows = frame_rows_where(adata.obs[list(wanted)], wanted, f"{source}'s obs")
    except CellIndexError as err:
        raise ConfigError(f"--cells: {err}") from None
    if len(rows) == 0:
        said = "; ".join(f"{c} in {v}" for c, v in wanted.items())
        raise DataError(f"{source}: no cell has {said} (--cells).")
    return rows


def _path(text: str) -> str:
    """A path argument: not empty (an empty one would be read as the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name a file or folder")
    return text


def _filter_term(text: str) -> tuple[str, str]:
    """``--filter COLUMN=VALUE``: the column and the value (text, read as the column's type)."""
    column, sep, value = text.partition("=")
    if not sep or not column.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not COLUMN=VALUE (e.g. tissue=blood)")
    return column.strip(), value


def _replaces_the_file(out: Path, source: Path) -> bool:
    """Would writing ``out`` (a file put in place of the entry it names) replace the file
    ``source``? A link named as ``out`` is replaced itself, the file left as it is (a
    symbolic link; a hard link, the file's other name, keeps it); the file's own entry,
    however spelt (a case-insensitive file system), is replaced."""
    if Path(os.path.realpath(out.parent)) / out.name == Path(os.path.realpath(source)):
        return True
    try:
        same = os.path.samefile(out, source)
    except OSError:  # (no output yet)
        return False
    return same and not out.is_symlink() and out.stat().st_nlink == 1


def _with_counts(
    adata: Any, model: Any, layer: str | None, source: str, check: bool, over: str | None = None
) -> Any:
    """``adata`` without its cells that have no counts in the model's genes (``--drop-empty``:
    :func:`_counted`)."""
    keep = _counted(adata, model, layer, source, check, over)
    return adata if keep is None else adata[keep].copy()


def _counted(
    adata: Any, model: Any, layer: str | None, source: str, check: bool, over: str | None = None
) -> Any:
    """Which cells of ``adata`` have counts in the model's genes (None: all), those left out
    said in a line; an error where none is left, or where ``over`` (the output) is the file
    ``source`` and cells would be left out: it would be written without them."""
    import numpy as np

    from .errors import ConfigError, DataError

    keep = (
        np.diff(model.aligned_counts(adata, layer=layer, check_counts=check, source=source).indptr)
        > 0
    )
    if keep.all():
        return None
    if not keep.any():
        raise DataError(
            f"{source}: none of its {adata.n_obs:,} cells has counts in the model's genes."
        )
    if over is not None and _replaces_the_file(Path(over), Path(source)):
        raise ConfigError(
            f"{over} is the query file, and --drop-empty leaves {int((~keep).sum()):,} of its "
            f"{adata.n_obs:,} cells out (no counts in the model's genes): written over it, "
            "they would be lost. Write the output elsewhere, or annotate every cell (without "
            "--drop-empty: the cells without counts are named in an error)."
        )
    print(
        f"{source}: left out {int((~keep).sum()):,} of {adata.n_obs:,} cells without counts in the model's genes"
    )
    return keep


def _read_h5ad(path: str) -> Any:
    """An h5ad read whole, or a one-line error naming the file."""
    import anndata as ad

    from .data.stores import refuse_other
    from .errors import DataError

    refuse_other(Path(path), "cells")
    if Path(path).is_dir():
        raise DataError(f"{path} is a folder: this command reads an h5ad file of counts.")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        return ad.read_h5ad(path)
    except OSError as err:  # h5py: truncated, not HDF5
        raise DataError(
            f"{path} cannot be read as HDF5 ({err}); the file is truncated, corrupt or not an "
            "h5ad. Re-create or re-download it."
        ) from err


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    given = {} if args.epochs is None else {"epochs": args.epochs}
    return run_demo(args.out, synthetic=args.synthetic, n_cells=args.n_cells, **given)


def _at_least(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``least`` (else argparse's one-line error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
        return value

    return parse


def _distance(text: str) -> float:
    """An argparse type: a cosine distance, 0 to 2."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a cosine distance (0 to 2)")
    return value


def _share(*, zero: bool) -> Callable[[str], float]:
    """An argparse type: a share below 1, from 0 where ``zero``, else above it (else
    argparse's one-line error)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (0.0 <= value if zero else 0.0 < value) or not value < 1.0:
            least = "at least 0" if zero else "above 0"
            raise argparse.ArgumentTypeError(f"must be {least} and below 1, not {text}")
        return value

    return parse


class _Terms(argparse.Action):
    """Gathers ``COLUMN=VALUE`` terms (:func:`_filter_term`), given as often as wanted, as a
    filter mapping: ``{column: [values]}`` (a column given again: any of its values)."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        column, value = values
        terms = dict(getattr(namespace, self.dest) or {})
        terms[column] = [*terms.get(column, []), value]
        setattr(namespace, self.dest, terms)


def _add_terms(p: argparse.ArgumentParser, option: str, help: str) -> None:
    """An option of ``COLUMN=VALUE`` terms, given as often as wanted (``--filter``), read
    as a filter mapping (:class:`_Terms`)."""
    p.add_argument(
        option, action=_Terms, type=_filter_term, default=None, metavar="COLUMN=VALUE", help=help
    )


def _add_model_index_data(p: argparse.ArgumentParser, data: str) -> None:
    """The arguments of a command that embeds an h5ad's cells and meets an index with them:
    the model bundle, the index and the h5ad (``data``: its help)."""
    p.add_argument("model", type=_path, help="the model bundle that embedded the index")
    p.add_argument("index", type=_path, help="a CellIndex directory (cellsift index)")
    p.add_argument("data", type=_path, help=data)


def _add_soma_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TileDB-SOMA stores")
    g.add_argument("--measurement", default=None, help="the measurement (default: RNA)")
    g.add_argument(
        "--var-id",
        default=None,
        help="the var column of gene ids (default: feature_id, else where tiledbsoma.io "
        "put the AnnData's var index)",
    )


def _soma_options(args: argparse.Namespace) -> dict[str, Any]:
    """The store options the SOMA flags give (none where they were not given)."""
    names = {"measurement": args.measurement, "var_id": args.var_id}
    return {k: v for k, v in names.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellsift", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what a store (h5ad, Zarr, SOMA, manifest) holds")
    p.add_argument("path", type=_path)
    p.add_argument("--layer", default=None, help="counts location: a layer name or 'raw'")
    _add_soma_options(p)
    p.set_defaults(func=_info)

    p = sub.add_parser("convert", help="convert between h5ad, Zarr and TileDB-SOMA")
    p.add_argument("input", type=_path)
    p.add_argument(
        "output", type=_path, help="*.h5ad, *.zarr or *.soma (a directory with --shard-size)"
    )
    p.add_argument("--format", choices=["h5ad", "zarr", "soma"], default=None)
    p.add_argument("--layer", default=None, help="counts location in the input")
    p.add_argument("--shard-size", type=_at_least(1), default=None, help="cells per output shard")
    p.add_argument(
        "--min-genes", type=_at_least(0), default=None, help="drop cells with fewer genes"
    )
    p.add_argument(
        "--chunk-size", type=_at_least(1), default=50_000, help="cells per write (default: 50000)"
    )
    p.add_argument(
        "--no-check-counts",
        action="store_true",
        help="convert values that are not raw counts (e.g. log-normalised) as they are",
    )
    p.add_argument("--overwrite", action="store_true")
    _add_soma_options(p)
    p.set_defaults(func=_convert)

    sub.add_parser(
        "fit",
        help="train a model with a LightningCLI config (cellsift fit --config configs/metric.yaml)",
        add_help=False,
    )

    p = sub.add_parser("embed", help="embed every cell of a collection with a model bundle")
    p.add_argument(
        "model", type=_path, help="a model bundle directory (MetricModel.save, cellsift fit)"
    )
    p.add_argument("data", type=_path, help="stores: a path, a glob or a manifest")
    p.add_argument(
        "out", type=_path, help="the embeddings store to write (a directory, e.g. emb.zarr)"
    )
    p.add_argument("--layer", default=None, help="counts location: a layer name or 'raw'")
    p.add_argument(
        "--batch-size", type=_at_least(1), default=8192, help="cells per batch (default: 8192)"
    )
    p.add_argument(
        "--devices",
        type=_at_least(1),
        default=1,
        help="processes, one shard each (one per GPU; gloo on the CPU); a killed run resumes "
        "(default: 1)",
    )
    p.add_argument(
        "--min-genes",
        type=_at_least(0),
        default=None,
        help="leave out cells with fewer genes detected (1: cells without counts)",
    )
    p.add_argument(
        "--no-check-counts",
        action="store_true",
        help="embed values that are not raw counts, and cells without counts, as they are",
    )
    p.add_argument("--overwrite", action="store_true")
    _add_soma_options(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser("index", help="build a searchable CellIndex from an embeddings store")
    p.add_argument("embeddings", type=_path, help="written by cellsift embed")
    p.add_argument("out", type=_path, help="the index directory to write")
    p.add_argument(
        "--engine",
        choices=["auto", "exact", "ivf"],
        default="auto",
        help="exact search or faiss IVF (default: auto, exact below 50,000 cells)",
    )
    p.add_argument(
        "--k",
        type=_at_least(1),
        default=None,
        help="k the IVF recall is calibrated for (default: 50; an exact index has no use for it)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_index)

    p = sub.add_parser("search", help="search a CellIndex with an h5ad's cells or centroids")
    _add_model_index_data(p, "an h5ad of raw counts: the queries")
    p.add_argument(
        "out",
        type=_path,
        help="the table of hits to write (*.parquet, *.csv or *.tsv): one row per query and "
        "rank, with query, query_row (its row in DATA; not for centroids), rank, distance, "
        "the hit's cell_index and index metadata",
    )
    p.add_argument("--layer", default=None, help="counts location: a layer name or 'raw'")
    p.add_argument("--k", type=_at_least(1), default=50, help="hits per query (default: 50)")
    _add_terms(
        p,
        "--cells",
        "search with the query cells whose obs COLUMN holds VALUE, read as the column's "
        "type (given again for the same column: any of the values; for other columns: all of "
        "them); default: every cell",
    )
    p.add_argument(
        "--centroid",
        action="store_true",
        help="one search with the centroid of the cells (their counts summed, embedded), "
        "checked for query coherence (do the cells' subpopulations find the same cells?)",
    )
    p.add_argument(
        "--groupby",
        default=None,
        metavar="COLUMN",
        help="one centroid search per group of this obs column (clusters, samples)",
    )
    p.add_argument(
        "--no-qc", action="store_true", help="leave out --centroid's query-coherence check"
    )
    _add_terms(
        p,
        "--filter",
        "search the indexed cells whose metadata COLUMN holds VALUE (given again for "
        "the same column: any of the values; for other columns: all of them)",
    )
    p.add_argument(
        "--max-distance",
        type=_distance,
        default=None,
        help="leave out hits farther than this cosine distance (0 to 2)",
    )
    p.add_argument(
        "--columns",
        nargs="+",
        action="extend",
        default=None,
        metavar="COLUMN",
        help="the index metadata columns written with each hit (default: all; the hit's "
        "obs_name always, where the index holds the cells' names)",
    )
    p.add_argument(
        "--summary-by",
        default=None,
        metavar="COLUMN",
        help="print the hits counted by this index metadata column (a study, tissue or "
        "disease column)",
    )
    p.add_argument(
        "--drop-empty",
        action="store_true",
        help="leave out query cells without counts in the model's genes, saying how many; "
        "by default they are an error",
    )
    p.add_argument(
        "--no-check-counts",
        action="store_true",
        help="embed values that are not raw counts, and cells without counts, as they are",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_search)

    p = sub.add_parser("annotate", help="annotate an h5ad by kNN against a CellIndex")
    _add_model_index_data(p, "an h5ad of raw counts to annotate")
    p.add_argument("out", type=_path, help="the annotated h5ad to write")
    p.add_argument("--layer", default=None, help="counts location: a layer name or 'raw'")
    p.add_argument(
        "--label-key",
        default=None,
        help="the index metadata's column of labels (default: the one the model trained on)",
    )
    p.add_argument("--k", type=_at_least(1), default=50, help="neighbours that vote (default: 50)")
    p.add_argument(
        "--ontology",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Cell Ontology votes (an ancestor where the neighbours' types split), or "
        "--no-ontology: plain majority votes (default: as the model was trained)",
    )
    p.add_argument(
        "--min-support",
        type=_share(zero=True),
        default=0.5,
        help="a call needs more than this share of the k votes, else 'unknown'; 0: the label "
        "with most votes (default: 0.5, a majority). With --ontology, the call is the most "
        "specific term holding more than this share (a vote counts for the label's "
        "ancestors too): a low value calls subtypes few neighbours voted for",
    )
    p.add_argument(
        "--no-abstain",
        action="store_true",
        help="never call 'unknown' on distance (a call still needs more than --min-support "
        "of the votes: with plain votes, --min-support 0 calls every cell)",
    )
    p.add_argument(
        "--drop-empty",
        action="store_true",
        help="leave out cells without counts in the model's genes (of the data and of "
        "--calibrate-on), saying how many; by default they are an error",
    )
    p.add_argument(
        "--no-check-counts",
        action="store_true",
        help="embed values that are not raw counts, and cells without counts, as they are",
    )
    p.add_argument(
        "--abstain-on",
        choices=["mean", "nearest"],
        default="mean",
        help="distance compared with the threshold: mean over the k voters, or the nearest's "
        "(default: mean)",
    )
    p.add_argument(
        "--quantile",
        type=_share(zero=False),
        default=None,
        help="abstention threshold: cells of known types call 'unknown' with probability at "
        "most 1 - quantile (default: 0.99)",
    )
    p.add_argument(
        "--calibrate-on",
        type=_path,
        default=None,
        metavar="H5AD",
        help="held-out labelled cells (not trained on, not indexed) to set the abstention "
        "threshold from; default: the reference itself",
    )
    p.add_argument(
        "--calibrate-layer",
        default=None,
        metavar="PLACE",
        help="counts location in the --calibrate-on file: a layer name, 'raw' or 'X' "
        "(default: --layer's)",
    )
    p.add_argument(
        "--calibrate-by",
        default=None,
        metavar="COLUMN",
        help="without --calibrate-on: score each sampled reference cell by its nearest cells "
        "of other groups of this index metadata column (a study or donor column: new "
        "studies sit farther than a study's cells from each other)",
    )
    p.add_argument(
        "--safelist",
        nargs="+",
        action="extend",
        default=None,
        metavar="LABEL",
        help="vote with the reference cells of these labels only (exactly these, not their "
        "subtypes; with --ontology a CL id or name each; given again: those labels too)",
    )
    p.add_argument(
        "--blocklist",
        nargs="+",
        action="extend",
        default=None,
        metavar="LABEL",
        help="leave the reference cells of these labels out of the votes",
    )
    _add_terms(
        p,
        "--filter",
        "vote with the reference cells whose index metadata COLUMN holds VALUE (given "
        "again for the same column: any of the values; for other columns: all of them)",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_annotate)

    from .demo import EPOCHS, MIN_CELLS, SYNTHETIC_CELLS

    p = sub.add_parser("demo", help="run the main job on the real data (or a synthetic atlas)")
    p.add_argument(
        "--out", type=_path, default="demo_out", help="output folder (default: demo_out)"
    )
    p.add_argument("--synthetic", action="store_true", help="use a synthetic atlas")
    p.add_argument(
        "--n-cells",
        type=_at_least(MIN_CELLS),
        help=f"a synthetic atlas of this many cells (>= {MIN_CELLS}), even where the real data "
        f"is found (default with --synthetic: {SYNTHETIC_CELLS})",
    )
    p.add_argument(
        "--epochs",
        type=_at_least(1),
        help=f"epochs of training (default: {EPOCHS}; fewer: a quicker run, a weaker model)",
    )
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in given if not a.startswith("-")), "")
    with _warnings_in_one_line(command):
        return _main(given)


@contextlib.contextmanager
def _warnings_in_one_line(command: str = "") -> Iterator[None]:
    """cellsift's warnings printed as ``cellsift: warning: ...``, one line each, not with
    the file, line and source line of the library's code that raised them; a hint in
    Python code where ``command`` has a way of its own (:data:`_AS_WORDS`) in its words."""
    import warnings

    from ._warnings import CellsiftWarning

    default = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):  # type: ignore[no-untyped-def]
        if issubclass(category, CellsiftWarning):
            text = str(message)
            for pattern, words in _AS_WORDS.get(command, ()):
                text = pattern.sub(words, text)
            return f"cellsift: warning: {text}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = default


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .errors import USER_ERRORS as user_errors
    from .errors import TrainingInterrupted

    if argv[:2] in (["-v", "fit"], ["--verbose", "fit"]):  # the global option, before fit
        argv = argv[1:]
        logging.basicConfig(format="%(message)s")
        logger.setLevel(logging.INFO)
        logging.getLogger("lightning").propagate = False  # (as below: printed once)
    if argv[:1] == ["fit"]:  # LightningCLI parses its own arguments
        from .train.cli import run_fit

        try:
            with _sigterm_interrupts():  # (a fit holds it for the end of a training step)
                run_fit(argv[1:])
        except TrainingInterrupted as err:
            return _stopped("fit", err)
        except user_errors as err:
            return _error("fit", err)
        except Exception as err:
            limit = _output_limit(err)
            if limit is None:
                raise
            return _error("fit", limit)
        except KeyboardInterrupt as err:
            return _interrupted("fit", sigterm=isinstance(err, Terminated))
        return 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    # the `lightning` package prints its records through a console handler of its own: passed
    # on to the root handler too, each would print twice
    logging.getLogger("lightning").propagate = False
    try:
        with _sigterm_interrupts():
            return int(args.func(args))
    except TrainingInterrupted as err:
        return _stopped(args.command, err)
    except user_errors as err:
        return _error(args.command, err)
    except KeyboardInterrupt as err:
        return _interrupted(args.command, sigterm=isinstance(err, Terminated))
    except BrokenPipeError:  # the reader went first (cellsift info ... | head): no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)  # (nor one as Python flushes at exit)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as err:
        limit = _output_limit(err)  # the machine's limits: one line that says which
        if limit is not None:
            return _error(args.command, limit)
        if not _cancelled_by_ctrl_c(err):
            raise
        return _interrupted(args.command)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (kill, a scheduler's time limit, docker stop) ends a command as Ctrl-C does:
    the write in progress is removed, not left behind as a hidden temporary output, and
    the command says so (:func:`_interrupted`). Only the main thread can take signals."""
    on_term = threading.current_thread() is threading.main_thread()
    terminated.clear()
    before = signal.signal(signal.SIGTERM, _terminate) if on_term else None
    try:
        yield
    finally:
        if on_term:
            signal.signal(signal.SIGTERM, before)
            terminated.clear()


def _cancelled_by_ctrl_c(err: BaseException) -> bool:
    """TileDB takes Ctrl-C during a query (Python never sees it) and cancels the query: what
    reaches the command is its error, which is an interruption, not a failure."""
    return _tiledb_error(err) and "Query cancelled" in str(err)


def _tiledb_error(err: BaseException) -> bool:
    """An error of TileDB (SOMA stores), told by its type's name: the command line does not
    import tiledbsoma to tell it."""
    return type(err).__name__ in ("SOMAError", "TileDBError")


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM: raised where the command runs, so that its writes clean up (and again at
    the next step of a chunk loop, where a finaliser swallowed it: ``_utils.terminated``)."""
    terminated.set()
    raise Terminated


def _interrupted(command: str, sigterm: bool = False) -> int:
    """Ctrl-C (exit status 130) or SIGTERM (143): one line (outputs are written atomically:
    an interrupted one is not left in place)."""
    how = "terminated" if sigterm else "interrupted"
    _say(f"cellsift {command}: {how}; no partial output was left in place.")
    return 143 if sigterm else 130


def _stopped(command: str, err: TrainingInterrupted) -> int:
    """Training stopped on a signal, its state saved: the library's message (where the
    state is, how to resume) and the signal's exit status (143 SIGTERM, 130 SIGINT)."""
    _say(f"cellsift {command}: {err}")
    return err.exit_status


_FIT_LAYER = "--data.init_args.collection_options.layer"
_FIT_CHECK = "--data.init_args.collection_options.check_counts"
_FIT_STORE = "--data.init_args.collection_options.store_options"
_FIT_DATA = "--data.init_args"  # (the data module's own options: study_key, split_key, ...)
#: Hints in the library's messages that name a Python argument, as the commands that have
#: the matching option spell them.
_AS_OPTIONS = {
    "--overwrite": (("pass overwrite=True", "pass --overwrite"),),
    "--no-check-counts": (("pass check_counts=False", "pass --no-check-counts"),),
    "--measurement": (
        ("no option measurement, var_id", "no --measurement, --var-id"),
        ("no option measurement", "no --measurement"),
        ("no option var_id", "no --var-id"),
        ("pass measurement='raw'", "pass --measurement raw"),
        ("Pass measurement= with", "Pass --measurement with"),
        ("Pass var_id= with", "Pass --var-id with"),
    ),
    "--no-ontology": (("pass ontology_aware=False", "pass --no-ontology"),),
    "--format": (("or pass format=.", "or pass --format."),),
    "--label-key": (("or pass another label_key.", "or pass another --label-key."),),
    "--min-genes": ((MIN_GENES_FIX, "--min-genes 1"),),
    "--quantile": (
        (
            "a lower quantile (quantile=), or set no threshold (no calls of unknown by distance: "
            "leave calibrate out; tl.annotate: abstain=False)",
            "a lower --quantile, or --no-abstain (no calls of unknown by distance)",
        ),
    ),
    # fit: the data module's collection options, as LightningCLI takes them
    _FIT_CHECK: (("pass check_counts=False", f"pass {_FIT_CHECK} false"),),
    _FIT_STORE: (
        ("pass measurement='raw'", f"pass {_FIT_STORE} '{{measurement: raw}}'"),
        ("Pass measurement= with", f"Pass {_FIT_STORE} '{{measurement: ...}}' with"),
        ("Pass var_id= with", f"Pass {_FIT_STORE} '{{var_id: ...}}' with"),
    ),
    _FIT_DATA: (
        ("Pass study_key= the column", f"Pass {_FIT_DATA}.study_key the column"),
        ("or study_key=None for", f"or {_FIT_DATA}.study_key null for"),
        ("groups of a split_key=,", f"groups of a {_FIT_DATA}.split_key,"),
        ("Pass split_key= the column", f"Pass {_FIT_DATA}.split_key the column"),
        (
            "split_key=None to hold out groups of study_key,",
            f"{_FIT_DATA}.split_key null to hold out groups of {_FIT_DATA}.study_key,",
        ),
        ("or pass val_fraction=0).", f"or pass {_FIT_DATA}.val_fraction 0)."),
        ("or val_fraction=0 to validate", f"or {_FIT_DATA}.val_fraction 0 to validate"),
    ),
}
#: Options that say where counts are, and how each names X: a hint's ``layer=`` (where no
#: value follows) names the option instead.
_LAYER_OPTIONS = {
    "--layer": "X (no --layer)",
    "--calibrate-layer": "X (--calibrate-layer X)",
    _FIT_LAYER: "X (null)",
}
_LAYER_HINT = re.compile(r"(?<![\w.\-])layer=(?=[\s,.;:)]|$)")


def _layer_hints(text: str, option: str) -> str:
    """``text`` with its hints of ``layer=`` naming ``option`` (one of :data:`_LAYER_OPTIONS`)."""
    return _LAYER_HINT.sub(option, text.replace("X (layer=None)", _LAYER_OPTIONS[option]))


@contextlib.contextmanager
def _hints_for(option: str) -> Iterator[None]:
    """Errors raised inside name ``option`` where their hints say ``layer=``: the counts
    of a second input (``--calibrate-on``) are located by an option of their own."""
    from .errors import CellsiftError

    try:
        yield
    except CellsiftError as err:
        if err.args and isinstance(err.args[0], str):
            err.args = (_layer_hints(err.args[0], option), *err.args[1:])
        raise


#: Hints in Python code where a command has a way of its own: (pattern, the command's words).
_DROP_EMPTY = (
    re.compile(
        r"Drop them: keep = np\.diff\(model\.aligned_counts\(adata[^)]*\)"
        r"\.indptr\) > 0, then adata\[keep\]"
    ),
    "Leave them out with --drop-empty",
)
_AS_WORDS = {
    "annotate": (_DROP_EMPTY,),
    "search": (
        _DROP_EMPTY,
        (
            re.compile(r"\(cellsift\.tl\.search_clusters\)"),
            "(--groupby with an obs column of clusters)",
        ),
    ),
}
#: Hints naming a Python argument that a command has no option for: left out there.
_NOT_OPTIONS = {
    "--format": ((", or pass format=.", "."),),
    "genes=": ((", or pass genes= (a vocabulary).", "."),),
}
_COMMAND_OPTIONS = {
    "info": ("--layer", "--measurement"),
    "convert": ("--layer", "--no-check-counts", "--format", "--measurement", "--overwrite"),
    "embed": ("--layer", "--no-check-counts", "--min-genes", "--measurement", "--overwrite"),
    "index": ("--overwrite",),
    "annotate": (
        "--layer",
        "--no-check-counts",
        "--quantile",
        "--no-ontology",
        "--label-key",
        "--overwrite",
    ),
    "search": ("--layer", "--no-check-counts", "--overwrite"),
    "fit": (_FIT_LAYER, _FIT_CHECK, _FIT_STORE, _FIT_DATA),
}


#: What a full disk, a read-only or forbidden folder or too long a name raise as an output is
#: written, and what to do about each: said in one line (exit status 2), not a traceback.
_OUTPUT_LIMITS = {
    errno.ENOSPC: "free space there or write the output elsewhere",
    errno.EDQUOT: "free space within the quota or write the output elsewhere",
    errno.EFBIG: "a file size limit stopped it (`ulimit -f`, or the file system's largest "
    "file): raise the limit or write the output elsewhere",
    errno.EROFS: "the file system is read-only: write the output elsewhere",
    errno.EACCES: "check the folder's permissions, or write the output elsewhere",
    errno.ENAMETOOLONG: "choose a shorter output name (its hidden temporary copy adds about "
    "20 characters)",
}
#: The limits as TileDB's errors (SOMA outputs) say them, which are no OSError.
_TILEDB_LIMITS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "File too large": errno.EFBIG,
}
#: numpy's write of an array that stopped short (``tofile``, ``np.save``): an OSError
#: without an errno.
_SHORT_WRITE = re.compile(r"^(\d+) requested and (\d+) written$")


def _output_limit(err: BaseException) -> OSError | None:
    """``err``, where a limit of the machine stopped a write (a full disk, a quota, a file
    size limit, ...), as an OSError with what to do about it (:data:`_OUTPUT_LIMITS`) in its
    message; else None."""
    if isinstance(err, OSError) and err.errno in _OUTPUT_LIMITS:
        # (a copy or a rename: the second name is the destination, where the limit is)
        target = err.filename2 or err.filename
        where = f": {target}" if target else ""
        advice = _OUTPUT_LIMITS[err.errno]
        return OSError(err.errno, f"{err.strerror}{where}; {advice}.")
    if isinstance(err, OSError) and err.errno is None and _SHORT_WRITE.match(str(err)):
        return OSError(
            f"a write stopped short ({err}): the disk is full or a file size limit was "
            "reached; free space there, raise the limit (`ulimit -f`), or write the output "
            "elsewhere.",
        )
    if _tiledb_error(err):
        code = next((c for text, c in _TILEDB_LIMITS.items() if text in str(err)), None)
        if code is not None:
            return OSError(code, f"{os.strerror(code)}; {_OUTPUT_LIMITS[code]}.")
    return None


def _error(command: str, err: BaseException) -> int:
    """Print ``cellsift COMMAND: error: ...`` in one line. An error raised in a DataLoader
    worker comes back with the worker's traceback in its message: its last line is the
    error's own message. Hints that name a Python argument name the command's option."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    options = _COMMAND_OPTIONS.get(command, ())
    for option in options:
        if option in _LAYER_OPTIONS:
            text = _layer_hints(text, option)
            continue
        for python, shell in _AS_OPTIONS[option]:
            text = text.replace(python, shell)
    for pattern, words in _AS_WORDS.get(command, ()):
        text = pattern.sub(words, text)
    for option, hints in _NOT_OPTIONS.items():
        for python, without in hints if option not in options else ():
            text = text.replace(python, without)
    _say(f"cellsift {command}: error: {text}")
    return 2


def _say(line: str) -> None:
    """``line`` on stderr in one write. Under DDP every rank says the run's error: print's
    two writes (the text, then the newline) to the shared, unbuffered stderr interleaved
    two ranks' lines into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
