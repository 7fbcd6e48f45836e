"""Whole-store scans (genes and counts per cell, conversion) in chunks bounded by values.

A dense X of many genes must not be read 65,536 cells at a time: chunks hold at most
``stores.SCAN_VALUES`` values. Results are compared with numpy on the source matrix.
"""

from __future__ import annotations

import itertools
import warnings
from types import SimpleNamespace

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellsift.data import open_store, stores
from cellsift.data.convert import convert
from cellsift.data.writers import StoreWriter
from cellsift.errors import ConfigError


def _counts(n_obs: int = 300, n_vars: int = 40, seed: int = 0) -> np.ndarray:
    """Dense integer counts with empty cells and a few cells of many genes."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.4, size=(n_obs, n_vars)).astype(np.float32)
    x[::37] = 0  # empty cells
    x[5::50] = rng.integers(1, 9, size=(len(x[5::50]), n_vars))  # cells with every gene
    return x


def _write(x: np.ndarray, path, *, dense: bool):
    obs = pd.DataFrame(index=[f"c{i}" for i in range(x.shape[0])])
    var = pd.DataFrame(index=[f"g{j}" for j in range(x.shape[1])])
    adata = ad.AnnData(x if dense else sp.csr_matrix(x), obs=obs, var=var)
    if path.suffix == ".zarr":
        with warnings.catch_warnings(), ad.settings.override(zarr_write_format=3):
            warnings.simplefilter("ignore")  # zarr's notice on consolidated v3 metadata
            adata.write_zarr(path)
    else:
        adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan")
    x = _counts()
    return x, {
        "dense-h5ad": _write(x, folder / "dense.h5ad", dense=True),
        "csr-h5ad": _write(x, folder / "csr.h5ad", dense=False),
        "dense-zarr": _write(x, folder / "dense.zarr", dense=True),
        "csr-zarr": _write(x, folder / "csr.zarr", dense=False),
    }


KINDS = ["dense-h5ad", "csr-h5ad", "dense-zarr", "csr-zarr"]


@pytest.mark.parametrize("budget", [None, 50, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_genes_and_counts_per_cell_equal_numpy(paths, kind, budget, monkeypatch):
    x, where = paths
    if budget is not None:  # many chunks, cut inside runs of cells
        monkeypatch.setattr(stores, "SCAN_VALUES", budget)
    store = open_store(where[kind])
    np.testing.assert_array_equal(store.row_nnz(), (x != 0).sum(1))
    np.testing.assert_allclose(store.row_sums(), x.sum(1, dtype=np.float64), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_iter_chunks_are_bounded_and_cover_the_store(paths, kind, monkeypatch):
    x, where = paths
    monkeypatch.setattr(stores, "SCAN_VALUES", 120)
    store = open_store(where[kind])
    dense = kind.startswith("dense")
    parts, next_start = [], 0
    for start, chunk in store.iter_chunks():
        assert start == next_start
        next_start += chunk.shape[0]
        values = chunk.shape[0] * chunk.shape[1] if dense else chunk.nnz
        assert values <= 120 or chunk.shape[0] == 1  # (one cell may hold more)
        parts.append(chunk.toarray())
    assert len(parts) > 1
    np.testing.assert_array_equal(np.concatenate(parts), x)
    for _start, chunk in store.iter_chunks(chunk_size=7):
        assert chunk.shape[0] <= 7


def test_a_wide_dense_store_is_scanned_in_fewer_cells(tmp_path):
    """100,000 genes: a chunk holds SCAN_VALUES // 100,000 cells, not 65,536 (26 GB)."""
    n_obs, n_vars = 1_000, 100_000
    path = tmp_path / "wide.h5ad"
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_obs)])
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_vars)])
    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    with h5py.File(path, "a") as f:  # X never written: all fill value, a small file
        if "X" in f:
            del f["X"]
        d = f.create_dataset("X", shape=(n_obs, n_vars), dtype=np.float32, chunks=(8, n_vars))
        d.attrs["encoding-type"], d.attrs["encoding-version"] = "array", "0.2.0"
    store = open_store(path)
    bounds = store.chunk_bounds()
    rows = stores.SCAN_VALUES // n_vars
    assert bounds[0] == (0, rows) and rows < 65_536
    assert bounds[-1][1] == n_obs
    assert all(b - a <= rows for a, b in bounds)


def test_convert_writes_dense_sources_in_bounded_chunks(paths, tmp_path, monkeypatch):
    x, where = paths
    monkeypatch.setattr(stores, "SCAN_VALUES", 400)  # 10 cells of 40 genes
    sizes: list[int] = []
    append = StoreWriter.append

    def record(self, counts, obs):
        sizes.append(counts.shape[0])
        append(self, counts, obs)

    monkeypatch.setattr(StoreWriter, "append", record)
    out = convert(where["dense-h5ad"], tmp_path / "out.h5ad", min_genes=1)
    assert sizes and max(sizes) <= 10
    keep = (x != 0).sum(1) >= 1
    np.testing.assert_array_equal(ad.read_h5ad(out).X.toarray(), x[keep])


@pytest.mark.parametrize("chunk_size", [0, -5])
def test_convert_refuses_a_chunk_size_below_one(paths, tmp_path, chunk_size):
    _, where = paths
    with pytest.raises(ConfigError, match="chunk_size must be at least 1"):
        convert(where["csr-h5ad"], tmp_path / "out.zarr", chunk_size=chunk_size)
    assert not (tmp_path / "out.zarr").exists()


def test_a_store_without_a_row_pointer_is_planned_by_its_density(indexed_paths, monkeypatch):
    """SOMA keeps no row pointer but knows its total: scans are planned by the mean values a
    cell holds, not as if every gene held one (a wide sparse atlas read in tiny queries)."""
    soma = open_store(indexed_paths["soma"])
    assert soma.stored_row_nnz() is None and soma.nnz is not None
    per = -(-soma.nnz // soma.n_obs)
    np.testing.assert_array_equal(soma.values_per_row(), np.full(soma.n_obs, per))
    assert per < soma.n_vars
    monkeypatch.setattr(stores, "SCAN_VALUES", 10 * per)  # ten cells of the mean a chunk
    assert soma.chunk_bounds()[0] == (0, 10)


def test_row_counts_of_a_scan_chunk_equal_scipy_and_hold_no_copy_of_its_values():
    """Genes (nonzero values) and float64 sums per row of a CSR chunk: rows empty, of
    stored zeros only, a row pointer not starting at 0, and row blocks of 2**20 values
    crossed; against scipy. Memory beside the chunk: about a byte a value (the zeros'
    mask), not the 8 bytes of an int64 running count or a float64 copy."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n, genes = 3_000, 1_000
    x = sp.random(n, genes, density=0.5, format="csr", random_state=1, dtype=np.float32)
    x.data = rng.integers(0, 5, x.nnz).astype(np.float32)  # stored zeros among them
    x = sp.csr_matrix(x)
    x.data[x.indptr[7] : x.indptr[8]] = 0  # a row of stored zeros only
    x = sp.vstack([x[:10], sp.csr_matrix((5, genes), dtype=np.float32), x[10:]], format="csr")
    assert x.nnz > 1 << 20 and (np.diff(x.indptr) == 0).sum() >= 5
    want_nnz = np.array([np.count_nonzero(x.data[a:b]) for a, b in itertools.pairwise(x.indptr)])
    want_sums = np.array(
        [x.data[a:b].astype(np.float64).sum() for a, b in itertools.pairwise(x.indptr)]
    )
    tracemalloc.start()
    nnz, sums = stores._csr_row_nnz_and_sums(x)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(nnz, want_nnz)
    np.testing.assert_array_equal(sums, want_sums)
    assert peak < 2 * x.nnz + (16 << 20), peak  # (the mask, and row blocks of 8 MB)
    # a chunk whose row pointer starts inside its arrays (rows of a larger matrix's;
    # scipy makes none, so only the arrays the function reads)
    part = SimpleNamespace(data=x.data, indptr=x.indptr[100:201])
    nnz, sums = stores._csr_row_nnz_and_sums(part)
    np.testing.assert_array_equal(nnz, want_nnz[100:200])
    np.testing.assert_array_equal(sums, want_sums[100:200])
