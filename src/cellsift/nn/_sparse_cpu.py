"""Sparse counts times a dense weight on the CPU (compiled numba kernels), with gradients.

A cell's counts over an atlas gene space (~28k genes) are mostly zeros: 5-10% of genes are
detected. The encoder's first layer, dense, costs 2 x genes x hidden flops per cell; over the
stored values only it costs 2 x detected x hidden. torch's CPU sparse-dense product is slower
than its dense one at these densities, so :func:`csr_linear` runs a kernel of its own: per
block of genes (its weight rows kept in cache), per cell in parallel, each stored value adds
its gene's weight row to the cell's output row. The weight's gradient, likewise, reads only
the stored values: per gene in parallel, its cells' output gradients weighted by their counts.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import scipy.sparse as sp
import torch

from .._numba import first_call, njit_cached
from .._utils import csr_fault

#: genes per block: their weight rows (hidden floats each) should stay in the CPU's cache
_BLOCK_BYTES = 8 << 20


@numba.njit(inline="always")
def _add_scaled_rows(o, data, indices, rows, start, stop):  # type: ignore[no-untyped-def]
    """o += sum over q in [start, stop) of data[q] * rows[indices[q]]: four stored values per
    pass over ``o`` (a quarter of its loads and stores), each added in turn, so that for
    float32 values and rows (what the kernels are given) the sums are those of one value at
    a time, rounded in the same order."""
    h = o.shape[0]
    q = start
    while q + 3 < stop:
        v0, v1, v2, v3 = data[q], data[q + 1], data[q + 2], data[q + 3]
        r0, r1 = rows[indices[q]], rows[indices[q + 1]]
        r2, r3 = rows[indices[q + 2]], rows[indices[q + 3]]
        for k in range(h):
            t = o[k] + v0 * r0[k]
            t = t + v1 * r1[k]
            t = t + v2 * r2[k]
            o[k] = t + v3 * r3[k]
        q += 4
    while q < stop:
        v = data[q]
        r = rows[indices[q]]
        for k in range(h):
            o[k] += v * r[k]
        q += 1


@njit_cached(parallel=True, nogil=True)
def _csr_times_rows(indptr, indices, data, w_gh, gene_bounds, out):  # type: ignore[no-untyped-def]
    """out[i, :] += sum over stored (i, g, v) of v * w_gh[g, :]; row indices sorted per row."""
    n = len(indptr) - 1
    for block in range(len(gene_bounds) - 1):
        g0, g1 = gene_bounds[block], gene_bounds[block + 1]
        for i in numba.prange(n):
            start, stop = indptr[i], indptr[i + 1]
            lo = start + np.searchsorted(indices[start:stop], g0)
            hi = start + np.searchsorted(indices[start:stop], g1)
            _add_scaled_rows(out[i], data, indices, w_gh, lo, hi)


@njit_cached(parallel=True, nogil=True)
def csr_to_dense(indptr, indices, data, out):  # type: ignore[no-untyped-def]
    """out = the CSR matrix, dense (duplicates summed, as scipy's toarray). Rows in parallel,
    each zeroed and filled by its own thread: the page faults of fresh memory (most of the
    cost for a batch of 1000 x 28k) are taken by all cores, not one. Returns the number of
    column indices outside the matrix (left out; the caller refuses the batch). ``indptr``
    is the caller's to check (from 0 to ``len(data)``, never decreasing)."""
    n = out.shape[1]
    outside = 0
    for i in numba.prange(out.shape[0]):
        o = out[i]
        o[:] = 0
        for q in range(indptr[i], indptr[i + 1]):
            j = indices[q]
            if 0 <= j < n:
                o[j] += data[q]
            else:
                outside += 1
    return outside


@njit_cached(parallel=True, nogil=True)
def csr_normalize_total(indptr, data, target_sum, out):  # type: ignore[no-untyped-def]
    """out = each row's values times ``target_sum / its total``, in float32, as
    :class:`cellsift.transforms.NormalizeTotal` computes it: the total summed in float64,
    the scale rounded to float32 (``target_sum`` itself where the total is not above 0, NaN
    where it is NaN), the
    value rounded to float32 before the product. Rows in parallel; one pass to sum a row and
    one to scale it, where torch takes a pass and a temporary per step. ``indptr`` is the
    caller's to check (from 0 to ``len(data)``, never decreasing)."""
    for i in numba.prange(len(indptr) - 1):
        total = 0.0
        for q in range(indptr[i], indptr[i + 1]):
            total += data[q]
        keep = total > 0 or total != total  # (NaN among the values: a NaN row)
        scale = np.float32(target_sum / total) if keep else np.float32(target_sum)
        for q in range(indptr[i], indptr[i + 1]):
            out[q] = np.float32(data[q]) * scale


_GRAD_GENES = 16  # genes per block of the weight gradient: one 64-byte line per hidden unit


@njit_cached(parallel=True, nogil=True)
def _csc_weight_grad(indptr, indices, data, g_nh, out_hg):  # type: ignore[no-untyped-def]
    """out_hg[:, g] = sum over stored (i, g, v) of v * g_nh[i, :]: the first layer's weight
    gradient, in the weight's own layout. Genes (CSC columns) in blocks of 16, in parallel:
    each block's rows are summed in a small buffer, then written as one cache line per hidden
    unit."""
    n_genes = len(indptr) - 1
    h = g_nh.shape[1]
    n_blocks = (n_genes + _GRAD_GENES - 1) // _GRAD_GENES
    for block in numba.prange(n_blocks):
        g0 = block * _GRAD_GENES
        width = min(_GRAD_GENES, n_genes - g0)
        acc = np.zeros((_GRAD_GENES, h), dtype=np.float32)
        for t in range(width):
            _add_scaled_rows(acc[t], data, indices, g_nh, indptr[g0 + t], indptr[g0 + t + 1])
        for k in range(h):
            for t in range(width):
                out_hg[k, g0 + t] = acc[t, k]


class _CSRLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` for CSR counts ``x`` (values, crow, col) on the CPU, with the
    gradients of the weight and bias (not of the counts)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        values: torch.Tensor,
        crow: torch.Tensor,
        col: torch.Tensor,
        n_genes: int,
        weight_hg: torch.Tensor,
        bias_h: torch.Tensor | None,
        weight_gh: np.ndarray,
    ) -> torch.Tensor:
        # (before scipy, which checks the pointer's ends only: a falling pointer read as
        # empty rows, a negative column skipped by the kernel)
        indptr, indices = crow.numpy(), col.numpy()
        fault = csr_fault(indptr, indices, n_genes, of="batch's genes")
        if fault is None and len(values) != len(indices):
            fault = f"{len(indices)} column indices for {len(values)} values"
        if fault is not None:
            raise ValueError(f"a malformed CSR batch: {fault}.")
        csr = sp.csr_matrix(
            (values.detach().float().numpy(), indices, indptr), shape=(len(indptr) - 1, n_genes)
        )
        if not csr.has_sorted_indices:
            csr = csr.sorted_indices()
        h = weight_hg.shape[0]
        per_block = max(1, _BLOCK_BYTES // (4 * h))
        bounds = np.append(np.arange(0, n_genes, per_block), n_genes).astype(np.int64)
        out = np.zeros((csr.shape[0], h), dtype=np.float32)
        with first_call("the sparse first layer's kernel"):
            _csr_times_rows(csr.indptr, csr.indices, csr.data, weight_gh, bounds, out)
        ctx.csr, ctx.has_bias = csr, bias_h is not None
        # (the values read again by backward: changed in place before it, autograd says so,
        # as for a dense input, rather than a gradient of other counts)
        ctx.save_for_backward(values)
        y = torch.from_numpy(out)
        return y if bias_h is None else y.add_(bias_h.detach())

    @staticmethod
    def backward(ctx: Any, grad_nh: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ctx.saved_tensors  # noqa: B018 (autograd's check that the values are unchanged)
        csc = ctx.csr.tocsc()
        g = np.ascontiguousarray(grad_nh.detach().float().numpy())
        grad_w = np.empty((g.shape[1], csc.shape[1]), dtype=np.float32)
        with first_call("the sparse first layer's gradient kernel"):
            _csc_weight_grad(csc.indptr, csc.indices, csc.data, g, grad_w)
        grad_b = grad_nh.sum(0) if ctx.has_bias else None
        return None, None, None, None, torch.from_numpy(grad_w), grad_b, None


def csr_linear(
    x: torch.Tensor, weight_hg: torch.Tensor, bias_h: torch.Tensor | None, weight_gh: np.ndarray
) -> torch.Tensor:
    """``x @ weight_hg.T + bias_h`` for sparse CSR ``x`` (cells x genes) on the CPU.

    ``weight_gh``: the weight transposed, C-contiguous float32 (genes x hidden), which the
    caller keeps while the weight is unchanged. Differentiable in the weight and bias (the
    gradient of the weight is a sparse-transposed-times-dense product, by genes in parallel);
    the counts get no gradient.
    """
    return _CSRLinear.apply(  # type: ignore[no-any-return]
        x.values(), x.crow_indices(), x.col_indices(), x.shape[1], weight_hg, bias_h, weight_gh
    )
