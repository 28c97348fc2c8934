"""Score cell-type predictions against the truth, next to the majority class and k-NN on PCA of expression.

predictions.csv [+ <transform_dir>/<stem>_preprocessed.h5ad] -> metrics.json, per_class.csv, confusion_matrix.png,
eval_args.json. Example:
    python eval/prediction.py --predictions data/predictions/<run>/predictions.csv \\
        --transform_dir data --output_dir data/eval/prediction
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python eval/prediction.py`: the repository's utils
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from eval import finish, logger, parse, start  # noqa: E402
from utils import cli, publish  # noqa: E402
from utils.contract import EVAL_PREDICTION, label_column_of, per_column, read_preprocessed  # noqa: E402
from utils.evaluation.figures import plot_confusion_matrix  # noqa: E402
from utils.evaluation.metrics import classification_summary, embed_pca, knn_accuracy  # noqa: E402

SCORES = ("accuracy", "balanced_accuracy", "macro_f1")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.script_parser(__doc__)
    p.add_argument("--predictions", type=Path, default=None,
                   help="predict.py's predictions.csv or group_predictions.csv, or columns "
                        "cell_name,true,predicted (required)")
    p.add_argument("--transform_dir", type=Path, default=None,
                   help="transform.py's output folder (default: the parent of --data_dir, else data)")
    p.add_argument("--data_dir", type=Path, default=None,
                   help="transform.py's cell_sentences_hf folder (only to find --transform_dir, its parent)")
    p.add_argument("--label_column", type=str, default=None,
                   help="the label column, of predicted_<column> and the AnnData (default: each predicted)")
    p.add_argument("--k_neighbors", type=int, default=5, help="k of the expression baseline's k-NN")
    p.add_argument("--n_components", type=int, default=50, help="principal components of the baseline")
    args = parse(p, argv, name="prediction", seed_help="seed of the PCA",
                 required=("predictions", "Pass --predictions, a predictions.csv written by predict.py."),
                 positive=("k_neighbors", "n_components"))
    if args.transform_dir is None:
        args.transform_dir = args.data_dir.parent if args.data_dir is not None else Path("data")
    return args


def read_predictions(path: Path, column: str | None = None) -> pd.DataFrame:
    """cell_name, true, predicted of a predictions.csv (``predicted_<column>`` and ``<column>``, or true,predicted)."""
    if not path.is_file():
        raise cli.InputError(f"{path} does not exist; pass the predictions.csv of a predict.py run.")
    # Labels are text: "NA" or "None" are cell types here, not missing values.
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    predicted = [c.removeprefix("predicted_") for c in table.columns if c.startswith("predicted_")]
    if not {"true", "predicted"} <= set(table.columns) and predicted:
        if column is None and len(predicted) > 1:
            raise cli.InputError(f"{path} holds predictions of {', '.join(predicted)}; choose one with --label_column.")
        column = column or predicted[0]
        if f"predicted_{column}" not in table or column not in table:
            raise cli.InputError(f"{path} has no columns predicted_{column} and {column} (the truth; predict.py "
                                 f"writes it for labelled cells only); it has {list(table.columns)}.")
        table = table.rename(columns={f"predicted_{column}": "predicted", column: "true"})
        unknown = table["true"].str.strip() == ""  # a cell of the user's without a label: nothing to score
        if unknown.any():
            logger.info("%s cells have no %s label; scoring the other %s.", f"{int(unknown.sum()):,}", column,
                        f"{int((~unknown).sum()):,}")
            table = table[~unknown].reset_index(drop=True)
    missing = {"true", "predicted"} - set(table.columns)
    if missing:
        raise cli.InputError(f"{path} has no column {', '.join(sorted(missing))} (it has {list(table.columns)}); "
                             "it must have predict.py's predicted_<column> and <column>, or true,predicted.")
    if table.empty:
        raise cli.InputError(f"{path} holds no predictions.")
    return table


def predicted_columns(path: Path) -> list[str]:
    """The columns predict.py predicted into ``path`` (its ``predicted_<column>`` headers)."""
    if not path.is_file():
        return []
    header = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=0).columns
    return [c.removeprefix("predicted_") for c in header if c.startswith("predicted_")]


def expression_baseline(table: pd.DataFrame, args: argparse.Namespace, adata: Any, column: str | None = None
                        ) -> tuple[dict[str, Any] | None, list[str]]:
    """k-NN on PCA of ``adata`` (fitted on its training cells) for the predicted cells, and the training labels."""
    if adata is None:
        return None, []
    column = column or args.label_column or label_column_of(args.transform_dir)
    if column not in adata.obs or "split" not in adata.obs:
        logger.warning("%s has no obs %r or 'split' column: no expression baseline.", args.transform_dir, column)
        return None, []
    labels = adata.obs[column].astype(str).to_numpy()
    # Cells without a label (NaN) are neither neighbours nor counted for the majority class.
    train = ((adata.obs["split"].astype(str) == "train") & adata.obs[column].notna()).to_numpy()
    train_labels = labels[train].tolist()
    if "cell_name" not in table.columns:
        logger.warning("No cell_name column: no expression baseline.")
        return None, train_labels
    rows = adata.obs_names.get_indexer(table["cell_name"])
    found = rows >= 0
    if not found.all():
        logger.warning("%s of %s predicted cells are not in the preprocessed AnnData; the expression "
                       "baseline scores the %s found.", f"{(~found).sum():,}", f"{len(rows):,}", f"{found.sum():,}")
    if not found.any():
        return None, train_labels
    train &= ~np.isin(np.arange(adata.n_obs), rows[found])  # never a predicted cell among the neighbours
    if not train.any():  # e.g. predict.py --split all: every training cell was predicted
        logger.warning("Every training cell was predicted: no cells are left to be the expression baseline's "
                       "neighbours, so there is no expression baseline.")
        return None, train_labels
    train_pc, eval_pc = embed_pca(adata.X[train], adata.X[rows[found]], n_components=args.n_components,
                                  seed=args.seed)
    knn = knn_accuracy(train_pc, labels[train].tolist(), eval_pc, table["true"][found].tolist(),
                       k=args.k_neighbors)
    summary = classification_summary(table["true"][found].tolist(), knn["predicted"], train_labels=train_labels)
    out = {key: summary[key] for key in SCORES}
    out.update(n_cells=int(found.sum()), k=knn["k"], n_components=int(train_pc.shape[1]),
               n_train=int(train.sum()))
    return out, train_labels


def main(args: argparse.Namespace) -> dict[str, Any]:
    start(args, [args.predictions, args.transform_dir, args.data_dir])
    columns = predicted_columns(args.predictions) if args.label_column is None else []
    several = len(columns) > 1  # each scored as one: metrics.json {"<column>": {...}}, other outputs per column
    columns = columns if several else [None]

    def named(output: str, column: str | None) -> str:
        return per_column(output, column) if several else output

    outputs = list(dict.fromkeys([EVAL_PREDICTION.metrics, *(named(name, c) for c in columns for name in (
        EVAL_PREDICTION.per_class, EVAL_PREDICTION.confusion)), *EVAL_PREDICTION]))  # a rerun removes the others
    publish.check_can_write(args.output_dir, outputs, overwrite=args.overwrite)
    metrics: dict[str, Any] = {}
    figures, frames = {}, {}
    # predict.py --multi_cell_column's group_predictions.csv: a label per group, scored per group
    groups = args.predictions.is_file() and {"group", "n_cells"} <= set(pd.read_csv(args.predictions, nrows=0))
    for column in columns:
        table = read_predictions(args.predictions, column or args.label_column)
        if column == columns[0]:  # after the first table: a bad predictions.csv fails before the AnnData is read
            adata = None if groups else read_preprocessed(args.transform_dir)
            if adata is None and not groups:
                logger.warning("No preprocessed AnnData in %s: no expression baseline, and the majority class is "
                               "taken from the true labels; pass --transform_dir.", args.transform_dir)
        metrics[column], frames[named(EVAL_PREDICTION.per_class, column)], figure = evaluate(
            table, args, *expression_baseline(table, args, adata, column), column=column)
        if groups:
            metrics[column].update(unit="group", n_groups=len(table),
                                   mean_cells_per_group=float(pd.to_numeric(table["n_cells"]).mean()))
            name = named(EVAL_PREDICTION.per_class, column)  # the group column names the labels
            frames[name] = frames[name].rename(columns={"cell_type": column or predicted_columns(args.predictions)[0]})
        figures[named(EVAL_PREDICTION.confusion, column)] = figure
    captions = {f"Confusion matrix: {column}": name for column, name in zip(columns, figures, strict=True)}
    card = {column: {key: metrics[column][key] for key in (*SCORES, "majority_baseline", "n_cells")}
            for column in columns}
    if not several:
        metrics, card, captions = metrics[None], card[None], {"Confusion matrix": EVAL_PREDICTION.confusion}
    finish(args, outputs, metrics=metrics, figures=figures, frames=frames,
           card=(args.predictions.parent, "group_prediction" if groups else "prediction", card), captions=captions)
    return metrics


def evaluate(table: pd.DataFrame, args: argparse.Namespace, pca_knn: dict[str, Any] | None,
             train_labels: list[str], *, column: str | None = None) -> tuple[dict[str, Any], pd.DataFrame, Any]:
    """The metrics, per-class table and confusion matrix of ``table``'s true and predicted."""
    summary = classification_summary(table["true"], table["predicted"], train_labels=train_labels or None)
    constant = classification_summary(table["true"], [summary["majority_label"]] * len(table),
                                      train_labels=train_labels or None)
    baselines: dict[str, Any] = {"majority": {"label": summary["majority_label"],
                                              **{key: constant[key] for key in SCORES}}}
    if pca_knn is not None:
        baselines["pca_knn"] = pca_knn
    metrics = {**{key: summary[key] for key in SCORES}, "majority_baseline": summary["majority_baseline"],
               **{key: value for key, value in summary.items() if key not in SCORES},
               "baselines": baselines, "predictions": str(args.predictions)}
    logger.info("%s%s cells: accuracy %.3f, balanced accuracy %.3f, macro-F1 %.3f; majority class (%s) %s%s.",
                f"{column}: " if column else "", f"{summary['n_cells']:,}", *(summary[key] for key in SCORES),
                summary["majority_label"], " / ".join(f"{constant[key]:.3f}" for key in SCORES),
                "" if pca_knn is None else
                "; k-NN on PCA of expression " + " / ".join(f"{pca_knn[key]:.3f}" for key in SCORES))
    per_class = pd.DataFrame([{column or "cell_type": t, **v} for t, v in summary["per_class"].items()])
    what = "Cell-type prediction" if column is None else f"{column} prediction"
    figure = plot_confusion_matrix(table["true"], table["predicted"],
                                   title=f"{what} (accuracy {summary['accuracy']:.3f}, "
                                         f"macro-F1 {summary['macro_f1']:.3f})")
    return metrics, per_class, figure


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
