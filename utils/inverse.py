"""Cell sentences -> expression: the inverse of the rank transform.

A sentence lists a cell's genes from most to least expressed. The transform fitted
``log10(1 + expr) ≈ intercept + slope·log10(1 + rank)`` (rank 0 = first word, slope < 0),
so the gene at rank ``r`` gets ``intercept + slope·log10(1 + r)`` on the log10(1 + x) scale of
the preprocessed matrix, and genes absent from the sentence get 0.

Post-processing, as in the original scripts:

- a word that is not a gene of the vocabulary is skipped but keeps its place, so later genes
  keep their ranks;
- a gene repeated in a sentence is placed once, at the average of its positions.

Negative values: past the fit's zero crossing, rank ``10**(-intercept/slope) - 1``, the linear
model predicts values ≤ 0. By default they are kept as they are: the entry stays stored
(present), the order of the sentence is reproduced exactly and the transform stays invertible.
``clip_negative=True`` sets them to 0 and removes them instead (absent, as non-physical
log-expression), which loses those deep genes.

The work is one pass over the bytes of all sentences (numba): words are looked up in an
open-addressing hash table of the vocabulary, with no Python object per word or per cell.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numba
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from utils.common import InputError
from utils.fit import RankExpressionFit

logger = logging.getLogger("cell2sentence")

__all__ = [
    "InverseResult",
    "expression_adata",
    "sentences_to_adata",
    "SentenceBytes",
    "VocabIndex",
    "build_vocab_index",
    "load_transform_fit",
    "load_vocab",
    "read_sentence_file",
    "sentence_bytes",
    "sentences_to_expression",
    "zero_crossing_rank",
]


# --------------------------------------------------------------------------------------
# Inputs: the fit, the vocabulary, the sentences as one byte buffer
# --------------------------------------------------------------------------------------


def zero_crossing_rank(fit: RankExpressionFit) -> float:
    """First (fractional) rank at which the fit predicts a value ≤ 0 (inf when it never does).

    >>> zero_crossing_rank(RankExpressionFit(slope=-1.0, intercept=2.0))
    99.0
    """
    if fit.slope >= 0:
        return float("inf") if fit.intercept > 0 else 0.0
    return float(10.0 ** (-fit.intercept / fit.slope) - 1.0)


def load_transform_fit(path: Path) -> RankExpressionFit:
    """The line of ``eval/transformation_metrics.csv`` (first row): slope and intercept, and the
    scores the transform reported with them (R², Pearson and Spearman r, threshold, points) where
    the file has them (NaN, 0 where not)."""
    if not path.is_file():
        raise InputError(
            f"{path} does not exist; run transform.py first or point --transform_dir at its output."
        )
    table = pd.read_csv(path)
    missing = {"slope", "intercept"} - set(table.columns)
    if missing or table.empty:
        raise InputError(
            f"{path} has no slope/intercept row (missing columns: {sorted(missing)}); "
            "re-run transform.py to write it."
        )
    slope, intercept = float(table["slope"].iloc[0]), float(table["intercept"].iloc[0])
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise InputError(f"{path} holds a non-finite slope or intercept; re-run transform.py.")
    if slope >= 0:
        logger.warning(
            "The fitted slope %.4g is not negative: reconstructed values will not decrease "
            "with rank.",
            slope,
        )
    row = table.iloc[0]
    scores = {k: (int(row[k]) if k == "n_points" else float(row[k]))
              for k in RankExpressionFit.__dataclass_fields__ if k in row.index and k not in ("slope", "intercept")}
    return RankExpressionFit(slope=slope, intercept=intercept, **scores)


def load_vocab(path: Path) -> list[str]:
    """Gene names of ``cell_sentences/vocab.txt`` (``GENE count`` per line), in file order."""
    if not path.is_file():
        raise InputError(
            f"{path} does not exist; run transform.py first or point --transform_dir at its output."
        )
    genes = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not genes:
        raise InputError(f"{path} lists no genes; re-run transform.py.")
    if len(set(genes)) != len(genes):
        raise InputError(f"{path} lists a gene more than once; re-run transform.py.")
    return genes


@dataclass(frozen=True)
class SentenceBytes:
    """All sentences as one UTF-8 buffer; sentence ``i`` is ``data[offsets[i]:offsets[i+1]]``."""

    data: np.ndarray  # uint8
    offsets: np.ndarray  # int64, length n + 1

    @property
    def n(self) -> int:
        return len(self.offsets) - 1


def sentence_bytes(sentences: Sequence[str] | pa.Array | pa.ChunkedArray) -> SentenceBytes:
    """Pack sentences (Python strings or an Arrow string column) into one byte buffer.

    An Arrow column is used without copying its bytes; nulls count as empty sentences. One
    string is refused (it would be one sentence per character).
    """
    if isinstance(sentences, str | bytes):
        raise InputError(f"Sentences must be a list of sentences, not one string ({sentences[:40]!r}); wrap it in a "
                         "list for one cell.")
    if isinstance(sentences, pa.ChunkedArray):
        sentences = (
            sentences.combine_chunks() if sentences.num_chunks else pa.array([], pa.string())
        )
    if not isinstance(sentences, pa.Array):
        try:
            sentences = pa.array(list(sentences), type=pa.large_string())
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise InputError(f"Sentences must be strings ({err}).") from None
    if not (pa.types.is_string(sentences.type) or pa.types.is_large_string(sentences.type)):
        raise InputError(f"Sentences must be strings, got an Arrow column of {sentences.type}.")
    if sentences.null_count:
        sentences = sentences.fill_null("")
    arr = sentences.cast(pa.large_string())
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = (
        np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    )
    return SentenceBytes(data=data, offsets=np.ascontiguousarray(offsets))


def read_sentence_file(path: Path) -> SentenceBytes:
    """Read a one-sentence-per-line text file into a byte buffer (``\\r\\n`` accepted).

    Every line is a sentence, empty lines included (an empty generated cell is still a cell);
    a final newline does not start another sentence.
    """
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        return SentenceBytes(data=data, offsets=np.zeros(1, np.int64))
    newlines = np.flatnonzero(data == ord("\n")).astype(np.int64)
    ends = newlines if data[-1] == ord("\n") else np.append(newlines, data.size)
    # Line i is data[start_i:end_i] and start_i = end_{i-1} + 1; letting sentence i start at
    # end_{i-1} adds only the newline byte, which the kernel treats as a separator, so one
    # offsets array (the line ends) describes every line.
    offsets = np.concatenate([[0], ends]).astype(np.int64)
    return SentenceBytes(data=data, offsets=offsets)


# --------------------------------------------------------------------------------------
# The vocabulary hash table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VocabIndex:
    """Open-addressing hash tables over the vocabulary (exact and ASCII case-folded).

    A word is identified by its length, its first 8 bytes packed into one integer (``key``)
    and, for longer names, the remaining bytes; most gene names are compared with two integer
    comparisons. Each table holds, per slot, the gene id (-1 when empty), its key and length.
    """

    genes: tuple[str, ...]
    data: np.ndarray  # uint8, the gene names concatenated
    offsets: np.ndarray  # int64, n_genes + 1
    table: np.ndarray  # int64 (size, 3): gene id, key, length per slot (exact match)
    folded_table: np.ndarray  # the same over ASCII case-folded names

    @property
    def n_genes(self) -> int:
        return len(self.genes)


@numba.njit(cache=True, inline="always")
def _fold(byte: np.uint8, fold: bool) -> np.uint64:
    if fold and 65 <= byte <= 90:
        return np.uint64(byte + 32)
    return np.uint64(byte)


# The hash: the packed first 8 bytes and the length, mixed once, then rotate-xor over any
# further bytes (a short dependency chain). Its quality only affects probe lengths: matches
# are always checked exactly.
@numba.njit(cache=True, inline="always")
def _step(h: np.uint64, byte: np.uint64) -> np.uint64:
    return ((h << np.uint64(5)) | (h >> np.uint64(59))) ^ byte


@numba.njit(cache=True, inline="always")
def _slot(h: np.uint64, mask: np.uint64) -> np.uint64:
    # Fibonacci hashing: the high bits of the product depend on every bit of h.
    return ((h * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & mask


@numba.njit(cache=True)
def _key(data: np.ndarray, s: int, e: int, fold: bool) -> np.uint64:
    key = np.uint64(0)
    for t in range(min(8, e - s)):
        key |= _fold(data[s + t], fold) << np.uint64(8 * t)
    return key


@numba.njit(cache=True)
def _word_hash(key: np.uint64, data: np.ndarray, s: int, e: int, fold: bool) -> np.uint64:
    h = key * np.uint64(0xC2B2AE3D27D4EB4F) ^ np.uint64(e - s)
    for t in range(s + 8, e):
        h = _step(h, _fold(data[t], fold))
    return h


@numba.njit(cache=True)
def _tail_equal(vdata: np.ndarray, v0: int, data: np.ndarray, s: int, e: int, fold: bool) -> bool:
    for t in range(8, e - s):  # noqa: SIM110 - numba compiles no generator in all()
        if _fold(vdata[v0 + t], fold) != _fold(data[s + t], fold):
            return False
    return True


@numba.njit(cache=True)
def _find(table: np.ndarray, vdata: np.ndarray, voffsets: np.ndarray, data: np.ndarray,
          s: int, e: int, fold: bool) -> tuple[int, int]:
    """(gene id or -1, slot where it is or would go)."""
    mask = np.uint64(len(table) - 1)
    key = _key(data, s, e, fold)
    slot = _slot(_word_hash(key, data, s, e, fold), mask)
    while True:
        g = table[slot, 0]
        if g < 0:
            return -1, int(slot)
        if (
            table[slot, 2] == e - s
            and np.uint64(table[slot, 1]) == key
            and (e - s <= 8 or _tail_equal(vdata, voffsets[g], data, s, e, fold))
        ):
            return int(g), int(slot)
        slot = (slot + np.uint64(1)) & mask


@numba.njit(cache=True)
def _build_table(data: np.ndarray, offsets: np.ndarray, size: int, fold: bool) -> np.ndarray:
    table = np.full((size, 3), -1, dtype=np.int64)
    for g in range(len(offsets) - 1):
        s, e = offsets[g], offsets[g + 1]
        found, slot = _find(table, data, offsets, data, s, e, fold)
        if found < 0:  # else an earlier gene has the same (folded) name: the first one wins
            table[slot, 0] = g
            table[slot, 1] = np.int64(_key(data, s, e, fold))
            table[slot, 2] = e - s
    return table


def build_vocab_index(genes: Sequence[str]) -> VocabIndex:
    """Hash the vocabulary once; reuse the index for many calls.

    Under case folding (ASCII letters only), names that differ only by case map to the first
    of them in vocabulary order.
    """
    genes = tuple(str(g) for g in genes)
    if len(set(genes)) != len(genes):
        raise InputError("The vocabulary lists a gene more than once.")
    encoded = [g.encode("utf-8") for g in genes]
    offsets = np.zeros(len(genes) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    size = 1 << max(4, int(2 * max(len(genes), 1) - 1).bit_length())  # load factor ≤ 0.5
    table = _build_table(data, offsets, size, False)
    folded = _build_table(data, offsets, size, True)
    n_folded = int((folded[:, 0] >= 0).sum())
    if n_folded < len(genes):
        logger.warning(
            "%d vocabulary genes differ from another only by letter case; under case-insensitive "
            "matching they map to the first of them.",
            len(genes) - n_folded,
        )
    return VocabIndex(genes=genes, data=data, offsets=offsets, table=table, folded_table=folded)


# --------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _is_space(b: np.uint8) -> bool:
    # The separators of str.split() within ASCII: space, \t, \n, \v, \f, \r.
    return b <= 32 and (b == 32 or 9 <= b <= 13)


_ONES = np.uint64(0x0101010101010101)


@numba.njit(cache=True, inline="always")
def _load8(data: np.ndarray, s: int) -> np.uint64:
    """The 8 bytes at data[s:s+8] as a little-endian integer."""
    x = np.uint64(0)
    for t in range(8):
        x |= np.uint64(data[s + t]) << np.uint64(8 * t)
    return x


@numba.njit(cache=True)
def _radix_sort(keys: np.ndarray, tmp: np.ndarray, k: int, lo: int, hi: int, counts: np.ndarray):
    """Sort keys[:k] by bits lo..hi (LSD radix, 8-bit digits, stable); returns the sorted array."""
    src, dst = keys, tmp
    shift = lo
    while shift < hi:
        counts[:] = 0
        for t in range(k):
            counts[((src[t] >> shift) & 255) + 1] += 1
        for b in range(256):
            counts[b + 1] += counts[b]
        for t in range(k):
            d = (src[t] >> shift) & 255
            dst[counts[d]] = src[t]
            counts[d] += 1
        src, dst = dst, src
        shift += 8
    return src


@numba.njit(cache=True)
def _inverse_range(
    data: np.ndarray,
    offsets: np.ndarray,
    first: int,
    last: int,
    max_words: int,
    table: np.ndarray,
    folded_table: np.ndarray,
    vdata: np.ndarray,
    voffsets: np.ndarray,
    case_insensitive: bool,
    rank_value: np.ndarray,
    slope: float,
    intercept: float,
    indices: np.ndarray,
    values: np.ndarray,
    row_nnz: np.ndarray,
    n_words: np.ndarray,
    n_invalid: np.ndarray,
    n_duplicate: np.ndarray,
    n_folded: np.ndarray,
) -> int:
    """Sentences first..last-1 -> their CSR rows written at the start of indices/values."""
    n_vocab = len(voffsets) - 1
    n_bits = 8
    while (1 << n_bits) < n_vocab:
        n_bits += 8
    # mark[g] = (cell << 32) | slot of gene g in the cell's row: one lookup tells both whether
    # the cell already placed g and where.
    mark = np.full(n_vocab, -1, dtype=np.int64)
    mask = np.uint64(len(table) - 1)
    longest = 1
    for i in range(first, last):
        longest = max(longest, (offsets[i + 1] - offsets[i]) // 2 + 1)
    row_keys = np.empty(longest, dtype=np.int64)  # (gene << 32) | slot, sorted by gene
    tmp_keys = np.empty(longest, dtype=np.int64)
    first_rank = np.empty(longest, dtype=np.int64)
    # Repeated genes (rare) keep their rank sum and count aside, reset after each row.
    dup_sum = np.zeros(longest, dtype=np.float64)
    dup_cnt = np.zeros(longest, dtype=np.int64)
    dup_list = np.empty(longest, dtype=np.int64)
    counts = np.empty(257, dtype=np.int64)
    out = 0
    n_data = len(data)
    for i in range(first, last):
        k = 0
        rank = 0
        n_dup_slots = 0
        j = offsets[i]
        end = offsets[i + 1]
        while j < end and (max_words < 0 or rank < max_words):
            while j < end and _is_space(data[j]):
                j += 1
            if j >= end:
                break
            s = j
            # The key (first 8 bytes) and hash of _find(), computed while scanning the word.
            # Fast path: load 8 bytes at once and find the first byte <= 32 without a branch
            # per byte (SWAR); bytes past the sentence's end are never part of the word.
            key = np.uint64(0)
            done = False
            if s + 8 <= n_data:
                x = _load8(data, s)
                m = (x - np.uint64(0x2121212121212121)) & ~x & np.uint64(0x8080808080808080)
                w = 8
                if m != 0:
                    low = m & (~m + np.uint64(1))
                    w = int((((low - np.uint64(1)) & _ONES) * _ONES) >> np.uint64(56)) - 1
                if w > end - s:
                    w = end - s
                if w < 8 and (s + w == end or _is_space(data[s + w])):
                    key = x & ((np.uint64(1) << np.uint64(8 * w)) - np.uint64(1))
                    j = s + w
                    done = True
                elif w == 8:
                    key = x
                    j = s + 8
            if not done:
                while j < end and j - s < 8 and not _is_space(data[j]):
                    key |= np.uint64(data[j]) << np.uint64(8 * (j - s))
                    j += 1
            tail = j
            while j < end and not _is_space(data[j]):
                j += 1
            length = j - s
            h = key * np.uint64(0xC2B2AE3D27D4EB4F) ^ np.uint64(length)
            for t in range(tail, j):
                h = _step(h, np.uint64(data[t]))
            slot = _slot(h, mask)
            g = -1
            while True:
                c = table[slot, 0]
                if c < 0:
                    break
                if (
                    table[slot, 2] == length
                    and np.uint64(table[slot, 1]) == key
                    and (length <= 8 or _tail_equal(vdata, voffsets[c], data, s, j, False))
                ):
                    g = c
                    break
                slot = (slot + np.uint64(1)) & mask
            if g < 0 and case_insensitive:
                g, _ = _find(folded_table, vdata, voffsets, data, s, j, True)
                if g >= 0:
                    n_folded[i] += 1
            if g < 0:
                n_invalid[i] += 1
            elif (mark[g] >> 32) == i:
                p = mark[g] & 0xFFFFFFFF
                if dup_cnt[p] == 0:
                    dup_list[n_dup_slots] = p
                    n_dup_slots += 1
                    dup_sum[p] = first_rank[p]
                    dup_cnt[p] = 1
                dup_sum[p] += rank
                dup_cnt[p] += 1
                n_duplicate[i] += 1
            else:
                mark[g] = (i << 32) | k
                row_keys[k] = (g << 32) | k
                first_rank[k] = rank
                k += 1
            rank += 1
        n_words[i] = rank
        keys = _radix_sort(row_keys, tmp_keys, k, 32, 32 + n_bits, counts)
        for t in range(k):
            p = keys[t] & 0xFFFFFFFF
            indices[out + t] = keys[t] >> 32
            if dup_cnt[p] == 0:
                values[out + t] = rank_value[first_rank[p]]
            else:
                # A repeated gene sits at the average of its positions.
                values[out + t] = intercept + slope * np.log10(1.0 + dup_sum[p] / dup_cnt[p])
        for d in range(n_dup_slots):
            dup_cnt[dup_list[d]] = 0
        out += k
        row_nnz[i] = k
    return out


@numba.njit(cache=True, parallel=True)
def _inverse_chunks(
    data: np.ndarray,
    offsets: np.ndarray,
    chunks: np.ndarray,
    bounds: np.ndarray,
    longest: int,
    max_words: int,
    table: np.ndarray,
    folded_table: np.ndarray,
    vdata: np.ndarray,
    voffsets: np.ndarray,
    case_insensitive: bool,
    slope: float,
    intercept: float,
):
    """Chunks of sentences in parallel, each into its own region of the flat output.

    ``bounds`` are the cumulative upper bounds of each chunk's words, ``longest`` a bound on
    the words of one sentence.
    """
    n = len(offsets) - 1
    n_chunks = len(chunks) - 1
    rank_value = np.empty(longest, dtype=np.float64)  # only averaged ranks need another log
    for r in range(longest):
        rank_value[r] = intercept + slope * np.log10(1.0 + r)
    indices = np.empty(bounds[n_chunks], dtype=np.int32)
    values = np.empty(bounds[n_chunks], dtype=np.float32)
    row_nnz = np.zeros(n, dtype=np.int64)
    n_words = np.zeros(n, dtype=np.int64)
    n_invalid = np.zeros(n, dtype=np.int64)
    n_duplicate = np.zeros(n, dtype=np.int64)
    n_folded = np.zeros(n, dtype=np.int64)
    chunk_nnz = np.zeros(n_chunks, dtype=np.int64)
    for c in numba.prange(n_chunks):
        chunk_nnz[c] = _inverse_range(
            data,
            offsets,
            chunks[c],
            chunks[c + 1],
            max_words,
            table,
            folded_table,
            vdata,
            voffsets,
            case_insensitive,
            rank_value,
            slope,
            intercept,
            indices[bounds[c] : bounds[c + 1]],
            values[bounds[c] : bounds[c + 1]],
            row_nnz,
            n_words,
            n_invalid,
            n_duplicate,
            n_folded,
        )
    nnz = 0
    for c in range(n_chunks):
        nnz += chunk_nnz[c]
    out_indices = np.empty(nnz, dtype=np.int32)
    out_values = np.empty(nnz, dtype=np.float32)
    pos = 0
    for c in range(n_chunks):
        m = chunk_nnz[c]
        out_indices[pos : pos + m] = indices[bounds[c] : bounds[c] + m]
        out_values[pos : pos + m] = values[bounds[c] : bounds[c] + m]
        pos += m
    indptr = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        indptr[i + 1] = indptr[i] + row_nnz[i]
    return indptr, out_indices, out_values, n_words, n_invalid, n_duplicate, n_folded


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


@dataclass
class InverseResult:
    """Reconstructed expression and per-cell word counts.

    ``X`` is cells × vocabulary genes (CSR, float32, sorted indices). ``n_words`` counts every
    word considered (after ``max_words``), ``n_genes`` the distinct vocabulary genes placed
    (before any clipping; ``n_words = n_genes + n_invalid_genes + n_duplicate_genes``),
    ``n_invalid_genes`` the words that are not vocabulary genes, ``n_duplicate_genes`` the words
    repeating a gene placed earlier in the same sentence, and ``n_case_folded_genes`` the words
    that matched only after case folding (zeros unless case-insensitive).
    """

    X: sp.csr_matrix
    n_words: np.ndarray
    n_genes: np.ndarray
    n_invalid_genes: np.ndarray
    n_duplicate_genes: np.ndarray
    n_case_folded_genes: np.ndarray
    n_clipped: int = 0

    def obs(self) -> pd.DataFrame:
        """The per-cell counts as an ``obs``-ready frame (default integer index)."""
        return pd.DataFrame(
            {
                "n_words": self.n_words,
                "n_genes": self.n_genes,
                "n_invalid_genes": self.n_invalid_genes,
                "n_duplicate_genes": self.n_duplicate_genes,
                "n_case_folded_genes": self.n_case_folded_genes,
            }
        )


def sentences_to_expression(
    sentences: Sequence[str] | pa.Array | pa.ChunkedArray | SentenceBytes,
    vocab: Sequence[str] | VocabIndex,
    fit: RankExpressionFit,
    *,
    case_insensitive: bool = False,
    clip_negative: bool = False,
    max_words: int | None = None,
) -> InverseResult:
    """Turn cell sentences into an expression matrix over ``vocab``.

    Parameters
    ----------
    sentences
        Space-separated gene names, most expressed first (or a prepared ``SentenceBytes``).
    vocab
        The transform's genes (the columns of the result), or a prebuilt ``VocabIndex``.
    fit
        Slope and intercept of the transform's log-rank fit.
    case_insensitive
        Also match words whose ASCII letters differ in case from a gene (exact match first).
    clip_negative
        Set predicted values ≤ 0 to 0 and drop them (default: keep them, see module docstring).
    max_words
        Consider only the first ``max_words`` words of each sentence (e.g. the top-K genes).

    Examples
    --------
    >>> res = sentences_to_expression(["B A", "A x A"], ["A", "B"], RankExpressionFit(-1.0, 2.0))
    >>> res.X.toarray().astype(float).round(3).tolist()
    [[1.699, 2.0], [1.699, 0.0]]
    >>> res.n_invalid_genes.tolist(), res.n_duplicate_genes.tolist()
    ([0, 1], [0, 1])
    """
    index = vocab if isinstance(vocab, VocabIndex) else build_vocab_index(vocab)
    packed = sentences if isinstance(sentences, SentenceBytes) else sentence_bytes(sentences)
    if max_words is not None and max_words < 0:
        raise InputError(f"max_words must be ≥ 0, got {max_words}.")
    limit = -1 if max_words is None else int(max_words)
    data = np.ascontiguousarray(packed.data, dtype=np.uint8)
    offsets = np.ascontiguousarray(packed.offsets, dtype=np.int64)
    # Chunks of about equal bytes, a few per thread, so one long chunk does not hold up the rest.
    n_chunks = max(1, min(packed.n, 4 * numba.get_num_threads()))
    targets = np.linspace(offsets[0], offsets[-1], n_chunks + 1)
    chunks = np.unique(np.searchsorted(offsets, targets, side="left").clip(0, packed.n))
    chunks[0], chunks[-1] = 0, packed.n
    chunks = np.unique(chunks).astype(np.int64)
    if len(chunks) < 2:
        chunks = np.array([0, packed.n], dtype=np.int64)
    # Words ≤ separators + 1 per sentence; bytes ≤ 32 include every separator (one SIMD pass).
    bounds = np.zeros(len(chunks), dtype=np.int64)
    for c in range(len(chunks) - 1):
        a, b = offsets[chunks[c]], offsets[chunks[c + 1]]
        bounds[c + 1] = np.count_nonzero(data[a:b] <= 32) + chunks[c + 1] - chunks[c]
    np.cumsum(bounds, out=bounds)
    longest = int(np.diff(offsets).max()) // 2 + 1 if packed.n else 1
    if limit >= 0:
        longest = min(longest, limit + 1)
    indptr, indices, values, word_counts, n_invalid, n_dup, n_folded = _inverse_chunks(
        data,
        offsets,
        chunks,
        bounds,
        longest,
        limit,
        index.table,
        index.folded_table,
        index.data,
        index.offsets,
        bool(case_insensitive),
        float(fit.slope),
        float(fit.intercept),
    )
    X = sp.csr_matrix((values, indices, indptr), shape=(packed.n, index.n_genes))
    X.has_sorted_indices = True
    n_clipped = 0
    if clip_negative:
        negative = X.data <= 0
        n_clipped = int(negative.sum())
        if n_clipped:
            X.data[negative] = 0
            X.eliminate_zeros()
    return InverseResult(
        X=X,
        n_words=word_counts,
        n_genes=np.diff(indptr).astype(np.int64),
        n_invalid_genes=n_invalid,
        n_duplicate_genes=n_dup,
        n_case_folded_genes=n_folded,
        n_clipped=n_clipped,
    )


def expression_adata(result: InverseResult, obs: pd.DataFrame, vocab: Sequence[str], *,
                     case_insensitive: bool = False) -> ad.AnnData:
    """The reconstruction as an AnnData (cells x ``vocab``) with the per-cell word counts in
    ``obs`` after the given columns; cells without names are called ``cell_0``, ``cell_1``, ..."""
    counts = result.obs()
    if not case_insensitive:
        counts = counts.drop(columns="n_case_folded_genes")
    counts.index = obs.index
    # The word counts describe the sentences: they replace same-named columns of ``obs``.
    frame = pd.concat([obs.drop(columns=counts.columns, errors="ignore"), counts], axis=1)
    if isinstance(frame.index, pd.RangeIndex):
        frame.index = pd.Index([f"cell_{i}" for i in range(len(frame))])
    frame.index = frame.index.astype(str)
    adata = ad.AnnData(X=result.X, obs=frame, var=pd.DataFrame(index=pd.Index(list(vocab), dtype=str)))
    if not adata.obs_names.is_unique:
        logger.warning("Cell names are not unique; made them unique by appending -1, -2, ...")
        adata.obs_names_make_unique()
    return adata


def sentences_to_adata(
    sentences: Sequence[str] | pa.Array | pa.ChunkedArray,
    vocab: Sequence[str],
    fit: RankExpressionFit,
    *,
    cell_names: Sequence[str] | None = None,
    obs: pd.DataFrame | None = None,
    max_genes: int | None = None,
    clip_negative: bool = False,
    case_insensitive: bool = False,
) -> ad.AnnData:
    """Cell sentences -> an expression AnnData over ``vocab`` (the inverse of the transform).

    ``vocab`` and ``fit`` come from the transform: ``CellSentences.genes`` and ``.fit`` in a
    notebook, or ``load_vocab`` / ``load_transform_fit`` on a transform's output folder.
    ``obs`` (one row per sentence) or ``cell_names`` name the cells; ``max_genes`` uses the
    first K words only. X holds log10(1 + expression) predicted from each gene's rank.

    >>> a = sentences_to_adata(["B A"], ["A", "B"], RankExpressionFit(-1.0, 2.0), cell_names=["c1"])
    >>> a.X.toarray().astype(float).round(3).tolist(), a.obs_names.tolist(), a.obs["n_genes"].tolist()
    ([[1.699, 2.0]], ['c1'], [2])
    """
    result = sentences_to_expression(sentences, vocab, fit, case_insensitive=case_insensitive,
                                     clip_negative=clip_negative, max_words=max_genes)
    n = len(result.n_words)
    if isinstance(cell_names, str):
        raise InputError(f"cell_names must be a list of names, not one string ({cell_names[:40]!r}).")
    if obs is None:
        obs = pd.DataFrame(index=pd.RangeIndex(n) if cell_names is None else pd.Index(list(cell_names), dtype=str))
    if len(obs) != n:
        raise InputError(f"{len(obs)} cell names or obs rows were given for {n} sentences.")
    return expression_adata(result, obs, vocab, case_insensitive=case_insensitive)
