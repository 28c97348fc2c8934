"""The run folder of ``train.py``: where a run lives (``<output_dir>/<run_name>/``), its
checkpoints (``<run>/checkpoints/checkpoint-N``), claiming the folder, and the final publish of
the model with its records (``train_args.json``, ``recipe.json``, metrics, log) through the one
publish protocol of ``utils.publish``.

What a run writes into its folder is named here (``is_run_output``): a later run on the folder
may replace or remove those files, never anything else of the user's.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from utils.cli import InputError, strict_json
from utils.models.recipe import RECIPE_FILE, Recipe
from utils.publish import check_can_write, claim_output_dir, publish_staged, release_output_dir

logger = logging.getLogger("cell2sentence.train")

TRAIN_ARGS_FILE = "train_args.json"
RESULTS_FILE = "train_results.json"
LOG_FILE = "train_log.json"
RUN_ARGS_FILE = "run_args.json"  # inside <run>/checkpoints, read when resuming
MERGED_DIR = "merged"
STAGING_DIR = ".staging-final"
# What a run writes into its folder besides model, adapter and tokenizer files
# (utils.models.files names those): a later run on the folder may replace or remove these,
# never anything else.
RUN_OUTPUTS = frozenset({
    TRAIN_ARGS_FILE, RESULTS_FILE, LOG_FILE, RECIPE_FILE, MERGED_DIR, "config.json",
    "generation_config.json", "adapter_config.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "training_args.bin",
})
_SHARD = re.compile(r"(model|pytorch_model|adapter_model)-\d+-of-\d+\.(safetensors|bin)")


def is_rank_zero(training_args: Any) -> bool:
    """Whether this process is rank 0 (the only one that writes files)."""
    return training_args.process_index == 0


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every process (identity when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def write_json(path: Path, value: Any) -> None:
    """A record as indented, key-sorted JSON (paths and other objects as strings)."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def default_run_name(model_args: Any) -> str:
    """``<model>-<UTC timestamp>``, e.g. ``gpt2-20240101-120000``."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if model_args.init_from_scratch:
        base = f"scratch-L{model_args.n_layer}-D{model_args.n_embd}"
    else:
        base = Path(model_args.model_name.rstrip("/")).name or "model"
    return f"{base}-{stamp}"


def latest_checkpoint(checkpoints_dir: Path, *, complete: bool = True) -> Path | None:
    """The ``checkpoint-N`` folder with the largest N, or None; with ``complete``, the largest
    that can be resumed from (one the Trainer was still writing when the run died is skipped)."""
    from utils.models.files import checkpoint_problem

    found = sorted(
        (p for p in checkpoints_dir.glob("checkpoint-*")
         if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]), reverse=True,
    )
    for candidate in found:
        problem = checkpoint_problem(candidate) if complete else None
        if problem is None:
            return candidate
        logger.warning("Skipping %s, which is incomplete: %s.", candidate.name, problem)
    return None


def resolve_run(args: Any) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None: a fresh run) of train.py's
    parsed flags ``args``."""
    from utils.models.files import checkpoint_problem

    m, t = args.model, args.training
    output_dir = Path(t.output_dir or "data/model/")
    checkpoint: Path | None = None
    run_name = t.run_name
    if m.checkpoint == "latest":
        if not run_name:
            raise InputError("--checkpoint latest needs --run_name of the run to resume.")
        checkpoint = latest_checkpoint(output_dir / run_name / "checkpoints")
        if checkpoint is None:
            raise InputError(
                f"No complete checkpoint-N folder in {output_dir / run_name / 'checkpoints'}; "
                "pass --checkpoint with a checkpoint folder."
            )
    elif m.checkpoint:
        checkpoint = Path(m.checkpoint)
        if not (checkpoint / "trainer_state.json").is_file():
            raise InputError(
                f"{checkpoint} is no Trainer checkpoint (no trainer_state.json); pass a "
                "<run>/checkpoints/checkpoint-N folder or --checkpoint latest."
            )
        problem = checkpoint_problem(checkpoint)
        if problem:
            raise InputError(f"Cannot resume from {checkpoint}: {problem}; pass an earlier "
                             "checkpoint-N folder.")
    if run_name:
        run_dir = output_dir / run_name
    elif checkpoint is not None and checkpoint.parent.name == "checkpoints":
        run_dir = checkpoint.parent.parent  # resume into the run the checkpoint belongs to
    else:
        run_dir = output_dir / _broadcast(default_run_name(m))
    return run_dir, checkpoint


def prepare_run_dir(
    run_dir: Path, checkpoint: Path | None, *, overwrite: bool, delete: bool = True
) -> None:
    """Refuse to replace a finished run without --overwrite (resuming a run from one of its
    own checkpoints continues it: its final files are replaced); clear stale checkpoints
    (only where ``delete``: rank 0 of a distributed run, which also holds the run's lock)."""
    markers = ["config.json", "adapter_config.json"]
    checkpoints = run_dir / "checkpoints"
    resuming_here = checkpoint is not None and checkpoints.resolve() in (
        checkpoint.resolve().parents
    )
    if delete:
        claim_output_dir(run_dir, markers, overwrite=overwrite or resuming_here)
    else:
        check_can_write(run_dir, markers, overwrite=overwrite or resuming_here)
    if not checkpoints.is_dir() or resuming_here:
        return
    if latest_checkpoint(checkpoints, complete=False) is not None and not overwrite:
        raise InputError(
            f"{checkpoints} holds checkpoints of an earlier run; resume it with "
            f"--checkpoint latest --run_name {run_dir.name}, or pass --overwrite to start "
            "over."
        )
    if delete:  # also the leftovers of a run that crashed before its first checkpoint
        shutil.rmtree(checkpoints, ignore_errors=True)


def write_run_record(training_args: Any, record: dict[str, Any], recipe: Recipe) -> None:
    """``<run>/checkpoints/run_args.json``: the record and recipe a resume reads (rank 0)."""
    if is_rank_zero(training_args):
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(training_args.output_dir) / RUN_ARGS_FILE,
                   {**record, "recipe": recipe.to_dict()})


def is_run_output(name: str) -> bool:
    """Whether ``name`` in a run folder is a file train.py writes there (a model, adapter or
    tokenizer file, a record, ``merged/``); anything else is the user's."""
    from utils.models.files import TOKENIZER_FILES, WEIGHT_FILES

    return name in RUN_OUTPUTS or name in WEIGHT_FILES or name in TOKENIZER_FILES or bool(
        _SHARD.fullmatch(name))


def publish(staging: Path, run_dir: Path) -> None:
    """Move the staged final files into ``run_dir`` by renames, ``config.json`` (or a LoRA
    run's ``adapter_config.json``) last and its old one aside first, then remove the files an
    earlier run wrote that this one did not write again (a full model's weights when this run
    is a LoRA adapter, say). The user's own files in the folder stay.

    Without it a folder does not load as a model, so a crash in between never leaves
    something that looks like a finished model; the next run on the folder finishes the
    publish (``utils.publish.publish_staged``).
    """
    names = sorted(p.name for p in staging.iterdir())
    published = publish_staged(staging, run_dir, ["config.json", "adapter_config.json", *names])
    for old in sorted(run_dir.iterdir()):
        if old.name not in published and is_run_output(old.name):
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    release_output_dir(run_dir)


def save_final_files(staging: Path, trainer: Any, tokenizer: Any, record: dict[str, Any],
                     recipe: Recipe, metrics: dict[str, Any], *, merge: bool) -> None:
    """Write the tokenizer, the records and the recipe next to the saved model in ``staging``
    (and, with ``merge``, the merged model with the same records into ``merged/``, so that it
    is used exactly as the adapter folder)."""
    tokenizer.save_pretrained(str(staging))
    (staging / "training_args.bin").unlink(missing_ok=True)
    # peft's model card template; left out so that a README.md of the user's is never replaced
    (staging / "README.md").unlink(missing_ok=True)
    folders = [staging]
    if merge:
        # The adapter folds into the base weights: a plain model anyone loads without peft.
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(staging / MERGED_DIR))
        tokenizer.save_pretrained(str(staging / MERGED_DIR))
        folders.append(staging / MERGED_DIR)
    for folder in folders:
        write_json(folder / TRAIN_ARGS_FILE, record)
        recipe.write(folder)
    (staging / RESULTS_FILE).write_text(strict_json(metrics, indent=2, sort_keys=True) + "\n")
    (staging / LOG_FILE).write_text(strict_json(trainer.state.log_history, indent=2) + "\n")


def publish_run(trainer: Any, tokenizer: Any, run_dir: Path, record: dict[str, Any],
                recipe: Recipe, metrics: dict[str, Any], *, merge: bool) -> None:
    """Save the trained model into a staging folder of ``run_dir`` with its records, update the
    run record of the checkpoints, and publish (rank 0 writes; every process takes part in
    saving, so that sharded/DeepSpeed weights are gathered). A failure on the way (a full disk,
    Ctrl-C) removes the half-written staging folder at once."""
    t = trainer.args
    staging = run_dir / STAGING_DIR
    if is_rank_zero(t) and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))
        if is_rank_zero(t):
            save_final_files(staging, trainer, tokenizer, record, recipe, metrics, merge=merge)
            write_run_record(t, record, recipe)
            publish(staging, run_dir)
    except BaseException:
        if is_rank_zero(t):
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if is_rank_zero(t):
        logger.info(
            "Wrote the model to %s after %s steps (train loss %.4f%s).",
            run_dir, f"{trainer.state.global_step:,}", metrics.get("train_loss", float("nan")),
            f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "",
        )
    trainer.accelerator.wait_for_everyone()
