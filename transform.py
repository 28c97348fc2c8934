"""Turn a single-cell count matrix into cell sentences, an arrow dataset and an evaluation.

Each cell becomes the names of its expressed genes ordered from highest to lowest normalized
expression (ties broken at random, reproducibly with --seed), after the original project's
quality control and normalization. A linear model from log-rank to log-expression is fitted so
that sentences can later be turned back into expression (inverse.py).

    data/<name>.h5ad -> data/cell_sentences/{train,valid,test}.txt, *_barcodes.txt,
                        *_indices.npy, vocab.txt
                        data/cell_sentences_hf/ (datasets.DatasetDict)
                        data/eval/transformation_metrics.csv + figures
                        data/<name>_preprocessed.h5ad, data/transform_args.json

The matrix is read and processed in chunks of --chunk_size cells (out of core for CSR or
dense .h5ad), optionally by --num_proc worker threads.

Example:
    python transform.py --data_filepath data/dominguez_sample.h5ad --output_dir data/
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from utils.common import (
    InputError,
    check_can_write,
    keep_freed_memory_for_reuse,
    run_cli,
    save_args,
    staged_outputs,
)
from utils.fit import METRIC_COLUMNS, NonFiniteError, fit_rank_expression
from utils.io import (
    NO_LOG1P,
    ArrowSplitWriter,
    DirectWriter,
    H5adCSRWriter,
    OrderedAppendFile,
    open_source,
    phased_pieces,
    write_dataset_dict_index,
)
from utils.preprocess import INPUT_KINDS, QCAccumulator, QCParams, detect_input_kind, log1p_problem
from utils.ranking import GeneNameTable
from utils.sentence_chunk import SentenceChunk
from utils.transform_pipeline import (
    SPLITS,
    RunSettings,
    _sentence_task,
    _stats_task,
    assign_splits,
    chunk_bounds,
    expected_sentence_bytes,
    ordered_map,
    read_checked_chunk,
    sample_eval_cells,
)

logger = logging.getLogger("cell2sentence")

DEFAULT_LABEL_COLUMN = "cell_type"
DETECTION_CELLS = 2_000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_filepath", type=Path, default=Path("data/dominguez_sample.h5ad"),
                   help="input: .h5ad (10x .h5, 10x matrix folder, .loom, .csv also read)")
    p.add_argument("--output_dir", type=Path, default=Path("data"), help="where outputs go")
    p.add_argument("--layer", type=str, default=None,
                   help="layer holding counts (default: .raw.X, else layers['counts'], else X)")
    p.add_argument("--input_kind", choices=INPUT_KINDS, default="auto",
                   help="raw counts are normalized; log1p values are brought back with expm1")
    p.add_argument("--gene_column", type=str, default=None,
                   help="var column with gene names (default: feature_name when present, else var_names)")
    p.add_argument("--label_column", type=str, default=None,
                   help=f"obs column of cell types (default: {DEFAULT_LABEL_COLUMN!r}, omitted with a warning when absent)")
    p.add_argument("--obs_columns", type=str, nargs="*", default=[],
                   help="further obs columns to copy into the arrow dataset")
    p.add_argument("--bad_gene_names", choices=("replace", "error"), default="replace",
                   help="gene names with whitespace: replace it by '_' (with a warning) or fail")
    p.add_argument("--min_genes_per_cell", type=int, default=200, help="QC: drop cells with fewer genes")
    p.add_argument("--min_cells_per_gene", type=int, default=3, help="QC: drop genes in fewer cells")
    p.add_argument("--max_genes_per_cell", type=int, default=2500, help="QC: drop cells with this many genes or more")
    p.add_argument("--max_mt_percent", type=float, default=200.0,
                   help="QC: drop cells with this percent of MT- counts or more (200, the original's, drops none)")
    p.add_argument("--no_qc", action="store_true", help="skip quality control (empty cells are still dropped)")
    p.add_argument("--max_genes", type=int, default=None, help="keep the top K genes of each sentence (default: all)")
    p.add_argument("--split_fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1],
                   metavar=("TRAIN", "VALID", "TEST"), help="fractions of cells per split")
    p.add_argument("--fit_threshold", type=float, default=3.0,
                   help="fit the rank-expression line on genes with log10(1 + rank) below this")
    p.add_argument("--eval_cells", type=int, default=1_000,
                   help="seeded sample of cells whose genes feed the fit and the figures")
    p.add_argument("--chunk_size", type=int, default=2_048,
                   help="cells read and processed at a time (memory grows with it)")
    p.add_argument("--num_proc", type=int, default=1, help="worker threads for the chunks (up to the number of cores)")
    p.add_argument("--seed", type=int, default=1234, help="seed of tie-breaking, splits and sampling")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = p.parse_args(argv)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    fractions = args.split_fractions
    if min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise InputError(f"--split_fractions {fractions} must be non-negative and add up to 1, e.g. 0.8 0.1 0.1.")
    for flag in ("chunk_size", "num_proc", "eval_cells"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be at least 1.")
    if args.max_genes is not None and args.max_genes < 1:
        raise InputError("--max_genes must be at least 1 (or left out for full sentences).")


def output_names(data_filepath: Path) -> list[str]:
    """What the transform writes under --output_dir (the data contract)."""
    return ["cell_sentences", "cell_sentences_hf", "eval",
            f"{data_filepath.stem}_preprocessed.h5ad", "transform_args.json"]


def resolve_gene_names(var: pd.DataFrame, gene_column: str | None, *, bad: str, path: Path) -> np.ndarray:
    """Gene names from var (feature_name when present), unique and free of whitespace."""
    if gene_column is not None and gene_column not in var.columns:
        raise InputError(f"{path}: var has no column {gene_column!r} (it has {list(var.columns)[:8]}); fix --gene_column.")
    column = gene_column or ("feature_name" if "feature_name" in var.columns else None)
    names = pd.Index((var[column] if column else var.index).astype(str))
    logger.info("Gene names from %s.", f"var[{column!r}]" if column else "var_names")
    if (names == "").any() or names.isin(["nan", "None"]).any():
        raise InputError(f"{path}: some gene names are empty or missing; choose another --gene_column.")
    has_space = names.str.contains(r"\s", regex=True)
    if has_space.any():
        example = names[has_space][0]
        if bad == "error":
            raise InputError(f"{path}: {has_space.sum():,} gene names contain whitespace (e.g. {example!r}); "
                             "rename them or pass --bad_gene_names replace.")
        logger.warning("Replaced whitespace by '_' in %s gene names (e.g. %r).", f"{has_space.sum():,}", example)
        names = pd.Index([re.sub(r"\s+", "_", n) for n in names])
    if not names.is_unique:
        logger.warning("Made %s duplicated gene names unique by appending -1, -2, ...", f"{names.duplicated().sum():,}")
        names = ad.utils.make_index_unique(names)
    return names.to_numpy(dtype=object)


def resolve_obs_columns(obs: pd.DataFrame, label_column: str | None, extra: list[str], *, path: Path) -> dict[str, str]:
    """Dataset column name -> obs column: cell_type from the label column, plus extras."""
    columns: dict[str, str] = {}
    if label_column is not None:
        if label_column not in obs.columns:
            raise InputError(f"{path}: obs has no column {label_column!r} (it has {list(obs.columns)[:8]}); fix --label_column.")
        columns["cell_type"] = label_column
    elif DEFAULT_LABEL_COLUMN in obs.columns:
        columns["cell_type"] = DEFAULT_LABEL_COLUMN
    else:
        logger.warning("obs has no %r column: the dataset has no cell_type (pass --label_column).", DEFAULT_LABEL_COLUMN)
    for name in extra:
        if name not in obs.columns:
            raise InputError(f"{path}: obs has no column {name!r} asked for by --obs_columns.")
        columns.setdefault(name, name)
    return columns


def resolve_input_kind(source, requested: str) -> tuple[str, float | None]:
    """The input kind (auto-detected on the first cells) and the log1p base.

    ``uns["log1p"]`` describes X only: a layer or ``.raw`` is judged by its own values. Values
    that cannot be log1p of normalized data are never brought back with expm1."""
    has_uns = source.log1p_base != NO_LOG1P
    base = source.log1p_base if has_uns else None
    sample = read_checked_chunk(source, 0, min(DETECTION_CELLS, source.n_cells))
    if requested != "auto":
        kind, reason = requested, "as asked by --input_kind"
        problem = log1p_problem(sample.data, base) if kind == "log1p" else None
        if problem:
            raise InputError(f"{source.path}: --input_kind log1p, but {source.matrix_name} cannot hold log1p "
                             f"values ({problem}); pass --input_kind counts (or auto).")
    else:
        kind, base, reason = detect_input_kind(sample, has_log1p_uns=has_uns, log1p_base=base)
    if kind == "counts" and sample.nnz and not np.all(sample.data == np.round(sample.data)):
        logger.warning("--input_kind counts, but %s holds non-integer values.", source.matrix_name)
    shown = {"counts": "raw counts (will be normalized to 10,000 per cell)",
             "normalized": "already-normalized values (not normalized again)",
             "log1p": f"log1p values (base {base or 'e'}; brought back with expm1)"}[kind]
    logger.warning("Input %s read as %s: %s.", source.matrix_name, shown, reason)
    return kind, base


def main(args: argparse.Namespace) -> dict[str, float]:
    started = time.perf_counter()
    keep_freed_memory_for_reuse()
    names = output_names(args.data_filepath)
    check_can_write(args.output_dir, names, overwrite=args.overwrite)
    source = open_source(args.data_filepath, layer=args.layer)
    if source.n_cells == 0 or source.n_genes == 0:
        raise InputError(f"{args.data_filepath}: {source.matrix_name} is empty ({source.shape}).")
    logger.info("Read %s: %s cells x %s genes from %s.", args.data_filepath,
                f"{source.n_cells:,}", f"{source.n_genes:,}", source.matrix_name)
    gene_names = resolve_gene_names(source.var, args.gene_column, bad=args.bad_gene_names, path=args.data_filepath)
    obs_columns = resolve_obs_columns(source.obs, args.label_column, args.obs_columns, path=args.data_filepath)
    input_kind, log1p_base = resolve_input_kind(source, args.input_kind)
    qc = QCParams(args.min_genes_per_cell, args.min_cells_per_gene, args.max_genes_per_cell,
                  args.max_mt_percent, enabled=not args.no_qc)
    settings = RunSettings(input_kind, log1p_base, qc, args.seed, args.max_genes)
    is_mt = np.char.startswith(np.char.upper(gene_names.astype(str)), "MT-")
    chunks = chunk_bounds(source.n_cells, args.chunk_size)

    # Pass 1: QC statistics.
    accumulator = QCAccumulator(source.n_cells, source.n_genes, qc)
    state = {"source": source, "settings": settings, "is_mt": is_mt}
    pass_started = time.perf_counter()
    with tqdm(total=source.n_cells, desc="QC pass", unit="cells") as bar:
        for stats in ordered_map(_stats_task, chunks, num_proc=args.num_proc, state=state):
            accumulator.add(stats)
            bar.update(len(stats.n_genes))
    result = accumulator.finalize(is_mt)
    _log_pass("QC pass", source.n_cells, pass_started)
    _log_qc(result, source.n_cells, args)
    n_kept = int(result.cell_mask.sum())
    gene_position = np.where(result.gene_mask, np.cumsum(result.gene_mask) - 1, -1).astype(np.int32)

    # Splits and the evaluation sample are drawn over the kept cells, by input index.
    split_of_cell = np.full(source.n_cells, -1, np.int8)
    split_of_cell[result.cell_mask] = assign_splits(n_kept, args.split_fractions, seed=args.seed)
    eval_mask = sample_eval_cells(result.cell_mask, args.eval_cells, seed=args.seed)
    kept_names = gene_names[result.gene_mask]
    state.update(gene_position=gene_position, split_of_cell=split_of_cell, eval_mask=eval_mask,
                 names=GeneNameTable(list(kept_names)))

    # matplotlib takes 0.3 s to import: let it load while pass 2 waits on the disk (the
    # figures' own import below then finds it done, or waits for it).
    threading.Thread(target=importlib.import_module, args=("utils.plots",), daemon=True).start()

    # Pass 2: sentences, preprocessed matrix and evaluation points, written as they come.
    with staged_outputs(args.output_dir, names, overwrite=args.overwrite) as tmp:
        expected_bytes = expected_sentence_bytes(
            result.n_genes[result.cell_mask], split_of_cell[result.cell_mask], state["names"].lengths,
            result.gene_cells[result.gene_mask], max_genes=args.max_genes)
        outputs = _Outputs(tmp, args, source, obs_columns, kept_names, split_of_cell,
                           row_lengths=result.n_genes[result.cell_mask], expected_bytes=expected_bytes)
        # Workers write their preprocessed rows into the h5ad themselves, at known places.
        state.update(h5ad=outputs.h5ad, first_kept_row=np.cumsum(result.cell_mask) - result.cell_mask,
                     write_chunk=outputs.write_chunk, place_text=outputs.place_text, abort=outputs.abort,
                     chunk_size=args.chunk_size)
        pass_started = time.perf_counter()
        results = ordered_map(_sentence_task, chunks, num_proc=args.num_proc, state=state)
        try:
            with tqdm(total=source.n_cells, desc="Cell sentences", unit="cells") as bar:
                for (start, stop), (chunk_start, sentences) in zip(chunks, results, strict=True):
                    outputs.add(sentences, chunk_start)
                    bar.update(stop - start)
            _log_pass("Sentence pass", source.n_cells, pass_started)
            metrics = outputs.finish(result, args)
        except BaseException:
            outputs.abort()  # release workers waiting for their turn to write
            results.close()  # wait for the running workers: they write to these files
            outputs.close()
            raise
        save_args(args, tmp / "transform_args.json")
    logger.info("Wrote %s cell sentences to %s in %.1f s.", f"{n_kept:,}", args.output_dir,
                time.perf_counter() - started)
    return metrics


def _log_pass(name: str, n_cells: int, started: float) -> None:
    seconds = time.perf_counter() - started
    logger.info("%s: %s cells in %.2f s (%s cells/s).", name, f"{n_cells:,}", seconds,
                f"{n_cells / max(seconds, 1e-9):,.0f}")


def _log_qc(result, n_cells: int, args: argparse.Namespace) -> None:
    for flag, removed in result.cells_removed.items():
        if removed:
            logger.info("QC: %s cells removed by %s.", f"{removed:,}", flag)
    logger.info("QC: %s genes removed by min_cells_per_gene (%s); %s of %s cells kept.",
                f"{result.genes_removed:,}", args.min_cells_per_gene,
                f"{int(result.cell_mask.sum()):,}", f"{n_cells:,}")
    if not result.cell_mask.any():
        worst = max(result.cells_removed, key=result.cells_removed.get)
        raise InputError(
            f"No cells left after QC: --{worst} removed {result.cells_removed[worst]:,} of "
            f"{n_cells:,} cells; relax it or pass --no_qc.")


class _Outputs:
    """The transform's output files, filled chunk by chunk (in input order)."""

    def __init__(self, root: Path, args, source, obs_columns: dict[str, str], kept_names: np.ndarray,
                 split_of_cell: np.ndarray, row_lengths: np.ndarray, expected_bytes: np.ndarray):
        self.root = root
        self.split_of_cell = split_of_cell
        self.text_dir = root / "cell_sentences"
        self.text_dir.mkdir()
        self.obs = source.obs
        self.obs_columns = obs_columns
        self.kept_names = kept_names
        self.direct = DirectWriter()  # large writes bypass the page cache (see DirectWriter)
        self.sentence_files = {s: OrderedAppendFile(self.text_dir / f"{s}.txt", direct=self.direct) for s in SPLITS}
        self.barcode_files = {s: OrderedAppendFile(self.text_dir / f"{s}_barcodes.txt") for s in SPLITS}
        self.indices: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.gene_cells = np.zeros(len(kept_names), np.int64)
        self.eval_points: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_written = 0
        self.columns = {"cell_name": self.obs.index.astype(str).to_numpy(dtype=object)}
        for name, column in obs_columns.items():
            values = self.obs[column]
            self.columns[name] = values.astype(str).to_numpy(dtype=object) if name == "cell_type" or not pd.api.types.is_numeric_dtype(values) else values.to_numpy()
        schema = pa.schema([pa.field("cell_name", pa.string()), pa.field("cell_sentence", pa.string())]
                           + [pa.field(n, pa.string() if v.dtype == object else pa.from_numpy_dtype(v.dtype))
                              for n, v in self.columns.items() if n != "cell_name"])
        # Disk blocks reserved up front make the direct writes faster (see OutputFile.reserve).
        for split, expected in zip(SPLITS, expected_bytes, strict=True):
            self.sentence_files[split].reserve(int(expected))
        self.arrow = {s: ArrowSplitWriter(root / "cell_sentences_hf" / s, schema, direct=self.direct,
                                          expected_bytes=int(e))
                      for s, e in zip(SPLITS, expected_bytes, strict=True)}
        self.h5ad_path = root / f"{args.data_filepath.stem}_preprocessed.h5ad"
        self.h5ad = H5adCSRWriter(self.h5ad_path, len(kept_names), row_lengths, direct=self.direct)

    def place_text(self, ticket: int, sizes: np.ndarray, places: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Take chunk ``ticket``'s place in the three text files (``places`` gets the offsets)
        and lay the text out in memory as it lies in the files (see ``phased_empty``), so that
        the direct writer writes it without a copy. Called by the kernel once cells are ranked."""
        places[:] = [self.sentence_files[split].place(ticket, int(n)) for split, n in zip(SPLITS, sizes, strict=True)]
        return phased_pieces(places, sizes, slack=16)  # 16: the kernel's copies may write past a line

    def write_chunk(self, ticket: int, start: int, chunk: SentenceChunk, text_places: list[int]) -> None:
        """Write a chunk's sentences at the places ``place_text`` took, and append its barcodes
        and Arrow rows (from a worker thread; chunk ``ticket`` waits only until chunk
        ``ticket - 1`` has taken its place in each file). A worker that fails calls
        ``abort(ticket)`` (see ``_sentence_task``)."""
        kept_rows = chunk.kept + start
        split_of_row = self.split_of_cell[kept_rows]
        for i, split in enumerate(SPLITS):
            rows = kept_rows[split_of_row == i]
            self.sentence_files[split].write_at(chunk.text[i], text_places[i])
            barcodes = self.columns["cell_name"][rows]
            self.barcode_files[split].append(ticket, "".join(f"{b}\n" for b in barcodes).encode())
            batch = None
            if len(rows):
                sentences = pa.StringArray.from_buffers(
                    len(rows), pa.py_buffer(chunk.arrow_offsets[i]), pa.py_buffer(chunk.arrow_text[i]))
                arrays = [pa.array(barcodes, pa.string()), sentences]
                arrays += [pa.array(v[rows]) for n, v in self.columns.items() if n != "cell_name"]
                batch = pa.RecordBatch.from_arrays(arrays, schema=self.arrow[split].schema)
            self.arrow[split].append(ticket, batch)

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

    def finish(self, qc, args) -> dict[str, float]:
        self.direct.flush()
        self.direct.close()
        for appender in [*self.sentence_files.values(), *self.barcode_files.values()]:
            appender.close()
        for split in SPLITS:
            np.save(self.text_dir / f"{split}_indices.npy", np.concatenate(self.indices[split]).astype(np.int64))
            self.arrow[split].finish()
        write_dataset_dict_index(self.root / "cell_sentences_hf", list(SPLITS))
        with (self.text_dir / "vocab.txt").open("w") as vocab:
            vocab.writelines(f"{g} {c}\n" for g, c in zip(self.kept_names, self.gene_cells, strict=True))

        kept = qc.cell_mask
        obs = pd.DataFrame(index=pd.Index(self.columns["cell_name"][kept], name=None))
        for name, column in self.obs_columns.items():
            obs[name] = self.obs[column].to_numpy()[kept]
        obs["n_genes"] = qc.n_genes[kept]
        obs["total_counts"] = qc.total[kept]
        obs["pct_counts_mt"] = qc.pct_mt[kept]
        split_names = np.array(SPLITS, dtype=object)
        obs["split"] = pd.Categorical(split_names[_split_array(self.indices, len(obs))], categories=SPLITS)
        var = pd.DataFrame({"n_cells": self.gene_cells}, index=pd.Index(self.kept_names.astype(str)))
        self.h5ad.finish(obs=obs, var=var, uns={"log1p": {"base": 10.0}})

        log_rank = np.concatenate([p[0] for p in self.eval_points])
        log_expression = np.concatenate([p[1] for p in self.eval_points])
        try:
            fit = fit_rank_expression(log_rank, log_expression, threshold=args.fit_threshold)
        except NonFiniteError as err:
            raise InputError(f"{args.data_filepath}: {err} Check --input_kind against what the matrix holds.") from err
        except ValueError as err:
            raise InputError(f"{args.data_filepath}: {err} Lower --min_genes_per_cell or give more cells.") from err
        eval_dir = self.root / "eval"
        eval_dir.mkdir()
        pd.DataFrame([fit.as_row()], columns=list(METRIC_COLUMNS)).to_csv(eval_dir / "transformation_metrics.csv", index=False)
        from utils.plots import plot_log_rank_fit, plot_reconstruction

        plot_log_rank_fit(log_rank, log_expression, fit, eval_dir / "log_rank_vs_log_expression.png", seed=args.seed)
        plot_reconstruction(log_expression, fit.predict(log_rank), fit, eval_dir / "expression_vs_reconstruction.png", seed=args.seed)
        logger.info("Fit: log10(1+expr) = %.4f %+.4f * log10(1+rank); R^2 %.3f, Pearson r %.3f, Spearman r %.3f (%s points).",
                    fit.intercept, fit.slope, fit.r_squared, fit.pearson_r, fit.spearman_r, f"{fit.n_points:,}")
        return fit.as_row()


def _split_array(indices: dict[str, list[np.ndarray]], n: int) -> np.ndarray:
    split = np.zeros(n, np.int64)
    for i, s in enumerate(SPLITS):
        split[np.concatenate(indices[s]).astype(np.int64)] = i
    return split


if __name__ == "__main__":
    run_cli(main, parse_args, skip_teardown=True)
