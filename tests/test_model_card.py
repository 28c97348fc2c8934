"""The model card of a train.py run (issue 20, section 3): README.md states the run's real values,
the eval scripts' figures are added to it, a README.md of the user's is kept, and --push_to_hub
uploads exactly the published run folder, whose copy loads and predicts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from helpers_models import make_published_model
from helpers_train import BACKGROUND, MARKERS, make_dataset_dir
from huggingface_hub import HfApi, ModelCard

import train
from utils.cli import InputError
from utils.models.cell_model import CellSentenceModel
from utils.models.model_card import (
    EVALUATIONS_FILE,
    FIGURES_DIR,
    MARKER,
    USER_README_CARD_FILE,
    add_evaluation_to_card,
    recorded_model_dir,
    render_card,
    run_facts,
)
from utils.models.run_folder import HubPush, hub_push, push_run

TINY = ["--init_from_scratch", "True", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--n_positions", "128",
        "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--disable_tqdm", "True", "--seed", "3"]
RECIPE = ["--tasks", "cell_type_prediction,conditional_generation", "--task_weights", "3,1", "--top_k_genes", "12"]
CELLS = ["CD14 LYZ S100A8 S100A9 FCN1 VCAN", "CD79A MS4A1 CD79B BANK1 IGHM CD74"]


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    """A dataset as transform.py leaves it: its args (input file, sentence options) and vocabulary beside it."""
    root = tmp_path_factory.mktemp("tx")
    (root / "cell_sentences").mkdir()
    genes = sorted({g for markers in MARKERS.values() for g in markers} | set(BACKGROUND))
    (root / "cell_sentences" / "vocab.txt").write_text("".join(f"{g} 10\n" for g in genes))
    (root / "transform_args.json").write_text(json.dumps(
        {"data_filepath": "/data/pbmc_mine.h5ad", "target_sum": 10000.0, "exclude_genes": "^MT-", "seed": 1}))
    return make_dataset_dir(root / "cell_sentences_hf", n_train=48, n_valid=8, n_test=8, n_genes=30)


@pytest.fixture(scope="module")
def run(one_thread, cells, tmp_path_factory) -> Path:
    return train.main(train.parse_args([
        "--data_dir", str(cells), "--output_dir", str(tmp_path_factory.mktemp("runs")), "--run_name", "card",
        "--max_steps", "6", "--logging_steps", "2", "--save_steps", "3", "--eval_strategy", "steps",
        "--eval_steps", "3", "--max_train_samples", "40", "--max_eval_samples", "6", *TINY, *RECIPE]))


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def resume(run: Path, steps: int) -> Path:
    return train.main(train.parse_args(["--output_dir", str(run.parent), "--run_name", run.name, "--checkpoint",
                                        "latest", "--max_steps", str(steps), "--save_steps", "3", *TINY]))


def test_the_card_states_the_runs_values(run: Path) -> None:
    card = ModelCard.load(run / "README.md")  # the hub's reader
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None  # trained from scratch
    assert {"cell2sentence", "single-cell"} <= set(card.data.tags)
    text = (run / "README.md").read_text()
    assert MARKER in text and text == render_card(run)  # rendered again: the same bytes
    results, record = read(run / "train_results.json"), read(run / "train_args.json")
    counts = record["train_examples"]["task_counts"]
    assert sum(counts.values()) == 40
    for row in ["| Base model | none: trained from scratch |", "| Weights | full model |",
                "| Architecture | gpt2, layers 1, hidden size 32, heads 2, context 128 |",
                "| Source files | `pbmc_mine.h5ad` |",
                "| Cells | train 48 (40 trained on); valid 8 (6 for the eval loss); test 8 |",
                f"| Genes in the vocabulary | {len(set(BACKGROUND)) + 32} |",
                "| Prompt format | ours |", "| Organism | Homo sapiens |", "| Genes per cell (top K) | 12 |",
                "| Transform options | exclude_genes ^MT-, seed 1, target_sum 10,000 |",
                f"| cell_type_prediction | 0.75 | {counts['cell_type_prediction']} |",
                f"| conditional_generation | 0.25 | {counts['conditional_generation']} |",
                "- `cell_type` (4 labels): `B cell`, `CD14+ Monocyte`, `CD4 T cell`, `NK cell`",
                "| Steps | 6 |", f"| Train loss (mean over the run) | {results['train_loss']:.4g} |",
                f"| Eval loss | {results['eval_loss']:.4g} |", "| Batch size per device × accumulation | 8 × 1 |",
                "| Learning rate | 0.005 (linear) |", "| Seed | 3 |", "| Resumed | no |",
                f"python predict.py --model_dir {run} --h5ad my_cells.h5ad",
                f'model = CellSentenceModel.load("{run}")', "cells = model.generate_cells(['B cell'], n_per_type=5)",
                "Not evaluated yet"]:
        assert row in text, row
    log = read(run / "train_log.json")
    losses = {e["step"]: e["loss"] for e in log if "loss" in e}
    evals = {e["step"]: e["eval_loss"] for e in log if "eval_loss" in e}
    assert sorted(losses) == [2, 4, 6] and sorted(evals) == [3, 6]
    assert f"| 6 | {losses[6]:.4g} | {evals[6]:.4g} |" in text and f"| 3 | – | {evals[3]:.4g} |" in text
    assert "--unconditional" not in text  # not trained for it
    assert record["data_summary"]["cells"] == {"train": 48, "valid": 8, "test": 8}  # recorded for the card


def test_many_labels_are_counted_and_the_first_listed(run: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(run, tmp_path / "many", ignore=shutil.ignore_patterns("checkpoints"))
    recipe = read(copy / "recipe.json")
    recipe["label_columns"] = {"cell_type": [f"type {i:02d}" for i in range(30)], "tissue": ["blood", "gut"]}
    (copy / "recipe.json").write_text(json.dumps(recipe))
    text = render_card(copy)
    assert "- `cell_type` (30 labels): `type 00`, `type 01`" in text and "`type 19` … and 10 more" in text
    assert "`type 20`" not in text and "- `tissue` (2 labels): `blood`, `gut`" in text


def test_evaluations_fill_the_card_and_a_new_training_drops_them(run: Path, tmp_path: Path, caplog) -> None:
    copy = shutil.copytree(run, tmp_path / "runs" / "card")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "confusion_matrix.png").write_bytes(b"\x89PNG fake figure")
    metrics = {"accuracy": 0.875, "balanced_accuracy": 0.8, "majority_baseline": 0.25, "n_cells": 8,
               "per_class": [1, 2], "majority": {"accuracy": 0.25, "label": "B cell"},
               "baselines": {"majority": {"accuracy": 0.25}}}  # too deep for the card: left out
    card = add_evaluation_to_card(copy, "prediction", metrics, figures={"Confusion matrix": out / "confusion_matrix.png"},
                                  source=out)
    assert card == copy / "README.md"
    text = card.read_text()
    assert "Not evaluated yet" not in text and "### Prediction" in text and f"All results: `{out}`." in text
    assert "| accuracy | 0.875 |" in text and "| n_cells | 8 |" in text
    assert "per_class" not in text and "baselines" not in text
    assert "|  | accuracy | label |" in text and "| majority | 0.25 | B cell |" in text
    assert "![Confusion matrix](model_card_figures/prediction/confusion_matrix.png)" in text
    assert (copy / FIGURES_DIR / "prediction" / "confusion_matrix.png").read_bytes() == b"\x89PNG fake figure"
    assert read(copy / EVALUATIONS_FILE)["prediction"]["metrics"]["accuracy"] == 0.875
    # the same evaluation again: the same bytes; rendered from the records: the same card
    add_evaluation_to_card(copy, "prediction", metrics, figures={"Confusion matrix": out / "confusion_matrix.png"},
                           source=out)
    assert card.read_text() == text == render_card(copy)
    per_column = {"cell_type": {"accuracy": 0.9, "macro_f1": 0.7}, "tissue": {"accuracy": 0.6, "macro_f1": 0.5}}
    add_evaluation_to_card(copy, "embedding", {"knn_accuracy": 0.75, **per_column})
    text = card.read_text()
    assert text.index("### Embedding") < text.index("### Prediction")  # sorted by name
    assert "|  | accuracy | macro_f1 |" in text and "| tissue | 0.6 | 0.5 |" in text
    assert not [p for p in copy.iterdir() if p.name.startswith(".")]  # published: no staging, no lock
    # no train.py run folder (a hub name, a missing folder): nothing written
    assert add_evaluation_to_card("vandijklab/C2S-Pythia-410m", "prediction", metrics) is None
    assert add_evaluation_to_card(None, "prediction", metrics) is None
    # a missing figure: a warning, nothing added
    with caplog.at_level(logging.WARNING, logger="cell2sentence"):
        assert add_evaluation_to_card(copy, "generation", {"mmd": 0.1}, figures={"PCA": out / "gone.png"}) is None
    assert "generation evaluation was not added" in caplog.text and "### Generation" not in card.read_text()
    # new weights: their evaluations are gone, the card is rendered again
    resume(copy, 8)
    text = card.read_text()
    assert "Not evaluated yet" in text and "| Steps | 8 |" in text and "| Resumed | from step 6 to 8 |" in text
    assert not (copy / EVALUATIONS_FILE).exists() and not (copy / FIGURES_DIR).exists()


def test_the_model_dir_an_eval_scores_is_read_from_the_steps_record(tmp_path: Path) -> None:
    (tmp_path / "predict_args.json").write_text(json.dumps({"model_dir": "data/model/r", "split": "test"}))
    assert recorded_model_dir(tmp_path) == "data/model/r" and recorded_model_dir(tmp_path / "none") is None


def test_a_readme_of_the_users_is_kept(run: Path, tmp_path: Path, caplog) -> None:
    copy = shutil.copytree(run, tmp_path / "runs" / "card")
    (copy / "README.md").write_text("# my notes on this run\n")
    with caplog.at_level(logging.WARNING, logger="cell2sentence"):
        resume(copy, 8)
    assert (copy / "README.md").read_text() == "# my notes on this run\n"
    assert f"{copy / 'README.md'} is yours, so it stays; the model card is {copy / USER_README_CARD_FILE}" in caplog.text
    card = (copy / USER_README_CARD_FILE).read_text()
    assert MARKER in card and "| Steps | 8 |" in card
    assert add_evaluation_to_card(copy, "prediction", {"accuracy": 0.5}) == copy / USER_README_CARD_FILE
    assert (copy / "README.md").read_text() == "# my notes on this run\n"
    # once the user's README.md is gone, the card is README.md again and MODEL_CARD.md goes
    (copy / "README.md").unlink()
    resume(copy, 10)
    assert MARKER in (copy / "README.md").read_text() and not (copy / USER_README_CARD_FILE).exists()


def test_a_lora_runs_card(one_thread, cells, tmp_path: Path) -> None:
    base = make_published_model(tmp_path / "hub" / "C2S-tiny", seed=1)
    run = train.main(train.parse_args([
        "--data_dir", str(cells), "--output_dir", str(tmp_path / "runs"), "--run_name", "lora", "--model_name",
        str(base), "--max_steps", "2", "--merge_lora", "True", "--prompt_format", "c2s_scale", "--tasks",
        "cell_type_prediction", "--top_k_genes", "6", "--per_device_train_batch_size", "8", "--disable_tqdm", "True",
        "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0"]))
    adapter, merged = ModelCard.load(run / "README.md"), ModelCard.load(run / "merged" / "README.md")
    assert adapter.data.library_name == "peft" and merged.data.library_name == "transformers"
    assert "lora" in adapter.data.tags and adapter.data.base_model is None  # a local base: no hub name
    text = adapter.text
    assert "[More Information Needed]" not in text  # peft's template is gone
    assert f"fine-tuned from the local model `{base}`" in text and "| Prompt format | c2s_scale |" in text
    assert "LoRA adapter (rank 4, alpha 8, dropout 0, modules " in text and "merged: `merged/`" in text
    assert "The adapter loads with its base model" in text
    merged_text = merged.text
    assert "# lora (merged)" in merged_text and "merged into the base model's weights" in merged_text
    assert f'CellSentenceModel.load("{run}/merged")' in merged_text and "| Steps | 2 |" in merged_text
    # fine-tuned from a hub model: its name is the card's base_model
    record = read(run / "train_args.json")
    (run / "train_args.json").write_text(json.dumps({**record, "base_model": "vandijklab/C2S-tiny"}))
    hub_card = ModelCard(render_card(run))
    assert hub_card.data.base_model == "vandijklab/C2S-tiny" and hub_card.data.library_name == "peft"
    assert "[vandijklab/C2S-tiny](https://huggingface.co/vandijklab/C2S-tiny)" in hub_card.text


def test_run_facts_name_a_hub_base_model_only(tmp_path: Path) -> None:
    args = train.parse_args(["--model_name", "vandijklab/C2S-Pythia-410m"])
    dataset = {"train": [1, 2, 3], "test": [1], "valid": [1, 2]}
    facts = run_facts(args.model, args.data, dataset, [1, 2], None)
    assert facts["base_model"] == "vandijklab/C2S-Pythia-410m"
    assert facts["data_summary"] == {"cells": {"train": 3, "valid": 2, "test": 1}, "train_cells": 2,
                                     "eval_cells": 0, "sources": []}
    args.model.model_name = str(tmp_path)  # a local folder
    assert run_facts(args.model, args.data, dataset, [1], None)["base_model"] is None
    args.model.init_from_scratch = True
    assert run_facts(args.model, args.data, dataset, [1], None)["base_model"] is None


@pytest.fixture
def fake_hub(monkeypatch, tmp_path: Path) -> dict:
    """HfApi's create_repo and upload_folder without a hub: the upload copies what the real
    upload_folder would send (its own file selection, README.md's front matter read by
    ModelCard) into ``hub["repo"]`` and deletes there what its delete_patterns match."""
    from huggingface_hub.utils import filter_repo_objects

    hub: dict = {"calls": [], "repo": tmp_path / "hub_repo"}
    hub["repo"].mkdir()

    def create_repo(self, repo_id, **kwargs):
        hub["calls"].append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"me/{repo_id}"})()

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, delete_patterns=None, **kwargs):
        hub["calls"].append(("upload_folder", repo_id, {"folder_path": folder_path, **kwargs}))
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

        monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kw: ModelCard(content))
        added = {op.path_in_repo: op.path_or_fileobj for op in self._prepare_upload_folder_additions(
            folder_path, None, ignore_patterns=[*ignore_patterns, *DEFAULT_IGNORE_PATTERNS])}
        remote = [p.relative_to(hub["repo"]).as_posix() for p in hub["repo"].rglob("*") if p.is_file()]
        for stale in filter_repo_objects(remote, allow_patterns=delete_patterns):
            if stale not in added:
                (hub["repo"] / stale).unlink()
        for name, source in added.items():
            (hub["repo"] / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, hub["repo"] / name)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return hub


def test_push_to_hub_uploads_the_published_run_folder(one_thread, cells, tmp_path: Path, fake_hub, monkeypatch) -> None:
    from transformers import Trainer

    def no_trainer_push(*args, **kwargs):
        raise AssertionError("the Trainer pushed (its output folder is checkpoints/, without card and recipe)")

    for name in ("push_to_hub", "init_hf_repo", "_push_from_checkpoint"):
        monkeypatch.setattr(Trainer, name, no_trainer_push)
    (fake_hub["repo"] / "adapter_model.safetensors").write_text("an earlier push's adapter")
    (fake_hub["repo"] / "LICENSE").write_text("the user's, on the hub")
    run = train.main(train.parse_args([
        "--data_dir", str(cells), "--output_dir", str(tmp_path / "runs"), "--run_name", "pushed", "--max_steps", "4",
        "--save_steps", "2", "--push_to_hub", "True", "--hub_model_id", "me/tiny-c2s", *TINY, *RECIPE]))
    (created, upload) = fake_hub["calls"]
    assert created[:2] == ("create_repo", "me/tiny-c2s") and created[2]["exist_ok"] is True
    assert upload[:2] == ("upload_folder", "me/tiny-c2s") and Path(upload[2]["folder_path"]) == run
    pushed = sorted(p.relative_to(fake_hub["repo"]).as_posix() for p in fake_hub["repo"].rglob("*") if p.is_file())
    assert pushed == sorted(["LICENSE", "README.md", "config.json", "generation_config.json", "model.safetensors",
                             "recipe.json", "tokenizer.json", "tokenizer_config.json", "train_args.json",
                             "train_log.json", "train_results.json"])
    local = sorted(p.name for p in run.iterdir() if p.is_file() and not p.name.startswith("."))
    assert local == [p for p in pushed if p != "LICENSE"]  # the run folder, its checkpoints left out
    for name in local:
        assert (fake_hub["repo"] / name).read_bytes() == (run / name).read_bytes(), name
    card = (fake_hub["repo"] / "README.md").read_text()
    assert 'CellSentenceModel.load("me/tiny-c2s")' in card and read(run / "train_args.json")["hub_repo"] == "me/tiny-c2s"
    # pulled from the hub, the folder works as the local one
    pulled = CellSentenceModel.load(fake_hub["repo"], device="cpu")
    assert pulled.top_k_genes == 12 and pulled.label_set() == sorted(MARKERS)
    predicted = pulled.predict_cell_types(CELLS)
    assert set(predicted) <= set(MARKERS) and predicted == CellSentenceModel.load(run, device="cpu").predict_cell_types(CELLS)


def test_push_failures_are_one_sentence(run: Path, monkeypatch) -> None:
    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    monkeypatch.setattr(HfApi, "upload_folder", offline)
    args = train.parse_args(["--push_to_hub", "True"]).training
    with pytest.raises(InputError, match="^--push_to_hub: the hub repository card cannot be created .no network.; log in"):
        hub_push(args, run)
    assert args.push_to_hub is False  # the Trainer never pushes
    with pytest.raises(InputError) as err:
        push_run(run, HubPush("me/card", None, None))
    assert str(err.value) == (f"The run is in {run}, but pushing it to the hub repository me/card failed (no network); "
                              f"push it again with: hf upload me/card {run} --exclude 'checkpoints/*' '.*'")


def test_the_eval_scripts_add_their_figures_to_the_scored_models_card(run: Path, cells: Path, tmp_path: Path) -> None:
    import embed
    import generate
    from eval import embedding as eval_embedding
    from eval import generation as eval_generation

    model = shutil.copytree(run, tmp_path / "runs" / "card", ignore=shutil.ignore_patterns("checkpoints"))
    generated = generate.main(generate.parse_args(["--model_dir", str(model), "--data_dir", str(cells),
                                                   "--n_per_type", "2", "--output_dir", str(tmp_path / "gen")]))
    scored = eval_generation.main(eval_generation.parse_args([
        "--generated_dir", str(tmp_path / "gen"), "--data_dir", str(cells), "--output_dir", str(tmp_path / "eg")]))
    embed.main(embed.parse_args(["--model_dir", str(model), "--data_dir", str(cells), "--output_dir",
                                 str(tmp_path / "emb")]))
    eval_embedding.main(eval_embedding.parse_args(["--embeddings", str(tmp_path / "emb"), "--transform_dir",
                                                   str(cells.parent), "--output_dir", str(tmp_path / "ee")]))
    text = (model / "README.md").read_text()
    assert "### Generation" in text and "### Embedding" in text and generated["generation"]["requested_counts"]
    assert f"| knn_accuracy | {scored['knn_accuracy']:.4g} |" in text or f"| knn_accuracy | {scored['knn_accuracy']} |" in text
    assert "model_card_figures/generation/real_vs_generated_pca.png" in text
    assert (model / FIGURES_DIR / "embedding" / "embedding_vs_pca.png").read_bytes()[:4] == b"\x89PNG"
    assert set(read(model / EVALUATIONS_FILE)) == {"generation", "embedding"}


def test_a_pushed_run_loaded_by_its_hub_name_keeps_its_recipe(run: Path, tmp_path: Path, monkeypatch) -> None:
    """The run folder as the hub cache holds it after a download of ``me/card``: loaded by name,
    offline, it has the run's recipe (not the published-model defaults) and predicts like the folder."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--me--card" / "snapshots" / ("0" * 40)
    shutil.copytree(run, snapshot, ignore=shutil.ignore_patterns("checkpoints", ".*"))
    (tmp_path / "hub" / "models--me--card" / "refs").mkdir()
    (tmp_path / "hub" / "models--me--card" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    by_name = CellSentenceModel.load("me/card", device="cpu")
    local = CellSentenceModel.load(run, device="cpu")
    assert by_name.recipe == local.recipe and by_name.prompt_format.name == "ours" and by_name.top_k_genes == 12
    assert by_name.predict_cell_types(CELLS) == local.predict_cell_types(CELLS)
