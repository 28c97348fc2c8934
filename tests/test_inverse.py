"""utils/inverse.py and inverse.py: exact values, post-processing cases, round trips, the script."""

from __future__ import annotations

import json
import random
from pathlib import Path

import anndata as ad
import numba
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from helpers import synthetic_counts, write_h5ad

import inverse
from utils.cli import InputError
from utils.inverse import (
    build_vocab_index,
    load_transform_fit,
    load_vocab,
    read_sentence_file,
    sentence_bytes,
    sentences_to_expression,
    zero_crossing_rank,
)
from utils.transform.fit import RankExpressionFit

FIT = RankExpressionFit(slope=-1.0, intercept=2.0)
VOCAB = ["A", "B", "C", "Dx", "e1"]


def value(rank: float) -> float:
    return 2.0 - np.log10(1.0 + rank)


def dense(result) -> np.ndarray:
    return result.X.toarray().astype(np.float64)


def test_exact_values_and_counts() -> None:
    res = sentences_to_expression(["B A C", "C", ""], VOCAB, FIT)
    expected = np.zeros((3, 5))
    expected[0, [1, 0, 2]] = [value(0), value(1), value(2)]
    expected[1, 2] = value(0)
    np.testing.assert_allclose(dense(res), expected, rtol=1e-6)
    assert res.X.dtype == np.float32 and res.X.format == "csr" and res.X.has_sorted_indices
    assert res.n_words.tolist() == [3, 1, 0]
    assert res.n_genes.tolist() == [3, 1, 0]
    assert res.n_invalid_genes.tolist() == [0, 0, 0]
    assert res.n_duplicate_genes.tolist() == [0, 0, 0]


def test_unknown_words_keep_their_place() -> None:
    res = sentences_to_expression(["zz B qq A", "nope never"], VOCAB, FIT)
    np.testing.assert_allclose(dense(res)[0], [value(3), value(1), 0, 0, 0], rtol=1e-6)
    assert res.X[1].nnz == 0
    assert res.n_invalid_genes.tolist() == [2, 2]
    assert res.n_genes.tolist() == [2, 0]
    assert res.n_words.tolist() == [4, 2]


def test_duplicates_are_placed_once_at_their_average_position() -> None:
    res = sentences_to_expression(["A B A C A"], VOCAB, FIT)
    # A at 0, 2, 4 -> average 2; B at 1; C at 3.
    np.testing.assert_allclose(dense(res)[0], [value(2), value(1), value(3), 0, 0], rtol=1e-6)
    assert res.n_duplicate_genes.tolist() == [2]
    assert res.n_genes.tolist() == [3]
    assert res.n_words.tolist() == [5]


def test_whitespace_runs_and_empty_sentences() -> None:
    res = sentences_to_expression(["  A\t\tB  ", "   ", "\n"], VOCAB, FIT)
    np.testing.assert_allclose(dense(res)[0], [value(0), value(1), 0, 0, 0], rtol=1e-6)
    assert res.n_words.tolist() == [2, 0, 0]
    assert res.X.shape == (3, 5)


def test_no_sentences() -> None:
    res = sentences_to_expression([], VOCAB, FIT)
    assert res.X.shape == (0, 5) and res.X.nnz == 0


def test_case_is_exact_unless_asked() -> None:
    exact = sentences_to_expression(["a dX E1 B"], VOCAB, FIT)
    assert exact.n_invalid_genes.tolist() == [3]
    np.testing.assert_allclose(dense(exact)[0], [0, value(3), 0, 0, 0], rtol=1e-6)
    folded = sentences_to_expression(["a dX E1 B"], VOCAB, FIT, case_insensitive=True)
    assert folded.n_invalid_genes.tolist() == [0]
    assert folded.n_case_folded_genes.tolist() == [3]
    np.testing.assert_allclose(dense(folded)[0], [value(0), value(3), 0, value(1), value(2)], rtol=1e-6)


def test_case_folding_prefers_the_exact_gene() -> None:
    vocab = ["Ab", "AB", "x"]
    res = sentences_to_expression(["AB ab Ab"], vocab, FIT, case_insensitive=True)
    # "AB" and "Ab" match exactly; "ab" folds to the first of them in vocabulary order ("Ab"),
    # which then repeats: Ab at positions 1 and 2 -> 1.5.
    np.testing.assert_allclose(dense(res)[0], [value(1.5), value(0), 0], rtol=1e-6)
    assert res.n_duplicate_genes.tolist() == [1]


def test_case_folding_is_ascii_only_and_counted_within_max_words(caplog) -> None:
    vocab = ["É1", "GENELONGNAME9", "genelongname9", "x"]
    with caplog.at_level("WARNING", logger="cell2sentence"):
        res = sentences_to_expression(["é1 GeneLongName9 genelongname9 X GENELONGNAME9 x X"], vocab, FIT,
                                      case_insensitive=True, max_words=6)
    assert [r.getMessage() for r in caplog.records] == [
        "1 vocabulary genes differ from another only by letter case; under case-insensitive matching they map "
        "to the first of them."]
    # é1: no ASCII fold to É1, unknown. GeneLongName9 folds to the first of its folded name (column 1),
    # which the exact GENELONGNAME9 then repeats (1 and 4 -> 2.5); genelongname9 matches itself exactly;
    # X folds to x, which repeats it (3 and 5 -> 4); the 7th word is past max_words.
    np.testing.assert_allclose(dense(res)[0], [0, value(2.5), value(2), value(4)], rtol=1e-6)
    assert res.n_words.tolist() == [6]
    assert res.n_invalid_genes.tolist() == [1]
    assert res.n_case_folded_genes.tolist() == [2]
    assert res.n_duplicate_genes.tolist() == [2]
    assert res.n_genes.tolist() == [3]


def test_max_words_keeps_the_top_genes() -> None:
    res = sentences_to_expression(["C B A", "xx A B"], VOCAB, FIT, max_words=2)
    np.testing.assert_allclose(dense(res), [[0, value(1), value(0), 0, 0], [value(1), 0, 0, 0, 0]], rtol=1e-6)
    assert res.n_words.tolist() == [2, 2]


def test_negative_values_kept_or_clipped() -> None:
    fit = RankExpressionFit(slope=-1.0, intercept=0.5)  # crossing at rank 10**0.5 - 1 ≈ 2.16
    assert zero_crossing_rank(fit) == pytest.approx(10**0.5 - 1)
    kept = sentences_to_expression(["A B C Dx e1"], VOCAB, fit)
    row = dense(kept)[0]
    assert row[2] > 0 and (row[3:] < 0).all() and kept.X.nnz == 5
    assert np.argsort(-row).tolist() == [0, 1, 2, 3, 4]  # the order stays exact
    clipped = sentences_to_expression(["A B C Dx e1"], VOCAB, fit, clip_negative=True)
    np.testing.assert_allclose(
        dense(clipped)[0], [0.5, 0.5 - np.log10(2), 0.5 - np.log10(3), 0, 0], rtol=1e-6
    )
    assert clipped.X.nnz == 3 and clipped.n_clipped == 2
    assert clipped.n_genes.tolist() == [5]  # genes placed, before clipping


def test_round_trip_order_is_exact_on_random_sentences() -> None:
    rng = random.Random(0)
    vocab = [f"G{i}" for i in range(3_000)]
    sentences = [" ".join(rng.sample(vocab, rng.randint(0, 2_500))) for _ in range(60)]
    # A realistic fit crosses zero at rank ~ 8,900: deep ranks stay positive here; with an
    # intercept of 2 they cross at 99 and are kept negative, the order exact either way.
    for fit in (RankExpressionFit(-0.76, 3.0), RankExpressionFit(-1.0, 2.0)):
        res = sentences_to_expression(sentences, vocab, fit)
        for i, sentence in enumerate(sentences):
            row = res.X[i]
            order = row.indices[np.argsort(-row.data, kind="stable")]
            assert [vocab[g] for g in order] == sentence.split()


def test_same_result_for_any_number_of_threads() -> None:
    rng = random.Random(1)
    vocab = [f"G{i}" for i in range(500)]
    sentences = [" ".join(rng.choices(vocab + ["junk"], k=rng.randint(0, 300))) for _ in range(101)]
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = sentences_to_expression(sentences, vocab, FIT)
        numba.set_num_threads(before)
        many = sentences_to_expression(sentences, vocab, FIT)
    finally:
        numba.set_num_threads(before)
    assert (one.X != many.X).nnz == 0
    assert one.n_duplicate_genes.tolist() == many.n_duplicate_genes.tolist()
    assert one.n_duplicate_genes.sum() > 0 and one.n_invalid_genes.sum() > 0


def test_arrow_input_with_offset_and_nulls() -> None:
    arr = pa.array(["A", "B C", None, "C A"]).slice(1)
    res = sentences_to_expression(arr, VOCAB, FIT)
    np.testing.assert_allclose(
        dense(res), [[0, value(0), value(1), 0, 0], [0] * 5, [value(1), 0, value(0), 0, 0]], rtol=1e-6
    )
    chunked = pa.chunked_array([pa.array(["A"]), pa.array(["B"])])
    assert sentence_bytes(chunked).n == 2


def test_read_sentence_file_lines(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_bytes(b"A B\r\n\nC\nB A")  # CRLF, an empty line, no final newline
    packed = read_sentence_file(path)
    res = sentences_to_expression(packed, VOCAB, FIT)
    assert packed.n == 4
    assert res.n_words.tolist() == [2, 0, 1, 2]
    path.write_bytes(b"A\n")
    assert read_sentence_file(path).n == 1
    path.write_bytes(b"")
    assert read_sentence_file(path).n == 0


def test_vocab_and_fit_loaders(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text("B 10\nA 3\n")
    assert load_vocab(tmp_path / "vocab.txt") == ["B", "A"]
    (tmp_path / "m.csv").write_text("slope,intercept,r_squared\n-0.5,1.5,0.9\n")
    # the reported scores come along where the file has them
    assert load_transform_fit(tmp_path / "m.csv") == RankExpressionFit(-0.5, 1.5, r_squared=0.9)
    with pytest.raises(InputError, match="does not exist"):
        load_vocab(tmp_path / "missing.txt")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="slope/intercept"):
        load_transform_fit(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="more than once"):
        build_vocab_index(["A", "A"])


# ------------------------------------------------------------------------------ the script


def write_transform_dir(root: Path, vocab: list[str], fit: RankExpressionFit) -> Path:
    (root / "cell_sentences").mkdir(parents=True)
    (root / "eval").mkdir()
    (root / "cell_sentences" / "vocab.txt").write_text("".join(f"{g} 1\n" for g in vocab))
    pd.DataFrame([{"slope": fit.slope, "intercept": fit.intercept, "r_squared": 0.9, "pearson_r": 0.95,
                   "spearman_r": 0.9, "threshold": 3.0, "n_points": 10}]).to_csv(
        root / "eval" / "transformation_metrics.csv", index=False)
    return root


def test_main_txt_with_labels_and_names(tmp_path: Path) -> None:
    tdir = write_transform_dir(tmp_path / "t", VOCAB, FIT)
    sents = tmp_path / "gen.txt"
    sents.write_text("B A\nq A A\n")
    (tmp_path / "gen_barcodes.txt").write_text("c1\nc2\n")
    (tmp_path / "labels.txt").write_text("T cell\nB cell\n")
    out = tmp_path / "inv" / "gen.h5ad"
    argv = ["--sentences", str(sents), "--transform_dir", str(tdir), "--output", str(out),
            "--labels", str(tmp_path / "labels.txt"), "--labels_key", "requested_cell_type", "--evaluate"]
    inverse.main(inverse.parse_args(argv))
    adata = ad.read_h5ad(out)
    assert adata.obs_names.tolist() == ["c1", "c2"]
    assert adata.var_names.tolist() == VOCAB
    assert adata.obs["requested_cell_type"].tolist() == ["T cell", "B cell"]
    assert adata.obs["n_invalid_genes"].tolist() == [0, 1]
    assert adata.obs["n_duplicate_genes"].tolist() == [0, 1]
    assert adata.obs["n_genes"].tolist() == [2, 1]
    np.testing.assert_allclose(adata.X.toarray(), [[value(1), value(0), 0, 0, 0], [value(1.5), 0, 0, 0, 0]],
                               rtol=1e-6)
    metrics = json.loads((tmp_path / "inv" / "gen_metrics.json").read_text())
    assert metrics["sentences"]["valid_gene_rate"] == pytest.approx(4 / 5)
    assert metrics["sentences"]["duplicate_rate"] == pytest.approx(1 / 5)
    assert (tmp_path / "inv" / "gen_args.json").is_file()
    with pytest.raises(InputError, match="--overwrite"):
        inverse.main(inverse.parse_args(argv))
    (tmp_path / "labels.txt").write_text("only one\n")
    with pytest.raises(InputError, match="1 labels for 2 sentences"):
        inverse.main(inverse.parse_args([*argv, "--overwrite"]))


def test_transform_then_inverse_reproduces_the_fit(tmp_path: Path) -> None:
    import transform

    h5ad = write_h5ad(synthetic_counts(300, 500, seed=3), tmp_path / "syn.h5ad")
    out = tmp_path / "out"
    transform.main(transform.parse_args(["--data_filepath", str(h5ad), "--output_dir", str(out),
                                         "--min_genes_per_cell", "0"]))
    reported = pd.read_csv(out / "eval" / "transformation_metrics.csv").iloc[0]
    target = tmp_path / "inv" / "test.h5ad"
    adata = inverse.main(inverse.parse_args([
        "--sentences", str(out / "cell_sentences_hf"), "--split", "test", "--transform_dir", str(out),
        "--output", str(target), "--evaluate"]))
    metrics = json.loads((tmp_path / "inv" / "test_metrics.json").read_text())
    rec = metrics["reconstruction"]
    assert rec["n_cells"] == adata.n_obs > 0
    assert rec["pearson_r"] == pytest.approx(reported["pearson_r"], abs=0.05)
    assert metrics["sentences"]["valid_gene_rate"] == 1.0
    # The txt split gives the same matrix (names from test_barcodes.txt).
    from_txt = inverse.main(inverse.parse_args([
        "--sentences", str(out / "cell_sentences" / "test.txt"), "--transform_dir", str(out),
        "--output", str(tmp_path / "inv" / "txt.h5ad")]))
    assert from_txt.obs_names.tolist() == adata.obs_names.tolist()
    assert (from_txt.X != adata.X).nnz == 0
    # The order of each reconstructed cell is its sentence.
    sentences = (out / "cell_sentences" / "test.txt").read_text().splitlines()
    for i, sentence in enumerate(sentences):
        row = adata.X[i]
        assert adata.var_names[row.indices[np.argsort(-row.data, kind="stable")]].tolist() == sentence.split()
    assert adata.obs["cell_type"].notna().all()
    assert metrics["knn_cell_type"]["knn_ceiling"] > 0.8
    # Both label columns in one run (the real cells built once) score as each alone.
    import datasets

    test = datasets.load_from_disk(str(out / "cell_sentences_hf"))["test"]
    test.add_column("requested_cell_type", test["cell_type"][::-1]).save_to_disk(str(tmp_path / "both"))
    test.remove_columns("cell_type").add_column("requested_cell_type", test["cell_type"][::-1]).save_to_disk(
        str(tmp_path / "req_only"))
    scored = {}
    for name in ("both", "req_only"):
        inverse.main(inverse.parse_args(["--sentences", str(tmp_path / name), "--transform_dir", str(out),
                                         "--output", str(tmp_path / "inv" / f"{name}.h5ad"), "--evaluate"]))
        scored[name] = json.loads((tmp_path / "inv" / f"{name}_metrics.json").read_text())
    assert scored["both"]["knn_cell_type"] == metrics["knn_cell_type"]
    assert "knn_cell_type" not in scored["req_only"]
    assert scored["both"]["knn_requested_cell_type"] == scored["req_only"]["knn_requested_cell_type"]
    assert scored["both"]["knn_requested_cell_type"]["knn_ceiling"] == metrics["knn_cell_type"]["knn_ceiling"]
    assert scored["both"]["knn_requested_cell_type"]["knn_accuracy"] < metrics["knn_cell_type"]["knn_accuracy"]


def reference_inverse(sentences: list[str], vocab: list[str], fit: RankExpressionFit) -> np.ndarray:
    """The definition, in plain Python: ranks by position, average positions of repeats."""
    column = {g: i for i, g in enumerate(vocab)}
    out = np.zeros((len(sentences), len(vocab)))
    for i, sentence in enumerate(sentences):
        positions: dict[str, list[int]] = {}
        for rank, word in enumerate(sentence.split()):
            if word in column:
                positions.setdefault(word, []).append(rank)
        for word, ranks in positions.items():
            out[i, column[word]] = fit.predict(np.log10(1 + np.mean(ranks)))
    return out


@pytest.mark.parametrize("as_file", [False, True])
def test_matches_the_plain_python_definition(tmp_path: Path, as_file: bool) -> None:
    rng = random.Random(5)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._é"
    vocab = sorted({"".join(rng.choices(alphabet, k=rng.randint(1, 20))) for _ in range(400)})
    words = vocab + ["unknown", "x" * 9, "Q" * 8]
    separators = [" ", "  ", "\t", " \r "]
    sentences = []
    for _ in range(150):
        parts = rng.choices(words, k=rng.randint(0, 60))
        text = "".join(w + rng.choice(separators) for w in parts)
        sentences.append(rng.choice(["", " ", "\t"]) + text.rstrip() if rng.random() < 0.5 else text)
    fit = RankExpressionFit(-0.7, 2.5)
    if as_file:
        path = tmp_path / "s.txt"
        path.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
        res = sentences_to_expression(read_sentence_file(path), vocab, fit)
    else:
        res = sentences_to_expression(sentences, vocab, fit)
    np.testing.assert_allclose(dense(res), reference_inverse(sentences, vocab, fit), rtol=2e-6, atol=1e-6)
    assert res.n_words.tolist() == [len(s.split()) for s in sentences]


def test_case_folding_duplicates_and_caps_match_the_plain_python_definition() -> None:
    rng = random.Random(11)
    ascii_lower = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
    alphabet = "ABCDEFGHIJKLMNOPabcdefghijklmnop0123-éÉ"
    vocab = list(dict.fromkeys("".join(rng.choices(alphabet, k=rng.randint(1, 14))) for _ in range(300)))
    vocab += [g.swapcase() for g in vocab[:30] if g.swapcase() not in vocab]  # names equal once folded
    words = vocab + ["unknown", "ZZZZZZZZZZ", "é"]
    sentences = []
    for _ in range(120):
        picked = rng.choices(words, k=rng.randint(0, 80))  # with repeats
        sentences.append(" ".join(rng.choice([w, w.lower(), w.upper(), w.swapcase()]) for w in picked))
    fit = RankExpressionFit(-0.7, 2.5)
    exact = {g: i for i, g in enumerate(vocab)}
    folded: dict[str, int] = {}
    for i, g in enumerate(vocab):
        folded.setdefault(g.translate(ascii_lower), i)
    for max_words in (None, 0, 9):
        for case_insensitive in (False, True):
            res = sentences_to_expression(sentences, vocab, fit, case_insensitive=case_insensitive,
                                          max_words=max_words)
            expected = np.zeros((len(sentences), len(vocab)))
            for i, sentence in enumerate(sentences):
                positions: dict[int, list[int]] = {}
                n_folded = n_invalid = 0
                for rank, word in enumerate(sentence.split()[:max_words]):
                    gene = exact.get(word)
                    if gene is None and case_insensitive:
                        gene = folded.get(word.translate(ascii_lower))
                        n_folded += gene is not None
                    if gene is None:
                        n_invalid += 1
                    else:
                        positions.setdefault(gene, []).append(rank)
                for gene, ranks in positions.items():
                    expected[i, gene] = fit.predict(np.log10(1 + np.mean(ranks)))
                n_words = len(sentence.split()[:max_words])
                assert res.n_words[i] == n_words and res.n_genes[i] == len(positions)
                assert res.n_invalid_genes[i] == n_invalid and res.n_case_folded_genes[i] == n_folded
                assert res.n_duplicate_genes[i] == n_words - n_invalid - len(positions)
            np.testing.assert_allclose(dense(res), expected, rtol=2e-6, atol=1e-6)
            ptr = res.X.indptr
            assert all((np.diff(res.X.indices[ptr[i]:ptr[i + 1]]) > 0).all() for i in range(len(sentences)))
    assert res.n_case_folded_genes.sum() > 0 and res.n_duplicate_genes.sum() > 0


# --- issue 18: nonsense refused, nothing of the user's lost ------------------------------------


def test_an_output_that_is_a_folder_is_refused_and_kept(tmp_path: Path) -> None:
    tdir = write_transform_dir(tmp_path / "t", VOCAB, FIT)
    (tmp_path / "gen.txt").write_text("B A\n")
    folder = tmp_path / "adir.h5ad"
    folder.mkdir()
    (folder / "mine.txt").write_text("the user's")
    with pytest.raises(InputError, match=r"adir.h5ad is a folder, not a file; choose another --output"):
        inverse.main(inverse.parse_args(["--sentences", str(tmp_path / "gen.txt"), "--transform_dir", str(tdir),
                                         "--output", str(folder), "--overwrite"]))
    assert (folder / "mine.txt").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.h5ad", "gen.txt", "t"]


def test_an_empty_sentences_file_is_refused(tmp_path: Path) -> None:
    tdir = write_transform_dir(tmp_path / "t", VOCAB, FIT)
    (tmp_path / "gen.txt").write_text("")
    out = tmp_path / "inv" / "gen.h5ad"
    with pytest.raises(InputError, match=r"gen.txt holds no sentences"):
        inverse.main(inverse.parse_args(["--sentences", str(tmp_path / "gen.txt"), "--transform_dir", str(tdir),
                                         "--output", str(out)]))
    assert not out.parent.exists()  # the folder it made is removed again
    # an empty line is still a cell (an empty generated one): one cell, no gene
    (tmp_path / "gen.txt").write_text("\n")
    adata = inverse.main(inverse.parse_args(["--sentences", str(tmp_path / "gen.txt"), "--transform_dir",
                                             str(tdir), "--output", str(out)]))
    assert adata.shape == (1, len(VOCAB)) and adata.X.nnz == 0


def test_one_string_instead_of_a_list_is_refused() -> None:
    from utils.inverse import sentences_to_adata

    with pytest.raises(InputError, match=r"a list of sentences, not one string \('B A'\)"):
        sentences_to_adata("B A", VOCAB, FIT)
    with pytest.raises(InputError, match="must be strings"):
        sentences_to_adata([1, 2], VOCAB, FIT)
    with pytest.raises(InputError, match="cell_names must be a list"):
        sentences_to_adata(["B A"], VOCAB, FIT, cell_names="c1")
    assert sentences_to_adata(["B A"], VOCAB, FIT).obs["n_genes"].tolist() == [2]


def test_a_full_disk_while_writing_the_h5ad_is_one_sentence_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import errno

    tdir = write_transform_dir(tmp_path / "t", VOCAB, FIT)
    (tmp_path / "gen.txt").write_text("B A\nA C\n")
    out = tmp_path / "inv"
    out.mkdir()

    def full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89HDF half")  # what a write cut short leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", full)
    with pytest.raises(InputError, match=r"The disk holding .*inv is full \(.* free\); nothing was written"):
        inverse.main(inverse.parse_args(["--sentences", str(tmp_path / "gen.txt"), "--transform_dir", str(tdir),
                                         "--output", str(out / "gen.h5ad")]))
    assert list(out.iterdir()) == []
