"""LoRA adapters (peft): defaults per architecture, and loading an adapter folder
(``adapter_config.json``, which names the base model, + ``adapter_model.safetensors``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.cli import InputError

ADAPTER_CONFIG = "adapter_config.json"

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: The attention and MLP projections LoRA adapts, per ``config.model_type``.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    **{name: list(_LLAMA_LIKE) for name in ("llama", "gemma", "gemma2", "gemma3_text", "mistral", "qwen2")},
}


def is_adapter_dir(path: str | Path) -> bool:
    """A folder with a peft adapter (and no full model of its own)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def target_modules(model_type: str, requested: str | None) -> list[str]:
    """``--lora_target_modules`` (comma-separated) or the default of the architecture."""
    if requested:
        return [m.strip() for m in requested.split(",") if m.strip()]
    if model_type not in DEFAULT_TARGET_MODULES:
        raise InputError(f"No default LoRA target modules for a {model_type!r} model; pass "
                         "--lora_target_modules with its projection layers (e.g. q_proj,v_proj).")
    return list(DEFAULT_TARGET_MODULES[model_type])


def wrap_with_lora(model: Any, *, r: int, alpha: float, dropout: float, modules: Sequence[str]) -> Any:
    """The model with fresh LoRA adapters on ``modules``; only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in modules if m not in present]
    if missing:
        raise InputError(f"--lora_target_modules {','.join(missing)} name no layer of this "
                         f"{model.config.model_type} model; pick among its linear layers.")
    # GPT-2's Conv1D layers store weights transposed; peft must know.
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(modules),
                        task_type="CAUSAL_LM", fan_in_fan_out=model.config.model_type == "gpt2")
    return get_peft_model(model, config)


def base_model_name(adapter_dir: str | Path) -> str:
    """The base model an adapter folder was trained on."""
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    name = config.get("base_model_name_or_path")
    if not name:
        raise InputError(f"{adapter_dir}/{ADAPTER_CONFIG} names no base model.")
    return str(name)


def load_adapter_model(adapter_dir: str | Path, base: Any) -> Any:
    """``base`` with the adapter of ``adapter_dir`` merged into its weights."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
