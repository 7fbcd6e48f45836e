"""Training: validation metrics."""

from .metrics import silhouette

__all__ = ["silhouette"]
