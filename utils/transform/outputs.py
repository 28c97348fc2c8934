"""The transform's outputs (the data contract of ``transform.py``), filled chunk by chunk.

``TransformOutputs`` owns every output file of a run and the pass-2 worker task that writes a
chunk into them; the pieces both it and the in-memory API use (the dataset's columns, the
preprocessed AnnData's ``obs``, the fit and its figures) are functions here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from utils.cli import InputError
from utils.contract import TRANSFORM, TRANSFORM_EVAL, VOCAB, split_files
from utils.transform.filewriter import DirectWriter, OrderedAppendFile
from utils.transform.fit import (
    METRIC_COLUMNS,
    NonFiniteError,
    RankExpressionFit,
    fit_rank_expression,
)
from utils.transform.formats import ArrowSplitWriter, H5adCSRWriter, write_dataset_dict_index
from utils.transform.pipeline import SPLITS, PassContext, RunPlan
from utils.transform.sentence_chunk import SentenceChunk, rank_chunk, write_text

logger = logging.getLogger("cell2sentence")


def arrow_schema(columns: dict[str, np.ndarray]) -> pa.Schema:
    return pa.schema([pa.field("cell_name", pa.string()), pa.field("cell_sentence", pa.string())]
                     + [pa.field(n, pa.string() if v.dtype == object else pa.from_numpy_dtype(v.dtype))
                        for n, v in columns.items() if n != "cell_name"])


def preprocessed_obs(plan: RunPlan, cell_names: np.ndarray) -> pd.DataFrame:
    """``obs`` of the preprocessed AnnData: the kept cells, their label and further columns,
    and their QC statistics (``split`` is added by whoever draws the splits)."""
    kept = plan.qc.cell_mask
    obs = pd.DataFrame(index=pd.Index(cell_names[kept], name=None))
    for name, values in plan.columns.items():
        if name != "cell_name":  # strings as categories, a missing one as NaN (as scanpy has them)
            obs[name] = pd.Categorical(values[kept]) if values.dtype == object else values[kept]
    given = plan.source.obs.index.astype(str).to_numpy(dtype=object)
    if not np.array_equal(plan.columns["cell_name"], given):  # repeated names were made unique
        obs["original_cell_name"] = given[kept]
    obs["n_genes"] = plan.qc.n_genes[kept]
    obs["total_counts"] = plan.qc.total[kept]
    obs["pct_counts_mt"] = plan.qc.pct_mt[kept]
    return obs


def fit_points(log_rank: np.ndarray, log_expression: np.ndarray, *, threshold: float, path: Any) -> RankExpressionFit:
    """The rank-expression fit, or the error a user can act on."""
    try:
        return fit_rank_expression(log_rank, log_expression, threshold=threshold)
    except NonFiniteError as err:
        raise InputError(f"{path}: {err} Check --input_kind against what the matrix holds.") from err
    except ValueError as err:
        raise InputError(f"{path}: {err} Lower --min_genes_per_cell or give more cells.") from err


def write_evaluation(root: Path, fit: RankExpressionFit, log_rank: np.ndarray, log_expression: np.ndarray,
                     *, seed: int) -> None:
    """``eval/transformation_metrics.csv`` and the two figures under the output folder ``root``."""
    (root / TRANSFORM_EVAL.metrics).parent.mkdir()
    pd.DataFrame([fit.as_row()], columns=list(METRIC_COLUMNS)).to_csv(root / TRANSFORM_EVAL.metrics, index=False)
    from utils.evaluation.figures import plot_log_rank_fit, plot_reconstruction

    plot_log_rank_fit(log_rank, log_expression, fit, root / TRANSFORM_EVAL.fit, seed=seed)
    plot_reconstruction(log_expression, fit.predict(log_rank), fit, root / TRANSFORM_EVAL.reconstruction, seed=seed)
    logger.info("Fit: log10(1+expr) = %.4f %+.4f * log10(1+rank); R^2 %.3f, Pearson r %.3f, Spearman r %.3f (%s points).",
                fit.intercept, fit.slope, fit.r_squared, fit.pearson_r, fit.spearman_r, f"{fit.n_points:,}")


def write_qc_by_label(root: Path, table: pd.DataFrame) -> None:
    """``eval/qc_by_label.csv``: per label, its cells, those each QC filter removed, those kept
    (``utils.transform.preprocess.qc_by_label``; cells without a label have an empty label)."""
    table.to_csv(root / TRANSFORM_EVAL.qc_by_label, index=False)


def write_vocab(path: Path, names: np.ndarray, gene_cells: np.ndarray) -> None:
    with path.open("w") as vocab:
        vocab.writelines(f"{g} {c}\n" for g, c in zip(names, gene_cells, strict=True))


def split_array(indices: dict[str, list[np.ndarray]], n: int) -> np.ndarray:
    """Per preprocessed row, its split's number, from each split's row indices."""
    split = np.zeros(n, np.int64)
    for i, s in enumerate(SPLITS):
        split[np.concatenate(indices[s]).astype(np.int64)] = i
    return split


class TransformOutputs:
    """The transform's output files under ``root``, filled chunk by chunk (in input order)."""

    def __init__(self, root: Path, plan: RunPlan, *, h5ad_name: str):
        self.root = root
        self.plan = plan
        qc = plan.qc
        self.split_of_cell = plan.split_of_cell
        self.text_dir = root / TRANSFORM.sentences
        self.text_dir.mkdir()
        self.kept_names = plan.kept_names
        self.first_kept_row = np.cumsum(qc.cell_mask) - qc.cell_mask
        self.direct = DirectWriter()  # large writes bypass the page cache (see DirectWriter)
        self.sentence_files = {s: OrderedAppendFile(self.text_dir / split_files(s).text, direct=self.direct) for s in SPLITS}
        self.barcode_files = {s: OrderedAppendFile(self.text_dir / split_files(s).barcodes) for s in SPLITS}
        self.indices: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.gene_cells = np.zeros(len(plan.kept_names), np.int64)
        self.eval_points: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_written = 0
        self.columns = plan.columns
        schema = arrow_schema(self.columns)
        self.arrow = {s: ArrowSplitWriter(root / TRANSFORM.dataset / s, schema, direct=self.direct) for s in SPLITS}
        self.h5ad = H5adCSRWriter(root / h5ad_name, len(plan.kept_names), qc.n_stored[qc.cell_mask],
                                  direct=self.direct)

    def write_chunk(self, ticket: int, bounds: tuple[int, int]) -> SentenceChunk:
        """Pass 2 of chunk ``ticket`` (rows ``bounds``), from a worker thread: rank it, write its
        preprocessed rows into the h5ad, take its place in the text files and write its text
        there, and append its barcodes and Arrow rows. Chunk ``ticket`` waits only until
        chunk ``ticket - 1`` has taken its place in each file. Returns the chunk without its
        (written) rows and text."""
        try:
            sentences = self._write_chunk(ticket, bounds)
        except BaseException:
            # Later chunks wait for this one's turn to append: release them, or the pool hangs.
            self.abort(ticket)
            raise
        sentences.indices = sentences.data = sentences.text = sentences.arrow_text = sentences.arrow_offsets = None
        return sentences

    def _write_chunk(self, ticket: int, bounds: tuple[int, int]) -> SentenceChunk:
        start, stop = bounds
        plan, settings = self.plan, self.plan.settings
        chunk = plan.source.read_rows(start, stop)  # values were checked in the QC pass
        first_row = int(self.first_kept_row[start])
        ranked = rank_chunk(
            chunk.indptr, chunk.indices, chunk.data, row_split=plan.split_of_cell[start:stop],
            row_eval=plan.eval_mask[start:stop], cell_ids=np.arange(start, stop), gene_position=plan.gene_position,
            names=plan.names, normalization=settings.normalization, seed=settings.seed, max_genes=settings.max_genes,
        )  # fmt: skip
        # Each array is dropped as soon as it is written: the arrays of the chunks in flight set
        # the heap's high-water mark, which glibc keeps (``keep_freed_memory_for_reuse``), so
        # holding them to the chunk's end would raise the peak memory (``bench/README.md``).
        del chunk
        sentences = write_text(ranked, plan.names)
        sizes = ranked.text_sizes
        del ranked
        places = [self.sentence_files[split].place(ticket, int(n)) for split, n in zip(SPLITS, sizes, strict=True)]
        # Written in the worker: the writes run side by side, and only small results go back.
        self.h5ad.write_rows(first_row, sentences.indices, sentences.data)
        sentences.indices = sentences.data = None
        for i, split in enumerate(SPLITS):
            self.sentence_files[split].write_at(sentences.text[i], places[i])
        sentences.text = None
        kept_rows = sentences.kept + start
        split_of_row = self.split_of_cell[kept_rows]
        for i, split in enumerate(SPLITS):
            rows = kept_rows[split_of_row == i]
            barcodes = self.columns["cell_name"][rows]
            self.barcode_files[split].append(ticket, "".join(f"{b}\n" for b in barcodes).encode())
            batch = None
            if len(rows):
                text = pa.StringArray.from_buffers(
                    len(rows), pa.py_buffer(sentences.arrow_offsets[i]), pa.py_buffer(sentences.arrow_text[i]))
                arrays = [pa.array(barcodes, pa.string()), text]
                arrays += [pa.array(v[rows]) for n, v in self.columns.items() if n != "cell_name"]
                batch = pa.RecordBatch.from_arrays(arrays, schema=self.arrow[split].schema)
            self.arrow[split].append(ticket, batch)
        return sentences

    def abort(self, failed_ticket: int = -1) -> None:
        for appender in [*self.sentence_files.values(), *self.barcode_files.values(), *self.arrow.values()]:
            appender.abort(failed_ticket)

    def add(self, chunk: SentenceChunk, start: int) -> None:
        """Record a written chunk's cells, gene counts and evaluation points (in input order)."""
        kept_rows = chunk.kept + start
        split_of_row = self.split_of_cell[kept_rows]
        preprocessed_rows = self.n_written + np.arange(len(kept_rows))
        for i, split in enumerate(SPLITS):
            self.indices[split].append(preprocessed_rows[split_of_row == i])
        self.gene_cells += chunk.gene_cells
        self.eval_points.append((chunk.eval_log_rank, chunk.eval_log_expression))
        self.n_written += len(kept_rows)

    def close(self) -> None:
        """Stop the direct writer and release every file (after a failure; idempotent)."""
        self.direct.close()
        for file in [*self.sentence_files.values(), *self.barcode_files.values(), *self.arrow.values(), self.h5ad]:
            file.close()

    def finish(self, *, fit_threshold: float, seed: int) -> dict[str, float]:
        self.direct.flush()
        self.direct.close()
        for appender in [*self.sentence_files.values(), *self.barcode_files.values()]:
            appender.close()
        for split in SPLITS:
            np.save(self.text_dir / split_files(split).indices, np.concatenate(self.indices[split]).astype(np.int64))
            self.arrow[split].finish()
        write_dataset_dict_index(self.root / TRANSFORM.dataset, list(SPLITS))
        write_vocab(self.root / VOCAB, self.kept_names, self.gene_cells)

        obs = preprocessed_obs(self.plan, self.columns["cell_name"])
        split_names = np.array(SPLITS, dtype=object)
        obs["split"] = pd.Categorical(split_names[split_array(self.indices, len(obs))], categories=SPLITS)
        var = pd.DataFrame({"n_cells": self.gene_cells}, index=pd.Index(self.kept_names.astype(str)))
        self.h5ad.finish(obs=obs, var=var, uns={"log1p": {"base": 10.0}})

        log_rank = np.concatenate([p[0] for p in self.eval_points])
        log_expression = np.concatenate([p[1] for p in self.eval_points])
        fit = fit_points(log_rank, log_expression, threshold=fit_threshold, path=self.plan.source.path)
        write_evaluation(self.root, fit, log_rank, log_expression, seed=seed)
        write_qc_by_label(self.root, self.plan.qc_table)
        return fit.as_row()


def write_chunk_task(context: PassContext, ticket: int, bounds: tuple[int, int]) -> tuple[int, SentenceChunk]:
    """Pass 2's worker task of the script (for ``ordered_map``): chunk ``ticket`` into the files."""
    return bounds[0], context.outputs.write_chunk(ticket, bounds)
