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
from numba import njit

from utils.common import InputError
from utils.io import MatrixSource
from utils.preprocess import QCParams, chunk_stats, log1p_ceiling, to_linear
from utils.sentence_chunk import SentenceChunk, sentence_chunk

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


# Read-only state of a run shared by the worker threads (the source, masks, name table).
_STATE: dict[str, Any] = {}


def chunk_bounds(n_cells: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of ``chunk_size`` cells."""
    return [(s, min(s + chunk_size, n_cells)) for s in range(0, n_cells, chunk_size)]


def read_checked_chunk(source: MatrixSource, start: int, stop: int) -> sp.csr_matrix:
    """Rows [start, stop), after checking that every value is finite and non-negative."""
    chunk = source.read_rows(start, stop)
    raise_value_problems(source, start, *_value_problems(chunk.indptr, chunk.data))
    return chunk


def raise_value_problems(source: MatrixSource, start: int, first_nonfinite: int, first_negative: int) -> None:
    """The error for a chunk starting at row ``start`` whose rows ``first_nonfinite`` or
    ``first_negative`` (chunk rows, -1: none) hold NaN, infinite or negative values."""
    if first_nonfinite >= 0:
        raise InputError(
            f"{source.path}: {source.matrix_name} holds NaN or infinite values (first in cell "
            f"{start + first_nonfinite}); a count matrix must be finite."
        )
    if first_negative >= 0:
        raise InputError(
            f"{source.path}: {source.matrix_name} holds negative values (first in cell "
            f"{start + first_negative}); give raw counts (e.g. --layer counts), not scaled data."
        )


@njit(cache=True, nogil=True)
def _value_problems(indptr, data):
    """The first row holding a NaN or infinite value and the first holding a negative one
    (-1: none); counted per row without early exits, so the inner loop vectorizes."""
    first_nonfinite = first_negative = -1
    for r in range(indptr.shape[0] - 1):
        nonfinite = 0
        negative = 0
        for j in range(indptr[r], indptr[r + 1]):
            value = data[j]
            nonfinite += (value - value) != 0  # NaN for NaN and infinities
            negative += value < 0
        if nonfinite and first_nonfinite < 0:
            first_nonfinite = r
        if negative and first_negative < 0:
            first_negative = r
    return first_nonfinite, first_negative


def _stats_task(bounds: tuple[int, int]):
    start, stop = bounds
    source, settings = _STATE["source"], _STATE["settings"]
    if settings.input_kind == "log1p":  # check the values as stored, before they are brought back
        chunk = read_checked_chunk(source, start, stop)
        top = chunk.data.max(initial=0.0)
        if top > log1p_ceiling(settings.log1p_base):  # e.g. counts past the detection sample
            raise InputError(
                f"{source.path}: {source.matrix_name} was read as log1p values, but cells from {start} on "
                f"reach {top:g}, beyond log1p of any normalized matrix; pass --input_kind counts "
                "(or normalized)."
            )
        chunk.data = to_linear(chunk.data, input_kind=settings.input_kind, log1p_base=settings.log1p_base)
        return chunk_stats(chunk, row_offset=start, is_mt=_STATE["is_mt"], params=settings.qc)
    # The statistics kernel checks the values on its way (one pass over them, not two).
    stats = chunk_stats(source.read_rows(start, stop), row_offset=start, is_mt=_STATE["is_mt"], params=settings.qc)
    raise_value_problems(source, start, stats.first_nonfinite, stats.first_negative)
    return stats


def _sentence_task(bounds: tuple[int, int]) -> tuple[int, SentenceChunk]:
    ticket = bounds[0] // _STATE["chunk_size"]  # the chunk's place in the order of appends
    try:
        return _write_sentences(bounds, ticket)
    except BaseException:
        # Later chunks wait for this one's turn to append: release them, or the pool hangs.
        _STATE["abort"](ticket)
        raise


def _write_sentences(bounds: tuple[int, int], ticket: int) -> tuple[int, SentenceChunk]:
    start, stop = bounds
    source, settings = _STATE["source"], _STATE["settings"]
    chunk = source.read_rows(start, stop)  # values were checked in the QC pass
    first_row = int(_STATE["first_kept_row"][start])
    text_places: list[int] = []
    sentences = sentence_chunk(
        chunk.indptr, chunk.indices, chunk.data,
        row_split=_STATE["split_of_cell"][start:stop],
        row_eval=_STATE["eval_mask"][start:stop],
        cell_ids=np.arange(start, stop),
        gene_position=_STATE["gene_position"],
        n_kept_genes=_STATE["names"].lengths.shape[0],
        names=_STATE["names"],
        input_kind=settings.input_kind,
        log1p_base=settings.log1p_base,
        seed=settings.seed,
        max_genes=settings.max_genes,
        out_arrays=_STATE["h5ad"].row_arrays(first_row, chunk.nnz),  # written without a copy
        place_text=lambda sizes: _STATE["place_text"](ticket, sizes, text_places),  # likewise
    )  # fmt: skip
    # Write in the worker: the writes run side by side, and only small results go back.
    _STATE["h5ad"].write_rows(first_row, sentences.indices, sentences.data)
    _STATE["write_chunk"](ticket, start, sentences, text_places)
    sentences.indices = sentences.data = sentences.text = sentences.arrow_text = sentences.arrow_offsets = None
    return start, sentences


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
    pool = ThreadPoolExecutor(num_proc, thread_name_prefix="chunk")
    try:
        pending: deque = deque()
        for bounds in chunks:
            pending.append(pool.submit(task, bounds))
            if len(pending) > num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # On an error (or the caller closing us) start no more chunks, and return only when
        # the running ones have stopped, so the caller may then close their output files.
        pool.shutdown(wait=True, cancel_futures=True)


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


def expected_sentence_bytes(
    row_lengths: np.ndarray,
    row_splits: np.ndarray,
    name_bytes: np.ndarray,
    gene_cells: np.ndarray,
    *,
    max_genes: int | None,
) -> np.ndarray:
    """An estimate of each split's sentence bytes (names and separators), to reserve disk blocks
    before pass 2: every kept cell's gene count (capped at ``max_genes``) times the mean name
    length over all expressed genes, plus one separator. Kept 3% low on purpose: a reservation
    must never take space the outputs will not use.

    ``row_lengths`` and ``row_splits``: per kept cell; ``name_bytes`` and ``gene_cells``: per
    kept gene (UTF-8 length of the name, cells expressing it).
    """
    expressed = float(gene_cells.sum())
    if expressed == 0:
        return np.zeros(len(SPLITS), np.int64)
    mean_bytes = float(((name_bytes + 1) * gene_cells).sum()) / expressed
    genes = row_lengths if max_genes is None else np.minimum(row_lengths, max_genes)
    per_split = np.bincount(row_splits, weights=genes, minlength=len(SPLITS)) * mean_bytes
    return (0.97 * per_split).astype(np.int64)
