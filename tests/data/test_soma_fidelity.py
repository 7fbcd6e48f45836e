"""What goes through a TileDB-SOMA store comes back as it went in: obs/var columns under their
own names (also those named like the store's own columns), categories with their order and
type, dates as text, and the experiments that ``tiledbsoma.io`` writes."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellsift.data import open_store, open_writer
from cellsift.data.convert import convert
from cellsift.datasets import synthetic_atlas
from cellsift.errors import DataError, MissingKeyError

pytest.importorskip("tiledbsoma")

N_CELLS, N_GENES = 48, 12


@pytest.fixture
def adata() -> ad.AnnData:
    """A small synthetic atlas, text columns as categoricals (as every writer stores them)."""
    a = synthetic_atlas(N_CELLS, N_GENES, n_studies=2, seed=7)
    a.strings_to_categoricals()
    a.var["feature_name"] = a.var["feature_name"].astype("category")
    a.var.index.name = None  # (the SOMA layout keeps no index name)
    return a


def through_soma(a: ad.AnnData, tmp_path: Path) -> ad.AnnData:
    """``a`` written as h5ad by anndata, converted to SOMA and back to h5ad, read by anndata."""
    a.write_h5ad(tmp_path / "in.h5ad")
    soma = convert(tmp_path / "in.h5ad", tmp_path / "mid.soma", chunk_size=20)
    return ad.read_h5ad(convert(soma, tmp_path / "back.h5ad", chunk_size=20))


def assert_same(got: ad.AnnData, want: ad.AnnData) -> None:
    """Same cells, genes, counts, obs and var: values, names, column order and dtypes."""
    assert list(got.obs_names) == list(want.obs_names)
    assert list(got.var_names) == list(want.var_names)
    assert (sp.csr_matrix(got.X) != sp.csr_matrix(want.X)).nnz == 0
    for frame in ("obs", "var"):
        g, w = getattr(got, frame), getattr(want, frame)
        g.index.name = w.index.name = None
        pd.testing.assert_frame_equal(g, w, check_categorical=True, check_exact=True)


# -- 1 and 2: columns named like the store's own --------------------------------------------


@pytest.mark.parametrize(
    "joinids",
    [
        pytest.param(lambda n: np.arange(n)[::-1].copy(), id="in-domain"),
        pytest.param(lambda n: 5_000_000 + 37 * np.arange(n), id="out-of-domain"),
    ],
)
def test_soma_joinid_columns_are_kept_and_do_not_move_cells(adata, tmp_path, joinids):
    """cellxgene_census.get_anndata keeps obs/var ``soma_joinid`` columns: they are data, not
    the store's join ids (once they reordered names and labels against the counts)."""
    adata.obs.insert(0, "soma_joinid", joinids(adata.n_obs).astype(np.int64))
    adata.var["soma_joinid"] = joinids(adata.n_vars).astype(np.int64)
    assert_same(through_soma(adata, tmp_path), adata)
    store = open_store(tmp_path / "mid.soma")
    np.testing.assert_array_equal(store.obs_column("soma_joinid"), adata.obs["soma_joinid"])
    assert (store.read(np.arange(adata.n_obs)) != adata.X).nnz == 0


@pytest.mark.parametrize(
    ("obs_cols", "var_cols"),
    [
        (["obs_id_orig"], ["feature_id_orig"]),
        (["obs_id", "obs_id_orig"], ["feature_id", "feature_id_orig"]),
        (["obs_id", "obs_id_orig", "soma_joinid", "soma_joinid_orig"], ["feature_id"]),
    ],
)
def test_columns_named_like_the_stores_own_keep_their_names(adata, tmp_path, obs_cols, var_cols):
    rng = np.random.default_rng(0)
    for i, name in enumerate(obs_cols):
        adata.obs[name] = pd.Categorical(rng.choice([f"{name}-{i}-{k}" for k in range(3)], N_CELLS))
    for name in var_cols:
        adata.var[name] = pd.Categorical([f"{name}:{g}" for g in range(N_GENES)])
    assert_same(through_soma(adata, tmp_path), adata)


# -- 3: categories --------------------------------------------------------------------------


def categorical_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "label": pd.Categorical(
                rng.choice(["B", "A", None], n), categories=["B", "A", "Platelet"]
            ),
            "stage": pd.Categorical(
                rng.choice(["early", "late"], n), categories=["early", "mid", "late"], ordered=True
            ),
            "cluster": pd.Categorical(rng.choice([0, 1, 10, 2], n), categories=[10, 2, 1, 0, 99]),
            "flag": pd.Categorical(rng.choice([True, False], n)),
        }
    )


def test_categories_keep_unused_values_order_and_type(adata, tmp_path):
    extra = categorical_frame(N_CELLS, seed=1).set_index(adata.obs_names)
    adata.obs = pd.concat([adata.obs, extra], axis=1)
    adata.var["biotype"] = pd.Categorical(
        ["protein_coding"] * N_GENES, categories=["lncRNA", "protein_coding"]
    )
    assert_same(through_soma(adata, tmp_path), adata)
    store = open_store(tmp_path / "mid.soma")
    for col in extra.columns:
        pd.testing.assert_extension_array_equal(store.obs_column(col), extra[col].array)


def test_categories_that_grow_from_chunk_to_chunk(tmp_path):
    """Chunks with categories of their own: the store's categories are their union, in the
    order they first came, and every cell keeps its value."""
    chunks = [
        pd.Categorical(["A", "B", "A"], categories=["B", "A", "unused"]),
        pd.Categorical(["C", "A"], categories=["A", "C"]),
        pd.Categorical([None, "D"], categories=["D", "E"]),
    ]
    var = pd.DataFrame(index=["g0", "g1"])
    with open_writer(tmp_path / "grow.soma", var, n_obs=7) as writer:
        start = 0
        for values in chunks:
            names = [f"c{i}" for i in range(start, start + len(values))]
            writer.append(
                np.ones((len(values), 2), np.float32), pd.DataFrame({"t": values}, index=names)
            )
            start += len(values)
    got = open_store(tmp_path / "grow.soma").obs_column("t")
    assert list(got.categories) == ["B", "A", "unused", "C", "D", "E"]
    assert list(got.astype(object)) == ["A", "B", "A", "C", "A", np.nan, "D"]


def test_ordered_categories_grow_only_in_their_order(tmp_path):
    """An ordered categorical's categories grow at the end of the store's enumeration:
    a later chunk that adds one at its end keeps the order; one that puts a new category
    between old ones (low < mid < high after low < high) is refused, naming the fix, not
    stored with mid after high (where mid > high would come out True)."""
    from cellsift.errors import DataError

    var = pd.DataFrame(index=["g0", "g1"])
    x = np.ones((2, 2), np.float32)

    def dose(values, categories):
        return pd.DataFrame(
            {"dose": pd.Categorical(values, categories=categories, ordered=True)},
            index=[f"c{len(values)}{v}" for v in values],
        )

    with open_writer(tmp_path / "ok.soma", var, n_obs=4) as writer:
        writer.append(x, dose(["low", "mid"], ["low", "mid"]))
        writer.append(x, dose(["mid", "high"], ["low", "mid", "high"]))
    got = open_store(tmp_path / "ok.soma").obs_column("dose")
    assert list(got.categories) == ["low", "mid", "high"] and got.ordered
    with pytest.raises(DataError, match=r"'dose' is an ordered categorical .*Give the first"):
        with open_writer(tmp_path / "bad.soma", var, n_obs=4) as writer:
            writer.append(x, dose(["low", "high"], ["low", "high"]))
            writer.append(x, dose(["mid", "high"], ["low", "mid", "high"]))
    assert not (tmp_path / "bad.soma").exists()


# -- 4: dates -------------------------------------------------------------------------------


@pytest.fixture
def io_experiment(adata, tmp_path) -> str:
    """An experiment as ``tiledbsoma.io.from_anndata`` writes it (var ids in ``var_id``,
    counts in X layer ``data``), with a date column in obs."""
    import tiledbsoma.io

    days = pd.to_datetime(["2020-01-01", "2020-01-02", None, "2021-12-31"] * (N_CELLS // 4))
    adata.obs["collected"] = days
    uri = str(tmp_path / "io.soma")
    tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA")
    return uri


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_dates_from_soma_are_written_as_text(adata, io_experiment, tmp_path, fmt):
    out = convert(
        io_experiment, tmp_path / f"out.{fmt}", layer="data", source_options={"var_id": "var_id"}
    )
    back = ad.read_zarr(out) if fmt == "zarr" else ad.read_h5ad(out)
    want = ["2020-01-01", "2020-01-02", None, "2021-12-31"] * (N_CELLS // 4)
    assert (
        list(back.obs["collected"].astype(object).where(back.obs["collected"].notna(), None))
        == want
    )
    assert list(back.obs_names) == list(adata.obs_names)
    assert (back.X != adata.X).nnz == 0


@pytest.mark.parametrize("fmt", ["h5ad", "zarr", "soma"])
def test_datetimes_with_a_time_zone_are_written_as_text(tmp_path, fmt):
    when = pd.to_datetime(["2020-03-29 01:30", None, "2020-03-29 03:30"]).tz_localize(
        "Europe/Berlin"
    )
    obs = pd.DataFrame(
        {"when": when, "since": pd.to_timedelta(["1h", "2h", None])}, index=["a", "b", "c"]
    )
    with open_writer(tmp_path / f"tz.{fmt}", pd.DataFrame(index=["g0"]), n_obs=3) as writer:
        writer.append(np.ones((3, 1), np.float32), obs)
    store = open_store(tmp_path / f"tz.{fmt}")
    got = list(np.asarray(store.obs_column("when"), dtype=object))
    assert got[0] == "2020-03-29 01:30:00+01:00" and got[2] == "2020-03-29 03:30:00+02:00"
    assert pd.isna(got[1])
    since = list(np.asarray(store.obs_column("since"), dtype=object))
    assert since[:2] == ["0 days 01:00:00", "0 days 02:00:00"] and pd.isna(since[2])


# -- 5: experiments written by tiledbsoma.io ------------------------------------------------


def test_tiledbsoma_io_experiment_opens_without_var_id(adata, io_experiment, tmp_path):
    """... and without layer=: its one X layer ("data") holds the counts."""
    store = open_store(io_experiment)
    assert store.layer == "data"
    assert list(store.var_names) == list(adata.var_names)
    assert list(store.obs_names) == list(adata.obs_names)
    assert (store.read(np.arange(N_CELLS)) != adata.X).nnz == 0
    back = ad.read_h5ad(convert(io_experiment, tmp_path / "out.h5ad"))
    assert list(back.var_names) == list(adata.var_names)
    pd.testing.assert_frame_equal(
        back.obs[["cell_type", "dataset_id"]], adata.obs[["cell_type", "dataset_id"]]
    )


def test_several_x_layers_without_raw_name_the_choice(adata, tmp_path):
    """With no "raw" layer and more than one, no layer is guessed: the error names the
    default and the layers to choose from."""
    import tiledbsoma.io

    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.astype(np.float32) / 2
    uri = str(tmp_path / "two.soma")
    tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA")
    with pytest.raises(
        MissingKeyError, match=r"no X layer 'raw' \(the default: .* 2 X layers.*Pass layer="
    ) as err:
        open_store(uri)
    assert "'counts'" in str(err.value) and "'data'" in str(err.value)
    with pytest.raises(MissingKeyError, match=r"no X layer 'raw' in measurement 'RNA' \(it has"):
        open_store(uri, layer="raw")  # (named: no word of a default)
    store = open_store(uri, layer="counts")
    assert (store.read(np.arange(N_CELLS)) != adata.layers["counts"]).nnz == 0


def test_counts_in_a_raw_measurement_are_not_passed_over_for_the_normalised_layer(
    adata, tmp_path, capsys
):
    """scanpy's layout (X normalised, counts in raw) written by tiledbsoma.io: its one X
    layer "data" holds the normalised values and the measurement "raw" the counts. Without
    a layer named, the store does not take "data": the error names measurement='raw',
    which reads the counts."""
    import tiledbsoma.io

    counts = adata.X.copy()
    adata.raw = adata
    adata.X = adata.X.astype(np.float32) / 3
    uri = str(tmp_path / "scanpy.soma")
    tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA")
    with pytest.raises(MissingKeyError, match=r"beside it\) in measurement 'RNA'.*'raw' to read"):
        open_store(uri)
    assert (open_store(uri, measurement="raw").read(np.arange(N_CELLS)) != counts).nnz == 0
    assert open_store(uri, layer="data").layer == "data"  # (named: read as asked)
    from cellsift.cli import main

    assert main(["info", uri]) == 2  # the hint as the command's option
    assert "pass --measurement raw to read those" in capsys.readouterr().err


def test_tiledbsoma_io_experiment_of_named_indexes_opens_as_written(adata, tmp_path):
    """tiledbsoma.io keeps a named index (as most h5ad files have: "gene_ids") under its
    name, and records which column that is; the store reads the gene ids and obs names there."""
    import tiledbsoma.io

    adata.var.index.name, adata.obs.index.name = "gene_ids", "barcode"
    uri = str(tmp_path / "named.soma")
    tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA")
    store = open_store(uri, layer="data")
    assert list(store.var_names) == list(adata.var_names)
    assert list(store.obs_names) == list(adata.obs_names)
    assert (store.read(np.arange(N_CELLS)) != adata.X).nnz == 0
    # and the indexes keep their names (hunt250: an h5ad converted from it had none), those
    # named like the layout's own columns too (review223)
    back = ad.read_h5ad(convert(uri, tmp_path / "named.h5ad", layer="data"))
    assert (back.obs.index.name, back.var.index.name) == ("barcode", "gene_ids")
    plain = adata.copy()
    plain.obs.index.name, plain.var.index.name = "obs_id", "feature_id"
    plain.var["length"] = pd.array([None, *range(1, plain.n_vars)], dtype="Int32")
    tiledbsoma.io.from_anndata(str(tmp_path / "plain.soma"), plain, measurement_name="RNA")
    store = open_store(str(tmp_path / "plain.soma"), layer="data")
    assert (store.obs_names.name, store.var_names.name) == ("obs_id", "feature_id")
    # a var column of integers with a missing value, as obs's are read (not floats)
    assert store.var["length"].dtype == "Int32" and pd.isna(store.var["length"].iloc[0])
    # the obs names' column is no column of values too (review: "barcode" came back as one)
    assert "barcode" not in store.obs_columns
    assert store.obs_columns == [str(c) for c in adata.obs.columns]
    # a column of values called obs_id beside the named index stays one, as tiledbsoma.io
    # reads it (review: it was taken as the obs names, and the index as a column)
    adata.obs["obs_id"] = [f"donor{i % 2}" for i in range(N_CELLS)]
    uri = str(tmp_path / "named_and_obs_id.soma")
    tiledbsoma.io.from_anndata(uri, adata, measurement_name="RNA")
    store = open_store(uri, layer="data")
    assert list(store.obs_names) == list(adata.obs_names)
    assert "obs_id" in store.obs_columns and "barcode" not in store.obs_columns
    assert list(store.obs_column("obs_id")) == list(adata.obs["obs_id"])


def test_var_without_gene_ids_names_the_fix(tmp_path):
    import tiledbsoma.io

    a = ad.AnnData(sp.csr_matrix(np.ones((2, 2), np.float32)))
    a.var_names = ["g0", "g1"]
    uri = str(tmp_path / "io.soma")
    tiledbsoma.io.from_anndata(uri, a, measurement_name="RNA", var_id_name="gene")
    with pytest.raises(DataError, match=r"var has no column 'feature_id'.*Pass var_id="):
        len(open_store(uri, layer="data").var)
    assert list(open_store(uri, layer="data", var_id="gene").var_names) == ["g0", "g1"]
    # the join ids are offered as no gene ids, and refused as such (review: a KeyError)
    with pytest.raises(DataError, match=r"Pass var_id= with one of \['gene'\]\.$"):
        len(open_store(uri, layer="data").var)
    with pytest.raises(DataError, match=r"'soma_joinid' holds the join ids \(positions\)"):
        len(open_store(uri, layer="data", var_id="soma_joinid").var)


def test_a_dense_x_layer_is_refused_as_the_store_opens(tmp_path):
    """A dense X layer (tiledbsoma.io's X_kind=DenseNDArray) opened, then every read failed
    with tiledbsoma's words on a result order (hunt209): refused as it opens, with fixes."""
    import tiledbsoma
    import tiledbsoma.io

    a = ad.AnnData(np.ones((3, 2), np.float32))
    a.var_names = ["g0", "g1"]
    uri = str(tmp_path / "dense.soma")
    tiledbsoma.io.from_anndata(uri, a, measurement_name="RNA", X_kind=tiledbsoma.DenseNDArray)
    with pytest.raises(DataError, match=r"X layer 'data' as a DenseNDArray.*X_kind=tiledbsoma"):
        open_store(uri)


def test_an_experiment_missing_a_part_is_named_incomplete(tmp_path):
    """An experiment without obs, ms, its measurement's var or X (an ingest that did not
    finish): one error naming the part, not tiledbsoma's AttributeError or TypeError."""
    import pyarrow as pa
    import tiledbsoma

    def make(name, *leave_out):
        uri = str(tmp_path / name)
        with tiledbsoma.Experiment.create(uri) as exp:
            ids = pa.array([0, 1], pa.int64())
            if "obs" not in leave_out:
                t = pa.table({"soma_joinid": ids, "obs_id": ["c1", "c2"]})
                exp.add_new_dataframe("obs", schema=t.schema, domain=[(0, 1)]).write(t)
            if "ms" in leave_out:
                return uri
            rna = exp.add_new_collection("ms").add_new_collection("RNA", tiledbsoma.Measurement)
            if "var" not in leave_out:
                t = pa.table({"soma_joinid": ids, "feature_id": ["g1", "g2"]})
                rna.add_new_dataframe("var", schema=t.schema, domain=[(0, 1)]).write(t)
            if "X" not in leave_out:
                rna.add_new_collection("X").add_new_sparse_ndarray(
                    "raw", type=pa.float32(), shape=(2, 2)
                )
        return uri

    cases = {
        ("obs", "ms"): "is an experiment without obs or ms",
        ("ms",): "is an experiment without ms",
        ("obs",): "is an experiment without obs",
        ("var",): "has a measurement 'RNA' without var",
        ("X",): "has a measurement 'RNA' without X",
    }
    for parts, said in cases.items():
        uri = make("-".join(parts) + ".soma", *parts)
        with pytest.raises(DataError, match=rf"{said}: it is incomplete .* Re-create it"):
            open_store(uri)


@pytest.mark.parametrize(
    "gene_ids",
    [[0, 2, 4, 6, 8], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4], [1, 5, 2**21 + 7, 2**21 + 9, 2**22]],
)
def test_counts_land_on_the_genes_of_their_var_join_ids(tmp_path, gene_ids):
    """Var join ids that are not the genes' positions (gaps, or from 5): each value is read
    under the gene of its join id (it was read at the join id as a position: another gene,
    or past the last, which crashed the process); a value of a join id var lacks is an
    error naming it."""
    import pyarrow as pa
    import tiledbsoma

    from cellsift.data import CellCollection

    rng = np.random.default_rng(0)
    dense = rng.integers(0, 4, size=(6, 5)).astype(np.float32)
    dense[:, 0] += 1
    rows, cols = np.nonzero(dense)

    def make(name, x_genes):
        uri = str(tmp_path / name)
        with tiledbsoma.Experiment.create(uri) as exp:
            t = pa.table({"soma_joinid": pa.array(range(6), pa.int64()), "obs_id": list("abcdef")})
            exp.add_new_dataframe("obs", schema=t.schema, domain=[(0, 5)]).write(t)
            rna = exp.add_new_collection("ms").add_new_collection("RNA", tiledbsoma.Measurement)
            ids = pa.array(gene_ids, pa.int64())
            t = pa.table({"soma_joinid": ids, "feature_id": [f"g{j}" for j in gene_ids]})
            last = max(*gene_ids, *x_genes, 11)  # (join ids spread far: by binary search)
            rna.add_new_dataframe("var", schema=t.schema, domain=[(0, last)]).write(t)
            x = rna.add_new_collection("X").add_new_sparse_ndarray(
                "raw", type=pa.float32(), shape=(6, last + 1)
            )
            x.write(
                pa.table(
                    {
                        "soma_dim_0": pa.array(rows, pa.int64()),
                        "soma_dim_1": pa.array(np.asarray(x_genes)[cols], pa.int64()),
                        "soma_data": pa.array(dense[rows, cols]),
                    }
                )
            )
        return uri

    uri = make("gaps.soma", gene_ids)
    store = open_store(uri)
    assert list(store.var_names) == [f"g{j}" for j in gene_ids]
    np.testing.assert_array_equal(store.read(np.arange(6)).toarray(), dense)
    np.testing.assert_array_equal(store.read(np.array([1, 4])).toarray(), dense[[1, 4]])
    np.testing.assert_array_equal(CellCollection(uri).read(np.arange(6)).toarray(), dense)
    # the last gene's values under a join id var lacks: past its join ids, or between them
    between = [j for j in range(max(gene_ids)) if j not in gene_ids][:1]
    for missing in (11, *between):
        lost = [*gene_ids[:4], missing]
        with pytest.raises(DataError, match=rf"of the gene of join id {missing}, which var"):
            open_store(make(f"lost{missing}.soma", lost)).read(np.arange(6))
    # a store sent to a loader process leaves its lookup table behind (made where read)
    import pickle

    sent = pickle.loads(pickle.dumps(store))
    assert "_gene_lookup" not in vars(sent)
    np.testing.assert_array_equal(sent.read(np.arange(6)).toarray(), dense)


# -- 5: counts ------------------------------------------------------------------------------
# -- 5: counts ------------------------------------------------------------------------------


def _random_counts(n_cells: int, n_genes: int, seed: int) -> sp.csr_matrix:
    x = sp.random(n_cells, n_genes, density=0.3, format="csr", dtype=np.float32, random_state=seed)
    x.data = np.ceil(x.data * 20)
    x[::4] = 0  # cells without counts, between cells with some
    x.eliminate_zeros()
    return x


@pytest.mark.parametrize("tiles", [None, {"soma_dim_0": {"tile": 4}, "soma_dim_1": {"tile": 3}}])
def test_counts_come_back_and_each_chunk_is_one_fragment(tmp_path, monkeypatch, tiles):
    """A chunk's counts are one write, submitted in pieces in the array's global order with
    the store's own tiles (all genes to a tile), sorted by TileDB in another layout: either
    way every count comes back in its place, and each chunk with counts is one fragment."""
    from cellsift.data import writers

    monkeypatch.setattr(writers, "SOMA_WRITE_VALUES", 7)  # many pieces a chunk
    chunks = [_random_counts(n, 10, seed) for seed, n in enumerate([9, 1, 13])]
    chunks.insert(2, sp.csr_matrix((5, 10), dtype=np.float32))  # a chunk without counts
    x = sp.vstack(chunks).tocsr()
    var = pd.DataFrame(index=[f"g{i}" for i in range(10)])
    config = None if tiles is None else {"tiledb": {"create": {"dims": tiles}}}
    path = tmp_path / "x.soma"
    with open_writer(path, var, n_obs=x.shape[0], platform_config=config) as writer:
        start = 0
        for chunk in chunks:
            names = [f"c{i}" for i in range(start, start + chunk.shape[0])]
            writer.append(chunk, pd.DataFrame(index=names))
            start += chunk.shape[0]
    got = open_store(path).read(np.arange(x.shape[0]))
    assert (got != x).nnz == 0
    fragments = path / "ms" / "RNA" / "X" / "raw" / "__fragments"
    assert len(list(fragments.iterdir())) == sum(chunk.nnz > 0 for chunk in chunks)


@pytest.mark.serial  # (answered within a second: timed)
def test_a_signal_during_a_large_write_is_answered_within_a_piece(tmp_path, monkeypatch):
    """A chunk of 12M counts takes TileDB seconds to write: a signal arriving meanwhile is
    answered after the piece being submitted (a fraction of a second), not after the chunk,
    and the unfinished store is removed."""
    import signal
    import time

    import tiledbsoma

    n_cells, n_genes, per_cell = 20_000, 2_000, 600  # 12M counts
    indices = np.tile(np.arange(0, n_genes, n_genes // per_cell, dtype=np.int32), n_cells)
    indptr = np.arange(0, n_cells * per_cell + 1, per_cell, dtype=np.int64)
    x = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), (n_cells, n_genes))
    var = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])

    class Alarm(Exception):
        pass

    def ring(signum, frame):
        raise Alarm

    rang: list[float] = []
    write = tiledbsoma.SparseNDArray.write

    def write_and_ring(self, *args, **kwargs):  # the signal comes once the write is underway
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        rang.append(time.perf_counter() + 0.05)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(tiledbsoma.SparseNDArray, "write", write_and_ring)
    previous = signal.signal(signal.SIGALRM, ring)
    path = tmp_path / "big.soma"
    try:
        with pytest.raises(Alarm):
            with open_writer(path, var, n_obs=n_cells) as writer:
                writer.append(x, pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]))
        late = time.perf_counter() - rang[0]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert late < 1.0, f"the signal was answered {late:.1f} s late"
    assert not path.exists() and list(tmp_path.iterdir()) == []
