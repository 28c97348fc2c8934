"""Tiny models saved the way users get them, for the offline tests (and bench/model_bench.py).

``build_bpe_tokenizer``: a byte-level BPE tokenizer like the published models', trained on given
texts. ``make_published_model``: GPT-NeoX (the architecture of the C2S-Pythia models) with such a
tokenizer trained locally on cell sentences and the C2S-Scale prompts, saved like a hub
model (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
special_tokens_map.json; no train_args.json). ``word_level_model``: an untrained GPT-2 with a
word-level tokenizer, saved like a ``train.py`` run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from helpers_train import MARKERS, make_sentences
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from utils.models.prompts import prompt_format

BPE_EOS = "<|endoftext|>"
BPE_PAD = "<|padding|>"


def build_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int = 1000,
                        model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer like the published C2S (Pythia) models', trained on ``texts``.

    The offline stand-in for a hub tokenizer: gene names split into sub-word pieces as they do
    in GPT-NeoX's tokenizer, ``<|endoftext|>`` as BOS/EOS, ``<|padding|>`` for padding.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS, BPE_PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BPE_EOS, eos_token=BPE_EOS,
                                   unk_token=BPE_EOS, pad_token=BPE_PAD, clean_up_tokenization_spaces=False,
                                   model_max_length=model_max_length)


def make_published_model(path: Path, *, n_layer: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write an untrained tiny GPT-NeoX model + BPE tokenizer to ``path`` (hub layout)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    sentences, labels = make_sentences(200, seed=seed)
    fmt = prompt_format("c2s_scale")
    texts = sentences + [fmt.prediction_prompt(s.split()[:10]) + fmt.prediction_answer(t)
                         for s, t in zip(sentences, labels, strict=True)]
    texts += [fmt.generation_prompt(t, 10) for t in set(labels)]
    tokenizer = build_bpe_tokenizer(texts, vocab_size=700)
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=n_layer,
                           num_attention_heads=4, intermediate_size=4 * hidden,
                           max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    # The hub's (older) tokenizer files carry this too; loaders must not mind it.
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "unk_token": tokenizer.unk_token,
         "pad_token": tokenizer.pad_token}))
    return path


def word_level_model(path: Path) -> Path:
    """An untrained GPT-2 with a word-level tokenizer, saved like a train.py run."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from utils.models.prompts import prompt_words
    from utils.models.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(make_sentences(200)[0], extra_words=prompt_words(MARKERS), model_max_length=256)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "train_args.json").write_text(json.dumps({"top_k_genes": 20, "cell_types": sorted(MARKERS),
                                                      "prompt_format": "ours"}))
    return path
