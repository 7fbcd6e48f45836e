"""Triplet mining against a brute-force reference of SCimilarity's selection rules."""

from __future__ import annotations

import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch

from cellsift.losses import TripletLoss, Triplets, mine_triplets, pairwise_distance
from cellsift.losses import triplet as triplet_module
from conftest import TEST_DEVICE, device_available


def _batch(n=120, labels=6, studies=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    y = torch.randint(0, labels, (n,), generator=g)
    y[:4] = -1  # unlabelled cells: never anchors, positives or negatives
    s = torch.randint(0, studies, (n,), generator=g)
    related = torch.eye(labels, dtype=torch.bool)
    related[0, 1] = related[1, 0] = True  # label 1 is an ontology relative of label 0
    y[(s == 2) & (y == 1)] = 2  # study 2 does not use label 1: it cannot tell 0 from 1
    return z, y, s, related


@pytest.fixture(
    params=[
        "compiled",
        "sorted",
        pytest.param(
            "device",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not device_available(), reason=f"needs {TEST_DEVICE}"),
            ],
        ),
    ]
)
def path(request, monkeypatch):
    """The mining paths: on this CPU the compiled kernel and the torch sort that GPUs take,
    and that sort on the accelerator itself (``CELLSIFT_TEST_DEVICE``, default CUDA)."""
    if request.param == "sorted":
        monkeypatch.setattr(triplet_module, "_compiled_path", lambda device: False)
    return request.param


def _device(path):
    return torch.device(TEST_DEVICE if path == "device" else "cpu")


def _generator(path, seed):
    """A generator of the path's device (draws are made where the mining runs)."""
    return torch.Generator(_device(path)).manual_seed(seed)


def _mine(path, z, y, related, s, **kwargs):
    """:func:`mine_triplets` on the path's device (inputs moved there, triplets back on
    the CPU)."""
    dev = _device(path)

    def to(x):
        return x.to(dev) if isinstance(x, torch.Tensor) else x

    t = mine_triplets(to(z), to(y), to(related), to(s), **{k: to(v) for k, v in kwargs.items()})
    cpu = (x.cpu() if x is not None else None for x in (t.d_ap, t.d_an))
    return Triplets(t.anchor.cpu(), t.positive.cpu(), t.negative.cpu(), t.n_pairs, *cpu)


ANCESTOR = torch.zeros(6, 6, dtype=torch.bool)
ANCESTOR[1, 0] = True  # label 0 is an ancestor of label 1


def _reference(z, y, s, related, margin, mode, resolved=False):
    """Per pair, the set of valid negatives (SCimilarity's rules, written as loops; with
    ``resolved``, relatives that a study's labels in the batch tell apart are allowed)."""
    d = pairwise_distance(z).double().numpy()
    y, s, related = y.numpy(), s.numpy(), related.numpy()
    anc = ANCESTOR.numpy()
    # (a cell without a study, -1, uses no label)
    uses = {(int(st), int(lab)) for st, lab in zip(s, y, strict=True) if lab >= 0 and st >= 0}

    def allowed(a, m):
        if not related[y[a], y[m]]:
            return True
        if not resolved or y[a] == y[m]:
            return False
        if anc[y[m], y[a]]:  # m's label is a descendant of a's
            return (s[a], y[m]) in uses
        return anc[y[a], y[m]] and (s[m], y[a]) in uses

    out = {}
    for a in range(len(y)):
        if y[a] < 0:
            continue
        same = [p for p in range(len(y)) if p != a and y[p] == y[a]]
        cross = [p for p in same if s[p] != s[a]]
        for p in cross or same:
            cands = []
            for m in range(len(y)):
                if y[m] < 0 or not allowed(a, m):
                    continue
                loss = d[a, p] - d[a, m] + margin
                if (mode == "semihard" and 0 < loss < margin) or (mode != "semihard" and loss > 0):
                    cands.append(m)
            out[(a, p)] = cands
    return out, d


@pytest.mark.parametrize("studies", ["labelled", "unlabelled-only"])
@pytest.mark.parametrize("resolved", [False, True])
@pytest.mark.parametrize("mode", ["semihard", "hardest", "random"])
@pytest.mark.parametrize("margin", [0.05, 0.3])
def test_selection_satisfies_scimilarity_rules(mode, margin, resolved, studies, path):
    """``studies="unlabelled-only"``: the labelled cells have no study and only cells
    without a label have studies, up to the largest code (a fine-tuning batch of cells
    outside the model's labels): no study uses a label, so no relatives are admitted."""
    z, y, s, related = _batch()
    if studies == "unlabelled-only":
        s = torch.where(y >= 0, -1, torch.arange(len(y)) % 3)
    ref, d = _reference(z, y, s, related, margin, mode, resolved)
    t = _mine(
        path,
        z,
        y,
        related,
        s,
        margin=margin,
        negative=mode,
        generator=_generator(path, 1),
        ancestor_ll=ANCESTOR if resolved else None,
    )
    assert t.n_pairs == len(ref)
    got = {
        (int(a), int(p)): int(m) for a, p, m in zip(t.anchor, t.positive, t.negative, strict=True)
    }
    with_cands = {pair for pair, c in ref.items() if c}
    tol = 1e-6  # float32 distances: boundary cases may differ by an ulp
    near_edge = {
        pair
        for pair in set(got) ^ with_cands
        if any(
            abs(d[pair] - d[pair[0], m] + margin - b) < tol
            for m in range(len(y))
            for b in (0.0, margin)
        )
    }
    assert set(got) ^ with_cands <= near_edge
    assert t.d_ap is not None and t.d_an is not None  # the distances mining compared
    np.testing.assert_allclose(t.d_ap.numpy(), d[t.anchor, t.positive], rtol=0, atol=1e-6)
    np.testing.assert_allclose(t.d_an.numpy(), d[t.anchor, t.negative], rtol=0, atol=1e-6)
    for pair, m in got.items():
        if pair in with_cands:
            assert m in ref[pair] or pair in near_edge
    if mode == "hardest":
        for pair, m in got.items():
            if ref.get(pair):
                nearest = min(ref[pair], key=lambda c: (d[pair[0], c], c))
                assert m == nearest
    relatives = related[y[t.anchor], y[t.negative]] & (y[t.anchor] != y[t.negative])
    # the option, and only it, admits relatives (where studies tell them apart)
    assert bool(relatives.any()) == (resolved and studies == "labelled")
    if resolved:  # never for an anchor of label 0 from study 2, which does not use label 1
        assert not (relatives & (y[t.anchor] == 0) & (s[t.anchor] == 2)).any()


def test_resolved_relatives_need_the_ancestor_matrix():
    with pytest.raises(ValueError, match="ancestor_ll"):
        TripletLoss(relatives="resolved")
    with pytest.raises(ValueError, match="never"):
        TripletLoss(relatives="always")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["semihard", "random"])
def test_choice_is_uniform_over_candidates(mode, path):
    z, y, s, related = _batch(n=60, labels=3, seed=4)
    ref, _ = _reference(z, y, s, related, 0.3, mode)
    pair = max(ref, key=lambda k: len(ref[k]))
    counts: dict[int, int] = {}
    g = _generator(path, 0)
    for _ in range(400):
        t = _mine(path, z, y, related, s, margin=0.3, negative=mode, generator=g)
        hit = ((t.anchor == pair[0]) & (t.positive == pair[1])).nonzero()
        m = int(t.negative[hit[0, 0]])
        counts[m] = counts.get(m, 0) + 1
    assert set(counts) <= set(ref[pair])
    expected = 400 / len(ref[pair])
    chi2 = sum((counts.get(m, 0) - expected) ** 2 / expected for m in ref[pair])
    assert chi2 < 3 * len(ref[pair]) + 30


@pytest.mark.parametrize("mode", ["semihard", "random"])
@pytest.mark.parametrize("tries", [0, 1, 4])
def test_kernel_draws_are_uniform_whatever_the_rejections(mode, tries):
    """The CPU kernel's draw: rejection sampling from the window's bucket run, then, after
    ``tries`` rejections, an exact draw. tries=0 is the exact draw alone; tries=1 falls back
    often. Each gives the same triplets' pairs and, per pair, uniform picks: both for the
    pair with the most candidates and for one with few (the run mostly outside the window)."""
    from cellsift.losses import _mining_cpu

    z, y, s, related = _batch(n=60, labels=3, seed=4)
    ref, _ = _reference(z, y, s, related, 0.3, mode)
    args = (
        pairwise_distance(z).numpy(),
        y.numpy(),
        s.numpy().astype(np.int64),
        related.numpy(),
        np.zeros((0, 0), np.bool_),
        np.zeros((0, 0), np.bool_),
        np.full(len(y), -1, np.int64),
        np.float32(0.3),
    )
    mode_code = {"semihard": _mining_cpu.SEMIHARD, "random": _mining_cpu.RANDOM}[mode]
    few = min((k for k in ref if len(ref[k]) >= 2), key=lambda k: len(ref[k]))
    many = max(ref, key=lambda k: len(ref[k]))
    counts: dict[tuple, dict[int, int]] = {few: {}, many: {}}
    draws = 600
    for seed in range(draws):
        a, p, m, _, _, n_pairs = _mining_cpu.triplets(*args, seed, mode_code, 2, tries)
        got = {(int(i), int(j)): int(k) for i, j, k in zip(a, p, m, strict=True)}
        assert n_pairs == len(ref)
        assert set(got) == {pair for pair, c in ref.items() if c}
        assert all(got[pair] in ref[pair] for pair in got)
        for pair, c in counts.items():
            c[got[pair]] = c.get(got[pair], 0) + 1
    for pair, c in counts.items():
        expected = draws / len(ref[pair])
        chi2 = sum((c.get(k, 0) - expected) ** 2 / expected for k in ref[pair])
        assert chi2 < 3 * len(ref[pair]) + 30, (pair, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("negative", ["random", "semihard", "hardest"])
def test_loss_is_mean_hinge_with_the_formulas_gradient(negative, dtype, path):
    """The cosine loss (its backward one product with the triplets' weights) against
    autograd through the whole distance matrix, for the same triplets; with unnormalised
    rows, and parallel ones (where the relu clips distances at 0, and the normalisation
    leaves no gradient): a positive pair, and a cell and a negative of it."""
    z, y, s, related = _batch()
    z = (z * torch.linspace(0.5, 2.0, len(z))[:, None]).to(dtype)
    z[5], z[7] = z[6] * 3.0, z[8] * 2.0
    y[5], y[6], s[5], s[6] = 3, 3, 0, 1
    y[7], y[8] = 4, 5
    dev = _device(path)
    z, y, s, related = (x.to(dev) for x in (z, y, s, related))
    z = z.requires_grad_(True)
    loss, t = TripletLoss(margin=1.0, negative=negative, related_ll=related)(
        z, y, s, generator=torch.Generator(dev).manual_seed(0)
    )
    assert len(t) > 0 and loss.dtype == dtype
    assert not related[y[t.anchor], y[t.negative]].any()  # no ontology relative as negative
    unit = torch.nn.functional.normalize(z, dim=1)
    d = (1.0 - unit @ unit.T).clamp_min(0.0)
    want = (d[t.anchor, t.positive] - d[t.anchor, t.negative] + 1.0).clamp_min(0).mean()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(loss, want, **tol)
    (got,) = torch.autograd.grad(loss, z)
    (ref,) = torch.autograd.grad(want, z)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(got, ref, **tol)


@pytest.mark.parametrize("n", [7, 300, 301])
def test_cosine_distance_matches_autograd_of_the_formula(n):
    z = torch.randn(n, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    z[1] = z[0] * 2.0  # a pair at distance 0 (as the diagonal): where the relu may clip
    z.requires_grad_(True)
    unit = torch.nn.functional.normalize(z, dim=1)
    want = (1.0 - unit @ unit.T).clamp_min(0.0)
    d = pairwise_distance(z)
    torch.testing.assert_close(d, want, rtol=0, atol=1e-12)
    g = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (got,) = torch.autograd.grad((d * g).sum(), z)
    (ref,) = torch.autograd.grad((want * g).sum(), z)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(pairwise_distance, (z[:12].detach().requires_grad_(),))


def test_no_pairs_gives_zero_loss():
    z = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    loss, t = TripletLoss()(z, torch.arange(5))
    assert len(t) == 0 and float(loss) == 0.0
    np.testing.assert_equal(t.n_pairs, 0)


def test_euclidean_loss_has_finite_gradients():
    z, y, s, related = _batch()
    z = (3 * z).clone().requires_grad_(True)
    d = pairwise_distance(z, "euclidean")
    x = z.detach().double().numpy()
    want = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.testing.assert_allclose(d.detach().numpy(), want, atol=1e-4)
    assert float(d.detach().diagonal().abs().max()) == 0.0
    loss, t = TripletLoss(margin=0.5, distance="euclidean", related_ll=related)(z, y, s)
    loss.backward()
    assert len(t) > 0 and z.grad is not None and bool(torch.isfinite(z.grad).all())


def test_mismatched_inputs_are_refused():
    z, y, s, related = _batch()
    with pytest.raises(ValueError, match="outside related_ll"):
        mine_triplets(z, y, related[:4, :4], s)
    with pytest.raises(ValueError, match="ancestor_ll"):
        mine_triplets(z, y, related, s, ancestor_ll=ANCESTOR[:5, :5])
    with pytest.raises(ValueError, match="dist_nn"):
        mine_triplets(z, y, related, s, dist_nn=pairwise_distance(z)[:, :10])
    below = pairwise_distance(z) - 1e-3  # (the diagonal and duplicates: -0.001)
    with pytest.raises(ValueError, match=r"dist_nn holds negative distances .*clamp_min"):
        mine_triplets(z, y, related, s, dist_nn=below)


@pytest.mark.parametrize("studies", ["given", "some missing", "none"])
def test_both_paths_enumerate_scimilaritys_positive_pairs(studies, path):
    _, y, s, _ = _batch(n=200, labels=5, studies=3, seed=7)
    z = torch.nn.functional.normalize(torch.randn(len(y), 8, generator=torch.Generator()), dim=1)
    y[y == 4] = -1
    y[10] = 4  # a label with one cell: no pair
    if studies == "some missing":
        s[::7] = -1
    study = s if studies != "none" else None
    # cosine distances are at most 2: with a margin of 3 every pair finds a negative
    t = _mine(path, z, y, None, study, margin=3.0, negative="random")
    # brute force: SCimilarity's rule, with a missing study a study of its own
    yn, sn = y.numpy(), (s.numpy() if study is not None else np.zeros(len(y), int))
    want = []
    for i in np.flatnonzero(yn >= 0):
        same = [j for j in range(len(yn)) if j != i and yn[j] == yn[i]]
        cross = [j for j in same if sn[j] != sn[i]]
        want += [(i, j) for j in (cross or same)]
    assert t.n_pairs == len(want)
    assert list(zip(t.anchor.tolist(), t.positive.tolist(), strict=True)) == want


@pytest.mark.parametrize("mode", ["semihard", "hardest", "random"])
def test_a_nan_distance_costs_only_its_own_pairs(mode, path):
    z, y, s, related = _batch()
    d = pairwise_distance(z)
    anchor = int(torch.nonzero(y >= 0)[0])
    mate = int(torch.nonzero((y == y[anchor]) & (torch.arange(len(y)) != anchor))[0])
    d[anchor, mate] = float("nan")
    clean = _mine(path, z, y, related, s, margin=0.3, negative=mode, dist_nn=pairwise_distance(z))
    t = _mine(path, z, y, related, s, margin=0.3, negative=mode, dist_nn=d)
    assert not ((t.anchor == anchor) & (t.positive == mate)).any()
    lost = ((clean.anchor == anchor) & (clean.positive != mate)).sum()
    kept = ((t.anchor == anchor) & (t.positive != mate)).sum()
    assert lost > 0 and kept == lost  # the anchor's other pairs still find negatives
    assert not t.negative.eq(mate).logical_and(t.anchor == anchor).any()


@pytest.mark.parametrize("mode", ["semihard", "random"])
def test_compiled_draws_do_not_depend_on_threads(mode):
    """Pair k's draw is a function of the seed and k: one thread or two, the same triplets."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    z, y, s, related = _batch(n=300, labels=5, seed=3)
    picks = []
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            t = mine_triplets(
                z,
                y,
                related,
                s,
                margin=0.3,
                negative=mode,
                generator=torch.Generator().manual_seed(5),
            )
            picks.append(torch.stack([t.anchor, t.positive, t.negative]))
    finally:
        numba.set_num_threads(before)
    assert picks[0].shape[1] > 0
    assert torch.equal(picks[0], picks[1])


@pytest.mark.parametrize("negative", ["semihard", "hardest", "random"])
def test_nan_distances_cost_only_their_own_candidates_on_both_paths(monkeypatch, negative):
    """A cell with a NaN embedding (and a NaN distance with its sign bit set): the compiled
    CPU kernel and the sorting path of other devices find a negative for the same pairs,
    every one valid by the distances that are numbers."""
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=1)
    y = torch.randint(0, 4, (64,), generator=g)
    z[0] = float("nan")
    d = pairwise_distance(z)
    d[5, 9] = d[9, 5] = torch.tensor(float("nan")).neg()  # (-NaN: a negative key if sorted)
    for t in _on_both_paths(monkeypatch, z, y, d, negative):
        assert not d[t.anchor, t.negative].isnan().any()


def _on_both_paths(monkeypatch, z, y, d, negative):
    """The triplets of the compiled CPU kernel and of the sorting path (other devices')
    for distances ``d``: the same pairs mined, every triplet valid by the distances."""
    kw = {"margin": 0.3, "negative": negative, "dist_nn": d}
    compiled = mine_triplets(z, y, **kw, generator=torch.Generator().manual_seed(1))
    with monkeypatch.context() as m:
        m.setattr(triplet_module, "_compiled_path", lambda device: False)
        sorting = mine_triplets(z, y, **kw, generator=torch.Generator().manual_seed(1))
    assert len(compiled) == len(sorting) > 0 and compiled.n_pairs == sorting.n_pairs
    for t in (compiled, sorting):
        d_ap, d_an = d[t.anchor, t.positive], d[t.anchor, t.negative]
        assert (y[t.negative] != y[t.anchor]).all() and (d_an < d_ap + 0.3).all()
        if negative == "semihard":
            assert (d_an > d_ap).all()
    return compiled, sorting


@pytest.mark.parametrize("negative", ["semihard", "hardest", "random"])
def test_infinite_distances_are_mined_alike_on_both_paths(monkeypatch, negative):
    """A pair infinitely far apart (euclidean distances of overflowing embeddings, or a
    user's dist_nn): its window is unbounded above, which the compiled kernel's buckets
    take as one bucket, and both paths mine the same pairs, every triplet valid."""
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(64, 8, generator=g), dim=1)
    y = torch.randint(0, 4, (64,), generator=g)
    d = pairwise_distance(z)
    a, p = [int(i) for i in torch.nonzero(y == y[0]).ravel()[:2]]
    d[a, p] = d[p, a] = float("inf")  # an anchor-positive pair
    other = int(torch.nonzero(y != y[0]).ravel()[0])
    d[a, other] = d[other, a] = float("inf")  # and a negative
    for t in _on_both_paths(monkeypatch, z, y, d, negative):
        if negative == "random":  # the unbounded pair still gets a negative
            assert ((t.anchor == a) & (t.positive == p)).any()


def test_mining_settings_and_study_codes_are_checked():
    """Study codes of another length or below -1 (the CPU kernel reads them unchecked), a
    related_ll that is not square, and unknown negative / distance names at construction:
    errors naming them."""
    z, y = torch.randn(8, 4), torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    for study in (torch.tensor([0, 1]), torch.tensor([0, 0, 1, 1, -2, 0, 1, 1])):
        with pytest.raises(ValueError, match="study_n must hold one study code"):
            mine_triplets(z, y, study_n=study)
    with pytest.raises(ValueError, match=r"related_ll is \(3, 5\), not labels x labels"):
        mine_triplets(z, y, torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="negative must be one of 'semihard', 'hardest', 'random'"):
        TripletLoss(negative="semi-hard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distance must be one of 'cosine', 'euclidean'"):
        TripletLoss(distance="cos")  # type: ignore[arg-type]
    not_numbers = ("0.05", True, np.True_, torch.tensor(0.05), np.array(0.5), np.complex128(1))
    for margin in (-0.05, float("nan"), *not_numbers):  # a distance, a number (as the model's)
        with pytest.raises(ValueError, match=r"margin must be a number >= 0 \(a distance\)"):
            TripletLoss(margin=margin)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"margin must be a number >= 0 \(a distance\)"):
            mine_triplets(z, y, margin=margin, negative="random")  # type: ignore[arg-type]
    for margin in (0, np.float32(0.05), np.int64(1), float("inf"), Fraction(1, 20), 10**400):
        assert isinstance(TripletLoss(margin=margin).margin, float)  # (as the loss adds it)
        TripletLoss(margin=margin)(z, y)
        mine_triplets(z, y, margin=margin)
    assert TripletLoss(margin=10**400).margin == float("inf")  # (beyond float's range)
    loss = TripletLoss()
    for margin in (-1.0, float("nan"), "0.05"):  # set later: checked as at construction
        with pytest.raises(ValueError, match=r"margin must be a number >= 0 \(a distance\)"):
            loss.margin = margin  # type: ignore[assignment]
    assert loss.margin == 0.05
    # a loss pickled whole when the margin was a plain attribute loads with it
    old = TripletLoss.__new__(TripletLoss)
    old.__setstate__({**{k: v for k, v in loss.__dict__.items() if k != "_margin"}, "margin": 0.2})
    assert old.margin == 0.2 and pickle.loads(pickle.dumps(old)).margin == 0.2


def test_euclidean_distances_of_embeddings_far_from_the_origin_keep_their_precision():
    """Rows far from the origin, close to each other: their distances as float64's cdist
    gives them (|a|^2 + |b|^2 - 2 a.b lost them to rounding: 0.14 off distances of 0.01),
    and a row that is not finite spoils its own distances only."""
    g = torch.Generator().manual_seed(0)
    z = 100 + 0.01 * torch.randn(50, 8, generator=g)
    want = torch.cdist(z.double(), z.double())
    torch.testing.assert_close(pairwise_distance(z, "euclidean").double(), want, atol=2e-5, rtol=0)
    z[3, 1], z[7, 0] = float("nan"), float("inf")
    d = pairwise_distance(z, "euclidean")
    fine = torch.ones(50, dtype=torch.bool)
    fine[[3, 7]] = False
    torch.testing.assert_close(d[fine][:, fine].double(), want[fine][:, fine], atol=2e-5, rtol=0)
    assert bool(d[3, fine].isnan().all()) and not bool(d[7, fine].isfinite().any())


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_half_precision_embeddings_mine_on_float32_distances(distance):
    """Embeddings in bf16 (a CPU autocast's: normalize stays bf16 there) mine and score on
    float32 distances, as the same values in float32 do (bf16 distances are off by up to
    0.009 against a margin of 0.05, and changed 1.2% of hardest picks)."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    x, y = torch.randn(400, 32, generator=g), torch.randint(0, 5, (400,), generator=g)
    loss = TripletLoss(negative="hardest", distance=distance)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = torch.nn.functional.normalize(lin(x), dim=1)
        assert z.dtype == torch.bfloat16
        got, t = loss(z, y)
    want, t32 = loss(z.detach().float(), y)
    mined = mine_triplets(z.detach(), y, negative="hardest", distance=distance)
    for name in ("anchor", "positive", "negative"):
        torch.testing.assert_close(getattr(t, name), getattr(t32, name))
        torch.testing.assert_close(getattr(mined, name), getattr(t32, name))
    torch.testing.assert_close(got, want)
    got.backward()
    assert lin.weight.grad is not None and bool(torch.isfinite(lin.weight.grad).all())


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_a_nan_embedding_spoils_only_its_own_gradient(distance):
    """A row of NaN (no triplet holds it: its distances are NaN): the loss stays finite, and
    the other rows' gradients are those of the batch without it (a 0 x NaN term in the
    backward's products made every row's NaN)."""
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(24, 8, generator=g), torch.randint(0, 4, (24,), generator=g)
    z[3] = float("nan")
    z.requires_grad_(True)
    loss, t = TripletLoss(negative="hardest", distance=distance, margin=0.5)(z, y)
    loss.backward()
    assert bool(torch.isfinite(loss)) and not bool(((t.anchor == 3) | (t.negative == 3)).any())
    rest = torch.arange(24) != 3
    assert z.grad is not None and bool(torch.isfinite(z.grad[rest]).all())
    d = pairwise_distance(z.detach(), distance)
    assert bool(d[3, rest].isnan().all()) and bool(d[rest][:, rest].isfinite().all())


def test_euclidean_distances_stay_in_float32_under_autocast():
    """Mining compares distances within a margin: under bf16 autocast the euclidean distance
    is computed in float32, as the cosine one is."""
    z = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = pairwise_distance(z, "euclidean")
    assert d.dtype == torch.float32
    want = torch.cdist(z.double(), z.double()).float()
    torch.testing.assert_close(d, want, atol=1e-4, rtol=1e-4)


def test_resolved_relatives_without_related_ll_mine_any_batch(path):
    """relatives="resolved" with the default related_ll (the same label only): sized by
    ancestor_ll's labels, so a batch without the highest label mines (it was a 2 x 2
    default against a 4 x 4 ancestor_ll)."""
    anc = torch.zeros(4, 4, dtype=torch.bool)
    anc[1, 0] = anc[2, 0] = anc[3, 1] = True
    loss = TripletLoss(0.5, relatives="resolved", ancestor_ll=anc)
    y, s = torch.tensor([0, 0, 1, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 0, 1])
    value, t = loss(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), y, s)
    assert torch.isfinite(value) and t.n_pairs > 0


def test_a_diagonal_in_ancestor_ll_is_no_relative_of_the_anchor_itself(path):
    """A label is no strict ancestor of itself: a diagonal in ancestor_ll is ignored on
    both paths (the torch path took the anchor's own label, and the anchor, as negative)."""
    anc = torch.zeros(4, 4, dtype=torch.bool)
    anc[1, 0] = anc[2, 0] = anc[3, 1] = True
    anc_d = anc | torch.eye(4, dtype=torch.bool)
    related = anc_d | anc_d.T
    y, s = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    t = mine_triplets(z, y, related, s, margin=5.0, negative="hardest", ancestor_ll=anc_d)
    assert len(t) > 0 and (y[t.negative] != y[t.anchor]).all()
    assert (t.negative != t.anchor).all()


def test_a_mined_triplet_has_a_positive_hinge_as_mining_rounds_it(path):
    """Mining keeps d(a,n) < d(a,p) + margin in float32; the loss's hinge is rounded the
    same way, so no mined triplet's hinge is 0 (d(a,p) - d(a,n) + margin rounded to 0)."""
    d = torch.tensor([[0, 0.035345063, 0.33534506], [0.035345063, 0, 1], [0.33534506, 1, 0]])
    y = torch.tensor([0, 0, 1])
    t = mine_triplets(torch.zeros(3, 1), y, dist_nn=d, margin=0.3, negative="hardest")
    assert len(t) == 1
    assert float((t.d_ap - t.d_an) + 0.3) == 0.0  # (the other rounding's hinge)
    hinge = triplet_module._CosineTripletHinge.apply(
        torch.nn.functional.normalize(torch.randn(3, 2), dim=1),
        t.anchor, t.positive, t.negative, t.d_ap, t.d_an, 0.3,
    )  # fmt: skip
    assert float(hinge) > 0


def test_bad_study_codes_and_related_ll_are_named_on_both_paths(path):
    z, y = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 0, 1])
    with pytest.raises(ValueError, match=r"study_n must hold one study code .* per cell \(6\)"):
        mine_triplets(z, y, study_n=torch.tensor([0, 1, 0]))
    # labels of another count or shape than the cells (hunt266: "dist_nn is (6, 6)", a
    # tensor never passed; on the sort path an IndexError)
    for bad in (torch.tensor([0, 0, 1, 1, 2]), torch.tensor([[0, 0, 1], [1, 2, 2]])):
        with pytest.raises(ValueError, match=r"y_n must hold one label code per cell \(6 cells"):
            mine_triplets(z, bad)
    with pytest.raises(ValueError, match=r"codes down to -3"):
        mine_triplets(z, y, study_n=torch.tensor([0, 1, 0, -3, 0, 1]))
    with pytest.raises(ValueError, match=r"related_ll is \(4,\), not labels x labels"):
        mine_triplets(z, y, torch.ones(4, dtype=torch.bool))
    # a label code below -1 (hunt206: the CPU kernel read its rules outside their table,
    # mining such a cell as a negative, or crashed), also behind TripletLoss
    for low in (-2, -100_000_000):
        bad = torch.tensor([0, 0, 1, low, 0, 1])
        with pytest.raises(ValueError, match=rf"label codes down to {low}: .* -1 for a cell"):
            mine_triplets(z, bad, negative="hardest")
        with pytest.raises(ValueError, match=rf"label codes down to {low}"):
            TripletLoss()(z, bad)


def test_labels_beyond_ancestor_ll_are_named_as_such(path):
    anc = torch.zeros(4, 4, dtype=torch.bool)
    anc[1, 0] = True
    loss = TripletLoss(0.5, relatives="resolved", ancestor_ll=anc)
    y, s = torch.tensor([0, 0, 1, 1, 5, 5, 2, 2]), torch.tensor([0, 1] * 4)
    with pytest.raises(
        ValueError, match=r"ancestor_ll is \(4, 4\): .* codes of the batch \(up to 5\)"
    ):
        loss(torch.randn(8, 3), y, s)
