"""Evaluation of predicted cell types and generated cells.

- Cell-type prediction: exact-match accuracy after normalizing labels (trimmed, case-folded,
  inner whitespace collapsed), the majority-class baseline, a confusion matrix.
- Generated cells: the valid-gene rate (fraction of generated words that are vocabulary genes),
  the duplicate rate and the mean sentence length, from the inverse transform's counts.
- The paper's k-NN metric: a k-nearest-neighbour classifier fitted on real cells, whose
  expression is reconstructed from their top-K ranks by the inverse transform (the same
  representation as the generated cells), predicts the type of each generated cell; its
  accuracy against the requested types is reported with the real-vs-real accuracy (real
  training cells -> held-out real cells) as the ceiling.

The functions take arrays and return numbers or figures; reading and writing files is left to
the scripts. Figures are ``matplotlib.figure.Figure`` objects (no pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import scipy.sparse as sp
from matplotlib.figure import Figure

from utils.inverse import InverseResult

__all__ = [
    "classification_summary",
    "embed_pca",
    "knn_accuracy",
    "majority_baseline",
    "normalize_label",
    "plot_confusion_matrix",
    "plot_embedding",
    "sentence_stats",
]


def normalize_label(label: Any) -> str:
    """A label as compared: trimmed, case-folded, inner whitespace collapsed.

    >>> normalize_label("  CD14+  Monocyte ")
    'cd14+ monocyte'
    """
    return " ".join(str(label).split()).casefold()


def majority_baseline(train_labels: Sequence[str], eval_labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy of always answering the most frequent training label (ties: first by name).

    >>> majority_baseline(["a", "b", "b"], ["b", "a", "b", "c"])
    {'label': 'b', 'accuracy': 0.5}
    """
    if len(train_labels) == 0:
        return {"label": None, "accuracy": float("nan")}
    counts = pd.Series([normalize_label(x) for x in train_labels]).value_counts()
    best = sorted(counts[counts == counts.max()].index)[0]
    originals = {normalize_label(x): str(x) for x in train_labels}
    hits = [normalize_label(y) == best for y in eval_labels]
    return {
        "label": originals[best],
        "accuracy": float(np.mean(hits)) if hits else float("nan"),
    }


def classification_summary(
    true: Sequence[str], predicted: Sequence[str], *, train_labels: Sequence[str] | None = None
) -> dict[str, Any]:
    """Exact-match accuracy (normalized labels), per-class accuracy and the majority baseline.

    The baseline's majority class comes from ``train_labels`` when given, else from ``true``.

    >>> s = classification_summary(["B cell", "T cell"], ["b cell ", "NK"])
    >>> s["accuracy"], s["n_cells"], s["n_correct"]
    (0.5, 2, 1)
    """
    t = np.array([normalize_label(x) for x in true], dtype=object)
    p = np.array([normalize_label(x) for x in predicted], dtype=object)
    if len(t) != len(p):
        raise ValueError(f"{len(t)} true labels but {len(p)} predictions.")
    correct = t == p
    per_class = {}
    names = {normalize_label(x): str(x) for x in true}
    for label in sorted(set(t)):
        mask = t == label
        per_class[names[label]] = float(correct[mask].mean())
    baseline = majority_baseline(
        list(train_labels) if train_labels is not None else list(true), true
    )
    known = set(t) | (
        {normalize_label(x) for x in train_labels} if train_labels is not None else set()
    )
    return {
        "n_cells": int(len(t)),
        "n_correct": int(correct.sum()),
        "accuracy": float(correct.mean()) if len(t) else float("nan"),
        "majority_baseline": baseline["accuracy"],
        "majority_label": baseline["label"],
        "per_class_accuracy": per_class,
        "fraction_unknown_label": float(np.mean([x not in known for x in p])) if len(p) else 0.0,
    }


def sentence_stats(result: InverseResult) -> dict[str, float]:
    """Word-level quality of (generated) sentences from the inverse transform's counts.

    ``valid_gene_rate`` = vocabulary-gene words / all words; ``duplicate_rate`` = words that
    repeat a gene already in the sentence / all words; lengths are in words.
    """
    words = int(result.n_words.sum())
    valid = words - int(result.n_invalid_genes.sum())
    n = len(result.n_words)
    return {
        "n_cells": n,
        "n_words": words,
        "valid_gene_rate": valid / words if words else float("nan"),
        "duplicate_rate": int(result.n_duplicate_genes.sum()) / words if words else float("nan"),
        "invalid_rate": int(result.n_invalid_genes.sum()) / words if words else float("nan"),
        "mean_sentence_length": float(result.n_words.mean()) if n else float("nan"),
        "mean_n_genes": float(result.n_genes.mean()) if n else float("nan"),
        "fraction_empty": float((result.n_genes == 0).mean()) if n else float("nan"),
    }


def knn_accuracy(
    X_train: sp.spmatrix | np.ndarray,
    y_train: Sequence[str],
    X_eval: sp.spmatrix | np.ndarray,
    y_eval: Sequence[str],
    *,
    k: int = 5,
) -> dict[str, Any]:
    """Fit a k-NN classifier (Euclidean) on ``X_train`` and score it on ``X_eval``.

    Labels are compared normalized. Returns the accuracy, the k used (at most the number of
    training cells) and the predicted labels (as spelled in ``y_train``).
    """
    from sklearn.neighbors import KNeighborsClassifier

    if X_train.shape[0] == 0 or X_eval.shape[0] == 0:
        return {"accuracy": float("nan"), "k": 0, "predicted": []}
    k_used = int(min(k, X_train.shape[0]))
    y_tr = np.array([normalize_label(y) for y in y_train], dtype=object)
    spelled = {normalize_label(y): str(y) for y in y_train}
    clf = KNeighborsClassifier(n_neighbors=k_used, algorithm="brute")
    clf.fit(X_train, y_tr)
    predicted = clf.predict(X_eval)
    truth = np.array([normalize_label(y) for y in y_eval], dtype=object)
    return {
        "accuracy": float(np.mean(predicted == truth)),
        "k": k_used,
        "predicted": [spelled[p] for p in predicted],
    }


def embed_pca(
    X_fit: sp.spmatrix | np.ndarray,
    X_other: sp.spmatrix | np.ndarray,
    *,
    n_components: int = 2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """PCA fitted on ``X_fit`` (e.g. real cells) and applied to both matrices.

    Sparse input stays sparse (sklearn's PCA centres it implicitly).
    """
    from sklearn.decomposition import PCA

    n_components = int(min(n_components, X_fit.shape[0], X_fit.shape[1]))
    solver = "arpack" if sp.issparse(X_fit) and n_components < min(X_fit.shape) else "full"
    if sp.issparse(X_fit) and solver == "full":
        solver = "covariance_eigh"
    pca = PCA(n_components=n_components, svd_solver=solver, random_state=seed)
    a = pca.fit_transform(X_fit)
    b = pca.transform(X_other) if X_other.shape[0] else np.zeros((0, n_components))
    return np.asarray(a), np.asarray(b)


def plot_confusion_matrix(
    true: Sequence[str], predicted: Sequence[str], *, title: str = "Cell-type prediction"
) -> Figure:
    """Row-normalized confusion matrix with counts; predicted labels outside the true ones
    are gathered in an ``(other)`` column."""
    t = [normalize_label(x) for x in true]
    p = [normalize_label(x) for x in predicted]
    names = {normalize_label(x): str(x) for x in true}
    classes = sorted(set(t))
    cols = classes + (["(other)"] if any(x not in names for x in p) else [])
    index = {c: i for i, c in enumerate(classes)}
    counts = np.zeros((len(classes), len(cols)), dtype=int)
    for a, b in zip(t, p, strict=True):
        counts[index[a], index.get(b, len(classes))] += 1
    with np.errstate(invalid="ignore"):
        frac = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    labels_y = [names[c] for c in classes]
    labels_x = labels_y + (["(other)"] if len(cols) > len(classes) else [])
    size = 2.5 + 0.55 * max(len(labels_x), 2)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels_x)), labels_x, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels_y)), labels_y, fontsize=8)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                color = "white" if frac[i, j] > 0.6 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    return fig


def plot_embedding(
    real: np.ndarray,
    real_labels: Sequence[str],
    generated: np.ndarray,
    generated_labels: Sequence[str],
    *,
    title: str = "Real and generated cells (PCA)",
    axis_label: str = "PC",
) -> Figure:
    """2-d scatter of real (dots) and generated (crosses) cells, coloured by cell type."""
    fig = Figure(figsize=(8.5, 6))
    ax = fig.add_subplot()
    types = sorted({str(x) for x in real_labels} | {str(x) for x in generated_labels})
    cmap = matplotlib.colormaps["tab20"]
    colors = {t: cmap(i % 20) for i, t in enumerate(types)}
    groups = [  # (points, labels, marker size, alpha, marker, legend suffix)
        (real, np.asarray(real_labels, dtype=object), 10, 0.5, "o", "real"),
        (generated, np.asarray(generated_labels, dtype=object), 22, 0.9, "x", "generated"),
    ]
    for t in types:
        for points, labels, size, alpha, marker, kind in groups:
            m = labels == t
            if m.any():
                ax.scatter(points[m, 0], points[m, 1], s=size, alpha=alpha, color=colors[t],
                           marker=marker, label=f"{t} ({kind})")
    ax.set_xlabel(f"{axis_label}1")
    ax.set_ylabel(f"{axis_label}2")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig
