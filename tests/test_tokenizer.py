"""The word-level tokenizer: one token per gene/word, exact round trip, save and reload."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from utils.models.examples import decode_answer, encode_answer, encode_prompt
from utils.models.prompts import generation_prompt, prediction_prompt, prompt_words
from utils.models.tokenizer import build_word_tokenizer, word_vocabulary

SENTENCES = ["CD14 LYZ HLA-DRA MT-CO1", "MS4A1 CD79A LYZ", "RP11-34P13.7 CD14"]
LABELS = ["CD14+ Monocyte", "B cell"]


def _tokenizer():
    return build_word_tokenizer(SENTENCES, extra_words=prompt_words(LABELS, max_number=100))


def test_vocabulary_is_ordered_and_deterministic() -> None:
    vocab = word_vocabulary(SENTENCES, extra_words=["is"])
    assert list(vocab)[:5] == ["<pad>", "<bos>", "<eos>", "<unk>", "is"]
    # most frequent genes first, ties by name
    assert list(vocab)[5:8] == ["CD14", "LYZ", "CD79A"]
    assert vocab == word_vocabulary(SENTENCES, extra_words=["is"])
    assert sorted(vocab.values()) == list(range(len(vocab)))


def test_one_token_per_gene_and_exact_round_trip() -> None:
    tok = _tokenizer()
    sentence = "CD14 LYZ HLA-DRA MT-CO1 RP11-34P13.7"
    ids = tok(sentence, add_special_tokens=False)["input_ids"]
    assert len(ids) == 5
    assert tok.unk_token_id not in ids
    assert decode_answer(tok, ids) == sentence
    answer = encode_answer(tok, "CD14+ Monocyte")
    assert len(answer) == 2
    assert decode_answer(tok, [*answer, tok.eos_token_id, ids[0]]) == "CD14+ Monocyte"


def test_prompts_encode_without_unknown_words() -> None:
    tok = _tokenizer()
    for prompt in (
        generation_prompt("CD14+ Monocyte", 100),
        generation_prompt(None, 7),
        prediction_prompt(["CD14", "LYZ"]),
    ):
        ids = encode_prompt(tok, prompt)
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids
        assert len(ids) == len(prompt.split()) + 1
        # punctuation attached to template words survives the round trip
        assert tok.decode(ids[1:]) == prompt


def test_unknown_gene_maps_to_unk() -> None:
    tok = _tokenizer()
    assert tok("NOTAGENE", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_save_and_reload_gives_same_ids(tmp_path: Path) -> None:
    tok = _tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    prompt = prediction_prompt(["CD14", "LYZ", "HLA-DRA"])
    assert encode_prompt(loaded, prompt) == encode_prompt(tok, prompt)
    assert (loaded.pad_token, loaded.eos_token, loaded.bos_token) == ("<pad>", "<eos>", "<bos>")
    assert decode_answer(loaded, encode_answer(loaded, "CD14 LYZ")) == "CD14 LYZ"


def test_byte_level_bpe_like_gpt2_round_trips() -> None:
    # GPT-2's kind of tokenizer (byte-level BPE, BOS = EOS), trained here since the hub is out
    # of reach: answers follow the prompt after one space and decode back exactly.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(SENTENCES * 20 + LABELS * 20, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    answer = "CD14 LYZ HLA-DRA"
    ids = encode_answer(tok, answer)
    assert len(ids) > 3  # several pieces per gene, unlike the word-level tokenizer
    assert decode_answer(tok, [*ids, tok.eos_token_id, *ids]) == answer
    assert decode_answer(tok, encode_answer(tok, "CD14+ Monocyte")) == "CD14+ Monocyte"
    prompt_ids = encode_prompt(tok, prediction_prompt(["CD14", "LYZ"]))
    assert prompt_ids[0] == tok.bos_token_id
    assert tok.decode(prompt_ids[1:]) == prediction_prompt(["CD14", "LYZ"])
