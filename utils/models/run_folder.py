"""``train.py``'s run folder (``<output_dir>/<run_name>/``): claiming it, the final publish, the hub push."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from accelerate.utils import broadcast_object_list
from huggingface_hub import HfApi

from utils.cli import InputError, save_args, strict_json
from utils.contract import TRAIN
from utils.models.files import TOKENIZER_FILES, WEIGHT_FILES, checkpoint_problem
from utils.models.model_card import card_name, render_card
from utils.models.recipe import RECIPE_FILE, Recipe
from utils.publish import check_can_write, claim_output_dir, publish_staged, release_output_dir

logger = logging.getLogger("cell2sentence.train")

STAGING_DIR = ".staging-final"
# What a run writes (README.md: only when it is the card), besides the shards of _SHARD; the rest is the user's.
RUN_OUTPUTS = frozenset({
    TRAIN.args, TRAIN.results, TRAIN.log, RECIPE_FILE, TRAIN.merged, TRAIN.user_card, TRAIN.evaluations,
    TRAIN.figures, "config.json", "generation_config.json", "adapter_config.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "training_args.bin", *WEIGHT_FILES, *TOKENIZER_FILES})
_SHARD = re.compile(r"(model|pytorch_model|adapter_model)-\d+-of-\d+\.(safetensors|bin)")
# Not pushed to the hub: the checkpoints (the Trainer leaves them out too), lock and staging files.
PUSH_IGNORE = ["checkpoints/*", ".*", "*/.*"]


def is_rank_zero(training_args: Any) -> bool:
    """Whether this process is rank 0 (the only one that writes files)."""
    return training_args.process_index == 0


def latest_checkpoint(checkpoints_dir: Path, *, complete: bool = True) -> Path | None:
    """The ``checkpoint-N`` folder with the largest N (``complete``: that can be resumed from), or None."""
    found = sorted((p for p in checkpoints_dir.glob("checkpoint-*")
                    if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for candidate in found:
        problem = checkpoint_problem(candidate) if complete else None
        if problem is None:
            return candidate
        logger.warning("Skipping %s, which is incomplete: %s.", candidate.name, problem)
    return None


def resolve_run(args: Any) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None: a fresh run) of train.py's ``args``."""
    m, t = args.model, args.training
    output_dir = Path(t.output_dir or "data/model/")
    checkpoint: Path | None = None
    run_name = t.run_name
    if m.checkpoint == "latest":
        if not run_name:
            raise InputError("--checkpoint latest needs --run_name of the run to resume.")
        checkpoint = latest_checkpoint(output_dir / run_name / "checkpoints")
        if checkpoint is None:
            raise InputError(f"No complete checkpoint-N folder in {output_dir / run_name / 'checkpoints'}; "
                             "pass --checkpoint with a checkpoint folder.")
    elif m.checkpoint:
        checkpoint = Path(m.checkpoint)
        if not (checkpoint / "trainer_state.json").is_file():
            raise InputError(f"{checkpoint} is no Trainer checkpoint (no trainer_state.json); pass a "
                             "<run>/checkpoints/checkpoint-N folder or --checkpoint latest.")
        if problem := checkpoint_problem(checkpoint):
            raise InputError(f"Cannot resume from {checkpoint}: {problem}; pass an earlier "
                             "checkpoint-N folder.")
    if run_name:
        run_dir = output_dir / run_name
    elif checkpoint is not None and checkpoint.parent.name == "checkpoints":
        run_dir = checkpoint.parent.parent  # resume into the run the checkpoint belongs to
    else:
        # <model>-<UTC timestamp>, e.g. gpt2-20240101-120000: rank 0's on every rank
        base = f"scratch-L{m.n_layer}-D{m.n_embd}" if m.init_from_scratch else Path(m.model_name.rstrip("/")).name
        name = f"{base or 'model'}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
        run_dir = output_dir / broadcast_object_list([name])[0]
    return run_dir, checkpoint


def prepare_run_dir(run_dir: Path, checkpoint: Path | None, *, overwrite: bool, delete: bool = True) -> None:
    """Refuse to replace a finished run without --overwrite, unless resuming it; ``delete``: claim, clean."""
    checkpoints = run_dir / "checkpoints"
    resuming_here = checkpoint is not None and checkpoints.resolve() in checkpoint.resolve().parents
    claim = claim_output_dir if delete else check_can_write
    claim(run_dir, ["config.json", "adapter_config.json"], overwrite=overwrite or resuming_here)
    if not checkpoints.is_dir() or resuming_here:
        return
    if latest_checkpoint(checkpoints, complete=False) is not None and not overwrite:
        raise InputError(f"{checkpoints} holds checkpoints of an earlier run; resume it with --checkpoint "
                         f"latest --run_name {run_dir.name}, or pass --overwrite to start over.")
    if delete:  # also the leftovers of a run that crashed before its first checkpoint
        shutil.rmtree(checkpoints, ignore_errors=True)


def write_run_record(training_args: Any, record: dict[str, Any], recipe: Recipe) -> None:
    """``<run>/checkpoints/run_args.json``: the record and recipe a resume reads (rank 0)."""
    if is_rank_zero(training_args):
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        save_args({**record, "recipe": recipe.to_dict()}, Path(training_args.output_dir) / TRAIN.run_args)


def publish(staging: Path, run_dir: Path) -> None:
    """Publish the staged files into ``run_dir`` (config last), retiring earlier run outputs not written now."""
    names = sorted(p.name for p in staging.iterdir())
    old = sorted(p.name for p in run_dir.iterdir() if p.name in RUN_OUTPUTS or _SHARD.fullmatch(p.name))
    publish_staged(staging, run_dir, ["config.json", "adapter_config.json", *names, *old], whole=True)
    release_output_dir(run_dir)


def save_final_files(staging: Path, trainer: Any, tokenizer: Any, record: dict[str, Any],
                     recipe: Recipe, metrics: dict[str, Any], *, merge: bool) -> None:
    """Write the tokenizer, records, recipe and card beside the saved model (``merge``: also ``merged/``)."""
    tokenizer.save_pretrained(str(staging))
    (staging / "training_args.bin").unlink(missing_ok=True)
    (staging / TRAIN.card).unlink(missing_ok=True)  # peft's template; ours replaces it
    folders = [staging]
    if merge:
        # The adapter folds into the base weights: a plain model anyone loads without peft.
        trainer.model.merge_and_unload().save_pretrained(str(staging / TRAIN.merged))
        tokenizer.save_pretrained(str(staging / TRAIN.merged))
        folders.append(staging / TRAIN.merged)
    card = card_name(staging.parent)
    if card != TRAIN.card:
        logger.warning("%s is yours, so it stays; the model card is %s (rename it to README.md to have the "
                       "hub show it).", staging.parent / TRAIN.card, staging.parent / card)
    for folder in folders:
        save_args(record, folder / TRAIN.args)
        save_args(recipe.to_dict(), folder / RECIPE_FILE)
        (folder / TRAIN.results).write_text(strict_json(metrics, indent=2, sort_keys=True) + "\n")
        (folder / TRAIN.log).write_text(strict_json(trainer.state.log_history, indent=2) + "\n")
        (folder / (card if folder == staging else TRAIN.card)).write_text(render_card(folder))


class HubPush(NamedTuple):
    """Where ``--push_to_hub`` pushes the run folder."""

    repo_id: str
    token: str | None
    revision: str | None


def hub_push(training_args: Any, run_dir: Path) -> HubPush | None:
    """Take ``--push_to_hub`` over from the Trainer (which pushes before the card exists) and create
    the repository now, so that a missing login fails before training; None without it or off rank 0."""
    t = training_args
    if not t.push_to_hub:
        return None
    t.push_to_hub = False
    if not is_rank_zero(t):
        return None
    name = t.hub_model_id or run_dir.name
    try:
        url = HfApi().create_repo(name, token=t.hub_token, private=t.hub_private_repo, exist_ok=True)
    except Exception as err:  # no network, no login, no rights: whatever the hub says
        raise InputError(f"--push_to_hub: the hub repository {name} cannot be created ({err}); log in with "
                         "`hf auth login` and check the network, or train without --push_to_hub.") from None
    if (strategy := getattr(t.hub_strategy, "value", t.hub_strategy)) not in ("end", "every_save"):
        logger.warning("--hub_strategy %s: train.py pushes the finished run folder only, no checkpoints.",
                       strategy)
    logger.info("The run folder goes to the hub repository %s once it is published.", url.repo_id)
    return HubPush(url.repo_id, t.hub_token, t.hub_revision)


def push_run(run_dir: Path, hub: HubPush) -> None:
    """Upload the run folder but ``checkpoints/``; run outputs of an earlier push not written now go."""
    stale = sorted({*RUN_OUTPUTS, f"{TRAIN.merged}/*", f"{TRAIN.figures}/*", "*-of-*.safetensors", "*-of-*.bin"})
    config = run_dir / "adapter_config.json"
    base = json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
    if base and Path(base).is_absolute():
        logger.warning("The adapter's base model is the local folder %s: who pulls %s needs it there too.",
                       base, hub.repo_id)
    try:
        HfApi().upload_folder(repo_id=hub.repo_id, folder_path=str(run_dir), commit_message="End of training",
                              token=hub.token, revision=hub.revision, ignore_patterns=PUSH_IGNORE,
                              delete_patterns=stale)
    except Exception as err:
        raise InputError(f"The run is in {run_dir}, but pushing it to the hub repository {hub.repo_id} failed "
                         f"({err}); push it again with: hf upload {hub.repo_id} {run_dir} --exclude "
                         "'checkpoints/*' '.*'") from None
    logger.info("Pushed %s to the hub repository %s.", run_dir, hub.repo_id)


def publish_run(trainer: Any, tokenizer: Any, run_dir: Path, record: dict[str, Any],
                recipe: Recipe, metrics: dict[str, Any], *, merge: bool, hub: HubPush | None = None) -> None:
    """Save (on every process: sharded weights are gathered), publish and push the model with its records."""
    t = trainer.args
    if hub is not None:
        record = {**record, "hub_repo": hub.repo_id}
    staging = run_dir / STAGING_DIR  # one a dead run left was removed when the run folder was claimed
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
        logger.info("Wrote the model to %s after %s steps (train loss %.4f%s).", run_dir,
                    f"{trainer.state.global_step:,}", metrics.get("train_loss", float("nan")),
                    f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "")
        if hub is not None:
            push_run(run_dir, hub)
    trainer.accelerator.wait_for_everyone()


def final_eval_metrics(trainer: Any) -> dict[str, Any]:
    """The evaluation at the last step (the Trainer's own when it evaluated there), with the perplexity."""
    last_eval = [h for h in trainer.state.log_history if "eval_loss" in h]
    if last_eval and last_eval[-1].get("step") == trainer.state.global_step:
        eval_metrics = {k: v for k, v in last_eval[-1].items() if k not in ("step", "epoch")}
    else:
        eval_metrics = trainer.evaluate()
    with contextlib.suppress(OverflowError):
        eval_metrics["eval_perplexity"] = math.exp(eval_metrics["eval_loss"])
    return eval_metrics
