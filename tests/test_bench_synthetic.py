"""bench/synthetic.py: the chunked writer gives a valid, realistic, chunk-size-independent h5ad."""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.synthetic import (  # noqa: E402
    MT_GENES,
    cached_synthetic_h5ad,
    write_synthetic_h5ad,
)

PARAMS = {"n_cells": 2_300, "n_genes": 3_000, "genes_per_cell": 300, "n_cell_types": 5, "seed": 3}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("syn") / "a.h5ad"
    return write_synthetic_h5ad(path, chunk_size=700, progress=False, **PARAMS)


def test_readable_with_right_shape_and_encoding(synthetic: Path):
    adata = ad.read_h5ad(synthetic)
    assert adata.shape == (2_300, 3_000)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    assert adata.X.has_sorted_indices
    assert not list(synthetic.parent.glob("*.part"))
    with h5py.File(synthetic) as f:
        assert f["X"].attrs["encoding-type"] == "csr_matrix"
        assert f["X"].attrs["encoding-version"] == "0.1.0"
        assert list(f["X"].attrs["shape"]) == [2_300, 3_000]
        assert f["X/indptr"][-1] == f["X/data"].shape[0] == adata.X.nnz


def test_counts_are_realistic(synthetic: Path):
    x = ad.read_h5ad(synthetic).X
    data = x.data
    assert data.min() >= 1
    np.testing.assert_array_equal(data, np.round(data))
    # heavy tail with many ties (this small gene set is denser than the default 33,000 genes,
    # where 58% of the non-zeros are 1s): half are 1s and 2s, a few in the hundreds
    assert np.mean(data == 1) > 0.25 and np.mean(data == 2) > 0.1
    assert np.mean(data <= 2) > 0.45 and np.median(data) <= 2
    assert data.max() >= 100
    per_cell = np.diff(x.indptr)
    assert 0.95 * 300 < per_cell.mean() < 1.1 * 300
    assert per_cell.min() > 0.7 * 300 and per_cell.max() < 1.35 * 300
    # skewed popularity: the most detected gene is in far more cells than the median gene
    detection = np.bincount(x.indices, minlength=x.shape[1]) / x.shape[0]
    assert detection.max() > 0.9 and np.median(detection) < 0.1


def test_genes_and_cell_types(synthetic: Path):
    adata = ad.read_h5ad(synthetic)
    names = list(adata.var_names)
    assert sorted(n for n in names if n.startswith("MT-")) == sorted(MT_GENES)
    assert all(" " not in n for n in names)
    assert names.count("GENE00001") + names.count("MT-ND1") >= 1
    assert all(n.startswith(("GENE", "MT-")) for n in names)
    assert len(set(names)) == len(names)
    assert "feature_name" not in adata.var
    assert adata.obs["cell_type"].nunique() == 5
    assert adata.obs["cell_type"].value_counts().min() > 300
    # markers: each type's marker genes are far more often detected in that type
    markers = adata.uns["synthetic"]["markers"]
    x = adata.X
    for t, label in enumerate(sorted(adata.obs["cell_type"].cat.categories)):
        inside = (adata.obs["cell_type"] == label).to_numpy()
        rate_in = (x[inside][:, markers[t]] > 0).mean()
        rate_out = (x[~inside][:, markers[t]] > 0).mean()
        assert rate_in > 0.75 and rate_out < 0.3, (label, rate_in, rate_out)


def test_chunk_size_does_not_change_the_matrix(synthetic: Path, tmp_path):
    other = write_synthetic_h5ad(tmp_path / "b.h5ad", chunk_size=2_500, progress=False, **PARAMS)
    a, b = ad.read_h5ad(synthetic), ad.read_h5ad(other)
    np.testing.assert_array_equal(a.X.indptr, b.X.indptr)
    np.testing.assert_array_equal(a.X.indices, b.X.indices)
    np.testing.assert_array_equal(a.X.data, b.X.data)
    assert (a.obs["cell_type"] == b.obs["cell_type"]).all()
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    third = write_synthetic_h5ad(
        tmp_path / "c.h5ad", chunk_size=700, progress=False, **{**PARAMS, "seed": 4}
    )
    assert ad.read_h5ad(third).X.nnz != a.X.nnz


def test_cache_reuses_the_file(tmp_path):
    params = {"n_cells": 50, "n_genes": 1_000, "genes_per_cell": 50, "n_cell_types": 2}
    first = cached_synthetic_h5ad(tmp_path, **params)
    mtime = first.stat().st_mtime_ns
    second = cached_synthetic_h5ad(tmp_path, **params)
    assert second == first and second.stat().st_mtime_ns == mtime
    assert "c50_g1000_k50_t2_s0" in first.name


def test_rejects_impossible_parameters(tmp_path):
    with pytest.raises(ValueError, match="genes_per_cell"):
        write_synthetic_h5ad(tmp_path / "x.h5ad", n_cells=10, n_genes=1_000, genes_per_cell=900)
    assert not list(tmp_path.iterdir())


FAKE_TRANSFORM = """
import argparse, subprocess, sys, time
from pathlib import Path
p = argparse.ArgumentParser()
for flag in ["--data_filepath", "--output_dir", "--max_genes_per_cell", "--num_proc", "--chunk_size"]:
    p.add_argument(flag)
p.add_argument("--overwrite", action="store_true")
a = p.parse_args()
if a.chunk_size == "13":
    print("boom: chunk size 13"); sys.exit(3)
code = "b = bytearray(150 * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(0.6)"
child = subprocess.Popen([sys.executable, "-c", code])
child.wait()
out = Path(a.output_dir); out.mkdir(parents=True)
(out / "cell_sentences.txt").write_bytes(b"a" * 12345)
print("12:00:00 INFO QC pass: 60 cells in 0.5 s (120 cells/s).")
print("12:00:01 INFO Sentence pass: 60 cells in 0.25 s (240 cells/s).")
"""


def test_bench_measures_a_subprocess_tree(tmp_path):
    from bench import transform_bench

    fake = tmp_path / "fake_transform.py"
    fake.write_text(FAKE_TRANSFORM)
    argv = ["--transform", str(fake), "--cache_dir", str(tmp_path / "cache"), "--n_cells", "60"]
    argv += ["--n_genes", "1000", "--genes_per_cell", "50"]
    (result,) = transform_bench.main(transform_bench.parse_args(argv))
    assert result.n_cells == 60 and result.returncode == 0
    assert 0.7 * 60 * 50 < result.nnz < 1.3 * 60 * 50 + 60 * 20
    assert result.output_bytes == 12345
    assert result.peak_tree_rss > 150 * 2**20  # the grandchild's 150 MB is seen
    assert result.max_single_rss > 150 * 2**20
    assert result.seconds > 0.6
    assert result.qc_pass_seconds == 0.5 and result.sentence_pass_seconds == 0.25
    assert result.user_seconds > 0
    # the synthetic file stays cached, the run's outputs are removed
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        "synthetic_c60_g1000_k50_t10_s0_v1.h5ad"
    ]
    table = transform_bench.format_table([result])
    assert table.splitlines()[0].split()[:4] == ["cells", "non-zeros", "seconds", "cells/s"]
    row = table.splitlines()[2].split()
    assert row[0] == "60" and row[8:10] == ["120", "240"]  # the passes' cells/s
    repeated = transform_bench.main(transform_bench.parse_args([*argv, "--repeats", "2"]))
    assert [r.n_cells for r in repeated] == [60, 60]

    with pytest.raises(transform_bench.InputError, match="boom: chunk size 13"):
        transform_bench.main(transform_bench.parse_args([*argv, "--chunk_size", "13"]))
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_outputs_of_two_scripts_are_compared_byte_for_byte(tmp_path):
    from bench.transform_bench import differing_files

    for side in ("a", "b"):
        (tmp_path / side / "eval").mkdir(parents=True)
        (tmp_path / side / "eval" / "m.csv").write_text("slope\n-0.7\n")
        (tmp_path / side / "transform_args.json").write_text(side)  # records paths: never compared
    assert differing_files(tmp_path / "a", tmp_path / "b") == []
    (tmp_path / "b" / "eval" / "m.csv").write_text("slope\n-0.8\n")
    (tmp_path / "b" / "extra.txt").write_text("x")
    assert differing_files(tmp_path / "a", tmp_path / "b") == ["eval/m.csv", "extra.txt"]


def test_split_inputs_hold_the_same_cells_with_genes_reordered(tmp_path):
    import anndata as ad

    from bench.synthetic import cached_split_inputs, cached_synthetic_h5ad

    path = cached_synthetic_h5ad(tmp_path, n_cells=70, n_genes=1000, genes_per_cell=40, seed=1)
    folder = cached_split_inputs(path, 3, seed=1)
    parts = [ad.read_h5ad(folder / f"part{i}.h5ad") for i in range(3)]
    assert [p.n_obs for p in parts] == [23, 24, 23]
    original = ad.read_h5ad(path)
    assert parts[0].var_names.equals(original.var_names)
    assert not parts[1].var_names.equals(original.var_names)  # matched by name, not by position
    joined = ad.concat(parts, join="outer")[:, original.var_names]
    assert joined.obs_names.equals(original.obs_names)
    assert (joined.X != original.X).nnz == 0
    assert cached_split_inputs(path, 3, seed=1) == folder  # cached
