from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from cellsift._warnings import CellsiftWarning
from cellsift.data import CellCollection, GeneVocabulary
from cellsift.data.genes import DuplicateGenesError
from cellsift.errors import GeneAlignmentError


def _var(ids, symbols=None):
    df = pd.DataFrame(index=pd.Index(ids))
    if symbols is not None:
        df["feature_name"] = symbols
    return df


def test_align_reorders_and_marks_missing():
    vocab = GeneVocabulary(["ENSG00000000003", "ENSG00000000001", "ENSG00000000002"])
    gm = vocab.align(
        _var(["ENSG00000000001", "ENSG00000000009", "ENSG00000000003"]), min_overlap=0.1
    )
    np.testing.assert_array_equal(gm.col_map, [1, -1, 0])
    assert gm.n_matched == 2 and not gm.identity
    # its genes shown, "..." where some are left out (review227: after all of them too)
    assert (
        repr(vocab) == "GeneVocabulary(3 genes: ENSG00000000003, ENSG00000000001, ENSG00000000002)"
    )
    assert repr(GeneVocabulary(["A", "B", "C", "D"])) == "GeneVocabulary(4 genes: A, B, C, ...)"
    assert repr(GeneVocabulary(["A"])) == "GeneVocabulary(1 gene: A)"
    assert repr(GeneVocabulary([])) == "GeneVocabulary(0 genes)"


def test_a_reordering_map_reads_read_only_values():
    """Values in read-only memory (Arrow's, a memory map) are reordered into a copy, not
    sorted in place (which failed), and the store's matrix is left as it was."""
    import scipy.sparse as sp

    vocab = GeneVocabulary(["G2", "G0", "G1"])
    x = sp.csr_matrix(np.array([[1, 2, 0], [0, 3, 4]], dtype=np.float32))
    x.data.flags.writeable = False
    got = vocab.align(_var(["G0", "G1", "G2"])).apply(x)
    assert got.has_sorted_indices
    np.testing.assert_array_equal(got.toarray(), [[0, 1, 2], [4, 0, 3]])
    np.testing.assert_array_equal(x.data, [1, 2, 3, 4])


def test_a_reordering_map_leaves_the_callers_counts_and_anndata_as_they_were():
    """Every gene of the query in the model, in another order: the aligned copy is
    reordered, the caller's matrix (an AnnData's X of float32 CSR, shared by scipy) not, so
    a second alignment and the AnnData's own values are what they were."""
    import anndata as ad
    import scipy.sparse as sp

    from cellsift.models import MetricModel

    vocab = GeneVocabulary(["G2", "G0", "G1"])
    x = sp.csr_matrix(np.array([[1, 2, 3], [0, 5, 6]], dtype=np.float32))
    before = x.copy()
    gm = vocab.align(_var(["G0", "G1", "G2"]))
    for _ in range(2):
        np.testing.assert_array_equal(gm.apply(x).toarray(), [[3, 1, 2], [6, 0, 5]])
        assert (x != before).nnz == 0 and np.array_equal(x.indices, before.indices)
    genes = [_ens(i) for i in range(60)]
    model = MetricModel(genes, ["CL:0000236", "CL:0000084"], hidden=[8], latent=4)
    rng = np.random.default_rng(0)
    adata = ad.AnnData(
        sp.random(5, 60, density=0.5, format="csr", dtype=np.float32, random_state=0)
    )
    adata.X.data[:] = rng.integers(1, 9, adata.X.nnz)
    adata.var_names = genes[::-1]
    held = adata.X.copy()
    got = model.aligned_counts(adata)
    np.testing.assert_array_equal(got.toarray(), held.toarray()[:, ::-1])
    assert (adata.X != held).nnz == 0


def test_ids_named_twice_by_their_versions_are_told_to_keep_one_of_each():
    vocab = GeneVocabulary([_ens(i) for i in range(20)])
    query = _var([f"{_ens(0)}.1", f"{_ens(0)}.2", *[_ens(i) for i in range(2, 20)]])
    with pytest.raises(GeneAlignmentError, match=r"differ in their Ensembl version only") as err:
        vocab.align(query)
    assert "var_names_make_unique" not in str(err.value)
    assert "adata.var_names.str.replace(" in str(err.value)


def test_align_by_symbols_column_and_ensembl_versions():
    vocab = GeneVocabulary(["ENSG00000000001", "ENSG00000000002"], symbols=["A", "B"])
    by_symbol = vocab.align(_var(["B", "A"]))
    np.testing.assert_array_equal(by_symbol.col_map, [1, 0])
    versioned = vocab.align(_var(["ENSG00000000002.5", "ENSG00000000001.1"]))
    np.testing.assert_array_equal(versioned.col_map, [1, 0])
    by_column = vocab.align(
        pd.DataFrame({"gene_ids": ["ENSG00000000001", "ENSG00000000002"]}, index=["A1", "B1"])
    )
    np.testing.assert_array_equal(by_column.col_map, [0, 1])


def test_zero_overlap_error_names_source_and_count():
    vocab = GeneVocabulary([f"ENSG{i:011d}" for i in range(100)])
    with pytest.raises(GeneAlignmentError, match=r"my\.h5ad: only 0 of its 3 genes"):
        vocab.align(_var(["TP53", "GAPDH", "ACTB"]), source="my.h5ad")


def test_symbols_of_another_case_are_named_as_such():
    """Mouse-style symbols (Cd3e) against a human model's (CD3E): no gene matches as written;
    the error says how many match ignoring case and asks about the species. Names that
    match in no case get no such sentence."""
    symbols = [f"GENE{i}" for i in range(100)]
    vocab = GeneVocabulary([_ens(i) for i in range(100)], symbols=symbols)
    mouse = _var([s.capitalize() for s in symbols[:80]])
    with pytest.raises(GeneAlignmentError, match=r"only 0 of its 80 genes.* 80 of its var_name"):
        vocab.align(mouse, source="mouse.h5ad", of="vocabulary")
    with pytest.raises(GeneAlignmentError) as other:
        vocab.align(_var([f"X{i}" for i in range(80)]), source="x.h5ad", of="vocabulary")
    assert "ignoring case" not in str(other.value)


def test_duplicate_gene_ids_error():
    vocab = GeneVocabulary(["A", "B", "C"])
    var = pd.DataFrame(index=pd.Index(["A", "B", "C"]))
    var["gene_ids"] = ["A", "A", "C"]
    gm = vocab.align(var)  # var_names match uniquely: fine
    assert gm.identity
    dup = pd.DataFrame(index=pd.Index(["A", "A", "B"]))
    with pytest.raises(GeneAlignmentError, match="duplicate gene ids"):
        vocab.align(dup)


def test_ids_that_alignment_reads_as_one_are_duplicates_of_the_vocabulary():
    """A padded, versioned id beside its bare twin: alignment reads both as one gene (it
    strips padding, then versions), so the vocabulary refuses them, as it does ids that
    differ by version alone (a pandas InvalidIndexError at every alignment, before)."""
    with pytest.raises(
        DuplicateGenesError,
        match=r"duplicate ids \(Ensembl versions ignored\) \(white space around them ignored\)",
    ):
        GeneVocabulary(["ENSG00000000001.1 ", "ENSG00000000001", "B"])
    GeneVocabulary(["ENSG00000000001.1 ", "ENSG00000000002", "B"])  # (distinct: fine)


def _ens(i):
    return f"ENSG{i:011d}"


def test_a_model_query_leaves_out_only_the_genes_a_shared_name_makes_ambiguous():
    """10x symbols: one symbol names two loci. The symbol column matches more of the model's
    genes than the query's (partly renamed) Ensembl ids; the shared symbol's gene reads as 0
    with a warning, and every other gene still maps to its own column."""
    n = 40
    vocab = GeneVocabulary([_ens(i) for i in range(n)], [f"S{i}" for i in range(n)])
    ids = [_ens(i) if i % 4 else _ens(1000 + i) for i in range(n)] + [_ens(999)]
    symbols = [f"S{i}" for i in range(n)] + ["S4"]  # a second locus named S4
    var = pd.DataFrame({"gene_symbols": symbols}, index=ids)
    with pytest.warns(  # (cellsift's: one line on the command line)
        CellsiftWarning, match=r"1 of the model's genes .*\['S4'\].*var\['gene_symbols'\]"
    ):
        gm = vocab.align(var, of="vocabulary", min_overlap=0.5)
    assert gm.key == "gene_symbols->symbols" and gm.n_matched == n - 1
    want = [i if i != 4 else -1 for i in range(n)] + [-1]
    np.testing.assert_array_equal(gm.col_map, want)
    # within an atlas's stores the same names are an error that names the column
    with pytest.raises(
        GeneAlignmentError, match=r"duplicate gene ids .*\['S4'\].*var\['gene_symbols'\]"
    ):
        vocab.align(var)
    # a shared symbol whose gene's id is the model's: matched by its id, no warning
    import warnings

    var = pd.DataFrame({"gene_symbols": [*symbols[:n], "S5"]}, index=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = vocab.align(var, of="vocabulary", min_overlap=0.5)
    assert gm.key == "gene_symbols->symbols (+1 by var_names->ids)" and gm.n_matched == n
    np.testing.assert_array_equal(gm.col_map, [*range(n), -1])


def test_missing_names_match_nothing():
    """A gene without a symbol (NaN) is no gene named 'nan', in a vocabulary or a query."""
    ids = [_ens(i) for i in range(10)]
    train = pd.DataFrame({"feature_name": [f"S{i}" for i in range(10)]}, index=ids)
    train.loc[ids[3], "feature_name"] = np.nan
    vocab = GeneVocabulary.from_var(train)
    assert vocab.symbols[3] == "" and vocab.symbols[4] == "S4"
    query = [f"S{i}" for i in range(10)]
    query[6] = query[7] = np.nan  # two genes without symbols are not duplicates
    query[3] = "nan"
    gm = vocab.align(pd.DataFrame({"gene_symbols": query}, index=[f"r{i}" for i in range(10)]))
    np.testing.assert_array_equal(gm.col_map, [0, 1, 2, -1, 4, 5, -1, -1, 8, 9])


def test_a_symbol_naming_two_genes_leaves_only_it_out_of_a_vocabulary():
    var = pd.DataFrame({"gene_symbol": ["A", "B", "B", "C"]}, index=[_ens(i) for i in range(4)])
    vocab = GeneVocabulary.from_var(var)
    assert vocab.symbols.tolist() == ["A", "", "", "C"]
    np.testing.assert_array_equal(vocab.align(_var(["C", "A"])).col_map, [3, 0])


def test_unique_var_names_beat_a_symbols_column_that_names_two_genes_alike():
    """CellBench's case: var_names MATR3 and MATR3-1, its symbol column MATR3 twice."""
    vocab = GeneVocabulary(["MATR3", "B", "C"])
    var = pd.DataFrame(index=pd.Index(["MATR3", "MATR3-1", "B", "C"]))
    var["gene_symbol"] = ["MATR3", "MATR3", "B", "C"]
    gm = vocab.align(var)
    assert gm.key == "var_names->ids" and gm.n_matched == 3
    np.testing.assert_array_equal(gm.col_map, [0, -1, 1, 2])


def test_a_vocabulary_takes_symbols_from_the_symbol_column_beside_ids():
    """A 10x store (var_names made unique: S10, S10-1; ids in gene_ids; the symbols in a
    column): the vocabulary's symbols are the column's, where S10 names two genes and so
    neither; a second file made unique in another gene order does not swap their counts
    (hunt198: the vocabulary took S10-1 as a symbol, which names another gene there)."""
    ids = [_ens(i) for i in range(4)]
    first = pd.DataFrame(
        {"gene_ids": ids, "gene_symbols": ["S10", "S10", "B", "C"]},
        index=["S10", "S10-1", "B", "C"],
    )
    made = GeneVocabulary.from_var(first)
    assert made.genes.tolist() == ids and made.symbols.tolist() == ["", "", "B", "C"]
    second = pd.DataFrame(index=["S10", "S10-1", "C", "B"])  # (S10 is gene 1 here)
    np.testing.assert_array_equal(made.align(second, min_overlap=0.1).col_map, [-1, -1, 3, 2])
    np.testing.assert_array_equal(made.align(first).col_map, [0, 1, 2, 3])  # (by ids)
    # without a symbol column (10x read by scanpy), a name and those made of it are no
    # symbol (review191: the swap again); the ids name them
    plain = first.drop(columns="gene_symbols")
    made = GeneVocabulary.from_var(plain)
    assert made.symbols.tolist() == ["", "", "B", "C"]
    np.testing.assert_array_equal(made.align(second, min_overlap=0.1).col_map, [-1, -1, 3, 2])
    lone = pd.DataFrame({"gene_ids": ids[:2]}, index=["NKX2-1", "B-1"])  # (no stem: names)
    assert GeneVocabulary.from_var(lone).symbols.tolist() == ["NKX2-1", "B-1"]
    # a symbol column of other text, or with gaps, corrects nothing (review191: genes lost)
    names = ["TP53", "CD3E", "MS4A1", "ACTB"]
    for other in (ids, [None, "CD3E", "nan", "ACTB"], ["TP53", "", "MS4A1", "OLD"]):
        var = pd.DataFrame({"gene_ids": ids, "gene_name": other}, index=names)
        assert GeneVocabulary.from_var(var).symbols.tolist() == names


def test_vocabulary_roundtrip(tmp_path):
    vocab = GeneVocabulary(["g1", "g2"], symbols=["S1", "S2"])
    vocab.save(tmp_path / "genes.tsv")
    assert GeneVocabulary.load(tmp_path / "genes.tsv") == vocab


def test_collection_aligns_missing_genes_as_zeros(indexed_paths):
    # vocabulary: gene 0, one unknown gene, gene 3 -> columns [count i+1, 0, (1 if i % 11 == 2)]
    genes = ["ENSG00000000000", "ENSG99999999999", "ENSG00000000003"]
    coll = CellCollection(indexed_paths["h5ad"], genes=genes, min_overlap=0.1)
    x = coll.read(np.arange(30)).toarray()
    np.testing.assert_array_equal(x[:, 0], np.arange(1, 31))
    assert (x[:, 1] == 0).all()
    np.testing.assert_array_equal(x[:, 2], (np.arange(30) % 11 == 2).astype(np.float32))


def test_vocabulary_takes_ensembl_ids_from_a_column_when_var_names_are_symbols():
    """10x / Kang layout: symbols as var_names, Ensembl ids in gene_ids."""
    ids = ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003"]
    var = pd.DataFrame({"gene_ids": ids}, index=pd.Index(["A", "B", "C"]))
    vocab = GeneVocabulary.from_var(var)
    assert vocab.genes.tolist() == ids and vocab.symbols.tolist() == ["A", "B", "C"]
    assert vocab.align(var).identity  # the store it came from
    # a query that has Ensembl ids only, and one that has symbols only, both align
    np.testing.assert_array_equal(vocab.align(_var(ids[::-1])).col_map, [2, 1, 0])
    np.testing.assert_array_equal(vocab.align(_var(["C", "A"])).col_map, [2, 0])
    # on a tie between symbols and ids, the ids decide: symbols here point elsewhere
    both = pd.DataFrame({"gene_ids": ids}, index=pd.Index(["B", "A", "C"]))
    gm = vocab.align(both)
    assert gm.key == "gene_ids->ids" and gm.identity


def test_vocabulary_keeps_var_names_when_the_id_column_cannot_serve():
    syms = pd.Index(["A", "B", "C"])
    # ids with a duplicate, or not Ensembl ids: var_names stay the ids
    dup = pd.DataFrame({"gene_ids": ["ENSG00000000001"] * 2 + ["ENSG00000000003"]}, index=syms)
    assert GeneVocabulary.from_var(dup).genes.equals(syms)
    other = pd.DataFrame({"gene_ids": ["x1", "x2", "x3"]}, index=syms)
    assert GeneVocabulary.from_var(other).genes.equals(syms)
    # Ensembl var_names: a symbol column (gene_symbol, as CellBench and Kang name it) is read
    ens = pd.DataFrame(
        {"gene_symbol": ["A", "B", "C"]},
        index=pd.Index(["ENSG00000000001", "ENSG00000000002", "ENSG00000000003"]),
    )
    vocab = GeneVocabulary.from_var(ens)
    assert vocab.genes.equals(ens.index) and vocab.symbols.tolist() == ["A", "B", "C"]


@pytest.mark.parametrize("name", ["kang2018", "cellbench_lung"])
def test_vocabulary_of_the_real_data_uses_ensembl_ids(name):
    import anndata as ad

    from cellsift.datasets import shared_data_path

    try:
        path = shared_data_path(name)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    var = ad.read_h5ad(path, backed="r").var
    vocab = GeneVocabulary.from_var(var)
    assert vocab.genes.equals(pd.Index(var["gene_ids"].astype(str)))
    # the symbols: the symbol column's, those naming two genes (CellBench's Y_RNA) left out
    symbols = pd.Index(var["gene_symbol"].astype(str))
    assert vocab.symbols.equals(pd.Index(np.where(symbols.duplicated(keep=False), "", symbols)))
    assert vocab.align(var).identity


def test_the_real_data_sets_align_onto_each_other_without_a_gene_said_twice():
    """Kang's genes (an older Ensembl release: ENSG00000085231 is TAF9 there, AK6 in
    CellBench, whose TAF9 is another id) and CellBench's, each onto the other's: no gene of
    one is said to name a gene of the other twice (review214)."""
    import anndata as ad

    from cellsift.datasets import shared_data_path

    try:
        kang, cellbench = (
            ad.read_h5ad(shared_data_path(n), backed="r").var.copy()
            for n in ("kang2018", "cellbench_lung")
        )
    except FileNotFoundError as err:
        pytest.skip(str(err))
    for a, b in ((kang, cellbench), (cellbench, kang)):
        for of in ("vocabulary", "smaller"):
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                gm = GeneVocabulary.from_var(a).align(b, of=of, min_overlap=0.0)
            assert gm.twice == {}
            assert not [w for w in said if "are not read" in str(w.message)]


def test_a_store_in_another_gene_order_gives_sorted_rows(tmp_path):
    """torch's sparse CSR kernels assume each row's column indices sorted: a store whose genes
    are in another order than the vocabulary, or whose rows are stored unsorted, must not break
    that (x.mul(dense) was wrong)."""
    import anndata as ad
    import scipy.sparse as sp
    import torch

    from cellsift.data import IterableCellDataset, open_writer

    var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(6)])
    x = sp.csr_matrix(np.arange(1, 13, dtype=np.float32).reshape(2, 6))
    obs = pd.DataFrame(index=["a", "b"])
    for name, v in (("fwd", var), ("rev", var.iloc[::-1])):
        with open_writer(tmp_path / f"{name}.h5ad", v, n_obs=2) as w:
            w.append(x, obs)
    # and one in the vocabulary's order whose rows are stored unsorted (valid CSR)
    backwards = (x.data.reshape(2, 6)[:, ::-1].ravel(), x.indices.reshape(2, 6)[:, ::-1].ravel())
    unsorted = sp.csr_matrix((*backwards, x.indptr), shape=x.shape)
    ad.AnnData(unsorted, obs=obs, var=var).write_h5ad(tmp_path / "unsorted.h5ad")
    paths = [tmp_path / f"{name}.h5ad" for name in ("fwd", "rev", "unsorted")]
    batch = next(iter(IterableCellDataset(CellCollection(paths), mode="sequential", batch_size=6)))
    crow, col = batch["x_ng"].crow_indices(), batch["x_ng"].col_indices()
    for r in range(6):
        assert (np.diff(col[crow[r] : crow[r + 1]].numpy()) > 0).all()
    dense = torch.from_numpy(np.vstack([x.toarray(), x.toarray()[:, ::-1], x.toarray()]))
    scale = torch.arange(36, dtype=torch.float32).reshape(6, 6)
    torch.testing.assert_close(batch["x_ng"].mul(scale).to_dense(), dense * scale)


def test_a_models_query_needs_half_its_genes_or_5000():
    """of="vocabulary" (a model's input): the overlap counts against the model's genes, not
    the query's; below half of them (and 5,000, SCimilarity's threshold) an error, between
    5,000 and half a warning. of="smaller" (the stores of an atlas) counts against the
    smaller gene set."""
    vocab = GeneVocabulary([f"ENSG{i:011d}" for i in range(12_000)])
    panel = _var(list(vocab.genes[:300]))  # every gene the model's, 2.5% of them
    assert vocab.align(panel).n_matched == 300
    with pytest.raises(  # (every gene matches: ids are no suspect, the panel is)
        GeneAlignmentError, match=r"all 300 of its genes are the model's, but .* only 300 of"
    ):
        vocab.align(panel, of="vocabulary")
    with pytest.raises(GeneAlignmentError, match=r"299 of its 300 genes are the model's, but"):
        vocab.align(_var([*vocab.genes[:299], "ENSG99999999999"]), of="vocabulary")
    with pytest.raises(GeneAlignmentError, match=r"only 299 of its 400 genes match the model's"):
        vocab.align(
            _var([*vocab.genes[:299], *(_ens(50_000 + i) for i in range(101))]), of="vocabulary"
        )
    with pytest.warns(CellsiftWarning, match=r"5500 of the model's 12000 genes are found \(45%"):
        gm = vocab.align(_var(list(vocab.genes[:5_500])), of="vocabulary")
    assert gm.n_matched == 5_500
    with pytest.warns(CellsiftWarning, match=r"5999 of the model's 12000 genes are found \(49%"):
        vocab.align(_var(list(vocab.genes[:5_999])), of="vocabulary")  # (not "50%": below half)
    with pytest.raises(GeneAlignmentError, match="need 5000"):
        vocab.align(_var(list(vocab.genes[:4_999])), of="vocabulary")
    small = GeneVocabulary(list(vocab.genes[:1000]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert small.align(_var(list(small.genes[:600])), of="vocabulary").n_matched == 600
    with pytest.raises(GeneAlignmentError, match="need 500"):
        small.align(_var(list(small.genes[:499])), of="vocabulary")


def test_a_gene_without_an_id_is_refused(tmp_path):
    """A vocabulary cannot hold a gene without an id (its genes.tsv could not be read back):
    refused where made, naming the gene, and a genes.tsv line without one is named, not
    skipped as a blank line (which shifted every later gene by one)."""
    with pytest.raises(ValueError, match="gene 1 of the vocabulary has an empty id"):
        GeneVocabulary(["A", " ", "C"])
    (tmp_path / "genes.tsv").write_text("gene_id\nA\n\nC\n")
    with pytest.raises(ValueError, match=r"gene 1 \(line 3\) has no gene_id"):
        GeneVocabulary.load(tmp_path / "genes.tsv")


def test_names_with_a_carriage_return_or_a_nul_are_refused(tmp_path):
    """Gene ids or symbols read from text with Windows line ends ('TP53\\r'): refused where
    the vocabulary is made, naming the gene and the fix; its genes.tsv would have read them
    back as other genes, and the bundle failed to load."""
    with pytest.raises(ValueError, match=r"gene 1's id 'TP53\\r' holds a carriage return"):
        GeneVocabulary(["A", "TP53\r", "C"])
    with pytest.raises(ValueError, match=r"gene 0's id '\\x00z' holds .* a NUL"):
        GeneVocabulary(["\x00z", "B"])
    with pytest.raises(ValueError, match=r"gene 0's symbol 'S\\rM' holds a carriage"):
        GeneVocabulary(["A", "B"], ["S\rM", "b"])
    # a store's symbols: a trailing \r stripped (Windows line ends), others holding one or a
    # NUL left out; its vocabulary saves and loads as it is
    var = pd.DataFrame(
        {"feature_name": ["TP53\r", "S\rM", "a\x00z", "GAPDH"]},
        index=[f"ENSG{i:011d}" for i in range(4)],
    )
    vocab = GeneVocabulary.from_var(var)
    assert vocab.symbols.tolist() == ["TP53", "", "", "GAPDH"]
    # a leading byte order mark (text saved "with BOM") stripped too, one elsewhere left out
    boms = var.assign(feature_name=["\ufeffTP53", "S\ufeffM", "a", "GAPDH"])
    assert GeneVocabulary.from_var(boms).symbols.tolist() == ["TP53", "", "a", "GAPDH"]
    # and a store's names aligned to a vocabulary are read so too (review174: a symbol
    # cleaned in the vocabulary matched no gene of a store spelling it so)
    symbols = GeneVocabulary(var.index, ["TP53", "CD4", "BRCA1", "GAPDH"])
    gm = symbols.align(_var(["\ufeffTP53", "CD4\r", "BRCA1", "GAPDH"]))
    assert gm.key == "var_names->symbols" and gm.n_matched == 4
    np.testing.assert_array_equal(gm.col_map, [0, 1, 2, 3])
    # a name written so beside the same name as written is not read as it (the one as
    # written is the gene; review175: both became one name, and the store was refused)
    gm = symbols.align(_var(["TP53", "CD4", "BRCA1", "GAPDH", "TP53\r", "\ufeffCD4", "GAPDH\x00"]))
    assert gm.n_matched == 4  # (a trailing NUL is kept: review176, numpy's text dropped it)
    np.testing.assert_array_equal(gm.col_map, [0, 1, 2, 3, -1, -1, -1])
    nul = GeneVocabulary.from_var(var.assign(feature_name=["TP53", "CD4", "C\x00", "GAPDH"]))
    assert nul.symbols.tolist() == ["TP53", "CD4", "", "GAPDH"]
    vocab.save(tmp_path / "store.tsv")
    back = GeneVocabulary.load(tmp_path / "store.tsv")
    assert back == vocab and back.symbols.equals(vocab.symbols)
    tabbed = GeneVocabulary(["A", "B\tx"])  # (a tab is quoted: it reads back)
    tabbed.save(tmp_path / "genes.tsv")
    assert GeneVocabulary.load(tmp_path / "genes.tsv") == tabbed


def test_no_overlap_says_what_kind_of_names_each_side_holds():
    """The commonest mismatch (symbols against Ensembl ids, mouse against human ids): the
    message says what each side's names are, with examples (review: only the counts)."""
    vocab = GeneVocabulary([_ens(i) for i in range(100)])
    with pytest.raises(GeneAlignmentError) as err:
        vocab.align(_var([f"SYM{i}" for i in range(100)]), of="vocabulary")
    assert (
        "Its var_names are not Ensembl ids (symbols? e.g. 'SYM0', 'SYM1'); the model's genes "
        "are Ensembl ids (ENSG..., e.g. 'ENSG00000000000'), with no symbols beside them."
    ) in str(err.value)
    # a model of symbols: no word of symbols beside them; a mix said as one (review)
    symbols = GeneVocabulary([f"SYM{i}" for i in range(100)])
    with pytest.raises(GeneAlignmentError) as err:
        symbols.align(_var([_ens(i) for i in range(50)] + [f"X{i}" for i in range(50)]))
    assert str(err.value).endswith(
        "Its var_names are a mix of Ensembl ids (ENSG..., e.g. 'ENSG00000000000') and other "
        "names (e.g. 'X0', 'X1'); the vocabulary's genes are not Ensembl ids (symbols? e.g. "
        "'SYM0', 'SYM1')."
    )
    with pytest.raises(GeneAlignmentError, match=r"^store: no genes \(its var is empty"):
        symbols.align(_var([]), of="vocabulary")
    # one in ten names an id is as "not Ensembl ids" as nine in ten are ids (review: a
    # hair of float rounding made it a mix)
    for n in (10, 20, 2000):
        names = [_ens(i) for i in range(n // 10)] + [f"X{i}" for i in range(n - n // 10)]
        with pytest.raises(GeneAlignmentError, match="var_names are not Ensembl ids"):
            symbols.align(_var(names), of="vocabulary")
    with pytest.raises(GeneAlignmentError, match=r"are Ensembl ids \(ENSMUSG\.\.\., e\.g\."):
        vocab.align(_var([f"ENSMUSG{i:011d}" for i in range(100)]))


def test_ensembl_ids_named_twice_are_not_told_to_align_by_ensembl_ids():
    vocab = GeneVocabulary([_ens(i) for i in range(20)])
    query = _var([_ens(0), _ens(0), *[_ens(i) for i in range(2, 20)]])
    with pytest.warns(CellsiftWarning, match=r"\['ENSG00000000000'\], so they read as 0") as seen:
        vocab.align(query, of="vocabulary")
    said = str(seen[0].message)
    assert said.endswith("make the names unique with adata.var_names_make_unique().")


def test_a_vocabulary_given_with_a_gene_twice_is_a_config_error(tmp_path):
    """genes= with an id twice: the collection's error names the argument, as a
    ConfigError (the command line says it in one line, not as a traceback)."""
    from cellsift.data import CellCollection
    from cellsift.datasets import indexed_atlas
    from cellsift.errors import ConfigError

    adata = indexed_atlas(40, 10, path=None)
    genes = list(adata.var_names)
    with pytest.raises(ConfigError, match=r"genes= .*duplicate ids.*make them unique"):
        CellCollection(adata, genes=[genes[0], genes[0], *genes[1:]])


def test_names_padded_with_spaces_match_their_genes():
    """Gene names with spaces or tabs around them (a hand-edited table, a spreadsheet's
    export) are read as the names they pad, in a store and in a vocabulary alike (hunt194:
    30% of a store's symbols padded read as 0, unsaid); one that then equals another name
    keeps its spelling (the one written so is the gene)."""
    symbols = ["TP53", "CD4", "BRCA1", "GAPDH"]
    vocab = GeneVocabulary([_ens(i) for i in range(4)], symbols)
    gm = vocab.align(_var(["TP53 ", " CD4", "\tBRCA1\t", "GAPDH"]), of="vocabulary")
    assert gm.key == "var_names->symbols" and gm.n_matched == 4
    np.testing.assert_array_equal(gm.col_map, [0, 1, 2, 3])
    gm = vocab.align(_var(["TP53", "TP53 ", "CD4", "BRCA1", "GAPDH"]), of="vocabulary")
    np.testing.assert_array_equal(gm.col_map, [0, -1, 1, 2, 3])
    # padded ids, in the store or in the vocabulary (versions stripped as ever)
    gm = vocab.align(_var([f" {_ens(i)}.3 " for i in range(4)]), of="vocabulary")
    assert gm.key == "var_names->ids"
    np.testing.assert_array_equal(gm.col_map, [0, 1, 2, 3])
    padded = GeneVocabulary([f"{_ens(i)} " for i in range(4)], [" TP53", "CD4", "BRCA1", "GAPDH"])
    np.testing.assert_array_equal(padded.align(_var([_ens(3), _ens(1)])).col_map, [3, 1])
    np.testing.assert_array_equal(padded.align(_var(["GAPDH", "TP53"])).col_map, [3, 0])
    # a vocabulary of a store's symbols reads them so too
    var = pd.DataFrame({"feature_name": ["TP53 ", "CD4"]}, index=[_ens(0), _ens(1)])
    assert GeneVocabulary.from_var(var).symbols.tolist() == ["TP53", "CD4"]


def test_ensembl_ids_in_a_column_of_any_name_are_matched():
    """Ensembl ids in a var column not among the usual names (scanpy's concatenate writes
    'gene_ids-0'): matched as the usual id columns are, for a query and for a vocabulary
    made of the store (hunt194: aligned by the symbols, 83 of 1,287 genes otherwise)."""
    ids = [_ens(i) for i in range(100)]
    vocab = GeneVocabulary(ids, [f"S{i}" for i in range(100)])
    symbols = [f"S{i}" if i % 5 else f"OLD{i}" for i in range(100)]  # (some renamed since)
    for column in ("gene_ids-0", "ensembl"):
        var = pd.DataFrame({column: ids[::-1]}, index=symbols[::-1])
        gm = vocab.align(var, of="vocabulary")
        assert gm.key == f"{column}->ids" and gm.n_matched == 100
        np.testing.assert_array_equal(gm.col_map, np.arange(100)[::-1])
        made = GeneVocabulary.from_var(var)
        assert made.genes.tolist() == ids[::-1] and made.symbols.tolist() == symbols[::-1]
    # a column of numbers or of other text is no candidate (nor an error)
    var = pd.DataFrame({"n_cells": np.arange(100), "kind": "Gene Expression"}, index=ids)
    assert vocab.align(var).key == "var_names->ids"


def test_genes_whose_id_changed_are_matched_by_their_symbol():
    """A store matched by ids, whose ids for some genes are another release's: those genes
    are matched by their symbols, where a symbol names one gene on each side and neither
    gene is matched otherwise (hunt194: CCL5, TXNIP, PSMB3 read as 0, their symbols the
    model's). A symbol whose gene is matched by id already, or that names two of the
    store's genes, matches nothing more."""
    ids = [_ens(i) for i in range(100)]
    vocab = GeneVocabulary(ids, [f"S{i}" for i in range(100)])
    new_ids = [_ens(1000 + i) if i < 10 else ids[i] for i in range(100)]
    symbols = [f"S{i}" if i < 80 else f"NEW{i}" for i in range(100)]  # (renamed since)
    var = pd.DataFrame({"gene_ids": new_ids}, index=symbols)
    gm = vocab.align(var, of="vocabulary")
    assert gm.n_matched == 100 and gm.key == "gene_ids->ids (+10 by var_names->symbols)"
    np.testing.assert_array_equal(gm.col_map, np.arange(100))
    # S0's id matched by gene 100 of the store; S1 named twice: neither is filled in (S0,
    # with an Ensembl id of its own, is not said to name X's gene twice)
    var = pd.DataFrame({"gene_ids": [*new_ids, ids[0], _ens(2000)]}, index=[*symbols, "X", "S1"])
    gm = vocab.align(var, of="vocabulary")
    assert gm.twice == {}
    assert gm.col_map[100] == 0 and gm.col_map[0] == -1  # (its id, not its symbol)
    assert gm.col_map[1] == gm.col_map[101] == -1
    np.testing.assert_array_equal(gm.col_map[2:100], np.arange(2, 100))
    assert gm.n_matched == 99 and gm.identity is False


@pytest.mark.parametrize("first", ["id", "symbol"])
def test_a_gene_named_by_its_id_and_by_its_symbol_is_said_to_be_read_once(first):
    """A query naming one model gene twice, by its Ensembl id and by its symbol (two
    columns of counts): one column was read and the other left out, unsaid (hunt234: a
    gene named twice by one kind of name reads as 0, with a warning). Said now, naming
    both; the vocabulary matched whole, or not."""
    vocab = GeneVocabulary([_ens(i) for i in range(4)], ["A", "B", "C", "D"])
    names = [_ens(0), "A"] if first == "id" else ["A", _ens(0)]
    for rest in ([_ens(1), _ens(2), "D"], ["B", "C"]):
        var = pd.DataFrame(index=[*names, *rest])
        with pytest.warns(UserWarning, match="1 of its genes are not read") as said:
            gm = vocab.align(var, source="q.h5ad", of="vocabulary")
        read = int(np.flatnonzero(gm.col_map[:2] == 0)[0])  # (by the key that won)
        assert gm.col_map[1 - read] == -1 and gm.twice == {1 - read: 0}
        text = str(said[0].message)
        assert text.startswith("q.h5ad: ")
        assert f"{names[1 - read]!r} ({_ens(0)}, read from {names[read]!r})" in text
    # a gene of the store with an Ensembl id of its own, whose symbol is a vocabulary
    # gene's (10x: MATR3 and MATR3-1, two ids; another release's symbol): another gene,
    # nothing said (review214)
    var = pd.DataFrame({"gene_ids": [_ens(9), _ens(0), _ens(1)]}, index=["A", "A-1", "B"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = vocab.align(var, min_overlap=0.0, of="vocabulary")
    assert gm.twice == {} and list(gm.col_map) == [-1, 0, 1]
    # ...in a column of ids of another name, the one the alignment reads (review216)
    for name in ("gene_ids-0", "ensembl_gene_id"):
        var = pd.DataFrame({name: [_ens(9), _ens(0), _ens(1)]}, index=["A", "A-1", "B"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert vocab.align(var, min_overlap=0.0, of="vocabulary").twice == {}
    # another column of ids (orthologues': not read by the alignment) tells nothing
    # (review215: it silenced the warning)
    var = pd.DataFrame(index=[_ens(0), "A", _ens(1), _ens(2), "D"])
    var["mouse_gene_id"] = [f"ENSMUSG{i:011d}" for i in range(5)]
    with pytest.warns(UserWarning, match="1 of its genes are not read"):
        assert vocab.align(var, min_overlap=0.0, of="vocabulary").twice == {1: 0}
    # a gene of each name once: nothing said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = vocab.align(pd.DataFrame(index=[_ens(0), "B", _ens(2), "D"]), of="vocabulary")
    assert gm.twice == {} and gm.n_matched == 4


def test_a_subset_of_the_models_genes_is_told_as_one():
    """Nearly every gene of a query the model's, but too few of the model's: the message
    says it is a panel or a subset (hunt194: one gene not the model's sent it to the
    message about kinds of ids and species, naming var_names though ids had matched)."""
    vocab = GeneVocabulary([_ens(i) for i in range(12_000)], [f"S{i}" for i in range(12_000)])
    var = pd.DataFrame({"gene_ids": [*vocab.genes[:1150], *(_ens(50_000 + i) for i in range(50))]})
    var.index = [*(f"S{i}" for i in range(1150)), *(f"X{i}" for i in range(50))]
    with pytest.raises(GeneAlignmentError) as err:
        vocab.align(var, source="kang.h5ad", of="vocabulary")
    said = str(err.value)
    assert said.startswith("kang.h5ad: 1150 of its 1200 genes are the model's, but they are only")
    assert "a gene panel or a subset" in said and "species" not in said


def test_symbols_in_lower_case_are_told_to_be_upper_cased_where_the_models_are():
    """A human model's symbols, written in lower case by the data (cd3e): the error offers
    upper-casing (with the species caveat), not only orthologues (hunt194)."""
    symbols = [f"GENE{i}" for i in range(100)]
    vocab = GeneVocabulary([_ens(i) for i in range(100)], symbols=symbols)
    with pytest.raises(GeneAlignmentError) as err:
        vocab.align(_var([s.lower() for s in symbols[:80]]), of="vocabulary")
    said = str(err.value)
    assert "80 of its var_names match ignoring case" in said
    assert "adata.var_names = adata.var_names.str.upper()" in said and "orthologues" in said


def test_var_columns_of_one_name_twice_or_of_other_labels_are_read_by_position():
    """A var holding two columns of one name (a concat's) or a column labelled by a number:
    aligned as before, those columns read by position (review187: AttributeError on the
    duplicated name, KeyError on the number's text)."""
    ids = [_ens(i) for i in range(40)]
    vocab = GeneVocabulary(ids, [f"S{i}" for i in range(40)])
    names = [f"X{i}" for i in range(40)]
    twice = pd.DataFrame({"gene_ids": ids[::-1], "n": 1, "m": 2}, index=names)
    twice.columns = ["gene_ids", "n", "n"]
    gm = vocab.align(twice, of="vocabulary")
    assert gm.key == "gene_ids->ids"
    np.testing.assert_array_equal(gm.col_map, np.arange(40)[::-1])
    assert GeneVocabulary.from_var(twice).genes.tolist() == ids[::-1]
    numbered = pd.DataFrame({0: ids[::-1]}, index=names)
    assert vocab.align(numbered).key == "0->ids"
    mouse = pd.DataFrame({0: [f"ENSMUSG{i:011d}" for i in range(40)]}, index=names)
    with pytest.raises(GeneAlignmentError, match=r"only 0 of its 40 genes match"):
        vocab.align(mouse)
    # the ids given twice (two columns of one name): neither is read, nothing fails; the
    # same values twice (a concat's copy) are read once (review188: neither)
    twice.columns = ["gene_ids", "gene_ids", "n"]
    with pytest.raises(GeneAlignmentError, match=r"only 0 of its 40 genes match"):
        vocab.align(twice)
    same = pd.concat([twice.iloc[:, :1]] * 2, axis=1)
    assert list(same.columns) == ["gene_ids", "gene_ids"]
    assert vocab.align(same).key == "gene_ids->ids"
    assert GeneVocabulary.from_var(same).genes.tolist() == ids[::-1]


def test_another_column_of_ids_fills_no_gene():
    """A column of Ensembl ids under another name serves as the best key, never to fill in
    genes the best key left (review187: orthologues' or paralogues' ids would)."""
    ids = [_ens(i) for i in range(40)]
    vocab = GeneVocabulary(ids, [f"S{i}" for i in range(40)])
    var = pd.DataFrame(
        {"paralog_id": [_ens(5000 + i) if i < 30 else _ens(69 - i) for i in range(40)]},
        index=[f"S{i}" if i < 30 else f"OTHER{i}" for i in range(40)],
    )
    gm = vocab.align(var, of="vocabulary", min_overlap=0.5)
    assert gm.key == "var_names->symbols" and gm.n_matched == 30
    np.testing.assert_array_equal(gm.col_map, [*range(30), *[-1] * 10])


def test_a_vocabulary_takes_ids_from_a_column_with_a_few_gaps_or_padded_names():
    """A first store's id column with a few genes without an id (a merge's gaps, a
    transgene) or with padded ids (a TSV's tab) still gives the vocabulary its Ensembl ids
    (hunt198: the vocabulary became the store's symbols, and a store of Ensembl ids then
    matched none of it); a gene without an id is named by its var_name."""
    ids = [_ens(i) for i in range(100)]
    symbols = [f"S{i}" for i in range(100)]
    gaps = pd.DataFrame({"gene_ids": [None if i in (5, 50, 70) else g for i, g in enumerate(ids)]})
    gaps.index = symbols
    vocab = GeneVocabulary.from_var(gaps)
    want = [symbols[i] if i in (5, 50, 70) else g for i, g in enumerate(ids)]
    assert vocab.genes.tolist() == want and vocab.symbols.tolist() == symbols
    padded = pd.DataFrame({"gene_ids": [f"{g}\t" for g in ids]}, index=[f" {s}" for s in symbols])
    vocab = GeneVocabulary.from_var(padded)
    assert vocab.genes.tolist() == ids and vocab.symbols.tolist() == symbols
    assert vocab.align(_var(ids[::-1]), of="vocabulary").n_matched == 100
    # too many gaps (over 1 in 10): no id column (the var_names are the ids)
    many = pd.DataFrame({"gene_ids": [None if i % 5 == 0 else g for i, g in enumerate(ids)]})
    many.index = symbols
    assert GeneVocabulary.from_var(many).genes.tolist() == symbols
