"""train.py end to end on a tiny from-scratch model: loss, outputs, reload, resume, errors."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import pytest
import torch
from helpers_train import BACKGROUND, MARKERS, make_dataset_dir, make_sentences

import train
from utils.cli import InputError
from utils.models.examples import decode_answer, encode_prompt
from utils.models.loading import load_model_and_tokenizer
from utils.models.prompts import generation_prompt, prediction_prompt
from utils.models.run_folder import latest_checkpoint, prepare_run_dir
from utils.models.train_data import resolve_tasks

TINY = [
    "--init_from_scratch", "True", "--n_layer", "2", "--n_embd", "64", "--n_head", "2",
    "--n_positions", "128", "--top_k_genes", "10", "--per_device_train_batch_size", "16",
    "--learning_rate", "5e-3", "--disable_tqdm", "True", "--seed", "7",
]
# The command of the original README, flags only.
README_COMMAND = (
    "--data_dir data/cell_sentences_hf/ --output_dir data/model/ --model_name gpt2 "
    "--num_train_epochs 10 --gradient_accumulation_steps 4 --per_device_train_batch_size 16 "
    "--per_device_eval_batch_size 16 --fp16 True --logging_steps 32 --save_steps 500"
)


@pytest.fixture(scope="module")
def trained(one_thread, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    argv = [
        "--data_dir", str(data_dir), "--output_dir", str(out), "--run_name", "tiny",
        "--max_steps", "120", "--logging_steps", "10", "--save_steps", "60",
        "--eval_strategy", "steps", "--eval_steps", "60", "--max_eval_samples", "16", *TINY,
    ]
    run_dir = train.main(train.parse_args(argv))
    assert run_dir == out / "tiny"
    return run_dir


def test_loss_falls(trained: Path) -> None:
    log = json.loads((trained / "train_log.json").read_text())
    losses = [entry["loss"] for entry in log if "loss" in entry]
    evals = [entry["eval_loss"] for entry in log if "eval_loss" in entry]
    assert len(losses) == 12
    assert losses[-1] < 0.6 * losses[0]
    assert evals[-1] < evals[0]
    results = json.loads((trained / "train_results.json").read_text())
    assert results["global_step"] == 120
    assert results["eval_loss"] == pytest.approx(evals[-1])


def test_run_folder_records_the_run(trained: Path) -> None:
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_args.json", "recipe.json",
            "train_results.json", "train_log.json", "checkpoints"} <= names
    assert not [n for n in names if n.startswith(".staging")]
    assert {p.name for p in (trained / "checkpoints").glob("checkpoint-*")} == {
        "checkpoint-60", "checkpoint-120"
    }
    record = json.loads((trained / "train_args.json").read_text())
    assert record["top_k_genes"] == 10
    assert record["init_from_scratch"] is True
    assert record["model_name"] is None
    assert record["tasks"] == [
        "conditional_generation", "unconditional_generation", "cell_type_prediction"
    ]
    assert record["cell_types"] == sorted(MARKERS)
    counts = record["train_examples"]["task_counts"]
    assert sum(counts.values()) == 240 and min(counts.values()) > 50
    # word-level tokens: BOS + about 10-20 prompt words + 10 genes or a label + EOS
    assert 15 < record["train_examples"]["avg_tokens_per_example"] < 35


def test_saved_model_loads_and_answers(trained: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(trained, "cpu")
    sentences, labels = make_sentences(12, seed=99)
    correct = 0
    for sentence, label in zip(sentences, labels, strict=True):
        ids = torch.tensor([encode_prompt(tokenizer, prediction_prompt(sentence.split()[:10]))])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             do_sample=False)
        correct += decode_answer(tokenizer, out[0, ids.shape[1]:]) == label
    assert correct >= 9  # markers lead every sentence: an easy task
    ids = torch.tensor([encode_prompt(tokenizer, generation_prompt("NK cell", 10))])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                         do_sample=False)
    genes = decode_answer(tokenizer, out[0, ids.shape[1]:]).split()
    assert 1 <= len(genes) <= 12
    known = set(BACKGROUND).union(*MARKERS.values())
    assert set(genes) <= known  # gene names, no prompt words


def test_resume_continues_the_step_count(trained: Path, data_dir: Path) -> None:
    checkpoint = trained / "checkpoints" / "checkpoint-60"
    argv = [
        "--data_dir", str(data_dir), "--output_dir", str(trained.parent),
        "--run_name", "resumed", "--checkpoint", str(checkpoint), "--max_steps", "70",
        "--logging_steps", "5", "--save_steps", "1000", *TINY,
    ]
    run_dir = train.main(train.parse_args(argv))
    results = json.loads((run_dir / "train_results.json").read_text())
    assert results["global_step"] == 70 > 60
    steps = [e["step"] for e in json.loads((run_dir / "train_log.json").read_text())
             if "loss" in e]
    assert steps[-1] == 70 and 60 in steps  # the log history of the checkpoint goes on
    # it went on from the trained weights (a fresh model starts near ln(vocabulary) ~ 7)
    assert results["train_loss"] < 4.0
    record = json.loads((run_dir / "train_args.json").read_text())
    assert record["resumed_from"] == str(checkpoint)
    assert record["init_from_scratch"] is True


def test_finished_run_is_not_replaced_without_overwrite(trained: Path, data_dir: Path) -> None:
    argv = ["--data_dir", str(data_dir), "--output_dir", str(trained.parent),
            "--run_name", "tiny", *TINY]
    with pytest.raises(InputError, match="--overwrite"):
        train.main(train.parse_args(argv))


def test_crashed_run_leaves_no_model(one_thread, data_dir, tmp_path, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr("transformers.Trainer.train", crash)
    argv = ["--data_dir", str(data_dir), "--output_dir", str(tmp_path), "--run_name", "r",
            "--max_steps", "2", *TINY]
    with pytest.raises(RuntimeError, match="simulated"):
        train.main(train.parse_args(argv))
    assert not (tmp_path / "r" / "config.json").exists()
    # the same run name starts over without --overwrite (no checkpoint was written)
    prepare_run_dir(tmp_path / "r", None, overwrite=False)
    assert not (tmp_path / "r" / "checkpoints").exists()
    (tmp_path / "r" / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(InputError, match="--checkpoint latest --run_name r"):
        prepare_run_dir(tmp_path / "r", None, overwrite=False)


def test_missing_dataset_folder(tmp_path: Path) -> None:
    argv = ["--data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path), *TINY]
    with pytest.raises(InputError, match="does not exist"):
        train.main(train.parse_args(argv))


def test_typed_task_without_cell_types(tmp_path: Path) -> None:
    data = make_dataset_dir(tmp_path / "hf", n_train=8, n_valid=4, n_test=4,
                            with_cell_type=False)
    argv = ["--data_dir", str(data), "--output_dir", str(tmp_path),
            "--tasks", "cell_type_prediction", *TINY]
    with pytest.raises(InputError, match="no 'cell_type' column"):
        train.main(train.parse_args(argv))


def test_default_tasks_follow_the_data() -> None:
    args = train.DataArguments()
    assert list(resolve_tasks(args, ["cell_sentence", "cell_type"])) == [
        "conditional_generation", "unconditional_generation", "cell_type_prediction"
    ]
    assert list(resolve_tasks(args, ["cell_sentence"])) == ["unconditional_generation"]


@pytest.mark.parametrize("offline", [True, False])
def test_unknown_hub_model_without_network(tmp_path, data_dir, monkeypatch, offline) -> None:
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # the real check: no hub here (and a hub that answers knows no such model)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    argv = ["--data_dir", str(data_dir), "--output_dir", str(tmp_path),
            "--model_name", "no-such-org/c2s-no-such-model", "--max_steps", "1"]
    with pytest.raises(InputError, match="init_from_scratch"):
        train.main(train.parse_args(argv))


def test_readme_command_parses(caplog) -> None:
    argv = shlex.split(README_COMMAND)
    with caplog.at_level(logging.WARNING):
        args = train.parse_args(argv)
    assert args.model.model_name == "gpt2" and args.data.top_k_genes == 100
    assert args.training.num_train_epochs == 10
    assert args.training.gradient_accumulation_steps == 4
    assert args.training.logging_steps == 32 and args.training.save_steps == 500
    assert args.training.report_to in ([], "none", ["none"])
    # under torchrun: no search for unused parameters unless asked, and one log (rank 0's)
    assert args.training.ddp_find_unused_parameters is False
    assert args.training.log_level_replica == "error"
    assert train.parse_args(["--ddp_find_unused_parameters", "True"]).training.ddp_find_unused_parameters
    if not torch.cuda.is_available():
        assert args.training.fp16 is False
        assert "fp16" in caplog.text


def test_old_flag_names_work_with_a_warning_and_are_not_in_the_help(caplog, capsys) -> None:
    with caplog.at_level(logging.WARNING, logger="cell2sentence"):
        args = train.parse_args(["--cell_type_column", "tissue", "--preprocessing_num_workers=2"])
    assert args.data.label_column == "tissue" and args.data.num_proc == 2
    assert {"label_column", "num_proc"} <= args.given
    assert "--cell_type_column is now called --label_column" in caplog.text
    assert "--preprocessing_num_workers is now called --num_proc" in caplog.text
    assert train.parse_args(["--label_column", "tissue"]).data.label_column == "tissue"
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "--label_column" in shown and "--num_proc" in shown
    assert "--cell_type_column" not in shown and "--preprocessing_num_workers" not in shown


def test_bad_sizes_are_rejected(tmp_path: Path) -> None:
    argv = ["--init_from_scratch", "True", "--n_embd", "65", "--n_head", "2",
            "--data_dir", str(tmp_path)]
    with pytest.raises(InputError, match="not divisible"):
        train.main(train.parse_args(argv))


def test_fine_tunes_a_local_model_directory(trained: Path, data_dir: Path) -> None:
    argv = [
        "--data_dir", str(data_dir), "--output_dir", str(trained.parent),
        "--run_name", "finetuned", "--model_name", str(trained), "--max_steps", "3",
        "--top_k_genes", "10", "--per_device_train_batch_size", "8",
        "--gradient_checkpointing", "True", "--disable_tqdm", "True",
    ]
    run_dir = train.main(train.parse_args(argv))
    record = json.loads((run_dir / "train_args.json").read_text())
    assert record["model_name"] == str(trained) and record["init_from_scratch"] is False
    assert record["training"]["gradient_checkpointing"] is True
    assert json.loads((run_dir / "train_results.json").read_text())["global_step"] == 3
    # the word-level tokenizer of the base model is kept
    assert (run_dir / "tokenizer.json").read_text() == (trained / "tokenizer.json").read_text()


def test_latest_checkpoint_is_the_highest_step(tmp_path: Path) -> None:
    for step in (5, 40, 100, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path, complete=False) == tmp_path / "checkpoint-100"
    assert latest_checkpoint(tmp_path / "none") is None


def test_tasks_follow_what_the_prompt_format_has() -> None:
    from utils.models.prompts import prompt_format

    assert prompt_format("ours").tasks == ("conditional_generation", "unconditional_generation",
                                           "cell_type_prediction")
    scale = train.DataArguments(prompt_format="c2s_scale")
    assert list(resolve_tasks(scale, ["cell_sentence", "cell_type"])) == [
        "conditional_generation", "cell_type_prediction"
    ]
    with pytest.raises(InputError, match="^The c2s_scale format has only cell-type tasks, but the data "
                                         "has no 'cell_type' column; pass --label_column.$"):
        resolve_tasks(scale, ["cell_sentence"])
    scale.tasks = "unconditional_generation,cell_type_prediction"
    with pytest.raises(InputError, match="^The c2s_scale prompt format has no unconditional_generation "
                                         "prompts; drop it from --tasks or use --prompt_format ours.$"):
        resolve_tasks(scale, ["cell_sentence", "cell_type"])
