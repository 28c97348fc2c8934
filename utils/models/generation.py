"""Batched generation with a trained cell-sentence model: left padding, greedy or sampled.

Prompts are token-id lists as the model saw them in training (``utils.models.examples.encode_prompt``).
A batch is padded on the LEFT, so that every prompt ends where the answer starts, and the
attention mask hides the padding (``generate`` derives the position ids from the mask, so a
padded prompt gives the same answer as the prompt alone). Prompts are sorted by length before
batching to keep padding small; answers come back in the original order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "allocate_counts",
    "answer_token_budget",
    "generate_batched",
    "left_pad",
    "pick_device",
    "shorten_to_fit",
]



class _MasksArePassed(logging.Filter):
    """transformers warns that no attention mask was passed when a forward pass's first or last
    token is the pad token; every batch here passes its mask (``left_pad``), so the warning,
    raised from inside ``generate``, says nothing true."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "strongly recommend passing in an `attention_mask`" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_MasksArePassed())

def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack token-id lists into (input_ids, attention_mask), padded on the left.

    >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    if not sequences:
        return np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.int64)
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq) :] = seq
            mask[i, width - len(seq) :] = 1
    return ids, mask


def allocate_counts(
    available: Mapping[str, int], *, n_per_type: int | None = None, max_cells: int | None = None
) -> dict[str, int]:
    """Cells to generate per type: ``n_per_type`` each, or as many as ``available`` has;
    scaled down proportionally (at least one per type) when the total exceeds ``max_cells``.

    >>> allocate_counts({"a": 30, "b": 10})
    {'a': 30, 'b': 10}
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


def answer_token_budget(lengths: Sequence[int], *, margin: float = 1.25, extra: int = 2) -> int:
    """New tokens to allow for an answer: the longest reference answer plus a margin.

    >>> answer_token_budget([80, 100, 96])
    127
    """
    if not len(lengths):
        return extra
    return int(math.ceil(max(lengths) * margin)) + extra


def shorten_to_fit(
    build: Callable[[int], list[int]], n_genes: int, limit: int
) -> tuple[list[int], int]:
    """The prompt ids of ``build(n)`` for the largest ``n ≤ n_genes`` with at most ``limit`` ids.

    Used when a prediction prompt plus its answer would not fit the model's context: the
    lowest-ranked genes go first, as in training.
    """
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

    device = requested
    if requested == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype != "auto":
        return device, getattr(torch, dtype)
    if device.startswith("cuda"):
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def generate_batched(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    eos_token_id: int | None,
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    progress: Callable[[int], None] | None = None,
    logits_processor_factory: Callable[[], Any] | None = None,
    batch_seed: int | None = None,
    batches: Sequence[int] | None = None,
) -> list[list[int] | None]:
    """Generate a continuation of every prompt; returns the new token ids per prompt.

    Greedy decoding unless ``do_sample``. The ids after the first EOS are left in; the caller's
    decoder drops them (``utils.models.examples.decode_answer``). ``progress(n)`` is called after each
    batch with its size. ``logits_processor_factory()`` makes a fresh logits processor per
    batch (e.g. ``utils.models.constrain.GeneConstraint``, which keeps per-row state).
    ``batch_seed`` seeds torch with ``batch_seed + b`` before batch ``b`` (of the prompts sorted
    by length), so a sampled batch does not depend on which others ran; ``batches`` runs only
    those batch numbers (one process's share) and leaves None for the other prompts.
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    config_kwargs: dict[str, Any] = {
        "max_new_tokens": int(max_new_tokens),
        "do_sample": bool(do_sample),
        "pad_token_id": int(pad_token_id),
        "eos_token_id": eos_token_id,
    }
    if do_sample:
        config_kwargs.update(
            temperature=float(temperature),
            top_k=int(top_k) if top_k else 0,
            top_p=float(top_p) if top_p is not None else 1.0,
        )
    else:
        config_kwargs.update(temperature=None, top_k=None, top_p=None)
    config = GenerationConfig(**config_kwargs)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    answers: list[list[int] | None] = [[] if batches is None else None for _ in prompts]
    for number, start in enumerate(range(0, len(order), batch_size)):
        if batches is not None and number not in batches:
            continue
        if batch_seed is not None:
            torch.manual_seed(batch_seed + number)
        batch = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in batch], pad_token_id)
        extra = {}
        if logits_processor_factory is not None:
            extra["logits_processor"] = LogitsProcessorList([logits_processor_factory()])
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.as_tensor(ids, device=device),
                attention_mask=torch.as_tensor(mask, device=device),
                generation_config=config,
                **extra,
            )
        new = out[:, ids.shape[1] :].cpu().numpy()
        for row, i in enumerate(batch):
            answers[i] = new[row].tolist()
        if progress is not None:
            progress(len(batch))
    return answers
