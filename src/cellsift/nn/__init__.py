"""Pure torch building blocks: the MLP encoder and decoder."""

from .mlp import MLPDecoder, MLPEncoder

__all__ = ["MLPDecoder", "MLPEncoder"]
