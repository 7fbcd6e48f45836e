from __future__ import annotations

import subprocess
import sys

import pytest

from cellsift.cli import main


def test_info(indexed_paths, capsys):
    assert main(["info", str(indexed_paths["soma"])]) == 0
    out = capsys.readouterr().out
    assert "format     soma" in out and "cells      2,000" in out and "dataset_id" in out


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


def test_lightning_messages_print_once(indexed_paths):
    code = (
        "import logging, sys; from cellsift.cli import main; "
        f"main(['info', {str(indexed_paths['h5ad'])!r}]); import lightning.pytorch; "
        "logging.getLogger('lightning.pytorch').info('probe-message')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (run.stdout + run.stderr).count("probe-message") == 1


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
            "4000",
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
    assert "split by 'dataset_id'" in proc.stdout
    assert "ontology-aware calls:" in proc.stdout and "unknown (distance threshold" in proc.stdout
