from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from cellsift.data import open_store
from cellsift.datasets import indexed_atlas, synthetic_atlas


@pytest.fixture(scope="module")
def atlas_stores(data_dir):
    adata = synthetic_atlas(1_500, 200, n_studies=3, seed=5)
    paths = {}
    for fmt in ("h5ad", "zarr", "soma"):
        paths[fmt] = synthetic_atlas(
            1_500, 200, n_studies=3, seed=5, chunk_size=400, path=data_dir / f"stores_test.{fmt}"
        )
    return adata, paths


@pytest.mark.parametrize("fmt", ["h5ad", "zarr", "soma"])
def test_stores_agree_with_anndata(atlas_stores, fmt):
    adata, paths = atlas_stores
    store = open_store(paths[fmt])
    assert store.shape == adata.shape
    assert list(store.var_names) == list(adata.var_names)
    rng = np.random.default_rng(0)
    for rows in (
        np.arange(0, 1_500),
        np.sort(rng.choice(1_500, 97, replace=False)),
        np.array([0]),
        np.array([1_499]),
        np.arange(10, 20),
    ):
        got = store.read(rows)
        assert isinstance(got, sp.csr_matrix) and got.dtype == np.float32
        assert (got != adata.X[rows]).nnz == 0
    np.testing.assert_array_equal(
        np.asarray(store.obs_column("cell_type_ontology_term_id")),
        adata.obs["cell_type_ontology_term_id"].to_numpy(),
    )
    np.testing.assert_allclose(store.obs_column("n_counts"), adata.obs["n_counts"])


def test_empty_read_and_row_checks(atlas_stores):
    _, paths = atlas_stores
    store = open_store(paths["h5ad"])
    assert store.read(np.array([], dtype=np.int64)).shape == (0, 200)
    with pytest.raises(IndexError, match="sorted"):  # (as a collection's read says it)
        store.read(np.array([5, 3]))
    with pytest.raises(IndexError):
        store.read(np.array([1_500]))


def test_h5ad_merges_ranges_without_reading_whole_matrix(atlas_stores):
    from cellsift.data import _csr

    _, paths = atlas_stores
    store = open_store(paths["h5ad"])
    rows = np.array([3, 4, 5, 900, 901])
    starts, ends, _, _ = _csr.segments(store.indptr, rows, max_gap=0)
    assert len(starts) == 2  # two contiguous runs, two reads
    total = ends - starts
    assert total.sum() == store.indptr[6] - store.indptr[3] + store.indptr[902] - store.indptr[900]


def test_layers_and_raw(data_dir):
    adata = indexed_atlas(300, 6)
    counts = adata.X.copy()
    adata.layers["counts"] = counts
    adata.raw = adata.copy()
    adata.X = adata.X * 0.5
    path = data_dir / "layers.h5ad"
    adata.write_h5ad(path)
    for layer in ("counts", "raw"):
        store = open_store(path, layer=layer)
        assert (store.read(np.arange(300)) != counts).nnz == 0
    with pytest.raises(Exception, match="layer="):
        open_store(path, layer="spliced")
    # names that are no layer's (paths h5py or zarr would resolve elsewhere, or refuse as
    # paths: review209, "the file is damaged" of a healthy Zarr): no such layer, the choices
    from cellsift.errors import MissingKeyError

    zarr_path = data_dir / "layers.zarr"
    adata.write_zarr(zarr_path)
    for where in (path, zarr_path):
        for name in ("", ".", "..", "../X", "counts/data"):
            with pytest.raises(MissingKeyError, match=r"has no layers/.*Choose layer= among: X"):
                open_store(where, layer=name)
    adata.layers["0"] = counts  # (a name given as a number reads the layer so named)
    adata.write_h5ad(data_dir / "layer0.h5ad")
    assert (open_store(data_dir / "layer0.h5ad", layer=0).read(np.arange(300)) != counts).nnz == 0


def test_a_layer_named_raw_beside_a_raw_is_named_not_passed_over(tmp_path):
    """layer='raw' names adata.raw; a layer also called 'raw' (counts kept so, with scanpy's
    normalised adata.raw beside it) cannot be read by that name: an error that says so and
    how to reach it, in memory and on disk, instead of reading adata.raw."""
    import anndata as ad

    from cellsift._utils import adata_counts
    from cellsift.errors import DataError, MissingKeyError

    adata = indexed_atlas(40, 6)
    adata.layers["raw"] = adata.X.copy()
    adata.raw = ad.AnnData(adata.X * 0.5, var=adata.var)
    said = r"both a raw \(adata\.raw\) and a layer named 'raw'.*adata\.layers\.pop\('raw'\)"
    with pytest.raises(DataError, match=said):
        adata_counts(adata, "raw")
    with pytest.raises(
        MissingKeyError, match=r"layers\['raw'\] \(rename it to read it\), 'raw' \("
    ):
        adata_counts(adata, "counts")
    for fmt in ("h5ad", "zarr"):
        path = tmp_path / f"both.{fmt}"
        adata.write_h5ad(path) if fmt == "h5ad" else adata.write_zarr(path)
        with pytest.raises(DataError, match=said):
            open_store(path, layer="raw")
    adata.layers["counts"] = adata.layers.pop("raw")  # the fix the error gives
    assert (adata_counts(adata, "counts")[0] != adata.X).nnz == 0
    # a layer named "raw" and no adata.raw: layer="raw" reads it, on disk as in memory
    del adata.raw
    adata.layers["raw"] = adata.layers.pop("counts") * 2
    assert (adata_counts(adata, "raw")[0] != adata.X * 2).nnz == 0
    for fmt in ("h5ad", "zarr"):
        path = tmp_path / f"layer.{fmt}"
        adata.write_h5ad(path) if fmt == "h5ad" else adata.write_zarr(path)
        store = open_store(path, layer="raw")
        assert (store.read(np.arange(40)) != adata.X * 2).nnz == 0
        assert list(store.var_names) == list(adata.var_names)


def test_dense_x_is_read(data_dir):
    adata = indexed_atlas(50, 4)
    adata.X = adata.X.toarray()
    path = data_dir / "dense.h5ad"
    adata.write_h5ad(path)
    store = open_store(path)
    np.testing.assert_array_equal(store.read(np.array([2, 7])).toarray(), adata.X[[2, 7]])


def test_store_pickles_without_handle(atlas_stores):
    import pickle

    _, paths = atlas_stores
    for fmt in ("h5ad", "zarr"):
        store = open_store(paths[fmt])
        store.read(np.arange(3))
        clone = pickle.loads(pickle.dumps(store))
        assert (clone.read(np.arange(3)) != store.read(np.arange(3))).nnz == 0


def test_an_h5ad_deflated_after_another_filter_is_read_through_h5py(tmp_path):
    """Counts N-bit packed, then deflated (h5py names the pipeline "gzip"): read as h5py
    decodes them, not inflated alone and taken for a damaged file."""
    import anndata as ad
    import h5py

    x = sp.random(200, 50, density=0.2, format="csr", dtype=np.float32, random_state=0)
    x.data[:] = np.random.default_rng(0).integers(1, 100, x.nnz)
    path = tmp_path / "nbit.h5ad"
    ad.AnnData(x).write_h5ad(path)
    with h5py.File(path, "a") as f:
        data = f["X/data"][...]
        del f["X/data"]
        kind = h5py.h5t.STD_I32LE.copy()
        kind.set_precision(16)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((64,))
        dcpl.set_filter(5, 0, ())  # H5Z_FILTER_NBIT
        dcpl.set_deflate(4)
        space = h5py.h5s.create_simple((len(data),))
        packed = h5py.Dataset(h5py.h5d.create(f["X"].id, b"data", kind, space, dcpl=dcpl))
        packed[...] = data.astype(np.int32)
        assert packed.compression == "gzip"
    for direct in (True, False):
        assert (open_store(path, direct=direct).read(np.arange(200)) != x).nnz == 0


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_zarr_store_read_by_anndata_is_read_from_several_threads(tmp_path, zarr_format, direct):
    """A Zarr store that zarr itself reads (anndata's, not sharded; or direct=False) read
    from four threads at once (a loader's and the caller's): every read right, none taken
    for damage (one event loop ran one read at a time)."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    import anndata as ad

    adata = synthetic_atlas(600, 50, n_studies=2, seed=1)
    path = tmp_path / "cells.zarr"
    with ad.settings.override(zarr_write_format=zarr_format):
        adata.write_zarr(path)
    store = open_store(path, direct=direct)
    rng = np.random.default_rng(0)
    sets = [np.sort(rng.choice(600, 150, replace=False)) for _ in range(16)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(store.read, sets))
    for rows, x in zip(sets, got, strict=True):
        assert (x != adata.X[rows]).nnz == 0
    clone = pickle.loads(pickle.dumps(store))
    assert (clone.read(sets[0]) != adata.X[sets[0]]).nnz == 0

    async def in_a_running_loop() -> sp.csr_matrix:  # (as a notebook's cells run)
        return store.read(sets[1])

    import asyncio

    assert (asyncio.run(in_a_running_loop()) != adata.X[sets[1]]).nnz == 0


@pytest.mark.parametrize("kind", ["h5ad", "anndata.zarr", "cellsift.zarr", "soma"])
def test_a_store_opened_by_a_relative_path_reads_its_files_after_a_chdir(
    tmp_path, monkeypatch, kind
):
    """Two folders holding stores of one name but other cells; a store (and a collection)
    opened by a relative name in the first reads the first's cells after the working folder
    moves to the second (as a notebook's %cd does): not the second's, nor a mix."""

    from cellsift.data import CellCollection
    from cellsift.data.convert import convert

    name = "cells.zarr" if kind.endswith("zarr") else f"cells.{kind}"
    atlases = {}
    for folder, seed in (("A", 1), ("B", 2)):
        (tmp_path / folder).mkdir()
        adata = synthetic_atlas(300, 200, n_studies=2, seed=seed)
        atlases[folder] = adata
        path = tmp_path / folder / name
        if kind == "anndata.zarr":
            adata.write_zarr(path)
        elif kind == "h5ad":
            adata.write_h5ad(path)
        else:
            convert(adata, path, format="zarr" if kind == "cellsift.zarr" else "soma")
    monkeypatch.chdir(tmp_path / "A")
    store, coll = open_store(name), CellCollection(name)
    monkeypatch.chdir(tmp_path / "B")
    rows = np.arange(0, 300, 7)
    want = atlases["A"].X[rows]
    assert (store.read(rows) != want).nnz == 0
    assert (coll.read(rows) != want).nnz == 0
    assert str(store.path) == name  # (named as given, in messages and outputs)
    # ".." after a link: the folder the system leads it to (A's), not the link's own
    (tmp_path / "A" / "sub").mkdir()
    (tmp_path / "B" / "link").symlink_to(tmp_path / "A" / "sub")
    through = open_store(f"link/../{name}")
    assert (through.read(rows) != want).nnz == 0


def test_genes_detected_where_free_and_by_a_pass(atlas_stores, data_dir):
    adata, paths = atlas_stores
    want = np.diff(adata.X.indptr)
    h5, soma = open_store(paths["h5ad"]), open_store(paths["soma"])
    np.testing.assert_array_equal(h5.stored_row_nnz(), want)
    assert soma.stored_row_nnz() is None  # SOMA keeps no row pointer: no pass unless asked
    np.testing.assert_array_equal(soma.row_nnz(), want)
    assert h5.nnz == soma.nnz == adata.X.nnz
    dense = indexed_atlas(40, 4)
    dense.X = dense.X.toarray()
    dense.X[3] = 0
    dense.write_h5ad(data_dir / "dense_empty.h5ad")
    from cellsift.data import CellCollection

    coll = CellCollection(data_dir / "dense_empty.h5ad", min_genes=1)  # filter applies to dense X
    assert coll.n_obs == 39 and 3 not in coll.cell_ids


def test_soma_reads_in_bounded_queries(atlas_stores, monkeypatch):
    from cellsift.data._soma import SomaStore

    adata, paths = atlas_stores
    store = open_store(paths["soma"])
    rows = np.sort(np.random.default_rng(3).choice(1_500, 700, replace=False))
    monkeypatch.setattr(SomaStore, "max_rows_per_query", 64)  # 11 queries instead of one
    assert (store.read(rows) != adata.X[rows]).nnz == 0


def test_soma_reads_go_without_tiledbs_preprocess_tile_merge(atlas_stores):
    """TileDB 2.30's sparse global-order reader, its "preprocess tile merge" on, corrupts
    the heap now and then (a race in its parallel merge: a process reading the obs of
    stores written chunk by chunk died in one test run in a few). The store's reads,
    here and in a loader worker's copy, go without it, beside the user's settings."""
    import pickle

    _, paths = atlas_stores
    store = open_store(paths["soma"], tiledb_config={"soma.init_buffer_bytes": 1 << 20})
    for reader in (store, pickle.loads(pickle.dumps(store))):
        config = reader.handle.context.native_context.config()
        assert config["sm.query.sparse_global_order.preprocess_tile_merge"] == "0"
        assert config["sm.enable_signal_handlers"] == "false"
        assert config["soma.init_buffer_bytes"] == str(1 << 20)
        assert len(reader.var_names) == 200


_CTRL_C_AFTER_SOMA = """
import os, signal, sys, time
from cellsift.data import CellCollection, CellLoader, IterableCellDataset
from cellsift.data.convert import convert

signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a loader worker, or a job started with &
convert(sys.argv[1], sys.argv[2])  # a SOMA store written, then opened and read
for _ in CellLoader(IterableCellDataset(CellCollection(sys.argv[2]), batch_size=100)):
    pass
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.5)
print("ignored")
"""


_CTRL_C_AFTER_SOMA_IN_A_THREAD = """
import os, signal, sys, threading, time
from cellsift.data import CellCollection
from cellsift.data.convert import convert

signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a loader worker, or a job started with &
def write_and_read():  # (TileDB first opened outside the main thread: a worker's reads)
    if sys.argv[3] == "write":
        convert(sys.argv[1], sys.argv[2])
    coll = CellCollection(sys.argv[2])
    coll.read(coll.cell_ids[:10])
thread = threading.Thread(target=write_and_read)
thread.start()
thread.join()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.5)
print("ignored")
"""


def test_ctrl_c_after_tiledb_is_as_python_set_it(indexed_paths, tmp_path):
    """TileDB installs a SIGINT handler of its own when it first opens an array, which
    passes the signal on to the handler it replaced: where that was "ignore" (a loader
    worker, a job started in the background), the process crashed (a segfault) on Ctrl-C.
    Python's handler is given back; and cellsift's contexts ask TileDB for none, so a store
    first written or opened in another thread (where Python's handler cannot be given back:
    a spawned loader worker's, which crashed a fit stopped by Ctrl-C) leaves it too."""
    h5ad, soma = str(indexed_paths["h5ad"]), str(tmp_path / "s.soma")
    for script, args in (
        (_CTRL_C_AFTER_SOMA, []),
        (_CTRL_C_AFTER_SOMA_IN_A_THREAD, ["read"]),  # (the store written above: read only)
        (_CTRL_C_AFTER_SOMA_IN_A_THREAD, ["write"]),
    ):
        if args == ["write"]:
            shutil.rmtree(soma)
        done = subprocess.run(
            [sys.executable, "-c", script, h5ad, soma, *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0 and done.stdout.strip() == "ignored", (
            args,
            done.returncode,
            done.stderr[-2000:],
        )


@pytest.mark.parametrize("fmt", ["h5ad", "zarr", "soma"])
def test_each_format_reads_into_a_vocabulary_of_its_genes_reordered(indexed_paths, fmt):
    """A collection whose gene vocabulary holds a store's genes in another order (a model's,
    or a mixed collection's first store's) reads every format alike, equal to the AnnData
    with its columns reordered. (TileDB-SOMA's values come in read-only Arrow memory,
    which the reordering sorted in place: it copies them now.)"""
    import anndata as ad

    from cellsift.data import CellCollection

    adata = ad.read_h5ad(indexed_paths["h5ad"])
    order = np.random.default_rng(0).permutation(adata.n_vars)
    coll = CellCollection(indexed_paths[fmt], genes=list(adata.var_names[order]))
    rows = np.array([0, 3, 699, 700, 1500])
    got = coll.read(coll.cell_ids[rows])
    assert got.has_sorted_indices
    assert got.data.flags.writeable  # (a batch's values: a transform may change them)
    np.testing.assert_array_equal(got.toarray(), adata.X[rows][:, order].toarray())


def test_text_of_a_column_shares_its_values_and_reads_as_numpy_writes_them():
    """text_or_none (every text column of the embeddings' metadata, every text obs column
    a collection reads) keeps text as the objects it is: a categorical's cells share its
    categories' text rather than each holding a copy (about 1 KB a cell over a few columns);
    other values read as numpy writes them, missing ones as None."""
    import pandas as pd

    from cellsift._utils import text_or_none

    values = np.array(["a", 1, 1.0, None, np.nan, b"x", np.str_("s"), True, pd.NA], dtype=object)
    want = values.astype(str).astype(object)
    want[pd.isna(values)] = None
    assert list(text_or_none(values)) == list(want)
    for one in ("a", 1.5, None):  # a single value: a 0-d array, as numpy gives it
        got = text_or_none(np.array(one, dtype=object))
        assert got.shape == () and got.item() == (None if one is None else str(one))
    cat = pd.Categorical(["a long cell type name " * 4, "B cell"] * 1000)
    out = text_or_none(np.asarray(cat))
    assert list(out) == list(cat.astype(str))
    assert all(x is cat.categories[cat.codes[i]] for i, x in enumerate(out))


def test_a_path_starting_with_a_tilde_is_said_to_be_taken_as_written(tmp_path, monkeypatch):
    """Python does not expand '~' (a shell does, unquoted): a store named so that does not
    exist says so and gives the path written out, where the home folder holds it."""
    import anndata as ad

    monkeypatch.setenv("HOME", str(tmp_path))
    ad.AnnData(sp.csr_matrix(np.ones((2, 3), np.float32))).write_h5ad(tmp_path / "cells.h5ad")
    with pytest.raises(FileNotFoundError, match=r"'~' is not expanded .*cells\.h5ad\)"):
        open_store("~/cells.h5ad")
    assert open_store(tmp_path / "cells.h5ad").n_obs == 2
