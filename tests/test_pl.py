"""cellsift.pl: the artists drawn match the data, figures save atomically, errors are clear."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from cellsift import pl
from cellsift.tasks import UNKNOWN, CellIndex

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
B, CD4, CD8, T, LYMPHOCYTE, MONO = (
    "CL:0000236",
    "CL:0000624",
    "CL:0000625",
    "CL:0000084",
    "CL:0000542",
    "CL:0001054",
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def cells() -> ad.AnnData:
    rng = np.random.default_rng(0)
    n = 90
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.repeat(["B", "NK", "T"], 30)),
            "score": rng.normal(size=n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    return ad.AnnData(
        obs=obs, obsm={"X_umap": rng.normal(size=(n, 2)), "X_cellsift": rng.normal(size=(n, 16))}
    )


def _png(path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


# -- embedding ------------------------------------------------------------------------------
def test_embedding_draws_one_scatter_per_category(cells, tmp_path):
    palette = {"B": "red", "NK": "green", "T": "blue"}
    ax = pl.embedding(cells, "cell_type", palette=palette, save=tmp_path / "umap.png")
    assert len(ax.collections) == 3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["B", "NK", "T"]
    xy = cells.obsm["X_umap"]
    for coll, name in zip(ax.collections, ["B", "NK", "T"], strict=True):
        sel = (cells.obs["cell_type"] == name).to_numpy()
        np.testing.assert_allclose(coll.get_offsets(), xy[sel])
        np.testing.assert_allclose(
            coll.get_facecolor()[0], matplotlib.colors.to_rgba(palette[name])
        )
    assert _png(tmp_path / "umap.png")
    assert [p.name for p in tmp_path.iterdir()] == ["umap.png"]  # no temporary file left


def test_embedding_missing_values_and_numeric_colour(cells):
    cells.obs.loc["c0", "cell_type"] = np.nan
    ax = pl.embedding(cells, "cell_type", basis="umap")  # "umap" means "X_umap"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["NA", "B", "NK", "T"]
    assert len(ax.collections[0].get_offsets()) == 1
    # a category spelled "NA" is not the missing values' entry
    cells.obs["cell_type"] = cells.obs["cell_type"].cat.rename_categories({"NK": "NA"})
    ax = pl.embedding(cells, "cell_type", basis="umap")
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["NA (missing)", "B", "NA", "T"]
    assert len(ax.collections[0].get_offsets()) == 1

    _, ax = plt.subplots()
    out = pl.embedding(cells, "score", ax=ax)
    assert out is ax and len(ax.collections) == 1
    np.testing.assert_allclose(ax.collections[0].get_array(), cells.obs["score"].to_numpy())
    assert len(ax.figure.axes) == 2  # the colour bar


def test_embedding_errors(cells):
    with pytest.raises(ValueError, match=r"shape \(90, 16\); plotting needs a 2-D embedding"):
        pl.embedding(cells, "cell_type", basis="X_cellsift")
    with pytest.raises(KeyError, match=r"obsm has no 'X_tsne'; 2-D embeddings present: \['X_umap'"):
        pl.embedding(cells, "cell_type", basis="X_tsne")
    with pytest.raises(KeyError, match="not an obs column"):
        pl.embedding(cells, "donor")
    with pytest.raises(KeyError, match=r"palette has no colour for \['T'\]"):
        pl.embedding(cells, "cell_type", palette={"B": "red", "NK": "green"})


def test_a_sparse_2d_embedding_is_drawn_as_its_dense_values(cells):
    import scipy.sparse as sp

    dense = cells.obsm["X_umap"].copy()
    cells.obsm["X_umap"] = sp.csr_matrix(dense)
    cells.obsm["X_sparse"] = sp.csr_matrix(dense)
    ax = pl.embedding(cells, "cell_type")
    sel = (cells.obs["cell_type"] == "B").to_numpy()
    np.testing.assert_allclose(ax.collections[0].get_offsets(), dense[sel])
    with pytest.raises(KeyError, match=r"present: \['X_umap', 'X_sparse'\]"):
        pl.embedding(cells, "cell_type", basis="X_tsne")


def test_legend_on_data_names_each_category_at_its_median(cells):
    cells.obs["cell_type"] = cells.obs["cell_type"].cat.add_categories(["unused"])
    ax = pl.embedding(cells, "cell_type", legend_loc="on data")
    assert ax.get_legend() is None
    texts = {t.get_text(): t.get_position() for t in ax.texts}
    assert sorted(texts) == ["B", "NK", "T"]  # (no text for a category of no cells)
    for name, pos in texts.items():
        sel = (cells.obs["cell_type"] == name).to_numpy()
        np.testing.assert_allclose(pos, np.median(cells.obsm["X_umap"][sel], axis=0))
    # a cell without a place (NaN: not embedded) is not counted
    placed = cells.obsm["X_umap"].copy()
    cells.obsm["X_umap"][0] = np.nan
    ax = pl.embedding(cells, "cell_type", legend_loc="on data")
    (b,) = [t.get_position() for t in ax.texts if t.get_text() == "B"]
    np.testing.assert_allclose(b, np.median(placed[1:30], axis=0))


def test_embedding_palettes_of_too_few_colours_or_keyed_by_value():
    """A qualitative map with fewer colours than categories would give two categories one
    colour: refused, as a short list is. A mapping keyed by integer categories is taken."""
    cells = ad.AnnData(np.zeros((12, 1), np.float32))
    cells.obsm["X_umap"] = np.random.default_rng(0).random((12, 2))
    cells.obs["c"] = pd.Categorical([f"c{i}" for i in range(12)])
    with pytest.raises(ValueError, match="palette 'Set1' has 9 colours for 12 categories"):
        pl.embedding(cells, "c", palette="Set1")
    ax = pl.embedding(cells, "c", palette="tab20")
    colours = {tuple(c.get_facecolors()[0]) for c in ax.collections}
    assert len(colours) == 12
    cells.obs["i"] = pd.Categorical([1, 2] * 6)
    ax = pl.embedding(cells, "i", palette={1: "red", 2: "blue"})
    assert {tuple(c.get_facecolors()[0][:3]) for c in ax.collections} == {(1, 0, 0), (0, 0, 1)}
    # float categories, keys of equal value (hunt232: "1" is not "1.0", refused)
    cells.obs["f"] = pd.Categorical([1.0, 2.0] * 6)
    ax = pl.embedding(cells, "f", palette={1: "red", 2: "blue"})
    assert [tuple(c.get_facecolors()[0][:3]) for c in ax.collections] == [(1, 0, 0), (0, 0, 1)]
    with pytest.raises(KeyError, match=r"palette has no colour for \['2\.0'\]"):
        pl.embedding(cells, "f", palette={1: "red", 3: "blue"})
    plt.close("all")


def test_a_category_without_cells_keeps_the_colours_and_leaves_the_legend():
    cells = ad.AnnData(np.zeros((12, 1), np.float32))
    cells.obsm["X_umap"] = np.random.default_rng(0).random((12, 2))
    cells.obs["c"] = pd.Categorical(["B", "NK", "T"] * 4)

    def drawn(adata):
        ax = pl.embedding(adata, "c")
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        return dict(
            zip(legend, (tuple(c.get_facecolors()[0]) for c in ax.collections), strict=True)
        )

    whole = drawn(cells)
    cells.obs["c"] = pd.Categorical(["B", "T"] * 6, categories=["B", "NK", "T"])  # NK: none
    subset = drawn(cells)
    assert list(subset) == ["B", "T"] and subset == {k: whole[k] for k in ("B", "T")}
    plt.close("all")


def test_categories_are_drawn_and_listed_as_written():
    """Names matplotlib would read otherwise: one starting with "_" (which legends leave
    out), dollar signs (mathematics; unpaired, the drawing fails) are listed as written."""
    cells = ad.AnnData(np.zeros((40, 1), np.float32))
    cells.obsm["X_umap"] = np.random.default_rng(0).random((40, 2))
    names = ["_unassigned", "run_$1_$2", "$x$", "B"]
    cells.obs["c$"] = pd.Categorical(np.repeat(names, 10), categories=names)
    ax = pl.embedding(cells, "c$")
    legend = ax.get_legend().get_texts()
    assert len(legend) == 4 and [t.get_text() for t in legend] == [
        n.replace("$", r"\$") for n in names
    ]
    ax.figure.canvas.draw()  # drawn as text (matplotlib draws an escaped dollar as one)
    assert not any(matplotlib.cbook.is_math_text(t.get_text()) for t in legend)
    assert [c.get_label() for c in ax.collections] == [t.get_text() for t in legend]
    assert ax.get_title() == r"c\$"
    ax = pl.annotation_confusion(["run_$1_$2", "b"], ["b", "b"], ontology_aware=False)
    ax.figure.canvas.draw()
    assert r"run_\$1_\$2" in [t.get_text() for t in ax.get_yticklabels()]


# -- search summary ---------------------------------------------------------------------------
def test_search_summary_bars_are_the_summary(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(200, 8))
    meta = pd.DataFrame({"study": rng.choice(["s1", "s2", "s3", "s4"], 200)})
    result = CellIndex.build(emb, meta, engine="exact").search(emb[:5], 30)
    summary = result.summary("study")
    ax = pl.search_summary(result, by="study", save=tmp_path / "hits.png")
    assert len(ax.patches) == len(summary) == 4
    np.testing.assert_array_equal([p.get_width() for p in ax.patches], summary["hits"])
    assert [t.get_text() for t in ax.get_yticklabels()] == list(summary.index)
    assert _png(tmp_path / "hits.png")

    ax = pl.search_summary(result, "study", value="mean_distance", n_top=2)
    assert len(ax.patches) == 2
    np.testing.assert_allclose(
        [p.get_width() for p in ax.patches], summary["mean_distance"].iloc[:2]
    )
    with pytest.raises(KeyError, match="not a summary column"):
        pl.search_summary(result, "study", value="distance")
    for bad in (0, -1, 2.5):  # (pandas' head(-1) would drop the last group)
        with pytest.raises(ValueError, match=f"n_top must be a whole number .* not {bad}"):
            pl.search_summary(result, "study", n_top=bad)

    meta.loc[meta["study"] == "s2", "study"] = None  # hits without a study: a bar of their own
    result = CellIndex.build(emb, meta, engine="exact").search(emb[:5], 30)
    ax = pl.search_summary(result, by="study")
    labels = [t.get_text() for t in ax.get_yticklabels()]
    bars = dict(zip(labels, [p.get_width() for p in ax.patches], strict=True))
    assert bars["NA"] == summary.loc["s2", "hits"] and sum(bars.values()) == 150
    meta.loc[meta["study"] == "s1", "study"] = "NA"  # a study of that name: two bars
    result = CellIndex.build(emb, meta, engine="exact").search(emb[:5], 30)
    ax = pl.search_summary(result, by="study")
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert sorted(labels) == ["NA", "NA (missing)", "s3", "s4"]
    bars = dict(zip(labels, [p.get_width() for p in ax.patches], strict=True))
    assert bars["NA (missing)"] == summary.loc["s2", "hits"]
    assert bars["NA"] == summary.loc["s1", "hits"]


# -- annotation confusion ---------------------------------------------------------------------
def _labels(plan: dict[tuple[str, str], int]) -> tuple[list[str], list[str]]:
    true, pred = [], []
    for (t, p), n in plan.items():
        true += [t] * n
        pred += [p] * n
    order = np.random.default_rng(2).permutation(len(true))
    return [true[i] for i in order], [pred[i] for i in order]


def _heatmap(ax) -> pd.DataFrame:
    return pd.DataFrame(
        ax.images[0].get_array(),
        index=[t.get_text() for t in ax.get_yticklabels()],
        columns=[t.get_text() for t in ax.get_xticklabels()],
    )


def test_plain_confusion_equals_crosstab():
    from cellsift.ontology import load_cell_ontology

    cl = load_cell_ontology()
    true, pred = _labels(
        {(B, B): 7, (B, MONO): 2, (MONO, MONO): 5, (MONO, B): 1, (CD4, CD8): 3, (CD4, UNKNOWN): 2}
    )
    got = _heatmap(pl.annotation_confusion(true, pred, ontology=cl))
    names = {t: cl.name(t) for t in {B, MONO, CD4, CD8}} | {UNKNOWN: UNKNOWN}
    expected = pd.crosstab(pd.Series([names[t] for t in true]), pd.Series([names[p] for p in pred]))
    expected = expected.reindex(index=got.index, columns=got.columns, fill_value=0)
    np.testing.assert_array_equal(got.to_numpy(), expected.to_numpy())
    assert got.to_numpy().sum() == len(true)
    assert list(got.columns[-2:]) == [pl.ANCESTOR, UNKNOWN]
    assert got.loc[cl.name(CD4), pl.ANCESTOR] == 0


def test_ancestor_calls_are_counted_apart_from_wrong_calls(tmp_path):
    plan = {
        (CD4, CD4): 5,
        (CD4, T): 3,  # ancestor: right, coarser
        (CD4, CD8): 2,  # wrong
        (CD4, UNKNOWN): 1,
        (CD8, CD8): 4,
        (CD8, "T cell"): 1,  # a CL name, harmonised; an ancestor
        (CD8, B): 2,
        (B, B): 6,
        (B, LYMPHOCYTE): 1,  # ancestor, a term no row has
        (B, None): 2,  # a missing call is an abstention
        (B, "Unknown"): 1,  # and so is one that spells a missing value ("nan" from
        (CD8, "nan"): 1,  # astype(str) of a column with gaps), in any case
        (T, T): 3,  # exact: T cell is only an ancestor call for CD4 and CD8
        (T, CD4): 2,  # more specific than the truth: not an ancestor call
    }
    true, pred = _labels(plan)
    ax = pl.annotation_confusion(true, pred, save=tmp_path / "confusion.png")
    got = _heatmap(ax)
    b, cd4, cd8, t = (
        "B cell",
        "CD4-positive, alpha-beta T cell",
        "CD8-positive, alpha-beta T cell",
        "T cell",
    )
    cols = [b, cd4, cd8, t, pl.ANCESTOR, UNKNOWN]
    expected = pd.DataFrame(
        [
            [6, 0, 0, 0, 1, 3],
            [0, 5, 2, 0, 3, 1],
            [2, 0, 4, 0, 1, 1],
            [0, 2, 0, 3, 0, 0],
        ],
        index=[b, cd4, cd8, t],
        columns=cols,
    )
    pd.testing.assert_frame_equal(got, expected.astype(float))
    assert len(ax.texts) == int((expected.to_numpy() > 0).sum())  # each nonzero cell written
    assert _png(tmp_path / "confusion.png")

    frac = _heatmap(pl.annotation_confusion(true, pred, normalize=True))
    np.testing.assert_allclose(frac.sum(1), 1.0)
    np.testing.assert_allclose(frac.loc[cd4, pl.ANCESTOR], 3 / 11)
    # labels as written: the same rule for calls that spell a missing value
    plain = _heatmap(pl.annotation_confusion(true, pred, ontology_aware=False))
    assert plain.loc[B, UNKNOWN] == 3 and "Unknown" not in plain.columns


def test_annotation_confusion_errors():
    with pytest.raises(ValueError, match="true has 2 labels and pred 1"):
        pl.annotation_confusion([B, B], [B])
    with pytest.raises(ValueError, match="no cells"):
        pl.annotation_confusion([], [])
    for missing in (None, "unknown", " ", "NaN"):
        with pytest.raises(ValueError, match="1 missing labels"):
            pl.annotation_confusion([B, missing], [B, B])
    with pytest.raises(ValueError, match=r"not a Cell Ontology term.*ontology_aware=False"):
        pl.annotation_confusion([B, "alien cell"], [B, B])


def test_confusion_of_labels_outside_the_ontology_is_the_crosstab_as_written():
    """Cell lines (and a CL name among them, not harmonised): the plain crosstab, the true
    labels first among the columns, abstentions last, no ancestor column."""
    true, pred = _labels(
        {
            ("H1975", "H1975"): 6,
            ("H1975", "A549"): 2,
            ("A549", "A549"): 5,
            ("A549", UNKNOWN): 1,
            ("B cell", "B cell"): 3,
            ("B cell", "HCC827"): 1,
            ("B cell", None): 2,
        }
    )
    got = _heatmap(pl.annotation_confusion(true, pred, ontology_aware=False))
    rows = ["A549", "B cell", "H1975"]
    assert list(got.index) == rows and list(got.columns) == [*rows, "HCC827", UNKNOWN]
    calls = [UNKNOWN if p is None else p for p in pred]
    expected = pd.crosstab(pd.Series(true), pd.Series(calls)).reindex(
        index=got.index, columns=got.columns, fill_value=0
    )
    np.testing.assert_array_equal(got.to_numpy(), expected.to_numpy())


def test_confusion_of_numbers_and_of_series_pairs_the_same_labels_and_cells():
    """Cluster numbers whose calls hold a missing value (so pandas stores them as floats:
    2.0) are the same labels as the true ints; two Series are paired by their index, as
    scikit-learn's confusion_matrix pairs the aligned labels."""
    from sklearn.metrics import confusion_matrix

    true = pd.Series([0, 1, 2, 0, 1, 2, 2])
    pred = pd.Series([0, 1, 2, 0, 2, np.nan, 2])
    got = _heatmap(pl.annotation_confusion(true, pred, ontology_aware=False))
    assert list(got.index) == ["0", "1", "2"] and list(got.columns) == ["0", "1", "2", UNKNOWN]
    called = pred.notna().to_numpy()
    expected = confusion_matrix(true[called], pred[called].astype(int))
    np.testing.assert_array_equal(got.iloc[:, :3].to_numpy(), expected)
    assert got[UNKNOWN].tolist() == [0, 0, 1]

    cells = [f"c{i}" for i in range(7)]
    true_s = pd.Series(["B", "T", "T", "B", "NK", "NK", "T"], index=cells)
    pred_s = pd.Series(["B", "T", "NK", "B", "NK", "NK", "T"], index=cells)[::-1]
    got = _heatmap(pl.annotation_confusion(true_s, pred_s, ontology_aware=False))
    expected = confusion_matrix(true_s, pred_s.reindex(true_s.index), labels=["B", "NK", "T"])
    np.testing.assert_array_equal(got.iloc[:, :3].to_numpy(), expected)
    with pytest.raises(ValueError, match=r"indexes name different cells.*\.to_numpy\(\)"):
        pl.annotation_confusion(true_s, pred_s.set_axis([f"x{i}" for i in range(7)]))
    # names that repeat: said so, not "different cells" (hunt242)
    twice = true_s.set_axis(["c", "c", "c", "d", "d", "d", "d"])
    with pytest.raises(ValueError, match=r"true's index names a cell more than once \('c'\)"):
        pl.annotation_confusion(twice, twice.iloc[::-1])
    numbered = true_s.set_axis([0, 0, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match=r"pred's index names a cell more than once \(0\)"):
        pl.annotation_confusion(true_s, numbered)
    # calls with pandas' default index (an annotator's table) pair by position
    calls = pd.Series(pred_s.reindex(true_s.index).to_numpy())
    by_position = _heatmap(pl.annotation_confusion(true_s, calls, ontology_aware=False))
    np.testing.assert_array_equal(by_position.iloc[:, :3].to_numpy(), expected)
    # but two Series of the same positions in other orders (a frame, one column sorted) pair
    # by those
    frame = pd.DataFrame({"true": true_s.to_numpy(), "call": calls.to_numpy()})
    sorted_calls = frame.sort_values("call")["call"]
    got = _heatmap(pl.annotation_confusion(frame["true"], sorted_calls, ontology_aware=False))
    np.testing.assert_array_equal(got.iloc[:, :3].to_numpy(), expected)


# -- attributions -----------------------------------------------------------------------------
def test_attribution_bars_are_the_top_genes(tmp_path):
    rng = np.random.default_rng(3)
    df = pd.DataFrame(
        {"attribution": rng.normal(size=30), "symbol": [f"GENE{i}" for i in range(30)]},
        index=[f"ENSG{i:011d}" for i in range(30)],
    )
    top = df.sort_values("attribution", ascending=False).head(25)
    ax = pl.attributions(df, n_genes=25, save=tmp_path / "genes.png")
    assert len(ax.patches) == 25
    np.testing.assert_allclose([p.get_width() for p in ax.patches], top["attribution"])
    assert [t.get_text() for t in ax.get_yticklabels()] == list(top["symbol"])
    negative = [p for p in ax.patches if p.get_width() < 0]
    assert negative and all(
        p.get_facecolor() == matplotlib.colors.to_rgba("tab:blue") for p in negative
    )
    assert _png(tmp_path / "genes.png")

    unnamed = df.assign(symbol=df["symbol"].where(df.index != top.index[1]))  # one NaN
    for symbols in (unnamed, unnamed.astype({"symbol": "category"})):
        ax = pl.attributions(symbols, n_genes=3)
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == [top["symbol"].iloc[0], top.index[1], top["symbol"].iloc[2]]

    ax = pl.attributions(df.drop(columns="symbol"), n_genes=100)
    assert len(ax.patches) == 30
    assert ax.get_yticklabels()[0].get_text() == top.index[0]
    with pytest.raises(KeyError, match="'score' is not a column"):
        pl.attributions(df, column="score")
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"n_genes must be a whole number .* not {bad}"):
            pl.attributions(df, n_genes=bad)


# -- saving and import ------------------------------------------------------------------------
def test_save_is_atomic_and_checks_the_format(cells, tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    pl.embedding(cells, "cell_type", save=target)
    assert _png(target)
    pl.embedding(cells, "cell_type", save=tmp_path / "plot.pdf")
    assert (tmp_path / "plot.pdf").read_bytes()[:4] == b"%PDF"
    with pytest.raises(ValueError, match="cannot save as 'xyz'"):
        pl.embedding(cells, "cell_type", save=tmp_path / "plot.xyz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.pdf", "plot.png"]


def test_a_path_under_an_unexpanded_home_folder_is_refused(cells, tmp_path, monkeypatch):
    """``~/plot.png`` is not expanded by Python: rather than make a folder named ``~`` in
    the working directory (a trap for a later ``rm -rf ~``), the error names the path
    written out. A file named ``~plot.png``, and a folder ``~`` that is there, are fine."""
    from cellsift.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"starts with '~'.*folder named '~'"):
        pl.embedding(cells, "cell_type", save="~/plot.png")
    assert not (tmp_path / "~").exists()
    pl.embedding(cells, "cell_type", save="~plot.png")
    (tmp_path / "~").mkdir()
    pl.embedding(cells, "cell_type", save="~/plot.png")
    assert _png(tmp_path / "~" / "plot.png") and _png(tmp_path / "~plot.png")


def test_import_cellsift_does_not_import_heavy_dependencies():
    """Plotting, attribution, training, compiled kernels and TileDB load when first used."""
    heavy = ["matplotlib", "captum", "lightning", "numba", "tiledbsoma"]
    code = f"import sys, cellsift; print(*[m in sys.modules for m in {heavy!r}])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"] * len(heavy)
