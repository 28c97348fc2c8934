"""Sentence order: highest first, zeros absent, seeded reproducible tie-breaking."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
from reference import log10_normalized, rank_genes, sentence_chunk, sentences_from_ranking

from utils.transform.preprocess import Normalization
from utils.transform.ranking import GeneNameTable

GENES = ["A", "B", "C", "D", "E"]


@pytest.mark.parametrize("kind", ["dense_int", "dense_float", "sparse_int", "sparse_float"])
def test_highest_first_and_zeros_absent(kind):
    values = np.array([[0, 3, 1, 7, 0], [2.5, 0, 0, 0.5, 9.25], [0, 0, 0, 0, 0]])
    if kind.endswith("int"):
        values = np.array([[0, 3, 1, 7, 0], [2, 0, 0, 1, 9], [0, 0, 0, 0, 0]])
    matrix = sp.csr_matrix(values) if kind.startswith("sparse") else values
    ranked = rank_genes(matrix, seed=0)
    assert sentences_from_ranking(ranked, GENES) == ["D B C", "E A D", ""]


def test_explicit_zeros_are_not_expressed():
    matrix = sp.csr_matrix((np.array([0.0, 4.0, 1.0]), np.array([0, 1, 2]), np.array([0, 3])), shape=(1, 3))
    assert rank_genes(matrix)[0].tolist() == [1, 2]


def test_ties_reproducible_with_seed_and_different_across_seeds():
    row = np.ones((1, 40))
    row[0, 7] = 5.0
    first = rank_genes(row, seed=11)[0]
    assert first[0] == 7  # the only non-tied gene stays on top
    assert np.array_equal(first, rank_genes(row, seed=11)[0])
    assert not np.array_equal(first, rank_genes(row, seed=12)[0])
    assert sorted(first.tolist()) == list(range(40))


def test_tie_breaking_is_uniform():
    # 3 tied genes in 6,000 cells: each of the 6 orders should come up about 1,000 times.
    ranked = rank_genes(np.ones((6000, 3)), seed=3)
    counts = Counter(tuple(r.tolist()) for r in ranked)
    assert set(counts) == set(itertools.permutations(range(3)))
    assert all(850 < c < 1150 for c in counts.values()), counts


def test_order_depends_on_cell_id_not_on_chunking():
    rng = np.random.default_rng(0)
    matrix = sp.csr_matrix(rng.poisson(0.8, size=(50, 30)).astype(np.float32))
    whole = rank_genes(matrix, seed=5)
    for start, stop in [(0, 17), (17, 18), (18, 50)]:
        part = rank_genes(matrix[start:stop], seed=5, cell_ids=np.arange(start, stop))
        for a, b in zip(part, whole[start:stop], strict=True):
            assert np.array_equal(a, b)


def test_max_genes_keeps_the_top():
    ranked = rank_genes(np.array([[1, 5, 3, 4, 2]]), max_genes=2)
    assert ranked[0].tolist() == [1, 3]


@pytest.mark.parametrize("max_genes", [None, 3])
def test_sentence_chunk_matches_python_join(max_genes):
    rng = np.random.default_rng(1)
    counts = rng.poisson(1.0, size=(20, 6)).astype(np.float32)
    counts[5] = 0  # a kept cell whose genes were all removed gets an empty sentence
    counts[5, 2] = 4
    matrix = sp.csr_matrix(counts)
    names = ["CD3E", "ENSG00000123456.15-LONG", "HLA-DRA", "é-gene", "X", "DROPPED"]  # one over 16 bytes
    gene_position = np.array([0, 1, -1, 2, 3, -1], np.int32)  # genes 2 and 5 removed by QC
    kept_names = [names[0], names[1], names[3], names[4]]
    row_split = np.array([0, 1, 2, -1] * 5, np.int8)  # every 4th cell removed by QC
    row_eval = np.arange(20) % 3 == 0
    chunk = sentence_chunk(
        matrix.indptr, matrix.indices, matrix.data, row_split=row_split, row_eval=row_eval,
        cell_ids=np.arange(100, 120), gene_position=gene_position,
        names=GeneNameTable(kept_names), normalization=Normalization("counts"), seed=2, max_genes=max_genes,
    )  # fmt: skip

    kept = np.flatnonzero(row_split >= 0)
    filtered = matrix[kept][:, [0, 1, 3, 4]]
    filtered.eliminate_zeros()
    ranked = rank_genes(filtered, seed=2, cell_ids=kept + 100, max_genes=max_genes)
    expected = sentences_from_ranking(ranked, kept_names)
    assert chunk.kept.tolist() == kept.tolist()
    for split in range(3):
        lines = [expected[i] for i in np.flatnonzero(row_split[kept] == split)]
        assert chunk.text[split].tobytes().decode() == "".join(line + "\n" for line in lines)
        arrow = pa.StringArray.from_buffers(
            len(lines), pa.py_buffer(chunk.arrow_offsets[split]), pa.py_buffer(chunk.arrow_text[split]))
        assert arrow.to_pylist() == lines
    assert expected[kept.tolist().index(5)] == ""
    # The preprocessed rows, gene counts and evaluation points.
    assert np.array_equal(chunk.indptr, filtered.indptr)
    assert np.array_equal(chunk.indices, filtered.indices)
    np.testing.assert_array_equal(chunk.data, log10_normalized(filtered, input_kind="counts", log1p_base=None))
    assert chunk.gene_cells.tolist() == np.bincount(filtered.indices, minlength=4).tolist()
    full = rank_genes(filtered, seed=2, cell_ids=kept + 100)
    eval_rows = np.flatnonzero(row_eval[kept])
    assert chunk.eval_log_rank.tolist() == [
        np.float32(np.log10(1.0 + k)) for r in eval_rows for k in range(len(full[r]))]
    logged = sp.csr_matrix((chunk.data, chunk.indices, chunk.indptr), shape=filtered.shape).toarray()
    expected_points = [logged[r, g] for r in eval_rows for g in full[r]]
    np.testing.assert_array_equal(chunk.eval_log_expression, np.array(expected_points, np.float32))
