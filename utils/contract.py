"""The data contract between the steps: the names of the files each step writes (named here only),
their readers (each settles its folder first and fails with one ``InputError``)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.cli import InputError
from utils.inverse import VocabIndex, build_vocab_index, load_transform_fit, load_vocab
from utils.publish import settle_inputs
from utils.transform.fit import RankExpressionFit
from utils.transform.readers import input_stem

logger = logging.getLogger("cell2sentence")


class Outputs(tuple):
    """A step's output names in publish order, each also an attribute.

    >>> names = Outputs(table="t.csv", args="a.json")
    >>> names.table, list(names)
    ('t.csv', ['t.csv', 'a.json'])
    """

    def __new__(cls, **names: str) -> Outputs:
        self = super().__new__(cls, names.values())
        self.__dict__.update(names)
        return self


EVAL_ARGS, EVAL_METRICS = "eval_args.json", "metrics.json"  # every evaluation's
# The transform's eval/ files one by one: its --overwrite leaves the eval scripts' eval/<name>/ alone.
TRANSFORM = Outputs(sentences="cell_sentences", dataset="cell_sentences_hf", args="transform_args.json")
TRANSFORM_EVAL = Outputs(metrics="eval/transformation_metrics.csv", fit="eval/log_rank_vs_log_expression.png",
                         reconstruction="eval/expression_vs_reconstruction.png", qc_by_label="eval/qc_by_label.csv")
VOCAB = f"{TRANSFORM.sentences}/vocab.txt"
PREDICT = Outputs(predictions="predictions.csv", annotated="annotated.h5ad", metrics="metrics.json",
                  confusion="confusion_matrix.png", args="predict_args.json")
# predict.py --multi_cell_column: one label per group of cells (its members in group_members.csv).
PREDICT_GROUPS = Outputs(groups="group_predictions.csv", members="group_members.csv", metrics="metrics.json",
                         args="predict_args.json")
# generate.py --multi_cell_column: the generated groups, a row per cell.
GENERATE_GROUPS = Outputs(cells="generated_groups.csv", metrics="metrics.json", args="generate_args.json")
# old_predictions and old_confusion: outputs of earlier versions, listed so that a rerun removes them.
GENERATE = Outputs(old_predictions="predictions.csv", old_confusion="confusion_matrix.png",
                   cells="generated_cells.txt", labels="generated_labels.txt", dataset="generated_cells_hf",
                   pca="real_vs_generated_pca.png", metrics="metrics.json", args="generate_args.json")
EMBED = Outputs(embeddings="embeddings.h5ad", umap="umap.png", metrics="metrics.json", args="embed_args.json")
EVAL_PREDICTION = Outputs(metrics=EVAL_METRICS, per_class="per_class.csv", confusion="confusion_matrix.png",
                          args=EVAL_ARGS)
EVAL_GENERATION = Outputs(metrics=EVAL_METRICS, per_type="per_type.csv", pca="real_vs_generated_pca.png",
                          args=EVAL_ARGS)
EVAL_EMBEDDING = Outputs(metrics=EVAL_METRICS, panels="embedding_vs_pca.png", args=EVAL_ARGS)
EVAL_RECONSTRUCTION = Outputs(metrics=EVAL_METRICS, per_cell="per_cell.csv", fit="log_rank_vs_log_expression.png",
                              reconstruction="expression_vs_reconstruction.png",
                              per_cell_figure="per_cell_r_squared.png", args=EVAL_ARGS)
# train.py's files beside the model (user_card: when README.md is the user's; run_args: in checkpoints/).
# retrieve_example_data.py: the example file and, in ``path``, the path of the one it wrote.
EXAMPLE = Outputs(dominguez="dominguez_sample.h5ad", pbmc68k="pbmc68k_reduced.h5ad", path=".example_path")

TRAIN = Outputs(args="train_args.json", results="train_results.json", log="train_log.json", merged="merged",
                card="README.md", user_card="MODEL_CARD.md", evaluations="model_card_evaluations.json",
                figures="model_card_figures", run_args="run_args.json", recipe="recipe.json")


def split_files(split: str) -> Outputs:
    """The text files of one split inside ``cell_sentences/``."""
    return Outputs(text=f"{split}.txt", barcodes=f"{split}_barcodes.txt", indices=f"{split}_indices.npy")


def preprocessed_name(stem: str) -> str:
    """The file name of the preprocessed AnnData made from an input named ``stem``."""
    return f"{stem}_preprocessed.h5ad"


def transform_names(stem: str) -> list[str]:
    """What the transform writes for an input named ``stem``, in publish order."""
    return [*TRANSFORM, preprocessed_name(stem), *TRANSFORM_EVAL]


def per_column(name: str, column: str) -> str:
    """The name of output ``name`` for one of several predicted label columns (unsafe characters: ``_``).

    >>> per_column(PREDICT.confusion, "tissue"), per_column(EVAL_PREDICTION.per_class, "disease/state")
    ('confusion_matrix_tissue.png', 'per_class_disease_state.csv')
    """
    stem, _, suffix = name.rpartition(".")
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", str(column))
    return f"{stem}_{safe}.{suffix}"


def read_lines(path: Path) -> list[str]:
    """The lines of a small text file, without line ends."""
    if not path.is_file():
        raise InputError(f"{path} does not exist.")
    lines = path.read_text().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def open_dataset_dict(data_dir: Path, *, single_ok: bool = False) -> Any:
    """transform.py's DatasetDict (``single_ok``: a single saved Dataset becomes split "all")."""
    import datasets

    settle_inputs(data_dir)  # a transform killed while publishing: its new dataset first
    if not data_dir.is_dir():
        raise InputError(f"{data_dir} does not exist; pass transform.py's cell_sentences_hf folder as --data_dir.")
    try:
        dd = datasets.load_from_disk(str(data_dir))
    except (OSError, ValueError) as err:  # missing, unreadable or not save_to_disk
        raise InputError(f"{data_dir} is no datasets folder written by save_to_disk ({err}).") from None
    if not isinstance(dd, datasets.DatasetDict):
        if not single_ok:
            raise InputError(f"{data_dir} holds one dataset, not transform.py's DatasetDict with train/valid/test.")
        dd = datasets.DatasetDict({"all": dd})
    return dd


def split_table(data_dir: Path, split: str) -> Any:
    """One split (or ``"all"``) of transform.py's DatasetDict as a DataFrame with a ``split`` column."""
    import pandas as pd

    dd = open_dataset_dict(data_dir, single_ok=True)
    if split != "all" and split not in dd:
        raise InputError(f"{data_dir} has no split {split!r} (it has {list(dd)}); fix --split.")
    frames = []
    for name in (list(dd) if split == "all" else [split]):
        if "cell_sentence" not in dd[name].column_names:
            raise InputError(f"{data_dir}/{name} has no cell_sentence column (it has {dd[name].column_names}).")
        frame = dd[name].to_pandas()
        frame["split"] = name
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    if "cell_name" not in table:
        table["cell_name"] = [f"cell_{i}" for i in range(len(table))]
    return table


def sample_rows(n: int, cap: int | None, seed: int | np.random.Generator) -> np.ndarray:
    """Row indices: all ``n``, or a random subset of ``cap`` (``seed``: an integer or a Generator) in order."""
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


def load_splits(data_dir: Path, split: str, label_column: str, *, need_labels: bool) -> dict[str, Any]:
    """The train split and ``split`` of transform.py's DatasetDict as Arrow tables."""
    dd = open_dataset_dict(data_dir)
    if split not in dd:
        raise InputError(f"{data_dir} has no split {split!r} (it has {list(dd)}); fix --split.")
    out = {}
    for name in dict.fromkeys(["train", split]):
        if name not in dd:
            continue
        columns = dd[name].column_names
        if "cell_sentence" not in columns:
            raise InputError(f"{data_dir}/{name} has no cell_sentence column (it has {columns}).")
        if need_labels and label_column not in columns:
            raise InputError(f"{data_dir}/{name} has no {label_column!r} column (it has {columns}); "
                             "pass --label_column, or generate cells of no chosen type (generate.py --unconditional).")
        if dd[name].num_rows == 0:
            raise InputError(f"The {name} split of {data_dir} is empty; choose another --split or re-run "
                             "transform.py with other --split_fractions.")
        out[name] = dd[name].with_format("arrow")[:]
    return out


def labelled_rows(tables: dict[str, Any], label_column: str) -> dict[str, Any]:
    """The tables without the cells that have no label (null)."""
    import pyarrow as pa

    from utils.models.examples import has_label

    out = {}
    for name, table in tables.items():
        keep = [has_label(x) for x in table.column(label_column).to_pylist()]
        if not all(keep):
            logger.warning("%s of %s %s cells have no %r label: left out.", f"{len(keep) - sum(keep):,}",
                           f"{len(keep):,}", name, label_column)
        out[name] = table if all(keep) else table.filter(pa.array(keep))
    return out


def transform_reference(transform_dir: Path, tables: dict[str, Any], top_k: int
                        ) -> tuple[VocabIndex, RankExpressionFit, bool]:
    """The transform's vocabulary and fit and True; without them, the train genes, a nominal fit, False."""
    settle_inputs(transform_dir)
    vocab_path = transform_dir / VOCAB
    metrics_path = transform_dir / TRANSFORM_EVAL.metrics
    if vocab_path.is_file() and metrics_path.is_file():
        return build_vocab_index(load_vocab(vocab_path)), load_transform_fit(metrics_path), True
    logger.warning("No transform outputs in %s: the valid-gene rate uses the genes of the training "
                   "sentences and the k-NN metric a nominal fit (slope -1); pass --transform_dir.", transform_dir)
    genes: dict[str, None] = {}
    for sentence in tables["train"].column("cell_sentence").to_pylist():
        genes.update(dict.fromkeys(sentence.split()))
    return build_vocab_index(list(genes)), RankExpressionFit(slope=-1.0, intercept=float(np.log10(1 + top_k))), False


def read_record(path: Path) -> Any:
    """A step's JSON record (e.g. ``transform_args.json``): {} when there is none, one sentence when it is
    not valid JSON."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err}); restore it from the run that wrote it, or delete "
                         "it (a model folder without its records counts as a published model).") from None


def find_preprocessed(transform_dir: Path) -> Path | None:
    """transform.py's ``<input stem>_preprocessed.h5ad`` in ``transform_dir``, if any."""
    recorded = read_record(transform_dir / TRANSFORM.args)
    if recorded:
        given = recorded.get("data_filepath", "")
        stem = input_stem(Path(given) if isinstance(given, str) else [Path(p) for p in given])
        candidate = transform_dir / preprocessed_name(stem)
        if candidate.is_file():
            return candidate
    found = sorted(transform_dir.glob(preprocessed_name("*")))
    return found[0] if len(found) == 1 else None


def label_column_of(transform_dir: Path, default: str = "cell_type") -> str:
    """The obs column of the cell types in transform.py's preprocessed AnnData."""
    return read_record(transform_dir / TRANSFORM.args).get("label_column") or default


def read_preprocessed(source: Path, names: Any = None) -> Any:
    """transform.py's preprocessed AnnData (``source``: the file or the transform's folder; None when
    it has none), or only the cells among ``names``, in the file's order."""
    import anndata as ad

    settle_inputs(source)
    path = find_preprocessed(source) if source.is_dir() else source
    if path is None:
        return None
    if names is None:
        return ad.read_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        rows = np.sort(backed.obs_names.get_indexer(list(names)))
        rows = rows[rows >= 0]  # backed AnnData reads rows in increasing order
        return backed[rows].to_memory()
    finally:
        backed.file.close()


# --------------------------------------------------------------- generate.py --conditions

CONDITIONS = "c2s_conditions"  # the column of a set of conditions' joint label in the real cells


def parse_conditions(text: str) -> list[tuple[tuple[str, str], ...]]:
    """``"cell_type=B cell,tissue=blood;cell_type=NK cell,tissue=blood"`` -> one tuple of
    ``(column, value)`` pairs per set; every set names the same columns, each once."""
    sets = []
    for part in (p for p in text.split(";") if p.strip()):
        pairs = [tuple(x.strip() for x in item.split("=", 1)) for item in part.split(",") if item.strip()]
        if not pairs or any(len(pair) != 2 or not all(pair) for pair in pairs):
            raise InputError(f"--conditions {text!r}: write column=value pairs separated by commas, e.g. "
                                 "--conditions \"cell_type=B cell,tissue=blood\" (several sets separated by ';').")
        columns = [c for c, _ in pairs]
        if len(set(columns)) != len(columns):
            raise InputError(f"--conditions {part.strip()!r} names a column twice; name each column once.")
        if sets and columns != [c for c, _ in sets[0]]:
            raise InputError("Every set of --conditions must name the same columns in the same order "
                                 f"({', '.join(c for c, _ in sets[0])}).")
        sets.append(tuple(pairs))
    if not sets:
        raise InputError("--conditions is empty; e.g. --conditions \"cell_type=B cell,tissue=blood\".")
    return list(dict.fromkeys(sets))


def condition_label(conditions: Sequence[tuple[str, Any]]) -> str:
    """One set of conditions as text, the way --conditions writes it."""
    return ",".join(f"{c}={v}" for c, v in conditions)


def tables_with_conditions(tables: dict[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    """The cells labelled in every condition column, their ``condition_label`` in column ``CONDITIONS``."""
    import pyarrow as pa

    for name, table in tables.items():
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise InputError(f"The {name} split has no column {', '.join(missing)} named by --conditions; "
                                 "carry it into the data with transform.py --obs_columns.")
    for column in columns:
        tables = labelled_rows(tables, column)
    out = {}
    for name, table in tables.items():
        values = zip(*(table.column(c).to_pylist() for c in columns), strict=True)
        labels = [condition_label(zip(columns, row, strict=True)) for row in values]
        out[name] = table.append_column(CONDITIONS, pa.array(labels, type=pa.string()))
    return out
