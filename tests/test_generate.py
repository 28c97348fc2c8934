"""generate.py on a tiny from-scratch model: predictions, generated cells, metrics, left padding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_train import MARKERS

import generate
import train
from utils.common import InputError
from utils.evaluation import normalize_label
from utils.generation import allocate_counts, generate_batched, left_pad, shorten_to_fit
from utils.prompts import prediction_prompt
from utils.training import decode_answer, encode_prompt, load_model_and_tokenizer

TINY = [
    "--init_from_scratch", "True", "--n_layer", "2", "--n_embd", "64", "--n_head", "2",
    "--n_positions", "128", "--top_k_genes", "10", "--per_device_train_batch_size", "16",
    "--learning_rate", "5e-3", "--disable_tqdm", "True", "--seed", "7",
]


@pytest.fixture(scope="module")
def model_dir(one_thread, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    argv = ["--data_dir", str(data_dir), "--output_dir", str(out), "--run_name", "tiny",
            "--max_steps", "150", *TINY]
    return train.main(train.parse_args(argv))


@pytest.fixture(scope="module")
def run(one_thread, model_dir: Path, data_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated") / "tiny"
    generate.main(generate.parse_args([
        "--model_dir", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
        "--n_per_type", "3", "--batch_size", "5", "--seed", "11",
    ]))
    return out


def test_predictions_and_accuracy(run: Path) -> None:
    table = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert list(table.columns) == ["cell_name", "true", "predicted"]
    assert len(table) == 40 and table["cell_name"].tolist()[:2] == ["test_cell0", "test_cell1"]
    assert all(isinstance(x, str) for x in table["predicted"])
    metrics = json.loads((run / "metrics.json").read_text())
    hits = [normalize_label(a) == normalize_label(b) for a, b in zip(table["true"], table["predicted"], strict=True)]
    assert metrics["prediction"]["accuracy"] == pytest.approx(np.mean(hits))
    assert metrics["prediction"]["n_cells"] == 40
    # The markers make the types easy: the tiny model beats the majority class.
    assert metrics["prediction"]["accuracy"] > metrics["prediction"]["majority_baseline"] == 0.25
    assert (run / "confusion_matrix.png").stat().st_size > 1000


def test_generated_cells_are_written_consistently(run: Path) -> None:
    from datasets import load_from_disk

    sentences = (run / "generated_cells.txt").read_text().split("\n")[:-1]
    labels = (run / "generated_labels.txt").read_text().splitlines()
    assert len(sentences) == len(labels) == 12
    assert Counter(labels) == {t: 3 for t in MARKERS}
    ds = load_from_disk(str(run / "generated_cells_hf"))
    assert ds.column_names == ["cell_name", "cell_sentence", "requested_cell_type"]
    assert ds["cell_sentence"] == sentences and ds["requested_cell_type"] == labels
    gen = json.loads((run / "metrics.json").read_text())["generation"]
    assert gen["requested_counts"] == {t: 3 for t in sorted(MARKERS)}
    assert gen["sentences"]["n_cells"] == 12
    assert gen["sentences"]["n_words"] == sum(len(s.split()) for s in sentences)
    assert gen["sentences"]["valid_gene_rate"] > 0.9
    assert gen["knn_ceiling"] == 1.0 and gen["mmd_floor"] >= 0
    assert 0 <= gen["knn_accuracy"] <= 1 and gen["n_generated"] == 12
    assert (run / "real_vs_generated_pca.png").is_file()
    args = json.loads((run / "generate_args.json").read_text())
    assert args["tasks"] == "predict,generate" and args["n_per_type"] == 3


def test_same_seed_same_cells(run: Path, model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    generate.main(generate.parse_args([
        "--model_dir", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
        "--n_per_type", "3", "--batch_size", "5", "--seed", "11", "--tasks", "generate",
    ]))
    assert (out / "generated_cells.txt").read_text() == (run / "generated_cells.txt").read_text()
    assert not (out / "predictions.csv").exists()
    # --max_cells caps the predicted cells; a rerun with --overwrite drops stale outputs.
    generate.main(generate.parse_args([
        "--model_dir", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
        "--tasks", "predict", "--max_cells", "7", "--overwrite",
    ]))
    assert len(pd.read_csv(out / "predictions.csv")) == 7
    assert not (out / "generated_cells.txt").exists()


def test_left_padding_gives_the_answers_of_single_prompts(one_thread, model_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(model_dir, "cpu")
    genes = [g for markers in MARKERS.values() for g in markers]
    prompts = [encode_prompt(tokenizer, prediction_prompt(genes[i : i + n])) for i, n in
               [(0, 10), (8, 3), (16, 7), (24, 1), (3, 9)]]
    assert len({len(p) for p in prompts}) == 5
    kwargs = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
              "max_new_tokens": 6}
    batched = generate_batched(model, prompts, batch_size=5, **kwargs)
    single = [generate_batched(model, [p], batch_size=1, **kwargs)[0] for p in prompts]
    assert [decode_answer(tokenizer, a) for a in batched] == [decode_answer(tokenizer, a) for a in single]
    assert all(decode_answer(tokenizer, a) for a in single)


def test_helpers() -> None:
    ids, mask = left_pad([[1], [2, 3, 4], []], pad_id=9)
    assert ids.tolist() == [[9, 9, 1], [2, 3, 4], [9, 9, 9]]
    assert mask.tolist() == [[0, 0, 1], [1, 1, 1], [0, 0, 0]]
    assert allocate_counts({"a": 5, "b": 1}, max_cells=3) == {"a": 2, "b": 1}
    ids, n = shorten_to_fit(lambda n: list(range(5 + 2 * n)), 10, 12)
    assert n == 3 and len(ids) == 11


def test_bad_flags(model_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--model_dir"):
        generate.parse_args([])
    with pytest.raises(InputError, match="--tasks"):
        generate.parse_args(["--model_dir", str(model_dir), "--tasks", "predict,dance"])
    with pytest.raises(InputError, match="no split"):
        generate.main(generate.parse_args([
            "--model_dir", str(model_dir), "--data_dir", str(data_dir), "--split", "nope",
            "--output_dir", str(tmp_path / "x")]))
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "metrics.json").write_text("{}")
    with pytest.raises(InputError, match="--overwrite"):
        generate.main(generate.parse_args([
            "--model_dir", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "y")]))
