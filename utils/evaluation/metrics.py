"""The evaluations' metrics: labels (compared normalized), generated words, k-NN, PCA, embeddings,
the rank-to-expression reconstruction."""

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


def normalized(labels: Sequence[Any]) -> np.ndarray:
    """The labels normalized (:func:`normalize_label`), as an object array."""
    return np.array([normalize_label(x) for x in labels], dtype=object)


def spellings(labels: Sequence[Any]) -> dict[str, str]:
    """Each normalized label's spelling in ``labels`` (the last one given)."""
    return {normalize_label(x): str(x) for x in labels}


def majority_baseline(train_labels: Sequence[str], eval_labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy of always answering the most frequent training label (ties: first by name).

    >>> majority_baseline(["a", "b", "b"], ["b", "a", "b", "c"])
    {'label': 'b', 'accuracy': 0.5}
    """
    if len(train_labels) == 0:
        return {"label": None, "accuracy": float("nan")}
    counts = pd.Series(normalized(train_labels)).value_counts()
    best = sorted(counts[counts == counts.max()].index)[0]
    hits = [normalize_label(y) == best for y in eval_labels]
    return {"label": spellings(train_labels)[best], "accuracy": float(np.mean(hits)) if hits else float("nan")}


def classification_summary(true: Sequence[str], predicted: Sequence[str], *,
                           train_labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class scores and the majority baseline (of ``train_labels``).

    >>> s = classification_summary(["B cell", "T cell"], ["b cell ", "NK"])
    >>> s["accuracy"], s["n_cells"], s["n_correct"], s["macro_f1"]
    (0.5, 2, 1, 0.5)
    """
    from sklearn.metrics import precision_recall_fscore_support

    t, p = normalized(true), normalized(predicted)
    if len(t) != len(p):
        raise ValueError(f"{len(t)} true labels but {len(p)} predictions.")
    correct = t == p
    names = spellings(true)
    classes = sorted(set(t))
    per_class: dict[str, dict[str, float]] = {}
    balanced = macro_f1 = float("nan")
    if classes:
        precision, recall, f1, support = precision_recall_fscore_support(t, p, labels=classes, zero_division=0.0)
        balanced, macro_f1 = float(np.mean(recall)), float(np.mean(f1))
        for i, label in enumerate(classes):
            per_class[names[label]] = {"precision": float(precision[i]), "recall": float(recall[i]),
                                       "f1": float(f1[i]), "support": int(support[i])}
    baseline = majority_baseline(list(train_labels) if train_labels is not None else list(true), true)
    known = set(t) | (set(normalized(train_labels)) if train_labels is not None else set())
    return {
        "n_cells": int(len(t)), "n_correct": int(correct.sum()),
        "accuracy": float(correct.mean()) if len(t) else float("nan"),
        "balanced_accuracy": balanced, "macro_f1": macro_f1,
        "majority_baseline": baseline["accuracy"], "majority_label": baseline["label"],
        "per_class_accuracy": {name: v["recall"] for name, v in per_class.items()}, "per_class": per_class,
        "fraction_unknown_label": float(np.mean([x not in known for x in p])) if len(p) else 0.0,
    }


def sentence_stats(result: InverseResult) -> dict[str, float]:
    """Word-level quality of (generated) sentences from the inverse transform's counts (rates per word)."""
    words, n = int(result.n_words.sum()), len(result.n_words)
    valid = words - int(result.n_invalid_genes.sum())
    return {
        "n_cells": n, "n_words": words,
        "valid_gene_rate": valid / words if words else float("nan"),
        "duplicate_rate": int(result.n_duplicate_genes.sum()) / words if words else float("nan"),
        "invalid_rate": int(result.n_invalid_genes.sum()) / words if words else float("nan"),
        "mean_sentence_length": float(result.n_words.mean()) if n else float("nan"),
        "mean_n_genes": float(result.n_genes.mean()) if n else float("nan"),
        "fraction_empty": float((result.n_genes == 0).mean()) if n else float("nan"),
    }


def _knn_predict(X_fit: Any, y_fit: np.ndarray, X_query: Any, k: int) -> np.ndarray:
    """The majority label (ties: first by name) of each ``X_query`` row's ``k`` nearest ``X_fit`` rows (None: LOO)."""
    from sklearn.neighbors import NearestNeighbors

    loo = X_query is None
    classes, codes = np.unique(y_fit, return_inverse=True)
    search = NearestNeighbors(n_neighbors=k + loo, algorithm="auto" if loo else "brute").fit(X_fit)
    _, neighbours = search.kneighbors(X_fit if loo else X_query)
    n = len(neighbours)
    if loo:
        # Drop each cell itself (by index: duplicated points may list another copy first).
        is_self = neighbours == np.arange(n)[:, None]
        is_self[~is_self.any(axis=1), -1] = True
        neighbours = neighbours[~is_self].reshape(n, k)
    votes = np.zeros((n, len(classes)), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(n), k), codes[neighbours].ravel()), 1)
    return classes[votes.argmax(axis=1)]


def knn_accuracy(X_train: sp.spmatrix | np.ndarray, y_train: Sequence[str], X_eval: sp.spmatrix | np.ndarray,
                 y_eval: Sequence[str], *, k: int = 5) -> dict[str, Any]:
    """k-NN fitted on ``X_train``, scored on ``X_eval``: accuracy, the k used and the predicted labels."""
    if X_train.shape[0] == 0 or X_eval.shape[0] == 0:
        return {"accuracy": float("nan"), "k": 0, "predicted": []}
    k_used = int(min(k, X_train.shape[0]))
    predicted = _knn_predict(X_train, normalized(y_train), X_eval, k_used)
    spelled = spellings(y_train)
    return {"accuracy": float(np.mean(predicted == normalized(y_eval))), "k": k_used,
            "predicted": [spelled[p] for p in predicted]}


def knn_loo_accuracy(X: np.ndarray, labels: Sequence[str], *, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy: each cell's type by the vote of its ``k`` nearest other cells.

    >>> X = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    >>> knn_loo_accuracy(X, ["a", "a", "a", "b", "b", "b"], k=2)
    1.0
    """
    y = normalized(labels)
    if len(y) < 2:
        return float("nan")
    return float(np.mean(_knn_predict(dense(X), y, None, int(min(k, len(y) - 1))) == y))


def embed_pca(X_fit: sp.spmatrix | np.ndarray, *others: sp.spmatrix | np.ndarray, n_components: int = 2,
              seed: int = 0) -> tuple[np.ndarray, ...]:
    """PCA fitted on ``X_fit``: the coordinates of ``X_fit`` followed by those of each of ``others``."""
    from sklearn.decomposition import PCA

    n_components = int(min(n_components, X_fit.shape[0], X_fit.shape[1]))
    solver = "arpack" if sp.issparse(X_fit) and n_components < min(X_fit.shape) else "full"
    if sp.issparse(X_fit) and solver == "full":
        # arpack cannot give every component; covariance_eigh only when genes are the small side.
        if X_fit.shape[0] <= X_fit.shape[1]:
            X_fit = X_fit.toarray()
        else:
            solver = "covariance_eigh"
    pca = PCA(n_components=n_components, svd_solver=solver, random_state=seed)
    fitted = np.asarray(pca.fit_transform(X_fit))
    return (fitted, *(np.asarray(pca.transform(X)) if X.shape[0] else np.zeros((0, n_components))
                      for X in others))


def embedding_scores(X: np.ndarray, labels: Sequence[str], *, k: int = 5, max_silhouette: int = 5000,
                     seed: int = 0) -> dict[str, float]:
    """How well an embedding separates the types: leave-one-out ``knn_accuracy``, ``silhouette`` (on at
    most ``max_silhouette`` cells), ``ari`` and ``nmi`` of a KMeans clustering into as many clusters."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    X = dense(X)
    y = normalized(labels)
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
    """The scores (``"c2s"``, ``"pca"``) and the baseline's principal components with their labels."""

    scores: dict[str, Any]
    pca_coords: np.ndarray | None = None
    pca_labels: list[str] = field(default_factory=list)


def evaluate_embedding(X: np.ndarray, labels: Sequence[str], names: Sequence[str], *, expression: Any = None,
                       k: int = 5, n_components: int = 50, seed: int = 0) -> EmbeddingEvaluation:
    """:func:`embedding_scores` of ``X`` (``"c2s"``) and of the PCA of ``expression`` (``"pca"``, cells by name)."""
    scores: dict[str, Any] = {"c2s": embedding_scores(X, labels, k=k, seed=seed)}
    if expression is None:
        return EmbeddingEvaluation(scores)
    label_of = dict(zip(names, labels, strict=True))
    pca_labels = [label_of[n] for n in expression.obs_names]
    (pcs,) = embed_pca(expression.X, n_components=n_components, seed=seed)
    scores["pca"] = {**embedding_scores(pcs, pca_labels, k=k, seed=seed), "n_components": int(pcs.shape[1])}
    return EmbeddingEvaluation(scores, pcs, pca_labels)


def rank_expression_points(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every expressed value's ``log_rank`` (log10(1 + rank) in its cell), ``log_expression`` and cells' ``indptr``.

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


def per_cell_reconstruction(log_rank: np.ndarray, log_expression: np.ndarray, indptr: np.ndarray,
                            fit: RankExpressionFit) -> pd.DataFrame:
    """Per cell: ``n_genes``, ``r_squared``, ``pearson_r`` (NaN: constant values), ``mean_abs_error``."""
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
