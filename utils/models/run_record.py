"""What a ``train.py`` run records (``train_args.json``, ``checkpoints/run_args.json``) and how a resume restores it."""

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
from utils.contract import TRAIN
from utils.models.examples import parse_tasks
from utils.models.prompts import prompt_format

logger = logging.getLogger("cell2sentence.train")

# Kept on resume unless given again (another batch size would also skip the wrong number of batches).
TRAINING_FLAGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                  "weight_decay", "warmup_steps", "warmup_ratio", "max_grad_norm", "lr_scheduler_type")
# The flags that make a run what it is: a resume restores them.
MODEL_FLAGS = ("model_name", "init_from_scratch", "n_layer", "n_embd", "n_head", "n_positions",
               "min_gene_count", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
DATA_FLAGS = ("data_dir", "top_k_genes", "tasks", "task_weights", "label_column", "label_columns",
              "multi_cell_column", "cells_per_example", "prompt_format", "organism", "max_seq_length",
              "max_train_samples", "max_eval_samples")
_RENAMED_KEYS = {old.removeprefix("--"): new.removeprefix("--") for old, new in RENAMED_FLAGS.items()}


def renamed_keys(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` (and its ``flags``) with renamed flags' keys under their new names (a new one wins).

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


def resume_run(args: Any, checkpoint: Path | None) -> dict[str, Any]:
    """Restore into ``args`` the run of ``checkpoint`` as recorded; the record, {} for a fresh run or none."""
    if checkpoint is None:
        return {}
    for path in (checkpoint.parent / TRAIN.run_args, checkpoint.parent.parent / TRAIN.args):
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise InputError(f"{path} is not valid JSON ({err}), so the run to resume is unknown; restore "
                             "the file or start a new run without --checkpoint.") from None
        if isinstance(record, dict):
            record = renamed_keys(record)
            restore_run(args, record, path)
            return record
    logger.warning("%s has no run record (%s); resuming with the flags as given.",
                   checkpoint, checkpoint.parent / TRAIN.run_args)
    return {}


def recorded_flags(args: Any) -> dict[str, Any]:
    """The flags a resume restores, as given (before the run derives anything from them)."""
    return {**{name: getattr(args.model, name) for name in MODEL_FLAGS},
            **{name: getattr(args.data, name) for name in DATA_FLAGS}, "seed": args.training.seed}


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
    """The flags given on the command line (arguments made in Python: those off their defaults)."""
    if args.given is not None:
        return args.given
    seed_default = type(args.training).__dataclass_fields__["seed"].default
    current, defaults = recorded_flags(args), {
        **asdict(type(args.model)()), **asdict(type(args.data)()), "seed": seed_default}
    return frozenset(k for k, v in current.items() if v != defaults.get(k))


def _same_flag(name: str, value: Any, other: Any) -> bool:
    """Whether a given flag value is the recorded one (folders compared as paths)."""
    if name in ("data_dir", "model_name") and value is not None and other is not None:
        return Path(value).expanduser().resolve() == Path(other).expanduser().resolve()
    return value == other


def restore_run(args: Any, record: dict[str, Any], source: Path) -> None:
    """Restore the recorded model and data flags and seed (one given with another value: an ``InputError``)
    and the ``TRAINING_FLAGS`` not given again."""
    from transformers import SchedulerType

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
            raise InputError(f"--tasks/--task_weights give {show(mix)}, but the run being resumed was "
                             f"trained with {show(recorded_mix)} (recorded in {source}); drop the flags to "
                             "continue the run as it was, or start a new run without --checkpoint.")
    for name, holder in holders.items():
        if name not in flags:
            continue
        value, recorded = getattr(holder, name), flags[name]
        if (name in given and name not in ("tasks", "task_weights")
                and not any(_same_flag(name, value, other) for other in (recorded, record.get(name)))):
            raise InputError(f"--{name} {value} differs from the {recorded} that the run being resumed was "
                             f"trained with (recorded in {source}); drop the flag to continue the run as it "
                             "was, or start a new run without --checkpoint.")
        setattr(holder, name, recorded)
    training = record.get("training") or {}  # kept unless given again (then a warning when it differs)
    for name in (n for n in TRAINING_FLAGS if n in training):
        value, before = getattr(args.training, name), training[name]
        value = value.value if isinstance(value, SchedulerType) else value
        if name not in given:
            setattr(args.training, name, SchedulerType(before) if name == "lr_scheduler_type" else before)
        elif value != before:
            logger.warning("--%s %s replaces the %s the run being resumed was trained with (%s).",
                           name, value, before, source)
    d = args.data
    logger.info("Resuming the run recorded in %s: data %s, tasks %s, top %d genes, %s prompts, seed %d.",
                source, d.data_dir, d.tasks or "(from the data)", d.top_k_genes, d.prompt_format,
                args.training.seed)


def effective_args(args: Any, tasks: dict[str, float], max_length: int, stats: dict[str, Any], tokenizer: Any,
                   checkpoint: Path | None, run_dir: Path, cell_types: list[str], lora_modules: Sequence[str],
                   flags: dict[str, Any], *, facts: Mapping[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """The run's record (train_args.json): every flag, what the run derived, the ``flags`` as given and
    the card's ``facts``; a resume extends ``earlier``, adding itself to ``resumes``."""
    m, fmt = args.model, prompt_format(args.data.prompt_format, organism=args.data.organism)
    record: dict[str, Any] = {**asdict(m), **asdict(args.data)}
    if m.init_from_scratch:
        record["model_name"] = None  # no pretrained weights were used
        record["architecture"] = "gpt2"
    record.update(
        run_name=run_dir.name, run_dir=str(run_dir), tasks=list(tasks), task_weights=list(tasks.values()),
        max_seq_length=max_length, resumed_from=str(checkpoint) if checkpoint else None,
        cell_types=cell_types, train_examples=stats, prompt_format=fmt.name,
        prompt_format_details={
            **fmt.record(), "prompt": "utils.models.examples.encode_prompt(tokenizer, prompt, format)",
            "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
            "prompts_module": "utils/models/prompts.py",
        },
        lora={"r": m.lora_r, "alpha": m.lora_alpha, "dropout": m.lora_dropout,
              "target_modules": sorted(lora_modules), "merged": m.merge_lora} if m.lora_r else None,
        seed=args.training.seed, training=json.loads(args.training.to_json_string()),
        flags=flags, **facts,
    )
    if checkpoint is None or not earlier:
        return record
    # The entry of this resume: when, from which checkpoint and step, and what changed ([before, now]).
    volatile = {"resumed_from", "resumes", "checkpoint", "overwrite", "recipe", "flags", "training"}
    changed = {k: [earlier.get(k), v] for k, v in record.items() if k not in volatile and earlier.get(k) != v}
    before = earlier.get("training") or {}
    changed.update({f"training.{k}": [before.get(k), v] for k, v in record["training"].items()
                    if before.get(k) != v and k not in ("output_dir", "logging_dir")})
    entry = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "checkpoint": str(checkpoint),
             "from_step": json.loads((checkpoint / "trainer_state.json").read_text())["global_step"], "to_step": None,
             "changed": changed}
    kept = {k: v for k, v in earlier.items() if k not in ("recipe", "resumes")}
    return {**kept, **record, "resumes": [*earlier.get("resumes", []), entry]}
