"""Rank each cell's expressed genes and turn the ranking into cell-sentence text.

The kernels work on CSR arrays (``indptr``, ``indices``, ``data``), one row per cell, and are
compiled with numba: ranking 20,000 cells of 2,000 expressed genes takes about a second on
one core here, against minutes for a Python loop that creates a random generator per cell.

Ties are broken uniformly at random but reproducibly: the genes of a tie group, taken in
gene-index order, are shuffled (Fisher-Yates) with random numbers from a counter-based hash of
(seed, global cell index, position). The result depends only on the cell's own values and
its index in the input, so it is identical whatever the chunking or the number of workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(inline="always", cache=True)
def _splitmix64(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True, nogil=True)
def _rank_rows(indptr, value_bits, cell_ids, seed):
    """Entry positions of each row in rank order: value descending, ties shuffled by a
    seeded hash.

    ``value_bits`` is the float32 data viewed as uint32: for non-negative floats the bit
    pattern orders like the value, so a byte-wise stable radix sort on it sorts by value.
    """
    n_rows = indptr.shape[0] - 1
    out = np.empty(indptr[n_rows] - indptr[0], np.int64)

    widest = 1
    for r in range(n_rows):
        widest = max(widest, indptr[r + 1] - indptr[r])
    keys_a = np.empty(widest, np.uint32)
    keys_b = np.empty(widest, np.uint32)
    pos_a = np.empty(widest, np.int32)
    pos_b = np.empty(widest, np.int32)
    count = np.empty((4, 256), np.int64)
    seed_key = _splitmix64(np.uint64(seed) + _GOLDEN)

    for r in range(n_rows):
        start = indptr[r]
        n = indptr[r + 1] - start
        if n == 0:
            continue
        # LSD radix sort on the 4 key bytes; the 4 histograms come from one pass, and a byte
        # that every key shares is skipped (for integer counts most are), several times faster
        # than a comparison sort.
        count[:, :] = 0
        for j in range(n):
            key = np.uint32(0xFFFFFFFF) - value_bits[start + j]  # descending
            keys_a[j] = key
            pos_a[j] = j
            count[0, key & 255] += 1
            count[1, (key >> 8) & 255] += 1
            count[2, (key >> 16) & 255] += 1
            count[3, key >> 24] += 1
        ka, kb, pa, pb = keys_a, keys_b, pos_a, pos_b
        for byte in range(4):
            shift = 8 * byte
            if count[byte, (ka[0] >> shift) & 255] == n:
                continue
            total = 0
            for b in range(256):
                c = count[byte, b]
                count[byte, b] = total
                total += c
            for j in range(n):
                d = (ka[j] >> shift) & 255
                t = count[byte, d]
                count[byte, d] = t + 1
                kb[t] = ka[j]
                pb[t] = pa[j]
            ka, kb = kb, ka
            pa, pb = pb, pa
        # Shuffle each tie group (still in gene-index order after the stable sort).
        cell_key = _splitmix64(seed_key ^ (np.uint64(cell_ids[r]) * _GOLDEN))
        group_start = 0
        for j in range(1, n + 1):
            if j == n or ka[j] != ka[group_start]:
                for i in range(j - group_start - 1, 0, -1):
                    h = _splitmix64(cell_key + np.uint64(group_start + i)) >> np.uint64(32)
                    k = np.int64((h * np.uint64(i + 1)) >> np.uint64(32))  # uniform in [0, i]
                    a = group_start + i
                    b = group_start + k
                    tmp = pa[a]
                    pa[a] = pa[b]
                    pa[b] = tmp
                group_start = j
        for j in range(n):
            out[start - indptr[0] + j] = start + pa[j]
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
    value_bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    return _rank_rows(
        np.asarray(indptr, dtype=np.int64),
        value_bits,
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


_SLOT = 16  # bytes per padded name: copying a fixed 16 bytes is much faster than a byte loop


class GeneNameTable:
    """Gene names as one UTF-8 byte buffer plus offsets, for building sentences without
    creating a Python string per gene and per cell. Names shorter than 16 bytes are also kept
    in fixed 16-byte slots, each followed by a space."""

    def __init__(self, names: Sequence[str]):
        encoded = [name.encode("utf-8") for name in names]
        self.lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum(self.lengths)
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        self.slots = np.zeros((len(encoded), _SLOT), dtype=np.uint8)
        for i, e in enumerate(encoded):
            if len(e) < _SLOT:
                self.slots[i, : len(e)] = np.frombuffer(e, dtype=np.uint8)
                self.slots[i, len(e)] = 32  # space


@njit(cache=True, nogil=True)
def _join_lines(rows, indptr, ranked_genes, max_genes, name_lengths, name_slots, name_buffer, name_offsets):
    n_out = rows.shape[0]
    offsets = np.zeros(n_out + 1, np.int64)
    for i in range(n_out):
        r = rows[i]
        length = 0
        for j in range(indptr[r], min(indptr[r + 1], indptr[r] + max_genes)):
            length += name_lengths[ranked_genes[j]] + 1  # the name and a space
        offsets[i + 1] = offsets[i] + max(length, 1)  # the last space becomes the newline
    text = np.empty(offsets[n_out] + _SLOT, np.uint8)  # slack for the last 16-byte copy
    for i in range(n_out):
        r = rows[i]
        pos = offsets[i]
        for j in range(indptr[r], min(indptr[r + 1], indptr[r] + max_genes)):
            g = ranked_genes[j]
            length = name_lengths[g]
            if length < _SLOT:
                for b in range(_SLOT):
                    text[pos + b] = name_slots[g, b]
            else:
                for b in range(length):
                    text[pos + b] = name_buffer[name_offsets[g] + b]
                text[pos + length] = 32  # space
            pos += length + 1
        text[offsets[i + 1] - 1] = 10  # newline
    return offsets, text[: offsets[n_out]]


def join_sentences(
    rows: np.ndarray,
    indptr: np.ndarray,
    ranked_genes: np.ndarray,
    names: GeneNameTable,
    *,
    max_genes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sentences of the given rows as text lines: (offsets, utf-8 bytes), where line i,
    newline included, is ``bytes[offsets[i]:offsets[i + 1]]`` and holds the row's first
    ``max_genes`` genes separated by one space.

    ``ranked_genes[indptr[r]:indptr[r + 1]]`` are row r's genes in rank order. The bytes are the
    text file's content as they are; ``as_arrow_strings`` makes the Arrow column from them.
    """
    limit = np.iinfo(np.int32).max if max_genes is None else int(max_genes)
    return _join_lines(
        np.asarray(rows, dtype=np.int64),
        np.asarray(indptr, dtype=np.int64),
        ranked_genes,
        limit,
        names.lengths,
        names.slots,
        names.buffer,
        names.offsets,
    )


def as_arrow_strings(offsets: np.ndarray, text: np.ndarray) -> pa.StringArray:
    """The lines of ``join_sentences`` as an Arrow string array, newlines removed."""
    lines = pa.StringArray.from_buffers(
        len(offsets) - 1, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(text)
    )
    return pc.utf8_rtrim(lines, characters="\n")


def sentences_from_ranking(ranked: list[np.ndarray], gene_names: Sequence[str]) -> list[str]:
    """Plain-Python sentences from ``rank_genes`` output (for small data and tests)."""
    names = np.asarray(gene_names, dtype=object)
    return [" ".join(names[r]) for r in ranked]
