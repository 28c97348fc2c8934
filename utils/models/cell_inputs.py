"""New cells as a model saw its training cells: sentences made with its recipe, the training QC's
verdict per cell, and a run's record."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from utils.cli import InputError
from utils.contract import TRAIN, read_record
from utils.models.recipe import Recipe

logger = logging.getLogger("cell2sentence")


def read_train_record(name_or_dir: str | Path) -> dict[str, Any]:
    """``train_args.json`` of a ``train.py`` run, or {} (a published or other model); one
    sentence when the file is not valid JSON."""
    path = Path(str(name_or_dir)).expanduser() / TRAIN.args
    if not path.is_file():
        from utils.models.loading import hub_file

        path = hub_file(str(name_or_dir), TRAIN.args)  # a hub name: a model pushed by train.py
        if path is None:
            return {}
    record = read_record(path)
    if not isinstance(record, dict):
        raise InputError(f"{path} holds no run record (a JSON object); restore it from the run or delete it.")
    return record


def as_sentences(cells: Any, *, max_genes: int | None = None, recipe: Recipe | None = None) -> list[str]:
    """Cell sentences from a list of sentences, a ``datasets.Dataset`` split, a ``CellSentences``
    or an AnnData: the latter made without QC with ``recipe``'s sentence options, so every cell
    gets its training sentence, in the AnnData's order (a cell with no counts an empty one)."""
    import anndata

    if isinstance(cells, str):
        raise InputError("Pass a list of cell sentences, not one string.")
    if isinstance(cells, anndata.AnnData):
        from utils.transform.sentences import adata_to_sentences

        options = recipe.sentence_kwargs() if recipe is not None else {}
        made = adata_to_sentences(cells, qc=False, max_genes=max_genes, label_column=False, **options)
        sentences = [""] * cells.n_obs
        for row, sentence in zip(made.kept_rows, made.sentences, strict=True):
            sentences[row] = sentence
        return sentences
    if hasattr(cells, "sentences") and hasattr(cells, "cell_names"):  # utils.transform.sentences.CellSentences
        return [str(s) for s in cells.sentences]
    if hasattr(cells, "column_names"):  # datasets.Dataset / pyarrow.Table
        if "cell_sentence" not in cells.column_names:
            raise InputError(f"The dataset has no 'cell_sentence' column (it has {list(cells.column_names)}).")
        values = cells["cell_sentence"] if hasattr(cells, "with_format") else cells.column("cell_sentence").to_pylist()
        return [str(s) for s in values]
    if hasattr(cells, "keys") and "train" in cells:
        raise InputError("Pass one split of the DatasetDict (e.g. dataset['test']), not the whole dict.")
    return [str(s) for s in cells]


def qc_kept(adata: Any, recipe: Recipe) -> np.ndarray:
    """Per cell of ``adata``, whether the training transform's QC (the recipe's thresholds)
    would have kept it; all True when the transform ran without QC or recorded none."""
    from utils.transform.preprocess import QCParams
    from utils.transform.sentences import adata_to_sentences

    if not recipe.qc or not recipe.qc.get("enabled", True):
        return np.ones(adata.n_obs, dtype=bool)
    params = QCParams(**{k: v for k, v in recipe.qc.items() if k in QCParams.__dataclass_fields__},
                      min_cells_per_gene=1)  # genes: the model's vocabulary decides, not this data's counts
    kept = np.zeros(adata.n_obs, dtype=bool)
    try:
        made = adata_to_sentences(adata, qc=params, max_genes=1, label_column=False, **recipe.sentence_kwargs())
    except InputError as err:  # "no cells left after QC": every cell is flagged, none dropped
        logger.warning("The training transform's QC would drop every cell (%s).", err)
        return kept
    kept[made.kept_rows] = True
    return kept
