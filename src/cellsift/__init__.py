"""cellsift: representations of single cells at atlas scale."""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from . import _warnings
from .errors import CellsiftError, DataError, GeneAlignmentError, ResumeError

if TYPE_CHECKING:
    from . import data, datasets, pl, tl
    from .data import CellCollection, CellLoader, GeneVocabulary, IterableCellDataset, open_store

try:
    __version__ = version("cellsift")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

# imported when first used: torch, pandas and anndata take seconds to import, which every
# command would pay before parsing its arguments (`cellsift --help`)
_FROM_DATA = {"CellCollection", "CellLoader", "GeneVocabulary", "IterableCellDataset", "open_store"}

__all__ = [
    "CellCollection",
    "CellLoader",
    "CellsiftError",
    "DataError",
    "GeneAlignmentError",
    "GeneVocabulary",
    "IterableCellDataset",
    "ResumeError",
    "__version__",
    "_warnings",
    "data",
    "datasets",
    "open_store",
    "pl",
    "tl",
]


def __getattr__(name: str) -> Any:
    if name.isidentifier() and importlib.util.find_spec(f"{__name__}.{name}"):
        return importlib.import_module(f".{name}", __name__)  # (any submodule, as `import`)
    if name in _FROM_DATA:
        return getattr(importlib.import_module(".data", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
