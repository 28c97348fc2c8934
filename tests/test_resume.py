"""Resume continues the same run (issue 18): the recorded tasks, weights, top_k_genes and data
come back, a flag that contradicts them is one sentence, the run record is extended, the model
carries its recipe, and nothing of the user's in the run folder is deleted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers_train import MARKERS, make_dataset_dir

import train
from utils.cli import InputError
from utils.models.recipe import Recipe
from utils.models.run_folder import publish
from utils.models.run_record import restore_run

# Two tasks of three, weighted, and K=20 instead of the defaults (3 tasks, K=100).
RUN = [
    "--init_from_scratch", "True", "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
    "--n_positions", "128", "--per_device_train_batch_size", "8", "--learning_rate", "5e-3",
    "--disable_tqdm", "True", "--report_to", "none", "--save_steps", "2",
    "--save_strategy", "steps",
]
RECIPE = ["--tasks", "cell_type_prediction,unconditional_generation", "--task_weights", "3,1",
          "--top_k_genes", "20", "--seed", "5"]


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    return make_dataset_dir(tmp_path_factory.mktemp("cells") / "cell_sentences_hf", n_train=48,
                            n_valid=8, n_test=8, n_genes=30)


@pytest.fixture(scope="module")
def first_run(one_thread, cells, tmp_path_factory) -> Path:
    """A finished run of 4 steps with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs")
    return train.main(train.parse_args([
        "--data_dir", str(cells), "--output_dir", str(out), "--run_name", "r",
        "--max_steps", "4", *RUN, *RECIPE]))


def resume(run: Path, *extra: str) -> Path:
    """``--checkpoint latest --run_name R``: no --overwrite, no data or recipe flags."""
    return train.main(train.parse_args([
        "--output_dir", str(run.parent), "--run_name", run.name, "--checkpoint", "latest",
        *RUN, *extra]))


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_model_carries_its_recipe(first_run: Path, cells: Path) -> None:
    recipe = read(first_run / "recipe.json")
    assert recipe["tasks"] == ["cell_type_prediction", "unconditional_generation"]
    assert recipe["task_weights"] == [0.75, 0.25]
    assert recipe["top_k_genes"] == 20 and recipe["prompt_format"] == "ours"
    assert recipe["organism"] == "Homo sapiens" and recipe["published"] is False
    assert recipe["label_columns"] == {"cell_type": sorted(MARKERS)}
    assert recipe["data_dir"] == str(cells.resolve())
    run_record = read(first_run / "checkpoints" / "run_args.json")
    assert run_record["recipe"] == recipe  # what a resume reads
    assert "recipe" not in read(first_run / "train_args.json")


def test_labels_are_no_part_of_the_recipe_when_no_task_taught_them(one_thread, cells, tmp_path) -> None:
    run = train.main(train.parse_args([
        "--data_dir", str(cells), "--output_dir", str(tmp_path), "--run_name", "u", "--max_steps", "1",
        "--tasks", "unconditional_generation", *RUN]))
    assert read(run / "recipe.json")["label_columns"] == {}


def test_a_killed_run_resumes_as_recorded_and_keeps_the_users_files(first_run, cells, tmp_path) -> None:
    run = tmp_path / "runs" / "r"
    shutil.copytree(first_run, run)
    # What a run killed after checkpoint-2 leaves: no final files, no later checkpoint.
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    for p in run.iterdir():
        if p.name != "checkpoints":
            p.unlink()
    (run / "my_notes.txt").write_text("the user's")
    (run / "README.md").write_text("the user's too")
    # The recorded tasks and K come back; K given again with its recorded value is fine.
    assert resume(run, "--max_steps", "4", "--top_k_genes", "20") == run
    assert (run / "my_notes.txt").read_text() == "the user's"
    assert (run / "README.md").read_text() == "the user's too"
    record = read(run / "train_args.json")
    assert record["tasks"] == ["cell_type_prediction", "unconditional_generation"]
    assert record["task_weights"] == [0.75, 0.25] and record["top_k_genes"] == 20
    assert record["data_dir"] == str(cells) and record["seed"] == 5
    assert record["cell_types"] == sorted(MARKERS)
    assert record["train_examples"] == read(first_run / "train_args.json")["train_examples"]
    assert read(run / "recipe.json") == read(first_run / "recipe.json")
    [entry] = record["resumes"]
    assert entry["checkpoint"] == str(run / "checkpoints" / "checkpoint-2")
    assert (entry["from_step"], entry["to_step"]) == (2, 4)
    assert read(run / "train_results.json")["global_step"] == 4


def test_a_finished_run_goes_on_and_its_record_grows(first_run, tmp_path) -> None:
    run = tmp_path / "runs" / "r"
    shutil.copytree(first_run, run)
    (run / "my_notes.txt").write_text("the user's")
    # no --overwrite: the run continues, its final files are replaced
    resume(run, "--max_steps", "6", "--tasks", "cell_type_prediction,unconditional_generation",
           "--task_weights", "0.75,0.25")
    first = read(run / "train_args.json")
    assert read(run / "train_results.json")["global_step"] == 6
    assert (run / "my_notes.txt").read_text() == "the user's"
    [entry] = first["resumes"]
    assert (entry["from_step"], entry["to_step"]) == (4, 6)
    assert entry["changed"]["training.max_steps"] == [4, 6]
    assert first["top_k_genes"] == 20 and read(run / "recipe.json")["top_k_genes"] == 20
    resume(run, "--max_steps", "8")
    second = read(run / "train_args.json")
    assert [e["to_step"] for e in second["resumes"]] == [6, 8]
    assert read(run / "checkpoints" / "run_args.json")["resumes"] == second["resumes"]


@pytest.mark.parametrize("flags,message", [
    (["--top_k_genes", "30"], "--top_k_genes 30 differs from the 20 that the run being resumed was trained with"),
    # the default value, given explicitly, is still a different value
    (["--top_k_genes", "100"], "--top_k_genes 100 differs from the 20"),
    (["--tasks", "cell_type_prediction"], "--tasks/--task_weights give cell_type_prediction=1.00, but the run "
                                          "being resumed was trained with cell_type_prediction=0.75, "
                                          "unconditional_generation=0.25"),
    (["--prompt_format", "c2s_scale"], "--prompt_format c2s_scale differs from the ours"),
    (["--n_embd", "64"], "--n_embd 64 differs from the 32"),
])
def test_a_flag_that_contradicts_the_record_is_one_sentence(first_run, tmp_path, flags, message) -> None:
    run = tmp_path / "runs" / "r"
    shutil.copytree(first_run, run)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    with pytest.raises(InputError) as err:
        resume(run, "--max_steps", "6", *flags)
    assert str(err.value).startswith(message)
    assert f"(recorded in {run / 'checkpoints' / 'run_args.json'}); drop the flag" in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def test_publish_removes_only_what_a_run_wrote(tmp_path) -> None:
    run = tmp_path / "r"
    (run / "notes").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors", "train_args.json",
                 "my_notes.txt", "README.md", "notes/a.txt", "weights_of_mine.safetensors"):
        (run / name).write_text("old")
    (run / "merged").mkdir()
    staging = run / ".staging-final"
    staging.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_args.json"):
        (staging / name).write_text("new")
    publish(staging, run)
    assert sorted(p.name for p in run.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "my_notes.txt", "notes",
        "train_args.json", "weights_of_mine.safetensors"]
    assert (run / "train_args.json").read_text() == "new" and (run / "notes" / "a.txt").read_text() == "old"


def test_a_run_recorded_before_the_flags_were_kept_resumes_as_recorded(tmp_path) -> None:
    record = {"tasks": ["cell_type_prediction", "unconditional_generation"], "task_weights": [0.75, 0.25],
              "top_k_genes": 20, "model_name": None, "init_from_scratch": True, "n_embd": 32,
              "data_dir": str(tmp_path / "hf"), "cell_type_column": "cell_type", "cell_types": [], "seed": 5}
    args = train.parse_args(["--n_embd", "32"])
    restore_run(args, record, tmp_path / "run_args.json")
    assert args.data.tasks == "cell_type_prediction,unconditional_generation"
    assert args.data.task_weights == "0.75,0.25" and args.data.top_k_genes == 20
    assert args.data.data_dir == str(tmp_path / "hf") and args.training.seed == 5
    assert args.model.model_name == "gpt2"  # none recorded: a from-scratch run
    assert args.data.label_column is None  # the run had no labels: derived from the data again
    args = train.parse_args([])  # the old key of --label_column is read by its new name
    restore_run(args, {**record, "cell_type_column": "tissue", "cell_types": ["a"]}, tmp_path / "run_args.json")
    assert args.data.label_column == "tissue"
    with pytest.raises(InputError, match="^--top_k_genes 100 differs from the 20"):
        restore_run(train.parse_args(["--top_k_genes", "100"]), record, tmp_path / "run_args.json")
    # arguments made in Python: a value off its default counts as given
    args = train.parse_args([])._replace(given=None)
    args.data.top_k_genes = 30
    with pytest.raises(InputError, match="^--top_k_genes 30 differs from the 20"):
        restore_run(args, record, tmp_path / "run_args.json")


def test_a_resume_keeps_the_recorded_optimization(first_run, tmp_path, caplog) -> None:
    """Batch size and learning rate come back from the record (a default batch size would also
    skip the wrong number of batches); a learning rate given again is used, with a warning."""
    import logging

    run = tmp_path / "runs" / "r"
    shutil.copytree(first_run, run)
    bare = ["--output_dir", str(run.parent), "--run_name", run.name, "--checkpoint", "latest", "--disable_tqdm", "True",
            "--save_steps", "2"]
    train.main(train.parse_args([*bare, "--max_steps", "6"]))
    training = read(run / "train_args.json")["training"]
    assert training["per_device_train_batch_size"] == 8 and training["learning_rate"] == 5e-3
    with caplog.at_level(logging.WARNING, logger="cell2sentence"):
        train.main(train.parse_args([*bare, "--max_steps", "8", "--learning_rate", "1e-3"]))
    assert "--learning_rate 0.001 replaces the 0.005" in caplog.text
    assert read(run / "train_args.json")["training"]["learning_rate"] == 1e-3


def test_a_run_recorded_with_the_old_flag_names_resumes(first_run, tmp_path) -> None:
    """A record written before --cell_type_column became --label_column (and
    --preprocessing_num_workers --num_proc) continues, with the old keys read by the new names."""
    old_names = {"label_column": "cell_type_column", "num_proc": "preprocessing_num_workers"}

    def with_old_names(values: dict) -> dict:
        return {old_names.get(k, k): v for k, v in values.items()}

    run = tmp_path / "runs" / "r"
    shutil.copytree(first_run, run)
    for path in (run / "train_args.json", run / "checkpoints" / "run_args.json"):
        record = with_old_names(read(path))
        record["flags"] = with_old_names(record["flags"])
        path.write_text(json.dumps(record))
    assert read(run / "train_args.json")["cell_type_column"] == "cell_type"
    # the recorded (derived) label column counts as given, under the old flag name too
    resume(run, "--max_steps", "6", "--cell_type_column", "cell_type")
    record = read(run / "train_args.json")
    assert json.loads((run / "train_results.json").read_text())["global_step"] == 6
    assert record["label_column"] == "cell_type" and record["flags"]["label_column"] is None
    assert "num_proc" in record
    assert not {"cell_type_column", "preprocessing_num_workers"} & (set(record) | set(record["flags"]))
    assert not {"label_column", "num_proc"} & set(record["resumes"][-1]["changed"])
    assert read(run / "recipe.json")["label_columns"] == {"cell_type": sorted(MARKERS)}
    with pytest.raises(InputError, match="^--label_column tissue differs from the None"):
        resume(run, "--max_steps", "8", "--label_column", "tissue")


def test_a_recipe_is_rebuilt_from_a_record_with_the_old_flag_names() -> None:
    recipe = Recipe.from_train_record({"cell_type_column": "tissue", "cell_types": ["gut", "liver"],
                                       "tasks": ["cell_type_prediction"], "task_weights": [1.0]})
    assert recipe.label_columns == {"tissue": ["gut", "liver"]}
