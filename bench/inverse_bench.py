"""Benchmark of the inverse transform: sentences per second, from a text file and from strings.

Synthetic sentences of --min_genes..--max_genes distinct genes over a vocabulary of --n_vocab
gene-like names (4-8 characters) are written to a temporary text file, then turned into an
expression matrix the way inverse.py does it (read the file's bytes, Arrow lookups, one numba
loop to CSR). The first call compiles or loads the numba kernel and is not timed.

    python bench/inverse_bench.py                       # 20,000 sentences of 1,000-2,000 genes
    python bench/inverse_bench.py --n_sentences 5000 --repeats 5

Two implementations side by side: run this script of each checkout (e.g. ``git worktree add
/tmp/inv_before <commit>``, then ``python /tmp/inv_before/bench/inverse_bench.py`` and
``python bench/inverse_bench.py`` with the same flags, both under ``taskset -c 0`` for one core).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils.inverse as inv  # noqa: E402
from bench.common import add_shared_flags, bench_parser  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.transform.fit import RankExpressionFit  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__, show_defaults=True)
    p.add_argument("--n_sentences", type=int, default=20_000, help="sentences to convert")
    p.add_argument("--min_genes", type=int, default=1_000, help="fewest genes per sentence")
    p.add_argument("--max_genes", type=int, default=2_000, help="most genes per sentence")
    p.add_argument("--n_vocab", type=int, default=20_000, help="genes in the vocabulary")
    add_shared_flags(p, repeats=(3, "timed runs (the best is reported too)"),
                     seed=(0, "seed of the synthetic sentences"))
    args = p.parse_args(argv)
    if not 1 <= args.min_genes <= args.max_genes <= args.n_vocab:
        raise SystemExit("Need 1 <= --min_genes <= --max_genes <= --n_vocab.")
    return args


def gene_names(n: int, rng: np.random.Generator) -> list[str]:
    """Distinct upper-case names of 4-8 characters, like HGNC symbols."""
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    names: set[str] = set()
    while len(names) < n:
        length = int(rng.integers(4, 9))
        names.add("".join(rng.choice(letters, length)))
    return sorted(names)


def write_sentences(path: Path, vocab: list[str], args: argparse.Namespace) -> tuple[int, int]:
    """Random sentences without repeated genes: windows of a few random gene orders."""
    rng = np.random.default_rng(args.seed)
    encoded = np.array([g.encode() for g in vocab], dtype=object)
    orders = [rng.permutation(len(vocab)) for _ in range(32)]
    n_words = 0
    with path.open("wb") as fh:
        for _ in range(args.n_sentences):
            length = int(rng.integers(args.min_genes, args.max_genes + 1))
            order = orders[int(rng.integers(len(orders)))]
            start = int(rng.integers(len(vocab)))
            window = np.roll(order, -start)[:length]
            fh.write(b" ".join(encoded[window]) + b"\n")
            n_words += length
    return n_words, path.stat().st_size


def main(args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(args.seed)
    vocab = gene_names(args.n_vocab, rng)
    fit = RankExpressionFit(slope=-0.76, intercept=3.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sentences.txt"
        n_words, n_bytes = write_sentences(path, vocab, args)
        print(f"{args.n_sentences:,} sentences, {n_words:,} words, {n_bytes / 1e6:,.0f} MB, "
              f"vocabulary {args.n_vocab:,}")
        index = inv.build_vocab_index(vocab)
        warm = inv.read_sentence_file(path)
        inv.sentences_to_expression(inv.SentenceBytes(warm.data, warm.offsets[:3]), index, fit)  # compile/load
        file_times, cpu_times = [], []
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            packed = inv.read_sentence_file(path)
            result = inv.sentences_to_expression(packed, index, fit)
            file_times.append(time.perf_counter() - wall)
            cpu_times.append(time.process_time() - cpu)
        assert result.X.nnz == n_words, "every word of the synthetic sentences is a distinct gene"
        lines = path.read_text().splitlines()
    wall, cpu = time.perf_counter(), time.process_time()
    packed = inv.sentence_bytes(lines)
    inv.sentences_to_expression(packed, index, fit)
    strings_time = time.perf_counter() - wall
    n = args.n_sentences
    figures = {
        "file_sentences_per_s_median": n / float(np.median(file_times)),
        "file_sentences_per_s_best": n / min(file_times),
        "file_seconds_median": float(np.median(file_times)),
        "cpu_seconds_median": float(np.median(cpu_times)),
        "strings_sentences_per_s": n / strings_time,
    }
    print(f"text file -> CSR: median {figures['file_seconds_median']:.2f} s = "
          f"{figures['file_sentences_per_s_median']:,.0f} sentences/s "
          f"(best {figures['file_sentences_per_s_best']:,.0f}/s; CPU {figures['cpu_seconds_median']:.2f} s)")
    print(f"Python strings -> CSR (incl. packing into one buffer): "
          f"{figures['strings_sentences_per_s']:,.0f} sentences/s")
    return figures


if __name__ == "__main__":
    run_cli(main, parse_args)
