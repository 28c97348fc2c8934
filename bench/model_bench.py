"""Cells/s of a cell-sentence model for prediction, generation and embedding: ours (batched,
length-sorted, no autograd) next to one cell at a time and the newer package's way.

A GPT-NeoX model (the C2S-Pythia architecture, random weights: the speed does not depend on
them) with a byte-level BPE tokenizer trained on synthetic cell sentences, in the C2S-Scale
prompt format, saved and loaded like a published model. Per task, side by side in one run:

- ``ours, batched``: ``utils.CellSentenceModel`` with ``--batch_size`` (what predict.py,
  generate.py and embed.py do); prediction label-constrained (every label of ``--n_labels``
  scored whole, predict.py's default) and free text (greedy, ``--label_tokens``); generation greedy (to compare methods) and sampled with and without the
  valid-gene constraint (what the constraint costs; "words" is the mean words per cell);
- ``ours, one cell at a time``: the same code with batch size 1;
- ``newer package's way`` (vandijklab/cell2sentence's ``tasks.py``/``csmodel.py``, as
  described there): prediction one text prompt per ``generate`` call, decoded and the prompt
  text stripped; generation in text batches of 8 padded by the tokenizer; embedding in text
  batches of 8, forward with autograd on, mean over every position (padding and prompt too).

Every method stops an answer at EOS or at the same token budget (the model's generation
config holds its EOS, as the newer package relies on); the compared generation rows decode
greedily (top-k 1), so they decode the same tokens and do the same work.

synthetic sentences -> printed table (and a JSON line with ``--json``)

    python bench/model_bench.py --n_cells 32 --n_genes 50
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # helpers_models: the BPE tokenizer

from bench.common import add_int_flags, add_shared_flags, bench_parser, print_json, set_threads  # noqa: E402
from utils.cli import InputError, run_cli, seed_everything  # noqa: E402

logger = logging.getLogger("cell2sentence.model_bench")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    add_int_flags(p, n_cells=(32, "cells per task"), n_genes=(50, "genes per prompt / generated cell"),
                  vocab_genes=(2000, "genes in the vocabulary"), hidden=(256, "hidden size of the model"),
                  layers=(4, "transformer layers"), batch_size=(32, "batch size of ours, batched"),
                  label_tokens=(8, "new tokens per free-text predicted label"),
                  n_labels=(4, "labels of the label-constrained prediction (the 4 cell types, then made-up ones)"))
    p.add_argument("--tasks", type=str, default="predict,generate,embed", help="comma-separated")
    add_shared_flags(p, threads=True, device=("cpu", "cpu or cuda"), seed=(0, "seed of the data and model"),
                     json_flag=True)
    args = p.parse_args(argv)
    if min(args.n_cells, args.n_genes, args.batch_size, args.label_tokens, args.n_labels) < 1:
        raise InputError("--n_cells, --n_genes, --batch_size, --label_tokens and --n_labels must be at least 1.")
    return args


def synthetic_cells(n_cells: int, n_genes: int, vocab: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """(gene names, sentences, cell types): Zipf-like gene popularity, 4 types with markers."""
    rng = random.Random(seed)
    genes = [f"{rng.choice(['RPL', 'CD', 'HLA-D', 'ZNF', 'KLR', 'IGH', 'MT-'])}{i}{rng.choice(['', 'A', 'B', 'P1'])}"
             for i in range(vocab)]
    weights = [1.0 / (i + 1) for i in range(vocab)]
    types = ["B cell", "NK cell", "CD14+ Monocyte", "CD4 T cell"]
    sentences, labels = [], []
    for i in range(n_cells):
        t = types[i % len(types)]
        markers = genes[100 + 20 * (i % len(types)): 110 + 20 * (i % len(types))]
        rest = list(dict.fromkeys(rng.choices(genes, weights=weights, k=3 * n_genes)))
        sentences.append(" ".join(list(dict.fromkeys(markers + rest))[:n_genes]))
        labels.append(t)
    return genes, sentences, labels


def build_model(path: Path, genes: list[str], sentences: list[str], labels: list[str], args: argparse.Namespace) -> None:
    import torch
    from helpers_models import build_bpe_tokenizer
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from utils.models.prompts import prompt_format

    fmt = prompt_format("c2s_scale")
    texts = [" ".join(genes)] * 3 + sentences + [fmt.prediction_prompt(s.split()) + fmt.prediction_answer(t)
                                                 for s, t in zip(sentences, labels, strict=True)]
    texts += [fmt.generation_prompt(t, args.n_genes) for t in set(labels)]
    tok = build_bpe_tokenizer(texts, vocab_size=4000)
    torch.manual_seed(args.seed)
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                           max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


# ----------------------------------------------------------------- the newer package's way


def theirs_predict(model: Any, tok: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """One text prompt per generate call; the prompt text stripped from the decoded output."""
    out = []
    for prompt in prompts:
        enc = tok([prompt], padding=True, return_tensors="pt")
        ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, do_sample=False)
        text = tok.batch_decode(ids, skip_special_tokens=True)[0]
        out.append(text.replace(prompt, "").lstrip())
    return out


def theirs_generate(model: Any, tok: Any, prompts: list[str], max_new_tokens: int, batch: int = 8) -> list[str]:
    out = []
    for start in range(0, len(prompts), batch):
        part = prompts[start:start + batch]
        enc = tok(part, padding=True, return_tensors="pt")
        ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, do_sample=True,
                             top_k=1)
        for text, prompt in zip(tok.batch_decode(ids, skip_special_tokens=True), part, strict=True):
            out.append(text.replace(prompt, "").lstrip())
    return out


def theirs_embed(model: Any, tok: Any, prompts: list[str], batch: int = 8) -> list[Any]:
    out = []
    for start in range(0, len(prompts), batch):
        enc = tok(prompts[start:start + batch], padding=True, return_tensors="pt")
        result = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        out += [result.hidden_states[-1][i].mean(0).detach().cpu().numpy() for i in range(len(enc["input_ids"]))]
    return out


# ----------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def agreement(a: Any, b: Any) -> float:
    """Fraction of cells with the same answer (lists of text), or 1 - max |difference| of
    embeddings (cells x dims) as a closeness figure."""
    import numpy as np

    if isinstance(a, list) and isinstance(b, list):
        return float(np.mean([x == y for x, y in zip(a, b, strict=True)]))
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from utils.models.cell_model import CellSentenceModel

    set_threads(args.threads)
    seed_everything(args.seed)
    genes, sentences, labels = synthetic_cells(args.n_cells, args.n_genes, args.vocab_genes, args.seed)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), genes, sentences, labels, args)
        m = CellSentenceModel.load(tmp, device=args.device, dtype="float32", top_k_genes=args.n_genes)
        model, tok, fmt = m.model, m.tokenizer, m.prompt_format
        tok.padding_side = "left"
        n = args.n_cells
        n_params = sum(p.numel() for p in model.parameters())
        gen_tokens = m.gene_budget(args.n_genes, genes)
        logger.info("GPT-NeoX %d x %d (%s parameters), %d cells, %d genes per cell, %d new tokens per generated "
                    "cell, %d threads.", args.layers, args.hidden, f"{n_params:,}", n, args.n_genes, gen_tokens,
                    torch.get_num_threads())
        pred_prompts = [fmt.prediction_prompt(s.split()) for s in sentences]
        gen_prompts = [fmt.generation_prompt(t, args.n_genes) for t in labels]

        reference: dict[str, Any] = {}

        def add(task: str, method: str, run: tuple[float, Any], *, parse: Callable[[str], str] | None = None,
                compare: bool = True) -> None:
            seconds, result = run
            if parse is not None:
                result = [parse(x) for x in result]
            if hasattr(result, "columns"):
                result = result["cell_sentence"].tolist()
            same = None
            if task not in reference:
                reference[task] = result
            elif compare:
                same = round(agreement(reference[task], result), 6)
            texts = isinstance(result, list) and all(isinstance(x, str) for x in result)
            words = round(sum(len(x.split()) for x in result) / len(result), 1) if texts else None
            rows.append({"task": task, "method": method, "cells": n, "seconds": round(seconds, 3),
                         "cells_per_s": round(n / seconds, 2), "vs_first": same, "words_per_cell": words})
            logger.info("%-9s %-46s %7.2f s %9.2f cells/s", task, method, seconds, n / seconds)

        m.predict_cell_types(sentences[:2], max_new_tokens=2, constrain=False)  # warm-up: first calls allocate
        if "predict" in tasks:
            kw = {"max_new_tokens": args.label_tokens, "constrain": False}
            add("predict", f"ours, batched ({args.batch_size}), free text",
                timed(lambda: m.predict_cell_types(sentences, batch_size=args.batch_size, **kw)))
            add("predict", "ours, one cell at a time, free text",
                timed(lambda: m.predict_cell_types(sentences, batch_size=1, **kw)))
            label_set = sorted(set(labels)) + [f"cell type {i}" for i in range(max(0, args.n_labels - 4))]
            kw = {"labels": label_set[: args.n_labels]}
            add("labels", f"ours, batched ({args.batch_size}), {len(kw['labels'])} labels constrained",
                timed(lambda: m.predict_cell_types(sentences, batch_size=args.batch_size, **kw)))
            add("labels", f"ours, one cell at a time, {len(kw['labels'])} labels constrained",
                timed(lambda: m.predict_cell_types(sentences, batch_size=1, **kw)))
            add("predict", "newer package's way (1 per call)",
                timed(lambda: theirs_predict(model, tok, pred_prompts, args.label_tokens)), parse=fmt.parse_label)
        if "generate" in tasks:
            # Greedy (top-k 1): every free method decodes the same tokens, so the same work.
            kw = {"max_new_tokens": gen_tokens, "n_genes": args.n_genes, "genes": genes, "seed": args.seed,
                  "constrain_genes": False, "top_k": 1}
            add("generate", f"ours, batched ({args.batch_size}), greedy",
                timed(lambda: m.generate_cells(labels, batch_size=args.batch_size, **kw)))
            add("generate", "ours, one cell at a time, greedy",
                timed(lambda: m.generate_cells(labels, batch_size=1, **kw)))
            # A generated sentence is parsed as a label is: its first line, single spaces, no closing period.
            add("generate", "newer package's way (8 per call), greedy",
                timed(lambda: theirs_generate(model, tok, gen_prompts, gen_tokens)), parse=fmt.parse_label)
            # Sampled (top-k 50), free and constrained: what the constraint costs per cell.
            kw.update(top_k=50)
            add("generate", f"ours, batched ({args.batch_size}), sampled, free",
                timed(lambda: m.generate_cells(labels, batch_size=args.batch_size, **kw)), compare=False)
            kw.update(constrain_genes=True)
            add("generate", f"ours, batched ({args.batch_size}), sampled, constrained",
                timed(lambda: m.generate_cells(labels, batch_size=args.batch_size, **kw)), compare=False)
        if "embed" in tasks:
            add("embed", f"ours, batched ({args.batch_size})", timed(lambda: m.embed_cells(sentences, batch_size=args.batch_size)))
            add("embed", "ours, one cell at a time", timed(lambda: m.embed_cells(sentences, batch_size=1)))
            add("embed", "newer package's way (batches of 8)", timed(lambda: theirs_embed(model, tok, pred_prompts)),
                compare=False)  # another pooling: not comparable
    # vs_first: for answers, the fraction equal to the first method's; for embeddings, the
    # largest absolute difference from the first method's vectors.
    print(f"{'task':<9} {'method':<46} {'seconds':>8} {'cells/s':>9} {'vs first':>9} {'words':>6}")
    for r in rows:
        same = "" if r["vs_first"] is None else f"{r['vs_first']:.6g}"
        words = "" if r["words_per_cell"] is None else f"{r['words_per_cell']:.1f}"
        print(f"{r['task']:<9} {r['method']:<46} {r['seconds']:>8.2f} {r['cells_per_s']:>9.2f} {same:>9} {words:>6}")
    print_json(rows, args.json)
    return rows


if __name__ == "__main__":
    run_cli(main, parse_args)
