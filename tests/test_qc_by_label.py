"""QC that tells what it removed (issue 18, section 3): per label, what each filter removed, in
the log (a warning naming the label, the share and the flag past 10%) and in
``eval/qc_by_label.csv``, from the script and from ``CellSentences.save`` alike."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers import synthetic_counts, write_h5ad

import transform
from utils import QCParams, adata_to_sentences
from utils.contract import transform_names

MIN_GENES, MIN_CELLS, MAX_GENES, MAX_MT = 20, 3, 255, 30.0
COLUMNS = ["label", "n_cells", "removed_by_min_genes_per_cell", "removed_by_max_genes_per_cell",
           "removed_by_max_mt_percent", "removed_by_no_expressed_genes", "kept"]


def _cells() -> ad.AnnData:
    """Three types QC treats differently: 'dense' cells express many genes (--max_genes_per_cell
    removes them), 'mito' cells are mostly MT- counts (--max_mt_percent), 'plain' cells pass but
    the tiny ones (--min_genes_per_cell); some cells have no label."""
    adata = synthetic_counts(180, 400, seed=21)
    X = adata.X.toarray()
    kind = np.array(["plain", "dense", "mito"])[np.arange(180) % 3]
    kind[:5] = "plain"  # synthetic_counts makes the first five cells tiny
    rng = np.random.default_rng(0)
    dense = kind == "dense"
    X[np.ix_(dense, np.arange(5, 300))] += rng.poisson(1.5, (dense.sum(), 295))
    mito = kind == "mito"
    X[np.ix_(mito, np.arange(5))] += 400.0
    adata.X = X.astype(np.float32)
    adata.obs["cell_type"] = pd.Categorical(np.where(np.arange(180) % 17 == 16, None, kind))
    return adata


def expected_table(adata: ad.AnnData) -> pd.DataFrame:
    """The table computed the long way (scanpy's QC order, on a dense copy)."""
    X = np.asarray(adata.X)
    passes = (X > 0).sum(1) >= MIN_GENES
    genes = (X[passes] > 0).sum(0) >= MIN_CELLS
    n_genes = (X[:, genes] > 0).sum(1)
    pct_mt = 100 * X[:, genes & adata.var_names.str.startswith("MT-")].sum(1) / X[:, genes].sum(1)
    by = np.full(len(X), "kept", dtype=object)
    by[~passes] = "min_genes_per_cell"
    by[passes & (n_genes >= MAX_GENES)] = "max_genes_per_cell"
    by[(by == "kept") & (pct_mt >= MAX_MT)] = "max_mt_percent"
    frame = pd.DataFrame({"label": adata.obs["cell_type"].astype(object).to_numpy(), "by": by})
    rows = []
    for label in sorted(frame["label"].dropna().unique()) + [None]:
        cells = frame[frame["label"].isna()] if label is None else frame[frame["label"] == label]
        counts = cells["by"].value_counts()
        rows.append([label, len(cells)] + [int(counts.get(f, 0)) for f in (
            "min_genes_per_cell", "max_genes_per_cell", "max_mt_percent", "no_expressed_genes", "kept")])
    return pd.DataFrame(rows, columns=COLUMNS)


FLAGS = ("--min_genes_per_cell", str(MIN_GENES), "--max_genes_per_cell", str(MAX_GENES),
         "--max_mt_percent", str(MAX_MT), "--chunk_size", "50")


@pytest.fixture(scope="module")
def script_run(tmp_path_factory) -> tuple[ad.AnnData, Path, str]:
    root = tmp_path_factory.mktemp("qc")
    adata = _cells()
    path = write_h5ad(adata, root / "cells.h5ad")
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("cell2sentence")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        transform.main(transform.parse_args(["--data_filepath", str(path), "--output_dir", str(root / "out"), *FLAGS]))
    finally:
        logger.removeHandler(handler)
    log = "\n".join(f"{r.levelname} {r.getMessage()}" for r in records)
    return adata, root / "out", log


def test_the_table_says_per_label_what_each_filter_removed(script_run):
    adata, out, _ = script_run
    table = pd.read_csv(out / "eval" / "qc_by_label.csv")
    expected = expected_table(adata)
    assert table.columns.tolist() == COLUMNS
    pd.testing.assert_frame_equal(table, expected.astype({"label": object}), check_dtype=False)
    # every filter had something to do, each on its own population
    assert table.set_index("label").loc["dense", "removed_by_max_genes_per_cell"] > 40
    assert table.set_index("label").loc["mito", "removed_by_max_mt_percent"] > 40
    assert table["label"].isna().sum() == 1  # the cells without a label: one row, an empty label
    assert table["n_cells"].sum() == 180 and table["kept"].sum() == len(ad.read_h5ad(out / "cells_preprocessed.h5ad"))
    assert "eval/qc_by_label.csv" in transform_names("cells")


def test_a_filter_removing_over_a_tenth_of_a_label_is_a_warning_naming_it(script_run):
    adata, _, log = script_run
    table = expected_table(adata).set_index("label")
    dense = table.loc["dense"]
    share = 100 * dense["removed_by_max_genes_per_cell"] / dense["n_cells"]
    assert (f"WARNING QC: --max_genes_per_cell {MAX_GENES} removed {dense['removed_by_max_genes_per_cell']} of the "
            f"{dense['n_cells']} cells labelled 'dense' ({share:.0f}%); raise --max_genes_per_cell to keep them.") in log
    assert "WARNING QC: --max_mt_percent 30 removed" in log and "cells labelled 'mito'" in log
    # 'plain' lost only its tiny cells (under a tenth): an INFO line, no warning
    plain = table.loc["plain"]
    assert 0 < plain["removed_by_min_genes_per_cell"] <= 0.1 * plain["n_cells"]
    assert f"INFO QC: {plain['kept']} of {plain['n_cells']} cells labelled 'plain' kept; " in log
    assert not [line for line in log.splitlines() if line.startswith("WARNING") and "'plain'" in line]


def test_the_api_saves_the_same_table(script_run, tmp_path):
    adata, out, _ = script_run
    cs = adata_to_sentences(adata, qc=QCParams(MIN_GENES, MIN_CELLS, MAX_GENES, MAX_MT), chunk_size=50)
    saved = cs.save(tmp_path / "saved", name="cells")
    assert (saved / "eval" / "qc_by_label.csv").read_bytes() == (out / "eval" / "qc_by_label.csv").read_bytes()


def test_without_labels_one_row_and_the_other_outputs_unchanged(script_run, tmp_path):
    adata, out, _ = script_run
    bare = adata.copy()
    del bare.obs["cell_type"]
    path = write_h5ad(bare, tmp_path / "cells.h5ad")
    transform.main(transform.parse_args(["--data_filepath", str(path), "--output_dir", str(tmp_path / "out"), *FLAGS]))
    table = pd.read_csv(tmp_path / "out" / "eval" / "qc_by_label.csv")
    expected = expected_table(adata)
    assert table["label"].tolist() == ["(all cells)"]
    assert table.iloc[0, 1:].tolist() == expected.iloc[:, 1:].sum().tolist()
    # the sentences do not depend on the labels
    for name in ("train.txt", "valid_barcodes.txt", "vocab.txt"):
        assert (tmp_path / "out" / "cell_sentences" / name).read_bytes() == (out / "cell_sentences" / name).read_bytes()
