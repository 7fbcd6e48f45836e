"""Outputs written over existing paths: only an earlier output of the same kind is replaced,
and an interruption leaves the old or the new output in place, never neither."""

from __future__ import annotations

import fcntl
import io
import shutil
import threading
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import cellsift._utils as utils
from cellsift.data import GeneVocabulary
from cellsift.data.convert import convert
from cellsift.errors import ConfigError
from cellsift.models import import_scimilarity, load_bundle, save_bundle
from cellsift.nn import MLPEncoder
from cellsift.tasks import CellIndex

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "scimilarity_tiny"


def _bundle(path, width=4, **kw):
    enc = MLPEncoder(20, (8,), width)
    genes = GeneVocabulary([f"g{i}" for i in range(20)])
    return save_bundle(path, config={}, modules={"encoder": enc}, genes=genes, **kw)


def _width(path):
    """The latent width of a saved bundle's encoder."""
    w = [v for v in load_bundle(path).weights["encoder"].values() if v.ndim == 2]
    return w[-1].shape[0]


def _results(path):
    path.mkdir()
    (path / "umap.png").write_bytes(b"png")
    (path / "annotations.csv").write_text("cell,label\n")
    return sorted(p.name for p in path.iterdir())


def test_overwrite_replaces_an_earlier_output_of_the_kind_only(tmp_path):
    old = _bundle(tmp_path / "bundle", width=4)
    new = _bundle(old, width=6, overwrite=True)  # a bundle replaces a bundle
    assert _width(new) == 6
    files = _results(tmp_path / "results")
    with pytest.raises(FileExistsError, match="results exists and is a folder that is not a model"):
        _bundle(tmp_path / "results", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == files
    (tmp_path / "empty").mkdir()
    _bundle(tmp_path / "empty", overwrite=True)  # an empty folder is no loss
    # a SCimilarity model imported onto itself is refused, not deleted
    src = tmp_path / "scimilarity"

    shutil.copytree(FIXTURE, src)
    with pytest.raises(FileExistsError, match="not a model bundle"):
        import_scimilarity(src, src, overwrite=True)
    assert (src / "encoder.ckpt").is_file()
    # an index over a results folder, a store over a folder that is not a store
    index = CellIndex.build(np.eye(3, 4, dtype=np.float32) + 0.1)
    with pytest.raises(FileExistsError, match="not a cell index"):
        index.save(tmp_path / "results", overwrite=True)
    index.save(tmp_path / "index")
    index.save(tmp_path / "index", overwrite=True)
    adata = ad.AnnData(np.ones((3, 4), dtype=np.float32))
    adata.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(FileExistsError, match=r"not a store \(h5ad, Zarr, SOMA\)"):
        convert(tmp_path / "a.h5ad", tmp_path / "results", format="zarr", overwrite=True)
    convert(tmp_path / "a.h5ad", tmp_path / "a.zarr")
    convert(tmp_path / "a.h5ad", tmp_path / "a.zarr", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == files
    # a sharded store replaces a sharded store, not a folder that only has a manifest.json
    # (a cell index, a project folder)
    (tmp_path / "results" / "manifest.json").write_text('{"files": ["a.h5ad"]}')
    for folder in ("index", "results"):
        before = sorted(p.name for p in (tmp_path / folder).iterdir())
        with pytest.raises(FileExistsError, match="not a sharded store"):
            convert(tmp_path / "a.h5ad", tmp_path / folder, shard_size=2, overwrite=True)
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == before
    convert(tmp_path / "a.h5ad", tmp_path / "sharded", shard_size=2)
    convert(tmp_path / "a.h5ad", tmp_path / "sharded", shard_size=1, overwrite=True)
    assert len(list((tmp_path / "sharded").glob("shard-*.h5ad"))) == 3
    # a sharded store's folder that holds other files too (notes, the source itself) is
    # a folder of other files: never replaced, whatever its manifest says
    shutil.copy(tmp_path / "a.h5ad", tmp_path / "sharded" / "source.h5ad")
    (tmp_path / "sharded" / "NOTES.txt").write_text("keep me")
    before = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    for src in (tmp_path / "sharded" / "source.h5ad", tmp_path / "a.h5ad"):
        with pytest.raises(FileExistsError, match="not a sharded store"):
            convert(src, tmp_path / "sharded", shard_size=1, overwrite=True)
        assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == before


def test_an_index_or_embeddings_folder_holding_other_files_is_not_replaced(tmp_path):
    """overwrite replaces an index's or an embeddings store's folder whole: one that holds
    other files too (a user's notes, an index saved inside a store) is refused before the
    work, naming them, and nothing is lost; a file manager's own files go with it."""
    from cellsift.datasets import synthetic_atlas
    from cellsift.models import MetricModel
    from cellsift.tasks import embed_collection, load_embeddings

    src = synthetic_atlas(60, 120, seed=0, path=tmp_path / "atlas.h5ad")
    model = MetricModel.from_collection(src, hidden=(8,), latent=4)
    emb = embed_collection(model, src, tmp_path / "emb.zarr")
    index = CellIndex.build(*load_embeddings(emb))
    index.save(tmp_path / "index")
    index.save(emb / "cells.index")  # (a user's index of the store, kept inside it)
    (tmp_path / "index" / "notes.txt").write_text("kept")
    (tmp_path / "index" / "ivf.faiss").write_text("")  # (its own names are its own)

    def tree(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

    before = {f: tree(f) for f in (emb, tmp_path / "index")}
    with pytest.raises(FileExistsError, match=r"holds other files too \(notes\.txt\)"):
        index.save(tmp_path / "index", overwrite=True)
    with pytest.raises(FileExistsError, match=r"holds other files too \(cells\.index\)"):
        embed_collection(model, src, emb, overwrite=True)
    assert {f: tree(f) for f in before} == before
    (tmp_path / "index" / "notes.txt").unlink()
    (tmp_path / "index" / ".DS_Store").write_text("")
    index.save(tmp_path / "index", overwrite=True)
    assert CellIndex.load(tmp_path / "index").n_cells == 60
    shutil.rmtree(emb / "cells.index")
    (emb / "shard-1notes.txt").write_text("kept")  # (no shard's name, as written)
    with pytest.raises(FileExistsError, match=r"holds other files too \(shard-1notes\.txt\)"):
        embed_collection(model, src, emb, overwrite=True)
    (emb / "shard-1notes.txt").unlink()
    (emb / "embeddings").mkdir()  # (the one array of a store of version 1: its own)
    (tmp_path / ".emb.zarr.old-0123abcd").mkdir()  # (a replacement killed as it deleted)
    embed_collection(model, src, emb, overwrite=True)
    assert len(load_embeddings(emb)[0]) == 60
    assert not (tmp_path / ".emb.zarr.old-0123abcd").exists()


def test_a_store_overwrite_replaces_only_a_store_and_not_a_folder_that_looks_like_one(tmp_path):
    """Zarr groups that anndata did not encode (an embeddings store, an image) and a folder
    that holds an entry named ms (as a SOMA experiment does) are not stores: convert and
    synthetic_atlas with overwrite refuse them, leaving them whole; a store of each format
    (written by cellsift or by anndata / tiledbsoma.io) is replaced."""
    import tiledbsoma.io
    import zarr

    from cellsift.datasets import synthetic_atlas
    from cellsift.models import MetricModel
    from cellsift.tasks import embed_collection

    src = synthetic_atlas(200, 120, seed=0, path=tmp_path / "atlas.h5ad")
    model = MetricModel.from_collection(src, hidden=(8,), latent=4)
    embeddings = embed_collection(model, src, tmp_path / "emb.zarr")
    image = tmp_path / "image.zarr"
    zarr.open_group(str(image), mode="w").create_array("0", shape=(4, 4), dtype="u1")
    project = tmp_path / "project"
    (project / "ms").mkdir(parents=True)
    (project / "ms" / "run1.raw").write_bytes(b"spectra")
    (project / "thesis.tex").write_text("keep me")
    for folder in (embeddings, image, project):
        before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        for fmt in ("zarr",) if folder.suffix else ("zarr", "soma"):
            with pytest.raises(FileExistsError, match=r"not a store \(h5ad, Zarr, SOMA\)"):
                convert(src, folder, format=fmt, overwrite=True)
        with pytest.raises(FileExistsError, match="not a store"):
            synthetic_atlas(10, 10, path=folder, format="zarr", overwrite=True)
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    adata = ad.read_h5ad(src)
    adata.write_zarr(tmp_path / "by_anndata.zarr")
    tiledbsoma.io.from_anndata(str(tmp_path / "by_tiledbsoma.soma"), adata, "RNA")
    for store in ("by_anndata.zarr", "by_tiledbsoma.soma"):
        convert(src, tmp_path / store, overwrite=True)
    # a store of anndata before 0.8 (no encoding in its attributes), in a folder of no
    # suffix: opened as Zarr, and replaced as a store
    import json

    from cellsift.data import CellCollection

    old = tmp_path / "pbmc"
    with ad.settings.override(zarr_write_format=2):
        adata.write_zarr(old)
    attrs = json.loads((old / ".zattrs").read_text())
    (old / ".zattrs").write_text(
        json.dumps({k: v for k, v in attrs.items() if "encoding" not in k})
    )
    assert CellCollection(old).n_obs == adata.n_obs
    convert(src, old, format="zarr", overwrite=True)
    # files named as h5ad that anndata did not write (a Cell Ranger matrix, notes) are kept
    # (review: any .h5 or .h5ad file was replaced); an h5ad anndata wrote is replaced
    import h5py

    tenx = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(tenx, "w") as f:
        f.create_group("matrix").create_dataset("data", data=np.arange(3))
    notes = tmp_path / "notes.h5ad"
    notes.write_text("my lab notes")
    for file in (tenx, notes):
        before = file.read_bytes()
        with pytest.raises(FileExistsError, match=r"is a file that is not a store"):
            convert(src, file, format="h5ad", overwrite=True)
        assert file.read_bytes() == before
    adata.write_h5ad(tmp_path / "by_anndata.h5ad")
    convert(src, tmp_path / "by_anndata.h5ad", overwrite=True)
    # an h5ad cut short or empty (nothing readable to lose) is replaced as before (review)
    whole = (tmp_path / "by_anndata.h5ad").read_bytes()
    for name, content in (("cut.h5ad", whole[: len(whole) // 2]), ("empty.h5ad", b"")):
        (tmp_path / name).write_bytes(content)
        convert(src, tmp_path / name, overwrite=True)
        assert ad.read_h5ad(tmp_path / name).n_obs == adata.n_obs
    # ... but they are no store to open: loading one as a bundle or index says it is a file
    # (review: "is a store of cells' counts")
    from cellsift.models import BundleError
    from cellsift.tasks import CellIndexError

    for name, content in (("cut.h5", whole[: len(whole) // 2]), ("empty.h5ad", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CellIndexError, match="is a file, not an index folder"):
            CellIndex.load(tmp_path / name)
        with pytest.raises(
            BundleError, match=r"not a bundle directory \(it does not exist or is a"
        ):
            MetricModel.load(tmp_path / name)


def test_a_file_another_process_holds_open_is_told_by_what_it_holds(tmp_path):
    """HDF5 locks a file that a process has open for writing: a Cell Ranger matrix held so
    is still refused by overwrite (review: it could not be opened to look, and was replaced
    as if cut short), and an h5ad output held so (open in a notebook) is replaced."""
    import subprocess
    import sys

    import h5py

    from cellsift.datasets import synthetic_atlas

    src = synthetic_atlas(50, 20, seed=0, path=tmp_path / "atlas.h5ad")
    tenx = tmp_path / "filtered_feature_bc_matrix.h5"
    with h5py.File(tenx, "w") as f:
        f.create_group("matrix").create_dataset("data", data=np.arange(3))
    output = tmp_path / "out.h5ad"
    convert(src, output)
    hold = "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); print(1, flush=True); time.sleep(60)"
    for path, replaced in ((tenx, False), (output, True)):
        holder = subprocess.Popen(
            [sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout.readline().strip() == "1"
            with pytest.raises(OSError, match="lock"):
                h5py.File(path, "r")  # (held: HDF5's lock refuses it)
            before = path.read_bytes()
            if replaced:
                convert(src, path, overwrite=True)
            else:
                with pytest.raises(FileExistsError, match="is a file that is not a store"):
                    convert(src, path, overwrite=True)
                assert path.read_bytes() == before
        finally:
            holder.kill()
            holder.wait()
    assert ad.read_h5ad(output).n_obs == 50


def test_convert_refuses_an_existing_output_before_reading_the_cells(tmp_path, monkeypatch):
    """The refusal comes before min_genes counts every cell's genes (a pass over the whole
    input), plain or sharded."""
    from cellsift.data._h5ad import H5adStore

    ad.AnnData(np.ones((3, 4), dtype=np.float32)).write_h5ad(tmp_path / "a.h5ad")
    convert(tmp_path / "a.h5ad", tmp_path / "a.zarr")
    convert(tmp_path / "a.h5ad", tmp_path / "sharded", shard_size=2)

    def counted(self):
        raise AssertionError("counted the cells before refusing the output")

    monkeypatch.setattr(H5adStore, "row_nnz", counted)
    with pytest.raises(FileExistsError, match=r"a\.zarr exists"):
        convert(tmp_path / "a.h5ad", tmp_path / "a.zarr", min_genes=1)
    with pytest.raises(FileExistsError, match="sharded exists"):
        convert(tmp_path / "a.h5ad", tmp_path / "sharded", shard_size=2, min_genes=1)
    with pytest.raises(FileExistsError, match="not a sharded store"):
        convert(tmp_path / "a.h5ad", tmp_path / "a.zarr", shard_size=2, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(
        ConfigError, match=r"sharded is a manifest or a glob of stores .*: convert reads one"
    ):
        convert(tmp_path / "sharded", tmp_path / "merged.h5ad")


def test_a_folder_replaced_in_place_is_never_missing(tmp_path):
    """A folder over a folder trades places with it in one step: a reader watching the
    path throughout the replacements always finds an output there, old or new; the old
    ones are gone after."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "v").write_text("-1")
    missing, done = [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            if not final.exists():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(300):
            tmp = utils.temp_sibling(final)
            tmp.mkdir()
            (tmp / "v").write_text(str(i))
            utils.move_into_place(tmp, final)
    finally:
        done.set()
        watcher.join()
    assert not missing and (final / "v").read_text() == "299"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_interrupted_overwrite_leaves_the_old_or_the_new_output(tmp_path, monkeypatch):
    path = _bundle(tmp_path / "bundle", width=4)
    replace = utils.os.replace
    # a file system that cannot exchange two paths: the old output renamed aside first
    monkeypatch.setattr(utils, "_exchange", lambda a, b: False)

    def fail_moving_in(src, dst):  # the new output fails to move in: the old one comes back
        if ".tmp-" in str(src):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", fail_moving_in)
    with pytest.raises(KeyboardInterrupt):
        _bundle(path, width=6, overwrite=True)
    monkeypatch.setattr(utils.os, "replace", replace)
    assert _width(path) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]

    remove = utils.remove_path

    def interrupted_deleting_the_old(p):  # killed while the old one is deleted: the new is in
        if ".old-" in p.name:
            raise KeyboardInterrupt
        remove(p)

    monkeypatch.setattr(utils, "remove_path", interrupted_deleting_the_old)
    with pytest.raises(KeyboardInterrupt):
        _bundle(path, width=6, overwrite=True)
    assert _width(path) == 6
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".bundle.old-")]) == 1
    monkeypatch.undo()  # the next write removes what that one left (it holds the lock)
    _bundle(path, width=7, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    # and where it can: the same after an exchange
    monkeypatch.setattr(utils, "remove_path", interrupted_deleting_the_old)
    with pytest.raises(KeyboardInterrupt):
        _bundle(path, width=8, overwrite=True)
    assert _width(path) == 8


def test_a_tree_that_gains_files_while_removed_is_removed(tmp_path, monkeypatch):
    """zarr's I/O thread can write a chunk after Ctrl-C: rmtree then meets 'directory not
    empty'; the removal goes on until the tree is gone."""
    import errno

    tree = tmp_path / ".out.zarr.tmp-1"
    (tree / "X" / "indices" / "c").mkdir(parents=True)
    (tree / "X" / "indices" / "c" / "0").write_bytes(b"chunk")
    rmtree, calls = shutil.rmtree, []

    def racing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", racing)
    utils.remove_path(tree)
    assert not tree.exists() and len(calls) == 2


def test_store_and_data_module_classes_import_from_cellsift_data():
    from cellsift.data import CellDataModule, H5adStore, SomaStore, ZarrStore
    from cellsift.data.datamodule import CellDataModule as direct

    assert CellDataModule is direct
    assert {c.__name__ for c in (H5adStore, ZarrStore, SomaStore)} == {
        "H5adStore",
        "ZarrStore",
        "SomaStore",
    }


def test_an_output_saved_over_while_it_is_loaded_is_read_as_one_version(tmp_path, monkeypatch):
    """Another process saves an index or a bundle over the folder while it is loaded (its
    files are read one after another): the load reads the folder again and returns one
    version whole, not files of both (which looked corrupt to each other, or mixed one
    index's embeddings with another's metadata)."""
    import pandas as pd

    from cellsift.models import bundle as bundle_module
    from cellsift.tasks import index as index_module

    rng = np.random.default_rng(0)
    path = tmp_path / "index"
    first = CellIndex.build(rng.normal(size=(50, 4)), pd.DataFrame({"v": ["a"] * 50}))
    second = CellIndex.build(rng.normal(size=(50, 4)), pd.DataFrame({"v": ["b"] * 50}))
    first.save(path)
    digest, swaps = index_module._file_digest, []

    def saved_over_once(file):  # (the first file checked: then the folder is replaced)
        if not swaps:
            swaps.append(file)
            second.save(path, overwrite=True)
        return digest(file)

    monkeypatch.setattr(index_module, "_file_digest", saved_over_once)
    loaded = CellIndex.load(path)
    assert swaps and set(loaded.metadata_rows(range(50))["v"]) == {"b"}
    np.testing.assert_array_equal(np.asarray(loaded.embeddings), np.asarray(second.embeddings))

    bundle = _bundle(tmp_path / "bundle", width=4)
    sha, swaps = bundle_module._sha256, []

    def bundle_saved_over_once(file):
        if not swaps:
            swaps.append(file)
            _bundle(bundle, width=6, overwrite=True)
        return sha(file)

    monkeypatch.setattr(bundle_module, "_sha256", bundle_saved_over_once)
    weights = load_bundle(bundle).weights["encoder"]
    assert swaps and [v for v in weights.values() if v.ndim == 2][-1].shape[0] == 6


@pytest.mark.parametrize("overwrite", [False, True])
def test_what_appears_at_the_output_while_it_is_written_is_kept(tmp_path, overwrite):
    """A folder of other files made at the output path while the output was written (or
    another run's output, without overwrite) is not replaced as the output is placed: the
    path is checked again then, and without overwrite the move itself fails where anything
    is there. The finished output's temporary copy is removed."""
    from cellsift.data.writers import open_writer
    from cellsift.datasets import indexed_atlas

    adata = indexed_atlas(20, 6)
    path = tmp_path / "out.zarr"
    writer = open_writer(path, adata.var, n_obs=20, overwrite=overwrite)
    writer.append(adata.X, adata.obs)
    path.mkdir()
    (path / "results.csv").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"out\.zarr exists"):
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
    assert (path / "results.csv").read_text() == "keep me"
    if overwrite:
        return
    with pytest.raises(FileExistsError, match=r"out\.h5ad exists"):  # (another run's output)
        with utils.atomic_path(tmp_path / "out.h5ad") as t:
            t.write_text("new")
            (tmp_path / "out.h5ad").write_text("another run's")
    assert (tmp_path / "out.h5ad").read_text() == "another run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad", "out.zarr"]


def test_a_signal_while_the_old_output_is_deleted_acts_once_it_is_gone(tmp_path, monkeypatch):
    """Ctrl-C once the new output is in place, as the old one (now beside it) is deleted:
    the deletion finishes, then the interruption acts; no half-deleted old output stays."""
    import os
    import signal
    import time

    final, tmp = tmp_path / "out", tmp_path / ".out.tmp-1"
    for folder, text in ((final, "old"), (tmp, "new")):
        folder.mkdir()
        for i in range(50):
            (folder / f"part{i}").write_text(text)
    real = utils.remove_path

    def interrupted(path):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # (where the signal acts, unless held)
        real(path)

    monkeypatch.setattr(utils, "remove_path", interrupted)
    with pytest.raises(KeyboardInterrupt):
        utils.move_into_place(tmp, final)
    assert {p.read_text() for p in final.iterdir()} == {"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_what_a_killed_write_left_is_removed_only_where_it_is_no_ones(tmp_path, caplog):
    """Under the output's lock, a killed write's temporary output goes; an old output moved
    aside goes only once a new one is in place (killed between a replacement's two renames,
    it is the only copy: named, kept); another output's temporaries that look alike stay."""
    import logging
    import os

    bundle = _bundle(tmp_path / "bundle", width=4)
    os.rename(bundle, tmp_path / ".bundle.old-1a2b3c4d")  # (killed between the renames)
    (tmp_path / "bundle").mkdir()  # (and made again, empty, by a script's mkdir -p)
    (tmp_path / ".bundle.tmp-0123abcd").mkdir()  # (a killed write's)
    (tmp_path / ".bundle.tmp-x.tmp-89abcdef").mkdir()  # (an output named bundle.tmp-x's)
    with caplog.at_level(logging.WARNING, logger="cellsift"):
        _bundle(tmp_path / "bundle", width=6, overwrite=True)
    assert ".bundle.old-1a2b3c4d is the output this path held" in caplog.text
    assert _width(tmp_path / ".bundle.old-1a2b3c4d") == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".bundle.old-1a2b3c4d", ".bundle.tmp-x.tmp-89abcdef", "bundle"
    ]  # fmt: skip
    _bundle(tmp_path / "bundle", width=8, overwrite=True)  # (the new one in place: it goes)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.tmp-x.tmp-89abcdef", "bundle"]


@pytest.mark.parametrize("code", ["ENOSYS", "EBADF"])
def test_writes_on_a_file_system_without_locks_and_a_writer_left_open(tmp_path, monkeypatch, code):
    """A file system that keeps no locks (Lustre without -o flock: ENOSYS) writes unlocked,
    leaving no lock file; a store writer of this process left open (an append that failed,
    outside a with) is named as such when the path is written again, and its abort() frees
    it."""
    import errno
    import fcntl
    import os

    import pandas as pd

    from cellsift.data.writers import open_writer
    from cellsift.errors import OutputInUseError

    locks = fcntl.flock

    def no_locks(fd, op):  # (Lustre without -o flock; some NFS mounts: EBADF)
        raise OSError(getattr(errno, code), "no locks")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    _bundle(tmp_path / "bundle")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    monkeypatch.setattr(fcntl, "flock", locks)
    var = pd.DataFrame(index=["g0", "g1", "g2"])
    first = open_writer(tmp_path / "out.h5ad", var)
    with pytest.raises(ValueError, match="chunk has 4 genes"):
        first.append(np.ones((2, 4), np.float32), pd.DataFrame(index=["a", "b"]))
    with pytest.raises(OutputInUseError, match=r"an earlier writer in this process .* abort"):
        open_writer(tmp_path / "out.h5ad", var)
    first.abort()
    umask = os.umask(0o002)  # (a group that shares outputs: its lock file too)
    try:
        with open_writer(tmp_path / "out.h5ad", var) as second:
            assert (tmp_path / ".out.h5ad.lock").stat().st_mode & 0o777 == 0o664
            second.append(np.ones((2, 3), np.float32), pd.DataFrame(index=["a", "b"]))
    finally:
        os.umask(umask)
    with open_writer(tmp_path / "out.h5ad", var, overwrite=True) as second:
        second.append(np.ones((2, 3), np.float32), pd.DataFrame(index=["a", "b"]))
    assert ad.read_h5ad(tmp_path / "out.h5ad").n_obs == 2


def test_a_lock_file_that_leads_nowhere_or_is_not_ones_own(tmp_path, monkeypatch):
    """A lock file that is a link to nothing: an error naming it (it looped, holding
    signals); one output through a linked folder: the same lock, this process's writer
    named; another user's lock file, read-only, that NFS will not lock (EBADF): refused,
    not written unlocked."""
    import errno
    import fcntl
    import os

    import pandas as pd

    from cellsift.data.writers import open_writer
    from cellsift.errors import OutputInUseError

    (tmp_path / ".bundle.lock").symlink_to(tmp_path / "nowhere" / "x")
    with pytest.raises(ConfigError, match=r"\.bundle\.lock, the lock file .* is a link, not"):
        _bundle(tmp_path / "bundle")
    (tmp_path / ".bundle.lock").unlink()
    (tmp_path / "notes.txt").write_text("kept")  # (a link to a file: never written through)
    (tmp_path / ".bundle.lock").symlink_to(tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match=r"\.bundle\.lock, the lock file .* is a link, not"):
        _bundle(tmp_path / "bundle")
    assert (tmp_path / "notes.txt").read_text() == "kept"
    (tmp_path / ".bundle.lock").unlink()
    (tmp_path / ".bundle.lock").mkdir()
    with pytest.raises(ConfigError, match=r"\.bundle\.lock, the lock file .* is a folder, not"):
        _bundle(tmp_path / "bundle")
    (tmp_path / ".bundle.lock").rmdir()
    unlink = os.unlink

    def sticky(path, *args, **kwargs):  # (another user's lock file in /scratch: stays)
        if str(path).endswith(".bundle.lock"):
            raise PermissionError(1, "Operation not permitted")
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", sticky)
    _bundle(tmp_path / "bundle")
    _bundle(tmp_path / "bundle", width=6, overwrite=True)  # (released: written again)
    monkeypatch.undo()
    assert _width(tmp_path / "bundle") == 6
    (tmp_path / ".bundle.lock").unlink()
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    var = pd.DataFrame(index=["g0", "g1"])
    with open_writer(tmp_path / "real" / "out.h5ad", var) as writer:
        with pytest.raises(OutputInUseError, match="an earlier writer in this process"):
            open_writer(tmp_path / "linked" / "out.h5ad", var)
        writer.append(np.ones((1, 2), np.float32), pd.DataFrame(index=["a"]))
    real_flock = fcntl.flock

    def read_only(lock):  # (another user's file, 0644: opened to read)
        return os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644), False, False

    def nfs(fd, op):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_flock(fd, op)

    monkeypatch.setattr(utils, "_open_lock", read_only)
    monkeypatch.setattr(fcntl, "flock", nfs)
    with pytest.raises(PermissionError, match=r"is another user's and cannot be locked"):
        _bundle(tmp_path / "other")


_UNDER_A_LIMIT = r"""
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # (Python ignores SIGXFSZ)
from cellsift.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_a_write_stopped_by_a_file_size_limit_fails_in_one_line_and_leaves_nothing(tmp_path, fmt):
    """A write that the machine stops (a file size limit here; a full disk alike): one line
    that says which limit and what to do, the exit status of an error, and no hidden
    temporary output left behind. An h5ad written through HDF5's own file driver left its
    temporary file (its abort closed the file first, which raised again) and crashed the
    process (HDF5 flushes a file whose write failed again as it is freed)."""
    import subprocess
    import sys

    from cellsift.datasets import synthetic_atlas

    adata = synthetic_atlas(n_cells=3000, n_genes=300, seed=0)
    adata.write_h5ad(tmp_path / "src.h5ad")
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _UNDER_A_LIMIT, str((256 if fmt == "h5ad" else 32) << 10), "convert",
         str(tmp_path / "src.h5ad"), str(out / f"o.{fmt}")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert err[-1].startswith("cellsift convert: error: [Errno 27] File too large")
    assert "raise the limit or write the output elsewhere" in err[-1]
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == []


_SAVE_UNDER_A_LIMIT = r"""
import resource, sys
from cellsift.models import MetricModel
model = MetricModel([f"g{i}" for i in range(2000)], ["CL:0000236", "CL:0000624"], hidden=(64,))
limit = 100_000  # (under the weights' 0.5 MB; over config.json)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # (Python ignores SIGXFSZ)
try:
    model.save(sys.argv[1])
except OSError as err:
    print(err.errno, err.filename)
"""


def test_a_bundle_whose_weights_the_disk_refuses_raises_that_oserror(tmp_path):
    """safetensors reports a write the machine stops as an error of its own (with the
    system's number in its text), which `cellsift fit` said as a traceback: it is the
    system's OSError, naming the bundle's file, and no temporary folder is left."""
    import subprocess
    import sys

    out = tmp_path / "model"
    done = subprocess.run(
        [sys.executable, "-c", _SAVE_UNDER_A_LIMIT, str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["27", str(out / "model.safetensors")]
    assert list(tmp_path.iterdir()) == []


def test_an_annotated_h5ad_write_that_fails_leaves_nothing_and_a_later_one_writes(
    tmp_path, monkeypatch
):
    """The h5ad that `cellsift annotate` writes (writers.write_h5ad): a write the disk
    refuses raises that error (not one of HDF5's about its closing), and the file closes;
    the same AnnData then writes whole, and reads back as anndata's own writer wrote it."""
    import errno

    from cellsift.data import writers
    from cellsift.datasets import synthetic_atlas

    adata = synthetic_atlas(n_cells=400, n_genes=50, seed=0)
    adata.obs["note"] = ["a", "b"] * 200  # (text: categorical, as anndata writes it)
    write = writers._DroppingFile._write
    budget = [20_000]

    def full_disk(self, view):
        budget[0] -= view.nbytes
        if budget[0] < 0 and self._kept is None:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, view)

    monkeypatch.setattr(writers._DroppingFile, "_write", full_disk)
    with pytest.raises(OSError) as err:
        with utils.atomic_path(tmp_path / "a.h5ad") as tmp:
            writers.write_h5ad(adata, tmp)
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(writers._DroppingFile, "_write", write)
    with utils.atomic_path(tmp_path / "a.h5ad") as tmp:
        writers.write_h5ad(adata, tmp)
    adata.write_h5ad(tmp_path / "b.h5ad")
    a, b = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "b.h5ad")
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs) and a.var.equals(b.var)
    assert a.obs["note"].dtype == "category"


def test_the_machines_limits_are_said_in_one_line_whichever_library_met_them(capsys):
    """A full disk met by numpy (an index's arrays: an OSError without errno) or by TileDB
    (a SOMA store: its own error type) is said as an OSError's is, with what to do."""
    import errno

    import tiledbsoma

    from cellsift.cli import _error, _output_limit

    short = _output_limit(OSError("800000 requested and 785376 written"))
    assert short is not None and "the disk is full or a file size limit" in str(short)
    assert str(short).startswith("a write stopped short (800000 requested")
    soma = _output_limit(tiledbsoma.SOMAError("POSIX write error:No space left on device"))
    assert soma is not None and soma.errno == errno.ENOSPC
    assert _output_limit(tiledbsoma.SOMAError("some other failure")) is None
    assert _output_limit(OSError(errno.ENOENT, "No such file or directory")) is None
    # a copy or a rename names its source and its destination: the limit is the latter's
    copied = _output_limit(OSError(errno.ENOSPC, "No space left on device", "/a", None, "/b/c"))
    assert copied is not None and str(copied).startswith(
        "[Errno 28] No space left on device: /b/c;"
    )
    big = _output_limit(OSError(errno.EFBIG, "File too large"))
    assert big is not None and _error("index", big) == 2
    said = capsys.readouterr().err
    assert said.startswith("cellsift index: error: [Errno 27] File too large; a file size")


def test_h5ad_writes_the_disk_takes_in_part_are_made_whole(tmp_path, monkeypatch):
    """A write near the disk's end takes part of what was asked (and says how much): the
    rest is written too, and where the disk then refuses it, that error is raised. HDF5's
    file-object driver does not look at the count: a part left out was a corrupt output
    placed as complete."""
    import errno

    from cellsift.data import writers
    from cellsift.datasets import synthetic_atlas

    adata = synthetic_atlas(n_cells=500, n_genes=80, seed=0)
    adata.write_h5ad(tmp_path / "src.h5ad")
    room = [None]

    class Partial(io.FileIO):  # at most 1,000 bytes a call; none beyond ``room``
        def write(self, b):
            part = memoryview(b).cast("B")[:1000]
            if room[0] is not None:
                if room[0] <= 0:
                    raise OSError(errno.ENOSPC, "No space left on device")
                part = part[: room[0]]
                room[0] -= len(part)
            return super().write(part)

    class Dropping(writers._DroppingFile, Partial):
        pass

    monkeypatch.setattr(writers, "_DroppingFile", Dropping)
    convert(tmp_path / "src.h5ad", tmp_path / "a.h5ad")
    convert(tmp_path / "src.h5ad", tmp_path / "a.zarr")  # (the same cells, another writer)
    a, want = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "src.h5ad")
    assert (a.X != want.X).nnz == 0 and a.obs.index.equals(want.obs.index)
    room[0] = (tmp_path / "a.h5ad").stat().st_size - 5000  # the disk ends before the file
    with pytest.raises(OSError) as err:
        convert(tmp_path / "src.h5ad", tmp_path / "b.h5ad")
    assert err.value.errno == errno.ENOSPC
    assert not list(tmp_path.glob("*b.h5ad*"))


def test_an_interrupt_inside_an_h5ad_write_ends_the_command_as_an_interrupt(
    tmp_path, monkeypatch, capsys
):
    """Ctrl-C (or SIGTERM) raised while HDF5 writes through Python, also as it closes the
    file: the command ends as interrupted (130), not with the error HDF5's driver makes of
    it, and leaves nothing."""
    from cellsift.cli import main
    from cellsift.data import writers
    from cellsift.datasets import synthetic_atlas

    synthetic_atlas(n_cells=600, n_genes=80, seed=0).write_h5ad(tmp_path / "src.h5ad")
    write, calls = writers._DroppingFile._write, [0, None]

    def counting(self, view):
        n = write(self, view)
        calls[0] += 1
        if calls[0] == calls[1]:  # (after the bytes went: the signal's latest moment)
            raise KeyboardInterrupt
        return n

    monkeypatch.setattr(writers._DroppingFile, "_write", counting)
    args = ["convert", "--chunk-size", "100", str(tmp_path / "src.h5ad")]
    assert main([*args, str(tmp_path / "whole.h5ad")]) == 0
    total = calls[0]
    (tmp_path / "whole.h5ad").unlink()
    for at in (2, total - 1, total):  # (the last writes: as the file closes)
        calls[:] = [0, at]
        assert main([*args, str(tmp_path / "out" / "o.h5ad")]) == 130, at
        assert "interrupted; no partial output was left in place" in capsys.readouterr().err
        assert not [p for p in (tmp_path / "out").iterdir()], at


class _Listing:
    """Pickled into a checkpoint: lists, as it is written, the hidden files of ``folder``
    and the temporary files that taking ``last.ckpt``'s lock would clear there."""

    def __init__(self, folder):
        self.folder, self.hidden, self.cleared = folder, [], []

    def __reduce__(self):
        from cellsift._utils import temporaries

        self.hidden = sorted(
            p.name for p in self.folder.glob(".last.ckpt.*") if p.suffix != ".lock"
        )
        self.cleared = temporaries(self.folder, "last.ckpt")
        self.locked = []  # (held by its writer: a clearing that takes the lock removes it)
        for name in self.hidden:
            with open(self.folder / name, "rb") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self.locked.append(name)
        return (str, ("listed",))


def test_a_checkpoint_is_on_disk_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    """AtomicCheckpointIO syncs a checkpoint's data to disk before renaming it over the
    previous one, and then the folder holding the rename: a crash of the machine between
    the rename reaching the disk and the data would leave an empty last.ckpt where a whole
    one was."""
    import os

    import torch

    from cellsift.train.resume import AtomicCheckpointIO

    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def synced(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def replaced(src, dst):
        events.append(("replace", f"{src} -> {dst}"))
        return replace(src, dst)

    last = tmp_path / "last.ckpt"
    for step in (1, 2):  # (a first checkpoint, then one over it)
        events.clear()
        monkeypatch.setattr(os, "fsync", synced)
        monkeypatch.setattr(os, "replace", replaced)
        AtomicCheckpointIO().save_checkpoint({"step": step}, last)
        monkeypatch.undo()
        moves = [i for i, (kind, what) in enumerate(events) if what.endswith(f"-> {last}")]
        assert len(moves) == 1, events
        tmp = events[moves[0]][1].split(" -> ")[0]
        assert ("fsync", tmp) in events[: moves[0]], events
        assert ("fsync", str(tmp_path)) in events[moves[0] :], events
        assert torch.load(last, weights_only=False)["step"] == step
    # a file system that does not sync is written as before; a sync that fails (the data
    # did not reach the disk) is an error naming the checkpoint, the previous one whole
    import errno

    for code in (errno.EINVAL, errno.EIO):

        def failing(fd, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", failing)
        if code == errno.EIO:
            with pytest.raises(OSError, match=rf"Input/output error: '{last}'"):
                AtomicCheckpointIO().save_checkpoint({"step": 4}, last)
        else:
            AtomicCheckpointIO().save_checkpoint({"step": 3}, last)
        monkeypatch.undo()
    assert torch.load(last, weights_only=False)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # (one without an errno keeps its words: "[Errno None] None" before)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("no words")))
    with pytest.raises(OSError, match=rf"^no words: {last}$"):
        AtomicCheckpointIO().save_checkpoint({"step": 5}, last)
    monkeypatch.undo()
    assert torch.load(last, weights_only=False)["step"] == 3


def test_a_checkpoint_over_a_folder_is_refused_and_one_another_process_writes_is_written(
    tmp_path,
):
    """AtomicCheckpointIO: a checkpoint path that is a folder is refused (replacing it would
    delete the folder and all in it); one whose lock another process holds (two runs in
    one folder of checkpoints) is written whole all the same, with a warning, not a
    failed fit."""
    import subprocess
    import sys

    import torch

    from cellsift._utils import output_lock
    from cellsift._warnings import CellsiftWarning
    from cellsift.errors import OutputInUseError
    from cellsift.train.resume import AtomicCheckpointIO

    io_ = AtomicCheckpointIO()
    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    (results / "sub" / "kept.txt").write_text("data")
    with pytest.raises(IsADirectoryError, match="a checkpoint is a file, and this path is a"):
        io_.save_checkpoint({"step": 1}, results)
    assert (results / "sub" / "kept.txt").read_text() == "data"

    last = tmp_path / "last.ckpt"
    io_.save_checkpoint({"step": 1}, last)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(tmp_path / ".last.ckpt.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        seen = _Listing(tmp_path)  # (what the holder would clear, as the file is written)
        with pytest.warns(CellsiftWarning, match=r"another process is writing .*last\.ckpt"):
            io_.save_checkpoint({"step": 2, "w": torch.ones(3), "seen": seen}, last)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # the holder, taking its lock again meanwhile, clears the temporary files of killed
    # writes: this one's is none of them (review173: it was, and the fit failed)
    assert seen.cleared == [] and [n.split("-")[0] for n in seen.hidden] == [".last.ckpt.unlocked"]
    assert seen.locked == seen.hidden
    assert torch.load(last, weights_only=False)["step"] == 2
    with (
        output_lock(last, "a checkpoint"),
        pytest.raises(OutputInUseError, match="an earlier writer in this process"),
    ):  # (this process's own writer: its error, not another process's warning)
        io_.save_checkpoint({"step": 3}, last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "results"]


def test_what_overwrite_would_not_replace_is_said_so_whether_it_is_given_or_not(tmp_path):
    """A path overwrite would not replace is named as such at once, not as an overwrite to
    pass and then refused (hunt270); an empty folder or an earlier output asks for it; a
    path that cannot be read is not replaceable, and a broken link is called one."""
    from cellsift._utils import check_replaceable, holds

    kind = holds("index.json")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.json").write_text("{}")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    for overwrite in (False, True):
        for name, said in (("mine", "a folder that is not"), ("broken", "a broken link that")):
            with pytest.raises(FileExistsError, match=said):
                check_replaceable(tmp_path / name, overwrite, kind, "an index")
    for name in ("empty", "old"):
        with pytest.raises(FileExistsError, match="exists; remove it or pass overwrite=True"):
            check_replaceable(tmp_path / name, False, kind, "an index")
        check_replaceable(tmp_path / name, True, kind, "an index")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    with pytest.raises(FileExistsError, match="a folder that is not an index"):
        check_replaceable(tmp_path / "old", False, unreadable, "an index")

    class Unlisted(holds):  # (a folder that cannot be listed, as for a user without rights)
        def extras(self, path):
            unreadable(path)

    for overwrite in (False, True):  # (review237: the listing's PermissionError, bare)
        with pytest.raises(FileExistsError, match="a folder that is not an index"):
            check_replaceable(tmp_path / "old", overwrite, Unlisted("x", only=[]), "an index")
