"""Small synthetic count matrices shared by the tests."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def synthetic_counts(
    n_cells: int = 300,
    n_genes: int = 400,
    *,
    seed: int = 0,
    n_types: int = 3,
    n_mt: int = 5,
    sparse: bool = True,
) -> ad.AnnData:
    """Counts with per-gene means, per-cell depth, type-specific markers, MT- genes, some rare
    genes and cells of very different sizes (so every QC filter has something to do)."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    gene_mean = rng.gamma(0.6, 1.5, n_genes)
    gene_mean[-10:] = 0.001  # rare genes: expressed in very few cells
    markers = rng.choice(n_genes - 10, size=(n_types, 15), replace=False)
    means = np.tile(gene_mean, (n_cells, 1))
    for t in range(n_types):
        means[np.ix_(types == t, markers[t])] += 6.0
    depth = rng.lognormal(0.0, 0.6, n_cells)[:, None]
    depth[:5] = 0.03  # a few tiny cells fail min_genes
    counts = rng.poisson(means * depth).astype(np.float32)
    names = [f"MT-{i}" for i in range(n_mt)] + [f"GENE{i:04d}" for i in range(n_genes - n_mt)]
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type {t}" for t in types]), "donor": rng.integers(0, 2, n_cells)},
        index=[f"cell{i:04d}" for i in range(n_cells)],
    )
    return ad.AnnData(
        X=sp.csr_matrix(counts) if sparse else counts,
        obs=obs,
        var=pd.DataFrame(index=names),
    )



def with_attribute(column: str, labels: tuple[str, ...], n_cells: int, *, seed: int = 0) -> ad.AnnData:
    """``synthetic_counts`` (3 cell types with markers) plus an obs ``column`` of ``labels``, drawn
    independently of the type, each with 8 marker genes of its own (clear of the rare genes)."""
    adata = synthetic_counts(n_cells, 400, seed=seed)
    rng = np.random.default_rng(seed + 100)
    drawn = rng.integers(0, len(labels), adata.n_obs)
    counts = adata.X.toarray()
    for k in range(len(labels)):
        genes = np.arange(300 + 8 * k, 308 + 8 * k)
        counts[np.ix_(drawn == k, genes)] += rng.poisson(8.0, ((drawn == k).sum(), len(genes)))
    adata.X = type(adata.X)(counts)
    adata.obs[column] = pd.Categorical([labels[k] for k in drawn])
    return adata

def write_h5ad(adata: ad.AnnData, path: Path) -> Path:
    adata.write_h5ad(path)
    return path


def tiny_model_flags(top_k_genes: int = 20) -> list[str]:
    """train.py flags of a tiny from-scratch model that trains in seconds on 2 cores."""
    return ["--init_from_scratch", "True", "--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--n_positions",
            "256", "--top_k_genes", str(top_k_genes), "--per_device_train_batch_size", "16", "--learning_rate",
            "5e-3", "--disable_tqdm", "True", "--seed", "7"]


def train_on_attribute(root: Path, column: str, labels: tuple[str, ...], n_cells: int, flags: list[str]) -> dict:
    """``with_attribute`` cells -> transform.py --obs_columns ``column`` -> train.py with ``flags``:
    the h5ad, the transform folder and the run folder."""
    import train
    import transform

    cells = root / "cells.h5ad"
    with_attribute(column, labels, n_cells).write_h5ad(cells)
    transform.main(transform.parse_args(["--data_filepath", str(cells), "--output_dir", str(root / "tx"),
                                         "--obs_columns", column, "--min_genes_per_cell", "20"]))
    model = train.main(train.parse_args(["--data_dir", str(root / "tx" / "cell_sentences_hf"), "--output_dir",
                                         str(root / "model"), *flags]))
    return {"root": root, "cells": cells, "tx": root / "tx", "model": model}
