"""The rank-to-expression fit over all cells of a dataset (transform.py's is on ``--eval_cells``), and per cell.

<transform_dir>/<stem>_preprocessed.h5ad + eval/transformation_metrics.csv -> metrics.json, per_cell.csv,
log_rank_vs_log_expression.png, expression_vs_reconstruction.png, per_cell_r_squared.png, eval_args.json. Example:
    python eval/reconstruction.py --transform_dir data --output_dir data/eval/reconstruction
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python eval/reconstruction.py`: the repository's utils
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from eval import finish, logger, parse, start  # noqa: E402
from utils import cli  # noqa: E402
from utils.contract import EVAL_RECONSTRUCTION, TRANSFORM_EVAL, find_preprocessed, sample_rows  # noqa: E402
from utils.evaluation.metrics import per_cell_reconstruction, rank_expression_points  # noqa: E402
from utils.inverse import load_transform_fit  # noqa: E402
from utils.transform.fit import fit_rank_expression, score_line  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.script_parser(__doc__)
    p.add_argument("--transform_dir", type=Path, default=Path("data"),
                   help="transform.py's output folder (the preprocessed AnnData and eval/transformation_metrics.csv)")
    p.add_argument("--preprocessed_h5ad", type=Path, default=None,
                   help="the preprocessed .h5ad (default: the one in --transform_dir)")
    p.add_argument("--fit_threshold", type=float, default=None,
                   help="fit on genes with log10(1 + rank) below this (default: the transform's, else 3)")
    p.add_argument("--max_cells", type=int, default=None, help="use a seeded subset of this many cells")
    p.add_argument("--chunk_size", type=int, default=4096, help="cells read at a time")
    return parse(p, argv, name="reconstruction", seed_help="seed of --max_cells and of the figures' subsample",
                 positive=("max_cells", "chunk_size"), renamed={"--data_filepath": "--preprocessed_h5ad"})


def read_points(path: Path, *, chunk_size: int, max_cells: int | None, seed: int
                ) -> tuple[pd.Index, np.ndarray, np.ndarray, np.ndarray]:
    """Cell names, log-rank, log-expression and per-cell offsets of every expressed value."""
    import anndata as ad
    from tqdm.auto import tqdm

    adata = ad.read_h5ad(path, backed="r")
    try:
        rows = sample_rows(adata.n_obs, max_cells, seed)
        if len(rows) < adata.n_obs:
            logger.warning("Using %s of the %s cells (--max_cells).", f"{max_cells:,}", f"{adata.n_obs:,}")
        parts = []
        for start in tqdm(range(0, len(rows), chunk_size), desc="Reading cells", unit="chunk"):
            chunk = adata[rows[start : start + chunk_size]].X
            parts.append(rank_expression_points(sp.csr_matrix(chunk)))
        names = adata.obs_names[rows]
    finally:
        adata.file.close()
    if not parts:
        raise cli.InputError(f"{path} holds no cells.")
    log_rank = np.concatenate([p[0] for p in parts])
    log_expression = np.concatenate([p[1] for p in parts])
    counts = np.concatenate([np.diff(p[2]) for p in parts])
    return names, log_rank, log_expression, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def summary(values: pd.Series) -> dict[str, float]:
    v = values.dropna()
    return {"mean": float(v.mean()), "median": float(v.median()), "q05": float(v.quantile(0.05)),
            "q25": float(v.quantile(0.25)), "q75": float(v.quantile(0.75)), "n_cells": int(len(v))}


def main(args: argparse.Namespace) -> dict[str, Any]:
    from utils.evaluation.figures import plot_log_rank_fit, plot_reconstruction

    start(args, [args.transform_dir, args.preprocessed_h5ad], EVAL_RECONSTRUCTION)
    path = args.preprocessed_h5ad or find_preprocessed(args.transform_dir)
    if path is None or not path.is_file():
        raise cli.InputError(f"No preprocessed .h5ad in {args.transform_dir}; pass transform.py's --output_dir as "
                             "--transform_dir or the file as --preprocessed_h5ad.")
    fit_file = args.transform_dir / TRANSFORM_EVAL.metrics
    reported = load_transform_fit(fit_file) if fit_file.is_file() else None  # the transform's line
    threshold = args.fit_threshold if args.fit_threshold is not None else (
        reported.threshold if reported is not None and np.isfinite(reported.threshold) else 3.0)
    names, log_rank, log_expression, indptr = read_points(path, chunk_size=args.chunk_size,
                                                          max_cells=args.max_cells, seed=args.seed)
    refit = fit_rank_expression(log_rank, log_expression, threshold=threshold)
    line = reported if reported is not None else refit
    per_cell = per_cell_reconstruction(log_rank, log_expression, indptr, line)
    per_cell.insert(0, "cell_name", np.asarray(names, dtype=str))
    metrics: dict[str, Any] = {
        "data_filepath": str(path), "n_cells": int(len(names)), "n_points": int(len(log_rank)),
        "all_cells_fit": refit.as_row(),
        "per_cell_line": "transform" if reported is not None else "all_cells_fit",
        "per_cell": {key: summary(per_cell[key]) for key in ("r_squared", "pearson_r", "mean_abs_error")},
    }
    if reported is not None:
        on_all = score_line(log_rank, log_expression, slope=reported.slope, intercept=reported.intercept)
        on_all["mean_abs_error"] = float(np.abs(log_expression - reported.predict(log_rank)).mean())
        metrics["transform_fit"] = {"reported": reported.as_row(), "on_all_cells": on_all}
    logger.info("%s cells, %s expressed values: all-cell fit slope %.3f, intercept %.3f, R² %.3f, Pearson r %.3f, "
                "Spearman r %.3f%s; per cell median R² %.3f, median Pearson r %.3f.", f"{len(names):,}",
                f"{len(log_rank):,}", refit.slope, refit.intercept, refit.r_squared, refit.pearson_r,
                refit.spearman_r, "" if reported is None else
                f" (transform's line: slope {reported.slope:.3f}, intercept {reported.intercept:.3f}, R² on all "
                f"cells {metrics['transform_fit']['on_all_cells']['r_squared']:.3f})",
                metrics["per_cell"]["r_squared"]["median"], metrics["per_cell"]["pearson_r"]["median"])
    figures = {  # the fit figures by the transform's own plotting code
        EVAL_RECONSTRUCTION.fit: lambda out: plot_log_rank_fit(log_rank, log_expression, refit, out, seed=args.seed),
        EVAL_RECONSTRUCTION.reconstruction: lambda out: plot_reconstruction(
            log_expression, refit.predict(log_rank), refit, out, seed=args.seed),
        EVAL_RECONSTRUCTION.per_cell_figure: _histogram(per_cell),
    }
    finish(args, EVAL_RECONSTRUCTION, metrics=metrics, figures=figures,
           frames={EVAL_RECONSTRUCTION.per_cell: per_cell})
    return metrics


def _histogram(per_cell: pd.DataFrame):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    for i, (key, label) in enumerate([("r_squared", "R² per cell"), ("pearson_r", "Pearson r per cell")]):
        ax = fig.add_subplot(1, 2, i + 1)
        values = per_cell[key].dropna()
        ax.hist(values, bins=40, color="#1f77b4")
        ax.axvline(values.median(), color="#d62728", ls="--", label=f"median {values.median():.3f}")
        ax.set_xlabel(label)
        ax.set_ylabel("cells")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
