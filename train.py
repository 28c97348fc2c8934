"""Fine-tune a causal language model on cell sentences (or train a small one from scratch).

``data/cell_sentences_hf/`` -> ``data/model/<run_name>/``: model, tokenizer, records and card (docs/train.md).

Example (offline: ``--init_from_scratch True``; several GPUs: ``torchrun --nproc_per_node 4 train.py ...``):

    python train.py --data_dir data/cell_sentences_hf/ --model_name gpt2 --num_train_epochs 10 --fp16 True
"""

import startup_guard  # noqa: F401  # isort: skip  (first: Ctrl-C while the rest loads is one line)

import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from transformers import TrainingArguments
from transformers.training_args import trainer_log_levels

from utils.cli import InputError, renamed_flags, run_cli, seed_everything
from utils.models import run_folder, train_data
from utils.models.build import build_model_and_tokenizer, context_length
from utils.models.distributed import leave_group_at_exit
from utils.models.examples import CausalLMCollator
from utils.models.model_card import run_facts
from utils.models.prompts import C2S_SCALE, PROMPT_FORMATS
from utils.models.run_record import effective_args, recorded_flags, resume_run
from utils.publish import disk_full_error, is_disk_full, releasing_outputs, settle_inputs

logger = logging.getLogger("cell2sentence.train")


def flag(default: Any, text: str, **metadata: Any) -> Any:
    """A dataclass field parsed as a flag with ``default`` and help ``text``."""
    return field(default=default, metadata={"help": text, **metadata})


@dataclass
class ModelArguments:
    """Which model to fine-tune, or the size of one to train from scratch."""

    model_name: str = flag("gpt2", "Hub model name or local model directory.")
    init_from_scratch: bool = flag(False, "Train a random GPT-2-style model (word-level tokenizer).")
    n_layer: int = flag(4, "From scratch: transformer layers.")
    n_embd: int = flag(256, "From scratch: embedding size.")
    n_head: int = flag(4, "From scratch: attention heads.")
    n_positions: int = flag(1024, "From scratch: context length in tokens.")
    min_gene_count: int = flag(1, "From scratch: genes in fewer training cells map to <unk>.")
    checkpoint: str | None = flag(None, "Resume from <run>/checkpoints/checkpoint-N, or 'latest' of --run_name.")
    lora_r: int = flag(0, "LoRA rank; > 0 trains LoRA adapters only, 0 the full model.")
    lora_alpha: float = flag(16.0, "LoRA scaling alpha.")
    lora_dropout: float = flag(0.05, "Dropout on the LoRA inputs.")
    lora_target_modules: str | None = flag(None, "Comma-separated layers LoRA adapts (default: per architecture).")
    merge_lora: bool = flag(False, "With --lora_r: also write the merged model to <run>/merged/.")


@dataclass
class DataArguments:
    """Where the cell sentences are and how they become training examples."""

    data_dir: str = flag("data/cell_sentences_hf/", "transform.py's DatasetDict folder.")
    top_k_genes: int = flag(100, "Genes per example (the first K of each sentence).")
    tasks: str | None = flag(None, "Comma-separated tasks among conditional_generation, "
                             "unconditional_generation, cell_type_prediction and, per further column of "
                             "--label_columns, <column>_prediction and, with --multi_cell_column, "
                             "multi_cell_prediction and multi_cell_generation. Default: all of them when the "
                             "data has cell types, else unconditional_generation.")
    task_weights: str | None = flag(None, "Comma-separated weights of --tasks (default: equal).")
    label_column: str | None = flag(None, "Column of the cell types (default: cell_type if the data has it).")
    label_columns: str | None = flag(None, "Comma-separated label columns, e.g. cell_type,tissue: the first "
                                     "takes the cell type's tasks, each further one a task <column>_prediction, "
                                     "and conditional generation is conditioned on any subset of them (default: "
                                     "--label_column alone).")
    multi_cell_column: str | None = flag(None, "Add C2S-Scale's multi-cell tasks, cells grouped by this column.")
    cells_per_example: int = flag(4, "With --multi_cell_column: cells per example.")
    prompt_format: str = flag("ours", "ours or c2s_scale (the published C2S models').")
    organism: str = flag("Homo sapiens", "The {organism} of c2s_scale prompts.")
    max_seq_length: int | None = flag(None, "Longest example in tokens (default: the model's context).")
    max_train_samples: int | None = flag(None, "Use only the first N training cells.")
    max_eval_samples: int | None = flag(None, "Use only the first N validation cells.")
    num_proc: int | None = flag(None, "Processes that tokenize the examples.")
    overwrite: bool = flag(False, "Replace a finished run of the same name.")


@dataclass
class CellTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with this project's defaults (output under data/, no reporting)."""

    output_dir: str | None = flag("data/model/", "Folder of the runs (<output_dir>/<run_name>/).")
    report_to: None | str | list[str] = flag("none", "Experiment trackers (wandb, ...).")
    log_level_replica: str = flag("error", "Log level of the other processes under torchrun.",
                                  choices=list(trainer_log_levels))
    ddp_find_unused_parameters: bool | None = flag(False, "Under torchrun: DDP searches unused parameters.")

    def __post_init__(self) -> None:
        import torch

        for flag in ("fp16", "bf16"):
            if getattr(self, flag) and not torch.cuda.is_available() and not self.use_cpu:
                logger.warning("--%s needs a CUDA GPU; none found, training in float32.", flag)
                setattr(self, flag, False)
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                self.use_cpu = True  # accelerate runs CPU processes as DDP (gloo) only so
        super().__post_init__()


class TrainArgs(NamedTuple):
    """The parsed flags: model, data and Trainer arguments, and which flags were given."""

    model: ModelArguments
    data: DataArguments
    training: CellTrainingArguments
    given: frozenset[str] | None = None  # None: not parsed (a flag off its default counts)


_UNSET = object()


def parse_args(argv: Sequence[str] | None = None) -> TrainArgs:
    """Parse the command line (``argv`` None: ``sys.argv``) into the three dataclasses."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, CellTrainingArguments))
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    argv = renamed_flags(argv)
    parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    # Parsed again with every default replaced by a marker: what stays marked was not given
    # (argparse also takes abbreviations such as --top_k, so argv itself cannot tell).
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_known_args([])[0]), _UNSET))
    given = frozenset(k for k, v in vars(parser.parse_known_args(argv)[0]).items() if v is not _UNSET)
    return TrainArgs(*parsed, given)


def check_args(args: TrainArgs) -> None:
    """Fail early on flag values and combinations that cannot work."""
    m, d, t = args.model, args.data, args.training
    counts = [(t, "per_device_train_batch_size"), (t, "per_device_eval_batch_size"), (t, "gradient_accumulation_steps"),
              (d, "top_k_genes"), *([(d, "cells_per_example")] if d.multi_cell_column is not None else [])]
    for holder, name in counts:
        if getattr(holder, name) < 1:
            raise InputError(f"--{name} must be at least 1, not {getattr(holder, name)}.")
    if not (math.isfinite(t.learning_rate) and t.learning_rate > 0):
        raise InputError(f"--learning_rate must be a positive number, not {t.learning_rate}; the default is "
                         "5e-5 (fine-tuning), a small model from scratch takes about 1e-3.")
    if t.max_steps <= 0 and not (math.isfinite(t.num_train_epochs) and t.num_train_epochs > 0):
        raise InputError(f"--max_steps {t.max_steps} with --num_train_epochs {t.num_train_epochs} would "
                         "train no step; give a positive --max_steps or --num_train_epochs.")
    if d.max_seq_length is not None and d.max_seq_length < 8:
        raise InputError(f"--max_seq_length {d.max_seq_length} is too small; use at least 8.")
    if d.prompt_format not in PROMPT_FORMATS:
        raise InputError(f"--prompt_format {d.prompt_format!r}: choose {' or '.join(PROMPT_FORMATS)}.")
    if m.init_from_scratch and d.prompt_format == C2S_SCALE:
        raise InputError("--prompt_format c2s_scale is for fine-tuning a published (byte-pair tokenized) "
                         "model; a from-scratch word-level model uses --prompt_format ours.")
    if m.lora_r < 0 or (m.lora_r and m.init_from_scratch):
        raise InputError("--lora_r must be 0 (full training) or a positive rank, and LoRA adapts a "
                         "pretrained model: drop --init_from_scratch or --lora_r.")
    if m.merge_lora and not m.lora_r:
        raise InputError("--merge_lora True needs --lora_r R (there is no adapter to merge).")
    if m.init_from_scratch:
        if min(m.n_layer, m.n_embd, m.n_head, m.n_positions) < 1:
            raise InputError("--n_layer, --n_embd, --n_head and --n_positions must be positive.")
        if m.n_embd % m.n_head:
            raise InputError(f"--n_embd {m.n_embd} is not divisible by --n_head {m.n_head}; "
                             "choose sizes such as --n_embd 256 --n_head 4.")


@releasing_outputs
def main(args: TrainArgs) -> Path:
    """Train and write the model folder; returns its path. A full disk is one sentence."""
    try:
        return _train(args)
    except Exception as err:
        if not is_disk_full(err):
            raise
        # Named here: once main returns, the CLI would name the current folder's disk instead.
        where = getattr(err, "filename", None)
        folder = Path(where).parent if where else Path(args.training.output_dir or "data/model/")
        raise disk_full_error(folder, staged=False) from None


def _train(args: TrainArgs) -> Path:
    """``main`` without the full-disk sentence: the pipeline."""
    from transformers import Trainer

    from utils.transform.labels import refuse_unsafe_labels

    m, d, t = args.model, args.data, args.training
    # Sets up the device and, under torchrun, the process group (rank 0 shares its run name).
    device, rank_zero = t.device, run_folder.is_rank_zero(t)
    leave_group_at_exit()
    if not rank_zero:
        # Every process sees the same data and flags: rank 0's log speaks for all.
        logging.getLogger("cell2sentence").setLevel(logging.ERROR)
        import datasets

        datasets.disable_progress_bars()
    logger.info("Device %s, %d process(es).", device, t.world_size)
    run_dir, checkpoint = run_folder.resolve_run(args)
    earlier = resume_run(args, checkpoint)  # a resume continues the run as it was recorded
    check_args(args)
    flags = recorded_flags(args)  # before the run derives anything from them

    # The data: the cells, their labels and the task mix
    settle_inputs(Path(d.data_dir).parent, *([Path(m.model_name)] if m.model_name else []))
    do_eval = t.eval_strategy != "no" or t.do_eval
    dataset = train_data.load_cell_sentences(Path(d.data_dir), do_eval=do_eval)
    names = dataset["train"].column_names
    if d.label_columns is None and isinstance(earlier.get("label_columns"), str):
        d.label_columns = earlier["label_columns"]  # a resumed run keeps its label columns
    columns = train_data.resolve_label_columns(d.label_column, d.label_columns, names)
    d.label_column = columns[0]
    if d.label_columns is not None:
        d.label_columns = ",".join(columns)
    if d.multi_cell_column is not None and d.multi_cell_column not in names:
        raise InputError(f"The data has no column {d.multi_cell_column!r} given by --multi_cell_column (it "
                         f"has {', '.join(names)}); carry it into the dataset with "
                         "transform.py --obs_columns, or fix the name.")
    tasks = train_data.resolve_tasks(d, names)
    run_folder.prepare_run_dir(run_dir, checkpoint, overwrite=d.overwrite, delete=rank_zero)
    t.output_dir = str(run_dir / "checkpoints")
    t.run_name = run_dir.name
    seed_everything(t.seed)
    train_split = train_data.first_cells(dataset["train"], d.max_train_samples)
    cell_types = train_data.label_set(train_split, d.label_column)
    refuse_unsafe_labels(cell_types, column=d.label_column, path=d.data_dir)
    logger.info("Training on %s cells of %s (%s cell types); tasks %s.", f"{len(train_split):,}", d.data_dir,
                f"{len(cell_types):,}", ", ".join(f"{k}={v:.2f}" for k, v in tasks.items()))
    recipe = train_data.training_recipe(d, tasks, train_split, cell_types, earlier)

    # The model and its examples
    model, tokenizer = build_model_and_tokenizer(args, train_split, checkpoint)
    max_length = context_length(model, tokenizer, d.max_seq_length)
    if t.gradient_checkpointing:
        model.config.use_cache = False
    valid_split = train_data.first_cells(dataset["valid"], d.max_eval_samples) if do_eval else None
    train_examples, eval_examples, stats = train_data.build_examples(
        train_split, valid_split, args, tokenizer, tasks, max_length)
    lora_modules = model.peft_config["default"].target_modules if m.lora_r else ()
    record = effective_args(args, tasks, max_length, stats, tokenizer, checkpoint, run_dir, cell_types,
                            lora_modules, flags, facts=run_facts(m, d, dataset, train_split, valid_split),
                            earlier=earlier)
    run_folder.write_run_record(t, record, recipe)

    # Train, evaluate, publish (and push: after the publish, so that the card and recipe go too)
    hub = run_folder.hub_push(t, run_dir)
    trainer = Trainer(model=model, args=t, train_dataset=train_examples,
                      data_collator=CausalLMCollator(pad_token_id=tokenizer.pad_token_id),
                      eval_dataset=eval_examples, processing_class=tokenizer)
    if checkpoint is not None:
        logger.info("Resuming from %s.", checkpoint)
    train_result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics: dict[str, Any] = {**train_result.metrics, "global_step": trainer.state.global_step}
    if eval_examples is not None:
        metrics.update(run_folder.final_eval_metrics(trainer))
    trainer.log_metrics("train", metrics)
    if record.get("resumes"):
        record["resumes"][-1]["to_step"] = trainer.state.global_step
    run_folder.publish_run(trainer, tokenizer, run_dir, record, recipe, metrics, merge=m.merge_lora, hub=hub)
    return run_dir


if __name__ == "__main__":
    # A hub download without network retries for a minute; train.py asks quickly instead.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*")
    run_cli(main, parse_args)
