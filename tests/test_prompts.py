"""The prompt templates: deterministic without rng, varied with it, placeholders standalone."""

from __future__ import annotations

import random
import re

import pytest

from utils.models import prompts

OURS = prompts.prompt_format("ours")


def test_generation_prompt_is_deterministic_without_rng() -> None:
    first = OURS.generation_prompt("B cell", 100)
    assert first == OURS.generation_prompt("B cell", 100) == (
        "List the 100 most highly expressed genes of a cell of type B cell in order, from highest "
        "to lowest expression:"
    )
    assert OURS.generation_prompt("B cell", 100, template=OURS.conditional_templates[8]) == (
        "Cell type: B cell . Top 100 expressed genes, highest first:"
    )


def test_unconditional_prompt_names_no_cell_type() -> None:
    prompt = OURS.generation_prompt(None, 50)
    assert prompt == (
        "List the 50 most highly expressed genes of a cell, ordered from highest to lowest expression:"
    )
    for template in OURS.templates("unconditional_generation"):
        assert "{cell_type}" not in template
        assert "None" not in OURS.generation_prompt(None, 5, template=template)


def test_prediction_prompt_lists_genes_in_order() -> None:
    genes = ["CD14", "LYZ", "HLA-DRA"]
    assert OURS.prediction_prompt(genes) == (
        "The 3 most highly expressed genes of a cell, ordered from highest to lowest expression, "
        "are CD14 LYZ HLA-DRA Which cell type is this cell?"
    )
    assert OURS.prediction_prompt(genes, template=OURS.prediction_templates[3]) == (
        "Cell sentence: CD14 LYZ HLA-DRA Cell type:"
    )
    text, start, end = OURS.gene_span(genes)
    assert text == OURS.prediction_prompt(genes) and text[start:end] == "CD14 LYZ HLA-DRA"
    assert (start, end) == (92, 108)


def test_rng_draws_several_templates_reproducibly() -> None:
    draws = [OURS.generation_prompt("NK cell", 10, rng=random.Random(i)) for i in range(60)]
    again = [OURS.generation_prompt("NK cell", 10, rng=random.Random(i)) for i in range(60)]
    assert draws == again
    assert set(draws) == {t.format(n_genes=10, cell_type="NK cell") for t in OURS.conditional_templates}


def test_module_prompts_are_the_ours_formats() -> None:
    # generation_prompt / prediction_prompt (the README's snippet) ask exactly what train.py trains on.
    for i in range(5):
        assert prompts.generation_prompt("NK cell", 7, rng=random.Random(i)) == OURS.generation_prompt(
            "NK cell", 7, rng=random.Random(i))
        assert prompts.generation_prompt(None, 7, rng=random.Random(i)) == OURS.generation_prompt(
            None, 7, rng=random.Random(i))
        assert prompts.prediction_prompt(["A", "B"], rng=random.Random(i)) == OURS.prediction_prompt(
            ["A", "B"], rng=random.Random(i))


@pytest.mark.parametrize("template", prompts.all_templates())
def test_placeholders_stand_alone_between_whitespace(template: str) -> None:
    # A word-level tokenizer splits on whitespace: "{genes}," would glue the last gene to a comma.
    for match in re.finditer(r"\{[a-z_]+\}", template):
        assert match.group(0) in prompts.PLACEHOLDERS
        before = template[match.start() - 1] if match.start() else " "
        after = template[match.end()] if match.end() < len(template) else " "
        assert before == " " and after == " ", template


def test_each_task_has_about_ten_paraphrases() -> None:
    for templates in (OURS.templates(task) for task in OURS.tasks):
        assert len(templates) >= 10
        assert len(set(templates)) == len(templates)


def test_prompt_words_cover_labels_and_numbers() -> None:
    words = prompts.prompt_words(["CD14+ Monocyte"], max_number=200)
    assert {"CD14+", "Monocyte", "1", "200", "List"} <= set(words)
    assert "201" not in words
    assert not any("{" in w for w in words)
