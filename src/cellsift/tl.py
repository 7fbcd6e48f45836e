"""scanpy-style tools: ``cellsift.tl.embed`` and ``cellsift.tl.annotate`` on AnnData.

import cellsift as cs
cs.tl.embed(adata, model)                       # obsm["X_cellsift"]
cs.tl.annotate(adata, index, model=model)       # obs["cellsift_cell_type"], ...
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._utils import (
    BACKED_ROWS,
    adata_counts,
    cell_mask,
    check_model_object,
    in_obs_order,
    is_number,
    wrong_kind,
)
from ._warnings import warn
from .data.collection import _as_text, check_count_values
from .errors import ConfigError, DataError, MissingKeyError
from .tasks import CellIndex, KNNAnnotator, SearchResult, query_coherence
from .tasks.annotate import calibration_conflict, label_lists, without_abstention
from .tasks.index import CellIndexError

__all__ = ["annotate", "embed", "pseudobulk", "search_centroid", "search_clusters"]


def embed(
    adata: ad.AnnData,
    model: Any,
    *,
    layer: str | None = None,
    batch_size: int = 4096,
    key_added: str = "X_cellsift",
    device: str | None = None,
    check_counts: bool = True,
    copy: bool = False,
    source: str = "adata",
) -> ad.AnnData | None:
    """Embed raw counts (``adata.X``, ``layers[layer]`` or, for ``"raw"``, ``adata.raw``)
    with ``model`` into ``obsm[key_added]``; genes are aligned to the model's with an overlap
    report, and values that are not raw counts are an error unless ``check_counts=False``
    (``source`` names the data in messages, e.g. its file). ``uns["cellsift"][key_added]``
    records the model's fingerprint, so that :func:`annotate` and :func:`search_centroid`
    refuse an embedding that another model made."""
    check_model_object(model)
    _check_key("key_added", key_added)
    adata = _copied(adata, source) if copy else _writable(adata, source)
    record = dict(_record(adata))  # (refused before the cells are embedded)
    adata.obsm[key_added] = model.embed(
        adata,
        layer=layer,
        batch_size=batch_size,
        device=device,
        check_counts=check_counts,
        source=source,
    )
    # which model made it: annotate and search refuse another model's embeddings
    record[key_added] = {"model_fingerprint": model.fingerprint}
    adata.uns["cellsift"] = record
    return adata if copy else None


def annotate(
    adata: ad.AnnData,
    reference: CellIndex | KNNAnnotator,
    *,
    model: Any = None,
    layer: str | None = None,
    check_counts: bool = True,
    use_rep: str = "X_cellsift",
    label_key: str | None = None,
    k: int = 50,
    weighted: bool = True,
    ontology_aware: bool | None = None,
    min_support: float = 0.5,
    abstain: bool = True,
    abstain_on: Literal["mean", "nearest"] = "mean",
    quantile: float = 0.99,
    calibrate_by: str | None = None,
    calibrate_on: Any = None,
    safelist: list[str] | None = None,
    blocklist: list[str] | None = None,
    filter: Any = None,
    key_added: str = "cellsift",
    copy: bool = False,
) -> ad.AnnData | None:
    """Annotate cells by their nearest reference cells.

    Embeds with ``model`` first (raw counts in ``X``, ``layers[layer]`` or, for ``"raw"``,
    ``adata.raw``; ``check_counts`` as for :func:`embed`) when ``obsm[use_rep]`` is absent.
    Writes
    ``obs[f"{key_added}_cell_type"]`` (Cell Ontology name, or ``unknown``),
    ``obs[f"{key_added}_cell_type_ontology_term_id"]``, ``obs[f"{key_added}_confidence"]``,
    ``obs[f"{key_added}_min_distance"]`` and ``obs[f"{key_added}_mean_distance"]`` (over the
    ``k`` voters: what abstention compares with the threshold by default). ``reference`` is a :class:`CellIndex` (an
    annotator is made with the options here) or a ready :class:`KNNAnnotator`.

    With ``abstain`` the annotator's distance threshold is calibrated
    (:meth:`KNNAnnotator.calibrate`): on ``calibrate_on`` when given, held-out labelled
    cells of the reference's types that the model did not train on (an AnnData, embedded
    like ``adata``: into its ``obsm[use_rep]`` and ``uns``, unless ``copy``; or their
    embeddings); else on the reference itself,
    leave-one-``calibrate_by``-out when given (e.g. the study column); cells of known types
    abstain with probability at most ``1 - quantile``. It is calibrated against the reference
    cells that ``safelist``, ``blocklist`` and ``filter`` (index metadata: ``{"tissue":
    ["blood"]}``) leave, as the queries are annotated (a ready annotator keeps its threshold:
    one calibrated against other cells is refused).
    ``abstain_on``: the distance compared with the threshold (see :class:`KNNAnnotator`).

    ``label_key`` (the reference metadata's column of labels) and ``ontology_aware`` (Cell
    Ontology votes, else plain ones) default to how ``model`` trained: its label column,
    and plain votes where it took its labels as written (outside the Cell Ontology);
    where the index lacks the model's column but holds ``cell_type_ontology_term_id``, that
    one by Cell Ontology votes (a warning says so); without a model,
    ``cell_type_ontology_term_id`` and Cell Ontology votes.
    """
    if not isinstance(reference, CellIndex | KNNAnnotator):
        kind = "a CellIndex (CellIndex.load(path)) or a KNNAnnotator"
        if callable(getattr(reference, "embed", None)):  # the model, in the reference's place
            raise TypeError(
                f"reference must be {kind}, not {type(reference).__name__}: pass the model "
                "as model=."
            )
        raise wrong_kind("reference", kind, reference, "load the index first, CellIndex.load(path)")
    if model is not None:
        check_model_object(model)
    _check_key("use_rep", use_rep, written=False)  # (where written: checked below)
    _check_key("key_added", key_added, prefix=True)
    if isinstance(calibrate_on, str | os.PathLike):
        raise TypeError(
            f"calibrate_on is held-out labelled cells, an AnnData or their embeddings, not "
            f"the path {os.fspath(calibrate_on)!r}: read it first (ad.read_h5ad(path))."
        )
    # (the threshold's check, the calibration and the calls each read them)
    safelist, blocklist = label_lists(safelist, blocklist)
    defaults = inspect.signature(annotate).parameters
    if isinstance(reference, KNNAnnotator):  # it has its settings and threshold already
        options = {
            "label_key": label_key,
            "k": k,
            "weighted": weighted,
            "ontology_aware": ontology_aware,
            "min_support": min_support,
            "abstain": abstain,
            "abstain_on": abstain_on,
            "quantile": quantile,
            "calibrate_by": calibrate_by,
            "calibrate_on": calibrate_on,
        }
        own = {"label_key": reference.label_key, "ontology_aware": reference.ontology_aware}
        given = [  # (a value the annotator has already is no other setting)
            name
            for name, value in options.items()
            if not _is_default(value, defaults[name].default)
            and not (name in own and _is_default(value, own[name]))
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)} set up the annotator made from a CellIndex; a ready "
                "KNNAnnotator has its own settings and threshold. Set them when making it "
                "(KNNAnnotator(...), .calibrate(...)), or pass its index as the reference."
            )
    else:  # (as cellsift annotate refuses them)
        threshold = {
            "quantile": quantile,
            "calibrate_by": calibrate_by,
            "calibrate_on": calibrate_on,
        }
        for name, value in threshold.items():
            if not abstain and not _is_default(value, defaults[name].default):
                raise without_abstention(name, "abstain=False")
        if calibrate_by is not None and calibrate_on is not None:
            raise calibration_conflict("calibrate_by", "calibrate_on")
    adata = _copied(adata) if copy else _writable(adata)
    calibrating = isinstance(calibrate_on, ad.AnnData) and use_rep not in calibrate_on.obsm
    if use_rep not in adata.obsm or calibrating:  # (to be written: before the work)
        _check_key("use_rep", use_rep)
    if calibrating and abstain and not copy:  # (said before the query is embedded)
        _writable(calibrate_on, "calibrate_on")
    index = reference.index if isinstance(reference, KNNAnnotator) else reference
    index.check_model(model)
    label_key, aware = labels_of(index, model, label_key)  # (as the docstring says)
    if ontology_aware is None:
        ontology_aware = aware
    # (the reference's labels read and checked before the cells are embedded)
    ann = (
        reference
        if isinstance(reference, KNNAnnotator)
        else KNNAnnotator(
            reference,
            label_key=label_key,
            k=k,
            weighted=weighted,
            ontology_aware=ontology_aware,
            min_support=min_support,
            abstain_on=abstain_on,
        )
    )
    if ann is reference:  # (its threshold must be of the reference cells voting here)
        mismatch = ann.threshold_mismatch(safelist, blocklist, filter)
        if mismatch is not None:
            raise ConfigError(
                f"reference is a calibrated KNNAnnotator, and {mismatch} Or pass the "
                "CellIndex: tl.annotate then calibrates against the cells safelist, "
                "blocklist and filter leave."
            )
    ann.check_selection(safelist, blocklist, filter)  # (before the cells are embedded)
    _ensure_embedded(adata, model, use_rep, layer=layer, check_counts=check_counts, index=index)
    if ann is not reference and abstain:  # (a ready annotator has its own threshold)
        if isinstance(calibrate_on, ad.AnnData):
            if copy and use_rep not in calibrate_on.obsm:  # (copy: no input is written)
                calibrate_on = _copied(calibrate_on, "calibrate_on")
            _ensure_embedded(
                calibrate_on, model, use_rep, "calibrate_on", layer, check_counts, index
            )
            calibrate_on = obsm_array(calibrate_on, use_rep)
        ann.calibrate(
            calibrate_on,
            quantile=quantile,
            group_key=calibrate_by,
            safelist=safelist,
            blocklist=blocklist,
            filter=filter,
        )
    out = ann.annotate(
        obsm_array(adata, use_rep), safelist=safelist, blocklist=blocklist, filter=filter
    )
    out.index = adata.obs_names
    adata.obs[f"{key_added}_cell_type"] = out["label_name"].astype("category")
    adata.obs[f"{key_added}_cell_type_ontology_term_id"] = out["label_id"].astype("category")
    adata.obs[f"{key_added}_confidence"] = out["confidence"].to_numpy()
    adata.obs[f"{key_added}_min_distance"] = out["min_distance"].to_numpy()
    adata.obs[f"{key_added}_mean_distance"] = out["mean_distance"].to_numpy()
    return adata if copy else None


def labels_of(index: CellIndex, model: Any, label_key: str | None = None) -> tuple[str, bool]:
    """The reference metadata's column of labels to annotate with, and whether its votes
    are the Cell Ontology's, by default: ``label_key`` where given; else the column
    ``model`` trained on where the index holds it; else ``cell_type_ontology_term_id``
    where the index holds that (an index of other data than the model's: Cell Ontology
    ids, so Cell Ontology votes; a warning says so); else the model's, which the annotator
    then names as missing. Votes otherwise as the model took its labels (plain for labels
    outside the Cell Ontology)."""
    config = getattr(model, "config", None) or {}
    aware = bool(config.get("loss", {}).get("ontology_aware", True))
    if label_key is not None:
        return label_key, aware
    default = "cell_type_ontology_term_id"
    own = getattr(model, "label_key", None) or default
    held = index.metadata_columns
    if own not in held and default in held:
        warn(
            f"the index metadata have no {own!r} column (the labels the model trained on): "
            f"annotating with their {default!r}, by Cell Ontology votes. Name another column "
            "with label_key= (cellsift annotate: --label-key)."
        )
        return default, True
    return own, aware


def obsm_array(adata: ad.AnnData, use_rep: str) -> np.ndarray:
    """``adata.obsm[use_rep]`` as a dense array (a sparse matrix densified, a DataFrame's
    values), as embeddings are read."""
    rep = adata.obsm[use_rep]
    return np.asarray(rep.toarray() if sp.issparse(rep) else rep)


def _record(adata: ad.AnnData) -> Mapping[str, Any]:
    """``uns["cellsift"]``: which model made each embedding :func:`embed` put in obsm (empty
    where none); something else stored under that key is an error, not overwritten."""
    record = adata.uns.get("cellsift", {})
    if not isinstance(record, Mapping):
        raise ValueError(
            f"adata.uns['cellsift'] holds {type(record).__name__} {record!r:.60}, not the "
            "record of embeddings that cellsift keeps there: move it to another key."
        )
    return record


def check_embedded_by(adata: ad.AnnData, use_rep: str, model: Any, what: str = "adata") -> None:
    """Refuse ``obsm[use_rep]`` when :func:`embed` recorded another model than ``model`` (a
    MetricModel, or a CellIndex: the model that built it) as its maker. Embeddings put
    there by other means carry no record and are taken as they are."""
    made_by = _record(adata).get(use_rep, {}).get("model_fingerprint")
    if made_by is None or model is None:
        return
    if isinstance(model, CellIndex):
        wanted, whose = model.params.get("model"), "the index's model"
    else:
        wanted, whose = model.fingerprint, "the model passed"
    if wanted is not None and made_by != wanted:
        raise CellIndexError(
            f"{what}.obsm[{use_rep!r}] was embedded by another model (fingerprint "
            f"{made_by[:12]}) than {whose} ({wanted[:12]}): distances between two models' "
            f"embeddings mean nothing. Embed again with cellsift.tl.embed({what}, model), or "
            "pass use_rep= of this model's embedding."
        )


def _ensure_embedded(
    adata: ad.AnnData,
    model: Any,
    use_rep: str,
    what: str = "adata",
    layer: str | None = None,
    check_counts: bool = True,
    index: CellIndex | None = None,
) -> None:
    """Embed ``adata`` into ``obsm[use_rep]`` with ``model`` unless it is there already,
    made by this model (or, without one, by the model that built ``index``)."""
    if use_rep in adata.obsm:
        check_embedded_by(adata, use_rep, model if model is not None else index, what)
    else:
        if model is None:
            raise ValueError(
                f"{what}.obsm[{use_rep!r}] is absent: pass model= to embed the cells first."
            )
        embed(adata, model, key_added=use_rep, layer=layer, check_counts=check_counts, source=what)


def pseudobulk(adata: ad.AnnData, groups: Any, *, layer: str | None = None) -> ad.AnnData:
    """Summed counts per group: ``groups`` is an obs column name or one label per cell (a
    Series indexed by obs names is aligned to them; cells labelled None/NaN are left out).
    One row per group with cells (a categorical column's unused categories are left out),
    named by the group as text (a whole number as an int, ``"2"``, also in a column of
    floats, as one of numbers with missing values is), the genes of the counts read:
    ``X``, ``layers[layer]`` or, for ``"raw"``, ``adata.raw`` (with its own var). A backed
    AnnData is read in row blocks. Sums are not one cell's counts: a gene's may reach
    2**24, which the counts checks refuse in a cell; embed them with ``check_counts=False``
    (:func:`search_centroid` and :func:`search_clusters` do)."""
    _check_anndata(adata)
    return _summed(adata, groups, layer)


def _summed(
    adata: ad.AnnData, groups: Any, layer: str | None, counts_of: str | None = None
) -> ad.AnnData:
    """:func:`pseudobulk`; with ``counts_of`` (what the sums are for), each cell's values
    checked as raw counts first: a sum hides a negative value beside a positive one."""
    cat = pd.Categorical(_group_labels(adata, groups)).remove_unused_categories()
    keep = cat.codes >= 0
    if not keep.any():
        raise ValueError("no cell belongs to a group; nothing to sum.")
    # as the collection reads values as text: a column of whole numbers with a missing
    # value is float, and its 2.0 names the group 2
    names = pd.Index(_as_text(np.asarray(cat.categories)).astype(str))
    if names.has_duplicates:
        twice = set(names[names.duplicated()])
        same = [repr(c) for c, name in zip(cat.categories, names, strict=True) if name in twice]
        raise ValueError(
            f"groups {', '.join(same)} read the same as text, which names a group's row: "
            "give them distinct labels (e.g. all as text)."
        )
    x, var, _ = adata_counts(adata, layer)

    def checked(block: Any, start: int = 0) -> Any:
        """``block`` (the cells from ``start`` on), its grouped cells' values checked."""
        if counts_of is not None:
            summed = block[keep[start : start + block.shape[0]]]
            values = summed.data if sp.issparse(summed) else np.asarray(summed).ravel()
            where = f"adata ({'X' if layer is None else layer})"
            fix = (
                f" {counts_of} sums raw counts: point layer= at them (or pass "
                "check_counts=False to sum the values as they are)."
            )
            check_count_values(values, where, fix)
        return block

    onehot = sp.csr_matrix(
        (np.ones(keep.sum()), (cat.codes[keep], np.flatnonzero(keep))),
        shape=(len(cat.categories), adata.n_obs),
    )
    if sp.issparse(x) or isinstance(x, np.ndarray):
        if x.dtype == np.float16:  # (scipy.sparse holds no float16)
            x = x.astype(np.float32)
        sums = sp.csr_matrix(onehot @ sp.csr_matrix(checked(x)))
    else:  # backed (anndata's on-disk matrix): row blocks
        sums = sp.csr_matrix((len(cat.categories), x.shape[1]))
        for start in range(0, x.shape[0], BACKED_ROWS):
            block = sp.csr_matrix(x[start : start + BACKED_ROWS], dtype=np.float64)
            block = checked(block, start)
            sums += onehot[:, start : start + block.shape[0]] @ block
        sums = sp.csr_matrix(sums)
    return ad.AnnData(sums, obs=pd.DataFrame(index=names), var=var.copy())


def _group_labels(adata: ad.AnnData, groups: Any) -> Any:
    """One label per cell, in obs order, from an obs column name, a Series indexed by obs
    names (aligned) or values in obs order; a wrong length or index is an error."""
    if isinstance(groups, str):
        if groups not in adata.obs.columns:
            raise MissingKeyError(
                f"obs has no column {groups!r}; it has {', '.join(map(str, adata.obs.columns))}."
            )
        return adata.obs[groups].array
    if isinstance(groups, pd.Series) and len(groups) == adata.n_obs:
        return in_obs_order(groups, adata.obs_names, "groups")
    if isinstance(groups, pd.Series):
        values = groups.array
    elif isinstance(groups, np.ndarray):
        values = groups
    else:  # read as the Series of them is (numpy would make a NaN among text 'nan')
        keep = isinstance(groups, pd.Index | pd.api.extensions.ExtensionArray)  # (categories)
        as_list = groups if keep else list(groups)
        values = pd.Series(as_list, dtype=None).array
    if values.ndim != 1:
        raise ValueError(
            f"groups is an array of shape {tuple(values.shape)}: pass one label per cell, "
            "1-d (an obs column name, or the array raveled)."
        )
    if len(values) != adata.n_obs:
        raise ValueError(
            f"groups holds {len(values)} labels for {adata.n_obs} cells: pass one per cell "
            "(or an obs column name)."
        )
    return values


def search_centroid(
    adata: ad.AnnData,
    model: Any,
    index: CellIndex,
    *,
    cells: Any = None,
    k: int = 100,
    layer: str | None = None,
    filter: Any = None,
    qc: bool = True,
    use_rep: str = "X_cellsift",
    check_counts: bool = True,
) -> SearchResult:
    """Cells of the index nearest the centroid of a cell set: the set's counts summed
    (pseudobulk), embedded, searched. ``cells``: a boolean mask or obs names (default all).

    With ``qc``, the result's ``qc`` holds the query-coherence check
    (:func:`~cellsift.tasks.query_coherence`: do the set's subpopulations find the same
    cells?), which warns when the set looks heterogeneous. It clusters the set's cell
    embeddings (``obsm[use_rep]`` when present, else embedded here), searches with each
    cluster's counts summed and embedded as the set's are, and compares those hits with
    the ones returned. Its ``cluster_n`` holds one cluster per cell of the set, in obs
    order: -1 for a cell without counts in the model's genes, which sits out the check.
    The set's cells are read a block at a time (a backed AnnData is never read whole).

    With ``check_counts``, each summed cell's values must be raw counts (a sum hides a
    negative value beside a positive one); False sums them as they are (counts corrected
    for ambient RNA, which are not whole numbers).
    """
    _check_inputs(adata, model, index)
    _check_key("use_rep", use_rep, written=False)  # (read only)
    mask = np.ones(adata.n_obs, dtype=bool) if cells is None else cell_mask(adata, cells)
    if not mask.any():
        raise ValueError("the cell set is empty; select at least one cell.")
    labels = np.full(adata.n_obs, None, dtype=object)
    labels[mask] = "centroid"
    bulk = _summed(adata, labels, layer, "search_centroid" if check_counts else None)
    result = index.search(_embed_bulk(model, bulk, "the cell set", False), k, filter=filter)
    if qc:
        embedded = None
        if use_rep in adata.obsm:
            check_embedded_by(adata, use_rep, model)
            embedded = obsm_array(adata, use_rep)
            width = model.config["architecture"]["latent"]
            if embedded.ndim != 2 or embedded.shape[1] != width:  # (another tool's, unrecorded)
                shape = (
                    f"{embedded.shape[1]} dims"
                    if embedded.ndim == 2
                    else f"a {embedded.ndim}-d array"
                )
                raise CellIndexError(
                    f"adata.obsm[{use_rep!r}] holds {shape}, not cells x the model's "
                    f"{width}: it is not this model's embedding. Embed again with "
                    "cellsift.tl.embed(adata, model), pass use_rep= of this model's "
                    "embedding, or qc=False."
                )
        # the set's cells; any without counts in the model's genes sit out the check (they
        # would make a cluster of no counts), whether embedded here or in obsm. Read a
        # block at a time, twice (here, and to sum each cluster's counts): a set of
        # millions of cells (a backed atlas) is not held whole
        rows = np.flatnonzero(mask)

        def blocks() -> Iterator[tuple[sp.csr_matrix, np.ndarray]]:
            """The set's aligned counts a block of cells at a time, those without counts
            left out, and which those are (values not checked again: the set's sum has)."""
            for x in model.aligned_blocks(
                adata, layer=layer, check_counts=False, rows=rows, block_rows=BACKED_ROWS
            ):
                counted = np.diff(x.indptr) > 0
                yield x[counted], counted

        parts = [
            (counted, None if embedded is not None else model.embed_aligned(x))
            for x, counted in blocks()
        ]
        counted = np.concatenate([c for c, _ in parts])
        z = (
            embedded[rows[counted]]
            if embedded is not None
            else np.concatenate([e for _, e in parts])
        )

        def embed_clusters(cluster: np.ndarray) -> np.ndarray:
            """Each cluster's counts summed (the model's genes: their sum is the aligned
            sum) and embedded; none is empty."""
            n_clusters, sums, at = int(cluster.max()) + 1, None, 0
            for x, _ in blocks():
                part = cluster[at : at + x.shape[0]]
                at += x.shape[0]
                onehot = sp.csr_matrix(
                    (np.ones(len(part)), (part, np.arange(len(part)))),
                    shape=(n_clusters, len(part)),
                )
                sums = onehot @ x if sums is None else sums + onehot @ x
            return np.asarray(model.embed_aligned(sp.csr_matrix(sums, dtype=np.float32)))

        checked = query_coherence(
            index, z, k, filter=filter, hits=result.indices[0], embed_clusters=embed_clusters
        )
        cluster_n = np.full(len(rows), -1, dtype=np.int64)  # one per cell of the set
        cluster_n[counted] = checked.cluster_n
        result.qc = dataclasses.replace(checked, cluster_n=cluster_n)
    return result


def search_clusters(
    adata: ad.AnnData,
    model: Any,
    index: CellIndex,
    groupby: str,
    *,
    k: int = 100,
    layer: str | None = None,
    filter: Any = None,
    check_counts: bool = True,
) -> dict[str, SearchResult]:
    """:func:`search_centroid`'s search for every group of ``obs[groupby]`` (e.g.
    clusters), with the pseudobulks embedded in one pass, without its coherence check (each
    result's ``qc`` is None: a cluster is what an incoherent set is split into); keyed by
    the groups as :func:`pseudobulk` names them; ``check_counts`` as there."""
    _check_inputs(adata, model, index)
    bulk = _summed(adata, groupby, layer, "search_clusters" if check_counts else None)
    res = index.search(_embed_bulk(model, bulk, f"groups of {groupby!r}"), k, filter=filter)
    return {
        str(name): SearchResult(res.distances[i : i + 1], res.indices[i : i + 1], index)
        for i, name in enumerate(bulk.obs_names)
    }


def _embed_bulk(model: Any, bulk: ad.AnnData, what: str, named: bool = True) -> np.ndarray:
    """The pseudobulks' embeddings; a pseudobulk without counts in the model's genes (its
    cells have none there) is an error naming it (``named``: the groups have names). Its
    cells' values were checked as they were summed (:func:`_summed`); the sums are not
    checked as one cell's counts: a gene's sum over many cells may pass 2**24, which a
    cell's count never nears."""
    x = model.aligned_counts(bulk, check_counts=False)
    empty = list(bulk.obs_names[np.diff(x.indptr) == 0])
    if empty:
        names = f" ({', '.join(map(repr, empty[:5]))})" if named else ""
        raise DataError(
            f"{what}{names}: no counts in the model's {len(model.genes)} genes, summed over "
            "the cells; choose cells with counts there, or point layer= at the counts."
        )
    return np.asarray(model.embed_aligned(x))


def _is_default(value: Any, default: Any) -> bool:
    """``value`` is the parameter's default (the same object, or an equal value of its type)."""
    if value is default:
        return True
    # (numbers of any type: np.int64(50) is k's default 50)
    same_kind = type(value) is type(default) or (is_number(value) and is_number(default))
    return bool(same_kind and value == default)


def _check_anndata(adata: Any, what: str = "adata") -> None:
    """``adata`` is an AnnData; else a TypeError naming what it is (for a path, how to
    read it)."""
    if not isinstance(adata, ad.AnnData):
        opened = "read the file first, ad.read_h5ad(path) (backed='r' for one larger than memory)"
        raise wrong_kind(what, "an AnnData", adata, opened)


def _check_inputs(adata: Any, model: Any, index: Any) -> None:
    """A search's inputs of the kinds it takes, and ``index`` of ``model``'s embeddings."""
    _check_anndata(adata)
    check_model_object(model)
    if not isinstance(index, CellIndex):
        opened = "load the index first, CellIndex.load(path)"
        raise wrong_kind("index", "a CellIndex (CellIndex.load(path))", index, opened)
    index.check_model(model)


def _check_key(name: str, key: Any, *, written: bool = True, prefix: bool = False) -> None:
    """``key`` (of obsm and uns; with ``prefix``, the start of obs columns' names) is text;
    one ``written`` is one an h5ad file keeps: no '/' (read as a group: the file fails to
    write, or reads back nested), not empty (but a prefix)."""
    if not isinstance(key, str):
        raise ValueError(f"{name} must be a name (text), not {type(key).__name__} {key!r}.")
    if written and ("/" in key or not (key or prefix)):
        raise ValueError(
            f"{name} must be a name without '/', as an h5ad file keeps keys, not {key!r}."
        )


def _writable(adata: ad.AnnData, what: str = "adata") -> ad.AnnData:
    """``adata`` if results can be written into it: a view of a backed AnnData cannot take
    them (anndata would copy it to a file), said before any work is done, naming ``what``."""
    _check_anndata(adata, what)
    if adata.isbacked and adata.is_view:
        raise DataError(
            f"{what} is a view of a backed AnnData, which cannot take new obs or obsm "
            "entries (anndata would write a copy of it to a file): pass copy=True (an "
            "AnnData in memory comes back, the input left as it is), or load the view into "
            "memory first (view.to_memory())."
        )
    return adata


def _copied(adata: ad.AnnData, what: str = "adata") -> ad.AnnData:
    """A copy in memory (of a backed AnnData too, which ``copy()`` would write to a file)."""
    _check_anndata(adata, what)
    return adata.to_memory(copy=True) if adata.isbacked else adata.copy()
