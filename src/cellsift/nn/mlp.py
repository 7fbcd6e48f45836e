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


def _block(d_in: int, d_out: int, dropout: float | None) -> nn.Sequential:
    layers: list[nn.Module] = [] if dropout is None else [nn.Dropout(dropout)]
    layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.PReLU()]
    return nn.Sequential(*layers)


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
        dims = [n_genes, *hidden]
        blocks: list[nn.Module] = [
            _block(dims[i], dims[i + 1], input_dropout if i == 0 else dropout)
            for i in range(len(hidden))
        ]
        blocks.append(nn.Linear(dims[-1], latent))
        self.network = nn.Sequential(*blocks)

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
        dims = [latent, *reversed(tuple(hidden))]
        blocks: list[nn.Module] = [
            _block(dims[i], dims[i + 1], None if i == 0 else dropout) for i in range(len(hidden))
        ]
        blocks.append(nn.Linear(dims[-1], n_genes))
        self.network = nn.Sequential(*blocks)

    def forward(self, z_nk: torch.Tensor) -> torch.Tensor:
        return self.network(z_nk)
