"""Write tests/fixtures/scimilarity_tiny: a tiny model saved by the scimilarity package itself.

Runs in the scimilarity peer venv (``benchmarks/_peers.py``)::

    python3 benchmarks/_peers.py scimilarity   # builds the venv, prints its python
    PY=benchmarks/.venvs/scimilarity/bin/python
    .venv/bin/python benchmarks/_write_cl_obo.py /tmp/cl.obo
    $PY benchmarks/_make_scimilarity_fixture.py --obo /tmp/cl.obo

A ``MetricLearning`` model (50 genes, hidden [32, 32], latent 16, their other defaults) is
trained for a few steps with their own ``MetricLearningDataModule`` and Lightning, so the
BatchNorm running statistics and PReLU slopes are no longer at their initial values, and is
saved with their ``MetricLearning.save_all``. The expected embeddings come from their
documented inference path: ``align_dataset`` -> ``lognorm_counts`` ->
``CellEmbedding.get_embeddings``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

# Their data module enumerates a set of label names: fix the hash seed so reruns match.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})

import anndata as ad
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from scimilarity import CellEmbedding, align_dataset, lognorm_counts, ontologies
from scimilarity.anndata_data_models import MetricLearningDataModule
from scimilarity.training_models import MetricLearning
from scipy.sparse import csr_matrix

ROOT = Path(__file__).resolve().parents[1]
GENES = [f"ENSG{i:011d}" for i in range(1, 51)]
LABELS = ["B cell", "T cell", "monocyte", "natural killer cell"]  # CL:0000236/084/576/623
README = """\
# scimilarity_tiny

A tiny SCimilarity model written by the `scimilarity` package itself (version {version},
torch {torch}) with `MetricLearning.save_all`, by `benchmarks/_make_scimilarity_fixture.py`
(run it again in the scimilarity peer venv to regenerate). 50 genes `ENSG00000000001` ..
`ENSG00000000050`, hidden layers [32, 32], latent 16, dropout 0.5, input dropout 0.4; trained
{steps} steps on random lognormed data (batch 16, labels "B cell", "T cell", "monocyte", "natural killer
cell", two studies) so BatchNorm running stats and PReLU slopes are not at their initial values.

Files written by `save_all`: `encoder.ckpt`, `decoder.ckpt` (`torch.save({{"state_dict": ...}})`),
`layer_sizes.json` (encoder state_dict key -> shape), `hyperparameters.json`, `gene_order.tsv`
(one gene per line, no trailing newline), `label_ints.csv` (int -> cell type name, quoted),
`metadata.json` (date, train_path). Written by the fixture script: `input_counts.npy` (float32
[8, 50] raw integer counts, genes in `gene_order.tsv` order), `expected_lognorm.npy` (their
lognorm of those counts) and `expected_embeddings.npy` (float32 [8, 16]).

## Embedding path (documented usage of `CellEmbedding.get_embeddings`)

    ce = CellEmbedding(model_path)                  # Encoder(n_genes, latent, hidden), eval()
    data = align_dataset(data, ce.gene_order, gene_overlap_threshold=50)  # already aligned
    data = lognorm_counts(data)                     # from data.layers["counts"]
    emb = ce.get_embeddings(data.X)

`lognorm_counts`: `X = layers["counts"]`, `sc.pp.normalize_total(target_sum=1e4)` then
`sc.pp.log1p` (natural log), in float32: `x = log1p(counts / (counts.sum(axis=1) / 1e4))`;
a cell with zero total stays zero.

`CellEmbedding` rebuilds the encoder from `layer_sizes.json` (sorted keys holding "weight" with
2 dims: the last gives latent_dim, the others hidden_dim) and `len(gene_order)`, loads
`encoder.ckpt["state_dict"]` and calls `eval()`. Forward in eval mode, per hidden block i
(Dropout is the identity): `h = PReLU_i(BatchNorm1d_i(Linear_i(h)))` with BatchNorm using its
running_mean/running_var, eps 1e-5, and PReLU one shared slope `a` (`max(0,v) + a*min(0,v)`);
then `z = Linear_out(h)` and `z / max(||z||_2, 1e-12)` per cell (`F.normalize(p=2, dim=1)`).

## encoder.ckpt state_dict

{layout}
"""


def counts_adata(rng: np.random.Generator, n: int) -> ad.AnnData:
    counts = rng.poisson(rng.gamma(0.6, 4.0, size=len(GENES)), size=(n, len(GENES)))
    counts[:, 0] += 1  # no all-zero cell
    adata = ad.AnnData(X=counts.astype(np.float32), var=pd.DataFrame(index=GENES))
    adata.layers["counts"] = adata.X.copy()
    return adata


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--obo", required=True, help="local Cell Ontology OBO (_write_cl_obo.py)")
    p.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "scimilarity_tiny"))
    p.add_argument("--train-steps", type=int, default=3)
    args = p.parse_args()
    out = Path(args.out).resolve()
    obo = str(Path(args.obo).resolve())
    ontologies.import_cell_ontology.__defaults__ = (obo,)  # no network: local OBO
    pl.seed_everything(0, workers=True, verbose=False)
    warnings.filterwarnings("ignore", ".*no logger configured.*")  # logger=False on purpose
    rng = np.random.default_rng(0)

    train = lognorm_counts(counts_adata(rng, 64))  # their training input is lognormed X
    train.X = csr_matrix(train.X)
    del train.layers["counts"]
    train.obs["celltype_name"] = np.array(LABELS * 16)
    train.obs["study"] = np.repeat(["study_a", "study_b"], 32)

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # metadata.json records train_path as given: keep it relative
        train.write_h5ad("train.h5ad")
        dm = MetricLearningDataModule(train_path="train.h5ad", batch_size=16, num_workers=1)
        model = MetricLearning(dm.n_genes, latent_dim=16, hidden_dim=[32, 32])
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=args.train_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            default_root_dir=tmp,
        )
        trainer.fit(model, datamodule=dm)
        model.save_all(str(out))  # encoder/decoder.ckpt, layer_sizes, gene_order, labels, ...
        os.chdir(cwd)

    cells = counts_adata(rng, 8)
    counts = cells.layers["counts"].copy()
    ce = CellEmbedding(model_path=str(out))
    data = align_dataset(cells, ce.gene_order, gene_overlap_threshold=len(GENES))
    data = lognorm_counts(data)
    emb = ce.get_embeddings(data.X)
    np.save(out / "input_counts.npy", counts)
    np.save(out / "expected_lognorm.npy", data.X.toarray().astype(np.float32))
    np.save(out / "expected_embeddings.npy", emb.astype(np.float32))

    state = torch.load(out / "encoder.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    layout = "\n".join(f"    {k}: {list(v.shape)} {v.dtype}" for k, v in state.items())
    (out / "README.md").write_text(
        README.format(
            version=version("scimilarity"),
            torch=torch.__version__,
            steps=trainer.global_step,
            layout=layout,
        )
    )
    print(f"wrote {out}: embeddings {emb.shape}, train steps {trainer.global_step}")


if __name__ == "__main__":
    main()
