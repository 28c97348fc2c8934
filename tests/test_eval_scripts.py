"""eval/*.py on transform.py's outputs of a small synthetic dataset: values known by construction."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers import synthetic_counts, write_h5ad

import transform
from eval import embedding as eval_embedding
from eval import generation as eval_generation
from eval import prediction as eval_prediction
from eval import reconstruction as eval_reconstruction
from utils.cli import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def transformed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("eval")
    adata = synthetic_counts(300, 400, seed=4)
    adata.obs.loc[adata.obs_names[::25], "cell_type"] = np.nan  # unlabelled cells are left out
    h5ad = write_h5ad(adata, tmp / "syn.h5ad")
    out = tmp / "out"
    # Every cell in the transform's own fit, so an all-cell refit must give its line.
    transform.main(transform.parse_args(["--data_filepath", str(h5ad), "--output_dir", str(out),
                                         "--min_genes_per_cell", "0", "--eval_cells", "100000"]))
    return out


def split(out: Path, name: str) -> pd.DataFrame:
    """A split's labelled cells."""
    from datasets import load_from_disk

    table = load_from_disk(str(out / "cell_sentences_hf"))[name].to_pandas()
    return table[table["cell_type"].notna()].reset_index(drop=True)


def write_generated(folder: Path, sentences: list[str], labels: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "generated_cells.txt").write_text("".join(s + "\n" for s in sentences))
    (folder / "generated_labels.txt").write_text("".join(t + "\n" for t in labels))
    return folder


@pytest.mark.parametrize("module", [eval_generation, eval_prediction, eval_embedding, eval_reconstruction])
def test_help(module, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        module.parse_args(["--help"])
    assert done.value.code == 0 and "--output_dir" in capsys.readouterr().out


def test_generation_real_cells_and_random_gene_lists(transformed: Path, tmp_path: Path) -> None:
    test = split(transformed, "test")
    common = ["--data_dir", str(transformed / "cell_sentences_hf"), "--top_k_genes", "50"]
    # The held-out cells themselves as "generated": at the ceiling, zero distance.
    same = write_generated(tmp_path / "same", test["cell_sentence"].tolist(), test["cell_type"].tolist())
    m = eval_generation.main(eval_generation.parse_args(
        ["--generated_dir", str(same), "--output_dir", str(tmp_path / "e1"), *common]))
    assert m["knn_accuracy"] == m["knn_ceiling"] > 0.8
    assert m["mmd"] == 0.0 and m["energy_distance"] == 0.0 and m["mmd_floor"] > 0
    assert m["valid_gene_rate"] == 1.0 and m["duplicate_rate"] == 0.0
    assert m["n_real_eval"] == len(test) and m["n_real_train"] == len(split(transformed, "train"))
    # Strict JSON: the undefined per-type scores (a type with fewer than 2 cells) are null.
    written = json.loads((tmp_path / "e1" / "metrics.json").read_text(), parse_constant=pytest.fail)
    assert {"knn_accuracy", "knn_ceiling", "mmd", "mmd_floor", "valid_gene_rate", "duplicate_rate"} <= set(written)
    per_type = pd.read_csv(tmp_path / "e1" / "per_type.csv")
    assert sorted(per_type["cell_type"]) == sorted(set(test["cell_type"]))
    assert per_type["n_generated"].sum() == len(test) and (per_type["mmd"] == 0).all()
    assert (tmp_path / "e1" / "real_vs_generated_pca.png").stat().st_size > 10_000
    # Random lists of the vocabulary's genes, with a few junk words, score far worse.
    vocab = [line.split()[0] for line in (transformed / "cell_sentences" / "vocab.txt").read_text().splitlines()]
    rng = random.Random(0)
    noise = [" ".join(rng.sample(vocab, 50) + ["NOTAGENE"]) for _ in range(len(test))]
    bad_dir = write_generated(tmp_path / "bad", noise, test["cell_type"].tolist())
    bad = eval_generation.main(eval_generation.parse_args(
        ["--generated_dir", str(bad_dir), "--output_dir", str(tmp_path / "e2"), *common]))
    assert bad["knn_accuracy"] < 0.6 < bad["knn_ceiling"]
    assert bad["mmd"] > 3 * bad["mmd_floor"] and bad["energy_distance"] > bad["energy_distance_floor"]
    assert bad["valid_gene_rate"] == pytest.approx(50 / 51)
    # Labels that do not match the sentences fail in one sentence.
    (bad_dir / "generated_labels.txt").write_text("only one\n")
    with pytest.raises(InputError, match="1 labels for"):
        eval_generation.main(eval_generation.parse_args(
            ["--generated_dir", str(bad_dir), "--output_dir", str(tmp_path / "e3"), *common]))


def test_prediction_perfect_shuffled_and_as_a_script(transformed: Path, tmp_path: Path) -> None:
    test = split(transformed, "test")
    truth = test["cell_type"].tolist()
    perfect = tmp_path / "perfect.csv"
    pd.DataFrame({"cell_name": test["cell_name"], "true": truth, "predicted": truth}).to_csv(perfect, index=False)
    m = eval_prediction.main(eval_prediction.parse_args(
        ["--predictions", str(perfect), "--transform_dir", str(transformed), "--output_dir", str(tmp_path / "p1")]))
    assert m["accuracy"] == m["balanced_accuracy"] == m["macro_f1"] == 1.0
    pca = m["baselines"]["pca_knn"]
    assert pca["n_cells"] == len(test) and pca["accuracy"] > 0.8  # the synthetic types have markers
    assert pca["n_train"] == len(split(transformed, "train"))  # labelled training cells only
    majority = m["baselines"]["majority"]
    n_types = len(set(truth))
    assert majority["balanced_accuracy"] == pytest.approx(1 / n_types)
    assert m["majority_baseline"] == pytest.approx(majority["accuracy"]) and majority["accuracy"] < 0.6
    per_class = pd.read_csv(tmp_path / "p1" / "per_class.csv")
    assert (per_class["precision"] == 1).all() and per_class["support"].sum() == len(test)
    # Shuffled answers carry no information: chance-level balanced accuracy, like the majority
    # class, run as a script from the repository root.
    shuffled = tmp_path / "shuffled.csv"
    pd.DataFrame({"cell_name": test["cell_name"], "true": truth,
                  "predicted": np.random.default_rng(0).permutation(truth)}).to_csv(shuffled, index=False)
    done = subprocess.run([sys.executable, "eval/prediction.py", "--predictions", str(shuffled), "--transform_dir",
                           str(transformed), "--output_dir", str(tmp_path / "p2")], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    s = json.loads((tmp_path / "p2" / "metrics.json").read_text())
    assert abs(s["balanced_accuracy"] - 1 / n_types) < 0.2 and s["accuracy"] <= s["majority_baseline"] + 0.15
    assert (tmp_path / "p2" / "confusion_matrix.png").is_file()
    # predict.py's layout (predicted_<column>, <column>_score, <column>) gives the same scores.
    layout = tmp_path / "predict_py.csv"
    pd.DataFrame({"cell_name": test["cell_name"], "predicted_cell_type": truth, "cell_type_score": 0.9,
                  "cell_type": truth}).to_csv(layout, index=False)
    same = eval_prediction.main(eval_prediction.parse_args(
        ["--predictions", str(layout), "--transform_dir", str(transformed), "--output_dir", str(tmp_path / "p4")]))
    assert {k: v for k, v in same.items() if k != "predictions"} == {k: v for k, v in m.items() if k != "predictions"}
    unlabelled = tmp_path / "unlabelled.csv"
    pd.DataFrame({"cell_name": test["cell_name"], "predicted_cell_type": truth}).to_csv(unlabelled, index=False)
    with pytest.raises(InputError, match="no columns predicted_cell_type and cell_type"):
        eval_prediction.main(eval_prediction.parse_args(["--predictions", str(unlabelled), "--output_dir",
                                                         str(tmp_path / "p5")]))
    bad = tmp_path / "bad.csv"
    bad.write_text("cell_name,truth\nx,y\n")
    with pytest.raises(InputError, match="has no column predicted, true"):
        eval_prediction.main(eval_prediction.parse_args(["--predictions", str(bad), "--output_dir",
                                                         str(tmp_path / "p3")]))


def test_embedding_scores_against_pca(transformed: Path, tmp_path: Path) -> None:
    pre = ad.read_h5ad(next(transformed.glob("*_preprocessed.h5ad")))
    types = pre.obs["cell_type"].astype(str).to_numpy()
    codes = np.unique(types, return_inverse=True)[1]
    rng = np.random.default_rng(0)
    # An embedding in embed.py's layout that separates the types perfectly.
    emb = ad.AnnData(obs=pre.obs.copy())
    emb.obsm["X_c2s"] = np.eye(codes.max() + 1)[codes] * 10 + rng.normal(0, 0.3, (pre.n_obs, codes.max() + 1))
    emb.obs.loc[emb.obs_names[:3], "cell_type"] = np.nan  # unlabelled cells are left out
    n_labelled = int(emb.obs["cell_type"].notna().sum())
    path = tmp_path / "emb" / "embeddings.h5ad"
    path.parent.mkdir()
    emb.write_h5ad(path)
    m = eval_embedding.main(eval_embedding.parse_args(
        ["--embeddings", str(path.parent), "--transform_dir", str(transformed), "--output_dir", str(tmp_path / "m")]))
    assert m["knn_accuracy"] == 1.0 and m["ari"] == pytest.approx(1.0) and m["nmi"] == pytest.approx(1.0)
    assert m["c2s"]["n_cells"] == n_labelled == m["pca"]["n_cells"] < pre.n_obs - 3
    assert m["silhouette"] > m["pca_silhouette"]
    assert 0 < m["pca_knn_accuracy"] <= 1
    assert (tmp_path / "m" / "embedding_vs_pca.png").stat().st_size > 10_000
    with pytest.raises(InputError, match="no .obsm"):
        eval_embedding.main(eval_embedding.parse_args(
            ["--embeddings", str(path), "--obsm_key", "X_umap", "--output_dir", str(tmp_path / "n")]))


def test_reconstruction_over_all_cells(transformed: Path, tmp_path: Path) -> None:
    m = eval_reconstruction.main(eval_reconstruction.parse_args(
        ["--transform_dir", str(transformed), "--output_dir", str(tmp_path / "r"), "--chunk_size", "64"]))
    reported = pd.read_csv(transformed / "eval" / "transformation_metrics.csv").iloc[0]
    pre = ad.read_h5ad(next(transformed.glob("*_preprocessed.h5ad")))
    assert m["n_cells"] == pre.n_obs and m["n_points"] == pre.X.nnz
    # The transform fitted every cell too: the same line and scores.
    fit = m["all_cells_fit"]
    assert fit["slope"] == pytest.approx(reported["slope"], rel=1e-6)
    assert fit["intercept"] == pytest.approx(reported["intercept"], rel=1e-6)
    assert fit["pearson_r"] == pytest.approx(reported["pearson_r"], rel=1e-6)
    assert fit["n_points"] == reported["n_points"]
    per_cell = pd.read_csv(tmp_path / "r" / "per_cell.csv")
    assert per_cell["cell_name"].tolist() == pre.obs_names.tolist()
    assert (per_cell["n_genes"].to_numpy() == np.diff(pre.X.indptr)).all()
    assert m["per_cell"]["r_squared"]["median"] == pytest.approx(per_cell["r_squared"].median())
    assert 0 < m["per_cell"]["pearson_r"]["median"] <= 1
    for name in ("log_rank_vs_log_expression.png", "expression_vs_reconstruction.png", "per_cell_r_squared.png"):
        assert (tmp_path / "r" / name).stat().st_size > 10_000
    # A subset is a subset; an existing output needs --overwrite.
    sub = eval_reconstruction.main(eval_reconstruction.parse_args(
        ["--transform_dir", str(transformed), "--output_dir", str(tmp_path / "r"), "--max_cells", "40",
         "--overwrite"]))
    assert sub["n_cells"] == 40 and len(pd.read_csv(tmp_path / "r" / "per_cell.csv")) == 40
    with pytest.raises(InputError, match="--overwrite"):
        eval_reconstruction.main(eval_reconstruction.parse_args(
            ["--transform_dir", str(transformed), "--output_dir", str(tmp_path / "r")]))
