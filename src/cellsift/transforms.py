"""Transforms on batch dicts, as ``nn.Module``s: they run wherever the batch is (GPU in training).

Each takes the batch dict and returns it with ``x_ng`` (by default) replaced. NormalizeTotal
and Log1p work on sparse CSR batches too (only the stored values change), so a batch can stay
sparse until :class:`Densify`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._utils import as_float, is_number
from .errors import ConfigError

__all__ = ["Densify", "GeneSubset", "Log1p", "NormalizeTotal", "ZScore", "default_pipeline"]

Batch = dict[str, Any]


def _with_values(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.sparse_csr_tensor(
        x.crow_indices(), x.col_indices(), values, size=x.shape, check_invariants=False
    )


class _Transform(nn.Module):
    def __init__(self, key: str = "x_ng") -> None:
        super().__init__()
        self.key = key

    def forward(self, batch: Batch) -> Batch:
        out = dict(batch)
        x = batch[self.key]
        if not isinstance(x, torch.Tensor) or x.layout not in (torch.strided, torch.sparse_csr):
            given = (
                f"a {str(x.layout).removeprefix('torch.')} tensor"
                if isinstance(x, torch.Tensor)
                else type(x).__name__
            )
            raise TypeError(
                f"{type(self).__name__} reads batch[{self.key!r}] as a dense or sparse CSR "
                f"torch tensor, not {given}: convert it (x.to_sparse_csr(); a scipy or numpy "
                "matrix with cellsift.data.loader.to_torch_csr or torch.from_numpy)."
            )
        out[self.key] = self.transform(x)
        return out

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


#: CSR value types the CPU kernel takes (not bfloat16 or float16: torch's own).
_KERNEL_DTYPES = frozenset({torch.float32, torch.float64, torch.int32, torch.int64})


def _kernel_takes(x: torch.Tensor) -> bool:
    """Whether the CPU kernels take CSR batch ``x``: on the CPU, without gradients, values of
    a type they read, 2-d (batched, or with dense dimensions: torch's own)."""
    return (
        x.device.type == "cpu"
        and not x.requires_grad
        and x.dtype in _KERNEL_DTYPES
        and x.ndim == 2
        and x.values().ndim == 1
    )


def _checked_crow(x: torch.Tensor, what: str) -> np.ndarray:
    """The row pointer of CSR batch ``x`` (on the CPU; batched or hybrid too) for a CPU
    kernel or torch's own steps, checked so that no row reads outside the values or their
    column indices (from 0 to their count, never decreasing; one column index a value);
    else a ValueError."""
    crow = x.crow_indices().numpy()
    batch = crow.ndim - 1  # (batch dimensions: 0, or 1 for a batched CSR)
    n_values, n_cols = x.values().shape[batch], x.col_indices().shape[-1]
    if n_cols != n_values:
        raise ValueError(
            f"{what}: a malformed CSR batch ({n_cols} column indices for {n_values} values)."
        )
    n_rows = x.shape[batch]
    if crow.shape[-1] != n_rows + 1:
        raise ValueError(
            f"{what}: a malformed CSR batch (a row pointer of {crow.shape[-1]} entries for "
            f"{n_rows} rows)."
        )
    first, last, steps = crow[..., 0], crow[..., -1], np.diff(crow, axis=-1)
    if (first != 0).any() or (last != n_values).any() or (steps < 0).any():
        start, end = (
            int(v.flat[np.argmax(v != want)]) for v, want in ((first, 0), (last, n_values))
        )
        raise ValueError(
            f"{what}: a malformed CSR batch (row pointer from {start} to {end} "
            f"over {n_values} values, {int((steps < 0).sum())} rows of negative length)."
        )
    return crow


def _check_columns(x: torch.Tensor, what: str) -> None:
    """A ValueError where CSR batch ``x`` (on the CPU) holds a column index outside its
    columns: for torch's own steps that write by them (``to_dense``, a sum of repeats)."""
    c = x.col_indices().numpy()
    width = x.shape[c.ndim]  # (the dimension after the rows)
    outside = int(((c < 0) | (c >= width)).sum())
    if outside:
        raise ValueError(
            f"{what}: a malformed CSR batch ({outside} column indices outside its {width} columns)."
        )


class Densify(_Transform):
    """Sparse CSR counts -> dense tensor of their dtype, on the batch's device (a dense
    batch as it is).

    On the CPU the matrix is zeroed and filled row by row in parallel (a numba kernel), much
    faster than ``torch.Tensor.to_dense`` and than scipy's single-threaded ``toarray``.
    """

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return _dense(x)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """:class:`Densify`'s work: a CSR batch dense (a malformed one on the CPU refused);
    another as it is."""
    if x.layout != torch.sparse_csr:
        return x
    if not _kernel_takes(x):
        if x.device.type == "cpu":  # (unchecked on a GPU: telling would stop it)
            _checked_crow(x, "Densify")
            _check_columns(x, "Densify")  # (torch writes where they say)
        return x.to_dense()
    return _dense_on_cpu(x)


class NormalizeTotal(_Transform):
    """Scale each cell to ``target_sum`` total counts (scanpy ``normalize_total``).

    Cells with no counts stay zero. Totals are summed in float64 (a bfloat16 sum stops
    growing at 256, and a float32 one overflows for values near float32's largest, which
    would scale the cell to zeros; float32 on Apple's MPS, which has no float64); the
    results are float32 at least.
    """

    target_sum: float

    def __init__(self, target_sum: float = 1e4, key: str = "x_ng") -> None:
        super().__init__(key)
        if not (is_number(target_sum) and 0 < as_float(target_sum) < math.inf):
            raise ConfigError(
                f"target_sum is the counts per cell after normalisation, a number above 0 "
                f"(1e4: counts per 10k), not {target_sum!r}."
            )
        self.target_sum = as_float(target_sum)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        sparse = x.layout == torch.sparse_csr
        # (a malformed batch said as such first; torch's steps read outside one on the CPU)
        pointer = _checked_crow(x, "NormalizeTotal") if sparse and x.device.type == "cpu" else None
        if x.dim() != 2:  # (a batched or hybrid CSR tensor too: its totals are no cell's)
            raise ValueError(
                f"NormalizeTotal scales each cell of a cells x genes batch, and this one has "
                f"{x.dim()} dimensions {tuple(x.shape)}"
                f"{' (a batched or hybrid CSR tensor)' if sparse else ''}"
                ": pass 2-D batches, one per set of cells."
            )
        dtype = _at_least_float32(x.dtype)
        if sparse:
            if dtype == torch.float32 and _kernel_takes(x):  # (the CPU's kernel: one pass)
                assert pointer is not None
                return _normalized_on_cpu(x, pointer, self.target_sum)
            # each row's values summed as one segment, and its scale repeated over them
            # (3x faster on the CPU than adding into the totals by row ids, then gathering)
            values, crow = x.values(), x.crow_indices()
            totals = torch.segment_reduce(values.to(_total_dtype(x)), "sum", offsets=crow)
            per_value = torch.repeat_interleave(
                self._scale(totals, dtype), crow[1:] - crow[:-1], output_size=len(values)
            )
            return _with_values(x, values.to(dtype) * per_value)
        totals = x.sum(1, keepdim=True, dtype=_total_dtype(x))
        return self._scale(totals, dtype) * x.to(dtype)

    def _scale(self, totals: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``target_sum / total`` of each cell (1 for a cell without counts; NaN for one with
        a NaN among them, as scanpy), in ``dtype``."""
        return (self.target_sum / torch.where((totals > 0) | totals.isnan(), totals, 1.0)).to(dtype)

    def extra_repr(self) -> str:
        return f"target_sum={self.target_sum:g}"


@torch.compiler.disable  # (a numba kernel of numpy arrays: no graph of torch's holds it)
def _dense_on_cpu(x: torch.Tensor) -> torch.Tensor:
    """A CSR batch the CPU kernel takes (:func:`_kernel_takes`) as a dense tensor."""
    from .nn._sparse_cpu import csr_to_dense

    crow, values = _checked_crow(x, "Densify"), x.values().numpy()
    out = np.empty(tuple(x.shape), dtype=values.dtype)
    outside = csr_to_dense(crow, x.col_indices().numpy(), values, out)
    if outside:
        raise ValueError(
            f"Densify: a malformed CSR batch ({outside} column indices outside its "
            f"{x.shape[1]} columns)."
        )
    return torch.from_numpy(out)


@torch.compiler.disable  # (as _dense_on_cpu)
def _normalized_on_cpu(x: torch.Tensor, pointer: np.ndarray, target_sum: float) -> torch.Tensor:
    """A float32 CSR batch the CPU kernel takes, each cell scaled to ``target_sum``."""
    from .nn._sparse_cpu import csr_normalize_total

    out = np.empty(len(x.values()), dtype=np.float32)
    csr_normalize_total(pointer, x.values().numpy(), target_sum, out)
    return _with_values(x, torch.from_numpy(out))


def _total_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for sums of counts; float32 on Apple's MPS, which has no float64."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Log1p(_Transform):
    """Natural ``log(1 + x)`` (scanpy ``log1p``).

    On the CPU, of a cell's summed count where a sparse batch stores a gene of it more than
    once (as :class:`Densify` and scipy sum them). Elsewhere (a GPU) a sparse batch must
    store each gene of a cell once, as cellsift's readers give them (``sum_duplicates``
    first): telling would stop the device each batch to read the answer.
    """

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if x.layout == torch.sparse_csr:
            if x.device.type == "cpu" and _unsorted_columns(x):  # (repeats: summed first)
                summed = _summed(x.detach())
                if len(summed.values()) < len(x.values()):  # (else out of order only: as is)
                    if x.requires_grad:  # (the sum's gradient does not reach the repeats)
                        raise ValueError(
                            "Log1p: a batch that stores a gene of a cell twice and asks for "
                            "gradients; sum the repeats first (scipy's sum_duplicates, or "
                            "torch's coalesce)."
                        )
                    x = summed
            return _with_values(x, torch.log1p(x.values()))
        return torch.log1p(x)


def _summed(x: torch.Tensor) -> torch.Tensor:
    """CSR ``x`` with each row's repeated columns summed, its indices of their type."""
    coo = x.to_sparse_coo()  # (which says it is coalesced: made anew, it is not)
    coo = torch.sparse_coo_tensor(coo.indices(), coo.values(), x.shape).coalesce().to_sparse_csr()
    kind = x.crow_indices().dtype
    return torch.sparse_csr_tensor(
        coo.crow_indices().to(kind), coo.col_indices().to(kind), coo.values(), size=x.shape
    )


def _unsorted_columns(x: torch.Tensor) -> bool:
    """Whether a CSR batch on the CPU has column indices that fail to rise strictly within
    a row (a column stored twice, or out of order, which may hide one); a malformed batch is
    refused (one whose columns are summed next, by torch's coalesce, its columns checked
    too). False for a batched (3-d) one, whose batches torch's sum does not take apart."""
    if _checked_crow(x, "Log1p").ndim > 1:
        return False
    col, crow = x.col_indices(), x.crow_indices()
    if len(col) < 2:
        return False
    rising = col[1:] > col[:-1]
    starts = crow[1:-1]  # (a row's first value follows another row's last: not compared)
    rising[starts[(starts > 0) & (starts < len(col))] - 1] = True
    if rising.all():
        return False
    _check_columns(x, "Log1p")
    return True


class ZScore(_Transform):
    """``(x - mean_g) / std_g`` per gene, with statistics given (e.g. from a one-pass scan).

    Genes with zero standard deviation are only centred. Needs a dense batch.
    """

    mean_g: torch.Tensor
    std_g: torch.Tensor

    def __init__(
        self,
        mean_g: np.ndarray | torch.Tensor,
        std_g: np.ndarray | torch.Tensor,
        key: str = "x_ng",
        eps: float = 1e-8,
    ) -> None:
        super().__init__(key)
        # (statistics in float64 stay so, for float64 batches; the others in float32)
        mean, std = (
            v.detach().cpu() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
            for v in (mean_g, std_g)
        )
        wide = torch.float64 if torch.float64 in (mean.dtype, std.dtype) else torch.float32
        mean, std = mean.to(wide), std.to(wide)
        if mean.shape != std.shape or mean.ndim != 1:
            raise ValueError("mean_g and std_g must be 1-d and of equal length.")
        self.register_buffer("mean_g", mean)
        self.register_buffer("std_g", torch.where(std > eps, std, torch.ones_like(std)))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if x.layout == torch.sparse_csr:
            raise ValueError("ZScore needs a dense batch: put Densify before it.")
        if x.ndim != 2 or x.shape[1] != len(self.mean_g):
            raise ValueError(
                f"ZScore holds the statistics of {len(self.mean_g)} genes, and the batch has "
                f"shape {tuple(x.shape)}: pass cells x those genes, in their order."
            )
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return (x.to(dtype) - self.mean_g.to(dtype)) / self.std_g.to(dtype)


class GeneSubset(_Transform):
    """Keep genes ``indices`` (positions in the vocabulary, in that order; or a boolean mask
    over the genes, e.g. ``adata.var["highly_variable"]``: those it marks)."""

    indices: torch.Tensor

    def __init__(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, key: str = "x_ng"
    ) -> None:
        super().__init__(key)
        given = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if given.ndim == 0:  # (one gene)
            given = given.reshape(1)
        #: The genes a mask was of (None: positions were given).
        self.n_mask: int | None = None
        if given.dtype == np.bool_ and given.ndim == 1:
            self.n_mask = len(given)
            given = np.flatnonzero(given)
        if given.dtype == object and pd.isna(given).any():
            raise ValueError(
                "GeneSubset's genes hold missing values (a nullable boolean mask?): fill them "
                "(mask.fillna(False)) or pass positions."
            )
        whole = given.dtype.kind in "iu" or (
            given.dtype.kind == "f"
            and bool(np.isfinite(given).all())
            and bool((given == np.round(given)).all())
        )
        if given.ndim != 1 or not (whole or given.size == 0):
            raise ValueError(
                f"GeneSubset keeps genes by position (whole numbers) or by a boolean mask, "
                f"not an array of {given.dtype} of shape {given.shape}"
                + (" holding fractions" if given.dtype.kind == "f" and given.ndim == 1 else "")
                + "."
            )
        if given.size and given.min() < 0:
            raise ValueError(f"gene positions count from 0, not {int(given.min())}.")
        self.register_buffer("indices", torch.as_tensor(given.astype(np.int64)))
        self._set_least_genes()

    def _set_least_genes(self) -> None:
        # the genes a batch must have, kept as a number: a tensor's max read per batch
        # would wait for a GPU each time
        self._least_genes = int(self.indices.max()) + 1 if len(self.indices) else 0

    def get_extra_state(self) -> dict[str, Any]:
        return {"n_mask": self.n_mask}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.n_mask = state.get("n_mask")

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, *rest
    ) -> None:
        key = f"{prefix}_extra_state"
        # (a state of this module's indices without it: saved before masks were kept, of
        # positions; none of them at all, a partial load of other modules: left as it is)
        older = f"{prefix}indices" in state_dict and key not in state_dict
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, *rest
        )
        if older:
            self.n_mask = None
            if key in missing_keys:
                missing_keys.remove(key)
        self._set_least_genes()  # (of the indices loaded)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2:
            raise ValueError(
                f"GeneSubset keeps genes of a cells x genes batch, and this one has shape "
                f"{tuple(x.shape)}: pass 2-D batches."
            )
        n_genes = x.shape[1]
        if self.n_mask is not None and n_genes != self.n_mask:
            raise ValueError(
                f"GeneSubset's mask marks {self.n_mask} genes, and the batch has {n_genes}: "
                "pass batches of the genes the mask was made for."
            )
        if self._least_genes > n_genes:
            raise ValueError(
                f"GeneSubset keeps gene {self._least_genes - 1}, and the batch has "
                f"{n_genes} genes (0 to {n_genes - 1}): pass positions among them."
            )
        return _dense(x).index_select(1, self.indices)  # (a malformed CSR: as Densify says)


def default_pipeline(target_sum: float = 1e4) -> nn.Sequential:
    """Counts -> normalised, log-transformed dense matrix: NormalizeTotal, Log1p, Densify."""
    return nn.Sequential(NormalizeTotal(target_sum), Log1p(), Densify())
