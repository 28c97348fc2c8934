"""Multi-cell tasks (C2S-Scale's): predict the label of a group of N cells (grouped by one column's
value), and generate N cells given the label; the cells are joined by ``CELL_SEPARATORS``."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from utils.models.prompts import C2S_SCALE, OURS, PromptFormat, attribute_name, prompt_format

MULTI_CELL_PREDICTION = "multi_cell_prediction"
MULTI_CELL_GENERATION = "multi_cell_generation"
MULTI_CELL_TASKS: tuple[str, ...] = (MULTI_CELL_PREDICTION, MULTI_CELL_GENERATION)
# Ours: the word "|" (our word-level tokenizer splits on whitespace, so a newline would vanish).
CELL_SEPARATORS: dict[str, str] = {OURS: " | ", C2S_SCALE: "\n"}

# Ours: every placeholder stands alone between whitespace ({attribute}: the column's name).
OURS_MULTI_CELL_PREDICTION_TEMPLATES: tuple[str, ...] = (
    "The {n_genes} most highly expressed genes of each of {n_cells} cells of one {attribute} , cell by cell: {cells} Which {attribute} do these cells come from?",
    "Top {n_genes} genes of {n_cells} cells from the same {attribute} , highest first: {cells} Their {attribute} is",
    "Here are {n_cells} cells of one {attribute} , each given by its {n_genes} leading genes: {cells} Predict the {attribute} :",
    "Cell sentences of {n_cells} cells: {cells} The {attribute} of these cells:",
    "Given {n_cells} cells, each by its top {n_genes} genes in descending order, {cells} name the {attribute} they share:",
)
OURS_MULTI_CELL_GENERATION_TEMPLATES: tuple[str, ...] = (
    "List the {n_genes} most highly expressed genes of each of {n_cells} cells of the {attribute} {label} , cell by cell:",
    "Generate {n_cells} cells of {attribute} {label} , each as its top {n_genes} genes, highest first:",
    "Write {n_cells} cell sentences of {n_genes} genes for cells of the {attribute} {label} :",
    "{attribute} : {label} . {n_cells} cells, top {n_genes} genes each:",
    "Sample {n_cells} cells of {attribute} {label} and give the {n_genes} leading genes of each:",
)

# C2S-Scale's, verbatim (vandijklab/cell2sentence, src/cell2sentence/prompts/
# multi_cell_tissue_prediction_prompts.json and multi_cell_tissue_conditional_generation.json);
# responses "{tissue}." and "{multi_cell_sentences}.".
C2S_SCALE_MULTI_CELL_PREDICTION_TEMPLATES: tuple[str, ...] = (
    "The following is a list of {num_genes} gene names ordered by descending expression level for {num_cells} different {organism} cells. Your task is to give the tissue which these cells belong to based on their gene expression.\nCell sentences:\n{multi_cell_sentences}.\nThe tissue which these cells belong to is:",
    "Below is a list of {num_genes} genes in decreasing order of expression in {num_cells} {organism} cells. Given this, predict the tissue which these cells belongs to.\nCell sentences:\n{multi_cell_sentences}.\nThe tissue which these cells originate from is:",
    "Listed below are the top {num_genes} expressed genes in decreasing order of expression for {num_cells} distinct {organism} cells. Based on this information, predict the tissue which these cells were taken from.\nCell sentences:\n{multi_cell_sentences}.\nThe most likely tissue of origin is:",
    "Presented are the top {num_genes} genes by descending expression level from {num_cells} {organism} cells. Determine the tissue type these cells belong to.\nCell sentences:\n{multi_cell_sentences}.\nThe tissue type is:",
    "This list shows {num_genes} genes ranked by descending expression in {num_cells} {organism} cells. Identify the tissue of origin for these cells based on their gene expression.\nCell sentences:\n{multi_cell_sentences}.\nOriginating tissue:",
    "Provided below is an expression-ranked list of {num_genes} genes for {num_cells} different {organism} cells. Infer the tissue of origin for these cells.\nCell sentences:\n{multi_cell_sentences}.\nTissue of origin:",
    "Here are the top {num_genes} expressed genes from {num_cells} distinct {organism} cells sorted by decreasing expression level. Predict the tissue type from this data.\nCell sentences:\n{multi_cell_sentences}.\nPredicted tissue type:",
    "Review the following list of {num_genes} highly expressed genes in order of descending expression in {num_cells} {organism} cells. Your task is to deduce the tissue which these cells originate from.\nCell sentences:\n{multi_cell_sentences}.\nThe tissue type is:",
    "Examine the top {num_genes} genes ordered by descending expression level in {num_cells} {organism} cells. Based on this information, determine the tissue of origin for these cells.\nCell sentences:\n{multi_cell_sentences}.\nThe tissue which these cells belong to is:",
    "Here is a sequence of the highest expressed {num_genes} genes from {num_cells} different {organism} cells, ordered by descending expression. Can you determine the tissue type of these cells?\nCell sentences:\n{multi_cell_sentences}.\nTissue type prediction:",
    "Consider these {num_genes} highly expressed genes, ordered by descending expression, from {num_cells} {organism} cells. Based on the information, your task is to predict the associated tissue type of these cells.\nCell sentences:\n{multi_cell_sentences}.\nPredicted tissue:",
    "The following is a list of the top {num_genes} expressed genes from {num_cells} different {organism} cells, in descending order of expression. Using this information, determine the tissue origin of these cells.\nCell sentences:\n{multi_cell_sentences}.\nPredicted tissue type:",
    "Given below are lists of the top {num_genes} genes ordered by decreasing expression for {num_cells} {organism} cells. Using this, predict which tissue these cells originate from.\nCell sentences:\n{multi_cell_sentences}.\nTissue of origin:",
    "Presented below are the top {num_genes} genes, arranged by descending expression level, from {num_cells} different {organism} cells. Based on this information, identify which tissue these cells come from.\nCell sentences:\n{multi_cell_sentences}.\nTissue of origin:",
    "Given below is a ranking of the top {num_genes} expressed genes in {num_cells} different {organism} cells, arranged in order of descending expression level. From this, identify the type of tissue these cells come from.\nCell sentences:\n{multi_cell_sentences}.\nRepresented tissue type:",
)
C2S_SCALE_MULTI_CELL_GENERATION_TEMPLATES: tuple[str, ...] = (
    "Generate a list of {num_genes} genes in order of descending expression for {num_cells} different {organism} cells from a {tissue} tissue.\nCell sentences:\n",
    "Produce a list of {num_genes} gene names in order of descending expression for {num_cells} different {organism} cells originating from {tissue} tissue.\nCell sentences:",
    "Generate a list of {num_genes} genes ranked by descending expression for {num_cells} distinct {organism} cells from a {tissue} tissue.\nCell sentences:",
    "Compile a list of {num_genes} expressed genes sorted by decreasing expression levels for {num_cells} different {organism} cells originating from {tissue} tissue.\nCell sentences:",
    "Create a descending order list of {num_genes} genes for {num_cells} different {organism} cells from {tissue} tissue based on their expression.\nCell sentences:",
    "Produce a ranked list of {num_genes} genes by descending expression for {num_cells} individual {organism} cells originating from {tissue} tissue.\nCell sentences:",
    "List {num_genes} genes in order of descending expression for {num_cells} separate {organism} cells from a {tissue} tissue.\nCell sentences:",
    "Provide a list of {num_genes} gene names sorted by highest to lowest expression for {num_cells} {organism} cells from a {tissue} tissue.\nCell sentences:",
    "Generate an ordered list of {num_genes} genes by descending expression levels for {num_cells} different {organism} cells originating from {tissue} tissue.\nCell sentences:",
    "Create a gene list of {num_genes} gene names in descending order of expression for {num_cells} distinct {organism} cells taken from {tissue} tissue.\nCell sentences:",
    "Formulate a list of {num_genes} genes ranked by decreasing expression for {num_cells} different {organism} cells from a {tissue} tissue sample.\nCell sentences:",
    "Produce a list of {num_genes} genes sorted from highest to lowest expression for {num_cells} {organism} cells from a {tissue} tissue sample.\nCell sentences:",
    "Compile a list of {num_genes} gene names in order of decreasing expression for {num_cells} individual {organism} cells originating from {tissue} tissue.\nCell sentences:",
    "Create an ordered list of {num_genes} genes from most to least expressed for {num_cells} different {organism} cells from {tissue} tissue.\nCell sentences:",
)


def multi_cell_templates(fmt: PromptFormat, task: str, column: str) -> tuple[str, ...]:
    """The templates of a multi-cell ``task`` in ``fmt`` for grouping column ``column`` (c2s_scale's
    word "tissue" becomes the column's name)."""
    if task not in MULTI_CELL_TASKS:
        raise ValueError(f"Unknown multi-cell task {task!r}; choose from {', '.join(MULTI_CELL_TASKS)}.")
    prediction = task == MULTI_CELL_PREDICTION
    if fmt.name == OURS:
        return OURS_MULTI_CELL_PREDICTION_TEMPLATES if prediction else OURS_MULTI_CELL_GENERATION_TEMPLATES
    templates = C2S_SCALE_MULTI_CELL_PREDICTION_TEMPLATES if prediction else C2S_SCALE_MULTI_CELL_GENERATION_TEMPLATES
    name, marker = attribute_name(column), "\x00"
    return tuple(t.replace("{tissue}", marker).replace("tissue", name).replace(marker, "{tissue}")
                 for t in templates)


def template_words(column: str, labels: Sequence[str] = ()) -> list[str]:
    """The words our multi-cell templates, the column's name and the labels add to a tokenizer."""
    words: set[str] = set(CELL_SEPARATORS[OURS].split())
    for template in (*OURS_MULTI_CELL_PREDICTION_TEMPLATES, *OURS_MULTI_CELL_GENERATION_TEMPLATES):
        words.update(w for w in template.split() if not (w.startswith("{") and w.endswith("}")))
    words.update(attribute_name(column).split())
    for label in labels:
        words.update(str(label).split())
    return sorted(words)


def join_cells(fmt: PromptFormat, cells: Sequence[Sequence[str]]) -> str:
    """``{multi_cell_sentences}``: each cell its genes joined by spaces, cells by the format's separator."""
    return CELL_SEPARATORS.get(fmt.name, "\n").join(" ".join(genes) for genes in cells)


def split_cells(fmt: PromptFormat, text: str) -> list[str]:
    """The cell sentences of a generated multi-cell answer (the inverse of ``join_cells``)."""
    separator = CELL_SEPARATORS.get(fmt.name, "\n").strip() or "\n"
    text = text.strip()
    if fmt.answer_suffix and text.endswith(fmt.answer_suffix):
        text = text[: -len(fmt.answer_suffix)]
    parts = (text.split("\n") if separator == "\n"
             else f" {' '.join(text.split())} ".split(f" {separator} "))
    return [" ".join(p.split()) for p in parts if p.strip()]


def fill_multi_cell_prompt(fmt: PromptFormat, template: str, *, column: str, cells: Sequence[Sequence[str]] = (),
                           n_genes: int | None = None, n_cells: int | None = None, label: str | None = None,
                           ) -> str:
    """A multi-cell prompt: ``cells`` (gene lists) for prediction, ``label`` for generation."""
    n = max((len(c) for c in cells), default=0) if n_genes is None else n_genes
    k = len(cells) if n_cells is None else n_cells
    text = join_cells(fmt, cells)
    return template.format(n_genes=n, num_genes=n, n_cells=k, num_cells=k, organism=fmt.organism,
                           cells=text, multi_cell_sentences=text, attribute=attribute_name(column),
                           label=label, tissue=label)


def fit_cells(cells: Sequence[Sequence[str]], max_length: int,
              build: Callable[[list[list[str]]], tuple[list[int], list[int]]]) -> tuple[list[int], list[int], int]:
    """The largest per-cell gene count ``n`` whose example (``build`` of every cell's top ``n``
    genes) plus EOS fits ``max_length`` tokens (``fit_length``)."""
    from utils.models.examples import fit_length

    def step(prompt_ids: list[int], answer_ids: list[int], n: int) -> float:
        kept = sum(min(len(c), n) for c in cells)
        return max(1.0, (len(prompt_ids) + len(answer_ids)) / max(kept, 1) * 0.9) * max(len(cells), 1)

    return fit_length(max((len(c) for c in cells), default=0), max_length,
                      lambda n: build([list(c[:n]) for c in cells]), step,
                      f"A multi-cell example of {len(cells)} cells does not fit into {max_length} tokens "
                      "even without genes; raise --max_seq_length or lower --cells_per_example.")


def multi_cell_example(tokenizer: Any, cells: Sequence[Sequence[str]], label: str, *, task: str, template: str,
                       max_length: int, fmt: PromptFormat, column: str) -> tuple[dict[str, list[int]], int]:
    """One tokenized multi-cell example and the genes kept per cell (``fit_cells``)."""
    from utils.models.examples import encode_answer, encode_prompt, join_example

    def build(kept: list[list[str]]) -> tuple[list[int], list[int]]:
        if task == MULTI_CELL_PREDICTION:
            prompt = fill_multi_cell_prompt(fmt, template, column=column, cells=kept)
            answer = fmt.prediction_answer(str(label))
        else:
            n = max((len(c) for c in kept), default=0)
            prompt = fill_multi_cell_prompt(fmt, template, column=column, n_genes=n, n_cells=len(kept), label=label)
            answer = join_cells(fmt, kept) + fmt.answer_suffix
        return encode_prompt(tokenizer, prompt, fmt), encode_answer(tokenizer, answer, fmt)

    prompt_ids, answer_ids, n = fit_cells(cells, max_length, build)
    return join_example(prompt_ids, answer_ids, tokenizer.eos_token_id), n


def _rows_by_label(values: Sequence[Any]) -> dict[str, list[int]]:
    from utils.models.examples import has_label

    rows: dict[str, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        if has_label(v):
            rows[str(v)].append(i)
    return rows


def draw_groups(values: Sequence[Any], *, cells_per_example: int, n_groups: int, seed: int,
                split: str) -> list[tuple[str, list[int]]]:
    """``n_groups`` training groups (label, row indices): the labels taken in turn (sorted), the
    cells of each group drawn seeded without replacement among the rows with that label."""
    rows = _rows_by_label(values)
    labels = sorted(rows)
    out: list[tuple[str, list[int]]] = []
    for j in range(n_groups if labels else 0):
        label = labels[j % len(labels)]
        rng = random.Random(f"{seed}:{split}:multi_cell:{j}")
        members = rows[label]
        out.append((label, sorted(rng.sample(members, min(cells_per_example, len(members))))))
    return out


def partition_groups(values: Sequence[Any] | None, n_cells: int, *, cells_per_example: int,
                     seed: int) -> list[tuple[str | None, list[int]]]:
    """Every cell in exactly one group (for prediction): each value's rows shuffled (seeded) and cut
    into groups of ``cells_per_example``; without ``values``, consecutive rows."""
    if values is None:
        return [(None, list(range(s, min(s + cells_per_example, n_cells))))
                for s in range(0, n_cells, cells_per_example)]
    rows = _rows_by_label(values)
    out: list[tuple[str | None, list[int]]] = []
    for label in sorted(rows):
        members = list(rows[label])
        random.Random(f"{seed}:groups:{label}").shuffle(members)
        out.extend((label, sorted(members[s:s + cells_per_example]))
                   for s in range(0, len(members), cells_per_example))
    return out


def multi_cell_examples(split: Any, name: str, *, tokenizer: Any, tasks: Mapping[str, float], column: str,
                        cells_per_example: int, top_k: int, max_length: int, seed: int,
                        fmt: PromptFormat | None = None) -> dict[str, list[Any]]:
    """The multi-cell examples of one split: ``round(w * n_cells / cells_per_example)`` groups (at
    least one) per multi-cell task of weight ``w``."""
    fmt = fmt or prompt_format(OURS)
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "task": []}
    if column not in split.column_names:
        return out
    values = split[column]
    sentences = split["cell_sentence"]
    for task in MULTI_CELL_TASKS:
        weight = tasks.get(task, 0.0)
        if weight <= 0:
            continue
        n_groups = max(1, round(weight * len(values) / cells_per_example))
        templates = multi_cell_templates(fmt, task, column)
        for j, (label, rows) in enumerate(draw_groups(values, cells_per_example=cells_per_example,
                                                      n_groups=n_groups, seed=seed, split=f"{name}:{task}")):
            rng = random.Random(f"{seed}:{name}:{task}:template:{j}")
            cells = [sentences[i].split()[:top_k] for i in rows]
            example, _ = multi_cell_example(tokenizer, cells, label, task=task, template=rng.choice(templates),
                                            max_length=max_length, fmt=fmt, column=column)
            out["input_ids"].append(example["input_ids"])
            out["labels"].append(example["labels"])
            out["task"].append(task)
    return out


def predict_groups(model: Any, groups: Sequence[Sequence[str]], *, column: str, labels: Sequence[str],
                   batch_size: int = 16) -> tuple[list[str], Any]:
    """The label of each group of cell sentences among ``labels`` (``constrain.score_labels``);
    returns the labels and their probabilities (groups x labels)."""
    from scipy.special import softmax

    from utils.models.constrain import label_sequences, score_labels
    from utils.models.examples import encode_prompt

    fmt, tok = model.prompt_format, model.tokenizer
    sequences = label_sequences(tok, list(labels), fmt)
    template = multi_cell_templates(fmt, MULTI_CELL_PREDICTION, column)[0]
    budget = max(len(s) for s in sequences)

    def build(kept: list[list[str]]) -> tuple[list[int], list[int]]:  # a prompt leaving room for every label
        return encode_prompt(tok, fill_multi_cell_prompt(fmt, template, column=column, cells=kept), fmt), [0] * budget

    prompts = [fit_cells([s.split()[: model.top_k_genes] for s in sentences], model.context, build)[0]
               for sentences in groups]
    p = softmax(score_labels(model.model, prompts, sequences, batch_size=batch_size, pad_token_id=tok.pad_token_id),
                axis=1)
    return [labels[i] for i in p.argmax(axis=1)], p


def generate_groups(model: Any, labels: Sequence[str], *, column: str, cells_per_example: int,
                    n_genes: int | None = None, batch_size: int = 8, temperature: float = 1.0, top_k: int = 50,
                    top_p: float = 1.0, seed: int | None = None) -> Any:
    """Sample one group of ``cells_per_example`` cells per entry of ``labels``; returns a DataFrame
    (``cell_name``, ``cell_sentence``, ``group``, ``requested_<column>``), a row per cell."""
    import pandas as pd

    from utils.models.examples import decode_text, encode_prompt

    fmt, tok = model.prompt_format, model.tokenizer
    k = n_genes or model.top_k_genes
    template = multi_cell_templates(fmt, MULTI_CELL_GENERATION, column)[0]
    prompts = [encode_prompt(tok, fill_multi_cell_prompt(fmt, template, column=column, n_genes=k,
                                                         n_cells=cells_per_example, label=str(x)), fmt)
               for x in labels]
    answers = model.generate_ids(prompts, (model.gene_budget(k, model.known_genes()) + 2) * cells_per_example,
                                 batch_size=batch_size, do_sample=True, temperature=temperature, top_k=top_k,
                                 top_p=top_p, batch_seed=seed)
    rows = [(f"generated_group_{g:05d}_{c:02d}", sentence, f"group_{g:05d}", str(label))
            for g, (label, answer) in enumerate(zip(labels, answers, strict=True))
            for c, sentence in enumerate(split_cells(fmt, decode_text(tok, answer))[:cells_per_example])]
    return pd.DataFrame(rows, columns=["cell_name", "cell_sentence", "group", f"requested_{column}"])
