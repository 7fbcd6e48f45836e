"""Embedding stores, tl.embed / tl.annotate and the embed -> index -> annotate command line."""

from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellsift as cs
from cellsift._utils import cell_mask, in_obs_order
from cellsift._warnings import CellsiftWarning
from cellsift.cli import main
from cellsift.data import open_store
from cellsift.errors import ConfigError, DataError
from cellsift.models import MetricModel
from cellsift.ontology import load_cell_ontology
from cellsift.tasks import (
    UNKNOWN,
    CellIndex,
    CellIndexError,
    KNNAnnotator,
    embed_collection,
    load_embeddings,
)
from conftest import start_ranks


@pytest.fixture(scope="module")
def bundle(synthetic_h5ad, tmp_path_factory):
    torch.manual_seed(0)  # an untrained model: its weights alone set the distances
    model = MetricModel.from_collection(synthetic_h5ad, hidden=(64,), latent=16)
    return model.save(tmp_path_factory.mktemp("model") / "bundle")


def test_soma_store_options_reach_every_command(bundle, synthetic_h5ad, tmp_path, capsys):
    """An experiment of another measurement and gene-id column (tiledbsoma.io's options):
    info, convert and embed open it with --measurement and --var-id; a file of another
    format given them names the options it takes."""
    import tiledbsoma.io

    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)[:300].copy()
    adata.var.index.name = None
    soma = str(tmp_path / "rna.soma")
    tiledbsoma.io.from_anndata(soma, adata, measurement_name="rna", var_id_name="gene")
    flags = ["--measurement", "rna", "--var-id", "gene"]  # (its one X layer: "data")
    assert main(["info", soma]) == 2  # no measurement RNA
    assert "measurement" in capsys.readouterr().err
    assert main(["info", soma, *flags]) == 0
    assert "cells      300" in capsys.readouterr().out
    assert main(["convert", soma, str(tmp_path / "back.h5ad"), *flags]) == 0
    np.testing.assert_array_equal(
        ad.read_h5ad(tmp_path / "back.h5ad").X.toarray(), adata.X.toarray()
    )
    out = tmp_path / "emb.zarr"
    assert main(["embed", str(bundle), soma, str(out), *flags]) == 0
    np.testing.assert_allclose(load_embeddings(out)[0], model.embed(adata), atol=1e-5)
    assert main(["info", str(synthetic_h5ad), "--var-id", "gene"]) == 2
    assert "an h5ad store, which takes no --var-id (that is for TileDB-SOMA stores)" in (
        capsys.readouterr().err
    )
    zarr = tmp_path / "back.zarr"
    assert main(["convert", str(tmp_path / "back.h5ad"), str(zarr)]) == 0
    assert main(["info", str(zarr), "--measurement", "RNA", "--var-id", "gene"]) == 2
    assert "no --measurement, --var-id (those are for TileDB-SOMA stores)" in (
        capsys.readouterr().err
    )
    with pytest.raises(ConfigError, match=r"no option rdcc_nbytes \(its options: measurement"):
        open_store(soma, rdcc_nbytes=1)


def test_embed_collection_matches_embedding_in_memory(bundle, synthetic_h5ad, tmp_path):
    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)
    out = embed_collection(model, synthetic_h5ad, tmp_path / "emb.zarr", batch_size=700)
    emb, meta = load_embeddings(out)
    np.testing.assert_allclose(emb, model.embed(adata), atol=1e-5)
    assert len(meta) == adata.n_obs
    assert (meta["dataset_id"].to_numpy() == adata.obs["dataset_id"].astype(str).to_numpy()).all()
    # each cell's origin: its store, row and obs name
    assert (meta["obs_name"].to_numpy() == adata.obs_names.to_numpy()).all()
    assert (meta["store"] == str(synthetic_h5ad)).all()
    np.testing.assert_array_equal(meta["store_row"], np.arange(adata.n_obs))
    with pytest.raises(FileExistsError):
        embed_collection(model, synthetic_h5ad, out)


def test_metadata_written_a_row_group_at_a_time_is_the_whole_table(
    bundle, synthetic_h5ad, tmp_path, monkeypatch
):
    """The metadata, written a row group at a time (the cells' text never whole in
    memory), reads as one table would: numbers, nullable numbers, booleans and text with
    missing values; a text column missing in every cell of its first row group is text,
    not Arrow's null type; the origin columns per row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import cellsift.tasks.embed as embed_module

    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)[:350].copy()
    n = adata.n_obs
    adata.obs["late"] = [None] * 120 + [f"t{i % 3}" for i in range(n - 120)]
    adata.obs["count"] = pd.array([i if i % 7 else None for i in range(n)], dtype="Int64")
    adata.obs["flag"] = np.arange(n) % 2 == 0
    adata.write_h5ad(tmp_path / "a.h5ad")
    paths = [tmp_path / "a.h5ad", synthetic_h5ad]
    whole = load_embeddings(embed_collection(model, paths, tmp_path / "whole.zarr"))[1]
    monkeypatch.setattr(embed_module, "METADATA_ROWS", 100)
    out = embed_collection(model, paths, tmp_path / "groups.zarr")
    parquet = pq.ParquetFile(out / "metadata.parquet")
    assert parquet.metadata.num_row_groups == -(-len(whole) // 100)
    assert parquet.schema_arrow.field("late").type == pa.string()
    described = {c["name"]: c for c in parquet.schema_arrow.pandas_metadata["columns"]}
    assert described["late"]["pandas_type"] == "unicode"
    grouped = load_embeddings(out)[1]
    pd.testing.assert_frame_equal(grouped, whole)
    assert grouped["late"].iloc[:120].isna().all() and grouped["late"].iloc[120:n].notna().all()
    assert grouped["store"].iloc[n - 1] == str(paths[0]) and grouped["store"].iloc[n] == str(
        paths[1]
    )
    np.testing.assert_array_equal(grouped["store_row"].iloc[n : n + 3], [0, 1, 2])


def test_embed_command_checks_counts_unless_told_not_to(bundle, synthetic_h5ad, tmp_path, capsys):
    adata = ad.read_h5ad(synthetic_h5ad)[:200].copy()
    adata.X = adata.X.astype(np.float32)
    adata.X.data = np.log1p(adata.X.data)  # log-normalised, not counts
    adata.write_h5ad(tmp_path / "logged.h5ad")
    out = tmp_path / "emb.zarr"
    assert main(["embed", str(bundle), str(tmp_path / "logged.h5ad"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cellsift embed: error: ") and "pass --no-check-counts" in err
    assert not out.exists()
    args = ["embed", str(bundle), str(tmp_path / "logged.h5ad"), str(out), "--no-check-counts"]
    assert main(args) == 0
    emb, _ = load_embeddings(out)
    np.testing.assert_allclose(
        emb, MetricModel.load(bundle).embed(adata, check_counts=False), atol=1e-5
    )


def test_each_command_names_an_output_of_another_kind(bundle, synthetic_h5ad, tmp_path, capsys):
    """A model, index or embeddings store passed where another kind belongs is named as
    what it is (a CellIndex's manifest.json is not read as a manifest of stores)."""
    emb, index, out = tmp_path / "emb.zarr", tmp_path / "atlas.index", str(tmp_path / "o.h5ad")
    assert main(["embed", str(bundle), str(synthetic_h5ad), str(emb)]) == 0
    assert main(["index", str(emb), str(index)]) == 0
    capsys.readouterr()
    calls = {
        ("embed", "index"): ["embed", str(bundle), str(index), str(tmp_path / "e.zarr")],
        ("embed", "embeddings"): ["embed", str(bundle), str(emb), str(tmp_path / "e.zarr")],
        ("embed", "model"): ["embed", str(bundle), str(bundle), str(tmp_path / "e.zarr")],
        ("index", "cells"): ["index", str(synthetic_h5ad), str(tmp_path / "i")],
        ("index", "model"): ["index", str(bundle), str(tmp_path / "i")],
        ("annotate", "index"): ["annotate", str(index), str(index), str(synthetic_h5ad), out],
        ("annotate", "embeddings"): ["annotate", str(bundle), str(emb), str(synthetic_h5ad), out],
        ("annotate", "embeddings "): ["annotate", str(bundle), str(index), str(emb), out],
        ("info", "index"): ["info", str(index)],
    }
    kinds = {
        "index": "a CellIndex",
        "embeddings": "an embeddings store",
        "model": "a model bundle",
        "cells": "a store of cells' counts",
    }
    for (command, given), argv in calls.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"cellsift {command}: error: ") and err.count("\n") == 1
        assert f"is {kinds[given.strip()]} (" in err and ", not a" in err, err
    assert not (tmp_path / "e.zarr").exists() and not (tmp_path / "i").exists()
    (tmp_path / "m.json").write_text('{"files": {"a.h5ad": 1}}')
    with pytest.raises(DataError, match=r"m\.json is not a manifest of stores"):
        cs.data.CellCollection(tmp_path / "m.json")
    # a manifest that is not an object, or cut short: named in one line, not a traceback
    (tmp_path / "m.json").write_text('["a.h5ad"]')
    with pytest.raises(DataError, match=r"m\.json is not a manifest of stores"):
        cs.data.CellCollection(tmp_path / "m.json")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text('{"format": "h5ad", "fil')
    with pytest.raises(DataError, match=r"manifest\.json is not JSON .*damaged or cut short"):
        cs.data.CellCollection(tmp_path / "shards")
    assert main(["info", str(tmp_path / "shards")]) == 2
    assert "is not JSON" in capsys.readouterr().err


def test_a_filtered_collection_embeds_the_cells_it_keeps(bundle, synthetic_h5ad, tmp_path, capsys):
    """A CellCollection that leaves cells out (obs_filter, min_genes) embeds the cells it
    keeps, each in its own row (they were read by position among all cells); `cellsift
    embed --min-genes 1` leaves out a cell without counts, which it refuses otherwise."""
    import scipy.sparse as sp

    from cellsift.data import CellCollection

    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)[:400].copy()
    odd = CellCollection(
        synthetic_h5ad, genes=model.genes, obs_filter=lambda obs: np.arange(len(obs)) % 2 == 1
    )
    emb, meta = load_embeddings(embed_collection(model, odd, tmp_path / "odd.zarr"))
    whole = ad.read_h5ad(synthetic_h5ad)
    np.testing.assert_allclose(emb, model.embed(whole[np.arange(1, whole.n_obs, 2)]), atol=1e-6)
    np.testing.assert_array_equal(meta["store_row"], np.arange(1, whole.n_obs, 2))
    x = sp.csr_matrix(adata.X).tolil()
    x[5] = 0
    adata.X = x.tocsr()
    adata.X.eliminate_zeros()
    adata.write_h5ad(tmp_path / "empty_cell.h5ad")
    args = ["embed", str(bundle), str(tmp_path / "empty_cell.h5ad"), str(tmp_path / "e.zarr")]
    assert main(args) == 2
    assert "no counts at all, e.g. cell 5 (" in (err := capsys.readouterr().err)
    assert "Drop them with --min-genes 1." in err
    dense = adata.copy()  # (its cells counted as they are read: another message)
    dense.X = dense.X.toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    dense_args = ["embed", str(bundle), str(tmp_path / "dense.h5ad"), str(tmp_path / "d.zarr")]
    assert main(dense_args) == 2
    assert "has no counts at all. Drop such cells with --min-genes 1." in capsys.readouterr().err
    assert main([*args, "--min-genes", "1"]) == 0
    emb, meta = load_embeddings(tmp_path / "e.zarr")
    kept = np.delete(np.arange(400), 5)
    np.testing.assert_array_equal(meta["store_row"], kept)
    np.testing.assert_allclose(emb, model.embed(adata[kept]), atol=1e-6)
    assert main([*args, "--no-check-counts", "--overwrite"]) == 0  # every cell, as it is
    emb, meta = load_embeddings(tmp_path / "e.zarr")
    np.testing.assert_array_equal(meta["store_row"], np.arange(400))
    np.testing.assert_allclose(emb, model.embed(adata, check_counts=False), atol=1e-6)


def test_embed_aligned_is_embed_after_alignment(bundle, synthetic_h5ad, tmp_path):
    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)[:300]
    shuffled = adata[:, np.random.default_rng(0).permutation(adata.n_vars)[:-5]].copy()
    x = model.aligned_counts(shuffled)
    before = x.copy()
    np.testing.assert_allclose(model.embed_aligned(x, batch_size=128), model.embed(shuffled))
    for part in ("data", "indices", "indptr"):  # (its batches share its arrays: only read)
        np.testing.assert_array_equal(getattr(x, part), getattr(before, part))
    for part in (x.data, x.indices):  # read-only memory (mapped): torch would warn of it
        part.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        np.testing.assert_array_equal(model.embed_aligned(x), model.embed_aligned(before))
    with pytest.raises(ValueError, match=r"x has \d+ genes, the model \d+: align"):
        model.embed_aligned(x[:, :-1])
    rows = x[:3].toarray()  # a dense array or a list of rows is read as one
    np.testing.assert_allclose(model.embed_aligned(rows.tolist()), model.embed_aligned(x[:3]))
    with pytest.raises(ValueError, match=r"cells x genes \(2-D\), not 1-D"):
        model.embed_aligned(rows[0])
    with pytest.raises(TypeError, match=r"not an AnnData: model\.embed"):
        model.embed_aligned(shuffled)
    ad.AnnData(x[:3]).write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r").X  # (anndata's backed sparse X)
    np.testing.assert_allclose(model.embed_aligned(backed), model.embed_aligned(x[:3]))


def test_annotate_refuses_an_embedding_another_model_made(bundle, synthetic_h5ad, tmp_path):
    model = MetricModel.load(bundle)
    torch.manual_seed(1)
    other = MetricModel.from_collection(synthetic_h5ad, hidden=(64,), latent=16)
    ref = ad.read_h5ad(synthetic_h5ad)
    cs.tl.embed(ref, model)
    index = CellIndex.build(ref.obsm["X_cellsift"], ref.obs.reset_index(drop=True), model=model)
    query = ref[:100].copy()
    cs.tl.embed(query, other)  # an earlier analysis with another model
    for passed, whose in ((model, "the model passed"), (None, "the index's model")):
        with pytest.raises(CellIndexError, match=f"embedded by another model .* than {whose}"):
            cs.tl.annotate(query, index, model=passed, abstain=False)
    with pytest.raises(CellIndexError, match="embedded by another model"):
        cs.tl.search_centroid(query, model, index, k=5)
    query.write_h5ad(tmp_path / "q.h5ad")  # the record travels with the file
    with pytest.raises(CellIndexError, match="embedded by another model"):
        cs.tl.annotate(ad.read_h5ad(tmp_path / "q.h5ad"), index, model=model, abstain=False)
    cs.tl.embed(query, model)
    cs.tl.annotate(query, index, model=model, abstain=False)
    assert query.uns["cellsift"]["X_cellsift"]["model_fingerprint"] == model.fingerprint
    del query.uns["cellsift"]  # embeddings put there by other means are taken as they are
    cs.tl.annotate(query, index, abstain=False)
    query.uns["cellsift"] = "a note"  # not cellsift's record: named, not overwritten
    embedded = query.obsm["X_cellsift"].copy()
    for call in (lambda: cs.tl.embed(query, other), lambda: cs.tl.annotate(query, index)):
        with pytest.raises(ValueError, match=r"uns\['cellsift'\] holds str 'a note', not the"):
            call()
    assert query.uns["cellsift"] == "a note"
    # (hunt249) before the cells are embedded: the embedding there was replaced before
    np.testing.assert_array_equal(query.obsm["X_cellsift"], embedded)
    del query.uns["cellsift"]
    # inputs of another kind are named (AttributeErrors before), and keys an h5ad cannot
    # keep are refused (written, and the file then failed to write or read back nested)
    path = str(tmp_path / "q.h5ad")
    for call, message in (
        (lambda: cs.tl.embed(path, model), r"adata must be an AnnData, not str .*ad\.read_h5ad"),
        (lambda: cs.tl.embed(query, str(bundle)), r"model must be a cellsift model .*MetricModel\.load"),
        (lambda: cs.tl.annotate(query, model, model=index), r"reference must be a CellIndex .*not MetricModel: pass the model as model="),
        (lambda: cs.tl.annotate(query, path), r"reference must be a CellIndex .*not str '.*q\.h5ad': load the index first, CellIndex\.load"),
        (lambda: cs.tl.annotate(query, index, calibrate_on=path), r"calibrate_on is held-out .*not the path"),
        (lambda: cs.tl.search_centroid(query, model, model, k=5), r"index must be a CellIndex"),
        (lambda: cs.tl.search_centroid(query, model, path, k=5), r"index must be a CellIndex .*not str '.*q\.h5ad': load the index first"),
        (lambda: cs.tasks.KNNAnnotator(path), r"index must be a CellIndex .*not str '.*q\.h5ad': load the index first"),
        (lambda: cs.tl.search_clusters(path, model, index, "cell_type"), r"adata must be an AnnData"),
        (lambda: cs.tl.pseudobulk(path, "cell_type"), r"adata must be an AnnData"),
        (lambda: embed_collection(str(bundle), synthetic_h5ad, tmp_path / "e.zarr"), r"model must be a cellsift model"),
    ):  # fmt: skip
        with pytest.raises(TypeError, match=message):
            call()
    for key, said in ((None, r"a name \(text\), not NoneType"), (3, r"a name \(text\), not int"), ("", "a name without '/'"), ("emb/x", "a name without '/'")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"key_added must be {said}"):
            cs.tl.embed(query, model, key_added=key)
        with pytest.raises(ValueError, match=rf"use_rep must be {said}"):
            cs.tl.annotate(query, index, model=model, use_rep=key, abstain=False)
    assert "cellsift" not in query.uns and not (tmp_path / "e.zarr").exists()
    # a key only read is taken as it is (anndata holds one with '/' in memory), and an
    # empty prefix of annotate's columns is one
    query.obsm["emb/x"] = query.obsm["X_cellsift"]
    cs.tl.annotate(query, index, use_rep="emb/x", key_added="", abstain=False)
    assert "_cell_type" in query.obs


def test_annotate_with_a_ready_annotator_refuses_options_it_would_ignore(bundle, synthetic_h5ad):
    """A KNNAnnotator has its own k, labels and threshold: options that set up the annotator
    made from an index are refused by name rather than silently not applied; without them
    the annotator's own calls are written."""
    from cellsift.errors import ConfigError
    from cellsift.tasks import KNNAnnotator

    model = MetricModel.load(bundle)
    ref = ad.read_h5ad(synthetic_h5ad)
    cs.tl.embed(ref, model)
    index = CellIndex.build(ref.obsm["X_cellsift"], ref.obs.reset_index(drop=True), model=model)
    ann = KNNAnnotator(index, k=7)
    ann.calibrate()
    query = ref[:50].copy()
    for options in ({"abstain": False}, {"k": 15, "quantile": 0.9}, {"calibrate_on": ref[:5]}):
        with pytest.raises(ConfigError, match=rf"^{', '.join(options)} set up the annotator"):
            cs.tl.annotate(query, ann, **options)
    cs.tl.annotate(query, ann, k=50, abstain=True)  # (the defaults, given)
    # the annotator's own label column and voting, given: no other setting (review)
    cs.tl.annotate(query, ann, label_key="cell_type_ontology_term_id", ontology_aware=False)
    cs.tl.annotate(query, ann, k=np.int64(50), quantile=np.float64(0.99))  # (of numpy's types)
    want = ann.annotate(query.obsm["X_cellsift"])
    assert (
        query.obs["cellsift_cell_type_ontology_term_id"].astype(str) == want["label"].to_numpy()
    ).all()


def test_centroid_search_of_cells_without_counts_names_them(bundle, synthetic_h5ad):
    """A cell set, or a group, without counts in the model's genes: an error naming the set
    or the group (not "cells" the user never made, nor an option these functions lack)."""
    from cellsift.errors import DataError

    model = MetricModel.load(bundle)
    ref = ad.read_h5ad(synthetic_h5ad)
    index = CellIndex.build(model.embed(ref), ref.obs.reset_index(drop=True), model=model)
    query = ref[:40].copy()
    x = query.X.tolil()
    x[:20] = 0
    query.X = x.tocsr()
    query.obs["part"] = np.where(np.arange(40) < 20, "empty", "full")
    with pytest.raises(DataError, match=r"^the cell set: no counts in the model's \d+ genes"):
        cs.tl.search_centroid(query, model, index, cells=np.arange(40) < 20, k=5, qc=False)
    with pytest.raises(DataError, match=r"^groups of 'part' \('empty'\): no counts"):
        cs.tl.search_clusters(query, model, index, "part", k=5)
    query.obs["part"] = np.where(np.arange(40) < 20, "centroid", "full")  # (a group's name)
    with pytest.raises(DataError, match=r"^groups of 'part' \('centroid'\): no counts"):
        cs.tl.search_clusters(query, model, index, "part", k=5)
    # positions are no cells: refused, not read as obs names (which here are numbers too)
    numbered = query[20:].copy()
    numbered.obs_names = [str(i) for i in range(20)][::-1]
    with pytest.raises(ValueError, match=r"cells holds numbers.*boolean mask"):
        cs.tl.search_centroid(numbered, model, index, cells=np.arange(5), k=5, qc=False)
    with pytest.raises(ValueError, match=r"cells holds numbers"):
        cs.tl.search_centroid(numbered, model, index, cells=[0, 1, 2], k=5, qc=False)
    # (names given as text are names)
    cs.tl.search_centroid(numbered, model, index, cells=["0", "1", "2"], k=5, qc=False)
    full = cs.tl.search_centroid(query, model, index, cells=np.arange(40) >= 20, k=5, qc=False)
    bulk = cs.tl.pseudobulk(query[20:], np.full(20, "x"))
    np.testing.assert_array_equal(full.indices, index.search(model.embed(bulk), 5).indices)


def test_centroid_check_names_each_cell_of_the_set(bundle, synthetic_h5ad):
    """The coherence check's clusters come one per cell of the set, in obs order, with -1
    for a cell without counts in the model's genes (it sits out the check)."""
    model = MetricModel.load(bundle)
    ref = ad.read_h5ad(synthetic_h5ad)
    index = CellIndex.build(model.embed(ref), ref.obs.reset_index(drop=True), model=model)
    query = ref[:400].copy()
    x = query.X.tolil()
    x[7] = 0
    query.X = x.tocsr()
    # every other cell, of one type, cell 7 among them
    cells = (np.arange(400) % 2 == 1) & (query.obs["cell_type"] == query.obs["cell_type"].iloc[7])
    cells = cells.to_numpy()
    first = int(np.flatnonzero(cells).tolist().index(7))
    with warnings.catch_warnings():  # (whether this small model's clusters look alike)
        warnings.simplefilter("ignore", CellsiftWarning)
        qc = cs.tl.search_centroid(query, model, index, cells=cells, k=20).qc
    assert len(qc.cluster_n) == cells.sum() and qc.cluster_n[first] == -1
    assert (np.delete(qc.cluster_n, first) >= 0).all()
    assert qc.clusters["cells"].sum() == cells.sum() - 1 and len(qc.clusters) == 3
    query.obs.loc[cells, "qc_cluster"] = qc.cluster_n  # (as a user would keep it)


def test_pseudobulk_and_centroid_checks_of_what_users_pass(bundle, synthetic_h5ad):
    """Groups as a plain list (obs[col].tolist()) leave unlabelled cells out as a Series
    does, not as a group 'nan'; an obsm embedding of another width (another tool's, no
    record) is named, not an internal callback."""
    model = MetricModel.load(bundle)
    ref = ad.read_h5ad(synthetic_h5ad)
    query = ref[:40].copy()
    groups = pd.Series(["A" if i % 3 else np.nan for i in range(40)], index=query.obs_names)
    want = cs.tl.pseudobulk(query, groups)
    got = cs.tl.pseudobulk(query, groups.tolist())
    assert list(got.obs_names) == list(want.obs_names) == ["A"]
    np.testing.assert_array_equal(got.X.toarray(), want.X.toarray())
    index = CellIndex.build(model.embed(ref), ref.obs.reset_index(drop=True), model=model)
    query.obsm["X_cellsift"] = np.random.default_rng(0).normal(size=(40, 50)).astype("float32")
    with pytest.raises(CellIndexError, match=r"obsm\['X_cellsift'\] holds 50 dims, not cells x"):
        cs.tl.search_centroid(query, model, index, k=5)
    query.obsm["X_cellsift"] = sp.csr_matrix(model.embed(query))  # (sparse: read as dense)
    with warnings.catch_warnings():  # (whether this small model's clusters look alike)
        warnings.simplefilter("ignore", CellsiftWarning)
        dense = cs.tl.search_centroid(query.copy(), model, index, k=5)
    assert dense.qc is not None and len(dense.qc.cluster_n) == 40
    with warnings.catch_warnings():  # (a sparse obsm annotates as its dense values)
        warnings.simplefilter("ignore", CellsiftWarning)
        sparse = cs.tl.annotate(query, index, model=model, abstain=False, copy=True)
        query.obsm["X_cellsift"] = query.obsm["X_cellsift"].toarray()
        dense = cs.tl.annotate(query, index, model=model, abstain=False, copy=True)
    pd.testing.assert_frame_equal(sparse.obs, dense.obs)
    # a list of whole numbers and NaN (a float column): the groups 1 and 2, named as the
    # same numbers as ints are ('1', not '1.0')
    numbers = [1 if i % 2 else (2 if i % 3 else np.nan) for i in range(40)]
    want = cs.tl.pseudobulk(query, pd.Series(numbers, index=query.obs_names))
    assert list(cs.tl.pseudobulk(query, numbers).obs_names) == list(want.obs_names)
    assert sorted(want.obs_names) == ["1", "2"]
    halves = cs.tl.pseudobulk(query, [1.5 if i % 2 else 2.0 for i in range(40)])
    assert sorted(halves.obs_names) == ["1.5", "2"]
    with pytest.raises(ValueError, match=r"groups 1.0, '1' read the same as text"):
        cs.tl.pseudobulk(query, ["1", 1.0] * 20)
    # a set whose sum of a gene passes 2**24, which no cell's count may: searched
    deep = query.copy()
    del deep.obsm["X_cellsift"]
    deep.X = sp.csr_matrix(deep.X)
    deep.X[:, 0] = 500_000.0  # x 40 cells: 2e7
    assert cs.tl.pseudobulk(deep, ["all"] * 40).X[0, 0] > 2**24
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellsiftWarning)
        assert len(cs.tl.search_centroid(deep, model, index, k=5).indices[0]) == 5
    ordered = pd.CategoricalIndex(["b", "a"] * 20, categories=["c", "b", "a"], ordered=True)
    want = cs.tl.pseudobulk(query, pd.Series(ordered, index=query.obs_names))
    assert list(cs.tl.pseudobulk(query, ordered).obs_names) == list(want.obs_names) == ["b", "a"]


def test_cells_named_by_repeated_obs_names_are_refused(bundle, synthetic_h5ad):
    """Obs names that repeat (after a concat of samples sharing barcodes) cannot tell cells
    apart: names that select several cells, and a reordered mask Series, are refused with
    the fix, rather than selecting another group's cell or blaming the Series' index."""
    model = MetricModel.load(bundle)
    ref = ad.read_h5ad(synthetic_h5ad)
    index = CellIndex.build(model.embed(ref), ref.obs.reset_index(drop=True), model=model)
    query = ref[:40].copy()
    query.obs_names = [f"c{i % 30}" for i in range(40)]  # c0..c9 name two cells each
    with pytest.raises(ValueError, match=r"obs names repeat.*'c4': 2 cells.*boolean mask"):
        cs.tl.search_centroid(query, model, index, cells=["c4", "c20"], k=5, qc=False)
    cs.tl.search_centroid(query, model, index, cells=["c20", "c21"], k=5, qc=False)  # unique
    mask = pd.Series(np.arange(40) < 20, index=query.obs_names)
    with pytest.raises(ValueError, match=r"another order.*obs names repeat.*to_numpy"):
        cs.tl.search_centroid(query, model, index, cells=mask.iloc[::-1], k=5, qc=False)
    cs.tl.search_centroid(query, model, index, cells=mask, k=5, qc=False)  # (in obs order)
    # every copy of a name given (all the cells' names): no doubt which cells are meant
    np.testing.assert_array_equal(cell_mask(query, query.obs_names), np.ones(40, dtype=bool))
    np.testing.assert_array_equal(cell_mask(query, ["c4", "c4"]), query.obs_names == "c4")
    # a Series of one value per name, in another order, with each name once: by name
    per_name = pd.Series(np.arange(30), index=[f"c{i}" for i in range(30)]).iloc[::-1]
    np.testing.assert_array_equal(
        np.asarray(in_obs_order(per_name, query.obs_names, "groups")), np.arange(40) % 30
    )
    numbered = pd.Index(np.arange(40) + 1000)  # obs names that are numbers (obs.index set so)
    by_number = pd.Series(np.arange(40), index=numbered)
    np.testing.assert_array_equal(in_obs_order(by_number, numbered, "groups"), np.arange(40))
    np.testing.assert_array_equal(
        in_obs_order(by_number.iloc[::-1], numbered, "groups"), np.arange(40)
    )
    extra = pd.concat([pd.Series([99], index=["zzz"]), per_name.iloc[1:]])  # 'zzz': no cell
    with pytest.raises(ValueError, match="obs names repeat"):
        in_obs_order(extra, query.obs_names, "groups")
    with pytest.raises(ValueError, match="obs names repeat"):  # (one value per cell, as tl's)
        cs.tl.pseudobulk(query, pd.Series(np.arange(40), index=[f"x{i}" for i in range(40)]))


def test_embed_collection_checks_its_input_before_writing(bundle, synthetic_h5ad, tmp_path):
    """A CellCollection of other genes (it was embedded in its own gene order), cells whose
    counts all lie in genes the model lacks (they would all land on one point), sizes below
    1 and obs columns the stores lack: errors naming them, before or instead of a store."""
    from cellsift.data import CellCollection
    from cellsift.errors import ConfigError, MissingKeyError

    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)
    reversed_genes = adata[:, adata.var_names[::-1]].copy()
    reversed_genes.write_h5ad(tmp_path / "rev.h5ad")
    with pytest.raises(ConfigError, match=r"build it with genes=model\.genes"):
        embed_collection(model, CellCollection(tmp_path / "rev.h5ad"), tmp_path / "a.zarr")
    aligned = CellCollection(tmp_path / "rev.h5ad", genes=model.genes)
    out = embed_collection(model, aligned, tmp_path / "b.zarr")
    np.testing.assert_allclose(load_embeddings(out)[0], model.embed(adata), atol=1e-5)

    few = adata[:50].copy()
    other = ad.AnnData(
        few.X.copy(), obs=few.obs, var=pd.DataFrame(index=[f"other{i}" for i in range(few.n_vars)])
    )
    mixed = ad.concat([few, other[:1]], join="outer", index_unique="-")
    x = sp.csr_matrix(mixed.X)  # the other cell: a stored 0 in a model gene (gene 0) too
    last = x[-1]
    stored = (np.r_[0.0, last.data], np.r_[0, last.indices], [0, last.nnz + 1])
    mixed.X = sp.vstack([x[:-1], sp.csr_matrix(stored, shape=last.shape)], format="csr")
    assert mixed.X[-1].nnz == last.nnz + 1
    mixed.write_h5ad(tmp_path / "mixed.h5ad")
    said = r"mixed\.h5ad \(X\): cell 50 \('cell_0-1'\) has counts only in genes outside the 300"
    with pytest.raises(DataError, match=said):  # (the collection's check, as it reads)
        embed_collection(model, tmp_path / "mixed.h5ad", tmp_path / "c.zarr")
    assert not (tmp_path / "c.zarr").exists()
    for kwargs in ({"batch_size": 0}, {"devices": 0}):
        with pytest.raises(ConfigError, match=f"{next(iter(kwargs))} must be a whole number"):
            embed_collection(model, synthetic_h5ad, tmp_path / "d.zarr", **kwargs)
    for cells in (adata[:10].copy(), adata[:0].copy()):  # (no cells: checked too; review)
        with pytest.raises(ConfigError, match="batch_size must be a whole number of at least"):
            cs.tl.embed(cells, model, batch_size=0)
        with pytest.raises(ConfigError, match="bogus"):
            model.embed(cells, device="bogus:7")
    with pytest.raises(MissingKeyError, match=r"obs_columns \['donr'\] are not obs columns"):
        embed_collection(model, synthetic_h5ad, tmp_path / "e.zarr", obs_columns=["donr"])
    assert not list(tmp_path.glob(".e.zarr*"))  # nothing embedded first


def test_obs_columns_named_like_the_origin_columns_do_not_replace_them(
    bundle, synthetic_h5ad, tmp_path
):
    """obs columns called store, store_row or obs_name: each cell's origin stays under those
    names (search hits lead back to their cells), the obs columns are kept as <name>_obs."""
    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)[:60].copy()
    adata.obs["store"] = "shop_A"
    adata.obs["obs_name"] = "x"
    adata.write_h5ad(tmp_path / "clash.h5ad")
    with pytest.warns(CellsiftWarning) as said:
        out = embed_collection(model, tmp_path / "clash.h5ad", tmp_path / "e.zarr")
    stored = [str(w.message).split(" is stored as ") for w in said]
    assert sorted(m[1].split()[0] for m in stored if len(m) == 2) == [
        "'obs_name_obs'",
        "'store_obs'",
    ]
    meta = load_embeddings(out)[1]
    assert set(meta["store"].astype(str)) == {str(tmp_path / "clash.h5ad")}
    assert meta["obs_name"].tolist() == adata.obs_names.tolist()
    assert meta["store_row"].tolist() == list(range(60))
    assert set(meta["store_obs"]) == {"shop_A"} and set(meta["obs_name_obs"]) == {"x"}


def test_numbers_and_booleans_with_gaps_keep_their_type_through_embed_and_index(
    bundle, synthetic_h5ad, tmp_path
):
    """Nullable integer and boolean obs columns (an age, a flag, with gaps) keep their type
    in the embeddings' metadata and the index built from them, so a filter compares them
    as numbers and booleans (they were stored as text, and such filters refused); text and
    categories stay text."""
    from cellsift.tasks import CellIndex

    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)[:60].copy()
    adata.obs["age"] = pd.array([i if i % 3 else None for i in range(60)], dtype="Int64")
    adata.obs["flag"] = pd.array([bool(i % 2) if i % 4 else None for i in range(60)], "boolean")
    adata.obs["grp"] = pd.Categorical([f"g{i % 3}" if i % 5 else None for i in range(60)])
    adata.write_h5ad(tmp_path / "typed.h5ad")
    meta = load_embeddings(embed_collection(model, tmp_path / "typed.h5ad", tmp_path / "e.zarr"))[1]
    pd.testing.assert_series_equal(meta["age"], adata.obs["age"].reset_index(drop=True))
    pd.testing.assert_series_equal(meta["flag"], adata.obs["flag"].reset_index(drop=True))
    assert meta["grp"].tolist() == [None if pd.isna(g) else g for g in adata.obs["grp"]]
    index = CellIndex.build(*load_embeddings(tmp_path / "e.zarr"), engine="exact")
    np.testing.assert_array_equal(index.select({"age": [1, 2]}), [1, 2])
    want = np.flatnonzero(adata.obs["flag"].fillna(False).to_numpy())
    np.testing.assert_array_equal(index.select({"flag": True}), want)


def test_obs_columns_of_some_stores_are_kept_missing_for_the_others(
    bundle, synthetic_h5ad, tmp_path
):
    """A column that only some stores hold (one study records donors, another does not)
    is kept, missing for the cells of stores without it and of its type where the stores
    holding it agree (a number stays a number, so an index filters it as one); it can be
    named in obs_columns. A column no store holds is an error."""
    from cellsift.errors import MissingKeyError
    from cellsift.tasks import CellIndex

    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)
    first, second = adata[:30].copy(), adata[30:70].copy()
    first.obs["donor"] = pd.Categorical(np.repeat(["d1", "d2"], 15))
    first.obs["age"] = np.arange(30, dtype=np.int64)
    second.obs["flag"] = np.tile([True, False], 20)
    paths = [tmp_path / "first.h5ad", tmp_path / "second.h5ad"]
    first.write_h5ad(paths[0])
    second.write_h5ad(paths[1])
    meta = load_embeddings(embed_collection(model, paths, tmp_path / "e.zarr"))[1]
    assert meta["donor"].tolist() == [*np.repeat(["d1", "d2"], 15), *[None] * 40]
    want = pd.array([*range(30), *[None] * 40], dtype="Int64")
    pd.testing.assert_extension_array_equal(pd.array(meta["age"]), want)
    flags = pd.array([*[None] * 30, *np.tile([True, False], 20)], dtype="boolean")
    pd.testing.assert_extension_array_equal(pd.array(meta["flag"]), flags)
    index = CellIndex.build(*load_embeddings(tmp_path / "e.zarr"), engine="exact")
    np.testing.assert_array_equal(index.select({"donor": ["d2"]}), np.arange(15, 30))
    np.testing.assert_array_equal(index.select({"age": [3, 4]}), [3, 4])
    np.testing.assert_array_equal(index.select({"flag": True}), np.arange(30, 70, 2))
    named = embed_collection(model, paths, tmp_path / "n.zarr", obs_columns=["donor"])
    assert load_embeddings(named)[1]["donor"].tolist() == meta["donor"].tolist()
    # one column as text, and columns as an iterator, read once (hunt259: the text's letters
    # were missing columns; the iterator was spent by the check, and no column was written)
    for i, given in enumerate(("donor", iter(["donor", "age"]))):
        kept = load_embeddings(embed_collection(model, paths, tmp_path / f"{i}.zarr", obs_columns=given))[1]  # fmt: skip
        assert [c for c in kept.columns if c in ("donor", "age", "flag")] == ["donor", "age"][
            : i + 1
        ]
        assert kept["donor"].tolist() == meta["donor"].tolist()
    with pytest.raises(MissingKeyError, match=r"obs_columns \['donr'\] are not obs columns"):
        embed_collection(model, paths, tmp_path / "x.zarr", obs_columns=["donr"])


def test_pseudobulk_takes_a_column_of_cells_with_repeated_names(synthetic_h5ad):
    adata = ad.read_h5ad(synthetic_h5ad)[:40].copy()
    adata.obs_names = [f"c{i % 10}" for i in range(40)]
    by_name = cs.tl.pseudobulk(adata, "dataset_id")
    by_series = cs.tl.pseudobulk(adata, adata.obs["dataset_id"])
    np.testing.assert_array_equal(by_series.X.toarray(), by_name.X.toarray())


def test_pseudobulk_reads_a_series_by_its_index_unless_it_is_the_default_one():
    """pandas' default index is positions; any other index names cells, a range too (a
    reversed Series of cells named "0", "1", ...); float16 counts sum as the others."""
    x = np.array([[1.0], [10.0], [100.0]], dtype=np.float16)
    adata = ad.AnnData(x)  # obs names "0", "1", "2"
    labels = pd.Series(["a", "b", "b"])

    def sums(groups):
        return cs.tl.pseudobulk(adata, groups).to_df()["0"].to_dict()

    want = {"a": 1.0, "b": 110.0}
    assert sums(labels) == want
    assert sums(labels.iloc[::-1]) == want  # RangeIndex 2, 1, 0: names the cells
    assert sums(labels.iloc[[2, 0, 1]]) == want
    adata.obs_names = ["2", "1", "0"]  # the default index stays positions
    assert sums(labels) == want
    with pytest.raises(ValueError, match="index is not the cells' obs names"):
        sums(pd.Series(["a", "b", "b"], index=pd.RangeIndex(5, 8)))


def test_counts_stored_in_parts_or_as_zeros_embed_as_the_counts(bundle, synthetic_h5ad):
    """A count split over two entries of a CSR row (not canonical) embeds as the count;
    stored zeros are no counts; the caller's matrix is left as it was."""
    import scipy.sparse as sp

    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)[:100].copy()
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    lengths = np.diff(x.indptr)
    rows = np.repeat(np.arange(x.shape[0]), lengths)
    # every entry twice, each holding half (the matrix's sum is the same)
    twice = np.concatenate([np.arange(x.nnz), np.arange(x.nnz)])
    order = np.lexsort((twice, rows[twice]))
    split = sp.csr_matrix(
        (
            np.tile(x.data / 2, 2)[order],
            x.indices[twice][order],
            np.append(0, np.cumsum(2 * lengths)),
        ),
        shape=x.shape,
    )
    assert not split.has_canonical_format
    np.testing.assert_array_equal(split.toarray(), x.toarray())
    parts = adata.copy()
    parts.X = split
    np.testing.assert_allclose(
        model.embed(parts, check_counts=False), model.embed(adata), atol=1e-6
    )
    assert len(parts.X.data) == 2 * x.nnz  # not changed in place
    zeros = adata.copy()
    zeros.X.data[:] = 0
    with pytest.raises(DataError, match="100 of 100 cells have no counts"):
        model.embed(zeros)


def test_embeddings_store_keeps_missing_labels_missing(bundle, synthetic_h5ad, tmp_path):
    adata = ad.read_h5ad(synthetic_h5ad)[:300].copy()
    labels = adata.obs["cell_type_ontology_term_id"].astype(object).to_numpy()
    labels[:7] = None
    adata.obs["cell_type_ontology_term_id"] = pd.Categorical(labels)
    adata.write_h5ad(tmp_path / "a.h5ad")
    out = embed_collection(MetricModel.load(bundle), tmp_path / "a.h5ad", tmp_path / "e.zarr")
    _, meta = load_embeddings(out)
    assert meta["cell_type_ontology_term_id"].isna().sum() == 7
    assert "nan" not in set(meta["cell_type_ontology_term_id"].dropna())


def test_tl_embed_and_annotate_write_the_obs_columns(bundle, synthetic_h5ad):
    model = MetricModel.load(bundle)
    ref = ad.read_h5ad(synthetic_h5ad)
    cs.tl.embed(ref, model)
    assert ref.obsm["X_cellsift"].shape == (ref.n_obs, 16)
    index = CellIndex.build(ref.obsm["X_cellsift"], ref.obs.reset_index(drop=True))
    query = ref[:300].copy()
    del query.obsm["X_cellsift"]
    cs.tl.annotate(query, index, model=model, abstain=False, ontology_aware=False)
    direct = KNNAnnotator(index, k=50).annotate(query.obsm["X_cellsift"])
    assert (
        query.obs["cellsift_cell_type_ontology_term_id"].astype(str) == direct["label"].to_numpy()
    ).all()
    names = set(load_cell_ontology().names(sorted(set(direct["label"]) - {"unknown"})))
    assert set(query.obs["cellsift_cell_type"].astype(str)) <= names | {"unknown"}
    conf = query.obs["cellsift_confidence"].to_numpy()
    assert ((conf >= 0) & (conf <= 1)).all()
    # abstention calibrated on held-out cells (an AnnData, embedded with the model); the
    # query and the held-out cells are not indexed
    rest = ref[700:]
    index = CellIndex.build(rest.obsm["X_cellsift"], rest.obs.reset_index(drop=True))
    cs.tl.annotate(query, index, abstain=False, ontology_aware=False)
    plain = query.obs["cellsift_cell_type_ontology_term_id"].astype(str).to_numpy()
    held_out = ref[300:700].copy()
    del held_out.obsm["X_cellsift"]
    # copy=True writes into no input: neither the query nor the calibration cells
    copied = cs.tl.annotate(
        query, index, model=model, calibrate_on=held_out, ontology_aware=False, copy=True
    )
    assert copied is not None and "X_cellsift" not in held_out.obsm
    cs.tl.annotate(query, index, model=model, calibrate_on=held_out, ontology_aware=False)
    assert (copied.obs == query.obs).all().all()
    thr = KNNAnnotator(index).calibrate(model.embed(held_out))
    far = query.obs["cellsift_mean_distance"].to_numpy() > thr
    labels = query.obs["cellsift_cell_type_ontology_term_id"].astype(str).to_numpy()
    assert (labels[far] == "unknown").all()
    assert (labels[~far] == plain[~far]).all()
    assert 0 < far.sum() < 0.1 * len(far)
    # a blocklist: the threshold is calibrated against the reference cells it leaves
    dropped = sorted(set(rest.obs["cell_type_ontology_term_id"].astype(str)))[0]
    options = {"calibrate_on": held_out, "ontology_aware": False, "blocklist": [dropped]}
    cs.tl.annotate(query, index, model=model, **options)
    thr_left = KNNAnnotator(index).calibrate(model.embed(held_out), blocklist=[dropped])
    assert thr_left > thr
    far = query.obs["cellsift_mean_distance"].to_numpy() > thr_left
    labels = query.obs["cellsift_cell_type_ontology_term_id"].astype(str).to_numpy()
    assert (labels[far] == "unknown").all() and dropped not in set(labels)
    # a ready annotator keeps its threshold: one calibrated against other reference cells
    # than the blocklist leaves is refused (it was used with a warning); the same, taken
    whole = KNNAnnotator(index, ontology_aware=False)
    whole.calibrate(model.embed(held_out))
    with pytest.raises(ConfigError, match=r"calibrated against the whole reference.* CellIndex"):
        cs.tl.annotate(query, whole, model=model, blocklist=[dropped])
    left = KNNAnnotator(index, ontology_aware=False)
    left.calibrate(model.embed(held_out), blocklist=[dropped])
    with pytest.raises(ConfigError, match=r"calibrated against a selection of it"):
        cs.tl.annotate(query, left, model=model)
    # a blocklist given as an iterator: read once (the check emptied it: nothing blocked)
    for reference in (left, index):
        copied = cs.tl.annotate(
            query,
            reference,
            model=model,
            blocklist=iter([dropped]),
            copy=True,
            **({} if reference is left else {"calibrate_on": held_out, "ontology_aware": False}),
        )
        assert dropped not in set(copied.obs["cellsift_cell_type_ontology_term_id"].astype(str))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CellsiftWarning)
        again = cs.tl.annotate(query, left, model=model, blocklist=[dropped], copy=True)
    pd.testing.assert_frame_equal(again.obs, query.obs)
    # copy=True of a backed AnnData (or a view of one): a copy in memory that shares
    # nothing with it, the file not written; so of backed calibration cells too, and
    # in place, a backed view of them is named as such
    backed = ad.read_h5ad(synthetic_h5ad, backed="r")
    for held in (backed, backed[300:700]):
        options = {"calibrate_on": held, "ontology_aware": False}
        cs.tl.annotate(query, index, model=model, copy=True, **options)
        assert "X_cellsift" not in held.obsm
    fresh = query.copy()
    del fresh.obsm["X_cellsift"]
    with pytest.raises(DataError, match=r"^calibrate_on is a view of a backed AnnData"):
        cs.tl.annotate(fresh, index, model=model, calibrate_on=backed[300:700])
    assert "X_cellsift" not in fresh.obsm  # (said before the query was embedded)
    before = synthetic_h5ad.stat().st_mtime_ns
    backed.obsm["X_pca"] = np.zeros((backed.n_obs, 2))
    embedded = cs.tl.embed(backed, model, copy=True)
    assert not embedded.isbacked and "X_cellsift" not in backed.obsm
    embedded.obsm["X_pca"][0, 0] = 9.0
    assert backed.obsm["X_pca"][0, 0] == 0.0
    part = cs.tl.embed(backed[:20], model, copy=True)
    part.obsm["X_pca"][0, 0] = 9.0  # (a view's entries would be tied to the backed object)
    del backed.obsm["X_pca"]
    np.testing.assert_allclose(embedded.obsm["X_cellsift"], ref.obsm["X_cellsift"], atol=1e-6)
    annotated = cs.tl.annotate(backed[:50], index, model=model, ontology_aware=False, copy=True)
    assert not annotated.isbacked and "cellsift_confidence" in annotated.obs
    assert "cellsift_confidence" not in backed.obs
    # in place, a backed view cannot take the results: said before the work, with the fix
    for call in (
        lambda: cs.tl.embed(backed[:20], model),
        lambda: cs.tl.annotate(backed[:20], index, model=model, ontology_aware=False),
    ):
        with pytest.raises(DataError, match=r"view of a backed AnnData.*pass copy=True"):
            call()
    assert synthetic_h5ad.stat().st_mtime_ns == before
    backed.file.close()


def test_command_line_embed_index_annotate(bundle, synthetic_h5ad, tmp_path, capsys):
    emb, idx, out = tmp_path / "emb.zarr", tmp_path / "index", tmp_path / "annotated.h5ad"
    assert main(["embed", str(bundle), str(synthetic_h5ad), str(emb)]) == 0
    assert main(["index", str(emb), str(idx), "--engine", "exact"]) == 0
    assert main(["annotate", str(bundle), str(idx), str(synthetic_h5ad), str(out)]) == 0
    annotated = ad.read_h5ad(out)
    for col in ("cellsift_cell_type", "cellsift_cell_type_ontology_term_id", "cellsift_confidence"):
        assert col in annotated.obs
    assert "annotated" in capsys.readouterr().out
    cal = tmp_path / "held_out.h5ad"
    ad.read_h5ad(synthetic_h5ad)[:400].copy().write_h5ad(cal)
    args = ["annotate", str(bundle), str(idx), str(synthetic_h5ad), str(out), "--overwrite"]
    assert main([*args, "--calibrate-on", str(cal)]) == 0
    # too few calibration cells for the quantile, or none: one line that names the options
    ad.read_h5ad(synthetic_h5ad)[:50].copy().write_h5ad(cal)
    capsys.readouterr()
    assert main([*args, "--calibrate-on", str(cal)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs at least 99 calibration cells, got 50" in err[0]
    assert "a lower --quantile, or --no-abstain" in err[0]
    assert main([*args, "--calibrate-on", str(cal), "--quantile", "0.9"]) == 0
    ad.read_h5ad(synthetic_h5ad)[:0].copy().write_h5ad(cal)
    assert main([*args, "--calibrate-on", str(cal)]) == 2
    assert "error: no calibration cells" in capsys.readouterr().err
    assert main(["annotate", str(bundle), str(idx), str(cal), str(tmp_path / "none.h5ad")]) == 2
    assert f"error: {cal}: no cells to annotate" in capsys.readouterr().err
    assert not (tmp_path / "none.h5ad").exists()
    # a missing index is a clear error, not a traceback
    assert (
        main(["annotate", str(bundle), str(tmp_path / "nope"), str(synthetic_h5ad), str(out)]) == 2
    )
    # a query of log-normalised values: an error naming the file and its layers
    logged = ad.read_h5ad(synthetic_h5ad)[:50].copy()
    logged.layers["counts"] = logged.X.copy()
    logged.X = np.log1p(logged.X)
    logged.write_h5ad(tmp_path / "logged.h5ad")
    capsys.readouterr()
    args = ["annotate", str(bundle), str(idx), str(tmp_path / "logged.h5ad"), str(out)]
    assert main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "logged.h5ad (X): contains non-integer values" in err and "'counts'" in err
    assert main([*args, "--overwrite", "--layer", "counts"]) == 0
    # cells without counts in the model's genes: an error whose way is --drop-empty, which
    # leaves them out of the output (and out of --calibrate-on), saying how many
    empty = ad.read_h5ad(synthetic_h5ad)[:300].copy()
    x = empty.X.toarray()
    x[[3, 8]] = 0
    empty.X = sp.csr_matrix(x)
    empty.write_h5ad(tmp_path / "empty.h5ad")
    empty[:150].write_h5ad(cal)
    args = ["annotate", str(bundle), str(idx), str(tmp_path / "empty.h5ad"), str(out)]
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "2 of 300 cells have no counts in the model's genes" in err
    assert "Leave them out with --drop-empty" in err and "np.diff" not in err
    assert main([*args, "--overwrite", "--drop-empty", "--calibrate-on", str(cal)]) == 0
    said = capsys.readouterr().out
    assert "left out 2 of 300 cells without counts in the model's genes" in said
    assert "left out 2 of 150 cells" in said
    kept = ad.read_h5ad(out)
    assert kept.n_obs == 298 and not kept.obs_names.isin(empty.obs_names[[3, 8]]).any()
    # written over the query file, --drop-empty would lose the cells it leaves out: refused,
    # the file as it was; where it leaves none out, the file takes the calls
    query = str(tmp_path / "empty.h5ad")
    before = (tmp_path / "empty.h5ad").read_bytes()
    in_place = ["annotate", str(bundle), str(idx), query, query, "--overwrite", "--drop-empty"]
    capsys.readouterr()
    assert main(in_place) == 2
    err = capsys.readouterr().err
    assert "is the query file, and --drop-empty leaves 2 of its 300 cells out" in err
    assert (tmp_path / "empty.h5ad").read_bytes() == before
    # the query reached through a link, the output its file: refused too; an output that
    # is a link to the query replaces the link, the query as it was (review213)
    (tmp_path / "link.h5ad").symlink_to("empty.h5ad")
    linked = [str(tmp_path / "link.h5ad") if a == query else a for a in in_place]
    assert main([*linked[:4], query, *linked[5:]]) == 2
    assert main([*linked[:3], query, linked[4], *linked[5:]]) == 0
    assert not (tmp_path / "link.h5ad").is_symlink()
    assert (tmp_path / "empty.h5ad").read_bytes() == before
    kept.write_h5ad(query)
    assert main(in_place) == 0
    assert ad.read_h5ad(query).n_obs == 298
    assert "cellsift_cell_type" in ad.read_h5ad(query).obs
    empty.X = sp.csr_matrix(empty.shape, dtype=np.float32)
    empty.write_h5ad(tmp_path / "empty.h5ad")
    assert main([*args, "--overwrite", "--drop-empty"]) == 2
    assert "none of its 300 cells has counts in the model's genes" in capsys.readouterr().err


def test_annotate_command_votes_with_the_reference_cells_it_is_told_to(
    bundle, synthetic_h5ad, tmp_path, capsys
):
    """--safelist, --blocklist, --filter COLUMN=VALUE (a column given twice: either value)
    and --calibrate-by: the calls tl.annotate makes with the same selection, each cell's
    nearest distance the brute-force one over the selected reference cells; a selection
    the reference cannot make is one line, exit status 2, before any embedding."""
    from cellsift import tl

    emb, idx, out = tmp_path / "emb.zarr", tmp_path / "index", tmp_path / "annotated.h5ad"
    assert main(["embed", str(bundle), str(synthetic_h5ad), str(emb)]) == 0
    assert main(["index", str(emb), str(idx), "--engine", "exact"]) == 0
    query = ad.read_h5ad(synthetic_h5ad)
    query = query[np.arange(0, query.n_obs, 7)].copy()
    query.write_h5ad(tmp_path / "query.h5ad")
    ref, meta = load_embeddings(emb)
    studies = sorted(meta["dataset_id"].unique())
    keep = ["CL:0000624", "CL:0000625", "CL:0000236"]  # CD4, CD8 T cells, B cells
    base = ["annotate", str(bundle), str(idx), str(tmp_path / "query.h5ad"), str(out)]
    selection = ["--safelist", *keep, "--blocklist", "CL:0000236"]
    selection += ["--filter", f"dataset_id={studies[0]}", "--filter", f"dataset_id={studies[1]}"]
    assert main([*base, *selection, "--calibrate-by", "donor_id"]) == 0
    got = ad.read_h5ad(out).obs
    want = tl.annotate(
        query.copy(),
        CellIndex.load(idx),
        model=MetricModel.load(bundle),
        safelist=keep,
        blocklist=["CL:0000236"],
        filter={"dataset_id": studies[:2]},
        calibrate_by="donor_id",
        copy=True,
    ).obs
    for col in ("cellsift_cell_type_ontology_term_id", "cellsift_confidence"):
        np.testing.assert_array_equal(got[col].astype(str), want[col].astype(str))
    calls = set(got["cellsift_cell_type_ontology_term_id"].astype(str))
    assert calls - {"unknown"} and calls <= {"CL:0000624", "CL:0000625", "unknown"} | set(
        load_cell_ontology().ancestors("CL:0000624")
    )
    chosen = meta["cell_type_ontology_term_id"].isin(keep[:2]) & meta["dataset_id"].isin(
        studies[:2]
    )
    unit = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    q = MetricModel.load(bundle).embed(query)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    brute = (1 - q.astype(np.float64) @ unit[chosen.to_numpy()].T.astype(np.float64)).min(1)
    np.testing.assert_allclose(got["cellsift_min_distance"], brute, atol=1e-5)
    # a list option given twice: both lists (review195: the last one only)
    again = ["--safelist", *keep[:2], "--safelist", keep[2], "--blocklist", "CL:0000236"]
    again += ["--filter", f"dataset_id={studies[0]}", "--filter", f"dataset_id={studies[1]}"]
    assert main([*base, "--overwrite", *again, "--calibrate-by", "donor_id"]) == 0
    pd.testing.assert_frame_equal(ad.read_h5ad(out).obs, got)
    # each wrong selection in one line, before the queries are embedded (values that are not
    # counts: their error, were they embedded)
    logged = query.copy()
    logged.X = np.log1p(logged.X)
    logged.write_h5ad(tmp_path / "logged.h5ad")
    base[3] = str(tmp_path / "logged.h5ad")
    capsys.readouterr()
    for wrong, said in (
        (["--filter", "nope=1"], "filter names columns the metadata does not have: ['nope']"),
        (["--filter", "dataset_id=no_such_study"], "leave none of the reference's"),
        (["--safelist", "CL:0000084"], "safelist names 1 label that the reference's"),
        (["--safelist", keep[2], "--blocklist", keep[2]], "leave none of the reference's"),
        (["--filter", f"n_counts={10**400}"], "leave none of the reference's"),
        (["--calibrate-by", "nope"], "--calibrate-by 'nope': the index metadata has no such"),
        (["--calibrate-by", "dataset_id", "--filter", f"dataset_id={studies[0]}"], "two groups"),
        (["--calibrate-by", "donor_id", "--no-abstain"], "--calibrate-by sets the abstention"),
        (["--calibrate-by", "donor_id", "--calibrate-on", str(synthetic_h5ad)], "pass one of"),
    ):
        assert main([*base, "--overwrite", *wrong]) == 2, wrong
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], (wrong, err)
    with pytest.raises(SystemExit, match="2"):
        main([*base, "--overwrite", "--filter", "dataset_id"])
    assert "'dataset_id' is not COLUMN=VALUE" in capsys.readouterr().err


def test_annotate_reads_labels_as_the_model_trained_on_them(synthetic_h5ad, tmp_path, capsys):
    """A model trained on labels outside the Cell Ontology (cell lines) from its own column:
    cellsift annotate and tl.annotate read that column with plain votes by default (review:
    it asked for both --label-key and --no-ontology); --ontology and --label-key still
    choose."""
    adata = ad.read_h5ad(synthetic_h5ad)
    lines = {t: f"line-{k}" for k, t in enumerate(sorted(adata.obs["cell_type"].unique()))}
    adata.obs["cell_line"] = adata.obs["cell_type"].map(lines).astype(str)
    path = tmp_path / "lines.h5ad"
    adata.write_h5ad(path)
    torch.manual_seed(0)
    model = MetricModel.from_collection(
        path, label_key="cell_line", hidden=(64,), latent=16, ontology_aware=False
    )
    bundle = model.save(tmp_path / "lines_model")
    emb, idx, out = tmp_path / "emb.zarr", tmp_path / "index", tmp_path / "out.h5ad"
    assert main(["embed", str(bundle), str(path), str(emb)]) == 0
    assert main(["index", str(emb), str(idx), "--engine", "exact"]) == 0
    assert main(["annotate", str(bundle), str(idx), str(path), str(out), "--no-abstain"]) == 0
    called = ad.read_h5ad(out).obs["cellsift_cell_type"]
    assert set(called) - {"unknown"} <= set(lines.values())
    assert len(set(called) - {"unknown"}) >= 2  # (an untrained model: calls, not skill)
    # tl.annotate too, given the model
    query = adata[:200].copy()
    cs.tl.annotate(query, CellIndex.load(idx), model=model, abstain=False)
    assert set(query.obs["cellsift_cell_type"]) - {"unknown"} <= set(lines.values())
    capsys.readouterr()
    args = ["annotate", str(bundle), str(idx), str(path), str(out), "--overwrite"]
    assert main([*args, "--ontology"]) == 2  # (asked for: cell lines are no CL terms)
    assert "not Cell Ontology terms" in capsys.readouterr().err
    assert main([*args, "--label-key", "cell_type", "--no-abstain"]) == 0
    assert set(ad.read_h5ad(out).obs["cellsift_cell_type"]) - {"unknown"} <= set(lines)
    # an index of data without the model's column, with Cell Ontology ids: those (review:
    # refused for want of the model's column, where the command used to annotate)
    other, other_idx = tmp_path / "other.zarr", tmp_path / "other_index"
    plain = tmp_path / "plain.h5ad"
    ad.read_h5ad(synthetic_h5ad).write_h5ad(plain)
    assert main(["embed", str(bundle), str(plain), str(other)]) == 0
    assert main(["index", str(other), str(other_idx), "--engine", "exact"]) == 0
    args = ["annotate", str(bundle), str(other_idx), str(path), str(out), "--overwrite"]
    from cellsift._warnings import CellsiftWarning

    # (said: another column than the model's, and its votes the Cell Ontology's; review)
    with pytest.warns(CellsiftWarning, match=r"no 'cell_line' column .* by Cell Ontology votes"):
        assert main([*args, "--no-abstain"]) == 0
    ids = set(ad.read_h5ad(out).obs["cellsift_cell_type_ontology_term_id"]) - {"unknown"}
    assert ids and all(i.startswith("CL:") for i in ids)


def test_annotate_checks_the_reference_labels_before_embedding_and_reads_calibration_counts_where_told(
    bundle, synthetic_h5ad, tmp_path, capsys
):
    """A label column the reference lacks is said before the queries are embedded (here,
    before the queries' values are found not to be counts), by the command and by
    tl.annotate. The calibration file's counts may lie elsewhere than the queries'
    (--calibrate-layer, X by default as --layer's place); its errors name that option. A
    query of too few genes names --layer on the command line."""
    from cellsift.errors import CellsiftError

    emb, idx, out = tmp_path / "emb.zarr", tmp_path / "index", tmp_path / "annotated.h5ad"
    assert main(["embed", str(bundle), str(synthetic_h5ad), str(emb)]) == 0
    assert main(["index", str(emb), str(idx), "--engine", "exact"]) == 0
    adata = ad.read_h5ad(synthetic_h5ad)
    logged = adata[:300].copy()
    logged.layers["counts"] = logged.X.copy()
    logged.X = logged.X.copy()
    logged.X.data = np.log1p(logged.X.data)
    logged.write_h5ad(tmp_path / "logged.h5ad")
    capsys.readouterr()
    args = [str(bundle), str(idx), str(tmp_path / "logged.h5ad"), str(out)]
    assert main(["annotate", *args, "--label-key", "typo"]) == 2
    said = capsys.readouterr().err
    assert "'typo'" in said and "counts" not in said.split("'typo'")[0], said
    assert main(["annotate", *args, "--label-key", "typo", "--layer", "counts"]) == 2
    with pytest.raises(CellsiftError, match="typo"):
        cs.tl.annotate(
            logged, cs.tasks.CellIndex.load(idx), model=MetricModel.load(bundle), label_key="typo"
        )
    assert "X_cellsift" not in logged.obsm
    capsys.readouterr()
    query = [str(bundle), str(idx), str(synthetic_h5ad), str(out), "--overwrite"]
    calibrate = ["--calibrate-on", str(tmp_path / "logged.h5ad"), "--quantile", "0.9"]
    assert main(["annotate", *query, *calibrate]) == 2
    said = capsys.readouterr().err
    assert "Point --calibrate-layer at raw counts" in said and "--layer" not in said, said
    assert main(["annotate", *query, *calibrate, "--calibrate-layer", "counts"]) == 0
    # the queries' counts in a layer, the calibration file's in X
    calibration = ["--calibrate-on", str(synthetic_h5ad)]
    assert main(["annotate", *args, "--overwrite", "--layer", "counts", *calibration]) == 2
    said = capsys.readouterr().err  # (naming X as its option reads it: review)
    assert (
        "synthetic.h5ad has no layer 'counts' (this AnnData has: X (--calibrate-layer X))" in said
    )
    calibration += ["--calibrate-layer", "X"]
    assert main(["annotate", *args, "--overwrite", "--layer", "counts", *calibration]) == 0
    assert main(["annotate", *args, "--overwrite", "--no-abstain", *calibration]) == 2
    assert "--calibrate-on sets the abstention threshold" in capsys.readouterr().err
    # options of a threshold that is not set, or not calibrated on a file, and quantiles
    # out of range: refused before any work (hunt212: exit 0, the option unread)
    refused = {
        ("--no-abstain", "--quantile", "0.9"): "--quantile sets the abstention threshold",
        ("--calibrate-layer", "nope"): "--calibrate-layer locates the counts of the --calib",
        ("--quantile", "1.5"): "--quantile: must be above 0 and below 1, not 1.5",
        ("--quantile", "0"): "--quantile: must be above 0 and below 1, not 0",
    }
    for options, said in refused.items():
        try:
            code = main(["annotate", *query, *options])
        except SystemExit as exit_:  # (argparse's refusal of a value)
            code = exit_.code
        assert code == 2, options
        err = capsys.readouterr().err  # (argparse's: its usage, then the one line)
        assert said in err.strip().splitlines()[-1], err
    panel = adata[:50, :100].copy()
    panel.write_h5ad(tmp_path / "panel.h5ad")
    assert main(["embed", str(bundle), str(tmp_path / "panel.h5ad"), str(tmp_path / "p.zarr")]) == 2
    said = capsys.readouterr().err
    assert "point --layer at the raw counts" in said and "layer=" not in said, said


def test_pseudobulk_groups_by_name_and_reads_backed_files(synthetic_h5ad, monkeypatch):
    from cellsift import tl
    from cellsift.errors import MissingKeyError

    monkeypatch.setattr(tl, "BACKED_ROWS", 97)  # a backed file in several blocks

    ref = ad.read_h5ad(synthetic_h5ad)
    want = cs.tl.pseudobulk(ref, "dataset_id")
    shuffled = ref.obs["dataset_id"].sample(frac=1.0, random_state=0)  # aligned by name
    got = cs.tl.pseudobulk(ref, shuffled)
    np.testing.assert_array_equal(got.X.toarray(), want.X.toarray())
    np.testing.assert_array_equal(
        cs.tl.pseudobulk(ref, ref.obs["dataset_id"].to_numpy()).X.toarray(), want.X.toarray()
    )
    backed = ad.read_h5ad(synthetic_h5ad, backed="r")
    np.testing.assert_allclose(cs.tl.pseudobulk(backed, "dataset_id").X.toarray(), want.X.toarray())
    backed.file.close()
    with pytest.raises(ValueError, match=r"groups holds 10 labels for \d+ cells"):
        cs.tl.pseudobulk(ref, ["x"] * 10)
    with pytest.raises(ValueError, match="index is not the cells' obs names"):
        cs.tl.pseudobulk(ref, shuffled.set_axis([f"c{i}" for i in range(len(shuffled))]))
    with pytest.raises(MissingKeyError, match="obs has no column 'nope'; it has"):
        cs.tl.pseudobulk(ref, "nope")
    mixed = np.full(ref.n_obs, "1", dtype=object)
    mixed[::2] = 1
    with pytest.raises(ValueError, match="read the same as text"):
        cs.tl.pseudobulk(ref, mixed)


def test_pseudobulk_and_centroid_search(bundle, synthetic_h5ad, tmp_path):
    model = MetricModel.load(bundle)
    ref = ad.read_h5ad(synthetic_h5ad)
    # some rows' aligned counts: those of all, in memory and backed (by blocks)
    some = np.flatnonzero(np.arange(ref.n_obs) % 7 == 3)
    whole = model.aligned_counts(ref)[some].toarray()
    backed = ad.read_h5ad(synthetic_h5ad, backed="r")
    for data in (ref, backed):
        np.testing.assert_array_equal(model.aligned_counts(data, rows=some).toarray(), whole)
    backed.file.close()
    bulk = cs.tl.pseudobulk(ref, "cell_type")
    for name in bulk.obs_names[:3]:  # sums agree with numpy
        want = np.asarray(ref.X[(ref.obs["cell_type"] == name).to_numpy()].sum(0)).ravel()
        np.testing.assert_allclose(bulk[name].X.toarray().ravel(), want)
    cs.tl.embed(ref, model)
    index = CellIndex.build(ref.obsm["X_cellsift"], ref.obs.reset_index(drop=True))
    cells = (ref.obs["cell_type"] == bulk.obs_names[0]).to_numpy()
    res = cs.tl.search_centroid(ref, model, index, cells=cells, k=20, qc=False)
    direct = index.search(model.embed(bulk[[bulk.obs_names[0]]]), 20)
    np.testing.assert_array_equal(res.indices, direct.indices)
    assert res.qc is None
    with warnings.catch_warnings():  # an untrained model: the type need not be coherent
        warnings.simplefilter("ignore", CellsiftWarning)
        checked = cs.tl.search_centroid(ref, model, index, cells=cells, k=20)
    np.testing.assert_array_equal(checked.indices, res.indices)
    # the check compares like with like: each cluster's cells summed and embedded, its
    # hits (brute force) against the hits returned
    z_index = ref.obsm["X_cellsift"] / np.linalg.norm(ref.obsm["X_cellsift"], axis=1)[:, None]
    returned = set(res.indices[0].tolist())
    members = np.flatnonzero(cells)
    overlaps = []
    for cl in range(len(checked.qc.clusters)):
        summed = ref[members[checked.qc.cluster_n == cl]].X.sum(0)
        q = model.embed(ad.AnnData(sp.csr_matrix(summed), var=ref.var))[0]
        top = np.argsort(-(z_index @ (q / np.linalg.norm(q))), kind="stable")[:20]
        overlaps.append(len(returned.intersection(top.tolist())) / 20)
    np.testing.assert_allclose(checked.qc.clusters["overlap"], overlaps)
    w = checked.qc.clusters["cells"].to_numpy()
    assert checked.qc.coherence == pytest.approx((np.array(overlaps) * w).sum() / w.sum())
    assert w.sum() == cells.sum()
    assert 0 < checked.qc.coherence < 1  # (not trivially all or none)
    per = cs.tl.search_clusters(ref, model, index, "cell_type", k=20)
    np.testing.assert_array_equal(per[bulk.obs_names[0]].indices, res.indices)
    # a categorical column with a category no cell has: that group is left out
    grouped = ref.copy()
    grouped.obs["g"] = grouped.obs["cell_type"].astype("category").cat.add_categories(["absent"])
    assert set(cs.tl.search_clusters(grouped, model, index, "g", k=20)) == set(per)
    assert res.summary("dataset_id")["hits"].sum() == 20
    with pytest.raises(ValueError, match="empty"):
        cs.tl.search_centroid(ref, model, index, cells=np.zeros(ref.n_obs, dtype=bool))
    # each summed cell's values are counts: a negative value that a positive one beside it
    # cancels in the sum is named (review: only the sums were checked), in memory and
    # backed; a cell outside the set is not read for it
    bad = ref.copy()
    first = np.flatnonzero(cells)[:2]
    gene = bad.X[first[1]].indices[0]
    x = bad.X.toarray()
    x[first[0], gene], x[first[1], gene] = -3, x[first[1], gene] + 3
    bad.X = sp.csr_matrix(x)
    bad.write_h5ad(tmp_path / "bad.h5ad")
    backed = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    for data in (bad, backed):
        with pytest.raises(DataError, match=r"negative values \(-3\).*search_centroid sums"):
            cs.tl.search_centroid(data, model, index, cells=cells, k=5, qc=False)
        with pytest.raises(DataError, match=r"negative values \(-3\).*search_clusters sums"):
            cs.tl.search_clusters(data, model, index, "cell_type", k=5)
    backed.file.close()
    # cells without counts, embedded anyway into obsm (check_counts=False), sit out the
    # check as they do where it embeds the cells (review: as a cluster of their own, whose
    # sum of no counts failed the search)
    empty = ref.copy()
    x = empty.X.toarray()
    x[np.flatnonzero(cells)[:8]] = 0
    empty.X = sp.csr_matrix(x)
    cs.tl.embed(empty, model, check_counts=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellsiftWarning)
        qc = cs.tl.search_centroid(empty, model, index, cells=cells, k=20).qc
        del empty.obsm["X_cellsift"]
        again = cs.tl.search_centroid(empty, model, index, cells=cells, k=20).qc
    assert qc.clusters["cells"].sum() == again.clusters["cells"].sum() == cells.sum() - 8
    assert qc.coherence == pytest.approx(again.coherence, abs=1e-6)
    others = ~cells
    others[first] = False
    cs.tl.search_centroid(bad, model, index, cells=others, k=5, qc=False)
    assert cs.tl.pseudobulk(bad, "cell_type").X.min() >= 0  # (summing alone checks nothing)


def test_embeddings_saved_over_while_loaded_come_with_their_own_metadata(
    bundle, synthetic_h5ad, tmp_path, monkeypatch
):
    """A store saved over (cellsift embed --overwrite, renamed into place) between the read
    of its embeddings and of its metadata: both come from one version (review: the old
    run's embeddings with the new run's cells and model, unsaid)."""
    import pyarrow.parquet as pq

    from cellsift._utils import move_into_place

    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)
    first, second = adata[:300].copy(), adata[300:600].copy()
    first.write_h5ad(tmp_path / "a.h5ad")
    second.write_h5ad(tmp_path / "b.h5ad")
    store = embed_collection(model, tmp_path / "a.h5ad", tmp_path / "e.zarr")
    embed_collection(model, tmp_path / "b.h5ad", tmp_path / "new.zarr")
    real, swapped = pq.read_table, []

    def swap_then_read(path, *args, **kwargs):  # the new run lands between the two reads
        if not swapped:
            swapped.append(path)
            move_into_place(tmp_path / "new.zarr", store)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", swap_then_read)
    emb, meta = load_embeddings(store)
    assert swapped
    assert list(meta["obs_name"]) == list(second.obs_names)
    np.testing.assert_allclose(emb, model.embed(second), atol=1e-6)
    # a store named as another kind of store is refused before the work (review: a Zarr
    # folder named .h5ad was written)
    for name in ("e.h5ad", "e.soma"):
        with pytest.raises(ConfigError, match=rf"{name} is named as \w+ but the format asked"):
            embed_collection(model, tmp_path / "a.h5ad", tmp_path / name)
        assert not list(tmp_path.glob(f"*{name}*"))


@pytest.mark.multi_device
def test_two_ranks_write_one_shard_each_and_match_one_process(
    bundle, synthetic_h5ad, tmp_path, caplog
):
    import random

    import zarr

    model = MetricModel.load(bundle)
    one = embed_collection(model, synthetic_h5ad, tmp_path / "one.zarr", batch_size=500)
    (tmp_path / ".two.zarr.tmp-0123abcd").mkdir()  # (what a killed write left: removed)
    # the ranks meet on a port the system gives, not one drawn from Python's random
    # numbers: two seeded runs at once drew the same one, and the draw moved the sequence
    random.seed(0)
    state = random.getstate()
    two = embed_collection(model, synthetic_h5ad, tmp_path / "two.zarr", batch_size=500, devices=2)
    assert random.getstate() == state
    e1, m1 = load_embeddings(one)
    e2, m2 = load_embeddings(two)
    np.testing.assert_array_equal(e1, e2)
    assert m1.equals(m2)
    shards = zarr.open_group(str(two), mode="r").attrs["shards"]
    assert [(s["start"], s["stop"]) for s in shards] == [(0, len(e1) // 2), (len(e1) // 2, len(e1))]
    assert not list(tmp_path.glob(".*"))  # no staging or temporary directory left
    # a cell that is not counts, read by the second rank: its own error, as one process
    # raises it (the command line's one line), not the rank's traceback
    bad = ad.read_h5ad(synthetic_h5ad)
    x = bad.X.tolil()
    x[len(e1) - 3, 0] = -1
    bad.X = x.tocsr()
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(DataError, match=r"holds -1; counts are finite and non-negative"):
        embed_collection(model, tmp_path / "bad.h5ad", tmp_path / "bad.zarr", devices=2)
    assert not list(tmp_path.glob("*.error"))
    assert not [r for r in caplog.records if "Terminating process" in r.getMessage()]


@pytest.mark.multi_device
def test_a_signal_to_the_main_process_alone_stops_every_rank(bundle, synthetic_h5ad, tmp_path):
    """SIGTERM to the main process only (kill PID, docker stop, Popen.terminate): the ranks
    it spawned stop too, and no output is written; the staging folder stays to resume from."""
    import multiprocessing
    import signal
    import threading
    import time

    model = MetricModel.load(bundle)
    out = tmp_path / "out.zarr"
    staging = tmp_path / ".out.zarr.partial-of-2"

    def kill_once_the_ranks_write() -> None:
        while not staging.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped

    before = signal.signal(signal.SIGTERM, stop)
    try:
        threading.Thread(target=kill_once_the_ranks_write, daemon=True).start()
        with pytest.raises(Stopped):  # (one cell per batch: the ranks take seconds)
            embed_collection(model, synthetic_h5ad, out, batch_size=1, devices=2)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not multiprocessing.active_children()
    assert not out.exists() and staging.is_dir()


@pytest.mark.multi_device
def test_ranks_of_a_main_process_killed_outright_end_and_runs_of_one_output_exclude(
    bundle, synthetic_h5ad, tmp_path
):
    """`cellsift embed --devices 2` whose main process is SIGKILLed (nothing of it runs to
    stop its ranks), started with SIGINT ignored as a shell script's background job is (so
    the SIGINT that torch has a rank sent when its parent dies does nothing): the ranks end
    by themselves, writing no store. While a run writes an output another run of it is
    refused, naming the writer; the same command then finishes the store."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from cellsift.errors import OutputInUseError

    out, staging = tmp_path / "e.zarr", tmp_path / ".e.zarr.partial-of-2"
    args = ["embed", str(bundle), str(synthetic_h5ad), str(out), "--devices", "2"]
    with open(tmp_path / "stderr.txt", "wb") as err:
        run = subprocess.Popen(
            [sys.executable, "-m", "cellsift", *args, "--batch-size", "1"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )

    def ranks() -> list[psutil.Process]:
        found = []
        for p in psutil.Process(run.pid).children():
            try:
                if "spawn_main" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    try:
        deadline = time.monotonic() + 120
        while not (staging.is_dir() and len(spawned := ranks()) == 2):
            assert run.poll() is None and time.monotonic() < deadline, (
                tmp_path / "stderr.txt"
            ).read_text()
            time.sleep(0.05)
        with pytest.raises(OutputInUseError, match=rf"another run .*process {run.pid}\)"):
            embed_collection(MetricModel.load(bundle), synthetic_h5ad, out)
        run.send_signal(signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 10
        while any(running(p) for p in spawned) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(running(p) for p in spawned)
    finally:
        run.kill()
        for p in ranks() if run.poll() is None else []:
            p.kill()
    assert not out.exists() and staging.is_dir()
    assert main(args) == 0
    emb, _ = load_embeddings(out)
    np.testing.assert_allclose(
        emb, MetricModel.load(bundle).embed(ad.read_h5ad(synthetic_h5ad)), atol=1e-5
    )
    assert not list(tmp_path.glob(".*"))  # no staging folder, no lock file left


def _embed_in_a_job(rank: int, port: int, bundle: str, source: str, out: str, results: str) -> None:
    """Rank ``rank`` of a 2-process gloo job (as torchrun starts one) calling
    embed_collection; writes what came of it to ``results``/rank<rank>.txt."""
    from pathlib import Path

    from cellsift.errors import OutputInUseError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        embed_collection(MetricModel.load(bundle), source, Path(out))
        outcome = "ok"
    except OutputInUseError as err:
        outcome = f"in use: {err}"
    finally:
        torch.distributed.destroy_process_group()
    (Path(results) / f"rank{rank}.txt").write_text(outcome)


@pytest.mark.multi_device
def test_a_running_distributed_job_embeds_one_shard_a_rank_and_respects_the_lock(
    bundle, synthetic_h5ad, tmp_path
):
    """Ranks of a job started outside cellsift: rank 0 takes the output's lock for the job;
    held by another run, every rank stops with its error (none waits at a barrier)."""
    import random

    from cellsift._utils import output_lock

    out = tmp_path / "job.zarr"

    def job() -> list[str]:
        args = (random.randint(20_000, 45_000), str(bundle), str(synthetic_h5ad), str(out))
        start_ranks(_embed_in_a_job, (*args, str(tmp_path)))
        return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]

    with output_lock(out, "a test"):
        outcomes = job()
    assert all(o.startswith("in use: ") and f"process {os.getpid()})" in o for o in outcomes)
    assert not out.exists()
    assert job() == ["ok", "ok"]
    emb, _ = load_embeddings(out)
    np.testing.assert_allclose(
        emb, MetricModel.load(bundle).embed(ad.read_h5ad(synthetic_h5ad)), atol=1e-5
    )
    assert not list(tmp_path.glob(".*"))


@pytest.mark.multi_device
def test_a_rank_killed_outright_is_named_in_one_error(bundle, synthetic_h5ad, tmp_path):
    """A rank killed by SIGKILL (the out-of-memory killer's signal) raises no error of its
    own: the run names it and how to go on, and stops the other rank."""
    import multiprocessing
    import signal
    import threading
    import time

    from cellsift.errors import ProcessDiedError

    model = MetricModel.load(bundle)
    out = tmp_path / "out.zarr"
    staging = tmp_path / ".out.zarr.partial-of-2"

    def kill_a_rank_once_they_write() -> None:
        while not staging.exists() or len(multiprocessing.active_children()) < 2:
            time.sleep(0.01)
        os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

    threading.Thread(target=kill_a_rank_once_they_write, daemon=True).start()
    with pytest.raises(ProcessDiedError, match=r"embedding process \d of 2 was killed by SIGKILL"):
        embed_collection(model, synthetic_h5ad, out, batch_size=1, devices=2)
    assert not multiprocessing.active_children()
    assert not out.exists() and staging.is_dir()


def test_a_rerun_keeps_finished_shards_of_the_same_model_only(bundle, synthetic_h5ad, tmp_path):
    import zarr

    from cellsift.data import CellCollection
    from cellsift.tasks import embed as embed_mod

    model = MetricModel.load(bundle)
    out = tmp_path / "emb.zarr"
    full = model.embed(ad.read_h5ad(synthetic_h5ad))
    # what a killed run leaves: the staging directory with one finished shard (marked by
    # its attrs) and nothing else
    coll = CellCollection(synthetic_h5ad, genes=model.genes, min_overlap=0.5)
    staging = tmp_path / ".emb.zarr.partial-of-1"
    shard = staging / "shard-00000"
    embed_mod._write_shard(model, coll, shard, (0, coll.n_obs), torch.device("cpu"), 512, False)
    marker = np.full_like(full, 7.0)
    zarr.open_array(str(shard), mode="r+")[:] = marker
    attrs = {"start": 0, "stop": coll.n_obs, "digest": embed_mod._digest(model.fingerprint, coll)}
    embed_mod._set_attrs(shard, attrs)
    embed_collection(model, synthetic_h5ad, out)
    np.testing.assert_array_equal(load_embeddings(out)[0], marker)  # kept, not recomputed
    # a shard of a run that did not check counts: kept by such a run, made again by one
    # that checks them (hunt235: its cells were never checked)
    for checked, kept in ((False, True), (True, False)):
        embed_mod._write_shard(model, coll, shard, (0, coll.n_obs), torch.device("cpu"), 512, False)
        zarr.open_array(str(shard), mode="r+")[:] = marker
        embed_mod._set_attrs(shard, attrs | {"checked": False})
        embed_collection(model, synthetic_h5ad, out, overwrite=True, check_counts=checked)
        got = load_embeddings(out)[0]
        if kept:
            np.testing.assert_array_equal(got, marker)
        else:
            np.testing.assert_allclose(got, full, atol=1e-5)
    # another model's shard is recomputed
    other = MetricModel.from_collection(synthetic_h5ad, hidden=(64,), latent=16)
    embed_mod._write_shard(model, coll, shard, (0, coll.n_obs), torch.device("cpu"), 512, False)
    embed_mod._set_attrs(shard, attrs)
    embed_collection(other, synthetic_h5ad, out, overwrite=True)
    np.testing.assert_allclose(
        load_embeddings(out)[0], other.embed(ad.read_h5ad(synthetic_h5ad)), atol=1e-5
    )
    # the same model and file, but other counts (a layer) or a file changed since: recomputed
    adata = ad.read_h5ad(synthetic_h5ad)
    adata.layers["counts"] = adata.X * 2
    src = tmp_path / "with_layer.h5ad"
    adata.write_h5ad(src)
    coll = CellCollection(src, genes=model.genes, min_overlap=0.5)
    attrs["digest"] = embed_mod._digest(model.fingerprint, coll)  # of X
    for layer, touch in (("counts", False), (None, True)):
        embed_mod._write_shard(model, coll, shard, (0, coll.n_obs), torch.device("cpu"), 512, False)
        zarr.open_array(str(shard), mode="r+")[:] = marker
        embed_mod._set_attrs(shard, attrs)
        if touch:
            os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
        embed_collection(model, src, out, layer=layer, overwrite=True)
        want = model.embed(adata, layer=layer)
        np.testing.assert_allclose(load_embeddings(out)[0], want, atol=1e-5)


def test_a_rerun_recomputes_a_shard_of_a_soma_store_opened_otherwise(
    bundle, synthetic_h5ad, tmp_path
):
    """A killed run's shard of a SOMA store read with one gene-id column; the rerun reads
    another (--var-id), which maps the genes otherwise: the shard is embedded again."""
    import tiledbsoma.io
    import zarr

    from cellsift.data import CellCollection
    from cellsift.tasks import embed as embed_mod

    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)[:200].copy()
    adata.var.index.name = None
    adata.var["gene_id"] = adata.var_names.to_numpy()
    adata.var["reversed_id"] = adata.var_names.to_numpy()[::-1]
    soma = tmp_path / "cells.soma"
    tiledbsoma.io.from_anndata(str(soma), adata, measurement_name="RNA")
    as_ids = {"var_id": "gene_id"}
    coll = CellCollection(soma, genes=model.genes, layer="data", store_options=as_ids)
    staging = tmp_path / ".emb.zarr.partial-of-1"
    shard = staging / "shard-00000"
    embed_mod._write_shard(model, coll, shard, (0, coll.n_obs), torch.device("cpu"), 512, False)
    zarr.open_array(str(shard), mode="r+")[:] = 7.0
    attrs = {"start": 0, "stop": coll.n_obs, "digest": embed_mod._digest(model.fingerprint, coll)}
    embed_mod._set_attrs(shard, attrs)
    out = tmp_path / "emb.zarr"
    embed_collection(model, soma, out, layer="data", store_options={"var_id": "reversed_id"})
    reversed_genes = ad.AnnData(adata.X, obs=adata.obs, var=adata.var.set_index("reversed_id"))
    np.testing.assert_allclose(load_embeddings(out)[0], model.embed(reversed_genes), atol=1e-5)


def test_a_rerun_recomputes_a_shard_of_a_zarr_store_changed_in_place(
    bundle, synthetic_h5ad, tmp_path
):
    """A chunk of a Zarr store rewritten in place changes no folder's entry: the files
    within are compared. A killed run's staging over another number of processes (its
    shards split the cells otherwise) is removed by the next run of that output."""
    import zarr

    from cellsift.tasks import embed as embed_mod

    model = MetricModel.load(bundle)
    adata = ad.read_h5ad(synthetic_h5ad)
    src = tmp_path / "cells.zarr"
    adata.write_zarr(src)
    out = tmp_path / "emb.zarr"
    real_finalize = embed_mod._finalize

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    embed_mod._finalize = killed
    try:
        with pytest.raises(KeyboardInterrupt):  # its one shard finished, the store not
            embed_collection(model, src, out)
    finally:
        embed_mod._finalize = real_finalize
    data = zarr.open_array(str(src / "X" / "data"), mode="r+")
    top = os.stat(src).st_mtime_ns
    data[:] = data[:][::-1]  # the same counts, other cells' (chunk files rewritten)
    os.utime(src, ns=(top, top))  # (however the folder's own time went)
    other = tmp_path / ".emb.zarr.partial-of-2"
    (other / "shard-00000").mkdir(parents=True)
    embed_collection(model, src, out)
    want = model.embed(ad.read_zarr(src))
    np.testing.assert_allclose(load_embeddings(out)[0], want, atol=1e-5)
    assert not np.allclose(want, model.embed(adata), atol=1e-3)  # (the counts did change)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.zarr", "emb.zarr"]


def test_a_damaged_store_is_named(bundle, synthetic_h5ad, tmp_path):
    model = MetricModel.load(bundle)
    out = embed_collection(model, synthetic_h5ad, tmp_path / "emb.zarr")
    (out / "metadata.parquet").unlink()
    with pytest.raises(FileNotFoundError):
        load_embeddings(out)
    with pytest.raises(ValueError, match="not a cellsift embeddings store"):
        load_embeddings(tmp_path)


def test_tools_read_counts_from_a_layer_or_raw(bundle, synthetic_h5ad):
    """scanpy workflows keep counts in layers['counts'] or .raw with log data in X: every tool
    that embeds or sums counts reads them there when told."""
    import scanpy as sc

    model = MetricModel.load(bundle)
    ref = ad.read_h5ad(synthetic_h5ad)[:600].copy()
    want = model.embed(ref)
    index = CellIndex.build(want, ref.obs.reset_index(drop=True))
    logged = ref.copy()
    logged.layers["counts"] = logged.X.copy()
    logged.raw = ref.copy()  # its own copy: scanpy normalises X in place
    sc.pp.normalize_total(logged)
    sc.pp.log1p(logged)
    logged = logged[:, ::2].copy()  # X keeps half the genes; .raw keeps them all
    bulk_x = cs.tl.pseudobulk(ref, "cell_type")
    bulk_raw = cs.tl.pseudobulk(logged, "cell_type", layer="raw")
    assert bulk_raw.var_names.equals(ref.var_names)
    np.testing.assert_allclose(bulk_raw.X.toarray(), bulk_x.X.toarray())
    res = cs.tl.search_centroid(logged, model, index, k=10, layer="raw", qc=False)
    everything = cs.tl.pseudobulk(ref, np.repeat("all", ref.n_obs))
    np.testing.assert_array_equal(res.indices, index.search(model.embed(everything), 10).indices)
    clusters = cs.tl.search_clusters(logged, model, index, "cell_type", k=10, layer="raw")
    first = str(bulk_x.obs_names[0])
    np.testing.assert_array_equal(
        clusters[first].indices, index.search(model.embed(bulk_x[[first]]), 10).indices
    )
    # tl.annotate embeds the counts layer it is pointed at (X is log data here)
    with pytest.raises(DataError, match=r"adata \(X\): contains non-integer"):
        cs.tl.annotate(logged.copy(), index, model=model, abstain=False)
    half = ref[:, ::2].copy()
    for layer in ("counts", "raw"):
        q = logged.copy()
        cs.tl.annotate(q, index, model=model, layer=layer, abstain=False, ontology_aware=False)
        want_q = model.embed(half) if layer == "counts" else want
        np.testing.assert_allclose(q.obsm["X_cellsift"], want_q, atol=1e-5)
    with pytest.raises(KeyError, match="no layer 'nope'"):
        cs.tl.pseudobulk(logged, "cell_type", layer="nope")


def test_an_index_refuses_queries_of_another_model(bundle, synthetic_h5ad, tmp_path, capsys):
    model = MetricModel.load(bundle)
    torch.manual_seed(1)
    other = MetricModel.from_collection(synthetic_h5ad, hidden=(64,), latent=16)  # same shape
    assert model.fingerprint == MetricModel.load(bundle).fingerprint != other.fingerprint
    emb = embed_collection(model, synthetic_h5ad, tmp_path / "emb.zarr")
    index = CellIndex.build(*load_embeddings(emb), engine="exact")  # notes the model
    index.save(tmp_path / "index")
    index = CellIndex.load(tmp_path / "index")
    query = ad.read_h5ad(synthetic_h5ad)[:50].copy()
    cs.tl.annotate(query, index, model=model, abstain=False)  # its own model: fine
    for call in (
        lambda: cs.tl.annotate(query.copy(), index, model=other, abstain=False),
        lambda: cs.tl.search_centroid(query, other, index, k=5, qc=False),
        lambda: cs.tl.search_clusters(query, other, index, "cell_type", k=5),
    ):
        with pytest.raises(cs.tasks.CellIndexError, match="embeddings of another model"):
            call()
    other.save(tmp_path / "other")
    args = [str(tmp_path / "other"), str(tmp_path / "index"), str(synthetic_h5ad)]
    assert main(["annotate", *args, str(tmp_path / "out.h5ad")]) == 2
    assert "embeddings of another model" in capsys.readouterr().err
    # an index built from bare arrays knows no model, and takes any
    CellIndex.build(load_embeddings(emb)[0]).check_model(other)


def test_embeddings_of_shards_lead_back_to_their_cells(bundle, synthetic_h5ad, tmp_path):
    from cellsift.data.convert import convert

    model = MetricModel.load(bundle)
    shards = convert(synthetic_h5ad, tmp_path / "shards", format="zarr", shard_size=700)
    emb, meta = load_embeddings(embed_collection(model, shards, tmp_path / "emb.zarr"))
    adata = ad.read_h5ad(synthetic_h5ad)
    assert meta["store"].nunique() == int(np.ceil(adata.n_obs / 700))
    for store, rows in meta.groupby("store")["store_row"]:
        part = ad.read_zarr(store)
        assert (part.obs_names[rows.to_numpy()] == meta.loc[rows.index, "obs_name"]).all()
    hit = 1234
    cell = adata[meta["obs_name"].iloc[hit]]
    np.testing.assert_allclose(emb[hit], model.embed(cell)[0], atol=1e-5)


def test_the_centroid_check_reads_the_set_a_block_at_a_time(
    bundle, synthetic_h5ad, tmp_path, monkeypatch
):
    """search_centroid's check reads the set's cells in blocks (hunt193: the aligned counts
    of the whole set held twice: a backed atlas of millions of cells did not fit): the
    same check in blocks of 97 cells as whole, in memory and backed, with cells without
    counts in any block; and its memory stays under the set's aligned counts."""
    import tracemalloc

    from cellsift import tl

    model = MetricModel.load(bundle)
    ref = ad.read_h5ad(synthetic_h5ad)
    index = CellIndex.build(model.embed(ref), ref.obs.reset_index(drop=True), model=model)
    x = ref.X.tolil()
    for row in (3, 151, 2000):
        x[row] = 0
    ref.X = x.tocsr()
    ref.write_h5ad(tmp_path / "ref.h5ad")
    cells = np.arange(ref.n_obs) % 3 != 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellsiftWarning)
        whole = cs.tl.search_centroid(ref, model, index, cells=cells, k=20).qc
        monkeypatch.setattr(tl, "BACKED_ROWS", 97)
        backed = ad.read_h5ad(tmp_path / "ref.h5ad", backed="r")
        for data in (ref, backed):
            qc = cs.tl.search_centroid(data, model, index, cells=cells, k=20).qc
            np.testing.assert_array_equal(qc.cluster_n, whole.cluster_n)
            assert qc.coherence == pytest.approx(whole.coherence, abs=1e-6)
        assert (whole.cluster_n == -1).sum() == 2  # (cells 3 and 2000; 151 is not in the set)
        aligned = model.aligned_counts(ref, rows=np.flatnonzero(cells))
        held = aligned.data.nbytes + aligned.indices.nbytes + aligned.indptr.nbytes
        peaks = []
        for rows in (97, ref.n_obs):  # (blocks of 97 cells, and one block: the set whole)
            monkeypatch.setattr(tl, "BACKED_ROWS", rows)
            tracemalloc.start()
            cs.tl.search_centroid(backed, model, index, cells=cells, k=20)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    backed.file.close()
    assert peaks[0] < peaks[1] - 0.75 * held, (peaks, held)  # (a copy of them saved, at least)


def test_sums_of_values_that_are_not_counts_are_searched_where_told(bundle, synthetic_h5ad):
    """search_centroid and search_clusters take check_counts=False, as embed does, for
    values that are not whole counts (ambient-corrected); the error says so (hunt193: it
    offered only layer=)."""
    model = MetricModel.load(bundle)
    ref = ad.read_h5ad(synthetic_h5ad)
    index = CellIndex.build(model.embed(ref), ref.obs.reset_index(drop=True), model=model)
    scaled = ref.copy()
    scaled.X = scaled.X * np.float32(0.9)
    cells = (ref.obs["cell_type"] == ref.obs["cell_type"].iloc[0]).to_numpy()
    with pytest.raises(DataError, match=r"search_centroid sums raw counts.*check_counts=False"):
        cs.tl.search_centroid(scaled, model, index, cells=cells, k=5, qc=False)
    with pytest.raises(DataError, match=r"search_clusters sums raw counts.*check_counts=False"):
        cs.tl.search_clusters(scaled, model, index, "cell_type", k=5)
    got = cs.tl.search_centroid(
        scaled, model, index, cells=cells, k=5, qc=False, check_counts=False
    )
    bulk = cs.tl.pseudobulk(scaled, "cell_type")
    name = ref.obs["cell_type"].iloc[0]
    direct = index.search(model.embed(bulk[[name]], check_counts=False), 5)
    np.testing.assert_array_equal(got.indices, direct.indices)
    per = cs.tl.search_clusters(scaled, model, index, "cell_type", k=5, check_counts=False)
    np.testing.assert_array_equal(per[name].indices, direct.indices)
    # groups as a column array (n, 1): said as such (hunt193: "300 labels for 300 cells")
    with pytest.raises(ValueError, match=r"groups is an array of shape \(\d+, 1\): pass one"):
        cs.tl.pseudobulk(ref, ref.obs[["cell_type"]].to_numpy())


def test_annotate_command_takes_the_share_of_votes_a_call_needs(
    bundle, synthetic_h5ad, tmp_path, capsys
):
    """cellsift annotate --min-support: the share of the votes a call needs, as
    KNNAnnotator's min_support (hunt196: --no-abstain still called cells whose votes split
    'unknown', and nothing on the command line could change it); 0 with --no-abstain calls
    every cell, by the label with most votes."""
    from cellsift import tl

    emb, idx, out = tmp_path / "emb.zarr", tmp_path / "index", tmp_path / "annotated.h5ad"
    query = ad.read_h5ad(synthetic_h5ad)[:600].copy()
    query.write_h5ad(tmp_path / "query.h5ad")
    assert main(["embed", str(bundle), str(synthetic_h5ad), str(emb)]) == 0
    assert main(["index", str(emb), str(idx), "--engine", "exact"]) == 0
    base = ["annotate", str(bundle), str(idx), str(tmp_path / "query.h5ad"), str(out)]
    base += ["--no-ontology", "--no-abstain", "--k", "50", "--overwrite"]
    model, index = MetricModel.load(bundle), CellIndex.load(idx)
    tl.embed(query, model)
    for share in (0.0, 0.5, 0.8):
        assert main([*base, "--min-support", str(share)]) == 0
        got = ad.read_h5ad(out).obs["cellsift_cell_type"].astype(str).to_numpy()
        want = KNNAnnotator(
            index, label_key="cell_type", k=50, ontology_aware=False, min_support=share
        ).annotate(query.obsm["X_cellsift"])["label"]
        np.testing.assert_array_equal(got, want.astype(str).to_numpy())
        if share != 0.5:  # (0: every cell called; 0.8: some votes split below it here)
            assert ((got == UNKNOWN).sum() == 0) == (share == 0.0)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="2"):
        main([*base, "--min-support", "1"])
    assert "--min-support: must be at least 0 and below 1, not 1" in capsys.readouterr().err


def test_a_rank_ended_by_sigterm_leaves_no_semaphore_to_report(tmp_path):
    """A rank's progress bars hold a thread lock (_thread_locked_bars, as each spawned rank
    sets them): ended by SIGTERM (embed --devices 2 interrupted), it leaves no semaphore,
    which Python's resource tracker reported as leaked in a second line (hunt212)."""
    import subprocess
    import sys

    script = tmp_path / "ranks.py"
    script.write_text(
        "import multiprocessing as mp, sys\n"
        "def rank(ready, fix):\n"
        "    if fix:\n"
        "        from cellsift.tasks.embed import _thread_locked_bars\n"
        "        _thread_locked_bars()\n"
        "    import tqdm, time\n"
        "    tqdm.tqdm(range(3), disable=True)\n"
        "    ready.set()\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('spawn')\n"
        "    ready = ctx.Event()\n"
        "    p = ctx.Process(target=rank, args=(ready, sys.argv[1] == '1'))\n"
        "    p.start()\n"
        "    assert ready.wait(120)\n"
        "    p.terminate()\n"
        "    p.join()\n"
    )
    said = {
        fix: subprocess.run(
            [sys.executable, str(script), fix], capture_output=True, text=True, timeout=180
        ).stderr
        for fix in ("0", "1")
    }
    assert "leaked semaphore" in said["0"]  # (tqdm's default lock: the report this avoids)
    assert "leaked semaphore" not in said["1"] and not said["1"].strip(), said["1"]


def test_index_says_when_its_k_is_not_used(bundle, synthetic_h5ad, tmp_path, recwarn):
    """--k calibrates an IVF index's recall: given for an exact index (asked for, or chosen
    by auto below 50,000 cells), a warning says it is not used; not given, nothing."""
    from cellsift.data import CellCollection

    model = MetricModel.load(bundle)
    part = CellCollection(
        synthetic_h5ad, genes=model.genes, obs_filter=lambda obs: np.arange(len(obs)) < 300
    )
    emb = str(embed_collection(model, part, tmp_path / "e.zarr"))
    assert main(["index", emb, str(tmp_path / "auto")]) == 0
    assert not [w for w in recwarn if issubclass(w.category, CellsiftWarning)]
    for engine, why in (["--engine", "exact"], "--engine exact"), ([], "auto: fewer than 50,000"):
        with pytest.warns(
            CellsiftWarning, match=rf"--k 10 is not used: the index is exact \({why}"
        ):
            assert (
                main(["index", emb, str(tmp_path / "idx"), "--k", "10", *engine, "--overwrite"])
                == 0
            )


def test_command_line_search(bundle, synthetic_h5ad, tmp_path, capsys):
    """cellsift search: each query cell's hits as an exact search of the index finds them
    (by name, with the hits' metadata), a centroid's and each group's as tl.search_centroid
    and tl.search_clusters find them; the filters and the table's formats; refusals before
    the work."""
    emb, idx = tmp_path / "emb.zarr", tmp_path / "index"
    assert main(["embed", str(bundle), str(synthetic_h5ad), str(emb)]) == 0
    assert main(["index", str(emb), str(idx), "--engine", "exact"]) == 0
    model, index = MetricModel.load(bundle), CellIndex.load(idx)
    queries = ad.read_h5ad(synthetic_h5ad)[::10].copy()
    queries.write_h5ad(tmp_path / "q.h5ad")
    q = str(tmp_path / "q.h5ad")
    capsys.readouterr()
    # every query cell: its k nearest by brute force (numpy), named
    out = tmp_path / "hits.parquet"
    assert main(["search", str(bundle), str(idx), q, str(out), "--k", "7"]) == 0
    assert f"wrote {out}: 2,100 hits of 300 queries" in capsys.readouterr().out
    hits = pd.read_parquet(out)
    own = ["query", "query_row", "rank", "distance", "cell_index", "obs_name"]
    assert list(hits.columns[:6]) == own
    z = model.embed(queries)
    ref = index.embeddings / np.linalg.norm(index.embeddings, axis=1, keepdims=True)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    d = 1 - zn @ ref.T
    names = index.metadata_rows(np.arange(index.n_cells), ["obs_name"])["obs_name"].to_numpy()
    for i, name in enumerate(queries.obs_names):
        got = hits[hits["query"] == name]
        assert list(got["rank"]) == list(range(7))
        np.testing.assert_allclose(got["distance"], np.sort(d[i])[:7], atol=1e-5)
        assert set(got["obs_name"]) == set(names[np.argsort(d[i], kind="stable")[:7]])
        assert (got["query_row"] == i).all()  # (its row in the query file)
        assert list(names[got["cell_index"]]) == list(got["obs_name"])
    # a filter of the index, a selection of the queries, a radius; as TSV with columns asked
    out = tmp_path / "hits.tsv"
    args = ["search", str(bundle), str(idx), q, str(out), "--k", "5"]
    args += ["--columns", "cell_type", "cell_type"]  # (a column named twice: written once)
    args += ["--filter", "dataset_id=study_01", "--filter", "dataset_id=study_02"]
    args += ["--cells", "dataset_id=study_00", "--max-distance", "0.1"]
    assert main([*args, "--summary-by", "dataset_id"]) == 0
    printed = capsys.readouterr().out
    hits = pd.read_csv(out, sep="\t")
    assert list(hits.columns) == [*own, "cell_type"]
    chosen = queries.obs_names[queries.obs["dataset_id"] == "study_00"]
    assert set(hits["query"]) <= set(chosen) and (hits["distance"] <= 0.1).all()
    study = index.metadata_rows(np.arange(index.n_cells), ["dataset_id"])["dataset_id"]
    by_name = dict(zip(names, study.astype(str), strict=True))
    assert {by_name[n] for n in hits["obs_name"]} <= {"study_01", "study_02"}
    assert "study_00" not in printed and "study_01" in printed
    # the centroid of a cell set, with its coherence said; each group's centroid (CSV)
    out = tmp_path / "centroid.csv"
    cells = ["--cells", "cell_type=B cell"]
    with warnings.catch_warnings():  # (a set this untrained model may split: a warning)
        warnings.simplefilter("ignore", CellsiftWarning)
        assert main(["search", str(bundle), str(idx), q, str(out), "--centroid", *cells]) == 0
    assert "query coherence" in capsys.readouterr().out
    hits = pd.read_csv(out)
    b = queries[queries.obs["cell_type"] == "B cell"].copy()
    want = cs.tl.search_centroid(b, model, index, k=50, qc=False)
    assert (hits["query"] == "centroid").all()
    np.testing.assert_array_equal(hits["obs_name"], names[want.indices[0]])
    out = tmp_path / "groups.csv"
    assert main(["search", str(bundle), str(idx), q, str(out), "--groupby", "cell_type"]) == 0
    hits = pd.read_csv(out)
    for group, res in cs.tl.search_clusters(queries, model, index, "cell_type", k=50).items():
        np.testing.assert_array_equal(
            hits.loc[hits["query"] == group, "obs_name"], names[res.indices[0]]
        )
    # query cells of one name told apart by their rows; --cells values read as the obs
    # column's type (as --filter reads the index's); cells without a group said, left out
    # (review219: rows no one could tell apart; "1" missed 1.0, "true" True; a traceback)
    odd = queries[:40].copy()
    odd.obs_names = ["same"] * 40
    odd.obs["flag"] = np.arange(40) % 2 == 0
    odd.obs["score"] = np.where(np.arange(40) % 4 == 0, 1.0, 2.5)
    odd.obs["group"] = pd.Categorical(np.where(np.arange(40) < 10, None, "g"))
    odd.obs["cell_index"] = np.arange(40) % 4  # (a column named as the index's own)
    with warnings.catch_warnings():  # (anndata's, of names that repeat)
        warnings.simplefilter("ignore", UserWarning)
        odd.write_h5ad(tmp_path / "odd.h5ad")
        args = ["search", str(bundle), str(idx), str(tmp_path / "odd.h5ad")]
        out = tmp_path / "odd.csv"
        assert (
            main([*args, str(out), "--k", "2", "--cells", "flag=true", "--cells", "score=1"]) == 0
        )
        hits = pd.read_csv(out)
        assert list(hits["query_row"]) == [r for r in range(0, 40, 4) for _ in range(2)]
        # (review220: the rows' positions were read as the obs column cell_index)
        assert main([*args, str(out), "--k", "1", "--cells", "cell_index=2", "--overwrite"]) == 0
        assert list(pd.read_csv(out)["query_row"]) == list(range(2, 40, 4))
        assert main([*args, str(out), "--groupby", "group", "--overwrite"]) == 0
        assert "left out 10 cells without a value in 'group'" in capsys.readouterr().out
        assert (pd.read_csv(out)["query"] == "g").all()
        for bad, message in (
            (["--cells", "group=g", "--groupby", "group"], None),
            (["--cells", "score=2.5", "--cells", "group=nope"], "no cell has score in ['2.5']"),
            (["--cells", "flag=maybe"], "--cells: the filter {'flag': ['maybe']} cannot be"),
        ):
            code = main([*args, str(out), "--overwrite", *bad])
            assert code == (0 if message is None else 2)
            if message is not None:
                assert message in capsys.readouterr().err
        odd.obs["group"] = pd.Categorical([None] * 40, categories=["g"])
        odd.write_h5ad(tmp_path / "odd.h5ad")
        assert main([*args, str(out), "--overwrite", "--groupby", "group"]) == 2
    assert "none of the 40 cells searched with has a value in --groupby" in capsys.readouterr().err
    # refused before any work, each in one line
    for bad, message in (
        ([q], f"{q} is the query file"),
        ([str(tmp_path / "hits.h5ad")], "name it *.parquet, *.csv or *.tsv"),
        ([str(out)], "exists; remove it or pass --overwrite"),
        ([str(tmp_path / "x.csv"), "--centroid", "--groupby", "cell_type"], "pass one of them"),
        ([str(tmp_path / "x.csv"), "--no-qc"], "--no-qc leaves out"),
        ([str(tmp_path / "x.csv"), "--centroid", "--drop-empty"], "pass it without --centroid"),
        ([str(tmp_path / "x.csv"), "--summary-by", "nope"], "the index metadata has no such"),
        ([str(tmp_path / "x.csv"), "--cells", "nope=1"], "has no obs column 'nope'"),
        ([str(tmp_path / "x.csv"), "--cells", "cell_type=nope"], "no cell has cell_type in"),
        ([str(tmp_path / "x.csv"), "--groupby", "nope"], "--groupby 'nope':"),
    ):
        assert main(["search", str(bundle), str(idx), q, *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.csv").exists()
    assert ad.read_h5ad(q).n_obs == 300  # (the query, untouched)
    with pytest.raises(SystemExit):
        main(["search", str(bundle), str(idx), q, str(tmp_path / "x.csv"), "--max-distance", "3"])
