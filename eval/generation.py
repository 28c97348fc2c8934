"""Score generated cells against real ones, each score next to what real cells reach.

<generated_dir> + <data_dir> + <transform_dir>/cell_sentences/vocab.txt -> metrics.json, per_type.csv,
real_vs_generated_pca.png, eval_args.json. Example:
    python eval/generation.py --generated_dir data/generated/<run> \\
        --data_dir data/cell_sentences_hf --output_dir data/eval/generation
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python eval/generation.py`: the repository's utils
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from eval import finish, logger, parse, start  # noqa: E402
from utils import cli, contract  # noqa: E402
from utils.contract import EVAL_GENERATION, GENERATE, GENERATE_GROUPS  # noqa: E402
from utils.evaluation.figures import plot_generation  # noqa: E402
from utils.evaluation.generation_metrics import score_generated  # noqa: E402
from utils.inverse import SentenceBytes, read_sentence_file, sentence_bytes  # noqa: E402

# The headline scores, first in metrics.json and in the model card.
CARD_SCORES = ("knn_accuracy", "knn_ceiling", "mmd", "mmd_floor", "energy_distance", "energy_distance_floor",
               "valid_gene_rate", "duplicate_rate")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.script_parser(__doc__)
    p.add_argument("--generated_dir", type=Path, default=None,
                   help="folder with generated_cells.txt and generated_labels.txt (generate.py's output; required)")
    p.add_argument("--data_dir", type=Path, default=Path("data/cell_sentences_hf"),
                   help="transform.py's DatasetDict of the real cells")
    p.add_argument("--transform_dir", type=Path, default=None,
                   help="transform.py's output folder with cell_sentences/vocab.txt and "
                        "eval/transformation_metrics.csv (default: the parent of --data_dir)")
    p.add_argument("--split", type=str, default="test", help="the held-out real cells to compare with")
    p.add_argument("--label_column", type=str, default="cell_type", help="column of the real cells' types")
    p.add_argument("--top_k_genes", type=int, default=None,
                   help="genes per cell in the comparison (default: generate.py's top_k_genes from "
                        "<generated_dir>/metrics.json, else the median generated length)")
    p.add_argument("--k_neighbors", type=int, default=5, help="k of the k-NN metric")
    args = parse(p, argv, name="generation", seed_help="seed of the PCA and of the floors' samples",
                 required=("generated_dir", "Pass --generated_dir, a folder written by generate.py "
                                            "(e.g. data/generated/<run>)."),
                 positive=("k_neighbors", "top_k_genes"))
    if args.transform_dir is None:
        args.transform_dir = args.data_dir.parent
    return args


def read_generated_groups(path: Path) -> tuple[SentenceBytes, list[str], list[str], str]:
    """The sentences (one byte buffer), groups and requested labels of generate.py --multi_cell_column's
    generated_groups.csv, and the label column (of its ``requested_<column>``)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    requested = [c for c in table.columns if c.startswith("requested_")]
    if not {"cell_sentence", "group"} <= set(table.columns) or len(requested) != 1 or table.empty:
        raise cli.InputError(f"{path} is not a generated_groups.csv of generate.py --multi_cell_column with cells "
                             f"(columns cell_sentence, group, requested_<column>; it has {list(table.columns)}).")
    return (sentence_bytes(table["cell_sentence"].tolist()), table["group"].tolist(), table[requested[0]].tolist(),
            requested[0].removeprefix("requested_"))


def read_generated(generated_dir: Path) -> tuple[Any, list[str]]:
    """The generated sentences (one byte buffer) and their requested types."""
    cells, labels = generated_dir / GENERATE.cells, generated_dir / GENERATE.labels
    for path in (cells, labels):
        if not path.is_file():
            raise cli.InputError(f"{path} does not exist; pass as --generated_dir a folder where generate.py generated "
                                 "cells of chosen types (without --unconditional: those have no types to compare).")
    packed = read_sentence_file(cells)
    requested = contract.read_lines(labels)
    if len(requested) != packed.n:
        raise cli.InputError(f"{labels} has {len(requested):,} labels for {packed.n:,} sentences in {cells}; "
                             "both must come from one generate.py run.")
    if packed.n == 0:
        raise cli.InputError(f"{cells} holds no generated cells.")
    return packed, requested


def real_cells(args: argparse.Namespace, label_column: str, conditions: list | None = None) -> dict[str, Any]:
    """The real train and --split cells labelled in ``label_column`` (``conditions``: in each set's joint label)."""
    tables = contract.load_splits(args.data_dir, args.split, label_column, need_labels=not conditions)
    if "train" not in tables:
        raise cli.InputError(f"{args.data_dir} has no train split, needed for the k-NN classifier and the PCA.")
    if conditions:  # the real cells matching all the conditions of a set carry its label
        tables = contract.tables_with_conditions(tables, [c for c, _ in conditions[0]])
    return contract.labelled_rows(tables, contract.CONDITIONS if conditions else label_column)


def genes_per_cell(args: argparse.Namespace, record: Path, packed: SentenceBytes) -> int:
    """--top_k_genes, else the generating run's (in ``record``), else the median length of the sentences."""
    if args.top_k_genes is not None:
        return args.top_k_genes
    top_k = contract.read_record(record).get("top_k_genes")
    if top_k:
        return int(top_k)
    median = int(np.median([len(packed.data[a:b].tobytes().split())
                            for a, b in zip(packed.offsets[:-1], packed.offsets[1:], strict=True)]))
    logger.warning("No top_k_genes recorded in %s: comparing the first %d genes (the median length).", record, median)
    return max(1, median)


def main(args: argparse.Namespace) -> dict[str, Any]:
    start(args, [args.generated_dir, args.data_dir, args.transform_dir], EVAL_GENERATION)
    grouped = args.generated_dir / GENERATE_GROUPS.cells
    if grouped.is_file() and not (args.generated_dir / GENERATE.cells).is_file():
        # generate.py --multi_cell_column: its cells as single cells, and each group's profile against real groups
        packed, groups, requested, column = read_generated_groups(grouped)
        tables, record, label_column, cell_types = real_cells(args, column), GENERATE_GROUPS.metrics, column, None
    else:
        packed, requested = read_generated(args.generated_dir)
        groups, column, record = None, None, GENERATE.metrics
        run = contract.read_record(args.generated_dir / GENERATE.args)  # its --conditions, else its --cell_types
        sets = contract.parse_conditions(run["conditions"]) if run.get("conditions") else None
        label_column = contract.CONDITIONS if sets else args.label_column
        tables = real_cells(args, args.label_column, sets)
        asked = list(dict.fromkeys(t.strip() for t in (run.get("cell_types") or "").split(",") if t.strip()))
        cell_types = [contract.condition_label(c) for c in sets] if sets else asked or None  # None: all types
    top_k = genes_per_cell(args, args.generated_dir / record, packed)
    index, fit, from_transform = contract.transform_reference(args.transform_dir, tables, top_k)
    if cell_types is not None:
        logger.info("Comparing with the real cells of the %d types generate.py was asked for (%s).",
                    len(cell_types), ", ".join(cell_types))
    scored, result = score_generated(packed, requested, tables, split=args.split, label_column=label_column,
                                     index=index, fit=fit, top_k=top_k, k=args.k_neighbors, seed=args.seed,
                                     cell_types=cell_types, groups=groups, cells_per_group=contract.read_record(
                                         args.generated_dir / record).get("cells_per_example"))
    return write_scores(args, scored, result, top_k=top_k, from_transform=from_transform, column=column)


def write_scores(args: argparse.Namespace, scored: dict[str, Any], result: Any, *, top_k: int,
                 from_transform: bool, column: str | None) -> dict[str, Any]:
    """Log and publish ``scored`` (``column``: generated groups' label column) and add it to the model's card."""
    rates = scored["sentences"]
    metrics = {**{key: scored[key] if key in scored else rates[key] for key in CARD_SCORES},
               **{key: value for key, value in scored.items() if column or key != "per_type"},
               **({"label_column": column} if column else {}), "split": args.split,
               "generated_dir": str(args.generated_dir),
               "vocabulary": "transform" if from_transform else "train sentences"}
    if column is None:
        logger.info("%s generated cells vs %s real %s cells (top %d genes): k-NN accuracy %.3f (ceiling %.3f, "
                    "majority %.3f); MMD %.4f (floor %.4f); energy distance %.3f (floor %.3f); valid-gene rate "
                    "%.4f, duplicate rate %.3f.", f"{scored['n_generated']:,}", f"{scored['n_real_eval']:,}",
                    args.split, top_k, scored["knn_accuracy"], scored["knn_ceiling"], scored["majority_baseline"],
                    scored["mmd"], scored["mmd_floor"], scored["energy_distance"],
                    scored["energy_distance_floor"], rates["valid_gene_rate"], rates["duplicate_rate"])
        metrics["per_type"] = scored["per_type"]
        card = ("generation", {key: metrics[key] for key in CARD_SCORES})
        caption = "Real and generated cells (PCA)"
    else:
        g = scored["groups"]
        logger.info("%s generated groups of %s (%d cells each) vs %s real %s groups: group k-NN accuracy %.3f (real "
                    "groups %.3f, majority %.3f); as single cells k-NN accuracy %.3f (ceiling %.3f).",
                    f"{g['n_generated_groups']:,}", column, g["cells_per_group"], f"{g['n_real_eval_groups']:,}",
                    args.split, g["group_knn_accuracy"], g["group_knn_ceiling"], g["group_majority_baseline"],
                    scored["knn_accuracy"], scored["knn_ceiling"])
        card = ("group_generation", {key: g[key] for key in (
            "group_knn_accuracy", "group_knn_ceiling", "group_majority_baseline", "n_generated_groups")})
        caption = "Real and generated cells of the groups (PCA)"
    per_type = pd.DataFrame([{column or "cell_type": t, **v} for t, v in scored["per_type"].items()])
    finish(args, EVAL_GENERATION, metrics=metrics, figures={EVAL_GENERATION.pca: plot_generation(
               result, split=args.split, top_k=top_k)}, frames={EVAL_GENERATION.per_type: per_type},
           card=(args.generated_dir, *card), captions={caption: EVAL_GENERATION.pca})
    return metrics


if __name__ == "__main__":
    cli.run_cli(main, parse_args)
