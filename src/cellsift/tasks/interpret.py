"""Which genes set two groups of cells apart in a model's embedding (integrated gradients).

As SCimilarity's ``Interpreter``: each cell of group A has a distance to group B, the cosine
distance ``1 - z . c`` between its embedding ``z`` and the normalised mean embedding ``c`` of
group B's cells. Integrated gradients (captum) attribute that distance to the genes of the
cell's log-normalised expression (the encoder's input), along the straight path from a
baseline (zero expression, or group B's mean expression) to the cell. A cell's attributions
sum to its distance minus the baseline's (completeness; captum's convergence delta is the
shortfall of the numerical integral). Averaged over the cells of A, they rank the genes.

Counts are aligned to the model's genes (:meth:`MetricModel.aligned_counts`) and normalised
through the model's own ``normalize`` module, exactly as :meth:`MetricModel.embed` does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from .._utils import cell_mask, check_model_object, is_whole, progress
from .._warnings import warn
from ..data.loader import to_torch_csr
from ..errors import ConfigError, GeneAlignmentError

__all__ = ["DifferenceAttributions", "attribute_difference", "explain_difference"]

Baseline = Literal["zeros", "group_b"]

#: captum's integration rules for integrated gradients.
_IG_METHODS = (
    "gausslegendre",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
)

#: A cell's integral has converged when ``|delta| <= DELTA_RTOL * mean |f(x) - f(baseline)|``
#: over the cells (plus ``DELTA_ATOL``); otherwise a warning asks for more steps.
DELTA_RTOL = 0.05
DELTA_ATOL = 1e-4


@dataclass
class DifferenceAttributions:
    """Per-cell integrated gradients of the distance of group A's cells to group B.

    Attributes
    ----------
    attributions_ng
        Cells of A (those attributed) x the model's genes.
    distance_n, baseline_distance_n
        Each cell's distance to group B, and its baseline's.
    delta_n
        captum's convergence delta: attributions' sum minus ``distance - baseline_distance``.
    cells
        obs names of the attributed cells.
    genes, symbols
        The model's gene ids (and symbols, when it has them).
    mean_a_g, mean_b_g
        Mean log-normalised expression of each group (all its cells), in model gene order.
    """

    attributions_ng: np.ndarray
    distance_n: np.ndarray
    baseline_distance_n: np.ndarray
    delta_n: np.ndarray
    cells: pd.Index
    genes: pd.Index
    symbols: pd.Index | None
    mean_a_g: np.ndarray
    mean_b_g: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    def ranked(self) -> pd.DataFrame:
        """Genes ranked by mean attribution (descending), indexed by gene id.

        Columns: ``attribution`` (mean over cells), ``abs_attribution`` (mean of absolute
        values), ``symbol`` (when known), ``mean_a`` and ``mean_b`` (mean log-normalised
        expression). ``attrs`` hold the cell count, mean distances and the largest delta.
        """
        a = self.attributions_ng.astype(np.float64)
        df = pd.DataFrame(
            {"attribution": a.mean(0), "abs_attribution": np.abs(a).mean(0)},
            index=pd.Index(self.genes, name="gene"),
        )
        if self.symbols is not None:
            df["symbol"] = np.asarray(self.symbols)
        df["mean_a"] = self.mean_a_g
        df["mean_b"] = self.mean_b_g
        df = df.sort_values("attribution", ascending=False, kind="stable")
        df.attrs.update(
            n_cells=len(self.cells),
            distance=float(self.distance_n.mean()),
            baseline_distance=float(self.baseline_distance_n.mean()),
            max_abs_delta=float(np.abs(self.delta_n).max()),
            **self.params,
        )
        return df


class _CentroidDistance(nn.Module):
    """Cosine distance of each cell's embedding to a unit centroid: ``1 - encoder(x) . c``."""

    centroid_k: torch.Tensor

    def __init__(self, encoder: nn.Module, centroid_k: torch.Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("centroid_k", centroid_k)

    def forward(self, x_ng: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x_ng)  # (a float64 model's embeddings are float64)
        return 1.0 - z @ self.centroid_k.to(z.dtype)


def attribute_difference(
    model: Any,
    adata: ad.AnnData,
    group_a: Any,
    group_b: Any,
    *,
    layer: str | None = None,
    check_counts: bool = True,
    baseline: Baseline | np.ndarray = "zeros",
    n_steps: int = 50,
    method: str = "gausslegendre",
    max_cells: int | None = 2_000,
    batch_size: int = 32,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress_bar: bool = False,
) -> DifferenceAttributions:
    """Integrated gradients of each group-A cell's distance to group B, per gene.

    Parameters
    ----------
    model
        A :class:`~cellsift.models.MetricModel` (anything with ``aligned_counts`` and a ``module``
        holding ``normalize`` and ``encoder``).
    adata
        Raw counts in ``adata.X`` or ``adata.layers[layer]``; genes are aligned to the
        model's by id or symbol (too little overlap is an error naming the count). Only
        the cells of the two groups are read and checked.
    check_counts
        Refuse values that are not raw counts (NaN, negative, non-integer) in the two
        groups' cells; False: use them as they are.
    group_a, group_b
        The cells to explain and the comparison group: boolean masks over ``adata.obs`` or
        obs names.
    baseline
        Where each path starts: ``"zeros"`` (no expression, SCimilarity's choice),
        ``"group_b"`` (group B's mean log-normalised expression) or one log-normalised value
        per model gene: an array in the model's gene order, or a Series indexed by genes
        (ids or symbols, aligned to the model's as the counts are; the model's genes it
        lacks read as 0, as they do in the counts).
    n_steps, method
        captum's integration steps and rule.
    max_cells
        Attribute at most this many cells of A, drawn at random with ``seed`` (None: all).
    batch_size
        Cells per captum call; memory grows with ``batch_size * n_steps * n_genes``.
    device
        Where to compute (default: where the model is).
    progress_bar
        Show a progress bar over the batches.
    """
    from captum.attr import IntegratedGradients

    if not (callable(getattr(model, "aligned_counts", None)) and hasattr(model, "module")):
        check_model_object(model)  # (a bundle's path, say: named, with how to load it)
    if not is_whole(n_steps, least=1):
        raise ConfigError(f"n_steps must be a whole number of at least 1, not {n_steps!r}.")
    if not is_whole(batch_size, least=1):
        raise ConfigError(
            f"batch_size must be a whole number of at least 1 cell, not {batch_size!r}."
        )
    if method not in _IG_METHODS:
        raise ConfigError(
            f"method {method!r} is not an integration rule of captum's: use one of "
            f"{', '.join(_IG_METHODS)}."
        )
    if n_steps < 2 and method.startswith("riemann"):  # (captum asserts it, in no words)
        raise ConfigError(
            f"method {method!r} needs n_steps of at least 2 (its sum spans the steps), not "
            f"{n_steps}; or use method='gausslegendre'."
        )
    if max_cells is not None and not is_whole(max_cells, least=1):
        raise ConfigError(
            f"max_cells must be a whole number of at least 1 (or None for all), not {max_cells!r}."
        )
    if device is not None:
        from ..models.bundle import check_device  # (cellsift.models imports Lightning)

        device = check_device(device)  # (a device torch cannot use here: one it can, named)
    mask_a = cell_mask(adata, group_a, "group_a")
    mask_b = cell_mask(adata, group_b, "group_b")
    # the two groups' cells only, as x's rows (a backed atlas is not read whole)
    chosen = np.flatnonzero(mask_a | mask_b)
    x = model.aligned_counts(adata, layer=layer, check_counts=check_counts, rows=chosen)
    # (a cell without counts is its own zeros baseline: nothing to attribute, nor a place
    # in group B's centroid, which would be the encoder's output for no expression)
    model.check_cells_have_counts(x, adata.obs_names[chosen], layer=layer)
    from ..models.bundle import inference_on

    module = model.module
    # (gradients taken inside a caller's torch.inference_mode too: tensors made there take
    # no part in autograd; its mode and device restored after)
    with torch.inference_mode(False), inference_on(module, device) as dev:
        _check_not_inference(module.encoder)
        rows_a = np.searchsorted(chosen, np.flatnonzero(mask_a))  # (as rows of x)
        rows_b = np.searchsorted(chosen, np.flatnonzero(mask_b))
        mean_a, _ = _group_means(module, x[rows_a], dev, embed=False)
        mean_b, centroid = _group_means(module, x[rows_b], dev, embed=True)
        base_g = _baseline(baseline, mean_b, model.genes).to(dev)

        if max_cells is not None and len(rows_a) > max_cells:
            rng = np.random.default_rng(seed)
            rows_a = np.sort(rng.choice(rows_a, max_cells, replace=False))
        forward = _CentroidDistance(module.encoder, centroid.to(dev)).to(dev).eval()
        ig = IntegratedGradients(forward)
        attrs, dist, base_dist, deltas = [], [], [], []
        xa = x[rows_a]
        batches = range(0, len(rows_a), batch_size)
        for start in progress(
            batches, total=len(batches), desc="integrated gradients", enabled=progress_bar
        ):
            x_ng = _normalized(module, xa[start : start + batch_size], dev)
            b_ng = base_g.expand_as(x_ng).contiguous()
            attr, delta = ig.attribute(
                x_ng,
                baselines=b_ng,
                n_steps=int(n_steps),
                method=method,
                return_convergence_delta=True,
            )
            with torch.no_grad():  # (as float32: numpy has no bfloat16, a bf16 model's type)
                dist.append(forward(x_ng).float().cpu().numpy())
                base_dist.append(forward(b_ng).float().cpu().numpy())
            attrs.append(attr.detach().float().cpu().numpy())
            deltas.append(delta.detach().float().cpu().numpy())

        result = DifferenceAttributions(
            attributions_ng=np.concatenate(attrs).astype(np.float32),
            distance_n=np.concatenate(dist),
            baseline_distance_n=np.concatenate(base_dist),
            delta_n=np.concatenate(deltas),
            cells=adata.obs_names[chosen[rows_a]],
            genes=model.genes.genes,
            symbols=model.genes.symbols,
            mean_a_g=mean_a,
            mean_b_g=mean_b,
            params={
                "baseline": baseline if isinstance(baseline, str) else "custom",
                "n_steps": n_steps,
            },
        )
    _check_finite(result, check_counts)
    _check_convergence(result, n_steps)
    return result


def explain_difference(
    model: Any, adata: ad.AnnData, group_a: Any, group_b: Any, **options: Any
) -> pd.DataFrame:
    """Genes ranked by how much they move group A's cells away from group B.

    :func:`attribute_difference` (same arguments and options), averaged over A's cells by
    :meth:`DifferenceAttributions.ranked`: one row per model gene, indexed by gene id,
    ``attribution`` descending (positive: the gene's expression in A, relative to the
    baseline, drives A away from B).

    Examples
    --------
    >>> df = explain_difference(model, adata, adata.obs["condition"] == "stim",
    ...                         adata.obs["condition"] == "ctrl")
    >>> df.head(20)
    """
    return attribute_difference(model, adata, group_a, group_b, **options).ranked()


# -- helpers ------------------------------------------------------------------------------
def _check_not_inference(encoder: nn.Module) -> None:
    """The encoder's weights and floating buffers (BatchNorm's statistics, which its
    backward reads) take part in autograd: tensors made inside ``torch.inference_mode()``
    cannot, and integrated gradients takes the encoder's gradients."""
    floating = (b for b in encoder.buffers() if b.is_floating_point())
    if any(t.is_inference() for t in itertools.chain(encoder.parameters(), floating)):
        raise ConfigError(
            "the model's weights were made inside torch.inference_mode() (loaded or moved "
            "there), which leaves them out of autograd, and integrated gradients takes the "
            "encoder's gradients: load the model outside inference_mode."
        )


def _normalized(module: Any, x: sp.csr_matrix, dev: torch.device) -> torch.Tensor:
    """The encoder's input: the model's own normalisation of the counts, dense."""
    with torch.no_grad():
        return module.normalize({"x_ng": to_torch_csr(x).to(dev)})["x_ng"]


def _group_means(
    module: Any, x: sp.csr_matrix, dev: torch.device, *, embed: bool
) -> tuple[np.ndarray, torch.Tensor]:
    """Mean log-normalised expression of a group and, with ``embed``, its unit mean embedding
    (one pass over the group)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=dev)
    z_sum: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, x.shape[0], 1024):
            x_ng = _normalized(module, x[start : start + 1024], dev)
            total += x_ng.sum(0, dtype=torch.float64)
            if embed:
                s = module.encoder(x_ng).sum(0, dtype=torch.float64)
                z_sum = s if z_sum is None else z_sum + s
    mean = (total / x.shape[0]).cpu().numpy()
    if z_sum is None:
        return mean, torch.zeros(0)
    norm = torch.linalg.vector_norm(z_sum)
    if float(norm) <= 1e-8 * x.shape[0]:
        raise ValueError(
            "group_b's embeddings cancel out (their mean is ~0), so it has no direction to "
            "measure distances to; choose a more homogeneous group_b."
        )
    return mean, (z_sum / norm).float()


def _baseline(baseline: Baseline | Any, mean_b: np.ndarray, genes: Any) -> torch.Tensor:
    """The baseline's log-normalised value of each of the model's ``genes`` (its
    :class:`~cellsift.data.GeneVocabulary`)."""
    n_genes = len(genes)
    if isinstance(baseline, pd.Series):  # by its genes, not by position
        if baseline.index.has_duplicates:
            twice = baseline.index[baseline.index.duplicated()].unique()[:3].tolist()
            raise ValueError(
                f"the baseline Series names genes twice ({', '.join(map(repr, twice))}): it "
                "is read by its index, one value a gene; keep one of each."
            )
        try:  # (every gene it names counts; the model's genes it lacks read as 0)
            gm = genes.align(
                pd.DataFrame(index=baseline.index),
                source="the baseline",
                min_overlap=0.0,
                of="vocabulary",
                warn_twice=False,  # (a gene named twice: refused below)
            )
        except GeneAlignmentError:
            raise GeneAlignmentError(
                f"the baseline is a Series, read by its index (genes), and none of its "
                f"{len(baseline)} index values ({', '.join(map(repr, baseline.index[:3]))}"
                f"{', ...' if len(baseline) > 3 else ''}) is one of the "
                "model's genes (ids or symbols): index it by the model's genes, or pass the "
                "values in the model's gene order as an array (baseline.to_numpy())."
            ) from None
        if gm.twice:  # (an id and the gene's symbol: one of two values would be dropped)
            row, gene = next(iter(gm.twice.items()))
            other = baseline.index[int(np.flatnonzero(gm.col_map == gene)[0])]
            raise ValueError(
                f"the baseline Series names genes twice, by two names "
                f"({baseline.index[row]!r} and {other!r} are the model's gene "
                f"{genes.genes[gene]!r}): it is read by its index, one value a gene; keep one "
                "of each."
            )
        found = gm.col_map >= 0  # (in the model's gene order, checked as an array below)
        in_order = np.zeros(n_genes, dtype=np.float32)
        in_order[gm.col_map[found]] = np.asarray(baseline, dtype=np.float32)[found]
        baseline = in_order
    if isinstance(baseline, str):
        if baseline == "zeros":
            return torch.zeros(n_genes)
        if baseline == "group_b":
            return torch.as_tensor(mean_b, dtype=torch.float32)
        raise ValueError(
            f"baseline must be 'zeros', 'group_b' or one value per gene, not {baseline!r}."
        )
    arr = np.asarray(baseline, dtype=np.float32)
    if arr.shape != (n_genes,):
        raise ValueError(
            f"a baseline array needs one log-normalised value per model gene ({n_genes}), "
            f"not shape {arr.shape}."
        )
    if not np.isfinite(arr).all():
        raise ValueError(
            f"the baseline holds {int((~np.isfinite(arr)).sum())} values that are not finite "
            "(NaN or inf): every attribution would be NaN. Give finite log-normalised values."
        )
    return torch.from_numpy(arr.copy())


def _check_finite(result: DifferenceAttributions, check_counts: bool) -> None:
    """Attributions that are not finite (of values that are not counts, read with
    ``check_counts=False``; or of the model): said, naming how many cells, rather than
    ranked."""
    cells = ~np.isfinite(result.attributions_ng).all(1) | ~np.isfinite(result.distance_n)
    if cells.any():
        why = (
            "the model's outputs for them are not finite (its weights?)"
            if check_counts
            else "of values that are not counts in group A's or group B's cells (read with "
            "check_counts=False; check_counts=True names them)"
        )
        warn(
            f"{int(cells.sum())} of {len(cells)} cells have attributions or distances that "
            f"are not finite (NaN or inf): {why}. Their genes' ranks mean nothing."
        )


def _check_convergence(result: DifferenceAttributions, n_steps: int) -> None:
    scale = float(np.abs(result.distance_n - result.baseline_distance_n).mean())
    bad = np.abs(result.delta_n) > DELTA_RTOL * scale + DELTA_ATOL
    if bad.any():
        warn(
            f"integrated gradients did not converge for {int(bad.sum())} of {len(bad)} cells "
            f"(|delta| up to {float(np.abs(result.delta_n).max()):.3g}); raise n_steps "
            f"(now {n_steps})."
        )
