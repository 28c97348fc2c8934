"""What the QC removed, logged in all and per label, and the error when no cell is left."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from utils.cli import InputError
from utils.transform.preprocess import QC_FILTERS, QCParams, QCResult

logger = logging.getLogger("cell2sentence")

QC_WARN_SHARE = 0.10  # a filter removing more of a label's cells than this is a warning


def log_qc(result: QCResult, n_cells: int, qc: QCParams, *, path: Any = "the input",
           by_label: pd.DataFrame | None = None) -> None:
    """Log what each filter removed, in all and per label of ``by_label`` (``qc_by_label``); fail
    when no cell is left, naming the flag to relax."""
    for flag, removed in result.cells_removed.items():
        if removed:
            logger.info("QC: %s cells removed by %s.", f"{removed:,}", _removal_reason(flag, qc))
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
    """One line per label of what QC removed, and a warning naming the flag that relaxes each filter
    that removed more than ``QC_WARN_SHARE`` of a label's cells (a total can hide a population)."""
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


def _removal_reason(filter_name: str, qc: QCParams) -> str:
    """What removed cells, in the words of the flags (not every filter is a flag)."""
    if filter_name == "no_expressed_genes":
        return "having no gene left after --min_cells_per_gene"
    if filter_name == "min_genes_per_cell" and not qc.enabled:
        return "being empty"
    return f"--{filter_name}"
