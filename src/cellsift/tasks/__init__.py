"""Tasks on trained models: embed, search (CellIndex), annotate."""

from .annotate import UNKNOWN, KNNAnnotator
from .embed import embed_collection, load_embeddings
from .index import CellIndex, CellIndexError, SearchResult, normalize_embeddings

__all__ = [
    "UNKNOWN",
    "CellIndex",
    "CellIndexError",
    "KNNAnnotator",
    "SearchResult",
    "embed_collection",
    "load_embeddings",
    "normalize_embeddings",
]
