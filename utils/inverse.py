"""Cell sentences -> expression: the gene at rank ``r`` (0 = first word) gets the transform's
``intercept + slope·log10(1 + r)``, absent genes 0 (non-genes keep their place, repeats get their mean rank)."""

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
import pyarrow.compute as pc
import scipy.sparse as sp

from utils.cli import InputError
from utils.transform.fit import RankExpressionFit

logger = logging.getLogger("cell2sentence")

__all__ = [
    "InverseResult", "expression_adata", "sentences_to_adata", "SentenceBytes", "VocabIndex", "build_vocab_index",
    "load_transform_fit", "load_vocab", "read_sentence_file", "sentence_bytes", "sentences_to_expression",
    "zero_crossing_rank",
]


def zero_crossing_rank(fit: RankExpressionFit) -> float:
    """First (fractional) rank at which the fit predicts a value ≤ 0 (inf when it never does).

    >>> zero_crossing_rank(RankExpressionFit(slope=-1.0, intercept=2.0))
    99.0
    """
    if fit.slope >= 0:
        return float("inf") if fit.intercept > 0 else 0.0
    return float(10.0 ** (-fit.intercept / fit.slope) - 1.0)


def load_transform_fit(path: Path) -> RankExpressionFit:
    """The line of ``eval/transformation_metrics.csv`` (first row), with the scores the file has."""
    if not path.is_file():
        raise InputError(f"{path} does not exist; run transform.py first or point --transform_dir at its output.")
    table = pd.read_csv(path)
    missing = {"slope", "intercept"} - set(table.columns)
    if missing or table.empty:
        raise InputError(f"{path} has no slope/intercept row (missing columns: {sorted(missing)}); "
                         "re-run transform.py to write it.")
    row = table.iloc[0]
    slope, intercept = float(row["slope"]), float(row["intercept"])
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise InputError(f"{path} holds a non-finite slope or intercept; re-run transform.py.")
    if slope >= 0:
        logger.warning("The fitted slope %.4g is not negative: reconstructed values will not decrease with rank.",
                       slope)
    scores = {k: (int(row[k]) if k == "n_points" else float(row[k]))
              for k in RankExpressionFit.__dataclass_fields__ if k in row.index and k not in ("slope", "intercept")}
    return RankExpressionFit(slope=slope, intercept=intercept, **scores)


def load_vocab(path: Path) -> list[str]:
    """Gene names of ``cell_sentences/vocab.txt`` (``GENE count`` per line), in file order."""
    if not path.is_file():
        raise InputError(f"{path} does not exist; run transform.py first or point --transform_dir at its output.")
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
    """Pack sentences (strings or an Arrow string column, without a copy) into one buffer; nulls are empty."""
    if isinstance(sentences, str | bytes):
        raise InputError(f"Sentences must be a list of sentences, not one string ({sentences[:40]!r}); wrap it in a "
                         "list for one cell.")
    if isinstance(sentences, pa.ChunkedArray):
        sentences = sentences.combine_chunks() if sentences.num_chunks else pa.array([], pa.string())
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
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return SentenceBytes(data=data, offsets=np.ascontiguousarray(offsets))


def read_sentence_file(path: Path) -> SentenceBytes:
    """A one-sentence-per-line text file as a byte buffer (every line, empty ones included, is a sentence)."""
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        return SentenceBytes(data=data, offsets=np.zeros(1, np.int64))
    newlines = np.flatnonzero(data == ord("\n")).astype(np.int64)
    ends = newlines if data[-1] == ord("\n") else np.append(newlines, data.size)
    # Sentence i starts at the previous line's end: its extra first byte is the newline, a separator.
    offsets = np.concatenate([[0], ends]).astype(np.int64)
    return SentenceBytes(data=data, offsets=offsets)


@dataclass(frozen=True)
class VocabIndex:
    """The vocabulary as Arrow lookup sets: the names, each distinct ASCII-folded name and its first gene."""

    genes: tuple[str, ...]
    names: pa.Array  # large_string, one per gene
    folded: pa.Array  # large_string, distinct folded names
    folded_genes: np.ndarray  # int64, the gene of each folded name


def build_vocab_index(genes: Sequence[str]) -> VocabIndex:
    """Index the vocabulary once for many calls (names differing only by case fold to the first)."""
    genes = tuple(str(g) for g in genes)
    if len(set(genes)) != len(genes):
        raise InputError("The vocabulary lists a gene more than once.")
    names = pa.array(genes, type=pa.large_string())
    first: dict[str, int] = {}
    for g, name in enumerate(pc.ascii_lower(names).to_pylist()):
        first.setdefault(name, g)
    if len(first) < len(genes):
        logger.warning("%d vocabulary genes differ from another only by letter case; under case-insensitive "
                       "matching they map to the first of them.", len(genes) - len(first))
    return VocabIndex(genes=genes, names=names, folded=pa.array(list(first), type=pa.large_string()),
                      folded_genes=np.fromiter(first.values(), dtype=np.int64, count=len(first)))


def _lookup(words: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Position of each word in ``value_set``, -1 where it is not there."""
    return pc.index_in(words, value_set=value_set).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


@numba.njit(cache=True)
def _rows(genes: np.ndarray, folded: np.ndarray, is_word: np.ndarray, word_offsets: np.ndarray, max_words: int,
          n_vocab: int, slope: float, intercept: float):
    """Per sentence (gene ids or -1), within its first ``max_words`` words (-1: all): its CSR row, each
    gene at its average rank, and its word counts."""
    n = len(word_offsets) - 1
    indptr = np.zeros(n + 1, dtype=np.int64)
    indices = np.empty(len(genes), dtype=np.int32)
    values = np.empty(len(genes), dtype=np.float32)
    n_words, n_invalid = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    n_duplicate, n_folded = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    count = np.zeros(n_vocab, dtype=np.int64)  # back to 0 after each row
    rank_sum = np.zeros(n_vocab, dtype=np.float64)
    out = 0
    for i in range(n):
        row = out
        rank = 0
        for j in range(word_offsets[i], word_offsets[i + 1]):
            if not is_word[j]:
                continue
            if rank == max_words:
                break
            g = genes[j]
            if g < 0:
                n_invalid[i] += 1
            else:
                n_folded[i] += folded[j]
                if count[g] == 0:
                    indices[out] = g
                    out += 1
                    rank_sum[g] = 0.0
                count[g] += 1
                rank_sum[g] += rank
            rank += 1
        n_words[i] = rank
        indices[row:out].sort()
        for t in range(row, out):
            g = indices[t]
            values[t] = intercept + slope * np.log10(1.0 + rank_sum[g] / count[g])
            n_duplicate[i] += count[g] - 1
            count[g] = 0
        indptr[i + 1] = out
    return indptr, indices[:out], values[:out], n_words, n_invalid, n_duplicate, n_folded


@dataclass
class InverseResult:
    """Expression (cells × vocabulary genes, CSR float32) and per-cell word counts:
    ``n_words = n_genes + n_invalid_genes + n_duplicate_genes`` (``n_genes`` before clipping)."""

    X: sp.csr_matrix
    n_words: np.ndarray
    n_genes: np.ndarray
    n_invalid_genes: np.ndarray
    n_duplicate_genes: np.ndarray
    n_case_folded_genes: np.ndarray
    n_clipped: int = 0


def sentences_to_expression(sentences: Sequence[str] | pa.Array | pa.ChunkedArray | SentenceBytes,
                            vocab: Sequence[str] | VocabIndex, fit: RankExpressionFit, *,
                            case_insensitive: bool = False, clip_negative: bool = False,
                            max_words: int | None = None) -> InverseResult:
    """Cell sentences -> expression over ``vocab`` (genes or a ``VocabIndex``) with ``fit``'s line;
    ``case_insensitive``: exact match first, then ASCII case-folded; ``clip_negative``: drop values ≤ 0.

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
    offsets = np.ascontiguousarray(packed.offsets, dtype=np.int64)
    column = pa.LargeStringArray.from_buffers(
        packed.n, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(packed.data, dtype=np.uint8)))
    # Words are separated by ASCII whitespace (space, \t-\r); separators at either end leave empty words.
    split = pc.ascii_split_whitespace(column)
    words = pc.list_flatten(split)
    genes = _lookup(words, index.names)
    folded = np.zeros(len(genes), dtype=np.bool_)
    if case_insensitive:
        in_folded = _lookup(pc.ascii_lower(words), index.folded)
        folded = (genes < 0) & (in_folded >= 0)
        genes[folded] = index.folded_genes[in_folded[folded]]
    is_word = np.array(pc.greater(pc.binary_length(words), 0))
    indptr, indices, values, word_counts, n_invalid, n_dup, n_folded = _rows(
        genes, folded, is_word, split.offsets.to_numpy(), -1 if max_words is None else int(max_words),
        len(index.genes), float(fit.slope), float(fit.intercept))
    X = sp.csr_matrix((values, indices, indptr), shape=(packed.n, len(index.genes)))
    X.has_sorted_indices = True
    n_clipped = 0
    if clip_negative:
        negative = X.data <= 0
        n_clipped = int(negative.sum())
        if n_clipped:
            X.data[negative] = 0
            X.eliminate_zeros()
    return InverseResult(X=X, n_words=word_counts, n_genes=np.diff(indptr).astype(np.int64), n_invalid_genes=n_invalid,
                         n_duplicate_genes=n_dup, n_case_folded_genes=n_folded, n_clipped=n_clipped)


def expression_adata(result: InverseResult, obs: pd.DataFrame, vocab: Sequence[str], *,
                     case_insensitive: bool = False) -> ad.AnnData:
    """The reconstruction as an AnnData (cells x ``vocab``), the word counts in ``obs`` after the given
    columns; cells without names are called ``cell_0``, ``cell_1``, ..."""
    counts = pd.DataFrame({"n_words": result.n_words, "n_genes": result.n_genes,
                           "n_invalid_genes": result.n_invalid_genes, "n_duplicate_genes": result.n_duplicate_genes,
                           **({"n_case_folded_genes": result.n_case_folded_genes} if case_insensitive else {})},
                          index=obs.index)
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


def sentences_to_adata(sentences: Sequence[str] | pa.Array | pa.ChunkedArray, vocab: Sequence[str],
                       fit: RankExpressionFit, *, cell_names: Sequence[str] | None = None,
                       obs: pd.DataFrame | None = None, max_genes: int | None = None,
                       clip_negative: bool = False, case_insensitive: bool = False) -> ad.AnnData:
    """Cell sentences -> an expression AnnData over ``vocab`` (``CellSentences.genes`` and ``.fit``, or
    ``load_vocab``/``load_transform_fit``); ``obs`` or ``cell_names`` name the cells.

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
