"""transform.py over several input files (or a folder of them): genes matched by name, a
dataset column, one input kind, QC over all cells together."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from helpers import synthetic_counts, write_h5ad

import transform
from utils.cli import InputError
from utils.transform.readers import ConcatenatedSource, open_source, sort_rows

FLAGS = ["--min_genes_per_cell", "20", "--max_genes_per_cell", "1000", "--eval_cells", "100", "--chunk_size", "37"]


def run(inputs: list[Path], out: Path, *extra: str) -> dict:
    return transform.main(transform.parse_args(["--data_filepath", *map(str, inputs), "--output_dir", str(out),
                                                *FLAGS, *extra]))


def two_files(tmp_path: Path) -> tuple[ad.AnnData, ad.AnnData]:
    """Two inputs whose genes overlap in part and come in different orders."""
    a = synthetic_counts(90, 120, seed=3)
    b = synthetic_counts(70, 120, seed=4)
    b.obs_names = [f"b{name}" for name in b.obs_names]
    a = a[:, a.var_names[:100]].copy()  # GENE0095.. only in b
    rng = np.random.default_rng(0)
    b = b[:, rng.permutation(b.var_names[20:])].copy()  # MT- and GENE0000.. only in a, shuffled
    (tmp_path / "in").mkdir()
    write_h5ad(a, tmp_path / "in" / "alpha.h5ad")
    write_h5ad(b, tmp_path / "in" / "beta.h5ad")
    return a, b


def sentences(out: Path) -> dict[str, list[str]]:
    return {s: (out / "cell_sentences" / f"{s}.txt").read_text().splitlines() for s in ("train", "valid", "test")}


def test_two_files_equal_their_outer_concatenation(tmp_path):
    a, b = two_files(tmp_path)
    run([tmp_path / "in" / "alpha.h5ad", tmp_path / "in" / "beta.h5ad"], tmp_path / "multi")

    # The same cells as one file: anndata's outer join, genes in first-seen order.
    union = list(dict.fromkeys([*a.var_names, *b.var_names]))
    joined = ad.concat([a, b], join="outer", label="dataset", keys=["alpha", "beta"])[:, union].copy()
    joined.X = sp.csr_matrix(joined.X)
    write_h5ad(joined, tmp_path / "joined.h5ad")
    run([tmp_path / "joined.h5ad"], tmp_path / "one", "--obs_columns", "dataset")

    ours, theirs = sentences(tmp_path / "multi"), sentences(tmp_path / "one")
    assert ours == theirs and len(ours["train"]) > 50
    assert (tmp_path / "multi" / "cell_sentences" / "vocab.txt").read_text() == \
        (tmp_path / "one" / "cell_sentences" / "vocab.txt").read_text()
    hf = datasets.load_from_disk(str(tmp_path / "multi" / "cell_sentences_hf"))
    rows = pd.concat([hf[s].to_pandas() for s in hf])
    expected = np.where(rows.cell_name.str.startswith("b"), "beta", "alpha")
    assert rows.dataset.tolist() == expected.tolist() and set(expected) == {"alpha", "beta"}
    pre = ad.read_h5ad(tmp_path / "multi" / "combined_preprocessed.h5ad")
    assert pre.obs["dataset"].astype(str).tolist() == \
        np.where(pre.obs_names.str.startswith("b"), "beta", "alpha").tolist()
    # Genes only one file has are in the vocabulary: matched by name, not by position.
    assert {"MT-0", "GENE0100"} <= set(pre.var_names)
    assert json.loads((tmp_path / "multi" / "transform_args.json").read_text())["data_filepath"] == \
        [str(tmp_path / "in" / "alpha.h5ad"), str(tmp_path / "in" / "beta.h5ad")]


def _stored_messily(X: sp.csr_matrix, seed: int) -> sp.csr_matrix:
    """X with each row's entries shuffled, its first value split in two stored entries and an
    explicit zero for a gene it lacks (as files subset by columns or made by hand hold them)."""
    rng = np.random.default_rng(seed)
    indices, data, indptr = [], [], [0]
    for r in range(X.shape[0]):
        genes, values = X.indices[X.indptr[r] : X.indptr[r + 1]], X.data[X.indptr[r] : X.indptr[r + 1]]
        order = rng.permutation(len(genes))
        g, v = genes[order], values[order]
        absent = np.setdiff1d(np.arange(X.shape[1]), genes)[:1]
        if len(g):
            indices += [*g, g[0]]
            data += [v[0] / 2, *v[1:], v[0] / 2]
        indices += [*absent]
        data += [0.0] * len(absent)
        indptr.append(len(indices))
    return sp.csr_matrix((np.array(data, np.float32), np.array(indices), np.array(indptr)), shape=X.shape)


def test_files_stored_unsorted_give_the_same_sentences(tmp_path):
    a, b = two_files(tmp_path)
    run([tmp_path / "in" / "alpha.h5ad", tmp_path / "in" / "beta.h5ad"], tmp_path / "clean")
    (tmp_path / "messy").mkdir()
    for name, cells, seed in (("alpha", a, 1), ("beta", b, 2)):  # genes in the union's order, then not
        messy = ad.AnnData(X=_stored_messily(cells.X.tocsr(), seed), obs=cells.obs, var=cells.var)
        assert not messy.X.has_canonical_format
        write_h5ad(messy, tmp_path / "messy" / f"{name}.h5ad")
    run([tmp_path / "messy" / "alpha.h5ad", tmp_path / "messy" / "beta.h5ad"], tmp_path / "out")
    assert sentences(tmp_path / "out") == sentences(tmp_path / "clean")
    clean = ad.read_h5ad(tmp_path / "clean" / "combined_preprocessed.h5ad")
    out = ad.read_h5ad(tmp_path / "out" / "combined_preprocessed.h5ad")
    assert out.X.has_canonical_format and (out.X != clean.X).nnz == 0


def test_a_folder_is_its_sorted_h5ad_files(tmp_path):
    two_files(tmp_path)
    (tmp_path / "in" / "notes.txt").write_text("not an input")
    run([tmp_path / "in"], tmp_path / "folder")
    run([tmp_path / "in" / "alpha.h5ad", tmp_path / "in" / "beta.h5ad"], tmp_path / "files")
    assert sentences(tmp_path / "folder") == sentences(tmp_path / "files")
    assert (tmp_path / "folder" / "in_preprocessed.h5ad").is_file()


def test_chunks_spanning_files_are_remapped_rows(tmp_path):
    a, b = two_files(tmp_path)
    sources = [open_source(tmp_path / "in" / n) for n in ("alpha.h5ad", "beta.h5ad")]
    joined = ConcatenatedSource(sources, [s.var.index.to_numpy(dtype=object) for s in sources], path=tmp_path)
    chunk = joined.read_rows(80, 100)  # 10 cells of each file
    assert chunk.has_canonical_format
    union = joined.var.index
    expected = pd.concat([a[80:].to_df(), b[:10].to_df()]).reindex(columns=union, fill_value=0.0).fillna(0.0)
    np.testing.assert_array_equal(chunk.toarray(), expected.to_numpy())
    assert joined.obs["dataset"].value_counts().to_dict() == {"alpha": 90, "beta": 70}


def test_different_input_kinds_are_one_sentence(tmp_path, caplog):
    a, b = two_files(tmp_path)
    logged = b.copy()
    logged.X = logged.X.log1p()
    logged.uns["log1p"] = {"base": None}
    write_h5ad(logged, tmp_path / "in" / "beta.h5ad")
    inputs = [tmp_path / "in" / "alpha.h5ad", tmp_path / "in" / "beta.h5ad"]
    with pytest.raises(InputError) as err:
        run(inputs, tmp_path / "out")
    message = str(err.value)
    assert "alpha.h5ad" in message and "beta.h5ad" in message and "--input_kind" in message
    assert message.count(". ") == 0 and message.endswith(".")
    assert not (tmp_path / "out" / "cell_sentences").exists()
    run(inputs, tmp_path / "out", "--input_kind", "counts")  # asked for: read them all as counts
    assert sentences(tmp_path / "out")["train"]


def test_qc_counts_all_cells_together(tmp_path, caplog):
    """A gene in 2 cells of each file passes --min_cells_per_gene 3 only over both files."""
    a, b = two_files(tmp_path)
    for adata, path in ((a, "alpha"), (b, "beta")):
        x = adata.X.toarray()
        x[:, list(adata.var_names).index("GENE0050")] = 0
        x[10:12, list(adata.var_names).index("GENE0050")] = 5  # cells past the tiny first five
        adata.X = sp.csr_matrix(x)
        write_h5ad(adata, tmp_path / "in" / f"{path}.h5ad")
    with caplog.at_level("INFO", logger="cell2sentence"):
        run([tmp_path / "in"], tmp_path / "out", "--min_cells_per_gene", "3")
    pre = ad.read_h5ad(tmp_path / "out" / "in_preprocessed.h5ad")
    assert "GENE0050" in pre.var_names
    assert "QC runs over all cells together" in caplog.text
    assert "of 160 cells kept" in caplog.text
    run([tmp_path / "in" / "alpha.h5ad"], tmp_path / "alone", "--min_cells_per_gene", "3")
    assert "GENE0050" not in ad.read_h5ad(tmp_path / "alone" / "alpha_preprocessed.h5ad").var_names


@pytest.mark.parametrize(("n_columns", "dtype"), [(250, np.float32), (300, np.float32), (70_000, np.float64),
                                                  (20_000_000, np.float32)])
def test_remapped_rows_are_sorted_by_their_new_columns(n_columns, dtype):
    """The radix sort on 1, 2, 3 and 4 bytes of the new column, against scipy's own sorting."""
    rng = np.random.default_rng(n_columns)
    matrix = sp.random(40, 250, density=0.3, format="csr", random_state=rng, dtype=dtype)
    matrix.data[matrix.indptr[5] : matrix.indptr[6]] = 0  # an empty row
    matrix.eliminate_zeros()
    column_map = rng.choice(n_columns, size=250, replace=False).astype(np.int32)
    start, stop = 3, 37  # rows of a chunk: indptr starts above 0
    lo, hi = matrix.indptr[start], matrix.indptr[stop]
    indices, data = sort_rows(matrix.indptr[start : stop + 1].astype(np.int64), matrix.indices[lo:hi],
                                      matrix.data[lo:hi], column_map, n_columns)
    expected = sp.csr_matrix((matrix.data[lo:hi], column_map[matrix.indices[lo:hi]],
                              matrix.indptr[start : stop + 1] - lo), shape=(stop - start, n_columns))
    expected.sort_indices()
    assert data.dtype == dtype
    np.testing.assert_array_equal(indices, expected.indices)
    np.testing.assert_array_equal(data, expected.data)
