"""cellsift: representations of single cells at atlas scale."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import _warnings, data, datasets, pl, tl
from .data import CellCollection, CellLoader, GeneVocabulary, IterableCellDataset, open_store
from .errors import CellsiftError, DataError, GeneAlignmentError, ResumeError

try:
    __version__ = version("cellsift")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

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
