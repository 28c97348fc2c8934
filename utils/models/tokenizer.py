"""A word-level tokenizer for cell sentences: one token per gene and per prompt word.

GPT-2's byte-pair encoding splits a gene name such as ``RPS27A`` into several tokens; a model
trained from scratch on cell sentences does not need that. This tokenizer maps every
whitespace-separated word (gene names, template words, words of cell-type labels) to one id,
so sequences are several times shorter and decoding rebuilds ``"GENE1 GENE2"`` exactly.
It is a ``transformers.PreTrainedTokenizerFast`` (``tokenizers`` WordLevel model +
WhitespaceSplit pre-tokenizer), saved and loaded with ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` like any other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)


def word_vocabulary(
    texts: Iterable[str], *, extra_words: Iterable[str] = (), min_count: int = 1
) -> dict[str, int]:
    """Word -> id: special tokens first, then ``extra_words`` (sorted), then the words of
    ``texts`` by decreasing count (ties by name), each word once.

    Deterministic for the same input, so every process of a distributed run builds the same.

    >>> word_vocabulary(["B A A", "C A"], extra_words=["is"])
    {'<pad>': 0, '<bos>': 1, '<eos>': 2, '<unk>': 3, 'is': 4, 'A': 5, 'B': 6, 'C': 7}
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text.split())
    vocab: dict[str, int] = {}
    for word in SPECIAL_TOKENS:
        vocab[word] = len(vocab)
    for word in sorted(set(extra_words)):
        if word not in vocab:
            vocab[word] = len(vocab)
    for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if count >= min_count and word not in vocab:
            vocab[word] = len(vocab)
    return vocab


def word_tokenizer_from_vocab(
    vocab: dict[str, int], *, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Wrap a word -> id mapping as a ``PreTrainedTokenizerFast`` (split on whitespace only)."""
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"The vocabulary lacks the special tokens {missing}.")
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Whitespace only: punctuation stays inside its word ("CD14+", "type:"), so decoding
    # with single spaces between tokens gives back the original text.
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_word_tokenizer(
    texts: Iterable[str],
    *,
    extra_words: Iterable[str] = (),
    min_count: int = 1,
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with one token per word of ``texts`` and of ``extra_words``.

    Parameters
    ----------
    texts
        Cell sentences (genes separated by whitespace).
    extra_words
        Words of the prompts and of the labels (see ``utils.models.prompts.prompt_words``).
    min_count
        Genes seen in fewer sentences than this map to ``<unk>``.
    model_max_length
        The longest sequence the model takes (its context size).
    """
    vocab = word_vocabulary(texts, extra_words=extra_words, min_count=min_count)
    return word_tokenizer_from_vocab(vocab, model_max_length=model_max_length)

