from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellsift.data import CellCollection, CellLoader, IterableCellDataset
from cellsift.errors import ConfigError, ResumeError
from conftest import N_INDEXED, decode

OPTS = {"batch_size": 64, "block_size": 8, "fetch_factor": 3}


def _epoch(loader) -> list[np.ndarray]:
    out = []
    for batch in loader:
        assert batch["x_ng"].layout == torch.sparse_csr
        np.testing.assert_array_equal(decode(batch), batch["obs_idx_n"].numpy())
        out.append(batch["obs_idx_n"].numpy())
    return out


@pytest.fixture(scope="module")
def coll(indexed_paths):
    return CellCollection(indexed_paths["h5ad"])


@pytest.mark.parametrize("mode", ["sequential", "block"])
def test_every_cell_once_across_2_ranks_x_2_workers(coll, mode):
    seen, per_rank = [], []
    for rank in range(2):
        ds = IterableCellDataset(coll, mode=mode, rank=rank, world_size=2, **OPTS)
        batches = _epoch(CellLoader(ds, num_workers=2))
        assert len(batches) == len(ds)
        per_rank.append(np.concatenate(batches))
        seen.extend(batches)
    allseen = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(allseen), np.arange(N_INDEXED))
    assert not set(per_rank[0]) & set(per_rank[1])
    if mode == "sequential":
        assert np.all(np.diff(per_rank[0]) == 1)


def test_a_dataset_says_what_it_serves(coll):
    ds = IterableCellDataset(coll, mode="block", rank=1, world_size=2, **OPTS)
    ds.epoch = 3
    assert repr(ds) == (
        f"IterableCellDataset({coll.n_obs:,} cells, block mode, batches of "
        f"{OPTS['batch_size']}, epoch 3, rank 1 of 2)"
    )


def test_block_mode_shuffles_contiguous_blocks(coll):
    ds = IterableCellDataset(coll, mode="block", **OPTS)
    first = _epoch(CellLoader(ds))[0]
    assert not np.all(np.diff(first) == 1)  # shuffled within the fetch
    blocks = np.unique(first // 8)
    assert len(blocks) <= OPTS["fetch_factor"] * OPTS["batch_size"] // 8  # from few blocks


def test_drop_last_gives_equal_full_batches(coll):
    sizes = []
    for rank in range(2):
        ds = IterableCellDataset(
            coll, mode="block", rank=rank, world_size=2, drop_last=True, **OPTS
        )
        sizes.append([len(b) for b in _epoch(CellLoader(ds))])
    assert sizes[0] == sizes[1] and set(sizes[0]) == {64}


def test_seeds_are_deterministic_and_epochs_differ(coll):
    def run(seed, epochs=2):
        loader = CellLoader(
            IterableCellDataset(coll, mode="block", seed=seed, **OPTS), num_workers=2
        )
        return [np.concatenate(_epoch(loader)) for _ in range(epochs)]

    a, b, c = run(7), run(7), run(8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], a[1])  # a new order every epoch
    assert not np.array_equal(a[0], c[0])  # and for another seed


@pytest.mark.parametrize(
    ("mode", "workers", "stop"),
    [("block", 2, 5), ("block", 2, 6), ("block", 0, 11), ("weighted", 2, 7), ("sequential", 2, 3)],
)
def test_resume_gives_exactly_the_remaining_batches(coll, mode, workers, stop):
    def make():
        ds = IterableCellDataset(
            coll, mode=mode, seed=3, label_key="cell_type_ontology_term_id", **OPTS
        )
        return CellLoader(ds, num_workers=workers)

    _assert_resume_is_exact(make, stop, epochs=2)


def _assert_resume_is_exact(make, stop: int, epochs: int) -> None:
    """Batches of a loader stopped after ``stop`` and resumed from its state, then run on
    for ``epochs`` epochs in all, equal those of a run never stopped."""
    reference = make()
    full = [b for _ in range(epochs) for b in _epoch(reference)]
    killed = make()
    consumed = []
    for i, batch in enumerate(killed):
        consumed.append(batch["obs_idx_n"].numpy())
        if i + 1 == stop:
            state = killed.state_dict()
            break
    resumed = make()
    resumed.load_state_dict(state)
    got = consumed + [b for _ in range(epochs) for b in _epoch(resumed)]
    assert len(got) == len(full)
    for x, y in zip(got, full, strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_refuses_other_settings(coll):
    loader = CellLoader(IterableCellDataset(coll, mode="block", **OPTS), num_workers=2)
    state = loader.state_dict()
    other = CellLoader(IterableCellDataset(coll, mode="block", seed=1, **OPTS), num_workers=1)
    with pytest.raises(ResumeError, match=r"\(seed: saved 0, now 1\)"):
        other.load_state_dict(state)
    # other cells of the same number (another filter): refused, not resumed past cells of
    # theirs that the saved run never read
    from cellsift.datasets import indexed_atlas

    adata = indexed_atlas(400, 8)
    even, odd = (
        CellCollection(adata, obs_filter=lambda o, r=r: (o["obs_index"] % 2 == r).to_numpy())
        for r in (0, 1)
    )
    state = CellLoader(IterableCellDataset(even, mode="block", **OPTS)).state_dict()
    with pytest.raises(ResumeError, match=r"\(the cells read differ\)"):  # (no "rewritten")
        CellLoader(IterableCellDataset(odd, mode="block", **OPTS)).load_state_dict(state)
    CellLoader(IterableCellDataset(even, mode="block", **OPTS)).load_state_dict(state)


def test_resume_refuses_other_counts_of_the_same_cells(tmp_path):
    """A store rewritten with other counts for the same cells (re-processed, scaled) is not
    the run's data (hunt239: resumed on it, unsaid); the same counts in another format, or
    in a store moved elsewhere, are."""
    from cellsift.data.convert import convert
    from cellsift.datasets import indexed_atlas

    adata = indexed_atlas(400, 8)
    src = tmp_path / "a.h5ad"
    adata.write_h5ad(src)

    def loader(path):
        return CellLoader(IterableCellDataset(CellCollection(path), mode="block", **OPTS))

    state = loader(src).state_dict()
    for same in (convert(src, tmp_path / "a.zarr"), convert(src, tmp_path / "moved.h5ad")):
        loader(same).load_state_dict(state)
    tripled = adata.copy()
    tripled.X = tripled.X * 3
    tripled.write_h5ad(tmp_path / "tripled.h5ad")
    with pytest.raises(ResumeError, match=r"\(the cells' counts \(a store rewritten since\?\)"):
        loader(tmp_path / "tripled.h5ad").load_state_dict(state)


def _read(loader, stop: int | None = None) -> tuple[list[np.ndarray], dict | None]:
    """A loader's batches (cell indices) of one pass, up to ``stop`` of them, and its state
    then (None: read to the end)."""
    out = []
    for batch in loader:
        out.append(batch["obs_idx_n"].numpy())
        if len(out) == stop:
            return out, loader.state_dict()
    return out, None


def _ranks(coll, world: int, workers: int, mode: str = "block", **extra) -> list[CellLoader]:
    """One loader per rank, as a data module makes them for training (drop_last on
    several ranks, no batch of one cell)."""
    return [
        CellLoader(
            IterableCellDataset(
                coll,
                mode=mode,
                rank=rank,
                world_size=world,
                drop_last=world > 1,
                seed=5,
                label_key="cell_type_ontology_term_id",
                **{"min_batch": 2, **OPTS, **extra},
            ),
            num_workers=workers,
        )
        for rank in range(world)
    ]


@pytest.mark.parametrize("mode", ["block", "sequential"])
def test_an_epoch_resumed_on_other_ranks_and_workers_reads_the_cells_left(coll, mode):
    """2 ranks x 2 workers stop after 5 batches; 1 rank without workers goes on and stops
    after 3; 3 ranks x 1 worker read the rest of the epoch. No cell is read twice, every
    cell is read but those the last part's drop_last leaves out (fewer than a batch per
    rank), each loader counts the epoch's batches done as its own (``recounted``), and
    the next epoch is the last loaders' own whole epoch."""
    first = _ranks(coll, 2, 2, mode)
    parts = [_read(loader, 5) for loader in first]
    read = [b for batches, _ in parts for b in batches]
    state = parts[0][1]
    (one,) = _ranks(coll, 1, 0, mode)
    one.load_state_dict(state)
    assert one.recounted == 10  # 2 ranks x 5 batches, as batches of one rank
    # saved before it read a batch (a checkpoint as a validation ends): as much is done
    unread = one.state_dict()
    for loader in _ranks(coll, 3, 1, mode):
        loader.load_state_dict(unread)
        assert loader.recounted == len(loader) - len(_read(loader)[0]) > 0
    batches, state = _read(one, 3)
    read += batches
    assert state["earlier"] == [[2, 2, 5, True]] and state["batches"] == 3
    last = _ranks(coll, 3, 1, mode)
    left = []
    for loader in last:
        loader.load_state_dict(state)
        batches, done = _read(loader)
        assert done is None and loader.recounted == len(loader) - len(batches)
        left.append(batches)
    assert len({len(b) for b in left}) == 1  # (the same number of batches on every rank)
    cells = np.concatenate(read + [b for batches in left for b in batches])
    assert len(np.unique(cells)) == len(cells)
    assert N_INDEXED - 3 * OPTS["batch_size"] < len(cells) <= N_INDEXED
    # the next epoch: a 3-rank epoch, as a fresh loader reads it
    for loader, rank in zip(last, range(3), strict=True):
        fresh = _ranks(coll, 3, 1, mode)[rank]
        fresh.set_epoch(1)
        for x, y in zip(_read(loader)[0], _read(fresh)[0], strict=True):
            np.testing.assert_array_equal(x, y)


def test_a_resume_in_a_replanned_epoch_on_as_many_ranks_is_exact(coll):
    """A state saved in an epoch planned anew, resumed on the ranks and workers that saved
    it, gives exactly the batches the run would have read on."""
    state = _read(_ranks(coll, 2, 0)[0], 4)[1]

    def make():
        (loader,) = _ranks(coll, 1, 2)
        loader.load_state_dict(state)
        return loader

    _assert_resume_is_exact(make, stop=3, epochs=2)


def test_weighted_draws_resumed_on_other_ranks_make_up_the_epoch(coll):
    """Weighted mode draws with replacement: the rest of the epoch is the draws left, drawn
    anew (by other random keys than the first part's)."""
    first = _ranks(coll, 2, 1, "weighted")
    read = [b for loader in first for b in _read(loader, 3)[0]]
    state = first[0].state_dict()
    later = []
    for loader in _ranks(coll, 3, 2, "weighted"):
        loader.load_state_dict(state)
        later += _read(loader)[0]
    n = sum(len(b) for b in read + later)
    assert N_INDEXED - 3 * OPTS["batch_size"] < n <= N_INDEXED
    whole = [b for loader in _ranks(coll, 3, 2, "weighted") for b in _read(loader)[0]]
    assert not any(np.array_equal(a, b) for a in later for b in whole)


def test_a_resume_on_other_ranks_is_refused_where_ranks_read_unequal_shares(coll):
    """Two ranks without drop_last can read different numbers of batches: the state of
    one does not say what the other read."""
    ds = IterableCellDataset(coll, mode="block", rank=0, world_size=2, seed=5, **OPTS)
    state = _read(CellLoader(ds), 2)[1]
    (one,) = _ranks(coll, 1, 0, min_batch=1)
    with pytest.raises(ResumeError, match="2 ranks reading without drop_last"):
        one.load_state_dict(state)
    assert one.cell_dataset.earlier(0) == ()  # (nothing of the refused state kept)
    # an epoch resumed on other ranks again and again: up to 17 parts are kept
    (one,) = _ranks(coll, 1, 0)
    state = _ranks(coll, 2, 0)[0].state_dict()
    state.update(batches=1, earlier=[[1, 1, 1, False]] * 16)
    with pytest.raises(ResumeError, match="an epoch read in 18 parts"):
        one.load_state_dict(state)
    state["earlier"] = state["earlier"][:15]
    one.load_state_dict(state)
    assert len(one.cell_dataset.earlier(0)) == 16


def test_an_epoch_read_whole_and_resumed_on_other_ranks_is_over(coll):
    loader = _ranks(coll, 2, 0)[0]
    batches, _ = _read(loader)
    state = loader.state_dict()
    assert state["batches"] == len(batches)
    (one,) = _ranks(coll, 1, 0)
    one.load_state_dict(state)
    assert one.recounted == len(one)
    fresh = _ranks(coll, 1, 0)[0]
    fresh.set_epoch(1)
    for x, y in zip(_read(one)[0], _read(fresh)[0], strict=True):
        np.testing.assert_array_equal(x, y)


def _scimilarity_weights(labels, studies, class_scale, study_scale, max_ratio=100.0):
    """SCimilarity's balancing, written out per cell: 1/log1p(n_class/cs) * 1/log1p(n_study/ss)."""
    n_class = {v: (labels == v).sum() for v in set(labels)}
    n_study = {v: (studies == v).sum() for v in set(studies)}
    w = np.array(
        [
            1 / np.log1p(n_class[y] / class_scale) / np.log1p(n_study[s] / study_scale)
            for y, s in zip(labels, studies, strict=True)
        ]
    )
    return np.minimum(w, max_ratio * np.median(w))


@pytest.mark.parametrize("class_scale", [1e4, 10.0])
def test_weighted_balancing_scales(coll, class_scale):
    keys = {"label_key": "cell_type_ontology_term_id", "study_key": "dataset_id"}
    ds = IterableCellDataset(coll, mode="weighted", class_scale=class_scale, **keys, **OPTS)
    labels = np.asarray(coll.obs_column(keys["label_key"])).astype(str)
    studies = np.asarray(coll.obs_column(keys["study_key"])).astype(str)
    want = _scimilarity_weights(labels, studies, class_scale, 1e6)
    np.testing.assert_allclose(ds.weights, want, rtol=1e-10)
    # the state of a run records its balancing: a resume with other weights is refused
    state = CellLoader(ds).state_dict()
    other = IterableCellDataset(coll, mode="weighted", class_scale=class_scale * 3, **keys, **OPTS)
    with pytest.raises(ResumeError, match="weights"):
        CellLoader(other).load_state_dict(state)
    CellLoader(ds).load_state_dict(state)


def test_obs_keys_join_the_label_and_study_keys(coll):
    """obs_keys given beside label_key / study_key add batch keys: the labels and studies are
    still y_n / study_n, and still balanced (hunt244: obs_keys replaced them, and weighted
    mode balanced no studies, unsaid); obs_keys naming other columns for those is refused."""
    keys = {"label_key": "cell_type_ontology_term_id", "study_key": "dataset_id"}
    plain = IterableCellDataset(coll, mode="weighted", **keys, **OPTS)
    more = IterableCellDataset(
        coll, mode="weighted", obs_keys={"donor_n": "donor_id"}, **keys, **OPTS
    )
    np.testing.assert_array_equal(more.weights, plain.weights)
    assert more.obs_keys == {
        "donor_n": "donor_id",
        "y_n": keys["label_key"],
        "study_n": "dataset_id",
    }
    batch = next(iter(more))
    assert {"y_n", "study_n", "donor_n"} <= set(batch)
    same = {"y_n": keys["label_key"]}  # (the same column named twice: taken)
    IterableCellDataset(coll, mode="weighted", obs_keys=same, **keys, **OPTS)
    with pytest.raises(ConfigError, match=r"study_key='dataset_id', but obs_keys gives 'study_n'"):
        IterableCellDataset(coll, mode="weighted", obs_keys={"study_n": "donor_id"}, **keys, **OPTS)


def test_unlabelled_cells_count_in_no_study():
    """A study of 1,000 labelled cells among 99,000 unlabelled ones is weighted as a study
    of 1,000 (as SCimilarity, which drops unlabelled cells before weighting): its labelled
    cells weigh as another study's 1,000 of the same labels, and unlabelled cells nothing."""
    from cellsift.data import balanced_weights

    labels = np.concatenate([np.tile([0, 1], 500), np.full(99_000, -1), np.tile([0, 1], 500)])
    studies = np.concatenate([np.zeros(100_000, np.int64), np.ones(1_000, np.int64)])
    w = balanced_weights(labels, studies, study_scale=1e3)
    np.testing.assert_allclose(w[:1_000], w[-1_000:], rtol=1e-12)
    assert (w[1_000:100_000] == 0).all()
    kept = labels >= 0
    want = _scimilarity_weights(labels[kept], studies[kept], 1e4, 1e3)
    np.testing.assert_allclose(w[kept], want, rtol=1e-10)


def test_weighted_draws_follow_the_weights(coll):
    rng = np.random.default_rng(0)
    weights = rng.gamma(0.5, size=coll.n_obs)
    weights[:100] = 0.0
    n = 300_000
    ds = IterableCellDataset(
        coll,
        mode="weighted",
        weights=weights,
        num_samples=n,
        batch_size=500,
        block_size=8,
        cells_per_block=4,
        fetch_factor=4,
    )
    counts = np.zeros(coll.n_obs)
    for batch in CellLoader(ds):
        np.testing.assert_array_equal(decode(batch), batch["obs_idx_n"].numpy())
        np.add.at(counts, batch["obs_idx_n"].numpy(), 1)
    assert counts.sum() == n
    assert counts[:100].sum() == 0
    expected = weights / weights.sum() * n
    # aggregate into 20 groups by weight so each holds many draws: chi-square like check
    order = np.argsort(weights)
    groups = np.array_split(order, 20)
    obs = np.array([counts[g].sum() for g in groups])
    exp = np.array([expected[g].sum() for g in groups])
    nz = exp > 0
    chi2 = (((obs - exp) ** 2)[nz] / exp[nz]).sum()
    assert chi2 < 60  # 19 degrees of freedom; draws within a block add some variance


def test_batch_carries_codes_and_balanced_weights(indexed_paths):
    coll = CellCollection([indexed_paths["h5ad"], indexed_paths["zarr"]])
    ds = IterableCellDataset(
        coll,
        mode="weighted",
        label_key="cell_type_ontology_term_id",
        study_key="dataset_id",
        batch_size=128,
        num_samples=1_024,
    )
    batch = next(iter(CellLoader(ds)))
    assert set(batch) == {"x_ng", "obs_idx_n", "y_n", "study_n"}
    labels = np.asarray(coll.obs_column("cell_type_ontology_term_id"))
    cats = ds.categories["y_n"]
    np.testing.assert_array_equal(
        np.asarray(cats)[batch["y_n"].numpy()], labels[batch["obs_idx_n"].numpy()]
    )
    # the second store encodes its local index: global = local + offset
    local = decode(batch)
    idx = batch["obs_idx_n"].numpy()
    np.testing.assert_array_equal(np.where(idx >= N_INDEXED, idx - N_INDEXED, idx), local)


def test_labels_outside_fixed_categories_are_drawn_as_any_other(coll):
    """A model's label list (fixed categories) codes other labels -1 (unlabelled), but
    weighted mode still balances and draws those cells by their own labels; studies
    outside fixed categories are balanced as their own studies, not as one (hunt188)."""
    key = "cell_type_ontology_term_id"
    opts = {"mode": "weighted", "label_key": key, "study_key": "dataset_id", "num_samples": 4096}
    free = IterableCellDataset(coll, **opts, batch_size=256)
    (known, *_) = free.categories["y_n"]
    fixed = IterableCellDataset(coll, **opts, batch_size=256, categories={"y_n": [known]})
    np.testing.assert_array_equal(fixed.weights, free.weights)
    assert len(free.categories["study_n"]) > 2
    (study, *_) = free.categories["study_n"]
    one = IterableCellDataset(coll, **opts, batch_size=256, categories={"study_n": [study]})
    np.testing.assert_array_equal(one.weights, free.weights)
    drawn = np.concatenate([b["y_n"].numpy() for b in CellLoader(fixed)])
    labels = np.asarray(coll.obs_column(key))
    assert (drawn == -1).sum() > len(drawn) // 2  # every other label
    assert (drawn == 0).sum() > 0 and (labels != known).sum() > 0


def test_filters_keep_obs_idx_global(indexed_paths):
    coll = CellCollection(indexed_paths["h5ad"], obs_filter={"dataset_id": ["study_1"]})
    ds = IterableCellDataset(coll, mode="block", **OPTS)
    idx = np.concatenate(_epoch(CellLoader(ds)))
    studies = np.asarray(CellCollection(indexed_paths["h5ad"]).obs_column("dataset_id"))
    assert set(studies[idx]) == {"study_1"}
    assert len(idx) == (studies == "study_1").sum()


def test_soma_store_through_spawned_workers(indexed_paths):
    coll = CellCollection(indexed_paths["soma"])
    ds = IterableCellDataset(coll, mode="block", **OPTS)
    idx = np.concatenate(_epoch(CellLoader(ds, num_workers=2)))
    np.testing.assert_array_equal(np.sort(idx), np.arange(N_INDEXED))
    # forked workers would hang in TileDB: asked for by name or as a context, refused
    for fork in ("fork", multiprocessing.get_context("fork")):
        with pytest.raises(ConfigError, match="cannot be read by forked loader workers"):
            CellLoader(ds, num_workers=1, multiprocessing_context=fork)


_LEFT_RUNNING = """
import os, signal, sys, time
from cellsift.data import CellCollection, CellLoader, IterableCellDataset

ds = IterableCellDataset(CellCollection(sys.argv[1]), mode="block", batch_size=64, block_size=8)
loader = CellLoader(ds, num_workers=1, multiprocessing_context=sys.argv[2])
batches = iter(loader)
next(batches)
(worker,) = loader._iterator._workers
os.kill(worker.pid, signal.SIGTERM)  # a scheduler's, not the main process's: the worker stays
time.sleep(1)
assert worker.is_alive()
next(batches)
print(worker.pid)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_process_exits_with_its_loader_workers_running(indexed_paths, method):
    """A worker outlives a SIGTERM sent to it (a scheduler signals every process of a job;
    the main process stops the fit after the step) but not its main process: a script that
    ends with a loader's persistent workers running exits, and the workers with it, without
    torch's "DataLoader worker killed by signal" at exit."""
    done = subprocess.run(
        [sys.executable, "-c", _LEFT_RUNNING, str(indexed_paths["h5ad"]), method],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "killed by signal" not in done.stderr  # the workers end cleanly, as torch's do
    assert not Path(f"/proc/{int(done.stdout)}").exists()


def _worker_told_to_end(exiting):
    from cellsift.data.loader import _worker_init

    _worker_init(exiting, exiting, None, 0)
    exiting.value = 1  # the main process is exiting; then multiprocessing's SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)


def test_a_worker_ended_as_its_main_process_exits_ends_cleanly():
    """At exit multiprocessing sends the workers SIGTERM: a worker that died of it made
    torch's handler print "DataLoader worker ... is killed by signal" in most scripts that
    ended with a loader's workers running. It exits with status 0, as torch's workers do."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    exiting = context.RawValue("b", 0)
    worker = context.Process(target=_worker_told_to_end, args=(exiting,))
    worker.start()
    worker.join(30)
    assert worker.exitcode == 0


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_the_workers_of_a_failed_loader_end_with_it(tmp_path, method):
    """An error in a worker (a cell that is no counts) ends the pass; a loader dropped then
    (a failed fit in a notebook) has torch shut its workers down, terminating those that do
    not end when asked. They end then (that SIGTERM is the main process's, not a
    scheduler's, which they ignore), rather than each failure leaving a process behind for
    as long as the session runs."""
    import gc

    import anndata as ad
    import scipy.sparse as sp

    from cellsift.errors import DataError

    x = sp.csr_matrix(np.ones((64, 4), np.float32))
    x.data[100] = np.nan  # cell 25
    ad.AnnData(x).write_h5ad(tmp_path / "nan.h5ad")

    def fail() -> multiprocessing.Process:
        ds = IterableCellDataset(
            CellCollection(tmp_path / "nan.h5ad", check_counts=False), batch_size=16
        )
        ds.collection.check_counts = True  # (the opening sample would have caught it)
        loader = CellLoader(ds, num_workers=1, multiprocessing_context=method)
        with pytest.raises(DataError, match=r"cell 25 \('25'\) holds nan"):
            list(loader)
        (worker,) = loader._iterator._workers
        assert worker.is_alive()  # (persistent: the loader's next pass would use it)
        return worker

    worker = fail()
    gc.collect()
    worker.join(30)
    assert not worker.is_alive()


@pytest.mark.parametrize("mode", ["sequential", "block", "weighted"])
def test_min_batch_leaves_out_a_last_batch_of_one_cell_only(coll, mode):
    """Training loaders never yield one cell alone (BatchNorm cannot normalise it); a last
    batch of 2 or more cells stays. (Block and weighted modes shuffle within each fetch, so
    the last fetch's batches differ once it is a cell shorter.)"""
    extra = {"label_key": "cell_type_ontology_term_id"} if mode == "weighted" else {}
    batch = 333  # 2000 = 6 x 333 + 2; 1999 = 6 x 333 + 1
    for n, last in ((N_INDEXED - 1, 1), (N_INDEXED, 2)):
        sub = coll.subset(np.arange(n))
        plain = IterableCellDataset(sub, mode=mode, batch_size=batch, fetch_factor=2, **extra)
        kept = IterableCellDataset(
            sub, mode=mode, batch_size=batch, fetch_factor=2, min_batch=2, **extra
        )
        a, b = _epoch(CellLoader(plain)), _epoch(CellLoader(kept))
        assert len(a[-1]) == last and len(b) == len(kept)
        sizes = [len(x) for x in a]
        assert [len(x) for x in b] == (sizes[:-1] if last == 1 else sizes)
        for x, y in zip(a[:4], b[:4], strict=True):  # the first two fetches: unchanged
            np.testing.assert_array_equal(x, y)
        if mode != "weighted":  # each cell at most once
            seen = np.concatenate(b)
            assert len(np.unique(seen)) == len(seen) == n - (last == 1)


def test_min_batch_on_several_ranks_needs_drop_last(coll):
    from cellsift.errors import ConfigError

    ds = IterableCellDataset(coll, min_batch=2, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="needs drop_last=True"):
        next(iter(ds))
    kw = {"min_batch": 2, "rank": 0, "world_size": 2, "drop_last": True, "batch_size": 100}
    assert len(IterableCellDataset(coll, **kw)) == 10


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"num_samples": 0}, "num_samples .* must be a whole number >= 1, or None"),
        ({"num_samples": -5}, "num_samples .* not -5"),
        ({"batch_size": 64.0}, "batch_size must be a whole number >= 1, not 64.0"),
        ({"block_size": True}, "block_size must be a whole number >= 1, not True"),
        ({"num_samples": 10, "mode": "block"}, "block mode reads every cell once an epoch"),
        ({"weights": np.ones(2_000), "mode": "block"}, "draw weights of mode='weighted'"),
        ({"weights": np.ones(2_000), "mode": "sequential"}, "and mode is 'sequential'"),
    ],
)
def test_sampling_settings_that_mean_nothing_are_refused(coll, setting, message):
    """num_samples=0 drew a whole epoch and -5 none, silently; a float size failed deep in
    numpy; num_samples outside weighted mode was left unread. Studies as text (one None
    among them) were a TypeError of numpy's sort."""
    from cellsift.data.sampling import balanced_weights
    from cellsift.errors import ConfigError

    opts = {"mode": "weighted", "label_key": "cell_type_ontology_term_id", **setting}
    with pytest.raises(ConfigError, match=message):
        IterableCellDataset(coll, **opts)
    with pytest.raises(ConfigError, match=r"one integer code per cell .*CellCollection\.codes"):
        balanced_weights(np.array(["B cell", "T cell"]))
    with pytest.raises(ConfigError, match="one study per cell: 3 for 2 labels"):
        balanced_weights(np.array([0, 1]), np.array([0, 0, 1]))
    with pytest.raises(ConfigError, match="studies must be one integer code per cell"):
        balanced_weights(np.array([0, 1, 1]), np.array(["a", None, "b"], dtype=object))
    # (hunt251) a 2-D array of studies is named as such ("10 for 10 labels" before)
    with pytest.raises(ConfigError, match=r"not an array of int64 of shape \(10, 2\)"):
        balanced_weights(np.zeros(10, np.int64), np.zeros((10, 2), np.int64))
    # every negative study code is the one missing study, as the docstring says (-1, -2
    # and -3 were three studies of one cell, each weighed the most)
    labels = np.zeros(6, np.int64)
    np.testing.assert_array_equal(
        balanced_weights(labels, np.array([0, 0, 0, -1, -2, -3]), study_scale=1.0),
        balanced_weights(labels, np.array([0, 0, 0, -1, -1, -1]), study_scale=1.0),
    )


@pytest.mark.parametrize("drop_last", [False, True])
def test_the_ranks_draws_add_up_to_num_samples(drop_last):
    """num_samples=10 on 3 ranks drew 4 on each, 12 an epoch, without drop_last; with it,
    every rank draws as many whole batches (those the draws fill on all ranks: none of 10)."""
    from cellsift.data.sampling import EpochPlan, SamplingConfig

    cfg = SamplingConfig(mode="weighted", batch_size=4, num_samples=10, drop_last=drop_last)
    shares = [EpochPlan(cfg, 5, 0, r, 3, np.ones(5)).n_rank for r in range(3)]
    assert shares == ([0, 0, 0] if drop_last else [3, 3, 4])
    cfg = SamplingConfig(mode="weighted", batch_size=4, num_samples=30, drop_last=drop_last)
    shares = [EpochPlan(cfg, 5, 0, r, 3, np.ones(5)).n_rank for r in range(3)]
    assert shares == ([8, 8, 8] if drop_last else [10, 10, 10])


def test_weighted_balancing_cap(coll):
    """max_ratio reaches the weights from the dataset (and the data module); bad scales and
    caps are refused with the setting's name."""
    keys = {"label_key": "cell_type_ontology_term_id", "study_key": "dataset_id"}
    labels = np.asarray(coll.obs_column(keys["label_key"])).astype(str)
    studies = np.asarray(coll.obs_column(keys["study_key"])).astype(str)
    opts = {"class_scale": 1.0, "study_scale": 1.0, **keys, **OPTS}
    uncapped = _scimilarity_weights(labels, studies, 1.0, 1.0, max_ratio=np.inf)
    cap = (1.0 + uncapped.max() / np.median(uncapped)) / 2  # binds on the rarest groups
    assert (uncapped > cap * np.median(uncapped)).any()
    ds = IterableCellDataset(coll, mode="weighted", max_ratio=cap, **opts)
    np.testing.assert_allclose(ds.weights, _scimilarity_weights(labels, studies, 1.0, 1.0, cap))
    for name, value in (("max_ratio", 0.5), ("class_scale", 0.0), ("study_scale", np.nan)):
        with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
            IterableCellDataset(coll, mode="weighted", **{**opts, name: value})


def test_weighted_blocks_of_one_cell_draw_independently(coll):
    """block_size=1 gives independent draws (sampling's docstring): one draw per block, not
    cells_per_block copies of its one cell."""
    weights = np.ones(coll.n_obs)
    ds = IterableCellDataset(
        coll, mode="weighted", weights=weights, num_samples=512, batch_size=512, block_size=1
    )
    batch = next(iter(CellLoader(ds)))
    distinct = len(np.unique(batch["obs_idx_n"].numpy()))
    # 512 uniform draws from n cells: n (1 - (1 - 1/n)^512) distinct on average
    n = coll.n_obs
    expected = n * (1 - (1 - 1 / n) ** 512)
    assert distinct > 0.9 * expected  # (32 copies of each drawn cell gave 512 / 32 = 16)


@pytest.mark.parametrize("stop", [1, 2, 3, 4])
def test_resume_is_exact_when_some_workers_have_no_batches(coll, stop):
    """A small collection with more workers than fetches: the idle workers take no turn, so
    the batches already delivered are not counted as theirs (the resume repeated batches)."""
    small = coll.subset(np.arange(300))  # 2 fetches of 3 x 64 cells for 3 workers

    def make():
        return CellLoader(IterableCellDataset(small, mode="block", seed=3, **OPTS), num_workers=3)

    _assert_resume_is_exact(make, stop, epochs=1)


def test_worker_skips_pass_over_idle_workers():
    from cellsift.data.loader import _worker_skips

    assert _worker_skips([12, 0], 3) == ([3, 0], 0)
    assert _worker_skips([3, 2, 0], 4) == ([2, 2, 0], 0)
    assert _worker_skips([3, 2, 0], 5)[0] == [3, 2, 0]  # (the epoch is over)
    assert _worker_skips([2, 2], 3) == ([2, 1], 1)


def test_weighted_mode_checks_its_weights_as_the_dataset_is_made(coll):
    """Not at the first batch (in a worker: "Caught ValueError in DataLoader worker")."""
    n = coll.n_obs
    bad = {
        "one weight per cell": np.ones(5),
        "finite and >= 0": np.r_[np.ones(n - 1), np.nan],
        "all 0, so weighted mode has no cell": np.zeros(n),
    }
    for message, weights in bad.items():
        with pytest.raises(ConfigError, match=message):
            IterableCellDataset(coll, mode="weighted", weights=weights)
    from cellsift.datasets import indexed_atlas

    adata = indexed_atlas(100, 8)
    adata.obs["cell_type_ontology_term_id"] = None
    with pytest.raises(ConfigError, match=r"no cell has a label in 'cell_type_ontology_term_id'"):
        IterableCellDataset(
            CellCollection(adata), mode="weighted", label_key="cell_type_ontology_term_id"
        )


def test_bad_loader_settings_and_states_are_named(indexed_paths):
    coll = CellCollection(indexed_paths["h5ad"])
    for bad in ({"prefetch": -1}, {"prefetch": 1.5}):
        with pytest.raises(ConfigError, match="prefetch is a number of batches"):
            IterableCellDataset(coll, **OPTS, **bad)
    with pytest.raises(ConfigError, match="world_size is a number of processes"):
        IterableCellDataset(coll, **OPTS, world_size=0)
    with pytest.raises(ConfigError, match="rank is this process's place"):
        IterableCellDataset(coll, **OPTS, rank=2, world_size=2)
    # a rank without a world size takes it from torch.distributed (here none: 1 process)
    with pytest.raises(ConfigError, match=r"rank 1 is not below the world size 1 \(from torch"):
        CellLoader(IterableCellDataset(coll, **OPTS, rank=1)).state_dict()
    assert IterableCellDataset(coll, **OPTS, world_size=3).rank_world == (0, 3)  # (no group)
    shown = repr(IterableCellDataset(coll, **OPTS, rank=1))  # (a repr that does not raise)
    assert "rank 1 of ?" in shown
    loader = CellLoader(IterableCellDataset(coll, **OPTS))
    with pytest.raises(ResumeError, match="not a loader state: it lacks batches, fingerprint"):
        loader.load_state_dict({"epoch": 0})


def test_a_batch_beyond_int32_positions_is_refused_not_wrapped():
    """A batch whose values outnumber int32 positions (2**31) is an error naming the
    batch size, not a row pointer wrapped to negative positions."""
    from types import SimpleNamespace

    from cellsift.data.loader import to_torch_csr

    x = SimpleNamespace(
        indptr=np.array([0, 2**31 + 3]),
        indices=np.zeros(3, np.int32),
        data=np.ones(3, np.float32),
        shape=(1, 60_000),
    )
    with pytest.raises(ConfigError, match=r"2,147,483,651 values.* smaller batch_size"):
        to_torch_csr(x)
    ok = sp.csr_matrix(np.eye(3, dtype=np.float32))
    assert to_torch_csr(ok).crow_indices().tolist() == [0, 1, 2, 3]
