"""Cell embeddings from a causal language model: one layer's hidden states of a cell's prediction
prompt, averaged over the cell sentence's tokens only (``pooling="mean"``) or of its last token
(``"last"``). Positions come from the attention mask, so either padding side gives the same vectors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from utils.models.prompts import PromptFormat


def encode_cell(tokenizer: Any, fmt: PromptFormat, genes: Sequence[str]) -> tuple[list[int], list[bool]]:
    """The prompt ids of a cell and, per id, whether it is a token of the cell sentence (found by
    the fast tokenizer's character offsets: any tokenizer, word-level or byte-pair)."""
    text, start, end = fmt.gene_span(genes)
    enc = tokenizer(text, add_special_tokens=not fmt.manual_bos, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    is_gene = [b > a and a < end and b > start for a, b in offsets]
    if fmt.manual_bos and tokenizer.bos_token_id is not None:
        ids, is_gene = [tokenizer.bos_token_id, *ids], [False, *is_gene]
    return ids, is_gene


def pad_batch(sequences: Sequence[Sequence[int]], flags: Sequence[Sequence[bool]], pad_id: int, *,
              side: str = "right") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, gene_mask), padded on ``side``."""
    width = max((len(s) for s in sequences), default=0)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    genes = np.zeros((len(sequences), width), dtype=bool)
    for i, (seq, flag) in enumerate(zip(sequences, flags, strict=True)):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[i, cols], mask[i, cols], genes[i, cols] = seq, 1, flag
    return ids, mask, genes


def pool(hidden: Any, attention_mask: Any, gene_mask: Any, how: str = "mean") -> Any:
    """Pool ``hidden`` (batch x tokens x dims) per row: the mean over ``gene_mask`` tokens, or
    the last attended token. A row without gene tokens falls back to all attended tokens."""
    import torch

    if how == "last":  # the last attended position, whichever side the padding is on
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (positions * attention_mask.long()).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how != "mean":
        raise ValueError(f"pooling {how!r}: choose mean or last.")
    weights = gene_mask.to(hidden.dtype)
    empty = weights.sum(dim=1) == 0
    if bool(empty.any()):
        weights[empty] = attention_mask[empty].to(hidden.dtype)
    weights = weights.unsqueeze(-1)
    return (hidden.float() * weights.float()).sum(dim=1) / weights.float().sum(dim=1).clamp(min=1)


def embed_batched(model: Any, tokenizer: Any, fmt: PromptFormat, cells: Sequence[Sequence[str]], *,
                  pooling: str = "mean", layer: int = -1, batch_size: int = 16,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Embeddings (cells x hidden size, float32) of cells given as ranked gene lists."""
    import torch

    encoded = [encode_cell(tokenizer, fmt, genes) for genes in cells]
    order = np.argsort([len(ids) for ids, _ in encoded], kind="stable")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask, genes = pad_batch([encoded[i][0] for i in rows], [encoded[i][1] for i in rows], pad)
        ids_t, mask_t = torch.as_tensor(ids, device=device), torch.as_tensor(mask, device=device)
        positions = (mask_t.cumsum(dim=1) - 1).clamp(min=0)
        with torch.inference_mode():
            result = model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions,
                           output_hidden_states=True, use_cache=False)
            vectors = pool(result.hidden_states[layer], mask_t, torch.as_tensor(genes, device=device),
                           pooling).float().cpu().numpy()
        if out is None:
            out = np.zeros((len(cells), vectors.shape[1]), dtype=np.float32)
        out[rows] = vectors
        if progress is not None:
            progress(len(rows))
    if out is None:
        out = np.zeros((0, int(model.config.hidden_size)), dtype=np.float32)
    return out
