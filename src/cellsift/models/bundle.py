"""Model bundles: a directory anyone can read, no pickle.

    config.json        architecture, normalisation, cellsift version, format version
    model.safetensors  weights, keys prefixed by module ("encoder.", "decoder.")
    genes.tsv          the genes the model reads, in input order (gene_id, symbol)
    labels.json        label set in model order: Cell Ontology ids and names
    checksums.json     sha256 of each file above, verified on load

A bundle is written into a temporary directory and moved into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._utils import atomic_dir
from ..data.genes import GeneVocabulary
from ..data.stores import refuse_other
from ..errors import CellsiftError

__all__ = ["Bundle", "BundleError", "load_bundle", "save_bundle"]

FORMAT_VERSION = 1
_FILES = ("config.json", "model.safetensors", "genes.tsv", "labels.json")


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

    with atomic_dir(path, overwrite=overwrite, marker=_FILES, what="a model bundle") as tmp:
        cfg = {
            **config,
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
        save_file(tensors, str(tmp / "model.safetensors"))
        genes.save(tmp / "genes.tsv")
        (tmp / "labels.json").write_text(json.dumps(labels or [], indent=1))
        sums = {f: _sha256(tmp / f) for f in _FILES}
        (tmp / "checksums.json").write_text(json.dumps(sums, indent=1, sort_keys=True))
    return Path(path)


def load_bundle(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Bundle:
    """Read a bundle, verifying that every file is there and matches its checksum."""
    folder = Path(path)
    refuse_other(folder, "model", BundleError)
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a bundle directory (it does not exist or is a file).")
    missing = [f for f in (*_FILES, "checksums.json") if not (folder / f).exists()]
    if missing:
        raise BundleError(
            f"{folder}: bundle is incomplete, missing {', '.join(missing)}. "
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
    config = json.loads((folder / "config.json").read_text())
    version = config.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{folder}: config.json's format_version {version!r} is not a number.")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{folder}: bundle format {config['format_version']} is newer than this "
            f"cellsift reads ({FORMAT_VERSION}); upgrade cellsift."
        )
    flat = load_file(str(folder / "model.safetensors"), device=str(device))
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        module, _, name = key.partition(".")
        weights.setdefault(module, {})[name] = tensor
    labels = json.loads((folder / "labels.json").read_text())
    return Bundle(config, weights, GeneVocabulary.load(folder / "genes.tsv"), labels)
