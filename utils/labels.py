"""Cell labels and cell names as the transform writes them: one line each, no special token.

A label becomes part of the training text ("... a cell of type X ...") and a line of
``generated_labels.txt``; a cell name becomes a line of ``{split}_barcodes.txt`` and an index of
the preprocessed AnnData. So a label may not hold a line break or a tokenizer's special token,
and cell names must be unique.
"""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from utils.common import InputError

# Special tokens of our tokenizer (<pad>, <bos>, <eos>, <unk>) and of the hub's (GPT-2's
# <|endoftext|>, Llama's <s> and </s>): inside a label they would end or pad an answer.
SPECIAL_TOKEN = re.compile(r"</?\|?[A-Za-z_]+\|?>")
# Whitespace other than a plain space (newline, tab, ...): it would split a line of text output.
LINE_BREAKING = re.compile(r"[^\S ]")


def as_strings(values: pd.Series) -> np.ndarray:
    """Values as strings (object array), missing ones (NaN, None) as None (Arrow's null)."""
    if isinstance(values.dtype, pd.CategoricalDtype):  # one str() per category, not per cell
        table = np.array([str(c) for c in values.cat.categories] + [None], dtype=object)
        return table[values.cat.codes.to_numpy()]  # a missing value's code, -1, picks the None
    text = values.astype(str).to_numpy(dtype=object)
    text[values.isna().to_numpy()] = None
    return text


def clean_labels(values: pd.Series, *, column: str, path: Path) -> tuple[np.ndarray, list[str]]:
    """Labels as strings (object array), missing ones (NaN, None) as None; whitespace runs with a
    newline or tab become one space. Returns the labels and warnings to log.

    A label holding a special token is refused with one sentence (``InputError``).

    >>> labels, notes = clean_labels(pd.Series(["T cell", None, "B\\ncell"]), column="c", path=Path("a"))
    >>> labels.tolist(), len(notes)
    (['T cell', None, 'B cell'], 2)
    """
    labels = as_strings(values)
    missing = np.equal(labels, None)
    notes = []
    if missing.any():
        notes.append(
            f"{int(missing.sum()):,} of {len(labels):,} cells have no label in obs[{column!r}] (NaN): they keep "
            "their sentence with a missing label (null); train.py gives them only untyped tasks."
        )
    distinct = pd.unique(labels[~missing])
    _refuse_special_tokens(distinct, where=f"obs[{column!r}]", path=path)
    broken = [v for v in distinct if LINE_BREAKING.search(v)]
    if broken:
        fixed = {v: re.sub(r"\s+", " ", v).strip() for v in broken}
        labels[~missing] = pd.Series(labels[~missing]).replace(fixed).to_numpy(dtype=object)
        notes.append(f"Replaced line breaks and tabs by one space in {len(broken):,} labels of obs[{column!r}] "
                     f"(e.g. {broken[0]!r} -> {fixed[broken[0]]!r}).")
    return labels, notes


def _refuse_special_tokens(labels, *, where: str, path: Path) -> None:
    tokens = [v for v in labels if SPECIAL_TOKEN.search(v)]
    if tokens:
        raise InputError(
            f"{path}: {where} label {tokens[0]!r} holds the special token "
            f"{SPECIAL_TOKEN.search(tokens[0]).group()!r}, which would end or pad the model's answers; rename it "
            "(e.g. without the angle brackets)."
        )


def refuse_unsafe_labels(labels: list[str], *, column: str, path: Path) -> None:
    """One sentence (``InputError``) for a label of a dataset (not necessarily made by
    ``transform.py``, which cleans them) that holds a special token or a line break.

    >>> refuse_unsafe_labels(["T cell", "B cell"], column="cell_type", path=Path("d"))
    """
    _refuse_special_tokens(labels, where=f"column {column!r}", path=path)
    broken = [v for v in labels if LINE_BREAKING.search(v)]
    if broken:
        raise InputError(f"{path}: column {column!r} label {broken[0]!r} holds a line break or tab, which would "
                         "split a line of the text outputs; make it one line (transform.py does so).")


def unique_cell_names(names: pd.Index) -> tuple[np.ndarray, list[str]]:
    """Cell names as strings, made unique by appending -1, -2, ... (as ``make_index_unique``),
    and warnings to log.

    >>> unique_cell_names(pd.Index(["a", "b", "a"]))[0].tolist()
    ['a', 'b', 'a-1']
    """
    names = pd.Index(names.astype(str))
    if names.is_unique:
        return names.to_numpy(dtype=object), []
    duplicated = names[names.duplicated()]
    note = (f"{len(duplicated):,} cell names are repeated (e.g. {duplicated[0]!r}): made unique by appending -1, -2, "
            "...; the preprocessed AnnData keeps the names as given in obs['original_cell_name'].")
    return ad.utils.make_index_unique(names).to_numpy(dtype=object), [note]


def dataset_columns(obs: pd.DataFrame, obs_columns: dict[str, str], *, path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per input cell, the dataset's columns: ``cell_name`` (unique), then ``obs_columns``
    (dataset name -> obs column): the cell type as clean labels, other non-numeric columns as
    strings, a missing value as None. Returns the columns and warnings to log."""
    names, notes = unique_cell_names(obs.index)
    columns = {"cell_name": names}
    for name, column in obs_columns.items():
        values = obs[column]
        if name == "cell_type":
            columns[name], label_notes = clean_labels(values, column=column, path=path)
            notes += label_notes
        else:
            columns[name] = values.to_numpy() if pd.api.types.is_numeric_dtype(values) else as_strings(values)
    return columns, notes
