"""Turn a single-cell count matrix into cell sentences, an arrow dataset and an evaluation.

Each cell becomes the names of its expressed genes ordered from highest to lowest normalized
expression (ties broken at random, reproducibly with --seed), after the original project's
quality control and normalization. A linear model from log-rank to log-expression is fitted so
that sentences can later be turned back into expression (inverse.py).

    data/<name>.h5ad -> data/cell_sentences/{train,valid,test}.txt, *_barcodes.txt,
                        *_indices.npy, vocab.txt
                        data/cell_sentences_hf/ (datasets.DatasetDict)
                        data/eval/transformation_metrics.csv + figures, qc_by_label.csv
                        data/<name>_preprocessed.h5ad, data/transform_args.json

The matrix is read and processed in chunks of --chunk_size cells (out of core for CSR or
dense .h5ad), optionally by --num_proc worker threads.

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

from tqdm.auto import tqdm

from utils import cli, publish
from utils.contract import TRANSFORM, preprocessed_name, transform_names
from utils.transform.filewriter import keep_freed_memory_for_reuse
from utils.transform.outputs import (
    TransformOutputs,
    write_chunk_task,
)
from utils.transform.pipeline import (
    DEFAULT_LABEL_COLUMN,
    PassContext,
    TransformOptions,
    open_inputs,
    ordered_map,
    plan_run,
)
from utils.transform.preprocess import INPUT_KINDS, TARGET_SUM, QCParams
from utils.transform.readers import input_stem

logger = logging.getLogger("cell2sentence")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.script_parser(__doc__)
    p.add_argument("--data_filepath", type=Path, nargs="+", default=None,
                   help="input: .h5ad (10x .h5, 10x matrix folder, .loom, .csv also read); several files, or a "
                        "folder of .h5ad files, are joined into one dataset (genes matched by name) (default: "
                        "the file retrieve_example_data.py wrote, as recorded in data/.example_path)")
    cli.add_run_flags(p, output_dir=Path("data"), output_dir_help="where outputs go",
                      seed_help="seed of tie-breaking, splits and sampling")
    p.add_argument("--layer", type=str, default=None,
                   help="layer holding counts (default: .raw.X, else layers['counts'], else X)")
    p.add_argument("--input_kind", choices=INPUT_KINDS, default="auto",
                   help="raw counts are normalized; log1p values are brought back with expm1")
    p.add_argument("--gene_column", type=str, default=None,
                   help="var column with gene names (default: feature_name when present, else var_names)")
    p.add_argument("--label_column", type=str, default=None,
                   help=f"obs column of cell types (default: {DEFAULT_LABEL_COLUMN!r}, omitted with a warning when absent)")
    p.add_argument("--obs_columns", type=str, nargs="*", default=[],
                   help="further obs columns to copy into the arrow dataset")
    p.add_argument("--bad_gene_names", choices=("replace", "error"), default="replace",
                   help="gene names with whitespace: replace it by '_' (with a warning) or fail")
    p.add_argument("--min_genes_per_cell", type=int, default=200, help="QC: drop cells with fewer genes")
    p.add_argument("--min_cells_per_gene", type=int, default=3, help="QC: drop genes in fewer cells")
    p.add_argument("--max_genes_per_cell", type=int, default=2500, help="QC: drop cells with this many genes or more")
    p.add_argument("--max_mt_percent", type=float, default=200.0,
                   help="QC: drop cells with this percent of MT- counts or more (200, the original's, drops none)")
    p.add_argument("--no_qc", action="store_true", help="skip quality control (empty cells are still dropped)")
    p.add_argument("--top_k_genes", type=int, default=None, help="keep the top K genes of each sentence (default: all)")
    p.add_argument("--exclude_genes", type=str, default=None, metavar="REGEX",
                   help="leave genes whose name matches this regular expression out of the sentences, "
                        "after QC and before normalization, e.g. '^MT-|^RP[SL]'")
    p.add_argument("--target_sum", type=float, default=TARGET_SUM,
                   help="raw counts are normalized to this total per cell before log10(1 + x)")
    p.add_argument("--split_fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1],
                   metavar=("TRAIN", "VALID", "TEST"), help="fractions of cells per split")
    p.add_argument("--fit_threshold", type=float, default=3.0,
                   help="fit the rank-expression line on genes with log10(1 + rank) below this")
    p.add_argument("--eval_cells", type=int, default=1_000,
                   help="seeded sample of cells whose genes feed the fit and the figures")
    p.add_argument("--chunk_size", type=int, default=2_048,
                   help="cells read and processed at a time (memory grows with it)")
    p.add_argument("--num_proc", type=int, default=1, help="worker threads for the chunks (up to the number of cores)")
    args = p.parse_args(cli.renamed_flags(argv))
    if args.data_filepath is None:
        args.data_filepath = [example_path()]
    if len(args.data_filepath) == 1:  # one file: a path, as it always was (transform_args.json too)
        args.data_filepath = args.data_filepath[0]
    transform_options(args).check(prefix="--")
    return args


def transform_options(args: argparse.Namespace) -> TransformOptions:
    """The run's options from its flags (the one place a new flag becomes an option)."""
    qc = QCParams(args.min_genes_per_cell, args.min_cells_per_gene, args.max_genes_per_cell,
                  args.max_mt_percent, enabled=not args.no_qc)
    return TransformOptions(
        input_kind=args.input_kind, gene_column=args.gene_column, label_column=args.label_column,
        obs_columns=tuple(args.obs_columns), bad_gene_names=args.bad_gene_names, qc=qc, max_genes=args.top_k_genes,
        exclude_genes=args.exclude_genes, target_sum=args.target_sum, split_fractions=tuple(args.split_fractions),
        eval_cells=args.eval_cells, seed=args.seed, chunk_size=args.chunk_size, num_proc=args.num_proc,
    )  # fmt: skip


def example_path(data_dir: Path = Path("data")) -> Path:
    """The example data retrieve_example_data.py wrote (online: Dominguez Conde; offline:
    pbmc68k_reduced), as it recorded it in ``data/.example_path``."""
    pointer = data_dir / ".example_path"
    if pointer.is_file() and pointer.read_text().strip():
        return Path(pointer.read_text().strip())
    return data_dir / "dominguez_sample.h5ad"


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

    # Pass 1: QC statistics, then the splits and the evaluation sample.
    pass_started = time.perf_counter()
    plan = plan_run(source, options, normalization=normalization)
    _log_pass("QC pass", source.n_cells, pass_started)

    # matplotlib takes 0.3 s to import: let it load while pass 2 waits on the disk (the
    # figures' own import below then finds it done, or waits for it).
    threading.Thread(target=importlib.import_module, args=("utils.evaluation.figures",), daemon=True).start()

    # Pass 2: sentences, preprocessed matrix and evaluation points, written as they come.
    with publish.staged_outputs(args.output_dir, names, overwrite=args.overwrite) as tmp:
        outputs = TransformOutputs(tmp, plan, h5ad_name=preprocessed_name(stem))
        context = PassContext(source, plan.settings, plan=plan, outputs=outputs)
        pass_started = time.perf_counter()
        results = ordered_map(write_chunk_task, plan.chunks, num_proc=args.num_proc, context=context)
        try:
            with tqdm(total=source.n_cells, desc="Cell sentences", unit="cells") as bar:
                for (start, stop), (chunk_start, sentences) in zip(plan.chunks, results, strict=True):
                    outputs.add(sentences, chunk_start)
                    bar.update(stop - start)
            _log_pass("Sentence pass", source.n_cells, pass_started)
            metrics = outputs.finish(fit_threshold=args.fit_threshold, seed=args.seed)
        except BaseException:
            outputs.abort()  # release workers waiting for their turn to write
            results.close()  # wait for the running workers: they write to these files
            outputs.close()
            raise
        cli.save_args(args, tmp / TRANSFORM.args)
    logger.info("Wrote %s cell sentences to %s in %.1f s.", f"{plan.n_kept:,}", args.output_dir,
                time.perf_counter() - started)
    return metrics


def _log_pass(name: str, n_cells: int, started: float) -> None:
    seconds = time.perf_counter() - started
    logger.info("%s: %s cells in %.2f s (%s cells/s).", name, f"{n_cells:,}", seconds,
                f"{n_cells / max(seconds, 1e-9):,.0f}")


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
