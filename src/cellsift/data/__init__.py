"""Everything that turns stored cells into minibatches: stores, collections, sampling, loading."""

from .collection import CellCollection, resolve_paths
from .genes import GeneMap, GeneVocabulary
from .loader import CellLoader, IterableCellDataset
from .sampling import SamplingConfig, balanced_weights, make_plan
from .stores import CellStore, open_store
from .writers import FORMATS, StoreWriter, guess_format, open_writer

__all__ = [
    "FORMATS",
    "CellCollection",
    "CellLoader",
    "CellStore",
    "GeneMap",
    "GeneVocabulary",
    "IterableCellDataset",
    "SamplingConfig",
    "StoreWriter",
    "balanced_weights",
    "guess_format",
    "make_plan",
    "open_store",
    "open_writer",
    "resolve_paths",
]
