"""transform.py and its utils: QC and normalization against scanpy, the fit, the data contract,
determinism across chunking and workers, input kinds and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from helpers import synthetic_counts, write_h5ad
from reference import log10_normalized

import transform
import utils.transform.pipeline
from utils.cli import InputError
from utils.transform.filewriter import OrderedAppendFile
from utils.transform.fit import METRIC_COLUMNS, fit_rank_expression, score_line
from utils.transform.formats import H5adCSRWriter
from utils.transform.outputs import TransformOutputs
from utils.transform.pipeline import SPLITS, assign_splits, chunk_bounds
from utils.transform.preprocess import (
    QCAccumulator,
    QCParams,
    chunk_stats,
    detect_input_kind,
)

CONTRACT = ["cell_sentences", "cell_sentences_hf", "eval", "transform_args.json"]


def run(h5ad: Path, out: Path, *extra: str) -> dict:
    return transform.main(transform.parse_args(["--data_filepath", str(h5ad), "--output_dir", str(out), *extra]))


def scanpy_qc(adata: ad.AnnData, p: QCParams) -> ad.AnnData:
    """The original script's preprocessing, with scanpy."""
    adata = adata.copy()
    sc.pp.filter_cells(adata, min_genes=p.min_genes_per_cell)
    sc.pp.filter_genes(adata, min_cells=p.min_cells_per_gene)
    adata.var["mt"] = adata.var_names.str.startswith("MT-")
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    adata = adata[adata.obs.n_genes_by_counts < p.max_genes_per_cell, :]
    adata = adata[adata.obs.pct_counts_mt < p.max_mt_percent, :].copy()
    return adata


@pytest.mark.parametrize("chunk_size", [1000, 37])
def test_qc_matches_scanpy(chunk_size):
    adata = synthetic_counts(300, 400, seed=1)
    params = QCParams(min_genes_per_cell=60, min_cells_per_gene=3, max_genes_per_cell=230, max_mt_percent=1.8)
    is_mt = np.asarray(adata.var_names.str.startswith("MT-"))
    acc = QCAccumulator(adata.n_obs, adata.n_vars, params)
    for start, stop in chunk_bounds(adata.n_obs, chunk_size):
        acc.add(chunk_stats(adata.X[start:stop].tocsr(), row_offset=start, is_mt=is_mt, params=params))
    ours = acc.finalize(is_mt)
    expected = scanpy_qc(adata, params)
    # every filter did something, so the comparison means something
    assert all(ours.cells_removed[k] > 0 for k in ("min_genes_per_cell", "max_genes_per_cell", "max_mt_percent"))
    assert ours.genes_removed > 0
    assert adata.obs_names[ours.cell_mask].tolist() == expected.obs_names.tolist()
    assert adata.var_names[ours.gene_mask].tolist() == expected.var_names.tolist()
    np.testing.assert_array_equal(ours.n_genes[ours.cell_mask], expected.obs.n_genes_by_counts)
    np.testing.assert_allclose(ours.pct_mt[ours.cell_mask], expected.obs.pct_counts_mt, rtol=1e-6)


def test_normalization_matches_scanpy():
    adata = synthetic_counts(50, 100, seed=2)
    expected = adata.copy()
    sc.pp.normalize_total(expected, target_sum=1e4)
    sc.pp.log1p(expected, base=10)
    ours = log10_normalized(adata.X.tocsr(), input_kind="counts", log1p_base=None)
    np.testing.assert_allclose(ours, expected.X.tocsr().data, rtol=1e-5)
    # log1p input (natural or base 2) comes back to the same values
    for base in (None, 2.0):
        logged = adata.copy()
        sc.pp.normalize_total(logged, target_sum=1e4)
        sc.pp.log1p(logged, base=base)
        back = log10_normalized(logged.X.tocsr(), input_kind="log1p", log1p_base=base)
        np.testing.assert_allclose(back, expected.X.tocsr().data, rtol=1e-4)


def test_fit_recovers_known_line():
    rng = np.random.default_rng(0)
    log_rank = np.log10(1 + np.tile(np.arange(2000.0), 5))
    log_expr = 2.5 - 0.8 * log_rank + rng.normal(0, 0.01, log_rank.size)
    fit = fit_rank_expression(log_rank, log_expr, threshold=3.0)
    assert fit.slope == pytest.approx(-0.8, abs=2e-3)
    assert fit.intercept == pytest.approx(2.5, abs=2e-3)
    assert fit.r_squared > 0.99
    assert fit.n_points == int((log_rank < 3.0).sum())
    # the threshold excludes points: a kink above it does not bend the line
    bent = np.where(log_rank >= 3.0, 0.0, log_expr)
    assert fit_rank_expression(log_rank, bent, threshold=3.0).slope == pytest.approx(-0.8, abs=2e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fit_scores_match_numpy_scipy_and_sklearn(dtype):
    """The closed-form line and the one-ranking Spearman r against the libraries' own."""
    from scipy.stats import spearmanr
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(3)
    ranks = np.concatenate([np.arange(n) for n in rng.integers(50, 1500, 40)])
    log_rank = np.log10(1.0 + ranks).astype(dtype)
    # Expression with many ties (rounded), falling with rank.
    log_expr = np.round(2.0 - 0.6 * log_rank + rng.normal(0, 0.15, log_rank.size), 2).astype(dtype)
    fit = fit_rank_expression(log_rank, log_expr, threshold=2.5)
    x, y = log_rank.astype(np.float64), log_expr.astype(np.float64)
    slope, intercept = np.polyfit(x[x < 2.5], y[x < 2.5], 1)
    assert (fit.slope, fit.intercept) == pytest.approx((slope, intercept), rel=1e-9)
    predicted = intercept + slope * x
    assert fit.r_squared == pytest.approx(r2_score(y, predicted), rel=1e-9)
    assert fit.pearson_r == pytest.approx(np.corrcoef(y, predicted)[0, 1], rel=1e-9)
    assert fit.spearman_r == pytest.approx(spearmanr(y, predicted)[0], rel=1e-9)
    # Constant expression is predicted exactly (r2_score's convention); NaN is no score.
    flat = fit_rank_expression(log_rank, np.full_like(log_rank, 1.5), threshold=2.5)
    assert (flat.slope, flat.intercept, flat.r_squared) == (0.0, 1.5, 1.0) and np.isnan(flat.spearman_r)
    assert np.isnan(score_line(x, np.r_[y[:-1], np.nan], slope=slope, intercept=intercept)["r_squared"])
    # A rising line: the correlations keep their sign.
    rising = fit_rank_expression(log_rank, (3.0 - log_expr).astype(dtype), threshold=2.5)
    assert rising.slope > 0 and rising.spearman_r == pytest.approx(fit.spearman_r, rel=1e-9)


def test_splits_are_exact_and_seeded():
    split = assign_splits(1000, [0.8, 0.1, 0.1], seed=4)
    assert np.bincount(split).tolist() == [800, 100, 100]
    assert np.array_equal(split, assign_splits(1000, [0.8, 0.1, 0.1], seed=4))
    assert not np.array_equal(split, assign_splits(1000, [0.8, 0.1, 0.1], seed=5))


def test_detect_input_kind():
    counts = synthetic_counts(100, 300, seed=3)
    assert detect_input_kind(counts.X, has_log1p_uns=False)[:2] == ("counts", None)
    normalized = counts.copy()
    sc.pp.normalize_total(normalized, target_sum=1e4)
    assert detect_input_kind(normalized.X, has_log1p_uns=False)[0] == "normalized"
    for base in (None, 2.0, 10.0):
        logged = normalized.copy()
        sc.pp.log1p(logged, base=base)
        assert detect_input_kind(logged.X, has_log1p_uns=False)[:2] == ("log1p", base)
        assert detect_input_kind(logged.X, has_log1p_uns=True, log1p_base=base)[:2] == ("log1p", base)
    # uns["log1p"] cannot make whole numbers log1p values
    kind, _, reason = detect_input_kind(counts.X, has_log1p_uns=True)
    assert kind == "counts" and "whole number" in reason


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory) -> Path:
    return write_h5ad(synthetic_counts(240, 500, seed=0), tmp_path_factory.mktemp("in") / "tiny.h5ad")


@pytest.fixture(scope="module")
def transformed(small_h5ad, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out")
    metrics = run(small_h5ad, out, "--min_genes_per_cell", "50", "--obs_columns", "donor")
    return out, metrics


def test_smoke_every_output_of_the_contract_agrees(small_h5ad, transformed):
    out, metrics = transformed
    text = out / "cell_sentences"
    pre = ad.read_h5ad(out / "tiny_preprocessed.h5ad")
    raw = ad.read_h5ad(small_h5ad)
    hf = datasets.load_from_disk(str(out / "cell_sentences_hf"))
    assert list(hf) == list(SPLITS)
    assert hf["train"].column_names == ["cell_name", "cell_sentence", "cell_type", "donor"]
    vocab = [line.split() for line in (text / "vocab.txt").read_text().splitlines()]
    assert [g for g, _ in vocab] == pre.var_names.tolist()
    assert [int(c) for _, c in vocab] == np.asarray((pre.X > 0).sum(axis=0)).ravel().tolist()

    n_total = 0
    for split in SPLITS:
        sentences = (text / f"{split}.txt").read_text().splitlines()
        barcodes = (text / f"{split}_barcodes.txt").read_text().splitlines()
        indices = np.load(text / f"{split}_indices.npy")
        assert sentences == hf[split]["cell_sentence"]
        assert barcodes == hf[split]["cell_name"] == pre.obs_names[indices].tolist()
        assert hf[split]["cell_type"] == raw.obs.loc[barcodes, "cell_type"].astype(str).tolist()
        assert hf[split]["donor"] == raw.obs.loc[barcodes, "donor"].tolist()
        assert (pre.obs["split"].iloc[indices] == split).all()
        for sentence, row in zip(sentences[:20], indices[:20], strict=True):
            values = pre.X[row].toarray().ravel()
            genes = sentence.split()
            # exactly the expressed genes, in non-increasing order of preprocessed value
            assert sorted(genes) == sorted(pre.var_names[values > 0])
            ordered = values[pre.var_names.get_indexer(genes)]
            assert np.all(np.diff(ordered) <= 1e-6)
            # and the preprocessed value is log10(1 + counts normalized to 1e4)
            counts = raw[barcodes[sentences.index(sentence)], pre.var_names].X.toarray().ravel()
            np.testing.assert_allclose(values, np.log10(1 + counts / counts.sum() * 1e4), rtol=1e-5)
        n_total += len(sentences)
    assert n_total == pre.n_obs
    assert [len(hf[s]) for s in SPLITS] == [round(0.8 * n_total), round(0.1 * n_total),
                                             n_total - round(0.8 * n_total) - round(0.1 * n_total)]

    table = pd.read_csv(out / "eval" / "transformation_metrics.csv")
    assert table.columns.tolist() == list(METRIC_COLUMNS)
    assert table.iloc[0]["slope"] == pytest.approx(metrics["slope"]) and metrics["slope"] < 0
    assert 0.5 < metrics["pearson_r"] <= 1 and metrics["n_points"] > 1000
    for png in ("log_rank_vs_log_expression.png", "expression_vs_reconstruction.png"):
        assert (out / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recorded = json.loads((out / "transform_args.json").read_text())
    assert recorded["seed"] == 1234 and recorded["min_genes_per_cell"] == 50
    assert not list(out.glob(".staging-*"))


def _read_all(out: Path) -> dict[str, bytes]:
    names = [f"cell_sentences/{s}{suffix}" for s in SPLITS for suffix in (".txt", "_barcodes.txt", "_indices.npy")]
    files = {n: (out / n).read_bytes() for n in [*names, "cell_sentences/vocab.txt", "eval/transformation_metrics.csv"]}
    pre = ad.read_h5ad(out / "tiny_preprocessed.h5ad")
    files["X"] = pre.X.toarray().tobytes()
    files["h5ad"] = (out / "tiny_preprocessed.h5ad").read_bytes()  # no timestamps: identical files
    hf = datasets.load_from_disk(str(out / "cell_sentences_hf"))
    files["hf"] = json.dumps({s: hf[s].to_dict() for s in SPLITS}).encode()
    return files


def test_chunked_and_parallel_runs_are_byte_identical(small_h5ad, transformed, tmp_path):
    reference = _read_all(transformed[0])
    run(small_h5ad, tmp_path / "chunked", "--min_genes_per_cell", "50", "--obs_columns", "donor",
        "--chunk_size", "23", "--num_proc", "2")
    assert _read_all(tmp_path / "chunked") == reference


def test_command_line_run_writes_the_same_outputs_and_exits_cleanly(small_h5ad, transformed, tmp_path):
    # The script exits without interpreter teardown: everything must be on disk by then.
    script = Path(transform.__file__)
    done = subprocess.run(
        [sys.executable, str(script), "--data_filepath", str(small_h5ad), "--output_dir", str(tmp_path / "cli"),
         "--min_genes_per_cell", "50", "--obs_columns", "donor", "--num_proc", "2"],
        capture_output=True, text=True, cwd=script.parent, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "cell sentences to" in done.stderr
    assert _read_all(tmp_path / "cli") == _read_all(transformed[0])

    missing = subprocess.run([sys.executable, str(script), "--data_filepath", str(tmp_path / "nope.h5ad"),
                              "--output_dir", str(tmp_path / "x")],
                             capture_output=True, text=True, cwd=script.parent, timeout=300, check=False)
    assert missing.returncode == 2
    assert "nope.h5ad" in missing.stderr


def test_seed_changes_ties_and_splits(small_h5ad, transformed, tmp_path):
    run(small_h5ad, tmp_path / "other", "--min_genes_per_cell", "50", "--seed", "7")
    a = (transformed[0] / "cell_sentences" / "train.txt").read_text()
    b = (tmp_path / "other" / "cell_sentences" / "train.txt").read_text()
    assert a != b


def test_max_genes_truncates(small_h5ad, tmp_path):
    run(small_h5ad, tmp_path, "--min_genes_per_cell", "50", "--max_genes", "10")
    lines = (tmp_path / "cell_sentences" / "train.txt").read_text().splitlines()
    assert lines and all(len(line.split()) == 10 for line in lines)


def test_log1p_input_gives_the_same_sentences_as_counts(tmp_path):
    counts = synthetic_counts(120, 300, seed=5)
    logged = counts.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)  # records uns["log1p"]
    logged.raw = None
    run(write_h5ad(counts, tmp_path / "c.h5ad"), tmp_path / "c", "--min_genes_per_cell", "30", "--no_qc")
    run(write_h5ad(logged, tmp_path / "l.h5ad"), tmp_path / "l", "--min_genes_per_cell", "30", "--no_qc")
    a = ad.read_h5ad(tmp_path / "c" / "c_preprocessed.h5ad")
    b = ad.read_h5ad(tmp_path / "l" / "l_preprocessed.h5ad")
    np.testing.assert_allclose(a.X.toarray(), b.X.toarray(), rtol=1e-4, atol=1e-5)
    # float rounding may reorder genes whose normalized values are equal; the gene sets agree
    for split in SPLITS:
        sa = (tmp_path / "c" / "cell_sentences" / f"{split}.txt").read_text().splitlines()
        sb = (tmp_path / "l" / "cell_sentences" / f"{split}.txt").read_text().splitlines()
        assert [sorted(s.split()) for s in sa] == [sorted(s.split()) for s in sb]


def test_counts_come_from_raw_then_layer(tmp_path):
    adata = synthetic_counts(80, 250, seed=6)
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(adata.X.shape, dtype=np.float32)  # X is not the counts
    run(write_h5ad(adata, tmp_path / "a.h5ad"), tmp_path / "o", "--no_qc")
    assert len((tmp_path / "o" / "cell_sentences" / "train.txt").read_text().split()) > 1000


def test_gene_names_with_spaces_and_duplicates(tmp_path):
    adata = synthetic_counts(60, 250, seed=7)
    names = adata.var_names.tolist()
    names[10], names[11], names[12] = "HLA DRA", "GENEX", "GENEX"
    adata.var_names = names
    adata.var["feature_name"] = names
    path = write_h5ad(adata, tmp_path / "a.h5ad")
    run(path, tmp_path / "o", "--no_qc")
    vocab = [line.split()[0] for line in (tmp_path / "o" / "cell_sentences" / "vocab.txt").read_text().splitlines()]
    assert "HLA_DRA" in vocab and "GENEX" in vocab and "GENEX-1" in vocab
    with pytest.raises(InputError, match="whitespace"):
        run(path, tmp_path / "e", "--no_qc", "--bad_gene_names", "error")


def _no_outputs(out: Path) -> bool:
    return not out.exists() or not [p for p in out.iterdir() if p.name in CONTRACT or p.name.startswith(".staging")]


@pytest.mark.parametrize(
    ("mutate", "flags", "message"),
    [
        (lambda a: a.X.data.__setitem__(0, -1.0), [], "negative"),
        (lambda a: a.X.data.__setitem__(3, np.nan), [], "NaN"),
        (None, ["--min_genes_per_cell", "100000"], "No cells left after QC: --min_genes_per_cell"),
        (None, ["--gene_column", "symbol"], "no column 'symbol'"),
        (None, ["--label_column", "celltype"], "no column 'celltype'"),
        (None, ["--layer", "spliced"], "no layer 'spliced'"),
        # a path inside a layer is no layer (an h5py file answers "in" for any path in it)
        (lambda a: a.layers.__setitem__("counts", a.X.copy()), ["--layer", "counts/data"], "no layer 'counts/data'"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, mutate, flags, message):
    adata = synthetic_counts(40, 250, seed=8)
    if mutate:
        mutate(adata)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message):
        run(write_h5ad(adata, tmp_path / "a.h5ad"), out, *flags)
    assert _no_outputs(out)


@pytest.mark.parametrize(("bad", "message"), [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                                             (-2.0, "negative")])
def test_bad_values_past_the_detection_sample_are_found_by_the_qc_pass(tmp_path, monkeypatch, bad, message):
    monkeypatch.setattr(utils.transform.pipeline, "DETECTION_CELLS", 10)  # the detection sees cells 0-9 only
    adata = synthetic_counts(60, 250, seed=8)
    row = 47
    adata.X.data[adata.X.indptr[row] + 2] = bad
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"{message} values \(first in cell {row}\)"):
        run(write_h5ad(adata, tmp_path / "a.h5ad"), out, "--min_genes_per_cell", "5", "--chunk_size", "20",
            "--num_proc", "2")
    assert _no_outputs(out)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        run(tmp_path / "nope.h5ad", tmp_path / "out")
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not an h5ad")
    with pytest.raises(InputError, match="not a readable .h5ad"):
        run(junk, tmp_path / "out")
    empty = write_h5ad(ad.AnnData(obs=pd.DataFrame(index=["a", "b"])), tmp_path / "empty.h5ad")
    with pytest.raises(InputError):
        run(empty, tmp_path / "out")
    assert _no_outputs(tmp_path / "out")


def test_bad_flags():
    with pytest.raises(InputError, match="add up to 1"):
        transform.parse_args(["--split_fractions", "0.5", "0.1", "0.1"])
    with pytest.raises(InputError, match="chunk_size"):
        transform.parse_args(["--chunk_size", "0"])


def test_existing_output_needs_overwrite(small_h5ad, tmp_path):
    run(small_h5ad, tmp_path, "--min_genes_per_cell", "50")
    before = (tmp_path / "cell_sentences" / "train.txt").read_bytes()
    with pytest.raises(InputError, match="--overwrite"):
        run(small_h5ad, tmp_path, "--min_genes_per_cell", "50", "--seed", "9")
    assert (tmp_path / "cell_sentences" / "train.txt").read_bytes() == before
    evaluation = tmp_path / "eval" / "generation" / "metrics.json"  # as eval/generation.py writes
    evaluation.parent.mkdir()
    evaluation.write_text("{}")
    old_csv = (tmp_path / "eval" / "transformation_metrics.csv").read_text()
    (tmp_path / "eval" / "transformation_metrics.csv").write_text("stale")
    run(small_h5ad, tmp_path, "--min_genes_per_cell", "50", "--seed", "9", "--overwrite")
    assert (tmp_path / "cell_sentences" / "train.txt").read_bytes() != before
    # --overwrite replaces the transform's own files in eval/ and leaves the evaluations there
    assert evaluation.read_text() == "{}"
    assert (tmp_path / "eval" / "transformation_metrics.csv").read_text().splitlines()[0] == old_csv.splitlines()[0]


def test_interrupted_run_leaves_no_output(small_h5ad, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = TransformOutputs.add

    def add_then_interrupt(self, chunk, split_of_cell):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(self, chunk, split_of_cell)

    monkeypatch.setattr(TransformOutputs, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(small_h5ad, tmp_path / "out", "--min_genes_per_cell", "50", "--chunk_size", "20")
    assert calls["n"] == 3
    assert _no_outputs(tmp_path / "out")


@pytest.mark.parametrize(
    "failing",
    [(OrderedAppendFile, "append"), (H5adCSRWriter, "write_rows")],
    ids=["text_append", "h5ad_write_before_the_text"],
)
def test_a_failing_write_stops_the_workers_and_leaves_no_output(small_h5ad, tmp_path, monkeypatch, failing):
    owner, method = failing
    original = getattr(owner, method)
    calls = {"n": 0}

    def fail_on_third_call(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("No space left on device")
        original(self, *args)

    monkeypatch.setattr(owner, method, fail_on_third_call)
    outcome = {}

    def target():
        try:
            run(small_h5ad, tmp_path / "out", "--min_genes_per_cell", "50", "--chunk_size", "20", "--num_proc", "2")
        except InputError as err:  # the full disk, said in one sentence
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "workers waiting for a failed chunk's turn hung the run"
    assert "is full" in str(outcome["error"]) and str(tmp_path / "out") in str(outcome["error"])
    assert _no_outputs(tmp_path / "out")
