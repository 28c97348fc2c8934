"""Quality control (and its log), input-kind detection and normalization, in passes over chunks.

QC gives scanpy's ``filter_cells``/``filter_genes`` and the ``n_genes_by_counts``/``pct_counts_mt`` cuts
in one streaming pass: a failing gene occurs in fewer than ``min_cells`` cells, so its occurrences are
kept until it passes, and the failing genes' contributions are subtracted at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from numba import njit

from utils.cli import InputError

logger = logging.getLogger("cell2sentence")

INPUT_KINDS = ("auto", "counts", "normalized", "log1p")
# The cell filters in the order they apply; the last removes cells left with no gene by the gene
# filter (or ``--exclude_genes``). Without QC, min_genes_per_cell removes the empty cells only.
QC_FILTERS = ("min_genes_per_cell", "max_genes_per_cell", "max_mt_percent", "no_expressed_genes")
ALL_CELLS = "(all cells)"  # the one row of ``qc_by_label`` for cells without a label column
TARGET_SUM = 1e4
NORMALIZATION_MODES = {"counts": 0, "normalized": 1, "log1p": 2}  # the kernels' mode codes


@dataclass(frozen=True)
class QCParams:
    """Thresholds of the quality control; ``enabled=False`` keeps every non-empty cell."""

    min_genes_per_cell: int = 200
    min_cells_per_gene: int = 3
    max_genes_per_cell: int = 2500
    max_mt_percent: float = 200.0
    enabled: bool = True


@dataclass
class ChunkStats:
    """Per-cell and per-gene statistics of one chunk of rows (see ``chunk_stats``)."""

    n_genes: np.ndarray  # per cell: non-zero genes
    total: np.ndarray  # per cell: sum of values
    mt_total: np.ndarray  # per cell: sum over MT- genes
    gene_cells: np.ndarray  # per gene: cells (passing min_genes) expressing it
    rare_cells: np.ndarray  # occurrences (in cells passing min_genes) of genes in fewer than min_cells
    rare_genes: np.ndarray  # cells of this chunk: all a failing gene ever contributes
    rare_values: np.ndarray
    n_excluded: np.ndarray | None = None  # per cell: genes matching the exclusion (see ``chunk_stats``)
    first_nonfinite: int = -1  # chunk row of the first NaN or infinite value (-1: none)
    first_negative: int = -1  # chunk row of the first negative value (-1: none)


@njit(cache=True, nogil=True)
def _chunk_stats(indptr, indices, data, gene_flags, n_genes_total, min_genes, min_cells):
    n_rows = indptr.shape[0] - 1
    n_genes = np.empty(n_rows, np.int64)
    total = np.zeros(n_rows, np.float64)
    mt_total = np.zeros(n_rows, np.float64)
    n_excluded = np.zeros(n_rows, np.int64)
    gene_cells = np.zeros(n_genes_total, np.int64)
    first_nonfinite = first_negative = -1
    for r in range(n_rows):
        n_genes[r] = indptr[r + 1] - indptr[r]
        counted = n_genes[r] >= min_genes
        row_total = 0.0
        row_mt = 0.0
        negative = 0
        excluded = 0
        for j in range(indptr[r], indptr[r + 1]):
            flags = gene_flags[indices[j]]  # one look-up for both flags: bit 0 MT-, bit 1 excluded
            row_total += data[j]
            row_mt += data[j] * (flags & 1)
            excluded += flags >> 1
            gene_cells[indices[j]] += counted
            negative += data[j] < 0
        total[r] = row_total
        mt_total[r] = row_mt
        n_excluded[r] = excluded
        # The value checks ride along: a NaN or infinity makes the row's total one (a float64
        # sum of float32 values cannot overflow), and negatives are counted.
        if row_total - row_total != 0 and first_nonfinite < 0:
            first_nonfinite = r
        if negative and first_negative < 0:
            first_negative = r
    # Genes seen in fewer than min_cells cells of the chunk: keep all their occurrences. Each
    # such gene occurs fewer than min_cells times, which bounds the arrays.
    rare = (gene_cells > 0) & (gene_cells < min_cells)
    capacity = min(rare.sum() * max(min_cells - 1, 0), indptr[n_rows] - indptr[0])
    rare_cells = np.empty(capacity, np.int64)
    rare_genes = np.empty(capacity, np.int64)
    rare_values = np.empty(capacity, np.float64)
    k = 0
    if capacity:
        for r in range(n_rows):
            if n_genes[r] >= min_genes:
                for j in range(indptr[r], indptr[r + 1]):
                    if rare[indices[j]]:
                        rare_cells[k] = r
                        rare_genes[k] = indices[j]
                        rare_values[k] = data[j]
                        k += 1
    return (n_genes, total, mt_total, n_excluded, gene_cells, rare_cells[:k], rare_genes[:k], rare_values[:k],
            first_nonfinite, first_negative)


def gene_flags(is_mt: np.ndarray, excluded: np.ndarray | None = None) -> np.ndarray:
    """Per gene, what the statistics kernel counts: bit 0 an MT- gene, bit 1 an excluded gene."""
    flags = np.asarray(is_mt, dtype=np.uint8).copy()
    if excluded is not None:
        flags |= np.asarray(excluded, dtype=np.uint8) << 1
    return flags


def chunk_stats(
    chunk: sp.csr_matrix, *, row_offset: int, is_mt: np.ndarray, params: QCParams,
    excluded: np.ndarray | None = None, flags: np.ndarray | None = None,
) -> ChunkStats:
    """Statistics of one CSR chunk (no explicit zeros) for the streaming QC, and its first NaN,
    infinite or negative values; ``flags``: ``gene_flags(is_mt, excluded)``, made once."""
    if flags is None:
        flags = gene_flags(is_mt, excluded)
    (n_genes, total, mt_total, n_excluded, gene_cells, rare_cells, rare_genes, rare_values, nonfinite,
     negative) = _chunk_stats(chunk.indptr.astype(np.int64), chunk.indices, chunk.data, flags, chunk.shape[1],
                              params.min_genes_per_cell if params.enabled else 1, params.min_cells_per_gene)
    return ChunkStats(n_genes, total, mt_total, gene_cells, rare_cells + row_offset, rare_genes, rare_values,
                      n_excluded, nonfinite, negative)


class QCAccumulator:
    """Merges ``ChunkStats`` in row order and decides which cells and genes are kept."""

    def __init__(self, n_cells: int, n_genes_total: int, params: QCParams) -> None:
        self.n_cells, self.n_genes_total, self.params = n_cells, n_genes_total, params
        self.n_genes = np.zeros(n_cells, np.int64)
        self.total = np.zeros(n_cells, np.float64)
        self.mt_total = np.zeros(n_cells, np.float64)
        self.gene_cells = np.zeros(n_genes_total, np.int64)
        self.n_excluded = np.zeros(n_cells, np.int64)
        self._rare: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._filled = 0

    def add(self, stats: ChunkStats) -> None:
        start, stop = self._filled, self._filled + len(stats.n_genes)
        self.n_genes[start:stop] = stats.n_genes
        self.total[start:stop] = stats.total
        self.mt_total[start:stop] = stats.mt_total
        if stats.n_excluded is not None:
            self.n_excluded[start:stop] = stats.n_excluded
        self._filled = stop
        self.gene_cells += stats.gene_cells
        self._rare.append((stats.rare_cells, stats.rare_genes, stats.rare_values))
        # Keep memory bounded: drop occurrences of genes now known to pass.
        cells, genes, values = (np.concatenate(parts) for parts in zip(*self._rare, strict=True))
        still_rare = self.gene_cells[genes] < self.params.min_cells_per_gene
        self._rare = [(cells[still_rare], genes[still_rare], values[still_rare])]

    def finalize(self, is_mt: np.ndarray, excluded: np.ndarray | None = None) -> QCResult:
        """Apply the filters in scanpy's order; ``excluded`` genes take part in the QC, then are left out."""
        p = self.params
        passes_min_genes = self.n_genes >= (p.min_genes_per_cell if p.enabled else 1)
        gene_mask = self.gene_cells >= p.min_cells_per_gene if p.enabled else np.ones(self.n_genes_total, bool)
        # Subtract what the failing genes contributed to each cell.
        cells, genes, values = self._rare[0] if self._rare else (np.empty(0, np.int64),) * 3
        failing = ~gene_mask[genes]
        cells, genes, values = cells[failing], genes[failing], values[failing]
        n_genes = self.n_genes - np.bincount(cells, minlength=self.n_cells)
        total = self.total - np.bincount(cells, weights=values, minlength=self.n_cells)
        mt_total = self.mt_total - np.bincount(cells, weights=values * is_mt[genes], minlength=self.n_cells)
        excluded = np.zeros(self.n_genes_total, bool) if excluded is None else np.asarray(excluded, bool)
        # Entries each cell keeps: its genes passing the filter, less the excluded ones among them.
        n_stored = n_genes - (self.n_excluded - np.bincount(cells[excluded[genes]], minlength=self.n_cells))
        with np.errstate(divide="ignore", invalid="ignore"):
            pct_mt = np.where(total > 0, 100.0 * mt_total / total, 0.0)

        # Each filter in QC_FILTERS' order removes cells the earlier ones kept; the last removes the cells
        # whose every gene was filtered out (or excluded): they have no sentence.
        removed_by = np.where(passes_min_genes, -1, 0).astype(np.int8)
        cuts = [n_genes >= p.max_genes_per_cell, pct_mt >= p.max_mt_percent] if p.enabled else [False, False]
        for i, cut in enumerate([*cuts, n_stored == 0], start=1):
            removed_by[(removed_by < 0) & cut] = i
        keep = removed_by < 0
        removed = {name: int((removed_by == i).sum()) for i, name in enumerate(QC_FILTERS)}
        genes_excluded = int((gene_mask & excluded).sum())
        gene_mask &= ~excluded
        return QCResult(cell_mask=keep, gene_mask=gene_mask, n_genes=n_genes, n_stored=n_stored, total=total,
                        pct_mt=pct_mt, cells_removed=removed, removed_by=removed_by,
                        genes_removed=int((~gene_mask).sum()) - genes_excluded, gene_cells=self.gene_cells,
                        genes_excluded=genes_excluded)


@dataclass
class QCResult:
    """Outcome of the QC: which cells and genes stay, and the per-cell statistics."""

    cell_mask: np.ndarray
    gene_mask: np.ndarray  # genes kept: passing the filter and not excluded
    n_genes: np.ndarray  # after the gene filter, like scanpy's n_genes_by_counts
    n_stored: np.ndarray  # the entries of each cell's sentence: n_genes less its excluded genes
    total: np.ndarray  # after the gene filter: the normalization denominator
    pct_mt: np.ndarray
    cells_removed: dict[str, int]
    removed_by: np.ndarray  # per cell: the position in QC_FILTERS of the filter that removed it, -1 kept
    genes_removed: int  # by the gene filter
    gene_cells: np.ndarray
    genes_excluded: int = 0  # passing the filter, but excluded


def qc_by_label(result: QCResult, labels: np.ndarray | None) -> pd.DataFrame:
    """``eval/qc_by_label.csv``: per label (sorted, missing last), its cells, those each filter removed
    (``removed_by_<filter>``) and those kept; one ``ALL_CELLS`` row without labels."""
    if labels is None:
        codes, names = np.zeros(len(result.cell_mask), np.int64), [ALL_CELLS]
    else:
        codes, uniques = pd.factorize(pd.Series(labels, dtype=object), sort=True)  # a missing label: -1
        names = list(uniques)
        if (codes < 0).any():
            codes = np.where(codes < 0, len(names), codes)
            names.append(None)
    n = len(names)
    table = {"label": names, "n_cells": np.bincount(codes, minlength=n)}
    for i, name in enumerate(QC_FILTERS):
        table[f"removed_by_{name}"] = np.bincount(codes[result.removed_by == i], minlength=n)
    table["kept"] = np.bincount(codes[result.cell_mask], minlength=n)
    return pd.DataFrame(table)


# No value of a normalized matrix is this large (its cells add up to 1e4, or 1e6 for CPM): larger
# "log1p" values are not log1p of normalized data and are never passed through expm1.
LOG1P_LINEAR_LIMIT = 1e7
LOG1P_BASES = (None, 2.0, 10.0)  # natural log first: scanpy's default


def log1p_ceiling(base: float | None) -> float:
    """The largest value a log1p matrix in ``base`` (None: natural log) can hold."""
    return float(np.log1p(LOG1P_LINEAR_LIMIT) / (1.0 if base is None else np.log(base)))


def log1p_problem(values: np.ndarray, base: float | None) -> str | None:
    """Why ``values`` cannot be log1p of normalized data in ``base`` (None: they can)."""
    if values.size == 0:
        return None
    top = float(values.max())
    if np.all(values == np.round(values)):
        return f"every value is a whole number (up to {top:g})"
    if top > log1p_ceiling(base):
        return f"values reach {top:g}, beyond log1p of any normalized matrix (at most {log1p_ceiling(base):.3g})"
    return None


def detect_input_kind(
    sample: sp.csr_matrix, *, has_log1p_uns: bool, log1p_base: float | None = None
) -> tuple[str, float | None, str]:
    """Guess whether ``sample``'s values are raw counts, normalized or log1p values: returns the kind,
    the log1p base (None: natural log, or not log1p) and a reason. ``has_log1p_uns``: ``uns["log1p"]``
    (with ``log1p_base``) describes this matrix, unless the values cannot be log1p."""
    values = sample.data
    if has_log1p_uns:
        problem = log1p_problem(values, log1p_base)
        if problem is None:
            return "log1p", log1p_base, 'uns["log1p"] is present'
        kind, base, reason = detect_input_kind(sample, has_log1p_uns=False)
        return kind, base, f'{reason} (uns["log1p"] is present, but {problem})'
    if values.size == 0:
        return "counts", None, "no non-zero values to inspect"
    if np.all(values == np.round(values)):
        return "counts", None, "all values are whole numbers"
    # Normalized data has (near-)constant cell totals; log1p data has them after expm1.
    for base in LOG1P_BASES:
        if values.max() > log1p_ceiling(base):
            continue
        linear = sample.astype(np.float64)
        linear.data = to_linear(linear.data, input_kind="log1p", log1p_base=base)
        if _spread(np.asarray(linear.sum(axis=1)).ravel()) < 0.01:
            return "log1p", base, f"cell totals are constant after expm1 (base {base or 'e'})"
    if _spread(np.asarray(sample.sum(axis=1)).ravel()) < 0.01:
        return "normalized", None, "cell totals are constant"
    if values.max() <= log1p_ceiling(None):
        return "log1p", None, f"non-integer values up to {values.max():.3g}"
    return "normalized", None, "non-integer values with a wide range"


def _spread(totals: np.ndarray) -> float:
    totals = totals[(totals > 0) & np.isfinite(totals)]
    if totals.size < 2:
        return np.inf
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.std(totals) / np.mean(totals))


@dataclass(frozen=True)
class Normalization:
    """How a cell's stored values become log10(1 + normalized value) (``kernel_args()``: the kernels')."""

    input_kind: str = "counts"  # "counts", "normalized" or "log1p" (detected: see ``detect_input_kind``)
    log1p_base: float | None = None  # the log1p values' base (None: natural log)
    target_sum: float = TARGET_SUM  # counts are normalized to this total per cell

    def kernel_args(self) -> tuple[int, float, float]:
        log_base = 1.0 if self.log1p_base is None else float(np.log(self.log1p_base))
        return NORMALIZATION_MODES[self.input_kind], log_base, float(self.target_sum)


def to_linear(data: np.ndarray, *, input_kind: str, log1p_base: float | None) -> np.ndarray:
    """Values on the linear (count or normalized) scale: log1p values are brought back."""
    if input_kind != "log1p":
        return data
    if log1p_base is None:
        return np.expm1(data)
    return np.power(log1p_base, data) - 1.0


@njit(cache=True, nogil=True)
def normalize_row(values, n, out, normalization):
    """log10(1 + normalized value) of one cell's ``values[:n]`` into ``out[:n]``; small integer
    counts take their log from a per-cell table."""
    mode, log_base, target_sum = normalization
    inv_ln10 = 1.0 / np.log(10.0)
    scale = 1.0
    small = np.empty(64, np.float32)
    if mode == 0:  # counts: to target_sum per cell; small integer counts use a table
        total = 0.0
        for k in range(n):
            total += values[k]
        scale = target_sum / total if total > 0 else 0.0
        for k in range(64):
            small[k] = np.log1p(k * scale) * inv_ln10
    for k in range(n):
        value = np.float64(values[k])
        if mode == 0 and value < 64 and value == np.floor(value):
            out[k] = small[np.int64(value)]
            continue
        if mode == 2:  # log1p values: back to linear first
            value = np.expm1(value * log_base)
        out[k] = np.log1p(value * scale) * inv_ln10


QC_WARN_SHARE = 0.10  # a filter removing more of a label's cells than this is a warning


def log_qc(result: QCResult, n_cells: int, qc: QCParams, *, path: Any = "the input",
           by_label: pd.DataFrame | None = None) -> None:
    """Log what each filter removed, in all and per label of ``by_label``; fail when no cell is left."""
    for flag, removed in result.cells_removed.items():
        if removed:  # in the words of the flags (not every filter is a flag)
            reason = ("having no gene left after --min_cells_per_gene" if flag == "no_expressed_genes"
                      else "being empty" if flag == "min_genes_per_cell" and not qc.enabled else f"--{flag}")
            logger.info("QC: %s cells removed by %s.", f"{removed:,}", reason)
    logger.info("QC: %s genes removed by min_cells_per_gene (%s); %s of %s cells kept.",
                f"{result.genes_removed:,}", qc.min_cells_per_gene,
                f"{int(result.cell_mask.sum()):,}", f"{n_cells:,}")
    if result.genes_excluded:
        logger.info("%s genes excluded (--exclude_genes).", f"{result.genes_excluded:,}")
    if by_label is not None:
        _log_qc_by_label(by_label, qc, excluded=result.genes_excluded > 0)
    if result.cell_mask.any():
        return
    removed = result.cells_removed
    if not qc.enabled:  # only empty cells are dropped then
        raise InputError(f"No cells left: all {n_cells:,} cells of {path} are empty (no non-zero value); "
                         "check --layer (or the input file).")
    worst = max(removed, key=removed.get)
    if worst == "no_expressed_genes":
        raise InputError(f"No cells left after QC: --min_cells_per_gene {qc.min_cells_per_gene} removed every gene of "
                         f"the {removed[worst]:,} cells that passed the cell filters; lower it or pass --no_qc.")
    raise InputError(f"No cells left after QC: --{worst} removed {removed[worst]:,} of {n_cells:,} cells; "
                     "relax it or pass --no_qc.")


def _log_qc_by_label(by_label: pd.DataFrame, qc: QCParams, *, excluded: bool) -> None:
    """One line per label of what QC removed, and a warning naming the flag to relax where a filter
    removed more than ``QC_WARN_SHARE`` of a label's cells (a total can hide a population)."""
    exclusion = (" or --exclude_genes", " or narrow --exclude_genes") if excluded else ("", "")
    causes = {  # what removed the cells, and what keeps them
        "min_genes_per_cell": (f"--min_genes_per_cell {qc.min_genes_per_cell}", "lower --min_genes_per_cell"),
        "max_genes_per_cell": (f"--max_genes_per_cell {qc.max_genes_per_cell}", "raise --max_genes_per_cell"),
        "max_mt_percent": (f"--max_mt_percent {qc.max_mt_percent:g}", "raise --max_mt_percent"),
        "no_expressed_genes": (f"having no gene left after --min_cells_per_gene {qc.min_cells_per_gene}"
                               + exclusion[0], "lower --min_cells_per_gene" + exclusion[1]),
    }
    if not qc.enabled:  # only empty cells are removed then (nothing relaxes that), and exclusion's
        causes = {"no_expressed_genes": ("having no gene left after --exclude_genes", "narrow --exclude_genes")}
    for row in by_label.to_dict("records"):
        name = "cells without a label" if pd.isna(row["label"]) else f"cells labelled {row['label']!r}"
        n = row["n_cells"]
        removed = {f: row[f"removed_by_{f}"] for f in QC_FILTERS if row[f"removed_by_{f}"]}
        logger.info("QC: %s of %s %s kept%s.", f"{row['kept']:,}", f"{n:,}", name,
                    "".join(f"; {c:,} removed by {f}" for f, c in removed.items()))
        for f, count in removed.items():
            if f in causes and count > QC_WARN_SHARE * n:
                cause, fix = causes[f]
                logger.warning("QC: %s removed %s of the %s %s (%.0f%%); %s to keep them.", cause,
                               f"{count:,}", f"{n:,}", name, 100 * count / n, fix)

