"""Multi-cell tasks: train.py --multi_cell_column, predict.py's group predictions, generate.py's groups.

One small pipeline: synthetic counts whose sample (independent of the cell type) has marker genes ->
transform.py --obs_columns sample -> a tiny from-scratch model trained on the two multi-cell tasks ->
predict.py on the test split (groups of 4 cells) -> generate.py groups.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from datasets import Dataset
from helpers import tiny_model_flags, train_on_attribute

import train
from utils.cli import InputError
from utils.models.examples import parse_tasks
from utils.models.multi_cell import (
    C2S_SCALE_MULTI_CELL_GENERATION_TEMPLATES,
    C2S_SCALE_MULTI_CELL_PREDICTION_TEMPLATES,
    MULTI_CELL_GENERATION,
    MULTI_CELL_PREDICTION,
    draw_groups,
    fill_multi_cell_prompt,
    join_cells,
    multi_cell_example,
    multi_cell_examples,
    multi_cell_templates,
    partition_groups,
    split_cells,
)
from utils.models.prompts import prompt_format
from utils.models.recipe import Recipe

TINY = tiny_model_flags(16)
SAMPLES = ("s1", "s2", "s3")


class Tok:
    """A whitespace word tokenizer, enough for the example builders (one token per word)."""

    bos_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [hash(w) % 1000 + 2 for w in text.split()]}


# --------------------------------------------------------------------------- units


def test_c2s_scale_templates_are_verbatim_and_name_the_column() -> None:
    assert len(C2S_SCALE_MULTI_CELL_PREDICTION_TEMPLATES) == 15 and len(C2S_SCALE_MULTI_CELL_GENERATION_TEMPLATES) == 14
    assert C2S_SCALE_MULTI_CELL_PREDICTION_TEMPLATES[0] == (
        "The following is a list of {num_genes} gene names ordered by descending expression level for {num_cells} "
        "different {organism} cells. Your task is to give the tissue which these cells belong to based on their gene "
        "expression.\nCell sentences:\n{multi_cell_sentences}.\nThe tissue which these cells belong to is:")
    assert C2S_SCALE_MULTI_CELL_GENERATION_TEMPLATES[0] == (
        "Generate a list of {num_genes} genes in order of descending expression for {num_cells} different {organism} "
        "cells from a {tissue} tissue.\nCell sentences:\n")
    fmt = prompt_format("c2s_scale")
    assert multi_cell_templates(fmt, MULTI_CELL_PREDICTION, "tissue") == C2S_SCALE_MULTI_CELL_PREDICTION_TEMPLATES
    prompt = fill_multi_cell_prompt(fmt, multi_cell_templates(fmt, MULTI_CELL_PREDICTION, "tissue")[0],
                                    column="tissue", cells=[["A", "B"], ["C", "D"]])
    assert prompt == ("The following is a list of 2 gene names ordered by descending expression level for 2 different "
                      "Homo sapiens cells. Your task is to give the tissue which these cells belong to based on their "
                      "gene expression.\nCell sentences:\nA B\nC D.\nThe tissue which these cells belong to is:")
    gen = fill_multi_cell_prompt(fmt, multi_cell_templates(fmt, MULTI_CELL_GENERATION, "sample")[0], column="sample",
                                 n_genes=5, n_cells=3, label="s1")
    assert gen == ("Generate a list of 5 genes in order of descending expression for 3 different Homo sapiens cells "
                   "from a s1 sample.\nCell sentences:\n")
    assert "tissue" not in "".join(multi_cell_templates(fmt, MULTI_CELL_PREDICTION, "sample"))


def test_cells_join_and_split_back() -> None:
    for name in ("ours", "c2s_scale"):
        fmt = prompt_format(name)
        text = join_cells(fmt, [["A", "B"], ["C"]]) + fmt.answer_suffix
        assert split_cells(fmt, text) == ["A B", "C"]
    assert join_cells(prompt_format("ours"), [["A", "B"], ["C"]]) == "A B | C"


def test_groups_stay_within_their_split() -> None:
    values = ["a", "a", "b", "b", "b", None, "a", "b"]
    groups = draw_groups(values, cells_per_example=2, n_groups=6, seed=3, split="train")
    assert [g for g, _ in groups] == ["a", "b"] * 3
    for label, rows in groups:
        assert len(rows) == 2 and all(values[i] == label for i in rows)
    assert groups == draw_groups(values, cells_per_example=2, n_groups=6, seed=3, split="train")  # seeded
    parts = partition_groups(values, len(values), cells_per_example=2, seed=0)
    assert sorted(i for _, rows in parts for i in rows) == [0, 1, 2, 3, 4, 6, 7]
    assert [len(rows) for _, rows in parts] == [2, 1, 2, 2]
    # Built per split: the example of a train split holds train cells only.
    train_split = Dataset.from_dict({"cell_sentence": ["TRAIN1 G", "TRAIN2 G", "TRAIN3 G", "TRAIN4 G"],
                                     "sample": ["a", "a", "b", "b"]})
    out = multi_cell_examples(train_split, "train", tokenizer=_Vocab(), tasks={MULTI_CELL_PREDICTION: 1.0},
                              column="sample", cells_per_example=2, top_k=5, max_length=200, seed=0)
    assert len(out["task"]) == 2 and out["task"] == [MULTI_CELL_PREDICTION] * 2
    words = {w for ids in out["input_ids"] for w in _Vocab.decode(ids)}
    assert {"TRAIN1", "TRAIN2", "TRAIN3", "TRAIN4"} <= words and not any(w.startswith("TEST") for w in words)


class _Vocab(Tok):
    """A tokenizer that can be decoded: ids of words seen so far."""

    words: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.words.setdefault(w, len(self.words) + 2) for w in text.split()]}

    @classmethod
    def decode(cls, ids):
        back = {v: k for k, v in cls.words.items()}
        return [back[i] for i in ids if i in back]


def test_the_context_limit_drops_genes_evenly_and_keeps_the_answer() -> None:
    fmt = prompt_format("ours")
    cells = [[f"G{c}_{g}" for g in range(30)] for c in range(4)]
    template = multi_cell_templates(fmt, MULTI_CELL_PREDICTION, "sample")[0]
    tok = _Vocab()
    example, n = multi_cell_example(tok, cells, "donor A", task=MULTI_CELL_PREDICTION, template=template,
                                    max_length=80, fmt=fmt, column="sample")
    assert len(example["input_ids"]) <= 80 and 0 < n < 30
    words = _Vocab.decode(example["input_ids"])
    for c in range(4):  # every cell keeps its top n genes, no more
        assert [w for w in words if w.startswith(f"G{c}_")] == [f"G{c}_{g}" for g in range(n)]
    answer = [i for i in example["labels"] if i != -100]
    assert _Vocab.decode(answer[:-1]) == ["donor", "A"] and answer[-1] == 1
    gen, m = multi_cell_example(tok, cells, "donor A", task=MULTI_CELL_GENERATION,
                                template=multi_cell_templates(fmt, MULTI_CELL_GENERATION, "sample")[0],
                                max_length=90, fmt=fmt, column="sample")
    assert len(gen["input_ids"]) <= 90 and gen["labels"][-1] == 1
    answer_words = _Vocab.decode([i for i in gen["labels"] if i != -100])
    assert answer_words.count("|") == 3 and sum(w.startswith("G0_") for w in answer_words) == m
    with pytest.raises(ValueError, match="does not fit"):
        multi_cell_example(tok, cells, "donor A", task=MULTI_CELL_PREDICTION, template=template, max_length=10,
                           fmt=fmt, column="sample")


def test_without_the_flags_examples_and_tokenizer_words_are_unchanged(tmp_path: Path) -> None:
    from utils.models.build import build_model_and_tokenizer, iter_top_genes
    from utils.models.prompts import prompt_words
    from utils.models.tokenizer import build_word_tokenizer
    from utils.models.train_data import tokenize_split

    split = Dataset.from_dict({"cell_sentence": ["A B C D", "B C D A", "C D A B", "D A B C"],
                               "cell_type": ["x", "y", "x", "y"], "sample": ["a", "a", "b", "b"]})
    args = train.parse_args(["--init_from_scratch", "True", "--n_layer", "1", "--n_embd", "8", "--n_head", "1",
                             "--top_k_genes", "4", "--output_dir", str(tmp_path)])
    tasks = parse_tasks("conditional_generation,unconditional_generation,cell_type_prediction")
    _, tokenizer = build_model_and_tokenizer(args, split, None)
    today = build_word_tokenizer(iter_top_genes(split, 4), extra_words=prompt_words(["x", "y"], max_number=1024),
                                 model_max_length=1024)
    assert tokenizer.get_vocab() == today.get_vocab()
    plain = tokenize_split(split, "train", args, tokenizer, tasks, 64)
    old = SimpleNamespace(data=SimpleNamespace(**{k: v for k, v in vars(args.data).items()
                                                  if k not in ("multi_cell_column", "cells_per_example")}),
                          training=args.training)
    assert plain.to_dict() == tokenize_split(split, "train", old, tokenizer, tasks, 64).to_dict()
    assert "multi_cell_column" not in Recipe().to_dict()
    # With the flag: the multi-cell words and group labels join the vocabulary.
    args.data.multi_cell_column = "sample"
    _, multi = build_model_and_tokenizer(args, split, None)
    assert {"|", "a", "b", "sample"} <= set(multi.get_vocab()) and set(today.get_vocab()) <= set(multi.get_vocab())


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def pipeline(one_thread, tmp_path_factory) -> dict[str, Path]:
    return train_on_attribute(tmp_path_factory.mktemp("multicell"), "sample", SAMPLES, 360, [
        "--run_name", "groups", "--max_steps", "300", "--multi_cell_column", "sample", "--cells_per_example", "4",
        "--tasks", "multi_cell_prediction,multi_cell_generation", "--task_weights", "3,1", *TINY])


def test_the_recipe_records_the_grouping(pipeline) -> None:
    recipe = Recipe.read(pipeline["model"])
    assert recipe.multi_cell_column == "sample" and recipe.cells_per_example == 4
    assert recipe.group_labels == list(SAMPLES)
    assert recipe.tasks == ["multi_cell_prediction", "multi_cell_generation"]
    record = json.loads((pipeline["model"] / "train_args.json").read_text())
    counts = record["train_examples"]["task_counts"]
    assert set(counts) == {"multi_cell_prediction", "multi_cell_generation"}
    assert counts["multi_cell_prediction"] > 2 * counts["multi_cell_generation"] > 0
    card = (pipeline["model"] / "README.md").read_text()
    assert "Groups of 4 cells by `sample`:\n\n- `sample` (3 labels): `s1`, `s2`, `s3`" in card


def test_a_missing_multi_cell_column_is_one_sentence(pipeline, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="--multi_cell_column"):
        train.main(train.parse_args(["--data_dir", str(pipeline["tx"] / "cell_sentences_hf"), "--output_dir",
                                     str(tmp_path), "--run_name", "x", "--max_steps", "1",
                                     "--multi_cell_column", "donor", *TINY]))


def test_groups_are_predicted_above_the_majority_baseline(pipeline, tmp_path: Path) -> None:
    import predict

    out = tmp_path / "groups"
    metrics = predict.main(predict.parse_args(["--model_dir", str(pipeline["model"]), "--data_dir",
                                               str(pipeline["tx"] / "cell_sentences_hf"), "--split", "test",
                                               "--multi_cell_column", "sample", "--output_dir", str(out)]))
    table = pd.read_csv(out / "group_predictions.csv")
    assert list(table.columns) == ["group", "n_cells", "predicted_sample", "sample_score", "sample"]
    members = pd.read_csv(out / "group_members.csv")
    test_cells = pd.DataFrame(Dataset.load_from_disk(str(pipeline["tx"] / "cell_sentences_hf" / "test")).to_pandas())
    truth = dict(zip(test_cells["cell_name"], test_cells["sample"], strict=True))
    assert sorted(members["cell_name"]) == sorted(test_cells["cell_name"])  # every test cell in one group
    for group, rows in members.groupby("group"):  # a group's cells share its label
        row = table.set_index("group").loc[group]
        assert {truth[c] for c in rows["cell_name"]} == {row["sample"]} and row["n_cells"] == len(rows) <= 4
    assert set(table["predicted_sample"]) <= set(SAMPLES) and table["sample_score"].between(0, 1).all()
    summary = metrics["group_prediction"]
    accuracy = float((table["predicted_sample"] == table["sample"]).mean())
    assert summary["accuracy"] == pytest.approx(accuracy) and summary["n_groups"] == len(table)
    print(f"group accuracy {accuracy:.3f} vs majority {summary['majority_baseline']:.3f} ({len(table)} groups)")
    assert accuracy > summary["majority_baseline"] + 0.2
    assert json.loads((out / "metrics.json").read_text())["group_prediction"]["accuracy"] == pytest.approx(accuracy)

    # eval/prediction.py scores the groups as predict.py did
    from eval import prediction as eval_prediction

    scored = eval_prediction.main(eval_prediction.parse_args(["--predictions", str(out / "group_predictions.csv"),
                                                              "--transform_dir", str(pipeline["tx"]),
                                                              "--output_dir", str(tmp_path / "eval")]))
    assert scored["unit"] == "group" and scored["n_groups"] == len(table) and "pca_knn" not in scored["baselines"]
    assert scored["accuracy"] == pytest.approx(accuracy)
    assert scored["majority_baseline"] == pytest.approx(summary["majority_baseline"])
    per_class = pd.read_csv(tmp_path / "eval" / "per_class.csv")
    assert set(per_class["sample"]) == set(table["sample"]) and (tmp_path / "eval" / "confusion_matrix.png").is_file()


def test_generate_writes_groups_of_the_requested_labels(pipeline, tmp_path: Path) -> None:
    import generate

    out = tmp_path / "gen"
    metrics = generate.main(generate.parse_args([
        "--model_dir", str(pipeline["model"]), "--data_dir", str(pipeline["tx"] / "cell_sentences_hf"),
        "--multi_cell_column", "sample", "--groups", "s1,s3", "--n_per_type", "2", "--output_dir", str(out),
        "--seed", "1"]))
    table = pd.read_csv(out / "generated_groups.csv")
    assert list(table.columns) == ["cell_name", "cell_sentence", "group", "requested_sample"]
    assert table["group"].nunique() == 4 and metrics["n_groups"] == 4
    per_group = table.groupby("group")
    assert per_group.size().max() <= 4 and (per_group["requested_sample"].nunique() == 1).all()
    assert sorted(per_group["requested_sample"].first()) == ["s1", "s1", "s3", "s3"]
    vocab = set((pipeline["tx"] / "cell_sentences" / "vocab.txt").read_text().split())
    words = " ".join(table["cell_sentence"]).split()
    assert "|" not in words and sum(w in vocab for w in words) / len(words) > 0.8  # cells of genes
    assert metrics["generation"]["sentences"]["valid_gene_rate"] > 0.8
    groups = metrics["generation"]["groups"]
    assert groups["n_generated_groups"] == 4 and groups["cells_per_group"] == 4
    assert groups["group_knn_ceiling"] >= groups["group_majority_baseline"] and 0 <= groups["group_knn_accuracy"] <= 1
    # eval/generation.py scores the same groups the same way
    from eval import generation as eval_generation

    scored = eval_generation.main(eval_generation.parse_args(["--generated_dir", str(out), "--data_dir",
                                                              str(pipeline["tx"] / "cell_sentences_hf"),
                                                              "--seed", "1", "--output_dir", str(tmp_path / "eval")]))
    assert scored["groups"] == groups and scored["label_column"] == "sample"
    assert set(pd.read_csv(tmp_path / "eval" / "per_type.csv")["sample"]) == {"s1", "s3"}
    with pytest.raises(InputError, match="--groups"):
        generate.main(generate.parse_args(["--model_dir", str(pipeline["model"]), "--multi_cell_column", "sample",
                                           "--groups", "s9", "--output_dir", str(tmp_path / "bad")]))


def test_a_resume_continues_the_grouping_as_recorded(pipeline, tmp_path: Path) -> None:
    data = str(pipeline["tx"] / "cell_sentences_hf")
    first = ["--data_dir", data, "--output_dir", str(tmp_path), "--run_name", "r", "--max_steps", "2", "--save_steps",
             "2", "--multi_cell_column", "sample", "--cells_per_example", "3", "--tasks",
             "multi_cell_prediction,cell_type_prediction", *TINY]
    train.main(train.parse_args(first))
    resumed = train.main(train.parse_args(["--output_dir", str(tmp_path), "--run_name", "r", "--checkpoint", "latest",
                                           "--max_steps", "4", *TINY]))
    recipe = Recipe.read(resumed)
    assert (recipe.multi_cell_column, recipe.cells_per_example) == ("sample", 3)
    assert "multi_cell_prediction" in recipe.tasks
    with pytest.raises(InputError, match="--cells_per_example 4 differs from the 3"):
        train.main(train.parse_args(["--output_dir", str(tmp_path), "--run_name", "r", "--checkpoint", "latest",
                                     "--max_steps", "6", "--cells_per_example", "4", *TINY]))


@pytest.mark.parametrize("script", ["predict", "generate"])
def test_groups_under_torchrun_are_one_sentence(script: str, monkeypatch, tmp_path: Path) -> None:
    import importlib

    from utils.models.distributed import Processes

    module = importlib.import_module(script)
    monkeypatch.setattr(Processes, "start", classmethod(lambda cls: Processes(0, 2, 0)))
    args = module.parse_args(["--model_dir", str(tmp_path), "--data_dir", str(tmp_path), "--multi_cell_column",
                              "sample", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(InputError, match="runs in one process"):
        module.main(args)
    assert not (tmp_path / "out").exists()
