"""Embeddings stores that a killed run or a damaged disk left: named, never read as data,
and never left with a killed run's temporary files."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from cellsift.cli import main
from cellsift.data import CellCollection
from cellsift.errors import DataError
from cellsift.models import MetricModel
from cellsift.tasks import embed as embed_mod
from cellsift.tasks import embed_collection, load_embeddings


@pytest.fixture(scope="module")
def model(synthetic_h5ad):
    torch.manual_seed(0)  # an untrained model: its weights alone set the embeddings
    return MetricModel.from_collection(synthetic_h5ad, hidden=(32,), latent=8)


@pytest.fixture(scope="module")
def store(model, synthetic_h5ad, tmp_path_factory) -> Path:
    return embed_collection(model, synthetic_h5ad, tmp_path_factory.mktemp("emb") / "emb.zarr")


def _chunk(store: Path) -> Path:
    return next(p for p in (store / "shard-00000" / "c").rglob("*") if p.is_file())


def _overwritten(raw: bytes) -> bytes:
    middle = len(raw) // 2
    return raw[:middle] + bytes(16) + raw[middle + 16 :]


DAMAGES = {
    "shard folder removed": (lambda s: shutil.rmtree(s / "shard-00000"), "shard-00000 is missing"),
    "shard zarr.json removed": (
        lambda s: (s / "shard-00000" / "zarr.json").unlink(),
        "shard-00000 has no zarr.json",
    ),
    "chunk truncated": (
        lambda s: _chunk(s).write_bytes(_chunk(s).read_bytes()[:10]),
        "shard-00000 cannot be read, a chunk is truncated or corrupt",
    ),
    "chunk removed": (lambda s: _chunk(s).unlink(), "shard-00000 lacks 1 of its 1 chunks"),
    "chunk overwritten in its middle": (  # (its size kept: the checksum tells)
        lambda s: _chunk(s).write_bytes(_overwritten(_chunk(s).read_bytes())),
        "shard-00000 cannot be read, a chunk is truncated or corrupt",
    ),
    "metadata removed": (
        lambda s: (s / "metadata.parquet").unlink(),
        r"metadata\.parquet is missing",
    ),
    "metadata truncated": (
        lambda s: (s / "metadata.parquet").write_bytes(b"PAR1 not parquet"),
        r"metadata\.parquet cannot be read",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_store_is_named_with_the_part_and_the_fix(store, tmp_path, capsys, damage):
    do, part = DAMAGES[damage]
    copy = tmp_path / "emb.zarr"
    shutil.copytree(store, copy)
    load_embeddings(copy)  # whole, it reads
    do(copy)
    with pytest.raises(DataError, match=f"{part}.*: the embeddings store is damaged; remove it"):
        load_embeddings(copy)
    # the command line: one line naming the store's part and what to do, no traceback
    assert main(["index", str(copy), str(tmp_path / "index")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cellsift index: error: ") and err.count("\n") == 1, err
    assert str(copy) in err and "embed the cells again (cellsift embed)" in err
    assert not (tmp_path / "index").exists()


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*")]


def test_a_rerun_after_a_kill_leaves_no_temporary_output_in_the_store(
    model, synthetic_h5ad, tmp_path
):
    """What a SIGKILLed run leaves in the staging folder (a half-written shard, a
    metadata file being written, both beside a finished shard) stays out of the store."""
    coll = CellCollection(synthetic_h5ad, genes=model.genes, min_overlap=0.5)
    want = model.embed(ad.read_h5ad(synthetic_h5ad))
    out = tmp_path / "emb.zarr"
    staging = tmp_path / ".emb.zarr.partial-of-1"
    # a half-written shard: rows [0, 700) of its temporary zarr array
    half = staging / ".shard-00000.tmp-0badc0de"
    embed_mod._write_shard(model, coll, half, (0, 700), torch.device("cpu"), 350, False)
    (staging / ".metadata.parquet.tmp-0badc0de").write_bytes(b"PAR1")
    embed_collection(model, synthetic_h5ad, out)
    assert sorted(p.name for p in out.iterdir()) == ["metadata.parquet", "shard-00000", "zarr.json"]
    assert not _hidden(out) and sorted(tmp_path.iterdir()) == [out]
    np.testing.assert_allclose(load_embeddings(out)[0], want, atol=1e-5)
    # a finished shard is kept by a rerun; temporary files beside it stay out all the same
    shard = staging / "shard-00000"
    embed_mod._write_shard(model, coll, shard, (0, coll.n_obs), torch.device("cpu"), 512, False)
    digest = embed_mod._digest(model.fingerprint, coll)
    embed_mod._set_attrs(shard, {"start": 0, "stop": coll.n_obs, "digest": digest})
    shutil.copytree(shard, staging / ".shard-00000.tmp-0badc0de")
    (shard / ".zarr.json.tmp-0badc0de").write_text("{")
    embed_collection(model, synthetic_h5ad, out, overwrite=True)
    assert not _hidden(out) and sorted(tmp_path.iterdir()) == [out]
    np.testing.assert_allclose(load_embeddings(out)[0], want, atol=1e-5)
