"""Annotate cells with a trained or published model: the label of every cell, with its score.

Any cells: an ``.h5ad`` of one's own (``--h5ad``, any layout transform.py reads, no labels
needed: the model's recipe turns the cells into the sentences it was trained on), or a split of
transform.py's dataset (``--data_dir``, ``--split all|train|valid|test``). Every answer is one of
the model's labels: each label is scored whole under the model and the scores are normalized
over the label set (``utils.CellSentenceModel.predict_cell_types``). With the truth known, the
metrics of eval/prediction.py are written too. A model trained on several label columns
(``train.py --label_columns cell_type,tissue``) predicts each (``--label_columns``, default all):
``predicted_<column>`` and ``<column>_score`` for each, and one confusion matrix per column
(``confusion_matrix_<column>.png``).

    model + cells.h5ad (or data/cell_sentences_hf/)
        -> <next to the input>/predictions/<model name>/: predictions.csv, annotated.h5ad
           (--h5ad), metrics.json + confusion_matrix.png (labels known), predict_args.json

Example:
    python predict.py --model_dir data/model/scratch-small --h5ad my_cells.h5ad
    python predict.py --model_dir data/model/scratch-small --data_dir data/cell_sentences_hf --split all
"""

from __future__ import annotations

import startup_guard  # noqa: F401  # isort: skip  (first: Ctrl-C while the rest loads is one line)

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils.cli import (
    InputError,
    add_model_arguments,
    add_run_flags,
    renamed_flags,
    run_cli,
    save_args,
    script_parser,
    seed_everything,
    strict_json,
)
from utils.contract import PREDICT
from utils.models.distributed import Processes
from utils.publish import claim_output_dir, releasing_outputs, settle_inputs, staged_outputs

logger = logging.getLogger("cell2sentence")

SPLITS = ("train", "valid", "test")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    add_model_arguments(p)
    p.add_argument("--h5ad", type=Path, default=None,
                   help="cells to annotate: an .h5ad (or 10x .h5, 10x folder, .loom, .csv) in any layout "
                        "transform.py reads; every cell is predicted")
    p.add_argument("--data_dir", type=Path, default=None,
                   help="or transform.py's cell_sentences_hf/ folder (with --split)")
    p.add_argument("--split", type=str, default="test", help="with --data_dir: train, valid, test (default) or all")
    p.add_argument("--label_column", type=str, default=None,
                   help="the column to predict (default: the one the model was trained on); its truth is "
                        "read from the cells when they have it")
    p.add_argument("--label_columns", type=str, default=None,
                   help="comma-separated columns to predict, of a model trained on several (train.py "
                        "--label_columns; default: every column it was trained to predict)")
    add_run_flags(p, output_dir=None, output_dir_help="default: predictions/<model name>[_<h5ad name>] next to the input",
                  seed_help="seed of the --max_cells subset")
    p.add_argument("--batch_size", type=int, default=16, help="cells per forward pass")
    p.add_argument("--max_cells", type=int, default=None, help="predict a seeded random subset of this many cells")
    p.add_argument("--top_k_genes", type=int, default=None,
                   help="genes per prompt (default: the model's recipe; another value is used with a warning)")
    p.add_argument("--free_text", action="store_true",
                   help="greedy free-text answers instead of the model's label set (no scores)")
    args = p.parse_args(renamed_flags(argv))
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.model_dir is None:
        raise InputError("Pass --model_dir: a train.py run folder, a published C2S model's folder, or its hub name.")
    if (args.h5ad is None) == (args.data_dir is None):
        raise InputError("Pass the cells to annotate: --h5ad my_cells.h5ad, or --data_dir with transform.py's "
                         "cell_sentences_hf/ folder (not both).")
    if args.data_dir is not None and args.split not in (*SPLITS, "all"):
        raise InputError(f"--split {args.split!r}: choose train, valid, test or all.")
    if args.batch_size < 1:
        raise InputError("--batch_size must be at least 1.")
    if args.label_columns is not None:
        if args.label_column is not None:
            raise InputError("Pass --label_column (one column) or --label_columns (several), not both.")
        names = [c.strip() for c in args.label_columns.split(",") if c.strip()]
        if not names or len(set(names)) != len(names):
            raise InputError(f"--label_columns {args.label_columns!r}: name each column once, e.g. cell_type,tissue.")
    for flag in ("top_k_genes", "max_cells"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be at least 1 (or left out).")
    if args.output_dir is None:
        model_name = Path(str(args.model_dir)).name or "model"
        if args.h5ad is not None:
            args.output_dir = args.h5ad.parent / "predictions" / f"{model_name}_{args.h5ad.stem}"
        else:
            args.output_dir = args.data_dir.parent / "predictions" / model_name


# ---------------------------------------------------------------------------------- inputs


def read_cells(path: Path) -> Any:
    """The user's AnnData, read whole (its obs and layout are kept as they are)."""
    import anndata as ad

    from utils.transform.readers import _read_with_scanpy as read_with_scanpy

    if not path.exists():
        raise InputError(f"{path} does not exist; pass the cells to annotate with --h5ad.")
    if path.is_file() and path.suffix.lower() == ".h5ad":
        try:
            return ad.read_h5ad(path)
        except Exception as err:  # h5py and anndata raise many kinds; the user needs one sentence
            raise InputError(f"{path} is not a readable .h5ad file ({err}).") from None
    return read_with_scanpy(path)


def train_labels_of(data_dir: Path, column: str) -> list[str] | None:
    """The train split's labels of ``column`` (for the majority-class baseline; None without them)."""
    from utils.contract import open_dataset_dict
    from utils.models.examples import has_label

    dd = open_dataset_dict(data_dir, single_ok=True)
    if "train" not in dd or column not in dd["train"].column_names:
        return None
    return [str(x) for x in dd["train"][column] if has_label(x)] or None


# ---------------------------------------------------------------------------------- outputs


def prediction_table(cell_names: Sequence[str], column: str | Sequence[str], result: Any, truth: Any,
                     qc_pass: np.ndarray | None) -> pd.DataFrame:
    """predictions.csv: ``cell_name``, then per column ``predicted_<column>``, ``<column>_score``
    and the truth when known, and ``qc_pass`` for a user's h5ad (False: the transform's QC would
    have dropped it). ``column``, ``result`` and ``truth`` are one column's, or lists of them
    (truth None where unknown)."""
    columns, results, truths = ([column], [result], [truth]) if isinstance(column, str) else (column, result, truth)
    table = pd.DataFrame({"cell_name": list(cell_names)})
    for name, one, known in zip(columns, results, truths, strict=True):
        table[f"predicted_{name}"] = one.labels
        table[f"{name}_score"] = one.scores
        if known is not None:
            table[name] = list(known)
    if qc_pass is not None:
        table["qc_pass"] = qc_pass
    return table


def annotate(adata: Any, rows: np.ndarray, column: str, result: Any, label_set: list[str],
             qc_pass: np.ndarray) -> Any:
    """The user's AnnData, unchanged, plus ``obs["c2s_<column>"]`` (categorical over the
    model's labels), ``obs["c2s_<column>_score"]``, ``obs["c2s_qc_pass"]`` and, with scores,
    ``.obsm["c2s_<column>_scores"]`` (cells x labels; the label order in ``.uns``). Cells left
    out by --max_cells get NaN."""
    annotated = adata.copy()
    categories = label_set or sorted(set(result.labels))
    labels = np.full(adata.n_obs, None, dtype=object)
    labels[rows] = result.labels
    annotated.obs[f"c2s_{column}"] = pd.Categorical(labels, categories=categories)
    scores = np.full(adata.n_obs, np.nan)
    scores[rows] = result.scores
    annotated.obs[f"c2s_{column}_score"] = scores
    annotated.obs["c2s_qc_pass"] = qc_pass
    if result.probabilities.shape[1]:
        matrix = np.full((adata.n_obs, len(categories)), np.nan, dtype=np.float32)
        matrix[rows] = result.probabilities[categories].to_numpy(dtype=np.float32)
        annotated.obsm[f"c2s_{column}_scores"] = matrix
        annotated.uns[f"c2s_{column}_scores_labels"] = list(categories)
    return annotated


def annotate_all(adata: Any, rows: np.ndarray, columns: Sequence[str], results: Sequence[Any],
                 label_sets: Sequence[list[str]], qc_pass: np.ndarray) -> Any:
    """``annotate`` for each predicted column."""
    annotated = adata
    for column, result, label_set in zip(columns, results, label_sets, strict=True):
        annotated = annotate(annotated, rows, column, result, label_set, qc_pass)
    return annotated


def metrics_of(table: pd.DataFrame, column: str, train_labels: Sequence[str] | None) -> tuple[dict[str, Any], Any]:
    """eval/prediction.py's scores (``utils.evaluation.metrics.classification_summary``) and the
    confusion matrix over the cells whose truth is known."""
    from utils.evaluation.figures import plot_confusion_matrix
    from utils.evaluation.metrics import classification_summary
    from utils.models.examples import has_label

    known = table[column].map(has_label).to_numpy(dtype=bool)
    true, predicted = table[column][known].astype(str), table[f"predicted_{column}"][known].astype(str)
    summary = classification_summary(true.tolist(), predicted.tolist(), train_labels=train_labels)
    figure = plot_confusion_matrix(true.tolist(), predicted.tolist(),
                                   title=f"{column} prediction (accuracy {summary['accuracy']:.3f})")
    return summary, figure


# ---------------------------------------------------------------------------------- main


@releasing_outputs
def main(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from utils.cli import load_from_args
    from utils.contract import sample_rows, split_table
    from utils.models.cell_inputs import qc_kept

    procs = Processes.start()
    seed_everything(args.seed)
    settle_inputs(*[p for p in (args.data_dir, args.data_dir.parent if args.data_dir else None) if p])
    if procs.main:
        claim_output_dir(args.output_dir, list(PREDICT), overwrite=args.overwrite)
    model = load_from_args(args, device=procs.device(args.device))
    columns = predicted_columns(args, model)
    if len(columns) > 1:
        return predict_columns(args, model, procs, columns)
    column = columns[0]
    label_set = [] if args.free_text else model.label_set(column)

    adata = qc_pass = truth = train_labels = None
    if args.h5ad is not None:
        adata = read_cells(args.h5ad)
        if adata.n_obs == 0:
            raise InputError(f"{args.h5ad} holds no cells.")
        rows = sample_rows(adata.n_obs, args.max_cells, args.seed)
        cells = adata if len(rows) == adata.n_obs else adata[rows].copy()
        names = adata.obs_names[rows].astype(str).tolist()
        qc_pass = qc_kept(adata, model.recipe) if procs.main else None
        if column in adata.obs:
            truth = adata.obs[column].to_numpy()[rows]
    else:
        table, train_labels = split_table(args.data_dir, args.split), train_labels_of(args.data_dir, column)
        if table.empty:
            raise InputError(f"The {args.split} split of {args.data_dir} holds no cells.")
        rows = sample_rows(len(table), args.max_cells, args.seed)
        cells, names = table["cell_sentence"].to_numpy()[rows].tolist(), table["cell_name"].to_numpy()[rows].tolist()
        if column in table:
            truth = table[column].to_numpy()[rows]
    logger.info("Predicting %s for %s cells with %s (%s prompts, top %d genes, %s) on %s%s.", column,
                f"{len(rows):,}", args.model_dir, model.prompt_format.name, model.top_k_genes,
                f"{len(label_set):,} labels" if label_set else "free text", model.device, procs.describe())
    sentences = model.cell_sentences(cells)  # the recipe applied once, here, to every cell
    mine = procs.share(len(sentences))
    start = time.perf_counter()
    with tqdm(total=len(mine), desc=f"Predicting {column}", unit="cell", disable=not procs.main) as bar:
        result = model.predict_sentences([sentences[i] for i in mine], batch_size=args.batch_size,
                                         labels=label_set or None, constrain=not args.free_text, progress=bar.update,
                                         column=column)
    result = procs.gather(mine, result, len(sentences))
    seconds = time.perf_counter() - start
    if not procs.main:
        return {}
    predictions = prediction_table(names, column, result, truth, qc_pass[rows] if qc_pass is not None else None)
    recipe = model.recipe
    metrics: dict[str, Any] = {"model_dir": str(args.model_dir), "n_cells": len(rows), "label_column": column,
                               "constrained": bool(label_set), "n_labels": len(label_set), "seconds": seconds,
                               "cells_per_second": len(rows) / seconds if seconds else None,
                               "processes": procs.world_size}
    figure = None
    if truth is not None and predictions[column].notna().any():
        summary, figure = metrics_of(predictions, column, train_labels)
        metrics["prediction"] = summary
        logger.info("Accuracy %.3f on %s cells (majority-class baseline %.3f, %s); macro-F1 %.3f.",
                    summary["accuracy"], f"{summary['n_cells']:,}", summary["majority_baseline"],
                    summary["majority_label"], summary["macro_f1"])
    if qc_pass is not None and not qc_pass.all():
        logger.warning("%s of %s cells would have been dropped by the training transform's QC; they are predicted "
                       "all the same and flagged (qc_pass False).", f"{int((~qc_pass).sum()):,}", f"{len(qc_pass):,}")
    with staged_outputs(args.output_dir, list(PREDICT), overwrite=args.overwrite) as tmp:
        predictions.to_csv(tmp / PREDICT.predictions, index=False)
        if adata is not None:
            annotate(adata, rows, column, result, label_set, qc_pass).write_h5ad(tmp / PREDICT.annotated)
        if figure is not None:
            figure.savefig(tmp / PREDICT.confusion, dpi=150, bbox_inches="tight")
        (tmp / PREDICT.metrics).write_text(strict_json(metrics, indent=2, default=str) + "\n")
        save_args({**vars(args), "recipe": {"prompt_format": model.prompt_format.name,
                                            "top_k_genes": model.top_k_genes,
                                            "exclude_genes": recipe.transform.get("exclude_genes"),
                                            "label_column": column, "labels": label_set,
                                            "transform": recipe.transform, "published": recipe.published}},
                  tmp / PREDICT.args)
    logger.info("Wrote %s.", args.output_dir)
    return metrics


def predicted_columns(args: argparse.Namespace, model: Any) -> list[str]:
    """The columns to predict: --label_columns, --label_column, else every column the model was
    trained to predict (its first label column, or cell_type, when it records none)."""
    recipe = model.recipe
    if args.label_columns is not None:
        columns = [c.strip() for c in args.label_columns.split(",") if c.strip()]
        flag = "--label_columns"
    elif args.label_column is not None:
        columns, flag = [args.label_column], "--label_column"
    else:
        columns, flag = recipe.prediction_columns() or [recipe.label_column or "cell_type"], None
    unknown = [c for c in columns if recipe.label_columns and c not in recipe.label_columns]
    if flag and unknown:
        raise InputError(f"{flag} {unknown[0]!r}: {args.model_dir} was trained to predict "
                         f"{', '.join(recipe.label_columns)}; leave the flag out or name one of them.")
    if recipe.has_task("cell_type_prediction") is False and not any(recipe.attribute(c) for c in columns):
        raise InputError(f"{args.model_dir} was not trained to predict labels (its tasks: "
                         f"{', '.join(recipe.tasks)}); train it with the cell_type_prediction task.")
    unpredicted = [c for c in columns if recipe.tasks and recipe.label_columns and c not in recipe.prediction_columns()]
    if unpredicted:
        raise InputError(f"{args.model_dir} was not trained to predict {unpredicted[0]!r} (its tasks: "
                         f"{', '.join(recipe.tasks)}); leave it out of {flag or '--label_columns'}.")
    return columns


def predict_columns(args: argparse.Namespace, model: Any, procs: Any, columns: list[str]) -> dict[str, Any]:
    """``main`` for several label columns: each predicted in turn on the same sentences; one
    predictions.csv and annotated.h5ad with every column, metrics per column."""
    from tqdm.auto import tqdm

    from utils.contract import per_column, sample_rows, split_table
    from utils.models.cell_inputs import qc_kept

    label_sets = [[] if args.free_text else model.label_set(c) for c in columns]
    adata = qc_pass = None
    truths: list[Any] = [None] * len(columns)
    train_labels: list[Any] = [None] * len(columns)
    if args.h5ad is not None:
        adata = read_cells(args.h5ad)
        if adata.n_obs == 0:
            raise InputError(f"{args.h5ad} holds no cells.")
        rows = sample_rows(adata.n_obs, args.max_cells, args.seed)
        cells = adata if len(rows) == adata.n_obs else adata[rows].copy()
        names = adata.obs_names[rows].astype(str).tolist()
        qc_pass = qc_kept(adata, model.recipe) if procs.main else None
        truths = [adata.obs[c].to_numpy()[rows] if c in adata.obs else None for c in columns]
    else:
        table = split_table(args.data_dir, args.split)
        train_labels = [train_labels_of(args.data_dir, c) for c in columns]
        if table.empty:
            raise InputError(f"The {args.split} split of {args.data_dir} holds no cells.")
        rows = sample_rows(len(table), args.max_cells, args.seed)
        cells, names = table["cell_sentence"].to_numpy()[rows].tolist(), table["cell_name"].to_numpy()[rows].tolist()
        truths = [table[c].to_numpy()[rows] if c in table else None for c in columns]
    logger.info("Predicting %s for %s cells with %s (%s prompts, top %d genes) on %s%s.", ", ".join(columns),
                f"{len(rows):,}", args.model_dir, model.prompt_format.name, model.top_k_genes, model.device,
                procs.describe())
    sentences = model.cell_sentences(cells)  # the recipe applied once, here, to every cell
    mine = procs.share(len(sentences))
    results, seconds = [], 0.0
    for column, label_set in zip(columns, label_sets, strict=True):
        start = time.perf_counter()
        with tqdm(total=len(mine), desc=f"Predicting {column}", unit="cell", disable=not procs.main) as bar:
            result = model.predict_sentences([sentences[i] for i in mine], batch_size=args.batch_size,
                                             labels=label_set or None, constrain=not args.free_text,
                                             progress=bar.update, column=column)
        results.append(procs.gather(mine, result, len(sentences)))
        seconds += time.perf_counter() - start
    if not procs.main:
        return {}
    predictions = prediction_table(names, columns, results, truths, qc_pass[rows] if qc_pass is not None else None)
    metrics: dict[str, Any] = {"model_dir": str(args.model_dir), "n_cells": len(rows), "label_columns": columns,
                               "seconds": seconds, "cells_per_second": len(rows) / seconds if seconds else None,
                               "processes": procs.world_size}
    figures: dict[str, Any] = {}
    for column, label_set, truth, known in zip(columns, label_sets, truths, train_labels, strict=True):
        entry: dict[str, Any] = {"constrained": bool(label_set), "n_labels": len(label_set)}
        if truth is not None and predictions[column].notna().any():
            summary, figures[per_column(PREDICT.confusion, column)] = metrics_of(predictions, column, known)
            entry["prediction"] = summary
            logger.info("%s: accuracy %.3f on %s cells (majority-class baseline %.3f, %s); macro-F1 %.3f.", column,
                        summary["accuracy"], f"{summary['n_cells']:,}", summary["majority_baseline"],
                        summary["majority_label"], summary["macro_f1"])
        metrics[column] = entry
    if qc_pass is not None and not qc_pass.all():
        logger.warning("%s of %s cells would have been dropped by the training transform's QC; they are predicted "
                       "all the same and flagged (qc_pass False).", f"{int((~qc_pass).sum()):,}", f"{len(qc_pass):,}")
    recipe = model.recipe
    outputs = [*PREDICT, *(per_column(PREDICT.confusion, c) for c in columns)]
    with staged_outputs(args.output_dir, outputs, overwrite=args.overwrite) as tmp:
        predictions.to_csv(tmp / PREDICT.predictions, index=False)
        if adata is not None:
            annotate_all(adata, rows, columns, results, label_sets, qc_pass).write_h5ad(tmp / PREDICT.annotated)
        for name, figure in figures.items():
            figure.savefig(tmp / name, dpi=150, bbox_inches="tight")
        (tmp / PREDICT.metrics).write_text(strict_json(metrics, indent=2, default=str) + "\n")
        save_args({**vars(args), "recipe": {"prompt_format": model.prompt_format.name,
                                            "top_k_genes": model.top_k_genes,
                                            "exclude_genes": recipe.transform.get("exclude_genes"),
                                            "label_columns": dict(zip(columns, label_sets, strict=True)),
                                            "transform": recipe.transform, "published": recipe.published}},
                  tmp / PREDICT.args)
    logger.info("Wrote %s.", args.output_dir)
    return metrics


if __name__ == "__main__":
    run_cli(main, parse_args)
