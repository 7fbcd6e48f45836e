"""Bundles and SCimilarity directories whose files disagree with each other (hand-edited with
checksums made anew, other writers), and devices torch cannot use: clear errors naming the
file, the key and the fix; a bundle without decoder weights says so."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from cellsift._warnings import UntrainedDecoderWarning
from cellsift.errors import CellsiftError, ConfigError
from cellsift.models import BundleError, MetricModel, import_scimilarity, load_bundle
from cellsift.models.bundle import _sha256

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "scimilarity_tiny"
GENES = [f"ENSG{i:011d}" for i in range(30)]
LABELS = ["CL:0000236", "CL:0000576"]


def _model(**kwargs) -> MetricModel:
    torch.manual_seed(0)
    return MetricModel(GENES, LABELS, hidden=(8,), latent=4, **kwargs)


def _counts() -> ad.AnnData:
    x = np.random.default_rng(0).poisson(1.0, (6, len(GENES))).astype(np.float32)
    return ad.AnnData(x, var=pd.DataFrame(index=GENES))


def _resum(path: Path) -> None:
    """Checksums made anew after an edit, as a hand-editor or another writer would."""
    files = ("config.json", "model.safetensors", "genes.tsv", "labels.json")
    (path / "checksums.json").write_text(json.dumps({f: _sha256(path / f) for f in files}))


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        change(config)
        (path / "config.json").write_text(json.dumps(config))

    return edit


def _drop_weights(prefix: str) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        flat = load_file(path / "model.safetensors")
        kept = {k: v for k, v in flat.items() if not k.startswith(prefix)}
        save_file(kept, path / "model.safetensors")

    return edit


def _retyped(name: str, dtype: torch.dtype) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        flat = load_file(path / "model.safetensors")
        flat[name] = (flat[name] * 100).to(dtype)
        save_file(flat, path / "model.safetensors")

    return edit


def _edited(tmp_path: Path, edit: Callable[[Path], None], **kwargs) -> Path:
    path = _model(**kwargs).save(tmp_path / "bundle")
    edit(path)
    _resum(path)
    return path


# -- device ----------------------------------------------------------------------------------
def test_load_names_a_device_torch_cannot_use_before_reading(tmp_path, monkeypatch):
    path = _model().save(tmp_path / "bundle")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for load in (MetricModel.load, load_bundle):
        with pytest.raises(ConfigError, match=r"CUDA is not available.*device='cpu'"):
            load(path, device="cuda")
    with pytest.raises(ConfigError, match=r"device='gpu' is not a torch device.*'cuda'"):
        MetricModel.load(path, device="gpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"MPS .* not available.*device='cpu'"):
        MetricModel.load(path, device="mps")
    for device in ("meta", "hpu"):  # devices torch names, where a model does not run
        with pytest.raises(ConfigError, match=rf"device='{device}': a model runs on 'cpu'"):
            MetricModel.load(path, device=device)
    assert MetricModel.load(path, device="cpu:0").labels == LABELS  # the CPU by its index
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        MetricModel.load(path, device="cuda:3")
    assert MetricModel.load(path, device="cpu").labels == LABELS


def test_embedding_names_a_device_torch_cannot_use(tmp_path, monkeypatch):
    """As load does, embed / predict / tl.embed / embed_collection (before its staging
    folder is made)."""
    import cellsift as cs
    from cellsift.tasks import embed_collection

    model, cells = _model(), _counts()
    cells.write_h5ad(tmp_path / "cells.h5ad")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = {
        "embed": lambda device: model.embed(cells, device=device),
        "tl.embed": lambda device: cs.tl.embed(cells.copy(), model, device=device),
        "embed_collection": lambda device: embed_collection(
            model, tmp_path / "cells.h5ad", tmp_path / "out.zarr", device=device
        ),
    }
    before = model.embed(cells)
    for call in calls.values():
        with pytest.raises(ConfigError, match=r"CUDA is not available.*device='cpu'"):
            call("cuda")
        with pytest.raises(ConfigError, match=r"device='gpu' is not a torch device"):
            call("gpu")
        with pytest.raises(ConfigError, match=r"device='meta': a model runs on 'cpu'"):
            call("meta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]
    # the refused devices left the model where it was, its weights whole
    np.testing.assert_array_equal(model.embed(cells), before)
    np.testing.assert_array_equal(model.embed(cells, device="cpu:0"), before)


# -- bundles whose files disagree --------------------------------------------------------------
def _labels_without_id(path: Path) -> None:
    (path / "labels.json").write_text(json.dumps([{"name": "B cell"}, {"id": "CL:0000576"}]))


def _labels_reordered(path: Path) -> None:
    """labels.json's labels in another order: the label head's rows would be misread."""
    labels = json.loads((path / "labels.json").read_text())
    (path / "labels.json").write_text(json.dumps(labels[::-1]))


def test_a_state_cast_to_half_precision_whole_loads():
    """Every tensor of a state cast to float16 (a way to shrink a file), BatchNorm's
    counter too: it loads (review196: the counter, a real number there, was refused), while
    integers where the model holds real numbers are refused."""
    from cellsift.models.bundle import load_state
    from cellsift.nn import MLPEncoder

    torch.manual_seed(0)
    source = MLPEncoder(20, (16, 16), 8)
    half = {k: v.half() for k, v in source.state_dict().items()}
    target = MLPEncoder(20, (16, 16), 8)
    assert load_state(target, half) == ""
    torch.testing.assert_close(
        target.state_dict()["network.0.1.weight"], half["network.0.1.weight"].float()
    )
    ints = {**half, "network.0.1.weight": half["network.0.1.weight"].long()}
    assert "network.0.1.weight of torch.int64 there, torch.float32 here" in load_state(target, ints)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_weights("encoder."), r"model\.safetensors has no encoder weights"),
        (  # (integers for real numbers: they loaded, rounded, and embedded otherwise)
            _retyped("encoder.network.0.1.weight", torch.int64),
            r"model\.safetensors does not fit config\.json: encoder\.network\.0\.1\.weight "
            r"of torch\.int64 there, torch\.float32 here",
        ),
        (
            _edit_config(lambda c: c["architecture"].update(hidden=[16])),
            r"model\.safetensors does not fit config\.json: encoder\.network\.0\.1\.weight "
            r"\(8, 30\) there, \(16, 30\) here",
        ),
        (
            _edit_config(lambda c: c["loss"].update(foo=1)),
            r"config\.json's loss\.foo is not a setting .* \(those are margin, ",
        ),
        (  # (hunt273: loaded without a word, the model otherwise than the bundle's; a save
            # over it dropped them)
            _edit_config(lambda c: c["architecture"].update(activation="gelu")),
            r"config\.json's architecture\.activation is not a setting .* \(those are n_genes",
        ),
        (
            _edit_config(lambda c: c["normalization"].update(scale=2)),
            r"config\.json's normalization\.scale is not a setting .* upgrade cellsift",
        ),
        (
            _edit_config(lambda c: c["architecture"].update(n_genes=31)),
            r"config\.json's architecture\.n_genes is 31 but genes\.tsv lists 30 genes",
        ),
        (
            _edit_config(lambda c: c["architecture"].pop("latent")),
            r"config\.json's architecture\.latent is missing",
        ),
        (
            _edit_config(lambda c: c["architecture"].update(hidden="8")),
            r"config\.json's architecture\.hidden is '8', not a list of layer sizes",
        ),
        (
            _edit_config(lambda c: c["architecture"].update(dropout=1.5)),
            r"config\.json's settings do not make a MetricModel \(dropout is a probability",
        ),
        (  # (review213: NaN is named by the model's range check, as before)
            _edit_config(lambda c: c["normalization"].update(target_sum=float("nan"))),
            r"config\.json's settings do not make a MetricModel \(target_sum is the counts",
        ),
        (
            _edit_config(lambda c: c.pop("normalization")),
            r"config\.json's normalization is missing",
        ),
        (
            lambda p: (p / "config.json").write_text("{'not': json"),
            r"config\.json is not JSON",
        ),
        (_labels_without_id, r"labels\.json's label 0 \(\{'name': 'B cell'\}\) has no 'id'"),
        (
            lambda p: (p / "labels.json").write_text(json.dumps([{"id": "CL:0000236"}] * 2)),
            r"labels\.json lists \['CL:0000236'\] more than once",
        ),
        (lambda p: (p / "labels.json").write_text("[{"), r"labels\.json is not JSON"),
        (
            _edit_config(lambda c: c.update(label_ids=5)),
            r"config\.json's label_ids is 5, not a list of label ids",
        ),
        (
            _labels_reordered,
            r"labels\.json lists other labels, or the same in another order, than config\.json",
        ),
        (
            lambda p: (p / "genes.tsv").write_text("name\nA\n"),
            r"genes\.tsv cannot be the model's genes .*'gene_id' column",
        ),
        (
            lambda p: (p / "genes.tsv").write_text(
                "\n".join(["gene_id", *[f"G{i}" if i != 2 else "" for i in range(30)]]) + "\n"
            ),
            r"genes\.tsv cannot be the model's genes .*gene 2 \(line 4\) has no gene_id",
        ),
        (
            _edit_config(lambda c: c["loss"].update(margin=True)),
            r"config\.json's loss\.margin is True, not a distance >= 0",
        ),
        (  # (a whole number beyond float's range: inf, no OverflowError)
            _edit_config(lambda c: c["loss"].update(margin=10**400)),
            r"config\.json's loss\.margin is 10+, not a distance >= 0",
        ),
        (
            _edit_config(lambda c: c["loss"].update(triplet_weight="0.1")),
            r"config\.json's loss\.triplet_weight is '0\.1', not a number in \[0, 1\]",
        ),
        (
            _edit_config(lambda c: c["loss"].update(negative=None)),
            r"config\.json's loss\.negative is None, not semihard, hardest or random",
        ),
        (
            _edit_config(lambda c: c.update(decoder_trained="no")),
            r"config\.json's decoder_trained is 'no', not true or false",
        ),
        (
            _edit_config(lambda c: c.update(label_key=["cell_type"])),
            r"config\.json's label_key is \['cell_type'\], not the name of an obs column",
        ),
    ],
    ids=[
        "no-encoder-weights",
        "encoder-weight-integers",
        "hidden-edited",
        "unknown-loss-key",
        "unknown-architecture-key",
        "unknown-normalization-key",
        "n-genes-not-genes-tsv",
        "latent-missing",
        "hidden-not-a-list",
        "dropout-out-of-range",
        "target-sum-nan",
        "normalization-missing",
        "config-not-json",
        "label-without-id",
        "label-twice",
        "labels-not-json",
        "label-ids-not-a-list",
        "labels-reordered",
        "genes-tsv-without-gene-id",
        "genes-tsv-empty-gene-id",
        "margin-a-bool",
        "margin-beyond-float",
        "triplet-weight-text",
        "negative-null",
        "decoder-trained-text",
        "label-key-a-list",
    ],
)
def test_a_bundle_whose_files_disagree_is_refused_naming_file_and_key(tmp_path, edit, message):
    path = _edited(tmp_path, edit)
    with pytest.raises(BundleError, match=message) as err:
        MetricModel.load(path)
    assert str(path) in str(err.value) and "save the model again" in str(err.value).lower()


def test_label_head_weights_the_config_has_no_place_for_are_refused(tmp_path):
    path = _edited(
        tmp_path,
        _edit_config(lambda c: c["loss"].update(classifier_weight=0.0)),
        classifier_weight=0.5,
    )
    with pytest.raises(BundleError, match=r"model\.safetensors holds classifier weights"):
        MetricModel.load(path)


# -- a bundle without decoder weights ----------------------------------------------------------
def test_a_bundle_without_decoder_weights_warns_and_records_it(tmp_path):
    model = _model()
    intact = model.save(tmp_path / "intact")
    assert MetricModel.load(intact).decoder_trained  # no warning (they are errors in tests)
    path = _model().save(tmp_path / "headless")
    _drop_weights("decoder.")(path)
    _resum(path)
    with pytest.warns(UntrainedDecoderWarning, match=r"no trained decoder weights.*fine-tuning"):
        loaded = MetricModel.load(path)
    assert loaded.decoder_trained is False
    np.testing.assert_allclose(loaded.embed(_counts()), model.embed(_counts()), atol=1e-6)
    # saved again (with the random decoder's weights), it still says so
    again = loaded.save(tmp_path / "again")
    with pytest.warns(UntrainedDecoderWarning):
        assert MetricModel.load(again).decoder_trained is False
    # fine-tuning it against the random decoder is refused unless asked for
    data = _counts()
    data.obs["cell_type_ontology_term_id"] = np.resize(loaded.labels, data.n_obs)
    with pytest.raises(ConfigError, match=r"no trained decoder.*allow_untrained_decoder=True"):
        loaded.train(data, study_key=None, max_epochs=1)
    loaded.train(
        data,
        study_key=None,
        max_epochs=1,
        allow_untrained_decoder=True,
        default_root_dir=tmp_path / "run",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    assert loaded.decoder_trained and "decoder_trained" not in loaded.config


def test_a_scimilarity_import_without_decoder_loads_with_the_warning(tmp_path):
    src = tmp_path / "model"
    shutil.copytree(FIXTURE, src)
    (src / "decoder.ckpt").unlink()
    bundle = import_scimilarity(src, tmp_path / "bundle")
    with pytest.warns(UntrainedDecoderWarning, match=str(bundle)):
        assert MetricModel.load(bundle).decoder_trained is False
    full = import_scimilarity(FIXTURE, tmp_path / "full")
    assert MetricModel.load(full).decoder_trained is True


# -- SCimilarity directories whose files disagree ----------------------------------------------
def _scimilarity_with(tmp_path: Path, change: Callable[[dict], None]) -> Path:
    """The fixture with encoder.ckpt changed (layer_sizes.json written to agree with it)."""
    src = tmp_path / "model"
    shutil.copytree(FIXTURE, src)
    state = torch.load(src / "encoder.ckpt", weights_only=True)["state_dict"]
    change(state)
    torch.save({"state_dict": state}, src / "encoder.ckpt")
    sizes = {k: list(v.shape) for k, v in state.items()}
    (src / "layer_sizes.json").write_text(json.dumps(sizes))
    return src


def _prefixed(state: dict) -> None:
    for k in list(state):
        state[f"module.{k}"] = state.pop(k)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.update({"network.0.2.weight": torch.ones(7)}),
            r"encoder\.ckpt is not a SCimilarity encoder of 50 genes -> \[32, 32\] -> 16: "
            r"network\.0\.2\.weight \(7,\) there, \(32,\) here",
        ),
        (
            lambda s: s.update({"aux.weight": torch.randn(3, 3)}),
            r"encoder\.ckpt is not a SCimilarity encoder .*aux\.weight only there",
        ),
        (
            lambda s: s.update({"network.1.1.weight": torch.randn(32, 31)}),
            r"encoder\.ckpt is not a SCimilarity encoder: its layers do not chain "
            r"\(network\.1\.1\.weight takes 31 inputs, network\.0\.1\.weight gives 32\)",
        ),
        (_prefixed, r"encoder\.ckpt is not a SCimilarity encoder: it has no Linear weights"),
        (
            lambda s: s.update({"network.0.1.weight": s["network.0.1.weight"].to_sparse()}),
            r"encoder\.ckpt cannot be read .*'network\.0\.1\.weight' as a torch\.sparse_coo "
            r"tensor, not a dense one .*tensor\.to_dense\(\)",
        ),
    ],
    ids=["batchnorm-size", "extra-key", "layers-do-not-chain", "prefixed-keys", "sparse"],
)
def test_an_encoder_checkpoint_that_does_not_fit_is_named(tmp_path, change, message):
    src = _scimilarity_with(tmp_path, change)
    with pytest.raises(CellsiftError, match=message):
        import_scimilarity(src, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_a_gene_listed_twice_in_gene_order_is_named(tmp_path):
    src = tmp_path / "model"
    shutil.copytree(FIXTURE, src)
    genes = (src / "gene_order.tsv").read_text().splitlines()
    genes[7] = genes[3]
    (src / "gene_order.tsv").write_text("\n".join(genes))
    with pytest.raises(
        CellsiftError,
        match=r"gene_order\.tsv: gene vocabulary has duplicate ids.*'ENSG00000000004'",
    ):
        import_scimilarity(src, tmp_path / "bundle")


def test_a_training_run_folder_or_checkpoint_given_as_a_bundle_is_named(tmp_path):
    """A fit's log folder (its bundle in model/, or none yet) or a checkpoint file given
    where a bundle is wanted: named as what it is, with where the bundle is (review)."""
    run = tmp_path / "metric" / "version_0"
    run.mkdir(parents=True)
    (run / "hparams.yaml").write_text("lr: 0.005\n")
    with pytest.raises(
        BundleError,
        match=r"log folder, not a model bundle: it holds no bundle\. cellsift fit writes",
    ):
        load_bundle(run)
    _model().save(run / "model")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK")
    root = tmp_path / "no_logger"  # (cellsift fit without a logger: model/ in its root)
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "last.ckpt").write_bytes(b"PK")
    _model().save(root / "model")
    for folder in (run, root):  # a bundle there is named before its checkpoints (review)
        said = rf"run's folder, not a model bundle: its bundle is {folder / 'model'}"
        with pytest.raises(BundleError, match=said):
            MetricModel.load(folder)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"PK")
    for folder in (ckpt.parent, tmp_path):  # (train()'s root holds checkpoints/)
        with pytest.raises(BundleError, match=r"holds training checkpoints .* not a model"):
            MetricModel.load(folder)
    with pytest.raises(BundleError, match=r"last\.ckpt is a training checkpoint .* not a model"):
        MetricModel.load(ckpt)


def test_a_gene_order_saved_with_a_byte_order_mark_imports_its_first_gene(tmp_path):
    """A gene_order.tsv an editor saved as "UTF-8 with BOM": the mark is not part of the
    first gene's id, which read so matched no gene of the data (its counts read as zero,
    the embeddings wrong, and no warning: the other genes overlap)."""
    from cellsift.data import GeneVocabulary

    src = tmp_path / "model"
    shutil.copytree(FIXTURE, src)
    first = (src / "gene_order.tsv").read_text().splitlines()[0]
    (src / "gene_order.tsv").write_bytes(b"\xef\xbb\xbf" + (src / "gene_order.tsv").read_bytes())
    model = MetricModel.load(import_scimilarity(src, tmp_path / "bundle"))
    assert model.genes.genes[0] == first
    with pytest.raises(ValueError, match=r"gene 0's id '\\ufeffA' holds .* a byte order mark"):
        GeneVocabulary(["\ufeffA", "B"])
