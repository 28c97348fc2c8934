"""The model card (``README.md``) of a ``train.py`` run folder, rendered from its records and the eval
scripts' results. A ``README.md`` without the card's marker is the user's: the card is ``MODEL_CARD.md``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from utils.cli import InputError, strict_json
from utils.contract import EMBED, GENERATE, PREDICT, TRAIN, TRANSFORM, read_record
from utils.models.examples import CONDITIONAL_GENERATION, UNCONDITIONAL_GENERATION
from utils.models.recipe import Recipe
from utils.publish import staged_outputs

logger = logging.getLogger("cell2sentence")

USER_README_CARD_FILE, EVALUATIONS_FILE, FIGURES_DIR = TRAIN.user_card, TRAIN.evaluations, TRAIN.figures
MARKER = ("<!-- cell2sentence model card, written from the run's records by utils/models/model_card.py and "
          "rewritten by train.py and the eval scripts; a README.md without this line is yours and is kept -->")
TAGS = ("cell2sentence", "single-cell", "scRNA-seq", "biology")
MAX_LABELS = 20  # labels listed per column; the rest are counted (all are in recipe.json)
PAPER = "https://doi.org/10.1101/2023.09.11.557287"
ARCHITECTURE = (("", ("model_type",)), ("layers ", ("n_layer", "num_hidden_layers")),  # config.json's keys
                ("hidden size ", ("n_embd", "hidden_size")), ("heads ", ("n_head", "num_attention_heads")),
                ("context ", ("n_positions", "max_position_embeddings")))


def _read(path: Path) -> Any:
    """A record for the card, {} when missing or damaged (a card never stops a run)."""
    with contextlib.suppress(InputError):
        return read_record(path)
    return {}


def card_name(folder: Path) -> str:
    """``README.md``, or ``MODEL_CARD.md`` when ``folder`` holds a README.md of the user's."""
    readme = Path(folder) / TRAIN.card
    ours = not readme.is_file() or MARKER in readme.read_text(errors="replace")
    return TRAIN.card if ours else USER_README_CARD_FILE


def run_facts(model_args: Any, data_args: Any, dataset: Any, train_split: Any, valid_split: Any) -> dict[str, Any]:
    """What the card states beyond the flags (for ``train_args.json``): the hub base model and the data."""
    name = None if model_args.init_from_scratch else model_args.model_name
    source = _read(Path(data_args.data_dir).parent / TRANSFORM.args).get("data_filepath")
    return {"base_model": name if name and not Path(name).expanduser().is_dir() else None, "data_summary": {
        "cells": {split: len(cells) for split, cells in dataset.items()}, "train_cells": len(train_split),
        "eval_cells": 0 if valid_split is None else len(valid_split),
        "sources": [source] if isinstance(source, str) else [str(s) for s in source or []]}}


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "–"}[value]
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...] = ("", "")) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(map(_fmt, row)) + " |" for row in rows), ""]


def _labels(column: str, labels: list[str]) -> str:
    more = f" … and {len(labels) - MAX_LABELS:,} more (all in `recipe.json`)" if len(labels) > MAX_LABELS else ""
    return f"- `{column}` ({len(labels):,} labels): " + ", ".join(f"`{x}`" for x in labels[:MAX_LABELS]) + more


def _loss_rows(log: Any) -> list[tuple[Any, ...]]:
    steps: dict[int, dict[str, float]] = {}
    for entry in log if isinstance(log, list) else []:
        for key in ("loss", "eval_loss"):
            if key in entry and "step" in entry:
                steps.setdefault(int(entry["step"]), {})[key] = entry[key]
    keys = sorted(steps)
    if len(keys) > 10:  # ten rows, evenly spaced, the first and the last among them
        keys = sorted({keys[round(i * (len(keys) - 1) / 9)] for i in range(10)})
    return [(step, steps[step].get("loss"), steps[step].get("eval_loss")) for step in keys]


def _evaluation(key: str, entry: Mapping[str, Any]) -> list[str]:
    metrics, figures = entry.get("metrics") or {}, entry.get("figures") or {}
    out = [f"### {key.replace('_', ' ').capitalize()}", ""]
    out += [f"All results: `{entry['source']}`.", ""] if entry.get("source") else []
    if flat := [(k, v) for k, v in metrics.items() if not isinstance(v, Mapping)]:
        out += _table(flat, ("metric", "value"))
    if nested := {k: v for k, v in metrics.items() if isinstance(v, Mapping)}:  # per column, per type
        columns = list(dict.fromkeys(c for v in nested.values() for c in v))
        out += _table([(k, *(v.get(c) for c in columns)) for k, v in nested.items()], ("", *columns))
    return out + [f"![{caption}]({path})" for caption, path in figures.items()] + ([""] if figures else [])


def render_card(folder: Path, evaluations: Mapping[str, Any] | None = None) -> str:
    """The card of a run folder (or its ``merged/``); ``evaluations``: default its records'."""
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    record, recipe, config = _read(folder / TRAIN.args), Recipe.read(folder), _read(folder / "config.json")
    results, log = _read(folder / TRAIN.results), _read(folder / TRAIN.log)
    evaluations = _read(folder / EVALUATIONS_FILE) if evaluations is None else evaluations
    adapter, lora, hub_base = (folder / "adapter_config.json").is_file(), record.get("lora"), record.get("base_model")
    merged = bool(lora) and not adapter
    meta = ModelCardData(library_name="peft" if adapter else "transformers", base_model=hub_base,
                         tags=[*TAGS, *(["lora"] if lora else [])], pipeline_tag="text-generation").to_yaml()
    name, local_base = record.get("run_name") or folder.name, record.get("model_name")
    base = (f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else
            f"the local model `{local_base}`" if local_base else "none: trained from scratch")
    tasks = list(zip(recipe.tasks, recipe.task_weights, strict=False))
    out = ["---", meta.strip(), "---", MARKER, "", f"# {name}{' (merged)' if merged else ''}", "",
           f"A [Cell2Sentence]({PAPER}) model: a causal language model "
           f"{f'fine-tuned from {base}' if local_base else 'trained from scratch'} on cell sentences (a cell's "
           "genes from the highest expression to the lowest) by cell2sentence's `train.py`. Tasks: "
           f"{', '.join(t.replace('_', ' ') for t, _ in tasks) or 'not recorded'}.", ""]
    about = lora and (f"LoRA adapter (rank {lora.get('r')}, alpha {_fmt(lora.get('alpha'))}, dropout "
                      f"{_fmt(lora.get('dropout'))}, modules {', '.join(lora.get('target_modules') or [])})")
    weights = ("full model" if not lora else f"{about} merged into the base model's weights" if merged else
               f"{about}; it loads with its base model" + f"; merged: `{TRAIN.merged}/`" * bool(lora.get("merged")))
    arch = [f"{label}{_fmt(config[key])}" for label, keys in ARCHITECTURE for key in keys if key in config]
    out += ["## Model", "", *_table([("Base model", base), ("Weights", weights),
                                     *([("Architecture", ", ".join(arch))] if arch else []),
                                     ("Tokenizer", "word-level, one token per gene (built from the training data)"
                                      if record.get("init_from_scratch") else "the base model's")])]
    data = record.get("data_summary") or {}
    used = {"train": f" ({data.get('train_cells', 0):,} trained on)",
            "valid": f" ({data.get('eval_cells', 0):,} for the eval loss)" if data.get("eval_cells") else ""}
    splits = sorted(data.get("cells") or {}, key=lambda s: (["train", "valid", "test", s].index(s), s))
    cells = "; ".join(f"{split} {data['cells'][split]:,}{used.get(split, '')}" for split in splits)
    examples = (record.get("train_examples") or {}).get("n_examples")
    out += ["## Data", "", *_table([
        ("Dataset", f"`{record.get('data_dir') or recipe.data_dir}`"),
        ("Source files", ", ".join(f"`{Path(s).name}`" for s in data.get("sources", [])) or "not recorded"),
        ("Cells", cells or (f"{examples:,} training examples" if examples else "not recorded")),
        ("Genes in the vocabulary", len(recipe.genes) if recipe.genes is not None else "not recorded")])]
    transform = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(recipe.transform.items()) if v is not None)
    out += ["## Recipe", "", "Every use of the model (`predict.py`, `embed.py`, `generate.py`, `CellSentenceModel`) "
            "re-applies it from `recipe.json`: new cells become sentences and prompts as the training cells did.", "",
            *_table([("Prompt format", recipe.prompt_format), ("Organism", recipe.organism),
                     ("Genes per cell (top K)", recipe.top_k_genes),
                     ("Example length limit (tokens)", record.get("max_seq_length")),
                     ("Transform options", transform or "not recorded (the transform's defaults)"),
                     ("QC", ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(recipe.qc.items())) or "not recorded")])]
    counts = (record.get("train_examples") or {}).get("task_counts") or {}
    out += ["## Tasks", "", *_table([(t, w, counts.get(t)) for t, w in tasks],
                                    ("task", "weight", "training examples"))]
    out += (["Labels the model was trained on:", "", *(_labels(c, v) for c, v in recipe.label_columns.items()), ""]
            if recipe.label_columns else ["No labels (no task was trained on a label column).", ""])
    if recipe.condition_columns:
        out += [f"Conditional generation on any subset of {', '.join(f'`{c}`' for c in recipe.condition_columns)}.", ""]
    if recipe.multi_cell_column:
        out += [f"Groups of {recipe.cells_per_example} cells by `{recipe.multi_cell_column}`:", "",
                _labels(recipe.multi_cell_column, recipe.group_labels), ""]
    t = record.get("training") or {}
    resumes = ", ".join(f"from step {r.get('from_step')} to {r.get('to_step')}" for r in record.get("resumes") or [])
    rows = [("Steps", results.get("global_step")), ("Epochs", results.get("epoch")),
            ("Train loss (mean over the run)", results.get("train_loss")), ("Eval loss", results.get("eval_loss")),
            ("Eval perplexity", results.get("eval_perplexity")), ("Batch size per device × accumulation",
             f"{t.get('per_device_train_batch_size')} × {t.get('gradient_accumulation_steps')}"),
            ("Learning rate", f"{_fmt(t.get('learning_rate'))} ({t.get('lr_scheduler_type')})"),
            ("Seed", record.get("seed")), ("Resumed", resumes or "no")]
    out += ["## Training", "", *_table([r for r in rows if r[1] is not None])]
    if loss := _loss_rows(log):
        out += ["Logged losses (`train_log.json`):", "", *_table(loss, ("step", "train loss", "eval loss"))]
    out += ["## Evaluation", ""]
    out += [] if evaluations else ["Not evaluated yet: `eval/prediction.py`, `eval/generation.py` and "
                                   "`eval/embedding.py` add their figures here.", ""]
    for key in sorted(evaluations):
        out += _evaluation(key, evaluations[key])
    ref = (f"{record['run_dir']}/{TRAIN.merged}" if merged and record.get("run_dir") else
           record.get("hub_repo") or record.get("run_dir") or f"data/model/{name}")
    return "\n".join(out + _usage(ref, recipe, adapter=adapter))


def _usage(ref: str, recipe: Recipe, *, adapter: bool) -> list[str]:
    predicts = any(task.endswith("_prediction") for task in recipe.tasks) and bool(recipe.label_columns)
    conditional = CONDITIONAL_GENERATION in recipe.tasks and bool(recipe.labels())
    unconditional = UNCONDITIONAL_GENERATION in recipe.tasks
    shell = [*[f"python predict.py --model_dir {ref} --h5ad my_cells.h5ad   # a label and a score per cell"] * predicts,
             f"python embed.py --model_dir {ref} --h5ad my_cells.h5ad     # .obsm['X_c2s']",
             *[f"python generate.py --model_dir {ref} --data_dir data/cell_sentences_hf/"] * conditional,
             *[f"python generate.py --model_dir {ref} --unconditional --n_per_type 50"] * unconditional]
    api = ["from utils import CellSentenceModel", "", f'model = CellSentenceModel.load("{ref}")',
           *["labels = model.predict_cell_types(adata)      # one of the model's labels per cell"] * predicts,
           "embeddings = model.embed_cells(adata)          # cells x hidden size",
           *[f"cells = model.generate_cells([{recipe.labels()[:1] and recipe.labels()[0]!r}], n_per_type=5)"]
           * conditional]
    return ["## How to use", "", "With the cell2sentence scripts and API (`adata`: an AnnData of counts):", "",
            "```bash", *shell, "```", "", "```python", *api, "```", "",
            *["The adapter loads with its base model (`base_model_name_or_path` in `adapter_config.json`).", ""]
            * adapter]


def _clean(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalars of ``metrics`` and its mappings of scalars (one level: per column, per type)."""
    one = str | int | float | bool | None
    inner = {k: {str(a): b for a, b in v.items() if isinstance(b, one)}
             for k, v in metrics.items() if isinstance(v, Mapping)}
    kept = {str(k): inner.get(k, v) for k, v in metrics.items() if isinstance(v, one) or inner.get(k)}
    return json.loads(strict_json(kept))


def add_evaluation_to_card(model_dir: str | Path | None, name: str, metrics: Mapping[str, Any], *,
                           figures: Mapping[str, str | Path] | None = None,
                           source: str | Path | None = None) -> Path | None:
    """Add the evaluation ``name`` (``figures``: caption -> PNG) to the card of the run folder ``model_dir``;
    returns the card, or None for no run folder or one that cannot be written (a warning)."""
    folder = None if model_dir is None else Path(str(model_dir)).expanduser()
    if folder is None or not (folder / TRAIN.args).is_file():
        logger.info("%s is no train.py run folder: no model card to add the %s evaluation to.", model_dir, name)
        return None
    evaluations, card = dict(_read(folder / EVALUATIONS_FILE)), card_name(folder)
    entry: dict[str, Any] = {"metrics": _clean(metrics), "figures": {}, "source": str(source) if source else None}
    try:
        with staged_outputs(folder, [card, EVALUATIONS_FILE, f"{FIGURES_DIR}/{name}"], overwrite=True) as tmp:
            for caption, figure in (figures or {}).items():  # a figure missing: a warning, nothing added
                (tmp / FIGURES_DIR / name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(figure, tmp / FIGURES_DIR / name / Path(figure).name)
                entry["figures"][str(caption)] = f"{FIGURES_DIR}/{name}/{Path(figure).name}"
            evaluations[name] = entry
            (tmp / EVALUATIONS_FILE).write_text(json.dumps(evaluations, indent=2, sort_keys=True) + "\n")
            (tmp / card).write_text(render_card(folder, evaluations))
    except (InputError, OSError) as err:
        logger.warning("The %s evaluation was not added to the model card of %s: %s", name, folder, err)
        return None
    logger.info("Added the %s evaluation to the model card %s.", name, folder / card)
    return folder / card


def recorded_model_dir(step_dir: str | Path) -> str | None:
    """The ``--model_dir`` predict.py, generate.py or embed.py recorded in ``step_dir``, or None."""
    found = [_read(Path(step_dir) / name).get("model_dir") for name in (PREDICT.args, GENERATE.args, EMBED.args)]
    return next((str(model) for model in found if model), None)
