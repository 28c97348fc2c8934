"""The Python API: the same sentences as transform.py, the contract from .save, the README's
notebook session, and --exclude_genes / --target_sum in both."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
from helpers import synthetic_counts, write_h5ad

import transform
from utils import QCParams, adata_to_sentences, load_transform_fit, load_vocab, sentences_to_adata
from utils.cli import InputError
from utils.transform.pipeline import SPLITS

ROOT = Path(__file__).resolve().parents[1]
QC_FLAGS = ["--min_genes_per_cell", "50"]


def run_script(adata: ad.AnnData, folder: Path, *flags: str) -> Path:
    path = write_h5ad(adata, folder / "cells.h5ad")
    out = folder / "out"
    transform.main(transform.parse_args(["--data_filepath", str(path), "--output_dir", str(out), *QC_FLAGS, *flags]))
    return out


def script_sentences(out: Path) -> dict[str, list[str]]:
    return {s: (out / "cell_sentences" / f"{s}.txt").read_text().splitlines() for s in SPLITS}


def assert_same_as_script(cs, out: Path) -> None:
    split = cs.split_of_cells()
    for i, s in enumerate(SPLITS):
        rows = np.flatnonzero(split == i)
        assert [cs.sentences[r] for r in rows] == script_sentences(out)[s]
        assert [cs.cell_names[r] for r in rows] == (out / "cell_sentences" / f"{s}_barcodes.txt").read_text().splitlines()
    assert cs.fit.as_row() == pytest.approx(pd.read_csv(out / "eval" / "transformation_metrics.csv").iloc[0].to_dict())
    pre = ad.read_h5ad(next(out.glob("*_preprocessed.h5ad")))
    assert cs.preprocessed.var_names.tolist() == pre.var_names.tolist() == load_vocab(out / "cell_sentences" / "vocab.txt")
    assert (cs.preprocessed.X != pre.X).nnz == 0
    pd.testing.assert_frame_equal(cs.preprocessed.obs, pre.obs.drop(columns="split"))


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_sentences_are_the_scripts(tmp_path, sparse):
    adata = synthetic_counts(240, 500, seed=3, sparse=sparse)
    adata.obs.loc[adata.obs_names[:7], "cell_type"] = "type 0"  # labels as users have them
    out = run_script(adata, tmp_path, "--chunk_size", "64")
    before = adata.copy()
    cs = adata_to_sentences(adata, qc=QCParams(min_genes_per_cell=50), chunk_size=37,
                            num_proc=2 if sparse else None)  # None: the default, every core
    assert_same_as_script(cs, out)
    assert cs.labels == adata.obs.loc[cs.cell_names, "cell_type"].astype(str).tolist()
    assert len(cs) == 235 and cs.preprocessed.n_obs == 235  # QC removed the 5 tiny cells
    assert (adata.X != before.X).sum() == 0 and adata.obs.equals(before.obs)  # the input is untouched
    # The inverse direction puts every gene back at its sentence's rank.
    back = sentences_to_adata(cs.sentences[:30], cs.genes, cs.fit, obs=cs.preprocessed.obs.iloc[:30])
    for i, sentence in enumerate(cs.sentences[:30]):
        row = back.X[i].toarray().ravel()
        assert back.var_names[np.argsort(-row, kind="stable")][: len(sentence.split())].tolist() == sentence.split()
    assert back.obs_names.tolist() == cs.cell_names[:30] and back.obs.columns.is_unique
    assert back.obs["n_genes"].tolist() == [len(s.split()) for s in cs.sentences[:30]]


def test_exclude_genes_and_target_sum_reach_the_kernel_in_the_script_and_the_api(tmp_path):
    adata = synthetic_counts(200, 400, seed=5)
    names = adata.var_names.to_numpy().copy()
    names[10:16] = [f"RPL{i}" for i in range(3)] + [f"RPS{i}" for i in range(3)]
    adata.var_names = names
    pattern = "^MT-|^RP[SL]"
    out = run_script(adata, tmp_path, "--exclude_genes", pattern, "--target_sum", "1000", "--max_mt_percent", "60")
    cs = adata_to_sentences(adata, qc=QCParams(min_genes_per_cell=50, max_mt_percent=60), exclude_genes=pattern,
                            target_sum=1000)
    assert_same_as_script(cs, out)
    excluded = [n for n in names if re.search(pattern, n)]
    assert len(excluded) == 11
    assert not set(cs.genes) & set(excluded)
    assert not any(set(s.split()) & set(excluded) for s in cs.sentences)
    # The QC still saw the MT- genes; normalization is over the genes left, to the target sum.
    assert cs.preprocessed.obs["pct_counts_mt"].max() > 0
    counts = adata[cs.cell_names[:5], cs.genes].X.toarray()
    expected = np.log10(1 + counts / counts.sum(axis=1, keepdims=True) * 1000)
    np.testing.assert_allclose(cs.preprocessed.X[:5].toarray(), expected, rtol=1e-5)
    plain = adata_to_sentences(adata, qc=QCParams(min_genes_per_cell=50, max_mt_percent=60))
    assert any(set(s.split()[:3]) & set(excluded) for s in plain.sentences)  # they did take top ranks


def test_a_cell_left_with_only_excluded_genes_is_dropped(tmp_path):
    adata = synthetic_counts(120, 300, seed=2)
    X = adata.X.tolil()
    X[7, :] = 0
    X[7, :5] = 4  # only MT- genes
    adata.X = X.tocsr()
    cs = adata_to_sentences(adata, qc=False, exclude_genes="^MT-")
    assert "cell0007" not in cs.cell_names and all(cs.sentences)
    out = run_script(adata, tmp_path, "--no_qc", "--exclude_genes", "^MT-")
    assert_same_as_script(cs, out)


def test_save_writes_the_scripts_contract(tmp_path):
    adata = synthetic_counts(240, 500, seed=0)
    out = run_script(adata, tmp_path, "--obs_columns", "donor")
    cs = adata_to_sentences(adata, qc=QCParams(min_genes_per_cell=50), obs_columns=["donor"])
    saved = cs.save(tmp_path / "saved", name="cells")
    for name in [f"{s}{x}" for s in SPLITS for x in (".txt", "_barcodes.txt", "_indices.npy")] + ["vocab.txt"]:
        assert (saved / "cell_sentences" / name).read_bytes() == (out / "cell_sentences" / name).read_bytes(), name
    theirs = datasets.load_from_disk(str(out / "cell_sentences_hf"))
    ours = datasets.load_from_disk(str(saved / "cell_sentences_hf"))
    assert {s: ours[s].to_dict() for s in SPLITS} == {s: theirs[s].to_dict() for s in SPLITS}
    assert ours["train"].features == theirs["train"].features
    # In memory: the splits share one table through indices mappings, with the same rows.
    in_memory = cs.to_dataset_dict()
    assert {s: in_memory[s].to_dict() for s in SPLITS} == {s: theirs[s].to_dict() for s in SPLITS}
    assert in_memory["valid"].map(lambda row: {"n": len(row["cell_sentence"].split())})["n"] == [
        len(t.split()) for t in theirs["valid"]["cell_sentence"]]
    assert cs.sentences == cs.sentence_array.to_pylist() and len(cs) == len(cs.sentences)
    assert load_transform_fit(saved / "eval" / "transformation_metrics.csv") == load_transform_fit(
        out / "eval" / "transformation_metrics.csv")
    pre, ref = ad.read_h5ad(saved / "cells_preprocessed.h5ad"), ad.read_h5ad(out / "cells_preprocessed.h5ad")
    assert (pre.X != ref.X).nnz == 0
    # both store text columns as categoricals (a missing label as NaN)
    pd.testing.assert_frame_equal(pre.obs, ref.obs)
    with pytest.raises(InputError, match="overwrite"):
        cs.save(saved, name="cells")


def test_bad_arguments_are_one_sentence():
    adata = synthetic_counts(50, 100, seed=1)
    with pytest.raises(InputError, match="no column 'nope'"):
        adata_to_sentences(adata, label_column="nope")
    with pytest.raises(InputError, match="regular expression"):
        adata_to_sentences(adata, exclude_genes="(")
    with pytest.raises(InputError, match="AnnData"):
        adata_to_sentences(adata.X)
    # the options the script checks are checked here too, before any work
    with pytest.raises(InputError, match=r"^chunk_size must be at least 1"):
        adata_to_sentences(adata, chunk_size=0)
    with pytest.raises(InputError, match=r"^split_fractions \[0.9, 0.9, 0.1\] .* add up to 1"):
        adata_to_sentences(adata, split_fractions=(0.9, 0.9, 0.1))
    with pytest.raises(InputError, match=r"^target_sum must be positive"):
        adata_to_sentences(adata, target_sum=0)


def test_the_readme_notebook_session_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- section: api -->")[1].split("<!-- /section: api -->")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    cs, back, ds = namespace["cs"], namespace["back"], namespace["ds"]
    printed = capsys.readouterr().out
    # The figures the README quotes are what the session prints.
    for quoted in re.findall(r"It prints `([^`]*)`", section) + re.findall(r"`(fit: slope [^`]*)`", section):
        assert quoted.rstrip(".") in printed
    assert "{'train': 554, 'valid': 69, 'test': 70}" in printed
    assert len(cs) == 693 and not any(g.startswith(("MT-", "RPS", "RPL")) for g in cs.genes)
    assert {s: len(ds[s]) for s in ds} == {"train": 554, "valid": 69, "test": 70}
    assert (tmp_path / "c2s_pbmc" / "pbmc68k_preprocessed.h5ad").is_file()
    # The inverse gives each cell's genes back in its sentence's order.
    row = back.X[0].toarray().ravel()
    genes = back.var_names[np.argsort(-row, kind="stable")][: int((row != 0).sum())].tolist()
    assert genes == cs.sentences[0].split()
    assert back.obs_names.tolist() == cs.cell_names


def test_default_threads_pickling_and_repr(tmp_path, monkeypatch):
    import pickle

    from utils.transform.sentences import MAX_DEFAULT_THREADS, default_threads

    adata = synthetic_counts(60, 200, seed=5)
    monkeypatch.delattr("os.sched_getaffinity", raising=False)  # as on macOS and Windows
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert default_threads() == MAX_DEFAULT_THREADS
    cs = adata_to_sentences(adata, qc=False, chunk_size=16)  # the default: 8 threads for 4 chunks
    assert cs.sentences == adata_to_sentences(adata, qc=False, num_proc=1).sentences
    back = pickle.loads(pickle.dumps(cs))
    assert back.sentences == cs.sentences and back.cell_names == cs.cell_names
    assert pickle.loads(pickle.dumps(cs)).__dict__["_sentences"] is None  # the Arrow strings only
    assert len(repr(cs)) < 2_000 and cs.sentences[0] not in repr(cs)
    saved = cs.save(tmp_path / "s", seed=cs.options.seed + 1)
    recorded = json.loads((saved / "transform_args.json").read_text())
    assert recorded["seed"] == cs.options.seed and recorded["split_seed"] == cs.options.seed + 1
    lines = (saved / "cell_sentences" / "valid.txt").read_text().splitlines()
    rows = np.load(saved / "cell_sentences" / "valid_indices.npy")
    assert lines == [cs.sentences[r] for r in rows] and len(lines) == 6
