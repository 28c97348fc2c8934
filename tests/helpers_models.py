"""A tiny model saved the way the hub ships a published C2S model (for the offline tests).

GPT-NeoX (the architecture of the C2S-Pythia models) with a byte-level BPE tokenizer trained
locally on cell sentences and the C2S-Scale prompts; the folder holds config.json,
model.safetensors, tokenizer.json, tokenizer_config.json and special_tokens_map.json, and no
train_args.json.
"""

from __future__ import annotations

from pathlib import Path

from helpers_train import make_sentences

from utils.prompts import prompt_format

EOS = "<|endoftext|>"
PAD = "<|padding|>"


def bpe_tokenizer(texts: list[str], *, vocab_size: int = 700):
    """A byte-level BPE tokenizer like Pythia's, trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False)


def make_published_model(path: Path, *, n_layer: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write an untrained tiny GPT-NeoX model + BPE tokenizer to ``path`` (hub layout)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    sentences, labels = make_sentences(200, seed=seed)
    fmt = prompt_format("c2s_scale")
    texts = sentences + [fmt.prediction_prompt(s.split()[:10]) + fmt.prediction_answer(t)
                         for s, t in zip(sentences, labels, strict=True)]
    texts += [fmt.generation_prompt(t, 10) for t in set(labels)]
    tokenizer = bpe_tokenizer(texts)
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=n_layer,
                           num_attention_heads=4, intermediate_size=4 * hidden,
                           max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
