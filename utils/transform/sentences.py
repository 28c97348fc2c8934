"""The Python API for notebooks (docs/api.md): ``adata_to_sentences`` runs ``transform.py``'s plan,
kernels and driver on an AnnData in memory (same sentences, tested); ``CellSentences.save`` writes
the script's data contract.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from utils.cli import InputError
from utils.contract import TRANSFORM, preprocessed_name, transform_names
from utils.publish import staged_outputs
from utils.transform.fit import RankExpressionFit
from utils.transform.outputs import TransformOutputs, arrow_schema, preprocessed_obs
from utils.transform.pipeline import (
    SPLITS,
    RunPlan,
    TransformOptions,
    assign_splits,
    plan_run,
    rank_rows,
    sentence_pass,
)
from utils.transform.preprocess import TARGET_SUM, QCParams
from utils.transform.readers import InMemorySource
from utils.transform.sentence_chunk import SentenceChunk, write_text

__all__ = ["CellSentences", "adata_to_sentences"]

logger = logging.getLogger("cell2sentence")

MAX_DEFAULT_THREADS = 8  # n threads hold n + 1 chunks in flight (~100 MB each at 2,000 genes a cell)


def default_threads() -> int:
    """``adata_to_sentences``' default ``num_proc``: the cores it may use, at most ``MAX_DEFAULT_THREADS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, MAX_DEFAULT_THREADS)


@dataclass
class CellSentences:
    """The cell sentences of an AnnData's kept cells (input order), with what made them.

    ``sentence_array``: Arrow strings (``.sentences``: Python strings). ``columns``: the dataset's
    columns per kept cell; ``labels``: its ``cell_type`` or None; ``qc_table``: what QC removed per label.
    """

    # The large fields stay out of the repr (a notebook prints it).
    sentence_array: pa.ChunkedArray = field(repr=False)
    cell_names: list[str] = field(repr=False)
    labels: list[str] | None = field(repr=False)
    preprocessed: ad.AnnData  # kept cells x kept genes, log10(1 + normalized), CSR float32
    fit: RankExpressionFit
    columns: dict[str, np.ndarray] = field(repr=False)
    options: TransformOptions
    eval_points: tuple[np.ndarray, np.ndarray] = field(repr=False)  # (log-rank, log-expression) of the fit's sample
    kept_rows: np.ndarray | None = field(default=None, repr=False)  # the kept cells' rows in the input
    qc_table: pd.DataFrame | None = field(default=None, repr=False)  # what QC removed per label (``qc_by_label``)
    _sentences: list[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.sentence_array)

    @property
    def sentences(self) -> list[str]:
        """One string per kept cell, in input order (made on first use)."""
        if self._sentences is None:
            self._sentences = self.sentence_array.to_pylist()
        return self._sentences

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_sentences": None}  # pickled once, as Arrow strings

    @property
    def genes(self) -> list[str]:
        """The vocabulary: the kept genes, in the preprocessed AnnData's order."""
        return self.preprocessed.var_names.tolist()

    def split_of_cells(self, split_fractions: Sequence[float] | None = None, seed: int | None = None) -> np.ndarray:
        """Per cell, 0 train, 1 valid or 2 test, drawn as ``transform.py`` draws them."""
        fractions = self.options.split_fractions if split_fractions is None else tuple(split_fractions)
        replace(self.options, split_fractions=fractions).check()
        return assign_splits(len(self), fractions, seed=self.options.seed if seed is None else seed)

    def to_dataset_dict(self, split_fractions: Sequence[float] | None = None, seed: int | None = None):
        """A ``datasets.DatasetDict`` with splits train/valid/test and the script's columns."""
        import datasets  # seconds to import: only when asked for
        from datasets.fingerprint import generate_random_fingerprint

        split = self.split_of_cells(split_fractions, seed)
        schema = arrow_schema(self.columns)
        # One Arrow table of the kernels' strings: Dataset.from_dict would encode them row by row.
        columns = {n: pa.array(v, type=schema.field(n).type) for n, v in self.columns.items()}
        table = pa.table({"cell_name": columns.pop("cell_name"), "cell_sentence": self.sentence_array, **columns})
        info = datasets.DatasetInfo(features=datasets.Features.from_arrow_schema(schema))
        # The splits share the table through indices mappings (taking the rows would copy every
        # sentence); a fingerprint is given, else datasets hashes the whole table.
        return datasets.DatasetDict({
            name: datasets.Dataset(table, info=info, indices_table=pa.table({"indices": np.flatnonzero(split == i)
                                                                             .astype(np.uint64)}),
                                   fingerprint=generate_random_fingerprint())
            for i, name in enumerate(SPLITS)
        })

    def save(self, output_dir: Path | str, *, name: str = "adata", split_fractions: Sequence[float] | None = None,
             seed: int | None = None, overwrite: bool = False) -> Path:
        """Write ``transform.py``'s data contract under ``output_dir`` (staged); returns ``output_dir``."""
        output_dir = Path(output_dir)
        split = self.split_of_cells(split_fractions, seed)
        X = sp.csr_matrix(self.preprocessed.X)
        with staged_outputs(output_dir, transform_names(name), overwrite=overwrite) as tmp, TransformOutputs(
                tmp, self.columns, np.asarray(self.genes, dtype=object), np.diff(X.indptr),
                h5ad_name=preprocessed_name(name)) as outputs:
            for ticket, start in enumerate(range(0, len(self), 4_096)):  # a few thousand Python strings at a time
                stop = min(start + 4_096, len(self))
                rows = [start + np.flatnonzero(split[start:stop] == i) for i in range(len(SPLITS))]
                taken = [self.sentence_array.take(pa.array(r, pa.int64())).combine_chunks() for r in rows]
                text = ["".join(t + "\n" for t in strings.to_pylist()).encode() for strings in taken]
                lo, hi = X.indptr[start], X.indptr[stop]
                rows_and_text = SentenceChunk(indices=X.indices[lo:hi], data=X.data[lo:hi], text=text)
                outputs.write(ticket, start, rows_and_text, rows, taken)
            outputs.finish(split=split, gene_cells=self.preprocessed.var["n_cells"].to_numpy(),
                           obs=self.preprocessed.obs.copy(), fit=self.fit, points=self.eval_points,
                           qc_table=self.qc_table, seed=self.options.seed)
            recorded = {**asdict(self.options), "split_fractions": list(self.options.split_fractions
                                                                         if split_fractions is None else split_fractions)}
            if seed is not None and seed != self.options.seed:  # "seed" made the sentences' tie-breaking
                recorded["split_seed"] = seed
            (tmp / TRANSFORM.args).write_text(json.dumps(recorded, indent=2, sort_keys=True, default=str) + "\n")
        return output_dir


def adata_to_sentences(
    adata: ad.AnnData, *, layer: str | None = None, input_kind: str = "auto", gene_column: str | None = None,
    label_column: str | bool | None = None, obs_columns: Sequence[str] = (), qc: QCParams | bool = True,
    max_genes: int | None = None, exclude_genes: str | None = None, target_sum: float = TARGET_SUM,
    seed: int = 1234, split_fractions: Sequence[float] = (0.8, 0.1, 0.1), fit_threshold: float = 3.0,
    eval_cells: int = 1_000, bad_gene_names: str = "replace", chunk_size: int = 2_048, num_proc: int | None = None,
    progress: bool = False,
) -> CellSentences:
    """Cell sentences of an in-memory AnnData, as ``transform.py`` makes them (the input is not modified).

    The parameters are the script's flags (docs/api.md); ``qc``: True (the original's QC), False
    (none) or a ``QCParams``; ``label_column=False``: no labels; ``num_proc`` (default: the cores this
    process may use, at most ``MAX_DEFAULT_THREADS``) and ``chunk_size`` change speed and memory only.
    """
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"adata_to_sentences takes an AnnData, not {type(adata).__name__}.")
    if isinstance(qc, QCParams):
        params = qc
    elif isinstance(qc, bool | np.bool_):
        params = QCParams(enabled=bool(qc))
    else:  # bool("no") is True: anything but a bool or QCParams would silently mean some QC
        raise InputError(f"qc must be True (the original's QC), False (none) or a QCParams, not {qc!r}.")
    if adata.isbacked:  # its matrix is on disk, where rows cannot be served as views
        logger.info("Reading the backed AnnData %s into memory.", adata.filename)
        adata = adata.to_memory()
    if num_proc is None:  # a notebook user gets every core: the sentences do not depend on it
        num_proc = default_threads()
    options = TransformOptions(
        input_kind=input_kind, gene_column=gene_column, label_column=label_column, obs_columns=tuple(obs_columns),
        bad_gene_names=bad_gene_names, qc=params, max_genes=max_genes, exclude_genes=exclude_genes,
        target_sum=float(target_sum), split_fractions=tuple(split_fractions), eval_cells=eval_cells, seed=seed,
        chunk_size=chunk_size, num_proc=num_proc,
    )  # fmt: skip
    options.check()
    source = InMemorySource(adata, "the AnnData", layer=layer)
    plan = plan_run(source, options, progress=progress)
    memory = _MemorySink(plan)
    gene_cells, fit, points = sentence_pass(plan, memory, num_proc=num_proc, fit_threshold=fit_threshold,
                                            progress=progress)
    kept = plan.qc.cell_mask
    columns = {n: v[kept] for n, v in plan.columns.items()}
    preprocessed = ad.AnnData(
        X=memory.matrix, obs=preprocessed_obs(plan),
        var=pd.DataFrame({"n_cells": gene_cells}, index=pd.Index(plan.kept_names.astype(str))),
        uns={"log1p": {"base": 10.0}},
    )
    labels = columns["cell_type"].tolist() if "cell_type" in columns else None
    return CellSentences(pa.chunked_array(memory.sentences, pa.string()), columns["cell_name"].tolist(), labels,
                         preprocessed, fit, columns, options, points, np.flatnonzero(kept), plan.qc_table)


class _MemorySink:
    """Pass 2 into memory: each chunk's preprocessed rows go straight into their place in one CSR
    matrix, its sentences are kept as Arrow strings."""

    def __init__(self, plan: RunPlan):
        self.plan = plan
        indptr = np.zeros(plan.n_kept + 1, np.int64)
        np.cumsum(plan.qc.n_stored[plan.qc.cell_mask], out=indptr[1:])
        self.matrix = sp.csr_matrix((np.empty(indptr[-1], np.float32), np.empty(indptr[-1], np.int32), indptr),
                                    shape=(plan.n_kept, len(plan.kept_names)))
        self.sentences: list[pa.StringArray] = []

    def task(self, ticket: int, bounds: tuple[int, int]) -> SentenceChunk:
        start, stop = bounds
        plan, matrix = self.plan, self.matrix
        chunk = plan.source.read_rows(start, stop)
        first = matrix.indptr[plan.first_kept(start)]  # where the chunk's rows go
        # The kernel needs room for every stored entry of the chunk, kept or not: near the end of
        # the matrix that room is not there, and the chunk's rows are made apart and copied in.
        in_place = first + chunk.nnz <= len(matrix.data)
        # Every kept cell as split 0: its Arrow strings are the sentences in input order.
        ranked = rank_rows(plan, chunk, start, np.where(plan.split_of_cell[start:stop] >= 0, 0, -1),
                           out_arrays=(matrix.indices[first:], matrix.data[first:]) if in_place else None)
        if not in_place:
            matrix.indices[first : first + len(ranked.indices)] = ranked.indices
            matrix.data[first : first + len(ranked.data)] = ranked.data
        return write_text(ranked, plan.names)

    def add(self, chunk: SentenceChunk, start: int) -> None:
        self.sentences.append(chunk.strings(0))

    def abort(self) -> None:
        """Nothing waits on a turn."""
