"""generate.py on a tiny from-scratch model: generated cells (conditional and unconditional),
their metrics (on the types asked for), the tasks a model was trained for, left padding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers_train import MARKERS

import generate
import train
from utils.cli import InputError
from utils.models.examples import decode_answer, encode_prompt
from utils.models.generation import allocate_counts, generate_batched, left_pad, shorten_to_fit
from utils.models.loading import load_model_and_tokenizer
from utils.models.prompts import prediction_prompt

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
    assert args["n_per_type"] == 3 and args["unconditional"] is False
    assert not (run / "predictions.csv").exists()  # prediction is predict.py's


def test_same_seed_same_cells(run: Path, model_dir: Path, data_dir: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "again"
    generate.main(generate.parse_args([
        "--model_dir", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
        "--n_per_type", "3", "--batch_size", "5", "--seed", "11", "--tasks", "generate",
    ]))
    assert (out / "generated_cells.txt").read_text() == (run / "generated_cells.txt").read_text()
    # A rerun with --overwrite drops the outputs it does not write: those of another mode and the
    # predictions of earlier versions.
    (out / "predictions.csv").write_text("cell_name,true,predicted\n")
    (out / "confusion_matrix.png").write_bytes(b"png")
    generate.main(generate.parse_args([
        "--model_dir", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
        "--unconditional", "--n_per_type", "2", "--max_new_tokens", "12", "--overwrite",
    ]))
    assert len((out / "generated_cells.txt").read_text().splitlines()) == 2
    for stale in ("predictions.csv", "confusion_matrix.png", "generated_labels.txt", "real_vs_generated_pca.png"):
        assert not (out / stale).exists() and f"Removed {out / stale}" in caplog.text


def test_unconditional_generation_from_the_default_training_mix(model_dir: Path, data_dir: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    import utils.models.examples
    from utils.models.prompts import generation_prompt

    tasks = json.loads((model_dir / "train_args.json").read_text())["tasks"]
    assert "unconditional_generation" in tasks and "conditional_generation" in tasks  # the default mix
    prompts = []
    encode = utils.models.examples.encode_prompt
    monkeypatch.setattr(utils.models.examples, "encode_prompt", lambda tok, prompt, *a: prompts.append(prompt) or
                        encode(tok, prompt, *a))
    out = tmp_path / "any"
    metrics = generate.main(generate.parse_args([
        "--model_dir", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
        "--unconditional", "--n_per_type", "5", "--batch_size", "5", "--max_new_tokens", "14"]))
    assert prompts == [generation_prompt(None, 10)] * 5  # the unconditional prompt, not "of type None"
    gen = metrics["generation"]
    assert gen["requested_counts"] == {"any": 5} and gen["sentences"]["n_cells"] == 5
    assert gen["sentences"]["valid_gene_rate"] > 0.9 and "knn_accuracy" not in gen
    assert not (out / "generated_labels.txt").exists()
    assert len((out / "generated_cells.txt").read_text().splitlines()) == 5


def test_metrics_of_chosen_types_compare_with_real_cells_of_those_types(model_dir: Path, data_dir: Path,
                                                                        tmp_path: Path) -> None:
    from datasets import load_from_disk

    from utils.contract import load_splits, transform_reference
    from utils.evaluation.generation_metrics import score_generated

    chosen = ["CD4 T cell", "NK cell"]  # not B cell, the majority (by name) of the four
    out = tmp_path / "two"
    metrics = generate.main(generate.parse_args([
        "--model_dir", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(out),
        "--cell_types", ",".join(chosen), "--n_per_type", "4", "--batch_size", "8", "--seed", "3"]))
    gen = metrics["generation"]
    # The same scores as against a dataset that has only these two types.
    only = tmp_path / "only" / "cell_sentences_hf"
    dd = load_from_disk(str(data_dir))
    for split in dd:
        dd[split] = dd[split].filter(lambda row: row["cell_type"] in chosen)
    dd.save_to_disk(str(only))
    sentences = (out / "generated_cells.txt").read_text().splitlines()
    labels = (out / "generated_labels.txt").read_text().splitlines()
    full = load_splits(data_dir, "test", "cell_type", need_labels=True)
    index, fit, _ = transform_reference(data_dir.parent, full, 10)  # generate.py's vocabulary: all training genes
    expected, _ = score_generated(sentences, labels, load_splits(only, "test", "cell_type", need_labels=True),
                                  split="test", label_column="cell_type", index=index, fit=fit, top_k=10, seed=3)
    for key in ("knn_accuracy", "knn_ceiling", "majority_baseline", "mmd", "mmd_floor", "energy_distance",
                "energy_distance_floor", "n_real_train", "n_real_eval", "per_type"):
        assert gen[key] == expected[key], key
    assert gen["n_real_eval"] == 20 and gen["n_real_train"] == 120 and gen["majority_baseline"] == 0.5
    assert gen["cell_types"] == chosen and gen["knn_ceiling"] == 1.0
    # eval/generation.py on this output compares with the same real cells.
    from eval import generation as eval_generation

    again = eval_generation.main(eval_generation.parse_args([
        "--generated_dir", str(out), "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "eval"),
        "--seed", "3"]))
    for key in ("knn_accuracy", "knn_ceiling", "majority_baseline", "mmd_floor", "n_real_eval", "cell_types"):
        assert again[key] == gen[key], key


@pytest.mark.parametrize("tasks,flags,message", [
    (["conditional_generation", "cell_type_prediction"], ["--unconditional"],
     "not trained for unconditional generation"),
    (["unconditional_generation"], ["--cell_types", "B cell"], "trained without cell types"),
    (["cell_type_prediction"], [], "not trained to generate cells.*predict.py"),
    (None, ["--unconditional"], "published model.*the c2s_scale prompts have no unconditional"),
])
def test_a_generation_the_model_was_not_trained_for_is_one_sentence(tmp_path: Path, data_dir: Path, tasks,
                                                                    flags, message) -> None:
    model = tmp_path / "model"
    model.mkdir()
    if tasks is not None:  # None: a published model (no record)
        (model / "train_args.json").write_text(json.dumps({"tasks": tasks, "cell_types": sorted(MARKERS),
                                                           "prompt_format": "ours", "top_k_genes": 10}))
    with pytest.raises(InputError, match=message):
        generate.main(generate.parse_args(["--model_dir", str(model), "--data_dir", str(data_dir),
                                           "--output_dir", str(tmp_path / "gen"), *flags]))
    assert not (tmp_path / "gen").exists()


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
    with pytest.raises(InputError, match=r"predict\.py --model_dir M --data_dir D"):
        generate.parse_args(["--model_dir", str(model_dir), "--tasks", "predict,generate"])
    with pytest.raises(InputError, match="--tasks 'dance'"):
        generate.parse_args(["--model_dir", str(model_dir), "--tasks", "dance"])
    with pytest.raises(InputError, match="contradict"):
        generate.parse_args(["--model_dir", str(model_dir), "--unconditional", "--cell_types", "B cell"])
    with pytest.raises(InputError, match="no split"):
        generate.main(generate.parse_args([
            "--model_dir", str(model_dir), "--data_dir", str(data_dir), "--split", "nope",
            "--output_dir", str(tmp_path / "x")]))
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "metrics.json").write_text("{}")
    with pytest.raises(InputError, match="--overwrite"):
        generate.main(generate.parse_args([
            "--model_dir", str(model_dir), "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "y")]))


def test_the_attention_mask_warning_is_dropped_as_every_batch_passes_its_mask():
    import logging

    import utils.models.generation  # noqa: F401  (installs the filter)

    source = logging.getLogger("transformers.modeling_utils")
    def record(text):
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, text, None, None)
    assert not source.filter(record("We strongly recommend passing in an `attention_mask` since your input_ids may be padded."))
    assert source.filter(record("Some other warning."))
