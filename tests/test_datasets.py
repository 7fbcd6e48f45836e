from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from cellsift.datasets import CELL_TYPES, indexed_atlas, kang2018, shared_data_path, synthetic_atlas


def test_synthetic_atlas_is_realistic_and_deterministic():
    a = synthetic_atlas(3_000, 1_000, n_studies=4, seed=2)
    density = a.X.nnz / np.prod(a.shape)
    assert 0.04 < density < 0.12
    assert np.all(a.X.data == np.round(a.X.data)) and a.X.data.min() >= 1
    assert set(a.obs["cell_type_ontology_term_id"]) <= set(CELL_TYPES)
    assert a.obs["dataset_id"].nunique() == 4 and a.obs["donor_id"].nunique() > 4
    assert a.var_names[0].startswith("ENSG") and "feature_name" in a.var
    b = synthetic_atlas(3_000, 1_000, n_studies=4, seed=2, chunk_size=1_100)
    assert (a.X != b.X).nnz == 0  # chunking does not change the atlas
    c = synthetic_atlas(3_000, 1_000, n_studies=4, seed=3)
    assert (a.X != c.X).nnz > 0


def test_synthetic_atlas_settings_are_checked_and_no_cells_keep_their_columns(tmp_path):
    for written in (False, True):  # (in memory, and as an h5ad stores it)

        def atlas(n: int, written: bool = written) -> ad.AnnData:
            if not written:
                return synthetic_atlas(n, 50, n_studies=2)
            return ad.read_h5ad(synthetic_atlas(n, 50, n_studies=2, path=tmp_path / f"{n}.h5ad"))

        none, full = atlas(0), atlas(10)
        assert none.shape == (0, 50) and list(none.obs.columns) == list(full.obs.columns)
        assert list(none.obs.dtypes.map(str)) == list(full.obs.dtypes.map(str))
    for bad, said in (
        ({"n_cells": -5}, "n_cells must be a whole number of at least 0, not -5"),
        ({"n_cells": 10.5}, "n_cells must be a whole number of at least 0, not 10.5"),
        ({"n_studies": 0}, "n_studies must be a whole number of at least 1, not 0"),
        ({"donors_per_study": 0}, "donors_per_study must be a whole number of at least 1"),
        ({"chunk_size": 0}, "chunk_size must be a whole number of at least 1"),
        ({"chunk_size": -1}, "chunk_size must be a whole number of at least 1"),
        # (hunt216: numpy's words, or True taken as 1)
        ({"seed": None}, "seed must be a whole number of at least 0, not None"),
        ({"seed": -1}, "seed must be a whole number of at least 0, not -1"),
        ({"seed": True}, "seed must be a whole number of at least 0, not True"),
    ):
        with pytest.raises(ValueError, match=said):
            synthetic_atlas(**({"n_cells": 10, "n_genes": 50} | bad))


def test_hierarchy_shows_in_expression():
    import scanpy as sc

    a = synthetic_atlas(4_000, 800, n_studies=2, seed=0)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    means = {
        t: np.asarray(a[a.obs["cell_type_ontology_term_id"] == t].X.mean(0)).ravel()
        for t in ("CL:0000624", "CL:0000625", "CL:0001054")
    }
    d = lambda s, t: np.linalg.norm(means[s] - means[t])  # noqa: E731
    # CD4 T is closer to CD8 T (shared T-cell program) than to CD14 monocytes
    assert d("CL:0000624", "CL:0000625") < d("CL:0000624", "CL:0001054")


def test_monocytes_share_the_myeloid_program_with_megakaryocytes():
    """A monocyte is a myeloid cell as well as a leukocyte (two parents in CL): its types'
    profiles raise the myeloid program's genes, which megakaryocytes raise too and which
    lymphocytes (B, NK) do not."""
    from cellsift.datasets import _AtlasModel

    for seed in range(3):
        model = _AtlasModel(n_genes=2000, n_studies=2, donors_per_study=2, seed=seed)
        p = dict(zip(model.leaves, model.log_profiles, strict=True))
        mk, b, nk = p["CL:0000556"], p["CL:0000236"], p["CL:0000623"]
        for mono in ("CL:0001054", "CL:0002396"):  # CD14, CD16 monocytes
            up = (p[mono] - b > 1) & (mk - b > 1) & (p[mono] - nk > 1) & (mk - nk > 1)
            assert up.sum() > 30  # ~3% of genes; by chance alone a handful


def test_indexed_atlas_encodes_index():
    a = indexed_atlas(100, 6)
    np.testing.assert_array_equal(a.X[:, 0].toarray().ravel(), np.arange(1, 101))
    with pytest.raises(ValueError, match="at least 2 genes, not 1"):
        indexed_atlas(10, 1)
    with pytest.raises(ValueError, match="chunk_size must be a whole number of at least 1"):
        indexed_atlas(10, 6, chunk_size=0)
    with pytest.raises(ValueError, match="n_cells must be a whole number of at least 0"):
        indexed_atlas(-1, 6)
    for studies in (0, -1):  # (hunt216: one study, or "study_-1", made silently)
        with pytest.raises(ValueError, match=rf"n_studies must be .* at least 1, not {studies}"):
            indexed_atlas(10, 6, n_studies=studies)
    empty = indexed_atlas(0, 6)  # (as synthetic_atlas(0): an AnnData of no cells)
    assert empty.shape == (0, 6) and "dataset_id" in empty.obs
    # its columns of the types of an atlas of cells (hunt216: text columns were float)
    assert list(empty.obs.dtypes.map(str)) == list(indexed_atlas(4, 6).obs.dtypes.map(str))


def test_a_store_its_name_misdescribes_is_refused_before_writing(tmp_path):
    """format="h5ad" to a path named .zarr (and the like) is refused by every writer, as
    convert refuses it: no reader would open the file as what its name says."""
    from cellsift.errors import ConfigError

    for name, fmt in (("x.zarr", "h5ad"), ("x.h5ad", "soma"), ("x.soma", "zarr")):
        with pytest.raises(ConfigError, match=rf"{name} is named as .* asked for is {fmt}"):
            synthetic_atlas(50, 20, path=tmp_path / name, format=fmt)
        with pytest.raises(ConfigError, match="is named as"):
            indexed_atlas(50, 6, path=tmp_path / name, format=fmt)
        assert not (tmp_path / name).exists()
    assert synthetic_atlas(50, 20, path=tmp_path / "plain", format="h5ad").is_file()


def test_missing_shared_data_says_where(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="CELLSIFT_DATA"):
        shared_data_path("kang2018", tmp_path)
    # a "~" the shell left as it is names the home folder (hunt256)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "kang2018_pbmc_ctrl_8donors.h5ad").write_bytes(b"")
    monkeypatch.setenv("CELLSIFT_DATA", "~/data")
    assert shared_data_path("kang2018") == tmp_path / "data" / "kang2018_pbmc_ctrl_8donors.h5ad"
    with pytest.raises(KeyError, match=r"'kang' is not .* the names are kang2018, cellbench_lung"):
        shared_data_path("kang", tmp_path)


def test_kang_loader_when_present():
    try:
        path = shared_data_path("kang2018")
    except FileNotFoundError:
        pytest.skip("shared data not present")
    a = kang2018(backed=True)
    assert a.shape == (12_261, 1_287) and path.exists()
    assert "cell_type_ontology_term_id" in a.obs
