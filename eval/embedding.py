"""Score cell embeddings against the cell types, next to PCA of the expression.

embeddings.h5ad [+ the transform's preprocessed AnnData] -> metrics.json, embedding_vs_pca.png. Example:
    python eval/embedding.py --embeddings data/embeddings/<run>/embeddings.h5ad \\
        --transform_dir data --output_dir data/eval/embedding
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python eval/embedding.py`: the repository's utils
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from eval import finish, logger, parse, start  # noqa: E402
from utils import cli  # noqa: E402
from utils.contract import EMBED, EVAL_EMBEDDING, read_preprocessed  # noqa: E402
from utils.evaluation.figures import plot_labelled_panels  # noqa: E402
from utils.evaluation.metrics import embed_pca, evaluate_embedding  # noqa: E402

SCORES = ("knn_accuracy", "silhouette", "ari", "nmi")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.script_parser(__doc__)
    p.add_argument("--embeddings", type=Path, default=None,
                   help="embeddings.h5ad (or the folder holding it) written by embed.py (required)")
    p.add_argument("--obsm_key", type=str, default="X_c2s", help="the embedding in .obsm")
    p.add_argument("--label_column", type=str, default="cell_type", help="obs column of the types")
    p.add_argument("--transform_dir", type=Path, default=Path("data"),
                   help="transform.py's output folder, for the PCA-of-expression baseline")
    p.add_argument("--n_components", type=int, default=50, help="principal components of the baseline")
    p.add_argument("--k_neighbors", type=int, default=5, help="k of the leave-one-out k-NN")
    args = parse(p, argv, name="embedding", seed_help="seed of KMeans, PCA and the silhouette sample",
                 required=("embeddings", "Pass --embeddings, the embeddings.h5ad written by embed.py."),
                 positive=("k_neighbors", "n_components"))
    if args.embeddings.is_dir():
        args.embeddings = args.embeddings / EMBED.embeddings
    return args


def read_embeddings(args: argparse.Namespace) -> tuple[Any, np.ndarray, list[str]]:
    """Names, embedding and labels of the labelled cells."""
    import anndata as ad

    if not args.embeddings.is_file():
        raise cli.InputError(f"{args.embeddings} does not exist; pass the embeddings.h5ad written by embed.py.")
    adata = ad.read_h5ad(args.embeddings)
    if args.obsm_key not in adata.obsm:
        raise cli.InputError(f"{args.embeddings} has no .obsm[{args.obsm_key!r}] (it has {list(adata.obsm)}); "
                         "fix --obsm_key.")
    if args.label_column not in adata.obs:
        raise cli.InputError(f"{args.embeddings} has no obs column {args.label_column!r} (it has "
                         f"{list(adata.obs.columns)}); fix --label_column.")
    labelled = adata.obs[args.label_column].notna().to_numpy()
    if not labelled.all():
        logger.warning("%s cells without a type are left out.", f"{(~labelled).sum():,}")
    X = np.asarray(adata.obsm[args.obsm_key], dtype=np.float64)[labelled]
    if len(X) < 3:
        raise cli.InputError(f"{args.embeddings} has {len(X)} labelled cells; at least 3 are needed.")
    return adata.obs_names[labelled], X, adata.obs[args.label_column][labelled].astype(str).tolist()


def main(args: argparse.Namespace) -> dict[str, Any]:
    start(args, [args.embeddings, args.transform_dir], EVAL_EMBEDDING)
    names, X, labels = read_embeddings(args)
    metrics: dict[str, Any] = {"embeddings": str(args.embeddings), "obsm_key": args.obsm_key}
    expression = read_preprocessed(args.transform_dir, names)
    if expression is None or expression.n_obs == 0:
        logger.warning("No preprocessed AnnData with these cells in %s: no PCA-of-expression baseline.",
                       args.transform_dir)
        expression = None
    elif expression.n_obs < len(names):
        logger.warning("%s of %s cells are not in the preprocessed AnnData; the baseline scores the rest.",
                       f"{len(names) - expression.n_obs:,}", f"{len(names):,}")
    scored = evaluate_embedding(X, labels, names, expression=expression, k=args.k_neighbors,
                                n_components=args.n_components, seed=args.seed)
    metrics.update(scored.scores)
    (view,) = embed_pca(X, n_components=2, seed=args.seed)
    panels = [(f"{args.obsm_key} ({X.shape[1]} dimensions), its PCA", view, labels)]
    if scored.pca_coords is not None:
        panels.append((f"PCA of expression ({scored.pca_coords.shape[1]} components)", scored.pca_coords,
                       scored.pca_labels))
    for key in SCORES:
        metrics[key] = metrics["c2s"][key]
        if "pca" in metrics:
            metrics[f"pca_{key}"] = metrics["pca"][key]
    logger.info("%s cells, %d types: k-NN accuracy %.3f, silhouette %.3f, ARI %.3f, NMI %.3f%s.",
                f"{len(labels):,}", metrics["c2s"]["n_types"], *(metrics[key] for key in SCORES),
                "" if "pca" not in metrics else
                "; PCA of expression: " + ", ".join(f"{metrics['pca'][key]:.3f}" for key in SCORES))
    headline = {"C2S embedding": {key: metrics["c2s"][key] for key in SCORES},
                **({"PCA of expression": {key: metrics["pca"][key] for key in SCORES}} if "pca" in metrics else {})}
    finish(args, EVAL_EMBEDDING, metrics=metrics, figures={EVAL_EMBEDDING.panels: plot_labelled_panels(panels)},
           frames={}, card=(args.embeddings.parent, "embedding", headline),
           captions={"Embedding vs PCA of expression": EVAL_EMBEDDING.panels})
    return metrics


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
