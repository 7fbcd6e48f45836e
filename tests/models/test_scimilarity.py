"""Reading a model directory written by the real ``scimilarity`` package (fixture)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cellsift.errors import CellsiftError
from cellsift.models import read_scimilarity
from cellsift.transforms import Log1p, NormalizeTotal

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "scimilarity_tiny"


def test_embeddings_agree_with_scimilarity():
    model = read_scimilarity(FIXTURE)
    counts = torch.from_numpy(np.load(FIXTURE / "input_counts.npy"))
    x = Log1p()(NormalizeTotal(1e4)({"x_ng": counts}))["x_ng"]
    np.testing.assert_allclose(x.numpy(), np.load(FIXTURE / "expected_lognorm.npy"), atol=1e-5)
    with torch.no_grad():
        z = model.encoder(x)
    np.testing.assert_allclose(z.numpy(), np.load(FIXTURE / "expected_embeddings.npy"), atol=1e-5)
    assert model.genes[0] == "ENSG00000000001" and len(model.genes) == 50
    assert model.labels and model.decoder is not None
    with torch.no_grad():
        assert model.decoder(z).shape == (8, 50)


def test_incomplete_directory_is_named(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "m")
    (tmp_path / "m" / "layer_sizes.json").unlink()
    with pytest.raises(CellsiftError, match=r"missing layer_sizes\.json"):
        read_scimilarity(tmp_path / "m")
    (tmp_path / "m" / "layer_sizes.json").write_text("{}")
    (tmp_path / "m" / "gene_order.tsv").write_text("A\nB\n")
    with pytest.raises(CellsiftError, match="lists 2 genes but the encoder takes 50"):
        read_scimilarity(tmp_path / "m")
    # a header line (one gene more): named as a header, not as files of two models
    (tmp_path / "m" / "gene_order.tsv").write_text(
        "gene\n" + (FIXTURE / "gene_order.tsv").read_text()
    )
    with pytest.raises(CellsiftError, match=r"first line is 'gene', a header.* remove that line"):
        read_scimilarity(tmp_path / "m")
    # settings files that hold no JSON object: named (a list gave Python's TypeError words)
    shutil.copytree(FIXTURE, tmp_path / "n")
    for name, text, said in (
        ("hyperparameters.json", "[1]", "an array, not a JSON object of settings"),
        ("layer_sizes.json", '"x"', "a string, not a JSON object of weight names"),
    ):
        (tmp_path / "n" / name).write_text(text)
        with pytest.raises(
            CellsiftError, match=rf"{name} cannot be read \(ValueError: it holds {said}"
        ):
            read_scimilarity(tmp_path / "n")
        shutil.copy(FIXTURE / name, tmp_path / "n" / name)


def test_label_files_of_another_layout_are_read_in_order_or_named(tmp_path):
    """label_ints.csv without its header line keeps its first label (it was read as the
    header: dropped), rows out of order come in the order of their numbers; columns
    swapped (names read as the numbers' labels) or a blank name (a bundle written that
    its own load refused) are errors naming SCimilarity's layout."""
    read = {
        "no-header": ("0,B cell\n1,T cell\n2,monocyte\n", ["B cell", "T cell", "monocyte"]),
        "shuffled": (",0\n1,K562\n0,HEK293\n2,Jurkat\n", ["HEK293", "K562", "Jurkat"]),
        # a header of numbers (pandas' to_csv(index=False) of a frame): a header still
        "numbered-header": ("0,1\n0,B cell\n1,T cell\n", ["B cell", "T cell"]),
        "one-line": ("0,B cell\n", ["B cell"]),
        # (no header, the last label first: its first line was read as the header, the
        # label dropped; review201)
        "no-header-reversed": ("1,T cell\n0,B cell\n", ["B cell", "T cell"]),
        "no-header-last-first": ("3,NK\n0,B\n1,T\n2,mono\n", ["B", "T", "mono", "NK"]),
        "header-only": (",0\n", []),
    }
    refused = {
        "swapped": ("label,int\nHEK293,0\nK562,1\n", r"holds 'HEK293', not a label number"),
        "blank": ('"",0\n0,""\n1,"HEK293"\n', r"label 0 has no name"),
        "gap": (",0\n0,HEK293\n2,K562\n", r"holds numbers not 0 to n - 1"),
        "negative": (",0\n-1,HEK293\n0,K562\n", r"holds '-1', not a label number"),
        # no header, a first label out of range or twice: not read as a header (review202:
        # the label dropped)
        "first-out-of-range": ("2,C\n0,B\n", r"holds numbers not 0 to n - 1"),
        "first-twice": ("0,X\n0,B\n1,T\n", r"holds numbers not 0 to n - 1"),
    }
    for name, (text, labels) in {**read, **refused}.items():
        shutil.copytree(FIXTURE, tmp_path / name)
        (tmp_path / name / "label_ints.csv").write_text(text)
        if name in read:
            assert read_scimilarity(tmp_path / name).labels == labels
            continue
        with pytest.raises(CellsiftError, match=rf"{labels} \(SCimilarity's layout is a header"):
            read_scimilarity(tmp_path / name)


def test_a_device_this_machine_lacks_and_a_directory_given_as_a_bundle_are_named(tmp_path):
    """map_location naming a device this machine lacks is said as such (it was said as a
    corrupt encoder.ckpt); a SCimilarity directory loaded as a bundle names the import (it
    was taken for a folder of training checkpoints)."""
    from cellsift.errors import ConfigError
    from cellsift.models import MetricModel
    from cellsift.models.bundle import BundleError

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"map_location='cuda': CUDA is not available"):
            read_scimilarity(FIXTURE, map_location="cuda")
    with pytest.raises(ConfigError, match=r"map_location='gpu' is not a torch device"):
        read_scimilarity(FIXTURE, map_location="gpu")
    with pytest.raises(BundleError, match=r"is a SCimilarity model directory, not a model bundle"):
        MetricModel.load(FIXTURE)


def test_an_imported_model_fine_tunes_with_its_own_triplet_settings(tmp_path):
    """hyperparameters.json's margin, triplet weight and negative mode become the bundle's
    loss settings (what fine-tuning trains with); a mode cellsift lacks is named. The
    import's provenance survives a load and a save."""
    import json

    from cellsift.errors import ConfigError
    from cellsift.models import MetricModel, import_scimilarity

    src = tmp_path / "scimilarity"
    shutil.copytree(FIXTURE, src)
    hp = json.loads((src / "hyperparameters.json").read_text())
    hp.update(margin=0.3, triplet_loss_weight=0.5, negative_selection="hardest")
    (src / "hyperparameters.json").write_text(json.dumps(hp))
    model = MetricModel.load(import_scimilarity(src, tmp_path / "bundle"))
    assert (model.module.triplet.margin, model.module.triplet.negative) == (0.3, "hardest")
    assert model.module.triplet_weight == 0.5
    # where it came from survives a load and a save
    resaved = model.save(tmp_path / "resaved")
    imported = json.loads((tmp_path / "bundle" / "labels.json").read_text())
    assert json.loads((resaved / "labels.json").read_text()) == imported
    assert "source_name" in imported[0]
    config = json.loads((resaved / "config.json").read_text())
    assert config["source"]["kind"] == "scimilarity"
    hp["negative_selection"] = "easy"
    (src / "hyperparameters.json").write_text(json.dumps(hp))
    with pytest.raises(ConfigError, match=r"negative_selection is 'easy'"):
        import_scimilarity(src, tmp_path / "other")
    # values no model trains with are refused by the import, naming the file and the key,
    # not written into a bundle that no load takes
    hp["negative_selection"] = "hardest"
    for key, value, what in (
        ("triplet_loss_weight", 2.0, r"not a number in \[0, 1\]"),
        ("margin", -0.05, "not a distance >= 0"),
        ("margin", None, "not a distance >= 0"),
    ):
        (src / "hyperparameters.json").write_text(json.dumps({**hp, key: value}))
        with pytest.raises(ConfigError, match=rf"hyperparameters\.json's {key} is .*{what}"):
            import_scimilarity(src, tmp_path / "other")
        assert not (tmp_path / "other").exists()
    # releases before 0.4 saved the triplet weight as alpha: read as triplet_loss_weight is
    # (it was dropped, and fine-tuning trained with cellsift's 0.001); both, if different,
    # are refused
    old = {k: v for k, v in hp.items() if k != "triplet_loss_weight"}
    (src / "hyperparameters.json").write_text(json.dumps({**old, "alpha": 0.25}))
    model = MetricModel.load(import_scimilarity(src, tmp_path / "old"))
    assert model.module.triplet_weight == 0.25
    (src / "hyperparameters.json").write_text(json.dumps({**old, "alpha": 2.0}))
    with pytest.raises(ConfigError, match=r"hyperparameters\.json's alpha is .*not a number in"):
        import_scimilarity(src, tmp_path / "other")
    (src / "hyperparameters.json").write_text(
        json.dumps({**old, "alpha": 0.25, "triplet_loss_weight": 0.5})
    )
    with pytest.raises(ConfigError, match=r"triplet_loss_weight 0\.5 and alpha .* 0\.25"):
        import_scimilarity(src, tmp_path / "other")
