"""bench/model_bench.py on a tiny model: every method runs, and batched = one cell at a time."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import model_bench  # noqa: E402


def test_model_bench_methods_agree(one_thread, capsys) -> None:
    rows = model_bench.main(model_bench.parse_args([
        "--n_cells", "6", "--n_genes", "6", "--vocab_genes", "60", "--hidden", "32", "--layers", "1",
        "--batch_size", "4", "--label_tokens", "3"]))
    by = {(r["task"], r["method"]): r for r in rows}
    assert len(rows) == 13 and all(r["cells_per_s"] > 0 and r["cells"] == 6 for r in rows)
    # Batching changes the speed, not the answers; the newer package's way gives the same text.
    assert by[("predict", "ours, one cell at a time, free text")]["vs_first"] == 1.0
    assert by[("labels", "ours, one cell at a time, 4 labels constrained")]["vs_first"] == 1.0
    assert by[("predict", "newer package's way (1 per call)")]["vs_first"] == 1.0
    assert by[("generate", "ours, one cell at a time, greedy")]["vs_first"] == 1.0
    constrained = by[("generate", "ours, batched (4), sampled, constrained")]
    assert constrained["words_per_cell"] > 0 and constrained["vs_first"] is None
    assert by[("embed", "ours, one cell at a time")]["vs_first"] < 1e-4
    assert "cells/s" in capsys.readouterr().out
