"""SCimilarity's MLP encoder and decoder, module for module.

Encoder: blocks of (Dropout, Linear, BatchNorm1d, PReLU) - input dropout in the first block,
``dropout`` after - then a Linear to the latent space and L2 normalisation. Decoder: the
mirror image, its first block without dropout, ending in a Linear to the genes. The module
layout (``network.<block>.<layer>``) equals SCimilarity's, so its checkpoints load as they are.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["MLPDecoder", "MLPEncoder"]


@dataclasses.dataclass
class _Hold:
    """What :meth:`MLPEncoder.weights_unchanged` holds: the encoder, its first layer's
    weight, that weight's transposed copy once made, and whether the hold lasts (a task
    begun within keeps a reference to it after it has ended)."""

    encoder: nn.Module
    weight: Any  # (the Linear's weight: a Parameter)
    transposed: np.ndarray | None = None
    active: bool = True


#: This thread's or task's hold (a context variable: another thread's is not this one's).
_HELD: contextvars.ContextVar[_Hold | None] = contextvars.ContextVar(
    "cellsift_weights_unchanged", default=None
)


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
        """``x_ng`` dense, or sparse CSR: on the CPU the first layer then reads only the stored
        values (:mod:`cellsift.nn._sparse_cpu`; input dropout drops stored values, as it would
        drop them from the dense matrix); elsewhere the batch is densified."""
        first, at = self._first_block()
        linear = first[at]
        assert isinstance(linear, nn.Linear)
        if x_ng.ndim != 2 or x_ng.shape[1] != linear.in_features:
            raise ValueError(
                f"the batch has shape {tuple(x_ng.shape)}, and the encoder reads cells x "
                f"{linear.in_features} genes: align the counts to the model's genes first."
            )
        if x_ng.layout != torch.sparse_csr:
            return nn.functional.normalize(self.network(self._as_weights(x_ng)), dim=1)
        if not self.reads_sparse(x_ng):
            dense = self._as_weights(x_ng.to_dense())
            return nn.functional.normalize(self.network(dense), dim=1)
        h = self._sparse_first_layer(x_ng, first[:at], linear)
        for m in first[at + 1 :]:
            h = m(h)
        for block in list(self.network)[1:]:
            h = block(h)
        return nn.functional.normalize(h, dim=1)

    @torch.compiler.disable  # (its kernel reads numpy arrays: no graph of torch's holds it)
    def _sparse_first_layer(
        self, x_ng: torch.Tensor, dropouts: list[nn.Module], linear: nn.Linear
    ) -> torch.Tensor:
        """The input ``dropouts`` and the first ``linear`` of a CSR batch on the CPU, reading
        its stored values only."""
        from ._sparse_cpu import csr_linear

        stored = values = x_ng.values()  # values() makes a new tensor object on every call
        if not values.is_floating_point():  # (whole-number counts: dropout takes floats)
            values = values.float()
        for m in dropouts:  # the input dropout
            assert isinstance(m, nn.Dropout)
            values = nn.functional.dropout(values, m.p, m.training)
        if values is not stored:  # dropped in training; in eval dropout returns its input
            x_ng = torch.sparse_csr_tensor(  # (the batch's own structure: checked already)
                x_ng.crow_indices(),
                x_ng.col_indices(),
                values,
                size=x_ng.shape,
                check_invariants=False,
            )
        return csr_linear(x_ng, linear.weight, linear.bias, self._weight_gh(linear.weight))

    def _as_weights(self, x_ng: torch.Tensor) -> torch.Tensor:
        """A batch in the weights' dtype (float64 counts for a float32 model, float32 for a
        float64 one); under autocast (which leaves float64 weights as they are), floats it
        takes as they are, others as float32."""
        dtype = self._weight_dtype()
        if torch.is_autocast_enabled(x_ng.device.type) and dtype != torch.float64:
            low = (torch.float32, torch.float16, torch.bfloat16)  # (autocast takes these)
            return x_ng if x_ng.dtype in low else x_ng.float()
        return x_ng if x_ng.dtype == dtype else x_ng.to(dtype)

    def _weight_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _first_block(self) -> tuple[list[nn.Module], int]:
        """The first block's layers (a bare Linear without hidden layers) and where its
        Linear is among them."""
        block0 = self.network[0]
        first = list(block0) if isinstance(block0, nn.Sequential) else [block0]
        return first, next(i for i, m in enumerate(first) if isinstance(m, nn.Linear))

    def reads_sparse(self, x_ng: torch.Tensor) -> bool:
        """Will :meth:`forward` read this batch's stored values only (CSR counts and a
        float32 model on the CPU, no gradient asked for the counts, not traced by
        ``torch.compile``: :meth:`compile` leaves the first layer out of its graphs). A
        model elsewhere meets the batch densified: torch's error names both devices."""
        weight = next(self.parameters())
        return (
            x_ng.layout == torch.sparse_csr
            and x_ng.device.type == "cpu"
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and not x_ng.requires_grad
            and not torch.compiler.is_compiling()
        )

    def _weight_gh(self, weight_hg: torch.Tensor) -> np.ndarray:
        """The first layer's weight transposed (genes x hidden) for the sparse kernel, copied
        on every call (~30 ms for SCimilarity's model) into one buffer kept between calls,
        but once within :meth:`weights_unchanged`. Not cached on the weight's version: fused
        optimisers update weights without bumping it."""
        held = _HELD.get()  # (this thread's, this task's)
        if held is not None and (
            held.encoder is not self or held.weight is not weight_hg or not held.active
        ):
            held = None  # (another encoder's hold, its weight replaced, or the hold ended)
        if held is not None and held.transposed is not None:
            return held.transposed
        w = weight_hg.detach().numpy()
        buf = getattr(self, "_weight_gh_buffer", None)
        if buf is None or buf.shape != w.T.shape:
            buf = self._weight_gh_buffer = np.empty(w.T.shape, dtype=np.float32)
        np.copyto(buf, w.T)
        if held is not None:
            held.transposed = buf
        return buf

    @contextlib.contextmanager
    def weights_unchanged(self) -> Iterator[None]:
        """Within (in this thread or task; holds nest): nothing changes the weights
        (inference over many batches), so the first layer's weight is transposed for the
        sparse kernel once, not once a batch (~5% of an embedding's time with
        SCimilarity's model)."""
        first, at = self._first_block()
        held = _Hold(self, first[at].weight)
        token = _HELD.set(held)
        try:
            yield
        finally:  # (ended for a task begun within too, whose context holds a copy of it)
            held.active = False
            _HELD.reset(token)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` this encoder's layers after its first Linear (the first block's
        rest and each later block), leaving the input dropout and the first Linear as they
        run: on the CPU they read a sparse batch's stored values, which a compiled graph
        would densify (the first layer then multiplies every gene: training ran at 0.68x
        the uncompiled speed on 28,000 genes); elsewhere the first layer is one dense
        product either way."""
        first, at = self._first_block()
        for m in [*first[at + 1 :], *list(self.network)[1:]]:
            m.compile(*args, **kwargs)


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
