from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellsift.cli import main


def test_python_dash_m_runs_the_command(indexed_paths):
    """``python -m cellsift`` is the ``cellsift`` command: its help, and a command's status."""
    run = [sys.executable, "-m", "cellsift"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: cellsift" in out.stdout
    out = subprocess.run(
        [*run, "info", "no/such.h5ad"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and out.stderr.startswith("cellsift info: error:")


def test_help_and_the_package_import_no_heavy_libraries():
    """``cellsift --help`` answers without importing torch, anndata or Lightning (seconds);
    ``import cellsift`` neither, yet its names and submodules are there when used."""
    code = (
        "import sys, cellsift, cellsift.cli\n"
        "cellsift.cli.build_parser().format_help()\n"
        "heavy = [m for m in ('torch', 'anndata', 'lightning') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert cellsift.CellCollection.__name__ == 'CellCollection'\n"
        "assert cellsift.ontology.__name__ == 'cellsift.ontology' and 'tl' in dir(cellsift)\n"
        "assert not hasattr(cellsift, 'no_such_name') and not hasattr(cellsift, 'a.b')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_every_options_default_is_in_its_help():
    """An option with a default says it in its help (review: --k, --batch-size, --engine,
    --chunk-size and --out did not), auto's size limit included."""
    import argparse

    from cellsift.cli import build_parser
    from cellsift.tasks.index import AUTO_EXACT_BELOW

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    seen = 0
    for name, parser in commands.choices.items():
        for action in parser._actions:
            if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
                continue
            seen += 1
            said = action.help or ""
            assert f"default: {action.default}" in said, (name, action.option_strings, said)
    assert seen >= 6
    engine = next(a for a in build_parser()._subparsers._actions if a.dest == "command")
    help_ = next(a.help for a in engine.choices["index"]._actions if a.dest == "engine")
    assert f"exact below {AUTO_EXACT_BELOW:,} cells" in help_


def test_output_to_a_reader_that_has_gone_ends_quietly(indexed_paths):
    """``cellsift info ... | head -1``: the pipe closes before the command writes; it ends
    with SIGPIPE's status, no traceback."""
    run = [sys.executable, "-m", "cellsift", "info", str(indexed_paths["h5ad"])]
    proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_info(indexed_paths, capsys):
    assert main(["info", str(indexed_paths["soma"])]) == 0
    out = capsys.readouterr().out
    assert "format     soma" in out and "cells      2,000" in out and "dataset_id" in out
    assert main(["info", str(indexed_paths["h5ad"])]) == 0  # stored values, as such
    assert "stored     4,000 values (16.7% of cells x genes)" in capsys.readouterr().out


def test_info_says_the_gene_ids_as_the_genes_are_aligned(tmp_path, capsys):
    """var_names are said to be Ensembl ids where most are, as genes are aligned (hunt216:
    from the first three names, so a mitochondrial symbol first said "symbols")."""
    import anndata as ad
    import scipy.sparse as sp

    ids = [f"ENSG{i:011d}" for i in range(100)]
    for name, genes, kind in (
        ("symbol-first", ["MT-CO1", *ids[1:]], "(Ensembl ids)"),
        ("ids-first", [*ids[:3], *(f"SYM{i}" for i in range(97))], "(symbols or other ids)"),
        # (ids as Windows line ends leave them: aligned as ids, review203)
        ("carriage-returns", [f"{g}\r" for g in ids], "(Ensembl ids)"),
    ):
        path = tmp_path / f"{name}.h5ad"
        x = sp.csr_matrix(np.ones((4, 100), np.float32))
        ad.AnnData(X=x, var=pd.DataFrame(index=genes)).write_h5ad(path)
        assert main(["info", str(path)]) == 0
        assert kind in capsys.readouterr().out, name
    # "..." where genes are left out, not after all of them (hunt258)
    from cellsift.cli import _describe
    from cellsift.data import open_store

    for n, shown in ((1, "ENSG00000000000 ("), (3, "ENSG00000000002 ("), (4, "ENSG00000000002, ... (")):  # fmt: skip
        a = ad.AnnData(
            X=sp.csr_matrix(np.ones((2, n), np.float32)), var=pd.DataFrame(index=ids[:n])
        )
        line = next(x for x in _describe(open_store(a)).splitlines() if "var_names" in x)
        assert shown in line, (n, line)


def test_info_counts_missing_values_apart(tmp_path, capsys):
    from cellsift.datasets import indexed_atlas

    adata = indexed_atlas(50, 20, path=None)
    adata.obs["cell_type_ontology_term_id"] = adata.obs["cell_type_ontology_term_id"].astype(object)
    adata.obs.iloc[:3, adata.obs.columns.get_loc("cell_type_ontology_term_id")] = None
    adata.obs["note"] = ["a"] * 49 + [np.nan]
    adata.write_h5ad(tmp_path / "a.h5ad")
    assert main(["info", str(tmp_path / "a.h5ad")]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "None" not in out
    assert "(3 cells missing)" in out
    note = next(line for line in out.splitlines() if line.strip().startswith("note"))
    assert "1 value: a (1 cell missing)" in note
    # dates (a SOMA store's, or in memory) as dates; a store without genes names none
    from cellsift.cli import _describe
    from cellsift.data import open_store

    adata.obs["seen"] = pd.to_datetime(["2020-01-31"] * 49 + [None])
    seen = next(line for line in _describe(open_store(adata)).splitlines() if "seen" in line)
    assert "1 value: 2020-01-31 (1 cell missing)" in seen
    assert "var_names" not in _describe(open_store(adata[:, :0]))
    # numbers in their order, not as text sorts them (12 before 9)
    shown = _describe(open_store(adata)).splitlines()
    index = next(line for line in shown if line.strip().startswith("obs_index"))
    assert "50 values: 0, 1, 2, 3, ..." in index
    adata.obs["size"] = pd.array([12, 9, None, 100, 9.0] * 10, dtype="Int64")
    size = next(line for line in _describe(open_store(adata)).splitlines() if "size" in line)
    assert "3 values: 9, 12, 100 (10 cells missing)" in size
    adata.obs["cluster"] = pd.Categorical([10, 2, 1, 3, 2] * 10)  # (as leiden's, of numbers)
    adata.obs["grade"] = pd.Categorical(["lo", "mid", "hi"] * 16 + ["lo"] * 2, ["lo", "mid", "hi"])
    shown = _describe(open_store(adata))
    assert "4 values: 1, 2, 3, 10" in next(s for s in shown.splitlines() if "cluster" in s)
    assert "3 values: lo, mid, hi" in next(s for s in shown.splitlines() if "grade" in s)


def test_info_of_a_manifest_of_no_stores_says_so(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"files": []}')
    assert main(["info", str(tmp_path / "manifest.json")]) == 2
    assert "manifest.json lists no stores" in capsys.readouterr().err


def test_convert_and_errors(indexed_paths, tmp_path, capsys):
    out = tmp_path / "c.zarr"
    assert main(["convert", str(indexed_paths["h5ad"]), str(out)]) == 0
    assert out.exists()
    assert main(["convert", str(indexed_paths["h5ad"]), str(out)]) == 2
    assert "overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad.h5ad"
    bad.write_text("x")
    assert main(["info", str(bad)]) == 2
    assert "cannot be read as HDF5" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (  # named as the input's fault, not the output's
            ["convert", "{dup}", "{tmp}/out.zarr"],
            r"dup\.h5ad: var_names hold the same name more than once, e\.g\. \['g1'\]",
        ),
        (["convert", "{h5ad}", "{tmp}/out.txt"], "Cannot tell the format of"),
        (["convert", "{zero}", "{tmp}/out.soma"], "no cells to write"),
        (["index", "{h5ad}", "{tmp}/idx"], "is a store of cells.*, not an embeddings store"),
        (["index", "{tmp}/missing.zarr", "{tmp}/idx"], "missing.zarr does not exist"),
        (["info", "{tmp}/missing_dir"], "missing_dir does not exist"),
        (["info", "{tmp}/missing/manifest.json"], "manifest.json does not exist"),
    ],
)
def test_bad_arguments_and_inputs_are_one_line_errors(
    indexed_paths, tmp_path, capsys, args, message
):
    import re

    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    a = ad.AnnData(sp.csr_matrix(np.ones((5, 4), np.float32)))
    a.var_names = ["g0", "g1", "g1", "g3"]
    a.write_h5ad(tmp_path / "dup.h5ad")
    a.var_names = ["g0", "g1", "g2", "g3"]
    a[:0].copy().write_h5ad(tmp_path / "zero.h5ad")
    paths = {"tmp": tmp_path, "h5ad": indexed_paths["h5ad"]}
    paths |= {"dup": tmp_path / "dup.h5ad", "zero": tmp_path / "zero.h5ad"}
    assert main([arg.format(**paths) for arg in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cellsift {args[0]}: error: ")
    assert re.search(message, err)


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "in.h5ad", "shards", "--shard-size", "0"],
        ["annotate", "m", "i", "d.h5ad", "o.h5ad", "--k", "0"],
        ["index", "emb.zarr", "idx", "--k", "-3"],
        ["embed", "m", "d.h5ad", "o.zarr", "--batch-size", "x"],
        ["embed", "m", "d.h5ad", "o.zarr", "--devices", "0"],
    ],
)
def test_counts_below_their_least_are_refused_when_parsed(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"cellsift {args[0]}: error: argument {args[-2]}: " in err
    assert "must be at least" in err or "is not a whole number" in err


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["embed", "m", "d.h5ad", ""], "out"),
        (["index", "", "idx"], "embeddings"),
        (["convert", "in.h5ad", " "], "output"),
        (["info", ""], "path"),
        (["annotate", "m", "i", "d.h5ad", "o.h5ad", "--calibrate-on", ""], "--calibrate-on"),
        (["demo", "--out", ""], "--out"),
    ],
)
def test_an_empty_path_is_refused_when_parsed(args, name, capsys):
    """An empty path would be read as the current folder (and named as "" or ".")."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"cellsift {args[0]}: error: argument {name}: an empty path: name a file" in err


def test_an_existing_output_is_refused_before_the_work(tmp_path, capsys):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "notes.txt").write_text("mine")
    # the embeddings do not exist: the output is checked first; a folder overwrite would
    # not replace is said so with or without it (hunt270: "pass --overwrite", then refused)
    for extra in ([], ["--overwrite"]):
        assert main(["index", str(tmp_path / "none.zarr"), str(tmp_path / "idx"), *extra]) == 2
        said = capsys.readouterr().err
        assert "is a folder that is not a cell index" in said and "pass" not in said
    (tmp_path / "empty").mkdir()  # (which it would replace)
    assert main(["index", str(tmp_path / "none.zarr"), str(tmp_path / "empty")]) == 2
    said = capsys.readouterr().err  # (the command's option, not Python's: review)
    assert "empty exists; remove it or pass --overwrite." in said and "=True" not in said
    (tmp_path / "out.h5ad").mkdir()
    (tmp_path / "out.h5ad" / "notes.txt").write_text("mine")
    args = ["annotate", "m", "i", "d.h5ad", str(tmp_path / "out.h5ad"), "--overwrite"]
    assert main(args) == 2
    assert "is a folder that is not an h5ad file" in capsys.readouterr().err
    # an output named as another kind of store: refused before the work, not written as h5ad
    assert main(["annotate", "m", "i", "d.h5ad", str(tmp_path / "calls.zarr")]) == 2
    said = capsys.readouterr().err
    assert "calls.zarr is named as zarr but the format asked for is h5ad: annotate writes" in said
    assert not (tmp_path / "calls.zarr").exists()
    # or as a table (hunt254: HDF5 written as calls.csv / calls.parquet, exit 0)
    for name in ("calls.csv", "calls.parquet", "calls.TSV"):
        assert main(["annotate", "m", "i", "d.h5ad", str(tmp_path / name)]) == 2
        said = capsys.readouterr().err
        assert f"{name} is named as a {name[5:].lower()} table, and this writes h5ad" in said
        assert not (tmp_path / name).exists()
    from cellsift.data.writers import check_named
    from cellsift.errors import ConfigError

    for fmt in ("h5ad", "zarr", "soma"):  # (every writer's check: convert, embed)
        with pytest.raises(
            ConfigError, match=rf"c\.json is named as a \.json table, and this writes {fmt}"
        ):
            check_named(tmp_path / "c.json", fmt)
    # an output below a file: the file named, not the system's bare "File exists"
    (tmp_path / "afile").write_text("mine")
    bundle = _tiny_bundle(tmp_path)
    for args in (
        ["convert", str(tmp_path / "d.h5ad"), str(tmp_path / "afile" / "out.zarr")],
        ["embed", str(bundle), str(tmp_path / "d.h5ad"), str(tmp_path / "afile" / "e.zarr")],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'afile'} is a file, not a folder" in err, err
    assert (tmp_path / "afile").read_text() == "mine"
    # a name the file system refuses (its hidden temporary copy too long; a full disk, a
    # read-only folder alike): one line that says what to do, not a traceback
    long = tmp_path / ("x" * 245 + ".zarr")
    assert main(["convert", str(tmp_path / "d.h5ad"), str(long)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cellsift convert: error: [Errno 36] File name too long") and (
        "choose a shorter output name" in err and err.count("\n") == 1
    ), err
    assert not long.exists()


def _tiny_bundle(tmp_path):
    """An untrained model of a small synthetic atlas, written to tmp_path/d.h5ad."""
    from cellsift.datasets import synthetic_atlas
    from cellsift.models import MetricModel

    adata = synthetic_atlas(300, 200, n_studies=2, seed=0)
    adata.write_h5ad(tmp_path / "d.h5ad")
    return MetricModel.from_collection(adata, hidden=(16,), latent=4).save(tmp_path / "m")


def test_annotate_reads_its_query_files_with_one_line_errors(tmp_path):
    """cellsift annotate reads the query and --calibrate-on files through _read_h5ad."""
    from cellsift.cli import _read_h5ad
    from cellsift.errors import DataError

    (tmp_path / "trunc.h5ad").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(DataError, match=r"trunc\.h5ad cannot be read as HDF5.*truncated"):
        _read_h5ad(str(tmp_path / "trunc.h5ad"))
    with pytest.raises(FileNotFoundError, match=r"missing\.h5ad does not exist"):
        _read_h5ad(str(tmp_path / "missing.h5ad"))


def test_annotate_refuses_an_output_named_as_a_folder_before_the_work(tmp_path, capsys):
    """``out_dir/`` (a folder's name): the annotated h5ad was written as a file named
    ``out_dir``, unsaid. Refused in one line, before the model is read."""
    out = str(tmp_path / "out_dir") + "/"
    assert main(["annotate", str(tmp_path / "no_model"), "no_index", "q.h5ad", out]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "names a folder (it ends in a separator)" in said[0]
    assert "out_dir/cells.h5ad" in said[0] and not list(tmp_path.iterdir())


def test_lightning_messages_print_once(indexed_paths):
    code = (
        "import logging, sys; from cellsift.cli import main; "
        f"main(['info', {str(indexed_paths['h5ad'])!r}]); import lightning.pytorch; "
        "logging.getLogger('lightning.pytorch').info('probe-message')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (run.stdout + run.stderr).count("probe-message") == 1


def test_demo_settings_and_a_stopped_demo(synthetic_h5ad, tmp_path, capsys):
    """An atlas too small for the demo is refused up front (it failed after training); a
    synthetic atlas of another size is not reused; a demo stopped while training keeps no
    checkpoint and says to run it again (it cannot resume)."""
    import os
    import signal
    import threading
    import time

    from cellsift.demo import (
        EPOCHS,
        MIN_CELLS,
        SYNTHETIC_CELLS,
        _source,
        _train_and_annotate,
        run_demo,
    )
    from cellsift.errors import ConfigError, TrainingInterrupted

    with pytest.raises(SystemExit, match="2"):
        main(["demo", "--synthetic", "--n-cells", "200", "--out", str(tmp_path)])
    assert "--n-cells: must be at least 2000, not 200" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs at least 2,000 cells"):
        run_demo(tmp_path, synthetic=True, n_cells=1999)
    with pytest.raises(SystemExit, match="2"):
        main(["demo", "--synthetic", "--epochs", "0", "--out", str(tmp_path)])
    assert "--epochs: must be at least 1, not 0" in capsys.readouterr().err
    for epochs in (0, True, 2.0):
        with pytest.raises(ConfigError, match=f"number of epochs, at least 1, not {epochs}"):
            run_demo(tmp_path, synthetic=True, epochs=epochs)
    assert list(tmp_path.iterdir()) == []
    assert _source(tmp_path, True, 2000)[0] != _source(tmp_path, True, 2500)[0]
    # a size asks for a synthetic atlas, where the real data is found too (review: it ran
    # on the real data, the size unsaid)
    path, _, what = _source(tmp_path, False, 2000)
    assert path == _source(tmp_path, True, 2000)[0]
    assert what.startswith("synthetic atlas, 2,000 cells") and "--n-cells was given" in what
    with pytest.raises(SystemExit, match="2"):
        main(["demo", "--n-cells", "200", "--out", str(tmp_path)])
    assert "--n-cells: must be at least 2000, not 200" in capsys.readouterr().err
    # its help gives the defaults the demo takes (hunt192: a synthetic atlas of 20000 cells)
    with pytest.raises(SystemExit, match="0"):
        main(["demo", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert f"(default with --synthetic: {SYNTHETIC_CELLS})" in said
    assert f"(default: {EPOCHS};" in said and f"(>= {MIN_CELLS})" in said

    def sigterm_once_training() -> None:
        while "StopRequest" not in repr(signal.getsignal(signal.SIGTERM)):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=sigterm_once_training, daemon=True).start()
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM while training .* demo again") as err:
        _train_and_annotate(synthetic_h5ad, "dataset_id", tmp_path / "run")
    assert err.value.checkpoint is None and err.value.exit_status == 143
    assert not list((tmp_path / "run").rglob("*.ckpt"))
    assert not (tmp_path / "run" / "fit").exists()  # (its empty folder: hunt192)
    # an output folder it cannot make: one line naming it (hunt192: a traceback)
    (tmp_path / "a_file").write_text("")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "x"):
        with pytest.raises(ConfigError, match=rf"cannot make its output folder {out} \("):
            run_demo(out, synthetic=True, n_cells=2000)
    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path / "a_file" / "x"), "--n-cells", "2000"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "name a folder this user may write (cellsift demo --out)" in said[0]


def test_the_demo_without_its_extra_and_without_the_data_says_so(tmp_path, monkeypatch, capsys):
    """Without the demo's extra (scanpy, umap, scikit-learn, tiledbsoma: `cellsift[demo]`),
    `cellsift demo` says so in one line before any work; without the shared data, the
    first line says where it looked and how to point at it, whole."""
    import sys

    from cellsift.demo import _source

    monkeypatch.setitem(sys.modules, "umap", None)  # (as where it is not installed)
    assert main(["demo", "--synthetic", "--out", str(tmp_path / "d")]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "umap" in said[0] and "pip install 'cellsift[demo]'" in said[0]
    assert not (tmp_path / "d").exists()
    monkeypatch.delitem(sys.modules, "umap")
    # the SOMA store it converts to is the demo's too (review: it stopped after Zarr)
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)
    assert main(["demo", "--synthetic", "--out", str(tmp_path / "d")]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "tiledbsoma is needed" in said[0] and "cellsift[demo]" in said[0]
    assert not (tmp_path / "d").exists()
    # installed but failing to import (a dependency at another version): not "not installed"
    monkeypatch.delitem(sys.modules, "tiledbsoma")
    monkeypatch.delitem(sys.modules, "umap", raising=False)  # (imported by the run above)
    broken = tmp_path / "broken"
    (broken / "umap").mkdir(parents=True)
    (broken / "umap" / "__init__.py").write_text("raise ImportError('Numba needs NumPy 2.2')\n")
    monkeypatch.syspath_prepend(str(broken))
    assert main(["demo", "--synthetic", "--out", str(tmp_path / "d")]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "umap is installed but cannot be imported" in said[0]
    assert "Numba needs NumPy 2.2" in said[0] and "not installed" not in said[0]
    assert not (tmp_path / "d").exists()
    # a compiled part of an installed package missing: installed, broken (review)
    from cellsift._utils import import_optional
    from cellsift.errors import MissingDependencyError

    (broken / "partial").mkdir()
    (broken / "partial" / "__init__.py").write_text("from . import _core\n")
    with pytest.raises(MissingDependencyError, match=r"partial is installed but cannot be"):
        import_optional("partial")
    with pytest.raises(MissingDependencyError, match=r"not installed: pip install nothere$"):
        import_optional("nothere.sub")
    monkeypatch.setenv("CELLSIFT_DATA", str(tmp_path / "nowhere"))
    what = _source(tmp_path, False, None)[2]
    assert "kang2018_pbmc_ctrl_8donors.h5ad is not in" in what and "CELLSIFT_DATA" in what


@pytest.mark.slow
def test_demo_runs_on_a_synthetic_atlas(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cellsift.cli",
            "demo",
            "--synthetic",
            "--n-cells",
            "2000",
            "--epochs",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("cellsift demo on synthetic atlas")
    assert any("weighted" in line for line in lines)
    assert re.search(
        r"cells to train on; validation: [\d,]+ cells of dataset_id study_", proc.stdout
    )
    assert "ontology-aware calls:" in proc.stdout and "unknown (distance threshold" in proc.stdout
    assert "cells, 2 epochs) ..." in proc.stdout
    # its progress: a line each epoch here (2 epochs), the last one's too (hunt192: none)
    said = [line.split(":")[0].strip() for line in lines if line.startswith("    epoch ")]
    assert said == ["epoch 1/2", "epoch 2/2"]
    assert "validation loss" in proc.stdout and "silhouette" in proc.stdout
    # the UMAP's wait (umap-learn compiling its kernels) is said before it, not after
    umap_lines = [i for i, line in enumerate(lines) if "UMAP of the" in line]
    assert len(umap_lines) == 2 and lines[umap_lines[0]].endswith("cells' embedding ...")
    assert umap_lines[1] == umap_lines[0] + 1 and "umap.png" in lines[umap_lines[1]]
    assert (tmp_path / "umap.png").stat().st_size > 0
    assert (tmp_path / "metric_model" / "model.safetensors").exists()


def test_an_error_from_a_loader_worker_prints_its_own_message(tmp_path, capsys):
    """A DataLoader worker's error comes back with the worker's traceback in its message."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from cellsift.data import CellCollection, CellLoader, IterableCellDataset
    from cellsift.errors import DataError

    x = sp.csr_matrix(np.ones((64, 4), np.float32))
    x.data[100] = np.nan  # cell 25
    ad.AnnData(x).write_h5ad(tmp_path / "nan.h5ad")
    ds = IterableCellDataset(
        CellCollection(tmp_path / "nan.h5ad", check_counts=False), batch_size=16
    )
    ds.collection.check_counts = True  # the opening sample would have caught it: read it here
    with pytest.raises(DataError) as err:  # re-raised by torch, traceback in the message
        list(CellLoader(ds, num_workers=1))
    assert "Original Traceback" in str(err.value)
    from cellsift.cli import _error

    assert _error("embed", err.value) == 2
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1
    assert (
        printed.startswith("cellsift embed: error: ")
        and "nan.h5ad (X): cell 25 ('25') holds nan" in printed
    )


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    import cellsift.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_info", interrupted)
    parser = cli.build_parser

    def patched():
        p = parser()
        p._subparsers._group_actions[0].choices["info"].set_defaults(func=interrupted)
        return p

    monkeypatch.setattr(cli, "build_parser", patched)
    assert main(["info", "x.h5ad"]) == 130
    assert capsys.readouterr().err == (
        "cellsift info: interrupted; no partial output was left in place.\n"
    )


def test_the_verbose_option_goes_before_fit_too(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["-v", "fit", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.max_epochs" in out and "--ckpt_path" in out


def test_hints_name_the_commands_options(tmp_path, capsys):
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    counts = sp.csr_matrix(np.arange(20, dtype=np.float32).reshape(5, 4))
    logged = counts.copy()
    logged.data = np.log1p(logged.data)
    ad.AnnData(logged, layers={"counts": counts}).write_h5ad(tmp_path / "logged.h5ad")
    assert main(["convert", str(tmp_path / "logged.h5ad"), str(tmp_path / "o.zarr")]) == 2
    err = capsys.readouterr().err
    assert "Point --layer at raw counts" in err and "pass --no-check-counts" in err
    assert main(["info", str(tmp_path / "logged.h5ad"), "--layer", "spliced"]) == 2
    assert "Choose --layer among: X (no --layer), layers" in capsys.readouterr().err
    (tmp_path / "afile").write_text("plain")  # info has no --format to offer
    assert main(["info", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err.rstrip().endswith("name it *.h5ad, *.zarr or *.soma.")
    from cellsift.cli import _error
    from cellsift.errors import DataError
    from cellsift.ontology import OntologyError

    no_id = "x.soma: var has no column 'feature_id'. Pass var_id= with one of ['gene']."
    assert _error("convert", DataError(no_id)) == 2
    assert "Pass --var-id with one of ['gene']." in capsys.readouterr().err
    assert _error("fit", DataError(no_id)) == 2
    assert "store_options '{var_id: ...}' with one of" in capsys.readouterr().err
    no_x = "x.h5ad has no X. Choose layer= among: layers['counts'], raw."
    assert _error("info", DataError(no_x)) == 2
    assert "Choose --layer among: layers['counts'], raw." in capsys.readouterr().err
    with_x = "x.h5ad has no layer 'n'. Choose layer= among: X (layer=None), layers['counts']."
    assert _error("fit", DataError(with_x)) == 2
    said = capsys.readouterr().err
    assert "Choose --data.init_args.collection_options.layer among: X (null)" in said
    assert "layer=" not in said
    example = "layer= applies to every store: CellCollection([open_store(b, layer='counts')])."
    assert _error("embed", DataError(example)) == 2
    assert "--layer applies to every store: CellCollection([open_store(b, layer='counts')])" in (
        capsys.readouterr().err
    )
    hint = "to annotate with these labels as they are, pass ontology_aware=False."
    assert _error("annotate", OntologyError(f"Not Cell Ontology labels: 'x'. {hint}")) == 2
    assert "as they are, pass --no-ontology." in capsys.readouterr().err
    from cellsift.tasks import CellIndex, CellIndexError, KNNAnnotator

    x = np.eye(4, dtype=np.float32)
    unlabelled = pd.DataFrame({"cell_type_ontology_term_id": ["unknown"] * 4})
    with pytest.raises(CellIndexError) as err:
        KNNAnnotator(CellIndex.build(x, unlabelled, engine="exact"), k=2)
    assert _error("annotate", err.value) == 2
    assert capsys.readouterr().err.rstrip().endswith("or pass another --label-key.")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trainer.maxepochs", "2"], "unrecognized arguments: --trainer.maxepochs 2 ("),
        (["--trainer.max_epochs", "x"], "--trainer.max_epochs: 'x' is not valid (expected int"),
        (["--config", "nothere.yaml"], "--config: File does not exist"),
    ],
)
def test_fit_argument_errors_are_one_line(extra, message, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "metric.yaml"
    assert main(["fit", "--config", str(config), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cellsift fit: error: ") and err.count("\n") == 1, err
    assert message in err and err.rstrip().endswith("(cellsift fit --help lists the options).")


def test_a_commands_line_on_stderr_is_one_write(monkeypatch):
    """The error, stop and interrupt lines go to stderr in one write each: under DDP every
    rank says the run's error, and two writes a line (print's text, then its newline)
    from two processes to the shared stderr joined two ranks' lines into one."""
    import io
    import sys

    from cellsift.cli import _error, _interrupted, _stopped
    from cellsift.errors import ConfigError, TrainingInterrupted

    class Writes(io.StringIO):
        def __init__(self):
            super().__init__()
            self.calls = []

        def write(self, text):
            self.calls.append(text)
            return super().write(text)

    for say in (
        lambda: _error("fit", ConfigError("cell 7 holds nan")),
        lambda: _interrupted("convert"),
        lambda: _stopped("fit", TrainingInterrupted("stopped", checkpoint=None, step=3, signal=2)),
    ):
        err = Writes()
        monkeypatch.setattr(sys, "stderr", err)
        say()
        assert len(err.calls) == 1 and err.calls[0].count("\n") == 1, err.calls
        assert err.calls[0].endswith("\n") and err.calls[0].startswith("cellsift ")


def test_fit_names_its_own_options_for_data_that_are_not_counts(tmp_path, capsys):
    """The count check's hint names the options of fit (LightningCLI's keys), not Python's."""
    from cellsift.datasets import synthetic_atlas

    a = synthetic_atlas(300, 50, n_studies=3, path=None, seed=0)
    a.layers["counts"] = a.X.copy()
    a.X = a.X.astype(np.float32)
    a.X.data = np.log1p(a.X.data)
    a.write_h5ad(tmp_path / "logged.h5ad")
    config = Path(__file__).resolve().parents[1] / "configs" / "metric.yaml"
    args = ["--data.init_args.source", str(tmp_path / "logged.h5ad")]
    assert main(["fit", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert "Point --data.init_args.collection_options.layer at raw counts" in err, err
    assert "pass --data.init_args.collection_options.check_counts false if" in err
    assert "layer=" not in err and "check_counts=False" not in err


def test_sigterm_ends_a_command_as_ctrl_c_does(indexed_paths, tmp_path, monkeypatch, capsys):
    """kill, a scheduler's time limit: exit status 143 and no hidden temporary output left
    beside the one being written."""
    import os
    import signal

    import cellsift.data.convert as convert_module

    real = convert_module._obs_chunk

    def chunk_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (the main) thread
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "_obs_chunk", chunk_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out.zarr"
    assert main(["convert", str(indexed_paths["h5ad"]), str(out)]) == 143
    assert "cellsift convert: terminated; no partial output" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the output nor a .out.zarr.tmp-* folder
    assert signal.getsignal(signal.SIGTERM) is before  # restored for whoever called main()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_sigterm_swallowed_by_a_finaliser_still_ends_the_command(
    indexed_paths, tmp_path, monkeypatch, capsys
):
    """A SIGTERM whose exception is raised inside a weakref callback (an HDF5 object closing)
    is printed and dropped by Python: the next chunk ends the command all the same."""
    import os
    import signal
    import weakref

    import cellsift.data.convert as convert_module

    real, calls = convert_module._obs_chunk, []

    def chunk_with_a_swallowed_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:

            def closing() -> None:  # the handler runs in here, and its exception is dropped
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10_000):
                    pass

            class Handle:
                pass

            handle = Handle()
            weakref.finalize(handle, closing)
            del handle
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "_obs_chunk", chunk_with_a_swallowed_sigterm)
    out = tmp_path / "out.h5ad"
    args = ["convert", str(indexed_paths["h5ad"]), str(out), "--chunk-size", "500"]
    assert main(args) == 143
    assert len(calls) == 1  # ended at the next chunk, not after the last (four)
    assert list(tmp_path.iterdir()) == []


def test_an_output_inside_an_input_folder_is_refused(indexed_paths, tmp_path, capsys):
    """--overwrite replaces a file: not one inside the index, bundle or store being read."""
    idx = tmp_path / "index"
    idx.mkdir()
    (idx / "manifest.json").write_text("{}")
    args = ["annotate", "model", str(idx), "d.h5ad", str(idx / "manifest.json")]
    assert main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"is inside the index {idx}, which this command reads" in err
    assert (idx / "manifest.json").read_text() == "{}"
    (tmp_path / "cal.h5ad").write_text("calibration cells")
    cal = ["--calibrate-on", str(tmp_path / "cal.h5ad"), "--overwrite"]
    assert main(["annotate", "model", "index", "d.h5ad", str(tmp_path / "cal.h5ad"), *cal]) == 2
    assert "is the --calibrate-on file, which this command reads" in capsys.readouterr().err
    assert (tmp_path / "cal.h5ad").read_text() == "calibration cells"
    zarr = indexed_paths["zarr"]
    assert main(["convert", str(zarr), str(zarr / "x.h5ad")]) == 2
    assert "is inside the input store" in capsys.readouterr().err
    # the stores a manifest or a glob names, and the library's calls (hunt235: embedded
    # into a shard, which anndata then could not read)
    from cellsift.data.convert import convert
    from cellsift.errors import ConfigError

    shards = convert(indexed_paths["h5ad"], tmp_path / "shards", format="zarr", shard_size=500)
    inside = str(shards / "shard-00000.zarr" / "emb.zarr")
    for data in (shards / "manifest.json", shards / "*.zarr"):
        assert main(["embed", "model", str(data), inside]) == 2
        assert "is inside the input store" in capsys.readouterr().err
    # the folder of a sharded store, however named (review215: by its manifest, taken;
    # review216: by a glob); not a project folder that holds a manifest of its stores
    for data in (shards, shards / "manifest.json", shards / "*.zarr"):
        assert main(["embed", "model", str(data), str(shards / "emb.zarr")]) == 2
        assert f"is inside the input store {shards}" in capsys.readouterr().err
    # shards that are links, in a folder of their own with the manifest (review218)
    linked = tmp_path / "linked"
    linked.mkdir()
    for shard in sorted(shards.glob("shard-*")):
        (linked / shard.name).symlink_to(shard)
    (linked / "manifest.json").write_text((shards / "manifest.json").read_text())
    assert main(["embed", "model", str(linked), str(linked / "emb.zarr")]) == 2
    assert f"is inside the input store {linked}" in capsys.readouterr().err
    project = tmp_path / "project"
    project.mkdir()
    (project / "manifest.json").write_text(json.dumps({"files": [str(indexed_paths["h5ad"])]}))
    for data in (project, project / "manifest.json"):
        assert main(["embed", "model", str(data), str(project / "results" / "emb.zarr")]) == 2
        assert "model is not a bundle directory" in capsys.readouterr().err  # (past the check)
    with pytest.raises(ConfigError, match="is inside the input store"):
        convert(zarr, zarr / "x.h5ad")
    assert (
        not (zarr / "x.h5ad").exists() and not (shards / "shard-00000.zarr" / "emb.zarr").exists()
    )


def test_a_temporary_output_left_by_a_killed_write_is_removed(indexed_paths, tmp_path, caplog):
    """What a write killed outright leaves beside its output is removed by the next write
    of that output, which holds the output's lock (no other process writes it), naming it;
    while another process writes the output, a second write is refused and removes nothing
    of it."""
    import logging
    import subprocess
    import sys

    src, out = str(indexed_paths["h5ad"]), tmp_path / "out.zarr"
    killed = (
        "import os, signal, sys\n"
        "from cellsift.data.convert import convert\n"
        "import cellsift.data.writers as w\n"
        "def die(tmp, *args, **kwargs):\n"
        "    if sys.argv[3] == 'wait':\n"
        "        print('written', flush=True)\n"
        "        sys.stdin.readline()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "w.place_output = die\n"
        "convert(sys.argv[1], sys.argv[2], format='zarr')\n"
    )
    run = subprocess.run([sys.executable, "-c", killed, src, str(out), "die"], check=False)
    assert run.returncode == -9
    (left,) = tmp_path.glob(".out.zarr.tmp-*")
    writer = subprocess.Popen(  # (it removes what the killed one left, then holds the lock)
        [sys.executable, "-c", killed, src, str(out), "wait"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "written\n"
        (writing,) = tmp_path.glob(".out.zarr.tmp-*")
        assert writing != left
        assert main(["convert", src, str(out)]) == 2  # (refused: the writer holds the lock)
        assert writing.exists()
    finally:
        writer.kill()
        writer.wait()
    # and an old output that a replacement moved aside: with nothing at the path, the only
    # copy of it (kept, named); once the path holds an output, what a deletion left (removed)
    (tmp_path / ".out.zarr.old-4567cdef").mkdir()
    with caplog.at_level(logging.WARNING, logger="cellsift"):
        assert main(["convert", src, str(out)]) == 0
    assert f"removing {writing.name}, left by a write that did not finish" in caplog.text
    assert ".out.zarr.old-4567cdef is the output this path held" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.zarr.old-4567cdef", "out.zarr"]
    with caplog.at_level(logging.WARNING, logger="cellsift"):
        assert main(["convert", src, str(out), "--overwrite"]) == 0
    assert "removing .out.zarr.old-4567cdef" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]


def test_a_commands_warnings_print_in_one_line(tmp_path):
    """cellsift's warnings from a command: `cellsift: warning: ...` in one line, not the
    library's file, line number and source line (review)."""
    from cellsift.datasets import indexed_atlas

    a = indexed_atlas(40, 10, path=None)
    a.obsm["X_umap"] = np.zeros((40, 2))
    a.write_h5ad(tmp_path / "full.h5ad")
    done = subprocess.run(
        [sys.executable, "-m", "cellsift.cli", "convert", str(tmp_path / "full.h5ad"),
         str(tmp_path / "full.zarr")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "not carried over" in line]
    assert len(said) == 1 and said[0].startswith("cellsift: warning: "), done.stderr
    assert "convert(" not in done.stderr and ".py:" not in done.stderr


def test_fit_names_its_options_for_study_and_split_keys_the_data_lack(capsys):
    """The data module's fixes for a study_key or split_key that names no column, as
    ``cellsift fit`` spells them: its options, no Python argument left."""
    from cellsift.cli import _error
    from cellsift.data import CellDataModule
    from cellsift.datasets import indexed_atlas
    from cellsift.errors import ConfigError

    adata = indexed_atlas(60, 10, path=None)
    del adata.obs["dataset_id"]
    opt = "--data.init_args"
    for kwargs, want in (
        (
            {},
            f"or {opt}.study_key null for data of one study (then validate on the groups of a "
            f"{opt}.split_key, or pass {opt}.val_fraction 0).",
        ),
        (
            {"study_key": None, "split_key": "batch"},
            f"Pass {opt}.split_key the column of groups "
            f"(e.g. donors) to hold out whole for validation, {opt}.split_key null to hold out "
            f"groups of {opt}.study_key, or {opt}.val_fraction 0 to validate on none.",
        ),
    ):
        with pytest.raises(ConfigError) as err:
            CellDataModule(adata, **kwargs).setup()
        assert _error("fit", err.value) == 2
        said = capsys.readouterr().err
        assert said.rstrip().endswith(want), said
        assert "=" not in said.split("names no obs column", 1)[1].split(". ", 1)[1]


def test_warnings_name_the_command_s_own_way():
    """A warning's hint in Python code reads in the command's words where it has a way of
    its own (cellsift search's --groupby for tl.search_clusters), else as written."""
    import warnings

    from cellsift._warnings import CellsiftWarning
    from cellsift.cli import _warnings_in_one_line

    text = "the query cells look heterogeneous: search the clusters separately (cellsift.tl.search_clusters)."
    for command, want in (
        ("search", "separately (--groupby with an obs column of clusters)."),
        ("annotate", "separately (cellsift.tl.search_clusters)."),
    ):
        with _warnings_in_one_line(command):
            line = warnings.formatwarning(CellsiftWarning(text), CellsiftWarning, "x.py", 1)
        assert line.startswith("cellsift: warning: the query cells") and line.endswith(want + "\n")
