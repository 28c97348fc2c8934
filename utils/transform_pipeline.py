"""The transform as two streaming passes over row chunks, optionally in parallel.

Pass 1 reads every chunk once for the QC statistics (per-cell genes, totals and MT counts,
per-gene cell counts) and decides which cells and genes are kept. Pass 2 reads every chunk again,
normalizes, ranks and hands back sentences, the preprocessed rows and the evaluation points,
which the parent process writes in input order. Memory depends on the chunk size, not on the
number of cells; the output is byte-identical for any chunk size and number of workers.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from utils.common import InputError
from utils.io import MatrixSource
from utils.preprocess import QCParams, chunk_stats, log10_normalized, to_linear
from utils.ranking import GeneNameTable, join_sentences, rank_entries

logger = logging.getLogger("cell2sentence")

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class RunSettings:
    """What the workers need besides the data; fixed before the first pass."""

    input_kind: str
    log1p_base: float | None
    qc: QCParams
    seed: int
    max_genes: int | None


@dataclass
class ChunkResult:
    """What pass 2 hands back for one chunk, in input order."""

    kept_rows: np.ndarray  # global row indices of the kept cells
    sentences: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> text lines (offsets, bytes)
    preprocessed: sp.csr_matrix  # kept cells x kept genes, log10(1 + normalized)
    gene_cells: np.ndarray  # per kept gene: kept cells expressing it
    eval_log_rank: np.ndarray
    eval_log_expression: np.ndarray


# Read-only state of a run shared by the worker threads (the source, masks, name table).
_STATE: dict[str, Any] = {}


def chunk_bounds(n_cells: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of ``chunk_size`` cells."""
    return [(s, min(s + chunk_size, n_cells)) for s in range(0, n_cells, chunk_size)]


def read_checked_chunk(source: MatrixSource, start: int, stop: int) -> sp.csr_matrix:
    """Rows [start, stop), after checking that every value is finite and non-negative."""
    chunk = source.read_rows(start, stop)
    bad = ~np.isfinite(chunk.data)
    if bad.any():
        raise InputError(
            f"{source.path}: {source.matrix_name} holds NaN or infinite values (first in cell "
            f"{start + _first_row(chunk, bad)}); a count matrix must be finite."
        )
    negative = chunk.data < 0
    if negative.any():
        raise InputError(
            f"{source.path}: {source.matrix_name} holds negative values (first in cell "
            f"{start + _first_row(chunk, negative)}); give raw counts (e.g. --layer counts), "
            "not scaled data."
        )
    return chunk


def _first_row(chunk: sp.csr_matrix, entry_mask: np.ndarray) -> int:
    return int(np.searchsorted(chunk.indptr, np.argmax(entry_mask), side="right") - 1)


def _stats_task(bounds: tuple[int, int]):
    start, stop = bounds
    source, settings = _STATE["source"], _STATE["settings"]
    chunk = read_checked_chunk(source, start, stop)
    chunk.data = to_linear(chunk.data, input_kind=settings.input_kind, log1p_base=settings.log1p_base)
    return chunk_stats(chunk, row_offset=start, is_mt=_STATE["is_mt"], params=settings.qc)


def _sentence_task(bounds: tuple[int, int]) -> ChunkResult:
    start, stop = bounds
    source, settings = _STATE["source"], _STATE["settings"]
    cell_mask, gene_mask = _STATE["cell_mask"], _STATE["gene_mask"]
    chunk = source.read_rows(start, stop)  # values were checked in the QC pass

    local_kept = np.flatnonzero(cell_mask[start:stop])
    if len(local_kept) < chunk.shape[0] or not _STATE["all_genes_kept"]:
        chunk = select_cells_and_genes(chunk, local_kept, gene_mask, _STATE["gene_position"])
    kept_rows = local_kept + start
    log_expression = log10_normalized(chunk, input_kind=settings.input_kind, log1p_base=settings.log1p_base)
    # Rank on the stored values: normalization is monotone within a cell, and ties stay exact.
    order = rank_entries(chunk.indptr, chunk.data, cell_ids=kept_rows, seed=settings.seed)
    ranked_genes = chunk.indices[order]

    # Evaluation points of the sampled cells: rank of each expressed gene vs its expression.
    eval_rows = np.flatnonzero(_STATE["eval_mask"][kept_rows])
    lengths = np.diff(chunk.indptr)[eval_rows]
    starts = chunk.indptr[eval_rows]
    ranks = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    eval_log_expression = log_expression[order[np.repeat(starts, lengths) + ranks]]
    del order  # the largest array of a chunk; free it before the sentences are built

    split_of_row = _STATE["split_of_cell"][kept_rows]
    names: GeneNameTable = _STATE["names"]
    sentences = {
        split: join_sentences(
            np.flatnonzero(split_of_row == i), chunk.indptr, ranked_genes, names,
            max_genes=settings.max_genes,
        )
        for i, split in enumerate(SPLITS)
    }

    return ChunkResult(
        kept_rows=kept_rows,
        sentences=sentences,
        preprocessed=sp.csr_matrix(
            (log_expression, chunk.indices.astype(np.int32, copy=False), chunk.indptr),
            shape=chunk.shape,
        ),
        gene_cells=np.bincount(chunk.indices, minlength=chunk.shape[1]),
        eval_log_rank=np.log10(1.0 + ranks).astype(np.float32),
        eval_log_expression=eval_log_expression,
    )


def select_cells_and_genes(
    chunk: sp.csr_matrix, rows: np.ndarray, gene_mask: np.ndarray, gene_position: np.ndarray
) -> sp.csr_matrix:
    """The given rows and masked genes of a CSR chunk, columns renumbered by
    ``gene_position`` (the rank of each kept gene); indices stay sorted."""
    chunk = chunk[rows]
    keep = gene_mask[chunk.indices]
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    return sp.csr_matrix(
        (chunk.data[keep], gene_position[chunk.indices[keep]], kept_before[chunk.indptr]),
        shape=(len(rows), int(gene_mask.sum())),
    )


def ordered_map(
    task: Callable[[tuple[int, int]], Any],
    chunks: Sequence[tuple[int, int]],
    *,
    num_proc: int,
    state: dict[str, Any],
) -> Iterator[Any]:
    """``task`` over ``chunks``, results in order, at most ``num_proc + 1`` chunks in flight
    (so results waiting to be written never pile up in memory)."""
    _STATE.clear()
    _STATE.update(state)
    if num_proc <= 1 or len(chunks) <= 1:
        for bounds in chunks:
            yield task(bounds)
        return
    # Threads, not processes: the numba kernels release the GIL, and results need no pickling
    # on their way to the writer (which, for 2,000-gene sentences, cost more than it saved).
    with ThreadPoolExecutor(num_proc, thread_name_prefix="chunk") as pool:
        pending: deque = deque()
        for bounds in chunks:
            pending.append(pool.submit(task, bounds))
            if len(pending) > num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def assign_splits(n_cells: int, fractions: Sequence[float], *, seed: int) -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) of each of ``n_cells`` cells, seeded.

    Sizes are rounded so they add up to ``n_cells``; the test split takes the remainder.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_cells)
    n_train = int(round(fractions[0] * n_cells))
    n_valid = int(round(fractions[1] * n_cells))
    split = np.full(n_cells, 2, dtype=np.int8)
    split[order[:n_train]] = 0
    split[order[n_train : n_train + n_valid]] = 1
    return split


def sample_eval_cells(cell_mask: np.ndarray, n_eval: int, *, seed: int) -> np.ndarray:
    """Boolean mask of a seeded sample of at most ``n_eval`` kept cells for the fit."""
    kept = np.flatnonzero(cell_mask)
    mask = np.zeros(cell_mask.shape[0], bool)
    if len(kept) <= n_eval:
        mask[kept] = True
    else:
        mask[np.random.default_rng(seed + 1).choice(kept, size=n_eval, replace=False)] = True
    return mask
