"""What every script shares: the one-sentence error, the CLI runner, seeding, run records, shared flags."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.models.prompts import C2S_SCALE, DEFAULT_ORGANISM, OURS

logger = logging.getLogger("cell2sentence")


class InputError(Exception):
    """Bad input or flags, in one sentence saying what is wrong and how to fix it (exit status 2)."""


def run_cli(main: Callable[[Any], Any], parse_args: Callable[[Sequence[str] | None], Any]) -> None:
    """Parse and run a script: ``InputError`` or a full disk is one line (exit 2), SIGTERM is Ctrl-C."""
    from utils.publish import _HELD, disk_full_error, is_disk_full, release_output_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("anndata").setLevel(logging.WARNING)  # its "... storing 'x' as categorical" notes
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)
    sys.unraisablehook = _quiet_disk_full_unraisable
    sys.excepthook = _quiet_disk_full_excepthook
    code = 0
    try:
        main(parse_args(None))
    except InputError as err:
        logger.error("%s", err)
        code = 2
    except KeyboardInterrupt as err:
        what = "Stopped by SIGTERM" if isinstance(err, Terminated) else "Interrupted"
        logger.error("%s; no partial output was left in place.", what)
        code = 143 if isinstance(err, Terminated) else 130
    except Exception as err:
        if not is_disk_full(err):
            raise
        folder = getattr(err, "filename", None) or next(iter(_HELD), None) or Path.cwd()
        logger.error("%s", disk_full_error(Path(folder), staged=False))
        code = 2
    finally:
        for folder in list(_HELD):
            release_output_dir(folder)
    if code:  # HDF5 may crash the teardown after ENOSPC (SIGSEGV): the outputs are settled, leave without it
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _h5py_disk_full(err: BaseException | None) -> bool:
    # h5py reports a full disk as RuntimeError or (h5py >= 3.16) OSError.
    return isinstance(err, RuntimeError | OSError) and "No space left on device" in str(err)


def _quiet_disk_full_unraisable(unraisable: Any) -> None:
    """Drop the tracebacks h5py prints freeing a file a full disk cut short (reported in one line)."""
    if not _h5py_disk_full(unraisable.exc_value):
        sys.__unraisablehook__(unraisable)


def _quiet_disk_full_excepthook(kind: type, err: BaseException, tb: Any) -> None:
    # h5py's Cython __dealloc__ prints its error through sys.excepthook before the unraisable hook.
    if not _h5py_disk_full(err):
        sys.__excepthook__(kind, err, tb)


def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and (when installed) ``torch`` from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # torch is optional for the data steps
        return
    torch.manual_seed(seed)


def save_args(args: Any, path: Path) -> None:
    """Write the effective arguments of a run as JSON (paths as strings)."""
    values = vars(args) if not isinstance(args, dict) else args
    path.write_text(json.dumps(values, indent=2, sort_keys=True, default=str) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` writing NaN and infinities as ``null`` (strict JSON, as jq and JavaScript read).

    >>> strict_json({"accuracy": float("nan"), "n": 3})
    '{"accuracy": null, "n": 3}'
    """
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler stopping the job), handled everywhere like Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


# Old flag names: they still work, with a warning, unlisted in --help.
RENAMED_FLAGS = {"--cell_type_column": "--label_column", "--labels_key": "--label_column",
                 "--max_genes": "--top_k_genes", "--preprocessing_num_workers": "--num_proc"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's layout kept; a flag's default shown unless its help names it or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False) or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A script's parser: its description is the docstring's first paragraph."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=HelpFormatter)


def add_run_flags(parser: argparse.ArgumentParser, *, output_dir: Path | None, output_dir_help: str,
                  seed_help: str = "the run's seed") -> None:
    """``--output_dir``, ``--seed`` and ``--overwrite``."""
    parser.add_argument("--output_dir", type=Path, default=output_dir, help=output_dir_help)
    parser.add_argument("--seed", type=int, default=1234, help=seed_help)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def renamed_flags(argv: Sequence[str] | None, renamed: dict[str, str] | None = None) -> list[str]:
    """``argv`` (default: the command line) with old flag names (``RENAMED_FLAGS``, ``renamed``) renamed.

    >>> renamed_flags(["--cell_type_column=tissue", "--seed", "1"])
    ['--label_column=tissue', '--seed', '1']
    """
    table = {**RENAMED_FLAGS, **(renamed or {})}
    out = []
    for arg in sys.argv[1:] if argv is None else argv:
        name, sep, value = str(arg).partition("=")
        if name in table:
            logger.warning("%s is now called %s; the old name will go.", name, table[name])
            arg = table[name] + sep + value
        out.append(arg)
    return out


MODEL_HELP = ("a train.py run folder (full model or LoRA adapter), a published C2S model's folder, or its hub "
              "name, e.g. vandijklab/C2S-Pythia-410m-cell-type-prediction (required)")


def add_model_arguments(parser: Any) -> None:
    """The flags of every script that uses a model (``load_from_args`` reads them)."""
    parser.add_argument("--model_dir", type=Path, default=None, help=MODEL_HELP)
    parser.add_argument("--prompt_format", choices=("auto", OURS, C2S_SCALE), default="auto",
                        help="auto: the run's (train_args.json), c2s_scale for a published model without one")
    parser.add_argument("--organism", type=str, default=DEFAULT_ORGANISM, help="{organism} of c2s_scale prompts")
    parser.add_argument("--device", type=str, default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="weights dtype (auto: bf16/fp16 on CUDA, float32 on CPU)")


def load_from_args(args: Any, *, device: str | None = None) -> Any:
    """The model of ``add_model_arguments``' flags; ``device`` overrides ``--device`` (torchrun)."""
    from utils.models.cell_model import CellSentenceModel

    if args.model_dir is None:
        raise InputError(f"Pass --model_dir: {MODEL_HELP.replace(' (required)', '')}.")
    return CellSentenceModel.load(args.model_dir, device=device or args.device, dtype=args.dtype,
                                  prompt_format_name=None if args.prompt_format == "auto" else args.prompt_format,
                                  top_k_genes=getattr(args, "top_k_genes", None), organism=args.organism)
