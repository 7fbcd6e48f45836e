"""Everything that turns stored cells into minibatches: stores, collections, sampling, loading."""

from .collection import CellCollection, resolve_paths
from .genes import GeneMap, GeneVocabulary
from .loader import CellLoader, IterableCellDataset
from .sampling import SamplingConfig, balanced_weights, make_plan
from .stores import CellStore, open_store
from .writers import FORMATS, StoreWriter, guess_format, open_writer

#: Imported when first asked for: the data module needs Lightning, the SOMA store
#: tiledbsoma, which ``import cellsift.data`` should not load.
_LAZY = {
    "CellDataModule": ".datamodule",
    "H5adStore": "._h5ad",
    "ZarrStore": "._zarr",
    "SomaStore": "._soma",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "CellCollection",
    "CellDataModule",
    "CellLoader",
    "CellStore",
    "GeneMap",
    "GeneVocabulary",
    "H5adStore",
    "IterableCellDataset",
    "SamplingConfig",
    "SomaStore",
    "StoreWriter",
    "ZarrStore",
    "balanced_weights",
    "guess_format",
    "make_plan",
    "open_store",
    "open_writer",
    "resolve_paths",
]
