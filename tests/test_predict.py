"""predict.py and label-constrained prediction: a model applied to new cells exactly as trained.

One small pipeline (synthetic counts -> transform.py with --exclude_genes -> a tiny train.py
model) is applied to the raw h5ad, to the transform's output, and to a second dataset.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers import synthetic_counts

import predict
import train
import transform
from utils.cli import InputError
from utils.models.cell_model import CellSentenceModel
from utils.models.constrain import label_sequences, score_labels
from utils.models.recipe import RECIPE_FILE, Recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--init_from_scratch", "True", "--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--n_positions", "256",
        "--top_k_genes", "20", "--per_device_train_batch_size", "16", "--learning_rate", "5e-3",
        "--disable_tqdm", "True", "--seed", "7"]


@pytest.fixture(scope="module")
def pipeline(one_thread, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    cells = root / "cells.h5ad"
    synthetic_counts(300, 400, seed=0).write_h5ad(cells)
    transform.main(transform.parse_args(["--data_filepath", str(cells), "--output_dir", str(root / "tx"),
                                         "--exclude_genes", "^MT-", "--min_genes_per_cell", "20"]))
    model = train.main(train.parse_args(["--data_dir", str(root / "tx" / "cell_sentences_hf"), "--output_dir",
                                         str(root / "model"), "--run_name", "tiny", "--max_steps", "200",
                                         "--tasks", "cell_type_prediction,conditional_generation", *TINY]))
    return {"root": root, "cells": cells, "tx": root / "tx", "model": model}


@pytest.fixture(scope="module")
def model(pipeline) -> CellSentenceModel:
    return CellSentenceModel.load(pipeline["model"])


def test_recipe_records_the_transform_and_labels(pipeline, model: CellSentenceModel) -> None:
    recipe = Recipe.read(pipeline["model"])
    assert recipe.transform["exclude_genes"] == "^MT-" and recipe.top_k_genes == 20
    assert recipe.labels("cell_type") == ["type 0", "type 1", "type 2"]
    assert recipe.tasks == ["cell_type_prediction", "conditional_generation"]
    vocab = [line.split()[0] for line in (pipeline["tx"] / "cell_sentences" / "vocab.txt").read_text().splitlines()]
    assert recipe.genes == vocab and not any(g.startswith("MT-") for g in vocab)
    assert (pipeline["model"] / RECIPE_FILE).is_file()
    assert model.recipe == recipe and model.top_k_genes == 20


def test_new_cells_get_the_training_sentences(pipeline, model: CellSentenceModel) -> None:
    """The raw h5ad, through the recipe, gives every kept cell the transform's own sentence
    (MT- genes excluded), so nothing is skewed between training and use."""
    from datasets import load_from_disk

    adata = ad.read_h5ad(pipeline["cells"])
    mine = dict(zip(adata.obs_names, model.cell_sentences(adata), strict=True))
    dd = load_from_disk(str(pipeline["tx"] / "cell_sentences_hf"))
    n = 0
    for split in dd.values():
        for name, sentence in zip(split["cell_name"], split["cell_sentence"], strict=True):
            assert mine[name] == " ".join(sentence.split()[:20])
            n += 1
    assert n == 295 and not any(w.startswith("MT-") for s in mine.values() for w in s.split())


def test_scores_equal_a_forward_pass_per_label(model: CellSentenceModel) -> None:
    """The batched, cached, left-padded scorer against one plain forward pass per (cell, label)."""
    import torch

    fmt, tok = model.prompt_format, model.tokenizer
    labels = model.label_set()
    sequences = label_sequences(tok, labels, fmt)
    sentences = ["GENE0001 GENE0002 GENE0003", "GENE0010 GENE0020 GENE0030 GENE0040 GENE0050 GENE0060 GENE0070"]
    prompts, _ = model.prediction_prompts(sentences, budget=8)
    scored = score_labels(model.model, prompts, sequences, pad_token_id=tok.pad_token_id, batch_size=2)
    for i, prompt in enumerate(prompts):
        for j, seq in enumerate(sequences):
            ids = torch.tensor([[*prompt, *seq]])
            with torch.inference_mode():
                logp = torch.log_softmax(model.model(ids).logits[0].double(), -1)
            expected = sum(float(logp[len(prompt) - 1 + t, token]) for t, token in enumerate(seq))
            assert scored[i, j] == pytest.approx(expected, abs=1e-4)


def test_predict_h5ad_agrees_with_the_transform_output(pipeline, tmp_path: Path) -> None:
    out_h5ad, out_split = tmp_path / "h5ad", tmp_path / "split"
    metrics = predict.main(predict.parse_args(["--model_dir", str(pipeline["model"]), "--h5ad", str(pipeline["cells"]),
                                               "--output_dir", str(out_h5ad)]))
    predict.main(predict.parse_args(["--model_dir", str(pipeline["model"]), "--data_dir",
                                     str(pipeline["tx"] / "cell_sentences_hf"), "--split", "all",
                                     "--output_dir", str(out_split)]))
    a = pd.read_csv(out_h5ad / "predictions.csv")
    b = pd.read_csv(out_split / "predictions.csv")
    assert list(a.columns) == ["cell_name", "predicted_cell_type", "cell_type_score", "cell_type", "qc_pass"]
    assert list(b.columns) == ["cell_name", "predicted_cell_type", "cell_type_score", "cell_type"]
    assert len(a) == 300 and len(b) == 295 and a["qc_pass"].sum() == 295  # QC's drops still predicted, flagged
    both = a.merge(b, on="cell_name")
    assert len(both) == 295 and set(both["cell_name"]) == set(a["cell_name"][a["qc_pass"]])
    assert (both["predicted_cell_type_x"] == both["predicted_cell_type_y"]).all()
    assert np.allclose(both["cell_type_score_x"], both["cell_type_score_y"], atol=1e-6)
    assert set(a["predicted_cell_type"]) <= {"type 0", "type 1", "type 2"}  # every answer a known label
    assert ((a["cell_type_score"] > 1 / 3 - 1e-9) & (a["cell_type_score"] <= 1)).all()
    accuracy = float((a["predicted_cell_type"] == a["cell_type"]).mean())
    assert metrics["prediction"]["accuracy"] == pytest.approx(accuracy)
    assert metrics["prediction"]["accuracy"] > metrics["prediction"]["majority_baseline"]
    assert (out_h5ad / "confusion_matrix.png").stat().st_size > 1000
    recorded = json.loads((out_h5ad / "predict_args.json").read_text())
    assert recorded["recipe"]["exclude_genes"] == "^MT-" and recorded["recipe"]["top_k_genes"] == 20
    assert recorded["recipe"]["prompt_format"] == "ours"

    annotated = ad.read_h5ad(out_h5ad / "annotated.h5ad")
    original = ad.read_h5ad(pipeline["cells"])
    assert (annotated.X != original.X).nnz == 0 and annotated.obs_names.equals(original.obs_names)
    pd.testing.assert_frame_equal(annotated.obs[original.obs.columns], original.obs)
    assert list(annotated.obs["c2s_cell_type"].cat.categories) == ["type 0", "type 1", "type 2"]
    assert (annotated.obs["c2s_cell_type"].astype(str).to_numpy() == a["predicted_cell_type"].to_numpy()).all()
    scores = annotated.obsm["c2s_cell_type_scores"]
    assert scores.shape == (300, 3) and np.allclose(scores.sum(1), 1, atol=1e-5)
    assert list(annotated.uns["c2s_cell_type_scores_labels"]) == ["type 0", "type 1", "type 2"]
    assert np.allclose(scores.max(1), annotated.obs["c2s_cell_type_score"], atol=1e-6)
    assert annotated.obs["c2s_qc_pass"].sum() == 295


def test_unlabelled_cells_and_a_second_dataset(pipeline, tmp_path: Path, caplog) -> None:
    """A second dataset without labels, a third of its genes renamed: predicted, with a warning
    about the unknown genes; one whose genes the model never saw is refused."""
    other = synthetic_counts(60, 400, seed=5)
    del other.obs["cell_type"]
    names = other.var_names.to_numpy().copy()
    names[::2] = [f"OTHER{i}" for i in range(len(names[::2]))]
    other.var_names = names
    other.write_h5ad(tmp_path / "other.h5ad")
    with caplog.at_level(logging.WARNING, logger="cell2sentence"):
        metrics = predict.main(predict.parse_args(["--model_dir", str(pipeline["model"]), "--h5ad",
                                                   str(tmp_path / "other.h5ad")]))
    assert "unknown to the model" in caplog.text
    out = tmp_path / "predictions" / "tiny_other"  # next to the input, not the current folder
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == ["cell_name", "predicted_cell_type", "cell_type_score", "qc_pass"]
    assert len(table) == 60 and "prediction" not in metrics
    other.var_names = [f"NEVER{i}" for i in range(other.n_vars)]
    other.write_h5ad(tmp_path / "never.h5ad")
    with pytest.raises(InputError, match="None of the cells' top 20 genes"):
        predict.main(predict.parse_args(["--model_dir", str(pipeline["model"]), "--h5ad", str(tmp_path / "never.h5ad")]))


def test_constrained_and_free_text_api(model: CellSentenceModel, pipeline) -> None:
    adata = ad.read_h5ad(pipeline["cells"])[:12].copy()
    result = model.predict_cell_types(adata, return_scores=True, batch_size=5)
    assert result.labels == model.predict_cell_types(adata)
    assert list(result.probabilities.columns) == ["type 0", "type 1", "type 2"]
    assert np.allclose(result.probabilities.to_numpy().max(1), result.scores)
    free = model.predict_cell_types(adata, constrain=False, max_new_tokens=4, return_scores=True)
    assert len(free.labels) == 12 and np.isnan(free.scores).all()


def test_bad_predict_flags(pipeline, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="Pass the cells to annotate"):
        predict.parse_args(["--model_dir", str(pipeline["model"])])
    with pytest.raises(InputError, match="choose train, valid, test or all"):
        predict.parse_args(["--model_dir", "m", "--data_dir", "d", "--split", "everything"])
    with pytest.raises(InputError, match="trained to predict cell_type"):
        predict.main(predict.parse_args(["--model_dir", str(pipeline["model"]), "--h5ad", str(pipeline["cells"]),
                                         "--label_column", "donor", "--output_dir", str(tmp_path / "x")]))


def test_generation_asks_only_what_the_model_learned(model: CellSentenceModel) -> None:
    with pytest.raises(InputError, match="never trained on the cell type"):
        model.generate_cells(["Martian"], n_genes=3, max_new_tokens=3)
    with pytest.raises(InputError, match="not trained to generate cells of any type"):
        model.generate_cells([None], n_genes=3, max_new_tokens=3)
    one = model.generate_cells("type 1", 2, n_genes=3, max_new_tokens=5, seed=0)  # one type, not its letters
    assert one["requested_cell_type"].tolist() == ["type 1", "type 1"]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on the CPU")
def test_two_processes_write_the_files_of_one(pipeline, tmp_path: Path) -> None:
    common = ["--model_dir", str(pipeline["model"]), "--h5ad", str(pipeline["cells"]), "--max_cells", "40"]
    predict.main(predict.parse_args([*common, "--output_dir", str(tmp_path / "one")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(ROOT / "predict.py"), *common,
                           "--output_dir", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (pd.read_csv(tmp_path / d / "predictions.csv") for d in ("one", "two"))
    pd.testing.assert_frame_equal(one, two, atol=1e-6)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["processes"] == 2


def test_a_started_process_group_is_destroyed_at_exit(tmp_path: Path) -> None:
    """A gloo group alive at interpreter exit aborts a process now and then (SIGABRT, as once in CI):
    the group goes at exit, before Python's own teardown."""
    code = f"""
import atexit, torch.distributed as dist
from utils.models.distributed import leave_group_at_exit
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
atexit.register(lambda: print("alive at exit:", dist.is_initialized()))  # runs after the handlers below
leave_group_at_exit()
leave_group_at_exit()  # a second run in one process
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["alive at exit: False"], done.stdout


def test_predict_bench_prints_agreement_and_both_methods(pipeline, capsys) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import predict_bench

    figures = predict_bench.main(predict_bench.parse_args([
        "--model_dir", str(pipeline["model"]), "--h5ad", str(pipeline["cells"]),
        "--data_dir", str(pipeline["tx"] / "cell_sentences_hf"), "--repeats", "1"]))
    assert figures["h5ad_vs_transform"]["agreement"] == 1.0 and figures["h5ad_vs_transform"]["common"] == 295
    assert figures["label-constrained"]["cells"] == figures["free text"]["cells"] > 0
    assert 0 <= figures["free text"]["accuracy"] <= 1 and figures["label-constrained"]["cells_per_s"] > 0
    assert "agreement 1.0000" in capsys.readouterr().out


def test_embed_applies_the_recipe_and_two_processes_embed_alike(pipeline, tmp_path: Path) -> None:
    """embed.py --h5ad on the raw cells gives the vectors of the transform's own sentences
    (the recipe's --exclude_genes applied), and two gloo processes give those of one."""
    import embed

    base = ["--model_dir", str(pipeline["model"]), "--batch_size", "8"]
    embed.main(embed.parse_args([*base, "--h5ad", str(pipeline["cells"]), "--output_dir", str(tmp_path / "h5ad")]))
    embed.main(embed.parse_args([*base, "--data_dir", str(pipeline["tx"] / "cell_sentences_hf"), "--split", "all",
                                 "--output_dir", str(tmp_path / "split")]))
    a, b = (ad.read_h5ad(tmp_path / d / "embeddings.h5ad") for d in ("h5ad", "split"))
    common = b.obs_names.intersection(a.obs_names)
    assert len(common) == 295
    assert np.allclose(a[common].obsm["X_c2s"], b[common].obsm["X_c2s"], atol=1e-5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(ROOT / "embed.py"), *base, "--h5ad", str(pipeline["cells"]),
                           "--output_dir", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two = ad.read_h5ad(tmp_path / "two" / "embeddings.h5ad")
    assert two.obs_names.equals(a.obs_names) and np.allclose(two.obsm["X_c2s"], a.obsm["X_c2s"], atol=1e-5)


def test_two_processes_generate_the_cells_of_one(pipeline, tmp_path: Path) -> None:
    """Each batch is seeded by its number, so two gloo processes sharing the batches write the
    cells one process writes."""
    import generate

    base = ["--model_dir", str(pipeline["model"]), "--data_dir", str(pipeline["tx"] / "cell_sentences_hf"),
            "--n_per_type", "3", "--batch_size", "2", "--max_new_tokens", "12", "--seed", "5"]
    generate.main(generate.parse_args([*base, "--output_dir", str(tmp_path / "one")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(ROOT / "generate.py"), *base,
                           "--output_dir", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = ((tmp_path / d / "generated_cells.txt").read_text().splitlines() for d in ("one", "two"))
    assert one == two and len(one) == 9 and len(set(one)) > 1
    assert (tmp_path / "one" / "generated_labels.txt").read_text() == (tmp_path / "two" / "generated_labels.txt").read_text()


@pytest.mark.parametrize("damaged", ["train_args.json", "recipe.json"])
def test_a_record_that_is_not_json_is_one_sentence(pipeline, tmp_path: Path, damaged: str) -> None:
    import shutil

    import embed
    import generate

    model = tmp_path / "model"
    shutil.copytree(pipeline["model"], model, ignore=shutil.ignore_patterns("checkpoints"))
    (model / damaged).write_text('{"top_k_genes": 20,')
    with pytest.raises(InputError, match=f"{damaged} is not valid JSON"):
        CellSentenceModel.load(model)
    data = str(pipeline["tx"] / "cell_sentences_hf")
    for script, argv in ((predict, ["--data_dir", data]), (embed, ["--data_dir", data]),
                         (generate, ["--data_dir", data, "--n_per_type", "1"])):
        with pytest.raises(InputError, match="is not valid JSON"):
            script.main(script.parse_args(["--model_dir", str(model), "--output_dir", str(tmp_path / "out"), *argv]))


def test_cells_as_scanpy_leaves_them_get_the_predictions_of_raw_counts(pipeline, tmp_path: Path) -> None:
    """Counts in layers["counts"], X normalized and log1p'd by scanpy, categorical obs with NaN."""
    import scanpy as sc

    adata = ad.read_h5ad(pipeline["cells"])[:40].copy()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories([]).astype(object)
    adata.obs.loc[adata.obs_names[:3], "cell_type"] = np.nan
    adata.obs["cell_type"] = pd.Categorical(adata.obs["cell_type"])
    adata.write_h5ad(tmp_path / "scanpy.h5ad")
    ad.read_h5ad(pipeline["cells"])[:40].copy().write_h5ad(tmp_path / "raw.h5ad")
    for name in ("scanpy", "raw"):
        predict.main(predict.parse_args(["--model_dir", str(pipeline["model"]), "--h5ad", str(tmp_path / f"{name}.h5ad"),
                                         "--output_dir", str(tmp_path / f"out_{name}")]))
    a, b = (pd.read_csv(tmp_path / f"out_{n}" / "predictions.csv") for n in ("scanpy", "raw"))
    assert a["predicted_cell_type"].tolist() == b["predicted_cell_type"].tolist()
    assert np.allclose(a["cell_type_score"], b["cell_type_score"], atol=1e-6)
    assert a["cell_type"].isna().sum() == 3
    metrics = json.loads((tmp_path / "out_scanpy" / "metrics.json").read_text())
    assert metrics["prediction"]["n_cells"] == 37  # the cells without a label are not scored
