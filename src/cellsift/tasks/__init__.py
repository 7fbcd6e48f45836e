"""Tasks on trained models: embed, search (CellIndex), annotate, interpret."""

from .annotate import UNKNOWN, KNNAnnotator
from .coherence import QueryCoherence, query_coherence
from .embed import embed_collection, load_embeddings
from .index import CellIndex, CellIndexError, SearchResult, normalize_embeddings
from .interpret import DifferenceAttributions, attribute_difference, explain_difference

__all__ = [
    "UNKNOWN",
    "CellIndex",
    "CellIndexError",
    "DifferenceAttributions",
    "KNNAnnotator",
    "QueryCoherence",
    "SearchResult",
    "attribute_difference",
    "embed_collection",
    "explain_difference",
    "load_embeddings",
    "normalize_embeddings",
    "query_coherence",
]
