"""Prompt templates of the training tasks (data; training picks one paraphrase per example) and the
prompt formats that fill them. Our placeholders stand alone between whitespace, so a word-level
tokenizer sees labels and genes as whole words."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

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

# Prediction of a further label column; ``{attribute}`` is its ``attribute_name``.
ATTRIBUTE_PREDICTION_TEMPLATES: tuple[str, ...] = (
    "The {n_genes} most highly expressed genes of a cell, ordered from highest to lowest expression, are {genes} Which {attribute} does this cell come from?",
    "Genes of a cell by decreasing expression: {genes} The {attribute} of this cell is",
    "Identify the {attribute} of a cell whose top {n_genes} genes, highest first, are {genes} Answer with the {attribute} :",
    "Cell sentence: {genes} Its {attribute} :",
    "Here are the {n_genes} most expressed genes of a single cell: {genes} What is its {attribute} ?",
    "Given the ranked genes {genes} name the {attribute} of the cell they come from:",
    "A cell expresses these genes most, in descending order: {genes} Predict its {attribute} :",
    "Classify the cell with this cell sentence of {n_genes} genes: {genes} The {attribute} of the cell:",
    "Top expressed genes, from highest to lowest: {genes} This cell's {attribute} is",
    "Which {attribute} has a cell whose {n_genes} leading genes are {genes} ?",
)

# Conditional generation on several label columns; ``{conditions}``: see ``conditions_text``.
MULTI_CONDITION_GENERATION_TEMPLATES: tuple[str, ...] = (
    "List the {n_genes} most highly expressed genes of a cell with {conditions} in order, from highest to lowest expression:",
    "Generate the top {n_genes} genes, by decreasing expression, of a cell with {conditions} .",
    "Write a cell sentence of {n_genes} genes for a cell with {conditions} , most expressed gene first:",
    "Give the {n_genes} genes with the highest expression in a cell with {conditions} , in descending order:",
    "Produce the first {n_genes} genes of the cell sentence of a cell with {conditions} :",
    "Here are the {n_genes} most expressed genes of a single cell with {conditions} , from highest to lowest:",
    "Enumerate the {n_genes} leading genes of a cell with {conditions} ranked by expression level:",
    "Sample a cell with {conditions} and list its {n_genes} top genes in order of decreasing expression:",
    "Conditions: {conditions} . Top {n_genes} expressed genes, highest first:",
    "What are the {n_genes} most abundant transcripts of a cell with {conditions} , ordered by expression?",
)
CONDITION_JOINER = "and"

PLACEHOLDERS: tuple[str, ...] = ("{n_genes}", "{cell_type}", "{genes}", "{attribute}", "{conditions}")


def conditions_text(conditions: Sequence[tuple[str, str]]) -> str:
    """The ``{conditions}`` of a prompt from ``(column, value)`` pairs: "cell type B and tissue blood"."""
    return f" {CONDITION_JOINER} ".join(f"{attribute_name(c)} {v}" for c, v in conditions)


def attribute_name(column: str) -> str:
    """How prompts name a label column: its words, underscores as spaces ("disease state")."""
    return " ".join(str(column).replace("_", " ").split())


def _pick(templates: Sequence[str], rng: random.Random | None) -> str:
    """The first template without ``rng`` (deterministic), else a random one."""
    return templates[0] if rng is None else templates[rng.randrange(len(templates))]


def generation_prompt(cell_type: str | None, n_genes: int, *, rng: random.Random | None = None) -> str:
    """``prompt_format("ours").generation_prompt``: ``n_genes`` genes of a ``cell_type`` cell (None: any)."""
    return prompt_format(OURS).generation_prompt(cell_type, n_genes, rng=rng)


def prediction_prompt(genes: Sequence[str], *, rng: random.Random | None = None) -> str:
    """``prompt_format("ours").prediction_prompt``: the ranked ``genes``, asking for the cell type."""
    return prompt_format(OURS).prediction_prompt(genes, rng=rng)


def all_templates() -> tuple[str, ...]:
    """Every template of every task."""
    return CONDITIONAL_GENERATION_TEMPLATES + UNCONDITIONAL_GENERATION_TEMPLATES + CELL_TYPE_PREDICTION_TEMPLATES


def prompt_words(cell_types: Iterable[str] = (), *, attributes: Iterable[str] = (),
                 max_number: int = 1024) -> list[str]:
    """The words prompts and answers can contain, except gene names: template words, the words
    of the labels (``cell_types``) and the numbers ``1..max_number``; with ``attributes`` (the
    label columns' ``attribute_name``), also those names and the words of the attribute and
    multi-condition templates."""
    words: set[str] = set()
    attributes = [str(a) for a in attributes]
    templates = all_templates()
    if attributes:
        templates += ATTRIBUTE_PREDICTION_TEMPLATES + MULTI_CONDITION_GENERATION_TEMPLATES
        words.add(CONDITION_JOINER)
    for template in templates:
        words.update(w for w in template.split() if w not in PLACEHOLDERS)
    for attribute in attributes:
        words.update(attribute.split())
    for label in cell_types:
        words.update(str(label).split())
    words.update(str(n) for n in range(1, max_number + 1))
    return sorted(words)


# The C2S-Scale format of the published models (vandijklab/cell2sentence,
# src/cell2sentence/prompts/single_cell_cell_type_{prediction,conditional_generation}_prompts.json).
C2S_SCALE_PREDICTION_TEMPLATES: tuple[str, ...] = (
    "The following is a list of {num_genes} gene names ordered by descending expression level in a {organism} cell. Your task is to give the cell type which this cell belongs to based on its gene expression.\nCell sentence: {cell_sentence}.\nThe cell type corresponding to these genes is:",
    "Below is a list of {num_genes} gene names in order of descending expression level from a {organism} cell. Based on this, predict what the cell type of this cell is.\nCell sentence: {cell_sentence}.\nThese genes are most likely associated with cell type:",
    "Given the list of {num_genes} gene names ordered by descending expression level from a {organism} cell, identify the cell type.\nCell sentence: {cell_sentence}.\nThe probable cell type for these genes is:",
    "Analyze the following list of {num_genes} genes sorted by decreasing expression levels in a {organism} cell and determine its cell type.\nCell sentence: {cell_sentence}.\nBased on these genes, the corresponding cell type is:",
    "From the list of {num_genes} gene names ordered by decreasing expression level in a {organism} cell, infer the cell type of the cell.\nCell sentence: {cell_sentence}.\nThese genes suggest the cell type is most likely:",
    "The {num_genes} gene names below are listed by descending expression level in a {organism} cell. Predict the cell type based on this information.\nCell sentence: {cell_sentence}.\nThese genes are indicative of cell type:",
    "Below is a list of {num_genes} gene names sorted by descending expression in a {organism} cell. Determine the cell type of this cell from its expressed genes.\nCell sentence: {cell_sentence}.\nThe associated cell type for these genes appears to be:",
    "The following list contains {num_genes} gene names ordered by descending expression level in a {organism} cell. Deduce the cell type based on this.\nCell sentence: {cell_sentence}.\nThese genes typically correspond to cell type:",
    "Here is a list of {num_genes} genes in order of descending expression level from a {organism} cell. Identify the cell type of this cell based on this information.\nCell sentence: {cell_sentence}.\nThe expected cell type based on these genes is:",
    "Examine the list of {num_genes} gene names sorted by decreasing expression in a {organism} cell, and from this, identify its cell type.\nCell sentence: {cell_sentence}.\nThese genes are commonly found in cell type:",
    "The {num_genes} gene names below are arranged by descending expression level in a {organism} cell. Determine the cell type of this cell.\nCell sentence: {cell_sentence}.\nThe cell type that these genes are most commonly linked with is:",
    "Here is a list of {num_genes} genes ordered by expression level in a {organism} cell. Based on this information, identify the cell type.\nCell sentence: {cell_sentence}.\nBased on the expression levels, the cell type would likely be:",
    "From the list of {num_genes} gene names sorted by decreasing expression levels in a {organism} cell, predict the cell type.\nCell sentence: {cell_sentence}.\nThe genes provided are most commonly expressed in cell type:",
    "Below is a list of {num_genes} genes ordered by descending expression in a {organism} cell. Use this information to determine the cell type.\nCell sentence: {cell_sentence}.\nThese genes suggest the cell type is most likely:",
    "The {num_genes} gene names below are listed by descending expression levels in a {organism} cell. Based on this, predict the cell type.\nCell sentence: {cell_sentence}.\nThe cell type corresponding to these genes is:",
)

C2S_SCALE_GENERATION_TEMPLATES: tuple[str, ...] = (
    "Generate a list of {num_genes} genes in order of descending expression which represent a {organism} cell of cell type {cell_type}.\nCell sentence:",
    "Produce a list of {num_genes} gene names in descending order of expression which represent the expressed genes of a {organism} {cell_type} cell.\nCell sentence:",
    "Create a ranked list of {num_genes} genes in decreasing order of expression representing {organism} cell of cell type {cell_type}.\nCell sentence:",
    "List the top {num_genes} expressed genes for a {organism} cell with cell type {cell_type}.\nCell sentence:",
    "Identify the highest expressed {num_genes} genes in decreasing order of expression in a {organism} {cell_type} cell.\nCell sentence:",
    "Enumerate a list of {num_genes} genes in descending order of expression in a {organism} {cell_type} cell.\nCell sentence:",
    "Compile a descending order list of {num_genes} expressed genes in a {organism} {cell_type} cell.\nCell sentence:",
    "Present a sequence of {num_genes} genes ordered by decreasing expression level in a {organism} {cell_type} cell.\nCell sentence:",
    "Generate an ordered list of {num_genes} genes by decreasing expression level in a {organism} {cell_type} cell.\nCell sentence:",
    "Assemble a list of {num_genes} genes from highest to lowest expression in a {organism} {cell_type} cell.\nCell sentence:",
)

# The same prompts for any other label column, the attribute named where they name the cell type.
C2S_SCALE_ATTRIBUTE_PREDICTION_TEMPLATES: tuple[str, ...] = tuple(
    t.replace("cell type", "{attribute}") for t in C2S_SCALE_PREDICTION_TEMPLATES)


def _c2s_conditions_template(template: str) -> str:
    """A C2S-Scale generation template with its cell type replaced by ``{conditions}``."""
    for old, new in (("cell with cell type {cell_type}", "cell with {conditions}"),
                     ("cell of cell type {cell_type}", "cell with {conditions}"),
                     ("{organism} {cell_type} cell", "{organism} cell with {conditions}")):
        template = template.replace(old, new)
    assert "{cell_type}" not in template, template
    return template


C2S_SCALE_MULTI_CONDITION_GENERATION_TEMPLATES: tuple[str, ...] = tuple(
    _c2s_conditions_template(t) for t in C2S_SCALE_GENERATION_TEMPLATES)

OURS = "ours"
C2S_SCALE = "c2s_scale"
DEFAULT_ORGANISM = "Homo sapiens"


@dataclass(frozen=True)
class PromptFormat:
    """How prompts and answers are worded and joined: ours or the published models' C2S-Scale.

    ``answer_prefix`` goes between prompt and answer, ``answer_suffix`` closes an answer;
    ``manual_bos``: BOS put before a prompt by hand (ours), else the tokenizer's own rules."""

    name: str
    conditional_templates: tuple[str, ...]
    unconditional_templates: tuple[str, ...]
    prediction_templates: tuple[str, ...]
    answer_prefix: str
    answer_suffix: str
    manual_bos: bool
    organism: str = DEFAULT_ORGANISM
    attribute_templates: tuple[str, ...] = ()
    conditions_templates: tuple[str, ...] = ()

    def _fill(self, template: str, *, genes: Sequence[str] = (), n_genes: int | None = None,
              cell_type: str | None = None, attribute: str | None = None, conditions: str | None = None) -> str:
        n = len(genes) if n_genes is None else n_genes
        text = " ".join(genes)
        # Both spellings of the placeholders: ours ({n_genes}, {genes}) and C2S-Scale's.
        return template.format(n_genes=n, num_genes=n, genes=text, cell_sentence=text, cell_type=cell_type,
                               organism=self.organism, attribute=attribute, conditions=conditions)

    def _table(self) -> dict[str, tuple[str, ...]]:
        return {"conditional_generation": self.conditional_templates,
                "unconditional_generation": self.unconditional_templates,
                "cell_type_prediction": self.prediction_templates}

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this format has prompts for."""
        return tuple(task for task, templates in self._table().items() if templates)

    def templates(self, task: str) -> tuple[str, ...]:
        """The templates of ``task``; ValueError when the format has none."""
        templates = self._table().get(task)
        if not templates:
            raise ValueError(f"The {self.name} prompt format has no {task} prompts.")
        return templates

    def generation_prompt(self, cell_type: str | None, n_genes: int, *,
                          rng: random.Random | None = None, template: str | None = None) -> str:
        """Prompt asking for ``n_genes`` genes of a ``cell_type`` cell (None: any cell)."""
        task = "unconditional_generation" if cell_type is None else "conditional_generation"
        return self._fill(template or _pick(self.templates(task), rng), n_genes=n_genes, cell_type=cell_type)

    def conditions_prompt(self, conditions: Sequence[tuple[str, str]], n_genes: int, *,
                          rng: random.Random | None = None, template: str | None = None) -> str:
        """Prompt asking for ``n_genes`` genes of a cell with these ``(column, value)`` conditions."""
        return self._fill(template or _pick(self.conditions_templates, rng), n_genes=n_genes,
                          conditions=conditions_text(conditions))

    def prediction_templates_for(self, attribute: str | None = None) -> tuple[str, ...]:
        """The prediction templates of the cell type (``attribute`` None) or of another label column."""
        if attribute is None:
            return self.prediction_templates
        if not self.attribute_templates:
            raise ValueError(f"The {self.name} prompt format has no prompts for other label columns.")
        return self.attribute_templates

    def prediction_prompt(self, genes: Sequence[str], *, rng: random.Random | None = None,
                          template: str | None = None, attribute: str | None = None) -> str:
        """Prompt giving the ranked ``genes`` and asking for the cell type or the ``attribute``."""
        template = template or _pick(self.prediction_templates_for(attribute), rng)
        return self._fill(template, genes=genes, attribute=attribute)

    def gene_span(self, genes: Sequence[str]) -> tuple[str, int, int]:
        """The (first) prediction prompt and the character span of its genes (for pooling them)."""
        marker = "\x00"
        template = self.prediction_templates[0].replace("{genes}", marker).replace("{cell_sentence}", marker)
        with_marker = self._fill(template, genes=genes)
        start = with_marker.index(marker)
        text = " ".join(genes)
        return with_marker.replace(marker, text), start, start + len(text)

    def prediction_answer(self, cell_type: str) -> str:
        return f"{cell_type}{self.answer_suffix}"

    def generation_answer(self, genes: Sequence[str]) -> str:
        return " ".join(genes) + (self.answer_suffix if genes else "")

    def parse_label(self, text: str) -> str:
        """A generated label: its first line, whitespace collapsed, the closing suffix dropped."""
        line = " ".join(text.strip().split("\n", 1)[0].split())
        if self.answer_suffix and line.endswith(self.answer_suffix):
            return line[: -len(self.answer_suffix)].rstrip()
        return line

    def record(self) -> dict[str, Any]:
        """What ``train_args.json`` keeps of the format."""
        return {"name": self.name, "answer_prefix": self.answer_prefix, "answer_suffix": self.answer_suffix,
                "manual_bos": self.manual_bos, "organism": self.organism}


def prompt_format(name: str = OURS, *, organism: str = DEFAULT_ORGANISM) -> PromptFormat:
    """The prompt format called ``name``: ``ours`` or ``c2s_scale``."""
    if name == OURS:
        return PromptFormat(OURS, CONDITIONAL_GENERATION_TEMPLATES, UNCONDITIONAL_GENERATION_TEMPLATES,
                            CELL_TYPE_PREDICTION_TEMPLATES, answer_prefix=" ", answer_suffix="", manual_bos=True,
                            organism=organism, attribute_templates=ATTRIBUTE_PREDICTION_TEMPLATES,
                            conditions_templates=MULTI_CONDITION_GENERATION_TEMPLATES)
    if name == C2S_SCALE:
        return PromptFormat(C2S_SCALE, C2S_SCALE_GENERATION_TEMPLATES, (), C2S_SCALE_PREDICTION_TEMPLATES,
                            answer_prefix="", answer_suffix=".", manual_bos=False, organism=organism,
                            attribute_templates=C2S_SCALE_ATTRIBUTE_PREDICTION_TEMPLATES,
                            conditions_templates=C2S_SCALE_MULTI_CONDITION_GENERATION_TEMPLATES)
    raise ValueError(f"Unknown prompt format {name!r}; choose {OURS} or {C2S_SCALE}.")


PROMPT_FORMATS: tuple[str, ...] = (OURS, C2S_SCALE)
