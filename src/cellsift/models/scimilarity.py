"""Reading SCimilarity model directories (encoder.ckpt, layer_sizes.json, gene_order.tsv, ...).

The checkpoints are plain state dicts of the same module layout as
:class:`cellsift.nn.MLPEncoder` / :class:`~cellsift.nn.MLPDecoder`, loaded with
``weights_only=True`` (no pickled code runs). SCimilarity embeds ``log1p(counts / total * 1e4)``
of the genes in ``gene_order.tsv``, in that order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .._utils import error_text, is_whole
from ..data.genes import GeneVocabulary
from ..errors import CellsiftError, ConfigError
from ..nn import MLPDecoder, MLPEncoder
from .bundle import check_device, load_state, loss_setting_problem, unusable_weights

__all__ = ["ScimilarityModel", "import_scimilarity", "read_scimilarity"]

_NEEDED = ("encoder.ckpt", "layer_sizes.json", "gene_order.tsv")


@dataclass
class ScimilarityModel:
    """What a SCimilarity model directory holds, as cellsift objects."""

    encoder: MLPEncoder
    decoder: MLPDecoder | None
    genes: list[str]
    labels: list[str]
    hyperparameters: dict[str, Any] = field(default_factory=dict)


#: A Linear layer's weight in SCimilarity's layout: ``network.<block>.<layer>.weight`` in the
#: hidden blocks, ``network.<block>.weight`` for the last Linear (to the latent space).
_LINEAR = re.compile(r"network\.(\d+)(?:\.(\d+))?\.weight")


#: First lines of a gene list that are a header (read as one gene more).
_HEADERS = frozenset(
    {
        "gene",
        "genes",
        "gene_id",
        "gene_ids",
        "gene_name",
        "gene_symbol",
        "symbol",
        "feature_name",
        "name",
        "id",
        "ensembl_id",
    }
)


def _hidden_sizes(state: dict[str, torch.Tensor], folder: Path) -> tuple[list[int], int, int]:
    """(hidden sizes, latent size, n_genes) from an encoder state dict: its ``network.*``
    Linear weights in block order, which must chain (each takes what the one before gives)."""
    linear = []
    for key, value in state.items():
        m = _LINEAR.fullmatch(key)
        if m and value.ndim == 2:
            linear.append((int(m[1]), int(m[2] or 0), key))
    ckpt = folder / "encoder.ckpt"
    if not linear:
        keys = ", ".join(list(state)[:5]) or "none"
        raise CellsiftError(
            f"{ckpt} is not a SCimilarity encoder: it has no Linear weights under "
            f"network.<block> (its keys: {keys}, ...). Copy the model directory again."
        )
    linear.sort()
    shapes = [(key, tuple(state[key].shape)) for *_, key in linear]  # (out, in) per Linear
    for (prev, (gives, _)), (key, (_, takes)) in pairwise(shapes):
        if takes != gives:
            raise CellsiftError(
                f"{ckpt} is not a SCimilarity encoder: its layers do not chain ({key} takes "
                f"{takes} inputs, {prev} gives {gives}). The file is damaged or the directory "
                "mixes files of different models; copy the model directory again."
            )
    sizes = [shape for _, shape in shapes]
    return [s[0] for s in sizes[:-1]], sizes[-1][0], sizes[0][1]


def _read(folder: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    """``reader(folder / name)``; a file it cannot read is an error naming it."""
    try:
        return reader(folder / name)
    except Exception as err:
        raise CellsiftError(
            f"{folder / name} cannot be read ({error_text(err)}); the file is "
            "truncated, corrupt or not SCimilarity's. Copy the model directory again."
        ) from err


def _state_dict(path: Path, map_location: str) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)):
        raise ValueError("no state_dict in it")
    other = [k for k, v in ckpt["state_dict"].items() if not isinstance(v, torch.Tensor)]
    if other:
        raise ValueError(f"its state_dict holds {other[0]!r}, which is not a tensor")
    laid = [(k, v.layout) for k, v in ckpt["state_dict"].items() if v.layout != torch.strided]
    if laid:  # (SCimilarity saves dense weights; torch's checks do not take sparse ones)
        raise ValueError(
            f"its state_dict holds {laid[0][0]!r} as a {laid[0][1]} tensor, not a dense one "
            "(SCimilarity saves dense weights); save it dense (tensor.to_dense())"
        )
    return ckpt["state_dict"]


def _json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that holds an object (``what`` it maps, for the message)."""
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
        kind = kinds.get(type(value), "a number")
        raise ValueError(f"it holds {kind}, not a JSON object of {what}")
    return value


def _layer_sizes(path: Path) -> dict[str, list[int]]:
    sizes = _json_object(path, "weight names to shapes")
    for key, shape in sizes.items():
        if not (isinstance(shape, list) and all(is_whole(n, 0) for n in shape)):
            raise ValueError(f"{key!r} has the shape {shape!r}, not a list of sizes")
    return sizes


def _hyperparameters(path: Path) -> dict[str, Any]:
    """hyperparameters.json, with the settings the network is built from checked."""
    hp = _json_object(path, "settings")
    for key, default in (("dropout", 0.5), ("input_dropout", 0.4)):
        value = hp.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ValueError(f"{key} is {value!r}, not a probability in [0, 1)")
    return hp


#: label_ints.csv as SCimilarity writes it: a header line, then each label's number and name
_LABEL_LAYOUT = (
    "SCimilarity's layout is a header line (',0'), then a line '<number>,<name>' for each "
    "label, numbered 0 to n - 1"
)


def _label_number(text: Any) -> int | None:
    """A label number as label_ints.csv writes it (whole, not negative), or None."""
    return int(text) if re.fullmatch(r"\s*\d+\s*", str(text)) else None


def _label_table(path: Path) -> list[str]:
    """The label names of label_ints.csv in the order of their numbers; an error where the
    first column is not the numbers 0 to n - 1 (columns swapped: the names were read as
    numbers) or a name is blank. A first line that starts with a number is read as the
    first label where the lines then number the labels (a file without its header line),
    else as the header."""
    try:
        headed = pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)
    except pd.errors.ParserError as err:  # (a hand-written file: a name's comma unquoted)
        said = str(err).strip().removeprefix("Error tokenizing data. C error: ")
        raise ValueError(
            f"{said}: a line holds more than a number and a name; quote a name that holds "
            'a comma, as SCimilarity writes it (2,"CD4-positive, alpha-beta T cell")'
        ) from None
    readings = [headed]
    if _label_number(headed.index.name) is not None:  # (its first line: a label?)
        readings.insert(
            0, pd.read_csv(path, index_col=0, header=None, dtype=str, keep_default_na=False)
        )
    problem = ""
    for table in readings:
        if table.shape[1] < 1:
            raise ValueError(f"it needs an index column and a label column ({_LABEL_LAYOUT})")
        # SCimilarity's CellEmbedding reads the column named "0" (its save_all writes only it)
        names = table["0"] if "0" in table.columns else table.iloc[:, 0]
        numbers = [_label_number(n) for n in table.index]
        # (no rows: a file of its header line alone, no labels)
        in_order = sorted(n for n in numbers if n is not None) == list(range(len(numbers)))
        # a first line of numbers that the headerless reading refused is a header only where
        # all of it is numbers (pandas' column labels, "0,1"): "2,C" then "0,B" is a label
        # out of range, not a header
        header = table is headed and len(readings) > 1
        whole = all(_label_number(c) is not None for c in table.columns)
        if in_order and (len(numbers) or len(readings) == 1) and (whole or not header):
            break
        if table is headed:  # (said of the file read with its first line as the header)
            odd = next((t for t, n in zip(table.index, numbers, strict=True) if n is None), None)
            problem = (
                f"'{odd}', not a label number" if odd is not None else "numbers not 0 to n - 1"
            )
    else:
        raise ValueError(f"its first column holds {problem} ({_LABEL_LAYOUT})")
    blank = [n for n, name in zip(numbers, names, strict=True) if not str(name).strip()]
    if blank:
        raise ValueError(f"label {blank[0]} has no name ({_LABEL_LAYOUT})")
    return [name for _, name in sorted(zip(numbers, names.tolist(), strict=True))]


def _gene_order(path: Path) -> list[str]:
    """One gene per line (the first column), as SCimilarity reads it: every name as written,
    none read as missing (a byte order mark that an editor put before the first is none)."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return [line.split("\t")[0].strip() for line in lines if line.strip()]


def read_scimilarity(
    path: str | os.PathLike[str], *, map_location: str = "cpu"
) -> ScimilarityModel:
    """Read a SCimilarity model directory into cellsift modules (in eval mode).

    Raises a clear error naming a missing file or a checkpoint that does not fit the genes.
    """
    map_location = str(check_device(map_location, "map_location"))  # (not the file's fault)
    folder = Path(path)
    missing = [f for f in _NEEDED if not (folder / f).exists()]
    if missing:
        raise CellsiftError(
            f"{folder} is not a SCimilarity model directory: missing {', '.join(missing)}."
        )
    enc_state = _read(folder, "encoder.ckpt", lambda p: _state_dict(p, map_location))
    sizes = _read(folder, "layer_sizes.json", _layer_sizes)
    wrong = [
        k
        for k, shape in sizes.items()
        if k in enc_state and list(enc_state[k].shape) != list(shape)
    ]
    if wrong:
        raise CellsiftError(
            f"{folder}: layer_sizes.json gives {wrong[0]} the shape {sizes[wrong[0]]}, "
            f"encoder.ckpt {list(enc_state[wrong[0]].shape)}; the directory mixes files of "
            "different models."
        )
    hidden, latent, n_in = _hidden_sizes(enc_state, folder)
    # one gene per line, as SCimilarity reads it (no "NA" or "null" read as missing)
    genes = _read(folder, "gene_order.tsv", _gene_order)
    if len(genes) == n_in + 1 and genes[0].strip().lower() in _HEADERS:
        raise CellsiftError(
            f"{folder}: gene_order.tsv's first line is {genes[0]!r}, a header, which "
            "SCimilarity writes none of (one gene a line, the encoder's inputs in order): "
            "remove that line."
        )
    if len(genes) != n_in:
        raise CellsiftError(
            f"{folder}: gene_order.tsv lists {len(genes)} genes but the encoder "
            f"takes {n_in}; the directory mixes files of different models."
        )
    try:  # (the vocabulary's own rule: no gene twice, Ensembl versions ignored)
        GeneVocabulary(genes)
    except ValueError as err:
        raise CellsiftError(
            f"{folder / 'gene_order.tsv'}: {err} Each of the encoder's inputs must be its own "
            "gene: the file is damaged or not this model's; copy the model directory again."
        ) from None
    hp: dict[str, Any] = {}
    if (folder / "hyperparameters.json").exists():
        hp = _read(folder, "hyperparameters.json", _hyperparameters)
    if hp.get("residual"):  # (SCimilarity's option: hidden blocks add their input)
        raise CellsiftError(
            f"{folder / 'hyperparameters.json'} sets residual: the model's hidden layers add "
            "their inputs, which cellsift's MLP encoder does not; its embeddings would differ "
            "from SCimilarity's. Import a model trained without residual blocks."
        )
    encoder = MLPEncoder(
        n_in,
        hidden,
        latent,
        dropout=hp.get("dropout", 0.5),
        input_dropout=hp.get("input_dropout", 0.4),
    )
    _check_finite(folder / "encoder.ckpt", enc_state)
    diff = load_state(encoder, enc_state)
    if diff:
        raise CellsiftError(
            f"{folder / 'encoder.ckpt'} is not a SCimilarity encoder of {n_in} genes -> "
            f"{hidden} -> {latent}: {diff}. The file is damaged or the directory mixes files "
            "of different models; copy the model directory again."
        )
    decoder = None
    if (folder / "decoder.ckpt").exists():
        decoder = MLPDecoder(n_in, hidden, latent, dropout=hp.get("dropout", 0.5))
        dec_state = _read(folder, "decoder.ckpt", lambda p: _state_dict(p, map_location))
        diff = load_state(decoder, dec_state)
        if diff:
            raise CellsiftError(
                f"{folder}: decoder.ckpt does not fit the encoder ({diff}); the directory "
                "mixes files of different models."
            )
        decoder.eval()
    labels: list[str] = []
    if (folder / "label_ints.csv").exists():
        labels = _read(folder, "label_ints.csv", _label_table)
    return ScimilarityModel(encoder.eval(), decoder, genes, labels, hp)


def _check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse encoder weights that would embed every cell as NaN (NaN or infinite values,
    negative variances)."""
    bad = unusable_weights(state)
    if bad:
        raise CellsiftError(
            f"{path} holds NaN or infinite weights, or negative variances ({bad}), which "
            "would embed every cell as "
            "NaN: the model had diverged in training, or the file is damaged. Import a model "
            "whose training converged."
        )


def import_scimilarity(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    ontology_aware: bool = True,
) -> Path:
    """Convert a SCimilarity model directory into a cellsift bundle (:mod:`.bundle`).

    Labels are harmonised onto Cell Ontology ids (an error lists names that are not CL
    terms; names of one term become one label); with ``ontology_aware=False`` (a model
    trained on labels outside the Cell Ontology: cell lines, a lab's own annotation) they
    are taken as written, each related to itself only, as
    ``MetricModel(..., ontology_aware=False)`` takes them. The normalisation SCimilarity
    applies (counts per 10,000, log1p) goes into the config. Embeddings of the bundle equal
    SCimilarity's.
    """
    from ..ontology import OntologyError, load_cell_ontology
    from .bundle import save_bundle

    if not isinstance(ontology_aware, bool):
        raise TypeError(f"ontology_aware is True or False, not {ontology_aware!r}.")
    model = read_scimilarity(path)
    cl = load_cell_ontology()
    if ontology_aware:
        try:
            ids = cl.harmonize(model.labels)
        except OntologyError as err:
            raise OntologyError(
                f"{path}: label_ints.csv: {err} To import a model trained on labels outside "
                "the Cell Ontology (cell lines, a lab's own annotation) with its labels as "
                "written, pass ontology_aware=False."
            ) from None
    else:
        ids = list(model.labels)
    names: dict[str, list[str]] = {}  # (names may meet: a synonym, an obsolete term's successor)
    for i, n in zip(ids, model.labels, strict=True):
        names.setdefault(i, []).append(n)
    labels = [
        {
            "id": i,
            "name": cl.name(i) if ontology_aware else i,
            "source_name": "; ".join(dict.fromkeys(n)),
        }
        for i, n in names.items()
    ]
    enc = model.encoder
    config = {
        "model": "MetricModel",
        "architecture": {
            "n_genes": enc.n_genes,
            "hidden": list(enc.hidden),
            "latent": enc.latent,
            "dropout": model.hyperparameters.get("dropout", 0.5),
            "input_dropout": model.hyperparameters.get("input_dropout", 0.4),
        },
        "normalization": {"target_sum": 1e4, "log1p": True},
        "loss": {**_loss_settings(model.hyperparameters, path), "ontology_aware": ontology_aware},
        "ontology": {"version": cl.version} if ontology_aware else None,
        "source": {
            "kind": "scimilarity",
            "path": str(Path(path).resolve()),
            "hyperparameters": model.hyperparameters,
        },
    }
    modules: dict[str, torch.nn.Module] = {"encoder": enc}
    if model.decoder is not None:
        modules["decoder"] = model.decoder
    return save_bundle(
        out,
        config=config,
        modules=modules,
        genes=GeneVocabulary(model.genes),
        labels=labels,
        overwrite=overwrite,
    )


def _loss_settings(hyperparameters: dict[str, Any], path: Any) -> dict[str, Any]:
    """The triplet settings of SCimilarity's hyperparameters.json as a bundle's ``loss``
    (what fine-tuning the imported model trains with); those it lacks keep cellsift's
    defaults, which are SCimilarity's published ones. Releases before 0.4 saved the
    triplet loss's weight as ``alpha``; a file holding both is refused where they differ."""
    names = {
        "margin": "margin",
        "triplet_loss_weight": "triplet_weight",
        "negative_selection": "negative",
    }
    if "alpha" in hyperparameters:
        given = hyperparameters.get("triplet_loss_weight", hyperparameters["alpha"])
        if given != hyperparameters["alpha"]:
            raise ConfigError(
                f"{path}: hyperparameters.json gives the triplet loss's weight twice, "
                f"triplet_loss_weight {given!r} and alpha (its name before SCimilarity 0.4) "
                f"{hyperparameters['alpha']!r}: keep the one the model was trained with."
            )
        names = {**names, "alpha": "triplet_weight"}
        names.pop("triplet_loss_weight")
    loss: dict[str, Any] = {}
    for theirs, ours in names.items():
        if theirs not in hyperparameters or (
            ours == "negative" and hyperparameters[theirs] is None
        ):
            continue  # (cellsift's default, SCimilarity's published one)
        value = hyperparameters[theirs]
        problem = loss_setting_problem(ours, value)
        if problem is not None:  # (refused now: a bundle that no load would take)
            raise ConfigError(
                f"{path}: hyperparameters.json's {theirs} is {value!r}, not {problem}; "
                "cellsift cannot train with it. Fix the value, or import a model trained with "
                "SCimilarity's settings."
            )
        loss[ours] = value if isinstance(value, str) else float(value)
    return loss
