"""Is a model folder or a Trainer checkpoint whole? Checked before loading, naming the file missing or
damaged (else a part copy fails deep in a library); headers and checksums only, tensors are never read."""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

from utils.cli import InputError
from utils.models.lora import ADAPTER_CONFIG

#: Files holding a peft adapter's weights (a LoRA run folder has one of them).
ADAPTER_WEIGHT_FILES: tuple[str, ...] = ("adapter_model.safetensors", "adapter_model.bin")
#: Files holding a model's weights, whole or as the index of shards (any one is enough).
WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                 "pytorch_model.bin.index.json", *ADAPTER_WEIGHT_FILES)
#: Files of which a saved tokenizer has at least one (fast, BPE, sentencepiece, WordPiece).
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model",
                                    "vocab.txt", "sentencepiece.bpe.model")


def file_problem(path: Path) -> str | None:
    """What is wrong with one saved file (None: it reads back), e.g. ``"is missing"``: the safetensors
    header, the JSON (an index with its shards), a torch zip's CRCs and weights-only load."""
    if not path.is_file():
        return "is missing"
    if path.stat().st_size == 0:
        return "is empty"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy"):
                pass
        except Exception as err:  # safetensors raises its own error type for every defect
            return f"is truncated or damaged ({err})"
        return None
    if path.suffix == ".json":
        try:
            content = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            return f"is truncated or damaged (not valid JSON: {err})"
        if path.name.endswith(".index.json") and isinstance(content, dict):
            for shard in sorted(set(content.get("weight_map", {}).values())):
                if problem := file_problem(path.parent / shard):
                    return f"lists the shard {shard}, which {problem}"
        return None
    if path.suffix in (".pt", ".pth", ".bin"):
        with path.open("rb") as fh:
            head = fh.read(4)
        if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            return None  # torch's legacy format, a pickle, has no checksums: its loader judges it
        if not head.startswith(b"PK\x03\x04"):  # torch's zip format (since 1.6), with CRCs
            return "is no file saved by torch (neither its zip nor its legacy format)"
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"is truncated or damaged ({err})"
        if bad:
            return f"is damaged (member {bad} fails its checksum)"
        import torch
        from transformers.trainer_pt_utils import safe_globals

        try:
            with safe_globals():  # the Trainer's load: weights only, with the numpy types of rng_state.pth
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            what = f"the Python object {found.group(1)}" if found else "Python objects"
            return (f"is refused by torch's safe weights-only loader: it holds {what} besides tensors, "
                    "which could run code when loaded (re-save it with tensors only, or delete it)")
        except (RuntimeError, OSError, EOFError, ValueError) as err:
            return f"is truncated or damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def check_model_dir(path: Path) -> None:
    """Fail with one sentence when a local model folder has no weights or no tokenizer (an
    adapter folder may use its base model's), or a weight, config or tokenizer file is damaged."""
    weights = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise InputError(f"{path} holds no model weights (none of {', '.join(WEIGHT_FILES[:3])}, ...); the "
                         "folder is an incomplete copy or an unfinished save: copy the whole model folder "
                         "or train it again.")
    tokenizer = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not tokenizer and not (path / "adapter_config.json").is_file():
        raise InputError(f"{path} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES[:4])}, ...); "
                         "copy them from where the model came from (tokenizer.save_pretrained writes them).")
    for name in [*weights, "config.json", "tokenizer.json", "tokenizer_config.json"]:
        if (path / name).is_file() and (problem := file_problem(path / name)):
            raise InputError(f"{path / name} {problem}; copy or save the model folder again.")


def check_adapter_dir(path: Path) -> str:
    """The base model's name of a peft adapter folder (a LoRA run); fails with one sentence when its
    config or adapter weights are missing or damaged, or its local base model folder is not there."""
    weights = [name for name in ADAPTER_WEIGHT_FILES if (path / name).is_file()]
    for name in [ADAPTER_CONFIG, *weights[:1]]:
        if problem := file_problem(path / name):
            raise InputError(f"{path / name} {problem}; copy or save the adapter folder again.")
    if not weights:
        raise InputError(f"{path} is a LoRA adapter folder whose adapter weights "
                         f"{path / ADAPTER_WEIGHT_FILES[0]} are missing; the folder is an incomplete copy or "
                         "an unfinished save: copy the whole run folder or train it again.")
    base = str(json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or "")
    if not base:
        raise InputError(f"{path}/{ADAPTER_CONFIG} names no base model.")
    base_path = Path(base).expanduser()
    # An absolute or ./-relative name is a folder; anything else may be a hub name (the loader's errors).
    if (base_path.is_absolute() or base.startswith((".", "~"))) and not base_path.is_dir():
        raise InputError(f"{path} is a LoRA adapter of the base model {base}, which does not exist here; put "
                         f"the base model there or set base_model_name_or_path in {path / ADAPTER_CONFIG} to "
                         "where it is.")
    return base


def checkpoint_problem(folder: Path) -> str | None:
    """Why the Trainer checkpoint ``folder`` cannot be resumed from (None: it is complete): every
    file the resume reads is checked (``trainer_state.json``, written last, first)."""
    state_path = folder / "trainer_state.json"
    if problem := file_problem(state_path):
        return f"{state_path} {problem}"
    state = json.loads(state_path.read_text())
    step = folder.name.rpartition("-")[2]
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{state_path} holds no global_step"
    if step.isdigit() and int(step) != state["global_step"]:
        return f"{state_path} is for step {state['global_step']}, not {step}"
    weights = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        return f"{folder} holds no model weights (none of {', '.join(WEIGHT_FILES[:3])}, ...)"
    # DeepSpeed and FSDP keep the optimizer in folders of their own.
    sharded = any(p.is_dir() for p in [*folder.glob("global_step*"), *folder.glob("optimizer*")])
    resume = [] if sharded else ["optimizer.pt", "scheduler.pt"]  # to resume exactly where it stopped
    others = sorted(p.name for p in folder.glob("rng_state*.pth")) + ["scaler.pt"]
    for name in [*weights, *resume, *others]:
        path = folder / name
        if name in others and not path.is_file():
            continue  # optional: written only by some runs (mixed precision, several ranks)
        if problem := file_problem(path):
            if name == "scheduler.pt" and problem == "is missing":
                problem += " (resuming would restart the learning-rate schedule)"
            return f"{path} {problem}"
    return None
