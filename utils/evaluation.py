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
    "distinct_colours",
    "embed_pca",
    "knn_accuracy",
    "majority_baseline",
    "normalize_label",
    "plot_confusion_matrix",
    "plot_embedding",
    "plot_labelled_panels",
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
    """Accuracy, balanced accuracy, macro-F1 and per-class scores, with the majority baseline.

    Labels are compared normalized. The classes are the true labels: a predicted label that
    is no true class (an unknown answer) counts against the true class's recall and adds no
    class of its own, so ``macro_f1`` and ``balanced_accuracy`` (mean recall) average over the
    true classes. ``per_class`` holds precision, recall, F1 and support per class;
    ``per_class_accuracy`` is the recall. The baseline's majority class comes from
    ``train_labels`` when given, else from ``true``.

    >>> s = classification_summary(["B cell", "T cell"], ["b cell ", "NK"])
    >>> s["accuracy"], s["n_cells"], s["n_correct"], s["macro_f1"]
    (0.5, 2, 1, 0.5)
    """
    from sklearn.metrics import precision_recall_fscore_support

    t = np.array([normalize_label(x) for x in true], dtype=object)
    p = np.array([normalize_label(x) for x in predicted], dtype=object)
    if len(t) != len(p):
        raise ValueError(f"{len(t)} true labels but {len(p)} predictions.")
    correct = t == p
    names = {normalize_label(x): str(x) for x in true}
    classes = sorted(set(t))
    per_class: dict[str, dict[str, float]] = {}
    balanced = macro_f1 = float("nan")
    if classes:
        precision, recall, f1, support = precision_recall_fscore_support(
            t, p, labels=classes, zero_division=0.0
        )
        balanced, macro_f1 = float(np.mean(recall)), float(np.mean(f1))
        for i, label in enumerate(classes):
            per_class[names[label]] = {"precision": float(precision[i]), "recall": float(recall[i]),
                                       "f1": float(f1[i]), "support": int(support[i])}
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
        "balanced_accuracy": balanced,
        "macro_f1": macro_f1,
        "majority_baseline": baseline["accuracy"],
        "majority_label": baseline["label"],
        "per_class_accuracy": {name: v["recall"] for name, v in per_class.items()},
        "per_class": per_class,
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
    *others: sp.spmatrix | np.ndarray,
    n_components: int = 2,
    seed: int = 0,
) -> tuple[np.ndarray, ...]:
    """PCA fitted on ``X_fit`` (e.g. real cells) and applied to it and to each of ``others``.

    Returns the coordinates of ``X_fit`` followed by those of each other matrix. Sparse input
    stays sparse (sklearn's PCA centres it implicitly), but for a ``X_fit`` of no more cells
    than components: its few rows are made dense. Either way the work is sized by the cells
    and components, never by genes × genes.
    """
    from sklearn.decomposition import PCA

    n_components = int(min(n_components, X_fit.shape[0], X_fit.shape[1]))
    solver = "arpack" if sp.issparse(X_fit) and n_components < min(X_fit.shape) else "full"
    if sp.issparse(X_fit) and solver == "full":
        # Every component (arpack cannot give them all): of few cells, a dense SVD of the cells'
        # rows (as many rows as components); sklearn's "covariance_eigh" would decompose a dense
        # genes × genes matrix (40 cells of 25,000 genes: 168 s and 4.9 GB, not 0.1 s).
        if X_fit.shape[0] <= X_fit.shape[1]:
            X_fit = X_fit.toarray()
        else:
            solver = "covariance_eigh"  # few genes: genes × genes is the small side
    pca = PCA(n_components=n_components, svd_solver=solver, random_state=seed)
    fitted = np.asarray(pca.fit_transform(X_fit))
    return (fitted, *(np.asarray(pca.transform(X)) if X.shape[0] else np.zeros((0, n_components))
                      for X in others))


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


# Colours that are told apart at a glance on white: tab10, then colours of Kelly's list of
# maximum contrast unlike any of them. tab20's pairs (a dark and a light shade of one hue at
# neighbouring places) gave types next to each other by name two shades of one blue.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#f3c300", "#875692", "#008856", "#f99379", "#604e97", "#b3446c",
    "#882d17", "#8db600", "#2b3d26", "#e25822",
)


def _lab(colour: str) -> np.ndarray:
    """CIELAB (D65) of a matplotlib colour."""
    rgb = np.array(matplotlib.colors.to_rgb(colour))
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                    [0.0193, 0.1192, 0.9505]]) @ linear / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _colour_distance(a: str, b: str) -> float:
    """Distance in CIELAB with lightness at half weight: two shades of one hue (dark and light
    blue) read as one family, so they count as close."""
    d = _lab(a) - _lab(b)
    return float(np.sqrt((d[0] / 2) ** 2 + d[1] ** 2 + d[2] ** 2))


def distinct_colours(types: Sequence[str], centroids: np.ndarray) -> dict[str, str]:
    """A colour per type such that types close together in the embedding look different.

    Minimizes the sum over pairs of types of closeness(centroids) × likeness(colours), with
    closeness exp(−(d / s)²) (s: the median distance of a centroid to its nearest other one)
    and likeness exp(−colour distance / 40), by local search from the palette's order: each
    type in turn takes the colour (a free one, or another type's by a swap) that lowers the sum
    most, until no move does. Deterministic; past the palette's length colours repeat.

    >>> distinct_colours(["a", "b"], np.array([[0.0, 0.0], [1.0, 0.0]]))
    {'a': '#1f77b4', 'b': '#ff7f0e'}
    """
    n = len(types)
    centroids = np.asarray(centroids, dtype=np.float64).reshape(n, -1)
    if n == 0:
        return {}
    d = np.sqrt(((centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    scale = float(np.median(d.min(axis=1))) if n > 1 else 1.0
    close = np.exp(-((d / (scale if scale > 0 else 1.0)) ** 2))
    palette = [PALETTE[i % len(PALETTE)] for i in range(max(n, len(PALETTE)))]
    like = np.array([[np.exp(-_colour_distance(a, b) / 40.0) for b in palette] for a in palette])
    pick = list(range(n))  # type i has palette[pick[i]]

    def total(p: list[int]) -> float:
        return float((close * like[np.ix_(p, p)]).sum()) / 2

    current = total(pick)
    for _ in range(100):
        moved = False
        for i in range(n):
            for c in range(len(palette)):
                if c == pick[i]:
                    continue
                trial = pick.copy()
                if c in trial:  # a swap with the type holding c
                    trial[trial.index(c)] = pick[i]
                trial[i] = c
                value = total(trial)
                if value < current - 0.01:  # a clear gain only: tab10 stays where it serves
                    pick, current, moved = trial, value, True
        if not moved:
            break
    return {str(types[i]): palette[pick[i]] for i in range(n)}


def plot_embedding(
    real: np.ndarray,
    real_labels: Sequence[str],
    generated: np.ndarray,
    generated_labels: Sequence[str],
    *,
    title: str = "Real and generated cells (PCA)",
    axis_label: str = "PC",
) -> Figure:
    """2-d scatter of real (dots) and generated (crosses) cells, coloured by cell type
    (:func:`distinct_colours`, from the centroids of each type's cells)."""
    fig = Figure(figsize=(8.5, 6))
    ax = fig.add_subplot()
    types = sorted({str(x) for x in real_labels} | {str(x) for x in generated_labels})
    groups = [  # (points, labels, marker size, alpha, marker, legend suffix)
        (np.asarray(real)[:, :2], np.asarray([str(x) for x in real_labels], dtype=object), 10, 0.5, "o", "real"),
        (np.asarray(generated)[:, :2], np.asarray([str(x) for x in generated_labels], dtype=object), 22, 0.9,
         "x", "generated"),
    ]
    points = np.vstack([g[0].reshape(-1, 2) for g in groups])
    labels = np.concatenate([g[1] for g in groups])
    centroids = np.array([points[labels == t].mean(axis=0) for t in types]).reshape(len(types), 2)
    colors = distinct_colours(types, centroids)
    for t in types:
        for pts, labs, size, alpha, marker, kind in groups:
            m = labs == t
            if m.any():
                ax.scatter(pts[m, 0], pts[m, 1], s=size, alpha=alpha, color=colors[t],
                           marker=marker, label=f"{t} ({kind})")
    ax.set_xlabel(f"{axis_label}1")
    ax.set_ylabel(f"{axis_label}2")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig


def plot_labelled_panels(panels: Sequence[tuple[str, np.ndarray, Sequence[str]]], *,
                         axis_label: str = "PC") -> Figure:
    """Side-by-side 2-d scatters of (title, coordinates, labels), one colour per label in every
    panel (:func:`distinct_colours` from the first panel's centroids)."""
    fig = Figure(figsize=(5.2 * len(panels) + 2.5, 5))
    types = sorted({str(x) for _, _, labels in panels for x in labels})
    first = np.asarray(panels[0][1])[:, :2]
    first_labels = np.asarray([str(x) for x in panels[0][2]], dtype=object)
    centroids = np.array([first[first_labels == t].mean(axis=0) if (first_labels == t).any() else
                          np.full(2, np.inf) for t in types]).reshape(len(types), 2)
    centroids[~np.isfinite(centroids)] = 1e6  # a type absent from the first panel: far away
    colors = distinct_colours(types, centroids)
    for i, (title, coords, labels) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        coords = np.asarray(coords)
        labs = np.asarray([str(x) for x in labels], dtype=object)
        for t in types:
            m = labs == t
            if m.any():
                ax.scatter(coords[m, 0], coords[m, 1], s=8, alpha=0.7, color=colors[t], label=t)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"{axis_label}1")
        ax.set_ylabel(f"{axis_label}2")
    handles, names = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / (5.2 * len(panels) + 2.5), 1))
    return fig
