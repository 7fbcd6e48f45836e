"""User-facing models and their on-disk forms."""

from .bundle import Bundle, BundleError, load_bundle, save_bundle
from .metric import SMALL_ATLAS_LOADER, SMALL_ATLAS_MODEL, MetricModel
from .scimilarity import ScimilarityModel, import_scimilarity, read_scimilarity

__all__ = [
    "SMALL_ATLAS_LOADER",
    "SMALL_ATLAS_MODEL",
    "Bundle",
    "BundleError",
    "MetricModel",
    "ScimilarityModel",
    "import_scimilarity",
    "load_bundle",
    "read_scimilarity",
    "save_bundle",
]
