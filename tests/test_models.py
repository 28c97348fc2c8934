"""Published C2S models (hub layout, C2S-Scale prompts), CellSentenceModel, constrained generation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_models import make_published_model, word_level_model
from helpers_train import MARKERS, make_sentences

import generate
import predict
import train
from utils.models.cell_model import CellSentenceModel
from utils.models.constrain import build_gene_tries
from utils.models.examples import decode_answer, encode_answer, encode_prompt
from utils.models.prompts import prompt_format
from utils.models.recipe import Recipe

GENES = sorted({g for s in make_sentences(200)[0] for g in s.split()})


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    return make_published_model(tmp_path_factory.mktemp("hub") / "C2S-tiny")


@pytest.fixture(scope="module")
def scale_run(one_thread, published: Path, data_dir: Path, tmp_path_factory) -> Path:
    """The tiny published model fine-tuned by train.py in the C2S-Scale format."""
    out = tmp_path_factory.mktemp("runs")
    return train.main(train.parse_args([
        "--data_dir", str(data_dir), "--output_dir", str(out), "--run_name", "scale",
        "--model_name", str(published), "--prompt_format", "c2s_scale", "--tasks",
        "cell_type_prediction,conditional_generation", "--task_weights", "3,1", "--top_k_genes", "8",
        "--max_steps", "80", "--learning_rate", "3e-3", "--per_device_train_batch_size", "16",
        "--disable_tqdm", "True", "--seed", "3",
    ]))


def test_c2s_scale_format_encodes_like_the_published_package(published: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(published)
    fmt = prompt_format("c2s_scale", organism="Mus musculus")
    prompt = fmt.prediction_prompt(["CD14", "LYZ"])
    assert prompt.startswith("The following is a list of 2 gene names ordered by descending expression "
                             "level in a Mus musculus cell.")
    assert "\nCell sentence: CD14 LYZ.\nThe cell type corresponding to these genes is:" in prompt
    # The prompt is the tokenizer's own encoding; the answer follows without a space, with its period.
    assert encode_prompt(tok, prompt, fmt) == tok(prompt)["input_ids"]
    assert encode_answer(tok, fmt.prediction_answer("B cell"), fmt) == tok("B cell.", add_special_tokens=False)["input_ids"]
    assert fmt.generation_prompt("NK cell", 5).endswith("Mus musculus cell of cell type NK cell.\nCell sentence:")
    # Answers are parsed robustly: the closing period, a second line, EOS and what follows go.
    ids = tok("NK cell.\nThe next", add_special_tokens=False)["input_ids"]
    assert decode_answer(tok, ids, fmt) == "NK cell"
    assert decode_answer(tok, [*tok(" CD3E CD3D.", add_special_tokens=False)["input_ids"], tok.eos_token_id,
                               *tok("junk", add_special_tokens=False)["input_ids"]], fmt) == "CD3E CD3D"
    assert decode_answer(tok, tok(" B cell", add_special_tokens=False)["input_ids"], "ours") == "B cell"


def test_train_records_the_format_and_generate_uses_it(scale_run: Path, data_dir: Path, tmp_path: Path) -> None:
    record = json.loads((scale_run / "train_args.json").read_text())
    assert record["prompt_format"] == "c2s_scale" and record["prompt_format_details"]["answer_suffix"] == "."
    assert Recipe.from_train_record(record).prompt_format == "c2s_scale"
    assert Recipe.read(tmp_path).prompt_format == "c2s_scale"  # no record: a published model
    assert Recipe.from_train_record({"prompt_format": {"answer_prefix": " "}}).prompt_format == "ours"  # older runs
    # The fine-tuned model, stripped to the hub layout (no record, no recipe), as a user downloads it.
    hub = tmp_path / "hub-layout"
    shutil.copytree(scale_run, hub, ignore=shutil.ignore_patterns("train_*.json", "recipe.json", "checkpoints"))
    assert not (hub / "train_args.json").exists()
    metrics = predict.main(predict.parse_args([
        "--model_dir", str(hub), "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "pred"),
        "--top_k_genes", "8",
    ]))
    # Only a model asked in its own format answers this well (4 types, majority 0.25); without a
    # recorded label set it answers in free text.
    assert metrics["prediction"]["accuracy"] >= 0.9 > metrics["prediction"]["majority_baseline"]
    assert metrics["prediction"]["fraction_unknown_label"] == 0 and not metrics["constrained"]
    gen = generate.main(generate.parse_args([
        "--model_dir", str(hub), "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "gen"),
        "--top_k_genes", "8", "--n_per_type", "2", "--seed", "5",
    ]))
    assert gen["prompt_format"] == "c2s_scale"
    sentences = gen["generation"]["sentences"]
    assert sentences["valid_gene_rate"] == 1.0 and sentences["duplicate_rate"] == 0.0
    assert sentences["mean_sentence_length"] > 3
    # The same model asked in our format fails: the format matters.
    ours = predict.main(predict.parse_args([
        "--model_dir", str(hub), "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "ours"),
        "--top_k_genes", "8", "--prompt_format", "ours",
    ]))
    assert ours["prediction"]["accuracy"] < 0.9


def test_model_api_gives_the_scripts_results(scale_run: Path, data_dir: Path, tmp_path: Path) -> None:
    from datasets import load_from_disk

    out = tmp_path / "gen"
    generate.main(generate.parse_args([
        "--model_dir", str(scale_run), "--data_dir", str(data_dir), "--output_dir", str(out),
        "--n_per_type", "2", "--seed", "9", "--batch_size", "3", "--max_new_tokens", "40",
    ]))
    predict.main(predict.parse_args(["--model_dir", str(scale_run), "--data_dir", str(data_dir),
                                     "--output_dir", str(tmp_path / "pred"), "--batch_size", "3"]))
    import utils

    model = utils.CellSentenceModel.load(scale_run, device="cpu")
    assert model.prompt_format.name == "c2s_scale" and model.top_k_genes == 8
    test = load_from_disk(str(data_dir))["test"]
    table = pd.read_csv(tmp_path / "pred" / "predictions.csv", keep_default_na=False)
    result = model.predict_cell_types(test, batch_size=7, return_scores=True)
    assert result.labels == table["predicted_cell_type"].tolist()
    assert np.allclose(result.scores, table["cell_type_score"], atol=1e-6)
    assert model.predict_cell_types(test["cell_sentence"][:5]) == table["predicted_cell_type"].tolist()[:5]
    assert set(result.labels) <= set(MARKERS)  # every answer one of the model's labels
    genes = sorted({g for s in load_from_disk(str(data_dir))["train"]["cell_sentence"] for g in s.split()})
    cells = model.generate_cells({t: 2 for t in sorted(MARKERS)}, genes=genes, seed=9, batch_size=3,
                                 max_new_tokens=40)
    assert cells["cell_sentence"].tolist() == (out / "generated_cells.txt").read_text().splitlines()
    assert cells["requested_cell_type"].tolist() == [t for t in sorted(MARKERS) for _ in range(2)]


@pytest.mark.parametrize("kind", ["word-level", "bpe"])
def test_constrained_generation_names_each_real_gene_once(kind: str, published: Path, tmp_path: Path) -> None:
    path = word_level_model(tmp_path) if kind == "word-level" else published
    model = CellSentenceModel.load(path, device="cpu")
    genes = None if kind == "word-level" else GENES  # a word-level run knows its genes
    if kind == "word-level":
        assert set(model.known_genes()) == set(GENES)
    free = model.generate_cells(["B cell", "NK cell"], 3, n_genes=20, genes=genes, seed=1,
                                constrain_genes=False, top_k=0, max_new_tokens=60)
    held = model.generate_cells(["B cell", "NK cell"], 3, n_genes=20, genes=genes, seed=1, top_k=0,
                                max_new_tokens=60)

    def rates(sentences):
        words = [w for s in sentences for w in s.split()]
        dup = sum(len(s.split()) - len(set(s.split())) for s in sentences)
        return np.mean([w in set(GENES) for w in words]), dup / len(words), len(words)

    valid, dup, n = rates(held["cell_sentence"])
    assert valid == 1.0 and dup == 0.0 and n >= 6 * 10
    free_valid, free_dup, _ = rates(free["cell_sentence"])
    assert free_valid < 0.9 or free_dup > 0  # an untrained model names non-genes and repeats


def test_gene_tries_spell_genes_as_in_answers(published: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(published)
    first, rest, closing, names = build_gene_tries(tok, ["CD14", "HLA-DRA", "CD14", "LYZ"], answer_prefix="",
                                                   answer_suffix=".")
    assert names == ["CD14", "HLA-DRA", "LYZ"]  # each once
    answer = tok("HLA-DRA CD14 LYZ.", add_special_tokens=False)["input_ids"]
    # Walking the answer's ids through the tries ends in a gene at every word boundary.
    node, trie, seen = 0, first, []
    for token in answer:
        if token in trie.children[node]:
            node = trie.children[node][token]
            continue
        seen.append(names[trie.gene[node]])
        if token == closing[0]:
            break
        trie, node = rest, rest.children[0][token]
    assert seen == ["HLA-DRA", "CD14", "LYZ"] and closing[-1] == tok.eos_token_id


def test_model_api_takes_an_anndata(published: Path) -> None:
    import anndata as ad
    import scipy.sparse as sp

    from utils import adata_to_sentences

    sentences, _ = make_sentences(6, n_genes=12)
    genes = sorted({g for s in sentences for g in s.split()})
    col = {g: j for j, g in enumerate(genes)}
    counts = np.zeros((len(sentences), len(genes)), dtype=np.float32)
    for i, s in enumerate(sentences):
        for rank, g in enumerate(s.split()):
            counts[i, col[g]] = 100 - 5 * rank  # distinct counts: the order is the sentence's
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=genes),
                       obs=pd.DataFrame(index=[f"c{i}" for i in range(6)]))
    assert adata_to_sentences(adata, qc=False).sentences == sentences
    model = CellSentenceModel.load(published, device="cpu", top_k_genes=8)
    assert model.predict_cell_types(adata, max_new_tokens=4) == model.predict_cell_types(sentences, max_new_tokens=4)
    np.testing.assert_allclose(model.embed_cells(adata), model.embed_cells(sentences), atol=1e-6)


def test_unconditional_generation_keeps_its_none_type(tmp_path: Path, published: Path) -> None:
    from utils.cli import InputError

    model = CellSentenceModel.load(word_level_model(tmp_path), device="cpu")
    cells = model.generate_cells({None: 2, "B cell": 1}, n_genes=5, seed=0, max_new_tokens=8)
    assert cells["requested_cell_type"].tolist() == [None, None, "B cell"]
    assert all(cells["cell_sentence"])  # constrained: genes only
    with pytest.raises(InputError, match="any type"):
        CellSentenceModel.load(published, device="cpu").generate_cells([None], genes=GENES)
