"""The examples that were doctests of utils/models/{prompts,examples,recipe,multi_cell}.py."""

from __future__ import annotations

import random

from utils.models.examples import draw_conditions, join_example, parse_tasks, prediction_tasks
from utils.models.multi_cell import (
    MULTI_CELL_GENERATION,
    OURS_MULTI_CELL_PREDICTION_TEMPLATES,
    fill_multi_cell_prompt,
    multi_cell_templates,
)
from utils.models.prompts import (
    attribute_name,
    conditions_text,
    generation_prompt,
    prediction_prompt,
    prompt_format,
)
from utils.models.recipe import Recipe


def test_prompts_examples() -> None:
    assert generation_prompt("B cell", 3) == (
        "List the 3 most highly expressed genes of a cell of type B cell in order, from highest to lowest "
        "expression:")
    assert prediction_prompt(["CD79A", "MS4A1"]) == (
        "The 2 most highly expressed genes of a cell, ordered from highest to lowest expression, are CD79A "
        "MS4A1 Which cell type is this cell?")
    assert generation_prompt(None, 100) == (
        "List the 100 most highly expressed genes of a cell, ordered from highest to lowest expression:")
    assert conditions_text([("cell_type", "B cell"), ("tissue", "blood")]) == "cell type B cell and tissue blood"
    assert attribute_name("disease_state") == "disease state"
    fmt = prompt_format("c2s_scale")
    assert (fmt.prediction_answer("B cell"), fmt.parse_label(" B cell.\nThe")) == ("B cell.", "B cell")
    assert fmt.tasks == ("conditional_generation", "cell_type_prediction")
    assert prompt_format().conditions_prompt([("cell_type", "B cell"), ("tissue", "blood")], 2) == (
        "List the 2 most highly expressed genes of a cell with cell type B cell and tissue blood in order, "
        "from highest to lowest expression:")
    assert prompt_format().prediction_prompt(["CD79A"], attribute="tissue") == (
        "The 1 most highly expressed genes of a cell, ordered from highest to lowest expression, are CD79A "
        "Which tissue does this cell come from?")


def test_examples_examples() -> None:
    assert prediction_tasks(["cell_type", "tissue"]) == {"tissue_prediction": "tissue"}
    assert join_example([1, 5, 6], [7, 8], 2) == {"input_ids": [1, 5, 6, 7, 8, 2],
                                                  "labels": [-100, -100, -100, 7, 8, 2]}
    assert draw_conditions([("cell_type", "B"), ("tissue", None)], random.Random(0)) is None
    assert parse_tasks("cell_type_prediction,unconditional_generation", "3,1") == {
        "cell_type_prediction": 0.75, "unconditional_generation": 0.25}


def test_recipe_examples() -> None:
    assert Recipe.for_published_model().describe() == (
        "published model defaults: c2s_scale prompts, top 100 genes, no recorded transform or labels")
    recipe = Recipe(tasks=["cell_type_prediction", "tissue_prediction"],
                    label_columns={"cell_type": ["B"], "tissue": ["blood"]})
    assert recipe.attribute("tissue") == "tissue"


def test_multi_cell_examples() -> None:
    assert fill_multi_cell_prompt(prompt_format("ours"), OURS_MULTI_CELL_PREDICTION_TEMPLATES[0],
                                  cells=[["A", "B"], ["C", "D"]], column="sample") == (
        "The 2 most highly expressed genes of each of 2 cells of one sample , cell by cell: A B | C D Which "
        "sample do these cells come from?")
    templates = multi_cell_templates(prompt_format("c2s_scale"), MULTI_CELL_GENERATION, "sample")
    assert templates[0][:60] == "Generate a list of {num_genes} genes in order of descending "
