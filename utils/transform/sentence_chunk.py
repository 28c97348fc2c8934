"""Pass 2 of the transform on one chunk of rows, as compiled kernels that release the GIL: per kept
cell, drop the genes QC removed, normalize, rank, and write the sentence as a text line and as an
Arrow string into per-split byte buffers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from numba import njit

from utils.transform.preprocess import Normalization, normalize_row
from utils.transform.ranking import (
    GeneNameTable,
    _copy16,
    cell_key,
    copy_bytes,
    rank_row,
    rank_workspace,
    seed_key,
)

N_SPLITS = 3
TEXT_SLACK = 16  # bytes the text kernel may write past each split's text (16-byte copies)


@dataclass
class SentenceChunk:
    """What pass 2 makes of one chunk (kept cells, input order); rows and text are None once written."""

    kept: np.ndarray | None = None  # chunk-local row of each kept cell
    indptr: np.ndarray | None = None  # the preprocessed rows: kept genes, log10(1 + normalized) values
    indices: np.ndarray | None = None  # int32 kept-gene positions
    data: np.ndarray | None = None  # float32
    gene_cells: np.ndarray | None = None  # per kept gene: cells of the chunk expressing it
    text: list[np.ndarray] | None = None  # per split: the lines of its text file, newlines included
    arrow_offsets: list[np.ndarray] | None = None  # per split: int32 offsets of the sentences in arrow_text
    arrow_text: list[np.ndarray] | None = None  # per split: the sentences without newlines, back to back
    eval_log_rank: np.ndarray | None = None  # log10(1 + rank), rank from 0, of every gene of the eval cells
    eval_log_expression: np.ndarray | None = None

    def strings(self, split: int) -> pa.StringArray:
        """The sentences of ``split`` as Arrow strings (no copy)."""
        offsets = self.arrow_offsets[split]
        return pa.StringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets),
                                           pa.py_buffer(self.arrow_text[split]))


@njit(cache=True, nogil=True)
def _rank_kernel(indptr, indices, data, row_split, row_eval, cell_ids, gene_position,
                 n_kept_genes, normalization, seed, max_genes, name_lengths, out_indices, out_data):
    n_rows = indptr.shape[0] - 1
    nnz = indptr[n_rows] - indptr[0]
    widest = 1
    n_kept = 0
    eval_capacity = 0
    for r in range(n_rows):
        widest = max(widest, indptr[r + 1] - indptr[r])
        if row_split[r] >= 0:
            n_kept += 1
            if row_eval[r]:
                eval_capacity += indptr[r + 1] - indptr[r]
    values = np.empty(widest, np.float32)
    genes = np.empty(widest, np.int32)
    workspace = rank_workspace(widest)
    key = seed_key(seed)

    kept = np.empty(n_kept, np.int64)
    out_indptr = np.zeros(n_kept + 1, np.int64)
    ranked = np.empty(nnz, np.int32)  # kept-gene positions in rank order, per kept cell
    line_bytes = np.empty(n_kept, np.int64)
    gene_cells = np.zeros(n_kept_genes, np.int64)
    eval_log_rank = np.empty(eval_capacity, np.float32)
    eval_log_expression = np.empty(eval_capacity, np.float32)
    n_eval = 0

    # Per cell: filter, normalize, rank, and count what the text will need.
    i = 0
    for r in range(n_rows):
        if row_split[r] < 0:
            continue
        n = 0
        for j in range(indptr[r] - indptr[0], indptr[r + 1] - indptr[0]):
            g = gene_position[indices[j]]
            if g >= 0 and data[j] != 0:
                genes[n] = g
                values[n] = data[j]
                n += 1
        base = out_indptr[i]
        normalize_row(values, n, out_data[base:], normalization)
        for k in range(n):
            out_indices[base + k] = genes[k]
            gene_cells[genes[k]] += 1
        order = rank_row(values[:n], cell_key(key, cell_ids[r]), workspace)
        length = 0
        for k in range(n):
            g = genes[order[k]]
            ranked[base + k] = g
            if k < max_genes:
                length += name_lengths[g] + 1  # the name and a space (the last becomes "\n")
        line_bytes[i] = max(length, 1)
        if row_eval[r]:
            for k in range(n):
                eval_log_rank[n_eval] = np.log10(1.0 + k)
                eval_log_expression[n_eval] = out_data[base + order[k]]
                n_eval += 1
        kept[i] = r
        out_indptr[i + 1] = base + n
        i += 1

    # The size of each split's text: lines of a split are back to back, in input order.
    split_lines = np.zeros(N_SPLITS + 1, np.int64)
    split_bytes = np.zeros(N_SPLITS + 1, np.int64)
    for i in range(n_kept):
        s = row_split[kept[i]]
        split_lines[s + 1] += 1
        split_bytes[s + 1] += line_bytes[i]
    for s in range(N_SPLITS):
        split_lines[s + 1] += split_lines[s]
        split_bytes[s + 1] += split_bytes[s]
    return (kept, out_indptr, out_indices[: out_indptr[n_kept]], out_data[: out_indptr[n_kept]],
            gene_cells, ranked, line_bytes, split_bytes, split_lines,
            eval_log_rank[:n_eval], eval_log_expression[:n_eval])


@njit(cache=True, nogil=True)
def _text_kernel(kept, row_split, out_indptr, ranked, line_bytes, split_bytes, split_lines, max_genes,
                 name_lengths, name_slots, name_buffer, name_offsets, text, text_start):
    """Write each split's lines into ``text`` from ``text_start[split]`` on, and the Arrow strings
    (the lines without their newlines) back to back."""
    n_kept = kept.shape[0]
    arrow_text = np.empty(split_bytes[N_SPLITS] - n_kept + TEXT_SLACK, np.uint8)
    arrow_offsets = np.empty(n_kept + N_SPLITS, np.int32)  # per split: its lines + 1
    for s in range(N_SPLITS):
        pos = text_start[s]
        arrow_start = split_bytes[s] - split_lines[s]  # each earlier line had a newline
        line = split_lines[s]
        arrow_offsets[line + s] = 0
        for i in range(n_kept):
            if row_split[kept[i]] != s:
                continue
            line_start = pos
            for j in range(out_indptr[i], min(out_indptr[i + 1], out_indptr[i] + max_genes)):
                # Inlined by hand: a helper call per gene costs 20x the copy (array refcounts).
                g = ranked[j]
                length = name_lengths[g]
                if length < 16:
                    _copy16(text, pos, name_slots, g * 16)  # the name, a space, and padding
                else:
                    for b in range(length):
                        text[pos + b] = name_buffer[name_offsets[g] + b]
                    text[pos + length] = 32  # space
                pos += length + 1
            pos = line_start + line_bytes[i]
            text[pos - 1] = 10  # the last space becomes the newline
            arrow_pos = arrow_start + arrow_offsets[line + s]
            copy_bytes(arrow_text, arrow_pos, text, line_start, line_bytes[i] - 1)
            line += 1
            arrow_offsets[line + s] = arrow_pos + line_bytes[i] - 1 - arrow_start
    return arrow_text, arrow_offsets


@dataclass
class RankedChunk:
    """A chunk's cells filtered, normalized and ranked (``rank_chunk``), for ``write_text``."""

    kept: np.ndarray
    row_split: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    gene_cells: np.ndarray
    ranked: np.ndarray
    line_bytes: np.ndarray
    split_bytes: np.ndarray
    split_lines: np.ndarray
    eval_log_rank: np.ndarray
    eval_log_expression: np.ndarray
    limit: int


def rank_chunk(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, *, row_split: np.ndarray,
               row_eval: np.ndarray, cell_ids: np.ndarray, gene_position: np.ndarray, names: GeneNameTable,
               normalization: Normalization, seed: int, max_genes: int | None,
               out_arrays: tuple[np.ndarray, np.ndarray] | None = None) -> RankedChunk:
    """Filter, normalize and rank the kept cells of one canonical CSR chunk (``indptr`` may start above 0).

    Per row: ``row_split`` 0 train, 1 valid, 2 test or -1 (removed); ``row_eval`` whether it feeds the
    fit; ``cell_ids`` its input index (seeds the tie-breaking). ``gene_position``: per input gene, its
    kept position or -1. ``out_arrays``: int32 and float32 arrays of at least the chunk's stored
    entries for the preprocessed rows (None: allocated here).
    """
    limit = np.iinfo(np.int32).max if max_genes is None else int(max_genes)
    nnz = int(indptr[-1] - indptr[0])
    if out_arrays is None:
        out_arrays = (np.empty(nnz, np.int32), np.empty(nnz, np.float32))
    if min(len(a) for a in out_arrays) < nnz:
        raise ValueError("out_arrays are shorter than the chunk's stored entries")
    row_split = np.asarray(row_split, np.int8)
    (kept, out_indptr, out_indices, out_data, gene_cells, ranked, line_bytes, split_bytes, split_lines,
     eval_log_rank, eval_log_expression) = _rank_kernel(
        np.asarray(indptr, np.int64), indices, data, row_split,
        np.asarray(row_eval, np.bool_), np.asarray(cell_ids, np.int64), gene_position,
        len(names.lengths), normalization.kernel_args(), np.uint64(seed), limit,
        names.lengths, out_arrays[0], out_arrays[1],
    )  # fmt: skip
    if split_bytes[-1] >= np.iinfo(np.int32).max:
        raise ValueError("A chunk's sentences exceed 2 GB; use a smaller --chunk_size.")
    return RankedChunk(kept, row_split, out_indptr, out_indices, out_data, gene_cells, ranked, line_bytes,
                       split_bytes, split_lines, eval_log_rank, eval_log_expression, limit)


def write_text(ranked: RankedChunk, names: GeneNameTable) -> SentenceChunk:
    """The sentences of a ranked chunk: each split's lines in one buffer and as Arrow strings."""
    sizes = np.diff(ranked.split_bytes)
    text_start = np.concatenate([[0], np.cumsum(sizes + TEXT_SLACK)[:-1]]).astype(np.int64)
    text = np.empty(int(sizes.sum()) + N_SPLITS * TEXT_SLACK, np.uint8)
    r = ranked
    arrow_text, arrow_offsets = _text_kernel(
        r.kept, r.row_split, r.indptr, r.ranked, r.line_bytes, r.split_bytes, r.split_lines, r.limit,
        names.lengths, names.slots, names.buffer, names.offsets, text, text_start,
    )  # fmt: skip
    return SentenceChunk(
        kept=r.kept, indptr=r.indptr, indices=r.indices, data=r.data, gene_cells=r.gene_cells,
        text=[text[text_start[s] : text_start[s] + sizes[s]] for s in range(N_SPLITS)],
        arrow_offsets=[arrow_offsets[r.split_lines[s] + s : r.split_lines[s + 1] + s + 1] for s in range(N_SPLITS)],
        arrow_text=[arrow_text[r.split_bytes[s] - r.split_lines[s] : r.split_bytes[s + 1] - r.split_lines[s + 1]]
                    for s in range(N_SPLITS)],
        eval_log_rank=r.eval_log_rank, eval_log_expression=r.eval_log_expression,
    )
