"""The metrics of the evaluations, over arrays (files and figures are other modules' business).

- Prediction: exact-match accuracy after normalizing labels (trimmed, case-folded, inner
  whitespace collapsed), the majority-class baseline, per-class scores.
- Generated sentences: the valid-gene rate, the duplicate rate and the mean length.
- k-NN: the paper's classifier fitted on real cells and leave-one-out accuracy; the shared PCA.
- Embeddings: leave-one-out k-NN accuracy, silhouette and the agreement (ARI, NMI) of a KMeans
  clustering with the labels, next to those of the PCA of the same cells' expression.
- Reconstruction: per-cell and overall fit of log-expression on log-rank over a whole
  preprocessed matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from utils.inverse import InverseResult
from utils.transform.fit import RankExpressionFit


def dense(X: sp.spmatrix | np.ndarray) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


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


def knn_loo_accuracy(X: np.ndarray, labels: Sequence[str], *, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy: each cell's type by majority vote of its ``k`` nearest
    other cells (Euclidean; ties go to the first type by name, as scikit-learn's classifier).

    >>> X = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    >>> knn_loo_accuracy(X, ["a", "a", "a", "b", "b", "b"], k=2)
    1.0
    """
    from sklearn.neighbors import NearestNeighbors

    X = dense(X)
    y = np.array([normalize_label(v) for v in labels], dtype=object)
    n = len(y)
    if n < 2:
        return float("nan")
    k = int(min(k, n - 1))
    classes, codes = np.unique(y, return_inverse=True)
    _, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    # Drop each cell itself (by index: duplicated points may list another copy first).
    is_self = neighbours == np.arange(n)[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    others = neighbours[~is_self].reshape(n, k)
    votes = np.zeros((n, len(classes)), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(n), k), codes[others].ravel()), 1)
    return float(np.mean(votes.argmax(axis=1) == codes))


def embedding_scores(
    X: np.ndarray, labels: Sequence[str], *, k: int = 5, max_silhouette: int = 5000, seed: int = 0
) -> dict[str, float]:
    """How well an embedding (cells × dimensions) separates the labelled types.

    ``knn_accuracy``: leave-one-out k-NN accuracy; ``silhouette``: mean silhouette width of the
    labels (Euclidean; on a seeded subset of ``max_silhouette`` cells when larger); ``ari`` and
    ``nmi``: agreement of a KMeans clustering with as many clusters as types.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    X = dense(X)
    y = np.array([normalize_label(v) for v in labels], dtype=object)
    n_types = len(set(y))
    out = {"n_cells": int(len(y)), "n_types": int(n_types), "n_dims": int(X.shape[1]),
           "knn_accuracy": knn_loo_accuracy(X, y, k=k), "k": int(min(k, max(len(y) - 1, 0)))}
    if 2 <= n_types < len(y):
        size = min(max_silhouette, len(y))
        out["silhouette"] = float(silhouette_score(X, y, sample_size=size if size < len(y) else None,
                                                   random_state=seed))
        clusters = KMeans(n_clusters=n_types, n_init=10, random_state=seed).fit_predict(X)
        out["ari"] = float(adjusted_rand_score(y, clusters))
        out["nmi"] = float(normalized_mutual_info_score(y, clusters))
    else:
        out.update(silhouette=float("nan"), ari=float("nan"), nmi=float("nan"))
    return out


@dataclass
class EmbeddingEvaluation:
    """What :func:`evaluate_embedding` returns: the scores (``"c2s"``: the embedding's,
    ``"pca"``: the expression baseline's, when expression was given) and the baseline's
    principal components with their cells' labels (for a figure)."""

    scores: dict[str, Any]
    pca_coords: np.ndarray | None = None
    pca_labels: list[str] = field(default_factory=list)


def evaluate_embedding(
    X: np.ndarray,
    labels: Sequence[str],
    names: Sequence[str],
    *,
    expression: Any = None,
    k: int = 5,
    n_components: int = 50,
    seed: int = 0,
) -> EmbeddingEvaluation:
    """:func:`embedding_scores` of an embedding of labelled cells (rows of ``X``, named
    ``names``) under ``"c2s"``, and, given ``expression`` (an AnnData of the preprocessed
    expression of some or all of these cells, matched by name), the same scores of its first
    ``n_components`` principal components under ``"pca"`` (with the ``n_components`` used):
    the baseline an embedding should beat."""
    scores: dict[str, Any] = {"c2s": embedding_scores(X, labels, k=k, seed=seed)}
    if expression is None:
        return EmbeddingEvaluation(scores)
    label_of = dict(zip(names, labels, strict=True))
    pca_labels = [label_of[n] for n in expression.obs_names]
    (pcs,) = embed_pca(expression.X, n_components=n_components, seed=seed)
    scores["pca"] = {**embedding_scores(pcs, pca_labels, k=k, seed=seed), "n_components": int(pcs.shape[1])}
    return EmbeddingEvaluation(scores, pcs, pca_labels)


def rank_expression_points(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every expressed value of a preprocessed (log10(1 + x)) matrix with its rank in its cell.

    Returns ``log_rank`` (log10(1 + rank), rank 0 = the cell's highest value),
    ``log_expression`` and ``indptr`` (cell ``i``'s points are ``indptr[i]:indptr[i+1]``).
    Ties need no tie-breaking: whichever tied gene comes first, the value at each rank is the
    same, so these are the transform's points for any seed.

    >>> r, e, p = rank_expression_points(sp.csr_matrix(np.array([[0.0, 1.0, 3.0], [2.0, 0.0, 0.0]])))
    >>> np.round(10 ** r - 1, 6).tolist(), e.tolist(), p.tolist()
    ([0.0, 1.0, 0.0], [3.0, 1.0, 2.0], [0, 2, 3])
    """
    X = sp.csr_matrix(X)
    X.eliminate_zeros()
    counts = np.diff(X.indptr)
    rows = np.repeat(np.arange(X.shape[0]), counts)
    order = np.lexsort((-X.data, rows))  # by cell, then by value from the highest
    values = np.asarray(X.data[order], dtype=np.float64)
    rank = np.arange(len(values)) - np.repeat(X.indptr[:-1], counts)
    return np.log10(1.0 + rank), values, X.indptr.astype(np.int64)


def per_cell_reconstruction(
    log_rank: np.ndarray, log_expression: np.ndarray, indptr: np.ndarray, fit: RankExpressionFit
) -> pd.DataFrame:
    """How well ``fit``'s line reconstructs each cell's expressed values.

    Columns: ``n_genes``; ``r_squared`` = 1 − Σ(y − ŷ)² / Σ(y − ȳ)² over the cell's expressed
    genes (NaN when they all have one value); ``pearson_r`` of y and ŷ (NaN likewise);
    ``mean_abs_error``.
    """
    y = np.asarray(log_expression, dtype=np.float64)
    y_hat = fit.predict(log_rank)
    n = np.diff(indptr)
    cell = np.repeat(np.arange(len(n)), n)

    def total(v: np.ndarray) -> np.ndarray:
        return np.bincount(cell, weights=v, minlength=len(n))

    with np.errstate(invalid="ignore", divide="ignore"):
        mean_y, mean_h = total(y) / n, total(y_hat) / n
        dy, dh = y - mean_y[cell], y_hat - mean_h[cell]
        ss_tot, ss_hat, cross = total(dy * dy), total(dh * dh), total(dy * dh)
        ss_res = total((y - y_hat) ** 2)
        constant = ss_tot <= 1e-12 * np.maximum(total(y * y), 1e-300)
        r2 = np.where(constant, np.nan, 1.0 - ss_res / ss_tot)
        pearson = np.where(constant | (ss_hat <= 0), np.nan, cross / np.sqrt(ss_tot * ss_hat))
        mae = total(np.abs(y - y_hat)) / n
    return pd.DataFrame({"n_genes": n.astype(np.int64), "r_squared": r2, "pearson_r": pearson,
                         "mean_abs_error": mae})
