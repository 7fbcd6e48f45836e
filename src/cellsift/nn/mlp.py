"""SCimilarity's MLP encoder and decoder, module for module.

Encoder: blocks of (Dropout, Linear, BatchNorm1d, PReLU) - input dropout in the first block,
``dropout`` after - then a Linear to the latent space and L2 normalisation. Decoder: the
mirror image, its first block without dropout, ending in a Linear to the genes. The module
layout (``network.<block>.<layer>``) equals SCimilarity's, so its checkpoints load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLPDecoder", "MLPEncoder"]


def _stack(dims: Sequence[int], dropouts: Sequence[float | None], d_out: int) -> nn.Sequential:
    """Blocks dims[i] -> dims[i+1] of (Dropout?, Linear, BatchNorm1d, PReLU), then a Linear."""
    blocks: list[nn.Module] = []
    for d_in, d_hidden, p in zip(dims[:-1], dims[1:], dropouts, strict=True):
        layers: list[nn.Module] = [] if p is None else [nn.Dropout(p)]
        layers += [nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), nn.PReLU()]
        blocks.append(nn.Sequential(*layers))
    blocks.append(nn.Linear(dims[-1], d_out))
    return nn.Sequential(*blocks)


class MLPEncoder(nn.Module):
    """Genes -> hidden layers -> L2-normalised embedding (``z_nk``)."""

    def __init__(
        self,
        n_genes: int,
        hidden: Sequence[int] = (1024, 1024, 1024),
        latent: int = 128,
        dropout: float = 0.5,
        input_dropout: float = 0.4,
    ) -> None:
        super().__init__()
        self.n_genes, self.hidden, self.latent = n_genes, tuple(hidden), latent
        drops = ([input_dropout] + [dropout] * len(hidden))[: len(hidden)]
        self.network = _stack([n_genes, *hidden], drops, latent)

    def forward(self, x_ng: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.network(x_ng), dim=1)


class MLPDecoder(nn.Module):
    """Embedding -> mirrored hidden layers -> genes (reconstruction of the encoder's input)."""

    def __init__(
        self,
        n_genes: int,
        hidden: Sequence[int] = (1024, 1024, 1024),
        latent: int = 128,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        drops: list[float | None] = ([None] + [dropout] * len(hidden))[: len(hidden)]
        self.network = _stack([latent, *reversed(tuple(hidden))], drops, n_genes)

    def forward(self, z_nk: torch.Tensor) -> torch.Tensor:
        return self.network(z_nk)
