"""Loading models and tokenizers: local folders, hub names (online or offline), peft adapters, integrity checks."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from utils.cli import InputError
from utils.models.files import TOKENIZER_FILES, check_adapter_dir, check_model_dir
from utils.models.lora import ADAPTER_CONFIG, is_adapter_dir


def hub_unreachable(timeout: float = 3.0) -> bool:
    """Whether the user switched the hub off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) or no TCP connection
    to it (``HF_ENDPOINT``) opens within ``timeout`` seconds."""
    if any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return False
    except OSError:
        return True


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``org/name`` or ``name``)."""
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1


def from_pretrained(loader: Callable[..., Any], name: str, *,
                    offline_hint: str = "pass a local model directory instead", **kwargs: Any) -> Any:
    """``loader(name, **kwargs)`` for a local folder or a hub name (cache first, then the hub), with clear errors."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} holds no config.json, so it is no model directory; pass a folder "
                             "written by train.py or save_pretrained (an unfinished run has none).")
        check_model_dir(path)
        try:
            return loader(str(path), **kwargs)
        except RuntimeError as err:
            if "size mismatch" not in str(err) and "ignore_mismatched_sizes" not in str(err):
                raise
            raise InputError(f"The weights in {path} do not fit the model its config.json describes (tensors "
                             "of other sizes: the weights of a differently sized model); copy the model "
                             "folder again, weights and config.json together.") from None
    if path.exists() or _looks_like_path(name):
        raise InputError(f"Model directory {name} does not exist; check the path.")
    try:
        return loader(name, local_files_only=True, **kwargs)
    except OSError:
        pass  # not cached: ask the hub below
    if hub_unreachable():
        raise InputError(f"Model {name!r} is not a local directory and the Hugging Face hub cannot be "
                         f"reached (offline); {offline_hint}.")
    try:
        return loader(name, **kwargs)
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"Could not load model {name!r} from the Hugging Face hub ({reason}); "
                         f"check the name or {offline_hint}.") from None


def hub_file(name: str, filename: str) -> Path | None:
    """``filename`` of the hub model ``name`` (cached, else downloaded when the hub can be
    reached); None for a local path, a model without that file, or no hub."""
    from huggingface_hub import hf_hub_download

    if Path(name).expanduser().exists() or _looks_like_path(name):
        return None
    for local_only in (True, False):
        if not local_only and hub_unreachable():
            return None
        try:
            return Path(hf_hub_download(name, filename, local_files_only=local_only))
        except Exception:  # not cached, not in the repository, no such repository: look further
            continue
    return None


def load_model_and_tokenizer(model_dir: str | Path, device: str | Any | None = None, *, dtype: Any = None,
                             offline_hint: str = "pass a local model directory instead") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer padding left) of a train.py run (a LoRA adapter merged into its base
    model), a ``save_pretrained`` folder or a hub name; ``device`` None: CUDA if any; ``dtype`` None: float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = str(model_dir)
    adapter = is_adapter_dir(name)
    if adapter:  # a LoRA run folder: its tokenizer, the base model's weights + the adapter
        base = check_adapter_dir(Path(name))
        offline_hint = (f"{name} is a LoRA adapter of it: save the base model to a folder and set "
                        f"base_model_name_or_path in {Path(name) / ADAPTER_CONFIG} to it")
        if any((Path(name) / f).is_file() for f in TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(name)
        else:  # an adapter saved without its tokenizer uses the base model's
            tokenizer = from_pretrained(AutoTokenizer.from_pretrained, base, offline_hint=offline_hint)
        name = base
    else:
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, name, offline_hint=offline_hint)
    model = from_pretrained(AutoModelForCausalLM.from_pretrained, name, offline_hint=offline_hint,
                            dtype=dtype or torch.float32)
    if adapter:  # the adapter merged into the base model's weights
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(model_dir)).merge_and_unload()
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:  # ids past the embedding: garbage out (or an index error) later
        raise InputError(f"The tokenizer of {model_dir} has {len(tokenizer):,} tokens, but its model has only "
                         f"{rows:,} (vocab_size): the tokenizer belongs to another model; copy the tokenizer "
                         "files of the run that trained these weights.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer
