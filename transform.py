"""Turn a single-cell count matrix into cell sentences, an arrow dataset and an evaluation.

Each cell becomes the names of its expressed genes from highest to lowest normalized expression
(ties broken reproducibly with --seed); a line from log-rank to log-expression is fitted for inverse.py.

    data/<name>.h5ad -> data/cell_sentences/ (text, barcodes, vocab), data/cell_sentences_hf/ (DatasetDict),
                        data/eval/ (fit metrics, figures, QC by label), data/<name>_preprocessed.h5ad

Example:
    python transform.py --data_filepath data/dominguez_sample.h5ad --output_dir data/
"""

from __future__ import annotations

import startup_guard  # noqa: F401  # isort: skip  (first: Ctrl-C while the rest loads is one line)

import argparse
import importlib
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from utils import cli, publish
from utils.contract import EXAMPLE, TRANSFORM, preprocessed_name, transform_names
from utils.transform.filewriter import keep_freed_memory_for_reuse
from utils.transform.outputs import TransformOutputs, preprocessed_obs
from utils.transform.pipeline import (
    DEFAULT_LABEL_COLUMN,
    TransformOptions,
    open_inputs,
    plan_run,
    sentence_pass,
)
from utils.transform.preprocess import INPUT_KINDS, TARGET_SUM, QCParams
from utils.transform.readers import input_stem

logger = logging.getLogger("cell2sentence")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.script_parser(__doc__)
    p.add_argument("--data_filepath", type=Path, nargs="+", default=None,
                   help="input: .h5ad (or 10x .h5, 10x matrix folder, .loom, .csv); several files, or a "
                        "folder of .h5ad files, are joined (genes matched by name) (default: the file named "
                        "in data/.example_path)")
    cli.add_run_flags(p, output_dir=Path("data"), output_dir_help="where outputs go",
                      seed_help="seed of tie-breaking, splits and sampling")
    add = p.add_argument
    add("--layer", help="layer holding counts (default: .raw.X, else layers['counts'], else X)")
    add("--input_kind", choices=INPUT_KINDS, default="auto", help="raw counts are normalized; log1p values expm1'd")
    add("--gene_column", help="var column of gene names (default: feature_name when present, else var_names)")
    add("--label_column", help=f"obs column of cell types (default: {DEFAULT_LABEL_COLUMN!r}, when present)")
    add("--obs_columns", nargs="*", default=[], help="further obs columns to copy into the arrow dataset")
    add("--bad_gene_names", choices=("replace", "error"), default="replace",
        help="gene names with whitespace: replace it by '_' (with a warning) or fail")
    add("--min_genes_per_cell", type=int, default=200, help="QC: drop cells with fewer genes")
    add("--min_cells_per_gene", type=int, default=3, help="QC: drop genes in fewer cells")
    add("--max_genes_per_cell", type=int, default=2500, help="QC: drop cells with this many genes or more")
    add("--max_mt_percent", type=float, default=200.0, help="QC: drop cells with this percent of MT- counts or more")
    add("--no_qc", action="store_true", help="skip quality control (empty cells are still dropped)")
    add("--top_k_genes", type=int, default=None, help="keep the top K genes of each sentence (default: all)")
    add("--exclude_genes", metavar="REGEX", help="leave genes matching this out, after QC, e.g. '^MT-|^RP[SL]'")
    add("--target_sum", type=float, default=TARGET_SUM, help="raw counts are normalized to this total per cell")
    add("--split_fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VALID", "TEST"),
        help="fractions of cells per split")
    add("--fit_threshold", type=float, default=3.0, help="fit the line on genes with log10(1 + rank) below this")
    add("--eval_cells", type=int, default=1_000, help="seeded sample of cells that feed the fit and the figures")
    add("--chunk_size", type=int, default=2_048, help="cells processed at a time (memory grows with it)")
    add("--num_proc", type=int, default=1, help="worker threads for the chunks")
    args = p.parse_args(cli.renamed_flags(argv))
    if args.data_filepath is None:
        args.data_filepath = [example_path()]
    if len(args.data_filepath) == 1:  # one file is recorded as a path in transform_args.json
        args.data_filepath = args.data_filepath[0]
    transform_options(args).check(prefix="--")
    return args


def transform_options(args: argparse.Namespace) -> TransformOptions:
    qc = QCParams(args.min_genes_per_cell, args.min_cells_per_gene, args.max_genes_per_cell,
                  args.max_mt_percent, enabled=not args.no_qc)
    return TransformOptions(
        input_kind=args.input_kind, gene_column=args.gene_column, label_column=args.label_column,
        obs_columns=tuple(args.obs_columns), bad_gene_names=args.bad_gene_names, qc=qc, max_genes=args.top_k_genes,
        exclude_genes=args.exclude_genes, target_sum=args.target_sum, split_fractions=tuple(args.split_fractions),
        eval_cells=args.eval_cells, seed=args.seed, chunk_size=args.chunk_size, num_proc=args.num_proc,
    )  # fmt: skip


def example_path(data_dir: Path = Path("data")) -> Path:
    """The example data retrieve_example_data.py recorded in ``data/.example_path``."""
    pointer = data_dir / EXAMPLE.path
    if pointer.is_file() and pointer.read_text().strip():
        return Path(pointer.read_text().strip())
    return data_dir / EXAMPLE.dominguez


@publish.releasing_outputs
def main(args: argparse.Namespace) -> dict[str, float]:
    started = time.perf_counter()
    keep_freed_memory_for_reuse()
    stem = input_stem(args.data_filepath)  # several inputs: their folder's name, or "combined"
    names = transform_names(stem)  # what the transform writes under --output_dir (the data contract)
    publish.claim_output_dir(args.output_dir, names, overwrite=args.overwrite)
    source, options, normalization = open_inputs(args.data_filepath, transform_options(args), layer=args.layer)
    logger.info("Read %s: %s cells x %s genes from %s.", source.path,
                f"{source.n_cells:,}", f"{source.n_genes:,}", source.matrix_name)
    pass_started = time.perf_counter()
    plan = plan_run(source, options, normalization=normalization)
    _log_pass("QC pass", source.n_cells, pass_started)
    # matplotlib takes 0.3 s to import: let it load while pass 2 waits on the disk.
    threading.Thread(target=importlib.import_module, args=("utils.evaluation.figures",), daemon=True).start()

    kept = plan.qc.cell_mask
    with publish.staged_outputs(args.output_dir, names, overwrite=args.overwrite) as tmp, TransformOutputs(
            tmp, plan.columns, plan.kept_names, plan.qc.n_stored[kept], h5ad_name=preprocessed_name(stem),
            plan=plan) as outputs:
        pass_started = time.perf_counter()
        gene_cells, fit, points = sentence_pass(plan, outputs, num_proc=args.num_proc,
                                                fit_threshold=args.fit_threshold)
        _log_pass("Sentence pass", source.n_cells, pass_started)
        outputs.finish(split=plan.split_of_cell[kept], gene_cells=gene_cells, obs=preprocessed_obs(plan), fit=fit,
                       points=points, qc_table=plan.qc_table, seed=args.seed)
        cli.save_args(args, tmp / TRANSFORM.args)
    logger.info("Wrote %s cell sentences to %s in %.1f s.", f"{plan.n_kept:,}", args.output_dir,
                time.perf_counter() - started)
    return fit.as_row()


def _log_pass(name: str, n_cells: int, started: float) -> None:
    seconds = time.perf_counter() - started
    logger.info("%s: %s cells in %.2f s (%s cells/s).", name, f"{n_cells:,}", seconds,
                f"{n_cells / max(seconds, 1e-9):,.0f}")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
