"""Training examples: labels masked on prompt and padding, answers never truncated."""

from __future__ import annotations

import random

import pytest

from utils.cli import InputError
from utils.models.examples import (
    IGNORE_INDEX,
    CausalLMCollator,
    encode_answer,
    encode_prompt,
    generation_example,
    make_example,
    parse_tasks,
    prediction_example,
    tokenize_batch,
)
from utils.models.prompts import (
    CELL_TYPE_PREDICTION_TEMPLATES,
    CONDITIONAL_GENERATION_TEMPLATES,
    prompt_words,
)
from utils.models.tokenizer import build_word_tokenizer

GENES = [f"G{i}" for i in range(50)]
LABEL = "CD14+ Monocyte"


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer([" ".join(GENES)], extra_words=prompt_words([LABEL]))


def test_labels_mask_exactly_the_prompt(tok) -> None:
    template = CELL_TYPE_PREDICTION_TEMPLATES[3]  # "Cell sentence: {genes} Cell type:"
    example, kept = prediction_example(tok, GENES[:3], LABEL, template=template, max_length=64)
    prompt_ids = encode_prompt(tok, "Cell sentence: G0 G1 G2 Cell type:")
    answer_ids = encode_answer(tok, LABEL)
    assert kept == 3
    assert len(prompt_ids) == 1 + 7
    assert example["input_ids"] == [*prompt_ids, *answer_ids, tok.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * 8 + [*answer_ids, tok.eos_token_id]


def test_collator_pads_inputs_and_masks_labels(tok) -> None:
    a = {"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2]}
    b = {"input_ids": [1, 8, 2], "labels": [-100, 8, 2]}
    batch = CausalLMCollator(pad_token_id=tok.pad_token_id)([a, b])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, 2], [-100, 8, 2, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_prediction_truncates_prompt_genes_not_the_answer(tok) -> None:
    template = CELL_TYPE_PREDICTION_TEMPLATES[3]
    example, kept = prediction_example(tok, GENES, LABEL, template=template, max_length=20)
    assert len(example["input_ids"]) <= 20
    answer = [*encode_answer(tok, LABEL), tok.eos_token_id]
    assert example["input_ids"][-3:] == answer
    assert [i for i in example["labels"] if i != IGNORE_INDEX] == answer
    # the top-ranked genes are kept, the lowest-ranked dropped: 20 - bos - 4 words - 3 answer
    assert kept == 20 - 1 - 4 - 3
    assert tok.decode(example["input_ids"][3 : 3 + kept]) == " ".join(GENES[:kept])


def test_generation_shortens_the_answer_and_keeps_eos(tok) -> None:
    template = CONDITIONAL_GENERATION_TEMPLATES[0]
    example, kept = generation_example(tok, GENES, LABEL, template=template, max_length=40)
    assert len(example["input_ids"]) == 40
    assert example["input_ids"][-1] == tok.eos_token_id
    answer = [i for i in example["labels"] if i != IGNORE_INDEX][:-1]
    assert tok.decode(answer) == " ".join(GENES[:kept])
    # the prompt asks for the number of genes it answers with
    prompt_len = len(example["input_ids"]) - kept - 1
    assert str(kept) in tok.decode(example["input_ids"][1:prompt_len]).split()


def test_too_small_context_fails_clearly(tok) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        prediction_example(
            tok, GENES, LABEL, template=CELL_TYPE_PREDICTION_TEMPLATES[0], max_length=5
        )


def test_examples_are_seeded_per_cell(tok) -> None:
    batch = {"cell_sentence": [" ".join(GENES)] * 40, "cell_type": [LABEL] * 40}
    tasks = parse_tasks("conditional_generation,unconditional_generation,cell_type_prediction")
    kwargs = dict(tokenizer=tok, tasks=tasks, top_k=10, max_length=64, seed=3, split="train")
    out = tokenize_batch(batch, list(range(40)), **kwargs)
    # same cells in other batches give the same examples
    half = tokenize_batch(
        {k: v[20:] for k, v in batch.items()}, list(range(20, 40)), **kwargs
    )
    assert out["input_ids"][20:] == half["input_ids"]
    assert set(out["task"]) == set(tasks)
    for labels, task in zip(out["labels"], out["task"], strict=True):
        answer = tok.decode([i for i in labels if i != IGNORE_INDEX][:-1])
        assert answer == (LABEL if task == "cell_type_prediction" else " ".join(GENES[:10]))


def test_make_example_rejects_unknown_task(tok) -> None:
    with pytest.raises(ValueError, match="Unknown task"):
        make_example(tok, "G1", None, task="x", top_k=5, max_length=32, rng=random.Random(0))


def test_parse_tasks_validates() -> None:
    assert parse_tasks("unconditional_generation") == {"unconditional_generation": 1.0}
    with pytest.raises(InputError, match="Unknown task"):
        parse_tasks("generation")
    with pytest.raises(InputError, match="one non-negative number per task"):
        parse_tasks("unconditional_generation,cell_type_prediction", "1")


def test_cells_without_label_get_untyped_tasks_or_none(tok) -> None:
    batch = {"cell_sentence": [" ".join(GENES)] * 30, "cell_type": [None, "", "nan"] * 10}
    kwargs = dict(tokenizer=tok, top_k=5, max_length=64, seed=0, split="train")
    mixed = parse_tasks("conditional_generation,unconditional_generation,cell_type_prediction")
    out = tokenize_batch(batch, list(range(30)), tasks=mixed, **kwargs)
    assert out["task"] == ["unconditional_generation"] * 30
    typed = parse_tasks("cell_type_prediction")
    assert tokenize_batch(batch, list(range(30)), tasks=typed, **kwargs)["task"] == []
