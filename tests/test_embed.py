"""Cell embeddings: pooling over the cell sentence's tokens, padding on either side, embed.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers_models import make_published_model, word_level_model

from utils.models.cell_model import CellSentenceModel
from utils.models.embedding import encode_cell, pad_batch, pool
from utils.models.prompts import prompt_format

CELLS = ["CD14 LYZ S100A8 S100A9 FCN1", "CD79A MS4A1", "NKG7 GNLY GZMB PRF1 KLRD1 FGFBP2 CTSW GZMA", "IL7R"]


@pytest.fixture(scope="module")
def word_model(tmp_path_factory) -> CellSentenceModel:
    return CellSentenceModel.load(word_level_model(tmp_path_factory.mktemp("word")), device="cpu")


def test_gene_tokens_are_found_in_both_formats(word_model: CellSentenceModel, tmp_path: Path) -> None:
    tok = word_model.tokenizer
    ids, is_gene = encode_cell(tok, prompt_format("ours"), CELLS[0].split())
    assert ids[0] == tok.bos_token_id and not is_gene[0]
    assert [tok.convert_ids_to_tokens(i) for i, g in zip(ids, is_gene, strict=True) if g] == CELLS[0].split()
    published = make_published_model(tmp_path / "pub")
    from transformers import AutoTokenizer

    bpe = AutoTokenizer.from_pretrained(published)
    ids, is_gene = encode_cell(bpe, prompt_format("c2s_scale"), CELLS[0].split())
    assert ids == bpe(prompt_format("c2s_scale").prediction_prompt(CELLS[0].split()))["input_ids"]
    assert bpe.decode([i for i, g in zip(ids, is_gene, strict=True) if g]).strip() == CELLS[0]


def test_mean_pooling_is_the_mean_over_the_gene_tokens(word_model: CellSentenceModel) -> None:
    model, tok, fmt = word_model.model, word_model.tokenizer, word_model.prompt_format
    batched = word_model.embed_cells(CELLS, batch_size=4)
    last = word_model.embed_cells(CELLS, batch_size=4, pooling="last")
    for i, cell in enumerate(CELLS):
        ids, is_gene = encode_cell(tok, fmt, cell.split())
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        by_hand = hidden[torch.tensor(is_gene)].mean(dim=0).numpy()
        np.testing.assert_allclose(batched[i], by_hand, atol=1e-5)
        np.testing.assert_allclose(last[i], hidden[-1].numpy(), atol=1e-5)
        assert not np.allclose(batched[i], hidden.mean(dim=0).numpy(), atol=1e-3)  # not over the prompt
    # Layer 0 (the token embeddings) and one cell at a time agree too.
    one = np.vstack([word_model.embed_cells([c], layer=0) for c in CELLS])
    np.testing.assert_allclose(word_model.embed_cells(CELLS, layer=0, batch_size=3), one, atol=1e-5)


def test_left_and_right_padding_give_the_same_vectors(word_model: CellSentenceModel) -> None:
    model, tok, fmt = word_model.model, word_model.tokenizer, word_model.prompt_format
    encoded = [encode_cell(tok, fmt, c.split()) for c in CELLS]
    out = {}
    for side in ("left", "right"):
        ids, mask, genes = pad_batch([e[0] for e in encoded], [e[1] for e in encoded], tok.pad_token_id, side=side)
        ids_t, mask_t = torch.as_tensor(ids), torch.as_tensor(mask)
        with torch.no_grad():
            hidden = model(input_ids=ids_t, attention_mask=mask_t, position_ids=(mask_t.cumsum(1) - 1).clamp(min=0),
                           output_hidden_states=True).hidden_states[-1]
        out[side] = [pool(hidden, mask_t, torch.as_tensor(genes), how).numpy() for how in ("mean", "last")]
    for a, b in zip(out["left"], out["right"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(out["right"][0], word_model.embed_cells(CELLS), atol=1e-5)


def test_bad_layer(word_model: CellSentenceModel) -> None:
    from utils.cli import InputError

    with pytest.raises(InputError, match="layer 5 is out of range"):
        word_model.embed_cells(CELLS, layer=5)


def transform_like(folder: Path) -> tuple[Path, list[str], list[str], np.ndarray, list[str]]:
    """A transform output in ``folder``: ``cell_sentences_hf/`` and the preprocessed AnnData
    (markers expressed, for the PCA baseline); (data_dir, names, sentences, X, genes)."""
    import anndata as ad
    import scipy.sparse as sp
    from datasets import load_from_disk
    from helpers_train import make_dataset_dir

    data = make_dataset_dir(folder / "cell_sentences_hf", n_train=24, n_valid=8, n_test=8)
    dd = load_from_disk(str(data))
    names = [n for split in ("train", "valid", "test") for n in dd[split]["cell_name"]]
    sentences = [s for split in ("train", "valid", "test") for s in dd[split]["cell_sentence"]]
    genes = sorted({g for s in sentences for g in s.split()})
    col = {g: j for j, g in enumerate(genes)}
    X = np.zeros((len(names), len(genes)), dtype=np.float32)
    for i, s in enumerate(sentences):
        for rank, g in enumerate(s.split()):
            X[i, col[g]] = 2.0 - 0.5 * np.log10(1 + rank)
    ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame(index=names), var=pd.DataFrame(index=genes)).write_h5ad(
        folder / "x_preprocessed.h5ad")
    return data, names, sentences, X, genes


def test_embed_script_writes_embeddings_umap_and_scores(one_thread, tmp_path: Path) -> None:
    import anndata as ad
    import scipy.sparse as sp
    from datasets import load_from_disk

    import embed

    data, names, sentences, X, genes = transform_like(tmp_path / "t")
    dd = load_from_disk(str(data))
    model = word_level_model(tmp_path / "model")
    out = tmp_path / "emb"
    metrics = embed.main(embed.parse_args(["--model_dir", str(model), "--data_dir", str(data), "--output_dir",
                                           str(out), "--batch_size", "7", "--n_components", "5"]))
    written = ad.read_h5ad(out / "embeddings.h5ad")
    assert written.obs_names.tolist() == names and written.obsm["X_c2s"].shape == (40, 32)
    assert written.obs["split"].tolist() == ["train"] * 24 + ["valid"] * 8 + ["test"] * 8
    assert written.obs["cell_type"].tolist() == [t for split in ("train", "valid", "test")
                                                 for t in dd[split]["cell_type"]]
    api = CellSentenceModel.load(model, device="cpu").embed_cells(sentences)
    np.testing.assert_allclose(written.obsm["X_c2s"], api, atol=1e-5)  # the script = the API
    assert written.obsm["X_umap"].shape == (40, 2) and (out / "umap.png").stat().st_size > 5000
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["n_cells"] == 40 and saved["pooling"] == "mean" and saved["prompt_format"] == "ours"
    assert 0 <= saved["c2s"]["knn_accuracy"] <= 1 and -1 <= saved["c2s"]["silhouette"] <= 1
    # The expression of marker genes separates the 4 types: the baseline is perfect.
    assert saved["pca"]["knn_accuracy"] == 1.0 and saved["pca"]["n_components"] == 5
    # --split and --pooling last; an existing output needs --overwrite.
    last = embed.main(embed.parse_args(["--model_dir", str(model), "--data_dir", str(data), "--output_dir",
                                        str(out), "--split", "test", "--pooling", "last", "--overwrite"]))
    assert last["n_cells"] == 8 and last["pooling"] == "last"
    from utils.cli import InputError

    with pytest.raises(InputError, match="--overwrite"):
        embed.main(embed.parse_args(["--model_dir", str(model), "--data_dir", str(data), "--output_dir", str(out)]))
    # Straight from an h5ad of counts: every cell, through the transform's API.
    counts = ad.AnnData(sp.csr_matrix(np.where(X > 0, np.round(10 ** (X * 1.5)), 0).astype(np.float32)),
                        obs=pd.DataFrame({"cell_type": written.obs["cell_type"].to_numpy()}, index=names),
                        var=pd.DataFrame(index=genes))
    counts.write_h5ad(tmp_path / "cells.h5ad")
    direct = embed.main(embed.parse_args(["--model_dir", str(model), "--h5ad", str(tmp_path / "cells.h5ad"),
                                          "--output_dir", str(tmp_path / "direct"), "--n_components", "5"]))
    assert direct["n_cells"] == 40 and direct["pca"]["knn_accuracy"] == 1.0
    again = ad.read_h5ad(tmp_path / "direct" / "embeddings.h5ad")
    assert again.obs_names.tolist() == names
    # --max_cells on an h5ad: the PCA baseline is taken on the embedded cells only (it raised a KeyError)
    some = embed.main(embed.parse_args(["--model_dir", str(model), "--h5ad", str(tmp_path / "cells.h5ad"),
                                        "--output_dir", str(tmp_path / "some"), "--n_components", "5",
                                        "--max_cells", "20"]))
    assert some["n_cells"] == 20 and some["pca"]["knn_accuracy"] == 1.0
    assert ad.read_h5ad(tmp_path / "some" / "embeddings.h5ad").n_obs == 20


def test_the_pca_baseline_takes_exactly_the_embedded_cells(one_thread, tmp_path: Path, monkeypatch) -> None:
    """embed.py --max_cells 40 of 401 cells took 168 s and 4.9 GB: the baseline's PCA must be sized
    by the cells scored (their rows of the preprocessed AnnData, all genes), nothing else."""
    import anndata as ad

    import embed
    import utils.evaluation.metrics

    data, names, _, _, genes = transform_like(tmp_path / "t")
    fitted = []
    pca = utils.evaluation.metrics.embed_pca
    monkeypatch.setattr(utils.evaluation.metrics, "embed_pca", lambda X, *a, **kw: fitted.append(X.shape) or pca(X, *a, **kw))
    out = tmp_path / "emb"
    metrics = embed.main(embed.parse_args(["--model_dir", str(word_level_model(tmp_path / "model")), "--data_dir",
                                           str(data), "--output_dir", str(out), "--max_cells", "9"]))
    embedded = ad.read_h5ad(out / "embeddings.h5ad").obs_names.tolist()
    assert len(embedded) == 9 and set(embedded) < set(names)
    assert fitted == [(9, len(genes))] and metrics["pca"]["n_cells"] == 9
    # All components of 9 cells (fewer than --n_components 50): as many as the cells.
    assert metrics["pca"]["n_components"] == 9
