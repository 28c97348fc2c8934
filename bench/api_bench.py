"""Benchmark the in-memory API against the newer cell2sentence package, side by side.

synthetic h5ad (``bench/synthetic.py``, cached under ``data/bench/``) -> a table on stdout:
cells/s of ``utils.adata_to_sentences`` + ``.to_dataset_dict()`` (ours: QC, normalization,
ranking, sentences and the fit, in memory, into an Arrow dataset; with 1 thread and with the
API's default; also with ``.sentences`` made Python strings) and of
``cell2sentence.CSData.adata_to_arrow`` (theirs: sentences of ``X`` as given, into an Arrow
dataset) on the same cells, and the ratio.

Theirs runs in its own virtual environment (``--their_python``; it pins other versions of our
dependencies), in a subprocess that reads the same file and times only the call. Set it up once:

    python -m venv /tmp/c2s-venv
    /tmp/c2s-venv/bin/pip install torch==2.13.0      # first: else it pulls a CUDA torch
    /tmp/c2s-venv/bin/pip install cell2sentence==1.2.0

Both are timed after a warm-up on the first 500 cells (our compiled kernels load from numba's
cache; their imports are done), each run after the previous result was freed, ours and theirs
alternating; the best of ``--repeats`` counts.

Example::

    python bench/api_bench.py --n_cells 20000 --their_python /tmp/c2s-venv/bin/python
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/api_bench.py`
    sys.path.insert(0, str(ROOT))

from bench.common import add_shared_flags, bench_parser  # noqa: E402
from bench.synthetic import cached_synthetic_h5ad  # noqa: E402
from utils.cli import InputError, run_cli  # noqa: E402

logger = logging.getLogger("cell2sentence")

THEIRS = """
import gc, json, sys, time
import anndata as ad
from cell2sentence import CSData
adata = ad.read_h5ad(sys.argv[1])
CSData.adata_to_arrow(adata[:500].copy(), label_col_names=["cell_type"])  # warm-up
best = float("inf")
for _ in range(int(sys.argv[2])):
    dataset = vocabulary = None
    gc.collect()  # the previous result freed first, as for ours
    start = time.perf_counter()
    dataset, vocabulary = CSData.adata_to_arrow(adata, label_col_names=["cell_type"])
    best = min(best, time.perf_counter() - start)
print(json.dumps({"seconds": best, "rows": len(dataset), "first": dataset[0]["cell_sentence"][:60]}))
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__, show_defaults=True)
    p.add_argument("--n_cells", type=int, default=20_000, help="cells of the synthetic dataset")
    p.add_argument("--n_genes", type=int, default=33_000, help="genes of the synthetic dataset")
    p.add_argument("--genes_per_cell", type=int, default=2_000, help="mean expressed genes per cell")
    p.add_argument("--cache_dir", type=Path, default=Path("data/bench"), help="where synthetic files are cached")
    p.add_argument("--their_python", type=str, default=None,
                   help="interpreter with cell2sentence==1.2.0 installed (left out: ours only)")
    p.add_argument("--num_proc", type=int, nargs="+", default=None,
                   help="adata_to_sentences' worker threads, each measured (default: 1 and the API's default, "
                        "the cores this process may use)")
    add_shared_flags(p, repeats=(3, "timed runs of each (the best counts)"))
    args = p.parse_args(argv)
    if min(args.n_cells, args.repeats, *(args.num_proc or [1])) < 1:
        p.error("--n_cells, --repeats and --num_proc must be positive.")
    return args


class OurRuns:
    """``adata_to_sentences`` + ``.to_dataset_dict()`` (an Arrow dataset, as theirs returns) on
    the file's cells, per thread count, and that plus making ``.sentences`` Python strings."""

    def __init__(self, path: Path, threads: Sequence[int]):
        import anndata as ad

        from utils import adata_to_sentences

        self.adata, self.threads, self.run = ad.read_h5ad(path), threads, adata_to_sentences
        self.run(self.adata[:500].copy())  # warm-up: the kernels load from numba's cache

    def seconds(self) -> dict[str, float]:
        """One timed run of each thread count."""
        timed = {}
        for n in self.threads:
            cs = dataset = None
            gc.collect()  # the previous result freed first: else each run also pays for new memory
            start = time.perf_counter()
            cs = self.run(self.adata, num_proc=n)
            dataset = cs.to_dataset_dict()
            middle = time.perf_counter()
            _ = cs.sentences
            end = time.perf_counter()
            timed[f"ours, {n} thread(s): adata_to_sentences + to_dataset_dict"] = middle - start
            timed[f"ours, {n} thread(s): the same + .sentences as Python strings"] = end - start
        logger.info("Ours: %s kept cells (%s in the train split); first sentence %s...", f"{len(cs):,}",
                    f"{len(dataset['train']):,}", cs.sentences[0][:60])
        return timed


def time_theirs(python: str, path: Path, *, repeats: int) -> float:
    done = subprocess.run([python, "-c", THEIRS, str(path), str(repeats)], capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"{python} could not run CSData.adata_to_arrow ({done.stderr.strip().splitlines()[-1:]}); "
                         "install cell2sentence==1.2.0 there (see this script's docstring).")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    logger.info("Theirs: %s cells; first sentence %s...", f"{result['rows']:,}", result["first"])
    return float(result["seconds"])


def main(args: argparse.Namespace) -> dict[str, float]:
    path = cached_synthetic_h5ad(args.cache_dir, n_cells=args.n_cells, n_genes=args.n_genes,
                                 genes_per_cell=args.genes_per_cell, seed=0)
    from utils.transform.sentences import default_threads

    threads = args.num_proc or sorted({1, default_threads()})
    ours = OurRuns(path, threads)
    theirs = "theirs: CSData.adata_to_arrow (cell2sentence 1.2.0)"
    seconds: dict[str, float] = {}
    for _ in range(args.repeats):  # ours and theirs alternate, so that a busy machine hits both alike
        timed = ours.seconds()
        if args.their_python:
            timed[theirs] = time_theirs(args.their_python, path, repeats=1)
        seconds = {name: min(s, seconds.get(name, float("inf"))) for name, s in timed.items()}
    reference = seconds.get(theirs)
    width = max(len(k) for k in seconds)
    print(f"{'':{width}}  {'seconds':>8}  {'cells/s':>9}  {'vs theirs':>9}")
    for name, s in seconds.items():
        ratio = f"{reference / s:.1f}x" if reference else "-"
        print(f"{name:{width}}  {s:8.2f}  {args.n_cells / s:9,.0f}  {ratio:>9}")
    print(f"{args.n_cells:,} cells x {args.n_genes:,} genes, ~{args.genes_per_cell:,} expressed per cell; "
          f"best of {args.repeats}, each after the previous result was freed; {os.cpu_count()} CPUs")
    return seconds


if __name__ == "__main__":
    run_cli(main, parse_args)
