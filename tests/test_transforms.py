from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch

from cellsift.datasets import synthetic_atlas
from cellsift.transforms import Densify, GeneSubset, Log1p, NormalizeTotal, ZScore, default_pipeline


@pytest.fixture(scope="module")
def adata():
    a = synthetic_atlas(400, 150, seed=3)
    x = a.X.tolil()
    x[11, :] = 0  # an empty cell stays zero
    x = x.tocsr()
    x.eliminate_zeros()
    a.X = x
    return a


def _csr(x):
    return torch.sparse_csr_tensor(
        torch.from_numpy(x.indptr).long(),
        torch.from_numpy(x.indices).long(),
        torch.from_numpy(x.data),
        size=x.shape,
    )


@pytest.mark.parametrize("target", [1e4, 1e6])
@pytest.mark.parametrize("sparse", [True, False])
def test_normalize_log1p_match_scanpy(adata, target, sparse):
    ref = sc.pp.normalize_total(adata, target_sum=target, copy=True)
    sc.pp.log1p(ref)
    x = _csr(adata.X) if sparse else torch.from_numpy(adata.X.toarray())
    steps = torch.nn.Sequential(NormalizeTotal(target), Log1p(), Densify())
    out = steps({"x_ng": x, "y_n": torch.zeros(3)})
    np.testing.assert_allclose(out["x_ng"].numpy(), ref.X.toarray(), rtol=1e-5, atol=1e-5)
    assert out["x_ng"][11].abs().sum() == 0
    assert "y_n" in out  # other keys pass through


def test_log1p_of_a_gene_stored_twice_is_of_its_summed_count():
    """A sparse batch storing a gene of a cell twice (or its genes out of order): log1p of
    the summed count, as scipy and the dense batch give; in order and once, as it is."""
    import scipy.sparse as sp

    def repeats() -> sp.csr_matrix:  # (fresh: scipy's log1p sums its matrix's in place)
        values = np.array([1.0, 2.0, 1.0, 4.0, 5.0, 6.0], np.float32)
        return sp.csr_matrix((values, [0, 0, 1, 2, 1, 1], [0, 3, 3, 6]), shape=(3, 3))

    m = repeats()
    steps = torch.nn.Sequential(Log1p(), Densify())
    out = steps({"x_ng": _csr(m)})["x_ng"].numpy()
    np.testing.assert_allclose(out, np.log1p(m.toarray()), rtol=1e-6)
    np.testing.assert_allclose(out, repeats().log1p().toarray(), rtol=1e-6)
    m = repeats()
    x = torch.sparse_csr_tensor(
        *(torch.from_numpy(a) for a in (m.indptr, m.indices, m.data)), m.shape
    )
    y = Log1p()({"x_ng": x})["x_ng"]  # (int32 indices: kept so)
    assert y.col_indices().dtype == torch.int32 and y.crow_indices().dtype == torch.int32
    np.testing.assert_allclose(Densify()({"x_ng": y})["x_ng"].numpy(), out, rtol=1e-6)
    with pytest.raises(ValueError, match="stores a gene of a cell twice and asks for gradients"):
        Log1p()({"x_ng": _csr(repeats()).requires_grad_(True)})
    # genes out of order but each once: log1p of each value, gradients reaching them as
    # torch's own log1p of the values sends them
    grads = []
    for step in (lambda s: Log1p()({"x_ng": s})["x_ng"].values(), lambda s: s.values().log1p()):
        values = torch.tensor([1.0, 3.0], requires_grad=True)
        shuffled = torch.sparse_csr_tensor(
            torch.tensor([0, 2]), torch.tensor([2, 0]), values, (1, 3)
        )
        step(shuffled).sum().backward()
        grads.append(values.grad)
    torch.testing.assert_close(grads[0], grads[1])
    one = repeats()[2:]  # (a batched, 3-d CSR: taken as it is)
    batched = torch.sparse_csr_tensor(
        torch.tensor([one.indptr] * 2),
        torch.tensor([one.indices] * 2),
        torch.tensor([one.data] * 2),
        size=(2, *one.shape),
    )
    torch.testing.assert_close(
        Log1p()({"x_ng": batched})["x_ng"].values(), batched.values().log1p()
    )
    m.sum_duplicates()  # (sorted, once: the batch itself, its values log1p'd)
    x = _csr(m)
    y = Log1p()({"x_ng": x})["x_ng"]
    assert torch.equal(y.col_indices(), x.col_indices())
    torch.testing.assert_close(y.values(), torch.log1p(x.values()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("sparse", [True, False])
def test_counts_held_in_other_types_give_float32_results(adata, dtype, sparse):
    """Counts held as bfloat16 / float16 (exact up to 256 / 2048) or int64: the totals are
    summed in float64 (a bfloat16 sum stops growing at 256), the results are float32."""
    ref = default_pipeline()({"x_ng": _csr(adata.X)})["x_ng"]
    x = _csr(adata.X) if sparse else torch.from_numpy(adata.X.toarray())
    out = default_pipeline()({"x_ng": x.to(dtype)})["x_ng"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("sparse", [True, False])
def test_cells_whose_total_passes_float32s_largest_are_scaled_not_zeroed(adata, sparse):
    """Values near float32's largest: each cell's total overflows float32 (it scaled the
    cell to zeros, as if it were empty); summed in float64, the cell normalises as the same
    pattern of ones does."""
    ones = adata.X.copy()
    ones.data[:] = 1
    huge = ones.copy()
    huge.data[:] = 3e38
    steps = torch.nn.Sequential(NormalizeTotal(), Log1p(), Densify())
    got, want = (
        steps({"x_ng": _csr(x) if sparse else torch.from_numpy(x.toarray())})["x_ng"]
        for x in (huge, ones)
    )
    torch.testing.assert_close(got, want)
    assert int((got.sum(1) > 0).sum()) == adata.n_obs - 1  # (only the empty cell is empty)


def test_a_cell_holding_nan_normalises_to_nan_as_scanpy_does():
    """A NaN total failed "> 0" and the cell was scaled as an empty one (by the target),
    its other values finite and wrong (hunt237); scanpy gives the cell NaN. Its stored
    values NaN, dense or sparse, on torch's steps and the CPU kernel; other cells as
    they were."""
    import anndata as ad
    import scanpy as sc

    x = np.array([[np.nan, 1, 0], [1, 2, 3], [0, 0, 0]], np.float32)
    want = ad.AnnData(x.copy())
    sc.pp.normalize_total(want, target_sum=1e4)
    dense = NormalizeTotal(1e4)({"x_ng": torch.from_numpy(x)})["x_ng"].numpy()
    np.testing.assert_allclose(dense, want.X, rtol=1e-6, equal_nan=True)
    for grad in (False, True):  # (the CPU kernel; torch's steps)
        values = torch.from_numpy(x).to_sparse_csr()
        if grad:
            values = torch.sparse_csr_tensor(
                values.crow_indices(),
                values.col_indices(),
                values.values().requires_grad_(True),
                size=values.shape,
            )
        got = NormalizeTotal(1e4).transform(values).to_dense().detach().numpy()
        assert np.isnan(got[0, :2]).all() and got[0, 2] == 0  # (a value not stored stays 0)
        np.testing.assert_allclose(got[1:], want.X[1:], rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
@pytest.mark.parametrize("index", [torch.int32, torch.int64])
def test_normalize_total_on_the_cpu_gives_what_torch_gives(adata, dtype, index):
    """The CPU kernel (float32 results) against torch's own steps (those a GPU runs), bit for
    bit: each value and index type, an empty cell, a cell of stored zeros, one holding NaN
    (the rest of it scaled as torch scales it), an empty batch; a malformed batch is
    refused, not read outside its values."""
    m = adata.X.copy()
    m.data[m.indptr[5] : m.indptr[6]] = 0  # (stored zeros: a total of 0, left as they are)
    m.data[m.indptr[7]] = np.nan if dtype == torch.float32 else 3

    def csr(crow, col, values, shape):
        return torch.sparse_csr_tensor(crow.to(index), col.to(index), values, size=shape)

    data = torch.from_numpy(m.data).to(dtype)
    x = csr(torch.from_numpy(m.indptr), torch.from_numpy(m.indices), data, m.shape)
    empty = csr(torch.zeros(1), torch.zeros(0), data[:0], (0, m.shape[1]))
    for batch in (x, empty):
        got = NormalizeTotal(1e4).transform(batch)
        assert got.values().dtype == torch.float32 and got.crow_indices().dtype == index
        assert torch.equal(got.col_indices(), batch.col_indices())
        values = batch.values().float().requires_grad_(True)  # (gradients: torch's steps)
        want = NormalizeTotal(1e4).transform(
            csr(batch.crow_indices(), batch.col_indices(), values, batch.shape)
        )
        torch.testing.assert_close(
            got.values(), want.values().detach(), rtol=0, atol=0, equal_nan=True
        )
    assert len(got.values()) == 0


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, "grad"]
)
def test_a_malformed_batch_on_the_cpu_is_refused_by_name(dtype):
    """A CSR batch whose row pointer or column indices do not fit its values (a row
    slice's pointer, a pointer past the values, fewer column indices than values) is
    refused by each transform with its name, whichever path reads it (the kernels, torch's
    own steps for other types or for gradients), not read outside its values (a crash)."""
    grad = dtype == "grad"
    dtype = torch.float32 if grad else dtype
    for crow, col, n_values, problem in (
        ([2, 3, 5], [0, 1, 2, 3, 0], 5, "row pointer from 2 to 5"),
        ([0, 3, 50_000_000], [0, 1, 2, 3, 0], 5, "row pointer from 0 to 50000000"),
        ([0, 1, 50_000_000], [0, 1], 50_000_000, "2 column indices for 50000000 values"),
    ):
        values = torch.ones(n_values, dtype=dtype, requires_grad=grad)
        bad = torch.sparse_csr_tensor(torch.tensor(crow), torch.tensor(col), values, (2, 4))
        for step in (NormalizeTotal(), Log1p(), Densify()):
            with pytest.raises(ValueError, match=f"{type(step).__name__}: a malformed CSR batch"):
                step.transform(bad)
            with pytest.raises(ValueError, match=problem):
                step.transform(bad)
    # hybrid (a value a vector) and batched (3-d) batches too; and column indices outside
    # the matrix where torch's steps write by them (Log1p's sum of repeats, to_dense)
    hybrid = torch.sparse_csr_tensor(
        torch.tensor([0, 2, 100_000_000]), torch.tensor([0, 1, 2]), torch.ones(3, 2, dtype=dtype)
    )
    batched = torch.sparse_csr_tensor(
        torch.tensor([[0, 2, 3], [-1_000_000, 2, 3]]),
        torch.tensor([[0, 1, 2], [0, 1, 2]]),
        torch.ones(2, 3, dtype=dtype),
        (2, 2, 4),
    )
    for bad in (hybrid, batched):
        for step in (NormalizeTotal(), Log1p(), Densify()):
            with pytest.raises(ValueError, match=f"{type(step).__name__}: a malformed CSR batch"):
                step.transform(bad)
    outside = torch.sparse_csr_tensor(  # (out of order in a row: summed by torch)
        torch.tensor([0, 2, 3]), torch.tensor([0, -1, 2]), torch.ones(3, dtype=dtype), (2, 4)
    )
    for step in (Log1p(), Densify()):
        with pytest.raises(ValueError, match="1 column indices outside its 4 columns"):
            step.transform(outside)


def test_normalize_total_takes_cells_by_genes_only():
    """A batch that is not cells x genes (a well-formed batched or hybrid CSR tensor, a 3-d
    dense one) is refused by name: its totals are no cell's (torch's own errors before, or
    sums along the wrong dimension); Log1p and Densify, value by value, take them."""
    dense = torch.tensor([[[1.0, 0, 2], [0, 3, 0]], [[0, 1, 1], [4, 0, 0]]])
    batched = dense.to_sparse_csr()
    hybrid = torch.sparse_csr_tensor(
        torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.tensor([[1.0, 2], [3, 4]]), (2, 3, 2)
    )
    for x, what in ((batched, "batched or hybrid"), (hybrid, "batched or hybrid"), (dense, "")):
        with pytest.raises(ValueError, match=r"NormalizeTotal .* has 3 dimensions") as err:
            NormalizeTotal().transform(x)
        assert ("batched or hybrid" in str(err.value)) == bool(what)
        torch.testing.assert_close(Densify().transform(Log1p().transform(x)), x.to_dense().log1p())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.int64])
@pytest.mark.parametrize("index", [torch.int32, torch.int64])
def test_densify_gives_what_torch_gives(dtype, index):
    """The CPU kernel against torch's own to_dense: unsorted and repeated genes in a row
    (summed), empty rows and an empty batch, each value and index type."""
    crow = torch.tensor([0, 3, 3, 6, 6], dtype=index)
    col = torch.tensor([4, 1, 4, 0, 5, 2], dtype=index)
    values = torch.tensor([1, 2, 3, 4, 5, 6]).to(dtype)
    for x in (
        torch.sparse_csr_tensor(crow, col, values, size=(4, 6)),
        torch.sparse_csr_tensor(crow[:1], col[:0], values[:0], size=(0, 6)),
    ):
        got = Densify().transform(x)
        assert got.dtype == dtype
        torch.testing.assert_close(got, x.to_dense(), rtol=0, atol=0)
    assert Densify().transform(x).shape == (0, 6)
    # a malformed batch (a row slice's pointer, a column outside the matrix): refused
    for crow, col in (([2, 3, 5], [0, 1, 2, 3, 0]), ([0, 1, 2], [-1, 0]), ([0, 1, 2], [4, 0])):
        bad = torch.sparse_csr_tensor(
            torch.tensor(crow), torch.tensor(col), torch.ones(len(col)), size=(2, 4)
        )
        with pytest.raises(ValueError, match="Densify: a malformed CSR batch"):
            Densify().transform(bad)
    no_rows = torch.sparse_csr_tensor(  # (torch builds it; its row pointer is empty)
        torch.tensor([], dtype=torch.int64),
        torch.tensor([], dtype=torch.int64),
        torch.ones(0),
        size=(0, 3),
    )
    with pytest.raises(ValueError, match="a row pointer of 0 entries for 0 rows"):
        Densify().transform(no_rows)


def test_zscore_and_subset(adata):
    x = default_pipeline()({"x_ng": _csr(adata.X)})["x_ng"]
    mean, std = x.mean(0).numpy(), x.std(0).numpy()  # unbiased, as sc.pp.scale
    z = ZScore(mean, std)({"x_ng": x})["x_ng"]
    ref = sc.pp.scale(np.log1p(sc.pp.normalize_total(adata, target_sum=1e4, copy=True).X.toarray()))
    np.testing.assert_allclose(z.numpy(), ref, atol=1e-3)
    sub = GeneSubset([5, 2])({"x_ng": _csr(adata.X)})["x_ng"]
    np.testing.assert_array_equal(sub.numpy(), adata.X.toarray()[:, [5, 2]])
    with pytest.raises(ValueError, match="Densify"):
        ZScore(mean, std)({"x_ng": _csr(adata.X)})
    # (hunt252) a boolean mask keeps the genes it marks (it was read as positions 0 and 1);
    # positions that are no whole numbers, or past the batch's genes, are refused by name
    mask = np.zeros(adata.n_vars, bool)
    mask[[2, 5]] = True
    sub = GeneSubset(mask)({"x_ng": _csr(adata.X)})["x_ng"]
    np.testing.assert_array_equal(sub.numpy(), adata.X.toarray()[:, [2, 5]])
    with pytest.raises(ValueError, match=r"mask marks \d+ genes, and the batch has 3"):
        GeneSubset(mask)({"x_ng": torch.ones(2, 3)})
    with pytest.raises(ValueError, match=r"by position \(whole numbers\) .* holding fractions"):
        GeneSubset([1.7, 3.2])
    # whole numbers as floats, and one position alone, are positions (review224)
    for given in ([5.0, 2.0], np.array([5, 2], np.uint8)):
        sub = GeneSubset(given)({"x_ng": _csr(adata.X)})["x_ng"]
        np.testing.assert_array_equal(sub.numpy(), adata.X.toarray()[:, [5, 2]])
    one = GeneSubset(3)({"x_ng": _csr(adata.X)})["x_ng"]
    np.testing.assert_array_equal(one.numpy(), adata.X.toarray()[:, [3]])
    with pytest.raises(ValueError, match=r"missing values .*mask\.fillna\(False\)"):
        GeneSubset(pd.array([True, None, False], dtype="boolean"))
    with pytest.raises(ValueError, match=r"a cells x genes batch, and this one has shape"):
        GeneSubset([3])({"x_ng": torch.ones(2, 3, 4)})
    # a mask's gene count survives a state_dict (it is no tensor)
    loaded = GeneSubset([0, 1])
    loaded.load_state_dict(GeneSubset(mask).state_dict())
    with pytest.raises(ValueError, match=r"mask marks \d+ genes, and the batch has 6"):
        loaded({"x_ng": torch.ones(2, 6)})
    # a state saved without it (positions only) loads, strictly, and reads its positions
    # (review225: "Missing key(s) _extra_state")
    masked = GeneSubset(mask)  # (a partial load of other modules leaves it as it is)
    masked.load_state_dict({}, strict=False)
    assert masked.n_mask == len(mask)
    older = {"indices": torch.tensor([0, 7])}
    loaded.load_state_dict(older)
    assert loaded.n_mask is None
    with pytest.raises(ValueError, match=r"keeps gene 7, and the batch has 6 genes"):
        loaded({"x_ng": torch.ones(2, 6)})
    with pytest.raises(ValueError, match=r"keeps gene 9, and the batch has 4 genes"):
        GeneSubset([0, 9])({"x_ng": torch.ones(2, 4)})
    with pytest.raises(ValueError, match=r"statistics of \d+ genes, and the batch has shape"):
        ZScore(mean, std)({"x_ng": x[:, :3]})
    # batches that are no dense or CSR tensors are named, with the conversion (a COO batch
    # went through Densify still sparse; a scipy matrix was an AttributeError)
    for given, said in (
        (torch.eye(3).to_sparse_coo(), "a sparse_coo tensor"),
        (torch.eye(3).to_sparse_csc(), "a sparse_csc tensor"),
        (_csr(adata.X).to_dense().numpy(), "ndarray"),
    ):
        for t in (Densify(), NormalizeTotal(), Log1p(), GeneSubset([0])):
            with pytest.raises(TypeError, match=rf"dense or sparse CSR torch tensor, not {said}"):
                t({"x_ng": given})


def test_zscore_keeps_the_precision_of_float64_batches_and_statistics():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 3.0, (50, 7)) + 1e4  # a large mean: float32 statistics lose digits
    mean, std = x.mean(0), x.std(0)
    z = ZScore(mean, std)({"x_ng": torch.from_numpy(x)})["x_ng"]
    assert z.dtype == torch.float64
    np.testing.assert_allclose(z.numpy(), (x - mean) / std, rtol=0, atol=1e-9)
    z32 = ZScore(mean, std)({"x_ng": torch.from_numpy(x).float()})["x_ng"]
    assert z32.dtype == torch.float32
    ints = ZScore(mean, std)({"x_ng": torch.from_numpy(x).long()})["x_ng"]
    assert ints.dtype == torch.float32
    # statistics as tensors (as a streaming scan gives them), float64 kept
    zt = ZScore(torch.from_numpy(mean), torch.from_numpy(std))({"x_ng": torch.from_numpy(x)})
    np.testing.assert_allclose(zt["x_ng"].numpy(), (x - mean) / std, rtol=0, atol=1e-9)
    assert ZScore(torch.zeros(7), torch.ones(7)).mean_g.dtype == torch.float32


@pytest.mark.parametrize("target", [0, -1.0, float("nan"), float("inf"), "1e4", True, 10**400])
def test_normalize_total_refuses_a_target_that_is_not_a_positive_number(target):
    from cellsift.errors import ConfigError

    with pytest.raises(ConfigError, match="target_sum is the counts per cell"):
        NormalizeTotal(target)


def test_transforms_move_with_the_module(adata):
    z = ZScore(np.zeros(150), np.ones(150))
    assert {n for n, _ in z.named_buffers()} == {"mean_g", "std_g"}
    assert z.to(torch.float64).mean_g.dtype == torch.float64
