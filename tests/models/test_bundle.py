"""Bundles: round trip, SCimilarity import, and refusal of damaged bundles."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from cellsift.data import GeneVocabulary
from cellsift.errors import DataError
from cellsift.models import BundleError, import_scimilarity, load_bundle, save_bundle
from cellsift.nn import MLPEncoder
from cellsift.transforms import Log1p, NormalizeTotal

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "scimilarity_tiny"


@pytest.fixture
def imported(tmp_path):
    return import_scimilarity(FIXTURE, tmp_path / "bundle")


def test_names_of_one_cell_type_import_as_one_label(tmp_path):
    """Two of a model's label names that are one Cell Ontology term (a name and its
    synonym) become one label, keeping both names: the bundle loads."""
    from cellsift.models import MetricModel

    src = tmp_path / "model"
    shutil.copytree(FIXTURE, src)
    table = pd.read_csv(src / "label_ints.csv", index_col=0, dtype=str)
    names = [*table.iloc[:, 0], "B lymphocyte", "B cell"]
    pd.DataFrame({"0": names}).to_csv(src / "label_ints.csv")
    model = MetricModel.load(import_scimilarity(src, tmp_path / "bundle"))
    assert len(model.labels) == len(set(model.labels)) and "CL:0000236" in model.labels
    labels = json.loads((tmp_path / "bundle" / "labels.json").read_text())
    (b_cell,) = [lab for lab in labels if lab["id"] == "CL:0000236"]
    assert set(b_cell["source_name"].split("; ")) >= {"B lymphocyte", "B cell"}


def test_imported_scimilarity_bundle_embeds_like_scimilarity(imported):
    bundle = load_bundle(imported)
    arch = bundle.config["architecture"]
    enc = MLPEncoder(arch["n_genes"], arch["hidden"], arch["latent"]).eval()
    enc.load_state_dict(bundle.weights["encoder"])
    counts = torch.from_numpy(np.load(FIXTURE / "input_counts.npy"))
    x = Log1p()(NormalizeTotal(bundle.config["normalization"]["target_sum"])({"x_ng": counts}))
    with torch.no_grad():
        z = enc(x["x_ng"])
    np.testing.assert_allclose(z.numpy(), np.load(FIXTURE / "expected_embeddings.npy"), atol=1e-5)
    assert bundle.label_ids == ["CL:0000236", "CL:0000576", "CL:0000623", "CL:0000084"]
    assert [lab["name"] for lab in bundle.labels] == [
        "B cell",
        "monocyte",
        "natural killer cell",
        "T cell",
    ]
    assert list(bundle.genes.genes[:2]) == ["ENSG00000000001", "ENSG00000000002"]
    assert set(bundle.weights) == {"encoder", "decoder"}


def test_round_trip_and_atomic_overwrite(tmp_path):
    enc = MLPEncoder(20, (8,), 4)
    genes = GeneVocabulary([f"g{i}" for i in range(20)])
    path = save_bundle(
        tmp_path / "b",
        config={"model": "MetricModel"},
        modules={"encoder": enc},
        genes=genes,
        labels=[{"id": "CL:0000236", "name": "B cell"}],
    )
    b = load_bundle(path)
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(b.weights["encoder"][k], v)
    assert b.genes == genes and b.config["format_version"] == 1
    with pytest.raises(FileExistsError):
        save_bundle(path, config={}, modules={"encoder": enc}, genes=genes)
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary left behind
    # every file as the umask allows: a group that shares a bundle reads its weights too
    # (hunt231: safetensors made model.safetensors readable by its owner alone)
    umask = os.umask(0o002)
    try:
        shared = save_bundle(tmp_path / "shared", config={}, modules={"encoder": enc}, genes=genes)
    finally:
        os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in shared.iterdir()} == {
        p.name: 0o664 for p in shared.iterdir()
    }


def test_a_file_system_that_keeps_no_modes_still_gets_the_bundle(tmp_path, monkeypatch):
    """Where the weights' mode cannot be set (a file system without modes: EPERM), the
    bundle is written as safetensors made it (review212: the bundle was lost)."""
    enc = MLPEncoder(20, (8,), 4)
    genes = GeneVocabulary([f"g{i}" for i in range(20)])

    def refused(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refused)
    path = save_bundle(tmp_path / "b", config={}, modules={"encoder": enc}, genes=genes)
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(load_bundle(path).weights["encoder"][k], v)


def test_damaged_bundles_are_refused(imported, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(imported, corrupt)
    raw = bytearray((corrupt / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"model\.safetensors do not match their checksums"):
        load_bundle(corrupt)
    (corrupt / "labels.json").unlink()
    with pytest.raises(BundleError, match=r"incomplete, missing labels\.json"):
        load_bundle(corrupt)
    newer = tmp_path / "newer"
    shutil.copytree(imported, newer)
    cfg = json.loads((newer / "config.json").read_text())
    cfg["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(cfg))
    sums = json.loads((newer / "checksums.json").read_text())
    import hashlib

    sums["config.json"] = hashlib.sha256((newer / "config.json").read_bytes()).hexdigest()
    (newer / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(BundleError, match="upgrade cellsift"):
        load_bundle(newer)
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path / "nothing")
    # a truncated weights file whose checksum was remade, a folder in place of a file
    import hashlib

    cut = tmp_path / "cut"
    shutil.copytree(imported, cut)
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:5])
    sums = json.loads((cut / "checksums.json").read_text())
    sums["model.safetensors"] = hashlib.sha256((cut / "model.safetensors").read_bytes()).hexdigest()
    (cut / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(BundleError, match=r"model\.safetensors cannot be read"):
        load_bundle(cut)
    (cut / "genes.tsv").unlink()
    (cut / "genes.tsv").mkdir()
    with pytest.raises(BundleError, match=r"missing genes\.tsv \(or not as files\)"):
        load_bundle(cut)


def test_gene_names_round_trip_as_written_and_damaged_checksums_are_named(tmp_path):
    genes = GeneVocabulary(
        [f"ENSG{i:011d}" for i in range(6)], symbols=["NA", "null", "None", "n/a", "00001", "A"]
    )
    path = save_bundle(
        tmp_path / "b", config={}, modules={"encoder": MLPEncoder(6, (4,), 2)}, genes=genes
    )
    assert list(load_bundle(path).genes.symbols) == list(genes.symbols)
    sums = (path / "checksums.json").read_bytes()
    for damaged in (sums[: len(sums) // 2], b"\xff\xfe" + sums, b"[1]"):
        (path / "checksums.json").write_bytes(damaged)
        with pytest.raises(BundleError, match=r"checksums\.json is corrupt"):
            load_bundle(path)


def test_genes_tsv_header_spaces_are_an_editors_and_names_round_trip(tmp_path):
    """genes.tsv's header edited by hand (a space after it) still names its columns; names
    round-trip as written, spaces included (a vocabulary made of them is the model's)."""
    from cellsift.models import MetricModel
    from cellsift.models.bundle import _sha256

    genes = [f"ENSG{i:011d}" for i in range(30)]
    model = MetricModel(genes, ["CL:0000236", "CL:0000576"], hidden=(8,), latent=4)
    path = model.save(tmp_path / "b")
    lines = (path / "genes.tsv").read_text().splitlines()
    (path / "genes.tsv").write_text("\n".join([f"{lines[0]} ", *lines[1:]]) + "\n")
    sums = json.loads((path / "checksums.json").read_text())
    sums["genes.tsv"] = _sha256(path / "genes.tsv")
    (path / "checksums.json").write_text(json.dumps(sums))
    assert list(MetricModel.load(path).genes.genes) == genes
    spaced = GeneVocabulary(["A", "A ", " B"], symbols=["TP53", " ", "CD4"])
    spaced.save(tmp_path / "g.tsv")
    again = GeneVocabulary.load(tmp_path / "g.tsv")
    assert list(again.genes) == ["A", "A ", " B"] and list(again.symbols) == ["TP53", " ", "CD4"]


def test_scimilarity_label_table_is_read_by_its_column_0(tmp_path):
    """label_ints.csv with another column before SCimilarity's "0" (which its CellEmbedding
    reads): the labels are column "0"'s."""
    src = tmp_path / "model"
    shutil.copytree(FIXTURE, src)
    names = pd.read_csv(src / "label_ints.csv", index_col=0, dtype=str).iloc[:, 0].tolist()
    extra = pd.DataFrame({"n_cells": [str(100 + i) for i in range(len(names))], "0": names})
    extra.to_csv(src / "label_ints.csv")
    bundle = load_bundle(import_scimilarity(src, tmp_path / "bundle"))
    assert [lab["name"] for lab in bundle.labels] == names


def test_a_bundle_keeps_its_labels_under_a_newer_ontology(tmp_path):
    """A bundle saved when CL:0000054 was current (CL has since deprecated it for osteoblast,
    CL:0000062, also among its labels): loads with its own ids and names, neither merged
    (the label head would no longer fit) nor renamed."""
    from cellsift.models import MetricModel
    from cellsift.models.bundle import _sha256

    genes = [f"ENSG{i:011d}" for i in range(30)]
    model = MetricModel(
        genes, ["CL:0000062", "CL:0000236", "CL:0000624"], hidden=(8,), latent=4,
        classifier_weight=0.5,
    )  # fmt: skip
    path = model.save(tmp_path / "b")
    labels = json.loads((path / "labels.json").read_text())
    labels[2] = {"id": "CL:0000054", "name": "bone matrix secreting cell"}
    (path / "labels.json").write_text(json.dumps(labels))
    config = json.loads((path / "config.json").read_text())
    config["label_ids"][2] = "CL:0000054"  # (as the bundle was saved then)
    config["ontology"] = {"version": "2019-01-01"}
    (path / "config.json").write_text(json.dumps(config))
    sums = json.loads((path / "checksums.json").read_text())
    sums["labels.json"] = _sha256(path / "labels.json")
    sums["config.json"] = _sha256(path / "config.json")
    (path / "checksums.json").write_text(json.dumps(sums))
    loaded = MetricModel.load(path)
    assert loaded.labels == ["CL:0000062", "CL:0000236", "CL:0000054"]
    assert loaded.label_names[2] == "bone matrix secreting cell"
    # the ontology its labels were harmonised to, not the installed one, saved again with
    # them (hunt273: the installed version replaced it)
    assert loaded.config["ontology"] == {"version": "2019-01-01"}
    again = json.loads((loaded.save(tmp_path / "again") / "config.json").read_text())
    assert again["ontology"] == {"version": "2019-01-01"}
    x = np.random.default_rng(0).poisson(1.0, (5, 30)).astype(np.float32)

    adata = ad.AnnData(x, var=pd.DataFrame(index=genes))
    np.testing.assert_allclose(loaded.embed(adata), model.embed(adata), atol=1e-6)
    assert loaded.predict(adata).attrs["probabilities"].shape == (5, 3)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("layer_sizes.json", '{"network.0.1.weight": [64, 50]}', "layer_sizes.json gives"),
        ("layer_sizes.json", "not json", r"layer_sizes\.json cannot be read"),
        ("encoder.ckpt", b"PK\x03\x04 truncated", r"encoder\.ckpt cannot be read"),
        ("label_ints.csv", "", r"label_ints\.csv cannot be read"),
        (
            "label_ints.csv",
            ",0\n0,B cell\n1,CD4-positive, alpha-beta T cell\n",
            r"in line 3, saw 3: a line holds more than a number and a name; quote a name",
        ),
        ("hyperparameters.json", "{", r"hyperparameters\.json cannot be read"),
        ("hyperparameters.json", '{"dropout": "0.5"}', r"dropout is '0\.5', not a probab"),
        ("hyperparameters.json", '{"dropout": null}', "dropout is None, not a probability"),
        ("hyperparameters.json", '{"residual": true}', r"sets residual: .* cellsift's MLP"),
        ("layer_sizes.json", '{"network.0.1.weight": 64}', "has the shape 64, not a list"),
    ],
)
def test_a_damaged_scimilarity_directory_is_named(tmp_path, name, content, message):
    """A file that cannot be the model's, or a network cellsift would build otherwise (a
    residual one), is named; nothing is written."""
    src = tmp_path / "model"
    shutil.copytree(FIXTURE, src)
    if isinstance(content, bytes):
        (src / name).write_bytes(content)
    else:
        (src / name).write_text(content)
    from cellsift.errors import CellsiftError

    with pytest.raises(CellsiftError, match=message):
        import_scimilarity(src, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_labels_outside_the_ontology_import_as_written(tmp_path):
    """A SCimilarity model trained on labels outside the Cell Ontology (cell lines) is
    refused with the option that imports it; with ontology_aware=False its labels are
    taken as written, related to themselves only, and the bundle loads with the weights
    the import of CL labels loads."""
    from cellsift.models import MetricModel
    from cellsift.ontology import OntologyError

    src = tmp_path / "model"
    shutil.copytree(FIXTURE, src)
    lines = ["HCC827", "H1975", "A549", "H838"]
    pd.DataFrame({"0": lines}).to_csv(src / "label_ints.csv")
    with pytest.raises(OntologyError, match=r"ontology_aware=False"):
        import_scimilarity(src, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    model = MetricModel.load(import_scimilarity(src, tmp_path / "bundle", ontology_aware=False))
    assert model.labels == lines and model.label_names == lines
    assert model.config["loss"]["ontology_aware"] is False and model.config["ontology"] is None
    related = model.module.triplet.related_ll.numpy()
    np.testing.assert_array_equal(related, np.eye(len(lines), dtype=bool))
    labels = json.loads((tmp_path / "bundle" / "labels.json").read_text())
    assert [lab["source_name"] for lab in labels] == lines
    reference = MetricModel.load(import_scimilarity(FIXTURE, tmp_path / "cl"))
    ours, theirs = model.module.encoder.state_dict(), reference.module.encoder.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=0)
    with pytest.raises(TypeError, match="ontology_aware is True or False"):
        import_scimilarity(src, tmp_path / "other", ontology_aware="no")  # type: ignore[arg-type]


def test_weights_of_nan_and_an_impossible_format_version_are_refused(tmp_path):
    """A bundle (or a SCimilarity model) whose weights hold NaN or infinity would embed
    every cell as NaN: refused as it loads (imports), naming the weights. A format version
    below 0 is no bundle format."""
    from cellsift.errors import CellsiftError
    from cellsift.models import MetricModel
    from cellsift.models.bundle import _sha256

    model = MetricModel([f"g{i}" for i in range(12)], ["CL:0000236"], hidden=(8,), latent=4)
    with torch.no_grad():  # a decoder's NaN: the embeddings are fine, the model loads
        next(model.module.decoder.parameters())[0, 0] = float("nan")
    x = np.random.default_rng(0).poisson(1.0, (5, 12)).astype(np.float32)
    cells = ad.AnnData(x, var=pd.DataFrame(index=[f"g{i}" for i in range(12)]))
    loaded = MetricModel.load(model.save(tmp_path / "d"))
    np.testing.assert_array_equal(loaded.embed(cells), model.embed(cells))
    with torch.no_grad():
        next(model.module.encoder.parameters())[0, 0] = float("nan")
    path = model.save(tmp_path / "nan")
    with pytest.raises(BundleError, match=r"safetensors holds NaN or infinite encoder weights"):
        MetricModel.load(path)
    # a label head's NaN labelled every cell as the first label (hunt238): refused as it
    # loads, and predict of such a model in memory is an error, not those calls
    headed = MetricModel(
        [f"g{i}" for i in range(12)],
        ["CL:0000236", "CL:0000084"],
        hidden=(8,),
        latent=4,
        classifier_weight=0.5,
    )
    with torch.no_grad():
        headed.module.classifier.weight[1, 0] = float("nan")
    with pytest.raises(BundleError, match=r"NaN or infinite classifier weights.* labels as NaN"):
        MetricModel.load(headed.save(tmp_path / "head"))
    with pytest.raises(DataError, match=r"cells: the label head gives 5 of 5 cells NaN"):
        headed.predict(cells, source="cells")
    headed.module.to(torch.bfloat16)  # (numpy has no bfloat16: the output is float32)
    assert headed.embed(cells).dtype == np.float32
    # a BatchNorm variance below 0 (a damaged file: no training makes one) embeds as NaN too
    with torch.no_grad():
        next(model.module.encoder.parameters())[0, 0] = 0.0
        bn = next(m for m in model.module.encoder.modules() if isinstance(m, torch.nn.BatchNorm1d))
        bn.running_var[1] = -0.5
    with pytest.raises(BundleError, match=r"negative variances \(encoder\..*running_var\)"):
        MetricModel.load(model.save(tmp_path / "negative"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["format_version"] = -3
    (path / "config.json").write_text(json.dumps(cfg))
    sums = json.loads((path / "checksums.json").read_text())
    sums["config.json"] = _sha256(path / "config.json")
    (path / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(BundleError, match=r"format_version -3 is no bundle format"):
        load_bundle(path)
    folder = tmp_path / "scimilarity"
    shutil.copytree(FIXTURE, folder)
    ckpt = torch.load(folder / "encoder.ckpt", weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("inf"))
    torch.save(ckpt, folder / "encoder.ckpt")
    with pytest.raises(
        CellsiftError, match=rf"encoder\.ckpt holds NaN or infinite weights, .* \({name}"
    ):
        import_scimilarity(folder, tmp_path / "imported")
    assert not (tmp_path / "imported").exists()


def test_a_load_between_two_saves_over_the_bundle_is_one_version(tmp_path, monkeypatch):
    """Two saves over the bundle while it is read (another process's): the load gives one
    whole version, never one's config with the other's weights. A file system that gives
    a freed folder's inode to the next folder made (ext4 does) made the second save look
    like no change."""
    import cellsift.models.bundle as bundle_module
    from cellsift.models import MetricModel

    genes = [f"ENSG{i:011d}" for i in range(30)]
    torch.manual_seed(0)
    first = MetricModel(genes, ["CL:0000236"], hidden=(8,), latent=2, target_sum=1e4)
    torch.manual_seed(1)
    second = MetricModel(genes, ["CL:0000236"], hidden=(8,), latent=2, target_sum=5e3)
    path = first.save(tmp_path / "m")
    read = bundle_module.load_file

    def saved_over_twice_first(*args, **kwargs):  # (as the weights are opened)
        monkeypatch.setattr(bundle_module, "load_file", read)
        second.save(path, overwrite=True)
        second.save(path, overwrite=True)
        return read(*args, **kwargs)

    monkeypatch.setattr(bundle_module, "load_file", saved_over_twice_first)
    loaded = MetricModel.load(path)
    assert loaded.config["normalization"]["target_sum"] == 5e3
    for key, value in second.module.encoder.state_dict().items():
        torch.testing.assert_close(loaded.module.encoder.state_dict()[key], value)


def test_a_bundle_folder_holding_other_files_is_not_replaced(tmp_path, monkeypatch):
    """overwrite replaces a bundle's folder whole: one that holds other files too (a user's
    notes, another bundle saved inside it) is refused, naming them, and nothing is lost.
    A folder that can be entered but not opened to list (Windows cannot open folders) still
    loads."""
    from cellsift.models import MetricModel

    model = MetricModel([f"g{i}" for i in range(20)], ["CL:0000236"], hidden=(8,), latent=2)
    outer = model.save(tmp_path / "outer")
    model.save(outer / "inner")
    (outer / "notes.txt").write_text("kept")
    with pytest.raises(FileExistsError, match=r"holds other files too \(inner, notes\.txt\)"):
        model.save(outer, overwrite=True)
    assert (outer / "notes.txt").read_text() == "kept" and (outer / "inner" / "genes.tsv").exists()
    (outer / "notes.txt").unlink()
    shutil.rmtree(outer / "inner")
    (outer / ".git").mkdir()  # (a hidden folder, and hidden notes, are a user's: kept)
    (outer / ".notes").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds other files too \(\.git, \.notes\)"):
        model.save(outer, overwrite=True)
    shutil.rmtree(outer / ".git")
    (outer / ".notes").unlink()
    (outer / ".DS_Store").write_text("")  # (a file manager's own file goes with it)
    model.save(outer, overwrite=True)  # (a bundle alone: replaced)
    import os

    real = os.open

    def no_folders(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_folders)
    assert MetricModel.load(outer).genes == model.genes


def test_genes_tsv_edited_with_checksums_made_anew_is_refused(tmp_path):
    """Two genes swapped (or a symbol changed) in genes.tsv, its checksum made anew: the
    counts would feed other genes' weights, so the bundle is refused (config.json holds a
    digest of the genes, as it holds the labels' order); a bundle saved before the digest
    (none in config.json) loads as before."""
    from cellsift.models import MetricModel
    from cellsift.models.bundle import _sha256

    genes = [f"ENSG{i:011d}" for i in range(30)]
    model = MetricModel(genes, ["CL:0000236", "CL:0000576"], hidden=(8,), latent=4)
    path = model.save(tmp_path / "b", overwrite=True)

    def rewrite(file: str, text: str) -> None:
        (path / file).write_text(text)
        sums = json.loads((path / "checksums.json").read_text())
        sums[file] = _sha256(path / file)
        (path / "checksums.json").write_text(json.dumps(sums))

    original = (path / "genes.tsv").read_text()
    lines = original.splitlines()
    swapped = [lines[0], lines[2], lines[1], *lines[3:]]
    rewrite("genes.tsv", "\n".join(swapped) + "\n")
    with pytest.raises(BundleError, match=r"genes\.tsv lists other genes, or the same in anoth"):
        MetricModel.load(path)
    rewrite("genes.tsv", original)
    assert list(MetricModel.load(path).genes.genes) == genes
    config = json.loads((path / "config.json").read_text())
    for odd in (123, "", ["x"], None, "z" * 64, config["genes_sha256"].upper()):
        rewrite("config.json", json.dumps({**config, "genes_sha256": odd}))
        with pytest.raises(BundleError, match=r"genes_sha256 is .*, not a digest of the genes"):
            MetricModel.load(path)
    del config["genes_sha256"]  # (as a bundle saved before it)
    rewrite("config.json", json.dumps(config))
    rewrite("genes.tsv", "\n".join(swapped) + "\n")
    assert list(MetricModel.load(path).genes.genes[:2]) == [genes[1], genes[0]]
