"""KNNAnnotator: agrees with scikit-learn's kNN, abstains on unseen types, ontology calls."""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import KNeighborsClassifier

from cellsift._warnings import CellsiftWarning
from cellsift.errors import ConfigError
from cellsift.ontology import load_cell_ontology
from cellsift.tasks import UNKNOWN, CellIndex, CellIndexError, KNNAnnotator

TYPES = [
    "CL:0000624",
    "CL:0000625",
    "CL:0000236",
    "CL:0001054",
    "CL:0000623",
]  # CD4, CD8, B, mono, NK


def _atlas(n_per: int = 600, d: int = 16, seed: int = 0, spread: float = 0.35):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(TYPES), d))
    lab = np.repeat(np.arange(len(TYPES)), n_per)
    x = centers[lab] + spread * rng.normal(size=(len(lab), d))
    meta = pd.DataFrame(
        {
            "cell_type_ontology_term_id": np.asarray(TYPES)[lab],
            "study": np.asarray(["a", "b", "c"])[rng.integers(0, 3, len(lab))],
        }
    )
    return x.astype(np.float32), meta, centers


def test_unweighted_votes_match_sklearn_knn():
    x, meta, _ = _atlas()
    ref, qry = np.arange(len(x)) % 4 != 0, np.arange(len(x)) % 4 == 0
    index = CellIndex.build(x[ref], meta[ref], engine="exact")
    ann = KNNAnnotator(index, k=15, weighted=False, min_support=0.0)
    out = ann.annotate(x[qry])
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = meta["cell_type_ontology_term_id"].to_numpy()
    sk = KNeighborsClassifier(15, metric="cosine").fit(xn[ref], y[ref]).predict(xn[qry])
    assert (out["knn_label"].to_numpy() == sk).mean() >= 0.99  # ties may break differently
    assert (out["label"].to_numpy() == y[qry]).mean() >= 0.95
    assert out["label_name"].iloc[0] in load_cell_ontology().names(TYPES)
    assert ((out["confidence"] >= 0) & (out["confidence"] <= 1)).all()


def test_an_even_vote_goes_to_the_first_label_as_in_sklearn():
    """Two neighbours of different labels at the very same distance: the call is the label
    first in sorted order (scikit-learn's rule), whatever numpy's sort does with equal keys."""
    m, labels = 24, np.asarray(list("ABCDEFGH"))
    rng = np.random.default_rng(3)
    pairs = np.stack([rng.choice(len(labels), 2, replace=False) for _ in range(m)])
    eye = np.eye(2 * m, dtype=np.float32)
    # query i's two neighbours: e_i +- e_(m+i) / 2, at one distance from it, far from others
    ref = np.concatenate([eye[:m] + 0.5 * eye[m:], eye[:m] - 0.5 * eye[m:]])
    y = np.concatenate([labels[pairs[:, 0]], labels[pairs[:, 1]]])
    index = CellIndex.build(ref, pd.DataFrame({"lab": y}), engine="exact")
    out = KNNAnnotator(index, label_key="lab", k=2, weighted=False, min_support=0.0).annotate(
        eye[:m]
    )
    first = labels[pairs.min(1)]
    sk = KNeighborsClassifier(2, metric="cosine").fit(ref, y).predict(eye[:m])
    np.testing.assert_array_equal(sk, first)
    np.testing.assert_array_equal(out["knn_label"].to_numpy(), first)
    np.testing.assert_array_equal(out["label"].to_numpy(), first)
    np.testing.assert_allclose(out["confidence"], 0.5)
    # whole-number labels in numeric order, as scikit-learn's (review: as text, 10 before 2)
    numbers = np.asarray([2, 10, 33, 4, 100, 7, 51, 9])
    y = np.concatenate([numbers[pairs[:, 0]], numbers[pairs[:, 1]]])
    index = CellIndex.build(ref, pd.DataFrame({"lab": y}), engine="exact")
    out = KNNAnnotator(index, label_key="lab", k=2, weighted=False, min_support=0.0).annotate(
        eye[:m]
    )
    sk = KNeighborsClassifier(2, metric="cosine").fit(ref, y).predict(eye[:m])
    np.testing.assert_array_equal(out["label"].to_numpy(), sk.astype(str))
    assert (sk != np.asarray(sorted(map(str, numbers)))[0]).any()  # (text order would differ)


def test_categories_no_reference_cell_holds_are_no_labels():
    """A label column filtered with pandas keeps the categories of the cells it dropped
    (doublets): they are no reference labels (review: refused as no Cell Ontology term, or
    counted and offered to a safelist that then selected no cells)."""
    x, meta, _ = _atlas()
    meta = meta.copy()
    col = meta["cell_type_ontology_term_id"].astype(str)
    meta["cell_type_ontology_term_id"] = pd.Categorical(col, categories=[*col.unique(), "doublet"])
    index = CellIndex.build(x, meta, engine="exact")
    ontology = KNNAnnotator(index, k=5)  # (ontology-aware: 'doublet' is no CL term)
    plain = KNNAnnotator(index, k=5, ontology_aware=False)
    assert "doublet" not in plain._labels.terms and len(plain._labels.terms) == col.nunique()
    with pytest.raises(CellIndexError, match="safelist names 1 label that the reference"):
        plain.annotate(x[:3], safelist=["doublet"])
    np.testing.assert_array_equal(
        ontology.annotate(x[:20])["label"],
        KNNAnnotator(CellIndex.build(x, meta.astype(str), engine="exact"), k=5).annotate(x[:20])[
            "label"
        ],
    )


def test_an_ivf_reference_is_searched_at_its_target_recall_for_queries_unlike_it(
    monkeypatch,
):
    """Query cells between the reference's populations: the IVF reference, calibrated on
    its own cells, finds fewer of their neighbours; the annotator calibrates its search on
    the queries, so their votes and distances are (nearly all) the exact search's. A few
    queries are searched exactly."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, 32))
    lab = rng.integers(0, 40, 30_000)
    x = (centers[lab] + 0.6 * rng.normal(size=(len(lab), 32))).astype(np.float32)
    meta = pd.DataFrame({"label": lab.astype(str)})
    ivf = CellIndex.build(x, meta, engine="ivf", k=50)
    exact = CellIndex.build(x, meta, engine="exact")
    pick = np.random.default_rng(5).integers(0, len(x), (2, 3000))
    q = (x[pick[0]] + x[pick[1]]) / 2

    def calls(index: CellIndex, queries: np.ndarray) -> pd.DataFrame:
        return KNNAnnotator(index, label_key="label", ontology_aware=False, k=50).annotate(queries)

    own = dict(ivf.params)
    got, want = calls(ivf, q), calls(exact, q)
    same = np.isclose(got["mean_distance"], want["mean_distance"], rtol=0, atol=1e-6)
    assert same.mean() > 0.7  # (every neighbour found; calibrated on its own cells: 0.41)
    assert (got["label"] == want["label"]).mean() > 0.99
    assert ivf.params == own  # (the index as it was)
    few = calls(ivf, q[:1000])  # (fewer than a calibration costs: exactly)
    pd.testing.assert_frame_equal(few, want.iloc[:1000].reset_index(drop=True))
    # queries like the reference, fewer neighbours than calibrated for, an index set to
    # more lists and candidates than they need: never fewer than the index's own (the
    # candidates follow its calibrated k)
    like = x[pick[0]] + 0.05 * np.random.default_rng(6).normal(size=(3000, 32)).astype(np.float32)
    generous = ivf._searcher()
    generous.params.update(nprobe=4 * own["nprobe"], rerank=4 * own["rerank"])
    searcher, exactly = KNNAnnotator(generous, label_key="label", k=10)._index_for(like)
    assert not exactly and searcher.params["calibrated_k"] == own["calibrated_k"] == 50
    assert searcher.params["nprobe"] == 4 * own["nprobe"]
    assert searcher.params["rerank"] == 4 * own["rerank"]
    wants = ivf._searcher()  # (what they need: no more than the index's own setting)
    assert (
        wants.calibrate(k=50, queries=like) >= 0.99 and wants.params["nprobe"] < 4 * own["nprobe"]
    )
    # a filter whose selection the index searches exactly (here any: 30,000 cells): no
    # calibration of a search it would not make, and the exact search's calls
    calibrations = []
    real = CellIndex.calibrate
    monkeypatch.setattr(
        CellIndex, "calibrate", lambda self, **kw: calibrations.append(kw) or real(self, **kw)
    )
    some = {"label": [str(c) for c in range(20)]}
    got = KNNAnnotator(ivf, label_key="label", ontology_aware=False, k=50).annotate(q, filter=some)
    assert calibrations == []
    exactly = KNNAnnotator(exact, label_key="label", ontology_aware=False, k=50)
    pd.testing.assert_frame_equal(got, exactly.annotate(q, filter=some))
    assert len(calls(ivf, q)) == len(q) and len(calibrations) == 1  # (unfiltered: calibrated)


def test_an_ivf_reference_its_codes_cannot_search_is_searched_exactly(monkeypatch):
    """Queries whose neighbours the 8-bit codes cannot rank, every list probed: searched
    exactly (right, and cheaper), without the index's warning, whose fixes are not the
    annotator's options."""
    from cellsift import tasks

    monkeypatch.setattr(tasks.index, "RERANK_MAX", 2)  # (at most the first factor)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 32))
    lab = rng.integers(0, 8, 3000)
    x = (centers[lab] + 0.02 * rng.normal(size=(3000, 32))).astype(np.float32)
    with pytest.warns(CellsiftWarning, match="short of the 99.0% asked"):
        ivf = CellIndex.build(x, pd.DataFrame({"label": lab.astype(str)}), engine="ivf", k=10)
    q = x[rng.integers(0, 3000, 2000)] + 0.01 * rng.normal(size=(2000, 32)).astype(np.float32)
    annotator = KNNAnnotator(ivf, label_key="label", ontology_aware=False, k=10)
    assert annotator._index_for(q) == (ivf, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CellsiftWarning)
        got = annotator.annotate(q)
    exact = CellIndex.build(x, pd.DataFrame({"label": lab.astype(str)}), engine="exact")
    want = KNNAnnotator(exact, label_key="label", ontology_aware=False, k=10).annotate(q)
    pd.testing.assert_frame_equal(got, want)


def test_unseen_type_abstains_and_seen_types_do_not():
    x, meta, _ = _atlas(spread=0.3)
    y = meta["cell_type_ontology_term_id"].to_numpy()
    held = "CL:0000236"  # B cells are absent from the reference
    half = np.arange(len(x)) % 2 == 0
    ref = half & (y != held)
    index = CellIndex.build(x[ref], meta[ref], engine="exact")
    ann = KNNAnnotator(index, k=30)
    assert "no abstention" in repr(ann)
    thr = ann.calibrate(quantile=0.99)
    n_types = len(set(y[ref]))
    assert repr(ann) == (
        f"KNNAnnotator(k=30, {n_types} labels in 'cell_type_ontology_term_id' of "
        f"{ref.sum():,} cells, plain votes, unknown beyond {thr:.4g} (mean distance))"
    )
    out = ann.annotate(x[~half])
    yq = y[~half]
    assert (out["label"][yq == held] == UNKNOWN).mean() >= 0.8
    assert (out["label"][yq != held] == UNKNOWN).mean() <= 0.05


def test_ontology_mode_calls_the_common_ancestor_of_split_votes():
    """A population that studies label half CD4, half CD8 T: its cells get the common ancestor."""
    cl = load_cell_ontology()
    x, meta, _ = _atlas()
    rng = np.random.default_rng(3)
    center = rng.normal(size=x.shape[1])
    mixed = (center + 0.3 * rng.normal(size=(400, x.shape[1]))).astype(np.float32)
    mixed_meta = pd.DataFrame(
        {
            "cell_type_ontology_term_id": np.where(np.arange(400) % 2 == 0, TYPES[0], TYPES[1]),
            "study": "d",
        }
    )
    index = CellIndex.build(np.vstack([x, mixed]), pd.concat([meta, mixed_meta]), engine="exact")
    ann = KNNAnnotator(index, k=50, ontology_aware=True, min_support=0.7)
    query = (center + 0.3 * rng.normal(size=(50, x.shape[1]))).astype(np.float32)
    out = ann.annotate(query)
    common = set(cl.ancestors("CL:0000624")) & set(cl.ancestors("CL:0000625"))
    assert set(out["label"]) <= common, set(out["label"])
    # the most specific common ancestor, not a vaguer one
    assert set(out["label"]) == {_most_specific(cl, common)}
    # plain majority voting picks one of the subtypes instead
    plain = KNNAnnotator(index, k=50, min_support=0.0).annotate(query)
    assert set(plain["label"]) <= {TYPES[0], TYPES[1]}
    # well inside the CD4 cluster the call stays the leaf
    assert (ann.annotate(x[:50])["label"] == TYPES[0]).all()


@pytest.mark.parametrize("min_support", [0.2, 0.3, 0.5])
def test_ontology_calls_are_the_best_supported_of_the_most_specific_terms(min_support):
    """Against a per-query reading of the rule: votes count for a term's ancestors; of the
    terms with more than min_support of them, those none of whose descendants also has, and
    of those the most supported (several lineages qualify below a half: not the one that
    happens to have more ancestors in the ontology)."""
    cl = load_cell_ontology()
    rng = np.random.default_rng(5)
    labels = [*TYPES, "CL:0000084", "CL:0000576", "CL:0000542"]  # + T cell, monocyte, lymphocyte
    x = rng.normal(size=(600, 3)).astype(np.float32)
    y = np.asarray(labels)[rng.integers(0, len(labels), len(x))]
    index = CellIndex.build(x, pd.DataFrame({"cell_type_ontology_term_id": y}), engine="exact")
    k = 10  # (ties at min_support: 2, 3 or 5 votes of 10 are no more than it)
    ann = KNNAnnotator(index, k=k, weighted=False, ontology_aware=True, min_support=min_support)
    q = rng.normal(size=(300, 3)).astype(np.float32)
    out = ann.annotate(q)
    hits = index.search(q, k, exact=True).indices
    up = {t: {t} | set(cl.ancestors(t)) for t in labels}
    at_least = Fraction(str(min_support))  # exact: votes are counted, not summed as floats
    for row, call, conf in zip(hits, out["label"], out["confidence"], strict=True):
        support: dict[str, Fraction] = {}
        for t in y[row]:
            for a in up[t]:
                support[a] = support.get(a, Fraction(0)) + Fraction(1, k)
        ok = {t for t, v in support.items() if v > at_least}
        finest = [t for t in ok if not any(t in set(cl.ancestors(u)) - {u} for u in ok)]
        if not finest:
            assert call == UNKNOWN
            continue
        best = max(support[t] for t in finest)
        assert call in {t for t in finest if support[t] == best}, (call, finest)
        assert np.isclose(conf, float(best), atol=1e-6)


def _most_specific(cl, terms: set[str]) -> str:
    return max(terms, key=lambda t: len(set(cl.ancestors(t)) & terms))


def test_blocklist_and_safelist_restrict_the_reference():
    x, meta, _ = _atlas()
    index = CellIndex.build(x, meta, engine="exact")
    ann = KNNAnnotator(index, k=15)
    out = ann.annotate(x[:200], blocklist=["CL:0000624"])  # CD4 cells, CD4 blocked
    assert "CL:0000624" not in set(out["knn_label"])
    out = ann.annotate(x[:200], safelist=["CL:0000236", "CL:0000623"])
    assert set(out["knn_label"]) <= {"CL:0000236", "CL:0000623"}
    with pytest.raises(CellIndexError, match=r"safelist names 1 label .* not hold: 'CL:9999999'"):
        ann.annotate(x[:5], safelist=["CL:9999999"])
    with pytest.raises(CellIndexError, match=r"blocklist names 1 label .*'CD4-positive"):
        ann.annotate(x[:5], blocklist=["CD4-positive, alpha-beta T cell"])  # a name, not an id
    with pytest.raises(TypeError, match=r"blocklist=\['CL:0000624'\]"):
        ann.annotate(x[:5], blocklist="CL:0000624")


def test_ontology_mode_lists_name_terms_as_the_reference_does():
    """Reference labels by name (some by id): the lists may use ids or names; unlabelled
    reference cells stay neighbours under a blocklist."""
    x, meta, _ = _atlas()
    cl = load_cell_ontology()
    names = meta["cell_type_ontology_term_id"].map(cl.name).astype(object)
    names[meta["cell_type_ontology_term_id"] == "CL:0000236"] = "CL:0000236"  # B cells by id
    names[:50] = None  # unlabelled
    index = CellIndex.build(x, meta.assign(cell_type_ontology_term_id=names), engine="exact")
    ann = KNNAnnotator(index, k=15, ontology_aware=True)
    out = ann.annotate(x[:200], blocklist=["CL:0000624"])  # CD4 cells, CD4 blocked
    assert "CL:0000624" not in set(out["knn_label"]) and len(out) == 200
    plain = ann.annotate(x[:50], blocklist=["B cell"])  # cells without labels still found
    assert (plain["min_distance"] < 1e-5).all()
    out = ann.annotate(x[:600], safelist=["B cell", "natural killer cell"])
    assert set(out["knn_label"]) <= {"CL:0000236", "CL:0000623"}
    with pytest.raises(Exception, match="safelist: 1 label is not a Cell Ontology term"):
        ann.annotate(x[:5], safelist=["B-cell-ish"])
    with pytest.raises(CellIndexError, match="does not hold: 'T cell'"):
        ann.annotate(x[:5], blocklist=["T cell"])  # a term, but no reference cell has it


def test_whole_number_labels_with_missing_values_stay_whole():
    x, meta, _ = _atlas()
    codes = pd.array(pd.factorize(meta["cell_type_ontology_term_id"])[0], dtype="Int64")
    codes[:20] = pd.NA
    index = CellIndex.build(x, meta.assign(code=codes), engine="exact")
    out = KNNAnnotator(index, label_key="code", k=15).annotate(x[::50])
    assert set(out["knn_label"]) <= {str(c) for c in range(len(TYPES))}
    # ... and so do those of a float column, as pandas holds ints with NaN (review: "1.0")
    floats = codes.to_numpy(dtype="float64", na_value=np.nan)
    index = CellIndex.build(x, meta.assign(code=floats), engine="exact")
    again = KNNAnnotator(index, label_key="code", k=15).annotate(x[::50])
    pd.testing.assert_series_equal(again["knn_label"], out["knn_label"])
    # lists of the column's own values name its labels as their text does (review: "0.0")
    ann = KNNAnnotator(index, label_key="code", k=15)
    for given in ([0.0, 1.0], [0, 1], np.array([0.0, 1.0])):
        pd.testing.assert_frame_equal(
            ann.annotate(x[::50], blocklist=given), ann.annotate(x[::50], blocklist=["0", "1"])
        )
    with pytest.raises(CellIndexError, match="blocklist holds a missing value"):
        ann.annotate(x[::50], blocklist=[0.0, np.nan])
    # a text column that holds "1.0": met by 1.0 as written
    texts = np.where(np.isnan(floats), None, floats.astype(str)).astype(object)
    index = CellIndex.build(x, meta.assign(code=texts), engine="exact")
    ann = KNNAnnotator(index, label_key="code", k=15)
    pd.testing.assert_frame_equal(
        ann.annotate(x[::50], blocklist=[1.0]), ann.annotate(x[::50], blocklist=["1.0"])
    )


def test_leave_one_study_out_calibration_allows_for_study_shifts():
    """Studies shifted from each other: calibrating across studies keeps new studies' cells."""
    x, meta, _ = _atlas(spread=0.3)
    rng = np.random.default_rng(5)
    study = meta["study"].to_numpy()
    shifts = {s: 0.4 * rng.normal(size=x.shape[1]) for s in ("a", "b", "c")}
    xs = x + np.stack([shifts[s] for s in study]).astype(np.float32)
    ref = study != "c"
    index = CellIndex.build(xs[ref], meta[ref], engine="exact")
    plain = KNNAnnotator(index, k=30)
    within = plain.calibrate(quantile=0.99)
    across = KNNAnnotator(index, k=30)
    assert across.calibrate(quantile=0.99, group_key="study") > within
    new_study = xs[~ref]
    abstain_plain = (plain.annotate(new_study)["label"] == UNKNOWN).mean()
    abstain_across = (across.annotate(new_study)["label"] == UNKNOWN).mean()
    assert abstain_across < abstain_plain and abstain_across <= 0.05, (
        abstain_across,
        abstain_plain,
    )
    with pytest.raises(Exception, match="two groups"):
        single = CellIndex.build(x[study == "a"], meta[study == "a"], engine="exact")
        KNNAnnotator(single).calibrate(group_key="study")


def test_self_calibration_scores_the_labelled_reference_cells_only():
    """Calibration on the reference scores cells of known types: unlabelled reference
    cells (far off here: doublets, debris) were sampled too, and raised the threshold
    (hunt236); they still count as neighbours. Brute force over the labelled cells."""
    x, meta, _ = _atlas(n_per=60, spread=0.3, seed=3)
    rng = np.random.default_rng(4)
    far = rng.normal(size=(60, x.shape[1])).astype(np.float32)
    labels = [*meta["cell_type_ontology_term_id"], *([None] * 60)]
    index = CellIndex.build(
        np.concatenate([x, far]),
        pd.DataFrame({"cell_type_ontology_term_id": labels}),
        engine="exact",
    )
    unit = np.concatenate([x, far]).astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    d = 1.0 - unit[: len(x)] @ unit.T
    d[np.arange(len(x)), np.arange(len(x))] = np.inf  # (its own hit left out)
    scores = np.sort(d.min(1))
    want = scores[int(np.ceil((len(scores) + 1) * 0.9)) - 1]
    ann = KNNAnnotator(index, k=5, abstain_on="nearest")
    assert ann.calibrate(quantile=0.9, n_cells=10_000) == pytest.approx(want, abs=1e-6)


def test_calibrations_a_selection_leaves_nothing_to_score_say_so():
    """A selection leaving one group (per-group calibration), or one cell (on the reference
    itself), blamed the reference ("needs two groups in the reference") or counted 0 of 1
    calibration cells; tl.annotate's calibrate_by with calibrate_on was refused in
    calibrate()'s words, and quantile / calibrate_by with abstain=False were left unread
    (hunt236: cellsift annotate refuses them)."""
    import anndata as ad

    from cellsift import tl

    x, meta, _ = _atlas(n_per=40)
    meta = meta.assign(id=np.arange(len(meta)))
    index = CellIndex.build(x, meta, engine="exact")
    ann = KNNAnnotator(index, k=5)
    only_a = {"study": ["a"]}
    with pytest.raises(CellIndexError, match=r"two groups in the reference that the selection"):
        ann.calibrate(quantile=0.5, group_key="study", filter=only_a)
    with pytest.raises(CellIndexError, match=r"other reference cells that the selection .* is 1"):
        ann.calibrate(quantile=0.5, filter={"id": [0]})
    # by group, a selection of no labelled cells: said as such, not as one group (review216)
    unlabelled = meta.assign(
        cell_type_ontology_term_id=np.where(meta["id"] < 40, None, "CL:0000236")
    )
    blank = KNNAnnotator(CellIndex.build(x, unlabelled, engine="exact"), k=5)
    with pytest.raises(CellIndexError, match=r"labelled cells .* and there are 0"):
        blank.calibrate(quantile=0.5, group_key="study", filter={"id": list(range(40))})
    assert ann.calibrate(quantile=0.5, group_key="study") > 0
    cells = ad.AnnData(np.zeros((5, 1), np.float32))
    cells.obsm["X_cellsift"] = x[:5]
    for options, said in (
        ({"calibrate_by": "study", "calibrate_on": x[:10]}, "calibrate_by groups the reference"),
        ({"abstain": False, "quantile": 0.3}, "quantile sets the abstention threshold"),
        ({"abstain": False, "calibrate_by": "study"}, "calibrate_by sets the abstention"),
        ({"abstain": False, "calibrate_on": x[:10]}, "calibrate_on sets the abstention"),
    ):
        with pytest.raises(ConfigError, match=said):
            tl.annotate(cells, index, **options)


def test_held_out_calibration_is_the_conformal_quantile_and_keeps_new_cells():
    """Reference cells pulled tight (as training does), new cells of the same types looser:
    a threshold from the reference abstains on many new cells; one from held-out cells keeps
    them, still catches an unseen type, and is the ceil((n+1)q)-th smallest NN distance."""
    x, meta, centers = _atlas(n_per=800, spread=0.3)
    y = meta["cell_type_ontology_term_id"].to_numpy()
    lab = np.array([TYPES.index(t) for t in y])
    tight = centers[lab] + 0.5 * (x - centers[lab])  # "trained-on" cells: half the spread
    held = "CL:0000236"
    part = np.arange(len(x)) % 4  # 0, 1: reference; 2: held-out calibration; 3: queries
    ref = (part <= 1) & (y != held)
    cal = (part == 2) & (y != held)
    index = CellIndex.build(tight[ref].astype(np.float32), meta[ref], engine="exact")

    from_ref = KNNAnnotator(index, k=30)
    from_ref.calibrate(quantile=0.99)
    held_out = KNNAnnotator(index, k=30)
    thr = held_out.calibrate(x[cal], quantile=0.99)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    d = 1.0 - unit(x[cal].astype(np.float64)) @ unit(tight[ref].astype(np.float64)).T
    rank = int(np.ceil((len(d) + 1) * 0.99))
    mean30 = np.sort(np.sort(d, axis=1)[:, :30].mean(1))  # abstain_on="mean", k = 30
    assert thr == pytest.approx(mean30[rank - 1], abs=1e-5)
    nearest = KNNAnnotator(index, k=30, abstain_on="nearest")
    assert nearest.calibrate(x[cal], quantile=0.99) == pytest.approx(
        np.sort(d.min(1))[rank - 1], abs=1e-5
    )

    query, yq = x[part == 3], y[part == 3]
    known, new = yq != held, yq == held
    abstain_ref = (from_ref.annotate(query)["label"] == UNKNOWN).to_numpy()
    abstain_held = (held_out.annotate(query)["label"] == UNKNOWN).to_numpy()
    assert abstain_ref[known].mean() > 0.2  # the biased threshold
    assert abstain_held[known].mean() <= 0.04  # 0.01 expected
    assert abstain_held[new].mean() >= 0.8

    with pytest.raises(ValueError, match="at least 99 calibration cells"):
        held_out.calibrate(x[cal][:50], quantile=0.99)
    assert held_out.distance_threshold == thr  # a failed calibration leaves the threshold
    with pytest.raises(ValueError, match="quantile must be"):
        KNNAnnotator(index).calibrate(x[cal], quantile=1.0)
    with pytest.raises(ConfigError, match=r"held-out cells .* are not in the reference"):
        held_out.calibrate(x[cal], quantile=0.99, group_key="dataset_id")  # (was ignored)
    assert held_out.distance_threshold == thr


def test_calibration_against_a_selection_of_the_reference_is_its_conformal_quantile():
    """calibrate() with safelist / blocklist / filter measures against the selected reference
    cells only (and samples them only), exactly as brute force over that selection; annotate
    against another selection than the threshold's warns (one set by hand holds for any)."""
    from cellsift._warnings import CellsiftWarning
    from cellsift.errors import ConfigError

    x, meta, _ = _atlas(n_per=80, spread=0.4, seed=2)
    y, study = meta["cell_type_ontology_term_id"].to_numpy(), meta["study"].to_numpy()
    cal = np.arange(len(x)) % 5 == 0
    index = CellIndex.build(x[~cal], meta[~cal].reset_index(drop=True), engine="exact")
    yr, sr = y[~cal], study[~cal]
    unit = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    ref = unit[~cal]
    k, q = 10, 0.9

    def quantile_of(scores):
        scores = np.sort(scores)
        return scores[int(np.ceil((len(scores) + 1) * q)) - 1]

    def mean_k(d):
        return np.sort(d, axis=1)[:, :k].mean(1)

    ann = KNNAnnotator(index, k=k)
    kept = yr != "CL:0000236"  # blocklist: B cells
    thr = ann.calibrate(x[cal], quantile=q, blocklist=["CL:0000236"])
    assert thr == pytest.approx(quantile_of(mean_k(1 - unit[cal] @ ref[kept].T)), abs=1e-5)
    whole = KNNAnnotator(index, k=k).calibrate(x[cal], quantile=q)
    assert whole == pytest.approx(quantile_of(mean_k(1 - unit[cal] @ ref.T)), abs=1e-5)
    assert whole < thr  # a smaller reference sits farther away
    with pytest.warns(CellsiftWarning, match="calibrated against a selection of it"):
        ann.annotate(x[cal][:5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ann.annotate(x[cal][:5], blocklist=["CL:0000236"])
        # a threshold set by hand holds against any selection: nothing to warn of
        ann.distance_threshold = thr
        ann.annotate(x[cal][:5])
    with pytest.raises(ConfigError, match="distance_threshold is a distance"):
        ann.distance_threshold = "0.3"  # type: ignore[assignment]
    ann.distance_threshold = 10**400  # (beyond float's range: no abstention by distance)
    assert ann.distance_threshold == float("inf")
    ann.distance_threshold = thr
    # a filter is the same selection whatever the order of its columns and values
    ann = KNNAnnotator(index, k=k)
    ann.calibrate(
        x[cal], quantile=q, filter={"study": ["a", "b"], "cell_type_ontology_term_id": TYPES[:3]}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for again in (
            {"cell_type_ontology_term_id": TYPES[2::-1], "study": ["b", "a", "b"]},
            {"study": np.array(["b", "a"]), "cell_type_ontology_term_id": list(TYPES[:3])},
        ):
            ann.annotate(x[cal][:5], filter=again)
    with pytest.warns(CellsiftWarning, match="another selection"):
        ann.annotate(x[cal][:5], filter={"study": ["a"], "cell_type_ontology_term_id": TYPES[:3]})
    # cells added whose whole-number column widens the index's (int8 -> int64): the same
    # filter is the same selection (review197: a typed value set made it another)
    # (and uint32 -> uint64, uint8 -> int16: a uint64 column's values are typed uint64;
    # the selection is built again as the index's columns are typed when compared)
    widened = (("int8", "int64"), ("uint32", "uint64"), ("uint8", "uint16"), ("uint8", "int16"))
    for narrow, wide in widened:
        small = meta[~cal].reset_index(drop=True).assign(batch=lambda m: m.index % 3)
        small = small.astype({"batch": narrow})
        grown = CellIndex.build(x[~cal][:200], small[:200], engine="exact")
        ann = KNNAnnotator(grown, k=k)
        ann.calibrate(x[cal], quantile=q, filter={"batch": [1, 2]})
        grown.add(x[~cal][200:], small[200:].astype({"batch": wide}))
        assert str(grown._dataset().schema.field("batch").type) == wide
        assert ann.threshold_mismatch(filter={"batch": [2, 1]}) is None, (narrow, wide)
    # the selection is kept as given: values read from an iterator once, a list the caller
    # changes later as it was
    values = [1, 2]
    ann.calibrate(x[cal], quantile=q, filter={"batch": iter(values)})
    assert ann.threshold_mismatch(filter={"batch": [2, 1]}) is None
    ann.calibrate(x[cal], quantile=q, filter={"batch": values})
    values.append(0)
    assert ann.threshold_mismatch(filter={"batch": [2, 1]}) is None
    assert ann.threshold_mismatch(filter={"batch": values}) is not None
    # a selection that leaves no reference cell, said in one line (an Arrow expression too)
    import pyarrow.compute as pc

    for nothing in ({"study": ["z"]}, pc.field("study").isin(["y", "z"])):
        with pytest.raises(CellIndexError, match="leave none of the reference's") as err:
            ann.check_selection(filter=nothing)
        assert "\n" not in str(err.value)

    # the reference itself: every selected cell (n_cells above their number) against the
    # other selected cells, then against the selected cells of other studies
    sel = np.isin(sr, ["a", "b"]) & np.isin(yr, TYPES[:3])
    d = 1 - ref[sel] @ ref[sel].T
    np.fill_diagonal(d, np.inf)
    choose = {"filter": {"study": ["a", "b"]}, "safelist": TYPES[:3]}
    got = KNNAnnotator(index, k=k).calibrate(quantile=q, n_cells=10**6, **choose)
    assert got == pytest.approx(quantile_of(mean_k(d)), abs=1e-5)
    d[sr[sel][:, None] == sr[sel][None, :]] = np.inf
    by_study = KNNAnnotator(index, k=k).calibrate(
        quantile=q, n_cells=10**6, group_key="study", **choose
    )
    assert by_study == pytest.approx(quantile_of(mean_k(d)), abs=1e-5)


def test_mean_distance_abstains_where_one_stray_reference_cell_sits_by_an_unseen_type():
    """A reference without B cells but with a few stray cells (mislabelled, doublets) inside
    the B population: by the nearest cell's distance, every B cell near a stray one looks
    known; by the mean distance to the k voters, B cells still abstain."""
    x, meta, _ = _atlas(n_per=800, spread=0.3)
    y = meta["cell_type_ontology_term_id"].to_numpy()
    held = "CL:0000236"
    part = np.arange(len(x)) % 4
    b_cells = np.flatnonzero((y == held) & (part <= 1))
    stray = b_cells[:: len(b_cells) // 8][:8]  # 8 B cells labelled NK in the reference
    meta_ref = meta.copy()
    meta_ref.loc[stray, "cell_type_ontology_term_id"] = "CL:0000623"
    ref = ((part <= 1) & (y != held)) | np.isin(np.arange(len(x)), stray)
    cal = (part == 2) & (y != held)
    index = CellIndex.build(x[ref], meta_ref[ref], engine="exact")
    query, yq = x[part == 3], y[part == 3]
    xr = x[ref] / np.linalg.norm(x[ref], axis=1, keepdims=True)
    xq = query / np.linalg.norm(query, axis=1, keepdims=True)
    brute = np.sort(1.0 - xq.astype(np.float64) @ xr.T.astype(np.float64), axis=1)[:, :30]
    caught = {}
    for stat in ("mean", "nearest"):
        ann = KNNAnnotator(index, k=30, abstain_on=stat, min_support=0.0)
        ann.calibrate(x[cal], quantile=0.99)
        out = ann.annotate(query)
        assert (out["label"][yq != held] == UNKNOWN).mean() <= 0.04
        caught[stat] = (out["label"][yq == held] == UNKNOWN).mean()
        # both distances are reported whichever one abstention reads
        np.testing.assert_allclose(out["mean_distance"], brute.mean(1), atol=1e-5)
        np.testing.assert_allclose(out["min_distance"], brute[:, 0], atol=1e-5)
        d = out["mean_distance"].to_numpy() if stat == "mean" else out["min_distance"].to_numpy()
        far = d > ann.distance_threshold
        assert (out["label"].to_numpy()[far] == UNKNOWN).all()
    assert caught["mean"] >= 0.95, caught
    assert caught["nearest"] < 0.5, caught
    with pytest.raises(ValueError, match="abstain_on must be"):
        KNNAnnotator(index, abstain_on="median")  # type: ignore[arg-type]


@pytest.mark.parametrize("ontology_aware", [False, True])
def test_reference_cells_without_a_label_cast_no_vote(ontology_aware):
    """Missing labels (NaN in a categorical column) and CELLxGENE's 'unknown' are no labels:
    such a reference cell can be a neighbour but votes for nothing."""
    x, meta, _ = _atlas(n_per=60)
    labels = meta["cell_type_ontology_term_id"].to_numpy().astype(object)
    none = np.arange(len(x)) % 3 == 0
    labels[none] = np.where(np.arange(none.sum()) % 2 == 0, None, UNKNOWN)
    meta = meta.assign(cell_type_ontology_term_id=pd.Categorical(labels))
    index = CellIndex.build(x, meta, engine="exact")
    ann = KNNAnnotator(index, k=1, ontology_aware=ontology_aware, min_support=0.0)
    out = ann.annotate(x)  # k=1: each cell's nearest is itself
    assert (out["label"][none] == UNKNOWN).all() and (out["confidence"][none] == 0).all()
    assert (out["label"][~none].to_numpy() == labels[~none]).all()
    # with more neighbours the labelled ones decide, as if the others were absent
    ann = KNNAnnotator(index, k=15, ontology_aware=False, weighted=False, min_support=0.0)
    votes = ann.annotate(x)["knn_label"].to_numpy()
    truth = meta["cell_type_ontology_term_id"].astype(object).to_numpy()
    assert (votes[~none] == truth[~none]).mean() > 0.95
    unlabelled = meta.assign(cell_type_ontology_term_id=pd.Categorical([None] * len(x)))
    with pytest.raises(CellIndexError, match="holds no labels"):
        KNNAnnotator(CellIndex.build(x, unlabelled, engine="exact"))


def test_no_queries_give_an_empty_frame_with_every_column():
    x, meta, _ = _atlas(n_per=20)
    out = KNNAnnotator(CellIndex.build(x, meta, engine="exact"), k=5).annotate(x[:0])
    assert len(out) == 0
    assert {"label", "label_name", "confidence", "min_distance", "mean_distance"} <= set(out)
    # labels are text, as with queries (pandas maps an empty column to float64)
    assert [out[c].dtype for c in ("label", "label_id", "label_name")] == [object] * 3


def test_bad_settings_are_named_and_one_query_is_one_cell():
    from cellsift.errors import ConfigError, DataError

    x, meta, _ = _atlas(n_per=20)
    ann = KNNAnnotator(CellIndex.build(x, meta, engine="exact"), k=5)
    for size in (0, -1, 2.5):  # (-1 annotated nothing, without a word)
        with pytest.raises(ConfigError, match="batch_size must be a whole number"):
            ann.annotate(x[:3], batch_size=size)
    # a 1-d query is one cell, as CellIndex.search reads it
    pd.testing.assert_frame_equal(ann.annotate(x[4]), ann.annotate(x[4:5]))
    with pytest.raises(DataError, match="cells x dims array"):
        ann.annotate(x[None, :3])
    for threshold in ("0.5", float("nan")):
        with pytest.raises(ConfigError, match="distance_threshold is a distance"):
            KNNAnnotator(ann.index, k=5, distance_threshold=threshold)
    with pytest.raises(ConfigError, match="n_cells is how many reference cells"):
        ann.calibrate(n_cells=-5)
    with pytest.raises(DataError, match="leave calibrate out") as err:
        ann.calibrate(x[:5])  # too few cells for the quantile: the fixes it names exist
    assert "abstain=False" not in str(err.value).split("tl.annotate")[0]


def test_queries_are_read_as_the_index_reads_them():
    """A model's output that still holds its graph, and float64 rows beyond float32's
    range, annotate and calibrate as CellIndex.search reads them (the same calls as the
    float32 array), not a tensor error or rows taken for inf."""
    import torch

    x, meta, _ = _atlas(n_per=40)
    ann = KNNAnnotator(CellIndex.build(x[::2], meta[::2], engine="exact"), k=5)
    want = ann.annotate(x[1::2])
    graph = torch.from_numpy(x[1::2]).requires_grad_(True) * 1.0
    for q in (graph, x[1::2].astype(np.float64) * 1e300):
        pd.testing.assert_frame_equal(ann.annotate(q), want, check_exact=False, atol=1e-5)
    threshold = ann.calibrate(x[1::2])
    assert ann.calibrate(graph) == pytest.approx(threshold, abs=1e-6)


@pytest.mark.parametrize("ontology_aware", [False, True])
def test_votes_tallied_a_few_queries_at_a_time_give_the_same_calls(monkeypatch, ontology_aware):
    """Votes are queries x labels: tallied in groups (memory stays bounded with thousands of
    labels), the calls are those of one tally."""
    x, meta, _ = _atlas(n_per=40)
    ann = KNNAnnotator(CellIndex.build(x, meta, engine="exact"), k=9, ontology_aware=ontology_aware)
    whole = ann.annotate(x[::3])
    monkeypatch.setattr(KNNAnnotator, "VOTES", 2 * len(ann._labels.terms))  # 2 at a time
    pd.testing.assert_frame_equal(ann.annotate(x[::3]), whole)


def test_unlabelled_neighbours_dilute_the_votes():
    """One labelled cell among unlabelled neighbours is no majority; with no labelled
    neighbour at all the plain majority label is unknown too."""
    x, meta, _ = _atlas(n_per=40)
    labels = np.full(len(x), UNKNOWN, dtype=object)
    labels[0] = meta["cell_type_ontology_term_id"].iloc[0]
    index = CellIndex.build(x, meta.assign(cell_type_ontology_term_id=labels), engine="exact")
    ann = KNNAnnotator(index, k=10, weighted=False, ontology_aware=False, min_support=0.5)
    out = ann.annotate(x[:1])  # cell 0's neighbours: itself and 9 unlabelled cells
    assert out["label"].iloc[0] == UNKNOWN and out["confidence"].iloc[0] == pytest.approx(0.1)
    assert out["knn_label"].iloc[0] == labels[0]
    far = ann.annotate(x[-1:])  # among unlabelled cells only
    assert far["label"].iloc[0] == UNKNOWN and far["knn_label"].iloc[0] == UNKNOWN


def test_leave_one_group_out_calibration_reads_groups_of_any_type():
    """Groups held as numbers or booleans leave the same cells out as the same groups held
    as text (compared as text, 1015.0 matched no Arrow '1015': every cell kept itself)."""
    x, meta, _ = _atlas(spread=0.3)
    two = meta["study"].isin(["a", "b"]).to_numpy()
    x, meta = x[two], meta[two].reset_index(drop=True)
    want = KNNAnnotator(CellIndex.build(x, meta, engine="exact"), k=15).calibrate(
        quantile=0.9, group_key="study"
    )
    for coded in (
        meta["study"].map({"a": 1015.0, "b": 1016.0}),
        meta["study"].map({"a": True, "b": False}),
        meta["study"].map({"a": 7, "b": 8}).astype("Int64"),
    ):
        index = CellIndex.build(x, meta.assign(study=coded), engine="exact")
        got = KNNAnnotator(index, k=15).calibrate(quantile=0.9, group_key="study")
        assert got == pytest.approx(want, rel=1e-6), coded.dtype


def test_labels_naming_one_term_vote_as_that_term():
    """A reference whose B cells are labelled by id, by name and by an id form votes for
    one B cell term: the calls equal those of the uniformly labelled reference."""
    x, meta, _ = _atlas()
    b = np.flatnonzero(meta["cell_type_ontology_term_id"].to_numpy() == "CL:0000236")
    assert len(b) > 0
    mixed = meta.copy()
    mixed.loc[b[0::3], "cell_type_ontology_term_id"] = "B cell"
    mixed.loc[b[1::3], "cell_type_ontology_term_id"] = "CL_0000236"
    opts = {"k": 15, "ontology_aware": True}
    want = KNNAnnotator(CellIndex.build(x, meta, engine="exact"), **opts).annotate(x[b])
    got = KNNAnnotator(CellIndex.build(x, mixed, engine="exact"), **opts).annotate(x[b])
    assert (got["label"] == "CL:0000236").all()
    pd.testing.assert_frame_equal(got, want)


def test_an_even_split_is_no_majority():
    """Neighbours split 10/10 between CD4 and CD8 T cells: ontology mode calls a common
    ancestor, plain mode abstains (a call needs more than min_support of the votes)."""
    d = 8
    a, b = np.eye(d, dtype=np.float32)[0], np.eye(d, dtype=np.float32)[1]
    x = np.concatenate([np.tile(a, (10, 1)), np.tile(b, (10, 1))])
    labels = ["CL:0000624"] * 10 + ["CL:0000625"] * 10
    index = CellIndex.build(x, pd.DataFrame({"cell_type_ontology_term_id": labels}))
    query = (a + b)[None, :]
    onto = KNNAnnotator(index, k=20, weighted=False, ontology_aware=True).annotate(query)
    call = onto["label"].iloc[0]
    cl = load_cell_ontology()
    assert call not in labels and call in set(cl.ancestors("CL:0000624")) & set(
        cl.ancestors("CL:0000625")
    )
    plain = KNNAnnotator(index, k=20, weighted=False).annotate(query)
    assert plain["label"].iloc[0] == UNKNOWN
    for bad in ({"k": 0}, {"k": -3}, {"min_support": 1.0}, {"min_support": -0.1}):
        with pytest.raises(CellIndexError, match=next(iter(bad))):
            KNNAnnotator(index, **({"k": 20} | bad))
    with pytest.warns(UserWarning, match=r"k=21 neighbours, and the reference holds 20 cells"):
        KNNAnnotator(index, k=21)


def _ring(labels: list[str | None], d: int = 8) -> tuple[np.ndarray, CellIndex]:
    """A query and an index whose len(labels) nearest cells all lie at one distance from
    it (labelled ``labels``), with 50 far B cells behind them."""
    query = np.eye(d)[0]
    near = np.tile(query, (len(labels), 1))
    for j in range(len(labels)):
        near[j, 1 + j % (d - 1)] = 0.3 if j < d - 1 else -0.3
    far = np.random.default_rng(0).normal(size=(50, d))
    far[:, 0] = -5
    meta = pd.DataFrame({"cell_type_ontology_term_id": [*labels, *["CL:0000236"] * 50]})
    return query[None], CellIndex.build(np.vstack([near, far]), meta)


@pytest.mark.parametrize("weighted", [False, True])
def test_an_even_split_at_one_distance_is_no_majority_weighted_or_not(weighted):
    """Five CD4 and five CD8 neighbours at the same distance: no half is nearer, so neither
    is a majority, whether votes are weighted by distance (float sums of the weights must not
    tip an even split) or not."""
    query, index = _ring(["CL:0000624"] * 5 + ["CL:0000625"] * 5)
    assert len(np.unique(index.search(query, 10).distances)) == 1
    plain = KNNAnnotator(index, k=10, weighted=weighted).annotate(query).iloc[0]
    assert plain["label"] == UNKNOWN and plain["confidence"] == pytest.approx(0.5)
    aware = KNNAnnotator(index, k=10, weighted=weighted, ontology_aware=True)
    assert aware.annotate(query)["label"].iloc[0] == "CL:0000791"  # alpha-beta T cell


def test_an_unknown_call_reports_the_majority_labels_share_in_either_mode():
    """Four CD4 T, one B and five unlabelled neighbours: no term has a majority, so the call
    is unknown, with the plain majority label's share (0.4) as its confidence in ontology
    mode too (not the share of whichever term sorts first). So too for a call made unknown
    by its distance: four CD4 and two CD8 neighbours would call T cell at 0.6 in ontology
    mode, and beyond the threshold the call is unknown at CD4's 0.4, not T cell's 0.6."""
    query, index = _ring(["CL:0000624"] * 4 + ["CL:0000236"] + [None] * 5)
    for aware in (False, True):
        out = KNNAnnotator(index, k=10, weighted=False, ontology_aware=aware).annotate(query)
        assert out["label"].iloc[0] == UNKNOWN
        assert out["knn_label"].iloc[0] == "CL:0000624"
        assert out["confidence"].iloc[0] == pytest.approx(0.4)
    query, index = _ring(["CL:0000624"] * 4 + ["CL:0000625"] * 2 + [None] * 4)
    aware = KNNAnnotator(index, k=10, weighted=False, ontology_aware=True)
    assert aware.annotate(query)["confidence"].iloc[0] == pytest.approx(0.6)  # (T cell)
    near = aware.annotate(query)["mean_distance"].iloc[0]
    for abstain_on in ("mean", "nearest"):
        far = KNNAnnotator(
            index,
            k=10,
            weighted=False,
            ontology_aware=True,
            distance_threshold=near / 2,
            abstain_on=abstain_on,
        ).annotate(query)
        assert far["label"].iloc[0] == UNKNOWN and far["knn_label"].iloc[0] == "CL:0000624"
        assert far["confidence"].iloc[0] == pytest.approx(0.4)


@pytest.mark.parametrize("ontology_aware", [False, True])
def test_an_annotator_reads_the_labels_of_cells_added_to_the_index(ontology_aware):
    """An annotator made before CellIndex.add() votes with the added cells too (a type
    only they hold included), as scikit-learn's kNN on the whole reference does."""
    x, meta, _ = _atlas(n_per=200)
    y = meta["cell_type_ontology_term_id"].to_numpy()
    first = y != TYPES[2]  # B cells come in the second part only
    index = CellIndex.build(x[first], meta[first], engine="exact")
    ann = KNNAnnotator(index, k=15, weighted=False, min_support=0.0, ontology_aware=ontology_aware)
    ann.annotate(x[:5])
    index.add(x[~first], meta[~first])
    out = ann.annotate(x[::7])
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref = np.concatenate([xn[first], xn[~first]])
    sk = KNeighborsClassifier(15, metric="cosine").fit(ref, np.concatenate([y[first], y[~first]]))
    assert (out["knn_label"].to_numpy() == sk.predict(xn[::7])).mean() >= 0.99
    assert TYPES[2] in set(out["label"])


def test_an_empty_safelist_is_named_and_an_empty_blocklist_blocks_nothing():
    x, meta, _ = _atlas(n_per=50)
    ann = KNNAnnotator(CellIndex.build(x, meta, engine="exact"), k=10)
    for empty in ([], (), set()):
        with pytest.raises(CellIndexError, match=r"safelist is empty.* safelist=None"):
            ann.annotate(x[:5], safelist=empty)
    pd.testing.assert_frame_equal(ann.annotate(x[:20], blocklist=[]), ann.annotate(x[:20]))
    # lists given as iterators: read once (counting the blocklist emptied it: "empty")
    blocked = ann.annotate(x[:20], blocklist=[TYPES[0]])
    pd.testing.assert_frame_equal(ann.annotate(x[:20], blocklist=iter([TYPES[0]])), blocked)
    safe = ann.annotate(x[:20], safelist=TYPES[1:3])
    pd.testing.assert_frame_equal(ann.annotate(x[:20], safelist=iter(TYPES[1:3])), safe)


def test_an_even_vote_of_unrelated_terms_is_called_alike_in_ontology_mode():
    """Neighbours split evenly between two unrelated types, below min_support: both qualify
    and ontology mode calls the first in sorted order, as plain votes do (it called the term
    with more ancestors)."""
    terms = ["CL:0000236", "CL:0000624"]  # B cell; CD4 T cell, which has more ancestors
    cl = load_cell_ontology()
    assert len(cl.ancestors(terms[1])) > len(cl.ancestors(terms[0]))
    index = CellIndex.build(
        np.eye(2, dtype=np.float32),
        pd.DataFrame({"cell_type_ontology_term_id": terms}),
        engine="exact",
    )
    for aware in (False, True):
        ann = KNNAnnotator(index, k=2, weighted=False, min_support=0.3, ontology_aware=aware)
        out = ann.annotate(np.ones((1, 2), np.float32))
        assert out["label"].tolist() == out["knn_label"].tolist() == ["CL:0000236"]
        assert out["confidence"].tolist() == [0.5]


def test_plain_calls_name_their_cl_terms_and_other_labels_keep_theirs():
    """Reference labels as CL names, lower-case ids or a lab's own: plain calls give the CL id
    and name where the label names a term, the label itself where it names none; ontology
    mode refuses the lab's labels, naming ontology_aware=False."""
    from cellsift.ontology import OntologyError

    x, _, _ = _atlas(n_per=40)
    own = np.repeat(
        ["B cell", "cl:0001054", "clone 7", "CD4-positive, alpha-beta T cell", "NK"], 40
    )
    index = CellIndex.build(x, pd.DataFrame({"cell_type_ontology_term_id": own}), engine="exact")
    out = KNNAnnotator(index, k=5, min_support=0.0).annotate(x[::40])
    assert out["label"].tolist() == list(dict.fromkeys(own))
    assert out["label_id"].tolist() == ["CL:0000236", "CL:0001054", "clone 7", "CL:0000624", "NK"]
    names = ["B cell", "CD14-positive monocyte", "clone 7", "CD4-positive, alpha-beta T cell", "NK"]
    assert out["label_name"].tolist() == names
    with pytest.raises(OntologyError, match=r"'clone 7'.*pass ontology_aware=False"):
        KNNAnnotator(index, ontology_aware=True)
    # a deprecated term without a successor names no current term: its own label as its
    # name (its CL label is blank: hunt247)
    gone = np.where(own == "NK", "CL:0000274", own)
    index = CellIndex.build(x, pd.DataFrame({"cell_type_ontology_term_id": gone}), engine="exact")
    out = KNNAnnotator(index, k=5, min_support=0.0).annotate(x[::40])
    assert out["label_id"].iloc[-1] == out["label_name"].iloc[-1] == "CL:0000274"


def test_plain_votes_warn_where_two_reference_labels_name_one_term():
    """A reference that writes one type two ways (an id in some studies, its name in
    others) splits that type's plain votes, so that few calls reach a majority: it warns,
    naming the spellings and the fixes. Labels of distinct terms (or none) do not."""
    from cellsift._warnings import CellsiftWarning

    x, meta, _ = _atlas(n_per=40)
    labels = meta["cell_type_ontology_term_id"].to_numpy().copy()
    labels[np.flatnonzero(labels == "CL:0000236")[::2]] = "B cell"
    labels[np.flatnonzero(labels == "CL:0000623")[::2]] = "natural killer cell"
    index = CellIndex.build(x, pd.DataFrame({"cell_type_ontology_term_id": labels}))
    said = r"'B cell' and 'CL:0000236'.* name one Cell Ontology term.*ontology_aware=True"
    with pytest.warns(CellsiftWarning, match=said) as caught:
        KNNAnnotator(index, k=5)
    assert "'CL:0000623' and 'natural killer cell'" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CellsiftWarning)
        KNNAnnotator(index, k=5, ontology_aware=True)  # (one term's votes, summed)
        meta = pd.DataFrame({"cell_type_ontology_term_id": np.repeat(["B cell", "clone 7"], 20)})
        KNNAnnotator(CellIndex.build(x[:40], meta), k=5)


def test_an_index_without_metadata_is_named_as_such():
    """An annotator of an index built without metadata says so and how to build one with
    labels (not "it has []")."""
    index = CellIndex.build(np.random.default_rng(0).normal(size=(10, 4)))
    with pytest.raises(CellIndexError, match=r"holds no metadata, so no labels \('cell_type'\)"):
        KNNAnnotator(index, label_key="cell_type", k=3)


def test_an_even_ontology_vote_goes_to_the_first_by_id_whatever_the_spelling():
    """Ontology mode: an even vote goes to the first term by its id, whether the reference
    writes ids or names (hunt195: by the names' text, "B cell" before "T cell", where the
    ids put T cell, CL:0000084, first)."""
    import warnings

    x = np.array([[1, 0.01, 0], [1, -0.01, 0]], dtype=np.float32)
    q = np.array([[1, 0, 0]], dtype=np.float32)
    calls = []
    for spelled in (["CL:0000084", "CL:0000236"], ["T cell", "B cell"], ["B cell", "T cell"]):
        meta = pd.DataFrame({"cell_type_ontology_term_id": spelled})
        index = CellIndex.build(x if spelled[0] != "B cell" else x[::-1], meta, engine="exact")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ann = KNNAnnotator(index, k=2, weighted=False, ontology_aware=True, min_support=0.3)
            out = ann.annotate(q)
        calls.append((out["label"].iloc[0], out["knn_label"].iloc[0]))
    assert calls == [("CL:0000084", "CL:0000084")] * 3
