"""Training examples (``encode_prompt`` + ``encode_answer`` + EOS, the loss on the answer and the EOS
only) and the prompt/answer encoding shared by training and generation."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from utils.cli import InputError
from utils.models.multi_cell import MULTI_CELL_TASKS
from utils.models.prompts import OURS, PromptFormat, attribute_name, prompt_format

IGNORE_INDEX = -100
CONDITIONAL_GENERATION = "conditional_generation"
UNCONDITIONAL_GENERATION = "unconditional_generation"
CELL_TYPE_PREDICTION = "cell_type_prediction"
TASKS: tuple[str, ...] = (CONDITIONAL_GENERATION, UNCONDITIONAL_GENERATION, CELL_TYPE_PREDICTION)
#: Tasks that need a cell-type label per cell.
TYPED_TASKS: frozenset[str] = frozenset({CONDITIONAL_GENERATION, CELL_TYPE_PREDICTION})
PREDICTION_SUFFIX = "_prediction"


def prediction_tasks(label_columns: Sequence[str]) -> dict[str, str]:
    """``<column>_prediction`` -> column, for each label column after the first (the cell type's)."""
    out: dict[str, str] = {}
    for column in label_columns[1:]:
        task = f"{column}{PREDICTION_SUFFIX}"
        if task in TASKS:
            raise InputError(f"The label column {column!r} would name the task {task}, which is the first label "
                             f"column's; list {column!r} first in --label_columns.")
        out[task] = str(column)
    return out


def _format(fmt: PromptFormat | str | None) -> PromptFormat:
    return fmt if isinstance(fmt, PromptFormat) else prompt_format(fmt or OURS)


def encode_prompt(tokenizer: Any, prompt: str, fmt: PromptFormat | str | None = None) -> list[int]:
    """The token ids the model saw before the answer during training: ours, BOS (if any) and the
    prompt's tokens; C2S-Scale, the tokenizer's own encoding (its special tokens)."""
    fmt = _format(fmt)
    if not fmt.manual_bos:
        return list(tokenizer(prompt)["input_ids"])
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return ids if tokenizer.bos_token_id is None else [tokenizer.bos_token_id, *ids]


def encode_answer(tokenizer: Any, answer: str, fmt: PromptFormat | str | None = None) -> list[int]:
    """The token ids of an answer as they follow the prompt (without the EOS)."""
    if not answer:
        return []
    # Ours prefixes " ": a byte-pair tokenizer sees each gene as a word after a space, as it generates them.
    return list(tokenizer(_format(fmt).answer_prefix + answer, add_special_tokens=False)["input_ids"])


def decode_text(tokenizer: Any, ids: Sequence[int] | Any) -> str:
    """The text of generated ids up to the first EOS (special tokens dropped)."""
    values = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in values:
        values = values[: values.index(eos)]
    return tokenizer.decode(values, skip_special_tokens=True)


def decode_answer(tokenizer: Any, ids: Sequence[int] | Any, fmt: PromptFormat | str | None = None) -> str:
    """The answer in generated ``ids`` (list or 1-d tensor/array), up to the first EOS, by ``parse_label``."""
    return _format(fmt).parse_label(decode_text(tokenizer, ids))


def join_example(prompt_ids: Sequence[int], answer_ids: Sequence[int],
                 eos_token_id: int) -> dict[str, list[int]]:
    """``input_ids`` = prompt + answer + EOS; ``labels`` the same with the prompt masked (-100)."""
    return {"input_ids": [*prompt_ids, *answer_ids, eos_token_id],
            "labels": [IGNORE_INDEX] * len(prompt_ids) + [*answer_ids, eos_token_id]}


Build = Callable[[int], tuple[list[int], list[int]]]
Step = Callable[[list[int], list[int], int], float]


def fit_length(n: int, max_length: int, build: Build, step: Step,
               error: str) -> tuple[list[int], list[int], int]:
    """The count ``n`` whose ``build(n)`` (prompt, answer ids) + EOS fits ``max_length``, lowered by ``step``'s
    estimate of tokens per unit (a few rounds); ValueError with ``error`` when even 0 does not fit."""
    while True:
        prompt_ids, answer_ids = build(n)
        total = len(prompt_ids) + len(answer_ids) + 1
        if total <= max_length:
            return prompt_ids, answer_ids, n
        if n == 0:
            raise ValueError(error)
        n = max(0, n - max(1, math.ceil((total - max_length) / step(prompt_ids, answer_ids, n))))


def _fit_genes(n_genes: int, max_length: int, build: Build, *, what: str) -> tuple[list[int], list[int], int]:
    def step(prompt_ids: list[int], answer_ids: list[int], n: int) -> float:
        return max(1.0, len(answer_ids if what == "generation" else prompt_ids) / max(n, 1))

    return fit_length(n_genes, max_length, build, step,
                      f"A {what} example does not fit into {max_length} tokens even without genes; "
                      "raise --max_seq_length or use a model with a longer context.")


def generation_example(tokenizer: Any, genes: Sequence[str], cell_type: str | None, *, template: str,
                       max_length: int, fmt: PromptFormat | str | None = None,
                       conditions: Sequence[tuple[str, str]] | None = None) -> tuple[dict[str, list[int]], int]:
    """Prompt for the genes of a ``cell_type`` cell (or one with ``(column, value)`` ``conditions``) -> the
    genes + EOS, and the genes kept (fewer when it would not fit ``max_length``; the EOS is never cut)."""
    fmt = _format(fmt)

    def build(n: int) -> tuple[list[int], list[int]]:
        prompt = (fmt.conditions_prompt(conditions, n, template=template) if conditions
                  else fmt.generation_prompt(cell_type, n, template=template))
        return (encode_prompt(tokenizer, prompt, fmt),
                encode_answer(tokenizer, fmt.generation_answer(genes[:n]), fmt))

    prompt_ids, answer_ids, n = _fit_genes(len(genes), max_length, build, what="generation")
    return join_example(prompt_ids, answer_ids, tokenizer.eos_token_id), n


def prediction_example(tokenizer: Any, genes: Sequence[str], cell_type: str, *, template: str, max_length: int,
                       fmt: PromptFormat | str | None = None, attribute: str | None = None,
                       ) -> tuple[dict[str, list[int]], int]:
    """Prompt with ranked ``genes`` -> ``cell_type`` (or the ``attribute`` column's label) + EOS, and the genes
    kept (the lowest-ranked are dropped when it would not fit ``max_length``; the answer is never cut)."""
    fmt = _format(fmt)
    answer_ids = encode_answer(tokenizer, fmt.prediction_answer(cell_type), fmt)

    def build(n: int) -> tuple[list[int], list[int]]:
        prompt = fmt.prediction_prompt(genes[:n], template=template, attribute=attribute)
        return encode_prompt(tokenizer, prompt, fmt), answer_ids

    prompt_ids, answer_ids, n = _fit_genes(len(genes), max_length, build, what="prediction")
    return join_example(prompt_ids, answer_ids, tokenizer.eos_token_id), n


def make_example(tokenizer: Any, sentence: str, cell_type: str | None, *, task: str, top_k: int,
                 max_length: int, rng: random.Random, fmt: PromptFormat | str | None = None,
                 attribute: str | None = None, conditions: Sequence[tuple[str, str]] | None = None,
                 ) -> dict[str, list[int]]:
    """One tokenized example of ``task`` (template from ``rng``); ``attribute``: a further label column's
    prediction (the answer ``cell_type``); ``conditions``: a conditional generation on those pairs."""
    fmt = _format(fmt)
    genes = sentence.split()[:top_k]
    kwargs = {"max_length": max_length, "fmt": fmt}
    if conditions:
        template = rng.choice(fmt.conditions_templates)
        return generation_example(tokenizer, genes, None, template=template, conditions=conditions, **kwargs)[0]
    if attribute is None and task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose from {', '.join(TASKS)}.")
    template = rng.choice(fmt.templates(task) if attribute is None else fmt.prediction_templates_for(attribute))
    if attribute is not None or task == CELL_TYPE_PREDICTION:
        return prediction_example(tokenizer, genes, str(cell_type), template=template, attribute=attribute,
                                  **kwargs)[0]
    typed = str(cell_type) if task == CONDITIONAL_GENERATION else None
    return generation_example(tokenizer, genes, typed, template=template, **kwargs)[0]


def tokenize_batch(batch: Mapping[str, Sequence[Any]], indices: Sequence[int], *, tokenizer: Any,
                   tasks: Mapping[str, float], top_k: int, max_length: int, seed: int, split: str,
                   cell_type_column: str | None = "cell_type",
                   prompt_format: PromptFormat | str = OURS, label_columns: Mapping[str, str] | None = None,
                   condition_columns: Sequence[str] = ()) -> dict[str, list[Any]]:
    """``datasets.map(batched=True, with_indices=True)`` function: one example per cell, its task drawn (seeded
    per cell) by the weights of ``tasks`` among those whose label it has; ``label_columns``: further columns by
    prediction task (``prediction_tasks``); ``condition_columns``: conditional generation's (``draw_conditions``)."""
    names, weights = list(tasks), list(tasks.values())
    fmt = _format(prompt_format)
    extra = dict(label_columns or {})
    sentences = batch["cell_sentence"]
    # The column whose label each task needs (None: an untyped task).
    needs = {n: extra.get(n, cell_type_column if n in TYPED_TASKS else None) for n in names}
    columns = {c: batch[c] if c in batch else [None] * len(sentences)
               for c in {*needs.values(), *condition_columns} - {None}}
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "task": []}
    for row, (sentence, index) in enumerate(zip(sentences, indices, strict=True)):
        rng = random.Random(f"{seed}:{split}:{index}")  # the same for any batching or number of workers
        known = {c for c, v in columns.items() if has_label(v[row])}
        eligible = [(n, w) for n, w in zip(names, weights, strict=True) if needs[n] is None or needs[n] in known]
        if not eligible or sum(w for _, w in eligible) <= 0:
            continue
        task = rng.choices([n for n, _ in eligible], weights=[w for _, w in eligible])[0]
        if task in MULTI_CELL_TASKS:
            continue  # this cell's share goes to a group example (utils.models.multi_cell)
        column = needs[task]
        label = columns[column][row] if column is not None else None
        conditions = None
        if task == CONDITIONAL_GENERATION and condition_columns:
            conditions = draw_conditions([(c, columns[c][row]) for c in condition_columns], rng)
        attribute = attribute_name(column) if task in extra else None
        example = make_example(tokenizer, sentence, label, task=task, top_k=top_k, max_length=max_length,
                               rng=rng, fmt=fmt, attribute=attribute, conditions=conditions)
        out["input_ids"].append(example["input_ids"])
        out["labels"].append(example["labels"])
        out["task"].append(task)
    return out


def draw_conditions(labels: Sequence[tuple[str, Any]], rng: random.Random) -> list[tuple[str, str]] | None:
    """The conditions of one generation example: each labelled ``(column, value)`` kept with
    probability 1/2 (none kept: the first); None when only the first column is left."""
    known = [(c, str(v)) for c, v in labels if has_label(v)]
    chosen = [pair for pair in known if rng.random() < 0.5] or known[:1]
    return None if [c for c, _ in chosen] == [labels[0][0]] else chosen


def has_label(cell_type: Any) -> bool:
    """Whether a cell-type value is a usable label (not None, empty or NaN)."""
    text = "" if cell_type is None else str(cell_type).strip()
    return bool(text) and text.lower() not in {"nan", "none"}


def parse_tasks(tasks: str, weights: str | None = None, *, extra_tasks: Sequence[str] = ()) -> dict[str, float]:
    """``"a,b"`` and optional ``"2,1"`` -> ``{"a": 2/3, "b": 1/3}``; ``extra_tasks``: further known tasks."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    known = (*TASKS, *extra_tasks)
    unknown = [t for t in names if t not in known]
    if not names or unknown:
        raise InputError(f"Unknown task(s) {unknown or tasks!r} in --tasks; choose a comma-separated "
                         f"subset of {','.join(known)}.")
    if len(set(names)) != len(names):
        raise InputError(f"--tasks {tasks!r} names a task twice; list each task once.")
    if weights is None:
        values = [1.0] * len(names)
    else:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise InputError(f"--task_weights {weights!r} is not a comma-separated list of numbers.") from None
        if len(values) != len(names) or any(v < 0 or not math.isfinite(v) for v in values):
            raise InputError(f"--task_weights {weights!r} needs one non-negative number per task of --tasks "
                             f"({len(names)}).")
        if sum(values) <= 0:
            raise InputError("--task_weights sum to zero; give at least one task a weight > 0.")
    total = sum(values)
    return {name: value / total for name, value in zip(names, values, strict=True)}


@dataclass
class CausalLMCollator:
    """Pad ``{"input_ids", "labels"}`` on the right (``pad_token_id``, -100) with an attention mask."""

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Any]:
        import torch
        from torch.nn.utils.rnn import pad_sequence

        def padded(rows: list[Sequence[int]], value: int) -> Any:
            return pad_sequence([torch.as_tensor(r, dtype=torch.long) for r in rows], batch_first=True,
                                padding_value=value)

        ids = [f["input_ids"] for f in features]
        return {"input_ids": padded(ids, self.pad_token_id), "attention_mask": padded([[1] * len(i) for i in ids], 0),
                "labels": padded([f["labels"] for f in features], IGNORE_INDEX)}
