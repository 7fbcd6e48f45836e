"""User-facing models and their on-disk forms."""

from .scimilarity import ScimilarityModel, read_scimilarity

__all__ = ["ScimilarityModel", "read_scimilarity"]
