"""predict.py on a trained model, side by side in one run: a user's raw h5ad against the same
cells' transform output, and label-constrained against free-text answers.

Prints (and writes as JSON with ``--json``):
- agreement of ``predict.py --h5ad <raw cells>`` with ``predict.py --data_dir <their transform
  output> --split all`` on the cells both predicted (the recipe makes them the same sentences);
- accuracy, macro-F1 and cells/s of the label-constrained default and of ``--free_text``, on
  ``--split``, best of ``--repeats`` for the time.

    python bench/predict_bench.py --model_dir /tmp/c2s_e2e/model/scratch-e2e-k50 \\
        --h5ad /tmp/c2s_e2e/pbmc68k_reduced.h5ad --data_dir /tmp/c2s_e2e/cell_sentences_hf
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

import predict  # noqa: E402
from bench.common import add_shared_flags, bench_parser, print_json, set_threads  # noqa: E402
from utils.cli import run_cli  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--model_dir", type=Path, required=True, help="a trained model")
    p.add_argument("--h5ad", type=Path, required=True, help="the raw cells the model's transform was run on")
    p.add_argument("--data_dir", type=Path, required=True, help="that transform's cell_sentences_hf/")
    p.add_argument("--split", type=str, default="test", help="split of the constrained vs free-text comparison")
    p.add_argument("--batch_size", type=int, default=16, help="cells per forward pass")
    add_shared_flags(p, repeats=(2, "runs of each timed method (best time kept)"), threads=True, json_flag=True)
    return p.parse_args(argv)


def run(out: Path, *flags: str) -> tuple[dict[str, Any], pd.DataFrame]:
    metrics = predict.main(predict.parse_args([*flags, "--output_dir", str(out), "--overwrite"]))
    return metrics, pd.read_csv(out / "predictions.csv", keep_default_na=False)


def main(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    model = ["--model_dir", str(args.model_dir), "--batch_size", str(args.batch_size)]
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        _, raw = run(Path(tmp) / "raw", *model, "--h5ad", str(args.h5ad))
        _, split = run(Path(tmp) / "all", *model, "--data_dir", str(args.data_dir), "--split", "all")
        column = next(c.removeprefix("predicted_") for c in raw.columns if c.startswith("predicted_"))
        both = raw.merge(split, on="cell_name", suffixes=("_h5ad", "_split"))
        same = (both[f"predicted_{column}_h5ad"] == both[f"predicted_{column}_split"]).mean()
        figures["h5ad_vs_transform"] = {"cells_h5ad": len(raw), "cells_transform": len(split), "common": len(both),
                                        "agreement": float(same),
                                        "max_score_difference": float((both[f"{column}_score_h5ad"]
                                                                       - both[f"{column}_score_split"]).abs().max())}
        for name, extra in (("label-constrained", []), ("free text", ["--free_text"])):
            runs = [run(Path(tmp) / "cmp", *model, "--data_dir", str(args.data_dir), "--split", args.split, *extra)[0]
                    for _ in range(args.repeats)]
            best = min(runs, key=lambda m: m["seconds"])
            summary = best.get("prediction", {})
            figures[name] = {"cells": best["n_cells"], "seconds": round(best["seconds"], 3),
                             "cells_per_s": round(best["n_cells"] / best["seconds"], 2),
                             "accuracy": summary.get("accuracy"), "macro_f1": summary.get("macro_f1"),
                             "majority_baseline": summary.get("majority_baseline")}
    h = figures["h5ad_vs_transform"]
    print(f"h5ad ({h['cells_h5ad']} cells) vs transform output ({h['cells_transform']}): {h['common']} common, "
          f"agreement {h['agreement']:.4f}, largest score difference {h['max_score_difference']:.2g}")
    print(f"{'method':<18} {'cells':>6} {'seconds':>8} {'cells/s':>8} {'accuracy':>9} {'macro-F1':>9} {'majority':>9}")
    for name in ("label-constrained", "free text"):
        r = figures[name]
        print(f"{name:<18} {r['cells']:>6} {r['seconds']:>8.2f} {r['cells_per_s']:>8.2f} {r['accuracy']:>9.3f} "
              f"{r['macro_f1']:>9.3f} {r['majority_baseline']:>9.3f}")
    print_json(figures, args.json)
    return figures


if __name__ == "__main__":
    run_cli(main, parse_args)
