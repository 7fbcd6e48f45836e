"""Data for tests, demos and benchmarks: synthetic atlases and the real benchmark data.

``synthetic_atlas`` makes negative-binomial counts for a hierarchy of real Cell Ontology cell
types across studies and donors with batch effects; it writes straight to h5ad, Zarr or
TileDB-SOMA chunk by chunk, so an atlas of millions of cells never sits in memory.
``indexed_atlas`` makes cells whose counts encode their own global index, for exact tests of
sharding, shuffling and resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._utils import is_whole, progress
from .data.writers import Format, open_writer

__all__ = [
    "CELL_TYPES",
    "SHARED_DATA_DIR",
    "cellbench_lung",
    "indexed_atlas",
    "kang2018",
    "shared_data_path",
    "synthetic_atlas",
]

#: Cell Ontology terms of the synthetic atlas: id -> (name, parent ids, relative abundance).
#: A term's parents are its nearest Cell Ontology ancestors among these terms (CL
#: 2026-03-26): a monocyte is a leukocyte and a myeloid cell.
CELL_TYPES: dict[str, tuple[str, tuple[str, ...], float]] = {
    "CL:0000738": ("leukocyte", (), 0.0),
    "CL:0000542": ("lymphocyte", ("CL:0000738",), 0.0),
    "CL:0000763": ("myeloid cell", (), 0.0),
    "CL:0000084": ("T cell", ("CL:0000542",), 0.0),
    "CL:0000624": ("CD4-positive, alpha-beta T cell", ("CL:0000084",), 0.30),
    "CL:0000625": ("CD8-positive, alpha-beta T cell", ("CL:0000084",), 0.12),
    "CL:0000236": ("B cell", ("CL:0000542",), 0.10),
    "CL:0000786": ("plasma cell", ("CL:0000542",), 0.01),
    "CL:0000623": ("natural killer cell", ("CL:0000542",), 0.08),
    "CL:0000576": ("monocyte", ("CL:0000738", "CL:0000763"), 0.0),
    "CL:0001054": ("CD14-positive monocyte", ("CL:0000576",), 0.22),
    "CL:0002396": ("CD14-low, CD16-positive monocyte", ("CL:0001054",), 0.07),
    "CL:0000451": ("dendritic cell", ("CL:0000738",), 0.03),
    "CL:0000784": ("plasmacytoid dendritic cell", ("CL:0000451",), 0.01),
    "CL:0000556": ("megakaryocyte", ("CL:0000763",), 0.01),
}


def _lineage(term: str) -> list[str]:
    """``term`` and every ancestor of it among :data:`CELL_TYPES`, each once."""
    seen = [term]
    for node in seen:  # (grows as it is read: a walk over every parent)
        seen += [p for p in CELL_TYPES[node][1] if p not in seen]
    return seen


_ASSAYS = [
    ("EFO:0009922", "10x 3' v3"),
    ("EFO:0009899", "10x 3' v2"),
    ("EFO:0030003", "10x 3' transcription profiling"),
]

SHARED_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass
class _AtlasModel:
    """The parameters of one synthetic atlas (drawn once from the seed)."""

    n_genes: int
    n_studies: int
    donors_per_study: int
    seed: int
    leaves: list[str] = field(init=False)
    type_p: np.ndarray = field(init=False)
    log_profiles: np.ndarray = field(init=False)
    study_shift: np.ndarray = field(init=False)
    donor_shift: np.ndarray = field(init=False)
    study_depth: np.ndarray = field(init=False)
    study_types: np.ndarray = field(init=False)
    theta: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng([self.seed, 0])
        g = self.n_genes
        self.leaves = [k for k, (_, _, p) in CELL_TYPES.items() if p > 0]
        # Base expression: log-normal relative gene means; with the depths below about 5-10%
        # of entries are nonzero, whatever the number of genes.
        base = rng.normal(0.0, 2.0, g)
        programs = {}
        for term in CELL_TYPES:
            up = rng.random(g) < 0.03
            programs[term] = np.where(up, rng.normal(2.0, 0.6, g), 0.0)
        prof = []
        for leaf in self.leaves:  # a program for the type and each of its ancestors, once
            prof.append(base + sum(programs[node] for node in _lineage(leaf)))
        logp_all = np.stack(prof)
        self.log_profiles = (logp_all - np.log(np.exp(logp_all).sum(1, keepdims=True))).astype(
            np.float32
        )
        self.type_p = np.array([CELL_TYPES[t][2] for t in self.leaves])
        self.study_shift = rng.normal(0.0, 0.35, (self.n_studies, g)).astype(np.float32)
        self.donor_shift = rng.normal(
            0.0, 0.12, (self.n_studies * self.donors_per_study, g)
        ).astype(np.float32)
        # UMIs per cell over a whole transcriptome (~20k genes); a gene panel gets its share.
        self.study_depth = np.exp(rng.normal(np.log(3000.0), 0.4, self.n_studies)) * g / 20_000
        # Each study sees most cell types, not all (rare types missing in some studies).
        seen = rng.random((self.n_studies, len(self.leaves))) < 0.85
        seen[:, self.type_p >= 0.1] = True
        self.study_types = seen
        self.theta = np.exp(rng.normal(np.log(2.0), 0.5, g))

    def chunk(self, start: int, n: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
        """Cells ``start .. start+n``: counts and obs (deterministic in ``start``)."""
        rng = np.random.default_rng([self.seed, 1, start])
        n_st, n_dn = self.n_studies, self.donors_per_study
        study = rng.integers(0, n_st, n)
        donor = study * n_dn + rng.integers(0, n_dn, n)
        probs = self.study_types[study] * self.type_p[None, :]
        probs /= probs.sum(1, keepdims=True)
        ctype = (rng.random(n)[:, None] > np.cumsum(probs, 1)).sum(1)
        depth = self.study_depth[study] * np.exp(rng.normal(0.0, 0.45, n))
        log_mu = self.log_profiles[ctype]
        log_mu += self.study_shift[study]
        log_mu += self.donor_shift[donor]
        log_mu += np.log(depth).astype(np.float32)[:, None]
        x = _sample_nb(rng, np.exp(log_mu, out=log_mu), self.theta.astype(np.float32))
        obs = self._obs(start, study, donor, ctype, x)
        return x, obs

    def _obs(
        self, start: int, study: np.ndarray, donor: np.ndarray, ctype: np.ndarray, x: sp.csr_matrix
    ) -> pd.DataFrame:
        ids = np.array(self.leaves)[ctype]
        names = np.array([CELL_TYPES[t][0] for t in self.leaves])[ctype]
        assay = np.array(_ASSAYS)[study % len(_ASSAYS)]
        return pd.DataFrame(
            {
                "cell_type_ontology_term_id": ids,
                "cell_type": names,
                # (text for no cells too, which a list of none is not)
                "dataset_id": np.array([f"study_{s:02d}" for s in study], dtype=object),
                "donor_id": np.array([f"donor_{d:03d}" for d in donor], dtype=object),
                "assay_ontology_term_id": assay[:, 0],
                "assay": assay[:, 1],
                "tissue_ontology_term_id": "UBERON:0000178",
                "tissue": "blood",
                "disease_ontology_term_id": "PATO:0000461",
                "disease": "normal",
                "is_primary_data": True,
                "n_counts": np.asarray(x.sum(1)).ravel().astype(np.float32),
            },
            index=[f"cell_{i}" for i in range(start, start + len(study))],
        )

    def var(self) -> pd.DataFrame:
        ens = [f"ENSG{i:011d}" for i in range(1, self.n_genes + 1)]
        return pd.DataFrame(
            {"feature_name": [f"GENE{i}" for i in range(1, self.n_genes + 1)]},
            index=pd.Index(ens, name="gene_ids"),
        )


def _sample_nb(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray) -> sp.csr_matrix:
    """Negative-binomial counts with means ``mu`` (cells x genes) and dispersion ``theta``.

    Sparse by construction: P(count > 0) is computed per entry, the nonzero entries are drawn
    from the zero-truncated distribution; only those are kept.
    """
    p0 = mu / theta
    p0 += 1.0
    np.log(p0, out=p0)
    p0 *= -theta
    np.exp(p0, out=p0)
    nz = rng.random(mu.shape, dtype=np.float32) >= p0
    del p0
    rows, cols = np.nonzero(nz)
    del nz
    m = mu[rows, cols].astype(np.float64)
    t = np.broadcast_to(theta, mu.shape)[rows, cols].astype(np.float64)
    vals = _zero_truncated_nb(rng, m, t).astype(np.float32)
    return sp.csr_matrix((vals, (rows, cols)), shape=mu.shape)


_UNIT = 1024

#: Bumped whenever the generator's output changes (caches of generated atlases key on it).
SYNTHETIC_VERSION = 3


def _zero_truncated_nb(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Exact draws of NB(mu, theta) conditioned on being positive.

    Where P(0) < 1/2, plain NB draws with zeros redrawn (each round halves what is left);
    elsewhere the mass sits on 1, 2, 3 ... and the CDF is inverted term by term.
    """
    out = np.zeros(len(mu), dtype=np.int64)
    q = mu / (mu + theta)
    p0 = np.exp(theta * np.log1p(-q))
    rej = np.flatnonzero(p0 < 0.5)
    while len(rej):
        draws = rng.negative_binomial(theta[rej], 1.0 - q[rej])
        out[rej] = draws
        rej = rej[draws == 0]
    inv = np.flatnonzero(p0 >= 0.5)
    u = p0[inv] + rng.random(len(inv)) * (1.0 - p0[inv])  # uniform on (P(0), 1)
    th, qq = theta[inv], q[inv]
    pk = p0[inv] * th * qq  # P(1)
    cdf = p0[inv] + pk
    k = np.ones(len(inv))
    todo = np.flatnonzero(u > cdf)
    while len(todo):
        kk = k[todo]
        pk[todo] *= (kk + th[todo]) / (kk + 1.0) * qq[todo]
        cdf[todo] += pk[todo]
        k[todo] += 1.0
        todo = todo[(u[todo] > cdf[todo]) & (k[todo] < 10_000)]
    out[inv] = k
    return out


def synthetic_atlas(
    n_cells: int = 10_000,
    n_genes: int = 2_000,
    *,
    n_studies: int = 6,
    donors_per_study: int = 4,
    path: str | os.PathLike[str] | None = None,
    format: Format | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress_bar: bool = False,
    **writer_options: Any,
) -> ad.AnnData | Path:
    """A synthetic single-cell atlas with negative-binomial counts.

    Cell types are real Cell Ontology terms (``CELL_TYPES``) whose expression programs follow
    their hierarchy (CD4 and CD8 T cells share the T-cell program, ...); studies and donors add
    multiplicative batch effects, studies differ in depth and cell-type composition, and about
    5-10% of entries are nonzero. var holds Ensembl-style ids (``var_names``) and symbols
    (``feature_name``); obs has CELLxGENE-style columns.

    Parameters
    ----------
    n_cells, n_genes
        Size of the atlas.
    n_studies, donors_per_study
        Batch structure.
    path
        Where to write. Without a path, an in-memory AnnData is returned.
    format
        ``"h5ad"``, ``"zarr"`` or ``"soma"``; guessed from ``path`` when omitted.
    chunk_size
        Cells generated and written at a time (memory is bounded by one chunk), in whole
        units of 1,024 cells (rounded down, at least one unit).
    seed
        The atlas is a pure function of its arguments and ``seed``.
    **writer_options
        Passed to the store writer (e.g. ``compression="gzip"`` for h5ad).
    """
    for name, value, least in (
        ("n_cells", n_cells, 0),
        ("n_genes", n_genes, 1),
        ("n_studies", n_studies, 1),
        ("donors_per_study", donors_per_study, 1),
        ("seed", seed, 0),
    ):
        if not is_whole(value, least=least):
            raise ValueError(f"{name} must be a whole number of at least {least}, not {value!r}.")
    if chunk_size is not None and not is_whole(chunk_size, least=1):
        raise ValueError(
            f"chunk_size must be a whole number of at least 1 (None: from n_genes), not "
            f"{chunk_size!r}."
        )
    model = _AtlasModel(n_genes, n_studies, donors_per_study, seed)
    # Cells come in units of _UNIT with their own random streams: the atlas does not depend
    # on chunk_size, which only sets how many units are generated and written at a time.
    per_chunk = chunk_size or max(1, 20_000_000 // max(n_genes, 1))
    units_per_chunk = max(1, per_chunk // _UNIT)
    starts = range(0, max(n_cells, 1), units_per_chunk * _UNIT)  # (no cells: one chunk of none)

    def make(start: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
        stop = min(n_cells, start + units_per_chunk * _UNIT)
        parts = [model.chunk(u, min(_UNIT, stop - u)) for u in range(start, stop, _UNIT)]
        parts = parts or [model.chunk(start, 0)]  # (no cells: their columns still)
        return sp.vstack([p[0] for p in parts], format="csr"), pd.concat([p[1] for p in parts])

    chunks = (make(s) for s in starts)
    if path is None:
        xs, obs = zip(*chunks, strict=True)
        x = sp.vstack(xs, format="csr")
        return ad.AnnData(X=x.astype(np.float32), obs=pd.concat(obs), var=model.var())
    writer = open_writer(
        path, model.var(), format=format, n_obs=n_cells, overwrite=overwrite, **writer_options
    )
    with writer:
        for x, obs in progress(
            chunks, total=len(starts), desc="writing atlas", enabled=progress_bar, unit="chunk"
        ):
            writer.append(x, obs)
    return writer.path


def indexed_atlas(
    n_cells: int,
    n_genes: int = 16,
    *,
    n_studies: int = 3,
    path: str | os.PathLike[str] | None = None,
    format: Format | None = None,
    chunk_size: int = 4096,
    overwrite: bool = False,
    **writer_options: Any,
) -> ad.AnnData | Path:
    """Cells whose counts encode their global index: exact checks of loaders.

    Cell ``i`` has count ``i + 1`` in gene 0 and a count of 1 in gene ``1 + i % (n_genes - 1)``
    (so gene alignment can be checked too). obs has ``cell_type_ontology_term_id`` (cycling
    over the synthetic cell types), ``dataset_id`` (contiguous studies) and ``obs_index``.
    Float32 holds the index exactly up to 2**24 cells.
    """
    if not is_whole(n_genes, least=2):
        raise ValueError(
            f"indexed_atlas needs a whole number of at least 2 genes, not {n_genes!r}."
        )
    if not is_whole(n_cells, least=0):
        raise ValueError(f"n_cells must be a whole number of at least 0, not {n_cells!r}.")
    if not is_whole(chunk_size, least=1):
        raise ValueError(f"chunk_size must be a whole number of at least 1, not {chunk_size!r}.")
    if not is_whole(n_studies, least=1):
        raise ValueError(f"n_studies must be a whole number of at least 1, not {n_studies!r}.")
    if n_cells >= 2**24:
        raise ValueError("indexed_atlas encodes indices in float32: at most 2**24 - 1 cells.")
    leaves = [k for k, (_, _, p) in CELL_TYPES.items() if p > 0]
    var = pd.DataFrame(
        {"feature_name": [f"GENE{i}" for i in range(n_genes)]},
        index=pd.Index([f"ENSG{i:011d}" for i in range(n_genes)], name="gene_ids"),
    )

    def chunk(start: int, n: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
        idx = np.arange(start, start + n)
        rows = np.repeat(np.arange(n), 2)
        cols = np.stack([np.zeros(n, dtype=np.int64), 1 + idx % (n_genes - 1)], 1).ravel()
        vals = np.stack([idx + 1.0, np.ones(n)], 1).ravel().astype(np.float32)
        x = sp.csr_matrix((vals, (rows, cols)), shape=(n, n_genes))
        obs = pd.DataFrame(
            {
                "cell_type_ontology_term_id": np.array(leaves)[idx % len(leaves)],
                # (text, also for no cells: pandas makes an empty list's column float)
                "dataset_id": np.array(
                    [f"study_{s}" for s in (idx * n_studies) // max(n_cells, 1)], dtype=object
                ),
                "donor_id": np.array(
                    [f"donor_{d}" for d in (idx * n_studies * 2) // max(n_cells, 1)], dtype=object
                ),
                "obs_index": idx,
            },
            index=[f"cell_{i}" for i in idx],
        )
        return x, obs

    chunks = [chunk(s, min(chunk_size, n_cells - s)) for s in range(0, n_cells, chunk_size)]
    chunks = chunks or [chunk(0, 0)]  # (no cells: an AnnData of none, with its columns)
    if path is None:
        x = sp.vstack([c[0] for c in chunks], format="csr")
        return ad.AnnData(X=x, obs=pd.concat([c[1] for c in chunks]), var=var)
    writer = open_writer(
        path, var, format=format, n_obs=n_cells, overwrite=overwrite, **writer_options
    )
    with writer:
        for x, obs in chunks:
            writer.append(x, obs)
    return writer.path


# -- real benchmark data ------------------------------------------------------------------

_SHARED_FILES = {
    "kang2018": "kang2018_pbmc_ctrl_8donors.h5ad",
    "cellbench_lung": "cellbench_lung_celllines_celseq2_dropseq.h5ad",
}


def shared_data_path(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of a real benchmark file (``kang2018`` or ``cellbench_lung``); a clear error if absent.

    The folder is ``$CELLSIFT_DATA``, else ``../shared/data`` beside the repository.
    """
    if name not in _SHARED_FILES:
        raise KeyError(
            f"{name!r} is not a shared benchmark file; the names are {', '.join(_SHARED_FILES)}."
        )
    env = os.environ.get("CELLSIFT_DATA")
    # (a "~" left unexpanded by the shell, e.g. quoted in a job script: the home folder)
    given = data_dir if data_dir is not None else env or None
    folder = Path(os.path.expanduser(given)) if given is not None else SHARED_DATA_DIR
    path = folder / _SHARED_FILES[name]
    if not path.exists():
        raise FileNotFoundError(
            f"The real benchmark file {_SHARED_FILES[name]} is not in {folder}. Put the shared "
            "data folder there or point CELLSIFT_DATA at it (the files come from GEO: "
            "GSE96583 for Kang 2018, GSE118767 for CellBench); synthetic_atlas() needs no files."
        )
    return path


def kang2018(data_dir: str | os.PathLike[str] | None = None, *, backed: bool = False) -> ad.AnnData:
    """Kang et al. 2018 PBMC, 8 donors, 12,261 cells x 1,287 genes with Cell Ontology labels.

    Raw counts in ``X``; ``obs["batch"]`` is the donor.
    """
    return ad.read_h5ad(shared_data_path("kang2018", data_dir), backed="r" if backed else None)


def cellbench_lung(
    data_dir: str | os.PathLike[str] | None = None, *, singlets_only: bool = True
) -> ad.AnnData:
    """CellBench lung cancer cell lines (CEL-seq2 and Drop-seq), full transcriptome.

    With ``singlets_only`` the demuxlet doublets (``DBL``) are removed.
    """
    adata = ad.read_h5ad(shared_data_path("cellbench_lung", data_dir))
    if singlets_only and "demuxlet_cls" in adata.obs:
        adata = adata[adata.obs["demuxlet_cls"] == "SNG"].copy()
    return adata
