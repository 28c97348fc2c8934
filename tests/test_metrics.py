"""utils/evaluation/generation_metrics.py and utils/evaluation/metrics.py: values known by construction or
from scipy / scikit-learn."""

from __future__ import annotations

import doctest
import random

import numpy as np
import pytest
import scipy.sparse as sp
from test_evaluation import typed_sentences

import utils.evaluation.generation_metrics
import utils.transform.fit
from utils.evaluation.figures import _colour_distance, distinct_colours
from utils.evaluation.generation_metrics import (
    distribution_distances,
    evaluate_generation,
    median_heuristic,
)
from utils.evaluation.metrics import (
    classification_summary,
    embedding_scores,
    knn_loo_accuracy,
    per_cell_reconstruction,
    rank_expression_points,
)
from utils.inverse import sentences_to_expression
from utils.transform.fit import RankExpressionFit

FIT = RankExpressionFit(-0.8, 2.5)


@pytest.mark.parametrize("module", [utils.evaluation.generation_metrics, utils.transform.fit])
def test_doctests(module) -> None:
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


def test_distances_known_values() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    same = distribution_distances(X, X.copy())
    assert same["mmd"] == 0.0 and same["energy_distance"] == 0.0
    # One point each, bandwidth 1: 1 + 1 - 2 exp(-1/2); energy sqrt(2·1 - 0 - 0).
    one = distribution_distances(np.zeros((1, 1)), np.ones((1, 1)), bandwidth=1.0)
    assert one["mmd"] == pytest.approx(2 - 2 * np.exp(-0.5)) and one["energy_distance"] == pytest.approx(np.sqrt(2))
    # In one dimension the energy distance is scipy's.
    from scipy.stats import energy_distance

    a, b = rng.normal(size=(30, 1)), rng.normal(1.0, 2.0, size=(50, 1))
    assert distribution_distances(a, b)["energy_distance"] == pytest.approx(energy_distance(a[:, 0], b[:, 0]))
    # A shifted sample is farther than a second sample of the same distribution.
    Y, Z = rng.normal(size=(40, 3)), rng.normal(size=(40, 3)) + 2.0
    h = median_heuristic(X)
    assert distribution_distances(X, Z, bandwidth=h)["mmd"] > 5 * distribution_distances(X, Y, bandwidth=h)["mmd"]
    # Blocks of rows give the same sums as one block.
    big_a, big_b = rng.normal(size=(2500, 2)), rng.normal(size=(30, 2))
    d = big_a[:, None, :] - big_b[None, :, :]
    k = np.exp(-(d ** 2).sum(-1) / 2)
    kaa = np.exp(-((big_a[:, None, :] - big_a[None, :, :]) ** 2).sum(-1) / 2)
    expected = kaa.mean() + 1.0 * np.exp(-((big_b[:, None] - big_b[None]) ** 2).sum(-1) / 2).mean() - 2 * k.mean()
    assert distribution_distances(big_a, big_b, bandwidth=1.0)["mmd"] == pytest.approx(expected, rel=1e-9)


def _split(n: int, seed: int, top: int = 20):
    s, y, vocab = typed_sentences(n, seed=seed)
    return sentences_to_expression(s, vocab, FIT, max_words=top).X, y, vocab


def test_generation_identical_real_and_random_cells() -> None:
    train_X, train_y, vocab = _split(160, seed=0)
    real_X, real_y, _ = _split(80, seed=1)
    # "Generated" = the held-out real cells themselves: distances 0, k-NN at the ceiling.
    same = evaluate_generation(real_X, real_y, train_X, train_y, real_X, real_y, seed=0).metrics
    assert same["mmd"] == 0.0 and same["energy_distance"] == 0.0
    assert same["knn_accuracy"] == same["knn_ceiling"] == 1.0
    assert same["mmd_floor"] > 0 and same["per_type"]["alpha"]["mmd"] == 0.0
    # Another real sample of the same cells: about the floor.
    other_X, other_y, _ = _split(80, seed=2)
    real_like = evaluate_generation(other_X, other_y, train_X, train_y, real_X, real_y, seed=0).metrics
    assert real_like["knn_accuracy"] == 1.0
    assert real_like["mmd"] < 3 * real_like["mmd_floor"]
    # Random gene lists (the vocabulary, shuffled) score far worse.
    rng = random.Random(5)
    noise = [" ".join(rng.sample(vocab, 20)) for _ in range(80)]
    noise_X = sentences_to_expression(noise, vocab, FIT).X
    bad = evaluate_generation(noise_X, real_y, train_X, train_y, real_X, real_y, seed=0).metrics
    assert bad["knn_accuracy"] < 0.5 < bad["knn_ceiling"]
    assert bad["mmd"] > 3 * bad["mmd_floor"] and bad["mmd"] > 10 * real_like["mmd"]
    assert bad["energy_distance"] > 1.5 * bad["energy_distance_floor"] > 1.5 * real_like["energy_distance"]
    assert set(bad["per_type"]) == {"alpha", "beta", "gamma", "delta"}
    assert bad["per_type"]["beta"]["n_generated"] == 20 and bad["n_generated"] == 80
    # Type counts of the generated cells set those of the floor's training sample: one type only.
    one_type = [i for i, y in enumerate(real_y) if y == "gamma"]
    only = evaluate_generation(real_X[one_type], ["gamma"] * len(one_type), train_X, train_y, real_X, real_y).metrics
    assert list(only["per_type"]) == ["gamma"] and only["per_type"]["gamma"]["mmd"] == 0.0


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_against_sklearn() -> None:
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score

    true = ["B", "B", "B", "T", "T", "NK", "NK", "NK", "NK", "Mono"]
    pred = ["B", "T", "B", "T", "NK", "NK", "NK", "B", "NK", "junk"]
    s = classification_summary(true, pred)
    classes = sorted(set(true))
    assert s["macro_f1"] == pytest.approx(f1_score(true, pred, labels=classes, average="macro", zero_division=0))
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(true, pred))
    assert s["accuracy"] == pytest.approx(0.6)
    # By hand: B precision 2/3, recall 2/3; NK precision 3/4, recall 3/4; T 1/2, 1/2; Mono 0.
    assert s["per_class"]["B"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                   "f1": pytest.approx(2 / 3), "support": 3}
    assert s["macro_f1"] == pytest.approx((2 / 3 + 3 / 4 + 1 / 2 + 0) / 4)
    assert s["per_class"]["NK"]["precision"] == pytest.approx(precision_score(true, pred, labels=["NK"], average=None)[0])
    assert s["per_class_accuracy"]["T"] == pytest.approx(recall_score(true, pred, labels=["T"], average=None)[0])


def test_shuffled_labels_score_about_the_majority_baseline() -> None:
    rng = np.random.default_rng(1)
    true = list(rng.choice(["a", "b", "c", "d"], p=[0.55, 0.25, 0.1, 0.1], size=2000))
    shuffled = list(rng.permutation(true))
    s = classification_summary(true, shuffled)
    majority = classification_summary(true, ["a"] * len(true))
    # No information: chance-level balanced accuracy, like the constant answer, and no more
    # plain accuracy than always answering the majority class.
    assert majority["balanced_accuracy"] == pytest.approx(0.25)
    assert s["balanced_accuracy"] == pytest.approx(0.25, abs=0.03)
    assert s["accuracy"] < s["majority_baseline"] == pytest.approx(majority["accuracy"])
    assert s["macro_f1"] == pytest.approx(0.25, abs=0.03)


def test_knn_loo_matches_sklearn_leave_one_out() -> None:
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(2)
    X = np.vstack([rng.normal(0, 1, (30, 4)), rng.normal(1.2, 1, (30, 4))])
    y = np.array(["x"] * 30 + ["y"] * 30)
    predicted = cross_val_predict(KNeighborsClassifier(n_neighbors=5), X, y, cv=LeaveOneOut())
    assert knn_loo_accuracy(X, y, k=5) == pytest.approx(np.mean(predicted == y))
    # A duplicated point does not vote for itself.
    assert knn_loo_accuracy(np.array([[0.0], [0.0], [5.0], [5.0]]), ["p", "q", "r", "r"], k=1) == 0.5


def test_embedding_scores() -> None:
    rng = np.random.default_rng(3)
    centres = np.array([[0, 0], [10, 0], [0, 10]])
    y = np.repeat(["u", "v", "w"], 40)
    X = centres[np.repeat(np.arange(3), 40)] + rng.normal(0, 0.5, (120, 2))
    good = embedding_scores(X, y, seed=0)
    assert good["knn_accuracy"] == 1.0 and good["ari"] == pytest.approx(1.0) and good["nmi"] == pytest.approx(1.0)
    assert good["silhouette"] > 0.8 and good["n_types"] == 3
    noise = embedding_scores(rng.normal(size=(120, 2)), y, seed=0)
    assert abs(noise["ari"]) < 0.1 and noise["silhouette"] < 0.1 and noise["knn_accuracy"] < 0.6


def test_reconstruction_per_cell() -> None:
    fit = RankExpressionFit(-0.5, 2.0)
    exact = fit.predict(np.log10(1 + np.arange(6)))  # a cell on the line, genes in a scrambled order
    row0 = np.zeros(8)
    row0[[3, 0, 7, 1, 5, 2]] = exact
    row1 = np.zeros(8)
    row1[[0, 1, 2]] = [1.0, 3.0, 2.0]
    X = sp.csr_matrix(np.vstack([row0, row1, np.zeros(8)]))
    log_rank, log_expr, indptr = rank_expression_points(X)
    assert indptr.tolist() == [0, 6, 9, 9]
    np.testing.assert_allclose(log_expr[6:9], [3.0, 2.0, 1.0])
    cells = per_cell_reconstruction(log_rank, log_expr, indptr, fit)
    assert cells["n_genes"].tolist() == [6, 3, 0]
    assert cells["r_squared"][0] == pytest.approx(1.0) and cells["pearson_r"][0] == pytest.approx(1.0)
    from sklearn.metrics import r2_score

    y_hat = fit.predict(np.log10(1 + np.arange(3)))
    assert cells["r_squared"][1] == pytest.approx(r2_score([3.0, 2.0, 1.0], y_hat))
    assert cells["mean_abs_error"][1] == pytest.approx(np.mean(np.abs(np.array([3.0, 2.0, 1.0]) - y_hat)))
    assert np.isnan(cells["r_squared"][2])


def test_neighbouring_types_get_distinct_colours() -> None:
    import matplotlib

    # Names next to each other sit next to each other (as CD14+ Monocyte and CD19+ B did).
    types = [f"type {i:02d}" for i in range(12)]
    centroids = np.array([[i // 2 * 10.0 + (i % 2), 0.0] for i in range(12)])
    colours = distinct_colours(types, centroids)
    assert len(set(colours.values())) == 12
    pairs = [(types[i], types[i + 1]) for i in range(0, 12, 2)]
    assert min(_colour_distance(colours[a], colours[b]) for a, b in pairs) > 40
    # tab20 by name, the old palette, fails this: dark and light shades of one hue.
    tab20 = [matplotlib.colors.to_hex(matplotlib.colormaps["tab20"](i)) for i in range(12)]
    assert min(_colour_distance(tab20[i], tab20[i + 1]) for i in range(0, 12, 2)) < 40
    assert distinct_colours(types, centroids) == colours  # deterministic


def test_scores_of_chosen_types_are_those_of_a_dataset_of_only_those_types() -> None:
    import pyarrow as pa

    from utils.evaluation.generation_metrics import score_generated
    from utils.inverse import build_vocab_index

    train_s, train_y, vocab = typed_sentences(160, seed=0)
    test_s, test_y, _ = typed_sentences(80, seed=1)
    gen_s, gen_y, _ = typed_sentences(40, seed=2)
    chosen = ["beta", "gamma"]  # 2 of the 4 types; "alpha" is the majority (first by name)
    gen = [(s, y) for s, y in zip(gen_s, gen_y, strict=True) if y in chosen]
    sentences, requested = [s for s, _ in gen], [y for _, y in gen]

    def tables(keep) -> dict:
        return {name: pa.table({"cell_sentence": [s for s, y in zip(ss, yy, strict=True) if keep(y)],
                                "cell_type": [y for y in yy if keep(y)]})
                for name, ss, yy in (("train", train_s, train_y), ("test", test_s, test_y))}

    kwargs = {"split": "test", "label_column": "cell_type", "index": build_vocab_index(vocab), "fit": FIT,
              "top_k": 20, "seed": 4}
    subset, _ = score_generated(sentences, requested, tables(lambda y: True), cell_types=chosen, **kwargs)
    only, _ = score_generated(sentences, requested, tables(lambda y: y in chosen), **kwargs)
    whole, _ = score_generated(sentences, requested, tables(lambda y: True), **kwargs)
    for key in ("knn_accuracy", "knn_ceiling", "majority_baseline", "mmd", "mmd_floor", "energy_distance",
                "energy_distance_floor", "bandwidth", "n_real_train", "n_real_eval", "per_type"):
        assert subset[key] == only[key], key
    assert subset["n_real_eval"] == 40 and subset["n_real_train"] == 80 and subset["cell_types"] == chosen
    # Against the whole split the majority type is one never generated; on the two types it is half.
    assert whole["majority_baseline"] == 0.0 and subset["majority_baseline"] == 0.5
    assert whole["n_real_eval"] == 80 and whole["mmd_floor"] != subset["mmd_floor"]
