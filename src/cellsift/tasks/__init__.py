"""Tasks on trained models: embed, search (CellIndex), annotate."""

from .index import CellIndex, CellIndexError, SearchResult, normalize_embeddings

__all__ = ["CellIndex", "CellIndexError", "SearchResult", "normalize_embeddings"]
