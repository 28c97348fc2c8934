"""Whole-matrix versions of the transform's per-cell kernels, for the tests to compare against.

The pipeline ranks, normalizes and writes sentences one chunk at a time, inside compiled
kernels (``utils/transform/sentence_chunk.py``). These functions do each step on its own, over a
whole matrix, with the same per-row kernels (``rank_row``, ``normalize_row``), or in plain
Python (``sentences_from_ranking``), so a test can check the chunked path step by step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from numba import njit

from utils.transform.preprocess import TARGET_SUM, Normalization, normalize_row
from utils.transform.ranking import GeneNameTable, cell_key, rank_row, rank_workspace, seed_key
from utils.transform.sentence_chunk import SentenceChunk, rank_chunk, write_text


@njit(cache=True, nogil=True)
def _rank_rows(indptr, values, cell_ids, seed):
    """Entry positions of each row in rank order (see ``rank_row``)."""
    n_rows = indptr.shape[0] - 1
    out = np.empty(indptr[n_rows] - indptr[0], np.int64)
    widest = 1
    for r in range(n_rows):
        widest = max(widest, indptr[r + 1] - indptr[r])
    workspace = rank_workspace(widest)
    key = seed_key(seed)
    for r in range(n_rows):
        start = indptr[r]
        n = indptr[r + 1] - start
        if n == 0:
            continue
        ranked = rank_row(values[start : start + n], cell_key(key, cell_ids[r]), workspace)
        for j in range(n):
            out[start - indptr[0] + j] = start + ranked[j]
    return out


def rank_entries(
    indptr: np.ndarray, data: np.ndarray, *, cell_ids: np.ndarray, seed: int
) -> np.ndarray:
    """Positions of a CSR matrix's entries, each row's in rank order (highest value first).

    Parameters
    ----------
    indptr, data
        A CSR matrix with sorted indices, no explicit zeros and non-negative values.
    cell_ids
        The global index of each row (seeds its tie-breaking; independent of chunking).
    seed
        Seed of the tie-breaking.

    Returns
    -------
    An array ``order`` aligned with the entries: row r's genes, most expressed first, are
    ``indices[order[indptr[r]:indptr[r + 1]]]``.
    """
    return _rank_rows(
        np.asarray(indptr, dtype=np.int64),
        np.ascontiguousarray(data, dtype=np.float32),
        np.asarray(cell_ids, dtype=np.int64),
        np.uint64(seed),
    )


def rank_genes(
    matrix: np.ndarray | sp.spmatrix | sp.sparray,
    *,
    seed: int = 0,
    cell_ids: np.ndarray | None = None,
    max_genes: int | None = None,
) -> list[np.ndarray]:
    """Gene (column) indices of each row's non-zero entries, highest value first.

    >>> rank_genes(np.array([[0, 5, 1], [2, 0, 2]]), seed=0)[0].tolist()
    [1, 2]
    """
    csr = sp.csr_matrix(matrix, dtype=np.float32)
    csr.eliminate_zeros()
    csr.sort_indices()
    if cell_ids is None:
        cell_ids = np.arange(csr.shape[0])
    genes = csr.indices[rank_entries(csr.indptr, csr.data, cell_ids=cell_ids, seed=seed)]
    return [genes[csr.indptr[r] : csr.indptr[r + 1]][:max_genes] for r in range(csr.shape[0])]


def sentences_from_ranking(ranked: list[np.ndarray], gene_names: Sequence[str]) -> list[str]:
    """Plain-Python sentences from ``rank_genes`` output (for small data and tests)."""
    names = np.asarray(gene_names, dtype=object)
    return [" ".join(names[r]) for r in ranked]


@njit(cache=True, nogil=True)
def _log10_normalized(indptr, data, normalization):
    out = np.empty(data.shape[0], np.float32)
    for r in range(indptr.shape[0] - 1):
        start, stop = indptr[r], indptr[r + 1]
        normalize_row(data[start:stop], stop - start, out[start:stop], normalization)
    return out


def log10_normalized(chunk: sp.csr_matrix, *, input_kind: str, log1p_base: float | None,
                     target_sum: float = TARGET_SUM) -> np.ndarray:
    """log10(1 + normalized value) of each stored entry, as float32: the preprocessed matrix.

    Raw counts are normalized to ``target_sum`` per cell (``sc.pp.normalize_total`` followed by
    ``sc.pp.log1p(base=10)``); normalized values are kept; log1p values are first brought back
    with expm1 (in their base).
    """
    normalization = Normalization(input_kind, log1p_base, target_sum)
    return _log10_normalized(chunk.indptr.astype(np.int64), chunk.data, normalization.kernel_args())


def sentence_chunk(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, *, names: GeneNameTable,
                   **options) -> SentenceChunk:
    """Sentences, preprocessed rows and evaluation points of one raw CSR chunk, in a new buffer
    (``rank_chunk`` then ``write_text``; ``options`` are ``rank_chunk``'s)."""
    return write_text(rank_chunk(indptr, indices, data, names=names, **options), names)
