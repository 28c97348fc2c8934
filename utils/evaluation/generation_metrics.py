"""Generated cells against real ones: k-NN accuracy, MMD and energy distance, each next to real cells'."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from utils.cli import InputError
from utils.contract import sample_rows
from utils.evaluation.metrics import (
    dense,
    embed_pca,
    knn_accuracy,
    majority_baseline,
    normalize_label,
    normalized,
    sentence_stats,
    spellings,
)
from utils.inverse import SentenceBytes, VocabIndex, sentences_to_expression
from utils.transform.fit import RankExpressionFit

# Rows of X per block of pairwise distances: block × len(Y) doubles stay a few MB.
_BLOCK = 1024


def _sq_dists(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    d = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * A @ B.T
    return np.maximum(d, 0.0)  # rounding can make tiny distances negative


def median_heuristic(X: np.ndarray, *, max_points: int = 2000, seed: int = 0) -> float:
    """Median pairwise distance among (at most ``max_points``) rows of ``X``; 1.0 if all coincide.

    >>> median_heuristic(np.array([[0.0], [1.0], [3.0]]))
    2.0
    """
    X = dense(X)
    X = X[sample_rows(len(X), max_points, seed)]
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


def distribution_distances(X: np.ndarray, Y: np.ndarray, *, bandwidth: float | None = None) -> dict[str, float]:
    """MMD² (RBF kernel, ``bandwidth`` default the median heuristic) and energy distance between the rows
    of ``X`` and ``Y`` (V-statistics: identical sets give exactly 0); NaN when a set is empty.

    >>> a = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    >>> distribution_distances(a, a)
    {'mmd': 0.0, 'energy_distance': 0.0, 'bandwidth': 2.0}
    """
    X, Y = dense(X), dense(Y)
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


@dataclass
class GenerationEvaluation:
    """The metrics, and the real (``--split``) and generated cells in the PCA of the training cells."""

    metrics: dict[str, Any]
    real_coords: np.ndarray
    generated_coords: np.ndarray
    real_labels: list[str] = field(default_factory=list)
    generated_labels: list[str] = field(default_factory=list)


def _matched_sample(labels: np.ndarray, wanted: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    """Indices drawn without replacement: ``wanted[t]`` cells of each type (all it has if fewer)."""
    picked = []
    for t, n in sorted(wanted.items()):
        pool = np.flatnonzero(labels == t)
        picked.append(np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False)))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def evaluate_generation(
    generated_X: sp.spmatrix | np.ndarray, generated_labels: Sequence[str],
    train_X: sp.spmatrix | np.ndarray, train_labels: Sequence[str],
    real_X: sp.spmatrix | np.ndarray, real_labels: Sequence[str],
    *, k: int = 5, n_components: int = 50, max_cells: int = 5000, seed: int = 0,
) -> GenerationEvaluation:
    """Generated cells (labels: the requested types) against held-out ``real_*`` cells: k-NN accuracy and
    PCA fitted on ``train_*``, MMD and energy distance in the PCA, each next to real cells' (``*_ceiling``,
    ``*_floor``), also ``per_type``; sets above ``max_cells`` are subsampled."""
    rng = np.random.default_rng(seed)
    gen_y, train_y, real_y = normalized(generated_labels), normalized(train_labels), normalized(real_labels)
    spelled = spellings([*train_labels, *real_labels, *generated_labels])

    knn_gen = knn_accuracy(train_X, train_labels, generated_X, generated_labels, k=k)
    knn_real = knn_accuracy(train_X, train_labels, real_X, real_labels, k=k)
    train_pc, real_pc, gen_pc = embed_pca(train_X, real_X, generated_X, n_components=n_components, seed=seed)
    bandwidth = median_heuristic(real_pc, seed=seed) if len(real_pc) > 1 else 1.0

    def distances(gen_rows: np.ndarray, real_rows: np.ndarray) -> dict[str, float]:
        gen_rows = gen_rows[sample_rows(len(gen_rows), max_cells, rng)]
        real_rows = real_rows[sample_rows(len(real_rows), max_cells, rng)]
        wanted = dict(zip(*np.unique(gen_y[gen_rows], return_counts=True), strict=True))
        floor_rows = _matched_sample(train_y, {str(t): int(n) for t, n in wanted.items()}, rng)
        if len(gen_rows) < 2 or len(real_rows) < 2:
            nan = float("nan")
            return {"mmd": nan, "mmd_floor": nan, "energy_distance": nan, "energy_distance_floor": nan}
        got = distribution_distances(gen_pc[gen_rows], real_pc[real_rows], bandwidth=bandwidth)
        floor = distribution_distances(train_pc[floor_rows], real_pc[real_rows], bandwidth=bandwidth)
        return {"mmd": got["mmd"], "mmd_floor": floor["mmd"], "energy_distance": got["energy_distance"],
                "energy_distance_floor": floor["energy_distance"]}

    gen_pred, real_pred = normalized(knn_gen["predicted"]), normalized(knn_real["predicted"])
    per_type: dict[str, Any] = {}
    for t in sorted(set(gen_y)):
        g, r = np.flatnonzero(gen_y == t), np.flatnonzero(real_y == t)
        per_type[spelled[t]] = {
            "n_generated": int(len(g)), "n_real": int(len(r)),
            "knn_accuracy": float(np.mean(gen_pred[g] == t)) if len(g) and len(gen_pred) else float("nan"),
            "knn_ceiling": float(np.mean(real_pred[r] == t)) if len(r) and len(real_pred) else float("nan"),
            **distances(g, r),
        }
    metrics: dict[str, Any] = {
        "knn_accuracy": knn_gen["accuracy"], "knn_ceiling": knn_real["accuracy"],
        "majority_baseline": majority_baseline(list(train_labels), list(generated_labels))["accuracy"],
        "k": knn_gen["k"], **distances(np.arange(len(gen_y)), np.arange(len(real_y))), "bandwidth": bandwidth,
        "n_components": int(train_pc.shape[1]), "n_real_train": int(train_X.shape[0]),
        "n_real_eval": int(real_X.shape[0]), "n_generated": int(generated_X.shape[0]), "per_type": per_type,
    }
    return GenerationEvaluation(metrics, real_pc, gen_pc, [str(y) for y in real_labels],
                                [str(y) for y in generated_labels])


def real_expression(tables: dict[str, Any], *, split: str, index: VocabIndex, fit: RankExpressionFit, top_k: int,
                    case_insensitive: bool = False) -> dict[str, sp.csr_matrix]:
    """The ``train`` and ``split`` cells of ``tables`` as generated ones: the inverse of their first ``top_k`` genes."""
    return {name: sentences_to_expression(tables[name].column("cell_sentence"), index, fit,
                                          case_insensitive=case_insensitive, max_words=top_k).X
            for name in dict.fromkeys(("train", split))}


def score_generated(
    sentences: Sequence[str] | SentenceBytes, requested: Sequence[str], tables: dict[str, Any], *, split: str,
    label_column: str, index: VocabIndex, fit: RankExpressionFit, top_k: int, k: int = 5, seed: int = 0,
    cell_types: Sequence[str] | None = None, groups: Sequence[str] | None = None,
    cells_per_group: int | None = None,
) -> tuple[dict[str, Any], GenerationEvaluation]:
    """:func:`sentence_stats` of generated sentences and :func:`evaluate_generation` of their first ``top_k`` genes
    against the real cells of ``tables`` (``cell_types``: of these types only); ``groups`` (each cell's group):
    also :func:`group_scores`, real groups of ``cells_per_group`` cells (default: the largest generated group)."""
    if groups is not None and cell_types is None:
        cell_types = sorted(set(map(str, requested)))
    if cell_types is not None:
        wanted = {normalize_label(t) for t in cell_types}
        tables = {name: table.filter(pa.array([normalize_label(x) in wanted for x in table.column(label_column)
                                               .to_pylist()], type=pa.bool_())) for name, table in tables.items()}
        if tables["train"].num_rows == 0:
            raise InputError(f"The train split has no cells of {', '.join(map(repr, cell_types))}, needed "
                             "for the k-NN metric and the PCA; choose types of the training data.")
    everything = sentences_to_expression(sentences, index, fit)
    generated = sentences_to_expression(sentences, index, fit, max_words=top_k)
    real = real_expression(tables, split=split, index=index, fit=fit, top_k=top_k)
    result = evaluate_generation(generated.X, [str(y) for y in requested], real["train"],
                                 tables["train"].column(label_column).to_pylist(), real[split],
                                 tables[split].column(label_column).to_pylist(), k=k, seed=seed)
    metrics = {"sentences": sentence_stats(everything), **result.metrics, "top_k_genes": int(top_k)}
    if cell_types is not None:
        metrics["cell_types"] = list(cell_types)
    if groups is not None:
        size = cells_per_group or int(np.unique(np.asarray(groups), return_counts=True)[1].max())
        metrics["groups"] = group_scores(generated.X, groups, requested, real, tables, split=split,
                                         label_column=label_column, cells_per_group=size, k=k, seed=seed)
    return metrics, result


def group_scores(generated_X: Any, groups: Sequence[str], requested: Sequence[str], real: dict[str, Any],
                 tables: dict[str, Any], *, split: str, label_column: str, cells_per_group: int, k: int = 5,
                 seed: int = 0) -> dict[str, Any]:
    """Each generated group's mean expression classified by k-NN among the real training groups (full groups
    of ``partition_groups``, as predict.py groups cells); ``group_knn_ceiling``: the same for ``split``'s."""
    from utils.models.multi_cell import partition_groups

    def profiles(X: Any, members: list[np.ndarray]) -> np.ndarray:
        return np.vstack([np.asarray(X[m].mean(axis=0)).ravel() for m in members]) if members else np.zeros((0, 0))

    gen_ids = list(dict.fromkeys(groups))
    gen_members = [np.flatnonzero(np.asarray(groups) == g) for g in gen_ids]
    gen_labels = [str(requested[m[0]]) for m in gen_members]
    real_labels = {name: tables[name].column(label_column).to_pylist() for name in ("train", split)}
    real_members = {name: [np.asarray(rows) for _, rows in partition_groups(
        y, len(y), cells_per_example=cells_per_group, seed=seed) if len(rows) == cells_per_group]
        for name, y in real_labels.items()}
    group_labels = {name: [str(real_labels[name][m[0]]) for m in real_members[name]] for name in real_members}
    train = profiles(real["train"], real_members["train"])
    knn_gen = knn_accuracy(train, group_labels["train"], profiles(generated_X, gen_members), gen_labels, k=k)
    knn_real = knn_accuracy(train, group_labels["train"], profiles(real[split], real_members[split]),
                            group_labels[split], k=k)
    return {"group_knn_accuracy": knn_gen["accuracy"], "group_knn_ceiling": knn_real["accuracy"],
            "group_majority_baseline": majority_baseline(group_labels["train"], gen_labels)["accuracy"],
            "group_k": knn_gen["k"], "cells_per_group": int(cells_per_group), "n_generated_groups": len(gen_ids),
            "n_real_train_groups": len(real_members["train"]), "n_real_eval_groups": len(real_members[split])}
