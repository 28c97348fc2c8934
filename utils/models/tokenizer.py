"""A word-level tokenizer for cell sentences: one token per gene and per prompt word (byte-pair
encoding splits ``RPS27A`` into several), so sequences are shorter and decoding gives back the text."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)


def word_vocabulary(texts: Iterable[str], *, extra_words: Iterable[str] = (),
                    min_count: int = 1) -> dict[str, int]:
    """Word -> id: special tokens first, then ``extra_words`` (sorted), then the words of
    ``texts`` by decreasing count (ties by name), each word once; deterministic.

    >>> word_vocabulary(["B A A", "C A"], extra_words=["is"])
    {'<pad>': 0, '<bos>': 1, '<eos>': 2, '<unk>': 3, 'is': 4, 'A': 5, 'B': 6, 'C': 7}
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text.split())
    vocab = {word: i for i, word in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(extra_words)):
        vocab.setdefault(word, len(vocab))
    for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if count >= min_count:
            vocab.setdefault(word, len(vocab))
    return vocab


def build_word_tokenizer(texts: Iterable[str], *, extra_words: Iterable[str] = (), min_count: int = 1,
                         model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """One token per word of ``texts`` and ``extra_words``; genes seen under ``min_count`` times are ``<unk>``."""
    vocab = word_vocabulary(texts, extra_words=extra_words, min_count=min_count)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Whitespace only: punctuation stays in its word ("CD14+"), so decoding gives back the text.
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN,
                                   eos_token=EOS_TOKEN, unk_token=UNK_TOKEN, clean_up_tokenization_spaces=False,
                                   model_max_length=model_max_length, padding_side="right")
