"""What a ``train.py`` run records (``train_args.json``, and ``run_args.json`` beside its
checkpoints) and how a resume continues the run from that record.

The record holds every flag plus what the run derived from them; its ``flags`` are the model and
data flags and the seed as they were given (``MODEL_FLAGS``, ``DATA_FLAGS``), which a resume
restores; the optimization (``TRAINING_FLAGS``) comes back unless given again. A record written
before a flag was renamed (``utils.cli.RENAMED_FLAGS``) is read with the new names.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from utils.cli import RENAMED_FLAGS, InputError
from utils.models.recipe import Recipe

logger = logging.getLogger("cell2sentence.train")

# The flags that make a run what it is: resuming restores them from the run's record.
# The optimization a resume keeps unless given again (then used, with a warning): a different
# batch size would also make the Trainer skip the wrong number of batches of the epoch.
TRAINING_FLAGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                  "weight_decay", "warmup_steps", "warmup_ratio", "max_grad_norm",
                  "lr_scheduler_type")
MODEL_FLAGS = ("model_name", "init_from_scratch", "n_layer", "n_embd", "n_head", "n_positions",
               "min_gene_count", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
DATA_FLAGS = ("data_dir", "top_k_genes", "tasks", "task_weights", "label_column", "label_columns", "multi_cell_column",
              "cells_per_example",
              "prompt_format", "organism", "max_seq_length", "max_train_samples",
              "max_eval_samples")
# A record's keys of flags renamed since (e.g. cell_type_column -> label_column)
_RENAMED_KEYS = {old.removeprefix("--"): new.removeprefix("--") for old, new in RENAMED_FLAGS.items()}


def renamed_keys(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` (``train_args.json``, ``run_args.json``) with the keys of renamed flags under
    their new names, in ``record`` and its ``flags``; a new name already there is kept.

    >>> renamed_keys({"cell_type_column": "tissue", "seed": 1})
    {'label_column': 'tissue', 'seed': 1}
    """
    def renamed(values: Mapping[str, Any]) -> dict[str, Any]:
        return {_RENAMED_KEYS.get(k, k): v for k, v in values.items()
                if k not in _RENAMED_KEYS or _RENAMED_KEYS[k] not in values}

    out = renamed(record)
    if isinstance(out.get("flags"), Mapping):
        out["flags"] = renamed(out["flags"])
    return out


def read_run_record(checkpoint: Path) -> tuple[dict[str, Any], Path] | None:
    """The record of the run ``checkpoint`` belongs to and its path: ``run_args.json`` beside
    the checkpoints, else the run's ``train_args.json``; None when it has neither."""
    from utils.models.run_folder import RUN_ARGS_FILE, TRAIN_ARGS_FILE

    for path in (checkpoint.parent / RUN_ARGS_FILE, checkpoint.parent.parent / TRAIN_ARGS_FILE):
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise InputError(
                f"{path} is not valid JSON ({err}), so the run to resume is unknown; restore "
                "the file or start a new run without --checkpoint."
            ) from None
        if isinstance(record, dict):
            return renamed_keys(record), path
    return None


def resume_run(args: Any, checkpoint: Path | None) -> dict[str, Any]:
    """Restore the run ``checkpoint`` belongs to into ``args`` (train.py's parsed flags) and
    return its record; {} for a fresh run, or a checkpoint whose run has no record (the flags
    as given, with a warning)."""
    if checkpoint is None:
        return {}
    found = read_run_record(checkpoint)
    if found is None:
        from utils.models.run_folder import RUN_ARGS_FILE

        logger.warning("%s has no run record (%s); resuming with the flags as given.",
                       checkpoint, checkpoint.parent / RUN_ARGS_FILE)
        return {}
    restore_run(args, *found)
    return found[0]


def recorded_flags(args: Any) -> dict[str, Any]:
    """The flags of ``MODEL_FLAGS``, ``DATA_FLAGS`` and the seed, as given (before the run
    derives anything from them): what a resume restores."""
    values = {name: getattr(args.model, name) for name in MODEL_FLAGS}
    values.update({name: getattr(args.data, name) for name in DATA_FLAGS})
    values["seed"] = args.training.seed
    return values


def _flags_of(record: dict[str, Any]) -> dict[str, Any]:
    """The recorded flags; a record written before they were kept has the derived values."""
    if isinstance(record.get("flags"), dict):
        return record["flags"]
    flags = {k: record[k] for k in (*MODEL_FLAGS, *DATA_FLAGS, "seed") if k in record}
    if flags.get("model_name") is None:
        flags.pop("model_name", None)  # a from-scratch run records no model
    if not record.get("cell_types"):
        flags.pop("label_column", None)  # the default it recorded names no column of the data
    if isinstance(flags.get("tasks"), list):
        flags["tasks"] = ",".join(flags["tasks"])
    if isinstance(flags.get("task_weights"), list):
        flags["task_weights"] = ",".join(repr(float(w)) for w in flags["task_weights"])
    return flags


def _given(args: Any) -> frozenset[str]:
    """The flags given on the command line; for arguments made in Python, those off their
    defaults."""
    if args.given is not None:
        return args.given
    seed_default = type(args.training).__dataclass_fields__["seed"].default
    current, defaults = recorded_flags(args), {
        **asdict(type(args.model)()), **asdict(type(args.data)()), "seed": seed_default}
    return frozenset(k for k, v in current.items() if v != defaults.get(k))


def _same_flag(name: str, value: Any, *recorded: Any) -> bool:
    """Whether a given flag value is one of the recorded ones (folders compared as paths)."""
    for other in recorded:
        if name in ("data_dir", "model_name") and value is not None and other is not None:
            if Path(value).expanduser().resolve() == Path(other).expanduser().resolve():
                return True
        elif value == other:
            return True
    return False


def restore_run(args: Any, record: dict[str, Any], source: Path) -> None:
    """Continue the recorded run as it was: its model and data flags and seed replace the
    ones of ``args``; a flag given on the command line with another value is one sentence.

    The recorded value counts as given either as the run had it (``--max_seq_length 2000``)
    or as the run derived it (the context of 1024 it became, the label column ``cell_type``).
    """
    from utils.models.examples import parse_tasks

    record = renamed_keys(record)
    flags, given = _flags_of(record), _given(args)
    holders = {**dict.fromkeys(MODEL_FLAGS, args.model), **dict.fromkeys(DATA_FLAGS, args.data),
               "seed": args.training}
    tasks, weights = record.get("tasks"), record.get("task_weights")
    if given & {"tasks", "task_weights"} and isinstance(tasks, list) and isinstance(weights, list):
        recorded_mix = dict(zip(tasks, map(float, weights), strict=True))
        mix = parse_tasks(args.data.tasks or ",".join(tasks), args.data.task_weights)
        if list(mix) != list(recorded_mix) or not all(
                math.isclose(mix[k], recorded_mix[k], rel_tol=1e-6) for k in mix):
            def show(m: dict[str, float]) -> str:
                return ", ".join(f"{k}={v:.2f}" for k, v in m.items())
            raise InputError(
                f"--tasks/--task_weights give {show(mix)}, but the run being resumed was trained "
                f"with {show(recorded_mix)} (recorded in {source}); drop the flags to continue "
                "the run as it was, or start a new run without --checkpoint."
            )
    for name, holder in holders.items():
        if name not in flags:
            continue
        value, recorded = getattr(holder, name), flags[name]
        if (name in given and name not in ("tasks", "task_weights")
                and not _same_flag(name, value, recorded, record.get(name))):
            raise InputError(
                f"--{name} {value} differs from the {recorded} that the run being resumed was "
                f"trained with (recorded in {source}); drop the flag to continue the run as it "
                "was, or start a new run without --checkpoint."
            )
        setattr(holder, name, recorded)
    _restore_training(args.training, record.get("training") or {}, given, source)
    d = args.data
    logger.info(
        "Resuming the run recorded in %s: data %s, tasks %s, top %d genes, %s prompts, seed %d.",
        source, d.data_dir, d.tasks or "(from the data)", d.top_k_genes, d.prompt_format,
        args.training.seed,
    )


def _restore_training(t: Any, recorded: dict[str, Any], given: frozenset[str],
                      source: Path) -> None:
    """The recorded optimization flags (``TRAINING_FLAGS``) replace the defaults; one given
    with another value is used, with a warning (the resume records the change)."""
    from transformers import SchedulerType

    for name in TRAINING_FLAGS:
        if name not in recorded:
            continue
        value, before = getattr(t, name), recorded[name]
        value = value.value if isinstance(value, SchedulerType) else value
        if name in given:
            if value != before:
                logger.warning("--%s %s replaces the %s the run being resumed was trained "
                               "with (%s).", name, value, before, source)
            continue
        setattr(t, name, SchedulerType(before) if name == "lr_scheduler_type" else before)


def effective_args(
    args: Any, tasks: dict[str, float], max_length: int, stats: dict[str, Any],
    tokenizer: Any, checkpoint: Path | None, run_dir: Path, cell_types: list[str],
    lora_modules: Sequence[str] = (), flags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What train_args.json records: every flag plus what the run derived from them, and
    (``flags``) the flags a resume restores as they were given."""
    from utils.models.prompts import prompt_format

    fmt = prompt_format(args.data.prompt_format, organism=args.data.organism)
    record: dict[str, Any] = {**asdict(args.model), **asdict(args.data)}
    if args.model.init_from_scratch:
        record["model_name"] = None  # no pretrained weights were used
        record["architecture"] = "gpt2"
    record.update(
        run_name=run_dir.name,
        run_dir=str(run_dir),
        tasks=list(tasks),
        task_weights=list(tasks.values()),
        max_seq_length=max_length,
        resumed_from=str(checkpoint) if checkpoint else None,
        cell_types=cell_types,
        train_examples=stats,
        prompt_format=fmt.name,
        prompt_format_details={
            **fmt.record(),
            "prompt": "utils.models.examples.encode_prompt(tokenizer, prompt, format)",
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "prompts_module": "utils/models/prompts.py",
        },
        lora=(
            {"r": args.model.lora_r, "alpha": args.model.lora_alpha,
             "dropout": args.model.lora_dropout,
             "target_modules": sorted(lora_modules), "merged": args.model.merge_lora}
            if args.model.lora_r else None
        ),
        seed=args.training.seed,
        training=json.loads(args.training.to_json_string()),
        flags=flags if flags is not None else recorded_flags(args),
    )
    return record


def training_recipe(data_args: Any, tasks: Mapping[str, float], cell_types: Sequence[str],
                    earlier: Mapping[str, Any]) -> Recipe:
    """The recipe of the run (``data_args``: train.py's ``DataArguments``); the labels are part
    of it only when a task taught them. A resume whose transform changed since the run's
    record (``earlier``) is a warning."""
    from utils.models.examples import TYPED_TASKS

    d = data_args
    labelled = cell_types and any(task in TYPED_TASKS for task in tasks)
    recipe = Recipe.for_training(
        Path(d.data_dir).resolve(), prompt_format=d.prompt_format, organism=d.organism,
        top_k_genes=d.top_k_genes, tasks=tasks,
        label_columns={d.label_column: cell_types} if labelled else {},
    )
    logger.info("Model %s.", recipe.describe())
    before = earlier.get("recipe")
    if isinstance(before, dict) and (before.get("transform"), before.get("genes")) != (
            recipe.transform, recipe.genes):
        logger.warning(
            "The transform of %s changed since the run started (its options or vocabulary "
            "differ from the run's recipe); the resumed run trains on the new sentences.",
            d.data_dir,
        )
    return recipe


def resume_entry(record: dict[str, Any], earlier: dict[str, Any], checkpoint: Path,
                 from_step: int) -> dict[str, Any]:
    """One entry of a record's ``resumes``: when, from which checkpoint and step, and the
    values that differ from the run's record so far (``[before, now]``, e.g. a larger
    ``training.max_steps``); ``to_step`` is filled in when the run ends."""
    volatile = {"resumed_from", "resumes", "checkpoint", "overwrite", "recipe", "flags",
                "training"}
    changed = {k: [earlier.get(k), v] for k, v in record.items()
               if k not in volatile and earlier.get(k) != v}
    before = earlier.get("training") or {}
    changed.update({f"training.{k}": [before.get(k), v]
                    for k, v in (record.get("training") or {}).items()
                    if before.get(k) != v and k not in ("output_dir", "logging_dir")})
    return {"at": datetime.now(UTC).isoformat(timespec="seconds"), "checkpoint": str(checkpoint),
            "from_step": from_step, "to_step": None, "changed": changed}


def extend_record(record: dict[str, Any], earlier: dict[str, Any],
                  checkpoint: Path | None) -> dict[str, Any]:
    """The record of a resumed run: the run's record so far (``earlier``) extended, never
    replaced: what it held stays, the resume is added to its ``resumes``."""
    if checkpoint is None or not earlier:
        return record
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    entry = resume_entry(record, earlier, checkpoint, int(state["global_step"]))
    kept = {k: v for k, v in earlier.items() if k not in ("recipe", "resumes")}
    return {**kept, **record, "resumes": [*earlier.get("resumes", []), entry]}
