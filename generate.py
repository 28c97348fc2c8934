"""Use a trained cell-sentence model: predict cell types and generate cells, then evaluate.

Two tasks (``--tasks predict,generate``), with the prompt templates of training
(``utils/prompts.py``) and the token ids the model saw (``utils/training.py``), through
``utils.CellSentenceModel``. The model is a train.py run (full or LoRA), or a published C2S
model (hub name or folder; no train_args.json: the C2S-Scale prompt format):

- predict: for each cell of ``--split``, the first K genes (K = the run's ``top_k_genes``) ->
  the cell type, by batched greedy decoding with left padding. Accuracy is exact match after
  trimming and case-folding, next to the majority-class baseline; a confusion-matrix figure.
- generate: ``--n_per_type`` cells per cell type (default: as many as the split has), sampled
  with ``--temperature``/``--top_k``/``--top_p``, every word a vocabulary gene named once
  (``--no_constrain_genes``: free). Evaluated as eval/generation.py does (the same
  code, ``utils.metrics.score_generated``): valid-gene and duplicate rates, the paper's k-NN
  metric with the real -> real ceiling, MMD and energy distance with their real-vs-real floors.
  A PCA figure shows real and generated cells together.

    data/model/<run>/ + data/cell_sentences_hf/ (+ data/cell_sentences/vocab.txt,
    data/eval/transformation_metrics.csv)
        -> data/generated/<run>/: predictions.csv, confusion_matrix.png, generated_cells.txt,
           generated_labels.txt, generated_cells_hf/, real_vs_generated_pca.png, metrics.json,
           generate_args.json

Example:
    python generate.py --model_dir data/model/scratch-small --data_dir data/cell_sentences_hf/
    python generate.py --model_dir vandijklab/C2S-Pythia-410m-cell-type-prediction --tasks predict
"""

from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the libraries below load: a line, no traceback
    import startup_guard

    startup_guard.install()

import argparse
import logging
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from utils.cell_model import add_model_arguments, read_train_record
from utils.common import (
    InputError,
    claim_output_dir,
    releasing_outputs,
    run_cli,
    save_args,
    seed_everything,
    settle_inputs,
    staged_outputs,
    strict_json,
)
from utils.eval_io import labelled_rows, load_splits, transform_reference
from utils.evaluation import classification_summary, plot_confusion_matrix
from utils.fit import RankExpressionFit
from utils.generation import (
    allocate_counts,
    answer_token_budget,
)
from utils.inverse import VocabIndex
from utils.metrics import plot_generation, score_generated

logger = logging.getLogger("cell2sentence")

TASKS = ("predict", "generate")
OUTPUTS = [
    "predictions.csv", "confusion_matrix.png", "generated_cells.txt", "generated_labels.txt",
    "generated_cells_hf", "real_vs_generated_pca.png", "metrics.json", "generate_args.json",
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Help with the defaults shown."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    add_model_arguments(p)
    p.add_argument("--data_dir", type=Path, default=Path("data/cell_sentences_hf"),
                   help="the DatasetDict written by transform.py")
    p.add_argument("--transform_dir", type=Path, default=None,
                   help="transform.py's output folder with cell_sentences/vocab.txt and "
                        "eval/transformation_metrics.csv (default: the parent of --data_dir)")
    p.add_argument("--output_dir", type=Path, default=None,
                   help="where outputs go (default: data/generated/<model_dir name>)")
    p.add_argument("--split", type=str, default="test", help="split to predict and to compare with")
    p.add_argument("--tasks", type=str, default=None,
                   help="comma-separated: predict, generate (default: what the model was trained for; "
                        "generate only for a model trained without cell types)")
    p.add_argument("--cell_types", type=str, default=None,
                   help="comma-separated cell types to generate (default: those of --split); each must be "
                        "one the model was trained on")
    p.add_argument("--top_k_genes", type=int, default=None,
                   help="genes per prompt/answer (default: the run's top_k_genes from train_args.json)")
    p.add_argument("--cell_type_column", type=str, default=None,
                   help="column of the labels (default: the run's, else cell_type)")
    p.add_argument("--n_per_type", type=int, default=None,
                   help="cells to generate per cell type (default: as many as the split has); for a "
                        "model trained without cell types, cells in total")
    p.add_argument("--max_cells", type=int, default=None,
                   help="cap on the cells predicted and on the cells generated (default: no cap)")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per generate() call")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="new tokens per generated cell (default: from the length of real answers)")
    p.add_argument("--predict_max_new_tokens", type=int, default=None,
                   help="new tokens per predicted label (default: the longest label's tokens + 2)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (generate)")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens; 0: all")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--no_constrain_genes", action="store_true",
                   help="generate freely (default: every generated word is a vocabulary gene, each once)")
    p.add_argument("--k_neighbors", type=int, default=5, help="k of the k-NN metric")
    p.add_argument("--seed", type=int, default=1234, help="seed of sampling and of the --max_cells subset")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = p.parse_args(argv)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    if args.model_dir is None:
        raise InputError("Pass --model_dir: a train.py run folder (e.g. data/model/<run>), a published C2S "
                         "model's folder, or its hub name.")
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown or not tasks:
            raise InputError(f"--tasks {args.tasks!r}: choose among {', '.join(TASKS)} (comma-separated).")
        args.tasks = ",".join(t for t in TASKS if t in tasks)
    if args.cell_types is not None and not [t for t in args.cell_types.split(",") if t.strip()]:
        raise InputError("--cell_types is empty; list cell types separated by commas, e.g. --cell_types \"B cell,NK cell\".")
    for flag in ("batch_size", "k_neighbors"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be at least 1.")
    for flag in ("top_k_genes", "n_per_type", "max_cells", "max_new_tokens", "predict_max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag} must be at least 1 (or left out for the default).")
    if args.temperature <= 0:
        raise InputError("--temperature must be positive.")
    if not 0 < args.top_p <= 1:
        raise InputError("--top_p must be in (0, 1].")
    if args.top_k < 0:
        raise InputError("--top_k must be 0 (off) or positive.")
    if args.transform_dir is None:
        args.transform_dir = args.data_dir.parent
    if args.output_dir is None:
        args.output_dir = Path("data/generated") / args.model_dir.name


# ---------------------------------------------------------------------------------- inputs


def read_train_args(model_dir: Path) -> dict[str, Any]:
    record = read_train_record(model_dir)
    if not record:
        logger.warning("%s has no train_args.json; using the defaults (top_k_genes 100).", model_dir)
    return record


class ModelScope(NamedTuple):
    """What a model was trained for, from its train_args.json (None: not recorded)."""

    tasks: list[str] | None
    cell_types: list[str] | None

    @property
    def unconditional(self) -> bool:
        """Trained without cell types: it generates cells of any type only."""
        return self.cell_types == [] or (self.tasks is not None and "conditional_generation" not in self.tasks)


def resolve_tasks(args: argparse.Namespace, scope: ModelScope) -> list[str]:
    """The tasks to run (--tasks, or what the model can do), checked against the model."""
    can_predict = scope.tasks is None or "cell_type_prediction" in scope.tasks
    if args.tasks is None:
        tasks = ["predict", "generate"] if can_predict and not scope.unconditional else ["generate"]
    else:
        tasks = args.tasks.split(",")
    if "predict" in tasks and not can_predict:
        raise InputError(f"{args.model_dir} was trained without cell-type prediction (tasks: "
                         f"{', '.join(scope.tasks or [])}); drop predict from --tasks.")
    return tasks


def requested_types(args: argparse.Namespace, scope: ModelScope) -> list[str] | None:
    """The cell types of --cell_types, each checked against those the model was trained on."""
    if args.cell_types is None:
        return None
    wanted = list(dict.fromkeys(t.strip() for t in args.cell_types.split(",") if t.strip()))
    if scope.unconditional:
        raise InputError(f"{args.model_dir} was trained without cell types, so it generates cells of any "
                         "type; drop --cell_types.")
    if scope.cell_types is not None:
        unknown = [t for t in wanted if t not in scope.cell_types]
        if unknown:
            raise InputError(f"--cell_types: the model never saw {', '.join(map(repr, unknown))}; it was "
                             f"trained on {', '.join(map(repr, scope.cell_types))}.")
    return wanted


def generation_counts(args: argparse.Namespace, scope: ModelScope, wanted: list[str] | None,
                      split_labels: list[Any] | None, n_split: int) -> dict[str | None, int]:
    """Cells to generate per cell type (None: the one unconditional "type")."""
    if scope.unconditional:
        n = args.n_per_type or n_split
        return {None: min(n, args.max_cells) if args.max_cells else n}
    available = Counter(str(x) for x in split_labels or [])
    if wanted is not None:
        missing = [t for t in wanted if not available[t]]
        if missing and args.n_per_type is None:
            raise InputError(f"The {args.split} split has no cells of {', '.join(map(repr, missing))}; pass "
                             "--n_per_type to say how many to generate.")
        available = Counter({t: available[t] for t in wanted})
    return allocate_counts(dict(sorted(available.items())), n_per_type=args.n_per_type, max_cells=args.max_cells)


def subsample(n: int, cap: int | None, seed: int) -> np.ndarray:
    """Row indices: all, or a seeded random subset of ``cap`` in their original order."""
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


# ---------------------------------------------------------------------------------- tasks


def progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="cell")


def predict_types(model: Any, table: Any, rows: np.ndarray, *, label_column: str, args: argparse.Namespace,
                  labels: list[str]) -> pd.DataFrame:
    with progress_bar(len(rows), "Predicting cell types") as bar:
        predicted = model.predict_cell_types(table.column("cell_sentence").take(rows).to_pylist(),
                                             batch_size=args.batch_size, labels=labels,
                                             max_new_tokens=args.predict_max_new_tokens, progress=bar.update)
    return pd.DataFrame({
        "cell_name": table.column("cell_name").take(rows).to_pylist() if "cell_name" in table.column_names
        else [f"cell_{i}" for i in rows],
        "true": table.column(label_column).take(rows).to_pylist(),
        "predicted": predicted,
    })


def generate_cells(model: Any, counts: dict[str, int], *, budget: int, genes: Sequence[str],
                   args: argparse.Namespace) -> pd.DataFrame:
    with progress_bar(sum(counts.values()), "Generating cells") as bar:
        return model.generate_cells(counts, batch_size=args.batch_size, max_new_tokens=budget,
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    constrain_genes=not args.no_constrain_genes, genes=genes,
                                    progress=bar.update)


def evaluate_generated(generated: pd.DataFrame, tables: dict[str, Any], *, split: str, label_column: str,
                       index: VocabIndex, fit: RankExpressionFit, top_k: int, k: int, seed: int
                       ) -> tuple[dict[str, Any], Any]:
    """The metrics of eval/generation.py (utils.metrics.score_generated) and its PCA figure;
    cells generated without a cell type get the word statistics only (the rest compares types)."""
    # pandas may hold "no cell type" as None or NaN; a dataset without labels has no types to compare
    if generated["requested_cell_type"].isna().any() or label_column not in tables["train"].column_names:
        from utils.evaluation import sentence_stats
        from utils.inverse import sentences_to_expression

        return {"sentences": sentence_stats(sentences_to_expression(generated["cell_sentence"].tolist(),
                                                                    index, fit))}, None
    metrics, result = score_generated(generated["cell_sentence"].tolist(), generated["requested_cell_type"].tolist(),
                                      tables, split=split, label_column=label_column, index=index, fit=fit,
                                      top_k=top_k, k=k, seed=seed)
    return metrics, plot_generation(result, split=split, top_k=top_k)


# ---------------------------------------------------------------------------------- main


def produced(tasks: Sequence[str], with_pca: bool, *, labels: bool = True) -> set[str]:
    """The outputs a run of ``tasks`` writes (``labels``: generated for cell types)."""
    names = {"metrics.json", "generate_args.json"}
    if "predict" in tasks:
        names |= {"predictions.csv", "confusion_matrix.png"}
    if "generate" in tasks:
        names |= {"generated_cells.txt", "generated_cells_hf"} | ({"generated_labels.txt"} if labels else set())
        names |= {"real_vs_generated_pca.png"} if with_pca else set()
    return names


@releasing_outputs
def main(args: argparse.Namespace) -> dict[str, Any]:
    seed_everything(args.seed)
    settle_inputs(args.model_dir, args.data_dir.parent, args.transform_dir)
    claim_output_dir(args.output_dir, OUTPUTS, overwrite=args.overwrite)
    from utils.cell_model import load_from_args

    record = read_train_args(args.model_dir)
    scope = ModelScope(record.get("tasks"), record.get("cell_types"))
    tasks = resolve_tasks(args, scope)
    args.tasks = ",".join(tasks)
    wanted = requested_types(args, scope)
    label_column = args.cell_type_column or record.get("cell_type_column") or "cell_type"
    tables = load_splits(args.data_dir, args.split, label_column,
                         need_labels="predict" in tasks or not scope.unconditional)
    if "train" not in tables:
        raise InputError(f"{args.data_dir} has no train split, needed for the baseline and the k-NN metric.")
    has_labels = all(label_column in t.column_names for t in tables.values())
    if has_labels:
        tables = labelled_rows(tables, label_column)
    eval_table = tables[args.split]
    labels = sorted({str(x) for x in tables["train"].column(label_column).to_pylist()}
                    | {str(x) for x in eval_table.column(label_column).to_pylist()}) if has_labels else []

    from utils.training import encode_answer

    model = load_from_args(args)
    top_k, tokenizer, fmt = model.top_k_genes, model.tokenizer, model.prompt_format
    device = str(model.device)
    logger.info("Model %s on %s (%s), context %d tokens, %s prompt format, top %d genes, split %s (%s cells).",
                args.model_dir, device, str(model.model.dtype).replace("torch.", ""), model.context, fmt.name,
                top_k, args.split, f"{eval_table.num_rows:,}")
    metrics: dict[str, Any] = {"model_dir": str(args.model_dir), "split": args.split, "top_k_genes": top_k,
                               "device": device, "prompt_format": fmt.name}
    predictions = generated = None
    confusion = pca = None
    if "predict" in tasks:
        rows = subsample(eval_table.num_rows, args.max_cells, args.seed)
        start = time.perf_counter()
        predictions = predict_types(model, eval_table, rows, label_column=label_column, args=args,
                                    labels=labels)
        summary = classification_summary(predictions["true"], predictions["predicted"],
                                         train_labels=tables["train"].column(label_column).to_pylist())
        summary["seconds"] = time.perf_counter() - start
        metrics["prediction"] = summary
        logger.info("Cell-type accuracy %.3f on %s cells (majority-class baseline %.3f, %s).",
                    summary["accuracy"], f"{summary['n_cells']:,}", summary["majority_baseline"],
                    summary["majority_label"])
        confusion = plot_confusion_matrix(predictions["true"], predictions["predicted"],
                                          title=f"Cell-type prediction on {args.split} "
                                                f"(accuracy {summary['accuracy']:.3f})")
    if "generate" in tasks:
        counts = generation_counts(args, scope, wanted, eval_table.column(label_column).to_pylist()
                                   if has_labels else None, eval_table.num_rows)
        # The answer budget from a sample of real answers (top K genes of training cells).
        n_train = tables["train"].num_rows
        picked = sorted(random.Random(args.seed).sample(range(n_train), min(n_train, 200)))
        sample = [s for s in tables["train"].column("cell_sentence").take(picked).to_pylist() if s]
        budget = args.max_new_tokens or answer_token_budget(
            [len(encode_answer(tokenizer, fmt.generation_answer(s.split()[:top_k]), fmt)) for s in sample]
            or [top_k])
        index, fit, from_transform = transform_reference(args.transform_dir, tables, top_k)
        start = time.perf_counter()
        seed_everything(args.seed)
        generated = generate_cells(model, counts, budget=budget, genes=index.genes, args=args)
        elapsed = time.perf_counter() - start
        gen_metrics, pca = evaluate_generated(generated, tables, split=args.split, label_column=label_column,
                                              index=index, fit=fit, top_k=top_k, k=args.k_neighbors,
                                              seed=args.seed)
        gen_metrics.update(requested_counts={"any" if t is None else t: n for t, n in counts.items()},
                           max_new_tokens=budget, seconds=elapsed,
                           vocabulary="transform" if from_transform else "train sentences",
                           constrained=not args.no_constrain_genes,
                           sampling={"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p})
        metrics["generation"] = gen_metrics
        s = gen_metrics["sentences"]
        logger.info("Generated %s %scells: valid-gene rate %.3f, duplicate rate %.3f, mean length %.1f%s.",
                    f"{len(generated):,}", "unconditional " if scope.unconditional else "", s["valid_gene_rate"],
                    s["duplicate_rate"], s["mean_sentence_length"],
                    "" if scope.unconditional else
                    f"; k-NN accuracy {gen_metrics['knn_accuracy']:.3f} (real vs real {gen_metrics['knn_ceiling']:.3f}),"
                    f" MMD {gen_metrics['mmd']:.4f} (real vs real {gen_metrics['mmd_floor']:.4f})")
    with staged_outputs(args.output_dir, OUTPUTS, overwrite=args.overwrite) as tmp:
        if predictions is not None:
            predictions.to_csv(tmp / "predictions.csv", index=False)
            confusion.savefig(tmp / "confusion_matrix.png", dpi=150, bbox_inches="tight")
        if generated is not None:
            from datasets import Dataset

            (tmp / "generated_cells.txt").write_text("".join(s + "\n" for s in generated["cell_sentence"]))
            if scope.unconditional:  # no cell types asked for: no labels to write
                generated = generated.drop(columns="requested_cell_type")
            else:
                (tmp / "generated_labels.txt").write_text(
                    "".join(t + "\n" for t in generated["requested_cell_type"]))
            Dataset.from_pandas(generated, preserve_index=False).save_to_disk(str(tmp / "generated_cells_hf"))
            if pca is not None:
                pca.savefig(tmp / "real_vs_generated_pca.png", dpi=150, bbox_inches="tight")
        (tmp / "metrics.json").write_text(strict_json(metrics, indent=2, default=str) + "\n")
        save_args(args, tmp / "generate_args.json")
    written = {p.name for p in args.output_dir.iterdir()}
    for name in OUTPUTS:
        # An output of an earlier run whose task was not run now would no longer match.
        stale = args.output_dir / name
        if name in written and name not in produced(tasks, pca is not None, labels=not scope.unconditional):
            logger.warning("Removed %s, an output of an earlier run (not written by this one).", stale)
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    logger.info("Wrote %s.", args.output_dir)
    return metrics


if __name__ == "__main__":
    run_cli(main, parse_args)
