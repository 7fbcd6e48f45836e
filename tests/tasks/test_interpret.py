"""explain_difference: exact attributions of a hand-set encoder, completeness, alignment, errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from cellsift._warnings import CellsiftWarning
from cellsift.errors import DataError, GeneAlignmentError
from cellsift.models import MetricModel
from cellsift.tasks import attribute_difference, explain_difference

N_GENES = 30
#: The hand-set encoder reads genes 0-3 only: u = x . W, z = normalize([u, 1]).
W = np.zeros(N_GENES)
W[:4] = [3.0, 2.0, 1.0, -0.5]


def _lognorm(counts: np.ndarray) -> np.ndarray:
    """scanpy's normalize_total(1e4) + log1p, in numpy (float64)."""
    c = counts.astype(np.float64)
    return np.log1p(c / c.sum(1, keepdims=True) * 1e4)


def _adata(counts: np.ndarray, n_a: int) -> ad.AnnData:
    obs = pd.DataFrame(
        {"group": np.where(np.arange(len(counts)) < n_a, "a", "b")},
        index=[f"cell{i}" for i in range(len(counts))],
    )
    var = pd.DataFrame(index=[f"g{i}" for i in range(counts.shape[1])])
    return ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


@pytest.fixture(scope="module")
def linear():
    """A MetricModel whose encoder is set by hand to normalize([x . W, 1]), and data where
    group A expresses genes 0-3 and group B does not."""
    torch.manual_seed(0)
    model = MetricModel(
        [f"g{i}" for i in range(N_GENES)],
        ["CL:0000236"],
        hidden=(4,),
        latent=2,
        dropout=0.0,
        input_dropout=0.0,
    )
    enc = model.module.encoder
    lin1, lin2 = [m for m in enc.modules() if isinstance(m, nn.Linear)]
    (bn,) = [m for m in enc.modules() if isinstance(m, nn.BatchNorm1d)]
    (prelu,) = [m for m in enc.modules() if isinstance(m, nn.PReLU)]
    with torch.no_grad():
        lin1.weight.zero_()
        lin1.weight[0] = torch.as_tensor(W, dtype=torch.float32)
        lin1.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)  # BatchNorm is the identity in eval mode
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        prelu.weight.fill_(1.0)  # PReLU is the identity
        lin2.weight.zero_()
        lin2.weight[0, 0] = 1.0
        lin2.bias.copy_(torch.tensor([0.0, 1.0]))
    rng = np.random.default_rng(0)
    n_a, n_b = 40, 40
    counts = rng.poisson(5.0, size=(n_a + n_b, N_GENES)) + 1
    counts[:n_a, :3] += rng.poisson(20.0, size=(n_a, 3))
    counts[n_a:, :4] = 0
    return model, _adata(counts, n_a)


def _reference_linear(counts: np.ndarray, n_a: int) -> tuple[np.ndarray, np.ndarray]:
    """Closed form: f depends on x only through u = x . W, so attribution_i = W_i x_i / u *
    (f(x) - f(0)). Returns per-cell attributions of A and f(x) - f(0)."""
    x = _lognorm(counts)

    def emb(x_ng: np.ndarray) -> np.ndarray:
        z = np.stack([x_ng @ W, np.ones(len(x_ng))], axis=1)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    c = emb(x[n_a:]).mean(0)
    c /= np.linalg.norm(c)
    xa = x[:n_a]
    f = 1.0 - emb(xa) @ c
    f0 = 1.0 - emb(np.zeros((1, x.shape[1]))) @ c
    u = xa @ W
    return W[None, :] * xa / u[:, None] * (f - f0)[:, None], f - f0


def test_hand_set_encoder_attributions_equal_the_closed_form(linear):
    model, adata = linear
    is_a = (adata.obs["group"] == "a").to_numpy()
    df = explain_difference(model, adata, is_a, ~is_a, n_steps=50)
    ref, gap = _reference_linear(adata.X.toarray(), int(is_a.sum()))

    assert list(df.index[:3]) == ["g0", "g1", "g2"]  # W x ranks them, all positive
    assert df.index[-1] == "g3"  # its negative weight pulls A towards B
    assert (df["attribution"].iloc[3:-1] == 0).all()  # genes the encoder ignores
    expected = pd.Series(ref.mean(0), index=[f"g{i}" for i in range(N_GENES)])
    np.testing.assert_allclose(df["attribution"], expected[df.index], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        df["abs_attribution"], np.abs(ref).mean(0)[[int(g[1:]) for g in df.index]], rtol=1e-4
    )
    np.testing.assert_allclose(
        df.loc[[f"g{i}" for i in range(N_GENES)], "mean_a"],
        _lognorm(adata.X.toarray())[is_a].mean(0),
        rtol=1e-5,
    )
    assert df.attrs["n_cells"] == is_a.sum() and df.attrs["baseline"] == "zeros"
    np.testing.assert_allclose(df.attrs["distance"], gap.mean(), rtol=1e-5)  # f(0) = 0 here


def test_completeness_against_the_model_itself():
    """Each cell's attributions sum to f(x) - f(baseline), f computed here with the encoder
    on numpy-normalised counts and the centroid from MetricModel.embed."""
    torch.manual_seed(1)
    model = MetricModel([f"g{i}" for i in range(50)], ["CL:0000236"], hidden=(32, 16), latent=8)
    rng = np.random.default_rng(1)
    counts = rng.negative_binomial(2, 0.3, size=(60, 50))
    counts[:30, :5] += rng.poisson(15.0, size=(30, 5))
    adata = _adata(counts, 30)
    is_a = (adata.obs["group"] == "a").to_numpy()
    x = torch.from_numpy(_lognorm(counts).astype(np.float32))
    centroid = model.embed(adata[~is_a]).mean(0)
    centroid /= np.linalg.norm(centroid)
    model.module.eval()

    def f(x_ng: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return 1.0 - model.module.encoder(x_ng).numpy() @ centroid

    for baseline, base_g in [
        ("zeros", torch.zeros(50)),
        ("group_b", x[~is_a].mean(0)),
    ]:
        res = attribute_difference(model, adata, is_a, ~is_a, baseline=baseline, n_steps=100)
        expected = f(x[is_a]) - f(base_g[None, :])
        np.testing.assert_allclose(res.distance_n, f(x[is_a]), atol=1e-5)
        np.testing.assert_allclose(res.attributions_ng.sum(1), expected, rtol=0.02, atol=2e-3)
        np.testing.assert_allclose(res.delta_n, res.attributions_ng.sum(1) - expected, atol=2e-4)
        assert list(res.cells) == list(adata.obs_names[is_a])


def test_genes_are_aligned_to_the_model(linear):
    model, adata = linear
    is_a = (adata.obs["group"] == "a").to_numpy()
    ref = explain_difference(model, adata, is_a, ~is_a)
    rng = np.random.default_rng(2)
    extra = ad.AnnData(
        sp.csr_matrix(rng.poisson(1.0, size=(adata.n_obs, 5)).astype(np.float32)),
        obs=adata.obs,
        var=pd.DataFrame(index=[f"other{i}" for i in range(5)]),
    )
    # shuffled genes; five the model lacks (they change the library size, so compare ranks)
    mixed = ad.concat([adata, extra], axis=1, merge="first")
    mixed = mixed[:, rng.permutation(mixed.n_vars)].copy()
    again = explain_difference(model, mixed, is_a, ~is_a)
    assert list(again.index[:3]) == ["g0", "g1", "g2"] and again.index[-1] == "g3"
    shuffled = adata[:, rng.permutation(adata.n_vars)].copy()
    pd.testing.assert_frame_equal(explain_difference(model, shuffled, is_a, ~is_a), ref)

    bad = adata.copy()
    bad.var_names = [f"x{i}" for i in range(bad.n_vars)]
    with pytest.raises(GeneAlignmentError, match="genes match"):
        explain_difference(model, bad, is_a, ~is_a)


def test_groups_by_obs_names_and_subsampling(linear):
    model, adata = linear
    is_a = (adata.obs["group"] == "a").to_numpy()
    by_mask = explain_difference(model, adata, is_a, ~is_a)
    by_name = explain_difference(
        model, adata, adata.obs_names[is_a].tolist(), adata.obs_names[~is_a]
    )
    pd.testing.assert_frame_equal(by_mask, by_name)
    res = attribute_difference(model, adata, is_a, ~is_a, max_cells=7, seed=3)
    assert res.attributions_ng.shape == (7, N_GENES)
    assert set(res.cells) <= set(adata.obs_names[is_a])
    # a boolean Series is read by its index: a comparison on reordered obs (sort_values)
    # selects the cells it names, not those at its positions
    shuffled = adata.obs.iloc[np.random.default_rng(0).permutation(adata.n_obs)]
    by_series = explain_difference(model, adata, shuffled["group"] == "a", shuffled["group"] == "b")
    pd.testing.assert_frame_equal(by_mask, by_series)
    # a flag column of True and False as objects (as a concat leaves one) is a mask too,
    # read by its index; with a missing value, the error says so (not "cells not found")
    flags = pd.Series(list(shuffled["group"] == "a"), index=shuffled.index, dtype=object)
    by_flags = explain_difference(model, adata, flags, ~is_a)
    pd.testing.assert_frame_equal(by_mask, by_flags)
    flags.iloc[0] = None
    with pytest.raises(ValueError, match=r"group_a: the mask has 1 missing values \(None"):
        explain_difference(model, adata, flags, ~is_a)
    foreign = pd.Series(is_a, index=[f"x{i}" for i in range(adata.n_obs)])
    with pytest.raises(ValueError, match="group_a is a Series whose index is not the cells'"):
        explain_difference(model, adata, foreign, ~is_a)


def test_errors(linear):
    from cellsift.errors import ConfigError

    model, adata = linear
    is_a = (adata.obs["group"] == "a").to_numpy()
    # a bundle's path for the model: named, with how to load it (review222: an
    # AttributeError of 'aligned_counts')
    with pytest.raises(TypeError, match=r"not str '/x/bundle': load a saved model first"):
        explain_difference("/x/bundle", adata, is_a, ~is_a)
    with pytest.raises(ValueError, match="group_a is empty"):
        explain_difference(model, adata, np.zeros(adata.n_obs, bool), ~is_a)
    with pytest.raises(ValueError, match="group_b is empty"):
        explain_difference(model, adata, is_a, [])
    with pytest.raises(ValueError, match=r"mask has shape \(10,\) for 80 cells"):
        explain_difference(model, adata, is_a[:10], ~is_a)
    with pytest.raises(KeyError, match="1 cells are not in adata"):
        explain_difference(model, adata, ["cell0", "nope"], ~is_a)
    with pytest.raises(ValueError, match="baseline must be"):
        explain_difference(model, adata, is_a, ~is_a, baseline="ones")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one log-normalised value per model gene"):
        explain_difference(model, adata, is_a, ~is_a, baseline=np.zeros(3))
    nan = np.full(adata.n_vars, np.nan)
    with pytest.raises(ValueError, match=r"baseline holds \d+ values that are not finite"):
        explain_difference(model, adata, is_a, ~is_a, baseline=nan)
    nullable = pd.Series(is_a, dtype="boolean")
    nullable[3] = pd.NA  # (a comparison on a column with missing values gives such a mask)
    with pytest.raises(ValueError, match=r"group_a: the mask has 1 missing values \(<NA>"):
        explain_difference(model, adata, nullable, ~is_a)
    with pytest.raises(ValueError, match="n_steps"):
        explain_difference(model, adata, is_a, ~is_a, n_steps=0)
    for method in ("riemann_left", "riemann_trapezoid"):  # (captum's sums need 2 steps)
        with pytest.raises(ConfigError, match=rf"method '{method}' needs n_steps of at least 2"):
            explain_difference(model, adata, is_a, ~is_a, n_steps=1, method=method)
    # cells without counts in the model's genes: named, as embed names them (in A, each
    # is its own zeros baseline; in B, they pull its centroid to the encoder's output for
    # no expression)
    counts = adata.X.toarray()
    counts[[0, 50]] = 0
    empty = ad.AnnData(sp.csr_matrix(counts), obs=adata.obs, var=adata.var)
    with pytest.raises(DataError, match=r"2 of 80 cells have no counts .*'cell0', 'cell50'"):
        explain_difference(model, empty, is_a, ~is_a)
    cells_with_counts = np.ones(adata.n_obs, bool)
    cells_with_counts[[0, 50]] = False
    with pytest.raises(DataError, match=r"1 of 79 cells have no counts .*\['cell50'\]"):
        explain_difference(model, empty, is_a & cells_with_counts, ~is_a)  # B's only
    explain_difference(model, empty, is_a & cells_with_counts, ~is_a & cells_with_counts)
    for bad in (0, 2.5):
        with pytest.raises(ConfigError, match=f"batch_size must be a whole .* not {bad}"):
            explain_difference(model, adata, is_a, ~is_a, batch_size=bad)
    with pytest.raises(ConfigError, match=r"max_cells must be a whole .* not 2\.5"):
        explain_difference(model, adata, is_a, ~is_a, max_cells=2.5)
    with pytest.raises(ConfigError, match="cuda:64"):  # (a device no machine here has)
        explain_difference(model, adata, is_a, ~is_a, device="cuda:64")
    with pytest.raises(ConfigError, match=r"'simpson' is not an integration rule .* riemann_left"):
        explain_difference(model, adata, is_a, ~is_a, method="simpson")


def test_too_few_steps_warn(linear):
    model, adata = linear
    is_a = (adata.obs["group"] == "a").to_numpy()
    with pytest.warns(CellsiftWarning, match="did not converge"):
        explain_difference(model, adata, is_a, ~is_a, n_steps=1)


def test_only_the_groups_cells_are_read_and_checked(linear, tmp_path):
    """Cells in neither group are not read, nor checked: a value that is no count there
    (in memory or in a backed file) does not stop the attribution, whose results equal
    those without the cell. A group's own such value is refused, and ``check_counts=False``
    (which the message offers) takes it as it is."""
    model, adata = linear
    extra = adata.X.toarray()
    extra = np.vstack([extra, extra[:1] + 0.5])  # one cell more, in neither group
    obs = pd.concat([adata.obs, pd.DataFrame({"group": ["c"]}, index=["odd"])])
    bigger = ad.AnnData(sp.csr_matrix(extra), obs=obs, var=adata.var)
    is_a = (adata.obs["group"] == "a").to_numpy()
    want = attribute_difference(model, adata, is_a, ~is_a)
    path = tmp_path / "bigger.h5ad"
    bigger.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        for data in (bigger, backed):
            got = attribute_difference(
                model, data, data.obs["group"] == "a", data.obs["group"] == "b"
            )
            np.testing.assert_allclose(got.attributions_ng, want.attributions_ng, atol=1e-6)
            assert list(got.cells) == list(want.cells)
    finally:
        backed.file.close()
    in_a = bigger.obs["group"].isin(["a", "c"])
    with pytest.raises(DataError, match="check_counts=False"):
        attribute_difference(model, bigger, in_a, bigger.obs["group"] == "b")
    res = attribute_difference(
        model, bigger, in_a, bigger.obs["group"] == "b", check_counts=False, max_cells=None
    )
    assert res.cells[-1] == "odd"


def test_a_baseline_series_is_read_by_its_genes(linear):
    """A baseline given as a Series (a control's mean expression, from an AnnData of its
    own gene order) is read by its index, not by position (hunt193: values put
    on the wrong genes, unsaid); the model's genes it lacks read as 0, as in the counts."""
    model, adata = linear
    is_a = (adata.obs["group"] == "a").to_numpy()
    values = np.linspace(0.5, 2.0, N_GENES).astype(np.float32)
    genes = [f"g{i}" for i in range(N_GENES)]
    want = attribute_difference(model, adata, is_a, ~is_a, baseline=values)
    reversed_ = pd.Series(values[::-1], index=genes[::-1])
    got = attribute_difference(model, adata, is_a, ~is_a, baseline=reversed_)
    np.testing.assert_array_equal(got.attributions_ng, want.attributions_ng)
    np.testing.assert_array_equal(got.baseline_distance_n, want.baseline_distance_n)
    # genes the model lacks are left out; those it has that the Series lacks read as 0
    partial = pd.Series([*values[:20], 9.0], index=[*genes[:20], "other"])
    zeros_after = np.where(np.arange(N_GENES) < 20, values, 0).astype(np.float32)
    np.testing.assert_array_equal(
        attribute_difference(model, adata, is_a, ~is_a, baseline=partial).attributions_ng,
        attribute_difference(model, adata, is_a, ~is_a, baseline=zeros_after).attributions_ng,
    )
    # (review187: a Series of few of the model's genes was refused as a gene panel)
    few = pd.Series([1.0, 2.0], index=["g1", "g7"])
    two = np.zeros(N_GENES, dtype=np.float32)
    two[[1, 7]] = [1.0, 2.0]
    np.testing.assert_array_equal(
        attribute_difference(model, adata, is_a, ~is_a, baseline=few).attributions_ng,
        attribute_difference(model, adata, is_a, ~is_a, baseline=two).attributions_ng,
    )
    with pytest.raises(GeneAlignmentError, match=r"read by its index .*baseline\.to_numpy\(\)"):
        attribute_difference(model, adata, is_a, ~is_a, baseline=pd.Series([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"names genes twice \('g1'\)"):
        attribute_difference(
            model, adata, is_a, ~is_a, baseline=pd.Series([1.0, 2.0], index=["g1", "g1"])
        )
    with pytest.raises(ValueError, match="the baseline holds 1 values that are not finite"):
        attribute_difference(model, adata, is_a, ~is_a, baseline=reversed_.replace(2.0, np.nan))


def test_a_baseline_series_naming_a_gene_by_its_id_and_its_symbol_is_refused():
    """A Series naming one gene by its Ensembl id and by its symbol, with two values: the
    id's was read, the symbol's dropped, unsaid (hunt232). Names of other genes beside
    the model's still read."""
    from cellsift.data import GeneVocabulary
    from cellsift.tasks.interpret import _baseline

    ids = [f"ENSG{i:011d}" for i in range(6)]
    genes = GeneVocabulary(ids, [f"GENE{i}" for i in range(6)])
    mean_b = np.zeros(6, dtype=np.float32)
    for index in ([ids[1], "GENE1"], ["GENE1", ids[1]], ["GENE1", ids[2], "GENE1x", ids[1]]):
        values = pd.Series(np.arange(len(index), dtype=np.float32) + 1, index=index)
        with pytest.raises(ValueError, match=r"names genes twice, by two names \('"):
            _baseline(values, mean_b, genes)
    got = _baseline(pd.Series([1.0, 2.0, 3.0], index=["GENE1", ids[2], "other"]), mean_b, genes)
    np.testing.assert_array_equal(got.numpy(), [0, 1, 2, 0, 0, 0])


def test_a_float64_model_is_attributed_and_nan_counts_are_said(linear):
    """A model in float64 (module.double(): its embeddings float64) is attributed as in
    float32 (hunt193: a dtype error from the centroid product); counts read unchecked
    that hold NaN give attributions that are not finite: a warning says so (hunt193: an
    all-NaN ranking, unsaid)."""
    import copy
    import warnings

    model, adata = linear
    is_a = (adata.obs["group"] == "a").to_numpy()
    want = attribute_difference(model, adata, is_a, ~is_a)
    wide = copy.deepcopy(model)
    wide.module.double()
    got = attribute_difference(wide, adata, is_a, ~is_a)
    np.testing.assert_allclose(got.attributions_ng, want.attributions_ng, rtol=1e-4, atol=1e-6)
    nan = adata.copy()
    x = nan.X.toarray()
    x[-1, 5] = np.nan  # (a cell of group B: the centroid, and so every distance)
    nan.X = sp.csr_matrix(x)
    with pytest.warns(CellsiftWarning, match=r"40 of 40 cells have .* check_counts=False;"):
        attribute_difference(model, nan, is_a, ~is_a, check_counts=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CellsiftWarning)
        attribute_difference(model, adata, is_a, ~is_a)


def test_a_bfloat16_model_inference_mode_and_a_torch_mask(linear):
    """A bfloat16 model is attributed (hunt260: numpy has no bfloat16, a TypeError once its
    distances were computed); a call inside torch.inference_mode gives the same
    attributions as outside (its inputs took no part in autograd: captum's RuntimeError);
    a torch boolean tensor is a mask (an AttributeError, a torch dtype has no kind)."""
    import copy

    model, adata = linear
    is_a = (adata.obs["group"] == "a").to_numpy()
    want = attribute_difference(model, adata, is_a, ~is_a)
    with torch.inference_mode():
        got = attribute_difference(model, adata, is_a, ~is_a)
    np.testing.assert_array_equal(got.attributions_ng, want.attributions_ng)
    np.testing.assert_array_equal(got.distance_n, want.distance_n)
    masked = attribute_difference(model, adata, torch.as_tensor(is_a), torch.as_tensor(~is_a))
    np.testing.assert_array_equal(masked.attributions_ng, want.attributions_ng)
    # (review228) a sparse mask, a bfloat16 one (numbers: refused as numpy's are)
    sparse = torch.as_tensor(is_a).to_sparse()
    masked = attribute_difference(model, adata, sparse, torch.as_tensor(~is_a))
    np.testing.assert_array_equal(masked.attributions_ng, want.attributions_ng)
    with pytest.raises(ValueError, match=r"group_a"):
        attribute_difference(model, adata, torch.as_tensor(is_a).to(torch.bfloat16), ~is_a)
    # weights made inside inference_mode take no part in autograd: said, not torch's error
    from cellsift.errors import ConfigError

    inferred = copy.deepcopy(model)
    with torch.inference_mode():
        inferred.module.encoder.load_state_dict(
            {k: v.clone() for k, v in model.module.encoder.state_dict().items()}, assign=True
        )
    with pytest.raises(ConfigError, match=r"made inside torch\.inference_mode\(\) .* load the"):
        attribute_difference(inferred, adata, is_a, ~is_a)
    # (review229) a count made there, which no gradient reads, is no reason to refuse
    counted = copy.deepcopy(model)
    (bn,) = [m for m in counted.module.encoder.modules() if isinstance(m, nn.BatchNorm1d)]
    with torch.inference_mode():
        bn.num_batches_tracked = bn.num_batches_tracked.clone()
    assert bn.num_batches_tracked.is_inference()
    got = attribute_difference(counted, adata, is_a, ~is_a)
    np.testing.assert_array_equal(got.attributions_ng, want.attributions_ng)
    half = copy.deepcopy(model)
    half.module.to(torch.bfloat16)
    got = attribute_difference(half, adata, is_a, ~is_a, n_steps=200)
    assert got.distance_n.dtype == np.float32 and got.attributions_ng.dtype == np.float32
    np.testing.assert_allclose(got.distance_n, want.distance_n, atol=0.02)
    # (bfloat16 keeps 8 bits: the ranking's top genes are the closed form's)
    assert list(got.ranked().index[:3]) == list(want.ranked().index[:3])
