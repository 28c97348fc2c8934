"""Embed cells with a cell-sentence language model: one vector per cell (a layer's hidden states
pooled over its genes), a UMAP, and how well they separate the labels (PCA of expression: baseline).

    model + data/cell_sentences_hf/ (or cells.h5ad)
        -> data/embeddings/<model name>/: embeddings.h5ad (.obsm["X_c2s"], .obsm["X_umap"], the
           cells' obs), umap.png (coloured by cell type), metrics.json, embed_args.json

Example:
    python embed.py --model_dir data/model/<run> --data_dir data/cell_sentences_hf/
"""

from __future__ import annotations

import startup_guard  # noqa: F401  # isort: skip  (first: Ctrl-C while the rest loads is one line)

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils import cli, publish
from utils.contract import EMBED

logger = logging.getLogger("cell2sentence")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.script_parser(__doc__)
    cli.add_model_arguments(p)
    p.add_argument("--data_dir", type=Path, default=Path("data/cell_sentences_hf"),
                   help="the DatasetDict written by transform.py")
    p.add_argument("--split", type=str, default="all", help="split to embed: train, valid, test or all")
    p.add_argument("--h5ad", type=Path, default=None, help="embed the cells of this .h5ad instead (no QC)")
    p.add_argument("--transform_dir", type=Path, default=None,
                   help="transform.py's output folder, for the PCA baseline (default: the parent of --data_dir)")
    cli.add_run_flags(p, output_dir=None, output_dir_help="where outputs go (default: data/embeddings/<model_dir name>)",
                      seed_help="seed of the --max_cells subset and the UMAP")
    p.add_argument("--pooling", choices=("mean", "last"), default="mean",
                   help="mean over the cell sentence's tokens, or the last token")
    p.add_argument("--layer", type=int, default=-1, help="hidden states of this layer (-1: the last, 0: embeddings)")
    p.add_argument("--top_k_genes", type=int, default=None, help="genes per cell (default: the recipe's)")
    p.add_argument("--label_column", type=str, default="cell_type", help="label column for the scores and UMAP")
    p.add_argument("--batch_size", type=int, default=16, help="cells per forward pass")
    p.add_argument("--max_cells", type=int, default=None, help="embed a seeded random subset of this many cells")
    p.add_argument("--k_neighbors", type=int, default=5, help="k of the k-NN accuracy")
    p.add_argument("--n_components", type=int, default=50, help="principal components of the expression baseline")
    args = p.parse_args(cli.renamed_flags(argv))
    if args.model_dir is None:
        raise cli.InputError("Pass --model_dir: a train.py run folder, a published C2S model's folder, or its hub name.")
    if args.split not in ("train", "valid", "test", "all"):
        raise cli.InputError(f"--split {args.split!r}: choose train, valid, test or all.")
    for flag in ("batch_size", "k_neighbors", "n_components"):
        if getattr(args, flag) < 1:
            raise cli.InputError(f"--{flag} must be at least 1.")
    for flag in ("top_k_genes", "max_cells"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise cli.InputError(f"--{flag} must be at least 1 (or left out).")
    if args.transform_dir is None:
        args.transform_dir = args.data_dir.parent
    if args.output_dir is None:
        args.output_dir = Path("data/embeddings") / args.model_dir.name
    return args


def cells_to_embed(args: argparse.Namespace) -> tuple[pd.DataFrame, list[str], Any]:
    """(obs, sentences, the h5ad's preprocessed AnnData or None) of the --split of --data_dir, or of
    every cell of --h5ad made into sentences with the model's recipe."""
    import anndata as ad

    from utils.contract import split_table
    from utils.models.recipe import Recipe
    from utils.transform.sentences import adata_to_sentences

    if args.h5ad is None:
        table = split_table(args.data_dir, args.split)
        obs = table.drop(columns=["cell_sentence"]).set_index("cell_name")
        obs.index = obs.index.astype(str)
        return obs, table["cell_sentence"].astype(str).tolist(), None
    if not args.h5ad.is_file():
        raise cli.InputError(f"{args.h5ad} does not exist; pass an .h5ad file with --h5ad.")
    adata = ad.read_h5ad(args.h5ad)
    label_column = args.label_column if args.label_column in adata.obs else None
    cells = adata_to_sentences(adata, qc=False, label_column=label_column,
                               **Recipe.read(args.model_dir).sentence_kwargs())
    obs = adata.obs.iloc[cells.kept_rows].copy()
    obs.index = pd.Index(cells.cell_names)  # the preprocessed AnnData's names (cleaned, unique)
    return obs, cells.sentences, cells.preprocessed


@publish.releasing_outputs
def main(args: argparse.Namespace) -> dict[str, Any]:
    import anndata as ad
    from tqdm.auto import tqdm

    from utils.contract import read_preprocessed, sample_rows
    from utils.evaluation.figures import plot_labelled_panels
    from utils.evaluation.metrics import evaluate_embedding
    from utils.models.distributed import Processes

    procs = Processes.start()
    cli.seed_everything(args.seed)
    # A model or transform killed while publishing: finish its publish before reading anything.
    publish.settle_inputs(args.model_dir, *([args.h5ad] if args.h5ad is not None else [args.data_dir, args.transform_dir]))
    if procs.main:
        publish.claim_output_dir(args.output_dir, list(EMBED), overwrite=args.overwrite)
    obs, sentences, expression = cells_to_embed(args)
    rows = sample_rows(len(sentences), args.max_cells, args.seed)
    obs, sentences = obs.iloc[rows], [sentences[i] for i in rows]
    if not sentences:
        raise cli.InputError("There are no cells to embed.")
    model = cli.load_from_args(args, device=procs.device(args.device))
    logger.info("Embedding %s cells with %s (%s format, top %d genes, %s pooling, layer %d) on %s%s.",
                f"{len(sentences):,}", args.model_dir, model.prompt_format.name, model.top_k_genes, args.pooling,
                args.layer, model.device, procs.describe())
    mine = procs.share(len(sentences))
    with tqdm(total=len(mine), desc="Embedding cells", unit="cell", disable=not procs.main) as bar:
        X = model.embed_cells([sentences[i] for i in mine], pooling=args.pooling, layer=args.layer,
                              batch_size=args.batch_size, progress=bar.update)
    X = procs.gather(mine, X, len(sentences))
    if not procs.main:  # rank 0 scores and writes
        return {}
    adata = ad.AnnData(obs=obs.copy(), obsm={"X_c2s": X})
    setup = {"pooling": args.pooling, "layer": args.layer, "prompt_format": model.prompt_format.name,
             "top_k_genes": model.top_k_genes}
    adata.uns["c2s_embedding"] = {"model": str(args.model_dir), **setup}
    metrics: dict[str, Any] = {"model_dir": str(args.model_dir), "n_cells": len(sentences), "n_dims": int(X.shape[1]),
                               **setup}
    labelled = (obs[args.label_column].notna().to_numpy() if args.label_column in obs
                else np.zeros(len(obs), dtype=bool))
    labels = obs[args.label_column].astype(str).to_numpy() if labelled.any() else None
    if labels is not None and len(set(labels[labelled])) >= 2:
        if expression is None:
            expression = read_preprocessed(args.transform_dir, obs.index[labelled])
        else:  # the h5ad's own cells: only those embedded (after --max_cells) and labelled
            expression = expression[obs.index[labelled]]
        if expression is not None and expression.n_obs < 3:
            expression = None
        metrics.update(evaluate_embedding(X[labelled], labels[labelled].tolist(), obs.index[labelled],
                                          expression=expression, k=args.k_neighbors,
                                          n_components=args.n_components, seed=args.seed).scores)
        if expression is None:
            logger.warning("No preprocessed expression of these cells in %s: no PCA baseline in metrics.json "
                           "(pass --transform_dir).", args.transform_dir)
        logger.info("k-NN accuracy %.3f, silhouette %.3f (PCA of expression: %s).", metrics["c2s"]["knn_accuracy"],
                    metrics["c2s"]["silhouette"],
                    f"{metrics['pca']['knn_accuracy']:.3f}, {metrics['pca']['silhouette']:.3f}"
                    if "pca" in metrics else "none")
    else:
        logger.warning("No %r column with two or more types: no scores in metrics.json.", args.label_column)
    figure = None
    if len(sentences) >= 4:
        import scanpy as sc

        sc.pp.neighbors(adata, use_rep="X_c2s", n_neighbors=min(15, len(sentences) - 1), random_state=args.seed)
        sc.tl.umap(adata, random_state=args.seed)
        colour = labels.tolist() if labels is not None else ["cells"] * len(sentences)
        title = f"UMAP of X_c2s ({X.shape[1]} dimensions, {args.pooling})"
        figure = plot_labelled_panels([(title, adata.obsm["X_umap"], colour)], axis_label="UMAP")
    with publish.staged_outputs(args.output_dir, list(EMBED), overwrite=args.overwrite) as tmp:
        adata.write_h5ad(tmp / EMBED.embeddings)
        if figure is not None:
            figure.savefig(tmp / EMBED.umap, dpi=130, bbox_inches="tight")
        (tmp / EMBED.metrics).write_text(cli.strict_json(metrics, indent=2, default=str) + "\n")
        cli.save_args(args, tmp / EMBED.args)
    logger.info("Wrote %s.", args.output_dir)
    return metrics


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
