"""Training: the one Lightning training plan, and validation metrics."""

from .metrics import silhouette
from .plan import TrainingPlan

__all__ = ["TrainingPlan", "silhouette"]
