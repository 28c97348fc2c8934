"""The model and tokenizer ``train.py`` trains (pretrained, a checkpoint's, or a small GPT-2-style one with a
word-level tokenizer from the data), LoRA adapters on top when asked, and the context length."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from utils.cli import InputError
from utils.models.loading import from_pretrained
from utils.models.lora import target_modules
from utils.models.multi_cell import template_words
from utils.models.prompts import attribute_name, prompt_words
from utils.models.train_data import label_columns_of, label_set

logger = logging.getLogger("cell2sentence.train")

OFFLINE_HINT = (
    "pass a local model directory with --model_name (a folder written by save_pretrained or "
    "an earlier train.py run), or train a small model from scratch with --init_from_scratch True"
)


def iter_top_genes(dataset: Any, top_k: int, batch_size: int = 10_000) -> Iterator[str]:
    """The first ``top_k`` genes of every sentence, batch by batch (no full copy)."""
    for batch in dataset.select_columns(["cell_sentence"]).iter(batch_size=batch_size):
        for sentence in batch["cell_sentence"]:
            yield " ".join(sentence.split()[:top_k])


def build_model_and_tokenizer(args: Any, train_split: Any, checkpoint: Path | None) -> tuple[Any, Any]:
    """The model and tokenizer train.py's flags ``args`` ask for: pretrained, the checkpoint's or new."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    from utils.models.tokenizer import build_word_tokenizer

    m, d = args.model, args.data
    if m.init_from_scratch and checkpoint is None:
        # The attribute and multi-condition prompts' words only with several label columns (a
        # one-column run's vocabulary stays what it was).
        columns = label_columns_of(d)
        labels = [x for column in columns for x in label_set(train_split, column)]
        words = prompt_words(labels, attributes=[attribute_name(c) for c in columns] if columns[1:] else [],
                             max_number=max(1024, d.top_k_genes))
        if getattr(d, "multi_cell_column", None):  # the multi-cell templates' words and group labels
            words = sorted({*words, *template_words(d.multi_cell_column,
                                                    label_set(train_split, d.multi_cell_column))})
        tokenizer = build_word_tokenizer(iter_top_genes(train_split, d.top_k_genes), extra_words=words,
                                         min_count=m.min_gene_count, model_max_length=m.n_positions)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=m.n_positions, n_embd=m.n_embd,
                            n_layer=m.n_layer, n_head=m.n_head, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = AutoModelForCausalLM.from_config(config)
        logger.info("New GPT-2-style model: %d layers, %d dims, %d heads, %s parameters, vocabulary of %s words.",
                    m.n_layer, m.n_embd, m.n_head, f"{model.num_parameters():,}", f"{len(tokenizer):,}")
    else:
        tokenizer = (AutoTokenizer.from_pretrained(str(checkpoint)) if checkpoint is not None else
                     from_pretrained(AutoTokenizer.from_pretrained, m.model_name, offline_hint=OFFLINE_HINT))
        # An adapter checkpoint: the base model + fresh adapters (Trainer restores the adapters).
        source = m.model_name if checkpoint is None or m.lora_r else str(checkpoint)
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, source, offline_hint=OFFLINE_HINT,
                                dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise InputError(f"The tokenizer of {m.model_name} has no EOS token; pick another model.")
    tokenizer.padding_side = "right"
    if getattr(model, "loss_type", None) is None:
        # The loss transformers falls back to for GPT-2, named so that it does not warn in every process.
        model.loss_type = "ForCausalLM"
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    if m.lora_r:  # LoRA adapters: only they train
        from peft import LoraConfig, get_peft_model

        modules = target_modules(model.config.model_type, m.lora_target_modules)
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        if missing := [x for x in modules if x not in present]:
            raise InputError(f"--lora_target_modules {','.join(missing)} name no layer of this "
                             f"{model.config.model_type} model; pick among its linear layers.")
        if args.training.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need inputs that require grad
        # GPT-2's Conv1D layers store weights transposed; peft must know.
        model = get_peft_model(model, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                                 target_modules=list(modules), task_type="CAUSAL_LM",
                                                 fan_in_fan_out=model.config.model_type == "gpt2"))
        base = Path(m.model_name).expanduser()  # a local one by its absolute path: the run loads from anywhere
        model.peft_config["default"].base_model_name_or_path = str(base.resolve()) if base.is_dir() else m.model_name
        trainable, total = model.get_nb_trainable_parameters()
        logger.info("LoRA r=%d alpha=%g on %s: %s of %s parameters train (%.2f%%).", m.lora_r, m.lora_alpha,
                    ",".join(modules), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model, tokenizer


def context_length(model: Any, tokenizer: Any, requested: int | None) -> int:
    """The longest example: the model's context, or less when asked."""
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit and tok_limit < 1_000_000:
        limit = min(limit, tok_limit) if limit else tok_limit
    limit = limit or 1024
    if requested is not None and requested > limit:
        logger.warning("--max_seq_length %d exceeds the model's context of %d tokens; using %d.",
                       requested, limit, limit)
    return limit if requested is None else min(requested, limit)
