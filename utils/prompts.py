"""Prompt templates of the training tasks, kept as data in one place.

Three tasks, as in the Cell2Sentence paper (Levine et al. 2023):

- conditional generation: "the top K genes of a cell of type X" -> the first K genes of a sentence;
- unconditional generation: the same without a cell type -> the first K genes;
- cell-type prediction: the first K genes -> the cell type.

Each task has about ten paraphrases; training picks one per example at random so the model
does not learn a single wording. Every placeholder (``{n_genes}``, ``{cell_type}``,
``{genes}``) stands alone between whitespace, so a word-level tokenizer that splits on
whitespace sees cell types and gene names as whole words, and the punctuation of a template
stays attached to template words only.

``train.py`` builds the training examples from these functions and ``generate.py`` asks the
trained model with the very same ones.

>>> generation_prompt("B cell", 3)
'List the 3 most highly expressed genes of a cell of type B cell in order, from highest to lowest expression:'
>>> prediction_prompt(["CD79A", "MS4A1"])
'The 2 most highly expressed genes of a cell, ordered from highest to lowest expression, are CD79A MS4A1 Which cell type is this cell?'
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

CONDITIONAL_GENERATION_TEMPLATES: tuple[str, ...] = (
    "List the {n_genes} most highly expressed genes of a cell of type {cell_type} in order, from highest to lowest expression:",
    "Generate the top {n_genes} genes, by decreasing expression, of a cell of type {cell_type} .",
    "Write a cell sentence of {n_genes} genes for a {cell_type} cell, most expressed gene first:",
    "Give the {n_genes} genes with the highest expression in a {cell_type} cell, in descending order:",
    "Produce the first {n_genes} genes of the cell sentence of a {cell_type} cell:",
    "Here are the {n_genes} most expressed genes of a single {cell_type} cell, from highest to lowest:",
    "Enumerate the {n_genes} leading genes of a {cell_type} cell ranked by expression level:",
    "Sample a {cell_type} cell and list its {n_genes} top genes in order of decreasing expression:",
    "Cell type: {cell_type} . Top {n_genes} expressed genes, highest first:",
    "What are the {n_genes} most abundant transcripts of a {cell_type} cell, ordered by expression?",
)

UNCONDITIONAL_GENERATION_TEMPLATES: tuple[str, ...] = (
    "List the {n_genes} most highly expressed genes of a cell, ordered from highest to lowest expression:",
    "Generate the top {n_genes} genes, by decreasing expression, of a cell.",
    "Write a cell sentence of {n_genes} genes, most expressed gene first:",
    "Give the {n_genes} genes with the highest expression in a single cell, in descending order:",
    "Produce the first {n_genes} genes of the cell sentence of a cell:",
    "Here are the {n_genes} most expressed genes of a single cell, from highest to lowest:",
    "Enumerate the {n_genes} leading genes of a cell ranked by expression level:",
    "Sample a cell and list its {n_genes} top genes in order of decreasing expression:",
    "A cell of any type. Top {n_genes} expressed genes, highest first:",
    "What are the {n_genes} most abundant transcripts of a cell, ordered by expression?",
)

CELL_TYPE_PREDICTION_TEMPLATES: tuple[str, ...] = (
    "The {n_genes} most highly expressed genes of a cell, ordered from highest to lowest expression, are {genes} Which cell type is this cell?",
    "Genes of a cell by decreasing expression: {genes} The cell type of this cell is",
    "Identify the cell type of a cell whose top {n_genes} genes, highest first, are {genes} Answer with the cell type:",
    "Cell sentence: {genes} Cell type:",
    "Here are the {n_genes} most expressed genes of a single cell: {genes} What type of cell is it?",
    "Given the ranked genes {genes} name the cell type they come from:",
    "A cell expresses these genes most, in descending order: {genes} Predict its cell type:",
    "Classify the cell with this cell sentence of {n_genes} genes: {genes} Cell type of the cell:",
    "Top expressed genes, from highest to lowest: {genes} This cell is a",
    "Which cell type has the expression profile {genes} given as its {n_genes} leading genes?",
)

PLACEHOLDERS: tuple[str, ...] = ("{n_genes}", "{cell_type}", "{genes}")


def _pick(templates: Sequence[str], rng: random.Random | None) -> str:
    """The first template without ``rng`` (deterministic), else a random one."""
    return templates[0] if rng is None else templates[rng.randrange(len(templates))]


def format_generation(template: str, cell_type: str | None, n_genes: int) -> str:
    """Fill a generation template (``cell_type`` is ignored by unconditional templates)."""
    return template.format(n_genes=n_genes, cell_type=cell_type)


def format_prediction(template: str, genes: Sequence[str]) -> str:
    """Fill a cell-type-prediction template with a ranked gene list."""
    return template.format(n_genes=len(genes), genes=" ".join(genes))


def generation_templates(cell_type: str | None) -> tuple[str, ...]:
    """The templates of conditional generation, or of unconditional when ``cell_type`` is None."""
    if cell_type is None:
        return UNCONDITIONAL_GENERATION_TEMPLATES
    return CONDITIONAL_GENERATION_TEMPLATES


def generation_prompt(
    cell_type: str | None, n_genes: int, *, rng: random.Random | None = None
) -> str:
    """Prompt asking for the top ``n_genes`` genes of a cell of ``cell_type`` (None: any cell).

    ``rng`` None gives the first template, so the prompt is deterministic.

    >>> generation_prompt(None, 100)
    'List the 100 most highly expressed genes of a cell, ordered from highest to lowest expression:'
    """
    return format_generation(_pick(generation_templates(cell_type), rng), cell_type, n_genes)


def prediction_prompt(genes: Sequence[str], *, rng: random.Random | None = None) -> str:
    """Prompt giving a cell's ranked ``genes`` and asking for its cell type.

    ``rng`` None gives the first template, so the prompt is deterministic.
    """
    return format_prediction(_pick(CELL_TYPE_PREDICTION_TEMPLATES, rng), genes)


def all_templates() -> tuple[str, ...]:
    """Every template of every task."""
    return (
        CONDITIONAL_GENERATION_TEMPLATES
        + UNCONDITIONAL_GENERATION_TEMPLATES
        + CELL_TYPE_PREDICTION_TEMPLATES
    )


def prompt_words(
    cell_types: Iterable[str] = (), *, max_number: int = 1024
) -> list[str]:
    """The whitespace-separated words prompts and answers can contain, except gene names.

    Template words, the words of the cell-type labels, and the numbers ``1..max_number``
    (the ``{n_genes}`` of a prompt). A word-level tokenizer built from these plus the genes
    encodes every prompt without unknown tokens.
    """
    words: set[str] = set()
    for template in all_templates():
        words.update(w for w in template.split() if w not in PLACEHOLDERS)
    for label in cell_types:
        words.update(str(label).split())
    words.update(str(n) for n in range(1, max_number + 1))
    return sorted(words)
