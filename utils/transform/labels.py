"""Cell labels and cell names as the transform writes them: one line each (labels are lines of
training text and of ``generated_labels.txt``, names of ``{split}_barcodes.txt``), labels without a
tokenizer's special token, names unique."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from utils.cli import InputError

# Special tokens of our tokenizer (<pad>, <bos>, <eos>, <unk>) and of the hub's (GPT-2's
# <|endoftext|>, Llama's <s> and </s>): inside a label they would end or pad an answer.
SPECIAL_TOKEN = re.compile(r"</?\|?[A-Za-z_]+\|?>")
# Whitespace other than a plain space (newline, tab, ...): it would split a line of text output.
LINE_BREAKING = re.compile(r"[^\S ]")
# More distinct whole numbers than this in a label column are not class labels (cluster numbers are).
MAX_NUMERIC_CLASSES = 100


def as_strings(values: pd.Series) -> np.ndarray:
    """Values as strings (object array), missing ones (NaN, None) as None (Arrow's null)."""
    if isinstance(values.dtype, pd.CategoricalDtype):  # one str() per category, not per cell
        table = np.array([str(c) for c in values.cat.categories] + [None], dtype=object)
        return table[values.cat.codes.to_numpy()]  # a missing value's code, -1, picks the None
    text = values.astype(str).to_numpy(dtype=object)
    text[values.isna().to_numpy()] = None
    return text


def clean_labels(values: pd.Series, *, column: str, path: Path) -> tuple[np.ndarray, list[str]]:
    """Labels as ``one_line`` strings, missing ones (NaN, None, blank) as None, and warnings to log;
    ``InputError`` for a label holding a special token."""
    labels = as_strings(values)
    notes = []
    present = ~np.equal(labels, None)
    distinct = pd.unique(labels[present])
    _refuse_special_tokens(distinct, where=f"obs[{column!r}]", path=path)
    fixed = {v: one_line(v) for v in distinct if one_line(v) != v}
    if fixed:  # a blank label becomes "": missing, below
        labels[present] = pd.Series(labels[present]).replace(fixed).to_numpy(dtype=object)
        changed = [v for v, new in fixed.items() if new]
        if changed:
            notes.append(f"Replaced line breaks, tabs and runs of spaces by one space and stripped the ends of "
                         f"{len(changed):,} labels of obs[{column!r}] (e.g. {changed[0]!r} -> {fixed[changed[0]]!r}).")
    blank = np.equal(labels, "")
    labels[blank] = None
    missing = np.equal(labels, None)
    if missing.any():
        what = "NaN or empty" if blank.any() else "NaN"
        notes.insert(0, f"{int(missing.sum()):,} of {len(labels):,} cells have no label in obs[{column!r}] "
                        f"({what}): they keep their sentence with a missing label (null); train.py gives them "
                        "only untyped tasks.")
    spellings = pd.Series(pd.unique(labels[~missing]), dtype=object)
    by_case = spellings.groupby(spellings.str.casefold()).agg(list)
    variants = [group for group in by_case if len(group) > 1]
    if variants:
        shown = "; ".join(", ".join(repr(v) for v in sorted(group)) for group in variants[:3])
        more = f"; {len(variants) - 3:,} more" if len(variants) > 3 else ""
        notes.append(f"Labels of obs[{column!r}] that differ only by letter case ({shown}{more}) stay separate "
                     "classes; give them one spelling if they are one type.")
    return labels, notes


def one_line(text: str) -> str:
    """``text`` with every whitespace run (line breaks and tabs included) one space, ends stripped."""
    return re.sub(r"\s+", " ", text).strip()


def _refuse_special_tokens(labels, *, where: str, path: Path) -> None:
    tokens = [v for v in labels if SPECIAL_TOKEN.search(v)]
    if tokens:
        token = SPECIAL_TOKEN.search(tokens[0]).group()
        raise InputError(f"{path}: {where} label {tokens[0]!r} holds the special token {token!r}, which would end "
                         "or pad the model's answers; rename it (e.g. without the angle brackets).")


def refuse_unsafe_labels(labels: list[str], *, column: str, path: Path) -> None:
    """``InputError`` for a dataset's label (maybe not made by ``transform.py``) that holds a special
    token or a line break."""
    _refuse_special_tokens(labels, where=f"column {column!r}", path=path)
    broken = [v for v in labels if LINE_BREAKING.search(v)]
    if broken:
        raise InputError(f"{path}: column {column!r} label {broken[0]!r} holds a line break or tab, which would "
                         "split a line of the text outputs; make it one line (transform.py does so).")


def unique_cell_names(names: pd.Index) -> tuple[np.ndarray, list[str]]:
    """Cell names as ``one_line`` strings made unique by appending -1, -2, ..., and warnings to log."""
    names = pd.Index(names.astype(str))
    notes = []
    broken = names.str.contains(LINE_BREAKING.pattern, regex=True)
    if broken.any():
        example = names[broken][0]
        names = pd.Index([one_line(n) if b else n for n, b in zip(names, broken, strict=True)])
        notes.append(f"Replaced line breaks and tabs by one space in {int(broken.sum()):,} cell names (e.g. "
                     f"{example!r} -> {one_line(example)!r}); the preprocessed AnnData keeps the names as given "
                     "in obs['original_cell_name'].")
    if names.is_unique:
        return names.to_numpy(dtype=object), notes
    duplicated = names[names.duplicated()]
    notes.append(f"{len(duplicated):,} cell names are repeated (e.g. {duplicated[0]!r}): made unique by appending -1, "
                 "-2, ...; the preprocessed AnnData keeps the names as given in obs['original_cell_name'].")
    return ad.utils.make_index_unique(names).to_numpy(dtype=object), notes


def numeric_label_note(values: pd.Series, *, column: str) -> str | None:
    """A warning when the label column holds fractions or more than ``MAX_NUMERIC_CLASSES`` distinct
    whole numbers (cluster numbers pass)."""
    numbers = values.cat.categories if isinstance(values.dtype, pd.CategoricalDtype) else values.dropna()
    if pd.api.types.is_bool_dtype(numbers) or not pd.api.types.is_numeric_dtype(numbers):
        return None
    distinct = np.unique(np.asarray(numbers, dtype=np.float64))
    if len(distinct) <= MAX_NUMERIC_CLASSES and np.all(distinct == np.round(distinct)):
        return None
    shown = ", ".join(f"{v:g}" for v in distinct[:3])
    return (f"obs[{column!r}] holds numbers ({len(distinct):,} distinct values, e.g. {shown}), which do not look "
            "like cell-type labels: each value becomes a class of its own; pass the obs column of cell types as "
            "--label_column.")


def dataset_columns(obs: pd.DataFrame, obs_columns: dict[str, str], *, path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per input cell, the dataset's columns: ``cell_name``, then ``obs_columns`` (dataset name ->
    obs column; the cell type as clean labels, other non-numeric columns as strings, a missing
    value as None); and warnings to log."""
    names, notes = unique_cell_names(obs.index)
    columns = {"cell_name": names}
    for name, column in obs_columns.items():
        values = obs[column]
        if name == "cell_type":
            columns[name], label_notes = clean_labels(values, column=column, path=path)
            notes += label_notes
            note = numeric_label_note(values, column=column)
            notes += [note] if note else []
        else:
            columns[name] = values.to_numpy() if pd.api.types.is_numeric_dtype(values) else as_strings(values)
    return columns, notes
