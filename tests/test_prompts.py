"""The prompt templates: deterministic without rng, varied with it, placeholders standalone."""

from __future__ import annotations

import random
import re

import pytest

from utils import prompts


def test_generation_prompt_is_deterministic_without_rng() -> None:
    first = prompts.generation_prompt("B cell", 100)
    assert first == prompts.generation_prompt("B cell", 100)
    assert first == prompts.CONDITIONAL_GENERATION_TEMPLATES[0].format(
        n_genes=100, cell_type="B cell"
    )
    assert "B cell" in first and "100" in first


def test_unconditional_prompt_names_no_cell_type() -> None:
    prompt = prompts.generation_prompt(None, 50)
    assert prompt == prompts.UNCONDITIONAL_GENERATION_TEMPLATES[0].format(n_genes=50)
    assert "None" not in prompt
    for template in prompts.UNCONDITIONAL_GENERATION_TEMPLATES:
        assert "{cell_type}" not in template


def test_prediction_prompt_lists_genes_in_order() -> None:
    prompt = prompts.prediction_prompt(["CD14", "LYZ", "HLA-DRA"])
    assert "CD14 LYZ HLA-DRA" in prompt
    assert prompt.split().count("CD14") == 1


def test_rng_draws_several_templates_reproducibly() -> None:
    draws = [prompts.generation_prompt("NK cell", 10, rng=random.Random(i)) for i in range(60)]
    again = [prompts.generation_prompt("NK cell", 10, rng=random.Random(i)) for i in range(60)]
    assert draws == again
    assert len(set(draws)) >= 8


@pytest.mark.parametrize("template", prompts.all_templates())
def test_placeholders_stand_alone_between_whitespace(template: str) -> None:
    # A word-level tokenizer splits on whitespace: "{genes}," would glue the last gene to a comma.
    for match in re.finditer(r"\{[a-z_]+\}", template):
        assert match.group(0) in prompts.PLACEHOLDERS
        before = template[match.start() - 1] if match.start() else " "
        after = template[match.end()] if match.end() < len(template) else " "
        assert before == " " and after == " ", template


def test_each_task_has_about_ten_paraphrases() -> None:
    for templates in (
        prompts.CONDITIONAL_GENERATION_TEMPLATES,
        prompts.UNCONDITIONAL_GENERATION_TEMPLATES,
        prompts.CELL_TYPE_PREDICTION_TEMPLATES,
    ):
        assert len(templates) >= 10
        assert len(set(templates)) == len(templates)


def test_prompt_words_cover_labels_and_numbers() -> None:
    words = prompts.prompt_words(["CD14+ Monocyte"], max_number=200)
    assert {"CD14+", "Monocyte", "1", "200", "List"} <= set(words)
    assert "201" not in words
    assert not any("{" in w for w in words)
