"""predict.py's inputs and outputs: the training labels, predictions.csv, the annotated AnnData and
the metrics of known labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def train_labels_of(data_dir: Path, column: str) -> list[str] | None:
    """The train split's labels of ``column`` (for the majority-class baseline; None without them)."""
    from utils.contract import open_dataset_dict
    from utils.models.examples import has_label

    dd = open_dataset_dict(data_dir, single_ok=True)
    if "train" not in dd or column not in dd["train"].column_names:
        return None
    return [str(x) for x in dd["train"][column] if has_label(x)] or None


def prediction_table(cell_names: Sequence[str], columns: Sequence[str], results: Sequence[Any],
                     truths: Sequence[Any], qc_pass: np.ndarray | None) -> pd.DataFrame:
    """predictions.csv: ``cell_name``, per column ``predicted_<column>``, ``<column>_score`` and the
    truth (None: unknown), and ``qc_pass`` for a user's h5ad (False: the training QC drops the cell)."""
    table = pd.DataFrame({"cell_name": list(cell_names)})
    for name, one, known in zip(columns, results, truths, strict=True):
        table[f"predicted_{name}"] = one.labels
        table[f"{name}_score"] = one.scores
        if known is not None:
            table[name] = list(known)
    if qc_pass is not None:
        table["qc_pass"] = qc_pass
    return table


def annotate(adata: Any, rows: np.ndarray, columns: Sequence[str], results: Sequence[Any],
             label_sets: Sequence[list[str]], qc_pass: np.ndarray) -> Any:
    """A copy of the user's AnnData plus ``obs["c2s_qc_pass"]`` and, per column, ``obs["c2s_<column>"]``,
    ``obs["c2s_<column>_score"]`` and ``.obsm["c2s_<column>_scores"]`` (cells x labels, the label
    order in ``.uns``); NaN for cells left out by --max_cells."""
    annotated = adata.copy()
    for column, result, label_set in zip(columns, results, label_sets, strict=True):
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
