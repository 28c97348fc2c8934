"""What the benchmark scripts share: their parser, the flags several of them have, and how they
print their figures as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any


def bench_parser(doc: str, *, show_defaults: bool = False) -> argparse.ArgumentParser:
    """A benchmark's parser: its description is the docstring's first paragraph."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=(
        argparse.ArgumentDefaultsHelpFormatter if show_defaults else argparse.HelpFormatter))


def add_int_flags(parser: argparse.ArgumentParser, **flags: tuple[int, str]) -> None:
    """An integer flag ``--<name>`` per keyword, given as (default, help)."""
    for name, (default, text) in flags.items():
        parser.add_argument(f"--{name}", type=int, default=default, help=text)


def add_shared_flags(parser: argparse.ArgumentParser, *, repeats: tuple[int, str] | None = None,
                     threads: bool = False, device: tuple[str | None, str] | None = None,
                     seed: tuple[int, str] | None = None, json_flag: bool = False) -> None:
    """The flags several benchmarks have, in this order: ``--repeats``, ``--threads`` (of torch),
    ``--device``, ``--seed`` and ``--json``; a (default, help) pair each, or a switch."""
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats[0], help=repeats[1])
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: torch's)")
    if device is not None:
        parser.add_argument("--device", type=str, default=device[0], help=device[1])
    if seed is not None:
        parser.add_argument("--seed", type=int, default=seed[0], help=seed[1])
    if json_flag:
        parser.add_argument("--json", action="store_true", help="also print the figures as JSON")


def set_threads(threads: int | None) -> None:
    """torch's CPU threads (``--threads``; None: torch's own choice)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def print_json(figures: Any, wanted: bool) -> None:
    """The figures as one JSON line, when ``--json`` asked for them."""
    if wanted:
        print(json.dumps(figures))
