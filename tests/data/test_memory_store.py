"""AnnData in memory as a store: the same cells, genes and obs as its h5ad file."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from cellsift.data import CellCollection, open_store
from cellsift.data._memory import MemoryStore
from cellsift.datasets import indexed_atlas
from cellsift.errors import DataError


def _same_store(mem, disk, rows):
    np.testing.assert_array_equal(mem.read(rows).toarray(), disk.read(rows).toarray())
    assert mem.read(rows).dtype == np.float32
    assert list(mem.var_names) == list(disk.var_names)
    assert mem.obs_columns == disk.obs_columns
    for c in disk.obs_columns:
        np.testing.assert_array_equal(np.asarray(mem.obs_column(c)), np.asarray(disk.obs_column(c)))
    assert list(mem.obs_names) == list(disk.obs_names)
    np.testing.assert_array_equal(mem.row_nnz(), disk.row_nnz())


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_reads_as_its_h5ad_does(tmp_path, kind):
    adata = indexed_atlas(300, 40, path=None)
    adata.layers["counts"] = adata.X.copy()
    adata.raw = adata[:, :30].copy()
    if kind == "dense":
        adata.X = adata.X.toarray()
    adata.write_h5ad(tmp_path / "a.h5ad")  # (h5ad stores refuse CSC: the file holds CSR)
    if kind == "csc":
        adata.X = adata.X.tocsc()
    rows = np.array([0, 3, 4, 150, 299])
    for layer in (None, "counts", "raw"):
        mem = open_store(adata, layer=layer)
        assert isinstance(mem, MemoryStore) and mem.n_obs == 300
        _same_store(mem, open_store(tmp_path / "a.h5ad", layer=layer), rows)
    assert open_store(adata, layer="raw").n_vars == 30


def test_a_view_and_a_collection(tmp_path):
    adata = indexed_atlas(400, 30, path=None)
    adata.obs.loc[adata.obs_names[:10], "cell_type_ontology_term_id"] = None
    adata.write_h5ad(tmp_path / "a.h5ad")
    view = adata[adata.obs["dataset_id"] != adata.obs["dataset_id"].iloc[0]]
    view.write_h5ad(tmp_path / "view.h5ad")
    _same_store(open_store(view), open_store(tmp_path / "view.h5ad"), np.arange(0, len(view), 7))
    opts = {"dropna": ["cell_type_ontology_term_id"], "min_genes": 1}
    mem, disk = (
        CellCollection([adata, view], **opts),
        CellCollection([tmp_path / "a.h5ad", tmp_path / "view.h5ad"], **opts),
    )
    assert mem.n_obs == disk.n_obs < len(adata) + len(view)
    rows = np.arange(0, mem.n_obs, 5)
    np.testing.assert_array_equal(mem.read(rows).toarray(), disk.read(rows).toarray())
    np.testing.assert_array_equal(
        mem.codes("cell_type_ontology_term_id")[0], disk.codes("cell_type_ontology_term_id")[0]
    )
    origin, on_disk = mem.origin(), disk.origin()
    assert list(origin["store"].cat.categories) == ["adata[0]", "adata[1]"]  # told apart
    np.testing.assert_array_equal(origin["store"].cat.codes, on_disk["store"].cat.codes)
    np.testing.assert_array_equal(origin["store_row"], on_disk["store_row"])
    assert list(origin["obs_name"]) == list(on_disk["obs_name"])
    assert set(CellCollection(adata).origin()["store"]) == {"adata"}


def test_bad_in_memory_input_is_named(tmp_path):
    adata = indexed_atlas(50, 10, path=None)
    with pytest.raises(KeyError, match=r"no layer 'counts'"):
        open_store(adata, layer="counts")
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    with pytest.raises(DataError, match=r"backed AnnData .*a\.h5ad\): pass its file path"):
        CellCollection(backed)
    backed.file.close()
    nan = adata.copy()
    nan.X = nan.X.toarray()
    nan.X[3, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        CellCollection(nan)
    with pytest.raises(TypeError, match=r"adata\[1\]: an AnnData in memory takes no store"):
        CellCollection([tmp_path / "a.h5ad", adata], store_options={"rdcc_nbytes": 1 << 20})

    # a store of the user's own kind whose gene table fails to read: named with its path,
    # once (review229: through, unnamed, once a store's own errors were let through)
    class Truncated(MemoryStore):
        def _load_var(self):
            raise ValueError("var.parquet is truncated")

    with pytest.raises(DataError, match=r"^adata: its var\.parquet is truncated$"):
        CellCollection([Truncated(adata)])


def test_whole_number_groups_with_missing_values_stay_whole(tmp_path):
    """A nullable Int64 column (a donor number, some missing) codes as '3', not '3.0', from
    a file and from memory, so that val_groups=['3'] finds its cells."""
    import pandas as pd

    from cellsift.data import CellDataModule

    adata = indexed_atlas(60, 10, path=None)
    groups = pd.array(np.arange(60) % 4, dtype="Int64")
    groups[:2] = pd.NA
    adata.obs["donor"] = groups
    adata.write_h5ad(tmp_path / "a.h5ad")
    for source in (tmp_path / "a.h5ad", adata):
        codes, names = CellCollection(source).codes("donor")
        assert names == ["0", "1", "2", "3"] and (codes[:2] == -1).all()
        dm = CellDataModule(source, split_key="donor", val_groups=["3"], label_key=None)
        dm.setup()
        assert dm.val.n_obs == 15


def test_dates_code_as_their_text():
    """A datetime obs column (AnnData in memory holds one; h5ad cannot) codes by its dates,
    not by integer nanoseconds."""
    import pandas as pd

    adata = indexed_atlas(30, 10, path=None)
    adata.obs["collected"] = pd.to_datetime([f"2020-01-0{i % 3 + 1}" for i in range(30)])
    adata.obs.loc[adata.obs_names[0], "collected"] = pd.NaT
    codes, cats = CellCollection(adata).codes("collected")
    assert cats == ["2020-01-01", "2020-01-02", "2020-01-03"]
    assert codes[0] == -1 and list(codes[1:4]) == [1, 2, 0]
