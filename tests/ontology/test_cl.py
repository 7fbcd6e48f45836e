from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsift._warnings import CellsiftWarning
from cellsift.datasets import CELL_TYPES
from cellsift.ontology import load_cell_ontology
from cellsift.ontology._cl import OntologyError, available_versions


@pytest.fixture(scope="module")
def cl():
    return load_cell_ontology()


def test_snapshot_is_offline_and_versioned(cl):
    assert cl.version == available_versions()[-1]
    assert len(cl.terms) > 2_500
    assert load_cell_ontology(available_versions()[0]).version == available_versions()[0]
    for version in ("1999-01-01", ""):  # ("": not the newest, as None is)
        with pytest.raises(OntologyError, match=f"{version!r} is not shipped"):
            load_cell_ontology(version)


def test_ids_names_and_hierarchy(cl):
    assert cl.name("CL:0000624") == "CD4-positive, alpha-beta T cell"
    assert cl.id("CD4-positive, alpha-beta T cell") == "CL:0000624"
    assert cl.id("b cell") == "CL:0000236"  # case folded
    assert cl.id("NK cell") == "CL:0000623"  # synonym
    assert cl.id("no such cell") is None
    anc = cl.ancestors("CL:0000624")
    assert "CL:0000084" in anc and "CL:0000000" == anc[-1]  # T cell; cell is the farthest
    assert "CL:0000624" in cl.descendants("CL:0000084")
    assert cl.distance("CL:0000624", "CL:0000624") == 0
    assert cl.distance("CL:0000084", "CL:0000624") is None  # not an ancestor
    # (hunt247) a name or another spelling of an id names the id these take; a term that is
    # none is an error, not distance 0; term() and resolve() read one label, as id() does
    with pytest.raises(OntologyError, match=r"'B cell' names CL:0000236 .*pass 'CL:0000236'"):
        cl.ancestors("B cell")
    with pytest.raises(OntologyError, match=r"'CL_0000236' names CL:0000236"):
        cl.name("CL_0000236")
    for a, b in (("nope", "nope"), ("CL:0000624", "nope"), ("nope", "CL:0000624")):
        with pytest.raises(OntologyError, match="'nope' is not a Cell Ontology term"):
            cl.distance(a, b)
    for method in (cl.term, cl.resolve, cl.id):
        for value in (["B cell"], ("CL:0000236",), ["B cell", "T cell"], pd.Series(["B cell"])):
            with pytest.raises(TypeError, match=r"reads one label.*harmonize\(labels\)"):
                method(value)
        assert method(None) is None and method(float("nan")) is None
    assert cl.term(np.array("B cell")) == cl.resolve(np.array("CL:0000236")) == "CL:0000236"
    one = np.array("CL:0000236")  # (review223, 224: "not a term", or unhashable)
    assert cl.name(one) == "B cell" and not cl.is_deprecated(one)
    assert cl.ancestors(one, include_self=True)[0] == "CL:0000236"
    assert "CL:0000236" in cl.descendants(np.array("CL:0000945"))
    assert cl.distance(one, np.array("CL:0000236")) == 0
    with pytest.raises(TypeError, match=r"lookup of a term reads one label, not a list of 1"):
        cl.name(["CL:0000236"])  # (review222: "['CL:0000236'] is not a Cell Ontology term")
    assert cl.term("b cell") == cl.resolve("CL_0000236") == "CL:0000236"


def test_synthetic_atlas_hierarchy_agrees_with_cl(cl):
    """Each term's parents are its nearest CL ancestors among the atlas's terms: all of them
    (a monocyte is a leukocyte and a myeloid cell), and the atlas's programs follow them."""
    from cellsift.datasets import _lineage

    for term, (name, parents, _) in CELL_TYPES.items():
        assert cl.name(term) == name
        among = [a for a in CELL_TYPES if a != term and a in cl.ancestors(term)]
        nearest = {a for a in among if not any(a in cl.ancestors(b) for b in among if b != a)}
        assert set(parents) == nearest, term
        assert set(_lineage(term)) == {term, *among}


def test_closure_matches_brute_force(cl):
    labels = sorted(CELL_TYPES)
    anc, desc = cl.closure(labels)
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            assert anc[i, j] == (i != j and b in cl.ancestors(a))
    np.testing.assert_array_equal(desc, anc.T)
    rel = cl.related(labels)
    t, cd4, b_cell = (labels.index(x) for x in ("CL:0000084", "CL:0000624", "CL:0000236"))
    assert rel[cd4, t] and rel[t, cd4] and rel[t, t] and not rel[cd4, b_cell]


def test_closure_of_a_label_listed_twice(cl):
    """Each place of a repeated label gets the relations of its term, and the two places
    are related to each other (one term)."""
    labels = ["CL:0000084", "CL:0000624", "CL:0000084", "CL:0000236"]  # T, CD4 T, T, B
    anc, desc = cl.closure(labels)
    assert anc[1, 0] and anc[1, 2] and not anc[0, 2] and not anc[2, 0]
    np.testing.assert_array_equal(desc, anc.T)
    rel = cl.related(labels)
    assert rel[0, 2] and rel[2, 0] and rel[2, 1] and rel[1, 2] and not rel[2, 3]
    unique = cl.related(["CL:0000084", "CL:0000624", "CL:0000236"])
    np.testing.assert_array_equal(rel[np.ix_([2, 1, 3], [2, 1, 3])], unique)


def test_closure_of_a_deprecated_label_is_its_successors(cl):
    """A model's label that a later release deprecated stands for its successor: related as
    it is, up and down, and the same as it (neither ancestor of the other, so no study's
    labels can set them apart); one without a successor relates to nothing, with a warning."""
    dep = next(
        t for t in sorted(cl.terms)
        if cl.is_deprecated(t) and (r := cl.replacement(t)) and cl.ancestors(r)
        and cl.descendants(r)
    )  # fmt: skip
    rep = cl.replacement(dep)
    parent, child = cl.ancestors(rep)[0], cl.descendants(rep)[0]
    labels = [dep, parent, rep, child]
    anc, desc = cl.closure(labels)
    want, _ = cl.closure([rep, parent, rep, child])
    np.testing.assert_array_equal(anc, want)  # (as the successor's, twice)
    assert anc[0, 1] and anc[3, 0] and not anc[0, 2] and not anc[2, 0]
    np.testing.assert_array_equal(desc, anc.T)
    rel = cl.related(labels)
    assert rel[0, 2] and rel[2, 0] and rel[0, 1] and rel[0, 3] and rel.all()
    orphan = next(t for t in sorted(cl.terms) if cl.is_deprecated(t) and not cl.replacement(t))
    with pytest.warns(CellsiftWarning, match=f"{orphan} is deprecated .* without a successor"):
        anc, _ = cl.closure([orphan, parent])
    assert not anc.any()


def test_harmonize(cl):
    deprecated = next(t for t, v in cl.terms.items() if v.get("deprecated") and cl.replacement(t))
    out = cl.harmonize(["B cell", "CL:0000624", "nk cell", deprecated])
    assert out == ["CL:0000236", "CL:0000624", "CL:0000623", cl.replacement(deprecated)]
    with pytest.raises(OntologyError, match=r"2 labels are not Cell Ontology terms.*'Tcells'.*'x'"):
        cl.harmonize(["B cell", "Tcells", "x", "x"])
    with pytest.raises(OntologyError, match=r"1 label is an obsolete CL term \(deprecated\)"):
        cl.harmonize([deprecated], replace_deprecated=False)
    with pytest.raises(TypeError, match=r"not the text 'B cell' \(its letters\)"):
        cl.harmonize("B cell")  # (it named the letters 'B', 'c', ... as unknown labels)
    # spaces as a spreadsheet leaves them: doubled, tabs, non-breaking; names and synonyms
    spaced = [
        "B  cell",
        "B\tcell",
        "B\xa0cell",
        " naive  B cell ",
        "NK\u00a0cell",
        "B   lymphocyte",
    ]
    assert cl.harmonize(spaced) == [*["CL:0000236"] * 3, "CL:0000788", "CL:0000623", "CL:0000236"]
    with pytest.raises(OntologyError, match="'Bcell'"):
        cl.harmonize(["Bcell"])  # (spaces are read as one, not dropped)


def test_harmonize_follows_successors_to_a_current_term(cl):
    """A successor deprecated in turn is followed; a chain ending in an obsolete term
    without a successor is an error, never an obsolete id."""
    for term, info in cl.terms.items():
        if not info.get("deprecated"):
            continue
        rep = cl.replacement(term)
        assert rep is None or not cl.is_deprecated(rep)
        # brute force: walk the chain by hand
        seen, nxt = {term}, info.get("replaced_by")
        while (
            isinstance(nxt, str) and nxt in cl.terms and cl.is_deprecated(nxt) and nxt not in seen
        ):
            seen.add(nxt)
            nxt = cl.terms[nxt].get("replaced_by")
        live = isinstance(nxt, str) and nxt in cl.terms and not cl.is_deprecated(nxt)
        assert rep == (nxt if live else None)
    # CL:0000073 -> CL:0000215, itself obsolete without a successor (CL 2026-03-26)
    chained = [
        t
        for t, v in cl.terms.items()
        if v.get("deprecated") and not cl.replacement(t) and v.get("replaced_by") in cl.terms
    ]
    assert chained, "the shipped CL has successor chains ending in obsolete terms"
    with pytest.raises(OntologyError, match=r"obsolete CL terms? without a current successor"):
        cl.harmonize(["B cell", chained[0]])


def test_harmonize_reads_ids_in_their_other_forms(cl):
    forms = [" cl:0000236", "CL_0000236", "http://purl.obolibrary.org/obo/CL_0000236"]
    assert cl.harmonize(forms) == ["CL:0000236"] * 3


def test_coarsen_rare_moves_to_nearest_viable_parent(cl):
    groups = [  # (label, the study of each of its cells)
        ("CL:0000084", ["s1", "s2", "s3", "s1", "s2", "s3"]),  # T cell: 3 studies
        ("CL:0000624", ["s1", "s2", "s1", "s2"]),  # CD4 T: 2 studies
        ("CL:0000625", ["s1", "s1"]),  # CD8 T: 1 study
        ("CL:0000236", ["s1", "s2", "s3"]),  # B cell
        ("CL:0000556", ["s2", "s2"]),  # megakaryocyte: 1 study, no ancestor in the set
    ]
    labels = [lab for lab, sts in groups for _ in sts]
    studies = [st for _, sts in groups for st in sts]
    out, report = cl.coarsen_rare(labels, studies, min_studies=2)
    assert out[10:12] == ["CL:0000084", "CL:0000084"]  # CD8 (1 study) -> T cell
    assert out[:10] == labels[:10]  # viable labels stay
    assert out[-2:] == [None, None]  # megakaryocyte: no viable ancestor in the set
    assert report.moved == {"CL:0000625": "CL:0000084"}
    assert report.dropped == {"CL:0000556": 2}
    assert "CL:0000625 -> CL:0000084" in str(report)
    again, _ = cl.coarsen_rare(labels, studies, min_studies=2)
    assert again == out  # deterministic


def test_real_labels_are_current_cl_terms(cl):
    from cellsift.datasets import kang2018, shared_data_path

    try:
        shared_data_path("kang2018")
    except FileNotFoundError:
        pytest.skip("shared data not present")
    obs = kang2018(backed=True).obs
    ids = obs["cell_type_ontology_term_id"].astype(str)
    assert cl.harmonize(ids.unique()) == list(ids.unique())
    names = obs["cell_type_ontology_label"].astype(str)
    assert all(
        cl.name(i) == n
        for i, n in zip(ids.unique(), names[ids.drop_duplicates().index], strict=True)
    )


def test_coarsen_rare_says_it_takes_ids(cl):
    with pytest.raises(
        OntologyError, match=r"takes current Cell Ontology ids, and 'plasma cell' is not"
    ):
        cl.coarsen_rare(["plasma cell", "CL:0000236"], ["s1", "s2"])


def test_labels_with_gaps_and_deprecated_ids_are_named():
    import math

    cl = load_cell_ontology()
    with pytest.raises(OntologyError, match=r"a missing value \(NaN/None/NA\).* 'CD4 T cells'"):
        cl.harmonize(["B cell", "CD4 T cells", math.nan])
    deprecated = next(t for t in sorted(cl.terms) if cl.is_deprecated(t))
    with pytest.raises(OntologyError, match="deprecated"):
        cl.coarsen_rare([deprecated, "CL:0000236"], ["a", "b"])


def test_names_of_deprecated_terms_map_as_their_ids_do():
    """A deprecated term named as older data name it (with or without "obsolete ") maps to
    its successor, as its id does; one without a successor is listed as obsolete."""
    cl = load_cell_ontology()
    term = "CL:0000054"
    assert cl.is_deprecated(term) and cl.replacement(term) is not None
    old_name = cl.name(term).removeprefix("obsolete ")
    assert (
        cl.harmonize([term, old_name, cl.name(term), old_name.upper()])
        == [cl.replacement(term)] * 4
    )
    orphan = next(
        t for t in sorted(cl.terms)
        if cl.is_deprecated(t) and cl.replacement(t) is None
        and cl.id(cl.name(t).removeprefix("obsolete ")) is None
    )  # fmt: skip
    with pytest.raises(OntologyError, match="obsolete"):
        cl.harmonize([cl.name(orphan).removeprefix("obsolete ")])
    # and by a synonym, where no current term has the name: every such synonym
    synonyms = {
        syn: t
        for t in sorted(cl.terms)
        if cl.is_deprecated(t) and cl.replacement(t) is not None
        for syn in cl.terms[t].get("synonyms", [])
        if cl.id(syn) is None and syn.strip()
    }
    assert "Meis2 (Marmoset)" in synonyms  # CL:4023106, replaced by CL:4023065
    assert cl.harmonize(list(synonyms)) == [cl.replacement(t) for t in synonyms.values()]
    assert cl.term("meis2 (marmoset)") == "CL:4023065"


def test_blank_and_pandas_missing_labels_name_no_term(cl):
    """Several deprecated CL terms have an empty label: a blank label used to map through
    one of them to its successor (common lymphoid progenitor)."""
    import pandas as pd

    assert cl.id("") is None and cl.id("   ") is None
    assert cl.id(" B cell ") == cl.id("b cell\t") == "CL:0000236"
    for blank in ("", "   ", "\t", "Unknown", "NaN"):  # no label, as dropna reads them
        with pytest.raises(OntologyError, match=r"a value that means no label .*drop those cells"):
            cl.harmonize(["B cell", blank])
    gaps = pd.array(["B cell", pd.NA, "T cell"], dtype="string")  # NA: neither True nor False
    with pytest.raises(OntologyError, match=r"missing value \(NaN/None/NA\)"):
        cl.harmonize(gaps)
    assert cl.harmonize(pd.array(["B cell", "T cell"], dtype="string")) == [
        "CL:0000236",
        "CL:0000084",
    ]
    # a missing value is no name (hunt195: AttributeError), as in harmonize
    assert cl.id(None) is None and cl.id(float("nan")) is None and cl.id(pd.NA) is None
    # NaN floats of a column with gaps are one object a cell: named once, and counted
    # (hunt195: "a missing value, a missing value, ... and 299972 more")
    labels = (
        pd.Series(["B cell", None, "T cell", None] * 50)
        .astype(object)
        .where(lambda s: s.notna(), np.nan)
    )
    labels = [float(v) if not isinstance(v, str) else v for v in labels]  # (distinct NaNs)
    with pytest.raises(OntologyError) as err:
        cl.harmonize([*labels, "unknown"])
    said = str(err.value)
    assert said.count("a missing value (NaN/None/NA)") == 1 and "101 of 201" in said
    # None, NaN, pandas' NA and NaT alike: one missing value (review188: one of each)
    with pytest.raises(OntologyError) as err:
        cl.harmonize(["B cell", pd.NA, None, float("nan"), np.nan, pd.NaT, "T cell"])
    said = str(err.value)
    assert said.count("a missing value (NaN/None/NA)") == 1 and "5 of 7" in said
    with pytest.raises(TypeError, match=r"id\(\) reads one label .* harmonize\(labels\)"):
        cl.id(["B cell"])


def test_coarsen_rare_counts_no_study_for_cells_without_one(cl):
    """A label seen only in cells without a study is in no study, not in one per NaN (or
    per value that spells a missing one)."""
    labels = ["CL:0000236"] * 4 + ["CL:0000788"] * 3  # B cell; naive B cell (a descendant)
    studies = ["a", "b", "a", "b", float("nan"), None, float("nan")]
    out, report = cl.coarsen_rare(labels, studies, min_studies=2)
    assert report.studies["CL:0000788"] == 0
    assert out == ["CL:0000236"] * 7 and report.moved == {"CL:0000788": "CL:0000236"}
    # text that means no study (as in study and split columns everywhere): "unknown",
    # blanks, and the "nan" / "None" that astype(str) makes of a column with gaps
    # a study written as a number in one place and as text in another is one study
    out, report = cl.coarsen_rare(["CL:0000788"] * 4, [1, "1", 1.0, np.float32(1)])
    assert report.studies["CL:0000788"] == 1 and report.dropped == {"CL:0000788": 4}
    for none in ("unknown", "", " ", "nan", "NaN", "None", "<NA>"):
        out, report = cl.coarsen_rare(labels, ["a", "b", "a", "b", "a", none, none])
        assert report.studies["CL:0000788"] == 1, none
        assert report.moved == {"CL:0000788": "CL:0000236"}, none


def test_coarsen_rare_keeps_unlabelled_cells_unlabelled_and_takes_tuples_as_studies(cl):
    """A cell without a label (None, NaN, NA) stays None and counts toward no label
    (hunt265: refused, pointing to harmonize(), which refuses them too); a study given as a
    tuple (donor, batch) is one study (a bare ValueError of pandas')."""
    b_cell, lymphocyte = "CL:0000236", "CL:0000542"
    # (review232: NaT, and text that spells a missing label, as the data module drops it)
    labels = [b_cell, lymphocyte, lymphocyte, None, np.nan, pd.NA, pd.NaT, "unknown", " "]
    out, report = cl.coarsen_rare(labels, ["a", "a", "b", "c", "d", "e", "f", "g", "h"])
    assert out == [lymphocyte] * 3 + [None] * 6
    assert report.moved == {b_cell: lymphocyte} and report.studies == {b_cell: 1, lymphocyte: 2}
    pairs = [("d1", "b1"), ("d1", "b1"), ("d2", "b1")]
    out, report = cl.coarsen_rare([b_cell, lymphocyte, lymphocyte], pairs)
    assert out == [lymphocyte] * 3 and report.studies == {b_cell: 1, lymphocyte: 2}
    one = [("d1", "b1")] * 3  # (the same pair: one study)
    assert cl.coarsen_rare([lymphocyte] * 3, one)[1].studies == {lymphocyte: 1}
    # (review232) a tuple's values read as single studies are: (1.0, "2") is (1, "2"); a
    # tuple of missing values, or none, is no study
    alike = [(1, "2"), (1.0, "2"), (np.int64(1), np.str_("2"))]
    assert cl.coarsen_rare([lymphocyte] * 3, alike)[1].studies == {lymphocyte: 1}
    assert cl.coarsen_rare([lymphocyte] * 2, [(), (np.nan,)])[1].studies == {lymphocyte: 0}
    # (review233) values that spell none, nested ones, a 0-d array
    none = [("unknown", "unknown"), ("nan", "")]
    assert cl.coarsen_rare([lymphocyte] * 2, none)[1].studies == {lymphocyte: 0}
    nested = [(("a", 1), "b"), (("a", 1), "b"), ("a", np.array([1, 2]))]
    assert cl.coarsen_rare([lymphocyte] * 3, nested)[1].studies == {lymphocyte: 2}
    zero_d = [np.array("a"), np.array("b")]
    assert cl.coarsen_rare([lymphocyte] * 2, zero_d)[1].studies == {lymphocyte: 2}
    # (review234) tuples whose texts joined meet are other studies, as is a single study
    apart = [("a|b", "c"), ("a", "b|c"), "a|b|c", ("x",), "x"]
    assert cl.coarsen_rare([lymphocyte] * 5, apart)[1].studies == {lymphocyte: 5}
    spelt = [("a", "unknown"), ("a", None)]  # (a value that spells none: as none)
    assert cl.coarsen_rare([lymphocyte] * 2, spelt)[1].studies == {lymphocyte: 1}
