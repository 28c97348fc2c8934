"""The metrics of the evaluations (``eval/*.py``, ``generate.py``, ``inverse.py --evaluate``).

- Distributions: MMD with an RBF kernel (bandwidth by the median heuristic) and the energy
  distance between two sets of cells in a common space (a PCA fitted on real cells).
- Generated cells: :func:`evaluate_generation` puts the k-NN metric (with the real -> real
  ceiling) and those distances (with real-vs-real as the floor, overall and per cell type)
  together.
- Embeddings: :func:`embedding_scores`: leave-one-out k-NN accuracy, silhouette, and the
  agreement (ARI, NMI) of a KMeans clustering with the labels; :func:`evaluate_embedding`: those
  of an embedding next to those of the PCA of the same cells' expression.
- Reconstruction: per-cell and overall fit of log-expression on log-rank over a whole
  preprocessed matrix (:func:`rank_expression_points`, :func:`per_cell_reconstruction`).

Functions take arrays and return numbers, frames or arrays; files are the scripts' business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from utils.common import InputError
from utils.evaluation import (
    embed_pca,
    knn_accuracy,
    majority_baseline,
    normalize_label,
    plot_embedding,
    sentence_stats,
)
from utils.fit import RankExpressionFit
from utils.inverse import SentenceBytes, VocabIndex, sentences_to_expression

__all__ = [
    "EmbeddingEvaluation",
    "GenerationEvaluation",
    "distribution_distances",
    "embedding_scores",
    "evaluate_embedding",
    "evaluate_generation",
    "knn_loo_accuracy",
    "median_heuristic",
    "per_cell_reconstruction",
    "plot_generation",
    "rank_expression_points",
    "real_expression",
    "score_expression",
    "score_generated",
    "tables_of_types",
]

# Rows of X per block of pairwise distances: block × len(Y) doubles stay a few MB.
_BLOCK = 1024


def _dense(X: sp.spmatrix | np.ndarray) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def _sq_dists(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    d = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * A @ B.T
    return np.maximum(d, 0.0)  # rounding can make tiny distances negative


def median_heuristic(X: np.ndarray, *, max_points: int = 2000, seed: int = 0) -> float:
    """Median pairwise Euclidean distance among the rows of ``X`` (a seeded subset of at most
    ``max_points`` rows), the usual bandwidth of an RBF kernel; 1.0 when all points coincide.

    >>> median_heuristic(np.array([[0.0], [1.0], [3.0]]))
    2.0
    """
    X = _dense(X)
    if len(X) > max_points:
        X = X[np.sort(np.random.default_rng(seed).choice(len(X), max_points, replace=False))]
    d = np.sqrt(_sq_dists(X, X))[np.triu_indices(len(X), k=1)]
    median = float(np.median(d)) if d.size else 0.0
    return median if median > 0 else 1.0


def _pair_means(A: np.ndarray, B: np.ndarray, gamma: float) -> tuple[float, float]:
    """Mean RBF kernel exp(-gamma·d²) and mean distance d over all pairs (a in A, b in B)."""
    k_sum = d_sum = 0.0
    for start in range(0, len(A), _BLOCK):
        d2 = _sq_dists(A[start : start + _BLOCK], B)
        k_sum += float(np.exp(-gamma * d2).sum())
        d_sum += float(np.sqrt(d2).sum())
    n = len(A) * len(B)
    return k_sum / n, d_sum / n


def distribution_distances(
    X: np.ndarray, Y: np.ndarray, *, bandwidth: float | None = None
) -> dict[str, float]:
    """MMD² (RBF kernel) and energy distance between the rows of ``X`` and of ``Y``.

    Both are the plain (V-statistic) estimates, so identical sets give exactly 0 and two
    samples of one distribution a small positive value that shrinks with their size: compare
    with the same measure between two real samples of the same sizes (the floor).
    ``mmd`` = mean k(x, x') + mean k(y, y') − 2 mean k(x, y) with
    k(a, b) = exp(−‖a − b‖² / (2·bandwidth²)); the bandwidth defaults to the median heuristic
    over both sets (pass one fixed from real cells to compare several sets fairly).
    ``energy_distance`` = sqrt(2 E‖x − y‖ − E‖x − x'‖ − E‖y − y'‖) (as scipy's, in any dimension).
    NaN when a set is empty.

    >>> a = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    >>> distribution_distances(a, a)
    {'mmd': 0.0, 'energy_distance': 0.0, 'bandwidth': 2.0}
    """
    X, Y = _dense(X), _dense(Y)
    if bandwidth is None:
        bandwidth = median_heuristic(np.vstack([X, Y])) if len(X) + len(Y) > 1 else 1.0
    if len(X) == 0 or len(Y) == 0:
        return {"mmd": float("nan"), "energy_distance": float("nan"), "bandwidth": float(bandwidth)}
    gamma = 1.0 / (2.0 * float(bandwidth) ** 2)
    kxx, dxx = _pair_means(X, X, gamma)
    kyy, dyy = _pair_means(Y, Y, gamma)
    kxy, dxy = _pair_means(X, Y, gamma)
    # Equal sets cancel only up to rounding; round to the 12th digit so they give 0 exactly.
    mmd = round(max(kxx + kyy - 2.0 * kxy, 0.0), 12)
    energy = float(np.sqrt(round(max(2.0 * dxy - dxx - dyy, 0.0), 12)))
    return {"mmd": float(mmd), "energy_distance": energy, "bandwidth": float(bandwidth)}


# ------------------------------------------------------------------------------ generation


@dataclass
class GenerationEvaluation:
    """What :func:`evaluate_generation` returns: the metrics, and the real (``--split``) and
    generated cells in the PCA space fitted on the real training cells (for a figure)."""

    metrics: dict[str, Any]
    real_coords: np.ndarray
    generated_coords: np.ndarray
    real_labels: list[str] = field(default_factory=list)
    generated_labels: list[str] = field(default_factory=list)


def _matched_sample(
    labels: np.ndarray, wanted: dict[str, int], rng: np.random.Generator
) -> np.ndarray:
    """Indices drawn without replacement: ``wanted[t]`` cells of each type (all it has if fewer)."""
    picked = []
    for t, n in sorted(wanted.items()):
        pool = np.flatnonzero(labels == t)
        picked.append(np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False)))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _cap(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, size=cap, replace=False))


def evaluate_generation(
    generated_X: sp.spmatrix | np.ndarray,
    generated_labels: Sequence[str],
    train_X: sp.spmatrix | np.ndarray,
    train_labels: Sequence[str],
    real_X: sp.spmatrix | np.ndarray,
    real_labels: Sequence[str],
    *,
    k: int = 5,
    n_components: int = 50,
    max_cells: int = 5000,
    seed: int = 0,
) -> GenerationEvaluation:
    """Score generated cells against real ones, each score next to what real cells reach.

    All three matrices are cells × the same genes in one representation (the inverse
    transform of each cell's first K genes). ``train_*`` are real cells the model saw (the
    k-NN classifier and the PCA are fitted on them), ``real_*`` held-out real cells (the
    ``--split``), ``generated_labels`` the requested types.

    - ``knn_accuracy``: a k-NN classifier fitted on the training cells predicts each
      generated cell's type; agreement with the requested type. ``knn_ceiling``: the same
      classifier on the held-out real cells. ``majority_baseline``: always the most frequent
      training type.
    - ``mmd`` and ``energy_distance`` between generated and held-out real cells in the first
      ``n_components`` principal components of the training cells; ``mmd_floor`` and
      ``energy_distance_floor``: the same between training cells (drawn to match the
      generated cells' type counts) and the held-out real cells, i.e. what a perfect generator
      would score at these sample sizes. The RBF bandwidth is the median heuristic over the
      held-out real cells, the same for every comparison.
    - ``per_type``: all of the above per requested type (distances need 2 cells on each side).

    Sets larger than ``max_cells`` are subsampled (seeded) for the distances.
    """
    rng = np.random.default_rng(seed)
    gen_y = np.array([normalize_label(y) for y in generated_labels], dtype=object)
    train_y = np.array([normalize_label(y) for y in train_labels], dtype=object)
    real_y = np.array([normalize_label(y) for y in real_labels], dtype=object)
    spelled = {normalize_label(y): str(y) for y in [*train_labels, *real_labels, *generated_labels]}

    knn_gen = knn_accuracy(train_X, train_labels, generated_X, generated_labels, k=k)
    knn_real = knn_accuracy(train_X, train_labels, real_X, real_labels, k=k)
    train_pc, real_pc, gen_pc = embed_pca(train_X, real_X, generated_X, n_components=n_components,
                                          seed=seed)
    bandwidth = median_heuristic(real_pc, seed=seed) if len(real_pc) > 1 else 1.0

    def distances(gen_rows: np.ndarray, real_rows: np.ndarray) -> dict[str, float]:
        gen_rows = gen_rows[_cap(len(gen_rows), max_cells, rng)]
        real_rows = real_rows[_cap(len(real_rows), max_cells, rng)]
        wanted = dict(zip(*np.unique(gen_y[gen_rows], return_counts=True), strict=True))
        floor_rows = _matched_sample(train_y, {str(t): int(n) for t, n in wanted.items()}, rng)
        if len(gen_rows) < 2 or len(real_rows) < 2:
            nan = float("nan")
            return {"mmd": nan, "mmd_floor": nan, "energy_distance": nan, "energy_distance_floor": nan}
        got = distribution_distances(gen_pc[gen_rows], real_pc[real_rows], bandwidth=bandwidth)
        floor = distribution_distances(train_pc[floor_rows], real_pc[real_rows], bandwidth=bandwidth)
        return {"mmd": got["mmd"], "mmd_floor": floor["mmd"], "energy_distance": got["energy_distance"],
                "energy_distance_floor": floor["energy_distance"]}

    gen_pred = np.array([normalize_label(p) for p in knn_gen["predicted"]], dtype=object)
    real_pred = np.array([normalize_label(p) for p in knn_real["predicted"]], dtype=object)
    per_type: dict[str, Any] = {}
    for t in sorted(set(gen_y)):
        g, r = np.flatnonzero(gen_y == t), np.flatnonzero(real_y == t)
        per_type[spelled[t]] = {
            "n_generated": int(len(g)),
            "n_real": int(len(r)),
            "knn_accuracy": float(np.mean(gen_pred[g] == t)) if len(g) and len(gen_pred) else float("nan"),
            "knn_ceiling": float(np.mean(real_pred[r] == t)) if len(r) and len(real_pred) else float("nan"),
            **distances(g, r),
        }
    metrics: dict[str, Any] = {
        "knn_accuracy": knn_gen["accuracy"],
        "knn_ceiling": knn_real["accuracy"],
        "majority_baseline": majority_baseline(list(train_labels), list(generated_labels))["accuracy"],
        "k": knn_gen["k"],
        **distances(np.arange(len(gen_y)), np.arange(len(real_y))),
        "bandwidth": bandwidth,
        "n_components": int(train_pc.shape[1]),
        "n_real_train": int(train_X.shape[0]),
        "n_real_eval": int(real_X.shape[0]),
        "n_generated": int(generated_X.shape[0]),
        "per_type": per_type,
    }
    return GenerationEvaluation(
        metrics=metrics,
        real_coords=real_pc,
        generated_coords=gen_pc,
        real_labels=[str(y) for y in real_labels],
        generated_labels=[str(y) for y in generated_labels],
    )


def real_expression(
    tables: dict[str, Any],
    *,
    split: str,
    index: VocabIndex,
    fit: RankExpressionFit,
    top_k: int,
    case_insensitive: bool = False,
) -> dict[str, sp.csr_matrix]:
    """The real cells of ``tables`` (Arrow tables of the ``train`` split and of ``split``, as
    ``utils.eval_io.load_splits`` gives) in the representation of generated cells: the inverse
    transform of each cell's first ``top_k`` genes, by split name. Built once, it serves every
    set of generated cells scored against them (:func:`score_expression`)."""
    return {name: sentences_to_expression(tables[name].column("cell_sentence"), index, fit,
                                          case_insensitive=case_insensitive, max_words=top_k).X
            for name in dict.fromkeys(("train", split))}


def score_expression(
    generated_X: sp.spmatrix | np.ndarray,
    requested: Sequence[str],
    tables: dict[str, Any],
    real: dict[str, sp.spmatrix],
    *,
    split: str,
    label_column: str,
    top_k: int,
    k: int = 5,
    seed: int = 0,
) -> GenerationEvaluation:
    """:func:`evaluate_generation` of generated cells (already in the representation of
    :func:`real_expression`, whose ``real`` it takes) against the real cells of ``tables``,
    labelled by their ``label_column``; the metrics record ``top_k_genes``."""
    result = evaluate_generation(
        generated_X, [str(y) for y in requested],
        real["train"], tables["train"].column(label_column).to_pylist(),
        real[split], tables[split].column(label_column).to_pylist(),
        k=k, seed=seed,
    )
    result.metrics["top_k_genes"] = int(top_k)
    return result


def tables_of_types(tables: dict[str, Any], label_column: str, cell_types: Sequence[str]) -> dict[str, Any]:
    """The Arrow tables with only the cells whose ``label_column`` is one of ``cell_types``
    (compared normalized, as every label here)."""
    import pyarrow as pa

    wanted = {normalize_label(t) for t in cell_types}
    return {name: table.filter(pa.array([normalize_label(x) in wanted for x in
                                         table.column(label_column).to_pylist()], type=pa.bool_()))
            for name, table in tables.items()}


def score_generated(
    sentences: Sequence[str] | SentenceBytes,
    requested: Sequence[str],
    tables: dict[str, Any],
    *,
    split: str,
    label_column: str,
    index: VocabIndex,
    fit: RankExpressionFit,
    top_k: int,
    k: int = 5,
    seed: int = 0,
    cell_types: Sequence[str] | None = None,
) -> tuple[dict[str, Any], GenerationEvaluation]:
    """Generated sentences (with their requested types) against the real cells of ``tables``
    (Arrow tables of the ``train`` split and of ``split``, as ``utils.eval_io.load_splits``
    gives): the word statistics of every generated word (``sentence_stats``) under
    ``"sentences"``, and :func:`score_expression` on the first ``top_k`` genes of every
    cell, real and generated alike (the same representation).

    ``cell_types``: the types that were asked for (e.g. generate.py's ``--cell_types``); the
    real cells are then those of these types only, in both splits, so that the k-NN classifier,
    its ceiling, the majority baseline and the distance floors answer the question that was
    asked (against the whole split the majority type may be one never generated: baseline 0).
    The metrics record them under ``"cell_types"``.
    """
    if cell_types is not None:
        tables = tables_of_types(tables, label_column, cell_types)
        if tables["train"].num_rows == 0:
            raise InputError(f"The train split has no cells of {', '.join(map(repr, cell_types))}, needed "
                             "for the k-NN metric and the PCA; choose types of the training data.")
    everything = sentences_to_expression(sentences, index, fit)
    generated = sentences_to_expression(sentences, index, fit, max_words=top_k)
    real = real_expression(tables, split=split, index=index, fit=fit, top_k=top_k)
    result = score_expression(generated.X, requested, tables, real, split=split, label_column=label_column,
                              top_k=top_k, k=k, seed=seed)
    metrics = {"sentences": sentence_stats(everything), **result.metrics}
    if cell_types is not None:
        metrics["cell_types"] = list(cell_types)
    return metrics, result


def plot_generation(result: GenerationEvaluation, *, split: str, top_k: int):
    """Real ``split`` cells and generated cells in the first two principal components of the
    real training cells (``None`` when there are too few cells for two components)."""
    if result.real_coords.shape[0] < 3 or result.real_coords.shape[1] < 2:
        return None
    return plot_embedding(result.real_coords, result.real_labels, result.generated_coords,
                          result.generated_labels,
                          title=f"Real ({split}) and generated cells: PCA of real training cells, "
                                f"top-{top_k} reconstruction")


# ------------------------------------------------------------------------------ embeddings


def knn_loo_accuracy(X: np.ndarray, labels: Sequence[str], *, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy: each cell's type by majority vote of its ``k`` nearest
    other cells (Euclidean; ties go to the first type by name, as scikit-learn's classifier).

    >>> X = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    >>> knn_loo_accuracy(X, ["a", "a", "a", "b", "b", "b"], k=2)
    1.0
    """
    from sklearn.neighbors import NearestNeighbors

    X = _dense(X)
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

    X = _dense(X)
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


# -------------------------------------------------------------------------- reconstruction


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
