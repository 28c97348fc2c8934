"""Batched generation with a trained cell-sentence model: left padding (every prompt ends where
the answer starts), greedy or sampled; prompts sorted by length, answers in the original order."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# Every batch here passes its mask: transformers' "no attention mask" warning (pad token at an end) is false.
logging.getLogger("transformers.modeling_utils").addFilter(
    lambda record: "strongly recommend passing in an `attention_mask`" not in record.getMessage())


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack token-id lists into (input_ids, attention_mask), padded on the left.

    >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    from utils.models.embedding import pad_batch

    ids, mask, _ = pad_batch(sequences, [[False] * len(s) for s in sequences], pad_id, side="left")
    return ids, mask


def allocate_counts(available: Mapping[str, int], *, n_per_type: int | None = None,
                    max_cells: int | None = None) -> dict[str, int]:
    """Cells to generate per type: ``n_per_type`` each, or as many as ``available`` has;
    scaled down proportionally (at least one per type) when the total exceeds ``max_cells``.

    >>> allocate_counts({"a": 30, "b": 10}, max_cells=8)
    {'a': 6, 'b': 2}
    >>> allocate_counts({"a": 30, "b": 10}, n_per_type=3)
    {'a': 3, 'b': 3}
    """
    counts = {t: (n_per_type if n_per_type is not None else int(n)) for t, n in available.items()}
    total = sum(counts.values())
    if max_cells is not None and total > max_cells:
        counts = {t: max(1, math.floor(n * max_cells / total)) for t, n in counts.items()}
    return counts


def shorten_to_fit(build: Callable[[int], list[int]], n_genes: int, limit: int) -> tuple[list[int], int]:
    """The prompt ids of ``build(n)`` for the largest ``n ≤ n_genes`` with at most ``limit`` ids
    (the lowest-ranked genes go first, as in training)."""
    n = n_genes
    ids = build(n)
    while len(ids) > limit and n > 0:
        per_gene = max(1.0, len(ids) / max(n, 1))
        n = max(0, n - max(1, math.ceil((len(ids) - limit) / per_gene)))
        ids = build(n)
    return ids, n


def pick_device(requested: str = "auto", dtype: str = "auto") -> tuple[str, Any]:
    """(device, torch dtype): CUDA with bf16 (fp16 where bf16 is unsupported) when available,
    else CPU with float32. ``requested``/``dtype`` override the choice."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested
    if dtype != "auto":
        return device, getattr(torch, dtype)
    if device.startswith("cuda"):
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def generate_batched(model: Any, prompts: Sequence[Sequence[int]], *, pad_token_id: int,
                     eos_token_id: int | None, max_new_tokens: int, batch_size: int = 16,
                     do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None, progress: Callable[[int], None] | None = None,
                     logits_processor_factory: Callable[[], Any] | None = None, batch_seed: int | None = None,
                     batches: Sequence[int] | None = None) -> list[list[int] | None]:
    """The new token ids of every prompt (greedy unless ``do_sample``; ids after the first EOS left
    in). ``logits_processor_factory()`` makes a fresh processor per batch; ``batch_seed`` seeds torch
    with ``batch_seed + b`` before batch ``b``; ``batches`` runs only those batch numbers (one
    process's share), None for the other prompts."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    if do_sample:
        sampling = {"temperature": float(temperature), "top_k": int(top_k) if top_k else 0,
                    "top_p": float(top_p) if top_p is not None else 1.0}
    else:
        sampling = {"temperature": None, "top_k": None, "top_p": None}
    config = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample),
                              pad_token_id=int(pad_token_id), eos_token_id=eos_token_id, **sampling)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    answers: list[list[int] | None] = [[] if batches is None else None for _ in prompts]
    for number, start in enumerate(range(0, len(order), batch_size)):
        if batches is not None and number not in batches:
            continue
        if batch_seed is not None:
            torch.manual_seed(batch_seed + number)
        batch = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in batch], pad_token_id)
        processors = None if logits_processor_factory is None else LogitsProcessorList([logits_processor_factory()])
        with torch.inference_mode():
            out = model.generate(input_ids=torch.as_tensor(ids, device=device),
                                 attention_mask=torch.as_tensor(mask, device=device), generation_config=config,
                                 logits_processor=processors)
        new = out[:, ids.shape[1] :].cpu().numpy()
        for row, i in enumerate(batch):
            answers[i] = new[row].tolist()
        if progress is not None:
            progress(len(batch))
    return answers
