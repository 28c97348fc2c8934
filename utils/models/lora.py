"""LoRA adapters (peft): the layers adapted per architecture, and adapter folders (``adapter_config.json``)."""

from __future__ import annotations

from pathlib import Path

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
