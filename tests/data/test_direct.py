"""The direct shard reader against zarr's own API."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cellsift.data import CellCollection, open_store
from cellsift.data._direct import ShardedArrayReader, read_ranges
from cellsift.datasets import synthetic_atlas
from cellsift.errors import DataError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards") / "a.zarr"
    arr = zarr.create_array(
        path, shape=(100_003,), dtype=np.float32, chunks=(1_000,), shards=(10_000,), fill_value=7.0
    )
    values = np.random.default_rng(0).poisson(3, 100_003).astype(np.float32)
    arr[:55_000] = values[:55_000]  # shards 6.. and the rest of shard 5 never written
    arr[90_000:] = values[90_000:]
    expected = np.full(100_003, 7.0, dtype=np.float32)
    expected[:55_000] = values[:55_000]
    expected[90_000:] = values[90_000:]
    return path, expected


def test_ranges_match_zarr(sharded):
    from concurrent.futures import ThreadPoolExecutor

    path, expected = sharded
    reader = ShardedArrayReader.open(path)
    assert reader is not None
    rng = np.random.default_rng(1)
    starts = np.sort(rng.integers(0, 100_000, 60))
    ends = np.minimum(starts + rng.integers(0, 5_000, 60), 100_003)
    ends[3] = starts[3]  # an empty range
    with ThreadPoolExecutor(2) as pool:
        (got,) = read_ranges([reader], starts, ends, pool)
    want = np.concatenate([expected[a:b] for a, b in zip(starts, ends, strict=True)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(zarr.open_array(path)[:], expected)


def test_unsharded_arrays_are_left_to_zarr(tmp_path):
    arr = zarr.create_array(tmp_path / "plain.zarr", shape=(10,), dtype=np.int32, chunks=(5,))
    arr[:] = np.arange(10)
    assert ShardedArrayReader.open(tmp_path / "plain.zarr") is None


def test_store_direct_and_zarr_paths_agree(tmp_path):
    path = synthetic_atlas(
        2_500, 300, path=tmp_path / "s.zarr", chunk_elems=4_096, shard_elems=65_536, seed=4
    )
    direct, via_zarr = open_store(path), open_store(path, direct=False)
    assert direct._direct is not None and via_zarr._direct is None
    rng = np.random.default_rng(0)
    for rows in (np.sort(rng.choice(2_500, 300, replace=False)), np.arange(2_500)):
        assert (direct.read(rows) != via_zarr.read(rows)).nnz == 0


def test_corrupt_shard_index_is_detected(tmp_path):
    path = synthetic_atlas(
        500, 100, path=tmp_path / "c.zarr", chunk_elems=1_024, shard_elems=8_192, seed=4
    )
    shard = path / "X" / "data" / "c" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"c/0: shard index fails its checksum"):
        open_store(path).read(np.arange(10))


@pytest.mark.parametrize(
    ("size", "said"),
    [(0, "found: the file is truncated"), (50, "found: the file is truncated"), (700, "checksum")],
)
def test_a_shard_cut_short_is_named(tmp_path, size, said):
    """A shard file shorter than its index (132 bytes here; an interrupted copy: empty, or
    cut) is named as truncated, and one cut past its index as failing the index's
    checksum: a DataError naming the file (an OSError of a negative offset before)."""
    path = synthetic_atlas(
        500, 100, path=tmp_path / "c.zarr", chunk_elems=1_024, shard_elems=8_192, seed=4
    )
    shard = path / "X" / "data" / "c" / "0"
    shard.write_bytes(shard.read_bytes()[:size])
    with pytest.raises(DataError, match=rf"c/0: .*{said}"):
        CellCollection(path).read(np.arange(10))


@pytest.mark.parametrize(
    "layout",
    [
        {},
        {"chunks": (700,)},
        {"chunks": (700,), "compression": "gzip"},
        {"chunks": (700,), "compression": "gzip", "shuffle": True},
    ],
    ids=["contiguous", "chunked", "gzip", "gzip+shuffle"],
)
def test_h5ad_direct_reads_match_h5py(tmp_path, layout):
    import h5py

    adata = synthetic_atlas(800, 120, seed=6)
    path = tmp_path / "layout.h5ad"
    adata.write_h5ad(path)
    with h5py.File(path, "r+") as f:  # rewrite X's arrays in the layout under test
        for name in ("data", "indices"):
            values = f["X"][name][...]
            del f["X"][name]
            f["X"].create_dataset(name, data=values, **layout)
    direct, via_h5py = open_store(path), open_store(path, direct=False)
    assert (direct._direct is not None) == (not layout.get("shuffle"))  # shuffle: h5py reads
    assert via_h5py._direct is None
    rng = np.random.default_rng(2)
    for rows in (np.sort(rng.choice(800, 150, replace=False)), np.arange(800), np.array([799])):
        a, b = direct.read(rows), via_h5py.read(rows)
        assert (a != b).nnz == 0 and (a != adata.X[rows]).nnz == 0


def test_real_gzip_h5ad_reads_directly():
    from cellsift.datasets import shared_data_path

    try:
        path = shared_data_path("kang2018")
    except FileNotFoundError:
        pytest.skip("shared data not present")
    direct, via_h5py = open_store(path), open_store(path, direct=False)
    assert direct._direct is not None
    rows = np.sort(np.random.default_rng(0).choice(direct.n_obs, 500, replace=False))
    assert (direct.read(rows) != via_h5py.read(rows)).nnz == 0
