"""What an independent reliability battery still broke at the transform (issue 18, section 4):
labels and cell names that differ only by spaces or hold line breaks, gene names that are
special tokens, a numeric label column, float16 counts, out-of-range seeds, the API's ``qc``
and backed AnnData, and an h5ad of anndata before 0.7. Each case: the right result, or one sentence naming the fix.

Run alone with ``python -m pytest -q tests/test_reliability_inputs.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import datasets
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from helpers import synthetic_counts, write_h5ad

import transform
from utils import QCParams, adata_to_sentences
from utils.cli import InputError
from utils.transform.pipeline import SPLITS

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--min_genes_per_cell", "5", "--chunk_size", "32")


def run(h5ad: Path, out: Path, *extra: str) -> dict:
    return transform.main(transform.parse_args(["--data_filepath", str(h5ad), "--output_dir", str(out), *FLAGS,
                                                *extra]))


def texts(out: Path) -> dict[str, list[str]]:
    return {f"{s}{part}": (out / "cell_sentences" / f"{s}{part}").read_text().split("\n")
            for s in SPLITS for part in (".txt", "_barcodes.txt")}


def hf_column(out: Path, column: str) -> dict[str, object]:
    """cell_name -> value of ``column`` over every split of the arrow dataset."""
    dd = datasets.load_from_disk(str(out / "cell_sentences_hf"))
    return {name: value for s in SPLITS for name, value in zip(dd[s]["cell_name"], dd[s][column], strict=True)}


def no_outputs(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


# --- labels: spaces and case (issue 18: "T Cell", "T cell", "t cell", "  T   cell ") ------------

SPELLINGS = ["T Cell", "T cell", "t cell", "  T   cell ", "T\tcell", "", "   ", "B cell"]


def test_labels_differing_by_spaces_are_one_class_and_case_variants_a_warning(tmp_path, caplog):
    adata = synthetic_counts(80, 250, seed=31)
    given = [SPELLINGS[i % len(SPELLINGS)] for i in range(80)]
    adata.obs["cell_type"] = pd.Categorical(given)
    with caplog.at_level("WARNING", logger="cell2sentence"):
        run(write_h5ad(adata, tmp_path / "a.h5ad"), tmp_path / "out")
    labels = hf_column(tmp_path / "out", "cell_type")
    expected = {"T Cell": "T Cell", "T cell": "T cell", "t cell": "t cell", "  T   cell ": "T cell",
                "T\tcell": "T cell", "": None, "   ": None, "B cell": "B cell"}
    assert labels == {name: expected[given[int(name[4:])]] for name in labels}
    assert set(labels.values()) == {"T Cell", "T cell", "t cell", "B cell", None}
    pre = ad.read_h5ad(tmp_path / "out" / "a_preprocessed.h5ad")
    assert sorted(pre.obs["cell_type"].cat.categories) == ["B cell", "T Cell", "T cell", "t cell"]
    # empty labels are missing ones, with the warning NaN labels get (2 of every 8 cells)
    assert "20 of 80 cells have no label in obs['cell_type'] (NaN or empty)" in caplog.text
    case = [r.getMessage() for r in caplog.records if "differ only by letter case" in r.getMessage()]
    assert case == ["Labels of obs['cell_type'] that differ only by letter case ('T Cell', 'T cell', 't cell') stay "
                    "separate classes; give them one spelling if they are one type."]


def test_the_api_cleans_labels_the_same_way():
    adata = synthetic_counts(80, 250, seed=31)
    adata.obs["cell_type"] = [SPELLINGS[i % len(SPELLINGS)] for i in range(80)]  # object column, not categorical
    cs = adata_to_sentences(adata, qc=QCParams(min_genes_per_cell=5))
    assert set(cs.labels) == {"T Cell", "T cell", "t cell", "B cell", None}
    assert cs.labels[cs.cell_names.index("cell0011")] == "T cell"  # "  T   cell "


# --- cell names with line breaks (barcode files one line per cell) -----------------------------


def test_cell_names_with_line_breaks_are_one_line_and_inverse_reads_them(tmp_path, caplog):
    import inverse

    adata = synthetic_counts(60, 250, seed=32)
    names = adata.obs_names.tolist()
    names[10], names[11], names[12] = "AAAC\nGT-1", "AAAC\tGT-2", "  AAAC \r\n GT-3 "
    adata.obs_names = names
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="cell2sentence"):
        run(write_h5ad(adata, tmp_path / "a.h5ad"), out)
    files = texts(out)
    for s in SPLITS:  # as many barcode lines as sentence lines
        assert len(files[f"{s}_barcodes.txt"]) == len(files[f"{s}.txt"])
    barcodes = [b for s in SPLITS for b in files[f"{s}_barcodes.txt"] if b]
    assert {"AAAC GT-1", "AAAC GT-2", "AAAC GT-3"} <= set(barcodes) and len(barcodes) == 60
    pre = ad.read_h5ad(out / "a_preprocessed.h5ad")
    assert pre.obs.loc["AAAC GT-2", "original_cell_name"] == "AAAC\tGT-2"
    assert "Replaced line breaks and tabs by one space in 3 cell names" in caplog.text
    inverse.main(inverse.parse_args(["--sentences", str(out / "cell_sentences" / "train.txt"),
                                     "--transform_dir", str(out), "--output", str(tmp_path / "inv.h5ad")]))
    assert ad.read_h5ad(tmp_path / "inv.h5ad").obs_names.tolist() == files["train_barcodes.txt"][:-1]


# --- gene names that are special tokens ------------------------------------------------------


@pytest.mark.parametrize("gene", ["<eos>", "<pad>", "</s>", "<|endoftext|>", "<unk>", "<bos>", "<s>", "<extra_id_0>",
                                  "GENE<eos>"])
@pytest.mark.parametrize("bad_gene_names", ["replace", "error"])
def test_gene_names_that_are_special_tokens_are_refused(gene, bad_gene_names, tmp_path):
    adata = synthetic_counts(40, 250, seed=33)
    adata.var_names = [gene if i == 7 else g for i, g in enumerate(adata.var_names)]
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"1 gene names are or hold a tokenizer's special token \(e.g. "
                                         rf"'{re.escape(gene)}'\).* rename those genes"):
        run(write_h5ad(adata, tmp_path / "a.h5ad"), out, "--bad_gene_names", bad_gene_names)
    assert no_outputs(out)


def test_angle_brackets_that_are_no_token_pass():
    from utils.transform.pipeline import resolve_gene_names

    names = resolve_gene_names(pd.DataFrame(index=["a<b", "x>y", "GENE1"]), None, bad="replace", path="p")
    assert names.tolist() == ["a<b", "x>y", "GENE1"]


# --- a numeric label column ------------------------------------------------------------------


def test_a_float_label_column_is_a_warning(tmp_path, caplog):
    adata = synthetic_counts(300, 250, seed=34)
    adata.obs["score"] = np.random.default_rng(0).random(300)
    adata.obs["cluster"] = np.arange(300) % 7  # cluster numbers are labels
    h5ad = write_h5ad(adata, tmp_path / "a.h5ad")
    with caplog.at_level("WARNING", logger="cell2sentence"):
        run(h5ad, tmp_path / "score", "--label_column", "score")
    warned = [r.getMessage() for r in caplog.records if "do not look like cell-type labels" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("obs['score'] holds numbers (300 distinct values, e.g. ")
    assert "pass the obs column of cell types as --label_column" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="cell2sentence"):
        run(h5ad, tmp_path / "cluster", "--label_column", "cluster")
    assert "do not look like cell-type labels" not in caplog.text
    assert set(hf_column(tmp_path / "cluster", "cell_type").values()) == {str(i) for i in range(7)}


# --- float16 counts --------------------------------------------------------------------------


def _float16_csr(adata: ad.AnnData, path: Path) -> Path:
    """An h5ad whose CSR data is stored as float16 (AnnData cannot write one; other tools do)."""
    write_h5ad(adata, path)
    with h5py.File(path, "r+") as f:
        data = f["X/data"][:]
        del f["X/data"]
        f.create_dataset("X/data", data=data.astype(np.float16))
    return path


def test_float16_counts_give_the_sentences_of_float32(tmp_path):
    adata = synthetic_counts(120, 250, seed=35)
    run(write_h5ad(adata, tmp_path / "f32.h5ad"), tmp_path / "f32")
    dense = adata.copy()
    dense.X = adata.X.toarray().astype(np.float16)
    run(write_h5ad(dense, tmp_path / "f16.h5ad"), tmp_path / "dense")
    run(_float16_csr(adata, tmp_path / "f16.h5ad"), tmp_path / "csr", "--overwrite")
    with h5py.File(tmp_path / "f16.h5ad") as f:
        assert f["X/data"].dtype == np.float16
    expected = texts(tmp_path / "f32")
    assert len(expected["train.txt"]) > 50
    assert texts(tmp_path / "dense") == expected and texts(tmp_path / "csr") == expected
    cs = adata_to_sentences(dense, qc=QCParams(min_genes_per_cell=5))  # in memory too
    assert cs.sentences == adata_to_sentences(adata, qc=QCParams(min_genes_per_cell=5)).sentences


# --- seeds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["-1", "12345678901234567890123", str(2**64)])
def test_a_seed_out_of_range_is_one_sentence(seed):
    with pytest.raises(InputError, match=rf"^--seed must be a whole number from 0 to 2\*\*64 - 1 \(got {seed}\)"):
        transform.parse_args(["--seed", seed])


def test_the_largest_seed_runs_and_a_bad_one_exits_2(tmp_path):
    h5ad = write_h5ad(synthetic_counts(40, 250, seed=36), tmp_path / "a.h5ad")
    run(h5ad, tmp_path / "out", "--seed", str(2**64 - 1))
    kept = ad.read_h5ad(tmp_path / "out" / "a_preprocessed.h5ad").n_obs
    assert len([line for s in SPLITS for line in texts(tmp_path / "out")[f"{s}.txt"] if line]) == kept > 30
    done = subprocess.run([sys.executable, "transform.py", "--seed", "-1", "--data_filepath", str(h5ad),
                           "--output_dir", str(tmp_path / "bad")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--seed must be a whole number from 0 to 2**64 - 1 (got -1)" in done.stderr
    with pytest.raises(InputError, match=r"^seed must be a whole number"):
        adata_to_sentences(synthetic_counts(40, 250, seed=36), seed=1.5)


# --- the API: qc and backed AnnData ------------------------------------------------------------


@pytest.mark.parametrize("qc", ["no", "False", 0, None, {"min_genes_per_cell": 5}])
def test_qc_other_than_a_bool_or_qcparams_is_refused(qc):
    with pytest.raises(InputError, match=r"^qc must be True \(the original's QC\), False \(none\) or a QCParams"):
        adata_to_sentences(synthetic_counts(40, 250, seed=37), qc=qc)


def test_qc_as_a_numpy_bool_is_a_bool():
    adata = synthetic_counts(40, 250, seed=37)
    assert len(adata_to_sentences(adata, qc=np.bool_(False))) == 40  # no QC: every (non-empty) cell
    with pytest.raises(InputError, match="No cells left after QC"):  # the original's QC: min_genes 200
        adata_to_sentences(adata, qc=np.bool_(True))


@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_a_backed_anndata_gives_the_sentences_in_memory(tmp_path, sparse):
    adata = synthetic_counts(60, 250, seed=38, sparse=sparse)
    path = write_h5ad(adata, tmp_path / "a.h5ad")
    backed = ad.read_h5ad(path, backed="r")
    params = QCParams(min_genes_per_cell=5)
    expected = adata_to_sentences(adata, qc=params)
    got = adata_to_sentences(backed, qc=params)
    assert got.sentences == expected.sentences and got.cell_names == expected.cell_names and len(got) > 50
    assert backed.isbacked  # the caller's object is left as it was
    view = adata_to_sentences(backed[10:40], qc=params)
    assert view.sentences == adata_to_sentences(adata[10:40], qc=params).sentences


def test_csc_counts_in_memory_still_work():
    adata = synthetic_counts(60, 250, seed=38)
    csc = adata.copy()
    csc.X = sp.csc_matrix(adata.X)
    params = QCParams(min_genes_per_cell=5)
    assert adata_to_sentences(csc, qc=params).sentences == adata_to_sentences(adata, qc=params).sentences


# --- an h5ad of anndata before 0.7 -----------------------------------------------------------


def _pre_07_h5ad(adata: ad.AnnData, path: Path) -> Path:
    """The layout anndata wrote before 0.7 (and 0.12 still reads): obs and var as tables
    (compound datasets, the index first), categories in uns, X a group with h5sparse attributes."""
    X = sp.csr_matrix(adata.X)
    with h5py.File(path, "w") as f:
        group = f.create_group("X")
        group.attrs["h5sparse_format"] = "csr"
        group.attrs["h5sparse_shape"] = np.array(X.shape)
        group["data"], group["indices"], group["indptr"] = X.data, X.indices, X.indptr
        codes = adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int8)
        f["obs"] = np.array([(n.encode(), c, d) for n, c, d in zip(adata.obs_names, codes, adata.obs["donor"],
                                                                    strict=True)],
                            dtype=[("index", "S16"), ("cell_type", "i1"), ("donor", "i8")])
        f["var"] = np.array([(n.encode(),) for n in adata.var_names], dtype=[("index", "S16")])
        f.create_group("uns")["cell_type_categories"] = np.array([c.encode() for c in adata.obs["cell_type"].cat.categories])
    return path


@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")  # anndata's own note on reading it
def test_an_h5ad_of_anndata_before_0_7_gives_the_sentences_of_a_current_one(tmp_path, caplog):
    adata = synthetic_counts(70, 250, seed=39)
    legacy = _pre_07_h5ad(adata, tmp_path / "old.h5ad")
    assert ad.read_h5ad(legacy).obs["cell_type"].tolist() == adata.obs["cell_type"].tolist()  # anndata reads it
    run(write_h5ad(adata, tmp_path / "new.h5ad"), tmp_path / "new", "--obs_columns", "donor")
    with caplog.at_level("WARNING", logger="cell2sentence"):
        run(legacy, tmp_path / "old", "--obs_columns", "donor")
    assert "written by anndata before 0.7" in caplog.text
    assert texts(tmp_path / "old") == texts(tmp_path / "new") and len(texts(tmp_path / "new")["train.txt"]) > 40
    assert hf_column(tmp_path / "old", "cell_type") == hf_column(tmp_path / "new", "cell_type")
    assert hf_column(tmp_path / "old", "donor") == hf_column(tmp_path / "new", "donor")
