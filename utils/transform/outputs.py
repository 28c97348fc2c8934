"""The transform's data contract as files, filled chunk by chunk: ``TransformOutputs``, the file
sink of ``sentence_pass`` (``transform.py``) and the writer of ``CellSentences.save``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from utils.contract import TRANSFORM, TRANSFORM_EVAL, VOCAB, split_files
from utils.transform.filewriter import DirectWriter, OrderedAppendFile
from utils.transform.fit import METRIC_COLUMNS, RankExpressionFit
from utils.transform.formats import ArrowSplitWriter, H5adCSRWriter, write_dataset_dict_index
from utils.transform.pipeline import SPLITS, RunPlan, rank_rows
from utils.transform.sentence_chunk import SentenceChunk, write_text

logger = logging.getLogger("cell2sentence")


def arrow_schema(columns: dict[str, np.ndarray]) -> pa.Schema:
    return pa.schema([pa.field("cell_name", pa.string()), pa.field("cell_sentence", pa.string())]
                     + [pa.field(n, pa.string() if v.dtype == object else pa.from_numpy_dtype(v.dtype))
                        for n, v in columns.items() if n != "cell_name"])


def preprocessed_obs(plan: RunPlan) -> pd.DataFrame:
    """``obs`` of the preprocessed AnnData: the kept cells, their dataset columns and QC statistics."""
    kept, names = plan.qc.cell_mask, plan.columns["cell_name"]
    obs = pd.DataFrame(index=pd.Index(names[kept], name=None))
    for name, values in plan.columns.items():
        if name != "cell_name":  # strings as categories, a missing one as NaN (as scanpy has them)
            obs[name] = pd.Categorical(values[kept]) if values.dtype == object else values[kept]
    given = plan.source.obs.index.astype(str).to_numpy(dtype=object)
    if not np.array_equal(names, given):  # repeated names were made unique
        obs["original_cell_name"] = given[kept]
    obs["n_genes"] = plan.qc.n_genes[kept]
    obs["total_counts"] = plan.qc.total[kept]
    obs["pct_counts_mt"] = plan.qc.pct_mt[kept]
    return obs


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


class TransformOutputs:
    """The data contract's files under ``root``, written chunk by chunk (``write``, any thread) and
    completed by ``finish``. ``columns``: the dataset's columns (``write``'s rows index them);
    ``row_lengths``: the stored entries of each preprocessed row; ``plan``: for ``task``."""

    def __init__(self, root: Path, columns: dict[str, np.ndarray], genes: np.ndarray, row_lengths: np.ndarray, *,
                 h5ad_name: str, plan: RunPlan | None = None):
        self.root, self.columns, self.genes, self.plan = root, columns, genes, plan
        self.text_dir = root / TRANSFORM.sentences
        self.text_dir.mkdir()
        self.direct = DirectWriter()  # large writes bypass the page cache (see DirectWriter)
        self.sentence_files = {s: OrderedAppendFile(self.text_dir / split_files(s).text, direct=self.direct) for s in SPLITS}
        self.barcode_files = {s: OrderedAppendFile(self.text_dir / split_files(s).barcodes) for s in SPLITS}
        schema = arrow_schema(columns)
        self.arrow = {s: ArrowSplitWriter(root / TRANSFORM.dataset / s, schema, direct=self.direct) for s in SPLITS}
        self.h5ad = H5adCSRWriter(root / h5ad_name, len(genes), row_lengths, direct=self.direct)

    def __enter__(self) -> TransformOutputs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def task(self, ticket: int, bounds: tuple[int, int]) -> SentenceChunk:
        """Pass 2 of chunk ``ticket`` in a worker: rank and ``write`` it."""
        start, stop = bounds
        plan = self.plan
        try:
            # Each array is dropped as soon as it is written: the arrays of the chunks in flight
            # set the heap's high-water mark, which glibc keeps (``keep_freed_memory_for_reuse``).
            sentences = write_text(rank_rows(plan, plan.source.read_rows(start, stop), start,
                                             plan.split_of_cell[start:stop]), plan.names)
            kept_rows = sentences.kept + start
            split = plan.split_of_cell[kept_rows]
            self.write(ticket, plan.first_kept(start), sentences, [kept_rows[split == i] for i in range(len(SPLITS))],
                       [sentences.strings(i) for i in range(len(SPLITS))])
        except BaseException:
            self.abort(ticket)  # later chunks wait for this one's turn to append: release them
            raise
        return sentences

    def add(self, chunk: SentenceChunk, start: int) -> None:
        """Nothing to keep: the chunk is written."""

    def write(self, ticket: int, first_row: int, chunk: SentenceChunk, rows: list[np.ndarray],
              strings: list[pa.Array]) -> None:
        """Chunk ``ticket``'s preprocessed rows (from ``first_row`` on), text and, per split, dataset
        rows (``rows`` of ``columns``, with ``strings`` their sentences); each is dropped once written."""
        places = [self.sentence_files[s].place(ticket, len(chunk.text[i])) for i, s in enumerate(SPLITS)]
        # Written in the worker: the writes run side by side, and only small results go back.
        self.h5ad.write_rows(first_row, chunk.indices, chunk.data)
        chunk.indices = chunk.data = None
        for i, split in enumerate(SPLITS):
            self.sentence_files[split].write_at(chunk.text[i], places[i])
        chunk.text = None
        for i, split in enumerate(SPLITS):
            barcodes = self.columns["cell_name"][rows[i]]
            self.barcode_files[split].append(ticket, "".join(f"{b}\n" for b in barcodes).encode())
            batch = None
            if len(rows[i]):
                arrays = [pa.array(barcodes, pa.string()), strings[i]]
                arrays += [pa.array(v[rows[i]]) for n, v in self.columns.items() if n != "cell_name"]
                batch = pa.RecordBatch.from_arrays(arrays, schema=self.arrow[split].schema)
            self.arrow[split].append(ticket, batch)
        chunk.arrow_text = chunk.arrow_offsets = None

    def abort(self, failed_ticket: int = -1) -> None:
        for appender in [*self.sentence_files.values(), *self.barcode_files.values(), *self.arrow.values()]:
            appender.abort(failed_ticket)

    def close(self) -> None:
        """Stop the direct writer and release every file (idempotent)."""
        self.direct.close()
        for file in [*self.sentence_files.values(), *self.barcode_files.values(), *self.arrow.values(), self.h5ad]:
            file.close()

    def finish(self, *, split: np.ndarray, gene_cells: np.ndarray, obs: pd.DataFrame, fit: RankExpressionFit,
               points: tuple[np.ndarray, np.ndarray], qc_table: pd.DataFrame | None, seed: int) -> None:
        """Complete the contract: ``split`` and ``obs`` (gains a ``split`` column) are per preprocessed row."""
        self.direct.flush()
        self.direct.close()
        for appender in [*self.sentence_files.values(), *self.barcode_files.values()]:
            appender.close()
        for i, name in enumerate(SPLITS):
            np.save(self.text_dir / split_files(name).indices, np.flatnonzero(split == i).astype(np.int64))
            self.arrow[name].finish()
        write_dataset_dict_index(self.root / TRANSFORM.dataset, list(SPLITS))
        with (self.root / VOCAB).open("w") as vocab:
            vocab.writelines(f"{g} {c}\n" for g, c in zip(self.genes, gene_cells, strict=True))
        obs["split"] = pd.Categorical(np.array(SPLITS, dtype=object)[split], categories=SPLITS)
        var = pd.DataFrame({"n_cells": gene_cells}, index=pd.Index(self.genes.astype(str)))
        self.h5ad.finish(obs=obs, var=var, uns={"log1p": {"base": 10.0}})
        write_evaluation(self.root, fit, *points, seed=seed)
        if qc_table is not None:  # per label: its cells, those each QC filter removed, those kept
            qc_table.to_csv(self.root / TRANSFORM_EVAL.qc_by_label, index=False)
