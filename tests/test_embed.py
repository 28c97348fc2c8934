"""Cell embeddings: pooling over the cell sentence's tokens, padding on either side, embed.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_models import make_published_model, word_level_model

from utils.cell_model import CellSentenceModel
from utils.embedding import encode_cell, pad_batch, pool
from utils.prompts import prompt_format

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
    from utils.common import InputError

    with pytest.raises(InputError, match="layer 5 is out of range"):
        word_model.embed_cells(CELLS, layer=5)
