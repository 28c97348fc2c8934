"""Several label columns: train.py --label_columns, predict.py per column, eval/prediction.py per column.

One small pipeline: synthetic counts whose cell type and tissue (independent of each other) each
have marker genes -> transform.py --obs_columns tissue -> a tiny from-scratch model trained on
both columns -> predict.py on the test split and on the raw h5ad -> eval/prediction.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers import tiny_model_flags, train_on_attribute

import predict
import train
from eval import prediction as eval_prediction
from utils.cli import InputError
from utils.models.cell_model import CellSentenceModel
from utils.models.examples import parse_tasks, prediction_tasks, tokenize_batch
from utils.models.prompts import (
    ATTRIBUTE_PREDICTION_TEMPLATES,
    C2S_SCALE_ATTRIBUTE_PREDICTION_TEMPLATES,
    prompt_format,
    prompt_words,
)
from utils.models.recipe import Recipe

TINY = tiny_model_flags()
TISSUES = ("gut", "liver")


@pytest.fixture(scope="module")
def pipeline(one_thread, tmp_path_factory) -> dict[str, Path]:
    return train_on_attribute(tmp_path_factory.mktemp("multi"), "tissue", TISSUES, 300, [
        "--run_name", "two", "--max_steps", "300", "--label_columns", "cell_type,tissue",
        "--tasks", "cell_type_prediction,tissue_prediction", *TINY])


def test_the_recipe_lists_both_columns_and_their_tasks(pipeline) -> None:
    recipe = Recipe.read(pipeline["model"])
    assert recipe.label_columns == {"cell_type": ["type 0", "type 1", "type 2"], "tissue": ["gut", "liver"]}
    assert recipe.tasks == ["cell_type_prediction", "tissue_prediction"]
    assert recipe.prediction_columns() == ["cell_type", "tissue"]
    assert recipe.attribute("cell_type") is None and recipe.attribute("tissue") == "tissue"
    record = json.loads((pipeline["model"] / "train_args.json").read_text())
    assert record["label_columns"] == "cell_type,tissue" and record["label_column"] == "cell_type"
    counts = record["train_examples"]["task_counts"]
    assert set(counts) == {"cell_type_prediction", "tissue_prediction"} and min(counts.values()) > 60


def test_the_tokenizer_spells_every_prompt_and_label(pipeline) -> None:
    model = CellSentenceModel.load(pipeline["model"])
    tok = model.tokenizer
    genes = model.known_genes()
    assert genes and not {"tissue", "gut", "liver", "Which"} & set(genes)  # prompt words are not genes
    for template in ATTRIBUTE_PREDICTION_TEMPLATES:
        text = model.prompt_format.prediction_prompt(genes[:3], template=template, attribute="tissue")
        assert tok.unk_token_id not in tok(text + " gut liver", add_special_tokens=False)["input_ids"], text


def test_each_column_is_predicted_above_its_majority_baseline(pipeline, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    metrics = predict.main(predict.parse_args(["--model_dir", str(pipeline["model"]), "--data_dir",
                                               str(pipeline["tx"] / "cell_sentences_hf"), "--split", "test",
                                               "--output_dir", str(out)]))
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == ["cell_name", "predicted_cell_type", "cell_type_score", "cell_type",
                                   "predicted_tissue", "tissue_score", "tissue"]
    assert set(table["predicted_tissue"]) <= set(TISSUES)
    assert metrics["label_columns"] == ["cell_type", "tissue"]
    for column in ("cell_type", "tissue"):
        summary = metrics[column]["prediction"]
        accuracy = float((table[f"predicted_{column}"] == table[column]).mean())
        assert summary["accuracy"] == pytest.approx(accuracy)
        print(f"{column}: accuracy {accuracy:.3f}, majority baseline {summary['majority_baseline']:.3f}")
        assert accuracy > summary["majority_baseline"] + 0.15
        assert (out / f"confusion_matrix_{column}.png").stat().st_size > 1000
    assert not (out / "confusion_matrix.png").exists()

    # eval/prediction.py: per column
    ev = tmp_path / "eval"
    scored = eval_prediction.main(eval_prediction.parse_args(["--predictions", str(out / "predictions.csv"),
                                                              "--transform_dir", str(pipeline["tx"]),
                                                              "--output_dir", str(ev)]))
    written = json.loads((ev / "metrics.json").read_text())
    assert set(written) == {"cell_type", "tissue"} and written == json.loads(json.dumps(scored))
    for column in ("cell_type", "tissue"):
        m = written[column]
        assert m["accuracy"] == pytest.approx(metrics[column]["prediction"]["accuracy"])
        assert {"balanced_accuracy", "macro_f1", "majority_baseline"} <= set(m)
        assert m["accuracy"] > m["majority_baseline"] and "pca_knn" in m["baselines"]
        assert (ev / f"confusion_matrix_{column}.png").stat().st_size > 1000
        per_class = pd.read_csv(ev / f"per_class_{column}.csv")
        assert set(per_class[column]) == set(table[column])
    assert not (ev / "confusion_matrix.png").exists() and not (ev / "per_class.csv").exists()

    # one column chosen: today's one-column layout
    one = tmp_path / "eval_one"
    single = eval_prediction.main(eval_prediction.parse_args(["--predictions", str(out / "predictions.csv"),
                                                              "--transform_dir", str(pipeline["tx"]),
                                                              "--label_column", "tissue", "--output_dir", str(one)]))
    assert single["accuracy"] == pytest.approx(written["tissue"]["accuracy"])
    assert (one / "confusion_matrix.png").is_file() and (one / "per_class.csv").is_file()


def test_the_h5ad_is_annotated_with_every_column(pipeline, tmp_path: Path) -> None:
    out = tmp_path / "h5ad"
    predict.main(predict.parse_args(["--model_dir", str(pipeline["model"]), "--h5ad", str(pipeline["cells"]),
                                     "--output_dir", str(out), "--max_cells", "60"]))
    annotated = ad.read_h5ad(out / "annotated.h5ad")
    table = pd.read_csv(out / "predictions.csv")
    for column, labels in (("cell_type", ["type 0", "type 1", "type 2"]), ("tissue", list(TISSUES))):
        assert list(annotated.obs[f"c2s_{column}"].cat.categories) == labels
        scores = annotated.obsm[f"c2s_{column}_scores"]
        kept = ~np.isnan(scores).any(axis=1)
        assert kept.sum() == 60 and np.allclose(scores[kept].sum(1), 1, atol=1e-5)
        assert np.allclose(scores[kept].max(1), annotated.obs[f"c2s_{column}_score"].to_numpy()[kept], atol=1e-6)
        picked = annotated.obs.loc[table["cell_name"], f"c2s_{column}"].astype(str).to_numpy()
        assert (picked == table[f"predicted_{column}"].to_numpy()).all()


def test_one_column_of_a_two_column_model(pipeline, tmp_path: Path) -> None:
    """--label_columns tissue (or --label_column tissue): that column only, today's layout."""
    data = ["--model_dir", str(pipeline["model"]), "--data_dir", str(pipeline["tx"] / "cell_sentences_hf")]
    for flag in ("--label_columns", "--label_column"):
        out = tmp_path / flag.strip("-")
        metrics = predict.main(predict.parse_args([*data, flag, "tissue", "--output_dir", str(out)]))
        table = pd.read_csv(out / "predictions.csv")
        assert list(table.columns) == ["cell_name", "predicted_tissue", "tissue_score", "tissue"]
        assert metrics["label_column"] == "tissue" and (out / "confusion_matrix.png").is_file()
    from datasets import load_from_disk

    test = load_from_disk(str(pipeline["tx"] / "cell_sentences_hf"))["test"]
    assert test["cell_name"] == table["cell_name"].tolist()
    api = CellSentenceModel.load(pipeline["model"]).predict_cell_types(test, column="tissue", return_scores=True)
    assert api.labels == table["predicted_tissue"].tolist() and api.column == "tissue"
    assert np.allclose(api.scores, table["tissue_score"], atol=1e-6)
    with pytest.raises(InputError, match="trained to predict cell_type, tissue"):
        predict.main(predict.parse_args([*data, "--label_columns", "donor", "--output_dir", str(tmp_path / "x")]))
    with pytest.raises(InputError, match="not both"):
        predict.parse_args([*data, "--label_columns", "tissue", "--label_column", "tissue"])


# ------------------------------------------------------------------------------ units


def test_one_label_column_keeps_todays_tasks_words_and_examples() -> None:
    """Without further columns nothing changes: the task mix, the tokenizer's words, the examples."""
    assert prediction_tasks(["cell_type"]) == {}
    assert prompt_words(["B cell"]) == prompt_words(["B cell"], attributes=())
    assert "tissue" not in prompt_words(["B cell"]) and "tissue" in prompt_words(["B cell"], attributes=["tissue"])

    class Tok:  # a whitespace word tokenizer, enough for the example builder
        bos_token_id, eos_token_id = 0, 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [hash(w) % 1000 + 2 for w in text.split()]}

    batch = {"cell_sentence": ["A B C D", "B C D A", "C D A B"], "cell_type": ["x", None, "y"],
             "tissue": ["gut", "liver", None]}
    tasks = parse_tasks("conditional_generation,unconditional_generation,cell_type_prediction")
    kwargs = {"tokenizer": Tok(), "tasks": tasks, "top_k": 4, "max_length": 64, "seed": 1, "split": "train"}
    assert tokenize_batch(batch, [0, 1, 2], **kwargs) == tokenize_batch(batch, [0, 1, 2], **kwargs, label_columns={})
    both = parse_tasks("cell_type_prediction,tissue_prediction", extra_tasks=["tissue_prediction"])
    out = tokenize_batch(batch, [0, 1, 2], **{**kwargs, "tasks": both}, label_columns={"tissue_prediction": "tissue"})
    assert out["task"][1] == "tissue_prediction" and out["task"][2] == "cell_type_prediction"  # the label it has


def test_attribute_prompts_of_both_formats() -> None:
    ours, c2s = prompt_format("ours"), prompt_format("c2s_scale")
    assert len(ATTRIBUTE_PREDICTION_TEMPLATES) == 10 and len(C2S_SCALE_ATTRIBUTE_PREDICTION_TEMPLATES) == 15
    text = ours.prediction_prompt(["G1", "G2"], attribute="disease state", rng=random.Random(0))
    assert "disease state" in text and "G1 G2" in text and "cell type" not in text
    text = c2s.prediction_prompt(["G1", "G2"], attribute="tissue")
    assert "give the tissue which this cell belongs to" in text and "cell type" not in text
    assert ours.prediction_prompt(["G1"]) == ours.prediction_prompt(["G1"], attribute=None)


def test_bad_label_columns(tmp_path: Path) -> None:
    from helpers_train import make_dataset_dir

    data = make_dataset_dir(tmp_path / "ds", n_train=16, n_valid=4, n_test=4)
    base = ["--data_dir", str(data), "--output_dir", str(tmp_path / "m"), "--max_steps", "1", *TINY]
    with pytest.raises(InputError, match="no column 'tissue' given by --label_columns"):
        train.main(train.parse_args([*base, "--label_columns", "cell_type,tissue"]))
    with pytest.raises(InputError, match="disagree"):
        train.main(train.parse_args([*base, "--label_columns", "cell_type", "--label_column", "cell_name"]))
    with pytest.raises(InputError, match="Unknown task"):
        train.main(train.parse_args([*base, "--tasks", "tissue_prediction"]))


def test_the_default_task_mix_gives_each_column_a_prediction_share() -> None:
    from types import SimpleNamespace

    from utils.models.train_data import resolve_tasks

    def data(**kw):
        return SimpleNamespace(**{"tasks": None, "task_weights": None, "prompt_format": "ours",
                                  "label_column": "cell_type", "label_columns": None, **kw})

    columns = ["cell_name", "cell_sentence", "cell_type", "tissue"]
    assert resolve_tasks(data(), columns) == dict.fromkeys(
        ["conditional_generation", "unconditional_generation", "cell_type_prediction"], 1 / 3)
    assert resolve_tasks(data(label_columns="cell_type,tissue"), columns) == dict.fromkeys(
        ["conditional_generation", "unconditional_generation", "cell_type_prediction", "tissue_prediction"], 0.25)
    assert list(resolve_tasks(data(label_columns="cell_type,tissue", prompt_format="c2s_scale"), columns)) == [
        "conditional_generation", "cell_type_prediction", "tissue_prediction"]
    with pytest.raises(InputError, match="list 'cell_type' first"):
        resolve_tasks(data(label_column="tissue", label_columns="tissue,cell_type"), columns)
