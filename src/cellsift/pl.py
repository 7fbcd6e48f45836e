"""scanpy-style plots: ``cellsift.pl``.

import cellsift as cs
cs.pl.embedding(adata, "cell_type", basis="X_umap")     # a 2-D embedding by an obs column
cs.pl.search_summary(result, by="dataset_id")           # hits of a search, per study
cs.pl.annotation_confusion(true, pred)                  # calls vs true Cell Ontology labels
cs.pl.attributions(cs.tasks.explain_difference(...))    # top genes of an explanation

matplotlib is imported inside the functions, so ``import cellsift`` stays light. Each
function draws into ``ax`` (a new figure when None), returns the Axes, and writes the figure
to ``save`` when given (atomically: a temporary file moved into place; the format follows
the suffix).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd

from ._utils import atomic_path, is_file, is_whole, no_label, objects_whole_as_ints
from .errors import MissingKeyError
from .tasks import UNKNOWN, SearchResult
from .tl import obsm_array

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .ontology import CellOntology

__all__ = ["annotation_confusion", "attributions", "embedding", "search_summary"]

SavePath = str | os.PathLike[str] | None
#: Column of calls that are an ancestor of the true label (right, but coarser).
ANCESTOR = "ancestor (coarser)"


# -- embedding ----------------------------------------------------------------------------
def embedding(
    adata: ad.AnnData,
    color: str | None = None,
    *,
    basis: str = "X_umap",
    palette: Mapping[str, Any] | Sequence[Any] | str | None = None,
    cmap: str = "viridis",
    size: float | None = None,
    title: str | None = None,
    legend_loc: str | None = "right margin",
    na_color: str = "lightgrey",
    ax: Axes | None = None,
    save: SavePath = None,
) -> Axes:
    """Scatter plot of a 2-D embedding in ``obsm[basis]``, coloured by ``obs[color]``.

    Parameters
    ----------
    adata
        Cells with a 2-D embedding, e.g. from ``sc.tl.umap`` on ``obsm["X_cellsift"]``.
    color
        obs column: categorical (one colour per category, with a legend) or numeric (a
        colour map and colour bar). None: all cells grey.
    basis
        obsm key (``"umap"`` means ``"X_umap"``). It must have 2 columns.
    palette
        Colours of the categories: a mapping category -> colour, a list, or a colour map
        name (default: tab10 / tab20, or turbo for more than 20 categories). Colours follow
        all of the column's categories, those without cells too; the legend lists the
        categories with cells. Each category's scatter carries its name as label (for a
        legend of your own: matplotlib's leaves out labels starting with ``_``; pass it the
        handles, ``ax.legend(ax.collections, [c.get_label() for c in ax.collections])``).
    cmap
        Colour map of a numeric ``color``.
    size
        Marker area (default ``min(20, 120000 / n_cells)``, as scanpy).
    title
        Axes title (default: ``color``).
    legend_loc
        ``"right margin"`` (outside the axes), ``"on data"`` (each category's name at the
        median of its cells placed, as scanpy; no legend), any matplotlib legend location, or
        None.
    na_color
        Colour of cells whose value is missing.
    ax, save
        Axes to draw into; path to write the figure to.
    """
    import matplotlib.pyplot as plt

    xy = _basis(adata, basis)
    ax = _axes(ax, figsize=(5.5, 4.5))
    n = adata.n_obs
    s = float(size) if size is not None else min(20.0, 120_000 / max(n, 1))
    if color is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=s, color=na_color, linewidths=0)
    else:
        if color not in adata.obs.columns:
            raise MissingKeyError(
                f"color={color!r} is not an obs column; available: {list(adata.obs.columns)}."
            )
        values = adata.obs[color]
        if _is_categorical(values):
            cat = pd.Categorical(values)
            colors = _palette(palette, [str(c) for c in cat.categories], list(cat.categories))
            missing = cat.codes < 0
            # the legend's entries given in full: matplotlib's own leaves out artists whose
            # label starts with "_", which is a category's name as any other
            handles, labels = [], []
            if missing.any():
                labels.append(_literals([*cat.categories, None])[-1])
                handles.append(
                    ax.scatter(
                        xy[missing, 0],
                        xy[missing, 1],
                        s=s,
                        color=na_color,
                        linewidths=0,
                        label=labels[-1],
                    )
                )
            for k, name in enumerate(cat.categories):
                sel = cat.codes == k
                if not sel.any():  # (a category of no cells here: no legend entry)
                    continue
                labels.append(_literal(name))
                handles.append(
                    ax.scatter(
                        xy[sel, 0], xy[sel, 1], s=s, color=colors[k], linewidths=0, label=labels[-1]
                    )
                )
            if legend_loc == "on data":
                finite = np.isfinite(xy).all(1)  # (cells without a place: not counted)
                for k, name in enumerate(cat.categories):
                    sel = (cat.codes == k) & finite
                    if sel.any():
                        x, y = np.median(xy[sel], axis=0)
                        ax.text(
                            x,
                            y,
                            _literal(name),
                            ha="center",
                            va="center",
                            fontsize="small",
                            fontweight="bold",
                        )
            elif legend_loc is not None:
                scale = max(1.0, 6.0 / np.sqrt(s))
                if legend_loc == "right margin":
                    ax.legend(
                        handles,
                        labels,
                        loc="center left",
                        bbox_to_anchor=(1.0, 0.5),
                        frameon=False,
                        markerscale=scale,
                        fontsize="small",
                    )
                else:
                    loc: Any = legend_loc
                    ax.legend(handles, labels, loc=loc, markerscale=scale, fontsize="small")
        else:
            v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
            ok = np.isfinite(v)
            if (~ok).any():
                ax.scatter(xy[~ok, 0], xy[~ok, 1], s=s, color=na_color, linewidths=0)
            sc = ax.scatter(xy[ok, 0], xy[ok, 1], s=s, c=v[ok], cmap=cmap, linewidths=0)
            plt.colorbar(sc, ax=ax, fraction=0.05, pad=0.02)
    name = basis.removeprefix("X_").upper() if basis.startswith("X_") else basis.upper()
    ax.set_xlabel(f"{name}1")
    ax.set_ylabel(f"{name}2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else _literal(color or basis))
    _save(ax.figure, save)
    return ax


def _basis(adata: ad.AnnData, basis: str) -> np.ndarray:
    key = basis if basis in adata.obsm else f"X_{basis}"
    if key not in adata.obsm:
        two_d = [k for k in adata.obsm if tuple(adata.obsm[k].shape[1:]) == (2,)]
        raise MissingKeyError(
            f"obsm has no {basis!r}; 2-D embeddings present: {two_d or 'none'}. Compute one, "
            "e.g. sc.pp.neighbors(adata, use_rep='X_cellsift'); sc.tl.umap(adata)."
        )
    xy = obsm_array(adata, key).astype(float, copy=False)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(
            f"obsm[{key!r}] has shape {xy.shape}; plotting needs a 2-D embedding. Compute one, "
            f"e.g. sc.pp.neighbors(adata, use_rep={key!r}); sc.tl.umap(adata), then "
            "basis='X_umap'."
        )
    return xy


def _holds(mapping: Mapping[Any, Any], key: Any) -> bool:
    try:
        return key in mapping
    except TypeError:  # (unhashable)
        return False


def _is_categorical(values: pd.Series) -> bool:
    return not (pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values))


def _palette(
    palette: Mapping[Any, Any] | Sequence[Any] | str | None,
    names: list[str],
    values: list[Any] | None = None,
) -> list:
    """The colours of the categories ``names`` (their text; ``values``: themselves)."""
    import matplotlib as mpl

    if isinstance(palette, Mapping):  # keyed by the categories' text or their values
        by_text = {str(k): v for k, v in palette.items()}
        colors, missing = [], []
        for i, name in enumerate(names):
            value = None if values is None else values[i]
            if name in by_text:
                colors.append(by_text[name])
            elif value is not None and _holds(palette, value):  # (a key of 2 for 2.0)
                colors.append(palette[value])
            else:
                missing.append(name)
        if missing:
            raise MissingKeyError(f"palette has no colour for {missing}; add them to the mapping.")
        return colors
    if palette is not None and not isinstance(palette, str):
        colors = list(palette)
        if len(colors) < len(names):
            raise ValueError(
                f"palette has {len(colors)} colours for {len(names)} categories; give more."
            )
        return colors[: len(names)]
    name = palette or ("tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "turbo")
    cm = mpl.colormaps[name]
    if getattr(cm, "N", 256) >= 256:  # a continuous map: spread the categories over it
        return [cm(v) for v in np.linspace(0.0, 1.0, max(len(names), 1))]
    if cm.N < len(names):  # a qualitative map would repeat its colours
        raise ValueError(
            f"palette {name!r} has {cm.N} colours for {len(names)} categories: categories would "
            "share colours. Give a map with more (e.g. 'tab20', or 'turbo' to spread them), or "
            "a list or mapping of colours."
        )
    return [cm(i) for i in range(len(names))]


# -- search -------------------------------------------------------------------------------
def search_summary(
    result: SearchResult,
    by: str | Sequence[str] = "dataset_id",
    *,
    value: str = "hits",
    n_top: int | None = 20,
    color: str = "tab:blue",
    ax: Axes | None = None,
    save: SavePath = None,
) -> Axes:
    """Horizontal bars of a search's hits per metadata group (:meth:`SearchResult.summary`).

    Parameters
    ----------
    result
        A :class:`~cellsift.tasks.SearchResult`.
    by
        Metadata column(s) to group the hits by.
    value
        The summary column to plot: ``hits``, ``queries`` or ``mean_distance``.
    n_top
        Plot the groups with the most hits only (None: all).
    color, ax, save
        Bar colour; axes to draw into; path to write the figure to.
    """
    summary = result.summary(by)
    if value not in summary.columns:
        raise MissingKeyError(
            f"value={value!r} is not a summary column; use one of {list(summary)}."
        )
    if summary.empty:
        raise ValueError("the search found no hits; there is nothing to plot.")
    if n_top is not None:
        if not is_whole(n_top, least=1):
            raise ValueError(
                f"n_top must be a whole number of groups of at least 1 (or None for all), "
                f"not {n_top!r}."
            )
        summary = summary.head(int(n_top))
    keys = [k if isinstance(k, tuple) else (k,) for k in summary.index]
    levels = [_literals(level) for level in zip(*keys, strict=True)]
    labels = [" / ".join(k) for k in zip(*levels, strict=True)]
    ax = _axes(ax, figsize=(6.0, 0.8 + 0.3 * len(summary)))
    ax.barh(np.arange(len(summary)), summary[value].to_numpy(), color=color)
    ax.set_yticks(np.arange(len(summary)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(_literal(value.replace("_", " ")))
    ax.set_ylabel(_literal(by) if isinstance(by, str) else " / ".join(map(_literal, by)))
    _save(ax.figure, save)
    return ax


# -- annotation ---------------------------------------------------------------------------
def annotation_confusion(
    true: Sequence[str] | pd.Series | np.ndarray,
    pred: Sequence[str] | pd.Series | np.ndarray,
    *,
    ontology: CellOntology | None = None,
    ontology_aware: bool = True,
    normalize: bool = False,
    annotate: bool | None = None,
    cmap: str = "Blues",
    ax: Axes | None = None,
    save: SavePath = None,
) -> Axes:
    """Heatmap of annotation calls (columns) against true Cell Ontology labels (rows).

    Rows are the true labels; columns are the true labels again (so the diagonal holds the
    exact calls), then other called labels, then ``ancestor (coarser)`` (calls that are an
    ancestor of the cell's true label: right, but less specific; counted there and not under
    the called term) and ``unknown`` (abstentions). Rows and columns are labelled with Cell
    Ontology names.

    Parameters
    ----------
    true, pred
        One label per cell: CL ids or names; ``pred`` may hold ``unknown`` (or missing, or
        text that spells a missing value: ``nan``, blank, any case), counted as abstentions.
    ontology
        The Cell Ontology (default: :func:`~cellsift.ontology.load_cell_ontology`).
    ontology_aware
        False: labels outside the Cell Ontology (cell lines, a lab's own annotation), shown
        as written, with no ``ancestor (coarser)`` column.
    normalize
        Show each row's fractions instead of counts.
    annotate
        Write the values in the cells (default: when the matrix has at most 30 rows and
        40 columns).
    cmap, ax, save
        Colour map; axes to draw into; path to write the figure to.
    """
    table = _confusion_table(true, pred, ontology, ontology_aware)
    values = table.to_numpy(dtype=float)
    if normalize:
        values = values / np.maximum(values.sum(1, keepdims=True), 1)
    n_rows, n_cols = values.shape
    ax = _axes(ax, figsize=(1.5 + 0.45 * n_cols, 1.5 + 0.4 * n_rows))
    im = ax.imshow(values, cmap=cmap, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(
        im, ax=ax, fraction=0.04, pad=0.02, label="fraction" if normalize else "cells"
    )
    ax.set_xticks(np.arange(n_cols), _literals(table.columns), rotation=90)
    ax.set_yticks(np.arange(n_rows), _literals(table.index))
    apart = 2 if ontology_aware else 1  # the columns of ancestor calls and abstentions
    ax.axvline(n_cols - apart - 0.5, color="black", linewidth=1.0)
    ax.set_xlabel("call")
    ax.set_ylabel("true label")
    if annotate is None:
        annotate = n_rows <= 30 and n_cols <= 40
    if annotate:
        top = values.max() if values.size else 0.0
        for i in range(n_rows):
            for j in range(n_cols):
                v = values[i, j]
                if v == 0:
                    continue
                ax.text(
                    j,
                    i,
                    f"{v:.2f}" if normalize else f"{int(v)}",
                    ha="center",
                    va="center",
                    fontsize="x-small",
                    color="white" if v > 0.6 * top else "black",
                )
    _save(ax.figure, save)
    return ax


def _confusion_table(
    true: Sequence[str] | pd.Series | np.ndarray,
    pred: Sequence[str] | pd.Series | np.ndarray,
    ontology: CellOntology | None,
    ontology_aware: bool = True,
) -> pd.DataFrame:
    """Counts: true labels (rows) x calls, ancestor calls and abstentions apart; CL names
    (not ``ontology_aware``: the labels as written, no ancestor calls)."""
    from .ontology import OntologyError, load_cell_ontology

    if isinstance(true, pd.Series) and isinstance(pred, pd.Series):
        pred = _by_index(true, pred)
    t_raw = pd.Series(_label_values(true))
    p_raw = pd.Series(_label_values(pred))
    if len(t_raw) != len(p_raw):
        raise ValueError(f"true has {len(t_raw)} labels and pred {len(p_raw)}; pass one per cell.")
    if len(t_raw) == 0:
        raise ValueError("no cells: true and pred are empty.")
    # missing, or text that spells a missing value ("unknown", "nan", blank; any case)
    missing = no_label(t_raw)
    if missing.any():
        raise ValueError(
            f"true holds {int(missing.sum())} missing labels (missing, 'unknown', 'nan' or "
            "blank); leave those cells out."
        )
    unknown = no_label(p_raw)
    p = np.full(len(p_raw), UNKNOWN, dtype=object)
    if ontology_aware:
        cl = ontology if ontology is not None else load_cell_ontology()
        try:
            t = cl.harmonize(t_raw.astype(str).tolist())
            if (~unknown).any():
                p[~unknown] = cl.harmonize(p_raw[~unknown].astype(str).tolist())
        except OntologyError as err:
            raise OntologyError(
                f"{err} To show labels outside the Cell Ontology as they are, pass "
                "ontology_aware=False."
            ) from None
        ancestors = {term: set(cl.ancestors(term)) for term in set(t)}
        column = [
            UNKNOWN if c == UNKNOWN else ANCESTOR if c in ancestors[r] else c
            for r, c in zip(t, p.tolist(), strict=True)
        ]
        apart = [ANCESTOR, UNKNOWN]
        name: Callable[[str], str] = cl.name
    else:  # the labels as written, no ancestor calls
        t = t_raw.astype(str).tolist()
        p[~unknown] = p_raw[~unknown].astype(str).to_numpy()
        column, apart = p.tolist(), [UNKNOWN]

        def name(term: str) -> str:
            return term

    rows = sorted(set(t), key=lambda term: (name(term), term))
    others = sorted(
        {c for c in column if c not in apart} - set(rows), key=lambda term: (name(term), term)
    )
    counts = pd.crosstab(pd.Series(t, name="true"), pd.Series(column, name="call"))
    table = counts.reindex(index=rows, columns=[*rows, *others, *apart], fill_value=0)
    table.index = pd.Index([name(r) for r in rows], name="true")
    table.columns = pd.Index([*(name(c) for c in [*rows, *others]), *apart], name="call")
    return table


def _by_index(true: pd.Series, pred: pd.Series) -> pd.Series:
    """``pred`` in the order of ``true``'s index, where the two Series name the same cells
    in another order; else by position where either has pandas' default index (0, 1, ...,
    n - 1: a table of calls, as :meth:`KNNAnnotator.annotate` returns); an error where they
    name other cells."""
    if true.index.equals(pred.index):
        return pred
    if (
        true.index.is_unique
        and pred.index.is_unique
        and len(true) == len(pred)
        and true.index.isin(pred.index).all()
    ):
        return pred.reindex(true.index)
    if any(s.index.equals(pd.RangeIndex(len(s))) for s in (true, pred)):
        return pred
    if not (true.index.is_unique and pred.index.is_unique):
        twice = true.index if not true.index.is_unique else pred.index
        name = twice[twice.duplicated()][0]
        name = name.item() if isinstance(name, np.generic) else name  # (0, not np.int64(0))
        raise ValueError(
            f"{'true' if twice is true.index else 'pred'}'s index names a cell more than "
            f"once ({name!r}), so the cells of true and pred cannot "
            "be matched by name: make the names unique (adata.obs_names_make_unique()), or "
            "pass their values in one order (.to_numpy())."
        )
    raise ValueError(
        "true and pred are Series whose indexes name different cells: pass one label per "
        "cell, indexed by the same cells, or their values in one order (.to_numpy())."
    )


def _label_values(labels: Any) -> np.ndarray:
    """Labels as objects, a whole-number float as its int (a column of numbers with a
    missing value is float: its 2.0 is the label 2 of the other side), as a collection
    reads them."""
    return objects_whole_as_ints(np.asarray(labels, dtype=object).ravel())


# -- interpretation -----------------------------------------------------------------------
def attributions(
    df: pd.DataFrame,
    n_genes: int = 20,
    *,
    column: str = "attribution",
    gene_symbols: str | None = None,
    ax: Axes | None = None,
    save: SavePath = None,
) -> Axes:
    """Horizontal bars of the ``n_genes`` genes with the largest ``column`` (top first).

    Parameters
    ----------
    df
        Genes as rows, e.g. from :func:`~cellsift.tasks.explain_difference`.
    n_genes
        How many genes to show.
    column
        The value to rank and plot.
    gene_symbols
        Column with the names to label bars with (default: ``symbol`` when present, else
        the index). A gene without a name there is labelled by its index.
    ax, save
        Axes to draw into; path to write the figure to.
    """
    if column not in df.columns:
        raise MissingKeyError(f"{column!r} is not a column of df; it has {list(df.columns)}.")
    if not is_whole(n_genes, least=1):
        raise ValueError(f"n_genes must be a whole number of at least 1, not {n_genes!r}.")
    if df.empty:
        raise ValueError("df has no genes; there is nothing to plot.")
    if gene_symbols is not None and gene_symbols not in df.columns:
        raise MissingKeyError(f"gene_symbols={gene_symbols!r} is not a column of df.")
    label_col = gene_symbols or ("symbol" if "symbol" in df.columns else None)
    top = df.sort_values(column, ascending=False, kind="stable").head(int(n_genes))
    names = top.index.to_series()
    if label_col:  # (a gene without a symbol: its id, not "NA")
        names = top[label_col].astype(object).where(top[label_col].notna(), names)
    labels = [_literal(g) for g in names]
    v = top[column].to_numpy(dtype=float)
    ax = _axes(ax, figsize=(5.0, 0.8 + 0.25 * len(top)))
    ax.barh(np.arange(len(top)), v, color=np.where(v >= 0, "tab:red", "tab:blue"))
    ax.set_yticks(np.arange(len(top)), labels)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(_literal(column.replace("_", " ")))
    _save(ax.figure, save)
    return ax


# -- shared -------------------------------------------------------------------------------
def _literal(value: object) -> str:
    """A value from the data (a category, a label, a gene, a column's name) as text that
    matplotlib draws as written: a ``$`` would start mathematics (and an unpaired one fail
    the drawing). Missing values read ``NA``."""
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return "NA"
    return str(value).replace("$", r"\$")


def _literals(values: Iterable[object]) -> list[str]:
    """:func:`_literal` of each value, a missing one ``NA`` unless a value present is spelled
    so (then ``NA (missing)``): a legend or axis tells the two apart."""
    values = list(values)
    missing = [pd.api.types.is_scalar(v) and bool(pd.isna(v)) for v in values]
    texts = [_literal(v) for v in values]
    taken = any(t == "NA" and not m for t, m in zip(texts, missing, strict=True))
    return ["NA (missing)" if m and taken else t for t, m in zip(texts, missing, strict=True)]


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, new = plt.subplots(figsize=figsize)
    return new


def _savefig(fig: Figure, path: str | os.PathLike[str], *, dpi: float = 150) -> Path:
    """Write ``fig`` to ``path`` atomically; the format follows the suffix (default png)."""
    final = Path(path)
    fmt = final.suffix.lstrip(".").lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"cannot save as {fmt!r}; use one of {sorted(supported)}.")
    with atomic_path(final, overwrite=True, replaces=is_file, what="a file") as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    return final


def _save(fig: Any, save: SavePath) -> None:
    if save is not None:
        _savefig(fig, save)
