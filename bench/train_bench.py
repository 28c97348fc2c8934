"""Training throughput of a GPT-2-style cell-sentence model on the current device.

Builds synthetic cell sentences, the word-level tokenizer and training examples exactly as
``train.py --init_from_scratch`` does (conditional generation examples cut to ``--seq_len``
tokens), then times forward + backward + AdamW steps and prints tokens/s and samples/s.
CUDA is used when available (``--amp bf16|fp16`` for mixed precision), else the CPU.

synthetic sentences -> printed figures (and a JSON line with ``--json``)

    python bench/train_bench.py --n_layer 4 --n_embd 256 --n_head 4 --batch_size 16 \
        --seq_len 128 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_int_flags, add_shared_flags, bench_parser, print_json, set_threads  # noqa: E402
from utils.cli import InputError, run_cli, seed_everything  # noqa: E402

logger = logging.getLogger("cell2sentence.train_bench")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    add_int_flags(parser, n_layer=(4, "Transformer layers."), n_embd=(256, "Embedding size."),
                  n_head=(4, "Attention heads."))
    add_int_flags(parser, batch_size=(16, "Examples per step."), seq_len=(128, "Tokens per example."),
                  steps=(20, "Timed training steps."), warmup_steps=(3, "Untimed steps first."),
                  n_genes=(5000, "Genes in the vocabulary."))
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                        help="Mixed precision on CUDA (ignored on the CPU).")
    add_shared_flags(parser, threads=True, device=(None, "cpu, cuda, cuda:1 (default: cuda if available)"),
                     seed=(0, "Seed of the synthetic data."), json_flag=True)
    return parser.parse_args(argv)


def synthetic_examples(
    n_examples: int, *, seq_len: int, n_genes: int, seed: int
) -> tuple[Any, list[dict[str, list[int]]]]:
    """Word-level tokenizer and conditional-generation examples of exactly ``seq_len`` tokens."""
    from utils.models.examples import generation_example
    from utils.models.prompts import CONDITIONAL_GENERATION_TEMPLATES, prompt_words
    from utils.models.tokenizer import build_word_tokenizer

    rng = random.Random(seed)
    genes = [f"GENE{i:05d}" for i in range(n_genes)]
    cell_types = ["CD14+ Monocyte", "B cell", "CD4 T cell", "NK cell"]
    sentences = [" ".join(rng.sample(genes, min(seq_len, n_genes))) for _ in range(n_examples)]
    tokenizer = build_word_tokenizer(
        sentences, extra_words=prompt_words(cell_types), model_max_length=seq_len
    )
    examples = []
    for sentence in sentences:
        example, _ = generation_example(
            tokenizer, sentence.split(), rng.choice(cell_types),
            template=rng.choice(CONDITIONAL_GENERATION_TEMPLATES), max_length=seq_len,
        )
        examples.append(example)
    return tokenizer, examples


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Time the training steps and print the figures; returns them."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from utils.models.examples import CausalLMCollator

    if args.n_embd % args.n_head:
        raise InputError(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}.")
    if min(args.batch_size, args.seq_len, args.steps, args.n_layer) < 1 or args.seq_len < 40:
        raise InputError("--batch_size, --steps, --n_layer must be >= 1 and --seq_len >= 40.")
    seed_everything(args.seed)
    set_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_steps = args.warmup_steps + args.steps
    tokenizer, examples = synthetic_examples(
        n_steps * args.batch_size, seq_len=args.seq_len, n_genes=args.n_genes, seed=args.seed
    )
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.seq_len, n_embd=args.n_embd,
        n_layer=args.n_layer, n_head=args.n_head, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    collate = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    use_amp = device.type == "cuda" and amp_dtype is not None
    if amp_dtype is not None and not use_amp:
        logger.warning("--amp %s needs CUDA; timing float32 on %s.", args.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = 0
    start = time.perf_counter()
    for step in range(n_steps):
        if step == args.warmup_steps:
            sync()
            start, tokens = time.perf_counter(), 0
        batch = collate(examples[step * args.batch_size : (step + 1) * args.batch_size])
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        autocast = (
            torch.autocast(device_type="cuda", dtype=amp_dtype)
            if use_amp else contextlib.nullcontext()
        )
        with autocast:
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    sync()
    elapsed = time.perf_counter() - start
    figures = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "amp": args.amp if use_amp else "none",
        "parameters": model.num_parameters(),
        "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
        "ms_per_step": round(1000 * elapsed / args.steps, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "samples_per_s": round(args.steps * args.batch_size / elapsed, 2),
        "final_loss": round(loss.item(), 4),
    }
    if device.type == "cuda":
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    print(
        f"{figures['device']}: GPT-2 {args.n_layer}x{args.n_embd} ({figures['parameters']:,} "
        f"parameters), batch {args.batch_size} x {args.seq_len} tokens: "
        f"{figures['tokens_per_s']:,.0f} tokens/s, {figures['samples_per_s']:,.1f} samples/s, "
        f"{figures['ms_per_step']:.1f} ms/step"
    )
    print_json(figures, args.json)
    return figures


if __name__ == "__main__":
    run_cli(main, parse_args)
