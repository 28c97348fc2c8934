"""Fine-tune a causal language model on cell sentences (or train a small one from scratch).

Input -> output: ``data/cell_sentences_hf/`` (the DatasetDict written by transform.py) ->
``data/model/<run_name>/``: a Hugging Face model directory (``save_pretrained`` model and
tokenizer) with ``train_args.json`` (the effective arguments, tasks and prompt format),
``recipe.json`` (what turns new cells into the sentences and prompts the model was trained on:
``utils.recipe.Recipe``; ``merged/`` of a LoRA run has the same records),
``train_results.json`` (train/eval metrics) and ``train_log.json`` (the logged losses).
Checkpoints go to ``<run>/checkpoints/``; the final files are written to a staging folder and
moved into place at the end, ``config.json`` last, so an interrupted run never looks finished.
Files of the user's in the run folder are never touched.

``--checkpoint latest --run_name R`` continues run R as it was recorded (its data, tasks and
weights, ``top_k_genes``, prompt format, model size and seed; a flag given with another value is
an error) and adds the resume to the run record's ``resumes``.

Each training cell becomes one example of a task drawn at random (seeded per cell):
conditional generation (cell type -> top K genes), unconditional generation (-> top K genes)
or cell-type prediction (top K genes -> cell type), worded by one of the paraphrased prompt
templates of ``utils/prompts.py``. The loss is taken on the answer tokens only.

Example (GPT-2 from the hub, as in the original project):

    python train.py --data_dir data/cell_sentences_hf/ --output_dir data/model/ \
        --model_name gpt2 --num_train_epochs 10 --gradient_accumulation_steps 4 \
        --per_device_train_batch_size 16 --per_device_eval_batch_size 16 --fp16 True \
        --logging_steps 32 --save_steps 500

Offline, a small GPT-2-style model with a word-level tokenizer built from the data:

    python train.py --init_from_scratch True --n_layer 4 --n_embd 256 --n_head 4 \
        --max_steps 2000 --per_device_train_batch_size 16 --run_name scratch-small

Several GPUs: ``torchrun --nproc_per_node 4 train.py ...`` or ``accelerate launch train.py ...``.
"""

if __name__ == "__main__":  # Ctrl-C or SIGTERM while the libraries below load: a line, no traceback
    import startup_guard

    startup_guard.install()

import contextlib
import json
import logging
import math
import os
import re
import shutil
import statistics
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from transformers import TrainingArguments
from transformers.training_args import trainer_log_levels

from utils.common import (
    InputError,
    check_can_write,
    claim_output_dir,
    disk_full_error,
    is_disk_full,
    publish_staged,
    release_output_dir,
    releasing_outputs,
    run_cli,
    seed_everything,
    settle_inputs,
    strict_json,
)
from utils.recipe import RECIPE_FILE, Recipe

logger = logging.getLogger("cell2sentence.train")

TRAIN_ARGS_FILE = "train_args.json"
RESULTS_FILE = "train_results.json"
LOG_FILE = "train_log.json"
RUN_ARGS_FILE = "run_args.json"  # inside <run>/checkpoints, read when resuming
MERGED_DIR = "merged"
# What a run writes into its folder besides model, adapter and tokenizer files
# (utils.model_files names those): a later run on the folder may replace or remove these,
# never anything else.
RUN_OUTPUTS = frozenset({
    TRAIN_ARGS_FILE, RESULTS_FILE, LOG_FILE, RECIPE_FILE, MERGED_DIR, "config.json",
    "generation_config.json", "adapter_config.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "training_args.bin",
})
_SHARD = re.compile(r"(model|pytorch_model|adapter_model)-\d+-of-\d+\.(safetensors|bin)")
# The flags that make a run what it is: resuming restores them from the run's record.
# The optimization a resume keeps unless given again (then used, with a warning): a different
# batch size would also make the Trainer skip the wrong number of batches of the epoch.
TRAINING_FLAGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay",
                  "warmup_steps", "warmup_ratio", "max_grad_norm", "lr_scheduler_type")
MODEL_FLAGS = ("model_name", "init_from_scratch", "n_layer", "n_embd", "n_head", "n_positions",
               "min_gene_count", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
DATA_FLAGS = ("data_dir", "top_k_genes", "tasks", "task_weights", "cell_type_column",
              "prompt_format", "organism", "max_seq_length", "max_train_samples",
              "max_eval_samples")
OFFLINE_HINT = (
    "pass a local model directory with --model_name (a folder written by save_pretrained or "
    "an earlier train.py run), or train a small model from scratch with --init_from_scratch True"
)


@dataclass
class ModelArguments:
    """Which model to fine-tune, or the size of one to train from scratch."""

    model_name: str = field(
        default="gpt2",
        metadata={"help": "Hub model name (needs internet) or local model directory."},
    )
    init_from_scratch: bool = field(
        default=False,
        metadata={
            "help": "Train a randomly initialized GPT-2-style model with a word-level tokenizer "
            "built from the training data (one token per gene); works offline."
        },
    )
    n_layer: int = field(default=4, metadata={"help": "From scratch: transformer layers."})
    n_embd: int = field(default=256, metadata={"help": "From scratch: embedding size."})
    n_head: int = field(default=4, metadata={"help": "From scratch: attention heads."})
    n_positions: int = field(
        default=1024, metadata={"help": "From scratch: context length in tokens."}
    )
    min_gene_count: int = field(
        default=1,
        metadata={
            "help": "From scratch: genes among the top genes of fewer training cells than this "
            "map to <unk>."
        },
    )
    checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Resume from this checkpoint folder (<run>/checkpoints/checkpoint-N), or "
            "'latest' for the newest one of --run_name."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={"help": "LoRA rank; > 0 trains LoRA adapters only (peft), 0 the full model."},
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA inputs."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated layer names LoRA adapts (default per architecture: gpt2 "
            "c_attn,c_proj,c_fc; gpt_neox query_key_value,dense,...; llama/gemma q_proj,k_proj,"
            "v_proj,o_proj,gate_proj,up_proj,down_proj)."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "With --lora_r: also write the merged full model to <run>/merged/."},
    )


@dataclass
class DataArguments:
    """Where the cell sentences are and how they become training examples."""

    data_dir: str = field(
        default="data/cell_sentences_hf/",
        metadata={"help": "DatasetDict folder written by transform.py (train/valid/test)."},
    )
    top_k_genes: int = field(
        default=100, metadata={"help": "Genes per example (the first K of each sentence)."}
    )
    tasks: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated tasks among conditional_generation, "
            "unconditional_generation, cell_type_prediction. Default: all three when the data "
            "has cell types, else unconditional_generation."
        },
    )
    task_weights: str | None = field(
        default=None,
        metadata={"help": "Comma-separated weights of --tasks (default: equal)."},
    )
    cell_type_column: str | None = field(
        default=None,
        metadata={
            "help": "Column with the cell-type labels (default: cell_type when the data has "
            "it, else training without labels); a named column must exist."
        },
    )
    prompt_format: str = field(
        default="ours",
        metadata={
            "help": "Prompt format: ours (utils/prompts.py) or c2s_scale (the published C2S "
            "models' prompts; use it to fine-tune one of them)."
        },
    )
    organism: str = field(
        default="Homo sapiens", metadata={"help": "The {organism} of c2s_scale prompts."}
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest example in tokens (default: the model's context); longer ones "
            "lose genes, never their answer."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training cells (for quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on only the first N validation cells."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes that tokenize the examples."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing finished run of the same name."}
    )


@dataclass
class CellTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with this project's defaults (output under data/, no reporting)."""

    output_dir: str | None = field(
        default="data/model/",
        metadata={"help": "Folder of the runs; the model goes to <output_dir>/<run_name>/."},
    )
    report_to: None | str | list[str] = field(
        default="none",
        metadata={"help": "Experiment trackers to report to (wandb, tensorboard, ...); none."},
    )
    log_level_replica: str = field(
        default="error",
        metadata={
            "help": "Log level of the other processes under torchrun (rank 0 logs for all).",
            "choices": list(trainer_log_levels),
        },
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "Under torchrun: let DDP search for parameters without a gradient in every "
            "step (slower; every parameter of a causal LM gets one, LoRA's frozen ones are left "
            "out anyway)."
        },
    )

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
    argv = list(argv) if argv is not None else None
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False
    )
    # Parsed again with every default replaced by a marker: what stays marked was not given
    # (argparse also takes abbreviations such as --top_k, so argv itself cannot tell).
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_known_args([])[0]), _UNSET))
    given = frozenset(k for k, v in vars(parser.parse_known_args(argv)[0]).items() if v is not _UNSET)
    return TrainArgs(model_args, data_args, training_args, given)


# --------------------------------------------------------------------------- checks


def check_args(args: TrainArgs) -> None:
    """Fail early on flag values and combinations that cannot work."""
    m, d, t = args.model, args.data, args.training
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps"):
        if getattr(t, flag) < 1:
            raise InputError(f"--{flag} must be at least 1, not {getattr(t, flag)}.")
    if not (math.isfinite(t.learning_rate) and t.learning_rate > 0):
        raise InputError(
            f"--learning_rate must be a positive number, not {t.learning_rate}; the default is "
            "5e-5 (fine-tuning), a small model from scratch takes about 1e-3."
        )
    if t.max_steps <= 0 and not (math.isfinite(t.num_train_epochs) and t.num_train_epochs > 0):
        raise InputError(
            f"--max_steps {t.max_steps} with --num_train_epochs {t.num_train_epochs} would train "
            "no step; give a positive --max_steps or --num_train_epochs."
        )
    if d.top_k_genes < 1:
        raise InputError(f"--top_k_genes must be at least 1, not {d.top_k_genes}.")
    if d.max_seq_length is not None and d.max_seq_length < 8:
        raise InputError(f"--max_seq_length {d.max_seq_length} is too small; use at least 8.")
    from utils.prompts import C2S_SCALE, PROMPT_FORMATS

    if d.prompt_format not in PROMPT_FORMATS:
        raise InputError(
            f"--prompt_format {d.prompt_format!r}: choose {' or '.join(PROMPT_FORMATS)}."
        )
    if m.init_from_scratch and d.prompt_format == C2S_SCALE:
        raise InputError(
            "--prompt_format c2s_scale is for fine-tuning a published (byte-pair tokenized) "
            "model; a from-scratch word-level model uses --prompt_format ours."
        )
    if m.lora_r < 0 or (m.lora_r and m.init_from_scratch):
        raise InputError(
            "--lora_r must be 0 (full training) or a positive rank, and LoRA adapts a "
            "pretrained model: drop --init_from_scratch or --lora_r."
        )
    if m.merge_lora and not m.lora_r:
        raise InputError("--merge_lora True needs --lora_r R (there is no adapter to merge).")
    if m.init_from_scratch:
        if min(m.n_layer, m.n_embd, m.n_head, m.n_positions) < 1:
            raise InputError("--n_layer, --n_embd, --n_head and --n_positions must be positive.")
        if m.n_embd % m.n_head:
            raise InputError(
                f"--n_embd {m.n_embd} is not divisible by --n_head {m.n_head}; "
                "choose sizes such as --n_embd 256 --n_head 4."
            )


def load_cell_sentences(data_dir: Path) -> Any:
    """The DatasetDict of transform.py, checked for a train split and a sentence column."""
    from datasets import DatasetDict, load_from_disk

    if not data_dir.is_dir():
        raise InputError(
            f"Dataset folder {data_dir} does not exist; run transform.py first or pass "
            "--data_dir with its cell_sentences_hf/ folder."
        )
    try:
        dataset = load_from_disk(str(data_dir))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise InputError(
            f"{data_dir} is not a dataset saved with save_to_disk ({err}); pass the "
            "cell_sentences_hf/ folder written by transform.py."
        ) from None
    if not isinstance(dataset, DatasetDict) or "train" not in dataset:
        raise InputError(
            f"{data_dir} holds no 'train' split; pass the cell_sentences_hf/ folder written "
            "by transform.py (splits train/valid/test)."
        )
    if "cell_sentence" not in dataset["train"].column_names:
        raise InputError(
            f"The train split of {data_dir} has no 'cell_sentence' column "
            f"(columns: {', '.join(dataset['train'].column_names)})."
        )
    return dataset


def resolve_label_column(requested: str | None, columns: Sequence[str]) -> str:
    """The label column: ``cell_type`` by default; one named with --cell_type_column must
    exist (a typo would otherwise train an unconditional model without a word)."""
    if requested is not None and requested not in columns:
        raise InputError(
            f"The data has no column {requested!r} given by --cell_type_column (it has "
            f"{', '.join(columns)}); fix the name or leave the flag out."
        )
    return requested or "cell_type"


def resolve_tasks(data_args: DataArguments, columns: Sequence[str]) -> dict[str, float]:
    """The task mix: the flags, or all tasks the data allows."""
    from utils.prompts import PROMPT_FORMATS, prompt_format
    from utils.training import TASKS, TYPED_TASKS, UNCONDITIONAL_GENERATION, parse_tasks

    label = data_args.cell_type_column or "cell_type"
    has_types = label in columns
    fmt = prompt_format(data_args.prompt_format)  # a format may lack some tasks' prompts
    if data_args.tasks is None:
        if has_types:
            return parse_tasks(",".join(t for t in TASKS if t in fmt.tasks), data_args.task_weights)
        if UNCONDITIONAL_GENERATION not in fmt.tasks:
            raise InputError(
                f"The {fmt.name} format has only cell-type tasks, but the data has no "
                f"{label!r} column; pass --cell_type_column."
            )
        logger.warning(
            "The data has no %r column; training unconditional_generation only.",
            label,
        )
        return parse_tasks(UNCONDITIONAL_GENERATION, data_args.task_weights)
    tasks = parse_tasks(data_args.tasks, data_args.task_weights)
    lacking = [t for t in tasks if t not in fmt.tasks]
    if lacking:
        others = [n for n in PROMPT_FORMATS if set(tasks) <= set(prompt_format(n).tasks)]
        raise InputError(
            f"The {fmt.name} prompt format has no {', '.join(lacking)} prompts; drop it "
            f"from --tasks{' or use --prompt_format ' + ' or '.join(others) if others else ''}."
        )
    typed = [t for t in tasks if t in TYPED_TASKS]
    if typed and not has_types:
        raise InputError(
            f"Task(s) {', '.join(typed)} need cell types, but the data has no "
            f"{label!r} column; pass --cell_type_column with the label "
            "column or --tasks unconditional_generation."
        )
    return tasks


# --------------------------------------------------------------------------- run folder


def _rank_zero(training_args: TrainingArguments) -> bool:
    return training_args.process_index == 0


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every process (identity when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def default_run_name(model_args: ModelArguments) -> str:
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
    from utils.model_files import checkpoint_problem

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


def resolve_run(args: TrainArgs) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None: a fresh run)."""
    from utils.model_files import checkpoint_problem

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


def read_run_record(checkpoint: Path) -> tuple[dict[str, Any], Path] | None:
    """The record of the run ``checkpoint`` belongs to and its path: ``run_args.json`` beside
    the checkpoints, else the run's ``train_args.json``; None when it has neither."""
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
            return record, path
    return None


def recorded_flags(args: TrainArgs) -> dict[str, Any]:
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
        flags.pop("cell_type_column", None)  # the default it recorded names no column of the data
    if isinstance(flags.get("tasks"), list):
        flags["tasks"] = ",".join(flags["tasks"])
    if isinstance(flags.get("task_weights"), list):
        flags["task_weights"] = ",".join(repr(float(w)) for w in flags["task_weights"])
    return flags


def _given(args: TrainArgs) -> frozenset[str]:
    """The flags given on the command line; for arguments made in Python, those off their
    defaults."""
    if args.given is not None:
        return args.given
    seed_default = CellTrainingArguments.__dataclass_fields__["seed"].default
    current, defaults = recorded_flags(args), {
        **asdict(ModelArguments()), **asdict(DataArguments()), "seed": seed_default}
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


def restore_run(args: TrainArgs, record: dict[str, Any], source: Path) -> None:
    """Continue the recorded run as it was: its model and data flags and seed replace the
    ones of ``args``; a flag given on the command line with another value is one sentence.

    The recorded value counts as given either as the run had it (``--max_seq_length 2000``)
    or as the run derived it (the context of 1024 it became, the label column ``cell_type``).
    """
    from utils.training import parse_tasks

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


def _restore_training(t: TrainingArguments, recorded: dict[str, Any], given: frozenset[str], source: Path) -> None:
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
                logger.warning("--%s %s replaces the %s the run being resumed was trained with (%s).", name, value,
                               before, source)
            continue
        setattr(t, name, SchedulerType(before) if name == "lr_scheduler_type" else before)


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


def is_run_output(name: str) -> bool:
    """Whether ``name`` in a run folder is a file train.py writes there (a model, adapter or
    tokenizer file, a record, ``merged/``); anything else is the user's."""
    from utils.model_files import TOKENIZER_FILES, WEIGHT_FILES

    return name in RUN_OUTPUTS or name in WEIGHT_FILES or name in TOKENIZER_FILES or bool(
        _SHARD.fullmatch(name))


def publish(staging: Path, run_dir: Path) -> None:
    """Move the staged final files into ``run_dir`` by renames, ``config.json`` (or a LoRA
    run's ``adapter_config.json``) last and its old one aside first, then remove the files an
    earlier run wrote that this one did not write again (a full model's weights when this run
    is a LoRA adapter, say). The user's own files in the folder stay.

    Without it a folder does not load as a model, so a crash in between never leaves
    something that looks like a finished model; the next run on the folder finishes the
    publish (``utils.common.publish_staged``).
    """
    names = sorted(p.name for p in staging.iterdir())
    published = publish_staged(staging, run_dir, ["config.json", "adapter_config.json", *names])
    for old in sorted(run_dir.iterdir()):
        if old.name not in published and is_run_output(old.name):
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    release_output_dir(run_dir)


# --------------------------------------------------------------------------- model


def iter_top_genes(dataset: Any, top_k: int, batch_size: int = 10_000) -> Iterator[str]:
    """The first ``top_k`` genes of every sentence, batch by batch (no full copy)."""
    for batch in dataset.select_columns(["cell_sentence"]).iter(batch_size=batch_size):
        for sentence in batch["cell_sentence"]:
            yield " ".join(sentence.split()[:top_k])


def build_model_and_tokenizer(
    args: TrainArgs, train_split: Any, checkpoint: Path | None
) -> tuple[Any, Any]:
    """Load the pretrained model, the checkpoint's, or build a small one from scratch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    from utils.prompts import prompt_words
    from utils.tokenizer import build_word_tokenizer
    from utils.training import from_pretrained, has_label

    m, d = args.model, args.data
    if checkpoint is not None and m.lora_r:
        # An adapter checkpoint: the base model + fresh adapters; Trainer restores the adapter
        # weights, optimizer and step from the checkpoint.
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, m.model_name,
                                offline_hint=OFFLINE_HINT, dtype=torch.float32)
    elif checkpoint is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, str(checkpoint),
                                offline_hint=OFFLINE_HINT, dtype=torch.float32)
    elif m.init_from_scratch:
        labels: list[str] = []
        if d.cell_type_column in train_split.column_names:
            labels = sorted(
                {str(x) for x in train_split.unique(d.cell_type_column) if has_label(x)}
            )
        tokenizer = build_word_tokenizer(
            iter_top_genes(train_split, d.top_k_genes),
            extra_words=prompt_words(labels, max_number=max(1024, d.top_k_genes)),
            min_count=m.min_gene_count,
            model_max_length=m.n_positions,
        )
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=m.n_positions,
            n_embd=m.n_embd,
            n_layer=m.n_layer,
            n_head=m.n_head,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(config)
        logger.info(
            "New GPT-2-style model: %d layers, %d dims, %d heads, %s parameters, vocabulary "
            "of %s words.",
            m.n_layer, m.n_embd, m.n_head, f"{model.num_parameters():,}", f"{len(tokenizer):,}",
        )
    else:
        tokenizer = from_pretrained(
            AutoTokenizer.from_pretrained, m.model_name, offline_hint=OFFLINE_HINT
        )
        model = from_pretrained(
            AutoModelForCausalLM.from_pretrained,
            m.model_name,
            offline_hint=OFFLINE_HINT,
            dtype=torch.float32,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise InputError(f"The tokenizer of {m.model_name} has no EOS token; pick another model.")
    tokenizer.padding_side = "right"
    if getattr(model, "loss_type", None) is None:
        # GPT-2's class name names no loss; this is the loss transformers falls back to, named
        # here so that it does not warn about it in every process.
        model.loss_type = "ForCausalLM"
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if m.lora_r:
        model = add_lora(model, m, gradient_checkpointing=args.training.gradient_checkpointing)
    return model, tokenizer


def add_lora(model: Any, m: ModelArguments, *, gradient_checkpointing: bool) -> Any:
    """Wrap ``model`` with LoRA adapters (only they train); the adapter names its base model
    by an absolute path when it is a local folder, so the run folder loads from anywhere."""
    from utils.lora import target_modules, wrap_with_lora

    modules = target_modules(model.config.model_type, m.lora_target_modules)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need inputs that require grad
    model = wrap_with_lora(model, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                           modules=modules)
    base = Path(m.model_name).expanduser()
    model.peft_config["default"].base_model_name_or_path = (
        str(base.resolve()) if base.is_dir() else m.model_name
    )
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "LoRA r=%d alpha=%g on %s: %s of %s parameters train (%.2f%%).",
        m.lora_r, m.lora_alpha, ",".join(modules), f"{trainable:,}", f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return model


def context_length(model: Any, tokenizer: Any, requested: int | None) -> int:
    """The longest example: the model's context, or less when asked."""
    config = model.config
    limit = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", None
    )
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit and tok_limit < 1_000_000:
        limit = min(limit, tok_limit) if limit else tok_limit
    limit = limit or 1024
    if requested is None:
        return limit
    if requested > limit:
        logger.warning(
            "--max_seq_length %d exceeds the model's context of %d tokens; using %d.",
            requested, limit, limit,
        )
        return limit
    return requested


# --------------------------------------------------------------------------- data


def tokenize_split(
    split: Any, name: str, args: TrainArgs, tokenizer: Any, tasks: dict[str, float],
    max_length: int,
) -> Any:
    """One tokenized example per cell (input_ids, labels, task)."""
    from utils.prompts import prompt_format
    from utils.training import tokenize_batch

    d = args.data
    return split.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=split.column_names,
        keep_in_memory=True,  # never write cache files into transform.py's output folder
        num_proc=d.preprocessing_num_workers,
        desc=f"Building {name} examples",
        fn_kwargs={
            "tokenizer": tokenizer,
            "tasks": tasks,
            "top_k": d.top_k_genes,
            "max_length": max_length,
            "seed": args.training.seed,
            "split": name,
            "cell_type_column": d.cell_type_column,
            "prompt_format": prompt_format(d.prompt_format, organism=d.organism),
        },
    )


def describe_examples(examples: Any) -> dict[str, Any]:
    """Counts per task and token lengths of tokenized examples."""
    lengths = [len(ids) for ids in examples["input_ids"]]
    answer = [sum(1 for x in labels if x != -100) for labels in examples["labels"]]
    return {
        "n_examples": len(lengths),
        "task_counts": dict(sorted(Counter(examples["task"]).items())),
        "avg_tokens_per_example": round(statistics.fmean(lengths), 2) if lengths else 0.0,
        "max_tokens_per_example": max(lengths, default=0),
        "avg_answer_tokens": round(statistics.fmean(answer), 2) if answer else 0.0,
    }


# --------------------------------------------------------------------------- main


def effective_args(
    args: TrainArgs, tasks: dict[str, float], max_length: int, stats: dict[str, Any],
    tokenizer: Any, checkpoint: Path | None, run_dir: Path, cell_types: list[str],
    lora_modules: Sequence[str] = (), flags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What train_args.json records: every flag plus what the run derived from them, and
    (``flags``) the flags a resume restores as they were given."""
    from utils.prompts import prompt_format

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
            "prompt": "utils.training.encode_prompt(tokenizer, prompt, format)",
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "prompts_module": "utils/prompts.py",
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


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


@releasing_outputs
def main(args: TrainArgs) -> Path:
    """Train and write the model folder; returns its path.

    A full disk on the way is one sentence naming the output's disk and its free space.
    """
    try:
        return _train(args)
    except Exception as err:
        if not is_disk_full(err):
            raise
        # Named here: once main returns, the run's folder is no longer held, and the CLI
        # would name the current folder's disk instead.
        where = getattr(err, "filename", None)
        folder = Path(where).parent if where else Path(args.training.output_dir or "data/model/")
        raise disk_full_error(folder, staged=False) from None


def _train(args: TrainArgs) -> Path:
    """``main`` without the full-disk sentence."""
    from transformers import Trainer

    from utils.labels import refuse_unsafe_labels
    from utils.training import TYPED_TASKS, CausalLMCollator, has_label

    m, d, t = args.model, args.data, args.training
    # Sets up the device and, under torchrun/accelerate, the process group, so that rank 0
    # can share its run name and alone write files.
    device = t.device
    if not _rank_zero(t):
        # Every process sees the same data and flags: rank 0's log speaks for all.
        logging.getLogger("cell2sentence").setLevel(logging.ERROR)
        import datasets

        datasets.disable_progress_bars()
    logger.info("Device %s, %d process(es).", device, t.world_size)
    run_dir, checkpoint = resolve_run(args)
    earlier: dict[str, Any] = {}
    if checkpoint is not None:
        found = read_run_record(checkpoint)
        if found is None:
            logger.warning("%s has no run record (%s); resuming with the flags as given.",
                           checkpoint, checkpoint.parent / RUN_ARGS_FILE)
        else:
            earlier = found[0]
            restore_run(args, *found)
    check_args(args)
    flags = recorded_flags(args)  # before the run derives anything from them
    settle_inputs(Path(d.data_dir).parent, *([Path(m.model_name)] if m.model_name else []))
    dataset = load_cell_sentences(Path(d.data_dir))
    d.cell_type_column = resolve_label_column(d.cell_type_column, dataset["train"].column_names)
    tasks = resolve_tasks(d, dataset["train"].column_names)
    do_eval = t.eval_strategy != "no" or t.do_eval
    if do_eval and ("valid" not in dataset or len(dataset["valid"]) == 0):
        raise InputError(
            f"Evaluation was asked for, but {d.data_dir} has no or an empty 'valid' split; "
            "drop --eval_strategy or pass a dataset with a valid split."
        )
    if len(dataset["train"]) == 0:
        raise InputError(f"The train split of {d.data_dir} is empty; nothing to train on.")
    prepare_run_dir(run_dir, checkpoint, overwrite=d.overwrite, delete=_rank_zero(t))
    t.output_dir = str(run_dir / "checkpoints")
    t.run_name = run_dir.name
    seed_everything(t.seed)

    train_split = dataset["train"]
    if d.max_train_samples is not None:
        train_split = train_split.select(range(min(d.max_train_samples, len(train_split))))
    cell_types: list[str] = []
    if d.cell_type_column in train_split.column_names:
        cell_types = sorted(
            {str(x) for x in train_split.unique(d.cell_type_column) if has_label(x)}
        )
        refuse_unsafe_labels(cell_types, column=d.cell_type_column, path=d.data_dir)
    logger.info(
        "Training on %s cells of %s (%s cell types); tasks %s.",
        f"{len(train_split):,}", d.data_dir, f"{len(cell_types):,}",
        ", ".join(f"{k}={v:.2f}" for k, v in tasks.items()),
    )
    # The labels are part of the recipe only when a task taught them.
    labelled = cell_types and any(task in TYPED_TASKS for task in tasks)
    recipe = Recipe.for_training(
        Path(d.data_dir).resolve(), prompt_format=d.prompt_format, organism=d.organism,
        top_k_genes=d.top_k_genes, tasks=tasks,
        label_columns={d.cell_type_column: cell_types} if labelled else {},
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

    model, tokenizer = build_model_and_tokenizer(args, train_split, checkpoint)
    max_length = context_length(model, tokenizer, d.max_seq_length)
    if t.gradient_checkpointing:
        model.config.use_cache = False

    with t.main_process_first(desc="building examples"):
        try:
            train_examples = tokenize_split(train_split, "train", args, tokenizer, tasks,
                                            max_length)
            eval_examples = None
            if do_eval:
                valid = dataset["valid"]
                if d.max_eval_samples is not None:
                    valid = valid.select(range(min(d.max_eval_samples, len(valid))))
                eval_examples = tokenize_split(valid, "valid", args, tokenizer, tasks,
                                               max_length)
        except ValueError as err:
            if "does not fit" in str(err):
                raise InputError(str(err)) from None
            raise
    stats = describe_examples(train_examples)
    if stats["n_examples"] == 0:
        raise InputError(
            f"No training example could be built: no cell of {d.data_dir} has a "
            f"{d.cell_type_column!r} label; add unconditional_generation to --tasks."
        )
    if stats["n_examples"] < len(train_split):
        logger.warning(
            "%s training cells without a cell type were left out (their tasks need one).",
            f"{len(train_split) - stats['n_examples']:,}",
        )
    logger.info(
        "%s training examples (%s), %.1f tokens per example on average (longest %d, context "
        "%d), %.1f answer tokens.",
        f"{stats['n_examples']:,}",
        ", ".join(f"{k} {v:,}" for k, v in stats["task_counts"].items()),
        stats["avg_tokens_per_example"], stats["max_tokens_per_example"], max_length,
        stats["avg_answer_tokens"],
    )
    train_examples = train_examples.remove_columns("task")
    if eval_examples is not None:
        eval_examples = eval_examples.remove_columns("task")

    lora_modules = model.peft_config["default"].target_modules if m.lora_r else ()
    record = effective_args(args, tasks, max_length, stats, tokenizer, checkpoint, run_dir,
                            cell_types, lora_modules, flags)
    if checkpoint is not None and earlier:
        # The run record is extended, never replaced: what it held stays, the resume is added.
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        entry = resume_entry(record, earlier, checkpoint, int(state["global_step"]))
        kept = {k: v for k, v in earlier.items() if k not in ("recipe", "resumes")}
        record = {**kept, **record, "resumes": [*earlier.get("resumes", []), entry]}
    run_record = Path(t.output_dir) / RUN_ARGS_FILE
    if _rank_zero(t):
        Path(t.output_dir).mkdir(parents=True, exist_ok=True)
        _write_json(run_record, {**record, "recipe": recipe.to_dict()})

    trainer = Trainer(
        model=model,
        args=t,
        data_collator=CausalLMCollator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=train_examples,
        eval_dataset=eval_examples,
        processing_class=tokenizer,
    )
    if checkpoint is not None:
        logger.info("Resuming from %s.", checkpoint)
    train_result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    metrics: dict[str, Any] = dict(train_result.metrics)
    metrics["global_step"] = trainer.state.global_step
    if eval_examples is not None:
        last_eval = [h for h in trainer.state.log_history if "eval_loss" in h]
        if last_eval and last_eval[-1].get("step") == trainer.state.global_step:
            eval_metrics = dict(last_eval[-1])  # evaluated at the last step already
            eval_metrics.pop("step", None)
            eval_metrics.pop("epoch", None)
        else:
            eval_metrics = trainer.evaluate()
        with contextlib.suppress(OverflowError):
            eval_metrics["eval_perplexity"] = math.exp(eval_metrics["eval_loss"])
        metrics.update(eval_metrics)
    trainer.log_metrics("train", metrics)
    if record.get("resumes"):
        record["resumes"][-1]["to_step"] = trainer.state.global_step

    # Every process takes part in saving (sharded/DeepSpeed weights are gathered); only
    # rank 0 writes files.
    staging = run_dir / ".staging-final"
    if _rank_zero(t) and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))
        if _rank_zero(t):
            save_final_files(staging, trainer, tokenizer, record, recipe, metrics,
                             merge=m.merge_lora)
            _write_json(run_record, {**record, "recipe": recipe.to_dict()})
            publish(staging, run_dir)
    except BaseException:
        if _rank_zero(t):  # a full disk, Ctrl-C: the half-written staging goes at once
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if _rank_zero(t):
        logger.info(
            "Wrote the model to %s after %s steps (train loss %.4f%s).",
            run_dir, f"{trainer.state.global_step:,}", metrics.get("train_loss", float("nan")),
            f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "",
        )
    trainer.accelerator.wait_for_everyone()
    return run_dir


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
        _write_json(folder / TRAIN_ARGS_FILE, record)
        recipe.write(folder)
    (staging / RESULTS_FILE).write_text(strict_json(metrics, indent=2, sort_keys=True) + "\n")
    (staging / LOG_FILE).write_text(strict_json(trainer.state.log_history, indent=2) + "\n")


if __name__ == "__main__":
    # A hub download without network retries for a minute; train.py asks quickly instead.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*")
    run_cli(main, parse_args)
