"""A model's recipe: everything that turns new cells into the sentences and prompts it was trained
on. ``train.py`` writes ``recipe.json``; every use of a model reads it back with ``Recipe.read``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from utils.cli import InputError
from utils.contract import TRAIN, TRANSFORM, VOCAB, read_record
from utils.models.examples import CELL_TYPE_PREDICTION, PREDICTION_SUFFIX
from utils.models.loading import hub_file
from utils.models.prompts import DEFAULT_ORGANISM, attribute_name

RECIPE_FILE = TRAIN.recipe
RECIPE_VERSION = 1
DEFAULT_TOP_K_GENES = 100

# The transform options that shape a sentence of new cells (QC only flags cells: all are predicted).
SENTENCE_OPTIONS = ("layer", "input_kind", "gene_column", "bad_gene_names", "exclude_genes", "target_sum", "seed")
QC_OPTIONS = ("min_genes_per_cell", "max_genes_per_cell", "max_mt_percent")


def transform_of(transform_dir: Path) -> dict[str, Any]:
    """The recipe fields of the transform whose output is ``transform_dir``: its sentence options and
    QC thresholds (``transform_args.json``; empty when absent) and ``vocab.txt``'s genes (None when absent)."""
    path, vocab = Path(transform_dir) / TRANSFORM.args, Path(transform_dir) / VOCAB
    genes = [line.split()[0] for line in vocab.read_text().splitlines() if line.strip()] if vocab.is_file() else None
    if not path.is_file():
        return {"transform": {}, "qc": {}, "genes": genes}
    recorded = read_record(path)
    sentence = {k: recorded.get(k) for k in SENTENCE_OPTIONS if k in recorded}
    qc_source = recorded.get("qc") if isinstance(recorded.get("qc"), Mapping) else recorded  # API / script
    qc = {k: qc_source[k] for k in QC_OPTIONS if k in qc_source}
    qc["enabled"] = not recorded.get("no_qc", False) and bool(qc_source.get("enabled", True))
    return {"transform": sentence, "qc": qc, "genes": genes}


@dataclass
class Recipe:
    """How a model's training cells became sentences and prompts. ``tasks`` empty: not recorded;
    ``label_columns``: per column its sorted labels, the cell type's first; ``genes`` None: unknown;
    ``published``: nothing recorded (the c2s_scale defaults); ``multi_cell_column`` None: no multi-cell
    tasks; ``condition_columns``: those of conditional generation (``[]``: the cell type)."""

    prompt_format: str = "c2s_scale"
    organism: str = DEFAULT_ORGANISM
    top_k_genes: int = DEFAULT_TOP_K_GENES
    tasks: list[str] = field(default_factory=list)
    task_weights: list[float] = field(default_factory=list)
    label_columns: dict[str, list[str]] = field(default_factory=dict)
    transform: dict[str, Any] = field(default_factory=dict)
    qc: dict[str, Any] = field(default_factory=dict)
    genes: list[str] | None = None
    data_dir: str | None = None
    published: bool = False
    version: int = RECIPE_VERSION
    multi_cell_column: str | None = None
    cells_per_example: int | None = None
    group_labels: list[str] = field(default_factory=list)
    condition_columns: list[str] = field(default_factory=list)

    @classmethod
    def for_published_model(cls) -> Recipe:
        """The defaults of a published C2S model with no record."""
        return cls(published=True)

    @classmethod
    def from_train_record(cls, record: Mapping[str, Any]) -> Recipe:
        """The recipe of a run written before ``recipe.json`` existed, from its ``train_args.json``."""
        from utils.models.run_record import renamed_keys

        record = renamed_keys(record)
        fmt = record.get("prompt_format", "ours")
        if isinstance(fmt, Mapping):  # earlier runs recorded a description of ours
            fmt = fmt.get("name", "ours")
        column = record.get("label_column") or "cell_type"
        labels = record.get("cell_types") or []
        data_dir = record.get("data_dir")
        return cls(prompt_format=str(fmt), organism=record.get("organism", DEFAULT_ORGANISM),
                   top_k_genes=int(record.get("top_k_genes", DEFAULT_TOP_K_GENES)),
                   tasks=list(record.get("tasks") or []), task_weights=list(record.get("task_weights") or []),
                   label_columns={column: list(labels)} if labels else {},
                   **(transform_of(Path(data_dir).parent) if data_dir else {}), data_dir=data_dir)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Recipe:
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})

    @classmethod
    def read(cls, model_dir: str | Path) -> Recipe:
        """The recipe of a model folder or hub name: ``recipe.json``, else from ``train_args.json``,
        else (a checkpoint folder) its run's ``run_args.json``, else the published defaults."""
        folder = Path(str(model_dir)).expanduser()
        if not folder.exists():  # a hub name: a model pushed by train.py has its records there
            found = hub_file(str(model_dir), RECIPE_FILE) or hub_file(str(model_dir), TRAIN.args)
            folder = found.parent if found is not None else folder
        if (folder / RECIPE_FILE).is_file():
            values = read_record(folder / RECIPE_FILE)
            if not isinstance(values, Mapping):
                raise InputError(f"{folder / RECIPE_FILE} holds no recipe (a JSON object); restore it from the run.")
            return cls.from_dict(values)
        if (folder / TRAIN.args).is_file():
            record = read_record(folder / TRAIN.args)
            if isinstance(record, Mapping) and record:
                return cls.from_train_record(record)
        run_args = folder.parent / TRAIN.run_args  # a checkpoint-N folder of a train.py run
        if folder.name.startswith("checkpoint-") and run_args.is_file():
            recorded = read_record(run_args)
            if isinstance(recorded, Mapping) and isinstance(recorded.get("recipe"), Mapping):
                return cls.from_dict(recorded["recipe"])
        return cls.for_published_model()

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if self.multi_cell_column is None:  # a run without multi-cell tasks records what it did before
            for key in ("multi_cell_column", "cells_per_example", "group_labels"):
                values.pop(key)
        if not self.condition_columns:
            values.pop("condition_columns")
        return values

    @property
    def label_column(self) -> str | None:
        """The first label column (the cell type's), or None for a model trained without labels."""
        return next(iter(self.label_columns), None)

    def labels(self, column: str | None = None) -> list[str]:
        """The label set of ``column`` (default: the first); [] when not recorded."""
        column = column or self.label_column
        return list(self.label_columns.get(column, [])) if column else []

    def attribute(self, column: str | None) -> str | None:
        """``column``'s ``attribute_name`` if the model learned ``<column>_prediction``, else None (cell types)."""
        task = f"{column}{PREDICTION_SUFFIX}"
        if column is None or task == CELL_TYPE_PREDICTION or task not in self.tasks:
            return None
        return attribute_name(column)

    def prediction_columns(self) -> list[str]:
        """The label columns the model was trained to predict, the cell type's first."""
        types = self.has_task(CELL_TYPE_PREDICTION) is not False
        return [c for c in self.label_columns
                if self.attribute(c) is not None or (c == self.label_column and types)]

    def has_task(self, task: str) -> bool | None:
        """Whether the model was trained for ``task`` (None: not recorded)."""
        return task in self.tasks if self.tasks else None

    def sentence_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``utils.adata_to_sentences`` that order new cells' genes as in training."""
        kwargs = {k: v for k, v in self.transform.items() if k in SENTENCE_OPTIONS and v is not None}
        if "target_sum" in kwargs:
            kwargs["target_sum"] = float(kwargs["target_sum"])
        return kwargs

    def describe(self) -> str:
        """One line for the log: what is re-applied."""
        if self.published:
            return "published model defaults: c2s_scale prompts, top 100 genes, no recorded transform or labels"
        parts = [f"{self.prompt_format} prompts", f"top {self.top_k_genes} genes"]
        if self.tasks:
            parts.append("tasks " + ", ".join(self.tasks))
        parts.extend(f"{len(labels):,} {column} labels" for column, labels in self.label_columns.items())
        if self.transform.get("exclude_genes"):
            parts.append(f"excluding genes {self.transform['exclude_genes']!r}")
        if self.transform.get("layer"):
            parts.append(f"counts from layer {self.transform['layer']!r}")
        if self.genes is not None:
            parts.append(f"vocabulary of {len(self.genes):,} genes")
        if not self.transform:
            parts.append("no recorded transform options (defaults)")
        return "recipe: " + ", ".join(parts)
