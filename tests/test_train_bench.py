"""bench/train_bench.py: synthetic examples have the asked length; the figures add up."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from utils.cli import InputError

_PATH = Path(__file__).resolve().parents[1] / "bench" / "train_bench.py"
_spec = importlib.util.spec_from_file_location("train_bench", _PATH)
train_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_bench)


def test_synthetic_examples_fill_the_sequence() -> None:
    tokenizer, examples = train_bench.synthetic_examples(6, seq_len=48, n_genes=100, seed=1)
    assert [len(e["input_ids"]) for e in examples] == [48] * 6
    assert all(e["input_ids"][-1] == tokenizer.eos_token_id for e in examples)
    assert tokenizer.unk_token_id not in examples[0]["input_ids"]


def test_bench_reports_consistent_figures(capsys) -> None:
    argv = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--batch_size", "4",
            "--seq_len", "48", "--steps", "3", "--warmup_steps", "1", "--n_genes", "200",
            "--threads", "1"]
    figures = train_bench.main(train_bench.parse_args(argv))
    assert figures["parameters"] > 0 and figures["steps"] == 3
    assert figures["tokens_per_s"] == pytest.approx(
        figures["samples_per_s"] * 48, rel=0.01
    )
    assert figures["ms_per_step"] == pytest.approx(1000 * 4 / figures["samples_per_s"], rel=0.01)
    assert "tokens/s" in capsys.readouterr().out


def test_bad_sizes() -> None:
    with pytest.raises(InputError, match="not divisible"):
        train_bench.main(train_bench.parse_args(["--n_embd", "30", "--n_head", "4"]))
