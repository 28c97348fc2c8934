"""Benchmark transform.py: cells per second and peak memory on synthetic data.

synthetic h5ad (cached under ``data/bench/``) -> a table on stdout: cells, non-zeros, seconds,
cells/s, peak RSS, output size on disk.

For each ``--n_cells`` it makes (or reuses) a synthetic count matrix of realistic sparsity
(``bench/synthetic.py``: 33,000 genes, ~2,000 expressed genes per cell, integer counts), then
runs transform.py on it as a subprocess::

    <python> transform.py --data_filepath F --output_dir TMP --overwrite \
        --max_genes_per_cell 100000 --num_proc N [--chunk_size C]

and measures:

- ``seconds``: wall time of the subprocess (Python start-up and imports included);
- ``peak RSS tree``: the largest sum of RSS over transform.py and all its child processes,
  polled every 0.05 s with psutil (pages shared by forked workers are counted once per
  process, so with ``--num_proc`` > 1 this is an upper bound);
- ``max RSS 1 proc``: the kernel's high-water mark (``ru_maxrss``) of the largest single
  process of that run, from ``os.wait4`` -- the per-run value of
  ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, which is logged at the end over all runs;
- ``user s`` / ``sys s``: CPU seconds of transform.py and its children, in user space and in
  the kernel (the kernel's share is mostly putting the output into the page cache);
- ``QC pass`` / ``sentence pass``: cells/s of transform.py's two passes over the data, from the
  lines it logs (start-up, the fit, the figures and the final h5ad metadata are outside them);
- ``output``: bytes on disk of everything transform.py wrote, and that size over the run's time.

Each size runs ``--repeats`` times (one row each); the best run per size is printed at the end.
``--transform A.py B.py`` measures several scripts side by side in one run (e.g. a ``git
worktree`` of the code before a change against the change), alternating between them for every
repeat so that a busy machine or a slower disk hits both alike; ``--compare_outputs`` then also
checks that their outputs of each size are byte for byte the same (``transform_args.json``,
which records the paths, aside). ``--split_inputs K`` also runs each script on the same
cells as K files in a folder (the genes of each file after the first in another order), to
compare a several-file run with the one-file run.
Outputs go under ``--output_root`` (default: the cache folder) and are removed afterwards unless
``--keep_outputs``.

Example::

    python bench/transform_bench.py --n_cells 2000 20000 --num_proc 2
    python bench/transform_bench.py --n_cells 200000 --num_proc 2 --repeats 2 --split_inputs 4
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/transform_bench.py`
    sys.path.insert(0, str(ROOT))

from bench.common import add_int_flags, add_shared_flags, bench_parser  # noqa: E402
from bench.synthetic import cached_split_inputs, cached_synthetic_h5ad  # noqa: E402
from utils.cli import InputError, run_cli  # noqa: E402

logger = logging.getLogger("cell2sentence")

POLL_SECONDS = 0.05


@dataclass
class RunResult:
    """Measurements of one transform.py run."""

    n_cells: int
    nnz: int
    seconds: float
    peak_tree_rss: int  # bytes
    max_single_rss: int  # bytes
    output_bytes: int
    returncode: int
    user_seconds: float = 0.0
    sys_seconds: float = 0.0
    qc_pass_seconds: float | None = None  # from transform.py's log
    sentence_pass_seconds: float | None = None
    script: str = ""  # which --transform ran


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__, show_defaults=True)
    parser.add_argument("--n_cells", type=int, nargs="+", default=[2_000, 20_000], help="Dataset sizes to run.")
    parser.add_argument("--num_proc", type=int, default=2, help="Passed to transform.py.")
    parser.add_argument("--chunk_size", type=int, default=None,
                        help="Passed to transform.py when given (default: transform.py's own default).")
    add_int_flags(parser, genes_per_cell=(2_000, "Mean expressed genes per cell."),
                  n_genes=(33_000, "Genes in the matrix."), seed=(0, "Seed of the synthetic data."))
    parser.add_argument("--cache_dir", type=Path, default=Path("data/bench"),
                        help="Where synthetic files are cached (reused when the parameters match) and runs write.")
    parser.add_argument("--transform", type=Path, nargs="+", default=[ROOT / "transform.py"],
                        help="The script(s) to benchmark, side by side (runs alternate between them).")
    parser.add_argument("--without", nargs="*", default=[], metavar="TRICK",
                        help="Also run the first --transform with each of these low-level tricks turned off "
                             "(bench/without.py: direct_reader, o_direct, mallopt).")
    parser.add_argument("--split_inputs", type=int, default=0, metavar="K",
                        help="Also run each --transform on the same cells as K files in a folder (genes in another "
                             "order in each file after the first; bench/synthetic.py: cached_split_inputs).")
    parser.add_argument("--compare_outputs", action="store_true",
                        help="Check that every --transform writes byte-identical outputs (first run of each size).")
    parser.add_argument("--python", type=str, default=sys.executable, help="Interpreter that runs transform.py.")
    parser.add_argument("--timeout", type=float, default=3600.0, help="Seconds before a run is killed.")
    parser.add_argument("--keep_outputs", action="store_true", help="Keep what transform.py wrote (path logged).")
    add_shared_flags(parser, repeats=(1, "Runs per size."))
    parser.add_argument("--output_root", type=Path, default=None,
                        help="Where runs write (default: --cache_dir); e.g. /dev/shm to take the disk out.")
    args = parser.parse_args(argv)
    if min(args.n_cells) < 1 or min(args.num_proc, args.genes_per_cell, args.repeats) < 1:
        parser.error("--n_cells, --num_proc, --genes_per_cell and --repeats must be positive.")
    if args.split_inputs == 1 or args.split_inputs < 0:
        parser.error("--split_inputs must be at least 2 (files), or left out.")
    if args.compare_outputs and args.split_inputs:
        parser.error("--compare_outputs compares scripts on one input; several files add a dataset column.")
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error("--chunk_size must be positive; leave it out to use transform.py's default.")
    return args


def _in_fresh_process(function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` in a spawned process: the runs forked later would report
    this process's peak memory as their own ``ru_maxrss`` (Linux keeps it across fork)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args, **kwargs).result()


def _tree_rss(proc: psutil.Process) -> int:
    """Sum of RSS over ``proc`` and its descendants (0 for any that just exited)."""
    total = 0
    try:
        family = [proc, *proc.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            total += p.memory_info().rss
    return total


def _kill_tree(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def measure(command: list[str], *, log_path: Path, timeout: float) -> tuple[float, int, int, int, Any]:
    """Run ``command``; return (seconds, peak tree RSS, max single-process RSS, return code,
    resource usage).

    The child gets its own process group so that a timeout or Ctrl-C kills its workers too.
    """
    with log_path.open("wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        ps = psutil.Process(proc.pid)
        peak = 0
        try:
            while True:
                # wait4 reaps the child and returns its rusage (and that of its waited-for children)
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                peak = max(peak, _tree_rss(ps))
                if time.perf_counter() - start > timeout:
                    _kill_tree(proc.pid)
                    raise InputError(
                        f"transform.py ran longer than --timeout {timeout:g} s and was stopped; "
                        "raise --timeout or use fewer cells."
                    )
                time.sleep(POLL_SECONDS)
        except BaseException:
            _kill_tree(proc.pid)
            proc.wait()
            raise
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
    return seconds, peak, usage.ru_maxrss * 1024, proc.returncode, usage  # ru_maxrss: KiB on Linux


_PASS_LINE = re.compile(r"(QC pass|Sentence pass): [\d,]+ cells in ([\d.]+) s")


def pass_seconds(log_text: str) -> dict[str, float]:
    """Seconds of each pass that transform.py logged ("QC pass: N cells in S s ...")."""
    return {m.group(1): float(m.group(2)) for m in _PASS_LINE.finditer(log_text)}


def dir_bytes(path: Path) -> int:
    """Bytes of all regular files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def count_nnz(path: Path) -> int:
    """Non-zeros of the CSR ``X`` of an h5ad, read from its metadata only."""
    with h5py.File(path, "r") as f:
        return int(f["X/data"].shape[0])


def _labels(scripts: Sequence[Path]) -> list[str]:
    """Short names of the scripts: their folder's name (the worktree), else their path."""
    names = [t.parent.name for t in scripts]
    return names if len(set(names)) == len(names) else [str(t) for t in scripts]


def differing_files(a: Path, b: Path) -> list[str]:
    """Files under ``a`` and ``b`` (relative paths) that are missing on one side or differ in
    content, ``transform_args.json`` aside."""
    names = {p.relative_to(a) for p in a.rglob("*") if p.is_file()} | {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    differ = []
    for name in sorted(names):
        if name.name == "transform_args.json":
            continue
        x, y = a / name, b / name
        if not (x.is_file() and y.is_file() and x.stat().st_size == y.stat().st_size and _same_bytes(x, y)):
            differ.append(str(name))
    return differ


def _same_bytes(x: Path, y: Path, block: int = 64 << 20) -> bool:
    with x.open("rb") as f, y.open("rb") as g:
        while True:
            u, v = f.read(block), g.read(block)
            if u != v:
                return False
            if not u:
                return True


def format_table(results: Sequence[RunResult]) -> str:
    """The results as an aligned text table."""
    mb = 1024**2
    header = ("cells", "non-zeros", "seconds", "cells/s", "peak RSS tree MB", "max RSS 1 proc MB",
              "user s", "sys s", "QC pass cells/s", "sentence pass cells/s", "output MB", "output MB/s",
              "script")  # fmt: skip
    rows = [header]

    def rate(seconds: float | None, n: int) -> str:
        return "-" if not seconds else f"{n / seconds:,.0f}"

    for r in results:
        rows.append(
            (
                f"{r.n_cells:,}",
                f"{r.nnz:,}",
                f"{r.seconds:.1f}",
                f"{r.n_cells / r.seconds:,.0f}",
                f"{r.peak_tree_rss / mb:,.0f}",
                f"{r.max_single_rss / mb:,.0f}",
                f"{r.user_seconds:.1f}",
                f"{r.sys_seconds:.1f}",
                rate(r.qc_pass_seconds, r.n_cells),
                rate(r.sentence_pass_seconds, r.n_cells),
                f"{r.output_bytes / mb:,.1f}",
                f"{r.output_bytes / mb / r.seconds:,.0f}",
                r.script,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[RunResult]:
    """Run the benchmark for every size and print the table; returns the measurements."""
    scripts = [t.resolve() for t in args.transform]
    for transform in scripts:
        if not transform.is_file():
            raise InputError(
                f"{transform} does not exist; pass the script to benchmark with --transform."
            )
    labels = _labels(scripts)
    # A script is run as [python, *prefix, script]: bench/without.py takes the trick first. The
    # last field is the number of input files (1: the synthetic file itself).
    variants = [([], t, label, 1) for t, label in zip(scripts, labels, strict=True)]
    variants += [([str(ROOT / "bench" / "without.py"), trick], scripts[0], f"without {trick}", 1)
                 for trick in args.without]
    if args.split_inputs:
        variants += [([], t, f"{label}, {args.split_inputs} files", args.split_inputs)
                     for t, label in zip(scripts, labels, strict=True)]
    labels = [v[2] for v in variants]
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    output_root = args.output_root or args.cache_dir
    output_root.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    kept: dict[int, list[Path]] = {}  # per size: the outputs kept for --compare_outputs
    runs = [(n, *v) for n in args.n_cells for _ in range(args.repeats) for v in variants]
    for n_cells, prefix, transform, label, n_files in runs:
        data = cached_synthetic_h5ad(
            args.cache_dir, n_cells=n_cells, n_genes=args.n_genes,
            genes_per_cell=args.genes_per_cell, seed=args.seed,
        )  # fmt: skip
        nnz = count_nnz(data)
        if n_files > 1:
            data = _in_fresh_process(cached_split_inputs, data, n_files, seed=args.seed)
        out = Path(tempfile.mkdtemp(prefix=f"run-c{n_cells}-", dir=output_root))
        command = [
            args.python, *prefix, *([] if prefix else [str(transform)]), "--data_filepath", str(data), "--output_dir", str(out / "out"),
            "--overwrite", "--max_genes_per_cell", "100000", "--num_proc", str(args.num_proc),
        ]  # fmt: skip
        if args.chunk_size is not None:
            command += ["--chunk_size", str(args.chunk_size)]
        logger.info("Running %s", " ".join(command))
        log_path = out / "transform.log"
        keep = args.keep_outputs or (args.compare_outputs and len(kept.get(n_cells, [])) < len(variants))
        try:
            seconds, peak, single, code, usage = measure(command, log_path=log_path, timeout=args.timeout)
            if code != 0:
                tail = log_path.read_text(errors="replace").splitlines()[-15:]
                raise InputError(
                    f"transform.py failed on {data} with exit status {code}; its last lines:\n"
                    + "\n".join(tail)
                )
            out_bytes = dir_bytes(out / "out")
            passes = pass_seconds(log_path.read_text(errors="replace"))
        finally:
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
        result = RunResult(n_cells, nnz, seconds, peak, single, out_bytes, code, usage.ru_utime,
                           usage.ru_stime, passes.get("QC pass"), passes.get("Sentence pass"), label)
        results.append(result)
        logger.info(
            "%s cells: %.1f s, %s cells/s, peak RSS %s MB.",
            f"{n_cells:,}", seconds, f"{n_cells / seconds:,.0f}", f"{peak / 1024**2:,.0f}",
        )  # fmt: skip
        if args.keep_outputs:
            logger.info("Kept the outputs of this run in %s.", out)
        elif keep:
            kept.setdefault(n_cells, []).append(out)
            if len(kept[n_cells]) == len(variants):
                for other, other_label in zip(kept[n_cells][1:], labels[1:], strict=True):
                    differ = differing_files(kept[n_cells][0] / "out", other / "out")
                    print(f"{n_cells:,} cells: outputs of {other_label} vs {labels[0]}: "
                          + ("byte-identical" if not differ else f"DIFFER in {differ}"))
                for folder in kept[n_cells]:
                    shutil.rmtree(folder, ignore_errors=True)
    children_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(format_table(results))
    if args.repeats > 1:
        print("Best run per size and script:")
        best = {}
        for r in results:
            if (r.n_cells, r.script) not in best or r.seconds < best[r.n_cells, r.script].seconds:
                best[r.n_cells, r.script] = r
        print(format_table(list(best.values())))
    chunk = args.chunk_size if args.chunk_size is not None else "transform.py default"
    print(
        f"num_proc={args.num_proc}, chunk_size={chunk}, genes={args.n_genes:,}, "
        f"genes_per_cell~{args.genes_per_cell:,}, CPUs={os.cpu_count()}; "
        f"getrusage(RUSAGE_CHILDREN).ru_maxrss over all runs: {children_maxrss / 1024**2:,.0f} MB"
    )
    return results


if __name__ == "__main__":
    run_cli(main, parse_args)
