"""Annotate cells with a trained or published model: the label of every cell (one of the model's
labels, each scored whole), with its score; with the truth known, eval/prediction.py's metrics.

    model + cells.h5ad (or data/cell_sentences_hf/)
        -> <next to the input>/predictions/<model name>/: predictions.csv, annotated.h5ad
           (--h5ad), metrics.json + confusion_matrix.png (labels known), predict_args.json

Example:
    python predict.py --model_dir data/model/scratch-small --h5ad my_cells.h5ad
"""

from __future__ import annotations

import startup_guard  # noqa: F401  # isort: skip  (first: Ctrl-C while the rest loads is one line)

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from utils import cli, publish
from utils.contract import PREDICT, PREDICT_GROUPS
from utils.models.annotation import annotate, metrics_of, prediction_table, train_labels_of
from utils.models.distributed import Processes

logger = logging.getLogger("cell2sentence")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.script_parser(__doc__)
    cli.add_model_arguments(p)
    p.add_argument("--h5ad", type=Path, default=None,
                   help="cells to annotate: an .h5ad (or 10x .h5/folder, .loom, .csv) as transform.py reads")
    p.add_argument("--data_dir", type=Path, default=None, help="or transform.py's dataset (with --split)")
    p.add_argument("--split", type=str, default="test", help="with --data_dir: train, valid, test (default) or all")
    p.add_argument("--label_column", type=str, default=None,
                   help="the column to predict (default: the model's); its truth is read from the cells")
    p.add_argument("--label_columns", type=str, default=None,
                   help="comma-separated columns to predict (default: every column the model was trained on)")
    cli.add_run_flags(p, output_dir=None, output_dir_help="default: predictions/<model name>[_<h5ad name>] next to the input",
                      seed_help="seed of the --max_cells subset")
    p.add_argument("--batch_size", type=int, default=16, help="cells per forward pass")
    p.add_argument("--max_cells", type=int, default=None, help="predict a seeded random subset of this many cells")
    p.add_argument("--top_k_genes", type=int, default=None, help="genes per prompt (default: the recipe's)")
    p.add_argument("--multi_cell_column", type=str, default=None,
                   help="predict one label per group of the model's cells_per_example cells, grouped by this "
                        "column (a model trained with train.py --multi_cell_column) -> group_predictions.csv")
    p.add_argument("--free_text", action="store_true", help="greedy free text, not the label set (no scores)")
    args = p.parse_args(cli.renamed_flags(argv))
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.model_dir is None:
        raise cli.InputError("Pass --model_dir: a train.py run folder, a published C2S model's folder, or its hub name.")
    if (args.h5ad is None) == (args.data_dir is None):
        raise cli.InputError("Pass the cells to annotate: --h5ad my_cells.h5ad, or --data_dir with transform.py's "
                             "cell_sentences_hf/ folder (not both).")
    if args.data_dir is not None and args.split not in ("train", "valid", "test", "all"):
        raise cli.InputError(f"--split {args.split!r}: choose train, valid, test or all.")
    if args.batch_size < 1:
        raise cli.InputError("--batch_size must be at least 1.")
    if args.label_columns is not None:
        if args.label_column is not None:
            raise cli.InputError("Pass --label_column (one column) or --label_columns (several), not both.")
        names = [c.strip() for c in args.label_columns.split(",") if c.strip()]
        if not names or len(set(names)) != len(names):
            raise cli.InputError(f"--label_columns {args.label_columns!r}: name each column once, e.g. cell_type,tissue.")
    for flag in ("top_k_genes", "max_cells"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise cli.InputError(f"--{flag} must be at least 1 (or left out).")
    if args.output_dir is None:
        name = Path(str(args.model_dir)).name or "model"
        folder = name if args.h5ad is None else f"{name}_{args.h5ad.stem}"
        args.output_dir = (args.data_dir if args.h5ad is None else args.h5ad).parent / "predictions" / folder


def select_cells(args: argparse.Namespace, columns: Sequence[str]) -> tuple[Any, ...]:
    """(cells, names, rows, adata, truths): the cells to predict (the AnnData's --max_cells subset,
    or the split's sentences), their names and rows, the user's whole AnnData (--h5ad, else None)
    and per column of ``columns`` its values for the cells (None where the cells lack it)."""
    from utils.contract import sample_rows, split_table
    from utils.transform.readers import read_with_scanpy

    if args.h5ad is not None:
        if not args.h5ad.exists():
            raise cli.InputError(f"{args.h5ad} does not exist; pass the cells to annotate with --h5ad.")
        adata = read_with_scanpy(args.h5ad)  # whole: its obs and layout are kept as they are
        if adata.n_obs == 0:
            raise cli.InputError(f"{args.h5ad} holds no cells.")
        rows = sample_rows(adata.n_obs, args.max_cells, args.seed)
        cells = adata if len(rows) == adata.n_obs else adata[rows].copy()
        truths = [adata.obs[c].to_numpy()[rows] if c in adata.obs else None for c in columns]
        return cells, adata.obs_names[rows].astype(str).tolist(), rows, adata, truths
    table = split_table(args.data_dir, args.split)
    if table.empty:
        raise cli.InputError(f"The {args.split} split of {args.data_dir} holds no cells.")
    rows = sample_rows(len(table), args.max_cells, args.seed)
    truths = [table[c].to_numpy()[rows] if c in table else None for c in columns]
    sentences = table["cell_sentence"].to_numpy()[rows].tolist()
    return sentences, table["cell_name"].to_numpy()[rows].tolist(), rows, None, truths


@publish.releasing_outputs
def main(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from utils.contract import per_column
    from utils.models.cell_inputs import qc_kept

    procs = Processes.start()
    cli.seed_everything(args.seed)
    publish.settle_inputs(*[p for p in (args.data_dir, args.data_dir.parent if args.data_dir else None) if p])
    if args.multi_cell_column is not None:
        procs.require_one("--multi_cell_column")  # groups are few: one process does them
        return predict_groups(args)
    if procs.main:
        publish.claim_output_dir(args.output_dir, list(PREDICT), overwrite=args.overwrite)
    model = cli.load_from_args(args, device=procs.device(args.device))
    columns = predicted_columns(args, model)
    one = len(columns) == 1  # one column keeps the one-column layout of metrics.json and the figure's name
    label_sets = [[] if args.free_text else model.label_set(c) for c in columns]
    cells, names, rows, adata, truths = select_cells(args, columns)
    qc_pass = qc_kept(adata, model.recipe) if adata is not None and procs.main else None
    train_labels = [train_labels_of(args.data_dir, c) if adata is None else None for c in columns]
    labels_note = (f", {len(label_sets[0]):,} labels" if label_sets[0] else ", free text") if one else ""
    logger.info("Predicting %s for %s cells with %s (%s prompts, top %d genes%s) on %s%s.", ", ".join(columns),
                f"{len(rows):,}", args.model_dir, model.prompt_format.name, model.top_k_genes, labels_note,
                model.device, procs.describe())
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
    entries = [{"constrained": bool(s), "n_labels": len(s)} for s in label_sets]
    asked = {"label_column": columns[0], **entries[0]} if one else {"label_columns": columns}
    metrics: dict[str, Any] = {"model_dir": str(args.model_dir), "n_cells": len(rows), **asked,
                               "seconds": seconds, "cells_per_second": len(rows) / seconds if seconds else None,
                               "processes": procs.world_size}
    figures: dict[str, Any] = {}
    for column, truth, known, entry in zip(columns, truths, train_labels, entries, strict=True):
        if truth is not None and predictions[column].notna().any():
            figure_name = PREDICT.confusion if one else per_column(PREDICT.confusion, column)
            summary, figures[figure_name] = metrics_of(predictions, column, known)
            (metrics if one else entry)["prediction"] = summary
            logger.info("%s %.3f on %s cells (majority-class baseline %.3f, %s); macro-F1 %.3f.",
                        "Accuracy" if one else f"{column}: accuracy", summary["accuracy"],
                        f"{summary['n_cells']:,}", summary["majority_baseline"], summary["majority_label"],
                        summary["macro_f1"])
        if not one:
            metrics[column] = entry
    if qc_pass is not None and not qc_pass.all():
        logger.warning("%s of %s cells would have been dropped by the training transform's QC; they are predicted "
                       "all the same and flagged (qc_pass False).", f"{int((~qc_pass).sum()):,}", f"{len(qc_pass):,}")
    recipe = model.recipe
    outputs = list(PREDICT) if one else [*PREDICT, *(per_column(PREDICT.confusion, c) for c in columns)]
    labels = ({"label_column": columns[0], "labels": label_sets[0]} if one
              else {"label_columns": dict(zip(columns, label_sets, strict=True))})
    with publish.staged_outputs(args.output_dir, outputs, overwrite=args.overwrite) as tmp:
        predictions.to_csv(tmp / PREDICT.predictions, index=False)
        if adata is not None:
            annotate(adata, rows, columns, results, label_sets, qc_pass).write_h5ad(tmp / PREDICT.annotated)
        for name, figure in figures.items():
            figure.savefig(tmp / name, dpi=150, bbox_inches="tight")
        write_record(tmp, PREDICT, metrics, args, model, exclude_genes=recipe.transform.get("exclude_genes"),
                     **labels, transform=recipe.transform, published=recipe.published)
    logger.info("Wrote %s.", args.output_dir)
    return metrics


def write_record(tmp: Path, names: Any, metrics: dict[str, Any], args: argparse.Namespace, model: Any,
                 **recipe: Any) -> None:
    """``names.metrics`` and ``names.args``: the arguments and the model's recipe."""
    (tmp / names.metrics).write_text(cli.strict_json(metrics, indent=2, default=str) + "\n")
    cli.save_args({**vars(args), "recipe": {"prompt_format": model.prompt_format.name,
                                            "top_k_genes": model.top_k_genes, **recipe}}, tmp / names.args)


def predicted_columns(args: argparse.Namespace, model: Any) -> list[str]:
    """The columns to predict: --label_columns, --label_column, else every column the model was
    trained to predict (its first label column, or cell_type, when it records none)."""
    recipe = model.recipe
    if args.label_columns is not None:
        columns, flag = [c.strip() for c in args.label_columns.split(",") if c.strip()], "--label_columns"
    elif args.label_column is not None:
        columns, flag = [args.label_column], "--label_column"
    else:
        columns, flag = recipe.prediction_columns() or [recipe.label_column or "cell_type"], None
    unknown = [c for c in columns if recipe.label_columns and c not in recipe.label_columns]
    if flag and unknown:
        raise cli.InputError(f"{flag} {unknown[0]!r}: {args.model_dir} was trained to predict "
                             f"{', '.join(recipe.label_columns)}; leave the flag out or name one of them.")
    if recipe.has_task("cell_type_prediction") is False and not any(recipe.attribute(c) for c in columns):
        raise cli.InputError(f"{args.model_dir} was not trained to predict labels (its tasks: "
                             f"{', '.join(recipe.tasks)}); train it with the cell_type_prediction task.")
    unpredicted = [c for c in columns if recipe.tasks and recipe.label_columns and c not in recipe.prediction_columns()]
    if unpredicted:
        raise cli.InputError(f"{args.model_dir} was not trained to predict {unpredicted[0]!r} (its tasks: "
                             f"{', '.join(recipe.tasks)}); leave it out of {flag or '--label_columns'}.")
    return columns


def predict_groups(args: argparse.Namespace) -> dict[str, Any]:
    """``--multi_cell_column``: the cells grouped by the column (seeded; without the column,
    consecutive cells), one constrained label per group."""
    from utils.evaluation.metrics import classification_summary
    from utils.models.multi_cell import partition_groups
    from utils.models.multi_cell import predict_groups as predict_group_labels

    column = args.multi_cell_column
    publish.claim_output_dir(args.output_dir, list(PREDICT_GROUPS), overwrite=args.overwrite)
    model = cli.load_from_args(args, device=args.device)
    recipe = model.recipe
    if recipe.multi_cell_column is None or not recipe.group_labels:
        raise cli.InputError(f"{args.model_dir} was not trained with multi-cell tasks; train it with train.py "
                             "--multi_cell_column, or drop --multi_cell_column.")
    if column != recipe.multi_cell_column:
        logger.warning("Grouping by %s although %s was trained on groups of %s; predicting %s labels.", column,
                       args.model_dir, recipe.multi_cell_column, recipe.multi_cell_column)
    n = int(recipe.cells_per_example or 4)
    cells, names, rows, _, (values,) = select_cells(args, [column])
    if values is None:
        logger.warning("The cells have no %r column: groups of %d consecutive cells.", column, n)
    sentences = model.cell_sentences(cells)
    groups = partition_groups(None if values is None else list(values), len(sentences), cells_per_example=n,
                              seed=args.seed)
    if not groups:
        raise cli.InputError(f"No cell has a {column!r} value to group by; pass cells with it.")
    start = time.perf_counter()
    labels = list(recipe.group_labels)
    predicted, probabilities = predict_group_labels(model, [[sentences[i] for i in g] for _, g in groups],
                                                    column=recipe.multi_cell_column, labels=labels,
                                                    batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    ids = [f"group_{i:05d}" for i in range(len(groups))]
    table = pd.DataFrame({"group": ids, "n_cells": [len(g) for _, g in groups],
                          f"predicted_{column}": predicted, f"{column}_score": probabilities.max(axis=1)})
    members = pd.DataFrame({"group": [ids[j] for j, (_, g) in enumerate(groups) for _ in g],
                            "cell_name": [names[i] for _, g in groups for i in g]})
    metrics: dict[str, Any] = {"model_dir": str(args.model_dir), "multi_cell_column": column,
                               "cells_per_example": n, "n_groups": len(groups), "n_cells": len(rows),
                               "n_labels": len(labels), "seconds": seconds}
    if values is not None:
        table[column] = [label for label, _ in groups]
        summary = classification_summary(table[column].astype(str).tolist(),
                                         table[f"predicted_{column}"].astype(str).tolist())
        metrics["group_prediction"] = {"n_groups": len(table), **{k: summary[k] for k in
                                       ("accuracy", "majority_baseline", "majority_label")}}
        logger.info("Group accuracy %.3f on %s groups of %d cells (majority baseline %.3f).",
                    summary["accuracy"], f"{len(table):,}", n, summary["majority_baseline"])
    with publish.staged_outputs(args.output_dir, list(PREDICT_GROUPS), overwrite=args.overwrite) as tmp:
        table.to_csv(tmp / PREDICT_GROUPS.groups, index=False)
        members.to_csv(tmp / PREDICT_GROUPS.members, index=False)
        write_record(tmp, PREDICT_GROUPS, metrics, args, model, multi_cell_column=recipe.multi_cell_column,
                     cells_per_example=n, labels=labels)
    logger.info("Wrote %s.", args.output_dir)
    return metrics


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
