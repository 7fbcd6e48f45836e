"""Pure torch modules: the MLP encoder and decoder, the metric-learning module."""

from .metric import MetricModule
from .mlp import MLPDecoder, MLPEncoder

__all__ = ["MLPDecoder", "MLPEncoder", "MetricModule"]
