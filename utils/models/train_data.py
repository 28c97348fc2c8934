"""The data ``train.py`` trains on: transform.py's DatasetDict checked, the label columns and task mix it allows,
the recipe, and the tokenized examples (one per cell, its task drawn at random, seeded per cell)."""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.cli import InputError
from utils.contract import open_dataset_dict
from utils.models.examples import (
    CONDITIONAL_GENERATION,
    TASKS,
    TYPED_TASKS,
    UNCONDITIONAL_GENERATION,
    has_label,
    parse_tasks,
    prediction_tasks,
    tokenize_batch,
)
from utils.models.multi_cell import MULTI_CELL_TASKS, multi_cell_examples
from utils.models.prompts import PROMPT_FORMATS, prompt_format
from utils.models.recipe import Recipe, transform_of

logger = logging.getLogger("cell2sentence.train")


def load_cell_sentences(data_dir: Path, *, do_eval: bool) -> Any:
    """transform.py's DatasetDict, checked for a train split of sentences and, with ``do_eval``, a valid split."""
    dataset = open_dataset_dict(data_dir)
    if "train" not in dataset:
        raise InputError(f"{data_dir} holds no 'train' split; pass the cell_sentences_hf/ folder written "
                         "by transform.py (splits train/valid/test).")
    if "cell_sentence" not in dataset["train"].column_names:
        raise InputError(f"The train split of {data_dir} has no 'cell_sentence' column "
                         f"(columns: {', '.join(dataset['train'].column_names)}).")
    if do_eval and ("valid" not in dataset or len(dataset["valid"]) == 0):
        raise InputError(f"Evaluation was asked for, but {data_dir} has no or an empty 'valid' split; "
                         "drop --eval_strategy or pass a dataset with a valid split.")
    if len(dataset["train"]) == 0:
        raise InputError(f"The train split of {data_dir} is empty; nothing to train on.")
    return dataset


def first_cells(split: Any, n: int | None) -> Any:
    """The first ``n`` cells of ``split`` (all of them when ``n`` is None)."""
    return split if n is None else split.select(range(min(n, len(split))))


def resolve_label_columns(label_column: str | None, label_columns: str | None,
                          columns: Sequence[str]) -> list[str]:
    """The label columns: ``--label_columns a,b``, else ``--label_column`` (default cell_type); each must exist."""
    if label_columns is None:
        if label_column is not None and label_column not in columns:
            raise InputError(f"The data has no column {label_column!r} given by --label_column (it has "
                             f"{', '.join(columns)}); fix the name or leave the flag out.")
        return [label_column or "cell_type"]
    names = [c.strip() for c in label_columns.split(",") if c.strip()]
    if not names:
        raise InputError(f"--label_columns {label_columns!r} names no column; e.g. --label_columns cell_type,tissue.")
    if len(set(names)) != len(names):
        raise InputError(f"--label_columns {label_columns!r} names a column twice; list each once.")
    if missing := [c for c in names if c not in columns]:
        raise InputError(f"The data has no column {', '.join(map(repr, missing))} given by --label_columns "
                         f"(it has {', '.join(columns)}); fix the name, or carry the column into the dataset "
                         "with transform.py --obs_columns.")
    if label_column is not None and label_column != names[0]:
        raise InputError(f"--label_column {label_column!r} and --label_columns {label_columns!r} disagree; the "
                         "first of --label_columns is the label column: drop --label_column.")
    return names


def label_columns_of(data_args: Any) -> list[str]:
    """The label columns of train.py's resolved ``DataArguments``: the cell type's first."""
    if data_args.label_columns:
        return [c.strip() for c in data_args.label_columns.split(",") if c.strip()]
    return [data_args.label_column or "cell_type"]


def label_set(split: Any, column: str | None) -> list[str]:
    """The sorted labels of ``column`` in ``split`` (missing labels left out; [] without the column)."""
    if column not in split.column_names:
        return []
    return sorted({str(x) for x in split.unique(column) if has_label(x)})


def condition_columns_of(data_args: Any, tasks: Sequence[str]) -> list[str]:
    """The label columns conditional generation is conditioned on, in any subset ([]: the cell type alone)."""
    columns = label_columns_of(data_args)
    fmt = prompt_format(data_args.prompt_format)
    trained = len(columns) > 1 and CONDITIONAL_GENERATION in tasks and fmt.conditions_templates
    return columns if trained else []


def resolve_tasks(data_args: Any, columns: Sequence[str]) -> dict[str, float]:
    """The task mix: train.py's flags (``data_args``), or all tasks the data allows."""
    label = data_args.label_column or "cell_type"
    has_types = label in columns
    extra = list(prediction_tasks(label_columns_of(data_args)))  # further columns' prediction
    if getattr(data_args, "multi_cell_column", None):
        extra += list(MULTI_CELL_TASKS)
    fmt = prompt_format(data_args.prompt_format)  # a format may lack some tasks' prompts
    if data_args.tasks is None:
        if has_types:
            return parse_tasks(",".join([*(t for t in TASKS if t in fmt.tasks), *extra]),
                               data_args.task_weights, extra_tasks=extra)
        if UNCONDITIONAL_GENERATION not in fmt.tasks:
            raise InputError(f"The {fmt.name} format has only cell-type tasks, but the data has no "
                             f"{label!r} column; pass --label_column.")
        logger.warning("The data has no %r column; training unconditional_generation only.", label)
        return parse_tasks(UNCONDITIONAL_GENERATION, data_args.task_weights)
    tasks = parse_tasks(data_args.tasks, data_args.task_weights, extra_tasks=extra)
    if lacking := [t for t in tasks if t not in fmt.tasks and t not in extra]:
        others = [n for n in PROMPT_FORMATS if set(tasks) <= set(prompt_format(n).tasks)]
        raise InputError(f"The {fmt.name} prompt format has no {', '.join(lacking)} prompts; drop it "
                         f"from --tasks{' or use --prompt_format ' + ' or '.join(others) if others else ''}.")
    typed = [t for t in tasks if t in TYPED_TASKS]
    if typed and not has_types:
        raise InputError(f"Task(s) {', '.join(typed)} need cell types, but the data has no {label!r} column; "
                         "pass --label_column with the label column or --tasks unconditional_generation.")
    return tasks


def tokenize_split(split: Any, name: str, args: Any, tokenizer: Any, tasks: dict[str, float],
                   max_length: int) -> Any:
    """One tokenized example per cell (input_ids, labels, task), then the multi-cell ones."""
    d = args.data
    fmt = prompt_format(d.prompt_format, organism=d.organism)
    examples = split.map(
        tokenize_batch, batched=True, with_indices=True, remove_columns=split.column_names,
        keep_in_memory=True,  # never write cache files into transform.py's output folder
        num_proc=d.num_proc, desc=f"Building {name} examples",
        fn_kwargs={"tokenizer": tokenizer, "tasks": tasks, "top_k": d.top_k_genes, "max_length": max_length,
                   "seed": args.training.seed, "split": name, "cell_type_column": d.label_column,
                   "prompt_format": fmt, "label_columns": prediction_tasks(label_columns_of(d)),
                   "condition_columns": condition_columns_of(d, tasks)},
    )
    column = getattr(d, "multi_cell_column", None)
    if not column:
        return examples
    from datasets import Dataset, concatenate_datasets

    groups = multi_cell_examples(split, name, tokenizer=tokenizer, tasks=tasks, column=column,
                                 cells_per_example=d.cells_per_example, top_k=d.top_k_genes,
                                 max_length=max_length, seed=args.training.seed, fmt=fmt)
    if not groups["task"]:
        return examples
    if len(examples) == 0:  # every cell's share went to groups
        return Dataset.from_dict(groups)
    return concatenate_datasets([examples, Dataset.from_dict(groups, features=examples.features)])


def build_examples(train_split: Any, valid_split: Any | None, args: Any, tokenizer: Any, tasks: dict[str, float],
                   max_length: int) -> tuple[Any, Any | None, dict[str, Any]]:
    """The training and evaluation examples (None without ``valid_split``) and the training ones' counts."""
    d = args.data
    with args.training.main_process_first(desc="building examples"):
        try:
            train_examples = tokenize_split(train_split, "train", args, tokenizer, tasks, max_length)
            eval_examples = (None if valid_split is None else
                             tokenize_split(valid_split, "valid", args, tokenizer, tasks, max_length))
        except ValueError as err:
            if "does not fit" in str(err):
                raise InputError(str(err)) from None
            raise
    lengths = [len(ids) for ids in train_examples["input_ids"]]
    answer = [sum(1 for x in labels if x != -100) for labels in train_examples["labels"]]
    stats = {"n_examples": len(lengths), "task_counts": dict(sorted(Counter(train_examples["task"]).items())),
             "avg_tokens_per_example": round(statistics.fmean(lengths), 2) if lengths else 0.0,
             "max_tokens_per_example": max(lengths, default=0),
             "avg_answer_tokens": round(statistics.fmean(answer), 2) if answer else 0.0}
    if stats["n_examples"] == 0:
        raise InputError(f"No training example could be built: no cell of {d.data_dir} has a "
                         f"{' or '.join(map(repr, label_columns_of(d)))} label; "
                         "add unconditional_generation to --tasks.")
    if stats["n_examples"] < len(train_split) and not getattr(d, "multi_cell_column", None):
        logger.warning("%s training cells without a label were left out (their tasks need one).",
                       f"{len(train_split) - stats['n_examples']:,}")
    logger.info("%s training examples (%s), %.1f tokens per example on average (longest %d, context "
                "%d), %.1f answer tokens.", f"{stats['n_examples']:,}",
                ", ".join(f"{k} {v:,}" for k, v in stats["task_counts"].items()),
                stats["avg_tokens_per_example"], stats["max_tokens_per_example"], max_length,
                stats["avg_answer_tokens"])
    return (train_examples.remove_columns("task"),
            None if eval_examples is None else eval_examples.remove_columns("task"), stats)


def training_recipe(data_args: Any, tasks: dict[str, float], train_split: Any, cell_types: Sequence[str],
                    earlier: Mapping[str, Any]) -> Recipe:
    """The run's recipe (labels only of columns a task taught); warns if the transform changed since ``earlier``."""
    from utils.transform.labels import refuse_unsafe_labels

    d, data_dir = data_args, Path(data_args.data_dir).resolve()
    labelled = cell_types and any(task in TYPED_TASKS for task in tasks)
    recipe = Recipe(prompt_format=d.prompt_format, organism=d.organism, top_k_genes=int(d.top_k_genes),
                    tasks=list(tasks), task_weights=[float(w) for w in tasks.values()],
                    label_columns={d.label_column: sorted(map(str, cell_types))} if labelled else {},
                    **transform_of(data_dir.parent), data_dir=str(data_dir))
    logger.info("Model %s.", recipe.describe())
    before = earlier.get("recipe")
    if isinstance(before, dict) and (before.get("transform"), before.get("genes")) != (
            recipe.transform, recipe.genes):
        logger.warning("The transform of %s changed since the run started (its options or vocabulary differ "
                       "from the run's recipe); the resumed run trains on the new sentences.", d.data_dir)
    recipe.condition_columns = condition_columns_of(d, tasks)
    for task, column in prediction_tasks(label_columns_of(d)).items():
        if task not in tasks and column not in recipe.condition_columns:
            continue
        labels = label_set(train_split, column)
        refuse_unsafe_labels(labels, column=column, path=d.data_dir)
        recipe.label_columns[column] = sorted(labels)
        logger.info("Label column %s: %s labels (%s).", column, f"{len(labels):,}",
                    f"task {task}={tasks[task]:.2f}" if task in tasks else "a generation condition")
    if recipe.condition_columns:
        logger.info("Conditional generation on any subset of %s.", ", ".join(recipe.condition_columns))
    if d.multi_cell_column is not None:
        groups = label_set(train_split, d.multi_cell_column)
        refuse_unsafe_labels(groups, column=d.multi_cell_column, path=d.data_dir)
        recipe.multi_cell_column, recipe.cells_per_example = d.multi_cell_column, d.cells_per_example
        recipe.group_labels = groups
        logger.info("Multi-cell tasks: groups of %d cells by %s (%s labels).", d.cells_per_example,
                    d.multi_cell_column, f"{len(groups):,}")
    return recipe
