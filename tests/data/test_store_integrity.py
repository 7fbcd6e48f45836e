"""Zarr stores with a lost chunk or shard file are refused, by name, never read as zeros.

Stores are written by cellsift's own writer (through ``convert``) and by anndata (zarr v2,
v3, v3 sharded), with small chunks so each array has several files; reads are compared with
the source matrix through numpy.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellsift.data import CellCollection, open_store
from cellsift.data.convert import convert
from cellsift.errors import DataError

KINDS = ["cellsift", "anndata-v2", "anndata-v3", "anndata-v3-sharded"]


def _counts(n_obs: int, n_vars: int, *, gene0_rows: int = 0, seed: int = 0) -> sp.csr_matrix:
    """Random integer counts; the first ``gene0_rows`` cells hold one count, in gene 0."""
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.3, size=(n_obs, n_vars)).astype(np.float32)
    dense[:gene0_rows] = 0
    dense[:gene0_rows, 0] = np.arange(1, gene0_rows + 1)
    dense[gene0_rows:, 1] += 1  # every other cell has counts
    return sp.csr_matrix(dense)


def _adata(x: sp.csr_matrix) -> ad.AnnData:
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(x.shape[0])])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(x.shape[1])])
    return ad.AnnData(x, obs=obs, var=var)


def _write(kind: str, x: sp.csr_matrix, folder: Path) -> Path:
    """``x`` as a Zarr store of ``kind``, its CSR arrays in chunks of 100 (shards of 500)."""
    import zarr

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.zarr"
    adata = _adata(x)
    if kind == "cellsift":
        src = folder / "source.h5ad"
        adata.write_h5ad(src)
        return convert(src, path, chunk_elems=100, shard_elems=500, chunk_size=97)
    fmt = 2 if kind == "anndata-v2" else 3
    kwargs: dict[str, tuple[int]] = {"chunks": (100,)}
    if kind == "anndata-v3-sharded":
        kwargs["shards"] = (500,)
    with warnings.catch_warnings(), ad.settings.override(zarr_write_format=fmt):
        warnings.simplefilter("ignore")  # anndata's notices on zarr formats
        root = zarr.open_group(path, mode="w", zarr_format=fmt)
        root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        ad.io.write_elem(root, "X", x, dataset_kwargs=kwargs)
        ad.io.write_elem(root, "obs", adata.obs)
        ad.io.write_elem(root, "var", adata.var)
    return path


def _file(path: Path, array: str, k: int) -> Path:
    """The file of storage chunk (or shard) ``k`` of ``X/<array>``, whatever its key style."""
    folder = path / "X" / array
    return folder / "c" / str(k) if (folder / "c").is_dir() else folder / str(k)


def _overwrite(path: Path, at: int, junk: bytes) -> None:
    """``junk`` written over ``path``'s bytes from offset ``at`` (a chunk's damage)."""
    raw = bytearray(path.read_bytes())
    raw[at : at + len(junk)] = junk
    path.write_bytes(bytes(raw))


def _first_chunk_at(path: Path, dataset: str) -> int:
    """Where the first chunk of h5ad ``path``'s ``dataset`` lies in the file."""
    import h5py

    with h5py.File(path) as f:
        return int(f[dataset].id.get_chunk_info(0).byte_offset)


@pytest.fixture(scope="module")
def counts() -> sp.csr_matrix:
    return _counts(400, 30)


@pytest.fixture(scope="module")
def stores(counts, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("integrity")
    return {kind: _write(kind, counts, folder) for kind in KINDS}


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_intact_stores_read_exactly(stores, counts, kind, direct):
    store = open_store(stores[kind], direct=direct)
    want = counts.toarray()
    for rows in (np.arange(400), np.sort(np.random.default_rng(1).choice(400, 57, replace=False))):
        np.testing.assert_array_equal(store.read(rows).toarray(), want[rows])


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("array", ["data", "indices"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_lost_chunk_file_is_refused_by_name(stores, kind, array, direct, tmp_path):
    path = tmp_path / stores[kind].name
    shutil.copytree(stores[kind], path)
    lost = _file(path, array, 1)
    lost.unlink()  # an interrupted copy
    key = str(lost.relative_to(path))
    with pytest.raises(DataError, match=re.escape(key)) as err:
        open_store(path, direct=direct)
    assert "incomplete or corrupt" in str(err.value)
    assert "Copy the store again or re-create it" in str(err.value)
    with pytest.raises(DataError, match=re.escape(key)):
        CellCollection(path)


def test_a_shard_lost_after_opening_is_refused_on_read(stores, counts, tmp_path):
    path = tmp_path / "lost_later.zarr"
    shutil.copytree(stores["cellsift"], path)
    store = open_store(path)
    assert store._direct is not None  # read straight from the shard files
    lost = _file(path, "data", 1)
    lost.unlink()
    indptr = counts.indptr
    in_shard = np.flatnonzero((indptr[:-1] >= 500) & (indptr[1:] <= 1000))
    with pytest.raises(DataError, match=re.escape(str(lost))):
        store.read(in_shard[:5])
    before = np.flatnonzero(indptr[1:] <= 500)  # rows of shard 0 still read exactly
    np.testing.assert_array_equal(store.read(before).toarray(), counts[before].toarray())


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_index_chunks_of_gene_zero_only_are_not_lost(kind, direct, tmp_path):
    """zarr writes no file for a chunk of fill values: column indices that are all 0 (each
    cell there holds one count, in gene 0) are such a chunk, not a lost file."""
    x = _counts(1_200, 30, gene0_rows=700)
    path = _write(kind, x, tmp_path)
    if kind == "cellsift":  # cellsift writes every chunk
        assert _file(path, "indices", 0).exists()
    else:
        assert not _file(path, "indices", 0).exists()
    store = open_store(path, direct=direct)
    np.testing.assert_array_equal(store.read(np.arange(1_200)).toarray(), x.toarray())
    rows = np.array([0, 5, 699, 700, 1_199])
    np.testing.assert_array_equal(store.read(rows).toarray(), x[rows].toarray())


def test_a_sharded_folder_named_zarr_is_named_as_such(tmp_path):
    src = tmp_path / "source.h5ad"
    _adata(_counts(50, 10)).write_h5ad(src)
    out = convert(src, tmp_path / "sharded.zarr", shard_size=20)
    assert (out / "manifest.json").is_file()
    with pytest.raises(DataError, match=r"sharded store .*CellCollection\(path\)"):
        open_store(out)
    assert CellCollection(out).n_obs == 50


@pytest.mark.parametrize("part", ["data", "indices"])
@pytest.mark.parametrize("kind", ["cellsift", "h5ad"])
def test_a_matrix_without_its_values_or_columns_is_named_as_damage(stores, kind, part, tmp_path):
    """X without its data or indices (an element a copy lost): the store's damage, named
    with the element, as a lost row pointer is (not a KeyError from the reader)."""
    import h5py

    if kind == "h5ad":
        path = tmp_path / "cells.h5ad"
        ad.AnnData(_counts(20, 5)).write_h5ad(path)
        with h5py.File(path, "a") as f:
            del f[f"X/{part}"]
    else:
        path = tmp_path / stores[kind].name
        shutil.copytree(stores[kind], path)
        shutil.rmtree(path / "X" / part)
    with pytest.raises(DataError, match=rf"X/{part} cannot be read .* damaged or incomplete"):
        open_store(path)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_a_chunk_cut_short_is_named_as_damage_whatever_the_array(stores, kind, direct, tmp_path):
    """A chunk file cut short (an interrupted copy) in the row pointer, the cell names or
    the counts: the element and the damage are named, not the codec's error alone (review:
    "Zstd decompression error" from numcodecs, a traceback)."""
    for element in ("X/indptr", "obs/_index", "X/data"):
        path = tmp_path / f"{element.replace('/', '_')}-{stores[kind].name}"
        shutil.copytree(stores[kind], path)
        folder = path / element
        chunk = next(p for p in sorted(folder.rglob("*")) if p.is_file() and p.name[0] != ".")
        if chunk.name == "zarr.json":
            chunk = next(p for p in sorted((folder / "c").rglob("*")) if p.is_file())
        chunk.write_bytes(chunk.read_bytes()[: max(chunk.stat().st_size // 2, 1)])
        with pytest.raises(DataError) as err:
            store = open_store(path, direct=direct)
            store.obs_names  # noqa: B018 (read when asked)
            store.read(np.arange(store.n_obs))
        said = str(err.value)
        assert said.startswith(str(path)), said
        what = "X of cells 0-399" if element == "X/data" else element
        if f"{what} cannot be read" not in said:  # direct reads name the file (a checksum)
            assert element == "X/data" and direct and "X/data/" in said, said
        else:
            assert "the file is damaged or incomplete" in said, said


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("kind", ["h5ad", "zarr-v3", "zarr-v3-sharded"])
def test_a_damaged_gzip_chunk_is_named_as_damage(counts, kind, direct, tmp_path):
    """A gzip chunk whose bytes were overwritten (h5ad written with compression="gzip",
    Zarr v3 with a gzip codec): the store's damage, named, not zlib's bare error (hunt209:
    ``zlib.error`` raised through the direct reads and Zarr's)."""
    import zarr
    from zarr.codecs import GzipCodec

    if kind == "h5ad":
        path = tmp_path / "gz.h5ad"
        _adata(counts).write_h5ad(path, compression="gzip")
        _overwrite(path, _first_chunk_at(path, "X/data") + 10, b"\0" * 30)
    else:
        path = tmp_path / f"{kind}.zarr"
        with warnings.catch_warnings(), ad.settings.override(zarr_write_format=3):
            warnings.simplefilter("ignore")  # anndata's notices on zarr formats
            root = zarr.open_group(path, mode="w", zarr_format=3)
            root.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
            ad.io.write_elem(root, "X", counts, dataset_kwargs={"compressors": [GzipCodec()]})
            ad.io.write_elem(root, "obs", _adata(counts).obs)
            ad.io.write_elem(root, "var", _adata(counts).var)
            if kind.endswith("sharded"):  # (the values again, in chunks within shards)
                del root["X"]["data"]
                root["X"].create_array(
                    "data",
                    data=counts.data,
                    chunks=(100,),
                    shards=(400,),
                    compressors=[GzipCodec()],
                )
        np.testing.assert_array_equal(
            open_store(path, direct=direct).read(np.arange(400)).toarray(), counts.toarray()
        )
        chunk = _file(path, "data", 0)
        _overwrite(chunk, 30, b"\x07" * 30)
    with pytest.raises(DataError, match=r"X of cells 0-399 cannot be read \((zlib\.error|OSError)"):
        open_store(path, direct=direct).read(np.arange(400))


@pytest.mark.parametrize("kind", ["h5ad", "zarr"])
def test_a_damaged_chunk_of_dense_counts_is_named_as_damage(counts, kind, tmp_path):
    """Dense counts (h5ad with gzip, Zarr v3 with its default codec) whose first chunk was
    overwritten: named as the store's damage when rows, a block or a collection's sample
    are read (hunt275: h5py's or the codec's bare error, no file named)."""

    adata = ad.AnnData(counts.toarray(), obs=_adata(counts).obs, var=_adata(counts).var)
    if kind == "h5ad":
        path = tmp_path / "dense.h5ad"
        adata.write_h5ad(path, compression="gzip")
        _overwrite(path, _first_chunk_at(path, "X") + 5, b"\x13" * 40)
    else:
        path = tmp_path / "dense.zarr"
        with warnings.catch_warnings(), ad.settings.override(zarr_write_format=3):
            warnings.simplefilter("ignore")  # anndata's notices on zarr formats
            adata.write_zarr(path)
        chunk = next(p for p in sorted((path / "X").rglob("*")) if p.is_file() and p.name == "0")
        _overwrite(chunk, 3, b"\xff" * 30)
    store = open_store(path)
    said = rf"{re.escape(str(path))}: X of cells 0-(0|3|399) cannot be read .* damaged"
    for read in (lambda: store.read(np.array([0])), lambda: store.read(np.array([0, 3]))):
        with pytest.raises(DataError, match=said):
            read()
    with pytest.raises(DataError, match=said):
        store.row_sums()
    with pytest.raises(DataError, match=said):
        CellCollection([path])


def test_what_is_not_damage_is_not_called_damage(counts, tmp_path, monkeypatch):
    """An HDF5 filter whose plugin is not loaded is named with the fix where a read needs
    it (a chunk the filter skipped reads); dense X of text is no counts; a store closed by
    another thread during a read raises the read's own error (review239: each called the
    file damaged or incomplete)."""
    import h5py
    from h5py import h5d, h5p, h5s, h5t, h5z

    dense = counts.toarray()[:40]
    assert not h5z.filter_avail(32015)  # (zstd's plugin, not installed here)
    for mask in (0, 1):  # (chunks as the plugin stores them; chunks it skipped)
        path = tmp_path / f"plugin{mask}.h5ad"
        ad.AnnData(dense).write_h5ad(path)
        with h5py.File(path, "r+") as f:
            del f["X"]
            plist = h5p.create(h5p.DATASET_CREATE)
            plist.set_chunk((8, dense.shape[1]))
            plist.set_filter(32015, h5z.FLAG_OPTIONAL)  # (as h5py sets a plugin's filter)
            space = h5s.create_simple(dense.shape)
            h5d.create(f.id, b"X", h5t.NATIVE_FLOAT, space, dcpl=plist)
            for k in range(0, 40, 8):
                f["X"].id.write_direct_chunk((k, 0), dense[k : k + 8].tobytes(), filter_mask=mask)
            f["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        store = open_store(path)
        if mask:
            np.testing.assert_array_equal(store.read(np.array([0, 9])).toarray(), dense[[0, 9]])
            continue
        said = r"/X is compressed with the HDF5 filter 32015, which .* \(pip install hdf5plugin"
        with pytest.raises(DataError, match=said):
            store.read(np.array([0]))
        with pytest.raises(DataError, match=said):
            store.row_sums()
    text = tmp_path / "text.h5ad"
    ad.AnnData(dense).write_h5ad(text)
    with h5py.File(text, "r+") as f:
        del f["X"]
        f["X"] = np.full(dense.shape, b"a", dtype="S3")
        f["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    with pytest.raises(DataError, match=r"holds X of \|S3 values, not counts"):
        open_store(text)
    path = tmp_path / "dense.h5ad"
    ad.AnnData(dense).write_h5ad(path)
    store = open_store(path)
    matrix = type(store)._matrix

    def closing(self, root):  # (another thread closes the store as the read begins)
        found = matrix(self, root)
        self.close()
        return found

    import pickle  # (a store closed, or unpickled, before a read: damage still named)

    for fresh in (store, pickle.loads(pickle.dumps(store))):
        fresh.close()
        np.testing.assert_array_equal(fresh.read(np.array([0, 3])).toarray(), dense[[0, 3]])
    monkeypatch.setattr(type(store), "_matrix", closing)
    with pytest.raises(RuntimeError, match="identifier is not of specified type"):
        store.read(np.array([0, 3]))


def test_a_gzip_chunk_stored_without_its_filter_reads_as_h5py_reads_it(counts, tmp_path):
    """HDF5 lets a chunk of a gzip dataset be stored raw, its filter marked skipped (bit 0
    of the chunk's filter mask, as a writer of raw chunks sets it): read as it is, not
    inflated (hunt275: refused as damage, while h5py and anndata read the file)."""
    import zlib

    import h5py

    path = tmp_path / "mask.h5ad"
    _adata(counts).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        data = f["X/data"][...]
        del f["X/data"]
        ds = f["X"].create_dataset(
            "data", shape=data.shape, dtype=data.dtype, chunks=(64,), compression="gzip"
        )
        for k in range(0, len(data), 64):
            block = np.zeros(64, data.dtype)
            block[: len(data[k : k + 64])] = data[k : k + 64]
            if k % 128 == 0:  # (every other chunk raw)
                ds.id.write_direct_chunk((k,), block.tobytes(), filter_mask=1)
            else:
                ds.id.write_direct_chunk((k,), zlib.compress(block.tobytes()))
    for direct in (True, False):
        store = open_store(path, direct=direct)
        assert (store._direct is not None) == direct
        np.testing.assert_array_equal(store.read(np.arange(400)).toarray(), counts.toarray())
        rows = np.array([3, 150, 399])
        np.testing.assert_array_equal(store.read(rows).toarray(), counts[rows].toarray())


@pytest.mark.parametrize("kind", ["h5ad", "zarr"])
def test_damaged_metadata_is_named_as_damage_on_open_and_on_convert(kind, tmp_path):
    """An object header of X (h5ad) or X's zarr.json (Zarr) overwritten: opening the store
    names its layout as damaged; obsm's header so damaged (h5ad): convert, which lists the elements
    it does not carry over, names them so. Not h5py's KeyError or json's error (hunt227: a
    traceback and exit 1 from every command)."""
    import h5py

    adata = _adata(_counts(20, 5))
    adata.obsm["X_umap"] = np.zeros((20, 2))
    damaged = [("X", "its layout")] + ([("obsm", "its other elements")] if kind == "h5ad" else [])
    for element, what in damaged:
        path = tmp_path / f"{element}.{kind}"
        if kind == "h5ad":
            adata.write_h5ad(path)
            with h5py.File(path) as f:
                at = h5py.h5o.get_info(f[element].id).addr
            with open(path, "r+b") as fh:
                fh.seek(at)
                fh.write(b"\xff" * 16)
        else:  # (cellsift's Zarr: anndata's consolidates its metadata, read from the root)
            path = _write("cellsift", adata.X, tmp_path / "written")
            meta = path / element / "zarr.json"
            meta.write_text(meta.read_text()[:20])
        pattern = rf"{re.escape(str(path))}: {what} .*cannot be read .* damaged or incomplete"
        with pytest.raises(DataError, match=pattern):
            open_store(path)
            convert(path, tmp_path / f"{element}-{kind}.zarr")
        assert not (tmp_path / f"{element}-{kind}.zarr").exists()


@pytest.mark.parametrize("kind", ["h5ad", "zarr"])
@pytest.mark.parametrize(
    ("element", "said"),
    [
        ("obs/score", r"obs column 'score' holds 4 values for 6 cells"),
        ("obs/_index", r"obs/_index, the cells' names, holds 4 entries for 6 cells"),
        ("var/_index", r"var, the genes' table, holds 2 entries for 3 genes of X"),
    ],
)
def test_an_obs_or_var_element_of_another_length_is_named_as_damage(kind, element, said, tmp_path):
    """An obs column, the cells' names or the genes' table with fewer entries than the
    matrix has cells or genes (anndata refuses such a file). Read, `cellsift info` counted
    a short column's values as the column's and convert raised an IndexError from deep
    inside (hunt258); a short gene table shifted every cell's counts onto other genes and
    read values of the next cell (review227)."""
    adata = _adata(_counts(6, 3))
    adata.obs["score"] = [1.5, np.nan, 10.0, 2.0, np.nan, -1.0]
    path = tmp_path / f"short.{kind}"
    keep = 2 if element.startswith("var") else 4
    if kind == "h5ad":
        import h5py

        adata.write_h5ad(path)
        with h5py.File(path, "r+") as f:
            values, attrs = f[element][:keep], dict(f[element].attrs)
            del f[element]
            f[element] = values
            f[element].attrs.update(attrs)
    else:
        import zarr

        adata.write_zarr(path)
        group = zarr.open_group(path, mode="a")
        values, attrs = group[element][:keep], dict(group[element].attrs)
        del group[element]
        parent, name = element.split("/")
        group[parent].create_array(name, data=values).attrs.update(attrs)
        zarr.consolidate_metadata(path)
    pattern = rf"{said}: the file is damaged or incomplete\. Write it again"
    with pytest.raises(DataError, match=pattern):
        store = open_store(path)
        _ = store.obs_column("score"), store.obs_names, store.n_vars
    with pytest.raises(DataError, match=pattern):
        convert(path, tmp_path / f"short-{kind}.zarr")
    assert not (tmp_path / f"short-{kind}.zarr").exists()
    if element.startswith("var"):  # (aligned to the genes the file names: no counts read)
        with pytest.raises(DataError, match=pattern):
            CellCollection([path], genes=["gene0", "gene1"]).read(np.arange(2))
        with pytest.raises(DataError, match=pattern) as err:  # (its path said once, review228)
            CellCollection([path])
        assert str(err.value).count(str(path)) == 1
