"""Model bundles: a directory anyone can read, no pickle.

    config.json        architecture, normalisation, cellsift version, format version
    model.safetensors  weights, keys prefixed by module ("encoder.", "decoder.")
    genes.tsv          the genes the model reads, in input order (gene_id, symbol)
    labels.json        label set in model order: Cell Ontology ids and names
    checksums.json     sha256 of each file above, verified on load

A bundle is written into a temporary directory and moved into place when complete. On
load, every file is checked against its checksum and against the others (a bundle edited by
hand, with checksums made anew, or written by another tool): what does not fit is a
:class:`BundleError` that names the file and the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import reprlib
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._utils import (
    as_float,
    atomic_path,
    check_replaceable,
    error_text,
    first_line,
    holds,
    is_number,
    is_whole,
    read_one_version,
    state_differences,
)
from .._warnings import UntrainedDecoderWarning
from ..data.genes import GeneVocabulary
from ..data.stores import refuse_other
from ..errors import CellsiftError, ConfigError
from ..losses.triplet import Negative, Relatives

__all__ = [
    "Bundle",
    "BundleError",
    "UntrainedDecoderWarning",
    "check_device",
    "load_bundle",
    "save_bundle",
]

FORMAT_VERSION = 1
_FILES = ("config.json", "model.safetensors", "genes.tsv", "labels.json")
#: A bundle's folder, which an overwrite replaces: one holding these files and no others.
_A_BUNDLE = holds(*_FILES, only=(*_FILES, "checksums.json"))


class BundleError(CellsiftError):
    """A bundle directory that is incomplete, corrupt or of another format."""


@dataclass
class Bundle:
    """A loaded bundle: config, weights per module, genes and labels."""

    config: dict[str, Any]
    weights: dict[str, dict[str, torch.Tensor]]
    genes: GeneVocabulary
    labels: list[dict[str, str]] = field(default_factory=list)

    @property
    def label_ids(self) -> list[str]:
        return [lab["id"] for lab in self.labels]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _save_tensors(tensors: dict[str, torch.Tensor], tmp: Path, final: Path, like: Path) -> None:
    """safetensors' ``save_file``, where a write the system refuses (a full disk, a quota, a
    file size limit) is that OSError, naming the bundle's file (safetensors reports it as
    an error of its own, with the system's number in its text). The file takes the mode of
    ``like``, a file of the bundle written as files are (the umask's, or a shared folder's
    default ACL): safetensors makes it readable by its owner alone, so a group's members
    could read a shared bundle's settings, not its weights."""
    try:
        save_file(tensors, str(tmp))
    except SafetensorError as err:
        code = _OS_ERROR.search(str(err))
        if code is None:
            raise
        errno = int(code.group(1))
        raise OSError(errno, os.strerror(errno), str(final)) from err
    with contextlib.suppress(OSError):  # (a file system that keeps no modes: as it made it)
        shutil.copymode(like, tmp)


def check_bundle_path(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse ``path`` for a bundle as :func:`save_bundle` would (it exists and overwrite is
    off, or it is something else than a bundle), before the work that makes one."""
    check_replaceable(Path(path), overwrite, _A_BUNDLE, "a model bundle")


def save_bundle(
    path: str | os.PathLike[str],
    *,
    config: dict[str, Any],
    modules: dict[str, nn.Module],
    genes: GeneVocabulary,
    labels: list[dict[str, str]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundle directory atomically (see the module docstring)."""
    from .. import __version__

    with atomic_path(path, overwrite=overwrite, replaces=_A_BUNDLE, what="a model bundle") as tmp:
        tmp.mkdir()
        cfg = {
            **config,
            # the labels' order, which a label head's outputs follow, beside labels.json's
            "label_ids": [lab["id"] for lab in labels or []],
            # and a digest of genes.tsv's genes, which the input's columns follow
            "genes_sha256": _genes_digest(genes),
            "format_version": FORMAT_VERSION,
            "cellsift_version": __version__,
            "modules": sorted(modules),
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
        tensors = {
            f"{name}.{k}": v.detach().cpu().contiguous()
            for name, module in modules.items()
            for k, v in module.state_dict().items()
        }
        final = Path(path) / "model.safetensors"
        _save_tensors(tensors, tmp / "model.safetensors", final, like=tmp / "config.json")
        genes.save(tmp / "genes.tsv")
        (tmp / "labels.json").write_text(json.dumps(labels or [], indent=1))
        sums = {f: _sha256(tmp / f) for f in _FILES}
        (tmp / "checksums.json").write_text(json.dumps(sums, indent=1, sort_keys=True))
    return Path(path)


def check_device(device: str | torch.device, name: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device`, where torch can use it on this machine;
    otherwise a ConfigError that names the problem and a device to use instead (``name``:
    the argument that gave it, in the message)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        first = first_line(err)
        raise ConfigError(
            f"{name}={device!r} is not a torch device ({first}); pass 'cpu', 'cuda', "
            "'cuda:<index>' or 'mps'."
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU seen"
            raise ConfigError(
                f"{name}={device!r}: CUDA is not available on this machine ({why}); use "
                f"{name}='cpu' (a model loaded so can move to a GPU later, where there is one)."
            )
        if dev.index is not None and dev.index >= n:
            raise ConfigError(
                f"{name}={device!r}: this machine has {n} CUDA device(s), cuda:0 to "
                f"cuda:{n - 1}; pass one of those, or {name}='cpu'."
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"{name}={device!r}: MPS (Apple's GPU backend) is not available on this machine; "
            f"use {name}='cpu'."
        )
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(
            f"{name}={device!r}: XPU (Intel's GPU backend) is not available on this machine; "
            f"use {name}='cpu'."
        )
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(
            f"{name}={device!r}: a model runs on 'cpu', 'cuda', 'mps' or 'xpu', not on "
            f"{dev.type!r} devices{' (they hold no values)' if dev.type == 'meta' else ''}; "
            "pass one of those."
        )
    return dev


_REMAKE = "The bundle was edited or written by another tool; save the model again with cellsift."


@contextmanager
def inference_on(
    module: torch.nn.Module, device: str | torch.device | None
) -> Iterator[torch.device]:
    """``module`` in eval mode on ``device`` (default: where it is) for the block, which
    gets the device; each part's mode and the device restored after (a model trained on a
    GPU and embedded on the CPU stays on the GPU; a custom training loop's module stays
    training, a part it froze stays frozen). A module is where its first parameter (else
    buffer) is."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    before = first.device if first is not None else torch.device("cpu")
    dev = check_device(device) if device is not None else before
    modes = [(part, part.training) for part in module.modules()]
    module.to(dev).eval()
    try:
        yield dev
    finally:
        for part, training in modes:
            part.training = training
        if dev != before:
            module.to(before)


def _read_json(folder: Path, name: str) -> Any:
    """The JSON in ``folder / name``; a file that is not JSON is a BundleError naming it."""
    try:
        return json.loads((folder / name).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{folder}: {name} is not JSON ({err}). {_REMAKE}") from None


def _check_labels(folder: Path, labels: Any) -> list[dict[str, str]]:
    """labels.json: a list of ``{"id": <CL id>, "name": <name>}`` (name optional), ids unique."""
    if not isinstance(labels, list):
        raise BundleError(
            f"{folder}: labels.json holds a {type(labels).__name__}, not a list of labels "
            f'({{"id": "CL:0000236", "name": "B cell"}}, ...). {_REMAKE}'
        )
    for i, lab in enumerate(labels):
        if not isinstance(lab, dict) or not isinstance(lab.get("id"), str) or not lab["id"]:
            raise BundleError(
                f"{folder}: labels.json's label {i} ({lab!r}) has no 'id'; each label needs its "
                f'Cell Ontology id, as in {{"id": "CL:0000236", "name": "B cell"}}. {_REMAKE}'
            )
        if not isinstance(lab.get("name", ""), str):
            raise BundleError(
                f"{folder}: labels.json's label {i} ({lab!r}) has a 'name' that is not text. "
                f"{_REMAKE}"
            )
    ids = [lab["id"] for lab in labels]
    dups = sorted({t for t in ids if ids.count(t) > 1})
    if dups:
        raise BundleError(f"{folder}: labels.json lists {dups} more than once. {_REMAKE}")
    return labels


def load_bundle(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Bundle:
    """Read a bundle, verifying that every file is there and matches its checksum.

    ``device`` (where the weights are read to) is checked first: one torch cannot use here
    is a :class:`~cellsift.errors.ConfigError` naming a device to use instead.
    """
    dev = check_device(device)
    folder = Path(path)
    # (as one version of the folder, where another process saves over it meanwhile)
    return read_one_version(folder, lambda: _load_bundle(folder, dev), BundleError)


def _load_bundle(folder: Path, dev: torch.device) -> Bundle:
    refuse_other(folder, "model", BundleError)
    if folder.is_file() and folder.suffix == ".ckpt":
        raise BundleError(
            f"{folder} is a training checkpoint (a run's state, to resume with --ckpt_path), "
            "not a model bundle: cellsift fit writes the bundle at the run's end, in its log "
            "folder (<save_dir>/<name>/version_N/model); MetricModel.save writes one too."
        )
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a bundle directory (it does not exist or is a file).")
    missing = [f for f in (*_FILES, "checksums.json") if not (folder / f).is_file()]
    run = (folder / "hparams.yaml").is_file() or any(folder.glob("events.out.tfevents.*"))
    inside = folder / "model"
    if missing and (inside / "config.json").is_file():  # (a run's root, logger or not)
        raise BundleError(
            f"{folder} is a training run's folder, not a model bundle: its bundle is {inside}."
        )
    if missing and run:  # a training run's log folder (cellsift fit's), without a bundle
        raise BundleError(
            f"{folder} is a training run's log folder, not a model bundle: it holds no "
            "bundle. cellsift fit writes one in its model folder when the run ends (a run "
            "stopped early: resume it with --ckpt_path last); after MetricModel.train, save "
            "one with model.save(dir)."
        )
    if missing and all((folder / f).is_file() for f in ("encoder.ckpt", "gene_order.tsv")):
        raise BundleError(
            f"{folder} is a SCimilarity model directory, not a model bundle: convert it once "
            f"with cellsift.models.import_scimilarity({str(folder)!r}, out) and load or pass "
            "out."
        )
    if missing and (any(folder.glob("*.ckpt")) or any(folder.glob("*/*.ckpt"))):
        raise BundleError(  # (MetricModel.train's root, or a folder of checkpoints)
            f"{folder} holds training checkpoints (a run's states, to resume with ckpt_path), "
            "not a model bundle: cellsift fit writes the bundle at the run's end in its log "
            "folder (<save_dir>/<name>/version_N/model); after MetricModel.train, save one "
            "with model.save(dir)."
        )
    if missing:
        raise BundleError(
            f"{folder}: bundle is incomplete, missing {', '.join(missing)} (or not as files). "
            "Save it again, or copy the whole directory."
        )
    try:
        sums = json.loads((folder / "checksums.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(
            f"{folder}: checksums.json is corrupt ({err}); the bundle cannot be verified. "
            "Save or copy it again."
        ) from None
    if not isinstance(sums, dict):
        raise BundleError(f"{folder}: checksums.json is corrupt; save or copy the bundle again.")
    bad = [f for f in _FILES if sums.get(f) != _sha256(folder / f)]
    if bad:
        raise BundleError(
            f"{folder}: {', '.join(bad)} do not match their checksums; the bundle "
            "is corrupt or was edited. Save or copy it again."
        )
    config = _read_json(folder, "config.json")
    if not isinstance(config, dict):
        raise BundleError(
            f"{folder}: config.json holds a {type(config).__name__}, not the settings' object "
            f"({{...}}). {_REMAKE}"
        )
    version = config.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{folder}: config.json's format_version {version!r} is not a number.")
    if version < 0:
        raise BundleError(
            f"{folder}: config.json's format_version {version} is no bundle format (0 to "
            f"{FORMAT_VERSION}). {_REMAKE}"
        )
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{folder}: bundle format {config['format_version']} is newer than this "
            f"cellsift reads ({FORMAT_VERSION}); upgrade cellsift."
        )
    try:
        # (safetensors names the CPU 'cpu' only: 'cpu:0' is the same device)
        flat = load_file(
            str(folder / "model.safetensors"), device="cpu" if dev.type == "cpu" else str(dev)
        )
    except (SafetensorError, OSError) as err:
        raise BundleError(
            f"{folder}: model.safetensors cannot be read ({error_text(err)}). {_REMAKE}"
        ) from None
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        module, _, name = key.partition(".")
        weights.setdefault(module, {})[name] = tensor
    try:
        genes = GeneVocabulary.load(folder / "genes.tsv")
    except ValueError as err:  # pandas' parser errors are ValueErrors too
        raise BundleError(
            f"{folder}: genes.tsv cannot be the model's genes ({err}). {_REMAKE}"
        ) from None
    if "genes_sha256" in config:  # (bundles before it: none)
        _check_genes_digest(folder, config["genes_sha256"], genes)
    labels = _check_labels(folder, _read_json(folder, "labels.json"))
    _check_label_order(folder, config.get("label_ids"), [lab["id"] for lab in labels])
    return Bundle(config, weights, genes, labels)


def _check_genes_digest(folder: Path, saved: Any, genes: GeneVocabulary) -> None:
    """config.json's ``genes_sha256`` is cellsift's digest of genes.tsv's genes."""
    if not (isinstance(saved, str) and re.fullmatch("[0-9a-f]{64}", saved)):
        raise BundleError(
            f"{folder}: config.json's genes_sha256 is {reprlib.repr(saved)}, not a digest of "
            f"the genes (64 lower-case hexadecimal digits, as cellsift writes it). {_REMAKE}"
        )
    if saved != _genes_digest(genes):
        raise BundleError(
            f"{folder}: genes.tsv lists other genes, or the same in another order, than the "
            "model was saved with (config.json's genes_sha256): each gene's counts would feed "
            "another gene's weights. Restore genes.tsv, or save the model again with cellsift."
        )


def _genes_digest(genes: GeneVocabulary) -> str:
    """A digest of the genes' ids and symbols, in order."""
    symbols = None if genes.symbols is None else list(genes.symbols)
    text = json.dumps([list(genes.genes), symbols])
    return hashlib.sha256(text.encode()).hexdigest()


def _check_label_order(folder: Path, saved: Any, ids: list[str]) -> None:
    """config.json's ``label_ids`` (bundles before it: none) are labels.json's, in order."""
    if saved is None:
        return
    if not (isinstance(saved, list) and all(isinstance(t, str) for t in saved)):
        raise BundleError(
            f"{folder}: config.json's label_ids is {reprlib.repr(saved)}, not a list of label "
            f"ids. {_REMAKE}"
        )
    if saved != ids:
        raise BundleError(
            f"{folder}: labels.json lists other labels, or the same in another order, than "
            f"config.json's label_ids ({len(ids)} against {len(saved)}); a label head's "
            "outputs follow config.json's order and would be read as other labels. Restore "
            "labels.json, or save the model again with cellsift."
        )


def _real(value: Any) -> bool:
    return is_number(value, nan=True)


def metric_settings(
    path: str | os.PathLike[str], bundle: Bundle, model: Callable[..., Any]
) -> dict[str, Any]:
    """The keyword arguments of ``model`` (:class:`~cellsift.models.MetricModel`) that a
    bundle's config.json gives: architecture, normalisation and loss, each checked (and
    ``architecture.n_genes`` against genes.tsv). What does not fit is a BundleError naming
    config.json and the key."""
    import inspect

    config = bundle.config

    def bad(key: str, what: str) -> BundleError:
        return BundleError(f"{path}: config.json's {key} {what}. {_REMAKE}")

    kind = config.get("model", "MetricModel")
    if kind != "MetricModel":
        raise bad("model", f"is {kind!r}, not 'MetricModel'; this cellsift cannot load it")
    sections: dict[str, dict[str, Any]] = {}
    for section in ("architecture", "normalization", "loss"):
        value = config.get(section, {} if section == "loss" else None)
        if not isinstance(value, dict):
            raise bad(section, "is missing" if value is None else f"is {value!r}, not an object")
        sections[section] = value
    arch, norm, loss = sections["architecture"], sections["normalization"], sections["loss"]
    # the JSON types only: what values make a model is MetricModule's rule (its ConfigError
    # comes back from load naming config.json)
    checks: list[tuple[str, dict[str, Any], str, Callable[[Any], bool], str]] = [
        ("architecture", arch, "n_genes", is_whole, "a whole number"),
        (
            "architecture",
            arch,
            "hidden",
            lambda v: isinstance(v, list) and all(is_whole(h) for h in v),
            "a list of layer sizes (whole numbers)",
        ),
        ("architecture", arch, "latent", is_whole, "a whole number"),
        # (NaN passes: the model's range check names it)
        ("architecture", arch, "dropout", _real, "a number"),
        ("architecture", arch, "input_dropout", _real, "a number"),
        ("normalization", norm, "target_sum", _real, "a number"),
    ]
    for section, values, key, ok, what in checks:
        if key not in values:
            raise bad(f"{section}.{key}", "is missing")
        if not ok(values[key]):
            raise bad(f"{section}.{key}", f"is {values[key]!r}, not {what}")
    if not isinstance(config.get("decoder_trained", True), bool):
        raise bad("decoder_trained", f"is {config['decoder_trained']!r}, not true or false")
    label_key = config.get("label_key", "an obs column")
    if not isinstance(label_key, str) or not label_key.strip():
        raise bad("label_key", f"is {label_key!r}, not the name of an obs column")
    if norm.get("log1p", True) is not True:
        raise bad(
            "normalization.log1p", f"is {norm['log1p']!r}; cellsift's models always apply log1p"
        )
    n_genes = len(bundle.genes)
    if arch["n_genes"] != n_genes:
        raise BundleError(
            f"{path}: config.json's architecture.n_genes is {arch['n_genes']} but genes.tsv "
            f"lists {n_genes} genes; the files are of different models. {_REMAKE}"
        )
    own = ("hidden", "latent", "dropout", "input_dropout", "target_sum", "label_names")
    accepted = [
        p.name
        for p in inspect.signature(model).parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in own
    ]
    for key, value in loss.items():
        problem = loss_setting_problem(key, value)
        if problem is not None:
            raise bad(f"loss.{key}", f"is {value!r}, not {problem}")
    # (a setting this cellsift does not know would be dropped: the model would embed
    # otherwise than the bundle's, and a save over it lose the setting)
    for section, values, known in (
        ("architecture", arch, _ARCHITECTURE_KEYS),
        ("normalization", norm, _NORMALIZATION_KEYS),
        ("loss", loss, accepted),
    ):
        unknown = sorted(k for k in values if k not in known)
        if unknown:
            raise BundleError(
                f"{path}: config.json's {section}.{unknown[0]} is not a setting of this "
                f"cellsift's {kind} (those are {', '.join(known)}). If a newer cellsift wrote "
                f"the bundle, upgrade cellsift; otherwise {_REMAKE[0].lower()}{_REMAKE[1:]}"
            )
    return {
        "hidden": arch["hidden"],
        "latent": arch["latent"],
        "dropout": arch["dropout"],
        "input_dropout": arch["input_dropout"],
        "target_sum": norm["target_sum"],
        **loss,
    }


#: The keys of a bundle's config.json architecture and normalization sections.
_ARCHITECTURE_KEYS = ("n_genes", "hidden", "latent", "dropout", "input_dropout")
_NORMALIZATION_KEYS = ("target_sum", "log1p")


def _one_of(choices: tuple[str, ...]) -> str:
    """``a, b or c``."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


#: The loss settings a bundle's config.json (or an import) may give: what each must be.
_LOSS_SETTINGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "margin": (lambda v: is_number(v) and 0 <= as_float(v) < float("inf"), "a distance >= 0"),
    "triplet_weight": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "classifier_weight": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "negative": (lambda v: v in get_args(Negative), _one_of(get_args(Negative))),
    "relatives": (lambda v: v in get_args(Relatives), _one_of(get_args(Relatives))),
    "ontology_aware": (lambda v: isinstance(v, bool), "true or false"),
}


def loss_setting_problem(key: str, value: Any) -> str | None:
    """What a loss setting ``key`` must be, where ``value`` is not that (None: fine, or
    not a setting this checks)."""
    if key not in _LOSS_SETTINGS:
        return None
    ok, what = _LOSS_SETTINGS[key]
    return None if ok(value) else what


def load_state(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> str:
    """Load ``state`` into ``module`` and return ``""``; where they do not fit, load nothing
    and return how they differ (:func:`~cellsift._utils.state_differences`, else torch's own
    account)."""
    diff = "; ".join(state_differences(state, module.state_dict(), prefix))
    if diff:
        return diff
    try:
        module.load_state_dict(state)
    except RuntimeError as err:  # e.g. values torch cannot copy; its first line is a heading
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
        return "; ".join(lines) or str(err)
    return ""


def unusable_weights(state: Mapping[str, torch.Tensor], prefix: str = "") -> str:
    """The weights of ``state`` that would embed every cell as NaN, named (up to three), or
    ``""``: NaN or infinite values, or a BatchNorm running variance below 0 (its square root
    is NaN)."""
    bad = [
        f"{prefix}{k}"
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and v.numel()
        # (NaN spreads to the least and greatest value, an infinity is one of them: a pass
        # that is about 70x faster than isfinite over every weight)
        and (
            not bool((low_high := torch.stack(torch.aminmax(v))).isfinite().all())
            or (k.endswith("running_var") and float(low_high[0]) < 0)
        )
    ]
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


def load_weights(
    path: str | os.PathLike[str], name: str, module: nn.Module, state: Mapping[str, torch.Tensor]
) -> None:
    """Load a bundle's weights of ``name`` into ``module``; weights that do not fit (names,
    shapes, integers for real numbers) are a BundleError naming model.safetensors and the
    tensor, as are encoder weights that would embed every cell as NaN and label-head
    weights that would label every cell as NaN (read as the first label)."""
    effect = {"encoder": "embed every cell", "classifier": "give every cell's labels"}
    bad = unusable_weights(state, prefix=f"{name}.") if name in effect else ""
    if bad:  # (a decoder's fail where used: in training, which stops at a NaN loss)
        raise BundleError(
            f"{path}: model.safetensors holds NaN or infinite {name} weights, or negative "
            f"variances ({bad}), which would {effect[name]} as NaN: the model had diverged "
            "in training (train it again, e.g. with a lower learning rate), or the file is "
            "damaged."
        )
    diff = load_state(module, state, prefix=f"{name}.")
    if diff:
        raise BundleError(
            f"{path}: model.safetensors does not fit config.json: {diff}; the files are of "
            f"different models. {_REMAKE}"
        )
