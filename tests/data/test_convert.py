from __future__ import annotations

import json
import re
import shutil

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cellsift._warnings import CellsiftWarning
from cellsift.data import CellCollection, open_store
from cellsift.data.convert import convert
from cellsift.data.writers import ZarrWriter
from cellsift.errors import ConfigError, DataError


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("h5ad", "zarr"),
        ("zarr", "soma"),
        ("soma", "h5ad"),
        ("h5ad", "soma"),
        ("soma", "zarr"),
        ("zarr", "h5ad"),
    ],
)
def test_convert_roundtrip_every_direction(indexed_paths, tmp_path, src, dst):
    out = convert(indexed_paths[src], tmp_path / f"out.{dst}")
    a, b = open_store(indexed_paths[src]), open_store(out)
    rows = np.arange(a.n_obs)
    assert (a.read(rows) != b.read(rows)).nnz == 0
    assert list(a.var_names) == list(b.var_names)
    for col in ("cell_type_ontology_term_id", "dataset_id", "obs_index"):
        np.testing.assert_array_equal(
            np.asarray(a.obs_column(col)).astype(str), np.asarray(b.obs_column(col)).astype(str)
        )


@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("dst", ["h5ad", "zarr", "soma"])
def test_text_columns_of_pandas_string_type_convert(tmp_path, dst, gaps):
    """An obs column of pandas' nullable string type (anndata writes it as a
    nullable-string-array when asked to) converts to every format, gaps kept; writing it
    as anndata's default refused it after all of X had been written."""
    import pandas as pd

    n = 30
    values = pd.array([None if gaps and i % 7 == 0 else f"bc{i}" for i in range(n)], "string")
    obs = pd.DataFrame({"sample": values}, index=[f"c{i}" for i in range(n)])
    adata = ad.AnnData(
        sp.csr_matrix(np.ones((n, 4), np.float32)), obs=obs, var=pd.DataFrame(index=list("abcd"))
    )
    with ad.settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(tmp_path / "in.h5ad")
    out = open_store(convert(tmp_path / "in.h5ad", tmp_path / f"out.{dst}"))
    got = pd.Series(np.asarray(out.obs_column("sample"), dtype=object))
    assert got.isna().tolist() == values.isna().tolist()
    assert got[got.notna()].astype(str).tolist() == values.dropna().tolist()


def test_converted_h5ad_opens_in_anndata(indexed_paths, tmp_path):
    out = convert(indexed_paths["soma"], tmp_path / "x.h5ad")
    adata = ad.read_h5ad(out)
    assert adata.n_obs == 2_000 and adata.obs_names[3] == "cell_3"
    np.testing.assert_array_equal(adata.X[:5, 0].toarray().ravel(), np.arange(1, 6))


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_written_counts_slice_in_anndata_as_its_own_files_do(indexed_paths, tmp_path, fmt):
    """The row pointer is written int32 as the column indices are (as anndata writes them):
    an int64 pointer beside int32 indices read back as such, and scipy's slice of the
    AnnData backwards failed ("Output dtype not compatible with inputs")."""
    out = convert(indexed_paths["h5ad"], tmp_path / f"x.{fmt}")
    adata = ad.read_h5ad(out) if fmt == "h5ad" else ad.read_zarr(out)
    assert adata.X.indptr.dtype == adata.X.indices.dtype == np.int32
    whole = adata.X.toarray()
    np.testing.assert_array_equal(adata[::-1].X.toarray(), whole[::-1])
    np.testing.assert_array_equal(open_store(out).read(np.arange(adata.n_obs)).toarray(), whole)


def test_sharded_output_and_manifest(indexed_paths, tmp_path):
    out = convert(indexed_paths["h5ad"], tmp_path / "shards", format="h5ad", shard_size=600)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_obs"] == [600, 600, 600, 200]
    coll = CellCollection(out)
    assert coll.n_obs == 2_000
    np.testing.assert_array_equal(coll.read(np.arange(2_000)).toarray()[:, 0], np.arange(1, 2_001))
    assert CellCollection(str(out / "*")).n_obs == 2_000  # a glob of the shards, not the manifest
    # a glob of manifests alone: their stores (review203: every manifest.json left out)
    assert CellCollection(str(tmp_path / "shard[s]" / "manifest.json")).n_obs == 2_000
    # a glob that meets a sharded store named like a file (convert's output "x.h5ad" with
    # --shard-size): its shards (hunt212: opened as one h5ad, "truncated, corrupt"); a
    # folder of no manifest so named: a folder, said in one line
    named = convert(indexed_paths["h5ad"], tmp_path / "g" / "x.h5ad", shard_size=600)
    assert named.is_dir()
    shutil.copy(indexed_paths["h5ad"], tmp_path / "g" / "a.h5ad")
    assert CellCollection(str(tmp_path / "g" / "*.h5ad")).n_obs == 4_000
    # a shard converted into the sharded store that holds it (review209: the store's other
    # shards were deleted): refused, nothing changed
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    for source in (out / "shard-00001.h5ad", open_store(out / "shard-00001.h5ad")):
        with pytest.raises(ConfigError, match=r"holds the input .*shard-00001\.h5ad"):
            convert(source, out, shard_size=600, overwrite=True)  # (review210: a store too)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (tmp_path / "g" / "empty.h5ad").mkdir()
    with pytest.raises(DataError, match=r"empty\.h5ad: is a folder, not an h5ad file") as err:
        CellCollection(str(tmp_path / "g" / "*.h5ad"))
    assert "\n" not in str(err.value)
    # a match whose own name holds a glob character (a broken link): itself, not globbed
    # again (review201: a RecursionError)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "broken*").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"broken\*"):
        CellCollection(str(tmp_path / "h" / "*"))
    # manifests of other names met by a glob: their stores (review202: a format error)
    for part in ("a", "b"):
        listed = {"files": [str(out / f"shard-0000{0 if part == 'a' else 1}.h5ad")]}
        (tmp_path / f"atlas_{part}.json").write_text(json.dumps(listed))
    assert CellCollection(str(tmp_path / "atlas_*.json")).n_obs == 1_200


def test_a_store_whose_name_looks_like_a_glob_is_itself(indexed_paths, tmp_path):
    """``pbmc[1].h5ad`` that exists is that file, not the glob that matches ``pbmc1.h5ad``."""
    import shutil

    shutil.copy(indexed_paths["h5ad"], tmp_path / "pbmc[1].h5ad")
    ad.AnnData(np.ones((3, 4), np.float32)).write_h5ad(tmp_path / "pbmc1.h5ad")
    assert CellCollection(str(tmp_path / "pbmc[1].h5ad")).n_obs == 2_000
    assert CellCollection(str(tmp_path / "pbmc[1]*.h5ad")).n_obs == 3  # a glob that is one


def test_failed_conversion_leaves_nothing(indexed_paths, tmp_path, monkeypatch):
    from cellsift.data import writers

    def boom(self, x):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writers.ZarrWriter, "_append_x", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(indexed_paths["h5ad"], tmp_path / "out.zarr")
    with pytest.raises(RuntimeError, match="disk full"):
        convert(indexed_paths["h5ad"], tmp_path / "sharded", format="zarr", shard_size=500)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # a writer that fails as it creates its output (a bad option, a type the format lacks)
    with pytest.raises(ValueError, match="gzp"):
        convert(indexed_paths["h5ad"], tmp_path / "out.h5ad", compression="gzp")
    adata = ad.read_h5ad(indexed_paths["h5ad"])
    adata.var["phase"] = np.exp(1j * np.arange(adata.n_vars))
    adata.write_h5ad(tmp_path / "complex.h5ad")
    with pytest.raises(DataError, match=r"column 'phase' \(complex128\) cannot be stored"):
        convert(tmp_path / "complex.h5ad", tmp_path / "out.soma")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["complex.h5ad"]


def test_half_float_columns_are_stored_as_float32_in_soma(tmp_path):
    import pandas as pd

    n = 5
    obs = pd.DataFrame({"pct_mito": np.linspace(0, 5, n).astype(np.float16)})
    obs.index = [f"c{i}" for i in range(n)]
    var = pd.DataFrame({"mean": np.array([0.25, 0.5], dtype=np.float16)}, index=["A", "B"])
    src = tmp_path / "half.h5ad"
    ad.AnnData(sp.csr_matrix(np.ones((n, 2), np.float32)), obs=obs, var=var).write_h5ad(src)
    back = ad.read_h5ad(convert(convert(src, tmp_path / "half.soma"), tmp_path / "back.h5ad"))
    np.testing.assert_array_equal(back.obs["pct_mito"], obs["pct_mito"].astype(np.float32))
    assert back.obs["pct_mito"].dtype == np.float32
    np.testing.assert_array_equal(back.var["mean"], var["mean"].astype(np.float32))


def test_existing_output_needs_overwrite(indexed_paths, tmp_path):
    out = convert(indexed_paths["h5ad"], tmp_path / "o.h5ad")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(indexed_paths["h5ad"], out)
    convert(indexed_paths["zarr"], out, overwrite=True)


def test_min_genes_drops_empty_cells(tmp_path):
    from cellsift.datasets import indexed_atlas

    adata = indexed_atlas(40, 4)
    x = adata.X.tolil()
    x[5, :] = 0
    adata.X = x.tocsr()
    adata.X.eliminate_zeros()
    adata.write_h5ad(tmp_path / "e.h5ad")
    out = convert(tmp_path / "e.h5ad", tmp_path / "e.zarr", min_genes=1)
    assert open_store(out).n_obs == 39


@pytest.mark.parametrize("fmt", ["h5ad", "zarr", "soma"])
def test_obs_and_var_come_back_as_they_were(tmp_path, fmt):
    """Missing values stay missing, pandas' nullable dtypes stay (of any width, with no
    missing value too), the indexes keep their names, and columns named like the SOMA
    layout's own (obs_id, feature_id) keep their names and values (hunt250: SOMA lost the
    names and the dtypes of nullable columns without a missing value)."""
    import pandas as pd
    import scipy.sparse as sp

    n = 6
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(["T", None, "B", "T", None, "B"]),
            "n_genes": pd.array([10, None, 30, 40, 50, 60], dtype="Int64"),
            "is_doublet": pd.array([True, None, False, False, True, None], dtype="boolean"),
            "score": [0.5, np.nan, 1.5, 2.0, 2.5, 3.0],
            "obs_id": pd.Categorical([f"lab{i}" for i in range(n)]),
            "donor": pd.Categorical(["d1", "d1", "d2", "d2", "d3", "d3"]),
            "n_batch": pd.array([1, 2, 3, 4, 5, 6], dtype="Int64"),
            "kept": pd.array([True, False] * 3, dtype="boolean"),
            "plain": np.arange(n),
        },
        index=pd.Index([f"cell{i}" for i in range(n)], name="barcode"),
    )
    var = pd.DataFrame(
        {
            "feature_id": ["x1", "x2", "x3"],
            "gene_ids": ["ENSG1", "ENSG2", "ENSG3"],
            "length": pd.array([5, None, 7], dtype="Int32"),
            "exons": pd.array([1, 2, 3], dtype="UInt8"),
        },
        index=pd.Index(["A", "B", "C"], name="symbol"),
    )
    x = sp.csr_matrix(np.arange(1, 3 * n + 1, dtype=np.float32).reshape(n, 3))
    src = tmp_path / "in.h5ad"
    ad.AnnData(x, obs=obs, var=var).write_h5ad(src)
    mid = convert(src, tmp_path / f"mid.{fmt}")
    back = ad.read_h5ad(convert(mid, tmp_path / "back.h5ad"))
    pd.testing.assert_frame_equal(back.obs, obs, check_categorical=False)
    text = ["feature_id", "gene_ids"]  # (may come as categories)
    pd.testing.assert_frame_equal(back.var.astype(dict.fromkeys(text, object)), var)
    if fmt == "soma":  # the names read from another column: not the recorded index's name
        again = ad.read_h5ad(
            convert(mid, tmp_path / "by_id.h5ad", source_options={"var_id": "gene_ids"})
        )
        assert again.var.index.name is None and list(again.var_names) == list(var["gene_ids"])
    assert (back.X != x).nnz == 0


@pytest.mark.parametrize("fmt", ["h5ad", "zarr", "soma"])
def test_nullable_floats_of_an_anndata_in_memory_are_written(tmp_path, fmt):
    """pandas' Float64 / Float32 obs columns (which anndata cannot write, so only an AnnData
    in memory holds them) are written as floats, a missing value as NaN (hunt240: anndata's
    raw error once every count was written)."""
    import pandas as pd
    import scipy.sparse as sp

    n = 5
    x = sp.csr_matrix(np.arange(1, 3 * n + 1, dtype=np.float32).reshape(n, 3))
    a = ad.AnnData(x)
    a.obs["score"] = pd.array([0.5, None, 1.5, 2.0, 2.5], dtype="Float64")
    a.obs["s32"] = pd.array([None, 1.0, 2.0, 3.0, 4.0], dtype="Float32")
    back = ad.read_h5ad(convert(convert(a, tmp_path / f"o.{fmt}"), tmp_path / "back.h5ad"))
    for col, want in (("score", [0.5, np.nan, 1.5, 2.0, 2.5]), ("s32", [np.nan, 1, 2, 3, 4])):
        np.testing.assert_array_equal(back.obs[col].to_numpy(dtype=float), want)
    assert (back.X != x).nnz == 0


def test_converting_no_cells_is_an_error(tmp_path):
    import scipy.sparse as sp

    empty = ad.AnnData(sp.csr_matrix((0, 3), dtype=np.float32))
    empty.var_names = ["a", "b", "c"]
    empty.write_h5ad(tmp_path / "zero.h5ad")
    with pytest.raises(DataError, match="no cells to write"):
        convert(tmp_path / "zero.h5ad", tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def test_values_that_are_not_counts_are_refused_naming_the_layers(tmp_path):
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    counts = sp.random(50, 20, density=0.3, format="csr", random_state=0, dtype=np.float32)
    counts.data = np.ceil(counts.data * 10)
    logged = counts.copy()
    logged.data = np.log1p(logged.data)
    a = ad.AnnData(logged, layers={"counts": counts})
    a.write_h5ad(tmp_path / "logged.h5ad")
    with pytest.raises(DataError, match=r"non-integer.*this file has: 'counts'"):
        convert(tmp_path / "logged.h5ad", tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()
    with pytest.warns(CellsiftWarning, match=r"counts \(counts\), obs and var; the file's X "):
        convert(tmp_path / "logged.h5ad", tmp_path / "out.zarr", layer="counts")
    with pytest.warns(CellsiftWarning, match=r"file's layers\['counts'\] are not carried"):
        convert(tmp_path / "logged.h5ad", tmp_path / "as_is.zarr", check_counts=False)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_what_convert_does_not_carry_is_named(tmp_path, fmt):
    """Counts, obs and var are written; a warning names the source's other elements (none
    for a file of only those), which are not."""
    import warnings

    from cellsift.datasets import indexed_atlas

    a = indexed_atlas(40, 10, path=None)
    write = a.write_h5ad if fmt == "h5ad" else a.write_zarr
    write(tmp_path / f"plain.{fmt}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(tmp_path / f"plain.{fmt}", tmp_path / "plain.soma")
    a.layers["spliced"] = a.X.copy()
    a.obsm["X_umap"] = np.zeros((40, 2))
    a.uns["log1p"] = {"base": None}
    a.raw = a
    write(tmp_path / f"full.{fmt}")
    named = r"the file's raw, layers\['spliced'\], obsm\['X_umap'\], uns are not carried over"
    with pytest.warns(CellsiftWarning, match=named):
        convert(tmp_path / f"full.{fmt}", tmp_path / "full.soma")
    # in place (overwrite): what it does not carry would be lost with the source (hunt227)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for source in (tmp_path / f"full.{fmt}", open_store(tmp_path / f"full.{fmt}")):
        with pytest.raises(ConfigError, match=r"full\.\w+ is the input: converting it in place"):
            convert(source, tmp_path / f"full.{fmt}", overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    read = ad.read_h5ad if fmt == "h5ad" else ad.read_zarr
    assert "X_umap" in read(tmp_path / f"full.{fmt}").obsm
    with warnings.catch_warnings():  # (a file of counts, obs and var alone: nothing lost)
        warnings.simplefilter("error")
        convert(tmp_path / f"plain.{fmt}", tmp_path / f"plain.{fmt}", overwrite=True)


def test_min_genes_counts_values_and_stored_zeros_are_not_carried(tmp_path):
    """Zeros stored as CSR entries are not genes, inside the opening sample or not: a cell
    of stored zeros alone is dropped by min_genes=1 (the fix the collection's message
    names), and the output stores no zeros."""
    n = 2_000
    x = sp.csr_matrix(np.ones((n, 5), dtype=np.float32))
    x.data[x.indptr[1001] : x.indptr[1002]] = 0  # a cell of stored zeros, no counts
    x.data[x.indptr[7] + 1] = 0  # one stored zero in another
    adata = ad.AnnData(x)
    adata.obs_names = [f"c{i}" for i in range(n)]
    adata.write_h5ad(tmp_path / "in.h5ad")
    out = convert(tmp_path / "in.h5ad", tmp_path / "out.zarr", min_genes=1)
    store = open_store(out)
    names = np.asarray(store.obs_names)
    assert store.n_obs == n - 1 and "c1001" not in names
    got = store.read(np.arange(n - 1))
    assert (got.data != 0).all() and got.nnz == 5 * (n - 1) - 1
    np.testing.assert_array_equal(got.toarray(), np.delete(x.toarray(), 1001, axis=0))
    CellCollection(out).read(np.arange(n - 1))  # no cell without counts


def test_a_format_that_contradicts_the_name_is_refused(indexed_paths, tmp_path):
    """An HDF5 file named .zarr could be neither read nor replaced as a store."""
    from cellsift.errors import ConfigError

    with pytest.raises(ConfigError, match="named as zarr but the format asked for is h5ad"):
        convert(indexed_paths["h5ad"], tmp_path / "f.zarr", format="h5ad")
    assert list(tmp_path.iterdir()) == []
    out = convert(indexed_paths["h5ad"], tmp_path / "f.out", format="h5ad")  # no format named
    assert open_store(out, format="h5ad").n_obs == 2_000


@pytest.mark.parametrize("where", ["obs", "var"])
def test_column_names_a_zarr_store_cannot_hold_are_named_before_writing(tmp_path, where):
    """A Zarr store keeps each obs/var column in a folder of its name: a name over 255
    bytes or with a '/' is a DataError naming the column and the fix, before any cell is
    written, and nothing is left behind; h5ad takes the long name (HDF5 has no such limit)."""
    adata = ad.AnnData(
        sp.csr_matrix(np.ones((4, 2), np.float32)),
        obs={"study": ["a", "b", "a", "b"]},
        var={"symbol": ["x", "y"]},
    )
    adata.obs_names, adata.var_names = [f"c{i}" for i in range(4)], ["g0", "g1"]
    frame = getattr(adata, where)
    for name, said in [("é" * 128, r"is 256 bytes long"), ("a/b", r"has a '/'")]:
        frame[name] = frame.iloc[:, 0]
        src = tmp_path / f"{len(name)}.h5ad"
        adata.write_h5ad(src)
        with pytest.raises(DataError, match=rf"the {where} column '.*' {said}.*Rename it"):
            convert(src, tmp_path / "out.zarr")
        assert not [p for p in tmp_path.iterdir() if "out.zarr" in p.name]  # (nor its temp)
        del frame[name]
    with pytest.raises(DataError, match=rf"the {where} index name '\.\.' names no folder"):
        var = adata.var.rename_axis("..") if where == "var" else adata.var
        obs = adata.obs.rename_axis("..") if where == "obs" else adata.obs
        with ZarrWriter(tmp_path / "dots.zarr", var) as writer:
            writer.append(adata.X, obs)
    frame["é" * 128] = frame.iloc[:, 0]
    adata.write_h5ad(tmp_path / "long.h5ad")
    back = ad.read_h5ad(convert(tmp_path / "long.h5ad", tmp_path / "out.h5ad"))
    assert "é" * 128 in getattr(back, where).columns


@pytest.mark.parametrize("fmt", ["h5ad", "zarr", "soma"])
def test_a_writer_sums_a_chunks_repeated_genes_in_a_copy(tmp_path, fmt):
    """A chunk storing a gene of a cell twice is stored summed; the caller's matrix (whose
    arrays scipy's csr_matrix shares) keeps its own arrays as they were."""
    import pandas as pd

    from cellsift.data import open_store, open_writer

    x = sp.csr_matrix(
        (np.array([1.0, 2.0, 3.0], np.float32), np.array([1, 1, 0]), np.array([0, 3, 3])),
        shape=(2, 3),
    )
    arrays = [a.copy() for a in (x.data, x.indices, x.indptr)]
    var = pd.DataFrame(index=["g0", "g1", "g2"])
    with open_writer(tmp_path / f"out.{fmt}", var, n_obs=2) as writer:
        writer.append(x, pd.DataFrame(index=["c0", "c1"]))
    for now, was in zip((x.data, x.indices, x.indptr), arrays, strict=True):
        np.testing.assert_array_equal(now, was)
    got = open_store(tmp_path / f"out.{fmt}").read(np.arange(2))
    np.testing.assert_array_equal(got.toarray(), [[3, 3, 0], [0, 0, 0]])
    # a chunk the caller fills again once appended (a buffer of its own): stored as it was
    chunk = sp.csr_matrix(np.array([[1, 0, 2]], np.float32))
    with open_writer(tmp_path / f"again.{fmt}", var, n_obs=2) as writer:
        writer.append(chunk, pd.DataFrame(index=["c0"]))
        chunk.data[:] = 99
        writer.append(chunk, pd.DataFrame(index=["c1"]))
    got = open_store(tmp_path / f"again.{fmt}").read(np.arange(2))
    np.testing.assert_array_equal(got.toarray(), [[1, 0, 2], [99, 0, 99]])


@pytest.mark.parametrize("where", ["obs", "var"])
def test_names_an_h5ad_cannot_read_back_are_named_before_writing(tmp_path, where):
    """A column or index named "" or "." makes an h5ad anndata cannot read (its obs
    unreadable, or the write failing at its end): named before any cell is written, and
    nothing is left behind."""
    adata = ad.AnnData(
        sp.csr_matrix(np.ones((4, 2), np.float32)),
        obs={"study": ["a", "b", "a", "b"]},
        var={"symbol": ["x", "y"]},
    )
    adata.obs_names, adata.var_names = [f"c{i}" for i in range(4)], ["g0", "g1"]
    for name in ("", "."):
        for kind, made in (
            ("column", adata.copy()),
            ("index name", adata.copy()),
        ):
            frame = getattr(made, where)
            if kind == "column":
                frame[name] = frame.iloc[:, 0]
            else:
                frame.index.name = name
            with pytest.raises(DataError, match=rf"the {where} {kind} '{re.escape(name)}' names"):
                convert(made, tmp_path / "out.h5ad")
            assert not list(tmp_path.iterdir())  # (nor its temporary output)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr", "soma"])
def test_an_anndata_in_memory_of_mixed_columns_and_named_index_converts(tmp_path, fmt):
    """An object column of text and numbers (as a concat of two studies makes) is stored
    as text in every format (h5ad failed once every cell was written, naming no column); a
    column named by a number is read by its name as text; one of ints beyond int64 as text
    in h5ad too (it failed), and one of text, True and 1 keeps True apart from 1; the obs
    index keeps its name
    (h5ad, Zarr); a column named '_index' (anndata's own name for the index) is refused
    before a cell is written, naming it."""
    import pandas as pd

    from cellsift.data.writers import H5adWriter

    n = 6
    obs = pd.DataFrame(
        {
            "batch": np.array([1, "x", 2.5, None, "x", 1], dtype=object),
            0: pd.Categorical(["a", "b", "a", "b", "a", "b"]),
            "flag": np.array([True, False, None, True, True, False], dtype=object),
            "big": np.array([2**70, 1, 2, 3, 4, 5], dtype=object),
            "kinds": np.array(["a", True, 1, 0, False, None], dtype=object),
            "cats": pd.Categorical(["a", 1, "a", 1, "a", 1]),
            "donor": np.array([1000.0, None, 2.0, 1000.0, 2.0, 2.0], dtype=object),
            "plate": np.array(["a", 1000.0, 2.5, None, "a", 1000.0], dtype=object),
        },
        index=pd.Index([f"cell{i}" for i in range(n)], name="barcode"),
    )
    var = pd.DataFrame(index=["A", "B", "C"])
    x = sp.csr_matrix(np.arange(1, 3 * n + 1, dtype=np.float32).reshape(n, 3))
    adata = ad.AnnData(x, obs=obs, var=var)
    out = convert(adata, tmp_path / f"out.{fmt}", chunk_size=4)
    store = open_store(out)
    batch = pd.Series(np.asarray(store.obs_column("batch"), dtype=object))
    assert batch[:3].tolist() == ["1", "x", "2.5"] and pd.isna(batch[3])
    assert np.asarray(store.obs_column("0"), dtype=object).tolist() == list("ababab")
    flag = np.asarray(store.obs_column("flag"), dtype=object)  # (SOMA: as text)
    shown = [str(v) for i, v in enumerate(flag) if i != 2]
    assert shown == ["True", "False", "True", "True", "False"]
    assert pd.isna(flag[2])
    big = np.asarray(store.obs_column("big"), dtype=object).tolist()  # (beyond int64: text)
    assert big == [str(2**70), "1", "2", "3", "4", "5"]
    kinds = np.asarray(store.obs_column("kinds"), dtype=object)  # (True is not 1, as text)
    assert kinds[:5].tolist() == ["a", "True", "1", "0", "False"] and pd.isna(kinds[5])
    cats = np.asarray(store.obs_column("cats"), dtype=object).tolist()  # (text and numbers)
    assert [str(v) for v in cats] == ["a", "1"] * 3
    # whole floats as objects: donor 1000 in every format, as a filter of 1000 reads it
    from cellsift.data import CellCollection

    kept = CellCollection(out, obs_filter={"donor": 1000}, check_counts=False)
    assert kept.n_obs == 2 and kept.codes("donor")[1] == ["1000"]
    kept = CellCollection(out, obs_filter={"plate": 1000}, check_counts=False)  # (with text)
    assert kept.n_obs == 2 and kept.codes("plate")[1] == ["1000"]
    if fmt != "soma":
        back = ad.read_h5ad(out) if fmt == "h5ad" else ad.read_zarr(out)
        assert back.obs.index.name == "barcode"
        # from a file too; a name that is no text (a number) as text
        again = convert(out, tmp_path / f"again.{fmt}")
        back = ad.read_h5ad(again) if fmt == "h5ad" else ad.read_zarr(again)
        assert back.obs.index.name == "barcode"
        numbered = adata.copy()
        numbered.obs.index.name = 7
        third = convert(numbered, tmp_path / f"third.{fmt}")
        back = ad.read_h5ad(third) if fmt == "h5ad" else ad.read_zarr(third)
        assert back.obs.index.name == "7"
        assert back.obs["batch"].astype(object).tolist()[:3] == ["1", "x", "2.5"]
    with pytest.raises(DataError, match=r"obs has a column named '_index'.*rename it"):
        with H5adWriter(tmp_path / "reserved.h5ad", var) as writer:
            writer.append(x, obs.rename(columns={0: "_index"}))
    assert not list(tmp_path.glob("*reserved*"))


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_values_that_are_not_counts_outside_the_sample_are_refused_naming_the_cell(tmp_path, fmt):
    """A store whose first half holds counts and whose second log-normalised values (two
    batches joined after one was normalised): the opening sample of 512 cells misses cell 1,
    whose values are not whole; convert names it and writes nothing."""
    rng = np.random.default_rng(0)
    counts = sp.random(2000, 30, density=0.3, format="csr", random_state=0, dtype=np.float32)
    counts.data = np.ceil(counts.data * 10)
    counts = sp.csr_matrix(sp.hstack([sp.csr_matrix(np.ones((2000, 1), np.float32)), counts]))
    cell_1 = slice(counts.indptr[1], counts.indptr[2])
    counts.data[cell_1] = np.log1p(counts.data[cell_1]) + rng.uniform(0.01, 0.5)
    sampled = np.unique(np.linspace(0, 1999, 512).astype(np.int64))
    assert 1 not in sampled
    a = ad.AnnData(counts)
    a.obs_names = [f"cell-{i}" for i in range(2000)]
    a.write_h5ad(tmp_path / "joined.h5ad")
    out = tmp_path / f"out.{fmt}"
    with pytest.raises(
        DataError, match=r"cell 1 \('cell-1'\) holds \d\.\d+; counts are whole numbers"
    ):
        convert(tmp_path / "joined.h5ad", out, chunk_size=300)
    assert not out.exists()
    convert(tmp_path / "joined.h5ad", out, check_counts=False)  # (as asked: written as they are)
    np.testing.assert_allclose(open_store(out).read(np.array([1])).data, counts[1].data)


@pytest.mark.parametrize("fmt", ["h5ad", "zarr", "soma"])
def test_an_index_named_like_a_column_of_its_values_keeps_its_name(tmp_path, fmt):
    """An index named like a column that holds its values (the Kang data's var: index and
    column gene_symbol) keeps its name in every format, as anndata keeps it (hunt262: the
    name was dropped); where the column holds other values, which anndata refuses, the
    index is written unnamed and the column as it was."""
    import pandas as pd

    var = pd.DataFrame(
        {"gene_symbol": ["A", "B", "C"], "other": ["x", "y", "z"]},
        index=pd.Index(["A", "B", "C"], name="gene_symbol"),
    )
    obs = pd.DataFrame(
        {"cell": ["c0", "c1"], "score": [1.0, 2.0]},
        index=pd.Index(["c0", "c1"], name="cell"),
    )
    adata = ad.AnnData(sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0]], np.float32)), obs, var)
    source = tmp_path / "source.h5ad"
    adata.write_h5ad(source)
    store = open_store(convert(source, tmp_path / f"out.{fmt}"))
    assert store.var.index.name == "gene_symbol" and store.obs().index.name == "cell"
    assert store.var["gene_symbol"].astype(str).tolist() == ["A", "B", "C"]
    assert np.asarray(store.obs_column("cell"), dtype=str).tolist() == ["c0", "c1"]
    if fmt != "soma":
        back = ad.read_h5ad(store.path) if fmt == "h5ad" else ad.read_zarr(store.path)
        assert back.var.index.name == "gene_symbol" and back.obs.index.name == "cell"
    # a categorical of pandas' text (pandas 3's default): the same values (review230)
    strings = adata.copy()
    strings.var["gene_symbol"] = strings.var["gene_symbol"].astype("string").astype("category")
    store = open_store(convert(strings, tmp_path / f"strings.{fmt}"))
    assert store.var.index.name == "gene_symbol"
    differ = adata.copy()
    differ.var.index.name = "other"
    store = open_store(convert(differ, tmp_path / f"differ.{fmt}"))
    named = "other" if fmt == "soma" else None  # (anndata refuses the name: left out)
    assert store.var.index.name == named
    assert store.var["other"].astype(str).tolist() == ["x", "y", "z"]
    assert store.var_names.tolist() == ["A", "B", "C"]


@pytest.mark.parametrize("fmt", ["h5ad", "zarr", "soma"])
def test_a_writers_chunks_of_other_categories_keep_them_all_in_order(tmp_path, fmt):
    """Chunks whose categoricals hold other categories are written over their union (the
    first chunk's in order, then each later one's new ones), ordered where every chunk's is
    (hunt262: h5ad and Zarr lost the unused categories, the order and ordered), ordered
    where the first chunk's are, as in TileDB-SOMA; ordered chunks that contradict each
    other's order are refused (an unordered one declares no order: SOMA refused it)."""
    import pandas as pd

    from cellsift.data import open_writer

    var = pd.DataFrame(index=["g0", "g1"])
    ones = sp.csr_matrix(np.ones((2, 2), np.float32))

    def chunk(values, categories, names, ordered=True):
        column = pd.Categorical(values, categories=categories, ordered=ordered)
        return pd.DataFrame({"c": column}, index=names)

    first = chunk(["b", "b"], ["b", "a", "z"], ["c0", "c1"])
    with open_writer(tmp_path / f"s.{fmt}", var, n_obs=4) as writer:
        writer.append(ones, first)
        writer.append(ones, chunk(["a", "y"], ["a", "y"], ["c2", "c3"]))
    assert isinstance(first["c"].dtype, pd.CategoricalDtype)  # (the caller's chunk as it was)
    column = pd.Series(open_store(tmp_path / f"s.{fmt}").obs_column("c"))
    assert list(column.cat.categories) == ["b", "a", "z", "y"] and column.cat.ordered
    assert column.astype(str).tolist() == ["b", "b", "a", "y"]
    with open_writer(tmp_path / f"u.{fmt}", var, n_obs=4) as writer:  # (one unordered)
        writer.append(ones, first)
        writer.append(ones, chunk(["a", "y"], ["y", "a"], ["c2", "c3"], ordered=False))
    column = pd.Series(open_store(tmp_path / f"u.{fmt}").obs_column("c"))
    assert list(column.cat.categories) == ["b", "a", "z", "y"] and column.cat.ordered
    assert column.astype(str).tolist() == ["b", "b", "a", "y"]
    # a chunk of the column as text: its values as categories, in every format alike
    # (review230: h5ad and Zarr sorted them all, unordered)
    text = pd.DataFrame({"c": ["w", "a"]}, index=["c2", "c3"])
    with open_writer(tmp_path / f"t.{fmt}", var, n_obs=4) as writer:
        writer.append(ones, first)
        writer.append(ones, text)
    column = pd.Series(open_store(tmp_path / f"t.{fmt}").obs_column("c"))
    assert list(column.cat.categories) == ["b", "a", "z", "w"] and column.cat.ordered
    assert column.astype(str).tolist() == ["b", "b", "w", "a"]
    if fmt != "soma":  # (True and False meeting numbers: as text, True not 1; review231.
        # TileDB-SOMA refuses an enumeration of another type)
        with open_writer(tmp_path / f"b.{fmt}", var, n_obs=4) as writer:
            writer.append(
                ones, pd.DataFrame({"c": pd.Categorical([True, False])}, index=["c0", "c1"])
            )
            writer.append(ones, pd.DataFrame({"c": pd.Categorical([0, 1])}, index=["c2", "c3"]))
        column = pd.Series(open_store(tmp_path / f"b.{fmt}").obs_column("c"))
        assert column.astype(str).tolist() == ["True", "False", "0", "1"]
        # (review233) objects that pandas compares equal (True and 1): not the last
        # chunk's mapping taken again
        mixed = [np.array([True, "x"], dtype=object), np.array([1, "x"], dtype=object)]
        with open_writer(tmp_path / f"m.{fmt}", var, n_obs=4) as writer:
            for k, values in enumerate(mixed):
                names = [f"c{2 * k}", f"c{2 * k + 1}"]
                writer.append(ones, pd.DataFrame({"c": pd.Categorical(values)}, index=names))
        column = pd.Series(open_store(tmp_path / f"m.{fmt}").obs_column("c"))
        assert column.astype(str).tolist() == ["True", "x", "1", "x"]
    # the same categories in another order, and a chunk of no categories (review232: the
    # first chunk's mapping read the second's codes, swapping its values; an IndexError)
    with open_writer(tmp_path / f"r.{fmt}", var, n_obs=6) as writer:
        writer.append(ones, chunk(["a", "b"], ["a", "b"], ["c0", "c1"], ordered=False))
        writer.append(ones, chunk(["a", "b"], ["b", "a"], ["c2", "c3"], ordered=False))
        writer.append(ones, pd.DataFrame({"c": [None, None]}, index=["c4", "c5"]))
    column = pd.Series(open_store(tmp_path / f"r.{fmt}").obs_column("c"))
    assert column.astype(object).where(column.notna(), None).tolist() == [
        "a",
        "b",
        "a",
        "b",
        None,
        None,
    ]
    with pytest.raises(DataError, match=r"obs column 'c' is an ordered categorical whose"):
        with open_writer(tmp_path / f"x.{fmt}", var, n_obs=4) as writer:
            writer.append(ones, first)
            writer.append(ones, chunk(["a", "b"], ["a", "b"], ["c2", "c3"]))
    assert not (tmp_path / f"x.{fmt}").exists()


def test_chunks_rebuilt_over_the_same_text_categories_are_not_looked_up(monkeypatch):
    """A caller's chunks each rebuilt as pd.Categorical(values, categories=all_of_them)
    hold the first chunk's categories as new objects: taken as they are, not mapped by one
    lookup per category for every chunk (40 s for 80 chunks over 400k categories). Objects
    of mixed kinds (1 and True compare equal) are still mapped."""
    from pathlib import Path

    import pandas as pd

    from cellsift.data import writers

    calls = []
    real = writers._CommonCategories._mapped
    monkeypatch.setattr(
        writers._CommonCategories,
        "_mapped",
        lambda self, dtype: calls.append(list(dtype.categories)) or real(self, dtype),
    )
    names = [f"type{k}" for k in range(50)]
    frames = [
        pd.DataFrame(
            {"c": pd.Categorical(names[k : k + 5], categories=names)}, index=names[k : k + 5]
        )
        for k in range(0, 50, 5)
    ]
    out = writers._concat_obs(frames, Path("s.h5ad"))
    assert calls == [] and list(out["c"].cat.categories) == names
    assert out["c"].astype(str).tolist() == names
    mixed = [np.array([True, "x"], dtype=object), np.array([1, "x"], dtype=object)]
    frames = [
        pd.DataFrame({"c": pd.Categorical(v)}, index=[f"{k}a", f"{k}b"])
        for k, v in enumerate(mixed)
    ]
    out = writers._concat_obs(frames, Path("s.h5ad"))
    assert len(calls) == 1 and out["c"].astype(str).tolist() == ["True", "x", "1", "x"]
    # (review236) floats of two widths compare equal but read as other texts: mapped
    tiny = (True, np.float32(0.1), float(np.float32(0.1)))
    frames = [
        pd.DataFrame({"c": pd.Categorical([v], categories=pd.Index([v], dtype=object))}, [k])
        for k, v in enumerate(tiny)
    ]
    out = writers._concat_obs(frames, Path("s.h5ad"))
    assert out["c"].astype(str).tolist() == ["True", "0.1", "0.10000000149011612"]
    # the same text categories, ordered in one chunk only: mapped
    frames = [
        pd.DataFrame({"c": pd.Categorical(["type0"], categories=names)}, index=["y"]),
        pd.DataFrame({"c": pd.Categorical(["type1"], categories=names, ordered=True)}, index=["z"]),
    ]
    assert writers._concat_obs(frames, Path("s.h5ad"))["c"].astype(str).tolist() == names[:2]
    assert len(calls) == 4
