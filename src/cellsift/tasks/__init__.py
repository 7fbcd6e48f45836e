"""Tasks on trained models: embed, search (CellIndex), annotate."""

from .annotate import UNKNOWN, KNNAnnotator
from .index import CellIndex, CellIndexError, SearchResult, normalize_embeddings

__all__ = [
    "UNKNOWN",
    "CellIndex",
    "CellIndexError",
    "KNNAnnotator",
    "SearchResult",
    "normalize_embeddings",
]
