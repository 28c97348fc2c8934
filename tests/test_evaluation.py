"""utils/evaluation/ (metrics, figures): label metrics, word statistics, the k-NN metric, figures."""

from __future__ import annotations

import doctest
import random

import numpy as np
import pytest

import utils.evaluation.figures
import utils.evaluation.metrics
import utils.inverse
import utils.models.generation
from utils.evaluation.figures import plot_confusion_matrix, plot_embedding
from utils.evaluation.metrics import (
    classification_summary,
    embed_pca,
    knn_accuracy,
    majority_baseline,
    normalize_label,
    sentence_stats,
)
from utils.inverse import sentences_to_expression
from utils.transform.fit import RankExpressionFit


@pytest.mark.parametrize("module", [utils.evaluation.metrics, utils.evaluation.figures, utils.models.generation, utils.inverse])
def test_doctests(module) -> None:
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


def test_labels_and_baseline() -> None:
    assert normalize_label(" NK\tcell ") == "nk cell"
    summary = classification_summary(
        ["B cell", "B cell", "T cell", "NK"], ["b cell", "T cell", " t CELL ", "monocyte"],
        train_labels=["T cell", "T cell", "B cell"],
    )
    assert summary["accuracy"] == 0.5 and summary["n_correct"] == 2
    assert summary["majority_label"] == "T cell" and summary["majority_baseline"] == 0.25
    assert summary["per_class_accuracy"] == {"B cell": 0.5, "NK": 0.0, "T cell": 1.0}
    assert summary["fraction_unknown_label"] == 0.25
    assert majority_baseline(["x", "y"], ["x", "y", "y"]) == {"label": "x", "accuracy": pytest.approx(1 / 3)}


def test_sentence_stats_values() -> None:
    res = sentences_to_expression(["A B A", "junk A", ""], ["A", "B"], RankExpressionFit(-1.0, 2.0))
    stats = sentence_stats(res)
    assert stats["n_words"] == 5
    assert stats["valid_gene_rate"] == pytest.approx(4 / 5)
    assert stats["duplicate_rate"] == pytest.approx(1 / 5)
    assert stats["mean_sentence_length"] == pytest.approx(5 / 3)
    assert stats["fraction_empty"] == pytest.approx(1 / 3)


def typed_sentences(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """Four types, each with its own 8 marker genes ranked first, then shared background."""
    rng = random.Random(seed)
    types = ["alpha", "beta", "gamma", "delta"]
    markers = {t: [f"{t.upper()}{i}" for i in range(8)] for t in types}
    background = [f"BG{i}" for i in range(200)]
    sentences, labels = [], []
    for i in range(n):
        t = types[i % 4]
        top = markers[t][:]
        rng.shuffle(top)
        sentences.append(" ".join(top + rng.sample(background, 30)))
        labels.append(t)
    vocab = [g for t in types for g in markers[t]] + background
    return sentences, labels, vocab


def test_knn_metric_separates_types_and_not_shuffled_labels() -> None:
    fit = RankExpressionFit(-0.8, 2.5)
    train_s, train_y, vocab = typed_sentences(120, seed=0)
    test_s, test_y, _ = typed_sentences(40, seed=1)
    X_train = sentences_to_expression(train_s, vocab, fit, max_words=20).X
    X_test = sentences_to_expression(test_s, vocab, fit, max_words=20).X
    ceiling = knn_accuracy(X_train, train_y, X_test, test_y, k=5)
    assert ceiling["accuracy"] == 1.0 and ceiling["k"] == 5
    # "Generated" cells that copy real cells of the requested type score like real ones.
    copies = knn_accuracy(X_train, train_y, X_test, [y.upper() for y in test_y], k=5)
    assert copies["accuracy"] == 1.0
    assert copies["predicted"][:2] == test_y[:2]  # spelled as in the training labels
    shuffled = test_y[:]
    random.Random(3).shuffle(shuffled)
    chance = knn_accuracy(X_train, train_y, X_test, shuffled, k=5)["accuracy"]
    expected = float(np.mean(np.array(shuffled) == np.array(test_y)))
    assert chance == pytest.approx(expected) and chance < 0.5
    assert knn_accuracy(X_train[:3], train_y[:3], X_test, test_y, k=5)["k"] == 3


def test_figures() -> None:
    fig = plot_confusion_matrix(["a", "b", "b"], ["a", "b", "zzz"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "(other)"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    train_s, train_y, vocab = typed_sentences(40, seed=0)
    X = sentences_to_expression(train_s, vocab, RankExpressionFit(-0.8, 2.5)).X
    a, b = embed_pca(X, X[:5])
    assert a.shape == (40, 2) and b.shape == (5, 2)
    np.testing.assert_allclose(a[:5], b, rtol=1e-5, atol=1e-5)  # float32 PCA
    fig = plot_embedding(a, train_y, b, train_y[:5])
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "alpha (real)" in labels and "alpha (generated)" in labels


def test_pca_of_fewer_cells_than_components_is_sized_by_the_cells() -> None:
    """All components of few sparse cells (embed.py --max_cells 40 of 25,000 genes) are a dense
    SVD of the cells' rows, not an eigendecomposition of genes × genes (168 s and 4.9 GB)."""
    import tracemalloc

    import scipy.sparse as sp
    from sklearn.decomposition import PCA

    X = sp.random(12, 1500, density=0.05, random_state=1, format="csr")
    Y = sp.random(4, 1500, density=0.05, random_state=2, format="csr")
    tracemalloc.start()
    try:
        fitted, other = embed_pca(X, Y, n_components=50, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fitted.shape == (12, 12) and other.shape == (4, 12)
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB: a genes × genes matrix (18 MiB) was made"
    # The same coordinates as sklearn's dense PCA (up to each component's sign; the 12th, of a
    # centred rank-11 matrix, is noise).
    ref = PCA(n_components=12, svd_solver="full").fit(X.toarray())
    expected = ref.transform(X.toarray())[:, :11], ref.transform(Y.toarray())[:, :11]
    sign = np.sign((fitted[:, :11] * expected[0]).sum(axis=0))
    np.testing.assert_allclose(fitted[:, :11], expected[0] * sign, atol=1e-9)
    np.testing.assert_allclose(other[:, :11], expected[1] * sign, atol=1e-9)
