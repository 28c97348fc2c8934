"""Reliability battery of the transform (issue 11): what users bring, one case per layout or
bad-input class. Every case states what a user gets: the sentences of the bare counts file, or
one sentence naming the flag to fix.

Run alone with ``python -m pytest -q tests/test_reliability_transform.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from helpers import synthetic_counts, write_h5ad

import transform
import utils.transform.pipeline
from utils.cli import InputError
from utils.transform.fit import fit_rank_expression
from utils.transform.pipeline import SPLITS

FLAGS = ("--min_genes_per_cell", "20", "--chunk_size", "64")


def run(h5ad: Path, out: Path, *extra: str) -> dict:
    return transform.main(transform.parse_args(["--data_filepath", str(h5ad), "--output_dir", str(out), *extra]))


def sentences(out: Path) -> dict[str, list[str]]:
    text = out / "cell_sentences"
    return {f"{s}{part}": (text / f"{s}{part}").read_text().splitlines()
            for s in SPLITS for part in (".txt", "_barcodes.txt")}


def preprocessed(out: Path) -> np.ndarray:
    return ad.read_h5ad(next(out.glob("*_preprocessed.h5ad"))).X.toarray()


def relative(log10_values: np.ndarray) -> np.ndarray:
    linear = 10.0 ** log10_values.astype(np.float64) - 1.0
    return linear / linear.sum(axis=1, keepdims=True)


def _counts() -> ad.AnnData:
    """Counts as deep as real data: values in the thousands (expm1 of them overflows)."""
    adata = synthetic_counts(150, 300, seed=11)
    adata.X.data = np.round(adata.X.data * 37.0)
    assert adata.X.max() > 1000
    return adata


def _log1p(counts: ad.AnnData, base: float | None) -> sp.csr_matrix:
    """X as scanpy users make it: normalize_total to 1e4, then log1p (records uns["log1p"])."""
    logged = counts.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged, base=base)
    return logged.X, logged.uns["log1p"]


def _scanpy_layout(*, where: str, dtype, base: float | None = None) -> ad.AnnData:
    """Counts kept in ``where`` (layers["counts"] or .raw), X their log1p, uns["log1p"] set."""
    counts = _counts()
    stored = counts.X.astype(dtype)
    adata = counts.copy()
    adata.X, adata.uns["log1p"] = _log1p(counts, base)
    if where == "layer":
        adata.layers["counts"] = stored
    else:
        adata.raw = ad.AnnData(X=stored, var=counts.var)
    return adata


def _raw_holds_log1p(base: float | None) -> ad.AnnData:
    """.raw holds log1p(normalized) in ``base`` while uns["log1p"] (natural log) describes X."""
    counts = _counts()
    adata = counts.copy()
    adata.X, adata.uns["log1p"] = _log1p(counts, None)
    adata.raw = ad.AnnData(X=_log1p(counts, base)[0], var=counts.var)
    return adata


def _stale_uns() -> ad.AnnData:
    """X still holds the counts, but uns["log1p"] was copied over from another object."""
    adata = _counts()
    adata.uns["log1p"] = {"base": None}
    return adata


LAYOUTS = {
    "layers_counts_int64_X_log1p": (lambda: _scanpy_layout(where="layer", dtype=np.int64), ()),
    "layers_counts_float32_X_log1p": (lambda: _scanpy_layout(where="layer", dtype=np.float32), ()),
    "layer_flag_counts_X_log1p": (lambda: _scanpy_layout(where="layer", dtype=np.int32), ("--layer", "counts")),
    "raw_counts_float32_X_log1p_natural": (lambda: _scanpy_layout(where="raw", dtype=np.float32), ()),
    "raw_counts_int64_X_log1p_natural": (lambda: _scanpy_layout(where="raw", dtype=np.int64), ()),
    "raw_counts_float64_X_log1p_base10": (lambda: _scanpy_layout(where="raw", dtype=np.float64, base=10), ()),
    "raw_counts_int32_X_log1p_base2": (lambda: _scanpy_layout(where="raw", dtype=np.int32, base=2), ()),
    "raw_log1p_base10_uns_natural_for_X": (lambda: _raw_holds_log1p(10.0), ()),
    "X_counts_with_stale_uns_log1p": (_stale_uns, ()),
}


@pytest.fixture(scope="module")
def bare_counts(tmp_path_factory) -> tuple[dict[str, list[str]], np.ndarray]:
    root = tmp_path_factory.mktemp("bare")
    run(write_h5ad(_counts(), root / "bare.h5ad"), root / "out", *FLAGS)
    return sentences(root / "out"), preprocessed(root / "out")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_scanpy_layout_gives_the_sentences_of_the_bare_counts(layout, bare_counts, tmp_path):
    make, flags = LAYOUTS[layout]
    adata = make()
    run(write_h5ad(adata, tmp_path / "a.h5ad"), tmp_path / "out", *FLAGS, *flags)
    got = sentences(tmp_path / "out")
    assert sum(len(v) for k, v in got.items() if k.endswith(".txt")) > 100
    assert got == bare_counts[0]
    # and the preprocessed values are the counts' relative expression (log1p input keeps its own
    # normalization, made before the gene filter, so compare within each cell)
    np.testing.assert_allclose(relative(preprocessed(tmp_path / "out")), relative(bare_counts[1]), rtol=1e-3)


def test_read_as_log1p_on_counts_stops_naming_input_kind(tmp_path):
    adata = _scanpy_layout(where="layer", dtype=np.float32)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"--input_kind log1p, but layers\['counts'\] cannot hold log1p.*"
                                         r"whole number.*--input_kind counts"):
        run(write_h5ad(adata, tmp_path / "a.h5ad"), out, *FLAGS, "--layer", "counts", "--input_kind", "log1p")
    assert not out.exists() or not any(out.iterdir())


def test_counts_past_the_detection_sample_of_log1p_data_stop_naming_input_kind(tmp_path, monkeypatch):
    monkeypatch.setattr(utils.transform.pipeline, "DETECTION_CELLS", 50)  # the detection sees cells 0-49 only
    counts = _counts()
    adata = counts.copy()
    logged, adata.uns["log1p"] = _log1p(counts, None)
    adata.X = sp.vstack([logged[:100], counts.X[100:]]).tocsr()  # later cells hold counts (a bad concatenation)
    with pytest.raises(InputError, match=r"cells from 64 on reach .* pass --input_kind counts"):
        run(write_h5ad(adata, tmp_path / "a.h5ad"), tmp_path / "out", *FLAGS)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fit_fed_non_finite_values_is_a_sentence(bad):
    log_rank = np.log10(1 + np.arange(100.0))
    log_expression = 2.0 - 0.5 * log_rank
    log_expression[7] = bad
    with pytest.raises(ValueError, match=r"Cannot fit the rank-expression line: 1 of 100 log_expression values "
                                         r"are NaN or infinite\."):
        fit_rank_expression(log_rank, log_expression)


@pytest.mark.parametrize("figure", ["plot_log_rank_fit", "plot_reconstruction"])
def test_figure_fed_non_finite_values_is_a_sentence(figure, tmp_path):
    from utils.evaluation import figures as plots

    log_rank = np.log10(1 + np.arange(100.0))
    fit = fit_rank_expression(log_rank, 2.0 - 0.5 * log_rank)
    values = 2.0 - 0.5 * log_rank
    values[3] = np.inf
    with pytest.raises(ValueError, match=r"Cannot draw f\.png: 1 of 100 .* values are NaN or infinite\."):
        getattr(plots, figure)(log_rank if figure == "plot_log_rank_fit" else values,
                               values if figure == "plot_log_rank_fit" else fit.predict(log_rank),
                               fit, tmp_path / "f.png", seed=0)
    assert not (tmp_path / "f.png").exists()


def test_r_squared_is_the_original_over_every_expressed_gene(tmp_path):
    """R² as the original computes it: sklearn's r2_score of the line's prediction against every
    expressed gene of the evaluated cells (like Pearson and Spearman r), while n_points counts
    the points the line was fitted on; recomputed here from the written outputs alone."""
    from sklearn.metrics import r2_score

    out = tmp_path / "out"
    run(write_h5ad(_counts(), tmp_path / "a.h5ad"), out, *FLAGS, "--fit_threshold", "1.5")
    pre = ad.read_h5ad(out / "a_preprocessed.h5ad")
    row = {name: i for i, name in enumerate(pre.obs_names)}
    column = {name: j for j, name in enumerate(pre.var_names)}
    log_rank, log_expression = [], []
    texts = sentences(out)
    for split in SPLITS:  # every cell is evaluated (fewer than --eval_cells)
        for barcode, sentence in zip(texts[f"{split}_barcodes.txt"], texts[f"{split}.txt"], strict=True):
            values = pre.X[row[barcode]].toarray().ravel()
            genes = sentence.split()
            log_rank += list(np.log10(1.0 + np.arange(len(genes))))
            log_expression += [values[column[g]] for g in genes]
    x, y = np.array(log_rank), np.array(log_expression, dtype=np.float64)
    in_fit = x < 1.5
    slope, intercept = np.polyfit(x[in_fit], y[in_fit], 1)
    metrics = pd.read_csv(out / "eval" / "transformation_metrics.csv").iloc[0]
    assert metrics["slope"] == pytest.approx(slope, rel=1e-5)
    assert metrics["n_points"] == in_fit.sum() < len(x)  # the fit saw part of the points
    expected = r2_score(y, intercept + slope * x)
    assert metrics["r_squared"] == pytest.approx(expected, abs=1e-5)
    assert abs(r2_score(y[in_fit], intercept + slope * x[in_fit]) - expected) > 0.01  # not the fit's own R²


# --- labels, cell names and QC messages (issue 11, section 6) ---------------------------------


def _labelled(labels) -> ad.AnnData:
    adata = synthetic_counts(90, 250, seed=12)
    adata.obs["cell_type"] = labels(adata.obs["cell_type"])
    return adata


def _with_nan(types: pd.Series) -> pd.Series:
    types = types.astype(object).copy()
    types.iloc[::7] = np.nan
    return pd.Series(pd.Categorical(types), index=types.index)  # categorical with NaN, as scanpy has


def _with_none(types: pd.Series) -> pd.Series:
    types = types.astype(object).copy()
    types.iloc[::5] = None
    return types


@pytest.mark.parametrize("labels", [_with_nan, _with_none], ids=["categorical_nan", "object_none"])
def test_cells_without_a_label_keep_their_sentence_and_a_missing_label(labels, tmp_path, caplog):
    import datasets

    from utils.models.examples import tokenize_batch
    from utils.models.prompts import prompt_words
    from utils.models.tokenizer import build_word_tokenizer

    adata = _labelled(labels)
    missing = set(adata.obs_names[adata.obs["cell_type"].isna()])
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="cell2sentence"):
        run(write_h5ad(adata, tmp_path / "a.h5ad"), out, "--min_genes_per_cell", "5")
    assert f"{len(missing)} of 90 cells have no label" in caplog.text
    hf = datasets.load_from_disk(str(out / "cell_sentences_hf"))
    pre = ad.read_h5ad(out / "a_preprocessed.h5ad")
    seen = 0
    for split in SPLITS:
        for row in hf[split]:
            assert row["cell_sentence"]
            expected = None if row["cell_name"] in missing else adata.obs.loc[row["cell_name"], "cell_type"]
            assert row["cell_type"] == expected
            assert pd.isna(pre.obs.loc[row["cell_name"], "cell_type"]) == (expected is None)
            seen += row["cell_name"] in missing
    assert seen == len(missing) > 0
    # train.py: a cell without a label gets only untyped tasks, a labelled one may get any
    train = hf["train"][:]
    tokenizer = build_word_tokenizer(train["cell_sentence"], extra_words=prompt_words(["type 0", "type 1", "type 2"]))
    examples = tokenize_batch(train, list(range(len(train["cell_name"]))), tokenizer=tokenizer,
                              tasks={"cell_type_prediction": 0.5, "unconditional_generation": 0.5},
                              top_k=20, max_length=256, seed=0, split="train")
    tasks = dict(zip(train["cell_name"], examples["task"], strict=True))
    assert {tasks[c] for c in missing if c in tasks} == {"unconditional_generation"}
    assert "cell_type_prediction" in {tasks[c] for c in tasks if c not in missing}


@pytest.mark.parametrize(("label", "token"), [("T <eos> cell", "<eos>"), ("<pad>", "<pad>"), ("B<bos>", "<bos>"),
                                              ("<unk> type", "<unk>"), ("NK<|endoftext|>", "<|endoftext|>")])
def test_labels_with_a_special_token_are_refused_before_any_work(label, token, tmp_path):
    adata = _labelled(lambda t: t.astype(str).where(np.arange(len(t)) % 9 != 4, label))
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"obs\['cell_type'\] label .* holds the special token '{re.escape(token)}'"):
        run(write_h5ad(adata, tmp_path / "a.h5ad"), out, "--min_genes_per_cell", "5")
    assert not out.exists() or not any(out.iterdir())


def test_our_tokenizers_special_tokens_are_all_refused():
    from utils.models.tokenizer import SPECIAL_TOKENS
    from utils.transform.labels import SPECIAL_TOKEN

    assert all(SPECIAL_TOKEN.fullmatch(t) for t in SPECIAL_TOKENS)
    assert not SPECIAL_TOKEN.search("CD4+ T cell (alpha<beta)")


@pytest.mark.parametrize("label", ["CD4\nT cell", "CD4\r\nT cell", "CD4\tT cell"])
def test_labels_with_line_breaks_become_one_line(label, tmp_path, caplog):
    adata = _labelled(lambda t: pd.Categorical(t.astype(str).where(np.arange(len(t)) % 3 != 0, label)))
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="cell2sentence"):
        run(write_h5ad(adata, tmp_path / "a.h5ad"), out, "--min_genes_per_cell", "5")
    import datasets

    hf = datasets.load_from_disk(str(out / "cell_sentences_hf"))
    types = [t for s in SPLITS for t in hf[s]["cell_type"]]
    assert not any(re.search(r"[\n\r\t]", t) for t in types) and "CD4 T cell" in types
    for split in SPLITS:  # one line per cell in the text outputs
        n = len(hf[split])
        assert len((out / "cell_sentences" / f"{split}_barcodes.txt").read_text().splitlines()) == n
    assert "Replaced line breaks, tabs and runs of spaces by one space" in caplog.text


def test_duplicate_cell_names_are_made_unique_and_inverse_evaluates(tmp_path, caplog):
    import inverse

    adata = synthetic_counts(90, 250, seed=13)
    names = adata.obs_names.tolist()
    names[10:20] = names[:10]  # ten names twice, as after concatenating two samples
    adata.obs_names = names
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="cell2sentence"):
        run(write_h5ad(adata, tmp_path / "a.h5ad"), out, "--min_genes_per_cell", "5")
    pre = ad.read_h5ad(out / "a_preprocessed.h5ad")
    assert pre.obs_names.is_unique and "cell0003-1" in pre.obs_names
    assert pre.obs.loc["cell0003-1", "original_cell_name"] == "cell0003"
    barcodes = [b for s in SPLITS for b in (out / "cell_sentences" / f"{s}_barcodes.txt").read_text().split()]
    assert sorted(barcodes) == sorted(pre.obs_names)
    inverse.main(inverse.parse_args(["--sentences", str(out / "cell_sentences" / "train.txt"),
                                              "--transform_dir", str(out), "--output", str(tmp_path / "inv.h5ad"),
                                              "--evaluate"]))
    back = ad.read_h5ad(tmp_path / "inv.h5ad")
    assert back.obs_names.tolist() == (out / "cell_sentences" / "train_barcodes.txt").read_text().split()
    metrics = json.loads((tmp_path / "inv_metrics.json").read_text())
    assert metrics["reconstruction"]["n_cells"] == len(back) and metrics["reconstruction"]["pearson_r"] > 0.5
    assert "10 cell names are repeated" in caplog.text


def test_qc_message_of_a_single_cell_names_a_real_flag(tmp_path):
    adata = synthetic_counts(30, 250, seed=14)[20:21].copy()
    with pytest.raises(InputError, match=r"--min_cells_per_gene 3 removed every gene of the 1 cells .* lower it or "
                                         r"pass --no_qc") as err:
        run(write_h5ad(adata, tmp_path / "a.h5ad"), tmp_path / "out", "--min_genes_per_cell", "5")
    assert "no_expressed_genes" not in str(err.value)


def test_qc_message_with_no_qc_does_not_talk_about_min_genes(tmp_path):
    adata = synthetic_counts(30, 250, seed=14)
    adata.X = sp.csr_matrix(adata.shape, dtype=np.float32)
    with pytest.raises(InputError, match=r"all 30 cells of .* are empty") as err:
        run(write_h5ad(adata, tmp_path / "a.h5ad"), tmp_path / "out", "--no_qc")
    assert "--min_genes_per_cell" not in str(err.value) and "--no_qc" not in str(err.value)


def test_the_api_gives_the_same_missing_labels_and_unique_names():
    from utils import adata_to_sentences
    from utils.transform.preprocess import QCParams

    adata = _labelled(_with_nan)
    names = adata.obs_names.tolist()
    names[21] = names[20]  # both kept (the first five cells are tiny)
    adata.obs_names = names
    cs = adata_to_sentences(adata, qc=QCParams(min_genes_per_cell=5))
    missing = adata.obs["cell_type"].isna().to_numpy()
    kept = [n in set(cs.cell_names) for n in ad.utils.make_index_unique(adata.obs_names.astype(str))]
    assert [x is None for x in cs.labels] == missing[kept].tolist() and any(missing[kept])
    assert len(set(cs.cell_names)) == len(cs.cell_names) and "cell0020-1" in cs.cell_names
    dd = cs.to_dataset_dict()
    assert sum(x is None for s in SPLITS for x in dd[s]["cell_type"]) == int(missing[kept].sum())


def test_cells_without_a_label_are_left_out_of_generate(one_thread, tmp_path):
    """Downstream of the missing labels: train.py trains on them (untyped tasks only) and
    generate.py neither generates a "None" type nor counts one (prediction is predict.py's since
    issue 18, and tested with it)."""
    from datasets import load_from_disk
    from helpers_train import make_dataset_dir

    import generate
    import train

    data = make_dataset_dir(tmp_path / "hf", n_train=60, n_valid=10, n_test=20)
    dd = load_from_disk(str(data))
    nulls = {split: [None if i % 4 == 1 else t for i, t in enumerate(dd[split]["cell_type"])] for split in dd}
    for split in dd:
        dd[split] = dd[split].remove_columns("cell_type").add_column("cell_type", nulls[split])
    data = tmp_path / "hf_nulls"
    dd.save_to_disk(str(data))
    model = train.main(train.parse_args([
        "--data_dir", str(data), "--output_dir", str(tmp_path / "model"), "--run_name", "tiny", "--max_steps", "3",
        "--init_from_scratch", "True", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--n_positions", "128",
        "--top_k_genes", "8", "--per_device_train_batch_size", "8", "--disable_tqdm", "True"]))
    out = tmp_path / "gen"
    generate.main(generate.parse_args(["--model_dir", str(model), "--data_dir", str(data), "--output_dir", str(out),
                                       "--n_per_type", "1", "--batch_size", "8", "--max_new_tokens", "12"]))
    requested = (out / "generated_labels.txt").read_text().splitlines()
    assert "None" not in requested and sorted(requested) == sorted({t for t in nulls["test"] if t is not None})
    assert "None" not in (out / "metrics.json").read_text()


# --- determinism as documented (issue 11, section 7) ------------------------------------------


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "transform_args.json"}  # it records the flags


def test_outputs_are_identical_as_the_readme_says(tmp_path):
    """Any --num_proc: every file byte-identical. Any --chunk_size: every file byte-identical
    but the .arrow files, whose tables are equal (record batches follow the chunks)."""
    import pyarrow as pa

    h5ad = write_h5ad(_counts(), tmp_path / "a.h5ad")
    runs = {}
    for name, flags in {"base": ("--chunk_size", "64"), "workers": ("--chunk_size", "64", "--num_proc", "2"),
                        "chunks": ("--chunk_size", "23", "--num_proc", "2")}.items():
        run(h5ad, tmp_path / name, "--min_genes_per_cell", "20", *flags)
        runs[name] = _files(tmp_path / name)
    assert runs["workers"] == runs["base"]
    arrow = [n for n in runs["base"] if n.endswith(".arrow")]
    assert len(arrow) == 3 and set(runs["chunks"]) == set(runs["base"])
    assert {n: b for n, b in runs["chunks"].items() if n not in arrow} == {
        n: b for n, b in runs["base"].items() if n not in arrow}
    for name in arrow:
        tables = [pa.ipc.open_stream(runs[r][name]).read_all() for r in ("base", "chunks")]
        assert tables[0].num_rows > 0 and tables[0].equals(tables[1], check_metadata=True)


@pytest.mark.parametrize(("label", "message"), [("CD4\nT cell", "line break"), ("T <eos>", "special token '<eos>'")])
def test_train_refuses_a_dataset_label_that_would_break_lines_or_answers(label, message, tmp_path):
    """Datasets not made by transform.py: train.py checks the labels before building anything,
    so generate.py's generated_labels.txt stays one line per cell."""
    from datasets import load_from_disk
    from helpers_train import make_dataset_dir

    import train

    dd = load_from_disk(str(make_dataset_dir(tmp_path / "hf", n_train=20, n_valid=4, n_test=4)))
    types = list(dd["train"]["cell_type"])
    types[3] = label
    dd["train"] = dd["train"].remove_columns("cell_type").add_column("cell_type", types)
    dd.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(InputError, match=rf"column 'cell_type' label .* {re.escape(message)}"):
        train.main(train.parse_args(["--data_dir", str(tmp_path / "bad"), "--output_dir", str(tmp_path / "model"),
                                     "--init_from_scratch", "True", "--max_steps", "1"]))
    assert not (tmp_path / "model").exists() or not any((tmp_path / "model").rglob("config.json"))
