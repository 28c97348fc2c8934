"""Conditional generation on several label columns: train.py --label_columns conditions generation
on any subset of them, generate.py --conditions generates under several and scores against the
real cells matching all of them.

One small pipeline: synthetic counts whose cell type and tissue (independent) each have marker
genes -> transform.py --obs_columns tissue -> a tiny model trained to generate under conditions ->
generate.py --conditions with two sets.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import load_from_disk
from helpers import tiny_model_flags, train_on_attribute

import generate
from utils.cli import InputError
from utils.models.cell_model import CellSentenceModel
from utils.models.examples import draw_conditions, parse_tasks, tokenize_batch
from utils.models.prompts import (
    C2S_SCALE_MULTI_CONDITION_GENERATION_TEMPLATES,
    MULTI_CONDITION_GENERATION_TEMPLATES,
    prompt_format,
)
from utils.models.recipe import Recipe

TISSUES = ("gut", "liver")
# with_attribute's tissue markers: columns 300-307 (gut) and 308-315 (liver), 5 MT- genes first
MARKERS = {"gut": {f"GENE{i - 5:04d}" for i in range(300, 308)},
           "liver": {f"GENE{i - 5:04d}" for i in range(308, 316)}}
SETS = "cell_type=type 0,tissue=gut;cell_type=type 0,tissue=liver"


@pytest.fixture(scope="module")
def pipeline(one_thread, tmp_path_factory) -> dict[str, Path]:
    return train_on_attribute(tmp_path_factory.mktemp("conditions"), "tissue", TISSUES, 300, [
        "--run_name", "cond", "--max_steps", "600", "--label_columns", "cell_type,tissue",
        "--tasks", "conditional_generation", *tiny_model_flags()])


def test_the_recipe_records_the_condition_columns_and_their_labels(pipeline) -> None:
    recipe = Recipe.read(pipeline["model"])
    assert recipe.condition_columns == ["cell_type", "tissue"]
    assert recipe.label_columns == {"cell_type": ["type 0", "type 1", "type 2"], "tissue": ["gut", "liver"]}
    assert recipe.prediction_columns() == []  # trained to generate only
    assert "Conditional generation on any subset of `cell_type`, `tissue`." in (pipeline["model"] / "README.md").read_text()
    model = CellSentenceModel.load(pipeline["model"])
    genes = model.known_genes()
    assert genes and not {"and", "tissue", "gut", "Conditions:"} & set(genes)
    for template in MULTI_CONDITION_GENERATION_TEMPLATES:
        text = model.prompt_format.conditions_prompt([("cell_type", "type 1"), ("tissue", "liver")], 5,
                                                     template=template)
        assert model.tokenizer.unk_token_id not in model.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_generate_under_two_sets_of_conditions(pipeline, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    data_dir = pipeline["tx"] / "cell_sentences_hf"
    metrics = generate.main(generate.parse_args(["--model_dir", str(pipeline["model"]), "--data_dir", str(data_dir),
                                                 "--conditions", SETS, "--n_per_type", "12", "--batch_size", "12",
                                                 "--seed", "3", "--output_dir", str(out)]))
    labels = (out / "generated_labels.txt").read_text().splitlines()
    assert labels == ["cell_type=type 0,tissue=gut"] * 12 + ["cell_type=type 0,tissue=liver"] * 12
    cells = load_from_disk(str(out / "generated_cells_hf"))
    assert cells.column_names == ["cell_name", "cell_sentence", "requested_conditions", "requested_cell_type",
                                  "requested_tissue"]
    assert cells["requested_tissue"] == ["gut"] * 12 + ["liver"] * 12
    assert set(cells["requested_cell_type"]) == {"type 0"}
    gen = metrics["generation"]
    assert gen["conditions"] == [{"cell_type": "type 0", "tissue": "gut"}, {"cell_type": "type 0", "tissue": "liver"}]
    assert gen["cell_types"] == labels[:1] + labels[-1:]
    # the real cells are those matching all the conditions of a set
    test = load_from_disk(str(data_dir))["test"]
    matching = sum(t == "type 0" for t in test["cell_type"])
    assert gen["n_real_eval"] == matching
    assert json.loads((out / "metrics.json").read_text())["generation"]["conditions"] == gen["conditions"]

    # the model follows the tissue it asked for: that tissue's markers rank higher in its cells
    def markers_in(tissue: str, markers: set[str]) -> float:
        rows = [s.split() for s, t in zip(cells["cell_sentence"], cells["requested_tissue"], strict=True) if t == tissue]
        return sum(len(markers & set(r)) for r in rows) / len(rows)

    shares = {t: (markers_in(t, MARKERS["gut"]), markers_in(t, MARKERS["liver"])) for t in TISSUES}
    print(shares, {k: gen[k] for k in ("knn_accuracy", "knn_ceiling", "majority_baseline")})
    assert shares["gut"][0] > shares["liver"][0] + 1 and shares["liver"][1] > shares["gut"][1] + 1
    assert gen["knn_accuracy"] > gen["majority_baseline"]

    # eval/generation.py scores the folder against the same real cells
    from eval import generation as eval_generation

    scored = eval_generation.main(eval_generation.parse_args(["--generated_dir", str(out), "--data_dir", str(data_dir),
                                                              "--seed", "3", "--output_dir", str(tmp_path / "ev")]))
    for key in ("knn_accuracy", "knn_ceiling", "majority_baseline", "n_real_eval", "cell_types"):
        assert scored[key] == gen[key], key


def test_the_api_takes_counts_or_conditions(pipeline) -> None:
    import numpy as np

    model = CellSentenceModel.load(pipeline["model"])
    counts = model.generate_cells({"type 0": np.int64(2)}, seed=1)  # numpy counts are counts
    assert counts["requested_cell_type"].tolist() == ["type 0", "type 0"]
    cells = model.generate_cells({"tissue": "gut", "cell_type": "type 1"}, n_per_type=2, seed=1)
    assert cells["requested_tissue"].tolist() == ["gut", "gut"] and set(cells["requested_cell_type"]) == {"type 1"}
    # the prompt names the columns in training order, whatever order they were given in
    assert model._generation_prompt((("tissue", "gut"), ("cell_type", "type 1")), 5) == \
        model.prompt_format.conditions_prompt([("cell_type", "type 1"), ("tissue", "gut")], 5)


def test_conditions_the_model_was_not_trained_on(pipeline, tmp_path: Path) -> None:
    base = ["--model_dir", str(pipeline["model"]), "--data_dir", str(pipeline["tx"] / "cell_sentences_hf"),
            "--output_dir", str(tmp_path / "g"), "--n_per_type", "1"]
    with pytest.raises(InputError, match="never trained on tissue='skin'"):
        generate.main(generate.parse_args([*base, "--conditions", "cell_type=type 0,tissue=skin"]))
    with pytest.raises(InputError, match="has no column donor_site"):
        generate.main(generate.parse_args([*base, "--conditions", "donor_site=x"]))
    model = SimpleNamespace(name="m", recipe=Recipe(tasks=["conditional_generation"],
                                                    label_columns={"cell_type": ["B"], "tissue": ["blood"]}))
    with pytest.raises(InputError, match="not trained to generate under conditions on 'tissue'"):
        CellSentenceModel._check_requested(model, [(("cell_type", "B"), ("tissue", "blood"))])
    CellSentenceModel._check_requested(model, [(("cell_type", "B"),)])  # the cell type alone is fine
    model.recipe.tasks = ["cell_type_prediction"]
    with pytest.raises(InputError, match="not trained to generate cells under conditions"):
        CellSentenceModel._check_requested(model, [(("cell_type", "B"),)])
    published = SimpleNamespace(name="p", recipe=Recipe.for_published_model())
    with pytest.raises(InputError, match="not trained to generate under conditions on 'tissue'"):
        CellSentenceModel._check_requested(published, [(("tissue", "blood"),)])


@pytest.mark.parametrize(("text", "match"), [
    ("cell_type", "column=value pairs"),
    ("cell_type=B,cell_type=T", "names a column twice"),
    ("cell_type=B,tissue=blood;tissue=gut", "same columns"),
    (" ; ", "is empty"),
])
def test_bad_conditions(text: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        generate.parse_args(["--model_dir", "m", "--conditions", text])
    with pytest.raises(InputError, match="replaces --cell_types"):
        generate.parse_args(["--model_dir", "m", "--conditions", "tissue=gut", "--cell_types", "B"])


# ------------------------------------------------------------------------------ units


def test_conditions_are_any_labelled_subset_and_the_first_alone_is_todays_prompt() -> None:
    seen = {draw_conditions([("cell_type", "B"), ("tissue", "blood")], random.Random(i)) is None for i in range(50)}
    assert seen == {True, False}
    drawn = [draw_conditions([("cell_type", "B"), ("tissue", "blood")], random.Random(i)) for i in range(200)]
    subsets = {tuple(c for c, _ in d) for d in drawn if d is not None}
    assert subsets == {("tissue",), ("cell_type", "tissue")}
    assert all(draw_conditions([("cell_type", "B"), ("tissue", "nan")], random.Random(i)) is None for i in range(20))


def test_condition_prompts_of_both_formats() -> None:
    ours, c2s = prompt_format("ours"), prompt_format("c2s_scale")
    assert len(MULTI_CONDITION_GENERATION_TEMPLATES) == 10 and len(C2S_SCALE_MULTI_CONDITION_GENERATION_TEMPLATES) == 10
    assert all("{conditions}" in t and "{cell_type}" not in t for t in C2S_SCALE_MULTI_CONDITION_GENERATION_TEMPLATES)
    text = c2s.conditions_prompt([("cell_type", "B cell"), ("disease_state", "COVID")], 3)
    assert text.startswith("Generate a list of 3 genes") and "Homo sapiens cell with cell type B cell and disease "\
        "state COVID.\nCell sentence:" in text
    assert "tissue gut" in ours.conditions_prompt([("tissue", "gut")], 2, rng=random.Random(1))


def test_examples_with_and_without_condition_columns() -> None:
    class Tok:  # a whitespace word tokenizer, enough for the example builder
        bos_token_id, eos_token_id = 0, 1

        def __call__(self, text, add_special_tokens=True):
            self.texts.append(text)
            return {"input_ids": [hash(w) % 1000 + 2 for w in text.split()]}

    tok = Tok()
    tok.texts = []
    batch = {"cell_sentence": ["A B C D"] * 40, "cell_type": ["x"] * 40, "tissue": ["gut"] * 20 + [None] * 20}
    kwargs = {"tokenizer": tok, "tasks": parse_tasks("conditional_generation"), "top_k": 4, "max_length": 64,
              "seed": 1, "split": "train"}
    plain = tokenize_batch(batch, range(40), **kwargs)
    assert tokenize_batch(batch, range(40), **kwargs, condition_columns=()) == plain
    tok.texts = []
    both = tokenize_batch(batch, range(40), **kwargs, condition_columns=["cell_type", "tissue"])
    prompts = [t for t in tok.texts if "A B C D" not in t]
    assert len(both["task"]) == 40
    assert any("cell type x and tissue gut" in t for t in prompts[:20])
    assert any("tissue gut" in t and "cell type" not in t for t in prompts[:20])
    assert any("tissue" not in t for t in prompts[:20])  # the cell type alone: today's prompts
    assert not any("tissue" in t for t in prompts[-20:])  # cells without a tissue: the cell type alone
