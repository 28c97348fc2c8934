"""Turn cell sentences back into expression: the inverse of transform.py's rank transform (``utils/inverse.py``).

    sentences (.txt or an arrow dataset) + <transform_dir> -> <output>.h5ad [+ <output>_metrics.json]

Example:
    python inverse.py --sentences data/generated/<run>/generated_cells.txt \\
        --labels data/generated/<run>/generated_labels.txt --label_column requested_cell_type \\
        --transform_dir data/ --output data/inverse/generated.h5ad --evaluate
"""

from __future__ import annotations

import startup_guard  # noqa: F401  # isort: skip  (first: Ctrl-C while the rest loads is one line)

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from utils import cli, publish
from utils.contract import (
    TRANSFORM,
    TRANSFORM_EVAL,
    VOCAB,
    labelled_rows,
    load_splits,
    open_dataset_dict,
    read_lines,
    read_preprocessed,
)
from utils.evaluation.generation_metrics import evaluate_generation, real_expression
from utils.evaluation.metrics import sentence_stats
from utils.inverse import (
    SentenceBytes,
    build_vocab_index,
    expression_adata,
    load_transform_fit,
    load_vocab,
    read_sentence_file,
    sentence_bytes,
    sentences_to_expression,
    zero_crossing_rank,
)
from utils.transform.fit import RankExpressionFit

logger = logging.getLogger("cell2sentence")

LABEL_COLUMNS = ("cell_type", "requested_cell_type")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.script_parser(__doc__)
    add = p.add_argument
    add("--sentences", type=Path, default=Path("data/cell_sentences/test.txt"),
        help="a .txt file (one sentence per line) or a datasets folder (save_to_disk)")
    add("--transform_dir", type=Path, default=Path("data"),
        help="transform.py's --output_dir (vocab.txt and transformation_metrics.csv)")
    add("--output", type=Path, help="the .h5ad to write (default: data/inverse/<sentences name>.h5ad)")
    add("--split", help="split of a DatasetDict folder (train, valid, test)")
    add("--sentence_column", default="cell_sentence", help="column of the sentences in an arrow dataset")
    add("--labels", type=Path, help="for a .txt input: a file with one label per line (cell type or requested type)")
    add("--label_column", default="cell_type", help="obs column of the --labels values (e.g. requested_cell_type)")
    add("--names", type=Path, help="for a .txt input: cell names, one per line (default: <stem>_barcodes.txt next "
                                   "to the sentences when it exists, else cell_0, cell_1, ...)")
    add("--case_insensitive", action="store_true", help="also match words that differ from a gene only in case")
    add("--clip_negative", action="store_true", help="drop genes whose reconstructed value is <= 0")
    add("--top_k_genes", type=int, help="use only the first K words of each sentence (default: all)")
    add("--evaluate", action="store_true", help="also write <output stem>_metrics.json: word statistics, "
        "reconstruction vs the preprocessed data for real cells, k-NN accuracy for labelled cells")
    add("--k_neighbors", type=int, default=5, help="k of the k-NN metric (--evaluate)")
    add("--seed", type=int, default=1234, help="seed (the transform itself is deterministic)")
    add("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(cli.renamed_flags(argv))
    if args.top_k_genes is not None and args.top_k_genes < 1:
        raise cli.InputError("--top_k_genes must be at least 1 (or left out to use whole sentences).")
    if args.k_neighbors < 1:
        raise cli.InputError("--k_neighbors must be at least 1.")
    if args.output is None:
        name = args.sentences.stem if args.sentences.suffix == ".txt" else args.sentences.name
        if args.split:
            name = f"{name}_{args.split}"
        args.output = Path("data/inverse") / f"{name or 'sentences'}.h5ad"
    if args.output.suffix != ".h5ad":
        raise cli.InputError(f"--output {args.output} must end in .h5ad.")
    for path in output_paths(args):  # a folder would be replaced (so deleted) by the publish: never the user's
        if path.is_dir():
            raise cli.InputError(f"{path} is a folder, not a file; choose another --output (nothing was changed).")
    return args


def output_paths(args: argparse.Namespace) -> list[Path]:
    """The files the run writes: the h5ad, its args record, and with --evaluate its metrics."""
    stem = args.output.parent / args.output.stem
    return [args.output, Path(f"{stem}_args.json")] + ([Path(f"{stem}_metrics.json")] if args.evaluate else [])


def load_sentences(args: argparse.Namespace) -> tuple[SentenceBytes, pd.DataFrame]:
    """The sentences as one byte buffer and an obs frame (cell names, labels when known)."""
    path: Path = args.sentences
    if not path.exists():
        raise cli.InputError(f"{path} does not exist; pass a sentences .txt file or a datasets folder.")
    if path.is_dir():
        return _load_arrow(path, args)
    if args.split is not None:
        logger.warning("--split is ignored for the text file %s.", path)
    packed = read_sentence_file(path)
    obs = pd.DataFrame(index=pd.RangeIndex(packed.n))

    def lines(file: Path, what: str, fix: str) -> list[str]:
        found = read_lines(file)
        if len(found) != packed.n:
            raise cli.InputError(f"{file} has {len(found):,} {what} for {packed.n:,} sentences in {path}; {fix}.")
        return found

    names_path = args.names or path.with_name(f"{path.stem}_barcodes.txt")
    if args.names is not None or names_path.is_file():
        obs.index = pd.Index(lines(names_path, "names", "pass a matching --names file"), dtype=str)
    if args.labels is not None:
        labels = lines(args.labels, "labels", "pass the labels file written with these sentences")
        obs[args.label_column] = pd.Categorical(labels)
    return packed, obs


def _load_arrow(path: Path, args: argparse.Namespace) -> tuple[SentenceBytes, pd.DataFrame]:
    dd = open_dataset_dict(path, single_ok=True)
    if list(dd) == ["all"]:  # a single saved Dataset
        if args.split is not None:
            logger.warning("--split is ignored: %s is a single dataset.", path)
        ds = dd["all"]
    elif args.split in dd:
        ds = dd[args.split]
    else:
        raise cli.InputError(f"{path} holds the splits {list(dd)}; choose one with --split.")
    if args.sentence_column not in ds.column_names:
        raise cli.InputError(f"{path} has no column {args.sentence_column!r} (it has {ds.column_names}); "
                             "fix --sentence_column.")
    if args.labels is not None:
        raise cli.InputError("--labels is for .txt input; an arrow dataset carries its labels in its columns.")
    table = ds.with_format("arrow")[:]  # an Arrow table: no Python object per cell
    packed = sentence_bytes(table.column(args.sentence_column))
    obs = pd.DataFrame(index=pd.RangeIndex(len(ds)))
    if "cell_name" in ds.column_names:
        obs.index = pd.Index(table.column("cell_name").to_pylist(), dtype=str)
    for column in LABEL_COLUMNS:
        if column in ds.column_names:
            obs[column] = pd.Categorical(table.column(column).to_pylist())
    return packed, obs


def reconstruction_metrics(adata: ad.AnnData, transform_dir: Path) -> dict[str, Any] | None:
    """Reconstructed vs the transform's preprocessed values on the sentences' genes, for cells found by name."""
    from scipy.stats import pearsonr, spearmanr

    truth = read_preprocessed(transform_dir, adata.obs_names)
    if truth is None or truth.n_obs == 0:
        return None
    truth = truth[:, truth.var_names.isin(adata.var_names)]
    mine = sp.csr_matrix(adata[truth.obs_names, truth.var_names].X)
    mine.sort_indices()
    # The preprocessed matrix's values at the reconstruction's entries (0 where it has none).
    rows = np.repeat(np.arange(mine.shape[0]), np.diff(mine.indptr))
    y = np.asarray(sp.csr_matrix(truth.X)[rows, mine.indices], dtype=np.float64).ravel()
    x = np.asarray(mine.data, dtype=np.float64)
    if x.size < 3:
        return None
    return {"n_cells": int(truth.n_obs), "n_points": int(x.size), "pearson_r": float(pearsonr(x, y)[0]),
            "spearman_r": float(spearmanr(x, y)[0]), "mean_abs_error": float(np.abs(x - y).mean())}


def real_knn_metrics(adata: ad.AnnData, packed: SentenceBytes, args: argparse.Namespace, *, fit: RankExpressionFit,
                     vocab_index: Any) -> dict[str, dict[str, Any]]:
    """Per label column (--label_column with --labels, else LABEL_COLUMNS), its cells scored like generated ones
    (``evaluate_generation``) against the transform's test cells; empty when there is nothing to compare with."""
    hf = args.transform_dir / TRANSFORM.dataset
    keys = [key for key in (LABEL_COLUMNS if args.labels is None else (args.label_column,)) if key in adata.obs]
    if not hf.is_dir() or not keys:
        return {}
    try:
        tables = labelled_rows(load_splits(hf, "test", "cell_type", need_labels=True), "cell_type")
    except cli.InputError:
        return {}  # no test split or no cell types: nothing to compare with
    top_k = args.top_k_genes or int(max(1, np.median(adata.obs["n_words"])))
    real = real_expression(tables, split="test", index=vocab_index, fit=fit, top_k=top_k,
                           case_insensitive=args.case_insensitive)
    # The evaluated cells in the same representation: their first top_k words.
    X_eval = sentences_to_expression(packed, vocab_index, fit, case_insensitive=args.case_insensitive,
                                     max_words=top_k).X
    if args.top_k_genes is None:
        logger.info("k-NN on the first %d genes (the median sentence length).", top_k)
    out = {}
    for key in keys:
        result = evaluate_generation(X_eval, adata.obs[key].astype(str).tolist(), real["train"],
                                     tables["train"].column("cell_type").to_pylist(), real["test"],
                                     tables["test"].column("cell_type").to_pylist(), k=args.k_neighbors)
        out[key] = {"top_k_genes": top_k, **result.metrics}
    return out


@publish.releasing_outputs
def main(args: argparse.Namespace) -> ad.AnnData:
    cli.seed_everything(args.seed)
    publish.settle_inputs(args.transform_dir)  # a transform killed while publishing: finished first
    fit = load_transform_fit(args.transform_dir / TRANSFORM_EVAL.metrics)
    vocab = load_vocab(args.transform_dir / VOCAB)
    out_dir = args.output.parent
    names = [path.name for path in output_paths(args)]
    h5ad, record, *metrics_file = names  # metrics_file: [its name] with --evaluate
    publish.claim_output_dir(out_dir, names, overwrite=args.overwrite)
    packed, obs = load_sentences(args)
    if packed.n == 0:  # an h5ad of no cells would look like a result to the next step
        raise cli.InputError(f"{args.sentences} holds no sentences; give a file with one sentence per line (or a "
                             "dataset with rows).")
    logger.info("Read %s sentences (%s bytes) from %s.", f"{packed.n:,}", f"{packed.data.size:,}", args.sentences)
    index = build_vocab_index(vocab)
    start = time.perf_counter()
    result = sentences_to_expression(packed, index, fit, case_insensitive=args.case_insensitive,
                                     clip_negative=args.clip_negative, max_words=args.top_k_genes)
    elapsed = time.perf_counter() - start
    logger.info("Reconstructed %s cells × %s genes (%s non-zeros) in %.2f s (%s sentences/s).",
                f"{packed.n:,}", f"{len(vocab):,}", f"{result.X.nnz:,}", elapsed,
                f"{packed.n / max(elapsed, 1e-9):,.0f}")
    stats = sentence_stats(result)
    if result.n_invalid_genes.sum():
        logger.warning("%s words (%.2f%%) are not genes of the vocabulary; skipped, keeping their place.",
                       f"{int(result.n_invalid_genes.sum()):,}", 100 * stats["invalid_rate"])
    if result.n_duplicate_genes.sum():
        logger.warning("%s repeated genes were placed once, at the average of their positions.",
                       f"{int(result.n_duplicate_genes.sum()):,}")
    crossing = zero_crossing_rank(fit)
    if result.n_words.max() > crossing:
        if args.clip_negative:
            logger.warning("Dropped %s values <= 0 (ranks from %.0f on, the fit's zero crossing).",
                           f"{result.n_clipped:,}", np.ceil(crossing))
        else:
            logger.warning("Genes at ranks from %.0f on get values <= 0 (the fit's zero crossing); kept so that "
                           "the order is exact, pass --clip_negative to drop them.", np.ceil(crossing))
    adata = expression_adata(result, obs, vocab, case_insensitive=args.case_insensitive)
    adata.uns["inverse"] = {
        "slope": fit.slope, "intercept": fit.intercept, "clip_negative": bool(args.clip_negative),
        "case_insensitive": bool(args.case_insensitive),
        "max_genes": -1 if args.top_k_genes is None else int(args.top_k_genes),
        "transform_dir": str(args.transform_dir), "sentences": str(args.sentences),
    }
    metrics: dict[str, Any] = {}
    if args.evaluate:
        metrics = {"sentences": stats, "fit": {"slope": fit.slope, "intercept": fit.intercept},
                   "seconds": elapsed}
        rec = reconstruction_metrics(adata, args.transform_dir)
        if rec is not None:
            metrics["reconstruction"] = rec
            logger.info("Reconstruction vs the preprocessed data of %s: Pearson r %.3f on %s values of %s cells.",
                        args.transform_dir, rec["pearson_r"], f"{rec['n_points']:,}", f"{rec['n_cells']:,}")
        for key, knn in real_knn_metrics(adata, packed, args, fit=fit, vocab_index=index).items():
            metrics[f"knn_{key}"] = knn
            logger.info("k-NN accuracy against %s: %.3f (real vs real: %.3f).", key, knn["knn_accuracy"],
                        knn["knn_ceiling"])
    with publish.staged_outputs(out_dir, names, overwrite=args.overwrite) as tmp:
        adata.write_h5ad(tmp / h5ad)
        cli.save_args(args, tmp / record)
        if args.evaluate:
            (tmp / metrics_file[0]).write_text(cli.strict_json(metrics, indent=2) + "\n")
    logger.info("Wrote %s%s.", args.output, f" and {out_dir / metrics_file[0]}" if args.evaluate else "")
    return adata


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
