"""User-facing models and their on-disk forms."""

from .bundle import Bundle, BundleError, load_bundle, save_bundle
from .metric import MetricModel
from .scimilarity import ScimilarityModel, import_scimilarity, read_scimilarity

__all__ = [
    "Bundle",
    "BundleError",
    "MetricModel",
    "ScimilarityModel",
    "import_scimilarity",
    "load_bundle",
    "read_scimilarity",
    "save_bundle",
]
