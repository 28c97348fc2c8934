"""The evaluations over the steps' outputs: each module a script with ``parse_args(argv)`` and ``main(args)``;
here the steps they share."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utils import cli, publish
from utils.contract import EVAL_ARGS, EVAL_METRICS
from utils.models.model_card import add_evaluation_to_card, recorded_model_dir

logger = logging.getLogger("cell2sentence")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, name: str, seed_help: str,
          required: tuple[str, str] | None = None, positive: Sequence[str] = (),
          renamed: dict[str, str] | None = None) -> argparse.Namespace:
    """``argv`` with the run flags; ``required``: (a flag, the error when missing); ``positive``: flags ≥ 1."""
    cli.add_run_flags(parser, output_dir=Path("data/eval") / name, output_dir_help="where outputs go",
                      seed_help=seed_help)
    args = parser.parse_args(cli.renamed_flags(argv, renamed))
    if required is not None and getattr(args, required[0]) is None:
        raise cli.InputError(required[1])
    if any(getattr(args, flag) is not None and getattr(args, flag) < 1 for flag in positive):
        raise cli.InputError(f"{' and '.join(f'--{flag}' for flag in positive)} must be at least 1.")
    return args


def start(args: argparse.Namespace, inputs: Sequence[Path | None], outputs: Sequence[str] | None = None) -> None:
    """Seed the run, settle ``inputs`` (None: left out) and check that ``outputs`` may be written."""
    cli.seed_everything(args.seed)
    publish.settle_inputs(*[path for path in inputs if path is not None])
    if outputs is not None:
        publish.check_can_write(args.output_dir, list(outputs), overwrite=args.overwrite)


def finish(args: argparse.Namespace, outputs: Sequence[str], *, metrics: dict[str, Any], figures: dict[str, Any],
           frames: dict[str, Any], card: tuple[Path, str, Mapping[str, Any]] | None = None,
           captions: Mapping[str, str] | None = None) -> None:
    """Publish ``metrics.json``, the figures (a Figure, or a function writing the PNG at a path), the frames (CSV)
    and the arguments; ``card``: (the step's folder, the evaluation's name, its scores) for its model card."""
    with publish.staged_outputs(args.output_dir, list(outputs), overwrite=args.overwrite) as tmp:
        (tmp / EVAL_METRICS).write_text(cli.strict_json(metrics, indent=2, default=str) + "\n")
        for name, figure in figures.items():
            if callable(figure):
                figure(tmp / name)
            elif figure is not None:
                figure.savefig(tmp / name, dpi=150, bbox_inches="tight")
        for name, frame in frames.items():
            frame.to_csv(tmp / name, index=False)
        cli.save_args(args, tmp / EVAL_ARGS)
    if card is not None:
        step_dir, name, scores = card
        add_evaluation_to_card(recorded_model_dir(step_dir), name, scores,
                               figures={caption: args.output_dir / output for caption, output in (captions or {}).items()},
                               source=args.output_dir)
    logger.info("Wrote %s.", args.output_dir)
